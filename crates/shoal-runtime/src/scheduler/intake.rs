//! Jobs of command tasks (`shoal submit`), taken in a slice at a time: a
//! job of millions of tasks is checked, answered and submitted in steps of
//! a few thousand between the loop's other work, so heartbeats and other
//! clients are served throughout (it used to stop the loop for seconds).

use super::*;

/// Tasks submitted in one step (each is placed, perhaps sent, at once).
const SUBMIT_STEP: usize = 1_024;
/// Tasks cancelled in one step (a job cancelled whole, or past its
/// `max_fails`).
const CANCEL_STEP: usize = 4_096;

/// A job being taken in.
pub(crate) struct Intake {
    client: u32,
    query: u64,
    name: String,
    max_fails: u32,
    /// Its tasks, in the pieces they came in (never joined into one
    /// vector: growing one of millions copies it whole, again and again).
    pieces: VecDeque<Vec<TaskSpec>>,
    /// Pieces checked so far.
    checked: usize,
    /// `(job task id, scheduler task id)`, in order, as checked.
    ids: Vec<(u64, u64)>,
    seen: FxHashSet<u64>,
    /// Registered as this job, with this task group, once checked whole.
    job: Option<(u32, String)>,
    /// How many were submitted (the job's tasks `..submitted`).
    submitted: usize,
}

impl Intake {
    pub(crate) fn new(
        client: u32,
        query: u64,
        name: String,
        max_fails: u32,
        pieces: Vec<Vec<TaskSpec>>,
    ) -> Intake {
        let n = pieces.iter().map(Vec::len).sum();
        Intake {
            client,
            query,
            name,
            max_fails,
            pieces: pieces.into(),
            checked: 0,
            ids: Vec::with_capacity(n),
            // Sized at once: rehashing millions of ids is itself a stall.
            seen: FxHashSet::with_capacity_and_hasher(n, Default::default()),
            job: None,
            submitted: 0,
        }
    }
}

impl State {
    /// Cancels `ids` a step at a time (see [`State::intake_step`]): a job
    /// of millions cancelled at once would stop the loop as its submission
    /// did. Cancels of one job keep their order.
    pub(crate) fn cancel_in_steps(&mut self, client: ClientId, ids: Vec<TaskId>) {
        for step in ids.chunks(CANCEL_STEP) {
            self.cancels.push_back((client, step.to_vec()));
        }
    }

    /// One step of the oldest cancel or job being taken in; false if there
    /// is none.
    pub(crate) fn intake_step(&mut self) -> bool {
        if let Some((client, ids)) = self.cancels.pop_front() {
            self.core.handle_cancel(client, &ids);
            self.process();
            return true;
        }
        let Some(mut job) = self.intake.pop_front() else {
            return false;
        };
        let keep = match job.job.clone() {
            None => self.check_step(&mut job),
            Some((id, group)) => self.submit_step(&mut job, id, &group),
        };
        if keep {
            self.intake.push_front(job);
        }
        true
    }

    /// Checks the next piece: nothing is submitted if one task is wrong
    /// (the client is told why). Once all are, the job is registered and
    /// the client answered. False when the job is done with.
    fn check_step(&mut self, j: &mut Intake) -> bool {
        if j.ids.is_empty() && j.pieces.iter().all(Vec::is_empty) {
            self.reply(
                j.client,
                j.query,
                serde_json::json!({ "error": "a job needs at least one task" }),
            );
            return false;
        }
        if let Some(piece) = j.pieces.get(j.checked) {
            for t in piece {
                match self.check_job_task(t, &mut j.seen) {
                    Ok(task) => j.ids.push((task, t.id)),
                    Err(e) => {
                        let e = e.to_string();
                        self.reply(j.client, j.query, serde_json::json!({ "error": e }));
                        return false;
                    }
                }
            }
            j.checked += 1;
            if j.checked < j.pieces.len() {
                return true;
            }
        }
        let id = self.jobs.next_id();
        let group = format!("job {id}: {}", j.name);
        let now = crate::clock::now_us();
        if let Some(journal) = &mut self.journal {
            let mut tasks: Vec<TaskSpec> = j.pieces.iter().flatten().cloned().collect();
            for t in &mut tasks {
                t.group.clone_from(&group);
            }
            journal.append(&journal::Record::Job {
                id,
                name: j.name.clone(),
                max_fails: j.max_fails,
                submitted_us: now,
                ids: j.ids.clone(),
                tasks,
            });
        }
        let job = self
            .jobs
            .add_untracked(std::mem::take(&mut j.name), j.max_fails, &j.ids, now);
        tracing::info!("job {job}: {} tasks submitted", j.ids.len());
        self.reply(j.client, j.query, serde_json::json!({ "job": job }));
        j.seen = FxHashSet::default();
        j.ids = Vec::new();
        j.job = Some((job, group));
        true
    }

    /// The task's id in its job, if it may be one of this job's tasks.
    fn check_job_task(&self, t: &TaskSpec, seen: &mut FxHashSet<u64>) -> Result<u64, JobTaskError> {
        if t.kind != shoal_proto::TaskKind::Command {
            return Err(JobTaskError::NotCommand(t.id));
        }
        let cmd: shoal_proto::CommandSpec =
            shoal_proto::decode(&t.args).map_err(|e| JobTaskError::Undecodable {
                id: t.id,
                detail: e.to_string(),
            })?;
        if cmd.argv.is_empty() {
            return Err(JobTaskError::NoProgram(cmd.task));
        }
        if !seen.insert(cmd.task) {
            return Err(JobTaskError::Twice(cmd.task));
        }
        if self.core.state(TaskId(t.id)).is_some() {
            return Err(JobTaskError::Known(t.id));
        }
        Ok(cmd.task)
    }

    /// Submits the job's next tasks (or, if it was cancelled whole
    /// meanwhile, ends the rest cancelled). False once all are.
    fn submit_step(&mut self, j: &mut Intake, job: u32, group: &str) -> bool {
        if self.jobs.halted(job) {
            let end = j.submitted + j.pieces.iter().map(Vec::len).sum::<usize>();
            self.jobs
                .never_submitted(job, j.submitted..end, crate::clock::now_us());
            return false;
        }
        let Some(piece) = j.pieces.front_mut() else {
            return false;
        };
        let n = SUBMIT_STEP.min(piece.len());
        let mut step: Vec<TaskSpec> = piece.drain(..n).collect();
        if piece.is_empty() {
            j.pieces.pop_front();
        }
        for (i, t) in step.iter_mut().enumerate() {
            t.group.clear();
            t.group.push_str(group);
            self.jobs.track(job, (j.submitted + i) as u32, t.id);
        }
        j.submitted += n;
        self.submit(jobs::job_client(job), step);
        self.process();
        !j.pieces.is_empty()
    }
}

/// Why a job is refused: one of its tasks cannot be one (the answer to the
/// client that submitted it says which).
#[derive(Debug, thiserror::Error)]
enum JobTaskError {
    #[error("task {0:x} of the job is not a command task")]
    NotCommand(u64),
    #[error("task {id:x} of the job: {detail}")]
    Undecodable { id: u64, detail: String },
    #[error("task {0} of the job has no program")]
    NoProgram(u64),
    #[error("task id {0} appears twice in the job")]
    Twice(u64),
    #[error("task {0:x} is already known")]
    Known(u64),
}
