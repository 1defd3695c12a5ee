//! The diffusion sampler: the original's `DPMSolverMultistepScheduler` as VibeVoice sets it
//! up (DPM-Solver++, order 2, midpoint, v-prediction, cosine betas over the training steps,
//! linspace timesteps, `lower_order_final`, final sigma zero), and the classifier-free
//! guided loop of `sample_speech_tokens`.
//!
//! The schedule is built as the original builds it, rounding where it rounds: betas in f64,
//! stored f32; `alphas_cumprod` accumulated in f64 (PyTorch's CPU `cumprod` does) and stored
//! f32; sigmas and every step coefficient in f32.

use super::head::PredictionHead;
use crate::engine::ops::DpmStep;
use crate::engine::replay::Replay;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

/// The original's `betas_for_alpha_bar` clip.
const MAX_BETA: f64 = 0.999;

/// A DPM-Solver++ schedule for a number of inference steps.
#[derive(Clone, Debug)]
pub struct DpmSolver {
    timesteps: Vec<i64>,
    /// `steps + 1` sigmas, the last 0.
    sigmas: Vec<f32>,
}

/// The cosine schedule's ᾱ(t) (`alpha_bar_fn`).
fn alpha_bar(t: f64) -> f64 {
    ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
        .cos()
        .powi(2)
}

/// `1/sqrt(σ² + 1)` and `σ·α` (`_sigma_to_alpha_sigma_t`), in f32.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// `ln α − ln σ_t`, in f32 (+∞ at σ = 0).
fn lambda(alpha: f32, sigma_t: f32) -> f32 {
    alpha.ln() - sigma_t.ln()
}

impl DpmSolver {
    /// The schedule for `inference_steps` over `train_steps` training timesteps (1000).
    pub fn new(train_steps: usize, inference_steps: usize) -> Result<DpmSolver> {
        if train_steps < 2 || inference_steps == 0 || inference_steps > train_steps {
            bail!(
                "diffusion sampler: {inference_steps} steps over {train_steps} training timesteps; \
                 steps must be between 1 and the training timesteps"
            );
        }
        let n = train_steps as f64;
        let mut cumprod = 1f64;
        let alphas_cumprod: Vec<f32> = (0..train_steps)
            .map(|i| {
                let beta = (1.0 - alpha_bar((i + 1) as f64 / n) / alpha_bar(i as f64 / n))
                    .min(MAX_BETA) as f32;
                cumprod *= (1.0 - beta) as f64;
                cumprod as f32
            })
            .collect();
        // np.linspace(0, train_steps - 1, steps + 1): i·step, the end exact; then rounded
        // half to even, reversed, and the final 0 dropped.
        let end = (train_steps - 1) as f64;
        let step = end / inference_steps as f64;
        let timesteps: Vec<i64> = (1..=inference_steps)
            .rev()
            .map(|i| {
                let v = if i == inference_steps {
                    end
                } else {
                    i as f64 * step
                };
                v.round_ties_even() as i64
            })
            .collect();
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| {
                let a = alphas_cumprod[t as usize];
                ((1.0 - a) / a).sqrt()
            })
            .collect();
        sigmas.push(0.0);
        Ok(DpmSolver { timesteps, sigmas })
    }

    /// The timesteps the head sees, from high noise down.
    pub fn timesteps(&self) -> &[i64] {
        &self.timesteps
    }

    /// The sigma before each step and the final 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// A run of the solver from its first step.
    pub fn start(&self) -> SolverRun<'_> {
        SolverRun {
            solver: self,
            index: 0,
            previous_x0: None,
        }
    }
}

/// One pass through a [`DpmSolver`]'s steps: the step index and the previous step's data
/// prediction, which the second-order steps use.
pub struct SolverRun<'a> {
    solver: &'a DpmSolver,
    index: usize,
    previous_x0: Option<Tensor>,
}

impl SolverRun<'_> {
    /// The timestep of the next step, `None` once every step is done.
    pub fn timestep(&self) -> Option<i64> {
        self.solver.timesteps.get(self.index).copied()
    }

    /// The next step's coefficients (see [`DpmStep`]); the guidance scale is left at 1.
    fn coefficients(&self) -> Result<DpmStep> {
        let i = self.index;
        let sigmas = &self.solver.sigmas;
        let steps = self.solver.timesteps.len();
        if i >= steps {
            bail!("diffusion sampler: all {steps} steps are done");
        }
        let (alpha, sigma) = alpha_sigma(sigmas[i]);
        let (alpha_t, sigma_t) = alpha_sigma(sigmas[i + 1]);
        let lambda_s = lambda(alpha, sigma);
        let h = lambda(alpha_t, sigma_t) - lambda_s;
        let b = alpha_t * ((-h).exp() - 1.0);
        // Order 1 at the first step and at the last (final sigma zero); else order 2.
        let second = (self.previous_x0.is_some() && i + 1 < steps).then(|| {
            let (alpha_p, sigma_p) = alpha_sigma(sigmas[i - 1]);
            let r0 = (lambda_s - lambda(alpha_p, sigma_p)) / h;
            (1.0 / r0, 0.5 * b)
        });
        Ok(DpmStep {
            cfg: 1.0,
            alpha,
            sigma,
            a: sigma_t / sigma,
            b,
            second,
        })
    }

    /// One step: from the model's v-prediction `v` at `sample`, the next sample, in `v`'s
    /// dtype. The update runs in f32; as in the original, the data prediction is kept in the
    /// model's dtype and the result cast back to it.
    pub fn step(&mut self, v: &Tensor, sample: &Tensor) -> Result<Tensor> {
        let c = self.coefficients()?;
        let dtype = v.dtype();
        let sample = sample.to_dtype(DType::F32)?;
        let v32 = v.to_dtype(DType::F32)?;
        // x0 = α_s·x − σ_s·v, stored in the model's dtype.
        let x0 = (sample.affine(c.alpha as f64, 0.0)? - v32.affine(c.sigma as f64, 0.0)?)?
            .to_dtype(dtype)?;
        let x0_32 = x0.to_dtype(DType::F32)?;
        let first = (sample.affine(c.a as f64, 0.0)? - x0_32.affine(c.b as f64, 0.0)?)?;
        let next = match (&self.previous_x0, c.second) {
            (Some(previous), Some((r_inv, half_b))) => {
                let d1 = (&x0_32 - previous.to_dtype(DType::F32)?)?.affine(r_inv as f64, 0.0)?;
                (first - d1.affine(half_b as f64, 0.0)?)?
            }
            _ => first,
        };
        self.previous_x0 = Some(x0);
        self.index += 1;
        Ok(next.to_dtype(dtype)?)
    }

    /// [`SolverRun::step`] on the guided `v_u + cfg·(v_c − v_u)` of the head's `v` `[2B, L]`
    /// (conditional rows, then unconditional), in one op ([`DpmStep`]; the guidance rounded to
    /// `v`'s dtype after each operation, the scale in f32). `sample` is `[B, L]`.
    pub fn guided_step(&mut self, v: &Tensor, sample: &Tensor, cfg_scale: f64) -> Result<Tensor> {
        let op = DpmStep {
            cfg: cfg_scale as f32,
            ..self.coefficients()?
        };
        let sample = sample.contiguous()?;
        let prev = match &self.previous_x0 {
            Some(p) => p.contiguous()?,
            None => sample.clone(),
        };
        let out = v.contiguous()?.apply_op3_no_bwd(&sample, &prev, &op)?;
        self.previous_x0 = Some(out.get(1)?);
        self.index += 1;
        Ok(out.get(0)?)
    }
}

/// The timestep features of every step of `solver` for a batch of `rows` (`[rows, hidden]`
/// each, in `dtype`): they do not depend on the frame, so a generation computes them once.
pub fn step_features(
    head: &PredictionHead,
    solver: &DpmSolver,
    rows: usize,
    dtype: DType,
    device: &Device,
) -> Result<Vec<Tensor>> {
    solver
        .timesteps()
        .iter()
        .map(|&t| {
            let timesteps = Tensor::full(t as f32, rows, device)?.to_dtype(dtype)?;
            head.timestep_features(&timesteps)
        })
        .collect()
}

/// Samples one latent with classifier-free guidance, as the original's
/// `sample_speech_tokens`: from `noise` `[B, latent]` (the caller's standard normal draw;
/// the original uses row 0 of a 2-row draw), each step runs the head once on the batch
/// `[x, x]` under `[positive, negative]` (`[B, hidden]` each) and steps on
/// `v = v_u + cfg·(v_c − v_u)`. Returns the final sample `[B, latent]` in the noise's dtype.
pub fn sample_latent(
    head: &PredictionHead,
    solver: &DpmSolver,
    noise: &Tensor,
    positive: &Tensor,
    negative: &Tensor,
    cfg_scale: f64,
) -> Result<Tensor> {
    let features = step_features(
        head,
        solver,
        2 * noise.dim(0)?,
        noise.dtype(),
        noise.device(),
    )?;
    sample_latent_with(
        head, solver, &features, noise, positive, negative, cfg_scale,
    )
}

/// [`sample_latent`] with the steps' timestep features computed beforehand
/// ([`step_features`] for `2·B` rows).
pub fn sample_latent_with(
    head: &PredictionHead,
    solver: &DpmSolver,
    features: &[Tensor],
    noise: &Tensor,
    positive: &Tensor,
    negative: &Tensor,
    cfg_scale: f64,
) -> Result<Tensor> {
    if features.len() != solver.timesteps().len() {
        bail!(
            "{} timestep features for {} steps",
            features.len(),
            solver.timesteps().len()
        );
    }
    let condition = Tensor::cat(&[positive, negative], 0).context("stacking the conditions")?;
    // cond_proj does not depend on the step: once per frame, not once per step.
    let projected = head.project_condition(&condition)?;
    // Every step's condition is known now: the modulations of all steps at once.
    let conditions = features
        .iter()
        .map(|f| Ok((&projected + f)?))
        .collect::<Result<Vec<_>>>()?;
    let modulations = head.modulations(&Tensor::cat(&conditions, 0)?)?;
    let rows = condition.dim(0)?;
    let mut x = noise.clone();
    let mut run = solver.start();
    let mut step = 0;
    while run.timestep().is_some() {
        let combined = Tensor::cat(&[&x, &x], 0)?;
        let v = head.forward_modulated(&combined, &modulations, step * rows)?;
        x = run.guided_step(&v, &x, cfg_scale)?;
        step += 1;
    }
    Ok(x)
}

/// [`sample_latent_with`] frame after frame for a batch of one: the steps' timestep features
/// computed once, and with graphs on, a frame's whole sampling (every step's head pass and
/// solver update) captured as one CUDA graph at the first frame and replayed after, where
/// the device allows it. The results are the same bits either way.
pub struct FrameSampler<'a> {
    head: &'a PredictionHead,
    solver: &'a DpmSolver,
    features: Vec<Tensor>,
    cfg_scale: f64,
    graphs: bool,
    replay: Option<Replay>,
    replayed: usize,
}

impl<'a> FrameSampler<'a> {
    /// A sampler whose frames run in `dtype` on `device`.
    pub fn new(
        head: &'a PredictionHead,
        solver: &'a DpmSolver,
        cfg_scale: f64,
        graphs: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<FrameSampler<'a>> {
        Ok(FrameSampler {
            head,
            solver,
            features: step_features(head, solver, 2, dtype, device)?,
            cfg_scale,
            graphs,
            replay: None,
            replayed: 0,
        })
    }

    /// Frames sampled by the CUDA graph so far.
    pub fn replayed(&self) -> usize {
        self.replayed
    }

    /// The latent `[1, latent]` of one frame from `noise` `[1, latent]` under `positive` and
    /// `negative` `[1, hidden]` (see [`sample_latent`]).
    pub fn sample(
        &mut self,
        noise: &Tensor,
        positive: &Tensor,
        negative: &Tensor,
    ) -> Result<Tensor> {
        let fed = [noise, positive, negative];
        if let Some(replay) = self.replay.as_ref().filter(|r| r.fits(&fed)) {
            self.replayed += 1;
            return Ok(replay.run(&fed)?.remove(0));
        }
        let (head, solver, features, cfg) =
            (self.head, self.solver, &self.features, self.cfg_scale);
        let direct = |x: &[Tensor]| -> Result<Vec<Tensor>> {
            Ok(vec![sample_latent_with(
                head, solver, features, &x[0], &x[1], &x[2], cfg,
            )?])
        };
        if self.graphs && self.replay.is_none() {
            match Replay::capture(&fed, fed.len(), direct)
                .context("capturing a frame of the diffusion head as a CUDA graph")?
            {
                Some((replay, mut out)) => {
                    self.replay = Some(replay);
                    self.replayed += 1;
                    return Ok(out.remove(0));
                }
                None => self.graphs = false,
            }
        }
        Ok(direct(&[noise.clone(), positive.clone(), negative.clone()])?.remove(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec's table (§4.1), six significant figures.
    #[test]
    fn timesteps_and_sigmas_match_the_reference_table() {
        let table: [(usize, &[i64], &[f32]); 3] = [
            (
                5,
                &[999, 799, 599, 400, 200],
                &[20291.3, 3.10373, 1.39075, 0.740281, 0.337461, 0.0],
            ),
            (
                10,
                &[999, 899, 799, 699, 599, 500, 400, 300, 200, 100],
                &[
                    20291.3, 6.36459, 3.10373, 1.9807, 1.39075, 1.01555, 0.740281, 0.52236,
                    0.337461, 0.171044, 0.0,
                ],
            ),
            (
                20,
                &[
                    999, 949, 899, 849, 799, 749, 699, 649, 599, 549, 500, 450, 400, 350, 300, 250,
                    200, 150, 100, 50,
                ],
                &[
                    20291.3, 12.8073, 6.36459, 4.19954, 3.10373, 2.43544, 1.9807, 1.64777, 1.39075,
                    1.18408, 1.01555, 0.868583, 0.740281, 0.625997, 0.52236, 0.426837, 0.337461,
                    0.252646, 0.171044, 0.0913476, 0.0,
                ],
            ),
        ];
        for (n, timesteps, sigmas) in table {
            let s = DpmSolver::new(1000, n).unwrap();
            assert_eq!(s.timesteps(), timesteps, "N = {n}");
            assert_eq!(s.sigmas().len(), n + 1);
            for (got, want) in s.sigmas().iter().zip(sigmas) {
                let err = (got - want).abs() / want.abs().max(1e-30);
                assert!(
                    *want == 0.0 && *got == 0.0 || err < 6e-6,
                    "N = {n}: {got} vs {want}"
                );
            }
        }
    }

    /// Ten guided steps in one op each give the bits of the unfused guidance and step: in f32
    /// at any scale, in bf16 at scale 1 (at other scales the unfused path rounds the scale
    /// itself to bf16; the op keeps it in f32, as the original does).
    #[test]
    fn the_guided_step_op_equals_the_unfused_guidance_and_step() {
        let dev = candle_core::Device::Cpu;
        let solver = DpmSolver::new(1000, 10).unwrap();
        let mut rng = crate::rng::Rng::new(5);
        for (dtype, cfg) in [(DType::F32, 1.3), (DType::BF16, 1.0)] {
            let mut draw = |rows: usize| {
                Tensor::from_vec(rng.normals(rows * 16), (rows, 16), &dev)
                    .and_then(|t| t.to_dtype(dtype))
                    .unwrap()
            };
            let (mut fused, mut unfused) = (solver.start(), solver.start());
            let mut a = draw(1);
            let mut b = a.clone();
            while fused.timestep().is_some() {
                let v = draw(2);
                let (v_c, v_u) = (v.narrow(0, 0, 1).unwrap(), v.narrow(0, 1, 1).unwrap());
                let guided = (&v_u + ((&v_c - &v_u).unwrap() * cfg).unwrap()).unwrap();
                a = fused.guided_step(&v, &a, cfg).unwrap();
                b = unfused.step(&guided, &b).unwrap();
                let bits = |t: &Tensor| -> Vec<u32> {
                    let t = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
                    t.to_vec1::<f32>()
                        .unwrap()
                        .iter()
                        .map(|v| v.to_bits())
                        .collect()
                };
                assert_eq!(bits(&a), bits(&b), "{dtype:?} cfg {cfg}");
            }
        }
    }

    #[test]
    fn refuses_impossible_step_counts() {
        assert!(DpmSolver::new(1000, 0).is_err());
        assert!(DpmSolver::new(1000, 1001).is_err());
        assert_eq!(DpmSolver::new(1000, 1).unwrap().timesteps(), &[999]);
    }

    #[test]
    fn last_step_returns_the_data_prediction() {
        // One step: order 1 with final sigma 0 gives x0 = α_s·x − σ_s·v exactly.
        let s = DpmSolver::new(1000, 1).unwrap();
        let dev = candle_core::Device::Cpu;
        let x = Tensor::new(&[[0.5f32, -1.0]], &dev).unwrap();
        let v = Tensor::new(&[[2.0f32, 0.25]], &dev).unwrap();
        let mut run = s.start();
        let out = run.step(&v, &x).unwrap().to_vec2::<f32>().unwrap();
        let (a, sg) = alpha_sigma(s.sigmas()[0]);
        assert_eq!(out[0], vec![a * 0.5 - sg * 2.0, -a - sg * 0.25]);
        assert!(run.timestep().is_none() && run.step(&v, &x).is_err());
    }
}
