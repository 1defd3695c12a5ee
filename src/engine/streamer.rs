//! The layer streamer: resident layers live on the device; offloaded layers live in host
//! memory as one packed buffer each and pass through a ring of device slots. The decoder asks
//! for layer i's weights and says when it is done with them; it never sees slots or streams.
//!
//! The schedule. Offloaded layers are used in a fixed cyclic order (layer order within a
//! forward pass, then the next pass), numbered u = 0, 1, 2, ...; use u goes to slot u % S.
//! 1. Use u may be copied once the compute of use u - S (the slot's previous occupant) is done:
//!    the copy stream waits for that event, so a slot is never overwritten while read.
//! 2. Before layer u computes, the compute stream waits for u's copy to finish.
//! 3. When u is requested, copies are issued ahead for uses up to u + depth (depth <= S - 1);
//!    when u is released, up to u + 1 + depth, since u's slot may now be refilled (point 1).
//!    This crosses forward passes: the next token's first streamed layers load, into every
//!    slot, while this token's resident layers compute.
//! 4. With no more offloaded layers than slots, each slot keeps its layer: copied once.

use super::dequant::RawTensor;
use super::weights::{Decoded, LayerWeights};
use crate::dtype::DType;
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::time::Instant;

/// One tensor's place in a packed layer buffer.
#[derive(Clone, Debug)]
pub struct PackedTensor {
    /// Name relative to `layers.{i}.`.
    pub name: String,
    /// Stored element type.
    pub dtype: DType,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Byte offset in the buffer.
    pub offset: usize,
    /// Byte length.
    pub len: usize,
}

/// Host memory holding an offloaded layer's packed bytes.
pub enum HostBytes {
    /// Ordinary (pageable) memory.
    Pageable(Vec<u8>),
    /// Page-locked memory the GPU's copy engine reads directly.
    #[cfg(feature = "cuda")]
    Pinned(super::cuda::PinnedBytes),
}

impl HostBytes {
    /// The bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            HostBytes::Pageable(v) => v,
            #[cfg(feature = "cuda")]
            HostBytes::Pinned(p) => p.as_slice(),
        }
    }
}

/// An offloaded layer's host copy.
pub struct HostLayer {
    /// Decoder layer index.
    pub layer: usize,
    /// Its tensors' places.
    pub tensors: Vec<PackedTensor>,
    /// The packed bytes.
    pub bytes: HostBytes,
    /// What was decoded of it at load, resident on the device.
    pub decoded: std::sync::Arc<Decoded>,
}

/// Where each layer's weights are.
pub enum Residency {
    /// On the device for the whole run.
    Resident(Box<LayerWeights>),
    /// In host memory: index into the host layers.
    Streamed(usize),
    /// In host memory, computed there by the CPU (hybrid decoding): never copied.
    Host(Box<LayerWeights>),
}

/// Timings of one copy, for the statistics.
#[derive(Clone, Copy, Debug)]
pub struct CopyTiming {
    /// Layer copied.
    pub layer: usize,
    /// Bytes copied.
    pub bytes: u64,
    /// Copy time on the copy engine.
    pub copy_ms: f64,
}

/// Per-layer transfer figures.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LayerTransferRow {
    /// Decoder layer.
    pub layer: usize,
    /// Copies of it.
    pub transfers: u64,
    /// Mean copy time.
    pub avg_copy_ms: f64,
}

/// What the streamer did, on the library API and printed by `run`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TransferStats {
    /// Layers resident on the device.
    pub gpu_layers: usize,
    /// Layers streamed from host memory.
    pub cpu_layers: usize,
    /// Layers the host CPU computes (never copied).
    #[serde(default)]
    pub cpu_compute_layers: usize,
    /// Time in host-computed layers, hand-overs included (the host waits for the GPU's
    /// queued work at each).
    #[serde(default)]
    pub cpu_compute_ms: f64,
    /// Of it, handing the hidden states over and back.
    #[serde(default)]
    pub cpu_handoff_ms: f64,
    /// Of it, the float8 products (wall time); the rest is norms, attention and the threads'
    /// starts.
    #[serde(default)]
    pub cpu_products_ms: f64,
    /// Layer copies (host to device).
    pub total_transfers: u64,
    /// Bytes copied.
    pub total_bytes: u64,
    /// Time the copy engine spent copying.
    pub total_transfer_time_ms: f64,
    /// Mean time of one layer copy.
    pub avg_transfer_time_ms: f64,
    /// Bytes copied per second of copy time.
    pub achieved_gbps: f64,
    /// Time the compute stream waited for copies.
    pub compute_wait_ms: f64,
    /// Share of copy time hidden behind compute: 100 x (1 - wait / copy).
    pub overlap_pct: f64,
    /// Per streamed layer.
    pub per_layer: Vec<LayerTransferRow>,
}

/// Device slots and the copies into them: synchronous on the CPU, on a side stream with events
/// on CUDA.
pub enum Slots {
    /// CPU: a "slot" is a fresh tensor holding a copy of the layer.
    Cpu {
        /// Current content of each slot.
        tensors: Vec<Option<Tensor>>,
        /// Copies since the last statistics drain.
        timings: Vec<CopyTiming>,
        /// Time spent copying (the CPU computes nothing meanwhile).
        wait_ms: f64,
    },
    /// CUDA slots.
    #[cfg(feature = "cuda")]
    Cuda(super::cuda::CudaSlots),
}

impl Slots {
    fn upload(&mut self, slot: usize, host: &HostLayer) -> Result<()> {
        match self {
            Slots::Cpu {
                tensors,
                timings,
                wait_ms,
            } => {
                let started = Instant::now();
                let bytes = host.bytes.as_slice();
                tensors[slot] = Some(Tensor::from_slice(bytes, bytes.len(), &Device::Cpu)?);
                let ms = started.elapsed().as_secs_f64() * 1e3;
                *wait_ms += ms;
                timings.push(CopyTiming {
                    layer: host.layer,
                    bytes: bytes.len() as u64,
                    copy_ms: ms,
                });
                Ok(())
            }
            #[cfg(feature = "cuda")]
            // SAFETY: host layers live as long as the streamer, and `drain` (on every statistics
            // read and on drop) waits for the copies.
            Slots::Cuda(c) => unsafe { c.upload(slot, host.layer, host.bytes.as_slice()) },
        }
    }

    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn wait(&mut self, slot: usize) -> Result<()> {
        match self {
            Slots::Cpu { .. } => Ok(()),
            #[cfg(feature = "cuda")]
            Slots::Cuda(c) => c.wait(slot),
        }
    }

    #[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
    fn release(&mut self, slot: usize) -> Result<()> {
        match self {
            Slots::Cpu { .. } => Ok(()),
            #[cfg(feature = "cuda")]
            Slots::Cuda(c) => c.release(slot),
        }
    }

    /// Number of slots.
    fn len(&self) -> usize {
        match self {
            Slots::Cpu { tensors, .. } => tensors.len(),
            #[cfg(feature = "cuda")]
            Slots::Cuda(c) => c.len(),
        }
    }

    fn tensor(&self, slot: usize) -> Result<Tensor> {
        match self {
            Slots::Cpu { tensors, .. } => tensors[slot]
                .clone()
                .ok_or_else(|| anyhow::anyhow!("slot {slot} read before any copy")),
            #[cfg(feature = "cuda")]
            Slots::Cuda(c) => Ok(c.tensor(slot)),
        }
    }

    /// Completed copies and compute wait since the last call (waits for copies in flight).
    fn drain(&mut self) -> Result<(Vec<CopyTiming>, f64)> {
        match self {
            Slots::Cpu {
                timings, wait_ms, ..
            } => Ok((std::mem::take(timings), std::mem::take(wait_ms))),
            #[cfg(feature = "cuda")]
            Slots::Cuda(c) => c.drain(),
        }
    }
}

/// Hands the decoder each layer's weights, streaming offloaded layers through device slots.
pub struct LayerStreamer {
    layers: Vec<Residency>,
    host: Vec<HostLayer>,
    slots: Slots,
    slot_count: usize,
    depth: usize,
    /// Next use to be computed.
    next_use: u64,
    /// Uses below this have their copy issued.
    issued: u64,
    /// The use whose weights are out, if any.
    current: Option<u64>,
    timings: Vec<CopyTiming>,
    wait_ms: f64,
}

impl LayerStreamer {
    /// A streamer over `layers`, with `host` holding the streamed layers in execution order
    /// and `slots` sized for the largest. `depth` is how many uses ahead copies run
    /// (0 = no prefetch: copy when needed).
    pub fn new(
        layers: Vec<Residency>,
        host: Vec<HostLayer>,
        slots: Slots,
        depth: usize,
    ) -> Result<LayerStreamer> {
        let slot_count = slots.len();
        if !host.is_empty() && slot_count == 0 {
            bail!("streaming {} layers needs at least one slot", host.len());
        }
        Ok(LayerStreamer {
            layers,
            host,
            slots,
            depth: depth.min(slot_count.saturating_sub(1)),
            slot_count,
            next_use: 0,
            issued: 0,
            current: None,
            timings: Vec::new(),
            wait_ms: 0.0,
        })
    }

    fn streamed(&self) -> u64 {
        self.host.len() as u64
    }

    /// With no more streamed layers than slots, each keeps its own slot (schedule point 4).
    fn is_static(&self) -> bool {
        self.host.len() <= self.slot_count
    }

    fn slot_of(&self, u: u64) -> usize {
        if self.is_static() {
            (u % self.streamed()) as usize
        } else {
            (u % self.slot_count as u64) as usize
        }
    }

    fn issue(&mut self, u: u64) -> Result<()> {
        let host = &self.host[(u % self.streamed()) as usize];
        let slot = self.slot_of(u);
        self.slots.upload(slot, host)
    }

    /// Whether the host CPU computes layer `layer` (its weights are on the CPU).
    pub fn on_host(&self, layer: usize) -> bool {
        matches!(self.layers[layer], Residency::Host(_))
    }

    /// The weights of decoder layer `layer`. Streamed layers must be asked for in order.
    pub fn acquire(&mut self, layer: usize) -> Result<LayerWeights> {
        let index = match &self.layers[layer] {
            Residency::Resident(w) | Residency::Host(w) => return Ok((**w).clone()),
            Residency::Streamed(i) => *i,
        };
        let u = self.next_use;
        if (u % self.streamed()) as usize != index || self.current.is_some() {
            bail!("layer streamer: layer {layer} asked for out of order");
        }
        let needs_copy = !self.is_static() || u < self.streamed();
        if needs_copy && self.issued <= u {
            self.issue(u)?;
            self.issued = u + 1;
        }
        self.prefetch(u + self.depth as u64)?;
        let slot = self.slot_of(u);
        self.slots.wait(slot)?;
        self.current = Some(u);
        let bytes = self.slots.tensor(slot)?;
        let host = &self.host[index];
        let tensors = host
            .tensors
            .iter()
            .map(|t| {
                Ok((
                    t.name.clone(),
                    RawTensor {
                        dtype: t.dtype,
                        shape: t.shape.clone(),
                        bytes: bytes.narrow(0, t.offset, t.len)?,
                    },
                ))
            })
            .collect::<Result<HashMap<_, _>>>()?;
        LayerWeights::new(&tensors, &host.decoded, false)
    }

    /// Says the compute that reads layer `layer`'s weights has been issued.
    pub fn release(&mut self, layer: usize) -> Result<()> {
        if let Residency::Streamed(_) = self.layers[layer] {
            let u = self
                .current
                .take()
                .ok_or_else(|| anyhow::anyhow!("layer streamer: layer {layer} released twice"))?;
            let slot = self.slot_of(u);
            self.slots.release(slot)?;
            self.next_use = u + 1;
            if self.depth > 0 {
                self.prefetch(u + 1 + self.depth as u64)?;
            }
        }
        Ok(())
    }

    /// Schedule point 3: issues copies for uses up to `last`, never into a slot whose reader
    /// has not been released.
    fn prefetch(&mut self, last: u64) -> Result<()> {
        if self.is_static() {
            return Ok(());
        }
        while self.issued <= last {
            self.issue(self.issued)?;
            self.issued += 1;
        }
        Ok(())
    }

    /// Transfer statistics so far (waits for copies in flight).
    pub fn stats(&mut self) -> Result<TransferStats> {
        let (timings, wait_ms) = self.slots.drain()?;
        self.timings.extend(timings);
        self.wait_ms += wait_ms;
        let mut per_layer: Vec<LayerTransferRow> = self
            .host
            .iter()
            .map(|h| LayerTransferRow {
                layer: h.layer,
                ..LayerTransferRow::default()
            })
            .collect();
        for t in &self.timings {
            if let Some(row) = per_layer.iter_mut().find(|r| r.layer == t.layer) {
                row.avg_copy_ms = (row.avg_copy_ms * row.transfers as f64 + t.copy_ms)
                    / (row.transfers + 1) as f64;
                row.transfers += 1;
            }
        }
        let total_transfers = self.timings.len() as u64;
        let total_bytes: u64 = self.timings.iter().map(|t| t.bytes).sum();
        let total_ms: f64 = self.timings.iter().map(|t| t.copy_ms).sum();
        let count = |f: fn(&Residency) -> bool| self.layers.iter().filter(|r| f(r)).count();
        Ok(TransferStats {
            gpu_layers: count(|r| matches!(r, Residency::Resident(_))),
            cpu_layers: self.host.len(),
            cpu_compute_layers: count(|r| matches!(r, Residency::Host(_))),
            cpu_compute_ms: 0.0,
            cpu_handoff_ms: 0.0,
            cpu_products_ms: 0.0,
            total_transfers,
            total_bytes,
            total_transfer_time_ms: total_ms,
            avg_transfer_time_ms: if total_transfers > 0 {
                total_ms / total_transfers as f64
            } else {
                0.0
            },
            achieved_gbps: if total_ms > 0.0 {
                total_bytes as f64 / (total_ms * 1e6)
            } else {
                0.0
            },
            compute_wait_ms: self.wait_ms,
            overlap_pct: if total_ms > 0.0 {
                (100.0 * (1.0 - self.wait_ms / total_ms)).clamp(0.0, 100.0)
            } else {
                0.0
            },
            per_layer,
        })
    }

    /// Forgets the statistics gathered so far (after a warm-up).
    pub fn reset_stats(&mut self) -> Result<()> {
        self.slots.drain()?;
        self.timings.clear();
        self.wait_ms = 0.0;
        Ok(())
    }
}
impl Drop for LayerStreamer {
    /// Waits for copies in flight: they read host layers, which are freed next.
    fn drop(&mut self) {
        let _ = self.slots.drain();
    }
}
