//! Attention masks for the hypernetwork. The attention itself is the target's
//! [`Attention::attend`](crate::model::llama::Attention::attend), used for self- and
//! cross-attention alike.

use candle_core::{DType, Tensor};

use crate::error::Result;

/// Additive mask value for hidden keys: large and finite, so a row whose keys are all hidden
/// gives a uniform (not NaN) distribution.
pub const MASKED: f64 = -1e9;

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
