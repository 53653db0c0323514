//! `report.html`: one self-contained page per run (inline SVG and CSS, no script, no network),
//! with the score table per inference mode, token-selection heatmaps for a handful of test
//! examples (rows: source tokens + SELF, columns: base prompt tokens, as the paper's figures),
//! and the training curves. The heatmaps' raw matrices are written beside it as
//! `heatmaps.json`.

pub mod compare;
pub mod html;
pub mod svg;
pub mod sweep;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::D;
use serde::Serialize;

use crate::data::collate::{EncodedRow, collate, encode_rows};
use crate::data::io::{ReadOptions, read_dataset};
use crate::error::{Error, Result};
use crate::experiment::run::{LoadedRun, ModeResult, load_run_on};
use crate::intervention::selection::InferenceMode;

/// One heatmap: the weights `W[source token or SELF][base token]` of one test row.
#[derive(Debug, Clone, Serialize)]
pub struct Heatmap {
    pub row: usize,
    pub mode: String,
    pub causal: bool,
    pub instruction: String,
    /// The base prompt and the source prompt, decoded.
    pub base_text: String,
    pub source_text: String,
    pub base_tokens: Vec<String>,
    /// Source tokens, then "SELF".
    pub source_tokens: Vec<String>,
    /// `[T_s + 1][T_b]` over the base prompt's tokens (label tokens left out).
    pub weights: Vec<Vec<f32>>,
    pub base_entity_pos: usize,
    pub source_entity_pos: usize,
    pub label: String,
    pub prediction: String,
    pub correct: bool,
}

/// What the report shows besides the run directory's own files.
#[derive(Debug, Clone, Default)]
pub struct ReportExtras {
    /// Heading of the page.
    pub title: String,
    /// Free paragraphs (already HTML-escaped where needed), shown under the heading.
    pub notes: Vec<String>,
    /// An HTML fragment comparing this run with baselines ([`compare::html`]); empty: none.
    pub comparison: String,
}

/// Weights and prediction of each of `rows` (one at a time: batch size 1) in `mode`.
pub fn heatmaps(run: &LoadedRun, rows: &[&EncodedRow], mode: InferenceMode) -> Result<Vec<Heatmap>> {
    let tok = &run.lm.tokenizer;
    let piece = |id: u32| if Some(id) == tok.start_token { "<s>".to_string() } else { tok.decode(&[id]).unwrap_or_default() };
    // Text without the start token (the heatmaps show it as a column of its own).
    let text = |ids: &[u32]| -> Result<String> {
        let ids = match (ids.first(), tok.start_token) {
            (Some(&first), Some(start)) if first == start => &ids[1..],
            _ => ids,
        };
        Ok(tok.decode(ids)?.trim().to_string())
    };
    let mut out = Vec::new();
    for r in rows {
        let batch = collate(&[*r], tok.padding_id());
        let res = run.interpreter.forward(&run.lm.model, &batch, mode, run.config.train.label_limit)?;
        let w = res.w.to_dtype(candle_core::DType::F32)?.to_vec3::<f32>()?; // [1, T_s+1, T_b]
        let pred = res.logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?; // [K]
        let valid: Vec<usize> = (0..res.k).filter(|&j| res.valid[j] > 0.0).collect();
        let label_ids: Vec<u32> = valid.iter().map(|&j| res.targets[j]).collect();
        let pred_ids: Vec<u32> = valid.iter().map(|&j| pred[j]).collect();
        let prompt_len = r.label_start;
        let weights: Vec<Vec<f32>> = w[0].iter().map(|row| row[..prompt_len].to_vec()).collect();
        out.push(Heatmap {
            row: r.row,
            mode: mode.name().into(),
            causal: r.is_causal,
            instruction: text(&r.instruction_ids)?,
            base_text: text(&r.base_ids[..prompt_len])?,
            source_text: text(&r.source_ids)?,
            base_tokens: r.base_ids[..prompt_len].iter().map(|&i| piece(i)).collect(),
            source_tokens: r.source_ids.iter().map(|&i| piece(i)).chain(std::iter::once("SELF".to_string())).collect(),
            weights,
            base_entity_pos: r.base_entity_pos,
            source_entity_pos: r.source_entity_pos,
            label: tok.decode(&label_ids)?,
            prediction: tok.decode(&pred_ids)?,
            correct: label_ids == pred_ids,
        });
    }
    Ok(out)
}

/// Pick `n_causal` causal and `n_isolate` isolate rows, spread over the set.
pub fn pick_examples(rows: &[EncodedRow], n_causal: usize, n_isolate: usize) -> Vec<&EncodedRow> {
    // Evenly spaced, skipping a base prompt already shown.
    fn spread(pool: Vec<&EncodedRow>, n: usize) -> Vec<&EncodedRow> {
        if pool.is_empty() || n == 0 {
            return Vec::new();
        }
        let step = (pool.len() / n).max(1);
        let mut out: Vec<&EncodedRow> = Vec::new();
        for start in (0..pool.len()).step_by(step) {
            if let Some(r) = pool[start..].iter().find(|r| !out.iter().any(|o| o.base_ids == r.base_ids)) {
                out.push(r);
            }
            if out.len() == n {
                break;
            }
        }
        out
    }
    let mut out = spread(rows.iter().filter(|r| r.is_causal).collect(), n_causal);
    out.extend(spread(rows.iter().filter(|r| !r.is_causal).collect(), n_isolate));
    out
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    serde_json::from_str(&text).map_err(|e| Error::file(path, format!("not valid JSON: {e}")))
}

/// Write `report.html` and `heatmaps.json` into the run directory `run_dir` (a finished
/// `hyperdas train` run), with heatmaps for examples of `test`. Returns the page's path.
pub fn write_report(run_dir: &Path, test: &Path, extras: &ReportExtras) -> Result<PathBuf> {
    write_report_on(run_dir, None, test, extras)
}

/// [`write_report`] with the run loaded onto `device` (its own `model.device` when `None`).
pub fn write_report_on(run_dir: &Path, device: Option<&str>, test: &Path, extras: &ReportExtras) -> Result<PathBuf> {
    let results: BTreeMap<String, ModeResult> = read_json(&run_dir.join("results.json"))?;
    let run = load_run_on(run_dir, crate::experiment::run::Reload { device, ..Default::default() }, false)?;
    let ds = read_dataset(test, ReadOptions::default())?;
    let enc = encode_rows(&run.lm.tokenizer, &ds.rows, &run.config.data.collate_options(false), &test.display().to_string())?;
    let picked = pick_examples(&enc.rows, 4, 2);
    let mut maps = heatmaps(&run, &picked, run.interpreter.native_mode())?;
    if !run.interpreter.positions.is_fixed() {
        // A baseline's positions are fixed: one set of maps says all.
        maps.extend(heatmaps(&run, &picked[..picked.len().min(2)], InferenceMode::parse("bidding_argmax")?)?);
    }
    let hm_path = run_dir.join("heatmaps.json");
    std::fs::write(&hm_path, serde_json::to_string_pretty(&maps).map_err(|e| Error::invalid(e.to_string()))?).map_err(|e| Error::file(&hm_path, format!("cannot write: {e}")))?;

    // Curves from metrics.jsonl.
    let metrics_path = run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics_path).map_err(|e| Error::file(&metrics_path, format!("cannot read: {e}")))?;
    let (mut loss, mut pred_loss) = (Vec::new(), Vec::new());
    let mut eval: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line).map_err(|e| Error::file(&metrics_path, format!("line {}: {e}", i + 1)))?;
        let step = v["step"].as_f64().unwrap_or(f64::NAN);
        if let Some(l) = v["loss"].as_f64() {
            loss.push((step, l));
        }
        if let Some(l) = v["prediction_loss"].as_f64() {
            pred_loss.push((step, l));
        }
        for k in ["causal", "isolate", "disentangle"] {
            if let Some((_, x)) = crate::train::metrics::eval_metric(&v, k) {
                eval.entry(k).or_default().push((step, x));
            }
        }
    }
    let names = [("causal", "Cause"), ("isolate", "Isolate"), ("disentangle", "Disentangle")];
    let eval_series: Vec<(String, Vec<(f64, f64)>)> = names.iter().map(|(k, n)| (n.to_string(), eval.remove(k).unwrap_or_default())).collect();

    let title = if extras.title.is_empty() { format!("HyperDAS run {}", run_dir.display()) } else { extras.title.clone() };
    // Scores: per (domain, attribute) and mode when the run wrote them, else per mode.
    let method = run.interpreter.method().label();
    let by_attr: Option<BTreeMap<String, Vec<crate::experiment::trainer::GroupScores>>> = read_json(&run_dir.join("results.by_attribute.json")).ok();
    let f3 = |x: f64| format!("{x:.3}");
    let mut scores = Vec::new();
    match &by_attr {
        Some(groups) => {
            let n_attr = groups.values().next().map(|g| g.iter().filter(|x| x.attribute != "mean").count()).unwrap_or(0);
            for (mode, gs) in groups {
                for g in gs.iter().filter(|g| g.attribute != "mean" || n_attr > 1) {
                    scores.push(serde_json::json!({
                        "method": method, "mode": mode, "attribute": format!("{} {}", g.domain, g.attribute), "mean": g.attribute == "mean",
                        "causal": f3(g.causal), "isolate": f3(g.isolate), "disentangle": f3(g.disentangle), "rows": format!("{} / {}", g.causal_rows, g.isolate_rows),
                    }));
                }
            }
        }
        None => {
            for (mode, r) in &results {
                let acc = |k: &str| f3(r.accs.get(k).copied().unwrap_or(f64::NAN));
                scores.push(serde_json::json!({"method": method, "mode": mode, "attribute": "all", "mean": false, "causal": acc("causal"), "isolate": acc("isolate"), "disentangle": acc("disentangle"), "rows": ""}));
            }
        }
    }
    let maps: Vec<serde_json::Value> = maps
        .iter()
        .map(|m| {
            let kind = if m.causal { "causal" } else { "isolate" };
            let title = vec![format!("{} · {kind} row {} · {}", m.instruction, m.row, m.mode), format!("label {:?} · prediction {:?} {}", m.label, m.prediction, if m.correct { "✓" } else { "✗" })];
            let key = if m.source_entity_pos < m.source_tokens.len() - 1 && m.base_entity_pos < m.base_tokens.len() { vec![(m.source_entity_pos, m.base_entity_pos)] } else { Vec::new() };
            serde_json::json!({"svg": svg::heatmap(&title, &m.source_tokens, &m.base_tokens, &m.weights, &key), "base_text": m.base_text, "source_text": m.source_text})
        })
        .collect();
    let curves = [
        svg::line_chart("training loss", "step", &[("loss".into(), loss), ("prediction loss".into(), pred_loss)], None),
        svg::line_chart("test scores (soft mode)", "step", &eval_series, Some((0.0, 1.0))),
    ];
    let h = html::render(
        "report.html",
        serde_json::json!({
            "title": title, "width": 1240, "notes": extras.notes, "test_rows": enc.rows.len(), "scores": scores,
            "label_limit": run.config.train.label_limit, "comparison": extras.comparison, "maps": maps, "curves": curves,
            "run_dir": run_dir.display().to_string(),
        }),
    )?;
    let path = run_dir.join("report.html");
    std::fs::write(&path, h).map_err(|e| Error::file(&path, format!("cannot write: {e}")))?;
    Ok(path)
}
