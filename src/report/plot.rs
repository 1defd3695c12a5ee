//! The bench plot: decode ms/token beside its bound, and VRAM estimated beside measured,
//! against GPU layers, as an SVG.

use crate::measure::{BenchReport, BenchRow};
use crate::units::GIB;
use anyhow::Result;
use plotters::coord::Shift;
use plotters::prelude::*;

/// One line of a panel: its legend, colour, width, and value for a row (if measured).
struct Line {
    label: &'static str,
    color: RGBColor,
    width: u32,
    y: fn(&BenchRow) -> Option<f64>,
}

fn to_gib(bytes: u64) -> f64 {
    bytes as f64 / GIB
}

/// Draws decode ms/token and VRAM (estimate beside measurement) against GPU layers as an SVG.
pub fn plot_bench(report: &BenchReport, path: &std::path::Path) -> Result<()> {
    let out = crate::output::Output::begin(path)?;
    {
        let root = SVGBackend::new(out.temp_path(), (1000, 420)).into_drawing_area();
        root.fill(&WHITE)?;
        let (left, right) = root.split_horizontally(500);
        panel(
            &left,
            report,
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
        )?;
        panel(
            &right,
            report,
            ("VRAM", "GiB"),
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
        )?;
        root.present()?;
    }
    out.commit()?;
    Ok(())
}

/// One chart of `lines` against GPU layers, its y axis 10% above the highest value.
fn panel(
    area: &DrawingArea<SVGBackend, Shift>,
    report: &BenchReport,
    (caption, y_desc): (&str, &str),
    lines: [Line; 2],
) -> Result<()> {
    let points = |line: &Line| -> Vec<(i32, f64)> {
        let mut v: Vec<(i32, f64)> = report
            .rows
            .iter()
            .filter_map(|r| (line.y)(r).map(|y| (r.gpu_layers as i32, y)))
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
        .build_cartesian_2d(0..report.model.layers as i32, 0.0..max_y.max(1e-3))?;
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
