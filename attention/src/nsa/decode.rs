//! Single-step NSA against a KV cache. The cache keeps, per sequence, the keys and values of
//! every token so far and their compressed blocks (mean pooling, as [`super::compress_mean`]),
//! adding a compressed block each time `d` more tokens complete one. A decode step computes
//! the output of each sequence's newest token: one task per (sequence, kv head) runs the
//! compressed branch for the group's heads, chooses the blocks, then the selected and window
//! branches, reading the cache in place.

use rayon::prelude::*;
use squid_cuda::Element;

use super::{scores_from_cmp, select_blocks_fast, NsaConfig, NO_BLOCK};
use crate::kernels::{self, dispatch, Fma, Kernel};
use crate::layout::{check_finite, expect_len};
use crate::{Error, Heads};

/// One sequence's cached tensors, each `[tokens or blocks, HKV, D]`.
#[derive(Debug, Clone, Default)]
struct SeqCache<T> {
    k: Vec<T>,
    v: Vec<T>,
    k_win: Vec<T>,
    v_win: Vec<T>,
    k_cmp: Vec<T>,
    v_cmp: Vec<T>,
    len: usize,
    blocks: usize,
}

/// One (sequence, kv head) of a decode step, as a [`Kernel`].
struct GroupCall<'a, T> {
    cache: &'a NsaCache<T>,
    s: usize,
    g: usize,
    q: &'a [T],
    gates: &'a [T],
}

impl<T: Element> Kernel for GroupCall<'_, T> {
    type Out = (Vec<f32>, Vec<u32>);
    #[inline(always)]
    fn run<F: Fma, const W: usize>(self) -> Self::Out {
        self.cache.decode_group::<F>(self.s, self.g, self.q, self.gates)
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
        Ok(Self { cfg, heads, separate_win, seqs: vec![SeqCache::default(); num_seqs] })
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
        let n = crate::layout::rows_of("k", k.len(), hkv, dk)?;
        expect_len("v", v.len(), n * hkv * dv, "[n, HKV, Dv]")?;
        if self.cfg.check_finite {
            check_finite("k", k)?;
            check_finite("v", v)?;
        }
        let separate = self.separate_win;
        let cfg = self.cfg;
        let num_seqs = self.seqs.len();
        let sc =
            self.seqs.get_mut(seq).ok_or_else(|| Error::Cache(format!("sequence {seq} of a cache for {num_seqs}")))?;
        match (separate, win) {
            (true, Some((kw, vw))) => {
                expect_len("k_win", kw.len(), n * hkv * dk, "[n, HKV, Dk]")?;
                expect_len("v_win", vw.len(), n * hkv * dv, "[n, HKV, Dv]")?;
                sc.k_win.extend_from_slice(kw);
                sc.v_win.extend_from_slice(vw);
            }
            (false, None) => {}
            (true, None) => return Err(Error::Cache("this cache needs the window branch's own k, v".into())),
            (false, Some(_)) => return Err(Error::Cache("this cache shares k, v with the window branch".into())),
        }
        sc.k.extend_from_slice(k);
        sc.v.extend_from_slice(v);
        sc.len += n;
        let inv = 1.0 / cfg.block_cmp as f32;
        while sc.blocks * cfg.stride_cmp + cfg.block_cmp <= sc.len {
            let first = sc.blocks * cfg.stride_cmp;
            for (src, dst, d) in [(&sc.k, &mut sc.k_cmp, dk), (&sc.v, &mut sc.v_cmp, dv)] {
                let row = hkv * d;
                let mut acc = vec![0f32; row];
                for t in first..first + cfg.block_cmp {
                    for (a, x) in acc.iter_mut().zip(&src[t * row..][..row]) {
                        *a += x.to_f32();
                    }
                }
                dst.extend(acc.iter().map(|a| T::from_f32(a * inv)));
            }
            sc.blocks += 1;
        }
        Ok(())
    }

    /// The NSA output of each sequence's newest token: `q [num_seqs, HQ, Dk]`, `gates
    /// [num_seqs, HQ, 3]`. Every sequence must hold at least one token.
    pub fn decode(&self, q: &[T], gates: &[T]) -> Result<NsaDecodeOutput<T>, Error> {
        let h = self.heads;
        let (hq, hkv, dk, dv, n) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v, self.cfg.num_selected);
        let ns = self.seqs.len();
        expect_len("q", q.len(), ns * hq * dk, "[num_seqs, HQ, Dk]")?;
        expect_len("gates", gates.len(), ns * hq * 3, "[num_seqs, HQ, 3]")?;
        if let Some(s) = self.seqs.iter().position(|s| s.len == 0) {
            return Err(Error::Cache(format!("sequence {s} is empty: append its token before decoding")));
        }
        if self.cfg.check_finite {
            check_finite("q", q)?;
            check_finite("gates", gates)?;
        }
        let parts: Vec<(Vec<f32>, Vec<u32>)> = (0..ns * hkv)
            .into_par_iter()
            .map(|task| dispatch(GroupCall { cache: self, s: task / hkv, g: task % hkv, q, gates }))
            .collect();
        let mut o = vec![T::default(); ns * hq * dv];
        let mut indices = vec![NO_BLOCK; ns * hkv * n];
        let group = h.group();
        for (task, (out, ix)) in parts.into_iter().enumerate() {
            let (s, g) = (task / hkv, task % hkv);
            for (dst, x) in o[(s * hq + g * group) * dv..][..group * dv].iter_mut().zip(&out) {
                *dst = T::from_f32(*x);
            }
            indices[(s * hkv + g) * n..][..ix.len()].copy_from_slice(&ix);
        }
        Ok(NsaDecodeOutput { o, indices })
    }

    /// One (sequence, kv head): the group's gated outputs `[group, Dv]` and the chosen blocks.
    #[inline(always)]
    fn decode_group<F: Fma>(&self, s: usize, g: usize, q: &[T], gates: &[T]) -> (Vec<f32>, Vec<u32>) {
        let (cfg, h) = (&self.cfg, &self.heads);
        let (hq, hkv, dk, dv, group) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v, h.group());
        let sc = &self.seqs[s];
        let t = sc.len - 1;
        let scale = cfg.softmax_scale(h);
        let qs: Vec<Vec<f32>> = (0..group)
            .map(|r| q[(s * hq + g * group + r) * dk..][..dk].iter().map(|x| x.to_f32() * scale).collect())
            .collect();
        let gate =
            |b: usize| -> Vec<f32> { (0..group).map(|hh| gates[(s * hq + g * group + hh) * 3 + b].to_f32()).collect() };
        let mut out = vec![0f32; group * dv];
        let mut at = Attend { qs: &qs, hkv, g, dk, dv, out: &mut out };
        let nc = cfg.num_cmp_blocks(t + 1);
        let p_cmp = at.run::<T, F>(&sc.k_cmp, &sc.v_cmp, &(0..nc).collect::<Vec<_>>(), &gate(0));
        let mut psum = vec![0f32; nc];
        for p in &p_cmp {
            for (a, b) in psum.iter_mut().zip(p) {
                *a += b;
            }
        }
        let mut scores = vec![0f32; t / cfg.block_slc + 1];
        scores_from_cmp(cfg, &psum, &mut scores);
        let mut chosen = Vec::new();
        select_blocks_fast(cfg, t, &scores, &mut chosen);
        let ls = cfg.block_slc;
        let slc_rows: Vec<usize> =
            chosen.iter().flat_map(|&j| j as usize * ls..((j as usize + 1) * ls).min(t + 1)).collect();
        at.run::<T, F>(&sc.k, &sc.v, &slc_rows, &gate(1));
        let (kw, vw) = if self.separate_win { (&sc.k_win, &sc.v_win) } else { (&sc.k, &sc.v) };
        at.run::<T, F>(kw, vw, &((t + 1).saturating_sub(cfg.window)..t + 1).collect::<Vec<_>>(), &gate(2));
        (out, chosen)
    }
}

/// Softmax attention of every head of a group over listed key rows, adding `gate * output`
/// into `out` (`[group, Dv]`). A struct, not a closure, so it inlines into the per-ISA code.
struct Attend<'a> {
    qs: &'a [Vec<f32>],
    hkv: usize,
    g: usize,
    dk: usize,
    dv: usize,
    out: &'a mut [f32],
}

impl Attend<'_> {
    /// Returns the probabilities per head.
    #[inline(always)]
    fn run<T: Element, F: Fma>(&mut self, km: &[T], vm: &[T], rows: &[usize], gates: &[f32]) -> Vec<Vec<f32>> {
        let (hkv, g, dk, dv) = (self.hkv, self.g, self.dk, self.dv);
        let mut buf = vec![0f32; dk.max(dv)];
        let mut scores = vec![vec![0f32; rows.len()]; self.qs.len()];
        for (c, &r) in rows.iter().enumerate() {
            for (b, x) in buf.iter_mut().zip(&km[(r * hkv + g) * dk..][..dk]) {
                *b = x.to_f32();
            }
            for (hh, qr) in self.qs.iter().enumerate() {
                scores[hh][c] = kernels::dot::<F>(qr, &buf[..dk]);
            }
        }
        for sc_h in scores.iter_mut() {
            let mut m = f32::NEG_INFINITY;
            for &x in sc_h.iter() {
                m = m.max(x);
            }
            let mut sum = 0f32;
            for x in sc_h.iter_mut() {
                *x = kernels::exp(*x - m);
                sum += *x;
            }
            let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
            for x in sc_h.iter_mut() {
                *x *= inv;
            }
        }
        for (c, &r) in rows.iter().enumerate() {
            for (b, x) in buf.iter_mut().zip(&vm[(r * hkv + g) * dv..][..dv]) {
                *b = x.to_f32();
            }
            for (hh, p) in scores.iter().enumerate() {
                kernels::axpy::<F>(gates[hh] * p[c], &buf[..dv], &mut self.out[hh * dv..][..dv]);
            }
        }
        scores
    }
}
