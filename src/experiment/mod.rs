//! The experiment layer: everything that turns the method ([`crate::hypernet`], the
//! interventions, a target model) into a run. It sits above the generic training machinery
//! ([`crate::train`]: optimizer, schedule, checkpoints, metrics log) and the toy world, and below
//! the report and the command line.
//!
//! * [`run`]: one run from a [`run::RunConfig`]: load the target, read and encode the data,
//!   build the interpreter, train, evaluate, write the run directory.
//! * [`trainer`]: the training and evaluation loops (HyperDAS and the DAS / MDAS baselines).
//! * [`loss`]: the objective, `L = L_pred + λ(step) · R(W)`, and its terms.
//! * [`sweep`]: a grid of runs (methods × layers × ranks × any setting), resumable.
//! * [`flops`]: analytic matmul FLOP counts of a training step.
//! * [`memory`]: the peak memory of a training step, from the configuration alone.
//! * [`apply`]: a trained run on one new (base, source, instruction): positions, predictions, basis.

pub mod apply;
pub mod flops;
pub mod loss;
pub mod memory;
pub mod run;
pub mod sweep;
pub mod trainer;
