//! Gated products, the middle of a gated MLP (same shapes for `g`, `u`, `h`):
//!
//! ```text
//! silu_mul  (SwiGLU):
//!   forward:  h = silu(g) ⊙ u
//!   backward: dg = dh ⊙ u ⊙ σ(g)(1 + g(1 − σ(g))),  du = dh ⊙ silu(g)
//! gelu_mul  (Gemma's GeGLU, gelu_pytorch_tanh):
//!   forward:  h = ½g(1 + t) ⊙ u,  t = tanh(c(g + 0.044715 g³)),  c = √(2/π)
//!   backward: dg = dh ⊙ u ⊙ (½(1 + t) + ½g(1 − t²) c (1 + 3·0.044715 g²)),  du = dh ⊙ gelu(g)
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Device, Layout, Shape, Tensor};
use rayon::prelude::*;

use super::host::{KernelFloat, cpu_only, fusable, host_dispatch, slice, to_storage, with_host};
use crate::error::Result;

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_K: f64 = 0.044_715;

// ---------------------------------------------------------------------------------------------
// Host loops (generic over f32 / f64).

/// `h = f(g, u)` element by element over contiguous host slices, in parallel chunks.
fn gated_fwd<T: KernelFloat>(g: &[T], u: &[T], f: impl Fn(T, T) -> T + Sync) -> Vec<T> {
    let mut h = vec![T::zero(); g.len()];
    h.par_chunks_mut(65_536).zip(g.par_chunks(65_536)).zip(u.par_chunks(65_536)).for_each(|((hc, gc), uc)| {
        for ((o, &a), &b) in hc.iter_mut().zip(gc).zip(uc) {
            *o = f(a, b);
        }
    });
    h
}

/// `(dg, du) = f(g, u, dh)` element by element, as [`gated_fwd`].
fn gated_bwd<T: KernelFloat>(g: &[T], u: &[T], dh: &[T], f: impl Fn(T, T, T) -> (T, T) + Sync) -> (Vec<T>, Vec<T>) {
    let mut dg = vec![T::zero(); g.len()];
    let mut du = vec![T::zero(); g.len()];
    const C: usize = 65_536;
    dg.par_chunks_mut(C).zip(du.par_chunks_mut(C)).zip(g.par_chunks(C).zip(u.par_chunks(C)).zip(dh.par_chunks(C))).for_each(|((dgc, duc), ((gc, uc), hc))| {
        for ((((og, ou), &a), &b), &d) in dgc.iter_mut().zip(duc.iter_mut()).zip(gc).zip(uc).zip(hc) {
            (*og, *ou) = f(a, b, d);
        }
    });
    (dg, du)
}

/// The gate of a gated MLP: which activation multiplies the up projection.
#[derive(Debug, Clone, Copy)]
enum Gate {
    Silu,
    Gelu,
}

impl Gate {
    fn fwd<T: KernelFloat>(self, g: &[T], u: &[T]) -> Vec<T> {
        match self {
            Gate::Silu => gated_fwd(g, u, |a, b| a / (T::one() + (-a).vexp()) * b),
            Gate::Gelu => {
                let (c, k, half) = (T::from_f64(SQRT_2_OVER_PI), T::from_f64(GELU_K), T::from_f64(0.5));
                gated_fwd(g, u, |a, b| {
                    let t = (c * (a + k * a * a * a)).tanh();
                    half * a * (T::one() + t) * b
                })
            }
        }
    }

    fn bwd<T: KernelFloat>(self, g: &[T], u: &[T], dh: &[T]) -> (Vec<T>, Vec<T>) {
        match self {
            Gate::Silu => gated_bwd(g, u, dh, |a, b, d| {
                let sig = T::one() / (T::one() + (-a).vexp());
                (d * b * sig * (T::one() + a * (T::one() - sig)), d * a * sig)
            }),
            Gate::Gelu => {
                let (c, k, half, three) = (T::from_f64(SQRT_2_OVER_PI), T::from_f64(GELU_K), T::from_f64(0.5), T::from_f64(3.0));
                gated_bwd(g, u, dh, |a, b, d| {
                    let t = (c * (a + k * a * a * a)).tanh();
                    let gelu = half * a * (T::one() + t);
                    let dgelu = half * (T::one() + t) + half * a * (T::one() - t * t) * c * (T::one() + three * k * a * a);
                    (d * b * dgelu, d * gelu)
                })
            }
        }
    }

    /// The backward on host tensors (the caller checked they are fusable).
    fn backward(self, g: &Tensor, u: &Tensor, dh: &Tensor) -> Result<(Tensor, Tensor)> {
        let shape = g.shape().clone();
        Ok(host_dispatch!(
            g.dtype(),
            {
                let (a, b) = with_host::<f32, _>(g, |gs| with_host::<f32, _>(u, |us| with_host::<f32, _>(dh, |hs| self.bwd(gs, us, hs))))???;
                (Tensor::from_vec(a, shape.clone(), &Device::Cpu)?, Tensor::from_vec(b, shape, &Device::Cpu)?)
            },
            {
                let (a, b) = with_host::<f64, _>(g, |gs| with_host::<f64, _>(u, |us| with_host::<f64, _>(dh, |hs| self.bwd(gs, us, hs))))???;
                (Tensor::from_vec(a, shape.clone(), &Device::Cpu)?, Tensor::from_vec(b, shape, &Device::Cpu)?)
            }
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// The graph node.

/// A fused gated product `act(g) ⊙ u` as one graph node with its hand-written backward.
struct GatedMulOp(Gate);

impl CustomOp2 for GatedMulOp {
    fn name(&self) -> &'static str {
        match self.0 {
            Gate::Silu => "hyperdas-silu-mul",
            Gate::Gelu => "hyperdas-gelu-mul",
        }
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let st = match s1.dtype() {
            DType::F32 => to_storage(self.0.fwd::<f32>(slice(s1, l1)?, slice(s2, l2)?)),
            DType::F64 => to_storage(self.0.fwd::<f64>(slice(s1, l1)?, slice(s2, l2)?)),
            _ => return Err(cpu_only()),
        };
        Ok((st, l1.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _h: &Tensor, dh: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = self.0.backward(g, u, dh).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((Some(dg), Some(du)))
    }
}

// ---------------------------------------------------------------------------------------------
// SiLU-gated product (SwiGLU's middle).

/// `silu(g) ⊙ u` (same shapes).
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if fusable(&[g, u]) && g.dims() == u.dims() {
        return Ok(g.contiguous()?.apply_op2(&u.contiguous()?, GatedMulOp(Gate::Silu))?);
    }
    Ok((g.silu()? * u)?)
}

/// The backward of [`silu_mul`]: `(dg, du)`.
pub fn silu_mul_backward(g: &Tensor, u: &Tensor, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    if fusable(&[g, u, dh]) {
        return Gate::Silu.backward(g, u, dh);
    }
    let sig = candle_nn::ops::sigmoid(g)?;
    let silu = (g * &sig)?;
    let dsilu = (&sig * (g * (sig.affine(-1.0, 1.0)?))?.affine(1.0, 1.0)?)?;
    Ok(((dh * u)?.mul(&dsilu)?, (dh * silu)?))
}

// ---------------------------------------------------------------------------------------------
// GELU(tanh)-gated product (Gemma's GeGLU middle).

/// `gelu_tanh(g) ⊙ u` (same shapes): transformers' `gelu_pytorch_tanh` gate.
pub fn gelu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    if fusable(&[g, u]) && g.dims() == u.dims() {
        return Ok(g.contiguous()?.apply_op2(&u.contiguous()?, GatedMulOp(Gate::Gelu))?);
    }
    gelu_mul_composed(g, u)
}

/// [`gelu_mul`] from candle ops with exact constants (candle's own `gelu` backward rounds
/// √(2/π) and 0.044715 to six digits).
pub fn gelu_mul_composed(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    let inner = ((g.sqr()? * GELU_K)?.affine(1.0, 1.0)? * g)?; // g + k g³
    let t = (inner * SQRT_2_OVER_PI)?.tanh()?;
    Ok(((g * 0.5)? * t.affine(1.0, 1.0)?)?.mul(u)?)
}

/// The backward of [`gelu_mul`]: `(dg, du)`. Fused on the CPU in f32/f64; elsewhere (half
/// precision, other devices) from candle ops in f32 with the exact constants:
/// `gelu'(g) = ½(1 + t) + ½ g (1 − t²) √(2/π) (1 + 3k g²)`, `t = tanh(√(2/π)(g + k g³))`.
pub fn gelu_mul_backward(g: &Tensor, u: &Tensor, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    if fusable(&[g, u, dh]) {
        return Gate::Gelu.backward(g, u, dh);
    }
    let dt = g.dtype();
    let acc = super::accum_dtype(dt);
    let (g, u, dh) = (g.to_dtype(acc)?, u.to_dtype(acc)?, dh.to_dtype(acc)?);
    let g2 = g.sqr()?;
    let t = (((&g2 * GELU_K)?.affine(1.0, 1.0)? * &g)? * SQRT_2_OVER_PI)?.tanh()?; // tanh(√(2/π)(g + k g³))
    let gelu = ((&g * 0.5)? * t.affine(1.0, 1.0)?)?;
    let dt_dg = ((t.sqr()?.affine(-1.0, 1.0)? * (&g2 * (3.0 * GELU_K))?.affine(SQRT_2_OVER_PI, SQRT_2_OVER_PI)?)? * (&g * 0.5)?)?; // ½ g (1 − t²) √(2/π)(1 + 3k g²)
    let dgelu = (t.affine(0.5, 0.5)? + dt_dg)?;
    let dg = ((&dh * &u)? * dgelu)?.to_dtype(dt)?;
    let du = (&dh * gelu)?.to_dtype(dt)?;
    Ok((dg, du))
}
