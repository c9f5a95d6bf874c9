use half::bf16;
use proptest::prelude::*;

use super::naive::NaiveAdamW;
use super::*;

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

#[test]
fn one_step_by_hand() {
    // p = 1, g = 0.5, lr 0.1, wd 0.01, betas (0.9, 0.999), eps 1e-8, step 1:
    // p <- 1 * (1 - 0.001) = 0.999; m = 0.05; v = 0.00025; m_hat = 0.5; v_hat = 0.25;
    // p <- 0.999 - 0.1 * 0.5 / (0.5 + 1e-8) = 0.999 - 0.1 = 0.899 (to 2e-9).
    let mut p = [1.0f32];
    let mut opt = AdamW::new(AdamWConfig::default(), &[&p[..]]).unwrap();
    let r = opt.step(&mut [&mut p[..]], &[&[0.5f32][..]], 0.1).unwrap();
    assert!((p[0] - 0.899).abs() < 1e-7, "{}", p[0]);
    assert_eq!((r.grad_norm, r.clip_scale, r.step), (0.5, 1.0, 1));
    // The betas are f32: 1 - 0.9f32 = 0.100000024 and 1 - 0.999f32 = 0.00099998713, so
    // m = 0.050000012 and v = 0.00024999678 (not 0.05 and 0.00025 exactly).
    let (m, v) = opt.moments(0).unwrap();
    assert!((m[0] - 0.050_000_012).abs() < 1e-9 && (v[0] - 0.000_249_996_78).abs() < 1e-11, "{m:?} {v:?}");
}

#[test]
fn clipping_and_non_finite() {
    // Grad [3, 4]: norm 5, max 1 -> scale 1 / (5 + 1e-6); at step 1 Adam's update is sign-like
    // (m_hat / sqrt(v_hat) = +-1), so p moves by -lr whatever the scale; check the report and m.
    let cfg = AdamWConfig { max_grad_norm: Some(1.0), weight_decay: 0.0, ..Default::default() };
    let mut p = vec![0.0f32, 0.0];
    let mut opt = AdamW::new(cfg, &[&p[..]]).unwrap();
    let r = opt.step(&mut [&mut p[..]], &[&[3.0f32, 4.0][..]], 0.01).unwrap();
    assert_eq!(r.grad_norm, 5.0);
    assert!((r.clip_scale - 0.2).abs() < 1e-6);
    assert!((opt.moments(0).unwrap().0[0] - 0.1 * 0.6).abs() < 1e-7);
    assert!((p[0] + 0.01).abs() < 1e-6 && (p[1] + 0.01).abs() < 1e-6);
    // A NaN gradient: typed error, no change to weights, moments or step.
    let before = (p.clone(), opt.clone());
    let e = opt.step(&mut [&mut p[..]], &[&[f32::NAN, 1.0][..]], 0.01).unwrap_err();
    assert!(matches!(e, Error::NonFinite { what: "gradient", index: 0, .. }));
    assert_eq!((p, opt), before);
}

#[test]
fn mismatches_are_errors() {
    let p = [0.0f32; 3];
    let mut opt = AdamW::new(AdamWConfig::default(), &[&p[..]]).unwrap();
    let mut q = [0.0f32; 4];
    assert!(matches!(opt.step(&mut [&mut q[..]], &[&[0.0f32; 4][..]], 0.1), Err(Error::ParamMismatch(_))));
    let mut b = [bf16::ZERO; 3];
    assert!(matches!(opt.step(&mut [&mut b[..]], &[&[0.0f32; 3][..]], 0.1), Err(Error::ParamMismatch(_))));
    assert!(AdamW::new(AdamWConfig { beta2: 1.0, ..Default::default() }, &[&p[..]]).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// 60 steps over several tensors (awkward lengths, one above the 32k chunk) against the f64
    /// reference: f32 params to 1e-5 absolute (weights are O(1); the update is lr-bounded, and f32
    /// rounding of O(60) updates stays well below that), with amsgrad, clipping and weight decay.
    #[test]
    fn matches_naive_over_many_steps(
        lens in prop::collection::vec(prop_oneof![1usize..40, Just(33_000usize)], 1..4),
        amsgrad in any::<bool>(), clip in any::<bool>(), seed in any::<u64>(),
    ) {
        let mut seed = seed;
        let cfg = AdamWConfig { amsgrad, max_grad_norm: clip.then_some(2.0), weight_decay: 0.1, ..Default::default() };
        let mut params: Vec<Vec<f32>> = lens.iter().map(|&n| (0..n).map(|_| lcg(&mut seed)).collect()).collect();
        let mut refs: Vec<NaiveAdamW> = params.iter().map(|p| NaiveAdamW::new(p)).collect();
        let mut opt = AdamW::new(cfg, &params.iter().map(|p| p.as_slice()).collect::<Vec<_>>()).unwrap();
        let schedule = crate::LrSchedule::cosine(1e-2, 5, 60, 0.1).unwrap();
        for _ in 0..60 {
            let grads: Vec<Vec<f32>> = lens.iter().map(|&n| (0..n).map(|_| lcg(&mut seed) * 0.3).collect()).collect();
            let lr = schedule.lr_at(opt.steps());
            let views: Vec<&[f32]> = grads.iter().map(|g| g.as_slice()).collect();
            let report = {
                let mut pm: Vec<&mut [f32]> = params.iter_mut().map(|p| p.as_mut_slice()).collect();
                opt.step(&mut pm, &views, lr).unwrap()
            };
            let norm = crate::clip::naive_global_grad_norm(&views);
            prop_assert!((report.grad_norm - norm).abs() <= 1e-6 * norm);
            let scale = if clip { (2.0 / (norm + 1e-6)).min(1.0) } else { 1.0 };
            for (r, g) in refs.iter_mut().zip(&grads) {
                let g: Vec<f32> = g.iter().map(|&x| (f64::from(x) * scale) as f32).collect();
                r.step(&g, f64::from(lr), 0.9, 0.999, 1e-8, 0.1, amsgrad);
            }
        }
        for (p, r) in params.iter().zip(&refs) {
            for (i, (&a, &b)) in p.iter().zip(&r.p).enumerate() {
                prop_assert!((f64::from(a) - b).abs() <= 1e-5, "element {}: {} vs {}", i, a, b);
            }
        }
    }
}

#[test]
fn bf16_params_keep_f32_masters() {
    // 200 steps with tiny updates (lr 1e-4 on weights ~1): bf16 alone (ulp 2^-7 near 1) would not
    // move at all; the master moves by ~0.02 and the bf16 parameter is its rounding.
    let init: Vec<f32> = (0..100).map(|i| 1.0 + i as f32 / 128.0).collect();
    let mut p: Vec<bf16> = init.iter().map(|&x| bf16::from_f32(x)).collect();
    let start: Vec<f32> = p.iter().map(|x| x.to_f32()).collect();
    let cfg = AdamWConfig { weight_decay: 0.0, ..Default::default() };
    let mut opt = AdamW::new(cfg, &[&p[..]]).unwrap();
    let mut reference = NaiveAdamW::new(&start);
    let g = [bf16::from_f32(0.5); 100];
    let gf: Vec<f32> = g.iter().map(|x| x.to_f32()).collect();
    for _ in 0..200 {
        opt.step(&mut [&mut p[..]], &[&g[..]], 1e-4).unwrap();
        reference.step(&gf, 1e-4, 0.9, 0.999, 1e-8, 0.0, false);
    }
    let master = opt.master(0).unwrap();
    for i in 0..100 {
        assert!((f64::from(master[i]) - reference.p[i]).abs() < 1e-5);
        assert_eq!(p[i], bf16::from_f32(master[i]));
    }
    assert!((master[0] - (start[0] - 0.02)).abs() < 1e-4, "{}", master[0]);
}

#[test]
fn save_load_round_trip_and_rejects_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("opt.safetensors");
    let cfg = AdamWConfig { amsgrad: true, ..Default::default() };
    let mut p = vec![bf16::from_f32(0.3); 5];
    let mut q = vec![bf16::from_f32(-1.0); 2];
    let mut opt = AdamW::new(cfg, &[&p[..], &q[..]]).unwrap();
    for s in 0..3 {
        let g1 = [0.1f32 * s as f32 + 0.05; 5];
        opt.step(&mut [&mut p[..], &mut q[..]], &[&g1[..], &[0.2f32, -0.2][..]], 0.01).unwrap();
    }
    opt.save(&path, &[&p[..], &q[..]]).unwrap();
    // A fresh optimizer and zeroed parameters get everything back.
    let (mut p2, mut q2) = (vec![bf16::ZERO; 5], vec![bf16::ZERO; 2]);
    let mut restored = AdamW::new(cfg, &[&p2[..], &q2[..]]).unwrap();
    restored.load(&path, &mut [&mut p2[..], &mut q2[..]]).unwrap();
    assert_eq!(restored, opt);
    assert_eq!((p2.clone(), q2.clone()), (p.clone(), q.clone()));
    assert_eq!(restored.steps(), 3);
    // The next step is identical.
    let g = [vec![0.3f32; 5], vec![0.1f32, 0.1]];
    opt.step(&mut [&mut p[..], &mut q[..]], &[&g[0][..], &g[1][..]], 0.01).unwrap();
    restored.step(&mut [&mut p2[..], &mut q2[..]], &[&g[0][..], &g[1][..]], 0.01).unwrap();
    assert_eq!(restored, opt);
    // f32 parameters round-trip too (the parameters are the weights).
    let mut w = vec![0.5f32, -0.25, 2.0];
    let mut o32 = AdamW::new(AdamWConfig::default(), &[&w[..]]).unwrap();
    o32.step(&mut [&mut w[..]], &[&[1.0f32, 2.0, 3.0][..]], 0.1).unwrap();
    o32.save(&path, &[&w[..]]).unwrap();
    let mut w2 = vec![0.0f32; 3];
    let mut r32 = AdamW::new(AdamWConfig::default(), &[&w2[..]]).unwrap();
    r32.load(&path, &mut [&mut w2[..]]).unwrap();
    assert_eq!((w2, r32), (w.clone(), o32.clone()));
    // One flipped byte in the data: the checksum catches it and nothing is changed.
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let mut w3 = vec![7.0f32; 3];
    let mut r3 = AdamW::new(AdamWConfig::default(), &[&w3[..]]).unwrap();
    let fresh = r3.clone();
    assert!(matches!(r3.load(&path, &mut [&mut w3[..]]), Err(Error::Checkpoint { .. })));
    assert_eq!((w3, r3), (vec![7.0; 3], fresh));
    // Truncated file, wrong shapes, wrong config: typed errors.
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert!(matches!(o32.clone().load(&path, &mut [&mut w[..]]), Err(Error::Checkpoint { .. })));
    o32.save(&path, &[&w[..]]).unwrap();
    let mut other = AdamW::new(AdamWConfig { amsgrad: true, ..Default::default() }, &[&w[..]]).unwrap();
    assert!(matches!(other.load(&path, &mut [&mut w[..]]), Err(Error::Checkpoint { .. })));
    assert!(matches!(o32.clone().load(&path, &mut [&mut [0.0f32; 4][..]]), Err(Error::ParamMismatch(_))));
}

/// A refused step leaves everything as it was: parameters, masters, moments, step count.
fn assert_refused<T: Element + PartialEq + std::fmt::Debug>(
    opt: &mut AdamW,
    params: &mut [T],
    grads: &[f32],
    lr: f32,
    what: &str,
) {
    let before = (params.to_vec(), opt.clone());
    let err = opt.step(&mut [&mut params[..]], &[grads], lr).unwrap_err();
    assert!(matches!(err, Error::StepRefused { what: w, tensor: 0, .. } if w == what), "{err:?}");
    assert_eq!((params.to_vec(), opt.clone()), before);
}

#[test]
fn steps_that_would_make_values_non_finite_are_refused_with_nothing_changed() {
    // eps = 0 and a zero gradient: m = v = 0, the update is 0 / 0 = NaN (it was applied: every
    // parameter became NaN and the step reported success).
    let cfg = AdamWConfig { eps: 0.0, ..Default::default() };
    let mut p = vec![1.0f32, -2.0, 3.0];
    let mut opt = AdamW::new(cfg, &[&p[..]]).unwrap();
    assert_refused(&mut opt, &mut p, &[0.0, 0.0, 0.0], 1e-3, "parameter");
    // The same optimizer still steps on a usable gradient.
    opt.step(&mut [&mut p[..]], &[&[1.0f32, 1.0, 1.0][..]], 1e-3).unwrap();
    assert_eq!(opt.steps(), 1);
    assert!(p.iter().all(|x| x.is_finite()));
    // lr 3e38: the weight decay factor 1 - lr * wd and the update overflow (parameters became -inf).
    let mut q = vec![0.5f32; 5];
    let mut opt = AdamW::new(AdamWConfig::default(), &[&q[..]]).unwrap();
    assert_refused(&mut opt, &mut q, &[1.0; 5], 3e38, "parameter");
    // A finite gradient of 1e30 without clipping: (1 - beta2) g^2 overflows v.
    let mut r = vec![0.0f32; 2];
    let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.0, ..Default::default() }, &[&r[..]]).unwrap();
    assert_refused(&mut opt, &mut r, &[1e30, 0.0], 1e-3, "exp_avg_sq");
    // With clipping the same gradient is fine, and the report carries its norm.
    let clip = AdamWConfig { max_grad_norm: Some(1.0), ..Default::default() };
    let mut opt = AdamW::new(clip, &[&r[..]]).unwrap();
    let report = opt.step(&mut [&mut r[..]], &[&[1e30f32, 0.0][..]], 1e-3).unwrap();
    assert!((report.grad_norm - 1e30).abs() <= 1e-6 * 1e30, "{}", report.grad_norm);
    // Finite gradients whose norm exceeds f32::MAX: clipped by the true norm (6e38), not zeroed.
    let mut s = vec![0.0f32; 4];
    let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.0, ..clip }, &[&s[..]]).unwrap();
    let report = opt.step(&mut [&mut s[..]], &[&[3e38f32; 4][..]], 0.1).unwrap();
    assert!((report.grad_norm - 6e38).abs() <= 1e-6 * 6e38 && report.clip_scale > 0.0, "{report:?}");
    assert!(s.iter().all(|&x| (x + 0.1).abs() < 1e-6), "{s:?}");
    // An f16 parameter that would leave f16's range (65504) although its f32 master stays finite.
    let mut h = vec![half::f16::from_f32(65000.0)];
    let mut opt = AdamW::new(AdamWConfig { weight_decay: 0.0, ..Default::default() }, &[&h[..]]).unwrap();
    assert_refused(&mut opt, &mut h, &[-1.0], 1000.0, "parameter in its storage type");
    // Two tensors, the second bad: the first is not updated either.
    let (mut a, mut b) = (vec![1.0f32; 3], vec![1.0f32; 3]);
    let mut opt = AdamW::new(AdamWConfig { eps: 0.0, ..Default::default() }, &[&a[..], &b[..]]).unwrap();
    let before = (a.clone(), b.clone(), opt.clone());
    let err = opt.step(&mut [&mut a[..], &mut b[..]], &[&[1.0f32; 3][..], &[0.0f32; 3][..]], 1e-3).unwrap_err();
    assert!(matches!(err, Error::StepRefused { tensor: 1, index: 0, .. }), "{err:?}");
    assert_eq!((a, b, opt), before);
}

#[test]
fn invalid_hyper_parameters_are_refused() {
    let p = [0.0f32; 2];
    for cfg in [
        AdamWConfig { eps: -1e-8, ..Default::default() },
        AdamWConfig { eps: f32::NAN, ..Default::default() },
        AdamWConfig { beta1: 1.0, ..Default::default() },
        AdamWConfig { beta1: -0.1, ..Default::default() },
        AdamWConfig { beta2: f32::NAN, ..Default::default() },
        AdamWConfig { weight_decay: f32::INFINITY, ..Default::default() },
        AdamWConfig { max_grad_norm: Some(0.0), ..Default::default() },
    ] {
        assert!(matches!(AdamW::new(cfg, &[&p[..]]), Err(Error::Config { .. })), "{cfg:?}");
    }
    let mut q = [0.0f32; 2];
    let mut opt = AdamW::new(AdamWConfig::default(), &[&q[..]]).unwrap();
    for lr in [f32::NAN, -1.0, f32::INFINITY] {
        assert!(matches!(opt.step(&mut [&mut q[..]], &[&[1.0f32; 2][..]], lr), Err(Error::Config { what: "lr", .. })));
    }
    // The step count cannot wrap (a loaded file can hold any count).
    opt.step = u64::MAX;
    let before = opt.clone();
    assert!(matches!(opt.step(&mut [&mut q[..]], &[&[1.0f32; 2][..]], 0.1), Err(Error::Config { .. })));
    assert_eq!(opt, before);
}
