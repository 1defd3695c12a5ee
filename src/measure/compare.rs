//! The bench gate: a `bench` report held against a baseline, layer count by layer count, with
//! each figure's run-to-run noise allowed for, and the error that makes the binary exit 3.

use super::bench::BenchReport;
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// A bench report held against a baseline, layer count by layer count.
///
/// The rule, for decode ms/token and test-speed ms at each layer count both measured: each
/// report gives the median over its runs and its spread (interquartile range over the median).
/// The new median is a regression when it exceeds the old by more than the threshold **and**
/// by more than the larger of the two spreads; slower than the threshold but within the spread
/// is a note, and passes. A report written before runs were kept gives its single figure and
/// no spread, so two such reports are held to the threshold alone.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The tool that compared: version and commit.
    #[serde(default)]
    pub tool: String,
    /// Allowed slowdown (0.10 = 10%).
    pub threshold: f64,
    /// The layer counts both reports measured.
    pub rows: Vec<ComparedRow>,
    /// Layer counts this report has and the baseline lacks.
    pub missing_in_baseline: Vec<usize>,
    /// Layer counts the baseline has and this report lacks.
    pub missing_here: Vec<usize>,
    /// One line per figure slower than the baseline by more than the threshold and the spread.
    pub regressions: Vec<String>,
    /// One line per figure slower by more than the threshold but within the spread (passed).
    #[serde(default)]
    pub within_noise: Vec<String>,
}

/// One layer count in both reports.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ComparedRow {
    /// Decoder layers resident on the GPU.
    pub gpu_layers: usize,
    /// Decode ms/token: baseline, this report (medians over their runs), and this over the
    /// baseline.
    pub decode_ms: (f64, f64, f64),
    /// Test-speed (prefill) ms: baseline, this report (medians), and this over the baseline.
    pub test_speed_ms: (f64, f64, f64),
    /// Relative spread of decode ms/token (interquartile range / median): baseline, this
    /// report (0 for a report without runs).
    #[serde(default)]
    pub decode_spread: (f64, f64),
    /// Relative spread of test-speed ms: baseline, this report.
    #[serde(default)]
    pub test_speed_spread: (f64, f64),
}

/// A figure's median over its runs and its interquartile range relative to that median.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Spread {
    median: f64,
    relative_iqr: f64,
}

impl Spread {
    /// Over `runs`; without any (a report from before runs were kept), `figure` and no spread.
    fn of(runs: &[f64], figure: f64) -> Spread {
        if runs.is_empty() {
            return Spread {
                median: figure,
                relative_iqr: 0.0,
            };
        }
        let mut v = runs.to_vec();
        v.sort_by(f64::total_cmp);
        // Quantiles interpolated between the sorted values.
        let quantile = |q: f64| {
            let at = q * (v.len() - 1) as f64;
            let (low, high) = (v[at.floor() as usize], v[at.ceil() as usize]);
            low + (high - low) * at.fract()
        };
        let median = quantile(0.5);
        Spread {
            median,
            relative_iqr: match median > 0.0 {
                true => (quantile(0.75) - quantile(0.25)) / median,
                false => 0.0,
            },
        }
    }
}

/// The card a device label names, without where it sits (`GPU 0 NVIDIA H200 (PCI ...)` is
/// `GPU 0 NVIDIA H200`): the same card in another slot or machine compares.
fn card(device: &str) -> &str {
    device.split(" (PCI ").next().unwrap_or(device)
}

/// Compares `new` with `old` (`threshold` 0.10 = 10% slower allowed) by the rule on
/// [`Comparison`]. Refused (a usage error) when they were measured on another device, model,
/// batch or workload, or share no layer count: a comparison of nothing must not pass.
pub fn compare(old: &BenchReport, new: &BenchReport, threshold: f64) -> Result<Comparison> {
    let model = |r: &BenchReport| (r.model.config.clone(), r.model.layer_bytes);
    let mismatches: Vec<String> = [
        (
            "device",
            card(&old.device) != card(&new.device),
            format!("{} against {}", new.device, old.device),
        ),
        (
            "model",
            model(old) != model(new),
            format!("{} against {}", new.model.source, old.model.source),
        ),
        (
            "batch",
            old.batch != new.batch,
            format!("{} against {}", new.batch, old.batch),
        ),
        (
            "workload",
            (old.prompt_len, old.gen_tokens) != (new.prompt_len, new.gen_tokens),
            format!(
                "prompt {} + {} tokens against {} + {}",
                new.prompt_len, new.gen_tokens, old.prompt_len, old.gen_tokens
            ),
        ),
    ]
    .into_iter()
    .filter(|(_, differs, _)| *differs)
    .map(|(what, _, how)| format!("{what} ({how})"))
    .collect();
    if !mismatches.is_empty() {
        anyhow::bail!(crate::UsageError::new(format!(
            "the baseline was measured differently: {}; compare like with like",
            mismatches.join(", ")
        )));
    }
    let layers = |r: &BenchReport| r.rows.iter().map(|x| x.gpu_layers).collect::<Vec<_>>();
    let (old_layers, new_layers) = (layers(old), layers(new));
    let mut rows = Vec::new();
    let (mut regressions, mut within_noise) = (Vec::new(), Vec::new());
    for n in &new.rows {
        let Some(o) = old.rows.iter().find(|o| o.gpu_layers == n.gpu_layers) else {
            continue;
        };
        let decode = (
            Spread::of(&o.decode_runs_ms_per_token, o.decode_ms_per_token),
            Spread::of(&n.decode_runs_ms_per_token, n.decode_ms_per_token),
        );
        let test_speed = (
            Spread::of(&o.test_speed_runs_ms, o.test_speed_ms),
            Spread::of(&n.test_speed_runs_ms, n.test_speed_ms),
        );
        let medians = |(b, a): (Spread, Spread)| (b.median, a.median, a.median / b.median);
        let spreads = |(b, a): (Spread, Spread)| (b.relative_iqr, a.relative_iqr);
        let row = ComparedRow {
            gpu_layers: n.gpu_layers,
            decode_ms: medians(decode),
            test_speed_ms: medians(test_speed),
            decode_spread: spreads(decode),
            test_speed_spread: spreads(test_speed),
        };
        for (what, (before, after, r), (old_spread, new_spread)) in [
            ("decode ms/token", row.decode_ms, row.decode_spread),
            ("test-speed ms", row.test_speed_ms, row.test_speed_spread),
        ] {
            let slower = r - 1.0;
            // A ratio that is not a number (0 / 0) is no slowdown.
            if slower.is_nan() || slower <= threshold {
                continue;
            }
            let spread = old_spread.max(new_spread);
            let line = format!(
                "N={}: {what} {after:.2} vs {before:.2} (+{:.0}%",
                n.gpu_layers,
                100.0 * slower
            );
            match (slower > spread, spread > 0.0) {
                (true, false) => regressions.push(format!("{line})")),
                (true, true) => {
                    regressions.push(format!("{line}, beyond the {:.0}% spread)", 100.0 * spread))
                }
                (false, _) => {
                    within_noise.push(format!("{line}, within the {:.0}% spread)", 100.0 * spread))
                }
            }
        }
        rows.push(row);
    }
    if rows.is_empty() {
        anyhow::bail!(crate::UsageError::new(format!(
            "no layer count in common: the baseline measured {old_layers:?}, this run \
             {new_layers:?}; pass --layers to match"
        )));
    }
    Ok(Comparison {
        tool: crate::TOOL.into(),
        threshold,
        rows,
        missing_in_baseline: new_layers
            .iter()
            .copied()
            .filter(|n| !old_layers.contains(n))
            .collect(),
        missing_here: old_layers
            .iter()
            .copied()
            .filter(|n| !new_layers.contains(n))
            .collect(),
        regressions,
        within_noise,
    })
}

/// The error of a comparison with regressions: the binary exits 3 for it, apart from 1 (a
/// failure) and 2 (a bad command line), so CI can tell "slower" from "broken".
#[derive(Debug)]
pub struct Regression(pub String);

impl std::fmt::Display for Regression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Regression {}

impl Comparison {
    /// [`Regression`] if any figure got slower beyond the threshold and the spread.
    pub fn verdict(&self) -> Result<()> {
        if self.regressions.is_empty() {
            return Ok(());
        }
        Err(Regression(format!(
            "slower than the baseline by more than {:.0}% and the run-to-run spread: {}",
            self.threshold * 100.0,
            self.regressions.join("; ")
        ))
        .into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::config::BuiltinModel;
    use crate::checkpoint::summary::ModelSummary;
    use crate::checkpoint::{CheckpointDtype, ModelInfo};
    use crate::measure::BenchRow;

    /// A report with one row per `(layers, decode ms/token)`, test-speed 1 ms, no runs kept.
    fn report(ms: &[(usize, f64)]) -> BenchReport {
        BenchReport {
            schema: "vibeoffload.bench/1".into(),
            tool: crate::TOOL.into(),
            model: ModelSummary::of(&ModelInfo::builtin(
                BuiltinModel::Small1_5b,
                CheckpointDtype::Float8,
            )),
            device: "cpu".into(),
            pinned_gbps: None,
            device_gbps: None,
            host_f8_gbps: None,
            calibrated: false,
            prompt_len: 1,
            gen_tokens: 1,
            batch: 1,
            rows: ms
                .iter()
                .map(|&(n, t)| BenchRow {
                    gpu_layers: n,
                    test_speed_ms: 1.0,
                    decode_ms_per_token: t,
                    ..BenchRow::default()
                })
                .collect(),
            comparison: None,
        }
    }

    /// A one-row report (8 layers) with these decode runs; the single figure is the first.
    fn with_runs(decode_runs: &[f64]) -> BenchReport {
        let mut r = report(&[(8, decode_runs[0])]);
        r.rows[0].decode_runs_ms_per_token = decode_runs.to_vec();
        r
    }

    #[test]
    fn spreads_are_interquartile_ranges_over_the_median() {
        let s = Spread::of(&[5.0, 1.0, 3.0, 2.0, 4.0], 9.0);
        assert_eq!((s.median, s.relative_iqr), (3.0, 2.0 / 3.0));
        let s = Spread::of(&[2.0, 4.0], 9.0);
        assert_eq!((s.median, s.relative_iqr), (3.0, 1.0 / 3.0));
        assert_eq!(Spread::of(&[7.0], 9.0).relative_iqr, 0.0);
        let older = Spread::of(&[], 9.0);
        assert_eq!((older.median, older.relative_iqr), (9.0, 0.0));
    }

    #[test]
    fn regressions_beyond_the_threshold_only() {
        let old = report(&[(28, 10.0), (8, 20.0), (0, 30.0)]);
        let new = report(&[(28, 10.9), (8, 22.5), (4, 99.0)]);
        let c = compare(&old, &new, 0.10).unwrap();
        assert_eq!(c.regressions.len(), 1, "{c:?}");
        assert!(
            c.regressions[0].starts_with("N=8: decode ms/token 22.50 vs 20.00 (+12%)"),
            "{c:?}"
        );
        assert_eq!(
            (&c.missing_in_baseline[..], &c.missing_here[..]),
            (&[4][..], &[0][..])
        );
        let e = c.verdict().unwrap_err();
        assert!(e.is::<Regression>(), "{e}");
        // Unchanged figures pass; a wider threshold passes this one.
        compare(&old, &old, 0.0).unwrap().verdict().unwrap();
        compare(&old, &new, 0.2).unwrap().verdict().unwrap();
    }

    #[test]
    fn an_unchanged_rerun_with_noisy_runs_passes() {
        // One slow run in each (another process woke up): the single figures differ by 25%,
        // the medians by 1%.
        let old = with_runs(&[10.0, 9.8, 10.4, 12.9, 10.1]);
        let new = with_runs(&[12.5, 10.2, 9.9, 10.3, 10.0]);
        let c = compare(&old, &new, 0.10).unwrap();
        assert_eq!(c.rows[0].decode_ms, (10.1, 10.2, 10.2 / 10.1));
        assert!(
            c.regressions.is_empty() && c.within_noise.is_empty(),
            "{c:?}"
        );
        c.verdict().unwrap();
        // Even with no threshold, 1% is within the runs' spread: a note, not a failure.
        let c = compare(&old, &new, 0.0).unwrap();
        assert!(c.regressions.is_empty(), "{c:?}");
        assert_eq!(c.within_noise.len(), 1, "{c:?}");
        c.verdict().unwrap();
    }

    #[test]
    fn a_slowdown_beyond_the_threshold_and_the_spread_is_a_regression() {
        let old = with_runs(&[10.0, 9.8, 10.4, 12.9, 10.1]);
        let new = with_runs(&[13.0, 12.8, 13.5, 16.0, 13.1]);
        let c = compare(&old, &new, 0.10).unwrap();
        assert_eq!(c.regressions.len(), 1, "{c:?}");
        assert!(
            c.regressions[0].contains("13.10 vs 10.10 (+30%, beyond the 4% spread)"),
            "{c:?}"
        );
        assert!(c.verdict().unwrap_err().is::<Regression>());
    }

    #[test]
    fn a_slowdown_within_the_spread_passes_with_a_note() {
        // Medians 10 and 11.5 (+15%), spreads 20% and 26%.
        let old = with_runs(&[10.0, 8.0, 12.0, 9.0, 11.0]);
        let new = with_runs(&[11.5, 9.0, 14.0, 10.0, 13.0]);
        let c = compare(&old, &new, 0.10).unwrap();
        assert!(c.regressions.is_empty(), "{c:?}");
        assert_eq!(
            c.within_noise,
            ["N=8: decode ms/token 11.50 vs 10.00 (+15%, within the 26% spread)"]
        );
        c.verdict().unwrap();
    }

    #[test]
    fn reports_without_runs_compare_on_their_single_figure() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let old = BenchReport::read(&root.join("docs/bench-h200-6c043fd.json")).unwrap();
        assert!(old
            .rows
            .iter()
            .all(|r| r.decode_runs_ms_per_token.is_empty()));
        compare(&old, &old, 0.0).unwrap().verdict().unwrap();
        // 15% slower, no runs to show noise: every row regresses.
        let mut slower = old.clone();
        for r in &mut slower.rows {
            r.decode_ms_per_token *= 1.15;
        }
        let c = compare(&old, &slower, 0.10).unwrap();
        assert_eq!(c.regressions.len(), old.rows.len(), "{c:?}");
        // A new report with runs against an old one: its own spread is the allowance.
        let mut noisy = slower.clone();
        for r in &mut noisy.rows {
            let m = r.decode_ms_per_token;
            r.decode_runs_ms_per_token = vec![0.8 * m, 0.9 * m, m, 1.1 * m, 1.2 * m];
        }
        let c = compare(&old, &noisy, 0.10).unwrap();
        assert!(c.regressions.is_empty(), "{c:?}");
        assert_eq!(c.within_noise.len(), old.rows.len(), "{c:?}");
    }

    #[test]
    fn the_same_card_in_another_slot_compares() {
        let mut old = report(&[(28, 10.0)]);
        let mut new = report(&[(28, 10.0)]);
        old.device = "GPU 0 NVIDIA H200".into();
        new.device = "GPU 1 NVIDIA H200 (PCI 0000:9a:00.0)".into();
        assert!(
            compare(&old, &new, 0.1).is_err(),
            "another index is another card"
        );
        new.device = "GPU 0 NVIDIA H200 (PCI 0000:9a:00.0)".into();
        assert!(compare(&old, &new, 0.1).is_ok());
    }

    #[test]
    fn comparisons_of_unlike_or_disjoint_reports_are_refused() {
        let old = report(&[(28, 10.0)]);
        let mut other = report(&[(28, 10.0)]);
        other.device = "GPU 0 NVIDIA H200".into();
        other.batch = 4;
        let e = compare(&old, &other, 0.1).unwrap_err();
        assert!(e.is::<crate::UsageError>(), "{e}");
        assert!(
            e.to_string().contains("device") && e.to_string().contains("batch"),
            "{e}"
        );
        let e = compare(&old, &report(&[(8, 1.0)]), 0.1).unwrap_err();
        assert!(e.to_string().contains("no layer count in common"), "{e}");
    }
}
