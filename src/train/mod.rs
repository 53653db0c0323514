//! Shared training infrastructure: the optimizer, the learning-rate schedule, checkpoints and
//! the metrics log. The toy world's pre-training and HyperDAS training both use these.
//!
//! * [`optim::AdamW`]: decoupled weight decay (Loshchilov & Hutter), bias-corrected, optional
//!   global-norm gradient clipping; its moments are saved in checkpoints, so runs resume exactly.
//! * [`schedule::Schedule`]: linear warm-up, then constant / linear / cosine decay; [`share_of`]:
//!   a length given as a share of a run.
//! * [`checkpoint`]: parameters and optimizer state as safetensors, step and settings as JSON.
//! * [`metrics::MetricsLog`]: one JSON object per line (`metrics.jsonl`), and optionally the same
//!   scalars as TensorBoard events ([`tensorboard`]).

pub mod checkpoint;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod schedule;
pub mod tensorboard;

pub use metrics::MetricsLog;
pub use optim::{AdamW, AdamWConfig, Group, GroupLr};
pub use schedule::{Decay, Schedule, share_of};
