//! The frozen target's upper blocks with a hand-written backward pass to the residual.
//!
//! An intervention at layer `l` trains through blocks `l..L`, the final norm and lm_head at
//! the label positions, but the target is frozen: only `∂loss/∂resid_l` is needed. Candle's
//! autograd would compute the weight gradients of every matmul as well (twice the backward
//! matmul work) and accumulate every op's gradient through fresh zero tensors. Here the
//! forward pass runs outside the graph, keeping a tape per block, and one graph node
//! ([`kernels::graft`]) carries the whole backward:
//!
//! The per-block passes are [`Block::forward_taped`] and [`Block::backward_taped`]
//! (`src/model/block.rs`, with their equations).
//!
//! Tape per block: `x, y1, q, k, v, p, g, u` (no weight gradients, so no normed inputs); Gemma 3
//! also keeps the inputs of its extra norms, `q0, k0, a, m`.
//! Equal to autograd through the composed model (`tests/step.rs`, `tests/kernels.rs`).

use candle_core::{D, Tensor};

use super::batch::ForwardContext;
use super::block::Block;
use super::kernels;
use super::llama::{Llama, rows_at};
use crate::error::{Error, Result};

/// Whether the taped path applies: a frozen model (no weight takes part in a graph) whose
/// blocks have a taped backward (the plain Llama block, Gemma 3's).
fn frozen(model: &Llama) -> bool {
    model.config.has_taped_backward() && !model.lm_head.track_op() && model.named_tensors().iter().all(|(_, t)| !t.track_op())
}

impl Llama {
    /// Whether [`logits_from`](Self::logits_from) takes the taped backward for this model (a
    /// frozen model whose blocks have one; the residual must also take part in a graph).
    pub fn taped(&self) -> bool {
        frozen(self) && kernels::fused_enabled()
    }

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
        let final_rms = self.norm.as_rms();
        let bf16 = self.intervened_bf16();
        let Some(final_rms) = final_rms.filter(|_| resid.track_op() && kernels::fused_enabled() && frozen(self)) else {
            let out = kernels::with_frozen_bf16(bf16, || self.forward_from(l, resid, ctx))?; // [B, T, D]
            return self.logits_at(&out, positions);
        };
        let mut x = resid.detach(); // [B, T, D]
        let mut tapes = Vec::with_capacity(n - l);
        for blk in &self.layers[l..] {
            let (y, tape) = kernels::with_frozen_bf16(bf16, || blk.forward_taped(&x, ctx))?;
            tapes.push(tape);
            x = y;
        }
        let last = x; // [B, T, D]
        let normed = kernels::rms_norm(&last, &final_rms.weight, final_rms.eps)?; // [B, T, D]
        let rows = rows_at(&normed, positions)?; // [B, K, D]
        let (b, k, d) = rows.dims3()?;
        let logits = rows.reshape((b * k, d))?.matmul(&self.lm_head.t()?)?.reshape((b, k, self.config.vocab_size))?; // [B, K, V]
        // Flat row indices of the label positions in [B·T], for the backward's scatter.
        let t = last.dim(1)?;
        let pos = positions.to_dtype(candle_core::DType::U32)?.to_vec2::<u32>()?;
        let flat: Vec<u32> = pos.iter().enumerate().flat_map(|(row, ps)| ps.iter().map(move |&p| (row * t) as u32 + p)).collect();
        let flat = Tensor::from_vec(flat, b * k, resid.device())?; // [B·K]
        let blocks: Vec<Block> = self.layers[l..].to_vec();
        let (norm_w, eps, lm_head, ctx) = (final_rms.weight.clone(), final_rms.eps, self.lm_head.clone(), ctx.clone());
        kernels::graft(resid, logits, move |dlogits| {
            crate::profile::mark("backward (hypernetwork, loss)");
            let drows = dlogits.reshape((b * k, dlogits.dim(D::Minus1)?))?.matmul(&lm_head)?; // [B·K, D]
            let dnormed = Tensor::zeros((b * t, d), drows.dtype(), drows.device())?.index_add(&flat, &drows, 0)?.reshape((b, t, d))?; // [B, T, D]
            let mut dy = kernels::rms_norm_backward(&last, &norm_w, &dnormed, eps, false)?.0; // [B, T, D]
            for (blk, tape) in blocks.iter().zip(&tapes).rev() {
                dy = kernels::with_frozen_bf16(bf16, || blk.backward_taped(tape, &dy, &ctx))?; // [B, T, D]
            }
            crate::profile::mark("backward (target)");
            Ok(dy)
        })
    }
}
