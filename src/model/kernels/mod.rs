//! Fused CPU kernels for the transformer's element-wise work, with hand-written backward passes.
//!
//! Every function here has two implementations:
//!
//! * **fused**: one pass over contiguous host memory (f32 or f64 on the CPU), rows split across
//!   rayon threads. In an autograd graph it is a single candle custom op whose `bwd` is the
//!   hand-written backward below (each one checked against finite differences in f64 and
//!   against the composed version: `tests/kernels.rs`).
//! * **composed**: the same equation from candle ops that all have a backward (the reference;
//!   used on other devices and dtypes, e.g. CUDA or bf16, and when [`set_fused`] is off).
//!
//! One file per op, each holding the op's host loops (forward and backward), its candle custom
//! op, its public fused entry point, its composed form and its backward function:
//!
//! | file | op | forward | backward |
//! |---|---|---|---|
//! | `rms_norm.rs` | [`rms_norm`] | `y = w ⊙ x · r`, `r = 1/√(mean(x²) + ε)` | `dx = r (g − x̂ mean(g ⊙ x̂))`, `g = dy ⊙ w`, `x̂ = x r`; `dw = Σ dy ⊙ x̂` |
//! | `softmax.rs` | [`softmax_masked`] | `p = softmax(s + mask)` over the last dim | `ds = p ⊙ (dp − Σ p ⊙ dp)` |
//! | `rope.rs` | [`rope`] | `y = x cos + rotate_half(x) sin` | the inverse rotation of `dy` |
//! | `gated.rs` | [`silu_mul`] | `h = silu(g) ⊙ u` | `dg = dh ⊙ u ⊙ σ(g)(1 + g(1 − σ(g)))`, `du = dh ⊙ silu(g)` |
//! | `gated.rs` | [`gelu_mul`] | `h = ½g(1 + t) ⊙ u`, `t = tanh(c(g + 0.044715 g³))` | `dg = dh ⊙ u ⊙ (½(1 + t) + ½g(1 − t²) c (1 + 3·0.044715 g²))`, `du = dh ⊙ gelu(g)` |
//! | `attention.rs` | [`attention`] | `O = softmax(Q Kᵀ/√hd + mask) V` (GQA) | `dS = P ⊙ (dP − rowsum(P ⊙ dP))/√hd`, `dP = dO Vᵀ`; `dQ = dS K`, `dK = dSᵀ Q`, `dV = Pᵀ dO` |
//! | `cross_attention.rs` | [`cross_attention`] | `attention(q, rope(e Wkᵀ), e Wvᵀ)` over constant `e` | `dq`; `dWk = (rope⁻¹ dK)ᵀ e`, `dWv = dVᵀ e` |
//! | `unit_rows.rs` | [`unit_rows`] | `y = x / (‖x‖ + 1e-12)` (constants only) | none |
//!
//! `bf16.rs`: [`matmul_t_bf16`], `y = bf16(x) bf16(W)ᵀ` with f32 sums on AVX-512 BF16, for frozen
//! passes that need no gradient (no backward).
//!
//! [`graft`] (`graft.rs`) attaches a value computed outside the graph to an input with a given
//! backward (used for linear layers whose weight or input needs no gradient, [`matmul_t`]:
//! candle's matmul backward computes both gradients, which doubles the backward cost through a
//! frozen model). `host.rs` holds what the files share: the [`KernelFloat`] types, the
//! f64-accumulated dot product, host access to storages and tensors, and [`accum_dtype`].
//!
//! Why: composed, each of these is 5–10 candle ops, each a full pass over memory with an
//! allocation, and twice that in the backward (docs/benchmarks.md measures the difference).
//! Reductions use a fixed split of the rows, so results do not depend on the thread count.

use std::sync::atomic::{AtomicBool, Ordering};

mod attention;
mod bf16;
mod cross_attention;
mod gated;
mod graft;
mod host;
mod rms_norm;
mod rope;
mod softmax;
mod unit_rows;

pub use attention::{attention, attention_backward, attention_capped, attention_composed, attention_forward_saved, attention_forward_saved_applies};
pub use bf16::{PackedBf16, PackedSlot, PackedSlotT, bf16_matmul_available, frozen_bf16_active, linear_back_bf16, linear_bf16, matmul_t_bf16, matmul_t_bf16_reference, round_bf16, with_frozen_bf16};
pub use cross_attention::cross_attention;
pub use gated::{gelu_mul, gelu_mul_backward, gelu_mul_composed, silu_mul, silu_mul_backward};
pub use graft::{graft, matmul_t};
pub use host::{KernelFloat, accum_dtype};
pub use rms_norm::{rms_norm, rms_norm_backward, rms_norm_composed};
pub use rope::{rope, rope_composed, rope_inverse};
pub use softmax::{softmax_backward, softmax_masked, softmax_masked_composed};
pub use unit_rows::unit_rows;

static FUSED: AtomicBool = AtomicBool::new(true);

/// Use the fused kernels where they apply (default: on; `HYPERDAS_FUSED=0` turns them off at
/// start-up, for comparisons). Off, every op takes its composed path.
pub fn set_fused(on: bool) {
    FUSED.store(on, Ordering::Relaxed);
}

pub fn fused_enabled() -> bool {
    static ENV: std::sync::Once = std::sync::Once::new();
    ENV.call_once(|| {
        if std::env::var("HYPERDAS_FUSED").is_ok_and(|v| v == "0") {
            FUSED.store(false, Ordering::Relaxed);
        }
    });
    FUSED.load(Ordering::Relaxed)
}
