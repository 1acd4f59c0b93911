//! Batches of messages in frames: the encoder that cuts them by bytes, and
//! what each message weighs.

use super::*;

/// Room kept in front of a frame body for its message count (a varint).
pub(crate) const COUNT_ROOM: usize = 10;

/// Largest encoded message: one frame, less the room for its count. A
/// larger one cannot be sent; senders of user data check this first
/// (`ClientShared::submit`), and the writer drops any other with an error.
pub const fn max_message() -> usize {
    MAX_FRAME - COUNT_ROOM
}

/// Frame bodies for queued messages, each encoded straight into its frame:
/// a postcard sequence (a varint count, then the messages one by one, which
/// is how postcard encodes a `Vec`) of at most `limit` bytes.
#[cfg(test)]
pub(crate) fn frames<M: Serialize>(msgs: impl Iterator<Item = M>, limit: usize) -> Vec<Bytes> {
    let mut enc = FrameEncoder::new(limit, limit);
    let mut out: Vec<Bytes> = msgs.filter_map(|m| enc.push(&m)).collect();
    out.extend(enc.finish());
    out
}

/// Bytes after which the writer ends a frame and lets the I/O thread run
/// before encoding more: a burst of big messages is encoded a slice at a
/// time, not all at once.
pub(crate) const FRAME_TARGET: usize = 1 << 20;

/// Encodes messages into frames of about `target` bytes (one message may
/// pass it), never over `limit`.
pub(crate) struct FrameEncoder {
    buf: Vec<u8>,
    count: u64,
    target: usize,
    limit: usize,
}

impl FrameEncoder {
    pub(crate) fn new(target: usize, limit: usize) -> Self {
        FrameEncoder {
            buf: vec![0u8; COUNT_ROOM],
            count: 0,
            target,
            limit,
        }
    }

    /// Adds a message; returns a frame when one is complete.
    pub(crate) fn push<M: Serialize>(&mut self, m: &M) -> Option<Bytes> {
        let mark = self.buf.len();
        self.buf = shoal_proto::encode_into(m, std::mem::take(&mut self.buf));
        let size = self.buf.len() - mark;
        if size > self.limit - COUNT_ROOM {
            tracing::error!(
                "dropping a message of {size} bytes: over the limit of {} bytes per message",
                self.limit - COUNT_ROOM
            );
            self.buf.truncate(mark);
            return None;
        }
        if self.buf.len() > self.limit && self.count > 0 {
            // This message starts the next frame (the one copy splitting costs).
            let mut next = vec![0u8; COUNT_ROOM];
            next.extend_from_slice(&self.buf[mark..]);
            self.buf.truncate(mark);
            let full = std::mem::replace(&mut self.buf, next);
            let frame = with_count(full, std::mem::replace(&mut self.count, 1));
            return Some(frame);
        }
        self.count += 1;
        if self.buf.len() >= self.target {
            return self.finish();
        }
        None
    }

    /// The frame holding what was pushed since the last one, if anything.
    pub(crate) fn finish(&mut self) -> Option<Bytes> {
        if self.count == 0 {
            return None;
        }
        let full = std::mem::replace(&mut self.buf, vec![0u8; COUNT_ROOM]);
        Some(with_count(full, std::mem::take(&mut self.count)))
    }
}

/// Writes `count` as a varint just before the messages, in the room left
/// for it, and returns the body from there (no copy).
pub(crate) fn with_count(mut buf: Vec<u8>, mut count: u64) -> Bytes {
    let mut varint = [0u8; COUNT_ROOM];
    let mut n = 0;
    loop {
        let byte = (count & 0x7f) as u8;
        count >>= 7;
        if count == 0 {
            varint[n] = byte;
            n += 1;
            break;
        }
        varint[n] = byte | 0x80;
        n += 1;
    }
    let start = COUNT_ROOM - n;
    buf[start..COUNT_ROOM].copy_from_slice(&varint[..n]);
    Bytes::from(buf).slice(start..)
}

/// About how many bytes a queued message holds (its payloads, plus a
/// little for the rest): what [`Outbox`] counts.
pub trait Weigh {
    /// Approximate size in memory while queued.
    fn weight(&self) -> usize;
}

pub(crate) const SMALL: usize = 32;

pub(crate) fn ids_weight(ids: &[u64]) -> usize {
    SMALL + 8 * ids.len()
}

impl Weigh for shoal_proto::ToClient {
    fn weight(&self) -> usize {
        use shoal_proto::ToClient as C;
        match self {
            C::Memory { value, .. } => SMALL + value.as_ref().map_or(0, |v| v.len()),
            C::QueryReply { json, .. } => SMALL + json.len(),
            C::Erred {
                error: shoal_proto::TaskError::Exception { error, .. },
                ..
            } => SMALL + error.len(),
            _ => SMALL,
        }
    }
}

impl Weigh for shoal_proto::ToWorker {
    fn weight(&self) -> usize {
        use shoal_proto::ToWorker as W;
        match self {
            W::Compute {
                func, args, deps, ..
            } => SMALL + func.len() + args.len() + 48 * deps.len(),
            W::Release(ids) | W::Steal(ids) => ids_weight(ids),
            _ => SMALL,
        }
    }
}

impl Weigh for shoal_proto::FromClient {
    fn weight(&self) -> usize {
        use shoal_proto::FromClient as C;
        match self {
            C::Submit(specs) => specs
                .iter()
                .map(|t| SMALL + t.func.len() + t.args.len() + 8 * t.deps.len())
                .sum(),
            C::Release(ids) | C::Cancel(ids) | C::Detach(ids) | C::Where(ids) => ids_weight(ids),
            C::Query { path, .. } => SMALL + path.len(),
            C::SubmitJob { tasks, .. } => tasks.iter().map(|t| SMALL + t.args.len()).sum(),
            C::Resubmit(tasks) => tasks
                .iter()
                .map(|(t, v)| {
                    SMALL
                        + t.func.len()
                        + t.args.len()
                        + 8 * t.deps.len()
                        + v.as_ref().map_or(0, |v| v.len())
                })
                .sum(),
            _ => SMALL,
        }
    }
}

impl Weigh for shoal_proto::FromWorker {
    fn weight(&self) -> usize {
        use shoal_proto::FromWorker as W;
        match self {
            W::Stolen(ids) | W::Started(ids) => ids_weight(ids),
            W::Finished { value, .. } => SMALL + value.as_ref().map_or(0, |v| v.len()),
            W::Failed { error, text, .. } => SMALL + error.len() + text.len(),
            W::Telemetry(_) => 4096,
            W::Rejoin {
                running,
                reports,
                held,
            } => {
                ids_weight(running)
                    + 16 * held.len()
                    + reports.iter().map(|r| r.weight()).sum::<usize>()
            }
            _ => SMALL,
        }
    }
}
