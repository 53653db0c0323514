//! Parity with transformers 5.24 on reference dumps made by tools/make_fixtures.py: hidden
//! states, logits, gradients and token ids, for every loading path.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use hyperdas::model::{Site, TokenBatch};
use hyperdas::parity::{self, Reference};

/// Tolerance the issue sets for the tiny model in f32.
const TINY_TOL: f64 = 1e-4;

fn assert_parity(model_path: &std::path::Path, reference: &str, tol: f64, expect: &[&str]) {
    let lm = load(model_path, DType::F32);
    let r = Reference::open(&fixture(reference)).unwrap();
    let report = parity::compare(&lm, &r).unwrap();
    let names: Vec<&str> = report.diffs.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, expect, "compared tensors");
    for d in &report.diffs {
        eprintln!("{} {}: max|diff| {:.3e} (max|ref| {:.3e}, {} values)", model_path.display(), d.name, d.max_abs_diff, d.max_abs_ref, d.compared);
        assert!(d.compared > 0);
        let tol = d.tolerance(tol); // gradients: relative where looser (see its doc)
        assert!(d.max_abs_diff <= tol, "{}: {} differs by {:e} > {tol:e}", model_path.display(), d.name, d.max_abs_diff);
    }
    let mm = report.token_mismatches.expect("fixture records its prompts");
    assert!(mm.is_empty(), "token ids differ from transformers: {mm:?}");
}

#[test]
fn tiny_llama_safetensors_matches_transformers() {
    assert_parity(&fixture("tiny-llama"), "tiny-llama-reference.safetensors", TINY_TOL, &["hidden_states", "logits", "grad_resid_1"]);
}

#[test]
fn tiny_llama_gguf_matches_transformers() {
    // q/k rows permuted by the llama.cpp convention, llama3 scaling as rope_freqs, tokenizer
    // from metadata: all must be undone to match.
    assert_parity(&fixture("tiny-llama.gguf"), "tiny-llama-reference.safetensors", TINY_TOL, &["hidden_states", "logits", "grad_resid_1"]);
}

#[test]
fn tiny_qwen2_with_biases_and_tied_embeddings_matches_transformers() {
    assert_parity(&fixture("tiny-qwen2"), "tiny-qwen2-reference.safetensors", TINY_TOL, &["hidden_states", "logits", "grad_resid_1"]);
}

#[test]
fn tiny_qwen3_with_per_head_qk_norms_matches_transformers() {
    assert_parity(&fixture("tiny-qwen3"), "tiny-qwen3-reference.safetensors", TINY_TOL, &["hidden_states", "logits", "grad_resid_1"]);
}

#[test]
fn tiny_mistral_with_a_sliding_window_matches_transformers() {
    // Window 3, shorter than the prompts: ignoring it would change every later position.
    assert_parity(&fixture("tiny-mistral"), "tiny-mistral-reference.safetensors", TINY_TOL, &["hidden_states", "logits", "grad_resid_1"]);
}

#[test]
fn tiny_gemma2_with_capped_scores_matches_transformers() {
    // Scores capped at 3 and logits at 5 (both bind on these weights), sliding window 4 on
    // alternate layers, (1 + w) norms, √D embeddings.
    assert_parity(&fixture("tiny-gemma2"), "tiny-gemma2-reference.safetensors", TINY_TOL, &["hidden_states", "logits", "grad_resid_1"]);
}

#[test]
fn tiny_olmo2_with_output_norms_matches_transformers() {
    assert_parity(&fixture("tiny-olmo2"), "tiny-olmo2-reference.safetensors", TINY_TOL, &["hidden_states", "logits", "grad_resid_1"]);
}

#[test]
fn tiny_phi3_with_fused_projections_matches_transformers() {
    assert_parity(&fixture("tiny-phi3"), "tiny-phi3-reference.safetensors", TINY_TOL, &["hidden_states", "logits", "grad_resid_1"]);
}

#[test]
fn tiny_gpt2_with_layer_norms_and_learned_positions_matches_transformers() {
    // Conv1D weights transposed at load, LayerNorm biases, wpe at the padded rows' positions.
    assert_parity(&fixture("tiny-gpt2"), "tiny-gpt2-reference.safetensors", TINY_TOL, &["hidden_states", "logits", "grad_resid_1"]);
}

#[test]
fn a_gpt2_checkpoint_without_the_transformer_prefix_loads_identically() {
    // The hub's `gpt2` stores GPT2Model's names (`h.0.attn...`, `wte.weight`), not GPT2LMHeadModel's.
    let dir = copy_dir(&fixture("tiny-gpt2"));
    let st = dir.path().join("model.safetensors");
    let tensors = candle_core::safetensors::load(&st, &Device::Cpu).unwrap();
    let renamed: HashMap<String, Tensor> = tensors.into_iter().map(|(k, v)| (k.strip_prefix("transformer.").unwrap_or(&k).to_string(), v)).collect();
    assert!(renamed.contains_key("wte.weight"));
    candle_core::safetensors::save(&renamed, &st).unwrap();
    assert_parity(dir.path(), "tiny-gpt2-reference.safetensors", TINY_TOL, &["hidden_states", "logits", "grad_resid_1"]);
}

#[test]
fn tiny_gpt_neox_with_partial_rotary_and_parallel_residual_matches_transformers() {
    // RoPE on 4 of 16 dimensions per head, q/k/v fused per head, parallel attention and MLP.
    assert_parity(&fixture("tiny-gpt-neox"), "tiny-gpt-neox-reference.safetensors", TINY_TOL, &["hidden_states", "logits", "grad_resid_1"]);
}

#[test]
fn a_pythia_config_in_the_transformers4_spelling_gives_identical_outputs() {
    // The hub's Pythia configs: `rotary_pct` and `rotary_emb_base`, no `rope_parameters`.
    let dir = copy_dir(&fixture("tiny-gpt-neox"));
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    let obj = cfg.as_object_mut().unwrap();
    obj.remove("rope_parameters");
    obj.insert("rotary_pct".into(), serde_json::json!(0.25));
    obj.insert("rotary_emb_base".into(), serde_json::json!(10000));
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    let c = load(dir.path(), DType::F32).model.config;
    assert_eq!((c.rotary_dims, c.head_dim, c.rope.theta), (4, 16, 10000.0));
    assert_parity(dir.path(), "tiny-gpt-neox-reference.safetensors", TINY_TOL, &["hidden_states", "logits", "grad_resid_1"]);
}

#[test]
fn the_text_decoder_of_a_multimodal_gemma3_checkpoint_matches_transformers() {
    // tiny-gemma3's weights nested as `language_model.model.*` beside a vision tower, with a
    // `model_type: gemma3` config whose `text_config` describes the decoder: the same reference.
    assert_parity(&fixture("tiny-gemma3-multimodal"), "tiny-gemma3-reference.safetensors", TINY_TOL, &["hidden_states", "logits", "grad_resid_1"]);
}

#[test]
fn tiny_phi3_with_longrope_short_and_long_factors_matches_transformers() {
    // The same weights under Phi 3 128k's scaling: below the original context (64) the short
    // divisors, past it (16) the long ones; cos / sin scaled by √(1 + ln(s) / ln(original)).
    for (name, original) in [("short", 64), ("long", 16)] {
        let dir = copy_dir(&fixture("tiny-phi3"));
        std::fs::copy(fixture(&format!("tiny-phi3-longrope-{name}-config.json")), dir.path().join("config.json")).unwrap();
        let lm = load(dir.path(), DType::F32);
        match &lm.model.config.rope.scaling {
            hyperdas::model::RopeScaling::LongRope { original_max_position_embeddings, .. } => assert_eq!(*original_max_position_embeddings, original),
            other => panic!("{name}: {other:?}"),
        }
        assert_parity(dir.path(), &format!("tiny-phi3-longrope-{name}-reference.safetensors"), TINY_TOL, &["hidden_states", "logits", "grad_resid_1"]);
    }
}

#[test]
fn tiny_phi3_with_partial_rotary_embeddings_matches_transformers() {
    // Phi-4-mini's partial_rotary_factor: RoPE on 6 of each head's 12 dimensions. The q/k rows
    // are reordered at load, so the block stays the Llama block (fast path).
    let dir = copy_dir(&fixture("tiny-phi3"));
    std::fs::copy(fixture("tiny-phi3-partial-config.json"), dir.path().join("config.json")).unwrap();
    let c = load(dir.path(), DType::F32).model.config;
    assert_eq!((c.rotary_dims, c.head_dim), (6, 12));
    assert!(c.is_llama_block());
    assert_parity(dir.path(), "tiny-phi3-partial-reference.safetensors", TINY_TOL, &["hidden_states", "logits", "grad_resid_1"]);
}

#[test]
fn tiny_phi3_with_partial_rotary_a_window_and_longrope_matches_transformers() {
    // Phi-4-mini's combination: the sliding layers' RoPE tables cover the rotated half only, and
    // the longrope divisors (3, for 6 rotated dimensions) apply to it alone.
    let dir = copy_dir(&fixture("tiny-phi3"));
    std::fs::copy(fixture("tiny-phi3-partial-window-config.json"), dir.path().join("config.json")).unwrap();
    let c = load(dir.path(), DType::F32).model.config;
    assert_eq!((c.rotary_dims, c.sliding_window), (6, Some(3)));
    assert!(matches!(c.rope.scaling, hyperdas::model::RopeScaling::LongRope { .. }));
    assert_parity(dir.path(), "tiny-phi3-partial-window-reference.safetensors", TINY_TOL, &["hidden_states", "logits", "grad_resid_1"]);
}

#[test]
fn gguf_files_of_the_other_families_match_transformers() {
    // As llama.cpp's converter writes them: GPT-2's Conv1D weights transposed (and its
    // feed_forward_length 4·D though the MLP is 2·D), GPT-NeoX's q/k/v regrouped [q; k; v] with
    // rope.dimension_count 4 of 16, Phi 3's fused projections, OLMo 2's whole-projection q/k norms,
    // Gemma 2's +1 norms with capped scores (and query_pre_attn_scalar = head_dim, all llama.cpp
    // knows, hence its own reference).
    for (gguf, reference) in [
        ("tiny-gpt2.gguf", "tiny-gpt2-reference.safetensors"),
        ("tiny-gpt-neox.gguf", "tiny-gpt-neox-reference.safetensors"),
        ("tiny-phi3.gguf", "tiny-phi3-reference.safetensors"),
        ("tiny-olmo2.gguf", "tiny-olmo2-reference.safetensors"),
        ("tiny-gemma2.gguf", "tiny-gemma2-gguf-reference.safetensors"),
    ] {
        assert_parity(&fixture(gguf), reference, TINY_TOL, &["hidden_states", "logits", "grad_resid_1"]);
    }
}

#[test]
fn tiny_qwen3_gguf_matches_transformers() {
    // llama.cpp's `qwen3`: no q/k row permutation, attn_q_norm / attn_k_norm, tied embeddings,
    // head_dim from `attention.key_length`.
    assert_parity(&fixture("tiny-qwen3.gguf"), "tiny-qwen3-reference.safetensors", TINY_TOL, &["hidden_states", "logits", "grad_resid_1"]);
}

#[test]
fn smollm2_matches_transformers_logits() {
    let Some(path) = smollm2() else { return };
    assert_parity(&path, "smollm2-reference.safetensors", 1e-3, &["last_logits"]);
}

#[test]
fn tiny_gemma3_safetensors_matches_transformers() {
    // 5 sliding layers (window 4, shorter than the prompts) and 1 global layer, q/k norms,
    // (1 + w) norms, GeGLU, √D embeddings, query_pre_attn_scalar ≠ head_dim, tied embeddings.
    assert_parity(&fixture("tiny-gemma3"), "tiny-gemma3-reference.safetensors", TINY_TOL, &["hidden_states", "logits", "grad_resid_1"]);
}

#[test]
fn tiny_gemma3_gguf_matches_transformers() {
    // The GGUF stores every norm weight with +1 baked in, q/k unpermuted, and the Gemma
    // tokenizer as scores and token types: all of it must come out as the HF model.
    assert_parity(&fixture("tiny-gemma3.gguf"), "tiny-gemma3-reference.safetensors", TINY_TOL, &["hidden_states", "logits", "grad_resid_1"]);
}

#[test]
fn tiny_gemma3_variant_with_soft_capping_and_explicit_layer_types_matches_transformers() {
    // Only a config.json can say this: layer types given explicitly, linear rope scaling on the
    // global layers, other rope bases, window 3, another query scale, final-logit soft-capping,
    // and an attn_logit_softcapping that transformers' Gemma 3 (and so ours) ignores.
    let dir = copy_dir(&fixture("tiny-gemma3"));
    std::fs::copy(fixture("tiny-gemma3-variant-config.json"), dir.path().join("config.json")).unwrap();
    let lm = load(dir.path(), DType::F32);
    let g = lm.model.config.gemma.as_ref().unwrap();
    assert_eq!(g.attn_logit_softcapping, Some(1.5));
    assert_eq!(g.final_logit_softcapping, Some(2.0));
    assert_eq!(lm.model.config.rope.scaling, hyperdas::model::RopeScaling::Linear { factor: 4.0 });
    assert_parity(dir.path(), "tiny-gemma3-variant-reference.safetensors", TINY_TOL, &["hidden_states", "logits", "grad_resid_1"]);
}

#[test]
fn gemma3_270m_matches_transformers_logits() {
    let Some(path) = gemma3() else { return };
    assert_parity(&path, "gemma3-270m-reference.safetensors", 1e-3, &["last_logits"]);
}

#[test]
fn transformers4_config_spelling_gives_identical_outputs() {
    // transformers 4 writes top-level rope_theta + rope_scaling instead of rope_parameters.
    let dir = copy_dir(&fixture("tiny-llama"));
    let cfg_path = dir.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    let mut params = cfg["rope_parameters"].take();
    let theta = params["rope_theta"].take();
    params.as_object_mut().unwrap().remove("rope_theta");
    cfg.as_object_mut().unwrap().remove("rope_parameters");
    cfg["rope_theta"] = theta;
    cfg["rope_scaling"] = params;
    std::fs::write(&cfg_path, serde_json::to_vec_pretty(&cfg).unwrap()).unwrap();
    let a = load(&fixture("tiny-llama"), DType::F32);
    let b = load(dir.path(), DType::F32);
    assert_eq!(a.model.config, b.model.config);
}

#[test]
fn sharded_safetensors_load_identically() {
    let dir = copy_dir(&fixture("tiny-llama"));
    let single = dir.path().join("model.safetensors");
    let tensors = candle_core::safetensors::load(&single, &Device::Cpu).unwrap();
    std::fs::remove_file(&single).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", first), ("model-00002-of-00002.safetensors", second)] {
        let shard: HashMap<String, Tensor> = part.iter().map(|n| ((*n).clone(), tensors[*n].clone())).collect();
        candle_core::safetensors::save(&shard, dir.path().join(file)).unwrap();
        for n in part {
            weight_map.insert((*n).clone(), serde_json::Value::String(file.into()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_parity(dir.path(), "tiny-llama-reference.safetensors", TINY_TOL, &["hidden_states", "logits", "grad_resid_1"]);
}

fn tiny_batch(lm: &hyperdas::model::LoadedModel) -> TokenBatch {
    let prompts = ["Paris is a city in the country of", "Tokyo", "The capital of Japan is"];
    let rows: Vec<Vec<u32>> = prompts.iter().map(|p| lm.tokenizer.encode_prompt(p).unwrap()).collect();
    TokenBatch::left_padded(&rows, lm.tokenizer.padding_id(), &Device::Cpu).unwrap()
}

#[test]
fn forward_from_reproduces_the_clean_pass_at_every_layer() {
    forward_from_reproduces_the_clean_pass("tiny-llama");
}

#[test]
fn gemma3_forward_from_reproduces_the_clean_pass_at_every_layer() {
    // Sliding layers read the context's local mask and RoPE tables, global ones the others.
    forward_from_reproduces_the_clean_pass("tiny-gemma3");
}

fn forward_from_reproduces_the_clean_pass(name: &str) {
    let lm = load(&fixture(name), DType::F32);
    let batch = tiny_batch(&lm);
    let ctx = lm.model.context(&batch).unwrap();
    let hs = lm.model.forward_hidden(&batch, None).unwrap();
    let stacked = hs.stacked.as_ref().unwrap();
    let n = lm.model.num_layers();
    let d = lm.model.hidden_size();
    assert_eq!(stacked.dims(), &[3, batch.dims().1, n + 1, d]);
    for l in 0..n {
        let resid = stacked.narrow(2, l, 1).unwrap().squeeze(2).unwrap();
        let out = lm.model.forward_from(l, &resid, &ctx).unwrap();
        let d = max_abs_diff(&out, &hs.final_normed);
        assert_eq!(d, 0.0, "forward_from({l}) differs from the clean pass by {d}");
    }
    // Index L is after the final norm; forward_from(L, x) is only the norm.
    let last = stacked.narrow(2, n, 1).unwrap().squeeze(2).unwrap();
    assert_eq!(max_abs_diff(&last, &hs.final_normed), 0.0);
    let x = Tensor::ones((3, batch.dims().1, d), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(max_abs_diff(&lm.model.forward_from(n, &x, &ctx).unwrap(), &lm.model.final_norm(&x).unwrap()), 0.0);
    // Selecting a subset returns the same tensors, in request order.
    let sub = lm.model.forward_hidden(&batch, Some(&[2, 0])).unwrap();
    let s = sub.stacked.unwrap();
    assert_eq!(max_abs_diff(&s.narrow(2, 0, 1).unwrap(), &stacked.narrow(2, 2, 1).unwrap()), 0.0);
    assert_eq!(max_abs_diff(&s.narrow(2, 1, 1).unwrap(), &stacked.narrow(2, 0, 1).unwrap()), 0.0);
    assert!(lm.model.forward_hidden(&batch, Some(&[n + 1])).is_err());
    assert!(lm.model.forward_from(n + 1, &hs.final_normed, &ctx).is_err());
    // A residual from another batch shape gets a clear error, not a broadcast failure.
    let wrong = Tensor::zeros((1, 5, d), DType::F32, &Device::Cpu).unwrap();
    let e = lm.model.forward_from(1, &wrong, &ctx).unwrap_err().to_string();
    assert!(e.contains(&format!("[1, 5, {d}]")) && e.contains("same (padded) batch"), "{e}");
}

#[test]
fn sites_hooks_and_forward_from_agree() {
    let lm = load(&fixture("tiny-llama"), DType::F32);
    let batch = tiny_batch(&lm);
    let ctx = lm.model.context(&batch).unwrap();
    let hs = lm.model.forward_hidden(&batch, None).unwrap();
    let stacked = hs.stacked.unwrap();
    // Replace the residual entering block 1 with a constant via the hook, and via forward_from.
    let replacement = Tensor::full(0.5f32, (3, batch.dims().1, 64), &Device::Cpu).unwrap();
    let hooked = lm.model.forward_with_hook(&batch, |l, _x| Ok(if l == 1 { Some(replacement.clone()) } else { None })).unwrap();
    let direct = lm.model.forward_from_site("blocks.1.hook_resid_pre".parse::<Site>().unwrap(), &replacement, &ctx).unwrap();
    assert_eq!(max_abs_diff(&hooked, &direct), 0.0);
    let via_pyvene = lm.model.forward_from_site("block_output.0".parse::<Site>().unwrap(), &replacement, &ctx).unwrap();
    assert_eq!(max_abs_diff(&via_pyvene, &direct), 0.0);
    // A no-op hook reproduces the clean pass; the hook sees exactly the clean residuals.
    let mut seen = Vec::new();
    let clean = lm
        .model
        .forward_with_hook(&batch, |l, x| {
            seen.push((l, x.clone()));
            Ok(None)
        })
        .unwrap();
    assert_eq!(max_abs_diff(&clean, &hs.final_normed), 0.0);
    for (l, x) in seen.iter().take(lm.model.num_layers()) {
        assert_eq!(max_abs_diff(x, &stacked.narrow(2, *l, 1).unwrap().squeeze(2).unwrap()), 0.0);
    }
    // Token ids outside the vocabulary are an error naming the id.
    let bad_ids = TokenBatch::left_padded(&[vec![1, 999]], 0, &Device::Cpu).unwrap();
    let e = lm.model.forward_hidden(&bad_ids, None).unwrap_err().to_string();
    assert!(e.contains("token id 999") && e.contains("320"), "{e}");
    // A hook returning the wrong shape is an error, not a panic.
    let bad = Tensor::zeros((1, 1, 64), DType::F32, &Device::Cpu).unwrap();
    assert!(lm.model.forward_with_hook(&batch, |_, _| Ok(Some(bad.clone()))).is_err());
}

#[test]
fn logits_at_selected_positions_equal_full_logits() {
    let lm = load(&fixture("tiny-qwen2"), DType::F32);
    let batch = tiny_batch(&lm);
    let hs = lm.model.forward_hidden(&batch, Some(&[])).unwrap();
    let full = lm.model.logits(&hs.final_normed).unwrap(); // [B, T, V]
    let t = batch.dims().1 as u32;
    let positions = Tensor::new(&[[t - 1, 0], [t - 2, t - 1], [3, 4]], &Device::Cpu).unwrap();
    let sel = lm.model.logits_at(&hs.final_normed, &positions).unwrap(); // [B, 2, V]
    for (b, ps) in positions.to_vec2::<u32>().unwrap().iter().enumerate() {
        for (k, &p) in ps.iter().enumerate() {
            let want = full.get(b).unwrap().get(p as usize).unwrap();
            assert_eq!(max_abs_diff(&sel.get(b).unwrap().get(k).unwrap(), &want), 0.0);
        }
    }
    let last = lm.model.logits_last(&hs.final_normed).unwrap();
    assert_eq!(max_abs_diff(&last, &full.narrow(1, t as usize - 1, 1).unwrap().squeeze(1).unwrap()), 0.0);
    let outside = Tensor::new(&[[t], [0], [0]], &Device::Cpu).unwrap();
    assert!(lm.model.logits_at(&hs.final_normed, &outside).is_err());
}

#[test]
fn a_row_does_not_depend_on_its_padding_or_batch_neighbours() {
    row_independent_of_padding("tiny-llama");
}

#[test]
fn a_gemma3_row_does_not_depend_on_its_padding_or_batch_neighbours() {
    // The sliding window counts padded indices, as transformers does; for left-padded rows
    // that is the distance in positions, so padding must not move the window.
    row_independent_of_padding("tiny-gemma3");
}

#[test]
fn gpt2_and_gpt_neox_rows_do_not_depend_on_their_padding_or_batch_neighbours() {
    // GPT-2's learned positions count from each row's first real token, as RoPE's do.
    row_independent_of_padding("tiny-gpt2");
    row_independent_of_padding("tiny-gpt-neox");
}

fn row_independent_of_padding(name: &str) {
    let lm = load(&fixture(name), DType::F32);
    let short = lm.tokenizer.encode_prompt("Tokyo").unwrap();
    let long = lm.tokenizer.encode_prompt("The capital of Japan is the city of Tokyo").unwrap();
    let alone = TokenBatch::left_padded(std::slice::from_ref(&short), 0, &Device::Cpu).unwrap();
    let padded = TokenBatch::left_padded(&[long, short.clone()], 0, &Device::Cpu).unwrap();
    let a = lm.model.forward_hidden(&alone, Some(&[])).unwrap().final_normed; // [1, n, D]
    let p = lm.model.forward_hidden(&padded, Some(&[])).unwrap().final_normed; // [2, T, D]
    let t = padded.dims().1;
    let tail = p.get(1).unwrap().narrow(0, t - short.len(), short.len()).unwrap();
    let d = max_abs_diff(&a.squeeze(0).unwrap(), &tail);
    assert!(d < 1e-5, "padding changed a row's hidden states by {d}");
}

#[test]
fn half_precision_targets_run_and_stay_close_to_f32() {
    half_precision_close_to_f32("tiny-llama");
}

#[test]
fn half_precision_gemma3_runs_and_stays_close_to_f32() {
    half_precision_close_to_f32("tiny-gemma3");
}

fn half_precision_close_to_f32(name: &str) {
    let f32m = load(&fixture(name), DType::F32);
    let batch = tiny_batch(&f32m);
    let want = f32m.model.logits_last(&f32m.model.forward_hidden(&batch, Some(&[])).unwrap().final_normed).unwrap();
    for (dt, tol) in [(DType::BF16, 0.6), (DType::F16, 0.1), (DType::F64, 1e-4)] {
        let lm = load(&fixture(name), dt);
        let got = lm.model.logits_last(&lm.model.forward_hidden(&batch, Some(&[])).unwrap().final_normed).unwrap();
        assert_eq!(got.dtype(), dt);
        let d = max_abs_diff(&got, &want);
        eprintln!("{name} {dt:?}: max|logit diff| vs f32 {d:.3e}");
        assert!(d < tol, "{name}: {dt:?} logits differ from f32 by {d}");
    }
}

#[test]
fn gemma3_taped_backward_equals_autograd_through_the_composed_blocks() {
    // The fast path's hand-written backward of Gemma 3's block (q/k norms, output norms, GeGLU,
    // sliding and global layers) against autograd over the composed ops, from several layers.
    let lm = load(&fixture("tiny-gemma3"), DType::F32);
    let m = &lm.model;
    assert!(m.taped(), "Gemma 3 without a final-logit cap takes the taped path");
    let batch = tiny_batch(&lm);
    let (b, t) = batch.dims();
    let positions = Tensor::new(&[[t as u32 - 1, 2], [t as u32 - 1, t as u32 - 2], [t as u32 - 3, t as u32 - 1]], &Device::Cpu).unwrap(); // [B, 2]
    let weights = Tensor::randn(0f32, 1.0, (b, 2, m.config.vocab_size), &Device::Cpu).unwrap();
    for l in [0, 2, m.num_layers() - 1] {
        let (resid, ctx) = m.forward_to(&batch, l).unwrap();
        let var = candle_core::Var::from_tensor(&resid).unwrap();
        let taped = m.logits_from(l, var.as_tensor(), &ctx, &positions).unwrap(); // [B, 2, V]
        let g_taped = (&taped * &weights).unwrap().sum_all().unwrap().backward().unwrap().get(var.as_tensor()).unwrap().clone();
        let composed = m.logits_at(&m.forward_from(l, var.as_tensor(), &ctx).unwrap(), &positions).unwrap(); // [B, 2, V]
        let g_composed = (&composed * &weights).unwrap().sum_all().unwrap().backward().unwrap().get(var.as_tensor()).unwrap().clone();
        let dl = max_abs_diff(&taped, &composed);
        let dg = max_abs_diff(&g_taped, &g_composed);
        let scale = g_composed.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() as f64;
        eprintln!("gemma3 taped vs autograd from block {l}: logits {dl:.2e}, gradient {dg:.2e} (max |g| {scale:.2e})");
        assert!(dl <= 1e-4, "block {l}: logits differ by {dl}");
        assert!(dg <= 1e-5 * scale.max(1.0), "block {l}: gradients differ by {dg} against {scale}");
    }
}

#[test]
fn a_bf16_gemma3_target_trains_on_the_taped_path() {
    // bf16: the fused kernels do not apply, so the tape runs their composed fallbacks (the GeGLU
    // gate's backward included), as on a GPU.
    let lm = load(&fixture("tiny-gemma3"), DType::BF16);
    assert!(lm.model.taped());
    for method in [hyperdas::hypernet::interpreter::Method::HyperDas, hyperdas::hypernet::interpreter::Method::Mdas] {
        let losses = six_steps(&lm, method, 2, 1);
        assert!(losses.iter().all(|l| l.is_finite()), "{method:?}: {losses:?}");
    }
}
