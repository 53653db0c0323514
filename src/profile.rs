//! A phase timer for benchmarks: code marks the end of named phases with [`mark`]; while a
//! [`Recording`] is alive on this thread, each mark adds the time since the previous mark to
//! its phase. Without a recording a mark costs one thread-local check.

use std::cell::RefCell;
use std::time::Instant;

struct State {
    last: Instant,
    totals: Vec<Phase>,
}

/// One phase of a recording: its total seconds and the most heap live at once during it
/// (bytes; counted by [`crate::alloc::Counting`] where the binary installs it, 0 otherwise).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Phase {
    pub name: &'static str,
    pub seconds: f64,
    pub peak_heap: usize,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// End the current phase: its time (since the last mark, or the recording's start) goes to `name`.
pub fn mark(name: &'static str) {
    STATE.with(|s| {
        if let Some(st) = s.borrow_mut().as_mut() {
            let now = Instant::now();
            let peak = crate::alloc::Counting::peak();
            crate::alloc::Counting::reset_peak();
            let dt = (now - st.last).as_secs_f64();
            st.last = now;
            match st.totals.iter_mut().find(|p| p.name == name) {
                Some(p) => {
                    p.seconds += dt;
                    p.peak_heap = p.peak_heap.max(peak);
                }
                None => st.totals.push(Phase { name, seconds: dt, peak_heap: peak }),
            }
        }
    });
}

/// Records marks on this thread until [`finish`](Recording::finish) or drop.
pub struct Recording(());

impl Recording {
    pub fn start() -> Self {
        crate::alloc::Counting::reset_peak();
        STATE.with(|s| *s.borrow_mut() = Some(State { last: Instant::now(), totals: Vec::new() }));
        Recording(())
    }

    /// The phases in first-seen order.
    pub fn finish(self) -> Vec<Phase> {
        STATE.with(|s| s.borrow_mut().take().map(|st| st.totals).unwrap_or_default())
    }
}

impl Drop for Recording {
    fn drop(&mut self) {
        STATE.with(|s| *s.borrow_mut() = None);
    }
}

/// Peak resident memory of this process so far (`VmHWM` of /proc/self/status; Linux only).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// What a benchmark ran on, for its first line: the CPU's model name (`/proc/cpuinfo`, Linux;
/// "unknown CPU" elsewhere), its logical cores and the widest SIMD level gemm's kernels can use
/// here (AVX-512 runs gemm's `x86-v4` kernels, about 1.7× the AVX2 ones on the training shapes;
/// docs/benchmarks.md). Figures from machines with different lines are not comparable.
pub fn machine_description() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    // The first processor's `key : value` line.
    let field = |key: &str| info.lines().find(|l| l.split(':').next().map(str::trim) == Some(key)).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string());
    let mut model = field("model name").unwrap_or_else(|| "unknown CPU".into());
    // Cloud VMs often report a bare "AMD EPYC": the family tells Zen 3 (25) from Zen 5 (26).
    if let (Some(f), Some(m)) = (field("cpu family"), field("model")) {
        model = format!("{model} (family {f}, model {m})");
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    format!("{model}, {cores} logical cores, {}", simd_level())
}

/// This machine's host name (Linux: the kernel's; else `$HOSTNAME` / `$COMPUTERNAME`), for
/// run provenance and TensorBoard's file names.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| std::env::var("COMPUTERNAME").ok())
        .unwrap_or_else(|| "unknown-host".into())
}

fn simd_level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            "AVX-512"
        } else if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            "AVX2+FMA"
        } else {
            "SSE only"
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        "NEON"
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        "scalar"
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn marks_add_up_per_phase() {
        super::mark("ignored"); // no recording: nothing happens
        let r = super::Recording::start();
        super::mark("a");
        super::mark("b");
        super::mark("a");
        let phases = r.finish();
        assert_eq!(phases.iter().map(|p| p.name).collect::<Vec<_>>(), ["a", "b"]);
        assert!(phases.iter().all(|p| p.seconds >= 0.0));
    }

    #[test]
    fn machine_description_names_cores_and_simd() {
        let m = super::machine_description();
        assert!(m.contains("logical cores"), "{m}");
        assert!(["AVX-512", "AVX2+FMA", "SSE only", "NEON", "scalar"].iter().any(|s| m.ends_with(s)), "{m}");
    }
}
