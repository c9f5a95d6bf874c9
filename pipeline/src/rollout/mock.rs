//! Mock policies for tests: logits from a function of the context's token history, with a log
//! of every call so tests can check what the loop did.

use std::collections::{HashMap, HashSet};

use squid_attention::segments::SegmentKind;

use crate::policy::{ContextId, KvStats, Policy};
use crate::Error;

/// Bytes of KV one token takes in the mock's accounting.
pub(crate) const BYTES_PER_TOKEN: u64 = 16;

/// Logits as a function of the token history.
pub(crate) type LogitsFn = Box<dyn FnMut(&[u32]) -> Vec<f32>>;

struct MockContext {
    tokens: Vec<u32>,
    /// Tokens shared with the context it was forked from.
    shared: usize,
    /// Kind of the last segment appended (or extended by a step).
    last_kind: SegmentKind,
}

/// A policy whose logits come from `logits_fn(history)`.
pub(crate) struct MockPolicy {
    vocab: usize,
    logits_fn: LogitsFn,
    contexts: HashMap<u64, MockContext>,
    next_id: u64,
    /// Every append: context, tokens, kind.
    pub appends: Vec<(ContextId, Vec<u32>, SegmentKind)>,
    /// Every step: the contexts in it.
    pub steps: Vec<Vec<ContextId>>,
    /// Forks made.
    pub forks: usize,
    /// Contexts opened.
    pub opened: usize,
    /// Contexts closed.
    pub closed: usize,
    documents_seen: HashSet<Vec<u32>>,
    doc_hits: u64,
    doc_misses: u64,
}

impl MockPolicy {
    pub(crate) fn new(vocab: usize, logits_fn: LogitsFn) -> Self {
        Self {
            vocab,
            logits_fn,
            contexts: HashMap::new(),
            next_id: 0,
            appends: Vec::new(),
            steps: Vec::new(),
            forks: 0,
            opened: 0,
            closed: 0,
            documents_seen: HashSet::new(),
            doc_hits: 0,
            doc_misses: 0,
        }
    }

    /// Contexts still open.
    pub(crate) fn live(&self) -> usize {
        self.contexts.len()
    }

    fn logits(&mut self, ctx: ContextId) -> Vec<f32> {
        let history = self.contexts[&ctx.0].tokens.clone();
        let row = (self.logits_fn)(&history);
        assert_eq!(row.len(), self.vocab, "mock logits function returned the wrong length");
        row
    }

    fn context(&mut self, ctx: ContextId) -> Result<&mut MockContext, Error> {
        self.contexts.get_mut(&ctx.0).ok_or(Error::UnknownContext(ctx.0))
    }
}

impl Policy for MockPolicy {
    fn vocab_size(&self) -> usize {
        self.vocab
    }

    fn open(&mut self) -> Result<ContextId, Error> {
        let id = self.next_id;
        self.next_id += 1;
        self.opened += 1;
        self.contexts.insert(id, MockContext { tokens: Vec::new(), shared: 0, last_kind: SegmentKind::Global });
        Ok(ContextId(id))
    }

    fn append(&mut self, ctx: ContextId, tokens: &[u32], kind: SegmentKind) -> Result<Vec<f32>, Error> {
        let vocab = self.vocab;
        let context = self.context(ctx)?;
        if tokens.iter().any(|&t| t as usize >= vocab) {
            return Err(Error::Shape("token outside the vocabulary".into()));
        }
        context.tokens.extend_from_slice(tokens);
        context.last_kind = kind;
        if kind == SegmentKind::Document {
            if self.documents_seen.insert(tokens.to_vec()) {
                self.doc_misses += 1;
            } else {
                self.doc_hits += 1;
            }
        }
        self.appends.push((ctx, tokens.to_vec(), kind));
        Ok(self.logits(ctx))
    }

    fn step(&mut self, ctxs: &[ContextId], tokens: &[u32]) -> Result<Vec<f32>, Error> {
        if ctxs.len() != tokens.len() {
            return Err(Error::Shape(format!("{} contexts, {} tokens", ctxs.len(), tokens.len())));
        }
        let distinct: HashSet<ContextId> = ctxs.iter().copied().collect();
        if distinct.len() != ctxs.len() {
            return Err(Error::Shape("a context twice in one step".into()));
        }
        let mut out = Vec::with_capacity(ctxs.len() * self.vocab);
        for (&ctx, &token) in ctxs.iter().zip(tokens) {
            let context = self.context(ctx)?;
            // The contract: logits are never taken at a document's last token, so a step (which
            // extends the final Global segment) never directly follows a document.
            if context.last_kind == SegmentKind::Document {
                return Err(Error::Shape(format!("step on context {} right after a document", ctx.0)));
            }
            context.tokens.push(token);
            out.extend(self.logits(ctx));
        }
        self.steps.push(ctxs.to_vec());
        Ok(out)
    }

    fn fork(&mut self, ctx: ContextId) -> Result<ContextId, Error> {
        let context = self.context(ctx)?;
        let tokens = context.tokens.clone();
        let last_kind = context.last_kind;
        let id = self.next_id;
        self.next_id += 1;
        self.forks += 1;
        self.contexts.insert(id, MockContext { shared: tokens.len(), tokens, last_kind });
        Ok(ContextId(id))
    }

    fn close(&mut self, ctx: ContextId) -> Result<(), Error> {
        self.contexts.remove(&ctx.0).ok_or(Error::UnknownContext(ctx.0))?;
        self.closed += 1;
        Ok(())
    }

    fn len(&self, ctx: ContextId) -> Result<usize, Error> {
        self.contexts.get(&ctx.0).map(|c| c.tokens.len()).ok_or(Error::UnknownContext(ctx.0))
    }

    fn kv_stats(&self) -> KvStats {
        let unshared: u64 = self.contexts.values().map(|c| c.tokens.len() as u64).sum();
        let held: u64 = self.contexts.values().map(|c| (c.tokens.len() - c.shared) as u64).sum();
        KvStats {
            bytes_held: held * BYTES_PER_TOKEN,
            bytes_unshared: unshared * BYTES_PER_TOKEN,
            doc_hits: self.doc_hits,
            doc_misses: self.doc_misses,
        }
    }
}

/// A large logit for `token`, 0 elsewhere: greedy sampling picks `token`.
pub(crate) fn one_hot(vocab: usize, token: u32) -> Vec<f32> {
    let mut row = vec![0.0; vocab];
    row[token as usize] = 30.0;
    row
}

/// Logits that teach `scripts`: at a history that is a proper prefix of a script, one-hot on
/// the script's next token; elsewhere uniform.
pub(crate) fn teacher(vocab: usize, scripts: Vec<Vec<u32>>) -> LogitsFn {
    Box::new(move |history: &[u32]| {
        for script in &scripts {
            if history.len() < script.len() && script[..history.len()] == *history {
                return one_hot(vocab, script[history.len()]);
            }
        }
        vec![0.0; vocab]
    })
}

/// Logits that write `program` after every `<code>` (the tokens since the last `<code>` index
/// into it), then `end` (a tool token), forever.
pub(crate) fn repeat_turn(vocab: usize, program: Vec<u32>, end: u32) -> LogitsFn {
    Box::new(move |history: &[u32]| {
        let since = history.iter().rev().position(|&t| t == crate::tokenizer::CODE).unwrap_or(0);
        one_hot(vocab, program.get(since).copied().unwrap_or(end))
    })
}

/// Pseudo-random logits, a deterministic function of the history (a hash of it).
pub(crate) fn hashed(vocab: usize, scale: f32) -> LogitsFn {
    Box::new(move |history: &[u32]| {
        let mut h = blake3::Hasher::new();
        for &t in history {
            h.update(&t.to_le_bytes());
        }
        let mut reader = h.finalize_xof();
        let mut bytes = vec![0u8; vocab * 2];
        reader.fill(&mut bytes);
        bytes.chunks(2).map(|b| f32::from(u16::from_le_bytes([b[0], b[1]])) / 65535.0 * scale).collect()
    })
}
