//! The diffusion (prediction) head (the original's `VibeVoiceDiffusionHead`): from a noisy
//! latent, its timestep and the language model's hidden state, the v-prediction. adaLN
//! layers modulate a SwiGLU feed-forward by the condition `c = cond_proj(h) + t_emb(t)`.

use super::nn::{apply, fused_around, linear, swiglu, Linear};
use super::weights::Scope;
use crate::arch::speech::{DiffusionHeadConfig, FREQUENCY_EMBEDDING_SIZE};
use crate::engine::model::Around;
use crate::engine::ops::{MATVEC_MAX_ROWS, MATVEC_WIDE_ROWS};
use anyhow::{bail, Result};
use candle_core::{DType, Tensor, D};

/// The sinusoidal embedding of `timesteps` `[B]`: `[B, 256]`, cosines first, then sines
/// (frequencies `exp(-ln(10⁴)·i/128)`), computed in f32 and cast to the timesteps' dtype, as
/// the original's `TimestepEmbedder.timestep_embedding` does.
pub fn timestep_embedding(timesteps: &Tensor) -> Result<Tensor> {
    let half = FREQUENCY_EMBEDDING_SIZE / 2;
    // As PyTorch computes it: f32 arange times the f32-rounded -ln(10⁴), over half, exp.
    let scale = -(10000f64.ln()) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (i as f32 * scale / half as f32).exp())
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
    let args = timesteps
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    Ok(Tensor::cat(&[args.cos()?, args.sin()?], D::Minus1)?.to_dtype(timesteps.dtype())?)
}

/// RMSNorm over the last dimension in one fused kernel (candle's): normalised and weighted in
/// f32, rounded once to the activations' dtype where the original rounds the normalised value
/// before the weight (at most one bf16 ulp apart; identical formula in f32). Where the weights
/// are float8, the fused matrix-vector product does it instead (with the modulation).
fn last_dim_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(candle_nn::ops::rms_norm(x, weight, eps as f32)?)
}

/// `x·scale1 + shift`, where `scale1 = 1 + scale` is formed once per frame
/// ([`PredictionHead::modulations`]) with the original's rounding.
fn modulate(x: &Tensor, shift: &Tensor, scale1: &Tensor) -> Result<Tensor> {
    Ok(((x * scale1)? + shift)?)
}

/// `[shift, scale, ...]` (chunks of `width`) with `scale` replaced by `1 + scale`.
fn plus_one(m: &Tensor, width: usize) -> Result<Tensor> {
    let scale1 = (m.narrow(D::Minus1, width, width)? + 1.0)?;
    let rest = m.dim(D::Minus1)? - 2 * width;
    let mut parts = vec![m.narrow(D::Minus1, 0, width)?, scale1];
    if rest > 0 {
        parts.push(m.narrow(D::Minus1, 2 * width, rest)?);
    }
    Ok(Tensor::cat(&parts, D::Minus1)?)
}

/// One adaLN layer: `x + gate ⊙ ffn(modulate(norm(x), shift, scale))`.
struct HeadLayer {
    norm: Tensor,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
    modulation: Linear,
    name: String,
}

impl HeadLayer {
    fn new(scope: &Scope, hidden: usize, ffn: usize) -> Result<HeadLayer> {
        let f = scope.sub("ffn");
        Ok(HeadLayer {
            norm: scope.get("norm.weight", &[hidden])?,
            gate_proj: linear(&f.sub("gate_proj"), hidden, ffn, false)?,
            up_proj: linear(&f.sub("up_proj"), hidden, ffn, false)?,
            down_proj: linear(&f.sub("down_proj"), ffn, hidden, false)?,
            modulation: linear(&scope.sub("adaLN_modulation.1"), hidden, 3 * hidden, false)?,
            name: scope.name().to_string(),
        })
    }

    /// `m` is this layer's modulation `[B, 3·hidden]` (see [`PredictionHead::modulations`]).
    /// Where the weights are float8, two fused launches: the norm and the modulation inside
    /// the gate and up product, the gate and the residual inside the down product.
    fn forward(&self, x: &Tensor, m: &Tensor, eps: f64) -> Result<Tensor> {
        let n = &self.name;
        let chunks = m.chunk(3, D::Minus1)?;
        let (shift, scale1, gate) = (&chunks[0], &chunks[1], &chunks[2]);
        let adaln = Around {
            norm: Some((&self.norm, eps as f32)),
            modulation: Some((scale1, shift)),
            ..Around::default()
        };
        let gu = match fused_around(x, &[&self.gate_proj, &self.up_proj], true, adaln)? {
            Some(gu) => gu,
            None => {
                let h = modulate(&last_dim_norm(x, &self.norm, eps)?, shift, scale1)?;
                let what = ("ffn.gate_proj", "ffn.up_proj");
                swiglu(&self.gate_proj, &self.up_proj, &h, n, what)?
            }
        };
        let residual = Around {
            gated_residual: Some((x, gate)),
            ..Around::default()
        };
        match fused_around(&gu, &[&self.down_proj], false, residual)? {
            Some(out) => Ok(out),
            None => {
                let f = apply(&self.down_proj, &gu, n, "ffn.down_proj")?;
                Ok((x + (gate * f)?)?)
            }
        }
    }
}

/// The prediction head.
pub struct PredictionHead {
    noisy_images_proj: Linear,
    cond_proj: Linear,
    t_mlp0: Linear,
    t_mlp2: Linear,
    layers: Vec<HeadLayer>,
    final_modulation: Linear,
    final_linear: Linear,
    eps: f64,
    hidden: usize,
    latent: usize,
    /// Ones `[hidden]`: the final norm has no weight, the fused norm takes one.
    unit_weight: Tensor,
    name: String,
}

impl PredictionHead {
    /// The head of `config` at `scope` (`model.prediction_head`).
    pub fn new(config: &DiffusionHeadConfig, scope: &Scope) -> Result<PredictionHead> {
        config.validate()?;
        let (h, l) = (config.hidden_size, config.latent_size);
        let layers = (0..config.head_layers)
            .map(|i| HeadLayer::new(&scope.sub(&format!("layers.{i}")), h, config.ffn_dim))
            .collect::<Result<Vec<_>>>()?;
        // validate() guarantees a layer; its norm weight has the compute dtype and device.
        let unit_weight = layers[0].norm.ones_like()?;
        let t = scope.sub("t_embedder.mlp");
        let fin = scope.sub("final_layer");
        Ok(PredictionHead {
            noisy_images_proj: linear(&scope.sub("noisy_images_proj"), l, h, false)?,
            cond_proj: linear(&scope.sub("cond_proj"), h, h, false)?,
            t_mlp0: linear(&t.sub("0"), FREQUENCY_EMBEDDING_SIZE, h, false)?,
            t_mlp2: linear(&t.sub("2"), h, h, false)?,
            layers,
            final_modulation: linear(&fin.sub("adaLN_modulation.1"), h, 2 * h, false)?,
            final_linear: linear(&fin.sub("linear"), h, l, false)?,
            eps: config.rms_norm_eps,
            hidden: h,
            latent: l,
            unit_weight,
            name: scope.name().to_string(),
        })
    }

    /// The v-prediction for `noisy` `[B, latent]` at `timesteps` `[B]` under `condition`
    /// `[B, hidden]`, all in the compute dtype (the timesteps too: in bf16 the original's
    /// 999 becomes 1000 before the embedding, and so it does here).
    pub fn forward(
        &self,
        noisy: &Tensor,
        timesteps: &Tensor,
        condition: &Tensor,
    ) -> Result<Tensor> {
        let batch = noisy.dim(0)?;
        if noisy.dims() != [batch, self.latent]
            || timesteps.dims() != [batch]
            || condition.dims() != [batch, self.hidden]
        {
            bail!(
                "{}: noisy {:?}, timesteps {:?}, condition {:?}; expected [B, {}], [B], [B, {}]",
                self.name,
                noisy.dims(),
                timesteps.dims(),
                condition.dims(),
                self.latent,
                self.hidden
            );
        }
        let c = (self.project_condition(condition)? + self.timestep_features(timesteps)?)?;
        self.forward_conditioned(noisy, &c)
    }

    /// `cond_proj(condition)`: the part of the head that does not depend on the step, computed
    /// once per frame by the sampler.
    pub fn project_condition(&self, condition: &Tensor) -> Result<Tensor> {
        apply(&self.cond_proj, condition, &self.name, "cond_proj")
    }

    /// `t_embedder(timesteps)`: the part of the head that depends on the step alone, the same
    /// for every frame (the sampler computes it once per step count).
    pub fn timestep_features(&self, timesteps: &Tensor) -> Result<Tensor> {
        let n = &self.name;
        let t = apply(
            &self.t_mlp0,
            &timestep_embedding(timesteps)?,
            n,
            "t_embedder.mlp.0",
        )?;
        apply(&self.t_mlp2, &t.silu()?, n, "t_embedder.mlp.2")
    }

    /// [`PredictionHead::forward`] from the condition `c = cond_proj(condition) +
    /// t_embedder(timesteps)` ([`PredictionHead::project_condition`],
    /// [`PredictionHead::timestep_features`]).
    pub fn forward_conditioned(&self, noisy: &Tensor, c: &Tensor) -> Result<Tensor> {
        self.forward_modulated(noisy, &self.modulations(c)?, 0)
    }

    /// The adaLN modulations under conditions `c` `[R, hidden]`: `[R, 3·hidden]` for each
    /// layer (shift, `1 + scale`, gate), then `[R, 2·hidden]` for the final layer (shift,
    /// `1 + scale`). They depend on the condition alone, so a frame computes those of all its
    /// steps at once, in groups of at most [`MATVEC_MAX_ROWS`] rows on the CPU and
    /// [`MATVEC_WIDE_ROWS`] on the GPU (the fused matrix-vector product's batches, whose rows
    /// come out as they would alone): the weights are read once per group instead of once per
    /// step (a frame's 20 rows: once, where three groups of eight read them three times).
    pub fn modulations(&self, c: &Tensor) -> Result<Vec<Tensor>> {
        let n = &self.name;
        let silu_c = c.silu()?;
        let rows = c.dim(0)?;
        let linears: Vec<(&Linear, &str)> = self
            .layers
            .iter()
            .map(|l| (&l.modulation, "adaLN_modulation.1"))
            .chain([(&self.final_modulation, "final_layer.adaLN_modulation.1")])
            .collect();
        let mut parts: Vec<Vec<Tensor>> = vec![Vec::new(); linears.len()];
        let per_group = match c.device().is_cuda() {
            true => MATVEC_WIDE_ROWS,
            false => MATVEC_MAX_ROWS,
        };
        for start in (0..rows).step_by(per_group) {
            let group = silu_c.narrow(0, start, per_group.min(rows - start))?;
            for ((linear, what), out) in linears.iter().zip(&mut parts) {
                out.push(apply(linear, &group, n, what)?);
            }
        }
        parts
            .iter()
            .map(|p| plus_one(&Tensor::cat(p, 0)?, self.hidden))
            .collect::<Result<Vec<_>>>()
    }

    /// [`PredictionHead::forward_conditioned`] with the modulations made beforehand
    /// ([`PredictionHead::modulations`]): those of rows `row..row + B` of each for `noisy`
    /// `[B, latent]`.
    pub fn forward_modulated(
        &self,
        noisy: &Tensor,
        modulations: &[Tensor],
        row: usize,
    ) -> Result<Tensor> {
        let n = &self.name;
        if modulations.len() != self.layers.len() + 1 {
            bail!(
                "{n}: {} modulations for {} layers and the final one",
                modulations.len(),
                self.layers.len()
            );
        }
        let batch = noisy.dim(0)?;
        let rows = |m: &Tensor| m.narrow(0, row, batch);
        let mut x = apply(&self.noisy_images_proj, noisy, n, "noisy_images_proj")?;
        for (layer, m) in self.layers.iter().zip(modulations) {
            x = layer.forward(&x, &rows(m)?, self.eps)?;
        }
        let chunks = rows(&modulations[self.layers.len()])?.chunk(2, D::Minus1)?;
        let adaln = Around {
            norm: Some((&self.unit_weight, self.eps as f32)),
            modulation: Some((&chunks[1], &chunks[0])),
            ..Around::default()
        };
        if let Some(out) = fused_around(&x, &[&self.final_linear], false, adaln)? {
            return Ok(out);
        }
        let normed = last_dim_norm(&x, &self.unit_weight, self.eps)?;
        let h = modulate(&normed, &chunks[0], &chunks[1])?;
        apply(&self.final_linear, &h, n, "final_layer.linear")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn timestep_embedding_puts_cosines_first() {
        let t = Tensor::new(&[0f32, 3.0], &Device::Cpu).unwrap();
        let e = timestep_embedding(&t).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(e[0].len(), 256);
        // t = 0: cos 1 for the first half, sin 0 for the second.
        assert!(e[0][..128].iter().all(|&v| v == 1.0));
        assert!(e[0][128..].iter().all(|&v| v == 0.0));
        // Frequency 0 is 1: cos(3) then, 128 entries on, sin(3).
        assert!((e[1][0] - 3f32.cos()).abs() < 1e-6);
        assert!((e[1][128] - 3f32.sin()).abs() < 1e-6);
        // The last frequency is exp(-ln(10⁴)·127/128).
        let f = (-(10000f64.ln()) * 127.0 / 128.0).exp();
        assert!((e[1][127] as f64 - (3.0 * f).cos()).abs() < 1e-6);
    }

    #[test]
    fn timestep_embedding_keeps_the_timesteps_dtype() {
        let t = Tensor::new(&[999f32], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        // 999 rounds to 1000 in bf16, as in the original's bf16 runs.
        let t_value = t.to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()[0];
        assert_eq!(t_value, 1000.0);
        let e = timestep_embedding(&t).unwrap();
        assert_eq!(e.dtype(), DType::BF16);
    }
}
