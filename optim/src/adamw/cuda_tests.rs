//! The device AdamW against the CPU [`AdamW`] over several steps, and its refusals, on the test
//! device (the simulator without a GPU).

use half::{bf16, f16};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use squid_cuda::launch::{DeviceBuffer, DeviceCopy, DeviceView, DeviceViewMut, Gpu};
use squid_cuda::testing::test_device;

use super::cuda::DeviceAdamW;
use super::*;

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn views<T>(bufs: &[DeviceBuffer<T>]) -> Vec<DeviceView<'_, T>> {
    bufs.iter().map(|b| b.view()).collect()
}

fn views_mut<T>(bufs: &mut [DeviceBuffer<T>]) -> Vec<DeviceViewMut<'_, T>> {
    bufs.iter_mut().map(|b| b.view_mut()).collect()
}

/// Everything a refused step must leave as it was: parameters, masters, moments.
fn snapshot<T: Element + DeviceCopy>(gpu: &Gpu, opt: &DeviceAdamW, params: &[DeviceBuffer<T>]) -> Vec<Vec<f32>> {
    let mut out: Vec<Vec<f32>> =
        params.iter().map(|p| gpu.download(p).unwrap().iter().map(|x| x.to_f32()).collect()).collect();
    for i in 0..params.len() {
        if let Some(w) = opt.master(i) {
            out.push(gpu.download(w).unwrap());
        }
        let (m, v) = opt.moments(i).unwrap();
        out.push(gpu.download(m).unwrap());
        out.push(gpu.download(v).unwrap());
    }
    out
}

/// Three steps on CPU and device from the same start: masters and moments within 2e-6 of the
/// tensor's largest entry plus 1e-6 relative (the same f32 formula; a GPU may contract a
/// multiply-add into an FMA where the CPU rounds twice), stored parameters within one ulp of their type, reports equal (norm and clip scale to 1e-5).
fn check<T: Element + DeviceCopy, G: Element + DeviceCopy>(gpu: &Gpu, lens: &[usize], config: AdamWConfig, seed: u64) {
    let mut s = seed;
    let mut host: Vec<Vec<T>> = lens.iter().map(|&n| (0..n).map(|_| T::from_f32(lcg(&mut s))).collect()).collect();
    let mut dev: Vec<DeviceBuffer<T>> = host.iter().map(|p| gpu.upload(p).unwrap()).collect();
    let mut cpu = AdamW::new(config, &host.iter().map(|p| &p[..]).collect::<Vec<_>>()).unwrap();
    let mut opt = DeviceAdamW::new(gpu, config, &views(&dev)).unwrap();
    let ulp = match T::DTYPE {
        DType::F32 => 1e-6,
        DType::BF16 => 1.0 / 128.0,
        DType::F16 => 1.0 / 1024.0,
    };
    for step in 0..3 {
        let grads: Vec<Vec<G>> =
            lens.iter().map(|&n| (0..n).map(|_| G::from_f32(lcg(&mut s) * (step + 1) as f32)).collect()).collect();
        let dgrads: Vec<DeviceBuffer<G>> = grads.iter().map(|g| gpu.upload(g).unwrap()).collect();
        let lr = 1e-2 / (step + 1) as f32;
        let want = cpu
            .step(
                &mut host.iter_mut().map(|p| &mut p[..]).collect::<Vec<_>>(),
                &grads.iter().map(|g| &g[..]).collect::<Vec<_>>(),
                lr,
            )
            .unwrap();
        let got = opt.step(gpu, &mut views_mut(&mut dev), &views(&dgrads), lr).unwrap();
        // The device sums squares in f64; the CPU in eight f32 lanes per chunk (relative error up to
        // about n / 8 * 2^-24 of the sum, n <= 1800 here): 1e-5 relative on the norm.
        assert!((got.grad_norm - want.grad_norm).abs() <= 1e-5 * want.grad_norm, "{got:?} vs {want:?}");
        assert_eq!((got.step, got.lr), (want.step, want.lr));
        assert!((got.clip_scale - want.clip_scale).abs() <= 1e-5 * want.clip_scale);
        for (i, (d, h)) in dev.iter().zip(&host).enumerate() {
            let d = gpu.download(d).unwrap();
            // A parameter near 0 can be the cancellation of `p` and `lr * update` as large as the
            // tensor's largest entry (the clip scales may differ in the last bit): a few f32 ulps
            // of that entry besides the storage type's ulp of the value.
            let big = h.iter().fold(0.0f32, |m, b| m.max(b.to_f32().abs()));
            for (j, (a, b)) in d.iter().zip(h).enumerate() {
                let (a, b) = (a.to_f32(), b.to_f32());
                let tol = ulp * (1e-3 + b.abs()) + 4.0 * f32::EPSILON * big;
                assert!((a - b).abs() <= tol, "step {step} tensor {i} param {j}: {a} vs {b}");
            }
            let (m, v) = opt.moments(i).unwrap();
            let (hm, hv) = cpu.moments(i).unwrap();
            let mut pairs = vec![(gpu.download(m).unwrap(), hm.to_vec()), (gpu.download(v).unwrap(), hv.to_vec())];
            if let (Some(dw), Some(hw)) = (opt.master(i), cpu.master(i)) {
                pairs.push((gpu.download(dw).unwrap(), hw.to_vec()));
            }
            for (what, (d, h)) in ["exp_avg", "exp_avg_sq", "master"].iter().zip(pairs) {
                // A moment can be a near-cancellation of terms as large as the tensor's largest
                // entry, and the clip scales may differ in the last bit: 2e-6 of that entry.
                let big = h.iter().fold(0.0f32, |a, b| a.max(b.abs()));
                for (a, b) in d.iter().zip(&h) {
                    assert!((a - b).abs() <= 2e-6 * big + 1e-6 * b.abs(), "step {step} tensor {i}: {what} {a} vs {b}");
                }
            }
        }
    }
}

#[test]
fn generated_steps_match_cpu() {
    let Some(gpu) = test_device() else { return };
    // Tensors of awkward lengths: 1, non-multiples of the block (256), one past the grid cap
    // (1024 blocks is 262144 elements: too slow here, so the cap is exercised by shape, not size).
    let all_lens = [1usize, 3, 255, 257, 600];
    let strategy = (1usize..4, any::<u64>(), 0usize..5, any::<bool>(), any::<bool>());
    let mut runner = TestRunner::new(Config { cases: 12, ..Config::default() });
    runner
        .run(&strategy, |(k, seed, types, amsgrad, clip)| {
            let lens: Vec<usize> = (0..k).map(|i| all_lens[(seed as usize + 3 * i) % all_lens.len()]).collect();
            let config = AdamWConfig { amsgrad, max_grad_norm: clip.then_some(0.5), ..AdamWConfig::default() };
            match types {
                0 => check::<f32, f32>(&gpu, &lens, config, seed),
                1 => check::<bf16, bf16>(&gpu, &lens, config, seed),
                2 => check::<bf16, f32>(&gpu, &lens, config, seed),
                3 => check::<f16, f16>(&gpu, &lens, config, seed),
                _ => check::<f16, f32>(&gpu, &lens, config, seed),
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn by_hand_and_clipping() {
    let Some(gpu) = test_device() else { return };
    // One step by hand (adamw::tests::one_step_by_hand): p 1, g 0.5, lr 0.1 -> 0.899.
    let mut p = [gpu.upload(&[1.0f32]).unwrap()];
    let g = [gpu.upload(&[0.5f32]).unwrap()];
    let mut opt = DeviceAdamW::new(&gpu, AdamWConfig::default(), &views(&p)).unwrap();
    let r = opt.step(&gpu, &mut views_mut(&mut p), &views(&g), 0.1).unwrap();
    assert!((gpu.download(&p[0]).unwrap()[0] - 0.899).abs() < 1e-7);
    assert_eq!((r.grad_norm, r.clip_scale, r.step), (0.5, 1.0, 1));
    // Clipping over two tensors: grads [3] and [4], norm 5, max 1: scale 1 / (5 + 1e-6).
    let cfg = AdamWConfig { max_grad_norm: Some(1.0), weight_decay: 0.0, ..Default::default() };
    let mut p = [gpu.zeros::<f32>(1).unwrap(), gpu.zeros::<f32>(1).unwrap()];
    let g = [gpu.upload(&[3.0f32]).unwrap(), gpu.upload(&[4.0f32]).unwrap()];
    let mut opt = DeviceAdamW::new(&gpu, cfg, &views(&p)).unwrap();
    let r = opt.step(&gpu, &mut views_mut(&mut p), &views(&g), 0.01).unwrap();
    assert_eq!(r.grad_norm, 5.0);
    assert!((r.clip_scale - 0.2).abs() < 1e-6);
    assert!((gpu.download(opt.moments(0).unwrap().0).unwrap()[0] - 0.1 * 0.6).abs() < 1e-7);
}

#[test]
fn non_finite_norms_and_refused_steps_change_nothing() {
    let Some(gpu) = test_device() else { return };
    let cfg = AdamWConfig { max_grad_norm: Some(1.0), ..Default::default() };
    let start: Vec<bf16> = (0..300).map(|i| bf16::from_f32(i as f32 / 100.0)).collect();
    let mut p = [gpu.upload(&start).unwrap(), gpu.upload(&start[..5]).unwrap()];
    let mut opt = DeviceAdamW::new(&gpu, cfg, &views(&p)).unwrap();
    let ok = [gpu.upload(&vec![0.1f32; 300]).unwrap(), gpu.upload(&[0.2f32; 5]).unwrap()];
    opt.step(&gpu, &mut views_mut(&mut p), &views(&ok), 1e-3).unwrap();
    let before = snapshot(&gpu, &opt, &p);
    // A NaN gradient in the second tensor (global index 300 + 3): the norm is not finite.
    let mut bad = [0.2f32; 5];
    bad[3] = f32::NAN;
    let g = [gpu.upload(&vec![0.1f32; 300]).unwrap(), gpu.upload(&bad).unwrap()];
    let e = opt.step(&gpu, &mut views_mut(&mut p), &views(&g), 1e-3).unwrap_err();
    assert!(matches!(e, Error::NonFinite { what: "gradient", index: 303, .. }), "{e:?}");
    assert_eq!(snapshot(&gpu, &opt, &p), before);
    assert_eq!(opt.steps(), 1);
    // An infinite one in the first, past the first block.
    let mut inf = vec![0.1f32; 300];
    inf[299] = f32::INFINITY;
    let g = [gpu.upload(&inf).unwrap(), gpu.upload(&[0.2f32; 5]).unwrap()];
    let e = opt.step(&gpu, &mut views_mut(&mut p), &views(&g), 1e-3).unwrap_err();
    assert!(matches!(e, Error::NonFinite { what: "gradient", index: 299, .. }), "{e:?}");
    assert_eq!(snapshot(&gpu, &opt, &p), before);
    // A learning rate that overflows the parameters: refused in the dry run, nothing written
    // (not even to the first tensor, whose dry run passed... or not: both overflow here).
    let e = opt.step(&gpu, &mut views_mut(&mut p), &views(&ok), 3e38).unwrap_err();
    assert!(matches!(e, Error::StepRefused { tensor: 0, .. }), "{e:?}");
    assert_eq!(snapshot(&gpu, &opt, &p), before);
    assert_eq!(opt.steps(), 1);
    // Only the second tensor's update is non-finite (eps = 0 and a zero gradient: 0 / 0), so the
    // first tensor's dry run passes; its write must not happen either.
    let cfg0 = AdamWConfig { eps: 0.0, ..Default::default() };
    let mut q = [gpu.upload(&[1.0f32, 2.0]).unwrap(), gpu.upload(&[3.0f32]).unwrap()];
    let mut opt0 = DeviceAdamW::new(&gpu, cfg0, &views(&q)).unwrap();
    let g = [gpu.upload(&[0.5f32, 0.5]).unwrap(), gpu.upload(&[0.0f32]).unwrap()];
    let e = opt0.step(&gpu, &mut views_mut(&mut q), &views(&g), 1e-3).unwrap_err();
    assert!(matches!(e, Error::StepRefused { tensor: 1, index: 0, what: "parameter", .. }), "{e:?}");
    assert_eq!(gpu.download(&q[0]).unwrap(), vec![1.0, 2.0]);
    assert_eq!(gpu.download(opt0.moments(0).unwrap().0).unwrap(), vec![0.0, 0.0]);
    // The CPU refuses the same steps with the same errors.
    let mut hq = [vec![1.0f32, 2.0], vec![3.0f32]];
    let mut cpu = AdamW::new(cfg0, &[&hq[0][..], &hq[1][..]]).unwrap();
    let (a, b) = hq.split_at_mut(1);
    let cpu_err =
        cpu.step(&mut [&mut a[0][..], &mut b[0][..]], &[&[0.5f32, 0.5][..], &[0.0f32][..]], 1e-3).unwrap_err();
    assert!(matches!(cpu_err, Error::StepRefused { tensor: 1, index: 0, what: "parameter", .. }), "{cpu_err:?}");
    // Mismatches are typed errors.
    let mut wrong = [gpu.zeros::<bf16>(300).unwrap()];
    assert!(matches!(opt.step(&gpu, &mut views_mut(&mut wrong), &views(&ok[..1]), 1e-3), Err(Error::Length { .. })));
    let mut f = [gpu.zeros::<f32>(300).unwrap(), gpu.zeros::<f32>(5).unwrap()];
    assert!(matches!(opt.step(&gpu, &mut views_mut(&mut f), &views(&ok), 1e-3), Err(Error::ParamMismatch(_))));
    let f16g = [gpu.zeros::<f16>(300).unwrap(), gpu.zeros::<f16>(5).unwrap()];
    assert!(matches!(opt.step(&gpu, &mut views_mut(&mut p), &views(&f16g), 1e-3), Err(Error::ParamMismatch(_))));
    assert!(matches!(opt.step(&gpu, &mut views_mut(&mut p), &views(&ok), f32::NAN), Err(Error::Config { .. })));
}

/// [`super::cuda::FlatDeviceAdamW`]: three steps over tensors back to back in one arena against the
/// CPU [`AdamW`] over the same tensors (the tolerances of `check`).
fn check_flat<T: Element + DeviceCopy, G: Element + DeviceCopy>(
    gpu: &Gpu,
    lens: &[usize],
    config: AdamWConfig,
    seed: u64,
) {
    let mut s = seed;
    let mut host: Vec<Vec<T>> = lens.iter().map(|&n| (0..n).map(|_| T::from_f32(lcg(&mut s))).collect()).collect();
    let mut arena = gpu.upload(&host.concat()).unwrap();
    let mut cpu = AdamW::new(config, &host.iter().map(|p| &p[..]).collect::<Vec<_>>()).unwrap();
    let mut opt = super::cuda::FlatDeviceAdamW::new(gpu, config, arena.view(), lens).unwrap();
    let ulp = match T::DTYPE {
        DType::F32 => 1e-6,
        DType::BF16 => 1.0 / 128.0,
        DType::F16 => 1.0 / 1024.0,
    };
    for step in 0..3 {
        let grads: Vec<Vec<G>> =
            lens.iter().map(|&n| (0..n).map(|_| G::from_f32(lcg(&mut s) * (step + 1) as f32)).collect()).collect();
        let dgrads = gpu.upload(&grads.concat()).unwrap();
        let lr = 1e-2 / (step + 1) as f32;
        let want = cpu
            .step(
                &mut host.iter_mut().map(|p| &mut p[..]).collect::<Vec<_>>(),
                &grads.iter().map(|g| &g[..]).collect::<Vec<_>>(),
                lr,
            )
            .unwrap();
        let got = opt.step(gpu, arena.view_mut(), dgrads.view(), lr).unwrap();
        assert!((got.grad_norm - want.grad_norm).abs() <= 1e-5 * want.grad_norm, "{got:?} vs {want:?}");
        assert_eq!((got.step, got.lr), (want.step, want.lr));
        assert!((got.clip_scale - want.clip_scale).abs() <= 1e-5 * want.clip_scale);
        let d = gpu.download(&arena).unwrap();
        let (dm, dv) = (gpu.download(opt.moments().0).unwrap(), gpu.download(opt.moments().1).unwrap());
        let dw = opt.master().map(|w| gpu.download(w).unwrap());
        let mut at = 0;
        for (i, h) in host.iter().enumerate() {
            let big = h.iter().fold(0.0f32, |m, b| m.max(b.to_f32().abs()));
            for (j, (a, b)) in d[at..at + h.len()].iter().zip(h).enumerate() {
                let (a, b) = (a.to_f32(), b.to_f32());
                let tol = ulp * (1e-3 + b.abs()) + 4.0 * f32::EPSILON * big;
                assert!((a - b).abs() <= tol, "step {step} tensor {i} param {j}: {a} vs {b}");
            }
            let (hm, hv) = cpu.moments(i).unwrap();
            let mut pairs = vec![(&dm[at..at + h.len()], hm), (&dv[at..at + h.len()], hv)];
            if let (Some(dw), Some(hw)) = (&dw, cpu.master(i)) {
                pairs.push((&dw[at..at + h.len()], hw));
            }
            for (what, (d, h)) in ["exp_avg", "exp_avg_sq", "master"].iter().zip(pairs) {
                let big = h.iter().fold(0.0f32, |a, b| a.max(b.abs()));
                for (a, b) in d.iter().zip(h) {
                    assert!((a - b).abs() <= 2e-6 * big + 1e-6 * b.abs(), "step {step} tensor {i}: {what} {a} vs {b}");
                }
            }
            at += h.len();
        }
    }
}

#[test]
fn flat_arena_steps_match_cpu() {
    let Some(gpu) = test_device() else { return };
    // Up to 6 tensors of awkward lengths (empty ones included) in one arena.
    let all_lens = [0usize, 1, 3, 255, 257, 600];
    let strategy = (1usize..7, any::<u64>(), 0usize..5, any::<bool>(), any::<bool>());
    let mut runner = TestRunner::new(Config { cases: 10, ..Config::default() });
    runner
        .run(&strategy, |(k, seed, types, amsgrad, clip)| {
            let lens: Vec<usize> = (0..k).map(|i| all_lens[(seed as usize / 7 + 5 * i) % all_lens.len()]).collect();
            let config = AdamWConfig { amsgrad, max_grad_norm: clip.then_some(0.5), ..AdamWConfig::default() };
            match types {
                0 => check_flat::<f32, f32>(&gpu, &lens, config, seed),
                1 => check_flat::<bf16, bf16>(&gpu, &lens, config, seed),
                2 => check_flat::<bf16, f32>(&gpu, &lens, config, seed),
                3 => check_flat::<f16, f16>(&gpu, &lens, config, seed),
                _ => check_flat::<f16, f32>(&gpu, &lens, config, seed),
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn flat_arena_refusals_change_nothing() {
    let Some(gpu) = test_device() else { return };
    let cfg = AdamWConfig { max_grad_norm: Some(1.0), ..Default::default() };
    let lens = [300usize, 0, 5];
    let start: Vec<bf16> = (0..305).map(|i| bf16::from_f32(i as f32 / 100.0)).collect();
    let mut p = gpu.upload(&start).unwrap();
    let mut opt = super::cuda::FlatDeviceAdamW::new(&gpu, cfg, p.view(), &lens).unwrap();
    let ok = gpu.upload(&vec![0.1f32; 305]).unwrap();
    opt.step(&gpu, p.view_mut(), ok.view(), 1e-3).unwrap();
    let snap = |p: &DeviceBuffer<bf16>, opt: &super::cuda::FlatDeviceAdamW| {
        let (m, v) = opt.moments();
        (
            gpu.download(p).unwrap(),
            gpu.download(opt.master().unwrap()).unwrap(),
            gpu.download(m).unwrap(),
            gpu.download(v).unwrap(),
        )
    };
    let before = snap(&p, &opt);
    // A NaN gradient in the third tensor: arena index 303, the global index the CPU names.
    let mut bad = vec![0.1f32; 305];
    bad[303] = f32::NAN;
    let g = gpu.upload(&bad).unwrap();
    let e = opt.step(&gpu, p.view_mut(), g.view(), 1e-3).unwrap_err();
    assert!(matches!(e, Error::NonFinite { what: "gradient", index: 303, .. }), "{e:?}");
    assert_eq!(snap(&p, &opt), before);
    // A learning rate that overflows: refused, named in the first tensor, nothing written.
    let e = opt.step(&gpu, p.view_mut(), ok.view(), 3e38).unwrap_err();
    assert!(matches!(e, Error::StepRefused { tensor: 0, index: 0, .. }), "{e:?}");
    assert_eq!(snap(&p, &opt), before);
    assert_eq!(opt.steps(), 1);
    // Only the third tensor's update is 0 / 0 (eps 0, zero gradient): the CPU's error, with the
    // tensor and index in it, and the first tensor is not written either.
    let cfg0 = AdamWConfig { eps: 0.0, ..Default::default() };
    let mut q = gpu.upload(&[1.0f32, 2.0, 3.0]).unwrap();
    let mut opt0 = super::cuda::FlatDeviceAdamW::new(&gpu, cfg0, q.view(), &[2, 0, 1]).unwrap();
    let g = gpu.upload(&[0.5f32, 0.5, 0.0]).unwrap();
    let e = opt0.step(&gpu, q.view_mut(), g.view(), 1e-3).unwrap_err();
    assert!(matches!(e, Error::StepRefused { tensor: 2, index: 0, what: "parameter", .. }), "{e:?}");
    let mut h = [vec![1.0f32, 2.0], vec![], vec![3.0f32]];
    let mut cpu = AdamW::new(cfg0, &[&h[0][..], &h[1][..], &h[2][..]]).unwrap();
    let [a, b, c] = &mut h;
    let cpu_err =
        cpu.step(&mut [&mut a[..], &mut b[..], &mut c[..]], &[&[0.5f32, 0.5][..], &[][..], &[0.0f32][..]], 1e-3);
    // (The value is NaN on both sides, so the fields are compared without it.)
    assert!(matches!(cpu_err, Err(Error::StepRefused { tensor: 2, index: 0, what: "parameter", .. })), "{cpu_err:?}");
    assert_eq!(gpu.download(&q).unwrap(), vec![1.0, 2.0, 3.0]);
    // Shapes that disagree with the arena are typed errors.
    let short = gpu.zeros::<bf16>(304).unwrap();
    assert!(matches!(super::cuda::FlatDeviceAdamW::new(&gpu, cfg, short.view(), &lens), Err(Error::Length { .. })));
    let g304 = gpu.zeros::<f32>(304).unwrap();
    assert!(matches!(opt.step(&gpu, p.view_mut(), g304.view(), 1e-3), Err(Error::ParamMismatch(_))));
}
