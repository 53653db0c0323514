//! `hyperdas info`: configuration, tokenizer facts and the intervention-site vocabulary.

use anyhow::Result;

use super::ModelArgs;
use crate::model::Site;

pub fn run(a: &ModelArgs) -> Result<()> {
    let lm = a.load()?;
    let c = &lm.model.config;
    let tok = &lm.tokenizer;
    println!("{}", lm.description);
    println!("source               {}", lm.source);
    println!("architecture         {:?}", c.architecture);
    println!("blocks (L)           {}", c.num_hidden_layers);
    println!("hidden size (D)      {}", c.hidden_size);
    println!("MLP size             {}", c.intermediate_size);
    println!("heads / kv heads     {} / {} (head_dim {})", c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    println!("vocab (V)            {} (tokenizer: {})", c.vocab_size, tok.vocab_size());
    println!("rope                 theta {} {:?}", c.rope.theta, c.rope.scaling);
    println!("rms_norm_eps         {:e}", c.rms_norm_eps);
    println!("tied embeddings      {}", c.tie_word_embeddings);
    if let Some(g) = &c.gemma {
        let global: Vec<String> = g.layer_types.iter().enumerate().filter(|(_, k)| **k == crate::model::LayerKind::Full).map(|(i, _)| i.to_string()).collect();
        println!("attention            sliding window {} (local rope theta {}); global layers {}", g.sliding_window, g.local_rope.theta, global.join(", "));
        println!("gemma extras         query_pre_attn_scalar {}, final logit cap {:?}, √D embeddings, (1 + w) norms, q/k norms, GeGLU", g.query_pre_attn_scalar, g.final_logit_softcapping);
    }
    println!("biases               qkv {}, o {}, mlp {}", c.qkv_bias, c.o_bias, c.mlp_bias);
    println!("parameters           {:.2}M", c.num_parameters() as f64 / 1e6);
    let name = |id: Option<u32>| -> String { id.map(|i| format!("{:?} (id {i})", tok.decode(&[i]).unwrap_or_default())).unwrap_or_else(|| "none".into()) };
    println!("bos / eos / pad      {} / {} / {}", name(tok.bos_id), name(tok.eos_id), name(tok.pad_id));
    println!("start token          {}: {}", name(tok.start_token), tok.start_token_reason);
    let l = c.num_hidden_layers;
    let d = c.hidden_size;
    println!();
    println!("intervention sites (all [B, T, {d}]):");
    let examples = [Site::ResidPre(0), Site::ResidPre(l / 2), Site::ResidPost(l / 2 - usize::from(l > 1)), Site::ResidPost(l - 1), Site::FinalNorm];
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
