//! The bench plots: time against its bound or floor, and VRAM estimated beside measured,
//! against GPU layers, as an SVG (decode ms/token for `bench`, ms/frame for `bench --speech`).

use crate::measure::{BenchReport, BenchRow, SpeechBenchReport, SpeechBenchRow};
use crate::units::GIB;
use anyhow::Result;
use plotters::coord::Shift;
use plotters::prelude::*;

/// One line of a panel: its legend, colour, width, and value for a row (if measured).
struct Line<R> {
    label: &'static str,
    color: RGBColor,
    width: u32,
    y: fn(&R) -> Option<f64>,
}

/// The rows a plot draws, and the x axis: GPU layers, from 0 to `layers`.
struct Rows<'a, R> {
    rows: &'a [R],
    gpu_layers: fn(&R) -> usize,
    layers: usize,
}

fn to_gib(bytes: u64) -> f64 {
    bytes as f64 / GIB
}

/// Draws decode ms/token and VRAM (estimate beside measurement) against GPU layers as an SVG.
pub fn plot_bench(report: &BenchReport, path: &std::path::Path) -> Result<()> {
    let rows = Rows {
        rows: &report.rows,
        gpu_layers: |r: &BenchRow| r.gpu_layers,
        layers: report.model.layers,
    };
    draw(
        path,
        &rows,
        ("decode ms/token", "ms/token"),
        [
            Line {
                label: "measured",
                color: BLUE,
                width: 2,
                y: |r| Some(r.decode_ms_per_token),
            },
            Line {
                label: "bound",
                color: BLACK,
                width: 1,
                y: |r| r.bound_ms_per_token,
            },
        ],
        [
            Line {
                label: "estimate",
                color: RED,
                width: 2,
                y: |r| Some(to_gib(r.estimate_bytes)),
            },
            Line {
                label: "measured (NVML)",
                color: GREEN,
                width: 2,
                y: |r| r.measured_peak_bytes.map(to_gib),
            },
        ],
    )
}

/// Draws ms/frame beside its floor and VRAM (the whole model's estimate beside the NVML peak)
/// against GPU layers as an SVG.
pub fn plot_speech_bench(report: &SpeechBenchReport, path: &std::path::Path) -> Result<()> {
    let rows = Rows {
        rows: &report.rows,
        gpu_layers: |r: &SpeechBenchRow| r.gpu_layers,
        layers: report.model.layers,
    };
    draw(
        path,
        &rows,
        ("speech ms/frame", "ms/frame"),
        [
            Line {
                label: "measured",
                color: BLUE,
                width: 2,
                y: |r| Some(r.ms_per_frame),
            },
            Line {
                label: "floor",
                color: BLACK,
                width: 1,
                y: |r| r.floor_ms_per_frame,
            },
        ],
        [
            Line {
                label: "estimate",
                color: RED,
                width: 2,
                y: |r| Some(to_gib(r.estimate_bytes)),
            },
            Line {
                label: "measured (NVML)",
                color: GREEN,
                width: 2,
                y: |r| r.measured_peak_bytes.map(to_gib),
            },
        ],
    )
}

/// Two panels side by side, time (`caption`) and VRAM, written to `path` through a temporary
/// file.
fn draw<R>(
    path: &std::path::Path,
    rows: &Rows<R>,
    caption: (&str, &str),
    time: [Line<R>; 2],
    vram: [Line<R>; 2],
) -> Result<()> {
    let out = crate::output::Output::begin(path)?;
    {
        let root = SVGBackend::new(out.temp_path(), (1000, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(500);
        panel(&left, rows, caption, time)?;
        panel(&right, rows, ("VRAM", "GiB"), vram)?;
        root.present()?;
    }
    out.commit()?;
    Ok(())
}

/// One chart of `lines` against GPU layers, its y axis 10% above the highest value.
fn panel<R>(
    area: &DrawingArea<SVGBackend, Shift>,
    rows: &Rows<R>,
    (caption, y_desc): (&str, &str),
    lines: [Line<R>; 2],
) -> Result<()> {
    let points = |line: &Line<R>| -> Vec<(i32, f64)> {
        let mut v: Vec<(i32, f64)> = rows
            .rows
            .iter()
            .filter_map(|r| (line.y)(r).map(|y| ((rows.gpu_layers)(r) as i32, y)))
            .collect();
        v.sort_by_key(|p| p.0);
        v
    };
    let max_y = lines
        .iter()
        .flat_map(|l| points(l).into_iter().map(|p| p.1))
        .fold(0.0, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(0..rows.layers as i32, 0.0..max_y.max(1e-3))?;
    chart
        .configure_mesh()
        .x_desc("GPU layers")
        .y_desc(y_desc)
        .draw()?;
    for line in &lines {
        let color = line.color;
        chart
            .draw_series(LineSeries::new(
                points(line),
                color.stroke_width(line.width),
            ))?
            .label(line.label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
    }
    chart.configure_series_labels().border_style(BLACK).draw()?;
    Ok(())
}
