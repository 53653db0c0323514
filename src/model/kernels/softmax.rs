//! Softmax over the last dimension after an additive mask (constant, no gradient):
//!
//! ```text
//! forward:  p = softmax(s + mask)
//! backward: ds = p ⊙ (dp − Σ p ⊙ dp)
//! ```
//!
//! Fused for scores `[B, H, Tq, Tk]` with a mask `[B, 1, Tq|1, Tk]` ([`MaskMap`]), or without a mask.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, DType, Device, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use super::host::{KernelFloat, cpu_only, dot, fusable, host_dispatch, rows_per_task, slice, to_storage, with_host};
use crate::error::Result;

/// How a mask `[B, 1, Tq|1, Tk]` lines up with scores `[B, H, Tq, Tk]`: the mask row of score row `i`.
#[derive(Debug, Clone, Copy)]
struct MaskMap {
    heads: usize,
    tq: usize,
    /// The mask has one row per query (`Tq`) or one for all queries (`1`).
    per_query: bool,
}

impl MaskMap {
    fn row(&self, i: usize) -> usize {
        let b = i / (self.heads * self.tq);
        if self.per_query { b * self.tq + i % self.tq } else { b }
    }
}

// ---------------------------------------------------------------------------------------------
// Host loops (generic over f32 / f64).

fn softmax_fwd<T: KernelFloat>(s: &[T], mask: Option<(&[T], MaskMap)>, n: usize) -> Vec<T> {
    let mut p = vec![T::zero(); s.len()];
    let rows = rows_per_task(n);
    p.par_chunks_mut(rows * n).zip(s.par_chunks(rows * n)).enumerate().for_each(|(c, (pc, sc))| {
        for (k, (pr, sr)) in pc.chunks_mut(n).zip(sc.chunks(n)).enumerate() {
            let i = c * rows + k;
            match mask {
                Some((m, map)) => {
                    let mr = &m[map.row(i) * n..(map.row(i) + 1) * n];
                    for ((o, &v), &a) in pr.iter_mut().zip(sr).zip(mr) {
                        *o = v + a;
                    }
                }
                None => pr.copy_from_slice(sr),
            }
            let max = pr.iter().fold(T::neg_infinity(), |a, &v| Float::max(a, v));
            for o in pr.iter_mut() {
                *o = (*o - max).vexp();
            }
            let sum = pr.iter().fold(T::zero(), |a, &v| a + v);
            let inv = T::one() / sum;
            for o in pr.iter_mut() {
                *o *= inv;
            }
        }
    });
    p
}

fn softmax_bwd<T: KernelFloat>(p: &[T], dp: &[T], n: usize) -> Vec<T> {
    let mut ds = vec![T::zero(); p.len()];
    let rows = rows_per_task(n);
    ds.par_chunks_mut(rows * n).zip(p.par_chunks(rows * n)).zip(dp.par_chunks(rows * n)).for_each(|((dc, pc), gc)| {
        for ((dr, pr), gr) in dc.chunks_mut(n).zip(pc.chunks(n)).zip(gc.chunks(n)) {
            let dot = dot(pr, gr);
            for ((o, &p), &g) in dr.iter_mut().zip(pr).zip(gr) {
                *o = p * (g - dot);
            }
        }
    });
    ds
}

// ---------------------------------------------------------------------------------------------
// The graph node: one input without a mask, two with one.

struct SoftmaxOp {
    map: Option<MaskMap>,
}

impl SoftmaxOp {
    fn run<T: KernelFloat>(&self, s: &[T], m: Option<&[T]>, n: usize) -> Vec<T> {
        softmax_fwd(s, m.zip(self.map), n)
    }
}

impl CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "hyperdas-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = l.shape().dims().last().copied().unwrap_or(1);
        let st = match s.dtype() {
            DType::F32 => to_storage(self.run::<f32>(slice(s, l)?, None, n)),
            DType::F64 => to_storage(self.run::<f64>(slice(s, l)?, None, n)),
            _ => return Err(cpu_only()),
        };
        Ok((st, l.shape().clone()))
    }

    fn bwd(&self, _s: &Tensor, p: &Tensor, dp: &Tensor) -> candle_core::Result<Option<Tensor>> {
        softmax_backward(p, dp).map(Some).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

impl CustomOp2 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "hyperdas-softmax-masked"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let n = l1.shape().dims().last().copied().unwrap_or(1);
        let st = match s1.dtype() {
            DType::F32 => to_storage(self.run::<f32>(slice(s1, l1)?, Some(slice(s2, l2)?), n)),
            DType::F64 => to_storage(self.run::<f64>(slice(s1, l1)?, Some(slice(s2, l2)?), n)),
            _ => return Err(cpu_only()),
        };
        Ok((st, l1.shape().clone()))
    }

    fn bwd(&self, _s: &Tensor, _m: &Tensor, p: &Tensor, dp: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(softmax_backward(p, dp).map_err(|e| candle_core::Error::Msg(e.to_string()))?), None))
    }
}

// ---------------------------------------------------------------------------------------------
// Public entry points.

/// Softmax over the last dimension of `s`, after adding `mask` (optional; constant, no
/// gradient). For the fused path the mask is `[B, 1, Tq, Tk]` or `[B, 1, 1, Tk]` against
/// scores `[B, H, Tq, Tk]`; other shapes take the composed path.
pub fn softmax_masked(s: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    match mask {
        None if fusable(&[s]) => Ok(s.contiguous()?.apply_op1(SoftmaxOp { map: None })?),
        Some(m) if fusable(&[s, m]) => match (s.dims(), m.dims()) {
            ([b, h, tq, tk], [mb, 1, mq, mk]) if mb == b && mk == tk && (mq == tq || *mq == 1) => {
                let map = MaskMap { heads: *h, tq: *tq, per_query: mq == tq };
                Ok(s.contiguous()?.apply_op2(&m.contiguous()?, SoftmaxOp { map: Some(map) })?)
            }
            _ => softmax_masked_composed(s, mask),
        },
        _ => softmax_masked_composed(s, mask),
    }
}

/// The composed softmax. The row max is detached: softmax is shift-invariant, so this changes
/// no value or gradient and saves backward work.
pub fn softmax_masked_composed(s: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let s = match mask {
        Some(m) => s.broadcast_add(&m.to_dtype(s.dtype())?)?,
        None => s.clone(),
    };
    let max = s.max_keepdim(D::Minus1)?.detach(); // [.., 1]
    let e = s.broadcast_sub(&max)?.exp()?; // [.., N]
    let sum = e.sum_keepdim(D::Minus1)?; // [.., 1]
    Ok(e.broadcast_div(&sum)?)
}

/// The softmax backward (host kernel on CPU f32/f64, composed otherwise).
pub fn softmax_backward(p: &Tensor, dp: &Tensor) -> Result<Tensor> {
    if fusable(&[p, dp]) {
        let n = p.dim(D::Minus1)?;
        let shape = p.shape().clone();
        return host_dispatch!(
            p.dtype(),
            Ok(Tensor::from_vec(with_host::<f32, _>(p, |ps| with_host::<f32, _>(dp, |gs| softmax_bwd(ps, gs, n)))??, shape, &Device::Cpu)?),
            Ok(Tensor::from_vec(with_host::<f64, _>(p, |ps| with_host::<f64, _>(dp, |gs| softmax_bwd(ps, gs, n)))??, shape, &Device::Cpu)?)
        );
    }
    let dot = (p * dp)?.sum_keepdim(D::Minus1)?; // [.., 1]
    Ok((p * dp.broadcast_sub(&dot)?)?)
}
