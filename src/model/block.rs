//! One pre-norm decoder block, with both of its passes side by side:
//!
//! ```text
//! a = x + norm_a(o_proj(Attn(RMSNorm_in(x))))        norm_a: Gemma 3's post-attention norm, else identity
//! y = a + norm_m(Mlp(RMSNorm_post(a)))               norm_m: Gemma 3's post-feed-forward norm, else identity
//! y = x + Attn(LN_in(x)) + Mlp(LN_post(x))           parallel residual (GPT-NeoX)
//! ```
//!
//! The norms are RMSNorms, or LayerNorms for GPT-2 and GPT-NeoX (loaded by `model::gpt`).
//!
//! * [`Block::forward`] (and [`Block::forward_with_past`] for a shared prefix): composed ops,
//!   ordinary autograd; every architecture.
//! * [`Block::forward_taped`] and [`Block::backward_taped`]: the same block of a frozen Llama
//!   (plain pre-norm, SwiGLU) or Gemma 3 (q/k norms, output norms, GeGLU; its own equations on
//!   `forward_taped_gemma`) run outside the graph with a tape, and its hand-written backward to
//!   the input (no weight gradients), which `Llama::logits_from` chains over blocks `l..L`:
//!
//! ```text
//! forward:   h1 = rms(x; w_in)   q,k,v = h1 W_{q,k,v}ᵀ   q,k = rope(q,k)
//!            p = softmax(s q kᵀ + mask)   a = (p v) W_oᵀ   y1 = x + a
//!            h2 = rms(y1; w_post)   g,u = h2 W_{g,u}ᵀ   y = y1 + (silu(g) ⊙ u) W_dᵀ
//! backward:  dm = dy W_d   (dg, du) = silu_mul'   dy1 = dy + rms'(y1; dg W_g + du W_u)
//!            do = dy1 W_o   dp = do vᵀ   dv = pᵀ do   ds = s · softmax'(p, dp)
//!            dq = rope⁻¹(ds k)   dk = rope⁻¹(dsᵀ q)   dx = dy1 + rms'(x; dq W_q + dk W_k + dv W_v)
//! ```
//!
//! A new architecture whose block differs (norm placement, activation, attention variant) adds
//! its variant here, both passes together; until it has a taped pass,
//! `LlamaConfig::has_taped_backward` is false for it and training runs through autograd over the
//! composed ops.

use candle_core::{DType, Device, Tensor};

use super::batch::ForwardContext;
use super::config::{LayerKind, LlamaConfig};
use super::kernels;
use super::layers::{Attention, Linear, Mlp, Norm, RmsNorm};
use super::weights::Weights;
use crate::error::{Error, Result};

/// One pre-norm decoder block.
#[derive(Debug, Clone)]
pub struct Block {
    /// The norm before attention (none in OLMo 2).
    pub input_layernorm: Option<Norm>,
    pub self_attn: Attention,
    /// The norm before the MLP: HF `post_attention_layernorm` in Llama, `pre_feedforward_layernorm`
    /// in Gemma (none in OLMo 2).
    pub post_attention_layernorm: Option<Norm>,
    pub mlp: Mlp,
    /// Gemma, OLMo 2: the norm on the attention output before the residual add (HF `post_attention_layernorm`).
    pub attn_output_norm: Option<Norm>,
    /// Gemma, OLMo 2: the norm on the MLP output (HF `post_feedforward_layernorm`).
    pub mlp_output_norm: Option<Norm>,
    /// Sliding-window attention (Gemma 3's local layers; every Mistral layer with a window).
    pub sliding: bool,
    /// GPT-NeoX's parallel residual: the MLP reads the block's input, not the attention's output.
    pub parallel: bool,
}

impl Block {
    pub(super) fn load(w: &Weights, l: usize, c: &LlamaConfig, dtype: DType, dev: &Device) -> Result<Self> {
        let p = format!("model.layers.{l}");
        let d = c.hidden_size;
        let norm = |name: &str| Ok::<_, Error>(Norm::Rms(RmsNorm::load_for(w, &format!("{p}.{name}.weight"), d, c, dtype, dev)?));
        let self_attn = Attention::load(w, &format!("{p}.self_attn"), c, dtype, dev)?;
        let mlp = Mlp::load(w, &format!("{p}.mlp"), c, dtype, dev)?;
        if c.architecture == super::config::Architecture::Olmo2 {
            // x + norm(attn(x)), then + norm(mlp(·)): no norm before either.
            return Ok(Block {
                input_layernorm: None,
                self_attn,
                post_attention_layernorm: None,
                mlp,
                attn_output_norm: Some(norm("post_attention_layernorm")?),
                mlp_output_norm: Some(norm("post_feedforward_layernorm")?),
                sliding: false,
                parallel: false,
            });
        }
        Ok(match &c.gemma {
            None => Block {
                input_layernorm: Some(norm("input_layernorm")?),
                self_attn,
                post_attention_layernorm: Some(norm("post_attention_layernorm")?),
                mlp,
                attn_output_norm: None,
                mlp_output_norm: None,
                sliding: c.sliding_window.is_some(),
                parallel: false,
            },
            Some(g) => Block {
                input_layernorm: Some(norm("input_layernorm")?),
                self_attn,
                post_attention_layernorm: Some(norm("pre_feedforward_layernorm")?),
                mlp,
                attn_output_norm: Some(norm("post_attention_layernorm")?),
                mlp_output_norm: Some(norm("post_feedforward_layernorm")?),
                sliding: g.layer_types[l] == LayerKind::Sliding,
                parallel: false,
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

    /// The block around its attention: `x + norms(attend(RMSNorm_in(x)))`, then the MLP residual
    /// (or, parallel, `x + attend(LN_in(x)) + Mlp(LN_post(x))`).
    fn around_attention(&self, x: &Tensor, attend: impl FnOnce(&Tensor) -> Result<Tensor>) -> Result<Tensor> {
        if self.parallel {
            let (ln_in, ln_post) = match (&self.input_layernorm, &self.post_attention_layernorm) {
                (Some(a), Some(m)) => (a, m),
                _ => return Err(Error::invalid("a parallel-residual block needs its two norms")),
            };
            let a = attend(&ln_in.forward(x)?)?; // [B, T, D]
            let m = self.mlp.forward(&ln_post.forward(x)?)?; // [B, T, D]
            return Ok(((m + a)? + x)?); // [B, T, D], summed in transformers' order
        }
        let h = match &self.input_layernorm {
            Some(n) => n.forward(x)?, // [B, T, D]
            None => x.clone(),        // [B, T, D]
        };
        let mut a = attend(&h)?; // [B, T, D]
        if let Some(n) = &self.attn_output_norm {
            a = n.forward(&a)?; // [B, T, D]
        }
        let a = (x + a)?; // [B, T, D]
        let m_in = match &self.post_attention_layernorm {
            Some(n) => n.forward(&a)?, // [B, T, D]
            None => a.clone(),         // [B, T, D]
        };
        let mut m = self.mlp.forward(&m_in)?; // [B, T, D]
        if let Some(n) = &self.mlp_output_norm {
            m = n.forward(&m)?; // [B, T, D]
        }
        Ok((&a + m)?) // [B, T, D]
    }
}

/// What one block's backward needs.
pub struct BlockTape {
    x: Tensor,  // [B, T, D] input
    y1: Tensor, // [B, T, D] after attention
    q: Tensor,  // [B, H, T, hd] after RoPE (and Gemma's extra score scale)
    k: Tensor,  // [B, Hkv, T, hd] after RoPE
    v: Tensor,  // [B, Hkv, T, hd]
    p: Tensor,  // [B, H, T, T] attention probabilities
    g: Tensor,  // [B, T, F] gate pre-activation
    u: Tensor,  // [B, T, F] up projection
    /// Gemma 3 only: what its extra norms need.
    gemma: Option<GemmaTape>,
}

/// Gemma 3's additions to a block's tape: the inputs of its q/k norms and output norms.
struct GemmaTape {
    q0: Tensor, // [B, H, T, hd] queries before their norm
    k0: Tensor, // [B, Hkv, T, hd] keys before their norm
    a: Tensor,  // [B, T, D] attention output before its norm
    m: Tensor,  // [B, T, D] MLP output before its norm
}

/// `x Wᵀ + b` outside any graph.
fn lin(l: &Linear, x: &Tensor) -> Result<Tensor> {
    l.forward(&x.detach())
}

/// `dy W` for `dy [.., out]`, `W [out, in]` → `[.., in]`.
fn lin_back(l: &Linear, dy: &Tensor) -> Result<Tensor> {
    let dims = dy.dims().to_vec();
    let out_f = *dims.last().ok_or_else(|| Error::invalid("linear backward on a scalar"))?;
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let dy2 = dy.reshape((rows, out_f))?; // [N, out]
    let dx = match kernels::linear_back_bf16(&dy2, &l.weight, &l.packed_t)? {
        Some(dx) => dx, // [N, in], the bf16 intervened pass
        None if l.weight.dim(1)? == 0 => return Err(Error::invalid("linear backward: this layer's f32 weight was released (bf16 passes only)")),
        None => dy2.matmul(&l.weight)?, // [N, in]
    };
    let mut out_dims = dims;
    let last = out_dims.len() - 1;
    out_dims[last] = dx.dim(1)?;
    Ok(dx.reshape(out_dims)?)
}

/// Causal attention outside the graph, keeping the probabilities: `q [B, H, T, hd]` (already
/// scaled beyond `1/√hd` where the block needs it), `k`, `v [B, Hkv, T, hd]`, additive `mask`
/// → `(o [B, T, H·hd], p [B, H, T, T])`.
fn attention_saved(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
    if let Some(saved) = kernels::attention_forward_saved(q, k, v, mask)? {
        return Ok(saved);
    }
    let (b, h, t, hd) = q.dims4()?;
    let hkv = k.dim(1)?;
    let rep = h / hkv;
    let scale = 1.0 / (hd as f64).sqrt();
    let qs = (q * scale)?.reshape((b, hkv, rep * t, hd))?; // [B, Hkv, rep·T, hd]
    let s = qs.matmul(&k.t()?)?.reshape((b, h, t, t))?; // [B, H, T, T]
    let s = s.to_dtype(kernels::accum_dtype(s.dtype()))?;
    let p = kernels::softmax_masked(&s, Some(&mask.to_dtype(s.dtype())?))?.to_dtype(v.dtype())?; // [B, H, T, T]
    let o = p.reshape((b, hkv, rep * t, t))?.matmul(v)?; // [B, Hkv, rep·T, hd]
    Ok((o.reshape((b, h, t, hd))?.transpose(1, 2)?.reshape((b, t, h * hd))?, p)) // [B, T, H·hd]
}

/// The backward of [`attention_saved`] from `d_o [B, T, H·hd]`: `(dq [B, H, T, hd], dk, dv [B, Hkv, T, hd])`.
fn attention_saved_backward(tape: &BlockTape, mask: &Tensor, d_o: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    if kernels::attention_forward_saved_applies(&tape.q, &tape.k, &tape.v, mask) {
        return kernels::attention_backward(&tape.q, &tape.k, &tape.v, Some(&tape.p), mask, d_o);
    }
    let (b, h, t, hd) = tape.q.dims4()?;
    let hkv = tape.k.dim(1)?;
    let rep = h / hkv;
    let scale = 1.0 / (hd as f64).sqrt();
    let d_o = d_o.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()?.reshape((b, hkv, rep * t, hd))?; // [B, Hkv, rep·T, hd]
    let p = tape.p.reshape((b, hkv, rep * t, t))?; // [B, Hkv, rep·T, T]
    let dp = d_o.matmul(&tape.v.t()?)?.reshape((b, h, t, t))?; // [B, H, T, T]
    let dv = p.t()?.matmul(&d_o)?; // [B, Hkv, T, hd] (sums the rep query heads)
    let acc = kernels::accum_dtype(dp.dtype());
    let ds = kernels::softmax_backward(&tape.p.to_dtype(acc)?, &dp.to_dtype(acc)?)?; // [B, H, T, T]
    let ds = (ds * scale)?.to_dtype(d_o.dtype())?.reshape((b, hkv, rep * t, t))?; // [B, Hkv, rep·T, T]
    let dq = ds.matmul(&tape.k)?.reshape((b, h, t, hd))?; // [B, H, T, hd]
    let dk = ds.t()?.matmul(&tape.q.reshape((b, hkv, rep * t, hd))?)?; // [B, Hkv, T, hd]
    Ok((dq, dk, dv))
}

impl Block {
    /// [`Block::forward`] of a plain Llama block outside the graph, keeping what
    /// [`Block::backward_taped`] needs. `[B, T, D]` → `[B, T, D]`.
    pub fn forward_taped(&self, x: &Tensor, ctx: &ForwardContext) -> Result<(Tensor, BlockTape)> {
        if self.attn_output_norm.is_some() {
            return self.forward_taped_gemma(x, ctx);
        }
        let blk = self;
        let a = &blk.self_attn;
        let (b, t, _) = x.dims3()?;
        let (h, hkv, hd) = (a.n_heads, a.n_kv_heads, a.head_dim);
        let (inp, post) = blk.llama_norms()?;
        let h1 = kernels::rms_norm(x, &inp.weight, inp.eps)?; // [B, T, D]
        let q = lin(&a.q_proj, &h1)?.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()?; // [B, H, T, hd]
        let k = lin(&a.k_proj, &h1)?.reshape((b, t, hkv, hd))?.transpose(1, 2)?.contiguous()?; // [B, Hkv, T, hd]
        let v = lin(&a.v_proj, &h1)?.reshape((b, t, hkv, hd))?.transpose(1, 2)?.contiguous()?; // [B, Hkv, T, hd]
        let q = kernels::rope(&q, &ctx.cos, &ctx.sin)?; // [B, H, T, hd]
        let k = kernels::rope(&k, &ctx.cos, &ctx.sin)?; // [B, Hkv, T, hd]
        let (o, p) = attention_saved(&q, &k, &v, &ctx.mask)?; // [B, T, H·hd], [B, H, T, T]
        let y1 = (x + lin(&a.o_proj, &o)?)?; // [B, T, D]
        let h2 = kernels::rms_norm(&y1, &post.weight, post.eps)?; // [B, T, D]
        let u = lin(&blk.mlp.up_proj, &h2)?; // [B, T, F]
        let g = lin(blk.gated()?, &h2)?; // [B, T, F]
        let y = (&y1 + lin(&blk.mlp.down_proj, &kernels::silu_mul(&g, &u)?)?)?; // [B, T, D]
        Ok((y, BlockTape { x: x.clone(), y1, q, k, v, p, g, u, gemma: None }))
    }

    /// The gate of the Llama block's MLP, which the taped path needs.
    fn gated(&self) -> Result<&Linear> {
        self.mlp.gate_proj.as_ref().ok_or_else(|| Error::invalid("the taped backward covers the gated MLP of the Llama block; this block has no gate"))
    }

    /// The Llama block's two norms (before attention, before the MLP), which the taped path needs.
    fn llama_norms(&self) -> Result<(&RmsNorm, &RmsNorm)> {
        match (self.input_layernorm.as_ref().and_then(Norm::as_rms), self.post_attention_layernorm.as_ref().and_then(Norm::as_rms)) {
            (Some(i), Some(p)) if !self.parallel => Ok((i, p)),
            _ => Err(Error::invalid("the taped backward covers the Llama block, which norms before attention and before the MLP; this block does not")),
        }
    }

    /// The backward of [`Block::forward_taped`] to its input: `dy [B, T, D]` → `dx [B, T, D]`.
    pub fn backward_taped(&self, tape: &BlockTape, dy: &Tensor, ctx: &ForwardContext) -> Result<Tensor> {
        if let Some(gt) = &tape.gemma {
            return self.backward_taped_gemma(tape, gt, dy, ctx);
        }
        let blk = self;
        let a = &blk.self_attn;
        let (b, t, _) = dy.dims3()?;
        let (h, hkv, hd) = (a.n_heads, a.n_kv_heads, a.head_dim);
        // MLP.
        let dm = lin_back(&blk.mlp.down_proj, dy)?; // [B, T, F]
        let (dg, du) = kernels::silu_mul_backward(&tape.g, &tape.u, &dm)?; // [B, T, F] each
        let dh2 = (lin_back(blk.gated()?, &dg)? + lin_back(&blk.mlp.up_proj, &du)?)?; // [B, T, D]
        let (inp, post) = blk.llama_norms()?;
        let dy1 = (dy + kernels::rms_norm_backward(&tape.y1, &post.weight, &dh2, post.eps, false)?.0)?; // [B, T, D]
        // Attention.
        let d_o = lin_back(&a.o_proj, &dy1)?; // [B, T, H·hd]
        let (dq, dk, dv) = attention_saved_backward(tape, &ctx.mask, &d_o)?; // [B, H, T, hd], [B, Hkv, T, hd] ×2
        let dq = kernels::rope_inverse(&dq, &ctx.cos, &ctx.sin)?; // [B, H, T, hd]
        let dk = kernels::rope_inverse(&dk, &ctx.cos, &ctx.sin)?; // [B, Hkv, T, hd]
        let flat = |x: &Tensor, heads: usize| -> Result<Tensor> { Ok(x.transpose(1, 2)?.reshape((b, t, heads * hd))?) };
        let dh1 = ((lin_back(&a.q_proj, &flat(&dq, h)?)? + lin_back(&a.k_proj, &flat(&dk, hkv)?)?)? + lin_back(&a.v_proj, &flat(&dv, hkv)?)?)?; // [B, T, D]
        Ok((dy1 + kernels::rms_norm_backward(&tape.x, &inp.weight, &dh1, inp.eps, false)?.0)?) // [B, T, D]
    }
}

/// The norm `n` as the RMSNorm the taped path needs.
fn rms(n: Option<&Norm>, which: &str) -> Result<RmsNorm> {
    n.and_then(Norm::as_rms).cloned().ok_or_else(|| Error::invalid(format!("the taped Gemma 3 block needs its {which} RMSNorm")))
}

impl Block {
    /// Gemma 3's block outside the graph (its equations on `Gemma3Config`): the Llama block's tape
    /// plus per-head q/k norms before RoPE, the extra score scale, GeGLU, and norms on the
    /// attention and MLP outputs; a sliding layer uses the context's local mask and RoPE tables.
    ///
    /// ```text
    /// forward:   h1 = rms(x)   q0,k0 = heads(h1 W_{q,k}ᵀ)   q = s·rope(rms_q(q0))   k = rope(rms_k(k0))
    ///            a = o(attn(q, k, v))   y1 = x + rms_a(a)   m = down(gelu_tanh(g) ⊙ u), g,u from rms(y1)
    ///            y = y1 + rms_m(m)
    /// backward:  dm = rms_m'(m; dy) ... dy1 = dy + rms'(y1; ·)   da = rms_a'(a; dy1)
    ///            dq0 = rms_q'(q0; rope⁻¹(s·dq))   dk0 = rms_k'(k0; rope⁻¹(dk))   dx = dy1 + rms'(x; ·)
    /// ```
    fn forward_taped_gemma(&self, x: &Tensor, ctx: &ForwardContext) -> Result<(Tensor, BlockTape)> {
        let a_ = &self.self_attn;
        let (b, t, _) = x.dims3()?;
        let (h, hkv, hd) = (a_.n_heads, a_.n_kv_heads, a_.head_dim);
        let (mask, cos, sin) = ctx.tables(self.sliding);
        let inp = rms(self.input_layernorm.as_ref(), "input")?;
        let (qn, kn) = match (&a_.q_norm, &a_.k_norm) {
            (Some(q), Some(k)) => (q, k),
            _ => return Err(Error::invalid("the taped Gemma 3 block needs per-head q/k norms")),
        };
        let h1 = kernels::rms_norm(x, &inp.weight, inp.eps)?; // [B, T, D]
        let q0 = lin(&a_.q_proj, &h1)?.reshape((b, t, h, hd))?.transpose(1, 2)?.contiguous()?; // [B, H, T, hd]
        let k0 = lin(&a_.k_proj, &h1)?.reshape((b, t, hkv, hd))?.transpose(1, 2)?.contiguous()?; // [B, Hkv, T, hd]
        let v = lin(&a_.v_proj, &h1)?.reshape((b, t, hkv, hd))?.transpose(1, 2)?.contiguous()?; // [B, Hkv, T, hd]
        let q = kernels::rope(&kernels::rms_norm(&q0, &qn.weight, qn.eps)?, cos, sin)?; // [B, H, T, hd]
        let q = match a_.q_scale {
            Some(s) => (q * s)?, // [B, H, T, hd]
            None => q,
        };
        let k = kernels::rope(&kernels::rms_norm(&k0, &kn.weight, kn.eps)?, cos, sin)?; // [B, Hkv, T, hd]
        let (o, p) = attention_saved(&q, &k, &v, mask)?; // [B, T, H·hd], [B, H, T, T]
        let a = lin(&a_.o_proj, &o)?; // [B, T, D]
        let post_a = rms(self.attn_output_norm.as_ref(), "attention-output")?;
        let y1 = (x + kernels::rms_norm(&a, &post_a.weight, post_a.eps)?)?; // [B, T, D]
        let pre_m = rms(self.post_attention_layernorm.as_ref(), "pre-MLP")?;
        let h2 = kernels::rms_norm(&y1, &pre_m.weight, pre_m.eps)?; // [B, T, D]
        let g = lin(self.gated()?, &h2)?; // [B, T, F]
        let u = lin(&self.mlp.up_proj, &h2)?; // [B, T, F]
        let m = lin(&self.mlp.down_proj, &kernels::gelu_mul(&g, &u)?)?; // [B, T, D]
        let post_m = rms(self.mlp_output_norm.as_ref(), "MLP-output")?;
        let y = (&y1 + kernels::rms_norm(&m, &post_m.weight, post_m.eps)?)?; // [B, T, D]
        Ok((y, BlockTape { x: x.clone(), y1, q, k, v, p, g, u, gemma: Some(GemmaTape { q0, k0, a, m }) }))
    }

    /// The backward of [`forward_taped_gemma`](Self::forward_taped_gemma): `dy` → `dx`, `[B, T, D]`.
    fn backward_taped_gemma(&self, tape: &BlockTape, gt: &GemmaTape, dy: &Tensor, ctx: &ForwardContext) -> Result<Tensor> {
        let a_ = &self.self_attn;
        let (b, t, _) = dy.dims3()?;
        let (h, hkv, hd) = (a_.n_heads, a_.n_kv_heads, a_.head_dim);
        let (mask, cos, sin) = ctx.tables(self.sliding);
        let (qn, kn) = match (&a_.q_norm, &a_.k_norm) {
            (Some(q), Some(k)) => (q, k),
            _ => return Err(Error::invalid("the taped Gemma 3 block needs per-head q/k norms")),
        };
        // MLP and its output norm.
        let post_m = rms(self.mlp_output_norm.as_ref(), "MLP-output")?;
        let dm = kernels::rms_norm_backward(&gt.m, &post_m.weight, dy, post_m.eps, false)?.0; // [B, T, D]
        let dh = lin_back(&self.mlp.down_proj, &dm)?; // [B, T, F]
        let (dg, du) = kernels::gelu_mul_backward(&tape.g, &tape.u, &dh)?; // [B, T, F] each
        let dh2 = (lin_back(self.gated()?, &dg)? + lin_back(&self.mlp.up_proj, &du)?)?; // [B, T, D]
        let pre_m = rms(self.post_attention_layernorm.as_ref(), "pre-MLP")?;
        let dy1 = (dy + kernels::rms_norm_backward(&tape.y1, &pre_m.weight, &dh2, pre_m.eps, false)?.0)?; // [B, T, D]
        // Attention and its output norm.
        let post_a = rms(self.attn_output_norm.as_ref(), "attention-output")?;
        let da = kernels::rms_norm_backward(&gt.a, &post_a.weight, &dy1, post_a.eps, false)?.0; // [B, T, D]
        let d_o = lin_back(&a_.o_proj, &da)?; // [B, T, H·hd]
        let (dq, dk, dv) = attention_saved_backward(tape, mask, &d_o)?; // [B, H, T, hd], [B, Hkv, T, hd] ×2
        let dq = match a_.q_scale {
            Some(s) => (dq * s)?, // [B, H, T, hd]
            None => dq,
        };
        let dq0 = kernels::rms_norm_backward(&gt.q0, &qn.weight, &kernels::rope_inverse(&dq, cos, sin)?, qn.eps, false)?.0; // [B, H, T, hd]
        let dk0 = kernels::rms_norm_backward(&gt.k0, &kn.weight, &kernels::rope_inverse(&dk, cos, sin)?, kn.eps, false)?.0; // [B, Hkv, T, hd]
        let flat = |x: &Tensor, heads: usize| -> Result<Tensor> { Ok(x.transpose(1, 2)?.reshape((b, t, heads * hd))?) };
        let dh1 = ((lin_back(&a_.q_proj, &flat(&dq0, h)?)? + lin_back(&a_.k_proj, &flat(&dk0, hkv)?)?)? + lin_back(&a_.v_proj, &flat(&dv, hkv)?)?)?; // [B, T, D]
        let inp = rms(self.input_layernorm.as_ref(), "input")?;
        Ok((dy1 + kernels::rms_norm_backward(&tape.x, &inp.weight, &dh1, inp.eps, false)?.0)?) // [B, T, D]
    }
}
