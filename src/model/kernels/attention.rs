//! Scaled dot-product attention with GQA: queries `q [B, H, Tq, hd]` (RoPE applied), keys and
//! values `k`, `v` `[B, Hkv, Tk, hd]` (`rep = H/Hkv` query heads per kv head), an additive mask
//! `[B, 1, Tq|1, Tk]` (constant, no gradient), scale `s = 1/√hd`:
//!
//! ```text
//! forward:  S = s·Q Kᵀ + mask,  P = softmax(S),  O = P V                  → out [B, Tq, H·hd]
//! backward: dP = dO Vᵀ,  dS = s·P ⊙ (dP − rowsum(P ⊙ dP)),
//!           dQ = dS K,  dK = dSᵀ Q,  dV = Pᵀ dO
//! ```
//!
//! The host loops run the products through gemm's single-threaded kernels ([`mm`]), one task per
//! (batch row, kv head).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use super::host::{KernelFloat, accum_dtype, cpu_only, dot, fusable, host_dispatch, slice, to_storage, with_host};
use super::softmax::softmax_masked;
use crate::error::{Error, Result};

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

fn attn_dims(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Option<AttnDims> {
    let ([b, h, tq, hd], [kb, hkv, tk, khd], [mb, 1, mq, mk]) = (q.dims(), k.dims(), mask.dims()) else { return None };
    let ok = kb == b && khd == hd && v.dims() == k.dims() && *hkv > 0 && h % hkv == 0 && mb == b && mk == tk && (mq == tq || *mq == 1);
    ok.then(|| AttnDims { b: *b, h: *h, hkv: *hkv, tq: *tq, tk: *tk, hd: *hd, mask_per_query: mq == tq, scale: 1.0 / (*hd as f64).sqrt() })
}

// ---------------------------------------------------------------------------------------------
// Micro-GEMM.

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

// ---------------------------------------------------------------------------------------------
// Host loops (generic over f32 / f64).

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

// ---------------------------------------------------------------------------------------------
// The graph node (keeps the forward's probabilities for its backward).

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

// ---------------------------------------------------------------------------------------------
// Public entry points.

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
    composed(q, k, v, mask, None)
}

/// [`attention`] with Gemma 2's soft-capped scores, from candle ops (autograd):
/// `s = q·k / √hd`, `s ← cap · tanh(s / cap)`, then the mask, softmax and `· v`. Same shapes as
/// [`attention`].
pub fn attention_capped(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, cap: f64) -> Result<Tensor> {
    composed(q, k, v, mask, Some(cap))
}

/// The composed attention, with the scores soft-capped at `cap` when given.
fn composed(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, cap: Option<f64>) -> Result<Tensor> {
    let (b, h, tq, hd) = q.dims4()?;
    let (_, hkv, tk, _) = k.dims4()?;
    let rep = h / hkv;
    let q = (q * (1.0 / (hd as f64).sqrt()))?.reshape((b, hkv, rep * tq, hd))?; // [B, Hkv, rep·Tq, hd]
    let scores = q.matmul(&k.t()?)?.reshape((b, h, tq, tk))?; // [B, H, Tq, Tk]
    let mut scores = scores.to_dtype(accum_dtype(scores.dtype()))?; // [B, H, Tq, Tk]
    if let Some(cap) = cap {
        scores = ((scores / cap)?.tanh()? * cap)?; // [B, H, Tq, Tk], in (−cap, cap)
    }
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
