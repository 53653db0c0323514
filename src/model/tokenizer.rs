//! Tokenizers: HF `tokenizer.json` (+ `tokenizer_config.json`), or rebuilt from GGUF metadata.
//!
//! GGUF files carry no `tokenizer.json`; llama.cpp stores the vocabulary, merges and token
//! types as metadata. We rebuild the tokenizer the way transformers 5.24 does
//! (`integrations/gguf/gguf_tokenizer_mapping.py`) so token ids agree with transformers:
//!
//! * `gpt2` model: byte-level BPE; the split regex is chosen by `tokenizer.ggml.pre` (Llama-3,
//!   Qwen2, GPT-2 families). For `smollm` we follow llama.cpp and SmolLM2's own tokenizer
//!   (digits split one by one before the GPT-2 split); transformers falls back to the plain
//!   GPT-2 split there, which gives the same ids on SmolLM2's vocabulary (no merges join digits).
//! * `llama` model (SentencePiece-style): BPE with byte fallback and a `▁` metaspace; merges
//!   from the file, or recovered from the vocabulary and scores when the file has none.
//! * Gemma (`llama` model in a `gemma*` file): as transformers' `gemma_tokenizer`, runs of
//!   spaces stored as real spaces are respelled `▁…▁`, merges are rebuilt in vocabulary order
//!   (Gemma's scores do not follow its merge order), spaces become `▁` with no prefix space.
//! * Control tokens (type 3) become special tokens, user-defined tokens (type 4) added tokens.
//!
//! **Start token.** Prompts get one start token prepended (or none), decided per model: the
//! tokenizer's own BOS rule by default, with a per-model table for models whose declared BOS
//! hurts (SmolLM2: `<|endoftext|>`, see docs/models.md), and `--start-token` to override.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::gguf::GgufFile;
use crate::error::{Error, Result};

const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_PRES: &[&str] = &["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "jina-v5-nano", "dbrx", "smaug-bpe"];
const QWEN2_PRES: &[&str] = &["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"];
/// Pre-tokenizers that llama.cpp runs as GPT-2's own split (its byte-level default).
const GPT2_PRES: &[&str] = &["default", "gpt-2", "phi-2", "olmo", "mpt", "starcoder", "refact", "jina-es", "jina-de", "gpt3-finnish"];

/// Which token, if any, starts every prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartToken {
    /// The tokenizer's own rule, then the per-model table.
    Auto,
    /// No start token.
    None,
    /// This token (by its string form, e.g. `<|endoftext|>`).
    Token(String),
}

impl std::str::FromStr for StartToken {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => StartToken::Auto,
            "none" | "" => StartToken::None,
            t => StartToken::Token(t.to_string()),
        })
    }
}

/// A tokenizer plus the special-token facts the runtime needs.
#[derive(Clone)]
pub struct TextTokenizer {
    pub inner: Tokenizer,
    /// The file the tokenizer came from.
    pub source: PathBuf,
    pub bos_id: Option<u32>,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
    /// Prepended to every prompt by [`encode_prompt`](Self::encode_prompt).
    pub start_token: Option<u32>,
    /// Why that start token was chosen (printed by `verify-model`).
    pub start_token_reason: String,
    /// The tokenizer's own start token before any per-model rule or override.
    declared_start: Option<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer").field("source", &self.source).field("vocab_size", &self.vocab_size()).field("start_token", &self.start_token).finish()
    }
}

fn tk_err(path: &Path, what: &str, e: impl std::fmt::Display) -> Error {
    Error::file(path, format!("{what}: {e}"))
}

/// Token string of a `tokenizer_config.json` special-token entry (a string or `{"content": ..}`).
fn special_token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(String::from),
        _ => None,
    }
}

impl TextTokenizer {
    /// Load `tokenizer.json` (and `tokenizer_config.json` when present) from an HF directory.
    pub fn from_hf_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(Error::file(dir, "no tokenizer.json in the model directory"));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, format!("cannot read: {e}")))?;
        check_tokenizer_json(&text, &path)?;
        let inner: Tokenizer = text.parse().map_err(|e| tk_err(&path, "cannot load tokenizer", e))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = if cfg_path.is_file() { Some(crate::error::read_json(&cfg_path)?) } else { None };
        let get = |k: &str| cfg.as_ref().and_then(|c| c.get(k));
        let id_of = |k: &str| -> Result<Option<u32>> {
            match special_token_string(get(k)) {
                None => Ok(None),
                Some(s) => inner.token_to_id(&s).map(Some).ok_or_else(|| Error::key(&cfg_path, k, format!("token `{s}` is not in the vocabulary of {}", path.display()))),
            }
        };
        let bos_id = id_of("bos_token")?;
        let eos_id = id_of("eos_token")?;
        let pad_id = id_of("pad_token")?;
        let add_bos = get("add_bos_token").and_then(|v| v.as_bool());
        // The tokenizer's own rule: `add_bos_token`, else whatever its post-processor prepends.
        let (declared, reason) = match add_bos {
            Some(true) => (bos_id, "tokenizer_config.json sets add_bos_token".to_string()),
            Some(false) => (None, "tokenizer_config.json sets add_bos_token = false".to_string()),
            None => {
                let with = inner.encode("a", true).map_err(|e| tk_err(&path, "cannot encode", e))?;
                let without = inner.encode("a", false).map_err(|e| tk_err(&path, "cannot encode", e))?;
                let (w, wo) = (with.get_ids(), without.get_ids());
                if w.len() > wo.len() && w.ends_with(wo) { (Some(w[0]), "the tokenizer's post-processor prepends it".to_string()) } else { (None, "the tokenizer adds no start token".to_string()) }
            }
        };
        let mut t = TextTokenizer { inner, source: path, bos_id, eos_id, pad_id, start_token: declared, start_token_reason: reason, declared_start: declared };
        t.apply_model_rules();
        Ok(t)
    }

    /// A byte-level tokenizer with `vocab_size` ids for a synthetic model: ids 0–255 are the
    /// bytes (no merges, so a prompt is one token per byte), the rest `<|synthetic_i|>`; the
    /// configuration's BOS (when inside the vocabulary) starts every prompt.
    pub fn synthetic(vocab_size: usize, bos: Option<u32>, eos: Option<u32>) -> Result<Self> {
        let path = PathBuf::from("<synthetic tokenizer>");
        if vocab_size < 256 {
            return Err(Error::invalid(format!("a synthetic model needs a vocabulary of at least 256 tokens (its bytes), not {vocab_size}")));
        }
        let mut tokens: Vec<String> = bytes_to_unicode().iter().map(|c| c.to_string()).collect();
        tokens.extend((256..vocab_size).map(|i| format!("<|synthetic_{i}|>")));
        let inner = byte_level_bpe(&tokens, Vec::new(), "gpt-2", &path)?;
        let inside = |id: Option<u32>| id.filter(|&i| (i as usize) < vocab_size);
        let bos = inside(bos);
        Ok(TextTokenizer {
            inner,
            source: path,
            bos_id: bos,
            eos_id: inside(eos),
            pad_id: None,
            start_token: bos,
            start_token_reason: "synthetic model: its configuration's bos_token_id".into(),
            declared_start: bos,
        })
    }

    /// Rebuild the tokenizer stored in a GGUF file's metadata.
    pub fn from_gguf(g: &GgufFile) -> Result<Self> {
        let path = &g.path;
        let model = g.get_str("tokenizer.ggml.model")?.to_string();
        let tokens: Vec<String> = g.str_array("tokenizer.ggml.tokens")?.into_iter().map(String::from).collect();
        if tokens.is_empty() {
            return Err(Error::key(path, "tokenizer.ggml.tokens", "empty vocabulary"));
        }
        let types: Vec<u32> = if g.metadata.contains_key("tokenizer.ggml.token_type") {
            let t = g.num_array("tokenizer.ggml.token_type")?;
            if t.len() != tokens.len() {
                return Err(Error::key(path, "tokenizer.ggml.token_type", format!("{} entries for {} tokens", t.len(), tokens.len())));
            }
            t.into_iter().map(|x| x as u32).collect()
        } else {
            vec![1; tokens.len()]
        };
        let id_key = |k: &str| -> Result<Option<u32>> {
            match g.opt_u64(k)? {
                None => Ok(None),
                Some(id) if (id as usize) < tokens.len() => Ok(Some(id as u32)),
                Some(id) => Err(Error::key(path, k, format!("token id {id} is outside the vocabulary of {} tokens", tokens.len()))),
            }
        };
        let bos_id = id_key("tokenizer.ggml.bos_token_id")?;
        let eos_id = id_key("tokenizer.ggml.eos_token_id")?;
        let pad_id = id_key("tokenizer.ggml.padding_token_id")?;
        let merges_key = "tokenizer.ggml.merges";
        let file_merges: Option<Merges> = if g.metadata.contains_key(merges_key) {
            let raw = g.str_array(merges_key)?;
            let mut out = Vec::with_capacity(raw.len());
            for (i, m) in raw.iter().enumerate() {
                let (a, b) = m.split_once(' ').ok_or_else(|| Error::key(path, format!("{merges_key}[{i}]"), format!("`{m}` is not two tokens separated by a space")))?;
                out.push((a.to_string(), b.to_string()));
            }
            Some(out)
        } else {
            None
        };
        let byte_level = model == "gpt2";
        let gemma = model == "llama" && g.opt_str("general.architecture")?.is_some_and(|a| a.starts_with("gemma"));
        let mut inner = match model.as_str() {
            "llama" if gemma => {
                let respelled: Vec<String> = tokens.iter().map(|t| if t.contains(' ') && t.trim().is_empty() { "▁".repeat(t.chars().count()) } else { t.clone() }).collect();
                let merges = match file_merges {
                    Some(m) => m,
                    None => {
                        let order: Vec<f64> = (0..respelled.len()).map(|i| -(i as f64)).collect();
                        merges_from_scores(&respelled, &order)
                    }
                };
                let unk = id_key("tokenizer.ggml.unknown_token_id")?.map(|i| tokens[i as usize].clone());
                gemma_bpe(&respelled, merges, unk, path)?
            }
            "gpt2" => {
                let pre = g.opt_str("tokenizer.ggml.pre")?.unwrap_or("default").to_string();
                let merges = file_merges.ok_or_else(|| Error::key(path, merges_key, "missing (a byte-level BPE vocabulary needs its merges)"))?;
                byte_level_bpe(&tokens, merges, &pre, path)?
            }
            "llama" => {
                let merges = match file_merges {
                    Some(m) => m,
                    None => {
                        let scores = g.num_array("tokenizer.ggml.scores")?;
                        if scores.len() != tokens.len() {
                            return Err(Error::key(path, "tokenizer.ggml.scores", format!("{} scores for {} tokens", scores.len(), tokens.len())));
                        }
                        merges_from_scores(&tokens, &scores)
                    }
                };
                sentencepiece_bpe(&tokens, merges, path)?
            }
            other => {
                return Err(Error::key(path, "tokenizer.ggml.model", format!("`{other}` is not supported (supported: gpt2, llama)")));
            }
        };
        // Control tokens whole and special; user-defined tokens whole.
        let alphabet: Option<HashSet<char>> = byte_level.then(|| bytes_to_unicode().into_iter().collect());
        let control: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(t, ty)| **ty == 3 && alphabet.as_ref().is_none_or(|a| t.chars().all(|c| a.contains(&c))))
            .map(|(t, _)| AddedToken::from(t.clone(), true).normalized(false))
            .collect();
        if !control.is_empty() {
            inner.add_special_tokens(control).map_err(|e| tk_err(path, "cannot add control tokens", e))?;
        }
        let user: Vec<AddedToken> =
            tokens.iter().zip(&types).filter(|(t, ty)| **ty == 4 && inner.token_to_id(t).is_some()).map(|(t, _)| AddedToken::from(t.clone(), false).normalized(false)).collect();
        if !user.is_empty() {
            inner.add_tokens(user).map_err(|e| tk_err(path, "cannot add user-defined tokens", e))?;
        }
        // llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
        let add_bos = g.opt_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(model == "llama");
        let (declared, reason) = if add_bos { (bos_id, "the GGUF sets tokenizer.ggml.add_bos_token".to_string()) } else { (None, "the GGUF does not ask for a BOS token".to_string()) };
        let mut t = TextTokenizer { inner, source: path.clone(), bos_id, eos_id, pad_id, start_token: declared, start_token_reason: reason, declared_start: declared };
        t.apply_model_rules();
        Ok(t)
    }

    /// Per-model start-token table, for models whose declared rule is known to hurt.
    fn apply_model_rules(&mut self) {
        // SmolLM2: declares <|im_start|> (id 1) as BOS; measured, <|endoftext|> (id 0, its
        // pretraining document separator) gives far better factual recall (Paris→France 0.89
        // vs 0.05). Fingerprint: vocab of 49 152 with these two tokens at ids 0 and 1.
        if self.inner.get_vocab_size(true) == 49_152 && self.inner.token_to_id("<|endoftext|>") == Some(0) && self.inner.token_to_id("<|im_start|>") == Some(1) {
            self.start_token = Some(0);
            self.start_token_reason = "SmolLM2 rule: <|endoftext|>, its pretraining document separator (the declared <|im_start|> hurts recall; docs/models.md)".into();
        }
    }

    /// Choose the start token: `Auto` keeps the model's rule, `None` drops it, a token string sets it.
    pub fn set_start_token(&mut self, choice: &StartToken) -> Result<()> {
        match choice {
            StartToken::Auto => {}
            StartToken::None => {
                self.start_token = None;
                self.start_token_reason = "--start-token none".into();
            }
            StartToken::Token(s) => {
                let id = self
                    .inner
                    .token_to_id(s)
                    .ok_or_else(|| Error::invalid(format!("--start-token `{s}` is not a token of {} (give a token string such as <|endoftext|>, or `none`)", self.source.display())))?;
                self.start_token = Some(id);
                self.start_token_reason = format!("--start-token {s}");
            }
        }
        Ok(())
    }

    /// The start token the tokenizer itself declares, before per-model rules and overrides.
    pub fn declared_start_token(&self) -> Option<u32> {
        self.declared_start
    }

    /// Token ids of `text`, with no special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| tk_err(&self.source, &format!("cannot encode {text:?}"), e))?;
        Ok(enc.get_ids().to_vec())
    }

    /// A prompt as the model should see it: the start token (if any), then `text`.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.start_token.into_iter().collect();
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| tk_err(&self.source, "cannot decode", e))
    }

    /// The vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Padding id for batches: pad, else eos, else 0 (padded positions are masked anyway).
    pub fn padding_id(&self) -> u32 {
        self.pad_id.or(self.eos_id).unwrap_or(0)
    }
}

/// What `tokenizers` 0.23 would panic on instead of returning an error (found by the
/// `tokenizer_json` fuzz target): invalid JSON syntax (its decoder deserialiser `expect`s), a
/// `Precompiled` normalizer whose fields do not deserialise (`expect("Precompiled")`), and a
/// `TemplateProcessing` whose template names a special token it does not define (indexed
/// unchecked when encoding).
fn check_tokenizer_json(text: &str, path: &Path) -> Result<()> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::file(path, format!("not valid JSON: {e}")))?;
    type Visit<'a> = dyn FnMut(&serde_json::Map<String, serde_json::Value>, &str) -> Result<()> + 'a;
    /// Call `f` on every object under `v`, with its key path.
    fn objects(v: &serde_json::Value, at: &str, f: &mut Visit) -> Result<()> {
        match v {
            serde_json::Value::Object(o) => {
                f(o, at)?;
                for (k, child) in o {
                    objects(child, &format!("{at}.{k}"), f)?;
                }
            }
            serde_json::Value::Array(a) => {
                for (i, child) in a.iter().enumerate() {
                    objects(child, &format!("{at}[{i}]"), f)?;
                }
            }
            _ => {}
        }
        Ok(())
    }
    let kind = |o: &serde_json::Map<String, serde_json::Value>| o.get("type").and_then(|t| t.as_str()).map(String::from);
    if let Some(n) = v.get("normalizer") {
        objects(n, "normalizer", &mut |o, at| {
            if kind(o).as_deref() == Some("Precompiled") {
                serde_json::from_value::<tokenizers::normalizers::precompiled::Precompiled>(serde_json::Value::Object(o.clone()))
                    .map_err(|e| Error::key(path, at, format!("invalid Precompiled normalizer: {e}")))?;
            }
            Ok(())
        })?;
    }
    if let Some(p) = v.get("post_processor") {
        objects(p, "post_processor", &mut |o, at| {
            if kind(o).as_deref() != Some("TemplateProcessing") {
                return Ok(());
            }
            let defined = o.get("special_tokens").and_then(|s| s.as_object());
            for which in ["single", "pair"] {
                for (i, piece) in o.get(which).and_then(|p| p.as_array()).into_iter().flatten().enumerate() {
                    if let Some(id) = piece.get("SpecialToken").and_then(|s| s.get("id")).and_then(|s| s.as_str())
                        && !defined.is_some_and(|d| d.contains_key(id))
                    {
                        return Err(Error::key(path, format!("{at}.{which}[{i}]"), format!("special token `{id}` is not defined in {at}.special_tokens")));
                    }
                }
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// GPT-2's byte → printable-character table (`bytes_to_unicode`).
pub fn bytes_to_unicode() -> Vec<char> {
    let mut table = vec!['\0'; 256];
    let mut n = 0u32;
    for b in 0u32..256 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    table
}

fn byte_level_bpe(tokens: &[String], merges: Merges, pre: &str, path: &Path) -> Result<Tokenizer> {
    let table = bytes_to_unicode();
    let alphabet: HashSet<char> = table.iter().copied().collect();
    // Tokens stored as raw text (some converters do this for added tokens) are respelled in the
    // byte alphabet, as transformers does.
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let spelled = if t.chars().all(|c| alphabet.contains(&c)) { t.clone() } else { t.bytes().map(|b| table[b as usize]).collect() };
            (spelled, i as u32)
        })
        .collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(|e| Error::key(path, "tokenizer.ggml.merges", format!("invalid byte-level BPE: {e}")))?;
    let mut tk = Tokenizer::new(bpe);
    let split = |re: &str| -> Result<PreTokenizerWrapper> {
        let s = Split::new(SplitPattern::Regex(re.to_string()), SplitDelimiterBehavior::Isolated, false).map_err(|e| tk_err(path, "cannot compile the split regex", e))?;
        Ok(PreSequence::new(vec![s.into(), ByteLevel::new(false, true, false).into()]).into())
    };
    let pre_tok: PreTokenizerWrapper = if LLAMA3_PRES.contains(&pre) {
        split(LLAMA3_SPLIT)?
    } else if QWEN2_PRES.contains(&pre) {
        split(QWEN2_SPLIT)?
    } else if pre == "smollm" {
        PreSequence::new(vec![Digits::new(true).into(), ByteLevel::new(false, true, true).into()]).into()
    } else if GPT2_PRES.contains(&pre) {
        ByteLevel::new(false, true, true).into()
    } else {
        // A split we do not implement (gpt-4o, deepseek-llm, ...) would give other ids with no
        // error: refuse it.
        return Err(Error::key(
            path,
            "tokenizer.ggml.pre",
            format!(
                "pre-tokenizer `{pre}` is not supported (supported: {}, {}, smollm, {}); load the model's HF directory, whose tokenizer.json carries its split, instead",
                LLAMA3_PRES.join(", "),
                QWEN2_PRES.join(", "),
                GPT2_PRES.join(", ")
            ),
        ));
    };
    tk.with_pre_tokenizer(Some(pre_tok));
    tk.with_decoder(Some(ByteLevel::new(false, true, true)));
    Ok(tk)
}

fn sentencepiece_bpe(tokens: &[String], merges: Merges, path: &Path) -> Result<Tokenizer> {
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let bpe =
        BPE::builder().vocab_and_merges(vocab, merges).fuse_unk(true).byte_fallback(true).build().map_err(|e| Error::key(path, "tokenizer.ggml.tokens", format!("invalid sentencepiece BPE: {e}")))?;
    let mut tk = Tokenizer::new(bpe);
    tk.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::First, false)));
    let replace = Replace::new("▁", " ").map_err(|e| tk_err(path, "decoder", e))?;
    let decoder = DecoderSequence::new(vec![
        DecoderWrapper::Replace(replace),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
        DecoderWrapper::Strip(Strip::new(' ', 1, 0)),
    ]);
    tk.with_decoder(Some(decoder));
    Ok(tk)
}

/// Gemma's tokenizer (transformers' `GemmaTokenizer`): BPE with byte fallback, spaces → `▁`
/// by a normalizer and no prefix space.
fn gemma_bpe(tokens: &[String], merges: Merges, unk: Option<String>, path: &Path) -> Result<Tokenizer> {
    let vocab: Vocab = tokens.iter().enumerate().map(|(i, t)| (t.clone(), i as u32)).collect();
    let mut builder = BPE::builder().vocab_and_merges(vocab, merges).fuse_unk(true).byte_fallback(true);
    if let Some(u) = unk {
        builder = builder.unk_token(u);
    }
    let bpe = builder.build().map_err(|e| Error::key(path, "tokenizer.ggml.tokens", format!("invalid Gemma BPE: {e}")))?;
    let mut tk = Tokenizer::new(bpe);
    tk.with_normalizer(Some(Replace::new(" ", "▁").map_err(|e| tk_err(path, "normalizer", e))?)).map_err(|e| tk_err(path, "normalizer", e))?;
    let split = Split::new(SplitPattern::String(" ".into()), SplitDelimiterBehavior::MergedWithPrevious, false).map_err(|e| tk_err(path, "pre-tokenizer", e))?;
    tk.with_pre_tokenizer(Some(split));
    let replace = Replace::new("▁", " ").map_err(|e| tk_err(path, "decoder", e))?;
    let decoder = DecoderSequence::new(vec![DecoderWrapper::Replace(replace), DecoderWrapper::ByteFallback(ByteFallback::new()), DecoderWrapper::Fuse(Fuse::new())]);
    tk.with_decoder(Some(decoder));
    Ok(tk)
}

/// Recover BPE merges from a scored vocabulary, exactly as transformers' `generate_merges`:
/// every split of every token into two vocabulary tokens, ordered by (score, left length,
/// right length) descending, ties kept in vocabulary order.
pub fn merges_from_scores(tokens: &[String], scores: &[f64]) -> Merges {
    // Python dicts: the last index/score of a repeated token wins, at its first position.
    let mut vocab: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut order: Vec<&str> = Vec::with_capacity(tokens.len());
    let mut score_of: HashMap<&str, f64> = HashMap::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        if vocab.insert(t.as_str(), i).is_none() {
            order.push(t.as_str());
        }
        score_of.insert(t.as_str(), scores[i]);
    }
    let mut merges: Vec<(&str, &str, f64)> = Vec::new();
    for tok in order {
        let score = score_of[tok];
        let mut local: Vec<(&str, &str, f64)> = tok
            .char_indices()
            .skip(1)
            .filter_map(|(at, _)| {
                let (l, r) = tok.split_at(at);
                (vocab.contains_key(l) && vocab.contains_key(r)).then_some((l, r, score))
            })
            .collect();
        local.sort_by_key(|(l, r, _)| (vocab[l], vocab[r]));
        merges.extend(local);
    }
    let key = |m: &(&str, &str, f64)| (m.2, m.0.chars().count(), m.1.chars().count());
    merges.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        kb.0.total_cmp(&ka.0).then(kb.1.cmp(&ka.1)).then(kb.2.cmp(&ka.2))
    });
    merges.into_iter().map(|(l, r, _)| (l.to_string(), r.to_string())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection() {
        let t = bytes_to_unicode();
        let set: HashSet<char> = t.iter().copied().collect();
        assert_eq!(set.len(), 256);
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'a' as usize], 'a');
    }

    #[test]
    fn merges_follow_scores_then_lengths() {
        let toks: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"].iter().map(|s| s.to_string()).collect();
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -0.5];
        let m = merges_from_scores(&toks, &scores);
        // "abc" (score -0.5) splits as a+bc and ab+c; then ab (-1), then bc (-2).
        assert_eq!(m, vec![("ab".to_string(), "c".to_string()), ("a".to_string(), "bc".to_string()), ("a".to_string(), "b".to_string()), ("b".to_string(), "c".to_string()),]);
    }
}
