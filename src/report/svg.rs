//! Inline SVG: token-selection heatmaps and line charts, as plain strings (no dependencies, no
//! script), so the report opens offline in any browser.

use std::fmt::Write;

/// Escape text for SVG/HTML.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// White → blue for a weight in [0, 1].
fn blue(w: f32) -> String {
    let w = w.clamp(0.0, 1.0);
    let mix = |a: f32, b: f32| (a + (b - a) * w).round() as u8;
    format!("rgb({},{},{})", mix(255.0, 8.0), mix(255.0, 69.0), mix(255.0, 148.0))
}

/// A heatmap of `w` (`rows × cols`): row labels on the left, column labels rotated on top,
/// each cell annotated with its weight (blank below 0.005). `highlight` outlines cells.
pub fn heatmap(title: &[String], row_labels: &[String], col_labels: &[String], w: &[Vec<f32>], highlight: &[(usize, usize)]) -> String {
    let (cw, ch) = (30.0, 18.0);
    let left = 8.0 + 7.0 * row_labels.iter().map(|l| l.chars().count()).max().unwrap_or(4).min(18) as f64;
    let top = 14.0 * title.len() as f64 + 8.0 + 6.0 * col_labels.iter().map(|l| l.chars().count()).max().unwrap_or(4).min(18) as f64;
    let width = left + cw * col_labels.len() as f64 + 10.0;
    let height = top + ch * row_labels.len() as f64 + 10.0;
    let mut s = String::new();
    let _ = write!(s, r#"<svg class="heatmap" xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">"#);
    for (i, t) in title.iter().enumerate() {
        let _ = write!(s, r#"<text x="4" y="{:.0}" font-weight="{}">{}</text>"#, 13.0 + 14.0 * i as f64, if i == 0 { "bold" } else { "normal" }, esc(t));
    }
    for (j, l) in col_labels.iter().enumerate() {
        let x = left + cw * (j as f64 + 0.5);
        let _ = write!(s, r#"<text transform="translate({x:.1},{:.1}) rotate(-55)" text-anchor="start">{}</text>"#, top - 4.0, esc(&truncate(l, 18)));
    }
    for (i, l) in row_labels.iter().enumerate() {
        let y = top + ch * (i as f64 + 0.7);
        let _ = write!(s, r#"<text x="{:.1}" y="{y:.1}" text-anchor="end">{}</text>"#, left - 4.0, esc(&truncate(l, 18)));
        for (j, &v) in w.get(i).map(|r| r.as_slice()).unwrap_or(&[]).iter().enumerate() {
            let (x, y0) = (left + cw * j as f64, top + ch * i as f64);
            let _ = write!(
                s,
                r##"<rect x="{x:.1}" y="{y0:.1}" width="{cw}" height="{ch}" fill="{}" stroke="#ddd" stroke-width="0.5"><title>{} ← {}: {v:.3}</title></rect>"##,
                blue(v),
                esc(&col_labels[j]),
                esc(l)
            );
            if v >= 0.005 {
                let colour = if v > 0.55 { "white" } else { "#222" };
                let _ =
                    write!(s, r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="9" fill="{colour}">{}</text>"##, x + cw / 2.0, y0 + ch * 0.7, format!("{v:.2}").trim_start_matches('0'));
            }
        }
    }
    for &(i, j) in highlight {
        let _ = write!(s, r##"<rect x="{:.1}" y="{:.1}" width="{cw}" height="{ch}" fill="none" stroke="#d62728" stroke-width="2"/>"##, left + cw * j as f64, top + ch * i as f64);
    }
    s.push_str("</svg>");
    s
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n { s.to_string() } else { format!("{}…", s.chars().take(n - 1).collect::<String>()) }
}

/// A line chart of named series `(x, y)` with axes, ticks and a legend.
pub fn line_chart(title: &str, x_label: &str, series: &[(String, Vec<(f64, f64)>)], y_range: Option<(f64, f64)>) -> String {
    let (w, h, l, r, t, b) = (560.0, 300.0, 56.0, 140.0, 28.0, 40.0);
    let pts = series.iter().flat_map(|(_, p)| p.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if let Some((a, c)) = y_range {
        (y0, y1) = (a, c);
    }
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let px = |x: f64| l + (x - x0) / (x1 - x0) * (w - l - r);
    let py = |y: f64| h - b - (y - y0) / (y1 - y0) * (h - t - b);
    let colours = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"];
    let mut s = String::new();
    let _ = write!(s, r#"<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#);
    let _ = write!(s, r#"<text x="{l}" y="16" font-weight="bold">{}</text>"#, esc(title));
    let _ = write!(s, r##"<line x1="{l}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#444"/><line x1="{l}" y1="{t}" x2="{l}" y2="{:.1}" stroke="#444"/>"##, h - b, w - r, h - b, h - b);
    for k in 0..=4 {
        let f = k as f64 / 4.0;
        let (xv, yv) = (x0 + f * (x1 - x0), y0 + f * (y1 - y0));
        let _ = write!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#, px(xv), h - b + 14.0, fmt_tick(xv));
        let _ = write!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text><line x1="{l}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#eee"/>"##,
            l - 4.0,
            py(yv) + 4.0,
            fmt_tick(yv),
            py(yv),
            w - r,
            py(yv)
        );
    }
    let _ = write!(s, r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#, (l + w - r) / 2.0, h - 6.0, esc(x_label));
    for (n, (name, p)) in series.iter().enumerate() {
        let c = colours[n % colours.len()];
        let path: Vec<String> = p.iter().filter(|(x, y)| x.is_finite() && y.is_finite()).map(|&(x, y)| format!("{:.1},{:.1}", px(x), py(y.clamp(y0, y1)))).collect();
        if path.len() == 1 {
            let _ = write!(s, r#"<circle cx="{}" r="3" fill="{c}"/>"#, path[0].replace(',', "\" cy=\""));
        } else {
            let _ = write!(s, r#"<polyline fill="none" stroke="{c}" stroke-width="1.6" points="{}"/>"#, path.join(" "));
        }
        let ly = t + 14.0 * n as f64 + 6.0;
        let _ = write!(
            s,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{c}" stroke-width="2"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            w - r + 10.0,
            w - r + 26.0,
            w - r + 30.0,
            ly + 4.0,
            esc(name)
        );
    }
    s.push_str("</svg>");
    s
}

fn fmt_tick(v: f64) -> String {
    if v.abs() >= 100.0 || (v.fract() == 0.0 && v.abs() >= 1.0) { format!("{v:.0}") } else { format!("{v:.2}") }
}
