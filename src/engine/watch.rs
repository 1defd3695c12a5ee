//! The watch for NaN and infinity: every decoder layer's output (and the logits) is checked,
//! and a pass that produced a non-finite value fails, naming the first layer that did. Real
//! checkpoints carry activations large enough to break a careless kernel, and a NaN passed
//! on as hidden states or audio is worse than an error.
//!
//! Checking lowers a word to the producer's index; [`Watch::take`] reads it once per pass.
//! On the CPU the word is a host atomic and outputs are scanned as they are made. On the GPU
//! the word lives on the device and nothing waits: the fused decode kernels check their
//! outputs as they write them, other paths queue a small reduction.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::atomic::{AtomicU32, Ordering};

/// The watch of one engine.
#[derive(Debug)]
pub enum Watch {
    /// Outputs are scanned on the host as they are made; the word as below.
    Cpu(AtomicU32),
    /// A one-element U32 tensor on the device: `u32::MAX`, or the lowest tag whose output
    /// held a non-finite value.
    Device(Tensor),
}

/// What produced the values checked: a decoder layer by index, or the LM head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tag {
    /// Decoder layer `i`.
    Layer(usize),
    /// The final RMSNorm (the hidden states a pass returns).
    FinalNorm,
    /// The LM head (logits).
    LmHead,
}

impl Tag {
    /// The index a device word holds for this tag (the LM head after every layer).
    fn index(self) -> u32 {
        match self {
            Tag::Layer(i) => i as u32,
            Tag::FinalNorm => u32::MAX - 2,
            Tag::LmHead => u32::MAX - 1,
        }
    }

    fn from_index(i: u32) -> Tag {
        match i {
            i if i == u32::MAX - 2 => Tag::FinalNorm,
            i if i == u32::MAX - 1 => Tag::LmHead,
            i => Tag::Layer(i as usize),
        }
    }
}

impl std::fmt::Display for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tag::Layer(i) => write!(f, "decoder layer {i}"),
            Tag::FinalNorm => write!(f, "the final norm"),
            Tag::LmHead => write!(f, "the LM head"),
        }
    }
}

/// The error of a pass whose `tag` produced NaN or infinite values.
fn non_finite(tag: Tag) -> anyhow::Error {
    anyhow::anyhow!(
        "{tag} produced NaN or infinite values: the checkpoint's weights, scales or \
         configuration (rope_theta, rms_norm_eps) are likely broken; no result was kept"
    )
}

impl Watch {
    /// A watch for tensors on `device`.
    pub fn new(device: &Device) -> Result<Watch> {
        Ok(match device {
            Device::Cpu => Watch::Cpu(AtomicU32::new(u32::MAX)),
            _ => Watch::Device(Self::clear_word(device)?),
        })
    }

    fn clear_word(device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_vec(vec![u32::MAX], 1, device)?)
    }

    /// The device word and `tag`'s index, for a fused kernel that checks its own outputs;
    /// `None` on the CPU, where [`Watch::check`] scans them instead.
    pub fn word(&self, tag: Tag) -> Option<(Tensor, u32)> {
        match self {
            Watch::Cpu(_) => None,
            Watch::Device(word) => Some((word.clone(), tag.index())),
        }
    }

    /// Checks `x`, the output of `tag`, for NaN and infinity (at once on the CPU, queued on
    /// the device); the next [`Watch::take`] reports what it found.
    pub fn check(&self, x: &Tensor, tag: Tag) -> Result<()> {
        match self {
            Watch::Cpu(word) => {
                let values = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                if values.iter().any(|v| !v.is_finite()) {
                    word.fetch_min(tag.index(), Ordering::Relaxed);
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Watch::Device(word) => super::cuda::watch(x, word, tag.index()),
            #[cfg(not(feature = "cuda"))]
            Watch::Device(_) => bail!("a device watch needs the cuda feature"),
        }
    }

    /// Waits for the work queued so far and fails if any of it produced a non-finite value,
    /// naming the first producer; the watch is then clear again.
    pub fn take(&mut self) -> Result<()> {
        let seen = match self {
            Watch::Cpu(word) => word.load(Ordering::Relaxed),
            Watch::Device(word) => word.to_vec1::<u32>()?[0],
        };
        self.report(seen)
    }

    /// The word as a one-element U32 tensor on `device`, as of the work queued so far (a
    /// copy queued on the device), to be read later with other results and handed to
    /// [`Watch::report`]: one transfer instead of two.
    pub fn snapshot(&self, device: &Device) -> Result<Tensor> {
        Ok(match self {
            Watch::Cpu(word) => Tensor::new(&[word.load(Ordering::Relaxed)], device)?,
            Watch::Device(word) => word.copy()?,
        })
    }

    /// Fails, naming the producer, if `seen` (a value of the word) says a non-finite value
    /// was produced, and clears the watch; otherwise does nothing.
    pub fn report(&mut self, seen: u32) -> Result<()> {
        if seen == u32::MAX {
            return Ok(());
        }
        match self {
            Watch::Cpu(word) => word.store(u32::MAX, Ordering::Relaxed),
            Watch::Device(word) => *word = Self::clear_word(word.device())?,
        }
        bail!(non_finite(Tag::from_index(seen)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_watch_names_the_first_bad_layer_and_passes_finite_values() {
        let mut watch = Watch::new(&Device::Cpu).unwrap();
        let ok = Tensor::new(&[1.0f32, -3e38, 0.0], &Device::Cpu).unwrap();
        watch.check(&ok, Tag::Layer(0)).unwrap();
        watch.take().unwrap();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let x = Tensor::new(&[1.0f32, bad], &Device::Cpu).unwrap();
            watch.check(&ok, Tag::Layer(6)).unwrap();
            watch.check(&x, Tag::Layer(7)).unwrap();
            watch.check(&x, Tag::Layer(8)).unwrap();
            let e = watch.take().unwrap_err();
            assert!(
                e.to_string().starts_with("decoder layer 7 produced NaN"),
                "{e}"
            );
            // Reported once: the watch is clear again.
            watch.take().unwrap();
        }
        let x = Tensor::new(&[f32::NAN], &Device::Cpu).unwrap();
        watch.check(&x, Tag::LmHead).unwrap();
        let e = watch.take().unwrap_err();
        assert!(e.to_string().starts_with("the LM head produced"), "{e}");
    }

    #[test]
    fn tags_survive_the_device_word() {
        for tag in [Tag::Layer(0), Tag::Layer(27), Tag::FinalNorm, Tag::LmHead] {
            assert_eq!(Tag::from_index(tag.index()), tag);
        }
    }
}
