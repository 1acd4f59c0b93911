//! Orders from the scheduler: taken by execution threads, inputs fetched
//! from their holders, results copied from retiring workers.

use super::*;

impl WorkerShared {
    /// Takes ready work; the tasks taken are reported started (buffered;
    /// `quiet`: the caller flushes, the flusher is not woken).
    pub(crate) fn take(&self, orders: &mut Orders, max: usize, quiet: bool) -> Option<Batch> {
        match orders.take(max)? {
            Take::Shutdown => Some(Batch::Shutdown),
            Take::Retire => Some(Batch::Retire),
            Take::Work(tasks, released) => {
                if !tasks.is_empty() {
                    let mut unsent = self.unsent.lock();
                    unsent.started.extend(tasks.iter().map(|t| t.id));
                    self.buffered(&mut unsent, quiet);
                }
                Some(Batch::Work(tasks, released))
            }
        }
    }

    /// Takes ready work without blocking. Callable with the GIL held: the
    /// orders lock is never held while waiting for anything else.
    pub fn try_next(&self, max: usize) -> Option<Batch> {
        self.take(&mut self.orders.lock(), max, false)
    }

    /// Sends buffered reports, then waits up to `timeout` for work.
    pub fn wait_next(&self, max: usize, timeout: Duration) -> Batch {
        self.flush_locked(&mut self.unsent.lock());
        let deadline = Instant::now() + timeout;
        let mut orders = self.orders.lock();
        let eager = self.eager.load(Ordering::Relaxed);
        loop {
            if let Some(b) = self.take(&mut orders, max, eager) {
                if eager {
                    drop(orders);
                    self.flush();
                }
                return b;
            }
            if self.cv.wait_until(&mut orders, deadline).timed_out() {
                return Batch::Work(Vec::new(), Vec::new());
            }
        }
    }
}

/// Applies one scheduler message; true on shutdown.
pub(crate) fn handle(sh: &Arc<WorkerShared>, msg: ToWorker) -> bool {
    match msg {
        ToWorker::Compute {
            id,
            name,
            group,
            kind,
            func,
            args,
            deps,
            resources,
            time_limit_ms,
            job,
            careful,
            resume,
        } => {
            let remote: Vec<&Dep> = deps
                .iter()
                .filter(|d| matches!(&d.source, DepSource::Worker { id, .. } if *id != sh.id()))
                .collect();
            let mut t = ExecTask {
                id,
                name,
                group,
                kind,
                func,
                args,
                deps: Vec::with_capacity(deps.len()),
                resources,
                time_limit_ms,
                job,
                careful,
                resume,
            };
            if remote.is_empty() {
                t.deps = deps
                    .into_iter()
                    .map(|d| match d.source {
                        DepSource::Inline(b) => (d.id, Input::Bytes(b)),
                        DepSource::Worker { .. } => (d.id, Input::Local),
                    })
                    .collect();
                let old = sh.orders.lock().compute(id, t);
                abort(old);
                sh.cv.notify_one();
            } else {
                let mut orders = sh.orders.lock();
                let old = orders.compute_fetching(id, |attempt| {
                    let sh = sh.clone();
                    tokio::spawn(async move {
                        let outcome = match fetch_inputs(&sh, deps).await {
                            Ok(deps) => {
                                t.deps = deps;
                                FetchOutcome::Ok(t)
                            }
                            Err(FetchFailure::Missing(deps)) => FetchOutcome::Missing(deps),
                            Err(FetchFailure::Unreachable(deps, why)) => {
                                tracing::warn!("task {id:x}: {why}");
                                FetchOutcome::Unreachable(deps)
                            }
                        };
                        let report = sh.orders.lock().fetched(id, attempt, outcome);
                        // Dropped here; the scheduler places the task again
                        // (after recomputing inputs its holder lacks).
                        let msg = match report {
                            FetchReport::None => {
                                sh.cv.notify_one();
                                return;
                            }
                            FetchReport::Missing(deps) => FromWorker::Missing { task: id, deps },
                            FetchReport::Unreachable(deps) => {
                                FromWorker::FetchFailed { task: id, deps }
                            }
                        };
                        sh.flush();
                        let _ = sh.out().send(msg);
                    })
                    .abort_handle()
                });
                drop(orders);
                abort(old);
            }
        }
        ToWorker::Steal(ids) => {
            // The execution loop takes one task at a time, so every task not
            // started is still here (or fetching its inputs).
            let (given, aborts) = sh.orders.lock().steal(&ids);
            aborts.into_iter().for_each(|h| h.abort());
            if !given.is_empty() {
                let _ = sh.out().send(FromWorker::Stolen(given));
            }
        }
        ToWorker::Cancel(id) => {
            let old = sh.orders.lock().cancel(id);
            abort(old);
        }
        ToWorker::Stop(id) => {
            let (old, running) = {
                let mut orders = sh.orders.lock();
                let old = orders.cancel(id);
                (old, orders.phase(id) == Some(Phase::Running))
            };
            abort(old);
            if running {
                sh.stop_running(id);
            }
        }
        ToWorker::Release(ids) => {
            let delete = {
                let mut framed = sh.framed.lock();
                for id in &ids {
                    framed.remove(id); // a frame no transfer took
                }
                sh.store.lock().release(&ids)
            };
            for path in delete {
                let _ = std::fs::remove_file(path);
            }
            sh.orders.lock().release(ids);
            sh.cv.notify_one();
        }
        ToWorker::Shutdown => {
            sh.orders.lock().shutdown();
            sh.cv.notify_all();
            return true;
        }
        ToWorker::Ping => {}
        ToWorker::Ack(n) => sh.acked(n),
        ToWorker::Story { query, task } => {
            let steps = sh
                .orders
                .lock()
                .story(task)
                .into_iter()
                .map(|s| WorkerStep {
                    attempt: s.attempt,
                    event: s.event.to_string(),
                    phase: s.phase.map(|p| p.name().to_string()),
                    at_us: s.at_us,
                })
                .collect();
            let _ = sh.out().send(FromWorker::Story { query, steps });
        }
        ToWorker::Sync(sid) => {
            sh.syncs.lock().push(sid);
            if sh.sampler.load(Ordering::Relaxed) {
                sh.sync_epoch.fetch_add(1, Ordering::Relaxed);
                // The profiler answers within its interval; a task holding
                // the GIL may delay it: answer anyway after a while.
                let sh = sh.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(SYNC_WAIT).await;
                    sh.synced();
                });
            } else {
                sh.synced();
            }
        }
        ToWorker::Replicate { id, from } => {
            let sh = sh.clone();
            tokio::spawn(async move {
                let ok = match replicate(&sh, id, &from).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!("could not copy {id:x} from {from}: {e}");
                        false
                    }
                };
                let _ = sh.out().send(FromWorker::Replicated { id, ok });
            });
        }
        ToWorker::Restart if sh.in_process => {
            eprintln!(
                "shoal: a worker in this process cannot be restarted (a task stuck in C \
                 code, or restart()): use worker processes (LocalCluster(processes=True))"
            );
        }
        ToWorker::Restart => {
            eprintln!(
                "shoal worker {}: restart requested; exiting for a fresh process",
                std::process::id()
            );
            crate::shm::remove_process(std::process::id());
            sh.kill_commands();
            // SAFETY: as on scheduler loss; the nanny starts a new process.
            unsafe { libc::_exit(75) };
        }
    }
    false
}

/// Aborts a fetch whose order is gone (its permit and connection go with it).
pub(crate) fn abort(fetch: Option<tokio::task::AbortHandle>) {
    if let Some(h) = fetch {
        h.abort();
    }
}

/// Copies result `id` from the worker at `from` into a file of this
/// worker's (shared memory), for a retiring peer.
pub(crate) async fn replicate(sh: &WorkerShared, id: u64, from: &str) -> io::Result<()> {
    let mut got = fetch(from, vec![id], &sh.secret).await?;
    let (_, value) = got.pop().ok_or_else(|| io::Error::other("empty reply"))?;
    let dir = crate::shm::segment_dir(std::process::id());
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{id:x}"));
    let len = tokio::task::spawn_blocking({
        let path = path.clone();
        move || -> io::Result<u64> {
            let mut out = std::fs::File::create(&path)?;
            match value {
                Fetched::Bytes(b) => {
                    std::io::Write::write_all(&mut out, &b)?;
                    Ok(b.len() as u64)
                }
                // Same host: a kernel copy of the peer's segment.
                Fetched::File(mut f) => std::io::copy(&mut f, &mut out),
                // Cannot move: it is recomputed once its holder is gone.
                Fetched::Unpicklable(why) => Err(io::Error::other(why)),
            }
        }
    })
    .await
    .map_err(io::Error::other)??;
    let path = path.to_string_lossy().into_owned();
    sh.store.lock().replicated(id, path, len);
    Ok(())
}

/// Fetches the inputs held by other workers, at most `FETCH_SLOTS` at once
/// per worker, retrying as [`FetchPolicy`] says (if the holder died, the
/// scheduler cancels this task and recomputes the input).
pub(crate) async fn fetch_inputs(
    sh: &WorkerShared,
    deps: Vec<Dep>,
) -> Result<Vec<(u64, Input)>, FetchFailure> {
    let policy = FetchPolicy::default();
    let mut by_addr: FxHashMap<String, Vec<u64>> = FxHashMap::default();
    for d in &deps {
        if let DepSource::Worker { id, addr } = &d.source {
            if *id != sh.id() {
                by_addr.entry(addr.clone()).or_default().push(d.id);
            }
        }
    }
    let mut fetched: FxHashMap<u64, Input> = FxHashMap::default();
    for (addr, ids) in by_addr {
        let mut attempt = 0;
        loop {
            let got = {
                let _slot = sh.fetch_slots.acquire().await;
                let (start_us, t0) = (now_us(), Instant::now());
                let got = tokio::time::timeout(
                    policy.deadline,
                    fetch_some(&addr, ids.clone(), &sh.secret),
                )
                .await
                .unwrap_or_else(|_| {
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer within {:?}", policy.deadline),
                    ))
                });
                if let Ok(items) = &got {
                    let bytes: u64 = items
                        .iter()
                        .map(|(_, v)| v.as_ref().map_or(0, Fetched::size))
                        .sum();
                    sh.bytes_in.fetch_add(bytes, Ordering::Relaxed);
                    sh.record_activity(Activity {
                        kind: ActivityKind::Transfer,
                        task: if ids.len() == 1 { ids[0] } else { 0 },
                        bytes,
                        start_us,
                        duration_us: t0.elapsed().as_micros() as u64,
                    });
                }
                got
            };
            let (answer, items, err) = match got {
                Ok(items) => {
                    let missing = items
                        .iter()
                        .filter(|(_, v)| v.is_none())
                        .map(|(id, _)| *id)
                        .collect();
                    (Some(missing), items, None)
                }
                Err(e) => (None, Vec::new(), Some(e)),
            };
            match policy.after(attempt, answer) {
                Next::Done => {
                    fetched.extend(
                        items
                            .into_iter()
                            .filter_map(|(id, v)| v.map(|v| (id, input_of(v)))),
                    );
                    break;
                }
                Next::Missing(missing) => return Err(FetchFailure::Missing(missing)),
                Next::Retry(pause) => tokio::time::sleep(pause).await,
                Next::Unreachable => {
                    let err = err.map(|e| e.to_string()).unwrap_or_default();
                    let why =
                        format!("could not fetch inputs {ids:x?} from worker at {addr}: {err}");
                    return Err(FetchFailure::Unreachable(ids, why));
                }
            }
            attempt += 1;
        }
    }
    Ok(deps
        .into_iter()
        .map(|d| match d.source {
            DepSource::Inline(b) => (d.id, Input::Bytes(b)),
            DepSource::Worker { id, .. } if id == sh.id() => (d.id, Input::Local),
            DepSource::Worker { .. } => {
                let v = fetched.remove(&d.id).unwrap_or(Input::Local);
                (d.id, v)
            }
        })
        .collect())
}

/// A fetched input as its task takes it.
fn input_of(f: Fetched) -> Input {
    match f {
        Fetched::Bytes(b) => Input::Bytes(b),
        Fetched::File(f) => Input::File(f),
        Fetched::Unpicklable(why) => Input::Unavailable(why),
    }
}
