//! PNG and SVG plots with `plotters`.
//!
//! Text needs a TrueType font, loaded at run time (plotters' `ab_glyph` backend, pure Rust, no
//! system font library): `$SPLITEE_FONT`, else DejaVu Sans or Liberation Sans at their usual
//! Linux paths. Without one, plots are drawn without any text (axes, captions and legends
//! need glyphs) and a warning says so; the CSVs carry the same data.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::coord::cartesian::Cartesian2d;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

const SIZE: (u32, u32) = (1100, 650);
const FONT: &str = "sans-serif";
/// Most points drawn per policy in the arm plot (SVG size stays in the low megabytes).
const MAX_POINTS: usize = 4000;

/// Whether a font was found (loads it on first call).
pub fn png_text_available() -> bool {
    static LOADED: OnceLock<bool> = OnceLock::new();
    *LOADED.get_or_init(|| {
        let mut candidates: Vec<String> = Vec::new();
        if let Ok(p) = std::env::var("SPLITEE_FONT") {
            candidates.push(p);
        }
        candidates.extend(
            [
                "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/TTF/DejaVuSans.ttf",
                "/usr/share/fonts/dejavu/DejaVuSans.ttf",
                "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
            ]
            .map(String::from),
        );
        for path in candidates {
            if let Ok(bytes) = std::fs::read(&path) {
                // plotters keeps fonts for the life of the process; one leak per process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font(FONT, FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        eprintln!(
            "warning: no TrueType font found (set SPLITEE_FONT=/path/to/font.ttf); plots have no text"
        );
        false
    })
}

fn err<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow::anyhow!("plot: {e}")
}

/// The legend box every plot draws (only when a font was found: legends need glyphs).
fn draw_legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    position: SeriesLabelPosition,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(position)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)
}

fn color(i: usize) -> RGBColor {
    // Okabe–Ito palette: distinguishable with colour-blindness.
    const C: [RGBColor; 8] = [
        RGBColor(0, 114, 178),
        RGBColor(213, 94, 0),
        RGBColor(0, 158, 115),
        RGBColor(204, 121, 167),
        RGBColor(230, 159, 0),
        RGBColor(86, 180, 233),
        RGBColor(0, 0, 0),
        RGBColor(240, 228, 66),
    ];
    C[i % C.len()]
}

fn range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let pad = ((hi - lo) * 0.05).max(1e-9);
    (lo - pad, hi + pad)
}

/// A titled chart with one pair of axes on a white background, its mesh and axis names drawn
/// when a font was found: the frame of [`regret`] and [`tradeoff`].
fn single_axis_chart<'a, DB: DrawingBackend>(
    root: &'a DrawingArea<DB, Shift>,
    title: &str,
    (x, y): (Range<f64>, Range<f64>),
    (x_desc, y_desc): (&str, &str),
    text: bool,
) -> anyhow::Result<ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>> {
    root.fill(&WHITE).map_err(err)?;
    let mut builder = ChartBuilder::on(root);
    builder.margin(15);
    if text {
        builder
            .caption(title, (FONT, 20))
            .x_label_area_size(45)
            .y_label_area_size(70);
    }
    let mut chart = builder.build_cartesian_2d(x, y).map_err(err)?;
    if text {
        chart
            .configure_mesh()
            .x_desc(x_desc)
            .y_desc(y_desc)
            .label_style((FONT, 14))
            .draw()
            .map_err(err)?;
    }
    Ok(chart)
}

/// Cumulative regret per policy.
pub fn regret(
    stem: &Path,
    title: &str,
    curves: &[(String, Vec<f64>)],
    text: bool,
) -> anyhow::Result<()> {
    let len = curves
        .iter()
        .map(|(_, c)| c.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let (lo, hi) = range(
        curves
            .iter()
            .flat_map(|(_, c)| c.iter().copied())
            .chain([0.0]),
    );
    fn draw<DB: DrawingBackend>(
        root: &DrawingArea<DB, Shift>,
        title: &str,
        curves: &[(String, Vec<f64>)],
        len: usize,
        (lo, hi): (f64, f64),
        text: bool,
    ) -> anyhow::Result<()> {
        let mut chart = single_axis_chart(
            root,
            title,
            (0f64..len as f64, lo..hi),
            ("samples", "cumulative pseudo-regret"),
            text,
        )?;
        for (i, (name, c)) in curves.iter().enumerate() {
            let col = color(i);
            let stride = (c.len() / 2000).max(1);
            let s = chart
                .draw_series(LineSeries::new(
                    c.iter()
                        .enumerate()
                        .step_by(stride)
                        .map(|(t, &v)| ((t + 1) as f64, v)),
                    col.stroke_width(2),
                ))
                .map_err(err)?;
            if text {
                s.label(name.as_str())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], col));
            }
        }
        if text {
            draw_legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
        }
        Ok(())
    }
    write_both(stem, |png, svg| match (png, svg) {
        (Some(r), _) => draw(r, title, curves, len, (lo, hi), text),
        (_, Some(r)) => draw(r, title, curves, len, (lo, hi), text),
        _ => Ok(()),
    })
}

type Png<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type Svg<'a> = DrawingArea<SVGBackend<'a>, Shift>;

/// Calls `f` once with the PNG area and once with the SVG area.
fn write_both<F>(stem: &Path, f: F) -> anyhow::Result<()>
where
    F: Fn(Option<&Png<'_>>, Option<&Svg<'_>>) -> anyhow::Result<()>,
{
    // Appended, not `with_extension`: stems contain dots (`lambda0.1`).
    let png = PathBuf::from(format!("{}.png", stem.display()));
    let svg = PathBuf::from(format!("{}.svg", stem.display()));
    {
        let root = BitMapBackend::new(&png, SIZE).into_drawing_area();
        f(Some(&root), None)?;
        root.present().map_err(err)?;
    }
    {
        let root = SVGBackend::new(&svg, SIZE).into_drawing_area();
        f(None, Some(&root))?;
        root.present().map_err(err)?;
    }
    Ok(())
}

/// Accuracy against cost per sample, one series per policy.
pub fn tradeoff(
    stem: &Path,
    title: &str,
    points: &[(String, Vec<(f64, f64)>)],
    text: bool,
) -> anyhow::Result<()> {
    let (x0, x1) = range(points.iter().flat_map(|(_, p)| p.iter().map(|q| q.0)));
    let (y0, y1) = range(points.iter().flat_map(|(_, p)| p.iter().map(|q| q.1)));
    fn draw<DB: DrawingBackend>(
        root: &DrawingArea<DB, Shift>,
        title: &str,
        points: &[(String, Vec<(f64, f64)>)],
        (x0, x1, y0, y1): (f64, f64, f64, f64),
        text: bool,
    ) -> anyhow::Result<()> {
        let mut chart = single_axis_chart(
            root,
            title,
            (x0..x1, y0..y1),
            ("cost per sample (reward units before λ)", "accuracy"),
            text,
        )?;
        for (i, (name, pts)) in points.iter().enumerate() {
            let col = color(i);
            let s = chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 5, col.filled())))
                .map_err(err)?;
            if text {
                s.label(name.as_str())
                    .legend(move |(x, y)| Circle::new((x + 10, y), 5, col.filled()));
            }
        }
        if text {
            draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
        }
        Ok(())
    }
    let bounds = (x0, x1, y0, y1);
    write_both(stem, |png, svg| match (png, svg) {
        (Some(r), _) => draw(r, title, points, bounds, text),
        (_, Some(r)) => draw(r, title, points, bounds, text),
        _ => Ok(()),
    })
}

/// What the axes of [`arms_over_link`] measure.
#[derive(Debug, Clone, Copy)]
pub struct ArmAxes<'a> {
    /// The x axis, e.g. simulated or wall-clock seconds.
    pub time: &'a str,
    /// The line on the right axis, e.g. the trace's capacity or the delivered throughput.
    pub rate: &'a str,
}

/// The split each policy chose over time (points, left axis), over the link rate (line,
/// right axis).
pub fn arms_over_link(
    stem: &Path,
    title: &str,
    arms: &[(String, Vec<(f64, f64)>)],
    rate: &[(f64, f64)],
    num_layers: usize,
    axes: ArmAxes<'_>,
    text: bool,
) -> anyhow::Result<()> {
    let t1 = rate.last().map_or(1.0, |r| r.0).max(1e-3);
    let r1 = rate.iter().map(|r| r.1).fold(0.0f64, f64::max).max(1e-3) * 1.05;
    #[allow(clippy::too_many_arguments)]
    fn draw<DB: DrawingBackend>(
        root: &DrawingArea<DB, Shift>,
        title: &str,
        arms: &[(String, Vec<(f64, f64)>)],
        rate: &[(f64, f64)],
        num_layers: usize,
        (t1, r1): (f64, f64),
        axes: ArmAxes<'_>,
        text: bool,
    ) -> anyhow::Result<()> {
        root.fill(&WHITE).map_err(err)?;
        let mut b = ChartBuilder::on(root);
        b.margin(15);
        if text {
            b.caption(title, (FONT, 20))
                .x_label_area_size(45)
                .y_label_area_size(60)
                .right_y_label_area_size(70);
        }
        let mut chart = b
            .build_cartesian_2d(0f64..t1, 0.5f64..num_layers as f64 + 0.5)
            .map_err(err)?
            .set_secondary_coord(0f64..t1, 0f64..r1);
        if text {
            chart
                .configure_mesh()
                .x_desc(axes.time)
                .y_desc("split layer s (L = all on device)")
                .label_style((FONT, 14))
                .draw()
                .map_err(err)?;
            chart
                .configure_secondary_axes()
                .y_desc(axes.rate)
                .label_style((FONT, 14))
                .draw()
                .map_err(err)?;
        }
        let grey = RGBColor(120, 120, 120);
        let s = chart
            .draw_secondary_series(LineSeries::new(rate.iter().copied(), grey.stroke_width(2)))
            .map_err(err)?;
        if text {
            s.label(axes.rate)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], grey));
        }
        let n = arms.len().max(1) as f64;
        for (i, (name, pts)) in arms.iter().enumerate() {
            let col = color(i);
            // Policies playing the same split are offset vertically so all stay visible.
            let dy = (i as f64 - (n - 1.0) / 2.0) * 0.6 / n;
            let stride = (pts.len() / MAX_POINTS).max(1);
            let s = chart
                .draw_series(
                    pts.iter()
                        .step_by(stride)
                        .map(|&(t, split)| Circle::new((t, split + dy), 2, col.filled())),
                )
                .map_err(err)?;
            if text {
                s.label(name.as_str())
                    .legend(move |(x, y)| Circle::new((x + 10, y), 4, col.filled()));
            }
        }
        if text {
            draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        }
        Ok(())
    }
    write_both(stem, |png, svg| match (png, svg) {
        (Some(r), _) => draw(r, title, arms, rate, num_layers, (t1, r1), axes, text),
        (_, Some(r)) => draw(r, title, arms, rate, num_layers, (t1, r1), axes, text),
        _ => Ok(()),
    })
}
