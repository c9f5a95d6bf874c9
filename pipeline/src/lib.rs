#![doc = include_str!("../README.md")]

pub mod env;
mod fsutil;
pub mod kernels;
pub mod model;
pub mod policy;
pub mod rollout;
pub mod tokenizer;
pub mod traces;
pub mod train;

/// What the `squid` binary can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// From the CUDA layer.
    #[error(transparent)]
    Cuda(#[from] squid_cuda::Error),
    /// `squid kernels check` found kernels that failed or spilled.
    #[error("{failed} kernel check(s) failed")]
    KernelCheckFailed {
        /// How many (kernel, arch) pairs failed or spilled.
        failed: usize,
    },
    /// From squid-attention.
    #[error(transparent)]
    Attention(#[from] squid_attention::Error),
    /// From squid-kvcache.
    #[error(transparent)]
    KvCache(#[from] squid_kvcache::Error),
    /// From squid-collectives.
    #[error(transparent)]
    Collectives(#[from] squid_collectives::Error),
    /// From squid-optim.
    #[error(transparent)]
    Optim(#[from] squid_optim::Error),
    /// A model, tokenizer or run configuration that cannot work (says which value and why).
    #[error("bad configuration: {0}")]
    Config(String),
    /// Tensors or token sequences whose shapes do not fit together.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A checkpoint that cannot be read, is corrupt, or belongs to another model.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file or directory.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A file or directory that cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A context handle the policy does not know.
    #[error("unknown context {0}")]
    UnknownContext(u64),
    /// A vocabulary that is malformed or foreign, or program text it cannot encode.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A run stopped by Ctrl-C (SIGINT) between steps, after its checkpoint.
    #[error("interrupted at {phase} step {step}; resume with `squid train --resume {}`", dir.display())]
    Interrupted {
        /// `warm-up` or `GRPO`.
        phase: String,
        /// The last step done (and checkpointed) of that phase.
        step: u64,
        /// The run directory.
        dir: std::path::PathBuf,
    },
    /// Another process holds the run directory's lock (it is training into it).
    #[error("{} is in use by another `squid train` (its lock .squid-train.lock is held); wait for it or stop it first", dir.display())]
    RunLocked {
        /// The run directory.
        dir: std::path::PathBuf,
    },
    /// A logits row that cannot be sampled (NaN, +inf, every entry -inf, or the wrong length).
    #[error("bad logits: {0}")]
    BadLogits(String),
}
