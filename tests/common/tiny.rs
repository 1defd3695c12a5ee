//! A tiny Qwen2 for the engine tests: four layers, written by the synthesizer, and what a test
//! reads back from an engine run on it.

use candle_core::Tensor;
use std::path::{Path, PathBuf};
use vibeoffload::arch::config::ModelConfig;
use vibeoffload::arch::speech::SpeechConfig;
use vibeoffload::checkpoint::layout::{Precision, ScaleConvention, ScaleGranularity};
use vibeoffload::checkpoint::synth::{self, SynthSpec};
use vibeoffload::checkpoint::ModelInfo;
use vibeoffload::engine::{Engine, EngineOptions};

pub const LAYERS: usize = 4;

/// The precisions the engine tests cover: plain float8, float8 with a scale per output
/// channel, bf16.
pub const PRECISIONS: [Precision; 3] = [
    Precision::Float8Plain,
    Precision::Float8Scaled(ScaleConvention::ScaleWeight, ScaleGranularity::PerChannel),
    Precision::BF16,
];

pub fn config(tied: bool) -> ModelConfig {
    ModelConfig {
        hidden_size: 64,
        intermediate_size: 96,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        num_hidden_layers: LAYERS,
        vocab_size: 200,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: tied,
        max_position_embeddings: 32768,
    }
}

pub fn write_model(dir: &Path, precision: Precision, tied: bool) -> PathBuf {
    let config = config(tied);
    let spec = SynthSpec {
        speech: SpeechConfig::small(config.hidden_size),
        config,
        precision,
        seed: 42,
    };
    let path = dir.join("m.safetensors");
    synth::write(&spec, &path, true, |_, _| {}).unwrap();
    path
}

pub fn load(path: &Path, options: &EngineOptions) -> Engine {
    Engine::load(ModelInfo::open(path).unwrap(), options, |_| {}).unwrap()
}

pub fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Prefill then three single-token steps; every hidden state and the last logits.
pub fn trace(engine: &mut Engine) -> Vec<Vec<f32>> {
    engine.reset();
    let mut out = Vec::new();
    // 11 tokens: more than the fused decode path takes; then single tokens, which it takes.
    let hidden = engine
        .forward(&[5, 17, 99, 3, 150, 1, 2, 3, 4, 5, 6])
        .unwrap();
    out.push(values(&hidden));
    for id in [7u32, 190, 0] {
        let hidden = engine.forward(&[id]).unwrap();
        out.push(values(&hidden));
        out.push(values(&engine.logits(&hidden.get(0).unwrap()).unwrap()));
    }
    out
}
