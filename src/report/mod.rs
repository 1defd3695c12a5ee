//! What the commands print: each command's text form (one file per command), the report
//! types built from the planner's numbers (`table`, `auto`, `inspect`), the bench plots, and
//! JSON output. The types `run` and `bench` measure live in [`crate::measure`]; this module
//! only renders them. Nothing here prints.

mod bench;
mod bench_speech;
mod calibration;
mod convert;
mod generate;
mod inspect;
mod load;
mod plan;
mod plot;
mod run;
mod synth;
mod table;

pub use calibration::CalibrationReport;
pub use inspect::{GroupRow, InspectReport, LayerTensorRow};
pub use plan::PlanReport;
pub use plot::{plot_bench, plot_speech_bench};
pub use table::{GpuClassRow, Predicted, TableReport, TableRow};

use crate::checkpoint::summary::ModelSummary;
use crate::plan::budget::Budget;
use crate::plan::{PlanOptions, Scope};
use crate::units::gib;
use anyhow::{Context, Result};
use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{CellAlignment, ContentArrangement, Table};
use serde::Serialize;
use std::io::Write;
use std::path::Path;

/// A report's text form: what a command prints without `--json`.
pub trait Render {
    /// The report as lines and tables, ending in a newline.
    fn render(&self) -> String;
}

/// A report as pretty JSON, ending in a newline.
pub fn json<T: Serialize>(report: &T) -> Result<String> {
    Ok(serde_json::to_string_pretty(report)? + "\n")
}

/// Writes [`json`]`(report)` to `path` under a temporary name, renamed when complete.
pub fn write_json<T: Serialize>(report: &T, path: &Path) -> Result<()> {
    let text = json(report)?;
    let mut out = crate::output::Output::begin(path)?;
    out.file()
        .write_all(text.as_bytes())
        .and_then(|_| out.file().flush())
        .with_context(|| format!("cannot write {}", path.display()))?;
    out.commit()
}

/// The widest a report's line may be: tables wrap their cells to fit, and [`wrap`] folds
/// longer lines of text.
pub const TABLE_WIDTH: u16 = 100;

/// `text` with every line longer than [`TABLE_WIDTH`] folded at spaces, continuation lines
/// indented by two; table lines (drawn with box characters) are left alone.
pub fn wrap(text: &str) -> String {
    let width = TABLE_WIDTH as usize;
    let mut out = String::with_capacity(text.len());
    for line in text.split_inclusive('\n') {
        let (body, end) = match line.strip_suffix('\n') {
            Some(body) => (body, "\n"),
            None => (line, ""),
        };
        let boxed = body.starts_with(['│', '┌', '└', '╞', '├', '╭', '╰', '+', '|']);
        if boxed || body.chars().count() <= width {
            out.push_str(line);
            continue;
        }
        let mut current = String::new();
        for word in body.split(' ') {
            let len = current.chars().count();
            if len > 0 && len + 1 + word.chars().count() > width {
                out.push_str(current.trim_end());
                out.push('\n');
                current = "  ".to_string();
            } else if len > 0 && current != "  " {
                current.push(' ');
            }
            current.push_str(word);
        }
        out.push_str(&current);
        out.push_str(end);
    }
    out
}

/// How a column's cells (header included) line up.
#[derive(Clone, Copy)]
enum Align {
    Left,
    Right,
}

/// One column of a text table: its header, how a row fills it, and its alignment.
struct Column<'a, R> {
    header: &'a str,
    align: Align,
    cell: Box<dyn Fn(&R) -> String + 'a>,
}

/// A table's columns, in order; [`Columns::table`] fills them from a list of rows.
struct Columns<'a, R>(Vec<Column<'a, R>>);

impl<'a, R> Columns<'a, R> {
    fn new() -> Self {
        Columns(Vec::new())
    }

    /// Adds a left-aligned column.
    fn left(self, header: &'a str, cell: impl Fn(&R) -> String + 'a) -> Self {
        self.with(header, Align::Left, cell)
    }

    /// Adds a right-aligned column (numbers).
    fn right(self, header: &'a str, cell: impl Fn(&R) -> String + 'a) -> Self {
        self.with(header, Align::Right, cell)
    }

    fn with(mut self, header: &'a str, align: Align, cell: impl Fn(&R) -> String + 'a) -> Self {
        self.0.push(Column {
            header,
            align,
            cell: Box::new(cell),
        });
        self
    }

    /// A table with one line per row.
    fn table<'r>(&self, rows: impl IntoIterator<Item = &'r R>) -> Table
    where
        R: 'r,
    {
        let mut t = Table::new();
        t.load_style(UTF8_FULL_CONDENSED)
            .set_content_arrangement(ContentArrangement::Dynamic)
            .set_width(TABLE_WIDTH)
            .set_header(self.0.iter().map(|c| c.header));
        for row in rows {
            t.add_row(self.0.iter().map(|c| (c.cell)(row)));
        }
        for (i, c) in self.0.iter().enumerate() {
            if let (Align::Right, Some(column)) = (c.align, t.column_mut(i)) {
                column.set_cell_alignment(CellAlignment::Right);
            }
        }
        t
    }
}

/// `unix_s` (seconds since the Unix epoch) as a UTC date, `2026-11-28`.
fn utc_date(unix_s: u64) -> String {
    // Days to a civil date (the proleptic Gregorian calendar), after Howard Hinnant's
    // `civil_from_days`: eras of 400 years, years starting in March.
    let z = (unix_s / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// `value` with `digits` decimals, or `-` when there is none.
fn or_dash(value: Option<f64>, digits: usize) -> String {
    value.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// A unit enum variant's JSON name (`config_json`), for text output.
fn snake<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

/// `model: SOURCE (N layers of B bytes)`, the first line of most reports.
fn model_header(m: &ModelSummary) -> String {
    format!(
        "model: {} ({} layers of {} bytes)",
        m.source, m.layers, m.layer_bytes
    )
}

/// The model and the planning options, two lines.
fn model_line(m: &ModelSummary, o: &PlanOptions) -> String {
    let scope = match o.scope {
        Scope::Full => "full VibeVoice (LM, diffusion head, tokenizers; 2 KV caches for CFG)",
        Scope::LanguageModel => "language model only",
    };
    format!(
        "{}\nplan: {scope}; batch {}, max {} tokens, {} placement, {} stream slots{}\n",
        model_header(m),
        o.batch,
        o.max_seq_len,
        o.placement,
        o.stream_slots,
        if o.offload_prediction_head {
            ", prediction head in host memory"
        } else {
            ""
        }
    )
}

/// Where the budget comes from and how large it is, one line.
fn budget_line(b: &Budget) -> String {
    let gpu = b.gpu.as_ref().map_or("--vram".to_string(), |g| {
        let pci = match g.pci_bus_id.as_str() {
            "" => String::new(),
            id => format!(", PCI {id}"),
        };
        format!(
            "GPU {} {} ({} GiB total{pci})",
            g.index,
            g.name,
            gib(g.total_bytes)
        )
    });
    format!(
        "budget: {:.0}% of {} GiB free on {gpu} = {} GiB\n",
        b.target_utilization * 100.0,
        gib(b.free_bytes),
        gib(b.budget_bytes)
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates_are_utc_days() {
        assert_eq!(super::utc_date(0), "1970-01-01");
        // 2024 is a leap year; the day after its 29 February.
        assert_eq!(super::utc_date(1_709_251_199), "2024-02-29");
        assert_eq!(super::utc_date(1_709_251_200), "2024-03-01");
        assert_eq!(super::utc_date(1_795_824_000), "2026-11-28");
    }
}
