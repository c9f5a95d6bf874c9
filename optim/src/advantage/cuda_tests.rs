//! The device advantages against the CPU path, on the test device (the simulator without a GPU).

use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use squid_cuda::testing::test_device;

use super::*;

fn configs() -> Vec<AdvantageConfig> {
    let mut out = Vec::new();
    let estimators = [
        Estimator::Grpo(GrpoConfig::verl()),
        Estimator::Grpo(GrpoConfig { unbiased_std: false, ..GrpoConfig::trl() }),
        Estimator::Grpo(GrpoConfig { scope: StdScope::Batch, unbiased_std: true, eps: 1e-4 }),
        Estimator::Grpo(GrpoConfig::dr_grpo()),
        Estimator::Rloo,
    ];
    for estimator in estimators {
        for singleton in [SingletonPolicy::Error, SingletonPolicy::Zero, SingletonPolicy::RawScore] {
            for non_finite in [NonFinitePolicy::Error, NonFinitePolicy::Ignore] {
                out.push(AdvantageConfig { estimator, singleton, non_finite });
            }
        }
    }
    out
}

/// Same outcome as the CPU: both Ok with advantages within 1e-6 relative (both compute in f64 and
/// round once; only the order of the f64 sums differs) and equal counts, means and stds to 1e-12
/// relative; or both the same error (the values of a NonFinite compared loosely).
fn same_as_cpu(gpu: &squid_cuda::launch::Gpu, rewards: &[f32], ids: &[u64], config: &AdvantageConfig) {
    let cpu = sample_advantages_with_stats(rewards, Groups::Ids(ids), config);
    let r = gpu.upload(rewards).unwrap();
    let mut out = gpu.upload(&vec![7.0f32; rewards.len()]).unwrap();
    let dev = cuda::sample_advantages(gpu, &r, Groups::Ids(ids), config, &mut out);
    match (cpu, dev) {
        (Ok(c), Ok(stats)) => {
            let a = gpu.download(&out).unwrap();
            for (i, (x, y)) in a.iter().zip(&c.advantages).enumerate() {
                assert!(
                    (x - y).abs() <= 1e-6 * (1.0 + y.abs()),
                    "sample {i}: {x} vs {y} ({config:?}, {rewards:?}, {ids:?})"
                );
            }
            assert_eq!(stats.len(), c.groups.len());
            for (d, c) in stats.iter().zip(&c.groups) {
                assert_eq!(d.count, c.count);
                assert!((d.mean - c.mean).abs() <= 1e-12 * (1.0 + c.mean.abs()), "{d:?} vs {c:?}");
                assert!((d.std - c.std).abs() <= 1e-12 * (1.0 + c.std.abs()), "{d:?} vs {c:?}");
            }
        }
        (Err(Error::NonFinite { what: w1, index: i1, .. }), Err(Error::NonFinite { what: w2, index: i2, .. })) => {
            assert_eq!((w1, i1), (w2, i2));
        }
        (Err(c), Err(d)) => assert_eq!(c, d),
        (c, d) => panic!("cpu {c:?} vs device {d:?} ({config:?}, {rewards:?}, {ids:?})"),
    }
}

#[test]
fn by_hand_and_edge_cases() {
    let Some(gpu) = test_device() else { return };
    let verl = AdvantageConfig::new(Estimator::Grpo(GrpoConfig::verl()));
    // Two groups of four (grpo_by_hand), one all-equal group, a length-1 batch.
    let rewards = [1.0, 0.0, 0.0, 1.0, 2.0, 4.0, 6.0, 8.0, 3.0, 3.0];
    let ids = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2];
    same_as_cpu(&gpu, &rewards, &ids, &verl);
    let r = gpu.upload(&rewards).unwrap();
    let mut out = gpu.zeros::<f32>(10).unwrap();
    cuda::sample_advantages(&gpu, &r, Groups::Size(2), &verl, &mut out).unwrap();
    let a = gpu.download(&out).unwrap();
    assert_eq!(&a[8..], &[0.0, 0.0], "an all-equal group gets exactly 0");
    // A singleton is an error by default and the raw reward when asked.
    let one = gpu.upload(&[2.5f32]).unwrap();
    let mut o1 = gpu.zeros::<f32>(1).unwrap();
    assert_eq!(
        cuda::sample_advantages(&gpu, &one, Groups::Size(1), &verl, &mut o1),
        Err(Error::SingletonGroup { group: 0 })
    );
    let raw = AdvantageConfig { singleton: SingletonPolicy::RawScore, ..verl };
    cuda::sample_advantages(&gpu, &one, Groups::Size(1), &raw, &mut o1).unwrap();
    assert_eq!(gpu.download(&o1).unwrap(), vec![2.5]);
    // A NaN reward is an error naming it; ignored, it gets 0.
    let nan = gpu.upload(&[1.0f32, f32::NAN, 0.0, 2.0]).unwrap();
    let mut o4 = gpu.zeros::<f32>(4).unwrap();
    assert!(matches!(
        cuda::sample_advantages(&gpu, &nan, Groups::Size(4), &verl, &mut o4),
        Err(Error::NonFinite { what: "rewards", index: 1, .. })
    ));
    same_as_cpu(
        &gpu,
        &[1.0, f32::NAN, 0.0, 2.0],
        &[5, 5, 5, 5],
        &AdvantageConfig { non_finite: NonFinitePolicy::Ignore, ..verl },
    );
    // RLOO near f32::MAX overflows: the CPU's typed error.
    same_as_cpu(&gpu, &[3.0e38, -3.0e38, 3.0e38], &[0, 0, 0], &AdvantageConfig::new(Estimator::Rloo));
    // Bad lengths and configs are typed errors before any launch.
    let mut o3 = gpu.zeros::<f32>(3).unwrap();
    assert!(matches!(cuda::sample_advantages(&gpu, &r, Groups::Size(2), &verl, &mut o3), Err(Error::Length { .. })));
    let bad_eps = AdvantageConfig::new(Estimator::Grpo(GrpoConfig { eps: -1.0, ..GrpoConfig::verl() }));
    assert!(matches!(
        cuda::sample_advantages(&gpu, &r, Groups::Size(2), &bad_eps, &mut out),
        Err(Error::Config { .. })
    ));
}

#[test]
fn generated_groups_match_cpu() {
    let Some(gpu) = test_device() else { return };
    let configs = configs();
    // Up to 40 samples in up to 12 groups of any size (1 included), ids unsorted; rewards from a
    // small set so that all-equal groups occur, with the odd NaN.
    let strategy = (1usize..40, 1u64..12, any::<u64>(), 0..configs.len());
    let mut runner = TestRunner::new(Config { cases: 40, ..Config::default() });
    runner
        .run(&strategy, |(n, groups, seed, c)| {
            let mut s = seed | 1;
            let mut next = move || {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                s
            };
            let ids: Vec<u64> = (0..n).map(|_| next() % groups * 1000).collect();
            let rewards: Vec<f32> = (0..n)
                .map(|_| match next() % 16 {
                    0 => f32::NAN,
                    k => {
                        [0.0, 1.0, 0.5, -2.0][(k % 4) as usize]
                            + if k > 12 { (next() % 100) as f32 * 0.37 } else { 0.0 }
                    }
                })
                .collect();
            same_as_cpu(&gpu, &rewards, &ids, &configs[c]);
            Ok(())
        })
        .unwrap();
}

#[test]
fn broadcast_matches_cpu() {
    let Some(gpu) = test_device() else { return };
    // Empty sequences, a sequence longer than the block (300 > 256), a single token.
    let cu = [0u32, 0, 3, 303, 304, 304];
    let mask: Vec<bool> = (0..304).map(|t| t % 3 != 0).collect();
    let adv = [0.5f32, -1.0, 2.0, 3.0, -4.0];
    let want = broadcast_to_tokens(&adv, &cu, &mask).unwrap();
    let a = gpu.upload(&adv).unwrap();
    let m = gpu.upload(&mask.iter().map(|&b| u8::from(b)).collect::<Vec<_>>()).unwrap();
    let mut out = gpu.upload(&vec![9.0f32; 304]).unwrap();
    cuda::broadcast_to_tokens(&gpu, &a, &cu, &m, &mut out).unwrap();
    assert_eq!(gpu.download(&out).unwrap(), want);
    let bad = gpu.upload(&[0.5f32, f32::INFINITY, 2.0, 3.0, -4.0]).unwrap();
    assert!(matches!(
        cuda::broadcast_to_tokens(&gpu, &bad, &cu, &m, &mut out),
        Err(Error::NonFinite { what: "advantages", index: 1, .. })
    ));
    assert!(matches!(cuda::broadcast_to_tokens(&gpu, &a, &cu[..4], &m, &mut out), Err(Error::CuSeqlens(_))));
}

/// A xorshift stream from a proptest seed (the shapes come from proptest, the values from this).
fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed | 1;
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        s
    }
}

fn mask_bytes(mask: &[bool]) -> Vec<u8> {
    mask.iter().map(|&b| u8::from(b)).collect()
}

/// Both Ok with every token within `tol` (absolute, on whitened values of order 1), or the same
/// error (a NonFinite's value compared loosely).
fn same_tokens(cpu: Result<Vec<f32>, Error>, dev: Result<Vec<f32>, Error>, tol: f32, what: &str) {
    match (cpu, dev) {
        (Ok(c), Ok(d)) => {
            assert_eq!(c.len(), d.len());
            for (t, (x, y)) in d.iter().zip(&c).enumerate() {
                assert!((x - y).abs() <= tol * (1.0 + y.abs()), "token {t}: device {x} vs cpu {y} ({what})");
            }
        }
        (Err(Error::NonFinite { what: w1, index: i1, .. }), Err(Error::NonFinite { what: w2, index: i2, .. })) => {
            assert_eq!((w1, i1), (w2, i2), "{what}");
        }
        (Err(c), Err(d)) => assert_eq!(c, d, "{what}"),
        (c, d) => panic!("cpu {c:?} vs device {d:?} ({what})"),
    }
}

#[test]
fn zero_variance_filter_matches_cpu() {
    let Some(gpu) = test_device() else { return };
    // Up to 70 samples (a group of more than 32 members crosses the warp's stride) in up to 9
    // groups of any size, ids unsorted, values from a small set so that all-equal groups occur.
    let strategy = (1usize..70, 1u64..9, any::<u64>(), any::<bool>());
    let mut runner = TestRunner::new(Config { cases: 24, ..Config::default() });
    runner
        .run(&strategy, |(n, groups, seed, with_nan)| {
            let mut next = xorshift(seed);
            let ids: Vec<u64> = (0..n).map(|_| next() % groups * 7).collect();
            let mut rewards: Vec<f32> = (0..n).map(|_| [0.0, 1.0, 1.0, 0.25][(next() % 4) as usize]).collect();
            if with_nan {
                let i = (next() % n as u64) as usize;
                rewards[i] = f32::NAN;
            }
            let cpu = filter_zero_variance_groups(&rewards, Groups::Ids(&ids));
            let r = gpu.upload(&rewards).unwrap();
            let mut keep = gpu.upload(&vec![7u8; n]).unwrap();
            let dev = cuda::filter_zero_variance_groups(&gpu, &r, Groups::Ids(&ids), &mut keep);
            match (cpu, dev) {
                (Ok(c), Ok(d)) => {
                    assert_eq!(c, d);
                    let mut want = vec![0u8; n];
                    c.kept_samples.iter().for_each(|&i| want[i] = 1);
                    assert_eq!(gpu.download(&keep).unwrap(), want);
                }
                (Err(Error::NonFinite { index: i1, .. }), Err(Error::NonFinite { index: i2, .. })) => {
                    assert_eq!(i1, i2)
                }
                (c, d) => panic!("cpu {c:?} vs device {d:?}"),
            }
            Ok(())
        })
        .unwrap();
    let r = gpu.upload(&[1.0f32, 2.0, 3.0]).unwrap();
    let mut keep = gpu.zeros::<u8>(3).unwrap();
    assert!(matches!(
        cuda::filter_zero_variance_groups(&gpu, &r, Groups::Size(2), &mut keep),
        Err(Error::Config { what: "group size", .. })
    ));
}

/// Packed sequences from proptest lengths: empty ones, single tokens, one longer than a block.
fn packed(lens: &[usize]) -> Vec<u32> {
    let mut cu = vec![0u32];
    for l in lens {
        cu.push(cu.last().unwrap() + *l as u32);
    }
    cu
}

#[test]
fn reinforce_pp_matches_cpu() {
    let Some(gpu) = test_device() else { return };
    let lens = prop::collection::vec(prop_oneof![4 => 0usize..9, 1 => 250usize..300], 1..10);
    let strategy = (lens, any::<u64>(), 0.0f32..=1.0, 0u32..5, any::<bool>());
    let mut runner = TestRunner::new(Config { cases: 20, ..Config::default() });
    runner
        .run(&strategy, |(lens, seed, gamma, mask_rate, with_nan)| {
            let cu = packed(&lens);
            let t = *cu.last().unwrap() as usize;
            let mut next = xorshift(seed);
            let mut rewards: Vec<f32> =
                (0..t).map(|_| if next() % 5 == 0 { (next() % 7) as f32 - 3.0 } else { 0.0 }).collect();
            // mask_rate 0: every token a loss token; else about one in mask_rate + 1 masked.
            let mask: Vec<bool> = (0..t).map(|_| mask_rate == 0 || next() % u64::from(mask_rate + 1) != 0).collect();
            if with_nan && t > 0 {
                let i = (next() % t as u64) as usize;
                rewards[i] = f32::INFINITY;
            }
            let cpu = reinforce_pp(&rewards, &cu, &mask, gamma, WhitenConfig::default());
            let r = gpu.upload(&rewards).unwrap();
            let m = gpu.upload(&mask_bytes(&mask)).unwrap();
            let mut out = gpu.upload(&vec![9.0f32; t.max(1)]).unwrap();
            let mut view = out.view_mut();
            let view = view.slice_mut(..t).unwrap();
            let dev = cuda::reinforce_pp(&gpu, &r, &cu, &m, gamma, WhitenConfig::default(), view)
                .map(|()| gpu.download(&out).unwrap()[..t].to_vec());
            same_tokens(cpu, dev, 2e-5, &format!("lens {lens:?} gamma {gamma}"));
            Ok(())
        })
        .unwrap();
    // Options before data; lengths are typed errors.
    let r = gpu.upload(&[1.0f32, 0.0, 2.0]).unwrap();
    let m = gpu.upload(&[1u8, 1, 1]).unwrap();
    let mut out = gpu.zeros::<f32>(3).unwrap();
    assert!(matches!(
        cuda::reinforce_pp(&gpu, &r, &[0, 3], &m, 1.5, WhitenConfig::default(), &mut out),
        Err(Error::Config { what: "gamma", .. })
    ));
    assert!(matches!(
        cuda::reinforce_pp(&gpu, &r, &[0, 2], &m, 1.0, WhitenConfig::default(), &mut out),
        Err(Error::CuSeqlens(_))
    ));
    let one = gpu.upload(&[1u8, 0, 0]).unwrap();
    assert_eq!(
        cuda::reinforce_pp(&gpu, &r, &[0, 3], &one, 1.0, WhitenConfig::default(), &mut out),
        Err(Error::TooFewTokens(1))
    );
}

#[test]
fn reinforce_pp_baseline_matches_cpu() {
    let Some(gpu) = test_device() else { return };
    let lens = prop::collection::vec(prop_oneof![4 => 0usize..6, 1 => 257usize..270], 1..14);
    let strategy = (lens, 1u64..6, any::<u64>(), 0usize..3, any::<bool>());
    let mut runner = TestRunner::new(Config { cases: 20, ..Config::default() });
    runner
        .run(&strategy, |(lens, groups, seed, policy, with_nan)| {
            let cu = packed(&lens);
            let (s, t) = (lens.len(), *cu.last().unwrap() as usize);
            let mut next = xorshift(seed);
            let ids: Vec<u64> = (0..s).map(|_| next() % groups).collect();
            let mut rewards: Vec<f32> = (0..s).map(|_| [0.0, 1.0, 2.5][(next() % 3) as usize]).collect();
            if with_nan {
                let i = (next() % s as u64) as usize;
                rewards[i] = f32::NAN;
            }
            let mask: Vec<bool> = (0..t).map(|_| next() % 4 != 0).collect();
            let singleton = [SingletonPolicy::Error, SingletonPolicy::Zero, SingletonPolicy::RawScore][policy];
            let non_finite = if next() % 2 == 0 { NonFinitePolicy::Error } else { NonFinitePolicy::Ignore };
            let w = WhitenConfig::default();
            let cpu = reinforce_pp_baseline(&rewards, Groups::Ids(&ids), &cu, &mask, singleton, non_finite, w);
            let r = gpu.upload(&rewards).unwrap();
            let m = gpu.upload(&mask_bytes(&mask)).unwrap();
            let mut out = gpu.upload(&vec![9.0f32; t.max(1)]).unwrap();
            let mut view = out.view_mut();
            let view = view.slice_mut(..t).unwrap();
            let dev = cuda::reinforce_pp_baseline(&gpu, &r, Groups::Ids(&ids), &cu, &m, singleton, non_finite, w, view)
                .map(|()| gpu.download(&out).unwrap()[..t].to_vec());
            same_tokens(cpu, dev, 2e-5, &format!("lens {lens:?} ids {ids:?} rewards {rewards:?}"));
            Ok(())
        })
        .unwrap();
}
