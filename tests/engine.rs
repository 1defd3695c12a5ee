//! The engine on candle's CPU backend: streamed layers give bit-identical results to resident
//! ones, and hidden states match an independent float64 Qwen2 written here from the file.

use candle_core::Tensor;
use std::path::{Path, PathBuf};
use vibeoffload::checkpoint::config::ModelConfig;
use vibeoffload::checkpoint::layout::{
    Precision, ScaleConvention, ScaleGranularity, VibeVoiceParts,
};
use vibeoffload::checkpoint::synth::{self, SynthSpec};
use vibeoffload::checkpoint::ModelInfo;
use vibeoffload::engine::{DeviceChoice, Engine, EngineOptions};
use vibeoffload::plan::Placement;

const LAYERS: usize = 4;

fn config(tied: bool) -> ModelConfig {
    ModelConfig {
        hidden_size: 64,
        intermediate_size: 96,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        num_hidden_layers: LAYERS,
        vocab_size: 200,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-6,
        tie_word_embeddings: tied,
    }
}

fn write_model(dir: &Path, precision: Precision, tied: bool) -> PathBuf {
    let config = config(tied);
    let spec = SynthSpec {
        parts: VibeVoiceParts::small(&config),
        config,
        precision,
        seed: 42,
    };
    let path = dir.join("m.safetensors");
    synth::write(&spec, &path, true, |_, _| {}).unwrap();
    path
}

fn load(path: &Path, options: &EngineOptions) -> Engine {
    Engine::load(ModelInfo::open(path).unwrap(), options, |_, _| {}).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

/// Prefill then three single-token steps; every hidden state and the last logits.
fn trace(engine: &mut Engine) -> Vec<Vec<f32>> {
    engine.reset();
    let mut out = Vec::new();
    // 11 tokens: more than the fused decode path takes; then single tokens, which it takes.
    let hidden = engine
        .forward(&[5, 17, 99, 3, 150, 1, 2, 3, 4, 5, 6])
        .unwrap();
    out.push(values(&hidden));
    for id in [7u32, 190, 0] {
        let hidden = engine.forward(&[id]).unwrap();
        out.push(values(&hidden));
        out.push(values(&engine.logits(&hidden.get(0).unwrap()).unwrap()));
    }
    out
}

#[test]
fn streamed_layers_are_bit_identical_to_resident_ones() {
    let dir = tempfile::tempdir().unwrap();
    for (precision, tied) in [
        (Precision::Float8Plain, false),
        (
            Precision::Float8Scaled(ScaleConvention::ScaleWeight, ScaleGranularity::PerChannel),
            true,
        ),
        (Precision::BF16, false),
    ] {
        let path = write_model(dir.path(), precision, tied);
        let resident = EngineOptions {
            gpu_layers: LAYERS,
            ..EngineOptions::default()
        };
        let reference = trace(&mut load(&path, &resident));
        for gpu_layers in 0..LAYERS {
            for placement in [Placement::Last, Placement::First, Placement::Spread] {
                for (slots, depth) in [(1, 0), (2, 0), (2, 1), (3, 2)] {
                    let options = EngineOptions {
                        device: DeviceChoice::Cpu,
                        gpu_layers,
                        placement,
                        slots,
                        prefetch_depth: depth,
                        ..EngineOptions::default()
                    };
                    let mut engine = load(&path, &options);
                    let got = trace(&mut engine);
                    assert!(
                        got == reference,
                        "{precision:?}: {gpu_layers} resident, {placement:?}, {slots} slots, depth {depth} differs"
                    );
                    let stats = engine.transfer_stats().unwrap();
                    assert_eq!(stats.cpu_layers, LAYERS - gpu_layers);
                    // Four passes; each streamed layer copied at least once, and every pass
                    // when there are more streamed layers than slots.
                    let streamed = (LAYERS - gpu_layers) as u64;
                    if streamed > slots as u64 {
                        assert!(stats.total_transfers >= 4 * streamed, "{stats:?}");
                    } else {
                        assert_eq!(stats.total_transfers, streamed, "{stats:?}");
                    }
                }
            }
        }
    }
}

#[test]
fn a_second_run_of_the_same_prompt_repeats_itself() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), Precision::Float8Plain, false);
    let mut engine = load(
        &path,
        &EngineOptions {
            gpu_layers: 1,
            ..EngineOptions::default()
        },
    );
    assert_eq!(trace(&mut engine), trace(&mut engine));
}

#[test]
fn sequences_beyond_max_seq_len_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), Precision::Float8Plain, false);
    let mut engine = load(
        &path,
        &EngineOptions {
            max_seq_len: 4,
            ..EngineOptions::default()
        },
    );
    let e = engine.forward(&[1, 2, 3, 4, 5]).unwrap_err();
    assert!(format!("{e:#}").contains("beyond --max-seq-len 4"), "{e:#}");
    let e = engine.forward(&[1, 500]).unwrap_err();
    assert!(format!("{e:#}").contains("token id 500"), "{e:#}");
}

// ---- an independent float64 reference --------------------------------------------------------

/// Tensors read straight from the safetensors file and decoded here, not by the library.
struct Weights {
    header: serde_json::Map<String, serde_json::Value>,
    data: Vec<u8>,
}

impl Weights {
    fn read(path: &Path) -> Weights {
        let bytes = std::fs::read(path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        Weights {
            header: serde_json::from_slice(&bytes[8..8 + n]).unwrap(),
            data: bytes[8 + n..].to_vec(),
        }
    }

    fn has(&self, name: &str) -> bool {
        self.header.contains_key(name)
    }

    /// Values as f64, row-major; with `.scale_weight` applied per row when present.
    fn get(&self, name: &str) -> Vec<f64> {
        let t = &self.header[name];
        let start = t["data_offsets"][0].as_u64().unwrap() as usize;
        let end = t["data_offsets"][1].as_u64().unwrap() as usize;
        let b = &self.data[start..end];
        let mut v: Vec<f64> = match t["dtype"].as_str().unwrap() {
            "F8_E4M3" => b.iter().map(|&c| f8(c)).collect(),
            "BF16" => b
                .chunks(2)
                .map(|c| f32::from_bits((u32::from(u16::from_le_bytes([c[0], c[1]]))) << 16) as f64)
                .collect(),
            "F32" => b
                .chunks(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                .collect(),
            other => panic!("{other}"),
        };
        let scale_name = name.replace(".weight", ".scale_weight");
        if name.ends_with(".weight") && self.has(&scale_name) {
            let scale = self.get(&scale_name);
            let cols = v.len() / scale.len();
            for (i, x) in v.iter_mut().enumerate() {
                *x *= scale[i / cols];
            }
        }
        v
    }
}

fn f8(code: u8) -> f64 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((code >> 3) & 15) as i32;
    let m = (code & 7) as f64;
    sign * if e == 0 {
        m / 8.0 * 2f64.powi(-6)
    } else {
        (1.0 + m / 8.0) * 2f64.powi(e - 7)
    }
}

fn rms_norm(x: &[f64], w: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let r = 1.0 / (ms + eps).sqrt();
    x.iter().zip(w).map(|(v, w)| v * r * w).collect()
}

/// `W x (+ b)` for W `[out, in]`.
fn linear(w: &[f64], x: &[f64], b: Option<&[f64]>) -> Vec<f64> {
    let cols = x.len();
    (0..w.len() / cols)
        .map(|r| {
            w[r * cols..(r + 1) * cols]
                .iter()
                .zip(x)
                .map(|(a, b)| a * b)
                .sum::<f64>()
                + b.map_or(0.0, |b| b[r])
        })
        .collect()
}

fn rope(v: &mut [f64], pos: usize, hd: usize, theta: f64) {
    let half = hd / 2;
    for i in 0..half {
        let angle = pos as f64 * theta.powf(-2.0 * i as f64 / hd as f64);
        let (a, b) = (v[i], v[i + half]);
        v[i] = a * angle.cos() - b * angle.sin();
        v[i + half] = b * angle.cos() + a * angle.sin();
    }
}

/// Final-normed hidden states of `ids` from an empty cache.
fn reference(path: &Path, c: &ModelConfig, ids: &[u32]) -> Vec<Vec<f64>> {
    let w = Weights::read(path);
    let (h, hd, nh, nkv) = (
        c.hidden_size,
        c.head_dim,
        c.num_attention_heads,
        c.num_key_value_heads,
    );
    let embed = w.get("model.language_model.embed_tokens.weight");
    let mut xs: Vec<Vec<f64>> = ids
        .iter()
        .map(|&i| embed[i as usize * h..(i as usize + 1) * h].to_vec())
        .collect();
    for l in 0..c.num_hidden_layers {
        let p = |n: &str| format!("model.language_model.layers.{l}.{n}");
        let (wq, bq) = (
            w.get(&p("self_attn.q_proj.weight")),
            w.get(&p("self_attn.q_proj.bias")),
        );
        let (wk, bk) = (
            w.get(&p("self_attn.k_proj.weight")),
            w.get(&p("self_attn.k_proj.bias")),
        );
        let (wv, bv) = (
            w.get(&p("self_attn.v_proj.weight")),
            w.get(&p("self_attn.v_proj.bias")),
        );
        let wo = w.get(&p("self_attn.o_proj.weight"));
        let (n1, n2) = (
            w.get(&p("input_layernorm.weight")),
            w.get(&p("post_attention_layernorm.weight")),
        );
        let (wg, wu, wd) = (
            w.get(&p("mlp.gate_proj.weight")),
            w.get(&p("mlp.up_proj.weight")),
            w.get(&p("mlp.down_proj.weight")),
        );
        let mut qs = Vec::new();
        let mut ks = Vec::new();
        let mut vs = Vec::new();
        for (pos, x) in xs.iter().enumerate() {
            let n = rms_norm(x, &n1, c.rms_norm_eps);
            let mut q = linear(&wq, &n, Some(&bq));
            let mut k = linear(&wk, &n, Some(&bk));
            for head in 0..nh {
                rope(&mut q[head * hd..(head + 1) * hd], pos, hd, c.rope_theta);
            }
            for head in 0..nkv {
                rope(&mut k[head * hd..(head + 1) * hd], pos, hd, c.rope_theta);
            }
            qs.push(q);
            ks.push(k);
            vs.push(linear(&wv, &n, Some(&bv)));
        }
        for (i, x) in xs.iter_mut().enumerate() {
            let mut attn = vec![0.0; nh * hd];
            for head in 0..nh {
                let kvh = head / (nh / nkv);
                let q = &qs[i][head * hd..(head + 1) * hd];
                let scores: Vec<f64> = (0..=i)
                    .map(|j| {
                        q.iter()
                            .zip(&ks[j][kvh * hd..(kvh + 1) * hd])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let exps: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = exps.iter().sum();
                for (j, e) in exps.iter().enumerate() {
                    for d in 0..hd {
                        attn[head * hd + d] += e / total * vs[j][kvh * hd + d];
                    }
                }
            }
            let o = linear(&wo, &attn, None);
            for (a, b) in x.iter_mut().zip(&o) {
                *a += b;
            }
            let n = rms_norm(x, &n2, c.rms_norm_eps);
            let g = linear(&wg, &n, None);
            let u = linear(&wu, &n, None);
            let act: Vec<f64> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            let d = linear(&wd, &act, None);
            for (a, b) in x.iter_mut().zip(&d) {
                *a += b;
            }
        }
    }
    let norm = w.get("model.language_model.norm.weight");
    xs.iter()
        .map(|x| rms_norm(x, &norm, c.rms_norm_eps))
        .collect()
}

#[test]
fn hidden_states_match_a_float64_reference() {
    let dir = tempfile::tempdir().unwrap();
    for precision in [
        Precision::Float8Plain,
        Precision::Float8Scaled(ScaleConvention::ScaleWeight, ScaleGranularity::PerChannel),
        Precision::BF16,
    ] {
        let path = write_model(dir.path(), precision, false);
        let c = config(false);
        // 12 prompt tokens take the dequantise-and-multiply path, the 13th the fused decode path.
        let ids = [5u32, 17, 99, 3, 150, 7, 42, 8, 120, 61, 2, 77, 190];
        let want = reference(&path, &c, &ids);
        let mut engine = load(
            &path,
            &EngineOptions {
                gpu_layers: 2,
                ..EngineOptions::default()
            },
        );
        let prefill = engine
            .forward(&ids[..12])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let step = engine
            .forward(&ids[12..])
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let got: Vec<&Vec<f32>> = prefill.iter().chain(step.iter()).collect();
        let mut worst = 0.0f64;
        for (g, w) in got.iter().zip(&want) {
            for (a, b) in g.iter().zip(w) {
                worst = worst.max((*a as f64 - b).abs() / (1.0 + b.abs()));
            }
        }
        assert!(
            worst < 1e-4,
            "{precision:?}: worst relative error {worst:e}"
        );
        let norms: f64 = want.iter().flatten().map(|v| v.abs()).sum();
        assert!(norms > 1.0, "the reference is not trivially zero");
    }
}

#[test]
fn long_prompts_are_prefilled_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), Precision::Float8Plain, false);
    let options = EngineOptions {
        gpu_layers: 2,
        ..EngineOptions::default()
    };
    let ids: Vec<u32> = (0..520).map(|i| (i * 7 % 200) as u32).collect();
    let mut engine = load(&path, &options);
    let whole = values(&engine.forward(&ids).unwrap());
    engine.reset();
    let mut split = values(&engine.forward(&ids[..512]).unwrap());
    split.extend(values(&engine.forward(&ids[512..]).unwrap()));
    assert_eq!(whole.len(), 520 * 64);
    assert!(whole == split, "one call must equal 512 + 8 tokens");
}

#[test]
fn a_batch_decodes_each_sequence_as_if_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_model(dir.path(), Precision::Float8Plain, false);
    let options = EngineOptions {
        gpu_layers: 1,
        ..EngineOptions::default()
    };
    let prompts: [&[u32]; 3] = [
        &[5, 17, 99, 3, 150, 1, 2, 3, 4, 5],
        &[9, 8, 7, 6, 5, 4, 3, 2, 1, 0],
        &[1; 10],
    ];
    let mut engine = load(&path, &options);
    let batched = engine.forward_batch(&prompts).unwrap();
    let step = engine.forward_batch(&[&[7], &[8], &[9]]).unwrap();
    assert_eq!(batched.dims(), [3, 10, 64]);
    for (i, prompt) in prompts.iter().enumerate() {
        engine.reset();
        let alone = values(&engine.forward(prompt).unwrap());
        let alone_step = values(&engine.forward(&[7 + i as u32]).unwrap());
        let worst = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max)
        };
        assert!(
            worst(&alone, &values(&batched.get(i).unwrap())) < 1e-5,
            "prefill row {i}"
        );
        assert!(
            worst(&alone_step, &values(&step.get(i).unwrap())) < 1e-5,
            "decode row {i}"
        );
    }
    let e = engine.forward_batch(&[&[1, 2], &[3]]).unwrap_err();
    assert!(format!("{e:#}").contains("same length"));
}
