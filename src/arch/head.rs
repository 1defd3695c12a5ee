//! The diffusion (prediction) head's and the speech connectors' tensors, described once: an
//! adaLN layer of the head as one table, the head around its layers, and a connector
//! (`fc1 -> RMSNorm -> fc2`, no activation) as another. Names are relative to
//! `model.prediction_head.` and `model.{acoustic,semantic}_connector.`.

use super::speech::{DiffusionHeadConfig, FREQUENCY_EMBEDDING_SIZE};
use super::{Role, TensorDef};

/// One tensor of a head layer: `x += gate * ffn(norm(x) * (1 + scale) + shift)`, with shift,
/// scale and gate from `adaLN_modulation.1(silu(c))`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HeadLayerTensor {
    /// SwiGLU gate projection, `[F, H]`.
    Gate,
    /// SwiGLU up projection, `[F, H]`.
    Up,
    /// SwiGLU down projection, `[H, F]`.
    Down,
    /// RMSNorm, `[H]`.
    Norm,
    /// Shift, scale and gate from the condition, `[3H, H]` (zero-initialised in training).
    AdaLn,
}

impl HeadLayerTensor {
    /// Every tensor of a head layer, in the original's order.
    pub const ALL: [HeadLayerTensor; 5] = [
        HeadLayerTensor::Gate,
        HeadLayerTensor::Up,
        HeadLayerTensor::Down,
        HeadLayerTensor::Norm,
        HeadLayerTensor::AdaLn,
    ];

    /// The name relative to `layers.{l}.`.
    pub fn name(self) -> &'static str {
        match self {
            HeadLayerTensor::Gate => "ffn.gate_proj.weight",
            HeadLayerTensor::Up => "ffn.up_proj.weight",
            HeadLayerTensor::Down => "ffn.down_proj.weight",
            HeadLayerTensor::Norm => "norm.weight",
            HeadLayerTensor::AdaLn => "adaLN_modulation.1.weight",
        }
    }

    /// What it is.
    pub fn role(self) -> Role {
        match self {
            HeadLayerTensor::Norm => Role::Norm,
            _ => Role::Linear,
        }
    }

    /// Its shape under `head`.
    pub fn shape(self, head: &DiffusionHeadConfig) -> Vec<u64> {
        let (h, f) = (head.hidden_size as u64, head.ffn_dim as u64);
        match self {
            HeadLayerTensor::Gate | HeadLayerTensor::Up => vec![f, h],
            HeadLayerTensor::Down => vec![h, f],
            HeadLayerTensor::Norm => vec![h],
            HeadLayerTensor::AdaLn => vec![3 * h, h],
        }
    }
}

/// The head's tensors under `prefix`, in the original's order: the latent and condition
/// projections, the timestep MLP, the layers, and the final layer (adaLN shift and scale, then
/// a projection back to the latent; its norm has no weight).
pub fn head_tensors(prefix: &str, head: &DiffusionHeadConfig) -> Vec<TensorDef> {
    let (h, latent) = (head.hidden_size as u64, head.latent_size as u64);
    let freq = FREQUENCY_EMBEDDING_SIZE as u64;
    let linear = |name: &str, shape: Vec<u64>| TensorDef::new(prefix, name, shape, Role::Linear);
    let mut out = vec![
        linear("noisy_images_proj.weight", vec![h, latent]),
        linear("cond_proj.weight", vec![h, h]),
        linear("t_embedder.mlp.0.weight", vec![h, freq]),
        linear("t_embedder.mlp.2.weight", vec![h, h]),
    ];
    for l in 0..head.head_layers {
        let p = format!("{prefix}layers.{l}.");
        for t in HeadLayerTensor::ALL {
            out.push(TensorDef::new(&p, t.name(), t.shape(head), t.role()));
        }
    }
    out.push(linear("final_layer.linear.weight", vec![latent, h]));
    out.push(linear(
        "final_layer.adaLN_modulation.1.weight",
        vec![2 * h, h],
    ));
    out
}

/// A connector's tensors under `prefix`: `fc1` from `input` features to the language model's
/// width `hidden`, an RMSNorm, and `fc2`, both linears with biases.
pub fn connector_tensors(prefix: &str, input: u64, hidden: u64) -> Vec<TensorDef> {
    vec![
        TensorDef::new(prefix, "fc1.weight", vec![hidden, input], Role::Linear),
        TensorDef::new(prefix, "fc1.bias", vec![hidden], Role::Bias),
        TensorDef::new(prefix, "norm.weight", vec![hidden], Role::Norm),
        TensorDef::new(prefix, "fc2.weight", vec![hidden, hidden], Role::Linear),
        TensorDef::new(prefix, "fc2.bias", vec![hidden], Role::Bias),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(tensors: &[TensorDef]) -> u64 {
        tensors.iter().map(TensorDef::numel).sum()
    }

    #[test]
    fn real_heads_and_connectors_have_the_originals_parameter_counts() {
        let seven = DiffusionHeadConfig::real(3584);
        let small = DiffusionHeadConfig::real(1536);
        assert_eq!(params(&head_tensors("", &seven)), 669_333_504);
        assert_eq!(params(&head_tensors("", &small)), 123_279_360);
        assert_eq!(params(&connector_tensors("", 64, 3584)), 13_085_184);
        assert_eq!(params(&connector_tensors("", 128, 3584)), 13_314_560);
        assert_eq!(params(&connector_tensors("", 64, 1536)), 2_462_208);
        assert_eq!(params(&connector_tensors("", 128, 1536)), 2_560_512);
    }
}
