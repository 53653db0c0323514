//! Pre-training the toy model: a Llama-architecture model built by our own `model/` code from
//! `Var`s, trained with [`crate::train`]'s AdamW and schedule on the toy world's facts.
//!
//! Objective: cross-entropy on the value tokens of `<s> prompt value` (teacher-forced), over
//! every training template of every attribute and city. Only the answer is scored: prompts
//! are fixed text and city names are unpredictable, so their tokens would only add noise.
//! Metric: first-token accuracy per attribute (arg-max at the first value token), on the
//! training templates and on the held-out templates (facts seen, phrasings not).

use std::path::Path;
use std::time::Instant;

use candle_core::{D, DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::config::ToyConfig;
use super::world::{Encoded, World, encode_examples};
use crate::data::collate::{LabelBatch, label_batch};
use crate::error::{Error, Result};
use crate::model::{Llama, LlamaConfig, TextTokenizer};
use crate::params::ParamStore;
use crate::rng::Rng;
use crate::train::{AdamW, AdamWConfig, Decay, MetricsLog, Schedule};

/// Accuracy of one attribute.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttributeAccuracy {
    pub attribute: String,
    /// First-token accuracy on training templates.
    pub train: f64,
    /// First-token accuracy on held-out templates.
    pub held_out: f64,
}

/// `n` draws of N(0, std) from our seeded generator: the initialisation does not depend on
/// candle's RNG, so it is the same on every machine and version.
fn normal(rng: &mut Rng, n: usize, std: f64) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() * std) as f32).collect()
}

/// The HF names of the weights held at zero by `token_local_blocks` and `attention_only_blocks`.
pub fn frozen_zero_names(cfg: &ToyConfig) -> Vec<String> {
    let mut names = Vec::new();
    for i in 0..cfg.token_local_blocks.min(cfg.layers) {
        for w in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            names.push(format!("model.layers.{i}.self_attn.{w}.weight"));
        }
    }
    for i in cfg.layers.saturating_sub(cfg.attention_only_blocks)..cfg.layers {
        for w in ["gate_proj", "up_proj", "down_proj"] {
            names.push(format!("model.layers.{i}.mlp.{w}.weight"));
        }
    }
    names
}

/// Register the model's parameters under their HF names (GPT-2/Llama-style initialisation:
/// N(0, 0.02), output projections scaled by 1/√(2L), norms at 1).
pub fn init_params(cfg: &LlamaConfig, seed: u64, device: &Device) -> Result<ParamStore> {
    Ok(init_params_except(cfg, seed, device, &[])?.0)
}

/// [`init_params`] with the weights named in `frozen` held at zero: they are returned as plain
/// tensors (not `Var`s, so never trained) instead of being registered.
pub fn init_params_except(cfg: &LlamaConfig, seed: u64, device: &Device, frozen: &[String]) -> Result<(ParamStore, Frozen)> {
    let mut rng = Rng::derive(seed, "toy/init");
    let mut ps = ParamStore::new();
    let mut zeros = Frozen::new();
    let (v, d, f, l) = (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers);
    let (q, kv) = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim);
    let std = 0.02;
    let out_std = std / (2.0 * l as f64).sqrt();
    let mut mat = |ps: &mut ParamStore, name: String, rows: usize, cols: usize, s: f64| -> Result<()> {
        if frozen.contains(&name) {
            zeros.push((name, Tensor::zeros((rows, cols), DType::F32, device)?));
            return Ok(());
        }
        ps.add(name, Tensor::from_vec(normal(&mut rng, rows * cols, s), (rows, cols), device)?)?;
        Ok(())
    };
    mat(&mut ps, "model.embed_tokens.weight".into(), v, d, std)?;
    for i in 0..l {
        let p = format!("model.layers.{i}");
        ps.add(format!("{p}.input_layernorm.weight"), Tensor::ones(d, DType::F32, device)?)?;
        mat(&mut ps, format!("{p}.self_attn.q_proj.weight"), q, d, std)?;
        mat(&mut ps, format!("{p}.self_attn.k_proj.weight"), kv, d, std)?;
        mat(&mut ps, format!("{p}.self_attn.v_proj.weight"), kv, d, std)?;
        mat(&mut ps, format!("{p}.self_attn.o_proj.weight"), d, q, out_std)?;
        ps.add(format!("{p}.post_attention_layernorm.weight"), Tensor::ones(d, DType::F32, device)?)?;
        mat(&mut ps, format!("{p}.mlp.gate_proj.weight"), f, d, std)?;
        mat(&mut ps, format!("{p}.mlp.up_proj.weight"), f, d, std)?;
        mat(&mut ps, format!("{p}.mlp.down_proj.weight"), d, f, out_std)?;
    }
    ps.add("model.norm.weight", Tensor::ones(d, DType::F32, device)?)?;
    mat(&mut ps, "lm_head.weight".into(), v, d, std)?;
    Ok((ps, zeros))
}

/// A model whose weights are the store's variables (shared storage: updates are seen, gradients flow).
pub fn model_from_params(ps: &ParamStore, cfg: &LlamaConfig, device: &Device) -> Result<Llama> {
    model_from_params_and(ps, &[], cfg, device)
}

/// [`model_from_params`] with `frozen` tensors (not trained) filling in the remaining weights.
pub fn model_from_params_and(ps: &ParamStore, frozen: &[(String, Tensor)], cfg: &LlamaConfig, device: &Device) -> Result<Llama> {
    Llama::load(&crate::model::weights::Weights::Tensors(all_weights(ps, frozen)), cfg, DType::F32, device)
}

/// Every weight of the model by HF name: the trained variables and the held-at-zero tensors.
fn all_weights(ps: &ParamStore, frozen: &[(String, Tensor)]) -> std::collections::HashMap<String, Tensor> {
    ps.iter().map(|(n, v)| (n.to_string(), v.as_tensor().clone())).chain(frozen.iter().cloned()).collect()
}

/// Left-padded batch predicting the first value token (`all_labels = false`, for accuracy) or
/// every value token (for the loss).
fn batch_of(items: &[&Encoded], all_labels: bool, pad: u32, device: &Device) -> Result<LabelBatch> {
    let seqs: Vec<(&[u32], usize)> = items.iter().map(|e| (e.ids.as_slice(), e.label_start)).collect();
    label_batch(&seqs, if all_labels { None } else { Some(1) }, pad, device)
}

/// Masked mean cross-entropy of `logits [B, K, V]` against `targets`.
fn cross_entropy(logits: &Tensor, targets: &[u32], valid: &[f32]) -> Result<Tensor> {
    let n: f32 = valid.iter().sum();
    crate::train::loss::weighted_cross_entropy(logits, targets, valid, n.max(1.0))
}

/// First-token accuracy per attribute over `items`.
pub fn accuracy(model: &Llama, items: &[Encoded], n_attributes: usize, pad: u32, batch_size: usize) -> Result<Vec<f64>> {
    let mut hit = vec![0usize; n_attributes];
    let mut all = vec![0usize; n_attributes];
    let refs: Vec<&Encoded> = items.iter().collect();
    for chunk in refs.chunks(batch_size.max(1)) {
        let lb = batch_of(chunk, false, pad, model.device())?;
        let h = model.forward_hidden(&lb.tokens, Some(&[]))?;
        let pred = model.logits_at(&h.final_normed, &lb.positions)?.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?; // [B]
        for ((e, p), t) in chunk.iter().zip(pred).zip(lb.targets) {
            all[e.attribute] += 1;
            hit[e.attribute] += usize::from(p == t);
        }
    }
    Ok(hit.iter().zip(&all).map(|(&h, &a)| if a == 0 { 0.0 } else { h as f64 / a as f64 }).collect())
}

/// Batches per length bucket.
const BUCKET: usize = 16;

/// The weights held at zero (not trained), by HF name.
pub type Frozen = Vec<(String, Tensor)>;

/// Train on `world` and return the parameters, the held-at-zero weights and the model; `log`
/// receives the curve.
pub fn pretrain(cfg: &ToyConfig, world: &World, tok: &TextTokenizer, llama: &LlamaConfig, log: &mut MetricsLog, progress: bool) -> Result<(ParamStore, Frozen, Llama)> {
    let device = Device::Cpu;
    let train = encode_examples(tok, &world.examples(true))?;
    let held = encode_examples(tok, &world.examples(false))?;
    let pad = tok.padding_id();
    let (params, frozen) = init_params_except(llama, cfg.seed, &device, &frozen_zero_names(cfg))?;
    let model = model_from_params_and(&params, &frozen, llama, &device)?;
    let mut opt = AdamW::new(&params, AdamWConfig { weight_decay: cfg.weight_decay, beta2: 0.99, ..Default::default() })?;
    let schedule = Schedule { peak: cfg.lr, warmup_steps: cfg.warmup_steps, total_steps: cfg.steps, decay: Decay::Cosine, min_ratio: 0.05 };
    let mut rng = Rng::derive(cfg.seed, "toy/batches");
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut cursor = order.len();
    let mut queue: Vec<Vec<usize>> = Vec::new();
    // Fixed samples for the curve.
    let sample = |items: &[Encoded], label: &str| -> Vec<usize> {
        let mut idx: Vec<usize> = (0..items.len()).collect();
        Rng::derive(cfg.seed, label).shuffle(&mut idx);
        idx.truncate(300);
        idx
    };
    let train_sample: Vec<Encoded> = sample(&train, "toy/sample-train").into_iter().map(|i| train[i].clone()).collect();
    let held_sample: Vec<Encoded> = sample(&held, "toy/sample-held").into_iter().map(|i| held[i].clone()).collect();
    // The planted subspace (if any): its own pair stream, so the language-model batches are the
    // same with and without it; a fixed held-out sample of pairs for the curve.
    let plant = super::plant::Plant::new(cfg, world, &device)?;
    let mut pair_rng = Rng::derive(cfg.seed, "toy/plant-pairs");
    let mut pair_queue: Vec<Vec<super::plant::Pair>> = Vec::new();
    let held_pairs = match &plant {
        Some(p) => super::plant::draw_pairs(&mut Rng::derive(cfg.seed, "toy/plant-held"), &held, world.cities.len(), &p.attributes, 300),
        None => Vec::new(),
    };
    let pb = crate::progress::bar(cfg.steps as u64, "training the toy model [{bar:30}] {pos}/{len} steps {elapsed} (eta {eta}) {msg}", progress);
    let t0 = Instant::now();
    let mut ema = None;
    for step in 0..cfg.steps {
        // Length bucketing: every BUCKET batches, draw BUCKET × B examples, sort them by
        // length and cut them into batches (served in random order): far less padding.
        if queue.is_empty() {
            let mut pool = Vec::with_capacity(BUCKET * cfg.batch_size);
            while pool.len() < BUCKET * cfg.batch_size {
                if cursor == order.len() {
                    rng.shuffle(&mut order);
                    cursor = 0;
                }
                pool.push(order[cursor]);
                cursor += 1;
            }
            pool.sort_by_key(|&i| train[i].ids.len());
            queue = pool.chunks(cfg.batch_size).map(|c| c.to_vec()).collect();
            rng.shuffle(&mut queue);
        }
        let picked = queue.pop().unwrap_or_default();
        let items: Vec<&Encoded> = picked.iter().map(|&i| &train[i]).collect();
        let lb = batch_of(&items, true, pad, &device)?;
        let h = model.forward_hidden(&lb.tokens, Some(&[]))?;
        let logits = model.logits_at(&h.final_normed, &lb.positions)?; // [B, K, V]
        let lm_loss = cross_entropy(&logits, &lb.targets, &lb.valid)?;
        let mut interchange = None;
        let loss = match &plant {
            Some(p) => {
                // Length-bucketed like the language-model batches (base and source share the template).
                if pair_queue.is_empty() {
                    let mut pool = super::plant::draw_pairs(&mut pair_rng, &train, world.cities.len(), &p.attributes, BUCKET * cfg.batch_size);
                    pool.sort_by_key(|&(b, _, _)| train[b].ids.len());
                    pair_queue = pool.chunks(cfg.batch_size).map(|c| c.to_vec()).collect();
                    pair_rng.shuffle(&mut pair_queue);
                }
                let pairs = pair_queue.pop().unwrap_or_default();
                let (logits, lb) = super::plant::interchange_logits(&model, p, &train, &pairs, None, pad)?; // [B, K, V]
                let il = cross_entropy(&logits, &lb.targets, &lb.valid)?;
                interchange = Some(il.to_scalar::<f32>()? as f64);
                (lm_loss + (il * p.weight)?)?
            }
            None => lm_loss,
        };
        let grads = loss.backward()?;
        if step == 0 {
            params.check_gradients(&grads)?;
        }
        let lr = schedule.lr(step);
        let info = opt.step(&grads, lr)?;
        let l = loss.to_scalar::<f32>()? as f64;
        if !l.is_finite() {
            return Err(Error::invalid(format!("the toy model's loss became {l} at step {step}")));
        }
        ema = Some(ema.map_or(l, |e: f64| 0.9 * e + 0.1 * l));
        let mut record = serde_json::json!({"step": step + 1, "loss": l, "lr": lr, "grad_norm": info.grad_norm, "seconds": t0.elapsed().as_secs_f64()});
        if let Some(il) = interchange {
            record["interchange_loss"] = serde_json::json!(il);
        }
        if (step + 1) % cfg.eval_every == 0 || step + 1 == cfg.steps {
            let tr = accuracy(&model, &train_sample, world.attributes.len(), pad, 128)?;
            let ho = accuracy(&model, &held_sample, world.attributes.len(), pad, 128)?;
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
            record["train_accuracy"] = serde_json::json!(mean(&tr));
            record["held_out_accuracy"] = serde_json::json!(mean(&ho));
            let mut msg = format!("loss {:.3} acc {:.2}/{:.2}", ema.unwrap_or(l), mean(&tr), mean(&ho));
            if let Some(p) = &plant {
                let acc = super::plant::interchange_accuracy(&model, p, &held, &held_pairs, pad)?;
                let mean = |f: fn(&(f64, f64)) -> f64| acc.iter().map(f).sum::<f64>() / acc.len().max(1) as f64;
                let (cause, isolate) = (mean(|a| a.0), mean(|a| a.1));
                record["interchange_cause"] = serde_json::json!(cause);
                record["interchange_isolate"] = serde_json::json!(isolate);
                msg += &format!(" swap {cause:.2}/{isolate:.2}");
            }
            pb.set_message(msg);
        } else if step % 10 == 0 {
            pb.set_message(format!("loss {:.3}", ema.unwrap_or(l)));
        }
        log.log(&record)?;
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok((params, frozen, model))
}

/// Accuracy of one template.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TemplateAccuracy {
    pub attribute: String,
    pub template: String,
    /// false: held out.
    pub train: bool,
    pub accuracy: f64,
}

/// Full per-attribute accuracy on training and held-out templates.
pub fn evaluate(model: &Llama, tok: &TextTokenizer, world: &World) -> Result<Vec<AttributeAccuracy>> {
    let pad = tok.padding_id();
    let tr = accuracy(model, &encode_examples(tok, &world.examples(true))?, world.attributes.len(), pad, 128)?;
    let ho = accuracy(model, &encode_examples(tok, &world.examples(false))?, world.attributes.len(), pad, 128)?;
    Ok(world.attributes.iter().enumerate().map(|(i, a)| AttributeAccuracy { attribute: a.clone(), train: tr[i], held_out: ho[i] }).collect())
}

/// First-token accuracy of every template (which phrasings the model has not generalised to).
pub fn evaluate_templates(model: &Llama, tok: &TextTokenizer, world: &World) -> Result<Vec<TemplateAccuracy>> {
    let pad = tok.padding_id();
    let mut out = Vec::new();
    for train in [true, false] {
        let examples = world.examples(train);
        let enc = encode_examples(tok, &examples)?;
        // Reuse the per-"attribute" counter with the template index as the class.
        let by_template: Vec<Encoded> = enc.into_iter().zip(&examples).map(|(e, x)| Encoded { attribute: x.template, ..e }).collect();
        let acc = accuracy(model, &by_template, world.templates.len(), pad, 128)?;
        for (t, tpl) in world.templates.iter().enumerate().filter(|(_, t)| t.train == train) {
            out.push(TemplateAccuracy { attribute: world.attributes[tpl.attribute].clone(), template: tpl.text.clone(), train, accuracy: acc[t] });
        }
    }
    Ok(out)
}

/// Write the HF directory: config.json, model.safetensors, tokenizer files.
pub fn save_hf(dir: &Path, config_json: &serde_json::Value, params: &ParamStore, frozen: &[(String, Tensor)]) -> Result<()> {
    let cfg_path = dir.join("config.json");
    std::fs::write(&cfg_path, serde_json::to_string_pretty(config_json).map_err(|e| Error::invalid(e.to_string()))?).map_err(|e| Error::file(&cfg_path, format!("cannot write: {e}")))?;
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&all_weights(params, frozen), &path).map_err(|e| Error::file(&path, format!("cannot write: {e}")))
}
