//! The reports a worker keeps until its scheduler acknowledges them, so a
//! worker that loses its scheduler and joins it again (`--reconnect`) sends
//! again exactly what the scheduler may not have recorded.
//!
//! The scheduler acknowledges with the count of this connection's reports
//! it recorded (carried by its heartbeats); acknowledgements may repeat or
//! lag. `M` is a report as the services send it.

use std::collections::VecDeque;

/// Task reports sent and not acknowledged yet.
pub struct ReportLog<M> {
    unacked: VecDeque<M>,
    /// Reports of this connection the scheduler said it recorded.
    acked: u64,
}

impl<M> Default for ReportLog<M> {
    fn default() -> Self {
        ReportLog {
            unacked: VecDeque::new(),
            acked: 0,
        }
    }
}

impl<M: Clone> ReportLog<M> {
    /// A task report is sent: kept until acknowledged.
    pub fn sent(&mut self, report: M) {
        self.unacked.push_back(report);
    }

    /// The scheduler recorded the first `n` reports of this connection: as
    /// many as are new are forgotten (a repeated or older count changes
    /// nothing).
    pub fn acked(&mut self, n: u64) {
        let fresh = (n.saturating_sub(self.acked) as usize).min(self.unacked.len());
        self.unacked.drain(..fresh);
        self.acked = self.acked.max(n);
    }

    /// The worker joined a scheduler again: the reports to send first, in
    /// order. They stay kept (the new connection's count starts at 0 and
    /// acknowledges them in turn).
    pub fn rejoined(&mut self) -> Vec<M> {
        self.acked = 0;
        self.unacked.iter().cloned().collect()
    }

    /// Reports not acknowledged.
    pub fn len(&self) -> usize {
        self.unacked.len()
    }

    /// Whether every report was acknowledged.
    pub fn is_empty(&self) -> bool {
        self.unacked.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acknowledgements_forget_in_order_and_repeats_change_nothing() {
        let mut log = ReportLog::default();
        for r in 1..=5 {
            log.sent(r);
        }
        log.acked(2);
        log.acked(2);
        log.acked(1);
        assert_eq!(log.len(), 3);
        log.acked(99);
        assert!(log.is_empty(), "a count past what was sent forgets all");
    }

    #[test]
    fn a_rejoin_sends_again_what_was_not_acknowledged_and_counts_anew() {
        let mut log = ReportLog::default();
        for r in 1..=4 {
            log.sent(r);
        }
        log.acked(1);
        assert_eq!(log.rejoined(), vec![2, 3, 4]);
        log.sent(5);
        // The new connection recorded the three sent again and one new.
        log.acked(2);
        assert_eq!(log.rejoined(), vec![4, 5]);
        log.acked(2);
        assert_eq!(log.len(), 0);
    }
}
