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

/// The system allocator, counting the bytes it has handed out: the live total and its peak
/// (`hyperdas bench train` reports the peak beside the peak RSS, and per phase of a step).
/// Two relaxed atomic operations per allocation; the binary installs it as the global allocator.
pub struct Counting;

static LIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
static PEAK: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl Counting {
    /// Bytes allocated and not yet freed.
    pub fn live() -> usize {
        LIVE.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The most bytes live at once since the start or the last [`Counting::reset_peak`].
    pub fn peak() -> usize {
        PEAK.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Start a new peak from the bytes live now.
    pub fn reset_peak() {
        PEAK.store(Self::live(), std::sync::atomic::Ordering::Relaxed);
    }

    fn add(n: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = LIVE.fetch_add(n, Relaxed) + n;
        PEAK.fetch_max(now, Relaxed);
    }

    fn sub(n: usize) {
        LIVE.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; only counters change.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            Self::add(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
        let p = unsafe { std::alloc::System.alloc_zeroed(layout) };
        if !p.is_null() {
            Self::add(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        Self::sub(layout.size());
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            Self::sub(layout.size());
            Self::add(new_size);
        }
        p
    }
}
