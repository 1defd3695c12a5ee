//! `generate`'s arguments.

use super::*;

/// A fixed layer choice takes no budget: --vram and --target-utilization would do nothing.
#[derive(Args, Debug)]
#[command(group(
    ArgGroup::new("fixed_choice")
        .args(["num_gpu_layers", "config", "no_offload"])
        .multiple(true)
        .conflicts_with_all(["vram", "target_utilization"])
))]
pub struct GenerateArgs {
    /// The script: one `Speaker N: text` line per turn (other lines go to speaker 1).
    #[arg(
        long,
        value_name = "FILE",
        visible_aliases = ["txt_path", "txt-path"],
        required_unless_present = "text",
        conflicts_with = "text",
        help_heading = SCRIPT
    )]
    pub script: Option<PathBuf>,
    /// The script as text: `--text "Speaker 1: Hello."` (lines separated by newlines).
    #[arg(long, value_name = "SCRIPT", help_heading = SCRIPT)]
    pub text: Option<String>,
    /// A voice sample (WAV, any rate and depth), once per speaker in speaker order. Without
    /// any, the prompt has no voice section (as the original with no voice samples).
    #[arg(
        long = "voice",
        value_name = "WAV",
        visible_aliases = ["voice_files", "voice-files"],
        num_args = 1..,
        help_heading = SCRIPT
    )]
    pub voices: Vec<PathBuf>,
    /// The WAV file to write (24 kHz, 16-bit mono).
    #[arg(long, value_name = "PATH", default_value = "speech.wav", help_heading = OUTPUT)]
    pub out: PathBuf,
    /// Replace --out if it exists.
    #[arg(long, help_heading = OUTPUT)]
    pub force: bool,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 1.3, help_heading = SPEECH)]
    pub cfg_scale: f64,
    /// Diffusion steps per frame.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1000), help_heading = SPEECH)]
    pub steps: u64,
    /// Seed of the diffusion noise and the voice samples' latents.
    #[arg(long, default_value_t = 0, help_heading = SPEECH)]
    pub seed: u64,
    /// Stop after this many frames (133 ms of audio each).
    #[arg(long, value_name = "N", help_heading = SPEECH)]
    pub max_frames: Option<usize>,
    /// Produce exactly N frames whatever the language model chooses (a benchmark mode: random
    /// weights choose arbitrarily). The default for the embedded model is 24.
    #[arg(long, value_name = "N", help_heading = SPEECH)]
    pub force_frames: Option<usize>,
    /// Voice latents: the acoustic encoder's Gaussian sample (as the original), or its mean
    /// (deterministic whatever the seed).
    #[arg(long, value_enum, default_value_t = VoiceLatentsArg::Sample, help_heading = SPEECH)]
    pub voice_latents: VoiceLatentsArg,
    /// Each frame's initial diffusion noise from this safetensors file (tensor `noise`,
    /// `[frames, latent]`), for runs compared exactly (with this tool or the original).
    #[arg(long, value_name = "FILE", help_heading = SPEECH)]
    pub noise: Option<PathBuf>,
    /// Write every frame's latent, the conditions, the tokens and the audio to this
    /// safetensors file.
    #[arg(long, value_name = "FILE", help_heading = OUTPUT)]
    pub dump_latents: Option<PathBuf>,
    /// Run the guidance pass over the layers on its own, as the fork does (a benchmark of what
    /// sharing one weight stream saves; the audio is the same).
    #[arg(long, help_heading = SPEECH)]
    pub separate_cfg_passes: bool,
    /// Launch the speech components' kernels one by one instead of replaying each frame's as
    /// CUDA graphs (a benchmark of what the graphs save; the audio is the same).
    #[arg(long, help_heading = SPEECH)]
    pub no_cuda_graphs: bool,
    /// Generate once per preset (high_end, mid_range, consumer, budget, minimal) and print a
    /// table of RTF, time per part and VRAM, as the fork's --benchmark does.
    #[arg(long, conflicts_with_all = ["num_gpu_layers", "config", "no_offload"], help_heading = MODE)]
    pub benchmark: bool,
    /// GPU slots that offloaded layers stream through. Each costs a layer of VRAM; with more,
    /// the next frame's first layers are copied while the speech components run.
    #[arg(long, default_value_t = DEFAULT_STREAM_SLOTS, help_heading = PLANNING)]
    pub slots: usize,
    /// Hybrid decoding: the host CPU computes N of the offloaded layers while the others
    /// stream, so fewer bytes cross PCIe per frame (their weights and KV caches stay in host
    /// memory). `auto` takes the split predicted fastest for the CFG pair, from this machine's
    /// calibration (`bench --calibrate`) or else its PCIe, GPU and CPU measured at start.
    #[arg(long, default_value = "0", value_name = "N|auto", help_heading = PLANNING)]
    pub cpu_layers: super::CpuLayersArg,
    #[command(flatten, next_help_heading = PLANNING)]
    pub calibration: super::CalibrationArg,
    /// Keep the diffusion (prediction) head off the GPU, saving its VRAM (about 0.67 GB for
    /// 7B in float8): it runs on the CPU in f32, its ten steps per frame far slower there.
    #[arg(long, help_heading = PLANNING)]
    pub offload_prediction_head: bool,
    #[command(flatten, next_help_heading = CHOICE)]
    pub choice: ChoiceArgs,
    #[command(flatten, next_help_heading = MODEL)]
    pub checkpoint: CheckpointArgs,
    #[command(flatten, next_help_heading = BUDGET)]
    pub gpu: GpuArgs,
    #[command(flatten, next_help_heading = BUDGET)]
    pub budget: BudgetArgs,
    #[command(flatten, next_help_heading = ENGINE)]
    pub engine: EngineArgs,
    #[command(flatten, next_help_heading = OUTPUT)]
    pub output: ReportArgs,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoiceLatentsArg {
    Sample,
    Mean,
}
