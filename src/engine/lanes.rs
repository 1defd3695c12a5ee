//! The sequences an engine keeps (lanes, each with its own KV caches and position) and how
//! they go through a decoder layer together: VibeVoice's positive and negative passes are two
//! lanes sharing every weight read or copy.

use super::cache::Lane;
use super::model::{self, Rope};
use super::watch::Watch;
use super::weights::LayerWeights;
use super::{Engine, LaneId};
use crate::plan::memory;
use anyhow::{bail, Context, Result};
use candle_core::Tensor;

impl Engine {
    /// Fails unless `lane` can take `t` more tokens within `--max-seq-len`.
    pub(super) fn check_room(&self, lane: LaneId, t: usize) -> Result<()> {
        let position = self.lane(lane)?.position;
        if position + t > self.max_seq_len {
            bail!(
                "the sequence would reach {} tokens, beyond --max-seq-len {}",
                position + t,
                self.max_seq_len
            );
        }
        Ok(())
    }

    /// Lane `lane`, or an error naming it.
    pub(super) fn lane(&self, lane: LaneId) -> Result<&Lane> {
        self.lanes
            .get(lane)
            .ok_or_else(|| anyhow::anyhow!("no sequence lane {lane}"))
    }

    /// Adds an empty sequence lane and returns its id. Lanes run together in
    /// [`Engine::forward_lanes`], sharing every weight copy.
    pub fn add_lane(&mut self) -> LaneId {
        self.lanes
            .push(Lane::new(&self.info.config, self.max_seq_len));
        self.lanes.len() - 1
    }

    /// Empties one lane's cache (its next token is at position 0).
    pub fn reset_lane(&mut self, lane: LaneId) -> Result<()> {
        self.lane(lane)?;
        self.lanes[lane].position = 0;
        Ok(())
    }

    /// Forgets a lane's positions from `position` on (a pass computed speculatively and not
    /// kept: the cache is positional, so the next pass overwrites them).
    pub fn truncate_lane(&mut self, lane: LaneId, position: usize) -> Result<()> {
        let held = self.lane(lane)?.position;
        if position > held {
            bail!("lane {lane} holds {held} positions, it cannot be cut to {position}");
        }
        self.lanes[lane].position = position;
        Ok(())
    }

    /// Positions a lane holds.
    pub fn lane_position(&self, lane: LaneId) -> Result<usize> {
        Ok(self.lane(lane)?.position)
    }

    /// Token embeddings `[ids.len(), hidden]` in the compute dtype, on the device: the input
    /// [`Engine::forward_lanes`] takes for text tokens.
    pub fn embed_ids(&self, ids: &[u32]) -> Result<Tensor> {
        if ids.is_empty() {
            bail!("no input tokens");
        }
        Ok(self.embed(&[ids])?.squeeze(0)?)
    }

    /// Runs input embeddings (`[tokens, hidden]`, any number of tokens) through the model,
    /// each after the tokens already in its lane, all lanes in one pass over the layers (a
    /// streamed layer is copied once and serves every lane). Returns each lane's final-normed
    /// hidden states `[tokens, hidden]`, in order; fails, naming the layer, on NaN or infinity.
    pub fn forward_lanes(&mut self, inputs: &[(LaneId, &Tensor)]) -> Result<Vec<Tensor>> {
        let hidden = self.info.config.hidden_size;
        let mut lengths = Vec::with_capacity(inputs.len());
        for (i, (lane, x)) in inputs.iter().enumerate() {
            let (t, width) = x.dims2()?;
            lengths.push(t);
            if t == 0 || width != hidden {
                bail!("lane input {i} is [{t}, {width}], not [tokens, {hidden}]");
            }
            if inputs[..i].iter().any(|(l, _)| l == lane) {
                bail!("lane {lane} appears twice in one pass");
            }
            self.check_room(*lane, t)?;
        }
        // Chunked like prompts (plan::memory::PREFILL_CHUNK_TOKENS): a lane whose input is
        // used up sits out the remaining chunks.
        let chunk = memory::PREFILL_CHUNK_TOKENS as usize;
        let longest = lengths.iter().copied().max().unwrap_or(0);
        let mut pieces: Vec<Vec<Tensor>> = vec![Vec::new(); inputs.len()];
        for start in (0..longest).step_by(chunk) {
            let mut chunk_inputs = Vec::new();
            let mut owners = Vec::new();
            for (k, ((lane, x), &t)) in inputs.iter().zip(&lengths).enumerate() {
                if start >= t {
                    continue;
                }
                let n = chunk.min(t - start);
                let position = self.lanes[*lane].position;
                let mask = (n > 1)
                    .then(|| model::causal_mask(n, position, &self.device))
                    .transpose()?;
                let piece = x.narrow(0, start, n)?.to_dtype(self.dtype)?.unsqueeze(0)?;
                chunk_inputs.push((*lane, piece, mask));
                owners.push(k);
            }
            let outputs = self.forward_chunk_lanes(chunk_inputs)?;
            for (k, out) in owners.into_iter().zip(outputs) {
                pieces[k].push(out.squeeze(0)?);
            }
        }
        self.take_watch()?;
        pieces
            .into_iter()
            .map(|p| Ok(Tensor::cat(&p, 0)?))
            .collect()
    }
}

/// Layer `i` for one token of each of several lanes, batched as `x` (`[lanes, 1, hidden]`),
/// the lanes named by `inputs`; `x` becomes the layer's output.
pub(super) fn step_lanes(
    config: &crate::arch::config::ModelConfig,
    weights: &LayerWeights,
    i: usize,
    x: &mut Tensor,
    inputs: &[(LaneId, Tensor, Option<Tensor>)],
    lanes: &mut [Lane],
    (rope, watch): (&Rope, &Watch),
) -> Result<()> {
    let mut free: Vec<Option<&mut Lane>> = lanes.iter_mut().map(Some).collect();
    let mut caches = Vec::with_capacity(inputs.len());
    let mut offsets = Vec::with_capacity(inputs.len());
    for (lane, _, _) in inputs {
        let lane = free[*lane].take().expect("lanes are distinct");
        offsets.push(lane.position);
        caches.push(&mut lane.caches[i]);
    }
    *x = model::decoder_layer_lanes(config, weights, x, rope, &mut caches, &offsets, (watch, i))
        .with_context(|| format!("decoder layer {i}"))?;
    Ok(())
}

/// Layer `i` for each lane's chunk in turn (any number of tokens, with its mask); each input
/// becomes the layer's output.
pub(super) fn step_each(
    config: &crate::arch::config::ModelConfig,
    weights: &LayerWeights,
    i: usize,
    inputs: &mut [(LaneId, Tensor, Option<Tensor>)],
    lanes: &mut [Lane],
    (rope, watch): (&Rope, &Watch),
) -> Result<()> {
    for (lane, x, mask) in inputs.iter_mut() {
        let lane = &mut lanes[*lane];
        let at = model::At {
            offset: lane.position,
            mask: mask.as_ref(),
            watch,
            layer: i,
        };
        *x = model::decoder_layer(config, weights, x, rope, &mut lane.caches[i], at)
            .with_context(|| format!("decoder layer {i}"))?;
    }
    Ok(())
}
