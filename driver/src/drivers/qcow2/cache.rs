//! The metadata table cache of a qcow2 node: L2 tables and refcount blocks, keyed by their
//! offset in the image file, each one cluster of raw (big-endian) bytes.
//!
//! A table is dirty from its first change until a metadata write-back stores the version it
//! took ([`TableCache::mark_clean`] compares versions, so a change made while the write-back
//! ran keeps the table dirty). Clean tables are evicted least recently used first once the
//! cache holds more than its budget; dirty ones stay until written back (the caller runs a
//! write-back when [`TableCache::over_budget`] stays true).

use std::collections::{BTreeMap, HashMap};

#[derive(Debug)]
struct Entry {
    data: Vec<u8>,
    /// 0 when clean; else the version of the last change.
    dirty: u64,
    used: u64,
}

/// A cache of cluster-sized tables.
#[derive(Debug)]
pub struct TableCache {
    map: HashMap<u64, Entry>,
    /// use tick → key, for least-recently-used eviction.
    lru: BTreeMap<u64, u64>,
    tick: u64,
    version: u64,
    budget: usize,
    dirty: usize,
}

impl TableCache {
    /// A cache that keeps at most `budget` clean tables.
    pub fn new(budget: usize) -> TableCache {
        TableCache {
            map: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            version: 0,
            budget: budget.max(2),
            dirty: 0,
        }
    }

    fn touch(&mut self, key: u64) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(e) = self.map.get_mut(&key) {
            self.lru.remove(&e.used);
            e.used = tick;
            self.lru.insert(tick, key);
        }
    }

    /// Whether `key` is cached.
    pub fn contains(&self, key: u64) -> bool {
        self.map.contains_key(&key)
    }

    /// The table at `key` (cached), marking it used.
    pub fn get(&mut self, key: u64) -> Option<&[u8]> {
        self.touch(key);
        self.map.get(&key).map(|e| e.data.as_slice())
    }

    /// The table at `key` for a change: it becomes dirty.
    pub fn get_mut(&mut self, key: u64) -> Option<&mut Vec<u8>> {
        self.touch(key);
        self.version += 1;
        let v = self.version;
        let e = self.map.get_mut(&key)?;
        if e.dirty == 0 {
            self.dirty += 1;
        }
        e.dirty = v;
        Some(&mut e.data)
    }

    /// Inserts a table read from the file (clean) or newly made (`dirty`).
    pub fn insert(&mut self, key: u64, data: Vec<u8>, dirty: bool) {
        self.remove(key);
        self.tick += 1;
        self.version += 1;
        if dirty {
            self.dirty += 1;
        }
        self.map.insert(
            key,
            Entry {
                data,
                dirty: if dirty { self.version } else { 0 },
                used: self.tick,
            },
        );
        self.lru.insert(self.tick, key);
        self.evict(Some(key));
    }

    /// Drops a table (its cluster was freed).
    pub fn remove(&mut self, key: u64) {
        if let Some(e) = self.map.remove(&key) {
            self.lru.remove(&e.used);
            if e.dirty != 0 {
                self.dirty -= 1;
            }
        }
    }

    /// Drops clean tables, least recently used first, down to the budget; never `keep` (the
    /// table a caller is about to use).
    fn evict(&mut self, keep: Option<u64>) {
        if self.map.len() <= self.budget {
            return;
        }
        let mut drop = Vec::new();
        let mut excess = self.map.len() - self.budget;
        for (_, key) in self.lru.iter() {
            if excess == 0 {
                break;
            }
            if Some(*key) != keep && self.map.get(key).is_some_and(|e| e.dirty == 0) {
                drop.push(*key);
                excess -= 1;
            }
        }
        for k in drop {
            self.remove(k);
        }
    }

    /// More tables than the budget are cached because dirty ones cannot be evicted.
    pub fn over_budget(&self) -> bool {
        self.map.len() > self.budget && self.dirty > 0
    }

    /// Copies of the dirty tables: `(key, version, data)`, in key order.
    pub fn dirty_tables(&self) -> Vec<(u64, u64, bytes::Bytes)> {
        let mut v: Vec<_> = self
            .map
            .iter()
            .filter(|(_, e)| e.dirty != 0)
            .map(|(k, e)| (*k, e.dirty, bytes::Bytes::copy_from_slice(&e.data)))
            .collect();
        v.sort_by_key(|t| t.0);
        v
    }

    /// Whether any table is dirty.
    pub fn any_dirty(&self) -> bool {
        self.dirty > 0
    }

    /// Marks `key` clean if it is still at `version` (written back), and evicts.
    pub fn mark_clean(&mut self, key: u64, version: u64) {
        if let Some(e) = self.map.get_mut(&key) {
            if e.dirty == version {
                e.dirty = 0;
                self.dirty -= 1;
            }
        }
        self.evict(None);
    }

    /// Tables cached now.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_tables_survive_eviction_and_a_change_during_write_back_keeps_them_dirty() {
        let mut c = TableCache::new(2);
        c.insert(0, vec![0; 8], true);
        c.insert(8, vec![0; 8], false);
        c.insert(16, vec![0; 8], false);
        // Budget 2: the clean least recently used (8) went; the dirty one stays.
        assert!(c.contains(0) && !c.contains(8) && c.contains(16));
        let snap = c.dirty_tables();
        assert_eq!(snap.len(), 1);
        c.get_mut(0).unwrap()[0] = 1;
        c.mark_clean(0, snap[0].1);
        assert_eq!(c.dirty_tables().len(), 1, "changed after the snapshot");
        let snap = c.dirty_tables();
        c.mark_clean(0, snap[0].1);
        assert!(!c.any_dirty());
    }
}
