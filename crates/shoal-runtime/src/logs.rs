//! This process's recent log lines, kept for `get_worker_logs` and the
//! dashboard: a `tracing` layer and the Python `logging` handler both append
//! here; a worker's heartbeat takes what is new to the scheduler.

use parking_lot::Mutex;
use std::collections::VecDeque;
use std::fmt::Write;
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

/// Lines kept while nobody takes them (older ones are dropped).
const CAPACITY: usize = 1000;

static LINES: Mutex<VecDeque<String>> = Mutex::new(VecDeque::new());

/// Appends one line (`"LEVEL target: message"` by convention).
pub fn push(line: String) {
    let mut lines = LINES.lock();
    if lines.len() == CAPACITY {
        lines.pop_front();
    }
    lines.push_back(line);
}

/// Takes the lines appended since the last call.
pub fn drain() -> Vec<String> {
    LINES.lock().drain(..).collect()
}

/// Seconds since the Unix epoch with milliseconds, for line prefixes.
fn stamp() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", t.as_secs(), t.subsec_millis())
}

/// The `tracing` layer that copies events (those the filter lets through)
/// into the ring.
pub(crate) struct RingLayer;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for RingLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut line = format!("{} {} {}:", stamp(), meta.level(), meta.target());
        event.record(&mut Fields(&mut line));
        push(line);
    }
}

struct Fields<'a>(&'a mut String);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ring_is_bounded_and_drains() {
        for i in 0..super::CAPACITY + 5 {
            super::push(format!("line {i}"));
        }
        let got = super::drain();
        assert_eq!(got.len(), super::CAPACITY);
        assert_eq!(got[0], "line 5");
        assert!(super::drain().is_empty());
    }
}
