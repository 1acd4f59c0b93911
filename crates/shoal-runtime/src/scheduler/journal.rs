//! The scheduler's journal (`shoal scheduler --journal FILE`): what a
//! scheduler started again after a crash needs to restore its jobs.
//!
//! An append-only file: a header, then records, each `u32` length, `u32`
//! CRC-32 of the body, postcard body. Records are appended as events
//! happen and written out at the end of each batch of events (one write;
//! a process crash loses nothing written), and the file is fsynced once a
//! second (a machine crash loses at most that second). Loading stops at
//! the first record that is cut short or fails its checksum and truncates
//! the file there: a crash at any byte loses at most the events after it,
//! never what came before. The file is rewritten compactly (the live state
//! as one record per job, written beside it, fsynced, renamed over it) at
//! every start and whenever it has grown four times past its last compact
//! size.
//!
//! What is journaled: jobs (`shoal submit`) with their tasks, and how each
//! task ended. Not journaled: tasks of Python clients, results, workers.

use super::jobs::JobSnapshot;
use serde::{Deserialize, Serialize};
use shoal_proto::TaskSpec;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const MAGIC: &[u8; 8] = b"SHOALJ1\n";

/// Smallest size at which the journal is compacted while running.
const COMPACT_MIN: u64 = 64 << 20;

/// How often the file is fsynced.
const SYNC_EVERY: Duration = Duration::from_secs(1);

/// One journal entry.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub(super) enum Record {
    /// A job was submitted: `ids` are `(job task id, scheduler task id)`.
    Job {
        id: u32,
        name: String,
        max_fails: u32,
        submitted_us: u64,
        ids: Vec<(u64, u64)>,
        tasks: Vec<TaskSpec>,
    },
    /// A job's task ended (0 finished, 1 failed, 2 cancelled).
    Ended {
        task: u64,
        outcome: u8,
        error: Option<String>,
        at_us: u64,
    },
    /// A job as a whole (what compaction writes).
    Snapshot(JobSnapshot),
}

/// An open journal, appending.
pub(super) struct Journal {
    path: PathBuf,
    file: File,
    buf: Vec<u8>,
    size: u64,
    compact_size: u64,
    dirty: bool,
    last_sync: Instant,
}

fn encode_record(r: &Record, out: &mut Vec<u8>) {
    let body = shoal_proto::encode(r);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    out.extend_from_slice(&body);
}

/// The records of a journal's bytes up to the first damaged one, and the
/// length of that valid prefix.
fn parse(bytes: &[u8]) -> (Vec<Record>, usize) {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        return (Vec::new(), 0);
    }
    let mut pos = MAGIC.len();
    let mut out = Vec::new();
    while bytes.len() - pos >= 8 {
        let len = u32::from_le_bytes(bytes[pos..pos + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[pos + 4..pos + 8].try_into().expect("4 bytes"));
        let Some(body) = bytes.get(pos + 8..pos + 8 + len) else {
            break;
        };
        if crc32fast::hash(body) != crc {
            break;
        }
        match shoal_proto::decode::<Record>(body) {
            Ok(r) => out.push(r),
            Err(_) => break,
        }
        pos += 8 + len;
    }
    (out, pos)
}

impl Journal {
    /// Opens (or creates) the journal at `path`; returns it with the records
    /// it held. A damaged tail is cut off, with a warning.
    pub(super) fn open(path: &Path) -> io::Result<(Journal, Vec<Record>)> {
        let mut bytes = Vec::new();
        match File::open(path) {
            Ok(mut f) => {
                f.read_to_end(&mut bytes)?;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot read the journal {}: {e}", path.display()),
                ))
            }
        }
        // Empty, or cut inside the header (a crash as it was made): new.
        let fresh = bytes.len() < MAGIC.len() && MAGIC.starts_with(&bytes);
        if !fresh && (bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is not a Shoal journal (give a new path, or remove the file)",
                    path.display()
                ),
            ));
        }
        let (records, valid) = parse(&bytes);
        if !fresh && valid < bytes.len() {
            tracing::warn!(
                "journal {}: the last {} bytes are incomplete or damaged (a crash while \
                 writing); dropped, {} records kept",
                path.display(),
                bytes.len() - valid,
                records.len()
            );
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot open the journal {}: {e}", path.display()),
                )
            })?;
        let mut j = Journal {
            path: path.to_path_buf(),
            file,
            buf: Vec::new(),
            size: bytes.len() as u64,
            compact_size: 0,
            dirty: false,
            last_sync: Instant::now(),
        };
        if fresh {
            j.file.set_len(0)?;
            j.file.write_all(MAGIC)?;
            j.size = MAGIC.len() as u64;
        } else if valid < bytes.len() {
            j.file.set_len(valid as u64)?;
            j.size = valid as u64;
        }
        Ok((j, records))
    }

    /// Queues a record (written by the next [`Journal::flush`]).
    pub(super) fn append(&mut self, r: &Record) {
        encode_record(r, &mut self.buf);
    }

    /// Writes what was queued (one write). An error is logged: the
    /// scheduler runs on, the journal stops being complete.
    pub(super) fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        match self.file.write_all(&self.buf) {
            Ok(()) => {
                self.size += self.buf.len() as u64;
                self.dirty = true;
            }
            Err(e) => tracing::error!(
                "cannot write the journal {}: {e}; what happens now is not journaled",
                self.path.display()
            ),
        }
        self.buf.clear();
        if self.last_sync.elapsed() >= SYNC_EVERY {
            self.sync();
        }
    }

    /// fsyncs what was written (called at least once a second while
    /// anything is written).
    pub(super) fn sync(&mut self) {
        if self.dirty {
            let _ = self.file.sync_data();
            self.dirty = false;
        }
        self.last_sync = Instant::now();
    }

    /// Whether it is time to compact (four times its compact size, and at
    /// least [`COMPACT_MIN`]).
    pub(super) fn wants_compaction(&self) -> bool {
        self.size >= COMPACT_MIN && self.size >= 4 * self.compact_size
    }

    /// Replaces the file with `records` (the live state): written beside
    /// it, fsynced, renamed over it.
    pub(super) fn rewrite(&mut self, records: &[Record]) -> io::Result<()> {
        let tmp = self.path.with_extension("compacting");
        let mut bytes = MAGIC.to_vec();
        for r in records {
            encode_record(r, &mut bytes);
        }
        {
            let mut f = File::create(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            if let Ok(d) = File::open(if dir.as_os_str().is_empty() {
                Path::new(".")
            } else {
                dir
            }) {
                let _ = d.sync_all();
            }
        }
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.size = bytes.len() as u64;
        self.compact_size = self.size;
        self.buf.clear();
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ended(task: u64) -> Record {
        Record::Ended {
            task,
            outcome: 0,
            error: None,
            at_us: task,
        }
    }

    #[test]
    fn records_survive_a_reopen_and_a_cut_at_any_byte_keeps_the_whole_ones_before_it() {
        let dir = std::env::temp_dir().join(format!("shoal-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("j");
        let _ = std::fs::remove_file(&path);
        let (mut j, old) = Journal::open(&path).unwrap();
        assert!(old.is_empty());
        let all: Vec<Record> = (0..20).map(ended).collect();
        for r in &all {
            j.append(r);
            j.flush();
        }
        drop(j);
        let full = std::fs::read(&path).unwrap();
        let (_, back) = Journal::open(&path).unwrap();
        assert_eq!(back, all);
        // Cut at every byte: exactly the records wholly before the cut load,
        // and the file is truncated to them.
        let mut ends = vec![MAGIC.len()];
        let mut buf = Vec::new();
        for r in &all {
            encode_record(r, &mut buf);
            ends.push(MAGIC.len() + buf.len());
        }
        for cut in MAGIC.len()..full.len() {
            std::fs::write(&path, &full[..cut]).unwrap();
            let (mut j, got) = Journal::open(&path).unwrap();
            let whole = ends.iter().filter(|&&e| e <= cut).count() - 1;
            assert_eq!(got, all[..whole], "cut at {cut}");
            // It appends after the good prefix.
            j.append(&ended(99));
            j.flush();
            drop(j);
            let (_, again) = Journal::open(&path).unwrap();
            assert_eq!(again.len(), whole + 1);
        }
        // A flipped bit ends the journal at that record.
        let mut bad = full.clone();
        bad[ends[5] + 9] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert_eq!(Journal::open(&path).unwrap().1, all[..5]);
        // Not a journal at all: refused, not overwritten.
        std::fs::write(&path, b"hello").unwrap();
        assert!(Journal::open(&path).is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"hello");
        // Compaction replaces the file.
        std::fs::remove_file(&path).unwrap();
        let (mut j, _) = Journal::open(&path).unwrap();
        j.append(&ended(1));
        j.flush();
        j.rewrite(&[ended(7)]).unwrap();
        j.append(&ended(8));
        j.flush();
        drop(j);
        assert_eq!(Journal::open(&path).unwrap().1, vec![ended(7), ended(8)]);
        let _ = std::fs::remove_dir_all(dir);
    }
}
