//! Shared host machinery of the fused kernels: the float types they run on ([`KernelFloat`],
//! with a vectorisable `exp`), the f64-accumulated dot product `Σ aᵢbᵢ`, access to the
//! contiguous host memory of CPU storages and tensors, the row split of the parallel loops, and
//! the checks that decide between the fused and the composed path. No equation of its own.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, Layout, Shape, Storage, Tensor, WithDType};
use num_traits::Float;

use super::fused_enabled;
use crate::error::{Error, Result};

/// Whether the fused path handles tensors of this device and dtype.
pub(super) fn fusable(ts: &[&Tensor]) -> bool {
    fused_enabled() && ts.iter().all(|t| t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)) && ts.windows(2).all(|w| w[0].dtype() == w[1].dtype())
}

/// Rows per parallel task: about 64 K elements, at least one row.
pub(super) fn rows_per_task(cols: usize) -> usize {
    (65_536 / cols.max(1)).max(1)
}

/// The float types the host kernels run on, with a vectorisable `exp`.
pub trait KernelFloat: WithDType + Float {
    fn vexp(self) -> Self;
}

impl KernelFloat for f32 {
    /// e^x by range reduction and a degree-6 polynomial (Cephes `expf`), branch-free so loops
    /// vectorise; relative error ≤ 2·10⁻⁷ (checked against the system `exp` in the tests),
    /// exactly 0 below −87.3 (so −∞ gives 0, as masks need).
    #[inline(always)]
    fn vexp(self) -> f32 {
        const LOG2E: f32 = std::f32::consts::LOG2_E;
        const C1: f32 = 0.693_359_4;
        const C2: f32 = -2.121_944_4e-4;
        // Round to nearest by adding 1.5·2²³: the integer lands in the low mantissa bits.
        const MAGIC: f32 = 12_582_912.0;
        let x = self.clamp(-87.336_54, 88.722_83);
        let t = x * LOG2E + MAGIC;
        let n = t - MAGIC;
        let ni = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
        let r = x - n * C1 - n * C2;
        let r2 = r * r;
        let p = (((((1.987_569_2e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r + 0.166_666_65) * r + 0.5) * r2 + r + 1.0;
        let scale = f32::from_bits((ni.wrapping_add(127) << 23) as u32);
        if self < -87.336_54 { 0.0 } else { p * scale }
    }
}

impl KernelFloat for f64 {
    #[inline(always)]
    fn vexp(self) -> f64 {
        self.exp()
    }
}

/// Σ aᵢbᵢ with 8 partial sums in f64 (vectorisable; the summation order depends only on the
/// length). f64 accumulation keeps the reductions (row norms, softmax-backward dots) at the
/// accuracy of the composed path: the 8-lane f32 sum lost ~2× on the parity gradients.
#[inline(always)]
pub(super) fn dot<T: KernelFloat>(a: &[T], b: &[T]) -> T {
    let mut acc = [0f64; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += WithDType::to_f64(x[l]) * WithDType::to_f64(y[l]);
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += WithDType::to_f64(*x) * WithDType::to_f64(*y);
    }
    T::from_f64(s)
}

// ---------------------------------------------------------------------------------------------
// Host access.

/// The contiguous element range of a CPU storage as a slice of `T`.
pub(super) fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let all = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("fused kernel: input is not contiguous"),
    }
}

/// Run `f` on the host slice of a contiguous CPU tensor.
pub(super) fn with_host<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(s) => Ok(f(slice::<T>(s, l)?)),
        _ => Err(Error::invalid("fused kernel: tensor is not on the CPU")),
    }
}

pub(super) fn to_storage<T: WithDType>(v: Vec<T>) -> CpuStorage {
    T::to_cpu_storage_owned(v)
}

/// A fresh host copy of a value computed outside the graph: the storage of an op that returns it
/// (`GraftOp` and `CrossAttnOp`).
pub(super) fn host_copy(value: &Tensor) -> candle_core::Result<(CpuStorage, Shape)> {
    let v = value.contiguous()?;
    let (st, l) = v.storage_and_layout();
    let Storage::Cpu(s) = &*st else { return Err(cpu_only()) };
    let out = match s.dtype() {
        DType::F32 => to_storage(slice::<f32>(s, l)?.to_vec()),
        DType::F64 => to_storage(slice::<f64>(s, l)?.to_vec()),
        DType::BF16 => to_storage(slice::<half::bf16>(s, l)?.to_vec()),
        DType::F16 => to_storage(slice::<half::f16>(s, l)?.to_vec()),
        other => candle_core::bail!("fused kernel: unsupported dtype {other:?}"),
    };
    Ok((out, v.shape().clone()))
}

// ---------------------------------------------------------------------------------------------
// Dispatch helpers: run a host kernel for f32 or f64 tensors.

macro_rules! host_dispatch {
    ($dtype:expr, $f32:expr, $f64:expr) => {
        match $dtype {
            ::candle_core::DType::F32 => $f32,
            ::candle_core::DType::F64 => $f64,
            other => return Err($crate::error::Error::invalid(format!("fused kernel: unsupported dtype {other:?}"))),
        }
    };
}
pub(super) use host_dispatch;

pub(super) fn cpu_only() -> candle_core::Error {
    candle_core::Error::Msg("fused kernel: CPU only (the composed path handles other devices)".into())
}

/// The dtype used inside norms and softmax: f32 for half types, else the input's own.
pub fn accum_dtype(dt: DType) -> DType {
    match dt {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}
