//! The launch API on the simulated device: buffers, typed launches, faults the simulator's
//! sanitizer finds coming back as errors, and buffers or kernels of one device refused on
//! another. These run wherever NVRTC is (no GPU needed).
#![cfg(feature = "cuda")]

use squid_cuda::launch::{DeviceBuffer, Gpu, LaunchDims};
use squid_cuda::ops::axpy;
use squid_cuda::ptxsim::{Error as SimError, FaultKind};
use squid_cuda::testing::{nvrtc_available, test_device};
use squid_cuda::{Error, KernelSource};

fn simulator() -> Option<Gpu> {
    nvrtc_available().then(|| Gpu::simulator().expect("NVRTC is available"))
}

#[test]
fn buffers_round_trip_and_launches_are_counted() {
    let Some(sim) = simulator() else { return };
    assert!(sim.is_simulated());
    assert_eq!(sim.info().arch, squid_cuda::launch::SIM_ARCH);
    let x = sim.upload(&[1.0f32, 2.0, 3.0]).unwrap();
    let mut y = sim.zeros::<f32>(3).unwrap();
    assert_eq!((x.len(), y.len(), sim.zeros::<f32>(0).unwrap().is_empty()), (3, 3, true));
    assert_eq!(sim.download(&y).unwrap(), [0.0; 3]);
    assert_eq!(sim.simulated_work().unwrap().0, 0);
    axpy::cuda::axpy_f32(&sim, 2.0, &x, &mut y).unwrap();
    sim.synchronize().unwrap();
    assert_eq!(sim.download(&y).unwrap(), [2.0, 4.0, 6.0]);
    assert!(sim.simulated_work().unwrap().0 > 0);
}

/// Writes one element past the end of `y` from thread 0.
static OVERRUN: KernelSource = KernelSource {
    name: "test_overrun",
    crate_name: "squid-cuda",
    path: "tests/overrun.cu",
    source: "extern \"C\" __global__ void test_overrun(float* y, long long n) {\n    \
             if (threadIdx.x == 0) y[n] = 1.0f;\n}\n",
    entries: &["test_overrun"],
    fast_math: false,
};

#[test]
fn an_out_of_bounds_write_is_an_error_naming_the_kernel() {
    let Some(sim) = simulator() else { return };
    let mut y = sim.zeros::<f32>(4).unwrap();
    let launch = |y: &mut DeviceBuffer<f32>, n: i64| {
        // SAFETY: the signature matches; the kernel writes out of bounds on purpose, which the
        // simulator (the only device this test uses) checks for and refuses.
        let k = unsafe { sim.typed_kernel::<(&mut DeviceBuffer<f32>, i64)>(&OVERRUN, "test_overrun") }?;
        k.launch(&sim, LaunchDims::linear(1, 32, 1), (y, n))
    };
    launch(&mut y, 3).unwrap();
    assert_eq!(sim.download(&y).unwrap(), [0.0, 0.0, 0.0, 1.0]);
    match launch(&mut y, 4) {
        Err(Error::Simulated(SimError::Fault(f))) => {
            assert_eq!(f.kernel, "test_overrun");
            assert_eq!(f.thread, [0, 0, 0]);
            assert!(matches!(f.kind, FaultKind::OutOfBounds { write: true, .. }), "{f}");
        }
        other => panic!("expected an out-of-bounds fault, got {other:?}"),
    }
}

#[test]
fn buffers_and_kernels_stay_on_their_device() {
    let (Some(a), Some(b)) = (simulator(), simulator()) else { return };
    let x = a.upload(&[1.0f32; 8]).unwrap();
    let mut y = b.zeros::<f32>(8).unwrap();
    assert!(matches!(axpy::cuda::axpy_f32(&b, 1.0, &x, &mut y), Err(Error::Launch { .. })));
    assert!(matches!(b.download(&x), Err(Error::Launch { .. })));
    // SAFETY: (long long n, float a, const float* x, float* y), as axpy.cu defines it.
    let k = unsafe {
        a.typed_kernel::<(i64, f32, &DeviceBuffer<f32>, &mut DeviceBuffer<f32>)>(&axpy::KERNEL, "squid_axpy_f32")
    }
    .unwrap();
    let x_b = b.upload(&[1.0f32; 8]).unwrap();
    assert!(matches!(k.launch(&b, LaunchDims::linear(8, 32, 1), (8, 1.0, &x_b, &mut y)), Err(Error::Launch { .. })));
    assert_eq!(b.download(&y).unwrap(), [0.0; 8]);
}

#[test]
fn the_test_device_is_a_gpu_when_present_else_the_simulator() {
    let Some(device) = test_device() else { return };
    let gpu_present = squid_cuda::Device::discover().is_ok();
    let forced = std::env::var(squid_cuda::testing::TEST_DEVICE_ENV).unwrap_or_default();
    match forced.as_str() {
        "sim" => assert!(device.is_simulated()),
        "gpu" => assert!(!device.is_simulated()),
        _ => assert_eq!(device.is_simulated(), !gpu_present, "{:?}", device.info()),
    }
    println!("test device: {}", device.info().name);
}

#[test]
fn a_profiling_simulator_reports_the_last_launch() {
    use squid_cuda::ops::gemm::{self, GemmShape};
    use squid_cuda::ptxsim::{InstClass, Options};
    if !nvrtc_available() {
        return;
    }
    // Off by default.
    let plain = Gpu::simulator().unwrap();
    let x = plain.upload(&[1.0f32]).unwrap();
    let mut y = plain.zeros::<f32>(1).unwrap();
    axpy::cuda::axpy_f32(&plain, 1.0, &x, &mut y).unwrap();
    assert!(plain.last_profile().is_none());
    // A 64^3 bf16 gemm is 64 * 64 * 64 / (16 * 8 * 16) = 128 mma.sync m16n8k16, whatever the
    // kernel's tiling, and one block of 64 x 64.
    let sim = Gpu::simulator_with(Options { profile: true, ..Options::default() }).unwrap();
    let shape = GemmShape { m: 64, n: 64, k: 64 };
    let a = sim.upload(&vec![half::bf16::from_f32(1.0); 64 * 64]).unwrap();
    let b = sim.upload(&vec![half::bf16::from_f32(0.5); 64 * 64]).unwrap();
    let mut c = sim.zeros::<f32>(64 * 64).unwrap();
    gemm::cuda::gemm_bf16(&sim, shape, &a, &b, &mut c).unwrap();
    let p = sim.last_profile().expect("a profile");
    assert_eq!(p.kernel, "squid_gemm_bf16_f32");
    assert_eq!(p.warp_instructions_of(InstClass::Mma), 128);
    assert_eq!(p.tensor_flops, 2 * 64 * 64 * 64);
    assert_eq!((p.unique_bytes_read, p.unique_bytes_written), (2 * 2 * 64 * 64, 4 * 64 * 64));
    assert!(sim.download(&c).unwrap().iter().all(|&v| v == 32.0));
}
