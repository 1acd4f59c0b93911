//! How a worker fetches a task's inputs from their holders: how long one
//! attempt may take, how often it tries again and after what pause, and
//! what a holder's answer means for the task.
//!
//! A holder that dies is noticed by the scheduler, which cancels the task
//! here (aborting the fetch) and recomputes the input: the retries only
//! bridge a brief hiccup. A holder that accepts and never answers must not
//! pin a fetch slot for ever: each attempt has a deadline.

use std::time::Duration;

/// The retry policy (the defaults are the services').
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FetchPolicy {
    /// Attempts per holder before its inputs count as unreachable.
    pub attempts: u32,
    /// The pause after the first failed attempt; the n-th pause is n times it.
    pub backoff: Duration,
    /// How long one attempt may take.
    pub deadline: Duration,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        FetchPolicy {
            attempts: 5,
            backoff: Duration::from_millis(100),
            deadline: Duration::from_secs(120),
        }
    }
}

/// What to do after an attempt at a holder's inputs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// All were there: the task may run (once every holder answered).
    Done,
    /// The holder answered without these: the scheduler must recompute them
    /// (asking again would not help).
    Missing(Vec<u64>),
    /// Try again after this pause.
    Retry(Duration),
    /// Give up: the holder counts as unreachable for these inputs.
    Unreachable,
}

impl FetchPolicy {
    /// Attempt `attempt` (from 0) ended: `answer` is the ids the holder
    /// lacks (an answer), or None (no answer: refused, cut, timed out).
    pub fn after(&self, attempt: u32, answer: Option<Vec<u64>>) -> Next {
        match answer {
            Some(missing) if missing.is_empty() => Next::Done,
            Some(missing) => Next::Missing(missing),
            None if attempt + 1 >= self.attempts => Next::Unreachable,
            None => Next::Retry(self.backoff * (attempt + 1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_retry_with_growing_pauses_then_give_up() {
        let p = FetchPolicy::default();
        let pauses: Vec<Next> = (0..5).map(|a| p.after(a, None)).collect();
        assert_eq!(
            pauses,
            [
                Next::Retry(Duration::from_millis(100)),
                Next::Retry(Duration::from_millis(200)),
                Next::Retry(Duration::from_millis(300)),
                Next::Retry(Duration::from_millis(400)),
                Next::Unreachable,
            ]
        );
        // Five attempts bridge a second of trouble, not more.
        let waited: Duration = (0..4).map(|a| p.backoff * (a + 1)).sum();
        assert_eq!(waited, Duration::from_secs(1));
    }

    #[test]
    fn an_answer_ends_the_attempts_missing_inputs_are_not_asked_again() {
        let p = FetchPolicy::default();
        assert_eq!(p.after(0, Some(vec![])), Next::Done);
        assert_eq!(p.after(3, Some(vec![7, 9])), Next::Missing(vec![7, 9]));
        assert_eq!(p.after(4, Some(vec![])), Next::Done, "the last try counts");
    }
}
