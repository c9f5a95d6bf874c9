//! AdamW (Loshchilov & Hutter; torch `AdamW` semantics) over many parameter tensors at once, with
//! f32 master weights behind bf16/f16 parameters, fused global-norm gradient clipping, and state
//! save/load through safetensors.
//!
//! One step, for every element (torch's order of operations):
//! ```text
//! g  = grad * clip            clip = min(1, max_norm / (global_norm + 1e-6)) when max_grad_norm is set
//! p  = p * (1 - lr * weight_decay)                       decoupled weight decay
//! m  = beta1 m + (1 - beta1) g
//! v  = beta2 v + (1 - beta2) g^2
//! v' = max(v'_prev, v) if amsgrad else v
//! p  = p - lr / (1 - beta1^t) * m / (sqrt(v') / sqrt(1 - beta2^t) + eps)
//! ```
//! `p` is the f32 master copy; a bf16/f16 parameter is rewritten from it (round to nearest even)
//! after each step, so rounding never accumulates in the weights. f32 parameters are their own
//! master. If the global gradient norm is not finite the step is refused with a typed error and
//! nothing changes (weights, moments, step count), so one bad batch never corrupts training. The same
//! holds for a step that would make any parameter or state non-finite (`eps = 0` with a zero
//! gradient gives 0 / 0; a huge learning rate overflows; a gradient above ~1.8e19 overflows `v`;
//! an f16 parameter overflows above 65504): every element's update is computed first without
//! writing, and only if all of it is finite is it applied ([`Error::StepRefused`] otherwise). That
//! costs one more read of parameters, gradients and moments per step.

mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(all(test, feature = "cuda"))]
mod cuda_tests;
pub mod naive;
mod state;
#[cfg(test)]
mod tests;

/// The CUDA source of the device path (module `cuda`, `cuda` feature): the gradient's sum of squares,
/// the update (a dry run that finds what would become non-finite, then the write), and the
/// master copy, per storage type.
pub const KERNEL: squid_cuda::KernelSource = squid_cuda::kernel_source!(
    "optim_adamw",
    "src/adamw/adamw.cu",
    [
        "squid_adamw_sumsq_f32",
        "squid_adamw_sumsq_bf16",
        "squid_adamw_sumsq_f16",
        "squid_adamw_f32_f32",
        "squid_adamw_bf16_bf16",
        "squid_adamw_bf16_f32",
        "squid_adamw_f16_f16",
        "squid_adamw_f16_f32",
        "squid_adamw_master_bf16",
        "squid_adamw_master_f16",
    ],
    fast_math = false
);

use squid_cuda::dtype::{DType, Element};

use crate::{check_len, try_filled, Error};

/// AdamW hyper-parameters (torch defaults except weight decay, which is 0.01 as in torch's AdamW).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f32,
    /// Second-moment decay.
    pub beta2: f32,
    /// Added to the denominator.
    pub eps: f32,
    /// Decoupled weight decay (multiplied by the learning rate).
    pub weight_decay: f32,
    /// Use the running maximum of the second moment (AMSGrad).
    pub amsgrad: bool,
    /// Clip gradients to this global L2 norm before the update.
    pub max_grad_norm: Option<f32>,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, amsgrad: false, max_grad_norm: None }
    }
}

impl AdamWConfig {
    /// Checks the hyper-parameters ([`AdamW::new`] does): betas in [0, 1), `eps` and `weight_decay`
    /// finite and >= 0, `max_grad_norm` finite and > 0. NaN fails every check.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |what: &'static str, v: f32| Err(Error::Config { what, why: format!("{v} is out of range") });
        for (what, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(what, b);
            }
        }
        if !(self.eps.is_finite() && self.eps >= 0.0) {
            return bad("eps", self.eps);
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", self.weight_decay);
        }
        if let Some(m) = self.max_grad_norm {
            if !(m.is_finite() && m > 0.0) {
                return bad("max_grad_norm", m);
            }
        }
        Ok(())
    }
}

/// Optimizer state of one parameter tensor.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TensorState {
    /// f32 master weights, when the parameters are stored in bf16/f16.
    pub master: Option<Vec<f32>>,
    /// First moment.
    pub m: Vec<f32>,
    /// Second moment.
    pub v: Vec<f32>,
    /// Running max of the second moment (amsgrad).
    pub v_max: Option<Vec<f32>>,
}

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Global L2 norm of the gradients before clipping, in f64 (finite f32 gradients can have a norm
    /// above `f32::MAX`).
    pub grad_norm: f64,
    /// The factor the gradients were multiplied by (1 when not clipped).
    pub clip_scale: f32,
    /// The learning rate used.
    pub lr: f32,
    /// Steps taken so far, this one included.
    pub step: u64,
}

/// AdamW over a fixed list of parameter tensors.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    config: AdamWConfig,
    dtype: DType,
    step: u64,
    tensors: Vec<TensorState>,
}

impl AdamW {
    /// An optimizer for `params` (their current values become the master weights when they are
    /// bf16/f16). Moments start at 0, the step count at 0.
    pub fn new<T: Element>(config: AdamWConfig, params: &[&[T]]) -> Result<Self, Error> {
        config.validate()?;
        let keep_master = T::DTYPE != DType::F32;
        let tensors = params
            .iter()
            .map(|p| -> Result<TensorState, Error> {
                let master = if keep_master {
                    let mut w = try_filled("master weights", p.len(), 0.0f32)?;
                    w.iter_mut().zip(p.iter()).for_each(|(w, x)| *w = x.to_f32());
                    Some(w)
                } else {
                    None
                };
                Ok(TensorState {
                    master,
                    m: try_filled("exp_avg", p.len(), 0.0)?,
                    v: try_filled("exp_avg_sq", p.len(), 0.0)?,
                    v_max: if config.amsgrad { Some(try_filled("max_exp_avg_sq", p.len(), 0.0)?) } else { None },
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { config, dtype: T::DTYPE, step: 0, tensors })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Steps taken (what [`crate::LrSchedule::lr_at`] takes).
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The f32 master weights of tensor `i` (None for f32 parameters, which are their own master).
    pub fn master(&self, i: usize) -> Option<&[f32]> {
        self.tensors.get(i).and_then(|t| t.master.as_deref())
    }

    /// First and second moments of tensor `i`.
    pub fn moments(&self, i: usize) -> Option<(&[f32], &[f32])> {
        self.tensors.get(i).map(|t| (t.m.as_slice(), t.v.as_slice()))
    }

    fn check_params<T: Element>(&self, lens: impl ExactSizeIterator<Item = usize>) -> Result<(), Error> {
        if T::DTYPE != self.dtype {
            return Err(Error::ParamMismatch(format!(
                "built for {} parameters, given {}",
                self.dtype.name(),
                T::DTYPE.name()
            )));
        }
        check_len("parameter tensors", self.tensors.len(), lens.len())?;
        for (i, (len, t)) in lens.zip(&self.tensors).enumerate() {
            if len != t.m.len() {
                return Err(Error::ParamMismatch(format!("tensor {i} has {len} elements, built for {}", t.m.len())));
            }
        }
        Ok(())
    }

    /// One AdamW step with learning rate `lr` (finite, >= 0). Gradients may be f32, bf16 or f16. On
    /// a non-finite gradient, or when the step would make any parameter or state non-finite
    /// ([`Error::StepRefused`]), nothing changes and the error names the first bad element.
    pub fn step<T: Element, G: Element>(
        &mut self,
        params: &mut [&mut [T]],
        grads: &[&[G]],
        lr: f32,
    ) -> Result<StepReport, Error> {
        self.check_params::<T>(params.iter().map(|p| p.len()))?;
        check_len("gradient tensors", params.len(), grads.len())?;
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            if p.len() != g.len() {
                return Err(Error::ParamMismatch(format!(
                    "gradient {i} has {} elements, parameter {}",
                    g.len(),
                    p.len()
                )));
            }
        }
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::Config { what: "lr", why: format!("{lr} is not a finite value >= 0") });
        }
        let grad_norm = cpu::grad_norm(grads)?;
        let clip_scale = self.config.max_grad_norm.map_or(1.0, |m| crate::clip::clip_scale_f64(grad_norm, m));
        let step = self.step.checked_add(1).ok_or_else(|| Error::Config {
            what: "step count",
            why: format!("{} steps taken: one more overflows u64", self.step),
        })?;
        let c = &self.config;
        let bc1 = 1.0 - f64::from(c.beta1).powf(step as f64);
        let bc2 = 1.0 - f64::from(c.beta2).powf(step as f64);
        let k = cpu::StepConsts {
            beta1: c.beta1,
            beta2: c.beta2,
            eps: c.eps,
            decay: 1.0 - lr * c.weight_decay,
            step_size: (f64::from(lr) / bc1) as f32,
            inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
            clip: clip_scale,
        };
        // Check every tensor before touching any, so a refused step changes nothing.
        for (tensor, ((p, g), st)) in params.iter().zip(grads).zip(&self.tensors).enumerate() {
            if let Some((index, what, value)) = cpu::first_non_finite(&k, p, g, st) {
                return Err(Error::StepRefused { what, tensor, index, value });
            }
        }
        self.step = step;
        for ((p, g), st) in params.iter_mut().zip(grads).zip(&mut self.tensors) {
            cpu::update(&k, p, g, st);
        }
        Ok(StepReport { grad_norm, clip_scale, lr, step: self.step })
    }
}
