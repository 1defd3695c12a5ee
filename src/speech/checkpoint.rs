//! Speech weights from a checkpoint: each tensor's bytes from the mapped file, decoded on the
//! device (float8 with its scale, bf16, f16 or f32) into the compute dtype when the component
//! is built.

use super::weights::StoredWeight;
use super::WeightSource;
use crate::checkpoint::ModelInfo;
use crate::dtype::DType as Stored;
use crate::engine::dequant::{dequantize, RawTensor};
use crate::engine::weights::Linear;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};

/// A [`WeightSource`] over a model read from disk.
pub struct CheckpointWeights<'a> {
    info: &'a ModelInfo,
    device: Device,
    dtype: DType,
}

impl<'a> CheckpointWeights<'a> {
    /// Weights of `info` (which must be read from a file), decoded to `dtype` on `device`.
    pub fn new(
        info: &'a ModelInfo,
        device: &Device,
        dtype: DType,
    ) -> Result<CheckpointWeights<'a>> {
        if info.checkpoint.is_none() {
            bail!(
                "{} has no weights to run: give a checkpoint file",
                info.source
            );
        }
        Ok(CheckpointWeights {
            info,
            device: device.clone(),
            dtype,
        })
    }

    fn raw(&self, name: &str) -> Result<(RawTensor, Vec<usize>)> {
        let checkpoint = self.info.checkpoint.as_ref().expect("checked in new");
        let t = self
            .info
            .inventory
            .tensor(name)
            .ok_or_else(|| anyhow!("no tensor {name} in {}", self.info.source))?;
        let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
        let bytes = checkpoint.data(t);
        let raw = RawTensor {
            dtype: t.dtype,
            shape: shape.clone(),
            bytes: Tensor::from_slice(bytes, bytes.len(), &self.device)?,
        };
        Ok((raw, shape))
    }
}

impl WeightSource for CheckpointWeights<'_> {
    fn stored_float8(&self, name: &str, shape: &[usize]) -> Result<Option<StoredWeight>> {
        let (raw, stored) = self.raw(name)?;
        if stored != shape {
            bail!(
                "tensor {name} in {} has shape {stored:?}, expected {shape:?}",
                self.info.source
            );
        }
        if raw.dtype != Stored::F8E4M3 {
            return Ok(None);
        }
        let scale = match self.info.inventory.scale_of(name) {
            Some(s) => Some(self.raw(&s.name)?.0),
            None => None,
        };
        Ok(Some(StoredWeight { raw, scale }))
    }

    fn stored_linear(&self, name: &str, shape: &[usize]) -> Result<Option<Linear>> {
        if shape.len() != 2 {
            return Ok(None);
        }
        let Some(StoredWeight { raw: weight, scale }) = self.stored_float8(name, shape)? else {
            return Ok(None);
        };
        let scale_f32 = scale
            .as_ref()
            .map(|s| dequantize(s, None, DType::F32)?.flatten_all())
            .transpose()?;
        Ok(Some(Linear {
            weight,
            scale,
            scale_f32,
        }))
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (raw, stored) = self.raw(name)?;
        if stored != shape {
            bail!(
                "tensor {name} in {} has shape {stored:?}, expected {shape:?}",
                self.info.source
            );
        }
        let scale = match self.info.inventory.scale_of(name) {
            Some(s) => Some(self.raw(&s.name)?.0),
            None => None,
        };
        dequantize(&raw, scale.as_ref(), self.dtype)
            .and_then(|t| t.reshape(shape))
            .with_context(|| format!("decoding tensor {name} of {}", self.info.source))
    }
}
