//! What long work tells the person waiting: progress bars on a terminal, log lines otherwise.
//!
//! Messages go through `tracing` (`info!` for progress and facts, `warn!` for what the user
//! should act on, `debug!` for detail); [`init_logging`] installs the one subscriber, on stderr,
//! at the level `-q` / `-v` chose. Progress bars are drawn only when stderr is a terminal; when it
//! is not (a batch job's log file), long loops write one [`tracing::info!`] line every few steps
//! instead (see [`batch_log`]).

use std::fmt;
use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// A bar of `len` steps with `template` (indicatif syntax), or a hidden one when `!show`.
pub fn bar(len: u64, template: &str, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb
}

/// Whether long loops should write log lines instead of drawing a bar: stderr is not a
/// terminal (a batch job, `2> log`, a pipe), where indicatif draws nothing.
pub fn batch_log() -> bool {
    !std::io::stderr().is_terminal()
}

/// How much the command line asked to hear: `-q` (warnings and errors), nothing (progress and
/// facts), `-v` (details, e.g. every training step), `-vv` (everything).
pub fn level(quiet: bool, verbose: u8) -> Level {
    match (quiet, verbose) {
        (true, _) => Level::WARN,
        (false, 0) => Level::INFO,
        (false, 1) => Level::DEBUG,
        _ => Level::TRACE,
    }
}

/// Install the stderr subscriber at `level` (a second call, e.g. a second Python import, keeps
/// the first). On a terminal a line is the message alone (`warning:` before warnings); in a log
/// file each line starts with the UTC time and the level, as batch-job logs are read.
pub fn init_logging(level: Level) {
    let format = LineFormat { timestamps: batch_log() };
    let _ = tracing_subscriber::fmt().with_max_level(level).with_writer(std::io::stderr).with_ansi(false).event_format(format).try_init();
}

struct LineFormat {
    timestamps: bool,
}

impl<S, N> FormatEvent<S, N> for LineFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut w: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let level = *event.metadata().level();
        if self.timestamps {
            write!(w, "{} {:<5} ", chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ"), level)?;
        } else if level == Level::WARN {
            write!(w, "warning: ")?;
        } else if level == Level::ERROR {
            write!(w, "error: ")?;
        }
        ctx.field_format().format_fields(w.by_ref(), event)?;
        writeln!(w)
    }
}

/// `seconds` as a person reads a remaining time: `45 s`, `12 min`, `3.2 h`.
pub fn duration(seconds: f64) -> String {
    if !seconds.is_finite() {
        "?".into()
    } else if seconds < 90.0 {
        format!("{seconds:.0} s")
    } else if seconds < 5400.0 {
        format!("{:.0} min", seconds / 60.0)
    } else {
        format!("{:.1} h", seconds / 3600.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_durations() {
        assert_eq!(level(true, 2), Level::WARN);
        assert_eq!(level(false, 0), Level::INFO);
        assert_eq!(level(false, 1), Level::DEBUG);
        assert_eq!([duration(44.6), duration(600.0), duration(7200.0), duration(f64::NAN)], ["45 s", "10 min", "2.0 h", "?"]);
    }
}
