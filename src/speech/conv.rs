//! The tokenizers' causal convolutions (the original's `SConv1d` and `SConvTranspose1d` with
//! `causal=True`, `pad_mode="constant"`, no weight norm), whole-signal and streaming.
//!
//! Whole signal: a convolution left-pads `k - s` zeros and right-pads the input up to a
//! multiple of its stride (the original's "extra padding"); a transposed convolution drops
//! its last `k - s` outputs. Streaming, each layer keeps a [`Slot`]: a convolution the last
//! `k - s` inputs it has seen (zeros at the start), a transposed convolution the overlap
//! tail `k - s` of its last outputs, which the next chunk's first outputs add to. Fed chunk
//! by chunk (each a multiple of the stride, but the last, which may have any length), both
//! give the whole-signal result.

use super::fused::add_bias;
use super::weights::{Scope, StoredWeight};
use crate::engine::dequant::{dequantize, RawTensor};
use crate::engine::model::{fused_around, Around};
use crate::engine::weights::Linear;
use crate::plan::memory::GEMM_MIN_WEIGHT;
use anyhow::{bail, Context, Result};
use candle_core::DType;
use candle_core::Tensor;

/// A convolution weight as the checkpoint holds it: bf16 (or f32), or float8 kept as stored and
/// decoded to the activations' dtype at each use (so it takes on the device what the VRAM plan
/// counts), or, below [`GEMM_MIN_WEIGHT`] elements, float8 decoded once at load as well (the
/// shallow layers run on many steps at every frame; the plan counts the copies:
/// `plan::memory::decoded_tokenizer_bytes`).
enum ConvWeight {
    Dense(Tensor),
    Stored(StoredWeight),
    Decoded(StoredWeight, Tensor),
}

impl ConvWeight {
    /// The weight `name` under `scope` with `shape`.
    fn load(scope: &Scope, name: &str, shape: &[usize]) -> Result<ConvWeight> {
        Ok(match scope.stored_float8(name, shape)? {
            Some(stored) => ConvWeight::Stored(stored),
            None => ConvWeight::Dense(scope.get(name, shape)?),
        })
    }

    /// This weight, a float8 one below [`GEMM_MIN_WEIGHT`] elements also decoded to `dtype`.
    fn decoded_if_small(self, dtype: DType) -> Result<ConvWeight> {
        Ok(match self {
            ConvWeight::Stored(s)
                if (s.raw.shape.iter().product::<usize>() as u64) < GEMM_MIN_WEIGHT =>
            {
                let decoded = s.decode(dtype)?;
                ConvWeight::Decoded(s, decoded)
            }
            other => other,
        })
    }

    /// The float8 weight as stored, where it is float8.
    fn stored(&self) -> Option<&StoredWeight> {
        match self {
            ConvWeight::Stored(s) | ConvWeight::Decoded(s, _) => Some(s),
            ConvWeight::Dense(_) => None,
        }
    }

    /// The weight for input `x`.
    fn for_input(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            ConvWeight::Dense(w) => Ok(w.clone()),
            ConvWeight::Decoded(_, w) if w.dtype() == x.dtype() => Ok(w.clone()),
            ConvWeight::Stored(s) | ConvWeight::Decoded(s, _) => s.decode(x.dtype()),
        }
    }
}

/// One layer's streaming cache; `None` is a fresh start.
pub(crate) type Slot = Option<Tensor>;

/// A dense causal 1-D convolution with bias (the blocks' depthwise ones are fused into
/// `fused::DepthwiseMixer`).
pub(crate) struct CausalConv1d {
    /// `[out, in, k]`.
    weight: ConvWeight,
    /// A float8 weight's bytes as the matrix `[out, in·k]`, for one output step.
    matrix: Option<Linear>,
    /// `[out]`.
    bias: Tensor,
    kernel: usize,
    stride: usize,
    name: String,
}

impl CausalConv1d {
    /// A dense convolution: the `SConv1d` at `scope` (weights `conv.conv.{weight,bias}`).
    pub(crate) fn dense(
        scope: &Scope,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
    ) -> Result<CausalConv1d> {
        let inner = scope.sub("conv.conv");
        let weight = ConvWeight::load(&inner, "weight", &[out_channels, in_channels, kernel])?;
        let bias = inner.get("bias", &[out_channels])?;
        let weight = weight.decoded_if_small(bias.dtype())?;
        let matrix = match weight.stored() {
            Some(w) => Some(Linear {
                weight: RawTensor {
                    shape: vec![out_channels, in_channels * kernel],
                    ..w.raw.clone()
                },
                scale: w.scale.clone(),
                scale_f32: w
                    .scale
                    .as_ref()
                    .map(|s| dequantize(s, None, DType::F32)?.flatten_all())
                    .transpose()?,
            }),
            None => None,
        };
        CausalConv1d::checked(CausalConv1d {
            weight,
            matrix,
            bias,
            kernel,
            stride,
            name: inner.name().to_string(),
        })
    }

    fn checked(conv: CausalConv1d) -> Result<CausalConv1d> {
        if conv.stride == 0 || conv.kernel <= conv.stride {
            bail!(
                "{}: kernel {} must exceed stride {} for a causal convolution",
                conv.name,
                conv.kernel,
                conv.stride
            );
        }
        Ok(conv)
    }

    /// Inputs a stream carries from one chunk to the next (the original's `padding_total`).
    fn context(&self) -> usize {
        self.kernel - self.stride
    }

    /// The whole-signal convolution of `x` `[B, C, L]`: `ceil(L / stride)` outputs.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let len = x.dim(2)?;
        // The original's get_extra_padding_for_conv1d with padding_total = k - s reduces to
        // the distance from L up to the next multiple of the stride.
        let extra = len.div_ceil(self.stride) * self.stride - len;
        let padded = x.pad_with_zeros(2, self.context(), extra)?;
        self.valid(&padded)
    }

    /// One streaming chunk `x` `[B, C, L]`: `ceil(L / stride)` outputs, continuing from
    /// `slot`. A chunk that is not a multiple of the stride ends the stream: it is right-padded
    /// as the whole signal's end is, and the slot it leaves must not be streamed on.
    pub(crate) fn step(&self, x: &Tensor, slot: &mut Slot) -> Result<Tensor> {
        let len = x.dim(2)?;
        let extra = len.div_ceil(self.stride) * self.stride - len;
        let input = match slot.take() {
            Some(previous) => Tensor::cat(&[&previous, x], 2)?.pad_with_zeros(2, 0, extra)?,
            None => x.pad_with_zeros(2, self.context(), extra)?,
        };
        let total = input.dim(2)?;
        *slot = Some(
            input
                .narrow(2, total - self.context(), self.context())?
                .contiguous()?,
        );
        self.valid(&input)
    }

    /// Whole signal when `slot` is `None`, else one streaming chunk.
    pub(crate) fn run(&self, x: &Tensor, slot: Option<&mut Slot>) -> Result<Tensor> {
        match slot {
            None => self.forward(x),
            Some(slot) => self.step(x, slot),
        }
    }

    /// The convolution without padding, plus the bias.
    fn valid(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self.one_step(x)? {
            return Ok(y);
        }
        let weight = self.weight.for_input(x)?;
        let fail = || format!("applying {} to {:?}", self.name, x.dims());
        let y = x.conv1d(&weight, 0, self.stride, 1, 1).with_context(fail)?;
        add_bias(&y, &self.bias).with_context(fail)
    }

    /// One output step of one sequence (`x` `[1, in, k]`, a streamed frame of the deepest
    /// layers) from a float8 weight: the fused matrix-vector product over the weight's bytes as
    /// `[out, in·k]`, in the same (channel, tap) order as `x`, the bias inside; `None` for
    /// other shapes and weights (no decoded copy of the weight, no im2col).
    fn one_step(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let (batch, channels, len) = x.dims3()?;
        let Some(matrix) = &self.matrix else {
            return Ok(None);
        };
        if batch != 1 || len != self.kernel {
            return Ok(None);
        }
        let row = x.contiguous()?.reshape((1, channels * len))?;
        let around = Around {
            bias: Some(&self.bias),
            ..Around::default()
        };
        let y = fused_around(&row, &[matrix], false, true, around)
            .with_context(|| format!("applying {} to {:?}", self.name, x.dims()))?;
        y.map(|y| Ok(y.reshape((1, (), 1))?)).transpose()
    }
}

/// A transposed convolution's weight: as [`ConvWeight`] in PyTorch's `[in, out, k]`, or a large
/// float8 one (at least [`GEMM_MIN_WEIGHT`] elements, one scale at most) transposed once at
/// load to the matrix `[out·k, in]`, in place of the stored bytes: one input step (the
/// decoder's deepest layer at every frame) is then one fused matrix-vector product over the
/// float8 bytes, where decoding the weight took 54 us and 67 MB a frame on the 7B.
enum TransposedWeight {
    Conv(ConvWeight),
    Matrix(Linear),
}

impl TransposedWeight {
    /// The weight under `scope` (`weight`, `[in, out, k]`).
    fn load(scope: &Scope, shape: [usize; 3]) -> Result<TransposedWeight> {
        let [inputs, outputs, kernel] = shape;
        let large = (shape.iter().product::<usize>() as u64) >= GEMM_MIN_WEIGHT;
        let stored = match large {
            true => scope.stored_float8("weight", &shape)?,
            false => None,
        };
        let one_scale = |s: &Option<RawTensor>| {
            s.as_ref()
                .is_none_or(|s| s.shape.iter().product::<usize>() == 1)
        };
        match stored {
            Some(w) if one_scale(&w.scale) => {
                let bytes = w.raw.bytes.reshape((inputs, outputs * kernel))?;
                let bytes = bytes.t()?.contiguous()?.flatten_all()?;
                let scale_f32 = w
                    .scale
                    .as_ref()
                    .map(|s| dequantize(s, None, DType::F32)?.flatten_all())
                    .transpose()?;
                Ok(TransposedWeight::Matrix(Linear {
                    weight: RawTensor {
                        shape: vec![outputs * kernel, inputs],
                        bytes,
                        ..w.raw
                    },
                    scale: w.scale,
                    scale_f32,
                }))
            }
            _ => Ok(TransposedWeight::Conv(ConvWeight::load(
                scope, "weight", &shape,
            )?)),
        }
    }

    /// This weight, a small float8 one also decoded to `dtype` (see [`ConvWeight`]).
    fn decoded_if_small(self, dtype: DType) -> Result<TransposedWeight> {
        Ok(match self {
            TransposedWeight::Conv(w) => TransposedWeight::Conv(w.decoded_if_small(dtype)?),
            matrix => matrix,
        })
    }

    /// The weight in PyTorch's layout for input `x`.
    fn for_input(&self, x: &Tensor, shape: [usize; 3]) -> Result<Tensor> {
        match self {
            TransposedWeight::Conv(w) => w.for_input(x),
            TransposedWeight::Matrix(m) => {
                let w = dequantize(&m.weight, m.scale.as_ref(), x.dtype())?;
                Ok(w.t()?.contiguous()?.reshape(shape.as_slice())?)
            }
        }
    }
}

/// A causal transposed 1-D convolution with bias (`trim_right_ratio = 1`).
pub(crate) struct CausalConvTranspose1d {
    weight: TransposedWeight,
    /// `[in, out, k]`.
    shape: [usize; 3],
    /// `[out]`.
    bias: Tensor,
    kernel: usize,
    stride: usize,
    name: String,
}

impl CausalConvTranspose1d {
    /// The `SConvTranspose1d` at `scope` (weights `convtr.convtr.{weight,bias}`).
    pub(crate) fn new(
        scope: &Scope,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
    ) -> Result<CausalConvTranspose1d> {
        let inner = scope.sub("convtr.convtr");
        let shape = [in_channels, out_channels, kernel];
        let weight = TransposedWeight::load(&inner, shape)?;
        let bias = inner.get("bias", &[out_channels])?;
        let weight = weight.decoded_if_small(bias.dtype())?;
        let name = inner.name().to_string();
        if stride == 0 || kernel <= stride {
            bail!("{name}: kernel {kernel} must exceed stride {stride}");
        }
        Ok(CausalConvTranspose1d {
            weight,
            shape,
            bias,
            kernel,
            stride,
            name,
        })
    }

    /// The full transposed convolution without bias: `(L - 1)·s + k` outputs.
    fn full(&self, x: &Tensor) -> Result<Tensor> {
        let fail = || format!("applying {} to {:?}", self.name, x.dims());
        if let Some(y) = self.one_step(x).with_context(fail)? {
            return Ok(y);
        }
        let weight = self.weight.for_input(x, self.shape)?;
        x.conv_transpose1d(&weight, 0, 0, self.stride, 1, 1)
            .with_context(fail)
    }

    /// One input step of one sequence (`x` `[1, in, 1]`) through a [`TransposedWeight::Matrix`]:
    /// `[1, out, k]` from the fused matrix-vector product; `None` for other shapes and weights.
    fn one_step(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let (batch, channels, len) = x.dims3()?;
        let TransposedWeight::Matrix(matrix) = &self.weight else {
            return Ok(None);
        };
        if batch != 1 || len != 1 {
            return Ok(None);
        }
        let row = x.contiguous()?.reshape((1, channels))?;
        let y = fused_around(&row, &[matrix], false, true, Around::default())?;
        let [_, outputs, kernel] = self.shape;
        y.map(|y| Ok(y.reshape((1, outputs, kernel))?)).transpose()
    }

    /// The whole-signal transposed convolution of `x` `[B, C, L]`: `L·s` outputs (the last
    /// `k - s` of the full result trimmed).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let len = x.dim(2)? * self.stride;
        add_bias(&self.full(x)?.narrow(2, 0, len)?, &self.bias)
    }

    /// One streaming chunk: `L·s` outputs, the previous chunk's overlap tail added in.
    pub(crate) fn step(&self, x: &Tensor, slot: &mut Slot) -> Result<Tensor> {
        let mut y = self.full(x)?;
        let overlap = self.kernel - self.stride;
        if let Some(tail) = slot.take() {
            let rest = y.dim(2)? - overlap;
            let head = (y.narrow(2, 0, overlap)? + tail)?;
            y = Tensor::cat(&[&head, &y.narrow(2, overlap, rest)?], 2)?;
        }
        let len = x.dim(2)? * self.stride;
        *slot = Some(y.narrow(2, len, overlap)?.contiguous()?);
        add_bias(&y.narrow(2, 0, len)?, &self.bias)
    }

    /// Whole signal when `slot` is `None`, else one streaming chunk.
    pub(crate) fn run(&self, x: &Tensor, slot: Option<&mut Slot>) -> Result<Tensor> {
        match slot {
            None => self.forward(x),
            Some(slot) => self.step(x, slot),
        }
    }
}
