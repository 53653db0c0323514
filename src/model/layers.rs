//! The layers a decoder block is made of, each a `load` (HF tensor names) and a `forward`
//! from differentiable ops:
//!
//! ```text
//! Linear:    y = x Wᵀ + b                                        W [out, in]
//! RmsNorm:   y = w ⊙ x / √(mean(x²) + ε)                          (f32 for half inputs, as transformers)
//! LayerNorm: y = w ⊙ (x − mean(x)) / √(var(x) + ε) + b            (GPT-2, GPT-NeoX)
//! Attention: softmax(rope(q) rope(k)ᵀ / √hd + mask) v, then o_proj; causal GQA (query head h
//!            reads key/value head h / (H / H_kv)); optional per-head q/k norms (Gemma 3)
//! Mlp:       down(act(gate(x)) ⊙ up(x)),  act = silu (SwiGLU) or gelu_tanh (GeGLU);
//!            without a gate (GPT-2, GPT-NeoX) down(act(up(x))), act = gelu_tanh or gelu
//! ```

use candle_core::{DType, Device, Tensor};

use super::batch::ForwardContext;
use super::config::{Activation, Architecture, LlamaConfig, QkNorm};
use super::kernels::{self, accum_dtype};
use super::weights::Weights;
use crate::error::{Error, Result};

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
    /// The weight packed for the bf16 kernel, on first use inside [`kernels::with_frozen_bf16`].
    pub packed: kernels::PackedSlot,
    /// `Wᵀ` packed likewise, for the input gradient of the bf16 intervened pass.
    pub packed_t: kernels::PackedSlotT,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight, bias, packed: Default::default(), packed_t: Default::default() }
    }

    pub fn load(w: &Weights, prefix: &str, out_f: usize, in_f: usize, bias: bool, dtype: DType, dev: &Device) -> Result<Self> {
        let weight = w.get(&format!("{prefix}.weight"), &[out_f, in_f], dtype, dev)?;
        let bias = if bias { Some(w.get(&format!("{prefix}.bias"), &[out_f], dtype, dev)?) } else { None };
        Ok(Linear::new(weight, bias))
    }

    /// A GPT-2 `Conv1D`: the weight stored `[in, out]` (transposed here to `[out, in]`), a bias.
    pub fn load_conv1d(w: &Weights, prefix: &str, out_f: usize, in_f: usize, dtype: DType, dev: &Device) -> Result<Self> {
        let weight = w.get(&format!("{prefix}.weight"), &[in_f, out_f], dtype, dev)?.t()?.contiguous()?; // [out, in]
        Ok(Linear::new(weight, Some(w.get(&format!("{prefix}.bias"), &[out_f], dtype, dev)?)))
    }

    /// The layer with its output rows reordered: row `i` of the result is row `order[i]`.
    pub fn reorder_rows(&self, order: &[usize]) -> Result<Linear> {
        let idx = Tensor::from_vec(order.iter().map(|&i| i as u32).collect::<Vec<_>>(), order.len(), self.weight.device())?; // [n]
        let weight = self.weight.index_select(&idx, 0)?.contiguous()?; // [n, in]
        let bias = match &self.bias {
            Some(b) => Some(b.index_select(&idx, 0)?.contiguous()?), // [n]
            None => None,
        };
        Ok(Linear::new(weight, bias))
    }

    /// Output rows `start..start + n` as a layer of their own (a fused projection split).
    pub fn rows(&self, start: usize, n: usize) -> Result<Linear> {
        let weight = self.weight.narrow(0, start, n)?.contiguous()?; // [n, in]
        let bias = match &self.bias {
            Some(b) => Some(b.narrow(0, start, n)?.contiguous()?), // [n]
            None => None,
        };
        Ok(Linear::new(weight, bias))
    }

    /// Keep only the bf16 packing of the weight (the f32 weight becomes `[out, 0]` and its
    /// memory is freed): for a frozen layer that only clean passes in bf16 will run
    /// ([`Llama::release_f32_below`](super::Llama::release_f32_below)). Returns the bytes freed.
    /// With `transposed`, `Wᵀ` is packed first too (a layer the bf16 intervened pass runs
    /// backward through).
    pub fn release_f32(&mut self, transposed: bool) -> Result<usize> {
        let packed = self.packed.packing(&self.weight)?;
        let packed_t = if transposed { Some(self.packed_t.packing(&self.weight)?) } else { None };
        let bytes = self.weight.elem_count() * self.weight.dtype().size_in_bytes();
        let placeholder = Tensor::zeros((self.weight.dim(0)?, 0), self.weight.dtype(), self.weight.device())?; // [out, 0]
        self.packed = kernels::PackedSlot::holding(placeholder.id(), packed);
        if let Some(p) = packed_t {
            self.packed_t = kernels::PackedSlotT::holding(placeholder.id(), p);
        }
        self.weight = placeholder;
        Ok(bytes)
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_f = *dims.last().ok_or_else(|| Error::invalid("linear layer on a scalar"))?;
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x2 = x.reshape((rows, in_f))?; // [N, in]
        let mut y = match kernels::linear_bf16(&x2, &self.weight, &self.packed)? {
            Some(y) => y, // [N, out], frozen pass in bf16
            None if self.weight.dim(1)? == 0 && in_f > 0 => {
                return Err(Error::invalid("this linear layer's f32 weight was released (its blocks run only in bf16 clean passes); a pass that needs it must load the model again"));
            }
            None => kernels::matmul_t(&x2, &self.weight)?, // [N, out]
        };
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

/// The rows of a q or k projection of `heads` heads reordered so that RoPE over each head's
/// first `rotary_dims` dimensions runs in the full-rotary layout ([`super::rope::partial_rotary_rows`]).
pub fn partial_rotary_layout(l: &Linear, heads: usize, head_dim: usize, rotary_dims: usize) -> Result<Linear> {
    if rotary_dims == head_dim || rotary_dims == 0 {
        return Ok(l.clone());
    }
    let perm = super::rope::partial_rotary_rows(head_dim, rotary_dims);
    let order: Vec<usize> = (0..heads).flat_map(|h| perm.iter().map(move |&p| h * head_dim + p)).collect();
    l.reorder_rows(&order)
}

/// Layer norm with a learned scale and bias (GPT-2, GPT-NeoX), composed from differentiable ops
/// (candle's fused `layer_norm` drops gradients), in f32 for half inputs as transformers does.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(w: &Weights, prefix: &str, d: usize, eps: f64, dtype: DType, dev: &Device) -> Result<Self> {
        Ok(LayerNorm { weight: w.get(&format!("{prefix}.weight"), &[d], dtype, dev)?, bias: w.get(&format!("{prefix}.bias"), &[d], dtype, dev)?, eps })
    }

    /// `[.., D]` → `[.., D]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let x = x.to_dtype(accum_dtype(dt))?; // [.., D]
        let last = x.rank() - 1;
        let centred = x.broadcast_sub(&x.mean_keepdim(last)?)?; // [.., D]
        let var = centred.sqr()?.mean_keepdim(last)?; // [.., 1]
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dt)?; // [.., D]
        Ok(normed.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)?) // [.., D]
    }
}

/// The norm of a block or the final norm: RMSNorm (Llama, Gemma, ...) or LayerNorm (GPT-2, GPT-NeoX).
#[derive(Debug, Clone)]
pub enum Norm {
    Rms(RmsNorm),
    Layer(LayerNorm),
}

impl Norm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Norm::Rms(n) => n.forward(x),   // [.., D]
            Norm::Layer(n) => n.forward(x), // [.., D]
        }
    }

    /// The RMSNorm, if this is one (what the taped path and the hypernetwork's copies need).
    pub fn as_rms(&self) -> Option<&RmsNorm> {
        match self {
            Norm::Rms(n) => Some(n),
            Norm::Layer(_) => None,
        }
    }

    pub fn eps(&self) -> f64 {
        match self {
            Norm::Rms(n) => n.eps,
            Norm::Layer(n) => n.eps,
        }
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
    /// RMSNorms on q and k before RoPE: over each head `[.., hd]` (Qwen 3, Gemma 3) or over the
    /// whole projection `[.., H·hd]` (OLMo 2), as `qk_norm` says.
    pub q_norm: Option<RmsNorm>,
    pub k_norm: Option<RmsNorm>,
    pub qk_norm: QkNorm,
    /// Extra factor on q when the score scale is not `1/√hd` (Gemma: `√(hd / query_pre_attn_scalar)`).
    pub q_scale: Option<f64>,
    /// Gemma 2: scores soft-capped, `s ← cap · tanh(s / cap)`, before the mask and softmax.
    pub logit_cap: Option<f64>,
    /// RoPE on q and k (false for GPT-2, whose positions are learned embeddings).
    pub rotary: bool,
}

impl Attention {
    /// A Llama attention from its four projections (no q/k norms, `1/√hd` scores, no cap).
    pub fn plain(q_proj: Linear, k_proj: Linear, v_proj: Linear, o_proj: Linear, n_heads: usize, n_kv_heads: usize, head_dim: usize) -> Self {
        Attention { q_proj, k_proj, v_proj, o_proj, n_heads, n_kv_heads, head_dim, q_norm: None, k_norm: None, qk_norm: QkNorm::None, q_scale: None, logit_cap: None, rotary: true }
    }

    pub(super) fn load(w: &Weights, prefix: &str, c: &LlamaConfig, dtype: DType, dev: &Device) -> Result<Self> {
        let (d, hd) = (c.hidden_size, c.head_dim);
        let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let norm = |name: &str, width: usize| -> Result<Option<RmsNorm>> { Ok(Some(RmsNorm::load_for(w, &format!("{prefix}.{name}.weight"), width, c, dtype, dev)?)) };
        let (q_norm, k_norm) = match c.qk_norm {
            QkNorm::None => (None, None),
            QkNorm::PerHead => (norm("q_norm", hd)?, norm("k_norm", hd)?),
            QkNorm::Whole => (norm("q_norm", q)?, norm("k_norm", kv)?),
        };
        let q_scale = c.gemma.as_ref().map(|g| (hd as f64 / g.query_pre_attn_scalar).sqrt()).filter(|&s| s != 1.0);
        // Only Gemma 2 applies the attention cap (transformers and llama.cpp ignore it for Gemma 3).
        let logit_cap = c.gemma.as_ref().and_then(|g| g.attn_logit_softcapping).filter(|_| c.architecture == super::config::Architecture::Gemma2);
        let (q_proj, k_proj, v_proj) = if c.architecture == Architecture::Phi3 {
            // Phi 3 stores [q; k; v] as one `qkv_proj` [q + 2·kv, D]: split its rows.
            let fused = Linear::load(w, &format!("{prefix}.qkv_proj"), q + 2 * kv, d, c.qkv_bias, dtype, dev)?;
            (fused.rows(0, q)?, fused.rows(q, kv)?, fused.rows(q + kv, kv)?)
        } else {
            (
                Linear::load(w, &format!("{prefix}.q_proj"), q, d, c.qkv_bias, dtype, dev)?,
                Linear::load(w, &format!("{prefix}.k_proj"), kv, d, c.qkv_bias, dtype, dev)?,
                Linear::load(w, &format!("{prefix}.v_proj"), kv, d, c.qkv_bias, dtype, dev)?,
            )
        };
        // Phi-4-mini (`partial_rotary_factor`): q/k rows into the layout of full rotary embeddings.
        let (q_proj, k_proj) = (partial_rotary_layout(&q_proj, c.num_attention_heads, hd, c.rotary_dims)?, partial_rotary_layout(&k_proj, c.num_key_value_heads, hd, c.rotary_dims)?);
        Ok(Attention {
            rotary: true,
            q_norm,
            k_norm,
            qk_norm: c.qk_norm,
            q_scale,
            logit_cap,
            q_proj,
            k_proj,
            v_proj,
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
        let plain = self.k_proj.bias.is_none() && self.v_proj.bias.is_none() && self.k_norm.is_none() && self.logit_cap.is_none() && self.rotary;
        let fused = if plain && !kv.track_op() && k_w.track_op() && v_w.track_op() { kernels::cross_attention(&q, k_w, v_w, kv, k_rope, &mask, self.n_kv_heads)? } else { None };
        let out = match fused {
            Some(out) => out, // [B, Tq, H·hd]
            None => {
                let (k, v) = self.keys_values(kv, k_rope)?; // [B, Hkv, Tk, hd] each
                self.scores_to_output(&q, &k, &v, &mask)? // [B, Tq, H·hd]
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
        let out = self.scores_to_output(&q, &k, &v, &mask)?; // [B, T, H·hd]
        Ok((self.o_proj.forward(&out)?, (k_new, v_new))) // [B, T, D]
    }

    /// Attention of `q [B, H, Tq, hd]` over `k`, `v [B, Hkv, Tk, hd]` with the additive `mask`:
    /// `[B, Tq, H·hd]`; soft-capped scores (Gemma 2) take the composed path.
    fn scores_to_output(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
        match self.logit_cap {
            Some(cap) => kernels::attention_capped(q, k, v, mask, cap), // [B, Tq, H·hd]
            None => kernels::attention(q, k, v, mask),                  // [B, Tq, H·hd]
        }
    }

    /// RoPE'd keys and values of `kv [B, T_k, D]`: `[B, Hkv, T_k, hd]` each.
    fn keys_values(&self, kv: &Tensor, k_rope: (&Tensor, &Tensor)) -> Result<(Tensor, Tensor)> {
        let (b, tk, _) = kv.dims3()?;
        let (hkv, hd) = (self.n_kv_heads, self.head_dim);
        let heads = |y: Tensor| -> Result<Tensor> { Ok(y.reshape((b, tk, hkv, hd))?.transpose(1, 2)?.contiguous()?) }; // [B, Hkv, T_k, hd]
        let mut k = self.k_proj.forward(kv)?; // [B, T_k, Hkv·hd]
        if let (Some(n), QkNorm::Whole) = (&self.k_norm, self.qk_norm) {
            k = n.forward(&k)?; // [B, T_k, Hkv·hd]
        }
        let mut k = heads(k)?; // [B, Hkv, T_k, hd]
        if let (Some(n), QkNorm::PerHead) = (&self.k_norm, self.qk_norm) {
            k = n.forward(&k)?; // [B, Hkv, T_k, hd]
        }
        let k = if self.rotary { kernels::rope(&k, k_rope.0, k_rope.1)? } else { k }; // [B, Hkv, T_k, hd]
        let v = heads(self.v_proj.forward(kv)?)?; // [B, Hkv, T_k, hd]
        Ok((k, v))
    }

    /// The queries of `x [B, T_q, D]`: projected, normed (Gemma 3), RoPE'd, scaled: `[B, H, T_q, hd]`.
    fn queries(&self, x: &Tensor, q_rope: (&Tensor, &Tensor)) -> Result<Tensor> {
        let (b, tq, _) = x.dims3()?;
        let (h, hd) = (self.n_heads, self.head_dim);
        let mut q = self.q_proj.forward(x)?; // [B, Tq, H·hd]
        if let (Some(n), QkNorm::Whole) = (&self.q_norm, self.qk_norm) {
            q = n.forward(&q)?; // [B, Tq, H·hd]
        }
        let mut q = q.reshape((b, tq, h, hd))?.transpose(1, 2)?.contiguous()?; // [B, H, Tq, hd]
        if let (Some(n), QkNorm::PerHead) = (&self.q_norm, self.qk_norm) {
            q = n.forward(&q)?; // [B, H, Tq, hd]
        }
        let mut q = if self.rotary { kernels::rope(&q, q_rope.0, q_rope.1)? } else { q }; // [B, H, Tq, hd]
        if let Some(s) = self.q_scale {
            q = (q * s)?; // [B, H, Tq, hd]: scores come out scaled by 1/√query_pre_attn_scalar
        }
        Ok(q)
    }
}

/// Gated feed-forward: `down(act(gate(x)) ⊙ up(x))`, SwiGLU (`act = silu`) or GeGLU
/// (`gelu_tanh`); without a gate (`gate_proj: None`, GPT-2 and GPT-NeoX) `down(act(up(x)))`.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub gate_proj: Option<Linear>,
    pub up_proj: Linear,
    pub down_proj: Linear,
    pub act: Activation,
}

impl Mlp {
    pub(super) fn load(w: &Weights, prefix: &str, c: &LlamaConfig, dtype: DType, dev: &Device) -> Result<Self> {
        let (d, f) = (c.hidden_size, c.intermediate_size);
        if c.architecture == Architecture::Phi3 {
            // Phi 3 stores [gate; up] as one `gate_up_proj` [2F, D].
            let fused = Linear::load(w, &format!("{prefix}.gate_up_proj"), 2 * f, d, c.mlp_bias, dtype, dev)?;
            return Ok(Mlp {
                act: c.hidden_act,
                gate_proj: Some(fused.rows(0, f)?),
                up_proj: fused.rows(f, f)?,
                down_proj: Linear::load(w, &format!("{prefix}.down_proj"), d, f, c.mlp_bias, dtype, dev)?,
            });
        }
        Ok(Mlp {
            act: c.hidden_act,
            gate_proj: Some(Linear::load(w, &format!("{prefix}.gate_proj"), f, d, c.mlp_bias, dtype, dev)?),
            up_proj: Linear::load(w, &format!("{prefix}.up_proj"), f, d, c.mlp_bias, dtype, dev)?,
            down_proj: Linear::load(w, &format!("{prefix}.down_proj"), d, f, c.mlp_bias, dtype, dev)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let u = self.up_proj.forward(x)?; // [B, T, F]
        let h = match (&self.gate_proj, self.act) {
            (Some(gate), act) => {
                let g = gate.forward(x)?; // [B, T, F]
                match act {
                    Activation::Silu => kernels::silu_mul(&g, &u)?,     // [B, T, F]
                    Activation::GeluTanh => kernels::gelu_mul(&g, &u)?, // [B, T, F]
                    Activation::Gelu => (g.gelu_erf()? * u)?,           // [B, T, F]
                }
            }
            (None, Activation::GeluTanh) => u.gelu()?, // [B, T, F]: candle's gelu is the tanh approximation
            (None, Activation::Gelu) => u.gelu_erf()?, // [B, T, F]
            (None, Activation::Silu) => u.silu()?,     // [B, T, F]
        };
        self.down_proj.forward(&h) // [B, T, D]
    }
}
