//! VibeVoice around its language model: where the language model's tensors sit in a
//! checkpoint, the sizes of the other parts, and the full tensor list.

use super::config::ModelConfig;
use super::qwen2::LayerTensor;
use super::Role;

/// Prefix of the language model's tensors in a VibeVoice checkpoint.
pub const LM_PREFIX: &str = "model.language_model.";

/// Sizes of the parts of VibeVoice around the language model.
#[derive(Clone, Debug, PartialEq)]
pub struct VibeVoiceParts {
    /// Diffusion (prediction) head layers.
    pub head_layers: u64,
    /// Diffusion head FFN width.
    pub head_ffn_dim: u64,
    /// Acoustic latent size.
    pub acoustic_dim: u64,
    /// Semantic feature size.
    pub semantic_dim: u64,
    /// Timestep frequency-embedding size.
    pub frequency_embedding_size: u64,
    /// Width of the square blocks that stand in for the tokenizers' weights.
    pub tokenizer_width: u64,
    /// Blocks per tokenizer part (acoustic encoder, acoustic decoder, semantic encoder).
    pub tokenizer_blocks: u64,
}

impl VibeVoiceParts {
    /// The real model's parts: head FFN ratio 3.0, latent 64, semantic 128, and tokenizer
    /// stand-ins of 81 x 2048² = 339,738,624 parameters per part (acoustic about 680M in
    /// all, semantic about 340M).
    pub fn real(config: &ModelConfig) -> VibeVoiceParts {
        VibeVoiceParts {
            head_layers: 4,
            head_ffn_dim: config.hidden_size as u64 * 3,
            acoustic_dim: 64,
            semantic_dim: 128,
            frequency_embedding_size: 256,
            tokenizer_width: 2048,
            tokenizer_blocks: 81,
        }
    }

    /// Small parts for test models: two head layers and two hidden-sized blocks per tokenizer
    /// part.
    pub fn small(config: &ModelConfig) -> VibeVoiceParts {
        VibeVoiceParts {
            head_layers: 2,
            head_ffn_dim: config.hidden_size as u64 * 3,
            acoustic_dim: 8,
            semantic_dim: 16,
            frequency_embedding_size: 16,
            tokenizer_width: config.hidden_size as u64,
            tokenizer_blocks: 2,
        }
    }
}

/// Every tensor of a VibeVoice checkpoint, in file order, as the model defines it: name,
/// shape and role (how a checkpoint stores each is `checkpoint::layout`'s business).
pub fn tensors(config: &ModelConfig, parts: &VibeVoiceParts) -> Vec<(String, Vec<u64>, Role)> {
    let h = config.hidden_size as u64;
    let mut logical: Vec<(String, Vec<u64>, Role)> = Vec::new();
    let mut add = |name: String, shape: Vec<u64>, role: Role| logical.push((name, shape, role));

    add(
        format!("{LM_PREFIX}embed_tokens.weight"),
        vec![config.vocab_size as u64, h],
        Role::Embedding,
    );
    for l in 0..config.num_hidden_layers {
        for t in LayerTensor::ALL {
            add(
                format!("{LM_PREFIX}layers.{l}.{}", t.name()),
                t.shape(config),
                t.role(),
            );
        }
    }
    add(format!("{LM_PREFIX}norm.weight"), vec![h], Role::Norm);
    if !config.tie_word_embeddings {
        add(
            "lm_head.weight".into(),
            vec![config.vocab_size as u64, h],
            Role::Linear,
        );
    }

    let ph = "model.prediction_head.";
    let ffn = parts.head_ffn_dim;
    add(
        format!("{ph}noisy_images_proj.weight"),
        vec![h, parts.acoustic_dim],
        Role::Linear,
    );
    add(format!("{ph}cond_proj.weight"), vec![h, h], Role::Linear);
    add(
        format!("{ph}t_embedder.mlp.0.weight"),
        vec![h, parts.frequency_embedding_size],
        Role::Linear,
    );
    add(
        format!("{ph}t_embedder.mlp.2.weight"),
        vec![h, h],
        Role::Linear,
    );
    for l in 0..parts.head_layers {
        let p = format!("{ph}layers.{l}.");
        add(format!("{p}norm.weight"), vec![h], Role::Norm);
        add(
            format!("{p}ffn.gate_proj.weight"),
            vec![ffn, h],
            Role::Linear,
        );
        add(format!("{p}ffn.up_proj.weight"), vec![ffn, h], Role::Linear);
        add(
            format!("{p}ffn.down_proj.weight"),
            vec![h, ffn],
            Role::Linear,
        );
        add(
            format!("{p}adaLN_modulation.1.weight"),
            vec![3 * h, h],
            Role::Linear,
        );
    }
    add(
        format!("{ph}final_layer.adaLN_modulation.1.weight"),
        vec![2 * h, h],
        Role::Linear,
    );
    add(
        format!("{ph}final_layer.linear.weight"),
        vec![parts.acoustic_dim, h],
        Role::Linear,
    );

    for (connector, input) in [
        ("acoustic", parts.acoustic_dim),
        ("semantic", parts.semantic_dim),
    ] {
        let p = format!("model.{connector}_connector.");
        add(format!("{p}fc1.weight"), vec![h, input], Role::Linear);
        add(format!("{p}fc1.bias"), vec![h], Role::Bias);
        add(format!("{p}norm.weight"), vec![h], Role::Norm);
        add(format!("{p}fc2.weight"), vec![h, h], Role::Linear);
        add(format!("{p}fc2.bias"), vec![h], Role::Bias);
    }
    for part in [
        "acoustic_tokenizer.encoder",
        "acoustic_tokenizer.decoder",
        "semantic_tokenizer.encoder",
    ] {
        for b in 0..parts.tokenizer_blocks {
            let w = parts.tokenizer_width;
            add(
                format!("model.{part}.blocks.{b}.weight"),
                vec![w, w],
                Role::Linear,
            );
        }
    }
    add("model.speech_scaling_factor".into(), vec![], Role::Bias);
    add("model.speech_bias_factor".into(), vec![], Role::Bias);

    logical
}
