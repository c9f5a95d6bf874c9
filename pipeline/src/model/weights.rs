//! The weights as a fixed, ordered list of named row-major f32 tensors.
//!
//! Order (the order of [`super::Model::params`], of gradients, of AdamW's state and of the
//! checkpoint's checksum):
//! ```text
//! embed                     [vocab, d_model]        token embedding, also the output head (tied)
//! per layer l:
//!   layers.l.attn_norm      [d_model]               RMSNorm gain before attention
//!   layers.l.wq             [n_heads * hd, d_model]  PyTorch layout [out, in]
//!   layers.l.wk             [n_kv_heads * hd, d_model]
//!   layers.l.wv             [n_kv_heads * hd, d_model]
//!   layers.l.wo             [d_model, n_heads * hd]
//!   layers.l.wg             [n_heads * 3, d_model]  NSA only: branch gates (cmp, slc, win) per head
//!   layers.l.mlp_norm       [d_model]
//!   layers.l.w_gate         [mlp_hidden, d_model]   SwiGLU: silu(x W_gate^T) * (x W_up^T)
//!   layers.l.w_up           [mlp_hidden, d_model]
//!   layers.l.w_down         [d_model, mlp_hidden]
//! final_norm                [d_model]
//! ```
//! A tensor-parallel shard has the same list with the head and hidden dims cut to the rank's
//! part (`Dims` holds the local sizes).

use super::config::{AttentionKind, ModelConfig};

/// Sizes one set of weights is laid out with: the full model's, or one tensor-parallel rank's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dims {
    pub vocab: usize,
    pub d: usize,
    pub layers: usize,
    /// Query heads held.
    pub hq: usize,
    /// Key/value heads held.
    pub hkv: usize,
    pub hd: usize,
    /// SwiGLU hidden units held.
    pub f: usize,
    /// Whether the layers have NSA gate weights.
    pub gates: bool,
}

impl Dims {
    /// The full model's sizes.
    pub fn full(c: &ModelConfig) -> Self {
        Self {
            vocab: c.vocab,
            d: c.d_model,
            layers: c.n_layers,
            hq: c.n_heads,
            hkv: c.n_kv_heads,
            hd: c.head_dim,
            f: c.mlp_hidden,
            gates: matches!(c.attention, AttentionKind::Nsa(_)),
        }
    }

    /// Tensors per layer.
    pub fn per_layer(&self) -> usize {
        if self.gates {
            10
        } else {
            9
        }
    }

    /// Tensors in all.
    pub fn num_tensors(&self) -> usize {
        2 + self.layers * self.per_layer()
    }

    /// Where layer `l`'s tensors sit in the list.
    pub fn layer(&self, l: usize) -> LayerIdx {
        let b = 1 + l * self.per_layer();
        let g = usize::from(self.gates);
        LayerIdx {
            attn_norm: b,
            wq: b + 1,
            wk: b + 2,
            wv: b + 3,
            wo: b + 4,
            wg: self.gates.then_some(b + 5),
            mlp_norm: b + 5 + g,
            w_gate: b + 6 + g,
            w_up: b + 7 + g,
            w_down: b + 8 + g,
        }
    }

    /// Index of the embedding (and tied head).
    pub const EMBED: usize = 0;

    /// Index of the final norm.
    pub fn final_norm(&self) -> usize {
        self.num_tensors() - 1
    }

    /// Names and shapes of the tensors, in order.
    pub fn shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, qd, kvd) = (self.d, self.hq * self.hd, self.hkv * self.hd);
        let mut out = vec![("embed".to_string(), vec![self.vocab, d])];
        for l in 0..self.layers {
            let p = |n: &str| format!("layers.{l}.{n}");
            out.push((p("attn_norm"), vec![d]));
            out.push((p("wq"), vec![qd, d]));
            out.push((p("wk"), vec![kvd, d]));
            out.push((p("wv"), vec![kvd, d]));
            out.push((p("wo"), vec![d, qd]));
            if self.gates {
                out.push((p("wg"), vec![self.hq * 3, d]));
            }
            out.push((p("mlp_norm"), vec![d]));
            out.push((p("w_gate"), vec![self.f, d]));
            out.push((p("w_up"), vec![self.f, d]));
            out.push((p("w_down"), vec![d, self.f]));
        }
        out.push(("final_norm".to_string(), vec![d]));
        out
    }

    /// Zero tensors of these shapes (gradient accumulators).
    pub fn zeros(&self) -> Vec<Vec<f32>> {
        self.shapes().iter().map(|(_, s)| vec![0.0; s.iter().product()]).collect()
    }
}

/// Positions of one layer's tensors in the list.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerIdx {
    pub attn_norm: usize,
    pub wq: usize,
    pub wk: usize,
    pub wv: usize,
    pub wo: usize,
    pub wg: Option<usize>,
    pub mlp_norm: usize,
    pub w_gate: usize,
    pub w_up: usize,
    pub w_down: usize,
}

/// Names and shapes of the full model's tensors, in order.
pub fn tensor_shapes(config: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    Dims::full(config).shapes()
}

/// Deterministic initial weights: norms 1; embedding N(0, 1/d) (so the tied head starts with
/// unit-scale logits); linears N(0, 1/fan_in); the residual outputs
/// (`wo`, `w_down`) further scaled by `1/sqrt(2 n_layers)` (GPT-2). Each tensor draws from its
/// own stream seeded by `(seed, tensor index)`.
pub(crate) fn init(config: &ModelConfig, seed: u64) -> Vec<Vec<f32>> {
    let dims = Dims::full(config);
    let resid = 1.0 / (2.0 * config.n_layers as f64).sqrt();
    dims.shapes()
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let n: usize = shape.iter().product();
            if shape.len() == 1 {
                return vec![1.0; n];
            }
            let fan_in = shape[1] as f64;
            let mut std = 1.0 / fan_in.sqrt();
            if name.ends_with(".wo") || name.ends_with(".w_down") {
                std *= resid;
            }
            let mut rng = crate::env::Rng::new(seed ^ (i as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
            (0..n).map(|_| (rng.normal() * std) as f32).collect()
        })
        .collect()
}
