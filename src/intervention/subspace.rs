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

/// ReflectSelect with `n` reflections per example: `W_b = H_{b,1} ⋯ H_{b,n} R` with
/// `H_{b,i} = I − 2 u_{b,i} u_{b,i}ᵀ`, then `h + W_b W_bᵀ (m − h)`. `u [B, n, D]` must have unit
/// rows. One reflection changes at most one direction of `span(R)`; `n` of them change up to
/// `n`, so instructions can select subspaces that differ in more than one direction. Applied
/// to vectors, never as `[B, D, D]`: `(m−h)ᵀ W_b = ((m−h)ᵀ H_{b,1} ⋯ H_{b,n}) R` and
/// `W_b c = H_{b,1} ⋯ H_{b,n} (R c)`. With `n = 1` it equals [`reflect_select`].
pub fn reflect_select_many(h: &Tensor, m: &Tensor, r: &Tensor, u: &Tensor) -> Result<Tensor> {
    let (b, t, d) = check(h, m)?;
    let n = match u.dims() {
        [bb, n, dd] if *bb == b && *dd == d && *n > 0 => *n,
        other => return Err(Error::invalid(format!("reflect_select_many: u has shape {other:?}, expected [{b}, n ≥ 1, {d}]"))),
    };
    let reflect = |x: &Tensor, i: usize| -> Result<Tensor> {
        let ui = u.narrow(1, i, 1)?; // [B, 1, D]
        let dot = x.broadcast_mul(&ui)?.sum_keepdim(D::Minus1)?; // [B, T, 1]  x·u_i
        Ok((x - dot.broadcast_mul(&ui)?.affine(2.0, 0.0)?)?) // [B, T, D]  H_i x
    };
    let mut diff = (m - h)?; // [B, T, D]
    for i in 0..n {
        diff = reflect(&diff, i)?; // [B, T, D]  (m−h)ᵀ H_1 ⋯ H_i
    }
    let coords = diff.reshape((b * t, d))?.matmul(r)?; // [B·T, k]  (m−h)ᵀ W_b
    let mut back = coords.matmul(&r.t()?)?.reshape((b, t, d))?; // [B, T, D]  R c
    for i in (0..n).rev() {
        back = reflect(&back, i)?; // [B, T, D]  H_i ⋯ H_n R c
    }
    Ok((h + back)?)
}

/// The bases of [`reflect_select_many`], `[B, D, k]`: `W_b = H_{b,1} ⋯ H_{b,n} R` for
/// `r [D, k]` and unit rows `u [B, n, D]`.
pub fn reflected_bases(r: &Tensor, u: &Tensor) -> Result<Tensor> {
    let (d, k) = r.dims2()?;
    let (b, n) = match u.dims() {
        [b, n, dd] if *dd == d && *n > 0 => (*b, *n),
        other => return Err(Error::invalid(format!("reflected_bases: u has shape {other:?}, expected [B, n ≥ 1, {d}]"))),
    };
    let mut w = r.unsqueeze(0)?.broadcast_as((b, d, k))?.contiguous()?; // [B, D, k]
    for i in (0..n).rev() {
        let ui = u.narrow(1, i, 1)?; // [B, 1, D]
        let s = ui.matmul(&w)?; // [B, 1, k]  u_iᵀ W
        w = (w - ui.transpose(1, 2)?.matmul(&s)?.affine(2.0, 0.0)?)?; // [B, D, k]  H_i W
    }
    Ok(w)
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
