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
use super::config::LlamaConfig;
use super::rope::Rope;
use super::site::Site;
use super::weights::Weights;
use crate::error::{Error, Result};

pub use super::block::Block;
pub use super::kernels::accum_dtype;
pub use super::layers::{Attention, LayerNorm, Linear, Mlp, Norm, RmsNorm, softmax_last_dim};

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
    pub norm: Norm,
    pub lm_head: Tensor, // [V, D] (the embedding itself when tied)
    /// GPT-2's learned absolute positions `[max_position_embeddings, D]`, added to the tokens'.
    pub position_embeddings: Option<Tensor>,
    rope: Rope,
    /// Sliding layers (Gemma 3's local layers, every Mistral layer with a window): their RoPE
    /// and window.
    local: Option<(Rope, usize)>,
    /// Gemma: embeddings are multiplied by √D (rounded to the model dtype, as transformers does).
    embed_scale: Option<f64>,
    dtype: DType,
    device: Device,
    /// Clean passes ([`Target`](super::target::Target)) run their linear layers in bf16.
    clean_bf16: bool,
    /// The intervened pass ([`Llama::logits_from`]) runs its linear layers in bf16.
    intervened_bf16: bool,
}

impl Llama {
    /// Set the matmul precision of the clean passes (an error for `bf16` where it cannot run).
    pub fn set_clean_matmul(&mut self, m: super::CleanMatmul) -> Result<()> {
        self.clean_bf16 = m.resolve(self.dtype, &self.device)?;
        Ok(())
    }

    /// Whether the clean passes run their linear layers in bf16 ([`set_clean_matmul`](Self::set_clean_matmul)).
    pub fn clean_bf16(&self) -> bool {
        self.clean_bf16
    }

    /// Set the matmul precision of the intervened pass's frozen blocks (forward and the input
    /// gradient through them; an error for `bf16` where it cannot run).
    pub fn set_intervened_matmul(&mut self, m: super::CleanMatmul) -> Result<()> {
        self.intervened_bf16 = m.resolve(self.dtype, &self.device)?;
        Ok(())
    }

    /// Whether the intervened pass runs its frozen linear layers in bf16.
    pub fn intervened_bf16(&self) -> bool {
        self.intervened_bf16
    }

    /// Free the f32 weights of linear layers that the bf16 passes serve from their packing: in a
    /// run intervening at block `l` with bf16 clean passes, blocks `0..l` run only in clean
    /// passes; with the intervened pass in bf16 too, no block needs its f32 weights (blocks
    /// `l..` keep `Wᵀ` packed for the input gradient). Call after the hypernetwork has copied
    /// what it copies from the target. Returns the bytes freed (0 without bf16 clean passes).
    /// Any later f32 pass through a freed layer is an error.
    pub fn release_f32_below(&mut self, l: usize) -> Result<usize> {
        if !self.clean_bf16 {
            return Ok(0);
        }
        let upto = if self.intervened_bf16 { self.layers.len() } else { l.min(self.layers.len()) };
        let mut freed = 0;
        for (i, b) in self.layers.iter_mut().enumerate().take(upto) {
            let transposed = i >= l;
            let a = &mut b.self_attn;
            for lin in [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj, &mut b.mlp.up_proj, &mut b.mlp.down_proj] {
                freed += lin.release_f32(transposed)?;
            }
            if let Some(g) = b.mlp.gate_proj.as_mut() {
                freed += g.release_f32(transposed)?;
            }
        }
        Ok(freed)
    }

    /// Build from weights addressed by HF names; every tensor's shape is checked.
    pub fn load(w: &Weights, config: &LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with_progress(w, config, dtype, device, &indicatif::ProgressBar::hidden())
    }

    /// [`load`](Self::load), advancing `progress` by one per block.
    pub fn load_with_progress(w: &Weights, config: &LlamaConfig, dtype: DType, device: &Device, progress: &indicatif::ProgressBar) -> Result<Self> {
        let (v, d) = (config.vocab_size, config.hidden_size);
        // GPT-2 and GPT-NeoX name their embeddings, final norm and head their own way.
        let (embed_name, positions_name, norm_name, head_name) = match config.gpt {
            Some(_) => super::gpt::top_level_names(config),
            None => ("model.embed_tokens.weight", None, "model.norm", "lm_head.weight"),
        };
        let embed_tokens = w.get(embed_name, &[v, d], dtype, device)?;
        let position_embeddings = match positions_name {
            Some(name) => Some(w.get(name, &[config.max_position_embeddings, d], dtype, device)?),
            None => None,
        };
        progress.set_length(config.num_hidden_layers as u64);
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            layers.push(if config.gpt.is_some() { super::gpt::load_block(w, l, config, dtype, device)? } else { Block::load(w, l, config, dtype, device)? });
            progress.inc(1);
        }
        progress.finish_and_clear();
        let lm_head = if config.tie_word_embeddings {
            embed_tokens.clone()
        } else if w.contains(head_name) {
            w.get(head_name, &[v, d], dtype, device)?
        } else {
            return Err(Error::tensor(w.path_of(head_name), head_name, "missing, and the config does not tie it to the embedding (tie_word_embeddings is false)"));
        };
        let norm = match config.gpt {
            Some(_) => Norm::Layer(LayerNorm::load(w, norm_name, d, config.rms_norm_eps, dtype, device)?),
            None => Norm::Rms(RmsNorm::load_for(w, &format!("{norm_name}.weight"), d, config, dtype, device)?),
        };
        let local = match (&config.gemma, config.sliding_window) {
            (Some(g), _) => Some((Rope::new(&g.local_rope, config.head_dim), g.sliding_window)),
            (None, Some(window)) => Some((Rope::partial(&config.rope, config.head_dim, config.rotary_dims), window)),
            (None, None) => None,
        };
        let embed_scale = config.gemma.as_ref().map(|_| (d as f64).sqrt());
        let rope = Rope::partial(&config.rope, config.head_dim, config.rotary_dims);
        Ok(Llama {
            config: config.clone(),
            embed_tokens,
            layers,
            norm,
            lm_head,
            position_embeddings,
            rope,
            local,
            embed_scale,
            dtype,
            device: device.clone(),
            clean_bf16: false,
            intervened_bf16: false,
        })
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

    /// The sliding layers' RoPE and window (`None` for models without them).
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
    /// Norms are listed as their multipliers (for Gemma 3, `1 + w`). GPT-2 and GPT-NeoX are listed
    /// under the Llama names of the same roles (their fused q/k/v split, LayerNorm biases as
    /// `.bias`, `model.embed_positions.weight` for GPT-2's positions). Fused projections (Phi 3,
    /// GPT-2, GPT-NeoX) are listed split, and with partial rotary embeddings q/k rows are in the
    /// runtime's layout (`rope::partial_rotary_rows`), not the checkpoint's.
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out: Vec<(String, &Tensor)> = vec![("model.embed_tokens.weight".into(), &self.embed_tokens)];
        if let Some(p) = &self.position_embeddings {
            out.push(("model.embed_positions.weight".into(), p));
        }
        fn norm<'a>(out: &mut Vec<(String, &'a Tensor)>, name: String, n: &'a Norm) {
            match n {
                Norm::Rms(r) => out.push((format!("{name}.weight"), &r.weight)),
                Norm::Layer(l) => {
                    out.push((format!("{name}.weight"), &l.weight));
                    out.push((format!("{name}.bias"), &l.bias));
                }
            }
        }
        for (i, b) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            if let Some(n) = &b.input_layernorm {
                norm(&mut out, format!("{p}.input_layernorm"), n);
            }
            match (&b.attn_output_norm, &b.mlp_output_norm) {
                // Gemma (with a pre-MLP norm) and OLMo 2 (without): HF's post_attention_layernorm
                // is the attention-output norm.
                (Some(post_attn), Some(post_ffw)) => {
                    norm(&mut out, format!("{p}.post_attention_layernorm"), post_attn);
                    if let Some(n) = &b.post_attention_layernorm {
                        norm(&mut out, format!("{p}.pre_feedforward_layernorm"), n);
                    }
                    norm(&mut out, format!("{p}.post_feedforward_layernorm"), post_ffw);
                }
                _ => {
                    if let Some(n) = &b.post_attention_layernorm {
                        norm(&mut out, format!("{p}.post_attention_layernorm"), n);
                    }
                }
            }
            if let (Some(qn), Some(kn)) = (&b.self_attn.q_norm, &b.self_attn.k_norm) {
                out.push((format!("{p}.self_attn.q_norm.weight"), &qn.weight));
                out.push((format!("{p}.self_attn.k_norm.weight"), &kn.weight));
            }
            let linears = [
                ("self_attn.q_proj", Some(&b.self_attn.q_proj)),
                ("self_attn.k_proj", Some(&b.self_attn.k_proj)),
                ("self_attn.v_proj", Some(&b.self_attn.v_proj)),
                ("self_attn.o_proj", Some(&b.self_attn.o_proj)),
                ("mlp.gate_proj", b.mlp.gate_proj.as_ref()),
                ("mlp.up_proj", Some(&b.mlp.up_proj)),
                ("mlp.down_proj", Some(&b.mlp.down_proj)),
            ];
            for (n, l) in linears.into_iter().filter_map(|(n, l)| l.map(|l| (n, l))) {
                out.push((format!("{p}.{n}.weight"), &l.weight));
                if let Some(bias) = &l.bias {
                    out.push((format!("{p}.{n}.bias"), bias));
                }
            }
        }
        norm(&mut out, "model.norm".into(), &self.norm);
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
    /// batch knows its largest id, so this costs no device work); with learned positions
    /// (GPT-2), plus `wpe` at the batch's position ids.
    pub(crate) fn embed_batch(&self, batch: &TokenBatch) -> Result<Tensor> {
        self.embed_batch_after(batch, 0)
    }

    /// [`embed_batch`](Self::embed_batch) for tokens that continue `offset` earlier positions
    /// (a shared prefix): learned positions start at `offset`.
    pub(crate) fn embed_batch_after(&self, batch: &TokenBatch, offset: usize) -> Result<Tensor> {
        let max = batch.max_id();
        if max as usize >= self.config.vocab_size {
            return Err(Error::invalid(format!("token id {max} is outside the vocabulary of {} tokens", self.config.vocab_size)));
        }
        let x = self.embed(&batch.input_ids)?; // [B, T, D]
        let Some(wpe) = &self.position_embeddings else { return Ok(x) };
        let (b, t) = batch.dims();
        let limit = self.config.max_position_embeddings;
        let pos: Vec<u32> = batch.position_ids().into_iter().map(|p| p + offset as u32).collect();
        if let Some(&p) = pos.iter().max()
            && p as usize >= limit
        {
            return Err(Error::invalid(format!("position {p} is past the model's {limit} learned positions (n_positions): use shorter prompts")));
        }
        let idx = Tensor::from_vec(pos, b * t, &self.device)?; // [B·T]
        let p = wpe.index_select(&idx, 0)?.reshape((b, t, self.config.hidden_size))?; // [B, T, D]
        Ok((x + p)?) // [B, T, D]
    }

    /// Run block `l` on the residual stream `[B, T, D]`.
    pub fn block(&self, l: usize, x: &Tensor, ctx: &ForwardContext) -> Result<Tensor> {
        ctx.check(x, self.config.hidden_size)?;
        self.layers.get(l).ok_or_else(|| Error::invalid(format!("block {l} does not exist (the model has {} blocks)", self.layers.len())))?.forward(x, ctx)
    }

    /// The final norm: `[B, T, D]` → `[B, T, D]`.
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
