//! Checkpoints: the mapped file and its header, the inventory of what it holds, the model
//! configuration, the built-in layouts, and the synthesizer that writes test checkpoints.

pub mod components;
pub mod config;
pub mod convert;
pub mod header;
pub mod inventory;
pub mod layout;
pub mod scales;
mod sharded;
pub mod speech_config;
pub mod summary;
pub mod synth;

use crate::arch::config::{BuiltinModel, ModelConfig};
use crate::arch::speech::SpeechConfig;
use anyhow::{anyhow, bail, Context, Result};
use header::{Header, TensorInfo};
use inventory::{Inventory, LayoutKind};
use layout::Precision;
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

/// Checkpoint precision as the original's `--dtype` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointDtype {
    /// `vibevoice7b_float8_e4m3fn.safetensors`.
    Float8,
    /// `vibevoice7b_bf16.safetensors`.
    Bf16,
}

impl CheckpointDtype {
    /// The file name the original looks for inside `--model-path`.
    pub fn file_name(self) -> &'static str {
        match self {
            CheckpointDtype::Float8 => "vibevoice7b_float8_e4m3fn.safetensors",
            CheckpointDtype::Bf16 => "vibevoice7b_bf16.safetensors",
        }
    }

    /// The storage a built-in model of this dtype uses.
    pub fn precision(self) -> Precision {
        match self {
            CheckpointDtype::Float8 => Precision::Float8Plain,
            CheckpointDtype::Bf16 => Precision::BF16,
        }
    }
}

/// Turns `--model-path` into a checkpoint: a directory means the original's file name inside
/// it, else the Hugging Face layout's index (`model.safetensors.index.json`) or single
/// `model.safetensors` where that file is absent; anything else is the file (or index) itself.
pub fn resolve_path(model_path: &Path, dtype: CheckpointDtype) -> PathBuf {
    if !model_path.is_dir() {
        return model_path.to_path_buf();
    }
    let original = model_path.join(dtype.file_name());
    if original.symlink_metadata().is_ok() {
        return original;
    }
    [sharded::INDEX_NAME, "model.safetensors"]
        .into_iter()
        .map(|name| model_path.join(name))
        .find(|p| p.is_file())
        .unwrap_or(original)
}

/// One safetensors file, memory-mapped, with its validated header.
struct MappedFile {
    path: PathBuf,
    /// Where its data section starts.
    data_offset: u64,
    file_bytes: u64,
    /// Modification time when opened, to tell a file rewritten during a run.
    modified: Option<std::time::SystemTime>,
    mmap: Mmap,
}

impl MappedFile {
    /// Maps the file and validates its header.
    fn open(path: &Path) -> Result<(MappedFile, Header)> {
        let shown = path.display().to_string();
        // Opening a FIFO would block; a directory or a device is no checkpoint.
        if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
            bail!(
                "{shown} is not a regular file; pass --model-path with a checkpoint file or the \
                 directory that holds it"
            );
        }
        let file = File::open(path).map_err(|e| {
            anyhow!("cannot open checkpoint {shown}: {e}; pass --model-path with a checkpoint file or its directory, or write one with `vibeoffload synth`")
        })?;
        let meta = file
            .metadata()
            .with_context(|| format!("cannot read the size of {shown}"))?;
        let (file_bytes, modified) = (meta.len(), meta.modified().ok());
        if file_bytes < 8 {
            // Empty files cannot be mapped; the header parser words the error.
            header::parse(&[], file_bytes, &shown)?;
        }
        // SAFETY: the map is read-only. Like every tool that maps checkpoints (candle,
        // safetensors), we assume nobody truncates or rewrites the file while it is open.
        let mmap = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {shown}"))?;
        crate::output::record_input(path);
        let header = header::parse(&mmap, file_bytes, &shown)?;
        let file = MappedFile {
            path: path.to_path_buf(),
            data_offset: header.data_offset(),
            file_bytes,
            modified,
            mmap,
        };
        Ok((file, header))
    }

    /// The reference reader's verdict on the header, for what ours does not check (gaps
    /// between tensors, bytes after the last one); only the header is read, not the data.
    fn check_with_reference(&self) -> Result<()> {
        safetensors::SafeTensors::read_metadata(&self.mmap).map_err(|e| {
            anyhow!(
                "{} is not a valid safetensors file: {e}; the file is corrupt or was not \
                 written by a safetensors writer",
                self.path.display()
            )
        })?;
        Ok(())
    }

    fn check_unchanged(&self) -> Result<()> {
        let now = std::fs::metadata(&self.path).ok();
        let same =
            now.is_some_and(|m| m.len() == self.file_bytes && m.modified().ok() == self.modified);
        if !same {
            bail!(
                "{} was rewritten during the run; its results mix two files: rerun it",
                self.path.display()
            );
        }
        Ok(())
    }
}

/// A checkpoint, memory-mapped: one safetensors file, or the shards a Hugging Face index names
/// (`model.safetensors.index.json`). Reading it touches only the headers; tensor data is paged
/// in when [`Checkpoint::data`] is read.
pub struct Checkpoint {
    /// Where it was opened from: the file, or the index.
    pub path: PathBuf,
    /// Its header; for a sharded checkpoint every shard's tensors (offsets within their own
    /// shard) and the headers' summed length.
    pub header: Header,
    /// Size in bytes of the file, or of all shards.
    pub file_bytes: u64,
    files: Vec<MappedFile>,
    /// Which of `files` holds each tensor (empty for a single file).
    file_of: HashMap<String, usize>,
}

impl Checkpoint {
    /// Maps the file, or the shards an index names, and validates the headers.
    pub fn open(path: &Path) -> Result<Checkpoint> {
        if sharded::is_index(path) {
            return sharded::open(path);
        }
        let (file, header) = MappedFile::open(path)?;
        Ok(Checkpoint {
            path: path.to_path_buf(),
            header,
            file_bytes: file.file_bytes,
            files: vec![file],
            file_of: HashMap::new(),
        })
    }

    /// The shards of a sharded checkpoint, in order (empty for a single file).
    pub fn shards(&self) -> Vec<&Path> {
        match self.file_of.is_empty() {
            true => Vec::new(),
            false => self.files.iter().map(|f| f.path.as_path()).collect(),
        }
    }

    /// Fails if a file was rewritten since it was opened (its size or modification time
    /// changed): a run that read it meanwhile read a mix of two files. (A streamed run may not
    /// get this far: the kernel stops it with SIGBUS when the mapped file shrinks.)
    pub fn check_unchanged(&self) -> Result<()> {
        self.files.iter().try_for_each(MappedFile::check_unchanged)
    }

    /// The bytes of one tensor of this checkpoint.
    pub fn data(&self, tensor: &TensorInfo) -> &[u8] {
        let file = self.file_holding(&tensor.name);
        let start = (file.data_offset + tensor.data_start) as usize;
        let end = (file.data_offset + tensor.data_end) as usize;
        &file.mmap[start..end]
    }

    /// The file that holds tensor `name`: its shard, or the single file.
    pub fn file_of(&self, name: &str) -> &Path {
        &self.file_holding(name).path
    }

    fn file_holding(&self, name: &str) -> &MappedFile {
        &self.files[self.file_of.get(name).copied().unwrap_or(0)]
    }

    /// Reads `tensors`' bytes from disk into memory now (pages already cached cost little), so
    /// a load can tell time spent paging a cold file in from time spent uploading it.
    /// `progress` is told the bytes done so far and the total. Only advice: where the kernel
    /// cannot populate a mapping, pages are touched one by one instead.
    pub fn page_in<'t>(
        &self,
        tensors: impl Iterator<Item = &'t TensorInfo>,
        mut progress: impl FnMut(u64, u64),
    ) {
        const PIECE: u64 = 64 << 20;
        let tensors: Vec<&TensorInfo> = tensors.collect();
        let total: u64 = tensors.iter().map(|t| t.size_bytes()).sum();
        let mut done = 0;
        for t in tensors {
            let data = self.data(t);
            for piece in data.chunks(PIECE as usize) {
                populate(&self.file_holding(&t.name).mmap, piece);
                done += piece.len() as u64;
                progress(done, total);
            }
        }
    }

    /// Says that `tensor`'s bytes in `range` (relative to the tensor) have been read and are not
    /// needed again soon: their pages leave this process's resident memory, and are read from
    /// the file again if touched. A reader that streams a checkpoint larger than memory calls
    /// it after each piece. Only advice: it may do nothing.
    pub fn release(&self, tensor: &TensorInfo, range: std::ops::Range<u64>) {
        #[cfg(unix)]
        {
            let file = self.file_holding(&tensor.name);
            let start = file.data_offset + tensor.data_start + range.start;
            let len = range.end.saturating_sub(range.start);
            // SAFETY: the map is a read-only shared mapping of a file, so MADV_DONTNEED
            // discards nothing: dropped pages are read from the file again when touched, and
            // slices borrowed from the map keep reading the same bytes.
            let _ = unsafe {
                file.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start as usize,
                    len as usize,
                )
            };
        }
        #[cfg(not(unix))]
        let _ = (tensor, range);
    }
}

/// Faults in the pages of `piece` (a slice of `map`): one `MADV_POPULATE_READ` where the
/// kernel has it (Linux 5.14), else a read of one byte per page.
fn populate(map: &Mmap, piece: &[u8]) {
    #[cfg(target_os = "linux")]
    {
        let offset = piece.as_ptr() as usize - map.as_ptr() as usize;
        if map
            .advise_range(memmap2::Advice::PopulateRead, offset, piece.len())
            .is_ok()
        {
            return;
        }
    }
    let _ = map;
    let mut sum = 0u8;
    for page in piece.chunks(4096) {
        sum = sum.wrapping_add(page[0]);
    }
    std::hint::black_box(sum);
}

/// Where a model's configuration came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConfigSource {
    /// A built-in model.
    Builtin,
    /// `config.json` beside the checkpoint.
    ConfigJson,
    /// Tensor shapes (no `config.json`).
    TensorShapes,
}

/// Everything the planner needs to know about a model: its configuration and inventory, from a
/// file or a built-in layout.
pub struct ModelInfo {
    /// A short description: the file path, or `built-in 7b float8`.
    pub source: String,
    /// The decoder configuration.
    pub config: ModelConfig,
    /// The speech components' configuration (`None` for a bare Qwen2 checkpoint).
    pub speech: Option<SpeechConfig>,
    /// Where the configuration came from.
    pub config_source: ConfigSource,
    /// What the checkpoint holds.
    pub inventory: Inventory,
    /// The mapped file, for models read from disk.
    pub checkpoint: Option<Checkpoint>,
}

impl ModelInfo {
    /// A built-in model laid out exactly as `synth` would write it.
    pub fn builtin(model: BuiltinModel, dtype: CheckpointDtype) -> ModelInfo {
        let config = model.config();
        let speech = SpeechConfig::real(config.hidden_size);
        let specs = layout::vibevoice(&config, &speech, dtype.precision());
        let tensors = layout::tensor_infos(specs);
        let inventory = Inventory::new(tensors).expect("built-in layouts are consistent");
        let dtype_name = match dtype {
            CheckpointDtype::Float8 => "float8",
            CheckpointDtype::Bf16 => "bf16",
        };
        ModelInfo {
            source: format!("built-in {} {dtype_name}", model.name()),
            config,
            speech: Some(speech),
            config_source: ConfigSource::Builtin,
            inventory,
            checkpoint: None,
        }
    }

    /// Opens a checkpoint, takes its configuration from `config.json` beside it (else from its
    /// shapes), and checks the two agree.
    pub fn open(path: &Path) -> Result<ModelInfo> {
        let checkpoint = Checkpoint::open(path)?;
        let shown = path.display();
        let inventory = Inventory::new(checkpoint.header.tensors.clone())
            .with_context(|| format!("in {shown}"))?;
        let config_path = path.with_file_name("config.json");
        // Anything under that name is meant as the configuration: a directory or a broken
        // link there is an error, not a reason to guess from the shapes.
        let config_exists = config_path.symlink_metadata().is_ok();
        if config_exists && !config_path.is_file() {
            bail!(
                "{} is not a regular file (a directory or a broken link?); put the model's \
                 config.json there, or remove it to infer the configuration from the shapes",
                config_path.display()
            );
        }
        if config_exists {
            crate::output::record_input(&config_path);
        }
        let json = if config_exists {
            let text = std::fs::read_to_string(&config_path)
                .with_context(|| format!("cannot read {}", config_path.display()))?;
            Some(config::parse_config_json(&text, &config_path)?)
        } else {
            None
        };
        let (config, config_source) = match &json {
            Some(json) => (
                ModelConfig::from_config_value(json, &config_path)?,
                ConfigSource::ConfigJson,
            ),
            None => (
                inventory
                    .infer_config()
                    .with_context(|| format!("in {shown}"))?,
                ConfigSource::TensorShapes,
            ),
        };
        let hidden = config.hidden_size;
        let speech = match (inventory.layout, &json) {
            (LayoutKind::Qwen2, _) => None,
            (LayoutKind::Vibevoice, Some(json)) => {
                Some(SpeechConfig::from_config_value(json, hidden, &config_path)?)
            }
            (LayoutKind::Vibevoice, None) => {
                let inferred = inventory.infer_speech(hidden);
                inferred.validate(hidden).with_context(|| {
                    format!(
                        "in {shown}: cannot infer the speech components from the shapes; put \
                         the model's config.json beside the checkpoint"
                    )
                })?;
                Some(inferred)
            }
        };
        let checked = inventory
            .check_config(&config)
            .and_then(|()| match &speech {
                Some(speech) => inventory.check_speech(hidden, speech),
                None => Ok(()),
            });
        if let Err(e) = checked {
            match config_source {
                ConfigSource::ConfigJson => {
                    bail!("{shown} does not match {}: {e:#}", config_path.display())
                }
                _ => bail!("in {shown}: {e:#}"),
            }
        }
        // Last, so that what our checks name (a missing tensor, a wrong shape) is said first.
        checkpoint
            .files
            .iter()
            .try_for_each(MappedFile::check_with_reference)?;
        Ok(ModelInfo {
            source: shown.to_string(),
            config,
            speech,
            config_source,
            inventory,
            checkpoint: Some(checkpoint),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::synth::{self, SynthSpec};

    fn small_checkpoint(dir: &Path) -> PathBuf {
        let path = dir.join("m.safetensors");
        synth::write(&SynthSpec::embedded(), &path, true, |_, _| {}).unwrap();
        path
    }

    fn error(path: &Path) -> String {
        match ModelInfo::open(path) {
            Ok(_) => panic!("{} opened", path.display()),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn the_reference_reader_refuses_what_ours_lets_pass() {
        let dir = tempfile::tempdir().unwrap();
        let path = small_checkpoint(dir.path());
        ModelInfo::open(&path).unwrap();
        // Bytes after the last tensor: every tensor is intact, but no safetensors writer
        // leaves them, and safetensors readers (candle's among them) refuse the file.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.extend_from_slice(&[0; 8]);
        std::fs::write(&path, bytes).unwrap();
        let e = error(&path);
        assert!(e.contains("is not a valid safetensors file"), "{e}");
    }

    #[test]
    fn a_config_json_that_is_not_a_file_is_an_error_not_a_guess() {
        let dir = tempfile::tempdir().unwrap();
        let path = small_checkpoint(dir.path());
        let config = dir.path().join("config.json");
        std::fs::remove_file(&config).unwrap();
        std::fs::create_dir(&config).unwrap();
        assert!(error(&path).contains("is not a regular file"));
        std::fs::remove_dir(&config).unwrap();
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(dir.path().join("gone.json"), &config).unwrap();
            assert!(error(&path).contains("is not a regular file"));
            std::fs::remove_file(&config).unwrap();
        }
        // Nothing there: the configuration comes from the shapes.
        let info = ModelInfo::open(&path).unwrap();
        assert_eq!(info.config_source, ConfigSource::TensorShapes);
    }

    #[test]
    fn a_checkpoint_rewritten_after_opening_is_noticed() {
        let dir = tempfile::tempdir().unwrap();
        let path = small_checkpoint(dir.path());
        let checkpoint = Checkpoint::open(&path).unwrap();
        checkpoint.check_unchanged().unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.push(0);
        std::fs::write(&path, bytes).unwrap();
        let e = checkpoint.check_unchanged().unwrap_err();
        assert!(
            e.to_string().contains("was rewritten during the run"),
            "{e}"
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_fifo_or_a_directory_is_refused_before_it_is_opened() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.safetensors");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        if made.is_ok_and(|s| s.success()) {
            assert!(error(&fifo).contains("is not a regular file"));
        }
        assert!(error(dir.path()).contains("is not a regular file"));
    }
}
