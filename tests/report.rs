//! The demo's report in a real browser: headless Chromium loads `report.html` (from a tiny demo
//! run), the page has the expected heatmaps, charts and score rows, nothing fails to load or
//! logs a console error, and a screenshot is taken. Chromium comes from Debian (`chromium`);
//! `.ci/run` installs it and sets `HYPERDAS_REQUIRE_CHROMIUM=1`, so in CI a missing browser
//! fails this test instead of skipping it.

use std::path::{Path, PathBuf};
use std::process::Command;

fn chromium() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("HYPERDAS_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["chromium", "chromium-browser", "google-chrome"].iter().find_map(|name| std::env::var_os("PATH").and_then(|paths| std::env::split_paths(&paths).map(|d| d.join(name)).find(|p| p.is_file())))
}

fn headless(browser: &Path, args: &[&str], page: &Path) -> (String, String) {
    let url = format!("file://{}", page.display());
    let o = Command::new(browser).args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--enable-logging=stderr", "--v=0"]).args(args).arg(&url).output().expect("chromium runs");
    assert!(o.status.success(), "chromium failed: {}", String::from_utf8_lossy(&o.stderr));
    (String::from_utf8_lossy(&o.stdout).to_string(), String::from_utf8_lossy(&o.stderr).to_string())
}

#[test]
fn the_demo_report_renders_in_headless_chromium() {
    let Some(browser) = chromium() else {
        assert!(std::env::var("HYPERDAS_REQUIRE_CHROMIUM").is_err(), "HYPERDAS_REQUIRE_CHROMIUM is set but no chromium was found");
        eprintln!("skipped: no chromium on PATH (apt-get install chromium, or set HYPERDAS_CHROMIUM)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let o = Command::new(env!("CARGO_BIN_EXE_hyperdas")).args(["demo", "--tiny", "--quiet", "--out", out.to_str().unwrap()]).env("RAYON_NUM_THREADS", "1").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let page = out.join("hyperdas/report.html");
    let maps: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(out.join("hyperdas/heatmaps.json")).unwrap()).unwrap();
    // 4 causal + 2 isolate rows in soft mode, the first 2 again in one-to-one mode.
    assert_eq!(maps.len(), 8);

    let (dom, log) = headless(&browser, &["--dump-dom"], &page);
    assert_eq!(dom.matches("<svg class=\"heatmap\"").count(), maps.len(), "heatmaps in the rendered page");
    assert_eq!(dom.matches("<svg class=\"chart\"").count(), 2, "training curves");
    for mode in ["soft", "column_argmax", "bidding_argmax", "global_argmax", "groundtruth"] {
        assert!(dom.contains(&format!("HyperDAS · {mode}</td>")), "score row for {mode}");
    }
    assert!(dom.contains("<td>MDAS</td>"), "the MDAS baseline's row in the comparison");
    for bad in ["Uncaught", "Failed to load resource", ":CONSOLE"] {
        assert!(!log.contains(bad), "browser log has {bad:?}:\n{log}");
    }

    let shot = dir.path().join("report.png");
    headless(&browser, &["--window-size=1200,2400", &format!("--screenshot={}", shot.display())], &page);
    let png = std::fs::read(&shot).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert!(png.len() > 20_000, "a screenshot of a real page, not a blank one ({} bytes)", png.len());
}
