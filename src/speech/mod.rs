//! VibeVoice's speech components on candle, device-generic (CPU f32 for parity, CUDA in f32
//! or bf16): the acoustic tokenizer's encoder and decoder and the semantic encoder, whole
//! signal and streaming ([`tokenizer`]); the connectors into the language model
//! ([`connector`]); the diffusion head ([`head`]) and its DPM-Solver++ sampler with
//! classifier-free guidance ([`sampler`]). Weights come by checkpoint name through a
//! [`WeightSource`]; each component takes a [`Scope`] so it loads standalone. Built from
//! `arch::speech`'s configuration (read from a `config.json` by `checkpoint::speech_config`).

mod checkpoint;
pub mod connector;
mod conv;
mod fused;
mod guided_step;
pub mod head;
mod nn;
pub mod sampler;
pub mod tokenizer;
pub mod weights;

pub use checkpoint::CheckpointWeights;
pub use connector::Connector;
pub use head::{timestep_embedding, PredictionHead};
pub use sampler::{
    sample_latent, sample_latent_with, step_features, DpmSolver, FrameSampler, SolverRun,
};
pub use tokenizer::{gaussian_sample, Decoder, Encoder, StreamState};
pub use weights::{RandomWeights, SafetensorsWeights, Scope, WeightSource};

#[cfg(test)]
mod tests;
