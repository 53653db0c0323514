//! A sweep's summary over its finished runs: `sweep.csv` (every group of every run),
//! `<metric>_vs_<axis>.svg` line plots, `summary.md` (one line per run, the best Disentangle
//! per method) and `sweep.html`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::compare::{RunSummary, read_run};
use crate::error::{Error, Result};
use crate::experiment::sweep::{Axis, Point};
use crate::experiment::trainer::GroupScores;
use crate::hypernet::interpreter::Method;

/// What to summarise: the sweep's axes and points (as `experiment::sweep::run` returns them),
/// where to write, and HyperDAS's inference modes in the CSV (the first one in the plots and
/// summary; the baselines: their fixed positions).
pub struct SweepSummary<'a> {
    pub axes: &'a [Axis],
    pub points: &'a [(Point, PathBuf)],
    pub out: &'a Path,
    pub hyperdas_modes: &'a [String],
    pub progress: bool,
}

/// Read every point's run and write the summary files. Returns the runs.
pub fn write(plan: &SweepSummary) -> Result<Vec<RunSummary>> {
    let pts: Vec<Point> = plan.points.iter().map(|(p, _)| p.clone()).collect();
    let runs: Vec<RunSummary> = plan.points.iter().map(|(_, d)| read_run(d)).collect::<Result<_>>()?;
    write_outputs(plan, &pts, &runs)?;
    Ok(runs)
}

/// A run's headline scores: the domain mean when the run has several attributes, else its
/// one group.
fn headline(r: &RunSummary, hyperdas_mode: &str) -> Result<GroupScores> {
    let mode = if r.method.is_baseline() { "groundtruth" } else { hyperdas_mode };
    let gs = r.groups.get(mode).ok_or_else(|| Error::file(&r.dir, format!("no `{mode}` scores")))?;
    let real: Vec<_> = gs.iter().filter(|g| g.attribute != "mean").collect();
    let pick = if real.len() == 1 { real[0] } else { gs.iter().find(|g| g.attribute == "mean").unwrap_or(real[0]) };
    Ok(pick.clone())
}

fn write_outputs(plan: &SweepSummary, pts: &[Point], runs: &[RunSummary]) -> Result<()> {
    let axes: Vec<(usize, &Axis)> = plan.axes.iter().enumerate().filter(|(_, a)| a.key != "method").collect();
    // CSV: every group of every run (HyperDAS in each mode asked for, a baseline at its fixed
    // positions). Axis values and attribute names can come from user files: the csv crate quotes.
    let mut header = vec!["run".to_string(), "method".into()];
    header.extend(axes.iter().map(|(_, a)| a.short().to_string()));
    header.extend(["layer_resolved", "rank_resolved", "mode", "domain", "attribute", "causal", "isolate", "disentangle", "causal_rows", "isolate_rows"].map(String::from));
    let mut w = csv::Writer::from_writer(Vec::new());
    let csv_err = |e: csv::Error| Error::invalid(format!("sweep.csv: {e}"));
    w.write_record(&header).map_err(csv_err)?;
    let baseline_mode = ["groundtruth".to_string()];
    for (p, r) in pts.iter().zip(runs) {
        let modes: &[String] = if r.method.is_baseline() { &baseline_mode } else { plan.hyperdas_modes };
        for mode in modes {
            for g in r.groups.get(mode).into_iter().flatten() {
                let mut rec = vec![p.name.clone(), p.method.name().to_string()];
                rec.extend(p.values.iter().map(|(_, v)| v.to_string()));
                rec.extend([r.info.layer.to_string(), r.info.rank.to_string(), mode.clone(), g.domain.clone(), g.attribute.clone()]);
                rec.extend([g.causal, g.isolate, g.disentangle].map(|x| x.to_string()));
                rec.extend([g.causal_rows, g.isolate_rows].map(|x| x.to_string()));
                w.write_record(&rec).map_err(csv_err)?;
            }
        }
    }
    let csv = String::from_utf8(w.into_inner().map_err(|e| Error::invalid(format!("sweep.csv: {e}")))?).map_err(|e| Error::invalid(format!("sweep.csv: {e}")))?;
    let write = |name: &str, text: &str| -> Result<()> {
        let path = plan.out.join(name);
        crate::atomic::write_text(&path, text)
    };
    write("sweep.csv", &csv)?;

    // Plots: each metric against each numeric axis, one line per method (and per value of the
    // other axes, when there are several).
    let first = plan.hyperdas_modes.first().map_or("soft", String::as_str);
    let heads: Vec<_> = runs.iter().map(|r| headline(r, first)).collect::<Result<_>>()?;
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
            let svg = super::svg::line_chart(&format!("{name} vs {}", axis.short()), &x_label, &series, Some((0.0, 1.0)));
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
    let plots: Vec<&String> = svgs.iter().map(|(_, svg)| svg).collect();
    let page = super::html::render("sweep.html", serde_json::json!({"title": "Sweep", "width": 1240, "plots": plots}))?;
    write("sweep.html", &page)?;
    if plan.progress {
        tracing::info!("sweep: {} runs; wrote sweep.csv, summary.md, sweep.html and {} plots in {}", runs.len(), svgs.len(), plan.out.display());
    }
    Ok(())
}
