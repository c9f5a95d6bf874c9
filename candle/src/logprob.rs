//! Fused log-softmax + gather + entropy as a candle op (squid-optim's `logprob`): one pass over
//! the logits forward, one backward, and the `[tokens, vocab]` probabilities never stored.

use std::sync::Mutex;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use squid_optim::logprob::{self, LogprobOutput};

use crate::host::{self, err, with_float};

struct LogProbEntropy {
    targets: Vec<u32>,
    saved: Mutex<Option<LogprobOutput>>,
}

impl LogProbEntropy {
    const NAME: &'static str = "log-prob-entropy";

    fn forward<T: squid_cuda::Element>(&self, logits: &[T], vocab: usize) -> Result<LogprobOutput> {
        logprob::logprobs(logits, vocab, &self.targets).map_err(|e| err(Self::NAME, e))
    }
}

impl CustomOp1 for LogProbEntropy {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let [tokens, vocab] = host::dims::<2>(Self::NAME, "logits", l, "[tokens, vocab]")?;
        if tokens != self.targets.len() {
            return Err(err(Self::NAME, format!("{tokens} rows of logits for {} targets", self.targets.len())));
        }
        let dtype = host::float_dtype(Self::NAME, &[("logits", s.dtype())])?;
        let out = with_float!(dtype, T => self.forward(host::contiguous::<T>(Self::NAME, "logits", s, l)?, vocab))?;
        let packed: Vec<f32> = out.logp.iter().zip(&out.entropy).flat_map(|(&lp, &h)| [lp, h]).collect();
        *self.saved.lock().expect("saved lock") = Some(out);
        Ok((CpuStorage::F32(packed), Shape::from((tokens, 2))))
    }

    #[cfg(feature = "candle-cuda")]
    fn cuda_fwd(&self, _: &candle_core::CudaStorage, _: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        Err(crate::cuda::not_on_cuda(Self::NAME))
    }

    fn bwd(&self, logits: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (_, vocab) = logits.dims2()?;
        let grad = grad.to_dtype(DType::F32)?;
        let g = host::host_vec::<f32>(&grad.narrow(1, 0, 1)?)?;
        let h = host::host_vec::<f32>(&grad.narrow(1, 1, 1)?)?;
        let saved = self.saved.lock().expect("saved lock").take();
        with_float!(logits.dtype(), T => {
            let x = host::host_vec::<T>(logits)?;
            let fwd = match saved {
                Some(f) => f,
                None => self.forward(&x, vocab)?,
            };
            let mut dx = vec![<T as squid_cuda::Element>::from_f32(0.0); x.len()];
            logprob::logprobs_backward(&x, vocab, &self.targets, &fwd, &g, Some(&h), &mut dx)
                .map_err(|e| err(Self::NAME, e))?;
            *self.saved.lock().expect("saved lock") = Some(fwd);
            Ok(Some(host::to_tensor(dx, logits.shape(), logits.device())?))
        })
    }
}

/// `log softmax(logits)[target]` and the entropy of `softmax(logits)` per token, in f32:
/// `logits [tokens, vocab]` (f32, bf16 or f16), `targets` `tokens` ids (u32, i64 or i32).
/// Returns `(logp [tokens], entropy [tokens])`, both differentiable in the logits.
pub fn log_prob_entropy(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    let both = log_prob_entropy_packed(logits, targets)?;
    Ok((both.narrow(1, 0, 1)?.squeeze(1)?, both.narrow(1, 1, 1)?.squeeze(1)?))
}

/// [`log_prob_entropy`] as one `[tokens, 2]` tensor (column 0 the log-prob, 1 the entropy).
pub fn log_prob_entropy_packed(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let targets = host::offsets(LogProbEntropy::NAME, "targets", &targets.flatten_all()?)?;
    let op = LogProbEntropy { targets, saved: Mutex::new(None) };
    logits.contiguous()?.apply_op1(op)
}
