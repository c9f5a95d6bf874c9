//! `cp.async`, `ldmatrix` and `mma.sync`: known matrices multiplied through the PTX ISA's
//! fragment layouts. Values are multiples of 1/4 in [-2, 2], so every product and sum is exact
//! in f32 and the answer does not depend on summation order.

mod common;

use common::{kernel, rand_u32};
use half::bf16;
use squid_ptxsim::{Arg, LaunchConfig, Simulator};

const BODY: &str = r#"
    // Stage all 1152 input bytes into shared memory with 16-byte cp.async copies.
    mov.u32 %r1, %r_tid;
$L_cp:
    setp.ge.u32 %p1, %r1, 72;
    @%p1 bra $L_cpdone;
    mul.wide.u32 %rd1, %r1, 16;
    add.s64 %rd2, %rd_in, %rd1;
    mov.u64 %rd3, sm;
    add.s64 %rd3, %rd3, %rd1;
    cp.async.cg.shared.global [%rd3], [%rd2], 16;
    add.u32 %r1, %r1, 32;
    bra.uni $L_cp;
$L_cpdone:
    cp.async.commit_group;
    cp.async.wait_group 0;
    bar.sync 0;
    mov.u32 %r5, sm;
    // A (16x16, row-major, 32-byte rows): lane l gives row l % 16, column (l / 16) * 8.
    and.b32 %r2, %r_tid, 15;
    shr.u32 %r3, %r_tid, 4;
    shl.b32 %r3, %r3, 4;
    shl.b32 %r4, %r2, 5;
    add.s32 %r4, %r4, %r3;
    add.s32 %r6, %r5, %r4;
    ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r10, %r11, %r12, %r13}, [%r6];
    // B^T (8x16, k contiguous) at 512: lane l gives row l % 8, column ((l / 8) % 2) * 8.
    and.b32 %r2, %r_tid, 7;
    shr.u32 %r3, %r_tid, 3;
    and.b32 %r3, %r3, 1;
    shl.b32 %r3, %r3, 4;
    shl.b32 %r4, %r2, 5;
    add.s32 %r4, %r4, %r3;
    add.s32 %r4, %r4, 512;
    add.s32 %r7, %r5, %r4;
    ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%r14, %r15}, [%r7];
    mov.f32 %f1, 0f3F000000;
    mov.f32 %f2, 0f3F000000;
    mov.f32 %f3, 0f3F000000;
    mov.f32 %f4, 0f3F000000;
    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f5, %f6, %f7, %f8}, {%r10, %r11, %r12, %r13}, {%r14, %r15}, {%f1, %f2, %f3, %f4};
    // A8 (16x8, 16-byte rows) at 768 via x2; B8 (8x8 row-major [k][n]) at 1024 via x1.trans.
    and.b32 %r2, %r_tid, 15;
    shl.b32 %r4, %r2, 4;
    add.s32 %r4, %r4, 768;
    add.s32 %r8, %r5, %r4;
    ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%r16, %r17}, [%r8];
    and.b32 %r2, %r_tid, 7;
    shl.b32 %r4, %r2, 4;
    add.s32 %r4, %r4, 1024;
    add.s32 %r9, %r5, %r4;
    ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%r18}, [%r9];
    mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%f9, %f10, %f11, %f12}, {%r16, %r17}, {%r18}, {%f1, %f2, %f3, %f4};
    // D fragments: (g, 2 tig + {0,1}) and (g + 8, ...), g = lane / 4, tig = lane % 4.
    shr.u32 %r2, %r_tid, 2;
    and.b32 %r3, %r_tid, 3;
    shl.b32 %r3, %r3, 1;
    shl.b32 %r4, %r2, 3;
    add.s32 %r4, %r4, %r3;
    mul.wide.u32 %rd4, %r4, 4;
    add.s64 %rd5, %rd_out, %rd4;
    st.global.v2.f32 [%rd5], {%f5, %f6};
    st.global.v2.f32 [%rd5+256], {%f7, %f8};
    st.global.v2.f32 [%rd5+512], {%f9, %f10};
    st.global.v2.f32 [%rd5+768], {%f11, %f12};
"#;

#[test]
fn mma_m16n8k16_and_m16n8k8_with_ldmatrix_and_cp_async() {
    let decls =
        ".reg .b32 %r<20>; .reg .b64 %rd<8>; .reg .pred %p<2>; .reg .f32 %f<13>; .shared .align 16 .b8 sm[1152];";
    let ptx = kernel(decls, BODY);
    let vals: Vec<f32> = rand_u32(576, 77).iter().map(|u| (u % 17) as f32 / 4.0 - 2.0).collect();
    let input: Vec<bf16> = vals.iter().map(|&v| bf16::from_f32(v)).collect();
    let a = |m: usize, k: usize| vals[m * 16 + k];
    let b = |k: usize, n: usize| vals[256 + n * 16 + k]; // stored as B^T
    let a8 = |m: usize, k: usize| vals[384 + m * 8 + k];
    let b8 = |k: usize, n: usize| vals[512 + k * 8 + n]; // stored row-major [k][n]
    let mut sim = Simulator::new(&ptx).unwrap();
    let bin = sim.alloc(&input);
    let bout = sim.alloc_zeroed::<f32>(256);
    sim.launch("k", LaunchConfig::linear(1, 32), &[Arg::Ptr(bout), Arg::Ptr(bin), Arg::U32(576)]).unwrap();
    let out = sim.read::<f32>(bout).unwrap();
    for m in 0..16 {
        for n in 0..8 {
            let d16: f32 = 0.5 + (0..16).map(|k| a(m, k) * b(k, n)).sum::<f32>();
            let d8: f32 = 0.5 + (0..8).map(|k| a8(m, k) * b8(k, n)).sum::<f32>();
            assert_eq!(out[m * 8 + n], d16, "k16 D[{m}][{n}]");
            assert_eq!(out[128 + m * 8 + n], d8, "k8 D[{m}][{n}]");
        }
    }
}

#[test]
fn mma_needs_a_whole_warp() {
    let decls =
        ".reg .b32 %r<20>; .reg .b64 %rd<8>; .reg .pred %p<2>; .reg .f32 %f<13>; .shared .align 16 .b8 sm[1152];";
    let ptx = kernel(decls, BODY);
    let mut sim = Simulator::new(&ptx).unwrap();
    let bin = sim.alloc(&[0u16; 576]);
    let bout = sim.alloc_zeroed::<f32>(256);
    let err =
        sim.launch("k", LaunchConfig::linear(1, 16), &[Arg::Ptr(bout), Arg::Ptr(bin), Arg::U32(576)]).unwrap_err();
    assert!(err.to_string().contains("warp collective error"), "{err}");
}
