//! `convert`: a Hugging Face checkpoint in bf16 (or f16, f32), one file or shards, to one
//! float8 file laid out exactly as [`layout::vibevoice`] gives it for the precision (the list
//! the planner and `synth` use), so `inspect` of the result equals the planner's expectation to
//! the byte.
//!
//! Plain float8 is the fork's `model.to(torch.float8_e4m3fn)`: every tensor cast, rounding to
//! nearest with ties to even. PyTorch's cast does not saturate: it turns every |x| > 464 (and
//! ±inf) into NaN, the one code above 448. This converter writes ±448 instead and counts those
//! values ([`ConvertReport::clamped_values`]); every other value gets PyTorch's code, NaN
//! included. Scaled float8 stores each linear weight divided by its scale, max |row| / 448 per
//! output channel (or max |matrix| / 448), so nothing clamps; a row of zeros gets scale 1.
//!
//! Streamed: each tensor is read from the memory map in pieces of about 4 MiB, converted,
//! written, and its pages released; what is held is one piece in and out, and a linear weight's
//! scales until they are written after it. Both files are written under temporary names and
//! renamed when complete, so an error or Ctrl-C leaves nothing under their names.

use super::header::TensorInfo;
use super::layout::{self, Precision, ScaleConvention, ScaleGranularity, TensorSpec};
use super::synth::{self, SynthSpec};
use super::{config, Checkpoint, ConfigSource, ModelInfo};
use crate::arch::config::ModelConfig;
use crate::arch::speech::SpeechConfig;
use crate::arch::Role;
use crate::dtype::{f32_to_f8e4m3, DType, F8E4M3_MAX};
use crate::output::Output;
use crate::UsageError;
use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Beyond this magnitude PyTorch's float8 E4M3 cast gives NaN (464 itself rounds to 448, the
/// even code); this converter saturates those values at ±448 and counts them.
pub const TORCH_F8E4M3_NAN_ABOVE: f32 = 464.0;
/// Size of the pieces a tensor is read in.
const PIECE_BYTES: usize = 4 << 20;

/// What `convert` wrote.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ConvertReport {
    /// The tool that wrote it: version and commit.
    pub tool: String,
    /// The checkpoint read: a file, or the index of a sharded one.
    pub source: String,
    /// Its shards (0 for a single file).
    pub shards: usize,
    /// The checkpoint written.
    pub path: PathBuf,
    /// The `config.json` beside it.
    pub config_path: PathBuf,
    /// Whether that `config.json` was written (`false`: one describing this model was there).
    pub config_written: bool,
    /// `float8`, `float8_scaled` or `bf16`.
    pub precision: String,
    /// Names of the scale tensors (scaled float8 only).
    pub scale_convention: Option<ScaleConvention>,
    /// One scale per matrix or per output channel (scaled float8 only).
    pub scale_granularity: Option<ScaleGranularity>,
    /// Tensors written, scales and marker included.
    pub tensors: usize,
    /// Of those, float8 tensors.
    pub float8_tensors: usize,
    /// Of those, scale tensors.
    pub scale_tensors: usize,
    /// Tensor bytes read.
    pub bytes_in: u64,
    /// Size of the file written.
    pub file_bytes: u64,
    /// Values cast to float8 beyond ±464, written as ±448 (PyTorch's cast makes them NaN).
    pub clamped_values: u64,
    /// NaN values cast to float8 (kept NaN, as PyTorch's cast does).
    pub nan_values: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Counts kept while encoding float8.
#[derive(Default)]
struct Counts {
    clamped: u64,
    nan: u64,
}

/// Converts `model` (opened from a checkpoint) to `out` in `precision`, with a `config.json`
/// beside it: the source's own (with `torch_dtype` naming the new precision), else one written
/// from the configuration. An existing `config.json` that describes the same model is kept;
/// existing files are replaced only when `force` is set. `progress` is called with the bytes
/// written so far and the file's size.
pub fn convert(
    model: &ModelInfo,
    out: &Path,
    precision: Precision,
    force: bool,
    mut progress: impl FnMut(u64, u64),
) -> Result<ConvertReport> {
    let started = Instant::now();
    let Some(checkpoint) = &model.checkpoint else {
        bail!(
            "{} has no tensors to convert; name a checkpoint",
            model.source
        );
    };
    let Some(speech) = &model.speech else {
        bail!(
            "{} is a bare Qwen2 checkpoint (model.layers.*); convert writes VibeVoice checkpoints",
            model.source
        );
    };
    let specs = layout::vibevoice(&model.config, speech, precision);
    let sources = match_sources(checkpoint, &specs)?;

    let config_path = synth::check_checkpoint_path(out)?;
    if out.symlink_metadata().is_ok() && !force {
        bail!(UsageError::new(format!(
            "refusing to overwrite {}; pass --force to replace it",
            out.display()
        )));
    }
    let config_json = output_config(model, checkpoint, speech, precision)?;
    let config_written = config_needed(&config_path, model, speech, out, &config_json, force)?;

    let metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("generator".to_string(), "vibeoffload convert".to_string()),
    ]);
    let prefix = layout::header_prefix(&specs, &metadata);
    let total = prefix.len() as u64 + specs.iter().map(TensorSpec::size_bytes).sum::<u64>();

    let mut file = Output::begin(out)?;
    let mut config_file = match config_written {
        true => Some(Output::begin(&config_path)?),
        false => None,
    };
    let mut counts = Counts::default();
    {
        let mut sink = Sink {
            out: BufWriter::with_capacity(PIECE_BYTES, file.file()),
            path: out,
            written: 0,
            total,
            progress: &mut progress,
        };
        sink.write(&prefix)?;
        let mut scales: Option<Vec<f32>> = None;
        for spec in &specs {
            match spec.role {
                Role::Marker => {}
                Role::Scale => {
                    let values = scales
                        .take()
                        .expect("the layout puts a scale after its weight");
                    debug_assert_eq!(values.len() as u64, spec.shape.iter().product::<u64>());
                    let bytes: Vec<u8> = values.iter().flat_map(|s| s.to_le_bytes()).collect();
                    sink.write(&bytes)?;
                }
                _ => {
                    let source = sources[spec.name.as_str()];
                    let scaling = match precision {
                        Precision::Float8Scaled(_, g) if spec.dtype == DType::F8E4M3 => Some(g),
                        _ => None,
                    };
                    let tensor = Tensor {
                        checkpoint,
                        source,
                        spec,
                        scaling,
                    };
                    scales = tensor.write(&mut sink, &mut counts)?;
                }
            }
        }
        sink.out
            .flush()
            .with_context(|| format!("cannot write {}", out.display()))?;
    }
    file.file()
        .sync_all()
        .with_context(|| format!("cannot write {}", out.display()))?;
    checkpoint.check_unchanged()?;
    if let Some(config_file) = &mut config_file {
        config_file
            .file()
            .write_all(config_json.as_bytes())
            .with_context(|| format!("cannot write {}", config_path.display()))?;
    }
    synth::commit_with_config(file, config_file, force)?;
    let (precision_name, scale_convention, scale_granularity) = match precision {
        Precision::Float8Plain => ("float8", None, None),
        Precision::Float8Scaled(c, g) => ("float8_scaled", Some(c), Some(g)),
        Precision::BF16 => ("bf16", None, None),
    };
    Ok(ConvertReport {
        tool: crate::TOOL.into(),
        source: checkpoint.path.display().to_string(),
        shards: checkpoint.shards().len(),
        path: out.to_path_buf(),
        config_path,
        config_written,
        precision: precision_name.into(),
        scale_convention,
        scale_granularity,
        tensors: specs.len(),
        float8_tensors: specs
            .iter()
            .filter(|s| s.dtype == DType::F8E4M3 && s.role != Role::Marker)
            .count(),
        scale_tensors: specs.iter().filter(|s| s.role == Role::Scale).count(),
        bytes_in: sources.values().map(|t| t.size_bytes()).sum(),
        file_bytes: total,
        clamped_values: counts.clamped,
        nan_values: counts.nan,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Each tensor of the layout (scales and marker aside) with its source tensor, checked: every
/// source tensor is bf16, f16 or f32, belongs to the layout, and has the layout's shape.
fn match_sources<'a>(
    checkpoint: &'a Checkpoint,
    specs: &[TensorSpec],
) -> Result<HashMap<&'a str, &'a TensorInfo>> {
    let tensors = &checkpoint.header.tensors;
    let file = |t: &TensorInfo| checkpoint.file_of(&t.name).display().to_string();
    if let Some(t) = tensors
        .iter()
        .find(|t| !matches!(t.dtype, DType::BF16 | DType::F16 | DType::F32))
    {
        let hint = match t.dtype {
            DType::F8E4M3 | DType::F8E5M2 => " (this checkpoint is float8 already)",
            _ => "",
        };
        bail!(
            "{}: tensor {} is {}; convert reads bf16, f16 or f32 checkpoints{hint}",
            file(t),
            t.name,
            t.dtype
        );
    }
    let wanted: HashMap<&str, &TensorSpec> = specs
        .iter()
        .filter(|s| !matches!(s.role, Role::Scale | Role::Marker))
        .map(|s| (s.name.as_str(), s))
        .collect();
    let mut sources = HashMap::new();
    for t in tensors {
        match wanted.get(t.name.as_str()) {
            None => bail!(
                "{}: tensor {} is not part of VibeVoice's layout for this configuration; convert \
                 writes exactly that layout",
                file(t),
                t.name
            ),
            Some(s) if s.shape != t.shape => bail!(
                "{}: tensor {} has shape {:?} where the configuration gives {:?}",
                file(t),
                t.name,
                t.shape,
                s.shape
            ),
            Some(_) => sources.insert(t.name.as_str(), t),
        };
    }
    if let Some(name) = wanted.keys().find(|n| !sources.contains_key(*n)) {
        bail!("{} has no tensor {name}", checkpoint.path.display());
    }
    Ok(sources)
}

/// The `config.json` written beside the output: the source's own with `torch_dtype` naming the
/// new precision, else the one `synth` writes for this configuration.
fn output_config(
    model: &ModelInfo,
    checkpoint: &Checkpoint,
    speech: &SpeechConfig,
    precision: Precision,
) -> Result<String> {
    let mut json = match model.config_source {
        ConfigSource::ConfigJson => {
            let path = checkpoint.path.with_file_name("config.json");
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            config::parse_config_json(&text, &path)?
        }
        _ => synth::config_json(&SynthSpec {
            config: model.config.clone(),
            speech: speech.clone(),
            precision,
            seed: 0,
        }),
    };
    let torch_dtype = match precision {
        Precision::BF16 => "bfloat16",
        _ => "float8_e4m3fn",
    };
    json.as_object_mut()
        .ok_or_else(|| anyhow!("the source's config.json is not a JSON object"))?
        .insert("torch_dtype".into(), torch_dtype.into());
    Ok(serde_json::to_string_pretty(&json)?)
}

/// Whether the `config.json` beside the output must be written: not when one there already
/// describes this model; one describing another model is replaced only with `force`, and never
/// when it describes other checkpoints in that directory.
fn config_needed(
    config_path: &Path,
    model: &ModelInfo,
    speech: &SpeechConfig,
    out: &Path,
    new: &str,
    force: bool,
) -> Result<bool> {
    if config_path.symlink_metadata().is_err() {
        return Ok(true);
    }
    if describes(config_path, &model.config, speech) {
        return Ok(false);
    }
    if !force {
        bail!(UsageError::new(format!(
            "refusing to overwrite {}: it describes another model; pass --force to replace it",
            config_path.display()
        )));
    }
    synth::refuse_shared_config(out, config_path, new)?;
    Ok(true)
}

/// Whether the `config.json` at `path` describes a model of this configuration.
fn describes(path: &Path, config: &ModelConfig, speech: &SpeechConfig) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    let Ok(json) = config::parse_config_json(&text, path) else {
        return false;
    };
    ModelConfig::from_config_value(&json, path).is_ok_and(|c| c == *config)
        && SpeechConfig::from_config_value(&json, config.hidden_size, path)
            .is_ok_and(|s| s == *speech)
}

/// Where converted bytes go, counted for the progress callback.
struct Sink<'a, W: Write, P: FnMut(u64, u64)> {
    out: W,
    path: &'a Path,
    written: u64,
    total: u64,
    progress: P,
}

impl<W: Write, P: FnMut(u64, u64)> Sink<'_, W, P> {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        self.written += bytes.len() as u64;
        (self.progress)(self.written, self.total);
        Ok(())
    }
}

/// One tensor to convert: its source, its place in the layout, and how it is scaled.
struct Tensor<'a> {
    checkpoint: &'a Checkpoint,
    source: &'a TensorInfo,
    spec: &'a TensorSpec,
    /// For a scaled float8 weight.
    scaling: Option<ScaleGranularity>,
}

impl Tensor<'_> {
    /// Writes the tensor piece by piece; returns its scales when it has some (the layout puts
    /// them next).
    fn write<W: Write, P: FnMut(u64, u64)>(
        &self,
        sink: &mut Sink<'_, W, P>,
        counts: &mut Counts,
    ) -> Result<Option<Vec<f32>>> {
        let tensor_scale = match self.scaling {
            Some(ScaleGranularity::Scalar) => scale_for(self.max_abs()?),
            _ => 1.0,
        };
        let row = self.row_len();
        let mut scales = Vec::new();
        let (mut values, mut bytes) = (Vec::new(), Vec::new());
        self.for_each_piece(|piece| {
            bytes.clear();
            match (self.spec.dtype, self.source.dtype) {
                (DType::BF16, DType::BF16) => bytes.extend_from_slice(piece),
                (DType::BF16, dtype) => {
                    decode(dtype, piece, &mut values);
                    bytes.extend(
                        values
                            .iter()
                            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()),
                    );
                }
                (DType::F8E4M3, dtype) => {
                    decode(dtype, piece, &mut values);
                    match self.scaling {
                        Some(ScaleGranularity::PerChannel) => {
                            for r in values.chunks(row) {
                                let scale = scale_for(max_abs(r));
                                scales.push(scale);
                                encode(r, scale, &mut bytes, counts);
                            }
                        }
                        _ => encode(&values, tensor_scale, &mut bytes, counts),
                    }
                }
                (other, _) => bail!("convert writes no {other} tensor ({})", self.spec.name),
            }
            sink.write(&bytes)
        })?;
        Ok(match self.scaling {
            None => None,
            Some(ScaleGranularity::Scalar) => Some(vec![tensor_scale]),
            Some(ScaleGranularity::PerChannel) => Some(scales),
        })
    }

    /// Elements per output channel for a per-channel scaled weight (pieces hold whole rows, so
    /// each row's scale is known before it is encoded), else 1.
    fn row_len(&self) -> usize {
        match self.scaling {
            Some(ScaleGranularity::PerChannel) => {
                self.spec.shape[1..].iter().product::<u64>().max(1) as usize
            }
            _ => 1,
        }
    }

    /// Calls `f` with each piece of the source's bytes in order, releasing each piece's pages
    /// after it.
    fn for_each_piece(&self, mut f: impl FnMut(&[u8]) -> Result<()>) -> Result<()> {
        let element = self.source.dtype.size_bytes() as usize;
        let row = self.row_len();
        let piece_bytes = (PIECE_BYTES / element / row).max(1) * row * element;
        let mut start = 0u64;
        for piece in self.checkpoint.data(self.source).chunks(piece_bytes) {
            f(piece)?;
            let end = start + piece.len() as u64;
            self.checkpoint.release(self.source, start..end);
            start = end;
        }
        Ok(())
    }

    /// The largest finite magnitude in the source.
    fn max_abs(&self) -> Result<f32> {
        let (mut max, mut values) = (0f32, Vec::new());
        self.for_each_piece(|piece| {
            decode(self.source.dtype, piece, &mut values);
            max = max.max(max_abs(&values));
            Ok(())
        })?;
        Ok(max)
    }
}

/// The largest finite magnitude among `values` (0 for none).
fn max_abs(values: &[f32]) -> f32 {
    values
        .iter()
        .filter(|v| v.is_finite())
        .fold(0f32, |m, v| m.max(v.abs()))
}

/// The scale that maps a largest magnitude `max` to 448; 1 for a row of zeros.
fn scale_for(max: f32) -> f32 {
    match max / F8E4M3_MAX {
        s if s > 0.0 => s,
        _ => 1.0,
    }
}

/// Source bytes of `dtype` (bf16, f16 or f32, as checked) as f32 values, replacing `out`.
fn decode(dtype: DType, bytes: &[u8], out: &mut Vec<f32>) {
    out.clear();
    match dtype {
        DType::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        DType::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        ),
        DType::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        ),
        other => unreachable!("sources are checked to be BF16, F16 or F32, not {other}"),
    }
}

/// Appends `values / scale` as float8 codes, counting clamped and NaN values.
fn encode(values: &[f32], scale: f32, out: &mut Vec<u8>, counts: &mut Counts) {
    // Counted without branches; the plain cast skips the division, a third of the work.
    let (mut clamped, mut nan) = (0, 0);
    let mut code = |q: f32| {
        clamped += u64::from(q.abs() > TORCH_F8E4M3_NAN_ABOVE);
        nan += u64::from(q.is_nan());
        f32_to_f8e4m3(q)
    };
    match scale {
        1.0 => out.extend(values.iter().map(|&x| code(x))),
        _ => out.extend(values.iter().map(|&x| code(x / scale))),
    }
    counts.clamped += clamped;
    counts.nan += nan;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::f8e4m3_to_f32;

    #[test]
    fn out_of_range_values_saturate_and_are_counted_where_pytorch_gives_nan() {
        let mut counts = Counts::default();
        let mut out = Vec::new();
        let values = [464.0, -465.0, 1e9, f32::INFINITY, f32::NAN, 0.5, -448.0];
        encode(&values, 1.0, &mut out, &mut counts);
        let decoded: Vec<f32> = out.iter().map(|&c| f8e4m3_to_f32(c)).collect();
        assert_eq!(decoded[..4], [448.0, -448.0, 448.0, 448.0]);
        assert!(decoded[4].is_nan());
        assert_eq!(decoded[5..], [0.5, -448.0]);
        // 464 rounds to 448 in PyTorch too; the three beyond it would be NaN there.
        assert_eq!((counts.clamped, counts.nan), (3, 1));
    }

    #[test]
    fn scales_map_the_largest_finite_magnitude_to_448_and_zero_rows_to_1() {
        assert_eq!(scale_for(max_abs(&[0.0, -0.0])), 1.0);
        assert_eq!(
            scale_for(max_abs(&[0.5, -8.96, f32::INFINITY])),
            8.96 / 448.0
        );
        let row = [0.02, -0.05, 0.001];
        let scale = scale_for(max_abs(&row));
        let (mut out, mut counts) = (Vec::new(), Counts::default());
        encode(&row, scale, &mut out, &mut counts);
        assert_eq!(f8e4m3_to_f32(out[1]), -448.0);
        assert_eq!(counts.clamped, 0);
    }

    #[test]
    fn sources_decode_from_each_float_type() {
        let mut out = Vec::new();
        decode(DType::BF16, &0x3fc0u16.to_le_bytes(), &mut out);
        assert_eq!(out, [1.5]);
        decode(DType::F16, &0x3e00u16.to_le_bytes(), &mut out);
        assert_eq!(out, [1.5]);
        decode(DType::F32, &(-2.25f32).to_le_bytes(), &mut out);
        assert_eq!(out, [-2.25]);
    }
}
