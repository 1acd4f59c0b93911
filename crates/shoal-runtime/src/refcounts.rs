//! A client's count of live Python futures per task, kept compact: a
//! million held futures cost 4 bytes each here, not a dict entry's 42.

use rustc_hash::FxHashMap;

/// Ids per page: a client's own ids are sequential (`client << 40 | n`),
/// so its live tasks fill pages densely.
const PAGE: u64 = 4096;

/// Counts by task id: the client's own ids in pages of counters (a page
/// is freed when its last task goes), any other id (a task another client
/// submitted, adopted from a result) in a map.
pub struct RefCounts {
    /// This client's ids are those with these high bits (`id >> 40`).
    own: u64,
    pages: FxHashMap<u64, (Box<[u32]>, u32)>,
    other: FxHashMap<u64, u32>,
    live: usize,
}

impl RefCounts {
    /// `n` more futures of `id` (one table lookup: this runs per future).
    fn add(&mut self, id: u64, n: u32) {
        let (c, page_live) = if id >> 40 == self.own {
            let (counts, live) = self
                .pages
                .entry(id / PAGE)
                .or_insert_with(|| (vec![0; PAGE as usize].into_boxed_slice(), 0));
            (&mut counts[(id % PAGE) as usize], Some(live))
        } else {
            (self.other.entry(id).or_insert(0), None)
        };
        if *c == 0 {
            self.live += 1;
            if let Some(l) = page_live {
                *l += 1;
            }
        }
        *c = c.saturating_add(n);
    }
}

impl RefCounts {
    /// Counts for the client with this id.
    pub fn new(client_id: u64) -> Self {
        RefCounts {
            own: client_id,
            pages: FxHashMap::default(),
            other: FxHashMap::default(),
            live: 0,
        }
    }

    /// `n` more futures of task `id`.
    pub fn incref(&mut self, id: u64, n: u32) {
        self.add(id, n);
    }

    /// One more future of each task in `ids`.
    pub fn incref_many(&mut self, ids: Vec<u64>) {
        for id in ids {
            self.add(id, 1);
        }
    }

    /// One future of task `id` fewer; True when it was the last (the task
    /// is to be released). An unknown id is ignored (False).
    pub fn decref(&mut self, id: u64) -> bool {
        if id >> 40 != self.own {
            let Some(c) = self.other.get_mut(&id) else {
                return false;
            };
            *c -= 1; // entries are removed at zero: never found at zero
            if *c > 0 {
                return false;
            }
            self.other.remove(&id);
        } else {
            let page = id / PAGE;
            let Some((counts, live)) = self.pages.get_mut(&page) else {
                return false;
            };
            let c = &mut counts[(id % PAGE) as usize];
            if *c == 0 {
                return false;
            }
            *c -= 1;
            if *c > 0 {
                return false;
            }
            *live -= 1;
            if *live == 0 {
                self.pages.remove(&page);
            }
        }
        self.live -= 1;
        true
    }

    /// Whether a future of task `id` lives.
    pub fn contains(&self, id: u64) -> bool {
        if id >> 40 != self.own {
            return self.other.contains_key(&id);
        }
        self.pages
            .get(&(id / PAGE))
            .is_some_and(|p| p.0[(id % PAGE) as usize] > 0)
    }

    /// Tasks with live futures.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether no future lives.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// The tasks with live futures, in no order.
    pub fn ids(&self) -> Vec<u64> {
        let mut out: Vec<u64> = self.other.keys().copied().collect();
        for (&page, (counts, _)) in &self.pages {
            out.extend(
                counts
                    .iter()
                    .enumerate()
                    .filter(|(_, &c)| c > 0)
                    .map(|(i, _)| page * PAGE + i as u64),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_free_their_pages_and_keep_foreign_ids_apart() {
        let mut r = RefCounts::new(5);
        let base = 5u64 << 40;
        r.incref_many((0..10_000).map(|i| base + i).collect());
        r.incref(base + 3, 2);
        r.incref(7 << 40, 1); // another client's task, adopted
        assert_eq!(r.len(), 10_001);
        assert_eq!(r.pages.len(), 3);
        assert!(r.contains(base + 9_999) && r.contains(7 << 40));
        assert!(!r.contains(base + 10_000));
        assert!(!r.decref(base + 3) && !r.decref(base + 3));
        assert!(r.decref(base + 3), "the last of three");
        assert!(!r.decref(base + 3), "already gone");
        for i in 0..10_000 {
            r.decref(base + i);
        }
        assert!(r.pages.is_empty(), "empty pages are freed");
        assert_eq!(r.ids(), vec![7 << 40]);
        assert!(r.decref(7 << 40));
        assert_eq!(r.len(), 0);
        assert!(!r.decref(123), "unknown");
    }
}
