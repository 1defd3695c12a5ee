//! The engine's custom ops as data: what each computes and the constants its kernels are built
//! around. Each op's CPU reference and candle glue live in its own module (`dequant`,
//! `matvec`, `attention`, `cache`; the speech tokenizers' in `speech::fused`) and its CUDA
//! launcher in `cuda::ops` (`cuda::speech`); both depend on this file, not on each other.

use crate::dtype::DType;
use candle_core::Tensor;

/// How a scale tensor maps onto a weight's elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScaleLayout {
    /// 1 for a scalar scale, else the weight's rows.
    pub rows: usize,
    /// Column blocks per row (1 unless blockwise).
    pub blocks: usize,
}

impl ScaleLayout {
    /// The layout of a scale of shape `scale_shape` for a weight of shape `weight_shape`.
    pub fn of(scale_shape: &[usize], weight_shape: &[usize]) -> ScaleLayout {
        let elements: usize = scale_shape.iter().product();
        if elements <= 1 {
            return ScaleLayout { rows: 1, blocks: 1 };
        }
        let rows = weight_shape.first().copied().unwrap_or(1);
        ScaleLayout {
            rows,
            blocks: elements / rows.max(1),
        }
    }

    /// Index into the scale of element (`row`, `col`) of a matrix with `cols` columns.
    pub fn index(&self, row: usize, col: usize, cols: usize) -> usize {
        let r = if self.rows == 1 { 0 } else { row };
        r * self.blocks + col / (cols / self.blocks).max(1)
    }
}

/// Decodes stored bytes into `out` (F32 or BF16), optionally times a scale.
#[derive(Clone, Debug)]
pub struct Dequantize {
    /// Stored element type.
    pub src: DType,
    /// Shape of the result.
    pub shape: Vec<usize>,
    /// Result dtype.
    pub out: candle_core::DType,
    /// Scale layout, when a scale tensor is the second operand.
    pub scale: Option<ScaleLayout>,
}

/// Most rows of `x` the matrix-vector kernel takes; on the GPU more rows (prefill) take the
/// matrix product (`GEMM_*`), on the CPU they decode `W` once and multiply.
pub const MATVEC_MAX_ROWS: usize = 8;

/// Most rows of `x` the GPU's wide matrix-vector kernel takes (three groups of
/// [`MATVEC_MAX_ROWS`], the weights decoded once for all): products without a norm, gate, GELU
/// or gating, such as the diffusion head's adaLN modulations of a frame's steps at once. Each
/// row comes out with the bits it has in a group of its own.
pub const MATVEC_WIDE_ROWS: usize = 24;

/// The GPU's matrix product for more rows (`gemm.cu`): a block's tile of rows of `x`...
pub const GEMM_BM: usize = 128;

/// ...by output features...
pub const GEMM_BN: usize = 128;

/// ...taken this many input features at a time...
pub const GEMM_BK: usize = 64;

/// ...that many steps ahead (cp.async stages in shared memory).
pub const GEMM_STAGES: usize = 3;

/// On the GPU, each weight's rows come in tiles of this many (one block each)...
pub const TILE_ROWS: usize = 16;

/// ...and its inputs in steps of this many (one tensor-core tile wide).
pub const TILE_INPUTS: usize = 64;

/// One weight of a fused product: float8 bytes `[rows, in]` and an optional f32 scale (one
/// value, or one per row).
#[derive(Clone, Debug)]
pub struct Segment {
    /// The weight's bytes (U8).
    pub bytes: Tensor,
    /// Its rows (output features).
    pub rows: usize,
    /// Its decoded scale.
    pub scale: Option<Tensor>,
}

/// `x [rows, in]` (RMS-normalised first when `norm` is given) times the segments' weights,
/// their outputs side by side; then `+ bias`, `+ residual`; or, when `gated`,
/// `silu(x W0^T) * (x W1^T)` for two segments of equal size.
#[derive(Clone, Debug)]
pub struct FusedMatVec {
    /// One to three weights.
    pub segments: Vec<Segment>,
    /// Input features.
    pub in_features: usize,
    /// Added to each output row (`[outputs]`, the activation dtype).
    pub bias: Option<Tensor>,
    /// Added to the output (`[rows, outputs]`, the activation dtype).
    pub residual: Option<Tensor>,
    /// `silu(first) * second` instead of the two side by side.
    pub gated: bool,
    /// RMSNorm of each row of x first: its weight (`[in]`, the activation dtype) and epsilon.
    pub norm: Option<(Tensor, f32)>,
    /// With `norm`, the adaLN modulation of the normalised rows, `(1 + scale, shift)`, each
    /// `[rows, in]` (the activation dtype; one row stride for both): the normalised value
    /// rounded to the activation dtype, times `1 + scale`, plus `shift`, each step rounded as
    /// the unfused ops round it.
    pub modulation: Option<(Tensor, Tensor)>,
    /// GELU (erf) of each output after the bias, as candle's `gelu_erf` computes it on the
    /// rounded value (the tokenizers' feed-forward).
    pub gelu: bool,
    /// With `residual`, `residual + gate ⊙ y` instead of `residual + y`: `y` and the product
    /// rounded to the activation dtype first, as the unfused ops (`[rows, outputs]`, the
    /// activation dtype; its rows may be strided).
    pub gate: Option<Tensor>,
    /// The weights never change while the engine lives, so on the GPU the kernel may load
    /// them before the kernel before it has finished (programmatic dependent launch).
    pub resident_weights: bool,
    /// On the GPU, a U32 word the kernel lowers to the tag when an output is NaN or infinite
    /// (see [`crate::engine::watch`]); the CPU path leaves the check to the engine.
    pub watch: Option<(Tensor, u32)>,
}

impl FusedMatVec {
    /// `x` times `segments` side by side, nothing fused around them, weights not resident.
    pub fn new(segments: Vec<Segment>, in_features: usize) -> FusedMatVec {
        FusedMatVec {
            segments,
            in_features,
            bias: None,
            residual: None,
            gated: false,
            norm: None,
            modulation: None,
            gelu: false,
            gate: None,
            resident_weights: false,
            watch: None,
        }
    }

    /// Output features.
    pub fn out_features(&self) -> usize {
        if self.gated {
            self.segments[0].rows
        } else {
            self.segments.iter().map(|s| s.rows).sum()
        }
    }
}

/// `softmax(q K^T / sqrt(d)) V` for `tokens` queries per sequence, their heads side by side
/// (`q_stride` elements apart from one query row to the next), against `k`, `v` `[b, kv_heads,
/// len, d]` (any strides, as the cache's views have). One token (decoding) gives `[b, heads, 1,
/// d]`; more (a prefill pass, its keys already stored) attend causally, query `i` at position
/// `pos + i` seeing keys `0..=pos + i` of the last `tokens` of `len`, and give `[b, tokens,
/// heads, d]`.
#[derive(Clone, Debug)]
pub struct DecodeAttention {
    /// Queries per sequence.
    pub tokens: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Cached positions.
    pub len: usize,
    /// Head width.
    pub head_dim: usize,
    /// Elements from one query row to the next.
    pub q_stride: usize,
    /// Rotates the queries first: the rotary table `[max_len, d]` (cosines, then sines) and
    /// the first query's position (needed for more than one token).
    pub rope: Option<(Tensor, usize)>,
}

/// Warps per (head, sequence) in the GPU kernel.
pub const ATTENTION_WARPS: usize = 16;

/// One decode step's attention for several sequences (lanes) on the GPU, applied to their
/// fused q/k/v rows `[lanes, 1, q_stride]`: each lane's new key (rotated) and value stored in
/// its cache at its position, and its query attended over the cache, in one launch a lane
/// (not a store, an attention and a copy to join the lanes' outputs); gives `[lanes, heads, 1,
/// head_dim]` with the bits of [`StoreKv`] then [`DecodeAttention`].
#[derive(Clone, Debug)]
pub struct StepAttention {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Elements of one q/k/v row.
    pub q_stride: usize,
    /// Each lane's cache buffer `[2, 1, kv_heads, max_len, head_dim]` and its new token's
    /// position.
    pub lanes: Vec<(Tensor, usize)>,
    /// The rotary table `[max_len, head_dim]` (cosines, then sines).
    pub table: Tensor,
}

/// Stores `t` new positions' keys (rotated) and values from a q/k/v row `[b, t, (heads + 2 x
/// kv_heads) x head_dim]` into the cache buffer at `pos`; the second operand is the rotary
/// table `[max_len, head_dim]` (cosines, then sines).
#[derive(Clone, Debug)]
pub struct StoreKv {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Head width.
    pub head_dim: usize,
    /// Sequences.
    pub batch: usize,
    /// New positions.
    pub tokens: usize,
    /// Position of the first.
    pub pos: usize,
    /// Positions the buffer holds.
    pub max_len: usize,
}

/// The first half of the speech tokenizers' residual block (the original's `Block1D`), in one
/// op: `x + gamma ⊙ (bias + DWConv(RMSNorm_C(x)))` on `x` `[B, C, T]` (any strides), where the
/// channel RMSNorm normalises each time step in f32, rounds to `x`'s dtype and then multiplies
/// by `norm` (as `speech::nn::rms_norm` does), and the depthwise causal convolution (kernel
/// `k`, stride 1) accumulates in f32 over the `k - 1` inputs before each step: zeros at the
/// start, or the second operand `[B, C, k - 1]` (any strides), the raw inputs a stream carried
/// over. Every step rounds to `x`'s dtype (f32 or bf16) where the unfused ops would.
///
/// The result is `[B, C, T]`, or with `stream` `[B, C, T + k - 1]`: its last `k - 1` columns
/// are the last `k - 1` raw inputs (cache, then `x`), the next chunk's second operand.
#[derive(Clone, Debug)]
pub struct DepthwiseMixer {
    /// The norm's weight `[C]` (`x`'s dtype).
    pub norm: Tensor,
    /// The norm's epsilon.
    pub eps: f32,
    /// The convolution's weight `[C, k]`, f32.
    pub taps: Tensor,
    /// The convolution's bias `[C]` (`x`'s dtype).
    pub bias: Tensor,
    /// The layer scale `[C]` (`x`'s dtype).
    pub gamma: Tensor,
    /// Append the next chunk's cache to the result.
    pub stream: bool,
}

/// The channel RMSNorm of `x` `[B, C, T]` (any strides) into `[B, T, C]` (contiguous): each
/// time step normalised in f32, rounded to `x`'s dtype, times the weight (`speech::nn::rms_norm`
/// of the transpose).
#[derive(Clone, Debug)]
pub struct ChannelNorm {
    /// `[C]` (`x`'s dtype).
    pub weight: Tensor,
    /// Epsilon.
    pub eps: f32,
}

/// The scaled residual `x + gamma ⊙ hᵀ` of `x` `[B, C, T]` (any strides) and `h` `[B, T, C]`
/// (contiguous): `[B, C, T]`, each product rounded to `x`'s dtype before the sum.
#[derive(Clone, Debug)]
pub struct ChannelResidual {
    /// `[C]` (`x`'s dtype).
    pub gamma: Tensor,
}

/// `x + bias` for `x` `[B, C, T]` (any strides) and `bias` `[C]` of its dtype, broadcast over
/// batch and time: `[B, C, T]`, contiguous, each sum rounded once (candle's `broadcast_add` in
/// one launch that reads strided inputs in place).
#[derive(Clone, Debug)]
pub struct ChannelBias {
    /// `[C]`.
    pub bias: Tensor,
}

/// One classifier-free-guided DPM-Solver++ step of the diffusion sampler in one op (the
/// sampler's ~20 small ops per step otherwise): from the head's v-predictions `v` `[2B, L]`
/// (conditional rows, then unconditional), the sample `x` `[B, L]` and, for a second-order
/// step, the previous step's data prediction `prev` `[B, L]` (all contiguous, one dtype),
/// `[2, B, L]`: the next sample, then this step's data prediction. The guidance `v_u + cfg ·
/// (v_c − v_u)` rounds to the dtype after each operation, as the original's tensor ops do (the
/// scale in f32); the update runs in f32 as `speech::sampler::SolverRun::step` does, its data
/// prediction and result rounded to the dtype.
#[derive(Clone, Debug, PartialEq)]
pub struct DpmStep {
    /// Guidance scale.
    pub cfg: f32,
    /// α and σ·α of the step's sigma (`x0 = alpha·x − sigma·v`).
    pub alpha: f32,
    /// See [`DpmStep::alpha`].
    pub sigma: f32,
    /// The first-order update `a·x − b·x0`.
    pub a: f32,
    /// See [`DpmStep::a`].
    pub b: f32,
    /// Second order: `1/r0` and `b/2` (the update then subtracts `(x0 − prev)/r0 · b/2`).
    pub second: Option<(f32, f32)>,
}

/// Output time steps per block of the speech kernels (the mixer's block normalises `k - 1`
/// more)...
pub const SPEECH_TILE_T: usize = 32;

/// ...and channels per block of the mixer's and the channel norm's.
pub const SPEECH_TILE_C: usize = 64;

/// Threads per block of the speech kernels.
pub const SPEECH_THREADS: usize = 256;
