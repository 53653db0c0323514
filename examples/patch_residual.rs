//! Activation patching with the residual-stream API: copy the residual at one layer and position
//! from a source prompt into a base prompt, rerun only the blocks above, and compare the
//! next-token distributions.
//!
//!     cargo run --release --example patch_residual -- [MODEL] [LAYER]
//!
//! MODEL defaults to the tiny test fixture (random weights: the numbers mean nothing, the code
//! path is the point); try `smollm2-135m 15` after `hyperdas fetch smollm2-135m`.

use anyhow::{Context, Result};
use candle_core::{D, DType, Tensor};
use hyperdas::model::{self, LoadOptions, TokenBatch};

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let spec = args.get(1).cloned().unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-llama").to_string());
    let lm = model::load(&spec, &LoadOptions::default()).with_context(|| format!("loading {spec}"))?;
    let layer: usize = match args.get(2) {
        Some(l) => l.parse().context("LAYER must be a number")?,
        None => lm.model.num_layers() / 2,
    };
    let (base, source) = ("Paris is a city in the country of", "Tokyo is a city in the country of");
    let rows = vec![lm.tokenizer.encode_prompt(base)?, lm.tokenizer.encode_prompt(source)?];
    let batch = TokenBatch::left_padded(&rows, lm.tokenizer.padding_id(), lm.model.device())?; // [2, T]
    let (_, t) = batch.dims();

    // Clean pass: the residual entering `layer` for both rows.
    let hs = lm.model.forward_hidden(&batch, Some(&[layer]))?;
    let resid = hs.stacked.expect("requested").squeeze(2)?; // [2, T, D]
    let clean_probs = candle_nn::ops::softmax(&lm.model.logits_last(&hs.final_normed)?, D::Minus1)?; // [2, V]

    // Patch the base row at its entity token ("Paris", one token right after the start token)
    // with the source row's residual at the same column. Both prompts share their suffix and
    // the batch is left-padded, so that column holds the source entity's *last* token (SmolLM2
    // splits "Tokyo" into two), which is where a model gathers an entity's attributes.
    let entity_pos = t - rows[0].len() + usize::from(lm.tokenizer.start_token.is_some());
    let mut mask = vec![0u8; t];
    mask[entity_pos] = 1;
    let d = lm.model.hidden_size();
    let m = Tensor::from_vec(mask, (1, t, 1), lm.model.device())?.broadcast_as((1, t, d))?; // [1, T, D]
    let base_h = resid.narrow(0, 0, 1)?; // [1, T, D]
    let source_h = resid.narrow(0, 1, 1)?; // [1, T, D]
    let patched_base = m.where_cond(&source_h, &base_h)?; // [1, T, D]
    let patched = Tensor::cat(&[&patched_base, &source_h], 0)?; // [2, T, D]: row 1 unchanged

    // Run only blocks layer..L, with the context of the same padded batch.
    let ctx = lm.model.context(&batch)?;
    let out = lm.model.forward_from(layer, &patched, &ctx)?; // [2, T, D]
    let patched_probs = candle_nn::ops::softmax(&lm.model.logits_last(&out)?, D::Minus1)?; // [2, V]

    let top = |p: &Tensor| -> Result<String> {
        let v: Vec<f32> = p.to_dtype(DType::F32)?.to_vec1()?;
        let mut ix: Vec<usize> = (0..v.len()).collect();
        ix.sort_by(|&a, &b| v[b].total_cmp(&v[a]));
        Ok(ix[..3].iter().map(|&i| format!("{:?} {:.3}", lm.tokenizer.decode(&[i as u32]).unwrap_or_default(), v[i])).collect::<Vec<_>>().join(", "))
    };
    println!("model: {}", lm.description);
    println!("patching blocks.{layer}.hook_resid_pre at position {entity_pos} from {source:?} into {base:?}");
    println!("base, clean:    {}", top(&clean_probs.get(0)?)?);
    println!("source, clean:  {}", top(&clean_probs.get(1)?)?);
    println!("base, patched:  {}", top(&patched_probs.get(0)?)?);
    Ok(())
}
