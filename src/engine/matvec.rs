//! The fused float8 products: `y = x W^T` for float8 `W`, reading each weight byte as stored
//! instead of first writing a bf16 copy of `W`, with the work around it fused in: several
//! weights side by side (q, k, v), a bias, a residual to add, or the MLP's `silu(gate) * up`.
//! A few rows of `x` (decoding, bound by reading weights and by the number of launches) take
//! the matrix-vector kernel, on the CPU or the GPU; more (prefill) take the GPU's matrix
//! product. This is the CPU reference and the candle glue; the kernels are under `cuda`.

use super::dequant::{cpu_activations, cpu_storage, RawTensor};
use super::f8dot::{matvec, Product};
use super::ops::{FusedMatVec, MATVEC_MAX_ROWS};
use crate::dtype::{f8e4m3_to_f32, DType as Stored};
use crate::plan::memory;
use candle_core::cpu::erf::{erf_f32, erf_f64};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};

/// A CPU tensor's values as f32 (f32, bf16) and whether it was bf16.
fn cpu_f32(t: &Tensor) -> Result<Vec<f32>> {
    let t = t.flatten_all()?;
    match t.dtype() {
        candle_core::DType::F32 => t.to_vec1::<f32>(),
        _ => t.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>(),
    }
}

/// GELU (erf) in f64, as candle computes it for bf16.
fn gelu_f64(v: f64) -> f64 {
    (erf_f64(v * std::f64::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * v
}

impl CustomOp1 for FusedMatVec {
    fn name(&self) -> &'static str {
        "vibeoffload-fused-f8-matvec"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        let Some((xa, xb)) = lx.contiguous_offsets() else {
            candle_core::bail!("f8 matvec: x must be contiguous");
        };
        let (all, bf16) = cpu_activations(x)?;
        let n_in = self.in_features;
        let mut xs = all[xa..xb].to_vec();
        let rows = xs.len() / n_in;
        // A value as the activation dtype stores it.
        let round = |v: f32| match bf16 {
            true => half::bf16::from_f32(v).to_f32(),
            false => v,
        };
        if let Some((weight, eps)) = &self.norm {
            let w = cpu_f32(weight)?;
            for row in xs.chunks_mut(n_in) {
                let mean = row.iter().map(|v| v * v).sum::<f32>() / n_in as f32;
                let inv = 1.0 / (mean + eps).sqrt();
                for (v, w) in row.iter_mut().zip(&w) {
                    *v *= inv * w;
                }
            }
            if let Some((scale1, shift)) = &self.modulation {
                let (scale1, shift) = (cpu_f32(scale1)?, cpu_f32(shift)?);
                if scale1.len() != xs.len() || shift.len() != xs.len() {
                    candle_core::bail!("f8 matvec: the modulation must be [rows, in]");
                }
                for ((v, s), h) in xs.iter_mut().zip(&scale1).zip(&shift) {
                    *v = round(round(round(*v) * s) + h);
                }
            }
        }
        let lut: [f32; 256] = std::array::from_fn(|c| f8e4m3_to_f32(c as u8));
        // Each segment's products, [segment rows, rows] (feature-major), all in one parallel
        // pass over the output features, each weight row read in place (no copy of the
        // weight) for every row of x; then transposed to [rows, segment rows].
        let storages: Vec<_> = self
            .segments
            .iter()
            .map(|s| s.bytes.storage_and_layout())
            .collect();
        let scales = self
            .segments
            .iter()
            .map(|s| s.scale.as_ref().map(cpu_f32).transpose())
            .collect::<Result<Vec<_>>>()?;
        let mut ys: Vec<Vec<f32>> = self
            .segments
            .iter()
            .map(|s| vec![0f32; s.rows * rows])
            .collect();
        let mut products = Vec::with_capacity(self.segments.len());
        for (((seg, (storage, layout)), scale), y) in self
            .segments
            .iter()
            .zip(&storages)
            .zip(&scales)
            .zip(&mut ys)
        {
            let candle_core::Storage::Cpu(CpuStorage::U8(bytes)) = &**storage else {
                candle_core::bail!("f8 matvec: the weight must be raw bytes on the CPU");
            };
            let Some((wa, wb)) = layout.contiguous_offsets() else {
                candle_core::bail!("f8 matvec: the weight must be contiguous");
            };
            let w = &bytes[wa..wb];
            if w.len() != seg.rows * n_in {
                candle_core::bail!(
                    "f8 matvec: a weight of {} bytes for [{}, {n_in}]",
                    w.len(),
                    seg.rows
                );
            }
            let scale = scale.as_deref();
            if scale.is_some_and(|s| s.len() != 1 && s.len() != seg.rows) {
                candle_core::bail!("f8 matvec: a scale must be one value or one per row");
            }
            products.push(Product { w, scale, y });
        }
        let x_rows: Vec<&[f32]> = xs.chunks(n_in).collect();
        // Gated, the pass leaves silu(gate) * up in the first product.
        matvec(&mut products, &x_rows, &lut, self.gated);
        drop(products);
        // Each product as [rows, segment rows]: `ys` is feature-major, which for one row (a
        // decode step, and every host layer's product at batch 1) is that order already (the
        // index arithmetic of the transposition took ~0.1 ms of a 7B layer).
        let parts: Vec<Vec<f32>> = match rows {
            1 => ys,
            _ => self
                .segments
                .iter()
                .zip(&ys)
                .map(|(seg, y)| {
                    (0..rows * seg.rows)
                        .map(|i| y[(i % seg.rows) * rows + i / seg.rows])
                        .collect()
                })
                .collect(),
        };
        let n_out = self.out_features();
        let mut out = vec![0f32; rows * n_out];
        if self.gated {
            out.copy_from_slice(&parts[0]);
        } else {
            let mut col = 0;
            for (seg, part) in self.segments.iter().zip(&parts) {
                for r in 0..rows {
                    out[r * n_out + col..r * n_out + col + seg.rows]
                        .copy_from_slice(&part[r * seg.rows..(r + 1) * seg.rows]);
                }
                col += seg.rows;
            }
        }
        if let Some(b) = &self.bias {
            let b = cpu_f32(b)?;
            for (i, o) in out.iter_mut().enumerate() {
                *o += b[i % n_out];
            }
        }
        if self.gelu {
            // candle's gelu_erf on the stored value (in f64 for bf16, f32 for f32).
            for o in out.iter_mut() {
                let v = round(*o);
                *o = match bf16 {
                    true => half::bf16::from_f64(gelu_f64(v as f64)).to_f32(),
                    false => (erf_f32(v * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * v,
                };
            }
        }
        if let Some(gate) = &self.gate {
            let gate = cpu_f32(gate)?;
            if gate.len() != out.len() {
                candle_core::bail!("f8 matvec: the gate must be [rows, outputs]");
            }
            for (o, g) in out.iter_mut().zip(gate) {
                *o = round(round(*o) * g);
            }
        }
        if let Some(res) = &self.residual {
            for (o, r) in out.iter_mut().zip(cpu_f32(res)?) {
                *o += r;
            }
        }
        let storage = cpu_storage(out, bf16);
        Ok((storage, Shape::from((rows, n_out))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::fused_matvec(self, x, lx)
    }
}

/// Whether `x @ w^T` takes the fused path: float8 weights and a scale that is none, one value
/// or one per output row; on the CPU at most [`MATVEC_MAX_ROWS`] rows of `x`; on the GPU, with
/// tensor cores (sm_80 or newer) and a weight of whole tiles ([`super::ops::TILE_ROWS`] x
/// [`super::ops::TILE_INPUTS`]), any number, more rows taking the matrix product where the
/// weight has at least [`memory::GEMM_MIN_WEIGHT`] elements.
pub fn applies(x: &Tensor, w: &RawTensor, scale: Option<&RawTensor>) -> Result<bool> {
    takes(x, w, scale, memory::GEMM_MIN_WEIGHT)
}

/// [`applies`] for a decoder layer's projections, which take the matrix product whatever
/// their size: the fused layer (q/k/v in one launch, the norms and residuals inside) saves
/// more than a small weight's decoded copy would.
pub fn applies_in_layer(x: &Tensor, w: &RawTensor, scale: Option<&RawTensor>) -> Result<bool> {
    takes(x, w, scale, 0)
}

/// [`applies`] with the matrix product taking weights of at least `min_weight` elements.
fn takes(x: &Tensor, w: &RawTensor, scale: Option<&RawTensor>, min_weight: u64) -> Result<bool> {
    let rows = x.elem_count() / x.dim(D::Minus1)?;
    let simple_scale = scale.is_none_or(|s| {
        let n: usize = s.shape.iter().product();
        n == 1 || n == w.shape[0]
    });
    let fits = w.dtype == Stored::F8E4M3 && w.shape.len() == 2 && simple_scale;
    Ok(fits && device_takes(x.device(), &w.shape, rows, min_weight))
}

/// Whether `device` runs the fused kernels for a weight of `shape` (`[out, in]`) and `rows`
/// rows of x, the matrix product taking weights of at least `min_weight` elements.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn device_takes(
    device: &candle_core::Device,
    shape: &[usize],
    rows: usize,
    min_weight: u64,
) -> bool {
    match device {
        #[cfg(feature = "cuda")]
        candle_core::Device::Cuda(d) => {
            super::cuda::has_mma(d)
                && shape[0].is_multiple_of(super::ops::TILE_ROWS)
                && shape[1].is_multiple_of(super::ops::TILE_INPUTS)
                && (rows <= MATVEC_MAX_ROWS || (shape[0] * shape[1]) as u64 >= min_weight)
        }
        _ => rows <= MATVEC_MAX_ROWS,
    }
}

/// Runs `op` on `x` (`[..., in]`); the result has `x`'s leading dimensions.
pub fn apply(x: &Tensor, op: &FusedMatVec) -> Result<Tensor> {
    let mut out_dims = x.dims().to_vec();
    *out_dims.last_mut().expect("x has a last dimension") = op.out_features();
    let mut x2 = x.reshape(((), op.in_features))?.contiguous()?;
    // The GPU kernel reads x 16 bytes at a time.
    if !x2.layout().start_offset().is_multiple_of(8) {
        x2 = x2.copy()?;
    }
    x2.apply_op1_no_bwd(op)?.reshape(out_dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::dequant::dequantize;
    use crate::engine::ops::Segment;
    use candle_core::Device;

    fn weight(n_out: usize, n_in: usize, salt: usize) -> RawTensor {
        let codes: Vec<u8> = (0..n_out * n_in)
            .map(|i| ((i * 37 + salt) % 255) as u8 & 0xf7)
            .collect();
        RawTensor {
            dtype: Stored::F8E4M3,
            shape: vec![n_out, n_in],
            bytes: Tensor::from_vec(codes, n_out * n_in, &Device::Cpu).unwrap(),
        }
    }

    fn dense(w: &RawTensor) -> Tensor {
        dequantize(w, None, candle_core::DType::F32).unwrap()
    }

    /// `w` alone, unscaled.
    fn single(w: &RawTensor) -> Vec<Segment> {
        vec![Segment {
            bytes: w.bytes.clone(),
            rows: w.shape[0],
            scale: None,
        }]
    }

    /// `[rows, n]` of `i * step + start` (f32).
    fn ramp_rows(rows: usize, n: usize, step: f64, start: f64) -> Tensor {
        Tensor::arange(0f32, (rows * n) as f32, &Device::Cpu)
            .unwrap()
            .affine(step, start)
            .unwrap()
            .reshape((rows, n))
            .unwrap()
    }

    /// Largest |a - b| / (1 + |b|): the float8 test weights reach 448, so products are large.
    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let rel = ((a - b).unwrap().abs().unwrap() / (b.abs().unwrap() + 1.0).unwrap()).unwrap();
        rel.flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn matches_dequantize_then_matmul() {
        let (n_out, n_in) = (24, 64);
        let w = weight(n_out, n_in, 11);
        let x = Tensor::arange(0f32, (3 * n_in) as f32, &Device::Cpu)
            .unwrap()
            .affine(0.001, -0.05)
            .unwrap()
            .reshape((1, 3, n_in))
            .unwrap();
        let scale = Tensor::arange(1f32, (n_out + 1) as f32, &Device::Cpu).unwrap();
        for s in [None, Some(&scale)] {
            let op = FusedMatVec::new(
                vec![Segment {
                    bytes: w.bytes.clone(),
                    rows: n_out,
                    scale: s.cloned(),
                }],
                n_in,
            );
            let fused = apply(&x, &op).unwrap();
            let mut full = dense(&w);
            if let Some(s) = s {
                full = full.broadcast_mul(&s.reshape((n_out, 1)).unwrap()).unwrap();
            }
            let reference = x.broadcast_matmul(&full.t().unwrap()).unwrap();
            assert_eq!(fused.dims(), [1, 3, n_out]);
            assert!(max_diff(&fused, &reference) < 1e-3);
        }
    }

    #[test]
    fn fuses_segments_bias_residual_and_the_gate() {
        let n_in = 32;
        let (a, b, c) = (weight(8, n_in, 1), weight(4, n_in, 2), weight(4, n_in, 3));
        let x = Tensor::arange(0f32, (2 * n_in) as f32, &Device::Cpu)
            .unwrap()
            .affine(0.01, -0.3)
            .unwrap()
            .reshape((2, n_in))
            .unwrap();
        let seg = |w: &RawTensor| Segment {
            bytes: w.bytes.clone(),
            rows: w.shape[0],
            scale: None,
        };
        let bias = Tensor::arange(0f32, 16f32, &Device::Cpu).unwrap();
        let residual = Tensor::ones((2, 16), candle_core::DType::F32, &Device::Cpu).unwrap();
        let op = FusedMatVec {
            bias: Some(bias.clone()),
            residual: Some(residual.clone()),
            ..FusedMatVec::new(vec![seg(&a), seg(&b), seg(&c)], n_in)
        };
        let mm = |w: &RawTensor| x.matmul(&dense(w).t().unwrap()).unwrap();
        let reference = Tensor::cat(&[mm(&a), mm(&b), mm(&c)], 1)
            .unwrap()
            .broadcast_add(&bias)
            .unwrap()
            .add(&residual)
            .unwrap();
        assert!(max_diff(&apply(&x, &op).unwrap(), &reference) < 1e-4);

        let (g, u) = (weight(8, n_in, 5), weight(8, n_in, 6));
        let gated = FusedMatVec {
            gated: true,
            ..FusedMatVec::new(vec![seg(&g), seg(&u)], n_in)
        };
        let reference = (candle_nn::ops::silu(&mm(&g)).unwrap() * mm(&u)).unwrap();
        assert!(max_diff(&apply(&x, &gated).unwrap(), &reference) < 1e-4);
    }

    #[test]
    fn normalises_rows_first_when_asked() {
        let (n_out, n_in) = (16, 64);
        let w = weight(n_out, n_in, 7);
        let x = ramp_rows(2, n_in, 0.05, -2.0);
        let norm = Tensor::arange(0f32, n_in as f32, &Device::Cpu)
            .unwrap()
            .affine(0.01, 0.5)
            .unwrap();
        let op = FusedMatVec {
            norm: Some((norm.clone(), 1e-6)),
            ..FusedMatVec::new(single(&w), n_in)
        };
        let normed = candle_nn::ops::rms_norm(&x, &norm, 1e-6).unwrap();
        let reference = normed.matmul(&dense(&w).t().unwrap()).unwrap();
        assert!(max_diff(&apply(&x, &op).unwrap(), &reference) < 1e-4);
    }

    #[test]
    fn modulates_and_gates_as_the_unfused_bf16_ops_round() {
        let (n_out, n_in, rows) = (16, 64, 2);
        let w = weight(n_out, n_in, 9);
        let bf16 = |t: Tensor| t.to_dtype(candle_core::DType::BF16).unwrap();
        let ramp = |n: usize, f: f64, o: f64| {
            bf16(
                Tensor::arange(0f32, n as f32, &Device::Cpu)
                    .unwrap()
                    .affine(f, o)
                    .unwrap(),
            )
        };
        let x = ramp(rows * n_in, 0.05, -2.0).reshape((rows, n_in)).unwrap();
        let norm = ramp(n_in, 0.01, 0.5);
        // shift, 1 + scale and gate side by side, as the diffusion head keeps them.
        let m = ramp(rows * 3 * n_in, 0.002, 0.4)
            .reshape((rows, 3 * n_in))
            .unwrap();
        let (shift, scale1) = (
            m.narrow(1, 0, n_in).unwrap(),
            m.narrow(1, n_in, n_in).unwrap(),
        );
        let gate = m.narrow(1, 2 * n_in, n_out).unwrap();
        let residual = ramp(rows * n_out, 0.3, -1.0)
            .reshape((rows, n_out))
            .unwrap();
        let op = FusedMatVec {
            norm: Some((norm.clone(), 1e-6)),
            modulation: Some((scale1.clone(), shift.clone())),
            gate: Some(gate.clone()),
            residual: Some(residual.clone()),
            ..FusedMatVec::new(single(&w), n_in)
        };
        let fused = apply(&x, &op).unwrap();
        // The norm as the fused path forms it (in f32, rounded once), then the unfused bf16
        // ops, each rounding; the product in f32.
        let f32 = |t: &Tensor| t.to_dtype(candle_core::DType::F32).unwrap();
        let sum = f32(&x).sqr().unwrap().sum_keepdim(1).unwrap();
        let inv = ((sum / n_in as f64).unwrap() + 1e-6)
            .unwrap()
            .sqrt()
            .unwrap()
            .recip()
            .unwrap();
        let normed = f32(&x)
            .broadcast_mul(&inv.broadcast_mul(&f32(&norm)).unwrap())
            .unwrap();
        let h = ((bf16(normed) * scale1).unwrap() + shift).unwrap();
        let y = bf16(f32(&h).matmul(&dense(&w).t().unwrap()).unwrap());
        let reference = (residual + (gate * y).unwrap()).unwrap();
        assert_eq!(fused.dtype(), candle_core::DType::BF16);
        let d = max_diff(&f32(&fused), &f32(&reference));
        assert!(d < 1e-3, "{d}");
    }

    #[test]
    fn applies_gelu_after_the_bias_as_candle_does() {
        let (n_out, n_in) = (16, 64);
        let w = weight(n_out, n_in, 4);
        let x = ramp_rows(2, n_in, 0.002, -0.1);
        for dtype in [candle_core::DType::F32, candle_core::DType::BF16] {
            let x = x.to_dtype(dtype).unwrap();
            let bias = Tensor::arange(0f32, n_out as f32, &Device::Cpu)
                .unwrap()
                .affine(0.5, -4.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let op = FusedMatVec {
                bias: Some(bias),
                ..FusedMatVec::new(single(&w), n_in)
            };
            let plain = apply(&x, &op).unwrap();
            let gelu = apply(&x, &FusedMatVec { gelu: true, ..op }).unwrap();
            let bits = |t: &Tensor| {
                t.to_dtype(candle_core::DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            };
            assert_eq!(bits(&gelu), bits(&plain.gelu_erf().unwrap()), "{dtype:?}");
        }
    }
}
