//! A trained run applied to one new (base, source, instruction) triple: the positions it
//! chooses, the prediction before and after, and the instruction-conditioned basis. The one
//! implementation behind `hyperdas apply` and the Python `Run.apply` / `Run.subspace`.

use candle_core::{DType, Tensor};

use super::run::LoadedRun;
use crate::data::collate::{CollateOptions, CollatedBatch, EncodedRow, collate, encode_row};
use crate::data::row::RavelRow;
use crate::error::{Error, Result};
use crate::intervention::selection::{InferenceMode, argmax};
use crate::model::TextTokenizer;
use crate::model::llama::softmax_last_dim;

/// One query: prompts split after their entity, as the training rows are.
#[derive(Debug, Clone)]
pub struct Query {
    /// Base prompt, e.g. "city: Paris, country:".
    pub base: String,
    /// Source (counterfactual) prompt, e.g. "city: Tokyo, country:".
    pub source: String,
    /// Instruction, e.g. "Paris ; Tokyo - Country".
    pub instruction: String,
    /// The base entity (its last occurrence ends the intervenable prefix); default: the
    /// instruction's first name.
    pub base_entity: Option<String>,
    /// The source entity; default: the instruction's second name.
    pub source_entity: Option<String>,
}

/// Where one base token takes its value from.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Choice {
    pub base_index: usize,
    pub base_token: String,
    /// The source position with the largest weight, or None when the base token keeps itself.
    pub source_index: Option<usize>,
    pub source_token: Option<String>,
    pub weight: f32,
    /// Whether the intervention may write here (the base prefix up to the entity).
    pub intervenable: bool,
}

/// What [`apply`] found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Applied {
    /// The mode used (a baseline's own mode when another was asked for).
    pub mode: InferenceMode,
    /// One entry per base token before the label.
    pub choices: Vec<Choice>,
    /// Next-token top-k before and after the intervention, with probabilities.
    pub before: Vec<(String, f32)>,
    pub after: Vec<(String, f32)>,
    /// `W [T_s+1, T_b]` over the base prompt's tokens: row `i < T_s` is source token `i`, the
    /// last row "keep the base".
    pub weights: Vec<Vec<f32>>,
    pub base_tokens: Vec<String>,
    pub source_tokens: Vec<String>,
}

impl Applied {
    /// Whether the top prediction changed.
    pub fn changed(&self) -> bool {
        self.before.first().map(|b| &b.0) != self.after.first().map(|a| &a.0)
    }
}

/// Split `prompt` after the last occurrence of `entity`.
fn split_at_entity(prompt: &str, entity: &str, what: &str) -> Result<(String, String)> {
    let at = prompt.rfind(entity).ok_or_else(|| Error::invalid(format!("the {what} entity {entity:?} does not occur in the {what} prompt {prompt:?} (name it with {what}_entity)")))?;
    let end = at + entity.len();
    Ok((prompt[..end].to_string(), prompt[end..].to_string()))
}

impl Query {
    /// The query as a one-row batch of the run's collation (a placeholder label: only the first
    /// label position is read, and its logits predict the token after the base prompt).
    fn encode(&self, run: &LoadedRun) -> Result<(EncodedRow, CollatedBatch)> {
        let names = self.instruction.rsplit_once(" - ").map(|(ents, _)| ents.split(" ; ").map(str::trim).map(String::from).collect::<Vec<_>>()).unwrap_or_default();
        let no_entity = |what: &str| Error::invalid(format!("no {what} entity: name it ({what}_entity) or use an instruction like \"Paris ; Tokyo - Country\""));
        let base_entity = self.base_entity.clone().or_else(|| names.first().cloned()).ok_or_else(|| no_entity("base"))?;
        let source_entity = self.source_entity.clone().or_else(|| names.get(1).cloned()).ok_or_else(|| no_entity("source"))?;
        let (bp, bs) = split_at_entity(&self.base, &base_entity, "base")?;
        let (sp, ss) = split_at_entity(&self.source, &source_entity, "source")?;
        let row = RavelRow {
            input_prefix: bp,
            input_suffix: bs,
            counterfactual_input_prefix: sp,
            counterfactual_input_suffix: ss,
            edit_instruction: self.instruction.clone(),
            entity: base_entity,
            counterfactual_entity: source_entity,
            target: String::new(),
            counterfactual_target: String::new(),
            attribute_type: "causal".into(),
            domain: String::new(),
            attribute: String::new(),
            verify_text: String::new(),
        };
        let cfg = &run.config;
        let opts = CollateOptions { base_suffix_visible: cfg.data.base_suffix_visible, source_suffix_visible: cfg.data.source_suffix_visible, ..Default::default() };
        let tok = &run.lm.tokenizer;
        let enc = encode_query_row(tok, row, &opts)?;
        let batch = collate(&[&enc], tok.padding_id());
        Ok((enc, batch))
    }
}

/// Placeholder labels for a query, tried in turn: the label must start a token of its own, and a
/// tokenizer may merge one with the prompt's last characters (Gemma 3 has a single token for
/// `"?`, and RAVEL's prompts end with `"`).
const PLACEHOLDER_LABELS: [&str; 4] = ["?", "X", "The", "0"];

/// `row` (its targets ignored) encoded with the first placeholder label that separates from the
/// base prompt: only the first label position is read, whose logits predict the token after the
/// base prompt.
pub fn encode_query_row(tok: &TextTokenizer, mut row: RavelRow, opts: &CollateOptions) -> Result<EncodedRow> {
    let mut first_err = None;
    for label in PLACEHOLDER_LABELS {
        row.target = label.into();
        row.counterfactual_target = label.into();
        match encode_row(tok, &row, 0, opts) {
            Ok(enc) => return Ok(enc),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.unwrap_or_else(|| Error::invalid("no placeholder label")))
}

/// The `top` most likely tokens of a probability vector `p [V]`.
fn top_tokens(run: &LoadedRun, p: &Tensor, top: usize) -> Result<Vec<(String, f32)>> {
    let v = p.to_vec1::<f32>()?;
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&x, &y| v[y].total_cmp(&v[x]));
    idx.into_iter().take(top.max(1)).map(|i| Ok((run.lm.tokenizer.decode(&[i as u32])?, v[i]))).collect()
}

/// Run `run` on `q` in `mode` (a baseline uses its own mode whatever is asked).
#[allow(clippy::needless_range_loop)] // j indexes W's columns and the base tokens alike
pub fn apply(run: &LoadedRun, q: &Query, mode: InferenceMode, top: usize) -> Result<Applied> {
    let mode = if run.interpreter.supports(mode) { mode } else { run.interpreter.native_mode() };
    let (enc, batch) = q.encode(run)?;
    let model = &run.lm.model;
    let tok = &run.lm.tokenizer;
    let out = run.interpreter.forward(model, &batch, mode, 1)?;
    let after = softmax_last_dim(&out.logits.squeeze(0)?.squeeze(0)?)?; // [V]
    let base = batch.base_batch(model.device())?;
    let h = model.forward_hidden(&base, Some(&[]))?;
    let pos = Tensor::new(&[[(enc.label_start - 1) as u32]], model.device())?; // [1, 1]
    let before = softmax_last_dim(&model.logits_at(&h.final_normed, &pos)?.squeeze(0)?.squeeze(0)?.to_dtype(DType::F32)?)?; // [V]
    let weights = out.w.squeeze(0)?.to_dtype(DType::F32)?.to_vec2::<f32>()?; // [T_s+1, T_b]
    let ts = batch.source_len;
    let decode = |id: u32| tok.decode(&[id]);
    let mut choices = Vec::with_capacity(enc.label_start);
    for j in 0..enc.label_start {
        let best = argmax((0..=ts).map(|i| weights[i][j]));
        let source_index = (best < ts).then_some(best);
        choices.push(Choice {
            base_index: j,
            base_token: decode(enc.base_ids[j])?,
            source_index,
            source_token: source_index.map(|i| decode(enc.source_ids[i])).transpose()?,
            weight: weights[best][j],
            intervenable: j < enc.base_visible,
        });
    }
    Ok(Applied {
        mode,
        choices,
        before: top_tokens(run, &before, top)?,
        after: top_tokens(run, &after, top)?,
        // The base prompt's columns only (the query's placeholder label is not shown).
        weights: weights.into_iter().map(|row| row[..enc.label_start].to_vec()).collect(),
        base_tokens: enc.base_ids[..enc.label_start].iter().map(|&i| decode(i)).collect::<Result<_>>()?,
        source_tokens: enc.source_ids.iter().map(|&i| decode(i)).collect::<Result<_>>()?,
    })
}

/// The basis `[D, k]` (f32) the run intervenes in for `q` (see
/// [`crate::hypernet::interpreter::Interpreter::basis`]).
pub fn subspace(run: &LoadedRun, q: &Query) -> Result<Tensor> {
    let (_, batch) = q.encode(run)?;
    Ok(run.interpreter.basis(&run.lm.model, &batch)?.squeeze(0)?.to_dtype(DType::F32)?) // [D, k]
}
