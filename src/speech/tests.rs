//! The speech components on small configurations with seeded random weights: streaming
//! equals whole-signal, the encoder is causal, loading errors name the tensor. Parity with
//! the original is `tests/speech.rs`'s business.

use super::*;
use crate::arch::speech::{ConvStack, DiffusionHeadConfig, TokenizerConfig};
use crate::rng::Rng;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// Hop 6, three stages, both kinds of stride.
fn small_tokenizer() -> TokenizerConfig {
    TokenizerConfig {
        vae_dim: 5,
        channels: 1,
        encoder: ConvStack {
            n_filters: 4,
            ratios: vec![2, 3],
            depths: vec![1, 2, 1],
        },
        decoder: Some(ConvStack {
            n_filters: 4,
            ratios: vec![3, 2],
            depths: vec![1, 2, 1],
        }),
        layernorm_eps: 1e-5,
        fix_std: 0.5,
    }
}

fn random_tensor(seed: u64, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(Rng::new(seed).uniforms(n), shape, &Device::Cpu).unwrap()
}

/// max |a - b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap()
}

#[test]
fn streaming_decode_equals_whole_signal_decode() {
    let weights = RandomWeights::new(1, DType::F32, &Device::Cpu);
    let config = small_tokenizer();
    let decoder = Decoder::new(&config, &Scope::new(&weights, "dec")).unwrap();
    let latents = random_tensor(2, &[1, 7, 5]);
    let whole = decoder.decode(&latents).unwrap();
    assert_eq!(whole.dims(), &[1, 1, 7 * 6]);
    let mut state = decoder.stream_state();
    // Frame by frame, then in chunks of 2, 1 and 4 frames after a reset.
    for chunks in [vec![1; 7], vec![2, 1, 4]] {
        state.reset();
        let mut outs = Vec::new();
        let mut at = 0;
        for n in chunks {
            outs.push(
                decoder
                    .decode_chunk(&latents.narrow(1, at, n).unwrap(), &mut state)
                    .unwrap(),
            );
            at += n;
        }
        let streamed = Tensor::cat(&outs, 2).unwrap();
        let err = rel_err(&streamed, &whole);
        assert!(err < 1e-6, "streamed decode differs: rel err {err}");
    }
}

#[test]
fn streaming_encode_equals_whole_signal_encode() {
    let weights = RandomWeights::new(3, DType::F32, &Device::Cpu);
    let config = small_tokenizer();
    let encoder = Encoder::new(&config, &Scope::new(&weights, "enc")).unwrap();
    let audio = random_tensor(4, &[1, 1, 6 * 5]);
    let whole = encoder.encode(&audio).unwrap();
    assert_eq!(whole.dims(), &[1, 5, 5]);
    let mut state = encoder.stream_state();
    let frames: Vec<Tensor> = (0..5)
        .map(|i| {
            let chunk = audio.narrow(2, 6 * i, 6).unwrap();
            encoder.encode_chunk(&chunk, &mut state).unwrap()
        })
        .collect();
    let err = rel_err(&Tensor::cat(&frames, 1).unwrap(), &whole);
    assert!(err < 1e-6, "streamed encode differs: rel err {err}");
    // A chunk that is not a whole number of frames is refused.
    let err = encoder
        .encode_chunk(&audio.narrow(2, 0, 7).unwrap(), &mut state)
        .unwrap_err();
    assert!(err.to_string().contains("multiple of the hop 6"), "{err}");
}

#[test]
fn encoding_in_pieces_equals_whole_signal_encode() {
    let weights = RandomWeights::new(7, DType::F32, &Device::Cpu);
    let encoder = Encoder::new(&small_tokenizer(), &Scope::new(&weights, "enc")).unwrap();
    // Whole frames, a partial last frame, and a signal shorter than one piece.
    for (len, frames) in [(6 * 6, 2), (6 * 7 + 4, 2), (6 * 7 + 1, 3), (11, 4)] {
        let audio = random_tensor(8 + len as u64, &[2, 1, len]);
        let whole = encoder.encode(&audio).unwrap();
        let pieces = encoder.encode_in_pieces(&audio, frames).unwrap();
        let err = rel_err(&pieces, &whole);
        assert!(
            err < 1e-6,
            "{len} samples in {frames}-frame pieces: rel err {err}"
        );
    }
}

#[test]
fn the_encoder_is_causal_and_pads_partial_frames() {
    let weights = RandomWeights::new(5, DType::F32, &Device::Cpu);
    let encoder = Encoder::new(&small_tokenizer(), &Scope::new(&weights, "enc")).unwrap();
    let audio = random_tensor(6, &[2, 1, 6 * 4 + 1]);
    let full = encoder.encode(&audio).unwrap();
    // ceil(25 / 6) frames; the first four depend only on the first 24 samples.
    assert_eq!(full.dims(), &[2, 5, 5]);
    let prefix = encoder.encode(&audio.narrow(2, 0, 24).unwrap()).unwrap();
    let err = rel_err(&full.narrow(1, 0, 4).unwrap(), &prefix);
    assert!(err < 1e-6, "rel err {err}");
}

#[test]
fn a_state_made_for_another_module_is_refused() {
    let weights = RandomWeights::new(1, DType::F32, &Device::Cpu);
    let config = small_tokenizer();
    let encoder = Encoder::new(&config, &Scope::new(&weights, "enc")).unwrap();
    let decoder = Decoder::new(&config, &Scope::new(&weights, "dec")).unwrap();
    let mut state = encoder.stream_state();
    let latents = random_tensor(2, &[1, 1, 5]);
    let err = decoder.decode_chunk(&latents, &mut state).unwrap_err();
    assert!(err.to_string().contains("another module"), "{err}");
}

#[test]
fn loading_errors_name_the_tensor() {
    let config = small_tokenizer();
    let empty = SafetensorsWeights::from_tensors(HashMap::new(), DType::F32);
    let err = Encoder::new(
        &config,
        &Scope::new(&empty, "model.acoustic_tokenizer.encoder"),
    )
    .err()
    .unwrap()
    .to_string();
    let stem = "model.acoustic_tokenizer.encoder.downsample_layers.0.0.conv.conv.weight";
    assert!(err.contains(stem), "{err}");
    let mut tensors = HashMap::new();
    tensors.insert(stem.to_string(), random_tensor(1, &[4, 1, 5]));
    let wrong = SafetensorsWeights::from_tensors(tensors, DType::F32);
    let err = Encoder::new(
        &config,
        &Scope::new(&wrong, "model.acoustic_tokenizer.encoder"),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains(stem) && err.contains("[4, 1, 7]"), "{err}");
}

fn small_head() -> DiffusionHeadConfig {
    DiffusionHeadConfig {
        hidden_size: 16,
        head_layers: 2,
        ffn_dim: 48,
        rms_norm_eps: 1e-5,
        latent_size: 5,
        ddpm_num_steps: 1000,
        ddpm_num_inference_steps: 20,
    }
}

#[test]
fn guidance_zero_ignores_the_positive_condition() {
    let weights = RandomWeights::new(9, DType::F32, &Device::Cpu);
    let head = PredictionHead::new(&small_head(), &Scope::new(&weights, "head")).unwrap();
    let solver = DpmSolver::new(1000, 5).unwrap();
    let noise = random_tensor(1, &[1, 5]);
    let negative = random_tensor(2, &[1, 16]);
    let a = sample_latent(
        &head,
        &solver,
        &noise,
        &random_tensor(3, &[1, 16]),
        &negative,
        0.0,
    );
    let b = sample_latent(
        &head,
        &solver,
        &noise,
        &random_tensor(4, &[1, 16]),
        &negative,
        0.0,
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    let c = sample_latent(
        &head,
        &solver,
        &noise,
        &random_tensor(3, &[1, 16]),
        &negative,
        1.3,
    );
    let c = c.unwrap().to_vec2::<f32>().unwrap();
    assert_ne!(a.to_vec2::<f32>().unwrap(), c);
    assert!(c[0].iter().all(|v| v.is_finite()));
}

#[test]
fn head_and_connector_check_their_inputs() {
    let weights = RandomWeights::new(9, DType::F32, &Device::Cpu);
    let head = PredictionHead::new(&small_head(), &Scope::new(&weights, "head")).unwrap();
    let t = Tensor::new(&[999f32, 999.0], &Device::Cpu).unwrap();
    let out = head
        .forward(&random_tensor(1, &[2, 5]), &t, &random_tensor(2, &[2, 16]))
        .unwrap();
    assert_eq!(out.dims(), &[2, 5]);
    let err = head
        .forward(&random_tensor(1, &[2, 5]), &t, &random_tensor(2, &[2, 15]))
        .unwrap_err();
    assert!(err.to_string().contains("head: noisy"), "{err}");
    let connector = Connector::new(&Scope::new(&weights, "conn"), 5, 16).unwrap();
    let out = connector.forward(&random_tensor(3, &[1, 3, 5])).unwrap();
    assert_eq!(out.dims(), &[1, 3, 16]);
}

#[test]
fn gaussian_sample_scales_the_noise_per_batch_row() {
    let mean = Tensor::zeros((2, 1, 2), DType::F32, &Device::Cpu).unwrap();
    let draws = Tensor::new(&[0.8f32, -1.6], &Device::Cpu).unwrap();
    let noise = Tensor::ones((2, 1, 2), DType::F32, &Device::Cpu).unwrap();
    let x = gaussian_sample(&mean, 0.5, &draws, &noise).unwrap();
    // std = draw · 0.5 / 0.8.
    assert_eq!(
        x.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        vec![0.5, 0.5, -1.0, -1.0]
    );
}

/// bf16 (the CUDA dtype) through every component: no dtype mismatches, results near f32.
#[test]
fn bf16_runs_every_component_close_to_f32() {
    let w32 = RandomWeights::new(11, DType::F32, &Device::Cpu);
    let w16 = RandomWeights::new(11, DType::BF16, &Device::Cpu);
    let bf16 = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
    let config = small_tokenizer();
    let latents = random_tensor(2, &[1, 3, 5]);
    let audio = random_tensor(3, &[1, 1, 18]);
    let d32 = Decoder::new(&config, &Scope::new(&w32, "dec")).unwrap();
    let d16 = Decoder::new(&config, &Scope::new(&w16, "dec")).unwrap();
    let mut state = d16.stream_state();
    let streamed = d16.decode_chunk(&bf16(&latents), &mut state).unwrap();
    assert_eq!(streamed.dtype(), DType::BF16);
    assert!(
        rel_err(
            &streamed.to_dtype(DType::F32).unwrap(),
            &d32.decode(&latents).unwrap()
        ) < 5e-2
    );
    let e32 = Encoder::new(&config, &Scope::new(&w32, "enc")).unwrap();
    let e16 = Encoder::new(&config, &Scope::new(&w16, "enc")).unwrap();
    let mean = e16
        .encode(&bf16(&audio))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    assert!(rel_err(&mean, &e32.encode(&audio).unwrap()) < 5e-2);
    let h32 = PredictionHead::new(&small_head(), &Scope::new(&w32, "head")).unwrap();
    let h16 = PredictionHead::new(&small_head(), &Scope::new(&w16, "head")).unwrap();
    let solver = DpmSolver::new(1000, 5).unwrap();
    let (noise, pos, neg) = (
        random_tensor(1, &[1, 5]),
        random_tensor(2, &[1, 16]),
        random_tensor(3, &[1, 16]),
    );
    let x32 = sample_latent(&h32, &solver, &noise, &pos, &neg, 1.3).unwrap();
    let x16 = sample_latent(&h16, &solver, &bf16(&noise), &bf16(&pos), &bf16(&neg), 1.3).unwrap();
    assert_eq!(x16.dtype(), DType::BF16);
    // Loose: in bf16 the head sees 1000, 800, 600, ... for 999, 799, 599, ... (as in the
    // original), so the sample moves by several percent, not by rounding alone.
    assert!(rel_err(&x16.to_dtype(DType::F32).unwrap(), &x32) < 2e-1);
}

/// Random weights whose matrices and kernels are float8 as stored (codes of magnitude below 2,
/// no scale), as a plain float8 checkpoint's; `tensor` hands out the same values decoded.
struct Float8Random {
    vectors: RandomWeights,
    float8: bool,
}

impl Float8Random {
    fn codes(name: &str, shape: &[usize]) -> crate::engine::dequant::RawTensor {
        let n: usize = shape.iter().product();
        let codes: Vec<u8> = Rng::for_name(9, name)
            .uniforms(n)
            .iter()
            .map(|u| {
                let r = ((u + 1.0) * 127.5) as u8;
                (r & 0x80) | (r & 0x3f)
            })
            .collect();
        crate::engine::dequant::RawTensor {
            dtype: crate::dtype::DType::F8E4M3,
            shape: shape.to_vec(),
            bytes: Tensor::from_vec(codes, n, &Device::Cpu).unwrap(),
        }
    }
}

impl WeightSource for Float8Random {
    fn tensor(&self, name: &str, shape: &[usize]) -> anyhow::Result<Tensor> {
        match shape.len() {
            1 => self.vectors.tensor(name, shape),
            _ => Ok(crate::engine::dequant::dequantize(
                &Self::codes(name, shape),
                None,
                DType::F32,
            )?
            .reshape(shape)?),
        }
    }

    fn stored_float8(
        &self,
        name: &str,
        shape: &[usize],
    ) -> anyhow::Result<Option<super::weights::StoredWeight>> {
        Ok(
            (self.float8 && shape.len() > 1).then(|| super::weights::StoredWeight {
                raw: Self::codes(name, shape),
                scale: None,
            }),
        )
    }
}

#[test]
fn a_large_float8_transposed_convolution_equals_its_decoded_weight() {
    use super::conv::CausalConvTranspose1d;
    // 1024 x 64 x 16 = 2^20 elements: held transposed as a [1024, 1024] matrix.
    let load = |float8| {
        let source = Float8Random {
            vectors: RandomWeights::new(2, DType::F32, &Device::Cpu),
            float8,
        };
        CausalConvTranspose1d::new(&Scope::new(&source, "up"), 1024, 64, 16, 8).unwrap()
    };
    let (stored, decoded) = (load(true), load(false));
    // One step takes the matrix-vector product; three steps decode the matrix back.
    for steps in [1, 3] {
        let x = random_tensor(steps as u64, &[1, 1024, steps]);
        let want = decoded.run(&x, None).unwrap();
        let got = stored.run(&x, None).unwrap();
        let err = rel_err(&got, &want);
        assert!(err < 1e-5, "{steps} steps: rel err {err}");
        let (mut a, mut b) = (None, None);
        let got = stored.run(&x, Some(&mut a)).unwrap();
        let want = decoded.run(&x, Some(&mut b)).unwrap();
        assert!(rel_err(&got, &want) < 1e-5 && rel_err(&a.unwrap(), &b.unwrap()) < 1e-5);
    }
}
