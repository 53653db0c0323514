//! RMSNorm over the last dimension, `x [.., D]`, `w [D]`:
//!
//! ```text
//! forward:  y = w ⊙ x · r,  r = 1/√(mean(x²) + ε)
//! backward: dx = r (g − x̂ mean(g ⊙ x̂)),  g = dy ⊙ w,  x̂ = x r;   dw = Σ_rows dy ⊙ x̂
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, D, DType, Device, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::host::{KernelFloat, accum_dtype, cpu_only, dot, fusable, host_dispatch, rows_per_task, slice, to_storage, with_host};
use crate::error::Result;

// ---------------------------------------------------------------------------------------------
// Host loops (generic over f32 / f64).

/// RMSNorm rows of `d`: `y`, and `r = 1/√(mean(x²)+ε)` per row.
fn rms_fwd<T: KernelFloat>(x: &[T], w: &[T], d: usize, eps: f64) -> (Vec<T>, Vec<T>) {
    let n = x.len() / d;
    let mut y = vec![T::zero(); x.len()];
    let mut r = vec![T::zero(); n];
    let eps = T::from_f64(eps);
    let dn = T::from_f64(d as f64);
    let rows = rows_per_task(d);
    y.par_chunks_mut(rows * d).zip(r.par_chunks_mut(rows)).zip(x.par_chunks(rows * d)).for_each(|((yc, rc), xc)| {
        for ((yr, ri), xr) in yc.chunks_mut(d).zip(rc.iter_mut()).zip(xc.chunks(d)) {
            let s = (dot(xr, xr) / dn + eps).sqrt();
            *ri = T::one() / s;
            for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                *o = v / s * g;
            }
        }
    });
    (y, r)
}

/// RMSNorm backward: `dx`, and `dw` when asked (summed over a fixed split of the rows).
fn rms_bwd<T: KernelFloat>(x: &[T], w: &[T], dy: &[T], d: usize, eps: f64, want_dw: bool) -> (Vec<T>, Option<Vec<T>>) {
    let n = x.len() / d;
    let mut dx = vec![T::zero(); x.len()];
    let eps = T::from_f64(eps);
    let dn = T::from_f64(d as f64);
    let rows = rows_per_task(d);
    let partials: Vec<Vec<T>> = dx
        .par_chunks_mut(rows * d)
        .zip(x.par_chunks(rows * d))
        .zip(dy.par_chunks(rows * d))
        .map(|((dxc, xc), dyc)| {
            let mut dw = if want_dw { vec![T::zero(); d] } else { Vec::new() };
            for ((dxr, xr), dyr) in dxc.chunks_mut(d).zip(xc.chunks(d)).zip(dyc.chunks(d)) {
                let r = T::one() / (dot(xr, xr) / dn + eps).sqrt();
                // c = mean(g ⊙ x̂), g = dy ⊙ w, x̂ = x r: compute Σ (dy ⊙ w) ⊙ x, then scale by r.
                let mut acc = [0f64; 8];
                let (cx, cg, cw) = (xr.chunks_exact(8), dyr.chunks_exact(8), w.chunks_exact(8));
                let (rx, rg, rw) = (cx.remainder(), cg.remainder(), cw.remainder());
                for ((x8, g8), w8) in cx.zip(cg).zip(cw) {
                    for l in 0..8 {
                        acc[l] += WithDType::to_f64(g8[l] * w8[l]) * WithDType::to_f64(x8[l]);
                    }
                }
                let mut c = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
                for ((&v, &g), &wi) in rx.iter().zip(rg).zip(rw) {
                    c += WithDType::to_f64(g * wi) * WithDType::to_f64(v);
                }
                let c = T::from_f64(c);
                let c = c * r / dn;
                for (((o, &v), &g), &wi) in dxr.iter_mut().zip(xr).zip(dyr).zip(w) {
                    *o = r * (g * wi - v * r * c);
                }
                if want_dw {
                    for ((acc, &v), &g) in dw.iter_mut().zip(xr).zip(dyr) {
                        *acc += g * v * r;
                    }
                }
            }
            dw
        })
        .collect();
    let _ = n;
    let dw = want_dw.then(|| {
        let mut total = vec![T::zero(); d];
        for p in &partials {
            for (t, &v) in total.iter_mut().zip(p) {
                *t += v;
            }
        }
        total
    });
    (dx, dw)
}

// ---------------------------------------------------------------------------------------------
// The graph node.

struct RmsNormOp {
    eps: f64,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "hyperdas-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = l2.shape().elem_count();
        let st = match s1.dtype() {
            DType::F32 => to_storage(rms_fwd::<f32>(slice(s1, l1)?, slice(s2, l2)?, d, self.eps).0),
            DType::F64 => to_storage(rms_fwd::<f64>(slice(s1, l1)?, slice(s2, l2)?, d, self.eps).0),
            _ => return Err(cpu_only()),
        };
        Ok((st, l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = rms_norm_backward(x, w, dy, self.eps, w.track_op()).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((Some(dx), dw))
    }
}

// ---------------------------------------------------------------------------------------------
// Public entry points.

/// RMSNorm over the last dimension: `x [.., D]`, `w [D]`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if fusable(&[x, w]) && x.dim(D::Minus1)? == w.elem_count() {
        return Ok(x.contiguous()?.apply_op2(&w.contiguous()?, RmsNormOp { eps })?);
    }
    rms_norm_composed(x, w, eps)
}

/// The composed RMSNorm (f32 statistics for half-precision inputs, cast back before the weight,
/// as transformers does).
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let in_dt = x.dtype();
    let xf = x.to_dtype(accum_dtype(in_dt))?; // [.., D]
    let var = xf.sqr()?.mean_keepdim(D::Minus1)?; // [.., 1]
    let xn = xf.broadcast_div(&(var + eps)?.sqrt()?)?; // [.., D]
    Ok(xn.to_dtype(in_dt)?.broadcast_mul(w)?) // [.., D]
}

/// The RMSNorm backward: `dx`, and `dw` when `want_dw` (host kernel on CPU f32/f64, composed
/// in the accumulation dtype otherwise).
pub fn rms_norm_backward(x: &Tensor, w: &Tensor, dy: &Tensor, eps: f64, want_dw: bool) -> Result<(Tensor, Option<Tensor>)> {
    if !fusable(&[x, w, dy]) {
        let acc = accum_dtype(x.dtype());
        let (xf, wf, gf) = (x.to_dtype(acc)?, w.to_dtype(acc)?, dy.to_dtype(acc)?);
        let r = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?; // [.., 1]
        let xhat = xf.broadcast_mul(&r)?; // [.., D]
        let g = gf.broadcast_mul(&wf)?; // [.., D]
        let c = (&g * &xhat)?.mean_keepdim(D::Minus1)?; // [.., 1]
        let dx = (g - xhat.broadcast_mul(&c)?)?.broadcast_mul(&r)?.to_dtype(x.dtype())?; // [.., D]
        let dw = if want_dw {
            let dd = wf.elem_count();
            Some((gf * xhat)?.reshape(((), dd))?.sum(0)?.to_dtype(w.dtype())?)
        } else {
            None
        };
        return Ok((dx, dw));
    }
    let d = w.elem_count();
    let shape = x.shape().clone();
    host_dispatch!(
        x.dtype(),
        {
            let (dx, dw) = with_host::<f32, _>(x, |xs| with_host::<f32, _>(w, |ws| with_host::<f32, _>(dy, |gs| rms_bwd(xs, ws, gs, d, eps, want_dw))))???;
            Ok((Tensor::from_vec(dx, shape, &Device::Cpu)?, dw.map(|v| Tensor::from_vec(v, d, &Device::Cpu)).transpose()?))
        },
        {
            let (dx, dw) = with_host::<f64, _>(x, |xs| with_host::<f64, _>(w, |ws| with_host::<f64, _>(dy, |gs| rms_bwd(xs, ws, gs, d, eps, want_dw))))???;
            Ok((Tensor::from_vec(dx, shape, &Device::Cpu)?, dw.map(|v| Tensor::from_vec(v, d, &Device::Cpu)).transpose()?))
        }
    )
}
