//! Interventions: the rank-1 ReflectSelect equals the explicit Householder-matrix formula,
//! orthonormal bases stay orthonormal under AdamW with the retraction, mixing and masks behave,
//! and gradients match finite differences (f64).

use candle_core::{DType, Device, Tensor, Var};
use hyperdas::intervention::mix::mix_positions;
use hyperdas::intervention::orthonormal::{orthonormality_error, random_orthonormal, retract};
use hyperdas::intervention::subspace::{boundary_mask, das, full, masked_rotation, reflect_select, reflect_select_many, reflected_bases};
use hyperdas::params::ParamStore;
use hyperdas::rng::Rng;
use hyperdas::train::{AdamW, AdamWConfig};

const DEV: Device = Device::Cpu;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| rng.uniform() * 2.0 - 1.0).collect();
    Tensor::from_vec(v, shape, &DEV).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

fn unit_rows(u: &Tensor) -> Tensor {
    u.broadcast_div(&u.sqr().unwrap().sum_keepdim(1).unwrap().sqrt().unwrap()).unwrap()
}

#[test]
fn reflect_select_rank1_equals_the_explicit_householder_matrices() {
    let (b, t, d, k) = (3, 4, 10, 3);
    let r = random_orthonormal(d, k, 1, DType::F64, &DEV).unwrap();
    let h = randn(&[b, t, d], 2);
    let m = randn(&[b, t, d], 3);
    let u = unit_rows(&randn(&[b, d], 4));
    let fast = reflect_select(&h, &m, &r, &u).unwrap();
    // Explicit: Hh_b = I − 2 u uᵀ [D, D], W_b = Hh_b R, h + (m − h) W_b W_bᵀ.
    let mut rows = Vec::new();
    for i in 0..b {
        let ui = u.get(i).unwrap().reshape((d, 1)).unwrap();
        let hh = (Tensor::eye(d, DType::F64, &DEV).unwrap() - ui.matmul(&ui.t().unwrap()).unwrap().affine(2.0, 0.0).unwrap()).unwrap();
        let w = hh.matmul(&r).unwrap(); // [D, k]
        assert!(orthonormality_error(&w).unwrap() < 1e-12, "W_b is orthonormal");
        let diff = (m.get(i).unwrap() - h.get(i).unwrap()).unwrap(); // [T, D]
        rows.push((h.get(i).unwrap() + diff.matmul(&w).unwrap().matmul(&w.t().unwrap()).unwrap()).unwrap());
    }
    let slow = Tensor::stack(&rows, 0).unwrap();
    assert!(max_diff(&fast, &slow) < 1e-12, "{}", max_diff(&fast, &slow));
    // With u orthogonal to span(R), uᵀR = 0 and W_b = R: the same as DAS.
    let das_out = das(&h, &m, &r).unwrap();
    let proj = r.matmul(&r.t().unwrap()).unwrap(); // [D, D]
    let x = randn(&[b, d], 5);
    let u_perp = unit_rows(&(&x - x.matmul(&proj).unwrap()).unwrap());
    assert!(max_diff(&reflect_select(&h, &m, &r, &u_perp).unwrap(), &das_out) < 1e-10);
}

/// n reflections per example: the vector form equals `h + (m − h) W_b W_bᵀ` with the explicit
/// product `W_b = H_1 ⋯ H_n R`; `reflected_bases` is that `W_b`; one reflection is
/// `reflect_select`; and the span really moves in more than one direction.
#[test]
fn reflect_select_with_several_reflections_equals_the_explicit_product() {
    let (b, t, d, k, n) = (3, 4, 10, 4, 3);
    let r = random_orthonormal(d, k, 1, DType::F64, &DEV).unwrap();
    let h = randn(&[b, t, d], 2);
    let m = randn(&[b, t, d], 3);
    let u = unit_rows(&randn(&[b * n, d], 4)).reshape((b, n, d)).unwrap();
    let fast = reflect_select_many(&h, &m, &r, &u).unwrap();
    let bases = reflected_bases(&r, &u).unwrap(); // [B, D, k]
    let eye = Tensor::eye(d, DType::F64, &DEV).unwrap();
    let mut rows = Vec::new();
    for i in 0..b {
        let mut w = r.clone(); // [D, k]
        for j in (0..n).rev() {
            let uj = u.get(i).unwrap().get(j).unwrap().reshape((d, 1)).unwrap();
            let hh = (&eye - uj.matmul(&uj.t().unwrap()).unwrap().affine(2.0, 0.0).unwrap()).unwrap();
            w = hh.matmul(&w).unwrap();
        }
        assert!(orthonormality_error(&w).unwrap() < 1e-12, "W_b is orthonormal");
        assert!(max_diff(&bases.get(i).unwrap(), &w) < 1e-12, "reflected_bases is W_b");
        let diff = (m.get(i).unwrap() - h.get(i).unwrap()).unwrap(); // [T, D]
        rows.push((h.get(i).unwrap() + diff.matmul(&w).unwrap().matmul(&w.t().unwrap()).unwrap()).unwrap());
        // The subspace moved in up to n directions: span(W_b) ∩ span(R) has dimension ≥ k − n,
        // and with random u exactly k − n (the k singular values of RᵀW_b: k − n ones).
        let overlap = r.t().unwrap().matmul(&w).unwrap(); // [k, k]
        let gram = overlap.t().unwrap().matmul(&overlap).unwrap(); // eigenvalues = cos² of principal angles
        let trace: f64 = (0..k).map(|a| gram.get(a).unwrap().get(a).unwrap().to_scalar::<f64>().unwrap()).sum();
        assert!(trace < k as f64 - 0.05, "the span changed (Σ cos² = {trace})");
        assert!(trace > (k - n) as f64 - 1e-9, "at most n directions changed (Σ cos² = {trace})");
    }
    let slow = Tensor::stack(&rows, 0).unwrap();
    assert!(max_diff(&fast, &slow) < 1e-12, "{}", max_diff(&fast, &slow));
    // One reflection: the paper's module, through either function.
    let u1 = u.narrow(1, 0, 1).unwrap().contiguous().unwrap(); // [B, 1, D]
    let one = reflect_select(&h, &m, &r, &u1.squeeze(1).unwrap()).unwrap();
    assert!(max_diff(&reflect_select_many(&h, &m, &r, &u1).unwrap(), &one) < 1e-12);
    // The same reflection twice is the identity: W_b = R, i.e. DAS.
    let twice = Tensor::cat(&[&u1, &u1], 1).unwrap(); // [B, 2, D]
    assert!(max_diff(&reflect_select_many(&h, &m, &r, &twice).unwrap(), &das(&h, &m, &r).unwrap()) < 1e-12);
    // Shapes are checked.
    let e = reflect_select_many(&h, &m, &r, &u.narrow(2, 0, d - 1).unwrap()).unwrap_err().to_string();
    assert!(e.contains("expected [3, n ≥ 1, 10]"), "{e}");
}

#[test]
fn masks_and_full_replacement_behave() {
    let (b, t, d, k) = (2, 3, 8, 4);
    let r = random_orthonormal(d, k, 7, DType::F64, &DEV).unwrap();
    let h = randn(&[b, t, d], 1);
    let m = randn(&[b, t, d], 2);
    let ones = Tensor::ones(k, DType::F64, &DEV).unwrap();
    let zeros = Tensor::zeros((b, k), DType::F64, &DEV).unwrap();
    assert!(max_diff(&masked_rotation(&h, &m, &r, &ones).unwrap(), &das(&h, &m, &r).unwrap()) < 1e-12);
    assert!(max_diff(&masked_rotation(&h, &m, &r, &zeros).unwrap(), &h) < 1e-12);
    assert!(max_diff(&full(&h, &m).unwrap(), &m) < 1e-15);
    // A full-rank rotation with an all-ones mask replaces the vector.
    let q = random_orthonormal(d, d, 3, DType::F64, &DEV).unwrap();
    assert!(max_diff(&masked_rotation(&h, &m, &q, &Tensor::ones(d, DType::F64, &DEV).unwrap()).unwrap(), &m) < 1e-10);
    // Boundary mask: ~1 below β·k, ~0 above, differentiable in β.
    let beta = Var::new(&[0.5f64], &DEV).unwrap();
    let mask = boundary_mask(&beta.as_tensor().squeeze(0).unwrap(), 8, 0.1).unwrap();
    let v: Vec<f64> = mask.to_vec1().unwrap();
    assert!(v[..3].iter().all(|&x| x > 0.99) && v[5..].iter().all(|&x| x < 0.01), "{v:?}");
    let g = mask.sum_all().unwrap().backward().unwrap();
    assert!(g.get(beta.as_tensor()).unwrap().to_vec1::<f64>().unwrap()[0] > 0.0);
    // Shape errors are clear.
    let e = das(&h, &randn(&[b, t + 1, d], 3), &r).unwrap_err().to_string();
    assert!(e.contains("differ in shape"), "{e}");
}

#[test]
fn mixing_follows_the_position_weights() {
    let (b, ts, tb, d) = (1, 2, 3, 4);
    let s = randn(&[b, ts, d], 1);
    let h = randn(&[b, tb, d], 2);
    // Column 0: all from source 1; column 1: half source 0, half self; column 2: self.
    let w = Tensor::new(&[[[0.0f64, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 0.5, 1.0]]], &DEV).unwrap();
    let m = mix_positions(&w, &s, &h).unwrap();
    let s0 = s.get(0).unwrap();
    let h0 = h.get(0).unwrap();
    let expect = Tensor::stack(&[s0.get(1).unwrap(), ((s0.get(0).unwrap() * 0.5).unwrap() + (h0.get(1).unwrap() * 0.5).unwrap()).unwrap(), h0.get(2).unwrap()], 0).unwrap();
    assert!(max_diff(&m.get(0).unwrap(), &expect) < 1e-15);
    let e = mix_positions(&Tensor::zeros((1, 2, 3), DType::F64, &DEV).unwrap(), &s, &h).unwrap_err().to_string();
    assert!(e.contains("do not fit"), "{e}");
}

#[test]
fn bases_start_orthonormal_and_stay_so_under_adamw() {
    let (d, k) = (64, 8);
    let r0 = random_orthonormal(d, k, 42, DType::F32, &DEV).unwrap();
    assert!(orthonormality_error(&r0).unwrap() < 1e-6);
    assert_eq!(r0.to_vec2::<f32>().unwrap(), random_orthonormal(d, k, 42, DType::F32, &DEV).unwrap().to_vec2::<f32>().unwrap());
    assert_ne!(r0.to_vec2::<f32>().unwrap(), random_orthonormal(d, k, 43, DType::F32, &DEV).unwrap().to_vec2::<f32>().unwrap());
    assert!(random_orthonormal(4, 5, 0, DType::F32, &DEV).is_err());

    // Train R so that DAS moves h towards a target, with a large learning rate.
    let run = |retraction: bool| -> (f64, f64, f64) {
        let mut ps = ParamStore::new();
        let r = ps.add("rotation", r0.clone()).unwrap();
        let mut opt = AdamW::new(&ps, AdamWConfig { weight_decay: 0.0, grad_clip: None, ..Default::default() }).unwrap();
        let h = randn(&[4, 3, d], 1).to_dtype(DType::F32).unwrap();
        let m = randn(&[4, 3, d], 2).to_dtype(DType::F32).unwrap();
        let target = randn(&[4, 3, d], 3).to_dtype(DType::F32).unwrap();
        let loss_of = |r: &Tensor| das(&h, &m, r).unwrap().sub(&target).unwrap().sqr().unwrap().mean_all().unwrap();
        let first = loss_of(r.as_tensor()).to_scalar::<f32>().unwrap() as f64;
        for _ in 0..50 {
            let loss = loss_of(r.as_tensor());
            let grads = loss.backward().unwrap();
            opt.step(&grads, 0.05).unwrap();
            if retraction {
                retract(&r).unwrap();
            }
        }
        let last = loss_of(r.as_tensor()).to_scalar::<f32>().unwrap() as f64;
        (orthonormality_error(r.as_tensor()).unwrap(), first, last)
    };
    let (err, first, last) = run(true);
    assert!(err < 1e-5, "RᵀR = I after 50 AdamW steps + retraction: error {err}");
    assert!(last < first, "the loss goes down: {first} -> {last}");
    let (err_free, _, _) = run(false);
    assert!(err_free > 1e-2, "without the retraction AdamW leaves the manifold: {err_free}");
}

/// Central finite differences of a scalar function of one f64 tensor.
fn fd_check(x: &Tensor, f: impl Fn(&Tensor) -> Tensor) {
    let var = Var::from_tensor(x).unwrap();
    let y = f(var.as_tensor());
    let analytic = y.backward().unwrap().get(var.as_tensor()).expect("a gradient").flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let flat: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let eps = 1e-6;
    for i in 0..flat.len() {
        let mut p = flat.clone();
        p[i] += eps;
        let mut q = flat.clone();
        q[i] -= eps;
        let fp = f(&Tensor::from_vec(p, x.dims(), &DEV).unwrap()).to_scalar::<f64>().unwrap();
        let fq = f(&Tensor::from_vec(q, x.dims(), &DEV).unwrap()).to_scalar::<f64>().unwrap();
        let numeric = (fp - fq) / (2.0 * eps);
        assert!((numeric - analytic[i]).abs() < 1e-6 * (1.0 + numeric.abs()), "entry {i}: fd {numeric} vs backward {}", analytic[i]);
    }
}

#[test]
fn gradients_match_finite_differences() {
    let (b, ts, tb, d, k) = (2, 3, 2, 6, 2);
    let r = random_orthonormal(d, k, 5, DType::F64, &DEV).unwrap();
    let s = randn(&[b, ts, d], 1);
    let h = randn(&[b, tb, d], 2);
    let u = unit_rows(&randn(&[b, d], 3));
    let w = randn(&[b, ts + 1, tb], 4);
    let probe = randn(&[b, tb, d], 5);
    let score = |out: Tensor| (out * &probe).unwrap().sum_all().unwrap();
    // Through the position weights, the reflection vector and the basis.
    fd_check(&w, |w| score(reflect_select(&h, &mix_positions(w, &s, &h).unwrap(), &r, &u).unwrap()));
    fd_check(&u, |u| score(reflect_select(&h, &mix_positions(&w, &s, &h).unwrap(), &r, u).unwrap()));
    fd_check(&r, |r| score(reflect_select(&h, &mix_positions(&w, &s, &h).unwrap(), r, &u).unwrap()));
    // Several reflections: through each reflection vector and the basis.
    let un = unit_rows(&randn(&[b * 3, d], 7)).reshape((b, 3, d)).unwrap();
    fd_check(&un, |u| score(reflect_select_many(&h, &mix_positions(&w, &s, &h).unwrap(), &r, u).unwrap()));
    fd_check(&r, |r| score(reflect_select_many(&h, &mix_positions(&w, &s, &h).unwrap(), r, &un).unwrap()));
    let mask = randn(&[b, k], 6);
    fd_check(&mask, |mk| score(masked_rotation(&h, &mix_positions(&w, &s, &h).unwrap(), &r, mk).unwrap()));
    // Boundless DAS: through the boundary β (sigmoid of a shifted index) and a [D, D] rotation.
    let q = random_orthonormal(d, d, 8, DType::F64, &DEV).unwrap();
    let beta = Tensor::new(&[0.4f64], &DEV).unwrap();
    fd_check(&beta, |bt| score(masked_rotation(&h, &mix_positions(&w, &s, &h).unwrap(), &q, &boundary_mask(&bt.squeeze(0).unwrap(), d, 0.5).unwrap()).unwrap()));
}

// ---------------------------------------------------------------------------------------------
// Position selection

use hyperdas::experiment::loss::{entropy_loss, guide_loss, guide_weight, separation_loss, sparsity_loss, sparsity_weight};
use hyperdas::intervention::selection::{InferenceMode, discretize, ground_truth};

/// W for B = 1, T_s = 2, T_b = 3 (rows: source 0, source 1, self; each column sums to 1).
fn w_example() -> Tensor {
    Tensor::new(&[[[0.50f32, 0.30, 0.05], [0.45, 0.60, 0.05], [0.05, 0.10, 0.90]]], &DEV).unwrap()
}

fn rows_of(w: &Tensor) -> Vec<Vec<f32>> {
    w.squeeze(0).unwrap().to_vec2().unwrap()
}

#[test]
fn inference_modes_at_batch_size_one() {
    let w = w_example();
    // Soft: unchanged.
    assert_eq!(rows_of(&discretize(&w, InferenceMode::Soft).unwrap()), rows_of(&w));
    // One-to-many: column arg-max (source 0 → base 0, source 1 → base 1, self at 2).
    assert_eq!(rows_of(&discretize(&w, InferenceMode::parse("one-to-many").unwrap()).unwrap()), vec![vec![1.0, 0.0, 0.0], vec![0.0, 1.0, 0.0], vec![0.0, 0.0, 1.0]]);
    // One-to-one: source 0 bids 0.50 on column 0; source 1 bids 0.60 on column 1 (its 0.45 on
    // column 0 is dropped); self floored at 0.1 → column 0: source 0, column 1: source 1, column 2: self.
    let one = discretize(&w, InferenceMode::parse("bidding_argmax").unwrap()).unwrap();
    assert_eq!(rows_of(&one), vec![vec![1.0, 0.0, 0.0], vec![0.0, 1.0, 0.0], vec![0.0, 0.0, 1.0]]);
    // Both source rows preferring column 1: only the higher bid wins it; column 0 falls back to self.
    let w2 = Tensor::new(&[[[0.30f32, 0.55, 0.05], [0.20, 0.40, 0.05], [0.50, 0.05, 0.90]]], &DEV).unwrap();
    assert_eq!(rows_of(&discretize(&w2, InferenceMode::BiddingArgmax { threshold: 0.1 }).unwrap()), vec![vec![0.0, 1.0, 0.0], vec![0.0, 0.0, 0.0], vec![1.0, 0.0, 1.0]]);
    // A high threshold makes self win every column.
    assert_eq!(rows_of(&discretize(&w2, InferenceMode::BiddingArgmax { threshold: 0.99 }).unwrap())[2], vec![1.0, 1.0, 1.0]);
    // Global arg-max: the single largest source entry (source 1 → base 1), self elsewhere.
    assert_eq!(rows_of(&discretize(&w, InferenceMode::GlobalArgmax).unwrap()), vec![vec![0.0, 0.0, 0.0], vec![0.0, 1.0, 0.0], vec![1.0, 0.0, 1.0]]);
    // Every discrete W is a valid selection: columns sum to 1.
    for mode in ["column_argmax", "bidding_argmax", "global_argmax"] {
        let d = discretize(&w2, InferenceMode::parse(mode).unwrap()).unwrap();
        assert_eq!(d.sum(1).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![1.0; 3], "{mode}");
    }
    // Ground truth: source 1 into base 2 for row 0; source 0 into base 0 for row 1.
    let gt = ground_truth(2, 2, 3, &[2, 0], &[1, 0], DType::F32, &DEV).unwrap();
    assert_eq!(gt.get(0).unwrap().to_vec2::<f32>().unwrap(), vec![vec![0.0, 0.0, 0.0], vec![0.0, 0.0, 1.0], vec![1.0, 1.0, 0.0]]);
    assert_eq!(gt.get(1).unwrap().to_vec2::<f32>().unwrap(), vec![vec![1.0, 0.0, 0.0], vec![0.0, 0.0, 0.0], vec![0.0, 1.0, 1.0]]);
    assert!(ground_truth(1, 2, 3, &[3], &[0], DType::F32, &DEV).is_err());
    let e = InferenceMode::parse("best").unwrap_err().to_string();
    assert!(e.contains("soft, column_argmax"), "{e}");
}

#[test]
fn regularisers_and_their_schedule() {
    // Source row sums: 0.85 and 1.10 (> 1, penalised whole) → loss 1.10.
    let w = Var::from_tensor(&w_example()).unwrap();
    let l = sparsity_loss(w.as_tensor()).unwrap();
    assert!((l.to_scalar::<f32>().unwrap() - 1.10).abs() < 1e-6);
    let g = l.backward().unwrap().get(w.as_tensor()).unwrap().squeeze(0).unwrap().to_vec2::<f32>().unwrap();
    assert_eq!(g, vec![vec![0.0, 0.0, 0.0], vec![1.0, 1.0, 1.0], vec![0.0, 0.0, 0.0]]);
    // Entropy of uniform source rows over T_b = 4 columns is ln 4.
    let u = Tensor::full(0.25f64, (1, 3, 4), &DEV).unwrap();
    assert!((entropy_loss(&u).unwrap().to_scalar::<f64>().unwrap() - 4f64.ln()).abs() < 1e-6);
    // Schedule: zero for the first half, then linspace(0.15, 1.5, 101).
    assert_eq!(sparsity_weight(49, 100, 0.15, 1.5, 0.5), 0.0);
    assert!((sparsity_weight(50, 100, 0.15, 1.5, 0.5) - 0.825).abs() < 1e-12);
    assert!((sparsity_weight(100, 100, 0.15, 1.5, 0.5) - 1.5).abs() < 1e-12);
}

#[test]
fn pointer_guide_and_its_fade_out() {
    // Two rows of W (B = 2, T_s = 2, T_b = 3; rows: source 0, source 1, self). Row 0: the
    // base's entity (column 1) should take source 1 (0.60), columns 0 and 2 keep themselves
    // (0.05, 0.90). Row 1: column 2 should take source 0 (0.05); column 0 is not visible, column
    // 1 keeps itself (0.10). G = mean over rows of −ln W[i*, j*] + mean −ln W[self, j].
    let w = Var::from_tensor(&Tensor::cat(&[w_example(), w_example()], 0).unwrap()).unwrap();
    let visible = [1u8, 1, 1, 0, 1, 1];
    let l = guide_loss(w.as_tensor(), &[1, 0], &[1, 2], &visible).unwrap();
    let row0 = -(0.60f32.ln()) - (0.05f32.ln() + 0.90f32.ln()) / 2.0;
    let row1 = -(0.05f32.ln()) - 0.10f32.ln();
    assert!((l.to_scalar::<f32>().unwrap() - (row0 + row1) / 2.0).abs() < 1e-5);
    // The gradient reaches exactly the target cells: −target / (2 W).
    let g = l.backward().unwrap().get(w.as_tensor()).unwrap().to_vec3::<f32>().unwrap();
    let cells: [&[(usize, usize, f32, f32)]; 2] = [&[(1, 1, 0.60, 1.0), (2, 0, 0.05, 0.5), (2, 2, 0.90, 0.5)], &[(0, 2, 0.05, 1.0), (2, 1, 0.10, 1.0)]];
    for (b, want) in cells.iter().enumerate() {
        for (r, row) in g[b].iter().enumerate() {
            for (c, &v) in row.iter().enumerate() {
                let expect = want.iter().find(|x| (x.0, x.1) == (r, c)).map_or(0.0, |x| -x.3 / (2.0 * (x.2 + 1e-8)));
                assert!((v - expect).abs() < 1e-3, "row {b}: dG/dW[{r}][{c}] = {v}, expected {expect}");
            }
        }
    }
    // The weight fades linearly to 0 at `steps`, and is 0 without a guide.
    assert_eq!(guide_weight(0, 100, 2.0), 2.0);
    assert!((guide_weight(25, 100, 2.0) - 1.5).abs() < 1e-12);
    assert_eq!(guide_weight(100, 100, 2.0), 0.0);
    assert_eq!(guide_weight(5, 0, 2.0), 0.0);
    assert_eq!(guide_weight(5, 100, 0.0), 0.0);
}

#[test]
fn subspace_separation_term() {
    let (d, k) = (6, 2);
    let q = random_orthonormal(d, 4, 7, DType::F64, &DEV).unwrap(); // [D, 4]: two orthogonal planes
    let (p1, p2) = (q.narrow(1, 0, 2).unwrap(), q.narrow(1, 2, 2).unwrap()); // [D, 2] each
    let rho = random_orthonormal(d, k, 8, DType::F64, &DEV).unwrap(); // an unrelated plane
    let stack = |bs: &[&Tensor]| Tensor::stack(bs, 0).unwrap(); // [B, D, k]
    let attrs = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let value = |b: &Tensor, a: &[&str]| separation_loss(b, &attrs(a)).unwrap().map(|t| t.to_scalar::<f64>().unwrap());
    // The same plane for two attributes: 1. Orthogonal planes: 0.
    assert!((value(&stack(&[&p1, &p1]), &["Country", "Continent"]).unwrap() - 1.0).abs() < 1e-12);
    assert!(value(&stack(&[&p1, &p2]), &["Country", "Continent"]).unwrap().abs() < 1e-12);
    // Pairs of one attribute do not count: rows 0 and 1 (Country, same plane) are left out, and
    // the mean is over the four cross pairs (0-2, 1-2 and back), here all orthogonal.
    assert!(value(&stack(&[&p1, &p1, &p2]), &["Country", "Country", "Continent"]).unwrap().abs() < 1e-12);
    // One cross pair of each kind: (1 + 0) / 2 over rows (0, 2) = same plane and (1, 2) = orthogonal.
    assert!((value(&stack(&[&p1, &p2, &p1]), &["Country", "Country", "Continent"]).unwrap() - 0.5).abs() < 1e-12);
    // A general pair: ‖AᵀB‖²_F / k.
    let direct = p1.t().unwrap().matmul(&rho).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap() / k as f64;
    assert!((value(&stack(&[&p1, &rho]), &["Country", "Continent"]).unwrap() - direct).abs() < 1e-12);
    // One attribute in the batch: no term.
    assert!(value(&stack(&[&p1, &p2]), &["Country", "Country"]).is_none());
    assert!(separation_loss(&stack(&[&p1, &p2]), &attrs(&["Country"])).is_err());
    // The gradient matches finite differences (bases need not be orthonormal).
    let b = randn(&[3, d, k], 11);
    fd_check(&b, |x| separation_loss(x, &attrs(&["Country", "Continent", "Country"])).unwrap().unwrap());
}
