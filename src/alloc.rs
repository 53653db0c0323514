//! Allocator tuning for the training loop.
//!
//! Each step allocates and frees the same large activation buffers (hundreds of KB to tens of
//! MB). glibc's malloc serves those from fresh `mmap`s or trims freed memory back to the
//! system, so every step page-faults its buffers in again: the kernel zeroing new pages took
//! ~10% of a SmolLM2 training step (perf, docs/benchmarks.md). Raising the mmap threshold to
//! its maximum (32 MB) and never trimming keeps freed memory in the heap for the next step.
//! Buffers above 32 MB (the hypernetwork's embedding gradient `[V, D]`, 113 MB on SmolLM2; the
//! stacked hidden states of a batch, 33 MB) would still be fresh `mmap`s each time, so the
//! main thread's heap also takes those (`M_MMAP_MAX = 0`): the embedding lookup's backward
//! went from 85 ms to 35 ms, and a 15-step `bench train` from 1.53 M page faults to 0.70 M
//! (most of the rest is the state cache filling). Other threads' arenas still `mmap` what does
//! not fit their 64 MB heaps. The user's own `MALLOC_*` environment settings win.

/// Apply the tuning (glibc only; elsewhere a no-op). Call once at start-up.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        const M_MMAP_MAX: i32 = -4;
        let set_by_user = |name: &str| std::env::var_os(name).is_some();
        // SAFETY: mallopt only changes allocator parameters; called before any threads start.
        unsafe {
            if !set_by_user("MALLOC_MMAP_THRESHOLD_") {
                mallopt(M_MMAP_THRESHOLD, 32 << 20);
            }
            if !set_by_user("MALLOC_MMAP_MAX_") {
                mallopt(M_MMAP_MAX, 0);
            }
            if !set_by_user("MALLOC_TRIM_THRESHOLD_") {
                mallopt(M_TRIM_THRESHOLD, i32::MAX);
            }
        }
    }
}
