//! Device functions and calls: hand-written PTX call sequences in the form NVRTC emits
//! (`.param` variables in a `{ }` scope, `st.param`, `call.uni (retval), f, (args)`,
//! `ld.param`), recursion with per-call registers and local memory, a warp collective inside a
//! function, sanitizer faults inside a function, and what is refused.

mod common;

use squid_ptxsim::{Arg, Error, FaultKind, LaunchConfig, Simulator};

/// `common::kernel` with device functions defined before the entry.
fn module(funcs: &str, decls: &str, body: &str) -> String {
    common::kernel(decls, body).replacen(".address_size 64", &format!(".address_size 64\n{funcs}"), 1)
}

/// 1-based line of the first line of `ptx` containing `needle`.
fn line_of(ptx: &str, needle: &str) -> usize {
    ptx.lines().position(|l| l.contains(needle)).expect("the needle is in the PTX") + 1
}

/// Runs entry `k` over `n` threads (blocks of `block`) with `input`, returning `out`.
fn run_u32(ptx: &str, input: &[u32], n: u32, block: u32) -> Vec<u32> {
    let mut sim = Simulator::new(ptx).unwrap();
    let inp = sim.alloc(input);
    let out = sim.alloc_zeroed::<u32>(input.len());
    sim.launch("k", LaunchConfig::linear(n.div_ceil(block), block), &[Arg::Ptr(out), Arg::Ptr(inp), Arg::U32(n)])
        .unwrap();
    sim.read::<u32>(out).unwrap()
}

/// The prologue every test body starts with: `%p1` = out of range, `%rd1` = 4 * tid,
/// `%r1` = in[tid].
const LOAD_U32: &str = r#"
    setp.ge.u32 %p1, %r_tid, %r_n;
    @%p1 bra $L_end;
    mul.wide.u32 %rd1, %r_tid, 4;
    add.s64 %rd2, %rd_in, %rd1;
    ld.global.u32 %r1, [%rd2];
"#;

const STORE_R2_END: &str = r#"
    add.s64 %rd3, %rd_out, %rd1;
    st.global.u32 [%rd3], %r2;
$L_end:
"#;

const SUM_SQ: &str = r#"
.func (.param .b32 func_retval0) sum_sq(
    .param .b32 sum_sq_param_0
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<4>;
    ld.param.u32 %r1, [sum_sq_param_0];
    mov.u32 %r2, 0;
    mov.u32 %r3, 0;
$L_loop:
    setp.ge.u32 %p1, %r3, %r1;
    @%p1 bra $L_done;
    mad.lo.s32 %r2, %r3, %r3, %r2;
    add.s32 %r3, %r3, 1;
    bra.uni $L_loop;
$L_done:
    st.param.b32 [func_retval0+0], %r2;
    ret;
}
"#;

#[test]
fn scalar_arguments_and_a_return_value() {
    let func = r#"
.visible .func (.param .b32 func_retval0) axpb(
    .param .b32 axpb_param_0,
    .param .b32 axpb_param_1,
    .param .b32 axpb_param_2
)
{
    .reg .f32 %f<5>;
    ld.param.f32 %f1, [axpb_param_0];
    ld.param.f32 %f2, [axpb_param_1];
    ld.param.f32 %f3, [axpb_param_2];
    fma.rn.f32 %f4, %f1, %f2, %f3;
    st.param.f32 [func_retval0+0], %f4;
    ret;
}
"#;
    let body = format!(
        r#"{LOAD_U32}
    mov.b32 %f1, %r1;
    cvt.rn.f32.u32 %f2, %r_tid;
    {{
    .param .b32 param0;
    st.param.f32 [param0+0], %f1;
    .param .b32 param1;
    st.param.f32 [param1+0], 0f40400000;
    .param .b32 param2;
    st.param.f32 [param2+0], %f2;
    .param .b32 retval0;
    call.uni (retval0), axpb, (param0, param1, param2);
    ld.param.f32 %f3, [retval0+0];
    }}
    mov.b32 %r2, %f3;
    {STORE_R2_END}"#
    );
    let ptx = module(func, ".reg .pred %p<2>; .reg .b32 %r<3>; .reg .f32 %f<4>; .reg .b64 %rd<4>;", &body);
    let x: Vec<f32> = (0..77).map(|i| (i as f32 - 30.0) * 0.37).collect();
    let bits: Vec<u32> = x.iter().map(|v| v.to_bits()).collect();
    let out = run_u32(&ptx, &bits, 77, 32);
    for (i, (&o, &xi)) in out.iter().zip(&x).enumerate() {
        assert_eq!(f32::from_bits(o), xi.mul_add(3.0, i as f32), "thread {i}");
    }
}

#[test]
fn a_function_with_a_loop_called_from_a_branch() {
    let body = format!(
        r#"{LOAD_U32}
    rem.u32 %r1, %r1, 100;
    mov.u32 %r2, 7;
    setp.lt.u32 %p2, %r1, 3;
    @%p2 bra $L_skip;
    {{
    .param .b32 param0;
    st.param.b32 [param0+0], %r1;
    .param .b32 retval0;
    call.uni (retval0), sum_sq, (param0);
    ld.param.b32 %r2, [retval0+0];
    }}
$L_skip:
    {STORE_R2_END}"#
    );
    let ptx = module(SUM_SQ, ".reg .pred %p<3>; .reg .b32 %r<3>; .reg .b64 %rd<4>;", &body);
    let input = common::rand_u32(200, 5);
    let out = run_u32(&ptx, &input, 200, 64);
    for (i, (&o, &v)) in out.iter().zip(&input).enumerate() {
        let v = v % 100;
        let want = if v < 3 { 7 } else { (0..v).map(|j| j * j).sum::<u32>() };
        assert_eq!(o, want, "thread {i}, n {v}");
    }
}

const FACT: &str = r#"
// A forward declaration (a prototype), then the definition.
.func (.param .b64 func_retval0) fact(.param .b32 fact_param_0);
.func (.param .b64 func_retval0) fact(
    .param .b32 fact_param_0
)
{
    .reg .pred %p<2>;
    .reg .b32 %r<3>;
    .reg .b64 %rd<4>;
    ld.param.u32 %r1, [fact_param_0];
    setp.gt.u32 %p1, %r1, 1;
    @%p1 bra $L_rec;
    mov.u64 %rd1, 1;
    st.param.b64 [func_retval0+0], %rd1;
    ret;
$L_rec:
    add.s32 %r2, %r1, -1;
    {
    .param .b32 param0;
    st.param.b32 [param0+0], %r2;
    .param .b64 retval0;
    call.uni (retval0), fact, (param0);
    ld.param.b64 %rd2, [retval0+0];
    }
    cvt.u64.u32 %rd3, %r1;
    mul.lo.s64 %rd1, %rd2, %rd3;
    st.param.b64 [func_retval0+0], %rd1;
    ret;
}
"#;

#[test]
fn recursive_factorial_keeps_each_calls_registers() {
    let body = format!(
        r#"{LOAD_U32}
    {{
    .param .b32 param0;
    st.param.b32 [param0+0], %r1;
    .param .b64 retval0;
    call.uni (retval0), fact, (param0);
    ld.param.b64 %rd4, [retval0+0];
    }}
    mul.wide.u32 %rd1, %r_tid, 8;
    add.s64 %rd3, %rd_out, %rd1;
    st.global.u64 [%rd3], %rd4;
$L_end:"#
    );
    let ptx = module(FACT, ".reg .pred %p<2>; .reg .b32 %r<3>; .reg .b64 %rd<5>;", &body);
    let input: Vec<u32> = (0..45).map(|i| i % 23).collect();
    let mut sim = Simulator::new(&ptx).unwrap();
    let inp = sim.alloc(&input);
    let out = sim.alloc_zeroed::<u64>(input.len());
    sim.launch("k", LaunchConfig::linear(2, 32), &[Arg::Ptr(out), Arg::Ptr(inp), Arg::U32(45)]).unwrap();
    let got = sim.read::<u64>(out).unwrap();
    for (&n, &g) in input.iter().zip(&got) {
        let want = (1..=u64::from(n)).fold(1u64, |a, k| a.wrapping_mul(k));
        assert_eq!(g, want, "{n}!");
    }
}

#[test]
fn recursive_fibonacci_with_two_calls_and_per_call_local_memory() {
    // fib(n) = n < 2 ? n : fib(n-1) + fib(n-2); `n` and the first result must survive the
    // second call. Each call also stores n in its own `.local` depot and reads it back (through
    // a generic address) after its calls: frames that shared local memory would see the
    // callee's n there.
    let fib = r#"
.func (.param .b32 func_retval0) fib(
    .param .b32 fib_param_0
)
{
    .local .align 4 .b8 __local_depot1[8];
    .reg .b64 %SP;
    .reg .b64 %SPL;
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    mov.u64 %SPL, __local_depot1;
    cvta.local.u64 %SP, %SPL;
    ld.param.u32 %r1, [fib_param_0];
    st.local.u32 [%SPL+4], %r1;
    mov.u32 %r6, %r1;
    setp.lt.u32 %p1, %r1, 2;
    @%p1 bra $L_base;
    add.s32 %r2, %r1, -1;
    {
    .param .b32 param0;
    st.param.b32 [param0+0], %r2;
    .param .b32 retval0;
    call.uni (retval0), fib, (param0);
    ld.param.b32 %r3, [retval0+0];
    }
    add.s32 %r4, %r1, -2;
    {
    .param .b32 param0;
    st.param.b32 [param0+0], %r4;
    .param .b32 retval0;
    call.uni (retval0), fib, (param0);
    ld.param.b32 %r5, [retval0+0];
    }
    add.s32 %r6, %r3, %r5;
$L_base:
    ld.u32 %r7, [%SP+4];
    setp.ne.u32 %p1, %r7, %r1;
    @%p1 trap;
    st.param.b32 [func_retval0+0], %r6;
    ret;
}
"#;
    let body = format!(
        r#"{LOAD_U32}
    rem.u32 %r1, %r1, 16;
    {{
    .param .b32 param0;
    st.param.b32 [param0+0], %r1;
    .param .b32 retval0;
    call.uni (retval0), fib, (param0);
    ld.param.b32 %r2, [retval0+0];
    }}
    {STORE_R2_END}"#
    );
    let ptx = module(fib, ".reg .pred %p<2>; .reg .b32 %r<3>; .reg .b64 %rd<4>;", &body);
    let input = common::rand_u32(70, 11);
    let out = run_u32(&ptx, &input, 70, 32);
    let fib_host = |n: u32| {
        let (mut a, mut b) = (0u32, 1u32);
        for _ in 0..n {
            (a, b) = (b, a + b);
        }
        a
    };
    for (i, (&o, &v)) in out.iter().zip(&input).enumerate() {
        assert_eq!(o, fib_host(v % 16), "thread {i}, n {}", v % 16);
    }
}

#[test]
fn a_callee_writes_through_a_generic_pointer_into_its_callers_local_memory() {
    let fill = r#"
.weak .func fill4(
    .param .b64 fill4_param_0,
    .param .b32 fill4_param_1
)
{
    .reg .b32 %r<6>;
    .reg .b64 %rd<2>;
    ld.param.u64 %rd1, [fill4_param_0];
    ld.param.u32 %r1, [fill4_param_1];
    add.s32 %r2, %r1, 1;
    add.s32 %r3, %r1, 2;
    add.s32 %r4, %r1, 3;
    st.v4.u32 [%rd1], {%r1, %r2, %r3, %r4};
    ret;
}
"#;
    let body = format!(
        r#"
    .local .align 16 .b8 __local_depot0[16];
    .reg .b64 %SP, %SPL;
    mov.u64 %SPL, __local_depot0;
    cvta.local.u64 %SP, %SPL;
    {LOAD_U32}
    {{
    .param .b64 param0;
    st.param.b64 [param0+0], %SP;
    .param .b32 param1;
    st.param.b32 [param1+0], %r1;
    call.uni fill4, (param0, param1);
    }}
    ld.local.v4.u32 {{%r3, %r4, %r5, %r6}}, [%SPL];
    mul.lo.s32 %r3, %r3, 1000;
    add.s32 %r3, %r3, %r4;
    add.s32 %r3, %r3, %r5;
    add.s32 %r2, %r3, %r6;
    {STORE_R2_END}"#
    );
    let ptx = module(fill, ".reg .pred %p<2>; .reg .b32 %r<7>; .reg .b64 %rd<4>;", &body);
    let input: Vec<u32> = (0..40).map(|i| i * 3).collect();
    let out = run_u32(&ptx, &input, 40, 32);
    for (&o, &v) in out.iter().zip(&input) {
        assert_eq!(o, v * 1000 + (v + 1) + (v + 2) + (v + 3));
    }
}

#[test]
fn a_warp_shuffle_inside_a_called_function() {
    let func = r#"
.func (.param .b32 func_retval0) warp_sum(
    .param .b32 warp_sum_param_0
)
{
    .reg .b32 %r<3>;
    ld.param.u32 %r1, [warp_sum_param_0];
    shfl.sync.bfly.b32 %r2, %r1, 16, 31, -1;
    add.s32 %r1, %r1, %r2;
    shfl.sync.bfly.b32 %r2, %r1, 8, 31, -1;
    add.s32 %r1, %r1, %r2;
    shfl.sync.bfly.b32 %r2, %r1, 4, 31, -1;
    add.s32 %r1, %r1, %r2;
    shfl.sync.bfly.b32 %r2, %r1, 2, 31, -1;
    add.s32 %r1, %r1, %r2;
    shfl.sync.bfly.b32 %r2, %r1, 1, 31, -1;
    add.s32 %r1, %r1, %r2;
    st.param.b32 [func_retval0+0], %r1;
    ret;
}
"#;
    // Every thread of the block calls (no early exit); the sum is of the first n inputs.
    let body = r#"
    mov.u32 %r1, 0;
    mul.wide.u32 %rd1, %r_tid, 4;
    setp.ge.u32 %p1, %r_tid, %r_n;
    add.s64 %rd2, %rd_in, %rd1;
    @!%p1 ld.global.u32 %r1, [%rd2];
    {
    .param .b32 param0;
    st.param.b32 [param0+0], %r1;
    .param .b32 retval0;
    call.uni (retval0), warp_sum, (param0);
    ld.param.b32 %r2, [retval0+0];
    }
    @%p1 bra $L_end;
    add.s64 %rd3, %rd_out, %rd1;
    st.global.u32 [%rd3], %r2;
$L_end:
"#;
    let ptx = module(func, ".reg .pred %p<2>; .reg .b32 %r<3>; .reg .b64 %rd<4>;", body);
    let input: Vec<u32> = common::rand_u32(96, 3).iter().map(|v| v % 1000).collect();
    let n = 90u32;
    let mut sim = Simulator::new(&ptx).unwrap();
    let inp = sim.alloc(&input);
    let out = sim.alloc_zeroed::<u32>(input.len());
    sim.launch("k", LaunchConfig::linear(1, 96), &[Arg::Ptr(out), Arg::Ptr(inp), Arg::U32(n)]).unwrap();
    let got = sim.read::<u32>(out).unwrap();
    for (i, &g) in got.iter().enumerate() {
        let w = i / 32;
        let want: u32 = (w * 32..w * 32 + 32).filter(|&j| j < n as usize).map(|j| input[j]).sum();
        assert_eq!(g, if i < n as usize { want } else { 0 }, "thread {i}");
    }
}

#[test]
fn an_out_of_bounds_store_in_a_callee_names_the_callees_line() {
    let func = r#"
.func store_at(
    .param .b64 store_at_param_0,
    .param .b32 store_at_param_1,
    .param .b32 store_at_param_2
)
{
    .reg .b32 %r<3>;
    .reg .b64 %rd<4>;
    ld.param.u64 %rd1, [store_at_param_0];
    ld.param.u32 %r1, [store_at_param_1];
    ld.param.u32 %r2, [store_at_param_2];
    mul.wide.u32 %rd2, %r1, 4;
    add.s64 %rd3, %rd1, %rd2;
    st.global.u32 [%rd3], %r2; // the faulting store
    ret;
}
"#;
    // No bounds check in the caller: thread n writes one past the end.
    let body = r#"
    {
    .param .b64 param0;
    st.param.b64 [param0+0], %rd_out;
    .param .b32 param1;
    st.param.b32 [param1+0], %r_tid;
    .param .b32 param2;
    st.param.b32 [param2+0], %r_n;
    call.uni store_at, (param0, param1, param2);
    }
"#;
    let ptx = module(func, "", body);
    let mut sim = Simulator::new(&ptx).unwrap();
    let inp = sim.alloc_zeroed::<u32>(1);
    let out = sim.alloc_zeroed::<u32>(8);
    sim.launch("k", LaunchConfig::linear(1, 8), &[Arg::Ptr(out), Arg::Ptr(inp), Arg::U32(5)]).unwrap();
    assert_eq!(sim.read::<u32>(out).unwrap(), vec![5; 8]);
    match sim.launch("k", LaunchConfig::linear(1, 9), &[Arg::Ptr(out), Arg::Ptr(inp), Arg::U32(5)]) {
        Err(Error::Fault(f)) => {
            assert_eq!(f.kernel, "k");
            assert_eq!(f.line, line_of(&ptx, "the faulting store"), "{f}");
            assert_eq!(f.thread, [8, 0, 0]);
            assert!(matches!(f.kind, FaultKind::OutOfBounds { write: true, .. }), "{f}");
        }
        other => panic!("expected an out-of-bounds fault, got {other:?}"),
    }
}

#[test]
fn an_uninitialised_shared_read_in_a_callee_is_caught() {
    let func = r#"
.shared .align 4 .b8 tile[128];
.func (.param .b32 func_retval0) peek(
    .param .b32 peek_param_0
)
{
    .reg .b32 %r<4>;
    ld.param.u32 %r1, [peek_param_0];
    shl.b32 %r2, %r1, 2;
    mov.u32 %r3, tile;
    add.s32 %r2, %r2, %r3;
    ld.shared.u32 %r3, [%r2]; // reads what nobody wrote
    st.param.b32 [func_retval0+0], %r3;
    ret;
}
"#;
    let body = r#"
    {
    .param .b32 param0;
    st.param.b32 [param0+0], %r_tid;
    .param .b32 retval0;
    call.uni (retval0), peek, (param0);
    }
"#;
    let ptx = module(func, "", body);
    let mut sim = Simulator::new(&ptx).unwrap();
    let b = sim.alloc_zeroed::<u32>(1);
    match sim.launch("k", LaunchConfig::linear(1, 4), &[Arg::Ptr(b), Arg::Ptr(b), Arg::U32(4)]) {
        Err(Error::Fault(f)) => {
            assert_eq!(f.line, line_of(&ptx, "reads what nobody wrote"), "{f}");
            assert!(matches!(f.kind, FaultKind::UninitShared { .. }), "{f}");
        }
        other => panic!("expected an uninitialised-read fault, got {other:?}"),
    }
}

#[test]
fn runaway_recursion_is_a_fault_not_a_crash() {
    let func = r#"
.func forever(
    .param .b32 forever_param_0
)
{
    .reg .b32 %r<3>;
    ld.param.u32 %r1, [forever_param_0];
    add.s32 %r2, %r1, 1;
    {
    .param .b32 param0;
    st.param.b32 [param0+0], %r2;
    call.uni forever, (param0); // recurses without end
    }
    ret;
}
"#;
    let body = r#"
    {
    .param .b32 param0;
    st.param.b32 [param0+0], %r_tid;
    call.uni forever, (param0);
    }
"#;
    let ptx = module(func, "", body);
    let mut sim = Simulator::new(&ptx).unwrap();
    let b = sim.alloc_zeroed::<u32>(1);
    match sim.launch("k", LaunchConfig::linear(1, 2), &[Arg::Ptr(b), Arg::Ptr(b), Arg::U32(1)]) {
        Err(Error::Fault(f)) => {
            assert!(matches!(f.kind, FaultKind::CallDepth { .. }), "{f}");
            assert_eq!(f.line, line_of(&ptx, "recurses without end"), "{f}");
        }
        other => panic!("expected a call-depth fault, got {other:?}"),
    }
}

#[test]
fn indirect_and_external_calls_are_unsupported_with_their_line() {
    let twice = r#"
.func (.param .b32 func_retval0) twice(
    .param .b32 twice_param_0
)
{
    .reg .b32 %r<3>;
    ld.param.b32 %r1, [twice_param_0];
    add.s32 %r2, %r1, %r1;
    st.param.b32 [func_retval0], %r2;
    ret;
}
"#;
    // A function pointer, as NVRTC writes one for an indirect call.
    let indirect = module(
        twice,
        ".reg .b64 %rd<2>;",
        r#"
    mov.u64 %rd1, twice; // takes the address
    {
    .param .b32 param0;
    st.param.b32 [param0+0], %r_tid;
    .param .b32 retval0;
    prototype_0 : .callprototype (.param .b32 _) _ (.param .b32 _);
    call (retval0), %rd1, (param0), prototype_0;
    }
"#,
    );
    match Simulator::new(&indirect) {
        Err(Error::Unsupported { instruction, line }) => {
            assert!(instruction.contains("indirect"), "{instruction}");
            assert_eq!(line, line_of(&indirect, "takes the address"));
        }
        other => panic!("{:?}", other.err()),
    }
    // A `.callprototype` on its own (the pointer from elsewhere) is refused too.
    let proto = module(
        "",
        ".reg .b64 %rd<2>;",
        r#"
    ld.global.u64 %rd1, [%rd_in];
    {
    .param .b32 param0;
    st.param.b32 [param0+0], %r_tid;
    .param .b32 retval0;
    prototype_0 : .callprototype (.param .b32 _) _ (.param .b32 _); // the prototype
    call (retval0), %rd1, (param0), prototype_0;
    }
"#,
    );
    match Simulator::new(&proto) {
        Err(Error::Unsupported { instruction, line }) => {
            assert!(instruction.contains("indirect"), "{instruction}");
            assert_eq!(line, line_of(&proto, "the prototype"));
        }
        other => panic!("{:?}", other.err()),
    }
    // printf: a call to an external function without a body.
    let printf = module(
        ".extern .func (.param .b32 func_retval0) vprintf(.param .b64 vprintf_param_0, .param .b64 vprintf_param_1);",
        "",
        r#"
    {
    .param .b64 param0;
    st.param.b64 [param0+0], 0;
    .param .b64 param1;
    st.param.b64 [param1+0], 0;
    .param .b32 retval0;
    call.uni (retval0), vprintf, (param0, param1); // printf
    }
"#,
    );
    match Simulator::new(&printf) {
        Err(Error::Unsupported { instruction, line }) => {
            assert!(instruction.contains("vprintf"), "{instruction}");
            assert_eq!(line, line_of(&printf, "// printf"));
        }
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn a_call_with_the_wrong_number_of_arguments_is_a_parse_error() {
    let body = r#"
    {
    .param .b32 param0;
    st.param.b32 [param0+0], %r_tid;
    .param .b32 param1;
    st.param.b32 [param1+0], %r_tid;
    .param .b32 retval0;
    call.uni (retval0), sum_sq, (param0, param1);
    }
"#;
    let ptx = module(SUM_SQ, "", body);
    match Simulator::new(&ptx) {
        Err(Error::Parse { line, message }) => {
            assert_eq!(line, line_of(&ptx, "call.uni (retval0), sum_sq"));
            assert!(message.contains("2 arguments"), "{message}");
        }
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn the_end_of_a_body_returns_and_an_entry_does_not_run_into_its_callees() {
    // Neither body ends in `ret`: the function returns at its closing brace (twice here), and
    // the entry exits there instead of falling into the function's instructions.
    let ptx = r#"
.version 8.7
.target sm_80
.address_size 64
.func bump(.param .b64 bump_param_0)
{
    .reg .b32 %r<3>;
    .reg .b64 %rd<2>;
    ld.param.u64 %rd1, [bump_param_0];
    ld.global.u32 %r1, [%rd1];
    add.s32 %r2, %r1, 1;
    st.global.u32 [%rd1], %r2;
}
.visible .entry k(.param .u64 k_param_0)
{
    .reg .b64 %rd<2>;
    ld.param.u64 %rd1, [k_param_0];
    cvta.to.global.u64 %rd1, %rd1;
    {
    .param .b64 param0;
    st.param.b64 [param0+0], %rd1;
    call.uni bump, (param0);
    }
    {
    .param .b64 param0;
    st.param.b64 [param0+0], %rd1;
    call.uni bump, (param0);
    }
}
"#;
    let mut sim = Simulator::new(ptx).unwrap();
    let out = sim.alloc(&[40u32]);
    sim.launch("k", LaunchConfig::linear(1, 1), &[Arg::Ptr(out)]).unwrap();
    assert_eq!(sim.read::<u32>(out).unwrap(), vec![42]);
}

/// The entry zeroes a shared tile and waits at a barrier; then it calls a function that writes
/// `3 * tid` to the tile, (optionally) waits at a barrier, and returns its neighbour's value.
fn exchange_module(barrier: bool) -> String {
    let bar = if barrier { "bar.sync 0;" } else { "// no barrier" };
    let func = format!(
        r#"
.shared .align 4 .b8 tile[256];
.func (.param .b32 func_retval0) exchange(
    .param .b32 exchange_param_0,
    .param .b32 exchange_param_1
)
{{
    .reg .b32 %r<8>;
    ld.param.u32 %r1, [exchange_param_0];
    ld.param.u32 %r2, [exchange_param_1];
    mov.u32 %r3, tile;
    shl.b32 %r4, %r1, 2;
    add.s32 %r4, %r3, %r4;
    mul.lo.s32 %r5, %r1, 3;
    st.shared.u32 [%r4], %r5; // the tile store
    {bar}
    add.s32 %r6, %r1, 1;
    rem.u32 %r6, %r6, %r2;
    shl.b32 %r6, %r6, 2;
    add.s32 %r6, %r3, %r6;
    ld.shared.u32 %r7, [%r6]; // the neighbour's value
    st.param.b32 [func_retval0+0], %r7;
    ret;
}}
"#
    );
    let body = r#"
    mov.u32 %r1, tile;
    shl.b32 %r2, %r_tid, 2;
    add.s32 %r1, %r1, %r2;
    st.shared.u32 [%r1], 0;
    bar.sync 0;
    {
    .param .b32 param0;
    st.param.b32 [param0+0], %r_tid;
    .param .b32 param1;
    st.param.b32 [param1+0], %r_ntid;
    .param .b32 retval0;
    call.uni (retval0), exchange, (param0, param1);
    ld.param.b32 %r1, [retval0+0];
    }
    mul.wide.u32 %rd1, %r_tid, 4;
    add.s64 %rd1, %rd_out, %rd1;
    st.global.u32 [%rd1], %r1;
"#;
    module(&func, ".reg .b32 %r<3>; .reg .b64 %rd<2>;", body)
}

#[test]
fn a_barrier_inside_a_function_orders_shared_memory_and_a_missing_one_is_a_race() {
    let ptx = exchange_module(true);
    let mut sim = Simulator::new(&ptx).unwrap();
    let out = sim.alloc_zeroed::<u32>(64);
    sim.launch("k", LaunchConfig::linear(1, 64), &[Arg::Ptr(out), Arg::Ptr(out), Arg::U32(64)]).unwrap();
    let want: Vec<u32> = (0..64).map(|t| (t + 1) % 64 * 3).collect();
    assert_eq!(sim.read::<u32>(out).unwrap(), want);

    let ptx = exchange_module(false);
    let mut sim = Simulator::new(&ptx).unwrap();
    let out = sim.alloc_zeroed::<u32>(64);
    match sim.launch("k", LaunchConfig::linear(1, 64), &[Arg::Ptr(out), Arg::Ptr(out), Arg::U32(64)]) {
        Err(Error::Fault(f)) => {
            // Thread 0 read thread 1's slot; thread 1's store then races with that read.
            assert_eq!(f.line, line_of(&ptx, "the tile store"), "{f}");
            assert_eq!(f.thread, [1, 0, 0], "{f}");
            match f.kind {
                FaultKind::SharedRace { hazard, other_thread, other_line, .. } => {
                    assert_eq!(hazard, "write-after-read");
                    assert_eq!(other_thread, [0, 0, 0]);
                    assert_eq!(other_line, line_of(&ptx, "the neighbour's value"));
                }
                k => panic!("expected a race, got {k}"),
            }
        }
        other => panic!("expected a shared-memory fault, got {other:?}"),
    }
}
