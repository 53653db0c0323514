//! Shared-prefix inference equals running each full prompt alone (src/model/prefix.rs).

mod common;

use candle_core::DType;
use hyperdas::model::TokenBatch;

/// Outputs at every real continuation position, both ways, for prompts `prefix ++ rows[i]`.
fn check(name: &str, prefix: &[u32], rows: &[Vec<u32>], tol: f64) {
    let lm = common::load(&common::fixture(name), DType::F32);
    let m = &lm.model;
    let cache = m.prefix_cache(prefix).unwrap();
    assert_eq!(cache.len, prefix.len());
    let cont = m.forward_after_prefix(&cache, rows).unwrap(); // [B, R, D]
    assert_eq!(cont.dim(1).unwrap(), rows.iter().map(Vec::len).max().unwrap());
    for (i, row) in rows.iter().enumerate() {
        let full: Vec<u32> = prefix.iter().chain(row).copied().collect();
        let batch = TokenBatch::left_padded(std::slice::from_ref(&full), lm.tokenizer.padding_id(), m.device()).unwrap();
        let alone = m.forward_hidden(&batch, Some(&[])).unwrap().final_normed; // [1, P+r, D]
        let want = alone.narrow(1, prefix.len(), row.len()).unwrap().squeeze(0).unwrap(); // [r, D]
        let got = cont.get(i).unwrap().narrow(0, 0, row.len()).unwrap(); // [r, D]
        let d = common::max_abs_diff(&got, &want);
        assert!(d < tol, "{name}: row {i}: max |diff| {d}");
    }
}

#[test]
fn llama_continuations_equal_the_full_prompts() {
    let rows = vec![vec![7, 8, 9, 10], vec![11], vec![12, 13]];
    check("tiny-llama", &[1, 5, 6], &rows, 1e-5);
    // No prefix at all: right-padded rows alone.
    check("tiny-llama", &[], &rows, 1e-5);
}

#[test]
fn qwen2_biases_and_gemma3_local_layers_equal_the_full_prompts() {
    let rows = vec![vec![7, 8, 9, 10, 14, 15], vec![11], vec![12, 13, 16]];
    check("tiny-qwen2", &[1, 5, 6, 20, 21], &rows, 1e-5);
    // Its sliding window is 4 tokens: prefix (5) and continuations (up to 6) both cross it.
    check("tiny-gemma3", &[2, 5, 6, 20, 21], &rows, 1e-5);
}

#[test]
fn gpt2_learned_positions_and_gpt_neox_partial_rotary_equal_the_full_prompts() {
    // GPT-2's continuations take the position embeddings after the prefix; GPT-NeoX's RoPE covers
    // a quarter of each head and its blocks are parallel.
    let rows = vec![vec![7, 8, 9, 10, 14, 15], vec![11], vec![12, 13, 16]];
    check("tiny-gpt2", &[1, 5, 6, 20, 21], &rows, 1e-5);
    check("tiny-gpt-neox", &[1, 5, 6, 20, 21], &rows, 1e-5);
}
