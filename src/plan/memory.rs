//! Buffer sizes: the one source of truth for how much device and pinned memory each buffer
//! takes. The estimator adds these up; the engine sizes its allocations with the same
//! functions, so the estimate cannot drift from the code.
//!
//! Calibration: the constants in the "calibration" block are the only numbers not derived
//! from the model. Checked against NVML's peak on an NVIDIA H200 (driver 580, CUDA 13.0) on
//! 2026-11-27 at commit 69d9bed, 7B float8, N = 0..28: the estimates sat 35-133 MiB (0.5-7.2%)
//! above the measurements at batch 1 and 143-185 MiB at batch 4. On 2026-11-28, once prefill
//! multiplied float8 weights without bf16 copies, `bench`'s peaks at N = 28, 8 and 0 fell by
//! 160-224 MiB and the estimates sat 147-158 MiB above them (2.1-9.1%): the margin went from 256
//! to 160 MiB, leaving them 51-62 MiB above (0.8-3.6%); RESULTS.md has the runs.

use crate::arch::config::ModelConfig;
use crate::arch::speech::TokenizerConfig;
use crate::arch::Role;
use crate::checkpoint::header::TensorInfo;
use crate::checkpoint::inventory::{Inventory, Part};
use crate::checkpoint::scales::{layer_entry, LayerEntry};
use crate::dtype::DType;
use serde::{Deserialize, Serialize};

const MIB: u64 = 1 << 20;

// ---- calibration ----------------------------------------------------------------------------

/// Device memory taken by the CUDA context, cuBLAS workspace and loaded kernel modules before
/// the model allocates anything (checked on an H200, 2026-11-27: see the module note).
pub const CUDA_CONTEXT_BYTES: u64 = 600 * MIB;
/// Headroom for allocator rounding and fragmentation (checked with the context above).
pub const MARGIN_BYTES: u64 = 160 * MIB;
/// Full scope: what the speech components add to the context. They alone call cuBLAS (the
/// language model's products are the engine's own kernels), whose kernels and workspace are
/// the likely part. Calibration: on the lent H200 (2026-11-28), with every modelled term in
/// place, `generate`'s NVML peaks sat 50-73 MiB above its estimates at N = 28, 8 and 0 (with
/// either voice length, with and without CUDA graphs), where `bench`'s sit 51-62 MiB below.
pub const SPEECH_CONTEXT_BYTES: u64 = 128 * MIB;

// ---- engine constants -----------------------------------------------------------------------

/// The longest sequence a plan or a run takes (tokens): far beyond VibeVoice's context, and
/// small enough that no size derived from it overflows.
pub const MAX_SEQ_LEN: u64 = 1 << 20;
/// The most sequences decoded together.
pub const MAX_BATCH: u64 = 1024;
/// The most streaming slots.
pub const MAX_SLOTS: u64 = 64;
/// GPU slots that offloaded layers stream through.
pub const DEFAULT_STREAM_SLOTS: usize = 2;
/// Longest run of prompt tokens one forward pass processes; longer prompts are prefilled in
/// chunks of this size, which bounds the attention scores' memory.
pub const PREFILL_CHUNK_TOKENS: u64 = 512;
/// Rows of a float8 LM head decoded at a time (where it is decoded: see [`GEMM_MIN_WEIGHT`]).
pub const LM_HEAD_CHUNK_ROWS: u64 = 16384;
/// The smallest float8 weight (elements) whose product with a prefill's many rows the GPU
/// computes from the float8 bytes (engine `gemm.cu`); smaller ones are decoded to a bf16 copy
/// for cuBLAS, except a decoder layer's projections, which always take the product (its fused
/// layer saves more than a small copy costs). The product's point is the copy it saves, which is small for small weights,
/// while its 128 x 128 tiles fit their long thin shapes badly: the speech tokenizers' shallow
/// feed-forward layers (64-256 channels, 400-3,200 steps a frame, weights of 16-262 Ki
/// elements) took 13-30 us each in it on the lent H200 against ~7 us decoded and in cuBLAS.
pub const GEMM_MIN_WEIGHT: u64 = 1 << 20;
/// Most slices a float8 product's inputs are split into (split-K, for products of few tiles)...
pub const PRODUCT_MAX_SLICES: u64 = 8;
/// ...and the most their partial sums may take: the engine splits less rather than more.
pub const PRODUCT_SCRATCH_BYTES: u64 = 24 * MIB;
/// Bytes per partial sum of a split product (f32).
pub const PARTIAL_SUM_BYTES: u64 = 4;
/// The head width the GPU's prefill attention is written for (engine `prefill_attention.cu`),
/// which keeps each block's scores on chip: no scores in device memory for it.
pub const PREFILL_HEAD_DIM: usize = 128;
/// Frames of a voice prompt the acoustic encoder takes at a time (engine: `generate`'s voice
/// encoding, `Encoder::encode_in_pieces`): 102,400 samples (4.3 s) for the real model, which
/// bounds the encoding's working memory whatever the voice's length.
pub const VOICE_PIECE_FRAMES: u64 = 32;
/// The acoustic encoder's peak working memory, in units of its widest feed-forward
/// intermediate (`4 C x T` activations). Calibration: on the lent H200 (2026-11-28, 3f4882a)
/// the peak of `generate` grew by 1,222 bytes a sample of the longest voice, encoded whole:
/// 4.8 intermediates of the first stages' 128 channels.
pub const ENCODER_PEAK_INTERMEDIATES: u64 = 5;
/// Bytes per activation element (bf16).
pub const ACTIVATION_BYTES: u64 = 2;
/// Bytes per cached key or value element (bf16).
pub const KV_BYTES: u64 = 2;
/// Bytes per cached key or value of a layer the host CPU computes (f32, which its attention
/// reads in place).
pub const HOST_KV_BYTES: u64 = 4;
/// Bytes per decoded float8 scale (f32).
pub const SCALE_BYTES: u64 = 4;
/// Bytes per attention score and logit (f32, for a stable softmax).
pub const SCORE_BYTES: u64 = 4;

/// Whether the engine decodes a decoder layer's tensor once at load and keeps it on the
/// device, streamed layers included (engine::model::Decoded): norm weights and biases in the
/// activations' dtype, float8 scales in f32; and how many copies (the q, k and v biases are
/// held a second time side by side for the fused projection).
pub fn decoded_copies(rel: &str) -> Option<(u64, u64)> {
    match layer_entry(rel) {
        LayerEntry::Tensor(t) => match t.role() {
            Role::Norm => Some((1, ACTIVATION_BYTES)),
            Role::Bias => Some((2, ACTIVATION_BYTES)),
            _ => None,
        },
        LayerEntry::Scale(_) => Some((1, SCALE_BYTES)),
        LayerEntry::Other => None,
    }
}

/// Device bytes of every decoder layer's tensors decoded once at load ([`decoded_copies`]).
/// All layers hold the same tensors (the inventory checks it), so layer 0 speaks for all.
pub fn decoded_vector_bytes(inventory: &Inventory) -> u64 {
    let per_layer: u64 = inventory
        .layer_tensors(0)
        .filter_map(|(rel, t)| decoded_copies(rel).map(|(n, bytes)| n * t.numel() * bytes))
        .sum();
    inventory.num_layers() as u64 * per_layer
}

/// Streaming slots for offloaded layers of these packed sizes when `slots` are asked for: no
/// more slots than offloaded layers, each as large as the largest. Returns (count, bytes each).
pub fn stream_slots(slots: usize, offloaded_packed_bytes: &[u64]) -> (usize, u64) {
    let count = slots.min(offloaded_packed_bytes.len());
    (
        count,
        offloaded_packed_bytes.iter().copied().max().unwrap_or(0),
    )
}

/// Shape of one layer's KV cache: `[2 (keys, values), sequences, kv heads, max_seq_len, head
/// width]`, elements of [`KV_BYTES`].
pub fn kv_cache_shape(config: &ModelConfig, sequences: usize, max_seq_len: usize) -> [usize; 5] {
    [
        2,
        sequences,
        config.num_key_value_heads,
        max_seq_len,
        config.head_dim,
    ]
}

/// Keys and values of `layers` layers for `sequences` sequences of up to `max_seq_len` tokens.
pub fn kv_cache_bytes(config: &ModelConfig, sequences: u64, max_seq_len: u64, layers: u64) -> u64 {
    // Saturating: an absurd configuration plans as "does not fit", never as a wrapped size.
    let shape = kv_cache_shape(config, sequences as usize, max_seq_len as usize);
    shape
        .iter()
        .fold(layers.saturating_mul(KV_BYTES), |acc, &d| {
            acc.saturating_mul(d as u64)
        })
}

/// Device memory a forward pass needs beyond weights and cache, on a GPU with tensor cores
/// (sm_80 and newer, which the engine's float8 kernels need; an older GPU decodes every
/// matrix for a prefill and keeps the attention scores in memory, beyond this estimate).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkingMemory {
    /// The largest float8 matrix decoded to bf16 at once (0 for bf16 checkpoints and for LM
    /// heads of at least [`GEMM_MIN_WEIGHT`] elements).
    pub dequant_scratch_bytes: u64,
    /// The float8 products' split-K partial sums (f32), at most [`PRODUCT_SCRATCH_BYTES`].
    #[serde(default)]
    pub product_scratch_bytes: u64,
    /// Residual stream, projections and MLP intermediates of the tokens in flight.
    pub activations_bytes: u64,
    /// Attention scores and probabilities.
    pub attention_scores_bytes: u64,
    /// Last-position logits.
    pub logits_bytes: u64,
    /// Full scope: the speech components' own working memory, at its largest while a voice
    /// prompt is encoded ([`voice_encoding_bytes`]). It is never in use during a language-model
    /// step, so it counts only where it exceeds the sum of the terms above.
    #[serde(default)]
    pub speech_bytes: u64,
}

impl WorkingMemory {
    /// The language model's terms summed, or the speech components' where larger.
    pub fn total_bytes(&self) -> u64 {
        let language_model = self.dequant_scratch_bytes
            + self.product_scratch_bytes
            + self.activations_bytes
            + self.attention_scores_bytes
            + self.logits_bytes;
        language_model.max(self.speech_bytes)
    }
}

/// Device bytes of the tokenizers' float8 weights of fewer than [`GEMM_MIN_WEIGHT`] elements
/// decoded once at load beside their float8 bytes (engine `speech::conv` and `speech::nn`):
/// every weight of two or more dimensions in the acoustic encoder and decoder and the
/// semantic encoder but the depthwise mixers'.
pub fn decoded_tokenizer_bytes(inventory: &Inventory) -> u64 {
    use crate::arch::vibevoice::Component;
    [
        Component::AcousticEncoder,
        Component::AcousticDecoder,
        Component::SemanticEncoder,
    ]
    .into_iter()
    .flat_map(|c| inventory.part_tensors(Part::Speech(c)))
    .filter(|t| {
        t.dtype == DType::F8E4M3
            && t.shape.len() >= 2
            && t.numel() < GEMM_MIN_WEIGHT
            && !t.name.contains(".mixer.")
    })
    .map(|t| t.numel() * ACTIVATION_BYTES)
    .sum()
}

/// Device memory the acoustic encoder takes beyond its weights to encode a voice prompt: one
/// piece of [`VOICE_PIECE_FRAMES`] frames, [`ENCODER_PEAK_INTERMEDIATES`] times the widest
/// stage's feed-forward intermediate.
pub fn voice_encoding_bytes(tokenizer: &TokenizerConfig) -> u64 {
    let stack = &tokenizer.encoder;
    let mut steps = VOICE_PIECE_FRAMES * stack.hop() as u64;
    let mut widest = 0;
    for stage in 0..stack.depths.len() {
        if stage > 0 {
            steps = steps.div_ceil(stack.ratios[stage - 1] as u64);
        }
        widest = widest.max(4 * stack.encoder_width(stage) as u64 * steps);
    }
    ENCODER_PEAK_INTERMEDIATES * widest * ACTIVATION_BYTES
}

/// Working memory of one forward step over `step_tokens` new tokens of each of `sequences`
/// sequences, attending to `kv_len` positions.
pub fn working_memory(
    config: &ModelConfig,
    inventory: &Inventory,
    sequences: u64,
    step_tokens: u64,
    kv_len: u64,
    with_logits: bool,
) -> WorkingMemory {
    let w = config.widths();
    let tokens = sequences * step_tokens;
    // Residual, normed input, attention output, o_proj output (4h); q, k, v and their rotated
    // copies (2(q + 2kv)); gate, up and their product (3i).
    let activations_bytes =
        tokens * (4 * w.hidden + 2 * (w.q + 2 * w.kv) + 3 * w.intermediate) * ACTIVATION_BYTES;
    // Scores and softmax probabilities, unless the GPU's prefill attention keeps them on chip.
    let attention_scores_bytes = match config.head_dim == PREFILL_HEAD_DIM {
        true => 0,
        false => {
            2 * sequences * config.num_attention_heads as u64 * step_tokens * kv_len * SCORE_BYTES
        }
    };
    // Split-K partial sums of the widest product that splits (q/k/v side by side, o, down;
    // gate/up never split) for a step's rows.
    let widest = (w.q + 2 * w.kv).max(w.hidden);
    let product_scratch_bytes =
        (PRODUCT_MAX_SLICES * tokens * widest * PARTIAL_SUM_BYTES).min(PRODUCT_SCRATCH_BYTES);
    let logits_bytes = if with_logits {
        sequences * config.vocab_size as u64 * SCORE_BYTES
    } else {
        0
    };
    WorkingMemory {
        dequant_scratch_bytes: dequant_scratch_bytes(config, inventory),
        product_scratch_bytes,
        activations_bytes,
        attention_scores_bytes,
        logits_bytes,
        speech_bytes: 0,
    }
}

/// The largest float8 matrix the engine decodes to bf16 at once for a prefill: a chunk of
/// [`LM_HEAD_CHUNK_ROWS`] rows of an LM head below [`GEMM_MIN_WEIGHT`] elements (larger ones,
/// and every decoder-layer projection, are multiplied as float8).
pub fn dequant_scratch_bytes(config: &ModelConfig, inventory: &Inventory) -> u64 {
    let head = if config.tie_word_embeddings {
        inventory.part_tensors(Part::Embeddings).next()
    } else {
        inventory.part_tensors(Part::LmHead).next()
    };
    let decoded = |t: &&TensorInfo| t.dtype == DType::F8E4M3 && t.numel() < GEMM_MIN_WEIGHT;
    head.filter(decoded).map_or(0, |_| {
        LM_HEAD_CHUNK_ROWS.min(config.vocab_size as u64) * config.hidden_size as u64
    }) * ACTIVATION_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::config::BuiltinModel;

    #[test]
    fn kv_cache_of_7b_at_4096_tokens() {
        // 28 layers x 4096 tokens x 2 (k, v) x 4 heads x 128 x 2 bytes = 224 MiB.
        let c = BuiltinModel::Large7b.config();
        assert_eq!(kv_cache_bytes(&c, 1, 4096, 28), 224 * MIB);
    }

    /// The VibeVoice layout of `config` at `precision`, as an inventory.
    fn inventory_of(
        config: &ModelConfig,
        precision: crate::checkpoint::layout::Precision,
    ) -> Inventory {
        use crate::checkpoint::layout;
        let speech = crate::arch::speech::SpeechConfig::small(config.hidden_size);
        let specs = layout::vibevoice(config, &speech, precision);
        Inventory::new(layout::tensor_infos(specs)).unwrap()
    }

    /// The built-in `model`'s configuration and inventory at `precision`.
    fn inventory(
        model: BuiltinModel,
        precision: crate::checkpoint::layout::Precision,
    ) -> (ModelConfig, Inventory) {
        let c = model.config();
        let inv = inventory_of(&c, precision);
        (c, inv)
    }

    #[test]
    fn a_prefill_decodes_only_a_small_head_and_keeps_no_scores_at_head_width_128() {
        use crate::checkpoint::layout::Precision;
        // 7B float8: the LM head is at least 2^20 elements, so nothing is decoded; a 512-token chunk's split-K sums are capped, 16 tokens' are 8 slices of
        // q/k/v's 4,608 outputs.
        let (c, inv) = inventory(BuiltinModel::Large7b, Precision::Float8Plain);
        let chunk = working_memory(&c, &inv, 1, 512, 4096, true);
        assert_eq!(chunk.dequant_scratch_bytes, 0);
        assert_eq!(chunk.attention_scores_bytes, 0);
        assert_eq!(chunk.product_scratch_bytes, PRODUCT_SCRATCH_BYTES);
        let short = working_memory(&c, &inv, 1, 16, 4096, true);
        assert_eq!(short.product_scratch_bytes, 8 * 16 * 4608 * 4);
        // 1.5B float8: k and v (256 x 1,536) are below the product's threshold, but a decoder
        // layer's projections take it whatever their size.
        let (c, inv) = inventory(BuiltinModel::Small1_5b, Precision::Float8Plain);
        assert_eq!(dequant_scratch_bytes(&c, &inv), 0);
        // A small model's LM head (512 x 256) is decoded.
        let small = ModelConfig {
            hidden_size: 256,
            intermediate_size: 512,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            head_dim: 128,
            num_hidden_layers: 2,
            vocab_size: 512,
            tie_word_embeddings: false,
            ..c
        };
        let inv = inventory_of(&small, Precision::Float8Plain);
        assert_eq!(
            dequant_scratch_bytes(&small, &inv),
            512 * 256 * ACTIVATION_BYTES
        );
        // bf16 weights are never decoded; a head width other than 128 keeps its scores.
        let (c, inv) = inventory(BuiltinModel::Large7b, Precision::BF16);
        assert_eq!(dequant_scratch_bytes(&c, &inv), 0);
        let narrow = ModelConfig { head_dim: 64, ..c };
        let w = working_memory(&narrow, &inv, 1, 512, 4096, true);
        assert_eq!(w.attention_scores_bytes, 2 * 28 * 512 * 4096 * SCORE_BYTES);
    }

    #[test]
    fn a_voice_piece_is_five_of_the_first_stages_intermediates() {
        // The real acoustic encoder: 32, 64 and 128 channels at 102,400, 51,200 and 25,600
        // steps hold 128 x 102,400 activations in each of their feed-forward intermediates.
        let speech = crate::arch::speech::SpeechConfig::real(3584);
        let piece = VOICE_PIECE_FRAMES * 3200;
        assert_eq!(
            voice_encoding_bytes(&speech.acoustic),
            5 * 4 * 32 * piece * ACTIVATION_BYTES
        );
        // Counted where it exceeds the language model's terms, not on top of them.
        let w = WorkingMemory {
            activations_bytes: 100,
            speech_bytes: 70,
            ..WorkingMemory::default()
        };
        assert_eq!(w.total_bytes(), 100);
        assert_eq!(
            WorkingMemory {
                speech_bytes: 170,
                ..w
            }
            .total_bytes(),
            170
        );
    }

    #[test]
    fn small_tokenizer_weights_are_counted_decoded_but_mixers_and_large_ones_not() {
        use crate::checkpoint::layout::{self, Precision};
        let tokenizers = |precision| {
            let c = BuiltinModel::Large7b.config();
            let speech = crate::arch::speech::SpeechConfig::real(c.hidden_size);
            let specs = layout::vibevoice(&c, &speech, precision);
            decoded_tokenizer_bytes(&Inventory::new(layout::tensor_infos(specs)).unwrap())
        };
        // Each encoder: the feed-forward linears of the 32- to 256-channel stages (3 blocks of
        // 8 C^2), the convolutions below 2^20 (stem 224, strided 8,192 + 32,768 + 262,144) and
        // the acoustic head (64 x 2,048 x 7 = 917,504; the semantic one's 128 channels are
        // not small); the decoder the same linears and stem, transposed 262,144 + 32,768 +
        // 8,192 and head 224. The 512-channel linears are 2^20: not small.
        let linears = 3 * 8 * (32 * 32 + 64 * 64 + 128 * 128 + 256 * 256);
        let convs = 224 + 8_192 + 32_768 + 262_144;
        let acoustic = linears + convs + 917_504;
        let elements = 2 * acoustic + (linears + convs);
        assert_eq!(
            tokenizers(Precision::Float8Plain),
            elements * ACTIVATION_BYTES
        );
        assert_eq!(tokenizers(Precision::BF16), 0);
    }

    #[test]
    fn decoded_vectors_count_scales_in_f32_and_qkv_biases_twice() {
        use crate::checkpoint::layout::{Precision, ScaleConvention, ScaleGranularity};
        let precision =
            Precision::Float8Scaled(ScaleConvention::ScaleWeight, ScaleGranularity::PerChannel);
        let (_, inventory) = inventory(BuiltinModel::Small1_5b, precision);
        // Per layer: two norms of 1536 and the q/k/v biases (1536 + 256 + 256, held twice) in
        // bf16; per-channel scales for q, k, v, o, gate, up, down in f32.
        let norms = 2 * 1536 * 2;
        let biases = 2 * (1536 + 256 + 256) * 2;
        let scales = (1536 + 256 + 256 + 1536 + 8960 + 8960 + 1536) * 4;
        assert_eq!(
            decoded_vector_bytes(&inventory),
            28 * (norms + biases + scales)
        );
    }
}
