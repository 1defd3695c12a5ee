//! The short description of a model that every report carries.

use crate::arch::config::ModelConfig;
use crate::arch::speech::SpeechConfig;
use crate::checkpoint::inventory::LayoutKind;
use crate::checkpoint::{ConfigSource, ModelInfo};
use serde::{Deserialize, Serialize};

/// The model a report is about.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSummary {
    /// File path or `built-in 7b float8`.
    pub source: String,
    /// Tensor naming.
    pub layout: LayoutKind,
    /// Where the configuration came from.
    pub config_source: ConfigSource,
    /// Decoder configuration.
    pub config: ModelConfig,
    /// The speech components' configuration (absent for a bare Qwen2, and in older reports).
    #[serde(default)]
    pub speech: Option<SpeechConfig>,
    /// Decoder layers.
    pub layers: usize,
    /// Bytes of the largest decoder layer.
    pub layer_bytes: u64,
    /// Bytes of all tensors.
    pub total_bytes: u64,
}

impl ModelSummary {
    /// Summarizes `model`.
    pub fn of(model: &ModelInfo) -> ModelSummary {
        ModelSummary {
            source: model.source.clone(),
            layout: model.inventory.layout,
            config_source: model.config_source.clone(),
            config: model.config.clone(),
            speech: model.speech.clone(),
            layers: model.inventory.num_layers(),
            layer_bytes: model
                .inventory
                .layer_bytes
                .iter()
                .copied()
                .max()
                .unwrap_or(0),
            total_bytes: model.inventory.total_bytes(),
        }
    }
}
