//! Unit rows along the last dimension, for constants (no graph node, no backward):
//!
//! ```text
//! forward:  y = x / (‖x‖ + 1e-12)
//! backward: none (a tracked `x` takes the composed path and autograd differentiates it)
//! ```

use candle_core::{D, Device, Tensor};
use rayon::prelude::*;

use super::host::{KernelFloat, dot, fusable, host_dispatch, rows_per_task, with_host};
use crate::error::Result;

/// `x / (‖x‖ + 1e-12)` along the last dimension, for constants (no gradient): one pass on the
/// CPU for f32/f64, composed otherwise (and whenever `x` takes part in a graph).
pub fn unit_rows(x: &Tensor) -> Result<Tensor> {
    if x.track_op() || !fusable(&[x]) {
        return Ok(x.broadcast_div(&(x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()? + 1e-12)?)?);
    }
    let d = x.dim(D::Minus1)?;
    let shape = x.shape().clone();
    fn run<T: KernelFloat>(x: &[T], d: usize) -> Vec<T> {
        let mut y = vec![T::zero(); x.len()];
        let rows = rows_per_task(d);
        y.par_chunks_mut(rows * d).zip(x.par_chunks(rows * d)).for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_mut(d).zip(xc.chunks(d)) {
                let n = dot(xr, xr).sqrt() + T::from_f64(1e-12);
                for (o, &v) in yr.iter_mut().zip(xr) {
                    *o = v / n;
                }
            }
        });
        y
    }
    host_dispatch!(x.dtype(), Ok(Tensor::from_vec(with_host::<f32, _>(x, |v| run(v, d))?, shape, &Device::Cpu)?), Ok(Tensor::from_vec(with_host::<f64, _>(x, |v| run(v, d))?, shape, &Device::Cpu)?))
}
