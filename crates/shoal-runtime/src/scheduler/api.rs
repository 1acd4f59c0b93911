//! The dashboard's data: answers to `GET` paths, as JSON (or Prometheus
//! text for `/metrics`). The HTTP server and clients' `Query` messages both
//! end here, in the owner task, so there is one source of truth and no lock.

use super::monitor::Record;
use super::State;
use serde_json::{json, Map, Value};
use shoal_core::{TaskId, TaskState, WorkerId};

/// Largest number of task stream entries one answer carries (the newest).
const STREAM_ANSWER_CAP: usize = 20_000;

/// An answer: content type and body, or an HTTP status and a message.
pub(crate) type Reply = Result<(&'static str, String), (u16, String)>;

/// The value of `name` in a query string (`a=1&b=2`), percent-decoded
/// (`%xx`, `+`); bytes that are not UTF-8 become U+FFFD. Whatever a peer
/// sends decodes to some string: no query can reach a panic.
pub(crate) fn param(query: &str, name: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

fn num(query: &str, name: &str) -> Result<u64, (u16, String)> {
    match param(query, name) {
        None => Ok(0),
        Some(v) => v
            .parse()
            .map_err(|_| (400, format!("{name} must be a whole number, not {v:?}"))),
    }
}

/// `merge=` microseconds (default 1000; 0: every task separately).
fn merge_gap(query: &str) -> Result<u64, (u16, String)> {
    match param(query, "merge") {
        None => Ok(1000),
        Some(_) => num(query, "merge"),
    }
}

/// `[seq, task, group, worker, thread, start_us, duration_us, kind, bytes, count]`.
fn record(r: &Record, count: u64) -> Value {
    json!([
        r.seq,
        r.task,
        r.group,
        r.worker,
        r.thread,
        r.start_us,
        r.duration_us,
        r.kind as u8,
        r.bytes,
        count
    ])
}

/// Joins entries that follow each other on one lane with the same group and
/// kind, less than `gap_us` apart, into one block with a count: at 40,000
/// tasks a second a browser gets a few hundred blocks, not every task.
/// `gap_us` 0 keeps every entry.
fn merged<'a>(records: impl Iterator<Item = &'a Record>, gap_us: u64) -> Vec<Value> {
    let mut out: Vec<(Record, u64)> = Vec::new();
    let mut last: rustc_hash::FxHashMap<(u32, u32), usize> = Default::default();
    for r in records {
        let lane = (r.worker, r.thread);
        if gap_us > 0 {
            if let Some(&i) = last.get(&lane) {
                let (m, n) = &mut out[i];
                let end = m.start_us + m.duration_us;
                if m.group == r.group
                    && m.kind == r.kind
                    && r.start_us >= m.start_us
                    && r.start_us <= end + gap_us
                {
                    m.duration_us = (r.start_us + r.duration_us).max(end) - m.start_us;
                    m.bytes += r.bytes;
                    m.seq = r.seq;
                    *n += 1;
                    continue;
                }
            }
        }
        last.insert(lane, out.len());
        out.push((*r, 1));
    }
    out.iter().map(|(r, n)| record(r, *n)).collect()
}

fn state_name(s: TaskState) -> &'static str {
    match s {
        TaskState::Waiting => "waiting",
        TaskState::Ready => "ready",
        TaskState::Processing(_) => "processing",
        TaskState::Memory { .. } => "memory",
        TaskState::Erred { .. } => "erred",
        TaskState::Released => "released",
    }
}

impl State {
    /// Answers `path` (with its query string).
    pub(crate) fn query(&self, path: &str) -> Reply {
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        let ok = |v: Value| Ok(("application/json", v.to_string()));
        match path.trim_end_matches('/') {
            "/api/status" => ok(self.status(num(query, "since")?, merge_gap(query)?)),
            "/api/graph" => ok(self.graph()),
            "/api/profile" => ok(self.profile_json(param(query, "group"))),
            "/api/logs" => ok(self.logs_json()),
            "/api/report" => ok(self.report(num(query, "since_us")?, merge_gap(query)?)),
            "/metrics" => Ok((
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics(),
            )),
            "/api/jobs" => ok(self.jobs.list_json(&self.core)),
            p if p.starts_with("/api/jobs/") => {
                let rest = &p["/api/jobs/".len()..];
                let (id, tail) = rest.split_once('/').unwrap_or((rest, ""));
                let id: u32 = id
                    .parse()
                    .map_err(|_| (400, format!("job ids are whole numbers, not {id:?}")))?;
                match tail {
                    "" => self
                        .jobs
                        .info_json(id, &self.core)
                        .map(|v| ("application/json", v.to_string()))
                        .ok_or((404, format!("no job {id}"))),
                    "tasks" => self
                        .jobs
                        .task_ids_json(id, param(query, "filter").as_deref())
                        .map(|v| ("application/json", v.to_string()))
                        .map_err(|e| {
                            let status = match e {
                                super::jobs::TaskIdsError::NoJob(_) => 404,
                                super::jobs::TaskIdsError::BadFilter(_) => 400,
                            };
                            (status, e.to_string())
                        }),
                    _ => Err((404, format!("no such page: {path}"))),
                }
            }
            p if p.starts_with("/api/task/") => {
                let id = &p["/api/task/".len()..];
                let id: u64 = id
                    .parse()
                    .map_err(|_| (400, format!("task ids are whole numbers, not {id:?}")))?;
                self.task_detail(id)
                    .map(|v| ("application/json", v.to_string()))
            }
            _ => Err((404, format!("no such page: {path}"))),
        }
    }

    fn now_us(&self) -> u64 {
        crate::clock::now_us()
    }

    fn groups_json(&self) -> Vec<Value> {
        self.core
            .group_counts()
            .map(|(g, c)| {
                let mut v = json!({
                    "id": g,
                    "name": self.group_names.get(g as usize).map_or("?", |s| s.as_str()),
                    "live": c.by_state().iter().map(|(_, n)| n).sum::<u64>(),
                    "submitted": c.submitted, "finished": c.finished, "total_us": c.total_us,
                });
                for (state, n) in c.by_state() {
                    v[state] = n.into();
                }
                v
            })
            .collect()
    }

    fn workers_json(&self) -> Vec<Value> {
        self.info()
            .workers
            .into_iter()
            .map(|w| {
                let m = w.metrics;
                json!({
                    "id": w.id, "name": w.name, "address": w.address, "pid": w.pid,
                    "nthreads": w.nthreads, "processing": w.processing, "held": w.held,
                    "memory": m.memory, "managed": m.managed, "spilled": m.spilled,
                    "limit": m.limit, "paused": m.paused, "cpu": m.cpu,
                    "bytes_in": m.bytes_in, "bytes_out": m.bytes_out,
                    "spilled_total": m.spilled_total, "last_seen_ms": w.last_seen_ms,
                })
            })
            .collect()
    }

    fn worker_names(&self) -> Map<String, Value> {
        self.monitor
            .worker_names
            .iter()
            .map(|(id, n)| (id.to_string(), Value::from(n.as_str())))
            .collect()
    }

    fn counters(&self) -> Value {
        let m = &self.monitor;
        json!({
            "finished": m.finished_total, "erred": m.erred_total,
            "transfer_bytes": m.transfer_bytes, "spill_bytes": m.spill_bytes,
            "lag_us": m.lag_us, "lag_max_us": m.lag_max_us, "messages_in": m.messages_in,
            "messages_out": self.messages_out(),
            "tasks": self.core.n_tasks(), "clients": self.clients.len(),
        })
    }

    /// Live state plus the task stream entries from `since` on.
    fn status(&self, since: u64, gap_us: u64) -> Value {
        let next = self.monitor.next_seq();
        let since = since.max(next.saturating_sub(STREAM_ANSWER_CAP as u64));
        let stream = merged(self.monitor.since(since), gap_us);
        json!({
            "now_us": self.now_us(),
            "seq": next,
            "stream": stream,
            "groups": self.groups_json(),
            "workers": self.workers_json(),
            "worker_names": self.worker_names(),
            "counters": self.counters(),
        })
    }

    /// The current computation by task group: nodes and dependency edges
    /// (a graph of 100,000 tasks is drawn as a few groups).
    fn graph(&self) -> Value {
        let mut edges: rustc_hash::FxHashMap<(u32, u32), u64> = Default::default();
        for id in self.core.task_ids() {
            let Some(g) = self.core.task_group(id) else {
                continue;
            };
            for &d in self.core.deps(id) {
                if let Some(dg) = self.core.task_group(d) {
                    *edges.entry((dg, g)).or_default() += 1;
                }
            }
        }
        let groups: Vec<Value> = self
            .groups_json()
            .into_iter()
            .filter(|g| g["live"].as_u64().unwrap_or(0) > 0)
            .collect();
        let mut edges: Vec<Value> = edges
            .into_iter()
            .map(|((a, b), n)| json!([a, b, n]))
            .collect();
        edges.sort_by_key(|e| (e[0].as_u64(), e[1].as_u64()));
        json!({ "nodes": groups, "edges": edges })
    }

    pub(crate) fn task_detail(&self, id: u64) -> Result<Value, (u16, String)> {
        let spec = self.core.spec(TaskId(id));
        let run = self.monitor.stream.iter().rev().find(|r| r.task == id);
        if spec.is_none() && run.is_none() {
            return Err((404, format!("task {id} is not known (any more)")));
        }
        let state = self.core.state(TaskId(id));
        let (location, size) = match state {
            Some(TaskState::Memory { location, size }) => (
                match location {
                    shoal_core::Location::Inline => Some("scheduler".to_string()),
                    shoal_core::Location::Worker(w) => self.worker_name(w),
                },
                Some(size),
            ),
            _ => (None, None),
        };
        let deps: Vec<Value> = self
            .core
            .deps(TaskId(id))
            .iter()
            .map(|&d| {
                json!({
                    "id": d.0,
                    "name": self.name(d.0),
                    "state": self.core.state(d).map(state_name),
                })
            })
            .collect();
        Ok(json!({
            "id": id,
            "name": self.name(id),
            "group": spec.map(|_| self.group_of(id)),
            "state": state.map(state_name),
            "location": location,
            "size": size,
            "inputs": deps,
            "worker": run.and_then(|r| self.monitor.worker_names.get(&r.worker)),
            "thread": run.map(|r| r.thread),
            "start_us": run.map(|r| r.start_us),
            "duration_us": run.map(|r| r.duration_us),
            "error": self.monitor.error_text.get(&id),
            "story": self.story_json(id),
        }))
    }

    /// The task's recent transitions in the scheduler, oldest first: what
    /// caused each (the event's name) and when (the wall clock, to within
    /// the core's tick).
    fn story_json(&self, id: u64) -> Vec<Value> {
        let name = |s: Option<TaskState>| s.map_or("forgotten", state_name);
        self.core
            .story(TaskId(id))
            .into_iter()
            .map(|t| {
                let worker = match t.to {
                    Some(TaskState::Processing(w)) => self.worker_name(w),
                    _ => None,
                };
                json!({
                    "from": name(t.from),
                    "to": name(t.to),
                    "worker": worker,
                    "stimulus": t.stimulus,
                    "time_us": self.started_us + t.at_us,
                })
            })
            .collect()
    }

    pub(crate) fn worker_name(&self, w: WorkerId) -> Option<String> {
        self.monitor.worker_names.get(&w.0).cloned()
    }

    fn profile_json(&self, group: Option<String>) -> Value {
        let mut names: Vec<&String> = self.monitor.profile.keys().collect();
        names.sort();
        let mut stacks: rustc_hash::FxHashMap<&str, u64> = Default::default();
        for (g, s) in &self.monitor.profile {
            if group.as_ref().is_none_or(|want| want == g) {
                for (k, n) in s {
                    *stacks.entry(k.as_str()).or_default() += n;
                }
            }
        }
        json!({ "groups": names, "group": group, "stacks": stacks })
    }

    fn logs_json(&self) -> Value {
        let mut workers: Vec<Value> = self
            .monitor
            .logs
            .iter()
            .map(|(id, lines)| {
                json!({
                    "id": id,
                    "name": self.monitor.worker_names.get(id),
                    "lines": lines,
                })
            })
            .collect();
        workers.sort_by_key(|w| w["id"].as_u64());
        json!({ "workers": workers })
    }

    /// Everything a performance report shows, from `since_us` on.
    fn report(&self, since_us: u64, gap_us: u64) -> Value {
        let stream = merged(
            self.monitor
                .stream
                .iter()
                .filter(|r| r.start_us + r.duration_us >= since_us),
            gap_us,
        );
        let history: Map<String, Value> = self
            .monitor
            .history
            .iter()
            .map(|(id, h)| {
                // From the last sample before the window: how things stood
                // when it began (a short window may hold no heartbeat).
                let first = h.iter().position(|s| s.t_us >= since_us);
                let start = first.unwrap_or(h.len()).saturating_sub(1);
                let samples: Vec<Value> = h
                    .iter()
                    .skip(start)
                    .map(|s| json!([s.t_us, s.memory, s.managed, s.spilled, s.cpu]))
                    .collect();
                (id.to_string(), Value::from(samples))
            })
            .collect();
        json!({
            "now_us": self.now_us(),
            "since_us": since_us,
            "stream": stream,
            "groups": self.groups_json(),
            "workers": self.workers_json(),
            "worker_names": self.worker_names(),
            "history": history,
            "counters": self.counters(),
        })
    }

    /// Prometheus metrics in the OpenMetrics text format, encoded by
    /// `prometheus-client` from a registry made for this scrape.
    fn metrics(&self) -> String {
        use prometheus_client::metrics::{counter::Counter, family::Family, gauge::Gauge};
        use prometheus_client::registry::Registry;
        use std::sync::atomic::AtomicU64;
        type G = Gauge<f64, AtomicU64>;
        type C = Counter<f64, AtomicU64>;
        type Labels = Vec<(&'static str, String)>;

        let mut reg = Registry::default();
        let mut by_state = [("", 0u64); 6];
        for (_, c) in self.core.group_counts() {
            for (total, (name, n)) in by_state.iter_mut().zip(c.by_state()) {
                *total = (name, total.1 + n);
            }
        }
        let tasks = Family::<Labels, G>::default();
        for (state, n) in by_state {
            tasks
                .get_or_create(&vec![("state", state.to_string())])
                .set(n as f64);
        }
        reg.register("shoal_tasks", "Tasks the scheduler knows, by state", tasks);
        let m = &self.monitor;
        let counters = [
            (
                "shoal_tasks_finished",
                "Task runs that finished",
                m.finished_total as f64,
            ),
            (
                "shoal_tasks_erred",
                "Task runs that raised",
                m.erred_total as f64,
            ),
            (
                "shoal_transfer_bytes",
                "Bytes workers fetched from each other",
                m.transfer_bytes as f64,
            ),
            (
                "shoal_spill_bytes",
                "Bytes workers spilled to disk",
                m.spill_bytes as f64,
            ),
        ];
        for (name, help, v) in counters {
            let c = C::default();
            c.inc_by(v);
            reg.register(name, help, c);
        }
        let gauges = [
            (
                "shoal_scheduler_event_loop_lag_seconds",
                "How late the scheduler's last tick ran",
                m.lag_us as f64 / 1e6,
            ),
            (
                "shoal_clients",
                "Connected clients",
                self.clients.len() as f64,
            ),
            (
                "shoal_workers",
                "Connected workers",
                self.workers.len() as f64,
            ),
        ];
        for (name, help, v) in gauges {
            let g = G::default();
            g.set(v);
            reg.register(name, help, g);
        }
        type PerWorker = fn(&shoal_proto::WorkerInfo) -> f64;
        let info = self.info();
        let per_worker: [(&str, &str, bool, PerWorker); 8] = [
            (
                "shoal_worker_memory_bytes",
                "Worker process memory",
                false,
                |w| w.metrics.memory as f64,
            ),
            (
                "shoal_worker_managed_bytes",
                "Bytes of results a worker holds in memory",
                false,
                |w| w.metrics.managed as f64,
            ),
            (
                "shoal_worker_spilled_bytes",
                "Bytes of results a worker holds on disk",
                false,
                |w| w.metrics.spilled as f64,
            ),
            (
                "shoal_worker_memory_limit_bytes",
                "A worker's memory limit (0: none)",
                false,
                |w| w.metrics.limit as f64,
            ),
            (
                "shoal_worker_cpu_percent",
                "CPU use over the last second, percent of one core",
                false,
                |w| w.metrics.cpu as f64,
            ),
            (
                "shoal_worker_processing_tasks",
                "Tasks assigned to a worker",
                false,
                |w| w.processing as f64,
            ),
            (
                "shoal_worker_received_bytes",
                "Bytes a worker fetched from peers",
                true,
                |w| w.metrics.bytes_in as f64,
            ),
            (
                "shoal_worker_sent_bytes",
                "Bytes a worker's data server sent",
                true,
                |w| w.metrics.bytes_out as f64,
            ),
        ];
        for (name, help, counter, get) in per_worker {
            let labels = |w: &shoal_proto::WorkerInfo| vec![("worker", w.name.clone())];
            if counter {
                let family = Family::<Labels, C>::default();
                for w in &info.workers {
                    family.get_or_create(&labels(w)).inc_by(get(w));
                }
                reg.register(name, help, family);
            } else {
                let family = Family::<Labels, G>::default();
                for w in &info.workers {
                    family.get_or_create(&labels(w)).set(get(w));
                }
                reg.register(name, help, family);
            }
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::super::monitor::{Kind, Record};

    fn rec(seq: u64, group: u32, thread: u32, start_us: u64) -> Record {
        Record {
            seq,
            task: seq,
            group,
            worker: 1,
            thread,
            start_us,
            duration_us: 10,
            kind: Kind::Compute,
            bytes: 1,
        }
    }

    #[test]
    fn merges_back_to_back_tasks_per_lane_and_group() {
        let rs = [
            rec(0, 0, 0, 0),
            rec(1, 0, 1, 5), // another lane
            rec(2, 0, 0, 15),
            rec(3, 1, 0, 30),    // another group
            rec(4, 1, 0, 5_000), // too far apart
        ];
        let m = super::merged(rs.iter(), 1000);
        let counts: Vec<u64> = m.iter().map(|v| v[9].as_u64().unwrap()).collect();
        assert_eq!(counts, vec![2, 1, 1, 1]);
        assert_eq!(m[0][6], 25); // 0..25 us
        assert_eq!(super::merged(rs.iter(), 0).len(), 5);
    }

    #[test]
    fn decodes_query_values() {
        let p = |q: &str| super::param(q, "group");
        assert_eq!(p("a=1&group=a%20b+c%2Fd").as_deref(), Some("a b c/d"));
        assert_eq!(p("group=50%").as_deref(), Some("50%"));
        // A `%` escape cut inside a multi-byte character used to panic.
        assert_eq!(p("group=%a\u{e9}").as_deref(), Some("%a\u{e9}"));
        assert_eq!(p("group=%ff%fe").as_deref(), Some("\u{fffd}\u{fffd}"));
        assert_eq!(p("group=%e9%"), Some("\u{fffd}%".into()));
        assert_eq!(p("a=1"), None);
        assert_eq!(super::num("since=abc", "since").unwrap_err().0, 400);
    }
}
