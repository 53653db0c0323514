//! Rotary position embeddings, HF "rotate-half" layout.
//!
//! For head size d and position p, frequency i ∈ [0, d/2) rotates the pair (x_i, x_{i+d/2}) by
//! the angle p·ω_i, with ω_i = θ^(−2i/d) (then rescaled, see [`RopeScaling`]):
//!
//! ```text
//! rope(x) = x ⊙ cos(p·ω) + rotate_half(x) ⊙ sin(p·ω),   rotate_half([x1, x2]) = [−x2, x1]
//! ```
//!
//! Frequencies are computed in f32 exactly as transformers does (`_compute_default_rope_parameters`,
//! `_compute_llama3_parameters`), so positions agree bit for bit with the reference. Positions
//! are per row (`[B, T]`), which is what left-padded batches need.

use candle_core::{DType, Device, Tensor};

use super::config::{RopeConfig, RopeScaling};
use crate::error::Result;

/// Inverse frequencies ω_i for one head size.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    /// `longrope`: the frequencies for sequences past `.1` positions, and the cos / sin scale.
    long: Option<(Vec<f32>, usize)>,
    scale: f32,
    /// Frequencies `rotary..` are padding of a partial rotary embedding: cos 1, sin 0 exactly.
    rotary: usize,
}

impl Rope {
    pub fn new(cfg: &RopeConfig, head_dim: usize) -> Self {
        let base = cfg.theta as f32;
        let d = head_dim as f32;
        let inv_freq: Vec<f32> = (0..head_dim / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / d)).collect();
        let (mut long, mut scale) = (None, 1.0f32);
        let inv_freq = match &cfg.scaling {
            RopeScaling::None => inv_freq,
            RopeScaling::LongRope { short, long: long_f, original_max_position_embeddings, attention_factor } => {
                // transformers: 1 / (factor · θ^(2i/d)), in f32.
                let exps: Vec<f32> = (0..head_dim / 2).map(|i| base.powf((2 * i) as f32 / d)).collect();
                long = Some((exps.iter().zip(long_f).map(|(e, f)| 1.0 / (f * e)).collect(), *original_max_position_embeddings));
                scale = *attention_factor as f32;
                exps.iter().zip(short).map(|(e, f)| 1.0 / (f * e)).collect()
            }
            RopeScaling::Linear { factor } => inv_freq.iter().map(|w| w / *factor as f32).collect(),
            RopeScaling::Factors(f) => inv_freq.iter().zip(f).map(|(w, f)| w / f).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let (factor, lo, hi, old) = (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32, *original_max_position_embeddings as f32);
                let (lo_wavelen, hi_wavelen) = (old / lo, old / hi);
                inv_freq
                    .iter()
                    .map(|&w| {
                        let wavelen = 2.0 * std::f32::consts::PI / w;
                        let scaled = if wavelen > lo_wavelen { w / factor } else { w };
                        let medium = wavelen >= hi_wavelen && wavelen <= lo_wavelen; // never NaN: w > 0
                        if medium {
                            let smooth = (old / wavelen - lo) / (hi - lo);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        };
        let rotary = inv_freq.len();
        Rope { inv_freq, long, scale, rotary }
    }

    /// RoPE over `rotary_dims` of each head's `head_dim` dimensions (`partial_rotary_factor`;
    /// 0: none, GPT-2), in the layout of full rotary embeddings: the frequencies of a
    /// `rotary_dims` head (ω_i = θ^(−2i/rotary_dims)) first, then `(head_dim − rotary_dims) / 2`
    /// frequencies of 0, whose pairs the tables leave exactly as they are (cos 1, sin 0). The
    /// q/k rows must be permuted to this layout at load ([`partial_rotary_rows`]).
    pub fn partial(cfg: &RopeConfig, head_dim: usize, rotary_dims: usize) -> Self {
        if rotary_dims == head_dim {
            return Self::new(cfg, head_dim);
        }
        let mut r = if rotary_dims == 0 { Rope { inv_freq: Vec::new(), long: None, scale: 1.0, rotary: 0 } } else { Self::new(cfg, rotary_dims) };
        r.inv_freq.resize(head_dim / 2, 0.0);
        if let Some((long, _)) = &mut r.long {
            long.resize(head_dim / 2, 0.0);
        }
        r
    }

    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// cos and sin tables for per-row positions `[B, T]` (row-major), each `[B, 1, T, head_dim]`.
    pub fn cos_sin(&self, positions: &[u32], b: usize, t: usize, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
        // longrope: the long frequencies once a position reaches the original context (as
        // transformers decides per forward pass, from the largest position).
        let inv_freq = match &self.long {
            Some((long, original)) if positions.iter().any(|&p| p as usize + 1 > *original) => long,
            _ => &self.inv_freq,
        };
        let (scale, rotary) = (self.scale, self.rotary);
        let half = inv_freq.len();
        // Rows repeat the same positions (every row of a batch, every flattened hypernetwork
        // state), so each distinct position's `half` angles are computed once, and copied into
        // both halves of each of its rows: the same values as computing every entry.
        let mut rows: std::collections::HashMap<u32, (Vec<f32>, Vec<f32>)> = std::collections::HashMap::new();
        let mut cos = Vec::with_capacity(b * t * 2 * half);
        let mut sin = Vec::with_capacity(b * t * 2 * half);
        for &p in positions {
            let (c, s) = rows.entry(p).or_insert_with(|| {
                inv_freq
                    .iter()
                    .enumerate()
                    .map(|(i, &w)| {
                        let angle = p as f32 * w;
                        if i >= rotary {
                            (1.0, 0.0) // not rotated (partial rotary embeddings)
                        } else if scale == 1.0 {
                            (angle.cos(), angle.sin())
                        } else {
                            (angle.cos() * scale, angle.sin() * scale)
                        }
                    })
                    .unzip()
            });
            for _half in 0..2 {
                cos.extend_from_slice(c);
                sin.extend_from_slice(s);
            }
        }
        let shape = (b, 1, t, 2 * half);
        let cos = Tensor::from_vec(cos, shape, device)?.to_dtype(dtype)?; // [B, 1, T, hd]
        let sin = Tensor::from_vec(sin, shape, device)?.to_dtype(dtype)?; // [B, 1, T, hd]
        Ok((cos, sin))
    }
}

/// Where each dimension of a head comes from when RoPE covers only its first `rotary_dims`
/// (transformers: `rotate_half` within `x[..r]`, `x[r..]` untouched) and is computed in the layout
/// of [`Rope::partial`]: entry `n` of the result is the original dimension to put at `n`. The
/// rotary pairs `(j, j + r/2)` move to `(j, j + hd/2)`, the untouched dimensions fill the rest in
/// order. Applied to the rows of q and k alike, it leaves every score `q · k` unchanged.
pub fn partial_rotary_rows(head_dim: usize, rotary_dims: usize) -> Vec<usize> {
    let (half, r2) = (head_dim / 2, rotary_dims / 2);
    let pass = head_dim - rotary_dims; // untouched dimensions, `pass / 2` in each half
    (0..head_dim)
        .map(|n| {
            if n < r2 {
                n
            } else if n < half {
                rotary_dims + (n - r2)
            } else if n < half + r2 {
                r2 + (n - half)
            } else {
                rotary_dims + pass / 2 + (n - half - r2)
            }
        })
        .collect()
}

/// Apply rotary embeddings: `x [B, H, T, hd]`, `cos`/`sin` `[B, 1, T, hd]` → `[B, H, T, hd]`.
/// [`kernels::rope`](super::kernels::rope): fused with its backward on the CPU, composed from
/// differentiable ops elsewhere (candle's own fused `rope` has no backward).
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    super::kernels::rope(x, cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_matches_hand_computation() {
        // head_dim 16, θ = 10 000, factor 8, low 1, high 4, original context 16: one frequency
        // of each kind (high: kept, medium: smoothed, low: divided by 8).
        let cfg = RopeConfig { theta: 10_000.0, scaling: RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position_embeddings: 16.0 } };
        let plain = Rope::new(&RopeConfig { theta: 10_000.0, scaling: RopeScaling::None }, 16);
        let scaled = Rope::new(&cfg, 16);
        for (i, (&w, &s)) in plain.inv_freq().iter().zip(scaled.inv_freq()).enumerate() {
            let wavelen = 2.0 * std::f32::consts::PI / w;
            let expect = if wavelen < 4.0 {
                w
            } else if wavelen > 16.0 {
                w / 8.0
            } else {
                let smooth = (16.0 / wavelen - 1.0) / 3.0;
                (1.0 - smooth) * w / 8.0 + smooth * w
            };
            assert!((s - expect).abs() <= 1e-7 * expect.abs(), "freq {i}: {s} vs {expect}");
        }
        // llama.cpp's rope_freqs divisors give the same frequencies.
        let factors: Vec<f32> = plain.inv_freq().iter().zip(scaled.inv_freq()).map(|(w, s)| w / s).collect();
        let from_factors = Rope::new(&RopeConfig { theta: 10_000.0, scaling: RopeScaling::Factors(factors) }, 16);
        for (a, b) in from_factors.inv_freq().iter().zip(scaled.inv_freq()) {
            assert!((a - b).abs() <= 1e-6 * b.abs());
        }
    }

    #[test]
    fn tables_equal_the_per_entry_formula_with_repeated_positions() -> Result<()> {
        let rope = Rope::new(&RopeConfig { theta: 10_000.0, scaling: RopeScaling::None }, 8);
        let positions = [3u32, 0, 3, 7, 7, 1]; // [2, 3], positions repeat within and across rows
        let (cos, sin) = rope.cos_sin(&positions, 2, 3, DType::F32, &Device::Cpu)?;
        let (cos, sin) = (cos.flatten_all()?.to_vec1::<f32>()?, sin.flatten_all()?.to_vec1::<f32>()?);
        for (i, &p) in positions.iter().enumerate() {
            for j in 0..8 {
                let angle = p as f32 * rope.inv_freq()[j % 4];
                assert_eq!(cos[i * 8 + j].to_bits(), angle.cos().to_bits(), "cos at row {i}, dim {j}");
                assert_eq!(sin[i * 8 + j].to_bits(), angle.sin().to_bits(), "sin at row {i}, dim {j}");
            }
        }
        Ok(())
    }

    #[test]
    fn partial_rotary_in_the_full_layout_equals_rotating_the_first_dims() -> Result<()> {
        // transformers: rotate_half within x[..r] with frequencies of an r-dimensional head, x[r..]
        // untouched. Ours: permute the head's dimensions, rotate with padded tables, permute back.
        let dev = Device::Cpu;
        let (hd, r) = (12usize, 4usize);
        let cfg = RopeConfig { theta: 100.0, scaling: RopeScaling::None };
        let perm = partial_rotary_rows(hd, r);
        let mut sorted = perm.clone();
        sorted.sort();
        assert_eq!(sorted, (0..hd).collect::<Vec<_>>(), "a permutation");
        let x = Tensor::randn(0f32, 1.0, (1, 1, 3, hd), &dev)?;
        let positions = [0u32, 3, 7];
        // Reference on the original layout.
        let small = Rope::new(&cfg, r);
        let (c, s) = small.cos_sin(&positions, 1, 3, DType::F32, &dev)?;
        let rot = apply_rotary(&x.narrow(3, 0, r)?.contiguous()?, &c, &s)?;
        let expect = Tensor::cat(&[&rot, &x.narrow(3, r, hd - r)?], 3)?.flatten_all()?.to_vec1::<f32>()?;
        // Ours.
        let idx = Tensor::from_vec(perm.iter().map(|&i| i as u32).collect::<Vec<_>>(), hd, &dev)?;
        let xp = x.index_select(&idx, 3)?.contiguous()?; // [1, 1, 3, hd] in the full layout
        let (c, s) = Rope::partial(&cfg, hd, r).cos_sin(&positions, 1, 3, DType::F32, &dev)?;
        let yp = apply_rotary(&xp, &c, &s)?.flatten_all()?.to_vec1::<f32>()?;
        for t in 0..3 {
            for (n, &orig) in perm.iter().enumerate() {
                let (a, b) = (yp[t * hd + n], expect[t * hd + orig]);
                assert!((a - b).abs() < 1e-6, "position {t}, dim {orig}: {a} vs {b}");
            }
        }
        // No rotary dimensions (GPT-2): the identity, exactly.
        let (c, s) = Rope::partial(&cfg, hd, 0).cos_sin(&positions, 1, 3, DType::F32, &dev)?;
        let y0 = apply_rotary(&x, &c, &s)?;
        assert_eq!(y0.flatten_all()?.to_vec1::<f32>()?, x.flatten_all()?.to_vec1::<f32>()?);
        Ok(())
    }

    #[test]
    fn rotation_preserves_pair_norms() -> Result<()> {
        let dev = Device::Cpu;
        let rope = Rope::new(&RopeConfig { theta: 100.0, scaling: RopeScaling::None }, 8);
        let x = Tensor::randn(0f32, 1.0, (1, 2, 3, 8), &dev)?;
        let (cos, sin) = rope.cos_sin(&[0, 5, 9], 1, 3, DType::F32, &dev)?;
        let y = apply_rotary(&x, &cos, &sin)?;
        let pair_norm = |t: &Tensor| -> Result<Tensor> {
            let a = t.narrow(3, 0, 4)?.sqr()?;
            let b = t.narrow(3, 4, 4)?.sqr()?;
            Ok((a + b)?)
        };
        let diff = (pair_norm(&x)? - pair_norm(&y)?)?.abs()?.max_keepdim(3)?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5);
        // Position 0 is the identity.
        let d0 = (x.narrow(2, 0, 1)? - y.narrow(2, 0, 1)?)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(d0 < 1e-7);
        Ok(())
    }
}
