//! `hyperdas sweep`: one run per point of a grid (methods × layers × ranks × any setting), run
//! one after another into `OUT/runs/<name>/`, resumable, then a CSV, SVG line plots and a
//! summary table over all finished runs.
//!
//! The runs share one clean-state cache (same model and cache settings), so the target's clean
//! passes run once per prompt for the whole sweep. Restarting a sweep skips every run with `results.json`, resumes a run that has a checkpoint
//! (same settings), and restarts one that has neither. Each point's configuration is the
//! method's preset ([`RunConfig::preset`]), then `--config`, then `--set`, then the point's
//! grid values, so a sweep point equals `hyperdas train|baseline` with those settings.
//!
//! Grid syntax: `KEY=V1,V2,...` or `KEY=START:END[:STEP]` (integers, END included). Short keys:
//! `layer` (or `model.layer`) = `interpreter.layer`, `rank` and `k` = `interpreter.rank`; `method` takes
//! `hyperdas,das,mdas`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::hypernet::interpreter::Method;
use crate::report::compare::{RunSummary, read_run};
use crate::train::run::RunConfig;

/// One axis of the grid: a full config key and its values (TOML literals).
#[derive(Debug, Clone, PartialEq)]
pub struct Axis {
    pub key: String,
    pub values: Vec<String>,
}

impl Axis {
    /// Parse `KEY=V1,V2` or `KEY=A:B[:S]`.
    pub fn parse(spec: &str) -> Result<Axis> {
        let (k, v) = spec.split_once('=').ok_or_else(|| Error::invalid(format!("--grid {spec:?}: expected KEY=V1,V2,... or KEY=START:END[:STEP]")))?;
        let key = match k.trim() {
            "layer" | "model.layer" => "interpreter.layer".to_string(),
            "rank" | "k" => "interpreter.rank".to_string(),
            other => other.to_string(),
        };
        let v = v.trim();
        let values: Vec<String> = if v.contains(':') {
            let parts: Vec<&str> = v.split(':').collect();
            let int = |s: &str| s.trim().parse::<i64>().map_err(|_| Error::invalid(format!("--grid {spec:?}: `{s}` is not an integer (ranges are START:END[:STEP])")));
            let (a, b) = (int(parts[0])?, int(parts.get(1).copied().unwrap_or(""))?);
            let step = if parts.len() > 2 { int(parts[2])? } else { 1 };
            if parts.len() > 3 || step <= 0 || b < a {
                return Err(Error::invalid(format!("--grid {spec:?}: a range is START:END[:STEP] with START ≤ END and STEP ≥ 1 (END included)")));
            }
            (a..=b).step_by(step as usize).map(|x| x.to_string()).collect()
        } else {
            v.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect()
        };
        if values.is_empty() {
            return Err(Error::invalid(format!("--grid {spec:?}: no values")));
        }
        if key == "method" {
            for m in &values {
                Method::parse(m)?;
            }
        }
        Ok(Axis { key, values })
    }

    /// The short name used in run names and plots.
    pub fn short(&self) -> &str {
        match self.key.as_str() {
            "interpreter.layer" => "layer",
            "interpreter.rank" => "rank",
            k => k.rsplit('.').next().unwrap_or(k),
        }
    }
}

/// One grid point.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub method: Method,
    /// `(axis index, value)` for every axis but `method`.
    pub values: Vec<(usize, String)>,
    /// Directory name: `mdas-layer3-rank16`.
    pub name: String,
}

/// Every point of `axes` (a `method` axis, or `[hyperdas]` without one), in order: methods
/// outermost, then the axes as given.
pub fn points(axes: &[Axis]) -> Result<Vec<Point>> {
    let methods: Vec<Method> = match axes.iter().find(|a| a.key == "method") {
        Some(a) => a.values.iter().map(|m| Method::parse(m)).collect::<Result<_>>()?,
        None => vec![Method::HyperDas],
    };
    let others: Vec<(usize, &Axis)> = axes.iter().enumerate().filter(|(_, a)| a.key != "method").collect();
    let mut combos: Vec<Vec<(usize, String)>> = vec![Vec::new()];
    for (i, a) in &others {
        combos = combos.into_iter().flat_map(|c| a.values.iter().map(move |v| [c.clone(), vec![(*i, v.clone())]].concat())).collect();
    }
    let safe = |s: &str| s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' { c } else { '_' }).collect::<String>();
    let mut out = Vec::new();
    for &m in &methods {
        for c in &combos {
            let mut name = m.name().to_string();
            for (i, v) in c {
                let _ = write!(name, "-{}{}", axes[*i].short(), safe(v));
            }
            out.push(Point { method: m, values: c.clone(), name });
        }
    }
    Ok(out)
}

/// What a sweep does.
pub struct SweepPlan<'a> {
    pub config: Option<&'a Path>,
    pub sets: &'a [String],
    pub axes: &'a [Axis],
    pub out: &'a Path,
    /// HyperDAS's mode in the CSV and plots (baselines: their fixed positions).
    pub hyperdas_mode: String,
    pub progress: bool,
}

/// The configuration of one point.
pub fn point_config(plan: &SweepPlan, p: &Point) -> Result<RunConfig> {
    let mut sets = plan.sets.to_vec();
    for (i, v) in &p.values {
        sets.push(format!("{}={v}", plan.axes[*i].key));
    }
    sets.push(format!("interpreter.method={}", p.method.name()));
    crate::config::load_over(&RunConfig::preset(p.method), plan.config, &sets)
}

/// Run every point not finished yet, then write `sweep.csv`, the plots and `summary.md`.
/// Returns the finished runs.
pub fn sweep(plan: &SweepPlan) -> Result<Vec<RunSummary>> {
    let pts = points(plan.axes)?;
    // Every configuration resolves before anything runs: a typo fails now, not after hours.
    let cfgs: Vec<RunConfig> = pts.iter().map(|p| point_config(plan, p)).collect::<Result<_>>()?;
    let runs_dir = plan.out.join("runs");
    std::fs::create_dir_all(&runs_dir).map_err(|e| Error::file(&runs_dir, format!("cannot create: {e}")))?;
    let t0 = std::time::Instant::now();
    // One state cache for the whole sweep: runs on the same model reuse each other's clean
    // states (every layer is cached, so any method and layer can read them).
    let mut shared: crate::train::run::SharedCache = None;
    for (i, (p, cfg)) in pts.iter().zip(&cfgs).enumerate() {
        let dir = runs_dir.join(&p.name);
        let status = if dir.join("results.json").is_file() && dir.join("run.json").is_file() {
            "done"
        } else if crate::train::checkpoint::exists(&dir.join("checkpoint")) {
            "resume"
        } else {
            if dir.exists() {
                // Interrupted before its first checkpoint: nothing to keep.
                std::fs::remove_dir_all(&dir).map_err(|e| Error::file(&dir, format!("cannot remove the unfinished run: {e}")))?;
            }
            "new"
        };
        if plan.progress {
            let what = match status {
                "done" => "finished earlier, skipped",
                "resume" => "resuming from its checkpoint",
                _ => "starting",
            };
            eprintln!("sweep run {}/{}: {} ({what}; {:.0} s so far)", i + 1, pts.len(), p.name, t0.elapsed().as_secs_f64());
        }
        if status == "done" {
            continue;
        }
        if crate::train::run::run_sharing(cfg, &dir, status == "resume", plan.progress, &mut shared)?.is_none() {
            return Err(Error::invalid(format!("{}: stopped early (train.stop_after_steps); rerun the sweep to continue", p.name)));
        }
    }
    let runs: Vec<RunSummary> = pts.iter().map(|p| read_run(&runs_dir.join(&p.name))).collect::<Result<_>>()?;
    write_outputs(plan, &pts, &runs)?;
    Ok(runs)
}

/// A run's headline scores: the domain mean when the run has several attributes, else its
/// one group.
fn headline(r: &RunSummary, hyperdas_mode: &str) -> Result<crate::train::hyperdas::GroupScores> {
    let mode = if r.method.is_baseline() { "groundtruth" } else { hyperdas_mode };
    let gs = r.groups.get(mode).ok_or_else(|| Error::file(&r.dir, format!("no `{mode}` scores")))?;
    let real: Vec<_> = gs.iter().filter(|g| g.attribute != "mean").collect();
    let pick = if real.len() == 1 { real[0] } else { gs.iter().find(|g| g.attribute == "mean").unwrap_or(real[0]) };
    Ok(pick.clone())
}

fn write_outputs(plan: &SweepPlan, pts: &[Point], runs: &[RunSummary]) -> Result<()> {
    let axes: Vec<(usize, &Axis)> = plan.axes.iter().enumerate().filter(|(_, a)| a.key != "method").collect();
    // CSV: every group of every run (the native mode of each method).
    let mut csv = String::from("run,method");
    for (_, a) in &axes {
        let _ = write!(csv, ",{}", a.short());
    }
    csv += ",layer_resolved,rank_resolved,mode,domain,attribute,causal,isolate,disentangle,causal_rows,isolate_rows\n";
    for (p, r) in pts.iter().zip(runs) {
        let mode = if r.method.is_baseline() { "groundtruth" } else { plan.hyperdas_mode.as_str() };
        for g in r.groups.get(mode).into_iter().flatten() {
            let _ = write!(csv, "{},{}", p.name, p.method.name());
            for (_, v) in &p.values {
                let _ = write!(csv, ",{v}");
            }
            let _ = writeln!(csv, ",{},{},{mode},{},{},{},{},{},{},{}", r.info.layer, r.info.rank, g.domain, g.attribute, g.causal, g.isolate, g.disentangle, g.causal_rows, g.isolate_rows);
        }
    }
    let write = |name: &str, text: &str| -> Result<()> {
        let path = plan.out.join(name);
        crate::atomic::write_text(&path, text)
    };
    write("sweep.csv", &csv)?;

    // Plots: each metric against each numeric axis, one line per method (and per value of the
    // other axes, when there are several).
    let heads: Vec<_> = runs.iter().map(|r| headline(r, &plan.hyperdas_mode)).collect::<Result<_>>()?;
    let mut svgs = Vec::new();
    for &(ai, axis) in &axes {
        let x_of = |p: &Point, r: &RunSummary| -> Option<f64> {
            match axis.key.as_str() {
                "interpreter.layer" => Some(r.info.layer as f64),
                "interpreter.rank" => Some(r.info.rank as f64),
                _ => p.values.iter().find(|(i, _)| *i == ai).and_then(|(_, v)| v.parse::<f64>().ok()),
            }
        };
        if pts.iter().zip(runs).any(|(p, r)| x_of(p, r).is_none()) || axis.values.len() < 2 {
            continue; // not numeric, or one value: no line to draw
        }
        for (metric, name) in [("disentangle", "Disentangle"), ("causal", "Cause"), ("isolate", "Isolate")] {
            let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
            for ((p, r), h) in pts.iter().zip(runs).zip(&heads) {
                let mut label = p.method.label().to_string();
                for (i, v) in &p.values {
                    if *i != ai {
                        let _ = write!(label, " {}={v}", plan.axes[*i].short());
                    }
                }
                let y = match metric {
                    "disentangle" => h.disentangle,
                    "causal" => h.causal,
                    _ => h.isolate,
                };
                let x = x_of(p, r).unwrap_or(f64::NAN);
                match series.iter_mut().find(|(l, _)| *l == label) {
                    Some((_, v)) => v.push((x, y)),
                    None => series.push((label, vec![(x, y)])),
                }
            }
            for (_, v) in &mut series {
                v.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
            let x_label = if axis.key == "interpreter.layer" { "layer (residual entering the block)".to_string() } else { axis.short().to_string() };
            let svg = crate::report::svg::line_chart(&format!("{name} vs {}", axis.short()), &x_label, &series, Some((0.0, 1.0)));
            let file = format!("{metric}_vs_{}.svg", axis.short());
            write(&file, &svg)?;
            svgs.push((file, svg));
        }
    }

    // Summary: one line per run, best Disentangle per method.
    let mut md = String::from("| run | method | layer | rank | Cause | Isolate | Disentangle |\n|---|---|---|---|---|---|---|\n");
    for ((p, r), h) in pts.iter().zip(runs).zip(&heads) {
        let _ = writeln!(md, "| {} | {} | {} | {} | {:.3} | {:.3} | {:.3} |", p.name, p.method.label(), r.info.layer, r.info.rank, h.causal, h.isolate, h.disentangle);
    }
    md += "\nBest Disentangle per method:\n\n";
    let mut methods: Vec<Method> = pts.iter().map(|p| p.method).collect();
    methods.dedup();
    for m in methods {
        let best = pts.iter().zip(&heads).filter(|(p, _)| p.method == m).max_by(|a, b| a.1.disentangle.total_cmp(&b.1.disentangle));
        if let Some((p, h)) = best {
            let _ = writeln!(md, "- {}: {:.3} ({})", m.label(), h.disentangle, p.name);
        }
    }
    write("summary.md", &md)?;
    let mut page = String::from(
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>hyperdas sweep</title><style>body{font-family:sans-serif;max-width:1240px;margin:24px auto;padding:0 16px}.maps{display:flex;flex-wrap:wrap;gap:18px}</style></head><body><h1>Sweep</h1><div class=\"maps\">",
    );
    for (_, svg) in &svgs {
        page += svg;
    }
    page += "</div><p>Scores: the domain mean over attributes (or the one attribute); HyperDAS in the mode given by --mode, baselines at the last entity token. Every run: <code>runs/</code>; all groups: <code>sweep.csv</code>; table: <code>summary.md</code>.</p></body></html>";
    write("sweep.html", &page)?;
    if plan.progress {
        eprintln!("sweep: {} runs; wrote sweep.csv, summary.md, sweep.html and {} plots in {}", runs.len(), svgs.len(), plan.out.display());
    }
    Ok(())
}

/// Every run directory under `dir` (for `hyperdas compare OUT/runs/*`-like use).
pub fn run_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).map_err(|e| Error::file(dir, format!("cannot list: {e}")))?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join("run.json").is_file()).collect();
    v.sort();
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_axes_and_points() {
        let l = Axis::parse("model.layer=1:29:2").unwrap();
        assert_eq!(l.values.len(), 15);
        let l = Axis::parse("layer=1:5:2").unwrap();
        assert_eq!((l.key.as_str(), l.values.clone()), ("interpreter.layer", vec!["1".to_string(), "3".into(), "5".into()]));
        let k = Axis::parse("k=8,16").unwrap();
        assert_eq!(k.key, "interpreter.rank");
        let m = Axis::parse("method=mdas,das").unwrap();
        let pts = points(&[m, l, k]).unwrap();
        assert_eq!(pts.len(), 12);
        assert_eq!(pts[0].name, "mdas-layer1-rank8");
        assert_eq!(pts[11].name, "das-layer5-rank16");
        for bad in ["layer", "layer=5:1", "layer=1:x", "layer=1:5:0", "method=foo", "k="] {
            assert!(Axis::parse(bad).is_err(), "{bad}");
        }
        // No method axis: HyperDAS.
        assert_eq!(points(&[Axis::parse("rank=4").unwrap()]).unwrap()[0].name, "hyperdas-rank4");
    }
}
