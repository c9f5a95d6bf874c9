//! The CPU path: flash-style tiles with an online softmax, never a `T x T` matrix.
//!
//! Keys and values are first packed once per call into f32 tiles of [`BK`] keys per
//! (sequence, kv head) - transposed where a matrix product wants them so - so the hot loops
//! are register-tiled f32 multiply-adds ([`kernels::gemm_acc`]) whatever the storage type.
//! Forward runs one task per (sequence, query head, query block of [`BQ`] rows). Backward runs
//! one task per (sequence, query head): it walks the query blocks in order, keeps `dq` of the
//! current block in a tile and accumulates `dk, dv` of that head in a private f32 buffer, so no
//! two tasks write the same memory; a last pass sums the heads of each GQA group into `dk, dv`.

use std::marker::PhantomData;

use rayon::prelude::*;
use squid_cuda::Element;

use super::{DenseConfig, DenseGrads, DenseOutput, Dims};
use crate::kernels::{self, dispatch, gemm_acc, gemm_set, round_up, Fma, Kernel, SyncPtr, COL_MULTIPLE, TILE_ROWS};
use crate::layout::{numel, try_filled, try_zeroed};
use crate::{Error, Heads};

/// Query rows per tile.
pub(crate) const BQ: usize = 64;
/// Keys per tile.
pub(crate) const BK: usize = 64;

/// Which keys each query sees: the dense masks, NSA's compressed-block visibility, or squid's
/// per-segment ranges.
pub(crate) trait Mask: Sync {
    /// Keys `lo..hi` seen by query `i` of sequence `s`, which has `tq` queries and `tk` keys.
    fn range(&self, s: usize, i: usize, tq: usize, tk: usize) -> (usize, usize);
}

impl Mask for DenseConfig {
    #[inline(always)]
    fn range(&self, _s: usize, i: usize, tq: usize, tk: usize) -> (usize, usize) {
        self.key_range(i, tq, tk)
    }
}

/// Fills one tile from (first key row, keys in block, kv head).
type TileFill<'a> = dyn Fn(&mut [f32], usize, usize, usize) + Sync + 'a;

/// How a tile holds its `BK` rows of one kv head.
#[derive(Clone, Copy)]
enum TileLayout {
    /// `[dim][BK]`: row `j`'s element `d` at `d * BK + j` (for products that want it transposed).
    Transposed,
    /// `[BK][ld]`: row `j`'s element `d` at `j * ld + d`.
    Rows(usize),
}

/// A [`TileFill`] copying rows `start..start + len` of kv head `g` of `src` (`[.., hkv, dim]`)
/// into a tile as f32, in `layout`.
fn tile_packer<T: Element>(
    src: &[T],
    hkv: usize,
    dim: usize,
    layout: TileLayout,
) -> impl Fn(&mut [f32], usize, usize, usize) + Sync + '_ {
    move |tile, start, len, g| {
        for j in 0..len {
            let row = &src[((start + j) * hkv + g) * dim..][..dim];
            for (d, x) in row.iter().enumerate() {
                let at = match layout {
                    TileLayout::Transposed => d * BK + j,
                    TileLayout::Rows(ld) => j * ld + d,
                };
                tile[at] = x.to_f32();
            }
        }
    }
}

/// Keys and values of a call in f32 tiles. Tile `t = block * HKV + g`, where `block` counts key
/// blocks over all sequences (`block_offsets[s]` is sequence `s`'s first).
pub(crate) struct Packed {
    pub(crate) hkv: usize,
    pub(crate) dk: usize,
    pub(crate) dv: usize,
    pub(crate) dkp: usize,
    pub(crate) dvp: usize,
    pub(crate) block_offsets: Vec<usize>,
    /// `[Dk][BK]` per tile: keys transposed, for `S = Q K^T`.
    pub(crate) kt: Vec<f32>,
    /// `[BK][Dvp]` per tile: values, for `O += P V`.
    pub(crate) vr: Vec<f32>,
    /// `[BK][Dkp]` per tile: keys, for `dQ += dS K` (backward only).
    pub(crate) kr: Vec<f32>,
    /// `[Dv][BK]` per tile: values transposed, for `dP = dO V^T` (backward only).
    pub(crate) vt: Vec<f32>,
}

impl Packed {
    /// Packs `k` and `v` into key tiles. The tiles hold whole `BK`-key blocks per sequence, so
    /// many short sequences take up to `BK` times the keys' size: allocated fallibly.
    pub(crate) fn new<T: Element>(
        h: &Heads,
        k: &[T],
        v: &[T],
        cu_k: &[u32],
        for_backward: bool,
    ) -> Result<Self, Error> {
        let (hkv, dk, dv) = (h.num_kv_heads, h.head_dim_k, h.head_dim_v);
        let (dkp, dvp) = (round_up(dk, COL_MULTIPLE), round_up(dv, COL_MULTIPLE));
        let mut block_offsets = vec![0usize];
        let mut blocks = Vec::new(); // (first key row, keys in block)
        for w in cu_k.windows(2) {
            let (start, len) = (w[0] as usize, (w[1] - w[0]) as usize);
            for b in 0..len.div_ceil(BK) {
                blocks.push((start + b * BK, (len - b * BK).min(BK)));
            }
            block_offsets.push(blocks.len());
        }
        let tiles = blocks.len() * hkv;
        let fill = |buf: &mut Vec<f32>, per_tile: usize, f: &TileFill<'_>| -> Result<(), Error> {
            if per_tile == 0 {
                return Ok(());
            }
            *buf = try_zeroed("packed key/value tiles", numel("packed key/value tiles", &[tiles, per_tile])?)?;
            buf.par_chunks_mut(per_tile).enumerate().for_each(|(t, tile)| {
                let (start, len) = blocks[t / hkv];
                f(tile, start, len, t % hkv);
            });
            Ok(())
        };
        let (mut kt, mut vr, mut kr, mut vt) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        fill(&mut kt, dk * BK, &tile_packer(k, hkv, dk, TileLayout::Transposed))?;
        fill(&mut vr, BK * dvp, &tile_packer(v, hkv, dv, TileLayout::Rows(dvp)))?;
        if for_backward {
            fill(&mut kr, BK * dkp, &tile_packer(k, hkv, dk, TileLayout::Rows(dkp)))?;
            fill(&mut vt, dv * BK, &tile_packer(v, hkv, dv, TileLayout::Transposed))?;
        }
        Ok(Self { hkv, dk, dv, dkp, dvp, block_offsets, kt, vr, kr, vt })
    }

    pub(crate) fn tile(&self, s: usize, b: usize, g: usize) -> usize {
        (self.block_offsets[s] + b) * self.hkv + g
    }
}

/// The keys each row of a query block sees (half-open, sequence coordinates; `lo == hi` for
/// none), and the key blocks the whole tile touches.
#[allow(clippy::too_many_arguments)]
fn row_ranges<M: Mask>(
    mask: &M,
    s: usize,
    i0: usize,
    rows: usize,
    tq: usize,
    tk: usize,
    lo: &mut [usize],
    hi: &mut [usize],
) -> Option<(usize, usize)> {
    let (mut kmin, mut kmax) = (usize::MAX, 0);
    for r in 0..BQ {
        let (a, b) = if r < rows { mask.range(s, i0 + r, tq, tk) } else { (0, 0) };
        lo[r] = a;
        hi[r] = b;
        if a < b {
            kmin = kmin.min(a);
            kmax = kmax.max(b);
        }
    }
    (kmin < kmax).then(|| (kmin / BK, kmax.div_ceil(BK)))
}

/// Masks `s_row` (keys `kstart..kstart + s_row.len()`) to `lo..hi`; returns false when no key
/// is left.
#[inline(always)]
pub(crate) fn mask_row(s_row: &mut [f32], kstart: usize, lo: usize, hi: usize) -> bool {
    let n = s_row.len();
    if hi <= kstart || lo >= kstart + n {
        return false;
    }
    let (a, b) = (lo.saturating_sub(kstart), (hi - kstart).min(n));
    if a > 0 || b < n {
        for (c, x) in s_row.iter_mut().enumerate() {
            if c < a || c >= b {
                *x = f32::NEG_INFINITY;
            }
        }
    }
    true
}

#[inline(always)]
pub(crate) fn row_max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    for chunk in x.chunks_exact(16) {
        for l in 0..16 {
            lanes[l] = if chunk[l] > lanes[l] { chunk[l] } else { lanes[l] };
        }
    }
    lanes.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b))
}

/// One step of the online softmax over a masked score row: the row becomes `exp(row - m')`
/// with `m'` the new running max, the running sum `l` and the output row `o` are rescaled to
/// `m'`, and the row's sum is added to `l` (the caller then adds `row V` to `o`).
#[inline(always)]
pub(crate) fn online_softmax_step<F: Fma>(row: &mut [f32], m: &mut f32, l: &mut f32, o: &mut [f32]) {
    let m_new = m.max(row_max(row));
    let alpha = kernels::exp::<F>(*m - m_new);
    let sum = exp_sub_sum::<F>(row, m_new);
    *l = *l * alpha + sum;
    *m = m_new;
    if alpha != 1.0 {
        for x in o {
            *x *= alpha;
        }
    }
}

/// `1 / l` and `lse = m + ln l` of a finished online softmax (`0` and `-inf` for no keys).
#[inline(always)]
pub(crate) fn finish_softmax(m: f32, l: f32) -> (f32, f32) {
    if l > 0.0 {
        (1.0 / l, m + l.ln())
    } else {
        (0.0, f32::NEG_INFINITY)
    }
}

/// `x = exp(x - m)` in place; returns the sum.
#[inline(always)]
pub(crate) fn exp_sub_sum<F: Fma>(x: &mut [f32], m: f32) -> f32 {
    let mut lanes = [0f32; 16];
    for chunk in x.chunks_exact_mut(16) {
        for l in 0..16 {
            let e = kernels::exp::<F>(chunk[l] - m);
            chunk[l] = e;
            lanes[l] += e;
        }
    }
    lanes.iter().sum()
}

struct FwdScratch {
    q: Vec<f32>,
    s: Vec<f32>,
    o: Vec<f32>,
    m: [f32; BQ],
    l: [f32; BQ],
    lo: [usize; BQ],
    hi: [usize; BQ],
}

pub(super) fn forward<T: Element>(
    cfg: &DenseConfig,
    dims: Dims,
    q: &[T],
    k: &[T],
    v: &[T],
    cu_q: &[u32],
    cu_k: &[u32],
) -> Result<DenseOutput<T>, Error> {
    let packed = Packed::new(&cfg.heads, k, v, cu_k, false)?;
    let (o, lse) = forward_with(cfg, cfg, dims, q, &packed, cu_q, cu_k)?;
    Ok(DenseOutput { o, lse })
}

/// Forward with any mask, output in any storage type: `(o, lse)`.
pub(crate) fn forward_with<T: Element, R: Element, M: Mask>(
    cfg: &DenseConfig,
    mask: &M,
    dims: Dims,
    q: &[T],
    packed: &Packed,
    cu_q: &[u32],
    cu_k: &[u32],
) -> Result<(Vec<R>, Vec<f32>), Error> {
    let h = cfg.heads;
    let hq = h.num_q_heads;
    let mut o: Vec<R> = try_zeroed("attention output", numel("attention output", &[dims.total_q, hq, h.head_dim_v])?)?;
    let mut lse = try_filled("attention lse", hq * dims.total_q, f32::NEG_INFINITY)?;
    let mut tasks = Vec::new();
    for s in 0..dims.num_seqs {
        let tq = (cu_q[s + 1] - cu_q[s]) as usize;
        for qb in 0..tq.div_ceil(BQ) {
            for head in 0..hq {
                tasks.push((s, head, qb));
            }
        }
    }
    // Later query blocks see more keys under a causal mask: start them first.
    tasks.sort_by_key(|&(s, head, qb)| (std::cmp::Reverse(qb), s, head));
    let (op, lp) = (SyncPtr(o.as_mut_ptr()), SyncPtr(lse.as_mut_ptr()));
    let (dkp, dvp) = (packed.dkp, packed.dvp);
    tasks.par_iter().for_each_init(
        || FwdScratch {
            q: vec![0.0; BQ * dkp],
            s: vec![0.0; BQ * BK],
            o: vec![0.0; BQ * dvp],
            m: [0.0; BQ],
            l: [0.0; BQ],
            lo: [0; BQ],
            hi: [0; BQ],
        },
        |scr, &(s, head, qb)| {
            dispatch(FwdCall { cfg, mask, dims, pk: packed, q, cu_q, cu_k, o: op, lse: lp, scr, s, head, qb })
        },
    );
    Ok((o, lse))
}

/// One forward task, as a [`Kernel`] so it is compiled per instruction set.
struct FwdCall<'a, 'b, T, R, M> {
    cfg: &'a DenseConfig,
    mask: &'a M,
    dims: Dims,
    pk: &'a Packed,
    q: &'a [T],
    cu_q: &'a [u32],
    cu_k: &'a [u32],
    o: SyncPtr<R>,
    lse: SyncPtr<f32>,
    scr: &'b mut FwdScratch,
    s: usize,
    head: usize,
    qb: usize,
}

impl<T: Element, R: Element, M: Mask> Kernel for FwdCall<'_, '_, T, R, M> {
    type Out = ();
    #[inline(always)]
    fn run<F: Fma, const W: usize>(self) {
        let c = self;
        fwd_task::<T, R, M, F, W>(
            c.cfg, c.mask, c.dims, c.pk, c.q, c.cu_q, c.cu_k, c.o, c.lse, c.scr, c.s, c.head, c.qb,
        )
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn fwd_task<T: Element, R: Element, M: Mask, F: Fma, const W: usize>(
    cfg: &DenseConfig,
    mask: &M,
    dims: Dims,
    pk: &Packed,
    q: &[T],
    cu_q: &[u32],
    cu_k: &[u32],
    o_out: SyncPtr<R>,
    lse_out: SyncPtr<f32>,
    scr: &mut FwdScratch,
    s: usize,
    head: usize,
    qb: usize,
) {
    let h = cfg.heads;
    let (hq, dk, dv, dkp, dvp) = (h.num_q_heads, pk.dk, pk.dv, pk.dkp, pk.dvp);
    let g = head / h.group();
    let scale = cfg.softmax_scale();
    let (q0, tq) = (cu_q[s] as usize, (cu_q[s + 1] - cu_q[s]) as usize);
    let tk = (cu_k[s + 1] - cu_k[s]) as usize;
    let i0 = qb * BQ;
    let rows = (tq - i0).min(BQ);
    let mr = round_up(rows, TILE_ROWS);
    let blocks = row_ranges(mask, s, i0, rows, tq, tk, &mut scr.lo, &mut scr.hi);
    scr.o[..mr * dvp].fill(0.0);
    scr.m.fill(f32::NEG_INFINITY);
    scr.l.fill(0.0);
    if let Some((b_first, b_end)) = blocks {
        scr.q.fill(0.0);
        for r in 0..rows {
            let src = &q[((q0 + i0 + r) * hq + head) * dk..][..dk];
            for (dst, x) in scr.q[r * dkp..][..dk].iter_mut().zip(src) {
                *dst = x.to_f32() * scale;
            }
        }
        for b in b_first..b_end {
            let kstart = b * BK;
            let t = pk.tile(s, b, g);
            let kt = &pk.kt[t * dk * BK..][..dk * BK];
            let vr = &pk.vr[t * BK * dvp..][..BK * dvp];
            let sm = &mut scr.s[..mr * BK];
            gemm_set::<F, W>(mr, BK, dk, &scr.q, dkp, kt, BK, sm, BK);
            for r in 0..mr {
                let row = &mut sm[r * BK..][..BK];
                if r >= rows || !mask_row(row, kstart, scr.lo[r], scr.hi[r]) {
                    row.fill(0.0);
                    continue;
                }
                online_softmax_step::<F>(row, &mut scr.m[r], &mut scr.l[r], &mut scr.o[r * dvp..][..dvp]);
            }
            let kvalid = (tk - kstart).min(BK);
            gemm_acc::<F, W>(mr, dvp, kvalid, sm, BK, vr, dvp, &mut scr.o, dvp);
        }
    }
    for r in 0..rows {
        let i = q0 + i0 + r;
        let l = scr.l[r];
        let (inv, lse) = finish_softmax(scr.m[r], l);
        let base = (i * hq + head) * dv;
        for d in 0..dv {
            // SAFETY: row `i` of head `head` belongs to this task alone.
            unsafe { o_out.write(base + d, R::from_f32(scr.o[r * dvp + d] * inv)) };
        }
        // SAFETY: as above.
        unsafe { lse_out.write(head * dims.total_q + i, lse) };
    }
}

struct BwdScratch {
    q: Vec<f32>,
    d_o: Vec<f32>,
    dq: Vec<f32>,
    p: Vec<f32>,
    dp: Vec<f32>,
    tr: Vec<f32>,
    delta: [f32; BQ],
    lse: [f32; BQ],
    lo: [usize; BQ],
    hi: [usize; BQ],
}

#[allow(clippy::too_many_arguments)]
pub(super) fn backward<T: Element>(
    cfg: &DenseConfig,
    dims: Dims,
    q: &[T],
    k: &[T],
    v: &[T],
    o: &[T],
    lse: &[f32],
    d_o: &[T],
    cu_q: &[u32],
    cu_k: &[u32],
) -> Result<DenseGrads<T>, Error> {
    let packed = Packed::new(&cfg.heads, k, v, cu_k, true)?;
    backward_with(cfg, cfg, dims, q, &packed, o, lse, d_o, cu_q, cu_k)
}

/// Backward with any mask; `o` and `d_o` in any storage type, gradients in type `R`. `packed`
/// must hold the backward tiles.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_with<T: Element, O: Element, G: Element, R: Element, M: Mask>(
    cfg: &DenseConfig,
    mask: &M,
    dims: Dims,
    q: &[T],
    packed: &Packed,
    o: &[O],
    lse: &[f32],
    d_o: &[G],
    cu_q: &[u32],
    cu_k: &[u32],
) -> Result<DenseGrads<R>, Error> {
    let h = cfg.heads;
    let (hq, hkv, dk, dv) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v);
    let (dkp, dvp) = (packed.dkp, packed.dvp);
    let total_blocks = *packed.block_offsets.last().unwrap_or(&0);
    // One task per (sequence with queries, query head): a sequence without queries has no
    // gradient to give (and with no queries, `hq` is not bounded by the inputs' sizes).
    let busy: Vec<usize> = (0..dims.num_seqs).filter(|&s| cu_q[s + 1] > cu_q[s]).collect();
    if busy.is_empty() {
        return Ok(DenseGrads {
            dq: try_zeroed("dq", q.len())?,
            dk: try_zeroed("dk", numel("dk", &[dims.total_k, hkv, dk])?)?,
            dv: try_zeroed("dv", numel("dv", &[dims.total_k, hkv, dv])?)?,
        });
    }
    // Per query head, per key block: that head's share of dk and dv, in f32. Whole blocks per
    // sequence and per query head: up to `BK x group` times the keys' size, so fallible.
    let part_len = |pad: usize| numel("dense backward per-head key-block scratch", &[hq, total_blocks, BK, pad]);
    let mut dk_part: Vec<f32> = try_zeroed("dense backward per-head dk scratch", part_len(dkp)?)?;
    let mut dv_part: Vec<f32> = try_zeroed("dense backward per-head dv scratch", part_len(dvp)?)?;
    let mut dq: Vec<R> = try_zeroed("dq", q.len())?;
    let mut tasks: Vec<(usize, usize)> = Vec::new();
    let n_tasks = numel("dense backward tasks", &[busy.len(), hq])?;
    tasks.try_reserve_exact(n_tasks).map_err(|_| Error::OutOfMemory {
        what: "dense backward tasks",
        bytes: n_tasks.saturating_mul(std::mem::size_of::<(usize, usize)>()),
    })?;
    tasks.extend(busy.iter().flat_map(|&s| (0..hq).map(move |hh| (s, hh))));
    tasks.sort_by_key(|&(s, hh)| (std::cmp::Reverse(cu_q[s + 1] - cu_q[s]), s, hh));
    let (dqp, dkpp, dvpp) = (SyncPtr(dq.as_mut_ptr()), SyncPtr(dk_part.as_mut_ptr()), SyncPtr(dv_part.as_mut_ptr()));
    tasks.par_iter().for_each_init(
        || BwdScratch {
            q: vec![0.0; BQ * dkp],
            d_o: vec![0.0; BQ * dvp],
            dq: vec![0.0; BQ * dkp],
            p: vec![0.0; BQ * BK],
            dp: vec![0.0; BQ * BK],
            tr: vec![0.0; BK * BQ],
            delta: [0.0; BQ],
            lse: [0.0; BQ],
            lo: [0; BQ],
            hi: [0; BQ],
        },
        |scr, &(s, head)| {
            let nb = packed.block_offsets[s + 1] - packed.block_offsets[s];
            let first = head * total_blocks + packed.block_offsets[s];
            // SAFETY: task (s, head) owns blocks `first..first + nb` of both buffers; the
            // buffers outlive the parallel loop.
            let (dk_acc, dv_acc) = unsafe {
                (
                    std::slice::from_raw_parts_mut(dkpp.ptr().add(first * BK * dkp), nb * BK * dkp),
                    std::slice::from_raw_parts_mut(dvpp.ptr().add(first * BK * dvp), nb * BK * dvp),
                )
            };
            let ctx = BwdCtx { cfg, mask, dims, pk: packed, q, o, lse, d_o, cu_q, cu_k };
            dispatch(BwdCall { ctx: &ctx, scr, dk_acc, dv_acc, dq: dqp, s, head })
        },
    );
    // Sum each group's heads into dk, dv.
    let mut dkk: Vec<R> = try_zeroed("dk", numel("dk", &[dims.total_k, hkv, dk])?)?;
    let mut dvv: Vec<R> = try_zeroed("dv", numel("dv", &[dims.total_k, hkv, dv])?)?;
    let group = h.group();
    let blocks_of_seq: Vec<(usize, usize)> = (0..dims.num_seqs)
        .flat_map(|s| (0..packed.block_offsets[s + 1] - packed.block_offsets[s]).map(move |b| (s, b)))
        .collect();
    let (kout, vout) = (SyncPtr(dkk.as_mut_ptr()), SyncPtr(dvv.as_mut_ptr()));
    (0..total_blocks * hkv).into_par_iter().for_each(|t| {
        let (blk, g) = (t / hkv, t % hkv);
        let (s, b) = blocks_of_seq[blk];
        let tk = (cu_k[s + 1] - cu_k[s]) as usize;
        let k0 = cu_k[s] as usize + b * BK;
        for j in 0..(tk - b * BK).min(BK) {
            for (out, width, pad, part) in [(kout, dk, dkp, &dk_part), (vout, dv, dvp, &dv_part)] {
                for d in 0..width {
                    let mut acc = 0f32;
                    for hh in g * group..(g + 1) * group {
                        acc += part[((hh * total_blocks + blk) * BK + j) * pad + d];
                    }
                    // SAFETY: key row k0 + j of kv head g belongs to tile t alone.
                    unsafe { out.write(((k0 + j) * hkv + g) * width + d, R::from_f32(acc)) };
                }
            }
        }
    });
    Ok(DenseGrads { dq, dk: dkk, dv: dvv })
}

struct BwdCtx<'a, T, O, G, M> {
    cfg: &'a DenseConfig,
    mask: &'a M,
    dims: Dims,
    pk: &'a Packed,
    q: &'a [T],
    o: &'a [O],
    lse: &'a [f32],
    d_o: &'a [G],
    cu_q: &'a [u32],
    cu_k: &'a [u32],
}

/// One backward task, as a [`Kernel`].
struct BwdCall<'a, 'b, T, O, G, M, R> {
    ctx: &'a BwdCtx<'a, T, O, G, M>,
    scr: &'b mut BwdScratch,
    dk_acc: &'b mut [f32],
    dv_acc: &'b mut [f32],
    dq: SyncPtr<R>,
    s: usize,
    head: usize,
}

impl<T: Element, O: Element, G: Element, M: Mask, R: Element> Kernel for BwdCall<'_, '_, T, O, G, M, R> {
    type Out = ();
    #[inline(always)]
    fn run<F: Fma, const W: usize>(self) {
        bwd_task::<T, O, G, R, M, F, W>(self.ctx, self.scr, self.dk_acc, self.dv_acc, self.dq, self.s, self.head)
    }
}

#[inline(always)]
pub(crate) fn transpose(src: &[f32], rows: usize, cols: usize, lds: usize, dst: &mut [f32], ldd: usize) {
    for r in 0..rows {
        for c in 0..cols {
            dst[c * ldd + r] = src[r * lds + c];
        }
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn bwd_task<T: Element, O: Element, G: Element, R: Element, M: Mask, F: Fma, const W: usize>(
    ctx: &BwdCtx<'_, T, O, G, M>,
    scr: &mut BwdScratch,
    dk_acc: &mut [f32],
    dv_acc: &mut [f32],
    dq_out: SyncPtr<R>,
    s: usize,
    head: usize,
) {
    let (cfg, pk) = (ctx.cfg, ctx.pk);
    let h = cfg.heads;
    let (hq, dk, dv, dkp, dvp) = (h.num_q_heads, pk.dk, pk.dv, pk.dkp, pk.dvp);
    let g = head / h.group();
    let scale = cfg.softmax_scale();
    let (q0, tq) = (ctx.cu_q[s] as usize, (ctx.cu_q[s + 1] - ctx.cu_q[s]) as usize);
    let tk = (ctx.cu_k[s + 1] - ctx.cu_k[s]) as usize;
    for qb in 0..tq.div_ceil(BQ) {
        let i0 = qb * BQ;
        let rows = (tq - i0).min(BQ);
        let mr = round_up(rows, TILE_ROWS);
        let Some((b_first, b_end)) = row_ranges(ctx.mask, s, i0, rows, tq, tk, &mut scr.lo, &mut scr.hi) else {
            for r in 0..rows {
                for d in 0..dk {
                    // SAFETY: row q0 + i0 + r of this head belongs to this task alone.
                    unsafe { dq_out.write(((q0 + i0 + r) * hq + head) * dk + d, R::from_f32(0.0)) };
                }
            }
            continue;
        };
        scr.q.fill(0.0);
        scr.d_o.fill(0.0);
        scr.dq[..mr * dkp].fill(0.0);
        for r in 0..rows {
            let i = q0 + i0 + r;
            for (dst, x) in scr.q[r * dkp..][..dk].iter_mut().zip(&ctx.q[(i * hq + head) * dk..][..dk]) {
                *dst = x.to_f32() * scale;
            }
            let orow = &ctx.o[(i * hq + head) * dv..][..dv];
            let mut delta = 0f32;
            for ((dst, x), y) in
                scr.d_o[r * dvp..][..dv].iter_mut().zip(&ctx.d_o[(i * hq + head) * dv..][..dv]).zip(orow)
            {
                *dst = x.to_f32();
                delta += *dst * y.to_f32();
            }
            scr.delta[r] = delta;
            scr.lse[r] = ctx.lse[head * ctx.dims.total_q + i];
        }
        for b in b_first..b_end {
            let kstart = b * BK;
            let kvalid = (tk - kstart).min(BK);
            let t = pk.tile(s, b, g);
            let kt = &pk.kt[t * dk * BK..][..dk * BK];
            let kr = &pk.kr[t * BK * dkp..][..BK * dkp];
            let vt = &pk.vt[t * dv * BK..][..dv * BK];
            let p = &mut scr.p[..mr * BK];
            gemm_set::<F, W>(mr, BK, dk, &scr.q, dkp, kt, BK, p, BK);
            for r in 0..mr {
                let row = &mut p[r * BK..][..BK];
                let lse = scr.lse[r];
                if r >= rows || lse == f32::NEG_INFINITY || !mask_row(row, kstart, scr.lo[r], scr.hi[r]) {
                    row.fill(0.0);
                    continue;
                }
                for x in row.iter_mut() {
                    *x = kernels::exp::<F>(*x - lse);
                }
            }
            // dV += P^T dO
            transpose(p, mr, BK, BK, &mut scr.tr, BQ);
            let dv_tile = &mut dv_acc[b * BK * dvp..][..BK * dvp];
            gemm_acc::<F, W>(BK, dvp, mr, &scr.tr, BQ, &scr.d_o, dvp, dv_tile, dvp);
            // dP = dO V^T, dS = P (dP - delta)
            let dp = &mut scr.dp[..mr * BK];
            gemm_set::<F, W>(mr, BK, dv, &scr.d_o, dvp, vt, BK, dp, BK);
            for r in 0..mr {
                let delta = scr.delta[r];
                for (x, y) in p[r * BK..][..BK].iter_mut().zip(&dp[r * BK..][..BK]) {
                    *x *= *y - delta;
                }
            }
            // dQ += dS K (scaled at the end); dK += dS^T (scale Q)
            gemm_acc::<F, W>(mr, dkp, kvalid, p, BK, kr, dkp, &mut scr.dq, dkp);
            transpose(p, mr, BK, BK, &mut scr.tr, BQ);
            let dk_tile = &mut dk_acc[b * BK * dkp..][..BK * dkp];
            gemm_acc::<F, W>(BK, dkp, mr, &scr.tr, BQ, &scr.q, dkp, dk_tile, dkp);
        }
        for r in 0..rows {
            let base = ((q0 + i0 + r) * hq + head) * dk;
            for d in 0..dk {
                // SAFETY: row q0 + i0 + r of this head belongs to this task alone.
                unsafe { dq_out.write(base + d, R::from_f32(scr.dq[r * dkp + d] * scale)) };
            }
        }
    }
}

/// Where decode reads each sequence's cached keys and values: one contiguous packed buffer, or
/// pages (read in place).
pub(crate) trait KvRows<T>: Sync {
    /// Cached tokens of sequence `s`.
    fn seq_len(&self, s: usize) -> usize;
    /// Keys of token `pos` of sequence `s`, kv head `g` (`Dk` values).
    fn key(&self, s: usize, pos: usize, g: usize) -> &[T];
    /// Values of token `pos` of sequence `s`, kv head `g` (`Dv` values).
    fn value(&self, s: usize, pos: usize, g: usize) -> &[T];
}

/// The packed layout: `k [total_k, HKV, Dk]`, `v [total_k, HKV, Dv]`, offsets `cu_k`.
pub(crate) struct PackedRows<'a, T> {
    pub(crate) k: &'a [T],
    pub(crate) v: &'a [T],
    pub(crate) cu_k: &'a [u32],
    pub(crate) hkv: usize,
    pub(crate) dk: usize,
    pub(crate) dv: usize,
}

impl<T: Sync> KvRows<T> for PackedRows<'_, T> {
    #[inline(always)]
    fn seq_len(&self, s: usize) -> usize {
        (self.cu_k[s + 1] - self.cu_k[s]) as usize
    }
    #[inline(always)]
    fn key(&self, s: usize, pos: usize, g: usize) -> &[T] {
        &self.k[((self.cu_k[s] as usize + pos) * self.hkv + g) * self.dk..][..self.dk]
    }
    #[inline(always)]
    fn value(&self, s: usize, pos: usize, g: usize) -> &[T] {
        &self.v[((self.cu_k[s] as usize + pos) * self.hkv + g) * self.dv..][..self.dv]
    }
}

/// Validated paged views, one per sequence (see [`crate::paged::PagedKvView::validate`]).
pub(crate) struct PagedRows<'a, 'v, T>(pub(crate) &'a [crate::paged::PagedKvView<'v, T>]);

impl<T: Sync> KvRows<T> for PagedRows<'_, '_, T> {
    #[inline(always)]
    fn seq_len(&self, s: usize) -> usize {
        self.0[s].len
    }
    #[inline(always)]
    fn key(&self, s: usize, pos: usize, g: usize) -> &[T] {
        let view = &self.0[s];
        &view.key(pos)[g * view.head_dim..][..view.head_dim]
    }
    #[inline(always)]
    fn value(&self, s: usize, pos: usize, g: usize) -> &[T] {
        let view = &self.0[s];
        &view.value(pos)[g * view.head_dim..][..view.head_dim]
    }
}

pub(super) fn decode<T: Element>(
    cfg: &DenseConfig,
    dims: Dims,
    q: &[T],
    k: &[T],
    v: &[T],
    cu_q: &[u32],
    cu_k: &[u32],
) -> DenseOutput<T> {
    let h = cfg.heads;
    let rows = PackedRows { k, v, cu_k, hkv: h.num_kv_heads, dk: h.head_dim_k, dv: h.head_dim_v };
    decode_rows(cfg, dims.num_seqs, dims.total_q, q, &rows, cu_q)
}

/// Decode against any [`KvRows`]: split-K over (sequence, kv head, key chunk), combined by
/// log-sum-exp.
pub(crate) fn decode_rows<T: Element, K: KvRows<T>>(
    cfg: &DenseConfig,
    num_seqs: usize,
    total_q: usize,
    q: &[T],
    kv: &K,
    cu_q: &[u32],
) -> DenseOutput<T> {
    let h = cfg.heads;
    let (hq, hkv, dv) = (h.num_q_heads, h.num_kv_heads, h.head_dim_v);
    let group = h.group();
    // Split each (sequence, kv head)'s keys into chunks so that there are several tasks per
    // thread even for one sequence; whole tiles of `BK` keys, so only a sequence's last tile is
    // partial.
    let threads = rayon::current_num_threads();
    let pairs = (num_seqs * hkv).max(1);
    let total_k: usize = (0..num_seqs).map(|s| kv.seq_len(s)).sum();
    let chunk = round_up((total_k / (pairs * threads * 4).max(1)).clamp(256, 1 << 16), BK);
    let mut tasks = Vec::new(); // (s, g, key start, key end)
    for s in 0..num_seqs {
        if cu_q[s + 1] == cu_q[s] {
            continue; // no queries: nothing to compute (and `hq` is not bounded by the inputs)
        }
        let tk = kv.seq_len(s);
        for g in 0..hkv {
            let mut c = 0;
            loop {
                tasks.push((s, g, c, (c + chunk).min(tk)));
                c += chunk;
                if c >= tk {
                    break;
                }
            }
        }
    }
    let partials: Vec<DecodePartial> = tasks
        .par_iter()
        .map(|&(s, g, c0, c1)| {
            // Borrowed here, outside `dispatch`: a thread-local borrowed inside the kernel body
            // keeps that body from being compiled with the kernel's instruction set.
            DECODE_SCRATCH
                .with_borrow_mut(|scr| dispatch(DecodeCall { cfg, q, kv, cu_q, s, g, c0, c1, scr, _t: PhantomData }))
        })
        .collect();
    let mut o = vec![T::default(); total_q * hq * dv];
    let mut lse = vec![f32::NEG_INFINITY; hq * total_q];
    let mut t = 0;
    let mut acc = vec![0f32; dv];
    while t < tasks.len() {
        let (s, g, _, _) = tasks[t];
        let mut end = t;
        while end < tasks.len() && tasks[end].0 == s && tasks[end].1 == g {
            end += 1;
        }
        let (q0, tq) = (cu_q[s] as usize, (cu_q[s + 1] - cu_q[s]) as usize);
        for hh in 0..group {
            let head = g * group + hh;
            for i in 0..tq {
                let row = hh * tq + i;
                let m = partials[t..end].iter().map(|p| p.m[row]).fold(f32::NEG_INFINITY, f32::max);
                if m == f32::NEG_INFINITY {
                    continue;
                }
                acc.fill(0.0);
                let mut l = 0f32;
                for p in &partials[t..end] {
                    if p.m[row] == f32::NEG_INFINITY {
                        continue;
                    }
                    let w = (p.m[row] - m).exp();
                    l += w * p.l[row];
                    for (a, x) in acc.iter_mut().zip(&p.o[row * dv..][..dv]) {
                        *a += w * x;
                    }
                }
                let out = &mut o[((q0 + i) * hq + head) * dv..][..dv];
                for (dst, a) in out.iter_mut().zip(&acc) {
                    *dst = T::from_f32(a / l);
                }
                lse[head * total_q + q0 + i] = m + l.ln();
            }
        }
        t = end;
    }
    DenseOutput { o, lse }
}

/// Softmax state of one key chunk for every query row of one (sequence, kv head), rows ordered
/// `[head in group][query]`: running max `m` (`-inf` where the row saw no key), sum `l` and the
/// unnormalised output `o [rows][Dv]`.
struct DecodePartial {
    m: Vec<f32>,
    l: Vec<f32>,
    o: Vec<f32>,
}

/// Per-thread buffers of [`decode_chunk`], reused across chunks and calls.
#[derive(Default)]
struct DecodeScratch {
    /// `[Rp][Dk]`: the group's query rows, scaled (`Rp` = rows rounded up to 4; padding zero).
    q: Vec<f32>,
    /// `[Dk][BK]`: one tile of keys as f32, transposed.
    kt: Vec<f32>,
    /// `[BK][Dvp]`: one tile of values as f32 (padding columns stay zero).
    v: Vec<f32>,
    /// `[Rp][BK]`: scores then probabilities.
    p: Vec<f32>,
    /// `[Rp][Dvp]`: output accumulator.
    o: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    /// Keys `lo..hi` of the chunk each row sees.
    lo: Vec<usize>,
    hi: Vec<usize>,
}

thread_local! {
    static DECODE_SCRATCH: std::cell::RefCell<DecodeScratch> = std::cell::RefCell::new(DecodeScratch::default());
}

/// One decode chunk, as a [`Kernel`].
struct DecodeCall<'a, 'b, T, K> {
    cfg: &'a DenseConfig,
    q: &'a [T],
    kv: &'a K,
    cu_q: &'a [u32],
    s: usize,
    g: usize,
    c0: usize,
    c1: usize,
    scr: &'b mut DecodeScratch,
    _t: PhantomData<T>,
}

impl<T: Element, K: KvRows<T>> Kernel for DecodeCall<'_, '_, T, K> {
    type Out = DecodePartial;
    #[inline(always)]
    fn run<F: Fma, const W: usize>(self) -> DecodePartial {
        let c = self;
        decode_chunk::<T, K, F, W>(c.cfg, c.q, c.kv, c.cu_q, c.s, c.g, c.c0, c.c1, c.scr)
    }
}

/// Sets `buf` to `len` zeros, reusing its allocation.
#[inline(always)]
fn zeroed(buf: &mut Vec<f32>, len: usize) {
    buf.clear();
    buf.resize(len, 0.0);
}

/// Keys `c0..c1` of one (sequence, kv head) against every query row of the group, in tiles of
/// [`BK`] keys read straight from `kv` into f32 scratch (keys transposed, `[Dk][BK]`), then per
/// tile `S = Q K^T` and `O += P V` as register-tiled products, masks and an online softmax.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn decode_chunk<T: Element, K: KvRows<T>, F: Fma, const W: usize>(
    cfg: &DenseConfig,
    q: &[T],
    kv: &K,
    cu_q: &[u32],
    s: usize,
    g: usize,
    c0: usize,
    c1: usize,
    scr: &mut DecodeScratch,
) -> DecodePartial {
    let h = cfg.heads;
    let (hq, dk, dv, group) = (h.num_q_heads, h.head_dim_k, h.head_dim_v, h.group());
    let dvp = round_up(dv, COL_MULTIPLE);
    let scale = cfg.softmax_scale();
    let (q0, tq) = (cu_q[s] as usize, (cu_q[s + 1] - cu_q[s]) as usize);
    let tk = kv.seq_len(s);
    let rows = group * tq;
    let rp = round_up(rows.max(1), TILE_ROWS);

    // Each row's keys within the chunk, and the span any row sees.
    scr.lo.clear();
    scr.hi.clear();
    let (mut kmin, mut kmax) = (c1, c0);
    for _hh in 0..group {
        for i in 0..tq {
            let (lo, hi) = cfg.key_range(i, tq, tk);
            let (a, b) = (lo.max(c0), hi.min(c1));
            if a < b {
                kmin = kmin.min(a);
                kmax = kmax.max(b);
            }
            scr.lo.push(a);
            scr.hi.push(b);
        }
    }
    let mut part = DecodePartial { m: vec![f32::NEG_INFINITY; rows], l: vec![0.0; rows], o: vec![0.0; rows * dv] };
    if kmin >= kmax {
        return part;
    }

    zeroed(&mut scr.q, rp * dk);
    for hh in 0..group {
        let head = g * group + hh;
        for i in 0..tq {
            let r = hh * tq + i;
            for (dst, x) in scr.q[r * dk..][..dk].iter_mut().zip(&q[((q0 + i) * hq + head) * dk..][..dk]) {
                *dst = x.to_f32() * scale;
            }
        }
    }
    if scr.kt.len() != BK * dk {
        zeroed(&mut scr.kt, BK * dk);
    }
    if scr.v.len() != BK * dvp {
        zeroed(&mut scr.v, BK * dvp);
    }
    zeroed(&mut scr.p, rp * BK);
    zeroed(&mut scr.o, rp * dvp);
    scr.m.clear();
    scr.m.resize(rp, f32::NEG_INFINITY);
    zeroed(&mut scr.l, rp);

    // Tiles start at multiples of `BK` from the chunk start (itself a multiple of `BK`).
    let mut kstart = c0 + (kmin - c0) / BK * BK;
    while kstart < kmax {
        let n = (c1 - kstart).min(BK);
        for j in 0..n {
            for (d, x) in kv.key(s, kstart + j, g).iter().enumerate() {
                scr.kt[d * BK + j] = x.to_f32();
            }
            for (dst, x) in scr.v[j * dvp..][..dv].iter_mut().zip(kv.value(s, kstart + j, g)) {
                *dst = x.to_f32();
            }
        }
        gemm_set::<F, W>(rp, BK, dk, &scr.q, dk, &scr.kt, BK, &mut scr.p, BK);
        for r in 0..rp {
            let row = &mut scr.p[r * BK..][..BK];
            if r >= rows {
                row.fill(0.0);
                continue;
            }
            row[n..].fill(f32::NEG_INFINITY);
            if !mask_row(row, kstart, scr.lo[r], scr.hi[r]) {
                row.fill(0.0);
                continue;
            }
            online_softmax_step::<F>(row, &mut scr.m[r], &mut scr.l[r], &mut scr.o[r * dvp..][..dvp]);
        }
        gemm_acc::<F, W>(rp, dvp, n, &scr.p, BK, &scr.v, dvp, &mut scr.o, dvp);
        kstart += BK;
    }
    for r in 0..rows {
        if scr.l[r] > 0.0 {
            part.m[r] = scr.m[r];
            part.l[r] = scr.l[r];
            part.o[r * dv..][..dv].copy_from_slice(&scr.o[r * dvp..][..dv]);
        }
    }
    part
}
