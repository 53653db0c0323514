//! `hyperdas info`: configuration, tokenizer facts and the intervention-site vocabulary.

use anyhow::Result;
use clap::Args;

use super::ModelArgs;
use crate::model::Site;

#[derive(Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    model: ModelArgs,
}

pub fn run(a: &InfoArgs) -> Result<()> {
    let lm = a.model.load()?;
    let c = &lm.model.config;
    let tok = &lm.tokenizer;
    let name = |id: Option<u32>| -> String { id.map(|i| format!("{:?} (id {i})", tok.decode(&[i]).unwrap_or_default())).unwrap_or_else(|| "none".into()) };
    let l = c.num_hidden_layers;
    let d = c.hidden_size;
    let examples = [Site::ResidPre(0), Site::ResidPre(l / 2), Site::ResidPost(l / 2 - usize::from(l > 1)), Site::ResidPost(l - 1), Site::FinalNorm];
    if super::json() {
        let sites: Vec<serde_json::Value> =
            examples.iter().map(|s| Ok(serde_json::json!({"site": s.to_string(), "hidden_states_index": s.hidden_state_index(l)?, "shape": ["B", "T", d]}))).collect::<Result<_>>()?;
        let v = serde_json::json!({
            "description": lm.description,
            "source": lm.source.to_string(),
            "architecture": format!("{:?}", c.architecture),
            "blocks": l,
            "hidden_size": d,
            "mlp_size": c.intermediate_size,
            "heads": c.num_attention_heads,
            "kv_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "vocab_size": c.vocab_size,
            "tokenizer_vocab_size": tok.vocab_size(),
            "rope_theta": c.rope.theta,
            "rope_scaling": c.rope.scaling.to_string(),
            "rms_norm_eps": c.rms_norm_eps,
            "norm": c.norm_kind(),
            "positions": c.position_encoding(),
            "rotary_dims": c.rotary_dims,
            "parallel_residual": c.gpt.as_ref().is_some_and(|g| g.parallel_residual),
            "hypernetwork_init": if c.hypernet_copies_blocks() { "target's first blocks" } else { "from scratch" },
            "tied_embeddings": c.tie_word_embeddings,
            "qk_norm": c.qk_norm.to_string(),
            "training_path": if c.has_taped_backward() { "fast" } else { "composed" },
            "parameters": c.num_parameters(),
            "bos_id": tok.bos_id,
            "eos_id": tok.eos_id,
            "pad_id": tok.pad_id,
            "start_token_id": tok.start_token,
            "start_token": tok.start_token_reason,
            "sites": sites,
            "site_spellings": Site::SPELLINGS,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{}", lm.description);
    println!("source               {}", lm.source);
    println!("architecture         {:?}", c.architecture);
    println!("blocks (L)           {}", c.num_hidden_layers);
    println!("hidden size (D)      {}", c.hidden_size);
    println!("MLP size             {}", c.intermediate_size);
    println!("heads / kv heads     {} / {} (head_dim {})", c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    println!("vocab (V)            {} (tokenizer: {})", c.vocab_size, tok.vocab_size());
    println!("positions            {}", c.position_encoding());
    println!("norms                {}, eps {}", c.norm_kind(), short_float(c.rms_norm_eps));
    if c.gpt.as_ref().is_some_and(|g| g.parallel_residual) {
        println!("residual             parallel: x + Attn(LN_1(x)) + MLP(LN_2(x))");
    }
    println!("tied embeddings      {}", c.tie_word_embeddings);
    if let Some(g) = &c.gemma {
        let global: Vec<String> = g.layer_types.iter().enumerate().filter(|(_, k)| **k == crate::model::LayerKind::Full).map(|(i, _)| i.to_string()).collect();
        println!("attention            sliding window {} (local rope theta {}); global layers {}", g.sliding_window, g.local_rope.theta, global.join(", "));
        println!(
            "gemma extras         query_pre_attn_scalar {}, final logit cap {}, √D embeddings, (1 + w) norms, q/k norms, GeGLU",
            g.query_pre_attn_scalar,
            g.final_logit_softcapping.map_or("none".to_string(), |x| x.to_string())
        );
    }
    println!("biases               qkv {}, o {}, mlp {}", c.qkv_bias, c.o_bias, c.mlp_bias);
    println!("q/k norms            {}", c.qk_norm);
    println!("training path        {}", if c.has_taped_backward() { "fast (fused kernels, taped backward)" } else { "composed (autograd)" });
    println!("hypernetwork init    {}", if c.hypernet_copies_blocks() { "copies of the target's first blocks" } else { "from scratch (the target's blocks do not fit its Llama layout)" });
    println!("parameters           {:.2}M", c.num_parameters() as f64 / 1e6);
    println!("bos / eos / pad      {} / {} / {}", name(tok.bos_id), name(tok.eos_id), name(tok.pad_id));
    println!("start token          {}: {}", name(tok.start_token), tok.start_token_reason);
    println!();
    println!("intervention sites (all [B, T, {d}]):");
    for s in examples {
        let idx = match s.hidden_state_index(l)? {
            Some(i) => format!("hidden_states[{i}]"),
            None => "not in hidden_states (raw last-block output)".into(),
        };
        println!("  {:<32} {idx}", s.to_string());
    }
    println!("  spellings: {}", Site::SPELLINGS);
    println!("  HyperDAS intervention layer k = blocks.k.hook_resid_pre = pyvene block_output.(k-1) = hidden_states[k]");
    Ok(())
}

/// A config float as a person writes it: an f32 read into f64 (`9.999999747378752e-6`) prints
/// as `1e-5`.
fn short_float(x: f64) -> String {
    let f = x as f32;
    if f as f64 == x { format!("{f:e}") } else { format!("{x:e}") }
}
