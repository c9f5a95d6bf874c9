//! The model's shape and attention kind, serialised as JSON into checkpoints and `config.json`.

use serde::{Deserialize, Serialize};
use squid_attention::nsa::NsaConfig;
use squid_attention::Heads;
use squid_kvcache::{RopeConfig, RopeLayout};

use crate::Error;

/// Native Sparse Attention block sizes (see `squid_attention::nsa`), scaled down so that the
/// short contexts of the code tasks (100 to 500 tokens) are really sparse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NsaParams {
    /// Compression block length `l`.
    pub block_cmp: usize,
    /// Compression stride `d` (divides `l` and `l'`).
    pub stride_cmp: usize,
    /// Selection block length `l'` (`l <= l'`).
    pub block_slc: usize,
    /// Selected blocks per query `n`, the 3 forced ones included.
    pub num_selected: usize,
    /// Sliding window `w`.
    pub window: usize,
}

impl Default for NsaParams {
    /// `l = 8, d = 4, l' = 16, n = 4, w = 32`: at 300 tokens a query sees 4 x 16 selected keys,
    /// 32 window keys and ~75 compressed blocks instead of 300 keys.
    fn default() -> Self {
        Self { block_cmp: 8, stride_cmp: 4, block_slc: 16, num_selected: 4, window: 32 }
    }
}

impl NsaParams {
    /// The attention crate's config (default scale, no finiteness check).
    pub fn to_nsa_config(&self) -> NsaConfig {
        NsaConfig {
            block_cmp: self.block_cmp,
            stride_cmp: self.stride_cmp,
            block_slc: self.block_slc,
            num_selected: self.num_selected,
            window: self.window,
            scale: None,
            check_finite: false,
            ..NsaConfig::default()
        }
    }
}

/// Which attention the layers run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttentionKind {
    /// Plain causal attention over each sequence; segments are ignored.
    Dense,
    /// Squid segment attention: a `Document` sees only itself, a `Global` token everything before.
    Segments,
    /// Native Sparse Attention (plain causal semantics; segments are ignored), with compressed
    /// K/V by mean pooling and per-head branch gates from a linear layer and a sigmoid.
    Nsa(NsaParams),
}

/// The transformer's dimensions.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Vocabulary size (embedding rows = output logits).
    pub vocab: usize,
    /// Width of the residual stream.
    pub d_model: usize,
    /// Transformer blocks.
    pub n_layers: usize,
    /// Query heads.
    pub n_heads: usize,
    /// Key/value heads (GQA: `n_heads % n_kv_heads == 0`).
    pub n_kv_heads: usize,
    /// Dims per head (even, for RoPE).
    pub head_dim: usize,
    /// Hidden width of the SwiGLU MLP.
    pub mlp_hidden: usize,
    /// RoPE frequency base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub norm_eps: f32,
    /// Attention kind.
    pub attention: AttentionKind,
}

/// Largest vocabulary a [`ModelConfig`] accepts (token ids are u32; this bounds the head).
pub const MAX_VOCAB: usize = 1 << 20;
/// Largest `d_model` and `mlp_hidden`.
pub const MAX_WIDTH: usize = 1 << 14;
/// Most layers.
pub const MAX_LAYERS: usize = 256;
/// Most query (and kv) heads.
pub const MAX_HEADS: usize = 1024;

impl ModelConfig {
    /// The trainer's default: vocab 512, d_model 96, 3 layers, 4 heads over 2 kv heads of 24
    /// dims, SwiGLU hidden 256, segment attention (353 952 parameters).
    pub fn small() -> Self {
        Self {
            vocab: 512,
            d_model: 96,
            n_layers: 3,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 24,
            mlp_hidden: 256,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            attention: AttentionKind::Segments,
        }
    }

    /// A tiny config for tests (vocab 32, d_model 16, 2 layers, 4 heads over 2 kv heads of 4
    /// dims, hidden 24) with the given attention.
    pub fn tiny(attention: AttentionKind) -> Self {
        Self {
            vocab: 32,
            d_model: 16,
            n_layers: 2,
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: 4,
            mlp_hidden: 24,
            rope_theta: 10_000.0,
            norm_eps: 1e-5,
            attention,
        }
    }

    /// Checks every dimension (each at least 1 and at most the caps above) and the attention
    /// settings; says which value is wrong.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |msg: String| Err(Error::Config(format!("model: {msg}")));
        for (name, v) in [
            ("vocab", self.vocab),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("mlp_hidden", self.mlp_hidden),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        // Caps that keep every size product far from overflow and an absurd config from
        // aborting on allocation (the CPU model holds f32 weights, gradients and AdamW state).
        for (name, v, max) in [
            ("vocab", self.vocab, MAX_VOCAB),
            ("d_model", self.d_model, MAX_WIDTH),
            ("n_layers", self.n_layers, MAX_LAYERS),
            ("n_heads", self.n_heads, MAX_HEADS),
            ("n_kv_heads", self.n_kv_heads, MAX_HEADS),
            ("mlp_hidden", self.mlp_hidden, MAX_WIDTH),
        ] {
            if v > max {
                return bad(format!("{name} {v} is above {max}, the most this CPU model is built for"));
            }
        }
        if self.n_heads % self.n_kv_heads != 0 {
            return bad(format!("n_heads {} is not a multiple of n_kv_heads {}", self.n_heads, self.n_kv_heads));
        }
        if self.head_dim % 2 != 0 || self.head_dim > squid_attention::MAX_HEAD_DIM {
            return bad(format!(
                "head_dim {} must be even and at most {}",
                self.head_dim,
                squid_attention::MAX_HEAD_DIM
            ));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 1.0) {
            return bad(format!("rope_theta {} must be finite and above 1", self.rope_theta));
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            return bad(format!("norm_eps {} must be finite and positive", self.norm_eps));
        }
        if let AttentionKind::Nsa(p) = self.attention {
            p.to_nsa_config().validate().map_err(|e| Error::Config(format!("model: nsa: {e}")))?;
        }
        Ok(())
    }

    /// The attention heads (same head dim for keys and values).
    pub fn heads(&self) -> Heads {
        Heads::new(self.n_heads, self.n_kv_heads, self.head_dim, self.head_dim)
    }

    /// The rotary embedding: every dim of a head rotated, rotate-half pairs, base `rope_theta`
    /// (the layout the document cache must use too).
    pub fn rope(&self) -> RopeConfig {
        RopeConfig {
            head_dim: self.head_dim,
            rotary_dim: self.head_dim,
            base: self.rope_theta,
            position_scale: 1.0,
            layout: RopeLayout::RotateHalf,
        }
    }

    /// The config as canonical JSON bytes (checkpoint metadata, document-cache keys).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a config of numbers and enums always serialises")
    }

    /// Parses [`ModelConfig::to_json`]'s output and validates it.
    pub fn from_json(s: &str) -> Result<Self, Error> {
        let cfg: Self = serde_json::from_str(s).map_err(|e| Error::Config(format!("model config JSON: {e}")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Parameters in total.
    pub fn num_params(&self) -> usize {
        super::weights::tensor_shapes(self).iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }
}
