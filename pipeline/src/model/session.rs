//! Inference: a [`Policy`] over the model, for rollouts.
//!
//! **Dense and segment attention.** Every context's keys (after RoPE, at their true positions)
//! and values live in one [`PagedKv`] (all layers, `page_size` tokens per page). Appending
//! `Global` tokens and [`Policy::step`] run the new rows through the layers and attend with
//! `squid_attention::dense::decode_paged` (bottom-right aligned causal: a new token sees the
//! whole context before it and the new tokens up to itself, which is exactly a `Global` token's
//! view). A step over B contexts is one gemm per weight over the B rows; attention reads each
//! context's pages in place. [`Policy::fork`] shares the pages (copy on write), so a GRPO
//! group's G samples hold their prompt once.
//!
//! **Documents (segment attention).** A document attends only to itself, so its K/V at every
//! layer depend only on its own tokens (RoPE makes attention depend on relative positions
//! only). The session computes them once, alone, at positions `0..n` (a forward over the
//! document as one `Document` segment), stores them in a [`DocCache`] under
//! `DocKey::new(model id, config JSON, tokens)` (the model id holds a fingerprint of every
//! weight, so a training step invalidates the cache), keys before RoPE, and places them at the
//! context's offset by rotating the keys to their true positions with the model's own RoPE call.
//! The training forward computes documents the same way (see `forward::DocRows`), so a cache
//! hit at any offset gives bitwise the training forward's keys, values and logits. The logits at
//! a document's last token are those of the standalone pass, kept beside the cache.
//!
//! **Bitwise on-policy.** Every projection is batch-invariant (`matmul::linear`) and new rows
//! attend through the training forward's own attention kernel over the gathered pages
//! ([`attend_like_forward`]), so dense and segment sessions give bitwise the logits of
//! [`Model::forward`] over the packed batch, and the rollout's log-probs are the trainer's.
//!
//! **Dense attention** has no documents: a `Document` append is computed like a `Global` one
//! (attending to everything before it), matching [`Model::forward`], which ignores segments
//! in dense mode. Nothing is cached.
//!
//! **NSA** decodes through one `squid_attention::nsa::NsaCache` per context and layer (keys,
//! values and their compressed blocks so far): each new token's q/k/v and gates go through the
//! layers as rows of one gemm over all stepped contexts, its k/v are appended to the cache and
//! its output is one decode step, so a token costs attention over the selected blocks and the
//! window, not a forward over the whole context (which the session did before: about 50x
//! slower in rollouts). NSA ignores segments, as [`Model::forward`] does. A fork clones the
//! caches. [`Policy::kv_stats`] reports 0 bytes for NSA (its caches are not paged).

use std::collections::{BTreeMap, HashMap};

use squid_attention::dense::{self, DenseConfig};
use squid_attention::nsa::NsaCache;
use squid_kvcache::{DocCache, DocCacheConfig, DocKey, DocKv, DocShape, PagedKv, PagedKvConfig, SeqId};

use super::config::AttentionKind;
use super::forward::local_heads;
use super::layers::{add_into, embed_forward, rmsnorm_forward, sigmoid_in_place, swiglu_forward};
use super::matmul::linear;
use super::{Batch, Model, Segment, SegmentKind};
use crate::policy::{ContextId, KvStats, Policy};
use crate::Error;

/// Sizes of a session's caches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionConfig {
    /// Tokens per KV page.
    pub page_size: usize,
    /// Pages in the pool (all contexts together; a page holds every layer's rows).
    pub num_pages: usize,
    /// Memory budget of the document cache in bytes.
    pub doc_cache_bytes: usize,
}

impl Default for SessionConfig {
    /// 16-token pages, 4096 of them (65 536 tokens), a 64 MiB document cache.
    fn default() -> Self {
        Self { page_size: 16, num_pages: 4096, doc_cache_bytes: 64 << 20 }
    }
}

impl SessionConfig {
    /// Enough pages for `contexts` contexts of up to `max_context` tokens each, however they
    /// fork (every context may own all of its pages after copy-on-write), with the default page
    /// size and document cache.
    pub fn for_contexts(contexts: usize, max_context: usize) -> Self {
        let base = Self::default();
        let per_context = max_context.div_ceil(base.page_size) + 1;
        Self { num_pages: contexts.max(1) * per_context + 16, ..base }
    }
}

#[derive(Debug, Clone)]
struct Ctx {
    /// The KV sequence (None for NSA, which keeps no KV).
    seq: Option<SeqId>,
    tokens: Vec<u32>,
    segments: Vec<Segment>,
    /// NSA: one decode cache per layer (empty for the other kinds).
    nsa: Vec<NsaCache<f32>>,
}

/// A model's inference state: contexts, their paged KV and the document cache.
pub struct Session<'m> {
    model: &'m Model,
    config: SessionConfig,
    kv: Option<PagedKv<f32>>,
    docs: Option<DocCache<f32>>,
    model_id: String,
    config_json: String,
    /// Logits at the last token of each cached document.
    doc_logits: HashMap<DocKey, Vec<f32>>,
    contexts: BTreeMap<ContextId, Ctx>,
    next_id: u64,
    doc_hits: u64,
    doc_misses: u64,
}

impl std::fmt::Debug for Session<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("config", &self.config)
            .field("model_id", &self.model_id)
            .field("contexts", &self.contexts.len())
            .finish_non_exhaustive()
    }
}

impl Model {
    /// An inference session over this model's current weights (see [`Session`]).
    pub fn session(&self, config: SessionConfig) -> Result<Session<'_>, Error> {
        let c = self.config();
        let model_id = format!("squid-policy-{}", self.fingerprint());
        let kv = match c.attention {
            AttentionKind::Nsa(_) => None,
            _ => Some(PagedKv::new(PagedKvConfig {
                layers: c.n_layers,
                kv_heads: c.n_kv_heads,
                head_dim: c.head_dim,
                page_size: config.page_size,
                num_pages: config.num_pages,
            })?),
        };
        let docs = match c.attention {
            AttentionKind::Segments => Some(DocCache::new(
                DocCacheConfig::new(model_id.clone(), c.n_layers, c.n_kv_heads, c.head_dim)
                    .with_rope(c.rope())
                    .with_memory_budget(config.doc_cache_bytes),
            )?),
            _ => None,
        };
        Ok(Session {
            model: self,
            config,
            kv,
            docs,
            model_id,
            config_json: c.to_json(),
            doc_logits: HashMap::new(),
            contexts: BTreeMap::new(),
            next_id: 0,
            doc_hits: 0,
            doc_misses: 0,
        })
    }
}

impl Session<'_> {
    fn ctx(&self, id: ContextId) -> Result<&Ctx, Error> {
        self.contexts.get(&id).ok_or(Error::UnknownContext(id.0))
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<(), Error> {
        let vocab = self.model.config().vocab;
        if let Some((i, &t)) = tokens.iter().enumerate().find(|(_, &t)| t as usize >= vocab) {
            return Err(Error::Shape(format!("token {t} at index {i} is outside the vocabulary of {vocab}")));
        }
        Ok(())
    }

    /// Runs `new[i]` (the new tokens of context `ids[i]`) through every layer against the paged
    /// KV, storing their K/V; returns the logits `[ids.len(), vocab]` at each context's last new
    /// token. All rows of all contexts go through each weight in one gemm.
    fn extend_paged(&mut self, ids: &[ContextId], new: &[&[u32]]) -> Result<Vec<f32>, Error> {
        let model = self.model;
        let c = *model.config();
        let dims = model.dims();
        let w = model.weights();
        let (d, hd, f) = (dims.d, dims.hd, dims.f);
        let (qd, kvd) = (dims.hq * hd, dims.hkv * hd);
        let seqs: Vec<SeqId> = ids
            .iter()
            .map(|id| self.ctx(*id).map(|c| c.seq.expect("paged contexts have a sequence")))
            .collect::<Result<_, _>>()?;
        let kv = self.kv.as_mut().expect("dense and segment sessions hold paged KV");
        // Take the pages first, all or nothing.
        let mut starts = Vec::with_capacity(ids.len());
        for (i, (&seq, toks)) in seqs.iter().zip(new).enumerate() {
            match kv.grow(seq, toks.len()) {
                Ok(r) => starts.push(r.start),
                Err(e) => {
                    for (&s, &start) in seqs[..i].iter().zip(&starts) {
                        kv.truncate(s, start).expect("shrinking to the old length");
                    }
                    return Err(e.into());
                }
            }
        }
        let tokens: Vec<u32> = new.iter().flat_map(|t| t.iter().copied()).collect();
        let mut positions = Vec::with_capacity(tokens.len());
        let mut cu_q = vec![0u32];
        for (toks, &start) in new.iter().zip(&starts) {
            positions.extend((start..start + toks.len()).map(|p| p as u64));
            cu_q.push(cu_q.last().copied().unwrap_or(0) + toks.len() as u32);
        }
        let t = tokens.len();
        let mut x = vec![0f32; t * d];
        embed_forward(&mut x, &w[super::weights::Dims::EMBED], &tokens, d);
        let attn_cfg = DenseConfig::causal(c.heads());
        for l in 0..dims.layers {
            let ix = dims.layer(l);
            let (mut xn, mut inv) = (vec![0f32; t * d], vec![0f32; t]);
            rmsnorm_forward(&mut xn, &mut inv, &x, &w[ix.attn_norm], d, c.norm_eps);
            let (mut q, mut k, mut v) = (vec![0f32; t * qd], vec![0f32; t * kvd], vec![0f32; t * kvd]);
            linear(&mut q, &xn, &w[ix.wq], t, d, qd);
            linear(&mut k, &xn, &w[ix.wk], t, d, kvd);
            linear(&mut v, &xn, &w[ix.wv], t, d, kvd);
            model.rope().forward(&mut q, dims.hq, &positions)?;
            model.rope().forward(&mut k, dims.hkv, &positions)?;
            for (i, (&seq, &start)) in seqs.iter().zip(&starts).enumerate() {
                let r = cu_q[i] as usize * kvd..cu_q[i + 1] as usize * kvd;
                kv.write(seq, l, start, &k[r.clone()], &v[r])?;
            }
            let views = seqs.iter().map(|&s| kv.view(s, l)).collect::<Result<Vec<_>, _>>()?;
            let o = attend_like_forward(&attn_cfg, &q, &views, &cu_q, kvd)?;
            let mut proj = vec![0f32; t * d];
            linear(&mut proj, &o, &w[ix.wo], t, qd, d);
            add_into(&mut x, &proj);
            rmsnorm_forward(&mut xn, &mut inv, &x, &w[ix.mlp_norm], d, c.norm_eps);
            let (mut a, mut b, mut h) = (vec![0f32; t * f], vec![0f32; t * f], vec![0f32; t * f]);
            linear(&mut a, &xn, &w[ix.w_gate], t, d, f);
            linear(&mut b, &xn, &w[ix.w_up], t, d, f);
            swiglu_forward(&mut h, &a, &b);
            linear(&mut proj, &h, &w[ix.w_down], t, f, d);
            add_into(&mut x, &proj);
        }
        // Only each context's last row needs logits.
        let last: Vec<f32> = cu_q[1..].iter().flat_map(|&e| x[(e as usize - 1) * d..e as usize * d].to_vec()).collect();
        Ok(head(model, &last))
    }

    /// NSA: runs `new[i]` (the new tokens of context `ids[i]`) through every layer, appending
    /// each token's K/V to the context's per-layer caches and decoding its output there; returns
    /// the logits `[ids.len(), vocab]` at each context's last new token. Rows of all contexts go
    /// through each weight in one gemm; contexts decode in parallel.
    fn extend_nsa(&mut self, ids: &[ContextId], new: &[&[u32]]) -> Result<Vec<f32>, Error> {
        use rayon::prelude::*;
        let model = self.model;
        let c = *model.config();
        let dims = model.dims();
        let w = model.weights();
        let (d, hd, f) = (dims.d, dims.hd, dims.f);
        let (qd, kvd, gd) = (dims.hq * hd, dims.hkv * hd, dims.hq * 3);
        let mut positions = Vec::new();
        let mut cu = vec![0usize];
        for (id, toks) in ids.iter().zip(new) {
            let start = self.ctx(*id)?.tokens.len() as u64;
            positions.extend(start..start + toks.len() as u64);
            cu.push(cu.last().copied().unwrap_or(0) + toks.len());
        }
        let tokens: Vec<u32> = new.iter().flat_map(|t| t.iter().copied()).collect();
        // The contexts' caches, taken out for the step (put back below, also on an error).
        let mut caches: Vec<Vec<NsaCache<f32>>> =
            ids.iter().map(|id| std::mem::take(&mut self.contexts.get_mut(id).expect("checked").nsa)).collect();
        let result = (|| -> Result<Vec<f32>, Error> {
            let t = tokens.len();
            let mut x = vec![0f32; t * d];
            embed_forward(&mut x, &w[super::weights::Dims::EMBED], &tokens, d);
            for l in 0..dims.layers {
                let ix = dims.layer(l);
                let (mut xn, mut inv) = (vec![0f32; t * d], vec![0f32; t]);
                rmsnorm_forward(&mut xn, &mut inv, &x, &w[ix.attn_norm], d, c.norm_eps);
                let (mut q, mut k, mut v) = (vec![0f32; t * qd], vec![0f32; t * kvd], vec![0f32; t * kvd]);
                linear(&mut q, &xn, &w[ix.wq], t, d, qd);
                linear(&mut k, &xn, &w[ix.wk], t, d, kvd);
                linear(&mut v, &xn, &w[ix.wv], t, d, kvd);
                model.rope().forward(&mut q, dims.hq, &positions)?;
                model.rope().forward(&mut k, dims.hkv, &positions)?;
                let wg = ix.wg.ok_or_else(|| Error::Config("an NSA model without gate weights".into()))?;
                let mut gates = vec![0f32; t * gd];
                linear(&mut gates, &xn, &w[wg], t, d, gd);
                sigmoid_in_place(&mut gates);
                let mut o = vec![0f32; t * qd];
                // Each context's rows in order: token r sees the cache up to itself.
                let mut outs: Vec<&mut [f32]> = Vec::with_capacity(ids.len());
                let mut rest = &mut o[..];
                for i in 0..ids.len() {
                    let (mine, tail) = rest.split_at_mut((cu[i + 1] - cu[i]) * qd);
                    outs.push(mine);
                    rest = tail;
                }
                let firsts = &cu[..ids.len()];
                caches.par_iter_mut().zip(outs).zip(firsts).try_for_each(
                    |((cache, out), &first)| -> Result<(), Error> {
                        let layer = &mut cache[l];
                        for (j, orow) in out.chunks_exact_mut(qd).enumerate() {
                            let r = first + j;
                            layer.append(0, &k[r * kvd..(r + 1) * kvd], &v[r * kvd..(r + 1) * kvd], None)?;
                            let step = layer.decode(&q[r * qd..(r + 1) * qd], &gates[r * gd..(r + 1) * gd])?;
                            orow.copy_from_slice(&step.o);
                        }
                        Ok(())
                    },
                )?;
                let mut proj = vec![0f32; t * d];
                linear(&mut proj, &o, &w[ix.wo], t, qd, d);
                add_into(&mut x, &proj);
                rmsnorm_forward(&mut xn, &mut inv, &x, &w[ix.mlp_norm], d, c.norm_eps);
                let (mut a, mut b, mut h) = (vec![0f32; t * f], vec![0f32; t * f], vec![0f32; t * f]);
                linear(&mut a, &xn, &w[ix.w_gate], t, d, f);
                linear(&mut b, &xn, &w[ix.w_up], t, d, f);
                swiglu_forward(&mut h, &a, &b);
                linear(&mut proj, &h, &w[ix.w_down], t, f, d);
                add_into(&mut x, &proj);
            }
            let last: Vec<f32> = cu[1..].iter().flat_map(|&e| x[(e - 1) * d..e * d].to_vec()).collect();
            Ok(head(model, &last))
        })();
        for (id, cache) in ids.iter().zip(caches) {
            self.contexts.get_mut(id).expect("checked").nsa = cache;
        }
        result
    }

    /// NSA by recomputation: the forward over each context's whole sequence (packed), logits
    /// at each last token. What [`Session::extend_nsa`] is tested against.
    #[cfg(test)]
    pub(crate) fn recompute(&self, ids: &[ContextId]) -> Result<Vec<f32>, Error> {
        let seqs = ids
            .iter()
            .map(|id| self.ctx(*id).map(|c| (c.tokens.clone(), Vec::new())))
            .collect::<Result<Vec<_>, _>>()?;
        let batch = Batch::from_sequences(&seqs);
        let batch = Batch { segments: Vec::new(), ..batch };
        let fwd = self.model.forward(&batch)?;
        let vocab = self.model.config().vocab;
        Ok(batch.cu_seqlens[1..]
            .iter()
            .flat_map(|&e| fwd.logits()[(e as usize - 1) * vocab..e as usize * vocab].to_vec())
            .collect())
    }

    /// Segment attention: a document's K/V from the cache (or computed alone and cached), placed
    /// at the end of `id`.
    fn append_document(&mut self, id: ContextId, tokens: &[u32]) -> Result<Vec<f32>, Error> {
        let model = self.model;
        let c = *model.config();
        let seq = self.ctx(id)?.seq.expect("segment contexts have a sequence");
        let key = DocKey::new(&self.model_id, self.config_json.as_bytes(), tokens);
        let docs = self.docs.as_ref().expect("segment sessions have a document cache");
        let mut computed_logits = None;
        // The document alone, as the training forward computes every document (positions
        // 0..n, its own sequence); the cache keeps its keys before RoPE.
        let alone = Batch {
            tokens: tokens.to_vec(),
            cu_seqlens: vec![0, tokens.len() as u32],
            segments: vec![vec![Segment { kind: SegmentKind::Document, len: tokens.len() }]],
        };
        let entry = docs.get_or_insert_with(key, || -> Result<DocKv<f32>, Error> {
            let fwd = model.forward(&alone)?;
            let (mut k, mut v) = (Vec::new(), Vec::new());
            for l in 0..c.n_layers {
                let (kl, vl) = fwd.layer_kv_pre_rope(l).expect("a document pass keeps its keys before RoPE");
                k.extend_from_slice(kl);
                v.extend_from_slice(vl);
            }
            computed_logits = Some(fwd.logits()[(tokens.len() - 1) * c.vocab..].to_vec());
            let shape =
                DocShape { layers: c.n_layers, tokens: tokens.len(), kv_heads: c.n_kv_heads, head_dim: c.head_dim };
            Ok(DocKv::new(shape, k, v)?)
        })?;
        let logits = match computed_logits {
            Some(lg) => {
                self.doc_misses += 1;
                self.doc_logits.insert(key, lg.clone());
                lg
            }
            None => {
                self.doc_hits += 1;
                match self.doc_logits.get(&key) {
                    Some(lg) => lg.clone(),
                    None => {
                        let fwd = model.forward(&alone)?;
                        fwd.logits()[(tokens.len() - 1) * c.vocab..].to_vec()
                    }
                }
            }
        };
        let kv = self.kv.as_mut().expect("segment sessions hold paged KV");
        let start = kv.grow(seq, tokens.len())?.start;
        // Keys rotated to their true positions by the forward's own RoPE call: bitwise the keys
        // the training forward gives Global tokens (not a rotation of rotated keys).
        let positions: Vec<u64> = (start as u64..(start + tokens.len()) as u64).collect();
        for l in 0..c.n_layers {
            let mut k = entry.k_layer(l).to_vec();
            model.rope().forward(&mut k, c.n_kv_heads, &positions)?;
            kv.write(seq, l, start, &k, entry.v_layer(l))?;
        }
        Ok(logits)
    }

    /// Records appended tokens in the context's token list and segments.
    fn record(&mut self, id: ContextId, tokens: &[u32], kind: SegmentKind) {
        let ctx = self.contexts.get_mut(&id).expect("checked");
        ctx.tokens.extend_from_slice(tokens);
        match ctx.segments.last_mut() {
            Some(s) if s.kind == SegmentKind::Global && kind == SegmentKind::Global => s.len += tokens.len(),
            _ => ctx.segments.push(Segment { kind, len: tokens.len() }),
        }
    }

    /// Context `id`'s tokens and segments so far (what [`Model::forward`] would be given).
    pub fn context(&self, id: ContextId) -> Result<(&[u32], &[Segment]), Error> {
        let c = self.ctx(id)?;
        Ok((&c.tokens, &c.segments))
    }
}

/// The new rows' attention over their contexts' paged K/V, computed by the training forward's
/// own kernel (`dense::forward`, bottom-right aligned) over the contexts' keys gathered into one
/// contiguous buffer. The forward's result for a query row depends only on that row and on its
/// sequence's keys, taken in 64-key blocks from the sequence's first token, so each new row gets
/// bitwise the output the trainer's forward over the whole sequence gives it (`decode_paged`
/// splits the keys by page and combines the parts, a different summation order). The gather
/// copies each context's keys once per layer, as many bytes as attention reads anyway.
pub(crate) fn attend_like_forward(
    cfg: &DenseConfig,
    q: &[f32],
    views: &[squid_attention::paged::PagedKvView<'_, f32>],
    cu_q: &[u32],
    kvd: usize,
) -> Result<Vec<f32>, Error> {
    let total: usize = views.iter().map(|v| v.len).sum();
    let (mut k, mut v) = (Vec::with_capacity(total * kvd), Vec::with_capacity(total * kvd));
    let mut cu_k = Vec::with_capacity(views.len() + 1);
    cu_k.push(0u32);
    for view in views {
        for (_, kc, vc) in view.chunks() {
            k.extend_from_slice(kc);
            v.extend_from_slice(vc);
        }
        let len = u32::try_from(k.len() / kvd).map_err(|_| Error::Shape("more than 2^32 cached tokens".into()))?;
        cu_k.push(len);
    }
    Ok(dense::forward(cfg, q, &k, &v, cu_q, &cu_k)?.o)
}

/// Final norm and tied head on rows `x [rows, d]`.
fn head(model: &Model, x: &[f32]) -> Vec<f32> {
    let c = model.config();
    let dims = model.dims();
    let rows = x.len() / c.d_model;
    let (mut xn, mut inv) = (vec![0f32; x.len()], vec![0f32; rows]);
    rmsnorm_forward(&mut xn, &mut inv, x, &model.weights()[dims.final_norm()], c.d_model, c.norm_eps);
    let mut logits = vec![0f32; rows * c.vocab];
    linear(&mut logits, &xn, &model.weights()[super::weights::Dims::EMBED], rows, c.d_model, c.vocab);
    logits
}

impl Policy for Session<'_> {
    fn vocab_size(&self) -> usize {
        self.model.config().vocab
    }

    fn open(&mut self) -> Result<ContextId, Error> {
        let id = ContextId(self.next_id);
        self.next_id += 1;
        let seq = self.kv.as_mut().map(|kv| kv.allocate());
        let c = self.model.config();
        let nsa = match c.attention {
            AttentionKind::Nsa(p) => {
                let heads = local_heads(&self.model.dims());
                let cache = NsaCache::new(p.to_nsa_config(), heads, 1, false)?;
                vec![cache; c.n_layers]
            }
            _ => Vec::new(),
        };
        self.contexts.insert(id, Ctx { seq, tokens: Vec::new(), segments: Vec::new(), nsa });
        Ok(id)
    }

    fn append(&mut self, ctx: ContextId, tokens: &[u32], kind: SegmentKind) -> Result<Vec<f32>, Error> {
        self.ctx(ctx)?;
        self.check_tokens(tokens)?;
        if tokens.is_empty() {
            return Err(Error::Shape("append of zero tokens: there is no last token to give logits for".into()));
        }
        let logits = match (self.model.config().attention, kind) {
            (AttentionKind::Nsa(_), _) => self.extend_nsa(&[ctx], &[tokens])?,
            (AttentionKind::Segments, SegmentKind::Document) => self.append_document(ctx, tokens)?,
            _ => self.extend_paged(&[ctx], &[tokens])?,
        };
        self.record(ctx, tokens, kind);
        Ok(logits)
    }

    fn step(&mut self, ctxs: &[ContextId], tokens: &[u32]) -> Result<Vec<f32>, Error> {
        if ctxs.len() != tokens.len() {
            return Err(Error::Shape(format!("step: {} contexts but {} tokens", ctxs.len(), tokens.len())));
        }
        self.check_tokens(tokens)?;
        let mut seen = std::collections::BTreeSet::new();
        for &id in ctxs {
            let c = self.ctx(id)?;
            if !seen.insert(id) {
                return Err(Error::Shape(format!("step: context {} given twice", id.0)));
            }
            let segment_mode = self.model.config().attention == AttentionKind::Segments;
            if segment_mode && c.segments.last().is_some_and(|s| s.kind == SegmentKind::Document) {
                return Err(Error::Config(format!(
                    "step: context {} ends with a Document; append a Global segment first",
                    id.0
                )));
            }
        }
        if ctxs.is_empty() {
            return Ok(Vec::new());
        }
        let new: Vec<&[u32]> = tokens.chunks(1).collect();
        let logits = if matches!(self.model.config().attention, AttentionKind::Nsa(_)) {
            self.extend_nsa(ctxs, &new)?
        } else {
            self.extend_paged(ctxs, &new)?
        };
        for (&id, &t) in ctxs.iter().zip(tokens) {
            self.record(id, &[t], SegmentKind::Global);
        }
        Ok(logits)
    }

    fn fork(&mut self, ctx: ContextId) -> Result<ContextId, Error> {
        let parent = self.ctx(ctx)?.clone();
        let seq = match (self.kv.as_mut(), parent.seq) {
            (Some(kv), Some(s)) => Some(kv.fork(s)?),
            _ => None,
        };
        let id = ContextId(self.next_id);
        self.next_id += 1;
        self.contexts.insert(id, Ctx { seq, ..parent });
        Ok(id)
    }

    fn close(&mut self, ctx: ContextId) -> Result<(), Error> {
        let c = self.contexts.remove(&ctx).ok_or(Error::UnknownContext(ctx.0))?;
        if let (Some(kv), Some(s)) = (self.kv.as_mut(), c.seq) {
            kv.free(s)?;
        }
        Ok(())
    }

    fn len(&self, ctx: ContextId) -> Result<usize, Error> {
        Ok(self.ctx(ctx)?.tokens.len())
    }

    fn kv_stats(&self) -> KvStats {
        let mut stats = KvStats { doc_hits: self.doc_hits, doc_misses: self.doc_misses, ..KvStats::default() };
        if let Some(kv) = &self.kv {
            let cfg = kv.config();
            let page_bytes = (2 * cfg.layers * cfg.page_len() * std::mem::size_of::<f32>()) as u64;
            stats.bytes_held = (cfg.num_pages - kv.free_pages()) as u64 * page_bytes;
            stats.bytes_unshared = self
                .contexts
                .values()
                .filter_map(|c| c.seq)
                .map(|s| kv.page_table(s).map_or(0, |p| p.len() as u64) * page_bytes)
                .sum();
        }
        stats
    }
}
