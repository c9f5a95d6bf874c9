//! The contract between the inference loop and a model: contexts that grow by segments, fork
//! with copy-on-write KV, and give batched next-token logits. [`crate::rollout`] drives any
//! [`Policy`]; [`crate::model`] implements it over `PagedKv` and the document cache.

use squid_attention::segments::SegmentKind;

/// Handle of one context (one growing token sequence) inside a policy's inference state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContextId(pub u64);

/// KV memory of a policy's inference state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KvStats {
    /// Bytes of KV pages held now (each shared page counted once).
    pub bytes_held: u64,
    /// Bytes that would be held if no page were shared between forks.
    pub bytes_unshared: u64,
    /// Document segments whose KV came from the document cache.
    pub doc_hits: u64,
    /// Document segments that had to be prefilled.
    pub doc_misses: u64,
}

/// What the rollout loop needs from a model.
///
/// Positions are implicit: a context's tokens sit at positions `0..len` in the order appended.
/// A `Document` segment attends only to itself (its KV may come from a cache keyed by its
/// tokens); a `Global` segment attends to everything before it. Logits are never taken at a
/// document's last token: the caller appends at least one `Global` token after a document
/// before sampling.
pub trait Policy {
    /// Vocabulary size: each logits row has this many entries.
    fn vocab_size(&self) -> usize;

    /// A new, empty context.
    fn open(&mut self) -> Result<ContextId, crate::Error>;

    /// Appends `tokens` as one segment of `kind` to `ctx`, computing and storing their KV.
    /// Returns the logits `[vocab]` at the last appended token (meaningful for `Global` only).
    fn append(&mut self, ctx: ContextId, tokens: &[u32], kind: SegmentKind) -> Result<Vec<f32>, crate::Error>;

    /// Appends one token to each of `ctxs` (extending each one's final `Global` segment) in one
    /// batched step. Returns logits `[ctxs.len(), vocab]`, row i for `ctxs[i]`.
    fn step(&mut self, ctxs: &[ContextId], tokens: &[u32]) -> Result<Vec<f32>, crate::Error>;

    /// A new context equal to `ctx`, sharing its KV until one of them writes (copy on write).
    fn fork(&mut self, ctx: ContextId) -> Result<ContextId, crate::Error>;

    /// Frees `ctx` and its unshared KV.
    fn close(&mut self, ctx: ContextId) -> Result<(), crate::Error>;

    /// Tokens in `ctx`.
    fn len(&self, ctx: ContextId) -> Result<usize, crate::Error>;

    /// KV memory now.
    fn kv_stats(&self) -> KvStats;
}
