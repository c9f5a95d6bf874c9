//! The launch profile on planted kernels whose counters are known exactly: a strided load
//! (sectors per request), a 32-way bank conflict and its padded fix, ldmatrix rows, a divergent
//! branch, a known number of mma per warp, cp.async depth and barriers; and the occupancy
//! rules on known cases.

mod common;

use common::kernel;
use squid_ptxsim::{occupancy, Arg, InstClass, LaunchConfig, Profile, Simulator, A100, H100_SXM};

const DECLS: &str =
    ".reg .b32 %r<16>; .reg .b64 %rd<8>; .reg .pred %p<4>; .reg .f32 %f<8>; .shared .align 16 .b8 sm[8192];";

/// Runs `k(out, in, n)` with profiling on; `in` holds 4096 u32, `out` 4096 u32.
fn profile(body: &str, cfg: LaunchConfig, n: u32) -> Profile {
    let ptx = kernel(DECLS, body);
    let mut sim = Simulator::new(&ptx).unwrap_or_else(|e| panic!("{e}"));
    sim.options.profile = true;
    let (i, o) = (sim.alloc(&vec![1u32; 4096]), sim.alloc_zeroed::<u32>(4096));
    sim.launch("k", cfg, &[Arg::Ptr(o), Arg::Ptr(i), Arg::U32(n)]).unwrap_or_else(|e| panic!("{e}"));
    sim.last_profile().expect("profiled")
}

#[test]
fn profiling_is_off_by_default() {
    let ptx = kernel(DECLS, "");
    let mut sim = Simulator::new(&ptx).unwrap();
    let (i, o) = (sim.alloc(&[0u32]), sim.alloc_zeroed::<u32>(1));
    sim.launch("k", LaunchConfig::linear(1, 32), &[Arg::Ptr(o), Arg::Ptr(i), Arg::U32(0)]).unwrap();
    assert!(sim.last_profile().is_none());
}

#[test]
fn strided_loads_touch_one_sector_per_lane() {
    // Lane t loads in[t * n] and stores out[t]: n = 1 is coalesced (4 sectors of 32 bytes),
    // n = 8 puts every lane in its own sector (32).
    let body =
        "    mul.lo.u32 %r1, %r_tid, %r_n;\n    mul.wide.u32 %rd1, %r1, 4;\n    add.s64 %rd2, %rd_in, %rd1;\n    \
                ld.global.u32 %r2, [%rd2];\n    mul.wide.u32 %rd3, %r_tid, 4;\n    add.s64 %rd4, %rd_out, %rd3;\n    \
                st.global.u32 [%rd4], %r2;\n";
    for (stride, load_sectors) in [(1u32, 4u64), (2, 8), (8, 32), (64, 32)] {
        let p = profile(body, LaunchConfig::linear(1, 32), stride);
        assert_eq!((p.global_load_requests, p.global_store_requests), (1, 1), "stride {stride}");
        assert_eq!(p.global_sectors, load_sectors + 4, "stride {stride}");
        assert_eq!(p.global_bytes_requested, 2 * 128);
        assert_eq!((p.unique_bytes_read, p.unique_bytes_written), (128, 128));
        assert_eq!(p.warp_instructions_of(InstClass::GlobalMem), 2);
        assert_eq!(p.lanes_per_warp_instruction(), 32.0);
    }
}

#[test]
fn a_32_way_bank_conflict_and_its_padded_fix() {
    // Lane t stores to and loads from word t * n of shared memory: n = 32 puts every lane in
    // bank 0 (32 wavefronts per request), n = 33 (one word of padding per row) in bank t.
    let body = "    mul.lo.u32 %r1, %r_tid, %r_n;\n    shl.b32 %r1, %r1, 2;\n    mov.u32 %r2, sm;\n    add.u32 %r2, %r2, %r1;\n    \
                st.shared.u32 [%r2], %r_tid;\n    bar.sync 0;\n    ld.shared.u32 %r3, [%r2];\n";
    let conflicted = profile(body, LaunchConfig::linear(1, 32), 32);
    assert_eq!((conflicted.shared_requests, conflicted.shared_wavefronts), (2, 64));
    let padded = profile(body, LaunchConfig::linear(1, 32), 33);
    assert_eq!((padded.shared_requests, padded.shared_wavefronts), (2, 2));
    // Every lane reading the same word is a broadcast: one wavefront.
    let broadcast = profile(
        body.replace("st.shared", "setp.eq.u32 %p3, %r_tid, 0;\n    @%p3 st.shared").as_str(),
        LaunchConfig::linear(1, 32),
        0,
    );
    assert_eq!(broadcast.wavefronts_per_request(), 1.0);
    assert_eq!(padded.barriers_per_block(), 1.0);
    // 16-byte accesses go in four phases of 8 lanes: 4 wavefronts when contiguous.
    let v4 = "    shl.b32 %r1, %r_tid, 4;\n    mov.u32 %r2, sm;\n    add.u32 %r2, %r2, %r1;\n    \
              st.shared.v4.u32 [%r2], {%r_tid, %r_tid, %r_tid, %r_tid};\n";
    let p = profile(v4, LaunchConfig::linear(1, 32), 0);
    assert_eq!((p.shared_requests, p.shared_wavefronts, p.shared_bytes_requested), (1, 4, 512));
}

#[test]
fn ldmatrix_counts_its_rows_access_pattern() {
    // ldmatrix.x4: 32 row addresses of 16 bytes. Rows 16 bytes apart: 4 wavefronts (one per
    // 8-row phase); rows 128 bytes apart all fall in banks 0..4: 8 per phase, 32 in all.
    let body = "    mul.lo.u32 %r1, %r_tid, %r_n;\n    mov.u32 %r2, sm;\n    add.u32 %r2, %r2, %r1;\n    \
                st.shared.v4.u32 [%r2], {%r_tid, %r_tid, %r_tid, %r_tid};\n    bar.sync 0;\n    \
                ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r4, %r5, %r6, %r7}, [%r2];\n";
    let dense = profile(body, LaunchConfig::linear(1, 32), 16);
    assert_eq!(dense.warp_instructions_of(InstClass::Ldmatrix), 1);
    assert_eq!((dense.shared_requests, dense.shared_wavefronts), (2, 4 + 4));
    assert_eq!((dense.ldmatrix_requests, dense.ldmatrix_wavefronts), (1, 4));
    let strided = profile(body, LaunchConfig::linear(1, 32), 128);
    assert_eq!((strided.ldmatrix_requests, strided.ldmatrix_wavefronts), (1, 32));
    assert_eq!((strided.shared_requests, strided.shared_wavefronts), (2, 32 + 32));
}

#[test]
fn a_divergent_branch_issues_both_paths_with_fewer_lanes() {
    // Lanes below n take 5 adds; the others 5 other adds and a jump back to the join.
    let body = "    setp.lt.u32 %p1, %r_tid, %r_n;\n    @%p1 bra $L_then;\n    \
                add.u32 %r1, %r1, 1;\n    add.u32 %r1, %r1, 1;\n    add.u32 %r1, %r1, 1;\n    add.u32 %r1, %r1, 1;\n    add.u32 %r1, %r1, 1;\n    \
                bra.uni $L_join;\n$L_then:\n    \
                add.u32 %r1, %r1, 2;\n    add.u32 %r1, %r1, 2;\n    add.u32 %r1, %r1, 2;\n    add.u32 %r1, %r1, 2;\n    add.u32 %r1, %r1, 2;\n\
                $L_join:\n    mul.wide.u32 %rd1, %r_tid, 4;\n    add.s64 %rd2, %rd_out, %rd1;\n    st.global.u32 [%rd2], %r1;\n";
    let uniform = profile(body, LaunchConfig::linear(1, 32), 32);
    let divergent = profile(body, LaunchConfig::linear(1, 32), 8);
    let (w1, w2) = (uniform.total_warp_instructions(), divergent.total_warp_instructions());
    assert_eq!(uniform.active_lanes, 32 * w1);
    assert_eq!(w2 - w1, 6, "the other path's 5 adds and its jump");
    // 8 lanes on the 5 adds of one path, 24 on the 5 adds and the jump of the other.
    assert_eq!(divergent.active_lanes, 32 * (w1 - 5) + 8 * 5 + 24 * 6);
    assert!(divergent.lanes_per_warp_instruction() < 32.0);
    assert_eq!(
        divergent.warp_instructions_of(InstClass::Control),
        uniform.warp_instructions_of(InstClass::Control) + 1
    );
}

#[test]
fn mma_per_warp_and_tensor_flops_are_counted_exactly() {
    // Every warp runs the loop n times, 3 mma.sync m16n8k16 per iteration.
    let mma = "    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f0, %f1, %f2, %f3}, {%r4, %r5, %r6, %r7}, {%r8, %r9}, {%f0, %f1, %f2, %f3};\n";
    let body = format!(
        "    mov.u32 %r1, 0;\n$L_loop:\n{mma}{mma}{mma}    add.u32 %r1, %r1, 1;\n    setp.lt.u32 %p1, %r1, %r_n;\n    @%p1 bra $L_loop;\n"
    );
    let p = profile(&body, LaunchConfig::linear(2, 64), 5);
    let warps = 2 * 2;
    assert_eq!(p.warp_instructions_of(InstClass::Mma), warps * 3 * 5);
    assert_eq!(p.tensor_flops, warps * 3 * 5 * 2 * 16 * 8 * 16);
    assert_eq!(p.blocks, 2);
}

#[test]
fn cp_async_depth_is_the_most_groups_in_flight() {
    // Three groups committed before a wait_group 1, then the rest.
    let copy = |k: u32| {
        format!("    cp.async.cg.shared.global [%r2+{o}], [%rd_in+{o}], 16;\n    cp.async.commit_group;\n", o = 16 * k)
    };
    let body = format!(
        "    mov.u32 %r2, sm;\n{}{}{}    cp.async.wait_group 1;\n{}    cp.async.wait_all;\n",
        copy(0),
        copy(1),
        copy(2),
        copy(3)
    );
    let p = profile(&body, LaunchConfig::linear(1, 1), 0);
    assert_eq!(p.max_async_groups_in_flight, 3);
    assert_eq!(p.warp_instructions_of(InstClass::CpAsync), 4 + 4 + 2);
    assert_eq!((p.global_load_requests, p.shared_requests), (4, 4));
    assert_eq!(p.unique_bytes_read, 64);
}

#[test]
fn occupancy_follows_the_cuda_rules() {
    // 128 threads, 64 registers: 2048 registers a warp, 32 warps by registers -> 8 blocks.
    let o = occupancy(&A100, 128, 64, 0);
    assert_eq!((o.blocks_per_sm, o.warps_per_sm, o.limiter), (8, 32, "registers"));
    assert_eq!(o.fraction, 0.5);
    // 32 registers: the 64-warp limit (16 blocks of 4 warps).
    let o = occupancy(&H100_SXM, 128, 32, 0);
    assert_eq!((o.blocks_per_sm, o.warps_per_sm, o.limiter), (16, 64, "warps"));
    // 48 KiB of shared memory (+1 KiB reserved): 3 blocks on A100's 164 KiB, 4 on H100's 228.
    assert_eq!(occupancy(&A100, 128, 32, 48 * 1024).blocks_per_sm, 3);
    assert_eq!(occupancy(&H100_SXM, 128, 32, 48 * 1024).blocks_per_sm, 4);
    // 32-thread blocks hit the 32-block limit; 200 KiB does not fit an A100 block.
    assert_eq!(occupancy(&A100, 32, 16, 0).limiter, "blocks");
    assert_eq!(occupancy(&A100, 128, 32, 200 * 1024).limiter, "does not fit");
    // 37 registers round up to 40: 1280 a warp, 51 warps -> 12 blocks of 4 warps.
    assert_eq!(occupancy(&A100, 128, 37, 0).blocks_per_sm, 12);
}

#[test]
fn the_roofline_model_names_the_bound() {
    let mut p = Profile { blocks: 1000, tensor_flops: 1 << 40, ..Profile::default() };
    let r = p.roofline(&A100);
    assert_eq!(r.bound, "tensor");
    assert!((r.tensor_s - (1u64 << 40) as f64 / (2048.0 * 108.0 * 1.41e9)).abs() < 1e-12);
    p.unique_bytes_read = 1 << 40;
    assert_eq!(p.roofline(&A100).bound, "dram");
    // Two blocks keep only two SMs busy: the tensor bound is 66 times H100's full-chip one.
    let small = Profile { blocks: 2, tensor_flops: 1 << 30, ..Profile::default() };
    let r = small.roofline(&H100_SXM);
    assert_eq!(r.sms_used, 2);
    assert!((r.tensor_s - (1u64 << 30) as f64 / (2048.0 * 2.0 * 1.83e9)).abs() < 1e-15);
    // Issue: warp instructions at 4 per clock per SM.
    let issue = Profile {
        blocks: 1000,
        warp_instructions: [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 4 * 108 * 1410, 0],
        ..Profile::default()
    };
    let r = issue.roofline(&A100);
    assert_eq!(r.bound, "issue");
    assert!((r.issue_s - 1e-6).abs() < 1e-15);
}
