//! A phase timer for benchmarks: code marks the end of named phases with [`mark`]; while a
//! [`Recording`] is alive on this thread, each mark adds the time since the previous mark to
//! its phase. Without a recording a mark costs one thread-local check.

use std::cell::RefCell;
use std::time::Instant;

struct State {
    last: Instant,
    totals: Vec<(&'static str, f64)>,
}

thread_local! {
    static STATE: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// End the current phase: its time (since the last mark, or the recording's start) goes to `name`.
pub fn mark(name: &'static str) {
    STATE.with(|s| {
        if let Some(st) = s.borrow_mut().as_mut() {
            let now = Instant::now();
            let dt = (now - st.last).as_secs_f64();
            st.last = now;
            match st.totals.iter_mut().find(|(n, _)| *n == name) {
                Some((_, t)) => *t += dt,
                None => st.totals.push((name, dt)),
            }
        }
    });
}

/// Records marks on this thread until [`finish`](Recording::finish) or drop.
pub struct Recording(());

impl Recording {
    pub fn start() -> Self {
        STATE.with(|s| *s.borrow_mut() = Some(State { last: Instant::now(), totals: Vec::new() }));
        Recording(())
    }

    /// The phases in first-seen order with their total seconds.
    pub fn finish(self) -> Vec<(&'static str, f64)> {
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
        assert_eq!(phases.iter().map(|p| p.0).collect::<Vec<_>>(), ["a", "b"]);
        assert!(phases.iter().all(|p| p.1 >= 0.0));
    }
}
