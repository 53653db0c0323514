//! GPT-2 and GPT-NeoX (Pythia) blocks, loaded into the shared [`Block`] with LayerNorms, an
//! ungated MLP and (GPT-NeoX) a parallel residual; the equations are on
//! [`GptConfig`](super::config::GptConfig).
//!
//! What the checkpoints store, and what becomes of it here:
//!
//! ```text
//! GPT-2     transformer.h.{l}.attn.c_attn   Conv1D [D, 3D] = [q | k | v] columns   → transposed, rows split
//!           transformer.h.{l}.attn.c_proj   Conv1D [D, D]                          → o_proj
//!           transformer.h.{l}.mlp.c_fc / c_proj   Conv1D [D, F] / [F, D]           → up / down (no gate)
//!           transformer.h.{l}.ln_1 / ln_2   LayerNorm (weight, bias)
//! GPT-NeoX  gpt_neox.layers.{l}.attention.query_key_value  [3D, D], per head [q_h; k_h; v_h]
//!           gpt_neox.layers.{l}.attention.dense             [D, D]  → o_proj
//!           gpt_neox.layers.{l}.mlp.dense_h_to_4h / dense_4h_to_h  → up / down (no gate)
//!           gpt_neox.layers.{l}.input_layernorm / post_attention_layernorm
//! ```
//!
//! RoPE over part of each head (GPT-NeoX's `rotary_pct`) runs in the layout of full rotary
//! embeddings: the q and k rows of every head are reordered at load
//! ([`partial_rotary_layout`]) and the unrotated dimensions get frequency 0.

use candle_core::{DType, Device};

use super::block::Block;
use super::config::{Architecture, LlamaConfig};
use super::layers::{Attention, LayerNorm, Linear, Mlp, Norm, partial_rotary_layout};
use super::weights::Weights;
use crate::error::{Error, Result};

/// The HF names of a GPT-family model's embeddings, final norm and output head:
/// `(token embedding, position embedding, final norm prefix, untied lm_head)`.
pub(super) fn top_level_names(c: &LlamaConfig) -> (&'static str, Option<&'static str>, &'static str, &'static str) {
    match c.architecture {
        Architecture::Gpt2 => ("transformer.wte.weight", Some("transformer.wpe.weight"), "transformer.ln_f", "lm_head.weight"),
        _ => ("gpt_neox.embed_in.weight", None, "gpt_neox.final_layer_norm", "embed_out.weight"),
    }
}

/// Block `l` of a GPT-2 or GPT-NeoX checkpoint.
pub(super) fn load_block(w: &Weights, l: usize, c: &LlamaConfig, dtype: DType, dev: &Device) -> Result<Block> {
    let g = c.gpt.as_ref().ok_or_else(|| Error::invalid("a GPT-family block needs the config's GPT settings"))?;
    let (d, f, h, hd, eps) = (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.head_dim, c.rms_norm_eps);
    let ln = |name: String| -> Result<Option<Norm>> { Ok(Some(Norm::Layer(LayerNorm::load(w, &name, d, eps, dtype, dev)?))) };
    match c.architecture {
        Architecture::Gpt2 => {
            let p = format!("transformer.h.{l}");
            let qkv = Linear::load_conv1d(w, &format!("{p}.attn.c_attn"), 3 * d, d, dtype, dev)?; // [3D, D]
            let o = Linear::load_conv1d(w, &format!("{p}.attn.c_proj"), d, d, dtype, dev)?; // [D, D]
            let mut self_attn = Attention::plain(qkv.rows(0, d)?, qkv.rows(d, d)?, qkv.rows(2 * d, d)?, o, h, h, hd);
            self_attn.rotary = false; // learned positions instead (an odd head size is fine then)
            if g.scale_by_inverse_layer {
                self_attn.q_scale = Some(1.0 / (l + 1) as f64);
            }
            let mlp = Mlp {
                gate_proj: None,
                up_proj: Linear::load_conv1d(w, &format!("{p}.mlp.c_fc"), f, d, dtype, dev)?,
                down_proj: Linear::load_conv1d(w, &format!("{p}.mlp.c_proj"), d, f, dtype, dev)?,
                act: c.hidden_act,
            };
            Ok(Block {
                input_layernorm: ln(format!("{p}.ln_1"))?,
                self_attn,
                post_attention_layernorm: ln(format!("{p}.ln_2"))?,
                mlp,
                attn_output_norm: None,
                mlp_output_norm: None,
                sliding: false,
                parallel: false,
            })
        }
        Architecture::GptNeox => {
            let p = format!("gpt_neox.layers.{l}");
            let qkv = Linear::load(w, &format!("{p}.attention.query_key_value"), 3 * d, d, c.qkv_bias, dtype, dev)?; // [3D, D]
            // Rows of head `i`: [q_i; k_i; v_i], hd each.
            let part = |which: usize| -> Result<Linear> {
                let order: Vec<usize> = (0..h).flat_map(|i| (0..hd).map(move |j| i * 3 * hd + which * hd + j)).collect();
                qkv.reorder_rows(&order) // [D, D]
            };
            let q = partial_rotary_layout(&part(0)?, h, hd, c.rotary_dims)?;
            let k = partial_rotary_layout(&part(1)?, h, hd, c.rotary_dims)?;
            let o = Linear::load(w, &format!("{p}.attention.dense"), d, d, c.o_bias, dtype, dev)?;
            let self_attn = Attention::plain(q, k, part(2)?, o, h, h, hd);
            let mlp = Mlp {
                gate_proj: None,
                up_proj: Linear::load(w, &format!("{p}.mlp.dense_h_to_4h"), f, d, c.mlp_bias, dtype, dev)?,
                down_proj: Linear::load(w, &format!("{p}.mlp.dense_4h_to_h"), d, f, c.mlp_bias, dtype, dev)?,
                act: c.hidden_act,
            };
            Ok(Block {
                input_layernorm: ln(format!("{p}.input_layernorm"))?,
                self_attn,
                post_attention_layernorm: ln(format!("{p}.post_attention_layernorm"))?,
                mlp,
                attn_output_norm: None,
                mlp_output_norm: None,
                sliding: false,
                parallel: g.parallel_residual,
            })
        }
        other => Err(Error::invalid(format!("{other:?} is not a GPT-family architecture"))),
    }
}
