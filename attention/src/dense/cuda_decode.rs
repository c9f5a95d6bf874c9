//! Decode on the device (feature `cuda`): split-KV (flash-decoding) over packed K/V
//! ([`decode`]) or pages ([`decode_paged`]), GQA-grouped, with a combine kernel; `decode.cu`
//! says how the kernels work and why they use FMA rather than mma.sync.
//!
//! Same semantics, validation and typed errors as [`super::decode`] / [`super::decode_paged`]:
//! `q [total_q, HQ, Dk]` on the device, `o [total_q, HQ, Dv]` and `lse [HQ, total_q]` written on
//! the device (into the caller's views by the `*_into` forms, into new buffers by the others;
//! inputs are [`DeviceView`]s of squid's or the caller's memory, launched on `gpu`'s stream);
//! `cu_seqlens` and page tables are host slices (the launcher plans the work from
//! them and uploads what the kernels read). Storage is bf16 or f16 ([`DecodeElement`]); f32
//! storage has no device decode (the CPU one takes it). `check_finite` copies the inputs the
//! CPU op would check back to the host and checks them there.

use half::{bf16, f16};
use squid_cuda::launch::{DeviceBuffer, DeviceCopy, DeviceView, DeviceViewMut, Gpu, LaunchDims};
use squid_cuda::Element;

use super::cuda::{
    alloc_outputs, check_finite_device, dense_schedule, expect_aligned, expect_outputs, fill_f32, zero_b16,
};
use super::{flash, validate_lens, DenseConfig, Dims, DECODE_KERNEL};
use crate::layout::rows_of;
use crate::{validate_cu_seqlens, Error};

/// The forward kernel's query positions per item for `cfg` (its GQA stacking decides it).
fn forward_tile(cfg: &DenseConfig) -> usize {
    let h = cfg.heads;
    flash::forward_tile_m(h.num_q_heads, h.num_kv_heads, h.head_dim_k)
}

/// Keys per tile (`SQUID_DEC_BK`).
pub const TILE_KEYS: usize = 32;
/// Query rows per work item (`SQUID_DEC_RB`).
pub const ITEM_ROWS: usize = 16;
/// Key splits per (sequence, kv head, row chunk) at most (`SQUID_DEC_MAX_SPLITS`: the combine
/// kernel keeps one weight per split in shared memory).
pub const MAX_SPLITS: usize = 64;
const THREADS: u32 = 128;
const HEADER: usize = 12;

/// How the device decode splits its work.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Key splits per (sequence, kv head, row chunk), capped at its tile count and at
    /// [`MAX_SPLITS`]; `None` picks them
    /// from the device's multiprocessor count (about two CTAs per SM in all, at least 4 tiles per
    /// split). Ignored when `batch_invariant` is set.
    pub num_splits: Option<usize>,
    /// Every row's output and lse depend only on its own query and the keys it sees, never on
    /// the other sequences of the batch, on `num_splits` or on how many tokens are decoded at
    /// once, and equal the prefill forward's ([`super::cuda::forward`]) row for the same query
    /// bit for bit: the decode runs the forward's tensor-core kernel over the new tokens (for
    /// the head dims it is compiled for, [`flash::HEAD_DIMS`]; the paged form first packs the
    /// sequences' pages into scratch, one extra copy of the K/V it reads). Other head dims run
    /// the split kernel with one split: batch invariant, but not the forward's bits (FMA in f32
    /// against the forward's mma.sync with P rounded to the storage type; within tolerance).
    pub batch_invariant: bool,
}

/// A storage type the decode kernels are compiled for.
pub trait DecodeElement: Element + DeviceCopy {
    /// Packed K/V entry.
    const PACKED: &'static str;
    /// Paged K/V entry.
    const PAGED: &'static str;
    /// Split-combine entry.
    const COMBINE: &'static str;
}

impl DecodeElement for bf16 {
    const PACKED: &'static str = "squid_decode_bf16";
    const PAGED: &'static str = "squid_decode_paged_bf16";
    const COMBINE: &'static str = "squid_decode_combine_bf16";
}

impl DecodeElement for f16 {
    const PACKED: &'static str = "squid_decode_f16";
    const PAGED: &'static str = "squid_decode_paged_f16";
    const COMBINE: &'static str = "squid_decode_combine_f16";
}

/// A device result: `o [total_q, HQ, Dv]`, `lse [HQ, total_q]` (natural log; `-inf` and `o = 0`
/// for a query that sees no key).
#[derive(Debug)]
pub struct DeviceDenseOutput<T> {
    /// The attention output.
    pub o: DeviceBuffer<T>,
    /// Log-sum-exp of the scaled scores.
    pub lse: DeviceBuffer<f32>,
}

/// One layer's page pools on the device, as [`crate::paged::PagedKvView`] describes them:
/// `[num_pages, page_size, kv_heads, head_dim]` each (views of squid's buffers or the caller's
/// memory).
#[derive(Debug, Clone)]
pub struct DevicePagedKv<'a, T> {
    /// Tokens per page.
    pub page_size: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Dims per head (K and V alike).
    pub head_dim: usize,
    /// The K pool.
    pub k_pages: DeviceView<'a, T>,
    /// The V pool.
    pub v_pages: DeviceView<'a, T>,
}

/// One sequence of a paged decode: its token count and page table, as its
/// [`crate::paged::PagedKvView`] has them.
#[derive(Debug, Clone, Copy)]
pub struct PagedSeq<'a> {
    /// Tokens of the sequence.
    pub len: usize,
    /// Its pages in token order.
    pub page_table: &'a [u32],
}

impl<'a, T> From<&crate::paged::PagedKvView<'a, T>> for PagedSeq<'a> {
    fn from(view: &crate::paged::PagedKvView<'a, T>) -> Self {
        Self { len: view.len, page_table: view.page_table }
    }
}

fn device_err(e: squid_cuda::Error) -> Error {
    Error::Device(e.to_string())
}

fn int(v: usize, what: &str) -> Result<i32, Error> {
    i32::try_from(v).map_err(|_| Error::Shape(format!("{what} = {v} exceeds the device kernels' i32 range")))
}

/// Per sequence `(q0, tq, kbase, tk)`: first query row, new tokens, first key row (packed) or
/// page-table offset (paged), cached tokens.
type SeqRow = [i32; 4];

/// The launch plan: meta (header, sequences, items, combine items) and its counts.
#[derive(Debug)]
struct Plan {
    meta: Vec<i32>,
    items: usize,
    combines: usize,
    slots: usize,
    /// (head, query) rows some item writes: the others see no key and are filled before.
    covered: usize,
}

/// Builds the work list: one item per (sequence, kv head, 16-row chunk, key split), items whose
/// rows see no key left out.
fn plan(
    cfg: &DenseConfig,
    opts: &DecodeOptions,
    seqs: &[SeqRow],
    total_q: usize,
    page_size: usize,
    sms: usize,
) -> Result<Plan, Error> {
    if opts.num_splits == Some(0) {
        return Err(Error::Config("num_splits = 0: a decode needs at least one split".into()));
    }
    let h = cfg.heads;
    let group = h.group();
    // (seq, g, row0, nrows, tile0, tile1)
    let mut base = Vec::new();
    for (s, &[_, tq, _, tk]) in seqs.iter().enumerate() {
        let (tq, tk) = (tq as usize, tk as usize);
        let rows = group * tq;
        for g in 0..h.num_kv_heads {
            for row0 in (0..rows).step_by(ITEM_ROWS) {
                let nrows = ITEM_ROWS.min(rows - row0);
                let (mut kmin, mut kmax) = (usize::MAX, 0);
                for r in row0..row0 + nrows {
                    let (lo, hi) = cfg.key_range(r % tq, tq, tk);
                    if lo < hi {
                        kmin = kmin.min(lo);
                        kmax = kmax.max(hi);
                    }
                }
                if kmin < kmax {
                    base.push([s, g, row0, nrows, kmin / TILE_KEYS, kmax.div_ceil(TILE_KEYS)]);
                }
            }
        }
    }
    let auto_splits = (2 * sms.max(1)).div_ceil(base.len().max(1));
    let mut items = Vec::new();
    let mut combines = Vec::new();
    let mut slots = 0usize;
    for &[s, g, row0, nrows, t0, t1] in &base {
        let tiles = t1 - t0;
        let n = if opts.batch_invariant {
            1
        } else {
            match opts.num_splits {
                Some(n) => n.clamp(1, tiles.min(MAX_SPLITS)),
                None => auto_splits.clamp(1, tiles.div_ceil(4).clamp(1, MAX_SPLITS)),
            }
        };
        if n == 1 {
            items.push([s, g, row0, nrows, t0, t1, usize::MAX]);
            continue;
        }
        combines.push([s, g, row0, nrows, slots, n]);
        for i in 0..n {
            items.push([s, g, row0, nrows, t0 + i * tiles / n, t0 + (i + 1) * tiles / n, slots + i]);
        }
        slots += n;
    }
    let seqs_at = HEADER;
    let items_at = seqs_at + 4 * seqs.len();
    let combine_at = items_at + 8 * items.len();
    let mut meta = vec![0i32; combine_at + 8 * combines.len()];
    let header = [
        h.num_q_heads,
        h.num_kv_heads,
        h.head_dim_k,
        h.head_dim_v,
        total_q,
        usize::from(cfg.causal),
        cfg.window.unwrap_or(0),
        page_size,
        group,
        seqs_at,
        items_at,
        combine_at,
    ];
    for (dst, (i, &v)) in meta.iter_mut().zip(header.iter().enumerate()) {
        *dst = int(
            v,
            ["HQ", "HKV", "Dk", "Dv", "total_q", "causal", "window", "page_size", "group", "meta", "meta", "meta"][i],
        )?;
    }
    for (s, row) in seqs.iter().enumerate() {
        meta[seqs_at + 4 * s..][..4].copy_from_slice(row);
    }
    for (i, it) in items.iter().enumerate() {
        let slot = if it[6] == usize::MAX { -1 } else { int(it[6], "split slots")? };
        let dst = &mut meta[items_at + 8 * i..][..8];
        for (d, &v) in dst.iter_mut().zip(&it[..6]) {
            *d = int(v, "work item")?;
        }
        dst[6] = slot;
    }
    for (i, c) in combines.iter().enumerate() {
        let dst = &mut meta[combine_at + 8 * i..][..8];
        for (d, &v) in dst.iter_mut().zip(c) {
            *d = int(v, "combine item")?;
        }
    }
    let covered = base.iter().map(|b| b[3]).sum();
    Ok(Plan { meta, items: items.len(), combines: combines.len(), slots, covered })
}

/// Dynamic shared memory of the split kernel (see the layout in `decode.cu`).
fn shared_bytes(dk: usize, dv: usize) -> u32 {
    let stride = |d: usize| if d % 2 == 1 { d + 1 } else { d + 2 };
    let halfs = TILE_KEYS * stride(dk) + TILE_KEYS * stride(dv) + ITEM_ROWS * stride(dk);
    let floats = ITEM_ROWS * TILE_KEYS + 3 * ITEM_ROWS;
    (2 * halfs + 4 * floats + 8 * 2 * TILE_KEYS) as u32
}

type SplitArgs<'a, T> = (
    &'a DeviceBuffer<i32>,
    DeviceView<'a, T>,
    DeviceView<'a, T>,
    DeviceView<'a, T>,
    &'a DeviceBuffer<u32>,
    DeviceViewMut<'a, T>,
    DeviceViewMut<'a, f32>,
    &'a mut DeviceBuffer<f32>,
    &'a mut DeviceBuffer<f32>,
    f32,
);

/// Inputs and outputs of one split-KV launch.
struct Tensors<'a, T> {
    q: DeviceView<'a, T>,
    k: DeviceView<'a, T>,
    v: DeviceView<'a, T>,
    o: DeviceViewMut<'a, T>,
    lse: DeviceViewMut<'a, f32>,
}

/// Uploads the plan, runs the split kernel and the combine kernel.
#[allow(clippy::too_many_arguments)]
fn run<T: DecodeElement>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    opts: &DecodeOptions,
    entry: &'static str,
    seqs: &[SeqRow],
    total_q: usize,
    page_size: usize,
    x: Tensors<'_, T>,
    page_table: &DeviceBuffer<u32>,
) -> Result<(), Error> {
    let h = cfg.heads;
    let Tensors { q, k, v, mut o, mut lse } = x;
    expect_outputs(cfg, total_q, o.len(), lse.len())?;
    // The split kernel reads Q, K and V rows in 4-byte words when their dims are even.
    let word = |d: usize| if d % 2 == 0 { 4 } else { 2 };
    expect_aligned("q", q.is_aligned(word(h.head_dim_k)), word(h.head_dim_k))?;
    expect_aligned("k", k.is_aligned(word(h.head_dim_k)), word(h.head_dim_k))?;
    expect_aligned("v", v.is_aligned(word(h.head_dim_v)), word(h.head_dim_v))?;
    expect_aligned("lse", lse.is_aligned(4), 4)?;
    let p = plan(cfg, opts, seqs, total_q, page_size, gpu.info().multiprocessors as usize)?;
    if p.covered < total_q * h.num_q_heads {
        zero_b16(gpu, o.reborrow())?;
        fill_f32(gpu, lse.reborrow(), f32::NEG_INFINITY)?;
    }
    if p.items == 0 {
        return Ok(());
    }
    let meta = gpu.upload(&p.meta).map_err(device_err)?;
    let mut part_o = gpu.zeros::<f32>((p.slots * ITEM_ROWS * h.head_dim_v).max(1)).map_err(device_err)?;
    let mut part_ml = gpu.zeros::<f32>((p.slots * ITEM_ROWS * 2).max(1)).map_err(device_err)?;
    let grid =
        |n: usize| u32::try_from(n).map_err(|_| Error::Shape(format!("{n} work items exceed one grid dimension")));
    let dims = LaunchDims {
        grid: (grid(p.items)?, 1, 1),
        block: (THREADS, 1, 1),
        shared_bytes: shared_bytes(h.head_dim_k, h.head_dim_v),
    };
    let scale_log2 = cfg.softmax_scale() * std::f32::consts::LOG2_E;
    // SAFETY: the entry is (const int* meta, const T* q, const T* k, const T* v, const unsigned*
    // page_table, T* o, float* lse, float* part_o, float* part_ml, float scale_log2). The plan
    // holds only validated sequences: query rows q0 + i < total_q, heads < HQ, key rows inside
    // the packed cache (cu_seqlens_k checked against its length) or pages checked to lie inside
    // both pools through a page table whose entries cover each sequence's length; o and lse
    // have the lengths checked above; partial slots < p.slots with ITEM_ROWS rows each; the
    // dynamic shared memory is what the layout needs.
    let kernel = unsafe { gpu.typed_kernel::<SplitArgs<'_, T>>(&DECODE_KERNEL, entry) }.map_err(device_err)?;
    let args = (&meta, q, k, v, page_table, o.reborrow(), lse.reborrow(), &mut part_o, &mut part_ml, scale_log2);
    kernel.launch(gpu, dims, args).map_err(device_err)?;
    if p.combines > 0 {
        // SAFETY: the entry is (const int* meta, const float* part_o, const float* part_ml, T* o,
        // float* lse); combine items name slots written above and rows of validated sequences.
        let combine = unsafe {
            gpu.typed_kernel::<(
                &DeviceBuffer<i32>,
                &DeviceBuffer<f32>,
                &DeviceBuffer<f32>,
                DeviceViewMut<'_, T>,
                DeviceViewMut<'_, f32>,
            )>(&DECODE_KERNEL, T::COMBINE)
        }
        .map_err(device_err)?;
        let dims = LaunchDims { grid: (grid(p.combines)?, 1, 1), block: (THREADS, 1, 1), shared_bytes: 0 };
        combine.launch(gpu, dims, (&meta, &part_o, &part_ml, o, lse)).map_err(device_err)?;
    }
    Ok(())
}

/// Whether the batch-invariant decode runs the prefill forward's kernel (so gets its bits).
fn forward_kernel_decodes(cfg: &DenseConfig, opts: &DecodeOptions) -> bool {
    opts.batch_invariant && flash::HEAD_DIMS.contains(&(cfg.heads.head_dim_k, cfg.heads.head_dim_v))
}

/// Device decode against a packed cache into the caller's `o` and `lse`: the semantics of
/// [`super::decode`] (bottom-right aligned masks, GQA, windows, Dk != Dv).
#[allow(clippy::too_many_arguments)]
pub fn decode_into<'a, 'b, T: DecodeElement>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    opts: &DecodeOptions,
    q: impl Into<DeviceView<'a, T>>,
    k_cache: impl Into<DeviceView<'a, T>>,
    v_cache: impl Into<DeviceView<'a, T>>,
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
    o: impl Into<DeviceViewMut<'b, T>>,
    lse: impl Into<DeviceViewMut<'b, f32>>,
) -> Result<(), Error> {
    let (q, k_cache, v_cache, o, lse) = (q.into(), k_cache.into(), v_cache.into(), o.into(), lse.into());
    let dims = validate_lens(cfg, q.len(), k_cache.len(), v_cache.len(), cu_seqlens_q, cu_seqlens_k)?;
    if opts.num_splits == Some(0) {
        return Err(Error::Config("num_splits = 0: a decode needs at least one split".into()));
    }
    if cfg.check_finite {
        check_finite_device(gpu, "q", &q)?;
        check_finite_device(gpu, "k", &k_cache)?;
        check_finite_device(gpu, "v", &v_cache)?;
    }
    int(dims.total_k, "total_k")?;
    int(dims.total_q, "total_q")?;
    if forward_kernel_decodes(cfg, opts) {
        let sched = dense_schedule(cfg, cu_seqlens_q, cu_seqlens_k, forward_tile(cfg))?;
        return super::cuda::forward_scheduled(gpu, cfg, dims, &sched, q, k_cache, v_cache, o, lse);
    }
    let seqs: Vec<SeqRow> = (0..dims.num_seqs)
        .map(|s| {
            let (q0, q1, k0, k1) = (cu_seqlens_q[s], cu_seqlens_q[s + 1], cu_seqlens_k[s], cu_seqlens_k[s + 1]);
            [q0 as i32, (q1 - q0) as i32, k0 as i32, (k1 - k0) as i32]
        })
        .collect();
    let no_pages = gpu.upload(&[0u32]).map_err(device_err)?;
    let x = Tensors { q, k: k_cache, v: v_cache, o, lse };
    run(gpu, cfg, opts, T::PACKED, &seqs, dims.total_q, 1, x, &no_pages)
}

/// Device decode against a packed cache, as [`decode_into`] with `o` and `lse` allocated on
/// `gpu`'s stream.
#[allow(clippy::too_many_arguments)]
pub fn decode<'a, T: DecodeElement>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    opts: &DecodeOptions,
    q: impl Into<DeviceView<'a, T>>,
    k_cache: impl Into<DeviceView<'a, T>>,
    v_cache: impl Into<DeviceView<'a, T>>,
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
) -> Result<DeviceDenseOutput<T>, Error> {
    let q = q.into();
    let total_q = rows_of("q", q.len(), cfg.heads.num_q_heads, cfg.heads.head_dim_k)?;
    let (mut o, mut lse) = alloc_outputs::<T>(gpu, cfg, total_q)?;
    decode_into(gpu, cfg, opts, q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, &mut o, &mut lse)?;
    Ok(DeviceDenseOutput { o, lse })
}

/// Device decode against paged K/V into the caller's `o` and `lse`, read in place through each
/// sequence's page table: the semantics of [`super::decode_paged`] (`Dk == Dv == head_dim`,
/// `HKV == kv_heads`).
#[allow(clippy::too_many_arguments)]
pub fn decode_paged_into<'a, 'b, T: DecodeElement>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    opts: &DecodeOptions,
    q: impl Into<DeviceView<'a, T>>,
    kv: &DevicePagedKv<'_, T>,
    seqs: &[PagedSeq<'_>],
    cu_seqlens_q: &[u32],
    o: impl Into<DeviceViewMut<'b, T>>,
    lse: impl Into<DeviceViewMut<'b, f32>>,
) -> Result<(), Error> {
    let q = q.into();
    cfg.validate()?;
    if opts.num_splits == Some(0) {
        return Err(Error::Config("num_splits = 0: a decode needs at least one split".into()));
    }
    let h = cfg.heads;
    let total_q = rows_of("q", q.len(), h.num_q_heads, h.head_dim_k)?;
    let num_seqs = validate_cu_seqlens(cu_seqlens_q, total_q)?;
    if seqs.len() != num_seqs {
        return Err(Error::Shape(format!("{} paged sequences for {num_seqs} sequences in cu_seqlens_q", seqs.len())));
    }
    if kv.kv_heads != h.num_kv_heads || kv.head_dim != h.head_dim_k || kv.head_dim != h.head_dim_v {
        return Err(Error::Shape(format!(
            "paged pools have {} kv heads of dim {}, the call expects {} of Dk {} / Dv {}",
            kv.kv_heads, kv.head_dim, h.num_kv_heads, h.head_dim_k, h.head_dim_v
        )));
    }
    let row = kv.kv_heads * kv.head_dim;
    if kv.page_size == 0 || row == 0 {
        return Err(Error::Cache(format!(
            "paged pools: page_size {}, kv_heads {}, head_dim {} must all be positive",
            kv.page_size, kv.kv_heads, kv.head_dim
        )));
    }
    let page_len = kv.page_size * row;
    let pages = (kv.k_pages.len() / page_len).min(kv.v_pages.len() / page_len);
    let mut tables = Vec::new();
    let mut rows = Vec::with_capacity(num_seqs);
    for (s, seq) in seqs.iter().enumerate() {
        let needed = seq.len.div_ceil(kv.page_size);
        if seq.page_table.len() < needed {
            return Err(Error::Cache(format!(
                "sequence {s}: {} pages of {} tokens cannot hold {} tokens",
                seq.page_table.len(),
                kv.page_size,
                seq.len
            )));
        }
        if let Some(p) = seq.page_table[..needed].iter().find(|&&p| p as usize >= pages) {
            return Err(Error::Cache(format!("sequence {s}: page {p} is outside the pools ({pages} pages)")));
        }
        let (q0, q1) = (cu_seqlens_q[s], cu_seqlens_q[s + 1]);
        rows.push([q0 as i32, (q1 - q0) as i32, int(tables.len(), "page tables")?, int(seq.len, "sequence length")?]);
        tables.extend_from_slice(&seq.page_table[..needed]);
    }
    int(total_q, "total_q")?;
    int(pages * kv.page_size, "pool tokens")?;
    if cfg.check_finite {
        check_finite_device(gpu, "q", &q)?;
    }
    if forward_kernel_decodes(cfg, opts) {
        return paged_through_forward(gpu, cfg, kv, seqs, cu_seqlens_q, total_q, q, o.into(), lse.into());
    }
    tables.push(0); // never empty
    let tables = gpu.upload(&tables).map_err(device_err)?;
    let x = Tensors { q, k: kv.k_pages.clone(), v: kv.v_pages.clone(), o: o.into(), lse: lse.into() };
    run(gpu, cfg, opts, T::PAGED, &rows, total_q, kv.page_size, x, &tables)
}

/// Device decode against paged K/V, as [`decode_paged_into`] with `o` and `lse` allocated on
/// `gpu`'s stream.
pub fn decode_paged<'a, T: DecodeElement>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    opts: &DecodeOptions,
    q: impl Into<DeviceView<'a, T>>,
    kv: &DevicePagedKv<'_, T>,
    seqs: &[PagedSeq<'_>],
    cu_seqlens_q: &[u32],
) -> Result<DeviceDenseOutput<T>, Error> {
    let q = q.into();
    let total_q = rows_of("q", q.len(), cfg.heads.num_q_heads, cfg.heads.head_dim_k)?;
    let (mut o, mut lse) = alloc_outputs::<T>(gpu, cfg, total_q)?;
    decode_paged_into(gpu, cfg, opts, q, kv, seqs, cu_seqlens_q, &mut o, &mut lse)?;
    Ok(DeviceDenseOutput { o, lse })
}

/// The batch-invariant paged decode: packs each sequence's keys and values (in token order,
/// through its page table) into scratch on the device, then runs the prefill forward kernel over
/// them, so every row has the forward's bits. The pages were checked by the caller.
#[allow(clippy::too_many_arguments)]
fn paged_through_forward<T: DecodeElement>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    kv: &DevicePagedKv<'_, T>,
    seqs: &[PagedSeq<'_>],
    cu_seqlens_q: &[u32],
    total_q: usize,
    q: DeviceView<'_, T>,
    o: DeviceViewMut<'_, T>,
    lse: DeviceViewMut<'_, f32>,
) -> Result<(), Error> {
    let row = kv.kv_heads * kv.head_dim;
    let mut cu_k = vec![0u32];
    let mut src_rows = Vec::new();
    for seq in seqs {
        for pos in 0..seq.len {
            let page = seq.page_table[pos / kv.page_size] as usize;
            src_rows.push(int(page * kv.page_size + pos % kv.page_size, "pool row")? as u32);
        }
        cu_k.push(u32::try_from(src_rows.len()).map_err(|_| Error::Shape("total keys exceed u32".into()))?);
    }
    let total_k = src_rows.len();
    int(total_k * row, "packed keys")?;
    let mut k = gpu.zeros::<T>(total_k * row).map_err(device_err)?;
    let mut v = gpu.zeros::<T>(total_k * row).map_err(device_err)?;
    if total_k > 0 {
        let src_rows = gpu.upload(&src_rows).map_err(device_err)?;
        // SAFETY: the entry is (const unsigned short* src, const unsigned* rows, unsigned short*
        // dst, long long tokens, int row) over 16-bit elements; every rows[t] names a token of a
        // page checked to lie inside both pools (so src row rows[t] of `row` elements is inside
        // them), and dst holds tokens * row elements.
        let gather = unsafe {
            gpu.typed_kernel::<(DeviceView<'_, T>, &DeviceBuffer<u32>, &mut DeviceBuffer<T>, i64, i32)>(
                &DECODE_KERNEL,
                "squid_decode_gather_rows_b16",
            )
        }
        .map_err(device_err)?;
        let dims = LaunchDims::linear(total_k * row, 256, 4096);
        let n = total_k as i64;
        gather.launch(gpu, dims, (kv.k_pages.clone(), &src_rows, &mut k, n, row as i32)).map_err(device_err)?;
        gather.launch(gpu, dims, (kv.v_pages.clone(), &src_rows, &mut v, n, row as i32)).map_err(device_err)?;
    }
    let dims = Dims { num_seqs: seqs.len(), total_q, total_k };
    let sched = dense_schedule(cfg, cu_seqlens_q, &cu_k, forward_tile(cfg))?;
    super::cuda::forward_scheduled(gpu, cfg, dims, &sched, q, k.view(), v.view(), o, lse)
}
