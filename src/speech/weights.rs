//! Where the speech components get their weights: a [`WeightSource`] hands out one tensor by
//! its checkpoint name, in the compute dtype on the target device, and [`Scope`] walks a
//! prefix through it the way the module tree nests. Two sources live here: a safetensors
//! file read with candle (the tests' fixtures) and seeded pseudo-random weights (unit tests,
//! timings without a checkpoint). The checkpoint-backed source (float8 and bf16 decoding with
//! scales) implements the same trait elsewhere.

use crate::engine::dequant::{dequantize, RawTensor};
use crate::engine::weights::Linear;
use crate::rng::Rng;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Hands out weights by checkpoint name.
pub trait WeightSource {
    /// The tensor `name` with exactly `shape`, in the compute dtype on the target device.
    /// Errors in one line naming the tensor when it is missing or has another shape.
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor>;

    /// The linear weight `name` (`[out, in]`) as stored, when the source keeps it in float8 on
    /// the device, to be decoded at use by the engine's kernels; `None`: take
    /// [`WeightSource::tensor`].
    fn stored_linear(&self, _name: &str, _shape: &[usize]) -> Result<Option<Linear>> {
        Ok(None)
    }

    /// Any weight `name` as stored in float8 on the device (with its scale), to be decoded to
    /// the activations' dtype at each use; `None`: take [`WeightSource::tensor`].
    fn stored_float8(&self, _name: &str, _shape: &[usize]) -> Result<Option<StoredWeight>> {
        Ok(None)
    }
}

/// A float8 weight kept as stored on the device, decoded at each use.
pub struct StoredWeight {
    /// The bytes, as stored.
    pub raw: RawTensor,
    /// Its float8 scale, as stored.
    pub scale: Option<RawTensor>,
}

impl StoredWeight {
    /// The weight decoded to `dtype`.
    pub fn decode(&self, dtype: DType) -> Result<Tensor> {
        Ok(
            dequantize(&self.raw, self.scale.as_ref(), dtype)?
                .reshape(self.raw.shape.as_slice())?,
        )
    }
}

/// A position in the module tree: a prefix over a [`WeightSource`], like candle's
/// `VarBuilder::pp`.
#[derive(Clone)]
pub struct Scope<'a> {
    source: &'a dyn WeightSource,
    prefix: String,
}

impl<'a> Scope<'a> {
    /// The scope at `prefix` (`"model.acoustic_tokenizer.decoder"`, or `""` for the root).
    pub fn new(source: &'a dyn WeightSource, prefix: &str) -> Scope<'a> {
        Scope {
            source,
            prefix: prefix.to_string(),
        }
    }

    /// The tensor `name` under this scope, with exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.source.tensor(&join(&self.prefix, name), shape)
    }

    /// The linear weight `name` under this scope as stored, if the source keeps it so.
    pub fn stored_linear(&self, name: &str, shape: &[usize]) -> Result<Option<Linear>> {
        self.source.stored_linear(&join(&self.prefix, name), shape)
    }

    /// The weight `name` under this scope as stored in float8, if the source keeps it so.
    pub fn stored_float8(&self, name: &str, shape: &[usize]) -> Result<Option<StoredWeight>> {
        self.source.stored_float8(&join(&self.prefix, name), shape)
    }

    /// This scope's prefix, for messages.
    pub fn name(&self) -> &str {
        &self.prefix
    }

    /// The scope `name` below this one (`name` may hold dots: `"ffn.linear1"`).
    pub fn sub(&self, name: &str) -> Scope<'a> {
        Scope {
            source: self.source,
            prefix: join(&self.prefix, name),
        }
    }
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Checks a tensor found under `name` has the wanted shape.
fn check_shape(name: &str, tensor: &Tensor, shape: &[usize]) -> Result<()> {
    if tensor.dims() != shape {
        bail!(
            "tensor {name} has shape {:?}, expected {shape:?}",
            tensor.dims()
        );
    }
    Ok(())
}

/// Every tensor of a safetensors file, converted to the compute dtype on the target device.
pub struct SafetensorsWeights {
    tensors: HashMap<String, Tensor>,
    dtype: DType,
}

impl SafetensorsWeights {
    /// Reads every tensor of `path` onto `device`; they are converted to `dtype` when asked for.
    pub fn load(path: &Path, dtype: DType, device: &Device) -> Result<SafetensorsWeights> {
        let tensors = candle_core::safetensors::load(path, device)
            .with_context(|| format!("reading the weights in {}", path.display()))?;
        Ok(SafetensorsWeights { tensors, dtype })
    }

    /// Wraps tensors already in memory, by name.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, dtype: DType) -> SafetensorsWeights {
        SafetensorsWeights { tensors, dtype }
    }
}

impl WeightSource for SafetensorsWeights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let tensor = self
            .tensors
            .get(name)
            .ok_or_else(|| anyhow!("no tensor {name} in the weights"))?;
        check_shape(name, tensor, shape)?;
        tensor
            .to_dtype(self.dtype)
            .with_context(|| format!("converting tensor {name} to {:?}", self.dtype))
    }
}

/// Deterministic pseudo-random weights of any requested name and shape: each tensor's values
/// depend only on the seed and its name. Matrices and kernels are uniform with standard
/// deviation `1/sqrt(fan_in)`; vectors (norm weights, biases, layer scales) are uniform in
/// [0.5, 1.5], so every layer contributes and activations stay of order one.
pub struct RandomWeights {
    seed: u64,
    dtype: DType,
    device: Device,
}

impl RandomWeights {
    /// Weights from `seed`, in `dtype` on `device`.
    pub fn new(seed: u64, dtype: DType, device: &Device) -> RandomWeights {
        RandomWeights {
            seed,
            dtype,
            device: device.clone(),
        }
    }
}

impl WeightSource for RandomWeights {
    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let values = Rng::for_name(self.seed, name).uniforms(n);
        let values: Vec<f32> = if shape.len() == 1 {
            values.iter().map(|v| 1.0 + 0.5 * v).collect()
        } else {
            let fan_in: usize = shape[1..].iter().product();
            let amplitude = (3.0 / fan_in.max(1) as f32).sqrt();
            values.iter().map(|v| v * amplitude).collect()
        };
        Tensor::from_vec(values, shape, &self.device)?
            .to_dtype(self.dtype)
            .with_context(|| format!("making random tensor {name}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_join_names_and_errors_name_the_tensor() {
        let mut tensors = HashMap::new();
        let w = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        tensors.insert("a.b.weight".to_string(), w);
        let source = SafetensorsWeights::from_tensors(tensors, DType::F32);
        let root = Scope::new(&source, "a");
        let b = root.sub("b");
        assert_eq!(b.get("weight", &[2, 3]).unwrap().dims(), &[2, 3]);
        let err = b.get("weight", &[3, 2]).unwrap_err().to_string();
        assert!(
            err.contains("a.b.weight") && err.contains("[3, 2]"),
            "{err}"
        );
        let err = b.get("bias", &[2]).unwrap_err().to_string();
        assert!(err.contains("a.b.bias"), "{err}");
    }

    #[test]
    fn random_weights_depend_on_name_and_seed_only() {
        let a = RandomWeights::new(7, DType::F32, &Device::Cpu);
        let b = RandomWeights::new(7, DType::F32, &Device::Cpu);
        let c = RandomWeights::new(8, DType::F32, &Device::Cpu);
        let get = |s: &RandomWeights, n: &str| {
            s.tensor(n, &[4, 5])
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(get(&a, "x"), get(&b, "x"));
        assert_ne!(get(&a, "x"), get(&a, "y"));
        assert_ne!(get(&a, "x"), get(&c, "x"));
        assert!(get(&a, "x")
            .iter()
            .all(|v| v.abs() <= (3.0f32 / 5.0).sqrt()));
    }
}
