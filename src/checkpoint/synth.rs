//! Writes checkpoints with seeded random weights in the exact VibeVoice layout, plus their
//! `config.json`. Data is generated and written in chunks, so a 9 GB file needs a few MB of
//! memory; both files are written under temporary names and renamed when complete.

use super::layout::{self, Precision, TensorSpec};
use crate::arch::config::ModelConfig;
use crate::arch::speech::{ConvStack, DiffusionHeadConfig, SpeechConfig, TokenizerConfig};
use crate::arch::Role;
use crate::dtype::{f32_to_f8e4m3, DType, F8E4M3_MAX};
use crate::output::Output;
use crate::rng::Rng;
use crate::UsageError;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What to synthesize.
#[derive(Clone, Debug)]
pub struct SynthSpec {
    /// Decoder configuration.
    pub config: ModelConfig,
    /// The speech components around the decoder.
    pub speech: SpeechConfig,
    /// How weights are stored.
    pub precision: Precision,
    /// Seed: the same seed gives the same bytes.
    pub seed: u64,
}

impl SynthSpec {
    /// The small model `run` synthesizes when given no checkpoint: 8 float8 layers, hidden
    /// 256, grouped-query attention, small speech components ([`SpeechConfig::small`]); small
    /// enough to run on a CPU at once.
    pub fn embedded() -> SynthSpec {
        let config = ModelConfig {
            hidden_size: 256,
            intermediate_size: 704,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 64,
            num_hidden_layers: 8,
            vocab_size: 1024,
            rope_theta: 1e6,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: false,
            max_position_embeddings: 32768,
        };
        SynthSpec {
            speech: SpeechConfig::small(config.hidden_size),
            config,
            precision: Precision::Float8Plain,
            seed: 0,
        }
    }
}

impl SynthSpec {
    /// The small speech model `generate` synthesizes when given no checkpoint: the embedded
    /// language model with the Qwen2.5 vocabulary (so real scripts tokenize into it) and speech
    /// components with the real hop of 3,200 samples and latent sizes, at tiny widths.
    pub fn embedded_speech() -> SynthSpec {
        let mut spec = SynthSpec::embedded();
        spec.config.vocab_size = 151_936;
        let stack = |ratios: Vec<usize>| ConvStack {
            n_filters: 2,
            depths: vec![1; ratios.len() + 1],
            ratios,
        };
        let real = SpeechConfig::real(spec.config.hidden_size);
        let acoustic = TokenizerConfig {
            encoder: stack(real.acoustic.encoder.ratios.clone()),
            decoder: Some(stack(real.acoustic.decoder.clone().expect("real").ratios)),
            ..real.acoustic
        };
        spec.speech = SpeechConfig {
            semantic: TokenizerConfig {
                encoder: stack(real.semantic.encoder.ratios.clone()),
                ..real.semantic
            },
            acoustic,
            head: DiffusionHeadConfig {
                head_layers: 2,
                ..real.head
            },
        };
        spec
    }
}

/// What `synth` wrote.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct SynthReport {
    /// The tool that wrote it: version and commit.
    #[serde(default)]
    pub tool: String,
    /// The checkpoint.
    pub path: PathBuf,
    /// Its `config.json`.
    pub config_path: PathBuf,
    /// Size of the checkpoint file.
    pub file_bytes: u64,
    /// Tensors written.
    pub tensors: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Wall time.
    pub seconds: f64,
}

/// Standard deviation of synthetic weights: about what trained Qwen2 matrices have. The
/// diffusion head's adaLN and final projections get it too (training starts them at zero,
/// which would make the head's output zero whatever its input).
const WEIGHT_STD: f32 = 0.02;
/// Mean and spread of the tokenizer blocks' layer scales (`gamma`): far from the 1e-6 they
/// start at in training, so that every block changes its input.
const LAYER_SCALE_MEAN: f32 = 0.1;
const LAYER_SCALE_STD: f32 = 0.05;
/// Standard deviation of float8 codes in scaled checkpoints: uses the format's range.
const SCALED_CODE_STD: f32 = F8E4M3_MAX / 4.0;
const CHUNK_BYTES: usize = 4 << 20;

/// Writes `spec` to `out` and `config.json` beside it. `progress` is called with the bytes
/// written so far. Existing files are replaced only when `force` is set.
pub fn write(
    spec: &SynthSpec,
    out: &Path,
    force: bool,
    mut progress: impl FnMut(u64, u64),
) -> Result<SynthReport> {
    let started = Instant::now();
    spec.config.validate()?;
    spec.speech.validate(spec.config.hidden_size)?;
    let config_path = check_checkpoint_path(out)?;
    for existing in [out, config_path.as_path()] {
        if existing.symlink_metadata().is_ok() && !force {
            bail!(UsageError::new(format!(
                "refusing to overwrite {}; pass --force to replace it",
                existing.display()
            )));
        }
    }
    let config_json = serde_json::to_string_pretty(&config_json(spec))?;
    if force {
        refuse_shared_config(out, &config_path, &config_json)?;
    }

    let specs = layout::vibevoice(&spec.config, &spec.speech, spec.precision);
    let metadata = BTreeMap::from([
        ("format".to_string(), "pt".to_string()),
        ("generator".to_string(), "vibeoffload synth".to_string()),
        ("seed".to_string(), spec.seed.to_string()),
    ]);
    let prefix = layout::header_prefix(&specs, &metadata);
    let total = prefix.len() as u64 + specs.iter().map(TensorSpec::size_bytes).sum::<u64>();

    let mut file = Output::begin(out)?;
    let mut config_file = Output::begin(&config_path)?;
    let write_err = || format!("cannot write {}", out.display());
    {
        let mut writer = BufWriter::with_capacity(CHUNK_BYTES, file.file());
        writer.write_all(&prefix).with_context(write_err)?;
        let mut written = prefix.len() as u64;
        let tables = ValueTables::new(matches!(spec.precision, Precision::Float8Scaled(..)));
        let mut chunk = Vec::with_capacity(CHUNK_BYTES);
        for s in &specs {
            let mut rng = Rng::for_name(spec.seed, &s.name);
            let mut remaining = s.size_bytes();
            while remaining > 0 {
                let n = remaining.min(CHUNK_BYTES as u64) as usize;
                chunk.clear();
                tables.fill(s, &mut rng, n, &mut chunk);
                writer.write_all(&chunk).with_context(write_err)?;
                remaining -= n as u64;
                written += n as u64;
                progress(written, total);
            }
        }
        writer.flush().with_context(write_err)?;
    }
    file.file().sync_all().with_context(write_err)?;
    config_file
        .file()
        .write_all(config_json.as_bytes())
        .with_context(|| format!("cannot write {}", config_path.display()))?;

    commit_with_config(file, Some(config_file), force)?;
    Ok(SynthReport {
        tool: crate::TOOL.into(),
        path: out.to_path_buf(),
        config_path,
        file_bytes: total,
        tensors: specs.len(),
        layers: spec.config.num_hidden_layers,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Renames a finished checkpoint and its `config.json` (if one is written) into place.
/// Without `force`, nothing is replaced and the two appear together or not at all: the
/// `config.json` goes first, so of two writers racing into one directory (for one name or
/// two) the second fails there having placed nothing, and a checkpoint is never left beside
/// another writer's configuration.
pub(super) fn commit_with_config(file: Output, config: Option<Output>, force: bool) -> Result<()> {
    if force {
        file.commit()?;
        config.map(Output::commit).transpose()?;
        return Ok(());
    }
    let Some(config) = config else {
        return file.commit_new();
    };
    let config_path = config.path().to_path_buf();
    config.commit_new()?;
    file.commit_new().inspect_err(|_| {
        // Ours, placed a moment ago: it describes no checkpoint now.
        let _ = std::fs::remove_file(&config_path);
    })
}

/// Checks that a checkpoint may be written to `out` (its directory exists, and it is not named
/// `config.json`) and returns the path of the `config.json` beside it.
pub(super) fn check_checkpoint_path(out: &Path) -> Result<PathBuf> {
    let dir = crate::output::parent_dir(out);
    if !dir.is_dir() {
        bail!(UsageError::new(format!(
            "cannot write {}: directory {} does not exist",
            out.display(),
            dir.display()
        )));
    }
    if out.file_name().is_some_and(|n| n == "config.json") {
        bail!(UsageError::new(format!(
            "cannot write the checkpoint to {}: its config.json goes beside it under that name; \
             name the checkpoint *.safetensors",
            out.display()
        )));
    }
    Ok(out.with_file_name("config.json"))
}

/// `config.json` describes every checkpoint in its directory: replacing it with a different one
/// (`--force`) would silently break another checkpoint there.
pub(super) fn refuse_shared_config(out: &Path, config_path: &Path, new: &str) -> Result<()> {
    let Ok(old) = std::fs::read_to_string(config_path) else {
        return Ok(());
    };
    let parse = |t: &str| serde_json::from_str::<serde_json::Value>(t).ok();
    if parse(&old) == parse(new) {
        return Ok(());
    }
    let dir = crate::output::parent_dir(config_path);
    let others: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "safetensors") && p.file_name() != out.file_name()
        })
        .map(|p| p.display().to_string())
        .collect();
    if !others.is_empty() {
        bail!(UsageError::new(format!(
            "refusing to replace {}: it also describes {}, which a different configuration \
             would break; write this model to another directory",
            config_path.display(),
            others.join(", ")
        )));
    }
    Ok(())
}

/// The original's `config.json` for a synthesized checkpoint: the language model under
/// `decoder_config` and the speech components' three sub-configurations, so the original code
/// builds exactly the modules the file holds.
pub(super) fn config_json(spec: &SynthSpec) -> serde_json::Value {
    let c = &spec.config;
    let torch_dtype = match spec.precision {
        Precision::BF16 => "bfloat16",
        _ => "float8_e4m3fn",
    };
    let mut root = serde_json::json!({
        "model_type": "vibevoice",
        "architectures": ["VibeVoiceForConditionalGeneration"],
        "torch_dtype": torch_dtype,
        "acoustic_vae_dim": spec.speech.acoustic.vae_dim,
        "semantic_vae_dim": spec.speech.semantic.vae_dim,
        "tie_word_embeddings": c.tie_word_embeddings,
        "decoder_config": {
            "model_type": "qwen2",
            "hidden_size": c.hidden_size,
            "intermediate_size": c.intermediate_size,
            "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads,
            "head_dim": c.head_dim,
            "num_hidden_layers": c.num_hidden_layers,
            "vocab_size": c.vocab_size,
            "rope_theta": c.rope_theta,
            "rms_norm_eps": c.rms_norm_eps,
            "tie_word_embeddings": c.tie_word_embeddings,
            "max_position_embeddings": c.max_position_embeddings,
        },
    });
    if let Some(object) = root.as_object_mut() {
        object.extend(spec.speech.to_config_json());
    }
    root
}

/// 65,536 pre-encoded samples per value distribution: each output element is one table entry
/// picked by 16 random bits, which is fast enough to write gigabytes in seconds.
struct ValueTables {
    /// Float8 linear weights use the whole code range, with scales that bring them back.
    scaled: bool,
    weight_f8: Vec<u8>,
    norm_f8: Vec<u8>,
    layer_scale_f8: Vec<u8>,
    scaled_f8: Vec<u8>,
    weight_bf16: Vec<u16>,
    norm_bf16: Vec<u16>,
    layer_scale_bf16: Vec<u16>,
}

impl ValueTables {
    fn new(scaled: bool) -> ValueTables {
        let samples = |mean: f32, std: f32| -> Vec<f32> {
            let mut rng = Rng::new(0x5eed);
            (0..1 << 16)
                .map(|_| mean + std * rng.next_normal())
                .collect()
        };
        let weight = samples(0.0, WEIGHT_STD);
        let norm = samples(1.0, WEIGHT_STD);
        let layer_scale = samples(LAYER_SCALE_MEAN, LAYER_SCALE_STD);
        ValueTables {
            scaled,
            weight_f8: weight.iter().map(|&x| f32_to_f8e4m3(x)).collect(),
            norm_f8: norm.iter().map(|&x| f32_to_f8e4m3(x)).collect(),
            layer_scale_f8: layer_scale.iter().map(|&x| f32_to_f8e4m3(x)).collect(),
            scaled_f8: samples(0.0, SCALED_CODE_STD)
                .iter()
                .map(|&x| f32_to_f8e4m3(x))
                .collect(),
            weight_bf16: weight
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_bits())
                .collect(),
            norm_bf16: norm
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_bits())
                .collect(),
            layer_scale_bf16: layer_scale
                .iter()
                .map(|&x| half::bf16::from_f32(x).to_bits())
                .collect(),
        }
    }

    /// Appends `n` bytes of `spec`'s data to `out`.
    fn fill(&self, spec: &TensorSpec, rng: &mut Rng, n: usize, out: &mut Vec<u8>) {
        match (spec.dtype, spec.role) {
            (DType::F32, Role::Scale) => {
                // Scales that map the code distribution back to weights of WEIGHT_STD, with
                // +-10% variation between channels.
                for _ in 0..n / 4 {
                    let jitter = 0.9 + 0.2 * rng.next_unit();
                    out.extend_from_slice(&(WEIGHT_STD / SCALED_CODE_STD * jitter).to_le_bytes());
                }
            }
            // The speech factors hold their values (one element).
            (DType::F8E4M3, Role::Factor(f)) => out.push(f32_to_f8e4m3(f.value())),
            (DType::BF16, Role::Factor(f)) => {
                out.extend_from_slice(&half::bf16::from_f32(f.value()).to_le_bytes())
            }
            (DType::F8E4M3, role) => {
                let table = match role {
                    Role::Norm => &self.norm_f8,
                    Role::LayerScale => &self.layer_scale_f8,
                    Role::Linear if self.scaled => &self.scaled_f8,
                    _ => &self.weight_f8,
                };
                fill_from(table, rng, n, out, |v, out| out.push(v));
            }
            (DType::BF16, role) => {
                let table = match role {
                    Role::Norm => &self.norm_bf16,
                    Role::LayerScale => &self.layer_scale_bf16,
                    _ => &self.weight_bf16,
                };
                fill_from(table, rng, n / 2, out, |v, out| {
                    out.extend_from_slice(&v.to_le_bytes())
                });
            }
            (dtype, role) => unreachable!("the layout stores no {role:?} tensor as {dtype}"),
        }
    }
}

fn fill_from<T: Copy>(
    table: &[T],
    rng: &mut Rng,
    n: usize,
    out: &mut Vec<u8>,
    push: impl Fn(T, &mut Vec<u8>),
) {
    let mut left = n;
    while left > 0 {
        let bits = rng.next_u64();
        for k in 0..4.min(left) {
            push(table[((bits >> (16 * k)) & 0xffff) as usize], out);
        }
        left -= 4.min(left);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn output(path: &Path, text: &str) -> Output {
        let mut out = Output::begin(path).unwrap();
        out.file().write_all(text.as_bytes()).unwrap();
        out
    }

    /// Two writers into one directory: the second finds the first's config.json in place
    /// when it commits, and places nothing (no checkpoint without its own configuration).
    #[test]
    fn a_writer_that_loses_the_race_places_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, config) = (
            dir.path().join("a.safetensors"),
            dir.path().join("b.safetensors"),
            dir.path().join("config.json"),
        );
        let first = (output(&a, "A"), output(&config, "config A"));
        let second = (output(&b, "B"), output(&config, "config B"));
        commit_with_config(first.0, Some(first.1), false).unwrap();
        assert!(commit_with_config(second.0, Some(second.1), false).is_err());
        assert!(a.exists() && !b.exists());
        assert_eq!(std::fs::read_to_string(&config).unwrap(), "config A");
        // With nothing in the way, both appear.
        let c = dir.path().join("c").join("c.safetensors");
        std::fs::create_dir(c.parent().unwrap()).unwrap();
        let config_c = c.with_file_name("config.json");
        commit_with_config(output(&c, "C"), Some(output(&config_c, "config C")), false).unwrap();
        assert!(c.exists() && config_c.exists());
    }
}
