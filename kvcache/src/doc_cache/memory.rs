//! The memory tier: entries by key, a byte budget, least-recently-used eviction that skips
//! pinned entries and entries in use.

use super::DocKv;
use crate::DocKey;
use squid_cuda::Element;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

struct Slot<T: Element> {
    kv: Arc<DocKv<T>>,
    /// The tick of its last use: its place in `MemoryTier::by_age`.
    last_used: u64,
    /// Explicit pins ([`super::DocCache::pin`]); an entry is also kept while an `Arc` to it is held.
    pins: u32,
}

impl<T: Element> Slot<T> {
    fn evictable(&self) -> bool {
        self.pins == 0 && Arc::strong_count(&self.kv) == 1
    }
}

/// Entries, their total size and their order of last use.
pub(super) struct MemoryTier<T: Element> {
    budget: usize,
    slots: HashMap<DocKey, Slot<T>>,
    /// Last-use tick -> key, oldest first.
    by_age: BTreeMap<u64, DocKey>,
    clock: u64,
    bytes: usize,
}

impl<T: Element> MemoryTier<T> {
    pub(super) fn new(budget: usize) -> Self {
        Self { budget, slots: HashMap::new(), by_age: BTreeMap::new(), clock: 0, bytes: 0 }
    }

    pub(super) fn bytes(&self) -> usize {
        self.bytes
    }

    pub(super) fn len(&self) -> usize {
        self.slots.len()
    }

    pub(super) fn contains(&self, key: &DocKey) -> bool {
        self.slots.contains_key(key)
    }

    /// The entry, marked as just used.
    pub(super) fn get(&mut self, key: &DocKey) -> Option<Arc<DocKv<T>>> {
        let slot = self.slots.get_mut(key)?;
        self.by_age.remove(&slot.last_used);
        self.clock += 1;
        slot.last_used = self.clock;
        self.by_age.insert(self.clock, *key);
        Some(Arc::clone(&slot.kv))
    }

    /// Adds (or replaces) an entry as the most recently used, then evicts the least recently used
    /// evictable entries while over budget. Returns how many were evicted.
    pub(super) fn insert(&mut self, key: DocKey, kv: Arc<DocKv<T>>) -> u64 {
        let pins = self.remove(&key).map_or(0, |old| old.pins);
        self.clock += 1;
        self.bytes += kv.bytes();
        self.slots.insert(key, Slot { kv, last_used: self.clock, pins });
        self.by_age.insert(self.clock, key);
        self.evict_over_budget()
    }

    /// Evicts oldest-first, skipping pinned and in-use entries, until within budget.
    pub(super) fn evict_over_budget(&mut self) -> u64 {
        let mut evicted = 0;
        if self.bytes <= self.budget {
            return 0;
        }
        let candidates: Vec<DocKey> = self.by_age.values().copied().collect();
        for key in candidates {
            if self.bytes <= self.budget {
                break;
            }
            if self.slots[&key].evictable() {
                self.remove(&key);
                evicted += 1;
            }
        }
        evicted
    }

    fn remove(&mut self, key: &DocKey) -> Option<Slot<T>> {
        let slot = self.slots.remove(key)?;
        self.by_age.remove(&slot.last_used);
        self.bytes -= slot.kv.bytes();
        Some(slot)
    }

    /// Drops an entry from memory (the disk tier keeps its copy). False if it was not there.
    pub(super) fn forget(&mut self, key: &DocKey) -> bool {
        self.remove(key).is_some()
    }

    /// Adds one explicit pin. False if the entry is not in memory.
    pub(super) fn pin(&mut self, key: &DocKey) -> bool {
        self.slots.get_mut(key).map(|s| s.pins += 1).is_some()
    }

    /// Removes one explicit pin. False if the entry is not in memory or was not pinned.
    pub(super) fn unpin(&mut self, key: &DocKey) -> bool {
        match self.slots.get_mut(key) {
            Some(s) if s.pins > 0 => {
                s.pins -= 1;
                true
            }
            _ => false,
        }
    }
}
