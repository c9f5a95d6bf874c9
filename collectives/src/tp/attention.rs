//! Self-attention with its heads split across the ranks (Megatron-LM's parallel attention): the
//! Q, K, V projections are column-parallel (each rank computes its own heads), attention runs on
//! the local heads with no communication, and the output projection is row-parallel (`g` sums
//! the ranks' partial outputs). One all-reduce forward (`g`) and one backward (`f`).
//!
//! The attention core here is a plain causal softmax attention over packed sequences
//! (`cu_seqlens`), written for clarity (it stores the probabilities); the fast kernels live in
//! squid-attention, which this crate does not depend on.

use super::linear::{linear_backward, linear_forward};
use super::{check_len, copy_to_tp_region_backward, reduce_from_tp_region, shard, Result, TpError, TpRank};
use crate::{Communicator, ReduceOp};

/// Which heads each rank holds, for `q_heads` query heads sharing `kv_heads` key/value heads
/// (GQA: query head h reads kv head `h / (q_heads / kv_heads)`).
///
/// The rule, for a world of p ranks:
/// - `q_heads % kv_heads == 0` and `q_heads % p == 0`; rank r holds query heads
///   `r * q_heads/p .. (r+1) * q_heads/p`.
/// - **Split** (`kv_heads >= p`): `kv_heads % p == 0`; rank r holds kv heads
///   `r * kv_heads/p .. (r+1) * kv_heads/p`, exactly those its query heads read.
/// - **Replicated** (`kv_heads < p`): `p % kv_heads == 0`; each kv head is held by
///   `p / kv_heads` consecutive ranks, rank r holding kv head `r / (p / kv_heads)`, the one all
///   its query heads read. The replicas' weight gradients are partial (each rank's query heads
///   only) and are summed over the replicas in backward, so every replica holds the same full
///   gradient and the copies stay equal under any optimizer step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLayout {
    /// Query heads of the full layer.
    q_heads: usize,
    /// Key/value heads of the full layer.
    kv_heads: usize,
    /// Width of one head.
    head_dim: usize,
    /// Query heads on this rank.
    local_q_heads: usize,
    /// First query head on this rank.
    q_head_start: usize,
    /// Key/value heads on this rank (1 when replicated).
    local_kv_heads: usize,
    /// First key/value head on this rank.
    kv_head_start: usize,
    /// How many ranks hold each kv head: 1 when split, `p / kv_heads` when replicated.
    kv_replicas: usize,
    /// This rank.
    tp: TpRank,
}

impl HeadLayout {
    /// Query heads of the full layer.
    pub fn q_heads(&self) -> usize {
        self.q_heads
    }

    /// Key/value heads of the full layer.
    pub fn kv_heads(&self) -> usize {
        self.kv_heads
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }

    /// Query heads on this rank.
    pub fn local_q_heads(&self) -> usize {
        self.local_q_heads
    }

    /// First query head on this rank.
    pub fn q_head_start(&self) -> usize {
        self.q_head_start
    }

    /// Key/value heads on this rank (1 when replicated).
    pub fn local_kv_heads(&self) -> usize {
        self.local_kv_heads
    }

    /// First key/value head on this rank.
    pub fn kv_head_start(&self) -> usize {
        self.kv_head_start
    }

    /// How many ranks hold each kv head: 1 when split, `p / kv_heads` when replicated.
    pub fn kv_replicas(&self) -> usize {
        self.kv_replicas
    }

    /// This rank.
    pub fn tp(&self) -> TpRank {
        self.tp
    }

    /// Places the heads on rank `tp` by the rule above, or says which part of it fails.
    pub fn new(q_heads: usize, kv_heads: usize, head_dim: usize, tp: TpRank) -> Result<Self> {
        let world = tp.world;
        let fail = |reason| Err(TpError::Heads { q_heads, kv_heads, world, reason });
        if q_heads == 0 || kv_heads == 0 || head_dim == 0 {
            return fail("head counts and head_dim must be at least 1");
        }
        if q_heads % kv_heads != 0 {
            return fail("q_heads must be a multiple of kv_heads");
        }
        if q_heads % world != 0 {
            return fail("q_heads must divide by the world size");
        }
        let local_q_heads = q_heads / world;
        let (local_kv_heads, kv_head_start, kv_replicas) = if kv_heads >= world {
            if kv_heads % world != 0 {
                return fail("kv_heads >= world size must divide by it");
            }
            (kv_heads / world, tp.rank * kv_heads / world, 1)
        } else {
            if world % kv_heads != 0 {
                return fail("kv_heads < world size must divide it (each kv head is replicated)");
            }
            let replicas = world / kv_heads;
            (1, tp.rank / replicas, replicas)
        };
        Ok(Self {
            q_heads,
            kv_heads,
            head_dim,
            local_q_heads,
            q_head_start: tp.rank * local_q_heads,
            local_kv_heads,
            kv_head_start,
            kv_replicas,
            tp,
        })
    }

    /// Query heads per kv head.
    pub fn group(&self) -> usize {
        self.q_heads / self.kv_heads
    }

    /// The local kv head that local query head `h` reads (`h / group`: the same formula covers
    /// the split and the replicated case).
    pub fn kv_of(&self, local_q_head: usize) -> usize {
        local_q_head / self.group()
    }
}

/// The four weights of one attention layer on one rank (PyTorch layout `[out, in]`):
/// `wq: [local_q_heads * D, d_model]`, `wk, wv: [local_kv_heads * D, d_model]`,
/// `wo: [d_model, local_q_heads * D]`. Also used for their gradients.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionWeights {
    /// Query projection rows of this rank's query heads.
    pub wq: Vec<f32>,
    /// Key projection rows of this rank's kv heads.
    pub wk: Vec<f32>,
    /// Value projection rows of this rank's kv heads.
    pub wv: Vec<f32>,
    /// Output projection columns of this rank's query heads.
    pub wo: Vec<f32>,
}

/// What forward keeps for backward (this rank's heads).
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionCache {
    cu_seqlens: Vec<u32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    probs: Vec<f32>,
    o: Vec<f32>,
}

/// Causal self-attention of `d_model` wide tokens with heads split across the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParallelAttention {
    /// Model width (input and output of the layer).
    d_model: usize,
    /// Which heads this rank holds.
    layout: HeadLayout,
}

impl ParallelAttention {
    /// Model width (input and output of the layer).
    pub fn d_model(&self) -> usize {
        self.d_model
    }

    /// Which heads this rank holds.
    pub fn layout(&self) -> HeadLayout {
        self.layout
    }

    /// A layer on rank `tp` (see [`HeadLayout`] for which head counts are allowed).
    pub fn new(d_model: usize, q_heads: usize, kv_heads: usize, head_dim: usize, tp: TpRank) -> Result<Self> {
        super::nonzero("d_model", d_model)?;
        Ok(Self { d_model, layout: HeadLayout::new(q_heads, kv_heads, head_dim, tp)? })
    }

    fn q_width(&self) -> usize {
        self.layout.local_q_heads.saturating_mul(self.layout.head_dim)
    }

    fn kv_width(&self) -> usize {
        self.layout.local_kv_heads.saturating_mul(self.layout.head_dim)
    }

    /// Zeroed weights of this rank's shapes (for gradients); [`TpError::OutOfMemory`] where the
    /// dims ask for more than can be allocated.
    pub fn zeros(&self) -> Result<AttentionWeights> {
        let (q, kv, d) = (self.q_width(), self.kv_width(), self.d_model);
        let zeros = |what: &'static str, rows: usize| -> Result<Vec<f32>> {
            let elements = rows.saturating_mul(d);
            let mut v = Vec::new();
            if rows.checked_mul(d).is_none() || v.try_reserve_exact(elements).is_err() {
                return Err(TpError::OutOfMemory { what, elements });
            }
            v.resize(elements, 0.0);
            Ok(v)
        };
        Ok(AttentionWeights { wq: zeros("wq", q)?, wk: zeros("wk", kv)?, wv: zeros("wv", kv)?, wo: zeros("wo", q)? })
    }

    /// This rank's shard of the full weights `wq: [q_heads * D, d_model]`,
    /// `wk, wv: [kv_heads * D, d_model]`, `wo: [d_model, q_heads * D]`.
    pub fn shard(&self, wq: &[f32], wk: &[f32], wv: &[f32], wo: &[f32]) -> Result<AttentionWeights> {
        let l = &self.layout;
        let (d, hd) = (self.d_model, l.head_dim);
        check_len("ParallelAttention::shard", "wq", wq.len(), l.q_heads.saturating_mul(hd).saturating_mul(d))?;
        check_len("ParallelAttention::shard", "wk", wk.len(), l.kv_heads.saturating_mul(hd).saturating_mul(d))?;
        check_len("ParallelAttention::shard", "wv", wv.len(), l.kv_heads.saturating_mul(hd).saturating_mul(d))?;
        let kv_rows = |w: &[f32]| w[l.kv_head_start * hd * d..(l.kv_head_start + l.local_kv_heads) * hd * d].to_vec();
        Ok(AttentionWeights {
            wq: shard::split_rows(wq, l.q_heads * hd, d, l.tp)?,
            wk: kv_rows(wk),
            wv: kv_rows(wv),
            wo: shard::split_cols(wo, d, l.q_heads * hd, l.tp)?,
        })
    }

    /// The full weights (or gradients) from every rank's shard; for replicated kv heads the
    /// first replica's copy is taken (backward keeps the replicas' gradients equal).
    pub fn gather<C: Communicator>(&self, comm: &C, local: &AttentionWeights) -> Result<AttentionWeights> {
        let l = &self.layout;
        let (d, hd) = (self.d_model, l.head_dim);
        let kv_full = |w: &[f32]| -> Result<Vec<f32>> {
            let all = shard::gather_rows(comm, w, l.local_kv_heads * hd, d)?;
            let block = w.len();
            Ok((0..l.tp.world).step_by(l.kv_replicas).flat_map(|r| &all[r * block..(r + 1) * block]).copied().collect())
        };
        Ok(AttentionWeights {
            wq: shard::gather_rows(comm, &local.wq, l.local_q_heads * hd, d)?,
            wk: kv_full(&local.wk)?,
            wv: kv_full(&local.wv)?,
            wo: shard::gather_cols(comm, &local.wo, d, l.local_q_heads * hd)?,
        })
    }

    fn check(&self, op: &'static str, x: &[f32], cu_seqlens: &[u32], w: &AttentionWeights) -> Result<usize> {
        let tokens = x.len() / self.d_model;
        check_len(op, "x", x.len(), tokens.saturating_mul(self.d_model))?;
        check_seqlens(op, cu_seqlens, tokens)?;
        let (q, kv) = (self.q_width() * self.d_model, self.kv_width() * self.d_model);
        check_len(op, "wq", w.wq.len(), q)?;
        check_len(op, "wk", w.wk.len(), kv)?;
        check_len(op, "wv", w.wv.len(), kv)?;
        check_len(op, "wo", w.wo.len(), q)?;
        Ok(tokens)
    }

    /// `y[T, d_model] = g(attention over this rank's heads of x[T, d_model])`, causal within
    /// each packed sequence of `cu_seqlens`; the same `y` on every rank.
    pub fn forward<C: Communicator>(
        &self,
        comm: &C,
        x: &[f32],
        cu_seqlens: &[u32],
        w: &AttentionWeights,
        y: &mut [f32],
    ) -> Result<AttentionCache> {
        const OP: &str = "ParallelAttention::forward";
        self.layout.tp.check(comm)?;
        let tokens = self.check(OP, x, cu_seqlens, w)?;
        check_len(OP, "y", y.len(), x.len())?;
        let (d, qw, kvw) = (self.d_model, self.q_width(), self.kv_width());
        let mut q = vec![0.0; tokens * qw];
        let mut k = vec![0.0; tokens * kvw];
        let mut v = vec![0.0; tokens * kvw];
        linear_forward(x, tokens, d, &w.wq, qw, None, &mut q);
        linear_forward(x, tokens, d, &w.wk, kvw, None, &mut k);
        linear_forward(x, tokens, d, &w.wv, kvw, None, &mut v);
        let (probs, o) = self.core_forward(cu_seqlens, &q, &k, &v);
        linear_forward(&o, tokens, qw, &w.wo, d, None, y);
        reduce_from_tp_region(comm, y)?;
        Ok(AttentionCache { cu_seqlens: cu_seqlens.to_vec(), q, k, v, probs, o })
    }

    /// Backward of [`ParallelAttention::forward`] for the output gradient `dy` (the same on
    /// every rank): `dx` is overwritten with the full input gradient (f's all-reduce), weight
    /// gradients accumulate into `grads`. Replicated kv weight gradients are summed over their
    /// replicas (one more all-reduce, of the full kv weight size).
    #[allow(clippy::too_many_arguments)]
    pub fn backward<C: Communicator>(
        &self,
        comm: &C,
        x: &[f32],
        cu_seqlens: &[u32],
        w: &AttentionWeights,
        cache: &AttentionCache,
        dy: &[f32],
        dx: &mut [f32],
        grads: &mut AttentionWeights,
    ) -> Result<()> {
        const OP: &str = "ParallelAttention::backward";
        self.layout.tp.check(comm)?;
        let tokens = self.check(OP, x, cu_seqlens, w)?;
        self.check(OP, x, cu_seqlens, grads)?;
        check_len(OP, "dy", dy.len(), x.len())?;
        check_len(OP, "dx", dx.len(), x.len())?;
        let (d, qw, kvw) = (self.d_model, self.q_width(), self.kv_width());
        if cache.cu_seqlens != cu_seqlens || cache.o.len() != tokens * qw || cache.k.len() != tokens * kvw {
            return Err(TpError::SeqLens { op: OP, reason: "the cache comes from a forward of another batch".into() });
        }

        let mut d_o = vec![0.0; tokens * qw];
        linear_backward(&cache.o, tokens, qw, &w.wo, d, dy, Some(&mut d_o), &mut grads.wo, None);
        let (dq, dk, dv) = self.core_backward(cu_seqlens, cache, &d_o);

        let mut dx_part = vec![0.0; x.len()];
        linear_backward(x, tokens, d, &w.wq, qw, &dq, Some(&mut *dx), &mut grads.wq, None);
        // This step's kv weight gradients, apart: replicas must be summed before accumulating.
        let mut dwkv = vec![0.0; 2 * kvw * d];
        let (dwk, dwv) = dwkv.split_at_mut(kvw * d);
        linear_backward(x, tokens, d, &w.wk, kvw, &dk, Some(&mut dx_part), dwk, None);
        add_into(dx, &dx_part);
        linear_backward(x, tokens, d, &w.wv, kvw, &dv, Some(&mut dx_part), dwv, None);
        add_into(dx, &dx_part);
        if self.layout.kv_replicas > 1 {
            self.sum_over_replicas(comm, &mut dwkv)?;
        }
        let (dwk, dwv) = dwkv.split_at(kvw * d);
        add_into(&mut grads.wk, dwk);
        add_into(&mut grads.wv, dwv);
        copy_to_tp_region_backward(comm, dx)
    }

    /// Sums `[dwk; dwv]` (one kv head each) over the ranks holding the same kv head: every rank
    /// places its pair in its head's slot of a zeroed full-size buffer, one all-reduce sums them,
    /// and each rank reads its slot back.
    fn sum_over_replicas<C: Communicator>(&self, comm: &C, dwkv: &mut [f32]) -> Result<()> {
        let slot = dwkv.len();
        let mut full = vec![0.0; slot * self.layout.kv_heads];
        let start = self.layout.kv_head_start * slot;
        full[start..start + slot].copy_from_slice(dwkv);
        comm.all_reduce_in_place(&mut full, ReduceOp::Sum)?;
        dwkv.copy_from_slice(&full[start..start + slot]);
        Ok(())
    }

    /// Causal softmax attention on the local heads: returns the probabilities (per sequence,
    /// per head, `L x L` row-major, upper triangle zero) and the output `o: [T, local_q * D]`.
    fn core_forward(&self, cu_seqlens: &[u32], q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let l = &self.layout;
        let (hd, qw, kvw) = (l.head_dim, self.q_width(), self.kv_width());
        let scale = 1.0 / (hd as f32).sqrt();
        let mut probs = Vec::new();
        let mut o = vec![0.0; q.len()];
        for seq in cu_seqlens.windows(2) {
            let (s0, len) = (seq[0] as usize, (seq[1] - seq[0]) as usize);
            for h in 0..l.local_q_heads {
                let kvh = l.kv_of(h);
                let base = probs.len();
                probs.resize(base + len * len, 0.0);
                for i in 0..len {
                    let qi = &q[(s0 + i) * qw + h * hd..][..hd];
                    let row = &mut probs[base + i * len..base + (i + 1) * len];
                    let mut max = f32::NEG_INFINITY;
                    for (j, p) in row.iter_mut().enumerate().take(i + 1) {
                        let kj = &k[(s0 + j) * kvw + kvh * hd..][..hd];
                        *p = scale * dot(qi, kj);
                        max = max.max(*p);
                    }
                    let mut sum = 0.0;
                    for p in &mut row[..=i] {
                        *p = (*p - max).exp();
                        sum += *p;
                    }
                    let oi = &mut o[(s0 + i) * qw + h * hd..][..hd];
                    for (j, p) in row[..=i].iter_mut().enumerate() {
                        *p /= sum;
                        let vj = &v[(s0 + j) * kvw + kvh * hd..][..hd];
                        for (od, vd) in oi.iter_mut().zip(vj) {
                            *od += *p * vd;
                        }
                    }
                }
            }
        }
        (probs, o)
    }

    /// Backward of [`Self::core_forward`]: `dP = dO V^T`, `dS = P * (dP - rowsum(P * dP))`,
    /// `dQ = scale dS K`, `dK = scale dS^T Q`, `dV = P^T dO`.
    fn core_backward(&self, cu_seqlens: &[u32], cache: &AttentionCache, d_o: &[f32]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let l = &self.layout;
        let (hd, qw, kvw) = (l.head_dim, self.q_width(), self.kv_width());
        let scale = 1.0 / (hd as f32).sqrt();
        let (q, k, v) = (&cache.q, &cache.k, &cache.v);
        let mut dq = vec![0.0; q.len()];
        let mut dk = vec![0.0; k.len()];
        let mut dv = vec![0.0; v.len()];
        let mut base = 0;
        let mut dp = Vec::new();
        for seq in cu_seqlens.windows(2) {
            let (s0, len) = (seq[0] as usize, (seq[1] - seq[0]) as usize);
            for h in 0..l.local_q_heads {
                let kvh = l.kv_of(h);
                for i in 0..len {
                    let p = &cache.probs[base + i * len..][..=i];
                    let doi = &d_o[(s0 + i) * qw + h * hd..][..hd];
                    dp.clear();
                    for (j, &pj) in p.iter().enumerate() {
                        let off = (s0 + j) * kvw + kvh * hd;
                        dp.push(dot(doi, &v[off..off + hd]));
                        for (g, od) in dv[off..off + hd].iter_mut().zip(doi) {
                            *g += pj * od;
                        }
                    }
                    let row_dot: f32 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
                    let qi_off = (s0 + i) * qw + h * hd;
                    for (j, (&pj, &dpj)) in p.iter().zip(&dp).enumerate() {
                        let ds = scale * pj * (dpj - row_dot);
                        let off = (s0 + j) * kvw + kvh * hd;
                        for e in 0..hd {
                            dq[qi_off + e] += ds * k[off + e];
                            dk[off + e] += ds * q[qi_off + e];
                        }
                    }
                }
                base += len * len;
            }
        }
        (dq, dk, dv)
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn add_into(acc: &mut [f32], x: &[f32]) {
    for (a, b) in acc.iter_mut().zip(x) {
        *a += b;
    }
}

/// Checks packed-sequence offsets: start at 0, never decrease, end at `tokens`.
pub(crate) fn check_seqlens(op: &'static str, cu_seqlens: &[u32], tokens: usize) -> Result<()> {
    let bad = |reason: String| Err(TpError::SeqLens { op, reason });
    match (cu_seqlens.first(), cu_seqlens.last()) {
        (Some(0), Some(&end)) if end as usize == tokens => {}
        _ => return bad(format!("must start at 0 and end at the token count {tokens}, got {cu_seqlens:?}")),
    }
    if let Some(i) = cu_seqlens.windows(2).position(|w| w[1] < w[0]) {
        return bad(format!("offset {} ({}) is below offset {} ({})", i + 1, cu_seqlens[i + 1], i, cu_seqlens[i]));
    }
    Ok(())
}
