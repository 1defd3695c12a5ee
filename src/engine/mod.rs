//! The engine: VibeVoice's language model on candle (CPU, or CUDA with the `cuda` feature),
//! with N decoder layers resident on the device and the rest streamed from host memory by the
//! [`LayerStreamer`]. Buffers are sized with `plan::memory`, as the estimate is.

pub mod attention;
pub mod cache;
pub mod dequant;
mod f8dot;
mod host;
mod lanes;
mod load;
pub mod matvec;
pub mod model;
pub mod ops;
pub mod replay;
pub mod streamer;
mod token_logits;
pub mod watch;
pub mod weights;

#[cfg(feature = "cuda")]
pub mod cuda;

use crate::checkpoint::header::TensorInfo;
use crate::checkpoint::ModelInfo;
use crate::plan::{memory, Placement};
use anyhow::{bail, Context, Result};
use cache::Lane;
use candle_core::{DType, Device, Tensor};
use dequant::{dequantize, RawTensor};
use lanes::{step_each, step_lanes};
use model::Rope;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use streamer::LayerStreamer;
use watch::{Tag, Watch};
use weights::Linear;

pub use load::{bandwidths, host_f8_gbps, Bandwidths, LoadPhase, LoadProgress, LoadTimings};
pub use streamer::TransferStats;

/// Where the model runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    /// candle's CPU backend (f32 compute).
    Cpu,
    /// A CUDA GPU by ordinal (bf16 compute); needs the `cuda` feature.
    Cuda(usize),
}

/// How to load the model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EngineOptions {
    /// Device.
    pub device: DeviceChoice,
    /// Decoder layers resident on the device.
    pub gpu_layers: usize,
    /// Which layers are resident.
    pub placement: Placement,
    /// Device slots streamed layers pass through.
    pub slots: usize,
    /// Copies issued ahead of use (capped at slots - 1); 0 disables prefetch.
    pub prefetch_depth: usize,
    /// Keep streamed layers in pinned (page-locked) host memory.
    pub pin_memory: bool,
    /// Longest sequence the KV cache holds.
    pub max_seq_len: usize,
    /// Offloaded layers the host CPU computes instead of streaming (hybrid decoding), spread
    /// among them by `plan::host_computed`.
    #[serde(default)]
    pub cpu_layers: usize,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            device: DeviceChoice::Cpu,
            gpu_layers: 0,
            placement: Placement::Last,
            slots: memory::DEFAULT_STREAM_SLOTS,
            prefetch_depth: memory::DEFAULT_STREAM_SLOTS - 1,
            pin_memory: true,
            max_seq_len: 4096,
            cpu_layers: 0,
        }
    }
}

/// A loaded language model, ready to run.
pub struct Engine {
    info: ModelInfo,
    device: Device,
    dtype: DType,
    norm: Tensor,
    head: Linear,
    /// The head's rows of the ids [`Engine::token_logits`] was last asked for.
    head_rows: Option<token_logits::HeadRows>,
    embed: TensorInfo,
    /// The embedding's float8 scale, read from the file with its rows.
    embed_scale: Option<TensorInfo>,
    rope: Rope,
    /// For the layers the host CPU computes (hybrid decoding), when there are any.
    host: Option<host::HostCompute>,
    streamer: LayerStreamer,
    /// The sequences kept: lane 0 is the one `forward`, `forward_batch` and `queue_greedy`
    /// extend; more come from [`Engine::add_lane`].
    lanes: Vec<Lane>,
    max_seq_len: usize,
    device_bytes: DeviceBytes,
    timings: LoadTimings,
    watch: Watch,
    /// Inside [`Engine::time_queued`]: the watch is read after the timed work, not in it.
    watch_deferred: bool,
}

/// Device bytes of the engine's weights and slots, by the planner's terms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceBytes {
    /// Final norm, LM head, and the small tensors of streamed layers (as stored).
    pub non_layer: u64,
    /// The resident decoder layers (as stored).
    pub resident_layers: u64,
    /// The slots streamed layers pass through.
    pub stream_slots: u64,
}

impl DeviceBytes {
    /// All three.
    pub fn total(&self) -> u64 {
        self.non_layer + self.resident_layers + self.stream_slots
    }
}

/// Index of a sequence lane of an [`Engine`].
pub type LaneId = usize;

/// How long the GPU holds its stream while the host queues the work [`Engine::time_queued`]
/// times: longer than queuing one decoding step takes.
#[cfg(feature = "cuda")]
const QUEUE_HOLD_MS: f64 = 100.0;

/// Device work timed with its launch cost hidden: the GPU is held while the host queues the
/// work, then runs it back to back. Against the wall-clock time, it tells launch-bound from
/// GPU-bound.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueuedTime {
    /// GPU time of the work; `None` when queuing it outlasted the hold.
    pub gpu_ms: Option<f64>,
    /// Host time to queue it.
    pub host_ms: f64,
}

impl Engine {
    /// Runs `ids` (one sequence) through the model after the tokens already in the cache and
    /// returns the final-normed hidden states, `[ids.len(), hidden]`, in the compute dtype.
    pub fn forward(&mut self, ids: &[u32]) -> Result<Tensor> {
        Ok(self.forward_batch(&[ids])?.squeeze(0)?)
    }

    /// Runs a batch of sequences of equal length, one row each, after the tokens already in
    /// the cache; returns `[batch, tokens, hidden]`. The batch shares every weight copy, which
    /// is what makes streamed decoding scale with the batch.
    pub fn forward_batch(&mut self, batch: &[&[u32]]) -> Result<Tensor> {
        let hidden = self.queue_forward(batch)?;
        self.take_watch()?;
        Ok(hidden)
    }

    /// [`Engine::forward_batch`] without waiting to read the watch.
    fn queue_forward(&mut self, batch: &[&[u32]]) -> Result<Tensor> {
        self.check_batch(batch)?;
        // Long prompts go through in chunks, which bounds the attention scores' memory
        // (plan::memory::PREFILL_CHUNK_TOKENS, as the estimate assumes).
        let t = batch[0].len();
        let chunk = memory::PREFILL_CHUNK_TOKENS as usize;
        let mut outputs = Vec::new();
        for start in (0..t).step_by(chunk) {
            let end = (start + chunk).min(t);
            let rows: Vec<&[u32]> = batch.iter().map(|ids| &ids[start..end]).collect();
            let input = self.upload_chunk(&rows)?;
            outputs.push(self.forward_chunk(input)?);
        }
        Ok(match outputs.len() {
            1 => outputs.pop().expect("one chunk"),
            _ => Tensor::cat(&outputs, 1)?,
        })
    }

    /// Queues one greedy decoding step of a batch without waiting for anything: the forward
    /// pass, then each sequence's next token (the argmax of its last position's logits), left
    /// on the device followed by the watch's word. [`Engine::read_greedy`] reads both with
    /// one transfer, where [`Engine::forward_batch`] and [`Engine::logits`] would each wait
    /// to read the watch.
    pub fn queue_greedy(&mut self, batch: &[&[u32]]) -> Result<Tensor> {
        let hidden = self.queue_forward(batch)?;
        let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?.squeeze(1)?;
        let logits = self.queue_logits(&last)?;
        let next = logits.argmax(1)?;
        Ok(Tensor::cat(&[next, self.watch.snapshot(&self.device)?], 0)?)
    }

    /// The next tokens of a step queued by [`Engine::queue_greedy`]; fails, naming the layer,
    /// if the step produced NaN or infinity.
    pub fn read_greedy(&mut self, queued: &Tensor) -> Result<Vec<u32>> {
        let mut values = queued.to_vec1::<u32>()?;
        let seen = values
            .pop()
            .ok_or_else(|| anyhow::anyhow!("an empty greedy step"))?;
        self.watch.report(seen)?;
        Ok(values)
    }

    /// Runs `ids` like [`Engine::forward`], timing the layers' device work queued behind a
    /// hold of the GPU (see [`Engine::time_queued`]); the inputs are uploaded first, as a
    /// pageable upload would wait for the hold. `None` on the CPU, or for more than one
    /// prefill chunk of tokens.
    pub fn time_forward_queued(&mut self, ids: &[u32]) -> Result<Option<QueuedTime>> {
        self.check_batch(&[ids])?;
        if !self.on_gpu() || ids.len() > memory::PREFILL_CHUNK_TOKENS as usize {
            return Ok(None);
        }
        let input = self.upload_chunk(&[ids])?;
        self.synchronize()?;
        Ok(self.time_queued(|e| e.forward_chunk(input).map(drop))?.1)
    }

    fn check_batch(&self, batch: &[&[u32]]) -> Result<()> {
        let t = batch.first().map_or(0, |ids| ids.len());
        if t == 0 {
            bail!("no input tokens");
        }
        if batch.iter().any(|ids| ids.len() != t) {
            bail!("the sequences of a batch must have the same length");
        }
        self.check_room(0, t)
    }

    /// One chunk's inputs on the device: embeddings `[b, t, hidden]` and, for more than one
    /// token, the causal mask (built once for every layer).
    fn upload_chunk(&self, batch: &[&[u32]]) -> Result<(Tensor, Option<Tensor>)> {
        let t = batch[0].len();
        let mask = (t > 1)
            .then(|| model::causal_mask(t, self.lanes[0].position, &self.device))
            .transpose()?;
        Ok((self.embed(batch)?, mask))
    }

    fn forward_chunk(&mut self, (x, mask): (Tensor, Option<Tensor>)) -> Result<Tensor> {
        let mut out = self.forward_chunk_lanes(vec![(0, x, mask)])?;
        Ok(out.pop().expect("one lane"))
    }

    /// Every lane's chunk through every layer: each layer's weights are acquired once and
    /// serve all lanes, each lane with its own cache and position; then the final norm.
    fn forward_chunk_lanes(
        &mut self,
        mut inputs: Vec<(LaneId, Tensor, Option<Tensor>)>,
    ) -> Result<Vec<Tensor>> {
        let config = &self.info.config.clone();
        // One token of each of several lanes: the lanes stay one batch `[lanes, 1, hidden]`
        // from the first layer to the final norm, and their projections run as one.
        let stepping = inputs.len() > 1
            && inputs
                .iter()
                .all(|(_, x, _)| x.dims3().is_ok_and(|(b, t, _)| b == 1 && t == 1));
        let xs: Vec<&Tensor> = inputs.iter().map(|(_, x, _)| x).collect();
        let mut batched = stepping.then(|| Tensor::cat(&xs, 0)).transpose()?;
        for i in 0..config.num_hidden_layers {
            let weights = self.streamer.acquire(i)?;
            match self.host.is_some() && self.streamer.on_host(i) {
                true => self.host_layer(i, &weights, &mut batched, &mut inputs)?,
                false => {
                    let at = (&self.rope, &self.watch);
                    match &mut batched {
                        Some(x) => {
                            step_lanes(config, &weights, i, x, &inputs, &mut self.lanes, at)?
                        }
                        None => step_each(config, &weights, i, &mut inputs, &mut self.lanes, at)?,
                    }
                }
            }
            drop(weights);
            self.streamer.release(i)?;
        }
        let eps = config.rms_norm_eps;
        let mut outputs = Vec::with_capacity(inputs.len());
        if let Some(x) = batched {
            // The norm works row by row, so the batch normed at once splits into the lanes'
            // own results.
            let out = model::rms_norm(&x, &self.norm, eps)?;
            self.watch.check(&out, Tag::FinalNorm)?;
            for (k, (lane, _, _)) in inputs.iter().enumerate() {
                self.lanes[*lane].position += 1;
                outputs.push(out.narrow(0, k, 1)?);
            }
            return Ok(outputs);
        }
        for (lane, x, _) in inputs {
            self.lanes[lane].position += x.dim(1)?;
            let out = model::rms_norm(&x, &self.norm, eps)?;
            self.watch.check(&out, Tag::FinalNorm)?;
            outputs.push(out);
        }
        Ok(outputs)
    }

    /// Logits (f32) for final-normed hidden states: `[vocab]` for `[hidden]`, `[rows, vocab]`
    /// for `[rows, hidden]`.
    pub fn logits(&mut self, hidden: &Tensor) -> Result<Tensor> {
        let logits = match hidden.rank() {
            1 => self.queue_logits(&hidden.unsqueeze(0)?)?.squeeze(0)?,
            _ => self.queue_logits(hidden)?,
        };
        self.take_watch()?;
        Ok(logits)
    }

    /// Logits of `[rows, hidden]`, checked by the watch but not waited for.
    fn queue_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let rows = memory::LM_HEAD_CHUNK_ROWS as usize;
        model::lm_head(hidden, &self.head, rows, &self.watch)
    }

    /// Fails if the work queued since the last look produced NaN or infinity (waiting for it
    /// on the GPU), unless [`Engine::time_queued`] looks after its timed work instead.
    fn take_watch(&mut self) -> Result<()> {
        match self.watch_deferred {
            true => Ok(()),
            false => self.watch.take(),
        }
    }

    /// Whether the model runs on a GPU (where queued timing means something).
    pub fn on_gpu(&self) -> bool {
        self.device.is_cuda()
    }

    /// Tokens the KV cache can still take.
    pub fn remaining_tokens(&self) -> usize {
        self.max_seq_len - self.lanes[0].position
    }

    /// Empties the KV cache of every lane.
    pub fn reset(&mut self) {
        for lane in &mut self.lanes {
            lane.position = 0;
        }
    }

    /// Waits for the device to finish queued work (for timing).
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.device.synchronize()?)
    }

    /// Runs `f`, timing the device work it queues with the cost of launching it hidden (see
    /// [`QueuedTime`]); `None` on the CPU. `f` must not wait for the device.
    pub fn time_queued<T>(
        &mut self,
        f: impl FnOnce(&mut Engine) -> Result<T>,
    ) -> Result<(T, Option<QueuedTime>)> {
        match &self.device {
            #[cfg(feature = "cuda")]
            Device::Cuda(d) => {
                let timer = cuda::QueuedTimer::start(d, QUEUE_HOLD_MS)?;
                self.watch_deferred = true;
                let out = f(self);
                self.watch_deferred = false;
                let (gpu_ms, host_ms) = timer.finish()?;
                let out = out?;
                self.watch.take()?;
                Ok((out, Some(QueuedTime { gpu_ms, host_ms })))
            }
            _ => Ok((f(self)?, None)),
        }
    }

    /// Transfer statistics so far, with the time in host-computed layers.
    pub fn transfer_stats(&mut self) -> Result<TransferStats> {
        let mut stats = self.streamer.stats()?;
        if let Some(h) = &self.host {
            stats.cpu_compute_ms = h.compute_ms;
            stats.cpu_handoff_ms = h.handoff_ms;
            stats.cpu_products_ms = h.products_ms;
        }
        Ok(stats)
    }

    /// Forgets the transfer statistics (after a warm-up).
    pub fn reset_stats(&mut self) -> Result<()> {
        if let Some(h) = &mut self.host {
            h.compute_ms = 0.0;
            h.handoff_ms = 0.0;
            h.products_ms = 0.0;
        }
        self.streamer.reset_stats()
    }

    /// The model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The device it runs on: the speech components must be built on this one (a second
    /// opening of the same GPU is another device to candle).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute dtype (f32 on CPU, bf16 on CUDA).
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Where load time went.
    pub fn load_timings(&self) -> LoadTimings {
        self.timings
    }

    /// Device bytes the engine allocated for weights and slots.
    pub fn device_weight_bytes(&self) -> u64 {
        self.device_bytes.total()
    }

    /// [`Engine::device_weight_bytes`], term by term as the planner counts them.
    pub fn device_bytes(&self) -> DeviceBytes {
        self.device_bytes
    }

    /// Device bytes the KV cache holds now (allocated at full length on first use).
    pub fn kv_cache_bytes(&self) -> u64 {
        self.lanes.iter().map(|l| l.bytes_on(&self.device)).sum()
    }

    /// Token embeddings stay in the mapped file: only the rows of `ids` go to the device.
    fn embed(&self, batch: &[&[u32]]) -> Result<Tensor> {
        let checkpoint = self.info.checkpoint.as_ref().expect("checked at load");
        let (vocab, hidden) = (self.embed.shape[0] as usize, self.embed.shape[1] as usize);
        let (b, t) = (batch.len(), batch[0].len());
        let ids: Vec<usize> = batch
            .iter()
            .flat_map(|ids| ids.iter())
            .map(|&id| id as usize)
            .collect();
        if let Some(id) = ids.iter().find(|&&id| id >= vocab) {
            bail!("token id {id} is outside the vocabulary of {vocab}");
        }
        // The rows of `ids`, `[ids, width]`; a scalar scale as it is.
        let rows = |t: &TensorInfo| -> Result<RawTensor> {
            let data = checkpoint.data(t);
            let (picked, row) = match t.numel() {
                1 => (vec![0], data.len()),
                _ => (ids.clone(), data.len() / vocab),
            };
            let mut bytes = Vec::with_capacity(picked.len() * row);
            for &id in &picked {
                bytes.extend_from_slice(&data[id * row..(id + 1) * row]);
            }
            let n = bytes.len();
            Ok(RawTensor {
                dtype: t.dtype,
                shape: vec![picked.len(), row / t.dtype.size_bytes() as usize],
                bytes: Tensor::from_vec(bytes, n, &self.device)?,
            })
        };
        let embedding = rows(&self.embed)?;
        let scale = self.embed_scale.as_ref().map(rows).transpose()?;
        Ok(dequantize(&embedding, scale.as_ref(), self.dtype)?.reshape((b, t, hidden))?)
    }
}

/// Writes hidden states and logits as safetensors to `path` (through a temporary file).
pub fn dump(path: &std::path::Path, hidden: &Tensor, logits: Option<&Tensor>) -> Result<()> {
    let mut tensors = HashMap::new();
    tensors.insert(
        "hidden_states".to_string(),
        hidden.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
    );
    if let Some(l) = logits {
        tensors.insert(
            "logits".to_string(),
            l.to_dtype(DType::F32)?.to_device(&Device::Cpu)?,
        );
    }
    let out = crate::output::Output::begin(path)?;
    candle_core::safetensors::save(&tensors, out.temp_path())
        .with_context(|| format!("cannot write {}", path.display()))?;
    out.commit()
}
