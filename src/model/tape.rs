//! The frozen target's upper blocks with a hand-written backward pass to the residual.
//!
//! An intervention at layer `l` trains through blocks `l..L`, the final norm and lm_head at
//! the label positions, but the target is frozen: only `∂loss/∂resid_l` is needed. Candle's
//! autograd would compute the weight gradients of every matmul as well (twice the backward
//! matmul work) and accumulate every op's gradient through fresh zero tensors. Here the
//! forward pass runs outside the graph, keeping a tape per block, and one graph node
//! ([`kernels::graft`]) carries the whole backward:
//!
//! ```text
//! forward (per block):  h1 = rms(x; w_in)   q,k,v = h1 W_{q,k,v}ᵀ   q,k = rope(q,k)
//!                       p = softmax(s q kᵀ + mask)   a = (p v) W_oᵀ   y1 = x + a
//!                       h2 = rms(y1; w_post)   g,u = h2 W_{g,u}ᵀ   y = y1 + (silu(g) ⊙ u) W_dᵀ
//! backward:             dm = dy W_d   (dg, du) = silu_mul'   dy1 = dy + rms'(y1; dg W_g + du W_u)
//!                       do = dy1 W_o   dp = do vᵀ   dv = pᵀ do   ds = s · softmax'(p, dp)
//!                       dq = rope⁻¹(ds k)   dk = rope⁻¹(dsᵀ q)   dx = dy1 + rms'(x; dq W_q + dk W_k + dv W_v)
//! ```
//!
//! Tape per block: `x, y1, q, k, v, p, g, u` (no weight gradients, so no normed inputs).
//! Equal to autograd through the composed model (`tests/step.rs`, `tests/kernels.rs`).

use candle_core::{D, Tensor};

use super::batch::ForwardContext;
use super::kernels;
use super::llama::{Block, Linear, Llama, rows_at};
use crate::error::{Error, Result};

/// What one block's backward needs.
struct BlockTape {
    x: Tensor,  // [B, T, D] input
    y1: Tensor, // [B, T, D] after attention
    q: Tensor,  // [B, H, T, hd] after RoPE
    k: Tensor,  // [B, Hkv, T, hd] after RoPE
    v: Tensor,  // [B, Hkv, T, hd]
    p: Tensor,  // [B, H, T, T] attention probabilities
    g: Tensor,  // [B, T, F] gate pre-activation
    u: Tensor,  // [B, T, F] up projection
}

/// `x Wᵀ + b` outside any graph.
fn lin(l: &Linear, x: &Tensor) -> Result<Tensor> {
    l.forward(&x.detach())
}

/// `dy W` for `dy [.., out]`, `W [out, in]` → `[.., in]`.
fn lin_back(l: &Linear, dy: &Tensor) -> Result<Tensor> {
    let dims = dy.dims().to_vec();
    let out_f = *dims.last().ok_or_else(|| Error::invalid("linear backward on a scalar"))?;
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let dx = dy.reshape((rows, out_f))?.matmul(&l.weight)?; // [N, in]
    let mut out_dims = dims;
    let last = out_dims.len() - 1;
    out_dims[last] = l.weight.dim(1)?;
    Ok(dx.reshape(out_dims)?)
}

/// One block forward, keeping the tape.
fn block_forward(blk: &Block, x: &Tensor, ctx: &ForwardContext) -> Result<(Tensor, BlockTape)> {
    let a = &blk.self_attn;
    let (b, t, _) = x.dims3()?;
    let (h, hkv, hd) = (a.n_heads, a.n_kv_heads, a.head_dim);
    let rep = h / hkv;
    let h1 = kernels::rms_norm(x, &blk.input_layernorm.weight, blk.input_layernorm.eps)?; // [B, T, D]
    let q = lin(&a.q_proj, &h1)?.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()?; // [B, H, T, hd]
    let k = lin(&a.k_proj, &h1)?.reshape((b, t, hkv, hd))?.transpose(1, 2)?.contiguous()?; // [B, Hkv, T, hd]
    let v = lin(&a.v_proj, &h1)?.reshape((b, t, hkv, hd))?.transpose(1, 2)?.contiguous()?; // [B, Hkv, T, hd]
    let q = kernels::rope(&q, &ctx.cos, &ctx.sin)?; // [B, H, T, hd]
    let k = kernels::rope(&k, &ctx.cos, &ctx.sin)?; // [B, Hkv, T, hd]
    let (o, p) = match kernels::attention_forward_saved(&q, &k, &v, &ctx.mask)? {
        Some(saved) => saved, // [B, T, H·hd], [B, H, T, T]
        None => {
            let scale = 1.0 / (hd as f64).sqrt();
            let qs = (&q * scale)?.reshape((b, hkv, rep * t, hd))?; // [B, Hkv, rep·T, hd]
            let s = qs.matmul(&k.t()?)?.reshape((b, h, t, t))?; // [B, H, T, T]
            let s = s.to_dtype(kernels::accum_dtype(s.dtype()))?;
            let p = kernels::softmax_masked(&s, Some(&ctx.mask.to_dtype(s.dtype())?))?.to_dtype(v.dtype())?; // [B, H, T, T]
            let o = p.reshape((b, hkv, rep * t, t))?.matmul(&v)?; // [B, Hkv, rep·T, hd]
            (o.reshape((b, h, t, hd))?.transpose(1, 2)?.reshape((b, t, h * hd))?, p) // [B, T, H·hd]
        }
    };
    let y1 = (x + lin(&a.o_proj, &o)?)?; // [B, T, D]
    let h2 = kernels::rms_norm(&y1, &blk.post_attention_layernorm.weight, blk.post_attention_layernorm.eps)?; // [B, T, D]
    let g = lin(&blk.mlp.gate_proj, &h2)?; // [B, T, F]
    let u = lin(&blk.mlp.up_proj, &h2)?; // [B, T, F]
    let y = (&y1 + lin(&blk.mlp.down_proj, &kernels::silu_mul(&g, &u)?)?)?; // [B, T, D]
    Ok((y, BlockTape { x: x.clone(), y1, q, k, v, p, g, u }))
}

/// One block backward: `dy [B, T, D]` → `dx [B, T, D]`.
fn block_backward(blk: &Block, tape: &BlockTape, dy: &Tensor, ctx: &ForwardContext) -> Result<Tensor> {
    let a = &blk.self_attn;
    let (b, t, _) = dy.dims3()?;
    let (h, hkv, hd) = (a.n_heads, a.n_kv_heads, a.head_dim);
    let rep = h / hkv;
    let scale = 1.0 / (hd as f64).sqrt();
    // MLP.
    let dm = lin_back(&blk.mlp.down_proj, dy)?; // [B, T, F]
    let (dg, du) = kernels::silu_mul_backward(&tape.g, &tape.u, &dm)?; // [B, T, F] each
    let dh2 = (lin_back(&blk.mlp.gate_proj, &dg)? + lin_back(&blk.mlp.up_proj, &du)?)?; // [B, T, D]
    let post = &blk.post_attention_layernorm;
    let dy1 = (dy + kernels::rms_norm_backward(&tape.y1, &post.weight, &dh2, post.eps, false)?.0)?; // [B, T, D]
    // Attention.
    let d_o = lin_back(&a.o_proj, &dy1)?; // [B, T, H·hd]
    let (dq, dk, dv) = if kernels::attention_forward_saved_applies(&tape.q, &tape.k, &tape.v, &ctx.mask) {
        kernels::attention_backward(&tape.q, &tape.k, &tape.v, Some(&tape.p), &ctx.mask, &d_o)? // [B, H, T, hd], [B, Hkv, T, hd] ×2
    } else {
        let d_o = d_o.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()?.reshape((b, hkv, rep * t, hd))?; // [B, Hkv, rep·T, hd]
        let p = tape.p.reshape((b, hkv, rep * t, t))?; // [B, Hkv, rep·T, T]
        let dp = d_o.matmul(&tape.v.t()?)?.reshape((b, h, t, t))?; // [B, H, T, T]
        let dv = p.t()?.matmul(&d_o)?; // [B, Hkv, T, hd] (sums the rep query heads)
        let acc = kernels::accum_dtype(dp.dtype());
        let ds = kernels::softmax_backward(&tape.p.to_dtype(acc)?, &dp.to_dtype(acc)?)?; // [B, H, T, T]
        let ds = (ds * scale)?.to_dtype(d_o.dtype())?.reshape((b, hkv, rep * t, t))?; // [B, Hkv, rep·T, T]
        let dq = ds.matmul(&tape.k)?.reshape((b, h, t, hd))?; // [B, H, T, hd]
        let dk = ds.t()?.matmul(&tape.q.reshape((b, hkv, rep * t, hd))?)?; // [B, Hkv, T, hd]
        (dq, dk, dv)
    };
    let dq = kernels::rope_inverse(&dq, &ctx.cos, &ctx.sin)?; // [B, H, T, hd]
    let dk = kernels::rope_inverse(&dk, &ctx.cos, &ctx.sin)?; // [B, Hkv, T, hd]
    let flat = |x: &Tensor, heads: usize| -> Result<Tensor> { Ok(x.transpose(1, 2)?.reshape((b, t, heads * hd))?) };
    let dh1 = ((lin_back(&a.q_proj, &flat(&dq, h)?)? + lin_back(&a.k_proj, &flat(&dk, hkv)?)?)? + lin_back(&a.v_proj, &flat(&dv, hkv)?)?)?; // [B, T, D]
    let inp = &blk.input_layernorm;
    Ok((dy1 + kernels::rms_norm_backward(&tape.x, &inp.weight, &dh1, inp.eps, false)?.0)?) // [B, T, D]
}

/// Whether the taped path applies: a frozen model (no weight takes part in a graph) with the
/// plain Llama block (Gemma 3 runs through autograd over the composed ops).
fn frozen(model: &Llama) -> bool {
    model.config.is_llama_block() && !model.lm_head.track_op() && model.named_tensors().iter().all(|(_, t)| !t.track_op())
}

impl Llama {
    /// Logits `[B, K, V]` at `positions [B, K]` after running blocks `l..L` and the final norm
    /// from `resid [B, T, D]` (the residual entering block `l`): [`forward_from`](Self::forward_from)
    /// followed by [`logits_at`](Self::logits_at), differentiable with respect to `resid`.
    /// For a frozen model the backward is the hand-written one of this module (one graph
    /// node); otherwise ordinary autograd.
    pub fn logits_from(&self, l: usize, resid: &Tensor, ctx: &ForwardContext, positions: &Tensor) -> Result<Tensor> {
        let n = self.num_layers();
        if l > n {
            return Err(Error::invalid(format!("cannot start at block {l}: the model has {n} blocks")));
        }
        ctx.check(resid, self.config.hidden_size)?;
        if !resid.track_op() || !kernels::fused_enabled() || !frozen(self) {
            let out = self.forward_from(l, resid, ctx)?; // [B, T, D]
            return self.logits_at(&out, positions);
        }
        let mut x = resid.detach(); // [B, T, D]
        let mut tapes = Vec::with_capacity(n - l);
        for blk in &self.layers[l..] {
            let (y, tape) = block_forward(blk, &x, ctx)?;
            tapes.push(tape);
            x = y;
        }
        let last = x; // [B, T, D]
        let normed = kernels::rms_norm(&last, &self.norm.weight, self.norm.eps)?; // [B, T, D]
        let rows = rows_at(&normed, positions)?; // [B, K, D]
        let (b, k, d) = rows.dims3()?;
        let logits = rows.reshape((b * k, d))?.matmul(&self.lm_head.t()?)?.reshape((b, k, self.config.vocab_size))?; // [B, K, V]
        // Flat row indices of the label positions in [B·T], for the backward's scatter.
        let t = last.dim(1)?;
        let pos = positions.to_dtype(candle_core::DType::U32)?.to_vec2::<u32>()?;
        let flat: Vec<u32> = pos.iter().enumerate().flat_map(|(row, ps)| ps.iter().map(move |&p| (row * t) as u32 + p)).collect();
        let flat = Tensor::from_vec(flat, b * k, resid.device())?; // [B·K]
        let blocks: Vec<Block> = self.layers[l..].to_vec();
        let (norm_w, eps, lm_head, ctx) = (self.norm.weight.clone(), self.norm.eps, self.lm_head.clone(), ctx.clone());
        kernels::graft(resid, logits, move |dlogits| {
            crate::profile::mark("backward (hypernetwork, loss)");
            let drows = dlogits.reshape((b * k, dlogits.dim(D::Minus1)?))?.matmul(&lm_head)?; // [B·K, D]
            let dnormed = Tensor::zeros((b * t, d), drows.dtype(), drows.device())?.index_add(&flat, &drows, 0)?.reshape((b, t, d))?; // [B, T, D]
            let mut dy = kernels::rms_norm_backward(&last, &norm_w, &dnormed, eps, false)?.0; // [B, T, D]
            for (blk, tape) in blocks.iter().zip(&tapes).rev() {
                dy = block_backward(blk, tape, &dy, &ctx)?; // [B, T, D]
            }
            crate::profile::mark("backward (target)");
            Ok(dy)
        })
    }
}
