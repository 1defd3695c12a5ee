//! Command-line arguments as typed (the "low" layer): clap structs that only check the shapes
//! of values. [`super::settings`] turns them into the library's options.

mod bench_speech;
mod generate;
mod write;

pub use bench_speech::SpeechBenchArgs;
pub use generate::{GenerateArgs, VoiceLatentsArg};
pub use write::{ConventionArg, ConvertArgs, ConvertPrecisionArg, ScaleArg, SizeArg, SynthArgs};

use clap::builder::PossibleValue;
use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use vibeoffload::gpu::GpuSelector;
use vibeoffload::measure::Workload;
use vibeoffload::plan::memory::DEFAULT_STREAM_SLOTS;

/// Help is wrapped to the terminal, and to this many columns at most (also off a terminal).
pub const HELP_WIDTH: usize = 100;

// The headings options are grouped under in `--help`. Each flag names its heading: one left
// out would take the heading of whatever group came before it.
const MODE: &str = "Mode";
const CHOICE: &str = "Layer choice";
const MODEL: &str = "Model";
const PLANNING: &str = "Planning";
const BUDGET: &str = "GPU and VRAM budget";
const ENGINE: &str = "Engine";
const TIMING: &str = "Timing";
const SPEECH: &str = "Speech";
const SCRIPT: &str = "Script and voices";
const CUSTOM: &str = "Custom size";
const GATE: &str = "Baseline";
const OUTPUT: &str = "Output";

/// The examples that end each command's help.
mod examples {
    pub const TOP: &str = "\
Examples:
  vibeoffload table --vram 12GiB   # the VRAM each layer count needs, against 12 GiB
  vibeoffload auto --model-path models/converted
  vibeoffload run --num-gpu-layers 8 --model-path models/converted
  vibeoffload --config consumer --test-speed   # the original script's flags
  vibeoffload generate --text \"Speaker 1: Hello.\" --out hello.wav
  vibeoffload COMMAND --help   # a command's options and examples";
    pub const TABLE: &str = "\
Examples:
  vibeoffload table
  vibeoffload table --vram 8GiB --layers 28,20,12,0
  vibeoffload table --model-path models/converted --lm-only --json";
    pub const AUTO: &str = "\
Examples:
  vibeoffload auto   # reads the free memory of GPU 0
  vibeoffload auto --vram 12GiB --target-utilization 0.9
  vibeoffload auto --script script.txt --voice alice.wav --voice bob.wav";
    pub const INSPECT: &str = "\
Examples:
  vibeoffload inspect models/converted
  vibeoffload inspect --builtin 1.5b --json";
    pub const SYNTH: &str = "\
Examples:
  vibeoffload synth models/converted/vibevoice7b_float8_e4m3fn.safetensors
  vibeoffload synth tiny.safetensors --size custom --layers 4 --hidden 128";
    pub const CONVERT: &str = "\
Examples:
  vibeoffload convert --model-path VibeVoice-7B --out f8/vibevoice7b_float8_e4m3fn.safetensors
  vibeoffload convert --model-path VibeVoice-7B --out scaled.safetensors --precision float8-scaled";
    pub const RUN: &str = "\
Examples:
  vibeoffload run   # the embedded test model, decoding
  vibeoffload run --model-path models/converted --num-gpu-layers 12
  vibeoffload run --model-path models/converted --test-speed --json-out run.json
  vibeoffload run --model-path models/converted --input-ids 151,9707,11 --dump out.safetensors";
    pub const BENCH: &str = "\
Examples:
  vibeoffload bench --model-path models/converted --layers 28,12,0 --json-out bench.json
  vibeoffload bench --model-path models/converted --baseline bench.json   # exit 3 if slower
  vibeoffload bench compare old.json new.json
  vibeoffload bench --speech --model-path models/converted --layers 28,8 --plot speech.svg";
    pub const BENCH_COMPARE: &str = "\
Examples:
  vibeoffload bench compare old.json new.json
  vibeoffload bench compare old.json new.json --threshold 0.05 --json";
    pub const GENERATE: &str = "\
Examples:
  vibeoffload generate --text \"Speaker 1: Hello.\"   # random weights: noise, the pipeline shown
  vibeoffload generate --model-path models/converted --script talk.txt --voice alice.wav
  vibeoffload generate --model-path models/converted --script talk.txt --benchmark";
}

/// Run VibeVoice-7B's float8 language model on small GPUs by streaming decoder layers, and know
/// the VRAM each choice needs before trying.
///
/// Without a command, the original test script's flags work: `--print-table` (as `table`), then
/// `--test-speed` (as `run --test-speed`), then the layer choice `--no-offload`, `--config
/// PRESET`, `--num-gpu-layers N`, else `--auto` (as `auto`); the first of these given wins.
///
/// Exit status: 0 success, 1 failure (missing or bad checkpoint, no GPU reading where one is
/// needed, nothing fits), 2 bad command line (unknown flag or preset, value out of range).
#[derive(Parser, Debug)]
#[command(
    name = "vibeoffload",
    version = crate::cli::VERSION,
    args_conflicts_with_subcommands = true,
    // Help fits a terminal, and wraps at this width where there is none (a pipe, a file).
    max_term_width = HELP_WIDTH,
    after_help = examples::TOP
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub legacy: LegacyArgs,
    /// Print only the report and errors: no progress, no notes.
    #[arg(short, long, global = true, conflicts_with = "verbose", help_heading = OUTPUT)]
    pub quiet: bool,
    /// Also print the resolved settings and how long each stage took (on stderr).
    #[arg(short, long, global = true, help_heading = OUTPUT)]
    pub verbose: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// VRAM needed for each number of GPU layers, term by term, and what common GPUs can run.
    #[command(after_help = examples::TABLE)]
    Table(TableArgs),
    /// Pick the largest layer count whose estimate fits this GPU (or --vram).
    #[command(after_help = examples::AUTO)]
    Auto(AutoArgs),
    /// Show what a checkpoint holds: layers, parts, dtypes, float8 scales, configuration.
    #[command(after_help = examples::INSPECT)]
    Inspect(InspectArgs),
    /// Write a checkpoint with seeded random weights in the exact VibeVoice layout.
    #[command(after_help = examples::SYNTH)]
    Synth(SynthArgs),
    /// Convert a Hugging Face bf16 checkpoint (one file or shards) to one float8 file.
    #[command(after_help = examples::CONVERT)]
    Convert(ConvertArgs),
    /// Load the language model with N layers resident, run timed generation, print transfer
    /// statistics. Without --model-path: a small model synthesized on the fly.
    #[command(after_help = examples::RUN)]
    Run(RunArgs),
    /// Measure each layer count: prefill, decode, VRAM against the estimate, copy bandwidth
    /// (--speech: the whole text-to-speech loop, RTF and time per frame by part).
    #[command(after_help = examples::BENCH)]
    Bench(BenchArgs),
    /// Speak a script in the given voices into a WAV file. Without --model-path: a small model
    /// with random weights synthesized on the fly (the audio is noise; it shows the pipeline).
    #[command(after_help = examples::GENERATE)]
    Generate(GenerateArgs),
    /// Print a shell completion script: `vibeoffload completions bash > /etc/bash_completion.d/vibeoffload`.
    Completions(CompletionsArgs),
    /// Print the man page (roff): `vibeoffload man > vibeoffload.1`.
    Man,
}

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete in.
    pub shell: clap_complete::Shell,
}

/// The original script's flag form. The engine and timing flags time the model, so they need
/// --test-speed; --builtin and --offload-prediction-head only plan, so they refuse it.
/// --gen-tokens is refused (test-speed generates nothing), so it is left out of the help.
#[derive(Args, Debug)]
#[command(group(
    ArgGroup::new("timing_flags")
        .args(["device", "prefetch_depth", "no_prefetch", "no_pin", "prompt_len", "runs", "seed"])
        .multiple(true)
        .requires("test_speed")
))]
#[command(mut_arg("gen_tokens", |a| a.hide(true)))]
#[command(group(
    ArgGroup::new("planning_flags")
        .args(["builtin", "offload_prediction_head"])
        .multiple(true)
        .conflicts_with("test_speed")
))]
pub struct LegacyArgs {
    /// Print the VRAM table and exit (same as `table`).
    #[arg(long, help_heading = MODE)]
    pub print_table: bool,
    #[command(flatten, next_help_heading = CHOICE)]
    pub choice: ChoiceArgs,
    /// Load the model and time forward passes over 128 random tokens (same as `run --test-speed`).
    #[arg(long, help_heading = MODE)]
    pub test_speed: bool,
    #[command(flatten)]
    pub planning: PlanningArgs,
    #[command(flatten, next_help_heading = ENGINE)]
    pub engine: EngineArgs,
    #[command(flatten, next_help_heading = TIMING)]
    pub timing: TimingArgs,
    #[command(flatten, next_help_heading = OUTPUT)]
    pub output: JsonArg,
}

/// A fixed layer choice takes no budget: --vram would do nothing (--target-utilization stays:
/// an out-of-memory error names the largest layer count that fits that share of free memory).
/// Decode mode decodes once: --runs counts test-speed passes only.
#[derive(Args, Debug)]
#[command(group(
    ArgGroup::new("fixed_choice")
        .args(["num_gpu_layers", "config", "no_offload"])
        .multiple(true)
        .conflicts_with("vram")
))]
#[command(group(ArgGroup::new("passes").args(["runs"]).requires("test_speed")))]
pub struct RunArgs {
    #[command(flatten, next_help_heading = CHOICE)]
    pub choice: ChoiceArgs,
    /// Time forward passes over 128 random tokens (the original's test) instead of decoding.
    #[arg(long, conflicts_with = "gen_tokens", help_heading = MODE)]
    pub test_speed: bool,
    #[command(flatten, next_help_heading = MODEL)]
    pub checkpoint: CheckpointArgs,
    #[command(flatten, next_help_heading = PLANNING)]
    pub plan: PlanArgs,
    #[command(flatten, next_help_heading = PLANNING)]
    pub calibration: CalibrationArg,
    #[command(flatten, next_help_heading = BUDGET)]
    pub gpu: GpuArgs,
    #[command(flatten, next_help_heading = BUDGET)]
    pub budget: BudgetArgs,
    #[command(flatten, next_help_heading = ENGINE)]
    pub engine: EngineArgs,
    #[command(flatten, next_help_heading = TIMING)]
    pub timing: TimingArgs,
    /// Run one forward pass on these token ids (comma-separated) instead of timing: no random
    /// prompt, no timed runs (the timing flags are refused).
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "ID,ID,...",
        conflicts_with_all = ["test_speed", "prompt_len", "gen_tokens", "runs", "seed"],
        help_heading = MODE
    )]
    pub input_ids: Option<Vec<u32>>,
    /// With --input-ids: write the final hidden states and the last token's logits as safetensors.
    #[arg(long, value_name = "PATH", help_heading = MODE)]
    pub dump: Option<PathBuf>,
    #[command(flatten, next_help_heading = OUTPUT)]
    pub output: ReportArgs,
}

#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// `bench compare OLD NEW`: two earlier reports instead of a new measurement.
    #[command(subcommand)]
    pub compare: Option<BenchCommand>,
    /// Speak instead of decoding: the whole text-to-speech loop at each layer count on a forced
    /// schedule of frames, with RTF, time per frame by part against its floor (the CFG pair's
    /// copy floor plus the time outside the language model), and VRAM. --seed seeds the
    /// diffusion noise. Without --model-path: the small embedded speech model.
    #[arg(
        long,
        conflicts_with_all = ["baseline", "threshold", "max_seq_len", "batch", "prompt_len", "gen_tokens", "runs"],
        help_heading = MODE
    )]
    pub speech: bool,
    #[command(flatten)]
    pub speech_args: SpeechBenchArgs,
    /// Measure this machine for the predictions (`table`'s ms/token, `--cpu-layers auto`):
    /// PCIe and device-memory bandwidth, the host CPU's float8 rate, and decodes of the model
    /// at a few splits (all layers resident where they fit; nothing resident with some layers
    /// on the CPU, at batch 1 and 2) that fit the rest. Stored in --calibration FILE, else in
    /// the user's cache directory, where later commands on this machine find it. Needs a GPU.
    #[arg(
        long,
        conflicts_with_all = ["speech", "layers", "plot", "baseline", "cpu_layers", "batch"],
        help_heading = MODE
    )]
    pub calibrate: bool,
    /// Layer counts to measure, in order (default: all layers, then every 4 fewer, down to 0).
    #[arg(long, value_delimiter = ',', value_name = "N,N,...", help_heading = CHOICE)]
    pub layers: Option<Vec<usize>>,
    /// Draw ms/token (--speech: ms/frame) beside its bound and VRAM (estimate and measurement)
    /// against GPU layers into this SVG.
    #[arg(long, value_name = "PATH", help_heading = OUTPUT)]
    pub plot: Option<PathBuf>,
    /// An earlier `bench --json`: exit 3 when a configuration got slower by more than
    /// --threshold (refused when measured on another device, model, batch or workload).
    #[arg(long, value_name = "FILE", help_heading = GATE)]
    pub baseline: Option<PathBuf>,
    /// Allowed slowdown against --baseline (0.10 = 10%).
    #[arg(long, default_value_t = 0.10, requires = "baseline", help_heading = GATE)]
    pub threshold: f64,
    #[command(flatten, next_help_heading = MODEL)]
    pub checkpoint: CheckpointArgs,
    #[command(flatten, next_help_heading = PLANNING)]
    pub plan: PlanArgs,
    #[command(flatten, next_help_heading = PLANNING)]
    pub calibration: CalibrationArg,
    #[command(flatten, next_help_heading = ENGINE)]
    pub gpu: GpuArgs,
    #[command(flatten, next_help_heading = ENGINE)]
    pub engine: EngineArgs,
    #[command(flatten, next_help_heading = TIMING)]
    pub timing: TimingArgs,
    #[command(flatten, next_help_heading = OUTPUT)]
    pub output: ReportArgs,
}

/// What `bench` can do besides measuring.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Compare two `bench --json` reports without rerunning: exit 3 when NEW is slower than
    /// OLD by more than --threshold at a layer count both measured.
    #[command(after_help = examples::BENCH_COMPARE)]
    Compare(BenchCompareArgs),
}

#[derive(Args, Debug)]
pub struct BenchCompareArgs {
    /// The baseline report.
    pub old: PathBuf,
    /// The report held against it.
    pub new: PathBuf,
    /// Allowed slowdown (0.10 = 10%).
    #[arg(long, default_value_t = 0.10, help_heading = GATE)]
    pub threshold: f64,
    /// Print JSON instead of a table.
    #[arg(long, help_heading = OUTPUT)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct TableArgs {
    /// Layer counts to show, comma-separated (default 28, 24, ..., 0 for 28 layers).
    #[arg(long, value_delimiter = ',', value_name = "N,N,...", help_heading = CHOICE)]
    pub layers: Option<Vec<usize>>,
    #[command(flatten)]
    pub planning: PlanningArgs,
    #[command(flatten, next_help_heading = PLANNING)]
    pub calibration: CalibrationArg,
    #[command(flatten, next_help_heading = OUTPUT)]
    pub output: JsonArg,
}

#[derive(Args, Debug)]
pub struct AutoArgs {
    #[command(flatten)]
    pub planning: PlanningArgs,
    #[command(flatten, next_help_heading = OUTPUT)]
    pub output: JsonArg,
}

#[derive(Args, Debug)]
pub struct InspectArgs {
    /// Checkpoint file or directory (same as --model-path); without either, the built-in layout.
    #[arg(conflicts_with_all = ["model_path", "builtin"])]
    pub path: Option<PathBuf>,
    #[command(flatten, next_help_heading = MODEL)]
    pub model: ModelArgs,
    #[command(flatten, next_help_heading = OUTPUT)]
    pub output: JsonArg,
}

/// `--json` for commands that print to stdout only.
#[derive(Args, Debug)]
pub struct JsonArg {
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}

/// Where the report of a timed command goes.
#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON report to this file (under a temporary name, renamed when complete).
    #[arg(long, value_name = "PATH")]
    pub json_out: Option<PathBuf>,
}

/// Everything a plan reads: the model, the planning options and the VRAM budget.
#[derive(Args, Debug)]
pub struct PlanningArgs {
    #[command(flatten, next_help_heading = MODEL)]
    pub model: ModelArgs,
    #[command(flatten, next_help_heading = PLANNING)]
    pub plan: PlanArgs,
    #[command(flatten, next_help_heading = PLANNING)]
    pub scope: ScopeArgs,
    #[command(flatten, next_help_heading = PLANNING)]
    pub script: ScriptArgs,
    #[command(flatten, next_help_heading = BUDGET)]
    pub gpu: GpuArgs,
    #[command(flatten, next_help_heading = BUDGET)]
    pub budget: BudgetArgs,
}

/// How many decoder layers stay on the GPU (the original's flags; precedence: --no-offload,
/// then --config, then --num-gpu-layers, else auto).
#[derive(Args, Debug, Clone)]
pub struct ChoiceArgs {
    /// Choose the layer count from free VRAM. This is the default, so the flag changes nothing;
    /// the original spells it out. --no-offload, --config and --num-gpu-layers take precedence.
    #[arg(long)]
    pub auto: bool,
    /// Use a preset: high_end, mid_range, consumer, budget, minimal (or an alias).
    #[arg(long, visible_alias = "preset", value_name = "PRESET")]
    pub config: Option<String>,
    /// Keep N decoder layers on the GPU (llama.cpp's `-ngl` / `--n-gpu-layers` work too).
    #[arg(long, value_name = "N", visible_alias = "n-gpu-layers")]
    pub num_gpu_layers: Option<usize>,
    /// Keep every layer on the GPU.
    #[arg(long)]
    pub no_offload: bool,
}

/// The checkpoint file.
#[derive(Args, Debug, Clone)]
pub struct CheckpointArgs {
    /// Checkpoint file, or a directory holding vibevoice7b_float8_e4m3fn.safetensors (or
    /// vibevoice7b_bf16.safetensors with --dtype bf16). Without it: the built-in layout (table,
    /// auto, inspect) or a small synthesized model (run, bench).
    #[arg(long, value_name = "PATH")]
    pub model_path: Option<PathBuf>,
    /// Checkpoint precision: the file name in a --model-path directory, and the precision of the
    /// built-in layout or the synthesized model.
    #[arg(long, value_enum, default_value_t = DtypeArg::Float8)]
    pub dtype: DtypeArg,
}

/// Which model to plan for: a checkpoint, else a built-in layout.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    #[command(flatten, next_help_heading = MODEL)]
    pub checkpoint: CheckpointArgs,
    /// Built-in layout used when no --model-path is given [default: 7b].
    #[arg(long, value_enum, value_name = "SIZE", conflicts_with = "model_path", help_heading = MODEL)]
    pub builtin: Option<BuiltinArg>,
}

/// What the KV cache holds and how layers stream.
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
    #[arg(long, default_value_t = DEFAULT_STREAM_SLOTS)]
    pub slots: usize,
    /// Hybrid decoding: the host CPU computes N of the offloaded layers while the others
    /// stream, so fewer bytes cross PCIe per token (their weights and KV caches stay in host
    /// memory). `auto` takes the split predicted fastest from this machine's calibration
    /// (`bench --calibrate`; `table` needs one), else (run, generate, bench) from its PCIe,
    /// GPU and CPU measured at start. A bench row that keeps more layers resident computes at
    /// most those it leaves offloaded.
    #[arg(long, default_value = "0", value_name = "N|auto")]
    pub cpu_layers: CpuLayersArg,
}

/// `--calibration`: the stored rates that predictions of speed use.
#[derive(Args, Debug, Clone, Default)]
pub struct CalibrationArg {
    /// The calibration `bench --calibrate` wrote, that predicted ms per token and `--cpu-layers
    /// auto` use [default: the one stored for this machine in the user's cache directory,
    /// ~/.cache/vibeoffload/calibration.json on Linux; without one, `auto` measures at start].
    #[arg(long, value_name = "FILE")]
    pub calibration: Option<PathBuf>,
}

/// `--cpu-layers`: a count, or `auto`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CpuLayersArg {
    Count(usize),
    Auto,
}

impl std::str::FromStr for CpuLayersArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(CpuLayersArg::Auto),
            n => n
                .parse()
                .map(CpuLayersArg::Count)
                .map_err(|_| format!("`{n}` is neither a layer count nor `auto`")),
        }
    }
}

/// Sizing a text-to-speech plan for a script, as `generate` would run it.
#[derive(Args, Debug, Clone)]
pub struct ScriptArgs {
    /// Size both KV caches for this script as `generate` runs it: its prompt (text, and the
    /// --voice samples' frames) plus the original's limit of twice the prompt, within the
    /// model's context.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["max_seq_len", "lm_only"])]
    pub script: Option<PathBuf>,
    /// With --script: a voice sample of the prompt, once per speaker.
    #[arg(long = "voice", value_name = "WAV", requires = "script")]
    pub voices: Vec<PathBuf>,
}

/// What part of VibeVoice a plan covers (`run` and `bench` load the language model alone).
#[derive(Args, Debug, Clone)]
pub struct ScopeArgs {
    /// Keep the diffusion (prediction) head in host memory (full text-to-speech plans only).
    #[arg(long, conflicts_with = "lm_only")]
    pub offload_prediction_head: bool,
    /// Plan for the language model alone (what `run` loads), not full text-to-speech.
    #[arg(long)]
    pub lm_only: bool,
}

/// The GPU to read and run on.
#[derive(Args, Debug, Clone)]
pub struct GpuArgs {
    /// The GPU whose free memory NVML reads and (with --device cuda or auto) that runs the
    /// model: an index as CUDA numbers them (after CUDA_VISIBLE_DEVICES), a UUID (GPU-8f3a...,
    /// as `nvidia-smi -L` lists them) or a PCI bus id (0000:17:00.0) [default: 0].
    #[arg(long, value_name = "INDEX|UUID|PCI")]
    pub gpu: Option<GpuSelector>,
}

impl GpuArgs {
    /// `--gpu`, else the first GPU. (No default value in clap, so that settings can tell a
    /// `--gpu` given from none: `--device cpu` refuses one.)
    pub fn selector(&self) -> GpuSelector {
        self.gpu.clone().unwrap_or(GpuSelector::Index(0))
    }
}

/// Where the VRAM budget comes from.
#[derive(Args, Debug, Clone)]
pub struct BudgetArgs {
    /// Plan as if this much VRAM were free (e.g. 8GiB, 12GB, 7680MiB), on any machine.
    #[arg(long, value_name = "SIZE", allow_hyphen_values = true)]
    pub vram: Option<String>,
    /// Fraction of free VRAM a plan may use.
    #[arg(long, default_value_t = 0.8, value_name = "FRACTION")]
    pub target_utilization: f64,
}

/// How the engine runs.
#[derive(Args, Debug, Clone)]
pub struct EngineArgs {
    /// Where to run: cuda when built with CUDA and a GPU is present, else cpu.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Copies issued ahead of use (at most slots - 1) [default: slots - 1].
    #[arg(long, value_name = "N")]
    pub prefetch_depth: Option<usize>,
    /// Copy each streamed layer only when it is needed.
    #[arg(long, conflicts_with = "prefetch_depth")]
    pub no_prefetch: bool,
    /// Keep streamed layers in ordinary (pageable) host memory.
    #[arg(long)]
    pub no_pin: bool,
}

/// Prompt and generation lengths for timing.
#[derive(Args, Debug, Clone)]
pub struct TimingArgs {
    /// Prompt tokens in decode mode (and tokens per pass in test-speed mode).
    #[arg(long, default_value_t = Workload::DEFAULT.prompt_len, value_name = "TOKENS")]
    pub prompt_len: usize,
    /// Tokens to generate in decode mode [default: 32].
    #[arg(long, value_name = "TOKENS")]
    pub gen_tokens: Option<usize>,
    /// Timed passes in test-speed mode; `bench` also decodes this many times per layer count.
    #[arg(long, default_value_t = Workload::DEFAULT.runs)]
    pub runs: usize,
    /// Seed of the random prompt.
    #[arg(long, default_value_t = Workload::DEFAULT.seed)]
    pub seed: u64,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
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

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlacementArg {
    Last,
    First,
    Spread,
}
