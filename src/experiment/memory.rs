//! The memory a HyperDAS training step needs, from the configuration alone (no weights are
//! read): what `hyperdas bench train --dry-run` prints, e.g. for `synthetic:llama3-8b` before
//! renting a GPU for it.
//!
//! The step's peak is during the hypernetwork's backward pass, when everything below is live
//! at once (B batch, T_b / T_s / T_e base, source and instruction lengths, L blocks, layer l,
//! N hypernetwork blocks, D hidden, F MLP width, V vocabulary, H / H_kv heads of width h_d,
//! K label positions; `s` the target dtype's size, trainable state always f32):
//!
//! | part | bytes |
//! |---|---|
//! | target weights | `params · s`; with bf16 clean passes ([`CleanMatmul`](crate::model::CleanMatmul)) plus the bf16 packing of every block's linear weights, `L · W · 2`, minus the f32 weights of blocks `0..l`, `l · W · s` (`W` = a block's linear weights, [`block_linear_weights`]) |
//! | trainable state | `P · 4 · 3` (value, AdamW's two moments; `P` from [`trainable_parameters`]) |
//! | clean states | `B (T_b + T_s)(L+1) D · s` (every hidden state of base and source) |
//! | hypernetwork activations | `N · B (T_b + T_s)(L+1) · (c_kv · 2 H_kv h_d + c_norm · D) · 4` |
//! | pointer activations | `B (T_s+1) T_b · (c_pair · H_kv h_d + c_rope · h_d) · 4` |
//! | intervened pass | `(L − l) · B T_b · (c_d · D + c_f · F) · s + c_logits · B K V · 4` |
//! | backward peak | the larger of the pointer head's activation gradients, `B (T_s+1) T_b · (c_pair_grad · H_kv h_d + c_rope_grad · h_d) · 4`, and the parameters' gradients with the scratch `[V, D]` the embedding's gradient is built in, `(P + V D) · 4` (the first are freed before the last exist) |
//! | runtime | a fixed allowance for the process (code, threads, tokenizer, rows), plus 3 % allocator slack |
//!
//! The `c_*` are the number of tensors of that shape alive at the peak, read off the step as
//! implemented and read off the per-phase peak heap `hyperdas bench train` prints (the pointer
//! head's pair keys `[B, H_kv, (T_s+1)·T_b, h_d]` and their RoPE'd copies dominate for long
//! prompts, the hypernetwork's embedding copy for large vocabularies), then checked against the
//! measured peak RSS: within 6 % on 13 targets (docs/benchmarks.md), within 15 % in
//! tests/memory.rs. Frozen copies (`interpreter.freeze`) are not counted as trainable. A GPU adds its caching allocator's slack and
//! the CUDA context (about 0.5 GB) on top; the state cache, when on, adds up to its budget.

use candle_core::DType;

use crate::experiment::flops::StepShapes;
use crate::hypernet::Frozen;
use crate::hypernet::interpreter::InterpreterConfig;
use crate::hypernet::subspace::{REFERENCE_MLP_WIDTH, RotationParam, SubspaceInit, SubspaceKind};
use crate::model::{Architecture, LlamaConfig, QkNorm};

/// Tensors of the hypernetwork's cross-attention keys/values shape kept per block.
const C_KV: f64 = 2.0;
/// Unit-normalised copies of the flattened states kept per block.
const C_NORM: f64 = 1.0;
/// Pair-key tensors `[B, (T_s+1)·T_b, H_kv·h_d]` kept by the pointer head's forward.
const C_PAIR: f64 = 4.5;
/// RoPE tables and rotated halves `[B, (T_s+1)·T_b, h_d]`.
const C_ROPE: f64 = 0.5;
/// Pair-key gradients alive at once during the pointer head's backward.
const C_PAIR_GRAD: f64 = 4.8;
const C_ROPE_GRAD: f64 = 0.5;
/// `[B, T_b, D]` and `[B, T_b, F]` tensors kept per block of the intervened pass.
const C_D: f64 = 4.0;
const C_F: f64 = 2.6;
/// Logit-sized tensors `[B, K, V]` alive from the loss to the hypernetwork's backward (logits,
/// log-softmax, the loss's intermediates and their gradients).
const C_LOGITS: f64 = 10.0;
/// The process itself (code, thread stacks, tokenizer, encoded rows).
const RUNTIME_BYTES: f64 = 40e6;
/// Heap the allocator holds beyond the live tensors (freed blocks it keeps for reuse), as a
/// share of the rest.
const SLACK: f64 = 0.03;

/// Bytes per part of a training step's peak.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct MemoryEstimate {
    pub target_weights: f64,
    pub trainable_state: f64,
    pub clean_states: f64,
    pub hypernet_activations: f64,
    pub pointer_activations: f64,
    pub intervened_activations: f64,
    pub backward_peak: f64,
    pub runtime: f64,
    pub allocator_slack: f64,
    /// Trainable parameters (hypernetwork and subspace module).
    pub trainable_parameters: usize,
}

impl MemoryEstimate {
    /// The peak of a step in bytes (without a state cache).
    pub fn total(&self) -> f64 {
        self.target_weights
            + self.trainable_state
            + self.clean_states
            + self.hypernet_activations
            + self.pointer_activations
            + self.intervened_activations
            + self.backward_peak
            + self.runtime
            + self.allocator_slack
    }

    /// `(name, bytes)` per part, in the table's order.
    pub fn parts(&self) -> [(&'static str, f64); 9] {
        [
            ("target weights", self.target_weights),
            ("trainable parameters + AdamW moments", self.trainable_state),
            ("clean hidden states", self.clean_states),
            ("hypernetwork activations", self.hypernet_activations),
            ("pointer head activations", self.pointer_activations),
            ("intervened pass (kept for backward) + logits", self.intervened_activations),
            ("backward (gradients at their peak)", self.backward_peak),
            ("runtime", self.runtime),
            ("allocator slack", self.allocator_slack),
        ]
    }
}

/// The trainable parameters of a HyperDAS interpreter on target `c` (the hypernetwork with its
/// pointer head, and the subspace module): what [`crate::hypernet::interpreter::Interpreter::new`]
/// registers, counted from the shapes alone (tested equal).
pub fn trainable_parameters(c: &LlamaConfig, icfg: &InterpreterConfig) -> usize {
    let (d, hd, f, v) = (c.hidden_size, c.head_dim, c.intermediate_size, c.vocab_size);
    let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let mut n = 0;
    if !icfg.method.is_baseline() {
        let hc = &icfg.hypernet;
        let copied = !hc.from_scratch && c.gpt.is_none();
        let mut attn = d * q + 2 * d * kv + q * d;
        if copied && c.qkv_bias {
            attn += q + 2 * kv;
        }
        if copied && c.o_bias {
            attn += d;
        }
        attn += match c.qk_norm {
            QkNorm::None => 0,
            QkNorm::PerHead => 2 * hd,
            QkNorm::Whole => q + kv,
        };
        let mut mlp = 3 * d * f;
        if copied && c.mlp_bias {
            mlp += 2 * f + d;
        }
        // Frozen copies (`interpreter.freeze`) stay the target's: not trainable. Only copies
        // freeze: blocks from scratch, and the four norms of a target without pre-norms (OLMo 2
        // norms after attention and MLP), start fresh and train.
        let frozen = |what: Frozen| copied && hc.freeze.contains(&what);
        let fresh_norms = if c.architecture == Architecture::Olmo2 { 4 * d } else { 0 };
        let block = if frozen(Frozen::Blocks) {
            fresh_norms
        } else if frozen(Frozen::Mlps) {
            3 * attn + 4 * d
        } else {
            3 * attn + mlp + 4 * d
        };
        let embed = if hc.freeze.contains(&Frozen::Embedding) { 0 } else { v * d };
        let pointer = q * d + kv * d + 2 * d * d + usize::from(hc.self_bias != 0.0);
        n += embed + hc.num_blocks * block + d + pointer;
    }
    let kind = if icfg.method.is_baseline() { SubspaceKind::Das } else { icfg.subspace };
    let k = icfg.rank;
    n += match (kind, icfg.rotation) {
        (SubspaceKind::None, _) => 0,
        (SubspaceKind::Boundless, _) => d * d + 1,
        (_, RotationParam::Retraction | RotationParam::Householder) => d * k,
    };
    let out = kind.conditioning_width(d, k, icfg.reflections.max(1));
    if out > 0 {
        let width = match icfg.init {
            SubspaceInit::Ours => f,
            SubspaceInit::Reference => REFERENCE_MLP_WIDTH,
        };
        n += d + 2 * width * d + out * width;
    }
    n
}

/// Weights of one block's linear layers (attention projections and MLP, no biases): what the
/// bf16 clean passes pack.
pub fn block_linear_weights(c: &LlamaConfig) -> usize {
    let (d, f) = (c.hidden_size, c.intermediate_size);
    let (q, kv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
    let mlp = if c.gpt.is_none() { 3 * d * f } else { 2 * d * f };
    2 * d * q + 2 * d * kv + mlp
}

/// Bytes the bf16 passes add to the target's weights (`sz` bytes each): the packing of every
/// block's `W` for bf16 clean passes, of `W` and `Wᵀ` of blocks `l..` for a bf16 intervened
/// pass, minus the f32 weights [`Llama::release_f32_below`](crate::model::Llama::release_f32_below)
/// frees (blocks `0..l` with bf16 clean passes, every block with both).
fn packed_weights(c: &LlamaConfig, sz: f64, l: usize, clean_bf16: bool, intervened_bf16: bool) -> f64 {
    let w = block_linear_weights(c) as f64;
    let (n, l) = (c.num_hidden_layers as f64, l.min(c.num_hidden_layers) as f64);
    match (clean_bf16, intervened_bf16) {
        (false, false) => 0.0,
        (true, false) => w * (n * 2.0 - l * sz),
        (true, true) => w * (n * 2.0 + (n - l) * 2.0 - n * sz),
        (false, true) => w * (n - l) * 4.0,
    }
}

/// The peak memory of one HyperDAS training step of shapes `s` on target `c` held in `dtype`,
/// its clean passes and its intervened pass in bf16 or not ([`packed_weights`]).
pub fn hyperdas_step(c: &LlamaConfig, dtype: DType, clean_bf16: bool, intervened_bf16: bool, icfg: &InterpreterConfig, s: &StepShapes) -> MemoryEstimate {
    let sz = dtype.size_in_bytes() as f64;
    let f32b = 4.0;
    let (d, hd, f, v) = (c.hidden_size as f64, c.head_dim as f64, c.intermediate_size as f64, c.vocab_size as f64);
    let hkv = c.num_key_value_heads as f64;
    let (b, tb, ts, k) = (s.batch as f64, s.base_len as f64, s.source_len as f64, s.labels as f64);
    let states = (c.num_hidden_layers + 1) as f64;
    let upper = c.num_hidden_layers.saturating_sub(icfg.hypernet.layer) as f64;
    let p = trainable_parameters(c, icfg);
    let pointer = !icfg.method.is_baseline();
    // The embedding's gradient scratch exists only where the embedding copy trains.
    let embedding_grad = if icfg.hypernet.freeze.contains(&Frozen::Embedding) { 0.0 } else { v * d };
    let pairs = b * (ts + 1.0) * tb;
    let flat = b * (tb + ts) * states;
    let mut e = MemoryEstimate {
        target_weights: c.num_parameters() as f64 * sz + packed_weights(c, sz, icfg.hypernet.layer, clean_bf16, intervened_bf16),
        trainable_state: p as f64 * f32b * 3.0,
        clean_states: flat * d * sz,
        hypernet_activations: if pointer { icfg.hypernet.num_blocks as f64 * flat * (C_KV * 2.0 * hkv * hd + C_NORM * d) * f32b } else { 0.0 },
        pointer_activations: if pointer { pairs * (C_PAIR * hkv * hd + C_ROPE * hd) * f32b } else { 0.0 },
        intervened_activations: upper * b * tb * (C_D * d + C_F * f) * sz + C_LOGITS * b * k * v * f32b,
        backward_peak: if pointer { (pairs * (C_PAIR_GRAD * hkv * hd + C_ROPE_GRAD * hd)).max(p as f64 + embedding_grad) * f32b } else { p as f64 * f32b },
        runtime: RUNTIME_BYTES,
        allocator_slack: 0.0,
        trainable_parameters: p,
    };
    e.allocator_slack = SLACK * e.total();
    e
}
