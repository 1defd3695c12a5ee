//! GPU checks (built with `--features cuda`, run on a machine with an NVIDIA GPU): the CUDA
//! dequantisation kernel against the CPU decoder, and streamed against resident layers on the
//! GPU, bit for bit.
#![cfg(feature = "cuda")]

mod common;

use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};
use vibeoffload::arch::config::ModelConfig;
use vibeoffload::arch::speech::SpeechConfig;
use vibeoffload::checkpoint::layout::{Precision, ScaleConvention, ScaleGranularity};
use vibeoffload::checkpoint::synth::{self, SynthSpec};
use vibeoffload::checkpoint::ModelInfo;
use vibeoffload::dtype::DType as Stored;
use vibeoffload::engine::dequant::{dequantize, RawTensor};
use vibeoffload::engine::{DeviceChoice, Engine, EngineOptions};
use vibeoffload::plan::Placement;

fn cuda() -> Device {
    Device::new_cuda(0).expect("a CUDA GPU")
}

fn raw(dtype: Stored, shape: &[usize], bytes: &[u8], device: &Device) -> RawTensor {
    RawTensor {
        dtype,
        shape: shape.to_vec(),
        bytes: Tensor::from_slice(bytes, bytes.len(), device).unwrap(),
    }
}

/// A tensor's values as f32 on the host.
fn host_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    host_f32(t)
        .iter()
        .map(|x| if x.is_nan() { 0x7fc0_0000 } else { x.to_bits() })
        .collect()
}

#[test]
fn cuda_dequantisation_matches_the_cpu_for_every_code_and_scale() {
    let gpu = cuda();
    let codes: Vec<u8> = (0..=255).collect();
    let f32s = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let scales: [(Vec<usize>, Vec<f32>); 4] = [
        (vec![], vec![]),
        (vec![], vec![0.37]),
        (vec![16, 1], (0..16).map(|i| 0.5 + i as f32 * 0.1).collect()),
        (
            vec![16, 4, 1],
            (0..64).map(|i| 0.25 + i as f32 * 0.01).collect(),
        ),
    ];
    for out in [DType::F32, DType::BF16] {
        for (shape, values) in &scales {
            let decode = |device: &Device| {
                let w = raw(Stored::F8E4M3, &[16, 16], &codes, device);
                let s =
                    (!values.is_empty()).then(|| raw(Stored::F32, shape, &f32s(values), device));
                bits(&dequantize(&w, s.as_ref(), out).unwrap())
            };
            assert_eq!(
                decode(&Device::Cpu),
                decode(&gpu),
                "{out:?}, scale shape {shape:?}"
            );
        }
    }
    let bf16: Vec<u8> = (0..512u32)
        .flat_map(|i| ((i * 131) as u16).to_le_bytes())
        .collect();
    let f16 = bf16.clone();
    for (dtype, bytes) in [(Stored::BF16, &bf16), (Stored::F16, &f16)] {
        let decode = |device: &Device| {
            bits(&dequantize(&raw(dtype, &[512], bytes, device), None, DType::F32).unwrap())
        };
        assert_eq!(decode(&Device::Cpu), decode(&gpu), "{dtype:?}");
    }
}

fn config() -> ModelConfig {
    ModelConfig {
        hidden_size: 256,
        intermediate_size: 512,
        // The 7B's head width, which the GPU's prefill attention is written for.
        num_attention_heads: 2,
        num_key_value_heads: 1,
        head_dim: 128,
        num_hidden_layers: 6,
        vocab_size: 512,
        rope_theta: 1e6,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: false,
        max_position_embeddings: 32768,
    }
}

fn write_model(dir: &Path, precision: Precision) -> PathBuf {
    let config = config();
    let spec = SynthSpec {
        speech: SpeechConfig::small(config.hidden_size),
        config,
        precision,
        seed: 9,
    };
    let path = dir.join("m.safetensors");
    synth::write(&spec, &path, true, |_, _| {}).unwrap();
    path
}

/// `path` loaded on GPU 0 with `gpu_layers` resident, the other options at their defaults.
fn cuda_engine(path: &Path, gpu_layers: usize) -> Engine {
    hybrid_engine(path, gpu_layers, 0)
}

/// An engine on the GPU whose host CPU computes `cpu_layers` of the offloaded layers.
fn hybrid_engine(path: &Path, gpu_layers: usize, cpu_layers: usize) -> Engine {
    let options = EngineOptions {
        device: DeviceChoice::Cuda(0),
        gpu_layers,
        cpu_layers,
        ..EngineOptions::default()
    };
    Engine::load(ModelInfo::open(path).unwrap(), &options, |_| {}).unwrap()
}

fn trace(path: &Path, options: &EngineOptions) -> Vec<Vec<u32>> {
    let mut engine = Engine::load(ModelInfo::open(path).unwrap(), options, |_| {}).unwrap();
    let mut out = Vec::new();
    for _ in 0..2 {
        engine.reset();
        let h = engine
            .forward(&[3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8])
            .unwrap();
        out.push(bits(&h));
        for id in [5u32, 3, 5] {
            let h = engine.forward(&[id]).unwrap();
            out.push(bits(&h));
            out.push(bits(&engine.logits(&h.get(0).unwrap()).unwrap()));
        }
    }
    out
}

#[test]
fn streamed_layers_are_bit_identical_on_the_gpu() {
    let dir = tempfile::tempdir().unwrap();
    for precision in [
        Precision::Float8Plain,
        Precision::Float8Scaled(ScaleConvention::WeightScale, ScaleGranularity::PerChannel),
        Precision::BF16,
    ] {
        let path = write_model(dir.path(), precision);
        let base = EngineOptions {
            device: DeviceChoice::Cuda(0),
            gpu_layers: 6,
            ..EngineOptions::default()
        };
        let reference = trace(&path, &base);
        for (gpu_layers, placement, slots, depth, pin) in [
            (0, Placement::Last, 2, 1, true),
            (2, Placement::Last, 2, 1, true),
            (2, Placement::First, 3, 2, true),
            (3, Placement::Spread, 1, 0, true),
            (1, Placement::Last, 2, 0, false),
        ] {
            let options = EngineOptions {
                gpu_layers,
                placement,
                slots,
                prefetch_depth: depth,
                pin_memory: pin,
                ..base.clone()
            };
            assert!(
                trace(&path, &options) == reference,
                "{precision:?}: {gpu_layers} resident, {placement:?}, {slots} slots, depth {depth}, pinned {pin}"
            );
        }
    }
}

#[test]
fn gpu_and_cpu_agree_to_bf16_precision() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), Precision::Float8Plain);
    let run = |device| {
        let options = EngineOptions {
            device,
            gpu_layers: 3,
            ..EngineOptions::default()
        };
        let mut engine = Engine::load(ModelInfo::open(&path).unwrap(), &options, |_| {}).unwrap();
        // A prompt, then two decoding steps (the fused norm, KV store and attention paths).
        let mut h = host_f32(&engine.forward(&[3, 1, 4, 1, 5]).unwrap());
        for id in [9, 2] {
            h.extend(host_f32(&engine.forward(&[id]).unwrap()));
        }
        h
    };
    let (cpu, gpu) = (run(DeviceChoice::Cpu), run(DeviceChoice::Cuda(0)));
    let worst = cpu
        .iter()
        .zip(&gpu)
        .map(|(a, b)| (a - b).abs() / (1.0 + a.abs()))
        .fold(0.0f32, f32::max);
    assert!(worst < 0.05, "worst relative difference {worst}");
}

/// `n` bf16 values of a saw tooth (97 steps of `f`, centred on zero), on `device`.
fn ramp(n: usize, f: f32, device: &Device) -> Tensor {
    let v: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) * f).collect();
    Tensor::from_slice(&v, n, device)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
}

/// Largest `|a - b|` of the CPU's `cpu` and the GPU's `gpu`.
fn worst_absolute(cpu: &[f32], gpu: &[f32]) -> f32 {
    cpu.iter()
        .zip(gpu)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max)
}

/// Largest `|a - b| / (1 + |a|)` of the CPU's `cpu` and the GPU's `gpu`.
fn worst_relative(cpu: &[f32], gpu: &[f32]) -> f32 {
    cpu.iter()
        .zip(gpu)
        .map(|(a, b)| (a - b).abs() / (1.0 + a.abs()))
        .fold(0.0f32, f32::max)
}

#[test]
fn fused_float8_matvec_matches_the_cpu() {
    use vibeoffload::engine::matvec;
    use vibeoffload::engine::ops::{FusedMatVec, Segment};
    let n_in = 512;
    let codes = |rows: usize, salt: usize| -> Vec<u8> {
        (0..rows * n_in)
            .map(|i| ((i * 37 + salt) % 251) as u8 & 0xf7)
            .collect()
    };
    // (weights as (rows, salt), per-row scales, bias, residual, gated)
    type Case<'a> = (&'a [(usize, usize)], bool, bool, bool, bool);
    let cases: [Case; 5] = [
        (&[(304, 11)], false, false, false, false),
        (&[(304, 11)], true, false, false, false),
        (&[(304, 1), (64, 2), (48, 3)], false, true, true, false),
        (&[(304, 1), (64, 2), (48, 3)], true, true, false, false),
        (&[(160, 5), (160, 6)], true, false, false, true),
    ];
    // Up to 8 rows the matvec; more the matrix product, its tiles partly past the rows,
    // the outputs and the segments' ends, its inputs split (9 and 300 rows) or not.
    for rows in [1, 3, 8, 9, 130, 300] {
        for (i, &(weights, scaled, bias, residual, gated)) in cases.iter().enumerate() {
            let run = |device: &Device| -> Vec<f32> {
                let segments = weights
                    .iter()
                    .map(|&(n, salt)| Segment {
                        bytes: Tensor::from_vec(codes(n, salt), n * n_in, device).unwrap(),
                        rows: n,
                        scale: scaled.then(|| {
                            Tensor::arange(0f32, n as f32, device)
                                .unwrap()
                                .affine(0.01, 0.5)
                                .unwrap()
                        }),
                    })
                    .collect();
                let mut op = FusedMatVec {
                    gated,
                    ..FusedMatVec::new(segments, n_in)
                };
                let n_out = op.out_features();
                op.bias = bias.then(|| ramp(n_out, 0.1, device));
                op.residual = residual.then(|| {
                    ramp(rows * n_out, 0.2, device)
                        .reshape((rows, n_out))
                        .unwrap()
                });
                let x = ramp(rows * n_in, 0.01, device)
                    .reshape((rows, n_in))
                    .unwrap();
                host_f32(&matvec::apply(&x, &op).unwrap())
            };
            let (cpu, gpu) = (run(&Device::Cpu), run(&cuda()));
            let worst = worst_relative(&cpu, &gpu);
            assert!(
                worst < 1e-2,
                "case {i}, {rows} rows: worst relative difference {worst}"
            );
        }
    }
}

#[test]
fn fused_float8_matvec_fuses_the_speech_work_like_the_cpu() {
    use vibeoffload::engine::matvec;
    use vibeoffload::engine::ops::{FusedMatVec, Segment};
    // (output rows, inputs, gated, modulated, gated residual, bias and GELU after a plain
    // norm): the diffusion head's products and the tokenizers' one-step feed-forward; 8 rows
    // of 4096 inputs need more than 48 KiB of shared memory for the normalised copy.
    let cases = [
        (160, 512, true, true, false, false),
        (64, 512, false, false, true, false),
        (64, 4096, false, true, true, false),
        (128, 512, false, false, false, true),
    ];
    // More than 8 rows: the matrix product, its norm and modulation in a pass of their own.
    for rows in [1, 2, 8, 20, 130] {
        for (i, &(n_out, n_in, gated, modulated, gated_residual, gelu)) in cases.iter().enumerate()
        {
            let run = |device: &Device| -> Vec<f32> {
                let codes = |salt: usize| -> Vec<u8> {
                    (0..n_out * n_in)
                        .map(|i| ((i * 37 + salt) % 251) as u8 & 0xf7)
                        .collect()
                };
                // Before GELU, outputs near zero: scaled down so that the bf16 steps of the
                // normalised inputs (up to 448 times an ulp) stay small beside them.
                let segment = |salt| Segment {
                    bytes: Tensor::from_vec(codes(salt), n_out * n_in, device).unwrap(),
                    rows: n_out,
                    scale: gelu.then(|| Tensor::new(&[1f32 / 512.0], device).unwrap()),
                };
                let segments = match gated {
                    true => vec![segment(5), segment(6)],
                    false => vec![segment(7)],
                };
                let mut op = FusedMatVec {
                    gated,
                    ..FusedMatVec::new(segments, n_in)
                };
                // Modulation and gate as the head has them: strided views of one tensor.
                let m = ramp(rows * 3 * n_in, 0.003, device)
                    .reshape((rows, 3 * n_in))
                    .unwrap();
                if modulated {
                    op.norm = Some((ramp(n_in, 0.02, device), 1e-5));
                    op.modulation = Some((
                        m.narrow(1, n_in, n_in).unwrap(),
                        m.narrow(1, 0, n_in).unwrap(),
                    ));
                }
                if gelu {
                    op.norm = Some((ramp(n_in, 0.02, device), 1e-5));
                    op.bias = Some(ramp(n_out, 0.1, device));
                    op.gelu = true;
                }
                if gated_residual {
                    op.residual = Some(
                        ramp(rows * n_out, 0.2, device)
                            .reshape((rows, n_out))
                            .unwrap(),
                    );
                    op.gate = Some(m.narrow(1, 2 * n_in, n_out).unwrap());
                }
                let x = ramp(rows * n_in, 0.01, device)
                    .reshape((rows, n_in))
                    .unwrap();
                host_f32(&matvec::apply(&x, &op).unwrap())
            };
            let (cpu, gpu) = (run(&Device::Cpu), run(&cuda()));
            let worst = worst_relative(&cpu, &gpu);
            // A normalised input a bf16 ulp apart (the GPU's rsqrt) moves an output by a
            // weight of up to 448 times that ulp: a few percent over 4096 inputs. A missing
            // modulation, gate, bias or GELU moves it by tens of percent.
            assert!(
                worst < 5e-2,
                "case {i}, {rows} rows: worst relative difference {worst}"
            );
        }
    }
}

/// `n` bf16 values `sin(i f - 0.3)`, on `device`.
fn sin_ramp(n: usize, f: f64, device: &Device) -> Tensor {
    Tensor::arange(0f32, n as f32, device)
        .and_then(|t| t.affine(f, -0.3))
        .and_then(|t| t.sin())
        .and_then(|t| t.to_dtype(DType::BF16))
        .unwrap()
}

/// A prefill pass on tensor cores (100 queries after 37 cached positions, two sequences, 7B
/// heads) against the CPU's causal attention over the same cache views.
#[test]
fn prefill_attention_matches_the_cpu() {
    use vibeoffload::engine::attention;
    let (b, t, heads, kv, d, max, pos) = (2, 100, 28, 4, 128, 200, 37);
    let run = |device: &Device| -> Vec<f32> {
        let ramp = |n: usize, f: f64| sin_ramp(n, f, device);
        let qkv = ramp(b * t * (heads + 2 * kv) * d, 0.37)
            .reshape((b, t, (heads + 2 * kv) * d))
            .unwrap();
        let table = ramp(max * d, 0.05).reshape((max, d)).unwrap();
        let cache = |f| {
            ramp(b * kv * max * d, f)
                .reshape((b, kv, max, d))
                .unwrap()
                .narrow(2, 0, pos + t)
                .unwrap()
        };
        let out = attention::attend_qkv(
            &qkv,
            &cache(0.11),
            &cache(0.23),
            (heads, kv, d),
            &table,
            pos,
        );
        host_f32(&out.unwrap())
    };
    let (cpu, gpu) = (run(&Device::Cpu), run(&cuda()));
    assert_eq!(cpu.len(), b * t * heads * d);
    let worst = worst_absolute(&cpu, &gpu);
    assert!(worst < 2e-2, "worst absolute difference {worst}");
}

#[test]
fn decode_attention_matches_the_cpu() {
    use vibeoffload::engine::attention;
    let (b, heads, kv, d, max, len) = (1, 28, 4, 128, 300, 257);
    let run = |device: &Device| -> Vec<f32> {
        let ramp = |n: usize, f: f64| sin_ramp(n, f, device);
        let q = ramp(b * heads * d, 0.37).reshape((b, heads, 1, d)).unwrap();
        let k = ramp(b * kv * max * d, 0.11)
            .reshape((b, kv, max, d))
            .unwrap()
            .narrow(2, 0, len)
            .unwrap();
        let v = ramp(b * kv * max * d, 0.23)
            .reshape((b, kv, max, d))
            .unwrap()
            .narrow(2, 0, len)
            .unwrap();
        host_f32(&attention::attend(&q, &k, &v, kv).unwrap())
    };
    let (cpu, gpu) = (run(&Device::Cpu), run(&cuda()));
    let worst = worst_absolute(&cpu, &gpu);
    assert!(worst < 2e-2, "worst absolute difference {worst}");
}

/// A plain product of 20 rows (the wide kernel: three groups of eight rows a weight decode)
/// gives every row the bits it has in a product of eight rows or fewer, with and without a
/// bias, a residual and per-row scales: the head's modulations of a frame's steps at once
/// equal those of its steps in groups.
#[test]
fn a_wide_product_gives_each_row_the_bits_of_a_narrow_one() {
    use vibeoffload::engine::matvec;
    use vibeoffload::engine::ops::{FusedMatVec, Segment};
    let gpu = cuda();
    let (rows, n_in) = (20, 1024);
    for (n_out, scaled, bias, residual) in [(3584, false, false, false), (464, true, true, true)] {
        let codes: Vec<u8> = (0..n_out * n_in)
            .map(|i| ((i * 37 + 11) % 251) as u8 & 0xf7)
            .collect();
        let segments = vec![Segment {
            bytes: Tensor::from_vec(codes, n_out * n_in, &gpu).unwrap(),
            rows: n_out,
            scale: scaled.then(|| {
                Tensor::arange(0f32, n_out as f32, &gpu)
                    .unwrap()
                    .affine(0.01, 0.5)
                    .unwrap()
            }),
        }];
        let mut op = FusedMatVec::new(segments, n_in);
        op.bias = bias.then(|| ramp(n_out, 0.1, &gpu));
        let x = ramp(rows * n_in, 0.01, &gpu).reshape((rows, n_in)).unwrap();
        let res = ramp(rows * n_out, 0.2, &gpu)
            .reshape((rows, n_out))
            .unwrap();
        op.residual = residual.then(|| res.clone());
        let wide = bits(&matvec::apply(&x, &op).unwrap());
        let mut narrow = Vec::new();
        for start in (0..rows).step_by(8) {
            let n = 8.min(rows - start);
            op.residual = residual.then(|| res.narrow(0, start, n).unwrap());
            let part = matvec::apply(&x.narrow(0, start, n).unwrap(), &op).unwrap();
            narrow.extend(bits(&part));
        }
        assert!(
            wide == narrow,
            "{n_out} outputs: a wide row differs from its narrow one"
        );
    }
}

/// A decode step's store-and-attend op for two lanes, one long enough to split its positions
/// over a cluster of blocks and one not, gives the bits of the key store and then the
/// attention, lane by lane: the outputs and the caches.
#[test]
fn a_step_stores_and_attends_with_the_bits_of_the_two_ops() {
    use vibeoffload::engine::attention;
    use vibeoffload::engine::ops::{StepAttention, StoreKv};
    let gpu = cuda();
    let (heads, kv, d, max) = (28, 4, 128, 400);
    let width = (heads + 2 * kv) * d;
    let positions = [300usize, 5];
    let qkv = sin_ramp(2 * width, 0.37, &gpu)
        .reshape((2, 1, width))
        .unwrap();
    let table = sin_ramp(max * d, 0.05, &gpu).reshape((max, d)).unwrap();
    let caches: Vec<Tensor> = (0..2)
        .map(|i| {
            sin_ramp(2 * kv * max * d, 0.11 + 0.07 * i as f64, &gpu)
                .reshape((2, 1, kv, max, d))
                .unwrap()
        })
        .collect();
    let mut apart = Vec::new();
    for (i, &pos) in positions.iter().enumerate() {
        let cache = caches[i].copy().unwrap();
        let row = qkv.narrow(0, i, 1).unwrap().contiguous().unwrap();
        let store = StoreKv {
            heads,
            kv_heads: kv,
            head_dim: d,
            batch: 1,
            tokens: 1,
            pos,
            max_len: max,
        };
        cache.inplace_op3(&row, &table, &store).unwrap();
        let part = |j: usize| cache.get(j).unwrap().narrow(2, 0, pos + 1).unwrap();
        let out = attention::attend_qkv(&row, &part(0), &part(1), (heads, kv, d), &table, pos);
        apart.push((bits(&out.unwrap()), bits(&cache)));
    }
    let lanes: Vec<(Tensor, usize)> = caches
        .iter()
        .zip(positions)
        .map(|(c, p)| (c.copy().unwrap(), p))
        .collect();
    let op = StepAttention {
        heads,
        kv_heads: kv,
        head_dim: d,
        q_stride: width,
        lanes: lanes.clone(),
        table,
    };
    let out = qkv.apply_op1_no_bwd(&op).unwrap();
    for (i, (attended, stored)) in apart.iter().enumerate() {
        assert!(
            bits(&out.get(i).unwrap()) == *attended,
            "lane {i}'s attention"
        );
        assert!(bits(&lanes[i].0) == *stored, "lane {i}'s cache");
    }
}

#[test]
fn a_batch_decodes_each_sequence_as_if_alone_on_the_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), Precision::Float8Plain);
    let mut engine = cuda_engine(&path, 2);
    // Prefill of 4 x 5 rows and of 5 rows may take different GEMM algorithms, so rows agree to
    // bf16 precision rather than bit for bit; mixing up rows would differ by far more.
    let prompts: [&[u32]; 4] = [
        &[3, 1, 4, 1, 5],
        &[9, 2, 6, 5, 3],
        &[5, 8, 9, 7, 9],
        &[3, 2, 3, 8, 4],
    ];
    engine.forward_batch(&prompts).unwrap();
    let step = engine.forward_batch(&[&[1], &[2], &[3], &[4]]).unwrap();
    for (i, prompt) in prompts.iter().enumerate() {
        engine.reset();
        engine.forward(prompt).unwrap();
        let alone = engine.forward(&[1 + i as u32]).unwrap();
        let (a, b) = (bits(&alone), bits(&step.get(i).unwrap()));
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| {
                (f32::from_bits(*x) - f32::from_bits(*y)).abs() / (1.0 + f32::from_bits(*x).abs())
            })
            .fold(0.0f32, f32::max);
        assert!(worst < 0.05, "row {i}: worst relative difference {worst}");
    }
}

/// Activations as large as real Qwen2 checkpoints carry (see common::make_massive): MLP
/// intermediates ~1e5, a residual channel ~3e4, attention logits ~300, far past float16's
/// range. Prefill (12 rows) and the fused decode path (1, 3 and 8 rows), all streamed, all
/// resident, and hybrid (layers computed by the host CPU in f32 between streamed and resident
/// ones), against the float64 reference.
#[test]
fn massive_activations_match_a_float64_reference_on_the_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(
        dir.path(),
        Precision::Float8Scaled(ScaleConvention::ScaleWeight, ScaleGranularity::PerChannel),
    );
    let c = config();
    common::make_massive(&path, &c);
    let ids: Vec<u32> = (0..24).map(|i| (i * 37 + 1) % 512).collect();
    let (want, peaks) = common::reference(&path, &c, &ids);
    assert!(
        peaks.mlp > 5e4 && peaks.residual > 1e4 && peaks.logit > 100.0,
        "{peaks:?}"
    );
    let layers = c.num_hidden_layers;
    for (gpu_layers, cpu_layers) in [(0, 0), (layers, 0), (1, 3), (0, layers)] {
        let mut engine = hybrid_engine(&path, gpu_layers, cpu_layers);
        let mut got: Vec<Vec<f32>> = Vec::new();
        for (a, b) in [(0, 12), (12, 13), (13, 16), (16, 24)] {
            let h = host_f32(&engine.forward(&ids[a..b]).unwrap());
            got.extend(h.chunks(c.hidden_size).map(<[f32]>::to_vec));
        }
        assert_eq!(
            engine.transfer_stats().unwrap().cpu_compute_layers,
            cpu_layers
        );
        let worst = common::worst_row_error(&got, &want);
        let case = format!("{gpu_layers} resident, {cpu_layers} on the host CPU");
        eprintln!("massive activations, {case}: worst error {worst:e} ({peaks:?})");
        assert!(worst <= 3e-2, "{case}: worst error {worst:e}");
    }
}

/// A CPU-computed layer's prefill runs on the GPU: its hidden states equal a streamed layer's,
/// bit for bit, for a first chunk and for one after it (earlier keys and values taken up from
/// the host cache and the new ones written back); single-token steps run on the CPU.
#[test]
fn host_layers_prefill_as_streamed_ones_do() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), Precision::Float8Plain);
    let ids: Vec<u32> = (0..20).map(|i| (i * 37 + 1) % 512).collect();
    let mut streamed = hybrid_engine(&path, 1, 0);
    let mut hybrid = hybrid_engine(&path, 1, 4);
    for chunk in [&ids[..], &ids[3..15]] {
        let want = bits(&streamed.forward(chunk).unwrap());
        assert!(bits(&hybrid.forward(chunk).unwrap()) == want);
    }
    let step = host_f32(&hybrid.forward(&[7]).unwrap());
    let want = host_f32(&streamed.forward(&[7]).unwrap());
    let worst = worst_relative(&want, &step);
    assert!(
        worst < 0.05,
        "a step through the CPU's layers: worst relative {worst}"
    );
    assert_eq!(hybrid.transfer_stats().unwrap().cpu_compute_layers, 4);
}

/// Two lanes of a few tokens each through CPU-computed layers (each lane handed over on its
/// own, the second written into the hand-over buffer right after the first's kernel was
/// queued) give what the same lanes give through streamed layers, within the GPU's rounding.
#[test]
fn lanes_of_a_few_tokens_cross_to_the_cpu_and_back_in_turn() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), Precision::Float8Plain);
    let run = |cpu_layers: usize| {
        let mut engine = hybrid_engine(&path, 1, cpu_layers);
        let other = engine.add_lane();
        let (a, b) = (
            engine.embed_ids(&[5, 17, 99]).unwrap(),
            engine.embed_ids(&[9, 8]).unwrap(),
        );
        let out = engine.forward_lanes(&[(0, &a), (other, &b)]).unwrap();
        out.iter().flat_map(host_f32).collect::<Vec<f32>>()
    };
    let (want, got) = (run(0), run(4));
    let worst = worst_relative(&want, &got);
    assert!(worst < 0.05, "worst relative difference {worst}");
}

/// The fused kernels on inputs past float16's range (1e5 among small values), 1, 3 and 8 rows
/// (the matvec) and 40 and 200 (the matrix product), plain and RMS-normalised, against the CPU.
#[test]
fn fused_float8_matvec_takes_inputs_beyond_float16() {
    use vibeoffload::engine::matvec;
    use vibeoffload::engine::ops::{FusedMatVec, Segment};
    let (n_in, n_out) = (512, 64);
    let codes: Vec<u8> = (0..n_out * n_in)
        .map(|i| ((i * 37 + 5) % 251) as u8 & 0xf7)
        .collect();
    for rows in [1, 3, 8, 40, 200] {
        for normed in [false, true] {
            let run = |device: &Device| -> Vec<f32> {
                let x: Vec<f32> = (0..rows * n_in)
                    .map(|i| match i % 97 {
                        0 => 1e5,
                        1 => -7e4,
                        k => (k as f32 - 48.0) * 0.01,
                    })
                    .collect();
                let x = Tensor::from_vec(x, (rows, n_in), device)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap();
                let norm =
                    normed.then(|| (Tensor::ones(n_in, DType::BF16, device).unwrap(), 1e-6f32));
                let op = FusedMatVec {
                    norm,
                    ..FusedMatVec::new(
                        vec![Segment {
                            bytes: Tensor::from_slice(&codes, n_out * n_in, device).unwrap(),
                            rows: n_out,
                            scale: None,
                        }],
                        n_in,
                    )
                };
                host_f32(&matvec::apply(&x, &op).unwrap())
            };
            let (cpu, gpu) = (run(&Device::Cpu), run(&cuda()));
            let rows_of = |v: &[f32]| v.chunks(n_out).map(<[f32]>::to_vec).collect::<Vec<_>>();
            let want: Vec<Vec<f64>> = rows_of(&cpu)
                .into_iter()
                .map(|r| r.into_iter().map(f64::from).collect())
                .collect();
            let worst = common::worst_row_error(&rows_of(&gpu), &want);
            assert!(
                worst <= 1e-2,
                "{rows} rows, normed {normed}: worst error {worst:e}"
            );
        }
    }
}

/// A NaN scale in one layer fails the pass and names that layer, on the fused decode path
/// (checked inside the kernel) and the prefill path (a separate check), resident and streamed.
#[test]
fn a_layer_that_makes_nan_is_named_on_the_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(
        dir.path(),
        Precision::Float8Scaled(ScaleConvention::ScaleWeight, ScaleGranularity::PerChannel),
    );
    common::poison(
        &path,
        "model.language_model.layers.3.mlp.down_proj.scale_weight",
        5,
    );
    for gpu_layers in [0, 6] {
        for ids in [&[1u32, 2, 3][..], &[1u32; 12][..]] {
            let mut engine = cuda_engine(&path, gpu_layers);
            let e = engine.forward(ids).unwrap_err();
            assert!(
                format!("{e:#}").starts_with("decoder layer 3 produced NaN or infinite values"),
                "{} tokens, {gpu_layers} resident: {e:#}",
                ids.len()
            );
        }
    }
}

/// Every float8 code through the tensor-core matvec (1 row of x) and matrix product (16 rows),
/// one code per output feature (all of its weights, x all ones), so a code decoded wrongly, a
/// subnormal flushed to zero included, shows as its own wrong output.
#[test]
fn fused_float8_matvec_decodes_every_code() {
    use vibeoffload::engine::matvec;
    use vibeoffload::engine::ops::{FusedMatVec, Segment};
    let n_in = 64;
    // NaN codes (0x7f, 0xff) read as 480 on the tensor-core path: left out.
    let code = |row: usize| if row & 0x7f == 0x7f { 0 } else { row as u8 };
    let codes: Vec<u8> = (0..256 * n_in).map(|i| code(i / n_in)).collect();
    let run = |device: &Device, rows: usize| -> Vec<f32> {
        let op = FusedMatVec::new(
            vec![Segment {
                bytes: Tensor::from_slice(&codes, codes.len(), device).unwrap(),
                rows: 256,
                scale: None,
            }],
            n_in,
        );
        let x = Tensor::ones((rows, n_in), DType::BF16, device).unwrap();
        host_f32(&matvec::apply(&x, &op).unwrap())
    };
    let cpu = run(&Device::Cpu, 1);
    for rows in [1, 16] {
        let gpu = run(&cuda(), rows);
        for (i, b) in gpu.iter().enumerate() {
            let (row, a) = (i % 256, cpu[i % 256]);
            assert!(
                (a - b).abs() <= a.abs() / 128.0,
                "{rows} rows, code {row:#04x}: CPU {a}, GPU {b}"
            );
            assert_eq!(a == 0.0, code(row) & 0x7f == 0, "code {row:#04x}: {a}");
        }
    }
}

/// The CFG pair's step on the GPU: two lanes of different lengths, one token each, batched
/// through the fused projections, give each lane's bits as when run alone (resident and
/// streamed).
#[test]
fn a_lane_pair_step_is_bit_identical_to_each_lane_alone_on_the_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), Precision::Float8Plain);
    let (long, short): (&[u32], &[u32]) = (&[5, 17, 99, 3, 150, 1, 2], &[9, 8]);
    for gpu_layers in [6, 2] {
        let mut alone = cuda_engine(&path, gpu_layers);
        let mut step_alone = |prompt: &[u32], token: u32| {
            alone.reset();
            alone.forward(prompt).unwrap();
            bits(&alone.forward(&[token]).unwrap())
        };
        let (long_step, short_step) = (step_alone(long, 7), step_alone(short, 42));
        let mut engine = cuda_engine(&path, gpu_layers);
        let other = engine.add_lane();
        let embed = |e: &Engine, ids: &[u32]| e.embed_ids(ids).unwrap();
        let (l, s) = (embed(&engine, long), embed(&engine, short));
        engine.forward_lanes(&[(0, &l), (other, &s)]).unwrap();
        let (a, b) = (embed(&engine, &[7]), embed(&engine, &[42]));
        let out = engine.forward_lanes(&[(0, &a), (other, &b)]).unwrap();
        assert!(
            bits(&out[0]) == long_step,
            "long lane, {gpu_layers} resident"
        );
        assert!(
            bits(&out[1]) == short_step,
            "short lane, {gpu_layers} resident"
        );
    }
}

/// The logits of a few tokens from the LM head's gathered rows (zero-padded to whole tiles)
/// on the GPU: the full logits' columns of them, bit for bit, with and without per-row
/// scales.
#[test]
fn token_logits_equal_the_full_logits_columns_on_the_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let per_row =
        Precision::Float8Scaled(ScaleConvention::ScaleWeight, ScaleGranularity::PerChannel);
    let many: Vec<u32> = (0..17).map(|i| i * 29 % 512).collect();
    for precision in [Precision::Float8Plain, per_row] {
        let path = write_model(dir.path(), precision);
        let mut engine = cuda_engine(&path, 6);
        let hidden = engine.forward(&[5, 17, 99, 3]).unwrap();
        let last = hidden.get(3).unwrap();
        let all = engine.logits(&last).unwrap();
        for ids in [&[511, 3, 0, 150][..], &many[..]] {
            let index = Tensor::new(ids, all.device()).unwrap();
            let want = all.index_select(&index, 0).unwrap();
            let got = engine.token_logits(&last, ids).unwrap();
            assert!(
                bits(&got) == bits(&want),
                "{precision:?}, {} ids",
                ids.len()
            );
        }
    }
}
