//! CUDA pieces of the engine, the only user of cudarc (apart from `gpu`'s list of devices): the kernels (files under `kernels/`,
//! compiled here by NVRTC at first use: dequantisation for any GPU, the decode path's for the
//! device's architecture, the speech tokenizers' fused block ops for any GPU), their launchers
//! (`ops`, `speech`, through the one launch style of `launch`), pinned host buffers and the
//! streaming slots with their copy stream and events (`slots`), CUDA graphs (`graph`), and the
//! bandwidth and queued-time measurements `bench` reports (`timing`).

pub mod graph;
mod handoff;
mod launch;
mod ops;
mod product;
mod slots;
mod speech;
mod timing;

pub use handoff::Handoff;
pub use ops::{decode_attention, dequantize, step_attention, store_kv, watch};
pub use product::fused_matvec;
pub use slots::{CudaSlots, PinnedBytes};
pub use speech::{channel_bias, channel_norm, channel_residual, depthwise_mixer, dpm_step};
pub use timing::{device_bandwidth_gbps, pinned_bandwidth_gbps, while_copying, QueuedTimer};

use super::ops::{
    ATTENTION_WARPS, GEMM_BK, GEMM_BM, GEMM_BN, GEMM_STAGES, MATVEC_MAX_ROWS, TILE_INPUTS,
    TILE_ROWS,
};
use crate::plan::memory::PREFILL_HEAD_DIM;
use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaEvent, CudaFunction, CudaStream, CudaView,
};
use candle_core::cuda_backend::cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{Layout, Storage};
use std::ops::Deref;
use std::sync::{Arc, OnceLock};

/// An event recorded now on `stream`, with timing.
fn timing_event(stream: &Arc<CudaStream>) -> anyhow::Result<CudaEvent> {
    let event = stream
        .context()
        .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))?;
    event.record(stream)?;
    Ok(event)
}

/// Warps per block of the fused matvec (one block per [`TILE_ROWS`] output features).
const MATVEC_WARPS: usize = 8;

/// The launch geometry the kernels are compiled with, as `-D` options built from the constants
/// the launches use, so that host and device cannot drift. `scripts/build-cuda.sh` checks the
/// kernel files with the same defines (a test below compares them).
fn kernel_defines() -> Vec<String> {
    [
        ("MATVEC_WARPS", MATVEC_WARPS),
        ("TILE_ROWS", TILE_ROWS),
        ("TILE_INPUTS", TILE_INPUTS),
        ("MATVEC_MAX_ROWS", MATVEC_MAX_ROWS),
        ("ATT_WARPS", ATTENTION_WARPS),
        ("GEMM_BM", GEMM_BM),
        ("GEMM_BN", GEMM_BN),
        ("GEMM_BK", GEMM_BK),
        ("GEMM_STAGES", GEMM_STAGES),
        ("PREFILL_HEAD_DIM", PREFILL_HEAD_DIM),
    ]
    .map(|(name, value)| format!("-D{name}={value}"))
    .into()
}

/// One NVRTC program: `kernels/common.cuh` and the named kernel files, each behind a `#line`
/// marker so that compile errors name the file and line (NVRTC has no include path for
/// embedded sources, so the header is prepended rather than included).
macro_rules! kernel_source {
    ($($file:literal),+) => {
        concat!(
            "#line 1 \"common.cuh\"\n",
            include_str!("kernels/common.cuh"),
            $("\n#line 1 \"", $file, "\"\n", include_str!(concat!("kernels/", $file)),)+
        )
    };
}

/// Decodes float8 E4M3, bf16, f16 or f32 bytes to f32 or bf16, times an optional scale
/// (scalar, per row, or per row and column block), one thread per element; the watch kernels;
/// the kernel that holds a stream for [`QueuedTimer`]; and hybrid decoding's hand-over kernels
/// ([`Handoff`]).
const DEQUANT_SOURCE: &str = kernel_source!("dequant.cu", "hold.cu", "handoff.cu");

/// The float8 products and the decode path's kernels, compiled for the device's
/// architecture: the matrix-vector kernel on tensor cores (sm_80 and newer; `matvec.cu` says
/// how it works) and the matrix product for more rows (`gemm.cu`), decode and prefill attention
/// and the KV store; the decode launches overlap on sm_90 (programmatic dependent launch).
///
/// Range. Qwen2-family checkpoints carry activations far beyond float16's 65,504 (MLP
/// intermediates near 1e5, residual channels near 3e4, large attention logits), so no value on
/// the activation side is ever narrowed to f16. Every narrowing of the GPU path, and why it
/// cannot overflow:
/// - matvec weights: float8 E4M3 to bf16 is exact (3 mantissa bits, exponents 2^-9..2^8),
///   held as value x 2^-120 (bits moved, no arithmetic);
/// - matvec inputs: bf16 as stored, or normalised in f32 and rounded to bf16, whose range is
///   f32's, times 2^64 (exact; overflows only past 1.8e19, which the watch would report);
///   products and sums in f32 at 2^-56 of their value (underflow only below 1e-21), the output
///   rounded to bf16 (f32's range again). The sum of squares of the fused RMSNorm is f32: it
///   overflows only for inputs past ~1e17;
/// - silu(g) * u in f32: `exp(-g)` may become infinite for g < -88, and g / (1 + inf) is the
///   right limit, -0;
/// - decode attention: q . k, the scores, their softmax (max subtracted first) and the
///   weighted sum of values in f32, from bf16 q, K and V; the output rounded to bf16;
/// - the KV store rotates keys in f32 and stores bf16; the residual stream is bf16;
/// - the matrix product (more than 8 rows) holds weights and products as the matvec does;
///   its RMSNorm runs first, in f32, rounded to bf16 as the matvec's; its split-K partial
///   sums are f32;
/// - prefill attention: queries rotated in f32 and rounded to bf16, scores in f32 (tensor
///   cores), their softmax in f32 (running maximum subtracted first), the probabilities rounded
///   to bf16 for the product with V, summed in f32.
///
/// The CPU path computes in f32 throughout. A value that does become NaN or infinite is
/// caught by the engine's watch (see `Watch`), never passed on as a result.
const DECODE_SOURCE: &str = kernel_source!(
    "matvec.cu",
    "gemm.cu",
    "attention.cu",
    "prefill_attention.cu",
    "kv_store.cu"
);

/// The speech tokenizers' fused block kernels (any GPU): a block's mixer half, its channel
/// RMSNorm and its scaled residual, in f32 or bf16 (`speech.cu` says how each rounds).
const SPEECH_SOURCE: &str = kernel_source!("speech.cu");

/// The three kernel modules, each one NVRTC program compiled once per process.
#[derive(Clone, Copy)]
enum Module {
    /// [`DEQUANT_SOURCE`], compiled for NVRTC's default architecture (runs on any GPU).
    Dequant,
    /// [`DECODE_SOURCE`], compiled for the device's architecture.
    Decode,
    /// [`SPEECH_SOURCE`], compiled for NVRTC's default architecture.
    Speech,
}

impl Module {
    /// The module's name, for candle's module cache and NVRTC's messages.
    fn name(self) -> &'static str {
        match self {
            Module::Dequant => "vibeoffload_dequant",
            Module::Decode => "vibeoffload_decode",
            Module::Speech => "vibeoffload_speech",
        }
    }

    /// The kernel `name` of this module, loaded on `dev` (compiled at first use).
    fn func(self, dev: &CudaDevice, name: &str) -> candle_core::Result<CudaFunction> {
        let func = dev.get_or_load_custom_func(name, self.name(), self.ptx(dev)?)?;
        Ok(func.into_cuda_function())
    }

    /// The module's PTX, compiled once: the decode module for the architecture of the first
    /// device that asks (sm_80 and newer get the tensor-core matvec, sm_90 overlapped launches).
    fn ptx(self, dev: &CudaDevice) -> candle_core::Result<&'static str> {
        static DEQUANT: OnceLock<Result<String, String>> = OnceLock::new();
        static DECODE: OnceLock<Result<String, String>> = OnceLock::new();
        static SPEECH: OnceLock<Result<String, String>> = OnceLock::new();
        let ptx = match self {
            Module::Dequant => DEQUANT.get_or_init(|| self.compile(None)),
            Module::Speech => SPEECH.get_or_init(|| self.compile(None)),
            Module::Decode => DECODE.get_or_init(|| {
                let (major, minor) = compute_capability(dev)?;
                // Newer GPUs run the sm_90 PTX (the driver compiles it for them).
                let (major, minor) = if major > 9 { (9, 0) } else { (major, minor) };
                self.compile(Some(format!("compute_{major}{minor}")))
            }),
        };
        ptx.as_deref()
            .map_err(|e| candle_core::Error::Msg(e.clone()))
    }

    /// Compiles the module with the launch geometry's defines, for `arch` (`compute_XY`) or
    /// NVRTC's default.
    fn compile(self, arch: Option<String>) -> Result<String, String> {
        let (source, what) = match self {
            Module::Dequant => (DEQUANT_SOURCE, "the dequantisation kernels"),
            Module::Decode => (DECODE_SOURCE, "the decode kernels"),
            Module::Speech => (SPEECH_SOURCE, "the speech kernels"),
        };
        let mut options = kernel_defines();
        options.extend(arch.iter().map(|a| format!("--gpu-architecture={a}")));
        let opts = CompileOptions {
            name: Some(self.name().to_string()),
            options,
            ..Default::default()
        };
        let target = arch.map_or(String::new(), |a| format!(" for {a}"));
        compile_ptx_with_opts(source, opts)
            .map(|p| p.to_src())
            .map_err(|e| format!("NVRTC could not compile {what}{target}: {e}"))
    }
}

/// Compiles (NVRTC) and loads this crate's three kernel modules on `dev` now, so that a load
/// accounts for it instead of the first pass.
pub fn load_modules(dev: &CudaDevice) -> anyhow::Result<()> {
    Module::Dequant.func(dev, "hold_stream")?;
    Module::Decode.func(dev, "store_kv_bf16")?;
    Module::Speech.func(dev, "channel_norm_bf16")?;
    Ok(())
}

/// Compute capability `(major, minor)` of the first device that asks (queried once).
fn compute_capability(dev: &CudaDevice) -> Result<(i32, i32), String> {
    static CAPABILITY: OnceLock<Result<(i32, i32), String>> = OnceLock::new();
    CAPABILITY
        .get_or_init(|| {
            let ctx = dev.cuda_stream().context().clone();
            let attribute = |a| ctx.attribute(a).map_err(|e| e.to_string());
            Ok((
                attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
                attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
            ))
        })
        .clone()
}

/// Whether `dev` has the tensor-core instructions the fused matvec uses (sm_80 or newer).
pub fn has_mma(dev: &CudaDevice) -> bool {
    compute_capability(dev).is_ok_and(|(major, _)| major >= 8)
}

/// Whether `dev` overlaps dependent launches (sm_90 and newer).
fn has_pdl(dev: &CudaDevice) -> bool {
    compute_capability(dev).is_ok_and(|(major, _)| major >= 9)
}

/// Multiprocessors of the first device that asks (queried once; 1 if the query fails).
fn sm_count(dev: &CudaDevice) -> usize {
    static SMS: OnceLock<usize> = OnceLock::new();
    *SMS.get_or_init(|| {
        let ctx = dev.cuda_stream().context().clone();
        ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_or(1, |n| n.max(1) as usize)
    })
}

/// A tensor's CUDA slice, offset by its layout (which must be contiguous).
fn cuda_view<'a, T: CudaDType>(
    storage: &'a Storage,
    layout: &Layout,
) -> candle_core::Result<CudaView<'a, T>> {
    let Storage::Cuda(s) = storage else {
        candle_core::bail!("a kernel operand is not on the GPU");
    };
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("kernel operands must be contiguous".into()))?;
    Ok(s.as_cuda_slice::<T>()?.slice(a..b))
}

/// [`cuda_view`] of an operand that may be absent (its locked storage and its layout).
fn optional_view<'a, T: CudaDType>(
    operand: &'a Option<(impl Deref<Target = Storage>, &Layout)>,
) -> candle_core::Result<Option<CudaView<'a, T>>> {
    operand.as_ref().map(|(s, l)| cuda_view(s, l)).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `-D` options of `scripts/build-cuda.sh`'s kernel check (embedded, so that the test
    /// binary carried to the GPU machine checks them too).
    fn script_defines() -> Vec<String> {
        let script = include_str!("../../../scripts/build-cuda.sh");
        let line = script
            .lines()
            .find_map(|l| l.strip_prefix("kernel_defines=("))
            .expect("build-cuda.sh sets kernel_defines=(...)");
        let list = line.split(')').next().unwrap();
        list.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn build_script_checks_kernels_with_the_rust_geometry() {
        assert_eq!(script_defines(), kernel_defines());
    }

    /// NVRTC compiles every module for the architectures the engine picks (no GPU needed).
    #[test]
    fn kernels_compile_for_sm80_sm89_sm90() {
        Module::Dequant.compile(None).unwrap();
        let speech = Module::Speech.compile(None).unwrap();
        for kernel in ["dw_mixer", "channel_norm", "channel_residual"] {
            for dtype in ["f32", "bf16"] {
                assert!(
                    speech.contains(&format!(".entry {kernel}_{dtype}")),
                    "{kernel}_{dtype}"
                );
            }
        }
        for arch in ["compute_80", "compute_89", "compute_90"] {
            let ptx = Module::Decode.compile(Some(arch.to_string())).unwrap();
            for kernel in [
                "f8_matvec_mma_gated",
                "f8_gemm_gated",
                "f8_gemm_reduce",
                "prefill_attention_bf16",
            ] {
                assert!(
                    ptx.contains(&format!(".entry {kernel}")),
                    "{kernel}, {arch}"
                );
            }
        }
    }
}
