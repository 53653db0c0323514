//! `hyperdas compare`: finished runs side by side, one table per (domain, attribute) with a row
//! per method (the paper's main-table layout), as Markdown and as an HTML fragment.
//!
//! A run is read from its directory alone: `run.json` (method, resolved layer, rank; written
//! at the end of every run) and `results.by_attribute.json`. HyperDAS rows show the inference
//! modes asked for (default: soft, the paper's main table); a baseline has one mode
//! (`groundtruth`: the last entity token), shown as "last entity token".
//!
//! Runs that differ only in their seeds (`interpreter.seed`, `train.seed`) are one setting:
//! its row shows the mean ± sample standard deviation over the seeds. Runs of one setting
//! trained on one target attribute each (`data.attributes`, RAVEL's per-attribute MDAS) are
//! merged per seed and labelled "per attribute"; the domain mean is then taken over the merged
//! attributes. Settings of one method that differ otherwise are told apart in the label by the
//! keys in which they differ (from each run's `config.resolved.toml`).

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
    /// Per inference mode: the shares of causal rows whose base entity token takes a source
    /// token, and the source entity token (`results.json`; absent in older runs).
    pub entity_position: BTreeMap<String, (Option<f64>, Option<f64>)>,
    /// The run's resolved settings as `key → value` (dotted keys; empty without
    /// `config.resolved.toml`), seeds and `data.attributes` left out: what makes two runs the
    /// same setting.
    pub settings: BTreeMap<String, String>,
    /// `interpreter.seed/train.seed`.
    pub seed: String,
    /// `data.attributes` (empty: every attribute).
    pub attributes: Vec<String>,
}

/// Keys that do not make a run a different setting: the seeds, the per-attribute split, and
/// what only changes how a run is carried out.
const NOT_A_SETTING: [&str; 14] = [
    "interpreter.seed",
    "model.device",
    "train.seed",
    "data.attributes",
    "data.train_sha256",
    "data.test_sha256",
    "train.eval_every",
    "train.checkpoint_every",
    "train.log_every",
    "train.stop_after_steps",
    "train.state_cache_gb",
    "train.state_cache_dtype",
    "eval.modes",
    "eval.batch_size",
];

fn flatten(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
    match v {
        toml::Value::Table(t) => {
            for (k, x) in t {
                flatten(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, x, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
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
    let mut entity_position = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(dir.join("results.json")) {
        let results: BTreeMap<String, crate::experiment::run::ModeResult> = serde_json::from_str(&text).map_err(|e| Error::file(dir.join("results.json"), format!("not results: {e}")))?;
        for (mode, r) in results {
            let (sel, pos) = (r.accs.get("entity_selected").copied(), r.accs.get("entity_position").copied());
            if sel.is_some() || pos.is_some() {
                entity_position.insert(mode, (sel, pos));
            }
        }
    }
    let mut flat = BTreeMap::new();
    let cfg_path = dir.join("config.resolved.toml");
    if let Ok(text) = std::fs::read_to_string(&cfg_path) {
        let doc: toml::Value = text.parse::<toml::Table>().map(toml::Value::Table).map_err(|e| Error::file(&cfg_path, format!("not TOML: {e}")))?;
        flatten("", &doc, &mut flat);
    }
    let seed = format!("{}/{}", flat.get("interpreter.seed").map_or("0", |s| s.as_str()), flat.get("train.seed").map_or("0", |s| s.as_str()));
    let attributes: Vec<String> = match flat.get("data.attributes") {
        Some(v) => v.parse::<toml::Value>().ok().and_then(|x| x.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())).unwrap_or_default(),
        None => Vec::new(),
    };
    let settings = flat.into_iter().filter(|(k, _)| !NOT_A_SETTING.contains(&k.as_str())).collect();
    Ok(RunSummary { dir: dir.to_path_buf(), info, method, groups, entity_position, settings, seed, attributes })
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
    /// The mean over seeds (one seed: that run's scores).
    pub scores: GroupScores,
    /// Seeds averaged.
    pub seeds: usize,
    /// Sample standard deviations over the seeds of (Cause, Isolate, Disentangle); `None` for
    /// one seed.
    pub std: Option<[f64; 3]>,
    /// The mean share of causal rows whose base entity token takes a source token (domain
    /// means only; `None` where not measured).
    pub entity_selected: Option<f64>,
    /// The mean share of causal rows whose base entity token takes the source entity token.
    pub entity_position: Option<f64>,
}

/// The rows of `runs` for every (domain, attribute) they share, HyperDAS in `hyperdas_modes`:
/// one row per setting and mode, averaged over its seeds (see the module doc). Ordered by
/// domain, attribute (each domain's "mean" last), then method (HyperDAS, MDAS, DAS), layer and
/// label.
pub fn compare(runs: &[RunSummary], hyperdas_modes: &[String]) -> Result<Vec<CompareRow>> {
    // Settings: (method, per attribute, resolved settings) → indices of its runs.
    type Setting<'a> = (Method, bool, &'a BTreeMap<String, String>);
    let mut settings: Vec<(Setting, Vec<usize>)> = Vec::new();
    for (i, r) in runs.iter().enumerate() {
        let key = (r.method, !r.attributes.is_empty(), &r.settings);
        match settings.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(i),
            None => settings.push((key, vec![i])),
        }
    }
    let mut rows = Vec::new();
    for ((method, per_attribute, cfg), members) in &settings {
        // What tells this setting apart from the method's others: the keys whose values differ.
        let siblings: Vec<&BTreeMap<String, String>> = settings.iter().filter(|((m, _, _), _)| m == method).map(|((_, _, c), _)| *c).collect();
        // A key's usual value is the one most of the method's settings have (the first seen on
        // a tie); a setting is labelled by the keys where it departs from the usual.
        let usual = |k: &str| -> Option<&String> {
            let mut counts: Vec<(Option<&String>, usize)> = Vec::new();
            for o in &siblings {
                let v = o.get(k);
                match counts.iter_mut().find(|(x, _)| *x == v) {
                    Some((_, n)) => *n += 1,
                    None => counts.push((v, 1)),
                }
            }
            let best = counts.iter().map(|(_, n)| *n).max().unwrap_or(0);
            counts.into_iter().find(|(_, n)| *n == best).and_then(|(v, _)| v)
        };
        // Layer and rank have their own columns.
        let shown = ["interpreter.layer", "interpreter.rank"];
        let differing: Vec<String> = cfg.iter().filter(|(k, v)| siblings.len() > 1 && !shown.contains(&k.as_str()) && usual(k) != Some(v)).map(|(k, v)| format!("{k}={v}")).collect();
        let first = &runs[members[0]];
        let modes: Vec<String> = if method.is_baseline() { vec!["groundtruth".into()] } else { hyperdas_modes.to_vec() };
        for mode in modes {
            // Per seed: the attribute groups of its runs (one run, or one per attribute).
            // Per seed: its attribute groups and each run's (entity selected, entity → entity).
            type Shares = Vec<(Option<f64>, Option<f64>)>;
            let mut by_seed: BTreeMap<&str, (Vec<GroupScores>, Shares)> = BTreeMap::new();
            for &i in members {
                let r = &runs[i];
                let Some(gs) = r.groups.get(&mode) else {
                    return Err(Error::file(&r.dir, format!("no `{mode}` scores in results.by_attribute.json (it has: {})", r.groups.keys().cloned().collect::<Vec<_>>().join(", "))));
                };
                let e = by_seed.entry(r.seed.as_str()).or_default();
                for g in gs.iter().filter(|g| g.attribute != "mean") {
                    if e.0.iter().any(|h| h.domain == g.domain && h.attribute == g.attribute) {
                        return Err(Error::file(&r.dir, format!("{} / {} is scored twice for seed {} of one setting (two runs with the same settings and seed)", g.domain, g.attribute, r.seed)));
                    }
                    e.0.push(g.clone());
                }
                if let Some(x) = r.entity_position.get(&mode) {
                    e.1.push(*x);
                }
            }
            // Each seed's domain means over the attributes it holds.
            let avg = |v: Vec<f64>| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
            let mut per_seed: Vec<(Vec<GroupScores>, Option<f64>, Option<f64>)> = Vec::new();
            for (mut gs, ep) in by_seed.into_values() {
                let domains: std::collections::BTreeSet<String> = gs.iter().map(|g| g.domain.clone()).collect();
                let means: Vec<GroupScores> = domains.iter().map(|d| GroupScores::domain_mean(d, &gs.iter().filter(|g| &g.domain == d).collect::<Vec<_>>())).collect();
                gs.extend(means);
                per_seed.push((gs, avg(ep.iter().filter_map(|e| e.0).collect()), avg(ep.iter().filter_map(|e| e.1).collect())));
            }
            let mut label = if method.is_baseline() { method.label().to_string() } else { format!("{} · {mode}", method.label()) };
            if *per_attribute {
                label += " · per attribute";
            }
            if !differing.is_empty() {
                label += &format!(" ({})", differing.join(", "));
            }
            // Across seeds, per (domain, attribute) of the first seed.
            for g in &per_seed[0].0 {
                let same: Vec<&GroupScores> = per_seed.iter().filter_map(|(gs, _, _)| gs.iter().find(|h| h.domain == g.domain && h.attribute == g.attribute)).collect();
                let (mean, std) = mean_std(&same);
                let is_mean = g.attribute == "mean";
                let entity_selected = if is_mean { avg(per_seed.iter().filter_map(|e| e.1).collect()) } else { None };
                let entity_position = if is_mean { avg(per_seed.iter().filter_map(|e| e.2).collect()) } else { None };
                rows.push(CompareRow {
                    label: label.clone(),
                    method: *method,
                    mode: mode.clone(),
                    layer: first.info.layer,
                    rank: first.info.rank,
                    run: first.dir.clone(),
                    scores: mean,
                    seeds: same.len(),
                    std,
                    entity_selected,
                    entity_position,
                });
            }
        }
    }
    let order = |m: Method| match m {
        Method::HyperDas => 0,
        Method::Mdas => 1,
        Method::Das => 2,
    };
    rows.sort_by(|a, b| {
        (&a.scores.domain, a.scores.attribute == "mean", &a.scores.attribute, order(a.method), a.layer, a.rank, &a.label).cmp(&(
            &b.scores.domain,
            b.scores.attribute == "mean",
            &b.scores.attribute,
            order(b.method),
            b.layer,
            b.rank,
            &b.label,
        ))
    });
    Ok(rows)
}

/// The mean of `gs` and, for two or more, the sample standard deviations of (Cause, Isolate,
/// Disentangle); NaN scores (no such rows) stay NaN.
fn mean_std(gs: &[&GroupScores]) -> (GroupScores, Option<[f64; 3]>) {
    let n = gs.len() as f64;
    let pick = |f: &dyn Fn(&GroupScores) -> f64| -> (f64, f64) {
        let m = gs.iter().map(|g| f(g)).sum::<f64>() / n;
        let var = if gs.len() > 1 { gs.iter().map(|g| (f(g) - m).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
        (m, var.sqrt())
    };
    let (c, cs) = pick(&|g| g.causal);
    let (i, is) = pick(&|g| g.isolate);
    let (d, ds) = pick(&|g| g.disentangle);
    let mean = GroupScores { causal: c, isolate: i, disentangle: d, ..gs[0].clone() };
    (mean, (gs.len() > 1).then_some([cs, is, ds]))
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

/// Cause, Isolate, Disentangle as printed: `0.412`, or `0.412 ± 0.020` over several seeds.
fn cells(r: &CompareRow) -> [String; 3] {
    let v = [r.scores.causal, r.scores.isolate, r.scores.disentangle];
    std::array::from_fn(|k| match r.std {
        Some(sd) if !v[k].is_nan() => format!("{} ± {:.3}", num(v[k]), sd[k]),
        _ => num(v[k]),
    })
}

/// Markdown: a heading and a table per (domain, attribute); the best Disentangle in bold.
/// Written by hand: a Markdown table is a header, a rule and one `|`-joined line per row, and
/// comfy-table's Markdown preset would only add column padding.
pub fn markdown(rows: &[CompareRow]) -> String {
    let mut s = String::new();
    for ((domain, attr), rs) in tables(rows) {
        let title = if attr == "mean" { format!("{domain}: mean over attributes") } else { format!("{domain} / {attr}") };
        let best = rs.iter().map(|r| r.scores.disentangle).filter(|x| !x.is_nan()).fold(f64::NEG_INFINITY, f64::max);
        let seeds = rs.iter().any(|r| r.seeds > 1);
        let landing = rs.iter().any(|r| r.entity_position.is_some() || r.entity_selected.is_some());
        let _ = write!(
            s,
            "### {title}\n\n| method | layer | rank |{} Cause | Isolate | Disentangle |{} rows (causal / isolate) |\n|---|---|---|{}---|---|---|{}---|\n",
            if seeds { " seeds |" } else { "" },
            if landing { " entity selected | entity → entity |" } else { "" },
            if seeds { "---|" } else { "" },
            if landing { "---|---|" } else { "" }
        );
        for r in rs {
            let [c, i, d] = cells(r);
            let d = if r.scores.disentangle == best { format!("**{d}**") } else { d };
            let n = if seeds { format!(" {} |", r.seeds) } else { String::new() };
            let share = |x: Option<f64>| x.map_or("–".into(), |x| format!("{x:.3}"));
            let e = if landing { format!(" {} | {} |", share(r.entity_selected), share(r.entity_position)) } else { String::new() };
            let _ = writeln!(s, "| {} | {} | {} |{n} {c} | {i} | {d} |{e} {} / {} |", r.label, r.layer, r.rank, r.scores.causal_rows, r.scores.isolate_rows);
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
                    let [c, i, d] = cells(r);
                    serde_json::json!({"best": s.disentangle == best, "label": r.label, "layer": r.layer, "rank": r.rank, "seeds": r.seeds, "causal": c, "isolate": i, "disentangle": d, "entity_selected": r.entity_selected.map_or("–".into(), |x| format!("{x:.3}")), "entity_position": r.entity_position.map_or("–".into(), |x| format!("{x:.3}")), "causal_rows": s.causal_rows, "isolate_rows": s.isolate_rows})
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
        RunSummary { dir: PathBuf::from(method.name()), info, method, groups, entity_position: BTreeMap::new(), settings: BTreeMap::new(), seed: "0/0".into(), attributes: Vec::new() }
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
