//! The launchers: the CUDA side of the engine's custom ops (dequantisation, decode attention,
//! the KV store; the fused product's is in `product`) and of the watch, which check their
//! operands and pick and launch a kernel.

use super::launch::RawArgs;
use super::{cuda_view, optional_view, Module};
use crate::dtype::DType as StoredDType;
use crate::engine::attention;
use crate::engine::ops::{DecodeAttention, Dequantize, StepAttention, StoreKv, ATTENTION_WARPS};
use crate::plan::memory::PREFILL_HEAD_DIM;
use anyhow::Result;
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{sys, CudaView, LaunchConfig};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{CudaStorage, Layout, Shape, Tensor};

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

/// A K or V cache operand: its storage and `(offset, batch, head, position)` strides into it.
pub type CacheView<'a> = (&'a CudaStorage, (usize, usize, usize, usize));

/// The CUDA side of [`DecodeAttention`]: bf16 q, K, V.
pub fn decode_attention(
    op: &DecodeAttention,
    (q, lq): (&CudaStorage, &Layout),
    (k, (ko, kb, kh, kt)): CacheView<'_>,
    (v, (vo, vb, vh, vt)): CacheView<'_>,
) -> candle_core::Result<(CudaStorage, Shape)> {
    if op.tokens > 1 {
        return prefill_attention(op, (q, lq), (k, (ko, kb, kh, kt)), (v, (vo, vb, vh, vt)));
    }
    let dev = q.device().clone();
    let (qa, qb) = lq
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("decode attention: q must be contiguous".into()))?;
    let batch = lq.dims()[0];
    let aligned = [ko, kb, kh, kt, vo, vb, vh, vt, op.head_dim]
        .iter()
        .all(|s| s.is_multiple_of(4));
    if !aligned {
        candle_core::bail!("decode attention: K/V rows must start on 8 bytes");
    }
    let table = op.rope.as_ref().map(|(t, _)| t.storage_and_layout());
    let table_view = optional_view::<half::bf16>(&table)?;
    // SAFETY: each block writes its head's `head_dim` outputs.
    let out = unsafe { dev.alloc::<half::bf16>(batch * op.heads * op.head_dim)? };
    let launch = DecodeLaunch {
        q: q.as_cuda_slice::<half::bf16>()?.slice(qa..qb),
        q_stride: op.q_stride,
        rope: table_view.map(|t| (t, op.rope.as_ref().map_or(0, |(_, p)| *p))),
        k: k.as_cuda_slice::<half::bf16>()?.slice(ko..),
        v: v.as_cuda_slice::<half::bf16>()?.slice(vo..),
        strides: [kb, kh, kt, vb, vh, vt],
        out: out.slice(..),
        dims: (batch, op.heads, op.kv_heads, op.head_dim),
        len: op.len,
        store: false,
    };
    launch_decode(&dev, &launch)?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev),
        Shape::from((batch, op.heads, 1, op.head_dim)),
    ))
}

/// One launch of `decode_attention_bf16` (`attention.cu`): one new token a sequence.
struct DecodeLaunch<'a> {
    /// Query rows (the fused q/k/v projection's when `store`), `q_stride` elements apart.
    q: CudaView<'a, half::bf16>,
    q_stride: usize,
    /// The rotary table and the token's position.
    rope: Option<(CudaView<'a, half::bf16>, usize)>,
    k: CudaView<'a, half::bf16>,
    v: CudaView<'a, half::bf16>,
    /// K's, then V's (batch, head, position) strides.
    strides: [usize; 6],
    out: CudaView<'a, half::bf16>,
    /// Sequences, query heads, key/value heads, head width.
    dims: (usize, usize, usize, usize),
    /// Positions attended over (the new one included).
    len: usize,
    /// The new token's key (rotated) and value taken from `q`'s row and written to the cache
    /// at its position, in the same launch.
    store: bool,
}

fn launch_decode(dev: &CudaDevice, l: &DecodeLaunch<'_>) -> candle_core::Result<()> {
    let (batch, heads, kv_heads, d) = l.dims;
    let func = Module::Decode.func(dev, "decode_attention_bf16")?;
    let scale = 1.0f32 / (d as f32).sqrt();
    let stream = dev.cuda_stream();
    let mut args = RawArgs::default();
    args.ptr(&l.q, &stream)
        .u64(l.q_stride as u64)
        .i32(i32::from(l.rope.is_some()));
    // Without rotation the table is never read; q stands in for its pointer.
    args.ptr_or(l.rope.as_ref().map(|(t, _)| t), &l.q, &stream)
        .i32(l.rope.as_ref().map_or(0, |(_, p)| *p as i32))
        .ptr(&l.k, &stream)
        .ptr(&l.v, &stream)
        .ptr(&l.out, &stream);
    args.i32(heads as i32)
        .i32((heads / kv_heads) as i32)
        .i32(l.len as i32)
        .i32(d as i32)
        .f32(scale);
    for s in l.strides {
        args.u64(s as u64);
    }
    args.i32(i32::from(l.store));
    let warps = ATTENTION_WARPS;
    // Shares of the positions (one cluster of blocks per head, sm_90): about
    // ATTENTION_SHARE each, a power of two up to the portable cluster size.
    let split = match super::has_pdl(dev) {
        true => l.len.div_ceil(ATTENTION_SHARE).next_power_of_two().min(8),
        false => 1,
    };
    let config = LaunchConfig {
        grid_dim: (heads as u32, split as u32, batch as u32),
        block_dim: (32 * warps as u32, 1, 1),
        shared_mem_bytes: attention::decode_shared_bytes(l.len, split, d, l.store) as u32,
    };
    // The arguments match the kernel's signature (attention.cu); shared memory at most 48 KiB
    // (engine::attention::applies checks the unsplit size, and a split one is smaller). The
    // kernel reads nothing before the previous kernel ends.
    args.launch_clustered(dev, &func, config, true, split as u32)
}

/// The CUDA side of [`StepAttention`]: for each lane, its new key and value stored and its
/// query attended, one launch a lane, the outputs `[lanes, heads, 1, d]` in one buffer (no
/// copies to join them).
pub fn step_attention(
    op: &StepAttention,
    (qkv, lq): (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = qkv.device().clone();
    let (qa, qb) = lq.contiguous_offsets().ok_or_else(|| {
        candle_core::Error::Msg("step attention: q/k/v must be contiguous".into())
    })?;
    let lanes = op.lanes.len();
    let (heads, kv_heads, d) = (op.heads, op.kv_heads, op.head_dim);
    if lq.dims() != [lanes, 1, op.q_stride] {
        candle_core::bail!("step attention: q/k/v {:?} for {lanes} lanes", lq.dims());
    }
    let qs = qkv.as_cuda_slice::<half::bf16>()?.slice(qa..qb);
    let (table, lt) = op.table.storage_and_layout();
    let table_view = cuda_view::<half::bf16>(&table, lt)?;
    // SAFETY: each lane's launch writes every output of its `heads * d`.
    let out = unsafe { dev.alloc::<half::bf16>(lanes * heads * d)? };
    for (i, (cache, pos)) in op.lanes.iter().enumerate() {
        let (storage, layout) = cache.storage_and_layout();
        let candle_core::Storage::Cuda(storage) = &*storage else {
            candle_core::bail!("step attention: a KV cache is not on the GPU");
        };
        let max_len = layout.dims()[3];
        if layout.dims() != [2, 1, kv_heads, max_len, d] || *pos >= max_len {
            candle_core::bail!("step attention: cache {:?} at {pos}", layout.dims());
        }
        let start = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("step attention: a cache is strided".into()))?
            .0;
        let buffer = storage.as_cuda_slice::<half::bf16>()?;
        let values = kv_heads * max_len * d;
        // The kernel writes the new position's key and value through these views: the cache
        // is the engine's own buffer, and nothing reads it but the kernels queued after.
        let launch = DecodeLaunch {
            q: qs.slice(i * op.q_stride..),
            q_stride: op.q_stride,
            rope: Some((table_view.slice(..), *pos)),
            k: buffer.slice(start..),
            v: buffer.slice(start + values..),
            strides: [values, max_len * d, d, values, max_len * d, d],
            out: out.slice(i * heads * d..),
            dims: (1, heads, kv_heads, d),
            len: pos + 1,
            store: true,
        };
        launch_decode(&dev, &launch)?;
    }
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev),
        Shape::from((lanes, heads, 1, d)),
    ))
}

/// Queries per block of prefill attention (`prefill_attention.cu`), and the keys it takes at once.
const PREFILL_ROWS: usize = 64;

/// [`decode_attention`] for a prefill pass (`op.tokens` > 1, causal): bf16 q/k/v rows, head
/// width [`PREFILL_HEAD_DIM`], one block of 4 warps per 64 queries of a head of a sequence.
fn prefill_attention(
    op: &DecodeAttention,
    (q, lq): (&CudaStorage, &Layout),
    (k, (ko, kb, kh, kt)): CacheView<'_>,
    (v, (vo, vb, vh, vt)): CacheView<'_>,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = q.device().clone();
    let (Some((qa, qb)), Some((table, pos))) = (lq.contiguous_offsets(), op.rope.as_ref()) else {
        candle_core::bail!("prefill attention: q must be contiguous and the positions given");
    };
    let aligned = [ko, kb, kh, kt, vo, vb, vh, vt, qa, op.q_stride]
        .iter()
        .all(|s| s.is_multiple_of(8));
    if op.head_dim != PREFILL_HEAD_DIM || !aligned {
        candle_core::bail!("prefill attention: head width 128 and 16-byte rows only");
    }
    // The pass's keys are the last `tokens` of `len`, the first query at their first position.
    if op.len.checked_sub(op.tokens) != Some(*pos) {
        candle_core::bail!("prefill attention: the pass must end the cached positions");
    }
    let batch = lq.dims()[0];
    let qs = q.as_cuda_slice::<half::bf16>()?.slice(qa..qb);
    let ks = k.as_cuda_slice::<half::bf16>()?.slice(ko..);
    let vs = v.as_cuda_slice::<half::bf16>()?.slice(vo..);
    let (table_storage, table_layout) = table.storage_and_layout();
    let table_view = cuda_view::<half::bf16>(&table_storage, table_layout)?;
    let func = Module::Decode.func(&dev, "prefill_attention_bf16")?;
    let n = batch * op.tokens * op.heads * op.head_dim;
    // SAFETY: each query row's heads are written by the block of its rows and head.
    let out = unsafe { dev.alloc::<half::bf16>(n)? };
    // Queries, keys and values of a block's tiles: rows of 128 bf16 padded by 8.
    let shared = 3 * PREFILL_ROWS * (PREFILL_HEAD_DIM + 8) * 2;
    func.set_attribute(
        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        shared as i32,
    )
    .w()?;
    let stream = dev.cuda_stream();
    let mut args = RawArgs::default();
    args.ptr(&qs, &stream).u64(op.q_stride as u64);
    args.ptr(&table_view, &stream)
        .i32(*pos as i32)
        .i32(op.tokens as i32);
    args.ptr(&ks, &stream).ptr(&vs, &stream).ptr(&out, &stream);
    args.i32(op.heads as i32)
        .i32((op.heads / op.kv_heads) as i32)
        .f32(1.0 / (op.head_dim as f32).sqrt());
    for s in [kb, kh, kt, vb, vh, vt] {
        args.u64(s as u64);
    }
    let config = LaunchConfig {
        grid_dim: (
            op.tokens.div_ceil(PREFILL_ROWS) as u32,
            op.heads as u32,
            batch as u32,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    // The arguments match the kernel's signature (prefill_attention.cu).
    args.launch(&dev, &func, config, false)?;
    Ok((
        CudaStorage::wrap_cuda_slice(out, dev),
        Shape::from((batch, op.tokens, op.heads, op.head_dim)),
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
