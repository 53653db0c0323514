//! Losses from composed ops (every op has a backward).

use candle_core::{D, Tensor};

use crate::error::{Error, Result};

/// `Σ_t weight_t · CE(logits_t, target_t) / normalizer` over `logits [B, K, V]` flattened to
/// `B·K` tokens. A weight of 0 drops a token (padding of the label dimension). HyperDAS uses
/// `normalizer` = the number of supervised tokens, not the weight sum (docs/method.md §5).
pub fn weighted_cross_entropy(logits: &Tensor, targets: &[u32], weights: &[f32], normalizer: f32) -> Result<Tensor> {
    let (b, k, v) = logits.dims3()?;
    if targets.len() != b * k || weights.len() != b * k {
        return Err(Error::invalid(format!("cross entropy: {} targets and {} weights for logits {:?}", targets.len(), weights.len(), logits.dims())));
    }
    let max = logits.max_keepdim(D::Minus1)?.detach(); // [B, K, 1]
    let shifted = logits.broadcast_sub(&max)?; // [B, K, V]
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?; // [B, K, 1]
    let logp = shifted.broadcast_sub(&lse)?; // [B, K, V]
    let mut onehot = vec![0f32; b * k * v];
    for (i, (&t, &w)) in targets.iter().zip(weights).enumerate() {
        if t as usize >= v {
            return Err(Error::invalid(format!("cross entropy: target {t} is outside the vocabulary of {v}")));
        }
        onehot[i * v + t as usize] = w;
    }
    let onehot = Tensor::from_vec(onehot, (b, k, v), logits.device())?.to_dtype(logp.dtype())?; // [B, K, V]
    Ok((logp * onehot)?.sum_all()?.affine(-1.0 / normalizer.max(1e-12) as f64, 0.0)?)
}
