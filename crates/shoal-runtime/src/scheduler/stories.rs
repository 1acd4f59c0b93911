//! A task's story across the cluster: the scheduler's transitions, and the
//! steps of the workers it was sent to (their order machines' logs), asked
//! of them when a client or the dashboard looks at the task. Answered once
//! every such worker has answered or left, or after [`STORY_WAIT`].

use super::*;
use serde_json::{json, Value};
use shoal_proto::WorkerStep;

/// How long a task's detail waits for its workers' steps.
const STORY_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Who asked for a task's detail.
pub(crate) enum Asker {
    /// A client's `Query` with this id.
    Client(u32, u64),
    /// The dashboard.
    Http(oneshot::Sender<(api::Reply, u64)>),
}

/// A task's detail waiting for its workers' steps.
pub(crate) struct StoryWait {
    asker: Asker,
    detail: Value,
    /// Workers yet to answer.
    waiting: FxHashSet<u32>,
    pub(super) deadline: tokio::time::Instant,
}

/// The task of a `/api/task/ID` path (with any query string).
pub(crate) fn task_of(path: &str) -> Option<u64> {
    let path = path.split_once('?').map_or(path, |p| p.0);
    path.trim_end_matches('/')
        .strip_prefix("/api/task/")?
        .parse()
        .ok()
}

impl State {
    /// Answers `path` for `asker`, at once unless it is a task's detail
    /// whose workers are to be asked for their steps first.
    pub(crate) fn ask(&mut self, path: &str, asker: Asker) {
        let Some(task) = task_of(path) else {
            return self.answer(asker, self.query(path));
        };
        let mut detail = match self.task_detail(task) {
            Ok(d) => d,
            Err(e) => return self.answer(asker, Err(e)),
        };
        detail["worker_story"] = json!({});
        // Every worker it was sent to, by the scheduler's story and its state now.
        let processing = |to: Option<TaskState>| match to {
            Some(TaskState::Processing(w)) => Some(w.0),
            _ => None,
        };
        let now = processing(self.core.state(TaskId(task)));
        let waiting: FxHashSet<u32> = self
            .core
            .story(TaskId(task))
            .iter()
            .filter_map(|t| processing(t.to))
            .chain(now)
            .filter(|w| self.workers.contains_key(w))
            .collect();
        if waiting.is_empty() {
            return self.answer(asker, Ok(("application/json", detail.to_string())));
        }
        self.next_sync += 1;
        let query = self.next_sync;
        for w in &waiting {
            let _ = self.workers[w].tx.send(ToWorker::Story { query, task });
        }
        let deadline = tokio::time::Instant::now() + STORY_WAIT;
        self.stories.insert(
            query,
            StoryWait {
                asker,
                detail,
                waiting,
                deadline,
            },
        );
    }

    /// Worker `worker` sent its steps for story question `query`.
    pub(crate) fn worker_story(&mut self, worker: u32, query: u64, steps: Vec<WorkerStep>) {
        let name = self.worker_label(worker);
        let Some(s) = self.stories.get_mut(&query) else {
            return; // answered already (it was late)
        };
        if s.waiting.remove(&worker) && !steps.is_empty() {
            s.detail["worker_story"][name] = json!(steps);
        }
        if s.waiting.is_empty() {
            self.story_done(query);
        }
    }

    /// A worker left: no story waits for it.
    pub(crate) fn stories_worker_left(&mut self, worker: u32) {
        let mut done = Vec::new();
        for (&q, s) in self.stories.iter_mut() {
            if s.waiting.remove(&worker) && s.waiting.is_empty() {
                done.push(q);
            }
        }
        done.into_iter().for_each(|q| self.story_done(q));
    }

    /// Stories whose workers did not all answer in time: answered with
    /// what came (the missing workers named).
    pub(crate) fn stories_overdue(&mut self, now: tokio::time::Instant) {
        let late: Vec<u64> = self
            .stories
            .iter()
            .filter(|(_, s)| now >= s.deadline)
            .map(|(&q, _)| q)
            .collect();
        for q in late {
            let mut silent: Vec<u32> = self.stories[&q].waiting.iter().copied().collect();
            silent.sort_unstable();
            let names: Vec<String> = silent.iter().map(|&w| self.worker_label(w)).collect();
            if let Some(s) = self.stories.get_mut(&q) {
                s.detail["worker_story_missing"] = json!(names);
            }
            self.story_done(q);
        }
    }

    fn story_done(&mut self, query: u64) {
        if let Some(s) = self.stories.remove(&query) {
            self.answer(s.asker, Ok(("application/json", s.detail.to_string())));
        }
    }

    fn answer(&self, asker: Asker, reply: api::Reply) {
        match asker {
            Asker::Http(tx) => {
                let _ = tx.send((reply, self.monitor.next_seq()));
            }
            Asker::Client(client, id) => {
                let json = match reply {
                    Ok(("application/json", body)) => body,
                    Ok((_, body)) => Value::from(body).to_string(),
                    Err((_, msg)) => json!({ "error": msg }).to_string(),
                };
                if let Some(tx) = self.client_tx(client) {
                    let _ = tx.send(ToClient::QueryReply { id, json });
                }
            }
        }
    }

    fn worker_label(&self, worker: u32) -> String {
        self.worker_name(WorkerId(worker))
            .unwrap_or_else(|| format!("worker {worker}"))
    }
}

#[cfg(test)]
mod tests {
    use super::task_of;

    #[test]
    fn task_paths_are_recognised_with_or_without_a_query() {
        assert_eq!(task_of("/api/task/42"), Some(42));
        assert_eq!(task_of("/api/task/42/?x=1"), Some(42));
        assert_eq!(task_of("/api/task/x"), None);
        assert_eq!(task_of("/api/status"), None);
    }
}
