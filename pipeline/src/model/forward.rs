//! The forward pass over a packed batch, keeping every activation the backward needs.
//!
//! Per block (`T` tokens of the batch, `d = d_model`, `hq, hkv` heads of `hd` dims, `f` hidden):
//! ```text
//! x_in  [T, d]                      residual stream entering the block
//! xn1   = rmsnorm(x_in) * attn_norm  (inv1 [T] = 1 / rms)
//! q     = rope(xn1 Wq^T)   [T, hq, hd]   k = rope(xn1 Wk^T) [T, hkv, hd]   v = xn1 Wv^T
//! o     = attention(q, k, v) [T, hq, hd] (dense / segments / NSA with gates sigmoid(xn1 Wg^T))
//! x_mid = x_in + o Wo^T                  (the sum over tensor-parallel ranks happens here)
//! xn2   = rmsnorm(x_mid) * mlp_norm
//! a = xn2 Wgate^T, b = xn2 Wup^T [T, f];  h = silu(a) * b
//! x_out = x_mid + h Wdown^T              (and here)
//! ```
//! then `xnf = rmsnorm(x_out) * final_norm` and `logits = xnf E^T` `[T, vocab]` (tied head).
//! RoPE rotates q and k at each token's position inside its own sequence.

use squid_attention::dense::{self, DenseConfig};
use squid_attention::nsa::{self, NsaInputs, NsaOutput};
use squid_attention::segments::{self, SegmentConfig, SegmentLayout};
use squid_attention::Heads;
use squid_kvcache::Rope;

use super::config::{AttentionKind, ModelConfig};
use super::layers::{add_into, embed_forward, rmsnorm_forward, sigmoid_in_place, swiglu_forward};
use super::matmul::linear;
use super::weights::Dims;
use super::Batch;
use crate::Error;

/// Sums a partial activation over the tensor-parallel ranks (a no-op for the whole model).
pub(crate) trait Reducer {
    /// Element-wise sum over the ranks, in place.
    fn sum(&self, buf: &mut [f32]) -> Result<(), Error>;
}

/// The reducer of an unsharded model.
pub(crate) struct NoReduce;

impl Reducer for NoReduce {
    fn sum(&self, _buf: &mut [f32]) -> Result<(), Error> {
        Ok(())
    }
}

/// A batch checked against the config, with what every layer reuses.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    pub tokens: Vec<u32>,
    pub cu_seqlens: Vec<u32>,
    /// Position of each token inside its sequence.
    pub positions: Vec<u64>,
    /// Segment layout (segment attention only).
    pub layout: Option<SegmentLayout>,
    /// Segment attention with at least one non-empty document: where the documents are.
    pub docs: Option<DocRows>,
}

/// The documents of a segment-attention batch, which the forward computes alone.
///
/// A document attends only to itself, so it is computed as its own sequence at positions
/// `0..n` (one dense causal call over all documents packed), exactly as a rollout session
/// computes it once for its document cache; the keys that later `Global` tokens see are the same
/// pre-RoPE keys rotated to the document's true positions, which is what the session does when it
/// places a cached document at an offset. The model is the same function (RoPE makes a
/// document's attention depend on relative positions only); the order of every sum is now the
/// session's, so rollout and training log-probs agree bitwise.
#[derive(Debug, Clone)]
pub(crate) struct DocRows {
    /// Per token: its position inside its document, or inside its sequence for Global tokens.
    pub local_positions: Vec<u64>,
    /// Batch rows of the documents' tokens, document after document.
    pub rows: Vec<usize>,
    /// `[documents + 1]` offsets into `rows`.
    pub cu: Vec<u32>,
    /// `local_positions` of `rows`.
    pub positions: Vec<u64>,
}

impl DocRows {
    fn new(segs: &[Vec<segments::Segment>], cu_seqlens: &[u32]) -> Option<Self> {
        let total = *cu_seqlens.last()? as usize;
        let mut local_positions = Vec::with_capacity(total);
        let (mut rows, mut cu, mut positions) = (Vec::new(), vec![0u32], Vec::new());
        for (seq, w) in segs.iter().zip(cu_seqlens.windows(2)) {
            let mut at = w[0] as usize;
            for sg in seq {
                match sg.kind {
                    segments::SegmentKind::Document if sg.len > 0 => {
                        local_positions.extend(0..sg.len as u64);
                        rows.extend(at..at + sg.len);
                        positions.extend(0..sg.len as u64);
                        cu.push(rows.len() as u32);
                    }
                    _ => local_positions.extend((at - w[0] as usize) as u64..(at + sg.len - w[0] as usize) as u64),
                }
                at += sg.len;
            }
        }
        (!rows.is_empty() && local_positions.len() == total).then_some(Self { local_positions, rows, cu, positions })
    }

    /// Rows `rows` of `x [T, width]`, packed.
    pub fn gather(&self, x: &[f32], width: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.rows.len() * width);
        for &r in &self.rows {
            out.extend_from_slice(&x[r * width..(r + 1) * width]);
        }
        out
    }

    /// `x[rows] = packed` (`add`: `+=`).
    pub fn scatter(&self, x: &mut [f32], packed: &[f32], width: usize, add: bool) {
        for (&r, src) in self.rows.iter().zip(packed.chunks_exact(width)) {
            let dst = &mut x[r * width..(r + 1) * width];
            if add {
                add_into(dst, src);
            } else {
                dst.copy_from_slice(src);
            }
        }
    }
}

impl Prepared {
    /// Checks token ids, offsets and (segment attention) the segments' coverage.
    pub fn new(config: &ModelConfig, batch: &Batch) -> Result<Self, Error> {
        let total = batch.tokens.len();
        if let Some((i, &t)) = batch.tokens.iter().enumerate().find(|(_, &t)| t as usize >= config.vocab) {
            return Err(Error::Shape(format!(
                "token {t} at position {i} is outside the vocabulary of {}",
                config.vocab
            )));
        }
        let num_seqs = squid_attention::validate_cu_seqlens(&batch.cu_seqlens, total)
            .map_err(|e| Error::Shape(format!("batch: {e}")))?;
        let mut positions = Vec::with_capacity(total);
        for w in batch.cu_seqlens.windows(2) {
            positions.extend(0..u64::from(w[1] - w[0]));
        }
        let mut docs = None;
        let layout = match config.attention {
            AttentionKind::Segments => {
                let segs: Vec<Vec<segments::Segment>> = if batch.segments.is_empty() {
                    batch
                        .cu_seqlens
                        .windows(2)
                        .map(|w| vec![segments::Segment::global((w[1] - w[0]) as usize)])
                        .collect()
                } else {
                    if batch.segments.len() != num_seqs {
                        return Err(Error::Shape(format!(
                            "batch: {} segment lists for {num_seqs} sequences",
                            batch.segments.len()
                        )));
                    }
                    batch.segments.clone()
                };
                let layout =
                    SegmentLayout::new(&segs, &batch.cu_seqlens).map_err(|e| Error::Shape(format!("batch: {e}")))?;
                docs = DocRows::new(&segs, &batch.cu_seqlens);
                Some(layout)
            }
            _ => None,
        };
        Ok(Self { tokens: batch.tokens.clone(), cu_seqlens: batch.cu_seqlens.clone(), positions, layout, docs })
    }

    /// Tokens in the batch.
    pub fn total(&self) -> usize {
        self.tokens.len()
    }
}

/// What attention kept for its backward.
#[derive(Debug, Clone)]
pub(crate) enum AttnActs {
    /// Dense or segment attention: output and log-sum-exp.
    Flash { o: Vec<f32>, lse: Vec<f32> },
    /// NSA: the op's outputs (chosen blocks included), compressed K/V and the gates (after the
    /// sigmoid).
    Nsa { out: Box<NsaOutput<f32>>, k_cmp: Vec<f32>, v_cmp: Vec<f32>, gates: Vec<f32> },
    /// Segment attention with documents computed alone (see [`DocRows`]): `o` merged; the
    /// segment call over the batch (`o_seg`, `lse_seg`; its document rows unused) and the dense
    /// call over the packed documents (their q, keys at local positions, values, `o_doc`, `lse_doc`).
    Docs {
        o: Vec<f32>,
        o_seg: Vec<f32>,
        lse_seg: Vec<f32>,
        q_doc: Vec<f32>,
        k_doc: Vec<f32>,
        v_doc: Vec<f32>,
        o_doc: Vec<f32>,
        lse_doc: Vec<f32>,
    },
}

impl AttnActs {
    /// The attention output `[T, hq, hd]`.
    pub fn o(&self) -> &[f32] {
        match self {
            Self::Flash { o, .. } | Self::Docs { o, .. } => o,
            Self::Nsa { out, .. } => &out.o,
        }
    }
}

/// One block's activations.
#[derive(Debug, Clone)]
pub(crate) struct LayerActs {
    pub x_in: Vec<f32>,
    pub inv1: Vec<f32>,
    pub xn1: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    /// Keys before RoPE (kept for batches with documents only, else empty).
    pub k_pre: Vec<f32>,
    pub v: Vec<f32>,
    pub attn: AttnActs,
    pub x_mid: Vec<f32>,
    pub inv2: Vec<f32>,
    pub xn2: Vec<f32>,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub h: Vec<f32>,
}

/// A forward pass with everything its backward needs.
#[derive(Debug, Clone)]
pub struct ForwardPass {
    pub(crate) prep: Prepared,
    pub(crate) layers: Vec<LayerActs>,
    pub(crate) x_final: Vec<f32>,
    pub(crate) inv_f: Vec<f32>,
    pub(crate) xn_f: Vec<f32>,
    pub(crate) logits: Vec<f32>,
}

impl ForwardPass {
    /// Logits `[total tokens, vocab]`, row t predicting the token after token t.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// Tokens in the batch.
    pub fn num_tokens(&self) -> usize {
        self.prep.total()
    }

    /// Layer `l`'s keys before RoPE and values `[T, kv heads, hd]` of a segment-attention pass
    /// over documents (what the session's document cache stores; `None` for other passes).
    pub(crate) fn layer_kv_pre_rope(&self, l: usize) -> Option<(&[f32], &[f32])> {
        let layer = &self.layers[l];
        (!layer.k_pre.is_empty()).then_some((&layer.k_pre[..], &layer.v[..]))
    }
}

/// The local attention heads.
pub(crate) fn local_heads(dims: &Dims) -> Heads {
    Heads::new(dims.hq, dims.hkv, dims.hd, dims.hd)
}

/// Attention over the batch with the configured kind.
pub(crate) fn attention_forward(
    config: &ModelConfig,
    dims: &Dims,
    prep: &Prepared,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    gates: Option<Vec<f32>>,
) -> Result<AttnActs, Error> {
    let heads = local_heads(dims);
    let cu = &prep.cu_seqlens;
    Ok(match config.attention {
        AttentionKind::Dense => {
            let out = dense::forward(&DenseConfig::causal(heads), q, k, v, cu, cu)?;
            AttnActs::Flash { o: out.o, lse: out.lse }
        }
        AttentionKind::Segments => {
            let layout = prep.layout.as_ref().expect("prepared for segment attention");
            let out = segments::forward(&SegmentConfig::new(heads), layout, q, k, v, cu, cu)?;
            AttnActs::Flash { o: out.o, lse: out.lse }
        }
        AttentionKind::Nsa(p) => {
            let ncfg = p.to_nsa_config();
            let gates = gates.expect("NSA layers compute gates");
            let k_cmp = nsa::compress_mean(&ncfg, dims.hkv, dims.hd, k, cu)?;
            let v_cmp = nsa::compress_mean(&ncfg, dims.hkv, dims.hd, v, cu)?;
            let inputs = NsaInputs {
                q,
                k,
                v,
                k_win: None,
                v_win: None,
                k_cmp: &k_cmp,
                v_cmp: &v_cmp,
                gates: &gates,
                cu_seqlens: cu,
            };
            let out = nsa::forward(&ncfg, &heads, &inputs)?;
            AttnActs::Nsa { out: Box::new(out), k_cmp, v_cmp, gates }
        }
    })
}

/// Segment attention over a batch with documents (see [`DocRows`]): `q` rotated at the local
/// positions (a Global token's is its true one), `k` at the true positions (what Global tokens
/// see), `k_local` at the local ones (what a document's own tokens see).
#[allow(clippy::too_many_arguments)]
pub(crate) fn documents_forward(
    dims: &Dims,
    prep: &Prepared,
    docs: &DocRows,
    q: &[f32],
    k: &[f32],
    k_local: &[f32],
    v: &[f32],
) -> Result<AttnActs, Error> {
    let heads = local_heads(dims);
    let cu = &prep.cu_seqlens;
    let layout = prep.layout.as_ref().expect("prepared for segment attention");
    let seg = segments::forward(&SegmentConfig::new(heads), layout, q, k, v, cu, cu)?;
    let (qd, kvd) = (dims.hq * dims.hd, dims.hkv * dims.hd);
    let (q_doc, k_doc, v_doc) = (docs.gather(q, qd), docs.gather(k_local, kvd), docs.gather(v, kvd));
    let doc = dense::forward(&DenseConfig::causal(heads), &q_doc, &k_doc, &v_doc, &docs.cu, &docs.cu)?;
    let mut o = seg.o.clone();
    docs.scatter(&mut o, &doc.o, qd, false);
    Ok(AttnActs::Docs { o, o_seg: seg.o, lse_seg: seg.lse, q_doc, k_doc, v_doc, o_doc: doc.o, lse_doc: doc.lse })
}

/// The forward pass of weights `w` laid out as `dims` (the whole model, or one rank's shard with
/// `reduce` summing over the ranks).
pub(crate) fn forward_core<R: Reducer>(
    config: &ModelConfig,
    dims: &Dims,
    w: &[Vec<f32>],
    rope: &Rope,
    prep: Prepared,
    reduce: &R,
) -> Result<ForwardPass, Error> {
    let t = prep.total();
    let (d, hd, f) = (dims.d, dims.hd, dims.f);
    let (qd, kvd) = (dims.hq * hd, dims.hkv * hd);
    let mut x = vec![0f32; t * d];
    embed_forward(&mut x, &w[Dims::EMBED], &prep.tokens, d);
    let mut layers = Vec::with_capacity(dims.layers);
    for l in 0..dims.layers {
        let ix = dims.layer(l);
        let x_in = x;
        // Attention sub-block.
        let (mut xn1, mut inv1) = (vec![0f32; t * d], vec![0f32; t]);
        rmsnorm_forward(&mut xn1, &mut inv1, &x_in, &w[ix.attn_norm], d, config.norm_eps);
        let (mut q, mut k, mut v) = (vec![0f32; t * qd], vec![0f32; t * kvd], vec![0f32; t * kvd]);
        linear(&mut q, &xn1, &w[ix.wq], t, d, qd);
        linear(&mut k, &xn1, &w[ix.wk], t, d, kvd);
        linear(&mut v, &xn1, &w[ix.wv], t, d, kvd);
        let (attn, k_pre) = if let Some(docs) = &prep.docs {
            let k_pre = k.clone();
            let mut k_local = k.clone();
            rope.forward(&mut q, dims.hq, &docs.local_positions)?;
            rope.forward(&mut k_local, dims.hkv, &docs.local_positions)?;
            rope.forward(&mut k, dims.hkv, &prep.positions)?;
            (documents_forward(dims, &prep, docs, &q, &k, &k_local, &v)?, k_pre)
        } else {
            rope.forward(&mut q, dims.hq, &prep.positions)?;
            rope.forward(&mut k, dims.hkv, &prep.positions)?;
            let gates = ix.wg.map(|g| {
                let mut gates = vec![0f32; t * dims.hq * 3];
                linear(&mut gates, &xn1, &w[g], t, d, dims.hq * 3);
                sigmoid_in_place(&mut gates);
                gates
            });
            (attention_forward(config, dims, &prep, &q, &k, &v, gates)?, Vec::new())
        };
        let mut proj = vec![0f32; t * d];
        linear(&mut proj, attn.o(), &w[ix.wo], t, qd, d);
        reduce.sum(&mut proj)?;
        let mut x_mid = proj;
        add_into(&mut x_mid, &x_in);
        // MLP sub-block.
        let (mut xn2, mut inv2) = (vec![0f32; t * d], vec![0f32; t]);
        rmsnorm_forward(&mut xn2, &mut inv2, &x_mid, &w[ix.mlp_norm], d, config.norm_eps);
        let (mut a, mut b, mut h) = (vec![0f32; t * f], vec![0f32; t * f], vec![0f32; t * f]);
        linear(&mut a, &xn2, &w[ix.w_gate], t, d, f);
        linear(&mut b, &xn2, &w[ix.w_up], t, d, f);
        swiglu_forward(&mut h, &a, &b);
        let mut down = vec![0f32; t * d];
        linear(&mut down, &h, &w[ix.w_down], t, f, d);
        reduce.sum(&mut down)?;
        x = down;
        add_into(&mut x, &x_mid);
        layers.push(LayerActs { x_in, inv1, xn1, q, k, k_pre, v, attn, x_mid, inv2, xn2, a, b, h });
    }
    let (mut xn_f, mut inv_f) = (vec![0f32; t * d], vec![0f32; t]);
    rmsnorm_forward(&mut xn_f, &mut inv_f, &x, &w[dims.final_norm()], d, config.norm_eps);
    let mut logits = vec![0f32; t * dims.vocab];
    linear(&mut logits, &xn_f, &w[Dims::EMBED], t, d, dims.vocab);
    Ok(ForwardPass { prep, layers, x_final: x, inv_f, xn_f, logits })
}
