//! Qwen2's decoder layer, described once: every tensor's name relative to `layers.{i}.`, its
//! shape from the configuration and its role. The checkpoint layout, the inventory's shape
//! check, the synthesizer, the parameter count, the planner's sizes and the engine's typed
//! weights all read this table.

use super::config::ModelConfig;
use super::Role;

/// Activation widths of a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Widths {
    /// The residual stream.
    pub hidden: u64,
    /// Queries: heads x head width.
    pub q: u64,
    /// Keys and values each: key/value heads x head width.
    pub kv: u64,
    /// The MLP.
    pub intermediate: u64,
}

/// One tensor of a decoder layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LayerTensor {
    /// RMSNorm before attention.
    InputNorm,
    /// Query projection.
    QProj,
    /// Its bias.
    QBias,
    /// Key projection.
    KProj,
    /// Its bias.
    KBias,
    /// Value projection.
    VProj,
    /// Its bias.
    VBias,
    /// Attention output projection.
    OProj,
    /// RMSNorm before the MLP.
    PostNorm,
    /// MLP gate projection.
    Gate,
    /// MLP up projection.
    Up,
    /// MLP down projection.
    Down,
}

impl LayerTensor {
    /// Every tensor of a layer, in file order.
    pub const ALL: [LayerTensor; 12] = [
        LayerTensor::InputNorm,
        LayerTensor::QProj,
        LayerTensor::QBias,
        LayerTensor::KProj,
        LayerTensor::KBias,
        LayerTensor::VProj,
        LayerTensor::VBias,
        LayerTensor::OProj,
        LayerTensor::PostNorm,
        LayerTensor::Gate,
        LayerTensor::Up,
        LayerTensor::Down,
    ];

    /// The seven linear weights (float8 with a scale in scaled checkpoints).
    pub const LINEARS: [LayerTensor; 7] = [
        LayerTensor::QProj,
        LayerTensor::KProj,
        LayerTensor::VProj,
        LayerTensor::OProj,
        LayerTensor::Gate,
        LayerTensor::Up,
        LayerTensor::Down,
    ];

    /// The name relative to `layers.{i}.`, as checkpoints spell it.
    pub fn name(self) -> &'static str {
        match self {
            LayerTensor::InputNorm => "input_layernorm.weight",
            LayerTensor::QProj => "self_attn.q_proj.weight",
            LayerTensor::QBias => "self_attn.q_proj.bias",
            LayerTensor::KProj => "self_attn.k_proj.weight",
            LayerTensor::KBias => "self_attn.k_proj.bias",
            LayerTensor::VProj => "self_attn.v_proj.weight",
            LayerTensor::VBias => "self_attn.v_proj.bias",
            LayerTensor::OProj => "self_attn.o_proj.weight",
            LayerTensor::PostNorm => "post_attention_layernorm.weight",
            LayerTensor::Gate => "mlp.gate_proj.weight",
            LayerTensor::Up => "mlp.up_proj.weight",
            LayerTensor::Down => "mlp.down_proj.weight",
        }
    }

    /// The tensor a relative name denotes.
    pub fn from_name(name: &str) -> Option<LayerTensor> {
        LayerTensor::ALL.into_iter().find(|t| t.name() == name)
    }

    /// What it is.
    pub fn role(self) -> Role {
        match self {
            LayerTensor::InputNorm | LayerTensor::PostNorm => Role::Norm,
            LayerTensor::QBias | LayerTensor::KBias | LayerTensor::VBias => Role::Bias,
            _ => Role::Linear,
        }
    }

    /// Its shape under `config` (`[out, in]` for linear weights).
    pub fn shape(self, config: &ModelConfig) -> Vec<u64> {
        let Widths {
            hidden: h,
            q,
            kv,
            intermediate: i,
        } = config.widths();
        match self {
            LayerTensor::InputNorm | LayerTensor::PostNorm => vec![h],
            LayerTensor::QProj => vec![q, h],
            LayerTensor::QBias => vec![q],
            LayerTensor::KProj | LayerTensor::VProj => vec![kv, h],
            LayerTensor::KBias | LayerTensor::VBias => vec![kv],
            LayerTensor::OProj => vec![h, q],
            LayerTensor::Gate | LayerTensor::Up => vec![i, h],
            LayerTensor::Down => vec![h, i],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_linears_are_the_linear_role() {
        for t in LayerTensor::ALL {
            assert_eq!(LayerTensor::from_name(t.name()), Some(t));
            assert_eq!(
                LayerTensor::LINEARS.contains(&t),
                t.role() == Role::Linear,
                "{t:?}"
            );
        }
        assert_eq!(LayerTensor::from_name("mlp.down_proj.scale_weight"), None);
    }
}
