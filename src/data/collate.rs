//! Tokenisation and batching of [`RavelRow`]s for training and evaluation
//! (the reference's `get_ravel_collate_fn`, docs/method.md §8.3, with one start token).
//!
//! Per row, with `label = counterfactual_target` (causal) or `target` (isolate):
//!
//! ```text
//! base        = <s> prefix suffix [" "] label      (" " unless the suffix ends in ' ', '"', ''' or '(')
//! source      = <s> cf_prefix cf_suffix
//! instruction = <s> edit_instruction
//! ```
//!
//! `<s>` is the model's start token ([`TextTokenizer::start_token`]), added exactly once as an
//! id, never as text (the reference's double-BOS bug hides the entity token; not reproduced).
//! Token roles come from the tokenizer's byte offsets, not from tokenising pieces separately:
//!
//! * label tokens: tokens that start at or after the end of `prefix + suffix`; a token that
//!   straddles that boundary makes the row unusable (reported, never silently truncated);
//! * base intervention mask: the start token and tokens that start inside `prefix` (plus the
//!   suffix tokens when `base_suffix_visible`); never padding or label tokens;
//! * source intervention mask: likewise with `cf_prefix` / `source_suffix_visible`;
//! * entity position: the last token that overlaps the entity's characters at the end of the
//!   prefix (needed by MDAS and the ground-truth mode).
//!
//! Batches are left-padded; positions in a [`CollatedBatch`] are in padded coordinates.

use candle_core::{Device, Tensor};

use super::row::{RavelRow, label_separator};
use crate::error::{Error, Result};
use crate::model::{TextTokenizer, TokenBatch};

/// Label value for positions that are not trained on (as in HF / PyTorch).
pub const IGNORE_INDEX: i64 = -100;

/// Collation options.
#[derive(Debug, Clone)]
pub struct CollateOptions {
    /// Let the intervention touch the base suffix (the attribute query). Reference default: false.
    pub base_suffix_visible: bool,
    /// Let the intervention read the source suffix. Reference default: false.
    pub source_suffix_visible: bool,
    /// Longest base / source / instruction sequence, start token included. Longer rows are an
    /// error, or skipped with a count when `skip_unusable`. (The reference truncates at 50 on
    /// the right, which can cut labels.)
    pub max_len: usize,
    /// Skip (and count) rows that are too long or whose label cannot be separated from the
    /// prompt, instead of failing.
    pub skip_unusable: bool,
}

impl Default for CollateOptions {
    fn default() -> Self {
        CollateOptions { base_suffix_visible: false, source_suffix_visible: false, max_len: 128, skip_unusable: false }
    }
}

/// Byte span `(start, end)` of each token in its text.
pub type Spans = Vec<(usize, usize)>;

/// Token ids of `text` (no special tokens) and each token's byte span in `text`.
pub fn encode_spans(tok: &TextTokenizer, text: &str) -> Result<(Vec<u32>, Spans)> {
    let enc = tok.inner.encode(text, false).map_err(|e| Error::invalid(format!("{}: cannot encode {text:?}: {e}", tok.source.display())))?;
    Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
}

/// A prompt followed by a label, tokenised together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptWithLabel {
    /// Start token (if any), prompt tokens, label tokens.
    pub ids: Vec<u32>,
    /// Index in `ids` of the first label token.
    pub label_start: usize,
    /// Byte spans of `ids` in the text (the start token gets `(0, 0)`).
    pub spans: Spans,
}

/// Tokenise `prompt + separator + label` and find the label tokens by offset: tokens starting at
/// or after `prompt.len()` (so a separator space belongs to the label, as in the reference).
pub fn encode_prompt_with_label(tok: &TextTokenizer, prompt: &str, label: &str) -> Result<PromptWithLabel> {
    let text = format!("{prompt}{}{label}", label_separator(prompt));
    let (ids, spans) = encode_spans(tok, &text)?;
    let boundary = prompt.len();
    if let Some(&(s, e)) = spans.iter().find(|&&(s, e)| s < boundary && e > boundary) {
        return Err(Error::invalid(format!("the token {:?} spans the end of the prompt and the start of the label {label:?}, so the label cannot be separated", &text[s..e])));
    }
    let first_label = spans.iter().position(|&(s, _)| s >= boundary).unwrap_or(ids.len());
    if first_label == ids.len() {
        return Err(Error::invalid(format!("the label {label:?} produced no tokens")));
    }
    let start = tok.start_token.map(|id| (vec![id], vec![(0, 0)])).unwrap_or_default();
    let n0 = start.0.len();
    if n0 + first_label == 0 {
        return Err(Error::invalid(format!("the prompt before the label {label:?} is empty and there is no start token: nothing predicts the first label token")));
    }
    Ok(PromptWithLabel { ids: start.0.into_iter().chain(ids).collect(), label_start: n0 + first_label, spans: start.1.into_iter().chain(spans).collect() })
}

/// A left-padded teacher-forcing batch of `prompt + label` sequences.
pub struct LabelBatch {
    pub tokens: TokenBatch,
    /// `[B, K]` positions whose logits predict the first `K` label tokens (a row with fewer
    /// label tokens repeats its last one as filler).
    pub positions: Tensor,
    /// `B·K` label tokens at those positions.
    pub targets: Vec<u32>,
    /// `B·K`, 1 for real label tokens and 0 for filler.
    pub valid: Vec<f32>,
    pub k: usize,
}

/// Batch `(ids, label_start)` sequences (ids include the start token; `label_start ≥ 1`), with
/// `K` = the most label tokens of any row, capped at `limit`.
pub fn label_batch(seqs: &[(&[u32], usize)], limit: Option<usize>, pad: u32, device: &Device) -> Result<LabelBatch> {
    let rows: Vec<Vec<u32>> = seqs.iter().map(|(ids, _)| ids.to_vec()).collect();
    let tokens = TokenBatch::left_padded(&rows, pad, device)?;
    let (b, t) = tokens.dims();
    let most = seqs.iter().map(|(ids, start)| ids.len() - start).max().unwrap_or(1);
    let k = limit.map_or(most, |l| most.min(l)).max(1);
    let (mut pos, mut targets, mut valid) = (Vec::with_capacity(b * k), Vec::with_capacity(b * k), Vec::with_capacity(b * k));
    for (ids, start) in seqs {
        let shift = t - ids.len();
        let n = ids.len() - start;
        for j in 0..k {
            let p = start + j.min(n - 1); // repeat the last label token as filler
            pos.push((shift + p - 1) as u32);
            targets.push(ids[p]);
            valid.push(if j < n { 1.0 } else { 0.0 });
        }
    }
    let positions = Tensor::from_vec(pos, (b, k), device)?; // [B, K]
    Ok(LabelBatch { tokens, positions, targets, valid, k })
}

/// From the byte spans of a prompt's tokens (start token included, with span `(0, 0)`): how
/// many leading tokens start inside `prefix` (the intervenable ones unless the suffix is
/// visible), and the last token overlapping the entity at the end of the prefix.
fn prefix_roles(spans: &[(usize, usize)], prefix: &str, entity: &str) -> Result<(usize, usize)> {
    let prefix_end = prefix.len();
    let entity_start = prefix_end - entity.len();
    let in_prefix = spans.iter().take_while(|&&(s, _)| s < prefix_end).count();
    let entity_pos = spans.iter().rposition(|&(s, e)| s < prefix_end && e > entity_start).ok_or_else(|| Error::invalid(format!("no token covers the entity {entity:?} at the end of {prefix:?}")))?;
    Ok((in_prefix, entity_pos))
}

/// One tokenised row, unpadded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedRow {
    /// Index of the row in the dataset it came from.
    pub row: usize,
    /// `<s> prefix suffix [sep] label`.
    pub base_ids: Vec<u32>,
    /// First label token in `base_ids`.
    pub label_start: usize,
    /// Tokens `0..base_visible` may be intervened on.
    pub base_visible: usize,
    pub base_entity_pos: usize,
    pub source_ids: Vec<u32>,
    pub source_visible: usize,
    pub source_entity_pos: usize,
    pub instruction_ids: Vec<u32>,
    pub is_causal: bool,
    /// The row's domain and the attribute its instruction intervenes on (the key of the
    /// per-attribute result tables; for isolate rows this is not the attribute asked).
    pub domain: String,
    pub target_attribute: String,
}

/// Rows that could be encoded, and the ones skipped with reasons.
#[derive(Debug, Clone, Default)]
pub struct EncodedSet {
    pub rows: Vec<EncodedRow>,
    /// `(row index, reason)`.
    pub skipped: Vec<(usize, String)>,
}

/// Tokenise one row.
pub fn encode_row(tok: &TextTokenizer, row: &RavelRow, index: usize, opts: &CollateOptions) -> Result<EncodedRow> {
    if let Some(p) = row.problem() {
        return Err(Error::invalid(p));
    }
    let base = encode_prompt_with_label(tok, &row.base_prompt(), row.label())?;
    let (base_prefix_tokens, base_entity_pos) = prefix_roles(&base.spans, &row.input_prefix, &row.entity)?;
    let base_visible = if opts.base_suffix_visible { base.label_start } else { base_prefix_tokens.min(base.label_start) };
    let (source_ids, source_spans) = encode_spans(tok, &row.source_prompt())?;
    let start = tok.start_token.map(|id| (vec![id], vec![(0, 0)])).unwrap_or_default();
    let source_ids: Vec<u32> = start.0.into_iter().chain(source_ids).collect();
    let source_spans: Vec<(usize, usize)> = start.1.into_iter().chain(source_spans).collect();
    let (source_prefix_tokens, source_entity_pos) = prefix_roles(&source_spans, &row.counterfactual_input_prefix, &row.counterfactual_entity)?;
    let source_visible = if opts.source_suffix_visible { source_ids.len() } else { source_prefix_tokens };
    let instruction_ids = tok.encode_prompt(&row.edit_instruction)?;
    for (what, n) in [("base prompt + label", base.ids.len()), ("source prompt", source_ids.len()), ("instruction", instruction_ids.len())] {
        if n > opts.max_len {
            return Err(Error::invalid(format!("the {what} has {n} tokens, more than max_len {} (raise max_len; labels are never truncated)", opts.max_len)));
        }
    }
    if base_entity_pos >= base.label_start {
        return Err(Error::invalid("the base entity position falls inside the label"));
    }
    Ok(EncodedRow {
        row: index,
        base_ids: base.ids,
        label_start: base.label_start,
        base_visible,
        base_entity_pos,
        source_ids,
        source_visible,
        source_entity_pos,
        instruction_ids,
        is_causal: row.is_causal(),
        domain: row.domain.clone(),
        target_attribute: row.instruction_attribute().unwrap_or(&row.attribute).to_string(),
    })
}

/// Tokenise a dataset. `source` names it in errors (`file.jsonl`), rows are 1-based there.
pub fn encode_rows(tok: &TextTokenizer, rows: &[RavelRow], opts: &CollateOptions, source: &str) -> Result<EncodedSet> {
    let mut set = EncodedSet::default();
    for (i, row) in rows.iter().enumerate() {
        match encode_row(tok, row, i, opts) {
            Ok(e) => set.rows.push(e),
            Err(e) if opts.skip_unusable => set.skipped.push((i, e.to_string())),
            Err(e) => return Err(Error::invalid(format!("{source}: row {}: {e}", i + 1))),
        }
    }
    Ok(set)
}

/// A left-padded batch on the host. All `[B, T]` buffers are row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct CollatedBatch {
    /// Dataset row index of each batch row.
    pub rows: Vec<usize>,
    pub base_len: usize,
    pub base_ids: Vec<u32>,
    pub base_attention: Vec<u8>,
    /// `[B, Tb]`: the token id on label tokens, [`IGNORE_INDEX`] elsewhere. Token `t` is
    /// predicted by the logits at `t - 1`.
    pub labels: Vec<i64>,
    pub base_intervention_mask: Vec<u8>,
    /// `[B]` padded position of the last base entity token.
    pub base_entity_pos: Vec<u32>,
    pub source_len: usize,
    pub source_ids: Vec<u32>,
    pub source_attention: Vec<u8>,
    pub source_intervention_mask: Vec<u8>,
    pub source_entity_pos: Vec<u32>,
    pub instruction_len: usize,
    pub instruction_ids: Vec<u32>,
    pub instruction_attention: Vec<u8>,
    pub is_causal: Vec<bool>,
    /// `[B]` the attribute each row's instruction intervenes on ([`EncodedRow::target_attribute`]).
    pub target_attribute: Vec<String>,
}

fn pad_left(seqs: &[&[u32]], pad: u32) -> (usize, Vec<u32>, Vec<u8>) {
    let t = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(seqs.len() * t);
    let mut mask = Vec::with_capacity(seqs.len() * t);
    for s in seqs {
        ids.extend(std::iter::repeat_n(pad, t - s.len()));
        ids.extend_from_slice(s);
        mask.extend(std::iter::repeat_n(0u8, t - s.len()));
        mask.extend(std::iter::repeat_n(1u8, s.len()));
    }
    (t, ids, mask)
}

/// Left-pad encoded rows into one batch.
pub fn collate(rows: &[&EncodedRow], pad_id: u32) -> CollatedBatch {
    let (tb, base_ids, base_attention) = pad_left(&rows.iter().map(|r| r.base_ids.as_slice()).collect::<Vec<_>>(), pad_id);
    let (ts, source_ids, source_attention) = pad_left(&rows.iter().map(|r| r.source_ids.as_slice()).collect::<Vec<_>>(), pad_id);
    let (ti, instruction_ids, instruction_attention) = pad_left(&rows.iter().map(|r| r.instruction_ids.as_slice()).collect::<Vec<_>>(), pad_id);
    let b = rows.len();
    let mut labels = vec![IGNORE_INDEX; b * tb];
    let mut base_intervention_mask = vec![0u8; b * tb];
    let mut source_intervention_mask = vec![0u8; b * ts];
    let mut base_entity_pos = Vec::with_capacity(b);
    let mut source_entity_pos = Vec::with_capacity(b);
    for (i, r) in rows.iter().enumerate() {
        let pad_b = tb - r.base_ids.len();
        for t in r.label_start..r.base_ids.len() {
            labels[i * tb + pad_b + t] = r.base_ids[t] as i64;
        }
        for t in 0..r.base_visible {
            base_intervention_mask[i * tb + pad_b + t] = 1;
        }
        base_entity_pos.push((pad_b + r.base_entity_pos) as u32);
        let pad_s = ts - r.source_ids.len();
        for t in 0..r.source_visible {
            source_intervention_mask[i * ts + pad_s + t] = 1;
        }
        source_entity_pos.push((pad_s + r.source_entity_pos) as u32);
    }
    CollatedBatch {
        rows: rows.iter().map(|r| r.row).collect(),
        base_len: tb,
        base_ids,
        base_attention,
        labels,
        base_intervention_mask,
        base_entity_pos,
        source_len: ts,
        source_ids,
        source_attention,
        source_intervention_mask,
        source_entity_pos,
        instruction_len: ti,
        instruction_ids,
        instruction_attention,
        is_causal: rows.iter().map(|r| r.is_causal).collect(),
        target_attribute: rows.iter().map(|r| r.target_attribute.clone()).collect(),
    }
}

impl CollatedBatch {
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn base_batch(&self, device: &Device) -> Result<TokenBatch> {
        TokenBatch::from_host(self.base_ids.clone(), self.base_attention.clone(), self.len(), self.base_len, device)
    }

    pub fn source_batch(&self, device: &Device) -> Result<TokenBatch> {
        TokenBatch::from_host(self.source_ids.clone(), self.source_attention.clone(), self.len(), self.source_len, device)
    }

    pub fn instruction_batch(&self, device: &Device) -> Result<TokenBatch> {
        TokenBatch::from_host(self.instruction_ids.clone(), self.instruction_attention.clone(), self.len(), self.instruction_len, device)
    }

    /// Most label tokens in any row.
    pub fn max_label_tokens(&self) -> usize {
        self.labels.chunks(self.base_len.max(1)).map(|r| r.iter().filter(|&&l| l != IGNORE_INDEX).count()).max().unwrap_or(0)
    }

    /// Teacher-forcing targets, `k = min(max_label_tokens, limit)` per row:
    /// `(positions [B, k] u32` whose logits predict, `targets [B, k] u32`, `valid [B, k] u8)`.
    /// Rows with fewer label tokens repeat their last position with `valid = 0`.
    pub fn label_targets(&self, limit: usize) -> (usize, Vec<u32>, Vec<u32>, Vec<u8>) {
        let k = self.max_label_tokens().min(limit).max(1);
        let (mut pos, mut tgt, mut valid) = (Vec::new(), Vec::new(), Vec::new());
        for row in self.labels.chunks(self.base_len) {
            let mut got: Vec<(u32, u32)> = row.iter().enumerate().filter(|(_, l)| **l != IGNORE_INDEX).map(|(t, &l)| ((t - 1) as u32, l as u32)).collect();
            got.truncate(k);
            let n = got.len();
            let last = got.last().copied().unwrap_or((0, 0));
            got.resize(k, last);
            for (j, (p, t)) in got.into_iter().enumerate() {
                pos.push(p);
                tgt.push(t);
                valid.push(u8::from(j < n));
            }
        }
        (k, pos, tgt, valid)
    }

    /// `[B, T]` u8 tensor of a host mask.
    pub fn mask_tensor(mask: &[u8], b: usize, t: usize, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(mask.to_vec(), (b, t), device)?)
    }
}
