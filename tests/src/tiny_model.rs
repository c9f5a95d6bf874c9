//! A tiny decoder-only transformer with random weights (RMSNorm, attention with RoPE through
//! squid's segment attention, SiLU MLP, tied head), written out layer by layer. It exists to
//! prove the squid-attention + squid-kvcache equality: documents prefilled alone at position 0,
//! cached, loaded and re-positioned give the same tail logits as one pass over the whole
//! context with the segment mask at true positions.

use std::sync::Arc;

use squid_attention::segments::{self, Segment, SegmentConfig, SegmentLayout};
use squid_attention::Heads;
use squid_kvcache::{DocKv, DocShape, Rope, RopeConfig};

/// Errors of the model are the crates' errors, boxed.
pub type Result<T> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Sizes of the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TinyConfig {
    /// Token ids are `0..vocab`.
    pub vocab: usize,
    /// Residual width.
    pub d_model: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Query heads.
    pub q_heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Dims per head.
    pub head_dim: usize,
    /// MLP hidden width.
    pub ff: usize,
}

impl TinyConfig {
    /// The test size: 2 layers, d_model 32, 4 query heads over 2 kv heads of 8 dims.
    pub fn test() -> Self {
        Self { vocab: 64, d_model: 32, layers: 2, q_heads: 4, kv_heads: 2, head_dim: 8, ff: 64 }
    }

    fn heads(&self) -> Heads {
        Heads::new(self.q_heads, self.kv_heads, self.head_dim, self.head_dim)
    }

    /// The bytes hashed into every document key: any change of size gives new keys.
    pub fn to_bytes(&self) -> Vec<u8> {
        [self.vocab, self.d_model, self.layers, self.q_heads, self.kv_heads, self.head_dim, self.ff]
            .iter()
            .flat_map(|v| (*v as u64).to_le_bytes())
            .collect()
    }
}

/// `c[m, n] = a[m, k] @ b[k, n]`, row-major, through the `gemm` crate on all threads.
pub fn matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut c = vec![0.0f32; m * n];
    matmul_into(a, b, &mut c, m, k, n, gemm::Parallelism::Rayon(0));
    c
}

/// `c = a @ b` for row-major `a: [m, k]`, `b: [k, n]`, `c: [m, n]` (overwritten), with the
/// given parallelism. Panics if the lengths do not match the shape (a caller's bug).
pub fn matmul_into(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, parallelism: gemm::Parallelism) {
    assert!(a.len() == m * k && b.len() == k * n && c.len() == m * n, "matmul shapes");
    if m * n == 0 {
        return;
    }
    if k == 0 {
        c.fill(0.0);
        return;
    }
    // SAFETY: the buffers hold exactly the elements the row-major strides address, and `c` is a
    // unique borrow, so it aliases neither input.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    };
}

struct Block {
    attn_norm: Vec<f32>,
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
    wo: Vec<f32>,
    mlp_norm: Vec<f32>,
    w_up: Vec<f32>,
    w_down: Vec<f32>,
}

/// Per layer, the keys (after RoPE) and values of a run of tokens: `[tokens, kv_heads, head_dim]`.
pub type LayerKv = Vec<(Vec<f32>, Vec<f32>)>;

/// The model.
pub struct TinyModel {
    /// Its sizes.
    pub cfg: TinyConfig,
    embed: Vec<f32>,
    final_norm: Vec<f32>,
    blocks: Vec<Block>,
    rope: Rope,
}

fn random(len: usize, scale: f32, state: &mut u64) -> Vec<f32> {
    (0..len)
        .map(|_| {
            *state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((*state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

fn rms_norm(x: &[f32], weight: &[f32], d: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for (row, o) in x.chunks(d).zip(out.chunks_mut(d)) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let inv = 1.0 / (ms + 1e-5).sqrt();
        for ((o, v), w) in o.iter_mut().zip(row).zip(weight) {
            *o = v * inv * w;
        }
    }
    out
}

impl TinyModel {
    /// Random weights from `seed` (uniform, scaled by 1/sqrt(fan-in)).
    pub fn random(cfg: TinyConfig, seed: u64) -> Result<Self> {
        let mut s = seed;
        let (d, hq, hkv, hd, ff) = (cfg.d_model, cfg.q_heads, cfg.kv_heads, cfg.head_dim, cfg.ff);
        let wscale = |fan_in: usize| 1.0 / (fan_in as f32).sqrt();
        let blocks = (0..cfg.layers)
            .map(|_| Block {
                attn_norm: vec![1.0; d],
                wq: random(d * hq * hd, wscale(d), &mut s),
                wk: random(d * hkv * hd, wscale(d), &mut s),
                wv: random(d * hkv * hd, wscale(d), &mut s),
                wo: random(hq * hd * d, wscale(hq * hd), &mut s),
                mlp_norm: vec![1.0; d],
                w_up: random(d * ff, wscale(d), &mut s),
                w_down: random(ff * d, wscale(ff), &mut s),
            })
            .collect();
        Ok(Self {
            embed: random(cfg.vocab * d, 1.0, &mut s),
            final_norm: vec![1.0; d],
            blocks,
            rope: Rope::new(RopeConfig::new(hd))?,
            cfg,
        })
    }

    /// The model's rotary embedding (what cached keys are re-positioned with).
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// The id written into document keys and cache files.
    pub fn model_id(&self) -> &'static str {
        "squid-tiny-test"
    }

    fn embed(&self, tokens: &[u32]) -> Vec<f32> {
        let d = self.cfg.d_model;
        tokens.iter().flat_map(|&t| self.embed[t as usize % self.cfg.vocab * d..][..d].iter().copied()).collect()
    }

    /// All layers over `x: [tokens, d_model]` (the query tokens of every context, packed).
    /// `positions[t]` is token t's position in its context. `prefix[l]`, when given, holds the
    /// keys and values of earlier tokens of a single context (already at their positions) that
    /// the queries attend to as well. Returns the final hidden states and each layer's K and V of
    /// the query tokens.
    fn run(
        &self,
        x: &mut [f32],
        positions: &[u64],
        cu_q: &[u32],
        cu_k: &[u32],
        layout: &SegmentLayout,
        prefix: Option<&LayerKv>,
    ) -> Result<LayerKv> {
        let c = self.cfg;
        let (d, hq, hkv, hd) = (c.d_model, c.q_heads, c.kv_heads, c.head_dim);
        let t = positions.len();
        let attn_cfg = SegmentConfig::new(c.heads());
        let mut captured = Vec::with_capacity(c.layers);
        for (l, b) in self.blocks.iter().enumerate() {
            // Attention: x += W_o . attn(rope(W_q h), rope(W_k h), W_v h), h = rmsnorm(x)
            let h = rms_norm(x, &b.attn_norm, d);
            let mut q = matmul(&h, &b.wq, t, d, hq * hd);
            let mut k = matmul(&h, &b.wk, t, d, hkv * hd);
            let v = matmul(&h, &b.wv, t, d, hkv * hd);
            self.rope.forward(&mut q, hq, positions)?;
            self.rope.forward(&mut k, hkv, positions)?;
            let (k_all, v_all) = match prefix {
                Some(p) => ([p[l].0.as_slice(), &k].concat(), [p[l].1.as_slice(), &v].concat()),
                None => (k.clone(), v.clone()),
            };
            let attn = segments::forward(&attn_cfg, layout, &q, &k_all, &v_all, cu_q, cu_k)?;
            let proj = matmul(&attn.o, &b.wo, t, hq * hd, d);
            x.iter_mut().zip(&proj).for_each(|(x, p)| *x += p);
            // MLP: x += W_down . silu(W_up h), h = rmsnorm(x)
            let h = rms_norm(x, &b.mlp_norm, d);
            let mut up = matmul(&h, &b.w_up, t, d, c.ff);
            up.iter_mut().for_each(|u| *u /= 1.0 + (-*u).exp());
            let down = matmul(&up, &b.w_down, t, c.ff, d);
            x.iter_mut().zip(&down).for_each(|(x, p)| *x += p);
            captured.push((k, v));
        }
        Ok(captured)
    }

    fn logits(&self, x: &[f32]) -> Vec<f32> {
        let d = self.cfg.d_model;
        let h = rms_norm(x, &self.final_norm, d);
        // Tied head: logits = h . E^T.
        let mut et = vec![0.0; d * self.cfg.vocab];
        for v in 0..self.cfg.vocab {
            for j in 0..d {
                et[j * self.cfg.vocab + v] = self.embed[v * d + j];
            }
        }
        matmul(&h, &et, x.len() / d, d, self.cfg.vocab)
    }

    /// One pass over packed contexts (`contexts[s]` lists context s's segments; the tokens are
    /// concatenated) with the segment mask at true positions: logits `[total_tokens, vocab]`.
    pub fn forward_full(&self, tokens: &[u32], contexts: &[Vec<Segment>]) -> Result<Vec<f32>> {
        let mut cu = vec![0u32];
        let mut positions = Vec::with_capacity(tokens.len());
        for segs in contexts {
            let len: usize = segs.iter().map(|s| s.len).sum();
            positions.extend(0..len as u64);
            cu.push(cu.last().copied().unwrap_or(0) + len as u32);
        }
        if positions.len() != tokens.len() {
            return Err(format!("segments cover {} tokens, {} given", positions.len(), tokens.len()).into());
        }
        let layout = SegmentLayout::new(contexts, &cu)?;
        let mut x = self.embed(tokens);
        self.run(&mut x, &positions, &cu, &cu, &layout, None)?;
        Ok(self.logits(&x))
    }

    /// Prefills one document alone at positions `0..len`: every layer's K (rotated for position
    /// 0 onwards) and V, as the document cache stores them.
    pub fn prefill_document(&self, tokens: &[u32]) -> Result<DocKv<f32>> {
        let c = self.cfg;
        let n = tokens.len();
        let cu = [0, n as u32];
        let layout = SegmentLayout::new(&[vec![Segment::document(n)]], &cu)?;
        let positions: Vec<u64> = (0..n as u64).collect();
        let mut x = self.embed(tokens);
        let kv = self.run(&mut x, &positions, &cu, &cu, &layout, None)?;
        let (k, v): (Vec<Vec<f32>>, Vec<Vec<f32>>) = kv.into_iter().unzip();
        let shape = DocShape { layers: c.layers, tokens: n, kv_heads: c.kv_heads, head_dim: c.head_dim };
        Ok(DocKv::new(shape, k.concat(), v.concat())?)
    }

    /// The tail of one context computed against cached documents: the documents are placed in
    /// order (keys re-positioned to their offsets, values as they are), then only the tail's
    /// tokens run through the model, attending to everything before them. Returns the tail's
    /// logits `[tail, vocab]`.
    pub fn forward_tail(&self, docs: &[Arc<DocKv<f32>>], tail: &[u32]) -> Result<Vec<f32>> {
        let c = self.cfg;
        let mut prefix: LayerKv = vec![(Vec::new(), Vec::new()); c.layers];
        let mut segs = Vec::with_capacity(docs.len() + 1);
        let mut offset = 0u64;
        for doc in docs {
            let placed = doc.place(&self.rope, offset)?;
            let layer_len = doc.shape().layer_len();
            for (l, (pk, pv)) in prefix.iter_mut().enumerate() {
                pk.extend_from_slice(&placed[l * layer_len..][..layer_len]);
                pv.extend_from_slice(doc.v_layer(l));
            }
            segs.push(Segment::document(doc.shape().tokens));
            offset += doc.shape().tokens as u64;
        }
        segs.push(Segment::global(tail.len()));
        let total = offset as usize + tail.len();
        let layout = SegmentLayout::new(&[segs], &[0, total as u32])?;
        let positions: Vec<u64> = (offset..offset + tail.len() as u64).collect();
        let mut x = self.embed(tail);
        self.run(&mut x, &positions, &[0, tail.len() as u32], &[0, total as u32], &layout, Some(&prefix))?;
        Ok(self.logits(&x))
    }
}
