//! Token ids equal transformers' ids, for tokenizer.json files and for tokenizers rebuilt from
//! GGUF metadata (byte-level BPE and SentencePiece-style), with the pure-Rust regex backend.

mod common;

use common::*;
use hyperdas::model::gguf::GgufFile;
use hyperdas::model::{StartToken, TextTokenizer};

fn ids_fixture(name: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixture(name)).unwrap()).unwrap()
}

fn as_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn smollm2_gguf_tokenizer_matches_transformers_and_the_model_own_rule() {
    let Some(path) = smollm2() else { return };
    let tok = TextTokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let f = ids_fixture("smollm2-tokenizer-ids.json");
    let strings = f["strings"].as_array().unwrap();
    assert!(strings.len() >= 12);
    for (i, s) in strings.iter().enumerate() {
        let s = s.as_str().unwrap();
        let ours = tok.encode(s).unwrap();
        assert_eq!(ours, as_ids(&f["transformers_gguf"][i]), "transformers ids differ for {s:?}");
        assert_eq!(ours, as_ids(&f["reference"][i]), "SmolLM2's own pre-tokenizer ids differ for {s:?}");
    }
    // The SmolLM2 start-token rule.
    assert_eq!(tok.start_token, Some(0));
    assert_eq!(tok.declared_start_token(), None, "the GGUF itself asks for no BOS");
    assert_eq!(tok.encode_prompt("Paris").unwrap()[0], 0);
}

#[test]
fn sentencepiece_gguf_tokenizer_matches_transformers() {
    let tok = TextTokenizer::from_gguf(&GgufFile::open(&fixture("spm-tokenizer.gguf")).unwrap()).unwrap();
    let f = ids_fixture("spm-tokenizer-ids.json");
    let strings = f["strings"].as_array().unwrap();
    assert!(strings.len() >= 10);
    for (i, s) in strings.iter().enumerate() {
        let s = s.as_str().unwrap();
        assert_eq!(tok.encode(s).unwrap(), as_ids(&f["transformers"][i]), "ids differ from transformers for {s:?}");
    }
    // llama.cpp / transformers add BOS to a sentencepiece vocabulary.
    assert_eq!(tok.start_token, Some(1));
    let text = "Paris is a city in the country of";
    let ids = tok.encode(text).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), text);
}

#[test]
fn tokenizer_json_and_its_gguf_copy_agree() {
    let hf = TextTokenizer::from_hf_dir(&fixture("tiny-llama")).unwrap();
    let gg = TextTokenizer::from_gguf(&GgufFile::open(&fixture("tiny-llama.gguf")).unwrap()).unwrap();
    assert_eq!(hf.vocab_size(), gg.vocab_size());
    for s in ["Paris is a city in the country of", "tabs\tand\nnewlines\n\n\nand trailing spaces   ", "can't 12345 wait!", "<|begin_of_text|>x", ""] {
        assert_eq!(hf.encode(s).unwrap(), gg.encode(s).unwrap(), "{s:?}");
    }
    // Start token: the post-processor of tokenizer.json vs add_bos_token of the GGUF.
    assert_eq!(hf.start_token, Some(0));
    assert_eq!(gg.start_token, Some(0));
}

#[test]
fn llama3_split_lookahead_works_with_the_pure_rust_regex() {
    // `\s+(?!\S)` leaves the last space of a run to the next word: "a   b" → "a", "  ", " b";
    // `\p{N}{1,3}` groups digits by three. Checked on the pre-tokenizer splits themselves.
    use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
    let hf = TextTokenizer::from_hf_dir(&fixture("tiny-llama")).unwrap();
    let gg = TextTokenizer::from_gguf(&GgufFile::open(&fixture("tiny-llama.gguf")).unwrap()).unwrap();
    for tok in [&hf, &gg] {
        let pt = tok.inner.get_pre_tokenizer().expect("a pre-tokenizer");
        let mut s = PreTokenizedString::from("a   b\n\n  c 1234");
        pt.pre_tokenize(&mut s).unwrap();
        let splits: Vec<String> = s.get_splits(OffsetReferential::Original, OffsetType::Byte).into_iter().map(|(s, _, _)| s.to_string()).collect();
        // Byte-level spelling: 'Ġ' is a space, 'Ċ' a newline.
        assert_eq!(splits, ["a", "ĠĠ", "Ġb", "ĊĊ", "Ġ", "Ġc", "Ġ", "123", "4"], "{}", tok.source.display());
    }
}

#[test]
fn start_token_override() {
    let mut tok = TextTokenizer::from_hf_dir(&fixture("tiny-llama")).unwrap();
    tok.set_start_token(&"none".parse::<StartToken>().unwrap()).unwrap();
    assert_eq!(tok.encode_prompt("Paris").unwrap(), tok.encode("Paris").unwrap());
    tok.set_start_token(&"<|pad|>".parse::<StartToken>().unwrap()).unwrap();
    assert_eq!(tok.encode_prompt("Paris").unwrap()[0], 2);
    let e = tok.set_start_token(&"<|nope|>".parse::<StartToken>().unwrap()).unwrap_err().to_string();
    assert!(e.contains("<|nope|>") && e.contains("tokenizer.json"), "{e}");
}

#[test]
fn gemma_gguf_tokenizer_matches_transformers() {
    // Runs of spaces stored as real spaces, merges in vocabulary order, no prefix space,
    // newline runs as user-defined tokens.
    let tok = TextTokenizer::from_gguf(&GgufFile::open(&fixture("tiny-gemma3.gguf")).unwrap()).unwrap();
    let hf = TextTokenizer::from_hf_dir(&fixture("tiny-gemma3")).unwrap();
    let f = ids_fixture("tiny-gemma3-tokenizer-ids.json");
    let strings = f["strings"].as_array().unwrap();
    assert!(strings.len() >= 14);
    for (i, s) in strings.iter().enumerate() {
        let s = s.as_str().unwrap();
        let ids = tok.encode(s).unwrap();
        assert_eq!(ids, as_ids(&f["transformers"][i]), "ids differ from transformers for {s:?}");
        assert_eq!(hf.encode(s).unwrap(), ids, "tokenizer.json and the GGUF disagree on {s:?}");
    }
    assert_eq!(tok.start_token, Some(2), "<bos>");
    assert_eq!(hf.start_token, Some(2), "<bos>");
    let text = "Paris is a city in the country of";
    assert_eq!(tok.decode(&tok.encode(text).unwrap()).unwrap(), text, "no prefix space is added or stripped");
}

#[test]
fn gemma3_270m_gguf_tokenizer_matches_transformers() {
    let Some(path) = gemma3() else { return };
    let tok = TextTokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let f = ids_fixture("gemma3-270m-tokenizer-ids.json");
    for (i, s) in f["strings"].as_array().unwrap().iter().enumerate() {
        let s = s.as_str().unwrap();
        assert_eq!(tok.encode(s).unwrap(), as_ids(&f["transformers_gguf"][i]), "ids differ from transformers for {s:?}");
    }
    assert_eq!(tok.encode_prompt("Paris").unwrap()[0], 2, "Gemma prompts start with <bos>");
}

#[test]
fn apply_queries_encode_when_the_prompt_ends_in_a_quote() {
    // RAVEL's prompts end with `"`, and Gemma 3 has a single token for `"?`: `hyperdas apply`'s
    // placeholder label must not merge with the prompt.
    use hyperdas::data::collate::CollateOptions;
    use hyperdas::data::row::RavelRow;
    use hyperdas::experiment::apply::encode_query_row;
    let Some(path) = gemma3() else { return };
    let tok = TextTokenizer::from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
    let base = r#"[{"city": "Los Angeles", "continent": "North America"}, {"city": "Nevelsk", "continent": ""#;
    assert_eq!(tok.encode(&format!("{base}?")).unwrap().len(), tok.encode(base).unwrap().len(), "the merge this test is about: `\"?` is one token");
    let row = RavelRow {
        input_prefix: r#"[{"city": "Los Angeles", "continent": "North America"}, {"city": "Nevelsk"#.into(),
        input_suffix: r#"", "continent": ""#.into(),
        counterfactual_input_prefix: r#"[{"city": "Shillong"#.into(),
        counterfactual_input_suffix: r#"", "country": ""#.into(),
        edit_instruction: "Nevelsk ; Shillong - Continent".into(),
        entity: "Nevelsk".into(),
        counterfactual_entity: "Shillong".into(),
        target: String::new(),
        counterfactual_target: String::new(),
        attribute_type: "causal".into(),
        domain: "city".into(),
        attribute: "Continent".into(),
        verify_text: String::new(),
    };
    let enc = encode_query_row(&tok, row, &CollateOptions::default()).unwrap();
    assert_eq!(&enc.base_ids[..enc.label_start], tok.encode_prompt(base).unwrap().as_slice(), "the label starts right after the base prompt's own tokens");
}
