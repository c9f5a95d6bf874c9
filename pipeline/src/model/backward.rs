//! The backward pass: the forward's steps in reverse, each layer's gradient written out.
//!
//! `dx [T, d]` is the gradient of the residual stream. Per block, from the top:
//! ```text
//! MLP:  dh = dx Wdown;  dWdown += dx^T h;  (da, db) = swiglu'(dh)
//!       dxn2 = da Wgate + db Wup  (summed over ranks);  dWgate += da^T xn2;  dWup += db^T xn2
//!       dx_mid = dx + rmsnorm'(dxn2)
//! attn: do = dx_mid Wo;  dWo += dx_mid^T o;  (dq, dk, dv[, dgates]) = attention'(do)
//!       dq, dk rotated back (RoPE'); gates through the sigmoid
//!       dxn1 = dq Wq + dk Wk + dv Wv [+ dgates Wg]  (summed over ranks);  dW* += d*^T xn1
//!       dx_in = dx_mid + rmsnorm'(dxn1)
//! ```
//! and at the ends the tied head (`dE += dlogits^T xnf`, `dxnf = dlogits E`) and the
//! embedding (`dE[token] += dx`). Gradients of the weights are accumulated into zeroed buffers
//! in the weights' order.

use squid_attention::dense::{self, DenseConfig};
use squid_attention::nsa::{self, NsaInputs};
use squid_attention::segments::{self, SegmentConfig};
use squid_kvcache::Rope;

use super::config::{AttentionKind, ModelConfig};
use super::forward::{local_heads, AttnActs, ForwardPass, LayerActs, Prepared, Reducer};
use super::layers::{add_into, embed_backward, rmsnorm_backward, sigmoid_backward, swiglu_backward};
use super::matmul::{gemm, linear_backward};
use super::weights::Dims;
use crate::Error;

/// Gradients of attention's inputs.
struct AttnGrads {
    dq: Vec<f32>,
    dk: Vec<f32>,
    dv: Vec<f32>,
    /// Gradient of the gates after the sigmoid (NSA).
    dgates: Option<Vec<f32>>,
}

/// Gradients of attention's inputs before RoPE (`dq`, `dk` rotated back).
fn attention_backward(
    config: &ModelConfig,
    dims: &Dims,
    rope: &Rope,
    prep: &Prepared,
    act: &LayerActs,
    d_o: &[f32],
) -> Result<AttnGrads, Error> {
    let heads = local_heads(dims);
    let cu = &prep.cu_seqlens;
    let (q, k, v) = (&act.q[..], &act.k[..], &act.v[..]);
    let mut grads = match (&act.attn, config.attention) {
        (AttnActs::Flash { o, lse }, AttentionKind::Dense) => {
            let g = dense::backward(&DenseConfig::causal(heads), q, k, v, o, lse, d_o, cu, cu)?;
            AttnGrads { dq: g.dq, dk: g.dk, dv: g.dv, dgates: None }
        }
        (AttnActs::Flash { o, lse }, AttentionKind::Segments) => {
            let layout = prep.layout.as_ref().expect("prepared for segment attention");
            let g = segments::backward(&SegmentConfig::new(heads), layout, q, k, v, o, lse, d_o, cu, cu)?;
            AttnGrads { dq: g.dq, dk: g.dk, dv: g.dv, dgates: None }
        }
        (AttnActs::Nsa { out, k_cmp, v_cmp, gates }, AttentionKind::Nsa(p)) => {
            let ncfg = p.to_nsa_config();
            let inputs = NsaInputs { q, k, v, k_win: None, v_win: None, k_cmp, v_cmp, gates, cu_seqlens: cu };
            let g = nsa::backward(&ncfg, &heads, &inputs, out, d_o)?;
            // Compressed K/V are means of K/V blocks: send their gradients back to the rows.
            let mut dk = g.dk;
            let mut dv = g.dv;
            add_into(&mut dk, &nsa::compress_mean_backward(&ncfg, dims.hkv, dims.hd, &g.dk_cmp, cu)?);
            add_into(&mut dv, &nsa::compress_mean_backward(&ncfg, dims.hkv, dims.hd, &g.dv_cmp, cu)?);
            AttnGrads { dq: g.dq, dk, dv, dgates: Some(g.dgates) }
        }
        (AttnActs::Docs { o_seg, lse_seg, q_doc, k_doc, v_doc, o_doc, lse_doc, .. }, AttentionKind::Segments) => {
            let layout = prep.layout.as_ref().expect("prepared for segment attention");
            let docs = prep.docs.as_ref().expect("prepared with documents");
            let (qd, kvd) = (dims.hq * dims.hd, dims.hkv * dims.hd);
            // The segment call's document rows were replaced by the document call's: no gradient
            // reaches them there (a zero output gradient contributes exactly zero).
            let mut d_o_seg = d_o.to_vec();
            docs.scatter(&mut d_o_seg, &vec![0f32; docs.rows.len() * qd], qd, false);
            let g = segments::backward(&SegmentConfig::new(heads), layout, q, k, v, o_seg, lse_seg, &d_o_seg, cu, cu)?;
            let d_o_doc = docs.gather(d_o, qd);
            let gd = dense::backward(
                &DenseConfig::causal(heads),
                q_doc,
                k_doc,
                v_doc,
                o_doc,
                lse_doc,
                &d_o_doc,
                &docs.cu,
                &docs.cu,
            )?;
            let (mut dq, mut dk, mut dv) = (g.dq, g.dk, g.dv);
            docs.scatter(&mut dq, &gd.dq, qd, true);
            rope.backward(&mut dq, dims.hq, &docs.local_positions)?;
            rope.backward(&mut dk, dims.hkv, &prep.positions)?;
            let mut dk_doc = gd.dk;
            rope.backward(&mut dk_doc, dims.hkv, &docs.positions)?;
            docs.scatter(&mut dk, &dk_doc, kvd, true);
            docs.scatter(&mut dv, &gd.dv, kvd, true);
            return Ok(AttnGrads { dq, dk, dv, dgates: None });
        }
        _ => unreachable!("activations come from a forward with the same config"),
    };
    rope.backward(&mut grads.dq, dims.hq, &prep.positions)?;
    rope.backward(&mut grads.dk, dims.hkv, &prep.positions)?;
    Ok(grads)
}

/// Checks `dlogits` against the pass.
pub(crate) fn check_dlogits(fwd: &ForwardPass, vocab: usize, dlogits: &[f32]) -> Result<(), Error> {
    if dlogits.len() != fwd.logits.len() {
        return Err(Error::Shape(format!(
            "dlogits has {} elements, the pass has {} tokens x {vocab} logits",
            dlogits.len(),
            fwd.num_tokens()
        )));
    }
    if let Some(i) = dlogits.iter().position(|x| !x.is_finite()) {
        return Err(Error::Shape(format!("dlogits[{i}] = {} is not finite", dlogits[i])));
    }
    Ok(())
}

/// The backward pass of [`super::forward::forward_core`]: weight gradients in the weights' order.
pub(crate) fn backward_core<R: Reducer>(
    config: &ModelConfig,
    dims: &Dims,
    w: &[Vec<f32>],
    rope: &Rope,
    fwd: &ForwardPass,
    dlogits: &[f32],
    reduce: &R,
) -> Result<Vec<Vec<f32>>, Error> {
    check_dlogits(fwd, dims.vocab, dlogits)?;
    let prep = &fwd.prep;
    let t = prep.total();
    let (d, hd, f) = (dims.d, dims.hd, dims.f);
    let (qd, kvd) = (dims.hq * hd, dims.hkv * hd);
    let mut g = dims.zeros();

    // Tied head and final norm.
    let mut dxn_f = vec![0f32; t * d];
    gemm(&mut dxn_f, dlogits, false, &w[Dims::EMBED], false, t, dims.vocab, d, false);
    gemm(&mut g[Dims::EMBED], dlogits, true, &fwd.xn_f, false, dims.vocab, t, d, true);
    let mut dx = vec![0f32; t * d];
    let fnorm = dims.final_norm();
    rmsnorm_backward(&mut dx, &mut g[fnorm], &dxn_f, &fwd.x_final, &w[fnorm], &fwd.inv_f, d);

    for l in (0..dims.layers).rev() {
        let ix = dims.layer(l);
        let act = &fwd.layers[l];
        // MLP sub-block: x_out = x_mid + down(swiglu(...)).
        let mut dh = vec![0f32; t * f];
        linear_backward(&mut dh, &mut g[ix.w_down], &dx, &act.h, &w[ix.w_down], t, f, d, false);
        let (mut da, mut db) = (vec![0f32; t * f], vec![0f32; t * f]);
        swiglu_backward(&mut da, &mut db, &dh, &act.a, &act.b);
        let mut dxn2 = vec![0f32; t * d];
        linear_backward(&mut dxn2, &mut g[ix.w_gate], &da, &act.xn2, &w[ix.w_gate], t, d, f, false);
        linear_backward(&mut dxn2, &mut g[ix.w_up], &db, &act.xn2, &w[ix.w_up], t, d, f, true);
        reduce.sum(&mut dxn2)?;
        // dx now holds d(x_mid): the residual path plus the norm's input gradient.
        rmsnorm_backward(&mut dx, &mut g[ix.mlp_norm], &dxn2, &act.x_mid, &w[ix.mlp_norm], &act.inv2, d);

        // Attention sub-block: x_mid = x_in + o Wo^T.
        let mut d_o = vec![0f32; t * qd];
        linear_backward(&mut d_o, &mut g[ix.wo], &dx, act.attn.o(), &w[ix.wo], t, qd, d, false);
        let ag = attention_backward(config, dims, rope, prep, act, &d_o)?;
        let (dq, dk, dv) = (ag.dq, ag.dk, ag.dv);
        let mut dxn1 = vec![0f32; t * d];
        linear_backward(&mut dxn1, &mut g[ix.wq], &dq, &act.xn1, &w[ix.wq], t, d, qd, false);
        linear_backward(&mut dxn1, &mut g[ix.wk], &dk, &act.xn1, &w[ix.wk], t, d, kvd, true);
        linear_backward(&mut dxn1, &mut g[ix.wv], &dv, &act.xn1, &w[ix.wv], t, d, kvd, true);
        if let (Some(gi), Some(mut dgates), AttnActs::Nsa { gates, .. }) = (ix.wg, ag.dgates, &act.attn) {
            sigmoid_backward(&mut dgates, gates);
            linear_backward(&mut dxn1, &mut g[gi], &dgates, &act.xn1, &w[gi], t, d, dims.hq * 3, true);
        }
        reduce.sum(&mut dxn1)?;
        rmsnorm_backward(&mut dx, &mut g[ix.attn_norm], &dxn1, &act.x_in, &w[ix.attn_norm], &act.inv1, d);
    }
    embed_backward(&mut g[Dims::EMBED], &dx, &prep.tokens, d);
    Ok(g)
}
