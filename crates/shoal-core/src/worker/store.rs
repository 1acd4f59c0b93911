//! The results a worker keeps for transfers, and the rules about them: which
//! travel inline with their report and which stay here, what the Python
//! side's later word (written to a file, spilled, dropped) may change, and
//! which files releasing a result deletes.
//!
//! `B` is a result's pickled bytes as the services hold them.

use rustc_hash::{FxHashMap, FxHashSet};

/// Where this worker keeps a result, for transfers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stored<B> {
    /// Only the Python side has it: it is written to a file when asked for.
    Held,
    /// Pickled bytes in memory.
    Bytes(B),
    /// A file with the pickle: a shared-memory segment, or spilled to disk.
    File {
        /// Absolute path.
        path: String,
        /// Its length.
        len: u64,
    },
    /// Kept as an object that cannot be pickled: consumers elsewhere fail
    /// with this reason.
    Unpicklable(String),
}

impl<B: AsRef<[u8]>> Stored<B> {
    /// Bytes a transfer would move (0 when only the Python side knows).
    pub fn size(&self) -> u64 {
        match self {
            Stored::Bytes(b) => b.as_ref().len() as u64,
            Stored::File { len, .. } => *len,
            Stored::Held | Stored::Unpicklable(_) => 0,
        }
    }
}

/// Whether a result pickled into `len` bytes travels inline with its
/// report (the scheduler keeps it; `limit` is the protocol's inline limit)
/// rather than being kept by the worker for peers to fetch. Decided before
/// the store is locked: most results of tiny tasks never touch it.
pub fn travels_inline(len: usize, limit: usize) -> bool {
    len <= limit
}

/// The worker's results (see the module's documentation).
pub struct Results<B> {
    kept: FxHashMap<u64, Stored<B>>,
    /// Results copied here from a retiring peer: their files are this
    /// side's to delete (the Python side never saw them).
    copied: FxHashSet<u64>,
}

impl<B> Default for Results<B> {
    fn default() -> Self {
        Results {
            kept: FxHashMap::default(),
            copied: FxHashSet::default(),
        }
    }
}

impl<B: AsRef<[u8]>> Results<B> {
    /// A task finished and its result stays here (see [`travels_inline`]):
    /// as pickled bytes, in a file, or held as the Python object
    /// (`Stored::Held`).
    pub fn finished(&mut self, id: u64, stored: Stored<B>) {
        self.kept.insert(id, stored);
    }

    /// The Python side's later word on a result: written to a file or
    /// spilled (`Some`), or it could not / let it go (`None`: forgotten).
    /// A result released meanwhile stays released. Returns whether it is
    /// still kept.
    pub fn update(&mut self, id: u64, now: Option<Stored<B>>) -> bool {
        match now {
            Some(v) if self.kept.contains_key(&id) => {
                self.kept.insert(id, v);
                true
            }
            _ => {
                self.kept.remove(&id);
                false
            }
        }
    }

    /// A copy of a retiring peer's result, in a file this side made.
    pub fn replicated(&mut self, id: u64, path: String, len: u64) {
        self.kept.insert(id, Stored::File { path, len });
        self.copied.insert(id);
    }

    /// The scheduler dropped these results: forgotten here; returns the
    /// files to delete (copies this side made; the Python side deletes
    /// its own).
    pub fn release(&mut self, ids: &[u64]) -> Vec<String> {
        let mut delete = Vec::new();
        for id in ids {
            let gone = self.kept.remove(id);
            if let (true, Some(Stored::File { path, .. })) = (self.copied.remove(id), gone) {
                delete.push(path);
            }
        }
        delete
    }

    /// What is kept of `id`.
    pub fn get(&self, id: u64) -> Option<&Stored<B>> {
        self.kept.get(&id)
    }

    /// Whether `id` is kept.
    pub fn contains(&self, id: u64) -> bool {
        self.kept.contains_key(&id)
    }

    /// Every kept result with its size, ids in order (what a worker that
    /// rejoins its scheduler says it holds).
    pub fn held(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self.kept.iter().map(|(&id, s)| (id, s.size())).collect();
        v.sort_unstable();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r() -> Results<Vec<u8>> {
        Results::default()
    }

    #[test]
    fn small_pickles_travel_inline_and_large_ones_stay() {
        let mut s = r();
        assert!(travels_inline(4, 4), "inline: the scheduler keeps it");
        assert!(!travels_inline(5, 4));
        s.finished(2, Stored::Bytes(vec![2; 5]));
        assert_eq!(s.get(2), Some(&Stored::Bytes(vec![2; 5])));
        assert_eq!(s.held(), vec![(2, 5)]);
    }

    #[test]
    fn a_late_word_on_a_released_result_does_not_bring_it_back() {
        let mut s = r();
        s.finished(1, Stored::Held);
        let file = Stored::File {
            path: "/dev/shm/x".into(),
            len: 9,
        };
        assert!(s.update(1, Some(file.clone())), "written to a file");
        assert_eq!(s.get(1), Some(&file));
        assert_eq!(s.release(&[1]), Vec::<String>::new(), "Python's own file");
        assert!(
            !s.update(1, Some(file)),
            "released meanwhile: stays released"
        );
        assert!(!s.contains(1));
        s.finished(2, Stored::Held);
        assert!(!s.update(2, None), "could not be written: forgotten");
        assert!(!s.contains(2));
    }

    #[test]
    fn releasing_a_copy_made_for_a_retiring_peer_deletes_its_file_once() {
        let mut s = r();
        s.replicated(7, "/dev/shm/copy-7".into(), 100);
        s.finished(8, Stored::Unpicklable("a lock".into()));
        assert_eq!(s.held(), vec![(7, 100), (8, 0)]);
        assert_eq!(s.release(&[7, 8, 9]), vec!["/dev/shm/copy-7".to_string()]);
        assert_eq!(s.release(&[7]), Vec::<String>::new(), "once");
        // A copy later replaced by the task's own result is still ours.
        s.replicated(3, "/dev/shm/copy-3".into(), 1);
        s.finished(3, Stored::Bytes(vec![0; 9]));
        assert_eq!(s.release(&[3]), Vec::<String>::new(), "not a file any more");
    }
}
