//! Records the git commit the tool is built from (`HYPERDAS_GIT_COMMIT`, `-dirty` when tracked
//! files differ from it), for each run's `run.json`. Outside a git checkout (a source archive)
//! nothing is recorded and run.json says `null`.

use std::path::Path;
use std::process::Command;

fn main() {
    // A new commit, a checkout or an edit of the sources can change the answer.
    for p in [".git/HEAD", ".git/logs/HEAD", ".git/index", "src"] {
        if Path::new(p).exists() {
            println!("cargo:rerun-if-changed={p}");
        }
    }
    let git = |args: &[&str]| Command::new("git").args(args).output().ok().filter(|o| o.status.success()).map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if let Some(commit) = git(&["rev-parse", "HEAD"]).filter(|c| !c.is_empty()) {
        let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
        println!("cargo:rustc-env=HYPERDAS_GIT_COMMIT={commit}{}", if dirty { "-dirty" } else { "" });
    }
}
