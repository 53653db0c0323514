//! The `hyperdas` binary end to end: exit codes, output, and clean errors (no panics).

mod common;

use std::process::{Command, Output};

use common::*;

/// The binary with `args`, one thread, and never the network (with the `hub` feature a hub id
/// would try).
fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_hyperdas"));
    c.args(args).env("RAYON_NUM_THREADS", "1").env("HF_HUB_OFFLINE", "1");
    c
}

fn hyperdas(args: &[&str]) -> Output {
    command(args).output().expect("runs")
}

/// `hyperdas` with its model cache in `home` (a temporary directory), so a test's toy model is
/// its own.
fn hyperdas_in(home: &std::path::Path, args: &[&str]) -> Output {
    command(args).env("HYPERDAS_HOME", home).output().expect("runs")
}

/// Builds the tiny toy model in `home` and returns its directory (the `use it: --model` line).
fn tiny_toy(home: &std::path::Path) -> String {
    let o = hyperdas_in(home, &["toy", "--tiny", "--quiet"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    out.lines().find_map(|l| l.strip_prefix("use it: --model ")).expect("the toy's directory").trim().to_string()
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string())
}

#[test]
fn verify_model_with_reference_passes_on_the_tiny_model() {
    let model = fixture("tiny-llama");
    let reference = fixture("tiny-llama-reference.safetensors");
    let o = hyperdas(&["verify-model", "--model", model.to_str().unwrap(), "--reference", reference.to_str().unwrap(), "--tolerance", "1e-4"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("hidden_states") && out.contains("grad_resid_1") && out.contains("identical to the reference"), "{out}");
    assert!(out.contains("Paris is a city in the country of"), "{out}");
    assert!(!out.contains("NOT OK"));
}

#[test]
fn verify_model_fails_when_the_reference_disagrees() {
    // The qwen2 reference against the llama model: shapes differ, a clear error.
    let model = fixture("tiny-llama");
    let reference = fixture("tiny-qwen2-reference.safetensors");
    let o = hyperdas(&["verify-model", "--model", model.to_str().unwrap(), "--reference", reference.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("error:") && err.contains("tiny-qwen2-reference.safetensors"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn smollm2_says_france() {
    let Some(path) = smollm2() else { return };
    let o = hyperdas(&["verify-model", "--model", path.to_str().unwrap(), "--prompt", "Paris is a city in the country of"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let top5: Vec<&str> = out.lines().filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit())).collect();
    assert_eq!(top5.len(), 5, "{out}");
    assert!(top5.iter().any(|l| l.contains("\" France\"")), "{out}");
}

#[test]
fn bad_model_arguments_fail_cleanly() {
    for (spec, needle) in [("/definitely/not/here", "no such file or directory"), ("smollm2-135m-typo", "not a known model"), ("some-org/some-model", "hub")] {
        let o = hyperdas(&["verify-model", "--model", spec]);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{spec}: {err}");
        assert!(err.to_lowercase().contains(needle) && err.contains(spec), "{spec}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    let o = hyperdas(&["verify-model", "--model", fixture("tiny-llama").to_str().unwrap(), "--dtype", "int4"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("unknown dtype `int4`"));
}

#[test]
fn info_lists_sites_with_shapes() {
    let o = hyperdas(&["info", "--model", fixture("tiny-qwen2").to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("blocks.0.hook_resid_pre") && out.contains("[B, T, 48]") && out.contains("ln_final.hook_normalized"), "{out}");
    assert!(out.contains("biases               qkv true, o false"), "{out}");
    // Readable by a person: no Rust debug formatting, no f32 noise in floats.
    let o = hyperdas(&["info", "--model", fixture("tiny-llama").to_str().unwrap()]);
    let (out, _) = text(&o);
    assert!(out.contains("scaling llama3, factor 8,") && !out.contains("Llama3 {") && !out.contains("Some(") && out.contains("norms                RMSNorm, eps 1e-5"), "{out}");
    // GPT-2 and GPT-NeoX say how positions enter, which norm they use and how the hypernetwork starts.
    let o = hyperdas(&["info", "--model", fixture("tiny-gpt2").to_str().unwrap()]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("learned absolute positions (64 of them)") && out.contains("norms                LayerNorm") && out.contains("hypernetwork init    from scratch"), "{out}");
    let o = hyperdas(&["info", "--model", fixture("tiny-gpt-neox").to_str().unwrap()]);
    let (out, _) = text(&o);
    assert!(out.contains("RoPE on 4 of each head's 16 dimensions") && out.contains("residual             parallel"), "{out}");
    let o = hyperdas(&["info", "--model", fixture("tiny-llama").to_str().unwrap(), "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!((v["blocks"].as_u64(), v["hidden_size"].as_u64(), v["start_token_id"].as_u64()), (Some(3), Some(64), Some(0)));
    assert_eq!(v["sites"][0]["site"], "blocks.0.hook_resid_pre");
}

#[test]
fn bench_forward_reports_tokens_per_second() {
    let o = hyperdas(&["bench", "forward", "--model", fixture("tiny-llama").to_str().unwrap(), "--batch", "2", "--seq", "8", "--runs", "3", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert_eq!(v["batch"], 2);
    assert!(v["tokens_per_s_median"].as_f64().unwrap() > 0.0);
    let o = hyperdas(&["bench", "forward", "--model", fixture("tiny-llama").to_str().unwrap(), "--runs", "0"]);
    assert_eq!(o.status.code(), Some(1));
}

/// Every bench names its machine, and reports the user's thread setting (not the value the
/// binary settles at start-up, src/threads.rs) with the count candle used.
#[test]
fn bench_names_the_machine_and_the_users_thread_setting() {
    let matmul = |threads: Option<&str>| {
        let mut c = command(&["bench", "matmul", "--runs", "1"]);
        match threads {
            Some(n) => c.env("RAYON_NUM_THREADS", n),
            None => c.env_remove("RAYON_NUM_THREADS"),
        };
        let o = c.output().expect("runs");
        let (out, err) = text(&o);
        assert!(o.status.success(), "{out}\n{err}");
        assert!(err.lines().next().is_some_and(|l| l.contains("machine: ")) && err.contains("logical cores"), "{err}");
        out
    };
    let out = matmul(Some("1"));
    assert!(out.contains(", 1 threads (RAYON_NUM_THREADS=1)"), "{out}");
    let out = matmul(None);
    assert!(out.contains("threads (RAYON_NUM_THREADS=unset)"), "{out}");
    let o = hyperdas(&["bench", "matmul", "--runs", "1", "--json"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON line");
    assert!(v["machine"].as_str().is_some_and(|m| m.contains("logical cores")), "{out}");
    assert_eq!(v["threads"], 1);
}

#[test]
fn demo_and_fetch_list_run() {
    // The demo's pipeline end to end on the tiny toy (the full demo takes minutes: docs/results.md).
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let o = hyperdas(&["demo", "--tiny", "--quiet", "--out", out.to_str().unwrap()]);
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stdout}\n{stderr}");
    for mode in ["soft", "column_argmax", "bidding_argmax", "global_argmax", "groundtruth"] {
        assert!(stdout.contains(mode), "{stdout}");
    }
    assert!(stdout.contains("total time:") && stdout.contains("of causal test rows the base city's last token takes the source city's last token"), "{stdout}");
    assert!(stdout.contains("report: ") && stdout.contains("report.html"), "{stdout}");
    for f in [
        "data/city_country_train.jsonl",
        "data/city_country_test.jsonl",
        "hyperdas/results.json",
        "hyperdas/config.resolved.toml",
        "hyperdas/eval/city_country_test.positions.jsonl",
        "hyperdas/report.html",
        "hyperdas/heatmaps.json",
        "mdas/results.json",
        "mdas/run.json",
    ] {
        assert!(out.join(f).is_file(), "{f}");
    }
    // The MDAS baseline beside HyperDAS, printed and in the report.
    assert!(stdout.contains("HyperDAS beside the MDAS baseline") && stdout.contains("HyperDAS · soft") && stdout.lines().any(|l| l.trim_start().starts_with("MDAS ")), "{stdout}");
    let page = std::fs::read_to_string(out.join("hyperdas/report.html")).unwrap();
    assert!(page.contains("HyperDAS beside the baselines") && page.contains("<td>MDAS</td>"), "report compares with MDAS");
    // A second demo into the same directory is refused, and nothing is lost.
    let o = hyperdas(&["demo", "--tiny", "--quiet", "--out", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("exists and is not empty"));
    assert!(out.join("hyperdas/results.json").is_file());
    let o = hyperdas(&["fetch", "--list"]);
    assert!(o.status.success());
    assert!(text(&o).0.contains("smollm2-135m"));
    let o = hyperdas(&["fetch", "nonexistent-model"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("unknown model `nonexistent-model`"));
}

// ---------------------------------------------------------------------------------------------
// hyperdas data

#[test]
fn data_kb_lists_domains_and_attributes() {
    let o = hyperdas(&["data", "kb"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("city: 3552 entities") && out.contains("nobel_prize_winner: 928 entities"), "{out}");
    assert!(out.contains("Country of Birth") && out.contains("Timezone") && out.contains("MIT"), "{out}");
}

#[test]
fn data_build_without_filter_writes_jsonl_arrow_and_summaries() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    let o = hyperdas(&["data", "build", "--no-filter", "--causal", "10", "--isolate", "2", "--out", out]);
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(stdout.contains("wrote 12 rows (10 causal, 2 isolate)"), "{stdout}");
    for split in ["train", "val", "test"] {
        let rows = std::fs::read_to_string(dir.path().join(format!("city_country_{split}.jsonl"))).unwrap();
        assert_eq!(rows.lines().count(), 12);
        let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join(format!("city_country_{split}.summary.json"))).unwrap()).unwrap();
        assert_eq!(s["split"], split);
        assert_eq!(s["template_splits"], serde_json::json!([split]));
        assert_eq!(s["seed"], 42);
        assert_eq!(s["rows"], 12);
        assert_eq!(s["causal_rows"], 10);
        assert!(s["knowledge"].is_null() && s["model"].is_null());
        assert!(s["balance"]["max_template_share"].as_f64().is_some());
    }
    // No silent overwrite.
    let o = hyperdas(&["data", "build", "--no-filter", "--causal", "10", "--isolate", "2", "--out", out]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("exists") && err.contains("--force"), "{err}");
    // Arrow output, then read it back.
    let o = hyperdas(&["data", "build", "--no-filter", "--split", "test", "--causal", "6", "--isolate", "5", "--format", "arrow", "--out", out, "--force"]);
    assert!(o.status.success(), "{}", text(&o).1);
    let arrow = dir.path().join("city_country_test");
    assert!(arrow.join("state.json").is_file());
    let o = hyperdas(&["data", "show", arrow.to_str().unwrap(), "--head", "1"]);
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(stdout.contains("11 rows (6 causal, 5 isolate)") && stdout.contains("causal/Country"), "{stdout}");
}

#[test]
fn data_build_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().to_str().unwrap();
    for (args, want) in [
        (vec!["--causal", "5"], vec!["--model is required", "--no-filter"]),
        (vec!["--no-filter", "--attribute", "Population"], vec!["unknown attribute `Population`", "Country, Continent, Language, Latitude, Longitude, Timezone"]),
        (vec!["--no-filter", "--domain", "planet"], vec!["unknown RAVEL domain `planet`", "city, nobel_prize_winner"]),
        (vec!["--no-filter", "--split", "dev"], vec!["unknown split `dev`"]),
        (vec!["--no-filter", "--entities", "some"], vec!["unknown entity policy"]),
    ] {
        let mut all = vec!["data", "build", "--out", out];
        all.extend(args);
        let o = hyperdas(&all);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(1), "{all:?}: {err}");
        for w in want {
            assert!(err.contains(w), "{all:?}: want {w:?} in {err}");
        }
        assert!(!err.contains("panicked"), "{err}");
    }
    // A random tiny model knows no facts: a clear message, nothing written; its knowledge
    // table says so too.
    let model = fixture("tiny-llama");
    let tables = dir.path().join("tables");
    let tables = tables.to_str().unwrap();
    let args = ["-m", model.to_str().unwrap(), "--split", "test", "--pilot", "2", "--max-entities", "3", "--table-dir", tables, "--quiet"];
    let o = hyperdas(&[&["data", "build", "--causal", "4", "--isolate", "1", "--out", out][..], &args[..]].concat());
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("no known city cell for causal rows of Country"), "{err}");
    assert!(err.contains("Latitude: skipped for isolate rows"), "{err}");
    assert!(!dir.path().join("city_country_test.jsonl").exists());
    let o = hyperdas(&["data", "knowledge", "-m", model.to_str().unwrap(), "-a", "Country,Latitude", "--table-dir", tables, "--per-template"]);
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(stdout.contains("Country      train         22") && stdout.contains("Latitude"), "{stdout}");
    let empty = dir.path().join("no-tables");
    let o = hyperdas(&["data", "knowledge", "-m", model.to_str().unwrap(), "-a", "Language", "--table-dir", empty.to_str().unwrap(), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o).0));
    assert!(v["tables"][0]["path"].is_null(), "Language was never evaluated: {v}");
}

#[test]
fn data_show_and_convert_round_trip_and_report_bad_rows() {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("ravel/city_country_test.jsonl");
    let arrow = dir.path().join("arrow");
    let back = dir.path().join("back.jsonl");
    let o = hyperdas(&["data", "convert", src.to_str().unwrap(), arrow.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o).1);
    let o = hyperdas(&["data", "convert", arrow.to_str().unwrap(), back.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert_eq!(std::fs::read_to_string(&back).unwrap(), std::fs::read_to_string(&src).unwrap());

    // Token view with the tiny tokenizer: entity (E) and label (L) roles are shown.
    let model = fixture("tiny-llama");
    let o = hyperdas(&["data", "show", src.to_str().unwrap(), "--head", "1", "-m", model.to_str().unwrap()]);
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(stdout.contains("base tokens") && stdout.contains("E]") && stdout.contains("L]"), "{stdout}");

    let bad = dir.path().join("bad.jsonl");
    let mut text_in = std::fs::read_to_string(&src).unwrap();
    text_in.push_str("{\"input_prefix\": \"x\"}\n");
    std::fs::write(&bad, text_in).unwrap();
    let o = hyperdas(&["data", "show", bad.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("bad.jsonl") && err.contains("row 50") && err.contains("missing column"), "{err}");
    let o = hyperdas(&["data", "show", bad.to_str().unwrap(), "--skip-bad-rows"]);
    let (stdout, _) = text(&o);
    assert!(o.status.success());
    assert!(stdout.contains("skipped 1 malformed rows") && stdout.contains("row 50"), "{stdout}");
}

#[test]
fn data_build_samples_from_smollm2s_knowledge_table() {
    let Some(path) = smollm2() else { return };
    let dir = tempfile::tempdir().unwrap();
    let tables = dir.path().join("tables");
    let args = |out: &str| -> Vec<String> {
        [
            "data",
            "build",
            "-m",
            path.to_str().unwrap(),
            "--split",
            "val",
            "--causal",
            "40",
            "--isolate",
            "0",
            "--pilot",
            "4",
            "--max-entities",
            "6",
            "--table-dir",
            tables.to_str().unwrap(),
            "--out",
            out,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let out = dir.path().join("a");
    let o = command(&args(out.to_str().unwrap()).iter().map(String::as_str).collect::<Vec<_>>()).output().unwrap();
    let (stdout, err) = text(&o);
    assert!(o.status.success(), "{stdout}\n{err}");
    assert!(err.contains("Country: pilot:") && err.contains("6 evaluated in full") && err.contains("causal/Country"), "{err}");
    let s: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("city_country_val.summary.json")).unwrap()).unwrap();
    assert_eq!(s["rows"], 40);
    assert_eq!(s["knowledge"]["max_entities"], 6);
    let t = &s["knowledge_tables"][0];
    assert_eq!(t["attribute"], "Country");
    assert_eq!(t["full_entities"], 6);
    assert!(t["screen_recall"].as_f64().is_some() && t["pilot_rate"].as_f64().unwrap() > 0.05, "SmolLM2 knows some countries: {t}");
    assert!(s["model"].as_str().unwrap().contains("Llama, 30 blocks"));
    let rows = std::fs::read_to_string(out.join("city_country_val.jsonl")).unwrap();
    assert_eq!(rows.lines().count(), 40);
    // The second build (another seed) reads the cached table and runs no prompt.
    let out2 = dir.path().join("b");
    let mut again = args(out2.to_str().unwrap());
    again.extend(["--seed".to_string(), "7".to_string()]);
    let o = command(&again.iter().map(String::as_str).collect::<Vec<_>>()).output().unwrap();
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("cached, nothing to evaluate") && !err.contains("Country: pilot:"), "{err}");
    assert_ne!(std::fs::read_to_string(out2.join("city_country_val.jsonl")).unwrap(), rows);
}

// ---------------------------------------------------------------------------------------------
// hyperdas toy

#[test]
fn toy_tiny_trains_once_then_comes_from_the_cache() {
    let home = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["toy", "--tiny", "--quiet"];
        args.extend(extra);
        hyperdas_in(home.path(), &args)
    };
    let o = run(&[]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("toy model trained in") && out.contains("Timezone") && out.contains("held-out templates"), "{out}");
    let o = run(&[]);
    let (out, _) = text(&o);
    assert!(o.status.success());
    assert!(out.contains("toy model (cached"), "{out}");
    // The cached directory loads as a model.
    let dir = out.lines().find_map(|l| l.strip_prefix("use it: --model ")).expect("path").trim().to_string();
    let o = hyperdas(&["info", "--model", &dir]);
    assert!(o.status.success(), "{}", text(&o).1);
    // Overrides: unknown keys are errors that list the valid ones; a changed setting is a new model.
    let o = run(&["--set", "widht=3"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("unknown key `widht`") && err.contains("hidden_size"), "{err}");
    let o = run(&["--set", "batch_size=0"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("`batch_size` must be at least 1"), "{err}");
    let o = run(&["--set", "steps=5", "--show-config"]);
    let (out, _) = text(&o);
    assert!(out.contains("steps = 5"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// hyperdas train (toy tiny, end to end)

#[test]
fn train_runs_end_to_end_on_the_tiny_toy_and_writes_the_run_directory() {
    let home = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let cmd = |args: &[&str]| hyperdas_in(home.path(), args);
    let toy = tiny_toy(home.path());
    let data = work.path().join("data");
    let o = cmd(&["data", "build", "--kb-dir", &format!("{toy}/ravel"), "-m", &toy, "--causal", "24", "--isolate", "4", "--out", data.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "{}", text(&o).1);
    let train = data.join("city_country_train.jsonl");
    let test = data.join("city_country_test.jsonl");
    let run = work.path().join("run");
    let sets = [
        format!("data.train={}", train.display()),
        format!("data.test={}", test.display()),
        "model.path=toy:tiny".to_string(),
        "train.epochs=1".to_string(),
        "train.batch_size=8".to_string(),
        "train.lr=1e-3".to_string(),
        "interpreter.num_blocks=1".to_string(),
        "interpreter.layer=0".to_string(),
        "interpreter.rank=4".to_string(),
    ];
    let mut args = vec!["train", "--quiet", "--device", "cpu", "--out", run.to_str().unwrap()];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let o = cmd(&args);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("soft") && out.contains("groundtruth") && out.contains("disentangle"), "{out}");
    for f in ["config.resolved.toml", "metrics.jsonl", "results.json", "results.csv", "checkpoint/params.safetensors", "checkpoint/optimizer.safetensors", "checkpoint/state.json"] {
        assert!(run.join(f).is_file(), "{f}");
    }
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("results.json")).unwrap()).unwrap();
    for mode in ["soft", "column_argmax", "bidding_argmax", "global_argmax", "groundtruth"] {
        let accs = &results[mode]["accs"];
        for k in ["causal", "isolate", "disentangle"] {
            let v = accs[k].as_f64().unwrap_or(-1.0);
            assert!((0.0..=1.0).contains(&v), "{mode} {k}: {accs}");
        }
        assert!(results[mode]["test_loss"].as_f64().unwrap() > 0.0);
    }
    // Per-attribute table: the only group (city, Country) equals the overall scores, and the
    // domain mean row equals it too; row counts add up to the test set.
    let by: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("results.by_attribute.json")).unwrap()).unwrap();
    for mode in ["soft", "groundtruth"] {
        let groups = by[mode].as_array().unwrap();
        assert_eq!(groups.len(), 2, "{groups:?}");
        assert_eq!((groups[0]["domain"].as_str(), groups[0]["attribute"].as_str()), (Some("city"), Some("Country")));
        assert_eq!(groups[1]["attribute"], "mean");
        for k in ["causal", "isolate", "disentangle"] {
            assert_eq!(groups[0][k], results[mode]["accs"][k], "{mode} {k}");
            assert_eq!(groups[1][k], results[mode]["accs"][k], "{mode} {k}");
        }
    }
    let by_csv = std::fs::read_to_string(run.join("results.by_attribute.csv")).unwrap();
    assert!(by_csv.starts_with("mode,domain,attribute,causal,isolate,disentangle,causal_rows,isolate_rows\n") && by_csv.contains("soft,city,Country,"), "{by_csv}");
    let resolved = std::fs::read_to_string(run.join("config.resolved.toml")).unwrap();
    assert!(resolved.contains("rank = 4") && resolved.contains("[train]"), "{resolved}");
    // Reload the run from its directory alone and evaluate: the same scores as at the end of training.
    let o = cmd(&["eval", "--quiet", "--run", run.to_str().unwrap(), "--data", test.to_str().unwrap(), "--modes", "soft,groundtruth"]);
    assert!(o.status.success(), "{}", text(&o).1);
    let ev: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("eval/city_country_test.results.json")).unwrap()).unwrap();
    assert_eq!(ev["soft"], results["soft"]);
    assert_eq!(ev["groundtruth"], results["groundtruth"]);
    let positions = std::fs::read_to_string(run.join("eval/city_country_test.positions.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(positions.lines().next().unwrap()).unwrap();
    assert!(first["selected"].is_array() && first["mode"] == "soft", "{first}");
    // Ground truth picks exactly one (base, source) pair per row: the last entity tokens.
    let gt: Vec<serde_json::Value> = positions.lines().map(|l| serde_json::from_str(l).unwrap()).filter(|v: &serde_json::Value| v["mode"] == "groundtruth").collect();
    assert!(!gt.is_empty() && gt.iter().all(|v| v["selected"].as_array().unwrap().len() == 1), "{gt:?}");
    let o = cmd(&["eval", "--run", work.path().to_str().unwrap(), "--data", test.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("not a run directory"), "{}", text(&o).1);
    // Without --data, eval scores the run's own test set (data.test): the same scores.
    let o = cmd(&["eval", "--quiet", "--run", run.to_str().unwrap(), "--modes", "soft"]);
    assert!(o.status.success(), "{}", text(&o).1);
    let again: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("eval/city_country_test.results.json")).unwrap()).unwrap();
    assert_eq!(again["soft"], results["soft"]);
    let o = cmd(&["eval", "--run", work.path().to_str().unwrap()]);
    assert!(text(&o).1.contains("not a run directory"), "{}", text(&o).1);

    // Apply the run to a new triple: chosen positions and the prediction before/after.
    let o = cmd(&["apply", "--run", run.to_str().unwrap(), "--base", "city: Paris, country:", "--source", "city: Tokyo, country:", "--instruction", "Paris ; Tokyo - Country"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("\"Paris\"") && out.contains("next token before the intervention: \"France\"") && out.contains("after the intervention:"), "{out}");
    let o = cmd(&["apply", "--run", run.to_str().unwrap(), "--base", "city: Rome, country:", "--source", "city: Tokyo, country:", "--instruction", "Paris ; Tokyo - Country"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("does not occur in the base prompt"), "{}", text(&o).1);

    // Devices: the run recorded `--device cpu`; every command that loads a model takes --device
    // (eval on the CPU gives the same scores); CUDA in a CPU build, or an unknown device, is a
    // clear error before anything runs.
    assert!(resolved.contains("device = \"cpu\""), "{resolved}");
    let o = cmd(&["eval", "--quiet", "--device", "cpu", "--run", run.to_str().unwrap(), "--modes", "soft"]);
    assert!(o.status.success(), "{}", text(&o).1);
    let on_cpu: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("eval/city_country_test.results.json")).unwrap()).unwrap();
    assert_eq!(on_cpu["soft"], results["soft"]);
    let r = run.to_str().unwrap();
    let never = work.path().join("never");
    let nv = never.to_str().unwrap();
    let commands: [&[&str]; 9] = [
        &["train", "--out", nv, "--set", "model.path=\"toy:tiny\""],
        &["baseline", "mdas", "--out", nv],
        &["sweep", "--out", nv],
        &["demo", "--tiny", "--out", nv],
        &["eval", "--run", r],
        &["apply", "--run", r, "--base", "city: Paris, country:", "--source", "city: Tokyo, country:", "--instruction", "Paris ; Tokyo - Country"],
        &["report", "--run", r],
        &["export", "pyvene", "--run", r, "--out", nv],
        &["info", "--model", &toy],
    ];
    for c in commands {
        for (device, says) in [("cuda", "needs a build with CUDA support"), ("tpu", "unknown device `tpu`")] {
            if cfg!(feature = "cuda") && device == "cuda" {
                continue;
            }
            let mut args = c.to_vec();
            args.extend(["--device", device]);
            let o = cmd(&args);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {}", text(&o).1);
            assert!(text(&o).1.contains(says), "{args:?}: {}", text(&o).1);
        }
    }
    assert!(!never.exists(), "nothing ran");
    // A bf16 target (trainable parameters f32): trained, reloaded and evaluated, the same scores.
    let run16 = work.path().join("run-bf16");
    let mut args = vec!["train", "--quiet", "--device", "cpu", "--set", "model.dtype=\"bf16\"", "--out", run16.to_str().unwrap()];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let o = cmd(&args);
    assert!(o.status.success(), "{}", text(&o).1);
    let trained: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run16.join("results.json")).unwrap()).unwrap();
    let o = cmd(&["eval", "--quiet", "--device", "cpu", "--run", run16.to_str().unwrap(), "--modes", "soft,groundtruth"]);
    assert!(o.status.success(), "{}", text(&o).1);
    let reloaded: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run16.join("eval/city_country_test.results.json")).unwrap()).unwrap();
    assert_eq!(reloaded["soft"], trained["soft"]);
    assert_eq!(reloaded["groundtruth"], trained["groundtruth"]);
    assert!(std::fs::read_to_string(run16.join("config.resolved.toml")).unwrap().contains("dtype = \"bf16\""));

    // The resolved config is a valid config; a used run directory is refused.
    let o = cmd(&["train", "--config", run.join("config.resolved.toml").to_str().unwrap(), "--out", run.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("not empty"), "{err}");
    // Unknown keys are errors that list the valid ones.
    let o = cmd(&["train", "--set", "train.learning_rate=1", "--show-config"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("unknown key `train.learning_rate`") && err.contains("batch_size"), "{err}");
    let o = cmd(&["train", "--show-config"]);
    let (out, _) = text(&o);
    assert!(o.status.success() && out.contains("[interpreter]") && out.contains("subspace = \"reflect_select\""), "{out}");

    // Stop after 2 steps, resume: the same parameters, optimizer state and results as the
    // uninterrupted run above.
    let run2 = work.path().join("run2");
    let mut args = vec!["train", "--quiet", "--out", run2.to_str().unwrap()];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let mut first = args.clone();
    first.extend(["--set", "train.stop_after_steps=2", "--set", "train.checkpoint_every=1"]);
    let o = cmd(&first);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("stopped early") && out.contains("--resume"), "{out}");
    assert!(!run2.join("results.json").exists());
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run2.join("checkpoint/state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 2);
    // Resuming with different settings is refused.
    let mut wrong = args.clone();
    wrong.extend(["--resume", "--set", "train.lr=0.5"]);
    let o = cmd(&wrong);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("differs from this run's configuration"), "{}", text(&o).1);
    let mut again = args.clone();
    again.push("--resume");
    let o = cmd(&again);
    assert!(o.status.success(), "{}", text(&o).1);
    for f in ["checkpoint/params.safetensors", "checkpoint/optimizer.safetensors"] {
        assert_eq!(std::fs::read(run.join(f)).unwrap(), std::fs::read(run2.join(f)).unwrap(), "{f} equals the uninterrupted run's");
    }
    assert_eq!(std::fs::read_to_string(run.join("results.json")).unwrap(), std::fs::read_to_string(run2.join("results.json")).unwrap());
    let lines = |d: &std::path::Path| std::fs::read_to_string(d.join("metrics.jsonl")).unwrap().lines().count();
    assert_eq!(lines(&run), lines(&run2));
}

// ---------------------------------------------------------------------------------------------
// hyperdas baseline, compare, sweep (toy tiny)

#[test]
fn baselines_compare_and_a_resumable_sweep_on_the_tiny_toy() {
    let home = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let cmd = |args: &[&str]| hyperdas_in(home.path(), args);
    let toy = tiny_toy(home.path());
    let data = work.path().join("data");
    let o = cmd(&["data", "build", "--kb-dir", &format!("{toy}/ravel"), "-m", &toy, "--causal", "24", "--isolate", "4", "--out", data.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "{}", text(&o).1);
    let train = data.join("city_country_train.jsonl");
    let test = data.join("city_country_test.jsonl");
    let train_text = std::fs::read_to_string(&train).unwrap();
    let causal_rows = train_text.lines().filter(|l| l.contains("\"attribute_type\":\"causal\"")).count();
    let total_rows = train_text.lines().count();
    assert!(causal_rows < total_rows, "the training set has isolate rows");
    let sets: Vec<String> = vec![
        format!("data.train={}", train.display()),
        format!("data.test={}", test.display()),
        "model.path=toy:tiny".into(),
        "train.epochs=1".into(),
        "train.batch_size=8".into(),
        "interpreter.num_blocks=1".into(),
        "interpreter.layer=0".into(),
        "interpreter.rank=4".into(),
    ];
    let with_sets = |head: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = head.iter().map(|s| s.to_string()).collect();
        for s in &sets {
            v.extend(["--set".to_string(), s.clone()]);
        }
        v
    };
    let run_of = |args: Vec<String>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = cmd(&refs);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{args:?}\n{out}\n{err}");
        out
    };
    let dir = |n: &str| work.path().join(n).display().to_string();
    let out = run_of(with_sets(&["baseline", "das", "--quiet", "--out", &dir("das")]));
    assert!(out.contains("groundtruth") && !out.contains("soft"), "a baseline is scored at its fixed positions only:\n{out}");
    run_of(with_sets(&["baseline", "mdas", "--quiet", "--out", &dir("mdas")]));
    run_of(with_sets(&["train", "--quiet", "--out", &dir("hyperdas")]));
    let info = |n: &str| -> serde_json::Value { serde_json::from_str(&std::fs::read_to_string(work.path().join(n).join("run.json")).unwrap()).unwrap() };
    // DAS trains on the causal rows only; MDAS and HyperDAS on all.
    assert_eq!(info("das")["train_rows"], causal_rows);
    assert_eq!(info("mdas")["train_rows"], total_rows);
    assert_eq!((info("mdas")["method"].as_str(), info("hyperdas")["method"].as_str()), (Some("mdas"), Some("hyperdas")));
    let resolved = std::fs::read_to_string(work.path().join("mdas/config.resolved.toml")).unwrap();
    assert!(resolved.contains("method = \"mdas\"") && resolved.contains("regularizer = \"none\"") && resolved.contains("epochs = 1"), "preset, then --set:\n{resolved}");
    // pyvene's placement: block_output of layer 0 is our layer 1, which on this 1-block model
    // is past the last block.
    let mut args = with_sets(&["baseline", "mdas", "--quiet", "--out", &dir("mdas-pyvene")]);
    args.extend(["--set".into(), "interpreter.layer_convention=block_output".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = cmd(&refs);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("intervention layer 1: the target has 1 blocks"), "{}", text(&o).1);
    // A contradicting method is refused.
    let mut args = with_sets(&["baseline", "das", "--show-config"]);
    args.extend(["--set".into(), "interpreter.method=mdas".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = cmd(&refs);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("contradicts the command"), "{}", text(&o).1);

    // One table per attribute, a row per method.
    let cmp = dir("cmp");
    let o = cmd(&["compare", "--run", &dir("hyperdas"), "--run", &dir("mdas"), "--run", &dir("das"), "--modes", "soft,bidding_argmax", "--out", &cmp]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("### city / Country") && out.contains("| HyperDAS · soft | 0 | 4 |") && out.contains("| MDAS | 0 | 4 |") && out.contains("| DAS | 0 | 4 |"), "{out}");
    assert!(std::fs::read_to_string(work.path().join("cmp/compare.html")).unwrap().contains("<td>DAS</td>"));
    let o = cmd(&["compare", "--run", &dir("data")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("not a run directory"), "{}", text(&o).1);

    // A sweep over two ranks (the tiny toy has one block); rerun: everything is skipped.
    let sw = dir("sweep");
    let sweep_args = with_sets(&["sweep", "--methods", "mdas,das", "--grid", "rank=2,4", "--out", &sw]);
    let first = run_of(sweep_args.clone());
    assert!(first.contains("| mdas-rank2 | MDAS | 0 | 2 |") && first.contains("| das-rank4 | DAS | 0 | 4 |") && first.contains("Best Disentangle per method"), "{first}");
    for f in ["sweep.csv", "summary.md", "sweep.html", "disentangle_vs_rank.svg", "runs/mdas-rank4/results.json"] {
        assert!(work.path().join("sweep").join(f).is_file(), "{f}");
    }
    let csv = std::fs::read_to_string(work.path().join("sweep/sweep.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 4 * 2, "4 runs × (Country + the domain mean):\n{csv}");
    // Interrupted before its first checkpoint: a half-written run directory is started again.
    std::fs::remove_file(work.path().join("sweep/runs/das-rank4/results.json")).unwrap();
    std::fs::remove_dir_all(work.path().join("sweep/runs/das-rank4/checkpoint")).unwrap();
    let mut quiet = sweep_args.clone();
    quiet.remove(0);
    let mut again = vec!["sweep".to_string()];
    again.extend(quiet);
    let refs: Vec<&str> = again.iter().map(String::as_str).collect();
    let o = cmd(&refs);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(err.matches("finished earlier, skipped").count(), 3, "{err}");
    assert!(err.contains("das-rank4 (starting"), "{err}");
    assert_eq!(std::fs::read_to_string(work.path().join("sweep/sweep.csv")).unwrap(), csv, "a rerun gives the same table");
    assert!(out.contains("Best Disentangle"));
    // A sweep's directory works as compare input.
    let o = cmd(&["compare", "--run", &sw, "--out", &dir("cmp2")]);
    assert!(o.status.success() && text(&o).0.contains("| MDAS | 0 | 2 |"), "{}", text(&o).0);
    // Bad grids fail before anything runs.
    let o = cmd(&["sweep", "--grid", "layer=3:1", "--out", &dir("bad")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("START ≤ END"), "{}", text(&o).1);
    let o = cmd(&["sweep", "--grid", "interpreter.rnak=4,8", "--out", &dir("bad")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("unknown key `interpreter.rnak`"), "{}", text(&o).1);
}

// The fair protocol: seeds, per-attribute MDAS, variants, and compare's mean ± std (toy tiny)

#[test]
fn seeds_per_attribute_runs_and_variants_meet_in_one_comparison() {
    let home = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let cmd = |args: &[&str]| hyperdas_in(home.path(), args);
    let toy = tiny_toy(home.path());
    let data = work.path().join("data");
    let o = cmd(&[
        "data",
        "build",
        "--kb-dir",
        &format!("{toy}/ravel"),
        "-m",
        &toy,
        "-a",
        "Country,Continent",
        "--causal",
        "12",
        "--isolate",
        "4",
        "--split",
        "train,test",
        "--out",
        data.to_str().unwrap(),
        "-q",
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    let train = data.join("city_country+continent_train.jsonl");
    let test = data.join("city_country+continent_test.jsonl");
    let dir = |n: &str| work.path().join(n).display().to_string();
    let sets = [
        format!("data.train={}", train.display()),
        format!("data.test={}", test.display()),
        "model.path=toy:tiny".into(),
        "train.steps=3".into(),
        "train.batch_size=8".into(),
        "interpreter.num_blocks=1".into(),
        "interpreter.layer=0".into(),
        "interpreter.rank=4".into(),
    ];
    let run = |head: &[&str]| -> String {
        let mut v: Vec<String> = head.iter().map(|s| s.to_string()).collect();
        for s in &sets {
            v.extend(["--set".to_string(), s.clone()]);
        }
        let refs: Vec<&str> = v.iter().map(String::as_str).collect();
        let o = cmd(&refs);
        let (out, err) = text(&o);
        assert!(o.status.success(), "{v:?}\n{out}\n{err}");
        out
    };
    // Per-attribute MDAS over two seeds: four runs, each on one attribute's rows.
    run(&["sweep", "--methods", "mdas", "--grid", "attribute=Country,Continent", "--seeds", "0,1", "-q", "--out", &dir("mdas")]);
    let names: Vec<String> = std::fs::read_dir(work.path().join("mdas/runs")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names.len(), 4, "{names:?}");
    let resolved = std::fs::read_to_string(work.path().join("mdas/runs/mdas-attributeCountry-seed1/config.resolved.toml")).unwrap();
    assert!(resolved.contains("attributes = [\"Country\"]") && resolved.contains("seed = 1"), "{resolved}");
    let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(work.path().join("mdas/runs/mdas-attributeCountry-seed0/run.json")).unwrap()).unwrap();
    let country_rows = std::fs::read_to_string(&train).unwrap().lines().filter(|l| l.contains("- Country\"")).count();
    assert_eq!(info["train_rows"], country_rows, "the Country run trains on the rows whose instruction names Country");
    // HyperDAS, two variants × two seeds, from a variants file.
    let variants = work.path().join("variants.toml");
    std::fs::write(&variants, "base = []\nkeep-base = [\"interpreter.self_bias=4\", \"train.head_lr_scale=5\"]\n").unwrap();
    run(&["sweep", "--methods", "hyperdas", "--variants", variants.to_str().unwrap(), "--seeds", "0,1", "-q", "--out", &dir("hyper")]);
    assert!(work.path().join("hyper/runs/hyperdas-variantkeep-base-seed1/results.json").is_file());
    // One comparison: a row per setting and mode, mean ± std over 2 seeds, per-attribute MDAS merged.
    let o = cmd(&["compare", "--run", &dir("mdas"), "--run", &dir("hyper"), "--modes", "soft", "--out", &dir("cmp")]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("| MDAS · per attribute | 0 | 4 | 2 |"), "{out}");
    assert!(out.contains("| HyperDAS · soft | 0 | 4 | 2 |") && out.contains("| HyperDAS · soft (interpreter.self_bias=4.0, train.head_lr_scale=5.0) | 0 | 4 | 2 |"), "{out}");
    assert!(out.contains(" ± "), "{out}");
    let mean = out.split("### city: mean over attributes").nth(1).unwrap();
    assert!(mean.contains("entity selected | entity → entity") && mean.contains("| MDAS · per attribute | 0 | 4 | 2 |"), "{mean}");
    // MDAS at its fixed positions always takes the entity token.
    let mdas_line = mean.lines().find(|l| l.starts_with("| MDAS")).unwrap();
    assert!(mdas_line.contains("| 1.000 | 1.000 |"), "{mdas_line}");
    // A variant the file lacks, and a bad file, fail before anything runs.
    let o = cmd(&["sweep", "--methods", "hyperdas", "--variants", variants.to_str().unwrap(), "--grid", "variant=nope", "--out", &dir("bad")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("no such variant"), "{}", text(&o).1);
    std::fs::write(&variants, "x = \"train.lr=1\"\n").unwrap();
    let o = cmd(&["sweep", "--methods", "hyperdas", "--variants", variants.to_str().unwrap(), "--out", &dir("bad")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("variants.toml") && text(&o).1.contains("variant `x`"), "{}", text(&o).1);
    // A test-row limit: the run scores the first rows, and `eval` on the run's own test set
    // scores those same rows; on other data, every row.
    let o = cmd(&[
        "train",
        "--set",
        &sets[0],
        "--set",
        &sets[1],
        "--set",
        "model.path=toy:tiny",
        "--set",
        "interpreter.num_blocks=1",
        "--set",
        "interpreter.layer=0",
        "--set",
        "train.steps=1",
        "--set",
        "data.max_test_rows=5",
        "--out",
        &dir("lim"),
    ]);
    assert!(o.status.success(), "{}", text(&o).1);
    let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(work.path().join("lim/run.json")).unwrap()).unwrap();
    assert_eq!(info["test_rows"], 5);
    let o = cmd(&["eval", "--run", &dir("lim"), "--modes", "soft"]);
    assert!(o.status.success() && text(&o).1.contains("scoring 5 rows"), "{}", text(&o).1);
    let o = cmd(&["eval", "--run", &dir("lim"), "--modes", "soft", "--data", train.to_str().unwrap()]);
    assert!(o.status.success() && !text(&o).1.contains("scoring 5 rows"), "{}", text(&o).1);
    // Limit, then attributes: a per-attribute run is scored on those of the first 8 test rows that
    // name its attribute, so the two attributes' runs split exactly the rows a run over both scores.
    let scored = |attribute: &str| -> u64 {
        let out = dir(&format!("lim-{attribute}"));
        let attrs = format!("data.attributes=[\"{attribute}\"]");
        let o = cmd(&[
            "baseline",
            "mdas",
            "--set",
            &sets[0],
            "--set",
            &sets[1],
            "--set",
            "model.path=toy:tiny",
            "--set",
            "interpreter.layer=0",
            "--set",
            "train.steps=1",
            "--set",
            "data.max_test_rows=8",
            "--set",
            &attrs,
            "--out",
            &out,
        ]);
        assert!(o.status.success(), "{}", text(&o).1);
        let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(std::path::Path::new(&out).join("run.json")).unwrap()).unwrap();
        info["test_rows"].as_u64().unwrap()
    };
    let (country, continent) = (scored("Country"), scored("Continent"));
    assert!(country > 0 && continent > 0 && country + continent == 8, "{country} + {continent}");
    // An attribute no row names is a clear error.
    let o = cmd(&["train", "--set", &sets[0], "--set", &sets[1], "--set", "model.path=toy:tiny", "--set", "data.attributes=[\"Language\"]", "--out", &dir("bad2")]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).1.contains("data.attributes") && text(&o).1.contains("Country"), "{}", text(&o).1);
}
