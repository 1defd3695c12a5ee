//! What the model is, with no I/O: the language model's configuration, Qwen2's decoder layer
//! as one table of tensors, the speech components' configuration ([`speech`]) and tables
//! ([`tokenizer`], [`head`]), and VibeVoice's full tensor list built from them. Checkpoints,
//! the planner and the engine read these instead of spelling names and shapes themselves.

pub mod config;
pub mod head;
pub mod qwen2;
pub mod speech;
pub mod tokenizer;
pub mod vibevoice;

/// What a tensor is, which decides its synthetic values and how a precision stores it.
///
/// Storage: the fork's plain float8 casts the whole model, so every role is float8 there.
/// Scaled float8 stores only [`Role::Linear`] weights in float8 with a scale; convolution
/// weights and every vector stay bf16, as ComfyUI-style converters quantize `nn.Linear` only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A linear layer's weight (`[out, in]`): float8 with a scale in scaled checkpoints.
    Linear,
    /// A convolution's weight (`[out, in / groups, kernel]`, or `[in, out, kernel]` for a
    /// transposed one): bf16 in scaled checkpoints.
    Conv,
    /// The token embedding.
    Embedding,
    /// An RMSNorm weight (values near 1).
    Norm,
    /// A bias (small values).
    Bias,
    /// A residual branch's per-channel layer scale (a tokenizer block's `gamma`).
    LayerScale,
    /// One of the two 0-d speech factors, with its value.
    Factor(vibevoice::SpeechFactor),
    /// A float8 scale (positive f32); added by a checkpoint's precision, not by the model.
    Scale,
    /// The empty `scaled_fp8` marker tensor; likewise.
    Marker,
}

/// One tensor as the model defines it: full name, shape and role (how a checkpoint stores it
/// is `checkpoint::layout`'s business).
#[derive(Clone, Debug, PartialEq)]
pub struct TensorDef {
    /// Name as checkpoints spell it.
    pub name: String,
    /// Dimensions.
    pub shape: Vec<u64>,
    /// What it is.
    pub role: Role,
}

impl TensorDef {
    /// A tensor named `prefix` + `name`.
    pub fn new(prefix: &str, name: &str, shape: Vec<u64>, role: Role) -> TensorDef {
        TensorDef {
            name: format!("{prefix}{name}"),
            shape,
            role,
        }
    }

    /// Elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().product()
    }
}
