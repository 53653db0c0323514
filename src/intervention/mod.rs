//! Interventions: pure functions of tensors. Their parameters come from elsewhere — a learned
//! table (DAS, MDAS) or the hypernetwork (HyperDAS) — and live in the one [`ParamStore`](crate::params::ParamStore).
//!
//! Shapes: B batch, T_b base tokens, T_s source tokens, D hidden size, k subspace rank.
//!
//! | step | function | equation |
//! |---|---|---|
//! | position mixing | [`mix::mix_positions`] | `m[b,j] = Σ_{i<T_s} W[b,i,j] S[b,i] + W[b,T_s,j] h[b,j]` with `W [B, T_s+1, T_b]` (row `T_s` = "self") |
//! | DAS | [`subspace::das`] | `h' = h + R Rᵀ (m − h)`, `R [D, k]` orthonormal, shared |
//! | ReflectSelect | [`subspace::reflect_select`] | `W_b = (I − 2 u_b u_bᵀ) R`, `h' = h + W_b W_bᵀ (m − h)`, rank-1 form, never `[B, D, D]` |
//! | ReflectSelect, n reflections | [`subspace::reflect_select_many`] | `W_b = (I − 2 u_{b,1} u_{b,1}ᵀ) ⋯ (I − 2 u_{b,n} u_{b,n}ᵀ) R`, `h' = h + W_b W_bᵀ (m − h)`, applied to vectors |
//! | MaskSelect | [`subspace::masked_rotation`] | `h' = h + R diag(σ_b) Rᵀ (m − h)`, `σ_b ∈ [0,1]^k` per example |
//! | Boundless DAS | [`subspace::masked_rotation`] + [`subspace::boundary_mask`] | `R [D, D]`, `σ_i = sigmoid((⌈β D⌉ − i)/τ)`-style boundary |
//! | none | [`subspace::full`] | `h' = m` (full-vector, position-weighted replacement) |
//!
//! Position selection ([`selection`]): the inference modes (soft, column_argmax, bidding_argmax,
//! global_argmax, groundtruth) that turn the pointer's `W` into discrete choices, and the
//! ground-truth `W` of fixed positions.
//!
//! Orthonormality ([`orthonormal`]): `R` starts as the Q of a QR of a seeded Gaussian (never
//! uninitialised memory) and is kept orthonormal under AdamW by a polar retraction after every
//! optimizer step (`R ← R (RᵀR)^(-1/2)`, Newton–Schulz on the k × k Gram matrix).

pub mod mix;
pub mod orthonormal;
pub mod selection;
pub mod subspace;
