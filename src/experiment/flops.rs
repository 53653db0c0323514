//! Analytic matmul FLOP counts of a HyperDAS training step, to put a measured step time
//! against the machine's matmul speed. Only matrix products are counted (2 FLOPs per
//! multiply-add); element-wise work (norms, softmax, RoPE, AdamW) is not, so the counts are a
//! slight underestimate of the work done.
//!
//! The work the efficient step needs (docs/method.md §1.2 without the reference's redundant
//! passes):
//!
//! * **clean**: one forward pass of base and of source through all L blocks (no backward);
//! * **intervened**: blocks `l..L` from the edited residual plus lm_head at the label
//!   positions, forward and backward to the residual only (the target is frozen: no weight
//!   gradients), so 2× the forward;
//! * **hypernet**: the hypernetwork, pointer head, mixing and subspace module, forward and
//!   backward (weight and input gradients: 3× the forward), except the cross-attention key
//!   and value projections of the target's constant hidden states, which need only weight
//!   gradients (2×).

use crate::model::LlamaConfig;

/// Padded batch shapes of one step.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct StepShapes {
    pub batch: usize,
    /// Base, source and instruction lengths (padded).
    pub base_len: usize,
    pub source_len: usize,
    pub instruction_len: usize,
    /// Label positions scored per row.
    pub labels: usize,
}

impl StepShapes {
    /// The shapes of a collated batch, scoring at most `label_limit` label tokens a row.
    pub fn of(batch: &crate::data::collate::CollatedBatch, label_limit: usize) -> Self {
        StepShapes { batch: batch.len(), base_len: batch.base_len, source_len: batch.source_len, instruction_len: batch.instruction_len, labels: batch.max_label_tokens().min(label_limit) }
    }
}

/// FLOPs per part of the step.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct FlopCount {
    pub clean: f64,
    pub intervened: f64,
    pub hypernet: f64,
}

impl FlopCount {
    pub fn total(&self) -> f64 {
        self.clean + self.intervened + self.hypernet
    }
}

/// Forward FLOPs of one target block over `b` rows of `t` tokens.
pub fn block_forward(c: &LlamaConfig, b: usize, t: usize) -> f64 {
    let (d, hd, h, hkv, f) = (c.hidden_size as f64, c.head_dim as f64, c.num_attention_heads as f64, c.num_key_value_heads as f64, c.intermediate_size as f64);
    let n = (b * t) as f64;
    let proj = 2.0 * n * d * (h * hd + 2.0 * hkv * hd) + 2.0 * n * h * hd * d;
    let attn = 2.0 * 2.0 * b as f64 * h * (t * t) as f64 * hd;
    let matrices = if c.gpt.is_some() { 2.0 } else { 3.0 }; // GPT-2 / GPT-NeoX: no gate
    let mlp = 2.0 * n * matrices * d * f;
    proj + attn + mlp
}

/// The step's FLOPs for a target `c`, intervention layer `layer`, `blocks` hypernetwork blocks,
/// subspace rank `rank`, and `conditioned_out` the output width of the subspace module's
/// conditioning MLP (0: none; `n·D` for ReflectSelect with `n` reflections, `k` for MaskSelect).
pub fn hyperdas_step(c: &LlamaConfig, layer: usize, blocks: usize, rank: usize, conditioned_out: usize, s: &StepShapes) -> FlopCount {
    let l_total = c.num_hidden_layers;
    let (d, hd, h, hkv, f, v) = (c.hidden_size as f64, c.head_dim as f64, c.num_attention_heads as f64, c.num_key_value_heads as f64, c.intermediate_size as f64, c.vocab_size as f64);
    let b = s.batch as f64;
    let clean = l_total as f64 * (block_forward(c, s.batch, s.base_len) + block_forward(c, s.batch, s.source_len));
    let upper = (l_total - layer.min(l_total)) as f64 * block_forward(c, s.batch, s.base_len);
    let lm_head = 2.0 * b * s.labels as f64 * d * v;
    let intervened = 2.0 * (upper + lm_head);

    let (te, tb, ts) = (s.instruction_len as f64, s.base_len as f64, s.source_len as f64);
    let ne = b * te;
    let states = (l_total + 1) as f64;
    let self_attn = 2.0 * ne * d * (h * hd + 2.0 * hkv * hd) + 2.0 * ne * h * hd * d + 4.0 * b * h * te * te * hd;
    let kv = |n: f64| 2.0 * b * n * d * 2.0 * hkv * hd;
    let cross = |n: f64| 2.0 * ne * d * h * hd + kv(n) + 2.0 * ne * h * hd * d + 4.0 * b * h * te * n * hd;
    let mlp = 6.0 * ne * d * f;
    let per_block = self_attn + cross(tb * states) + cross(ts * states) + mlp;
    let pointer = 2.0 * b * (tb + ts) * d * d + 2.0 * b * (2.0 * tb + ts) * d * hkv * hd + 2.0 * b * d * h * hd + 2.0 * b * h * (ts + 1.0) * tb * hd;
    let conditioning = if conditioned_out > 0 { 4.0 * b * d * f + 2.0 * b * f * conditioned_out as f64 } else { 0.0 };
    let subspace = conditioning + 4.0 * b * tb * d * rank as f64;
    let mixing = 2.0 * b * tb * ts * d;
    let forward = blocks as f64 * per_block + pointer + subspace + mixing;
    let kv_total = blocks as f64 * (kv(tb * states) + kv(ts * states));
    let hypernet = 3.0 * forward - kv_total;
    FlopCount { clean, intervened, hypernet }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smollm2_step_is_a_third_of_a_teraflop() {
        // SmolLM2-135M: the performance notes estimate ≈ 0.36 TFLOP per efficient step at
        // batch 16 × ~29 tokens, layer 15, 2 blocks; clean passes ≈ 2 × 98 GFLOP.
        let json = serde_json::json!({
            "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "vocab_size": 49152, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": true
        });
        let c = LlamaConfig::from_hf_json(&json, std::path::Path::new("config.json")).unwrap();
        let s = StepShapes { batch: 16, base_len: 29, source_len: 29, instruction_len: 10, labels: 3 };
        let f = hyperdas_step(&c, 15, 2, 32, c.hidden_size, &s);
        assert!((f.clean / 2e9 - 98.0).abs() < 10.0, "clean {:.1} GFLOP", f.clean / 1e9);
        assert!(f.total() > 0.30e12 && f.total() < 0.42e12, "total {:.3} TFLOP", f.total() / 1e12);
    }
}
