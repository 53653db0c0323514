//! GGUF reading: dequantization of every supported GGML type against gguf-py, and malformed
//! files rejected with errors that name the file and the key or tensor.

mod common;

use common::*;
use hyperdas::model::gguf::GgufFile;

#[test]
fn every_ggml_type_dequantizes_like_gguf_py() {
    let g = GgufFile::open(&fixture("ggml-types.gguf")).unwrap();
    let reference = candle_core::safetensors::load(fixture("ggml-types-reference.safetensors"), &candle_core::Device::Cpu).unwrap();
    let mut names: Vec<&String> = reference.keys().collect();
    names.sort();
    let expected = ["bf16", "f16", "f32", "q2_k", "q3_k", "q4_0", "q4_1", "q4_k", "q5_0", "q5_1", "q5_k", "q6_k", "q8_0"];
    assert_eq!(names.len(), expected.len());
    for ty in expected {
        let name = format!("t_{ty}");
        let ours = g.dequantize(&name).unwrap();
        let want = &reference[&name];
        assert_eq!(ours.dims(), &[8, 256], "{name}");
        let d = max_abs_diff(&ours, want);
        let scale = want.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() as f64;
        eprintln!("{ty}: max|diff| {d:.3e} (max|ref| {scale:.3})");
        assert!(scale > 0.0, "{name}: reference is all zeros, the test would prove nothing");
        assert!(d <= 1e-6 * scale.max(1.0), "{name}: dequantized values differ from gguf-py by {d}");
    }
}

fn err_of(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.gguf");
    std::fs::write(&p, bytes).unwrap();
    match GgufFile::open(&p) {
        Ok(_) => panic!("accepted a malformed file"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn malformed_headers_are_rejected_with_the_file_and_key_named() {
    let e = err_of(b"GGML\x03\0\0\0");
    assert!(e.contains("bad.gguf") && e.contains("not a GGUF file"), "{e}");
    let e = err_of(b"GGUF\x09\0\0\0");
    assert!(e.contains("unsupported GGUF version 9"), "{e}");
    let e = err_of(b"GGUF\x03\0\0\0\x01");
    assert!(e.contains("truncated"), "{e}");

    // Counts that cannot fit in the file are refused before any allocation.
    let mut b = b"GGUF\x03\0\0\0".to_vec();
    b.extend(u64::MAX.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    let e = err_of(&b);
    assert!(e.contains("more than the file can hold"), "{e}");

    // A string claiming 2^60 bytes.
    let mut b = b"GGUF\x03\0\0\0".to_vec();
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend((1u64 << 60).to_le_bytes());
    b.extend([0u8; 32]);
    let e = err_of(&b);
    assert!(e.contains("string length") && e.contains("exceeds"), "{e}");

    // An array claiming 2^60 u32 elements.
    let mut arr = 4u32.to_le_bytes().to_vec();
    arr.extend((1u64 << 60).to_le_bytes());
    let bytes = GgufBuilder::new().raw("general.huge", 9, arr).bytes();
    let e = err_of(&bytes);
    assert!(e.contains("key `general.huge`") && e.contains("cannot fit"), "{e}");

    // Unknown value type.
    let bytes = GgufBuilder::new().raw("general.weird", 77, vec![0; 8]).bytes();
    let e = err_of(&bytes);
    assert!(e.contains("key `general.weird`") && e.contains("unknown value type 77"), "{e}");

    // A tensor claiming 2^60 elements.
    let bytes = GgufBuilder::new().tensor("blk.0.attn_q.weight", &[1 << 30, 1 << 30, 1 << 30], 0, vec![]).bytes();
    let e = err_of(&bytes);
    assert!(e.contains("blk.0.attn_q.weight") && e.contains("overflows"), "{e}");
}

#[test]
fn truncated_files_are_reported_as_truncated() {
    let full = std::fs::read(fixture("tiny-llama.gguf")).unwrap();
    for cut in [full.len() - 1, full.len() / 2, 5_000, 64] {
        let e = err_of(&full[..cut]);
        assert!(e.contains("bad.gguf") && e.contains("truncated"), "cut at {cut}: {e}");
    }
}

#[test]
fn unsupported_tensor_types_fail_only_when_needed_and_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("iq.gguf");
    GgufBuilder::new()
        .string("general.architecture", "llama")
        .tensor("blk.0.attn_q.weight", &[4, 256], 16, vec![0; 4 * 66]) // IQ2_XXS
        .f32_tensor("output_norm.weight", &[4], &[1.0, 2.0, 3.0, 4.0])
        .write(&p);
    let g = GgufFile::open(&p).expect("a file with an unsupported type is still readable");
    assert_eq!(g.dequantize("output_norm.weight").unwrap().to_vec1::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0]);
    let e = g.dequantize("blk.0.attn_q.weight").unwrap_err().to_string();
    assert!(e.contains("iq.gguf") && e.contains("blk.0.attn_q.weight") && e.contains("IQ2_XXS is not supported") && e.contains("Q4_K"), "{e}");
    let e = g.dequantize("blk.9.attn_q.weight").unwrap_err().to_string();
    assert!(e.contains("blk.9.attn_q.weight") && e.contains("missing"), "{e}");
}

#[test]
fn loading_a_gguf_model_with_missing_metadata_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.gguf");
    GgufBuilder::new().string("general.architecture", "llama").u32("llama.embedding_length", 8).f32_tensor("token_embd.weight", &[4, 8], &[0.0; 32]).write(&p);
    let e = load_err(&p);
    assert!(e.contains("m.gguf") && e.contains("llama.attention.head_count") && e.contains("missing"), "{e}");

    let p2 = dir.path().join("gemma.gguf");
    GgufBuilder::new().string("general.architecture", "mamba").write(&p2);
    let e = load_err(&p2);
    assert!(e.contains("general.architecture") && e.contains("`mamba` is not supported"), "{e}");
}

#[test]
fn a_gguf_tokenizer_with_a_split_we_do_not_implement_is_refused_by_name() {
    // Phi-4-mini's GGUF says `gpt-4o`: falling back to GPT-2's split would give other ids silently.
    let dir = tempfile::tempdir().unwrap();
    let tok = |pre: &str, name: &str| {
        let p = dir.path().join(name);
        GgufBuilder::new()
            .string("general.architecture", "phi3")
            .string("tokenizer.ggml.model", "gpt2")
            .string("tokenizer.ggml.pre", pre)
            .str_array("tokenizer.ggml.tokens", &["a", "b", "ab"])
            .str_array("tokenizer.ggml.merges", &["a b"])
            .write(&p);
        hyperdas::model::TextTokenizer::from_gguf(&GgufFile::open(&p).unwrap())
    };
    let e = tok("gpt-4o", "o200k.gguf").unwrap_err().to_string();
    assert!(e.contains("o200k.gguf") && e.contains("tokenizer.ggml.pre") && e.contains("`gpt-4o` is not supported") && e.contains("llama-bpe"), "{e}");
    assert!(tok("gpt-2", "gpt2.gguf").is_ok(), "GPT-2's own split is supported");
}
