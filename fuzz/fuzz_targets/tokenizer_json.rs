//! libFuzzer target: [`bodies::tokenizer_json`] (the body is shared with tests/fuzz_corpus.rs).
#![no_main]
#[path = "bodies.rs"]
mod bodies;

libfuzzer_sys::fuzz_target!(|data: &[u8]| bodies::tokenizer_json(data));
