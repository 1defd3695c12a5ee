//! `vibeoffload convert` on a tiny synthesized bf16 model, one file and sharded: the result is
//! the planner's layout to the byte, every value is the float8 rounding of its source, the
//! engine runs it, and bad sources or existing outputs are refused with nothing written.

mod common;

use common::cli::{assert_no_temporary_files, ok, vibeoffload};
use common::{shard, Weights};
use std::path::{Path, PathBuf};
use vibeoffload::arch::config::ModelConfig;
use vibeoffload::arch::speech::SpeechConfig;
use vibeoffload::arch::Role;
use vibeoffload::checkpoint::convert::{convert as convert_model, ConvertReport};
use vibeoffload::checkpoint::inventory::Inventory;
use vibeoffload::checkpoint::layout::{self, Precision, ScaleConvention, ScaleGranularity};
use vibeoffload::checkpoint::synth::{self, SynthSpec};
use vibeoffload::checkpoint::{Checkpoint, ConfigSource, ModelInfo};
use vibeoffload::dtype::{f32_to_f8e4m3, DType};
use vibeoffload::engine::{Engine, EngineOptions};
use vibeoffload::report::InspectReport;

const LAYERS: usize = 3;

fn config() -> ModelConfig {
    ModelConfig {
        hidden_size: 64,
        intermediate_size: 128,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        num_hidden_layers: LAYERS,
        vocab_size: 256,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: false,
        max_position_embeddings: 32768,
    }
}

fn speech() -> SpeechConfig {
    SpeechConfig::small(config().hidden_size)
}

/// The precisions `convert` writes, with the flags that ask for each.
fn precisions() -> [(Precision, &'static [&'static str]); 3] {
    let scaled = |c| Precision::Float8Scaled(c, ScaleGranularity::PerChannel);
    [
        (Precision::Float8Plain, &[]),
        (
            scaled(ScaleConvention::ScaleWeight),
            &["--precision", "float8-scaled"],
        ),
        (
            scaled(ScaleConvention::WeightScale),
            &[
                "--precision",
                "float8-scaled",
                "--scale-convention",
                "weight-scale",
            ],
        ),
    ]
}

/// Writes the tiny model at `dir/m.safetensors` in `precision`, with its config.json.
fn synthesize(dir: &Path, precision: Precision) -> PathBuf {
    let spec = SynthSpec {
        config: config(),
        speech: speech(),
        precision,
        seed: 7,
    };
    let path = dir.join("m.safetensors");
    synth::write(&spec, &path, true, |_, _| {}).unwrap();
    path
}

/// Fails with `code` and one line containing each of `words`, printing nothing on stdout.
fn fails(dir: &Path, args: &[&str], code: i32, words: &[&str]) {
    let o = vibeoffload(dir, args);
    let (stdout, stderr) = (o.stdout, o.stderr);
    assert_eq!(
        (o.code, stderr.lines().count()),
        (code, 1),
        "{args:?}: {stderr}"
    );
    for w in words {
        assert!(stderr.contains(w), "{w:?} not in {stderr}");
    }
    assert!(stdout.is_empty(), "{args:?} printed {stdout}");
}

/// `convert --model-path SRC --out OUT --json` run in `dir`, and its report.
fn convert(dir: &Path, src: &str, out: &str, flags: &[&str]) -> ConvertReport {
    let mut args = vec!["convert", "--model-path", src, "--out", out, "--json"];
    args.extend_from_slice(flags);
    serde_json::from_str(&ok(dir, &args)).unwrap()
}

fn inspect(dir: &Path, path: &str) -> InspectReport {
    serde_json::from_str(&ok(dir, &["inspect", path, "--json"])).unwrap()
}

#[test]
fn a_converted_file_is_the_planners_layout_to_the_byte() {
    let dir = tempfile::tempdir().unwrap();
    let source = synthesize(dir.path(), Precision::BF16);
    let source_params = inspect(dir.path(), "m.safetensors").params;
    for (i, (precision, flags)) in precisions().into_iter().enumerate() {
        let out = format!("out{i}");
        std::fs::create_dir(dir.path().join(&out)).unwrap();
        let file = format!("{out}/f8.safetensors");
        let report = convert(dir.path(), "m.safetensors", &file, flags);
        let specs = layout::vibevoice(&config(), &speech(), precision);
        let planned = layout::tensor_infos(specs.clone());

        // The header lists the layout's tensors, dtypes, shapes and offsets, in its order.
        let written = Checkpoint::open(&dir.path().join(&file)).unwrap();
        assert_eq!(written.header.tensors, planned, "{precision:?}");

        // inspect reads from the file what the planner computes from the layout.
        let mut got = inspect(dir.path(), &file);
        let expected = InspectReport::build(&ModelInfo {
            source: file.clone(),
            config: config(),
            speech: Some(speech()),
            config_source: ConfigSource::ConfigJson,
            inventory: Inventory::new(planned).unwrap(),
            checkpoint: None,
        });
        assert_eq!(
            got.file_bytes,
            8 + got.header_bytes + expected.model.total_bytes
        );
        (got.file_bytes, got.header_bytes) = (0, 0);
        assert_eq!(got, expected, "{precision:?}");
        assert_eq!(got.params, source_params);

        // The report counts what was read and written.
        let source_bytes = std::fs::metadata(&source).unwrap().len();
        let source_header = Checkpoint::open(&source).unwrap().header.header_bytes;
        assert_eq!(report.bytes_in, source_bytes - 8 - source_header);
        assert_eq!(report.file_bytes, written.file_bytes);
        assert_eq!(report.tensors, specs.len());
        let linear = specs.iter().filter(|s| s.role == Role::Linear).count();
        match precision {
            Precision::Float8Plain => {
                assert_eq!(report.float8_tensors, specs.len());
                assert_eq!(report.scale_tensors, 0);
            }
            _ => assert_eq!(
                (report.float8_tensors, report.scale_tensors),
                (linear, linear)
            ),
        }
        assert!(report.config_written);
        let config_json = dir.path().join(&out).join("config.json");
        assert_eq!(report.config_path, Path::new(&out).join("config.json"));
        let written_config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(config_json).unwrap()).unwrap();
        assert_eq!(written_config["torch_dtype"], "float8_e4m3fn");
        assert_no_temporary_files(&dir.path().join(&out));
    }
}

#[test]
fn single_and_sharded_sources_give_identical_files() {
    let single = tempfile::tempdir().unwrap();
    synthesize(single.path(), Precision::BF16);
    let sharded = tempfile::tempdir().unwrap();
    synthesize(sharded.path(), Precision::BF16);
    shard(sharded.path(), 3);
    for (i, (_, flags)) in precisions().into_iter().enumerate() {
        let out = |dir: &Path| dir.join(format!("out{i}"));
        std::fs::create_dir(out(single.path())).unwrap();
        std::fs::create_dir(out(sharded.path())).unwrap();
        let file = format!("out{i}/f8.safetensors");
        let a = convert(single.path(), "m.safetensors", &file, flags);
        // The directory: its index and shards are found without naming them.
        let b = convert(sharded.path(), ".", &file, flags);
        assert_eq!((a.shards, b.shards), (0, 3));
        assert_eq!(a.bytes_in, b.bytes_in);
        for name in ["f8.safetensors", "config.json"] {
            let read = |dir: &Path| std::fs::read(out(dir).join(name)).unwrap();
            assert!(
                read(single.path()) == read(sharded.path()),
                "{flags:?}: {name}"
            );
        }
    }
}

/// The scale of weight `name` in a converted file, or `None`.
fn scale_of(w: &Weights, name: &str) -> Option<Vec<f64>> {
    let stem = name.strip_suffix("weight")?;
    ["scale_weight", "weight_scale"]
        .iter()
        .map(|s| format!("{stem}{s}"))
        .find(|s| w.has(s))
        .map(|s| w.raw(&s))
}

#[test]
fn every_value_is_the_float8_rounding_of_its_source() {
    let dir = tempfile::tempdir().unwrap();
    let source_path = synthesize(dir.path(), Precision::BF16);
    let source = Weights::read(&source_path);
    for (i, (precision, flags)) in precisions().into_iter().enumerate() {
        let file = format!("f8-{i}.safetensors");
        let report = convert(dir.path(), "m.safetensors", &file, flags);
        assert_eq!((report.clamped_values, report.nan_values), (0, 0));
        let converted = Weights::read(&dir.path().join(&file));
        let specs = layout::vibevoice(&config(), &speech(), precision);
        for spec in specs
            .iter()
            .filter(|s| s.role != Role::Scale && s.role != Role::Marker)
        {
            let (x, q) = (source.raw(&spec.name), converted.raw(&spec.name));
            if spec.dtype == DType::BF16 {
                assert_eq!(x, q, "{}: bf16 tensors are copied", spec.name);
                continue;
            }
            // One scale per row (plain: 1 everywhere).
            let scales = scale_of(&converted, &spec.name).unwrap_or(vec![1.0]);
            let cols = x.len() / scales.len();
            for (r, row) in x.chunks(cols).enumerate() {
                let scale = scales[r];
                assert!(scale > 0.0, "{}: scale {scale}", spec.name);
                if scales.len() > 1 {
                    let max = row.iter().fold(0f64, |m, v| m.max(v.abs()));
                    let expected = if max == 0.0 { 1.0 } else { max as f32 / 448.0 };
                    assert_eq!(scale, f64::from(expected), "{} row {r}", spec.name);
                }
                for (c, &v) in row.iter().enumerate() {
                    let k = r * cols + c;
                    // The reference encoder's code for the value over its scale (in f32, as
                    // the converter divides).
                    let over_scale = v as f32 / scale as f32;
                    assert_eq!(
                        q[k],
                        common::f8(f32_to_f8e4m3(over_scale)),
                        "{}[{k}]",
                        spec.name
                    );
                    // Within float8's rounding: half a step of 3 mantissa bits for normal
                    // values, half the subnormal step (2^-10, scaled) below 2^-6.
                    let bound = match over_scale.abs() >= 2f32.powi(-6) {
                        true => 2f64.powi(-4) * v.abs(),
                        false => 2f64.powi(-10) * scale,
                    };
                    let decoded = q[k] * scale;
                    assert!(
                        (v - decoded).abs() <= bound * (1.0 + 1e-6),
                        "{}[{k}]: {v} -> {decoded}",
                        spec.name
                    );
                }
            }
        }
    }
}

#[test]
fn values_beyond_the_float8_range_saturate_and_are_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = synthesize(dir.path(), Precision::BF16);
    let name = "model.language_model.layers.1.mlp.up_proj.weight";
    let mut w = Weights::read(&path);
    w.edit(name, |v| {
        (v[0], v[1], v[2]) = (1000.0, -600.0, 460.0);
    });
    w.save(&path);
    let plain = convert(dir.path(), "m.safetensors", "plain.safetensors", &[]);
    // 460 rounds to 448 as PyTorch's cast does; 1000 and -600 would be NaN there.
    assert_eq!(plain.clamped_values, 2);
    let got = Weights::read(&dir.path().join("plain.safetensors")).raw(name);
    assert_eq!(got[..3], [448.0, -448.0, 448.0]);
    let text = ok(
        dir.path(),
        &[
            "convert",
            "--model-path",
            "m.safetensors",
            "--out",
            "text.safetensors",
        ],
    );
    assert!(
        text.contains("2 values beyond ±464 written as ±448"),
        "{text}"
    );

    let flags = ["--precision", "float8-scaled"];
    let scaled = convert(dir.path(), "m.safetensors", "scaled.safetensors", &flags);
    assert_eq!(scaled.clamped_values, 0);
    // The row's largest value sets its scale and comes back whole; the others within rounding.
    let got = Weights::read(&dir.path().join("scaled.safetensors")).get(name);
    assert!((got[0] - 1000.0).abs() < 1e-3, "{}", got[0]);
    assert!((got[1] + 600.0).abs() <= 600.0 / 16.0, "{}", got[1]);
}

/// The final-normed hidden states of a few tokens through every layer.
fn hidden(path: &Path) -> Vec<f32> {
    let options = EngineOptions {
        gpu_layers: 1,
        ..EngineOptions::default()
    };
    let model = ModelInfo::open(path).unwrap();
    let mut engine = Engine::load(model, &options, |_| {}).unwrap();
    let h = engine.forward(&[3, 141, 59, 26, 5]).unwrap();
    h.flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn the_engine_runs_converted_files_and_scales_bring_them_closer_to_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let source = synthesize(dir.path(), Precision::BF16);
    let reference = hidden(&source);
    let mut errors = Vec::new();
    for (i, (_, flags)) in precisions().into_iter().enumerate() {
        let file = format!("f8-{i}.safetensors");
        convert(dir.path(), "m.safetensors", &file, flags);
        let got = hidden(&dir.path().join(file));
        assert!(got.iter().all(|v| v.is_finite()), "{flags:?}");
        let error = got
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        errors.push(error);
    }
    // Per-channel scales use float8's whole range; the plain cast leaves small weights in its
    // subnormals.
    assert!(errors[1] < errors[0] && errors[2] < errors[0], "{errors:?}");
    assert_eq!(errors[1], errors[2], "the convention only names the scales");
}

#[test]
fn bad_sources_and_existing_outputs_are_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    synthesize(d, Precision::BF16);
    let args =
        |src: &'static str, out: &'static str| vec!["convert", "--model-path", src, "--out", out];

    // A float8 source, one file and sharded: the tensor and the file holding it.
    let float8 = tempfile::tempdir().unwrap();
    synthesize(float8.path(), Precision::Float8Plain);
    let factor = "model.speech_scaling_factor";
    fails(
        float8.path(),
        &args("m.safetensors", "o.safetensors"),
        1,
        &[factor, "m.safetensors", "F8_E4M3", "float8 already"],
    );
    shard(float8.path(), 2);
    fails(
        float8.path(),
        &args(".", "o.safetensors"),
        1,
        &[factor, "model-00001-of-00002.safetensors", "F8_E4M3"],
    );
    assert_no_temporary_files(float8.path());
    assert!(!float8.path().join("o.safetensors").exists());

    // A tensor the layout does not have.
    let extra = tempfile::tempdir().unwrap();
    let path = synthesize(extra.path(), Precision::BF16);
    let mut w = Weights::read(&path);
    w.add("model.extra.weight", "BF16", &[2], &[0; 4]);
    w.save(&path);
    fails(
        extra.path(),
        &args("m.safetensors", "o.safetensors"),
        1,
        &[
            "model.extra.weight",
            "m.safetensors",
            "not part of VibeVoice's layout",
        ],
    );

    // An existing output stays as it was without --force.
    std::fs::write(d.join("o.safetensors"), "keep me").unwrap();
    fails(
        d,
        &args("m.safetensors", "o.safetensors"),
        2,
        &["refusing to overwrite", "--force"],
    );
    assert_eq!(
        std::fs::read_to_string(d.join("o.safetensors")).unwrap(),
        "keep me"
    );
    let mut forced = args("m.safetensors", "o.safetensors");
    forced.push("--force");
    ok(d, &forced);
    Checkpoint::open(&d.join("o.safetensors")).unwrap();

    // A config.json of another model beside the output: refused, then replaced with --force
    // (no other checkpoint there needs it).
    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("config.json"), "{}").unwrap();
    let out = other.path().join("o.safetensors");
    let out = out.to_str().unwrap();
    let to_other = ["convert", "--model-path", "m.safetensors", "--out", out];
    fails(d, &to_other, 2, &["config.json", "describes another model"]);
    assert!(!other.path().join("o.safetensors").exists());
    ok(d, &[&to_other[..], &["--force"]].concat());
    ModelInfo::open(&other.path().join("o.safetensors")).unwrap();

    // A scale convention without scales would do nothing.
    let mut flags = args("m.safetensors", "p.safetensors");
    flags.extend(["--scale-convention", "weight-scale"]);
    fails(d, &flags, 2, &["--scale-convention", "float8-scaled"]);
    assert_no_temporary_files(d);
}

#[test]
fn the_library_reads_f32_sources_and_writes_one_scale_per_matrix() {
    let dir = tempfile::tempdir().unwrap();
    let path = synthesize(dir.path(), Precision::BF16);
    // Two tensors as f32 values that bf16 cannot hold.
    // (Decoder layers must agree on dtypes, so these are outside them.)
    let (head, norm) = ("lm_head.weight", "model.language_model.norm.weight");
    let mut w = Weights::read(&path);
    let mut f32_values = Vec::new();
    for (name, shape) in [(head, vec![256, 64]), (norm, vec![64])] {
        let values: Vec<f32> = w.raw(name).iter().map(|&v| (v * 1.001) as f32).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        w.add(name, "F32", &shape, &bytes);
        f32_values.push(values);
    }
    w.save(&path);

    let model = ModelInfo::open(&path).unwrap();
    let precision = Precision::Float8Scaled(ScaleConvention::WeightScale, ScaleGranularity::Scalar);
    let out = dir.path().join("scalar.safetensors");
    let mut last = (0, 0);
    let report = convert_model(&model, &out, precision, false, |done, total| {
        last = (done, total)
    });
    let report = report.unwrap();
    assert_eq!(last, (report.file_bytes, report.file_bytes));
    let written = Checkpoint::open(&out).unwrap();
    let specs = layout::vibevoice(&config(), &speech(), precision);
    assert_eq!(written.header.tensors, layout::tensor_infos(specs));

    let converted = Weights::read(&out);
    let scale = converted.raw("lm_head.weight_scale");
    let max = f32_values[0].iter().fold(0f32, |m, v| m.max(v.abs()));
    assert_eq!(scale, [f64::from(max / 448.0)]);
    let codes: Vec<f64> = f32_values[0]
        .iter()
        .map(|&v| common::f8(f32_to_f8e4m3(v / (max / 448.0))))
        .collect();
    assert_eq!(converted.raw(head), codes);
    // Kept in bf16 by the layout, rounded to nearest even from f32.
    let bf16: Vec<f64> = f32_values[1]
        .iter()
        .map(|&v| f64::from(half::bf16::from_f32(v).to_f32()))
        .collect();
    assert_eq!(converted.raw(norm), bf16);
}
