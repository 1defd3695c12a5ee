//! Command-line arguments as typed (the "low" layer): clap structs that only check shapes of
//! values. `main.rs` turns them into models, options and budgets.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use vibeoffload::UsageError;

/// Run VibeVoice-7B's float8 language model on small GPUs by streaming decoder layers, and know
/// the VRAM each choice needs before trying.
///
/// The original test script's flags work too: `--print-table`, `--auto`, `--config PRESET`,
/// `--num-gpu-layers N`, `--no-offload` (precedence in that order).
///
/// Exit status: 0 success, 1 failure (missing or bad checkpoint, no GPU reading where one is
/// needed, nothing fits), 2 bad command line (unknown flag or preset, value out of range).
#[derive(Parser, Debug)]
#[command(name = "vibeoffload", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub legacy: LegacyArgs,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// VRAM needed for each number of GPU layers, term by term, and what common GPUs can run.
    Table(TableArgs),
    /// Pick the largest layer count whose estimate fits this GPU (or --vram).
    Auto(AutoArgs),
    /// Show what a checkpoint holds: layers, parts, dtypes, float8 scales, configuration.
    Inspect(InspectArgs),
    /// Write a checkpoint with seeded random weights in the exact VibeVoice layout.
    Synth(SynthArgs),
    /// Load the language model with N layers resident, run timed generation, print transfer
    /// statistics. Without --model-path: a small model synthesized on the fly.
    Run(RunArgs),
    /// Measure each layer count: prefill, decode, VRAM against the estimate, copy bandwidth.
    Bench(BenchArgs),
}

/// The original script's flag form.
#[derive(Args, Debug)]
pub struct LegacyArgs {
    /// Print the VRAM table and exit (same as `table`).
    #[arg(long)]
    pub print_table: bool,
    #[command(flatten)]
    pub choice: ChoiceArgs,
    /// Load the model and time forward passes over 128 random tokens (same as `run --test-speed`).
    #[arg(long)]
    pub test_speed: bool,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub plan: PlanArgs,
    #[command(flatten)]
    pub gpu: GpuArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub timing: TimingArgs,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub choice: ChoiceArgs,
    /// Time forward passes over 128 random tokens (the original's test) instead of decoding.
    #[arg(long)]
    pub test_speed: bool,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub plan: PlanArgs,
    #[command(flatten)]
    pub gpu: GpuArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub timing: TimingArgs,
    /// Run one forward pass on these token ids (comma-separated) instead of timing.
    #[arg(long, value_delimiter = ',', value_name = "ID,ID,...")]
    pub input_ids: Option<Vec<u32>>,
    /// With --input-ids: write the final hidden states and the last token's logits as safetensors.
    #[arg(long, value_name = "PATH")]
    pub dump: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Layer counts to measure, in order (default: all layers, then every 4 fewer, down to 0).
    #[arg(long, value_delimiter = ',', value_name = "N,N,...")]
    pub layers: Option<Vec<usize>>,
    /// Draw ms/token and VRAM (estimate and measurement) against GPU layers into this SVG.
    #[arg(long, value_name = "PATH")]
    pub plot: Option<PathBuf>,
    /// An earlier `bench --json`: exit 1 when a configuration got slower by more than --threshold.
    #[arg(long, value_name = "FILE")]
    pub baseline: Option<PathBuf>,
    /// Allowed slowdown against --baseline (0.10 = 10%).
    #[arg(long, default_value_t = 0.10)]
    pub threshold: f64,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub plan: PlanArgs,
    #[command(flatten)]
    pub gpu: GpuArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub timing: TimingArgs,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// How the engine runs.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Where to run: cuda when built with CUDA and a GPU is present, else cpu.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Copies issued ahead of use (at most slots - 1).
    #[arg(long, value_name = "N")]
    pub prefetch_depth: Option<usize>,
    /// Copy each streamed layer only when it is needed.
    #[arg(long)]
    pub no_prefetch: bool,
    /// Keep streamed layers in ordinary (pageable) host memory.
    #[arg(long)]
    pub no_pin: bool,
}

/// Prompt and generation lengths for timing.
#[derive(Args, Debug, Clone)]
pub struct TimingArgs {
    /// Prompt tokens in decode mode (and tokens per pass in test-speed mode).
    #[arg(long, default_value_t = 128, value_name = "TOKENS")]
    pub prompt_len: usize,
    /// Tokens to generate in decode mode.
    #[arg(long, default_value_t = 32, value_name = "TOKENS")]
    pub gen_tokens: usize,
    /// Timed passes in test-speed mode.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Seed of the random prompt.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

/// How many decoder layers stay on the GPU (the original's flags; precedence: --no-offload,
/// then --config, then --num-gpu-layers, else auto).
#[derive(Args, Debug, Clone)]
pub struct ChoiceArgs {
    /// Choose the layer count from free VRAM (the default when no other choice is given).
    #[arg(long)]
    pub auto: bool,
    /// Use a preset: high_end, mid_range, consumer, budget, minimal (or an alias).
    #[arg(long, visible_alias = "preset", value_name = "PRESET")]
    pub config: Option<String>,
    /// Keep N decoder layers on the GPU.
    #[arg(long, value_name = "N")]
    pub num_gpu_layers: Option<usize>,
    /// Keep every layer on the GPU.
    #[arg(long)]
    pub no_offload: bool,
}

/// Which model to plan for.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Checkpoint file, or a directory holding vibevoice7b_float8_e4m3fn.safetensors (or
    /// vibevoice7b_bf16.safetensors with --dtype bf16). Without it: the built-in layout.
    #[arg(long, value_name = "PATH")]
    pub model_path: Option<PathBuf>,
    /// Checkpoint precision (file name in --model-path, and the built-in layout).
    #[arg(long, value_enum, default_value_t = DtypeArg::Float8)]
    pub dtype: DtypeArg,
    /// Built-in model used when no --model-path is given.
    #[arg(long, value_enum, default_value_t = BuiltinArg::Large7b, value_name = "SIZE")]
    pub builtin: BuiltinArg,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DtypeArg {
    Float8,
    Bf16,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BuiltinArg {
    #[value(name = "7b")]
    Large7b,
    #[value(name = "1.5b")]
    Small1_5b,
}

/// What the plan must hold besides weights.
#[derive(Args, Debug, Clone)]
pub struct PlanArgs {
    /// Longest sequence (prompt + generated tokens) the KV cache holds [default: 4096; bench:
    /// what its prompt and generation need].
    #[arg(long, value_name = "TOKENS")]
    pub max_seq_len: Option<u64>,
    /// Sequences decoded together.
    #[arg(long, default_value_t = 1)]
    pub batch: u64,
    /// Which layers stay on the GPU.
    #[arg(long, value_enum, default_value_t = PlacementArg::Last)]
    pub placement: PlacementArg,
    /// GPU slots that offloaded layers stream through.
    #[arg(long, default_value_t = 2)]
    pub slots: usize,
    /// Keep the diffusion (prediction) head in host memory.
    #[arg(long)]
    pub offload_prediction_head: bool,
    /// Plan for the language model alone (what `run` loads), not full text-to-speech.
    #[arg(long)]
    pub lm_only: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlacementArg {
    Last,
    First,
    Spread,
}

/// Where the VRAM budget comes from.
#[derive(Args, Debug, Clone)]
pub struct GpuArgs {
    /// NVML index of the GPU to read.
    #[arg(long, default_value_t = 0, value_name = "INDEX")]
    pub gpu: u32,
    /// Plan as if this much VRAM were free (e.g. 8GiB, 12GB, 7680MiB), on any machine.
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub vram: Option<String>,
    /// Fraction of free VRAM a plan may use.
    #[arg(long, default_value_t = 0.8, value_name = "FRACTION")]
    pub target_utilization: f64,
}

#[derive(Args, Debug)]
pub struct TableArgs {
    /// Layer counts to show, comma-separated (default 28, 24, ..., 0 for 28 layers).
    #[arg(long, value_delimiter = ',', value_name = "N,N,...")]
    pub layers: Option<Vec<usize>>,
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub plan: PlanArgs,
    #[command(flatten)]
    pub gpu: GpuArgs,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct AutoArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub plan: PlanArgs,
    #[command(flatten)]
    pub gpu: GpuArgs,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Checkpoint file or directory (same as --model-path); without either, the built-in layout.
    pub path: Option<PathBuf>,
    #[command(flatten)]
    pub model: ModelArgs,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Where to write the checkpoint; config.json goes beside it.
    pub out: PathBuf,
    /// Model size; `custom` takes the dimension flags below (defaults: a tiny test model).
    #[arg(long, value_enum, default_value_t = SizeArg::Large7b)]
    pub size: SizeArg,
    /// Storage precision.
    #[arg(long, value_enum, default_value_t = DtypeArg::Float8)]
    pub dtype: DtypeArg,
    /// Float8 scales: none (every tensor F8_E4M3, as the fork writes), one per matrix, or one
    /// per output channel (linear weights F8_E4M3 + F32 scales, the rest BF16).
    #[arg(long, value_enum, default_value_t = ScaleArg::None)]
    pub scale: ScaleArg,
    /// Name of scale tensors.
    #[arg(long, value_enum, default_value_t = ConventionArg::ScaleWeight)]
    pub scale_convention: ConventionArg,
    /// Random seed: the same seed writes the same bytes.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Replace existing files.
    #[arg(long)]
    pub force: bool,
    /// Decoder layers (custom).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Hidden size (custom).
    #[arg(long)]
    pub hidden: Option<usize>,
    /// MLP width (custom).
    #[arg(long)]
    pub intermediate: Option<usize>,
    /// Attention heads (custom).
    #[arg(long)]
    pub heads: Option<usize>,
    /// Key/value heads (custom).
    #[arg(long)]
    pub kv_heads: Option<usize>,
    /// Head width (custom; default hidden / heads).
    #[arg(long)]
    pub head_dim: Option<usize>,
    /// Vocabulary (custom).
    #[arg(long)]
    pub vocab: Option<usize>,
    /// Tie the LM head to the embedding (custom).
    #[arg(long)]
    pub tie_embeddings: bool,
    /// Print JSON instead of a summary line.
    #[arg(long)]
    pub json: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeArg {
    #[value(name = "7b")]
    Large7b,
    #[value(name = "1.5b")]
    Small1_5b,
    Custom,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleArg {
    None,
    Scalar,
    Channel,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConventionArg {
    ScaleWeight,
    WeightScale,
}

/// Parses a memory size such as `8GiB`, `12GB`, `7680MiB` or `1.5 TiB`. Binary (KiB, MiB, GiB,
/// TiB) and decimal (KB, MB, GB, TB) units; `B` for bytes. A unit is required, since a bare `8`
/// is ambiguous.
pub fn parse_size(text: &str) -> Result<u64, UsageError> {
    let s = text.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, unit) = (&s[..split], s[split..].trim());
    let bad = |why: &str| {
        UsageError::new(format!(
            "--vram {text}: {why}; write a size such as 8GiB, 12GB or 7680MiB"
        ))
    };
    let value: f64 = number.parse().map_err(|_| bad("not a number"))?;
    let multiplier: f64 = match unit.to_ascii_lowercase().as_str() {
        "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "" => return Err(bad("no unit")),
        _ => return Err(bad(&format!("unknown unit '{unit}'"))),
    };
    let bytes = value * multiplier;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(bad("the size must be positive"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8GiB").unwrap(), 8 << 30);
        assert_eq!(parse_size("12GB").unwrap(), 12_000_000_000);
        assert_eq!(parse_size("7680 MiB").unwrap(), 7680 << 20);
        assert_eq!(parse_size("1.5gib").unwrap(), 3 << 29);
        for bad in ["8", "GiB", "-8GiB", "0GiB", "8 parsecs", "1.2.3GB", ""] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
