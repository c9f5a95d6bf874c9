//! The policy: a small decoder-only transformer, every layer's forward and backward written out.
//!
//! ```text
//! tokens -> embed -> n_layers x [ RMSNorm -> attention (RoPE, GQA; dense | segments | NSA) -> +
//!                                 RMSNorm -> SwiGLU MLP -> + ] -> RMSNorm -> tied head -> logits
//! ```
//! f32 everywhere; matmuls through the `gemm` crate (`matmul.rs`), attention through
//! `squid_attention`, RoPE through `squid_kvcache::Rope`.
//!
//! - [`ModelConfig`] (serde) says the shape; [`ModelConfig::small`] is the trainer's default.
//! - [`Model::init`] makes deterministic weights; [`Model::params`] / [`Model::params_mut`] give
//!   them as named tensors in a fixed order (listed in [`weights`]), the order of gradients,
//!   of AdamW's state and of checkpoints.
//! - [`Model::forward`] over a packed [`Batch`] keeps the activations; [`Model::backward`] takes
//!   `dlogits` and returns [`Grads`].
//! - [`Model::save`] / [`Model::load`]: safetensors, written atomically, verified on load.
//! - [`Model::session`]: a [`crate::policy::Policy`] for rollouts (paged KV, forks, document cache).
//! - [`TpTrainer`]: training steps with the heads and MLP columns split over N local ranks.

mod backward;
mod checkpoint;
mod config;
mod forward;
mod layers;
mod matmul;
mod session;
#[cfg(test)]
mod tests;
mod tp;
pub mod weights;

pub use config::{AttentionKind, ModelConfig, NsaParams};
pub use forward::ForwardPass;
pub use session::{Session, SessionConfig};
pub use squid_attention::segments::{Segment, SegmentKind};
pub use tp::{TpStepReport, TpTrainer};

use squid_kvcache::Rope;

use crate::Error;
use forward::{NoReduce, Prepared};
use weights::Dims;

/// A packed batch of token sequences (FlashAttention's varlen layout).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// All sequences' tokens, concatenated.
    pub tokens: Vec<u32>,
    /// `[num_seqs + 1]` offsets into `tokens`: sequence `s` is `cu_seqlens[s]..cu_seqlens[s + 1]`.
    pub cu_seqlens: Vec<u32>,
    /// Per sequence, its segments, covering it exactly (segment attention only; the other kinds
    /// ignore them). Empty means one `Global` segment per sequence (plain causal).
    pub segments: Vec<Vec<Segment>>,
}

impl Batch {
    /// Packs sequences with their segments.
    pub fn from_sequences(seqs: &[(Vec<u32>, Vec<Segment>)]) -> Self {
        let mut b = Batch { tokens: Vec::new(), cu_seqlens: vec![0], segments: Vec::new() };
        for (toks, segs) in seqs {
            b.tokens.extend_from_slice(toks);
            b.cu_seqlens.push(b.tokens.len() as u32);
            b.segments.push(segs.clone());
        }
        b
    }
}

/// Gradients of every weight tensor, in the weights' order.
#[derive(Debug, Clone, PartialEq)]
pub struct Grads {
    tensors: Vec<Vec<f32>>,
}

impl Grads {
    /// The tensors, for `AdamW::step` and clipping.
    pub fn as_slices(&self) -> Vec<&[f32]> {
        self.tensors.iter().map(|t| t.as_slice()).collect()
    }

    /// The tensors, mutable (e.g. for `clip_grad_norm`).
    pub fn as_mut_slices(&mut self) -> Vec<&mut [f32]> {
        self.tensors.iter_mut().map(|t| t.as_mut_slice()).collect()
    }

    /// Adds `other` (e.g. the next micro-batch's gradients).
    pub fn add(&mut self, other: &Grads) -> Result<(), Error> {
        if self.tensors.len() != other.tensors.len()
            || self.tensors.iter().zip(&other.tensors).any(|(a, b)| a.len() != b.len())
        {
            return Err(Error::Shape("adding gradients of another model's shape".into()));
        }
        for (a, b) in self.tensors.iter_mut().zip(&other.tensors) {
            layers::add_into(a, b);
        }
        Ok(())
    }

    /// Tensor `i`.
    pub fn tensor(&self, i: usize) -> &[f32] {
        &self.tensors[i]
    }
}

/// The policy transformer: a config and its weights.
#[derive(Debug, Clone)]
pub struct Model {
    config: ModelConfig,
    weights: Vec<Vec<f32>>,
    rope: Rope,
}

impl PartialEq for Model {
    fn eq(&self, other: &Self) -> bool {
        self.config == other.config && self.weights == other.weights
    }
}

impl Model {
    /// Deterministic initial weights for `config` from `seed` (see [`weights`] for the scheme).
    pub fn init(config: ModelConfig, seed: u64) -> Result<Self, Error> {
        config.validate()?;
        let weights = weights::init(&config, seed);
        Self::from_weights(config, weights)
    }

    /// A model from weights in the order of [`weights::tensor_shapes`] (shapes checked).
    pub fn from_weights(config: ModelConfig, weights: Vec<Vec<f32>>) -> Result<Self, Error> {
        config.validate()?;
        let shapes = weights::tensor_shapes(&config);
        if shapes.len() != weights.len() {
            return Err(Error::Shape(format!("{} weight tensors, the config has {}", weights.len(), shapes.len())));
        }
        for ((name, shape), t) in shapes.iter().zip(&weights) {
            let n: usize = shape.iter().product();
            if t.len() != n {
                return Err(Error::Shape(format!("{name} has {} elements, shape {shape:?} needs {n}", t.len())));
            }
        }
        let rope = Rope::new(config.rope())?;
        Ok(Self { config, weights, rope })
    }

    /// Its configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Names and shapes of the weight tensors, in order.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        weights::tensor_shapes(&self.config)
    }

    /// The weights as tensors in the fixed order (for `AdamW::new`).
    pub fn params(&self) -> Vec<&[f32]> {
        self.weights.iter().map(|t| t.as_slice()).collect()
    }

    /// The weights, mutable (for `AdamW::step`).
    pub fn params_mut(&mut self) -> Vec<&mut [f32]> {
        self.weights.iter_mut().map(|t| t.as_mut_slice()).collect()
    }

    /// A blake3 hash of the config and every weight's bytes (hex): changes whenever a weight does.
    pub fn fingerprint(&self) -> String {
        let mut h = blake3::Hasher::new();
        h.update(self.config.to_json().as_bytes());
        for t in &self.weights {
            for x in t {
                h.update(&x.to_le_bytes());
            }
        }
        h.finalize().to_hex().to_string()
    }

    pub(crate) fn dims(&self) -> Dims {
        Dims::full(&self.config)
    }

    pub(crate) fn rope(&self) -> &Rope {
        &self.rope
    }

    pub(crate) fn weights(&self) -> &[Vec<f32>] {
        &self.weights
    }

    /// Forward over a packed batch; the pass keeps the activations for [`Model::backward`].
    /// Errors: a token outside the vocabulary, bad `cu_seqlens`, segments that do not cover
    /// their sequence (segment attention).
    pub fn forward(&self, batch: &Batch) -> Result<ForwardPass, Error> {
        let prep = Prepared::new(&self.config, batch)?;
        forward::forward_core(&self.config, &self.dims(), &self.weights, &self.rope, prep, &NoReduce)
    }

    /// Gradients of the weights given `dlogits = dL/dlogits` `[total, vocab]` of `fwd` (a pass of
    /// this model with these weights).
    pub fn backward(&self, fwd: &ForwardPass, dlogits: &[f32]) -> Result<Grads, Error> {
        let tensors =
            backward::backward_core(&self.config, &self.dims(), &self.weights, &self.rope, fwd, dlogits, &NoReduce)?;
        Ok(Grads { tensors })
    }
}
