//! The small layers every speech component shares: a linear layer loaded by name and the
//! original's RMSNorm, which normalises in f32 and casts back before the affine weight.

use super::fused::add_bias;
use super::weights::Scope;
use crate::engine::dequant::dequantize;
use crate::engine::{model, weights};
use crate::plan::memory::GEMM_MIN_WEIGHT;
use anyhow::{Context, Result};
use candle_core::{DType, Module, Tensor, D};

/// A linear layer: a decoded weight (candle's layer), or a float8 weight kept as stored and
/// decoded at use by the engine's kernels (the fused matrix-vector product for a few rows).
pub(crate) enum Linear {
    Dense(candle_nn::Linear),
    Stored {
        weight: weights::Linear,
        bias: Option<Tensor>,
        /// The weight decoded once at load ([`Linear::decoded_if_small`]), for the products
        /// the fused path does not take; `None`: decoded at each of them.
        decoded: Option<Tensor>,
    },
}

impl Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Dense(l) => Ok(l.forward(x)?),
            Linear::Stored {
                weight,
                bias,
                decoded,
            } => {
                // The fused product takes the bias itself.
                if let Some(y) = fused_around(x, &[self], false, model::Around::default())? {
                    return Ok(y);
                }
                // The ops model::linear runs on the weight it decodes: the same bits.
                let y = match decoded.as_ref().filter(|w| w.dtype() == x.dtype()) {
                    Some(w) => x.broadcast_matmul(&w.t()?)?,
                    None => model::linear(x, weight, None, true)?,
                };
                let Some(bias) = bias else { return Ok(y) };
                // Rows of [rows, out] as [rows, out, 1]: the bias along the second dimension.
                let dims = y.dims().to_vec();
                let rows = [y.elem_count() / y.dim(D::Minus1)?, y.dim(D::Minus1)?, 1];
                Ok(add_bias(&y.reshape(rows.as_slice())?, bias)?.reshape(dims)?)
            }
        }
    }

    /// This layer with a float8 weight below [`GEMM_MIN_WEIGHT`] elements also decoded to
    /// `dtype` once, now: the tokenizers' shallow feed-forward layers, which run on many steps
    /// (beyond the fused matrix-vector product) and would otherwise decode their weights at
    /// every frame (60 of the 62 decodes a frame on the 7B). The VRAM plan counts the copies
    /// (`plan::memory::decoded_tokenizer_bytes`).
    pub(crate) fn decoded_if_small(self, dtype: DType) -> Result<Linear> {
        Ok(match self {
            Linear::Stored {
                weight,
                bias,
                decoded: None,
            } if (weight.weight.shape.iter().product::<usize>() as u64) < GEMM_MIN_WEIGHT => {
                let w = dequantize(&weight.weight, weight.scale.as_ref(), dtype)?;
                Linear::Stored {
                    weight,
                    bias,
                    decoded: Some(w),
                }
            }
            other => other,
        })
    }
}

/// The linear layer `scope` (`weight [out, in]`, and `bias [out]` when `bias`).
pub(crate) fn linear(scope: &Scope, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    let bias = if bias {
        Some(scope.get("bias", &[out_dim])?)
    } else {
        None
    };
    Ok(match scope.stored_linear("weight", &[out_dim, in_dim])? {
        Some(weight) => Linear::Stored {
            weight,
            bias,
            decoded: None,
        },
        None => Linear::Dense(candle_nn::Linear::new(
            scope.get("weight", &[out_dim, in_dim])?,
            bias,
        )),
    })
}

/// Applies `layer` (`owner.what`, named on failure) to `x`.
pub(crate) fn apply(layer: &Linear, x: &Tensor, owner: &str, what: &str) -> Result<Tensor> {
    layer
        .forward(x)
        .with_context(|| format!("applying {owner}.{what} to {:?}", x.dims()))
}

/// `silu(gate(x)) ⊙ up(x)`: one fused launch where both are float8 without bias and the fused
/// path takes them (the product rounded once, in f32), else three candle ops.
pub(crate) fn swiglu(
    gate: &Linear,
    up: &Linear,
    x: &Tensor,
    owner: &str,
    what: (&str, &str),
) -> Result<Tensor> {
    if let (
        Linear::Stored {
            weight: g,
            bias: None,
            ..
        },
        Linear::Stored {
            weight: u,
            bias: None,
            ..
        },
    ) = (gate, up)
    {
        let fused = model::swiglu(x, g, u, true).with_context(|| {
            format!(
                "applying {owner}.{} and {} to {:?}",
                what.0,
                what.1,
                x.dims()
            )
        })?;
        if let Some(out) = fused {
            return Ok(out);
        }
    }
    let g = apply(gate, x, owner, what.0)?.silu()?;
    Ok((g * apply(up, x, owner, what.1)?)?)
}

/// `layers` (float8: one, or gate and up without bias when `gated`) with the work `around`
/// fused into one launch (a layer's bias included) where the fused path takes them; `None`
/// otherwise.
pub(crate) fn fused_around(
    x: &Tensor,
    layers: &[&Linear],
    gated: bool,
    around: model::Around<'_>,
) -> Result<Option<Tensor>> {
    if layers.len() != if gated { 2 } else { 1 } {
        return Ok(None);
    }
    let (mut stored, mut bias) = (Vec::with_capacity(layers.len()), None);
    for layer in layers {
        match layer {
            Linear::Stored {
                weight, bias: b, ..
            } if b.is_none() || !gated => {
                stored.push(weight);
                bias = b.as_ref();
            }
            _ => return Ok(None),
        }
    }
    let around = model::Around { bias, ..around };
    model::fused_around(x, &stored, gated, true, around)
        .with_context(|| format!("applying a fused product to {:?}", x.dims()))
}

/// RMSNorm over the last dimension as the original computes it: `x * rsqrt(mean(x²) + eps)`
/// in f32, cast back to `x`'s dtype, then times `weight` (when the norm has one).
pub(crate) fn rms_norm(x: &Tensor, weight: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let inv = (x32.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let normed = x32.broadcast_mul(&inv)?.to_dtype(dtype)?;
    Ok(match weight {
        Some(w) => normed.broadcast_mul(w)?,
        None => normed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rms_norm_matches_the_formula() {
        let x = Tensor::new(&[[3.0f32, 4.0], [1.0, -1.0]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[2.0f32, 0.5], &Device::Cpu).unwrap();
        let y = rms_norm(&x, Some(&w), 0.0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let r = (12.5f32).sqrt();
        assert!((y[0][0] - 2.0 * 3.0 / r).abs() < 1e-6);
        assert!((y[0][1] - 0.5 * 4.0 / r).abs() < 1e-6);
        assert!((y[1][0] - 2.0).abs() < 1e-6 && (y[1][1] + 0.5).abs() < 1e-6);
    }
}
