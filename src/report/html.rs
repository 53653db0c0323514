//! The HTML pages (`report.html`, `compare.html`, `sweep.html`) from the templates in
//! `templates/`, compiled into the binary. minijinja escapes every value the templates print
//! except those marked `| safe`: the SVG plots ([`super::svg`] escapes their text itself) and
//! fragments rendered by these templates.

use std::sync::OnceLock;

use serde::Serialize;

use crate::error::{Error, Result};

const TEMPLATES: &[(&str, &str)] = &[
    ("page.html", include_str!("templates/page.html")),
    ("report.html", include_str!("templates/report.html")),
    ("compare.html", include_str!("templates/compare.html")),
    ("compare_tables.html", include_str!("templates/compare_tables.html")),
    ("sweep.html", include_str!("templates/sweep.html")),
];

fn env() -> &'static minijinja::Environment<'static> {
    static ENV: OnceLock<minijinja::Environment<'static>> = OnceLock::new();
    ENV.get_or_init(|| {
        let mut env = minijinja::Environment::new();
        for (name, text) in TEMPLATES {
            // The templates are ours and compiled in; tests/report.rs renders every one.
            if let Err(e) = env.add_template(name, text) {
                panic!("template {name}: {e}");
            }
        }
        env
    })
}

/// Render the template `name` (one of `templates/`) with `ctx`.
pub fn render<S: Serialize>(name: &str, ctx: S) -> Result<String> {
    let t = env().get_template(name).map_err(|e| Error::invalid(format!("template {name}: {e}")))?;
    t.render(ctx).map_err(|e| Error::invalid(format!("rendering {name}: {e:#}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_compiles_and_values_are_escaped() {
        for (name, _) in TEMPLATES {
            env().get_template(name).unwrap();
        }
        let page = render("compare.html", minijinja::context! { title => "a <b> & c", width => 1000, note => "x<y", tables => "<h3>t</h3>" }).unwrap();
        assert!(page.contains("<title>a &lt;b&gt; &amp; c</title>") && page.contains("<p>x&lt;y</p>") && page.contains("<h3>t</h3>"), "{page}");
    }
}
