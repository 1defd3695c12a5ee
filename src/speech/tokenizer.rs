//! The convolutional speech tokenizers: the acoustic encoder and decoder and the semantic
//! encoder (the original's `TokenizerEncoder` / `TokenizerDecoder`), whole-signal and
//! streaming. Both stacks alternate a (strided or transposed) convolution with stages of
//! [`Block`]s; the final norm is the identity (`disable_last_norm`).

use super::conv::{CausalConv1d, CausalConvTranspose1d, Slot};
use super::fused;
use super::nn::{apply, fused_around, linear, Linear};
use super::weights::Scope;
use crate::arch::speech::{ConvStack, TokenizerConfig, TOKENIZER_KERNEL};
use crate::engine::model::Around;
use crate::engine::ops::{ChannelNorm, ChannelResidual, DepthwiseMixer};
use crate::engine::replay::Replay;
use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Tensor};
use std::slice::IterMut;

/// The original's `Block1D`: a depthwise causal convolution and a GELU feed-forward, each
/// after a channel RMSNorm and scaled by a learned per-channel factor, both residual. The
/// parts around the two linear layers run as fused ops (`fused`), on `[B, C, T]` as it comes,
/// without transposed copies.
struct Block {
    /// `x + gamma ⊙ DWConv(RMSNorm(x))`.
    mixer: DepthwiseMixer,
    ffn_norm: ChannelNorm,
    linear1: Linear,
    linear2: Linear,
    /// `x + ffn_gamma ⊙ FFN(...)ᵀ`.
    ffn_residual: ChannelResidual,
    name: String,
}

impl Block {
    fn new(scope: &Scope, dim: usize, eps: f64) -> Result<Block> {
        let ffn = scope.sub("ffn");
        let mixer = fused::load_mixer(scope, dim, TOKENIZER_KERNEL, eps)?;
        let norm = scope.get("ffn_norm.weight", &[dim])?;
        let dtype = norm.dtype();
        Ok(Block {
            mixer,
            ffn_norm: ChannelNorm {
                weight: norm,
                eps: eps as f32,
            },
            linear1: linear(&ffn.sub("linear1"), dim, 4 * dim, true)?.decoded_if_small(dtype)?,
            linear2: linear(&ffn.sub("linear2"), 4 * dim, dim, true)?.decoded_if_small(dtype)?,
            ffn_residual: ChannelResidual {
                gamma: scope.get("ffn_gamma", &[dim])?,
            },
            name: scope.name().to_string(),
        })
    }

    /// `x` `[B, C, T]` (any strides); `slot` streams the mixer.
    fn run(&self, x: &Tensor, slot: Option<&mut Slot>) -> Result<Tensor> {
        let fail = |what: &str| format!("applying {}'s fused {what} to {:?}", self.name, x.dims());
        let x = fused::mix(&self.mixer, x, slot).with_context(|| fail("mixer"))?;
        if let Some(out) = self.ffn_one_step(&x)? {
            return Ok(out);
        }
        let h = x
            .apply_op1_no_bwd(&self.ffn_norm)
            .with_context(|| fail("ffn_norm"))?;
        let h = apply(&self.linear1, &h, &self.name, "ffn.linear1")?.gelu_erf()?;
        let h = apply(&self.linear2, &h, &self.name, "ffn.linear2")?;
        x.apply_op2_no_bwd(&h, &self.ffn_residual)
            .with_context(|| fail("ffn residual"))
    }

    /// The feed-forward half for one time step of one sequence (the deepest stages, streamed
    /// frame by frame) in two fused launches where its linears are float8: the channel norm
    /// and GELU inside the first product, the layer scale and the residual inside the second.
    /// `None` for other shapes and weights (the unfused ops then run).
    fn ffn_one_step(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let (batch, channels, steps) = x.dims3()?;
        let stored = matches!(
            (&self.linear1, &self.linear2),
            (Linear::Stored { .. }, Linear::Stored { .. })
        );
        if batch != 1 || steps != 1 || !stored {
            return Ok(None);
        }
        let row = x.contiguous()?.reshape((1, channels))?;
        let first = Around {
            norm: Some((&self.ffn_norm.weight, self.ffn_norm.eps)),
            gelu: true,
            ..Around::default()
        };
        let Some(h) = fused_around(&row, &[&self.linear1], false, first)? else {
            return Ok(None);
        };
        let gamma = self.ffn_residual.gamma.reshape((1, channels))?;
        let second = Around {
            gated_residual: Some((&row, &gamma)),
            ..Around::default()
        };
        let out = fused_around(&h, &[&self.linear2], false, second)?;
        out.map(|y| Ok(y.reshape((1, channels, 1))?)).transpose()
    }
}

/// The streaming caches of one encoder or decoder, one per convolution in application
/// order. A fresh state (or one after [`StreamState::reset`]) starts from silence, as the
/// original's zeroed cache at `speech_end` does. With [`StreamState::use_graphs`], once every
/// cache is filled, a chunk's work is captured as one CUDA graph and replayed for the chunks
/// that follow (the caches then live in the graph's inputs, updated in place).
pub struct StreamState {
    /// The module it belongs to, by weight prefix.
    owner: String,
    slots: Vec<Slot>,
    graphs: bool,
    replay: Option<Replay>,
    replayed: usize,
}

impl StreamState {
    fn new(owner: &str, layers: usize) -> StreamState {
        StreamState {
            owner: owner.to_string(),
            slots: (0..layers).map(|_| None).collect(),
            graphs: false,
            replay: None,
            replayed: 0,
        }
    }

    /// Chunks run by a CUDA graph so far (resets included).
    pub fn replayed(&self) -> usize {
        self.replayed
    }

    /// Replays chunks as a CUDA graph where the device allows it (see the type's doc); off by
    /// default. The results are the same bits either way.
    pub fn use_graphs(&mut self, on: bool) {
        self.graphs = on;
        if !on {
            self.replay = None;
        }
    }

    /// Forgets everything streamed so far.
    pub fn reset(&mut self) {
        self.slots.iter_mut().for_each(|s| *s = None);
        self.replay = None;
    }

    /// One chunk `x` of `module` (with `layers` convolutions): `run(x, slots)`, or its graph.
    fn chunk(
        &mut self,
        module: &str,
        layers: usize,
        x: &Tensor,
        run: impl Fn(&Tensor, IterMut<'_, Slot>) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if self.owner != module || self.slots.len() != layers {
            bail!(
                "{module}: this streaming state was made for another module ({})",
                self.owner
            );
        }
        if let Some(replay) = &self.replay {
            if replay.fits(&[x]) {
                self.replayed += 1;
                return Ok(replay.run(&[x])?.remove(0));
            }
            // Another chunk length: run directly, on the caches the graph left.
            self.replay = None;
        } else if self.graphs && self.slots.iter().all(Option::is_some) {
            let mut inputs = vec![x];
            inputs.extend(self.slots.iter().flatten());
            let captured = Replay::capture(&inputs, 1, |statics| {
                let mut slots: Vec<Slot> = statics[1..].iter().cloned().map(Some).collect();
                let out = run(&statics[0], slots.iter_mut())?;
                for (cache, new) in statics[1..].iter().zip(slots) {
                    let new =
                        new.ok_or_else(|| anyhow!("{module}: a streaming cache was emptied"))?;
                    cache.slice_set(&new.contiguous()?, 0, 0)?;
                }
                Ok(vec![out])
            })
            .with_context(|| format!("capturing a chunk of {module} as a CUDA graph"))?;
            match captured {
                Some((replay, mut out)) => {
                    self.slots = replay.inputs()[1..].iter().cloned().map(Some).collect();
                    self.replay = Some(replay);
                    self.replayed += 1;
                    return Ok(out.remove(0));
                }
                // The device cannot capture.
                None => self.graphs = false,
            }
        }
        run(x, self.slots.iter_mut())
    }
}

/// The next layer's slot when streaming, `None` for a whole signal.
fn next<'s>(slots: &mut Option<IterMut<'s, Slot>>) -> Result<Option<&'s mut Slot>> {
    match slots {
        None => Ok(None),
        Some(it) => it
            .next()
            .map(Some)
            .ok_or_else(|| anyhow!("streaming state ran out of layers")),
    }
}

/// Runs the blocks of one stage.
fn run_stage(
    blocks: &[Block],
    mut x: Tensor,
    slots: &mut Option<IterMut<'_, Slot>>,
) -> Result<Tensor> {
    for block in blocks {
        x = block.run(&x, next(slots)?)?;
    }
    Ok(x)
}

fn load_stages(
    scope: &Scope,
    stack: &ConvStack,
    width: impl Fn(usize) -> usize,
    eps: f64,
) -> Result<Vec<Vec<Block>>> {
    (0..stack.depths.len())
        .map(|i| {
            (0..stack.depths[i])
                .map(|j| Block::new(&scope.sub(&format!("stages.{i}.{j}")), width(i), eps))
                .collect()
        })
        .collect()
}

/// A tokenizer encoder: audio `[B, channels, N]` to latent frames `[B, ceil(N / hop), vae_dim]`.
pub struct Encoder {
    /// The stem, then one strided convolution per ratio.
    downsample: Vec<CausalConv1d>,
    stages: Vec<Vec<Block>>,
    head: CausalConv1d,
    channels: usize,
    hop: usize,
    name: String,
}

impl Encoder {
    /// The encoder of `config` at `scope` (`model.acoustic_tokenizer.encoder`,
    /// `model.semantic_tokenizer.encoder`).
    pub fn new(config: &TokenizerConfig, scope: &Scope) -> Result<Encoder> {
        config.validate(scope.name())?;
        let stack = &config.encoder;
        let width = |i| stack.encoder_width(i);
        let mut downsample = vec![CausalConv1d::dense(
            &scope.sub("downsample_layers.0.0"),
            config.channels,
            width(0),
            TOKENIZER_KERNEL,
            1,
        )?];
        for (i, &ratio) in stack.ratios.iter().enumerate() {
            downsample.push(CausalConv1d::dense(
                &scope.sub(&format!("downsample_layers.{}.0", i + 1)),
                width(i),
                width(i + 1),
                2 * ratio,
                ratio,
            )?);
        }
        let last = width(stack.depths.len() - 1);
        Ok(Encoder {
            downsample,
            stages: load_stages(scope, stack, width, config.layernorm_eps)?,
            head: CausalConv1d::dense(
                &scope.sub("head"),
                last,
                config.vae_dim,
                TOKENIZER_KERNEL,
                1,
            )?,
            channels: config.channels,
            hop: stack.hop(),
            name: scope.name().to_string(),
        })
    }

    fn layers(&self) -> usize {
        self.downsample.len() + self.stages.iter().map(Vec::len).sum::<usize>() + 1
    }

    /// A fresh streaming state for [`Encoder::encode_chunk`].
    pub fn stream_state(&self) -> StreamState {
        StreamState::new(&self.name, self.layers())
    }

    /// The means of the latent frames of `audio` `[B, channels, N]`: `[B, ceil(N / hop),
    /// vae_dim]` (the original's `encode(audio).mean`).
    pub fn encode(&self, audio: &Tensor) -> Result<Tensor> {
        self.run(audio, None)
    }

    /// Streams `audio` `[B, channels, k·hop]` on from `state`: `[B, k, vae_dim]`, equal to the
    /// matching frames of [`Encoder::encode`] over everything streamed since the last reset.
    pub fn encode_chunk(&self, audio: &Tensor, state: &mut StreamState) -> Result<Tensor> {
        let len = audio.dim(2)?;
        if len % self.hop != 0 {
            bail!(
                "{}: a streaming chunk of {len} samples is not a multiple of the hop {}",
                self.name,
                self.hop
            );
        }
        state.chunk(&self.name, self.layers(), audio, |x, slots| {
            self.run(x, Some(slots))
        })
    }

    /// [`Encoder::encode`] in pieces of at most `frames` frames streamed one after the other,
    /// so that its working memory is bounded by the piece, not the signal (voice prompts of any
    /// length); the last piece may end with a partial frame, padded as the whole signal's end
    /// is. The same values as [`Encoder::encode`], up to the products' summation order.
    pub fn encode_in_pieces(&self, audio: &Tensor, frames: usize) -> Result<Tensor> {
        let len = audio.dim(2)?;
        let piece = frames.max(1) * self.hop;
        let mut state = self.stream_state();
        let mut out = Vec::with_capacity(len.div_ceil(piece));
        for at in (0..len).step_by(piece) {
            let x = audio.narrow(2, at, piece.min(len - at))?;
            out.push(state.chunk(&self.name, self.layers(), &x, |x, slots| {
                self.run(x, Some(slots))
            })?);
        }
        match out.len() {
            0 => self.encode(audio),
            _ => Ok(Tensor::cat(&out, 1)?),
        }
    }

    fn run(&self, audio: &Tensor, mut slots: Option<IterMut<'_, Slot>>) -> Result<Tensor> {
        let (_, channels, _) = audio.dims3()?;
        if channels != self.channels {
            bail!(
                "{}: audio has {channels} channels, the encoder takes {}",
                self.name,
                self.channels
            );
        }
        let mut x = audio.clone();
        for (conv, blocks) in self.downsample.iter().zip(&self.stages) {
            x = conv.run(&x, next(&mut slots)?)?;
            x = run_stage(blocks, x, &mut slots)?;
        }
        let x = self.head.run(&x, next(&mut slots)?)?;
        Ok(x.transpose(1, 2)?.contiguous()?)
    }
}

/// The acoustic decoder: latent frames `[B, T, vae_dim]` to audio `[B, channels, T·hop]`.
pub struct Decoder {
    stem: CausalConv1d,
    /// One transposed convolution per ratio.
    upsample: Vec<CausalConvTranspose1d>,
    stages: Vec<Vec<Block>>,
    head: CausalConv1d,
    vae_dim: usize,
    name: String,
}

impl Decoder {
    /// The decoder of `config` at `scope` (`model.acoustic_tokenizer.decoder`).
    pub fn new(config: &TokenizerConfig, scope: &Scope) -> Result<Decoder> {
        config.validate(scope.name())?;
        let stack = config
            .decoder
            .as_ref()
            .ok_or_else(|| anyhow!("{}: the configuration has no decoder", scope.name()))?;
        let width = |i| stack.decoder_width(i);
        let upsample = stack
            .ratios
            .iter()
            .enumerate()
            .map(|(i, &ratio)| {
                CausalConvTranspose1d::new(
                    &scope.sub(&format!("upsample_layers.{}.0", i + 1)),
                    width(i),
                    width(i + 1),
                    2 * ratio,
                    ratio,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let last = width(stack.depths.len() - 1);
        Ok(Decoder {
            stem: CausalConv1d::dense(
                &scope.sub("upsample_layers.0.0"),
                config.vae_dim,
                width(0),
                TOKENIZER_KERNEL,
                1,
            )?,
            upsample,
            stages: load_stages(scope, stack, width, config.layernorm_eps)?,
            head: CausalConv1d::dense(
                &scope.sub("head"),
                last,
                config.channels,
                TOKENIZER_KERNEL,
                1,
            )?,
            vae_dim: config.vae_dim,
            name: scope.name().to_string(),
        })
    }

    fn layers(&self) -> usize {
        2 + self.upsample.len() + self.stages.iter().map(Vec::len).sum::<usize>()
    }

    /// A fresh streaming state for [`Decoder::decode_chunk`].
    pub fn stream_state(&self) -> StreamState {
        StreamState::new(&self.name, self.layers())
    }

    /// The audio of `latents` `[B, T, vae_dim]`: `[B, channels, T·hop]`.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        self.run(latents, None)
    }

    /// Streams `latents` `[B, T, vae_dim]` (one frame per step in generation) on from `state`:
    /// `[B, channels, T·hop]`, equal to the matching samples of [`Decoder::decode`] over every
    /// frame streamed since the last reset.
    pub fn decode_chunk(&self, latents: &Tensor, state: &mut StreamState) -> Result<Tensor> {
        state.chunk(&self.name, self.layers(), latents, |x, slots| {
            self.run(x, Some(slots))
        })
    }

    fn run(&self, latents: &Tensor, mut slots: Option<IterMut<'_, Slot>>) -> Result<Tensor> {
        let (_, _, dim) = latents.dims3()?;
        if dim != self.vae_dim {
            bail!(
                "{}: latents {:?} must be [batch, frames, {}]",
                self.name,
                latents.dims(),
                self.vae_dim
            );
        }
        let mut x = self
            .stem
            .run(&latents.transpose(1, 2)?.contiguous()?, next(&mut slots)?)?;
        x = run_stage(&self.stages[0], x, &mut slots)?;
        for (conv, blocks) in self.upsample.iter().zip(&self.stages[1..]) {
            x = conv.run(&x, next(&mut slots)?)?;
            x = run_stage(blocks, x, &mut slots)?;
        }
        self.head.run(&x, next(&mut slots)?)
    }
}

/// The acoustic encoder's Gaussian sample (the original's `sample(dist_type="gaussian")`,
/// which the voice prompt uses): `mean + (draws·fix_std/0.8)[b] ⊙ noise`, where `draws` `[B]`
/// and `noise` (shaped like `mean`) are standard normal draws the caller makes.
pub fn gaussian_sample(
    mean: &Tensor,
    fix_std: f64,
    draws: &Tensor,
    noise: &Tensor,
) -> Result<Tensor> {
    let batch = mean.dim(0)?;
    if draws.dims() != [batch] || noise.dims() != mean.dims() {
        bail!(
            "gaussian sample: draws {:?} must be [{batch}] and noise {:?} shaped like the mean {:?}",
            draws.dims(),
            noise.dims(),
            mean.dims()
        );
    }
    // The original divides the f32 buffer fix_std by 0.8 in f32.
    let value = (fix_std as f32 / 0.8f32) as f64;
    let std = draws
        .to_dtype(DType::F32)?
        .affine(value, 0.0)?
        .to_dtype(mean.dtype())?
        .reshape((batch, 1, 1))?;
    Ok((mean + noise.broadcast_mul(&std)?)?)
}
