//! [`DevicePages`]: the device counterpart of [`PagedKv`](super::PagedKv), with the same page
//! bookkeeping (`PageBook` in `paged/book.rs`: the same pages taken in the same order) and the page
//! pools in device buffers. Rows are written and shared pages copied by kernels on the caller's
//! stream; the page tables stay on the host, where the paged decode
//! ([`squid_attention::segments::cuda_decode::decode_global_paged`]) takes them with
//! [`DevicePages::pools`] for a layer.
//!
//! Every operation checks its input before touching anything; a device error (a failed launch)
//! after the bookkeeping was updated leaves the pools unspecified (the error says so).

use std::ops::Range;

use squid_attention::dense::cuda_decode::DevicePagedKv;
use squid_cuda::launch::{DeviceBuffer, DeviceCopy, DeviceView, DeviceViewMut, Gpu, LaunchDims};
use squid_cuda::Element;

use super::book::{PageBook, PageCopy};
use super::{PagedKvConfig, SeqId, KERNEL};
use crate::Error;

/// Threads per block of both kernels.
const BLOCK: u32 = 256;
/// Most blocks per launch (grid-stride beyond).
const MAX_BLOCKS: usize = 1024;

fn grid(n: usize) -> u32 {
    n.div_ceil(BLOCK as usize).clamp(1, MAX_BLOCKS) as u32
}

/// 16-bit units per element (the kernels' addressing unit).
fn units<T>() -> usize {
    std::mem::size_of::<T>() / 2
}

/// Reference-counted KV pages on a device; see the module doc.
#[derive(Debug)]
pub struct DevicePages<T> {
    config: PagedKvConfig,
    /// Per layer, `[num_pages, page_size, kv_heads, head_dim]`.
    k: Vec<DeviceBuffer<T>>,
    v: Vec<DeviceBuffer<T>>,
    book: PageBook,
}

impl<T: Element + DeviceCopy> DevicePages<T> {
    /// Allocates every layer's K and V pool on `gpu` (zeroed).
    pub fn new(gpu: &Gpu, config: PagedKvConfig) -> Result<Self, Error> {
        config.validate()?;
        if !matches!(std::mem::size_of::<T>(), 2 | 4) {
            return Err(Error::InvalidConfig(format!(
                "device pages hold 2- or 4-byte elements, not {}",
                std::any::type_name::<T>()
            )));
        }
        let pool = config
            .num_pages
            .checked_mul(config.page_len())
            .ok_or_else(|| Error::InvalidConfig(format!("paged kv: pool size overflows: {config:?}")))?;
        let book = PageBook::new(&config)?;
        let (mut k, mut v) = (Vec::with_capacity(config.layers), Vec::with_capacity(config.layers));
        for _ in 0..config.layers {
            k.push(gpu.zeros::<T>(pool)?);
            v.push(gpu.zeros::<T>(pool)?);
        }
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

    /// A new empty sequence.
    pub fn allocate(&mut self) -> SeqId {
        self.book.allocate()
    }

    /// Tokens in the sequence.
    pub fn len(&self, id: SeqId) -> Result<usize, Error> {
        self.book.len(id)
    }

    /// The sequence's page ids in token order (what the paged decode takes, with [`Self::pools`]).
    pub fn page_table(&self, id: SeqId) -> Result<&[u32], Error> {
        self.book.page_table(id)
    }

    /// A new sequence sharing every page of `id` (copy on write).
    pub fn fork(&mut self, id: SeqId) -> Result<SeqId, Error> {
        self.book.fork(id)
    }

    /// Ends the sequence; pages no other sequence uses become free.
    pub fn free(&mut self, id: SeqId) -> Result<(), Error> {
        self.book.free(id)
    }

    /// Shortens the sequence to `len` tokens; whole pages past the end are released.
    pub fn truncate(&mut self, id: SeqId, len: usize) -> Result<(), Error> {
        self.book.truncate(id, len)
    }

    /// Layer `layer`'s K and V pools.
    pub fn layer(&self, layer: usize) -> Result<(&DeviceBuffer<T>, &DeviceBuffer<T>), Error> {
        match (self.k.get(layer), self.v.get(layer)) {
            (Some(k), Some(v)) => Ok((k, v)),
            _ => Err(Error::OutOfRange(format!("layer {layer} of {}", self.config.layers))),
        }
    }

    /// Layer `layer`'s pools as the paged decode reads them.
    pub fn pools(&self, layer: usize) -> Result<DevicePagedKv<'_, T>, Error> {
        let (k, v) = self.layer(layer)?;
        Ok(DevicePagedKv {
            page_size: self.config.page_size,
            kv_heads: self.config.kv_heads,
            head_dim: self.config.head_dim,
            k_pages: k.view(),
            v_pages: v.view(),
        })
    }

    /// Makes the page copies the bookkeeping asked for, in every pool.
    fn copy_pages(&mut self, gpu: &Gpu, copies: &[PageCopy]) -> Result<(), Error> {
        let n = self.config.page_len() * units::<T>();
        for &(from, to) in copies {
            for pool in self.k.iter_mut().chain(self.v.iter_mut()) {
                // SAFETY: (u16* pool, long long from, long long to, long long n): grid-stride over i < n
                // = page_len units, reading pool[from n + i] and writing pool[to n + i]; from, to <
                // num_pages (page ids from the book), and the pool holds num_pages * page_len
                // elements = num_pages * n units. from != to (a copy goes to a newly taken page).
                let k = unsafe {
                    gpu.typed_kernel::<(DeviceViewMut<'_, T>, i64, i64, i64)>(&KERNEL, "squid_kv_copy_page")
                }?;
                k.launch(
                    gpu,
                    LaunchDims::per_row(grid(n), BLOCK),
                    (pool.view_mut(), from as i64, to as i64, n as i64),
                )?;
            }
        }
        Ok(())
    }

    /// Lengthens the sequence by `n` rows and returns their positions (to be written with
    /// [`Self::write`] in every layer); a shared last page the new rows land in is copied first.
    pub fn grow(&mut self, gpu: &Gpu, id: SeqId, n: usize) -> Result<Range<usize>, Error> {
        let (positions, copy) = self.book.grow(id, n)?;
        if let Some(copy) = copy {
            self.copy_pages(gpu, &[copy])?;
        }
        Ok(positions)
    }

    fn rows_of(&self, what: &str, k: usize, v: usize, per_row: usize) -> Result<usize, Error> {
        if k != v || k % per_row != 0 {
            return Err(Error::ShapeMismatch(format!(
                "{what}: K has {k} and V {v} elements; both must be whole rows of {per_row}"
            )));
        }
        Ok(k / per_row)
    }

    /// Writes layer `layer`'s device rows for positions `start..start + n` (`k, v: [n, kv_heads,
    /// head_dim]`), all below the sequence's length; shared pages among them are copied first.
    pub fn write<'k, 'v>(
        &mut self,
        gpu: &Gpu,
        id: SeqId,
        layer: usize,
        start: usize,
        k: impl Into<DeviceView<'k, T>>,
        v: impl Into<DeviceView<'v, T>>,
    ) -> Result<(), Error> {
        let (k, v) = (k.into(), v.into());
        let row = self.config.row_len();
        let n = self.rows_of("device paged write", k.len(), v.len(), row)?;
        if layer >= self.config.layers {
            return Err(Error::OutOfRange(format!("layer {layer} of {}", self.config.layers)));
        }
        let copies = self.book.prepare_write(id, start, n)?;
        self.copy_pages(gpu, &copies)?;
        if n == 0 {
            return Ok(());
        }
        self.write_rows(gpu, id, layer, start, n, k, v)
    }

    /// The row writes of [`Self::write`] after its checks.
    #[allow(clippy::too_many_arguments)]
    fn write_rows(
        &mut self,
        gpu: &Gpu,
        id: SeqId,
        layer: usize,
        start: usize,
        n: usize,
        k: DeviceView<'_, T>,
        v: DeviceView<'_, T>,
    ) -> Result<(), Error> {
        let row = self.config.row_len() * units::<T>();
        let n_units = n * row;
        let table = gpu.upload(self.book.page_table(id)?)?;
        // SAFETY: (u16* pool, const u16* rows, const u32* pages, long long start, long long n_units,
        // long long row, long long page_size): grid-stride over i < n_units = n rows of `row` units
        // (= len(rows) in units, checked by rows_of); position start + i / row < the sequence's
        // length (checked by prepare_write), so its page index is < len(pages) and the page id <
        // num_pages; the slot is inside the pool.
        let kernel = unsafe {
            gpu.typed_kernel::<(DeviceViewMut<'_, T>, DeviceView<'_, T>, &DeviceBuffer<u32>, i64, i64, i64, i64)>(
                &KERNEL,
                "squid_kv_write_rows",
            )
        }?;
        let dims = LaunchDims::per_row(grid(n_units), BLOCK);
        let page_size = self.config.page_size as i64;
        for (pool, rows) in [(&mut self.k[layer], k), (&mut self.v[layer], v)] {
            kernel.launch(
                gpu,
                dims,
                (pool.view_mut(), rows, &table, start as i64, n_units as i64, row as i64, page_size),
            )?;
        }
        Ok(())
    }

    /// Appends `n` tokens to every layer from device rows `k, v: [layers, n, kv_heads, head_dim]`;
    /// returns their positions. Checked before anything changes.
    pub fn append<'k, 'v>(
        &mut self,
        gpu: &Gpu,
        id: SeqId,
        k: impl Into<DeviceView<'k, T>>,
        v: impl Into<DeviceView<'v, T>>,
    ) -> Result<Range<usize>, Error> {
        let (k, v) = (k.into(), v.into());
        let layers = self.config.layers;
        // `layers x row` fits: `validate` checked the product of all the dims (times 2).
        let n = self.rows_of("device paged append", k.len(), v.len(), layers * self.config.row_len())?;
        let positions = self.grow(gpu, id, n)?;
        if n == 0 {
            return Ok(positions);
        }
        let per_layer = n * self.config.row_len();
        for layer in 0..layers {
            let r = layer * per_layer..(layer + 1) * per_layer;
            self.write_rows(gpu, id, layer, positions.start, n, k.slice(r.clone())?, v.slice(r)?)?;
        }
        Ok(positions)
    }
}
