//! Dense attention on a device (a GPU, or squid-cuda's simulator): the CPU API over device
//! memory, with the same configs, validation and typed errors.
//!
//! Every entry point reads its inputs through [`DeviceView`]s and writes through
//! [`DeviceViewMut`]s, so a caller holding cudarc `CudaSlice`s (or views of them, or raw device
//! pointers) on its own stream ([`Gpu::from_stream`]) launches there with no copy; a
//! `&DeviceBuffer` converts too. The `*_into` forms write into the caller's outputs; the plain
//! forms allocate them on the `Gpu`'s stream and return them.
//!
//! Storage is bf16 or f16 (the tensor cores' inputs); f32 tensors are refused with
//! [`Error::Unsupported`]: convert them on the host (`half::bf16::from_f32`) before uploading.
//! Head dims are the compiled pairs [`super::flash::HEAD_DIMS`]. `cu_seqlens` stay on the host:
//! the tile schedule is built from them there and uploaded with each call.

use squid_cuda::launch::{DeviceBuffer, DeviceCopy, DeviceView, DeviceViewMut, Gpu, LaunchDims};
use squid_cuda::{DType, Element};

use super::flash::{self, KernelMask, Schedule, KERNEL};
use super::{validate_lens, DenseConfig, Dims, DECODE_KERNEL};
use crate::layout::{check_finite, expect_len};
use crate::Error;

/// Forward result on the device: `o [total_q, HQ, Dv]`, `lse [HQ, total_q]` (natural log; `-inf`
/// and `o = 0` for a query that sees no key).
#[derive(Debug)]
pub struct DeviceOutput<T> {
    /// `[total_q, HQ, Dv]`.
    pub o: DeviceBuffer<T>,
    /// `[HQ, total_q]`.
    pub lse: DeviceBuffer<f32>,
}

pub(crate) fn device_err(e: squid_cuda::Error) -> Error {
    Error::Device(e.to_string())
}

/// The entry-name suffix of a storage type, or the error that says to convert.
pub(crate) fn dtype_suffix<T: Element>() -> Result<&'static str, Error> {
    match T::DTYPE {
        DType::BF16 => Ok("bf16"),
        DType::F16 => Ok("f16"),
        DType::F32 => Err(Error::Unsupported(
            "f32 storage: the tensor-core kernels take bf16 or f16; convert on the host before uploading".into(),
        )),
    }
}

/// Finds `name` among the kernel's declared entries (they are `&'static`, as launches need).
pub(crate) fn entry(name: &str) -> Result<&'static str, Error> {
    KERNEL
        .entries
        .iter()
        .copied()
        .find(|e| *e == name)
        .ok_or_else(|| Error::Unsupported(format!("no kernel entry {name}")))
}

fn fill_dims(n: usize) -> LaunchDims {
    LaunchDims::linear(n, 256, 4096)
}

/// Sets every element of a 16-bit tensor (bf16 or f16) to zero on the device.
pub(crate) fn zero_b16<T: Element + DeviceCopy>(gpu: &Gpu, x: DeviceViewMut<'_, T>) -> Result<(), Error> {
    dtype_suffix::<T>()?;
    if x.is_empty() {
        return Ok(());
    }
    let n = x.len();
    // SAFETY: the entry is (unsigned short* x, long long n, unsigned bits); T is a 16-bit storage
    // type (checked above) and the kernel writes x[0..n), n = the view's length.
    let kernel = unsafe { gpu.typed_kernel::<(DeviceViewMut<'_, T>, i64, u32)>(&DECODE_KERNEL, "squid_attn_fill_b16") }
        .map_err(device_err)?;
    kernel.launch(gpu, fill_dims(n), (x, n as i64, 0)).map_err(device_err)
}

/// Sets every element of an f32 tensor to `value` on the device.
pub(crate) fn fill_f32(gpu: &Gpu, x: DeviceViewMut<'_, f32>, value: f32) -> Result<(), Error> {
    if x.is_empty() {
        return Ok(());
    }
    let n = x.len();
    // SAFETY: the entry is (float* x, long long n, float value); it writes x[0..n).
    let kernel =
        unsafe { gpu.typed_kernel::<(DeviceViewMut<'_, f32>, i64, f32)>(&DECODE_KERNEL, "squid_attn_fill_f32") }
            .map_err(device_err)?;
    kernel.launch(gpu, fill_dims(n), (x, n as i64, value)).map_err(device_err)
}

/// The check `check_finite` asks for, on a downloaded copy (one device-to-host copy per tensor).
pub(crate) fn check_finite_device<T: Element + DeviceCopy>(
    gpu: &Gpu,
    name: &'static str,
    x: &DeviceView<'_, T>,
) -> Result<(), Error> {
    check_finite(name, &gpu.download_view(x).map_err(device_err)?)
}

/// The alignment the tensor-core kernels' 16-byte loads and stores need of every 16-bit tensor.
pub(crate) const TILE_ALIGN: u64 = 16;

/// Fails unless `aligned` (a view's start is a multiple of `bytes`): a typed error rather than a
/// misaligned access on the device.
pub(crate) fn expect_aligned(name: &'static str, aligned: bool, bytes: u64) -> Result<(), Error> {
    if aligned {
        Ok(())
    } else {
        Err(Error::Shape(format!(
            "{name} starts at a device address that is not a multiple of {bytes} bytes (the kernels load it in \
             {bytes}-byte pieces): slice it at a multiple of {bytes} bytes"
        )))
    }
}

/// Validation shared by the device calls: lengths, dtype, head dims, finiteness.
pub(crate) fn validate_device<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    q: &DeviceView<'_, T>,
    k: &DeviceView<'_, T>,
    v: &DeviceView<'_, T>,
    cu_q: &[u32],
    cu_k: &[u32],
) -> Result<Dims, Error> {
    let dims = validate_lens(cfg, q.len(), k.len(), v.len(), cu_q, cu_k)?;
    dtype_suffix::<T>()?;
    flash::check_head_dims(cfg.heads.head_dim_k, cfg.heads.head_dim_v)?;
    expect_aligned("q", q.is_aligned(TILE_ALIGN), TILE_ALIGN)?;
    expect_aligned("k", k.is_aligned(TILE_ALIGN), TILE_ALIGN)?;
    expect_aligned("v", v.is_aligned(TILE_ALIGN), TILE_ALIGN)?;
    if cfg.check_finite {
        check_finite_device(gpu, "q", q)?;
        check_finite_device(gpu, "k", k)?;
        check_finite_device(gpu, "v", v)?;
    }
    Ok(dims)
}

/// Checks the lengths of a forward's outputs.
pub(crate) fn expect_outputs(cfg: &DenseConfig, total_q: usize, o: usize, lse: usize) -> Result<(), Error> {
    let h = cfg.heads;
    expect_len("o", o, total_q * h.num_q_heads * h.head_dim_v, "[total_q, HQ, Dv]")?;
    expect_len("lse", lse, h.num_q_heads * total_q, "[HQ, total_q]")
}

/// Query rows (per head) the schedule's items cover.
fn covered_rows(sched: &Schedule) -> usize {
    if sched.items == 0 {
        return 0;
    }
    sched.ints[flash::HEADER..][..sched.items * flash::ITEM].chunks(flash::ITEM).map(|it| it[5] as usize).sum()
}

/// Runs the forward kernel over a schedule into `o` and `lse` (shared by dense and segment
/// attention and the batch-invariant decode), whose items hold at most
/// [`flash::forward_tile_m`] positions. Rows no item covers (they see no key) get `o = 0`,
/// `lse = -inf` here; the kernel writes every row of its items.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_scheduled<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    dims: Dims,
    sched: &Schedule,
    q: DeviceView<'_, T>,
    k: DeviceView<'_, T>,
    v: DeviceView<'_, T>,
    o: DeviceViewMut<'_, T>,
    lse: DeviceViewMut<'_, f32>,
) -> Result<(), Error> {
    let h = cfg.heads;
    let hpc = flash::forward_heads_per_cta(h.num_q_heads, h.num_kv_heads, h.head_dim_k);
    forward_scheduled_stacking(gpu, cfg, dims, sched, q, k, v, o, lse, hpc)
}

/// [`forward_scheduled`] with `hpc` heads per CTA (a divisor of the group; items of at most
/// `TILE_M / hpc` positions): the tests compare stacking against one head per CTA.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_scheduled_stacking<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    dims: Dims,
    sched: &Schedule,
    q: DeviceView<'_, T>,
    k: DeviceView<'_, T>,
    v: DeviceView<'_, T>,
    mut o: DeviceViewMut<'_, T>,
    mut lse: DeviceViewMut<'_, f32>,
    hpc: usize,
) -> Result<(), Error> {
    let h = cfg.heads;
    expect_outputs(cfg, dims.total_q, o.len(), lse.len())?;
    for (name, aligned) in
        [("q", q.is_aligned(TILE_ALIGN)), ("k", k.is_aligned(TILE_ALIGN)), ("v", v.is_aligned(TILE_ALIGN))]
    {
        expect_aligned(name, aligned, TILE_ALIGN)?;
    }
    expect_aligned("o", o.is_aligned(TILE_ALIGN), TILE_ALIGN)?;
    expect_aligned("lse", lse.is_aligned(4), 4)?;
    if covered_rows(sched) < dims.total_q {
        zero_b16(gpu, o.reborrow())?;
        fill_f32(gpu, lse.reborrow(), f32::NEG_INFINITY)?;
    }
    if sched.items == 0 {
        return Ok(());
    }
    let name = format!("squid_flash_fwd_dk{}_dv{}_{}", h.head_dim_k, h.head_dim_v, dtype_suffix::<T>()?);
    // Header int 7 tells the kernel how many heads of a group each CTA stacks.
    let group = h.num_q_heads / h.num_kv_heads.max(1);
    if hpc == 0 || group % hpc != 0 || hpc > flash::TILE_M || (hpc > 1 && h.head_dim_k == 256) {
        return Err(Error::Unsupported(format!("{hpc} heads per forward CTA for a GQA group of {group}")));
    }
    debug_assert!(sched.ints[flash::HEADER..][..sched.items * flash::ITEM]
        .chunks(flash::ITEM)
        .all(|it| it[5] as usize * hpc <= flash::TILE_M));
    let mut header_ints = sched.ints.clone();
    header_ints[7] = hpc as i32;
    let ints = gpu.upload(&header_ints).map_err(device_err)?;
    let scale_log2 = cfg.softmax_scale() * std::f32::consts::LOG2_E;
    let grid = (sched.items as u32, (h.num_q_heads / hpc) as u32, 1);
    let launch = LaunchDims { grid, block: (128, 1, 1), shared_bytes: 0 };
    // SAFETY: the entry is (const T* q, const T* k, const T* v, T* o, float* lse, const int*
    // sched, float scale_log2) with T a 16-bit storage type; the schedule was built from the
    // validated cu_seqlens, so every row it addresses lies inside q, k, v, o and lse; the
    // CTA of grid row y writes heads y * hpc .. (y + 1) * hpc, and hpc divides HQ / HKV.
    let kernel = unsafe {
        gpu.typed_kernel::<(
            DeviceView<'_, T>,
            DeviceView<'_, T>,
            DeviceView<'_, T>,
            DeviceViewMut<'_, T>,
            DeviceViewMut<'_, f32>,
            &DeviceBuffer<i32>,
            f32,
        )>(&KERNEL, entry(&name)?)
    }
    .map_err(device_err)?;
    kernel.launch(gpu, launch, (q, k, v, o, lse, &ints, scale_log2)).map_err(device_err)
}

/// Key starts of the dense schedule's items are rounded down to a multiple of this: a multiple
/// of every forward key tile (64, 32, 16 keys), so each row's keys are visited in tiles aligned
/// at key 0 of its sequence whatever rows share its query tile. A row's arithmetic then depends
/// only on its own query and keys (a key tile it does not see changes none of its bits), which
/// is what makes one decoded token's row equal the prefill's bit for bit (also with windows).
pub(crate) const KEY_ALIGN: usize = 64;

pub(crate) fn dense_schedule(cfg: &DenseConfig, cu_q: &[u32], cu_k: &[u32], tile_m: usize) -> Result<Schedule, Error> {
    let kmask = KernelMask { causal: cfg.causal, window: cfg.window, row_lo: false };
    let mut sched =
        flash::schedule(cfg, kmask, cfg.heads.num_q_heads, cfg.heads.num_kv_heads, tile_m, cu_q, cu_k, |_, _, _| {
            Vec::new()
        })?;
    let items = sched.items;
    for it in sched.ints[flash::HEADER..][..items * flash::ITEM].chunks_mut(flash::ITEM) {
        it[6] -= it[6] % KEY_ALIGN as i32;
    }
    Ok(sched)
}

/// Attention forward on the device into the caller's `o [total_q, HQ, Dv]` and
/// `lse [HQ, total_q]`, as [`super::forward`]: `q [total_q, HQ, Dk]`, `k [total_k, HKV, Dk]`,
/// `v [total_k, HKV, Dv]` in bf16 or f16. Launched on `gpu`'s stream, asynchronously on a GPU.
#[allow(clippy::too_many_arguments)]
pub fn forward_into<'a, 'b, T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    q: impl Into<DeviceView<'a, T>>,
    k: impl Into<DeviceView<'a, T>>,
    v: impl Into<DeviceView<'a, T>>,
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
    o: impl Into<DeviceViewMut<'b, T>>,
    lse: impl Into<DeviceViewMut<'b, f32>>,
) -> Result<(), Error> {
    let (q, k, v) = (q.into(), k.into(), v.into());
    let dims = validate_device(gpu, cfg, &q, &k, &v, cu_seqlens_q, cu_seqlens_k)?;
    let sched = dense_schedule(
        cfg,
        cu_seqlens_q,
        cu_seqlens_k,
        flash::forward_tile_m(cfg.heads.num_q_heads, cfg.heads.num_kv_heads, cfg.heads.head_dim_k),
    )?;
    forward_scheduled(gpu, cfg, dims, &sched, q, k, v, o.into(), lse.into())
}

/// Attention forward on the device, as [`super::forward`], with `o` and `lse` allocated on
/// `gpu`'s stream (see [`forward_into`]).
pub fn forward<'a, T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    q: impl Into<DeviceView<'a, T>>,
    k: impl Into<DeviceView<'a, T>>,
    v: impl Into<DeviceView<'a, T>>,
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
) -> Result<DeviceOutput<T>, Error> {
    let (q, k, v) = (q.into(), k.into(), v.into());
    let dims = validate_lens(cfg, q.len(), k.len(), v.len(), cu_seqlens_q, cu_seqlens_k)?;
    let (mut o, mut lse) = alloc_outputs::<T>(gpu, cfg, dims.total_q)?;
    forward_into(gpu, cfg, q, k, v, cu_seqlens_q, cu_seqlens_k, &mut o, &mut lse)?;
    Ok(DeviceOutput { o, lse })
}

/// Uninitialised-by-contract outputs of a forward or decode (zeroed by the allocation; every
/// element is written by the launch).
pub(crate) fn alloc_outputs<T: DeviceCopy>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    total_q: usize,
) -> Result<(DeviceBuffer<T>, DeviceBuffer<f32>), Error> {
    let h = cfg.heads;
    let o = gpu.zeros::<T>(total_q * h.num_q_heads * h.head_dim_v).map_err(device_err)?;
    let lse = gpu.zeros::<f32>(total_q * h.num_q_heads).map_err(device_err)?;
    Ok((o, lse))
}

/// Backward result on the device.
#[derive(Debug)]
pub struct DeviceGrads<T> {
    /// `[total_q, HQ, Dk]`.
    pub dq: DeviceBuffer<T>,
    /// `[total_k, HKV, Dk]`, summed over each GQA group.
    pub dk: DeviceBuffer<T>,
    /// `[total_k, HKV, Dv]`, summed over each GQA group.
    pub dv: DeviceBuffer<T>,
}

/// The caller's gradient outputs of a backward ([`backward_into`]); every element is written.
#[derive(Debug)]
pub struct DeviceGradsMut<'a, T> {
    /// `[total_q, HQ, Dk]`.
    pub dq: DeviceViewMut<'a, T>,
    /// `[total_k, HKV, Dk]`, summed over each GQA group.
    pub dk: DeviceViewMut<'a, T>,
    /// `[total_k, HKV, Dv]`, summed over each GQA group.
    pub dv: DeviceViewMut<'a, T>,
}

/// How the backward computes dQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DqMode {
    /// The dK/dV kernel adds each key tile's share of dQ into an f32 buffer with atomics
    /// (one pass over the keys; the order of the f32 additions, so the last bits, vary run to run).
    #[default]
    Atomic,
    /// A separate kernel per query tile walks the keys again and sums dQ in registers: bit-for-bit
    /// reproducible, at the cost of recomputing the scores.
    Deterministic,
}

/// The forward's tensors and the output gradient a backward takes, all on the device (views of
/// squid's buffers or the caller's memory: `buffer.view()`, `(&cuda_slice).into()`).
#[derive(Debug, Clone)]
pub struct BackwardInputs<'a, T> {
    /// `[total_q, HQ, Dk]`.
    pub q: DeviceView<'a, T>,
    /// `[total_k, HKV, Dk]`.
    pub k: DeviceView<'a, T>,
    /// `[total_k, HKV, Dv]`.
    pub v: DeviceView<'a, T>,
    /// The forward's output `[total_q, HQ, Dv]`.
    pub o: DeviceView<'a, T>,
    /// The forward's `[HQ, total_q]` log-sum-exp.
    pub lse: DeviceView<'a, f32>,
    /// The output gradient `[total_q, HQ, Dv]`.
    pub d_o: DeviceView<'a, T>,
}

/// Runs the backward kernels over a forward (query-tile) schedule of [`flash::dq_tile_m`] rows
/// and a key-tile schedule into the caller's gradients (lengths checked here).
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward_scheduled<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    dims: Dims,
    fwd_sched: &Schedule,
    key_sched: &Schedule,
    x: BackwardInputs<'_, T>,
    mode: DqMode,
    grads: DeviceGradsMut<'_, T>,
) -> Result<(), Error> {
    let h = cfg.heads;
    let (hq, hkv, dk, dv) = (h.num_q_heads, h.num_kv_heads, h.head_dim_k, h.head_dim_v);
    let sfx = dtype_suffix::<T>()?;
    let key_tile = flash::backward_key_tile(dk, dv)?;
    let DeviceGradsMut { mut dq, dk: mut dkb, dv: mut dvb } = grads;
    expect_len("dq", dq.len(), dims.total_q * hq * dk, "[total_q, HQ, Dk]")?;
    expect_len("dk", dkb.len(), dims.total_k * hkv * dk, "[total_k, HKV, Dk]")?;
    expect_len("dv", dvb.len(), dims.total_k * hkv * dv, "[total_k, HKV, Dv]")?;
    for (name, aligned) in [
        ("o", x.o.is_aligned(TILE_ALIGN)),
        ("d_o", x.d_o.is_aligned(TILE_ALIGN)),
        ("dq", dq.is_aligned(TILE_ALIGN)),
        ("dk", dkb.is_aligned(TILE_ALIGN)),
        ("dv", dvb.is_aligned(TILE_ALIGN)),
    ] {
        expect_aligned(name, aligned, TILE_ALIGN)?;
    }
    expect_aligned("lse", x.lse.is_aligned(4), 4)?;
    // Keys no query sees keep dK = dV = 0; so do queries that see no key in the deterministic
    // mode (the atomic mode's conversion writes every dQ element).
    zero_b16(gpu, dkb.reborrow())?;
    zero_b16(gpu, dvb.reborrow())?;
    let atomic = mode == DqMode::Atomic;
    if key_sched.items == 0 || !atomic {
        zero_b16(gpu, dq.reborrow())?;
    }
    if key_sched.items == 0 {
        return Ok(());
    }
    let scale = cfg.softmax_scale();
    let scale_log2 = scale * std::f32::consts::LOG2_E;
    let total_q = i32::try_from(dims.total_q).map_err(|_| Error::Unsupported("total_q exceeds i32".into()))?;

    // delta = rowsum(dO * O).
    let mut delta = gpu.zeros::<f32>(dims.total_q * hq).map_err(device_err)?;
    // SAFETY: (const T* o, const T* d_o, float* delta, int total_q, int hq, int dv): one warp per
    // (row, head) < total_q * hq, reading dv elements of each; lengths validated by the caller.
    let pre = unsafe {
        gpu.typed_kernel::<(DeviceView<'_, T>, DeviceView<'_, T>, &mut DeviceBuffer<f32>, i32, i32, i32)>(
            &KERNEL,
            entry(&format!("squid_flash_bwd_pre_{sfx}"))?,
        )
    }
    .map_err(device_err)?;
    let warps = LaunchDims::linear(dims.total_q * hq * 32, 128, 4096);
    pre.launch(gpu, warps, (x.o.clone(), x.d_o.clone(), &mut delta, total_q, hq as i32, dv as i32))
        .map_err(device_err)?;

    let mut dq_acc = gpu.zeros::<f32>(if atomic { dims.total_q * hq * dk } else { 1 }).map_err(device_err)?;
    let key_ints = gpu.upload(&key_sched.ints).map_err(device_err)?;
    // SAFETY: (q, k, v, d_o, lse, delta, dk, dv, dq_acc, sched, scale_log2, scale) as declared in
    // flash.cu; the key schedule was built from the validated cu_seqlens, so every row it names
    // is inside the buffers; dq_acc is only written when the schedule's atomic flag is set, and
    // then it has total_q * HQ * Dk elements.
    let dkdv = unsafe {
        gpu.typed_kernel::<(
            DeviceView<'_, T>,
            DeviceView<'_, T>,
            DeviceView<'_, T>,
            DeviceView<'_, T>,
            DeviceView<'_, f32>,
            &DeviceBuffer<f32>,
            DeviceViewMut<'_, T>,
            DeviceViewMut<'_, T>,
            &mut DeviceBuffer<f32>,
            &DeviceBuffer<i32>,
            f32,
            f32,
        )>(&KERNEL, entry(&format!("squid_flash_bwd_dkdv_dk{dk}_dv{dv}_{sfx}"))?)
    }
    .map_err(device_err)?;
    let launch = LaunchDims {
        grid: (key_sched.items as u32, hkv as u32, flash::dkdv_passes(dk)),
        block: (2 * key_tile as u32, 1, 1),
        shared_bytes: 0,
    };
    let args = (
        x.q.clone(),
        x.k.clone(),
        x.v.clone(),
        x.d_o.clone(),
        x.lse.clone(),
        &delta,
        dkb,
        dvb,
        &mut dq_acc,
        &key_ints,
        scale_log2,
        scale,
    );
    dkdv.launch(gpu, launch, args).map_err(device_err)?;

    if atomic {
        // SAFETY: (const float* acc, T* dq, long long n, float scale), n = both lengths.
        let convert = unsafe {
            gpu.typed_kernel::<(&DeviceBuffer<f32>, DeviceViewMut<'_, T>, i64, f32)>(
                &KERNEL,
                entry(&format!("squid_flash_bwd_dq_convert_{sfx}"))?,
            )
        }
        .map_err(device_err)?;
        let n = dq.len();
        convert.launch(gpu, LaunchDims::linear(n, 256, 4096), (&dq_acc, dq, n as i64, scale)).map_err(device_err)?;
    } else if fwd_sched.items > 0 {
        let ints = gpu.upload(&fwd_sched.ints).map_err(device_err)?;
        // SAFETY: (q, k, v, d_o, lse, delta, dq, sched, scale_log2, scale) as declared; the
        // forward schedule bounds every row as in the forward.
        let dq_kernel = unsafe {
            gpu.typed_kernel::<(
                DeviceView<'_, T>,
                DeviceView<'_, T>,
                DeviceView<'_, T>,
                DeviceView<'_, T>,
                DeviceView<'_, f32>,
                &DeviceBuffer<f32>,
                DeviceViewMut<'_, T>,
                &DeviceBuffer<i32>,
                f32,
                f32,
            )>(&KERNEL, entry(&format!("squid_flash_bwd_dq_dk{dk}_dv{dv}_{sfx}"))?)
        }
        .map_err(device_err)?;
        let launch = LaunchDims {
            grid: (fwd_sched.items as u32, hq as u32, flash::dq_passes(dk)),
            block: (2 * flash::dq_tile_m(dk) as u32, 1, 1),
            shared_bytes: 0,
        };
        dq_kernel
            .launch(gpu, launch, (x.q, x.k, x.v, x.d_o, x.lse, &delta, dq, &ints, scale_log2, scale))
            .map_err(device_err)?;
    }
    Ok(())
}

/// Checks the lengths (and, with `check_finite`, the values) of a backward's extra inputs.
pub(crate) fn validate_backward_device<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    dims: Dims,
    x: &BackwardInputs<'_, T>,
) -> Result<(), Error> {
    let h = cfg.heads;
    let o_len = dims.total_q * h.num_q_heads * h.head_dim_v;
    expect_len("o", x.o.len(), o_len, "[total_q, HQ, Dv]")?;
    expect_len("d_o", x.d_o.len(), o_len, "[total_q, HQ, Dv]")?;
    expect_len("lse", x.lse.len(), dims.total_q * h.num_q_heads, "[HQ, total_q]")?;
    flash::backward_key_tile(h.head_dim_k, h.head_dim_v)?;
    if cfg.check_finite {
        check_finite_device(gpu, "d_o", &x.d_o)?;
        check_finite_device(gpu, "o", &x.o)?;
    }
    Ok(())
}

/// Allocates the gradients of a backward on `gpu`'s stream and runs `run` into them.
pub(crate) fn alloc_grads<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    dims: Dims,
    run: impl FnOnce(DeviceGradsMut<'_, T>) -> Result<(), Error>,
) -> Result<DeviceGrads<T>, Error> {
    let h = cfg.heads;
    let mut dq = gpu.zeros::<T>(dims.total_q * h.num_q_heads * h.head_dim_k).map_err(device_err)?;
    let mut dk = gpu.zeros::<T>(dims.total_k * h.num_kv_heads * h.head_dim_k).map_err(device_err)?;
    let mut dv = gpu.zeros::<T>(dims.total_k * h.num_kv_heads * h.head_dim_v).map_err(device_err)?;
    run(DeviceGradsMut { dq: dq.view_mut(), dk: dk.view_mut(), dv: dv.view_mut() })?;
    Ok(DeviceGrads { dq, dk, dv })
}

/// Attention backward on the device into the caller's gradients, as [`super::backward`]:
/// recomputes the probabilities from `lse` and writes `dq, dk, dv` (dK/dV summed over each GQA
/// group). `mode` picks how dQ is summed.
pub fn backward_into<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    x: BackwardInputs<'_, T>,
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
    mode: DqMode,
    grads: DeviceGradsMut<'_, T>,
) -> Result<(), Error> {
    let dims = validate_device(gpu, cfg, &x.q, &x.k, &x.v, cu_seqlens_q, cu_seqlens_k)?;
    validate_backward_device(gpu, cfg, dims, &x)?;
    let h = cfg.heads;
    let kmask = KernelMask { causal: cfg.causal, window: cfg.window, row_lo: false };
    let tile_n = flash::backward_key_tile(h.head_dim_k, h.head_dim_v)?;
    let atomic = mode == DqMode::Atomic;
    let keys =
        flash::key_schedule(cfg, kmask, h.num_q_heads, h.num_kv_heads, tile_n, cu_seqlens_q, cu_seqlens_k, atomic)?;
    let dq_tile = flash::dq_tile_m(h.head_dim_k);
    let fwd = if atomic { Schedule::empty() } else { dense_schedule(cfg, cu_seqlens_q, cu_seqlens_k, dq_tile)? };
    backward_scheduled(gpu, cfg, dims, &fwd, &keys, x, mode, grads)
}

/// Attention backward on the device, as [`backward_into`] with the gradients allocated on
/// `gpu`'s stream.
pub fn backward<T: Element + DeviceCopy>(
    gpu: &Gpu,
    cfg: &DenseConfig,
    x: BackwardInputs<'_, T>,
    cu_seqlens_q: &[u32],
    cu_seqlens_k: &[u32],
    mode: DqMode,
) -> Result<DeviceGrads<T>, Error> {
    let dims = validate_lens(cfg, x.q.len(), x.k.len(), x.v.len(), cu_seqlens_q, cu_seqlens_k)?;
    alloc_grads(gpu, cfg, dims, |g| backward_into(gpu, cfg, x, cu_seqlens_q, cu_seqlens_k, mode, g))
}

/// Whether the mask `m` and the kernel's own row ranges agree on every row (a debug check of
/// the pairing the schedule relies on).
#[cfg(test)]
pub(crate) fn mask_matches_kernel<M: super::cpu::Mask>(m: &M, km: KernelMask, cu_q: &[u32], cu_k: &[u32]) -> bool {
    (0..cu_q.len() - 1).all(|s| {
        let tq = (cu_q[s + 1] - cu_q[s]) as usize;
        let tk = (cu_k[s + 1] - cu_k[s]) as usize;
        (0..tq).all(|i| {
            let (lo, hi) = m.range(s, i, tq, tk);
            let p = i as i64 + tk as i64 - tq as i64;
            let khi = if km.causal { (p + 1).clamp(0, tk as i64) } else { tk as i64 };
            let mut klo = km.window.map_or(0, |w| (p - w as i64 + 1).clamp(0, tk as i64));
            if km.row_lo {
                klo = klo.max(lo as i64);
            }
            let kernel_empty = klo >= khi;
            (lo >= hi && kernel_empty) || (lo as i64 == klo && hi as i64 == khi)
        })
    })
}
