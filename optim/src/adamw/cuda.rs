//! AdamW on a device (a GPU, or squid-cuda's simulator), on the caller's stream: [`super::AdamW`]'s
//! update, clipping and refusals over device parameters and gradients, with the optimizer state
//! (f32 masters behind bf16/f16 parameters, moments) in device buffers it owns.
//!
//! A step is, over every tensor in turn on the stream: the gradient's sum of squares (f64 per
//! block, with the first non-finite element), then, when the global norm is finite, a dry run of
//! the update that writes nothing but finds the first element that would become non-finite, and
//! only when no tensor has one, the update itself. A non-finite gradient or norm, and a step that
//! would leave any parameter or moment non-finite, are the CPU path's typed errors and change
//! nothing (parameters, masters, moments, step count). The host reads back three numbers per block
//! twice per step (the norm and the dry run), so a step waits for the stream twice.
//! Launches are per tensor (three per tensor and step), not one launch over a chunk table.

use squid_cuda::launch::{DeviceBuffer, DeviceCopy, DeviceView, DeviceViewMut, Gpu, LaunchDims};
use squid_cuda::{DType, Element};

use super::{AdamWConfig, StepReport};
use crate::device::device_err;
use crate::{check_len, Error};

/// Threads per block.
const BLOCK: u32 = 256;
/// Most blocks per tensor and launch (grid-stride beyond).
const MAX_BLOCKS: usize = 1024;

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::BF16 => "bf16",
        DType::F16 => "f16",
    }
}

fn entry(name: String) -> Result<&'static str, Error> {
    super::KERNEL
        .entries
        .iter()
        .copied()
        .find(|e| *e == name)
        .ok_or_else(|| Error::ParamMismatch(format!("no kernel {name}: gradients are in the parameters' type or f32")))
}

fn grid(n: usize) -> u32 {
    n.div_ceil(BLOCK as usize).clamp(1, MAX_BLOCKS) as u32
}

/// The device state of one parameter tensor.
#[derive(Debug)]
struct DeviceTensorState {
    len: usize,
    master: Option<DeviceBuffer<f32>>,
    m: DeviceBuffer<f32>,
    v: DeviceBuffer<f32>,
    v_max: Option<DeviceBuffer<f32>>,
}

/// AdamW over a fixed list of device parameter tensors; see the module doc.
#[derive(Debug)]
pub struct DeviceAdamW {
    config: AdamWConfig,
    dtype: DType,
    step: u64,
    tensors: Vec<DeviceTensorState>,
    /// Stand-ins for an absent master or max_exp_avg_sq (the kernel never touches them).
    spare: [DeviceBuffer<f32>; 2],
}

impl DeviceAdamW {
    /// An optimizer for `params` on `gpu` (their current values become the f32 masters when they
    /// are bf16/f16). Moments start at 0, the step count at 0.
    pub fn new<T: Element + DeviceCopy>(
        gpu: &Gpu,
        config: AdamWConfig,
        params: &[DeviceView<'_, T>],
    ) -> Result<Self, Error> {
        config.validate()?;
        let zeros = |n: usize| gpu.zeros::<f32>(n.max(1)).map_err(device_err);
        let mut tensors = Vec::with_capacity(params.len());
        for p in params {
            let n = p.len();
            let master = if T::DTYPE == DType::F32 {
                None
            } else {
                let mut w = zeros(n)?;
                if n > 0 {
                    let name = entry(format!("squid_adamw_master_{}", dtype_name(T::DTYPE)))?;
                    // SAFETY: (const T* p, float* out, long long n): grid-stride over i < n = len(p)
                    // <= len(out).
                    let k = unsafe { gpu.typed_kernel::<(DeviceView<'_, T>, &mut _, i64)>(&super::KERNEL, name) }
                        .map_err(device_err)?;
                    let dims = LaunchDims::per_row(grid(n), BLOCK);
                    k.launch(gpu, dims, (p.slice(..).map_err(device_err)?, &mut w, n as i64)).map_err(device_err)?;
                }
                Some(w)
            };
            tensors.push(DeviceTensorState {
                len: n,
                master,
                m: zeros(n)?,
                v: zeros(n)?,
                v_max: if config.amsgrad { Some(zeros(n)?) } else { None },
            });
        }
        Ok(Self { config, dtype: T::DTYPE, step: 0, tensors, spare: [zeros(1)?, zeros(1)?] })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The f32 master weights of tensor `i` (None for f32 parameters, which are their own
    /// master). The buffer may be longer than the tensor (one element for an empty tensor).
    pub fn master(&self, i: usize) -> Option<&DeviceBuffer<f32>> {
        self.tensors.get(i).and_then(|t| t.master.as_ref())
    }

    /// First and second moments of tensor `i` (the same length rule as [`Self::master`]).
    pub fn moments(&self, i: usize) -> Option<(&DeviceBuffer<f32>, &DeviceBuffer<f32>)> {
        self.tensors.get(i).map(|t| (&t.m, &t.v))
    }

    /// One AdamW step with learning rate `lr` (finite, >= 0) on the caller's stream. Gradients are
    /// in the parameters' type or f32. On a non-finite gradient (norm), or when the step would make
    /// any parameter or state non-finite ([`Error::StepRefused`]), nothing changes and the error
    /// names the first bad element (gradient indices count across the tensors in order).
    pub fn step<T: Element + DeviceCopy, G: Element + DeviceCopy>(
        &mut self,
        gpu: &Gpu,
        params: &mut [DeviceViewMut<'_, T>],
        grads: &[DeviceView<'_, G>],
        lr: f32,
    ) -> Result<StepReport, Error> {
        if T::DTYPE != self.dtype {
            return Err(Error::ParamMismatch(format!(
                "built for {} parameters, given {}",
                self.dtype.name(),
                T::DTYPE.name()
            )));
        }
        check_len("parameter tensors", self.tensors.len(), params.len())?;
        check_len("gradient tensors", params.len(), grads.len())?;
        for (i, ((p, g), t)) in params.iter().zip(grads).zip(&self.tensors).enumerate() {
            if p.len() != t.len {
                return Err(Error::ParamMismatch(format!("tensor {i} has {} elements, built for {}", p.len(), t.len)));
            }
            if g.len() != p.len() {
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
        let update = entry(format!("squid_adamw_{}_{}", dtype_name(T::DTYPE), dtype_name(G::DTYPE)))?;
        let grad_norm = self.grad_norm(gpu, grads)?;
        let clip_scale = self.config.max_grad_norm.map_or(1.0, |m| crate::clip::clip_scale_f64(grad_norm, m));
        let step = self.step.checked_add(1).ok_or_else(|| Error::Config {
            what: "step count",
            why: format!("{} steps taken: one more overflows u64", self.step),
        })?;
        let c = &self.config;
        let bc1 = 1.0 - f64::from(c.beta1).powf(step as f64);
        let bc2 = 1.0 - f64::from(c.beta2).powf(step as f64);
        let consts = [
            c.beta1,
            c.beta2,
            c.eps,
            1.0 - lr * c.weight_decay,
            (f64::from(lr) / bc1) as f32,
            (1.0 / bc2.sqrt()) as f32,
            clip_scale,
        ];
        let consts = gpu.upload(&consts).map_err(device_err)?;
        // The dry run over every tensor first: a refused step writes nothing anywhere.
        for (tensor, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            let blocks = self.launch_update::<T, G>(gpu, update, tensor, p, g, &consts, false)?;
            if let Some(partials) = blocks {
                let rows = gpu.download(&partials).map_err(device_err)?;
                if let Some(r) = rows.chunks(3).filter(|r| r[1] >= 0.0).min_by(|a, b| a[1].total_cmp(&b[1])) {
                    const WHAT: [&str; 5] =
                        ["parameter", "parameter in its storage type", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"];
                    return Err(Error::StepRefused {
                        what: WHAT[(r[0] as usize).min(4)],
                        tensor,
                        index: r[1] as usize,
                        value: r[2] as f32,
                    });
                }
            }
        }
        for (tensor, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            self.launch_update::<T, G>(gpu, update, tensor, p, g, &consts, true)?;
        }
        self.step = step;
        Ok(StepReport { grad_norm, clip_scale, lr, step })
    }

    /// The global L2 norm of `grads` in f64, or the CPU path's error naming the first non-finite
    /// element (index across the tensors in order).
    fn grad_norm<G: Element + DeviceCopy>(&self, gpu: &Gpu, grads: &[DeviceView<'_, G>]) -> Result<f64, Error> {
        let name = entry(format!("squid_adamw_sumsq_{}", dtype_name(G::DTYPE)))?;
        let (mut sum, mut offset) = (0.0f64, 0usize);
        for g in grads {
            let n = g.len();
            if n > 0 {
                let blocks = grid(n);
                let mut partials = gpu.zeros::<f64>(3 * blocks as usize).map_err(device_err)?;
                // SAFETY: (const G* g, long long n, double* partials): grid-stride over i < n = len(g);
                // block b writes partials[3b..3b+3] (len 3 * blocks).
                let k = unsafe { gpu.typed_kernel::<(DeviceView<'_, G>, i64, &mut _)>(&super::KERNEL, name) }
                    .map_err(device_err)?;
                k.launch(
                    gpu,
                    LaunchDims::per_row(blocks, BLOCK),
                    (g.slice(..).map_err(device_err)?, n as i64, &mut partials),
                )
                .map_err(device_err)?;
                let rows = gpu.download(&partials).map_err(device_err)?;
                if let Some(r) = rows.chunks(3).filter(|r| r[1] >= 0.0).min_by(|a, b| a[1].total_cmp(&b[1])) {
                    return Err(Error::NonFinite {
                        what: "gradient",
                        index: offset + r[1] as usize,
                        value: r[2] as f32,
                    });
                }
                sum += rows.chunks(3).map(|r| r[0]).sum::<f64>();
            }
            offset += n;
        }
        let norm = sum.sqrt();
        if norm.is_finite() {
            Ok(norm)
        } else {
            Err(Error::NonFinite { what: "gradient norm", index: 0, value: f32::INFINITY })
        }
    }

    /// Launches the update of one tensor: the dry run (`write = false`, returns the per-block
    /// partials to read) or the write.
    #[allow(clippy::too_many_arguments)]
    fn launch_update<T: Element + DeviceCopy, G: Element + DeviceCopy>(
        &mut self,
        gpu: &Gpu,
        name: &'static str,
        tensor: usize,
        p: &mut DeviceViewMut<'_, T>,
        g: &DeviceView<'_, G>,
        consts: &DeviceBuffer<f32>,
        write: bool,
    ) -> Result<Option<DeviceBuffer<f64>>, Error> {
        let n = p.len();
        if n == 0 {
            return Ok(None);
        }
        let blocks = grid(n);
        let mut partials = gpu.zeros::<f64>(3 * blocks as usize).map_err(device_err)?;
        let [spare_master, spare_vmax] = &mut self.spare;
        let st = &mut self.tensors[tensor];
        let flags = i32::from(write) | (i32::from(st.master.is_some()) << 1) | (i32::from(st.v_max.is_some()) << 2);
        let master = st.master.as_mut().unwrap_or(spare_master);
        let v_max = st.v_max.as_mut().unwrap_or(spare_vmax);
        // SAFETY: (T* p, const G* g, float* master, float* m, float* v, float* vmax, const float* k,
        // double* partials, long long n, int flags): grid-stride over i < n = len(p) = len(g) (checked
        // by `step`) <= len(m), len(v) and, when flags say they are used, len(master), len(vmax)
        // (allocated with the tensor's length); k has 7 entries; block b writes partials[3b..3b+3]
        // only in the dry run. The spares are never read (their flags are off).
        let k = unsafe {
            gpu.typed_kernel::<(
                DeviceViewMut<'_, T>,
                DeviceView<'_, G>,
                &mut DeviceBuffer<f32>,
                &mut DeviceBuffer<f32>,
                &mut DeviceBuffer<f32>,
                &mut DeviceBuffer<f32>,
                &DeviceBuffer<f32>,
                &mut DeviceBuffer<f64>,
                i64,
                i32,
            )>(&super::KERNEL, name)
        }
        .map_err(device_err)?;
        let args = (
            p.slice_mut(..).map_err(device_err)?,
            g.slice(..).map_err(device_err)?,
            master,
            &mut st.m,
            &mut st.v,
            v_max,
            consts,
            &mut partials,
            n as i64,
            flags,
        );
        k.launch(gpu, LaunchDims::per_row(blocks, BLOCK), args).map_err(device_err)?;
        Ok((!write).then_some(partials))
    }
}

/// AdamW over many tensors laid out back to back in one device arena (the flat parameter and
/// gradient buffers of Megatron's and DeepSpeed's optimizers): the same update, clipping,
/// refusals and errors as [`DeviceAdamW`], but a step is three launches whatever the number of
/// tensors (the global sum of squares, the dry run, the write), each grid-stride over the whole
/// arena, with the state (masters, moments) flat as well. Tensor `i` is elements
/// `offsets[i]..offsets[i + 1]` of the arena; errors name the tensor and the index in it.
///
/// Not a table of device pointers to separate allocations (Apex's `multi_tensor_apply`): squid's
/// simulator lets a kernel reach only the buffers passed as its arguments, so such a table could
/// not be run without a GPU; tensors that live apart are [`DeviceAdamW`]'s (launches per tensor).
#[derive(Debug)]
pub struct FlatDeviceAdamW {
    config: AdamWConfig,
    dtype: DType,
    step: u64,
    /// `tensors + 1` offsets into the arena, from 0 to its length.
    offsets: Vec<usize>,
    master: Option<DeviceBuffer<f32>>,
    m: DeviceBuffer<f32>,
    v: DeviceBuffer<f32>,
    v_max: Option<DeviceBuffer<f32>>,
    spare: [DeviceBuffer<f32>; 2],
}

impl FlatDeviceAdamW {
    /// An optimizer for the tensors of lengths `lens` stored back to back in `params` (whose
    /// length must be their sum). Their current values become the f32 masters when they are
    /// bf16/f16; moments start at 0, the step count at 0.
    pub fn new<T: Element + DeviceCopy>(
        gpu: &Gpu,
        config: AdamWConfig,
        params: DeviceView<'_, T>,
        lens: &[usize],
    ) -> Result<Self, Error> {
        config.validate()?;
        let mut offsets = Vec::with_capacity(lens.len() + 1);
        offsets.push(0usize);
        for &n in lens {
            let end = offsets[offsets.len() - 1].checked_add(n).ok_or_else(|| Error::Size {
                what: "parameter arena",
                why: "the tensor lengths overflow usize".into(),
            })?;
            offsets.push(end);
        }
        let total = offsets[lens.len()];
        check_len("parameter arena (the sum of the tensor lengths)", total, params.len())?;
        let zeros = |n: usize| gpu.zeros::<f32>(n.max(1)).map_err(device_err);
        let master = if T::DTYPE == DType::F32 {
            None
        } else {
            let mut w = zeros(total)?;
            if total > 0 {
                let name = entry(format!("squid_adamw_master_{}", dtype_name(T::DTYPE)))?;
                // SAFETY: (const T* p, float* out, long long n): grid-stride over i < n = len(p) <=
                // len(out).
                let k = unsafe { gpu.typed_kernel::<(DeviceView<'_, T>, &mut _, i64)>(&super::KERNEL, name) }
                    .map_err(device_err)?;
                k.launch(gpu, LaunchDims::per_row(grid(total), BLOCK), (params, &mut w, total as i64))
                    .map_err(device_err)?;
            }
            Some(w)
        };
        Ok(Self {
            config,
            dtype: T::DTYPE,
            step: 0,
            offsets,
            master,
            m: zeros(total)?,
            v: zeros(total)?,
            v_max: if config.amsgrad { Some(zeros(total)?) } else { None },
            spare: [zeros(1)?, zeros(1)?],
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The flat f32 masters (None for f32 parameters); at least one element long.
    pub fn master(&self) -> Option<&DeviceBuffer<f32>> {
        self.master.as_ref()
    }

    /// The flat first and second moments; at least one element long.
    pub fn moments(&self) -> (&DeviceBuffer<f32>, &DeviceBuffer<f32>) {
        (&self.m, &self.v)
    }

    /// The tensor of arena element `i`, and the index in it.
    fn locate(&self, i: usize) -> (usize, usize) {
        let t = self.offsets.partition_point(|&o| o <= i).saturating_sub(1);
        (t, i - self.offsets[t])
    }

    /// One step with learning rate `lr` over the arena, on the caller's stream; see
    /// [`DeviceAdamW::step`] for the rules (the gradient arena has the parameters' layout).
    pub fn step<T: Element + DeviceCopy, G: Element + DeviceCopy>(
        &mut self,
        gpu: &Gpu,
        mut params: DeviceViewMut<'_, T>,
        grads: DeviceView<'_, G>,
        lr: f32,
    ) -> Result<StepReport, Error> {
        if T::DTYPE != self.dtype {
            return Err(Error::ParamMismatch(format!(
                "built for {} parameters, given {}",
                self.dtype.name(),
                T::DTYPE.name()
            )));
        }
        let total = self.offsets[self.offsets.len() - 1];
        if params.len() != total {
            return Err(Error::ParamMismatch(format!("the arena has {} elements, built for {total}", params.len())));
        }
        if grads.len() != total {
            return Err(Error::ParamMismatch(format!(
                "the gradient arena has {} elements, built for {total}",
                grads.len()
            )));
        }
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::Config { what: "lr", why: format!("{lr} is not a finite value >= 0") });
        }
        let update = entry(format!("squid_adamw_{}_{}", dtype_name(T::DTYPE), dtype_name(G::DTYPE)))?;
        let sumsq = entry(format!("squid_adamw_sumsq_{}", dtype_name(G::DTYPE)))?;
        let mut grad_norm = 0.0f64;
        if total > 0 {
            let blocks = grid(total);
            let mut partials = gpu.zeros::<f64>(3 * blocks as usize).map_err(device_err)?;
            // SAFETY: (const G* g, long long n, double* partials): grid-stride over i < n = len(g);
            // block b writes partials[3b..3b+3] (len 3 * blocks).
            let k = unsafe { gpu.typed_kernel::<(DeviceView<'_, G>, i64, &mut _)>(&super::KERNEL, sumsq) }
                .map_err(device_err)?;
            k.launch(gpu, LaunchDims::per_row(blocks, BLOCK), (grads.clone(), total as i64, &mut partials))
                .map_err(device_err)?;
            let rows = gpu.download(&partials).map_err(device_err)?;
            if let Some(r) = rows.chunks(3).filter(|r| r[1] >= 0.0).min_by(|a, b| a[1].total_cmp(&b[1])) {
                return Err(Error::NonFinite { what: "gradient", index: r[1] as usize, value: r[2] as f32 });
            }
            grad_norm = rows.chunks(3).map(|r| r[0]).sum::<f64>().sqrt();
        }
        if !grad_norm.is_finite() {
            return Err(Error::NonFinite { what: "gradient norm", index: 0, value: f32::INFINITY });
        }
        let clip_scale = self.config.max_grad_norm.map_or(1.0, |m| crate::clip::clip_scale_f64(grad_norm, m));
        let step = self.step.checked_add(1).ok_or_else(|| Error::Config {
            what: "step count",
            why: format!("{} steps taken: one more overflows u64", self.step),
        })?;
        let c = &self.config;
        let bc1 = 1.0 - f64::from(c.beta1).powf(step as f64);
        let bc2 = 1.0 - f64::from(c.beta2).powf(step as f64);
        let consts = [
            c.beta1,
            c.beta2,
            c.eps,
            1.0 - lr * c.weight_decay,
            (f64::from(lr) / bc1) as f32,
            (1.0 / bc2.sqrt()) as f32,
            clip_scale,
        ];
        let consts = gpu.upload(&consts).map_err(device_err)?;
        if total > 0 {
            for write in [false, true] {
                let blocks = grid(total);
                let mut partials = gpu.zeros::<f64>(3 * blocks as usize).map_err(device_err)?;
                let flags =
                    i32::from(write) | (i32::from(self.master.is_some()) << 1) | (i32::from(self.v_max.is_some()) << 2);
                let [spare_master, spare_vmax] = &mut self.spare;
                let master = self.master.as_mut().unwrap_or(spare_master);
                let v_max = self.v_max.as_mut().unwrap_or(spare_vmax);
                // SAFETY: as in `DeviceAdamW::launch_update`, over the arena: grid-stride over i < n =
                // total = len(params) = len(grads) (checked above) <= len(m), len(v) and, when the
                // flags say they are used, len(master), len(vmax) (allocated with `total`); k has 7
                // entries; block b writes partials[3b..3b+3] only in the dry run.
                let k = unsafe {
                    gpu.typed_kernel::<(
                        DeviceViewMut<'_, T>,
                        DeviceView<'_, G>,
                        &mut DeviceBuffer<f32>,
                        &mut DeviceBuffer<f32>,
                        &mut DeviceBuffer<f32>,
                        &mut DeviceBuffer<f32>,
                        &DeviceBuffer<f32>,
                        &mut DeviceBuffer<f64>,
                        i64,
                        i32,
                    )>(&super::KERNEL, update)
                }
                .map_err(device_err)?;
                let args = (
                    params.reborrow(),
                    grads.clone(),
                    master,
                    &mut self.m,
                    &mut self.v,
                    v_max,
                    &consts,
                    &mut partials,
                    total as i64,
                    flags,
                );
                k.launch(gpu, LaunchDims::per_row(blocks, BLOCK), args).map_err(device_err)?;
                if !write {
                    let rows = gpu.download(&partials).map_err(device_err)?;
                    if let Some(r) = rows.chunks(3).filter(|r| r[1] >= 0.0).min_by(|a, b| a[1].total_cmp(&b[1])) {
                        const WHAT: [&str; 5] =
                            ["parameter", "parameter in its storage type", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"];
                        let (tensor, index) = self.locate(r[1] as usize);
                        return Err(Error::StepRefused {
                            what: WHAT[(r[0] as usize).min(4)],
                            tensor,
                            index,
                            value: r[2] as f32,
                        });
                    }
                }
            }
        }
        self.step = step;
        Ok(StepReport { grad_norm, clip_scale, lr, step })
    }
}
