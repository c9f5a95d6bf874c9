//! PNG line plots (plotters, bitmap backend) with an embedded font (DejaVu Sans), so a plot
//! renders the same on a machine with no fonts installed. The PNG is drawn to a temp file and
//! renamed into place.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::fsutil::io_error;
use crate::Error;

/// One line of a panel.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// `(x, y)` points in x order.
    pub points: Vec<(f64, f64)>,
}

/// One chart of a figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    /// Title above the chart.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Lines.
    pub series: Vec<Series>,
}

fn register_font() -> Result<(), String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular())
                .map_err(|_| "the embedded DejaVu Sans font did not load".to_string())
        })
        .clone()
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(23, 190, 207),
];

/// Draws `panels` side by side into a PNG at `path`.
pub fn plot_panels(path: &Path, panels: &[Panel]) -> Result<(), Error> {
    let err = |what: String| Error::Io { path: path.to_path_buf(), source: std::io::Error::other(what) };
    register_font().map_err(err)?;
    if panels.is_empty() {
        return Err(Error::Config("a plot needs at least one panel".into()));
    }
    let tmp = path.with_extension("tmp.png");
    let width = 560 * panels.len() as u32;
    {
        let root = BitMapBackend::new(&tmp, (width, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let areas = root.split_evenly((1, panels.len()));
        for (panel, area) in panels.iter().zip(areas.iter()) {
            draw_panel(area, panel).map_err(err)?;
        }
        root.present().map_err(|e| err(e.to_string()))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| io_error(path, e))
}

fn draw_panel(area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>, panel: &Panel) -> Result<(), String> {
    let points = panel.series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in points.filter(|(x, y)| x.is_finite() && y.is_finite()) {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.08).max(0.02);
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
        .map_err(|e| e.to_string())?;
    chart
        .configure_mesh()
        .x_desc(&panel.x_label)
        .y_desc(&panel.y_label)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(|e| e.to_string())?;
    for (i, series) in panel.series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(series.points.iter().copied(), color.stroke_width(2)))
            .map_err(|e| e.to_string())?
            .label(series.name.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart
            .draw_series(series.points.iter().map(|&p| Circle::new(p, 2, color.filled())))
            .map_err(|e| e.to_string())?;
    }
    if panel.series.len() > 1 || panel.series.iter().any(|s| !s.name.is_empty()) {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_two_panel_plot_is_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curves.png");
        let line = |name: &str, k: f64| Series {
            name: name.into(),
            points: (0..20).map(|i| (i as f64, (i as f64 * k).sin())).collect(),
        };
        let panels = [
            Panel {
                title: "reward".into(),
                x_label: "step".into(),
                y_label: "mean".into(),
                series: vec![line("a", 0.3)],
            },
            Panel {
                title: "pass@1".into(),
                x_label: "step".into(),
                y_label: "rate".into(),
                series: vec![line("a", 0.2), line("b", 0.1)],
            },
        ];
        plot_panels(&path, &panels).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(bytes.len() > 2000, "a drawn plot is more than an empty image: {} bytes", bytes.len());
        assert!(!path.with_extension("tmp.png").exists());
    }

    #[test]
    fn no_panels_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(plot_panels(&dir.path().join("x.png"), &[]), Err(Error::Config(_))));
    }
}
