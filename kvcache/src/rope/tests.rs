//! The fast path against the f64 reference, backward against finite differences, and the two
//! properties the document cache relies on: re-positioning equals rotating at the new position,
//! and scores depend on relative positions only.

use super::*;
use half::{bf16, f16};
use proptest::prelude::*;
use squid_cuda::dtype::unit_roundoff;

/// A small deterministic generator (SplitMix64) so proptest only has to shrink a seed.
struct Rng(u64);
impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn vec<T: Element>(&mut self, n: usize) -> Vec<T> {
        (0..n).map(|_| T::from_f32(self.unit())).collect()
    }
}

fn to_f64<T: Element>(x: &[T]) -> Vec<f64> {
    x.iter().map(|v| v.to_f32() as f64).collect()
}

fn config_strategy() -> impl Strategy<Value = RopeConfig> {
    // head_dim 2..=40 (odd ones included: they have an unrotated tail), rotary dims even.
    (1usize..=20, any::<bool>(), 0usize..3, 0usize..3, any::<bool>()).prop_flat_map(
        |(half_max, odd_head, base_i, scale_i, interleaved)| {
            let head_dim = 2 * half_max + usize::from(odd_head);
            (1usize..=half_max).prop_map(move |half| RopeConfig {
                head_dim,
                rotary_dim: 2 * half,
                base: [10_000.0, 500_000.0, 100.0][base_i],
                position_scale: [1.0, 0.25, 2.0][scale_i],
                layout: if interleaved { RopeLayout::Interleaved } else { RopeLayout::RotateHalf },
            })
        },
    )
}

/// Fast forward in storage type `T` against the f64 reference on the same stored inputs.
///
/// Tolerance per element: `u(T) * |y_ref| + 6 * eps_f32` for inputs in [-1, 1] — one rounding to
/// the storage type plus the f32 rounding of the table and of the two products and their sum.
fn check_forward<T: Element>(cfg: &RopeConfig, tokens: usize, heads: usize, seed: u64, max_pos: u64) {
    let rope = Rope::new(*cfg).unwrap();
    let mut rng = Rng(seed);
    let x: Vec<T> = rng.vec(tokens * heads * cfg.head_dim);
    let positions: Vec<u64> = (0..tokens).map(|_| rng.next_u64() % (max_pos + 1)).collect();
    let want = naive::forward(cfg, &to_f64(&x), heads, &positions.iter().map(|&p| p as f64).collect::<Vec<_>>());
    let mut got = x.clone();
    rope.forward(&mut got, heads, &positions).unwrap();
    let u = unit_roundoff(T::DTYPE) as f64;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let tol = u * w.abs() + 6.0 * f32::EPSILON as f64;
        assert!((g.to_f32() as f64 - w).abs() <= tol, "{:?} elem {i}: got {g:?} want {w} (tol {tol})", T::DTYPE);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn forward_matches_naive(cfg in config_strategy(), tokens in 1usize..70, heads in 1usize..5, seed in any::<u64>(),
                             big in any::<bool>()) {
        // Positions up to 2^20 exercise the f64 angles (an f32 angle would be off by ~0.06 rad).
        let max_pos = if big { 1 << 20 } else { 64 };
        check_forward::<f32>(&cfg, tokens, heads, seed, max_pos);
        check_forward::<bf16>(&cfg, tokens, heads, seed, max_pos);
        check_forward::<f16>(&cfg, tokens, heads, seed, max_pos);
    }

    /// `reposition(rope(k at 0..n), 0, s) == rope(k at s..s+n)`: bit for bit for the token at
    /// position 0 (rotating by 0 is exact and both paths then take the same angle), and within
    /// `4 u(T) + 12 eps_f32` for the others (two rotations against one, unit-range keys).
    #[test]
    fn reposition_from_zero_equals_rope_at_offset(cfg in config_strategy(), tokens in 1usize..40, heads in 1usize..4,
                                                  s in 0u64..2_000_000, seed in any::<u64>()) {
        let rope = Rope::new(cfg).unwrap();
        fn run<T: Element>(rope: &Rope, tokens: usize, heads: usize, s: u64, seed: u64) {
            let row = heads * rope.config().head_dim;
            let k: Vec<T> = Rng(seed).vec(tokens * row);
            let mut cached = k.clone();
            rope.forward_contiguous(&mut cached, heads, 0).unwrap();
            rope.reposition(&mut cached, heads, 0, s).unwrap();
            let mut direct = k;
            rope.forward_contiguous(&mut direct, heads, s).unwrap();
            assert_eq!(cached[..row], direct[..row], "{:?}: token 0", T::DTYPE);
            let tol = 4.0 * unit_roundoff(T::DTYPE) + 12.0 * f32::EPSILON;
            for (i, (c, d)) in cached.iter().zip(&direct).enumerate() {
                assert!((c.to_f32() - d.to_f32()).abs() <= tol, "{:?} elem {i}: {c:?} vs {d:?}", T::DTYPE);
            }
        }
        run::<f32>(&rope, tokens, heads, s, seed);
        run::<bf16>(&rope, tokens, heads, s, seed);
        run::<f16>(&rope, tokens, heads, s, seed);
    }

    /// From any offset `a` to any `b` (either direction): one rotation of the stored keys, so
    /// within `u(T) * |y| + 6 * eps_f32` of the exact f64 rotation of what was stored, and within
    /// `4 u(T) + 12 eps_f32` of rotating the original keys at `b` directly (two roundings, the first
    /// one turned by the rotation, for unit-range inputs).
    #[test]
    fn reposition_between_offsets_is_one_rotation(cfg in config_strategy(), tokens in 1usize..40, heads in 1usize..4,
                                                  a in 0u64..100_000, b in 0u64..100_000, seed in any::<u64>()) {
        let rope = Rope::new(cfg).unwrap();
        fn run<T: Element>(rope: &Rope, tokens: usize, heads: usize, a: u64, b: u64, seed: u64) {
            let cfg = rope.config();
            let k: Vec<T> = Rng(seed).vec(tokens * heads * cfg.head_dim);
            let mut at_a = k.clone();
            rope.forward_contiguous(&mut at_a, heads, a).unwrap();
            let mut moved = at_a.clone();
            rope.reposition(&mut moved, heads, a, b).unwrap();
            let delta = vec![b as f64 - a as f64; tokens];
            let one_rotation = naive::forward(cfg, &to_f64(&at_a), heads, &delta);
            let truth_positions: Vec<f64> = (0..tokens).map(|t| (b + t as u64) as f64).collect();
            let truth = naive::forward(cfg, &to_f64(&k), heads, &truth_positions);
            let u = unit_roundoff(T::DTYPE) as f64;
            let eps = f32::EPSILON as f64;
            for i in 0..moved.len() {
                let g = moved[i].to_f32() as f64;
                assert!((g - one_rotation[i]).abs() <= u * one_rotation[i].abs() + 6.0 * eps,
                    "{:?} elem {i}: {g} vs one rotation {}", T::DTYPE, one_rotation[i]);
                assert!((g - truth[i]).abs() <= 4.0 * u + 12.0 * eps,
                    "{:?} elem {i}: {g} vs rope at b {}", T::DTYPE, truth[i]);
            }
        }
        run::<f32>(&rope, tokens, heads, a, b, seed);
        run::<bf16>(&rope, tokens, heads, a, b, seed);
    }

    /// `rope(q, m) . rope(k, n)` depends on `m - n` only: shifting both by `c` keeps every score
    /// (f64 reference to 1e-9, the f32 path to 1e-5 for unit-range vectors of <= 40 dims).
    #[test]
    fn scores_depend_on_relative_position_only(cfg in config_strategy(), m in 0u64..5000, n in 0u64..5000,
                                               c in 0u64..100_000, seed in any::<u64>()) {
        let rope = Rope::new(cfg).unwrap();
        let mut rng = Rng(seed);
        let q: Vec<f32> = rng.vec(cfg.head_dim);
        let k: Vec<f32> = rng.vec(cfg.head_dim);
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let naive_score = |pm: u64, pn: u64| {
            dot(&naive::forward(&cfg, &to_f64(&q), 1, &[pm as f64]), &naive::forward(&cfg, &to_f64(&k), 1, &[pn as f64]))
        };
        prop_assert!((naive_score(m, n) - naive_score(m + c, n + c)).abs() <= 1e-9);
        let fast_score = |pm: u64, pn: u64| {
            let (mut qq, mut kk) = (q.clone(), k.clone());
            rope.forward(&mut qq, 1, &[pm]).unwrap();
            rope.forward(&mut kk, 1, &[pn]).unwrap();
            dot(&to_f64(&qq), &to_f64(&kk))
        };
        prop_assert!((fast_score(m, n) - fast_score(m + c, n + c)).abs() <= 1e-5);
        prop_assert!((fast_score(m, n) - naive_score(m, n)).abs() <= 1e-5);
    }

    /// Backward against central finite differences of the f64 reference for
    /// `L(x) = sum(w * rope(x))`; every input coordinate, tolerance 1e-5 (f32 backward).
    #[test]
    fn backward_matches_finite_differences(cfg in config_strategy(), tokens in 1usize..5, heads in 1usize..3,
                                           seed in any::<u64>()) {
        let rope = Rope::new(cfg).unwrap();
        let mut rng = Rng(seed);
        let n = tokens * heads * cfg.head_dim;
        let x: Vec<f64> = (0..n).map(|_| rng.unit() as f64).collect();
        let w: Vec<f32> = rng.vec(n);
        let positions: Vec<u64> = (0..tokens).map(|_| rng.next_u64() % 10_000).collect();
        let pos_f: Vec<f64> = positions.iter().map(|&p| p as f64).collect();
        let loss = |x: &[f64]| naive::forward(&cfg, x, heads, &pos_f).iter().zip(&w).map(|(y, w)| y * *w as f64).sum::<f64>();
        let mut grad = w.clone();
        rope.backward(&mut grad, heads, &positions).unwrap();
        let h = 1e-4;
        for j in 0..n {
            let (mut xp, mut xm) = (x.clone(), x.clone());
            xp[j] += h;
            xm[j] -= h;
            let fd = (loss(&xp) - loss(&xm)) / (2.0 * h);
            prop_assert!((grad[j] as f64 - fd).abs() <= 1e-5, "coord {}: backward {} fd {}", j, grad[j], fd);
        }
    }
}

/// The position cache changes speed only: forward and backward give the same bits with and
/// without it, for positions inside and past the cached range.
#[test]
fn cached_positions_give_the_same_bits() {
    for layout in [RopeLayout::RotateHalf, RopeLayout::Interleaved] {
        let cfg = RopeConfig { rotary_dim: 6, base: 500_000.0, position_scale: 0.5, layout, ..RopeConfig::new(10) };
        let plain = Rope::new(cfg).unwrap();
        let cached = plain.clone().with_cached_positions(100).unwrap();
        assert_eq!(cached.cached_positions(), 100);
        let positions: Vec<u64> = (0..150).map(|t| (t * 37) % 160).collect();
        let x: Vec<bf16> = Rng(3).vec(150 * 3 * 10);
        let (mut a, mut b) = (x.clone(), x);
        plain.forward(&mut a, 3, &positions).unwrap();
        cached.forward(&mut b, 3, &positions).unwrap();
        assert_eq!(a, b);
        plain.backward(&mut a, 3, &positions).unwrap();
        cached.backward(&mut b, 3, &positions).unwrap();
        assert_eq!(a, b);
    }
}

#[test]
fn backward_undoes_forward_and_tail_dims_pass_through() {
    let cfg = RopeConfig { rotary_dim: 6, ..RopeConfig::new(10) };
    let rope = Rope::new(cfg).unwrap();
    let x: Vec<f32> = Rng(7).vec(3 * 2 * 10);
    let positions = [0, 17, 123_456];
    let mut y = x.clone();
    rope.forward(&mut y, 2, &positions).unwrap();
    for t in 0..3 {
        for h in 0..2 {
            let row = (t * 2 + h) * 10;
            assert_eq!(y[row + 6..row + 10], x[row + 6..row + 10], "unrotated tail changed");
        }
    }
    assert_eq!(y[..20], x[..20], "position 0 is the identity");
    assert_ne!(y[20..], x[20..]);
    rope.backward(&mut y, 2, &positions).unwrap();
    for (a, b) in y.iter().zip(&x) {
        assert!((a - b).abs() <= 4.0 * f32::EPSILON, "{a} vs {b}");
    }
}

#[test]
fn layouts_pair_the_documented_dims() {
    // One pair per layout turned by 90 degrees at a position whose angle is pi/2 for pair 0.
    for layout in [RopeLayout::RotateHalf, RopeLayout::Interleaved] {
        let cfg = RopeConfig { position_scale: std::f64::consts::FRAC_PI_2, layout, ..RopeConfig::new(4) };
        let rope = Rope::new(cfg).unwrap();
        let (a, b) = cfg.pair(0);
        let mut x = [0f32; 4];
        x[a] = 1.0;
        rope.forward(&mut x, 1, &[1]).unwrap();
        assert!(x[a].abs() < 1e-7 && (x[b] - 1.0).abs() < 1e-7, "{layout:?}: {x:?}");
    }
    assert_eq!(RopeConfig { layout: RopeLayout::RotateHalf, ..RopeConfig::new(8) }.pair(1), (1, 5));
    assert_eq!(RopeConfig { layout: RopeLayout::Interleaved, ..RopeConfig::new(8) }.pair(1), (2, 3));
}

#[test]
fn bad_input_is_a_typed_error() {
    let invalid = |cfg: RopeConfig| matches!(Rope::new(cfg), Err(Error::InvalidConfig(_)));
    assert!(invalid(RopeConfig::new(0)));
    assert!(invalid(RopeConfig { rotary_dim: 3, ..RopeConfig::new(8) }));
    assert!(invalid(RopeConfig { rotary_dim: 10, ..RopeConfig::new(8) }));
    assert!(invalid(RopeConfig { base: f64::NAN, ..RopeConfig::new(8) }));
    assert!(invalid(RopeConfig { base: -1.0, ..RopeConfig::new(8) }));
    assert!(invalid(RopeConfig { position_scale: 0.0, ..RopeConfig::new(8) }));
    let rope = Rope::new(RopeConfig::new(8)).unwrap();
    let mut x = vec![0f32; 2 * 8];
    assert!(matches!(rope.forward(&mut x, 1, &[0]), Err(Error::ShapeMismatch(_))));
    assert!(matches!(rope.forward(&mut x[..15], 1, &[0, 1]), Err(Error::ShapeMismatch(_))));
    assert!(matches!(rope.reposition(&mut x, 0, 0, 1), Err(Error::InvalidConfig(_))));
    assert!(matches!(rope.backward(&mut x, 3, &[0]), Err(Error::ShapeMismatch(_))));
    assert!(rope.forward(&mut x, 2, &[5]).is_ok());
}
