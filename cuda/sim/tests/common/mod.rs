//! Helpers for hand-written PTX test kernels.
#![allow(dead_code)]

/// Wraps `body` in an sm_80 module with one entry `k(.u64 out, .u64 in, .u32 n)` and the given
/// register declarations; `%rd_out`/`%rd_in` hold the global pointers, `%r_tid` the thread's
/// linear index in the grid.
pub fn kernel(decls: &str, body: &str) -> String {
    format!(
        r#"
.version 8.7
.target sm_80
.address_size 64

.visible .entry k(
    .param .u64 k_param_out,
    .param .u64 k_param_in,
    .param .u32 k_param_n
)
{{
    .reg .b64 %rd_out, %rd_in;
    .reg .b32 %r_tid, %r_n, %r_ctaid, %r_ntid;
    {decls}
    ld.param.u64 %rd_out, [k_param_out];
    ld.param.u64 %rd_in, [k_param_in];
    ld.param.u32 %r_n, [k_param_n];
    cvta.to.global.u64 %rd_out, %rd_out;
    cvta.to.global.u64 %rd_in, %rd_in;
    mov.u32 %r_tid, %tid.x;
    mov.u32 %r_ctaid, %ctaid.x;
    mov.u32 %r_ntid, %ntid.x;
    mad.lo.s32 %r_tid, %r_ctaid, %r_ntid, %r_tid;
{body}
    ret;
}}
"#
    )
}

/// Deterministic pseudo-random u32s.
pub fn rand_u32(n: usize, seed: u64) -> Vec<u32> {
    let mut s = seed | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 16) as u32
        })
        .collect()
}
