//! `hyperdas compare`: finished runs side by side, one table per (domain, attribute) with a row
//! per method (the paper's main-table layout), as Markdown and as an HTML fragment.
//!
//! A run is read from its directory alone: `run.json` (method, resolved layer, rank; written
//! at the end of every run) and `results.by_attribute.json`. HyperDAS rows show the inference
//! modes asked for (default: soft, the paper's main table); a baseline has one mode
//! (`groundtruth`: the last entity token), shown as "last entity token".

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::experiment::run::RunInfo;
use crate::experiment::trainer::GroupScores;
use crate::hypernet::interpreter::Method;

/// One finished run.
#[derive(Debug, Clone)]
pub struct RunSummary {
    pub dir: PathBuf,
    pub info: RunInfo,
    pub method: Method,
    /// Per inference mode: every (domain, attribute) group and each domain's mean.
    pub groups: BTreeMap<String, Vec<GroupScores>>,
}

/// Read a finished run directory.
pub fn read_run(dir: &Path) -> Result<RunSummary> {
    let read = |name: &str| -> Result<String> {
        let p = dir.join(name);
        if !p.is_file() {
            let why = if dir.join("config.resolved.toml").is_file() { "the run has not finished (or predates run.json: rerun or `hyperdas eval` it)" } else { "not a run directory" };
            return Err(Error::file(dir, format!("no {name}: {why}")));
        }
        std::fs::read_to_string(&p).map_err(|e| Error::file(&p, format!("cannot read: {e}")))
    };
    let info: RunInfo = serde_json::from_str(&read("run.json")?).map_err(|e| Error::file(dir.join("run.json"), format!("not a run summary: {e}")))?;
    let groups: BTreeMap<String, Vec<GroupScores>> =
        serde_json::from_str(&read("results.by_attribute.json")?).map_err(|e| Error::file(dir.join("results.by_attribute.json"), format!("not per-attribute results: {e}")))?;
    let method = Method::parse(&info.method).map_err(|e| Error::file(dir.join("run.json"), e.to_string()))?;
    Ok(RunSummary { dir: dir.to_path_buf(), info, method, groups })
}

/// One row of a comparison table.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CompareRow {
    /// "HyperDAS · soft", "MDAS", ...
    pub label: String,
    pub method: Method,
    pub mode: String,
    pub layer: usize,
    pub rank: usize,
    pub run: PathBuf,
    pub scores: GroupScores,
}

/// The rows of `runs` for every (domain, attribute) they share, HyperDAS in `hyperdas_modes`.
/// Ordered by domain, attribute (each domain's "mean" last), then method (HyperDAS, MDAS, DAS)
/// and layer.
pub fn compare(runs: &[RunSummary], hyperdas_modes: &[String]) -> Result<Vec<CompareRow>> {
    let mut rows = Vec::new();
    for r in runs {
        let modes: Vec<String> = if r.method.is_baseline() { vec!["groundtruth".into()] } else { hyperdas_modes.to_vec() };
        for mode in modes {
            let Some(gs) = r.groups.get(&mode) else {
                return Err(Error::file(&r.dir, format!("no `{mode}` scores in results.by_attribute.json (it has: {})", r.groups.keys().cloned().collect::<Vec<_>>().join(", "))));
            };
            let label = if r.method.is_baseline() { r.method.label().to_string() } else { format!("{} · {mode}", r.method.label()) };
            for g in gs {
                rows.push(CompareRow { label: label.clone(), method: r.method, mode: mode.clone(), layer: r.info.layer, rank: r.info.rank, run: r.dir.clone(), scores: g.clone() });
            }
        }
    }
    let order = |m: Method| match m {
        Method::HyperDas => 0,
        Method::Mdas => 1,
        Method::Das => 2,
    };
    rows.sort_by(|a, b| {
        (&a.scores.domain, a.scores.attribute == "mean", &a.scores.attribute, order(a.method), a.layer, a.rank, &a.mode).cmp(&(
            &b.scores.domain,
            b.scores.attribute == "mean",
            &b.scores.attribute,
            order(b.method),
            b.layer,
            b.rank,
            &b.mode,
        ))
    });
    Ok(rows)
}

/// Groups of rows per (domain, attribute), in table order; a domain's "mean" is left out when
/// the domain has one attribute (it would repeat that attribute's table).
fn tables(rows: &[CompareRow]) -> Vec<((String, String), Vec<&CompareRow>)> {
    let mut out: Vec<((String, String), Vec<&CompareRow>)> = Vec::new();
    for r in rows {
        let key = (r.scores.domain.clone(), r.scores.attribute.clone());
        match out.last_mut() {
            Some((k, v)) if *k == key => v.push(r),
            _ => out.push((key, vec![r])),
        }
    }
    let attrs = |d: &str| out.iter().filter(|((dd, a), _)| dd == d && a != "mean").count();
    let single: Vec<String> = out.iter().map(|((d, _), _)| d.clone()).filter(|d| attrs(d) <= 1).collect();
    out.into_iter().filter(|((d, a), _)| !(a == "mean" && single.contains(d))).collect()
}

fn num(x: f64) -> String {
    if x.is_nan() { "–".into() } else { format!("{x:.3}") }
}

/// Markdown: a heading and a table per (domain, attribute); the best Disentangle in bold.
/// Written by hand: a Markdown table is a header, a rule and one `|`-joined line per row, and
/// comfy-table's Markdown preset would only add column padding.
pub fn markdown(rows: &[CompareRow]) -> String {
    let mut s = String::new();
    for ((domain, attr), rs) in tables(rows) {
        let title = if attr == "mean" { format!("{domain}: mean over attributes") } else { format!("{domain} / {attr}") };
        let best = rs.iter().map(|r| r.scores.disentangle).filter(|x| !x.is_nan()).fold(f64::NEG_INFINITY, f64::max);
        let _ = writeln!(s, "### {title}\n\n| method | layer | rank | Cause | Isolate | Disentangle | rows (causal / isolate) |\n|---|---|---|---|---|---|---|");
        for r in rs {
            let d = num(r.scores.disentangle);
            let d = if r.scores.disentangle == best { format!("**{d}**") } else { d };
            let _ = writeln!(s, "| {} | {} | {} | {} | {} | {d} | {} / {} |", r.label, r.layer, r.rank, num(r.scores.causal), num(r.scores.isolate), r.scores.causal_rows, r.scores.isolate_rows);
        }
        s.push('\n');
    }
    s
}

/// The same tables as an HTML fragment (for report.html and compare.html).
pub fn html(rows: &[CompareRow]) -> Result<String> {
    let tables: Vec<serde_json::Value> = tables(rows)
        .into_iter()
        .map(|((domain, attr), rs)| {
            let title = if attr == "mean" { format!("{domain}: mean over attributes") } else { format!("{domain} / {attr}") };
            let best = rs.iter().map(|r| r.scores.disentangle).filter(|x| !x.is_nan()).fold(f64::NEG_INFINITY, f64::max);
            let rows: Vec<serde_json::Value> = rs
                .iter()
                .map(|r| {
                    let s = &r.scores;
                    serde_json::json!({"best": s.disentangle == best, "label": r.label, "layer": r.layer, "rank": r.rank, "causal": num(s.causal), "isolate": num(s.isolate), "disentangle": num(s.disentangle), "causal_rows": s.causal_rows, "isolate_rows": s.isolate_rows})
                })
                .collect();
            serde_json::json!({"title": title, "rows": rows})
        })
        .collect();
    super::html::render("compare_tables.html", serde_json::json!({ "tables": tables }))
}

/// A whole page around [`html`].
pub fn html_page(title: &str, rows: &[CompareRow], note: &str) -> Result<String> {
    super::html::render("compare.html", serde_json::json!({"title": title, "width": 1000, "note": note, "tables": html(rows)?}))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(attr: &str, c: f64, i: f64) -> GroupScores {
        GroupScores { domain: "city".into(), attribute: attr.into(), causal: c, isolate: i, disentangle: (c + i) / 2.0, causal_rows: 10, isolate_rows: 10 }
    }

    fn run(method: Method, modes: &[&str]) -> RunSummary {
        let info = RunInfo { method: method.name().into(), layer: 3, num_layers: 6, rank: 8, subspace: "das".into(), model: "m".into(), provenance: None, train_rows: 1, test_rows: 1 };
        let groups = modes.iter().map(|m| (m.to_string(), vec![g("Country", 0.8, 0.6), g("Continent", 0.4, 0.9), g("mean", 0.6, 0.75)])).collect();
        RunSummary { dir: PathBuf::from(method.name()), info, method, groups }
    }

    #[test]
    fn tables_per_attribute_with_a_row_per_method() {
        let runs = [run(Method::Das, &["groundtruth"]), run(Method::HyperDas, &["soft", "bidding_argmax", "groundtruth"]), run(Method::Mdas, &["groundtruth"])];
        let rows = compare(&runs, &["soft".into(), "bidding_argmax".into()]).unwrap();
        // 3 groups × (2 HyperDAS modes + MDAS + DAS).
        assert_eq!(rows.len(), 12);
        let labels: Vec<&str> = rows.iter().take(4).map(|r| r.label.as_str()).collect();
        assert_eq!(labels, ["HyperDAS · bidding_argmax", "HyperDAS · soft", "MDAS", "DAS"]);
        assert_eq!(rows[0].scores.attribute, "Continent");
        assert_eq!(rows[11].scores.attribute, "mean");
        let md = markdown(&rows);
        assert!(md.contains("### city / Country") && md.contains("### city: mean over attributes") && md.contains("| MDAS | 3 | 8 | 0.800 | 0.600 | **0.700** | 10 / 10 |"), "{md}");
        let h = html(&rows).unwrap();
        assert_eq!(h.matches("<table>").count(), 3);
        // A HyperDAS mode the run lacks is an error naming the run.
        let err = compare(&runs, &["global_argmax".into()]).unwrap_err().to_string();
        assert!(err.contains("hyperdas") && err.contains("global_argmax"), "{err}");
    }
}
