//! Private KV (global segments, generated tokens) in fixed-size pages.
//!
//! Every layer has its own pool of `num_pages` pages of `page_size` token rows
//! (`[page_size, kv_heads, head_dim]` each); page `p` means the same slot in every layer, so one
//! page table per sequence serves all layers. Pages are reference-counted: [`PagedKv::fork`]
//! gives a new sequence the same page table (the G samples of a GRPO group share their prompt's
//! pages), and a write to a shared page first copies it (copy on write).
//!
//! Attention reads a sequence through a [`PagedKvView`] (page size, page table, the layer's page
//! storage), page by page, without gathering the sequence into one buffer.
//!
//! Every operation checks its input and either completes or returns a typed error having
//! changed nothing (in particular [`Error::OutOfPages`] is raised before any page is taken).

mod book;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(all(test, feature = "cuda"))]
mod cuda_tests;
#[cfg(all(test, feature = "cuda"))]
mod device_tests;
#[cfg(test)]
mod tests;

use crate::Error;
use book::PageBook;
use squid_cuda::Element;
use std::ops::Range;

/// Dims and capacity of a page pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagedKvConfig {
    /// Transformer layers (one pool each).
    pub layers: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Dims per head.
    pub head_dim: usize,
    /// Tokens per page.
    pub page_size: usize,
    /// Pages per layer.
    pub num_pages: usize,
}

impl PagedKvConfig {
    /// Elements of one token row (`kv_heads * head_dim`).
    /// (Saturating: a config [`PagedKv::new`] accepts never overflows.)
    pub fn row_len(&self) -> usize {
        self.kv_heads.saturating_mul(self.head_dim)
    }

    /// Elements of one page of one layer's K (or V).
    /// (Saturating, as [`PagedKvConfig::row_len`].)
    pub fn page_len(&self) -> usize {
        self.page_size.saturating_mul(self.row_len())
    }

    fn validate(&self) -> Result<(), Error> {
        let dims = [self.layers, self.kv_heads, self.head_dim, self.page_size, self.num_pages];
        if dims.contains(&0) {
            return Err(Error::InvalidConfig(format!("paged kv: every dim must be positive: {self:?}")));
        }
        if self.num_pages > u32::MAX as usize {
            return Err(Error::InvalidConfig(format!("paged kv: {} pages exceed u32 page ids", self.num_pages)));
        }
        if dims.iter().try_fold(2usize, |acc, &d| acc.checked_mul(d)).is_none() {
            return Err(Error::InvalidConfig(format!("paged kv: pool size overflows: {self:?}")));
        }
        Ok(())
    }
}

/// A sequence's handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(u64);

impl SeqId {
    /// The number inside (ids are never reused by one pool).
    pub fn raw(self) -> u64 {
        self.0
    }
}

/// The CUDA source of the device pools ([`cuda::DevicePages`], `cuda` feature): page copies and
/// row writes.
pub const KERNEL: squid_cuda::KernelSource = squid_cuda::kernel_source!(
    "kvcache_paged",
    "src/paged/paged.cu",
    ["squid_kv_copy_page", "squid_kv_write_rows"],
    fast_math = false
);

// The read view is defined by the consumer, squid-attention (see docs/ARCHITECTURE.md).
pub use squid_attention::paged::PagedKvView;

/// Reference-counted KV pages for many sequences.
#[derive(Debug, Clone)]
pub struct PagedKv<T: Element> {
    config: PagedKvConfig,
    /// Per layer, `[num_pages, page_size, kv_heads, head_dim]`.
    k: Vec<Vec<T>>,
    v: Vec<Vec<T>>,
    /// Sequences, page tables, reference counts, the free list.
    book: PageBook,
}

impl<T: Element> PagedKv<T> {
    /// Allocates the whole pool up front (zeroed).
    pub fn new(config: PagedKvConfig) -> Result<Self, Error> {
        config.validate()?;
        let pool = config
            .num_pages
            .checked_mul(config.page_len())
            .ok_or_else(|| Error::InvalidConfig(format!("paged kv: pool size overflows: {config:?}")))?;
        // Sizes from the caller: a pool the allocator refuses is an error, not an abort. The
        // pools are zeroed by the allocator (`T::default()` is all-zero bits for every element
        // type), so untouched pages cost no memory until written.
        let whole = pool.checked_mul(2 * config.layers).and_then(|n| n.checked_mul(std::mem::size_of::<T>()));
        if whole.is_none_or(|bytes| bytes > isize::MAX as usize) {
            return Err(Error::OutOfMemory { what: "paged kv pools", bytes: whole.unwrap_or(usize::MAX) });
        }
        let mut k = Vec::new();
        let mut v = Vec::new();
        for pools in [&mut k, &mut v] {
            pools.try_reserve_exact(config.layers).map_err(|_| Error::OutOfMemory {
                what: "paged kv layer list",
                bytes: config.layers.saturating_mul(std::mem::size_of::<Vec<T>>()),
            })?;
        }
        for _ in 0..config.layers {
            k.push(crate::try_zeroed::<T>("paged kv K pool", pool)?);
            v.push(crate::try_zeroed::<T>("paged kv V pool", pool)?);
        }
        let book = PageBook::new(&config)?;
        Ok(Self { config, k, v, book })
    }

    /// Its configuration.
    pub fn config(&self) -> &PagedKvConfig {
        &self.config
    }

    /// Pages not used by any sequence.
    pub fn free_pages(&self) -> usize {
        self.book.free_pages()
    }

    /// How many sequences share page `page` (0 when free).
    pub fn page_refcount(&self, page: u32) -> u32 {
        self.book.page_refcount(page)
    }

    /// Live sequences.
    pub fn sequences(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.book.sequences()
    }

    /// A new empty sequence (it takes pages as it grows).
    pub fn allocate(&mut self) -> SeqId {
        self.book.allocate()
    }

    /// Tokens in the sequence.
    pub fn len(&self, id: SeqId) -> Result<usize, Error> {
        self.book.len(id)
    }

    /// The sequence's page ids in token order.
    pub fn page_table(&self, id: SeqId) -> Result<&[u32], Error> {
        self.book.page_table(id)
    }

    /// A new sequence with the same tokens, sharing every page (copy on write).
    pub fn fork(&mut self, id: SeqId) -> Result<SeqId, Error> {
        self.book.fork(id)
    }

    /// Ends the sequence; pages no other sequence uses become free.
    pub fn free(&mut self, id: SeqId) -> Result<(), Error> {
        self.book.free(id)
    }

    /// Shortens the sequence to `len` tokens (e.g. rejected draft tokens); whole pages past the
    /// end are released.
    pub fn truncate(&mut self, id: SeqId, len: usize) -> Result<(), Error> {
        self.book.truncate(id, len)
    }

    /// Copies page `from` to page `to` in every layer, K and V (copy on write).
    fn copy_page(&mut self, (from, to): book::PageCopy) {
        let n = self.config.page_len();
        let (src, dst) = (from as usize * n, to as usize * n);
        for pool in self.k.iter_mut().chain(self.v.iter_mut()) {
            pool.copy_within(src..src + n, dst);
        }
    }

    /// Lengthens the sequence by `n` token rows and returns their positions; they must be
    /// written (by [`PagedKv::write`] for every layer) before they are read. Takes the new pages
    /// and un-shares a shared last page that the new rows would land in, so that the writes that
    /// follow never need a page.
    pub fn grow(&mut self, id: SeqId, n: usize) -> Result<Range<usize>, Error> {
        let (positions, copy) = self.book.grow(id, n)?;
        if let Some(copy) = copy {
            self.copy_page(copy);
        }
        Ok(positions)
    }

    fn rows_of(&self, what: &str, k: &[T], v: &[T], per_row: usize) -> Result<usize, Error> {
        if k.len() != v.len() || k.len() % per_row != 0 {
            return Err(Error::ShapeMismatch(format!(
                "{what}: K has {} and V {} elements; both must be whole rows of {per_row}",
                k.len(),
                v.len()
            )));
        }
        Ok(k.len() / per_row)
    }

    /// Writes layer `layer`'s rows for positions `start..start + n` (`k, v: [n, kv_heads,
    /// head_dim]`), all below the sequence's length. Shared pages among them are copied first.
    pub fn write(&mut self, id: SeqId, layer: usize, start: usize, k: &[T], v: &[T]) -> Result<(), Error> {
        let row = self.config.row_len();
        let page_size = self.config.page_size;
        let n = self.rows_of("paged write", k, v, row)?;
        if layer >= self.config.layers {
            return Err(Error::OutOfRange(format!("layer {layer} of {}", self.config.layers)));
        }
        for copy in self.book.prepare_write(id, start, n)? {
            self.copy_page(copy);
        }
        if n == 0 {
            return Ok(());
        }
        let pages = self.book.page_table(id)?;
        let (kp, vp) = (&mut self.k[layer], &mut self.v[layer]);
        let mut pos = start;
        while pos < start + n {
            let in_page = pos % page_size;
            let take = (page_size - in_page).min(start + n - pos);
            let dst = (pages[pos / page_size] as usize * page_size + in_page) * row;
            let src = (pos - start) * row;
            kp[dst..dst + take * row].copy_from_slice(&k[src..src + take * row]);
            vp[dst..dst + take * row].copy_from_slice(&v[src..src + take * row]);
            pos += take;
        }
        Ok(())
    }

    /// Appends `n` tokens to every layer: `k, v: [layers, n, kv_heads, head_dim]`. Returns their
    /// positions. All or nothing.
    pub fn append(&mut self, id: SeqId, k: &[T], v: &[T]) -> Result<Range<usize>, Error> {
        let layers = self.config.layers;
        // `layers x row` fits: `validate` checked the product of all the dims (times 2).
        let n = self.rows_of("paged append", k, v, layers * self.config.row_len())?;
        let positions = self.grow(id, n)?;
        let per_layer = n * self.config.row_len();
        for layer in 0..layers {
            let r = layer * per_layer..(layer + 1) * per_layer;
            self.write(id, layer, positions.start, &k[r.clone()], &v[r])
                .expect("grow made every row of the new range writable");
        }
        Ok(positions)
    }

    /// Layer `layer` of sequence `id`, read in place.
    pub fn view(&self, id: SeqId, layer: usize) -> Result<PagedKvView<'_, T>, Error> {
        if layer >= self.config.layers {
            return Err(Error::OutOfRange(format!("layer {layer} of {}", self.config.layers)));
        }
        Ok(PagedKvView {
            page_size: self.config.page_size,
            kv_heads: self.config.kv_heads,
            head_dim: self.config.head_dim,
            len: self.book.len(id)?,
            page_table: self.book.page_table(id)?,
            k_pages: &self.k[layer],
            v_pages: &self.v[layer],
        })
    }

    /// Copies layer `layer` of sequence `id` into contiguous `[len, kv_heads, head_dim]` K and V.
    pub fn gather(&self, id: SeqId, layer: usize) -> Result<(Vec<T>, Vec<T>), Error> {
        let view = self.view(id, layer)?;
        let (mut k, mut v) = (Vec::with_capacity(view.len * self.config.row_len()), Vec::new());
        v.reserve(k.capacity());
        for (_, kc, vc) in view.chunks() {
            k.extend_from_slice(kc);
            v.extend_from_slice(vc);
        }
        Ok((k, v))
    }
}
