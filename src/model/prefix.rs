//! Shared-prefix inference: prompts that begin with the same tokens (a template's text before
//! the entity, say) run those tokens once, and their continuations run as one batch against the
//! prefix's keys and values.
//!
//! ```text
//! (K_l, V_l) = keys and values of the prefix p [1, P] at block l          [1, Hkv, P, hd]
//! x [B, R]   = continuations, right-padded, at positions P .. P+R−1
//! block l    : keys [K_l ; k_l(x)], values [V_l ; v_l(x)]                 [B, Hkv, P+R, hd]
//! ```
//!
//! Exact: attention is causal, so the prefix's keys and values do not depend on what follows
//! it, and a continuation's outputs equal those of `p ++ x` run alone (tests compare the two).
//! Right padding leaves every real token at the position it has in the full prompt; a pad
//! query sees only itself. Sliding-window layers (Gemma 3) keep their window over the full
//! positions. Meant for inference: no gradient is expected to flow through the cache.

use candle_core::{DType, Device, Tensor};

use super::batch::TokenBatch;
use super::kernels::accum_dtype;
use super::llama::Llama;
use super::rope::Rope;
use crate::error::{Error, Result};

/// Every block's keys and values of one prefix.
#[derive(Debug, Clone)]
pub struct PrefixCache {
    /// The prefix length P.
    pub len: usize,
    /// Per block `(k, v)`, `[1, Hkv, P, hd]` each; empty when P = 0.
    kv: Vec<(Tensor, Tensor)>,
}

/// Mask and rotary tables of one attention kind (global, or Gemma 3's sliding layers).
struct Tables {
    /// `[B, 1, R, P+R]` additive (0 or −∞).
    mask: Tensor,
    /// `[B, 1, R, hd]`.
    cos: Tensor,
    sin: Tensor,
}

impl Tables {
    /// Rows of `lens[i]` real tokens (right-padded to `r`) after a prefix of `p` tokens.
    fn new(lens: &[usize], p: usize, r: usize, window: Option<usize>, rope: &Rope, dtype: DType, device: &Device) -> Result<Self> {
        let b = lens.len();
        let window = window.unwrap_or(usize::MAX);
        let width = p + r;
        let mut bias = vec![f32::NEG_INFINITY; b * r * width];
        for (row, &len) in lens.iter().enumerate() {
            for q in 0..r {
                let line = &mut bias[(row * r + q) * width..(row * r + q + 1) * width];
                if q >= len {
                    line[p + q] = 0.0; // a pad query sees only itself
                    continue;
                }
                let qpos = p + q;
                for (k, slot) in line.iter_mut().enumerate().take(qpos + 1) {
                    if qpos - k < window {
                        *slot = 0.0;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(bias, (b, 1, r, width), device)?.to_dtype(accum_dtype(dtype))?; // [B, 1, R, P+R]
        let positions: Vec<u32> = (0..b).flat_map(|_| (p..p + r).map(|x| x as u32)).collect();
        let (cos, sin) = rope.cos_sin(&positions, b, r, dtype, device)?; // [B, 1, R, hd] each
        Ok(Tables { mask, cos, sin })
    }

    fn get(&self) -> (&Tensor, &Tensor, &Tensor) {
        (&self.mask, &self.cos, &self.sin)
    }
}

impl Llama {
    /// Run `prefix` (token ids, the start token included) once, keeping every block's keys and values.
    pub fn prefix_cache(&self, prefix: &[u32]) -> Result<PrefixCache> {
        if prefix.is_empty() {
            return Ok(PrefixCache { len: 0, kv: Vec::new() });
        }
        let (_, kv) = self.run_after(None, &[prefix.to_vec()])?;
        Ok(PrefixCache { len: prefix.len(), kv })
    }

    /// Final-norm outputs `[B, R, D]` of `rows` (each non-empty, right-padded to the longest R)
    /// run after `prefix`: row `i`, position `j` equals position `P + j` of `prefix ++ rows[i]`
    /// run alone. Read only the first `rows[i].len()` positions of each row.
    pub fn forward_after_prefix(&self, prefix: &PrefixCache, rows: &[Vec<u32>]) -> Result<Tensor> {
        let (x, _) = self.run_after(Some(prefix), rows)?;
        self.final_norm(&x) // [B, R, D]
    }

    /// Blocks over right-padded `rows` after an optional prefix: the last residual `[B, R, D]`
    /// and each block's keys and values of `rows`.
    fn run_after(&self, prefix: Option<&PrefixCache>, rows: &[Vec<u32>]) -> Result<(Tensor, Vec<(Tensor, Tensor)>)> {
        if rows.is_empty() {
            return Err(Error::invalid("no continuation to run"));
        }
        if let Some(i) = rows.iter().position(Vec::is_empty) {
            return Err(Error::invalid(format!("continuation {i} has no tokens")));
        }
        let p = prefix.map_or(0, |c| c.len);
        if let Some(c) = prefix
            && c.len > 0
            && c.kv.len() != self.num_layers()
        {
            return Err(Error::invalid(format!("the prefix cache holds {} blocks, the model has {}", c.kv.len(), self.num_layers())));
        }
        let (b, r) = (rows.len(), rows.iter().map(Vec::len).max().unwrap_or(0));
        let lens: Vec<usize> = rows.iter().map(Vec::len).collect();
        let mut ids = Vec::with_capacity(b * r);
        let mut mask = Vec::with_capacity(b * r);
        for row in rows {
            ids.extend_from_slice(row);
            ids.extend(std::iter::repeat_n(0u32, r - row.len()));
            mask.extend(std::iter::repeat_n(1u8, row.len()));
            mask.extend(std::iter::repeat_n(0u8, r - row.len()));
        }
        let batch = TokenBatch::from_host(ids, mask, b, r, self.device())?; // [B, R]
        let global = Tables::new(&lens, p, r, None, self.rope(), self.dtype(), self.device())?;
        let local = match self.local_attention() {
            Some((rope, window)) => Some(Tables::new(&lens, p, r, Some(window), rope, self.dtype(), self.device())?),
            None => None,
        };
        let mut x = self.embed_batch_after(&batch, p)?; // [B, R, D]
        let mut kv = Vec::with_capacity(self.num_layers());
        for (l, block) in self.layers.iter().enumerate() {
            let tables = match (&local, block.sliding) {
                (Some(t), true) => t.get(),
                _ => global.get(),
            };
            let past = prefix.filter(|c| c.len > 0).map(|c| (&c.kv[l].0, &c.kv[l].1));
            let (y, new) = block.forward_with_past(&x, tables, past)?; // [B, R, D]
            x = y;
            kv.push(new);
        }
        Ok((x, kv))
    }
}
