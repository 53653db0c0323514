//! A Llama-family decoder written only from differentiable candle ops, with residual-stream
//! access for interventions.
//!
//! ```text
//! h_0     = embed_tokens[ids]                                   [B, T, D]
//! a_l     = h_l + o_proj(Attn(rope(q), rope(k), v; mask))(RMSNorm_in(h_l))
//! h_{l+1} = a_l + down(silu(gate(x)) ⊙ up(x)),  x = RMSNorm_post(a_l)
//! h_final = RMSNorm_final(h_L)                                   (HF's hidden_states[L])
//! logits  = h_final · lm_headᵀ                                    [B, K, V], only where asked
//! ```
//!
//! RMSNorm(x) = w ⊙ x / sqrt(mean(x²) + ε), computed in f32 for half-precision inputs and cast
//! back before the weight, as transformers does. Attention is causal GQA (query head h uses
//! key/value head h / (H / H_kv)) with a padding mask; softmax in f32 for half inputs.
//!
//! Why composed ops: candle's fused `softmax_last_dim`, `rms_norm` and `rope` have no backward
//! and silently drop gradients (docs/parity.md, "Gradients"). The weights here are plain
//! tensors, not `Var`s, so the model is frozen, but gradients flow *through* it to any `Var`
//! mixed into the residual stream (tests/gradients.rs checks this by finite differences).
//!
//! Tensor names mirror HF (`model.layers.{l}.self_attn.q_proj.weight`, ...).
//!
//! **Gemma 3** runs on the same types with the extras of [`Gemma3Config`](super::config::Gemma3Config)
//! switched on: `√D`-scaled embeddings, `(1 + w)` norms (stored here as the multiplier `1 + w`),
//! per-head q/k norms, a norm after attention and around the MLP, GeGLU, sliding-window layers
//! with their own RoPE base, optional final-logit soft-capping. The interpretability API is unchanged.

use candle_core::{DType, Device, Tensor};

use super::batch::{ForwardContext, TokenBatch};
use super::config::{Activation, LayerKind, LlamaConfig};
use super::kernels;
use super::rope::Rope;
use super::site::Site;
use super::weights::Weights;
use crate::error::{Error, Result};

pub use super::kernels::accum_dtype;

/// Softmax over the last dimension ([`kernels::softmax_masked`] without a mask: fused on the
/// CPU, composed elsewhere; both have a backward).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    kernels::softmax_masked(x, None)
}

/// `y = x Wᵀ + b` over the last dimension, with `W` stored `[out, in]` as in PyTorch.
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    pub fn load(w: &Weights, prefix: &str, out_f: usize, in_f: usize, bias: bool, dtype: DType, dev: &Device) -> Result<Self> {
        let weight = w.get(&format!("{prefix}.weight"), &[out_f, in_f], dtype, dev)?;
        let bias = if bias { Some(w.get(&format!("{prefix}.bias"), &[out_f], dtype, dev)?) } else { None };
        Ok(Linear { weight, bias })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_f = *dims.last().ok_or_else(|| Error::invalid("linear layer on a scalar"))?;
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, in_f))?; // [N, in]
        let mut y = kernels::matmul_t(&x2, &self.weight)?; // [N, out]
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?; // [N, out]
        }
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.weight.dim(0)?;
        Ok(y.reshape(out_dims)?) // [.., out]
    }
}

/// Root-mean-square layer norm with a learned scale (no bias).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    /// The multiplier: HF's `weight` for Llama, `1 + weight` for Gemma (the GGUF spelling).
    pub weight: Tensor,
    pub eps: f64,
}

impl RmsNorm {
    pub fn load(w: &Weights, name: &str, d: usize, eps: f64, dtype: DType, dev: &Device) -> Result<Self> {
        Ok(RmsNorm { weight: w.get(name, &[d], dtype, dev)?, eps })
    }

    /// Load a norm of the model `c`: Gemma's `(1 + w)` scale is formed once here (in f32,
    /// as transformers does, then cast).
    pub fn load_for(w: &Weights, name: &str, d: usize, c: &LlamaConfig, dtype: DType, dev: &Device) -> Result<Self> {
        if c.gemma.is_none() {
            return Self::load(w, name, d, c.rms_norm_eps, dtype, dev);
        }
        let raw = w.get(name, &[d], DType::F32, dev)?; // [d]
        Ok(RmsNorm { weight: raw.affine(1.0, 1.0)?.to_dtype(dtype)?, eps: c.rms_norm_eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        kernels::rms_norm(x, &self.weight, self.eps) // [.., D]
    }
}

/// Causal multi-head attention with grouped key/value heads.
#[derive(Debug, Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Gemma 3: RMSNorm over each head of q and k `[.., hd]`, before RoPE.
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    /// Extra factor on q when the score scale is not `1/√hd` (Gemma 3: `√(hd / query_pre_attn_scalar)`).
    pub q_scale: Option<f64>,
}

impl Attention {
    /// A Llama attention from its four projections (no q/k norms, `1/√hd` scores, no cap).
    pub fn plain(q_proj: Linear, k_proj: Linear, v_proj: Linear, o_proj: Linear, n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        Attention { q_proj, k_proj, v_proj, o_proj, n_heads, n_kv_heads, head_dim, q_norm: None, k_norm: None, q_scale: None }
    }

    fn load(w: &Weights, prefix: &str, c: &LlamaConfig, dtype: DType, dev: &Device) -> Result<Self> {
        let (d, hd) = (c.hidden_size, c.head_dim);
        let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let (q_norm, k_norm, q_scale) = match &c.gemma {
            None => (None, None, None),
            Some(g) => {
                let s = (hd as f64 / g.query_pre_attn_scalar).sqrt();
                (
                    Some(RmsNorm::load_for(w, &format!("{prefix}.q_norm.weight"), hd, c, dtype, dev)?),
                    Some(RmsNorm::load_for(w, &format!("{prefix}.k_norm.weight"), hd, c, dtype, dev)?),
                    (s != 1.0).then_some(s),
                )
            }
        };
        Ok(Attention {
            q_norm,
            k_norm,
            q_scale,
            q_proj: Linear::load(w, &format!("{prefix}.q_proj"), q, d, c.qkv_bias, dtype, dev)?,
            k_proj: Linear::load(w, &format!("{prefix}.k_proj"), kv, d, c.qkv_bias, dtype, dev)?,
            v_proj: Linear::load(w, &format!("{prefix}.v_proj"), kv, d, c.qkv_bias, dtype, dev)?,
            o_proj: Linear::load(w, &format!("{prefix}.o_proj"), d, q, c.o_bias, dtype, dev)?,
            n_heads: c.num_attention_heads,
            n_kv_heads: c.num_key_value_heads,
            head_dim: hd,
        })
    }

    /// Causal self-attention over a left-padded batch: `[B, T, D]` → `[B, T, D]`.
    pub fn forward(&self, x: &Tensor, ctx: &ForwardContext) -> Result<Tensor> {
        self.attend(x, x, (&ctx.cos, &ctx.sin), (&ctx.cos, &ctx.sin), &ctx.mask)
    }

    /// General attention: `x [B, T_q, D]` attends to `kv [B, T_k, D]` (the same tensor for
    /// self-attention, another for cross-attention), with RoPE tables `[B, 1, T, hd]` for the
    /// queries and the keys and an additive `mask` broadcastable to `[B, H, T_q, T_k]`.
    ///
    /// When `kv` is a constant (the frozen target's hidden states, read by the hypernetwork)
    /// and the key/value projections are trainable, projections and attention run as one node,
    /// [`kernels::cross_attention`], whose backward gives only the weight gradients the graph
    /// needs: the keys and values `[B, Hkv, T_k, hd]` (`T_k` = tokens × (L+1) there, the
    /// hypernetwork's largest tensors) never become graph nodes.
    pub fn attend(&self, x: &Tensor, kv: &Tensor, q_rope: (&Tensor, &Tensor), k_rope: (&Tensor, &Tensor), mask: &Tensor) -> Result<Tensor> {
        let q = self.queries(x, q_rope)?; // [B, H, Tq, hd]
        let mask = mask.to_dtype(accum_dtype(q.dtype()))?.broadcast_as((q.dim(0)?, 1, mask.dim(2)?, kv.dim(1)?))?; // [B, 1, Tq|1, Tk]
        let (k_w, v_w) = (&self.k_proj.weight, &self.v_proj.weight);
        let plain = self.k_proj.bias.is_none() && self.v_proj.bias.is_none() && self.k_norm.is_none();
        let fused = if plain && !kv.track_op() && k_w.track_op() && v_w.track_op() { kernels::cross_attention(&q, k_w, v_w, kv, k_rope, &mask, self.n_kv_heads)? } else { None };
        let out = match fused {
            Some(out) => out, // [B, Tq, H·hd]
            None => {
                let (k, v) = self.keys_values(kv, k_rope)?; // [B, Hkv, Tk, hd] each
                kernels::attention(&q, &k, &v, &mask)? // [B, Tq, H·hd]
            }
        };
        self.o_proj.forward(&out) // [B, Tq, D]
    }

    /// Self-attention of `x [B, T, D]` that also sees `past` keys and values (`[B|1, Hkv, P, hd]`
    /// each, RoPE'd, from an earlier stretch of the same sequences: a shared prompt prefix).
    /// `rope` holds the tables of `x`'s own positions `[B, 1, T, hd]`, `mask` is additive
    /// `[B, 1, T, P + T]`. Returns the output `[B, T, D]` and `x`'s own keys and values
    /// `[B, Hkv, T, hd]`, so a prefix run once can serve many continuations
    /// ([`super::prefix`]). With `past = None` this is [`forward`](Self::forward) on the composed path.
    pub fn forward_with_past(&self, x: &Tensor, rope: (&Tensor, &Tensor), mask: &Tensor, past: Option<(&Tensor, &Tensor)>) -> Result<(Tensor, (Tensor, Tensor))> {
        let b = x.dim(0)?;
        let q = self.queries(x, rope)?; // [B, H, T, hd]
        let (k_new, v_new) = self.keys_values(x, rope)?; // [B, Hkv, T, hd] each
        let (k, v) = match past {
            None => (k_new.clone(), v_new.clone()),
            Some((pk, pv)) => {
                let widen = |p: &Tensor| -> Result<Tensor> { Ok(p.broadcast_as((b, p.dim(1)?, p.dim(2)?, p.dim(3)?))?) }; // [B, Hkv, P, hd]
                (Tensor::cat(&[&widen(pk)?, &k_new], 2)?, Tensor::cat(&[&widen(pv)?, &v_new], 2)?) // [B, Hkv, P+T, hd] each
            }
        };
        let mask = mask.to_dtype(accum_dtype(q.dtype()))?; // [B, 1, T, P+T]
        let out = kernels::attention(&q, &k, &v, &mask)?; // [B, T, H·hd]
        Ok((self.o_proj.forward(&out)?, (k_new, v_new))) // [B, T, D]
    }

    /// RoPE'd keys and values of `kv [B, T_k, D]`: `[B, Hkv, T_k, hd]` each.
    fn keys_values(&self, kv: &Tensor, k_rope: (&Tensor, &Tensor)) -> Result<(Tensor, Tensor)> {
        let (b, tk, _) = kv.dims3()?;
        let (hkv, hd) = (self.n_kv_heads, self.head_dim);
        let heads = |y: Tensor| -> Result<Tensor> { Ok(y.reshape((b, tk, hkv, hd))?.transpose(1, 2)?.contiguous()?) }; // [B, Hkv, T_k, hd]
        let mut k = heads(self.k_proj.forward(kv)?)?; // [B, Hkv, T_k, hd]
        if let Some(n) = &self.k_norm {
            k = n.forward(&k)?; // [B, Hkv, T_k, hd]
        }
        let k = kernels::rope(&k, k_rope.0, k_rope.1)?; // [B, Hkv, T_k, hd]
        let v = heads(self.v_proj.forward(kv)?)?; // [B, Hkv, T_k, hd]
        Ok((k, v))
    }

    /// The queries of `x [B, T_q, D]`: projected, normed (Gemma 3), RoPE'd, scaled: `[B, H, T_q, hd]`.
    fn queries(&self, x: &Tensor, q_rope: (&Tensor, &Tensor)) -> Result<Tensor> {
        let (b, tq, _) = x.dims3()?;
        let (h, hd) = (self.n_heads, self.head_dim);
        let mut q = self.q_proj.forward(x)?.reshape((b, tq, h, hd))?.transpose(1, 2)?.contiguous()?; // [B, H, Tq, hd]
        if let Some(n) = &self.q_norm {
            q = n.forward(&q)?; // [B, H, Tq, hd]
        }
        let mut q = kernels::rope(&q, q_rope.0, q_rope.1)?; // [B, H, Tq, hd]
        if let Some(s) = self.q_scale {
            q = (q * s)?; // [B, H, Tq, hd]: scores come out scaled by 1/√query_pre_attn_scalar
        }
        Ok(q)
    }
}

/// Gated feed-forward: `down(act(gate(x)) ⊙ up(x))`, SwiGLU (`act = silu`) or GeGLU (`gelu_tanh`).
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub act: Activation,
}

impl Mlp {
    fn load(w: &Weights, prefix: &str, c: &LlamaConfig, dtype: DType, dev: &Device) -> Result<Self> {
        let (d, f) = (c.hidden_size, c.intermediate_size);
        Ok(Mlp {
            act: c.hidden_act,
            gate_proj: Linear::load(w, &format!("{prefix}.gate_proj"), f, d, c.mlp_bias, dtype, dev)?,
            up_proj: Linear::load(w, &format!("{prefix}.up_proj"), f, d, c.mlp_bias, dtype, dev)?,
            down_proj: Linear::load(w, &format!("{prefix}.down_proj"), d, f, c.mlp_bias, dtype, dev)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate_proj.forward(x)?; // [B, T, F]
        let u = self.up_proj.forward(x)?; // [B, T, F]
        let h = match self.act {
            Activation::Silu => kernels::silu_mul(&g, &u)?,     // [B, T, F]
            Activation::GeluTanh => kernels::gelu_mul(&g, &u)?, // [B, T, F]
        };
        self.down_proj.forward(&h) // [B, T, D]
    }
}

/// One pre-norm decoder block.
#[derive(Debug, Clone)]
pub struct Block {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    /// The norm before the MLP: HF `post_attention_layernorm` in Llama, `pre_feedforward_layernorm` in Gemma 3.
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
    /// Gemma 3: the norm on the attention output before the residual add (HF `post_attention_layernorm`).
    pub attn_output_norm: Option<RmsNorm>,
    /// Gemma 3: the norm on the MLP output (HF `post_feedforward_layernorm`).
    pub mlp_output_norm: Option<RmsNorm>,
    /// Sliding-window attention (Gemma 3's local layers).
    pub sliding: bool,
}

impl Block {
    fn load(w: &Weights, l: usize, c: &LlamaConfig, dtype: DType, dev: &Device) -> Result<Self> {
        let p = format!("model.layers.{l}");
        let d = c.hidden_size;
        let norm = |name: &str| RmsNorm::load_for(w, &format!("{p}.{name}.weight"), d, c, dtype, dev);
        let self_attn = Attention::load(w, &format!("{p}.self_attn"), c, dtype, dev)?;
        let mlp = Mlp::load(w, &format!("{p}.mlp"), c, dtype, dev)?;
        Ok(match &c.gemma {
            None => Block {
                input_layernorm: norm("input_layernorm")?,
                self_attn,
                post_attention_layernorm: norm("post_attention_layernorm")?,
                mlp,
                attn_output_norm: None,
                mlp_output_norm: None,
                sliding: false,
            },
            Some(g) => Block {
                input_layernorm: norm("input_layernorm")?,
                self_attn,
                post_attention_layernorm: norm("pre_feedforward_layernorm")?,
                mlp,
                attn_output_norm: Some(norm("post_attention_layernorm")?),
                mlp_output_norm: Some(norm("post_feedforward_layernorm")?),
                sliding: g.layer_types[l] == LayerKind::Sliding,
            },
        })
    }

    /// `[B, T, D]` → `[B, T, D]`.
    pub fn forward(&self, x: &Tensor, ctx: &ForwardContext) -> Result<Tensor> {
        let (mask, cos, sin) = ctx.tables(self.sliding);
        self.around_attention(x, |h| self.self_attn.attend(h, h, (cos, sin), (cos, sin), mask))
    }

    /// [`forward`](Self::forward) after `past` keys and values of this block (see
    /// [`Attention::forward_with_past`]); `tables` are `(mask [B, 1, T, P+T], cos, sin)` for this
    /// block's kind (global or sliding). Returns the output `[B, T, D]` and `x`'s own keys and values.
    pub fn forward_with_past(&self, x: &Tensor, tables: (&Tensor, &Tensor, &Tensor), past: Option<(&Tensor, &Tensor)>) -> Result<(Tensor, (Tensor, Tensor))> {
        let (mask, cos, sin) = tables;
        let mut kv = None;
        let out = self.around_attention(x, |h| {
            let (a, new) = self.self_attn.forward_with_past(h, (cos, sin), mask, past)?; // [B, T, D]
            kv = Some(new);
            Ok(a)
        })?;
        let kv = kv.ok_or_else(|| Error::invalid("attention produced no keys"))?;
        Ok((out, kv))
    }

    /// The block around its attention: `x + norms(attend(RMSNorm_in(x)))`, then the MLP residual.
    fn around_attention(&self, x: &Tensor, attend: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?; // [B, T, D]
        let mut a = attend(&h)?; // [B, T, D]
        if let Some(n) = &self.attn_output_norm {
            a = n.forward(&a)?; // [B, T, D]
        }
        let a = (x + a)?; // [B, T, D]
        let mut m = self.mlp.forward(&self.post_attention_layernorm.forward(&a)?)?; // [B, T, D]
        if let Some(n) = &self.mlp_output_norm {
            m = n.forward(&m)?; // [B, T, D]
        }
        Ok((&a + m)?) // [B, T, D]
    }
}

/// Hidden states from a clean pass (see [`Llama::forward_hidden`]).
#[derive(Debug, Clone)]
pub struct HiddenStates {
    /// `[B, T, n, D]`: the requested hidden-state indices, stacked on axis 2 in request order.
    pub stacked: Option<Tensor>,
    /// The hidden-state indices in `stacked`, each in `0..=L`.
    pub indices: Vec<usize>,
    /// `[B, T, D]`: the final-norm output (index L), ready for [`Llama::logits_at`].
    pub final_normed: Tensor,
}

/// A frozen Llama-family target model.
#[derive(Debug, Clone)]
pub struct Llama {
    pub config: LlamaConfig,
    pub embed_tokens: Tensor, // [V, D]
    pub layers: Vec<Block>,
    pub norm: RmsNorm,
    pub lm_head: Tensor, // [V, D] (the embedding itself when tied)
    rope: Rope,
    /// Gemma 3's sliding layers: their RoPE and window.
    local: Option<(Rope, usize)>,
    /// Gemma: embeddings are multiplied by √D (rounded to the model dtype, as transformers does).
    embed_scale: Option<f64>,
    dtype: DType,
    device: Device,
}

impl Llama {
    /// Build from weights addressed by HF names; every tensor's shape is checked.
    pub fn load(w: &Weights, config: &LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with_progress(w, config, dtype, device, &indicatif::ProgressBar::hidden())
    }

    /// [`load`](Self::load), advancing `progress` by one per block.
    pub fn load_with_progress(w: &Weights, config: &LlamaConfig, dtype: DType, device: &Device, progress: &indicatif::ProgressBar) -> Result<Self> {
        let (v, d) = (config.vocab_size, config.hidden_size);
        let embed_tokens = w.get("model.embed_tokens.weight", &[v, d], dtype, device)?;
        progress.set_length(config.num_hidden_layers as u64);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            layers.push(Block::load(w, l, config, dtype, device)?);
            progress.inc(1);
        }
        progress.finish_and_clear();
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.clone()
        } else if w.contains("lm_head.weight") {
            w.get("lm_head.weight", &[v, d], dtype, device)?
        } else {
            return Err(Error::tensor(w.path_of("lm_head.weight"), "lm_head.weight", "missing, and the config does not tie it to the embedding (tie_word_embeddings is false)"));
        };
        let norm = RmsNorm::load_for(w, "model.norm.weight", d, config, dtype, device)?;
        let local = config.gemma.as_ref().map(|g| (Rope::new(&g.local_rope, config.head_dim), g.sliding_window));
        let embed_scale = config.gemma.as_ref().map(|_| (d as f64).sqrt());
        Ok(Llama { config: config.clone(), embed_tokens, layers, norm, lm_head, rope: Rope::new(&config.rope, config.head_dim), local, embed_scale, dtype, device: device.clone() })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Number of blocks L.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// Gemma 3's sliding layers: their RoPE and window (`None` for models without them).
    pub fn local_attention(&self) -> Option<(&Rope, usize)> {
        self.local.as_ref().map(|(r, w)| (r, *w))
    }

    /// Attention mask and rotary tables for a batch (compute once, reuse for every block).
    pub fn context(&self, batch: &TokenBatch) -> Result<ForwardContext> {
        let ctx = ForwardContext::new(batch, &self.rope, self.dtype, accum_dtype(self.dtype), &self.device)?;
        match &self.local {
            None => Ok(ctx),
            Some((rope, window)) => ctx.with_local(batch, *window, rope, self.dtype, accum_dtype(self.dtype), &self.device),
        }
    }

    /// The factor on the token embeddings (`√D` for Gemma), if any.
    pub fn embed_scale(&self) -> Option<f64> {
        self.embed_scale
    }

    /// Every weight tensor with its HF name (the tied `lm_head` is listed once, as the embedding).
    /// Norms are listed as their multipliers (for Gemma 3, `1 + w`).
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out: Vec<(String, &Tensor)> = vec![("model.embed_tokens.weight".into(), &self.embed_tokens)];
        for (i, b) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), &b.input_layernorm.weight));
            match (&b.attn_output_norm, &b.mlp_output_norm) {
                (Some(post_attn), Some(post_ffw)) => {
                    out.push((format!("{p}.post_attention_layernorm.weight"), &post_attn.weight));
                    out.push((format!("{p}.pre_feedforward_layernorm.weight"), &b.post_attention_layernorm.weight));
                    out.push((format!("{p}.post_feedforward_layernorm.weight"), &post_ffw.weight));
                }
                _ => out.push((format!("{p}.post_attention_layernorm.weight"), &b.post_attention_layernorm.weight)),
            }
            if let (Some(qn), Some(kn)) = (&b.self_attn.q_norm, &b.self_attn.k_norm) {
                out.push((format!("{p}.self_attn.q_norm.weight"), &qn.weight));
                out.push((format!("{p}.self_attn.k_norm.weight"), &kn.weight));
            }
            let linears = [
                ("self_attn.q_proj", &b.self_attn.q_proj),
                ("self_attn.k_proj", &b.self_attn.k_proj),
                ("self_attn.v_proj", &b.self_attn.v_proj),
                ("self_attn.o_proj", &b.self_attn.o_proj),
                ("mlp.gate_proj", &b.mlp.gate_proj),
                ("mlp.up_proj", &b.mlp.up_proj),
                ("mlp.down_proj", &b.mlp.down_proj),
            ];
            for (n, l) in linears {
                out.push((format!("{p}.{n}.weight"), &l.weight));
                if let Some(bias) = &l.bias {
                    out.push((format!("{p}.{n}.bias"), bias));
                }
            }
        }
        out.push(("model.norm.weight".into(), &self.norm.weight));
        if !self.config.tie_word_embeddings {
            out.push(("lm_head.weight".into(), &self.lm_head));
        }
        out
    }

    /// Token embeddings: `ids [B, T]` → `[B, T, D]`.
    pub fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let flat = input_ids.flatten_all()?; // [B·T]
        let x = self.embed_tokens.index_select(&flat, 0)?.reshape((b, t, self.config.hidden_size))?; // [B, T, D]
        match self.embed_scale {
            None => Ok(x),
            Some(s) => {
                let s = Tensor::new(s as f32, &self.device)?.to_dtype(x.dtype())?; // [] in the model dtype
                Ok(x.broadcast_mul(&s)?) // [B, T, D]
            }
        }
    }

    /// Embeddings of a batch, after checking its ids against the vocabulary on the host (the
    /// batch knows its largest id, so this costs no device work).
    pub(crate) fn embed_batch(&self, batch: &TokenBatch) -> Result<Tensor> {
        let max = batch.max_id();
        if max as usize >= self.config.vocab_size {
            return Err(Error::invalid(format!("token id {max} is outside the vocabulary of {} tokens", self.config.vocab_size)));
        }
        self.embed(&batch.input_ids) // [B, T, D]
    }

    /// Run block `l` on the residual stream `[B, T, D]`.
    pub fn block(&self, l: usize, x: &Tensor, ctx: &ForwardContext) -> Result<Tensor> {
        ctx.check(x, self.config.hidden_size)?;
        self.layers.get(l).ok_or_else(|| Error::invalid(format!("block {l} does not exist (the model has {} blocks)", self.layers.len())))?.forward(x, ctx)
    }

    /// The final RMSNorm: `[B, T, D]` → `[B, T, D]`.
    pub fn final_norm(&self, x: &Tensor) -> Result<Tensor> {
        self.norm.forward(x)
    }

    /// Clean forward pass collecting hidden states, HF-indexed: index `l < L` is the residual
    /// *entering* block `l` (`blocks.{l}.hook_resid_pre`); index `L` is the output of the final
    /// norm (`ln_final.hook_normalized`), as HF's `output_hidden_states` gives. `indices: None`
    /// collects all `L + 1`; `Some(&[])` collects none (only `final_normed`).
    pub fn forward_hidden(&self, batch: &TokenBatch, indices: Option<&[usize]>) -> Result<HiddenStates> {
        let ctx = self.context(batch)?;
        let n = self.num_layers();
        let indices: Vec<usize> = match indices {
            None => (0..=n).collect(),
            Some(ix) => {
                if let Some(&bad) = ix.iter().find(|&&i| i > n) {
                    return Err(Error::invalid(format!("hidden-state index {bad} is out of range 0..={n}")));
                }
                ix.to_vec()
            }
        };
        let mut slots: Vec<Option<Tensor>> = vec![None; n + 1];
        let mut x = self.embed_batch(batch)?; // [B, T, D]
        for (l, (slot, block)) in slots.iter_mut().zip(&self.layers).enumerate() {
            if indices.contains(&l) {
                *slot = Some(x.clone());
            }
            x = block.forward(&x, &ctx)?; // [B, T, D]
        }
        let final_normed = self.norm.forward(&x)?; // [B, T, D]
        slots[n] = Some(final_normed.clone());
        let stacked = if indices.is_empty() {
            None
        } else {
            let parts: Vec<&Tensor> = indices.iter().map(|&i| slots[i].as_ref().expect("collected above")).collect();
            Some(Tensor::stack(&parts, 2)?) // [B, T, n, D]
        };
        Ok(HiddenStates { stacked, indices, final_normed })
    }

    /// Embed `batch` and run blocks `0..l`: the residual entering block `l` `[B, T, D]`, with the
    /// batch's context for [`forward_from`](Self::forward_from) (its mirror: together they are
    /// one forward pass with an edit at layer `l` in between).
    pub fn forward_to(&self, batch: &TokenBatch, l: usize) -> Result<(Tensor, ForwardContext)> {
        let n = self.num_layers();
        if l > n {
            return Err(Error::invalid(format!("cannot stop at block {l}: the model has {n} blocks")));
        }
        let ctx = self.context(batch)?;
        let mut x = self.embed_batch(batch)?; // [B, T, D]
        for block in &self.layers[..l] {
            x = block.forward(&x, &ctx)?; // [B, T, D]
        }
        Ok((x, ctx))
    }

    /// Run blocks `l..L` and the final norm from a residual `[B, T, D]` entering block `l`
    /// (`l = L` applies only the norm). This is how an intervention at layer `l` avoids
    /// recomputing blocks `0..l`: take them from the clean pass.
    pub fn forward_from(&self, l: usize, resid: &Tensor, ctx: &ForwardContext) -> Result<Tensor> {
        let n = self.num_layers();
        if l > n {
            return Err(Error::invalid(format!("cannot start at block {l}: the model has {n} blocks")));
        }
        ctx.check(resid, self.config.hidden_size)?;
        let mut x = resid.clone(); // [B, T, D]
        for block in &self.layers[l..] {
            x = block.forward(&x, ctx)?; // [B, T, D]
        }
        self.norm.forward(&x) // [B, T, D]
    }

    /// [`forward_from`](Self::forward_from) starting at a named site.
    pub fn forward_from_site(&self, site: Site, resid: &Tensor, ctx: &ForwardContext) -> Result<Tensor> {
        match site.resolve(self.num_layers())? {
            Site::ResidPre(l) => self.forward_from(l, resid, ctx),
            Site::ResidPost(l) => self.forward_from(l + 1, resid, ctx),
            Site::FinalNorm => Ok(resid.clone()),
            Site::HiddenState(_) => unreachable!("resolve() maps hidden_states.{{i}} to another site"),
        }
    }

    /// Forward pass with a hook on the residual stream: `hook(l, x)` sees `x [B, T, D]` entering
    /// block `l` (and `l = L` for the output of the last block, before the final norm) and may
    /// return a replacement. Returns the final-norm output `[B, T, D]`.
    pub fn forward_with_hook(&self, batch: &TokenBatch, mut hook: impl FnMut(usize, &Tensor) -> Result<Option<Tensor>>) -> Result<Tensor> {
        let ctx = self.context(batch)?;
        let mut x = self.embed_batch(batch)?; // [B, T, D]
        for l in 0..=self.num_layers() {
            if let Some(new) = hook(l, &x)? {
                if new.dims() != x.dims() {
                    return Err(Error::invalid(format!("hook at layer {l} returned shape {:?}, expected {:?}", new.dims(), x.dims())));
                }
                x = new;
            }
            if l < self.num_layers() {
                x = self.layers[l].forward(&x, &ctx)?; // [B, T, D]
            }
        }
        self.norm.forward(&x)
    }

    /// Logits at chosen positions only: `final_normed [B, T, D]`, `positions [B, K]` (u32 indices
    /// into T) → `[B, K, V]`. Never materialises `[B, T, V]`.
    pub fn logits_at(&self, final_normed: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let h = rows_at(final_normed, positions)?; // [B, K, D]
        let (b, k, d) = h.dims3()?;
        let logits = h.reshape((b * k, d))?.matmul(&self.lm_head.t()?)?; // [B·K, V]
        self.softcap_logits(logits.reshape((b, k, self.config.vocab_size))?) // [B, K, V]
    }

    /// Gemma's final soft-capping `cap · tanh(logits / cap)`, when configured.
    pub fn softcap_logits(&self, logits: Tensor) -> Result<Tensor> {
        match self.config.gemma.as_ref().and_then(|g| g.final_logit_softcapping) {
            None => Ok(logits),
            Some(cap) => Ok(((logits / cap)?.tanh()? * cap)?),
        }
    }

    /// Logits at the last position of each row `[B, V]` (the last real token of a left-padded batch).
    pub fn logits_last(&self, final_normed: &Tensor) -> Result<Tensor> {
        let (b, t, _) = final_normed.dims3()?;
        let positions = Tensor::full((t - 1) as u32, (b, 1), final_normed.device())?; // [B, 1]
        Ok(self.logits_at(final_normed, &positions)?.squeeze(1)?) // [B, V]
    }

    /// Logits at every position `[B, T, V]`; use [`logits_at`](Self::logits_at) when only a few are needed.
    pub fn logits(&self, final_normed: &Tensor) -> Result<Tensor> {
        let (b, t, d) = final_normed.dims3()?;
        let logits = final_normed.reshape((b * t, d))?.matmul(&self.lm_head.t()?)?; // [B·T, V]
        self.softcap_logits(logits.reshape((b, t, self.config.vocab_size))?) // [B, T, V]
    }
}

/// Rows of `x [B, T, D]` at `positions [B, K]` (u32 indices into T) → `[B, K, D]`, checked on
/// the host. Built on `index_select`, so gradients flow to `x`.
pub fn rows_at(x: &Tensor, positions: &Tensor) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let (pb, k) = positions.dims2()?;
    if pb != b {
        return Err(Error::invalid(format!("positions cover {pb} rows, the batch has {b}")));
    }
    let pos = positions.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let mut flat = Vec::with_capacity(b * k);
    for (row, ps) in pos.iter().enumerate() {
        for &p in ps {
            if p as usize >= t {
                return Err(Error::invalid(format!("position {p} is outside the sequence length {t}")));
            }
            flat.push((row * t) as u32 + p);
        }
    }
    let idx = Tensor::from_vec(flat, b * k, x.device())?; // [B·K]
    Ok(x.reshape((b * t, d))?.index_select(&idx, 0)?.reshape((b, k, d))?) // [B, K, D]
}
