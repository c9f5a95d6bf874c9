//! Every CUDA kernel of the workspace, gathered from the crates that own them.

use squid_cuda::check::{check_kernel, EntryReport};
use squid_cuda::{Arch, KernelRegistry};

use crate::Error;

/// The registry of every `.cu` source in the workspace. A crate that adds kernels adds its
/// `KERNELS` list here; a workspace test fails if a `.cu` file is missing from it.
pub fn workspace_registry() -> Result<KernelRegistry, Error> {
    let mut registry = KernelRegistry::new();
    registry.register_all(squid_cuda::KERNELS)?;
    registry.register_all(squid_attention::KERNELS)?;
    registry.register_all(squid_kvcache::KERNELS)?;
    registry.register_all(squid_optim::KERNELS)?;
    Ok(registry)
}

/// The outcome of checking every kernel at every architecture.
#[derive(Debug, Default)]
pub struct CheckOutcome {
    /// One row per entry point and architecture that compiled.
    pub rows: Vec<EntryReport>,
    /// `(kernel, arch, error)` for every source that failed to compile or assemble.
    pub failures: Vec<(String, Arch, squid_cuda::Error)>,
}

impl CheckOutcome {
    /// Rows whose entry spilled registers.
    pub fn spilled(&self) -> impl Iterator<Item = &EntryReport> {
        self.rows.iter().filter(|r| r.usage.as_ref().is_some_and(|u| u.spills()))
    }

    /// Failures plus spilling entries: what makes the check exit non-zero.
    pub fn problems(&self) -> usize {
        self.failures.len() + self.spilled().count()
    }
}

/// Compiles and (with `ptxas`) assembles every kernel of `registry` for every arch, calling
/// `progress` after each (kernel, arch) pair.
pub fn check_all(
    registry: &KernelRegistry,
    archs: &[Arch],
    ptxas: Option<&std::path::Path>,
    mut progress: impl FnMut(&str, Arch),
) -> CheckOutcome {
    let mut outcome = CheckOutcome::default();
    for kernel in registry.iter() {
        for &arch in archs {
            match check_kernel(kernel, arch, ptxas) {
                Ok(rows) => outcome.rows.extend(rows),
                Err(e) => outcome.failures.push((kernel.name.to_string(), arch, e)),
            }
            progress(kernel.name, arch);
        }
    }
    outcome
}

/// What `squid kernels profile` measures: the simulator's [`Profile`] of one launch, and per
/// GPU model the registers ptxas gives the entry, the occupancy and the roofline **model**.
///
/// [`Profile`]: squid_cuda::ptxsim::Profile
#[cfg(feature = "cuda")]
#[derive(Debug, Clone)]
pub struct KernelProfile {
    /// The counts of the simulated launch.
    pub profile: squid_cuda::ptxsim::Profile,
    /// One per GPU model (A100, H100 SXM).
    pub targets: Vec<TargetModel>,
}

/// The model of one launch on one GPU.
#[cfg(feature = "cuda")]
#[derive(Debug, Clone)]
pub struct TargetModel {
    /// The GPU.
    pub gpu: squid_cuda::ptxsim::GpuModel,
    /// Registers per thread from `ptxas -v` at the GPU's arch (None without ptxas: the
    /// occupancy then ignores registers).
    pub registers: Option<u32>,
    /// Resident blocks and warps per SM.
    pub occupancy: squid_cuda::ptxsim::Occupancy,
    /// Time lower bounds by resource; the largest is the estimate.
    pub roofline: squid_cuda::ptxsim::Roofline,
}

/// The kernels `profile_kernel` knows how to launch, with what their `--shape` means and its
/// default.
pub const PROFILED_KERNELS: &[(&str, &str, &[usize])] = &[
    ("gemm", "M,N,K (bf16 in, f32 out)", &[512, 512, 512]),
    ("softmax", "ROWS,COLS (f32)", &[512, 4096]),
    ("logsumexp", "ROWS,COLS (bf16)", &[512, 4096]),
    ("axpy", "N (f32)", &[1 << 20]),
    ("optim_advantage", "GROUPS,SIZE (GRPO group std)", &[1024, 8]),
    ("optim_logprob", "TOKENS,VOCAB (bf16 logits, forward)", &[16, 32768]),
    ("optim_logprob_bwd", "TOKENS,VOCAB (bf16 logits and gradients)", &[16, 32768]),
    ("optim_policy_loss", "SEQS,LEN (f32, verl config with k3 KL)", &[64, 256]),
    ("optim_adamw", "N (bf16 parameters, f32 gradients, the update)", &[1 << 18]),
    ("flash_fwd", "T,HEADS,D (one causal sequence of T tokens, bf16, Dk = Dv = D)", &[128, 1, 128]),
    ("flash_bwd_dq", "T,HEADS,D (deterministic dQ of a causal sequence, bf16)", &[128, 1, 128]),
    ("flash_bwd_dkdv", "T,HEADS,D (dK/dV of a causal sequence, atomic dQ, bf16)", &[128, 1, 128]),
    ("segments_fwd", "DOCS,DOC_LEN,TAIL,D (DOCS documents then a global tail, prefill, bf16)", &[2, 64, 32, 128]),
    ("decode_split", "BATCH,KEYS,GROUP,D (one new token a sequence, one kv head, 4 splits, bf16)", &[2, 512, 4, 128]),
    ("decode_combine", "BATCH,KEYS,GROUP,D (the combine of decode_split's 4 splits)", &[2, 512, 4, 128]),
    ("decode_paged", "BATCH,KEYS,GROUP,D (decode_split over 16-token pages)", &[2, 512, 4, 128]),
    ("rope_fwd", "TOKENS,HEADS,D (rotate-half, bf16)", &[1024, 8, 128]),
    ("rope_bwd", "TOKENS,HEADS,D (rotate-half, bf16)", &[1024, 8, 128]),
    ("rope_reposition", "TOKENS,HEADS,D (rotate-half, bf16)", &[1024, 8, 128]),
];

/// Inputs in [-1, 1) from a fixed xorshift stream (profiles do not depend on the values, but
/// typical values keep every branch typical).
#[cfg(feature = "cuda")]
fn profile_values(n: usize, seed: u64) -> Vec<half::bf16> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            half::bf16::from_f32((x >> 40) as f32 / (1u64 << 23) as f32 - 1.0)
        })
        .collect()
}

/// Launches the attention or RoPE op `name` on `gpu` at `shape` and says which kernel entry
/// to profile. `None` for a name it does not know.
#[cfg(feature = "cuda")]
fn launch_attention_case(
    gpu: &squid_cuda::launch::Gpu,
    name: &str,
    shape: &[usize],
) -> Result<Option<(&'static squid_cuda::KernelSource, String)>, Error> {
    use squid_attention::dense::cuda_decode::{self, DecodeOptions, DevicePagedKv, PagedSeq};
    use squid_attention::dense::{cuda as dense_cuda, flash, DenseConfig, DECODE_KERNEL};
    use squid_attention::segments::{self, Segment, SegmentConfig, SegmentLayout};
    use squid_attention::Heads;
    use squid_kvcache::rope::{self, Rope, RopeConfig};

    let attn = |e: squid_attention::Error| Error::Config(format!("{name}: {e}"));
    let up = |n: usize, seed: u64| gpu.upload(&profile_values(n, seed));
    Ok(Some(match name {
        "flash_fwd" | "flash_bwd_dq" | "flash_bwd_dkdv" => {
            let (t, heads, d) = (shape[0], shape[1], shape[2]);
            let cfg = DenseConfig::causal(Heads::new(heads, heads, d, d));
            let cu = [0, t as u32];
            let (q, k, v) = (up(t * heads * d, 1)?, up(t * heads * d, 2)?, up(t * heads * d, 3)?);
            let out = dense_cuda::forward(gpu, &cfg, &q, &k, &v, &cu, &cu).map_err(attn)?;
            let entry = match name {
                "flash_fwd" => format!("squid_flash_fwd_dk{d}_dv{d}_bf16"),
                _ => {
                    let d_o = up(t * heads * d, 4)?;
                    let x = dense_cuda::BackwardInputs {
                        q: q.view(),
                        k: k.view(),
                        v: v.view(),
                        o: out.o.view(),
                        lse: out.lse.view(),
                        d_o: d_o.view(),
                    };
                    let (mode, kind) = if name == "flash_bwd_dq" {
                        (dense_cuda::DqMode::Deterministic, "dq")
                    } else {
                        (dense_cuda::DqMode::Atomic, "dkdv")
                    };
                    dense_cuda::backward(gpu, &cfg, x, &cu, &cu, mode).map_err(attn)?;
                    format!("squid_flash_bwd_{kind}_dk{d}_dv{d}_bf16")
                }
            };
            (&flash::KERNEL, entry)
        }
        "segments_fwd" => {
            let (docs, doc_len, tail, d) = (shape[0], shape[1], shape[2], shape[3]);
            let mut context = vec![Segment::document(doc_len); docs];
            context.push(Segment::global(tail));
            let t = docs * doc_len + tail;
            let cu = [0, t as u32];
            let layout = SegmentLayout::new(&[context], &cu).map_err(attn)?;
            let cfg = SegmentConfig::new(Heads::new(1, 1, d, d));
            let (q, k, v) = (up(t * d, 1)?, up(t * d, 2)?, up(t * d, 3)?);
            segments::cuda::forward(gpu, &cfg, &layout, &q, &k, &v, &cu, &cu).map_err(attn)?;
            (&flash::KERNEL, format!("squid_flash_fwd_dk{d}_dv{d}_bf16"))
        }
        "decode_split" | "decode_combine" | "decode_paged" => {
            let (batch, keys, group, d) = (shape[0], shape[1], shape[2], shape[3]);
            let cfg = DenseConfig::causal(Heads::new(group, 1, d, d));
            let opts = DecodeOptions { num_splits: Some(4), batch_invariant: false };
            let cu_q: Vec<u32> = (0..=batch as u32).collect();
            let cu_k: Vec<u32> = (0..=batch).map(|s| (s * keys) as u32).collect();
            let q = up(batch * group * d, 1)?;
            let (k, v) = (up(batch * keys * d, 2)?, up(batch * keys * d, 3)?);
            if name == "decode_paged" {
                let page = 16;
                let pages = keys.div_ceil(page);
                // The pool holds the packed keys page after page; each sequence's pages in reverse.
                let tables: Vec<Vec<u32>> =
                    (0..batch).map(|s| (0..pages).rev().map(|p| (s * pages + p) as u32).collect()).collect();
                let (kp, vp) = (up(batch * pages * page * d, 2)?, up(batch * pages * page * d, 3)?);
                let kv =
                    DevicePagedKv { page_size: page, kv_heads: 1, head_dim: d, k_pages: kp.view(), v_pages: vp.view() };
                let seqs: Vec<PagedSeq<'_>> = tables.iter().map(|t| PagedSeq { len: keys, page_table: t }).collect();
                cuda_decode::decode_paged(gpu, &cfg, &opts, &q, &kv, &seqs, &cu_q).map_err(attn)?;
                (&DECODE_KERNEL, "squid_decode_paged_bf16".to_string())
            } else {
                cuda_decode::decode(gpu, &cfg, &opts, &q, &k, &v, &cu_q, &cu_k).map_err(attn)?;
                let entry = if name == "decode_split" { "squid_decode_bf16" } else { "squid_decode_combine_bf16" };
                (&DECODE_KERNEL, entry.to_string())
            }
        }
        "rope_fwd" | "rope_bwd" | "rope_reposition" => {
            let (tokens, heads, d) = (shape[0], shape[1], shape[2]);
            let r = Rope::new(RopeConfig::new(d)).map_err(|e| Error::Config(format!("{name}: {e}")))?;
            let kv = |e: squid_kvcache::Error| Error::Config(format!("{name}: {e}"));
            let mut x = up(tokens * heads * d, 5)?;
            let positions: Vec<u64> = (0..tokens as u64).collect();
            match name {
                "rope_reposition" => {
                    rope::cuda::reposition(gpu, &r, &mut x, heads, 0, 4096).map_err(kv)?;
                    (&rope::KERNEL, "squid_rope_shift_bf16".to_string())
                }
                _ => {
                    let table = rope::cuda::DeviceRope::new(gpu, &r, tokens).map_err(kv)?;
                    if name == "rope_fwd" {
                        table.forward(gpu, &mut x, heads, &positions).map_err(kv)?;
                    } else {
                        table.backward(gpu, &mut x, heads, &positions).map_err(kv)?;
                    }
                    (&rope::KERNEL, "squid_rope_bf16".to_string())
                }
            }
        }
        _ => return Ok(None),
    }))
}

/// Runs kernel `name` once on the profiling simulator with inputs of `shape` (empty: the
/// default) and models it on A100 and H100 SXM with ptxas's registers (when `ptxas` is given).
#[cfg(feature = "cuda")]
pub fn profile_kernel(name: &str, shape: &[usize], ptxas: Option<&std::path::Path>) -> Result<KernelProfile, Error> {
    use half::bf16;
    use squid_cuda::launch::Gpu;
    use squid_cuda::ops::{axpy, gemm, logsumexp, softmax};
    use squid_cuda::ptxsim::Options;

    let (_, meaning, default) = PROFILED_KERNELS.iter().find(|k| k.0 == name).ok_or_else(|| {
        let known: Vec<&str> = PROFILED_KERNELS.iter().map(|k| k.0).collect();
        Error::Config(format!("no profile setup for kernel `{name}` (known: {})", known.join(", ")))
    })?;
    let shape = if shape.is_empty() { default } else { shape };
    if shape.len() != default.len() || shape.contains(&0) {
        return Err(Error::Config(format!("--shape for {name} is {meaning}, positive, got {shape:?}")));
    }
    let gpu = Gpu::simulator_with(Options { profile: true, ..Options::default() })?;
    if let Some((source, entry)) = launch_attention_case(&gpu, name, shape)? {
        // The op may run several kernels (fills, preprocessing, a combine): the profile is the
        // last launch of the entry asked for.
        let profile = gpu
            .take_profiles()
            .into_iter()
            .rev()
            .find(|(e, _)| *e == entry)
            .map(|(_, p)| p)
            .ok_or_else(|| Error::Config(format!("{name}: no launch of {entry} was profiled")))?;
        return model_profile(profile, source, &entry, ptxas);
    }
    let (source, entry) = match name {
        "gemm" => {
            let (m, n, k) = (shape[0], shape[1], shape[2]);
            let a = gpu.upload(&vec![bf16::from_f32(0.5); m * k])?;
            let b = gpu.upload(&vec![bf16::from_f32(0.25); k * n])?;
            let mut c = gpu.zeros::<f32>(m * n)?;
            gemm::cuda::gemm_bf16(&gpu, gemm::GemmShape { m, n, k }, &a, &b, &mut c)?;
            (&gemm::KERNEL, "squid_gemm_bf16_f32")
        }
        "softmax" => {
            let (rows, cols) = (shape[0], shape[1]);
            let x = gpu.upload(&vec![0.25f32; rows * cols])?;
            let mut y = gpu.zeros::<f32>(rows * cols)?;
            softmax::cuda::softmax_f32(&gpu, &x, &mut y, cols)?;
            (&softmax::KERNEL, "squid_softmax_f32")
        }
        "logsumexp" => {
            let (rows, cols) = (shape[0], shape[1]);
            let x = gpu.upload(&vec![bf16::from_f32(0.5); rows * cols])?;
            let mut out = gpu.zeros::<f32>(rows)?;
            logsumexp::cuda::logsumexp_bf16(&gpu, &x, &mut out, cols, 1.0)?;
            (&logsumexp::KERNEL, "squid_logsumexp_bf16")
        }
        name if name.starts_with("optim_") => profile_optim(&gpu, name, shape)?,
        _ => {
            let x = gpu.upload(&vec![1.0f32; shape[0]])?;
            let mut y = gpu.zeros::<f32>(shape[0])?;
            axpy::cuda::axpy_f32(&gpu, 0.5, &x, &mut y)?;
            (&axpy::KERNEL, "squid_axpy_f32")
        }
    };
    let profile = gpu.last_profile().ok_or_else(|| Error::Config("the simulator returned no profile".into()))?;
    model_profile(profile, source, entry, ptxas)
}

/// The occupancy and roofline model of a profiled launch of `entry` on A100 and H100 SXM.
#[cfg(feature = "cuda")]
fn model_profile(
    profile: squid_cuda::ptxsim::Profile,
    source: &'static squid_cuda::KernelSource,
    entry: &str,
    ptxas: Option<&std::path::Path>,
) -> Result<KernelProfile, Error> {
    use squid_cuda::ptxsim::{occupancy, A100, H100_SXM};
    let mut targets = Vec::new();
    for (model, arch) in [(A100, Arch::SM80), (H100_SXM, Arch::SM90)] {
        let registers = match ptxas {
            Some(_) => check_kernel(source, arch, ptxas)?
                .into_iter()
                .find(|r| r.entry == entry)
                .and_then(|r| r.usage.map(|u| u.registers)),
            None => None,
        };
        let occ =
            occupancy(&model, profile.threads_per_block(), registers.unwrap_or(1), profile.shared_bytes_per_block);
        let roofline = profile.roofline(&model);
        targets.push(TargetModel { gpu: model, registers, occupancy: occ, roofline });
    }
    Ok(KernelProfile { profile, targets })
}

/// Launches one of squid-optim's device paths for [`profile_kernel`]; returns the source and the
/// entry of its last launch (the one the profile describes).
#[cfg(feature = "cuda")]
fn profile_optim(
    gpu: &squid_cuda::launch::Gpu,
    name: &str,
    shape: &[usize],
) -> Result<(&'static squid_cuda::KernelSource, &'static str), Error> {
    use half::bf16;
    use squid_optim::{adamw, advantage, logprob, policy_loss};
    let optim = |e: squid_optim::Error| Error::Config(format!("{name}: {e}"));
    Ok(match name {
        "optim_advantage" => {
            let n = shape[0] * shape[1];
            let rewards = gpu.upload(&(0..n).map(|i| (i % 3) as f32).collect::<Vec<_>>())?;
            let mut out = gpu.zeros::<f32>(n)?;
            let config = advantage::AdvantageConfig::new(advantage::Estimator::Grpo(advantage::GrpoConfig::verl()));
            advantage::cuda::sample_advantages(gpu, &rewards, advantage::Groups::Size(shape[1]), &config, &mut out)
                .map_err(optim)?;
            (&advantage::KERNEL, "squid_adv_groups")
        }
        "optim_logprob" | "optim_logprob_bwd" => {
            let (t, v) = (shape[0], shape[1]);
            let x = gpu.upload(&(0..t * v).map(|i| bf16::from_f32((i % 17) as f32 * 0.25)).collect::<Vec<_>>())?;
            let y = gpu.upload(&(0..t).map(|i| (i % v) as u32).collect::<Vec<_>>())?;
            let (mut lp, mut en, mut ls) = (gpu.zeros::<f32>(t)?, gpu.zeros::<f32>(t)?, gpu.zeros::<f32>(t)?);
            let out = logprob::cuda::LogprobViews {
                logp: (&mut lp).into(),
                entropy: (&mut en).into(),
                lse: (&mut ls).into(),
            };
            logprob::cuda::logprobs(gpu, &x, v, &y, out).map_err(optim)?;
            if name == "optim_logprob" {
                (&logprob::KERNEL, "squid_logprob_fwd_bf16")
            } else {
                let g = gpu.upload(&vec![1.0f32; t])?;
                let mut dx = gpu.zeros::<bf16>(t * v)?;
                let fwd = logprob::cuda::ForwardViews { lse: (&ls).into(), entropy: (&en).into() };
                logprob::cuda::logprobs_backward(gpu, &x, v, &y, fwd, &g, None, &mut dx).map_err(optim)?;
                (&logprob::KERNEL, "squid_logprob_bwd_bf16_bf16")
            }
        }
        "optim_policy_loss" => {
            let (seqs, len) = (shape[0], shape[1]);
            let n = seqs * len;
            let cu: Vec<u32> = (0..=seqs).map(|s| (s * len) as u32).collect();
            let new = gpu.upload(&(0..n).map(|i| -((i % 7) as f32) * 0.3).collect::<Vec<_>>())?;
            let old = gpu.upload(&(0..n).map(|i| -((i % 5) as f32) * 0.3).collect::<Vec<_>>())?;
            let adv = gpu.upload(&(0..n).map(|i| (i % 3) as f32 - 1.0).collect::<Vec<_>>())?;
            let mask = gpu.upload(&(0..n).map(|i| u8::from(i % len > 8)).collect::<Vec<_>>())?;
            let (mut grad, mut tl) = (gpu.zeros::<f32>(n)?, gpu.zeros::<f32>(n)?);
            let inputs = policy_loss::cuda::DevicePolicyLossInputs {
                new_logp: (&new).into(),
                old_logp: (&old).into(),
                ref_logp: Some((&old).into()),
                advantages: (&adv).into(),
                loss_mask: (&mask).into(),
                cu_seqlens: &cu,
                entropy: None,
            };
            let config = policy_loss::PolicyLossConfig {
                kl: Some(policy_loss::KlPenalty::verl(1e-3)),
                ..policy_loss::PolicyLossConfig::verl()
            };
            policy_loss::cuda::policy_loss(gpu, inputs, &config, &mut grad, &mut tl).map_err(optim)?;
            (&policy_loss::KERNEL, "squid_pl_loss")
        }
        _ => {
            let n = shape[0];
            let mut p = gpu.upload(&vec![bf16::from_f32(0.5); n])?;
            let g = gpu.upload(&vec![0.01f32; n])?;
            let config = adamw::AdamWConfig { max_grad_norm: Some(1.0), ..adamw::AdamWConfig::default() };
            let mut opt = adamw::cuda::DeviceAdamW::new(gpu, config, &[p.view()]).map_err(optim)?;
            opt.step(gpu, &mut [p.view_mut()], &[g.view()], 1e-3).map_err(optim)?;
            (&adamw::KERNEL, "squid_adamw_bf16_f32")
        }
    })
}

#[cfg(feature = "cuda")]
impl KernelProfile {
    /// The profile and the model as a table.
    pub fn table(&self) -> String {
        let mut s = format!("simulated launch (exact counts of the simulated run):\n{}", self.profile.table());
        s.push_str("\nMODEL (not a measurement): occupancy and roofline lower bounds per GPU\n");
        s.push_str(&format!(
            "  {:<16} {:>5} {:>24} {:>7} {:>11} {:>11} {:>11} {:>11} {:>11}  {}\n",
            "gpu",
            "regs",
            "blocks/SM (limited by)",
            "occup.",
            "tensor us",
            "dram us",
            "shared us",
            "issue us",
            "estimate",
            "bound"
        ));
        for t in &self.targets {
            let r = &t.roofline;
            s.push_str(&format!(
                "  {:<16} {:>5} {:>24} {:>6.1}% {:>11.2} {:>11.2} {:>11.2} {:>11.2} {:>11.2}  {} (model)\n",
                t.gpu.name,
                t.registers.map_or("?".to_string(), |r| r.to_string()),
                format!("{} ({})", t.occupancy.blocks_per_sm, t.occupancy.limiter),
                100.0 * t.occupancy.fraction,
                r.tensor_s * 1e6,
                r.dram_s * 1e6,
                r.shared_s * 1e6,
                r.issue_s * 1e6,
                r.estimate_s * 1e6,
                r.bound
            ));
        }
        s
    }

    /// The profile and the model as JSON.
    pub fn json(&self) -> String {
        let targets: Vec<serde_json::Value> = self
            .targets
            .iter()
            .map(|t| {
                let r = &t.roofline;
                serde_json::json!({
                    "gpu": t.gpu.name,
                    "arch": t.gpu.arch,
                    "registers": t.registers,
                    "blocks_per_sm": t.occupancy.blocks_per_sm,
                    "warps_per_sm": t.occupancy.warps_per_sm,
                    "occupancy": t.occupancy.fraction,
                    "occupancy_limiter": t.occupancy.limiter,
                    "model_tensor_s": r.tensor_s,
                    "model_dram_s": r.dram_s,
                    "model_shared_s": r.shared_s,
                    "model_issue_s": r.issue_s,
                    "model_estimate_s": r.estimate_s,
                    "model_bound": r.bound,
                    "sms_used": r.sms_used,
                })
            })
            .collect();
        let profile: serde_json::Value = serde_json::from_str(&self.profile.json())
            .unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }));
        serde_json::json!({ "profile": profile, "model": targets, "note": "model figures are a roofline model, not measurements" })
            .to_string()
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;

    #[test]
    fn profile_runs_a_kernel_and_models_it() {
        if !squid_cuda::testing::nvrtc_available() {
            return;
        }
        let kp = profile_kernel("gemm", &[64, 64, 64], None).unwrap();
        assert_eq!(kp.profile.warp_instructions_of(squid_cuda::ptxsim::InstClass::Mma), 128);
        assert_eq!(kp.targets.len(), 2);
        assert!(kp.targets.iter().all(|t| t.registers.is_none() && t.roofline.estimate_s > 0.0));
        let table = kp.table();
        assert!(table.contains("MODEL (not a measurement)") && table.contains("H100 SXM5"), "{table}");
        let json: serde_json::Value = serde_json::from_str(&kp.json()).unwrap();
        assert_eq!(json["profile"]["warp_instructions_by_class"]["mma"], 128);
        assert_eq!(json["model"][0]["arch"], "sm_80");
        // Unknown kernels and wrong shapes are typed errors.
        assert!(matches!(profile_kernel("nope", &[], None), Err(Error::Config(_))));
        assert!(matches!(profile_kernel("gemm", &[64, 64], None), Err(Error::Config(_))));
        assert!(matches!(profile_kernel("axpy", &[0], None), Err(Error::Config(_))));
    }

    /// The attention and RoPE cases profile the entry they name (not a fill or a combine that
    /// ran after it), at tiny shapes.
    #[test]
    fn attention_and_rope_profiles_pick_their_entry() {
        if !squid_cuda::testing::nvrtc_available() {
            return;
        }
        use squid_cuda::ptxsim::InstClass;
        let fwd = profile_kernel("flash_fwd", &[16, 1, 64], None).unwrap();
        // One 64-row query tile, one 64-key tile: Q K^T and P V are 4 x 8 x 4 m16n8k16 each.
        assert_eq!(fwd.profile.warp_instructions_of(InstClass::Mma), 2 * 4 * 8 * 4);
        let split = profile_kernel("decode_split", &[1, 64, 2, 64], None).unwrap();
        let combine = profile_kernel("decode_combine", &[1, 64, 2, 64], None).unwrap();
        assert_eq!(split.profile.warp_instructions_of(InstClass::Mma), 0);
        // Two splits (64 keys are two tiles) of one item, then one combine CTA.
        assert_eq!((split.profile.grid[0], combine.profile.grid[0]), (2, 1));
        let rope = profile_kernel("rope_reposition", &[4, 1, 8], None).unwrap();
        assert!(rope.profile.warp_instructions.iter().sum::<u64>() > 0);
        assert!(matches!(profile_kernel("decode_paged", &[1, 64, 2], None), Err(Error::Config(_))));
    }
}
