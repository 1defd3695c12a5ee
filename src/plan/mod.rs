//! The planner: which layers stay on the GPU, and how much VRAM and pinned host memory that
//! takes, term by term. Pure: the model, the options and the VRAM budget go in, numbers come
//! out; NVML readings are an input, never a call made here.

pub mod budget;
pub mod calibration;
pub mod memory;
pub mod presets;
pub mod speed;

use crate::arch::vibevoice::Component;
use crate::checkpoint::inventory::Part;
use crate::checkpoint::ModelInfo;
use crate::UsageError;
use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

/// Which part of VibeVoice will run on the GPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Text-to-speech: language model, diffusion head, connectors and tokenizers, with a second
    /// (negative-prompt) KV cache for classifier-free guidance.
    Full,
    /// The language model alone (embeddings, decoder, final norm, LM head), as `run` loads it.
    LanguageModel,
}

/// Which decoder layers stay resident.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Placement {
    /// The last N (the original's choice).
    Last,
    /// The first N.
    First,
    /// N layers spread evenly through the stack.
    Spread,
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Placement::Last => "last-N",
            Placement::First => "first-N",
            Placement::Spread => "spread",
        })
    }
}

impl Placement {
    /// For each of `num_layers` layers, whether it is resident when `gpu_layers` are kept.
    pub fn resident(self, num_layers: usize, gpu_layers: usize) -> Vec<bool> {
        let n = gpu_layers.min(num_layers);
        (0..num_layers)
            .map(|i| match self {
                Placement::Last => i >= num_layers - n,
                Placement::First => i < n,
                Placement::Spread => (i + 1) * n / num_layers > i * n / num_layers,
            })
            .collect()
    }
}

/// For each layer, whether the host CPU computes it (hybrid decoding): `cpu_layers` of the
/// layers `resident` leaves off the GPU, spread evenly among them, so that the copies of the
/// streamed ones run while the CPU works and the copy engine never idles for long.
pub fn host_computed(resident: &[bool], cpu_layers: usize) -> Vec<bool> {
    let offloaded = resident.iter().filter(|&&r| !r).count();
    let c = cpu_layers.min(offloaded);
    let mut j = 0;
    resident
        .iter()
        .map(|&r| {
            if r {
                return false;
            }
            let host = (j + 1) * c / offloaded > j * c / offloaded;
            j += 1;
            host
        })
        .collect()
}

/// Planning options other than the layer count.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlanOptions {
    /// What runs on the GPU.
    pub scope: Scope,
    /// Keep the diffusion head in host memory (full scope only).
    pub offload_prediction_head: bool,
    /// Sequences decoded together.
    pub batch: u64,
    /// Longest sequence the KV cache holds.
    pub max_seq_len: u64,
    /// Which layers stay resident.
    pub placement: Placement,
    /// GPU slots that offloaded layers stream through.
    pub stream_slots: usize,
    /// Offloaded layers the host CPU computes instead of streaming them (hybrid decoding):
    /// their weights and KV caches stay in host memory.
    #[serde(default)]
    pub cpu_layers: usize,
}

impl Default for PlanOptions {
    fn default() -> Self {
        PlanOptions {
            scope: Scope::Full,
            offload_prediction_head: false,
            batch: 1,
            max_seq_len: 4096,
            placement: Placement::Last,
            stream_slots: memory::DEFAULT_STREAM_SLOTS,
            cpu_layers: 0,
        }
    }
}

impl PlanOptions {
    /// Sequences with a KV cache: the batch, doubled for classifier-free guidance in full scope.
    pub fn sequences(&self) -> u64 {
        match self.scope {
            Scope::Full => 2 * self.batch,
            Scope::LanguageModel => self.batch,
        }
    }

    /// Checks the numbers are usable.
    pub fn validate(&self) -> Result<()> {
        let bounds = [
            ("--batch", self.batch, memory::MAX_BATCH),
            ("--max-seq-len", self.max_seq_len, memory::MAX_SEQ_LEN),
            ("--slots", self.stream_slots as u64, memory::MAX_SLOTS),
        ];
        for (flag, value, max) in bounds {
            if !(1..=max).contains(&value) {
                bail!(UsageError::new(format!(
                    "{flag} {value} is out of range: use 1 to {max}"
                )));
            }
        }
        Ok(())
    }
}

/// VRAM (and pinned host memory) for one layer count, term by term.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VramEstimate {
    /// Decoder layers resident on the GPU.
    pub gpu_layers: usize,
    /// Decoder layers kept in host memory: streamed, or computed by the CPU.
    pub offloaded_layers: usize,
    /// Of those, the layers the host CPU computes (never copied; their caches in host memory).
    #[serde(default)]
    pub cpu_layers: usize,
    /// CUDA context, cuBLAS workspace, kernels (in full scope with what the speech
    /// components add: [`memory::SPEECH_CONTEXT_BYTES`]).
    pub cuda_context_bytes: u64,
    /// Final norm, LM head (the embedding when tied), every layer's norm weights and biases
    /// decoded to bf16 and, in full scope, the other VibeVoice parts (the tokenizers' small
    /// float8 weights also decoded to bf16); the embedding itself stays in host memory.
    pub non_layer_weights_bytes: u64,
    /// The resident decoder layers.
    pub resident_layers_bytes: u64,
    /// GPU slots that offloaded layers stream through.
    pub stream_buffers_bytes: u64,
    /// Keys and values of every layer the GPU computes.
    pub kv_cache_bytes: u64,
    /// With CPU-computed layers: the upload of one of them, with one sequence's keys and
    /// values, for a prefill, which runs on the GPU.
    #[serde(default)]
    pub host_prefill_bytes: u64,
    /// Dequantisation scratch, activations, attention scores and logits.
    #[serde(flatten)]
    pub working: memory::WorkingMemory,
    /// The working memory ([`memory::WorkingMemory::total_bytes`]).
    pub working_bytes: u64,
    /// Headroom for allocator rounding.
    pub margin_bytes: u64,
    /// Everything above.
    pub total_bytes: u64,
    /// Page-locked host memory for the streamed layers' packed copies.
    pub pinned_host_bytes: u64,
    /// Ordinary host memory for the CPU-computed layers and their KV caches.
    #[serde(default)]
    pub host_compute_bytes: u64,
}

/// Estimates VRAM for keeping `gpu_layers` decoder layers resident.
pub fn estimate(
    model: &ModelInfo,
    options: &PlanOptions,
    gpu_layers: usize,
) -> Result<VramEstimate> {
    let inventory = &model.inventory;
    let num_layers = inventory.num_layers();
    if gpu_layers > num_layers {
        bail!(UsageError::new(format!(
            "--num-gpu-layers {gpu_layers} is more than the model's {num_layers} layers; use 0 to {num_layers}"
        )));
    }
    options.validate()?;
    if options.cpu_layers > num_layers - gpu_layers {
        bail!(UsageError::new(format!(
            "--cpu-layers {} is more than the {} layers {gpu_layers} GPU layers leave offloaded; use 0 to {}",
            options.cpu_layers,
            num_layers - gpu_layers,
            num_layers - gpu_layers
        )));
    }
    let resident = options.placement.resident(num_layers, gpu_layers);
    let host = host_computed(&resident, options.cpu_layers);
    let resident_layers_bytes = (0..num_layers)
        .filter(|&i| resident[i])
        .map(|i| inventory.layer_bytes[i])
        .sum();
    let offloaded_packed: Vec<u64> = (0..num_layers)
        .filter(|&i| !resident[i] && !host[i])
        .map(|i| inventory.packed_layer_bytes[i])
        .collect();
    let (slots, slot_bytes) = memory::stream_slots(options.stream_slots, &offloaded_packed);
    let stream_buffers_bytes = slots as u64 * slot_bytes;

    // The token embedding stays in the mapped file (only the rows in use are uploaded), unless
    // it doubles as the LM head.
    let head = if model.config.tie_word_embeddings {
        Part::Embeddings
    } else {
        Part::LmHead
    };
    let mut parts = vec![Part::FinalNorm, head];
    if options.scope == Scope::Full {
        let offloaded =
            |c: &Component| options.offload_prediction_head && *c == Component::PredictionHead;
        parts.extend(
            Component::ALL
                .iter()
                .filter(|c| !offloaded(c))
                .map(|&c| Part::Speech(c)),
        );
        parts.extend([Part::Scalars, Part::Other]);
    }
    let decoded_tokenizer_bytes = match options.scope {
        Scope::Full => memory::decoded_tokenizer_bytes(inventory),
        Scope::LanguageModel => 0,
    };
    let non_layer_weights_bytes = parts.iter().map(|&p| inventory.part_bytes(p)).sum::<u64>()
        + memory::decoded_vector_bytes(inventory)
        + decoded_tokenizer_bytes;

    let config = &model.config;
    let sequences = options.sequences();
    let device_layers = (num_layers - options.cpu_layers) as u64;
    let kv_cache_bytes =
        memory::kv_cache_bytes(config, sequences, options.max_seq_len, device_layers);
    let host_kv_bytes = memory::kv_cache_bytes(
        config,
        sequences,
        options.max_seq_len,
        options.cpu_layers as u64,
    ) / memory::KV_BYTES
        * memory::HOST_KV_BYTES;
    let host_layers_bytes: u64 = (0..num_layers)
        .filter(|&i| host[i])
        .map(|i| inventory.layer_bytes[i])
        .sum();
    let host_prefill_bytes = (0..num_layers)
        .filter(|&i| host[i])
        .map(|i| inventory.layer_bytes[i])
        .max()
        .map_or(0, |layer| {
            layer + memory::kv_cache_bytes(config, 1, options.max_seq_len, 1)
        });
    let step_tokens = options.max_seq_len.min(memory::PREFILL_CHUNK_TOKENS);
    let mut working = memory::working_memory(
        config,
        inventory,
        sequences,
        step_tokens,
        options.max_seq_len,
        true,
    );
    if let (Scope::Full, Some(speech)) = (options.scope, &model.speech) {
        working.speech_bytes = memory::voice_encoding_bytes(&speech.acoustic);
    }
    let working_bytes = working.total_bytes();
    let cuda_context_bytes = memory::CUDA_CONTEXT_BYTES
        + match options.scope {
            Scope::Full => memory::SPEECH_CONTEXT_BYTES,
            Scope::LanguageModel => 0,
        };
    let total_bytes = [
        non_layer_weights_bytes,
        resident_layers_bytes,
        stream_buffers_bytes,
        kv_cache_bytes,
        host_prefill_bytes,
        working_bytes,
        memory::MARGIN_BYTES,
    ]
    .into_iter()
    .fold(cuda_context_bytes, u64::saturating_add);
    Ok(VramEstimate {
        gpu_layers,
        offloaded_layers: num_layers - gpu_layers,
        cpu_layers: options.cpu_layers,
        cuda_context_bytes,
        non_layer_weights_bytes,
        resident_layers_bytes,
        stream_buffers_bytes,
        kv_cache_bytes,
        host_prefill_bytes,
        working,
        working_bytes,
        margin_bytes: memory::MARGIN_BYTES,
        total_bytes,
        pinned_host_bytes: offloaded_packed.iter().sum(),
        host_compute_bytes: host_layers_bytes.saturating_add(host_kv_bytes),
    })
}

/// The largest layer count whose estimate fits `budget_bytes`, with its estimate; `None` when
/// even streaming every layer does not fit.
///
/// 1. Keeping every layer needs no stream slots, so it can fit where one layer fewer does not:
///    try it first.
/// 2. Below that the estimate grows with each resident layer, so binary-search 0..L-1.
pub fn fit(
    model: &ModelInfo,
    options: &PlanOptions,
    budget_bytes: u64,
) -> Result<Option<VramEstimate>> {
    // The CPU computes --cpu-layers of the layers left offloaded: at most this many resident.
    let num_layers = model
        .inventory
        .num_layers()
        .saturating_sub(options.cpu_layers);
    let all = estimate(model, options, num_layers)?;
    if all.total_bytes <= budget_bytes {
        return Ok(Some(all));
    }
    let (mut lo, mut hi) = (0usize, num_layers); // answer in [lo, hi): fits(lo) is known below
    if estimate(model, options, 0)?.total_bytes > budget_bytes {
        return Ok(None);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if estimate(model, options, mid)?.total_bytes <= budget_bytes {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(Some(estimate(model, options, lo)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::config::BuiltinModel;
    use crate::checkpoint::CheckpointDtype;

    const GIB: u64 = 1 << 30;

    fn seven_b() -> ModelInfo {
        ModelInfo::builtin(BuiltinModel::Large7b, CheckpointDtype::Float8)
    }

    #[test]
    fn placements_keep_n_layers() {
        for placement in [Placement::Last, Placement::First, Placement::Spread] {
            for n in 0..=28 {
                let r = placement.resident(28, n);
                assert_eq!(r.iter().filter(|&&x| x).count(), n, "{placement:?} {n}");
            }
        }
        assert_eq!(Placement::Last.resident(4, 1), [false, false, false, true]);
        assert_eq!(Placement::First.resident(4, 1), [true, false, false, false]);
        assert_eq!(Placement::Spread.resident(4, 2), [false, true, false, true]);
    }

    #[test]
    fn host_layers_spread_among_the_offloaded_ones() {
        let resident = Placement::Last.resident(8, 2);
        let host = host_computed(&resident, 3);
        assert_eq!(
            host,
            [false, true, false, true, false, true, false, false],
            "every other offloaded layer, none resident"
        );
        assert_eq!(
            host_computed(&resident, 6),
            [true, true, true, true, true, true, false, false]
        );
        assert!(host_computed(&resident, 0).iter().all(|&h| !h));
    }

    #[test]
    fn host_layers_leave_the_gpu_and_pinned_memory() {
        let m = seven_b();
        let o = PlanOptions::default();
        let streamed = estimate(&m, &o, 8).unwrap();
        let hybrid = estimate(
            &m,
            &PlanOptions {
                cpu_layers: 12,
                ..o.clone()
            },
            8,
        )
        .unwrap();
        let packed = m.inventory.packed_layer_bytes[0];
        assert_eq!(
            streamed.pinned_host_bytes - hybrid.pinned_host_bytes,
            12 * packed
        );
        assert_eq!(hybrid.kv_cache_bytes * 28, streamed.kv_cache_bytes * 16);
        assert_eq!(hybrid.stream_buffers_bytes, streamed.stream_buffers_bytes);
        assert_eq!(
            hybrid.host_compute_bytes,
            12 * m.inventory.layer_bytes[0] + 2 * streamed.kv_cache_bytes * 12 / 28
        );
        // Every offloaded layer on the host: nothing streams, no slots.
        let all = estimate(
            &m,
            &PlanOptions {
                cpu_layers: 20,
                ..o.clone()
            },
            8,
        )
        .unwrap();
        assert_eq!((all.stream_buffers_bytes, all.pinned_host_bytes), (0, 0));
        let e = estimate(
            &m,
            &PlanOptions {
                cpu_layers: 21,
                ..o.clone()
            },
            8,
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("--cpu-layers 21 is more than the 20"),
            "{e}"
        );
        // A fit leaves room for the host's layers.
        let fit_all = fit(&m, &PlanOptions { cpu_layers: 4, ..o }, u64::MAX).unwrap();
        assert_eq!(fit_all.map(|e| e.gpu_layers), Some(24));
    }

    #[test]
    fn terms_add_up_and_layers_cost_their_bytes() {
        let m = seven_b();
        let o = PlanOptions::default();
        let e8 = estimate(&m, &o, 8).unwrap();
        let e9 = estimate(&m, &o, 9).unwrap();
        assert_eq!(e9.total_bytes - e8.total_bytes, 233_057_792);
        assert_eq!(e8.resident_layers_bytes, 8 * 233_057_792);
        assert_eq!(e8.pinned_host_bytes, 20 * m.inventory.packed_layer_bytes[0]);
        let sum = e8.cuda_context_bytes
            + e8.non_layer_weights_bytes
            + e8.resident_layers_bytes
            + e8.stream_buffers_bytes
            + e8.kv_cache_bytes
            + e8.working_bytes
            + e8.margin_bytes;
        assert_eq!(sum, e8.total_bytes);
        let all = estimate(&m, &o, 28).unwrap();
        assert_eq!((all.stream_buffers_bytes, all.pinned_host_bytes), (0, 0));
        assert!(estimate(&m, &o, 29).is_err());
    }

    #[test]
    fn language_model_scope_leaves_out_the_tts_parts() {
        let m = seven_b();
        let full = estimate(&m, &PlanOptions::default(), 8).unwrap();
        let lm_options = PlanOptions {
            scope: Scope::LanguageModel,
            ..PlanOptions::default()
        };
        let lm = estimate(&m, &lm_options, 8).unwrap();
        let inv = &m.inventory;
        assert_eq!(
            lm.non_layer_weights_bytes,
            inv.part_bytes(Part::FinalNorm)
                + inv.part_bytes(Part::LmHead)
                + memory::decoded_vector_bytes(inv),
            "the embedding stays in host memory"
        );
        assert_eq!(
            full.kv_cache_bytes,
            2 * lm.kv_cache_bytes,
            "CFG keeps a second cache"
        );
    }

    #[test]
    fn fit_matches_a_linear_scan() {
        let m = seven_b();
        for options in [
            PlanOptions::default(),
            PlanOptions {
                scope: Scope::LanguageModel,
                placement: Placement::Spread,
                ..PlanOptions::default()
            },
        ] {
            for budget_mib in (2048..24576).step_by(97) {
                let budget = budget_mib << 20;
                let linear = (0..=28)
                    .rev()
                    .find(|&n| estimate(&m, &options, n).unwrap().total_bytes <= budget);
                let searched = fit(&m, &options, budget).unwrap().map(|e| e.gpu_layers);
                assert_eq!(searched, linear, "budget {budget_mib} MiB");
            }
        }
    }

    #[test]
    fn eight_gib_fits_fewer_layers_than_twelve() {
        let m = seven_b();
        let o = PlanOptions::default();
        let n8 = fit(&m, &o, 8 * GIB * 8 / 10).unwrap().map(|e| e.gpu_layers);
        let n12 = fit(&m, &o, 12 * GIB * 8 / 10)
            .unwrap()
            .map(|e| e.gpu_layers);
        assert!(n8.is_some() && n12.is_some() && n8 < n12, "{n8:?} {n12:?}");
    }
}
