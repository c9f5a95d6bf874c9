#![doc = include_str!("../README.md")]

mod attention;
#[cfg(feature = "candle-cuda")]
mod cuda;
mod host;
mod logprob;
mod nsa;
mod policy_loss;
mod rope;

pub use attention::{flash_attn, flash_attn_varlen, paged_decode, segment_attn_varlen, AttentionOptions, PagedKv};
pub use logprob::{log_prob_entropy, log_prob_entropy_packed};
pub use nsa::{nsa_varlen, NsaTensors};
pub use policy_loss::{policy_loss, PolicyLossMetrics, PolicyLossTensors};
pub use rope::{reposition, rope, RopeTable};

/// squid's own configuration types, re-exported so a candle user needs no direct dependency on
/// squid-attention, squid-kvcache or squid-optim for them.
pub mod config {
    pub use squid_attention::nsa::NsaConfig;
    pub use squid_attention::segments::{Segment, SegmentKind};
    pub use squid_kvcache::rope::{RopeConfig, RopeLayout};
    pub use squid_optim::policy_loss::{Aggregation, Denominators, KlEstimator, KlPenalty, PolicyLossConfig};
}
