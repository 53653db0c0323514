//! Cross-attention of queries `q [B, H, Tq, hd]` over constant states `e [B, Tk, D]` with
//! trainable key/value projections `Wk`, `Wv` `[Hkv·hd, D]`, as one graph node `(q, Wk, Wv)`:
//!
//! ```text
//! forward:  K = rope(heads(e Wkᵀ)),  V = heads(e Wvᵀ),  out = attention(q, K, V; mask)
//! backward: (dq, dK, dV) = attention backward,  dWk = (rope⁻¹ dK)ᵀ e,  dWv = dVᵀ e
//!           (one product [dK | dV]ᵀ e); nothing for e
//! ```
//!
//! No host loop of its own: the forward and backward are those of `attention.rs` and `rope.rs`,
//! around one packed `[Wk; Wv]` product each way.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use super::attention::{attention_backward, attention_forward_saved};
use super::host::{fusable, host_copy};
use super::rope::{rope, rope_inverse};
use crate::error::{Error, Result};

// ---------------------------------------------------------------------------------------------
// The graph node.

/// The forward's tensors, kept for the backward.
struct CrossAttnOp {
    /// The constant states, flattened: `[B·Tk, D]`.
    e: Tensor,
    /// RoPE'd keys and values `[B, Hkv, Tk, hd]`, the probabilities `[B, H, Tq, Tk]`, the output `[B, Tq, H·hd]`.
    k: Tensor,
    v: Tensor,
    p: Tensor,
    out: Tensor,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
}

impl CustomOp3 for CrossAttnOp {
    fn name(&self) -> &'static str {
        "hyperdas-cross-attention"
    }

    fn cpu_fwd(&self, _s1: &CpuStorage, _l1: &Layout, _s2: &CpuStorage, _l2: &Layout, _s3: &CpuStorage, _l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        host_copy(&self.out)
    }

    fn bwd(&self, q: &Tensor, wk: &Tensor, _wv: &Tensor, _out: &Tensor, dout: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let run = || -> Result<(Tensor, Tensor, Tensor)> {
            let (dq, dk, dv) = attention_backward(&q.detach(), &self.k, &self.v, Some(&self.p), &self.mask, dout)?; // dq [B, H, Tq, hd], dk/dv [B, Hkv, Tk, hd]
            let dk = rope_inverse(&dk, &self.cos, &self.sin)?; // [B, Hkv, Tk, hd]: the gradient of e Wkᵀ
            let (b, hkv, tk, hd) = dk.dims4()?;
            let c = hkv * hd;
            // [dK | dV] token-major, columns in the order of the rows of [Wk; Wv].
            let dkv = Tensor::cat(&[&dk, &dv], 1)?.transpose(1, 2)?.contiguous()?.reshape((b * tk, 2 * c))?; // [B·Tk, 2·Hkv·hd]
            let dw = dkv.t()?.matmul(&self.e)?; // [2·Hkv·hd, D]
            Ok((dq, dw.narrow(0, 0, c)?, dw.narrow(0, c, c)?))
        };
        let (dq, dwk, dwv) = run().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        debug_assert_eq!(dwk.dims(), wk.dims());
        Ok((Some(dq), Some(dwk), Some(dwv)))
    }
}

// ---------------------------------------------------------------------------------------------
// Public entry point.

/// Cross-attention of queries `q [B, H, Tq, hd]` (RoPE applied) over constant states
/// `e [B, Tk, D]` with trainable projections `wk`, `wv` `[Hkv·hd, D]`:
///
/// ```text
/// K = rope(heads(e Wkᵀ)),  V = heads(e Wvᵀ)               [B, Hkv, Tk, hd]
/// out = attention(q, K, V; mask)                           [B, Tq, H·hd]
/// dWk = (rope⁻¹ dK)ᵀ e,  dWv = dVᵀ e   (one product [dK | dV]ᵀ e)
/// ```
///
/// One graph node with inputs `(q, wk, wv)`: its backward returns `dq`, `dWk`, `dWv` and
/// nothing for `e`. Why: as separate nodes, `K` and `V` (`Tk` = tokens × (L+1) in the
/// hypernetwork: 11 MB each on SmolLM2 at batch 16) each cost candle's backward a zeroed
/// gradient buffer and an add, plus the RoPE and layout copies of their own nodes; and the two
/// projections share one product (`e` packed once) forward and backward. Returns `None` where
/// the fused kernels do not apply (other devices or dtypes; the caller takes the composed path).
pub fn cross_attention(q: &Tensor, wk: &Tensor, wv: &Tensor, e: &Tensor, k_rope: (&Tensor, &Tensor), mask: &Tensor, hkv: usize) -> Result<Option<Tensor>> {
    if !fusable(&[q, wk, wv, e, k_rope.0, k_rope.1, mask]) || hkv == 0 {
        return Ok(None);
    }
    let (b, tk, d) = e.dims3()?;
    let (_, _, _, hd) = q.dims4()?;
    let c = hkv * hd;
    if wk.dims() != [c, d] || wv.dims() != [c, d] {
        return Err(Error::invalid(format!("cross-attention: key/value weights {:?} / {:?}, expected [{c}, {d}]", wk.dims(), wv.dims())));
    }
    let e = e.detach().reshape((b * tk, d))?; // [B·Tk, D]
    let w = Tensor::cat(&[&wk.detach(), &wv.detach()], 0)?; // [2·Hkv·hd, D]
    let kv = e.matmul(&w.t()?)?.reshape((b, tk, 2 * hkv, hd))?.transpose(1, 2)?.contiguous()?; // [B, 2·Hkv, Tk, hd]
    let (cos, sin) = (k_rope.0.detach(), k_rope.1.detach());
    let k = rope(&kv.narrow(1, 0, hkv)?, &cos, &sin)?; // [B, Hkv, Tk, hd]
    let v = kv.narrow(1, hkv, hkv)?.contiguous()?; // [B, Hkv, Tk, hd]
    let mask = mask.detach();
    let Some((out, p)) = attention_forward_saved(&q.detach(), &k, &v, &mask)? else { return Ok(None) };
    let op = CrossAttnOp { e, k, v, p, out, cos, sin, mask };
    Ok(Some(q.contiguous()?.apply_op3(&wk.contiguous()?, &wv.contiguous()?, op)?))
}
