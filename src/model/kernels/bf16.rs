//! `y = x Wᵀ` with both operands rounded to bf16 and f32 accumulation, on AVX-512 BF16
//! (`vdpbf16ps`): the matmul of the frozen target's linear layers, in the clean passes and in
//! the intervened pass (forward, and the input gradient `dy W` through [`linear_back_bf16`]).
//!
//! ```text
//! y[m, n] = Σ_k bf16(x[m, k]) · bf16(W[n, k])      (products exact, sums in f32)
//! ```
//!
//! `bf16(v)` rounds to nearest even (8 significant bits). One `vdpbf16ps` does 32 such products
//! into 16 f32 sums, twice the work of an f32 FMA on the same registers, and the packed weight is
//! half the bytes. The numerical change is that of running the frozen model in bf16 with f32
//! accumulation: relative errors of about 2⁻⁸ on each product's inputs, averaged over `k`.
//!
//! Layout. The weight is packed once ([`PackedBf16::pack`]) into panels of [`PANEL`] output
//! columns; within a panel, pair `p` (inputs `2p`, `2p+1`) of column `j` is one `u32` (low half
//! input `2p`), the panel's 48 columns of one pair side by side, pairs one after another. The
//! input is rounded per call into rows of pairs (a bf16 row, read as `u32`). The micro-kernel
//! keeps an [`MR`] × 48 block of `y` in 24 registers; each step broadcasts one pair of each of
//! its rows and multiplies it with the panel's 3 registers of that pair. Pairs go in blocks of
//! [`KC`] so that a panel's block (24 KB) stays in L1 while every row block passes over it. Rows
//! are split across rayon threads; a row's sums do not depend on the thread count.

use rayon::prelude::*;

/// Output columns per panel (3 registers of 16).
pub const PANEL: usize = 48;
/// Rows per micro-kernel call.
pub const MR: usize = 8;
/// Input pairs per cache block.
pub const KC: usize = 128;

/// Whether this CPU runs the kernel (AVX-512 F and BF16).
pub fn bf16_matmul_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `v` rounded to the nearest bf16 (ties to even), as its 16 bits; NaN stays NaN.
pub fn bf16_bits(v: f32) -> u16 {
    let b = v.to_bits();
    if v.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// `v` rounded to the nearest bf16, as an f32.
pub fn round_bf16(v: f32) -> f32 {
    f32::from_bits((bf16_bits(v) as u32) << 16)
}

/// A weight `W [n, k]` packed for [`matmul_t_bf16`].
#[derive(Clone)]
pub struct PackedBf16 {
    n: usize,
    k: usize,
    /// Input pairs, `⌈k / 2⌉`.
    pairs: usize,
    /// `[panels, pairs, PANEL]`: columns past `n` and the odd input past `k` are zero.
    data: Vec<u32>,
}

impl std::fmt::Debug for PackedBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedBf16 [{}, {}]", self.n, self.k)
    }
}

impl PackedBf16 {
    /// Pack `w [n, k]` (row-major, PyTorch's `[out, in]`).
    pub fn pack(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "PackedBf16::pack: {} values for [{n}, {k}]", w.len());
        let pairs = k.div_ceil(2);
        let panels = n.div_ceil(PANEL);
        let mut data = vec![0u32; panels * pairs * PANEL];
        data.par_chunks_mut(pairs * PANEL).enumerate().for_each(|(p, panel)| {
            for j in 0..PANEL.min(n - p * PANEL) {
                let row = &w[(p * PANEL + j) * k..(p * PANEL + j + 1) * k]; // [k]
                for (q, pair) in row.chunks(2).enumerate() {
                    let lo = bf16_bits(pair[0]) as u32;
                    let hi = pair.get(1).map_or(0, |&v| bf16_bits(v) as u32);
                    panel[q * PANEL + j] = lo | (hi << 16);
                }
            }
        });
        PackedBf16 { n, k, pairs, data }
    }

    /// `(n, k)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }
}

/// `x [m, k] · Wᵀ` → `[m, n]` (row-major), on AVX-512 BF16; `None` when the CPU lacks it.
pub fn matmul_t_bf16(x: &[f32], m: usize, w: &PackedBf16) -> Option<Vec<f32>> {
    assert_eq!(x.len(), m * w.k, "matmul_t_bf16: {} values for [{m}, {}]", x.len(), w.k);
    if !bf16_matmul_available() {
        return None;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let (n, pairs) = (w.n, w.pairs);
        let mut xb = vec![0u32; m * pairs]; // [m, pairs]
        xb.par_chunks_mut(pairs).zip(x.par_chunks(w.k)).for_each(|(dst, src)| {
            // SAFETY: the CPU has AVX-512 F and BF16 (checked above); slices sized [pairs], [k].
            unsafe { avx512::round_row(src, dst) }
        });
        let mut y = vec![0f32; m * n]; // [m, n]
        if m == 0 || n == 0 {
            return Some(y);
        }
        let threads = rayon::current_num_threads().max(1);
        let rows_per_task = m.div_ceil(2 * threads).div_ceil(MR).max(1) * MR;
        y.par_chunks_mut(rows_per_task * n).enumerate().for_each(|(t, yc)| {
            let r0 = t * rows_per_task;
            let rows = yc.len() / n;
            // SAFETY: as above; `xb` rows r0..r0+rows exist, `yc` is [rows, n].
            unsafe { avx512::rows(&xb[r0 * pairs..(r0 + rows) * pairs], rows, w, yc) }
        });
        Some(y)
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// The same sums in plain Rust (bf16-rounded operands, f32 sums over pairs in order): the
/// reference the kernel is tested against, on any CPU.
pub fn matmul_t_bf16_reference(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0f32; m * n]; // [m, n]
    for i in 0..m {
        for j in 0..n {
            let mut s = 0f32;
            for q in 0..k {
                s += round_bf16(x[i * k + q]) * round_bf16(w[j * k + q]);
            }
            y[i * n + j] = s;
        }
    }
    y
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{KC, MR, PANEL, PackedBf16};

    /// One row of `x [k]` rounded into pairs `[⌈k/2⌉]`.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    pub unsafe fn round_row(src: &[f32], dst: &mut [u32]) {
        let k = src.len();
        let full = k / 32;
        unsafe {
            for c in 0..full {
                let lo = _mm512_loadu_ps(src.as_ptr().add(c * 32)); // [16]
                let hi = _mm512_loadu_ps(src.as_ptr().add(c * 32 + 16)); // [16]
                let b = _mm512_cvtne2ps_pbh(hi, lo); // [32] bf16, in order
                _mm512_storeu_si512(dst.as_mut_ptr().add(c * 16) as *mut _, std::mem::transmute::<__m512bh, __m512i>(b));
            }
        }
        for q in full * 16..dst.len() {
            let lo = super::bf16_bits(src[2 * q]) as u32;
            let hi = src.get(2 * q + 1).map_or(0, |&v| super::bf16_bits(v) as u32);
            dst[q] = lo | (hi << 16);
        }
    }

    /// `y [rows, n] = x [rows, pairs] · Wᵀ`, `y` zeroed on entry.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    pub unsafe fn rows(x: &[u32], rows: usize, w: &PackedBf16, y: &mut [f32]) {
        let (n, pairs) = (w.n, w.pairs);
        let panels = n.div_ceil(PANEL);
        let mut k0 = 0;
        while k0 < pairs {
            let kc = KC.min(pairs - k0);
            for p in 0..panels {
                let b = unsafe { w.data.as_ptr().add((p * pairs + k0) * PANEL) }; // [kc, PANEL]
                let cols = PANEL.min(n - p * PANEL);
                let mut r = 0;
                while r < rows {
                    let mr = MR.min(rows - r);
                    let a = unsafe { x.as_ptr().add(r * pairs + k0) }; // [mr, pairs] from pair k0
                    let c = unsafe { y.as_mut_ptr().add(r * n + p * PANEL) }; // [mr, n] from column p·PANEL
                    unsafe {
                        match mr {
                            8 => tile::<8>(a, pairs, b, kc, c, n, cols),
                            7 => tile::<7>(a, pairs, b, kc, c, n, cols),
                            6 => tile::<6>(a, pairs, b, kc, c, n, cols),
                            5 => tile::<5>(a, pairs, b, kc, c, n, cols),
                            4 => tile::<4>(a, pairs, b, kc, c, n, cols),
                            3 => tile::<3>(a, pairs, b, kc, c, n, cols),
                            2 => tile::<2>(a, pairs, b, kc, c, n, cols),
                            _ => tile::<1>(a, pairs, b, kc, c, n, cols),
                        }
                    }
                    r += MR;
                }
            }
            k0 += kc;
        }
    }

    /// `c [R, 48] += a [R, kc pairs] · b [kc, 48]` (`a` rows `lda` apart, `c` rows `ldc` apart,
    /// only the first `cols` columns of `c` written).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw,avx512vl")]
    unsafe fn tile<const R: usize>(a: *const u32, lda: usize, b: *const u32, kc: usize, c: *mut f32, ldc: usize, cols: usize) {
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 3]; R]; // [R, 3 × 16]
            for q in 0..kc {
                let b0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * PANEL) as *const _)); // [16 pairs]
                let b1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * PANEL + 16) as *const _)); // [16 pairs]
                let b2: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.add(q * PANEL + 32) as *const _)); // [16 pairs]
                for (r, acc_r) in acc.iter_mut().enumerate() {
                    let ar: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(r * lda + q) as i32)); // [16 × the pair]
                    acc_r[0] = _mm512_dpbf16_ps(acc_r[0], ar, b0);
                    acc_r[1] = _mm512_dpbf16_ps(acc_r[1], ar, b1);
                    acc_r[2] = _mm512_dpbf16_ps(acc_r[2], ar, b2);
                }
            }
            for (r, acc_r) in acc.iter().enumerate() {
                let row = c.add(r * ldc);
                for (v, acc_v) in acc_r.iter().enumerate() {
                    let left = cols.saturating_sub(v * 16).min(16);
                    if left == 0 {
                        break;
                    }
                    let mask: __mmask16 = if left == 16 { 0xffff } else { (1u16 << left) - 1 };
                    let p = row.add(v * 16);
                    let old = _mm512_maskz_loadu_ps(mask, p);
                    _mm512_mask_storeu_ps(p, mask, _mm512_add_ps(old, *acc_v));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Where it applies: a scope, and a linear layer's packed weight.

thread_local! {
    static FROZEN_BF16: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run `f` with the frozen linear layers of passes that need no gradient in bf16 (`on`) or f32
/// on this thread; the previous setting is restored afterwards, also on error or panic.
pub fn with_frozen_bf16<R>(on: bool, f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FROZEN_BF16.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(FROZEN_BF16.with(|c| c.replace(on)));
    f()
}

/// Whether [`with_frozen_bf16`] is on for this thread.
pub fn frozen_bf16_active() -> bool {
    FROZEN_BF16.with(|c| c.get())
}

/// A linear layer's weight packed for the kernel on first use, with the id of the tensor it
/// was packed from (a layer whose weight was replaced is never served a stale packing).
/// Clones share the slot (the intervened pass's backward runs on clones of the blocks).
#[derive(Debug, Clone, Default)]
pub struct PackedSlot(std::sync::Arc<std::sync::OnceLock<(candle_core::TensorId, std::sync::Arc<PackedBf16>)>>);

impl PackedSlot {
    /// A slot holding `packed` for the weight tensor `id`.
    pub fn holding(id: candle_core::TensorId, packed: std::sync::Arc<PackedBf16>) -> Self {
        let slot = PackedSlot::default();
        let _ = slot.0.set((id, packed));
        slot
    }

    /// Bytes of the packed weight, if packed.
    pub fn bytes(&self) -> usize {
        self.0.get().map_or(0, |(_, p)| p.bytes())
    }

    /// The packing of `w` (made now, and kept if the slot is empty).
    pub fn packing(&self, w: &candle_core::Tensor) -> crate::error::Result<std::sync::Arc<PackedBf16>> {
        if let Some((id, p)) = self.0.get()
            && *id == w.id()
        {
            return Ok(p.clone());
        }
        let (n, k) = w.dims2()?;
        let p = std::sync::Arc::new(super::host::with_host::<f32, _>(&w.to_dtype(candle_core::DType::F32)?, |ws| PackedBf16::pack(ws, n, k))?);
        if self.0.get().is_none() {
            let _ = self.0.set((w.id(), p.clone()));
        }
        Ok(p)
    }
}

/// `Wᵀ` of a linear layer packed for the kernel on first use (`dy W = dy (Wᵀ)ᵀ`, the input
/// gradient through a frozen layer), keyed like [`PackedSlot`].
#[derive(Debug, Clone, Default)]
pub struct PackedSlotT(PackedSlot);

impl PackedSlotT {
    /// A slot holding `packed` (of `Wᵀ`) for the weight tensor `id`.
    pub fn holding(id: candle_core::TensorId, packed: std::sync::Arc<PackedBf16>) -> Self {
        PackedSlotT(PackedSlot::holding(id, packed))
    }

    /// The packing of `wᵀ` for `w [out, in]` (made now, and kept if the slot is empty).
    pub fn packing(&self, w: &candle_core::Tensor) -> crate::error::Result<std::sync::Arc<PackedBf16>> {
        let slot = &self.0;
        if let Some((id, p)) = slot.0.get()
            && *id == w.id()
        {
            return Ok(p.clone());
        }
        let (n, k) = w.dims2()?;
        let wt = w.to_dtype(candle_core::DType::F32)?.t()?.contiguous()?; // [in, out]
        let p = std::sync::Arc::new(super::host::with_host::<f32, _>(&wt, |ws| PackedBf16::pack(ws, k, n))?);
        if slot.0.get().is_none() {
            let _ = slot.0.set((w.id(), p.clone()));
        }
        Ok(p)
    }
}

/// `dy [N, out] · W` → `[N, in]` (the input gradient of a frozen linear layer) through the
/// kernel, under the same conditions as [`linear_bf16`]; `None` otherwise.
pub fn linear_back_bf16(dy: &candle_core::Tensor, w: &candle_core::Tensor, slot: &PackedSlotT) -> crate::error::Result<Option<candle_core::Tensor>> {
    if !kernel_applies(dy, w) {
        return Ok(None);
    }
    let (m, out) = dy.dims2()?;
    let packed = slot.packing(w)?;
    let (inp, k) = packed.dims();
    if k != out {
        return Err(crate::error::Error::invalid(format!("linear backward: gradient has {out} features, the weight {k} outputs")));
    }
    through_kernel(dy, m, &packed, inp) // [m, in]
}

/// `x [N, in] · Wᵀ` through the kernel when it applies: inside [`with_frozen_bf16`], neither
/// operand tracked by autograd, both f32 on the CPU, AVX-512 BF16 present. `None` otherwise
/// (the caller takes the f32 path). A released weight (`[out, 0]`, see `Linear::release_f32`)
/// is served from its packing.
pub fn linear_bf16(x: &candle_core::Tensor, w: &candle_core::Tensor, slot: &PackedSlot) -> crate::error::Result<Option<candle_core::Tensor>> {
    if !kernel_applies(x, w) {
        return Ok(None);
    }
    let (m, k) = x.dims2()?;
    let packed = slot.packing(w)?;
    let (n, kw) = packed.dims();
    if k != kw {
        return Err(crate::error::Error::invalid(format!("linear layer: input has {k} features, the weight {kw}")));
    }
    through_kernel(x, m, &packed, n) // [m, n]
}

/// Whether the kernel serves `a · wᵀ`-shaped products of these operands: inside
/// [`with_frozen_bf16`], neither tracked by autograd, both f32 on the CPU, AVX-512 BF16 present.
fn kernel_applies(a: &candle_core::Tensor, w: &candle_core::Tensor) -> bool {
    use candle_core::DType;
    frozen_bf16_active() && !a.track_op() && !w.track_op() && a.device().is_cpu() && w.device().is_cpu() && a.dtype() == DType::F32 && w.dtype() == DType::F32 && bf16_matmul_available()
}

/// `a [m, ·] · packedᵀ` → `[m, cols]` on the kernel; `None` where the kernel declines.
fn through_kernel(a: &candle_core::Tensor, m: usize, packed: &PackedBf16, cols: usize) -> crate::error::Result<Option<candle_core::Tensor>> {
    let y = super::host::with_host::<f32, _>(a, |s| matmul_t_bf16(s, m, packed))?; // [m, cols]
    Ok(match y {
        Some(y) => Some(candle_core::Tensor::from_vec(y, (m, cols), a.device())?),
        None => None,
    })
}
