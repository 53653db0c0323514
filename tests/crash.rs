//! Crash safety: a training process killed with SIGKILL mid-run and restarted with `--resume`
//! ends with the same weights, optimizer state, metrics and results as an uninterrupted run,
//! having lost at most one checkpoint interval of work.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn strip_volatile(metrics: &str) -> Vec<serde_json::Value> {
    metrics
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            // Wall time and the cache's hit rate depend on when the process started.
            v.as_object_mut().unwrap().remove("seconds");
            v.as_object_mut().unwrap().remove("state_cache_hit_rate");
            v
        })
        .collect()
}

/// A cache home with the tiny toy model, and a work directory with its city Country data
/// (`data/city_country_{train,test}.jsonl`, 24 causal + 4 isolate rows per split).
fn tiny_world() -> (tempfile::TempDir, tempfile::TempDir, std::path::PathBuf) {
    let home = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let cmd = |args: &[&str]| Command::new(env!("CARGO_BIN_EXE_hyperdas")).args(args).env("RAYON_NUM_THREADS", "1").env("HYPERDAS_HOME", home.path()).output().expect("runs");
    let o = cmd(&["toy", "--tiny", "--quiet"]);
    assert!(o.status.success());
    let toy = String::from_utf8_lossy(&o.stdout).lines().find_map(|l| l.strip_prefix("use it: --model ").map(|s| s.trim().to_string())).unwrap();
    let data = work.path().join("data");
    let o = cmd(&["data", "build", "--kb-dir", &format!("{toy}/ravel"), "-m", &toy, "--causal", "24", "--isolate", "4", "--out", data.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (home, work, data)
}

#[test]
fn a_killed_training_resumes_to_the_uninterrupted_result() {
    let (home, work, data) = tiny_world();
    let bin = env!("CARGO_BIN_EXE_hyperdas");
    let cmd = |args: &[String]| Command::new(bin).args(args).env("RAYON_NUM_THREADS", "1").env("HYPERDAS_HOME", home.path()).output().expect("runs");
    const EVERY: u64 = 5;
    let args = |out: &std::path::Path, resume: bool| -> Vec<String> {
        let mut v: Vec<String> = vec!["train".into(), "--quiet".into(), "--out".into(), out.display().to_string()];
        for s in [
            format!("data.train={}", data.join("city_country_train.jsonl").display()),
            format!("data.test={}", data.join("city_country_test.jsonl").display()),
            "model.path=toy:tiny".into(),
            "train.epochs=40".into(),
            "train.batch_size=4".into(),
            "train.eval_every=50".into(),
            format!("train.checkpoint_every={EVERY}"),
            "interpreter.num_blocks=1".into(),
            "interpreter.layer=0".into(),
            "interpreter.rank=4".into(),
        ] {
            v.extend(["--set".into(), s]);
        }
        if resume {
            v.push("--resume".into());
        }
        v
    };
    let straight = work.path().join("straight");
    let o = cmd(&args(&straight, false));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Kill the second run with SIGKILL once it has written a few checkpoints.
    let killed = work.path().join("killed");
    let mut child = Command::new(bin).args(args(&killed, false)).env("RAYON_NUM_THREADS", "1").env("HYPERDAS_HOME", home.path()).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let state = killed.join("checkpoint/state.json");
    let t0 = Instant::now();
    let at_kill = loop {
        if let Ok(text) = std::fs::read_to_string(&state)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && v["step"].as_u64().unwrap_or(0) >= 3 * EVERY
        {
            child.kill().unwrap(); // SIGKILL
            break v["step"].as_u64().unwrap();
        }
        if child.try_wait().unwrap().is_some() {
            panic!("the run finished before it could be killed: make it longer");
        }
        assert!(t0.elapsed() < Duration::from_secs(300), "no checkpoint after 5 minutes");
        std::thread::sleep(Duration::from_millis(5));
    };
    child.wait().unwrap();
    assert!(!killed.join("results.json").exists(), "killed before the end");
    let total = strip_volatile(&std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap()).iter().filter_map(|v| v["step"].as_u64()).max().unwrap();
    assert!(at_kill < total, "killed mid-run (step {at_kill} of {total})");

    // Resume: the checkpoint (or, if the kill hit a checkpoint write, the previous one) is at
    // most one interval behind the last step the killed run logged.
    let logged = strip_volatile(&std::fs::read_to_string(killed.join("metrics.jsonl")).unwrap_or_default()).iter().filter_map(|v| v["step"].as_u64()).max().unwrap_or(0);
    let o = cmd(&args(&killed, true));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let resumed_from = at_kill.max(EVERY);
    assert!(logged < resumed_from + EVERY + 1, "lost at most one checkpoint interval: logged {logged}, checkpoint {resumed_from}");
    for f in ["checkpoint/params.safetensors", "checkpoint/optimizer.safetensors", "results.json", "results.by_attribute.json"] {
        assert_eq!(std::fs::read(straight.join(f)).unwrap(), std::fs::read(killed.join(f)).unwrap(), "{f} equals the uninterrupted run's");
    }
    let a = strip_volatile(&std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap());
    let b = strip_volatile(&std::fs::read_to_string(killed.join("metrics.jsonl")).unwrap());
    assert_eq!(a.len(), b.len(), "one record per step, none repeated after the resume");
    assert_eq!(a, b, "the same metrics, step for step");
}

#[test]
fn a_diverging_run_stops_naming_the_step_or_skips_and_counts_with_skip_nonfinite() {
    let (home, work, data) = tiny_world();
    let bin = env!("CARGO_BIN_EXE_hyperdas");
    let cmd = |args: &[String]| Command::new(bin).args(args).env("RAYON_NUM_THREADS", "1").env("HYPERDAS_HOME", home.path()).output().expect("runs");
    let args = |out: &std::path::Path, skip: bool| -> Vec<String> {
        let mut v: Vec<String> = vec!["train".into(), "--quiet".into(), "--out".into(), out.display().to_string()];
        for s in [
            format!("data.train={}", data.join("city_country_train.jsonl").display()),
            format!("data.test={}", data.join("city_country_test.jsonl").display()),
            "model.path=toy:tiny".into(),
            "train.epochs=1".into(),
            "train.batch_size=8".into(),
            "train.checkpoint_every=1".into(),
            // Absurd rates: the first update sends the weights to ~1e30 and the next loss is NaN.
            "train.lr=1e30".into(),
            "train.rotation_lr=1e30".into(),
            "interpreter.num_blocks=1".into(),
            "interpreter.layer=0".into(),
            "interpreter.rank=4".into(),
            format!("train.skip_nonfinite={skip}"),
        ] {
            v.extend(["--set".into(), s]);
        }
        v
    };
    let stop = work.path().join("stop");
    let o = cmd(&args(&stop, false));
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("became NaN at step 2") && err.contains("skip_nonfinite"), "{err}");
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(stop.join("checkpoint/state.json")).unwrap()).unwrap();
    assert_eq!(state["step"], 1, "the last good checkpoint is kept");
    assert!(!stop.join("results.json").exists());

    let skip = work.path().join("skip");
    let o = cmd(&args(&skip, true));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = std::fs::read_to_string(skip.join("metrics.jsonl")).unwrap();
    let counts: Vec<u64> = metrics.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["skipped_nonfinite"].as_u64()).collect();
    assert!(!counts.is_empty() && counts.windows(2).all(|w| w[1] == w[0] + 1), "skips counted one by one: {counts:?}");
    assert!(skip.join("results.json").is_file());
}

/// Bad run inputs fail before training with the key or file named, exit 1, and leave no run
/// directory behind (so the same command can be rerun once fixed).
#[test]
fn bad_run_inputs_fail_early_name_the_cause_and_leave_nothing() {
    let (home, work, data) = tiny_world();
    let bin = env!("CARGO_BIN_EXE_hyperdas");
    let cmd = |args: &[String]| Command::new(bin).args(args).env("RAYON_NUM_THREADS", "1").env("HYPERDAS_HOME", home.path()).output().expect("runs");
    let empty = work.path().join("empty.jsonl");
    std::fs::write(&empty, "").unwrap();
    let train = data.join("city_country_train.jsonl").display().to_string();
    let test = data.join("city_country_test.jsonl").display().to_string();
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (vec!["train.batch_size=0".into()], vec!["train.batch_size", "at least 1"]),
        (vec!["train.epochs=0".into()], vec!["train.epochs", "at least 1"]),
        (vec!["train.batch_size=-3".into()], vec!["train.batch_size", "-3"]),
        (vec![format!("data.train={}", empty.display())], vec!["empty.jsonl", "has no rows"]),
        (vec!["data.test=/nonexistent/test.jsonl".into()], vec!["/nonexistent/test.jsonl"]),
        (vec!["interpreter.layer=7".into()], vec!["intervention layer 7"]),
        (vec!["interpreter.rank=0".into()], vec!["rank", "got 0"]),
        (vec!["interpreter.subspace=householder".into()], vec!["householder", "reflect_select"]),
        (vec!["interpreter.reflections=0".into()], vec!["interpreter.reflections", "at least 1"]),
        (vec!["interpreter.reflections=5".into()], vec!["interpreter.reflections = 5", "rank k = 4"]),
        (vec!["interpreter.reflections=2".into(), "interpreter.subspace=mask_select".into()], vec!["interpreter.reflections = 2", "reflect_select"]),
        (vec!["interpreter.method=pca".into()], vec!["interpreter.method", "pca"]),
        (vec!["model.path=/nonexistent/model".into()], vec!["/nonexistent/model"]),
        (vec!["train.regularizer=l1".into()], vec!["train.regularizer", "l1"]),
        (vec!["eval.modes=[\"sideways\"]".into()], vec!["sideways"]),
        (vec!["train.lr_decay=sometimes".into()], vec!["lr_decay"]),
        (vec!["train.learning_rate=1".into()], vec!["unknown key `train.learning_rate`"]),
    ];
    for (i, (extra, expect)) in cases.iter().enumerate() {
        let out = work.path().join(format!("run{i}"));
        let mut args: Vec<String> = vec!["train".into(), "--quiet".into(), "--out".into(), out.display().to_string()];
        let mut sets = vec![
            format!("data.train={train}"),
            format!("data.test={test}"),
            "model.path=toy:tiny".into(),
            "interpreter.num_blocks=1".into(),
            "interpreter.layer=0".into(),
            "interpreter.rank=4".into(),
        ];
        sets.extend(extra.iter().cloned());
        for s in sets {
            args.extend(["--set".into(), s]);
        }
        let o = cmd(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{extra:?}: {err}");
        assert!(!err.contains("panicked"), "{extra:?}: {err}");
        for e in expect {
            assert!(err.contains(e), "{extra:?}: expected {e:?} in:\n{err}");
        }
        assert!(!out.exists(), "{extra:?}: no run directory left behind");
    }
}
