//! Weights kept as their checkpoint bytes (float8 stays float8 on the host and the device) and
//! decoded at use, with their scale, by an op of our own: candle 0.11's float8 CUDA kernels
//! cannot be loaded (candle issue #3886), so the bytes travel as U8 and this op turns them into
//! the compute dtype on the CPU or with an NVRTC-compiled kernel on CUDA.

use super::ops::{Dequantize, ScaleLayout};
use crate::dtype::{f8e4m3_to_f32, DType};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::borrow::Cow;

/// A tensor as stored in the checkpoint: its bytes in a U8 tensor on the compute device.
#[derive(Clone, Debug)]
pub struct RawTensor {
    /// Stored element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// The bytes: a contiguous 1-D U8 tensor (often a view into a streaming slot).
    pub bytes: Tensor,
}

impl Dequantize {
    fn rows_cols(&self) -> (usize, usize) {
        match self.shape.as_slice() {
            [] => (1, 1),
            [n] => (1, *n),
            [r, rest @ ..] => (*r, rest.iter().product()),
        }
    }

    fn decode_cpu(&self, bytes: &[u8], scale: Option<&[f32]>) -> Result<CpuStorage> {
        let n: usize = self.shape.iter().product();
        let size = self.src.size_bytes() as usize;
        if bytes.len() != n * size {
            candle_core::bail!(
                "dequantize: {} bytes for {} {:?}",
                bytes.len(),
                self.src,
                self.shape
            );
        }
        let lut: Vec<f32> = (0..=255u8).map(f8e4m3_to_f32).collect();
        let value = |i: usize| -> f32 {
            let b = &bytes[i * size..(i + 1) * size];
            match self.src {
                DType::F8E4M3 => lut[b[0] as usize],
                DType::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
                DType::F16 => half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32(),
                DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
                _ => f32::NAN,
            }
        };
        let (_, cols) = self.rows_cols();
        // In parallel: a host-computed layer's prefill decodes whole projections this way.
        let values = (0..n).into_par_iter().map(|i| match (self.scale, scale) {
            (Some(layout), Some(s)) => value(i) * s[layout.index(i / cols, i % cols, cols)],
            _ => value(i),
        });
        Ok(cpu_storage(
            values.collect(),
            self.out == candle_core::DType::BF16,
        ))
    }

    fn check(&self) -> Result<()> {
        if !matches!(
            self.src,
            DType::F8E4M3 | DType::BF16 | DType::F16 | DType::F32
        ) {
            candle_core::bail!("dequantize: cannot decode {}", self.src);
        }
        Ok(())
    }
}

/// A CPU activation storage (f32 or bf16) as f32 values, and whether it was bf16.
pub(crate) fn cpu_activations(s: &CpuStorage) -> Result<(Cow<'_, [f32]>, bool)> {
    Ok(match s {
        // Borrowed: the KV cache is read this way every step, and copying it would make each
        // step cost the whole cache's length.
        CpuStorage::F32(v) => (Cow::Borrowed(v.as_slice()), false),
        CpuStorage::BF16(v) => (Cow::Owned(v.iter().map(|x| x.to_f32()).collect()), true),
        _ => candle_core::bail!("activations must be f32 or bf16"),
    })
}

/// f32 values as a CPU activation storage, rounded to bf16 when `bf16`.
pub(crate) fn cpu_storage(values: Vec<f32>, bf16: bool) -> CpuStorage {
    if bf16 {
        CpuStorage::BF16(values.into_iter().map(half::bf16::from_f32).collect())
    } else {
        CpuStorage::F32(values)
    }
}

fn cpu_bytes<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [u8]> {
    let CpuStorage::U8(all) = storage else {
        candle_core::bail!("dequantize: raw bytes must be U8");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("dequantize: raw bytes must be contiguous");
    };
    Ok(&all[start..end])
}

impl CustomOp1 for Dequantize {
    fn name(&self) -> &'static str {
        "vibeoffload-dequantize"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        self.check()?;
        let out = self.decode_cpu(cpu_bytes(storage, layout)?, None)?;
        Ok((out, Shape::from(self.shape.clone())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.check()?;
        super::cuda::dequantize(self, self.rows_cols(), storage, layout, None)
    }
}

impl CustomOp2 for Dequantize {
    fn name(&self) -> &'static str {
        "vibeoffload-dequantize-scaled"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.check()?;
        let CpuStorage::F32(scale) = s2 else {
            candle_core::bail!("dequantize: scales must be decoded to F32 first");
        };
        let Some((start, end)) = l2.contiguous_offsets() else {
            candle_core::bail!("dequantize: scales must be contiguous");
        };
        let out = self.decode_cpu(cpu_bytes(s1, l1)?, Some(&scale[start..end]))?;
        Ok((out, Shape::from(self.shape.clone())))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.check()?;
        super::cuda::dequantize(self, self.rows_cols(), s1, l1, Some((s2, l2)))
    }
}

/// Decodes `raw` (times `scale`, if any) into a tensor of `out` dtype on the same device.
pub fn dequantize(
    raw: &RawTensor,
    scale: Option<&RawTensor>,
    out: candle_core::DType,
) -> Result<Tensor> {
    match scale {
        None => raw.bytes.apply_op1_no_bwd(&Dequantize {
            src: raw.dtype,
            shape: raw.shape.clone(),
            out,
            scale: None,
        }),
        Some(s) => {
            let scale_values = dequantize(s, None, candle_core::DType::F32)?;
            raw.bytes.apply_op2_no_bwd(
                &scale_values,
                &Dequantize {
                    src: raw.dtype,
                    shape: raw.shape.clone(),
                    out,
                    scale: Some(ScaleLayout::of(&s.shape, &raw.shape)),
                },
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn raw(dtype: DType, shape: &[usize], bytes: Vec<u8>) -> RawTensor {
        let n = bytes.len();
        RawTensor {
            dtype,
            shape: shape.to_vec(),
            bytes: Tensor::from_vec(bytes, n, &Device::Cpu).unwrap(),
        }
    }

    #[test]
    fn all_256_float8_codes_decode_exactly() {
        let codes: Vec<u8> = (0..=255).collect();
        let t = dequantize(
            &raw(DType::F8E4M3, &[16, 16], codes),
            None,
            candle_core::DType::F32,
        )
        .unwrap();
        let got: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        for (code, v) in got.iter().enumerate() {
            // Independent of the lookup table: sign, exponent (bias 7), 3-bit mantissa.
            let (s, e, m) = ((code >> 7) & 1, (code >> 3) & 15, code & 7);
            if e == 15 && m == 7 {
                assert!(v.is_nan(), "code {code:#04x} is NaN, got {v}");
                continue;
            }
            let magnitude = if e == 0 {
                m as f64 / 8.0 * 2f64.powi(-6)
            } else {
                (1.0 + m as f64 / 8.0) * 2f64.powi(e as i32 - 7)
            };
            let want = if s == 1 { -magnitude } else { magnitude };
            assert_eq!(*v as f64, want, "code {code:#04x}");
            assert_eq!(v.is_sign_negative(), s == 1, "sign of code {code:#04x}");
        }
    }

    #[test]
    fn scales_scalar_per_channel_and_blockwise() {
        // 2x4 matrix of 1.0 (0x38).
        let w = raw(DType::F8E4M3, &[2, 4], vec![0x38; 8]);
        let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let cases: [(&[usize], &[f32], [f32; 8]); 3] = [
            (&[], &[0.5], [0.5; 8]),
            (
                &[2, 1],
                &[2.0, 3.0],
                [2.0, 2.0, 2.0, 2.0, 3.0, 3.0, 3.0, 3.0],
            ),
            (
                &[2, 2, 1],
                &[1.0, 2.0, 3.0, 4.0],
                [1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0],
            ),
        ];
        for (shape, scale, want) in cases {
            let s = raw(DType::F32, shape, f32s(scale));
            let t = dequantize(&w, Some(&s), candle_core::DType::F32).unwrap();
            let got: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
            assert_eq!(got, want, "scale shape {shape:?}");
        }
    }

    #[test]
    fn bf16_f16_f32_sources() {
        let one_bf16 = raw(DType::BF16, &[1], 0x3f80u16.to_le_bytes().to_vec());
        let one_f16 = raw(DType::F16, &[1], 0x3c00u16.to_le_bytes().to_vec());
        let two_f32 = raw(DType::F32, &[1], 2.0f32.to_le_bytes().to_vec());
        for (r, want) in [(one_bf16, 1.0f32), (one_f16, 1.0), (two_f32, 2.0)] {
            let t = dequantize(&r, None, candle_core::DType::BF16).unwrap();
            assert_eq!(
                t.to_dtype(candle_core::DType::F32)
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                [want]
            );
        }
    }
}
