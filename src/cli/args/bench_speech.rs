//! `bench --speech`'s own arguments (the layer counts, engine and output flags are `bench`'s).

use super::*;

/// What `bench --speech` speaks. Each flag needs `--speech`: without it, it would do nothing.
#[derive(Args, Debug)]
pub struct SpeechBenchArgs {
    /// Frames each layer count produces, whatever the language model chooses (a benchmark
    /// mode: random weights choose arbitrarily).
    #[arg(long, value_name = "K", default_value_t = 64, requires = "speech", help_heading = SPEECH)]
    pub force_frames: usize,
    /// Diffusion steps per frame.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1000), requires = "speech", help_heading = SPEECH)]
    pub steps: u64,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 1.3, requires = "speech", help_heading = SPEECH)]
    pub cfg_scale: f64,
    /// Launch the speech components' kernels one by one instead of replaying each frame's as
    /// CUDA graphs (a benchmark of what the graphs save).
    #[arg(long, requires = "speech", help_heading = SPEECH)]
    pub no_cuda_graphs: bool,
    /// Keep the diffusion (prediction) head off the GPU: it runs on the CPU in f32 (as
    /// `generate --offload-prediction-head`).
    #[arg(long, requires = "speech", help_heading = SPEECH)]
    pub offload_prediction_head: bool,
    /// The script: one `Speaker N: text` line per turn [default: a short line for one
    /// speaker].
    #[arg(long, value_name = "FILE", requires = "speech", help_heading = SCRIPT)]
    pub script: Option<PathBuf>,
    /// A voice sample (WAV), once per speaker in speaker order [default: none, no voice
    /// section].
    #[arg(long = "voice", value_name = "WAV", requires = "speech", help_heading = SCRIPT)]
    pub voices: Vec<PathBuf>,
    /// Keep the WAV each layer count writes (over the previous one) here [default: a
    /// temporary file, removed at the end].
    #[arg(long, value_name = "PATH", requires = "speech", help_heading = OUTPUT)]
    pub out: Option<PathBuf>,
    /// Replace --out if it exists.
    #[arg(long, requires = "out", help_heading = OUTPUT)]
    pub force: bool,
}
