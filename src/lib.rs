//! # hyperdas
//!
//! HyperDAS (Sun et al., ICLR 2025, "Towards Automating Mechanistic Interpretability with
//! Hypernetworks") in Rust: a hypernetwork reads a concept instruction plus the hidden states of
//! a base and a counterfactual prompt, and outputs which token positions of the residual stream
//! to intervene on and the feature subspace of the concept; distributed alignment search (DAS)
//! swaps that feature from the counterfactual into the base.
//!
//! Layout (one folder per concern, created as it gets content):
//!
//! * [`model`]: target LMs. A differentiable Llama-family runtime with residual-stream access,
//!   HF (safetensors) and GGUF loading, tokenizers.
//! * [`data`]: RAVEL: the embedded knowledge base, counterfactual pair generation, filtering
//!   by the target model, JSONL / Arrow readers and writers, collation.
//! * [`rng`]: the seeded, version-stable random generator used for every draw.
//! * [`params`]: the registry of trainable parameters and the no-gradient guard.
//! * [`parity`]: comparison against transformers reference dumps.
//! * [`fetch`]: real pretrained weights from package registries.
//! * [`cli`]: the `hyperdas` command line.

pub mod alloc;
pub mod atomic;
pub mod cli;
pub mod config;
pub mod data;
pub mod error;
pub mod experiment;
pub mod export;
pub mod fetch;
pub mod hypernet;
pub mod intervention;
pub mod model;
pub mod params;
pub mod parity;
pub mod profile;
pub mod progress;
pub mod report;
pub mod rng;
pub mod threads;
pub mod toy;
pub mod train;

pub use error::{Error, Result};
