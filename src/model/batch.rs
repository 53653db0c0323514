//! Left-padded token batches and the per-batch tensors every block needs.
//!
//! Position ids follow HF's convention for padded batches: `cumsum(mask) - 1` over real tokens
//! (so each row's first real token is at position 0 whatever its padding), 0 on pads.
//! The attention mask lets query `q` see key `k` when `k ≤ q` and `k` is a real token; a pad
//! query sees only itself, so its (meaningless) output stays finite and never reaches a real
//! token. Outputs at pad positions are not comparable across implementations; ignore them.

use candle_core::{DType, Device, Tensor};

use super::rope::Rope;
use crate::error::{Error, Result};

/// Token ids and padding mask of a batch, on the model's device, plus the host copies the
/// runtime needs to build masks and positions.
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// `[B, T]` u32.
    pub input_ids: Tensor,
    /// `[B, T]` u32, 1 for real tokens and 0 for padding.
    pub attention_mask: Tensor,
    ids_host: Vec<u32>,
    mask_host: Vec<u8>,
    max_id: u32,
    b: usize,
    t: usize,
}

impl TokenBatch {
    /// Left-pad rows of token ids to the longest row with `pad_id`.
    pub fn left_padded(rows: &[Vec<u32>], pad_id: u32, device: &Device) -> Result<Self> {
        if rows.is_empty() {
            return Err(Error::invalid("empty batch"));
        }
        if let Some(i) = rows.iter().position(|r| r.is_empty()) {
            return Err(Error::invalid(format!("row {i} of the batch has no tokens")));
        }
        let t = rows.iter().map(Vec::len).max().unwrap_or(0);
        let b = rows.len();
        let mut ids = Vec::with_capacity(b * t);
        let mut mask = Vec::with_capacity(b * t);
        for r in rows {
            let pad = t - r.len();
            ids.extend(std::iter::repeat_n(pad_id, pad));
            ids.extend_from_slice(r);
            mask.extend(std::iter::repeat_n(0u8, pad));
            mask.extend(std::iter::repeat_n(1u8, r.len()));
        }
        Self::from_host(ids, mask, b, t, device)
    }

    /// From row-major host buffers; any padding side works (positions follow the mask).
    pub fn from_host(ids: Vec<u32>, mask: Vec<u8>, b: usize, t: usize, device: &Device) -> Result<Self> {
        if ids.len() != b * t || mask.len() != b * t {
            return Err(Error::invalid(format!("batch buffers hold {} ids and {} mask entries for shape [{b}, {t}]", ids.len(), mask.len())));
        }
        if let Some(i) = mask.iter().position(|&m| m > 1) {
            return Err(Error::invalid(format!("attention mask entry {i} is {}, expected 0 or 1", mask[i])));
        }
        let max_id = ids.iter().copied().max().unwrap_or(0);
        let input_ids = Tensor::from_slice(&ids, (b, t), device)?; // [B, T]
        let m32: Vec<u32> = mask.iter().map(|&m| m as u32).collect();
        let attention_mask = Tensor::from_vec(m32, (b, t), device)?; // [B, T]
        Ok(TokenBatch { input_ids, attention_mask, ids_host: ids, mask_host: mask, max_id, b, t })
    }

    /// From `[B, T]` integer tensors (e.g. a fixture).
    pub fn from_tensors(input_ids: &Tensor, attention_mask: &Tensor, device: &Device) -> Result<Self> {
        let (b, t) = input_ids.dims2()?;
        if attention_mask.dims2()? != (b, t) {
            return Err(Error::invalid(format!("attention mask shape {:?} differs from ids shape [{b}, {t}]", attention_mask.dims())));
        }
        let ids: Vec<u32> = input_ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
        let mask: Vec<u8> = attention_mask.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?.into_iter().map(|m| m.min(2) as u8).collect();
        Self::from_host(ids, mask, b, t, device)
    }

    /// `(B, T)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.b, self.t)
    }

    /// Row-major token ids on the host.
    pub fn ids(&self) -> &[u32] {
        &self.ids_host
    }

    /// Row-major padding mask on the host.
    pub fn mask(&self) -> &[u8] {
        &self.mask_host
    }

    /// The largest token id in the batch (pads included).
    pub fn max_id(&self) -> u32 {
        self.max_id
    }

    /// Number of real tokens.
    pub fn num_tokens(&self) -> usize {
        self.mask_host.iter().filter(|&&m| m == 1).count()
    }

    /// Position ids `cumsum(mask) - 1` (0 on pads), row-major `[B, T]`.
    pub fn position_ids(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.b * self.t);
        for row in self.mask_host.chunks(self.t) {
            let mut seen = 0u32;
            for &m in row {
                if m == 1 {
                    out.push(seen);
                    seen += 1;
                } else {
                    out.push(0);
                }
            }
        }
        out
    }
}

/// Tensors shared by all blocks for one batch.
#[derive(Debug, Clone)]
pub struct ForwardContext {
    /// `[B, 1, T, T]` additive mask (0 or −∞), in the attention-score dtype.
    pub mask: Tensor,
    /// `[B, 1, T, head_dim]` rotary tables in the model dtype.
    pub cos: Tensor,
    pub sin: Tensor,
    /// The batch shape `(B, T)` this context was built for.
    pub dims: (usize, usize),
    /// Sliding-window layers (Gemma 3): their own mask and RoPE tables.
    pub local: Option<LocalAttention>,
}

/// What a sliding-window layer uses instead of the global mask and RoPE tables.
#[derive(Debug, Clone)]
pub struct LocalAttention {
    /// `[B, 1, T, T]`: as the global mask, and also −∞ where `q − k ≥ window`.
    pub mask: Tensor,
    /// `[B, 1, T, head_dim]` rotary tables of the local RoPE base.
    pub cos: Tensor,
    pub sin: Tensor,
}

impl ForwardContext {
    pub fn new(batch: &TokenBatch, rope: &Rope, dtype: DType, score_dtype: DType, device: &Device) -> Result<Self> {
        let (b, t) = batch.dims();
        let mask = causal_mask(batch, None, score_dtype, device)?; // [B, 1, T, T]
        let (cos, sin) = rope.cos_sin(&batch.position_ids(), b, t, dtype, device)?;
        Ok(ForwardContext { mask, cos, sin, dims: (b, t), local: None })
    }

    /// Add the sliding-window mask (`window` positions, as transformers' `kv_idx > q_idx − window`
    /// on padded indices, which equals the distance in positions for left-padded rows) and the
    /// local RoPE tables.
    pub fn with_local(mut self, batch: &TokenBatch, window: usize, rope: &Rope, dtype: DType, score_dtype: DType, device: &Device) -> Result<Self> {
        let (b, t) = batch.dims();
        let mask = causal_mask(batch, Some(window), score_dtype, device)?; // [B, 1, T, T]
        let (cos, sin) = rope.cos_sin(&batch.position_ids(), b, t, dtype, device)?;
        self.local = Some(LocalAttention { mask, cos, sin });
        Ok(self)
    }

    /// `(mask, cos, sin)` for a layer: the local set for a sliding layer when there is one.
    pub fn tables(&self, sliding: bool) -> (&Tensor, &Tensor, &Tensor) {
        match (&self.local, sliding) {
            (Some(l), true) => (&l.mask, &l.cos, &l.sin),
            _ => (&self.mask, &self.cos, &self.sin),
        }
    }

    /// Check that a residual `[B, T, D]` belongs to this batch.
    pub fn check(&self, resid: &Tensor, d: usize) -> Result<()> {
        let (b, t) = self.dims;
        if resid.dims() != [b, t, d] {
            return Err(Error::invalid(format!(
                "residual has shape {:?}, but this forward context is for a batch of [{b}, {t}] and the model has D = {d}: \
                 build the context from the same (padded) batch the residual came from",
                resid.dims()
            )));
        }
        Ok(())
    }
}

/// Additive causal padding mask `[B, 1, T, T]` (0 or −∞): query `q` sees key `k` when `k ≤ q`,
/// `k` is a real token and (with a window) `q − k < window`; every query sees itself.
fn causal_mask(batch: &TokenBatch, window: Option<usize>, score_dtype: DType, device: &Device) -> Result<Tensor> {
    let (b, t) = batch.dims();
    let m = batch.mask();
    let window = window.unwrap_or(usize::MAX);
    let mut bias = vec![0f32; b * t * t];
    for row in 0..b {
        for q in 0..t {
            for k in 0..t {
                let visible = (k <= q && q - k < window && m[row * t + k] == 1) || k == q;
                if !visible {
                    bias[(row * t + q) * t + k] = f32::NEG_INFINITY;
                }
            }
        }
    }
    Ok(Tensor::from_vec(bias, (b, 1, t, t), device)?.to_dtype(score_dtype)?) // [B, 1, T, T]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn left_padding_and_positions() {
        let b = TokenBatch::left_padded(&[vec![5, 6, 7], vec![9]], 0, &Device::Cpu).unwrap();
        assert_eq!(b.dims(), (2, 3));
        assert_eq!(b.input_ids.to_vec2::<u32>().unwrap(), vec![vec![5, 6, 7], vec![0, 0, 9]]);
        assert_eq!(b.mask(), &[1, 1, 1, 0, 0, 1]);
        assert_eq!(b.position_ids(), vec![0, 1, 2, 0, 0, 0]);
        assert_eq!(b.num_tokens(), 4);
        assert!(TokenBatch::left_padded(&[vec![1], vec![]], 0, &Device::Cpu).is_err());
        assert!(TokenBatch::left_padded(&[], 0, &Device::Cpu).is_err());
    }

    #[test]
    fn sliding_window_mask_keeps_the_last_window_positions() {
        let b = TokenBatch::left_padded(&[vec![1, 2, 3, 4, 5], vec![7, 8, 9]], 0, &Device::Cpu).unwrap();
        let full = causal_mask(&b, Some(2), DType::F32, &Device::Cpu).unwrap().squeeze(1).unwrap().to_vec3::<f32>().unwrap();
        let seen = |row: usize, q: usize| -> Vec<usize> { (0..5).filter(|&k| full[row][q][k] == 0.0).collect() };
        assert_eq!(seen(0, 4), vec![3, 4]);
        assert_eq!(seen(0, 0), vec![0]);
        // Row 1 is padded by two: its real tokens are at 2, 3, 4.
        assert_eq!(seen(1, 4), vec![3, 4]);
        assert_eq!(seen(1, 2), vec![2]);
        assert_eq!(seen(1, 1), vec![1], "a pad query sees only itself");
    }
}
