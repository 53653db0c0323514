//! Orthonormal bases: seeded initialisation and the retraction that keeps them orthonormal
//! under AdamW.
//!
//! Parametrisation: `R [D, k]` is an ordinary trainable tensor; after every optimizer step it
//! is replaced by the nearest matrix with orthonormal columns, its polar factor
//! `R (RᵀR)^(-1/2)`. The polar factor is computed by Newton–Schulz iterations
//! `X ← X (3I − XᵀX)/2` (only k × k Gram matrices and `[D, k] × [k, k]` products, in f64),
//! which converge quadratically from the near-orthonormal matrix an optimizer step leaves.
//! This avoids both traps of the reference (`torch.empty` initialisation; a Householder
//! parametrisation whose sign truncation collapses R to 0 under weight decay).

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::rng::Rng;

/// A `[d, k]` matrix with orthonormal columns: the Q of the QR of a Gaussian matrix drawn from
/// `seed` (modified Gram–Schmidt in f64, columns signed so that R's diagonal is positive).
pub fn random_orthonormal(d: usize, k: usize, seed: u64, dtype: DType, device: &Device) -> Result<Tensor> {
    if k == 0 || k > d {
        return Err(Error::invalid(format!("an orthonormal [{d}, {k}] basis needs 1 ≤ k ≤ d")));
    }
    let mut rng = Rng::derive(seed, "orthonormal");
    // Columns of a d × k Gaussian.
    let mut cols: Vec<Vec<f64>> = (0..k).map(|_| (0..d).map(|_| rng.normal()).collect()).collect();
    for j in 0..k {
        // Two passes of modified Gram–Schmidt for full precision.
        for _ in 0..2 {
            for i in 0..j {
                let dot: f64 = cols[j].iter().zip(&cols[i]).map(|(a, b)| a * b).sum();
                let ci = cols[i].clone();
                for (a, b) in cols[j].iter_mut().zip(&ci) {
                    *a -= dot * b;
                }
            }
        }
        let norm = cols[j].iter().map(|a| a * a).sum::<f64>().sqrt();
        if norm < 1e-12 {
            return Err(Error::invalid("random_orthonormal: degenerate draw (retry with another seed)"));
        }
        for a in cols[j].iter_mut() {
            *a /= norm;
        }
    }
    let mut data = vec![0f64; d * k];
    for (j, c) in cols.iter().enumerate() {
        for (i, v) in c.iter().enumerate() {
            data[i * k + j] = *v;
        }
    }
    Ok(Tensor::from_vec(data, (d, k), device)?.to_dtype(dtype)?)
}

/// `max |RᵀR − I|` of `r [D, k]`.
pub fn orthonormality_error(r: &Tensor) -> Result<f64> {
    let r = r.to_dtype(DType::F64)?;
    let k = r.dim(1)?;
    let gram = r.t()?.matmul(&r)?; // [k, k]
    let eye = Tensor::eye(k, DType::F64, r.device())?;
    Ok((gram - eye)?.abs()?.max_all()?.to_scalar::<f64>()?)
}

/// The polar factor of `r [D, k]` by Newton–Schulz, to `tol` (max |XᵀX − I|).
pub fn polar(r: &Tensor, tol: f64) -> Result<Tensor> {
    let dtype = r.dtype();
    let mut x = r.detach().to_dtype(DType::F64)?;
    let k = x.dim(1)?;
    let eye = Tensor::eye(k, DType::F64, x.device())?;
    // Scale so all singular values are below √3 (the method's convergence region).
    let fro = x.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    if !(fro.is_finite() && fro > 0.0) {
        return Err(Error::invalid("cannot orthonormalise a zero or non-finite basis"));
    }
    if fro > 1.5 * (k as f64).sqrt() {
        x = x.affine((k as f64).sqrt() / fro, 0.0)?;
    }
    for _ in 0..60 {
        let gram = x.t()?.matmul(&x)?; // [k, k]
        let err = (&gram - &eye)?.abs()?.max_all()?.to_scalar::<f64>()?;
        if err < tol {
            break;
        }
        x = x.matmul(&((eye.affine(3.0, 0.0)? - gram)?.affine(0.5, 0.0)?))?; // [D, k]
    }
    Ok(x.to_dtype(dtype)?)
}

/// Replace a basis variable by its polar factor (call after every optimizer step).
pub fn retract(var: &Var) -> Result<()> {
    let q = polar(var.as_tensor(), 1e-7)?;
    var.set(&q)?;
    Ok(())
}
