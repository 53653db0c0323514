//! Target language models: a differentiable Llama-family runtime (Llama, Qwen2, Gemma 3) with
//! residual-stream access.
//!
//! # Interpretability API (shapes: B batch, T tokens, L blocks, D hidden, V vocab)
//!
//! | call | gives |
//! |---|---|
//! | [`load::load`]`("dir" \| "x.gguf" \| "smollm2-135m" \| "org/name", &opts)` | model + tokenizer |
//! | [`TokenBatch::left_padded`]`(rows, pad, dev)` | ids / mask `[B, T]`, positions `cumsum(mask) − 1` |
//! | [`Llama::forward_hidden`]`(&batch, None)` | `stacked [B, T, L+1, D]` (index l = residual entering block l, index L = after the final norm, as HF) and `final_normed [B, T, D]` |
//! | [`Llama::forward_hidden`]`(&batch, Some(&[l]))` | only the requested indices, `[B, T, k, D]` |
//! | [`Llama::context`]`(&batch)` | mask `[B, 1, T, T]` and RoPE tables, reused by every block |
//! | [`Llama::forward_from`]`(l, &resid, &ctx)` | blocks `l..L` + final norm from a residual `[B, T, D]` entering block l: an intervention at l never recomputes blocks `0..l` |
//! | [`Llama::forward_with_hook`]`(&batch, \|l, x\| ..)` | a full pass that may replace the residual entering any block |
//! | [`Llama::logits_at`]`(&final_normed, &positions [B, K])` | `[B, K, V]`, never the full `[B, T, V]` |
//! | [`Target`] | the frozen model as a method sees it: clean states (cached), `run_from(site, residual)`, logits at positions |
//! | [`Site`] | the site vocabulary (`blocks.{l}.hook_resid_pre`, pyvene's `block_output.{l}`, ...) |
//!
//! The model's weights are plain tensors (frozen: no gradient is ever stored for them), but
//! every op is differentiable, so a `Var` mixed into the residual stream gets exact gradients
//! through all later blocks.

pub mod batch;
pub mod block;
pub mod cache;
pub mod config;
pub mod gguf;
pub mod gpt;
#[cfg(feature = "hub")]
pub mod hub;
pub mod kernels;
pub mod layers;
pub mod llama;
pub mod load;
pub mod prefix;
pub mod rope;
pub mod site;
pub mod tape;
pub mod target;
pub mod tokenizer;
pub mod weights;

pub use batch::{ForwardContext, LocalAttention, TokenBatch};
pub use config::{Activation, Architecture, Gemma3Config, GptConfig, LayerKind, LlamaConfig, QkNorm, RopeConfig, RopeScaling};
pub use llama::{HiddenStates, Llama};
pub use load::{CleanMatmul, LoadOptions, LoadedModel, ModelSource, load};
pub use prefix::PrefixCache;
pub use site::Site;
pub use target::Target;
pub use tokenizer::{StartToken, TextTokenizer};
