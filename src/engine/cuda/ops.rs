//! The launchers: the CUDA side of each of the engine's custom ops (dequantisation, the fused
//! matvec, decode attention, the KV store) and of the watch, which check their operands and
//! pick and launch a kernel.

use super::launch::RawArgs;
use super::{cuda_view, optional_view, Module, MATVEC_WARPS};
use crate::dtype::DType as StoredDType;
use crate::engine::ops::{
    DecodeAttention, Dequantize, FusedMatVec, StoreKv, ATTENTION_WARPS, MATVEC_MAX_ROWS,
    TILE_INPUTS, TILE_ROWS,
};
use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{sys, CudaView, LaunchConfig};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaStorage, Layout, Shape, Storage, Tensor};

/// The CUDA side of [`Dequantize`].
pub fn dequantize(
    op: &Dequantize,
    (_rows, cols): (usize, usize),
    storage: &CudaStorage,
    layout: &Layout,
    scale: Option<(&CudaStorage, &Layout)>,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = storage.device().clone();
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("dequantize: raw bytes must be contiguous".into())
    })?;
    let src = storage.as_cuda_slice::<u8>()?.slice(start..end);
    let n: usize = op.shape.iter().product();
    let src_name = match op.src {
        StoredDType::F8E4M3 => "f8",
        StoredDType::BF16 => "bf16",
        StoredDType::F16 => "f16",
        StoredDType::F32 => "f32",
        other => candle_core::bail!("dequantize: cannot decode {other}"),
    };
    let bf16_out = match op.out {
        candle_core::DType::BF16 => true,
        candle_core::DType::F32 => false,
        other => candle_core::bail!("dequantize: cannot produce {other:?}"),
    };
    let (scale_rows, blocks) = op
        .scale
        .map_or((1, 1), |s| (s.rows as i64, s.blocks as i64));
    // Eight elements per thread where rows, scale blocks and alignment allow it.
    let by_eight = op.src == StoredDType::F8E4M3
        && bf16_out
        && n.is_multiple_of(8)
        && cols.is_multiple_of(8)
        && (cols as i64 / blocks) % 8 == 0
        && start.is_multiple_of(8);
    let name = match by_eight {
        true => "dequant_f8_bf16_x8".to_string(),
        false => format!(
            "dequant_{src_name}_{}",
            if bf16_out { "bf16" } else { "f32" }
        ),
    };
    let func = Module::Dequant.func(&dev, &name)?;
    let per_thread = if by_eight { 8 } else { 1 };
    let (has_scale, cols, n_arg) = (
        i32::from(scale.is_some()),
        cols as i64,
        (n / per_thread) as i64,
    );
    let config = LaunchConfig::for_num_elems((n / per_thread) as u32);
    let scale_view = match scale {
        Some((s, l)) => {
            let (a, b) = l.contiguous_offsets().ok_or_else(|| {
                candle_core::Error::Msg("dequantize: scales must be contiguous".into())
            })?;
            Some(s.as_cuda_slice::<f32>()?.slice(a..b))
        }
        None => None,
    };
    let stream = dev.cuda_stream();
    macro_rules! launch {
        ($t:ty) => {{
            // SAFETY: `out` is written in full by the kernel before it is read.
            let out = unsafe { dev.alloc::<$t>(n)? };
            let mut args = RawArgs::default();
            // Without a scale (has_scale 0) none is read; src stands in for its pointer.
            args.ptr(&src, &stream)
                .ptr(&out, &stream)
                .ptr_or(scale_view.as_ref(), &src, &stream)
                .i32(has_scale);
            for v in [scale_rows, blocks, cols, n_arg] {
                args.u64(v as u64);
            }
            // The arguments match the kernel's signature (dequant.cu).
            args.launch(&dev, &func, config, false)?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = if bf16_out {
        launch!(half::bf16)
    } else {
        launch!(f32)
    };
    Ok((out, Shape::from(op.shape.clone())))
}

/// The CUDA side of [`Watch::check`](crate::engine::watch::Watch::check): queues a check of `x`
/// (bf16 or f32) that lowers `word` to `tag` if `x` holds a NaN or an infinity.
pub fn watch(x: &Tensor, word: &Tensor, tag: u32) -> Result<()> {
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let (word_storage, word_layout) = word.storage_and_layout();
    let dev = match &*storage {
        candle_core::Storage::Cuda(s) => s.device().clone(),
        _ => anyhow::bail!("watch: the tensor is not on the GPU"),
    };
    let name = match x.dtype() {
        candle_core::DType::BF16 => "watch_bf16",
        candle_core::DType::F32 => "watch_f32",
        other => anyhow::bail!("watch: cannot check {other:?} values"),
    };
    let func = Module::Dequant.func(&dev, name)?;
    let n = x.elem_count() as i64;
    let word_view = cuda_view::<u32>(&word_storage, word_layout)?;
    let config = LaunchConfig {
        grid_dim: ((x.elem_count().div_ceil(256)).clamp(1, 1024) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let stream = dev.cuda_stream();
    // Nothing here allocates, which would make the context current.
    stream.context().bind_to_thread()?;
    let mut args = RawArgs::default();
    match x.dtype() {
        candle_core::DType::BF16 => args.ptr(&cuda_view::<half::bf16>(&storage, layout)?, &stream),
        _ => args.ptr(&cuda_view::<f32>(&storage, layout)?, &stream),
    };
    args.u64(n as u64).ptr(&word_view, &stream).i32(tag as i32);
    // The arguments match the kernel's signature (dequant.cu); `word` holds one u32.
    args.launch(&dev, &func, config, false)?;
    Ok(())
}

/// Cached positions per block of decode attention, roughly: longer caches split over a cluster.
const ATTENTION_SHARE: usize = 64;

/// The CUDA side of [`DecodeAttention`]: bf16 q, K, V; K and V as `(offset, batch, head,
/// position)` strides into their storage.
pub fn decode_attention(
    op: &DecodeAttention,
    q: &CudaStorage,
    lq: &Layout,
    k: &CudaStorage,
    (ko, kb, kh, kt): (usize, usize, usize, usize),
    v: &CudaStorage,
    (vo, vb, vh, vt): (usize, usize, usize, usize),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = q.device().clone();
    let (qa, qb) = lq
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("decode attention: q must be contiguous".into()))?;
    let batch = lq.dims()[0];
    let qs = q.as_cuda_slice::<half::bf16>()?.slice(qa..qb);
    let ks = k.as_cuda_slice::<half::bf16>()?.slice(ko..);
    let vs = v.as_cuda_slice::<half::bf16>()?.slice(vo..);
    let table = op.rope.as_ref().map(|(t, _)| t.storage_and_layout());
    let table_view = optional_view::<half::bf16>(&table)?;
    let func = Module::Decode.func(&dev, "decode_attention_bf16")?;
    let n = batch * op.heads * op.head_dim;
    // SAFETY: each block writes its head's `head_dim` outputs.
    let out = unsafe { dev.alloc::<half::bf16>(n)? };
    let (heads, group, len, d) = (
        op.heads as i32,
        (op.heads / op.kv_heads) as i32,
        op.len as i32,
        op.head_dim as i32,
    );
    let scale = 1.0f32 / (op.head_dim as f32).sqrt();
    let strides = [kb, kh, kt, vb, vh, vt].map(|s| s as i64);
    let (rope, pos) = (
        i32::from(op.rope.is_some()),
        op.rope.as_ref().map_or(0, |(_, p)| *p as i32),
    );
    let aligned = [ko, kb, kh, kt, vo, vb, vh, vt, op.head_dim]
        .iter()
        .all(|s| s.is_multiple_of(4));
    if !aligned {
        candle_core::bail!("decode attention: K/V rows must start on 8 bytes");
    }
    let stream = dev.cuda_stream();
    let mut args = RawArgs::default();
    args.ptr(&qs, &stream).u64(op.q_stride as u64).i32(rope);
    // Without rotation the table is never read; q stands in for its pointer.
    args.ptr_or(table_view.as_ref(), &qs, &stream)
        .i32(pos)
        .ptr(&ks, &stream)
        .ptr(&vs, &stream)
        .ptr(&out, &stream);
    args.i32(heads).i32(group).i32(len).i32(d).f32(scale);
    for s in strides {
        args.u64(s as u64);
    }
    let warps = ATTENTION_WARPS;
    // Shares of the positions (one cluster of blocks per head, sm_90): about
    // ATTENTION_SHARE each, a power of two up to the portable cluster size.
    let split = match super::has_pdl(&dev) {
        true => op.len.div_ceil(ATTENTION_SHARE).next_power_of_two().min(8),
        false => 1,
    };
    let chunk = op.len.div_ceil(split);
    let config = LaunchConfig {
        grid_dim: (op.heads as u32, split as u32, batch as u32),
        block_dim: (32 * warps as u32, 1, 1),
        shared_mem_bytes: ((chunk + (warps + 1 + usize::from(split > 1)) * op.head_dim) * 4) as u32,
    };
    // The arguments match the kernel's signature (attention.cu); shared memory holds a share's
    // scores, each warp's partial output, the query and, split, the share's output (at most 48
    // KiB: engine::attention::applies checks the unsplit size, and a split one is smaller). The
    // kernel reads nothing before the previous kernel ends.
    args.launch_clustered(&dev, &func, config, true, split as u32)?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev),
        Shape::from((batch, op.heads, 1, op.head_dim)),
    ))
}

/// The CUDA side of [`StoreKv`]: bf16 q/k/v rows, rotary table and cache.
pub fn store_kv(
    op: &StoreKv,
    cache: &mut CudaStorage,
    qkv: &CudaStorage,
    lq: &Layout,
    table: &CudaStorage,
    lt: &Layout,
) -> candle_core::Result<()> {
    let dev = qkv.device().clone();
    let (Some((qa, qb)), Some((ta, tb))) = (lq.contiguous_offsets(), lt.contiguous_offsets())
    else {
        candle_core::bail!("store kv: q/k/v and the rotary table must be contiguous");
    };
    let qs = qkv.as_cuda_slice::<half::bf16>()?.slice(qa..qb);
    let ts = table.as_cuda_slice::<half::bf16>()?.slice(ta..tb);
    let kv = cache.as_cuda_slice_mut::<half::bf16>()?;
    let func = Module::Decode.func(&dev, "store_kv_bf16")?;
    let ints = [op.heads, op.kv_heads, op.head_dim, op.tokens, op.pos].map(|v| v as i32);
    let (max_len, batch) = (op.max_len as i64, op.batch as i32);
    let stream = dev.cuda_stream();
    let mut args = RawArgs::default();
    args.ptr(&qs, &stream).ptr(&ts, &stream).ptr(kv, &stream);
    for v in ints {
        args.i32(v);
    }
    args.u64(max_len as u64).i32(batch);
    let config = LaunchConfig {
        grid_dim: (op.kv_heads as u32, op.tokens as u32, op.batch as u32),
        block_dim: ((op.head_dim as u32 / 2).clamp(1, 1024), 1, 1),
        shared_mem_bytes: 0,
    };
    // The arguments match the kernel's signature (kv_store.cu); the cache holds `[2, batch, kv_heads,
    // max_len, head_dim]` and `pos + tokens <= max_len` (checked by KvCache::store). The
    // kernel reads and writes nothing before the previous kernel ends.
    args.launch(&dev, &func, config, true)?;
    Ok(())
}

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
    let xs = x.as_cuda_slice::<half::bf16>()?.slice(xa..xb);
    let n_in = op.in_features;
    let rows = (xb - xa) / n_in;
    if rows > MATVEC_MAX_ROWS || op.segments.is_empty() || op.segments.len() > 3 {
        candle_core::bail!("fused matvec: {rows} rows, {} weights", op.segments.len());
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
    let w_views = weights
        .iter()
        .map(|(s, l)| cuda_view::<u8>(s, l))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let s_views = scales
        .iter()
        .map(optional_view::<f32>)
        .collect::<candle_core::Result<Vec<_>>>()?;
    let b_view = optional_view::<half::bf16>(&bias)?;
    let r_view = optional_view::<half::bf16>(&residual)?;
    let n_view = optional_view::<half::bf16>(&norm)?;
    let watch_view = optional_view::<u32>(&watch)?;
    let n_out = op.out_features();
    // The kernel reads the modulation 16 bytes at a time.
    let mod_views = match &modulation {
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
    let gate_view = match &gate {
        Some((g, lg)) if op.residual.is_some() => {
            Some(row_view::<half::bf16>(g, lg, [rows, n_out], 1, "the gate")?)
        }
        Some(_) => candle_core::bail!("fused matvec: a gate needs the residual"),
        None => None,
    };
    let eps = op.norm.as_ref().map_or(0.0f32, |(_, e)| *e);
    // The kernel reads the norm weight 16 bytes at a time.
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
    let name = match (op.gated, mod_views.is_some()) {
        (true, true) => "f8_matvec_mma_gated_modulated",
        (true, false) => "f8_matvec_mma_gated",
        (false, true) => "f8_matvec_mma_modulated",
        (false, false) => "f8_matvec_mma",
    };
    let func = Module::Decode.func(&dev, name)?;
    // SAFETY: every element of `y` is written by the block of its TILE_ROWS features.
    let y = unsafe { dev.alloc::<half::bf16>(rows * n_out)? };
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
    let (rows_arg, in_arg) = (rows as i32, n_in as i32);
    let (has_bias, has_res) = (i32::from(b_view.is_some()), i32::from(r_view.is_some()));
    let stream = dev.cuda_stream();
    let mut args = RawArgs::default();
    args.ptr(&xs, &stream).i32(rows_arg).i32(in_arg);
    // Absent weights, scales, bias and residual are never read; x stands in for their pointers.
    for i in 0..3 {
        args.ptr_or(w_views.get(i), &xs, &stream);
    }
    for v in n {
        args.i32(v);
    }
    for i in 0..3 {
        args.ptr_or(s_views.get(i).and_then(Option::as_ref), &xs, &stream);
    }
    for m in modes {
        args.i32(m);
    }
    args.ptr_or(b_view.as_ref(), &xs, &stream).i32(has_bias);
    args.ptr_or(r_view.as_ref(), &xs, &stream).i32(has_res);
    // The kernel tells "no norm" and "no watch" by a null pointer.
    args.ptr_or_null(n_view.as_ref(), &stream).f32(eps);
    args.ptr_or_null(mod_views.as_ref().map(|m| &m.0), &stream)
        .ptr_or_null(mod_views.as_ref().map(|m| &m.1), &stream)
        .u64(mod_views.as_ref().map_or(0, |m| m.2));
    args.i32(i32::from(op.gelu));
    args.ptr_or_null(gate_view.as_ref().map(|g| &g.0), &stream)
        .u64(gate_view.as_ref().map_or(0, |g| g.1));
    args.ptr(&y, &stream);
    args.ptr_or_null(watch_view.as_ref(), &stream)
        .i32(op.watch.as_ref().map_or(0, |(_, tag)| *tag as i32));
    // Modulated, each block keeps its normalised copy of x in dynamic shared memory.
    let shared = match mod_views {
        Some(_) => rows * n_in * 2,
        None => 0,
    };
    if shared > 227 << 10 {
        candle_core::bail!(
            "fused matvec: {rows} x {n_in} modulated inputs exceed shared memory ({shared} bytes)"
        );
    }
    if shared > 48 << 10 {
        func.set_attribute(
            sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared as i32,
        )
        .w()?;
    }
    // One block of MATVEC_WARPS warps per TILE_ROWS output features (matvec.cu).
    let config = LaunchConfig {
        grid_dim: ((n_out / TILE_ROWS) as u32, 1, 1),
        block_dim: (32 * MATVEC_WARPS as u32, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    // The arguments match the kernel's signature (matvec.cu). Resident weights may be read
    // before the previous kernel ends; a slot's may not.
    args.launch(&dev, &func, config, op.resident_weights)?;
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev),
        Shape::from((rows, n_out)),
    ))
}
