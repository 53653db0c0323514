//! The pointer head (docs/method.md §2.2): for every base position j, a distribution over
//! the source positions and "self", `W [B, T_s+1, T_b]`.
//!
//! Pair features `P[i,j] = q_combine([h_b[j]; h_s[i]])` (unit-normalised layer-l states), a
//! "self" row `P[T_s, j] = h_b[j]`, keys `k_proj(P)` with RoPE at `cumsum(M_p)·M_p` along the
//! row-major flattened pairs, one query from the last instruction state, scores averaged over
//! heads, the pair mask `m_b[j]·m_s[i]` (self row always visible), softmax over the T_s+1 rows.
//! Three options beside the reference: a learned scalar `β` added to the self row's logits
//! (`self_bias`: training starts from "keep the base"), no RoPE at all (`rope = false`), and a
//! fixed factor `s` on the scores (`scale`: `s = √D` reads RMS-normalised states instead of
//! unit-normalised ones; the untrained scores are then O(1) instead of O(1e-2), and their
//! gradients `s` times larger).
//!
//! Factorised: `q_combine = [A | C]` and `k_proj` are linear, so
//! `k_proj(P[i,j]) = k_proj(A h_b[j]) + k_proj(C h_s[i])`: two `[T, D]` projections and a
//! broadcast sum instead of a `[T_s·T_b, 2D] × [2D, D]` matmul. Equal to the naive pair
//! construction (tested). The reference's unused v_proj/o_proj are not created.

use candle_core::{DType, Tensor};

use super::Registrar;
use super::attention::MASKED;
use crate::error::Result;
use crate::model::llama::{Linear, softmax_last_dim};
use crate::model::rope::{Rope, apply_rotary};

pub struct PointerHead {
    pub q_proj: Linear,
    pub k_proj: Linear,
    /// The base half `A` of `q_combine [D, 2D]`.
    pub combine_base: Linear,
    /// The source half `C`.
    pub combine_source: Linear,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// `[1]`: the learned logit added to the self row (absent: none, the reference).
    pub self_bias: Option<Tensor>,
    /// Rotate keys and query by their positions (the reference).
    pub rope: bool,
    /// Factor on the scores (1: the reference).
    pub scale: f64,
}

impl PointerHead {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(r: &mut Registrar, d: usize, h: usize, hkv: usize, hd: usize, self_bias: f64, rope: bool, scale: f64) -> Result<Self> {
        Ok(PointerHead {
            q_proj: Linear::new(r.normal("hypernet.pointer.q_proj.weight", h * hd, d, 0.02)?, None),
            k_proj: Linear::new(r.normal("hypernet.pointer.k_proj.weight", hkv * hd, d, 0.02)?, None),
            combine_base: Linear::new(r.normal("hypernet.pointer.q_combine_base.weight", d, d, 0.02)?, None),
            combine_source: Linear::new(r.normal("hypernet.pointer.q_combine_source.weight", d, d, 0.02)?, None),
            n_heads: h,
            n_kv_heads: hkv,
            head_dim: hd,
            self_bias: if self_bias != 0.0 { Some(r.constant("hypernet.pointer.self_bias", 1, self_bias)?) } else { None },
            rope,
            scale,
        })
    }

    /// `z [B, D]` with RoPE position `z_pos[b]`, `hb [B, T_b, D]`, `hs [B, T_s, D]`, masks
    /// `[B, T_b]` / `[B, T_s]` (0/1) → `W [B, T_s+1, T_b]`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(&self, z: &Tensor, z_pos: &[u32], hb: &Tensor, mb: &Tensor, hs: &Tensor, ms: &Tensor, rope: &Rope) -> Result<Tensor> {
        let (b, tb, _) = hb.dims3()?;
        let ts = hs.dim(1)?;
        let (h, hkv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let rep = h / hkv;
        let rows = ts + 1;
        let n = rows * tb;
        let dev = hb.device();
        // Keys before RoPE, factorised.
        let kb = self.k_proj.forward(&self.combine_base.forward(hb)?)?; // [B, T_b, Hkv·hd]
        let ks = self.k_proj.forward(&self.combine_source.forward(hs)?)?; // [B, T_s, Hkv·hd]
        let pairs = kb.unsqueeze(1)?.broadcast_add(&ks.unsqueeze(2)?)?; // [B, T_s, T_b, Hkv·hd]
        let selfk = self.k_proj.forward(hb)?.unsqueeze(1)?; // [B, 1, T_b, Hkv·hd]
        let keys = Tensor::cat(&[&pairs, &selfk], 1)?; // [B, T_s+1, T_b, Hkv·hd]
        let keys = keys.reshape((b, n, hkv, hd))?.transpose(1, 2)?.contiguous()?; // [B, Hkv, N, hd]
        // Pair mask and RoPE positions cumsum(M)·M over the row-major flattened pairs.
        let mbv = mb.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let msv = ms.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let mut pmask = Vec::with_capacity(b * n);
        let mut pos = Vec::with_capacity(b * n);
        for (base_row, source_row) in mbv.iter().zip(&msv) {
            let mut acc = 0u32;
            // Source rows, then the always-visible self row.
            let row_masks = source_row.iter().map(|&s| s.min(1)).chain(std::iter::once(1u32));
            for (i, s) in row_masks.enumerate() {
                for &bm in base_row {
                    let m = if i == ts { 1 } else { bm.min(1) * s };
                    acc += m;
                    pmask.push(m);
                    pos.push(acc * m);
                }
            }
        }
        let q = self.q_proj.forward(&z.unsqueeze(1)?)?.reshape((b, 1, h, hd))?.transpose(1, 2)?.contiguous()?; // [B, H, 1, hd]
        let (keys, q) = if self.rope {
            let (kc, ksn) = rope.cos_sin(&pos, b, n, DType::F32, dev)?; // [B, 1, N, hd]
            let (qc, qsn) = rope.cos_sin(z_pos, b, 1, DType::F32, dev)?; // [B, 1, 1, hd]
            (apply_rotary(&keys, &kc, &ksn)?, apply_rotary(&q, &qc, &qsn)?) // [B, Hkv, N, hd], [B, H, 1, hd]
        } else {
            (keys, q)
        };
        let q = (q * (self.scale / (hd as f64).sqrt()))?.reshape((b, hkv, rep, hd))?; // [B, Hkv, rep, hd]
        let scores = q.matmul(&keys.t()?)?.reshape((b, h, n))?; // [B, H, N]
        let mask: Vec<f32> = pmask.iter().map(|&m| if m == 1 { 0.0 } else { MASKED as f32 }).collect();
        let mask = Tensor::from_vec(mask, (b, 1, n), dev)?; // [B, 1, N]
        let logits = scores.broadcast_add(&mask)?.mean(1)?; // [B, N] (head average)
        let logits = match &self.self_bias {
            // + β on the self row: [0, …, 0, β] over the T_s+1 rows, each repeated T_b times.
            Some(beta) => {
                let onehot = Tensor::from_vec((0..rows).flat_map(|i| std::iter::repeat_n(f32::from(i == ts), tb)).collect::<Vec<f32>>(), (1, n), dev)?; // [1, N]
                logits.broadcast_add(&onehot.broadcast_mul(beta)?)? // [B, N]
            }
            None => logits,
        };
        let logits = logits.reshape((b, rows, tb))?.transpose(1, 2)?.contiguous()?; // [B, T_b, T_s+1]
        Ok(softmax_last_dim(&logits)?.transpose(1, 2)?.contiguous()?) // [B, T_s+1, T_b]
    }
}
