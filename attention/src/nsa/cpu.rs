//! NSA on the CPU. The forward runs all three branches in one task per (sequence, kv head, run
//! of up to [`ROWS_PER_TASK`] query rows): the compressed branch's scores for a few tokens at a
//! time are held whole, so one softmax gives its output, its `lse` and the selection scores (no
//! second `Q K_cmp^T`); each token chooses its blocks; the window branch takes the task's rows
//! 16 tokens at a time against the key tiles of their windows (scoring the two local blocks for
//! the selected branch too when they are the window's last tiles); then the task walks the union
//! of its tokens' other chosen blocks once, each block's key and value tiles read once for all
//! the rows that chose it, and writes every output with the gates applied. The backward runs the
//! compressed and window branches on [`crate::dense`]'s tiled kernels (with their masks); the
//! selected branch's holds the indices fixed and accumulates `dk, dv` per worker chunk, summed at
//! the end.

use std::sync::atomic::{AtomicUsize, Ordering};

use rayon::prelude::*;
use squid_cuda::Element;

use super::{offsets, Chooser, NsaConfig, NsaDims, NsaExtra, NsaGrads, NsaInputs, NsaOutput, NO_BLOCK};
use crate::dense::cpu::{
    backward_with, exp_sub_sum, finish_softmax, mask_row, online_softmax_step, row_max, transpose, Mask, Packed, BK,
};
use crate::dense::{DenseConfig, DenseGrads, Dims};
use crate::kernels::{self, dispatch, gemm_acc, gemm_set, round_up, Fma, Kernel, SyncPtr, COL_MULTIPLE, TILE_ROWS};
use crate::layout::{numel, try_filled, try_zeroed};
use crate::{Error, Heads};

/// The compressed branch's mask: the query at position `t` sees blocks
/// `0..num_cmp_blocks(t + 1)`; query `i` of sequence `s` sits at `i + first[s]`.
struct CmpMask {
    cfg: NsaConfig,
    first: Vec<usize>,
}

impl Mask for CmpMask {
    #[inline(always)]
    fn range(&self, s: usize, i: usize, _tq: usize, tk: usize) -> (usize, usize) {
        (0, self.cfg.num_cmp_blocks(i + self.first[s] + 1).min(tk))
    }
}

/// Position of each sequence's first query: `Tk - Tq` (0 without chunked prefill).
fn first_positions(cu_q: &[u32], cu_k: &[u32]) -> Vec<usize> {
    cu_q.windows(2).zip(cu_k.windows(2)).map(|(q, k)| ((k[1] - k[0]) - (q[1] - q[0])) as usize).collect()
}

fn branch_cfg(cfg: &NsaConfig, h: &Heads, window: Option<usize>) -> DenseConfig {
    DenseConfig { heads: *h, causal: true, window, scale: Some(cfg.softmax_scale(h)), check_finite: false }
}

struct Shared<'a, T> {
    cfg: &'a NsaConfig,
    h: &'a Heads,
    dims: NsaDims,
    q: &'a [T],
    /// Key offsets: positions count keys.
    cu: &'a [u32],
    /// Query offsets (the last `Tq` positions of each sequence have queries).
    cu_q: &'a [u32],
    cmp: &'a Packed,
    kv: &'a Packed,
    /// Caller-chosen blocks `[total_q, HKV, n]` (the selection is skipped).
    given: Option<&'a [u32]>,
    /// Per-token number of selected blocks `[total_q]`.
    counts: Option<&'a [u32]>,
}

impl<T> Shared<'_, T> {
    /// The query row of position `t` of sequence `s` (`t >= Tk - Tq`).
    #[inline(always)]
    fn q_row(&self, s: usize, t: usize) -> usize {
        self.cu_q[s + 1] as usize + t - (self.cu[s + 1] - self.cu[s]) as usize
    }
}

/// Query rows (tokens x heads of the group) one selected-branch task handles at most. Each
/// chosen block's keys and values are loaded once for all the task's rows that chose it, so
/// the more tokens a task holds, the fewer times a block is read: the selected branch is bound
/// by reading key/value tiles (at 32k tokens, 16-token tasks read 17 GB per forward), and even
/// unrelated (random) choices repeat within a few hundred tokens.
const ROWS_PER_TASK: usize = 2048;
/// Query rows the compressed branch scores at once (its scores are held whole per row).
const CMP_ROWS: usize = 64;
/// Fewest tokens per task when a short input shrinks tasks to keep every worker busy.
const MIN_TOKENS_PER_TASK: usize = 16;

/// Tokens per selected-branch task for a GQA group of `group` heads: [`ROWS_PER_TASK`] rows,
/// halved (down to [`MIN_TOKENS_PER_TASK`]) until there are about 8 tasks per worker, in whole
/// [`WIN_TOKENS`] groups.
fn tokens_per_task(group: usize, dims: NsaDims, hkv: usize) -> usize {
    #[cfg(test)]
    if let Some(per) = TASK_TOKENS.with(|t| t.get()) {
        return per;
    }
    let mut per = (ROWS_PER_TASK / group).max(1);
    let want = 8 * rayon::current_num_threads();
    while per > MIN_TOKENS_PER_TASK && dims.total.div_ceil(per) * hkv < want {
        per /= 2;
    }
    // Whole window groups: the rows a window product covers then do not depend on the task.
    round_up(per, WIN_TOKENS)
}

#[cfg(test)]
thread_local! {
    /// Tests set the tokens per task (on the calling thread) to cover task shapes that only
    /// long inputs would reach.
    pub(super) static TASK_TOKENS: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
}

/// Tokens the compressed branch handles at once for a group of `group` heads.
fn cmp_tokens(group: usize) -> usize {
    (CMP_ROWS / group).max(1)
}

/// Per-worker buffers of the selected branch; sizes in rows of `dkp`/`dvp`/`BK` floats.
struct SlcScratch {
    /// `[rows + pad][dkp]`: scaled queries of the task, row `ti * group + r`.
    qa: Vec<f32>,
    /// `[rows + pad][compressed blocks, rounded up to BK]`: the compressed branch's scores,
    /// then its probabilities.
    sfull: Vec<f32>,
    psum: Vec<f32>,
    chooser: Chooser,
    chosen_one: Vec<u32>,
    /// `[tokens][n]`: each token's choice, [`NO_BLOCK`]-padded.
    chosen: Vec<u32>,
    /// The chosen blocks, ascending, each once.
    union: Vec<u32>,
    /// Per selection block `j`: `choosers[chooser_start[j]..chooser_start[j + 1]]` are the task's
    /// tokens (ascending) that chose it (a counting sort of `chosen`).
    chooser_start: Vec<u32>,
    choosers: Vec<u32>,
    /// `[rows + pad][dvp]`: the compressed branch's output rows (f32, for the gated output).
    ocmp: Vec<f32>,
    /// Task rows that chose the current block, and the end of their visible keys in it.
    sel: Vec<(usize, usize)>,
    /// `[mp][dkp]`: the gathered queries of `sel`.
    qg: Vec<f32>,
    s: Vec<f32>,
    m: Vec<f32>,
    l: Vec<f32>,
    /// `[rows][dvp]` (forward) output accumulators.
    oacc: Vec<f32>,
    /// The window branch's running softmax: row max, sum and `[rows][dvp]` output.
    mw: Vec<f32>,
    lw: Vec<f32>,
    ow: Vec<f32>,
    /// A shared local tile's row max and sum (rows of one window group).
    tile_m: Vec<f32>,
    tile_l: Vec<f32>,
    /// `[mp][max(dkp, dvp)]`: one product before it is added to its rows.
    part: Vec<f32>,
    // backward only
    doa: Vec<f32>,
    dog: Vec<f32>,
    dqa: Vec<f32>,
    dp: Vec<f32>,
    tr: Vec<f32>,
    delta: Vec<f32>,
}

impl SlcScratch {
    /// How many of the task's tokens chose block `j`.
    fn chooser_count(&self, j: u32) -> usize {
        (self.chooser_start[j as usize + 1] - self.chooser_start[j as usize]) as usize
    }

    fn new(tokens: usize, group: usize, dkp: usize, dvp: usize) -> Self {
        let rows = tokens * group;
        let mp = round_up(rows, TILE_ROWS);
        let pad = mp + round_up(group, TILE_ROWS);
        Self {
            qa: vec![0.0; pad * dkp],
            sfull: Vec::new(),
            psum: Vec::new(),
            chooser: Chooser::default(),
            chosen_one: Vec::new(),
            chosen: Vec::new(),
            union: Vec::new(),
            chooser_start: Vec::new(),
            choosers: Vec::new(),
            ocmp: vec![0.0; pad * dvp],
            sel: Vec::new(),
            qg: vec![0.0; mp * dkp],
            s: vec![0.0; mp * BK],
            m: vec![0.0; rows],
            l: vec![0.0; rows],
            oacc: vec![0.0; mp * dvp],
            mw: vec![0.0; rows],
            lw: vec![0.0; rows],
            ow: vec![0.0; mp * dvp],
            tile_m: vec![0.0; mp],
            tile_l: vec![0.0; mp],
            part: vec![0.0; mp * dkp.max(dvp)],
            doa: vec![0.0; mp * dvp],
            dog: vec![0.0; mp * dvp],
            dqa: vec![0.0; rows * dkp],
            dp: vec![0.0; mp * BK],
            tr: vec![0.0; BK * mp],
            delta: vec![0.0; rows],
        }
    }
}

/// The selected branch's tasks `(sequence, kv head, first token, end token)`, one list per kv
/// head: the lists run one after the other, so the keys and values the workers gather from at
/// any moment are one head's (half the cache traffic of interleaving the heads at HKV = 2).
/// Tokens are positions among the keys: those with queries, `Tk - Tq .. Tk`.
fn slc_tasks(h: &Heads, dims: NsaDims, cu_q: &[u32], cu: &[u32], per: usize) -> Vec<Vec<(usize, usize, usize, usize)>> {
    let first = first_positions(cu_q, cu);
    (0..h.num_kv_heads)
        .map(|g| {
            let mut tasks = Vec::new();
            for s in 0..dims.num_seqs {
                let len = (cu[s + 1] - cu[s]) as usize;
                for t0 in (first[s]..len).step_by(per) {
                    tasks.push((s, g, t0, (t0 + per).min(len)));
                }
            }
            // Later tokens have more compressed blocks to score: start them first.
            tasks.sort_by_key(|&(s, _, t0, _)| (std::cmp::Reverse(t0), s));
            tasks
        })
        .collect()
}

pub(super) fn forward<T: Element>(
    cfg: &NsaConfig,
    h: &Heads,
    dims: NsaDims,
    x: &NsaInputs<'_, T>,
    extra: &NsaExtra<'_>,
) -> Result<NsaOutput<T>, Error> {
    let (hq, hkv, dv, n) = (h.num_q_heads, h.num_kv_heads, h.head_dim_v, cfg.num_selected);
    let total = dims.total;
    let cu_k = extra.cu_seqlens_k.unwrap_or(x.cu_seqlens);
    let offs = offsets(cfg, cu_k);
    let cmp_packed = Packed::new(h, x.k_cmp, x.v_cmp, &offs, false)?;
    let kv_packed = Packed::new(h, x.k, x.v, cu_k, false)?;
    let win_packed = match (x.k_win, x.v_win) {
        (Some(kw), Some(vw)) => Some(Packed::new(h, kw, vw, cu_k, false)?),
        _ => None,
    };
    let rows = numel("NSA output", &[total, hq, dv])?;
    let mut out = NsaOutput {
        o: try_zeroed("NSA output", rows)?,
        o_cmp: try_zeroed("NSA compressed-branch output", rows)?,
        o_slc: try_zeroed("NSA selected-branch output", rows)?,
        o_win: try_zeroed("NSA window-branch output", rows)?,
        lse_cmp: try_filled("NSA lse", hq * total, f32::NEG_INFINITY)?,
        lse_slc: try_filled("NSA lse", hq * total, f32::NEG_INFINITY)?,
        lse_win: try_filled("NSA lse", hq * total, f32::NEG_INFINITY)?,
        indices: try_filled("NSA indices", numel("NSA indices", &[total, hkv, n])?, NO_BLOCK)?,
    };
    let outs = FwdOuts {
        o: SyncPtr(out.o.as_mut_ptr()),
        o_cmp: SyncPtr(out.o_cmp.as_mut_ptr()),
        o_slc: SyncPtr(out.o_slc.as_mut_ptr()),
        o_win: SyncPtr(out.o_win.as_mut_ptr()),
        lse_cmp: SyncPtr(out.lse_cmp.as_mut_ptr()),
        lse_slc: SyncPtr(out.lse_slc.as_mut_ptr()),
        lse_win: SyncPtr(out.lse_win.as_mut_ptr()),
        indices: SyncPtr(out.indices.as_mut_ptr()),
    };
    let sh = Shared {
        cfg,
        h,
        dims,
        q: x.q,
        cu: cu_k,
        cu_q: x.cu_seqlens,
        cmp: &cmp_packed,
        kv: &kv_packed,
        given: extra.indices,
        counts: extra.num_selected,
    };
    let win = Window {
        kv: win_packed.as_ref().unwrap_or(&kv_packed),
        gates: x.gates,
        // Every token chose its two local blocks: the default forced ones, not the caller's.
        share_local: win_packed.is_none()
            && cfg.block_slc == BK
            && cfg.window >= 2 * BK
            && cfg.num_local >= 2
            && extra.indices.is_none(),
    };
    let per = tokens_per_task(h.group(), dims, hkv);
    let tasks = slc_tasks(h, dims, x.cu_seqlens, cu_k, per).concat();
    // Every worker takes the next task in list order: the heads run one after the other with
    // no barrier between them (a worker done with head 0 starts on head 1).
    let next = AtomicUsize::new(0);
    rayon::broadcast(|_| {
        let mut scr = SlcScratch::new(per, h.group(), kv_packed.dkp, kv_packed.dvp);
        while let Some(&(s, g, t0, t1)) = tasks.get(next.fetch_add(1, Ordering::Relaxed)) {
            dispatch(SlcFwdCall { sh: &sh, win: &win, scr: &mut scr, outs, s, g, t0, t1 });
        }
    });
    Ok(out)
}

/// Loads the scaled query rows of group `g` for tokens `t0..t1` of sequence `s` into `scr.qa`
/// (row `ti * group + r`), zeroing the padding after them.
#[inline(always)]
fn load_queries<T: Element>(sh: &Shared<'_, T>, scr: &mut SlcScratch, s: usize, g: usize, t0: usize, t1: usize) {
    let (hq, dk, group) = (sh.h.num_q_heads, sh.h.head_dim_k, sh.h.group());
    let dkp = sh.kv.dkp;
    let scale = sh.cfg.softmax_scale(sh.h);
    scr.qa.fill(0.0);
    for ti in 0..t1 - t0 {
        let row = sh.q_row(s, t0 + ti);
        for r in 0..group {
            let src = &sh.q[(row * hq + g * group + r) * dk..][..dk];
            for (dst, v) in scr.qa[(ti * group + r) * dkp..][..dk].iter_mut().zip(src) {
                *dst = v.to_f32() * scale;
            }
        }
    }
}

/// The compressed branch for the task's rows, fused with the selection scores: `S = Q K_cmp^T`
/// over every compressed block the task's last token sees is held whole (`[rows][blocks]`, 512
/// KiB at 32k tokens), so one exp pass gives the branch's softmax and `lse`, the importance of
/// each block for each token (`scr.psum`, `[tokens][blocks of the last token]`, summed over the
/// group's heads) and, through one more product, `o_cmp = P V_cmp`. Scoring the blocks a second
/// time for the selection (what a separate branch would need) costs a third of the branch.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn cmp_branch<T: Element, F: Fma, const W: usize>(
    sh: &Shared<'_, T>,
    scr: &mut SlcScratch,
    outs: FwdOuts<T>,
    s: usize,
    g: usize,
    t0: usize,
    t1: usize,
    row0: usize,
) {
    let (cfg, h) = (sh.cfg, sh.h);
    let (hq, dk, dv, group) = (h.num_q_heads, h.head_dim_k, h.head_dim_v, h.group());
    let dvp = sh.cmp.dvp;
    let nt = t1 - t0;
    let rows = nt * group;
    let mp = round_up(rows, TILE_ROWS);
    let nc_max = cfg.num_cmp_blocks(t1);
    scr.psum.clear();
    scr.psum.resize(nt * nc_max, 0.0);
    let ncp = round_up(nc_max, BK);
    // Every element is written by the products below (no zeroing of 256 KiB per call).
    if scr.sfull.len() < mp * ncp {
        scr.sfull.resize(mp * ncp, 0.0);
    }
    let sfull = &mut scr.sfull[..mp * ncp];
    for b in 0..ncp / BK {
        let tile = sh.cmp.tile(s, b, g);
        let kt = &sh.cmp.kt[tile * dk * BK..][..dk * BK];
        // The last tile only as far as the blocks (in 16s) the last token sees.
        let cols = (round_up(nc_max, COL_MULTIPLE) - b * BK).min(BK);
        gemm_set::<F, W>(mp, cols, dk, &scr.qa[row0 * sh.cmp.dkp..], sh.cmp.dkp, kt, BK, &mut sfull[b * BK..], ncp);
    }
    for ti in 0..nt {
        let nc = cfg.num_cmp_blocks(t0 + ti + 1);
        let ncr = round_up(nc, 16);
        for r in 0..group {
            let row = ti * group + r;
            let srow = &mut sfull[row * ncp..][..ncp];
            let mut lse = f32::NEG_INFINITY;
            if nc > 0 {
                srow[nc..ncr].fill(f32::NEG_INFINITY);
                let m = row_max(&srow[..ncr]);
                let sum = exp_sub_sum::<F>(&mut srow[..ncr], m);
                let inv = 1.0 / sum;
                for (p, ps) in srow[..nc].iter_mut().zip(&mut scr.psum[ti * nc_max..][..nc]) {
                    *p *= inv;
                    *ps += *p;
                }
                lse = m + sum.ln();
            }
            srow[nc..].fill(0.0);
            // SAFETY: (token, head) belongs to this task alone.
            unsafe { outs.lse_cmp.write((g * group + r) * sh.dims.total + sh.q_row(s, t0 + ti), lse) };
        }
    }
    // The task's rows of `o_cmp` stay in f32 for the gated output.
    let ocmp = &mut scr.ocmp[row0 * dvp..][..mp * dvp];
    if ncp == 0 {
        ocmp.fill(0.0);
    }
    for b in 0..ncp / BK {
        let tile = sh.cmp.tile(s, b, g);
        let vr = &sh.cmp.vr[tile * BK * dvp..][..BK * dvp];
        let kvalid = (nc_max - b * BK).min(BK);
        let ps = &sfull[b * BK..];
        if b == 0 {
            gemm_set::<F, W>(mp, dvp, kvalid, ps, ncp, vr, dvp, ocmp, dvp);
        } else {
            gemm_acc::<F, W>(mp, dvp, kvalid, ps, ncp, vr, dvp, ocmp, dvp);
        }
    }
    for ti in 0..nt {
        let grow = sh.q_row(s, t0 + ti);
        for r in 0..group {
            let row = ti * group + r;
            for d in 0..dv {
                // SAFETY: (token, head) belongs to this task alone.
                unsafe { outs.o_cmp.write((grow * hq + g * group + r) * dv + d, T::from_f32(ocmp[row * dvp + d])) };
            }
        }
    }
}

/// Buckets the task's choices (`scr.chosen`, tokens `t0..`) by block: the ascending union of
/// the chosen blocks in `scr.union`, and for each block the tokens that chose it, leaving out
/// the choices `(token index, block)` that `done` says were attended to already.
fn bucket_choices(scr: &mut SlcScratch, n: usize, block_slc: usize, t1: usize, done: impl Fn(usize, u32) -> bool) {
    let blocks = t1.div_ceil(block_slc) + 1;
    let start = &mut scr.chooser_start;
    start.clear();
    start.resize(blocks + 1, 0);
    for (ti, choice) in scr.chosen.chunks_exact(n).enumerate() {
        for &j in choice.iter().filter(|&&j| j != NO_BLOCK && !done(ti, j)) {
            start[j as usize + 1] += 1;
        }
    }
    scr.union.clear();
    for j in 0..blocks {
        if start[j + 1] > 0 {
            scr.union.push(j as u32);
        }
        start[j + 1] += start[j];
    }
    scr.choosers.clear();
    scr.choosers.resize(start[blocks] as usize, 0);
    // `start[j]` walks forward while block j is filled, then is restored below.
    for (ti, choice) in scr.chosen.chunks_exact(n).enumerate() {
        for &j in choice.iter().filter(|&&j| j != NO_BLOCK && !done(ti, j)) {
            let at = &mut start[j as usize];
            scr.choosers[*at as usize] = ti as u32;
            *at += 1;
        }
    }
    for j in (1..=blocks).rev() {
        start[j] = start[j - 1];
    }
    start[0] = 0;
}

/// Fills `scr.sel` with the task rows whose token chose block `j` (and where their keys in it
/// end), gathers their queries into `scr.qg`, and returns `(rows, rows rounded up to 4, the
/// largest key end)`.
#[inline(always)]
fn gather_block(
    scr: &mut SlcScratch,
    j: u32,
    group: usize,
    t0: usize,
    block_slc: usize,
    dkp: usize,
) -> (usize, usize, usize) {
    scr.sel.clear();
    let mut e_max = 0;
    let (lo, hi) = (scr.chooser_start[j as usize] as usize, scr.chooser_start[j as usize + 1] as usize);
    for &ti in &scr.choosers[lo..hi] {
        let ti = ti as usize;
        let e = ((j as usize + 1) * block_slc).min(t0 + ti + 1);
        e_max = e_max.max(e);
        for r in 0..group {
            scr.sel.push((ti * group + r, e));
        }
    }
    let m = scr.sel.len();
    let mp = round_up(m, TILE_ROWS);
    for (i, &(row, _)) in scr.sel.iter().enumerate() {
        scr.qg[i * dkp..][..dkp].copy_from_slice(&scr.qa[row * dkp..][..dkp]);
    }
    scr.qg[m * dkp..mp * dkp].fill(0.0);
    (m, mp, e_max)
}

/// Where the forward tasks write: each task its own (token, head) rows of every output.
#[derive(Clone, Copy)]
struct FwdOuts<T> {
    o: SyncPtr<T>,
    o_cmp: SyncPtr<T>,
    o_slc: SyncPtr<T>,
    o_win: SyncPtr<T>,
    lse_cmp: SyncPtr<f32>,
    lse_slc: SyncPtr<f32>,
    lse_win: SyncPtr<f32>,
    indices: SyncPtr<u32>,
}

/// What only the forward's tasks need: the window branch's tiles and the gates.
struct Window<'a, T> {
    /// The window branch's keys and values (the selected branch's unless it has its own).
    kv: &'a Packed,
    /// `[total, HQ, 3]`.
    gates: &'a [T],
    /// The selected branch's two local blocks are the window's last two key tiles for every
    /// query (shared K/V, `l' = BK`, `w >= 2 BK`): each is scored once, for both branches.
    share_local: bool,
}

/// One selected-branch forward task, as a [`Kernel`].
struct SlcFwdCall<'a, 'b, T> {
    sh: &'a Shared<'a, T>,
    win: &'a Window<'a, T>,
    scr: &'b mut SlcScratch,
    outs: FwdOuts<T>,
    s: usize,
    g: usize,
    t0: usize,
    t1: usize,
}

impl<T: Element> Kernel for SlcFwdCall<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run<F: Fma, const W: usize>(self) {
        slc_forward_task::<T, F, W>(self.sh, self.win, self.scr, self.outs, self.s, self.g, self.t0, self.t1)
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn slc_forward_task<T: Element, F: Fma, const W: usize>(
    sh: &Shared<'_, T>,
    win: &Window<'_, T>,
    scr: &mut SlcScratch,
    outs: FwdOuts<T>,
    s: usize,
    g: usize,
    t0: usize,
    t1: usize,
) {
    let (cfg, h) = (sh.cfg, sh.h);
    let (hkv, dk, group) = (h.num_kv_heads, h.head_dim_k, h.group());
    let (dkp, dvp) = (sh.kv.dkp, sh.kv.dvp);
    let n = cfg.num_selected;
    let start = sh.cu[s] as usize;
    let len = sh.cu[s + 1] as usize - start;
    let nt = t1 - t0;
    let rows = nt * group;
    load_queries(sh, scr, s, g, t0, t1);
    // The compressed branch and each token's choice, a few tokens at a time.
    scr.chosen.clear();
    scr.chosen.resize(nt * n, NO_BLOCK);
    let sub = cmp_tokens(group);
    for c0 in (t0..t1).step_by(sub) {
        let c1 = (c0 + sub).min(t1);
        cmp_branch::<T, F, W>(sh, scr, outs, s, g, c0, c1, (c0 - t0) * group);
        let nc_max = cfg.num_cmp_blocks(c1);
        for t in c0..c1 {
            let (ti, row) = (t - t0, sh.q_row(s, t));
            let nc = cfg.num_cmp_blocks(t + 1);
            let mut one = std::mem::take(&mut scr.chosen_one);
            if let Some(given) = sh.given {
                // Validated: ascending, causal, NO_BLOCK-padded.
                one.clear();
                one.extend(given[(row * hkv + g) * n..][..n].iter().filter(|&&j| j != NO_BLOCK));
            } else {
                let n_t = sh.counts.map_or(n, |c| c[row] as usize);
                scr.chooser.choose(cfg, t, n_t, &scr.psum[(t - c0) * nc_max..][..nc], &mut one);
            }
            for (slot, &j) in one.iter().enumerate() {
                scr.chosen[ti * n + slot] = j;
                // SAFETY: (row, g) belongs to this task alone.
                unsafe { outs.indices.write((row * hkv + g) * n + slot, j) };
            }
            scr.chosen_one = one;
        }
    }
    scr.m[..rows].fill(f32::NEG_INFINITY);
    scr.l[..rows].fill(0.0);
    scr.oacc[..rows * dvp].fill(0.0);
    // The window branch (and the local blocks, where they are its last tiles).
    window_phase::<T, F, W>(sh, win, scr, s, g, t0, t1);
    // The selected branch, block by block over the union of the remaining choices.
    let ls = cfg.block_slc;
    // Blocks t/l' - 1 and t/l' (every token chose them) were attended to with the window.
    let local = |ti: usize, j: u32| win.share_local && j as usize + 1 >= (t0 + ti) / ls;
    bucket_choices(scr, n, ls, t1, local);
    let union = std::mem::take(&mut scr.union);
    if group % TILE_ROWS == 0 {
        // A token's heads fill whole register tiles: its rows are multiplied straight from the
        // queries and accumulate in place (no gathered copy, no product to scatter back).
        for &j in &union {
            let a = j as usize * cfg.block_slc;
            let block_end = a + cfg.block_slc;
            let choosers = &scr.choosers[scr.chooser_start[j as usize] as usize..][..scr.chooser_count(j)];
            let e_max = choosers.last().map_or(0, |&ti| block_end.min(t0 + ti as usize + 1));
            for b in a / BK..e_max.div_ceil(BK) {
                let kstart = b * BK;
                let tile = sh.kv.tile(s, b, g);
                let kt = &sh.kv.kt[tile * dk * BK..][..dk * BK];
                let vr = &sh.kv.vr[tile * BK * dvp..][..BK * dvp];
                let kvalid = (len - kstart).min(BK);
                for &ti in choosers {
                    let e = block_end.min(t0 + ti as usize + 1);
                    let r0 = ti as usize * group;
                    let sm = &mut scr.s[..group * BK];
                    gemm_set::<F, W>(group, BK, dk, &scr.qa[r0 * dkp..], dkp, kt, BK, sm, BK);
                    for (r, srow) in sm.chunks_exact_mut(BK).enumerate() {
                        if !mask_row(srow, kstart, a, e) {
                            // Not one of this token's keys: P = 0 for the product below.
                            srow.fill(0.0);
                            continue;
                        }
                        let row = r0 + r;
                        online_softmax_step::<F>(
                            srow,
                            &mut scr.m[row],
                            &mut scr.l[row],
                            &mut scr.oacc[row * dvp..][..dvp],
                        );
                    }
                    gemm_acc::<F, W>(group, dvp, kvalid, sm, BK, vr, dvp, &mut scr.oacc[r0 * dvp..], dvp);
                }
            }
        }
    } else {
        for &j in &union {
            let (m, mp, e_max) = gather_block(scr, j, group, t0, cfg.block_slc, dkp);
            let a = j as usize * cfg.block_slc;
            for b in a / BK..e_max.div_ceil(BK) {
                let kstart = b * BK;
                let tile = sh.kv.tile(s, b, g);
                let kt = &sh.kv.kt[tile * dk * BK..][..dk * BK];
                let vr = &sh.kv.vr[tile * BK * dvp..][..BK * dvp];
                let sm = &mut scr.s[..mp * BK];
                gemm_set::<F, W>(mp, BK, dk, &scr.qg, dkp, kt, BK, sm, BK);
                for i in 0..mp {
                    let srow = &mut sm[i * BK..][..BK];
                    if i >= m || !mask_row(srow, kstart, a, scr.sel[i].1) {
                        srow.fill(0.0);
                        continue;
                    }
                    let row = scr.sel[i].0;
                    online_softmax_step::<F>(srow, &mut scr.m[row], &mut scr.l[row], &mut scr.oacc[row * dvp..][..dvp]);
                }
                let kvalid = (len - kstart).min(BK);
                let part = &mut scr.part[..mp * dvp];
                gemm_set::<F, W>(mp, dvp, kvalid, sm, BK, vr, dvp, part, dvp);
                for (i, &(row, _)) in scr.sel.iter().enumerate() {
                    for (o, p) in scr.oacc[row * dvp..][..dvp].iter_mut().zip(&part[i * dvp..][..dvp]) {
                        *o += p;
                    }
                }
            }
        }
    }
    scr.union = union;
    finish_rows(sh, win, scr, outs, s, g, t0, t1);
}

/// Writes the task's rows of `o_slc`, `o_win`, their `lse` and the gated output `o`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn finish_rows<T: Element>(
    sh: &Shared<'_, T>,
    win: &Window<'_, T>,
    scr: &SlcScratch,
    outs: FwdOuts<T>,
    s: usize,
    g: usize,
    t0: usize,
    t1: usize,
) {
    let (hq, dv, group) = (sh.h.num_q_heads, sh.h.head_dim_v, sh.h.group());
    let dvp = sh.kv.dvp;
    for ti in 0..t1 - t0 {
        let grow = sh.q_row(s, t0 + ti);
        for r in 0..group {
            let (row, head) = (ti * group + r, g * group + r);
            let (inv_s, lse_s) = finish_softmax(scr.m[row], scr.l[row]);
            let (inv_w, lse_w) = finish_softmax(scr.mw[row], scr.lw[row]);
            let gates = &win.gates[(grow * hq + head) * 3..][..3];
            let (gc, gs, gw) = (gates[0].to_f32(), gates[1].to_f32(), gates[2].to_f32());
            let base = (grow * hq + head) * dv;
            let (os, ow, oc) = (&scr.oacc[row * dvp..], &scr.ow[row * dvp..], &scr.ocmp[row * dvp..]);
            for d in 0..dv {
                let (o_slc, o_win) = (os[d] * inv_s, ow[d] * inv_w);
                // SAFETY: (token, head) belongs to this task alone.
                unsafe {
                    outs.o_slc.write(base + d, T::from_f32(o_slc));
                    outs.o_win.write(base + d, T::from_f32(o_win));
                    outs.o.write(base + d, T::from_f32(gc * oc[d] + gs * o_slc + gw * o_win));
                }
            }
            // SAFETY: as above.
            unsafe {
                outs.lse_slc.write(head * sh.dims.total + grow, lse_s);
                outs.lse_win.write(head * sh.dims.total + grow, lse_w);
            }
        }
    }
}

/// Tokens per row group of [`window_phase`]: each group's key columns are trimmed to
/// multiples of 16 at both ends of its window, so fewer masked scores are computed than with
/// whole tiles (512 keys of window span 9 tiles: 576 scores a row).
const WIN_TOKENS: usize = 16;

/// Adds a tile's partial softmax (row max `m_t`, sum `l_t`, unnormalised output `o_t`) to a
/// running one `(m, l, o)`.
#[inline(always)]
fn merge_partial<F: Fma>(m_t: f32, l_t: f32, o_t: &[f32], m: &mut f32, l: &mut f32, o: &mut [f32]) {
    let m_new = m.max(m_t);
    let (a, b) = (kernels::exp::<F>(*m - m_new), kernels::exp::<F>(m_t - m_new));
    *l = *l * a + l_t * b;
    *m = m_new;
    for (x, y) in o.iter_mut().zip(o_t) {
        *x = *x * a + y * b;
    }
}

/// The window branch of the task's tokens, [`WIN_TOKENS`] at a time: every row of a group (its
/// tokens x the GQA group's heads, contiguous in `scr.qa`) against each key tile its window
/// touches, each tile read once for all the group's heads. With `share_local`, the last two
/// tiles are also the selected branch's local blocks: their scores are exponentiated against the
/// tile's own row max, multiplied by V once, and merged into both branches' running softmax.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn window_phase<T: Element, F: Fma, const W: usize>(
    sh: &Shared<'_, T>,
    win: &Window<'_, T>,
    scr: &mut SlcScratch,
    s: usize,
    g: usize,
    t0: usize,
    t1: usize,
) {
    let group = sh.h.group();
    let (dk, dkp, dvp) = (sh.h.head_dim_k, win.kv.dkp, win.kv.dvp);
    let len = (sh.cu[s + 1] - sh.cu[s]) as usize;
    let w = sh.cfg.window;
    scr.mw[..(t1 - t0) * group].fill(f32::NEG_INFINITY);
    scr.lw[..(t1 - t0) * group].fill(0.0);
    scr.ow[..(t1 - t0) * group * dvp].fill(0.0);
    let mut ta = t0;
    while ta < t1 {
        let tb = ((ta / WIN_TOKENS + 1) * WIN_TOKENS).min(t1);
        let (row0, rows) = ((ta - t0) * group, (tb - ta) * group);
        let mp = round_up(rows, TILE_ROWS);
        // Keys lo..hi: from the first token's window start to the last token.
        let (lo, hi) = ((ta + 1).saturating_sub(w), tb);
        // The tokens' selection block (one: WIN_TOKENS divides BK = l' when sharing).
        let cur = ta / BK;
        for b in lo / BK..hi.div_ceil(BK) {
            let kstart = b * BK;
            let c0 = (lo.max(kstart) - kstart) / COL_MULTIPLE * COL_MULTIPLE;
            let c1 = round_up(hi.min(kstart + BK) - kstart, COL_MULTIPLE);
            let (cols, kvalid) = (c1 - c0, (len - kstart).min(c1) - c0);
            let tile = win.kv.tile(s, b, g);
            let kt = &win.kv.kt[tile * dk * BK..][..dk * BK];
            let vr = &win.kv.vr[tile * BK * dvp + c0 * dvp..][..cols * dvp];
            let sm = &mut scr.s[..mp * BK];
            gemm_set::<F, W>(mp, cols, dk, &scr.qa[row0 * dkp..], dkp, &kt[c0..], BK, sm, BK);
            let shared = win.share_local && b + 1 >= cur;
            for i in 0..mp {
                let srow = &mut sm[i * BK..][..cols];
                let t = ta + i / group;
                if i >= rows || !mask_row(srow, kstart + c0, (t + 1).saturating_sub(w), t + 1) {
                    // Not one of this row's keys: P = 0 for the product below.
                    srow.fill(0.0);
                    scr.tile_m[i] = f32::NEG_INFINITY;
                    continue;
                }
                let row = row0 + i;
                if shared {
                    let m = row_max(srow);
                    scr.tile_m[i] = m;
                    scr.tile_l[i] = exp_sub_sum::<F>(srow, m);
                } else {
                    online_softmax_step::<F>(srow, &mut scr.mw[row], &mut scr.lw[row], &mut scr.ow[row * dvp..][..dvp]);
                }
            }
            if shared || rows % TILE_ROWS != 0 {
                // Into a buffer of its own: merged into two branches, or padding rows that
                // would land on the next token's rows.
                let part = &mut scr.part[..mp * dvp];
                gemm_set::<F, W>(mp, dvp, kvalid, sm, BK, vr, dvp, part, dvp);
                for i in 0..rows {
                    let (row, o_t) = (row0 + i, &part[i * dvp..][..dvp]);
                    if !shared {
                        for (o, p) in scr.ow[row * dvp..][..dvp].iter_mut().zip(o_t) {
                            *o += p;
                        }
                    } else if scr.tile_m[i] != f32::NEG_INFINITY {
                        // Into the window's running softmax and the selected branch's.
                        let (m_t, l_t) = (scr.tile_m[i], scr.tile_l[i]);
                        for (m, l, o) in
                            [(&mut scr.mw, &mut scr.lw, &mut scr.ow), (&mut scr.m, &mut scr.l, &mut scr.oacc)]
                        {
                            merge_partial::<F>(m_t, l_t, o_t, &mut m[row], &mut l[row], &mut o[row * dvp..][..dvp]);
                        }
                    }
                }
            } else {
                gemm_acc::<F, W>(mp, dvp, kvalid, sm, BK, vr, dvp, &mut scr.ow[row0 * dvp..], dvp);
            }
        }
        ta = tb;
    }
}

pub(super) fn backward<T: Element>(
    cfg: &NsaConfig,
    h: &Heads,
    dims: NsaDims,
    x: &NsaInputs<'_, T>,
    cu_k: &[u32],
    fwd: &NsaOutput<T>,
    d_o: &[T],
) -> Result<NsaGrads<T>, Error> {
    let (hq, hkv, dk, dv) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v);
    let total = dims.total;
    // Gate gradients and each branch's output gradient g_b * d_o (f32).
    let mut dgates = vec![T::default(); total * hq * 3];
    let mut d_branch = [vec![0f32; total * hq * dv], vec![0f32; total * hq * dv], vec![0f32; total * hq * dv]];
    {
        let [dc, ds, dw] = &mut d_branch;
        dgates
            .par_chunks_mut(3)
            .zip(dc.par_chunks_mut(dv))
            .zip(ds.par_chunks_mut(dv))
            .zip(dw.par_chunks_mut(dv))
            .enumerate()
            .for_each(|(rh, (((dg, dc), ds), dw))| {
                let gates = &x.gates[rh * 3..][..3];
                let gout = &d_o[rh * dv..][..dv];
                for (b, (ob, dst)) in
                    [(&fwd.o_cmp, &mut *dc), (&fwd.o_slc, &mut *ds), (&fwd.o_win, &mut *dw)].into_iter().enumerate()
                {
                    let gb = gates[b].to_f32();
                    let mut acc = 0f32;
                    for ((d, go), o) in dst.iter_mut().zip(gout).zip(&ob[rh * dv..][..dv]) {
                        let go = go.to_f32();
                        acc += go * o.to_f32();
                        *d = gb * go;
                    }
                    dg[b] = T::from_f32(acc);
                }
            });
    }
    let offs = offsets(cfg, cu_k);
    let cmp_packed = Packed::new(h, x.k_cmp, x.v_cmp, &offs, true)?;
    let cmp_dims = Dims { total_q: total, total_k: dims.total_cmp, num_seqs: dims.num_seqs };
    let g_cmp: DenseGrads<f32> = backward_with(
        &branch_cfg(cfg, h, None),
        &CmpMask { cfg: *cfg, first: first_positions(x.cu_seqlens, cu_k) },
        cmp_dims,
        x.q,
        &cmp_packed,
        &fwd.o_cmp,
        &fwd.lse_cmp,
        &d_branch[0],
        x.cu_seqlens,
        &offs,
    )?;
    let win_cfg = branch_cfg(cfg, h, Some(cfg.window));
    let win_dims = Dims { total_q: total, total_k: dims.total_k, num_seqs: dims.num_seqs };
    let kv_packed = Packed::new(h, x.k, x.v, cu_k, true)?;
    let g_win: DenseGrads<f32> = match (x.k_win, x.v_win) {
        (Some(kw), Some(vw)) => {
            let p = Packed::new(h, kw, vw, cu_k, true)?;
            backward_with(
                &win_cfg,
                &win_cfg,
                win_dims,
                x.q,
                &p,
                &fwd.o_win,
                &fwd.lse_win,
                &d_branch[2],
                x.cu_seqlens,
                cu_k,
            )?
        }
        _ => backward_with(
            &win_cfg,
            &win_cfg,
            win_dims,
            x.q,
            &kv_packed,
            &fwd.o_win,
            &fwd.lse_win,
            &d_branch[2],
            x.cu_seqlens,
            cu_k,
        )?,
    };
    // Selected branch: chunks of tasks, each with private dk/dv tiles, then summed.
    let (dkp, dvp) = (kv_packed.dkp, kv_packed.dvp);
    let tiles = kv_packed.block_offsets.last().copied().unwrap_or(0) * hkv;
    let tile_len = |pad: usize| numel("NSA backward key tiles", &[tiles, BK, pad]);
    let mut dq_slc: Vec<f32> = try_zeroed("NSA backward dq", numel("NSA backward dq", &[total, hq, dk])?)?;
    let per = tokens_per_task(h.group(), dims, hkv);
    let tasks: Vec<_> = slc_tasks(h, dims, x.cu_seqlens, cu_k, per).concat();
    let chunks = (rayon::current_num_threads() * 2).max(1);
    let per_chunk = tasks.len().div_ceil(chunks).max(1);
    let sh = Shared {
        cfg,
        h,
        dims,
        q: x.q,
        cu: cu_k,
        cu_q: x.cu_seqlens,
        cmp: &cmp_packed,
        kv: &kv_packed,
        given: None,
        counts: None,
    };
    let dqp = SyncPtr(dq_slc.as_mut_ptr());
    let bufs = BwdBufs { d_o: &d_branch[1], o: &fwd.o_slc, lse: &fwd.lse_slc, indices: &fwd.indices };
    let (dk_tiles, dv_tiles) = tasks
        .par_chunks(per_chunk)
        .map(|chunk| -> Result<(Vec<f32>, Vec<f32>), Error> {
            let mut dk_acc: Vec<f32> = try_zeroed("NSA backward dk tiles", tile_len(dkp)?)?;
            let mut dv_acc: Vec<f32> = try_zeroed("NSA backward dv tiles", tile_len(dvp)?)?;
            let mut scr = SlcScratch::new(per, h.group(), dkp, dvp);
            for &(s, g, t0, t1) in chunk {
                dispatch(SlcBwdCall {
                    sh: &sh,
                    bufs: &bufs,
                    scr: &mut scr,
                    dk_acc: &mut dk_acc,
                    dv_acc: &mut dv_acc,
                    dq: dqp,
                    s,
                    g,
                    t0,
                    t1,
                });
            }
            Ok((dk_acc, dv_acc))
        })
        .reduce_with(|a, b| {
            let ((mut a, mut b), (c, d)) = (a?, b?);
            a.iter_mut().zip(&c).for_each(|(x, y)| *x += y);
            b.iter_mut().zip(&d).for_each(|(x, y)| *x += y);
            Ok((a, b))
        })
        .unwrap_or_else(|| {
            Ok((
                try_zeroed("NSA backward dk tiles", tile_len(dkp)?)?,
                try_zeroed("NSA backward dv tiles", tile_len(dvp)?)?,
            ))
        })?;
    // Tiles back to rows, plus the window branch where it shares K/V.
    let separate_win = x.k_win.is_some();
    let mut dk_rows = vec![0f32; dims.total_k * hkv * dk];
    let mut dv_rows = vec![0f32; dims.total_k * hkv * dv];
    for s in 0..dims.num_seqs {
        let start = cu_k[s] as usize;
        let len = cu_k[s + 1] as usize - start;
        for t in 0..len {
            for g in 0..hkv {
                let tile = kv_packed.tile(s, t / BK, g);
                let j = t % BK;
                let r = (start + t) * hkv + g;
                dk_rows[r * dk..][..dk].copy_from_slice(&dk_tiles[(tile * BK + j) * dkp..][..dk]);
                dv_rows[r * dv..][..dv].copy_from_slice(&dv_tiles[(tile * BK + j) * dvp..][..dv]);
            }
        }
    }
    if !separate_win {
        dk_rows.iter_mut().zip(&g_win.dk).for_each(|(a, b)| *a += b);
        dv_rows.iter_mut().zip(&g_win.dv).for_each(|(a, b)| *a += b);
    }
    let store = |v: &[f32]| -> Vec<T> { v.iter().map(|&x| T::from_f32(x)).collect() };
    let dq: Vec<T> = (0..dq_slc.len()).map(|i| T::from_f32(dq_slc[i] + g_cmp.dq[i] + g_win.dq[i])).collect();
    Ok(NsaGrads {
        dq,
        dk: store(&dk_rows),
        dv: store(&dv_rows),
        dk_win: separate_win.then(|| store(&g_win.dk)),
        dv_win: separate_win.then(|| store(&g_win.dv)),
        dk_cmp: store(&g_cmp.dk),
        dv_cmp: store(&g_cmp.dv),
        dgates,
    })
}

struct BwdBufs<'a, T> {
    d_o: &'a [f32],
    o: &'a [T],
    lse: &'a [f32],
    indices: &'a [u32],
}

/// One selected-branch backward task, as a [`Kernel`].
struct SlcBwdCall<'a, 'b, T> {
    sh: &'a Shared<'a, T>,
    bufs: &'a BwdBufs<'a, T>,
    scr: &'b mut SlcScratch,
    dk_acc: &'b mut [f32],
    dv_acc: &'b mut [f32],
    dq: SyncPtr<f32>,
    s: usize,
    g: usize,
    t0: usize,
    t1: usize,
}

impl<T: Element> Kernel for SlcBwdCall<'_, '_, T> {
    type Out = ();
    #[inline(always)]
    fn run<F: Fma, const W: usize>(self) {
        let c = self;
        slc_backward_task::<T, F, W>(c.sh, c.bufs, c.scr, c.dk_acc, c.dv_acc, c.dq, c.s, c.g, c.t0, c.t1)
    }
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn slc_backward_task<T: Element, F: Fma, const W: usize>(
    sh: &Shared<'_, T>,
    bufs: &BwdBufs<'_, T>,
    scr: &mut SlcScratch,
    dk_acc: &mut [f32],
    dv_acc: &mut [f32],
    dq_out: SyncPtr<f32>,
    s: usize,
    g: usize,
    t0: usize,
    t1: usize,
) {
    let (cfg, h) = (sh.cfg, sh.h);
    let (hq, hkv, dk, dv, group) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v, h.group());
    let (dkp, dvp) = (sh.kv.dkp, sh.kv.dvp);
    let n = cfg.num_selected;
    let scale = cfg.softmax_scale(h);
    let start = sh.cu[s] as usize;
    let len = sh.cu[s + 1] as usize - start;
    let nt = t1 - t0;
    let rows = nt * group;
    load_queries(sh, scr, s, g, t0, t1);
    for ti in 0..nt {
        let grow = sh.q_row(s, t0 + ti);
        for r in 0..group {
            let (row, rh) = (ti * group + r, grow * hq + g * group + r);
            let mut delta = 0f32;
            for ((dst, go), o) in
                scr.doa[row * dvp..][..dvp].iter_mut().zip(&bufs.d_o[rh * dv..][..dv]).zip(&bufs.o[rh * dv..][..dv])
            {
                *dst = *go;
                delta += go * o.to_f32();
            }
            scr.delta[row] = delta;
            scr.m[row] = bufs.lse[(g * group + r) * sh.dims.total + grow];
        }
    }
    scr.chosen.clear();
    for ti in 0..nt {
        let grow = sh.q_row(s, t0 + ti);
        scr.chosen.extend_from_slice(&bufs.indices[(grow * hkv + g) * n..][..n]);
    }
    bucket_choices(scr, n, cfg.block_slc, t1, |_, _| false);
    scr.dqa[..rows * dkp].fill(0.0);
    let union = std::mem::take(&mut scr.union);
    for &j in &union {
        let (m, mp, e_max) = gather_block(scr, j, group, t0, cfg.block_slc, dkp);
        for (i, &(row, _)) in scr.sel.iter().enumerate() {
            scr.dog[i * dvp..][..dvp].copy_from_slice(&scr.doa[row * dvp..][..dvp]);
        }
        scr.dog[m * dvp..mp * dvp].fill(0.0);
        let a = j as usize * cfg.block_slc;
        for b in a / BK..e_max.div_ceil(BK) {
            let kstart = b * BK;
            let kvalid = (len - kstart).min(BK);
            let tile = sh.kv.tile(s, b, g);
            let kt = &sh.kv.kt[tile * dk * BK..][..dk * BK];
            let kr = &sh.kv.kr[tile * BK * dkp..][..BK * dkp];
            let vt = &sh.kv.vt[tile * dv * BK..][..dv * BK];
            let p = &mut scr.s[..mp * BK];
            gemm_set::<F, W>(mp, BK, dk, &scr.qg, dkp, kt, BK, p, BK);
            for i in 0..mp {
                let prow = &mut p[i * BK..][..BK];
                let lse = if i < m { scr.m[scr.sel[i].0] } else { f32::NEG_INFINITY };
                if lse == f32::NEG_INFINITY || !mask_row(prow, kstart, a, scr.sel[i].1) {
                    prow.fill(0.0);
                    continue;
                }
                for v in prow.iter_mut() {
                    *v = kernels::exp::<F>(*v - lse);
                }
            }
            // dV += P^T dO
            transpose(p, mp, BK, BK, &mut scr.tr, mp);
            gemm_acc::<F, W>(BK, dvp, mp, &scr.tr, mp, &scr.dog, dvp, &mut dv_acc[tile * BK * dvp..][..BK * dvp], dvp);
            // dS = P (dO V^T - delta)
            let dp = &mut scr.dp[..mp * BK];
            gemm_set::<F, W>(mp, BK, dv, &scr.dog, dvp, vt, BK, dp, BK);
            for i in 0..m {
                let delta = scr.delta[scr.sel[i].0];
                for (x, y) in p[i * BK..][..BK].iter_mut().zip(&dp[i * BK..][..BK]) {
                    *x *= *y - delta;
                }
            }
            // dQ rows += dS K ; dK += dS^T (scaled Q)
            let part = &mut scr.part[..mp * dkp];
            gemm_set::<F, W>(mp, dkp, kvalid, p, BK, kr, dkp, part, dkp);
            for (i, &(row, _)) in scr.sel.iter().enumerate() {
                for (d, x) in scr.dqa[row * dkp..][..dkp].iter_mut().zip(&part[i * dkp..][..dkp]) {
                    *d += x;
                }
            }
            transpose(p, mp, BK, BK, &mut scr.tr, mp);
            gemm_acc::<F, W>(BK, dkp, mp, &scr.tr, mp, &scr.qg, dkp, &mut dk_acc[tile * BK * dkp..][..BK * dkp], dkp);
        }
    }
    scr.union = union;
    for ti in 0..nt {
        let grow = sh.q_row(s, t0 + ti);
        for r in 0..group {
            let row = ti * group + r;
            let base = (grow * hq + g * group + r) * dk;
            for d in 0..dk {
                // SAFETY: (token, head) belongs to this task alone.
                unsafe { dq_out.write(base + d, scr.dqa[row * dkp + d] * scale) };
            }
        }
    }
}
