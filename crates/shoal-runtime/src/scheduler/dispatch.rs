//! The core's actions turned into messages (orders, results, errors), the
//! journal written, and the lookups they need (values, specs, names).

use super::*;

impl State {
    pub(crate) fn resource_ids(&mut self, named: &[(String, f64)]) -> Vec<(u32, f64)> {
        named
            .iter()
            .map(|(r, amount)| {
                let next = self.resource_ids.len() as u32;
                (*self.resource_ids.entry_ref_or_insert(r, next), *amount)
            })
            .collect()
    }

    /// Why a task's resources cannot be had, in words.
    pub(crate) fn unsatisfiable(&self, id: u64) -> String {
        let need = self
            .core
            .spec(TaskId(id))
            .map(|s| s.rare().resources.to_vec())
            .unwrap_or_default();
        let fmt = |r: &[(String, f64)]| {
            if r.is_empty() {
                return "nothing".to_string();
            }
            r.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut offers: Vec<String> = self
            .workers
            .values()
            .map(|w| {
                let mut has = vec![("CPU".to_string(), w.nthreads as f64)];
                has.extend(w.resources.iter().cloned());
                format!("{}: {}", w.name, fmt(&has))
            })
            .collect();
        offers.sort();
        // CPU is threads of one worker (a task that runs parallel code of
        // its own): say how to get such a worker.
        let hint = if need.iter().any(|(k, _)| k == "CPU") {
            " (CPU counts threads of one worker process: start workers with that many, \
             Client(threads_per_worker=N) or `shoal worker --nthreads N`)"
        } else {
            ""
        };
        format!(
            "it needs {}; the workers have {}{hint}",
            fmt(&need),
            offers.join("; ")
        )
    }

    pub(crate) fn name(&self, id: u64) -> String {
        match self.core.spec(TaskId(id)) {
            Some(s) => task_name(s.key.as_deref(), self.group_of(id), id),
            None => task_name(None, "task", id),
        }
    }

    /// Turns the core's actions into messages. Payload maps are updated in
    /// action order, so a Forget never overtakes the Compute before it.
    pub(crate) fn process(&mut self) {
        // Debug builds check the whole state after every event (the tests
        // of the services run them); release builds trust the core's tests.
        #[cfg(debug_assertions)]
        self.core.check_invariants();
        self.core.drain_actions_into(&mut self.actions);
        let mut actions = std::mem::take(&mut self.actions);
        // Ended tasks of jobs: their outcome is recorded, the job's interest
        // in them dropped (and the rest cancelled past `max_fails`).
        let mut job_done: Vec<(ClientId, TaskId, Vec<TaskId>)> = Vec::new();
        for a in actions.drain(..) {
            match a {
                Action::Compute { worker, task } => self.send_compute(worker, task),
                Action::CancelCompute { worker, task, stop } => {
                    if let Some(w) = self.workers.get(&worker.0) {
                        let _ = w.tx.send(if stop {
                            ToWorker::Stop(task.0)
                        } else {
                            ToWorker::Cancel(task.0)
                        });
                    }
                }
                Action::Steal { worker, tasks } => {
                    if let Some(w) = self.workers.get(&worker.0) {
                        let _ =
                            w.tx.send(ToWorker::Steal(tasks.into_iter().map(|t| t.0).collect()));
                    }
                }
                Action::Replicate { task, from, to } => {
                    let from = self.workers.get(&from.0).map(|w| w.data_addr.clone());
                    match (from, self.workers.get(&to.0)) {
                        (Some(from), Some(w)) => {
                            let _ = w.tx.send(ToWorker::Replicate { id: task.0, from });
                        }
                        _ => self.core.handle_replicated(to, task, false),
                    }
                }
                Action::Retired { worker } => {
                    self.retired.insert(worker.0);
                    if let Some(w) = self.workers.get(&worker.0) {
                        tracing::info!("worker {} handed its data over; stopping it", w.name);
                        let _ = w.tx.send(ToWorker::Shutdown);
                    }
                }
                Action::ReleaseData { worker, task } => {
                    if let Some(k) = self.core.spec_mut(task) {
                        k.value = smallvec::SmallVec::new();
                    }
                    // Sent in order with Computes (a recomputed task may go to
                    // the same worker); the writer batches them anyway.
                    if let Some(w) = worker.and_then(|w| self.workers.get(&w.0)) {
                        let _ = w.tx.send(ToWorker::Release(vec![task.0]));
                    }
                }
                Action::Forget { task } => {
                    self.monitor.error_text.remove(&task.0);
                    self.errors.remove(&task.0);
                    if !self.careful.is_empty() {
                        self.careful.remove(&task.0);
                        self.partials.remove(&task.0);
                    }
                }
                Action::TaskMemory { client, task } if jobs::job_of(client).is_some() => {
                    let cancel = self.job_task_ended(task, jobs::Outcome::Finished, None);
                    job_done.push((client, task, cancel));
                }
                Action::TaskErred {
                    client,
                    task,
                    cause,
                    kind,
                } if jobs::job_of(client).is_some() => {
                    let (outcome, text) = match kind {
                        ErrorKind::Cancelled => (jobs::Outcome::Cancelled, None),
                        _ => (jobs::Outcome::Failed, Some(self.error_words(cause, kind))),
                    };
                    let cancel = self.job_task_ended(task, outcome, text);
                    job_done.push((client, task, cancel));
                }
                Action::TaskMemory { client, task } => {
                    let Some(tx) = self.client_tx(client.0) else {
                        continue;
                    };
                    let (value, location) = match self.core.location(task) {
                        Some(Location::Inline) => {
                            (self.value(task.0).map(Bytes::copy_from_slice), None)
                        }
                        Some(Location::Worker(w)) => {
                            (None, self.workers.get(&w.0).map(|w| w.data_addr.clone()))
                        }
                        None => continue,
                    };
                    let _ = tx.send(ToClient::Memory {
                        id: task.0,
                        value,
                        location,
                    });
                }
                Action::TaskErred {
                    client,
                    task,
                    cause,
                    kind,
                } => {
                    let Some(tx) = self.client_tx(client.0) else {
                        continue;
                    };
                    let cause_name = self.name(cause.0);
                    let error = match kind {
                        ErrorKind::Exception => TaskError::Exception {
                            cause: cause_name,
                            error: self.errors.get(&cause.0).cloned().unwrap_or_default(),
                        },
                        ErrorKind::KilledWorker(kills) => TaskError::KilledWorker {
                            cause: cause_name,
                            kills,
                        },
                        ErrorKind::Cancelled => TaskError::Cancelled { cause: cause_name },
                        ErrorKind::MissingDependency(d) => {
                            TaskError::MissingDependency { dep: d.0 }
                        }
                        ErrorKind::Unsatisfiable => TaskError::Unsatisfiable {
                            cause: cause_name,
                            detail: self.unsatisfiable(cause.0),
                        },
                        ErrorKind::DataLost => TaskError::DataLost { cause: cause_name },
                        ErrorKind::Cycle => TaskError::Cycle { cause: cause_name },
                    };
                    let _ = tx.send(ToClient::Erred { id: task.0, error });
                }
            }
        }
        self.actions = actions;
        if !job_done.is_empty() {
            for (client, task, cancel) in job_done {
                if !cancel.is_empty() {
                    self.cancel_in_steps(client, cancel);
                }
                self.core.handle_release(client, &[task]);
            }
            self.process();
        }
    }

    /// A job's task ended: recorded in the job (and the journal).
    pub(crate) fn job_task_ended(
        &mut self,
        task: TaskId,
        outcome: jobs::Outcome,
        error: Option<String>,
    ) -> Vec<TaskId> {
        let now = crate::clock::now_us();
        if let Some(j) = &mut self.journal {
            if self.jobs.job_of_task(task.0).is_some() {
                j.append(&journal::Record::Ended {
                    task: task.0,
                    outcome: jobs::outcome_code(outcome),
                    error: error.clone(),
                    at_us: now,
                });
            }
        }
        self.jobs.ended(task.0, outcome, error, now)
    }

    /// Writes what the journal queued; compacts it when it has grown.
    pub(crate) fn flush_journal(&mut self) {
        let Some(j) = &mut self.journal else {
            return;
        };
        j.flush();
        if j.wants_compaction() {
            let records: Vec<journal::Record> = self
                .jobs
                .snapshots(|t| self.full_spec(t))
                .into_iter()
                .map(journal::Record::Snapshot)
                .collect();
            if let Some(j) = &mut self.journal {
                if let Err(e) = j.rewrite(&records) {
                    tracing::error!("cannot compact the journal: {e}");
                }
            }
        }
    }

    /// Why a task failed, in words (a job keeps it after the task is gone).
    pub(crate) fn error_words(&self, cause: TaskId, kind: ErrorKind) -> String {
        let name = self.name(cause.0);
        match kind {
            ErrorKind::Exception => self
                .monitor
                .error_text
                .get(&cause.0)
                .cloned()
                .unwrap_or_else(|| format!("task {name} raised")),
            ErrorKind::KilledWorker(k) => {
                format!("task {name} was running on {k} workers that died (KilledWorker)")
            }
            ErrorKind::Cancelled => format!("task {name} was cancelled"),
            ErrorKind::MissingDependency(d) => format!("input {:x} is unknown", d.0),
            ErrorKind::Unsatisfiable => {
                format!("no worker can run {name}: {}", self.unsatisfiable(cause.0))
            }
            ErrorKind::DataLost => format!("the data of {name} was lost"),
            ErrorKind::Cycle => format!("{name} is part of a cycle"),
        }
    }

    /// One copy of each distinct function pickle among recent submissions.
    /// Keeps a task's small result (with its spec: one record per task).
    pub(crate) fn set_value(&mut self, id: u64, v: &[u8]) {
        if let Some(k) = self.core.spec_mut(TaskId(id)) {
            k.value = smallvec::SmallVec::from_slice(v);
        }
    }

    /// A task's small result, if the scheduler keeps it.
    pub(crate) fn value(&self, id: u64) -> Option<&[u8]> {
        Some(&self.core.spec(TaskId(id))?.value[..]).filter(|v| !v.is_empty())
    }

    /// The name of a task's group.
    pub(crate) fn group_of(&self, task: u64) -> &str {
        self.core
            .task_group(TaskId(task))
            .and_then(|g| self.group_names.get(g as usize))
            .map_or("", String::as_str)
    }

    /// A task's spec as submitted (group and inputs put back).
    pub(crate) fn full_spec(&self, task: u64) -> Option<TaskSpec> {
        let k = self.core.spec(TaskId(task))?;
        Some(TaskSpec {
            id: task,
            group: self.group_of(task).to_string(),
            key: k.key.as_deref().map(str::to_string),
            kind: k.kind,
            func: (*k.func).clone(),
            args: Bytes::copy_from_slice(&k.args),
            deps: self.core.deps(TaskId(task)).iter().map(|d| d.0).collect(),
            priority: self.core.priority(TaskId(task)).unwrap_or(0),
            retries: k.rare().retries,
            resources: k.rare().resources.to_vec(),
            recompute: k.recompute,
            time_limit_ms: k.rare().time_limit_ms,
            crash_limit: k.crash_limit,
            time_request_ms: k.rare().time_request_ms,
        })
    }
}
