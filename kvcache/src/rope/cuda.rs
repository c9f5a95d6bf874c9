//! RoPE on the device: [`DeviceRope`] (forward and backward against cos/sin tables held on the
//! device) and [`reposition`], launching `rope.cu`. The tensors rotated in place are
//! [`DeviceViewMut`]s: a `&mut DeviceBuffer`, or a caller's `CudaSlice` / `CudaViewMut` (or a
//! sub-range of one) on the stream of the [`Gpu`] given, rotated there with no copy.
//!
//! The tables are the CPU path's: angles in f64, cos and sin rounded once to f32 on the host and
//! uploaded (a model's rotary cache, `[positions, rotary_dim / 2]` floats each). The kernel
//! rounds each product and the sum separately as the CPU path does, so a device result is bit
//! for bit the CPU's for every storage type (the tests hold it to that).

use half::{bf16, f16};
use squid_cuda::launch::{DeviceBuffer, DeviceCopy, DeviceViewMut, Gpu, LaunchDims};
use squid_cuda::Element;

use super::{cpu, Rope, RopeLayout, KERNEL};
use crate::Error;

/// Threads per block of both entries.
const THREADS: u32 = 256;
/// Grid cap: the kernels are grid-stride loops.
const MAX_BLOCKS: u32 = 4096;

/// A storage type the RoPE kernels are compiled for, with its entry points.
pub trait RopeElement: Element + DeviceCopy {
    /// Entry rotating token `t` by table row `positions[t]`.
    const ROTATE: &'static str;
    /// Entry rotating every token by table row 0.
    const SHIFT: &'static str;
}

impl RopeElement for f32 {
    const ROTATE: &'static str = "squid_rope_f32";
    const SHIFT: &'static str = "squid_rope_shift_f32";
}
impl RopeElement for bf16 {
    const ROTATE: &'static str = "squid_rope_bf16";
    const SHIFT: &'static str = "squid_rope_shift_bf16";
}
impl RopeElement for f16 {
    const ROTATE: &'static str = "squid_rope_f16";
    const SHIFT: &'static str = "squid_rope_shift_f16";
}

/// A [`Rope`] with cos/sin tables for positions `0..positions` on one device.
#[derive(Debug)]
pub struct DeviceRope {
    rope: Rope,
    positions: usize,
    cos: DeviceBuffer<f32>,
    sin: DeviceBuffer<f32>,
}

/// The dims of one launch, checked against the buffer.
struct Dims {
    tokens: usize,
    heads: i32,
    head_dim: i32,
    half: i32,
    interleaved: i32,
}

fn dims(rope: &Rope, len: usize, heads: usize) -> Result<Dims, Error> {
    let tokens = rope.tokens_of(len, heads)?;
    let cfg = rope.config();
    let int = |v: usize, what: &str| {
        i32::try_from(v).map_err(|_| Error::InvalidConfig(format!("rope: {what} = {v} exceeds the kernel's i32")))
    };
    Ok(Dims {
        tokens,
        heads: int(heads, "heads")?,
        head_dim: int(cfg.head_dim, "head_dim")?,
        half: int(cfg.rotary_dim / 2, "rotary_dim / 2")?,
        interleaved: i32::from(cfg.layout == RopeLayout::Interleaved),
    })
}

fn launch_dims(d: &Dims) -> LaunchDims {
    LaunchDims::linear(d.tokens * d.heads as usize * d.half as usize, THREADS, MAX_BLOCKS)
}

impl DeviceRope {
    /// Uploads `rope`'s tables for positions `0..positions` (`positions * rotary_dim * 4` bytes),
    /// computed exactly as [`Rope::with_cached_positions`] computes them.
    pub fn new(gpu: &Gpu, rope: &Rope, positions: usize) -> Result<Self, Error> {
        let half = rope.config().rotary_dim / 2;
        let len = positions.max(1) * half;
        let (mut cos, mut sin) = (vec![0f32; len], vec![0f32; len]);
        for (p, (c, s)) in cos.chunks_exact_mut(half).zip(sin.chunks_exact_mut(half)).enumerate().take(positions) {
            cpu::fill_table(rope, p as f64, 1.0, c, s);
        }
        Ok(Self { rope: rope.clone(), positions, cos: gpu.upload(&cos)?, sin: gpu.upload(&sin)? })
    }

    /// The positions that have tables: `0..positions()`.
    pub fn positions(&self) -> usize {
        self.positions
    }

    /// The rotation it applies.
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// Rotates `x: [positions.len(), heads, head_dim]` in place, token `t` to `positions[t]`, as
    /// [`Rope::forward`]. A position without a table is [`Error::OutOfRange`].
    pub fn forward<'a, T: RopeElement>(
        &self,
        gpu: &Gpu,
        x: impl Into<DeviceViewMut<'a, T>>,
        heads: usize,
        positions: &[u64],
    ) -> Result<(), Error> {
        self.rotate(gpu, x.into(), heads, positions, 1.0)
    }

    /// Backward of [`DeviceRope::forward`] in place (`dL/dy` into `dL/dx`), as [`Rope::backward`].
    pub fn backward<'a, T: RopeElement>(
        &self,
        gpu: &Gpu,
        grad: impl Into<DeviceViewMut<'a, T>>,
        heads: usize,
        positions: &[u64],
    ) -> Result<(), Error> {
        self.rotate(gpu, grad.into(), heads, positions, -1.0)
    }

    fn rotate<T: RopeElement>(
        &self,
        gpu: &Gpu,
        x: DeviceViewMut<'_, T>,
        heads: usize,
        positions: &[u64],
        sin_sign: f32,
    ) -> Result<(), Error> {
        self.rope.check(x.len(), heads, positions.len())?;
        let d = dims(&self.rope, x.len(), heads)?;
        if d.tokens == 0 {
            return Ok(());
        }
        let rows = positions
            .iter()
            .enumerate()
            .map(|(t, &p)| match u32::try_from(p) {
                Ok(r) if (r as usize) < self.positions => Ok(r),
                _ => Err(Error::OutOfRange(format!(
                    "rope: token {t} is at position {p} but the device tables cover 0..{}",
                    self.positions
                ))),
            })
            .collect::<Result<Vec<u32>, Error>>()?;
        let rows = gpu.upload(&rows)?;
        // SAFETY: the entry is (T* x, const unsigned* positions, const float* cos, const float*
        // sin, long long tokens, int heads, int head_dim, int half, int interleaved, float
        // sin_sign). It touches x only at [t, h, d] with t < tokens, h < heads, d < rotary_dim
        // <= head_dim (x holds tokens * heads * head_dim elements, checked above), reads
        // positions[t] for t < tokens (uploaded, one per token) and table rows that were
        // checked to be below `self.positions` (each table holds positions * half floats).
        let kernel = unsafe {
            gpu.typed_kernel::<(
                DeviceViewMut<'_, T>,
                &DeviceBuffer<u32>,
                &DeviceBuffer<f32>,
                &DeviceBuffer<f32>,
                i64,
                i32,
                i32,
                i32,
                i32,
                f32,
            )>(&KERNEL, T::ROTATE)
        }?;
        let args =
            (x, &rows, &self.cos, &self.sin, d.tokens as i64, d.heads, d.head_dim, d.half, d.interleaved, sin_sign);
        Ok(kernel.launch(gpu, launch_dims(&d), args)?)
    }
}

/// Moves keys `k: [tokens, heads, head_dim]` on the device, rotated for positions `from, from +
/// 1, ...`, to `to, to + 1, ...` in place: one rotation by `(to - from) * theta` per pair, the
/// same bits as [`Rope::reposition`] on the host.
pub fn reposition<'a, T: RopeElement>(
    gpu: &Gpu,
    rope: &Rope,
    k: impl Into<DeviceViewMut<'a, T>>,
    heads: usize,
    from: u64,
    to: u64,
) -> Result<(), Error> {
    let k = k.into();
    let d = dims(rope, k.len(), heads)?;
    if d.tokens == 0 || from == to {
        return Ok(()); // as the CPU path: a zero shift leaves the bits alone
    }
    let half = d.half as usize;
    let (mut cos, mut sin) = (vec![0f32; half], vec![0f32; half]);
    cpu::fill_table(rope, (to as i128 - from as i128) as f64, 1.0, &mut cos, &mut sin);
    let (cos, sin) = (gpu.upload(&cos)?, gpu.upload(&sin)?);
    // SAFETY: the entry is (T* x, const float* cos, const float* sin, long long tokens, int
    // heads, int head_dim, int half, int interleaved); it touches x only inside [tokens, heads,
    // head_dim] (checked by `dims`) and reads table row 0 (`half` floats each).
    let kernel = unsafe {
        gpu.typed_kernel::<(DeviceViewMut<'_, T>, &DeviceBuffer<f32>, &DeviceBuffer<f32>, i64, i32, i32, i32, i32)>(
            &KERNEL,
            T::SHIFT,
        )
    }?;
    let args = (k, &cos, &sin, d.tokens as i64, d.heads, d.head_dim, d.half, d.interleaved);
    Ok(kernel.launch(gpu, launch_dims(&d), args)?)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::rope::RopeConfig;

    struct Rng(u64);
    impl Rng {
        fn next_u64(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn vec<T: Element>(&mut self, n: usize) -> Vec<T> {
            (0..n).map(|_| T::from_f32((self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0)).collect()
        }
    }

    /// Forward, backward and reposition on the device against the CPU op, bit for bit.
    fn check<T: RopeElement>(gpu: &Gpu, cfg: RopeConfig, tokens: usize, heads: usize, seed: u64) {
        let rope = Rope::new(cfg).unwrap();
        let table = 300;
        let device = DeviceRope::new(gpu, &rope, table).unwrap();
        let mut rng = Rng(seed | 1);
        let x: Vec<T> = rng.vec(tokens * heads * cfg.head_dim);
        let positions: Vec<u64> = (0..tokens).map(|_| rng.next_u64() % table as u64).collect();
        let name = format!("{:?} {cfg:?} tokens {tokens} heads {heads}", T::DTYPE);

        let mut want = x.clone();
        rope.forward(&mut want, heads, &positions).unwrap();
        let mut buf = gpu.upload(&x).unwrap();
        device.forward(gpu, &mut buf, heads, &positions).unwrap();
        assert_eq!(gpu.download(&buf).unwrap(), want, "forward, {name}");

        let mut want = x.clone();
        rope.backward(&mut want, heads, &positions).unwrap();
        let mut buf = gpu.upload(&x).unwrap();
        device.backward(gpu, &mut buf, heads, &positions).unwrap();
        assert_eq!(gpu.download(&buf).unwrap(), want, "backward, {name}");

        let (from, to) = (rng.next_u64() % 5000, rng.next_u64() % 2_000_000);
        let mut want = x.clone();
        rope.reposition(&mut want, heads, from, to).unwrap();
        let mut buf = gpu.upload(&x).unwrap();
        reposition(gpu, &rope, &mut buf, heads, from, to).unwrap();
        assert_eq!(gpu.download(&buf).unwrap(), want, "reposition {from} -> {to}, {name}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(6))]
        /// Both layouts, partial rotary dims and odd head dims (an unrotated tail), several heads.
        #[test]
        fn device_rope_is_the_cpu_rope_bit_for_bit(half in 1usize..=12, extra in 0usize..5, interleaved in any::<bool>(),
                                                    tokens in 1usize..20, heads in 1usize..4, seed in any::<u64>()) {
            let Some(gpu) = squid_cuda::testing::test_device() else { return Ok(()) };
            let cfg = RopeConfig {
                head_dim: 2 * half + extra,
                rotary_dim: 2 * half,
                base: 10_000.0,
                position_scale: if extra % 2 == 0 { 1.0 } else { 0.25 },
                layout: if interleaved { RopeLayout::Interleaved } else { RopeLayout::RotateHalf },
            };
            check::<f32>(&gpu, cfg, tokens, heads, seed);
            check::<bf16>(&gpu, cfg, tokens, heads, seed);
            check::<f16>(&gpu, cfg, tokens, heads, seed);
        }
    }

    /// A 128-dim head (the common model shape) at large positions, both layouts.
    #[test]
    fn head_dim_128_both_layouts() {
        let Some(gpu) = squid_cuda::testing::test_device() else { return };
        for layout in [RopeLayout::RotateHalf, RopeLayout::Interleaved] {
            let cfg = RopeConfig { layout, base: 500_000.0, ..RopeConfig::new(128) };
            check::<bf16>(&gpu, cfg, 3, 2, 7);
        }
    }

    /// On a caller's stream (`Gpu::from_stream` over a `SimStream`) and memory: the rotated
    /// tensor is a sub-range, at a non-zero offset, of a `SimSlice` allocated on that stream;
    /// forward, backward and reposition give the CPU op's bits there and leave the elements
    /// around the view alone.
    #[test]
    fn caller_stream_views_at_offsets_are_the_cpu_rope() {
        if !squid_cuda::testing::nvrtc_available() {
            return;
        }
        use squid_cuda::launch::{DeviceViewMut, SimStream};
        let stream = SimStream::new();
        let gpu = Gpu::from_stream(&stream).unwrap();
        let cfg = RopeConfig { rotary_dim: 12, ..RopeConfig::new(16) };
        let rope = Rope::new(cfg).unwrap();
        let device = DeviceRope::new(&gpu, &rope, 64).unwrap();
        let (tokens, heads, pad) = (5usize, 3usize, 10usize);
        let x: Vec<bf16> = Rng(9).vec(tokens * heads * cfg.head_dim);
        let positions: Vec<u64> = (0..tokens as u64).map(|t| 7 * t + 3).collect();
        let sentinel = bf16::from_f32(7.0);
        let mut host = vec![sentinel; pad];
        host.extend_from_slice(&x);
        host.extend(vec![sentinel; pad]);
        type Step<'a> = &'a dyn Fn(&mut Vec<bf16>, DeviceViewMut<'_, bf16>);
        let steps: [(&str, Step<'_>); 3] = [
            ("forward", &|w, v| {
                rope.forward(w, heads, &positions).unwrap();
                device.forward(&gpu, v, heads, &positions).unwrap();
            }),
            ("backward", &|w, v| {
                rope.backward(w, heads, &positions).unwrap();
                device.backward(&gpu, v, heads, &positions).unwrap();
            }),
            ("reposition", &|w, v| {
                rope.reposition(w, heads, 40, 1000).unwrap();
                reposition(&gpu, &rope, v, heads, 40, 1000).unwrap();
            }),
        ];
        for (name, step) in steps {
            let mut slice = stream.clone_htod(&host);
            let mut want = x.clone();
            {
                let mut all = DeviceViewMut::from(&mut slice);
                step(&mut want, all.slice_mut(pad..pad + x.len()).unwrap());
            }
            let got = stream.clone_dtoh(&slice).unwrap();
            assert_eq!(got[pad..pad + x.len()], want[..], "{name}");
            assert!(got[..pad].iter().chain(&got[pad + x.len()..]).all(|&e| e == sentinel), "{name} wrote outside");
        }
    }

    #[test]
    fn bad_input_is_a_typed_error() {
        let Some(gpu) = squid_cuda::testing::test_device() else { return };
        let rope = Rope::new(RopeConfig::new(8)).unwrap();
        let device = DeviceRope::new(&gpu, &rope, 4).unwrap();
        let mut x = gpu.upload(&[1.0f32; 16]).unwrap();
        let err = device.forward(&gpu, &mut x, 1, &[0, 4]).unwrap_err();
        assert!(matches!(err, Error::OutOfRange(_)), "{err}");
        let err = device.forward(&gpu, &mut x, 1, &[0]).unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch(_)), "{err}");
        let err = reposition(&gpu, &rope, &mut x, 3, 0, 1).unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch(_)), "{err}");
        // Nothing was written by the refused calls.
        assert_eq!(gpu.download(&x).unwrap(), vec![1.0f32; 16]);
    }
}
