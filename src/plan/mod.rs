//! The planner: which layers stay on the GPU, and how much VRAM and pinned host memory that
//! takes, term by term. Pure: the model, the options and the VRAM budget go in, numbers come
//! out; NVML readings are an input, never a call made here.

pub mod budget;
pub mod memory;
pub mod presets;

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
    /// Decoder layers streamed from host memory.
    pub offloaded_layers: usize,
    /// CUDA context, cuBLAS workspace, kernels.
    pub cuda_context_bytes: u64,
    /// Final norm, LM head (the embedding when tied), every layer's norm weights and biases
    /// decoded to bf16 and, in full scope, the other VibeVoice parts; the embedding itself stays
    /// in host memory.
    pub non_layer_weights_bytes: u64,
    /// The resident decoder layers.
    pub resident_layers_bytes: u64,
    /// GPU slots that offloaded layers stream through.
    pub stream_buffers_bytes: u64,
    /// Keys and values of every layer.
    pub kv_cache_bytes: u64,
    /// Dequantisation scratch, activations, attention scores and logits.
    #[serde(flatten)]
    pub working: memory::WorkingMemory,
    /// Sum of the working-memory terms.
    pub working_bytes: u64,
    /// Headroom for allocator rounding.
    pub margin_bytes: u64,
    /// Everything above.
    pub total_bytes: u64,
    /// Page-locked host memory for the offloaded layers' packed copies.
    pub pinned_host_bytes: u64,
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
    let resident = options.placement.resident(num_layers, gpu_layers);
    let resident_layers_bytes = (0..num_layers)
        .filter(|&i| resident[i])
        .map(|i| inventory.layer_bytes[i])
        .sum();
    let offloaded_packed: Vec<u64> = (0..num_layers)
        .filter(|&i| !resident[i])
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
    let non_layer_weights_bytes = parts.iter().map(|&p| inventory.part_bytes(p)).sum::<u64>()
        + memory::decoded_vector_bytes(inventory);

    let config = &model.config;
    let sequences = options.sequences();
    let kv_cache_bytes =
        memory::kv_cache_bytes(config, sequences, options.max_seq_len, num_layers as u64);
    let step_tokens = options.max_seq_len.min(memory::PREFILL_CHUNK_TOKENS);
    let working = memory::working_memory(
        config,
        inventory,
        sequences,
        step_tokens,
        options.max_seq_len,
        true,
    );
    let working_bytes = working.total_bytes();
    let total_bytes = [
        non_layer_weights_bytes,
        resident_layers_bytes,
        stream_buffers_bytes,
        kv_cache_bytes,
        working_bytes,
        memory::MARGIN_BYTES,
    ]
    .into_iter()
    .fold(memory::CUDA_CONTEXT_BYTES, u64::saturating_add);
    Ok(VramEstimate {
        gpu_layers,
        offloaded_layers: num_layers - gpu_layers,
        cuda_context_bytes: memory::CUDA_CONTEXT_BYTES,
        non_layer_weights_bytes,
        resident_layers_bytes,
        stream_buffers_bytes,
        kv_cache_bytes,
        working,
        working_bytes,
        margin_bytes: memory::MARGIN_BYTES,
        total_bytes,
        pinned_host_bytes: offloaded_packed.iter().sum(),
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
    let num_layers = model.inventory.num_layers();
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
