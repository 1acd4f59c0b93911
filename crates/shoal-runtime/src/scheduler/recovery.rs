//! After a crash: the journal read back, tasks restored and adopted, orphans
//! of jobs that ended, results held back until their owners return.

use super::*;

impl State {
    /// The recovery's clock: microseconds since this scheduler started.
    pub(crate) fn clock_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// The recovery wait is over: restored tasks no rejoined worker claimed
    /// go to the core to be placed; resumed clients' held messages come
    /// back to be handled first, then the orphans no one claimed go.
    pub(crate) fn release_restored(&mut self) -> Vec<Item> {
        let out = self.recovery.release();
        let mut n = 0;
        for (job, specs) in out.resubmit {
            n += specs.len();
            self.submit(jobs::job_client(job), specs);
        }
        tracing::info!(
            "recovery: {n} restored tasks to run again, {} adopted from rejoined workers",
            out.adopted
        );
        out.held
            .into_iter()
            .flat_map(|(c, msgs)| msgs.into_iter().map(move |m| Item::Client(c, m)))
            .chain([Item::DropOrphans])
            .collect()
    }

    /// Results no resumed client claimed: their holders drop them.
    pub(crate) fn drop_orphans(&mut self) {
        for (w, ids) in self.recovery.drop_orphans() {
            if let Some(conn) = self.workers.get(&w) {
                tracing::info!(
                    "recovery: worker {} drops {} results no client claimed",
                    conn.name,
                    ids.len()
                );
                let _ = conn.tx.send(ToWorker::Release(ids));
            }
        }
    }

    /// A restored job task's outcome arrived (a rejoined worker ran it):
    /// recorded without the core, which never had it.
    pub(crate) fn restored_ended(
        &mut self,
        id: u64,
        outcome: jobs::Outcome,
        error: Option<String>,
    ) {
        if self.recovery.ended(id).is_some() {
            self.job_task_ended(TaskId(id), outcome, error);
        }
    }

    /// A worker left: restored tasks it ran are to run again.
    pub(crate) fn adopted_lost(&mut self, worker: u32) {
        for (job, specs) in self.recovery.worker_lost(worker) {
            self.submit(jobs::job_client(job), specs);
        }
    }
}

/// How long a scheduler restored from its journal holds the unfinished
/// tasks back, for workers that rejoin to claim what they still run or
/// finished (`SHOAL_RECOVERY_WAIT` seconds, default 3: `--reconnect`
/// workers try once a second).
pub(crate) fn recovery_wait() -> std::time::Duration {
    crate::settings::seconds("SHOAL_RECOVERY_WAIT", 0.0)
        .unwrap_or(std::time::Duration::from_secs(3))
}

/// Reads the journal, rebuilds the jobs, and compacts the file.
pub(crate) fn recover(path: &std::path::Path) -> io::Result<Recovery> {
    let (mut journal, records) = journal::Journal::open(path)?;
    let mut jobs = jobs::Jobs::default();
    let mut pending: std::collections::BTreeMap<u32, FxHashMap<u64, TaskSpec>> = Default::default();
    let n = records.len();
    for r in records {
        match r {
            journal::Record::Job {
                id,
                name,
                max_fails,
                submitted_us,
                ids,
                tasks,
            } => {
                jobs.add_with_id(id, name, max_fails, &ids, submitted_us);
                pending.insert(id, tasks.into_iter().map(|t| (t.id, t)).collect());
            }
            journal::Record::Ended {
                task,
                outcome,
                error,
                at_us,
            } => {
                let job = jobs.job_of_task(task);
                let cancel = jobs.ended(task, jobs::outcome_of(outcome), error, at_us);
                // Past max_fails the rest was cancelled (maybe not journaled
                // before the crash): cancelled here too.
                for t in &cancel {
                    jobs.ended(t.0, jobs::Outcome::Cancelled, None, at_us);
                }
                if let Some(specs) = job.and_then(|j| pending.get_mut(&j)) {
                    specs.remove(&task);
                    for t in &cancel {
                        specs.remove(&t.0);
                    }
                }
            }
            journal::Record::Snapshot(snap) => {
                let id = snap.id;
                let specs = jobs.restore(snap);
                pending.insert(id, specs.into_iter().map(|t| (t.id, t)).collect());
            }
        }
    }
    let pending: Vec<(u32, Vec<TaskSpec>)> = pending
        .into_iter()
        .map(|(j, specs)| {
            let mut v: Vec<TaskSpec> = specs.into_values().collect();
            v.sort_by_key(|t| t.id);
            (j, v)
        })
        .filter(|(_, v)| !v.is_empty())
        .collect();
    let by_id: FxHashMap<u64, &TaskSpec> = pending
        .iter()
        .flat_map(|(_, v)| v.iter().map(|t| (t.id, t)))
        .collect();
    let snaps = jobs.snapshots(|t| by_id.get(&t).map(|s| (*s).clone()));
    let records: Vec<journal::Record> = snaps.into_iter().map(journal::Record::Snapshot).collect();
    journal.rewrite(&records)?;
    let left: usize = pending.iter().map(|(_, v)| v.len()).sum();
    tracing::info!(
        "journal {}: {n} records read; {} jobs, {left} tasks to run again",
        path.display(),
        records.len()
    );
    Ok(Recovery {
        journal,
        jobs,
        pending,
    })
}
