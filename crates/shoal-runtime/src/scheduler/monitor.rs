//! What the scheduler remembers for dashboards: a bounded task stream,
//! workers' figures over time, profiles per task group, workers' logs and
//! cluster-wide counters. Fed by the owner task as messages arrive; no I/O,
//! and every update is O(1) amortised so it costs the scheduler next to
//! nothing when nobody looks.

use rustc_hash::FxHashMap;
use shoal_proto::{Activity, ActivityKind, Timing, WorkerMetrics};
use std::collections::VecDeque;

/// Task stream entries kept (older ones fall off; a dashboard aggregates).
pub(crate) const STREAM_CAP: usize = 100_000;
/// Samples of each worker's figures kept (one a heartbeat: an hour).
const HISTORY_CAP: usize = 3600;
/// Heartbeat samples kept over all workers (about 9 MiB).
const HISTORY_BUDGET: usize = 64 * HISTORY_CAP;
/// Log lines kept per worker.
const LOG_CAP: usize = 1000;
/// Workers gone whose history and logs are kept (the oldest go first).
const GONE_CAP: usize = 64;
/// Distinct stacks kept per task group (further new stacks are counted
/// under "(other)": a profile is a picture, not an archive).
const STACKS_CAP: usize = 5000;

/// What a task stream entry shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Compute = 0,
    Error = 1,
    Transfer = 2,
    Spill = 3,
}

/// One entry of the task stream.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Record {
    pub(crate) seq: u64,
    pub(crate) task: u64,
    /// Task group id (`u32::MAX` when unknown).
    pub(crate) group: u32,
    pub(crate) worker: u32,
    /// Execution thread (lane); transfers and spills draw on their own lane.
    pub(crate) thread: u32,
    pub(crate) start_us: u64,
    pub(crate) duration_us: u64,
    pub(crate) kind: Kind,
    /// Result size (compute) or bytes moved.
    pub(crate) bytes: u64,
}

/// One sample of a worker's figures.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Sample {
    pub(crate) t_us: u64,
    pub(crate) memory: u64,
    pub(crate) managed: u64,
    pub(crate) spilled: u64,
    pub(crate) cpu: f32,
}

#[derive(Default)]
pub(crate) struct Monitor {
    next_seq: u64,
    pub(crate) stream: VecDeque<Record>,
    pub(crate) history: FxHashMap<u32, VecDeque<Sample>>,
    /// Worker names, including workers gone (their stream entries stay).
    pub(crate) worker_names: FxHashMap<u32, String>,
    /// Group name -> folded stack -> samples.
    pub(crate) profile: FxHashMap<String, FxHashMap<String, u64>>,
    pub(crate) logs: FxHashMap<u32, VecDeque<String>>,
    /// Error text of erred tasks (while the scheduler knows them).
    pub(crate) error_text: FxHashMap<u64, String>,
    pub(crate) finished_total: u64,
    pub(crate) erred_total: u64,
    pub(crate) transfer_bytes: u64,
    pub(crate) spill_bytes: u64,
    /// Scheduler event-loop lag: the latest and the largest, microseconds.
    pub(crate) lag_us: u64,
    pub(crate) lag_max_us: u64,
    /// Messages received from clients and workers, in all.
    pub(crate) messages_in: u64,
    /// Messages sent to connections that are gone (live ones count in
    /// their outboxes).
    pub(crate) messages_out_gone: u64,
    /// Workers gone, oldest first (their figures are dropped past `GONE_CAP`).
    gone: VecDeque<u32>,
}

impl Monitor {
    fn push(&mut self, mut r: Record) {
        r.seq = self.next_seq;
        self.next_seq += 1;
        if self.stream.len() == STREAM_CAP {
            self.stream.pop_front();
        } else if self.stream.len() == self.stream.capacity() {
            // Doubling, but never past the bound (see `Core`'s log).
            let want = (2 * self.stream.len()).clamp(64, STREAM_CAP);
            self.stream.reserve_exact(want - self.stream.len());
        }
        self.stream.push_back(r);
    }

    /// Sequence number the next entry will get.
    pub(crate) fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Entries with `seq >= since`, oldest first.
    pub(crate) fn since(&self, since: u64) -> impl Iterator<Item = &Record> {
        let first = self.stream.front().map_or(0, |r| r.seq);
        let skip = since.saturating_sub(first) as usize;
        self.stream.iter().skip(skip)
    }

    /// A task ran to completion (`ok`) or raised.
    pub(crate) fn task(
        &mut self,
        task: u64,
        group: u32,
        worker: u32,
        timing: Timing,
        ok: bool,
        bytes: u64,
    ) {
        if ok {
            self.finished_total += 1;
        } else {
            self.erred_total += 1;
        }
        self.push(Record {
            seq: 0,
            task,
            group,
            worker,
            thread: timing.thread,
            start_us: timing.start_us,
            duration_us: timing.duration_us,
            kind: if ok { Kind::Compute } else { Kind::Error },
            bytes,
        });
    }

    /// A worker's transfer or spill (`group` of its task if known).
    pub(crate) fn activity(&mut self, worker: u32, a: &Activity, group: u32) {
        let kind = match a.kind {
            ActivityKind::Transfer => {
                self.transfer_bytes += a.bytes;
                Kind::Transfer
            }
            ActivityKind::Spill => {
                self.spill_bytes += a.bytes;
                Kind::Spill
            }
        };
        self.push(Record {
            seq: 0,
            task: a.task,
            group,
            worker,
            thread: u32::MAX,
            start_us: a.start_us,
            duration_us: a.duration_us,
            kind,
            bytes: a.bytes,
        });
    }

    pub(crate) fn heartbeat(&mut self, worker: u32, now_us: u64, m: &WorkerMetrics) {
        // One budget for all workers: a thousand workers keep a few
        // minutes each, not an hour (an hour at 64 workers).
        let cap = (HISTORY_BUDGET / self.history.len().max(1)).clamp(60, HISTORY_CAP);
        let h = self.history.entry(worker).or_default();
        while h.len() >= cap {
            h.pop_front();
        }
        h.push_back(Sample {
            t_us: now_us,
            memory: m.memory,
            managed: m.managed,
            spilled: m.spilled,
            cpu: m.cpu,
        });
    }

    /// A worker left: its history and logs stay for a while (reports of
    /// the time it ran), bounded so that churn cannot grow them forever.
    pub(crate) fn worker_left(&mut self, worker: u32) {
        self.gone.push_back(worker);
        while self.gone.len() > GONE_CAP {
            if let Some(old) = self.gone.pop_front() {
                self.history.remove(&old);
                self.logs.remove(&old);
            }
        }
    }

    pub(crate) fn profile(&mut self, samples: Vec<(String, String, u32)>) {
        for (group, stack, n) in samples {
            let stacks = self.profile.entry(group).or_default();
            let key = if stacks.len() >= STACKS_CAP && !stacks.contains_key(&stack) {
                "(other)".to_string()
            } else {
                stack
            };
            *stacks.entry(key).or_default() += n as u64;
        }
    }

    pub(crate) fn logs(&mut self, worker: u32, lines: Vec<String>) {
        let l = self.logs.entry(worker).or_default();
        for line in lines {
            if l.len() == LOG_CAP {
                l.pop_front();
            }
            l.push_back(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing(start_us: u64) -> Timing {
        Timing {
            start_us,
            duration_us: 5,
            thread: 1,
        }
    }

    #[test]
    fn stream_is_bounded_and_resumable() {
        let mut m = Monitor::default();
        for i in 0..(STREAM_CAP as u64 + 10) {
            m.task(i, 0, 1, timing(i), true, 8);
        }
        assert_eq!(m.stream.len(), STREAM_CAP);
        assert!(
            m.stream.capacity() < STREAM_CAP * 11 / 10,
            "{}",
            m.stream.capacity()
        );
        assert_eq!(m.finished_total, STREAM_CAP as u64 + 10);
        // Asking from before the oldest kept entry gives all that is kept.
        assert_eq!(m.since(0).count(), STREAM_CAP);
        let tail: Vec<u64> = m.since(m.next_seq() - 3).map(|r| r.task).collect();
        assert_eq!(
            tail,
            vec![
                STREAM_CAP as u64 + 7,
                STREAM_CAP as u64 + 8,
                STREAM_CAP as u64 + 9
            ]
        );
        assert_eq!(m.since(m.next_seq()).count(), 0);
    }

    #[test]
    fn activity_counts_bytes() {
        let mut m = Monitor::default();
        let a = Activity {
            kind: ActivityKind::Transfer,
            task: 3,
            bytes: 100,
            start_us: 1,
            duration_us: 2,
        };
        m.activity(1, &a, 0);
        m.activity(
            1,
            &Activity {
                kind: ActivityKind::Spill,
                ..a
            },
            0,
        );
        assert_eq!((m.transfer_bytes, m.spill_bytes), (100, 100));
        assert_eq!(m.stream.back().map(|r| r.kind), Some(Kind::Spill));
    }

    #[test]
    fn figures_of_departed_workers_are_bounded() {
        let mut m = Monitor::default();
        for w in 0..(GONE_CAP as u32 + 10) {
            m.heartbeat(w, 1, &WorkerMetrics::default());
            m.logs(w, vec!["hello".into()]);
            m.worker_left(w);
        }
        assert_eq!(m.history.len(), GONE_CAP);
        assert_eq!(m.logs.len(), GONE_CAP);
        assert!(!m.history.contains_key(&0) && m.history.contains_key(&(GONE_CAP as u32 + 9)));
    }

    #[test]
    fn profile_is_bounded_per_group() {
        let mut m = Monitor::default();
        let samples = (0..STACKS_CAP + 3)
            .map(|i| ("g".to_string(), format!("f;{i}"), 1))
            .collect();
        m.profile(samples);
        m.profile(vec![("g".to_string(), "f;0".to_string(), 2)]);
        let g = &m.profile["g"];
        assert_eq!(g.len(), STACKS_CAP + 1);
        assert_eq!(g["(other)"], 3);
        assert_eq!(g["f;0"], 3);
    }
}
