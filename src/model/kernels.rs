//! Fused CPU kernels for the transformer's element-wise work, with hand-written backward passes.
//!
//! Every function here has two implementations:
//!
//! * **fused**: one pass over contiguous host memory (f32 or f64 on the CPU), rows split across
//!   rayon threads. In an autograd graph it is a single candle custom op whose `bwd` is the
//!   hand-written backward below (each one checked against finite differences in f64 and
//!   against the composed version: `tests/kernels.rs`).
//! * **composed**: the same equation from candle ops that all have a backward (the reference;
//!   used on other devices and dtypes, e.g. CUDA or bf16, and when [`set_fused`] is off).
//!
//! | op | forward | backward |
//! |---|---|---|
//! | [`rms_norm`] | `y = w ⊙ x · r`, `r = 1/√(mean(x²) + ε)` | `dx = r (g − x̂ mean(g ⊙ x̂))`, `g = dy ⊙ w`, `x̂ = x r`; `dw = Σ dy ⊙ x̂` |
//! | [`softmax_masked`] | `p = softmax(s + mask)` over the last dim | `ds = p ⊙ (dp − Σ p ⊙ dp)` |
//! | [`rope`] | `y = x cos + rotate_half(x) sin` | the inverse rotation of `dy` |
//! | [`silu_mul`] | `h = silu(g) ⊙ u` | `dg = dh ⊙ u ⊙ σ(g)(1 + g(1 − σ(g)))`, `du = dh ⊙ silu(g)` |
//! | [`gelu_mul`] | `h = ½g(1 + t) ⊙ u`, `t = tanh(c(g + 0.044715 g³))` | `dg = dh ⊙ u ⊙ (½(1 + t) + ½g(1 − t²) c (1 + 3·0.044715 g²))`, `du = dh ⊙ gelu(g)` |
//!
//! [`graft`] attaches a value computed outside the graph to an input with a given backward
//! (used for linear layers whose weight or input needs no gradient: candle's matmul backward
//! computes both gradients, which doubles the backward cost through a frozen model).
//!
//! Why: composed, each of these is 5–10 candle ops, each a full pass over memory with an
//! allocation, and twice that in the backward (docs/benchmarks.md measures the difference).
//! Reductions use a fixed split of the rows, so results do not depend on the thread count.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Device, Layout, Shape, Storage, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

use crate::error::{Error, Result};

static FUSED: AtomicBool = AtomicBool::new(true);

/// Use the fused kernels where they apply (default: on; `HYPERDAS_FUSED=0` turns them off at
/// start-up, for comparisons). Off, every op takes its composed path.
pub fn set_fused(on: bool) {
    FUSED.store(on, Ordering::Relaxed);
}

pub fn fused_enabled() -> bool {
    static ENV: std::sync::Once = std::sync::Once::new();
    ENV.call_once(|| {
        if std::env::var("HYPERDAS_FUSED").is_ok_and(|v| v == "0") {
            FUSED.store(false, Ordering::Relaxed);
        }
    });
    FUSED.load(Ordering::Relaxed)
}

/// Whether the fused path handles tensors of this device and dtype.
fn fusable(ts: &[&Tensor]) -> bool {
    fused_enabled() && ts.iter().all(|t| t.device().is_cpu() && matches!(t.dtype(), DType::F32 | DType::F64)) && ts.windows(2).all(|w| w[0].dtype() == w[1].dtype())
}

/// Rows per parallel task: about 64 K elements, at least one row.
fn rows_per_task(cols: usize) -> usize {
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
fn dot<T: KernelFloat>(a: &[T], b: &[T]) -> T {
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
fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let all = s.as_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("fused kernel: input is not contiguous"),
    }
}

/// Run `f` on the host slice of a contiguous CPU tensor.
fn with_host<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(s) => Ok(f(slice::<T>(s, l)?)),
        _ => Err(Error::invalid("fused kernel: tensor is not on the CPU")),
    }
}

fn to_storage<T: WithDType>(v: Vec<T>) -> CpuStorage {
    T::to_cpu_storage_owned(v)
}

// ---------------------------------------------------------------------------------------------
// Host kernels (generic over f32 / f64).

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

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_K: f64 = 0.044_715;

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
}

// ---------------------------------------------------------------------------------------------
// Dispatch helpers: run a host kernel for f32 or f64 tensors.

macro_rules! host_dispatch {
    ($dtype:expr, $f32:expr, $f64:expr) => {
        match $dtype {
            DType::F32 => $f32,
            DType::F64 => $f64,
            other => return Err(Error::invalid(format!("fused kernel: unsupported dtype {other:?}"))),
        }
    };
}

fn cpu_only() -> candle_core::Error {
    candle_core::Error::Msg("fused kernel: CPU only (the composed path handles other devices)".into())
}

// ---------------------------------------------------------------------------------------------
// RMSNorm.

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

/// The dtype used inside norms and softmax: f32 for half types, else the input's own.
pub fn accum_dtype(dt: DType) -> DType {
    match dt {
        DType::F16 | DType::BF16 => DType::F32,
        other => other,
    }
}

// ---------------------------------------------------------------------------------------------
// Softmax with an additive mask.

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

// ---------------------------------------------------------------------------------------------
// RoPE.

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

/// Rotary embeddings (HF rotate-half): `x [B, H, T, hd]`, `cos`/`sin` `[B, 1, T, hd]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_dir(x, cos, sin, false)
}

/// The inverse rotation (= the backward of [`rope`] applied to a gradient).
pub fn rope_inverse(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    rope_dir(x, cos, sin, true)
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

// ---------------------------------------------------------------------------------------------
// Attention.

/// Shapes of one attention call: queries `[B, H, Tq, hd]`, keys/values `[B, Hkv, Tk, hd]`,
/// an additive mask `[B, 1, Tq|1, Tk]`.
#[derive(Debug, Clone, Copy)]
struct AttnDims {
    b: usize,
    h: usize,
    hkv: usize,
    tq: usize,
    tk: usize,
    hd: usize,
    mask_per_query: bool,
    scale: f64,
}

impl AttnDims {
    fn mask_row<'a, T>(&self, mask: &'a [T], b: usize, i: usize) -> &'a [T] {
        let r = if self.mask_per_query { b * self.tq + i } else { b };
        &mask[r * self.tk..(r + 1) * self.tk]
    }
}

/// A matrix view for [`mm`]: element `(r, c)` at `offset + r·rs + c·cs`.
#[derive(Clone, Copy)]
struct View {
    rs: usize,
    cs: usize,
}

/// `c[m×n] = a[m×k] · b[k×n]` (or `+=` with `accumulate`), `c` row-major with `n` columns,
/// through gemm's single-threaded kernels (the caller parallelises over heads).
#[allow(clippy::too_many_arguments)]
fn mm<T: KernelFloat>(c: &mut [T], a: &[T], av: View, b: &[T], bv: View, m: usize, n: usize, k: usize, accumulate: bool) {
    assert!(c.len() >= m * n, "mm: output too small");
    let last = |v: View, rows: usize, cols: usize| if rows == 0 || cols == 0 { 0 } else { (rows - 1) * v.rs + (cols - 1) * v.cs + 1 };
    assert!(a.len() >= last(av, m, k) && b.len() >= last(bv, k, n), "mm: input too small");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the bounds above cover every element gemm reads or writes; the slices do not overlap
    // (c is a distinct &mut).
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.as_ptr(),
            av.cs as isize,
            av.rs as isize,
            b.as_ptr(),
            bv.cs as isize,
            bv.rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `out [B, Tq, H·hd]` and `p [B, H, Tq, Tk]`.
///
/// One task per (batch row, kv head): the `rep` query heads sharing the kv head are one block
/// of rows `R = rep·Tq`, so the scores are one product `Q_g Kᵀ [R, Tk]` and the output one
/// product `P V [R, hd]`.
fn attn_fwd<T: KernelFloat>(q: &[T], k: &[T], v: &[T], mask: &[T], a: AttnDims) -> (Vec<T>, Vec<T>) {
    let AttnDims { b, h, hkv, tq, tk, hd, .. } = a;
    let rep = h / hkv;
    let rows = rep * tq;
    let scale = T::from_f64(a.scale);
    let mut out = vec![T::zero(); b * tq * h * hd];
    let mut p = vec![T::zero(); b * h * tq * tk];
    let row_major = |cols: usize| View { rs: cols, cs: 1 };
    let transposed = |cols: usize| View { rs: 1, cs: cols };
    let groups: Vec<Vec<T>> = p
        .par_chunks_mut(rows * tk)
        .enumerate()
        .map(|(g, pg)| {
            let bi = g / hkv;
            let qg = &q[g * rows * hd..(g + 1) * rows * hd];
            let kb = &k[g * tk * hd..(g + 1) * tk * hd];
            let vb = &v[g * tk * hd..(g + 1) * tk * hd];
            mm(pg, qg, row_major(hd), kb, transposed(hd), rows, tk, hd, false); // Q Kᵀ
            for r in 0..rows {
                let pr = &mut pg[r * tk..(r + 1) * tk];
                let mrow = a.mask_row(mask, bi, r % tq);
                let mut max = T::neg_infinity();
                for (x, &m) in pr.iter_mut().zip(mrow) {
                    *x = *x * scale + m;
                    max = Float::max(max, *x);
                }
                let mut sum = T::zero();
                for x in pr.iter_mut() {
                    *x = (*x - max).vexp();
                    sum += *x;
                }
                let inv = T::one() / sum;
                for x in pr.iter_mut() {
                    *x *= inv;
                }
            }
            let mut og = vec![T::zero(); rows * hd];
            mm(&mut og, pg, row_major(tk), vb, row_major(hd), rows, hd, tk, false); // P V
            og
        })
        .collect();
    // Group row r = (rep head r / Tq, query r % Tq) → out[b, i, head, :].
    for (g, og) in groups.iter().enumerate() {
        let (bi, kvh) = (g / hkv, g % hkv);
        for r in 0..rows {
            let (hi, i) = (kvh * rep + r / tq, r % tq);
            let dst = ((bi * tq + i) * h + hi) * hd;
            out[dst..dst + hd].copy_from_slice(&og[r * hd..(r + 1) * hd]);
        }
    }
    (out, p)
}

/// The attention backward: `dout [B, Tq, H·hd]` → `(dq [B, H, Tq, hd], dk, dv [B, Hkv, Tk, hd])`:
/// `dP = dO Vᵀ`, `dS = s·P ⊙ (dP − rowsum(P ⊙ dP))`, `dQ = dS K`, `dK = dSᵀ Q`, `dV = Pᵀ dO`.
#[allow(clippy::too_many_arguments)]
fn attn_bwd<T: KernelFloat>(q: &[T], k: &[T], v: &[T], p: &[T], _mask: &[T], dout: &[T], a: AttnDims) -> (Vec<T>, Vec<T>, Vec<T>) {
    let AttnDims { b, h, hkv, tq, tk, hd, .. } = a;
    let rep = h / hkv;
    let rows = rep * tq;
    let scale = T::from_f64(a.scale);
    let mut dq = vec![T::zero(); b * h * tq * hd];
    let mut dk = vec![T::zero(); b * hkv * tk * hd];
    let mut dv = vec![T::zero(); b * hkv * tk * hd];
    let row_major = |cols: usize| View { rs: cols, cs: 1 };
    let transposed = |cols: usize| View { rs: 1, cs: cols };
    dq.par_chunks_mut(rows * hd).zip(dk.par_chunks_mut(tk * hd).zip(dv.par_chunks_mut(tk * hd))).enumerate().for_each(|(g, (dqg, (dkg, dvg)))| {
        let (bi, kvh) = (g / hkv, g % hkv);
        let qg = &q[g * rows * hd..(g + 1) * rows * hd];
        let kb = &k[g * tk * hd..(g + 1) * tk * hd];
        let vb = &v[g * tk * hd..(g + 1) * tk * hd];
        let pg = &p[g * rows * tk..(g + 1) * rows * tk];
        let mut dog = vec![T::zero(); rows * hd];
        for r in 0..rows {
            let (hi, i) = (kvh * rep + r / tq, r % tq);
            let src = ((bi * tq + i) * h + hi) * hd;
            dog[r * hd..(r + 1) * hd].copy_from_slice(&dout[src..src + hd]);
        }
        let mut ds = vec![T::zero(); rows * tk];
        mm(&mut ds, &dog, row_major(hd), vb, transposed(hd), rows, tk, hd, false); // dP = dO Vᵀ
        for r in 0..rows {
            let (pr, dr) = (&pg[r * tk..(r + 1) * tk], &mut ds[r * tk..(r + 1) * tk]);
            let pdp = dot(pr, dr);
            for (x, &pj) in dr.iter_mut().zip(pr) {
                *x = pj * (*x - pdp) * scale;
            }
        }
        mm(dqg, &ds, row_major(tk), kb, row_major(hd), rows, hd, tk, false); // dQ = dS K
        mm(dkg, &ds, transposed(tk), qg, row_major(hd), tk, hd, rows, false); // dK = dSᵀ Q
        mm(dvg, pg, transposed(tk), &dog, row_major(hd), tk, hd, rows, false); // dV = Pᵀ dO
    });
    (dq, dk, dv)
}

fn attn_dims(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Option<AttnDims> {
    let ([b, h, tq, hd], [kb, hkv, tk, khd], [mb, 1, mq, mk]) = (q.dims(), k.dims(), mask.dims()) else { return None };
    let ok = kb == b && khd == hd && v.dims() == k.dims() && *hkv > 0 && h % hkv == 0 && mb == b && mk == tk && (mq == tq || *mq == 1);
    ok.then(|| AttnDims { b: *b, h: *h, hkv: *hkv, tq: *tq, tk: *tk, hd: *hd, mask_per_query: mq == tq, scale: 1.0 / (*hd as f64).sqrt() })
}

struct AttnOp {
    mask: Tensor,
    dims: AttnDims,
    /// The forward's probabilities, kept for the backward.
    probs: std::sync::Mutex<Option<Tensor>>,
}

impl AttnOp {
    fn run<T: KernelFloat>(&self, q: &[T], k: &[T], v: &[T]) -> candle_core::Result<Vec<T>> {
        let m = self.mask.contiguous()?;
        let (st, l) = m.storage_and_layout();
        let Storage::Cpu(ms) = &*st else { return Err(cpu_only()) };
        let (out, p) = attn_fwd(q, k, v, slice::<T>(ms, l)?, self.dims);
        let d = self.dims;
        let p = Tensor::from_vec(p, (d.b, d.h, d.tq, d.tk), &Device::Cpu)?;
        if let Ok(mut slot) = self.probs.lock() {
            *slot = Some(p);
        }
        Ok(out)
    }
}

impl CustomOp3 for AttnOp {
    fn name(&self) -> &'static str {
        "hyperdas-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.dims;
        let st = match s1.dtype() {
            DType::F32 => to_storage(self.run::<f32>(slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?)?),
            DType::F64 => to_storage(self.run::<f64>(slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?)?),
            _ => return Err(cpu_only()),
        };
        Ok((st, Shape::from((d.b, d.tq, d.h * d.hd))))
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, _out: &Tensor, dout: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let probs = self.probs.lock().ok().and_then(|p| p.clone());
        let (dq, dk, dv) = attention_backward(q, k, v, probs.as_ref(), &self.mask, dout).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Scaled dot-product attention with GQA: `q [B, H, Tq, hd]` (RoPE applied), `k`, `v`
/// `[B, Hkv, Tk, hd]`, additive `mask [B, 1, Tq|1, Tk]` (no gradient) → `[B, Tq, H·hd]`.
/// Fused on the CPU (keys masked with −∞ are skipped, not summed as zeros, so the result does
/// not depend on a row's padding); composed from candle ops otherwise.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    if fusable(&[q, k, v, mask])
        && let Some(dims) = attn_dims(q, k, v, mask)
    {
        let op = AttnOp { mask: mask.detach(), dims, probs: std::sync::Mutex::new(None) };
        return Ok(q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)?);
    }
    attention_composed(q, k, v, mask)
}

/// [`attention`] from candle ops (GQA by stacking the query heads that share a kv head).
pub fn attention_composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let (b, h, tq, hd) = q.dims4()?;
    let (_, hkv, tk, _) = k.dims4()?;
    let rep = h / hkv;
    let q = (q * (1.0 / (hd as f64).sqrt()))?.reshape((b, hkv, rep * tq, hd))?; // [B, Hkv, rep·Tq, hd]
    let scores = q.matmul(&k.t()?)?.reshape((b, h, tq, tk))?; // [B, H, Tq, Tk]
    let scores = scores.to_dtype(accum_dtype(scores.dtype()))?; // [B, H, Tq, Tk]
    let probs = softmax_masked(&scores, Some(&mask.to_dtype(scores.dtype())?))?.to_dtype(v.dtype())?; // [B, H, Tq, Tk]
    let out = probs.reshape((b, hkv, rep * tq, tk))?.matmul(v)?; // [B, Hkv, rep·Tq, hd]
    Ok(out.reshape((b, h, tq, hd))?.transpose(1, 2)?.reshape((b, tq, h * hd))?) // [B, Tq, H·hd]
}

/// Attention forward outside any graph, keeping the probabilities for
/// [`attention_backward`]: `(out [B, Tq, H·hd], p [B, H, Tq, Tk])`. CPU f32/f64 only.
pub fn attention_forward_saved(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
    let Some(d) = attn_dims(q, k, v, mask).filter(|_| fusable(&[q, k, v, mask])) else { return Ok(None) };
    let (out_shape, p_shape) = ((d.b, d.tq, d.h * d.hd), (d.b, d.h, d.tq, d.tk));
    macro_rules! run {
        ($t:ty) => {{
            let (o, p) = with_host::<$t, _>(q, |qs| with_host::<$t, _>(k, |ks| with_host::<$t, _>(v, |vs| with_host::<$t, _>(mask, |ms| attn_fwd(qs, ks, vs, ms, d)))))????;
            (Tensor::from_vec(o, out_shape, &Device::Cpu)?, Tensor::from_vec(p, p_shape, &Device::Cpu)?)
        }};
    }
    Ok(Some(host_dispatch!(q.dtype(), run!(f32), run!(f64))))
}

/// Whether [`attention_forward_saved`] (and the fused backward) handles these tensors.
pub fn attention_forward_saved_applies(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> bool {
    fusable(&[q, k, v, mask]) && attn_dims(q, k, v, mask).is_some()
}

/// The backward of [`attention`]: `(dq, dk, dv)` from `dout [B, Tq, H·hd]`, with the forward's
/// probabilities `p` if saved (else recomputed). CPU f32/f64 only.
pub fn attention_backward(q: &Tensor, k: &Tensor, v: &Tensor, p: Option<&Tensor>, mask: &Tensor, dout: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let d = attn_dims(q, k, v, mask).ok_or_else(|| Error::invalid("attention backward: shapes do not fit"))?;
    let p = match p {
        Some(p) => p.clone(),
        None => attention_forward_saved(q, k, v, mask)?.ok_or_else(|| Error::invalid("attention backward: CPU f32/f64 only"))?.1,
    };
    macro_rules! run {
        ($t:ty) => {{
            let (a, b, c) = with_host::<$t, _>(q, |qs| {
                with_host::<$t, _>(k, |ks| with_host::<$t, _>(v, |vs| with_host::<$t, _>(&p, |ps| with_host::<$t, _>(mask, |ms| with_host::<$t, _>(dout, |gs| attn_bwd(qs, ks, vs, ps, ms, gs, d))))))
            })??????;
            (Tensor::from_vec(a, q.shape().clone(), &Device::Cpu)?, Tensor::from_vec(b, k.shape().clone(), &Device::Cpu)?, Tensor::from_vec(c, v.shape().clone(), &Device::Cpu)?)
        }};
    }
    Ok(host_dispatch!(q.dtype(), run!(f32), run!(f64)))
}

// ---------------------------------------------------------------------------------------------
// Cross-attention over constant states, with the key/value projections inside.

/// The forward's tensors, kept for the backward.
struct CrossAttnOp {
    /// The constant states, flattened: `[B·Tk, D]`.
    e: Tensor,
    /// RoPE'd keys and values `[B, Hkv, Tk, hd]`, the probabilities `[B, H, Tq, Tk]`, the output `[B, Tq, H·hd]`.
    k: Tensor,
    v: Tensor,
    p: Tensor,
    out: Tensor,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
}

impl CustomOp3 for CrossAttnOp {
    fn name(&self) -> &'static str {
        "hyperdas-cross-attention"
    }

    fn cpu_fwd(&self, _s1: &CpuStorage, _l1: &Layout, _s2: &CpuStorage, _l2: &Layout, _s3: &CpuStorage, _l3: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        host_copy(&self.out)
    }

    fn bwd(&self, q: &Tensor, wk: &Tensor, _wv: &Tensor, _out: &Tensor, dout: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let run = || -> Result<(Tensor, Tensor, Tensor)> {
            let (dq, dk, dv) = attention_backward(&q.detach(), &self.k, &self.v, Some(&self.p), &self.mask, dout)?; // dq [B, H, Tq, hd], dk/dv [B, Hkv, Tk, hd]
            let dk = rope_inverse(&dk, &self.cos, &self.sin)?; // [B, Hkv, Tk, hd]: the gradient of e Wkᵀ
            let (b, hkv, tk, hd) = dk.dims4()?;
            let c = hkv * hd;
            // [dK | dV] token-major, columns in the order of the rows of [Wk; Wv].
            let dkv = Tensor::cat(&[&dk, &dv], 1)?.transpose(1, 2)?.contiguous()?.reshape((b * tk, 2 * c))?; // [B·Tk, 2·Hkv·hd]
            let dw = dkv.t()?.matmul(&self.e)?; // [2·Hkv·hd, D]
            Ok((dq, dw.narrow(0, 0, c)?, dw.narrow(0, c, c)?))
        };
        let (dq, dwk, dwv) = run().map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        debug_assert_eq!(dwk.dims(), wk.dims());
        Ok((Some(dq), Some(dwk), Some(dwv)))
    }
}

/// Cross-attention of queries `q [B, H, Tq, hd]` (RoPE applied) over constant states
/// `e [B, Tk, D]` with trainable projections `wk`, `wv` `[Hkv·hd, D]`:
///
/// ```text
/// K = rope(heads(e Wkᵀ)),  V = heads(e Wvᵀ)               [B, Hkv, Tk, hd]
/// out = attention(q, K, V; mask)                           [B, Tq, H·hd]
/// dWk = (rope⁻¹ dK)ᵀ e,  dWv = dVᵀ e   (one product [dK | dV]ᵀ e)
/// ```
///
/// One graph node with inputs `(q, wk, wv)`: its backward returns `dq`, `dWk`, `dWv` and
/// nothing for `e`. Why: as separate nodes, `K` and `V` (`Tk` = tokens × (L+1) in the
/// hypernetwork: 11 MB each on SmolLM2 at batch 16) each cost candle's backward a zeroed
/// gradient buffer and an add, plus the RoPE and layout copies of their own nodes; and the two
/// projections share one product (`e` packed once) forward and backward. Returns `None` where
/// the fused kernels do not apply (other devices or dtypes; the caller takes the composed path).
pub fn cross_attention(q: &Tensor, wk: &Tensor, wv: &Tensor, e: &Tensor, k_rope: (&Tensor, &Tensor), mask: &Tensor, hkv: usize) -> Result<Option<Tensor>> {
    if !fusable(&[q, wk, wv, e, k_rope.0, k_rope.1, mask]) || hkv == 0 {
        return Ok(None);
    }
    let (b, tk, d) = e.dims3()?;
    let (_, _, _, hd) = q.dims4()?;
    let c = hkv * hd;
    if wk.dims() != [c, d] || wv.dims() != [c, d] {
        return Err(Error::invalid(format!("cross-attention: key/value weights {:?} / {:?}, expected [{c}, {d}]", wk.dims(), wv.dims())));
    }
    let e = e.detach().reshape((b * tk, d))?; // [B·Tk, D]
    let w = Tensor::cat(&[&wk.detach(), &wv.detach()], 0)?; // [2·Hkv·hd, D]
    let kv = e.matmul(&w.t()?)?.reshape((b, tk, 2 * hkv, hd))?.transpose(1, 2)?.contiguous()?; // [B, 2·Hkv, Tk, hd]
    let (cos, sin) = (k_rope.0.detach(), k_rope.1.detach());
    let k = rope(&kv.narrow(1, 0, hkv)?, &cos, &sin)?; // [B, Hkv, Tk, hd]
    let v = kv.narrow(1, hkv, hkv)?.contiguous()?; // [B, Hkv, Tk, hd]
    let mask = mask.detach();
    let Some((out, p)) = attention_forward_saved(&q.detach(), &k, &v, &mask)? else { return Ok(None) };
    let op = CrossAttnOp { e, k, v, p, out, cos, sin, mask };
    Ok(Some(q.contiguous()?.apply_op3(&wk.contiguous()?, &wv.contiguous()?, op)?))
}

// ---------------------------------------------------------------------------------------------
// SiLU-gated product (SwiGLU's middle).

impl Gate {
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

/// The backward of the fused [`gelu_mul`]: `(dg, du)`. CPU f32/f64 only (elsewhere the
/// composed forward is differentiated by autograd).
pub fn gelu_mul_backward(g: &Tensor, u: &Tensor, dh: &Tensor) -> Result<(Tensor, Tensor)> {
    if !fusable(&[g, u, dh]) {
        return Err(Error::invalid("gelu_mul backward: CPU f32/f64 only"));
    }
    Gate::Gelu.backward(g, u, dh)
}

// ---------------------------------------------------------------------------------------------
// Grafting a value computed outside the graph.

/// A fresh host copy of a value computed outside the graph: the storage of an op that returns it.
fn host_copy(value: &Tensor) -> candle_core::Result<(CpuStorage, Shape)> {
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
