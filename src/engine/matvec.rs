//! The decode path: `y = x W^T` for a float8 `W` and a few rows of `x`, reading each weight
//! byte once instead of first writing a bf16 copy of `W`. Decoding one token is bound by
//! reading the weights, so this is where its time goes.

use super::dequant::RawTensor;
use crate::dtype::{f8e4m3_to_f32, DType as Stored};
use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, D};

/// Most rows of `x` the fused path takes; more rows (prefill) decode `W` once and multiply.
pub const MATVEC_MAX_ROWS: usize = 8;

/// `x [rows, in] @ W^T` with `W` as float8 bytes `[out, in]`, times a scale that is one value
/// or one per output row.
#[derive(Clone, Debug)]
pub struct F8MatVec {
    /// Output features (rows of `W`).
    pub out_features: usize,
    /// Input features.
    pub in_features: usize,
}

impl F8MatVec {
    fn cpu(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        scale: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (xs, bf16) = match x {
            CpuStorage::F32(v) => (v.as_slice().to_vec(), false),
            CpuStorage::BF16(v) => (v.iter().map(|b| b.to_f32()).collect(), true),
            _ => candle_core::bail!("f8 matvec: x must be f32 or bf16"),
        };
        let (Some((xa, xb)), Some((wa, wb))) = (lx.contiguous_offsets(), lw.contiguous_offsets())
        else {
            candle_core::bail!("f8 matvec: inputs must be contiguous");
        };
        let CpuStorage::U8(wbytes) = w else {
            candle_core::bail!("f8 matvec: weights must be U8 bytes");
        };
        let (xs, w) = (&xs[xa..xb], &wbytes[wa..wb]);
        let (n_in, n_out) = (self.in_features, self.out_features);
        let rows = xs.len() / n_in;
        let lut: Vec<f32> = (0..=255u8).map(f8e4m3_to_f32).collect();
        let mut y = vec![0f32; rows * n_out];
        for r in 0..rows {
            let xr = &xs[r * n_in..(r + 1) * n_in];
            for o in 0..n_out {
                let wr = &w[o * n_in..(o + 1) * n_in];
                let acc: f32 = wr.iter().zip(xr).map(|(&c, &v)| lut[c as usize] * v).sum();
                let s = match scale {
                    Some(s) if s.len() == 1 => s[0],
                    Some(s) => s[o],
                    None => 1.0,
                };
                y[r * n_out + o] = acc * s;
            }
        }
        let out = if bf16 {
            CpuStorage::BF16(y.into_iter().map(half::bf16::from_f32).collect())
        } else {
            CpuStorage::F32(y)
        };
        Ok((out, Shape::from((rows, n_out))))
    }
}

impl CustomOp2 for F8MatVec {
    fn name(&self) -> &'static str {
        "vibeoffload-f8-matvec"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.cpu(x, lx, w, lw, None)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::f8_matvec(self, x, lx, w, lw, None)
    }
}

impl CustomOp3 for F8MatVec {
    fn name(&self) -> &'static str {
        "vibeoffload-f8-matvec-scaled"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
        s: &CpuStorage,
        ls: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (CpuStorage::F32(scale), Some((a, b))) = (s, ls.contiguous_offsets()) else {
            candle_core::bail!("f8 matvec: scales must be contiguous f32");
        };
        self.cpu(x, lx, w, lw, Some(&scale[a..b]))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
        s: &candle_core::CudaStorage,
        ls: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::f8_matvec(self, x, lx, w, lw, Some((s, ls)))
    }
}

/// Whether `x @ w^T` takes the fused path: float8 weights, a scale that is none, one value or
/// one per output row, and at most [`MATVEC_MAX_ROWS`] rows.
pub fn applies(x: &Tensor, w: &RawTensor, scale: Option<&RawTensor>) -> Result<bool> {
    let rows = x.elem_count() / x.dim(D::Minus1)?;
    let simple_scale = scale.is_none_or(|s| {
        let n: usize = s.shape.iter().product();
        n == 1 || n == w.shape[0]
    });
    Ok(w.dtype == Stored::F8E4M3 && w.shape.len() == 2 && rows <= MATVEC_MAX_ROWS && simple_scale)
}

/// `x @ w^T` (times the decoded `scale`) by the fused path; `x` is `[..., in]`.
pub fn linear(x: &Tensor, w: &RawTensor, scale: Option<&Tensor>) -> Result<Tensor> {
    let (n_out, n_in) = (w.shape[0], w.shape[1]);
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("x has a last dimension") = n_out;
    let x2 = x.reshape(((), n_in))?.contiguous()?;
    let op = F8MatVec {
        out_features: n_out,
        in_features: n_in,
    };
    let y = match scale {
        None => x2.apply_op2_no_bwd(&w.bytes, &op)?,
        Some(s) => x2.apply_op3_no_bwd(&w.bytes, &s.flatten_all()?.contiguous()?, &op)?,
    };
    y.reshape(out_dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::dequant::dequantize;
    use candle_core::Device;

    #[test]
    fn matches_dequantize_then_matmul() {
        let (n_out, n_in) = (24, 64);
        let codes: Vec<u8> = (0..n_out * n_in)
            .map(|i| ((i * 37 + 11) % 255) as u8 & 0xf7)
            .collect();
        let w = RawTensor {
            dtype: Stored::F8E4M3,
            shape: vec![n_out, n_in],
            bytes: Tensor::from_vec(codes, n_out * n_in, &Device::Cpu).unwrap(),
        };
        let x = Tensor::arange(0f32, (3 * n_in) as f32, &Device::Cpu)
            .unwrap()
            .affine(0.001, -0.05)
            .unwrap()
            .reshape((1, 3, n_in))
            .unwrap();
        let scale = Tensor::arange(1f32, (n_out + 1) as f32, &Device::Cpu).unwrap();
        for s in [None, Some(&scale)] {
            let fused = linear(&x, &w, s).unwrap();
            let mut full = dequantize(&w, None, candle_core::DType::F32).unwrap();
            if let Some(s) = s {
                full = full.broadcast_mul(&s.reshape((n_out, 1)).unwrap()).unwrap();
            }
            let reference = x.broadcast_matmul(&full.t().unwrap()).unwrap();
            assert_eq!(fused.dims(), [1, 3, n_out]);
            let diff = (fused - reference)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-3, "max difference {diff}");
        }
    }
}
