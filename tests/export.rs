//! `hyperdas export pyvene` and the torch state-dict writer: read back with candle's own
//! (independent) PyTorch pickle reader; the rotation pyvene would rebuild equals ours.

mod common;

use std::path::Path;

use candle_core::{DType, Tensor};
use hyperdas::experiment::run::{RunConfig, load_run, run};
use hyperdas::export::pyvene::{complete_basis, export, pyvene_site};
use hyperdas::export::torch::{Entry, save};
use hyperdas::hypernet::interpreter::Method;

#[test]
fn a_torch_state_dict_reads_back_with_candles_pickle_reader() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("intkey_x#0.bin");
    let big: Vec<f32> = (0..70_000).map(|i| i as f32 * 0.5).collect(); // a BININT-sized numel
    save(&p, "intkey_x#0", &[Entry::i64_scalar("embed_dim", 576), Entry::f32("w", &[3, 2], vec![1.0, -2.0, 3.5, 4.0, 5.0, 6.25]), Entry::f32("big", &[70_000], big.clone())]).unwrap();
    let mut got = candle_core::pickle::read_all(&p).unwrap();
    let order = ["embed_dim", "w", "big"];
    got.sort_by_key(|(n, _)| order.iter().position(|o| o == n)); // candle lists them in its own order
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, order);
    assert_eq!(got[0].1.dtype(), DType::I64);
    assert_eq!(got[0].1.to_scalar::<i64>().unwrap(), 576);
    assert_eq!(got[1].1.dims(), [3, 2]);
    assert_eq!(got[1].1.to_vec2::<f32>().unwrap(), [[1.0, -2.0], [3.5, 4.0], [5.0, 6.25]]);
    assert_eq!(got[2].1.to_vec1::<f32>().unwrap(), big);
    // A shape that does not hold its values is refused before anything is written.
    let bad = dir.path().join("bad.bin");
    assert!(save(&bad, "bad", &[Entry::f32("w", &[2, 2], vec![1.0])]).unwrap_err().to_string().contains("`w`"));
    assert!(!bad.exists());
}

#[test]
fn the_completed_basis_is_orthogonal_and_starts_with_the_rotation() {
    let (d, k) = (12, 3);
    // An orthonormal R from a QR of a fixed matrix (Gram–Schmidt here, f64).
    let mut cols: Vec<Vec<f64>> = Vec::new();
    for j in 0..k {
        let mut v: Vec<f64> = (0..d).map(|i| ((i * 7 + j * 3) % 5) as f64 - 2.0 + 0.1 * j as f64).collect();
        for c in &cols {
            let dot: f64 = v.iter().zip(c).map(|(a, b)| a * b).sum();
            v.iter_mut().zip(c).for_each(|(a, b)| *a -= dot * b);
        }
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        cols.push(v.into_iter().map(|x| x / n).collect());
    }
    let r: Vec<f32> = (0..d * k).map(|i| cols[i % k][i / k] as f32).collect();
    let full = complete_basis(&r, d, k).unwrap();
    let q = Tensor::from_vec(full.clone(), (d, d), &candle_core::Device::Cpu).unwrap();
    let qtq = q.t().unwrap().matmul(&q).unwrap();
    let eye = Tensor::eye(d, DType::F32, &candle_core::Device::Cpu).unwrap();
    assert!(common::max_abs_diff(&qtq, &eye) < 1e-5);
    for i in 0..d {
        for j in 0..k {
            assert!((full[i * d + j] - r[i * k + j]).abs() < 1e-6);
        }
    }
    let not_orthonormal = vec![2.0f32; d * k];
    assert!(complete_basis(&not_orthonormal, d, k).unwrap_err().to_string().contains("not orthonormal"));
    assert_eq!(pyvene_site(0), ("block_input", 0));
    assert_eq!(pyvene_site(15), ("block_output", 14));
}

/// A few steps of `method` on the tiny Llama fixture and the RAVEL fixture rows.
fn tiny_run(dir: &Path, method: Method) -> std::path::PathBuf {
    let data = common::fixture("ravel/city_country_test.jsonl");
    let sets = [
        format!("model.path={}", common::fixture("tiny-llama").display()),
        format!("data.train={}", data.display()),
        format!("data.test={}", data.display()),
        "train.epochs=1".into(),
        "train.batch_size=16".into(),
        "interpreter.layer=1".into(),
        "interpreter.rank=4".into(),
        "interpreter.num_blocks=1".into(),
        r#"eval.modes=["soft"]"#.into(),
    ];
    let cfg: RunConfig = hyperdas::config::load_over(&RunConfig::preset(method), None, &sets).unwrap();
    let out = dir.join(method.name());
    run(&cfg, &out, false, false).unwrap().unwrap();
    out
}

#[test]
fn an_mdas_run_exports_to_pyvenes_layout_and_its_rotation_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let out = tiny_run(dir.path(), Method::Mdas);
    let loaded = load_run(&out, false).unwrap();
    let exp = dir.path().join("pyvene");
    let files = export(&loaded, &out, &exp, None, 0).unwrap();
    let key = "layer_0_comp_block_output_unit_pos_nunit_1#0"; // our resid_pre 1 = pyvene block_output 0
    assert!(files.iter().any(|f| f.ends_with(format!("intkey_{key}.bin"))), "{files:?}");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(exp.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["sorted_keys"][0], key);
    assert_eq!(config["representations"][0][0], 0);
    assert_eq!(config["representations"][0][1], "block_output");
    assert_eq!(config["representations"][0][4], 4);
    assert_eq!(config["intervention_types"][0], "<class 'pyvene.models.interventions.LowRankRotatedSpaceIntervention'>");
    let sd = candle_core::pickle::read_all(exp.join(format!("intkey_{key}.bin"))).unwrap();
    let get = |n: &str| sd.iter().find(|(k, _)| k == n).map(|(_, t)| t.clone()).unwrap_or_else(|| panic!("{n} missing"));
    let base = get("rotate_layer.parametrizations.weight.0.base"); // [D, D]
    let original = get("rotate_layer.parametrizations.weight.original"); // [D, k]
    let d = loaded.lm.model.hidden_size();
    assert_eq!((base.dims(), original.dims()), (&[d, d][..], &[d, 4][..]));
    assert_eq!(get("embed_dim").to_scalar::<i64>().unwrap(), d as i64);
    // pyvene's weight: base · householder(original) = base[:, :k] for original = −I; it must be R.
    let r = loaded.interpreter.subspace.rotation().unwrap().to_dtype(DType::F32).unwrap();
    assert!(common::max_abs_diff(&base.narrow(1, 0, 4).unwrap(), &r) < 1e-6);
    let manifest: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(exp.join("hyperdas_export.json")).unwrap()).unwrap();
    assert_eq!((manifest["method"].as_str(), manifest["pyvene_layer"].as_u64(), manifest["site"].as_str()), (Some("mdas"), Some(0), Some("blocks.1.hook_resid_pre")));
}

#[test]
fn a_hyperdas_run_exports_one_orthonormal_instruction_conditioned_basis_per_row() {
    let dir = tempfile::tempdir().unwrap();
    let out = tiny_run(dir.path(), Method::HyperDas);
    let loaded = load_run(&out, false).unwrap();
    let exp = dir.path().join("bases");
    export(&loaded, &out, &exp, None, 10).unwrap();
    let bytes = std::fs::read(exp.join("bases.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let b = st.tensor("bases").unwrap();
    let d = loaded.lm.model.hidden_size();
    assert_eq!(b.shape(), [10, d, 4]);
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!((meta["layer"].as_str(), meta["pyvene_layer"].as_str(), meta["rank"].as_str(), meta["subspace"].as_str()), ("1", "0", "4", "reflect_select"));
    let rows: Vec<serde_json::Value> = serde_json::from_str(&meta["rows"]).unwrap();
    assert_eq!(rows.len(), 10);
    assert!(rows[0]["instruction"].as_str().unwrap().contains(" - "));
    let v: Vec<f32> = b.data().chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    let bases = Tensor::from_vec(v, (10, d, 4), &candle_core::Device::Cpu).unwrap();
    // Each (I − 2uuᵀ) R has orthonormal columns; different instructions give different bases.
    let eye = Tensor::eye(4, DType::F32, &candle_core::Device::Cpu).unwrap();
    for i in 0..10 {
        let bi = bases.get(i).unwrap();
        assert!(common::max_abs_diff(&bi.t().unwrap().matmul(&bi).unwrap(), &eye) < 1e-4, "row {i}");
    }
    let distinct = (1..10).any(|i| common::max_abs_diff(&bases.get(0).unwrap(), &bases.get(i).unwrap()) > 1e-4);
    assert!(distinct, "every row got the same basis");
}
