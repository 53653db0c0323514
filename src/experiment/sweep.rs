//! `hyperdas sweep`: one run per point of a grid (methods × layers × ranks × any setting), run
//! one after another into `OUT/runs/<name>/`, resumable. The CSV, SVG line plots and summary
//! table over the finished runs are written by `report::sweep`.
//!
//! The runs share one clean-state cache (same model and cache settings), so the target's clean
//! passes run once per prompt for the whole sweep. Restarting a sweep skips every run with `results.json`, resumes a run that has a checkpoint
//! (same settings), and restarts one that has neither. Each point's configuration is the
//! method's preset ([`RunConfig::preset`]), then `--config`, then `--set`, then the point's
//! grid values, so a sweep point equals `hyperdas train|baseline` with those settings.
//!
//! Grid syntax: `KEY=V1,V2,...` or `KEY=START:END[:STEP]` (integers, END included). Short keys:
//! `layer` (or `model.layer`) = `interpreter.layer`, `rank` and `k` = `interpreter.rank`; `method` takes
//! `hyperdas,das,mdas`; `seed` sets both `interpreter.seed` and `train.seed` (`--seeds`);
//! `attribute` runs one model per target attribute (`data.attributes = [value]`: RAVEL's
//! per-attribute MDAS); `variant` names entries of a variants file (`--variants`), each a list
//! of `--set` assignments (an ablation table: one run per named change).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::run::RunConfig;
use crate::error::{Error, Result};
use crate::hypernet::interpreter::Method;

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
            "seed" | "seeds" => "seed".to_string(),
            "attribute" | "attributes" | "data.attributes" => "attribute".to_string(),
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

/// The assignments of one grid value: most axes set their key; `seed` sets both seeds,
/// `attribute` the data filter, `variant` the named list of assignments in `variants`.
fn assignments(axis: &Axis, value: &str, variants: &Variants) -> Result<Vec<String>> {
    Ok(match axis.key.as_str() {
        "seed" => vec![format!("interpreter.seed={value}"), format!("train.seed={value}")],
        "attribute" => vec![format!("data.attributes=[{}]", toml::Value::String(value.to_string()))],
        "variant" => variants.get(value).cloned().ok_or_else(|| {
            let names: Vec<&String> = variants.keys().collect();
            Error::invalid(format!("--grid variant={value}: no such variant (the variants file defines {names:?})"))
        })?,
        key => vec![format!("{key}={value}")],
    })
}

/// Named lists of `--set` assignments (`--variants FILE`).
pub type Variants = std::collections::BTreeMap<String, Vec<String>>;

/// Read a variants file: a TOML table of names, each a list of `KEY=VALUE` assignments, in
/// the order written (`base = []`, `head-lr-10 = ["train.head_lr_scale=10"]`). Returns the
/// names in file order and the map.
pub fn read_variants(path: &Path) -> Result<(Vec<String>, Variants)> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
    let doc: toml::Table = text.parse().map_err(|e| Error::file(path, format!("not TOML: {e}")))?;
    let mut names = Vec::new();
    let mut map = Variants::new();
    for (name, v) in doc {
        let list = v.as_array().ok_or_else(|| Error::file(path, format!("variant `{name}`: expected a list of \"KEY=VALUE\" strings")))?;
        let sets = list
            .iter()
            .map(|x| match x.as_str() {
                Some(s) if s.contains('=') => Ok(s.to_string()),
                _ => Err(Error::file(path, format!("variant `{name}`: {x} is not a \"KEY=VALUE\" string"))),
            })
            .collect::<Result<Vec<_>>>()?;
        names.push(name.clone());
        map.insert(name, sets);
    }
    if names.is_empty() {
        return Err(Error::file(path, "defines no variants"));
    }
    Ok((names, map))
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
    /// What the `variant` axis's names stand for.
    pub variants: &'a Variants,
    pub sets: &'a [String],
    pub axes: &'a [Axis],
    pub out: &'a Path,
    pub progress: bool,
}

/// The configuration of one point.
pub fn point_config(plan: &SweepPlan, p: &Point) -> Result<RunConfig> {
    let mut sets = plan.sets.to_vec();
    for (i, v) in &p.values {
        sets.extend(assignments(&plan.axes[*i], v, plan.variants)?);
    }
    sets.push(format!("interpreter.method={}", p.method.name()));
    crate::config::load_over(&RunConfig::preset(p.method), plan.config, &sets)
}

/// Run every point not finished yet (resuming or skipping what an earlier call did). Returns
/// the points, in order, each with its run directory (`OUT/runs/<name>`); the summary
/// (`sweep.csv`, plots, `summary.md`) is [`crate::report::sweep`]'s.
pub fn run(plan: &SweepPlan) -> Result<Vec<(Point, PathBuf)>> {
    let pts = points(plan.axes)?;
    // Every configuration resolves before anything runs: a typo fails now, not after hours.
    let cfgs: Vec<RunConfig> = pts.iter().map(|p| point_config(plan, p)).collect::<Result<_>>()?;
    let runs_dir = plan.out.join("runs");
    std::fs::create_dir_all(&runs_dir).map_err(|e| Error::file(&runs_dir, format!("cannot create: {e}")))?;
    let t0 = std::time::Instant::now();
    // One state cache for the whole sweep: runs on the same model reuse each other's clean
    // states (every layer is cached, so any method and layer can read them).
    let mut shared: super::run::SharedCache = None;
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
            tracing::info!("sweep run {}/{}: {} ({what}; {:.0} s so far)", i + 1, pts.len(), p.name, t0.elapsed().as_secs_f64());
        }
        if status == "done" {
            continue;
        }
        if super::run::run_sharing(cfg, &dir, status == "resume", plan.progress, &mut shared)?.is_none() {
            return Err(Error::invalid(format!("{}: stopped early (train.stop_after_steps); rerun the sweep to continue", p.name)));
        }
    }
    Ok(pts
        .into_iter()
        .map(|p| {
            let dir = runs_dir.join(&p.name);
            (p, dir)
        })
        .collect())
}

/// Every run directory under `dir` (for `hyperdas compare OUT/runs/*`-like use).
pub fn run_dirs(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(dir).map_err(|e| Error::file(dir, format!("cannot list: {e}")))?.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.join("run.json").is_file()).collect();
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
