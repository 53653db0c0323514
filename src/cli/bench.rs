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
    /// HyperDAS training steps (forward, backward, AdamW) on RAVEL city rows: examples/s,
    /// time per phase, GFLOP/s against the machine's matmul speed, peak memory.
    Train(TrainBenchArgs),
    /// HyperDAS evaluation (no backward, larger batches) on RAVEL city rows: examples/s
    /// without and with the state cache, per inference mode.
    Eval(EvalBenchArgs),
    /// Plain f32 matmul GFLOP/s for the shapes of a training step (the hardware limit the
    /// other benchmarks are compared with).
    Matmul(MatmulArgs),
}

/// The benchmarked interpreter (the reference shapes by default).
#[derive(Args, Debug)]
pub struct InterpreterArgs {
    /// Intervention layer (the residual entering this block).
    #[arg(long, default_value_t = 15)]
    layer: usize,
    /// Hypernetwork blocks.
    #[arg(long, default_value_t = 2)]
    blocks: usize,
    /// Subspace rank.
    #[arg(long, default_value_t = 32)]
    rank: usize,
    /// Subspace module (reflect_select, das, mask_select, boundless, none).
    #[arg(long, default_value = "reflect_select")]
    subspace: String,
    /// Householder reflections per instruction (reflect_select; 1 = the paper's module).
    #[arg(long, default_value_t = 1)]
    reflections: usize,
    /// The subspace module's initialisation: ours, or reference (the authors' 14336-wide MLP).
    #[arg(long, value_enum, default_value_t = InitArg::Ours)]
    init: InitArg,
    /// The rotation's parametrisation: retraction (ours) or householder (the authors').
    #[arg(long, value_enum, default_value_t = RotationArg::Retraction)]
    rotation: RotationArg,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum InitArg {
    Ours,
    Reference,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum RotationArg {
    Retraction,
    Householder,
}

impl InterpreterArgs {
    fn config(&self, seed: u64) -> Result<crate::hypernet::interpreter::InterpreterConfig> {
        use crate::hypernet::HyperConfig;
        Ok(crate::hypernet::interpreter::InterpreterConfig {
            hypernet: HyperConfig { num_blocks: self.blocks, layer: self.layer, from_scratch: false, ablate_source: false, ablate_base: false, seed, ..Default::default() },
            subspace: crate::hypernet::subspace::SubspaceKind::parse(&self.subspace)?,
            rank: self.rank,
            reflections: self.reflections,
            method: crate::hypernet::interpreter::Method::HyperDas,
            init: match self.init {
                InitArg::Ours => crate::hypernet::subspace::SubspaceInit::Ours,
                InitArg::Reference => crate::hypernet::subspace::SubspaceInit::Reference,
            },
            rotation: match self.rotation {
                RotationArg::Retraction => crate::hypernet::subspace::RotationParam::Retraction,
                RotationArg::Householder => crate::hypernet::subspace::RotationParam::Householder,
            },
        })
    }
}

#[derive(Args, Debug)]
pub struct TrainBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Rows per batch.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[command(flatten)]
    interp: InterpreterArgs,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Use only rows whose base and source have at most this many tokens (the reference's
    /// benchmark had prompts of about 28–30 tokens).
    #[arg(long, default_value_t = 30)]
    max_tokens: usize,
    /// Time these rows instead of generated ones: a .jsonl file or save_to_disk directory, taken
    /// in file order (consecutive batches, as the authors' timing harness takes them; --max-tokens
    /// does not apply).
    #[arg(long)]
    data: Option<std::path::PathBuf>,
    /// Seed for the generated rows and the interpreter.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// No state cache: one pass, every clean pass computed (the peak-memory figure without caching).
    #[arg(long)]
    no_cache: bool,
    /// The state cache's budget in GB.
    #[arg(long, default_value_t = 2.0)]
    cache_gb: f64,
    /// Print the memory a step of these batches needs (weights, trainable state, activations
    /// kept for backward, state cache) from the configuration alone, and exit: no weights are
    /// read, so it works for `synthetic:llama3-8b` on any machine.
    #[arg(long)]
    dry_run: bool,
    /// With --dry-run: estimate a batch padded to these lengths, `base,source,instruction`,
    /// instead of the generated rows' (a synthetic model's byte-level tokenizer makes RAVEL
    /// prompts about 100 tokens long; Llama 3's tokenizer about 25, e.g. `--lengths 30,30,12`).
    #[arg(long, value_delimiter = ',', num_args = 1, requires = "dry_run")]
    lengths: Option<Vec<usize>>,
}

#[derive(Args, Debug)]
pub struct EvalBenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Rows per evaluation batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Rows evaluated per pass.
    #[arg(long, default_value_t = 256)]
    rows: usize,
    /// Inference modes, comma-separated (a wrong name lists the valid ones).
    #[arg(long, default_value = "soft,bidding_argmax", value_delimiter = ',', value_parser = |s: &str| crate::intervention::selection::InferenceMode::parse(s.trim()))]
    modes: Vec<crate::intervention::selection::InferenceMode>,
    #[command(flatten)]
    interp: InterpreterArgs,
    /// Use only rows whose base and source have at most this many tokens.
    #[arg(long, default_value_t = 30)]
    max_tokens: usize,
    /// Time these rows instead of generated ones: a .jsonl file or save_to_disk directory, taken
    /// in file order (consecutive batches, as the authors' timing harness takes them; --max-tokens
    /// does not apply).
    #[arg(long)]
    data: Option<std::path::PathBuf>,
    /// Seed for the generated rows and the interpreter.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The state cache's budget in GB (0: no cached pass).
    #[arg(long, default_value_t = 2.0)]
    cache_gb: f64,
}

#[derive(Args, Debug)]
pub struct MatmulArgs {
    /// Timed runs per shape (the median is reported).
    #[arg(long, default_value_t = 20)]
    runs: usize,
}

#[derive(Args, Debug)]
pub struct ToyBenchArgs {
    /// Timed trainings (each about 2 min with the defaults on 2 cores).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The small test variant instead of the standard toy model.
    #[arg(long)]
    tiny: bool,
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
    if !super::json() {
        // Figures depend on the CPU far more than on anything else (docs/benchmarks.md).
        tracing::info!("machine: {}", crate::profile::machine_description());
    }
    match c {
        BenchCommand::Forward(a) => forward(a),
        BenchCommand::Toy(a) => toy(a),
        BenchCommand::Train(a) => train(a),
        BenchCommand::Eval(a) => eval(a),
        BenchCommand::Matmul(a) => matmul(a),
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
    let env = crate::threads::user_setting();
    let (mut walls, mut trains) = (Vec::new(), Vec::new());
    let mut last = None;
    for run in 0..a.runs {
        let tmp = tempfile_dir()?;
        let t0 = Instant::now();
        let report = crate::toy::build_into(&cfg, &tmp.join("toy"), !super::json())?;
        let wall = t0.elapsed().as_secs_f64();
        let _ = std::fs::remove_dir_all(&tmp);
        if !super::json() {
            let worst = report.accuracy.iter().map(|x| x.held_out).fold(1.0, f64::min);
            tracing::info!(
                "run {}: {wall:.1} s in all, {:.1} s training ({:.1} steps/s), lowest held-out accuracy {:.1}%",
                run + 1,
                report.train_seconds,
                cfg.steps as f64 / report.train_seconds,
                100.0 * worst
            );
        }
        walls.push(wall);
        trains.push(report.train_seconds);
        last = Some(report);
    }
    let (wall, train) = (median(&mut walls), median(&mut trains));
    let meets = last.as_ref().is_some_and(|r| r.meets_targets());
    if super::json() {
        println!(
            "{}",
            serde_json::json!({"bench": "toy", "tiny": a.tiny, "runs": a.runs, "threads": threads, "machine": crate::profile::machine_description(), "median_wall_s": wall, "median_train_s": train, "steps": cfg.steps, "meets_targets": meets})
        );
    } else {
        println!(
            "toy model ({}): median {wall:.1} s in all ({train:.1} s training, {} steps) over {} runs, {threads} threads (RAYON_NUM_THREADS={env}); targets met: {meets}",
            if a.tiny { "tiny" } else { "standard" },
            cfg.steps,
            a.runs
        );
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
    let env = crate::threads::user_setting();
    if !super::json() {
        tracing::info!("batch {} x {} tokens, {} warm-up + {} timed runs, {threads} threads (RAYON_NUM_THREADS={env})", a.batch, a.seq, a.warmup, a.runs);
    }
    if let Some(l) = a.backward_from
        && l >= lm.model.num_layers()
    {
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
        if !super::json() {
            tracing::info!("  run {}: {:.3} s ({:.0} tokens/s)", i + 1, dt, (a.batch * a.seq) as f64 / dt);
        }
        secs.push(dt);
    }
    let mut sorted = secs.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted[sorted.len() / 2];
    let tokens = (a.batch * a.seq) as f64;
    if super::json() {
        println!(
            "{}",
            serde_json::json!({
                "bench": "forward", "model": a.model.model, "dtype": a.model.load.dtype, "batch": a.batch, "seq": a.seq,
                "backward_from": a.backward_from,
                "runs": a.runs, "threads": threads, "machine": crate::profile::machine_description(), "median_s": median, "min_s": sorted[0], "max_s": sorted[sorted.len() - 1],
                "tokens_per_s_median": tokens / median,
            })
        );
    } else {
        let what = match a.backward_from {
            None => "forward (all hidden states)".to_string(),
            Some(l) => format!("forward (all hidden states) + forward_from({l}) + backward"),
        };
        println!("{what}, {} x {}: median {:.3} s = {:.0} tokens/s (min {:.3} s, max {:.3} s; {threads} threads)", a.batch, a.seq, median, tokens / median, sorted[0], sorted[sorted.len() - 1]);
    }
    Ok(())
}

/// GFLOP/s of `[m, k] × [k, n]` f32 matmuls on the CPU: (median run, fastest run). On a
/// shared 2-vCPU machine the median moves with the neighbours' load; the fastest run is the
/// steadier estimate of what the hardware can do, so the training benchmark compares with it.
fn matmul_gflops(m: usize, k: usize, n: usize, runs: usize) -> Result<(f64, f64)> {
    let dev = candle_core::Device::Cpu;
    let a = candle_core::Tensor::randn(0f32, 1.0, (m, k), &dev)?;
    let b = candle_core::Tensor::randn(0f32, 1.0, (k, n), &dev)?;
    a.matmul(&b)?;
    let mut v = Vec::with_capacity(runs.max(1));
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        a.matmul(&b)?;
        v.push(t0.elapsed().as_secs_f64());
    }
    let best = v.iter().copied().fold(f64::INFINITY, f64::min);
    let flop = 2.0 * (m * k * n) as f64;
    Ok((flop / median(&mut v) / 1e9, flop / best / 1e9))
}

/// SmolLM2-135M's training-step shapes (batch 16 × ~29 tokens, d = 576, F = 1536).
const MATMUL_SHAPES: [(usize, usize, usize, &str); 4] =
    [(464, 576, 1536, "MLP up / gate"), (464, 1536, 576, "MLP down"), (464, 576, 576, "attention q / o"), (14_384, 576, 192, "hypernetwork key / value (16 × 29 tokens × 31 states)")];

/// GFLOP/s of `x [m, k] · Wᵀ` through the bf16 kernel (the frozen clean passes' matmul),
/// weight packed once beforehand as in a run: (median, fastest, largest relative error against
/// the f32 product); `None` when the CPU lacks AVX-512 BF16.
fn matmul_bf16_gflops(m: usize, k: usize, n: usize, runs: usize) -> Result<Option<(f64, f64, f64)>> {
    use crate::model::kernels::{PackedBf16, matmul_t_bf16};
    let dev = candle_core::Device::Cpu;
    let x = candle_core::Tensor::randn(0f32, 1.0, (m, k), &dev)?; // [m, k]
    let w = candle_core::Tensor::randn(0f32, 1.0, (n, k), &dev)?; // [n, k]
    let exact = x.matmul(&w.t()?)?.flatten_all()?.to_vec1::<f32>()?; // [m · n]
    let (xs, ws) = (x.flatten_all()?.to_vec1::<f32>()?, w.flatten_all()?.to_vec1::<f32>()?);
    let packed = PackedBf16::pack(&ws, n, k);
    let Some(y) = matmul_t_bf16(&xs, m, &packed) else { return Ok(None) };
    let scale = exact.iter().map(|v| v.abs()).fold(0f32, f32::max).max(1e-30);
    let err = y.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max) / scale;
    let mut v = Vec::with_capacity(runs.max(1));
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        std::hint::black_box(matmul_t_bf16(&xs, m, &packed));
        v.push(t0.elapsed().as_secs_f64());
    }
    let best = v.iter().copied().fold(f64::INFINITY, f64::min);
    let flop = 2.0 * (m * k * n) as f64;
    Ok(Some((flop / median(&mut v) / 1e9, flop / best / 1e9, err as f64)))
}

fn matmul(a: &MatmulArgs) -> Result<()> {
    let threads = candle_core::utils::get_num_threads();
    let mut rows = Vec::new();
    for (m, k, n, what) in MATMUL_SHAPES {
        let (g, best) = matmul_gflops(m, k, n, a.runs)?;
        let bf16 = matmul_bf16_gflops(m, k, n, a.runs)?;
        if !super::json() {
            let b = match bf16 {
                Some((g, best, err)) => format!("; bf16 kernel {g:6.1} median, {best:6.1} fastest (max error {err:.1e} of the largest value)"),
                None => String::new(),
            };
            println!("{m:>6} x {k:>4} x {n:>4}  f32 {g:6.1} GFLOP/s median, {best:6.1} fastest run{b}  ({what})");
        }
        let (bg, bb, be) = match bf16 {
            Some((g, b, e)) => (Some(g), Some(b), Some(e)),
            None => (None, None, None),
        };
        rows.push(serde_json::json!({"m": m, "k": k, "n": n, "gflops": g, "best_gflops": best, "bf16_gflops": bg, "bf16_best_gflops": bb, "bf16_max_rel_error": be, "what": what}));
    }
    if super::json() {
        println!("{}", serde_json::json!({"bench": "matmul", "threads": threads, "machine": crate::profile::machine_description(), "shapes": rows}));
    } else {
        let note =
            if crate::model::kernels::bf16_matmul_available() { "; bf16: the frozen passes' AVX-512 BF16 kernel, weight packed once" } else { "; no AVX-512 BF16 on this CPU, so no bf16 column" };
        println!("matmul y = x Wᵀ, median of {} runs, {threads} threads (RAYON_NUM_THREADS={}){note}", a.runs, crate::threads::user_setting());
    }
    Ok(())
}

/// The timed steps of one pass over the benchmark's batches.
#[derive(Default)]
struct PassTimes {
    secs: Vec<f64>,
    gflops: Vec<f64>,
    flops: Vec<f64>,
    /// Per phase: seconds of each step, and the most heap live during it in any step.
    phases: Vec<(&'static str, Vec<f64>, usize)>,
    shapes: Vec<crate::experiment::flops::StepShapes>,
    hit_rate: Option<f64>,
}

impl PassTimes {
    fn summary(&mut self, batch: usize, peak: f64) -> serde_json::Value {
        let med = median(&mut self.secs.clone());
        let (min, max) = (self.secs.iter().copied().fold(f64::INFINITY, f64::min), self.secs.iter().copied().fold(0.0, f64::max));
        let n = self.shapes.len().max(1) as f64;
        let mean = |f: &dyn Fn(&crate::experiment::flops::StepShapes) -> usize| self.shapes.iter().map(f).sum::<usize>() as f64 / n;
        serde_json::json!({
            "median_s": med, "min_s": min, "max_s": max, "examples_per_s": batch as f64 / med,
            "gflop_per_step": median(&mut self.flops.clone()) / 1e9, "gflops": median(&mut self.gflops.clone()),
            "matmul_share": median(&mut self.gflops.clone()) / peak,
            "mean_base_len": mean(&|s| s.base_len), "mean_source_len": mean(&|s| s.source_len),
            "state_cache_hit_rate": self.hit_rate,
            "peak_heap_bytes": self.phases.iter().map(|p| p.2).max(),
            "phases": self.phases.iter_mut().map(|(p, v, heap)| serde_json::json!({"phase": p, "median_s": median(v), "peak_heap_bytes": heap})).collect::<Vec<_>>(),
        })
    }
}

/// `need` encoded RAVEL city Country counterfactuals from the embedded knowledge base
/// (unfiltered: throughput does not depend on whether the model knows the answer) whose base
/// and source have at most `max_tokens` tokens, in a seeded order.
fn bench_rows(
    tokenizer: &crate::model::tokenizer::TextTokenizer,
    data: Option<&std::path::Path>,
    need: usize,
    max_tokens: usize,
    seed: u64,
    fewer: &str,
) -> Result<Vec<crate::data::collate::EncodedRow>> {
    use crate::data::collate::{CollateOptions, encode_rows};
    if let Some(path) = data {
        let ds = crate::data::io::read_dataset(path, crate::data::io::ReadOptions::default())?;
        let mut rows = encode_rows(tokenizer, &ds.rows, &CollateOptions::default(), &path.display().to_string())?.rows;
        if rows.len() < need {
            bail!("{} has {} rows; need {need} (lower {fewer})", path.display(), rows.len());
        }
        rows.truncate(need);
        return Ok(rows);
    }
    use crate::data::generate::{DataSplit, EntityPolicy, GenerateOptions, generate};
    use crate::data::ravel::KnowledgeBase;
    let kb = KnowledgeBase::builtin("city")?;
    let g = generate(&kb, &GenerateOptions { targets: vec![kb.attribute("Country")?], split: DataSplit::Train, causal: need * 2, isolate: need / 2, seed, entities: EntityPolicy::All })?;
    let enc = encode_rows(tokenizer, &g.rows, &CollateOptions { skip_unusable: true, ..Default::default() }, "generated rows")?;
    let mut rows: Vec<_> = enc.rows.into_iter().filter(|r| r.base_ids.len() <= max_tokens && r.source_ids.len() <= max_tokens).collect();
    let mut shuffle = crate::rng::Rng::derive(seed, "bench/rows");
    shuffle.shuffle(&mut rows);
    if rows.len() < need {
        bail!("only {} generated rows have at most {max_tokens} tokens; need {need} (raise --max-tokens or lower {fewer})", rows.len());
    }
    rows.truncate(need);
    Ok(rows)
}

fn eval(a: &EvalBenchArgs) -> Result<()> {
    use crate::experiment::trainer::{TrainSettings, evaluate};
    use crate::hypernet::interpreter::Interpreter;
    use crate::intervention::selection::InferenceMode;
    use crate::model::cache::StateCache;
    use crate::params::ParamStore;

    if a.batch == 0 || a.rows == 0 {
        bail!("--batch and --rows must be positive");
    }
    let modes: Vec<InferenceMode> = a.modes.clone();
    let lm = a.model.load()?;
    let target = &lm.model;
    let threads = candle_core::utils::get_num_threads();
    let rows = bench_rows(&lm.tokenizer, a.data.as_deref(), a.rows, a.max_tokens, a.seed, "--rows")?;
    let icfg = a.interp.config(a.seed)?;
    let mut ps = ParamStore::new();
    let interp = Interpreter::new(&mut ps, target, &icfg)?;
    let label_limit = TrainSettings::default().label_limit;
    let pad = lm.tokenizer.padding_id();
    if !super::json() {
        tracing::info!(
            "HyperDAS evaluation: {} rows in batches of {}, layer {}, {} blocks, {} rank {}, {threads} threads (RAYON_NUM_THREADS={}); untrained interpreter (throughput does not depend on the weights)",
            rows.len(),
            a.batch,
            a.interp.layer,
            a.interp.blocks,
            a.interp.subspace,
            a.interp.rank,
            crate::threads::user_setting()
        );
    }
    // Warm-up: one batch, so allocator and thread pool are in their steady state.
    evaluate(target, &interp, &rows[..a.batch.min(rows.len())], modes[0], a.batch, label_limit, pad)?;
    let mut out = Vec::new();
    let mut passes = vec![("uncached", false)];
    if a.cache_gb > 0.0 {
        passes.push(("cached", true));
    }
    for (name, cached) in passes {
        if cached {
            interp.set_cache(Some(StateCache::new((a.cache_gb * 1e9) as usize, candle_core::DType::F32)?));
            interp.register_prompts(&rows);
            // Fill the cache once (this pass's own cost is the uncached one above).
            evaluate(target, &interp, &rows, modes[0], a.batch, label_limit, pad)?;
        }
        for &mode in &modes {
            let t0 = Instant::now();
            evaluate(target, &interp, &rows, mode, a.batch, label_limit, pad)?;
            let dt = t0.elapsed().as_secs_f64();
            let x = rows.len() as f64 / dt;
            if !super::json() {
                println!("{name:<9} {:<15} {dt:6.2} s for {} rows = {x:6.2} examples/s", mode.name(), rows.len());
            }
            out.push(serde_json::json!({"pass": name, "mode": mode.name(), "seconds": dt, "examples_per_s": x}));
        }
    }
    let rss = crate::profile::peak_rss_bytes();
    if super::json() {
        println!(
            "{}",
            serde_json::json!({"bench": "eval", "model": a.model.model, "batch": a.batch, "rows": rows.len(), "layer": a.interp.layer, "blocks": a.interp.blocks, "threads": threads, "machine": crate::profile::machine_description(), "results": out, "peak_rss_bytes": rss})
        );
    } else {
        println!("peak RSS {}", rss.map(|b| format!("{:.2} GB", b as f64 / 1e9)).unwrap_or_else(|| "unknown".into()));
    }
    Ok(())
}

fn train(a: &TrainBenchArgs) -> Result<()> {
    use crate::data::collate::collate;
    use crate::experiment::trainer::{TrainSettings, Trainer};
    use crate::hypernet::interpreter::Interpreter;
    use crate::model::cache::StateCache;
    use crate::params::ParamStore;

    if a.batch == 0 || a.steps == 0 {
        bail!("--batch and --steps must be positive");
    }
    if a.dry_run {
        return train_dry_run(a);
    }
    let mut lm = a.model.load()?;
    let threads = candle_core::utils::get_num_threads();
    let need = a.batch * (a.steps + a.warmup);
    let rows = bench_rows(&lm.tokenizer, a.data.as_deref(), need, a.max_tokens, a.seed, "--steps")?;
    let icfg = a.interp.config(a.seed)?;
    let subspace = icfg.subspace;
    let mut ps = ParamStore::new();
    let mut interp = Interpreter::new(&mut ps, &lm.model, &icfg)?;
    // As a training run does: blocks below the layer keep only their bf16 packing.
    let freed = lm.model.release_f32_below(icfg.hypernet.layer)?;
    let target = &lm.model;

    let settings = TrainSettings { batch_size: a.batch, ..Default::default() };
    let per_pass = a.steps + a.warmup;
    // Pass 0: no cache (every clean pass computed). Pass 1: a first epoch with an empty cache
    // (canonical groups are computed as their first prompt is needed). Pass 2: the same batches
    // again, every clean state cached (steady state).
    let passes = if a.no_cache { 1 } else { 3 };
    let total = per_pass * passes;
    let pad = lm.tokenizer.padding_id();
    if !super::json() {
        tracing::info!(
            "HyperDAS training step: batch {}, layer {}, {} blocks, {} rank {}, {} warm-up + {} timed steps per pass, {threads} threads (RAYON_NUM_THREADS={}); clean passes in {}; {}",
            a.batch,
            a.interp.layer,
            a.interp.blocks,
            a.interp.subspace,
            a.interp.rank,
            a.warmup,
            a.steps,
            crate::threads::user_setting(),
            match (target.clean_bf16(), target.intervened_bf16()) {
                (true, false) => format!("bf16 (f32 weights of blocks 0..{} freed: {:.0} MB)", icfg.hypernet.layer, freed as f64 / 1e6),
                (true, true) => format!("bf16, intervened pass in bf16 too (f32 weights of every block freed: {:.0} MB)", freed as f64 / 1e6),
                (false, true) => "the model dtype, intervened pass in bf16".to_string(),
                (false, false) => "the model dtype".to_string(),
            },
            if a.no_cache {
                "no state cache".to_string()
            } else {
                format!("pass 1 without a state cache, pass 2 = a first epoch with an empty {} GB cache, pass 3 = the same batches again (steady state)", a.cache_gb)
            }
        );
    }
    let conditioned_out = subspace.conditioning_width(target.config.hidden_size, a.interp.rank, a.interp.reflections);
    let batches: Vec<_> = rows.chunks(a.batch).take(per_pass).map(|chunk| collate(&chunk.iter().collect::<Vec<_>>(), pad)).collect();
    let mut results: Vec<PassTimes> = Vec::new();
    let mut epoch_seconds = None;
    let mut tr = Trainer::new(target, &mut interp, &ps, &settings, total)?;
    for pass in 0..passes {
        if pass == 1 {
            tr.interp.set_cache(Some(StateCache::new((a.cache_gb * 1e9) as usize, candle_core::DType::F32)?));
            tr.interp.register_prompts(&rows[..need]);
        }
        let mut times = PassTimes::default();
        let before = tr.interp.cache_stats();
        let pass_start = Instant::now();
        for (i, batch) in batches.iter().enumerate() {
            let rec = crate::profile::Recording::start();
            let t0 = Instant::now();
            let o = tr.step(batch)?;
            let dt = t0.elapsed().as_secs_f64();
            let ph = rec.finish();
            let sh = crate::experiment::flops::StepShapes::of(batch, settings.label_limit);
            let mut f = crate::experiment::flops::hyperdas_step(&target.config, a.interp.layer, a.interp.blocks, a.interp.rank, conditioned_out, &sh);
            if pass >= 1 {
                // Cached passes: clean states come from the cache (pass 3) or are computed in
                // whole canonical groups at a miss (pass 2, counted in the epoch's average), so
                // a step's own work excludes them.
                f.clean = 0.0;
            }
            if i < a.warmup {
                continue;
            }
            if !super::json() {
                let parts: Vec<String> = ph.iter().map(|p| format!("{} {:.2}", p.name, p.seconds)).collect();
                tracing::info!(
                    "  pass {} step {}: {dt:.2} s = {:.1} examples/s, {:.0} GFLOP/s (T_b {}, T_s {}; loss {:.3}) [{}]",
                    pass + 1,
                    i - a.warmup + 1,
                    a.batch as f64 / dt,
                    f.total() / dt / 1e9,
                    sh.base_len,
                    sh.source_len,
                    o.loss,
                    parts.join(", ")
                );
            }
            times.secs.push(dt);
            times.gflops.push(f.total() / dt / 1e9);
            times.flops.push(f.total());
            for p in ph {
                match times.phases.iter_mut().find(|(m, _, _)| *m == p.name) {
                    Some((_, v, heap)) => {
                        v.push(p.seconds);
                        *heap = (*heap).max(p.peak_heap);
                    }
                    None => times.phases.push((p.name, vec![p.seconds], p.peak_heap)),
                }
            }
            times.shapes.push(sh);
        }
        if let (Some(b), Some(c)) = (before, tr.interp.cache_stats()) {
            let (h, m) = (c.hits - b.hits, c.misses - b.misses);
            times.hit_rate = Some(if h + m == 0 { 0.0 } else { h as f64 / (h + m) as f64 });
        }
        if pass == 1 {
            epoch_seconds = Some(pass_start.elapsed().as_secs_f64());
        }
        results.push(times);
    }
    let d = target.config.hidden_size;
    // The hardware limit: the fastest of 50 MLP-shaped matmuls (see matmul_gflops).
    let (_, peak) = matmul_gflops(a.batch * a.max_tokens.min(30), d, target.config.intermediate_size, 50)?;
    let rss = crate::profile::peak_rss_bytes();
    let names = if a.no_cache { vec!["uncached"] } else { vec!["uncached", "first epoch (empty cache)", "steady state (cached)"] };
    let first_epoch = epoch_seconds.map(|s| (a.batch * per_pass) as f64 / s);
    let summaries: Vec<serde_json::Value> = results.iter_mut().map(|r| r.summary(a.batch, peak)).collect();
    if super::json() {
        let passes: Vec<serde_json::Value> = names.iter().zip(&summaries).enumerate().filter(|(i, _)| *i != 1).map(|(_, (n, s))| serde_json::json!({"pass": n, "result": s})).collect();
        println!(
            "{}",
            serde_json::json!({
                "bench": "train", "model": a.model.model, "dtype": a.model.load.dtype, "batch": a.batch, "layer": a.interp.layer, "blocks": a.interp.blocks,
                "subspace": a.interp.subspace, "rank": a.interp.rank, "steps": a.steps, "threads": threads, "machine": crate::profile::machine_description(), "fused": crate::model::kernels::fused_enabled(),
                "matmul_gflops": peak, "peak_rss_bytes": rss, "passes": passes,
                "first_epoch_examples_per_s": first_epoch, "first_epoch_steps": per_pass,
            })
        );
    } else {
        for (i, (n, s)) in names.iter().zip(&summaries).enumerate() {
            if i == 1 {
                // Its steps differ (the first ones compute the canonical groups): only the average means anything.
                continue;
            }
            let g = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
            println!(
                "{n}: median {:.2} s per step of {} = {:.2} examples/s (min {:.2} s, max {:.2} s; T_b {:.1}, T_s {:.1}); {:.0} GFLOP per step at {:.0} GFLOP/s = {:.0}% of the {peak:.0} GFLOP/s matmul (fastest of 50){}",
                g("median_s"),
                a.batch,
                g("examples_per_s"),
                g("min_s"),
                g("max_s"),
                g("mean_base_len"),
                g("mean_source_len"),
                g("gflop_per_step"),
                g("gflops"),
                100.0 * g("matmul_share"),
                s["state_cache_hit_rate"].as_f64().map(|h| format!("; state cache hit rate {:.0}%", 100.0 * h)).unwrap_or_default()
            );
            let phases: Vec<String> =
                s["phases"].as_array().into_iter().flatten().map(|p| format!("{} {:.2}", p["phase"].as_str().unwrap_or("?"), p["median_s"].as_f64().unwrap_or(f64::NAN))).collect();
            println!("  phases (median s): {}", phases.join(", "));
            if let Some(heap) = s["peak_heap_bytes"].as_f64().filter(|&h| h > 0.0) {
                let by: Vec<String> =
                    s["phases"].as_array().into_iter().flatten().map(|p| format!("{} {:.2}", p["phase"].as_str().unwrap_or("?"), p["peak_heap_bytes"].as_f64().unwrap_or(f64::NAN) / 1e9)).collect();
                println!("  peak heap {:.2} GB; by phase (GB): {}", heap / 1e9, by.join(", "));
            }
        }
        if let Some(x) = first_epoch {
            println!("first epoch with an empty cache, all {per_pass} steps: {x:.2} examples/s on average ({:.1} s)", epoch_seconds.unwrap_or(0.0));
        }
        println!("peak RSS {}", rss.map(|b| format!("{:.2} GB", b as f64 / 1e9)).unwrap_or_else(|| "unknown".into()));
    }
    Ok(())
}

/// `bench train --dry-run`: the estimated peak of the largest step among the batches the
/// benchmark would run ([`crate::experiment::memory`]).
fn train_dry_run(a: &TrainBenchArgs) -> Result<()> {
    use crate::data::collate::collate;
    use crate::experiment::trainer::TrainSettings;
    let (shape, dtype) = a.model.shape()?;
    let c = &shape.config;
    if a.interp.layer >= c.num_hidden_layers {
        bail!("--layer {}: the model has {} blocks", a.interp.layer, c.num_hidden_layers);
    }
    let icfg = a.interp.config(a.seed)?;
    let label_limit = TrainSettings::default().label_limit;
    let shapes: Vec<crate::experiment::flops::StepShapes> = match &a.lengths {
        Some(l) => {
            let &[base_len, source_len, instruction_len] = l.as_slice() else { bail!("--lengths takes three numbers, base,source,instruction (e.g. 30,30,12), not {}", l.len()) };
            if l.contains(&0) {
                bail!("--lengths must be positive");
            }
            vec![crate::experiment::flops::StepShapes { batch: a.batch, base_len, source_len, instruction_len, labels: label_limit }]
        }
        None => {
            let rows = bench_rows(&shape.tokenizer, a.data.as_deref(), a.batch * (a.steps + a.warmup), a.max_tokens, a.seed, "--steps")?;
            let pad = shape.tokenizer.padding_id();
            rows.chunks(a.batch).map(|chunk| crate::experiment::flops::StepShapes::of(&collate(&chunk.iter().collect::<Vec<_>>(), pad), label_limit)).collect()
        }
    };
    let (clean_bf16, intervened_bf16) = a.model.bf16_passes()?;
    let mut worst: Option<(crate::experiment::memory::MemoryEstimate, crate::experiment::flops::StepShapes)> = None;
    for sh in shapes {
        let est = crate::experiment::memory::hyperdas_step(c, dtype, clean_bf16, intervened_bf16, &icfg, &sh);
        if worst.as_ref().is_none_or(|(w, _)| est.total() > w.total()) {
            worst = Some((est, sh));
        }
    }
    let Some((est, sh)) = worst else { bail!("no batches to estimate") };
    let cache = if a.no_cache { 0.0 } else { a.cache_gb * 1e9 };
    if super::json() {
        println!(
            "{}",
            serde_json::json!({
                "bench": "train-dry-run", "model": a.model.name(), "dtype": format!("{dtype:?}").to_lowercase(), "batch": a.batch, "layer": a.interp.layer, "blocks": a.interp.blocks,
                "subspace": a.interp.subspace, "rank": a.interp.rank, "shapes": sh, "estimate": est, "peak_bytes": est.total(), "state_cache_budget_bytes": cache,
                "peak_with_cache_bytes": est.total() + cache,
            })
        );
        return Ok(());
    }
    println!(
        "estimated memory of a HyperDAS training step: {} ({} blocks, d={}, vocab {}), target in {dtype:?}, batch {} (T_b {}, T_s {}, T_e {}, {} label tokens), layer {}, {} hypernetwork blocks, {} rank {}",
        a.model.name(),
        c.num_hidden_layers,
        c.hidden_size,
        c.vocab_size,
        sh.batch,
        sh.base_len,
        sh.source_len,
        sh.instruction_len,
        sh.labels,
        a.interp.layer,
        a.interp.blocks,
        a.interp.subspace,
        a.interp.rank
    );
    for (name, bytes) in est.parts() {
        let note = match (name == "target weights", clean_bf16, intervened_bf16) {
            (true, true, false) => format!("  (clean passes in bf16: packed weights held, blocks 0..{} without f32 copies)", icfg.hypernet.layer),
            (true, true, true) => "  (clean and intervened passes in bf16: packed weights held, no block keeps f32 copies)".to_string(),
            (true, false, true) => "  (intervened pass in bf16: packed weights of the upper blocks held)".to_string(),
            _ => String::new(),
        };
        println!("  {name:<46} {:>8.2} GB{note}", bytes / 1e9);
    }
    println!("  {:<46} {:>8.2} GB  ({:.1} M trainable parameters)", "peak of a step", est.total() / 1e9, est.trainable_parameters as f64 / 1e6);
    if cache > 0.0 {
        println!("  {:<46} {:>8.2} GB  (--cache-gb; --no-cache for none)", "+ state cache, at most", cache / 1e9);
        println!("  {:<46} {:>8.2} GB", "peak with a full state cache", (est.total() + cache) / 1e9);
    }
    if a.model.device() != "cpu" {
        println!("  on a GPU add the CUDA context and the caching allocator's slack (about 0.5 GB and up to 20 %)");
    }
    Ok(())
}
