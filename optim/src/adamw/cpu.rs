//! The fused update: one pass per tensor, chunks in parallel, each element read and written once.

use rayon::prelude::*;
use squid_cuda::dtype::Element;

use super::TensorState;
use crate::Error;

/// Elements per parallel work item.
const CHUNK: usize = 32 * 1024;

/// Per-step constants (bias corrections folded in).
pub(super) struct StepConsts {
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// `1 - lr * weight_decay`.
    pub decay: f32,
    /// `lr / (1 - beta1^t)`.
    pub step_size: f32,
    /// `1 / sqrt(1 - beta2^t)`.
    pub inv_sqrt_bc2: f32,
    /// Gradient clip factor.
    pub clip: f32,
}

/// Global L2 norm over gradients of any storage type; non-finite -> error naming the element.
pub(super) fn grad_norm<G: Element>(grads: &[&[G]]) -> Result<f32, Error> {
    let sum: f64 = grads
        .par_iter()
        .map(|g| {
            g.par_chunks(CHUNK)
                .map(|c| {
                    let mut lanes = [0.0f32; 8];
                    for (i, x) in c.iter().enumerate() {
                        let x = x.to_f32();
                        lanes[i % 8] += x * x;
                    }
                    lanes.iter().map(|&l| f64::from(l)).sum::<f64>()
                })
                .sum::<f64>()
        })
        .sum();
    if sum.is_finite() {
        return Ok(sum.sqrt() as f32);
    }
    let mut offset = 0;
    for g in grads {
        if let Some(i) = g.iter().position(|x| !x.to_f32().is_finite()) {
            return Err(Error::NonFinite { what: "gradient", index: offset + i, value: g[i].to_f32() });
        }
        offset += g.len();
    }
    // Finite elements whose squares overflow f64: astronomically large, but a number.
    Err(Error::NonFinite { what: "gradient norm", index: 0, value: f32::INFINITY })
}

#[inline(always)]
fn element(k: &StepConsts, p: f32, g: f32, m: &mut f32, v: &mut f32, v_max: Option<&mut f32>) -> f32 {
    let g = g * k.clip;
    let p = p * k.decay;
    *m = k.beta1 * *m + (1.0 - k.beta1) * g;
    *v = k.beta2 * *v + (1.0 - k.beta2) * g * g;
    let v_hat = match v_max {
        Some(vm) => {
            *vm = vm.max(*v);
            *vm
        }
        None => *v,
    };
    p - k.step_size * *m / (v_hat.sqrt() * k.inv_sqrt_bc2 + k.eps)
}

pub(super) fn update<T: Element, G: Element>(k: &StepConsts, params: &mut [T], grads: &[G], st: &mut TensorState) {
    let TensorState { master, m, v, v_max } = st;
    let chunks = params
        .par_chunks_mut(CHUNK)
        .zip(grads.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK));
    match (master, v_max) {
        (None, None) => chunks.for_each(|(((p, g), m), v)| {
            for i in 0..p.len() {
                p[i] = T::from_f32(element(k, p[i].to_f32(), g[i].to_f32(), &mut m[i], &mut v[i], None));
            }
        }),
        (Some(master), None) => chunks.zip(master.par_chunks_mut(CHUNK)).for_each(|((((p, g), m), v), w)| {
            for i in 0..p.len() {
                w[i] = element(k, w[i], g[i].to_f32(), &mut m[i], &mut v[i], None);
                p[i] = T::from_f32(w[i]);
            }
        }),
        (None, Some(vmax)) => chunks.zip(vmax.par_chunks_mut(CHUNK)).for_each(|((((p, g), m), v), vm)| {
            for i in 0..p.len() {
                p[i] = T::from_f32(element(k, p[i].to_f32(), g[i].to_f32(), &mut m[i], &mut v[i], Some(&mut vm[i])));
            }
        }),
        (Some(master), Some(vmax)) => chunks
            .zip(master.par_chunks_mut(CHUNK))
            .zip(vmax.par_chunks_mut(CHUNK))
            .for_each(|(((((p, g), m), v), w), vm)| {
                for i in 0..p.len() {
                    w[i] = element(k, w[i], g[i].to_f32(), &mut m[i], &mut v[i], Some(&mut vm[i]));
                    p[i] = T::from_f32(w[i]);
                }
            }),
    }
}
