//! The arguments of the commands that write checkpoints: `synth` and `convert`.

use super::*;

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Where to write the checkpoint; config.json goes beside it.
    pub out: PathBuf,
    /// Model size; `custom` takes the dimension flags below (defaults: a tiny test model).
    #[arg(long, value_enum, default_value_t = SizeArg::Builtin(BuiltinArg::Large7b), help_heading = MODEL)]
    pub size: SizeArg,
    /// Storage precision.
    #[arg(long, value_enum, default_value_t = DtypeArg::Float8, help_heading = MODEL)]
    pub dtype: DtypeArg,
    /// Float8 scales: none (every tensor F8_E4M3, as the fork writes), one per matrix, or one
    /// per output channel (linear weights F8_E4M3 + F32 scales, the rest BF16).
    #[arg(long, value_enum, default_value_t = ScaleArg::None, help_heading = MODEL)]
    pub scale: ScaleArg,
    /// Name of scale tensors.
    #[arg(long, value_enum, default_value_t = ConventionArg::ScaleWeight, help_heading = MODEL)]
    pub scale_convention: ConventionArg,
    /// Random seed: the same seed writes the same bytes.
    #[arg(long, default_value_t = 0, help_heading = MODEL)]
    pub seed: u64,
    /// Replace existing files.
    #[arg(long, help_heading = OUTPUT)]
    pub force: bool,
    /// Decoder layers (custom).
    #[arg(long, help_heading = CUSTOM)]
    pub layers: Option<usize>,
    /// Hidden size (custom).
    #[arg(long, help_heading = CUSTOM)]
    pub hidden: Option<usize>,
    /// MLP width (custom).
    #[arg(long, help_heading = CUSTOM)]
    pub intermediate: Option<usize>,
    /// Attention heads (custom).
    #[arg(long, help_heading = CUSTOM)]
    pub heads: Option<usize>,
    /// Key/value heads (custom).
    #[arg(long, help_heading = CUSTOM)]
    pub kv_heads: Option<usize>,
    /// Head width (custom; default hidden / heads).
    #[arg(long, help_heading = CUSTOM)]
    pub head_dim: Option<usize>,
    /// Vocabulary (custom).
    #[arg(long, help_heading = CUSTOM)]
    pub vocab: Option<usize>,
    /// Tie the LM head to the embedding (custom).
    #[arg(long, help_heading = CUSTOM)]
    pub tie_embeddings: bool,
    /// Print JSON instead of a summary line.
    #[arg(long, help_heading = OUTPUT)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct ConvertArgs {
    /// The checkpoint to convert (bf16, f16 or f32): a file, a model.safetensors.index.json, or
    /// a directory holding vibevoice7b_bf16.safetensors, the index and its shards, or
    /// model.safetensors; its config.json is read from beside it.
    #[arg(long, value_name = "PATH", help_heading = MODEL)]
    pub model_path: PathBuf,
    /// Where to write the float8 checkpoint; config.json goes beside it.
    #[arg(long, value_name = "PATH", help_heading = OUTPUT)]
    pub out: PathBuf,
    /// float8: every tensor F8_E4M3 with no scales, as the fork writes it (out-of-range values
    /// saturate at ±448 where PyTorch makes NaN); float8-scaled: linear weights F8_E4M3 with one
    /// F32 scale per output channel, the rest BF16 (more accurate).
    #[arg(long, value_enum, default_value_t = ConvertPrecisionArg::Float8, help_heading = MODEL)]
    pub precision: ConvertPrecisionArg,
    /// Name of the scale tensors (float8-scaled) [default: scale-weight].
    #[arg(long, value_enum, help_heading = MODEL)]
    pub scale_convention: Option<ConventionArg>,
    /// Replace existing files.
    #[arg(long, help_heading = OUTPUT)]
    pub force: bool,
    /// Print JSON instead of a summary.
    #[arg(long, help_heading = OUTPUT)]
    pub json: bool,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvertPrecisionArg {
    Float8,
    Float8Scaled,
}

/// `synth --size`: a built-in size, or `custom` with the dimension flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeArg {
    Builtin(BuiltinArg),
    Custom,
}

impl ValueEnum for SizeArg {
    fn value_variants<'a>() -> &'a [Self] {
        &[
            SizeArg::Builtin(BuiltinArg::Large7b),
            SizeArg::Builtin(BuiltinArg::Small1_5b),
            SizeArg::Custom,
        ]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        match self {
            SizeArg::Builtin(b) => b.to_possible_value(),
            SizeArg::Custom => Some(PossibleValue::new("custom")),
        }
    }
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
