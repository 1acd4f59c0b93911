//! What the cluster looks like (`ClusterInfo`, `shoal status`).

use super::*;

impl State {
    /// Messages sent to peers so far (queued: counted as they are sent).
    pub(crate) fn messages_out(&self) -> u64 {
        let live: u64 = self.clients.values().map(|c| c.tx.sent()).sum::<u64>()
            + self.workers.values().map(|w| w.tx.sent()).sum::<u64>();
        self.monitor.messages_out_gone + live
    }

    pub(crate) fn info(&self) -> ClusterInfo {
        let now = tokio::time::Instant::now();
        let mut workers: Vec<WorkerInfo> = self
            .workers
            .iter()
            .map(|(&id, w)| {
                let (processing, held) = self.core.worker_load(WorkerId(id)).unwrap_or((0, 0));
                WorkerInfo {
                    id,
                    name: w.name.clone(),
                    address: w.data_addr.clone(),
                    pid: w.pid,
                    nthreads: w.nthreads,
                    resources: w.resources.clone(),
                    processing: processing as u64,
                    held: held as u64,
                    metrics: w.metrics.clone(),
                    last_seen_ms: now.saturating_duration_since(w.last_seen).as_millis() as u64,
                    lifetime_end_us: w.lifetime_end_us,
                }
            })
            .collect();
        workers.sort_by_key(|w| w.id);
        let groups = self
            .core
            .group_counts()
            .filter(|(_, c)| c.submitted > 0)
            .map(|(g, c)| shoal_proto::GroupInfo {
                name: self
                    .group_names
                    .get(g as usize)
                    .cloned()
                    .unwrap_or_default(),
                waiting: c.waiting + c.ready,
                processing: c.processing,
                memory: c.memory,
                erred: c.erred,
                released: c.released,
                submitted: c.submitted,
                finished: c.finished,
                total_us: c.total_us,
            })
            .collect();
        ClusterInfo {
            address: self.address.clone(),
            clients: self.clients.len() as u32,
            tasks: self.core.n_tasks() as u64,
            workers,
            dashboard: self.dashboard.clone(),
            groups,
        }
    }

    /// Work of its own waits: jobs being taken in, cancels in steps.
    pub(crate) fn busy(&self) -> bool {
        !self.intake.is_empty() || !self.cancels.is_empty()
    }

    /// When the loop must tick next: the earliest of what the core asks
    /// for, the recovery wait's end, an overdue obituary or story, and the
    /// next heartbeat (`ping`). Called once per batch of events.
    pub(crate) fn next_wake(&self, ping: tokio::time::Instant) -> tokio::time::Instant {
        let at = |us: u64| self.epoch + std::time::Duration::from_micros(us);
        let core = [self.core.poll_timeout(), self.recovery.poll_timeout()];
        let dying = self.dying.values().map(|d| d.until);
        let stories = self.stories.values().map(|s| s.deadline);
        core.into_iter()
            .flatten()
            .map(at)
            .chain(dying)
            .chain(stories)
            .fold(ping, std::cmp::Ord::min)
    }
}
