//! Rotary position embeddings (HF rotate-half), `x [B, H, T, hd]`, `cos`/`sin` `[B, 1, T, hd]`:
//!
//! ```text
//! forward:  y = x cos + rotate_half(x) sin,  rotate_half([x1, x2]) = [−x2, x1]
//! backward: dx = the inverse rotation of dy (rope with −sin)
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, D, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::host::{KernelFloat, cpu_only, fusable, slice, to_storage};
use crate::error::Result;

// ---------------------------------------------------------------------------------------------
// Host loop (generic over f32 / f64): the forward and, with `inverse`, the backward.

/// RoPE over `x [B, H, T, hd]` with tables `[B, 1, T, hd]`; `inverse` rotates the other way
/// (the backward of the forward rotation).
fn rope_host<T: KernelFloat>(x: &[T], cos: &[T], sin: &[T], heads: usize, t: usize, hd: usize, inverse: bool) -> Vec<T> {
    let half = hd / 2;
    let mut y = vec![T::zero(); x.len()];
    let per_bh = t * hd;
    y.par_chunks_mut(per_bh).zip(x.par_chunks(per_bh)).enumerate().for_each(|(bh, (yc, xc))| {
        let b = bh / heads;
        let tab = b * t * hd;
        for p in 0..t {
            let (xr, yr) = (&xc[p * hd..(p + 1) * hd], &mut yc[p * hd..(p + 1) * hd]);
            let (c, s) = (&cos[tab + p * hd..tab + (p + 1) * hd], &sin[tab + p * hd..tab + (p + 1) * hd]);
            for i in 0..half {
                let (x1, x2) = (xr[i], xr[i + half]);
                if inverse {
                    yr[i] = x1 * c[i] + x2 * s[i + half];
                    yr[i + half] = x2 * c[i + half] - x1 * s[i];
                } else {
                    yr[i] = x1 * c[i] - x2 * s[i];
                    yr[i + half] = x2 * c[i + half] + x1 * s[i + half];
                }
            }
        }
    });
    y
}

// ---------------------------------------------------------------------------------------------
// The graph node (its backward is the same node rotating the other way).

struct RopeOp {
    inverse: bool,
}

impl RopeOp {
    fn run<T: KernelFloat>(&self, x: &[T], c: &[T], s: &[T], dims: &[usize]) -> Vec<T> {
        let (heads, t, hd) = (dims[1], dims[2], dims[3]);
        rope_host(x, c, s, heads, t, hd, self.inverse)
    }
}

impl CustomOp3 for RopeOp {
    fn name(&self) -> &'static str {
        "hyperdas-rope"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = l1.shape().dims();
        let st = match s1.dtype() {
            DType::F32 => to_storage(self.run::<f32>(slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?, dims)),
            DType::F64 => to_storage(self.run::<f64>(slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?, dims)),
            _ => return Err(cpu_only()),
        };
        Ok((st, l1.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, cos: &Tensor, sin: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dx = dy.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, RopeOp { inverse: !self.inverse })?;
        Ok((Some(dx), None, None))
    }
}

// ---------------------------------------------------------------------------------------------
// Public entry points.

/// Rotary embeddings (HF rotate-half): `x [B, H, T, hd]`, `cos`/`sin` `[B, 1, T, hd]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_dir(x, cos, sin, false)
}

fn rope_dir(x: &Tensor, cos: &Tensor, sin: &Tensor, inverse: bool) -> Result<Tensor> {
    if fusable(&[x, cos, sin])
        && let ([b, _, t, hd], [cb, 1, ct, chd]) = (x.dims(), cos.dims())
        && cb == b
        && ct == t
        && chd == hd
        && hd % 2 == 0
        && sin.dims() == cos.dims()
    {
        return Ok(x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, RopeOp { inverse })?);
    }
    let sin = if inverse { sin.neg()? } else { sin.clone() };
    rope_composed(x, cos, &sin)
}

/// The composed RoPE: `x cos + rotate_half(x) sin`, `rotate_half([x1, x2]) = [−x2, x1]`.
pub fn rope_composed(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, hd / 2)?; // [B, H, T, hd/2]
    let x2 = x.narrow(D::Minus1, hd / 2, hd / 2)?; // [B, H, T, hd/2]
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?; // [B, H, T, hd]
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?) // [B, H, T, hd]
}

/// The inverse rotation (= the backward of [`rope`] applied to a gradient).
pub fn rope_inverse(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_dir(x, cos, sin, true)
}
