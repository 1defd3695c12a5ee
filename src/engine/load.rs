//! Loading the engine: opening the device, uploading resident layers, packing streamed ones
//! into (pinned) host memory with their small tensors decoded on the device, sizing the slots
//! and the caches as the planner does, and timing each phase.

use super::cache::Lane;
use super::dequant::{dequantize, RawTensor};
use super::model::Rope;
use super::streamer::{HostBytes, HostLayer, LayerStreamer, PackedTensor, Residency, Slots};
use super::watch::Watch;
use super::weights::{Decoded, LayerWeights, Linear};
use super::{DeviceChoice, Engine, EngineOptions};
use crate::checkpoint::header::TensorInfo;
use crate::checkpoint::layout;
use crate::checkpoint::ModelInfo;
use crate::plan::memory;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// Where load time went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadTimings {
    /// Opening the device (CUDA context, cuBLAS).
    pub device_ms: f64,
    /// Allocating pinned host buffers for streamed layers.
    pub pin_ms: f64,
    /// Copying streamed layers from the mapped file into those buffers (page-cache reads).
    pub read_ms: f64,
    /// Uploading resident tensors from the mapped file to the device.
    pub upload_ms: f64,
    /// All of loading, the above included.
    pub total_ms: f64,
}

fn dims(t: &TensorInfo) -> Vec<usize> {
    t.shape.iter().map(|&d| d as usize).collect()
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

impl Engine {
    /// Loads `info`'s checkpoint: resident layers go straight from the mapped file to the
    /// device, streamed layers are packed into host memory. `progress` is told the layers
    /// loaded so far.
    pub fn load(
        info: ModelInfo,
        options: &EngineOptions,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Engine> {
        let Some(checkpoint) = &info.checkpoint else {
            bail!("the engine needs a checkpoint file (a built-in layout has no weights); pass --model-path, or write one with `vibeoffload synth`");
        };
        let inventory = &info.inventory;
        let num_layers = inventory.num_layers();
        if options.gpu_layers > num_layers {
            bail!(crate::UsageError::new(format!(
                "--num-gpu-layers {} is more than the model's {num_layers} layers",
                options.gpu_layers
            )));
        }
        let started = Instant::now();
        let (device, dtype) = open_device(options.device)?;
        let mut timings = LoadTimings {
            device_ms: ms_since(started),
            ..LoadTimings::default()
        };
        let upload_ms = std::cell::Cell::new(0.0);
        let upload = |t: &TensorInfo| -> Result<RawTensor> {
            let started = Instant::now();
            let bytes = checkpoint.data(t);
            let raw = RawTensor {
                dtype: t.dtype,
                shape: dims(t),
                bytes: Tensor::from_slice(bytes, bytes.len(), &device).with_context(|| {
                    format!(
                        "cannot upload {} ({} bytes) to the device",
                        t.name,
                        bytes.len()
                    )
                })?,
            };
            upload_ms.set(upload_ms.get() + ms_since(started));
            Ok(raw)
        };
        let resident = options.placement.resident(num_layers, options.gpu_layers);
        let mut layers = Vec::with_capacity(num_layers);
        let mut host = Vec::new();
        let mut device_weight_bytes = 0;
        for (i, &is_resident) in resident.iter().enumerate() {
            let tensors: Vec<(&str, &TensorInfo)> = inventory.layer_tensors(i).collect();
            if is_resident {
                let mut raw = HashMap::new();
                for &(rel, t) in &tensors {
                    raw.insert(rel.to_string(), upload(t)?);
                    device_weight_bytes += t.size_bytes();
                }
                let decoded = Decoded::new(&raw, dtype)?;
                let weights = LayerWeights::new(&raw, &decoded, true)?;
                layers.push(Residency::Resident(Box::new(weights)));
            } else {
                let (offsets, size) = layout::packed_layout(tensors.iter().map(|(_, t)| *t));
                let pin_started = Instant::now();
                let mut bytes = host_buffer(&device, size as usize, options.pin_memory)?;
                timings.pin_ms += ms_since(pin_started);
                let read_started = Instant::now();
                let mut packed = Vec::with_capacity(tensors.len());
                for (&(rel, t), &offset) in tensors.iter().zip(&offsets) {
                    let data = checkpoint.data(t);
                    bytes.as_mut_slice()[offset as usize..offset as usize + data.len()]
                        .copy_from_slice(data);
                    packed.push(PackedTensor {
                        name: rel.to_string(),
                        dtype: t.dtype,
                        shape: dims(t),
                        offset: offset as usize,
                        len: data.len(),
                    });
                }
                timings.read_ms += ms_since(read_started);
                let small = tensors
                    .iter()
                    .filter(|(rel, _)| memory::decoded_copies(rel).is_some())
                    .map(|&(rel, t)| Ok((rel.to_string(), upload(t)?)))
                    .collect::<Result<HashMap<_, _>>>()?;
                layers.push(Residency::Streamed(host.len()));
                host.push(HostLayer {
                    layer: i,
                    tensors: packed,
                    bytes: bytes.into_host_bytes(),
                    decoded: Arc::new(Decoded::new(&small, dtype)?),
                });
            }
            progress(i + 1, num_layers);
        }
        let packed_sizes: Vec<u64> = host
            .iter()
            .map(|h| h.bytes.as_slice().len() as u64)
            .collect();
        let (slot_count, slot_bytes) = memory::stream_slots(options.slots, &packed_sizes);
        let slots = make_slots(&device, slot_count, slot_bytes as usize)?;
        let streamer = LayerStreamer::new(layers, host, slots, options.prefetch_depth)?;
        device_weight_bytes += slot_count as u64 * slot_bytes;

        let lm = inventory.layout.lm_prefix();
        let norm_info = inventory
            .tensor(&format!("{lm}norm.weight"))
            .ok_or_else(|| anyhow!("no final norm"))?;
        let norm = dequantize(&upload(norm_info)?, None, dtype)?;
        let embed = inventory
            .tensor(&format!("{lm}embed_tokens.weight"))
            .ok_or_else(|| anyhow!("no embedding"))?
            .clone();
        let embed_scale = inventory.scale_of(&embed.name).cloned();
        let head_name = if info.config.tie_word_embeddings {
            embed.name.clone()
        } else {
            "lm_head.weight".to_string()
        };
        let head_info = inventory
            .tensor(&head_name)
            .ok_or_else(|| anyhow!("no {head_name}"))?;
        let head_scale = inventory.scale_of(&head_name);
        let scale = head_scale.map(upload).transpose()?;
        let head = Linear {
            weight: upload(head_info)?,
            scale_f32: scale
                .as_ref()
                .map(|s| dequantize(s, None, DType::F32)?.flatten_all())
                .transpose()?,
            scale,
        };
        device_weight_bytes += norm_info.size_bytes()
            + head_info.size_bytes()
            + head_scale.map_or(0, |s| s.size_bytes());
        let rope = Rope::new(&info.config, options.max_seq_len, dtype, &device)?;
        device.synchronize()?;
        timings.upload_ms = upload_ms.get();
        timings.total_ms = ms_since(started);
        Ok(Engine {
            watch: Watch::new(&device)?,
            watch_deferred: false,
            device,
            dtype,
            norm,
            head,
            embed,
            embed_scale,
            rope,
            streamer,
            lanes: vec![Lane::new(&info.config, options.max_seq_len)],
            max_seq_len: options.max_seq_len,
            device_weight_bytes,
            timings,
            info,
        })
    }
}

fn open_device(choice: DeviceChoice) -> Result<(Device, DType)> {
    match choice {
        DeviceChoice::Cpu => Ok((Device::Cpu, DType::F32)),
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda(i) => {
            let device =
                Device::new_cuda(i).map_err(|e| anyhow!("cannot open CUDA device {i}: {e}"))?;
            if let Device::Cuda(d) = &device {
                // SAFETY: every tensor is used on candle's one stream; the streamer's copy
                // stream touches only slot memory, through raw pointers, ordered by its own
                // events (engine::streamer, schedule points 1 and 2). cudarc's per-use event
                // tracking would only add a record and a wait to every kernel launch.
                unsafe { d.disable_event_tracking() };
            }
            Ok((device, DType::BF16))
        }
        #[cfg(not(feature = "cuda"))]
        DeviceChoice::Cuda(_) => bail!(crate::UsageError::new(
            "--device cuda needs a build with CUDA: cargo build --release --features cuda (see scripts/build-cuda.sh)"
        )),
    }
}

/// A host buffer for one packed layer: pinned when asked and on CUDA, else ordinary memory.
enum HostBuffer {
    Pageable(Vec<u8>),
    #[cfg(feature = "cuda")]
    Pinned(super::cuda::PinnedBytes),
}

impl HostBuffer {
    fn as_mut_slice(&mut self) -> &mut [u8] {
        match self {
            HostBuffer::Pageable(v) => v,
            #[cfg(feature = "cuda")]
            HostBuffer::Pinned(p) => p.as_mut_slice(),
        }
    }

    fn into_host_bytes(self) -> HostBytes {
        match self {
            HostBuffer::Pageable(v) => HostBytes::Pageable(v),
            #[cfg(feature = "cuda")]
            HostBuffer::Pinned(p) => HostBytes::Pinned(p),
        }
    }
}

#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn host_buffer(device: &Device, size: usize, pin: bool) -> Result<HostBuffer> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) if pin => Ok(HostBuffer::Pinned(super::cuda::PinnedBytes::new(d, size)?)),
        _ => Ok(HostBuffer::Pageable(vec![0; size])),
    }
}

#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn make_slots(device: &Device, count: usize, bytes: usize) -> Result<Slots> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => Ok(Slots::Cuda(super::cuda::CudaSlots::new(d, count, bytes)?)),
        _ => Ok(Slots::Cpu {
            tensors: vec![None; count],
            timings: Vec::new(),
            wait_ms: 0.0,
        }),
    }
}

/// The bandwidths decoding is measured against, in GB/s.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bandwidths {
    /// Host-to-device from pinned memory: the copy engine's limit for streamed layers.
    pub pinned_gbps: f64,
    /// Device memory: reading the weights once per token at this rate bounds resident decoding.
    pub device_gbps: f64,
}

/// Both bandwidths on `device`, measured on one opening of it (`None` on the CPU).
pub fn bandwidths(device: DeviceChoice) -> Result<Option<Bandwidths>> {
    match device {
        DeviceChoice::Cpu => Ok(None),
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda(_) => {
            let (Device::Cuda(d), _) = open_device(device)? else {
                unreachable!("a CUDA choice opens a CUDA device");
            };
            Ok(Some(Bandwidths {
                pinned_gbps: super::cuda::pinned_bandwidth_gbps(&d, 256 << 20)?,
                device_gbps: super::cuda::device_bandwidth_gbps(&d, 1 << 30)?,
            }))
        }
        #[cfg(not(feature = "cuda"))]
        DeviceChoice::Cuda(_) => open_device(device).map(|_| None),
    }
}
