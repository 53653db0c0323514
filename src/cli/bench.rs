//! `hyperdas bench`: reproducible throughput measurements (numbers in docs/benchmarks.md).

use std::time::Instant;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};

use super::ModelArgs;
use crate::model::TokenBatch;

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Tokens/s of a clean forward pass that collects every hidden state [B, T, L+1, D]
    /// (optionally followed by an intervened pass from a layer and its backward).
    Forward(ForwardArgs),
    /// Wall time of training the toy model from scratch (`hyperdas toy`), in a temporary
    /// directory (the cache is not touched); the median of --runs is reported.
    Toy(ToyBenchArgs),
}

#[derive(Args, Debug)]
pub struct ToyBenchArgs {
    /// Timed trainings (each about 2 min with the defaults on 2 cores).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The small test variant instead of the standard toy model.
    #[arg(long)]
    tiny: bool,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct ForwardArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Rows per batch.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 32)]
    seq: usize,
    /// Timed runs (the median is reported).
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// Untimed warm-up runs.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Seed for the random token ids.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also time a backward pass: gradient of the last-position logits w.r.t. the residual
    /// entering this block, through blocks `layer..L` (what intervention training does).
    #[arg(long)]
    backward_from: Option<usize>,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
}

/// xorshift64*: random token ids without another dependency.
fn token_rows(seed: u64, b: usize, t: usize, vocab: usize) -> Vec<Vec<u32>> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        s.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    (0..b).map(|_| (0..t).map(|_| (next() % vocab as u64) as u32).collect()).collect()
}

pub fn run(c: &BenchCommand) -> Result<()> {
    match c {
        BenchCommand::Forward(a) => forward(a),
        BenchCommand::Toy(a) => toy(a),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn toy(a: &ToyBenchArgs) -> Result<()> {
    if a.runs == 0 {
        bail!("--runs must be positive");
    }
    let cfg = if a.tiny { crate::toy::ToyConfig::tiny() } else { crate::toy::ToyConfig::standard() };
    let threads = candle_core::utils::get_num_threads();
    let env = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into());
    let (mut walls, mut trains) = (Vec::new(), Vec::new());
    let mut last = None;
    for run in 0..a.runs {
        let tmp = tempfile_dir()?;
        let t0 = Instant::now();
        let report = crate::toy::build_into(&cfg, &tmp.join("toy"), !a.json)?;
        let wall = t0.elapsed().as_secs_f64();
        let _ = std::fs::remove_dir_all(&tmp);
        if !a.json {
            let worst = report.accuracy.iter().map(|x| x.held_out).fold(1.0, f64::min);
            eprintln!("run {}: {wall:.1} s in all, {:.1} s training ({:.1} steps/s), lowest held-out accuracy {:.1}%", run + 1, report.train_seconds, cfg.steps as f64 / report.train_seconds, 100.0 * worst);
        }
        walls.push(wall);
        trains.push(report.train_seconds);
        last = Some(report);
    }
    let (wall, train) = (median(&mut walls), median(&mut trains));
    let meets = last.as_ref().is_some_and(|r| r.meets_targets());
    if a.json {
        println!("{}", serde_json::json!({"bench": "toy", "tiny": a.tiny, "runs": a.runs, "threads": threads, "median_wall_s": wall, "median_train_s": train, "steps": cfg.steps, "meets_targets": meets}));
    } else {
        println!("toy model ({}): median {wall:.1} s in all ({train:.1} s training, {} steps) over {} runs, {threads} threads (RAYON_NUM_THREADS={env}); targets met: {meets}", if a.tiny { "tiny" } else { "standard" }, cfg.steps, a.runs);
    }
    Ok(())
}

/// A fresh temporary directory under the system temp dir.
fn tempfile_dir() -> Result<std::path::PathBuf> {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("hyperdas-bench-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn forward(a: &ForwardArgs) -> Result<()> {
    if a.batch == 0 || a.seq == 0 || a.runs == 0 {
        bail!("--batch, --seq and --runs must be positive");
    }
    let lm = a.model.load()?;
    let rows = token_rows(a.seed, a.batch, a.seq, lm.model.config.vocab_size);
    let batch = TokenBatch::left_padded(&rows, 0, lm.model.device())?;
    let threads = candle_core::utils::get_num_threads();
    let env = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into());
    if !a.json {
        eprintln!("batch {} x {} tokens, {} warm-up + {} timed runs, {threads} threads (RAYON_NUM_THREADS={env})", a.batch, a.seq, a.warmup, a.runs);
    }
    if let Some(l) = a.backward_from
        && l >= lm.model.num_layers() {
            bail!("--backward-from {l}: the model has {} blocks", lm.model.num_layers());
        }
    let ctx = lm.model.context(&batch)?;
    let step = || -> Result<()> {
        let hs = lm.model.forward_hidden(&batch, None)?;
        if let Some(l) = a.backward_from {
            let resid = hs.stacked.as_ref().expect("all collected").narrow(2, l, 1)?.squeeze(2)?; // [B, T, D]
            let var = candle_core::Var::from_tensor(&resid)?;
            let out = lm.model.forward_from(l, var.as_tensor(), &ctx)?; // [B, T, D]
            let loss = lm.model.logits_last(&out)?.sum_all()?;
            let grads = loss.backward()?;
            anyhow::ensure!(grads.get(var.as_tensor()).is_some(), "no gradient reached the residual");
        }
        Ok(())
    };
    for _ in 0..a.warmup {
        step()?;
    }
    let mut secs = Vec::with_capacity(a.runs);
    for i in 0..a.runs {
        let t0 = Instant::now();
        step()?;
        let dt = t0.elapsed().as_secs_f64();
        if !a.json {
            eprintln!("  run {}: {:.3} s ({:.0} tokens/s)", i + 1, dt, (a.batch * a.seq) as f64 / dt);
        }
        secs.push(dt);
    }
    let mut sorted = secs.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let tokens = (a.batch * a.seq) as f64;
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "bench": "forward", "model": a.model.model, "dtype": a.model.load.dtype, "batch": a.batch, "seq": a.seq,
                "backward_from": a.backward_from,
                "runs": a.runs, "threads": threads, "median_s": median, "min_s": sorted[0], "max_s": sorted[sorted.len() - 1],
                "tokens_per_s_median": tokens / median,
            })
        );
    } else {
        let what = match a.backward_from {
            None => "forward (all hidden states)".to_string(),
            Some(l) => format!("forward (all hidden states) + forward_from({l}) + backward"),
        };
        println!(
            "{what}, {} x {}: median {:.3} s = {:.0} tokens/s (min {:.3} s, max {:.3} s; {threads} threads)",
            a.batch,
            a.seq,
            median,
            tokens / median,
            sorted[0],
            sorted[sorted.len() - 1]
        );
    }
    Ok(())
}
