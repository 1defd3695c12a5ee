//! Loading the engine: opening the device, uploading resident layers, packing streamed ones
//! into (pinned) host memory with their small tensors decoded on the device, sizing the slots
//! and the caches as the planner does, and timing each phase.

use super::cache::Lane;
use super::dequant::{dequantize, RawTensor};
use super::model::Rope;
use super::streamer::{HostBytes, HostLayer, LayerStreamer, PackedTensor, Residency, Slots};
use super::watch::Watch;
use super::weights::{Decoded, LayerWeights, Linear};
use super::{DeviceBytes, DeviceChoice, Engine, EngineOptions};
use crate::checkpoint::header::TensorInfo;
use crate::checkpoint::inventory::Part;
use crate::checkpoint::layout;
use crate::checkpoint::ModelInfo;
use crate::plan::memory;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

/// Where load time went: phases that add up to (nearly) the total, so a slow load says why.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadTimings {
    /// Opening the device (CUDA context, cuBLAS).
    pub device_ms: f64,
    /// Compiling and loading the GPU kernels (NVRTC, and the driver's PTX compilation when its
    /// cache is cold), done up front rather than inside the first pass.
    #[serde(default)]
    pub kernels_ms: f64,
    /// Paging the checkpoint's bytes in from disk (little when the file is in the page cache).
    #[serde(default)]
    pub page_in_ms: f64,
    /// Allocating pinned host buffers for streamed layers.
    pub pin_ms: f64,
    /// Copying streamed layers from the mapped file into those buffers, and uploading their
    /// small tensors.
    pub read_ms: f64,
    /// Uploading and decoding the resident layers.
    pub upload_ms: f64,
    /// The final norm, LM head, rotary tables and stream slots.
    #[serde(default)]
    pub non_layer_ms: f64,
    /// The speech components (diffusion head, tokenizers, connectors), when loaded.
    #[serde(default)]
    pub speech_ms: f64,
    /// All of loading, the above included.
    pub total_ms: f64,
}

impl LoadTimings {
    /// The named phases' sum.
    pub fn phases_ms(&self) -> f64 {
        self.device_ms
            + self.kernels_ms
            + self.page_in_ms
            + self.pin_ms
            + self.read_ms
            + self.upload_ms
            + self.non_layer_ms
            + self.speech_ms
    }

    /// The share of the total the phases account for (1 when nothing was timed).
    pub fn accounted(&self) -> f64 {
        if self.total_ms > 0.0 {
            self.phases_ms() / self.total_ms
        } else {
            1.0
        }
    }
}

/// A step of loading, as progress displays name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoadPhase {
    /// Opening the device.
    Device,
    /// Compiling and loading kernels.
    Kernels,
    /// Paging the checkpoint in from disk (bytes).
    PageIn,
    /// Decoder layers, resident or packed for streaming (layers).
    Layers,
    /// Final norm, LM head, tables and slots.
    NonLayer,
    /// The speech components.
    Speech,
}

impl LoadPhase {
    /// What a progress line says during this phase.
    pub fn label(self) -> &'static str {
        match self {
            LoadPhase::Device => "opening the device",
            LoadPhase::Kernels => "compiling kernels",
            LoadPhase::PageIn => "reading the checkpoint from disk",
            LoadPhase::Layers => "loading decoder layers",
            LoadPhase::NonLayer => "loading the norm, LM head and slots",
            LoadPhase::Speech => "loading the speech components",
        }
    }
}

/// How far a load is: its phase, and `done` of `total` units (bytes while paging in, layers
/// while loading layers; 0 of 0 where a phase has no count).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadProgress {
    /// The phase.
    pub phase: LoadPhase,
    /// Units done.
    pub done: u64,
    /// Units in all.
    pub total: u64,
}

impl LoadProgress {
    /// The start of a phase with no count.
    pub fn start(phase: LoadPhase) -> LoadProgress {
        LoadProgress {
            phase,
            done: 0,
            total: 0,
        }
    }
}

fn dims(t: &TensorInfo) -> Vec<usize> {
    t.shape.iter().map(|&d| d as usize).collect()
}

fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

impl Engine {
    /// Loads `info`'s checkpoint: resident layers go straight from the mapped file to the
    /// device, streamed layers are packed into host memory. `progress` is told each phase
    /// and how far it is.
    pub fn load(
        info: ModelInfo,
        options: &EngineOptions,
        mut progress: impl FnMut(LoadProgress),
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
        progress(LoadProgress::start(LoadPhase::Device));
        let (device, dtype) = open_device(options.device)?;
        let mut timings = LoadTimings {
            device_ms: ms_since(started),
            ..LoadTimings::default()
        };
        let phase = Instant::now();
        progress(LoadProgress::start(LoadPhase::Kernels));
        warm_kernels(&device, dtype)?;
        timings.kernels_ms = ms_since(phase);
        let phase = Instant::now();
        // The language model's tensors, read below; the token embedding only when it is the
        // LM head too (otherwise only the rows in use are read, one step at a time).
        let lm = inventory.layout.lm_prefix();
        let embed_name = format!("{lm}embed_tokens.weight");
        let read = inventory.tensors.iter().filter_map(|(t, part)| {
            let read = match part {
                Part::Layer(_) | Part::FinalNorm | Part::LmHead => true,
                Part::Embeddings => info.config.tie_word_embeddings,
                _ => false,
            };
            read.then_some(t)
        });
        checkpoint.page_in(read, |done, total| {
            progress(LoadProgress {
                phase: LoadPhase::PageIn,
                done,
                total,
            })
        });
        timings.page_in_ms = ms_since(phase);
        let upload = |t: &TensorInfo| -> Result<RawTensor> {
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
            Ok(raw)
        };
        if options.cpu_layers > num_layers - options.gpu_layers {
            bail!(crate::UsageError::new(format!(
                "--cpu-layers {} is more than the {} layers left offloaded",
                options.cpu_layers,
                num_layers - options.gpu_layers
            )));
        }
        let resident = options.placement.resident(num_layers, options.gpu_layers);
        let on_host = crate::plan::host_computed(&resident, options.cpu_layers);
        let mut layers = Vec::with_capacity(num_layers);
        let mut host = Vec::new();
        let mut allocated = DeviceBytes::default();
        for (i, &is_resident) in resident.iter().enumerate() {
            let layer_started = Instant::now();
            let tensors: Vec<(&str, &TensorInfo)> = inventory.layer_tensors(i).collect();
            if is_resident {
                let mut raw = HashMap::new();
                for &(rel, t) in &tensors {
                    raw.insert(rel.to_string(), upload(t)?);
                    allocated.resident_layers += t.size_bytes();
                }
                let decoded = Decoded::new(&raw, dtype)?;
                let weights = LayerWeights::new(&raw, &decoded, true)?;
                layers.push(Residency::Resident(Box::new(weights)));
                timings.upload_ms += ms_since(layer_started);
            } else if on_host[i] {
                // Computed by the CPU in f32: the bytes copied out of the mapped file into
                // ordinary memory, the small tensors decoded there.
                let mut raw = HashMap::new();
                for &(rel, t) in &tensors {
                    let data = checkpoint.data(t);
                    let bytes = Tensor::from_slice(data, data.len(), &Device::Cpu)?;
                    raw.insert(
                        rel.to_string(),
                        RawTensor {
                            dtype: t.dtype,
                            shape: dims(t),
                            bytes,
                        },
                    );
                }
                let decoded = Decoded::new(&raw, DType::F32)?;
                let weights = LayerWeights::new(&raw, &decoded, true)?;
                layers.push(Residency::Host(Box::new(weights)));
                timings.read_ms += ms_since(layer_started);
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
                let small = tensors
                    .iter()
                    .filter(|(rel, _)| memory::decoded_copies(rel).is_some())
                    .map(|&(rel, t)| {
                        allocated.non_layer += t.size_bytes();
                        Ok((rel.to_string(), upload(t)?))
                    })
                    .collect::<Result<HashMap<_, _>>>()?;
                layers.push(Residency::Streamed(host.len()));
                host.push(HostLayer {
                    layer: i,
                    tensors: packed,
                    bytes: bytes.into_host_bytes(),
                    decoded: Arc::new(Decoded::new(&small, dtype)?),
                });
                timings.read_ms += ms_since(read_started);
            }
            progress(LoadProgress {
                phase: LoadPhase::Layers,
                done: i as u64 + 1,
                total: num_layers as u64,
            });
        }
        let phase = Instant::now();
        progress(LoadProgress::start(LoadPhase::NonLayer));
        let packed_sizes: Vec<u64> = host
            .iter()
            .map(|h| h.bytes.as_slice().len() as u64)
            .collect();
        let (slot_count, slot_bytes) = memory::stream_slots(options.slots, &packed_sizes);
        let slots = make_slots(&device, slot_count, slot_bytes as usize)?;
        let streamer = LayerStreamer::new(layers, host, slots, options.prefetch_depth)?;
        allocated.stream_slots = slot_count as u64 * slot_bytes;

        let norm_info = inventory
            .tensor(&format!("{lm}norm.weight"))
            .ok_or_else(|| anyhow!("no final norm"))?;
        let norm = dequantize(&upload(norm_info)?, None, dtype)?;
        let embed = inventory
            .tensor(&embed_name)
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
        allocated.non_layer += norm_info.size_bytes()
            + head_info.size_bytes()
            + head_scale.map_or(0, |s| s.size_bytes());
        let rope = Rope::new(&info.config, options.max_seq_len, dtype, &device)?;
        let watch = Watch::new(&device)?;
        let host = (options.cpu_layers > 0)
            .then(|| super::host::HostCompute::new(&info.config, options.max_seq_len, &device))
            .transpose()?;
        device.synchronize()?;
        timings.non_layer_ms = ms_since(phase);
        timings.total_ms = ms_since(started);
        Ok(Engine {
            watch,
            watch_deferred: false,
            device,
            dtype,
            norm,
            head,
            head_rows: None,
            embed,
            embed_scale,
            rope,
            host,
            streamer,
            lanes: vec![Lane::new(&info.config, options.max_seq_len)],
            max_seq_len: options.max_seq_len,
            device_bytes: allocated,
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

/// Compiles and loads, now, the kernels a run uses: this crate's modules, and candle's (the
/// driver compiles their PTX at first load, seconds when its cache is cold), by running one
/// tiny op of each kind, cuBLAS included. Nothing to do on the CPU.
fn warm_kernels(device: &Device, dtype: DType) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        super::cuda::load_modules(d)?;
        let x = Tensor::ones((1, 2, 8), DType::F32, device)?; // fill
        let w = Tensor::ones((2, 2, 3), dtype, device)?;
        let y = x
            .to_dtype(dtype)? // cast
            .affine(2.0, 1.0)? // affine
            .exp()? // unary
            .add(&x.to_dtype(dtype)?)? // binary
            .conv1d(&w, 1, 1, 1, 1)?; // conv
        let ids = Tensor::new(&[0u32, 1], device)?;
        let picked = y.index_select(&ids, 1)?; // indexing
        let mask = picked.ge(&picked)?; // comparison
        let chosen = mask.where_cond(&picked, &picked)?; // ternary
        let s = chosen.sum_keepdim(2)?.max_keepdim(1)?; // reduce
        let m = chosen.matmul(&chosen.transpose(1, 2)?)?; // cuBLAS
        let n = candle_nn::ops::softmax_last_dim(&m)?;
        let n = candle_nn::ops::rms_norm(&n, &Tensor::ones(2, dtype, device)?, 1e-6)?;
        (s.sum_all()?.to_dtype(DType::F32)? + n.sum_all()?.to_dtype(DType::F32)?)?
            .to_scalar::<f32>()?;
    }
    let _ = (device, dtype);
    Ok(())
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

/// The host's float8 products over one layer of `config` at `rows` rows, in GB/s of weights
/// (see `f8dot::measure_gbps`), measured while `device`'s copy engine streams pinned memory
/// as hybrid decoding has it do (both read host memory); on the CPU, alone.
pub fn host_f8_gbps(
    device: DeviceChoice,
    config: &crate::arch::config::ModelConfig,
    rows: usize,
) -> Result<f64> {
    let kv_width = config.num_key_value_heads * config.head_dim;
    let measure =
        || super::f8dot::measure_gbps(rows, config.hidden_size, kv_width, config.intermediate_size);
    match device {
        DeviceChoice::Cpu => Ok(measure()),
        #[cfg(feature = "cuda")]
        DeviceChoice::Cuda(_) => {
            let (Device::Cuda(d), _) = open_device(device)? else {
                unreachable!("a CUDA choice opens a CUDA device");
            };
            // About half a second of copies: longer than the measurement.
            super::cuda::while_copying(&d, 256 << 20, 100, measure)
        }
        #[cfg(not(feature = "cuda"))]
        DeviceChoice::Cuda(_) => open_device(device).map(|_| measure()),
    }
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
