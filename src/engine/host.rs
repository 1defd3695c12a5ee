//! Hybrid decoding's host side: the layers the host CPU computes, in f32 from host memory,
//! between the ones the GPU computes. The hidden states go over and back at each such layer;
//! a prefill runs them on the GPU instead (uploading their weights), since many tokens make a
//! layer compute-bound.

use super::cache::KvCache;
use super::lanes::{step_each, step_lanes};
use super::model::{self, Rope};
use super::watch::Watch;
use super::weights::LayerWeights;
use super::{ops, Engine, LaneId};
use crate::arch::config::ModelConfig;
use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};

/// What the layers the host CPU computes use besides their weights: the rotary tables and a
/// watch in f32 on the CPU, the hidden states' way there and back, and where the time went.
pub(super) struct HostCompute {
    pub(super) rope: Rope,
    pub(super) watch: Watch,
    /// The GPU's mapped hand-over buffer (a copy would queue behind the streamed layers').
    #[cfg(feature = "cuda")]
    handoff: Option<super::cuda::Handoff>,
    /// Time in host-computed layers, hand-overs included, since the statistics were reset.
    pub(super) compute_ms: f64,
    /// Of it, handing hidden states over (and waiting for the GPU's work before).
    pub(super) handoff_ms: f64,
    /// Of it, the float8 products.
    pub(super) products_ms: f64,
}

impl HostCompute {
    /// The state for a model of `config` with caches of `max_len` positions, handing over
    /// through `device` (its mapped buffer on CUDA, as large as a prefill chunk's hidden
    /// states).
    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    pub(super) fn new(
        config: &ModelConfig,
        max_len: usize,
        device: &Device,
    ) -> Result<HostCompute> {
        Ok(HostCompute {
            rope: Rope::new(config, max_len, DType::F32, &Device::Cpu)?,
            watch: Watch::new(&Device::Cpu)?,
            #[cfg(feature = "cuda")]
            handoff: match device {
                Device::Cuda(d) => Some(super::cuda::Handoff::new(
                    d,
                    crate::plan::memory::PREFILL_CHUNK_TOKENS as usize * config.hidden_size,
                )?),
                _ => None,
            },
            compute_ms: 0.0,
            handoff_ms: 0.0,
            products_ms: 0.0,
        })
    }

    /// `x` as f32 on the CPU, once the device's queued work is done.
    fn download(&mut self, x: &Tensor) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(h) = &mut self.handoff {
            if h.takes(x.elem_count()) {
                return h.download(x);
            }
        }
        Ok(x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?)
    }

    /// `x` back on `device` in `dtype`.
    fn upload(&mut self, x: &Tensor, device: &Device, dtype: DType) -> Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let Some(h) = &mut self.handoff {
            if h.takes(x.elem_count()) && dtype == DType::BF16 {
                return h.upload(x);
            }
        }
        Ok(x.to_dtype(dtype)?.to_device(device)?)
    }
}

impl Engine {
    /// Layer `i`, which the host CPU computes, for the lanes of a pass: the hidden states go
    /// to the host, through the layer in f32 there, and back, while the streamer's copies run
    /// on. Each lane's mask is rebuilt on the CPU.
    pub(super) fn host_layer(
        &mut self,
        i: usize,
        weights: &LayerWeights,
        batched: &mut Option<Tensor>,
        inputs: &mut [(LaneId, Tensor, Option<Tensor>)],
    ) -> Result<()> {
        let long = |x: &Tensor| x.dim(1).is_ok_and(|t| t > ops::MATVEC_MAX_ROWS);
        if batched.is_none() && self.on_gpu() && inputs.iter().any(|(_, x, _)| long(x)) {
            return self.host_layer_prefill(i, weights, inputs);
        }
        let config = &self.info.config;
        let host = self
            .host
            .as_mut()
            .expect("host layers have their host state");
        let started = std::time::Instant::now();
        let mut host_batched = batched.as_ref().map(|x| host.download(x)).transpose()?;
        let mut host_inputs = Vec::with_capacity(inputs.len());
        if host_batched.is_none() {
            for (lane, x, mask) in inputs.iter() {
                let position = self.lanes[*lane].position;
                let mask = match mask {
                    Some(_) => Some(model::causal_mask(x.dim(1)?, position, &Device::Cpu)?),
                    None => None,
                };
                host_inputs.push((*lane, host.download(x)?, mask));
            }
        }
        let handed = started.elapsed();
        let at = (&host.rope, &host.watch);
        let lanes = &mut self.lanes;
        // On the products' threads, so that the attention's parallel loops (rayon's global
        // pool otherwise) do not wake a second set of threads as many as the cores: measured
        // on the lent H200 host, 0.3 ms a layer. The products are timed on the thread that
        // calls them.
        let (stepped, products_ns) = super::f8dot::pool().install(|| {
            let before = super::f8dot::products_ns();
            let stepped = match &mut host_batched {
                Some(x) => step_lanes(config, weights, i, x, inputs, lanes, at),
                None => step_each(config, weights, i, &mut host_inputs, lanes, at),
            };
            (stepped, super::f8dot::products_ns() - before)
        });
        host.products_ms += products_ns as f64 * 1e-6;
        // The host watch was written as the layer ran: look at it now.
        stepped.and(host.watch.take())?;
        let computed = started.elapsed();
        if let (Some(x), Some(h)) = (batched.as_mut(), &host_batched) {
            *x = host.upload(h, &self.device, self.dtype)?;
        }
        for ((_, x, _), (_, h, _)) in inputs.iter_mut().zip(&host_inputs) {
            *x = host.upload(h, &self.device, self.dtype)?;
        }
        let total = started.elapsed();
        host.compute_ms += total.as_secs_f64() * 1e3;
        host.handoff_ms += (handed + total - computed).as_secs_f64() * 1e3;
        Ok(())
    }

    /// Layer `i`, which the host CPU computes when decoding, for a prefill on the GPU: many
    /// tokens make it compute-bound, and the GPU does that in a fraction of the time its
    /// weights take to upload (on the CPU it took ~0.35 s a 7B layer for 128 tokens). Each
    /// lane's earlier keys and values go up with them, the new ones come back to its host
    /// cache (f32, from the GPU's bf16). The results are a streamed layer's, bit for bit.
    fn host_layer_prefill(
        &mut self,
        i: usize,
        weights: &LayerWeights,
        inputs: &mut [(LaneId, Tensor, Option<Tensor>)],
    ) -> Result<()> {
        let config = &self.info.config;
        let gpu = weights.to_device(&self.device, self.dtype)?;
        for (lane, x, mask) in inputs.iter_mut() {
            let t = x.dim(1)?;
            let lane = &mut self.lanes[*lane];
            let position = lane.position;
            let mut scratch = KvCache::new(config, position + t);
            if position > 0 {
                let earlier = lane.caches[i].positions(0, position)?;
                let earlier = earlier.to_dtype(self.dtype)?.to_device(&self.device)?;
                scratch.write_positions(&earlier, 0)?;
            }
            let at = model::At {
                offset: position,
                mask: mask.as_ref(),
                watch: &self.watch,
                layer: i,
            };
            *x = model::decoder_layer(config, &gpu, x, &self.rope, &mut scratch, at)
                .with_context(|| format!("decoder layer {i} (prefill on the GPU)"))?;
            let fresh = scratch.positions(position, position + t)?;
            let fresh = fresh.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
            lane.caches[i].write_positions(&fresh, position)?;
        }
        Ok(())
    }
}
