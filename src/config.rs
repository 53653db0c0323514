//! Run configuration files: TOML with documented defaults, `--set key=value` overrides, and
//! unknown keys as errors. Every run writes the resolved configuration
//! (`config.resolved.toml`) into its directory, so it can be rerun exactly.
//!
//! Resolution order: the type's `Default` → the TOML file → `--set` overrides (dotted keys,
//! `train.lr=1e-4`; values are TOML literals, bare words are strings). A key that the type does
//! not have is an error naming the key, the file, and the valid keys at that level. A value of
//! the wrong type is an error naming the key.
//!
//! Config types avoid `Option` fields, since an absent default would make its key "unknown".
//! Use an explicit value (0, "", "none") with its meaning documented.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;
use toml::{Table, Value};

use crate::error::{Error, Result};

/// Load a configuration: defaults, then `file` (if any), then `sets`.
pub fn load<T: Serialize + DeserializeOwned + Default>(file: Option<&Path>, sets: &[String]) -> Result<T> {
    load_over(&T::default(), file, sets)
}

/// [`load`] starting from `base` instead of the type's `Default` (e.g. a preset).
pub fn load_over<T: Serialize + DeserializeOwned>(base: &T, file: Option<&Path>, sets: &[String]) -> Result<T> {
    let user = match file {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, format!("cannot read: {e}")))?;
            let user: Table = toml::from_str(&text).map_err(|e| Error::file(path, format!("not valid TOML: {e}")))?;
            Some((user, path.display().to_string()))
        }
        None => None,
    };
    resolve(to_table(base)?, user, sets)
}

/// [`load`] from TOML text instead of a file (an embedded preset such as `configs/toy.toml`);
/// `name` stands for the file in error messages.
pub fn load_text<T: Serialize + DeserializeOwned + Default>(text: &str, name: &str, sets: &[String]) -> Result<T> {
    let user: Table = toml::from_str(text).map_err(|e| Error::invalid(format!("{name}: not valid TOML: {e}")))?;
    resolve(to_table(&T::default())?, Some((user, name.to_string())), sets)
}

/// [`load_over`] with the user's settings as a table (a notebook's dict) named `name` in errors.
/// Top-level dotted keys (`"train.lr"`) are set like `--set` keys.
pub fn load_table_over<T: Serialize + DeserializeOwned>(base: &T, user: Table, name: &str, sets: &[String]) -> Result<T> {
    let mut nested = Table::new();
    let mut all_sets = Vec::new();
    for (k, v) in user {
        if k.contains('.') {
            all_sets.push(format!("{k}={v}")); // a TOML literal, read back by `parse_value`
        } else {
            nested.insert(k, v);
        }
    }
    all_sets.extend_from_slice(sets);
    resolve(to_table(base)?, Some((nested, name.to_string())), &all_sets)
}

/// `table` (the defaults or a preset), then the `user` table from `source`, then `sets`.
fn resolve<T: DeserializeOwned>(mut table: Table, user: Option<(Table, String)>, sets: &[String]) -> Result<T> {
    let source = match user {
        Some((user, source)) => {
            merge(&mut table, user, "", &source)?;
            source
        }
        None => "the defaults".into(),
    };
    for s in sets {
        let (key, raw) = s.split_once('=').ok_or_else(|| Error::invalid(format!("--set {s:?}: expected KEY=VALUE, e.g. train.lr=1e-4")))?;
        set(&mut table, key.trim(), parse_value(raw.trim()))?;
    }
    Value::Table(table).try_into().map_err(|e: toml::de::Error| Error::invalid(format!("configuration ({source} + --set): {e}")))
}

/// Write `cfg` as TOML (the resolved configuration of a run).
pub fn write_resolved<T: Serialize>(cfg: &T, path: &Path) -> Result<()> {
    let text = toml::to_string_pretty(cfg).map_err(|e| Error::invalid(format!("cannot serialise the configuration: {e}")))?;
    std::fs::write(path, text).map_err(|e| Error::file(path, format!("cannot write: {e}")))
}

fn to_table<T: Serialize>(v: &T) -> Result<Table> {
    match Value::try_from(v).map_err(|e| Error::invalid(format!("configuration defaults: {e}")))? {
        Value::Table(t) => Ok(t),
        _ => Err(Error::invalid("a configuration must be a table")),
    }
}

/// A TOML literal (`3`, `1e-4`, `true`, `"x"`, `[1, 2]`), else the raw text as a string.
fn parse_value(raw: &str) -> Value {
    toml::from_str::<Table>(&format!("v = {raw}")).ok().and_then(|mut t| t.remove("v")).unwrap_or_else(|| Value::String(raw.to_string()))
}

fn valid_keys(t: &Table) -> String {
    let mut keys: Vec<&String> = t.keys().collect();
    keys.sort(); // alphabetical, whatever order the table keeps
    keys.into_iter().cloned().collect::<Vec<_>>().join(", ")
}

/// Merge `user` into `base`, rejecting keys `base` does not have.
fn merge(base: &mut Table, user: Table, prefix: &str, source: &str) -> Result<()> {
    for (k, v) in user {
        let full = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        let valid = valid_keys(base);
        match base.get_mut(&k) {
            None => {
                let at = if prefix.is_empty() { "the top level".to_string() } else { format!("[{prefix}]") };
                return Err(Error::invalid(format!("{source}: unknown key `{full}`; valid keys at {at}: {valid}")));
            }
            Some(Value::Table(inner)) => match v {
                Value::Table(u) => merge(inner, u, &full, source)?,
                other => return Err(Error::invalid(format!("{source}: `{full}` must be a table ([{full}]), got {other}"))),
            },
            Some(slot) => *slot = v,
        }
    }
    Ok(())
}

/// Set a dotted key that must already exist.
fn set(table: &mut Table, key: &str, value: Value) -> Result<()> {
    let parts: Vec<&str> = key.split('.').collect();
    set_path(table, &parts, 0, key, value)
}

fn set_path(table: &mut Table, parts: &[&str], depth: usize, key: &str, value: Value) -> Result<()> {
    let here = parts[..=depth].join(".");
    let valid = valid_keys(table);
    let Some(slot) = table.get_mut(parts[depth]) else {
        return Err(Error::invalid(format!("--set {key}: unknown key `{here}`; valid keys there: {valid}")));
    };
    if depth + 1 == parts.len() {
        if slot.is_table() {
            return Err(Error::invalid(format!("--set {key}: `{here}` is a section; set one of its keys ({here}.<key>)")));
        }
        *slot = value;
        return Ok(());
    }
    match slot {
        Value::Table(inner) => set_path(inner, parts, depth + 1, key, value),
        _ => Err(Error::invalid(format!("--set {key}: `{here}` is not a section"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Train {
        lr: f64,
        steps: usize,
        mode: String,
    }
    impl Default for Train {
        fn default() -> Self {
            Train { lr: 1e-3, steps: 10, mode: "soft".into() }
        }
    }
    #[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Run {
        seed: u64,
        train: Train,
    }

    fn file(text: &str) -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("run.toml");
        std::fs::write(&p, text).unwrap();
        (d, p)
    }

    #[test]
    fn defaults_file_and_overrides_resolve_in_order() {
        let (_d, p) = file("seed = 3\n[train]\nlr = 0.5\n");
        let r: Run = load(Some(&p), &["train.steps=7".into(), "train.mode=one-to-one".into()]).unwrap();
        assert_eq!(r, Run { seed: 3, train: Train { lr: 0.5, steps: 7, mode: "one-to-one".into() } });
        let r: Run = load(None, &[]).unwrap();
        assert_eq!(r, Run::default());
        // Round trip through the resolved file.
        let (_d2, out) = file("");
        write_resolved(&r, &out).unwrap();
        assert_eq!(load::<Run>(Some(&out), &[]).unwrap(), r);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_named() {
        let (_d, p) = file("[train]\nlearning_rate = 0.5\n");
        let e = load::<Run>(Some(&p), &[]).unwrap_err().to_string();
        assert!(e.contains("run.toml") && e.contains("unknown key `train.learning_rate`") && e.contains("lr, mode, steps"), "{e}");
        let e = load::<Run>(None, &["train.lrr=1".into()]).unwrap_err().to_string();
        assert!(e.contains("unknown key `train.lrr`"), "{e}");
        let e = load::<Run>(None, &["train.steps=many".into()]).unwrap_err().to_string();
        assert!(e.contains("steps"), "{e}");
        let e = load::<Run>(None, &["train=3".into()]).unwrap_err().to_string();
        assert!(e.contains("is a section"), "{e}");
        let e = load::<Run>(None, &["seed".into()]).unwrap_err().to_string();
        assert!(e.contains("KEY=VALUE"), "{e}");
        let (_d, p) = file("seed = \n");
        let e = load::<Run>(Some(&p), &[]).unwrap_err().to_string();
        assert!(e.contains("not valid TOML"), "{e}");
    }
}
