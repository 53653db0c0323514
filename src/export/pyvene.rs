//! Export a trained run for pyvene (`hyperdas export pyvene`, Python `Run.export_pyvene`).
//!
//! **DAS / MDAS** learn one basis `R [D, k]` applied at the last entity token:
//! `h' = h + R Rᵀ (s − h)`. That is pyvene's `LowRankRotatedSpaceIntervention` with
//! `low_rank_dimension = k`, and the directory written here is the one
//! `IntervenableModel.save` writes and `IntervenableModel.load(dir, model)` reads:
//! `config.json` (an `IntervenableConfig`) and `intkey_{key}.bin` (the intervention's
//! `state_dict`, [`super::torch`]). pyvene keeps the rotation behind torch's orthogonal
//! parametrisation, `weight = base · Q(original)` with `base [D, D]` orthogonal; writing
//! `base = [R | R⊥]` (an orthonormal completion) and `original = −I[D, k]` (for which
//! `Q = I[D, k]`) makes pyvene's `rotate_layer.weight` equal `R`.
//!
//! **The layer.** Our `blocks.{l}.hook_resid_pre` (the residual entering block l) is pyvene's
//! `block_output` of layer `l − 1`; layer 0 is pyvene's `block_input` of layer 0.
//!
//! **HyperDAS** chooses positions and a basis per example, which no pyvene intervention
//! holds: `bases.safetensors` has `bases [N, D, k]` (f32, one instruction-conditioned basis
//! per row of a dataset, [`crate::hypernet::interpreter::Interpreter::basis`]) and, for the
//! modules with a shared rotation, `rotation [D, k]`; its metadata names the layer, site, pyvene
//! layer and component, rank, method, subspace, model and each row's instruction and prompts.
//!
//! Every export also writes `hyperdas_export.json`: what was exported and how to use it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde::Serialize;

use super::torch::{Entry, save};
use crate::data::collate::collate;
use crate::data::io::{ReadOptions, read_dataset};
use crate::error::{Error, Result};
use crate::experiment::run::LoadedRun;
use crate::hypernet::subspace::SubspaceKind;

/// pyvene's name of our `resid_pre` layer `l`: `(component, layer)`.
pub fn pyvene_site(l: usize) -> (&'static str, usize) {
    if l == 0 { ("block_input", 0) } else { ("block_output", l - 1) }
}

/// pyvene's key of a single intervention at `(component, layer)` on one position.
pub fn pyvene_key(component: &str, layer: usize) -> String {
    format!("layer_{layer}_comp_{component}_unit_pos_nunit_1#0")
}

/// `hyperdas_export.json`.
#[derive(Serialize)]
struct Manifest<'a> {
    tool: String,
    run: String,
    model: &'a str,
    method: &'a str,
    subspace: &'a str,
    rank: usize,
    /// Our site (`blocks.{l}.hook_resid_pre`).
    site: String,
    pyvene_component: &'a str,
    pyvene_layer: usize,
    files: Vec<String>,
    usage: String,
}

/// Orthonormal columns `[R | R⊥]` (`D × D`, row-major) completing `r` (`D × k`, row-major,
/// orthonormal columns) by Gram–Schmidt over the standard basis, in f64.
pub fn complete_basis(r: &[f32], d: usize, k: usize) -> Result<Vec<f32>> {
    let mut cols: Vec<Vec<f64>> = (0..k).map(|j| (0..d).map(|i| r[i * k + j] as f64).collect()).collect();
    for (j, c) in cols.iter().enumerate() {
        let n = c.iter().map(|x| x * x).sum::<f64>().sqrt();
        if (n - 1.0).abs() > 1e-3 {
            return Err(Error::invalid(format!("the rotation's column {j} has norm {n:.4}, not 1: it is not orthonormal")));
        }
    }
    for e in 0..d {
        if cols.len() == d {
            break;
        }
        let mut v: Vec<f64> = (0..d).map(|i| if i == e { 1.0 } else { 0.0 }).collect();
        for _ in 0..2 {
            // twice: re-orthogonalisation keeps the completion orthonormal to f64 rounding
            for c in &cols {
                let dot: f64 = v.iter().zip(c).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(c).for_each(|(a, b)| *a -= dot * b);
            }
        }
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if n > 1e-6 {
            cols.push(v.into_iter().map(|x| x / n).collect());
        }
    }
    if cols.len() != d {
        return Err(Error::invalid(format!("could not complete a {d}×{k} basis (rank {} reached)", cols.len())));
    }
    Ok((0..d * d).map(|idx| cols[idx % d][idx / d] as f32).collect())
}

/// Export `run` (loaded from `run_dir`) into `out`. For HyperDAS, the bases are computed for the
/// rows of `data` (default: the run's test set), at most `limit` (0: all). Returns the files.
pub fn export(run: &LoadedRun, run_dir: &Path, out: &Path, data: Option<&Path>, limit: usize) -> Result<Vec<PathBuf>> {
    let cfg = &run.config;
    let model = &run.lm.model;
    let l = cfg.interpreter.resolved_layer(model.num_layers())?;
    let (component, pl) = pyvene_site(l);
    let interp = &run.interpreter;
    let method = interp.method();
    let sub = interp.subspace.kind;
    std::fs::create_dir_all(out).map_err(|e| Error::file(out, format!("cannot create: {e}")))?;
    let mut files = Vec::new();
    let rank;
    let usage;
    if method.is_baseline() {
        let r = interp.subspace.rotation()?.to_dtype(DType::F32)?; // [D, k]
        let (d, k) = r.dims2()?;
        rank = k;
        let rv: Vec<f32> = r.flatten_all()?.to_vec1()?;
        let base = complete_basis(&rv, d, k)?; // [D, D]
        let neg_eye: Vec<f32> = (0..d * k).map(|i| if i / k == i % k { -1.0 } else { 0.0 }).collect(); // [D, k]
        let key = pyvene_key(component, pl);
        let bin = out.join(format!("intkey_{key}.bin"));
        let entries = [
            Entry::i64_scalar("embed_dim", d as i64),
            Entry::i64_scalar("interchange_dim", d as i64),
            Entry::f32("rotate_layer.parametrizations.weight.original", &[d, k], neg_eye),
            Entry::f32("rotate_layer.parametrizations.weight.0.base", &[d, d], base),
        ];
        save(&bin, &format!("intkey_{key}"), &entries)?;
        let config = serde_json::json!({
            "intervention_constant_sources": [false],
            "intervention_dimensions": [d],
            "intervention_types": ["<class 'pyvene.models.interventions.LowRankRotatedSpaceIntervention'>"],
            "mode": "parallel",
            "representations": [[pl, component, "pos", 1, k, null, null, null, null, null, null, null, null, null]],
            "sorted_keys": [key],
        });
        let cp = out.join("config.json");
        crate::atomic::write_text(&cp, &serde_json::to_string_pretty(&config).map_err(|e| Error::invalid(e.to_string()))?)?;
        files.extend([cp, bin]);
        usage = format!(
            "pyvene.IntervenableModel.load(DIR, model) gives a LowRankRotatedSpaceIntervention at {component} layer {pl} (= our blocks.{l}.hook_resid_pre); \
             intervene at the last token of the base entity with the last token of the source entity (unit_locations), as {} was trained",
            method.label()
        );
    } else {
        if sub == SubspaceKind::None {
            return Err(Error::invalid("this run's subspace is `none`: it intervenes on the whole residual and has no basis to export"));
        }
        let data = crate::experiment::run::data_or_test_set(run_dir, data)?;
        let ds = read_dataset(&data, ReadOptions::default())?;
        let rows: Vec<_> = if limit > 0 { ds.rows.into_iter().take(limit).collect() } else { ds.rows };
        let enc = crate::data::collate::encode_rows(&run.lm.tokenizer, &rows, &cfg.data.collate_options(false), &data.display().to_string())?;
        let pad = run.lm.tokenizer.padding_id();
        let mut parts = Vec::new();
        for chunk in enc.rows.chunks(cfg.eval.batch_size.max(1)) {
            let refs: Vec<_> = chunk.iter().collect();
            parts.push(interp.basis(model, &collate(&refs, pad))?.to_dtype(DType::F32)?); // [b, D, k]
        }
        let bases = Tensor::cat(&parts, 0)?; // [N, D, k]
        let (n, d, k) = bases.dims3()?;
        rank = k;
        let described: Vec<serde_json::Value> =
            rows.iter().map(|r| serde_json::json!({"instruction": r.edit_instruction, "base": format!("{}{}", r.input_prefix, r.input_suffix), "source": format!("{}{}", r.counterfactual_input_prefix, r.counterfactual_input_suffix)})).collect();
        let meta = HashMap::from([
            ("layer".to_string(), l.to_string()),
            ("site".to_string(), format!("blocks.{l}.hook_resid_pre")),
            ("pyvene_component".to_string(), component.to_string()),
            ("pyvene_layer".to_string(), pl.to_string()),
            ("rank".to_string(), k.to_string()),
            ("method".to_string(), method.name().to_string()),
            ("subspace".to_string(), sub.name().to_string()),
            ("model".to_string(), cfg.model.path.clone()),
            ("data".to_string(), data.display().to_string()),
            ("rows".to_string(), serde_json::to_string(&described).map_err(|e| Error::invalid(e.to_string()))?),
        ]);
        let bytes = |t: &Tensor| -> Result<Vec<u8>> { Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect()) };
        let b = bytes(&bases)?;
        let mut tensors = vec![("bases".to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n, d, k], &b).map_err(|e| Error::invalid(e.to_string()))?)];
        let rb;
        if sub != SubspaceKind::Boundless {
            rb = bytes(&interp.subspace.rotation()?.to_dtype(DType::F32)?)?;
            tensors.push(("rotation".to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![d, k], &rb).map_err(|e| Error::invalid(e.to_string()))?));
        }
        let p = out.join("bases.safetensors");
        safetensors::serialize_to_file(tensors, Some(meta), &p).map_err(|e| Error::file(&p, format!("cannot write: {e}")))?;
        files.push(p);
        usage = format!(
            "bases[i] [D, k] is the basis row i of {} intervenes in at blocks.{l}.hook_resid_pre (pyvene {component} layer {pl}): h' = h + B Bᵀ (m − h) at the positions HyperDAS chooses (`hyperdas eval` writes them to eval/*.positions.jsonl)",
            data.display()
        );
    }
    let manifest = Manifest {
        tool: format!("hyperdas {} export pyvene", env!("CARGO_PKG_VERSION")),
        run: run_dir.display().to_string(),
        model: &cfg.model.path,
        method: method.name(),
        subspace: sub.name(),
        rank,
        site: format!("blocks.{l}.hook_resid_pre"),
        pyvene_component: component,
        pyvene_layer: pl,
        files: files.iter().map(|f| f.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()).collect(),
        usage,
    };
    let mp = out.join("hyperdas_export.json");
    crate::atomic::write_text(&mp, &serde_json::to_string_pretty(&manifest).map_err(|e| Error::invalid(e.to_string()))?)?;
    files.push(mp);
    Ok(files)
}
