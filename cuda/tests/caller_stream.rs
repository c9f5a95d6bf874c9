//! Launching on a caller's stream and memory (`Gpu::from_stream`, `DeviceView`,
//! `DeviceViewMut`), on the simulator's stand-ins: a `SimStream` plays the framework's
//! `Arc<CudaStream>` and `SimSlice`s its `CudaSlice`s. The same kernels through a squid-made
//! `Gpu` with `DeviceBuffer`s and through the caller's stream give identical results; modules
//! are loaded once per device; memory of another device, out-of-range sub-views and bad raw
//! pointers are typed errors. These run wherever NVRTC is (no GPU needed).
#![cfg(feature = "cuda")]

use half::bf16;
use squid_cuda::launch::{DeviceBuffer, DeviceView, DeviceViewMut, Gpu, LaunchDims, SimStream};
use squid_cuda::ops::gemm::{self, GemmShape};
use squid_cuda::ops::{axpy, logsumexp, softmax};
use squid_cuda::testing::nvrtc_available;
use squid_cuda::Error;

/// Deterministic values in [-scale/2, scale/2).
fn data(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
        })
        .collect()
}

/// Small integers: every bf16 product and f32 sum of the GEMMs below is exact.
fn small_ints(n: usize, seed: usize) -> Vec<bf16> {
    (0..n).map(|i| bf16::from_f32(((i * 7 + seed * 3) % 9) as f32 - 4.0)).collect()
}

/// A squid-made simulator and a caller's simulated stream with a `Gpu` over it.
fn both() -> Option<(Gpu, SimStream, Gpu)> {
    if !nvrtc_available() {
        return None;
    }
    let own = Gpu::simulator().expect("NVRTC is available");
    let stream = SimStream::new();
    let callers = Gpu::from_stream(&stream).expect("NVRTC is available");
    Some((own, stream, callers))
}

#[test]
fn the_same_kernels_through_gpu_and_a_callers_stream_agree_bit_for_bit() {
    let Some((own, stream, gpu)) = both() else { return };
    assert!(gpu.is_simulated() && gpu.stream().is_none());

    for (i, n) in [1usize, 33, 1000].into_iter().enumerate() {
        let (x, y0) = (data(n, i as u64, 4.0), data(n, 10 + i as u64, 4.0));
        let (bx, mut by) = (own.upload(&x).unwrap(), own.upload(&y0).unwrap());
        axpy::cuda::axpy_f32(&own, 1.5, &bx, &mut by).unwrap();
        let (sx, mut sy) = (stream.clone_htod(&x), stream.clone_htod(&y0));
        axpy::cuda::axpy_f32(&gpu, 1.5, &sx, &mut sy).unwrap();
        let theirs = stream.clone_dtoh(&sy).unwrap();
        assert_eq!(own.download(&by).unwrap(), theirs, "axpy_f32 n={n}");
        let mut cpu = y0.clone();
        axpy::cpu(1.5, &x, &mut cpu).unwrap();
        assert_eq!(theirs, cpu, "axpy_f32 n={n} against the CPU path");

        let (xb, yb): (Vec<bf16>, Vec<bf16>) =
            (x.iter().map(|&v| bf16::from_f32(v)).collect(), y0.iter().map(|&v| bf16::from_f32(v)).collect());
        let mut by = own.upload(&yb).unwrap();
        axpy::cuda::axpy_bf16(&own, -0.5, &own.upload(&xb).unwrap(), &mut by).unwrap();
        let mut sy = stream.clone_htod(&yb);
        axpy::cuda::axpy_bf16(&gpu, -0.5, &stream.clone_htod(&xb), &mut sy).unwrap();
        assert_eq!(own.download(&by).unwrap(), stream.clone_dtoh(&sy).unwrap(), "axpy_bf16 n={n}");
    }

    for (i, (rows, cols)) in [(1usize, 1usize), (3, 37), (2, 1030)].into_iter().enumerate() {
        let x = data(rows * cols, 20 + i as u64, 8.0);
        let mut by = own.zeros::<f32>(rows * cols).unwrap();
        softmax::cuda::softmax_f32(&own, &own.upload(&x).unwrap(), &mut by, cols).unwrap();
        let mut sy = stream.alloc_zeros::<f32>(rows * cols);
        softmax::cuda::softmax_f32(&gpu, &stream.clone_htod(&x), &mut sy, cols).unwrap();
        assert_eq!(own.download(&by).unwrap(), stream.clone_dtoh(&sy).unwrap(), "softmax {rows}x{cols}");

        let mut bo = own.zeros::<f32>(rows).unwrap();
        logsumexp::cuda::logsumexp_f32(&own, &own.upload(&x).unwrap(), &mut bo, cols, 0.5).unwrap();
        let mut so = stream.alloc_zeros::<f32>(rows);
        logsumexp::cuda::logsumexp_f32(&gpu, &stream.clone_htod(&x), &mut so, cols, 0.5).unwrap();
        assert_eq!(own.download(&bo).unwrap(), stream.clone_dtoh(&so).unwrap(), "logsumexp {rows}x{cols}");
    }

    for (i, shape) in [GemmShape { m: 1, n: 1, k: 1 }, GemmShape { m: 17, n: 9, k: 23 }].into_iter().enumerate() {
        let (a, b) = (small_ints(shape.m * shape.k, i), small_ints(shape.k * shape.n, i + 5));
        let mut bc = own.zeros::<f32>(shape.m * shape.n).unwrap();
        gemm::cuda::gemm_bf16(&own, shape, &own.upload(&a).unwrap(), &own.upload(&b).unwrap(), &mut bc).unwrap();
        let mut sc = stream.alloc_zeros::<f32>(shape.m * shape.n);
        gemm::cuda::gemm_bf16(&gpu, shape, &stream.clone_htod(&a), &stream.clone_htod(&b), &mut sc).unwrap();
        let theirs = stream.clone_dtoh(&sc).unwrap();
        assert_eq!(own.download(&bc).unwrap(), theirs, "gemm {shape:?}");
        let mut want = vec![0.0f32; shape.m * shape.n];
        gemm::naive(shape, &a, &b, &mut want).unwrap();
        assert_eq!(theirs, want, "gemm {shape:?} against the reference");
    }
}

#[test]
fn every_gpu_on_a_stream_shares_its_memory_and_its_modules() {
    if !nvrtc_available() {
        return;
    }
    let stream = SimStream::new();
    let (first, second) = (Gpu::from_stream(&stream).unwrap(), Gpu::from_stream(stream.clone()).unwrap());
    assert_eq!(stream.loaded_modules(), 0);
    // A buffer made through one `Gpu` and a kernel loaded through it work through the other.
    let x = first.upload(&[1.0f32, 2.0, 3.0]).unwrap();
    let mut y = second.zeros::<f32>(3).unwrap();
    // SAFETY: (long long n, float a, const float* x, float* y), as axpy.cu defines it.
    let kernel = unsafe {
        first.typed_kernel::<(i64, f32, &DeviceBuffer<f32>, &mut DeviceBuffer<f32>)>(&axpy::KERNEL, "squid_axpy_f32")
    }
    .unwrap();
    kernel.launch(&second, LaunchDims::linear(3, 32, 1), (3, 2.0, &x, &mut y)).unwrap();
    assert_eq!(second.download(&y).unwrap(), [2.0, 4.0, 6.0]);
    assert_eq!(first.download(&y).unwrap(), [2.0, 4.0, 6.0]);
    axpy::cuda::axpy_f32(&second, 1.0, &x, &mut y).unwrap();
    assert_eq!(stream.loaded_modules(), 1, "the module is loaded once for both");
    softmax::cuda::softmax_f32(&first, &x, &mut y, 3).unwrap();
    assert_eq!(stream.loaded_modules(), 2);

    // A `Gpu` of another device refuses this one's memory and kernels, whatever their form.
    let other = SimStream::new();
    let elsewhere = Gpu::from_stream(&other).unwrap();
    let mut theirs = other.alloc_zeros::<f32>(3);
    let mine = stream.clone_htod(&[1.0f32; 3]);
    assert!(matches!(axpy::cuda::axpy_f32(&elsewhere, 1.0, &mine, &mut theirs), Err(Error::Launch { .. })));
    assert!(matches!(axpy::cuda::axpy_f32(&elsewhere, 1.0, &x, &mut theirs), Err(Error::Launch { .. })));
    let k = unsafe {
        // SAFETY: as above.
        first.typed_kernel::<(i64, f32, &squid_cuda::launch::SimSlice<f32>, &mut squid_cuda::launch::SimSlice<f32>)>(
            &axpy::KERNEL,
            "squid_axpy_f32",
        )
    }
    .unwrap();
    let theirs_x = other.clone_htod(&[1.0f32; 3]);
    assert!(matches!(
        k.launch(&elsewhere, LaunchDims::linear(3, 32, 1), (3, 1.0, &theirs_x, &mut theirs)),
        Err(Error::Launch { .. })
    ));
    assert!(other.clone_dtoh(&mine).is_err());
    assert_eq!(other.clone_dtoh(&theirs).unwrap(), [0.0; 3], "nothing was written");
}

#[test]
fn sub_views_launch_on_their_range_only_and_out_of_range_is_an_error() {
    let Some((_, stream, gpu)) = both() else { return };
    let n = 50;
    let (x, y0) = (data(n, 1, 2.0), data(n, 2, 2.0));
    let sx = stream.clone_htod(&x);
    let mut sy = stream.clone_htod(&y0);
    {
        let xv = DeviceView::from(&sx).slice(3..n - 2).unwrap();
        let mut yv = DeviceViewMut::from(&mut sy);
        let yv = yv.slice_mut(3..n - 2).unwrap();
        assert_eq!((xv.len(), yv.len()), (n - 5, n - 5));
        axpy::cuda::axpy_f32(&gpu, 3.0, xv, yv).unwrap();
    }
    let mut want = y0.clone();
    axpy::cpu(3.0, &x[3..n - 2], &mut want[3..n - 2]).unwrap();
    assert_eq!(stream.clone_dtoh(&sy).unwrap(), want, "only elements 3..n-2 change");

    let view = DeviceView::from(&sx);
    for bad in [view.slice(0..n + 1), view.slice(n + 1..), view.slice(5..n + 3)] {
        assert!(matches!(bad, Err(Error::Launch { .. })), "{bad:?}");
    }
    let nested = view.slice(10..20).unwrap();
    assert!(nested.slice(..11).is_err());
    assert_eq!(nested.slice(2..=4).unwrap().len(), 3);
    let mut yv = DeviceViewMut::from(&mut sy);
    assert!(matches!(yv.slice_mut(..n + 1), Err(Error::Launch { .. })));
    assert!(matches!(
        axpy::cuda::axpy_f32(&gpu, 1.0, view.slice(..4).unwrap(), yv.slice_mut(..5).unwrap()),
        Err(Error::Launch { .. })
    ));
}

/// A view two bytes into an allocation is not 16-byte aligned: the GEMM must take its
/// element-by-element path there (the simulator faults a misaligned 16-byte `cp.async`).
#[test]
fn gemm_on_views_at_odd_offsets_matches_the_reference() {
    let Some((_, stream, gpu)) = both() else { return };
    let shape = GemmShape { m: 16, n: 16, k: 16 };
    let (a, b) = (small_ints(1 + shape.m * shape.k, 1), small_ints(shape.k * shape.n + 3, 2));
    let (sa, sb) = (stream.clone_htod(&a), stream.clone_htod(&b));
    let mut sc = stream.alloc_zeros::<f32>(shape.m * shape.n + 1);
    let av = DeviceView::from(&sa).slice(1..).unwrap();
    let bv = DeviceView::from(&sb).slice(..shape.k * shape.n).unwrap();
    let mut cv = DeviceViewMut::from(&mut sc);
    gemm::cuda::gemm_bf16(&gpu, shape, av, bv, cv.slice_mut(1..).unwrap()).unwrap();
    let mut want = vec![0.0f32; shape.m * shape.n];
    gemm::naive(shape, &a[1..], &b[..shape.k * shape.n], &mut want).unwrap();
    let got = stream.clone_dtoh(&sc).unwrap();
    assert_eq!(got[0], 0.0);
    assert_eq!(&got[1..], &want[..]);
}

#[test]
fn raw_pointers_are_checked_before_they_become_views() {
    let Some((_, _, gpu)) = both() else { return };
    let message = |r: Result<DeviceView<'_, f32>, Error>| match r {
        Err(Error::Launch { message, .. }) => message,
        other => panic!("expected a launch error, got {other:?}"),
    };
    // SAFETY (all): every call is refused before the pointer could be used.
    assert!(message(unsafe { DeviceView::<f32>::from_raw(&gpu, 0x1002, 4) }).contains("aligned"));
    assert!(message(unsafe { DeviceView::<f32>::from_raw(&gpu, 0, 4) }).contains("null"));
    assert!(message(unsafe { DeviceView::<f32>::from_raw(&gpu, u64::MAX - 8, 4) }).contains("overflow"));
    assert!(message(unsafe { DeviceView::<f32>::from_raw(&gpu, 0x1000, 4) }).contains("simulator"));
    let raw_mut = unsafe { DeviceViewMut::<bf16>::from_raw(&gpu, 0x1001, 1) };
    assert!(matches!(raw_mut, Err(Error::Launch { ref message, .. }) if message.contains("aligned")), "{raw_mut:?}");
}
