//! The PPO/GRPO policy loss (squid-optim's `policy_loss`) as a candle op: a scalar loss of the
//! new log-probs whose gradient comes from squid's fused pass.

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use squid_optim::policy_loss::{self, Metrics, PolicyLossConfig, PolicyLossInputs};

use crate::host::{self, err};

/// The inputs other than the new log-probs (no gradient flows into them), each `[tokens]`.
#[derive(Debug, Clone, Copy)]
pub struct PolicyLossTensors<'a> {
    /// Log-probs under the policy that sampled the tokens.
    pub old_logp: &'a Tensor,
    /// Log-probs under the reference policy (needed with a KL term).
    pub ref_logp: Option<&'a Tensor>,
    /// Per-token advantages.
    pub advantages: &'a Tensor,
    /// Non-zero on the tokens in the loss (any dtype).
    pub loss_mask: &'a Tensor,
    /// Sequence offsets `[num_seqs + 1]` (integer).
    pub cu_seqlens: &'a Tensor,
}

/// The diagnostics of the last forward (clip fractions, KL, ratios), filled when the loss is computed.
#[derive(Debug, Clone, Default)]
pub struct PolicyLossMetrics(Arc<Mutex<Option<Metrics>>>);

impl PolicyLossMetrics {
    /// The metrics of the forward, once it ran.
    pub fn get(&self) -> Option<Metrics> {
        *self.0.lock().expect("metrics lock")
    }
}

struct PolicyLossOp {
    config: PolicyLossConfig,
    old_logp: Vec<f32>,
    ref_logp: Option<Vec<f32>>,
    advantages: Vec<f32>,
    loss_mask: Vec<bool>,
    cu_seqlens: Vec<u32>,
    grad: Mutex<Option<Vec<f32>>>,
    metrics: PolicyLossMetrics,
}

impl PolicyLossOp {
    const NAME: &'static str = "policy-loss";

    fn run(&self, new_logp: &[f32]) -> Result<policy_loss::PolicyLossOutput> {
        let inputs = PolicyLossInputs {
            new_logp,
            old_logp: &self.old_logp,
            ref_logp: self.ref_logp.as_deref(),
            advantages: &self.advantages,
            loss_mask: &self.loss_mask,
            cu_seqlens: &self.cu_seqlens,
            entropy: None,
        };
        policy_loss::policy_loss(&inputs, &self.config).map_err(|e| err(Self::NAME, e))
    }
}

impl CustomOp1 for PolicyLossOp {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        host::dims::<1>(Self::NAME, "new_logp", l, "[tokens]")?;
        if s.dtype() != DType::F32 {
            return Err(err(Self::NAME, format!("new_logp must be f32, got {:?}", s.dtype())));
        }
        let out = self.run(host::contiguous::<f32>(Self::NAME, "new_logp", s, l)?)?;
        *self.grad.lock().expect("grad lock") = Some(out.grad_new_logp);
        *self.metrics.0.lock().expect("metrics lock") = Some(out.metrics);
        Ok((CpuStorage::F32(vec![out.loss]), Shape::from(())))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        Err(crate::cuda::not_on_cuda(Self::NAME))
    }

    fn bwd(&self, new_logp: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let saved = self.grad.lock().expect("grad lock").clone();
        let g = match saved {
            Some(g) => g,
            None => self.run(&host::host_vec::<f32>(new_logp)?)?.grad_new_logp,
        };
        let g = Tensor::from_vec(g, new_logp.shape(), new_logp.device())?;
        Ok(Some(g.broadcast_mul(&grad.to_dtype(DType::F32)?)?))
    }
}

fn f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    host::host_vec::<f32>(&t.to_dtype(DType::F32)?)
}

/// The scalar policy loss of `new_logp [tokens]` (any float dtype; computed in f32) with the
/// clipping, KL and aggregation of `config`; its gradient flows into `new_logp`. `metrics`, if
/// given, receives the forward's diagnostics.
pub fn policy_loss(
    new_logp: &Tensor,
    inputs: &PolicyLossTensors<'_>,
    config: &PolicyLossConfig,
    metrics: Option<&PolicyLossMetrics>,
) -> Result<Tensor> {
    let op = PolicyLossOp {
        config: *config,
        old_logp: f32_vec(inputs.old_logp)?,
        ref_logp: inputs.ref_logp.map(f32_vec).transpose()?,
        advantages: f32_vec(inputs.advantages)?,
        loss_mask: f32_vec(inputs.loss_mask)?.iter().map(|&m| m != 0.0).collect(),
        cu_seqlens: host::offsets(PolicyLossOp::NAME, "cu_seqlens", inputs.cu_seqlens)?,
        grad: Mutex::new(None),
        metrics: metrics.cloned().unwrap_or_default(),
    };
    new_logp.to_dtype(DType::F32)?.flatten_all()?.contiguous()?.apply_op1(op)
}
