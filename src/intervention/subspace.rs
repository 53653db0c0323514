//! Subspace interventions: how much of `m − h` (the mixed source minus the base) is written
//! into the base, per position. Every function takes `h, m [B, T, D]` and returns `[B, T, D]`.

use candle_core::{D, Tensor};

use crate::error::{Error, Result};

fn check(h: &Tensor, m: &Tensor) -> Result<(usize, usize, usize)> {
    if h.dims() != m.dims() {
        return Err(Error::invalid(format!("intervention: base {:?} and mixed source {:?} differ in shape", h.dims(), m.dims())));
    }
    Ok(h.dims3()?)
}

/// DAS: `h + R Rᵀ (m − h)` with one basis `r [D, k]` for every example.
pub fn das(h: &Tensor, m: &Tensor, r: &Tensor) -> Result<Tensor> {
    let (b, t, d) = check(h, m)?;
    let diff = (m - h)?.reshape((b * t, d))?; // [B·T, D]
    let coords = diff.matmul(r)?; // [B·T, k]
    let back = coords.matmul(&r.t()?)?.reshape((b, t, d))?; // [B, T, D]
    Ok((h + back)?)
}

/// ReflectSelect: per example a reflected basis `W_b = (I − 2 u_b u_bᵀ) R`, then
/// `h + W_b W_bᵀ (m − h)`. `u [B, D]` must have unit rows. Rank-1 form:
/// `(m−h) W_b = (m−h) R − 2 ((m−h)·u_b) (u_bᵀR)` and `c W_bᵀ = c Rᵀ − 2 (c · u_bᵀR) u_bᵀ`.
pub fn reflect_select(h: &Tensor, m: &Tensor, r: &Tensor, u: &Tensor) -> Result<Tensor> {
    let (b, t, d) = check(h, m)?;
    let k = r.dim(1)?;
    if u.dims() != [b, d] {
        return Err(Error::invalid(format!("reflect_select: u has shape {:?}, expected [{b}, {d}]", u.dims())));
    }
    let diff = (m - h)?; // [B, T, D]
    let s = u.matmul(r)?.unsqueeze(1)?; // [B, 1, k]  u_bᵀ R
    let u3 = u.unsqueeze(1)?; // [B, 1, D]
    let du = diff.broadcast_mul(&u3)?.sum_keepdim(D::Minus1)?; // [B, T, 1]  (m−h)·u_b
    let dr = diff.reshape((b * t, d))?.matmul(r)?.reshape((b, t, k))?; // [B, T, k]
    let coords = (dr - du.broadcast_mul(&s)?.affine(2.0, 0.0)?)?; // [B, T, k]  (m−h) W_b
    let back_r = coords.reshape((b * t, k))?.matmul(&r.t()?)?.reshape((b, t, d))?; // [B, T, D]
    let cs = coords.broadcast_mul(&s)?.sum_keepdim(D::Minus1)?; // [B, T, 1]
    let back = (back_r - cs.broadcast_mul(&u3)?.affine(2.0, 0.0)?)?; // [B, T, D]  coords W_bᵀ
    Ok((h + back)?)
}

/// MaskSelect / Boundless DAS: `h + ((m − h) R ⊙ σ) Rᵀ` with `r [D, k]` and a mask
/// `σ [B, k]` (per example) or `[k]` (shared), values in [0, 1].
pub fn masked_rotation(h: &Tensor, m: &Tensor, r: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, t, d) = check(h, m)?;
    let k = r.dim(1)?;
    let mask = match mask.dims() {
        [kk] if *kk == k => mask.reshape((1, 1, k))?,
        [bb, kk] if *bb == b && *kk == k => mask.unsqueeze(1)?,
        other => return Err(Error::invalid(format!("masked_rotation: mask has shape {other:?}, expected [{k}] or [{b}, {k}]"))),
    }; // [B|1, 1, k]
    let coords = (m - h)?.reshape((b * t, d))?.matmul(r)?.reshape((b, t, k))?; // [B, T, k]
    let kept = coords.broadcast_mul(&mask)?; // [B, T, k]
    let back = kept.reshape((b * t, k))?.matmul(&r.t()?)?.reshape((b, t, d))?; // [B, T, D]
    Ok((h + back)?)
}

/// Boundless DAS's boundary mask over `k` rotated dimensions: dimension `i` is intervened on
/// when it lies below the learned boundary `β·k` (`beta` a scalar tensor in [0, 1]), softly:
/// `σ_i = sigmoid((β·k − i) / τ)`. Differentiable in `beta`.
pub fn boundary_mask(beta: &Tensor, k: usize, temperature: f64) -> Result<Tensor> {
    if temperature <= 0.0 {
        return Err(Error::invalid("boundary_mask: temperature must be positive"));
    }
    let idx = Tensor::arange(0u32, k as u32, beta.device())?.to_dtype(beta.dtype())?; // [k]
    let edge = beta.reshape(1)?.affine(k as f64, 0.0)?; // [1]
    let z = edge.broadcast_sub(&idx)?.affine(1.0 / temperature, 0.0)?; // [k]
    Ok(candle_nn::ops::sigmoid(&z)?)
}

/// `x / (‖x‖ + 1e-12)` along the last dimension (unit rows; the epsilon keeps a zero row finite).
pub fn unit_last_dim(x: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_div(&(x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()? + 1e-12)?)?)
}

/// No subspace: the mixed vector replaces the base (`h' = m`).
pub fn full(h: &Tensor, m: &Tensor) -> Result<Tensor> {
    check(h, m)?;
    Ok(m.clone())
}
