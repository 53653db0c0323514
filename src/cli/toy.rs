//! `hyperdas toy`: train (or reuse) the toy world's model and print its accuracy.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use crate::toy::{self, TARGET_HELD_OUT, TARGET_TRAIN, ToyConfig};

#[derive(Args, Debug)]
pub struct ToyArgs {
    /// Also copy the model directory here (it is always kept in the cache).
    #[arg(long, short)]
    out: Option<PathBuf>,
    #[arg(long, help = default_help("Seed of the world's facts and of the model's training", |c| c.seed.to_string()))]
    seed: Option<u64>,
    #[arg(long, help = default_help("Cities in the world", |c| c.cities.to_string()))]
    cities: Option<usize>,
    #[arg(long, help = default_help("Training steps", |c| c.steps.to_string()))]
    steps: Option<usize>,
    /// The small test variant (24 cities, one block; seconds to train).
    #[arg(long)]
    tiny: bool,
    /// TOML settings over the defaults (keys as `--show-config` prints them).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override any setting by its key in `--show-config`: `--set lr=0.003 --set hidden_size=96`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Print the resolved settings as TOML (the defaults, --config, the flags, --set) and exit.
    #[arg(long)]
    show_config: bool,
    /// Retrain even if the cache has this model.
    #[arg(long)]
    force: bool,
}

/// `what [default: x; y with --tiny]`, the defaults read from [`ToyConfig`] itself.
fn default_help(what: &str, field: fn(&ToyConfig) -> String) -> String {
    format!("{what} [default: {}; {} with --tiny]", field(&ToyConfig::standard()), field(&ToyConfig::tiny()))
}

pub fn run(a: &ToyArgs) -> Result<()> {
    let base = if a.tiny { ToyConfig::tiny() } else { ToyConfig::standard() };
    let mut cfg = crate::config::load_over(&base, a.config.as_deref(), &[])?;
    if let Some(s) = a.seed {
        cfg.seed = s;
    }
    if let Some(c) = a.cities {
        cfg.cities = c;
    }
    if let Some(s) = a.steps {
        if s == 0 {
            bail!("--steps must be at least 1");
        }
        cfg.steps = s;
    }
    cfg = crate::config::load_over(&cfg, None, &a.set)?;
    if a.show_config {
        print!("{}", toml::to_string_pretty(&cfg)?);
        println!("# cache: {}", toy::cache_path(&cfg)?.display());
        return Ok(());
    }
    let t0 = std::time::Instant::now();
    let m = toy::ensure(&cfg, a.force, super::progress())?;
    let r = &m.report;
    if super::json() {
        return super::print_json(&serde_json::json!({"dir": a.out.as_ref().unwrap_or(&m.dir), "cache": m.dir, "cached": m.cached, "report": r}));
    }
    if m.cached {
        println!("toy model (cached, {:.2} s): {}", t0.elapsed().as_secs_f64(), m.dir.display());
    } else {
        println!("toy model trained in {:.1} s ({} steps, {} threads): {}", r.train_seconds, r.config.steps, r.threads, m.dir.display());
    }
    println!(
        "  {} cities, vocab {}, {:.2}M parameters ({} blocks, d={}, {} heads, ff {}), {} training / {} held-out prompts",
        r.cities,
        r.vocab_size,
        r.parameters as f64 / 1e6,
        r.config.layers,
        r.config.hidden_size,
        r.config.heads,
        r.config.intermediate_size,
        r.train_examples,
        r.held_out_examples
    );
    println!("  first-token accuracy   training templates   held-out templates");
    for acc in &r.accuracy {
        let flag = if acc.train >= TARGET_TRAIN && acc.held_out >= TARGET_HELD_OUT { "" } else { "  (below target)" };
        println!("  {:<20} {:>12.1}%  {:>18.1}%{flag}", acc.attribute, 100.0 * acc.train, 100.0 * acc.held_out);
    }
    if !r.meets_targets() {
        tracing::warn!("below the targets ({:.0}% on training templates, {:.0}% held out) for some attribute", 100.0 * TARGET_TRAIN, 100.0 * TARGET_HELD_OUT);
        // The usual culprit: a held-out template with a word the model never saw.
        let weak: Vec<String> = r.templates.iter().filter(|t| !t.train && t.accuracy < TARGET_HELD_OUT).map(|t| format!("{:?} {:.0}%", t.template, 100.0 * t.accuracy)).collect();
        tracing::info!("  weakest held-out templates: {}", weak.join(", "));
    }
    if !r.planted.is_empty() {
        println!("  {} (residual entering the block, at the city's token; bases in {}/planted_basis.safetensors)", crate::toy::planted_summary(&r.planted), m.dir.display());
        for p in &r.planted {
            println!("  swap of the {} subspace on {} held-out pairs: cause {:.1}%, isolate {:.1}%", p.attribute, p.pairs, 100.0 * p.cause, 100.0 * p.isolate);
        }
    }
    if let Some(out) = &a.out {
        std::fs::create_dir_all(out)?;
        for entry in walk(&m.dir)? {
            let rel = entry.strip_prefix(&m.dir)?;
            let dest = out.join(rel);
            if let Some(p) = dest.parent() {
                std::fs::create_dir_all(p)?;
            }
            std::fs::copy(&entry, &dest)?;
        }
        println!("copied to {}", out.display());
    }
    println!("use it: --model {}", a.out.as_ref().unwrap_or(&m.dir).display());
    Ok(())
}

fn walk(dir: &std::path::Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() { out.extend(walk(&p)?) } else { out.push(p) }
    }
    Ok(out)
}
