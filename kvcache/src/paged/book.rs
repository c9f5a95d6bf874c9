//! The bookkeeping of a page pool, apart from where the pages are stored: sequences, their page
//! tables, page reference counts and the free list. [`super::PagedKv`] (host pools) and, with the
//! `cuda` feature, [`super::cuda::DevicePagedKv`] (device pools) share it, so the two take the
//! same pages in the same order and differ only in how they copy and write rows.
//!
//! Operations that need a page copied (copy on write) return the `(from, to)` copies for the
//! owner of the storage to make; the tables already say `to`.

use std::collections::BTreeMap;
use std::ops::Range;

use super::{PagedKvConfig, SeqId};
use crate::Error;

#[derive(Debug, Clone)]
struct Seq {
    /// Page ids in token order; always `len.div_ceil(page_size)` of them.
    pages: Vec<u32>,
    len: usize,
}

/// A page copy the storage owner must make (every layer, K and V): `(from, to)`.
pub(crate) type PageCopy = (u32, u32);

/// See the module doc.
#[derive(Debug, Clone)]
pub(crate) struct PageBook {
    page_size: usize,
    refcount: Vec<u32>,
    /// Free page ids; the next one handed out is the last.
    free: Vec<u32>,
    seqs: BTreeMap<SeqId, Seq>,
    next_id: u64,
}

impl PageBook {
    /// Every page free (`config` already validated).
    pub(crate) fn new(config: &PagedKvConfig) -> Result<Self, Error> {
        let refcount = crate::try_zeroed::<u32>("paged kv refcounts", config.num_pages)?;
        let mut free = crate::try_zeroed::<u32>("paged kv free list", config.num_pages)?;
        for (slot, page) in free.iter_mut().zip((0..config.num_pages as u32).rev()) {
            *slot = page;
        }
        Ok(Self { page_size: config.page_size, refcount, free, seqs: BTreeMap::new(), next_id: 0 })
    }

    pub(crate) fn free_pages(&self) -> usize {
        self.free.len()
    }

    pub(crate) fn page_refcount(&self, page: u32) -> u32 {
        self.refcount.get(page as usize).copied().unwrap_or(0)
    }

    pub(crate) fn sequences(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.seqs.keys().copied()
    }

    pub(crate) fn allocate(&mut self) -> SeqId {
        let id = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(id, Seq { pages: Vec::new(), len: 0 });
        id
    }

    fn seq(&self, id: SeqId) -> Result<&Seq, Error> {
        self.seqs.get(&id).ok_or(Error::UnknownSequence(id.0))
    }

    pub(crate) fn len(&self, id: SeqId) -> Result<usize, Error> {
        Ok(self.seq(id)?.len)
    }

    pub(crate) fn page_table(&self, id: SeqId) -> Result<&[u32], Error> {
        Ok(&self.seq(id)?.pages)
    }

    pub(crate) fn fork(&mut self, id: SeqId) -> Result<SeqId, Error> {
        let pages = self.seq(id)?.clone();
        for &p in &pages.pages {
            self.refcount[p as usize] += 1;
        }
        let new = SeqId(self.next_id);
        self.next_id += 1;
        self.seqs.insert(new, pages);
        Ok(new)
    }

    pub(crate) fn free(&mut self, id: SeqId) -> Result<(), Error> {
        let seq = self.seqs.remove(&id).ok_or(Error::UnknownSequence(id.0))?;
        self.release(&seq.pages);
        Ok(())
    }

    fn release(&mut self, pages: &[u32]) {
        for &p in pages {
            self.refcount[p as usize] -= 1;
            if self.refcount[p as usize] == 0 {
                self.free.push(p);
            }
        }
    }

    pub(crate) fn truncate(&mut self, id: SeqId, len: usize) -> Result<(), Error> {
        let page_size = self.page_size;
        let seq = self.seqs.get_mut(&id).ok_or(Error::UnknownSequence(id.0))?;
        if len > seq.len {
            return Err(Error::OutOfRange(format!("truncate to {len} tokens a {}-token sequence", seq.len)));
        }
        let dropped = seq.pages.split_off(len.div_ceil(page_size));
        seq.len = len;
        self.release(&dropped);
        Ok(())
    }

    fn take_page(&mut self) -> u32 {
        let p = self.free.pop().expect("free pages were counted before taking");
        self.refcount[p as usize] = 1;
        p
    }

    /// Gives sequence `id` its own page in place of its `index`-th; returns the copy to make.
    fn unshare(&mut self, id: SeqId, index: usize) -> PageCopy {
        let old = self.seqs[&id].pages[index];
        let new = self.take_page();
        self.refcount[old as usize] -= 1;
        self.seqs.get_mut(&id).expect("checked").pages[index] = new;
        (old, new)
    }

    /// [`super::PagedKv::grow`]'s bookkeeping: the new positions, and the copy of a shared last
    /// page the new rows land in (at most one).
    pub(crate) fn grow(&mut self, id: SeqId, n: usize) -> Result<(Range<usize>, Option<PageCopy>), Error> {
        let page_size = self.page_size;
        let seq = self.seq(id)?;
        let (len, have) = (seq.len, seq.pages.len());
        let new_len = len
            .checked_add(n)
            .ok_or_else(|| Error::OutOfRange(format!("grow a {len}-token sequence by {n} tokens: overflows usize")))?;
        let new_pages = new_len.div_ceil(page_size) - have;
        let last_shared = n > 0 && len % page_size != 0 && self.refcount[seq.pages[have - 1] as usize] > 1;
        let needed = new_pages + usize::from(last_shared);
        if needed > self.free.len() {
            return Err(Error::OutOfPages { needed, free: self.free.len() });
        }
        let copy = last_shared.then(|| self.unshare(id, have - 1));
        for _ in 0..new_pages {
            let p = self.take_page();
            self.seqs.get_mut(&id).expect("checked").pages.push(p);
        }
        self.seqs.get_mut(&id).expect("checked").len = new_len;
        Ok((len..new_len, copy))
    }

    /// Before rows `start..start + n` of `id` are written: checks the range and un-shares the
    /// shared pages among them; returns the copies to make (none when `n` is 0).
    pub(crate) fn prepare_write(&mut self, id: SeqId, start: usize, n: usize) -> Result<Vec<PageCopy>, Error> {
        let page_size = self.page_size;
        let seq = self.seq(id)?;
        if start.checked_add(n).is_none_or(|end| end > seq.len) {
            return Err(Error::OutOfRange(format!("write of {n} rows from {start} in a {}-token sequence", seq.len)));
        }
        if n == 0 {
            return Ok(Vec::new());
        }
        let touched = start / page_size..(start + n - 1) / page_size + 1;
        let shared: Vec<usize> = touched.filter(|&i| self.refcount[seq.pages[i] as usize] > 1).collect();
        if shared.len() > self.free.len() {
            return Err(Error::OutOfPages { needed: shared.len(), free: self.free.len() });
        }
        Ok(shared.into_iter().map(|i| self.unshare(id, i)).collect())
    }
}
