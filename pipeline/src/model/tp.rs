//! Tensor-parallel training over N local ranks (threads of a `LocalGroup`), Megatron-LM style.
//!
//! What rank `r` of `N` holds (`Hq` query heads, `Hkv` kv heads, `F` hidden units):
//! ```text
//! embed, attn_norm, mlp_norm, final_norm   replicated (every rank the whole tensor)
//! wq [Hq/N heads, d]                       column-parallel: its query heads' rows
//! wk, wv                                   column-parallel: its kv heads' rows when Hkv >= N;
//!                                          when Hkv < N each kv head is replicated on N/Hkv
//!                                          consecutive ranks (squid_collectives::tp::HeadLayout)
//! wg (NSA) [Hq/N * 3, d]                   its heads' gate rows
//! wo [d, Hq/N heads]                       row-parallel: its heads' columns
//! w_gate, w_up [F/N, d]                    column-parallel
//! w_down [d, F/N]                          row-parallel
//! ```
//! NSA needs `Hkv >= N` (a GQA group chooses its blocks from all its query heads' scores, so a
//! group must not be split over ranks).
//!
//! The embedding and the tied head are replicated, not vocabulary-parallel: the vocabulary is
//! small (512) and the loss function then sees whole logits rows on every rank.
//!
//! Communication per block: forward, an all-reduce after `wo` and after `w_down` (Megatron's
//! `g`); backward, an all-reduce of the gradient entering each sub-block's norm output (`f`).
//! The residual stream, and so every replicated tensor's gradient, is then identical on all
//! ranks. Replicated kv heads' weight gradients are partial (each replica's query heads only)
//! and are summed over their replicas.
//!
//! A step: forward, `loss_fn(logits)` on every rank (same logits, same result), backward, the
//! global gradient norm (each replicated tensor counted once) by an all-reduce, clipping by it,
//! then AdamW on each rank's shard (AdamW is element-wise, so sharded AdamW equals AdamW on the
//! gathered weights). N = 1 runs the same code on a group of one.

use std::sync::Mutex;
use std::time::Duration;

use squid_collectives::tp::{HeadLayout, TpRank};
use squid_collectives::{Communicator, LocalComm, LocalGroup, ReduceOp};
use squid_optim::{AdamW, AdamWConfig};

use super::backward::backward_core;
use super::forward::{forward_core, Prepared, Reducer};
use super::weights::Dims;
use super::{Batch, Model, ModelConfig};
use crate::train::dp::{DataParallel, SingleProcess};
use crate::Error;

/// How a full tensor is cut for one rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Split {
    /// Every rank holds all of it.
    Replicated,
    /// Rows `start..start + len` of a `[rows, cols]` tensor (column-parallel weights).
    Rows { start: usize, len: usize, cols: usize },
    /// Columns `start..start + len` of a `[rows, cols]` tensor (row-parallel weights).
    Cols { start: usize, len: usize, cols: usize },
}

impl Split {
    fn take(&self, full: &[f32]) -> Vec<f32> {
        match *self {
            Split::Replicated => full.to_vec(),
            Split::Rows { start, len, cols } => full[start * cols..(start + len) * cols].to_vec(),
            Split::Cols { start, len, cols } => {
                full.chunks_exact(cols).flat_map(|row| row[start..start + len].iter().copied()).collect()
            }
        }
    }

    fn put(&self, full: &mut [f32], part: &[f32]) {
        match *self {
            Split::Replicated => full.copy_from_slice(part),
            Split::Rows { start, len, cols } => full[start * cols..(start + len) * cols].copy_from_slice(part),
            Split::Cols { start, len, cols } => {
                for (row, p) in full.chunks_exact_mut(cols).zip(part.chunks_exact(len)) {
                    row[start..start + len].copy_from_slice(p);
                }
            }
        }
    }
}

/// One rank's part of the model.
#[derive(Debug, Clone)]
struct Shard {
    dims: Dims,
    /// Per tensor, how it was cut.
    splits: Vec<Split>,
    /// Per tensor, whether this rank counts it in the global norm (replicas count once).
    counts_in_norm: Vec<bool>,
    /// The kv-weight tensors and this rank's kv head slot, when kv heads are replicated.
    kv_replicated: Option<(Vec<usize>, usize)>,
}

fn shard_plan(config: &ModelConfig, rank: usize, world: usize) -> Result<Shard, Error> {
    let tp = TpRank::new(rank, world).map_err(|e| Error::Config(format!("tp: {e}")))?;
    let heads = HeadLayout::new(config.n_heads, config.n_kv_heads, config.head_dim, tp)
        .map_err(|e| Error::Config(format!("tp: {e}")))?;
    if heads.kv_replicas() > 1 && matches!(config.attention, super::AttentionKind::Nsa(_)) {
        // NSA chooses blocks per GQA group from the scores of all its query heads; a group split
        // over ranks would choose per head instead, a different model.
        return Err(Error::Config(format!(
            "tp: NSA needs each GQA group on one rank, so n_kv_heads {} must be at least the {world} ranks",
            config.n_kv_heads
        )));
    }
    if config.mlp_hidden % world != 0 {
        return Err(Error::Config(format!("tp: mlp_hidden {} is not divisible by {world} ranks", config.mlp_hidden)));
    }
    let full = Dims::full(config);
    let hd = config.head_dim;
    let dims = Dims { hq: heads.local_q_heads(), hkv: heads.local_kv_heads(), f: config.mlp_hidden / world, ..full };
    let d = config.d_model;
    let (qs, ql) = (heads.q_head_start(), heads.local_q_heads());
    let (ks, kl) = (heads.kv_head_start(), heads.local_kv_heads());
    let f_l = dims.f;
    let mut splits = vec![Split::Replicated; full.num_tensors()];
    let mut counts_in_norm = vec![rank == 0; full.num_tensors()];
    let first_kv_replica = rank % heads.kv_replicas() == 0;
    let mut kv_tensors = Vec::new();
    for l in 0..full.layers {
        let ix = full.layer(l);
        splits[ix.wq] = Split::Rows { start: qs * hd, len: ql * hd, cols: d };
        splits[ix.wk] = Split::Rows { start: ks * hd, len: kl * hd, cols: d };
        splits[ix.wv] = Split::Rows { start: ks * hd, len: kl * hd, cols: d };
        splits[ix.wo] = Split::Cols { start: qs * hd, len: ql * hd, cols: config.n_heads * hd };
        if let Some(g) = ix.wg {
            splits[g] = Split::Rows { start: qs * 3, len: ql * 3, cols: d };
            counts_in_norm[g] = true;
        }
        splits[ix.w_gate] = Split::Rows { start: rank * f_l, len: f_l, cols: d };
        splits[ix.w_up] = Split::Rows { start: rank * f_l, len: f_l, cols: d };
        splits[ix.w_down] = Split::Cols { start: rank * f_l, len: f_l, cols: config.mlp_hidden };
        for i in [ix.wq, ix.wo, ix.w_gate, ix.w_up, ix.w_down] {
            counts_in_norm[i] = true;
        }
        for i in [ix.wk, ix.wv] {
            counts_in_norm[i] = first_kv_replica;
            kv_tensors.push(i);
        }
    }
    let kv_replicated = (heads.kv_replicas() > 1).then_some((kv_tensors, ks));
    Ok(Shard { dims, splits, counts_in_norm, kv_replicated })
}

/// Sums over the ranks of the group (Megatron's `g` forward, `f` backward).
struct CommReduce<'a>(&'a LocalComm);

impl Reducer for CommReduce<'_> {
    fn sum(&self, buf: &mut [f32]) -> Result<(), Error> {
        if self.0.world_size() > 1 {
            self.0.all_reduce_in_place(buf, ReduceOp::Sum)?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct RankState {
    weights: Vec<Vec<f32>>,
    opt: AdamW,
}

/// What one tensor-parallel step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TpStepReport {
    /// The loss `loss_fn` returned.
    pub loss: f32,
    /// Global L2 norm of the gradients before clipping (all shards, replicas counted once).
    pub grad_norm: f32,
    /// The factor the gradients were multiplied by (1 when not clipped).
    pub clip_scale: f32,
}

/// Training with the model split over `world` local ranks (see the module docs).
#[derive(Debug)]
pub struct TpTrainer {
    config: ModelConfig,
    world: usize,
    shards: Vec<Shard>,
    ranks: Vec<Mutex<RankState>>,
    max_grad_norm: Option<f32>,
    rope: squid_kvcache::Rope,
}

/// How long a rank waits for its peers before the step fails (instead of hanging).
const RANK_TIMEOUT: Duration = Duration::from_secs(120);

impl TpTrainer {
    /// Splits `model` over `world` ranks, each with its own AdamW over its shard.
    /// `adamw.max_grad_norm` clips by the global norm over all shards.
    pub fn new(model: &Model, world: usize, adamw: AdamWConfig) -> Result<Self, Error> {
        if world == 0 {
            return Err(Error::Config("tp: world size must be at least 1".into()));
        }
        let config = *model.config();
        let local_cfg = AdamWConfig { max_grad_norm: None, ..adamw };
        let mut shards = Vec::with_capacity(world);
        let mut ranks = Vec::with_capacity(world);
        for r in 0..world {
            let shard = shard_plan(&config, r, world)?;
            let weights: Vec<Vec<f32>> = shard.splits.iter().zip(model.weights()).map(|(s, w)| s.take(w)).collect();
            let params: Vec<&[f32]> = weights.iter().map(|w| w.as_slice()).collect();
            let opt = AdamW::new(local_cfg, &params)?;
            shards.push(shard);
            ranks.push(Mutex::new(RankState { weights, opt }));
        }
        if let Some(m) = adamw.max_grad_norm {
            if !(m.is_finite() && m > 0.0) {
                return Err(Error::Config(format!("tp: max_grad_norm {m} must be finite and positive")));
            }
        }
        Ok(Self { config, world, shards, ranks, max_grad_norm: adamw.max_grad_norm, rope: model.rope().clone() })
    }

    /// Ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// One training step with learning rate `lr`: forward on every rank, `loss_fn(logits
    /// [total, vocab]) -> (loss, dlogits)`, backward, clip by the global norm, AdamW. A
    /// non-finite gradient norm fails the step with no weight changed.
    pub fn step<F>(&mut self, batch: &Batch, lr: f32, loss_fn: F) -> Result<TpStepReport, Error>
    where
        F: Fn(&[f32]) -> Result<(f32, Vec<f32>), Error> + Sync,
    {
        self.step_data_parallel(Some(batch), lr, loss_fn, &SingleProcess)
    }

    /// [`TpTrainer::step`] as one rank of a data-parallel group: this rank's gradients (of its
    /// part of the batch; `None` when it has no sequence in it, so it adds zeros) are summed
    /// over `dp`, and every rank then clips by the same norm and takes the same AdamW step.
    /// `loss_fn` must normalise by the whole group's counts, so the sum is the gradient of the
    /// whole batch's loss. The returned loss is this rank's part of it (sum it over the ranks).
    pub fn step_data_parallel<F>(
        &mut self,
        batch: Option<&Batch>,
        lr: f32,
        loss_fn: F,
        dp: &dyn DataParallel,
    ) -> Result<TpStepReport, Error>
    where
        F: Fn(&[f32]) -> Result<(f32, Vec<f32>), Error> + Sync,
    {
        let (loss, mut grads) = match batch {
            Some(batch) => {
                let prep = Prepared::new(&self.config, batch)?;
                let group = LocalGroup::with_timeout(self.world, RANK_TIMEOUT)?;
                let this = &*self;
                let results = group.run(|comm| this.rank_gradients(&comm, prep.clone(), &loss_fn));
                let mut loss = None;
                let mut grads = Vec::with_capacity(self.world);
                for r in results {
                    let (l, g) = r.map_err(|_| Error::Config("tp: a rank panicked".into()))??;
                    loss.get_or_insert(l);
                    grads.push(g);
                }
                (loss.expect("at least one rank"), grads)
            }
            None => {
                let zeros = self
                    .ranks
                    .iter()
                    .map(|s| {
                        let s = s.lock().unwrap_or_else(|p| p.into_inner());
                        s.weights.iter().map(|w| vec![0f32; w.len()]).collect()
                    })
                    .collect();
                (0.0, zeros)
            }
        };
        if dp.world() > 1 {
            // One all-reduce of every shard's gradients, concatenated.
            let total: usize = grads.iter().flat_map(|g| g.iter().map(Vec::len)).sum();
            let mut flat = Vec::with_capacity(total);
            grads.iter().flat_map(|g| g.iter()).for_each(|t| flat.extend_from_slice(t));
            dp.sum_f32(&mut flat)?;
            let mut at = 0;
            for t in grads.iter_mut().flat_map(|g| g.iter_mut()) {
                let len = t.len();
                t.copy_from_slice(&flat[at..at + len]);
                at += len;
            }
        }
        // Global norm: each shard's sum of squares (replicas counted once) in f64, rounded to
        // f32 and summed in rank order (what an all-reduce over the tp ranks gives).
        let mut sumsq: Option<f32> = None;
        for (g, shard) in grads.iter().zip(&self.shards) {
            let local: f64 = g
                .iter()
                .zip(&shard.counts_in_norm)
                .filter(|(_, &c)| c)
                .flat_map(|(g, _)| g.iter())
                .map(|&x| f64::from(x) * f64::from(x))
                .sum();
            sumsq = Some(sumsq.map_or(local as f32, |s| s + local as f32));
        }
        let grad_norm = sumsq.unwrap_or(0.0).sqrt();
        if !grad_norm.is_finite() {
            return Err(Error::Shape(format!("tp: the gradient norm is {grad_norm}; the step was refused")));
        }
        let clip_scale = self.max_grad_norm.map_or(1.0, |m| squid_optim::clip::clip_scale(grad_norm, m));
        for (g, state) in grads.iter_mut().zip(&self.ranks) {
            if clip_scale < 1.0 {
                g.iter_mut().flat_map(|g| g.iter_mut()).for_each(|x| *x *= clip_scale);
            }
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            let st = &mut *state;
            let mut params: Vec<&mut [f32]> = st.weights.iter_mut().map(|w| w.as_mut_slice()).collect();
            let gs: Vec<&[f32]> = g.iter().map(|g| g.as_slice()).collect();
            st.opt.step(&mut params, &gs, lr)?;
        }
        Ok(TpStepReport { loss, grad_norm, clip_scale })
    }

    /// One tp rank's forward, loss and backward: its loss and its shard's gradients (replicated
    /// kv heads summed over their replicas).
    fn rank_gradients<F>(&self, comm: &LocalComm, prep: Prepared, loss_fn: &F) -> Result<(f32, Vec<Vec<f32>>), Error>
    where
        F: Fn(&[f32]) -> Result<(f32, Vec<f32>), Error> + Sync,
    {
        let rank = comm.rank();
        let shard = &self.shards[rank];
        let state = self.ranks[rank].lock().unwrap_or_else(|p| p.into_inner());
        let reduce = CommReduce(comm);
        let fwd = forward_core(&self.config, &shard.dims, &state.weights, &self.rope, prep, &reduce)?;
        let (loss, dlogits) = loss_fn(fwd.logits())?;
        let mut grads = backward_core(&self.config, &shard.dims, &state.weights, &self.rope, &fwd, &dlogits, &reduce)?;
        drop(fwd);
        // Replicated kv heads: sum each head's partial gradients over its replicas.
        if let Some((tensors, slot)) = &shard.kv_replicated {
            let row = self.config.head_dim * self.config.d_model;
            let mut full = vec![0f32; self.config.n_kv_heads * row];
            for &i in tensors {
                full.fill(0.0);
                full[slot * row..(slot + 1) * row].copy_from_slice(&grads[i]);
                comm.all_reduce_in_place(&mut full, ReduceOp::Sum)?;
                grads[i].copy_from_slice(&full[slot * row..(slot + 1) * row]);
            }
        }
        Ok((loss, grads))
    }

    /// The file of rank `rank`'s optimizer state in `dir`.
    pub fn optimizer_file(dir: &std::path::Path, rank: usize, world: usize) -> std::path::PathBuf {
        dir.join(format!("adamw.tp{world}.rank{rank}.safetensors"))
    }

    /// Writes every rank's AdamW state (its shard's weights, moments and step count) to
    /// `dir/adamw.tp{N}.rank{r}.safetensors`, each file atomically (squid-optim's format). A
    /// checkpoint is a set of files: write it into a fresh directory and rename that, so a kill
    /// never leaves a mixed set.
    pub fn save_optimizer(&self, dir: impl AsRef<std::path::Path>) -> Result<(), Error> {
        for (r, state) in self.ranks.iter().enumerate() {
            let state = state.lock().unwrap_or_else(|p| p.into_inner());
            let params: Vec<&[f32]> = state.weights.iter().map(|w| w.as_slice()).collect();
            state.opt.save(&Self::optimizer_file(dir.as_ref(), r, self.world), &params)?;
        }
        Ok(())
    }

    /// Restores what [`TpTrainer::save_optimizer`] wrote (same world size, shapes and AdamW
    /// settings), weights included; every file is verified by squid-optim.
    pub fn load_optimizer(&mut self, dir: impl AsRef<std::path::Path>) -> Result<(), Error> {
        for (r, state) in self.ranks.iter().enumerate() {
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            let st = &mut *state;
            let mut params: Vec<&mut [f32]> = st.weights.iter_mut().map(|w| w.as_mut_slice()).collect();
            st.opt.load(&Self::optimizer_file(dir.as_ref(), r, self.world), &mut params)?;
        }
        Ok(())
    }

    /// AdamW steps taken.
    pub fn steps(&self) -> u64 {
        self.ranks[0].lock().unwrap_or_else(|p| p.into_inner()).opt.steps()
    }

    /// The full model from the shards (for rollouts and checkpoints). Replicated tensors come
    /// from rank 0, a replicated kv head from its first replica.
    pub fn gather(&self) -> Result<Model, Error> {
        let mut full = Dims::full(&self.config).zeros();
        for (r, (shard, state)) in self.shards.iter().zip(&self.ranks).enumerate().rev() {
            let state = state.lock().unwrap_or_else(|p| p.into_inner());
            for ((split, part), out) in shard.splits.iter().zip(&state.weights).zip(full.iter_mut()) {
                // Walking ranks downwards, the lowest rank holding a piece writes it last.
                if *split != Split::Replicated || r == 0 {
                    split.put(out, part);
                }
            }
        }
        Model::from_weights(self.config, full)
    }
}
