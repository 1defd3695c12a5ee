//! The speech tokenizers' tensors, described once: a residual block (`Block1D`) as one table,
//! and the encoder and decoder stacks built from a [`TokenizerConfig`]. Names are relative to
//! the stack (`model.acoustic_tokenizer.encoder.` and so on) and nest as the original's modules
//! do: `SConv1d` holds `conv.conv`, `SConvTranspose1d` holds `convtr.convtr`, a block's mixer
//! wraps one more `conv`.

use super::speech::{ConvStack, TokenizerConfig, TOKENIZER_KERNEL};
use super::{Role, TensorDef};

/// A block's FFN widens its channels this many times.
pub const FFN_EXPANSION: u64 = 4;

/// One tensor of a tokenizer block of `C` channels:
/// `x += gamma * dwconv(norm(x))`, then `x += ffn_gamma * linear2(gelu(linear1(ffn_norm(x))))`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlockTensor {
    /// Layer scale of the mixer branch, `[C]`.
    Gamma,
    /// Layer scale of the FFN branch, `[C]`.
    FfnGamma,
    /// RMSNorm before the mixer, `[C]`.
    Norm,
    /// RMSNorm before the FFN, `[C]`.
    FfnNorm,
    /// Depthwise causal convolution, `[C, 1, 7]`.
    MixerWeight,
    /// Its bias, `[C]`.
    MixerBias,
    /// FFN up projection, `[4C, C]`.
    Linear1,
    /// Its bias, `[4C]`.
    Linear1Bias,
    /// FFN down projection, `[C, 4C]`.
    Linear2,
    /// Its bias, `[C]`.
    Linear2Bias,
}

impl BlockTensor {
    /// Every tensor of a block, in the original's order.
    pub const ALL: [BlockTensor; 10] = [
        BlockTensor::Gamma,
        BlockTensor::FfnGamma,
        BlockTensor::Norm,
        BlockTensor::FfnNorm,
        BlockTensor::MixerWeight,
        BlockTensor::MixerBias,
        BlockTensor::Linear1,
        BlockTensor::Linear1Bias,
        BlockTensor::Linear2,
        BlockTensor::Linear2Bias,
    ];

    /// The name relative to `stages.{s}.{j}.`.
    pub fn name(self) -> &'static str {
        match self {
            BlockTensor::Gamma => "gamma",
            BlockTensor::FfnGamma => "ffn_gamma",
            BlockTensor::Norm => "norm.weight",
            BlockTensor::FfnNorm => "ffn_norm.weight",
            BlockTensor::MixerWeight => "mixer.conv.conv.conv.weight",
            BlockTensor::MixerBias => "mixer.conv.conv.conv.bias",
            BlockTensor::Linear1 => "ffn.linear1.weight",
            BlockTensor::Linear1Bias => "ffn.linear1.bias",
            BlockTensor::Linear2 => "ffn.linear2.weight",
            BlockTensor::Linear2Bias => "ffn.linear2.bias",
        }
    }

    /// What it is.
    pub fn role(self) -> Role {
        match self {
            BlockTensor::Gamma | BlockTensor::FfnGamma => Role::LayerScale,
            BlockTensor::Norm | BlockTensor::FfnNorm => Role::Norm,
            BlockTensor::MixerWeight => Role::Conv,
            BlockTensor::Linear1 | BlockTensor::Linear2 => Role::Linear,
            BlockTensor::MixerBias | BlockTensor::Linear1Bias | BlockTensor::Linear2Bias => {
                Role::Bias
            }
        }
    }

    /// Its shape in a block of `channels` channels.
    pub fn shape(self, channels: u64) -> Vec<u64> {
        let c = channels;
        match self {
            BlockTensor::MixerWeight => vec![c, 1, TOKENIZER_KERNEL as u64],
            BlockTensor::Linear1 => vec![FFN_EXPANSION * c, c],
            BlockTensor::Linear1Bias => vec![FFN_EXPANSION * c],
            BlockTensor::Linear2 => vec![c, FFN_EXPANSION * c],
            _ => vec![c],
        }
    }
}

/// A convolution's weight and bias under `prefix` (`...conv.conv.` or `...convtr.convtr.`).
fn conv(out: &mut Vec<TensorDef>, prefix: &str, weight: [u64; 3], bias: u64) {
    out.push(TensorDef::new(
        prefix,
        "weight",
        weight.to_vec(),
        Role::Conv,
    ));
    out.push(TensorDef::new(prefix, "bias", vec![bias], Role::Bias));
}

/// The residual blocks of every stage, `widths[s]` channels at stage `s`.
fn stages(out: &mut Vec<TensorDef>, prefix: &str, stack: &ConvStack, width: impl Fn(usize) -> u64) {
    for (s, &depth) in stack.depths.iter().enumerate() {
        for j in 0..depth {
            let p = format!("{prefix}stages.{s}.{j}.");
            for t in BlockTensor::ALL {
                out.push(TensorDef::new(&p, t.name(), t.shape(width(s)), t.role()));
            }
        }
    }
}

/// The encoder's tensors under `prefix`, in the original's order: a stem convolution from the
/// audio channels, one strided convolution (kernel 2 x stride) per ratio, the stages, and a
/// head convolution to `vae_dim` latent channels.
pub fn encoder_tensors(prefix: &str, tokenizer: &TokenizerConfig) -> Vec<TensorDef> {
    let stack = &tokenizer.encoder;
    let width = |s: usize| stack.encoder_width(s) as u64;
    let k = TOKENIZER_KERNEL as u64;
    let mut out = Vec::new();
    let stem = [width(0), tokenizer.channels as u64, k];
    conv(
        &mut out,
        &format!("{prefix}downsample_layers.0.0.conv.conv."),
        stem,
        width(0),
    );
    for (i, &ratio) in stack.ratios.iter().enumerate() {
        let p = format!("{prefix}downsample_layers.{}.0.conv.conv.", i + 1);
        let shape = [width(i + 1), width(i), 2 * ratio as u64];
        conv(&mut out, &p, shape, width(i + 1));
    }
    stages(&mut out, prefix, stack, width);
    let last = width(stack.depths.len() - 1);
    let head = [tokenizer.vae_dim as u64, last, k];
    conv(&mut out, &format!("{prefix}head.conv.conv."), head, head[0]);
    out
}

/// The decoder's tensors under `prefix`, in the original's order: a stem convolution from the
/// latent, one transposed convolution (`[in, out, 2 x stride]`) per ratio, the stages, and a
/// head convolution to the audio channels.
pub fn decoder_tensors(
    prefix: &str,
    tokenizer: &TokenizerConfig,
    stack: &ConvStack,
) -> Vec<TensorDef> {
    let width = |s: usize| stack.decoder_width(s) as u64;
    let k = TOKENIZER_KERNEL as u64;
    let mut out = Vec::new();
    let stem = [width(0), tokenizer.vae_dim as u64, k];
    conv(
        &mut out,
        &format!("{prefix}upsample_layers.0.0.conv.conv."),
        stem,
        width(0),
    );
    for (i, &ratio) in stack.ratios.iter().enumerate() {
        let p = format!("{prefix}upsample_layers.{}.0.convtr.convtr.", i + 1);
        let shape = [width(i), width(i + 1), 2 * ratio as u64];
        conv(&mut out, &p, shape, width(i + 1));
    }
    stages(&mut out, prefix, stack, width);
    let last = width(stack.depths.len() - 1);
    let head = [tokenizer.channels as u64, last, k];
    conv(&mut out, &format!("{prefix}head.conv.conv."), head, head[0]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(tensors: &[TensorDef]) -> u64 {
        tensors.iter().map(TensorDef::numel).sum()
    }

    #[test]
    fn real_stacks_have_the_originals_parameter_counts() {
        let acoustic = TokenizerConfig::real_acoustic();
        let decoder = acoustic.decoder.clone().unwrap();
        let semantic = TokenizerConfig::real_semantic();
        assert_eq!(params(&encoder_tensors("", &acoustic)), 343_696_032);
        assert_eq!(
            params(&decoder_tensors("", &acoustic, &decoder)),
            343_695_969
        );
        let sem = encoder_tensors("", &semantic);
        assert_eq!((params(&sem), sem.len()), (344_613_600, 276));
    }

    #[test]
    fn a_block_is_ten_tensors_with_the_originals_nesting() {
        let enc = encoder_tensors("e.", &TokenizerConfig::real_acoustic());
        let mixer = enc
            .iter()
            .find(|t| t.name == "e.stages.6.7.mixer.conv.conv.conv.weight")
            .unwrap();
        assert_eq!(
            (mixer.shape.as_slice(), mixer.role),
            ([2048, 1, 7].as_slice(), Role::Conv)
        );
        let stem = &enc[0];
        assert_eq!(stem.name, "e.downsample_layers.0.0.conv.conv.weight");
        assert_eq!(stem.shape, [32, 1, 7]);
    }
}
