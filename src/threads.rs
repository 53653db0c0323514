//! The process's thread count, settled once at start-up.
//!
//! candle asks for its thread count on every matmul and every parallel element-wise op
//! (`candle_core::utils::get_num_threads`). Without `RAYON_NUM_THREADS` that answer is computed
//! afresh each time from the CPU mask and `/proc/cpuinfo` (parsed by `num_cpus`), which cost
//! about 1 % of the profiled samples of a SmolLM2 training step (perf, docs/benchmarks.md). So
//! the binary computes candle's default once and sets `RAYON_NUM_THREADS` to it; the count
//! candle uses does not change. rayon's global pool (our kernels' `par_iter`s), which reads the
//! same variable, then also starts candle's count of threads (one per physical core) instead of
//! one per logical CPU; the two were equal on every machine measured here (no SMT). A user's
//! own `RAYON_NUM_THREADS` is left as it is, and
//! [`user_setting`] keeps what the user set, for the benchmarks' reports.

use std::sync::OnceLock;

static USER_SETTING: OnceLock<Option<String>> = OnceLock::new();

/// Fix the thread count for the rest of the process. Call first thing in `main`, before any
/// thread starts (it writes the environment).
pub fn settle() {
    let user = std::env::var("RAYON_NUM_THREADS").ok();
    let valid = user.as_deref().and_then(|s| s.parse::<usize>().ok()).is_some_and(|n| n > 0);
    if !valid {
        // candle's own default (its CPU mask / physical-core rule), computed this once.
        let n = candle_core::utils::get_num_threads();
        // SAFETY: called at the top of `main`, before any other thread exists, so nothing can
        // read the environment concurrently.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    let _ = USER_SETTING.set(user);
}

/// What the user had set `RAYON_NUM_THREADS` to ("unset" if nothing), whether or not
/// [`settle`] has run since.
pub fn user_setting() -> String {
    match USER_SETTING.get() {
        Some(v) => v.clone(),
        None => std::env::var("RAYON_NUM_THREADS").ok(),
    }
    .unwrap_or_else(|| "unset".into())
}
