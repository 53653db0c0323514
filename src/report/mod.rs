//! `report.html`: one self-contained page per run (inline SVG and CSS, no script, no network),
//! with the score table per inference mode, token-selection heatmaps for a handful of test
//! examples (rows: source tokens + SELF, columns: base prompt tokens, as the paper's figures),
//! and the training curves. The heatmaps' raw matrices are written beside it as
//! `heatmaps.json`.

pub mod compare;
pub mod svg;
pub mod sweep;

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use candle_core::D;
use serde::Serialize;

use crate::data::collate::{EncodedRow, collate, encode_rows};
use crate::data::io::{ReadOptions, read_dataset};
use crate::error::{Error, Result};
use crate::experiment::run::{LoadedRun, ModeResult, load_run};
use crate::intervention::selection::InferenceMode;
use svg::esc;

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
    let results: BTreeMap<String, ModeResult> = read_json(&run_dir.join("results.json"))?;
    let run = load_run(run_dir, false)?;
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

    let mut h = String::new();
    let title = if extras.title.is_empty() { format!("HyperDAS run {}", run_dir.display()) } else { extras.title.clone() };
    let _ = write!(
        h,
        r#"<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{}</title><style>
body{{font-family:sans-serif;max-width:1240px;margin:24px auto;padding:0 16px;color:#222}}
table{{border-collapse:collapse;margin:8px 0 16px}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
th{{background:#f3f3f3}}td:first-child,th:first-child{{text-align:left}}.best{{font-weight:bold}}
.maps{{display:flex;flex-wrap:wrap;gap:18px}}.maps figure{{margin:0}}figcaption{{font-size:12px;color:#555;max-width:520px}}
code{{background:#f5f5f5;padding:1px 4px}}</style></head><body>
<h1>{}</h1>"#,
        esc(&title),
        esc(&title)
    );
    for n in &extras.notes {
        let _ = write!(h, "<p>{n}</p>");
    }
    // Scores: per (domain, attribute) and mode when the run wrote them, else per mode.
    let by_attr: Option<BTreeMap<String, Vec<crate::experiment::trainer::GroupScores>>> = read_json(&run_dir.join("results.by_attribute.json")).ok();
    let _ = write!(
        h,
        "<h2>Scores (test set, {} rows)</h2><table><tr><th>method · inference mode</th><th>attribute</th><th>Cause</th><th>Isolate</th><th>Disentangle</th><th>rows (causal / isolate)</th></tr>",
        enc.rows.len()
    );
    match &by_attr {
        Some(groups) => {
            let n_attr = groups.values().next().map(|g| g.iter().filter(|x| x.attribute != "mean").count()).unwrap_or(0);
            for (mode, gs) in groups {
                for g in gs.iter().filter(|g| g.attribute != "mean" || n_attr > 1) {
                    let cls = if g.attribute == "mean" { " class=\"best\"" } else { "" };
                    let _ = write!(
                        h,
                        "<tr{cls}><td>{} · {}</td><td>{} {}</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td>{} / {}</td></tr>",
                        run.interpreter.method().label(),
                        esc(mode),
                        esc(&g.domain),
                        esc(&g.attribute),
                        g.causal,
                        g.isolate,
                        g.disentangle,
                        g.causal_rows,
                        g.isolate_rows
                    );
                }
            }
        }
        None => {
            for (mode, r) in &results {
                let acc = |k: &str| r.accs.get(k).copied().unwrap_or(f64::NAN);
                let _ = write!(
                    h,
                    "<tr><td>{} · {}</td><td>all</td><td>{:.3}</td><td>{:.3}</td><td>{:.3}</td><td></td></tr>",
                    run.interpreter.method().label(),
                    esc(mode),
                    acc("causal"),
                    acc("isolate"),
                    acc("disentangle")
                );
            }
        }
    }
    let _ = write!(
        h,
        "</table><p>Cause: share of causal rows whose first {} label tokens follow the source after the intervention; Isolate: share of isolate rows that keep the base's answer; Disentangle: their mean. An isolate row counts under the attribute the instruction names. <b>mean</b>: the mean over the attributes (each weighs the same).</p>",
        run.config.train.label_limit
    );
    if !extras.comparison.is_empty() {
        let _ = write!(
            h,
            "<h2>HyperDAS beside the baselines</h2><p>MDAS (RAVEL's multi-task DAS) learns one rank-k subspace at the same layer and intervenes at the last entity token of base and source, trained on the same causal and isolate rows; HyperDAS (soft mode) chooses its positions and conditions its subspace on the instruction. Bold: the best Disentangle.</p>{}",
            extras.comparison
        );
    }
    // Heatmaps.
    let _ = write!(
        h,
        "<h2>Token selection</h2><p>Each map shows the hypernetwork's weights <code>W</code> for one test row: columns are the base prompt's tokens, rows the source prompt's tokens and SELF (keep the base's own state). A column's weights sum to 1. The red box marks the base city's last token ← the source city's last token (the groundtruth mode's choice; in the toy world, where Country is planted, the answer key). Raw matrices: <code>heatmaps.json</code>.</p><div class=\"maps\">"
    );
    for m in &maps {
        let kind = if m.causal { "causal" } else { "isolate" };
        let title = vec![format!("{} · {kind} row {} · {}", m.instruction, m.row, m.mode), format!("label {:?} · prediction {:?} {}", m.label, m.prediction, if m.correct { "✓" } else { "✗" })];
        let key = if m.source_entity_pos < m.source_tokens.len() - 1 && m.base_entity_pos < m.base_tokens.len() { vec![(m.source_entity_pos, m.base_entity_pos)] } else { Vec::new() };
        let _ = write!(
            h,
            "<figure>{}<figcaption>base: {} · source: {}</figcaption></figure>",
            svg::heatmap(&title, &m.source_tokens, &m.base_tokens, &m.weights, &key),
            esc(&m.base_text),
            esc(&m.source_text)
        );
    }
    h.push_str("</div>");
    // Curves.
    h.push_str("<h2>Training</h2><div class=\"maps\">");
    h.push_str(&svg::line_chart("training loss", "step", &[("loss".into(), loss), ("prediction loss".into(), pred_loss)], None));
    h.push_str(&svg::line_chart("test scores (soft mode)", "step", &eval_series, Some((0.0, 1.0))));
    let _ = write!(h, "</div><p>Run directory: <code>{}</code> (config.resolved.toml, metrics.jsonl, results.json, checkpoint/).</p></body></html>", esc(&run_dir.display().to_string()));
    let path = run_dir.join("report.html");
    std::fs::write(&path, h).map_err(|e| Error::file(&path, format!("cannot write: {e}")))?;
    Ok(path)
}
