//! Messages from clients: submissions (and jobs, resubmissions after a
//! reconnect), queries, syncs, releases; what a client is told back.

use super::*;
use shoal_core::recovery::Orphan;

impl State {
    pub(crate) fn client_msg(&mut self, client: u32, msg: FromClient) {
        let cid = ClientId(client);
        match msg {
            FromClient::Submit(specs) => self.submit(cid, specs),
            FromClient::Resume(old) => {
                // Its task ids go on in `old`'s range: no connection may be
                // given that id now, nor later.
                let taken = old != client
                    && (self.clients.contains_key(&old) || self.workers.contains_key(&old));
                if taken || old == 0 {
                    tracing::warn!("client {client} asked to resume as {old}, which is taken");
                    if let Some(c) = self.clients.remove(&client) {
                        self.monitor.messages_out_gone += c.tx.sent();
                        c.tx.close();
                    }
                    self.client_gone(client);
                    return;
                }
                self.ids.fetch_max(old + 1, Ordering::Relaxed);
                tracing::info!("client {client} resumed the session of client {old}");
            }
            FromClient::Resubmit(tasks) => self.resubmit_held(cid, tasks),
            FromClient::SubmitJob {
                query,
                name,
                max_fails,
                tasks,
                more,
            } => {
                let mut all = self.job_pieces.remove(&(client, query)).unwrap_or_default();
                all.push(tasks);
                if more {
                    self.job_pieces.insert((client, query), all);
                } else {
                    // Answered once checked whole (see `intake_step`).
                    self.intake.push_back(super::intake::Intake::new(
                        client, query, name, max_fails, all,
                    ));
                }
            }
            FromClient::CancelJob { query, job } => {
                let json = match self.jobs.cancel_all(job) {
                    Some(ids) => {
                        let n = ids.len();
                        self.cancel_in_steps(jobs::job_client(job), ids);
                        serde_json::json!({ "cancelled": n })
                    }
                    None => serde_json::json!({ "error": format!("no job {job}") }),
                };
                self.reply(client, query, json);
            }
            FromClient::Release(ids) => {
                let ids: Vec<TaskId> = ids.into_iter().map(TaskId).collect();
                self.core.handle_release(cid, &ids);
            }
            FromClient::Cancel(ids) => {
                let ids: Vec<TaskId> = ids.into_iter().map(TaskId).collect();
                self.core.handle_cancel(cid, &ids);
            }
            FromClient::CancelQueued(ids) => {
                let ids: Vec<TaskId> = ids.into_iter().map(TaskId).collect();
                self.core.handle_cancel_queued(cid, &ids);
            }
            FromClient::Detach(ids) => {
                let ids: Vec<TaskId> = ids.into_iter().map(TaskId).collect();
                self.core.handle_detach(cid, &ids);
            }
            FromClient::Withdraw(name) => {
                let r = self.resource_ids(&[(name, 0.0)])[0].0;
                self.core.handle_resource_withdrawn(r);
            }
            FromClient::Expect(name) => {
                let r = self.resource_ids(&[(name, 0.0)])[0].0;
                self.core.handle_resource_expected(r);
            }
            FromClient::Retire(names) => {
                let ids: Vec<u32> = self
                    .workers
                    .iter()
                    .filter(|(_, w)| {
                        names
                            .iter()
                            .any(|n| *n == w.data_addr || *n == w.name || *n == w.pid.to_string())
                    })
                    .map(|(&id, _)| id)
                    .collect();
                for id in ids {
                    tracing::info!("retiring worker {}", self.workers[&id].name);
                    self.core.handle_retire(WorkerId(id));
                }
            }
            FromClient::Where(ids) => {
                let ids: Vec<TaskId> = ids.into_iter().map(TaskId).collect();
                self.core.handle_where(cid, &ids);
            }
            FromClient::Hold { by, tasks } => {
                let tasks: Vec<TaskId> = tasks.into_iter().map(TaskId).collect();
                self.core.handle_hold(TaskId(by), &tasks);
            }
            FromClient::Adopt(ids) => {
                let ids: Vec<TaskId> = ids.into_iter().map(TaskId).collect();
                let unknown = self.core.handle_adopt(cid, &ids);
                if let Some(tx) = self.client_tx(client) {
                    for TaskId(id) in unknown {
                        let error = TaskError::MissingDependency { dep: id };
                        let _ = tx.send(ToClient::Erred { id, error });
                    }
                }
            }
            FromClient::Restart => {
                tracing::warn!("client {client} restarts every worker");
                for w in self.workers.values() {
                    let _ = w.tx.send(ToWorker::Restart);
                }
            }
            FromClient::Info => {
                let info = self.info();
                if let Some(tx) = self.client_tx(client) {
                    let _ = tx.send(ToClient::Info(info));
                }
            }
            FromClient::Alive => {}
            FromClient::Name { id, name, value } => {
                let json = match value {
                    None => serde_json::json!({ "value": self.names.get(&name).map(|n| &n.1) }),
                    Some(_) if self.names.contains_key(&name) => {
                        serde_json::json!({ "error": format!("the name {name:?} is taken") })
                    }
                    Some(v) => {
                        self.names.insert(name, (client, v));
                        serde_json::json!({ "ok": true })
                    }
                };
                if let Some(tx) = self.client_tx(client) {
                    let json = json.to_string();
                    let _ = tx.send(ToClient::QueryReply { id, json });
                }
            }
            FromClient::Unname(name) => {
                if self.names.get(&name).is_some_and(|n| n.0 == client) {
                    self.names.remove(&name);
                }
            }
            FromClient::Query { id, path } if path == SYNC_PATH => self.start_sync(client, id),
            FromClient::Query { id, path } => {
                self.ask(&path, super::stories::Asker::Client(client, id));
            }
        }
    }

    /// Tasks a client submitted, into the core under interest `cid`.
    pub(crate) fn submit(&mut self, cid: ClientId, specs: Vec<TaskSpec>) {
        self.resubmit(cid, specs, &FxHashMap::default());
    }

    /// A resumed client's tasks: those whose value it sends, or whose
    /// result a rejoined worker holds, start finished.
    pub(crate) fn resubmit_held(&mut self, cid: ClientId, tasks: Vec<(TaskSpec, Option<Bytes>)>) {
        let mut held = FxHashMap::default();
        let mut values = Vec::new();
        let mut specs = Vec::with_capacity(tasks.len());
        for (spec, value) in tasks {
            let id = spec.id;
            let value = value.or_else(|| match self.recovery.claim(id) {
                Some(Orphan::Value(v)) => Some(v),
                Some(Orphan::Held { worker, size }) => {
                    held.insert(TaskId(id), (Location::Worker(WorkerId(worker)), size));
                    None
                }
                None => None,
            });
            if let Some(v) = value {
                held.insert(TaskId(id), (Location::Inline, v.len() as u64));
                values.push((id, v));
            }
            specs.push(spec);
        }
        let kept = held.len();
        let n = specs.len();
        self.resubmit(cid, specs, &held);
        for (id, v) in values {
            self.set_value(id, &v);
        }
        tracing::info!(
            "client {} resumed: {kept} of its {n} tasks kept their results",
            cid.0
        );
    }

    pub(crate) fn resubmit(
        &mut self,
        cid: ClientId,
        specs: Vec<TaskSpec>,
        held: &FxHashMap<TaskId, (Location, u64)>,
    ) {
        let mut tasks = Vec::with_capacity(specs.len());
        for spec in specs {
            let next = self.groups.len() as u32;
            let group = *self.groups.entry_ref_or_insert(&spec.group, next);
            if group == next {
                self.group_names.push(spec.group.clone());
            }
            let mut deps: Vec<TaskId> = spec.deps.iter().map(|&d| TaskId(d)).collect();
            deps.sort_unstable();
            deps.dedup();

            // "CPU" is not a resource workers offer: it is threads.
            let mut threads = 1;
            let named: Vec<(String, f64)> = spec
                .resources
                .iter()
                .filter(|(r, amount)| {
                    let cpu = r == "CPU";
                    if cpu {
                        threads = amount.ceil().max(1.0) as u32;
                    }
                    !cpu
                })
                .cloned()
                .collect();
            let resources = self.resource_ids(&named);
            let nt = NewTask {
                id: TaskId(spec.id),
                deps,
                priority: spec.priority,
                retries: spec.retries,
                group,
                resources,
                threads,
                recompute: spec.recompute,
                max_kills: spec.crash_limit,
                time_request_us: spec.time_request_ms.saturating_mul(1000),
            };
            // (Dropped by the core if it knows the task already.)
            let rare = Rare {
                resources: spec.resources.into_boxed_slice(),
                time_limit_ms: spec.time_limit_ms,
                time_request_ms: spec.time_request_ms,
                retries: spec.retries,
            };
            let kept = Kept {
                // (No copy when the decoded buffer is its own.)
                args: Vec::from(spec.args).into_boxed_slice(),
                value: smallvec::SmallVec::new(),
                key: spec.key.map(String::into_boxed_str),
                func: self.funcs.intern(spec.func),
                kind: spec.kind,
                crash_limit: spec.crash_limit,
                recompute: spec.recompute,
                rare: (rare != Rare::default()).then(|| Box::new(rare)),
            };
            tasks.push((nt, kept));
        }
        self.core.handle_resubmit(cid, tasks, held);
    }

    /// Answers a client's request (a query, a job submission) with JSON.
    pub(crate) fn reply(&self, client: u32, id: u64, json: serde_json::Value) {
        if let Some(tx) = self.client_tx(client) {
            let json = json.to_string();
            let _ = tx.send(ToClient::QueryReply { id, json });
        }
    }

    /// A client left: what it wanted is released, its names go.
    pub(crate) fn client_gone(&mut self, id: u32) {
        self.names.retain(|_, n| n.0 != id);
        self.job_pieces.retain(|(c, _), _| *c != id);
        self.core.handle_client_gone(ClientId(id));
        self.process();
    }

    pub(crate) fn client_tx(&self, client: u32) -> Option<&ClientTx> {
        self.clients.get(&client).map(|c| &c.tx)
    }

    /// A client's `/api/sync` query: every worker sends what it has to
    /// report (profile samples, transfers) before the answer, so that what
    /// the client reads next is complete up to now.
    pub(crate) fn start_sync(&mut self, client: u32, query: u64) {
        self.next_sync += 1;
        let sid = self.next_sync;
        let waiting: FxHashSet<u32> = self.workers.keys().copied().collect();
        for w in self.workers.values() {
            let _ = w.tx.send(ToWorker::Sync(sid));
        }
        self.syncs.insert(sid, (client, query, waiting));
        self.answer_sync(sid);
    }

    /// Worker `worker` answered sync `sid`.
    pub(crate) fn synced(&mut self, sid: u64, worker: u32) {
        if let Some((_, _, waiting)) = self.syncs.get_mut(&sid) {
            waiting.remove(&worker);
            self.answer_sync(sid);
        }
    }

    /// Answers sync `sid` once no worker is left to answer it.
    pub(crate) fn answer_sync(&mut self, sid: u64) {
        let Some((client, query, waiting)) = self.syncs.get(&sid) else {
            return;
        };
        if waiting.is_empty() {
            let (client, id) = (*client, *query);
            self.syncs.remove(&sid);
            if let Some(tx) = self.client_tx(client) {
                let json = serde_json::json!({ "synced": true }).to_string();
                let _ = tx.send(ToClient::QueryReply { id, json });
            }
        }
    }

    /// A worker left: no sync waits for it.
    pub(crate) fn synced_all(&mut self, worker: u32) {
        let sids: Vec<u64> = self.syncs.keys().copied().collect();
        for sid in sids {
            self.synced(sid, worker);
        }
    }
}
