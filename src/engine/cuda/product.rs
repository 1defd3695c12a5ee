//! The CUDA side of [`FusedMatVec`]: bf16 rows times float8 weights, the work around the
//! product fused in. Up to [`MATVEC_MAX_ROWS`] rows (decoding), or [`MATVEC_WIDE_ROWS`] of a
//! product with nothing but a bias or residual around it, take the matrix-vector kernels
//! (`matvec.cu`); more (prefill, the tokenizers' longer signals) take the W8A16 matrix
//! product (`gemm.cu`), which never writes a bf16 copy of the weights.

use super::launch::RawArgs;
use super::{cuda_view, optional_view, sm_count, Module, MATVEC_WARPS};
use crate::engine::ops::{
    FusedMatVec, GEMM_BK, GEMM_BM, GEMM_BN, GEMM_STAGES, MATVEC_MAX_ROWS, MATVEC_WIDE_ROWS,
    TILE_INPUTS, TILE_ROWS,
};
use crate::plan::memory;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    sys, CudaSlice, CudaView, DevicePtr, LaunchConfig,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, WrapErr};
use candle_core::{CudaStorage, Layout, Shape, Storage};

/// A `[rows, cols]` operand whose rows may be strided (elements dense): its view from the first
/// element and its row stride, checked to start and step on `align` elements.
fn row_view<'a, T: CudaDType>(
    storage: &'a Storage,
    layout: &Layout,
    dims: [usize; 2],
    align: usize,
    what: &str,
) -> candle_core::Result<(CudaView<'a, T>, u64)> {
    let Storage::Cuda(s) = storage else {
        candle_core::bail!("fused matvec: {what} is not on the GPU");
    };
    let stride = layout.stride();
    let row_stride = if dims[0] == 1 { dims[1] } else { stride[0] };
    if layout.dims() != dims
        || stride[1] != 1
        || !layout.start_offset().is_multiple_of(align)
        || !row_stride.is_multiple_of(align)
    {
        candle_core::bail!(
            "fused matvec: {what} {:?} (strides {stride:?}) for {dims:?}",
            layout.dims()
        );
    }
    let view = s.as_cuda_slice::<T>()?.slice(layout.start_offset()..);
    Ok((view, row_stride as u64))
}

/// Every operand of one fused product on the device, checked.
struct Operands<'a> {
    x: CudaView<'a, half::bf16>,
    rows: usize,
    weights: Vec<CudaView<'a, u8>>,
    scales: Vec<Option<CudaView<'a, f32>>>,
    bias: Option<CudaView<'a, half::bf16>>,
    residual: Option<CudaView<'a, half::bf16>>,
    norm: Option<CudaView<'a, half::bf16>>,
    /// `1 + scale`, shift, their row stride.
    modulation: Option<(CudaView<'a, half::bf16>, CudaView<'a, half::bf16>, u64)>,
    /// The gate and its row stride.
    gate: Option<(CudaView<'a, half::bf16>, u64)>,
    watch: Option<CudaView<'a, u32>>,
}

impl Operands<'_> {
    /// Pushes the segments' rows, scales and modes, then bias and residual, in the order both
    /// kernels take them; `x` stands in for absent pointers (never read).
    fn push_segments(&self, op: &FusedMatVec, args: &mut RawArgs, dev: &CudaDevice) {
        let stream = dev.cuda_stream();
        let mut n = [0i32; 3];
        let mut modes = [0i32; 3];
        for (i, seg) in op.segments.iter().enumerate() {
            n[i] = seg.rows as i32;
            modes[i] = match seg.scale.as_ref().map(|s| s.elem_count()) {
                None => 0,
                Some(1) => 1,
                Some(_) => 2,
            };
        }
        for v in n {
            args.i32(v);
        }
        for i in 0..3 {
            args.ptr_or(
                self.scales.get(i).and_then(Option::as_ref),
                &self.x,
                &stream,
            );
        }
        for m in modes {
            args.i32(m);
        }
        args.ptr_or(self.bias.as_ref(), &self.x, &stream)
            .i32(i32::from(self.bias.is_some()));
        args.ptr_or(self.residual.as_ref(), &self.x, &stream)
            .i32(i32::from(self.residual.is_some()));
    }

    /// Pushes x (or `normalised`, its rows normalised beforehand), its rows and inputs, the
    /// three weights (x standing in for absent ones, never read) and the segments: both
    /// kernels' first parameters.
    fn push_inputs(
        &self,
        op: &FusedMatVec,
        normalised: Option<&CudaSlice<half::bf16>>,
        args: &mut RawArgs,
        dev: &CudaDevice,
    ) {
        let stream = dev.cuda_stream();
        match normalised {
            Some(xn) => args.ptr(xn, &stream),
            None => args.ptr(&self.x, &stream),
        };
        args.i32(self.rows as i32).i32(op.in_features as i32);
        for i in 0..3 {
            args.ptr_or(self.weights.get(i), &self.x, &stream);
        }
        self.push_segments(op, args, dev);
    }

    /// Pushes the norm weight and epsilon, as the matvec and the normalising pass take them;
    /// the kernels tell "no norm" by a null pointer.
    fn push_norm(&self, op: &FusedMatVec, args: &mut RawArgs, dev: &CudaDevice) {
        let eps = op.norm.as_ref().map_or(0.0f32, |(_, e)| *e);
        args.ptr_or_null(self.norm.as_ref(), &dev.cuda_stream())
            .f32(eps);
    }

    /// Pushes GELU, the gate, `y` and the watch, the kernels' last common parameters.
    fn push_outputs<T>(
        &self,
        op: &FusedMatVec,
        y: &impl DevicePtr<T>,
        args: &mut RawArgs,
        dev: &CudaDevice,
    ) {
        let stream = dev.cuda_stream();
        args.i32(i32::from(op.gelu));
        args.ptr_or_null(self.gate.as_ref().map(|g| &g.0), &stream)
            .u64(self.gate.as_ref().map_or(0, |g| g.1));
        args.ptr(y, &stream);
        args.ptr_or_null(self.watch.as_ref(), &stream)
            .i32(op.watch.as_ref().map_or(0, |(_, tag)| *tag as i32));
    }
}

/// The CUDA side of [`FusedMatVec`]: bf16 activations, float8 weights, bf16 output.
pub fn fused_matvec(
    op: &FusedMatVec,
    x: &CudaStorage,
    lx: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = x.device().clone();
    let (xa, xb) = lx
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("fused matvec: x must be contiguous".into()))?;
    let n_in = op.in_features;
    let rows = (xb - xa) / n_in;
    if rows == 0 || op.segments.is_empty() || op.segments.len() > 3 {
        candle_core::bail!("fused matvec: {rows} rows, {} weights", op.segments.len());
    }
    // Gated, both kernels read the second weight's rows as the first's.
    if op.gated && (op.segments.len() != 2 || op.segments[0].rows != op.segments[1].rows) {
        candle_core::bail!("fused matvec: a gated product takes two weights of equal rows");
    }
    // Every operand's storage stays locked (read) until the launch is queued.
    let weights: Vec<_> = op
        .segments
        .iter()
        .map(|s| s.bytes.storage_and_layout())
        .collect();
    let scales: Vec<_> = op
        .segments
        .iter()
        .map(|s| s.scale.as_ref().map(|t| t.storage_and_layout()))
        .collect();
    let bias = op.bias.as_ref().map(|t| t.storage_and_layout());
    let residual = op.residual.as_ref().map(|t| t.storage_and_layout());
    let norm = op.norm.as_ref().map(|(t, _)| t.storage_and_layout());
    let watch = op.watch.as_ref().map(|(t, _)| t.storage_and_layout());
    let modulation = op
        .modulation
        .as_ref()
        .map(|(a, b)| (a.storage_and_layout(), b.storage_and_layout()));
    let gate = op.gate.as_ref().map(|t| t.storage_and_layout());
    let n_out = op.out_features();
    // The kernels read the modulation 16 bytes at a time.
    let modulation = match &modulation {
        Some(((a, la), (b, lb))) => {
            let (a, sa) = row_view::<half::bf16>(a, la, [rows, n_in], 8, "the modulation")?;
            let (b, sb) = row_view::<half::bf16>(b, lb, [rows, n_in], 8, "the modulation")?;
            if sa != sb || op.norm.is_none() {
                candle_core::bail!("fused matvec: a modulation needs the norm and one row stride");
            }
            Some((a, b, sa))
        }
        None => None,
    };
    let gate = match &gate {
        Some((g, lg)) if op.residual.is_some() => {
            Some(row_view::<half::bf16>(g, lg, [rows, n_out], 1, "the gate")?)
        }
        Some(_) => candle_core::bail!("fused matvec: a gate needs the residual"),
        None => None,
    };
    // The kernels read the norm weight 16 bytes at a time.
    if norm
        .as_ref()
        .is_some_and(|(_, l)| !l.start_offset().is_multiple_of(8))
    {
        candle_core::bail!("fused matvec: the norm weight must start on 16 bytes");
    }
    let aligned = xa.is_multiple_of(8)
        && n_in.is_multiple_of(TILE_INPUTS)
        && op.segments.iter().all(|s| s.rows.is_multiple_of(TILE_ROWS))
        && weights
            .iter()
            .all(|(_, l)| l.start_offset().is_multiple_of(16));
    if !aligned {
        candle_core::bail!(
            "fused matvec: shapes or offsets off the kernel's tiles (see engine::matvec::applies)"
        );
    }
    let operands = Operands {
        x: x.as_cuda_slice::<half::bf16>()?.slice(xa..xb),
        rows,
        weights: weights
            .iter()
            .map(|(s, l)| cuda_view::<u8>(s, l))
            .collect::<candle_core::Result<Vec<_>>>()?,
        scales: scales
            .iter()
            .map(optional_view::<f32>)
            .collect::<candle_core::Result<Vec<_>>>()?,
        bias: optional_view::<half::bf16>(&bias)?,
        residual: optional_view::<half::bf16>(&residual)?,
        norm: optional_view::<half::bf16>(&norm)?,
        modulation,
        gate,
        watch: optional_view::<u32>(&watch)?,
    };
    // SAFETY: every element of `y` is written by the kernel (the matvec: the block of its
    // TILE_ROWS features; the product: the block of its tile, or the reduction).
    let y = unsafe { dev.alloc::<half::bf16>(rows * n_out)? };
    let plain = !op.gated && op.norm.is_none() && op.gate.is_none() && !op.gelu;
    match rows <= MATVEC_MAX_ROWS || (plain && rows <= MATVEC_WIDE_ROWS) {
        true => matvec(op, &operands, &y, &dev)?,
        false => gemm(op, &operands, &y, &dev)?,
    }
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev),
        Shape::from((rows, n_out)),
    ))
}

/// The rows of x RMS-normalised (and modulated, where the op is) into a new buffer by the
/// `gemm_normalise` kernel, one block a row, rounded as the matvec's fused norm rounds them.
fn normalise(
    op: &FusedMatVec,
    ops: &Operands<'_>,
    dev: &CudaDevice,
) -> candle_core::Result<CudaSlice<half::bf16>> {
    let (rows, n_in) = (ops.rows, op.in_features);
    let stream = dev.cuda_stream();
    let func = Module::Decode.func(dev, "gemm_normalise")?;
    // SAFETY: each block writes its row in full.
    let out = unsafe { dev.alloc::<half::bf16>(rows * n_in)? };
    let mut args = RawArgs::default();
    args.ptr(&ops.x, &stream).i32(n_in as i32);
    ops.push_norm(op, &mut args, dev);
    // The modulation's `1 + scale`, shift and row stride; null for none.
    args.ptr_or_null(ops.modulation.as_ref().map(|m| &m.0), &stream)
        .ptr_or_null(ops.modulation.as_ref().map(|m| &m.1), &stream)
        .u64(ops.modulation.as_ref().map_or(0, |m| m.2));
    args.ptr(&out, &stream);
    let config = LaunchConfig {
        grid_dim: (rows as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // The arguments match the kernel's signature (gemm.cu).
    args.launch(dev, &func, config, false)?;
    Ok(out)
}

/// The matrix-vector kernel: one block of MATVEC_WARPS warps per TILE_ROWS output features. A
/// modulated op's rows (the diffusion head's) are normalised and modulated by a launch of their
/// own first: done in every block of the product, as the kernel once did, that made the head's
/// gate/up 38.5 us where its weights take ~25, and the head 0.36 ms a frame slower on the H200.
/// A product in few tiles takes a kernel that loads x with the weights (`X_AHEAD`, the same
/// bits): without a norm, in at most two tiles a multiprocessor (down, o, the head's down), four
/// steps a round at two blocks an SM (down 32.6 -> 22 us, o 8.5 -> 6.3 on the H200); with one,
/// in at most three (q/k/v), two steps at three blocks (11.7 -> 10.7 us; `docs/mvprobe`). A
/// gated product of many tiles runs as many blocks as fit at once, each looping over its tiles.
/// Up to [`MATVEC_WIDE_ROWS`] rows of a plain product take the wide kernel (three groups of
/// eight rows a weight decode).
fn matvec(
    op: &FusedMatVec,
    ops: &Operands<'_>,
    y: &CudaSlice<half::bf16>,
    dev: &CudaDevice,
) -> candle_core::Result<()> {
    let modulated = match ops.modulation {
        Some(_) => Some(normalise(op, ops, dev)?),
        None => None,
    };
    let normed = ops.norm.is_some() && modulated.is_none();
    let tiles = op.out_features() / TILE_ROWS;
    let sms = sm_count(dev);
    let name = match (op.gated, normed) {
        _ if ops.rows > MATVEC_MAX_ROWS => "f8_matvec_mma_wide",
        (true, _) => "f8_matvec_mma_gated",
        (false, false) if tiles <= 2 * sms => "f8_matvec_mma_x_ahead",
        (false, true) if tiles <= MATVEC_BLOCKS_PER_SM * sms => "f8_matvec_mma_x_ahead_normed",
        (false, _) => "f8_matvec_mma",
    };
    let func = Module::Decode.func(dev, name)?;
    let mut args = RawArgs::default();
    ops.push_inputs(op, modulated.as_ref(), &mut args, dev);
    match modulated {
        // Normalised already: no norm.
        Some(_) => {
            args.u64(0).f32(0.0);
        }
        None => ops.push_norm(op, &mut args, dev),
    }
    ops.push_outputs(op, y, &mut args, dev);
    // Gated, the blocks that fit at once loop over the tiles where each gets two or more
    // (LM gate/up: 1184 tiles, 38.4 against 42.2 us); with fewer, a block a tile (the head's
    // gate/up: 672 tiles, 22.7 against 23.0 us; docs/mvprobe on the H200).
    let slots = MATVEC_BLOCKS_PER_SM * sms;
    let blocks = match op.gated && tiles >= 2 * slots {
        true => slots,
        false => tiles,
    };
    let config = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (32 * MATVEC_WARPS as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    // The arguments match the kernel's signature (matvec.cu). Resident weights may be read
    // before the previous kernel ends; a slot's may not.
    args.launch(dev, &func, config, op.resident_weights)
}

/// Blocks an SM of the matvec kernels but the X_PLAIN one (their launch bound, `matvec.cu`).
const MATVEC_BLOCKS_PER_SM: usize = 3;

/// Slices of the input features (split-K) for a product of `tiles` output tiles over `steps`
/// k-steps on `sms` multiprocessors of two blocks each: the count that finishes soonest
/// (whole waves of blocks, each doing 1/slices of the work), the fewest among equals; at most
/// [`memory::PRODUCT_MAX_SLICES`], each slice at least 4 steps, and the partial sums of
/// `outputs` (f32 per slice) within [`memory::PRODUCT_SCRATCH_BYTES`].
fn k_slices(tiles: usize, steps: usize, sms: usize, outputs: usize) -> usize {
    let places = 2 * sms.max(1);
    let cost = |s: usize| (tiles * s).div_ceil(places) as f64 / s as f64;
    let fits = |s: &usize| {
        (*s * outputs) as u64 * memory::PARTIAL_SUM_BYTES <= memory::PRODUCT_SCRATCH_BYTES
    };
    let most = (memory::PRODUCT_MAX_SLICES as usize).min(steps / 4).max(1);
    (1..=most)
        .filter(|s| *s == 1 || fits(s))
        .min_by(|&a, &b| cost(a).total_cmp(&cost(b)).then(a.cmp(&b)))
        .unwrap_or(1)
}

/// Shared memory of one block of the matrix product: its stages of x and W tiles (rows of
/// GEMM_BK inputs padded by 16 elements, `gemm.cu`).
const GEMM_SHARED: usize = GEMM_STAGES * (GEMM_BM * (GEMM_BK + 16) * 2 + GEMM_BN * (GEMM_BK + 16));

/// The W8A16 matrix product: the rows normalised first when the op has a norm (one block a
/// row), then one block per GEMM_BM x GEMM_BN tile of y (gated: GEMM_BN / 2 outputs), split
/// over the input features where the tiles would leave the GPU's last wave short, the slices
/// added in order by a second kernel.
fn gemm(
    op: &FusedMatVec,
    ops: &Operands<'_>,
    y: &CudaSlice<half::bf16>,
    dev: &CudaDevice,
) -> candle_core::Result<()> {
    let (rows, n_in, n_out) = (ops.rows, op.in_features, op.out_features());
    let stream = dev.cuda_stream();
    let normalised = match &ops.norm {
        Some(_) => Some(normalise(op, ops, dev)?),
        None => None,
    };
    let steps = n_in / GEMM_BK;
    // Gated, a block covers half as many outputs (their gate and up rows), and never splits:
    // splitting gate/up's many tiles (2 for 128 and 351 rows on the H200) made the products of
    // a prefill slower, by ~0.07 ms a layer at 128 rows and ~0.2 ms at 351, not faster.
    let (col_tiles, slices) = match op.gated {
        true => (n_out.div_ceil(GEMM_BN / 2), 1),
        false => {
            let col_tiles = n_out.div_ceil(GEMM_BN);
            let tiles = col_tiles * rows.div_ceil(GEMM_BM);
            (
                col_tiles,
                k_slices(tiles, steps, sm_count(dev), rows * n_out),
            )
        }
    };
    let per_slice = steps.div_ceil(slices);
    let slices = steps.div_ceil(per_slice);
    // SAFETY: each slice writes its partial sum of every output before the reduction reads it.
    let partial = match slices > 1 {
        true => Some(unsafe { dev.alloc::<f32>(slices * rows * n_out)? }),
        false => None,
    };
    let name = if op.gated { "f8_gemm_gated" } else { "f8_gemm" };
    let func = Module::Decode.func(dev, name)?;
    func.set_attribute(
        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        GEMM_SHARED as i32,
    )
    .w()?;
    let mut args = RawArgs::default();
    ops.push_inputs(op, normalised.as_ref(), &mut args, dev);
    ops.push_outputs(op, y, &mut args, dev);
    args.ptr_or_null(partial.as_ref(), &stream)
        .i32(per_slice as i32);
    let config = LaunchConfig {
        grid_dim: (
            rows.div_ceil(GEMM_BM) as u32,
            col_tiles as u32,
            slices as u32,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: GEMM_SHARED as u32,
    };
    // The arguments match the kernel's signature (gemm.cu).
    args.launch(dev, &func, config, false)?;
    let Some(partial) = partial else {
        return Ok(());
    };
    let func = Module::Decode.func(dev, "f8_gemm_reduce")?;
    let mut args = RawArgs::default();
    args.i32(rows as i32);
    ops.push_segments(op, &mut args, dev);
    ops.push_outputs(op, y, &mut args, dev);
    args.ptr(&partial, &stream).i32(slices as i32);
    let config = LaunchConfig::for_num_elems((rows * n_out) as u32);
    // The arguments match the kernel's signature (gemm.cu).
    args.launch(dev, &func, config, false)
}

#[cfg(test)]
mod tests {
    use super::k_slices;

    #[test]
    fn few_tiles_split_the_inputs_and_many_do_not() {
        // 132 SMs: q/k/v (4,608 outputs) of 128 tokens (36 tiles) and `down` (3,584, 28
        // tiles) split, 444 tiles do not; short inputs are never cut below 4 steps a slice;
        // the partial sums stay within their scratch (4,608 x 512 f32 is 9 MiB a slice).
        assert_eq!(k_slices(36, 56, 132, 128 * 4608), 7);
        assert_eq!(k_slices(28, 296, 132, 128 * 3584), 8);
        assert_eq!(k_slices(444, 56, 132, 351 * 4608), 1);
        assert_eq!(k_slices(1, 8, 132, 128), 2);
        assert_eq!(k_slices(1, 3, 132, 128), 1);
        assert_eq!(k_slices(16, 56, 132, 512 * 4608), 2);
    }
}
