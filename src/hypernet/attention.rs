//! Attention with explicit query and key/value inputs (self- or cross-attention), grouped
//! key/value heads without copies, composed softmax (differentiable everywhere).

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::model::llama::{Linear, softmax_last_dim};
use crate::model::rope::apply_rotary;

/// Additive mask value for hidden keys: large and finite, so a row whose keys are all hidden
/// gives a uniform (not NaN) distribution.
pub const MASKED: f64 = -1e9;

/// q/k/v/o projections of one attention sub-layer.
#[derive(Debug, Clone)]
pub struct AttnWeights {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
}

/// RoPE tables (`[B, 1, T, hd]` each) for queries and keys.
pub struct Rotary<'a> {
    pub q: (&'a Tensor, &'a Tensor),
    pub k: (&'a Tensor, &'a Tensor),
}

impl AttnWeights {
    /// `x [B, T_q, D]` attends to `kv [B, T_k, D]` with additive `mask` broadcastable to
    /// `[B, H, T_q, T_k]` → `[B, T_q, D]`.
    pub fn forward(&self, x: &Tensor, kv: &Tensor, rope: &Rotary, mask: &Tensor) -> Result<Tensor> {
        let (b, tq, _) = x.dims3()?;
        let tk = kv.dim(1)?;
        let (h, hkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let rep = h / hkv;
        let q = self.q_proj.forward(x)?.reshape((b, tq, h, hd))?.transpose(1, 2)?.contiguous()?; // [B, H, Tq, hd]
        let k = self.k_proj.forward(kv)?.reshape((b, tk, hkv, hd))?.transpose(1, 2)?.contiguous()?; // [B, Hkv, Tk, hd]
        let v = self.v_proj.forward(kv)?.reshape((b, tk, hkv, hd))?.transpose(1, 2)?.contiguous()?; // [B, Hkv, Tk, hd]
        let q = apply_rotary(&q, rope.q.0, rope.q.1)?; // [B, H, Tq, hd]
        let k = apply_rotary(&k, rope.k.0, rope.k.1)?; // [B, Hkv, Tk, hd]
        let q = (q * (1.0 / (hd as f64).sqrt()))?.reshape((b, hkv, rep * tq, hd))?; // [B, Hkv, rep·Tq, hd]
        let scores = q.matmul(&k.t()?)?.reshape((b, h, tq, tk))?; // [B, H, Tq, Tk]
        let scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?; // [B, H, Tq, Tk]
        let probs = softmax_last_dim(&scores)?; // [B, H, Tq, Tk]
        let out = probs.reshape((b, hkv, rep * tq, tk))?.matmul(&v)?; // [B, Hkv, rep·Tq, hd]
        let out = out.reshape((b, h, tq, hd))?.transpose(1, 2)?.reshape((b, tq, h * hd))?; // [B, Tq, H·hd]
        self.o_proj.forward(&out) // [B, Tq, D]
    }
}

/// Additive key mask `[B, 1, 1, T_k]` from a 0/1 mask `[B, T_k]`.
pub fn key_mask(mask: &Tensor) -> Result<Tensor> {
    let (b, t) = mask.dims2()?;
    let m = mask.to_dtype(DType::F32)?;
    Ok(((m.affine(-1.0, 1.0)?) * MASKED)?.reshape((b, 1, 1, t))?) // 0 where visible, MASKED where hidden
}

/// Causal + key-padding additive mask `[B, 1, T, T]` for self-attention over left-padded rows.
pub fn causal_mask(mask: &Tensor) -> Result<Tensor> {
    let (b, t) = mask.dims2()?;
    let keys = mask.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut out = vec![0f32; b * t * t];
    for (bi, row) in keys.iter().enumerate() {
        for i in 0..t {
            for j in 0..t {
                if j > i || row[j] == 0.0 {
                    out[bi * t * t + i * t + j] = MASKED as f32;
                }
            }
        }
    }
    Ok(Tensor::from_vec(out, (b, 1, t, t), mask.device())?)
}
