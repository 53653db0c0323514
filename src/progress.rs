//! Progress bars for long work (downloads, model loading), drawn on stderr only when it is a
//! terminal (indicatif hides them otherwise).

use indicatif::{ProgressBar, ProgressStyle};

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
