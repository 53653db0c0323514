//! Grafting a value computed outside the graph onto an input, with a given backward:
//!
//! ```text
//! forward:  y = value               (computed without a graph; a node of `input`)
//! backward: d input = backward(dy)
//! ```
//!
//! Used for linear layers whose weight or input needs no gradient ([`matmul_t`]: `y = x Wᵀ`,
//! backward `dx = dy W` or `dW = dyᵀ x`, only the one needed): candle's matmul backward computes
//! both gradients, which doubles the backward cost through a frozen model.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, Layout, Shape, Storage, Tensor};

use super::fused_enabled;
use super::host::host_copy;
use crate::error::Result;

// ---------------------------------------------------------------------------------------------
// The graph node.

type Backward = Box<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

struct GraftOp {
    value: Tensor,
    backward: Backward,
}

impl CustomOp1 for GraftOp {
    fn name(&self) -> &'static str {
        "hyperdas-graft"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        host_copy(&self.value)
    }

    fn cuda_fwd(&self, _s: &CudaStorage, _l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        // A fresh compact copy, so the whole storage is exactly the value.
        let v = self.value.force_contiguous()?;
        let (st, l) = v.storage_and_layout();
        let Storage::Cuda(s) = &*st else { candle_core::bail!("graft: value is not on the CUDA device") };
        Ok((s.try_clone(l)?, v.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        (self.backward)(grad).map(Some).map_err(|e| candle_core::Error::Msg(e.to_string()))
    }
}

// ---------------------------------------------------------------------------------------------
// Public entry points.

/// `value` (computed without a graph) as a function of `input` whose gradient is
/// `backward(d value)`. The result takes part in autograd like any op of `input`; `value`'s
/// own graph, if any, is ignored.
pub fn graft(input: &Tensor, value: Tensor, backward: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static) -> Result<Tensor> {
    Ok(input.apply_op1(GraftOp { value: value.detach(), backward: Box::new(backward) })?)
}

/// `x Wᵀ` for `x [N, in]`, `w [out, in]`, computing only the gradients that are needed: when
/// `w` is frozen, only `dx = dy W`; when `x` is a constant (e.g. the frozen target's hidden
/// states), only `dW = dyᵀ x`. Candle's matmul backward computes both.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (xt, wt) = (x.track_op(), w.track_op());
    if !fused_enabled() || xt == wt {
        return Ok(x.matmul(&w.t()?)?);
    }
    let y = x.detach().matmul(&w.detach().t()?)?; // [N, out]
    if xt {
        let w = w.detach();
        graft(x, y, move |dy| Ok(dy.matmul(&w)?)) // dx [N, in]
    } else {
        let x = x.detach();
        graft(w, y, move |dy| Ok(dy.t()?.matmul(&x)?)) // dW [out, in]
    }
}
