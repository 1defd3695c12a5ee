//! The tokenizers' residual block in few launches: the engine's fused ops
//! ([`DepthwiseMixer`], [`ChannelNorm`], [`ChannelResidual`]) with their CPU reference (plain
//! loops in f32, rounding to the activation dtype where the unfused candle ops would) and
//! candle glue; their CUDA kernels are `engine/cuda/kernels/speech.cu`. The mixer's streaming
//! cache holds the block's last raw inputs (the norm is per time step, so the kernel
//! normalises them again), carried in the op's result.

use super::conv::Slot;
use super::weights::Scope;
use crate::engine::dequant::{cpu_activations, cpu_storage};
use crate::engine::ops::{ChannelBias, ChannelNorm, ChannelResidual, DepthwiseMixer};
use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor};
use std::borrow::Cow;

/// The mixer of the `Block1D` at `scope` over `dim` channels: its `norm`, the depthwise
/// convolution `mixer.conv.conv.conv` (kernel `kernel`) and `gamma`.
pub(crate) fn load_mixer(
    scope: &Scope,
    dim: usize,
    kernel: usize,
    eps: f64,
) -> Result<DepthwiseMixer> {
    let conv = scope.sub("mixer.conv.conv.conv");
    Ok(DepthwiseMixer {
        norm: scope.get("norm.weight", &[dim])?,
        eps: eps as f32,
        taps: conv
            .get("weight", &[dim, 1, kernel])?
            .reshape((dim, kernel))?
            .to_dtype(DType::F32)?,
        bias: conv.get("bias", &[dim])?,
        gamma: scope.get("gamma", &[dim])?,
        stream: false,
    })
}

/// The mixer half of a block on `x` `[B, C, T]`: the whole signal when `slot` is `None`,
/// else one streaming chunk continuing from `slot` (which it then holds the next chunk's
/// cache in).
pub(crate) fn mix(op: &DepthwiseMixer, x: &Tensor, slot: Option<&mut Slot>) -> Result<Tensor> {
    let Some(slot) = slot else {
        return Ok(x.apply_op1_no_bwd(op)?);
    };
    let op = DepthwiseMixer {
        stream: true,
        ..op.clone()
    };
    let out = match slot.take() {
        Some(cache) => x.apply_op2_no_bwd(&cache, &op)?,
        None => x.apply_op1_no_bwd(&op)?,
    };
    let (len, context) = (x.dim(2)?, op.taps.dim(1)? - 1);
    *slot = Some(out.narrow(2, len, context)?);
    Ok(out.narrow(2, 0, len)?)
}

/// `v` rounded to bf16 when `bf16`, as storing it in the activation dtype would.
pub(super) fn round(v: f32, bf16: bool) -> f32 {
    match bf16 {
        true => half::bf16::from_f32(v).to_f32(),
        false => v,
    }
}

/// A `[B, C, T]` operand with any strides, as f32 values.
struct Strided<'a> {
    values: Cow<'a, [f32]>,
    bf16: bool,
    offset: usize,
    strides: [usize; 3],
    dims: [usize; 3],
}

impl<'a> Strided<'a> {
    fn new(storage: &'a CpuStorage, layout: &Layout, what: &str) -> candle_core::Result<Self> {
        let (values, bf16) = cpu_activations(storage)?;
        let (&[b, c, t], &[sb, sc, st]) = (layout.dims(), layout.stride()) else {
            candle_core::bail!(
                "{what} must be [batch, channels, time], got {:?}",
                layout.dims()
            );
        };
        Ok(Strided {
            values,
            bf16,
            offset: layout.start_offset(),
            strides: [sb, sc, st],
            dims: [b, c, t],
        })
    }

    fn at(&self, b: usize, c: usize, t: usize) -> f32 {
        let [sb, sc, st] = self.strides;
        self.values[self.offset + b * sb + c * sc + t * st]
    }

    /// A per-channel vector's values, checked to be `[channels]` of x's dtype.
    fn channel_vector(&self, t: &Tensor, what: &str) -> candle_core::Result<Vec<f32>> {
        let dtype = if self.bf16 { DType::BF16 } else { DType::F32 };
        weight(t, self.dims[1], dtype, what)
    }

    /// `f(b, c, t, x)` at every position, as a `[batch, channels, time]` tensor of x's dtype.
    fn map(&self, f: impl Fn(usize, usize, usize, f32) -> f32) -> (CpuStorage, Shape) {
        let [batch, channels, len] = self.dims;
        let mut out = Vec::with_capacity(batch * channels * len);
        for b in 0..batch {
            for c in 0..channels {
                out.extend((0..len).map(|t| f(b, c, t, self.at(b, c, t))));
            }
        }
        (
            cpu_storage(out, self.bf16),
            Shape::from((batch, channels, len)),
        )
    }
}

/// A weight's values as f32, checked to be `[len]` of `dtype`.
fn weight(t: &Tensor, len: usize, dtype: DType, what: &str) -> candle_core::Result<Vec<f32>> {
    if t.dims() != [len] || t.dtype() != dtype {
        candle_core::bail!(
            "{what} is {:?} {:?}, the activations need [{len}] {dtype:?}",
            t.dtype(),
            t.dims()
        );
    }
    t.to_dtype(DType::F32)?.to_vec1()
}

/// `1 / sqrt(mean(v²) + eps)` over `channels` values, as candle's sum, mean, add, sqrt and
/// recip compute it in f32.
fn inv_rms(channels: usize, eps: f32, v: impl Fn(usize) -> f32) -> f32 {
    let sum: f32 = (0..channels).map(|c| v(c) * v(c)).sum();
    let mean = sum * (1.0 / channels as f64) as f32;
    (mean + eps).sqrt().recip()
}

impl DepthwiseMixer {
    /// Kernel size, and the dims of `x` checked against the weights and the `cache` layout.
    pub(crate) fn check(
        &self,
        dtype: DType,
        x: &Layout,
        cache: Option<&Layout>,
    ) -> candle_core::Result<(usize, [usize; 3])> {
        let &[b, c, t] = x.dims() else {
            candle_core::bail!("depthwise mixer: x {:?} is not [B, C, T]", x.dims());
        };
        let k = self.taps.dim(1)?;
        let ctx = k.saturating_sub(1);
        if self.taps.dims() != [c, k] || self.taps.dtype() != DType::F32 || k == 0 {
            candle_core::bail!(
                "depthwise mixer: taps {:?} {:?} for {c} channels",
                self.taps.dtype(),
                self.taps.dims()
            );
        }
        if !matches!(dtype, DType::F32 | DType::BF16)
            || [&self.norm, &self.bias, &self.gamma]
                .iter()
                .any(|w| w.dims() != [c] || w.dtype() != dtype)
        {
            candle_core::bail!("depthwise mixer: {dtype:?} x needs [{c}] weights of its dtype");
        }
        if let Some(cache) = cache.filter(|l| l.dims() != [b, c, ctx]) {
            candle_core::bail!(
                "depthwise mixer: cache {:?} for x {:?}",
                cache.dims(),
                x.dims()
            );
        }
        Ok((k, [b, c, t]))
    }

    fn cpu(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        cache: Option<(&CpuStorage, &Layout)>,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let xs = Strided::new(x, lx, "depthwise mixer: x")?;
        let dtype = if xs.bf16 { DType::BF16 } else { DType::F32 };
        let (k, [batch, channels, len]) = self.check(dtype, lx, cache.map(|(_, l)| l))?;
        let cache = cache
            .map(|(s, l)| Strided::new(s, l, "depthwise mixer: cache"))
            .transpose()?;
        let ctx = k - 1;
        let norm = xs.channel_vector(&self.norm, "the norm weight")?;
        let bias = xs.channel_vector(&self.bias, "the bias")?;
        let gamma = xs.channel_vector(&self.gamma, "gamma")?;
        let taps: Vec<f32> = self.taps.flatten_all()?.to_vec1()?;
        let bf16 = xs.bf16;
        let out_len = len + if self.stream { ctx } else { 0 };
        let mut out = Vec::with_capacity(batch * channels * out_len);
        for b in 0..batch {
            // The cache-extended input: `ctx` cached (or zero) columns, then x.
            let ext = |c: usize, e: usize| match (e < ctx, &cache) {
                (true, Some(cache)) => cache.at(b, c, e),
                (true, None) => 0.0,
                (false, _) => xs.at(b, c, e - ctx),
            };
            let inv: Vec<f32> = (0..ctx + len)
                .map(|e| inv_rms(channels, self.eps, |c| ext(c, e)))
                .collect();
            for c in 0..channels {
                let h = |e: usize| round(round(ext(c, e) * inv[e], bf16) * norm[c], bf16);
                for t in 0..len {
                    let acc = (1..k).fold(h(t) * taps[c * k], |acc, j| {
                        acc + h(t + j) * taps[c * k + j]
                    });
                    let y = round(round(round(acc, bf16) + bias[c], bf16) * gamma[c], bf16);
                    out.push(ext(c, t + ctx) + y);
                }
                out.extend((len..out_len).map(|e| ext(c, e)));
            }
        }
        Ok((
            cpu_storage(out, bf16),
            Shape::from((batch, channels, out_len)),
        ))
    }
}

impl CustomOp1 for DepthwiseMixer {
    fn name(&self) -> &'static str {
        "vibeoffload-depthwise-mixer"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu(x, lx, None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::engine::cuda::depthwise_mixer(self, x, lx, None)
    }
}

impl CustomOp2 for DepthwiseMixer {
    fn name(&self) -> &'static str {
        "vibeoffload-depthwise-mixer-cached"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        cache: &CpuStorage,
        lc: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu(x, lx, Some((cache, lc)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        cache: &candle_core::CudaStorage,
        lc: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::engine::cuda::depthwise_mixer(self, x, lx, Some((cache, lc)))
    }
}

impl CustomOp1 for ChannelNorm {
    fn name(&self) -> &'static str {
        "vibeoffload-channel-norm"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let xs = Strided::new(x, lx, "channel norm: x")?;
        let (bf16, [batch, channels, len]) = (xs.bf16, xs.dims);
        let w = xs.channel_vector(&self.weight, "the norm weight")?;
        let mut out = Vec::with_capacity(batch * len * channels);
        for b in 0..batch {
            for t in 0..len {
                let inv = inv_rms(channels, self.eps, |c| xs.at(b, c, t));
                out.extend((0..channels).map(|c| round(xs.at(b, c, t) * inv, bf16) * w[c]));
            }
        }
        Ok((cpu_storage(out, bf16), Shape::from((batch, len, channels))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::engine::cuda::channel_norm(self, x, lx)
    }
}

impl CustomOp2 for ChannelResidual {
    fn name(&self) -> &'static str {
        "vibeoffload-channel-residual"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        h: &CpuStorage,
        lh: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let xs = Strided::new(x, lx, "channel residual: x")?;
        let (bf16, [batch, channels, len]) = (xs.bf16, xs.dims);
        let gamma = xs.channel_vector(&self.gamma, "gamma")?;
        let (hv, h_bf16) = cpu_activations(h)?;
        let Some((start, _)) = lh.contiguous_offsets().filter(|_| h_bf16 == bf16) else {
            candle_core::bail!("channel residual: h must be contiguous, of x's dtype");
        };
        if lh.dims() != [batch, len, channels] {
            candle_core::bail!("channel residual: h {:?} for x {:?}", lh.dims(), xs.dims);
        }
        Ok(xs.map(|b, c, t, x| {
            let h = hv[start + (b * len + t) * channels + c];
            x + round(h * gamma[c], bf16)
        }))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        h: &candle_core::CudaStorage,
        lh: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::engine::cuda::channel_residual(self, x, lx, h, lh)
    }
}

/// `x + bias` along the channels of `x` `[B, C, T]` (any strides): one launch where candle's
/// broadcast add reads strided operands element by element.
pub(crate) fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let op = ChannelBias { bias: bias.clone() };
    Ok(x.apply_op1_no_bwd(&op)?)
}

impl CustomOp1 for ChannelBias {
    fn name(&self) -> &'static str {
        "vibeoffload-channel-bias"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let xs = Strided::new(x, lx, "channel bias: x")?;
        let bias = xs.channel_vector(&self.bias, "the bias")?;
        Ok(xs.map(|_, c, _, x| x + bias[c]))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::engine::cuda::channel_bias(self, x, lx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;
    use crate::speech::nn::rms_norm;
    use candle_core::Device;

    const EPS: f64 = 1e-5;

    fn random(seed: u64, shape: &[usize], dtype: DType) -> Tensor {
        let n = shape.iter().product();
        let values = Rng::new(seed).normals(n);
        Tensor::from_vec(values, shape, &Device::Cpu)
            .and_then(|t| t.to_dtype(dtype))
            .unwrap()
    }

    /// max |a - b| / max |b|.
    fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims());
        let f = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let diff = (f(a) - f(b)).unwrap().abs().unwrap().max_all().unwrap();
        let scale = f(b).abs().unwrap().max_all().unwrap();
        diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap()
    }

    /// A mixer over `channels` with random weights in `dtype`.
    fn mixer(channels: usize, dtype: DType) -> DepthwiseMixer {
        DepthwiseMixer {
            norm: random(11, &[channels], dtype),
            eps: EPS as f32,
            taps: random(12, &[channels, 7], dtype)
                .to_dtype(DType::F32)
                .unwrap(),
            bias: random(13, &[channels], dtype),
            gamma: random(14, &[channels], dtype),
            stream: false,
        }
    }

    /// `[B, C, T]` as the transpose of a `[B, T, C]` tensor: strided, as the ops must take.
    fn strided_input(seed: u64, (b, c, t): (usize, usize, usize), dtype: DType) -> Tensor {
        random(seed, &[b, t, c], dtype).transpose(1, 2).unwrap()
    }

    /// The block's first half as the unfused ops compute it (whole signal).
    fn unfused_mixer(op: &DepthwiseMixer, x: &Tensor) -> Tensor {
        let (channels, k) = op.taps.dims2().unwrap();
        let column = |t: &Tensor| t.reshape((1, channels, 1)).unwrap();
        let h = rms_norm(&x.transpose(1, 2).unwrap(), Some(&op.norm), EPS).unwrap();
        let conv = h
            .transpose(1, 2)
            .unwrap()
            .pad_with_zeros(2, k - 1, 0)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .conv1d(
                &op.taps.reshape((channels, 1, k)).unwrap(),
                0,
                1,
                1,
                channels,
            )
            .unwrap()
            .to_dtype(x.dtype())
            .unwrap();
        let scaled = conv
            .broadcast_add(&column(&op.bias))
            .unwrap()
            .broadcast_mul(&column(&op.gamma))
            .unwrap();
        (x + scaled).unwrap()
    }

    /// f32 agrees up to summation order; bf16 up to a rounding flip of an intermediate.
    fn bound(dtype: DType) -> f32 {
        match dtype {
            DType::F32 => 1e-6,
            _ => 1e-2,
        }
    }

    #[test]
    fn the_mixer_matches_the_unfused_ops() {
        for dtype in [DType::F32, DType::BF16] {
            let op = mixer(13, dtype);
            let x = strided_input(1, (2, 13, 11), dtype);
            let fused = mix(&op, &x, None).unwrap();
            let err = rel_err(&fused, &unfused_mixer(&op, &x));
            assert!(err <= bound(dtype), "{dtype:?}: rel err {err}");
        }
    }

    /// Chunks shorter and longer than the cache, from a fresh slot, give the whole-signal
    /// result exactly (each output is computed alike).
    #[test]
    fn the_streamed_mixer_equals_the_whole_signal() {
        for dtype in [DType::F32, DType::BF16] {
            let op = mixer(13, dtype);
            let x = strided_input(2, (2, 13, 17), dtype);
            let whole = mix(&op, &x, None).unwrap();
            let mut slot = None;
            let mut at = 0;
            let chunks: Vec<Tensor> = [1, 4, 2, 7, 3]
                .iter()
                .map(|&n| {
                    let chunk = x.narrow(2, at, n).unwrap();
                    at += n;
                    mix(&op, &chunk, Some(&mut slot)).unwrap()
                })
                .collect();
            let streamed = Tensor::cat(&chunks, 2).unwrap();
            let f = |t: &Tensor| {
                let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                t.to_vec1::<f32>().unwrap()
            };
            assert_eq!(f(&streamed), f(&whole), "{dtype:?}");
            assert_eq!(slot.unwrap().dims(), [2, 13, 6]);
        }
    }

    #[test]
    fn the_channel_norm_matches_rms_norm_of_the_transpose() {
        for dtype in [DType::F32, DType::BF16] {
            let op = ChannelNorm {
                weight: random(3, &[19], dtype),
                eps: EPS as f32,
            };
            let x = strided_input(4, (3, 19, 5), dtype);
            let fused = x.apply_op1_no_bwd(&op).unwrap();
            let want = rms_norm(&x.transpose(1, 2).unwrap(), Some(&op.weight), EPS).unwrap();
            let err = rel_err(&fused, &want);
            assert!(err <= bound(dtype), "{dtype:?}: rel err {err}");
        }
    }

    #[test]
    fn the_channel_bias_equals_candles_broadcast_add() {
        for dtype in [DType::F32, DType::BF16] {
            let x = strided_input(7, (2, 5, 9), dtype);
            let bias = random(8, &[5], dtype);
            let want = x.broadcast_add(&bias.reshape((1, 5, 1)).unwrap()).unwrap();
            let got = add_bias(&x, &bias).unwrap();
            let bits = |t: &Tensor| {
                t.to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            assert_eq!(bits(&got), bits(&want), "{dtype:?}");
        }
    }

    #[test]
    fn the_channel_residual_matches_the_formula() {
        for dtype in [DType::F32, DType::BF16] {
            let op = ChannelResidual {
                gamma: random(5, &[7], dtype),
            };
            let x = strided_input(6, (2, 7, 9), dtype);
            let h = random(7, &[2, 9, 7], dtype);
            let fused = x.apply_op2_no_bwd(&h, &op).unwrap();
            let gamma = op.gamma.reshape((1, 7, 1)).unwrap();
            let want = (&x + h.transpose(1, 2).unwrap().broadcast_mul(&gamma).unwrap()).unwrap();
            assert_eq!(rel_err(&fused, &want), 0.0, "{dtype:?}");
        }
    }
}
