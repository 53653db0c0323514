//! Write a loaded model (e.g. the SmolLM2 GGUF, dequantized) as an HF directory that
//! transformers 4.40 loads: `config.json` + `model.safetensors`. Used by
//! tools/reference_step_bench.py to run the reference algorithm on the same weights.
//!
//! `cargo run --release --example export_hf -- smollm2-135m OUT_DIR`

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (model, out) = match (args.get(1), args.get(2)) {
        (Some(m), Some(o)) => (m.clone(), std::path::PathBuf::from(o)),
        _ => anyhow::bail!("usage: export_hf MODEL OUT_DIR"),
    };
    let lm = hyperdas::model::load(&model, &Default::default())?;
    let c = &lm.model.config;
    // The config written below is a Llama one, and named_tensors gives split (Phi 3) or reordered
    // (partial rotary) q/k: only the plain Llama block round-trips.
    if !c.is_llama_block() || c.rotary_dims != c.head_dim || c.architecture == hyperdas::model::Architecture::Phi3 {
        anyhow::bail!("export_hf writes Llama checkpoints only; {model} is {:?}", c.architecture);
    }
    std::fs::create_dir_all(&out)?;
    let tensors: std::collections::HashMap<String, candle_core::Tensor> = lm.model.named_tensors().into_iter().map(|(n, t)| (n, t.contiguous().unwrap())).collect();
    candle_core::safetensors::save(&tensors, out.join("model.safetensors"))?;
    let cfg = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
        "vocab_size": c.vocab_size, "rms_norm_eps": c.rms_norm_eps, "rope_theta": c.rope.theta,
        "max_position_embeddings": c.max_position_embeddings, "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": "silu", "torch_dtype": "float32",
    });
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    println!("{}", out.display());
    Ok(())
}
