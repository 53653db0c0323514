//! The import graph of `src/`: every `crate::` path must point down the declared layer order,
//! and no two files import each other through a cycle. Run alone with
//! `cargo test --test architecture`; docs/architecture.md shows the layers.
//!
//! How it reads the code: comments are stripped, then every `crate::a::b…` path (including the
//! brace groups of `use crate::{…}` and `use super::{…}`) is resolved to the deepest module that
//! exists as a file. A unit-test module at the end of a file (`#[cfg(test)] mod tests`) is not
//! read: tests may reach anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The top-level modules, lowest first. A module may import only modules before it.
const LAYERS: &[&str] = &[
    "error",
    // utilities
    "rng",
    "alloc",
    "profile",
    "progress",
    "threads",
    "atomic",
    // configuration, parameters, downloads
    "config",
    "params",
    "fetch",
    // the target model and the interventions (pure functions of tensors)
    "model",
    "intervention",
    // data and parity checks, which use the model's tokenizer and runtime
    "data",
    "parity",
    // generic training machinery, and the method
    "train",
    "hypernet",
    // the toy world (uses train for its pre-training)
    "toy",
    // runs, training loops, the objective, sweeps
    "experiment",
    // pages and tables over finished runs
    "report",
    // finished runs in other tools' formats (pyvene, torch)
    "export",
    // the command line
    "cli",
];

/// `src/a/b.rs` → `["a", "b"]`, `src/a/mod.rs` → `["a"]`.
fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel.components().map(|c| c.as_os_str().to_string_lossy().into_owned()).collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The text without comments, strings' contents kept (paths do not occur in our strings), and
/// without a trailing `#[cfg(test)] mod tests { … }`.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut out = String::new();
    let mut in_block = 0usize;
    for line in text.lines() {
        let mut l = line;
        if in_block > 0 {
            match l.find("*/") {
                Some(i) => {
                    in_block -= 1;
                    l = &l[i + 2..];
                }
                None => continue,
            }
        }
        if let Some(i) = l.find("/*") {
            if !l[i..].contains("*/") {
                in_block += 1;
            }
            l = &l[..i];
        }
        let l = match l.find("//") {
            Some(i) => &l[..i],
            None => l,
        };
        out.push_str(l);
        out.push('\n');
    }
    out
}

fn ident_end(s: &str) -> usize {
    s.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(s.len())
}

/// Expand the path starting at `s` (just after `crate::` or `super::`) into full paths: `a::b`
/// gives `[["a","b"]]`; `{a::b, c}` gives `[["a","b"], ["c"]]`.
fn paths_at(s: &str) -> Vec<Vec<String>> {
    let s = s.trim_start();
    if let Some(rest) = s.strip_prefix('{') {
        // The brace group, split at top-level commas.
        let mut depth = 1;
        let mut end = rest.len();
        for (i, c) in rest.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = i;
                        break;
                    }
                }
                _ => {}
            }
        }
        let group = &rest[..end];
        let mut items = Vec::new();
        let (mut depth, mut start) = (0, 0);
        for (i, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' => depth -= 1,
                ',' if depth == 0 => {
                    items.push(&group[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        items.push(&group[start..]);
        return items.into_iter().filter(|x| !x.trim().is_empty()).flat_map(paths_at).collect();
    }
    let n = ident_end(s);
    if n == 0 {
        return vec![Vec::new()]; // `*` or `self`
    }
    let head = s[..n].to_string();
    let rest = &s[n..];
    match rest.trim_start().strip_prefix("::") {
        Some(r) => paths_at(r)
            .into_iter()
            .map(|mut p| {
                p.insert(0, head.clone());
                p
            })
            .collect(),
        None => vec![vec![head]],
    }
}

/// Every module path `file` refers to (absolute, from the crate root).
fn references(module: &[String], code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    // `super` of a file `a/b.rs` is `a`; of `a/b/mod.rs` (module a::b) it is `a` too.
    let parent = module[..module.len().saturating_sub(1)].to_vec();
    for (prefix, base) in [("crate::", Vec::new()), ("super::", parent)] {
        let mut from = 0;
        while let Some(i) = code[from..].find(prefix) {
            let at = from + i;
            from = at + prefix.len();
            // `hyperdas::crate::` does not occur; skip `xsuper::`-like identifiers.
            if at > 0 && code[..at].chars().last().is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            for p in paths_at(&code[from..]) {
                let mut full = base.clone();
                full.extend(p.into_iter().filter(|x| x != "self"));
                out.push(full);
            }
        }
    }
    out
}

#[test]
fn imports_point_down_and_files_form_no_cycle() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let modules: BTreeSet<Vec<String>> = files.iter().map(|f| module_of(&src, f)).collect();
    let rank = |m: &str| LAYERS.iter().position(|l| *l == m);

    let mut upward = Vec::new();
    let mut edges: BTreeMap<Vec<String>, BTreeSet<Vec<String>>> = BTreeMap::new();
    for f in &files {
        let module = module_of(&src, f);
        if module.is_empty() || module == ["main"] || module == ["lib"] {
            continue; // the crate root declares the modules; main.rs calls cli
        }
        let top = &module[0];
        let Some(r) = rank(top) else {
            panic!("{}: module `{top}` is not in the layer list of tests/architecture.rs; add it where it belongs", f.display());
        };
        let text = std::fs::read_to_string(f).unwrap();
        for path in references(&module, &code_of(&text)) {
            let Some(first) = path.first() else { continue };
            let Some(tr) = rank(first) else { continue }; // a crate or item path, not a module
            if first != top && tr > r {
                upward.push(format!("{} uses crate::{} ({first} is above {top})", f.display(), path.join("::")));
            }
            // The deepest module the path names.
            let mut target = path.clone();
            while !target.is_empty() && !modules.contains(&target) {
                target.pop();
            }
            // A file's own ancestors (its folder's mod.rs facade) are not edges.
            if target.is_empty() || module.starts_with(&target) {
                continue;
            }
            edges.entry(module.clone()).or_default().insert(target);
        }
    }
    assert!(upward.is_empty(), "imports that point up the layer order:\n{}", upward.join("\n"));

    // Cycles among files: depth-first search with colours.
    fn visit(n: &Vec<String>, edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>, colour: &mut BTreeMap<Vec<String>, u8>, stack: &mut Vec<Vec<String>>, cycles: &mut Vec<String>) {
        colour.insert(n.clone(), 1);
        stack.push(n.clone());
        for m in edges.get(n).into_iter().flatten() {
            match colour.get(m).copied().unwrap_or(0) {
                0 => visit(m, edges, colour, stack, cycles),
                1 => {
                    let i = stack.iter().position(|x| x == m).unwrap();
                    let cyc: Vec<String> = stack[i..].iter().chain([m]).map(|x| x.join("::")).collect();
                    cycles.push(cyc.join(" -> "));
                }
                _ => {}
            }
        }
        stack.pop();
        colour.insert(n.clone(), 2);
    }
    let mut colour = BTreeMap::new();
    let mut cycles = Vec::new();
    for n in edges.keys() {
        if colour.get(n).copied().unwrap_or(0) == 0 {
            visit(n, &edges, &mut colour, &mut Vec::new(), &mut cycles);
        }
    }
    assert!(cycles.is_empty(), "import cycles between files:\n{}", cycles.join("\n"));
}

/// The checker finds what it should: an upward path, a brace group, and a cycle.
#[test]
fn the_checker_reads_paths() {
    assert_eq!(paths_at("a::b::C;"), vec![vec!["a", "b", "C"]]);
    assert_eq!(paths_at("{a::{B, c::D}, e};"), vec![vec!["a", "B"], vec!["a", "c", "D"], vec!["e"]]);
    let m = vec!["toy".to_string(), "plant".to_string()];
    let code = code_of("use super::world::World; // crate::cli\nuse crate::{error::Result, model::Llama};\n#[cfg(test)]\nmod tests { use crate::cli; }");
    let refs = references(&m, &code);
    assert_eq!(refs, vec![vec!["error", "Result"], vec!["model", "Llama"], vec!["toy", "world", "World"]]);
}
