//! Speech out: VibeVoice's generation loop (the original's `generate` at batch 1) on the
//! engine. The positive and the negative (classifier-free guidance) passes are two lanes run
//! in one pass over the layers, so each streamed layer is copied once per frame and serves
//! both; the diffusion head samples each frame, the streaming decoder turns it into audio,
//! and the streaming semantic encoder and the connectors build the next input.

mod benchmark;
mod load;
mod model;
mod session;

pub use benchmark::{run_benchmark, BenchmarkRow, GenerateBenchmark};
pub use load::{load_model, load_report, Allocated, LoadOptions, LoadReport, LoadedModel};
pub use model::{SpeechModel, VoiceLatents};
pub use session::{positions, prompt_tokens, run_generation, GenerateReport, Request};

use crate::engine::{Engine, LaneId};
use crate::rng::Rng;
use crate::speech::FrameSampler;
use crate::text::SpecialTokens;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::time::Instant;

/// Steps the original takes after a prompt of `prompt_len` tokens at most: twice the prompt,
/// and no further than the model's `context`.
pub fn max_steps(prompt_len: usize, context: usize) -> usize {
    (2 * prompt_len).min(context.saturating_sub(prompt_len))
}

/// Where each frame's initial diffusion noise comes from.
pub enum Noise {
    /// Standard normal draws from a seeded generator.
    Seeded(Rng),
    /// Recorded noise `[frames, latent]` (a `--noise` file, or the original's draws).
    Recorded(Tensor),
}

impl Noise {
    /// Noise `[1, latent]` for frame `frame`, in the compute dtype on `device`.
    fn frame(&mut self, frame: usize, latent: usize, like: &Tensor) -> Result<Tensor> {
        let noise = match self {
            Noise::Seeded(rng) => {
                Tensor::from_vec(rng.normals(latent), (1, latent), like.device())?
            }
            Noise::Recorded(all) => {
                let (frames, width) = all.dims2()?;
                if frame >= frames || width != latent {
                    bail!("the recorded noise is [{frames}, {width}]: it has no frame {frame} of {latent} values");
                }
                all.narrow(0, frame, 1)?.to_device(like.device())?
            }
        };
        Ok(noise.to_dtype(like.dtype())?)
    }
}

/// How to generate.
#[derive(Clone, Debug, PartialEq)]
pub struct Options {
    /// Classifier-free guidance scale (the demos use 1.3).
    pub cfg_scale: f64,
    /// Diffusion steps per frame (the demos use 10).
    pub steps: usize,
    /// Stop after this many frames.
    pub max_frames: Option<usize>,
    /// Tokens to take instead of the language model's choices, in order (tests and the
    /// forced-frame benchmark); generation stops when they run out.
    pub forced: Option<Vec<u32>>,
    /// Run the negative pass as its own pass over the layers, as the fork does (a benchmark
    /// of what sharing one weight stream saves); the results are the same.
    pub separate_passes: bool,
    /// Replay each frame's speech components as CUDA graphs where the device allows it
    /// ([`FrameSampler`], [`crate::speech::StreamState::use_graphs`]); the results are the
    /// same bits.
    pub graphs: bool,
}

/// Where the time of a generation went, in ms (the device is synchronised between parts).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// The language model: the prompt's prefill.
    pub prefill_ms: f64,
    /// The language model: every step's pass (both lanes) and the token choice.
    pub lm_ms: f64,
    /// The diffusion head and sampler.
    pub head_ms: f64,
    /// The streaming acoustic decoder.
    pub decoder_ms: f64,
    /// The streaming semantic encoder and the connectors.
    pub semantic_ms: f64,
}

/// How many times each speech component ran as a replayed CUDA graph.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphRuns {
    /// Frames the diffusion head sampled.
    pub head: usize,
    /// Frames the acoustic decoder decoded.
    pub decoder: usize,
    /// Frames the semantic encoder encoded.
    pub semantic: usize,
}

/// What a generation produced.
#[derive(Debug)]
pub struct Outcome {
    /// Every token the loop took, in order.
    pub tokens: Vec<u32>,
    /// The logits of the four speech tokens at each step, in [`SpecialTokens::all`] order.
    pub logits: Vec<[f32; 4]>,
    /// The conditions handed to the head for each frame: `[2, hidden]` (positive, negative).
    pub conditions: Vec<Tensor>,
    /// Each frame's sampled latent `[1, latent]` (normalised space).
    pub latents: Vec<Tensor>,
    /// Audio samples produced.
    pub samples: usize,
    /// Where the time went.
    pub timings: Timings,
    /// Frames whose speech components ran as CUDA graphs.
    pub graph_runs: GraphRuns,
}

/// The negative lane's input at step 0: speech_start (the original's negative prompt).
fn negative_start(engine: &Engine, special: SpecialTokens) -> Result<Tensor> {
    engine.embed_ids(&[special.speech_start])
}

/// Runs the loop from a prompt: `prompt` `[tokens, hidden]` (text embeddings with the voice
/// placeholders filled, see [`prompt_embeddings`]), `on_audio` called with each frame's audio
/// `[hop]` (f32 on the CPU) as it is produced.
pub fn generate(
    engine: &mut Engine,
    speech: &SpeechModel,
    special: SpecialTokens,
    prompt: &Tensor,
    options: &Options,
    noise: &mut Noise,
    on_audio: &mut dyn FnMut(&[f32]) -> Result<()>,
) -> Result<Outcome> {
    let solver = speech.solver(options.steps)?;
    let latent_size = speech.config.head.latent_size;
    let prompt_len = prompt.dim(0)?;
    engine.reset();
    let negative: LaneId = match engine.lane_position(1) {
        Ok(_) => 1,
        Err(_) => engine.add_lane(),
    };
    // The original's limit: twice the prompt, within the model's context; a forced schedule
    // runs to its end.
    let context = engine.info().config.max_position_embeddings;
    if options.forced.is_none() && prompt_len >= context {
        bail!(
            "the prompt is {prompt_len} tokens, the model's whole context ({context} positions): \
             shorten the script or the voice samples"
        );
    }
    let max_steps = options
        .forced
        .as_ref()
        .map_or(max_steps(prompt_len, context), Vec::len);
    let mut decoder_state = speech.acoustic_decoder.stream_state();
    let mut semantic_state = speech.semantic_encoder.stream_state();
    decoder_state.use_graphs(options.graphs);
    semantic_state.use_graphs(options.graphs);
    let mut out = Outcome {
        tokens: Vec::new(),
        logits: Vec::new(),
        conditions: Vec::new(),
        latents: Vec::new(),
        samples: 0,
        timings: Timings::default(),
        graph_runs: GraphRuns::default(),
    };
    let sync = |engine: &Engine| engine.synchronize();
    let valid = special.all();

    let mut sampler: Option<FrameSampler> = None;
    let mut x_in = prompt.clone();
    for step in 0..max_steps {
        if options.max_frames.is_some_and(|m| out.latents.len() >= m) {
            break;
        }
        if let Some(forced) = &options.forced {
            if step >= forced.len() {
                break;
            }
        }
        if engine.remaining_tokens() < x_in.dim(0)? {
            break;
        }
        // Both lanes in one pass: the negative one is computed speculatively and rolled back
        // unless the step turns out to be a frame.
        let started = Instant::now();
        let neg_in = match step {
            0 => negative_start(engine, special)?,
            _ => x_in.clone(),
        };
        let neg_before = engine.lane_position(negative)?;
        let hidden = match options.separate_passes {
            false => engine.forward_lanes(&[(0, &x_in), (negative, &neg_in)]),
            true => engine.forward_lanes(&[(0, &x_in)]).and_then(|mut h| {
                h.extend(engine.forward_lanes(&[(negative, &neg_in)])?);
                Ok(h)
            }),
        }
        .with_context(|| format!("generation step {step}"))?;
        let last = |h: &Tensor| -> Result<Tensor> { Ok(h.narrow(0, h.dim(0)? - 1, 1)?) };
        let (h_pos, h_neg) = (last(&hidden[0])?, last(&hidden[1])?);
        let picked: Vec<f32> = engine.token_logits(&h_pos.squeeze(0)?, &valid)?.to_vec1()?;
        let token = match &options.forced {
            Some(forced) => forced[step],
            None => choose(&valid, &picked),
        };
        if !valid.contains(&token) {
            bail!("forced token {token} at step {step} is not one of the speech tokens {valid:?}");
        }
        out.tokens.push(token);
        out.logits
            .push([picked[0], picked[1], picked[2], picked[3]]);
        if step == 0 {
            sync(engine)?;
            out.timings.prefill_ms += ms(started);
        } else {
            sync(engine)?;
            out.timings.lm_ms += ms(started);
        }

        if token != special.speech_diffusion {
            engine.truncate_lane(negative, neg_before)?;
        }
        if token == special.eos {
            break;
        }
        if token == special.speech_end {
            decoder_state.reset();
            semantic_state.reset();
        }
        if token == special.speech_start {
            engine.reset_lane(negative)?;
        }
        let mut next_in = engine.embed_ids(&[token])?;
        if token == special.speech_diffusion {
            let frame = out.latents.len();
            let started = Instant::now();
            // The speech components may run in another dtype than the language model, and the
            // head on the CPU (--offload-prediction-head): its inputs go where it runs, the
            // latent comes back (CUDA graphs only where the head is on CUDA).
            let condition = |h: &Tensor| speech.to_head(&h.to_dtype(speech.dtype())?);
            let (pos, neg) = (condition(&h_pos)?, condition(&h_neg)?);
            let noise = noise.frame(frame, latent_size, &pos)?;
            if sampler.is_none() {
                sampler = Some(FrameSampler::new(
                    &speech.head,
                    &solver,
                    options.cfg_scale,
                    options.graphs && pos.device().is_cuda(),
                    pos.dtype(),
                    pos.device(),
                )?);
            }
            let latent = sampler
                .as_mut()
                .expect("made above")
                .sample(&noise, &pos, &neg)
                .and_then(|latent| speech.from_head(&latent))
                .with_context(|| format!("sampling frame {frame}"))?;
            sync(engine)?;
            out.timings.head_ms += ms(started);

            let started = Instant::now();
            let audio = speech
                .acoustic_decoder
                .decode_chunk(&speech.unscale(&latent)?.unsqueeze(1)?, &mut decoder_state)
                .with_context(|| format!("decoding frame {frame}"))?;
            let samples: Vec<f32> = audio
                .flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_device(&Device::Cpu)?
                .to_vec1()?;
            if samples.iter().any(|s| !s.is_finite()) {
                bail!("frame {frame} decoded to NaN or infinite audio");
            }
            out.timings.decoder_ms += ms(started);
            on_audio(&samples)?;
            out.samples += samples.len();

            let started = Instant::now();
            let semantic = speech
                .semantic_encoder
                .encode_chunk(&audio, &mut semantic_state)
                .with_context(|| format!("semantic features of frame {frame}"))?;
            let acoustic_in = speech.acoustic_connector.forward(&latent.unsqueeze(1)?)?;
            let semantic_in = speech.semantic_connector.forward(&semantic)?;
            next_in = (acoustic_in + semantic_in)?.squeeze(0)?;
            sync(engine)?;
            out.timings.semantic_ms += ms(started);
            out.conditions.push(Tensor::cat(&[&h_pos, &h_neg], 0)?);
            out.latents.push(latent);
        }
        x_in = next_in;
    }
    out.graph_runs = GraphRuns {
        head: sampler.as_ref().map_or(0, FrameSampler::replayed),
        decoder: decoder_state.replayed(),
        semantic: semantic_state.replayed(),
    };
    Ok(out)
}

/// The argmax over the speech tokens; ties go to the smallest id, as `torch.argmax` over the
/// masked vocabulary does.
fn choose(ids: &[u32; 4], logits: &[f32]) -> u32 {
    let mut best = (f32::NEG_INFINITY, u32::MAX);
    for (&id, &logit) in ids.iter().zip(logits) {
        if logit > best.0 || (logit == best.0 && id < best.1) {
            best = (logit, id);
        }
    }
    best.1
}

/// The prompt's language-model inputs: the embeddings of `ids`, with the positions marked in
/// `voice_mask` replaced, in order, by the rows of `voices` (each `[frames, hidden]`).
pub fn prompt_embeddings(
    engine: &Engine,
    ids: &[u32],
    voice_mask: &[bool],
    voices: &[Tensor],
) -> Result<Tensor> {
    if ids.len() != voice_mask.len() {
        bail!(
            "{} prompt tokens but a voice mask of {}",
            ids.len(),
            voice_mask.len()
        );
    }
    let text = engine.embed_ids(ids)?;
    let voice_rows = match voices.len() {
        0 => None,
        _ => Some(Tensor::cat(voices, 0)?.to_dtype(text.dtype())?),
    };
    let placeholders = voice_mask.iter().filter(|&&m| m).count();
    let frames = voice_rows.as_ref().map_or(Ok(0), |v| v.dim(0))?;
    if placeholders != frames {
        bail!("the prompt has {placeholders} voice placeholders for {frames} voice frames");
    }
    // Runs of text and voice rows, in order.
    let mut pieces = Vec::new();
    let (mut start, mut voice_at) = (0, 0);
    while start < ids.len() {
        let is_voice = voice_mask[start];
        let len = voice_mask[start..]
            .iter()
            .take_while(|&&m| m == is_voice)
            .count();
        pieces.push(match (&voice_rows, is_voice) {
            (Some(rows), true) => {
                voice_at += len;
                rows.narrow(0, voice_at - len, len)?
            }
            _ => text.narrow(0, start, len)?,
        });
        start += len;
    }
    Ok(Tensor::cat(&pieces, 0)?)
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_go_to_the_smallest_id() {
        assert_eq!(choose(&[10, 11, 12, 3], &[1.0, 2.0, 2.0, 0.5]), 11);
        assert_eq!(choose(&[10, 11, 12, 3], &[1.0, 1.0, 1.0, 1.0]), 3);
    }

    #[test]
    fn generation_stops_at_twice_the_prompt_within_the_context() {
        assert_eq!(max_steps(100, 32768), 200);
        // A 45-minute script's prompt: the context, not twice the prompt, is the limit.
        assert_eq!(max_steps(12555, 32768), 20213);
        assert_eq!(max_steps(40000, 32768), 0);
        assert_eq!(session::positions(12555, None, 32768), 32769);
        assert_eq!(session::positions(100, None, 32768), 301);
        assert_eq!(session::positions(100, Some(64), 32768), 166);
    }
}
