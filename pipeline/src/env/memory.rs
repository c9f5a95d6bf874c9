//! The memory and search tools' store: snippets of text ranked by embedding similarity.
//!
//! Embeddings are the documented cheap alternative to mean-pooled policy hidden states: a
//! hashed bag of words. Each lower-cased word of the text (identifiers also split at `_`;
//! one-character words and numbers skipped, as they carry no topic) adds 1 to one of
//! [`EMBED_DIM`] buckets (blake3 of the word), and the vector is L2-normalised; the
//! similarity of two texts is the cosine of their vectors. It needs no forward pass, is the same
//! whichever checkpoint runs, and ranks a snippet by the words it shares with the query (so the
//! query "project helper" finds the snippet describing the project's helper).
//!
//! [`Memory`] is a project's memory: a size budget in bytes, and an eviction rule stated here:
//! when a new snippet does not fit, the entry with the lowest credit goes first, ties broken by
//! the least recently used (stored or recalled longest ago), until it fits. With fixed storage
//! policies no entry has credit, so the rule is least-recently-used; with
//! [`MemoryPolicy::PolicyDecides`] an entry's credit is what later episodes that recalled it
//! gained over episodes run without the memory.

use serde::{Deserialize, Serialize};

/// Buckets of the hashed bag-of-words embedding.
pub const EMBED_DIM: usize = 256;
/// Longest snippet `<store>` accepts (bytes).
pub const MAX_SNIPPET_BYTES: usize = 512;
/// Longest `<recall>` or `<search>` query (bytes).
pub const MAX_QUERY_BYTES: usize = 128;

/// When episodes' work goes into a project's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryPolicy {
    /// Nothing is stored (the memory tool answers from an empty memory).
    #[default]
    Never,
    /// The program of every accepted (fully solved) episode is stored, with its task's
    /// description.
    EveryAccepted,
    /// Only a solved episode's program that followed a failing run (a fix) is stored.
    FixesAfterFailure,
    /// The policy's own `<store>` spans are stored; recalled entries are credited.
    PolicyDecides,
}

impl MemoryPolicy {
    /// Every policy, in flag order.
    pub const ALL: [MemoryPolicy; 4] = [
        MemoryPolicy::Never,
        MemoryPolicy::EveryAccepted,
        MemoryPolicy::FixesAfterFailure,
        MemoryPolicy::PolicyDecides,
    ];

    /// The flag value.
    pub fn name(self) -> &'static str {
        match self {
            MemoryPolicy::Never => "never",
            MemoryPolicy::EveryAccepted => "every-accepted",
            MemoryPolicy::FixesAfterFailure => "fixes-after-failure",
            MemoryPolicy::PolicyDecides => "policy-decides",
        }
    }

    /// Parses a flag value.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.name() == text)
    }
}

/// The hashed bag-of-words embedding of `text` (L2-normalised; all zeros for a text without
/// words).
pub fn embed(text: &str) -> [f32; EMBED_DIM] {
    let mut v = [0.0f32; EMBED_DIM];
    let topical = |w: &&str| w.len() > 1 && !w.bytes().all(|b| b.is_ascii_digit());
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).filter(topical) {
        let word = word.to_ascii_lowercase();
        let mut add = |w: &str| {
            let h = blake3::hash(w.as_bytes());
            let bucket = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes")) % EMBED_DIM as u64;
            v[bucket as usize] += 1.0;
        };
        add(&word);
        if word.contains('_') {
            word.split('_').filter(topical).for_each(&mut add);
        }
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// Cosine similarity of two [`embed`] vectors.
pub fn similarity(a: &[f32; EMBED_DIM], b: &[f32; EMBED_DIM]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The indices of the `k` texts most similar to `query` (similarity above 0), best first; ties
/// keep the earlier text first.
pub fn top_k<'a>(query: &str, texts: impl Iterator<Item = &'a str>, k: usize) -> Vec<(usize, f32)> {
    let q = embed(query);
    let mut scored: Vec<(usize, f32)> =
        texts.enumerate().map(|(i, t)| (i, similarity(&q, &embed(t)))).filter(|&(_, s)| s > 1e-6).collect();
    scored.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    scored.truncate(k);
    scored
}

/// One stored snippet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MemoryEntry {
    /// The text.
    pub text: String,
    /// Logical time it was stored or last recalled (for the eviction rule).
    pub last_used: u64,
    /// Times an episode recalled it.
    pub hits: u64,
    /// Summed reward gain of episodes that recalled it over episodes without the memory.
    pub credit: f64,
    /// Gains summed into `credit`.
    pub credited: u64,
}

impl MemoryEntry {
    /// Mean gain per credited recall (0 before any).
    pub fn mean_credit(&self) -> f64 {
        if self.credited == 0 {
            0.0
        } else {
            self.credit / self.credited as f64
        }
    }
}

/// What a recall found: entry indices and their text.
#[derive(Debug, Clone, PartialEq)]
pub struct Recall {
    /// Indices into [`Memory::entries`], best first.
    pub hits: Vec<usize>,
    /// The tool's answer.
    pub text: String,
}

/// A project's memory: snippets under a byte budget (see the module docs for the eviction rule).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    entries: Vec<MemoryEntry>,
    budget_bytes: usize,
    clock: u64,
    /// Entries evicted so far.
    pub evictions: u64,
}

impl Memory {
    /// An empty memory holding at most `budget_bytes` of snippet text.
    pub fn new(budget_bytes: usize) -> Self {
        Self { entries: Vec::new(), budget_bytes, clock: 0, evictions: 0 }
    }

    /// The entries, oldest first.
    pub fn entries(&self) -> &[MemoryEntry] {
        &self.entries
    }

    /// Bytes of snippet text held.
    pub fn used_bytes(&self) -> usize {
        self.entries.iter().map(|e| e.text.len()).sum()
    }

    /// The budget.
    pub fn budget_bytes(&self) -> usize {
        self.budget_bytes
    }

    /// Checks a snippet before storing: `Err` is the tool's answer (empty, too long, larger than
    /// the whole budget).
    pub fn check_snippet(&self, text: &str) -> Result<String, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("store: nothing to store (the snippet is empty)".into());
        }
        if text.len() > MAX_SNIPPET_BYTES {
            return Err(format!(
                "store: the snippet is {} bytes, more than the {MAX_SNIPPET_BYTES} allowed; not stored",
                text.len()
            ));
        }
        if text.len() > self.budget_bytes {
            return Err(format!(
                "store: the snippet is {} bytes, more than the whole memory of {} bytes; not stored",
                text.len(),
                self.budget_bytes
            ));
        }
        Ok(text.to_string())
    }

    /// Stores `text` (evicting by the rule until it fits); an identical snippet is refreshed
    /// instead of stored twice. Returns the tool's answer.
    pub fn store(&mut self, text: &str) -> String {
        let text = match self.check_snippet(text) {
            Ok(t) => t,
            Err(answer) => return answer,
        };
        self.clock += 1;
        if let Some(e) = self.entries.iter_mut().find(|e| e.text == text) {
            e.last_used = self.clock;
            return format!(
                "store: already in memory ({} entries, {} of {} bytes)",
                self.entries.len(),
                self.used_bytes(),
                self.budget_bytes
            );
        }
        let mut evicted = 0;
        while self.used_bytes() + text.len() > self.budget_bytes && !self.entries.is_empty() {
            let victim = (0..self.entries.len())
                .min_by(|&a, &b| {
                    let (ea, eb) = (&self.entries[a], &self.entries[b]);
                    ea.mean_credit().total_cmp(&eb.mean_credit()).then(ea.last_used.cmp(&eb.last_used))
                })
                .expect("not empty");
            self.entries.remove(victim);
            evicted += 1;
        }
        self.evictions += evicted;
        self.entries.push(MemoryEntry { text, last_used: self.clock, hits: 0, credit: 0.0, credited: 0 });
        let forgot = if evicted > 0 { format!("; memory full, forgot {evicted} older entries") } else { String::new() };
        format!(
            "store: stored ({} entries, {} of {} bytes{forgot})",
            self.entries.len(),
            self.used_bytes(),
            self.budget_bytes
        )
    }

    /// The `k` entries best matching `query`, as the tool's answer (a bad query is answered,
    /// not an error). Marks the hits as used.
    pub fn recall(&mut self, query: &str, k: usize) -> Recall {
        let query = query.trim();
        if let Err(text) = check_query("recall", query) {
            return Recall { hits: Vec::new(), text };
        }
        if self.entries.is_empty() {
            return Recall { hits: Vec::new(), text: "recall: the memory is empty".into() };
        }
        let found = top_k(query, self.entries.iter().map(|e| e.text.as_str()), k);
        if found.is_empty() {
            return Recall { hits: Vec::new(), text: "recall: no stored snippet matches".into() };
        }
        self.clock += 1;
        let mut text = format!("recall: {} of {} entries", found.len(), self.entries.len());
        for &(i, _) in &found {
            self.entries[i].last_used = self.clock;
            self.entries[i].hits += 1;
            text.push('\n');
            text.push_str(&self.entries[i].text);
        }
        Recall { hits: found.iter().map(|&(i, _)| i).collect(), text }
    }

    /// Adds `gain` to the credit of the entry holding `text` (if it is still held).
    pub fn credit(&mut self, text: &str, gain: f64) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.text == text) {
            if gain.is_finite() {
                e.credit += gain;
                e.credited += 1;
            }
        }
    }
}

/// A query the tools refuse: empty or over-long. `Err` is the tool's answer.
pub(crate) fn check_query(tool: &str, query: &str) -> Result<(), String> {
    if query.is_empty() {
        Err(format!("{tool}: the query is empty"))
    } else if query.len() > MAX_QUERY_BYTES {
        Err(format!("{tool}: the query is {} bytes, more than the {MAX_QUERY_BYTES} allowed", query.len()))
    } else {
        Ok(())
    }
}
