//! Single-step NSA against a KV cache. The cache keeps, per sequence, the keys and values of
//! every token so far and their compressed blocks (mean pooling, as [`super::compress_mean`]),
//! adding a compressed block each time `d` more tokens complete one. A decode step computes
//! the output of each sequence's newest token: one task per (sequence, kv head) runs the
//! compressed branch for the group's heads, chooses the blocks, then the selected and window
//! branches, reading the cache in place.
//!
//! Layout, chosen for the decode step: per sequence and kv head, the keys are held as f32 in
//! transposed tiles of [`TILE`] keys (`[tile][Dk][TILE]`), so the scores of all the group's
//! heads over a tile are a small matrix product with no horizontal sums; the values as f32 rows
//! padded to a multiple of 16 (`[key][Dv']`), so `P V` is a matrix product that keeps the
//! group's outputs in registers over a whole run of keys. The compressed keys and values are
//! also kept in the storage type, as [`NsaCache::compressed`] returns them. (For bf16 / f16
//! storage the f32 copies take twice the memory of the tokens; they save a conversion per
//! element per decode step.)

use std::cell::RefCell;

use rayon::prelude::*;
use squid_cuda::Element;

use super::{Chooser, NsaConfig, NO_BLOCK};
use crate::kernels::{dispatch, exp, gemm_acc, round_up, Fma, Kernel, Unfused, COL_MULTIPLE, TILE_ROWS};
use crate::layout::{check_finite, expect_len, numel};
use crate::{Error, Heads};

/// The CUDA source of NSA's device decode (launchers in `cuda_decode`, feature `cuda`): the
/// cache append, the compression of completed blocks and the decode step, bf16 and f16.
pub const DECODE_KERNEL: squid_cuda::KernelSource = squid_cuda::kernel_source!(
    "attention_nsa_decode",
    "src/nsa/decode.cu",
    [
        "squid_nsa_dec_append_bf16",
        "squid_nsa_dec_append_f16",
        "squid_nsa_dec_compress_bf16",
        "squid_nsa_dec_compress_f16",
        "squid_nsa_dec_step_bf16",
        "squid_nsa_dec_step_f16"
    ],
    fast_math = false
);

/// Keys per transposed key tile.
const TILE: usize = 16;

/// One kv head's keys (transposed tiles) and values (padded rows), as f32.
#[derive(Debug, Clone, Default)]
struct KvStore {
    /// `[tiles][Dk][TILE]`; the keys past the last one are 0.
    k: Vec<f32>,
    /// `[keys][Dv']`, `Dv'` = `Dv` rounded up to 16, padding 0.
    v: Vec<f32>,
    /// Keys held.
    len: usize,
}

impl KvStore {
    /// Appends one key and value.
    fn push(&mut self, k: impl Iterator<Item = f32>, v: impl Iterator<Item = f32>, dk: usize, dvp: usize) {
        let (tile, lane) = (self.len / TILE, self.len % TILE);
        if lane == 0 {
            self.k.resize((tile + 1) * dk * TILE, 0.0);
        }
        for (d, x) in k.enumerate() {
            self.k[(tile * dk + d) * TILE + lane] = x;
        }
        let row = self.v.len();
        self.v.extend(v);
        self.v.resize(row + dvp, 0.0);
        self.len += 1;
    }

    /// Element `d` of key `t`.
    fn key(&self, t: usize, d: usize, dk: usize) -> f32 {
        self.k[((t / TILE) * dk + d) * TILE + t % TILE]
    }
}

/// One sequence's cache.
#[derive(Debug, Clone)]
struct SeqCache<T> {
    /// Per kv head: the selected branch's keys and values (the window's too unless separate).
    kv: Vec<KvStore>,
    /// Per kv head: the window branch's own keys and values (empty unless separate).
    win: Vec<KvStore>,
    /// Per kv head: the compressed keys and values (each rounded to `T`).
    cmp: Vec<KvStore>,
    /// `[blocks, HKV, Dk]` in the storage type.
    k_cmp: Vec<T>,
    /// `[blocks, HKV, Dv]` in the storage type.
    v_cmp: Vec<T>,
    len: usize,
    blocks: usize,
}

impl<T> SeqCache<T> {
    /// An empty sequence; its per-head stores are allocated fallibly (`hkv` is the caller's).
    fn new(hkv: usize, separate_win: bool) -> Result<Self, Error> {
        let stores = |n: usize| -> Result<Vec<KvStore>, Error> {
            let mut v = Vec::new();
            v.try_reserve_exact(n).map_err(|_| Error::OutOfMemory {
                what: "NsaCache per-head stores",
                bytes: n.saturating_mul(std::mem::size_of::<KvStore>()),
            })?;
            v.resize_with(n, KvStore::default);
            Ok(v)
        };
        Ok(Self {
            kv: stores(hkv)?,
            win: stores(if separate_win { hkv } else { 0 })?,
            cmp: stores(hkv)?,
            k_cmp: Vec::new(),
            v_cmp: Vec::new(),
            len: 0,
            blocks: 0,
        })
    }
}

/// A decode cache for a batch of sequences.
#[derive(Debug, Clone)]
pub struct NsaCache<T> {
    cfg: NsaConfig,
    heads: Heads,
    separate_win: bool,
    seqs: Vec<SeqCache<T>>,
}

/// Output of one decode step.
#[derive(Debug, Clone, PartialEq)]
pub struct NsaDecodeOutput<T> {
    /// `[num_seqs, HQ, Dv]`: the newest token of each sequence.
    pub o: Vec<T>,
    /// `[num_seqs, HKV, n]`: its chosen blocks, ascending, [`NO_BLOCK`]-padded.
    pub indices: Vec<u32>,
}

impl<T: Element> NsaCache<T> {
    /// An empty cache for `num_seqs` sequences. With `separate_win` the window branch has its
    /// own keys and values, given to [`NsaCache::append`].
    pub fn new(cfg: NsaConfig, heads: Heads, num_seqs: usize, separate_win: bool) -> Result<Self, Error> {
        cfg.validate()?;
        heads.validate()?;
        // Every sequence holds 2 or 3 stores per kv head: refuse what cannot be counted, and
        // allocate the rest fallibly (a huge `num_seqs` must be an error, not an abort).
        let per_seq = std::mem::size_of::<SeqCache<T>>().saturating_add(
            (if separate_win { 3 } else { 2 } * std::mem::size_of::<KvStore>()).saturating_mul(heads.num_kv_heads),
        );
        let bytes = num_seqs.saturating_mul(per_seq);
        if bytes > isize::MAX as usize {
            return Err(Error::OutOfMemory { what: "NsaCache", bytes });
        }
        let mut seqs = Vec::new();
        seqs.try_reserve_exact(num_seqs).map_err(|_| Error::OutOfMemory { what: "NsaCache", bytes })?;
        for _ in 0..num_seqs {
            seqs.push(SeqCache::new(heads.num_kv_heads, separate_win)?);
        }
        Ok(Self { cfg, heads, separate_win, seqs })
    }

    /// Tokens cached for sequence `seq`.
    pub fn len(&self, seq: usize) -> usize {
        self.seqs.get(seq).map_or(0, |s| s.len)
    }

    /// Whether no sequence holds a token.
    pub fn is_empty(&self) -> bool {
        self.seqs.iter().all(|s| s.len == 0)
    }

    /// Sequence `seq`'s compressed keys and values so far (`[blocks, HKV, Dk]`, `[blocks, HKV, Dv]`).
    pub fn compressed(&self, seq: usize) -> Option<(&[T], &[T])> {
        self.seqs.get(seq).map(|s| (&s.k_cmp[..], &s.v_cmp[..]))
    }

    /// Appends tokens to sequence `seq`: `k [n, HKV, Dk]`, `v [n, HKV, Dv]`, and the window
    /// branch's own `(k, v)` when the cache was made with `separate_win`. Completes the
    /// compressed blocks the new tokens finish.
    pub fn append(&mut self, seq: usize, k: &[T], v: &[T], win: Option<(&[T], &[T])>) -> Result<(), Error> {
        let h = self.heads;
        let (hkv, dk, dv) = (h.num_kv_heads, h.head_dim_k, h.head_dim_v);
        let dvp = round_up(dv, COL_MULTIPLE);
        let n = crate::layout::rows_of("k", k.len(), hkv, dk)?;
        expect_len("v", v.len(), numel("v", &[n, hkv, dv])?, "[n, HKV, Dv]")?;
        if self.cfg.check_finite {
            check_finite("k", k)?;
            check_finite("v", v)?;
        }
        let separate = self.separate_win;
        let cfg = self.cfg;
        let num_seqs = self.seqs.len();
        let sc =
            self.seqs.get_mut(seq).ok_or_else(|| Error::Cache(format!("sequence {seq} of a cache for {num_seqs}")))?;
        let push_all = |stores: &mut [KvStore], k: &[T], v: &[T]| {
            for i in 0..n {
                for (g, st) in stores.iter_mut().enumerate() {
                    let kr = k[(i * hkv + g) * dk..][..dk].iter().map(|x| x.to_f32());
                    let vr = v[(i * hkv + g) * dv..][..dv].iter().map(|x| x.to_f32());
                    st.push(kr, vr, dk, dvp);
                }
            }
        };
        match (separate, win) {
            (true, Some((kw, vw))) => {
                expect_len("k_win", kw.len(), numel("k_win", &[n, hkv, dk])?, "[n, HKV, Dk]")?;
                expect_len("v_win", vw.len(), numel("v_win", &[n, hkv, dv])?, "[n, HKV, Dv]")?;
                push_all(&mut sc.win, kw, vw);
            }
            (false, None) => {}
            (true, None) => return Err(Error::Cache("this cache needs the window branch's own k, v".into())),
            (false, Some(_)) => return Err(Error::Cache("this cache shares k, v with the window branch".into())),
        }
        push_all(&mut sc.kv, k, v);
        sc.len += n;
        // Each element summed in token order from 0, then scaled: what `compress_mean` does.
        let inv = 1.0 / cfg.block_cmp as f32;
        let mut krow = vec![0f32; dk];
        let mut vrow = vec![0f32; dv];
        while sc.blocks * cfg.stride_cmp + cfg.block_cmp <= sc.len {
            let first = sc.blocks * cfg.stride_cmp;
            for g in 0..hkv {
                let src = &sc.kv[g];
                krow.fill(0.0);
                vrow.fill(0.0);
                for t in first..first + cfg.block_cmp {
                    for (d, a) in krow.iter_mut().enumerate() {
                        *a += src.key(t, d, dk);
                    }
                    for (a, x) in vrow.iter_mut().zip(&src.v[t * dvp..][..dv]) {
                        *a += x;
                    }
                }
                let kt = krow.iter().map(|a| T::from_f32(a * inv));
                let vt = vrow.iter().map(|a| T::from_f32(a * inv));
                let (k0, v0) = (sc.k_cmp.len(), sc.v_cmp.len());
                sc.k_cmp.extend(kt);
                sc.v_cmp.extend(vt);
                let kf = sc.k_cmp[k0..].iter().map(|x| x.to_f32());
                let vf = sc.v_cmp[v0..].iter().map(|x| x.to_f32());
                sc.cmp[g].push(kf, vf, dk, dvp);
            }
            sc.blocks += 1;
        }
        Ok(())
    }

    /// The NSA output of each sequence's newest token: `q [num_seqs, HQ, Dk]`, `gates
    /// [num_seqs, HQ, 3]`. Every sequence must hold at least one token.
    pub fn decode(&self, q: &[T], gates: &[T]) -> Result<NsaDecodeOutput<T>, Error> {
        self.decode_with(q, gates, false, self.step_flops() >= SERIAL_FLOPS)
    }

    /// [`NsaCache::decode`] with the tasks compiled for the build target, whatever the machine
    /// has: tests hold both paths to the reference in one run.
    #[cfg(test)]
    pub(super) fn decode_portable(&self, q: &[T], gates: &[T]) -> Result<NsaDecodeOutput<T>, Error> {
        self.decode_with(q, gates, true, self.step_flops() >= SERIAL_FLOPS)
    }

    /// [`NsaCache::decode`] with its tasks spread over the pool however small the step (tests
    /// hold the parallel path to the serial one).
    #[cfg(test)]
    pub(super) fn decode_in_parallel(&self, q: &[T], gates: &[T]) -> Result<NsaDecodeOutput<T>, Error> {
        self.decode_with(q, gates, false, true)
    }

    fn decode_with(&self, q: &[T], gates: &[T], portable: bool, parallel: bool) -> Result<NsaDecodeOutput<T>, Error> {
        let h = self.heads;
        let (hq, hkv, dk, dv, n) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v, self.cfg.num_selected);
        let ns = self.seqs.len();
        expect_len("q", q.len(), numel("q", &[ns, hq, dk])?, "[num_seqs, HQ, Dk]")?;
        expect_len("gates", gates.len(), numel("gates", &[ns, hq, 3])?, "[num_seqs, HQ, 3]")?;
        if let Some(s) = self.seqs.iter().position(|s| s.len == 0) {
            return Err(Error::Cache(format!("sequence {s} is empty: append its token before decoding")));
        }
        if self.cfg.check_finite {
            check_finite("q", q)?;
            check_finite("gates", gates)?;
        }
        let mut o = vec![T::default(); ns * hq * dv];
        let mut indices = vec![NO_BLOCK; ns * hkv * n];
        // Task (s, g) owns the group's output rows `[s, g * group .. (g + 1) * group]` and its
        // index slots: consecutive chunks.
        let run = |(task, (o, chosen)): (usize, (&mut [T], &mut [u32]))| {
            // Nothing in a task re-enters it, so the borrow is never contended. (Borrowed
            // out here: a closure inside the kernel would miss its target features.)
            SCRATCH.with(|scratch| {
                let scr = &mut *scratch.borrow_mut();
                let call = GroupCall { cache: self, s: task / hkv, g: task % hkv, q, gates, o, chosen, scr };
                if portable {
                    call.run::<Unfused, 16>()
                } else {
                    dispatch(call)
                }
            })
        };
        if parallel {
            o.par_chunks_mut(h.group() * dv).zip(indices.par_chunks_mut(n)).enumerate().for_each(run);
        } else {
            o.chunks_mut(h.group() * dv).zip(indices.chunks_mut(n)).enumerate().for_each(run);
        }
        Ok(NsaDecodeOutput { o, indices })
    }

    /// Multiply-adds times 2 of one decode step: every kv head's group against its compressed
    /// blocks, its selected keys and its window, scores and outputs.
    fn step_flops(&self) -> usize {
        let (cfg, h) = (&self.cfg, &self.heads);
        let keys: usize = self
            .seqs
            .iter()
            .map(|sc| sc.blocks + cfg.num_selected.saturating_mul(cfg.block_slc).min(sc.len) + cfg.window.min(sc.len))
            .fold(0usize, usize::saturating_add);
        // Saturating: an estimate that picks serial or parallel, never an error.
        keys.saturating_mul(h.num_q_heads).saturating_mul((h.head_dim_k + h.head_dim_v) * 2)
    }
}

/// One (sequence, kv head) of a decode step, as a [`Kernel`]: writes the group's outputs
/// `o [group, Dv]` and its chosen blocks.
struct GroupCall<'a, T> {
    cache: &'a NsaCache<T>,
    s: usize,
    g: usize,
    q: &'a [T],
    gates: &'a [T],
    o: &'a mut [T],
    chosen: &'a mut [u32],
    scr: &'a mut Scratch,
}

/// Per-thread buffers of a decode task, kept between calls so a decode step allocates only its
/// outputs.
#[derive(Default)]
struct Scratch {
    /// The group's scaled queries, `[group rounded up to 4][Dk]`, padding rows 0.
    q: Vec<f32>,
    /// Scores, then gated probabilities, `[group rounded up to 4][columns]`.
    p: Vec<f32>,
    /// The gated outputs of the three branches summed, `[group rounded up to 4][Dv']`.
    out: Vec<f32>,
    /// Each head's gate of the branch at hand.
    gate: Vec<f32>,
    /// Compressed probabilities summed over the group, `[blocks]`.
    psum: Vec<f32>,
    /// Selection block importance and the choice.
    chooser: Chooser,
    /// Chosen blocks.
    chosen: Vec<u32>,
    /// Runs of consecutive keys `[start, end)` a branch attends to.
    runs: Vec<(usize, usize)>,
}

/// Below this many flops a decode step runs on the calling thread: about 100 us of one core
/// here, where waking the pool's workers costs tens of us and varies from call to call (one
/// token of the paper's config against 32k cached tokens is ~7 MFLOP).
const SERIAL_FLOPS: usize = 10_000_000;

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

impl<T: Element> Kernel for GroupCall<'_, T> {
    type Out = ();
    #[inline(always)]
    fn run<F: Fma, const W: usize>(self) {
        let GroupCall { cache, s, g, q, gates, o, chosen, scr } = self;
        let (cfg, h) = (&cache.cfg, &cache.heads);
        let (hq, dk, dv, group) = (h.num_q_heads, h.head_dim_k, h.head_dim_v, h.group());
        let dvp = round_up(dv, COL_MULTIPLE);
        let gp = round_up(group, TILE_ROWS);
        let sc = &cache.seqs[s];
        let t = sc.len - 1;
        let scale = cfg.softmax_scale(h);
        let head0 = s * hq + g * group;
        scr.q.clear();
        scr.q.extend(q[head0 * dk..][..group * dk].iter().map(|x| x.to_f32() * scale));
        scr.q.resize(gp * dk, 0.0);
        scr.out.clear();
        scr.out.resize(gp * dvp, 0.0);
        let dims = Dims { group, gp, dk, dvp };
        let gate_of = |gate: &mut Vec<f32>, b: usize| {
            gate.clear();
            gate.extend((0..group).map(|r| gates[(head0 + r) * 3 + b].to_f32()));
        };

        // Compressed branch: every complete block, keeping the probabilities for the choice.
        let nc = sc.blocks;
        scr.psum.clear();
        scr.psum.resize(nc, 0.0);
        if nc > 0 {
            gate_of(&mut scr.gate, 0);
            scr.runs.clear();
            scr.runs.push((0, nc));
            let psum = Some(&mut scr.psum[..]);
            attend::<F, W>(&sc.cmp[g], &scr.runs, dims, &scr.q, &scr.gate, &mut scr.p, &mut scr.out, psum);
        }
        scr.chooser.choose(cfg, t, cfg.num_selected, &scr.psum, &mut scr.chosen);
        chosen[..scr.chosen.len()].copy_from_slice(&scr.chosen);

        // Selected branch: the chosen blocks up to t, adjacent ones merged into one run.
        let ls = cfg.block_slc;
        scr.runs.clear();
        for &j in &scr.chosen {
            let (a, b) = (j as usize * ls, ((j as usize + 1) * ls).min(t + 1));
            match scr.runs.last_mut() {
                Some(last) if last.1 == a => last.1 = b,
                _ => scr.runs.push((a, b)),
            }
        }
        gate_of(&mut scr.gate, 1);
        attend::<F, W>(&sc.kv[g], &scr.runs, dims, &scr.q, &scr.gate, &mut scr.p, &mut scr.out, None);

        // Window branch: the last w keys.
        let win = if cache.separate_win { &sc.win[g] } else { &sc.kv[g] };
        scr.runs.clear();
        scr.runs.push(((t + 1).saturating_sub(cfg.window), t + 1));
        gate_of(&mut scr.gate, 2);
        attend::<F, W>(win, &scr.runs, dims, &scr.q, &scr.gate, &mut scr.p, &mut scr.out, None);

        for (r, orow) in o.chunks_exact_mut(dv).enumerate() {
            for (dst, x) in orow.iter_mut().zip(&scr.out[r * dvp..][..dv]) {
                *dst = T::from_f32(*x);
            }
        }
    }
}

/// Sizes of one task: the group, rounded up to the register tile's rows; `Dk`; padded `Dv`.
#[derive(Clone, Copy)]
struct Dims {
    group: usize,
    gp: usize,
    dk: usize,
    dvp: usize,
}

/// Key tiles `[first, last]` that a run `[a, b)` touches.
#[inline(always)]
fn tiles_of(a: usize, b: usize) -> (usize, usize) {
    (a / TILE, (b - 1) / TILE)
}

/// Softmax attention of the group's heads over the keys of `runs` (each non-empty, `[start,
/// end)`) of `kv`, adding `gate * output` into `out` (`[gp][Dv']`). With `psum`, also adds each
/// head's probabilities (before the gate) into it; `runs` must then be the one run `[0, len)`.
/// `p` is scratch: for each run, whole tiles of columns, the keys outside the run masked.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend<F: Fma, const W: usize>(
    kv: &KvStore,
    runs: &[(usize, usize)],
    dims: Dims,
    q: &[f32],
    gate: &[f32],
    p: &mut Vec<f32>,
    out: &mut [f32],
    psum: Option<&mut [f32]>,
) {
    let Dims { group, gp, dk, dvp } = dims;
    let cols: usize = runs.iter().map(|&(a, b)| (tiles_of(a, b).1 - tiles_of(a, b).0 + 1) * TILE).sum();
    p.clear();
    p.resize(gp * cols, 0.0);

    // Scores: per key tile, [gp x Dk] times [Dk x 16].
    let mut base = 0;
    for &(a, b) in runs {
        let (t0, t1) = tiles_of(a, b);
        for tile in t0..=t1 {
            let kt = &kv.k[tile * dk * TILE..][..dk * TILE];
            gemm_acc::<F, TILE>(gp, TILE, dk, q, dk, kt, TILE, &mut p[base + (tile - t0) * TILE..], cols);
        }
        // Mask the keys of the end tiles outside the run.
        let (lo, hi) = (base + a % TILE, base + (b - t0 * TILE));
        let end = base + (t1 - t0 + 1) * TILE;
        for row in p.chunks_exact_mut(cols).take(group) {
            row[base..lo].fill(f32::NEG_INFINITY);
            row[hi..end].fill(f32::NEG_INFINITY);
        }
        base = end;
    }

    // Softmax per head (rows a multiple of 16 long), then the gate.
    let mut psum = psum;
    for (r, row) in p.chunks_exact_mut(cols).enumerate() {
        if r >= group {
            row.fill(0.0);
            continue;
        }
        let mut m = [f32::NEG_INFINITY; 16];
        for c in row.chunks_exact(16) {
            for l in 0..16 {
                m[l] = m[l].max(c[l]);
            }
        }
        let m = m.iter().fold(f32::NEG_INFINITY, |x, &y| x.max(y));
        let mut sum = [0f32; 16];
        for c in row.chunks_exact_mut(16) {
            for l in 0..16 {
                c[l] = exp::<F>(c[l] - m);
                sum[l] += c[l];
            }
        }
        let sum: f32 = sum.iter().sum();
        let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        if let Some(ps) = psum.as_deref_mut() {
            for (acc, x) in ps.iter_mut().zip(row.iter_mut()) {
                *x *= inv;
                *acc += *x;
            }
            let g = gate[r];
            for x in row.iter_mut() {
                *x *= g;
            }
        } else {
            let f = inv * gate[r];
            for x in row.iter_mut() {
                *x *= f;
            }
        }
    }

    // Output: per run, [gp x keys] times [keys x Dv'].
    let mut base = 0;
    for &(a, b) in runs {
        let (t0, t1) = tiles_of(a, b);
        gemm_acc::<F, W>(gp, dvp, b - a, &p[base + a % TILE..], cols, &kv.v[a * dvp..], dvp, out, dvp);
        base += (t1 - t0 + 1) * TILE;
    }
}
