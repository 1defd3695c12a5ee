//! What the model is, with no I/O: the language model's configuration, Qwen2's decoder layer
//! as one table of tensors, and VibeVoice's full tensor list around it. Checkpoints, the
//! planner and the engine read these instead of spelling names and shapes themselves; the
//! speech components join as siblings of [`qwen2`].

pub mod config;
pub mod qwen2;
pub mod speech;
pub mod vibevoice;

/// What a tensor is, which decides its synthetic values and whether it gets a scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A linear layer's weight (`[out, in]`): float8 with a scale in scaled checkpoints.
    Linear,
    /// The token embedding.
    Embedding,
    /// An RMSNorm weight (values near 1).
    Norm,
    /// A bias or a scalar factor (small values).
    Bias,
    /// A float8 scale (positive f32); added by a checkpoint's precision, not by the model.
    Scale,
    /// The empty `scaled_fp8` marker tensor; likewise.
    Marker,
}
