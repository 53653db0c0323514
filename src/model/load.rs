//! Resolving a `--model` argument and loading model + tokenizer.
//!
//! Accepted: an HF directory (`config.json`, safetensors, `tokenizer.json`), a `.gguf` file, the
//! name of a model `hyperdas fetch` knows (e.g. `smollm2-135m`, once fetched), or a hub id
//! `org/name` (needs the `hub` feature; the local HF cache is consulted first).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::config::{Activation, Architecture, Gemma3Config, GptConfig, LayerKind, LlamaConfig, QkNorm, RopeConfig, RopeScaling};
use super::gguf::GgufFile;
use super::llama::Llama;
use super::tokenizer::{StartToken, TextTokenizer};
use super::weights::{GgufWeights, SafetensorsWeights, Weights};
use crate::error::{Error, Result};

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    HfDir(PathBuf),
    Gguf(PathBuf),
    /// `synthetic:llama3-8b` or `synthetic:<config.json>`: random weights (seeded) of exactly that
    /// configuration and a byte-level tokenizer of its vocabulary size, for measuring memory and
    /// speed at a model's real size without downloading it ([`super::weights::RandomWeights`]).
    Synthetic {
        name: String,
        config: String,
    },
}

/// The configurations `synthetic:<name>` knows.
const SYNTHETIC: [(&str, &str); 1] = [("llama3-8b", include_str!("synthetic/llama3-8b.json"))];

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelSource::HfDir(p) => write!(f, "HF directory {}", p.display()),
            ModelSource::Gguf(p) => write!(f, "GGUF file {}", p.display()),
            ModelSource::Synthetic { name, .. } => write!(f, "synthetic model {name} (random weights)"),
        }
    }
}

impl ModelSource {
    /// sha256 (hex) of what decides the model's outputs: the GGUF file; for an HF directory,
    /// `config.json`, every `*.safetensors` and the tokenizer files, each hashed by name and
    /// content in name order. Caches of model outputs (the knowledge table) are keyed by it.
    pub fn fingerprint(&self) -> Result<String> {
        let files: Vec<PathBuf> = match self {
            ModelSource::Synthetic { config, .. } => {
                use sha2::Digest;
                return Ok(crate::fetch::hex(&sha2::Sha256::digest(format!("synthetic\0{config}").as_bytes())));
            }
            ModelSource::Gguf(p) => vec![p.clone()],
            ModelSource::HfDir(dir) => {
                let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
                let mut files = Vec::new();
                for entry in entries {
                    let path = entry.map_err(|e| Error::io(dir, e))?.path();
                    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
                    let counts = name == "config.json" || name.ends_with(".safetensors") || (name.starts_with("tokenizer") && name.ends_with(".json"));
                    if counts && path.is_file() {
                        files.push(path);
                    }
                }
                files.sort();
                files
            }
        };
        let named: Vec<(String, PathBuf)> = files.into_iter().map(|f| (f.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(), f)).collect();
        crate::fetch::sha256_named(&named)
    }
}

/// Turn a `--model` argument into a local source.
pub fn resolve(spec: &str) -> Result<ModelSource> {
    if let Some(rest) = spec.strip_prefix("synthetic:") {
        if let Some((name, text)) = SYNTHETIC.iter().find(|(n, _)| *n == rest) {
            return Ok(ModelSource::Synthetic { name: name.to_string(), config: text.to_string() });
        }
        let p = Path::new(rest);
        let file = if p.is_dir() { p.join("config.json") } else { p.to_path_buf() };
        if !file.is_file() {
            let known: Vec<&str> = SYNTHETIC.iter().map(|(n, _)| *n).collect();
            return Err(Error::ModelSpec { spec: spec.into(), msg: format!("names neither a known configuration ({}) nor a config.json file", known.join(", ")) });
        }
        let config = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        return Ok(ModelSource::Synthetic { name: file.display().to_string(), config });
    }
    let p = Path::new(spec);
    if p.is_dir() {
        if !p.join("config.json").is_file() {
            return Err(Error::ModelSpec { spec: spec.into(), msg: "is a directory without config.json (expected an HF model directory)".into() });
        }
        return Ok(ModelSource::HfDir(p.to_path_buf()));
    }
    if p.is_file() {
        if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            return Ok(ModelSource::Gguf(p.to_path_buf()));
        }
        if p.file_name().is_some_and(|n| n == "config.json")
            && let Some(dir) = p.parent()
        {
            return resolve(&dir.to_string_lossy());
        }
        return Err(Error::ModelSpec { spec: spec.into(), msg: "is a file but not a .gguf file (pass an HF model directory or a .gguf file)".into() });
    }
    if let Some(known) = crate::fetch::known_model(spec) {
        let path = crate::fetch::cached_path(known)?;
        if path.is_file() {
            return Ok(ModelSource::Gguf(path));
        }
        return Err(Error::ModelSpec { spec: spec.into(), msg: format!("not fetched yet; run `hyperdas fetch {}` first", known.name) });
    }
    let looks_like_hub_id = spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.starts_with('/') && !spec.contains('\\');
    if looks_like_hub_id {
        return resolve_hub(spec);
    }
    Err(Error::ModelSpec {
        spec: spec.into(),
        msg: format!("no such file or directory, and not a known model ({}) or a hub id (org/name)", crate::fetch::KNOWN_MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")),
    })
}

#[cfg(feature = "hub")]
fn resolve_hub(spec: &str) -> Result<ModelSource> {
    Ok(ModelSource::HfDir(super::hub::resolve(spec)?))
}

#[cfg(not(feature = "hub"))]
fn resolve_hub(spec: &str) -> Result<ModelSource> {
    Err(Error::ModelSpec {
        spec: spec.into(),
        msg: "looks like a hub id, but this build has no hub support (rebuild with `--features hub`), \
              and no local path of that name exists; download the model elsewhere and pass its directory or .gguf file"
            .into(),
    })
}

/// Options for [`load`].
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Dtype of the frozen weights and activations (F32, BF16, F16, or F64 for gradient checks).
    pub dtype: DType,
    /// Matmul precision of the clean passes ([`CleanMatmul`]; default f32: exact).
    pub clean_matmul: CleanMatmul,
    /// Matmul precision of the intervened pass's frozen blocks, forward and input gradient
    /// (same values; default f32).
    pub intervened_matmul: CleanMatmul,
    pub device: Device,
    pub start_token: StartToken,
    /// Show a progress bar over the blocks while loading (on a terminal only).
    pub progress: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions { dtype: DType::F32, clean_matmul: CleanMatmul::F32, intervened_matmul: CleanMatmul::F32, device: Device::Cpu, start_token: StartToken::Auto, progress: false }
    }
}

/// Matmul precision of the frozen target's **clean passes** (the hidden states HyperDAS reads
/// and the states a baseline interchanges; no gradient flows through them): `model.clean_matmul`.
///
/// * `f32`: exact.
/// * `bf16`: the linear layers' inputs and weights rounded to bf16, products summed in f32, on
///   AVX-512 BF16 ([`kernels::matmul_t_bf16`](super::kernels::matmul_t_bf16)): about twice the
///   f32 matmul speed; hidden states change at bf16 rounding (SmolLM2: 0.3 % relative at
///   its middle layer, 0.7 % after the final norm). Needs an f32 target on a CPU that has AVX-512 BF16.
/// * `auto` (runs' default): `bf16` where it applies, else `f32`.
///
/// The same choice, `model.intervened_matmul` (runs' default `auto` too), applies to the
/// intervened pass's frozen blocks (forward and input gradient; the trainable parameters and
/// their gradients stay f32). [`LoadOptions::default`] is exact (`f32` for both).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CleanMatmul {
    #[default]
    Auto,
    F32,
    Bf16,
}

impl CleanMatmul {
    /// Whether the bf16 kernels can serve a `dtype` target (on the CPU or not): only an f32
    /// target on the CPU (a bf16 target already runs in its own dtype).
    pub fn fits(dtype: DType, on_cpu: bool) -> bool {
        on_cpu && dtype == DType::F32
    }

    /// Whether the clean passes of a `dtype` target on `device` run in bf16; an error when
    /// `bf16` is asked for where it cannot run.
    pub fn resolve(self, dtype: DType, device: &Device) -> Result<bool> {
        let fits = Self::fits(dtype, device.is_cpu());
        match self {
            CleanMatmul::F32 => Ok(false),
            CleanMatmul::Auto => Ok(fits && super::kernels::bf16_matmul_available()),
            CleanMatmul::Bf16 if !fits => Err(Error::invalid(format!("model.clean_matmul = \"bf16\" needs an f32 target on the CPU (this one is {dtype:?} on {device:?}); use \"auto\" or \"f32\""))),
            CleanMatmul::Bf16 if !super::kernels::bf16_matmul_available() => Err(Error::invalid("model.clean_matmul = \"bf16\": this CPU has no AVX-512 BF16; use \"auto\" (f32 here) or \"f32\"")),
            CleanMatmul::Bf16 => Ok(true),
        }
    }
}

impl std::fmt::Display for CleanMatmul {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CleanMatmul::Auto => "auto",
            CleanMatmul::F32 => "f32",
            CleanMatmul::Bf16 => "bf16",
        })
    }
}

impl std::str::FromStr for CleanMatmul {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(CleanMatmul::Auto),
            "f32" => Ok(CleanMatmul::F32),
            "bf16" => Ok(CleanMatmul::Bf16),
            other => Err(Error::invalid(format!("clean matmul precision `{other}`: use auto, f32 or bf16"))),
        }
    }
}

/// A loaded target model and its tokenizer.
pub struct LoadedModel {
    pub model: Llama,
    pub tokenizer: TextTokenizer,
    pub source: ModelSource,
    /// A one-line description (name, architecture, size).
    pub description: String,
}

/// Load a model from a `--model` argument.
pub fn load(spec: &str, opts: &LoadOptions) -> Result<LoadedModel> {
    load_source(resolve(spec)?, opts)
}

/// A model's configuration and tokenizer without its weights (nothing of the model is
/// allocated: what `hyperdas bench train --dry-run` needs to estimate memory).
pub struct ModelShape {
    pub config: LlamaConfig,
    pub tokenizer: TextTokenizer,
}

/// The configuration and tokenizer of a `--model` argument, the start token applied; no weights
/// are read.
pub fn load_shape(spec: &str, start_token: &StartToken) -> Result<ModelShape> {
    let (config, _weights, mut tokenizer, _name) = open(&resolve(spec)?)?;
    tokenizer.set_start_token(start_token)?;
    Ok(ModelShape { config, tokenizer })
}

/// Configuration, weights (opened, not read), tokenizer and display name of a source.
fn open(source: &ModelSource) -> Result<(LlamaConfig, Weights, TextTokenizer, String)> {
    let (config, weights, tokenizer, name) = match source {
        ModelSource::HfDir(dir) => {
            let config = LlamaConfig::from_hf_file(&dir.join("config.json"))?;
            let weights = Weights::Safetensors(SafetensorsWeights::open_dir(dir)?);
            let tokenizer = TextTokenizer::from_hf_dir(dir)?;
            let name = dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            (config, weights, tokenizer, name)
        }
        ModelSource::Synthetic { name, config } => {
            let path = PathBuf::from(format!("synthetic:{name}"));
            let value: serde_json::Value = serde_json::from_str(config).map_err(|e| Error::file(&path, format!("not valid JSON: {e}")))?;
            let config = LlamaConfig::from_hf_json(&value, &path)?;
            let weights = Weights::Random(super::weights::RandomWeights::new(0, config.gemma.is_some()));
            let tokenizer = TextTokenizer::synthetic(config.vocab_size, config.bos_token_id, config.eos_token_ids.first().copied())?;
            (config, weights, tokenizer, format!("synthetic {name}"))
        }
        ModelSource::Gguf(path) => {
            let file = GgufFile::open(path)?;
            let config = config_from_gguf(&file)?;
            let tokenizer = TextTokenizer::from_gguf(&file)?;
            let name = file.opt_str("general.name")?.map(String::from).unwrap_or_else(|| path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default());
            let weights = GgufWeights::new(file, config.architecture, (config.num_attention_heads, config.num_key_value_heads));
            (config, Weights::Gguf(weights), tokenizer, name)
        }
    };
    let tokenizer_path = tokenizer.source.clone();
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(Error::file(
            &tokenizer_path,
            format!("tokenizer has {} tokens but the model's embedding has only {} rows (vocab_size): they do not belong together", tokenizer.vocab_size(), config.vocab_size),
        ));
    }
    Ok((config, weights, tokenizer, name))
}

/// Load from an already resolved source.
pub fn load_source(source: ModelSource, opts: &LoadOptions) -> Result<LoadedModel> {
    let (config, weights, mut tokenizer, name) = open(&source)?;
    if let Some(cap) = config.gemma.as_ref().and_then(|g| g.attn_logit_softcapping).filter(|_| config.architecture == Architecture::Gemma3) {
        tracing::info!("note: {source}: attn_logit_softcapping = {cap} is ignored, as transformers and llama.cpp ignore it for Gemma 3 (only Gemma 2 applies it)");
    }
    tokenizer.set_start_token(&opts.start_token)?;
    let pb = crate::progress::bar(config.num_hidden_layers as u64, "loading blocks [{bar:30}] {pos}/{len} {elapsed}", opts.progress);
    let mut model = Llama::load_with_progress(&weights, &config, opts.dtype, &opts.device, &pb)?;
    model.set_clean_matmul(opts.clean_matmul)?;
    model.set_intervened_matmul(opts.intervened_matmul)?;
    let description = format!(
        "{name}: {:?}, {} blocks, d={}, {} heads ({} kv), vocab {}, {:.1}M parameters, {:?}",
        config.architecture,
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.vocab_size,
        config.num_parameters() as f64 / 1e6,
        opts.dtype
    );
    Ok(LoadedModel { model, tokenizer, source, description })
}

/// Model configuration from GGUF metadata (`{arch}.*` keys, llama.cpp's names).
pub fn config_from_gguf(g: &GgufFile) -> Result<LlamaConfig> {
    let path = &g.path;
    let arch = g.get_str("general.architecture")?.to_string();
    let architecture = match arch.as_str() {
        "llama" => Architecture::Llama,
        "qwen2" => Architecture::Qwen2,
        "qwen3" => Architecture::Qwen3,
        "gemma3" => Architecture::Gemma3,
        "gemma2" => Architecture::Gemma2,
        "olmo2" => Architecture::Olmo2,
        "phi3" => Architecture::Phi3,
        "gpt2" => Architecture::Gpt2,
        "gptneox" => Architecture::GptNeox,
        other => {
            return Err(Error::key(
                path,
                "general.architecture",
                format!("`{other}` is not supported (supported GGUF architectures: llama, qwen2, qwen3, gemma2, gemma3, olmo2, phi3, gpt2, gptneox)"),
            ));
        }
    };
    let need = |k: &str| -> Result<usize> {
        let key = format!("{arch}.{k}");
        g.opt_u64(&key)?.map(|v| v as usize).ok_or_else(|| Error::key(path, key, "missing from the GGUF metadata"))
    };
    let opt = |k: &str| -> Result<Option<usize>> { Ok(g.opt_u64(&format!("{arch}.{k}"))?.map(|v| v as usize)) };
    let hidden_size = need("embedding_length")?;
    let heads = need("attention.head_count")?;
    let kv_heads = opt("attention.head_count_kv")?.unwrap_or(heads);
    let head_dim = match opt("attention.key_length")? {
        Some(h) => h,
        None if heads > 0 && hidden_size % heads == 0 => hidden_size / heads,
        None => return Err(Error::key(path, format!("{arch}.attention.head_count"), format!("embedding_length {hidden_size} is not divisible by {heads} heads"))),
    };
    // Partial rotary embeddings (GPT-NeoX, Phi-4-mini); GPT-2 has none.
    let rotary_dims = match architecture {
        Architecture::Gpt2 => 0,
        _ => opt("rope.dimension_count")?.unwrap_or(head_dim),
    };
    if rotary_dims != head_dim && !matches!(architecture, Architecture::GptNeox | Architecture::Phi3 | Architecture::Gpt2) {
        return Err(Error::key(path, format!("{arch}.rope.dimension_count"), format!("partial rotary embeddings ({rotary_dims} of {head_dim} dims) are supported for gptneox and phi3, not `{arch}`")));
    }
    let embd = g.shape("token_embd.weight")?;
    if embd.len() != 2 || embd[1] != hidden_size {
        return Err(Error::tensor(path, "token_embd.weight", format!("shape {embd:?} does not match embedding_length {hidden_size}")));
    }
    let vocab_size = embd[0];
    let theta = g.opt_f64(&format!("{arch}.rope.freq_base"))?.unwrap_or(10_000.0);
    let scaling = if g.tensors.contains_key("rope_factors_long.weight") {
        // Phi 3 128k's longrope: the divisors as tensors, the switch point and scale as metadata.
        let factors = |t: &str| -> Result<Vec<f32>> { Ok(g.dequantize(t)?.flatten_all()?.to_vec1::<f32>()?) };
        let max = opt("context_length")?.unwrap_or(4096);
        let original = opt("rope.scaling.original_context_length")?.unwrap_or(max);
        let s = max as f64 / original.max(1) as f64;
        let attention_factor = match g.opt_f64(&format!("{arch}.rope.scaling.attn_factor"))? {
            Some(a) => a,
            None if s <= 1.0 => 1.0,
            None => (1.0 + s.ln() / (original as f64).ln()).sqrt(),
        };
        RopeScaling::LongRope { short: factors("rope_factors_short.weight")?, long: factors("rope_factors_long.weight")?, original_max_position_embeddings: original, attention_factor }
    } else if g.tensors.contains_key("rope_freqs.weight") {
        let f = g.dequantize("rope_freqs.weight")?.flatten_all()?.to_vec1::<f32>()?;
        RopeScaling::Factors(f)
    } else {
        match g.opt_str(&format!("{arch}.rope.scaling.type"))? {
            None | Some("none") => RopeScaling::None,
            Some("linear") => {
                let key = format!("{arch}.rope.scaling.factor");
                RopeScaling::Linear { factor: g.opt_f64(&key)?.ok_or_else(|| Error::key(path, key, "missing for linear rope scaling"))? }
            }
            Some(other) => return Err(Error::key(path, format!("{arch}.rope.scaling.type"), format!("`{other}` is not supported (supported: none, linear, llama3 via rope_freqs)"))),
        }
    };
    let ids = |k: &str| -> Result<Option<u32>> { Ok(g.opt_u64(k)?.map(|v| v as u32)) };
    let n_layers = need("block_count")?;
    let gemma = if architecture == Architecture::Gemma2 {
        // llama.cpp's Gemma 2: sliding and global layers alternate, sliding first; scores scaled
        // by 1/√head_dim, except the 27B (46 blocks), whose query_pre_attn_scalar is D / heads.
        let key = format!("{arch}.attention.sliding_window");
        let window = g.opt_u64(&key)?.ok_or_else(|| Error::key(path, key, "missing from the GGUF metadata (Gemma 2 needs its sliding window)"))?;
        let rope = RopeConfig { theta, scaling: RopeScaling::None };
        Some(Gemma3Config {
            layer_types: (0..n_layers).map(|i| if i % 2 == 0 { LayerKind::Sliding } else { LayerKind::Full }).collect(),
            sliding_window: window as usize,
            local_rope: rope,
            query_pre_attn_scalar: if n_layers == 46 { (hidden_size / heads.max(1)) as f64 } else { head_dim as f64 },
            attn_logit_softcapping: g.opt_f64(&format!("{arch}.attn_logit_softcapping"))?,
            final_logit_softcapping: g.opt_f64(&format!("{arch}.final_logit_softcapping"))?,
        })
    } else if architecture == Architecture::Gemma3 {
        // llama.cpp and transformers fix what the file does not say: every 6th layer global,
        // local RoPE base 10 000, query_pre_attn_scalar 256 (transformers' default, which
        // equals head_dim for every released Gemma 3 but the 27B).
        let pattern = opt("attention.sliding_window_pattern")?.unwrap_or(6).max(1);
        let key = format!("{arch}.attention.sliding_window");
        let window = g.opt_u64(&key)?.ok_or_else(|| Error::key(path, key, "missing from the GGUF metadata (Gemma 3 needs its sliding window)"))?;
        Some(Gemma3Config {
            layer_types: (0..n_layers).map(|i| if (i + 1) % pattern == 0 { LayerKind::Full } else { LayerKind::Sliding }).collect(),
            sliding_window: window as usize,
            local_rope: RopeConfig { theta: g.opt_f64(&format!("{arch}.rope.freq_base_swa"))?.unwrap_or(10_000.0), scaling: RopeScaling::None },
            query_pre_attn_scalar: 256.0,
            attn_logit_softcapping: g.opt_f64(&format!("{arch}.attn_logit_softcapping"))?,
            final_logit_softcapping: g.opt_f64(&format!("{arch}.final_logit_softcapping"))?,
        })
    } else {
        None
    };
    let gpt_family = matches!(architecture, Architecture::Gpt2 | Architecture::GptNeox);
    let has = |t: &str| g.tensors.contains_key(t);
    // GPT-2's converter writes 4·D whatever n_inner says: the MLP's own shape decides.
    let intermediate_size = match (architecture, g.shape("blk.0.ffn_up.weight")) {
        (Architecture::Gpt2, Ok([f, _])) => *f,
        _ => need("feed_forward_length")?,
    };
    let eps_key = if gpt_family { "attention.layer_norm_epsilon" } else { "attention.layer_norm_rms_epsilon" };
    let qk_norm = match g.shape("blk.0.attn_q_norm.weight") {
        Ok([n]) if *n == heads * head_dim && heads > 1 => QkNorm::Whole, // OLMo 2: over the whole projection
        Ok(_) => QkNorm::PerHead,
        Err(_) => QkNorm::None,
    };
    let cfg = LlamaConfig {
        architecture,
        vocab_size,
        hidden_size,
        intermediate_size,
        num_hidden_layers: n_layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: g.opt_f64(&format!("{arch}.{eps_key}"))?.unwrap_or(if matches!(architecture, Architecture::Gemma3 | Architecture::Gemma2) { 1e-6 } else { 1e-5 }),
        rope: RopeConfig { theta, scaling },
        max_position_embeddings: opt("context_length")?.unwrap_or(4096),
        tie_word_embeddings: !has("output.weight"),
        qkv_bias: has("blk.0.attn_q.bias") || has("blk.0.attn_qkv.bias"),
        o_bias: has("blk.0.attn_output.bias"),
        mlp_bias: has("blk.0.ffn_up.bias"),
        bos_token_id: ids("tokenizer.ggml.bos_token_id")?,
        eos_token_ids: ids("tokenizer.ggml.eos_token_id")?.into_iter().collect(),
        pad_token_id: ids("tokenizer.ggml.padding_token_id")?,
        // GPT-NeoX: the exact GELU of its HF definition (llama.cpp computes the tanh approximation).
        hidden_act: match architecture {
            Architecture::Gemma2 | Architecture::Gemma3 | Architecture::Gpt2 => Activation::GeluTanh,
            Architecture::GptNeox => Activation::Gelu,
            _ => Activation::Silu,
        },
        qk_norm,
        // llama.cpp writes Mistral as `llama` and does not record its window; Phi 3's is recorded.
        sliding_window: if architecture == Architecture::Phi3 { opt("attention.sliding_window")?.filter(|&w| w > 0) } else { None },
        gemma,
        rotary_dims,
        gpt: match architecture {
            Architecture::Gpt2 => Some(GptConfig { learned_positions: true, parallel_residual: false, scale_by_inverse_layer: false }),
            Architecture::GptNeox => {
                Some(GptConfig { learned_positions: false, parallel_residual: g.opt_bool(&format!("{arch}.use_parallel_residual"))?.unwrap_or(true), scale_by_inverse_layer: false })
            }
            _ => None,
        },
    };
    cfg.validate().map_err(|(key, msg)| Error::key(path, format!("{arch}.{key}"), msg))?;
    Ok(cfg)
}

/// Parse a device as users write it: `cpu`, `cuda` (device 0) or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    let ordinal = match s {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(n) => n,
            None => return Err(Error::invalid(format!("unknown device `{s}` (expected cpu, cuda or cuda:N)"))),
        },
    };
    if !cfg!(feature = "cuda") {
        return Err(Error::invalid(format!("device `{s}` needs a build with CUDA support: `cargo build --release --features cuda` (see docs/gpu.md)")));
    }
    // One handle per ordinal for the whole process: candle gives every `new_cuda` call its own
    // device id and refuses to mix their tensors, and a sweep hands its state cache from run to run.
    static OPENED: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<usize, Device>>> = std::sync::OnceLock::new();
    let mut opened = OPENED.get_or_init(Default::default).lock().map_err(|_| Error::invalid("the CUDA device table is poisoned"))?;
    if let Some(d) = opened.get(&ordinal) {
        return Ok(d.clone());
    }
    let d = Device::new_cuda(ordinal).map_err(|e| Error::invalid(format!("cannot open CUDA device {ordinal}: {e}")))?;
    opened.insert(ordinal, d.clone());
    Ok(d)
}

/// Parse a dtype name as users write it.
pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" | "half" => DType::F16,
        "f64" | "float64" => DType::F64,
        other => return Err(Error::invalid(format!("unknown dtype `{other}` (expected f32, bf16, f16 or f64)"))),
    })
}
