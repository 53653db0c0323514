//! Target-model configuration: HF `config.json` (transformers 4 and 5 spellings) and GGUF
//! metadata both become one [`LlamaConfig`]. Gemma 3 adds its own block layout
//! ([`Gemma3Config`]: sliding/global layers, q/k norms, soft-capping, scaled embeddings).
//!
//! transformers ≥ 5 writes `rope_parameters: {rope_type, rope_theta, ...}` instead of a
//! top-level `rope_theta` plus `rope_scaling`. A loader that only reads `rope_theta` silently
//! falls back to 10 000, which is wrong for Llama-3 (500 000); we read both spellings and
//! reject a file in which they disagree.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Upper bound for any single dimension in a config (2²⁴).
const MAX_DIM: usize = 1 << 24;

/// Which family of decoder the weights belong to. Llama and Qwen2 are the same pre-norm block
/// and differ only in where linear layers carry biases; Gemma 3 adds norms, q/k norms, GeGLU,
/// scaled embeddings and sliding-window layers (see [`Gemma3Config`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama-2/3/3.1, SmolLM2, TinyLlama.
    Llama,
    /// Mistral (v0.1 with `sliding_window: 4096`, v0.3 without): the Llama block, every layer's
    /// attention limited to the last `sliding_window` positions when one is set.
    Mistral,
    /// Qwen2: bias on q/k/v projections, none on o_proj.
    Qwen2,
    /// Qwen 3: the Llama block with a per-head RMSNorm on q and k before RoPE (no biases by
    /// default; `head_dim` may differ from `hidden_size / heads`).
    Qwen3,
    /// Phi 3: the Llama block with q/k/v and gate/up fused into one projection each in the
    /// checkpoint (split at load), every layer sliding when `sliding_window` is set.
    Phi3,
    /// OLMo 2: no norms before attention and MLP; instead a norm on each one's output before the
    /// residual add, and RMSNorms on the whole q and k projections.
    Olmo2,
    /// Gemma 3 text decoder (Gemma3ForCausalLM, `gemma3_text`; GGUF `gemma3`).
    Gemma3,
    /// Gemma 2 (Gemma2ForCausalLM, `gemma2`): Gemma 3's block without q/k norms, with the
    /// attention scores soft-capped, sliding and global layers alternating, one RoPE.
    Gemma2,
    /// GPT-2 (GPT2LMHeadModel, `gpt2`): LayerNorm, learned absolute positions, Conv1D weights
    /// (stored `[in, out]`, transposed at load), a GELU MLP without a gate, biases everywhere.
    Gpt2,
    /// GPT-NeoX / Pythia (GPTNeoXForCausalLM, `gpt_neox`): LayerNorm, q/k/v fused per head,
    /// RoPE over part of each head, a GELU MLP without a gate, attention and MLP in parallel.
    GptNeox,
}

impl Architecture {
    pub const SUPPORTED: &'static str = "llama (LlamaForCausalLM), mistral (MistralForCausalLM), qwen2 (Qwen2ForCausalLM), qwen3 (Qwen3ForCausalLM), olmo2 (Olmo2ForCausalLM), phi3 (Phi3ForCausalLM), gemma2 (Gemma2ForCausalLM), gemma3_text (Gemma3ForCausalLM), gemma3 (Gemma3ForConditionalGeneration, its text decoder), gpt2 (GPT2LMHeadModel), gpt_neox (GPTNeoXForCausalLM)";
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU (Llama, Qwen2): `silu(g) ⊙ u`.
    Silu,
    /// GeGLU with the tanh approximation (Gemma, `gelu_pytorch_tanh`): `gelu_tanh(g) ⊙ u`;
    /// without a gate (GPT-2's `gelu_new`), `gelu_tanh(u)`.
    GeluTanh,
    /// The exact GELU `x · Φ(x)` (GPT-NeoX's `gelu`), in MLPs without a gate.
    Gelu,
}

/// RMSNorms on the queries and keys before RoPE, each with a learned scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    None,
    /// Over each head's `head_dim` values (Qwen 3, Gemma 3): scales of size `head_dim`.
    PerHead,
    /// Over the whole projection before it is split into heads (OLMo 2): scales of size
    /// `heads · head_dim` for q and `kv_heads · head_dim` for k.
    Whole,
}

impl std::fmt::Display for QkNorm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QkNorm::None => "none",
            QkNorm::PerHead => "per-head RMSNorm before RoPE",
            QkNorm::Whole => "RMSNorm over the whole q and k projections before RoPE",
        })
    }
}

/// Which attention a layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// Causal attention over the whole prefix (`full_attention`).
    Full,
    /// Causal attention over the last `sliding_window` positions only (`sliding_attention`).
    Sliding,
}

/// What Gemma 3 adds to the Llama block.
///
/// ```text
/// h_0     = √D · embed[ids]
/// a_l     = h_l + RMSNorm_post_attn(Attn_kind(l)(RMSNorm_in(h_l)))       (q, k: per-head RMSNorm before RoPE)
/// h_{l+1} = a_l + RMSNorm_post_ffw(down(gelu_tanh(gate(x)) ⊙ up(x))),  x = RMSNorm_pre_ffw(a_l)
/// RMSNorm(x) = (1 + w) ⊙ x / sqrt(mean(x²) + ε)
/// scores  = q·k / √query_pre_attn_scalar
/// logits  = cap · tanh((h_final · Eᵀ) / cap)                          (cap only if configured)
/// ```
///
/// `attn_logit_softcapping` is read but, as in transformers' and llama.cpp's Gemma 3, never
/// applied for Gemma 3 (loading a config that sets it says so). Gemma 2 uses the same struct
/// without q/k norms, applying the cap to the attention scores (`s ← cap · tanh(s / cap)`), with
/// one RoPE for both layer kinds.
#[derive(Debug, Clone, PartialEq)]
pub struct Gemma3Config {
    /// One entry per layer.
    pub layer_types: Vec<LayerKind>,
    /// A sliding layer's query at index q sees keys k with q − window < k ≤ q.
    pub sliding_window: usize,
    /// RoPE of the sliding layers (the global layers use [`LlamaConfig::rope`]).
    pub local_rope: RopeConfig,
    /// Attention scores are scaled by `query_pre_attn_scalar^-1/2` (not `head_dim^-1/2`).
    pub query_pre_attn_scalar: f64,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
}

/// What GPT-2 and GPT-NeoX change in the block (`None` in [`LlamaConfig::gpt`] for the others).
///
/// ```text
/// LayerNorm(x) = w ⊙ (x − mean(x)) / √(var(x) + ε) + b       (every norm, final included)
/// MLP(x)       = W_down act(W_up x + b_up) + b_down              (no gate; act = gelu_tanh or gelu)
/// GPT-2:       h_0 = wte[ids] + wpe[pos]                          (no RoPE)
///              y = a + MLP(LN_2(a)),  a = x + Attn(LN_1(x))
/// GPT-NeoX:    y = x + Attn(LN_1(x)) + MLP(LN_2(x))               (use_parallel_residual)
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct GptConfig {
    /// GPT-2: absolute position embeddings `wpe [max_position_embeddings, D]` added to the tokens'.
    pub learned_positions: bool,
    /// GPT-NeoX's `use_parallel_residual`: attention and MLP both read the block's input.
    pub parallel_residual: bool,
    /// GPT-2's `scale_attn_by_inverse_layer_idx`: block l's scores also divided by l + 1.
    pub scale_by_inverse_layer: bool,
}

/// How RoPE frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// `rope_type: linear`: every frequency divided by `factor`.
    Linear { factor: f64 },
    /// `rope_type: llama3` (Llama-3.1 and later): low frequencies divided by `factor`, high
    /// frequencies kept, a smooth ramp in between.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
    /// Per-frequency divisors, as llama.cpp stores them in the GGUF tensor `rope_freqs.weight`.
    Factors(Vec<f32>),
    /// `rope_type: longrope` (Phi 3 128k): per-frequency divisors `short` while a sequence's
    /// last position is below `original_max_position_embeddings`, `long` beyond, and cos / sin
    /// multiplied by `attention_factor` (default `√(1 + ln(s) / ln(original))`, `s` =
    /// max_position_embeddings / original).
    LongRope { short: Vec<f32>, long: Vec<f32>, original_max_position_embeddings: usize, attention_factor: f64 },
}

impl std::fmt::Display for RopeScaling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RopeScaling::None => write!(f, "none"),
            RopeScaling::Linear { factor } => write!(f, "linear, factor {factor}"),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                write!(f, "llama3, factor {factor}, low_freq_factor {low_freq_factor}, high_freq_factor {high_freq_factor}, original context {original_max_position_embeddings}")
            }
            RopeScaling::Factors(v) => write!(f, "per-frequency divisors ({} values, from the GGUF's rope_freqs)", v.len()),
            RopeScaling::LongRope { short, original_max_position_embeddings, attention_factor, .. } => {
                write!(f, "longrope, {} short / long divisors, original context {original_max_position_embeddings}, attention factor {attention_factor}", short.len())
            }
        }
    }
}

/// RoPE settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RopeConfig {
    pub theta: f64,
    pub scaling: RopeScaling,
}

/// The resolved configuration our Llama runtime needs.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope: RopeConfig,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q_proj, k_proj, v_proj.
    pub qkv_bias: bool,
    /// Bias on o_proj.
    pub o_bias: bool,
    /// Bias on gate_proj, up_proj, down_proj.
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub hidden_act: Activation,
    /// RMSNorms on q and k before RoPE: `q ← RMSNorm_q(q)`, `k ← RMSNorm_k(k)`.
    pub qk_norm: QkNorm,
    /// Mistral: every layer attends to the last `sliding_window` positions only (a query at
    /// index q sees keys k with q − window < k ≤ q); `None`: the whole prefix. (Gemma 3's
    /// per-layer windows are in [`Gemma3Config`].)
    pub sliding_window: Option<usize>,
    /// Gemma 3's extras; `None` for the Llama block.
    pub gemma: Option<Gemma3Config>,
    /// How many of each head's `head_dim` dimensions RoPE rotates: `head_dim` for full rotary
    /// embeddings, fewer with `partial_rotary_factor` / `rotary_pct` (GPT-NeoX, Phi-4-mini), 0
    /// without RoPE (GPT-2). transformers rotates the first `rotary_dims` of a head; we permute the
    /// q/k rows at load so that they sit where full rotary embeddings put them, the other
    /// dimensions getting frequency 0 (cos 1, sin 0: left exactly as they are), see
    /// [`super::rope::partial_rotary_rows`].
    pub rotary_dims: usize,
    /// GPT-2 / GPT-NeoX extras (LayerNorm, ungated MLP, learned positions, parallel residual).
    pub gpt: Option<GptConfig>,
}

impl LlamaConfig {
    /// Parse an HF `config.json`.
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let value = crate::error::read_json(path)?;
        Self::from_hf_json(&value, path)
    }

    /// Parse an HF config already read as JSON; `path` is used in error messages.
    pub fn from_hf_json(value: &Value, path: &Path) -> Result<Self> {
        let obj = Obj::new(value, path)?;
        let model_type = obj.opt_str("model_type")?;
        if model_type.as_deref() == Some("gemma3") {
            // The multimodal Gemma3ForConditionalGeneration (Gemma 3 4B and larger): its text
            // decoder, described by `text_config` (the vision tower is not loaded).
            let Some(text) = obj.get("text_config").filter(|v| v.is_object()) else {
                return Err(obj.err("text_config", "a multimodal `gemma3` config needs its `text_config` (the text decoder's settings)"));
            };
            let text = obj.child("text_config", text)?;
            let cfg = gemma_from_hf(&text, Architecture::Gemma3)?;
            cfg.validate().map_err(|(key, msg)| Error::key(path, format!("text_config.{key}"), msg))?;
            return Ok(cfg);
        }
        if matches!(model_type.as_deref(), Some("gemma3_text") | Some("gemma2")) {
            let cfg = gemma_from_hf(&obj, if model_type.as_deref() == Some("gemma2") { Architecture::Gemma2 } else { Architecture::Gemma3 })?;
            cfg.validate().map_err(|(key, msg)| Error::key(path, key, msg))?;
            return Ok(cfg);
        }
        let archs: Vec<String> = match obj.get("architectures") {
            Some(Value::Array(a)) => a.iter().filter_map(|v| v.as_str().map(String::from)).collect(),
            _ => Vec::new(),
        };
        let named = |a: &str| archs.iter().any(|x| x == a);
        if model_type.as_deref() == Some("gpt2") || (model_type.is_none() && named("GPT2LMHeadModel")) {
            let cfg = gpt2_from_hf(&obj)?;
            cfg.validate().map_err(|(key, msg)| Error::key(path, key, msg))?;
            return Ok(cfg);
        }
        if model_type.as_deref() == Some("gpt_neox") || (model_type.is_none() && named("GPTNeoXForCausalLM")) {
            let cfg = neox_from_hf(&obj)?;
            cfg.validate().map_err(|(key, msg)| Error::key(path, key, msg))?;
            return Ok(cfg);
        }
        let architecture = match model_type.as_deref() {
            Some("llama") => Architecture::Llama,
            Some("qwen2") => Architecture::Qwen2,
            Some("qwen3") => Architecture::Qwen3,
            Some("olmo2") => Architecture::Olmo2,
            Some("phi3") => Architecture::Phi3,
            Some("mistral") => Architecture::Mistral,
            None if archs.iter().any(|a| a == "LlamaForCausalLM") => Architecture::Llama,
            None if archs.iter().any(|a| a == "MistralForCausalLM") => Architecture::Mistral,
            None if archs.iter().any(|a| a == "Qwen2ForCausalLM") => Architecture::Qwen2,
            None if archs.iter().any(|a| a == "Qwen3ForCausalLM") => Architecture::Qwen3,
            other => {
                return Err(obj.err(
                    "model_type",
                    format!("unsupported architecture {} (architectures {:?}); supported: {}", other.map_or("<missing>".to_string(), |s| format!("`{s}`")), archs, Architecture::SUPPORTED),
                ));
            }
        };
        if matches!(architecture, Architecture::Qwen2 | Architecture::Qwen3) && obj.opt_bool("use_sliding_window")?.unwrap_or(false) {
            return Err(obj.err("use_sliding_window", "sliding-window attention is not supported"));
        }
        if let Some(act) = obj.opt_str("hidden_act")?
            && act != "silu"
        {
            return Err(obj.err("hidden_act", format!("`{act}` is not supported (only `silu`, the SwiGLU of Llama)")));
        }
        let hidden_size = obj.usize("hidden_size")?;
        let num_attention_heads = obj.usize("num_attention_heads")?;
        if num_attention_heads == 0 {
            // Checked here, not only in validate(): head_dim is derived by dividing by it.
            return Err(obj.err("num_attention_heads", "must be positive"));
        }
        let num_key_value_heads = obj.opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads);
        let head_dim = match obj.opt_usize("head_dim")? {
            Some(h) => h,
            None => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(obj.err("num_attention_heads", format!("hidden_size {hidden_size} is not divisible by {num_attention_heads} heads and no head_dim is given")));
                }
                hidden_size / num_attention_heads
            }
        };
        let rope = parse_rope(&obj)?;
        let rotary_dims = rotary_dims_of(&obj, head_dim, None)?;
        if rotary_dims != head_dim && architecture != Architecture::Phi3 {
            return Err(obj.err(
                "partial_rotary_factor",
                format!("rotary embeddings over part of each head ({rotary_dims} of {head_dim}) are supported for phi3 and gpt_neox, not `{}`", model_type.as_deref().unwrap_or("this architecture")),
            ));
        }
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            Architecture::Llama
            | Architecture::Mistral
            | Architecture::Phi3
            | Architecture::Qwen3
            | Architecture::Olmo2
            | Architecture::Gemma3
            | Architecture::Gemma2
            | Architecture::Gpt2
            | Architecture::GptNeox => {
                let b = obj.opt_bool("attention_bias")?.unwrap_or(false);
                (b, b)
            }
        };
        let cfg = LlamaConfig {
            architecture,
            vocab_size: obj.usize("vocab_size")?,
            hidden_size,
            intermediate_size: obj.usize("intermediate_size")?,
            num_hidden_layers: obj.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: obj.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope,
            max_position_embeddings: obj.opt_usize("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: obj.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: obj.opt_bool("mlp_bias")?.unwrap_or(false),
            bos_token_id: obj.opt_token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: obj.opt_token_ids("eos_token_id")?,
            pad_token_id: obj.opt_token_ids("pad_token_id")?.first().copied(),
            hidden_act: Activation::Silu,
            qk_norm: match architecture {
                Architecture::Qwen3 => QkNorm::PerHead,
                Architecture::Olmo2 => QkNorm::Whole,
                _ => QkNorm::None,
            },
            sliding_window: if matches!(architecture, Architecture::Mistral | Architecture::Phi3) { obj.opt_usize("sliding_window")? } else { None },
            gemma: None,
            rotary_dims,
            gpt: None,
        };
        cfg.validate().map_err(|(key, msg)| Error::key(path, key, msg))?;
        Ok(cfg)
    }

    /// Check the invariants the runtime relies on; returns the offending key.
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ];
        for (k, v) in positive {
            if v == 0 {
                return Err((k, "must be positive".into()));
            }
            // Far above any real model; keeps every product below overflow and every
            // allocation derived from the config bounded.
            if v > MAX_DIM {
                return Err((k, format!("{v} is implausibly large (limit {MAX_DIM})")));
            }
        }
        if self.num_hidden_layers > 4096 {
            return Err(("num_hidden_layers", format!("{} is implausibly large (limit 4096)", self.num_hidden_layers)));
        }
        if self.num_attention_heads * self.head_dim > MAX_DIM {
            return Err(("head_dim", format!("{} heads × head_dim {} is implausibly large", self.num_attention_heads, self.head_dim)));
        }
        if !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(("num_key_value_heads", format!("{} query heads are not a multiple of {} key/value heads", self.num_attention_heads, self.num_key_value_heads)));
        }
        if !self.head_dim.is_multiple_of(2) && self.rotary_dims > 0 {
            return Err(("head_dim", format!("{} is odd; rotary embeddings need an even head size", self.head_dim)));
        }
        if self.rotary_dims > self.head_dim || !self.rotary_dims.is_multiple_of(2) {
            return Err(("partial_rotary_factor", format!("{} rotary dimensions for head_dim {}: need an even number up to head_dim", self.rotary_dims, self.head_dim)));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return Err(("rms_norm_eps", format!("{} is not a positive number", self.rms_norm_eps)));
        }
        if !(self.rope.theta > 0.0 && self.rope.theta.is_finite()) {
            return Err(("rope_theta", format!("{} is not a positive number", self.rope.theta)));
        }
        if self.sliding_window == Some(0) {
            return Err(("sliding_window", "must be positive (or null for full attention)".into()));
        }
        if let Some(g) = &self.gemma {
            if g.layer_types.len() != self.num_hidden_layers {
                return Err(("layer_types", format!("{} entries for {} layers", g.layer_types.len(), self.num_hidden_layers)));
            }
            if g.sliding_window == 0 {
                return Err(("sliding_window", "must be positive".into()));
            }
            if !(g.query_pre_attn_scalar > 0.0 && g.query_pre_attn_scalar.is_finite()) {
                return Err(("query_pre_attn_scalar", format!("{} is not a positive number", g.query_pre_attn_scalar)));
            }
            if !(g.local_rope.theta > 0.0 && g.local_rope.theta.is_finite()) {
                return Err(("rope_local_base_freq", format!("{} is not a positive number", g.local_rope.theta)));
            }
            for (key, cap) in [("attn_logit_softcapping", g.attn_logit_softcapping), ("final_logit_softcapping", g.final_logit_softcapping)] {
                if let Some(c) = cap
                    && !(c > 0.0 && c.is_finite())
                {
                    return Err((key, format!("{c} is not a positive number")));
                }
            }
            check_scaling(&g.local_rope.scaling, self.head_dim)?;
        }
        check_scaling(&self.rope.scaling, self.rotary_dims)?;
        Ok(())
    }

    /// How positions enter, for people: RoPE (its theta, scaling and coverage of each head) or
    /// GPT-2's learned positions.
    pub fn position_encoding(&self) -> String {
        if self.gpt.as_ref().is_some_and(|g| g.learned_positions) {
            return format!("learned absolute positions ({} of them), no RoPE", self.max_position_embeddings);
        }
        let cover = if self.rotary_dims == self.head_dim { String::new() } else { format!(" on {} of each head's {} dimensions", self.rotary_dims, self.head_dim) };
        format!("RoPE{cover}, theta {}, scaling {}", self.rope.theta, self.rope.scaling)
    }

    /// The norm type (its ε is `rms_norm_eps`), for people.
    pub fn norm_kind(&self) -> &'static str {
        if self.gpt.is_some() {
            "LayerNorm"
        } else if self.gemma.is_some() {
            "RMSNorm (1 + w)"
        } else {
            "RMSNorm"
        }
    }

    /// Whether the hypernetwork's blocks can start as copies of this target's first blocks
    /// (RMSNorms, a gated MLP); GPT-2 and GPT-NeoX blocks do not fit its Llama layout, so its
    /// blocks start from scratch there.
    pub fn hypernet_copies_blocks(&self) -> bool {
        self.gpt.is_none()
    }

    /// Whether training runs the frozen upper blocks with the hand-written backward of `tape`:
    /// the plain Llama block, and Gemma 3's (per-head q/k norms, output norms, GeGLU; not with
    /// a final-logit cap, whose backward the tape does not have).
    pub fn has_taped_backward(&self) -> bool {
        self.is_llama_block()
            || (self.architecture == Architecture::Gemma3 && self.qk_norm == QkNorm::PerHead && self.gemma.as_ref().is_some_and(|g| g.final_logit_softcapping.is_none()) && self.gpt.is_none())
    }

    /// Whether this is the plain Llama block (the one with a hand-written backward in `tape`).
    pub fn is_llama_block(&self) -> bool {
        self.gemma.is_none() && self.gpt.is_none() && self.hidden_act == Activation::Silu && self.qk_norm == QkNorm::None && self.sliding_window.is_none() && self.architecture != Architecture::Olmo2
    }
}

/// Check one RoPE scaling rule; returns the offending key.
fn check_scaling(scaling: &RopeScaling, head_dim: usize) -> std::result::Result<(), (&'static str, String)> {
    match scaling {
        RopeScaling::None => {}
        RopeScaling::Linear { factor } => {
            if !factor.is_finite() || *factor <= 0.0 {
                return Err(("rope_parameters.factor", format!("{factor} is not positive")));
            }
        }
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            if !(*factor > 0.0 && *original_max_position_embeddings > 0.0 && *low_freq_factor > 0.0) {
                return Err(("rope_parameters", "llama3 scaling needs positive factor, low_freq_factor and original_max_position_embeddings".into()));
            }
            if high_freq_factor.partial_cmp(low_freq_factor) != Some(std::cmp::Ordering::Greater) {
                return Err(("rope_parameters.high_freq_factor", format!("{high_freq_factor} must exceed low_freq_factor {low_freq_factor}")));
            }
        }
        RopeScaling::LongRope { short, long, original_max_position_embeddings, attention_factor } => {
            for (key, f) in [("rope_parameters.short_factor", short), ("rope_parameters.long_factor", long)] {
                if f.len() != head_dim / 2 {
                    return Err((key, format!("{} factors for head_dim {} (need {})", f.len(), head_dim, head_dim / 2)));
                }
                if f.iter().any(|x| !(*x > 0.0 && x.is_finite())) {
                    return Err((key, "factors must be positive and finite".into()));
                }
            }
            if *original_max_position_embeddings == 0 || !(*attention_factor > 0.0 && attention_factor.is_finite()) {
                return Err(("rope_parameters", "longrope needs a positive original_max_position_embeddings and attention_factor".into()));
            }
        }
        RopeScaling::Factors(f) => {
            if f.len() != head_dim / 2 {
                return Err(("rope_freqs", format!("{} factors for head_dim {} (need {})", f.len(), head_dim, head_dim / 2)));
            }
            if f.iter().any(|x| !(*x > 0.0 && x.is_finite())) {
                return Err(("rope_freqs", "factors must be positive and finite".into()));
            }
        }
    }
    Ok(())
}

impl LlamaConfig {
    /// Number of parameters, counting a tied embedding once.
    pub fn num_parameters(&self) -> usize {
        let d = self.hidden_size;
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let mut attn = d * q + 2 * d * kv + q * d;
        if self.qkv_bias {
            attn += q + 2 * kv;
        }
        if self.o_bias {
            attn += d;
        }
        let f = self.intermediate_size;
        let gated = self.gpt.is_none();
        let mut mlp = if gated { 3 * d * f } else { 2 * d * f };
        if self.mlp_bias {
            mlp += if gated { 2 * f } else { f } + d;
        }
        if let Some(g) = &self.gpt {
            // Two LayerNorms (scale and bias) a block, a final one, learned positions.
            let block = attn + mlp + 4 * d;
            let embed = self.vocab_size * d + if g.learned_positions { self.max_position_embeddings * d } else { 0 };
            let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * d };
            return embed + self.num_hidden_layers * block + 2 * d + head;
        }
        // Gemma 3: four norms a block; Qwen 3 and Gemma 3: the per-head q/k norms.
        let norms = if self.gemma.is_some() { 4 * d } else { 2 * d }
            + match self.qk_norm {
                QkNorm::None => 0,
                QkNorm::PerHead => 2 * self.head_dim,
                QkNorm::Whole => q + kv,
            };
        let block = attn + mlp + norms;
        let embed = self.vocab_size * d;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * d };
        embed + self.num_hidden_layers * block + d + head
    }
}

fn parse_rope(obj: &Obj) -> Result<RopeConfig> {
    let top_theta = obj.opt_f64("rope_theta")?;
    // transformers 5: `rope_parameters`; transformers 4: `rope_scaling` (may be null).
    let (params_key, params) = match (obj.get("rope_parameters"), obj.get("rope_scaling")) {
        (Some(p), _) if !p.is_null() => ("rope_parameters", Some(p)),
        (_, Some(s)) if !s.is_null() => ("rope_scaling", Some(s)),
        _ => ("rope_parameters", None),
    };
    let Some(params) = params else {
        return Ok(RopeConfig { theta: top_theta.unwrap_or(10_000.0), scaling: RopeScaling::None });
    };
    let p = obj.child(params_key, params)?;
    let nested_theta = p.opt_f64("rope_theta")?;
    let theta = match (top_theta, nested_theta) {
        (Some(a), Some(b)) if (a - b).abs() > 1e-9 * a.abs().max(1.0) => {
            return Err(obj.err("rope_theta", format!("top-level rope_theta {a} disagrees with {params_key}.rope_theta {b}")));
        }
        (Some(a), _) => a,
        (None, Some(b)) => b,
        (None, None) => 10_000.0,
    };
    let scaling = match scaling_of(&p) {
        Err(_) if matches!(p.opt_str("rope_type")?.or(p.opt_str("type")?).as_deref(), Some("longrope") | Some("su")) => longrope_of(obj, &p)?,
        other => other?,
    };
    Ok(RopeConfig { theta, scaling })
}

/// Phi 3's `longrope` (also spelled `su`): short and long per-frequency divisors, the context
/// they switch at, and the cos / sin scale, as transformers computes them.
fn longrope_of(obj: &Obj, p: &Obj) -> Result<RopeScaling> {
    let factors = |key: &str| -> Result<Vec<f32>> {
        match p.get(key) {
            Some(Value::Array(a)) => a.iter().enumerate().map(|(i, v)| v.as_f64().map(|x| x as f32).ok_or_else(|| p.err(&format!("{key}[{i}]"), "expected a number"))).collect(),
            _ => Err(p.err(key, "expected a list of numbers")),
        }
    };
    let max = obj.opt_usize("max_position_embeddings")?.unwrap_or(4096);
    let original = match (obj.opt_usize("original_max_position_embeddings")?, p.opt_usize("original_max_position_embeddings")?) {
        (Some(o), _) | (None, Some(o)) => o,
        (None, None) => max,
    };
    let factor = max as f64 / original.max(1) as f64;
    let attention_factor = match p.opt_f64("attention_factor")? {
        Some(a) => a,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
    };
    Ok(RopeScaling::LongRope { short: factors("short_factor")?, long: factors("long_factor")?, original_max_position_embeddings: original, attention_factor })
}

/// The scaling rule of one rope-parameters object (`rope_type` or the older `type`).
fn scaling_of(p: &Obj) -> Result<RopeScaling> {
    let kind = match p.opt_str("rope_type")? {
        Some(k) => k,
        None => p.opt_str("type")?.unwrap_or_else(|| "default".to_string()),
    };
    Ok(match kind.as_str() {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: p.f64("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: p.f64("factor")?,
            low_freq_factor: p.f64("low_freq_factor")?,
            high_freq_factor: p.f64("high_freq_factor")?,
            original_max_position_embeddings: p.f64("original_max_position_embeddings")?,
        },
        other => {
            return Err(p.err("rope_type", format!("`{other}` is not supported (supported: default, linear, llama3)")));
        }
    })
}

/// Gemma 3 (`gemma3_text`) or Gemma 2 (`gemma2`) from its HF config, transformers 4 or 5 spelling.
fn gemma_from_hf(obj: &Obj, architecture: Architecture) -> Result<LlamaConfig> {
    let gemma2 = architecture == Architecture::Gemma2;
    if let Some(act) = obj.opt_str("hidden_activation")?.or(obj.opt_str("hidden_act")?)
        && act != "gelu_pytorch_tanh"
        && act != "gelu_tanh"
    {
        return Err(obj.err("hidden_activation", format!("`{act}` is not supported for Gemma (only `gelu_pytorch_tanh`)")));
    }
    if obj.opt_bool("use_bidirectional_attention")?.unwrap_or(false) {
        return Err(obj.err("use_bidirectional_attention", "bidirectional (encoder) Gemma 3 is not supported; this is a causal-LM runtime"));
    }
    let n_layers = obj.usize("num_hidden_layers")?;
    let layer_types = match obj.get("layer_types").filter(|v| !v.is_null()) {
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, v)| match v.as_str() {
                Some("full_attention") => Ok(LayerKind::Full),
                Some("sliding_attention") => Ok(LayerKind::Sliding),
                _ => Err(obj.err(&format!("layer_types[{i}]"), format!("expected \"full_attention\" or \"sliding_attention\", found {v}"))),
            })
            .collect::<Result<Vec<_>>>()?,
        Some(v) => return Err(obj.err("layer_types", format!("expected a list, found {v}"))),
        // Gemma 2 without layer_types: sliding and global alternate, starting with sliding.
        None if gemma2 => (0..n_layers).map(|i| if i % 2 == 0 { LayerKind::Sliding } else { LayerKind::Full }).collect(),
        // transformers < 4.53: every `sliding_window_pattern`-th layer is global.
        None => {
            let pattern = obj.opt_usize("sliding_window_pattern")?.unwrap_or(6);
            if pattern == 0 {
                return Err(obj.err("sliding_window_pattern", "must be positive"));
            }
            (0..n_layers).map(|i| if (i + 1) % pattern == 0 { LayerKind::Full } else { LayerKind::Sliding }).collect()
        }
    };
    // Rope: transformers 5 nests one parameter set per layer type; transformers 4 has
    // rope_theta (global), rope_local_base_freq (local) and rope_scaling (global only).
    let (rope, local_rope) = match obj.get("rope_parameters").filter(|v| !v.is_null()) {
        Some(params) => {
            let p = obj.child("rope_parameters", params)?;
            let one = |key: &str, default_theta: f64| -> Result<RopeConfig> {
                match p.get(key).filter(|v| !v.is_null()) {
                    None => Ok(RopeConfig { theta: default_theta, scaling: RopeScaling::None }),
                    Some(v) => {
                        let q = p.child(key, v)?;
                        Ok(RopeConfig { theta: q.opt_f64("rope_theta")?.unwrap_or(default_theta), scaling: scaling_of(&q)? })
                    }
                }
            };
            if gemma2 {
                // One parameter set for every layer.
                let r = RopeConfig { theta: p.opt_f64("rope_theta")?.unwrap_or(10_000.0), scaling: scaling_of(&p)? };
                (r.clone(), r)
            } else {
                if p.get("full_attention").is_none() && p.get("sliding_attention").is_none() {
                    return Err(obj.err("rope_parameters", "Gemma 3 expects one entry per layer type (`full_attention`, `sliding_attention`)"));
                }
                (one("full_attention", 1_000_000.0)?, one("sliding_attention", 10_000.0)?)
            }
        }
        None => {
            let scaling = match obj.get("rope_scaling").filter(|v| !v.is_null()) {
                Some(v) => scaling_of(&obj.child("rope_scaling", v)?)?,
                None => RopeScaling::None,
            };
            if gemma2 {
                let r = RopeConfig { theta: obj.opt_f64("rope_theta")?.unwrap_or(10_000.0), scaling };
                (r.clone(), r)
            } else {
                (
                    RopeConfig { theta: obj.opt_f64("rope_theta")?.unwrap_or(1_000_000.0), scaling },
                    RopeConfig { theta: obj.opt_f64("rope_local_base_freq")?.unwrap_or(10_000.0), scaling: RopeScaling::None },
                )
            }
        }
    };
    let hidden_size = obj.usize("hidden_size")?;
    let bias = obj.opt_bool("attention_bias")?.unwrap_or(false);
    Ok(LlamaConfig {
        architecture,
        vocab_size: obj.usize("vocab_size")?,
        hidden_size,
        intermediate_size: obj.usize("intermediate_size")?,
        num_hidden_layers: n_layers,
        num_attention_heads: obj.usize("num_attention_heads")?,
        num_key_value_heads: obj.usize("num_key_value_heads")?,
        head_dim: obj.opt_usize("head_dim")?.unwrap_or(256),
        rms_norm_eps: obj.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
        rope,
        max_position_embeddings: obj.opt_usize("max_position_embeddings")?.unwrap_or(131_072),
        tie_word_embeddings: obj.opt_bool("tie_word_embeddings")?.unwrap_or(true),
        qkv_bias: bias,
        o_bias: bias,
        mlp_bias: false,
        bos_token_id: obj.opt_token_ids("bos_token_id")?.first().copied(),
        eos_token_ids: obj.opt_token_ids("eos_token_id")?,
        pad_token_id: obj.opt_token_ids("pad_token_id")?.first().copied(),
        hidden_act: Activation::GeluTanh,
        qk_norm: if gemma2 { QkNorm::None } else { QkNorm::PerHead },
        sliding_window: None,
        gemma: Some(Gemma3Config {
            layer_types,
            sliding_window: obj.opt_usize("sliding_window")?.unwrap_or(4096),
            local_rope,
            query_pre_attn_scalar: obj.opt_f64("query_pre_attn_scalar")?.unwrap_or(256.0),
            attn_logit_softcapping: obj.opt_f64("attn_logit_softcapping")?,
            final_logit_softcapping: obj.opt_f64("final_logit_softcapping")?,
        }),
        rotary_dims: obj.opt_usize("head_dim")?.unwrap_or(256),
        gpt: None,
    })
}

/// The rotary dimensions of a head: `partial_rotary_factor` (top level or in `rope_parameters`,
/// transformers 5) or GPT-NeoX's `rotary_pct` (transformers 4), `default` when none is given,
/// as transformers computes it: `int(head_dim · factor)`.
fn rotary_dims_of(obj: &Obj, head_dim: usize, default: Option<f64>) -> Result<usize> {
    let nested = match obj.get("rope_parameters").filter(|v| v.is_object()) {
        Some(v) => obj.child("rope_parameters", v)?.opt_f64("partial_rotary_factor")?,
        None => None,
    };
    let (key, factor) = match (obj.opt_f64("partial_rotary_factor")?, nested, obj.opt_f64("rotary_pct")?) {
        (Some(f), _, _) => ("partial_rotary_factor", f),
        (None, Some(f), _) => ("rope_parameters.partial_rotary_factor", f),
        (None, None, Some(f)) => ("rotary_pct", f),
        (None, None, None) => ("partial_rotary_factor", default.unwrap_or(1.0)),
    };
    if !(factor > 0.0 && factor <= 1.0) {
        return Err(obj.err(key, format!("{factor}: expected a fraction of the head in (0, 1]")));
    }
    let dims = (head_dim as f64 * factor) as usize;
    if dims == 0 || !dims.is_multiple_of(2) {
        return Err(obj.err(key, format!("{factor} of head_dim {head_dim} gives {dims} rotary dimensions; RoPE needs a positive even number")));
    }
    Ok(dims)
}

/// The MLP activation of a GPT-family config (`activation_function` / `hidden_act`).
fn gpt_activation(obj: &Obj, key: &str, default: &str) -> Result<Activation> {
    let act = obj.opt_str(key)?.unwrap_or_else(|| default.to_string());
    match act.as_str() {
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
        "gelu" => Ok(Activation::Gelu),
        other => Err(obj.err(key, format!("`{other}` is not supported (supported: gelu, gelu_new, gelu_pytorch_tanh)"))),
    }
}

/// GPT-2 (`gpt2`): `n_embd`, `n_layer`, `n_head`, `n_positions`, `n_inner`, `layer_norm_epsilon`.
fn gpt2_from_hf(obj: &Obj) -> Result<LlamaConfig> {
    let get = |plain: &str, hf: &str| -> Result<usize> { obj.opt_usize(plain)?.map_or_else(|| obj.usize(hf), Ok) };
    let d = get("n_embd", "hidden_size")?;
    let heads = get("n_head", "num_attention_heads")?;
    if heads == 0 || !d.is_multiple_of(heads) {
        return Err(obj.err("n_head", format!("n_embd {d} is not divisible by {heads} heads")));
    }
    if obj.opt_bool("add_cross_attention")?.unwrap_or(false) {
        return Err(obj.err("add_cross_attention", "GPT-2 with cross-attention (an encoder-decoder) is not supported; this is a causal-LM runtime"));
    }
    if !obj.opt_bool("scale_attn_weights")?.unwrap_or(true) {
        return Err(obj.err("scale_attn_weights", "false (unscaled attention scores) is not supported"));
    }
    let n_inner = obj.opt_usize("n_inner")?.unwrap_or(4 * d);
    let eos = obj.opt_token_ids("eos_token_id")?;
    Ok(LlamaConfig {
        architecture: Architecture::Gpt2,
        vocab_size: obj.usize("vocab_size")?,
        hidden_size: d,
        intermediate_size: n_inner,
        num_hidden_layers: get("n_layer", "num_hidden_layers")?,
        num_attention_heads: heads,
        num_key_value_heads: heads,
        head_dim: d / heads,
        rms_norm_eps: obj.opt_f64("layer_norm_epsilon")?.unwrap_or(1e-5),
        rope: RopeConfig { theta: 10_000.0, scaling: RopeScaling::None },
        max_position_embeddings: obj.opt_usize("n_positions")?.or(obj.opt_usize("max_position_embeddings")?).unwrap_or(1024),
        tie_word_embeddings: obj.opt_bool("tie_word_embeddings")?.unwrap_or(true),
        qkv_bias: true,
        o_bias: true,
        mlp_bias: true,
        bos_token_id: obj.opt_token_ids("bos_token_id")?.first().copied(),
        eos_token_ids: eos,
        pad_token_id: obj.opt_token_ids("pad_token_id")?.first().copied(),
        hidden_act: gpt_activation(obj, "activation_function", "gelu_new")?,
        qk_norm: QkNorm::None,
        sliding_window: None,
        gemma: None,
        rotary_dims: 0,
        gpt: Some(GptConfig { learned_positions: true, parallel_residual: false, scale_by_inverse_layer: obj.opt_bool("scale_attn_by_inverse_layer_idx")?.unwrap_or(false) }),
    })
}

/// GPT-NeoX / Pythia (`gpt_neox`): transformers 4 spells RoPE `rotary_pct` + `rotary_emb_base`,
/// transformers 5 `rope_parameters: {rope_theta, partial_rotary_factor}`; both are read (the
/// fraction defaults to 0.25, as transformers does).
fn neox_from_hf(obj: &Obj) -> Result<LlamaConfig> {
    let d = obj.usize("hidden_size")?;
    let heads = obj.usize("num_attention_heads")?;
    if heads == 0 || !d.is_multiple_of(heads) {
        return Err(obj.err("num_attention_heads", format!("hidden_size {d} is not divisible by {heads} heads")));
    }
    let head_dim = d / heads;
    let mut rope = parse_rope(obj)?;
    if let Some(base) = obj.opt_f64("rotary_emb_base")? {
        if obj.get("rope_parameters").is_some_and(|v| v.get("rope_theta").is_some()) && (rope.theta - base).abs() > 1e-9 * base.abs().max(1.0) {
            return Err(obj.err("rotary_emb_base", format!("{base} disagrees with rope_parameters.rope_theta {}", rope.theta)));
        }
        rope.theta = base;
    }
    let bias = obj.opt_bool("attention_bias")?.unwrap_or(true);
    Ok(LlamaConfig {
        architecture: Architecture::GptNeox,
        vocab_size: obj.usize("vocab_size")?,
        hidden_size: d,
        intermediate_size: obj.usize("intermediate_size")?,
        num_hidden_layers: obj.usize("num_hidden_layers")?,
        num_attention_heads: heads,
        num_key_value_heads: heads,
        head_dim,
        rms_norm_eps: obj.opt_f64("layer_norm_eps")?.unwrap_or(1e-5),
        rotary_dims: rotary_dims_of(obj, head_dim, Some(0.25))?,
        rope,
        max_position_embeddings: obj.opt_usize("max_position_embeddings")?.unwrap_or(2048),
        tie_word_embeddings: obj.opt_bool("tie_word_embeddings")?.unwrap_or(false),
        qkv_bias: bias,
        o_bias: bias,
        mlp_bias: true,
        bos_token_id: obj.opt_token_ids("bos_token_id")?.first().copied(),
        eos_token_ids: obj.opt_token_ids("eos_token_id")?,
        pad_token_id: obj.opt_token_ids("pad_token_id")?.first().copied(),
        hidden_act: gpt_activation(obj, "hidden_act", "gelu")?,
        qk_norm: QkNorm::None,
        sliding_window: None,
        gemma: None,
        gpt: Some(GptConfig { learned_positions: false, parallel_residual: obj.opt_bool("use_parallel_residual")?.unwrap_or(true), scale_by_inverse_layer: false }),
    })
}

/// A JSON object with the file (and key prefix) it came from, for precise errors.
pub(crate) struct Obj<'a> {
    map: &'a Map<String, Value>,
    path: PathBuf,
    prefix: String,
}

impl<'a> Obj<'a> {
    pub(crate) fn new(value: &'a Value, path: &Path) -> Result<Self> {
        match value {
            Value::Object(map) => Ok(Obj { map, path: path.to_path_buf(), prefix: String::new() }),
            _ => Err(Error::file(path, "expected a JSON object at the top level")),
        }
    }

    fn child(&self, key: &str, value: &'a Value) -> Result<Obj<'a>> {
        match value {
            Value::Object(map) => Ok(Obj { map, path: self.path.clone(), prefix: format!("{}{key}.", self.prefix) }),
            _ => Err(self.err(key, "expected a JSON object")),
        }
    }

    pub(crate) fn err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::key(&self.path, format!("{}{key}", self.prefix), msg)
    }

    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    fn present(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    pub(crate) fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v.as_u64().and_then(|u| usize::try_from(u).ok()).map(Some).ok_or_else(|| self.err(key, format!("expected a non-negative integer, found {v}"))),
        }
    }

    pub(crate) fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.err(key, "missing"))
    }

    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(key, format!("expected a number, found {v}"))),
        }
    }

    fn f64(&self, key: &str) -> Result<f64> {
        self.opt_f64(key)?.ok_or_else(|| self.err(key, "missing"))
    }

    pub(crate) fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.present(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.err(key, format!("expected true or false, found {v}"))),
        }
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<String>> {
        match self.present(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(self.err(key, format!("expected a string, found {v}"))),
        }
    }

    /// A token id given as an integer or a list of integers (HF allows both for `eos_token_id`).
    fn opt_token_ids(&self, key: &str) -> Result<Vec<u32>> {
        let bad = |v: &Value| self.err(key, format!("expected a token id or a list of token ids, found {v}"));
        let one = |v: &Value| v.as_u64().and_then(|u| u32::try_from(u).ok()).ok_or_else(|| bad(v));
        match self.present(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a.iter().map(one).collect(),
            Some(v) => Ok(vec![one(v)?]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({
            "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "rms_norm_eps": 1e-5
        })
    }

    fn parse(v: &Value) -> Result<LlamaConfig> {
        LlamaConfig::from_hf_json(v, Path::new("config.json"))
    }

    #[test]
    fn defaults_and_head_dim() {
        let c = parse(&base()).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope, RopeConfig { theta: 10_000.0, scaling: RopeScaling::None });
        assert!(!c.tie_word_embeddings && !c.qkv_bias && !c.o_bias);
    }

    #[test]
    fn transformers4_and_5_rope_spellings_agree() {
        let mut v4 = base();
        v4["rope_theta"] = json!(500000.0);
        v4["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let mut v5 = base();
        v5["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let (a, b) = (parse(&v4).unwrap(), parse(&v5).unwrap());
        assert_eq!(a.rope, b.rope);
        assert_eq!(a.rope.theta, 500000.0);
        // Old spelling `type` instead of `rope_type`.
        let mut v4b = base();
        v4b["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
        assert_eq!(parse(&v4b).unwrap().rope.scaling, RopeScaling::Linear { factor: 2.0 });
    }

    #[test]
    fn bad_inputs_name_the_key() {
        let mut v = base();
        v["rope_theta"] = json!(10000.0);
        v["rope_parameters"] = json!({"rope_type": "default", "rope_theta": 500000.0});
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("config.json") && e.contains("rope_theta") && e.contains("disagrees"), "{e}");

        let mut v = base();
        v["hidden_size"] = json!("sixty-four");
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("key `hidden_size`"), "{e}");

        let mut v = base();
        v.as_object_mut().unwrap().remove("vocab_size");
        assert!(parse(&v).unwrap_err().to_string().contains("key `vocab_size`: missing"));

        let mut v = base();
        v["model_type"] = json!("falcon");
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("unsupported architecture `falcon`") && e.contains("supported: llama"), "{e}");

        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        assert!(parse(&v).unwrap_err().to_string().contains("num_key_value_heads"));

        let mut v = base();
        v["rope_parameters"] = json!({"rope_type": "yarn", "factor": 4.0});
        assert!(parse(&v).unwrap_err().to_string().contains("rope_parameters.rope_type"));

        let mut v = base();
        v["num_attention_heads"] = json!(0); // found by the config_json fuzz target: a division by zero
        assert!(parse(&v).unwrap_err().to_string().contains("num_attention_heads`: must be positive"));

        let mut v = base();
        v["num_hidden_layers"] = json!(0);
        assert!(parse(&v).unwrap_err().to_string().contains("num_hidden_layers`: must be positive"));

        let mut v = base();
        v["hidden_size"] = json!(1u64 << 40);
        v["head_dim"] = json!(16);
        assert!(parse(&v).unwrap_err().to_string().contains("implausibly large"));
    }

    fn gemma() -> Value {
        json!({
            "model_type": "gemma3_text", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 7, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 32,
            "sliding_window": 512, "query_pre_attn_scalar": 256
        })
    }

    #[test]
    fn gemma3_transformers4_and_5_spellings_agree() {
        let mut v4 = gemma();
        v4["rope_theta"] = json!(1_000_000.0);
        v4["rope_local_base_freq"] = json!(10_000.0);
        v4["rope_scaling"] = json!({"rope_type": "linear", "factor": 8.0});
        v4["sliding_window_pattern"] = json!(6);
        let mut v5 = gemma();
        v5["rope_parameters"] = json!({
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}});
        let kinds = ["sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention", "full_attention", "sliding_attention"];
        v5["layer_types"] = json!(kinds);
        let (a, b) = (parse(&v4).unwrap(), parse(&v5).unwrap());
        assert_eq!(a, b);
        let g = a.gemma.as_ref().unwrap();
        assert_eq!(g.layer_types.iter().filter(|k| **k == LayerKind::Full).count(), 1);
        assert_eq!(g.layer_types[5], LayerKind::Full);
        assert_eq!(a.rope.scaling, RopeScaling::Linear { factor: 8.0 });
        assert_eq!(g.local_rope, RopeConfig { theta: 10_000.0, scaling: RopeScaling::None });
        assert!(a.tie_word_embeddings && a.hidden_act == Activation::GeluTanh && !a.is_llama_block());
        // Four norms a block and the q/k norms.
        let llama_like = 64 * 100 + 7 * (64 * 128 + 2 * 64 * 32 + 128 * 64 + 3 * 64 * 128) + 64;
        assert_eq!(a.num_parameters(), llama_like + 7 * (4 * 64 + 2 * 32));
    }

    #[test]
    fn gemma3_bad_inputs_name_the_key() {
        let mut v = gemma();
        v["layer_types"] = json!(["sliding_attention", "local"]);
        let e = parse(&v).unwrap_err().to_string();
        assert!(e.contains("layer_types[1]"), "{e}");
        let mut v = gemma();
        v["layer_types"] = json!(["full_attention"]);
        assert!(parse(&v).unwrap_err().to_string().contains("1 entries for 7 layers"));
        let mut v = gemma();
        v["model_type"] = json!("gemma3");
        assert!(parse(&v).unwrap_err().to_string().contains("text_config"), "a multimodal config without its text decoder's settings");
        // The multimodal config: the text decoder from text_config.
        let mm = json!({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": gemma(), "vision_config": {"model_type": "siglip_vision_model"}});
        assert_eq!(parse(&mm).unwrap(), parse(&gemma()).unwrap());
        let mut v = gemma();
        v["hidden_activation"] = json!("relu");
        assert!(parse(&v).unwrap_err().to_string().contains("hidden_activation"));
        let mut v = gemma();
        v["sliding_window"] = json!(0);
        assert!(parse(&v).unwrap_err().to_string().contains("sliding_window"));
        let mut v = gemma();
        v["final_logit_softcapping"] = json!(-1.0);
        assert!(parse(&v).unwrap_err().to_string().contains("final_logit_softcapping"));
        let mut v = gemma();
        v["rope_parameters"] = json!({"rope_type": "default"});
        assert!(parse(&v).unwrap_err().to_string().contains("one entry per layer type"));
    }

    #[test]
    fn qwen2_biases_and_eos_lists() {
        let mut v = base();
        v["model_type"] = json!("qwen2");
        v["eos_token_id"] = json!([5, 7]);
        let c = parse(&v).unwrap();
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(c.eos_token_ids, vec![5, 7]);
    }
}
