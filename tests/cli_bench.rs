//! `bench` through the binary: measuring each layer count, the gate against a baseline (run
//! to run noise allowed for, exit 3 on a regression), and its progress on stderr.

mod common;

use common::cli::{fails, ok, vibeoffload};
use std::path::Path;
use vibeoffload::measure::{BenchReport, Comparison};

/// `r` with every row's runs replaced by these (and its single figures by their first).
fn with_runs(r: &BenchReport, decode_ms: &[f64], test_speed_ms: &[f64]) -> BenchReport {
    let mut r = r.clone();
    for row in &mut r.rows {
        row.decode_runs_ms_per_token = decode_ms.to_vec();
        row.decode_ms_per_token = decode_ms[0];
        row.test_speed_runs_ms = test_speed_ms.to_vec();
        row.test_speed_ms = test_speed_ms[0];
    }
    r.comparison = None;
    r
}

fn write(dir: &Path, name: &str, r: &BenchReport) {
    std::fs::write(dir.join(name), serde_json::to_string(r).unwrap()).unwrap();
}

/// A real (tiny) bench report to edit: the embedded model, 8 layers, one row.
fn measured(dir: &Path) -> BenchReport {
    let args = [
        "bench",
        "--layers",
        "8",
        "--prompt-len",
        "4",
        "--gen-tokens",
        "2",
        "--runs",
        "1",
        "--json",
        "-q",
    ];
    serde_json::from_str(&ok(dir, &args)).unwrap()
}

#[test]
fn bench_measures_each_layer_count_and_guards_a_baseline() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args = [
        "bench",
        "--layers",
        "8,2",
        "--prompt-len",
        "4",
        "--gen-tokens",
        "2",
        "--runs",
        "2",
        "--plot",
        "b.svg",
        "--json",
    ];
    let o = vibeoffload(d, &args);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let r: BenchReport = serde_json::from_str(&o.stdout).unwrap();
    let counts: Vec<usize> = r.rows.iter().map(|x| x.gpu_layers).collect();
    assert_eq!(counts, [8, 2]);
    assert!(r
        .rows
        .iter()
        .all(|x| x.decode_ms_per_token > 0.0 && x.test_speed_ms > 0.0));
    // Each row keeps its runs: two test-speed passes, two decodes (the figure is one of them).
    for x in &r.rows {
        assert_eq!(x.test_speed_runs_ms.len(), 2, "{x:?}");
        assert_eq!(x.decode_runs_ms_per_token.len(), 2, "{x:?}");
        assert!(x.decode_runs_ms_per_token.contains(&x.decode_ms_per_token));
    }
    // stderr is a pipe here: plain progress lines with the row count and an ETA, no escapes.
    for line in [
        "bench: 8 GPU layers: loading, 0/2 rows done (0%)",
        "bench: 2 GPU layers: decode, 1/2 rows done (50%), eta ",
    ] {
        assert!(o.stderr.contains(line), "{line:?} not in {}", o.stderr);
    }
    assert!(!o.stderr.contains('\x1b'), "{:?}", o.stderr);
    assert_eq!(
        r.rows[0].streamed_bytes_per_token, 0,
        "nothing streams with every layer resident"
    );
    assert!(r.rows[1].streamed_bytes_per_token > 0);
    let svg = std::fs::read_to_string(d.join("b.svg")).unwrap();
    assert!(
        svg.starts_with("<svg") && svg.contains("ms/token"),
        "{}",
        &svg[..100.min(svg.len())]
    );

    // A baseline far faster than anything possible: every row regresses, exit 3 (its own code).
    let fast = with_runs(&r, &[1e-6], &[1e-6]);
    write(d, "fast.json", &fast);
    let base = [
        "bench",
        "--layers",
        "8,2",
        "--prompt-len",
        "4",
        "--gen-tokens",
        "2",
        "--runs",
        "1",
        "--baseline",
    ];
    // The table still prints and --json-out still writes the report.
    let o = vibeoffload(
        d,
        &[&base[..], &["fast.json", "--json-out", "new.json"]].concat(),
    );
    assert_eq!(o.code, 3, "{}", o.stderr);
    assert!(
        o.stderr.contains("slower than the baseline") && o.stderr.contains("N=8"),
        "{}",
        o.stderr
    );
    assert!(o.stdout.contains("ms/token"), "{}", o.stdout);
    let written: BenchReport =
        serde_json::from_str(&std::fs::read_to_string(d.join("new.json")).unwrap()).unwrap();
    assert_eq!(written.rows.len(), 2);
    let comparison = written.comparison.expect("the comparison is in the JSON");
    assert_eq!(comparison.rows.len(), 2);
    assert_eq!(comparison.regressions.len(), 4);
    // bench compare reads two files and judges them alike, without rerunning.
    let o = vibeoffload(d, &["bench", "compare", "fast.json", "new.json"]);
    assert_eq!(o.code, 3, "{}", o.stderr);
    assert!(
        o.stdout.contains("decode ms/token (new/old)"),
        "{}",
        o.stdout
    );
    ok(d, &["bench", "compare", "new.json", "new.json"]);
    // Another device, or no layer count in common: refused, not passed.
    let mut elsewhere = fast.clone();
    elsewhere.device = "GPU 0 NVIDIA H200".into();
    write(d, "elsewhere.json", &elsewhere);
    fails(
        d,
        &["bench", "compare", "elsewhere.json", "new.json"],
        2,
        &["measured differently", "device"],
    );
    let mut disjoint = fast.clone();
    for row in &mut disjoint.rows {
        row.gpu_layers += 1;
    }
    write(d, "disjoint.json", &disjoint);
    fails(
        d,
        &["bench", "compare", "disjoint.json", "new.json"],
        2,
        &["no layer count in common"],
    );
    // A slow baseline passes.
    write(d, "slow.json", &with_runs(&r, &[1e9], &[1e9]));
    ok(d, &[&base[..], &["slow.json"]].concat());
    fails(
        d,
        &["bench", "--baseline", "missing.json"],
        1,
        &["cannot read missing.json"],
    );
    fails(d, &["bench", "--layers", "9"], 2, &["--layers 9"]);
    fails(d, &["bench", "--runs", "0"], 2, &["--runs 0", "1 or more"]);
}

#[test]
fn the_gate_allows_for_run_to_run_noise() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r = measured(d);
    let compare = |old: &str, new: &str, extra: &[&str]| {
        let args = [&["bench", "compare", old, new][..], extra].concat();
        vibeoffload(d, &args)
    };

    // An unchanged rerun: one slow run in each report (25% apart as single figures), medians
    // 1% apart. It passes, even with no threshold at all (then with a note).
    let old = with_runs(
        &r,
        &[10.0, 9.8, 10.4, 12.9, 10.1],
        &[5.0, 5.1, 4.9, 6.5, 5.0],
    );
    let rerun = with_runs(
        &r,
        &[12.5, 10.2, 9.9, 10.3, 10.0],
        &[6.3, 5.0, 5.1, 4.9, 5.0],
    );
    write(d, "old.json", &old);
    write(d, "rerun.json", &rerun);
    let o = compare("old.json", "rerun.json", &[]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert!(o.stdout.contains("no regression"), "{}", o.stdout);
    let o = compare("old.json", "rerun.json", &["--threshold", "0", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let c: Comparison = serde_json::from_str(&o.stdout).unwrap();
    assert!(c.regressions.is_empty(), "{c:?}");
    assert_eq!(c.within_noise.len(), 1, "{c:?}");

    // A real regression, 30% beyond a 4% spread: exit 3, named on the error line.
    let slower = with_runs(
        &r,
        &[13.0, 12.8, 13.5, 16.0, 13.1],
        &[5.0, 5.1, 4.9, 6.5, 5.0],
    );
    write(d, "slower.json", &slower);
    let o = compare("old.json", "slower.json", &[]);
    assert_eq!(o.code, 3, "{}", o.stderr);
    assert!(
        o.stderr.contains(
            "error: slower than the baseline by more than 10% and the run-to-run spread: N=8: \
             decode ms/token 13.10 vs 10.10 (+30%, beyond the 4% spread)"
        ),
        "{}",
        o.stderr
    );

    // 15% slower, but the runs spread by 20% and 26%: passes, with a note saying so.
    let wide = with_runs(&r, &[10.0, 8.0, 12.0, 9.0, 11.0], &[5.0; 3]);
    let wider = with_runs(&r, &[11.5, 9.0, 14.0, 10.0, 13.0], &[5.0; 3]);
    write(d, "wide.json", &wide);
    write(d, "wider.json", &wider);
    let o = compare("wide.json", "wider.json", &[]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    // (Lines longer than the terminal's 100 columns are folded: unfold them.)
    assert!(
        o.stdout.replace("\n  ", " ").contains(
            "within the run-to-run spread (passed): N=8: decode ms/token 11.50 vs 10.00 \
             (+15%, within the 26% spread)"
        ),
        "{}",
        o.stdout
    );
    // The same figures without runs (a report from before they were kept): no allowance.
    let mut single = wider.clone();
    single.rows[0].decode_runs_ms_per_token.clear();
    single.rows[0].decode_ms_per_token = 11.5;
    let mut single_old = wide.clone();
    single_old.rows[0].decode_runs_ms_per_token.clear();
    write(d, "single.json", &single);
    write(d, "single-old.json", &single_old);
    let o = compare("single-old.json", "single.json", &[]);
    assert_eq!(o.code, 3, "{}", o.stderr);
    assert!(
        o.stderr
            .contains("N=8: decode ms/token 11.50 vs 10.00 (+15%)"),
        "{}",
        o.stderr
    );
}

#[test]
fn bench_files_from_before_runs_were_kept_still_compare() {
    let dir = tempfile::tempdir().unwrap();
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    let old = docs.join("bench-h200-6c043fd.json");
    let old = old.to_str().unwrap();
    let text = ok(
        dir.path(),
        &["bench", "compare", old, old, "--threshold", "0"],
    );
    assert!(text.contains("no regression"), "{text}");
}

/// `--json-out` is rewritten whole after each layer count: a bench stopped in its second row
/// (Ctrl-C here; a crash alike) leaves a valid report of the first.
#[cfg(unix)]
#[test]
fn an_interrupted_bench_keeps_the_rows_it_finished() {
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let args = [
        "bench",
        "--layers",
        "8,2",
        "--prompt-len",
        "4",
        "--gen-tokens",
        "2",
        "--runs",
        "1",
        "--json-out",
        "partial.json",
        "-q",
    ];
    let child = Command::new(env!("CARGO_BIN_EXE_vibeoffload"))
        .args(args)
        .current_dir(d)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The file appears when the first row is done; the second takes a second or more.
    let path = d.join("partial.json");
    let stderr = common::cli::interrupt(child, || path.exists());
    let partial = BenchReport::read(&path).unwrap();
    let counts: Vec<usize> = partial.rows.iter().map(|r| r.gpu_layers).collect();
    assert_eq!(counts, [8], "{stderr}");
    assert!(partial.rows[0].decode_ms_per_token > 0.0);
    assert!(partial.tool.starts_with("vibeoffload "), "{}", partial.tool);
    common::cli::assert_no_temporary_files(d);

    // Uninterrupted, the file ends with every row (the same schema).
    ok(d, &args);
    let whole = BenchReport::read(&path).unwrap();
    assert_eq!(whole.rows.len(), 2);
    assert_eq!(whole.schema, partial.schema);
}

/// The gate compares like with like: a baseline of another model is refused (exit 2), by
/// `bench compare` and by `bench --baseline` alike; layer counts only one side measured are
/// compared by neither, and named in the comparison (its JSON and its text).
#[test]
fn the_gate_refuses_another_model_and_names_layer_counts_one_side_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let r = measured(d);
    write(d, "this.json", &r);
    let mut other = r.clone();
    other.model.config.intermediate_size *= 2;
    other.model.layer_bytes *= 2;
    other.model.source = "another model".into();
    write(d, "other.json", &other);
    fails(
        d,
        &["bench", "compare", "other.json", "this.json"],
        2,
        &[
            "measured differently",
            "model (embedded test model",
            "against another model)",
        ],
    );
    let bench = [
        "bench",
        "--layers",
        "8",
        "--prompt-len",
        "4",
        "--gen-tokens",
        "2",
        "--runs",
        "1",
        "-q",
        "--baseline",
        "other.json",
    ];
    fails(d, &bench, 2, &["measured differently", "model"]);

    // The baseline measured 8 and 4 layers, this report 8 and 2: only 8 is compared.
    let row = |n: usize| {
        let mut x = r.rows[0].clone();
        x.gpu_layers = n;
        x
    };
    let mut old = r.clone();
    old.rows = vec![row(8), row(4)];
    let mut new = r.clone();
    new.rows = vec![row(8), row(2)];
    write(d, "old.json", &old);
    write(d, "new.json", &new);
    let o = vibeoffload(d, &["bench", "compare", "old.json", "new.json", "--json"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    let c: Comparison = serde_json::from_str(&o.stdout).unwrap();
    let compared: Vec<usize> = c.rows.iter().map(|x| x.gpu_layers).collect();
    assert_eq!(compared, [8]);
    assert_eq!(c.missing_in_baseline, [2]);
    assert_eq!(c.missing_here, [4]);
    let text = ok(d, &["bench", "compare", "old.json", "new.json"]);
    for line in [
        "layer counts not in the baseline: [2]",
        "layer counts in the baseline only: [4]",
        "no regression",
    ] {
        assert!(text.contains(line), "{line:?} not in {text}");
    }
}
