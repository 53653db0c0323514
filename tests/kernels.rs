//! The fused CPU kernels and the hand-written backward passes (src/model/kernels/,
//! src/model/tape.rs): every fused op equals its composed version, and every hand-written
//! backward equals central finite differences in f64 and candle's autograd through the
//! composed ops.

mod common;

use candle_core::{D, DType, Device, Tensor, Var};
use common::*;
use hyperdas::model::kernels;

const DEV: Device = Device::Cpu;

fn randn(shape: &[usize], seed: u64) -> Tensor {
    // A seeded generator of our own: candle's randn is not seedable on the CPU.
    let mut rng = hyperdas::rng::Rng::derive(seed, "tests/kernels");
    let n: usize = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| rng.normal()).collect::<Vec<f64>>(), shape, &DEV).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_abs_diff(a, b)
}

/// Check `op`'s gradient against central differences at a few coordinates of each input, and
/// against `reference`'s autograd gradient at all coordinates. The loss is `Σ op(x) ⊙ w`.
fn check_gradients(name: &str, inputs: &[Tensor], op: &dyn Fn(&[Tensor]) -> Tensor, reference: &dyn Fn(&[Tensor]) -> Tensor) {
    let out = op(inputs);
    let w = randn(out.dims(), 99);
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let fused_out = op(&ts);
    let reference_out = reference(inputs);
    assert!(max_diff(&fused_out, &reference_out) < 1e-12, "{name}: fused forward differs from composed by {:e}", max_diff(&fused_out, &reference_out));
    let grads = (fused_out * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let rvars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let rts: Vec<Tensor> = rvars.iter().map(|v| v.as_tensor().clone()).collect();
    let rgrads = (reference(&rts) * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let loss = |xs: &[Tensor]| (op(xs) * &w).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    for (i, (v, rv)) in vars.iter().zip(&rvars).enumerate() {
        let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: input {i} got no gradient"));
        let rg = rgrads.get(rv.as_tensor()).unwrap();
        assert!(max_diff(g, rg) < 1e-10, "{name}: gradient of input {i} differs from autograd through the composed ops by {:e}", max_diff(g, rg));
        let flat: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f64> = inputs[i].flatten_all().unwrap().to_vec1().unwrap();
        let n = base.len();
        for idx in [0, n / 3, n / 2, n - 1] {
            let bump = |s: f64| {
                let mut v = base.clone();
                v[idx] += s;
                let mut xs = inputs.to_vec();
                xs[i] = Tensor::from_vec(v, inputs[i].dims(), &DEV).unwrap();
                loss(&xs)
            };
            let eps = 1e-6;
            let fd = (bump(eps) - bump(-eps)) / (2.0 * eps);
            assert!((fd - flat[idx]).abs() <= 1e-6 * flat[idx].abs().max(1.0), "{name}: input {i} coordinate {idx}: finite difference {fd} vs backward {}", flat[idx]);
        }
    }
}

#[test]
fn rms_norm_matches_composed_and_finite_differences() {
    let x = randn(&[3, 5, 8], 1);
    let w = randn(&[8], 2);
    check_gradients("rms_norm", &[x, w], &|t| kernels::rms_norm(&t[0], &t[1], 1e-5).unwrap(), &|t| kernels::rms_norm_composed(&t[0], &t[1], 1e-5).unwrap());
}

#[test]
fn masked_softmax_matches_composed_and_finite_differences() {
    // Scores [B, H, Tq, Tk] with a causal mask [B, 1, Tq, Tk] and a key mask [B, 1, 1, Tk].
    let s = randn(&[2, 3, 4, 4], 3);
    let mut causal = vec![0f64; 2 * 4 * 4];
    for b in 0..2 {
        for q in 0..4 {
            for k in 0..4 {
                if k > q || (b == 1 && k == 0 && q > 0) {
                    causal[(b * 4 + q) * 4 + k] = f64::NEG_INFINITY;
                }
            }
        }
    }
    let causal = Tensor::from_vec(causal, (2, 1, 4, 4), &DEV).unwrap();
    check_gradients("softmax causal", std::slice::from_ref(&s), &|t| kernels::softmax_masked(&t[0], Some(&causal)).unwrap(), &|t| kernels::softmax_masked_composed(&t[0], Some(&causal)).unwrap());
    let keys = Tensor::new(&[[0f64, -1e9, 0.0, 0.0], [-1e9, 0.0, 0.0, -1e9]], &DEV).unwrap().reshape((2, 1, 1, 4)).unwrap();
    check_gradients("softmax key mask", std::slice::from_ref(&s), &|t| kernels::softmax_masked(&t[0], Some(&keys)).unwrap(), &|t| kernels::softmax_masked_composed(&t[0], Some(&keys)).unwrap());
    check_gradients("softmax unmasked", &[s], &|t| kernels::softmax_masked(&t[0], None).unwrap(), &|t| kernels::softmax_masked_composed(&t[0], None).unwrap());
}

#[test]
fn rope_matches_composed_and_finite_differences_and_inverts() {
    let rope = hyperdas::model::rope::Rope::new(&hyperdas::model::RopeConfig { theta: 100.0, scaling: hyperdas::model::RopeScaling::None }, 8);
    let (cos, sin) = rope.cos_sin(&[0, 1, 5, 2, 3, 9], 2, 3, DType::F64, &DEV).unwrap();
    let x = randn(&[2, 3, 3, 8], 4);
    check_gradients("rope", std::slice::from_ref(&x), &|t| kernels::rope(&t[0], &cos, &sin).unwrap(), &|t| kernels::rope_composed(&t[0], &cos, &sin).unwrap());
    // The tables hold f32 cosines and sines (as transformers computes them), so cos² + sin² = 1
    // only to f32 precision.
    let back = kernels::rope_inverse(&kernels::rope(&x, &cos, &sin).unwrap(), &cos, &sin).unwrap();
    assert!(max_diff(&back, &x) < 1e-6, "the inverse rotation undoes the rotation");
}

#[test]
fn silu_mul_matches_composed_and_finite_differences() {
    let g = randn(&[4, 6], 5);
    let u = randn(&[4, 6], 6);
    check_gradients("silu_mul", &[g, u], &|t| kernels::silu_mul(&t[0], &t[1]).unwrap(), &|t| (t[0].silu().unwrap() * &t[1]).unwrap());
}

#[test]
fn gelu_mul_matches_composed_and_finite_differences() {
    // Gemma's GeGLU gate; scaled so the tanh saturates at both ends too.
    let g = (randn(&[4, 6], 7) * 3.0).unwrap();
    let u = randn(&[4, 6], 8);
    check_gradients("gelu_mul", &[g.clone(), u.clone()], &|t| kernels::gelu_mul(&t[0], &t[1]).unwrap(), &|t| kernels::gelu_mul_composed(&t[0], &t[1]).unwrap());
    // And both agree with candle's own (tanh-approximated) gelu in value.
    let ours = kernels::gelu_mul(&g, &u).unwrap();
    let candle = (g.gelu().unwrap() * &u).unwrap();
    assert!(max_diff(&ours, &candle) < 1e-12, "{:e}", max_diff(&ours, &candle));
}

#[test]
fn unit_rows_matches_composed() {
    let x = randn(&[5, 7], 7);
    let composed = x.broadcast_div(&(x.sqr().unwrap().sum_keepdim(D::Minus1).unwrap().sqrt().unwrap() + 1e-12).unwrap()).unwrap();
    assert!(max_diff(&kernels::unit_rows(&x).unwrap(), &composed) < 1e-14);
}

#[test]
fn one_sided_matmuls_give_the_gradients_of_a_plain_matmul() {
    let x = randn(&[5, 4], 8);
    let w = randn(&[3, 4], 9);
    let dy = randn(&[5, 3], 10);
    let plain = |x: &Tensor, w: &Tensor| x.matmul(&w.t().unwrap()).unwrap();
    // Frozen weight: only dx.
    let xv = Var::from_tensor(&x).unwrap();
    let y = kernels::matmul_t(xv.as_tensor(), &w).unwrap();
    assert!(max_diff(&y, &plain(&x, &w)) < 1e-14);
    let g = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(max_diff(g.get(xv.as_tensor()).unwrap(), &dy.matmul(&w).unwrap()) < 1e-12);
    // Constant input: only dW.
    let wv = Var::from_tensor(&w).unwrap();
    let y = kernels::matmul_t(&x, wv.as_tensor()).unwrap();
    let g = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(max_diff(g.get(wv.as_tensor()).unwrap(), &dy.t().unwrap().matmul(&x).unwrap()) < 1e-12);
}

#[test]
fn constant_keys_and_values_give_the_projection_gradients_of_plain_autograd() {
    // The hypernetwork's cross-attention over the target's (constant) states: the grafted
    // keys/values must give the same output and the same weight gradients as the generic path.
    let lm = load(&fixture("tiny-llama"), DType::F64);
    let src = &lm.model.layers[0].self_attn;
    let (d, hd) = (lm.model.hidden_size(), src.head_dim);
    let var_linear = |l: &hyperdas::model::llama::Linear| hyperdas::model::llama::Linear::new(Var::from_tensor(&l.weight).unwrap().as_tensor().clone(), None);
    let attn = hyperdas::model::llama::Attention { q_proj: var_linear(&src.q_proj), k_proj: var_linear(&src.k_proj), v_proj: var_linear(&src.v_proj), o_proj: var_linear(&src.o_proj), ..src.clone() };
    let (b, tq, tk) = (2, 3, 7);
    let x = Var::from_tensor(&randn(&[b, tq, d], 11)).unwrap();
    let kv = randn(&[b, tk, d], 12);
    let rope = lm.model.rope();
    let (qc, qs) = rope.cos_sin(&[1, 2, 3, 1, 2, 3], b, tq, DType::F64, &DEV).unwrap();
    let (kc, ks) = rope.cos_sin(&(1..=(b * tk) as u32).collect::<Vec<_>>(), b, tk, DType::F64, &DEV).unwrap();
    let mask = Tensor::new(&[0f64, 0.0, -1e9, 0.0, 0.0, 0.0, -1e9, 0.0, 0.0, 0.0, 0.0, -1e9, 0.0, 0.0], &DEV).unwrap().reshape((b, 1, 1, tk)).unwrap();
    let w = randn(&[b, tq, d], 13);
    let run = |kv: &Tensor| {
        let out = attn.attend(x.as_tensor(), kv, (&qc, &qs), (&kc, &ks), &mask).unwrap();
        let grads = (&out * &w).unwrap().sum_all().unwrap().backward().unwrap();
        (out, grads)
    };
    let (fast, gf) = run(&kv); // constant kv: grafted projections
    let kv_var = Var::from_tensor(&kv).unwrap();
    let (slow, gs) = run(kv_var.as_tensor()); // kv in the graph: candle's ops
    assert!(max_diff(&fast, &slow) < 1e-12);
    for (name, t) in [("q", &attn.q_proj.weight), ("k", &attn.k_proj.weight), ("v", &attn.v_proj.weight), ("o", &attn.o_proj.weight)] {
        let diff = max_diff(gf.get(t).unwrap(), gs.get(t).unwrap());
        assert!(diff < 1e-10, "{name}_proj gradient differs by {diff:e}");
    }
    let dx = max_diff(gf.get(x.as_tensor()).unwrap(), gs.get(x.as_tensor()).unwrap());
    assert!(dx < 1e-10, "the input gradient differs by {dx:e}");
    let _ = hd;
}

#[test]
fn fused_cross_attention_matches_composed_and_finite_differences() {
    // Queries over constant states e with the key/value projections inside one node: q, Wk and
    // Wv get their gradients from the node's own backward (GQA: 4 query heads on 2 kv heads;
    // one row's keys partly masked).
    let (b, h, hkv, tq, tk, hd, d) = (2, 4, 2, 3, 5, 4, 6);
    let e = randn(&[b, tk, d], 21);
    let rope = hyperdas::model::rope::Rope::new(&hyperdas::model::RopeConfig { theta: 100.0, scaling: hyperdas::model::RopeScaling::None }, hd);
    let (cos, sin) = rope.cos_sin(&[1, 2, 3, 4, 5, 1, 2, 3, 0, 0], b, tk, DType::F64, &DEV).unwrap(); // [B, 1, Tk, hd]
    let mut m = vec![0f64; b * tk];
    m[tk + 3] = f64::NEG_INFINITY;
    m[tk + 4] = f64::NEG_INFINITY;
    let mask = Tensor::from_vec(m, (b, 1, 1, tk), &DEV).unwrap();
    let fused = |xs: &[Tensor]| kernels::cross_attention(&xs[0], &xs[1], &xs[2], &e, (&cos, &sin), &mask, hkv).unwrap().expect("the fused path applies to CPU f64");
    let composed = |xs: &[Tensor]| {
        let heads = |y: Tensor| y.reshape((b, tk, hkv, hd)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
        let flat = e.reshape((b * tk, d)).unwrap();
        let k = kernels::rope_composed(&heads(flat.matmul(&xs[1].t().unwrap()).unwrap()), &cos, &sin).unwrap();
        let v = heads(flat.matmul(&xs[2].t().unwrap()).unwrap());
        kernels::attention_composed(&xs[0], &k, &v, &mask).unwrap()
    };
    let inputs = [randn(&[b, h, tq, hd], 22), randn(&[hkv * hd, d], 23), randn(&[hkv * hd, d], 24)];
    check_gradients("cross_attention", &inputs, &fused, &composed);
    // Not applicable (f32 states with f64 queries): the caller takes the composed path.
    let e32 = e.to_dtype(DType::F32).unwrap();
    assert!(kernels::cross_attention(&inputs[0], &inputs[1], &inputs[2], &e32, (&cos, &sin), &mask, hkv).unwrap().is_none());
}

#[test]
fn taped_upper_blocks_equal_autograd_in_value_and_gradient() {
    for dtype in [DType::F64, DType::F32] {
        let lm = load(&fixture("tiny-llama"), dtype);
        let rows: Vec<Vec<u32>> = ["Paris is a city in the country of", "Tokyo is in", "Rome"].iter().map(|p| lm.tokenizer.encode_prompt(p).unwrap()).collect();
        let batch = hyperdas::model::TokenBatch::left_padded(&rows, lm.tokenizer.padding_id(), &DEV).unwrap();
        let (b, t) = batch.dims();
        let ctx = lm.model.context(&batch).unwrap();
        // Label positions, one repeated (a row with fewer labels repeats its last one).
        let positions = Tensor::new(&[[t as u32 - 2, t as u32 - 1], [t as u32 - 1, t as u32 - 1], [t as u32 - 3, t as u32 - 1]], &DEV).unwrap();
        for layer in [0, 1, 3] {
            let clean = lm.model.forward_hidden(&batch, Some(&[layer])).unwrap().stacked.unwrap().squeeze(2).unwrap();
            let w = randn(&[b, 2, lm.model.config.vocab_size], 14).to_dtype(dtype).unwrap();
            let taped_var = Var::from_tensor(&clean).unwrap();
            let taped = lm.model.logits_from(layer, taped_var.as_tensor(), &ctx, &positions).unwrap();
            let g_taped = (&taped * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let auto_var = Var::from_tensor(&clean).unwrap();
            let out = lm.model.forward_from(layer, auto_var.as_tensor(), &ctx).unwrap();
            let auto = lm.model.logits_at(&out, &positions).unwrap();
            let g_auto = (&auto * &w).unwrap().sum_all().unwrap().backward().unwrap();
            let tol = if dtype == DType::F64 { 1e-10 } else { 2e-4 };
            let dv = max_diff(&taped, &auto);
            let (gt, ga) = (g_taped.get(taped_var.as_tensor()).unwrap(), g_auto.get(auto_var.as_tensor()).unwrap());
            let dg = max_diff(gt, ga);
            let scale = ga.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
            assert!(dv < tol, "{dtype:?} layer {layer}: logits differ by {dv:e}");
            assert!(dg < tol * scale.max(1.0), "{dtype:?} layer {layer}: residual gradient differs by {dg:e} (scale {scale:e})");
        }
    }
}

#[test]
fn attention_matches_composed_and_finite_differences() {
    // GQA (4 query heads on 2 kv heads), a causal mask with left padding (row 1) and a key mask.
    let (b, h, hkv, t, hd) = (2, 4, 2, 5, 4);
    let q = randn(&[b, h, t, hd], 21);
    let k = randn(&[b, hkv, t, hd], 22);
    let v = randn(&[b, hkv, t, hd], 23);
    let mut causal = vec![0f64; b * t * t];
    for bi in 0..b {
        for i in 0..t {
            for j in 0..t {
                let pad = bi == 1 && j < 2;
                if !((j <= i && !pad) || j == i) {
                    causal[(bi * t + i) * t + j] = f64::NEG_INFINITY;
                }
            }
        }
    }
    let causal = Tensor::from_vec(causal, (b, 1, t, t), &DEV).unwrap();
    check_gradients("attention causal", &[q.clone(), k.clone(), v.clone()], &|x| kernels::attention(&x[0], &x[1], &x[2], &causal).unwrap(), &|x| {
        kernels::attention_composed(&x[0], &x[1], &x[2], &causal).unwrap()
    });
    let keys = Tensor::new(&[0f64, -1e9, 0.0, 0.0, 0.0, -1e9, 0.0, 0.0, 0.0, -1e9], &DEV).unwrap().reshape((b, 1, 1, t)).unwrap();
    let q1 = randn(&[b, h, 3, hd], 24);
    check_gradients("attention key mask", &[q1, k.clone(), v.clone()], &|x| kernels::attention(&x[0], &x[1], &x[2], &keys).unwrap(), &|x| {
        kernels::attention_composed(&x[0], &x[1], &x[2], &keys).unwrap()
    });
    // The saved-probabilities path (the taped blocks) gives the same gradients.
    let (out, p) = kernels::attention_forward_saved(&q, &k, &v, &causal).unwrap().unwrap();
    assert!(max_diff(&out, &kernels::attention_composed(&q, &k, &v, &causal).unwrap()) < 1e-12);
    let dout = randn(out.dims(), 25);
    let with_p = kernels::attention_backward(&q, &k, &v, Some(&p), &causal, &dout).unwrap();
    let without = kernels::attention_backward(&q, &k, &v, None, &causal, &dout).unwrap();
    assert!(max_diff(&with_p.0, &without.0) == 0.0 && max_diff(&with_p.1, &without.1) == 0.0 && max_diff(&with_p.2, &without.2) == 0.0);
}

// ---------------------------------------------------------------------------------------------
// The bf16 matmul of the frozen clean passes (src/model/kernels/bf16.rs).

/// A deterministic f32 vector of `n` normal values.
fn normal_f32(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = hyperdas::rng::Rng::derive(seed, "tests/kernels/bf16");
    (0..n).map(|_| rng.normal() as f32).collect()
}

#[test]
fn bf16_rounding_is_to_nearest_even() {
    use kernels::round_bf16;
    let step = 2f32.powi(-7); // bf16 keeps 7 fraction bits
    assert_eq!(round_bf16(1.0), 1.0);
    assert_eq!(round_bf16(1.0 + step), 1.0 + step, "representable values stay");
    assert_eq!(round_bf16(1.0 + step / 2.0), 1.0, "a tie goes to the even neighbour (down)");
    assert_eq!(round_bf16(1.0 + 3.0 * step / 2.0), 1.0 + 2.0 * step, "a tie goes to the even neighbour (up)");
    assert_eq!(round_bf16(1.0 + step * 0.51), 1.0 + step, "above the tie rounds up");
    assert_eq!(round_bf16(-3.0), -3.0);
    assert!(round_bf16(f32::NAN).is_nan());
    assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
}

#[test]
fn bf16_kernel_equals_the_reference_sums_on_every_edge_shape() {
    // Rows around the micro-kernel's 8, columns around its panel of 48, inputs odd and across the
    // 256-input cache block: the kernel's sums equal bf16-rounded products summed in f32 up to
    // f32 rounding of the sum (a different order), and differ from the exact f32 product by
    // bf16 rounding. Without AVX-512 BF16 the kernel declines (None) and the f32 path runs.
    let mut checked = 0;
    for (m, k, n) in [(1, 1, 1), (7, 31, 47), (8, 64, 48), (9, 257, 49), (17, 300, 100), (33, 513, 16), (3, 2, 97)] {
        let (x, w) = (normal_f32(m * k, 1), normal_f32(n * k, 2));
        let packed = kernels::PackedBf16::pack(&w, n, k);
        let Some(y) = kernels::matmul_t_bf16(&x, m, &packed) else {
            assert!(!kernels::bf16_matmul_available());
            continue;
        };
        let reference = kernels::matmul_t_bf16_reference(&x, m, &w, n, k);
        for i in 0..m {
            for j in 0..n {
                let mag: f32 = (0..k).map(|q| (x[i * k + q] * w[j * k + q]).abs()).sum();
                let exact: f64 = (0..k).map(|q| x[i * k + q] as f64 * w[j * k + q] as f64).sum();
                let (got, want) = (y[i * n + j], reference[i * n + j]);
                assert!((got - want).abs() <= 1e-5 * mag + 1e-6, "[{m}, {k}] x [{n}, {k}] at ({i}, {j}): kernel {got}, reference {want}");
                assert!((got as f64 - exact).abs() <= 2.0 * 2f64.powi(-8) * mag as f64 + 1e-6, "({i}, {j}): {got} is further than bf16 rounding from {exact}");
            }
        }
        checked += 1;
    }
    assert!(checked == 7 || !kernels::bf16_matmul_available());
}

#[test]
fn linear_layers_use_bf16_only_in_frozen_scope_without_gradients() {
    use hyperdas::model::llama::Linear;
    let (m, k, n) = (10, 40, 50);
    let x = Tensor::from_vec(normal_f32(m * k, 3), (m, k), &DEV).unwrap(); // [m, k]
    let w = Tensor::from_vec(normal_f32(n * k, 4), (n, k), &DEV).unwrap(); // [n, k]
    let lin = Linear::new(w.clone(), None);
    let exact = x.matmul(&w.t().unwrap()).unwrap(); // [m, n]
    assert_eq!(max_diff(&lin.forward(&x).unwrap(), &exact), 0.0, "outside the scope: the f32 matmul");
    let inside = kernels::with_frozen_bf16(true, || lin.forward(&x).unwrap());
    assert!(!kernels::frozen_bf16_active(), "the scope is restored");
    if kernels::bf16_matmul_available() {
        let packed = kernels::PackedBf16::pack(&w.flatten_all().unwrap().to_vec1::<f32>().unwrap(), n, k);
        let want = kernels::matmul_t_bf16(&x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), m, &packed).unwrap();
        assert_eq!(inside.flatten_all().unwrap().to_vec1::<f32>().unwrap(), want, "inside the scope: the bf16 kernel");
        let d = max_diff(&inside, &exact);
        assert!(d > 0.0 && d < 0.1, "bf16 differs from f32 by rounding only: {d}");
    } else {
        assert_eq!(max_diff(&inside, &exact), 0.0, "no AVX-512 BF16: the f32 matmul");
    }
    // An input that needs a gradient takes the f32 path inside the scope too.
    let xv = Var::from_tensor(&x).unwrap();
    let tracked = kernels::with_frozen_bf16(true, || lin.forward(xv.as_tensor()).unwrap());
    assert_eq!(max_diff(&tracked, &exact), 0.0);
    // A layer whose weight was replaced is not served the old packing.
    let mut other = lin.clone();
    other.weight = (&w * 2.0).unwrap();
    let doubled = kernels::with_frozen_bf16(true, || other.forward(&x).unwrap());
    let want = kernels::with_frozen_bf16(true, || Linear::new((&w * 2.0).unwrap(), None).forward(&x).unwrap());
    assert_eq!(max_diff(&doubled, &want), 0.0);
}

#[test]
fn clean_passes_in_bf16_stay_within_rounding_of_f32() {
    use hyperdas::model::{CleanMatmul, Target, TokenBatch};
    let mut lm = load(&fixture("tiny-llama"), DType::F32);
    let batch = TokenBatch::from_host(vec![1, 5, 9, 13, 17, 21, 2, 3, 4, 5, 6, 7], vec![1; 12], 2, 6, &DEV).unwrap();
    let f32_states = Target::new(&lm.model, None).clean(&batch).unwrap(); // [2, 6, L+1, D]
    match lm.model.set_clean_matmul(CleanMatmul::Bf16) {
        Ok(()) => {
            assert!(lm.model.clean_bf16());
            let bf16_states = Target::new(&lm.model, None).clean(&batch).unwrap(); // [2, 6, L+1, D]
            let scale = f32_states.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() as f64;
            let d = max_diff(&bf16_states, &f32_states);
            assert!(d > 0.0 && d < 0.05 * scale, "bf16 clean states {d} from f32 (largest value {scale})");
            // A forward pass outside the clean passes stays exact.
            let direct = lm.model.forward_hidden(&batch, None).unwrap().stacked.unwrap();
            assert_eq!(max_diff(&direct, &f32_states), 0.0);
            // Releasing the f32 weights below block 1 frees them and changes no clean state; an
            // f32 pass through those blocks is then a clear error, blocks from 1 on still run.
            let per_block = lm.model.layers[0].self_attn.q_proj.weight.elem_count() * 4;
            let freed = lm.model.release_f32_below(1).unwrap();
            assert!(freed >= per_block, "freed {freed} bytes");
            let after = Target::new(&lm.model, None).clean(&batch).unwrap();
            assert_eq!(max_diff(&after, &bf16_states), 0.0);
            let e = lm.model.forward_hidden(&batch, None).unwrap_err().to_string();
            assert!(e.contains("released"), "{e}");
            let ctx = lm.model.context(&batch).unwrap();
            let resid = f32_states.narrow(2, 1, 1).unwrap().squeeze(2).unwrap(); // [2, 6, D]
            let positions = Tensor::from_vec(vec![5u32, 5], (2, 1), &DEV).unwrap();
            assert!(lm.model.logits_from(1, &resid, &ctx, &positions).is_ok());
        }
        Err(e) => {
            assert!(!kernels::bf16_matmul_available(), "{e}");
            assert!(e.to_string().contains("AVX-512 BF16"), "{e}");
        }
    }
    assert!(lm.model.set_clean_matmul(CleanMatmul::Auto).is_ok());
    assert_eq!(lm.model.clean_bf16(), kernels::bf16_matmul_available());
    let mut f64_model = load(&fixture("tiny-llama"), DType::F64);
    let e = f64_model.model.set_clean_matmul(CleanMatmul::Bf16).unwrap_err().to_string();
    assert!(e.contains("f32 target"), "{e}");
    assert!(f64_model.model.set_clean_matmul(CleanMatmul::Auto).is_ok() && !f64_model.model.clean_bf16());
    assert_eq!(f64_model.model.release_f32_below(1).unwrap(), 0, "nothing is released without bf16 clean passes");
}

#[test]
fn smollm2_clean_states_in_bf16_stay_within_two_percent() {
    // The numerical change the bf16 clean passes make on a real model: the relative difference
    // (‖bf16 − f32‖ / ‖f32‖ over the real tokens) of SmolLM2's residual stream at the first,
    // middle and last sites of a RAVEL-like prompt batch.
    use hyperdas::model::{CleanMatmul, Target, TokenBatch};
    let Some(path) = smollm2() else { return };
    let mut lm = load(&path, DType::F32);
    let prompts = ["Paris is a city in the country of", "The city of Tokyo is on the continent of", "People in Lagos speak the language of"];
    let ids: Vec<Vec<u32>> = prompts.iter().map(|p| lm.tokenizer.encode(p).unwrap()).collect();
    let batch = TokenBatch::left_padded(&ids, lm.tokenizer.padding_id(), &DEV).unwrap();
    let exact = Target::new(&lm.model, None).clean(&batch).unwrap(); // [3, T, 31, D]
    if lm.model.set_clean_matmul(CleanMatmul::Bf16).is_err() {
        assert!(!kernels::bf16_matmul_available());
        return;
    }
    let rounded = Target::new(&lm.model, None).clean(&batch).unwrap(); // [3, T, 31, D]
    let n = lm.model.num_layers();
    let mut line = Vec::new();
    for site in [1, n / 2, n] {
        let (a, b) = (exact.narrow(2, site, 1).unwrap(), rounded.narrow(2, site, 1).unwrap()); // [3, T, 1, D]
        let rel = ((&b - &a).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() / a.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap()).sqrt();
        line.push(format!("site {site}: {rel:.2e}"));
        assert!(rel > 0.0 && rel < 0.02, "site {site}: bf16 clean states {rel} from f32 (relative)");
    }
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SmolLM2 bf16 clean states, relative difference from f32: {}", line.join(", "));
}

#[test]
fn intervened_pass_in_bf16_stays_within_rounding_in_value_and_gradient() {
    // The bf16 intervened pass (forward and input gradient through the frozen upper blocks)
    // against the exact f32 taped pass, for the Llama and the Gemma 3 block; then with every
    // block's f32 weights released, bitwise the same.
    use hyperdas::model::CleanMatmul;
    for name in ["tiny-llama", "tiny-gemma3"] {
        let mut lm = load(&fixture(name), DType::F32);
        let rows: Vec<Vec<u32>> = ["Paris is a city in the country of", "Tokyo is in"].iter().map(|p| lm.tokenizer.encode_prompt(p).unwrap()).collect();
        let batch = hyperdas::model::TokenBatch::left_padded(&rows, lm.tokenizer.padding_id(), &DEV).unwrap();
        let (b, t) = batch.dims();
        let ctx = lm.model.context(&batch).unwrap();
        let positions = Tensor::new(&[[t as u32 - 2, t as u32 - 1], [t as u32 - 1, t as u32 - 1]], &DEV).unwrap();
        let layer = 1;
        let clean = lm.model.forward_hidden(&batch, Some(&[layer])).unwrap().stacked.unwrap().squeeze(2).unwrap(); // [B, T, D]
        let w = randn(&[b, 2, lm.model.config.vocab_size], 15).to_dtype(DType::F32).unwrap();
        let run = |model: &hyperdas::model::Llama| {
            let v = Var::from_tensor(&clean).unwrap();
            let logits = model.logits_from(layer, v.as_tensor(), &ctx, &positions).unwrap(); // [B, 2, V]
            let g = (&logits * &w).unwrap().sum_all().unwrap().backward().unwrap();
            (logits, g.get(v.as_tensor()).unwrap().clone())
        };
        let (exact, g_exact) = run(&lm.model);
        if lm.model.set_intervened_matmul(CleanMatmul::Bf16).is_err() {
            assert!(!kernels::bf16_matmul_available());
            continue;
        }
        let (rounded, g_rounded) = run(&lm.model);
        let rel = |a: &Tensor, e: &Tensor| max_diff(a, e) / e.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        let (dv, dg) = (rel(&rounded, &exact), rel(&g_rounded, &g_exact));
        assert!(dv > 0.0 && dv < 0.05, "{name}: bf16 logits {dv:e} from f32 (relative to the largest)");
        assert!(dg > 0.0 && dg < 0.05, "{name}: bf16 residual gradient {dg:e} from f32 (relative to the largest)");
        lm.model.set_clean_matmul(CleanMatmul::Bf16).unwrap();
        let freed = lm.model.release_f32_below(layer).unwrap();
        assert!(lm.model.layers.iter().all(|blk| blk.self_attn.q_proj.weight.dim(1).unwrap() == 0), "{name}: every block released ({freed} bytes)");
        let (after, g_after) = run(&lm.model);
        assert_eq!(max_diff(&after, &rounded), 0.0, "{name}");
        assert_eq!(max_diff(&g_after, &g_rounded), 0.0, "{name}");
    }
}
