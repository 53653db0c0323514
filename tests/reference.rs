//! The settings that reproduce the authors' code (docs/fidelity.md): the Householder
//! parametrisation of the rotation, the reference initialisation of the subspace MLP, the mask
//! temperature schedule and the mask learning rate, the weight decay on norms.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use hyperdas::data::collate::collate;
use hyperdas::experiment::trainer::{TrainSettings, Trainer};
use hyperdas::hypernet::interpreter::{Interpreter, Method};
use hyperdas::hypernet::subspace::{REFERENCE_MLP_WIDTH, RotationParam, SubspaceInit, SubspaceKind, householder_basis, temperature};
use hyperdas::intervention::orthonormal::{orthonormality_error, random_orthonormal};
use hyperdas::params::ParamStore;

/// `base · (−H_1 ⋯ H_k)[:, :k]` with every `H_j` a full D × D matrix (the definition of
/// torch's `householder_product`), in f64.
#[allow(clippy::needless_range_loop)] // index loops mirror the matrix definition
fn naive(a: &[Vec<f64>], base: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let (d, k) = (a.len(), a[0].len());
    let mut p: Vec<Vec<f64>> = (0..d).map(|i| (0..d).map(|j| f64::from(u8::from(i == j))).collect()).collect();
    for j in 0..k {
        let v: Vec<f64> = (0..d)
            .map(|i| {
                if i == j {
                    1.0
                } else if i > j {
                    a[i][j]
                } else {
                    0.0
                }
            })
            .collect();
        let tau = 2.0 / v.iter().map(|x| x * x).sum::<f64>();
        // p ← p (I − τ v vᵀ)
        let pv: Vec<f64> = (0..d).map(|r| (0..d).map(|c| p[r][c] * v[c]).sum()).collect();
        for r in 0..d {
            for c in 0..d {
                p[r][c] -= tau * pv[r] * v[c];
            }
        }
    }
    (0..d).map(|r| (0..k).map(|c| -(0..d).map(|m| base[r][m] * p[m][c]).sum::<f64>()).collect()).collect()
}

#[test]
fn householder_basis_is_torchs_parametrisation_and_differentiable() {
    let (d, k) = (7, 3);
    let base = random_orthonormal(d, d, 5, DType::F64, &Device::Cpu).unwrap();
    let mut rng = hyperdas::rng::Rng::new(1);
    let a: Vec<f64> = (0..d * k).map(|_| 0.3 * rng.normal()).collect(); // upper entries must not matter
    let a = Tensor::from_vec(a, (d, k), &Device::Cpu).unwrap();
    let r = householder_basis(&a, &base).unwrap();
    let want = naive(&a.to_vec2::<f64>().unwrap(), &base.to_vec2::<f64>().unwrap());
    let got = r.to_vec2::<f64>().unwrap();
    for (g, w) in got.iter().flatten().zip(want.iter().flatten()) {
        assert!((g - w).abs() < 1e-12, "{g} vs {w}");
    }
    assert!(orthonormality_error(&r).unwrap() < 1e-12);
    // At A = 0 it is the first k columns of the base: the retraction's seeded R_0.
    let zero = householder_basis(&Tensor::zeros((d, k), DType::F64, &Device::Cpu).unwrap(), &base).unwrap();
    let r0 = random_orthonormal(d, k, 5, DType::F64, &Device::Cpu).unwrap();
    assert!(common::max_abs_diff(&zero, &r0) < 1e-12);
    // Gradients reach the strictly lower triangle (finite differences), and only it.
    let c = Tensor::from_vec((0..d * k).map(|i| ((i * 7 % 5) as f64) - 2.0).collect::<Vec<_>>(), (d, k), &Device::Cpu).unwrap();
    let var = Var::from_tensor(&a).unwrap();
    let loss = |t: &Tensor| householder_basis(t, &base).unwrap().mul(&c).unwrap().sum_all().unwrap();
    let grads = loss(var.as_tensor()).backward().unwrap();
    let g = grads.get(var.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
    let a0 = a.to_vec2::<f64>().unwrap();
    for i in 0..d {
        for j in 0..k {
            let bump = |h: f64| {
                let mut x = a0.clone();
                x[i][j] += h;
                loss(&Tensor::new(x, &Device::Cpu).unwrap()).to_scalar::<f64>().unwrap()
            };
            let fd = (bump(1e-6) - bump(-1e-6)) / 2e-6;
            assert!((g[i][j] - fd).abs() < 1e-6, "({i}, {j}): {} vs {fd}", g[i][j]);
            if i <= j {
                assert_eq!(g[i][j], 0.0, "({i}, {j}) is not live");
            }
        }
    }
}

#[test]
fn the_mask_temperature_anneals_as_the_reference() {
    // linspace(50, 0.1, total + 1)[step]
    assert_eq!(temperature(0, 10, 50.0, 0.1), 50.0);
    assert!((temperature(5, 10, 50.0, 0.1) - 25.05).abs() < 1e-12);
    assert!((temperature(10, 10, 50.0, 0.1) - 0.1).abs() < 1e-12);
    assert!((temperature(12, 10, 50.0, 0.1) - 0.1).abs() < 1e-12, "past the end it stays at the end");
    // In training: each step runs at its scheduled temperature, and the mask MLP learns at
    // mask_lr (Adam's first step moves a weight by about its learning rate).
    let lm = common::load(&common::fixture("tiny-llama"), DType::F32);
    let rows = common::fixture_rows(&lm, 8);
    let mut cfg = common::interpreter_config(Method::HyperDas, 1, 1, 4, 3);
    cfg.subspace = SubspaceKind::MaskSelect;
    let mut ps = ParamStore::new();
    let mut interp = Interpreter::new(&mut ps, &lm.model, &cfg).unwrap();
    let s = TrainSettings { batch_size: 4, lr: 1e-5, mask_lr: 1e-2, ..Default::default() };
    let snap = |name: &str| ps.get(name).unwrap().as_tensor().copy().unwrap();
    let (mlp0, q0) = (snap("subspace.mlp.down_proj.weight"), snap("hypernet.pointer.q_proj.weight"));
    let mut tr = Trainer::new(&lm.model, &mut interp, &ps, &s, 4).unwrap();
    for step in 0..4 {
        let batch = collate(&rows[4 * (step % 2)..4 * (step % 2) + 4].iter().collect::<Vec<_>>(), lm.tokenizer.padding_id());
        tr.step(&batch).unwrap();
        assert_eq!(tr.interp.subspace.temperature, temperature(step, 4, 50.0, 0.1));
        if step == 0 {
            let moved = |a: &Tensor, name: &str| common::max_abs_diff(a, ps.get(name).unwrap().as_tensor());
            let (m, q) = (moved(&mlp0, "subspace.mlp.down_proj.weight"), moved(&q0, "hypernet.pointer.q_proj.weight"));
            assert!(m > 5e-3 && m < 2e-2, "mask MLP moved {m}");
            assert!(q < 2e-5, "the rest moves at lr 1e-5: {q}");
        }
    }
}

#[test]
fn reference_init_and_householder_rotation_train() {
    let lm = common::load(&common::fixture("tiny-llama"), DType::F32);
    let d = lm.model.hidden_size();
    let rows = common::fixture_rows(&lm, 8);
    let mut cfg = common::interpreter_config(Method::HyperDas, 1, 1, 4, 3);
    cfg.init = SubspaceInit::Reference;
    cfg.rotation = RotationParam::Householder;
    let mut ps = ParamStore::new();
    let mut interp = Interpreter::new(&mut ps, &lm.model, &cfg).unwrap();
    // The reference's width and PyTorch's default U(±1/√fan_in).
    let gate = ps.get("subspace.mlp.gate_proj.weight").unwrap().as_tensor().clone();
    assert_eq!(gate.dims(), [REFERENCE_MLP_WIDTH, d]);
    let v = gate.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let bound = 1.0 / (d as f32).sqrt();
    assert!(v.iter().all(|x| x.abs() <= bound));
    let var = v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32;
    assert!((var.sqrt() - bound / 3f32.sqrt()).abs() < 0.01 * bound, "std {} for U(±{bound})", var.sqrt());
    assert!(ps.get("subspace.rotation").is_none() && ps.get("subspace.rotation_householder").is_some());
    let r0 = interp.subspace.rotation().unwrap();
    assert!(common::max_abs_diff(&r0, &random_orthonormal(d, 4, 3, DType::F32, &Device::Cpu).unwrap()) < 1e-6);
    // Training moves R and keeps it orthonormal without any retraction; step 0 checks that
    // every parameter (the Householder one included) gets a gradient.
    let s = TrainSettings { batch_size: 4, lr: 1e-4, decay_norms: true, ..Default::default() };
    let mut tr = Trainer::new(&lm.model, &mut interp, &ps, &s, 3).unwrap();
    for step in 0..3 {
        let batch = collate(&rows[4 * (step % 2)..4 * (step % 2) + 4].iter().collect::<Vec<_>>(), lm.tokenizer.padding_id());
        tr.step(&batch).unwrap();
    }
    let r = interp.subspace.rotation().unwrap();
    assert!(common::max_abs_diff(&r, &r0) > 1e-4, "the rotation learned");
    assert!(orthonormality_error(&r).unwrap() < 1e-5);
}
