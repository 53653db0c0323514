//! The command line's conventions, as a researcher relies on them: every flag has help, the
//! defaults `--help` states are the ones the code uses, the README's command list exists in the
//! CLI, `--json` prints one parseable document, a batch job's log gets lines while it trains,
//! a run directory carries its provenance, its data's sha256 and TensorBoard events.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use clap::CommandFactory;
use common::*;

/// The binary with its model cache in `home`, one thread, never the network; stderr piped, so
/// it is not a terminal (a batch job).
fn hyperdas(home: &Path, cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hyperdas")).args(args).current_dir(cwd).env("HYPERDAS_HOME", home).env("RAYON_NUM_THREADS", "1").env("HF_HUB_OFFLINE", "1").output().expect("runs")
}

fn ok(o: &Output, what: &str) -> (String, String) {
    let (out, err) = (String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string());
    assert!(o.status.success(), "{what}\nstdout:\n{out}\nstderr:\n{err}");
    (out, err)
}

/// `--json`'s stdout, parsed (the whole of stdout must be one JSON document).
fn json(o: &Output, what: &str) -> serde_json::Value {
    let (out, err) = ok(o, what);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{what}: stdout is not one JSON document ({e}):\n{out}\nstderr:\n{err}"))
}

fn cli() -> clap::Command {
    let mut c = hyperdas::cli::Cli::command();
    c.build();
    c
}

/// Every (sub)command, with its path of names.
fn commands(c: &clap::Command, path: Vec<String>, out: &mut Vec<(Vec<String>, clap::Command)>) {
    out.push((path.clone(), c.clone()));
    for s in c.get_subcommands().filter(|s| s.get_name() != "help") {
        let mut p = path.clone();
        p.push(s.get_name().to_string());
        commands(s, p, out);
    }
}

#[test]
fn every_command_that_loads_a_model_takes_a_device() {
    let mut all = Vec::new();
    commands(&cli(), Vec::new(), &mut all);
    let loads_a_model = ["train", "baseline", "sweep", "demo", "eval", "apply", "report", "export pyvene", "info", "verify-model", "bench forward", "bench train", "bench eval", "data build"];
    for name in loads_a_model {
        let (_, c) = all.iter().find(|(p, _)| p.join(" ") == name).unwrap_or_else(|| panic!("no command `hyperdas {name}`"));
        assert!(c.get_arguments().any(|a| a.get_long() == Some("device")), "hyperdas {name} has no --device");
    }
}

#[test]
fn every_command_and_flag_has_help_text() {
    let mut all = Vec::new();
    commands(&cli(), Vec::new(), &mut all);
    let mut missing = Vec::new();
    for (path, c) in &all {
        if !path.is_empty() && c.get_about().is_none() {
            missing.push(format!("hyperdas {}", path.join(" ")));
        }
        for a in c.get_arguments() {
            let name = a.get_id().as_str();
            if name == "help" || name == "version" {
                continue;
            }
            if a.get_help().is_none() && a.get_long_help().is_none() {
                missing.push(format!("hyperdas {} {name}", path.join(" ")));
            }
        }
    }
    assert!(missing.is_empty(), "without help text: {missing:#?}");
}

#[test]
fn toy_help_states_the_defaults_show_config_uses() {
    let home = tempfile::tempdir().unwrap();
    let here = home.path();
    let (help, _) = ok(&hyperdas(here, here, &["toy", "--help"]), "toy --help");
    let standard: toml::Table = toml::from_str(&ok(&hyperdas(here, here, &["toy", "--show-config"]), "show-config").0).unwrap();
    let tiny: toml::Table = toml::from_str(&ok(&hyperdas(here, here, &["toy", "--tiny", "--show-config"]), "show-config --tiny").0).unwrap();
    for flag in ["seed", "cities", "steps"] {
        // `--steps <STEPS>  Training steps [default: 500; 300 with --tiny]`
        let line = help.lines().skip_while(|l| !l.trim_start().starts_with(&format!("--{flag} "))).take(3).collect::<Vec<_>>().join(" ");
        let d = line.split("[default: ").nth(1).unwrap_or_else(|| panic!("--{flag} states no default:\n{help}"));
        let (std_default, rest) = d.split_once(';').unwrap();
        let tiny_default = rest.split_whitespace().next().unwrap();
        assert_eq!(std_default.trim(), standard[flag].to_string(), "--{flag}: help against toy --show-config");
        assert_eq!(tiny_default, tiny[flag].to_string(), "--{flag}: help against toy --tiny --show-config");
    }
    // The same TOML keys are what --set takes, and --show-config shows the change.
    let set: toml::Table = toml::from_str(&ok(&hyperdas(here, here, &["toy", "--show-config", "--set", "lr=0.004", "--steps", "7"]), "set").0).unwrap();
    assert_eq!((set["lr"].as_float(), set["steps"].as_integer()), (Some(0.004), Some(7)));
    let bad = hyperdas(here, here, &["toy", "--show-config", "--set", "no_such_key=1"]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("no_such_key"));
}

/// The words of a README command line, quotes kept together, up to its `#` comment.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quote = None;
    let mut prev = ' ';
    for ch in line.chars() {
        match (quote, ch) {
            (None, '#') if prev.is_whitespace() => break,
            (None, '"' | '\'') => quote = Some(ch),
            (Some(q), c) if c == q => quote = None,
            (None, c) if c.is_whitespace() => {
                if !cur.is_empty() {
                    out.push(std::mem::take(&mut cur));
                }
            }
            (_, c) => cur.push(c),
        }
        prev = ch;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

#[test]
fn the_readme_command_list_matches_the_cli() {
    let readme = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let block = readme.split("## Commands").nth(1).and_then(|s| s.split("```bash").nth(1)).and_then(|s| s.split("```").next()).expect("README has a ## Commands code block");
    let joined = block.replace("\\\n", " ");
    let root = cli();
    let mut shown: Vec<Vec<String>> = Vec::new();
    let mut problems = Vec::new();
    for line in joined.lines().map(str::trim).filter(|l| l.starts_with("hyperdas ")) {
        let w = words(line);
        let mut cmd = &root;
        let mut path = Vec::new();
        for word in &w[1..] {
            let word = word.trim_matches(|c| c == '[' || c == ']');
            if let Some(flag) = word.strip_prefix("--") {
                let name = flag.split('=').next().unwrap_or(flag);
                if !cmd.get_arguments().any(|a| a.get_long() == Some(name)) {
                    problems.push(format!("{line}: `hyperdas {}` has no --{name}", path.join(" ")));
                }
            } else if let Some(short) = word.strip_prefix('-').filter(|s| s.len() == 1) {
                let c = short.chars().next().unwrap();
                if !cmd.get_arguments().any(|a| a.get_short() == Some(c)) {
                    problems.push(format!("{line}: `hyperdas {}` has no -{c}", path.join(" ")));
                }
            } else if let Some(sub) = cmd.find_subcommand(word) {
                path.push(word.to_string());
                cmd = sub;
            }
        }
        if cmd.has_subcommands() {
            problems.push(format!("{line}: `hyperdas {}` needs a subcommand", path.join(" ")));
        }
        shown.push(path);
    }
    // Every command the CLI has appears in the list.
    let mut all = Vec::new();
    commands(&root, Vec::new(), &mut all);
    for (path, c) in &all {
        if !path.is_empty() && !c.has_subcommands() && !shown.contains(path) {
            problems.push(format!("`hyperdas {}` is not in the README's command list", path.join(" ")));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

fn sha256(path: &Path) -> String {
    hyperdas::fetch::sha256_file(path).unwrap()
}

#[test]
fn a_batch_job_gets_log_lines_json_results_provenance_and_tensorboard_events() {
    let home = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let w = work.path();
    let run_cmd = |args: &[&str]| hyperdas(home.path(), w, args);

    let toy = json(&run_cmd(&["toy", "--tiny", "--json"]), "toy --json");
    let toy_dir = toy["dir"].as_str().expect("toy's dir").to_string();
    assert!(toy["report"]["accuracy"].is_array(), "{toy}");
    let built = json(&run_cmd(&["data", "build", "--kb-dir", &format!("{toy_dir}/ravel"), "-m", &toy_dir, "--causal", "24", "--isolate", "4", "--out", "data", "--json"]), "data build --json");
    let split = |name: &str| -> PathBuf { PathBuf::from(built["splits"].as_array().unwrap().iter().find(|s| s["split"] == name).unwrap_or_else(|| panic!("{built}"))["path"].as_str().unwrap()) };
    let (train, test) = (split("train"), split("test"));
    let sets = [
        "data.train=data/city_country_train.jsonl",
        "data.test=data/city_country_test.jsonl",
        "model.path=toy:tiny",
        "train.epochs=1",
        "train.batch_size=8",
        "train.log_every=1",
        "train.eval_every=2",
        "interpreter.num_blocks=1",
        "interpreter.layer=0",
        "interpreter.rank=4",
        "eval.modes=[\"soft\", \"bidding_argmax\"]",
    ];
    let with_sets = |first: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = first.iter().map(|s| s.to_string()).collect();
        for s in sets {
            v.extend(["--set".into(), s.into()]);
        }
        v
    };
    let args = with_sets(&["train", "--json", "--out", "runs/h"]);
    let o = run_cmd(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let trained = json(&o, "train --json");
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    let run = w.join("runs/h");
    let steps = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().filter(|l| l.contains("\"loss\"")).count();
    assert!(steps >= 2, "{steps} steps");

    // The batch log: a timestamped line per step (log_every = 1) and one per evaluation.
    let step_lines: Vec<&str> = err.lines().filter(|l| l.contains("training HyperDAS step ")).collect();
    assert_eq!(step_lines.len(), steps, "{err}");
    for l in &step_lines {
        assert!(l.contains(" loss ") && l.contains(" lr ") && l.contains("examples/s") && l.contains("eta "), "{l}");
        assert!(l.len() > 21 && l.as_bytes()[4] == b'-' && l[..21].ends_with("Z ") && l.contains(" INFO "), "a batch-job line starts with the UTC time and level: {l}");
    }
    let eval_lines = err.lines().filter(|l| l.contains("evaluation at step ") && l.contains("disentangle")).count();
    assert!(eval_lines >= 2, "evaluations at step 0, every 2 steps and at the end:\n{err}");
    // -q: no log lines.
    let mut quiet = with_sets(&["train", "-q", "--out", "runs/quiet"]);
    quiet.extend(["--set".into(), "train.stop_after_steps=1".into()]);
    let (_, qerr) = ok(&run_cmd(&quiet.iter().map(String::as_str).collect::<Vec<_>>()), "train -q");
    assert!(!qerr.contains("training HyperDAS step") && !qerr.contains("loading"), "{qerr}");

    // --json: the run's results, as results.json holds them.
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("results.json")).unwrap()).unwrap();
    assert_eq!(trained["results"], results);
    assert_eq!(trained["run"], "runs/h");

    // Provenance.
    let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run.join("run.json")).unwrap()).unwrap();
    let p = &info["provenance"];
    assert_eq!(p["version"], env!("CARGO_PKG_VERSION"));
    for k in ["started", "finished"] {
        let t = p[k].as_str().unwrap_or_default();
        assert!(t.len() == 20 && t.ends_with('Z') && t.as_bytes()[10] == b'T', "{k}: {t}");
    }
    assert!(p["started"].as_str() <= p["finished"].as_str());
    assert!(!p["host"].as_str().unwrap_or_default().is_empty() && p["cpu"].as_str().unwrap_or_default().contains("logical cores"), "{p}");
    assert_eq!((p["device"].as_str(), p["threads"].as_u64(), p["resumed_from_step"].as_u64()), (Some("cpu"), Some(1), Some(0)));
    let command: Vec<&str> = p["command"].as_array().unwrap().iter().filter_map(|x| x.as_str()).collect();
    assert!(command.contains(&"train") && command.contains(&"train.log_every=1"), "{command:?}");
    assert!(p.get("commit").is_some(), "commit: a string when built from a git checkout, else null");

    // Absolute data paths with their sha256.
    let resolved: toml::Table = toml::from_str(&std::fs::read_to_string(run.join("config.resolved.toml")).unwrap()).unwrap();
    let data = resolved["data"].as_table().unwrap();
    let abs_train = PathBuf::from(data["train"].as_str().unwrap());
    assert!(abs_train.is_absolute() && abs_train.ends_with("data/city_country_train.jsonl"), "{abs_train:?}");
    assert_eq!(data["train_sha256"].as_str().unwrap(), sha256(&w.join(&train)));
    assert_eq!(data["test_sha256"].as_str().unwrap(), sha256(&w.join(&test)));

    // metrics.jsonl: flat keys; TensorBoard: the same scalars at the same steps.
    let records: Vec<serde_json::Value> = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(records.iter().all(|r| r.as_object().unwrap().keys().all(|k| !k.starts_with("eval_"))), "flat keys only");
    let evals: Vec<(i64, f64)> = records.iter().filter_map(|r| Some((r["step"].as_i64()?, r["eval/soft/causal"].as_f64()?))).collect();
    assert!(evals.len() >= 2 && evals[0].0 == 0, "{evals:?}");
    let events: Vec<PathBuf> = std::fs::read_dir(&run).unwrap().map(|e| e.unwrap().path()).filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("events.out.tfevents.")).collect();
    assert_eq!(events.len(), 1, "{events:?}");
    let scalars = hyperdas::train::tensorboard::read_scalars(&events[0]).unwrap();
    let tb = |tag: &str| -> Vec<(i64, f32)> { scalars.iter().filter(|(t, _, _)| t == tag).map(|(_, s, v)| (*s, *v)).collect() };
    assert_eq!(tb("eval/soft/causal"), evals.iter().map(|&(s, v)| (s, v as f32)).collect::<Vec<_>>());
    let losses: Vec<(i64, f32)> = records.iter().filter_map(|r| Some((r["step"].as_i64()?, r["loss"].as_f64()? as f32))).collect();
    assert_eq!(tb("loss"), losses);
    assert_eq!(tb("lr").len(), steps);

    // --json on the commands that print results.
    let rundir = "runs/h";
    let ev = json(&run_cmd(&["eval", "--run", rundir, "--modes", "soft,bidding_argmax", "--json"]), "eval --json");
    assert_eq!(ev["results"], results, "eval on the run's own test set (absolute path, found from anywhere)");
    let applied = json(
        &run_cmd(&[
            "apply",
            "--run",
            rundir,
            "--base",
            "city: Paris, country:",
            "--source",
            "city: Tokyo, country:",
            "--instruction",
            "Paris ; Tokyo - Country",
            "--modes",
            "soft,bidding_argmax",
            "--json",
        ]),
        "apply --json",
    );
    assert_eq!(applied.as_array().map(Vec::len), Some(2));
    assert_eq!(applied[1]["mode"], "bidding_argmax");
    let cmp = json(&run_cmd(&["compare", "--run", rundir, "--modes", "soft", "--out", "cmp", "--json"]), "compare --json");
    assert!(cmp["rows"].as_array().is_some_and(|r| !r.is_empty()), "{cmp}");
    let rep = json(&run_cmd(&["report", "--run", rundir, "--json"]), "report --json");
    assert!(w.join(rep["report"].as_str().unwrap()).is_file(), "{rep}");
    let ex = json(&run_cmd(&["export", "pyvene", "--run", rundir, "--out", "exp", "--limit", "2", "--json"]), "export --json");
    assert!(ex["written"].as_array().is_some_and(|f| !f.is_empty()), "{ex}");
    let show = json(&run_cmd(&["data", "show", test.to_str().unwrap(), "--head", "1", "--json"]), "data show --json");
    assert_eq!(show["head"].as_array().map(Vec::len), Some(1));
    let conv = json(&run_cmd(&["data", "convert", test.to_str().unwrap(), "test-arrow", "--json"]), "data convert --json");
    assert_eq!(conv["format"], "arrow");
    let kb = json(&run_cmd(&["data", "kb", "--json"]), "data kb --json");
    assert!(kb["domains"].as_array().is_some_and(|d| !d.is_empty()));
    let fetch = json(&run_cmd(&["fetch", "--list", "--json"]), "fetch --list --json");
    assert!(fetch.as_array().is_some_and(|m| m.iter().any(|x| x["name"] == "smollm2-135m")));
    let verify = json(&run_cmd(&["verify-model", "--model", fixture("tiny-llama").to_str().unwrap(), "--top-k", "2", "--json"]), "verify-model --json");
    assert_eq!(verify["completions"][0]["top"].as_array().map(Vec::len), Some(2));
    let info = json(&run_cmd(&["info", "--model", fixture("tiny-llama").to_str().unwrap(), "--json"]), "info --json");
    assert!(info["blocks"].as_u64().is_some());

    // The test set edited after training: eval on the run's own test set says so.
    let mut text = std::fs::read_to_string(w.join(&test)).unwrap();
    text.push('\n');
    std::fs::write(w.join(&test), text).unwrap();
    let (_, err) = ok(&run_cmd(&["eval", "--run", rundir, "--modes", "soft"]), "eval after the test set changed");
    assert!(err.contains("has changed since the run was trained"), "{err}");

    // Without --out: runs/<method>-<date>-N, the first N free; --resume needs --out.
    let day = chrono::Utc::now().format("%Y-%m-%d").to_string();
    let mut das = with_sets(&["baseline", "das", "-q"]);
    das.extend(["--set".into(), "train.stop_after_steps=1".into()]);
    let das: Vec<&str> = das.iter().map(String::as_str).collect();
    ok(&run_cmd(&das), "baseline das without --out");
    ok(&run_cmd(&das), "again");
    assert!(w.join(format!("runs/das-{day}-1")).is_dir() && w.join(format!("runs/das-{day}-2")).is_dir());
    let o = run_cmd(&["train", "--resume"]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("--out"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn show_config_is_toml_with_dotted_set_keys_for_train_and_sweep() {
    let home = tempfile::tempdir().unwrap();
    let here = home.path();
    let train: toml::Table = toml::from_str(&ok(&hyperdas(here, here, &["train", "--show-config", "--set", "train.lr=0.0005"]), "train --show-config").0).unwrap();
    assert_eq!(train["train"]["lr"].as_float(), Some(0.0005));
    let (out, _) = ok(&hyperdas(here, here, &["sweep", "--show-config", "--methods", "mdas,das", "--grid", "interpreter.rank=2,4", "--set", "train.epochs=3"]), "sweep --show-config");
    let docs: Vec<toml::Table> = out.split("# run ").skip(1).map(|d| toml::from_str(d.split_once('\n').unwrap().1).unwrap()).collect();
    assert_eq!(docs.len(), 4, "{out}");
    assert!(docs.iter().all(|d| d["train"]["epochs"].as_integer() == Some(3)));
    let ranks: Vec<i64> = docs.iter().map(|d| d["interpreter"]["rank"].as_integer().unwrap()).collect();
    assert_eq!(ranks, [2, 4, 2, 4]);
}
