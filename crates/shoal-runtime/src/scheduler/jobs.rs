//! Jobs: command tasks submitted with `shoal submit` (one program, or an
//! array of them). The scheduler owns their tasks through a reserved
//! interest per job (the client that submitted them may leave at once) and
//! keeps each task's outcome after the core forgets it, for `shoal job
//! info/wait/task-ids` and the dashboard's `/api/jobs`.

use rustc_hash::FxHashMap;
use serde_json::{json, Value};
use shoal_core::{ClientId, Core, TaskId, TaskState, DETACHED};
use std::collections::BTreeMap;

/// Interests with this bit are jobs, not connected clients (connection ids
/// start below 4,096 and grow by one per connection).
const JOB_BIT: u32 = 1 << 31;

/// Error texts kept per job (the rest are counted, not kept).
const ERRORS_KEPT: usize = 1000;

/// The interest that holds job `job`'s tasks.
pub(super) fn job_client(job: u32) -> ClientId {
    ClientId(JOB_BIT | job)
}

/// The job an interest stands for, if it is one.
pub(super) fn job_of(client: ClientId) -> Option<u32> {
    (client.0 & JOB_BIT != 0 && client != DETACHED).then_some(client.0 & !JOB_BIT)
}

/// A job as the journal keeps it when compacted: the outcomes so far and
/// the tasks still to run.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq)]
pub(super) struct JobSnapshot {
    pub(super) id: u32,
    pub(super) name: String,
    pub(super) max_fails: u32,
    pub(super) submitted_us: u64,
    pub(super) ended_us: Option<u64>,
    /// Job task ids and scheduler task ids, in submission order.
    pub(super) ids: Vec<u64>,
    pub(super) tasks: Vec<u64>,
    /// Per task, as `outcome_code` (3: pending).
    pub(super) outcomes: Vec<u8>,
    pub(super) errors: Vec<(u64, String)>,
    /// The pending tasks' specs.
    pub(super) pending: Vec<shoal_proto::TaskSpec>,
}

/// How a job's task ended.
#[derive(Copy, Clone, PartialEq, Eq, Debug)]
pub(super) enum Outcome {
    Pending,
    Finished,
    Failed,
    Cancelled,
}

/// A task's ending as the journal writes it (never pending there).
pub(super) fn outcome_code(o: Outcome) -> u8 {
    match o {
        Outcome::Finished => 0,
        Outcome::Failed => 1,
        Outcome::Cancelled | Outcome::Pending => 2,
    }
}

/// What [`outcome_code`] wrote.
pub(super) fn outcome_of(code: u8) -> Outcome {
    match code {
        0 => Outcome::Finished,
        1 => Outcome::Failed,
        _ => Outcome::Cancelled,
    }
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Pending => "pending",
            Outcome::Finished => "finished",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
        }
    }
}

struct Job {
    name: String,
    submitted_us: u64,
    ended_us: Option<u64>,
    /// The tasks' ids within the job (`SHOAL_TASK_ID`), in submission order.
    ids: Vec<u64>,
    /// Their scheduler task ids, same order.
    tasks: Vec<u64>,
    outcome: Vec<Outcome>,
    pending: usize,
    finished: usize,
    failed: usize,
    cancelled: usize,
    /// `(job task id, error text)` of the first failures.
    errors: Vec<(u64, String)>,
    /// Cancelled whole (by its client, or past `max_fails`): tasks still
    /// being taken in are not submitted (see `State::intake_step`).
    halted: bool,
    /// Cancel the rest once this many failed (0: never).
    max_fails: u32,
}

impl Job {
    fn state(&self) -> &'static str {
        if self.pending > 0 {
            "running"
        } else if self.cancelled > 0 {
            "cancelled"
        } else if self.failed > 0 {
            "failed"
        } else {
            "finished"
        }
    }
}

/// Every job since the scheduler started.
#[derive(Default)]
pub(super) struct Jobs {
    jobs: BTreeMap<u32, Job>,
    /// Scheduler task id -> (job, index in the job) while the task is pending.
    by_task: FxHashMap<u64, (u32, u32)>,
    last: u32,
}

impl Jobs {
    /// The id the next job gets.
    pub(super) fn next_id(&self) -> u32 {
        self.last + 1
    }

    /// Records a job; `tasks` are `(job task id, scheduler task id)`.
    pub(super) fn add(
        &mut self,
        name: String,
        max_fails: u32,
        tasks: &[(u64, u64)],
        now_us: u64,
    ) -> u32 {
        let id = self.add_untracked(name, max_fails, tasks, now_us);
        for (i, &(_, t)) in tasks.iter().enumerate() {
            self.by_task.insert(t, (id, i as u32));
        }
        id
    }

    /// As [`Jobs::add`], but its tasks' ends are not followed until each is
    /// [`track`](Jobs::track)ed (a big job is taken in a slice at a time).
    pub(super) fn add_untracked(
        &mut self,
        name: String,
        max_fails: u32,
        tasks: &[(u64, u64)],
        now_us: u64,
    ) -> u32 {
        self.last += 1;
        let id = self.last;
        self.jobs.insert(
            id,
            Job {
                name,
                submitted_us: now_us,
                ended_us: None,
                ids: tasks.iter().map(|t| t.0).collect(),
                tasks: tasks.iter().map(|t| t.1).collect(),
                outcome: vec![Outcome::Pending; tasks.len()],
                pending: tasks.len(),
                finished: 0,
                failed: 0,
                cancelled: 0,
                errors: Vec::new(),
                max_fails,
                halted: false,
            },
        );
        id
    }

    /// Follows the end of `task`, the `index`th of `job`.
    pub(super) fn track(&mut self, job: u32, index: u32, task: u64) {
        self.by_task.insert(task, (job, index));
    }

    /// Whether `job` was cancelled whole (see [`Job::halted`]).
    pub(super) fn halted(&self, job: u32) -> bool {
        self.jobs.get(&job).is_none_or(|j| j.halted)
    }

    /// The job's tasks `range` were never submitted (it was cancelled
    /// whole first): they end cancelled.
    pub(super) fn never_submitted(&mut self, job: u32, range: std::ops::Range<usize>, now_us: u64) {
        let Some(j) = self.jobs.get_mut(&job) else {
            return;
        };
        for i in range {
            if j.outcome[i] == Outcome::Pending {
                j.outcome[i] = Outcome::Cancelled;
                j.pending -= 1;
                j.cancelled += 1;
            }
        }
        if j.pending == 0 {
            j.ended_us = Some(now_us);
        }
    }

    /// Every job as a snapshot; `spec` gives a pending task's spec.
    pub(super) fn snapshots(
        &self,
        spec: impl Fn(u64) -> Option<shoal_proto::TaskSpec>,
    ) -> Vec<JobSnapshot> {
        self.jobs
            .iter()
            .map(|(&id, j)| JobSnapshot {
                id,
                name: j.name.clone(),
                max_fails: j.max_fails,
                submitted_us: j.submitted_us,
                ended_us: j.ended_us,
                ids: j.ids.clone(),
                tasks: j.tasks.clone(),
                outcomes: j
                    .outcome
                    .iter()
                    .map(|&o| match o {
                        Outcome::Pending => 3,
                        o => outcome_code(o),
                    })
                    .collect(),
                errors: j.errors.clone(),
                pending: j
                    .tasks
                    .iter()
                    .zip(&j.outcome)
                    .filter(|(_, o)| **o == Outcome::Pending)
                    .filter_map(|(&t, _)| spec(t))
                    .collect(),
            })
            .collect()
    }

    /// Restores a job from a snapshot; returns its pending tasks' specs.
    pub(super) fn restore(&mut self, mut s: JobSnapshot) -> Vec<shoal_proto::TaskSpec> {
        // Lists of one length, whatever the file said (indexes stay valid).
        let n = s.ids.len().min(s.tasks.len()).min(s.outcomes.len());
        s.ids.truncate(n);
        s.tasks.truncate(n);
        s.outcomes.truncate(n);
        let outcome: Vec<Outcome> = s
            .outcomes
            .iter()
            .map(|&c| match c {
                3 => Outcome::Pending,
                c => outcome_of(c),
            })
            .collect();
        let count = |o: Outcome| outcome.iter().filter(|&&x| x == o).count();
        for (i, (&t, &o)) in s.tasks.iter().zip(&outcome).enumerate() {
            if o == Outcome::Pending {
                self.by_task.insert(t, (s.id, i as u32));
            }
        }
        self.last = self.last.max(s.id);
        self.jobs.insert(
            s.id,
            Job {
                name: s.name,
                submitted_us: s.submitted_us,
                ended_us: s.ended_us,
                pending: count(Outcome::Pending),
                finished: count(Outcome::Finished),
                failed: count(Outcome::Failed),
                cancelled: count(Outcome::Cancelled),
                ids: s.ids,
                tasks: s.tasks,
                outcome,
                errors: s.errors,
                max_fails: s.max_fails,
                halted: false,
            },
        );
        s.pending
    }

    /// Records a journaled job under its own id (replay).
    pub(super) fn add_with_id(
        &mut self,
        id: u32,
        name: String,
        max_fails: u32,
        tasks: &[(u64, u64)],
        submitted_us: u64,
    ) {
        let before = self.last;
        self.last = id.saturating_sub(1);
        self.add(name, max_fails, tasks, submitted_us);
        self.last = self.last.max(before);
    }

    /// The job a pending task belongs to.
    pub(super) fn job_of_task(&self, task: u64) -> Option<u32> {
        self.by_task.get(&task).map(|&(j, _)| j)
    }

    /// A job's task ended. Returns the job's pending tasks to cancel when
    /// this failure reached its `max_fails` (else nothing).
    pub(super) fn ended(
        &mut self,
        task: u64,
        outcome: Outcome,
        error: Option<String>,
        now_us: u64,
    ) -> Vec<TaskId> {
        let Some((j, i)) = self.by_task.remove(&task) else {
            return Vec::new();
        };
        let Some(job) = self.jobs.get_mut(&j) else {
            return Vec::new();
        };
        job.outcome[i as usize] = outcome;
        job.pending -= 1;
        match outcome {
            Outcome::Finished => job.finished += 1,
            Outcome::Failed => job.failed += 1,
            Outcome::Cancelled => job.cancelled += 1,
            Outcome::Pending => {}
        }
        if let (Some(e), true) = (error, job.errors.len() < ERRORS_KEPT) {
            job.errors.push((job.ids[i as usize], e));
        }
        if job.pending == 0 {
            job.ended_us = Some(now_us);
        }
        if outcome == Outcome::Failed && job.max_fails > 0 && job.failed == job.max_fails as usize {
            job.halted = true;
            return self.pending_tasks(j);
        }
        Vec::new()
    }

    /// A job's tasks not ended yet, to cancel them all (None: no such job).
    pub(super) fn cancel_all(&mut self, job: u32) -> Option<Vec<TaskId>> {
        let j = self.jobs.get_mut(&job)?;
        j.halted = true;
        Some(self.pending_tasks(job))
    }

    fn pending_tasks(&self, job: u32) -> Vec<TaskId> {
        let Some(j) = self.jobs.get(&job) else {
            return Vec::new();
        };
        j.tasks
            .iter()
            .zip(&j.outcome)
            .filter(|(_, o)| **o == Outcome::Pending)
            .map(|(&t, _)| TaskId(t))
            .collect()
    }

    fn summary<S>(&self, id: u32, job: &Job, core: &Core<S>) -> Value {
        // Running: sent to a worker (started or queued there).
        let running = job
            .tasks
            .iter()
            .zip(&job.outcome)
            .filter(|(&t, &o)| {
                o == Outcome::Pending
                    && matches!(core.state(TaskId(t)), Some(TaskState::Processing(_)))
            })
            .count();
        json!({
            "id": id, "name": job.name, "state": job.state(), "tasks": job.ids.len(),
            "waiting": job.pending - running, "running": running, "finished": job.finished,
            "failed": job.failed, "cancelled": job.cancelled,
            "submitted_us": job.submitted_us, "ended_us": job.ended_us,
        })
    }

    /// `/api/jobs`: every job, oldest first.
    pub(super) fn list_json<S>(&self, core: &Core<S>) -> Value {
        Value::Array(
            self.jobs
                .iter()
                .map(|(&id, j)| self.summary(id, j, core))
                .collect(),
        )
    }

    /// `/api/jobs/N`: one job, with the first errors.
    pub(super) fn info_json<S>(&self, id: u32, core: &Core<S>) -> Option<Value> {
        let job = self.jobs.get(&id)?;
        let mut v = self.summary(id, job, core);
        v["max_fails"] = job.max_fails.into();
        v["errors"] = job
            .errors
            .iter()
            .map(|(t, e)| json!({"task": t, "error": e}))
            .collect();
        Some(v)
    }

    /// `/api/jobs/N/tasks?filter=STATE`: the job task ids in that state
    /// (`pending`, `finished`, `failed`, `cancelled`; None: all), as
    /// compact ranges ("1-3,7").
    pub(super) fn task_ids_json(
        &self,
        id: u32,
        filter: Option<&str>,
    ) -> Result<Value, TaskIdsError> {
        let job = self.jobs.get(&id).ok_or(TaskIdsError::NoJob(id))?;
        let want = match filter {
            None | Some("all") => None,
            Some(f) => Some(
                [
                    Outcome::Pending,
                    Outcome::Finished,
                    Outcome::Failed,
                    Outcome::Cancelled,
                ]
                .into_iter()
                .find(|o| o.name() == f)
                .ok_or_else(|| TaskIdsError::BadFilter(f.to_string()))?,
            ),
        };
        let mut ids: Vec<u64> = job
            .ids
            .iter()
            .zip(&job.outcome)
            .filter(|(_, o)| want.is_none_or(|w| w == **o))
            .map(|(&t, _)| t)
            .collect();
        ids.sort_unstable();
        Ok(json!({ "job": id, "count": ids.len(), "ids": ranges(&ids) }))
    }
}

/// Why `/api/jobs/N/tasks` has no answer.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum TaskIdsError {
    /// No such job (404).
    #[error("no job {0}")]
    NoJob(u32),
    /// A filter that names no outcome (400).
    #[error("filter must be pending, finished, failed, cancelled or all, not {0:?}")]
    BadFilter(String),
}

/// Sorted ids as ranges: `[1,2,3,7]` -> `"1-3,7"`.
pub(super) fn ranges(ids: &[u64]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < ids.len() {
        let mut j = i;
        while j + 1 < ids.len() && ids[j + 1] == ids[j] + 1 {
            j += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        if j > i {
            out.push_str(&format!("{}-{}", ids[i], ids[j]));
        } else {
            out.push_str(&ids[i].to_string());
        }
        i = j + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_print_as_ranges() {
        assert_eq!(ranges(&[]), "");
        assert_eq!(ranges(&[1, 2, 3, 7, 9, 10]), "1-3,7,9-10");
        assert_eq!(ranges(&[5]), "5");
    }

    #[test]
    fn job_interests_are_not_clients() {
        assert_eq!(job_of(job_client(7)), Some(7));
        assert_eq!(job_of(ClientId(4000)), None);
        assert_eq!(job_of(DETACHED), None);
    }

    #[test]
    fn a_snapshot_round_trips_and_a_damaged_one_cannot_break_indexes() {
        let mut jobs = Jobs::default();
        let j = jobs.add("sim".into(), 0, &[(0, 100), (1, 101)], 5);
        jobs.ended(100, Outcome::Failed, Some("boom".into()), 6);
        let mut snaps = jobs.snapshots(|_| None);
        let mut back = Jobs::default();
        back.restore(snaps[0].clone());
        assert_eq!(
            back.info_json(j, &Core::default()),
            jobs.info_json(j, &Core::default())
        );
        // Lists of different lengths (a hand-edited journal): cut to one.
        snaps[0].ids.pop();
        let mut odd = Jobs::default();
        odd.restore(snaps.remove(0));
        assert!(odd.ended(101, Outcome::Finished, None, 7).is_empty());
        assert_eq!(odd.info_json(j, &Core::default()).unwrap()["tasks"], 1);
    }

    #[test]
    fn outcomes_are_counted_and_max_fails_cancels_the_rest() {
        let mut jobs = Jobs::default();
        let j = jobs.add(
            "sim".into(),
            2,
            &[(0, 100), (1, 101), (2, 102), (3, 103)],
            5,
        );
        assert_eq!(jobs.job_of_task(101), Some(j));
        assert!(jobs.ended(100, Outcome::Finished, None, 6).is_empty());
        assert!(jobs
            .ended(101, Outcome::Failed, Some("boom".into()), 7)
            .is_empty());
        // The second failure reaches max_fails: the pending rest is returned.
        let rest = jobs.ended(102, Outcome::Failed, Some("boom".into()), 8);
        assert_eq!(rest, vec![TaskId(103)]);
        // A repeated report changes nothing.
        assert!(jobs.ended(102, Outcome::Finished, None, 8).is_empty());
        let failed = jobs.task_ids_json(j, Some("failed")).unwrap();
        assert_eq!(failed["ids"], "1-2");
        assert_eq!(
            jobs.task_ids_json(j, Some("weird")),
            Err(TaskIdsError::BadFilter("weird".into()))
        );
        assert_eq!(
            jobs.task_ids_json(j + 1, None),
            Err(TaskIdsError::NoJob(j + 1))
        );
        jobs.ended(103, Outcome::Cancelled, None, 9);
        let info = jobs.info_json(j, &Core::default()).unwrap();
        assert_eq!(info["state"], "cancelled");
        assert_eq!(info["failed"], 2);
        assert_eq!(info["errors"][0]["task"], 1);
        assert_eq!(info["ended_us"], 9);
    }
}
