//! The HyperDAS hypernetwork (docs/method.md §2): N decoder blocks over the instruction,
//! each with self-attention, cross-attention to the source's hidden states, cross-attention to
//! the base's, and a SwiGLU MLP (four RMSNorms), then a final norm and the pointer head.
//!
//! Inputs (shapes: B batch, T_e instruction, T_b base, T_s source, L+1 hidden-state indices, D):
//!
//! * the instruction, left-padded `[B, T_e]`;
//! * the clean hidden states of base and source, `[B, T, L+1, D]` (HF indexing), and their
//!   intervention masks `[B, T]` (1 = the token may be intervened on / read).
//!
//! Keys and values of the cross-attentions: every hidden-state index of every token,
//! **unit-normalised** along D and **flattened token-major, layer-minor**: flat index
//! `t·(L+1) + l`, so `[B, T·(L+1), D]`, with the token's intervention mask repeated L+1 times.
//! RoPE positions follow the reference exactly: instruction tokens at `cumsum(mask)` (1-based),
//! cross-attention keys at `cumsum(M)·M` along the flattened sequence.
//!
//! Outputs: `z [B, D]`, the normed state of the last instruction token (the pointer's query;
//! it or its centred form conditions the subspace module), and `W [B, T_s+1, T_b]` from the
//! [`pointer`] head (each column a distribution over source tokens and "self").
//!
//! Initialisation: from the target's first N blocks as **independent copies** (both
//! cross-attentions and their norms from the same block's self-attention and input norm), or
//! from scratch (N(0, 0.02), norms at 1) by option. The embedding and final norm are copies of
//! the target's and trainable. Every parameter is registered in the [`ParamStore`] under
//! `hypernet.*`.

pub mod attention;
pub mod interpreter;
pub mod pointer;
pub mod subspace;

use candle_core::{DType, Device, Tensor};

use self::attention::{causal_mask, key_mask};
use self::pointer::PointerHead;
use crate::error::{Error, Result};
use crate::model::kernels;
use crate::model::llama::{Attention, Linear, Mlp, Norm, RmsNorm};
use crate::model::rope::Rope;
use crate::model::{Llama, TokenBatch};
use crate::model::{RopeConfig, RopeScaling};
use crate::params::ParamStore;
use crate::rng::Rng;

/// Hypernetwork settings.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HyperConfig {
    /// Decoder blocks N (the paper: 8; the reference CLI: 2).
    pub num_blocks: usize,
    /// The target layer l whose states the pointer head compares (the intervention layer).
    pub layer: usize,
    /// Initialise blocks with N(0, 0.02) instead of copying the target's first N blocks.
    pub from_scratch: bool,
    /// Drop the cross-attention to the source (ablation).
    pub ablate_source: bool,
    /// Drop the cross-attention to the base (ablation).
    pub ablate_base: bool,
    pub seed: u64,
    /// Copied weights kept at the target's values (not trained; not in the parameter store).
    #[serde(default)]
    pub freeze: Vec<Frozen>,
    /// The pointer head's initial logit for "self" (keep the base) over the source tokens, a
    /// learned scalar added to every base column's self row (0: no such parameter, the
    /// reference). With 5, an untrained `W` keeps each base token with weight ≈ 0.9 on a
    /// 20-token source: training starts from "no intervention", right on isolate rows.
    #[serde(default)]
    pub self_bias: f64,
    /// RoPE on the pointer head's keys and query (the reference: yes). Without it the head
    /// compares contents only, whatever the pairs' flattened positions.
    #[serde(default = "yes")]
    pub pointer_rope: bool,
    /// A fixed factor on the pointer head's scores (1: the reference). The head compares
    /// unit-normalised states through N(0, 0.02) projections, so its untrained scores are about
    /// 1e-2 and `W` starts uniform; `√D` (24 for SmolLM2) makes them O(1).
    #[serde(default = "one")]
    pub pointer_scale: f64,
    /// What the pointer head compares: the layer-l states unit-normalised (the reference) or
    /// also centred over each prompt's visible positions.
    #[serde(default)]
    pub pointer_states: PointerStates,
    /// What the subspace module reads: the last instruction token's state `z` (the reference)
    /// or `z` minus the instruction's mean state.
    #[serde(default)]
    pub subspace_input: SubspaceInput,
}

/// `interpreter.subspace_input`: the instruction state that conditions the subspace module.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubspaceInput {
    /// `z = x_final[T_e − 1]`, the last instruction token after the final norm (the reference).
    #[default]
    Last,
    /// `z − mean_{t visible} x_final[t]`: the last token's state less what every instruction
    /// token shares. On Gemma 3 the shared part (a few large residual dimensions) dominates
    /// `z`, and a trained ReflectSelect gave Country and Continent instructions the same
    /// subspace (overlap 0.995 of 1, against 0.85 on SmolLM2).
    Centered,
}

/// `interpreter.pointer_states`: the layer-l states the pointer head reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PointerStates {
    /// `h[j] / |h[j]|` (the reference).
    #[default]
    Unit,
    /// `c[j] / |c[j]|` with `c[j] = u[j] − mean_{k visible} u[k]`, `u = h / |h|`: the part of
    /// each state its prompt's other positions do not share. Gemma 3's residual stream is
    /// dominated by a few large dimensions common to every position (unit states at layer 8
    /// have cosine ≈ 0.95 between positions; SmolLM2's ≈ 0.57), which leaves the reference
    /// pointer nothing to tell base positions apart by; centred, both models' positions have
    /// mean |cosine| ≈ 0.24.
    Centered,
}

fn one() -> f64 {
    1.0
}

fn yes() -> bool {
    true
}

impl Default for HyperConfig {
    /// The reference's hypernetwork: 2 copied blocks, everything trained, RoPE, no self bias.
    fn default() -> Self {
        HyperConfig {
            num_blocks: 2,
            layer: 0,
            from_scratch: false,
            ablate_source: false,
            ablate_base: false,
            seed: 0,
            freeze: Vec::new(),
            self_bias: 0.0,
            pointer_rope: true,
            pointer_scale: 1.0,
            pointer_states: PointerStates::Unit,
            subspace_input: SubspaceInput::Last,
        }
    }
}

/// What `interpreter.freeze` can keep at the target's weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Frozen {
    /// The instruction's token embedding (the largest block of parameters: V × D).
    Embedding,
    /// Every copied block's MLP.
    Mlps,
    /// Every copied block (attention, MLP and norms): only the final norm, the pointer head and
    /// the subspace module train.
    Blocks,
}

impl Frozen {
    /// Whether the copied parameter `name` is kept fixed.
    fn covers(self, name: &str) -> bool {
        match self {
            Frozen::Embedding => name.starts_with("hypernet.embed_tokens."),
            Frozen::Mlps => name.starts_with("hypernet.layers.") && name.contains(".mlp."),
            Frozen::Blocks => name.starts_with("hypernet.layers."),
        }
    }
}

/// One hypernetwork block.
pub struct HyperBlock {
    pub input_norm: RmsNorm,
    pub self_attn: Attention,
    pub source_norm: RmsNorm,
    pub source_attn: Attention,
    pub base_norm: RmsNorm,
    pub base_attn: Attention,
    pub post_norm: RmsNorm,
    pub mlp: Mlp,
}

/// What the hypernetwork reads.
pub struct HyperInput<'a> {
    pub instruction: &'a TokenBatch,
    /// `[B, T_b, L+1, D]` clean base hidden states.
    pub base_states: &'a Tensor,
    /// `[B, T_b]` base intervention mask (0/1).
    pub base_mask: &'a Tensor,
    /// `[B, T_s, L+1, D]`.
    pub source_states: &'a Tensor,
    /// `[B, T_s]`.
    pub source_mask: &'a Tensor,
}

/// What it produces.
pub struct HyperOutput {
    /// `[B, D]` last instruction token after the final norm (the pointer head's query).
    pub z: Tensor,
    /// `[B, D]` what conditions the subspace module: `z`, or `z` centred over the instruction
    /// ([`SubspaceInput`]).
    pub condition: Tensor,
    /// `[B, T_s+1, T_b]` position weights (columns sum to 1).
    pub w: Tensor,
}

pub struct HyperNetwork {
    pub config: HyperConfig,
    pub embed_tokens: Tensor,
    /// The target's embedding factor (Gemma: √D), applied to the instruction's embeddings too.
    pub embed_scale: Option<f64>,
    pub blocks: Vec<HyperBlock>,
    pub norm: RmsNorm,
    pub pointer: PointerHead,
    rope: Rope,
}

/// Registers parameters (as f32 copies) and hands back the variables' tensors.
pub(crate) struct Registrar<'a> {
    pub ps: &'a mut ParamStore,
    pub rng: Rng,
    pub device: Device,
    /// Copies that stay fixed (returned as plain tensors, not registered).
    pub frozen: Vec<Frozen>,
}

impl Registrar<'_> {
    /// Register an independent f32 copy of `init` (a fixed tensor when `frozen` covers `name`).
    pub fn copy(&mut self, name: &str, init: &Tensor) -> Result<Tensor> {
        let t = init.to_dtype(DType::F32)?.to_device(&self.device)?.copy()?;
        if self.frozen.iter().any(|f| f.covers(name)) {
            return Ok(t.detach());
        }
        Ok(self.ps.add(name, t)?.as_tensor().clone())
    }

    /// Register a tensor of `n` values all equal to `value`.
    pub fn constant(&mut self, name: &str, n: usize, value: f64) -> Result<Tensor> {
        let t = Tensor::full(value as f32, n, &self.device)?;
        Ok(self.ps.add(name, t)?.as_tensor().clone())
    }

    /// Register an N(0, std) matrix `[rows, cols]` from the seeded generator.
    pub fn normal(&mut self, name: &str, rows: usize, cols: usize, std: f64) -> Result<Tensor> {
        let v: Vec<f32> = (0..rows * cols).map(|_| (self.rng.normal() * std) as f32).collect();
        let t = Tensor::from_vec(v, (rows, cols), &self.device)?;
        Ok(self.ps.add(name, t)?.as_tensor().clone())
    }

    /// Register a U(−bound, bound) matrix `[rows, cols]` from the seeded generator.
    pub fn uniform(&mut self, name: &str, rows: usize, cols: usize, bound: f64) -> Result<Tensor> {
        let v: Vec<f32> = (0..rows * cols).map(|_| ((2.0 * self.rng.uniform() - 1.0) * bound) as f32).collect();
        let t = Tensor::from_vec(v, (rows, cols), &self.device)?;
        Ok(self.ps.add(name, t)?.as_tensor().clone())
    }

    pub fn ones(&mut self, name: &str, n: usize) -> Result<Tensor> {
        let t = Tensor::ones(n, DType::F32, &self.device)?;
        Ok(self.ps.add(name, t)?.as_tensor().clone())
    }

    fn linear_copy(&mut self, name: &str, src: &Linear) -> Result<Linear> {
        let weight = self.copy(&format!("{name}.weight"), &src.weight)?;
        let bias = match &src.bias {
            Some(b) => Some(self.copy(&format!("{name}.bias"), b)?),
            None => None,
        };
        Ok(Linear::new(weight, bias))
    }

    fn linear_new(&mut self, name: &str, out_f: usize, in_f: usize) -> Result<Linear> {
        Ok(Linear::new(self.normal(&format!("{name}.weight"), out_f, in_f, 0.02)?, None))
    }
}

impl HyperNetwork {
    /// Build and register the hypernetwork for `target`.
    pub fn new(ps: &mut ParamStore, target: &Llama, config: &HyperConfig) -> Result<Self> {
        let c = &target.config;
        if config.num_blocks == 0 || config.num_blocks > c.num_hidden_layers {
            return Err(Error::invalid(format!("hypernetwork blocks must be 1..={} (the target's depth), got {}", c.num_hidden_layers, config.num_blocks)));
        }
        if !(config.pointer_scale > 0.0 && config.pointer_scale.is_finite()) {
            return Err(Error::invalid(format!("interpreter.pointer_scale = {}: use a positive factor (1: the reference)", config.pointer_scale)));
        }
        if config.layer > c.num_hidden_layers {
            return Err(Error::invalid(format!("intervention layer {} is outside 0..={}", config.layer, c.num_hidden_layers)));
        }
        let (d, hd, f) = (c.hidden_size, c.head_dim, c.intermediate_size);
        let (h, hkv) = (c.num_attention_heads, c.num_key_value_heads);
        let mut r = Registrar { ps, rng: Rng::derive(config.seed, "hypernet/init"), device: target.device().clone(), frozen: config.freeze.clone() };
        let embed_tokens = r.copy("hypernet.embed_tokens.weight", &target.embed_tokens)?;
        // GPT-2 and GPT-NeoX blocks (LayerNorm, ungated MLP, fused or partial-rotary attention) do
        // not fit the hypernetwork's Llama layout: its blocks start from scratch there.
        let copyable = c.gpt.is_none();
        let from_scratch = config.from_scratch || !copyable;
        let mut blocks = Vec::with_capacity(config.num_blocks);
        for i in 0..config.num_blocks {
            let p = format!("hypernet.layers.{i}");
            let src = &target.layers[i];
            let attn = |r: &mut Registrar, which: &str| -> Result<Attention> {
                let name = format!("{p}.{which}");
                let (q, k, v, o) = if from_scratch {
                    (
                        r.linear_new(&format!("{name}.q_proj"), h * hd, d)?,
                        r.linear_new(&format!("{name}.k_proj"), hkv * hd, d)?,
                        r.linear_new(&format!("{name}.v_proj"), hkv * hd, d)?,
                        r.linear_new(&format!("{name}.o_proj"), d, h * hd)?,
                    )
                } else {
                    let a = &src.self_attn;
                    (
                        r.linear_copy(&format!("{name}.q_proj"), &a.q_proj)?,
                        r.linear_copy(&format!("{name}.k_proj"), &a.k_proj)?,
                        r.linear_copy(&format!("{name}.v_proj"), &a.v_proj)?,
                        r.linear_copy(&format!("{name}.o_proj"), &a.o_proj)?,
                    )
                };
                let mut a = Attention::plain(q, k, v, o, h, hkv, hd);
                // Qwen 3, Gemma 3, OLMo 2: keep the target's q/k norms (trainable copies); Gemma:
                // its score scale and (Gemma 2) score cap, so a block copied from the target
                // computes what the target's did.
                let t = &src.self_attn;
                if let (Some(qn), Some(kn)) = (&t.q_norm, &t.k_norm) {
                    let copy = |r: &mut Registrar, which: &str, from: &RmsNorm| -> Result<RmsNorm> {
                        let n = format!("{name}.{which}.weight");
                        let weight = if from_scratch { r.ones(&n, from.weight.dim(0)?)? } else { r.copy(&n, &from.weight)? };
                        Ok(RmsNorm { weight, eps: from.eps })
                    };
                    a.q_norm = Some(copy(r, "q_norm", qn)?);
                    a.k_norm = Some(copy(r, "k_norm", kn)?);
                    a.qk_norm = t.qk_norm;
                }
                if copyable {
                    a.q_scale = t.q_scale;
                    a.logit_cap = t.logit_cap;
                }
                Ok(a)
            };
            let self_attn = attn(&mut r, "self_attn")?;
            let source_attn = attn(&mut r, "source_attn")?;
            let base_attn = attn(&mut r, "base_attn")?;
            // The hypernetwork's blocks norm before attention and MLP (the Llama layout); a target
            // without such norms (OLMo 2) gives nothing to copy, so they start at ones.
            let norm = |r: &mut Registrar, which: &str, from: Option<&Norm>| -> Result<RmsNorm> {
                let from = from.and_then(Norm::as_rms);
                let name = format!("{p}.{which}.weight");
                match from {
                    Some(from) if !from_scratch => Ok(RmsNorm { weight: r.copy(&name, &from.weight)?, eps: from.eps }),
                    _ => Ok(RmsNorm { weight: r.ones(&name, d)?, eps: from.map_or(c.rms_norm_eps, |f| f.eps) }),
                }
            };
            let input_norm = norm(&mut r, "input_layernorm", src.input_layernorm.as_ref())?;
            let source_norm = norm(&mut r, "source_layernorm", src.input_layernorm.as_ref())?;
            let base_norm = norm(&mut r, "base_layernorm", src.input_layernorm.as_ref())?;
            let post_norm = norm(&mut r, "post_attention_layernorm", src.post_attention_layernorm.as_ref())?;
            let mlp = if from_scratch {
                Mlp {
                    gate_proj: Some(r.linear_new(&format!("{p}.mlp.gate_proj"), f, d)?),
                    up_proj: r.linear_new(&format!("{p}.mlp.up_proj"), f, d)?,
                    down_proj: r.linear_new(&format!("{p}.mlp.down_proj"), d, f)?,
                    // SwiGLU where the target's MLP has no gate to take the activation from.
                    act: if src.mlp.gate_proj.is_some() { src.mlp.act } else { crate::model::Activation::Silu },
                }
            } else {
                let gate = src.mlp.gate_proj.as_ref().ok_or_else(|| Error::invalid("copying an MLP without a gate into the hypernetwork"))?;
                Mlp {
                    gate_proj: Some(r.linear_copy(&format!("{p}.mlp.gate_proj"), gate)?),
                    up_proj: r.linear_copy(&format!("{p}.mlp.up_proj"), &src.mlp.up_proj)?,
                    down_proj: r.linear_copy(&format!("{p}.mlp.down_proj"), &src.mlp.down_proj)?,
                    act: src.mlp.act,
                }
            };
            blocks.push(HyperBlock { input_norm, self_attn, source_norm, source_attn, base_norm, base_attn, post_norm, mlp });
        }
        let norm = match target.norm.as_rms() {
            Some(n) => RmsNorm { weight: r.copy("hypernet.norm.weight", &n.weight)?, eps: n.eps },
            None => RmsNorm { weight: r.ones("hypernet.norm.weight", d)?, eps: target.norm.eps() },
        };
        // Copied blocks keep the target's RoPE (partial ones included: their q/k rows are in its
        // layout); blocks from scratch get plain RoPE over whole heads where the target's covers
        // part of each (GPT-NeoX, Phi-4-mini) or none (GPT-2).
        let rope = if c.rotary_dims == hd || !from_scratch { target.rope().clone() } else { Rope::new(&RopeConfig { theta: c.rope.theta, scaling: RopeScaling::None }, hd) };
        let pointer = PointerHead::new(&mut r, d, h, hkv, hd, config.self_bias, config.pointer_rope, config.pointer_scale)?;
        Ok(HyperNetwork { config: config.clone(), embed_tokens, embed_scale: target.embed_scale(), blocks, norm, pointer, rope })
    }

    /// Run the hypernetwork: `z [B, D]` and `W [B, T_s+1, T_b]`.
    pub fn forward(&self, inp: &HyperInput) -> Result<HyperOutput> {
        let (b, te) = inp.instruction.dims();
        let (bb, tb, l1, d) = inp.base_states.dims4()?;
        let (bs, ts, ls, ds) = inp.source_states.dims4()?;
        if bb != b || bs != b || ls != l1 || ds != d || inp.base_mask.dims() != [b, tb] || inp.source_mask.dims() != [b, ts] {
            return Err(Error::invalid(format!(
                "hypernetwork inputs do not fit: instruction [{b}, {te}], base states {:?} / mask {:?}, source states {:?} / mask {:?}",
                inp.base_states.dims(),
                inp.base_mask.dims(),
                inp.source_states.dims(),
                inp.source_mask.dims()
            )));
        }
        if self.config.layer >= l1 {
            return Err(Error::invalid(format!("intervention layer {} but only {l1} hidden-state indices were given", self.config.layer)));
        }
        let dev = self.embed_tokens.device();
        // Keys and values: the visible tokens' states only, packed (a hidden key's weight is
        // exactly 0 after the softmax, so leaving it out changes nothing); positions
        // cumsum(M)·M along the reference's flattened order are 1.. over the visible entries.
        let (eb, mb_flat, bpos, nb) = pack_visible(inp.base_states, inp.base_mask)?; // [B, n_b, D]
        let (es, ms_flat, spos, ns) = pack_visible(inp.source_states, inp.source_mask)?; // [B, n_s, D]
        let instr_mask = inp.instruction.mask();
        // The reference's instruction positions: cumsum(mask), 1-based.
        let instr_pos: Vec<u32> = instr_mask
            .chunks(te)
            .flat_map(|row| {
                let mut acc = 0u32;
                row.iter().map(move |&x| {
                    acc += x as u32;
                    acc
                })
            })
            .collect();
        let (qc, qs) = self.rope.cos_sin(&instr_pos, b, te, DType::F32, dev)?; // [B, 1, T_e, hd]
        let (bc, bsn) = self.rope.cos_sin(&bpos, b, nb, DType::F32, dev)?; // [B, 1, n_b, hd]
        let (sc, ssn) = self.rope.cos_sin(&spos, b, ns, DType::F32, dev)?; // [B, 1, n_s, hd]
        let mask_t = |v: &[u32], t: usize| Tensor::from_vec(v.to_vec(), (b, t), dev);
        let self_mask = causal_mask(&Tensor::from_vec(instr_mask.iter().map(|&x| x as u32).collect::<Vec<_>>(), (b, te), dev)?)?; // [B, 1, T_e, T_e]
        let base_keys = key_mask(&mask_t(&mb_flat, nb)?)?; // [B, 1, 1, n_b]
        let source_keys = key_mask(&mask_t(&ms_flat, ns)?)?; // [B, 1, 1, n_s]

        let ids = inp.instruction.input_ids.flatten_all()?;
        let mut x = self.embed_tokens.index_select(&ids, 0)?.reshape((b, te, d))?; // [B, T_e, D]
        if let Some(s) = self.embed_scale {
            x = (x * s)?; // [B, T_e, D]
        }
        for blk in &self.blocks {
            let n = blk.input_norm.forward(&x)?;
            x = (&x + blk.self_attn.attend(&n, &n, (&qc, &qs), (&qc, &qs), &self_mask)?)?; // [B, T_e, D]
            if !self.config.ablate_source {
                let n = blk.source_norm.forward(&x)?;
                x = (&x + blk.source_attn.attend(&n, &es, (&qc, &qs), (&sc, &ssn), &source_keys)?)?; // [B, T_e, D]
            }
            if !self.config.ablate_base {
                let n = blk.base_norm.forward(&x)?;
                x = (&x + blk.base_attn.attend(&n, &eb, (&qc, &qs), (&bc, &bsn), &base_keys)?)?; // [B, T_e, D]
            }
            x = (&x + blk.mlp.forward(&blk.post_norm.forward(&x)?)?)?; // [B, T_e, D]
        }
        let z_all = self.norm.forward(&x)?; // [B, T_e, D]
        let z = z_all.narrow(1, te - 1, 1)?.squeeze(1)?; // [B, D] (left padding: the last token is real)
        let condition = match self.config.subspace_input {
            SubspaceInput::Last => z.clone(),
            SubspaceInput::Centered => centered_last(&z_all, &inp.instruction.attention_mask)?, // [B, D]
        };
        let last_pos: Vec<u32> = instr_pos.chunks(te).map(|row| row[te - 1]).collect();
        let layer_l = |st: &Tensor, mask: &Tensor| -> Result<Tensor> {
            let u = kernels::unit_rows(&st.narrow(2, self.config.layer, 1)?.squeeze(2)?.to_dtype(DType::F32)?.detach())?; // [B, T, D] unit rows
            match self.config.pointer_states {
                PointerStates::Unit => Ok(u),
                PointerStates::Centered => centered_rows(&u, mask),
            }
        };
        let hb = layer_l(inp.base_states, inp.base_mask)?; // [B, T_b, D]
        let hs = layer_l(inp.source_states, inp.source_mask)?; // [B, T_s, D]
        let w = self.pointer.forward(&z, &last_pos, &hb, inp.base_mask, &hs, inp.source_mask, &self.rope)?;
        Ok(HyperOutput { z, condition, w })
    }
}

/// `u [B, T, D]` minus its mean over each row's visible positions (`mask [B, T]`, 0/1), then
/// unit-normalised ([`PointerStates::Centered`]). A row with one visible position becomes 0 there.
pub fn centered_rows(u: &Tensor, mask: &Tensor) -> Result<Tensor> {
    kernels::unit_rows(&u.broadcast_sub(&masked_mean(u, mask)?)?) // [B, T, D]
}

/// The last position of `x [B, T, D]` less the mean over each row's visible positions (`mask
/// [B, T]`, 0/1): `[B, D]`, [`SubspaceInput::Centered`]'s condition `z − mean_t z_t` (left
/// padding: the last position is real).
pub fn centered_last(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let t = x.dim(1)?;
    Ok((x.narrow(1, t - 1, 1)? - masked_mean(x, mask)?)?.squeeze(1)?) // [B, D]
}

/// The mean of `x [B, T, D]` over each row's visible positions (`mask [B, T]`, 0/1): `[B, 1, D]`
/// (0 for a row with none visible), in `x`'s dtype.
fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(x.dtype())?.unsqueeze(2)?; // [B, T, 1]
    let n = m.sum_keepdim(1)?.clamp(1f32, f32::MAX)?; // [B, 1, 1] visible positions
    Ok(x.broadcast_mul(&m)?.sum_keepdim(1)?.broadcast_div(&n)?) // [B, 1, D]
}

/// The unit-normalised states of the visible tokens of `states [B, T, L+1, D]` (mask
/// `[B, T]`), flattened token-major, layer-minor as the reference does, packed to the batch's
/// longest `n` and padded with masked entries: `([B, n, D], mask [B·n], RoPE positions [B·n], n)`.
/// Positions are 1, 2, … over the visible entries (the reference's `cumsum(M)·M`) and 0 on padding.
fn pack_visible(states: &Tensor, mask: &Tensor) -> Result<(Tensor, Vec<u32>, Vec<u32>, usize)> {
    let (b, t, l1, d) = states.dims4()?;
    let m = mask.to_dtype(DType::U32)?.to_vec2::<u32>()?;
    let visible: Vec<Vec<usize>> = m.iter().map(|row| row.iter().enumerate().filter(|(_, x)| **x > 0).map(|(i, _)| i).collect()).collect();
    let n = visible.iter().map(|v| v.len() * l1).max().unwrap_or(0).max(1);
    let (mut idx, mut flat, mut pos) = (Vec::with_capacity(b * n), Vec::with_capacity(b * n), Vec::with_capacity(b * n));
    for (row, toks) in visible.iter().enumerate() {
        let mut k = 0u32;
        for &tok in toks {
            for layer in 0..l1 {
                k += 1;
                idx.push(((row * t + tok) * l1 + layer) as u32);
                flat.push(1);
                pos.push(k);
            }
        }
        for _ in toks.len() * l1..n {
            idx.push((row * t * l1) as u32); // any finite row: masked
            flat.push(0);
            pos.push(0);
        }
    }
    let idx = Tensor::from_vec(idx, b * n, states.device())?; // [B·n]
    let rows = states.detach().reshape((b * t * l1, d))?.index_select(&idx, 0)?.to_dtype(DType::F32)?; // [B·n, D]
    Ok((kernels::unit_rows(&rows)?.reshape((b, n, d))?, flat, pos, n))
}
