//! Wall-clock time as the protocol carries it.

/// Microseconds since the Unix epoch (task stream times; each host's clock).
pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}
