//! The launchers of the speech tokenizers' fused block ops ([`DepthwiseMixer`], [`ChannelNorm`],
//! [`ChannelResidual`]) and of the sampler's guided step ([`DpmStep`]); kernels in
//! `kernels/speech.cu`, f32 or bf16, each one launch. The block ops' `[B, C, T]` operands may
//! have any strides (the mixer's result carries the next chunk's cache in extra columns, so the
//! block's input is often a view).

use super::launch::RawArgs;
use super::{cuda_view, Module};
use crate::engine::ops::{
    ChannelBias, ChannelNorm, ChannelResidual, DepthwiseMixer, DpmStep, SPEECH_THREADS,
    SPEECH_TILE_C, SPEECH_TILE_T,
};
use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaView, LaunchConfig};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaStorage, DType, Layout, Shape};

/// A `[B, C, T]` operand from its first element, its dims and its strides.
fn strided<'a, T: CudaDType>(
    s: &'a CudaStorage,
    l: &Layout,
    what: &str,
) -> candle_core::Result<(CudaView<'a, T>, [usize; 3], [u64; 3])> {
    let (&[b, c, t], &[sb, sc, st]) = (l.dims(), l.stride()) else {
        candle_core::bail!("{what} must be [batch, channels, time], got {:?}", l.dims());
    };
    if b * c * t == 0 {
        candle_core::bail!("{what} {:?} is empty", l.dims());
    }
    let view = s.as_cuda_slice::<T>()?.slice(l.start_offset()..);
    Ok((view, [b, c, t], [sb, sc, st].map(|v| v as u64)))
}

/// The launch of a grid-stride kernel over `n` elements, one thread each up to 2^16 blocks.
fn grid_stride(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (n.div_ceil(SPEECH_THREADS).min(1 << 16) as u32, 1, 1),
        block_dim: (SPEECH_THREADS as u32, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `1 / channels` as the f32 candle's mean multiplies by.
fn inv_count(channels: usize) -> f32 {
    (1.0 / channels as f64) as f32
}

/// Threads per block, and the dynamic shared memory of a kernel that normalises `columns`
/// time steps per block (their inverse RMS and 32 partial sums of each, f32).
fn block(columns: usize) -> ((u32, u32, u32), u32) {
    ((SPEECH_THREADS as u32, 1, 1), (33 * columns * 4) as u32)
}

/// The CUDA side of [`DepthwiseMixer`]; `cache` is the stream's second operand.
pub fn depthwise_mixer(
    op: &DepthwiseMixer,
    x: &CudaStorage,
    lx: &Layout,
    cache: Option<(&CudaStorage, &Layout)>,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dtype = x.dtype();
    let (k, [batch, channels, len]) = op.check(dtype, lx, cache.map(|(_, l)| l))?;
    let ctx = k - 1;
    let out_len = len + if op.stream { ctx } else { 0 };
    let dev = x.device().clone();
    // Every operand's storage stays locked (read) until the launch is queued.
    let weights = [&op.norm, &op.bias, &op.gamma].map(|t| t.storage_and_layout());
    let taps = op.taps.storage_and_layout();
    let taps_view = cuda_view::<f32>(&taps.0, taps.1)?;
    let (block_dim, shared_mem_bytes) = block(SPEECH_TILE_T + ctx);
    let config = LaunchConfig {
        grid_dim: (
            out_len.div_ceil(SPEECH_TILE_T) as u32,
            channels.div_ceil(SPEECH_TILE_C) as u32,
            batch as u32,
        ),
        block_dim,
        shared_mem_bytes,
    };
    let stream = dev.cuda_stream();
    macro_rules! launch {
        ($t:ty, $name:literal) => {{
            let func = Module::Speech.func(&dev, $name)?;
            let (xs, _, x_strides) = strided::<$t>(x, lx, "depthwise mixer: x")?;
            let cache = cache
                .map(|(s, l)| strided::<$t>(s, l, "depthwise mixer: cache"))
                .transpose()?;
            let [norm, bias, gamma] =
                [0, 1, 2].map(|i| cuda_view::<$t>(&weights[i].0, weights[i].1));
            let (norm, bias, gamma) = (norm?, bias?, gamma?);
            // SAFETY: every output element is written by the block of its tile.
            let out = unsafe { dev.alloc::<$t>(batch * channels * out_len)? };
            let mut args = RawArgs::default();
            args.ptr(&xs, &stream);
            for s in x_strides {
                args.u64(s);
            }
            // The kernel tells "no cache" (zeros) by a null pointer.
            args.ptr_or_null(cache.as_ref().map(|(v, _, _)| v), &stream);
            for s in cache.as_ref().map_or([0; 3], |(_, _, s)| *s) {
                args.u64(s);
            }
            args.ptr(&norm, &stream)
                .ptr(&taps_view, &stream)
                .ptr(&bias, &stream)
                .ptr(&gamma, &stream)
                .ptr(&out, &stream);
            for v in [channels, len, k, out_len] {
                args.i32(v as i32);
            }
            args.f32(inv_count(channels)).f32(op.eps);
            args.i32(SPEECH_TILE_T as i32).i32(SPEECH_TILE_C as i32);
            // The arguments match the kernel's signature (speech.cu).
            args.launch(&dev, &func, config, false)?;
            CudaStorage::wrap_cuda_slice(out, dev.clone())
        }};
    }
    let out = match dtype {
        DType::F32 => launch!(f32, "dw_mixer_f32"),
        _ => launch!(half::bf16, "dw_mixer_bf16"),
    };
    Ok((out, Shape::from((batch, channels, out_len))))
}

/// The CUDA side of [`ChannelNorm`].
pub fn channel_norm(
    op: &ChannelNorm,
    x: &CudaStorage,
    lx: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dtype = x.dtype();
    let dev = x.device().clone();
    let (weight, lw) = op.weight.storage_and_layout();
    let (block_dim, shared_mem_bytes) = block(SPEECH_TILE_T);
    let stream = dev.cuda_stream();
    macro_rules! launch {
        ($t:ty, $name:literal) => {{
            let func = Module::Speech.func(&dev, $name)?;
            let (xs, [batch, channels, len], x_strides) = strided::<$t>(x, lx, "channel norm: x")?;
            if op.weight.dims() != [channels] || op.weight.dtype() != dtype {
                candle_core::bail!(
                    "channel norm: {dtype:?} x needs a [{channels}] weight of its dtype"
                );
            }
            let w = cuda_view::<$t>(&weight, lw)?;
            // SAFETY: every output element is written by the block of its time steps.
            let out = unsafe { dev.alloc::<$t>(batch * len * channels)? };
            let mut args = RawArgs::default();
            args.ptr(&xs, &stream);
            for s in x_strides {
                args.u64(s);
            }
            args.ptr(&w, &stream).ptr(&out, &stream);
            args.i32(channels as i32).i32(len as i32);
            args.f32(inv_count(channels))
                .f32(op.eps)
                .i32(SPEECH_TILE_T as i32)
                .i32(SPEECH_TILE_C as i32);
            let config = LaunchConfig {
                grid_dim: (
                    len.div_ceil(SPEECH_TILE_T) as u32,
                    channels.div_ceil(SPEECH_TILE_C) as u32,
                    batch as u32,
                ),
                block_dim,
                shared_mem_bytes,
            };
            // The arguments match the kernel's signature (speech.cu).
            args.launch(&dev, &func, config, false)?;
            (
                CudaStorage::wrap_cuda_slice(out, dev.clone()),
                Shape::from((batch, len, channels)),
            )
        }};
    }
    Ok(match dtype {
        DType::F32 => launch!(f32, "channel_norm_f32"),
        DType::BF16 => launch!(half::bf16, "channel_norm_bf16"),
        other => candle_core::bail!("channel norm: cannot normalise {other:?}"),
    })
}

/// The CUDA side of [`ChannelResidual`].
pub fn channel_residual(
    op: &ChannelResidual,
    x: &CudaStorage,
    lx: &Layout,
    h: &CudaStorage,
    lh: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dtype = x.dtype();
    let dev = x.device().clone();
    let (gamma, lg) = op.gamma.storage_and_layout();
    let stream = dev.cuda_stream();
    macro_rules! launch {
        ($t:ty, $name:literal) => {{
            let func = Module::Speech.func(&dev, $name)?;
            let (xs, [batch, channels, len], x_strides) =
                strided::<$t>(x, lx, "channel residual: x")?;
            if lh.dims() != [batch, len, channels] || h.dtype() != dtype {
                candle_core::bail!(
                    "channel residual: h {:?} for {dtype:?} x {:?}",
                    lh.dims(),
                    lx.dims()
                );
            }
            if op.gamma.dims() != [channels] || op.gamma.dtype() != dtype {
                candle_core::bail!(
                    "channel residual: {dtype:?} x needs a [{channels}] gamma of its dtype"
                );
            }
            let Some((ha, hb)) = lh.contiguous_offsets() else {
                candle_core::bail!("channel residual: h must be contiguous");
            };
            let hs = h.as_cuda_slice::<$t>()?.slice(ha..hb);
            let g = cuda_view::<$t>(&gamma, lg)?;
            let n = batch * channels * len;
            // SAFETY: every output element is written by the thread of its index.
            let out = unsafe { dev.alloc::<$t>(n)? };
            let mut args = RawArgs::default();
            args.ptr(&xs, &stream);
            for s in x_strides {
                args.u64(s);
            }
            args.ptr(&hs, &stream).ptr(&g, &stream).ptr(&out, &stream);
            for v in [batch, channels, len] {
                args.i32(v as i32);
            }
            let config = grid_stride(n);
            // The arguments match the kernel's signature (speech.cu).
            args.launch(&dev, &func, config, false)?;
            (
                CudaStorage::wrap_cuda_slice(out, dev.clone()),
                Shape::from((batch, channels, len)),
            )
        }};
    }
    Ok(match dtype {
        DType::F32 => launch!(f32, "channel_residual_f32"),
        DType::BF16 => launch!(half::bf16, "channel_residual_bf16"),
        other => candle_core::bail!("channel residual: cannot add {other:?}"),
    })
}

/// The CUDA side of [`ChannelBias`].
pub fn channel_bias(
    op: &ChannelBias,
    x: &CudaStorage,
    lx: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dtype = x.dtype();
    let dev = x.device().clone();
    let (bias, lb) = op.bias.storage_and_layout();
    let stream = dev.cuda_stream();
    macro_rules! launch {
        ($t:ty, $name:literal) => {{
            let func = Module::Speech.func(&dev, $name)?;
            let (xs, [batch, channels, len], x_strides) = strided::<$t>(x, lx, "channel bias: x")?;
            if op.bias.dims() != [channels] || op.bias.dtype() != dtype {
                candle_core::bail!(
                    "channel bias: {dtype:?} x needs a [{channels}] bias of its dtype"
                );
            }
            let b = cuda_view::<$t>(&bias, lb)?;
            let n = batch * channels * len;
            // SAFETY: every output element is written by the thread of its index.
            let out = unsafe { dev.alloc::<$t>(n)? };
            let mut args = RawArgs::default();
            args.ptr(&xs, &stream);
            for s in x_strides {
                args.u64(s);
            }
            args.ptr(&b, &stream).ptr(&out, &stream);
            for v in [batch, channels, len] {
                args.i32(v as i32);
            }
            // The arguments match the kernel's signature (speech.cu).
            args.launch(&dev, &func, grid_stride(n), false)?;
            (
                CudaStorage::wrap_cuda_slice(out, dev.clone()),
                Shape::from((batch, channels, len)),
            )
        }};
    }
    Ok(match dtype {
        DType::F32 => launch!(f32, "channel_bias_f32"),
        DType::BF16 => launch!(half::bf16, "channel_bias_bf16"),
        other => candle_core::bail!("channel bias: cannot add {other:?}"),
    })
}

/// The CUDA side of [`DpmStep`] on `v` `[2B, L]`, `x` and `prev` `[B, L]` (contiguous, one
/// dtype): `[2, B, L]`.
pub fn dpm_step(
    op: &DpmStep,
    v: (&CudaStorage, &Layout),
    x: (&CudaStorage, &Layout),
    prev: (&CudaStorage, &Layout),
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dtype = x.0.dtype();
    let (batch, len) = op.check(dtype, v.1, x.1, prev.1)?;
    if v.0.dtype() != dtype || prev.0.dtype() != dtype {
        candle_core::bail!("dpm step: v, x and prev must share one dtype");
    }
    let dev = x.0.device().clone();
    let stream = dev.cuda_stream();
    let n = batch * len;
    let offsets = |l: &Layout| {
        l.contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("dpm step: operands must be contiguous".into()))
    };
    let (second, (r_inv, half_b)) = match op.second {
        Some(c) => (1, c),
        None => (0, (0.0, 0.0)),
    };
    macro_rules! launch {
        ($t:ty, $name:literal) => {{
            let func = Module::Speech.func(&dev, $name)?;
            let (va, vb) = offsets(v.1)?;
            let (xa, xb) = offsets(x.1)?;
            let (pa, pb) = offsets(prev.1)?;
            let vs = v.0.as_cuda_slice::<$t>()?.slice(va..vb);
            let xs = x.0.as_cuda_slice::<$t>()?.slice(xa..xb);
            let ps = prev.0.as_cuda_slice::<$t>()?.slice(pa..pb);
            // SAFETY: every output element is written by the thread of its index.
            let out = unsafe { dev.alloc::<$t>(2 * n)? };
            let mut args = RawArgs::default();
            args.ptr(&vs, &stream)
                .ptr(&xs, &stream)
                .ptr(&ps, &stream)
                .ptr(&out, &stream)
                .i32(n as i32);
            for value in [op.cfg, op.alpha, op.sigma, op.a, op.b] {
                args.f32(value);
            }
            args.i32(second).f32(r_inv).f32(half_b);
            let config = grid_stride(n);
            // The arguments match the kernel's signature (speech.cu).
            args.launch(&dev, &func, config, false)?;
            (
                CudaStorage::wrap_cuda_slice(out, dev.clone()),
                Shape::from((2, batch, len)),
            )
        }};
    }
    Ok(match dtype {
        DType::F32 => launch!(f32, "dpm_step_f32"),
        DType::BF16 => launch!(half::bf16, "dpm_step_bf16"),
        other => candle_core::bail!("dpm step: cannot step {other:?}"),
    })
}
