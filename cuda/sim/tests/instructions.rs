//! One small hand-written kernel per instruction family, with answers computed on the host.

mod common;

use common::{kernel, rand_u32};
use squid_ptxsim::{Arg, LaunchConfig, Simulator};

/// Runs `k` over `threads` threads (one block) with `input` and an output of `out_len` u32.
fn run_u32(ptx: &str, input: &[u32], out_len: usize, threads: u32) -> Vec<u32> {
    let mut sim = Simulator::new(ptx).unwrap_or_else(|e| panic!("{e}\n{ptx}"));
    let bin = sim.alloc(input);
    let bout = sim.alloc_zeroed::<u32>(out_len);
    sim.launch("k", LaunchConfig::linear(1, threads), &[Arg::Ptr(bout), Arg::Ptr(bin), Arg::U32(input.len() as u32)])
        .unwrap_or_else(|e| panic!("{e}"));
    sim.read(bout).unwrap()
}

/// Each thread t reads a = in[2t], b = in[2t+1] and writes K results at out[K*t..].
fn int_kernel(ops: &[&str]) -> String {
    let mut body = String::from(
        "    mul.wide.u32 %rd1, %r_tid, 8;\n    add.s64 %rd2, %rd_in, %rd1;\n    ld.global.v2.u32 {%r1, %r2}, [%rd2];\n",
    );
    for (k, op) in ops.iter().enumerate() {
        body += &format!(
            "    {op}\n    mul.lo.s32 %r10, %r_tid, {n};\n    add.s32 %r10, %r10, {k};\n    mul.wide.u32 %rd3, %r10, 4;\n    add.s64 %rd4, %rd_out, %rd3;\n    st.global.u32 [%rd4], %r3;\n",
            n = ops.len()
        );
    }
    kernel(".reg .b32 %r<12>; .reg .b64 %rd<8>; .reg .pred %p<4>; .reg .b16 %rs<4>;", &body)
}

#[test]
fn integer_arithmetic_logic_and_bits() {
    type F = fn(u32, u32) -> u32;
    let cases: Vec<(&str, F)> = vec![
        ("add.s32 %r3, %r1, %r2;", |a, b| a.wrapping_add(b)),
        ("sub.s32 %r3, %r1, %r2;", |a, b| a.wrapping_sub(b)),
        ("mul.lo.s32 %r3, %r1, %r2;", |a, b| a.wrapping_mul(b)),
        ("mul.hi.u32 %r3, %r1, %r2;", |a, b| ((u64::from(a) * u64::from(b)) >> 32) as u32),
        ("mul.hi.s32 %r3, %r1, %r2;", |a, b| ((i64::from(a as i32) * i64::from(b as i32)) >> 32) as u32),
        ("mul.wide.s32 %rd5, %r1, %r2; shr.u64 %rd5, %rd5, 16; cvt.u32.u64 %r3, %rd5;", |a, b| {
            ((i64::from(a as i32) * i64::from(b as i32)) >> 16) as u32
        }),
        ("mad.lo.s32 %r3, %r1, %r2, 7;", |a, b| a.wrapping_mul(b).wrapping_add(7)),
        ("div.u32 %r3, %r1, %r2;", |a, b| a.checked_div(b).unwrap_or(u32::MAX)),
        ("rem.u32 %r3, %r1, %r2;", |a, b| if b == 0 { a } else { a % b }),
        ("div.s32 %r3, %r1, %r2;", |a, b| if b == 0 { u32::MAX } else { (a as i32).wrapping_div(b as i32) as u32 }),
        ("rem.s32 %r3, %r1, %r2;", |a, b| if b == 0 { a } else { (a as i32).wrapping_rem(b as i32) as u32 }),
        ("min.s32 %r3, %r1, %r2;", |a, b| (a as i32).min(b as i32) as u32),
        ("max.u32 %r3, %r1, %r2;", |a, b| a.max(b)),
        ("neg.s32 %r3, %r1;", |a, _| a.wrapping_neg()),
        ("abs.s32 %r3, %r1;", |a, _| (a as i32).unsigned_abs()),
        ("and.b32 %r3, %r1, %r2;", |a, b| a & b),
        ("or.b32 %r3, %r1, %r2;", |a, b| a | b),
        ("xor.b32 %r3, %r1, %r2;", |a, b| a ^ b),
        ("not.b32 %r3, %r1;", |a, _| !a),
        ("and.b32 %r4, %r2, 31; shl.b32 %r3, %r1, %r4;", |a, b| a << (b & 31)),
        ("shr.u32 %r3, %r1, %r2;", |a, b| if b >= 32 { 0 } else { a >> b }),
        ("shr.s32 %r3, %r1, %r2;", |a, b| ((a as i32) >> b.min(31)) as u32),
        ("popc.b32 %r3, %r1;", |a, _| a.count_ones()),
        ("clz.b32 %r3, %r1;", |a, _| a.leading_zeros()),
        ("brev.b32 %r3, %r1;", |a, _| a.reverse_bits()),
        ("bfe.u32 %r3, %r1, 5, 9;", |a, _| (a >> 5) & 0x1ff),
        ("bfe.s32 %r3, %r1, 20, 12;", |a, _| ((a as i32) >> 20) as u32),
        ("bfi.b32 %r3, %r1, %r2, 8, 4;", |a, b| (b & !0xf00) | ((a & 0xf) << 8)),
        ("prmt.b32 %r3, %r1, %r2, 0x3210;", |a, _| a),
        ("prmt.b32 %r3, %r1, %r2, 0x7654;", |_, b| b),
        ("prmt.b32 %r3, %r1, %r2, 0x0123;", |a, _| a.swap_bytes()),
        ("lop3.b32 %r3, %r1, %r2, %r1, 0x3c;", |a, b| a ^ b),
        ("shf.l.wrap.b32 %r3, %r1, %r1, %r2;", |a, b| a.rotate_left(b & 31)),
        ("setp.lt.s32 %p1, %r1, %r2; selp.u32 %r3, 11, 22, %p1;", |a, b| if (a as i32) < (b as i32) { 11 } else { 22 }),
        ("setp.lo.u32 %p1, %r1, %r2; selp.u32 %r3, 11, 22, %p1;", |a, b| if a < b { 11 } else { 22 }),
        ("setp.gt.and.u32 %p1|%p2, %r1, %r2, 1; selp.u32 %r3, 1, 0, %p2;", |a, b| u32::from(a <= b)),
        ("set.ne.u32.u32 %r3, %r1, %r2;", |a, b| if a != b { u32::MAX } else { 0 }),
        ("cvt.u16.u32 %rs1, %r1; cvt.s32.s16 %r3, %rs1;", |a, _| a as u16 as i16 as i32 as u32),
        ("cvt.sat.s8.s32 %r3, %r1; and.b32 %r3, %r3, 255;", |a, _| ((a as i32).clamp(-128, 127) as u32) & 255),
        ("mov.b32 {%rs1, %rs2}, %r1; mov.b32 %r3, {%rs2, %rs1};", |a, _| a.rotate_left(16)),
    ];
    let ops: Vec<&str> = cases.iter().map(|c| c.0).collect();
    let ptx = int_kernel(&ops);
    let threads = 96usize;
    let mut input = rand_u32(2 * threads, 42);
    // Edge values in the first threads.
    let edges = [(0u32, 0u32), (u32::MAX, 1), (0x8000_0000, u32::MAX), (5, 0), (7, 3), (1, 33), (0x1234_5678, 40)];
    for (i, (a, b)) in edges.iter().enumerate() {
        input[2 * i] = *a;
        input[2 * i + 1] = *b;
    }
    let out = run_u32(&ptx, &input, threads * ops.len(), threads as u32);
    for t in 0..threads {
        let (a, b) = (input[2 * t], input[2 * t + 1]);
        for (k, (op, f)) in cases.iter().enumerate() {
            assert_eq!(out[t * ops.len() + k], f(a, b), "`{op}` a={a:#x} b={b:#x}");
        }
    }
}

/// f32 inputs a, b per thread; results as bits.
fn float_results(ops: &[&str], input: &[f32], threads: usize) -> Vec<f32> {
    float_results_with(ops, input, threads, false)
}

fn float_results_with(ops: &[&str], input: &[f32], threads: usize, worst_case: bool) -> Vec<f32> {
    let bits: Vec<u32> = input.iter().map(|f| f.to_bits()).collect();
    let body_ops: Vec<String> =
        ops.iter().map(|o| format!("mov.b32 %f1, %r1; mov.b32 %f2, %r2; {o} mov.b32 %r3, %f3;")).collect();
    let refs: Vec<&str> = body_ops.iter().map(String::as_str).collect();
    let ptx = int_kernel(&refs).replace(".reg .pred %p<4>;", ".reg .pred %p<4>; .reg .f32 %f<8>; .reg .f64 %fd<4>;");
    let mut sim = Simulator::new(&ptx).unwrap();
    sim.options.approx_worst_case = worst_case;
    let bin = sim.alloc(&bits);
    let bout = sim.alloc_zeroed::<u32>(threads * ops.len());
    sim.launch(
        "k",
        LaunchConfig::linear(1, threads as u32),
        &[Arg::Ptr(bout), Arg::Ptr(bin), Arg::U32(bits.len() as u32)],
    )
    .unwrap();
    sim.read::<f32>(bout).unwrap()
}

fn below(x: f64) -> f32 {
    let r = x as f32;
    if f64::from(r) > x {
        f32::from_bits(if r > 0.0 { r.to_bits() - 1 } else { r.to_bits() + 1 })
    } else {
        r
    }
}

fn above(x: f64) -> f32 {
    -below(-x)
}

fn toward_zero(x: f64) -> f32 {
    if x >= 0.0 {
        below(x)
    } else {
        above(x)
    }
}

#[test]
fn float_rounding_modes_match_exact_arithmetic() {
    // Inputs of moderate size: f64 holds every sum and product of two of them exactly.
    let threads = 64;
    let vals: Vec<f32> = rand_u32(2 * threads, 9).iter().map(|&u| (u as f32 / 4e8 - 5.0) * 1.37).collect();
    let ops = [
        "add.rn.f32 %f3, %f1, %f2;",
        "add.rz.f32 %f3, %f1, %f2;",
        "add.rm.f32 %f3, %f1, %f2;",
        "add.rp.f32 %f3, %f1, %f2;",
        "sub.rz.f32 %f3, %f1, %f2;",
        "mul.rn.f32 %f3, %f1, %f2;",
        "mul.rz.f32 %f3, %f1, %f2;",
        "mul.rm.f32 %f3, %f1, %f2;",
        "mul.rp.f32 %f3, %f1, %f2;",
        "fma.rn.f32 %f3, %f1, %f2, %f1;",
        "fma.rz.f32 %f3, %f1, %f2, %f1;",
        "div.rn.f32 %f3, %f1, %f2;",
        "div.rz.f32 %f3, %f1, %f2;",
        "abs.f32 %f4, %f1; sqrt.rn.f32 %f3, %f4;",
        "abs.f32 %f4, %f1; sqrt.rp.f32 %f3, %f4;",
        "rcp.rn.f32 %f3, %f1;",
        "neg.f32 %f3, %f1;",
        "min.f32 %f3, %f1, %f2;",
        "max.f32 %f3, %f1, %f2;",
        "cvt.rzi.f32.f32 %f3, %f1;",
        "cvt.rni.f32.f32 %f3, %f1;",
        "cvt.rmi.s32.f32 %r4, %f1; cvt.rn.f32.s32 %f3, %r4;",
        "cvt.f64.f32 %fd1, %f1; cvt.f64.f32 %fd2, %f2; add.f64 %fd1, %fd1, %fd2; cvt.rz.f32.f64 %f3, %fd1;",
        "mul.f32 %f4, %f1, 0f3DCCCCCD; cvt.rn.f16.f32 %rs1, %f4; cvt.f32.f16 %f3, %rs1;",
        "cvt.rn.bf16.f32 %rs1, %f1; cvt.f32.bf16 %f3, %rs1;",
        "cvt.rz.bf16.f32 %rs1, %f1; cvt.f32.bf16 %f3, %rs1;",
        "setp.gt.f32 %p1, %f1, %f2; selp.f32 %f3, 0f3F800000, 0f00000000, %p1;",
    ];
    let out = float_results(&ops, &vals, threads);
    for t in 0..threads {
        let (a, b) = (vals[2 * t], vals[2 * t + 1]);
        let (ad, bd) = (f64::from(a), f64::from(b));
        let q = ad / bd;
        let expect = [
            a + b,
            toward_zero(ad + bd),
            below(ad + bd),
            above(ad + bd),
            toward_zero(ad - bd),
            a * b,
            toward_zero(ad * bd),
            below(ad * bd),
            above(ad * bd),
            a.mul_add(b, a),
            toward_zero(ad * bd + ad),
            a / b,
            // a/b in f64 is not exact, but rounding it toward zero agrees unless it lands on an
            // f32 boundary, which these inputs avoid (checked below).
            toward_zero(q),
            a.abs().sqrt(),
            above(ad.abs().sqrt()),
            1.0 / a,
            -a,
            a.min(b),
            a.max(b),
            a.trunc(),
            a.round_ties_even(),
            a.floor(),
            toward_zero(ad + bd),
            half::f16::from_f32(a * 0.1f32).to_f32(),
            half::bf16::from_f32(a).to_f32(),
            f32::from_bits(a.to_bits() & 0xffff_0000),
            if a > b { 1.0 } else { 0.0 },
        ];
        assert_ne!(f64::from(q as f32), q, "test input lands on an f32");
        for (k, e) in expect.iter().enumerate() {
            assert_eq!(
                out[t * ops.len() + k].to_bits(),
                e.to_bits(),
                "`{}` a={a} b={b}: {} vs {e}",
                ops[k],
                out[t * ops.len() + k]
            );
        }
    }
}

#[test]
fn approximate_functions_are_within_ptx_bounds() {
    check_approx(false);
    check_approx(true);
}

fn check_approx(worst_case: bool) {
    let threads = 128;
    let vals: Vec<f32> = rand_u32(2 * threads, 5).iter().map(|&u| (u as f32 / 4.29e9 - 0.5) * 6.0).collect();
    let ops = [
        "ex2.approx.ftz.f32 %f3, %f1;",
        "abs.f32 %f4, %f1; add.f32 %f4, %f4, 0f3F000000; lg2.approx.f32 %f3, %f4;",
        "rcp.approx.ftz.f32 %f3, %f1;",
        "abs.f32 %f4, %f1; rsqrt.approx.f32 %f3, %f4;",
        "sin.approx.f32 %f3, %f1;",
        "cos.approx.f32 %f3, %f1;",
        "div.approx.f32 %f3, %f1, %f2;",
        "abs.f32 %f4, %f1; sqrt.approx.f32 %f3, %f4;",
        "tanh.approx.f32 %f3, %f1;",
    ];
    let out = float_results_with(&ops, &vals, threads, worst_case);
    // (relative bound, absolute bound) from the PTX ISA's statements for each instruction.
    let bounds = [
        (2f64.powi(-22), 0.0),
        (2f64.powi(-22), 2f64.powi(-22)),
        (2f64.powi(-23), 0.0),
        (2f64.powf(-22.9), 0.0),
        (0.0, 2f64.powf(-20.5)),
        (0.0, 2f64.powf(-20.5)),
        (2f64.powi(-22), 0.0),
        (2f64.powi(-23), 0.0),
        (2f64.powi(-11), 0.0),
    ];
    for t in 0..threads {
        let (a, b) = (f64::from(vals[2 * t]), f64::from(vals[2 * t + 1]));
        let exact = [
            a.exp2(),
            f64::from(vals[2 * t].abs() + 0.5).log2(), // the f32 sum the kernel feeds lg2
            1.0 / a,
            1.0 / a.abs().sqrt(),
            a.sin(),
            a.cos(),
            a / b,
            a.abs().sqrt(),
            a.tanh(),
        ];
        for (k, e) in exact.iter().enumerate() {
            let got = f64::from(out[t * ops.len() + k]);
            let (rel, abs) = bounds[k];
            let tol = rel * e.abs() + abs + f64::from(f32::EPSILON) * e.abs() * 0.5;
            assert!((got - e).abs() <= tol, "`{}` x={a}: {got} vs {e}", ops[k]);
        }
    }
}

/// The next f32 from `v` towards +inf (`up`) or -inf.
fn step(v: f32, up: bool) -> f32 {
    if v == 0.0 {
        return if up { f32::from_bits(1) } else { -f32::from_bits(1) };
    }
    let b = v.to_bits();
    f32::from_bits(if (v > 0.0) == up { b + 1 } else { b - 1 })
}

fn flush(v: f32) -> f32 {
    if v.is_subnormal() {
        0.0f32.copysign(v)
    } else {
        v
    }
}

/// What the PTX ISA's tables give for zeros, infinities and NaN (None: not a special input).
fn special(func: &str, x: f32) -> Option<f32> {
    let inf = f32::INFINITY;
    if x.is_nan() {
        return Some(f32::NAN);
    }
    if x != 0.0 && x.is_finite() && !(x < 0.0 && matches!(func, "lg2" | "rsqrt" | "sqrt")) {
        return None;
    }
    let neg = x.is_sign_negative();
    Some(match (func, x == 0.0, neg) {
        ("ex2", true, _) => 1.0,
        ("ex2", false, true) => 0.0,
        ("ex2", false, false) => inf,
        ("lg2", true, _) => -inf,
        ("lg2", false, false) => inf,
        ("rcp", true, _) => inf.copysign(x),
        ("rcp", false, _) => 0.0f32.copysign(x),
        ("rsqrt", true, _) => inf.copysign(x),
        ("rsqrt", false, false) => 0.0,
        ("sqrt", true, _) => x,
        ("sqrt", false, false) => inf,
        ("sin" | "tanh", true, _) => x,
        ("cos", true, _) => 1.0,
        ("tanh", false, _) => 1.0f32.copysign(x),
        // Negative (finite or not) inputs of lg2, rsqrt and sqrt; sin/cos of infinities.
        _ => f32::NAN,
    })
}

#[test]
fn worst_case_approximations_sit_exactly_on_the_isa_bounds() {
    // Bounds from the PTX ISA ("Floating Point Instructions": rcp, sqrt, rsqrt, sin, cos, lg2,
    // ex2, tanh), written out here independently of the simulator's table.
    let threads = 512;
    let raw = common::rand_u32(threads, 77);
    for (func, ftz) in [
        ("ex2", false),
        ("ex2", true),
        ("rcp", false),
        ("rcp", true),
        ("sqrt", false),
        ("sqrt", true),
        ("rsqrt", false),
        ("rsqrt", true),
        ("lg2", false),
        ("lg2", true),
        ("sin", false),
        ("cos", true),
        ("tanh", false),
    ] {
        let mut xs: Vec<f32> = raw
            .iter()
            .enumerate()
            .map(|(i, &u)| match i % 4 {
                // Any bits (NaNs, infinities, subnormals, every exponent).
                0 => f32::from_bits(u),
                // The range where most kernels live.
                1 => (u as f32 / 4.29e9 - 0.5) * 16.0,
                // Near 1 (lg2's absolute-error interval) and within [-2pi, 2pi].
                2 => 0.4 + u as f32 / 4.29e9 * 1.8,
                // Up to 100 pi and subnormals.
                _ => {
                    if u % 2 == 0 {
                        (u as f32 / 4.29e9 - 0.5) * 600.0
                    } else {
                        f32::from_bits(u >> 9) * if u % 3 == 0 { -1.0 } else { 1.0 }
                    }
                }
            })
            .collect();
        let specials = [0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, 1.0, -1.0, f32::from_bits(1), 2.0, 0.5];
        xs[..specials.len()].copy_from_slice(&specials);
        let sfx = if ftz { ".ftz" } else { "" };
        let op = format!("{func}.approx{sfx}.f32 %f3, %f1;");
        let input: Vec<f32> = xs.iter().flat_map(|&x| [x, 0.0]).collect();
        let got = float_results_with(&[op.as_str()], &input, threads, true);
        let mut at_edge = 0;
        for (t, &x0) in xs.iter().enumerate() {
            let x = if ftz { flush(x0) } else { x0 };
            let g = got[t];
            if let Some(want) = special(func, x) {
                assert!(
                    g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                    "{op} x={x0:e}: {g:e}, the ISA says {want:e}"
                );
                continue;
            }
            let d = f64::from(x);
            let e = match func {
                "ex2" => d.exp2(),
                "rcp" => 1.0 / d,
                "sqrt" => d.sqrt(),
                "rsqrt" => 1.0 / d.sqrt(),
                "lg2" => d.log2(),
                "sin" => d.sin(),
                "cos" => d.cos(),
                _ => d.tanh(),
            };
            let cr = e as f32;
            let ulps = match func {
                "ex2" => Some(2),
                "rcp" => Some(1),
                _ => None,
            };
            if let Some(n) = ulps {
                if !cr.is_finite() {
                    assert_eq!(g.to_bits(), cr.to_bits(), "{op} x={x0:e}");
                    continue;
                }
                let (mut lo, mut hi) = (cr, cr);
                for _ in 0..n {
                    lo = step(lo, false);
                    hi = step(hi, true);
                }
                let ok = |v: f32| if ftz { flush(v) } else { v };
                assert!(g == ok(lo) || g == ok(hi), "{op} x={x0:e}: {g:e} is not {n} ulp from {cr:e}");
                at_edge += 1;
                continue;
            }
            if func == "tanh" && x.is_subnormal() {
                assert_eq!(g, x, "tanh passes subnormals through");
                continue;
            }
            let tol = match func {
                "sqrt" => 2f64.powi(-23) * e.abs(),
                "rsqrt" => 2f64.powf(-22.9) * e.abs(),
                "lg2" if x > 0.5 && x < 2.0 => 2f64.powi(-22),
                "lg2" => 2f64.powi(-22) * e.abs(),
                "sin" | "cos" if x.abs() <= 2.0 * std::f32::consts::PI => 2f64.powf(-20.5),
                "sin" | "cos" => 2f64.powf(-14.7),
                _ => 2f64.powi(-11) * e.abs(),
            };
            let err = (f64::from(g) - e).abs();
            assert!(err <= tol, "{op} x={x0:e}: {g:e} is {err:e} from {e:e}, over the bound {tol:e}");
            // The next f32 outward is over the bound: the result is on the edge.
            let outward = step(g, f64::from(g) > e);
            if !(ftz && g == 0.0) && outward.is_finite() {
                let out_err = (f64::from(outward) - e).abs();
                assert!(out_err > tol, "{op} x={x0:e}: {g:e} stops short of the bound ({err:e} < {tol:e})");
                at_edge += 1;
            }
        }
        assert!(at_edge > threads / 4, "{op}: only {at_edge} results checked at the edge");
    }
}

#[test]
fn branches_loops_and_predicates() {
    // out[t] = sum_{i < t} i via a loop with a negated guard.
    let ptx = kernel(
        ".reg .b32 %r<6>; .reg .b64 %rd<4>; .reg .pred %p<3>;",
        r#"
    mov.u32 %r1, 0;
    mov.u32 %r2, 0;
$L_loop:
    setp.ge.u32 %p1, %r1, %r_tid;
    @%p1 bra $L_done;
    add.s32 %r2, %r2, %r1;
    add.s32 %r1, %r1, 1;
    bra.uni $L_loop;
$L_done:
    setp.eq.u32 %p2, %r_tid, 3;
    @!%p2 bra $L_store;
    mov.u32 %r2, 999;
$L_store:
    mul.wide.u32 %rd1, %r_tid, 4;
    add.s64 %rd2, %rd_out, %rd1;
    st.global.u32 [%rd2], %r2;
"#,
    );
    let out = run_u32(&ptx, &[0], 40, 40);
    for (t, v) in out.iter().enumerate() {
        let t = t as u32;
        assert_eq!(*v, if t == 3 { 999 } else { t * t.saturating_sub(1) / 2 });
    }
}

#[test]
fn warp_shuffles_in_all_modes() {
    // Each lane contributes 100 + lane; results per mode.
    let ptx = kernel(
        ".reg .b32 %r<16>; .reg .b64 %rd<4>; .reg .pred %p<6>;",
        r#"
    add.s32 %r1, %r_tid, 100;
    shfl.sync.up.b32 %r2|%p1, %r1, 3, 0, -1;
    shfl.sync.down.b32 %r3|%p2, %r1, 5, 31, -1;
    shfl.sync.bfly.b32 %r4, %r1, 6, 31, -1;
    shfl.sync.idx.b32 %r5, %r1, 7, 31, -1;
    shfl.sync.down.b32 %r6|%p3, %r1, 2, 0x181f, -1;
    shfl.sync.idx.b32 %r7, %r1, 1, 0x1c1f, -1;
    selp.u32 %r8, 1, 0, %p1;
    selp.u32 %r9, 1, 0, %p2;
    selp.u32 %r10, 1, 0, %p3;
    mul.lo.s32 %r11, %r_tid, 9;
    mul.wide.u32 %rd1, %r11, 4;
    add.s64 %rd2, %rd_out, %rd1;
    st.global.v4.u32 [%rd2], {%r2, %r3, %r4, %r5};
    st.global.v4.u32 [%rd2+16], {%r6, %r7, %r8, %r9};
    st.global.u32 [%rd2+32], %r10;
"#,
    );
    // 36 is a multiple of 4: every row starts 16-byte aligned.
    let out = run_u32(&ptx.replace("%r11, %r_tid, 9", "%r11, %r_tid, 12"), &[0], 64 * 12, 64);
    for t in 0..64u32 {
        let l = t % 32;
        let w = t - l;
        let v = |lane: u32| 100 + w + lane;
        let row = &out[(t * 12) as usize..(t * 12 + 9) as usize];
        let up = if l >= 3 { v(l - 3) } else { v(l) };
        let down = if l + 5 <= 31 { v(l + 5) } else { v(l) };
        // width-8 segments (c = ((32-8)<<8) | 0x1f): down by 2 stays in the segment.
        let down8 = if (l & 7) + 2 <= 7 { v(l + 2) } else { v(l) };
        // width-4 segments: idx 1 reads lane 1 of the lane's own segment.
        let idx4 = v((l & !3) | 1);
        let expect = [
            up,
            down,
            v(l ^ 6),
            v(7),
            down8,
            idx4,
            u32::from(l >= 3),
            u32::from(l + 5 <= 31),
            u32::from((l & 7) + 2 <= 7),
        ];
        assert_eq!(row, &expect, "thread {t}");
    }
}

#[test]
fn votes() {
    let ptx = kernel(
        ".reg .b32 %r<8>; .reg .b64 %rd<4>; .reg .pred %p<6>;",
        r#"
    and.b32 %r1, %r_tid, 3;
    setp.eq.u32 %p1, %r1, 0;
    vote.sync.ballot.b32 %r2, %p1, -1;
    vote.sync.any.pred %p2, %p1, -1;
    vote.sync.all.pred %p3, %p1, -1;
    setp.lt.u32 %p4, %r_tid, 1000;
    vote.sync.uni.pred %p5, %p4, -1;
    selp.u32 %r3, 1, 0, %p2;
    selp.u32 %r4, 1, 0, %p3;
    selp.u32 %r5, 1, 0, %p5;
    mul.wide.u32 %rd1, %r_tid, 16;
    add.s64 %rd2, %rd_out, %rd1;
    st.global.v4.u32 [%rd2], {%r2, %r3, %r4, %r5};
"#,
    );
    let out = run_u32(&ptx, &[0], 32 * 4, 32);
    for t in 0..32 {
        assert_eq!(&out[4 * t..4 * t + 4], &[0x1111_1111, 1, 0, 1]);
    }
}

#[test]
fn shared_memory_tree_reduction_with_barriers_and_dynamic_shared() {
    // Block-wide sum of in[] through static shared memory, then the result copied through
    // dynamic (extern) shared memory; one block of 256 threads.
    let ptx = kernel(
        ".reg .b32 %r<12>; .reg .b64 %rd<8>; .reg .pred %p<4>; .shared .align 4 .b8 sdata[1024];",
        r#"
    mul.wide.u32 %rd1, %r_tid, 4;
    add.s64 %rd2, %rd_in, %rd1;
    ld.global.u32 %r1, [%rd2];
    mov.u64 %rd3, sdata;
    add.s64 %rd4, %rd3, %rd1;
    st.shared.u32 [%rd4], %r1;
    bar.sync 0;
    mov.u32 %r2, 128;
$L_red:
    setp.ge.u32 %p1, %r_tid, %r2;
    @%p1 bra $L_skip;
    add.s32 %r3, %r_tid, %r2;
    mul.wide.u32 %rd5, %r3, 4;
    add.s64 %rd6, %rd3, %rd5;
    ld.shared.u32 %r4, [%rd6];
    ld.shared.u32 %r5, [%rd4];
    add.s32 %r5, %r5, %r4;
    st.shared.u32 [%rd4], %r5;
$L_skip:
    barrier.sync 0;
    shr.u32 %r2, %r2, 1;
    setp.ne.u32 %p2, %r2, 0;
    @%p2 bra $L_red;
    mov.u64 %rd7, dyn;
    cvta.shared.u64 %rd7, %rd7;
    setp.ne.u32 %p3, %r_tid, 0;
    @%p3 bra $L_wait;
    ld.shared.u32 %r6, [sdata];
    st.u32 [%rd7+4], %r6;
$L_wait:
    bar.sync 0;
    ld.u32 %r7, [%rd7+4];
    add.s64 %rd2, %rd_out, %rd1;
    st.global.u32 [%rd2], %r7;
"#,
    )
    .replace(".visible .entry k(", ".extern .shared .align 16 .b8 dyn[];\n.visible .entry k(");
    let input = rand_u32(256, 3).iter().map(|v| v % 1000).collect::<Vec<_>>();
    let mut sim = Simulator::new(&ptx).unwrap();
    let bin = sim.alloc(&input);
    let bout = sim.alloc_zeroed::<u32>(256);
    let cfg = LaunchConfig { dynamic_shared_bytes: 16, ..LaunchConfig::linear(1, 256) };
    sim.launch("k", cfg, &[Arg::Ptr(bout), Arg::Ptr(bin), Arg::U32(256)]).unwrap();
    let sum: u32 = input.iter().sum();
    assert_eq!(sim.read::<u32>(bout).unwrap(), vec![sum; 256]);
}

#[test]
fn atomics_global_and_shared() {
    // Over 4 blocks of 64: global add of tid, global max, a CAS counter, a shared inc; the
    // shared counter of each block ends at 64 and block 0 thread 0 records it after a barrier.
    let ptx = kernel(
        ".reg .b32 %r<12>; .reg .b64 %rd<8>; .reg .pred %p<4>; .reg .f32 %f<3>; .shared .align 4 .u32 cnt;",
        r#"
    mov.u32 %r9, %tid.x;
    setp.ne.u32 %p1, %r9, 0;
    @%p1 bra $L_a;
    st.shared.u32 [cnt], 0;
$L_a:
    bar.sync 0;
    atom.global.add.u32 %r1, [%rd_out], %r_tid;
    atom.global.max.s32 %r2, [%rd_out+4], %r_tid;
    red.global.add.u32 [%rd_out+8], 1;
    cvt.rn.f32.u32 %f1, %r_tid;
    red.global.add.f32 [%rd_out+12], %f1;
    atom.shared.inc.u32 %r3, [cnt], 1000;
    atom.global.exch.b32 %r4, [%rd_out+16], 7;
    bar.sync 0;
    @%p1 bra $L_b;
    ld.shared.u32 %r5, [cnt];
    mul.wide.u32 %rd1, %r_ctaid, 4;
    add.s64 %rd2, %rd_out, %rd1;
    st.global.u32 [%rd2+32], %r5;
$L_b:
"#,
    );
    let mut sim = Simulator::new(&ptx).unwrap();
    let bin = sim.alloc(&[0u32]);
    let bout = sim.alloc_zeroed::<u32>(16);
    sim.launch("k", LaunchConfig::linear(4, 64), &[Arg::Ptr(bout), Arg::Ptr(bin), Arg::U32(0)]).unwrap();
    let out = sim.read::<u32>(bout).unwrap();
    assert_eq!(out[0], (0..256).sum::<u32>());
    assert_eq!(out[1], 255);
    assert_eq!(out[2], 256);
    assert_eq!(f32::from_bits(out[3]), (0..256).sum::<u32>() as f32);
    assert_eq!(out[4], 7);
    assert_eq!(&out[8..12], &[64, 64, 64, 64]);
}

#[test]
fn vector_loads_params_and_local_memory() {
    let ptx = kernel(
        ".reg .b32 %r<12>; .reg .b64 %rd<8>; .reg .f32 %f<6>; .local .align 16 .b8 depot[32];",
        r#"
    mul.wide.u32 %rd1, %r_tid, 16;
    add.s64 %rd2, %rd_in, %rd1;
    ld.global.nc.v4.f32 {%f1, %f2, %f3, %f4}, [%rd2];
    mov.u64 %rd3, depot;
    cvta.local.u64 %rd4, %rd3;
    st.local.v4.f32 [%rd3+16], {%f4, %f3, %f2, %f1};
    ld.v2.f32 {%f1, %f2}, [%rd4+16];
    ld.local.v2.f32 {%f3, %f4}, [depot+24];
    ld.param.u32 %r1, [k_param_n];
    cvt.rn.f32.u32 %f5, %r1;
    add.f32 %f1, %f1, %f5;
    add.s64 %rd5, %rd_out, %rd1;
    st.global.v4.f32 [%rd5], {%f1, %f2, %f3, %f4};
"#,
    );
    let input: Vec<f32> = (0..64).map(|i| i as f32).collect();
    let mut sim = Simulator::new(&ptx).unwrap();
    let bin = sim.alloc(&input);
    let bout = sim.alloc_zeroed::<f32>(64);
    sim.launch("k", LaunchConfig::linear(2, 8), &[Arg::Ptr(bout), Arg::Ptr(bin), Arg::U32(1000)]).unwrap();
    let out = sim.read::<f32>(bout).unwrap();
    for t in 0..16 {
        let b = 4.0 * t as f32;
        assert_eq!(&out[4 * t..4 * t + 4], &[b + 3.0 + 1000.0, b + 2.0, b + 1.0, b]);
    }
}

#[test]
fn redux_match_and_barrier_reductions() {
    // 64 threads: redux over each warp, match on tid % 3, bar.red over the block.
    let ptx = kernel(
        ".reg .b32 %r<12>; .reg .b64 %rd<4>; .reg .pred %p<6>;",
        r#"
    redux.sync.add.u32 %r1, %r_tid, -1;
    redux.sync.max.s32 %r2, %r_tid, -1;
    rem.u32 %r3, %r_tid, 3;
    match.any.sync.b32 %r4, %r3, -1;
    match.all.sync.b32 %r5|%p1, %r3, -1;
    selp.u32 %r6, 1, 0, %p1;
    setp.lt.u32 %p2, %r_tid, 10;
    bar.red.popc.u32 %r7, 0, %p2;
    bar.red.or.pred %p3, 0, %p2;
    bar.red.and.pred %p4, 0, !%p2;
    selp.u32 %r8, 1, 0, %p3;
    selp.u32 %r9, 1, 0, %p4;
    mul.wide.u32 %rd1, %r_tid, 32;
    add.s64 %rd2, %rd_out, %rd1;
    st.global.v4.u32 [%rd2], {%r1, %r2, %r4, %r5};
    st.global.v4.u32 [%rd2+16], {%r6, %r7, %r8, %r9};
"#,
    );
    let out = run_u32(&ptx, &[0], 64 * 8, 64);
    for t in 0..64u32 {
        let w = t / 32 * 32;
        let any = (0..32).filter(|l| (w + l) % 3 == t % 3).fold(0u32, |m, l| m | (1 << l));
        let row = &out[(8 * t) as usize..(8 * t + 8) as usize];
        assert_eq!(row, &[(w..w + 32).sum::<u32>(), w + 31, any, 0, 0, 10, 1, 0], "thread {t}");
    }
}

#[test]
fn packed_half_arithmetic_rounds_once_to_nearest() {
    use half::{bf16, f16};
    let cases = [
        "add.rn.f16x2 %r3, %r1, %r2;",
        "mul.f16x2 %r3, %r1, %r2;",
        "fma.rn.f16x2 %r3, %r1, %r2, %r1;",
        "sub.bf16x2 %r3, %r1, %r2;",
        "fma.rn.bf16x2 %r3, %r1, %r2, %r2;",
        "max.bf16x2 %r3, %r1, %r2;",
        "neg.f16x2 %r3, %r1;",
        "mov.b32 {%rs1, %rs2}, %r1; mov.b32 {%rs3, %rs2}, %r2; mul.rn.bf16 %rs1, %rs1, %rs3; cvt.u32.u16 %r3, %rs1;",
    ];
    let threads = 64;
    let f: Vec<f32> = rand_u32(4 * threads, 11).iter().map(|&u| (u as f32 / 4.29e9 - 0.5) * 10.0).collect();
    let mut input = Vec::new();
    for t in 0..threads {
        // a and b as (lo, hi) pairs; f16 for threads < 32, bf16 after (each op reads its own type).
        let pack = |lo: f32, hi: f32, bf: bool| {
            if bf {
                u32::from(bf16::from_f32(lo).to_bits()) | (u32::from(bf16::from_f32(hi).to_bits()) << 16)
            } else {
                u32::from(f16::from_f32(lo).to_bits()) | (u32::from(f16::from_f32(hi).to_bits()) << 16)
            }
        };
        let bf = t >= 32;
        input.push(pack(f[4 * t], f[4 * t + 1], bf));
        input.push(pack(f[4 * t + 2], f[4 * t + 3], bf));
    }
    let out = run_u32(&int_kernel(&cases), &input, threads * cases.len(), threads as u32);
    let h = |v: u32, i: u32| f64::from(f16::from_bits((v >> (16 * i)) as u16).to_f32());
    let b = |v: u32, i: u32| f64::from(bf16::from_bits((v >> (16 * i)) as u16).to_f32());
    let ph = |lo: f64, hi: f64| u32::from(f16_rn(lo).to_bits()) | (u32::from(f16_rn(hi).to_bits()) << 16);
    let pb = |lo: f64, hi: f64| u32::from(bf16_rn(lo).to_bits()) | (u32::from(bf16_rn(hi).to_bits()) << 16);
    for t in 0..threads {
        let (x, y) = (input[2 * t], input[2 * t + 1]);
        let expect = [
            ph(h(x, 0) + h(y, 0), h(x, 1) + h(y, 1)),
            ph(h(x, 0) * h(y, 0), h(x, 1) * h(y, 1)),
            ph(h(x, 0) * h(y, 0) + h(x, 0), h(x, 1) * h(y, 1) + h(x, 1)),
            pb(b(x, 0) - b(y, 0), b(x, 1) - b(y, 1)),
            pb(b(x, 0) * b(y, 0) + b(y, 0), b(x, 1) * b(y, 1) + b(y, 1)),
            pb(b(x, 0).max(b(y, 0)), b(x, 1).max(b(y, 1))),
            x ^ 0x8000_8000,
            u32::from(bf16_rn(b(x, 0) * b(y, 0)).to_bits()),
        ];
        for (k, e) in expect.iter().enumerate() {
            assert_eq!(out[t * cases.len() + k], *e, "`{}` x={x:#x} y={y:#x}", cases[k]);
        }
    }
}

/// The f32 value nearest `x` toward zero (x an integer below 2^64 in magnitude).
fn int_toward_zero_f32(x: i128) -> f32 {
    let r = x as f32;
    if (r as i128).abs() > x.abs() {
        f32::from_bits(r.to_bits() - 1)
    } else {
        r
    }
}

#[test]
fn conversions_between_integers_and_floats() {
    type F = fn(u32, u32) -> u32;
    let cases: Vec<(&str, F)> = vec![
        ("cvt.rn.f32.u32 %f1, %r1; mov.b32 %r3, %f1;", |a, _| (a as f32).to_bits()),
        ("cvt.rz.f32.u32 %f1, %r1; mov.b32 %r3, %f1;", |a, _| int_toward_zero_f32(a.into()).to_bits()),
        ("cvt.rz.f32.s32 %f1, %r1; mov.b32 %r3, %f1;", |a, _| int_toward_zero_f32((a as i32).into()).to_bits()),
        ("cvt.rn.f32.s32 %f1, %r1; cvt.rzi.s32.f32 %r3, %f1;", |a, _| ((a as i32) as f32) as i32 as u32),
        ("cvt.u64.u32 %rd5, %r1; cvt.s64.s32 %rd6, %r2; add.s64 %rd5, %rd5, %rd6; shr.u64 %rd5, %rd5, 1; cvt.u32.u64 %r3, %rd5;", |a, b| {
            ((i64::from(a) + i64::from(b as i32)) as u64 >> 1) as u32
        }),
        ("cvt.rn.f64.u32 %fd1, %r1; cvt.rn.f64.s32 %fd2, %r2; div.rn.f64 %fd1, %fd1, %fd2; cvt.rzi.s32.f64 %r3, %fd1;", |a, b| {
            (f64::from(a) / f64::from(b as i32)) as i32 as u32
        }),
        ("cvt.u8.u32 %r3, %r1;", |a, _| a & 0xff),
        ("cvt.s8.u32 %r3, %r1;", |a, _| a as u8 as i8 as i32 as u32),
        ("cvt.sat.u16.s32 %r3, %r1;", |a, _| (a as i32).clamp(0, 65535) as u32),
        ("cvt.rn.f16.u32 %rs1, %r1; cvt.u32.u16 %r3, %rs1;", |a, _| u32::from(f16_rn(a.into()).to_bits())),
        ("cvt.rn.bf16.s32 %rs1, %r1; cvt.u32.u16 %r3, %rs1;", |a, _| u32::from(bf16_rn((a as i32).into()).to_bits())),
        ("cvt.u64.u32 %rd5, %r1; shl.b64 %rd5, %rd5, 32; cvt.u64.u32 %rd6, %r2; or.b64 %rd5, %rd5, %rd6; cvt.rn.f32.u64 %f1, %rd5; mov.b32 %r3, %f1;", |a, b| {
            (((u64::from(a) << 32) | u64::from(b)) as f32).to_bits()
        }),
        ("cvt.u64.u32 %rd5, %r1; shl.b64 %rd5, %rd5, 32; cvt.u64.u32 %rd6, %r2; or.b64 %rd5, %rd5, %rd6; cvt.rn.bf16.u64 %rs1, %rd5; cvt.u32.u16 %r3, %rs1;", |a, b| {
            // Correctly rounded from the exact 64-bit integer (exact as u128 -> f64 is not,
            // so compare the two bf16 neighbours exactly).
            let x = u128::from((u64::from(a) << 32) | u64::from(b));
            let lo = half::bf16::from_f32(x as f32);
            let cands = [lo, half::bf16::from_bits(lo.to_bits().wrapping_sub(1)), half::bf16::from_bits(lo.to_bits() + 1)];
            let dist = |h: half::bf16| (h.to_f64() as u128).abs_diff(x);
            let best = cands.iter().copied().min_by_key(|h| (dist(*h), h.to_bits() & 1)).unwrap();
            u32::from(best.to_bits())
        }),
        ("mov.b32 %f1, %r1; cvt.rpi.u32.f32 %r3, %f1;", |a, _| {
            let f = f32::from_bits(a);
            f.ceil() as u32
        }),
    ];
    let ops: Vec<&str> = cases.iter().map(|c| c.0).collect();
    let ptx = int_kernel(&ops).replace(".reg .pred %p<4>;", ".reg .pred %p<4>; .reg .f32 %f<4>; .reg .f64 %fd<4>;");
    let threads = 64usize;
    let mut input = rand_u32(2 * threads, 99);
    for (i, (a, b)) in
        [(0u32, 1u32), (u32::MAX, u32::MAX), (0x8000_0000, 0x7fff_ffff), (16_777_217, 3), (0x4f80_0000, 0xbf80_0000)]
            .iter()
            .enumerate()
    {
        input[2 * i] = *a;
        input[2 * i + 1] = *b;
    }
    let out = run_u32(&ptx, &input, threads * ops.len(), threads as u32);
    for t in 0..threads {
        let (a, b) = (input[2 * t], input[2 * t + 1]);
        for (k, (op, f)) in cases.iter().enumerate() {
            assert_eq!(out[t * ops.len() + k], f(a, b), "`{op}` a={a:#x} b={b:#x}");
        }
    }
}

/// Round-to-nearest-even of an f64 to a 16-bit float, by exact comparison of the neighbours of
/// a first guess (independent of the simulator's conversion code).
fn rn16<H: Copy>(
    x: f64,
    from_f32: fn(f32) -> H,
    to_f64: fn(H) -> f64,
    bits: fn(H) -> u16,
    from_bits: fn(u16) -> H,
) -> H {
    if x.is_nan() {
        return from_f32(f32::NAN);
    }
    if to_f64(from_f32(x as f32)).is_infinite() {
        return from_f32(x as f32); // overflow: nearest is infinity
    }
    let g = bits(from_f32(x as f32));
    let cands = [g.wrapping_sub(1), g, g.wrapping_add(1)].map(from_bits);
    let err = |h: H| (to_f64(h) - x).abs();
    *cands
        .iter()
        .filter(|h| !to_f64(**h).is_nan())
        .min_by(|a, b| err(**a).partial_cmp(&err(**b)).unwrap().then((bits(**a) & 1).cmp(&(bits(**b) & 1))))
        .unwrap()
}

fn f16_rn(x: f64) -> half::f16 {
    rn16(x, half::f16::from_f32, |h| f64::from(h.to_f32()), half::f16::to_bits, half::f16::from_bits)
}

fn bf16_rn(x: f64) -> half::bf16 {
    rn16(x, half::bf16::from_f32, |h| f64::from(h.to_f32()), half::bf16::to_bits, half::bf16::from_bits)
}
