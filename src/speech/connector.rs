//! The speech connectors (the original's `SpeechConnector`): latent frames into the language
//! model's embedding space, `fc2(RMSNorm(fc1(x)))` with no activation. The acoustic one
//! takes the 64-d acoustic latents (the voice prompt and every generated frame), the
//! semantic one the 128-d semantic features of every generated frame.

use super::nn::{apply, linear, rms_norm, Linear};
use super::weights::Scope;
use crate::arch::speech::CONNECTOR_EPS;
use anyhow::Result;
use candle_core::Tensor;

/// One connector: `fc1 [H, in]` (bias), `norm [H]` (eps 1e-6), `fc2 [H, H]` (bias).
pub struct Connector {
    fc1: Linear,
    norm: Tensor,
    fc2: Linear,
    name: String,
}

impl Connector {
    /// The connector at `scope` (`model.acoustic_connector`, `model.semantic_connector`) from
    /// `input_dim` latent channels to the language model's `hidden_size`.
    pub fn new(scope: &Scope, input_dim: usize, hidden_size: usize) -> Result<Connector> {
        Ok(Connector {
            fc1: linear(&scope.sub("fc1"), input_dim, hidden_size, true)?,
            norm: scope.get("norm.weight", &[hidden_size])?,
            fc2: linear(&scope.sub("fc2"), hidden_size, hidden_size, true)?,
            name: scope.name().to_string(),
        })
    }

    /// `x` `[..., input_dim]` to `[..., hidden_size]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = apply(&self.fc1, x, &self.name, "fc1")?;
        let h = rms_norm(&h, Some(&self.norm), CONNECTOR_EPS)?;
        apply(&self.fc2, &h, &self.name, "fc2")
    }
}
