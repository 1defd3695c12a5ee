//! Shared by the engine tests (CPU, in CI) and the GPU tests: an independent float64 Qwen2
//! written here from the file, and a "massive activation" checkpoint with the value ranges of
//! real Qwen2 models.
#![allow(dead_code)] // each test crate uses its own part

pub mod cli;
pub mod tiny;

use std::path::Path;
use vibeoffload::arch::config::ModelConfig;

/// Tensors read straight from the safetensors file and decoded here, not by the library.
pub struct Weights {
    header: serde_json::Map<String, serde_json::Value>,
    data: Vec<u8>,
}

impl Weights {
    pub fn read(path: &Path) -> Weights {
        let bytes = std::fs::read(path).unwrap();
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        Weights {
            header: serde_json::from_slice(&bytes[8..8 + n]).unwrap(),
            data: bytes[8 + n..].to_vec(),
        }
    }

    /// Writes the (edited) tensors back as a safetensors file, back to back in data order
    /// (bytes a replaced tensor left behind are dropped, as any safetensors writer would).
    pub fn save(&self, path: &Path) {
        let mut names: Vec<&String> = self
            .header
            .keys()
            .filter(|k| *k != "__metadata__")
            .collect();
        names.sort_by_key(|k| self.range(k).0.start);
        let mut header = self.header.clone();
        let mut data = Vec::with_capacity(self.data.len());
        for name in names {
            let (range, _) = self.range(name);
            let start = data.len();
            data.extend_from_slice(&self.data[range]);
            header[name.as_str()]["data_offsets"] = serde_json::json!([start, data.len()]);
        }
        let header = serde_json::to_vec(&header).unwrap();
        let length = (header.len() as u64).to_le_bytes();
        std::fs::write(path, [&length[..], &header, &data].concat()).unwrap();
    }

    /// Appends a tensor of `dtype` ("F32", "F8_E4M3", ...) and `shape` holding `bytes`.
    pub fn add(&mut self, name: &str, dtype: &str, shape: &[usize], bytes: &[u8]) {
        let start = self.data.len();
        self.data.extend_from_slice(bytes);
        self.header.insert(
            name.to_string(),
            serde_json::json!({
                "dtype": dtype,
                "shape": shape,
                "data_offsets": [start, self.data.len()],
            }),
        );
    }

    pub fn has(&self, name: &str) -> bool {
        self.header.contains_key(name)
    }

    fn range(&self, name: &str) -> (std::ops::Range<usize>, &str) {
        let t = &self.header[name];
        let start = t["data_offsets"][0].as_u64().unwrap() as usize;
        let end = t["data_offsets"][1].as_u64().unwrap() as usize;
        (start..end, t["dtype"].as_str().unwrap())
    }

    /// Values as stored (float8 codes decoded, no scale applied), row-major.
    pub fn raw(&self, name: &str) -> Vec<f64> {
        let (range, dtype) = self.range(name);
        let b = &self.data[range];
        match dtype {
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
        }
    }

    /// Replaces a tensor's values; each must be exact in its dtype (float8 values among the
    /// codes' values, bf16 values with 8 significant bits).
    pub fn set_raw(&mut self, name: &str, values: &[f64]) {
        let (range, dtype) = self.range(name);
        let dtype = dtype.to_string();
        let bytes: Vec<u8> = match dtype.as_str() {
            "F8_E4M3" => values
                .iter()
                .map(|&v| {
                    if v.is_nan() {
                        return 0x7f;
                    }
                    (0..=255u8)
                        .find(|&c| f8(c) == v && !(v == 0.0 && c != 0))
                        .unwrap_or_else(|| panic!("{v} is not a float8 E4M3 value"))
                })
                .collect(),
            "BF16" => values
                .iter()
                .flat_map(|&v| {
                    let bits = (v as f32).to_bits();
                    assert_eq!(bits & 0xffff, 0, "{v} is not a bf16 value");
                    ((bits >> 16) as u16).to_le_bytes()
                })
                .collect(),
            "F32" => values
                .iter()
                .flat_map(|&v| (v as f32).to_le_bytes())
                .collect(),
            other => panic!("{other}"),
        };
        assert_eq!(bytes.len(), range.len(), "{name}: wrong number of values");
        self.data[range].copy_from_slice(&bytes);
    }

    /// Edits a tensor's stored values in place.
    pub fn edit(&mut self, name: &str, f: impl FnOnce(&mut Vec<f64>)) {
        let mut v = self.raw(name);
        f(&mut v);
        self.set_raw(name, &v);
    }

    /// Values as f64, row-major; with `.scale_weight` applied per row when present.
    pub fn get(&self, name: &str) -> Vec<f64> {
        let mut v = self.raw(name);
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

/// Splits the checkpoint `dir/m.safetensors` into `n` shards and an index, as Hugging Face
/// writes them, and removes it; config.json stays.
pub fn shard(dir: &Path, n: usize) {
    let path = dir.join("m.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + len]).unwrap();
    let data = &bytes[8 + len..];
    let offsets = |v: &serde_json::Value| {
        let o = v["data_offsets"].as_array().unwrap();
        (
            o[0].as_u64().unwrap() as usize,
            o[1].as_u64().unwrap() as usize,
        )
    };
    let mut names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
    names.sort_by_key(|k| offsets(&header[*k]).0);
    let mut weight_map = serde_json::Map::new();
    for (i, group) in names.chunks(names.len().div_ceil(n)).enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        let (mut shard_header, mut shard_data) = (serde_json::Map::new(), Vec::new());
        for &name in group {
            let (start, end) = offsets(&header[name]);
            let mut entry = header[name].clone();
            entry["data_offsets"] =
                serde_json::json!([shard_data.len(), shard_data.len() + end - start]);
            shard_data.extend_from_slice(&data[start..end]);
            shard_header.insert(name.clone(), entry);
            weight_map.insert(name.clone(), file.clone().into());
        }
        let json = serde_json::to_vec(&shard_header).unwrap();
        let mut out = (json.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&json);
        out.extend_from_slice(&shard_data);
        std::fs::write(dir.join(&file), out).unwrap();
    }
    let index =
        serde_json::json!({"metadata": {"total_size": data.len()}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    std::fs::remove_file(path).unwrap();
}

pub fn f8(code: u8) -> f64 {
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

/// The largest magnitudes a reference pass met.
#[derive(Clone, Copy, Debug, Default)]
pub struct Peaks {
    /// MLP intermediate, `silu(gate) * up`.
    pub mlp: f64,
    /// Residual stream.
    pub residual: f64,
    /// Attention logit (scaled score).
    pub logit: f64,
}

/// Final-normed hidden states of `ids` from an empty cache, and the peaks on the way.
pub fn reference(path: &Path, c: &ModelConfig, ids: &[u32]) -> (Vec<Vec<f64>>, Peaks) {
    let w = Weights::read(path);
    let mut peaks = Peaks::default();
    let peak = |p: &mut f64, v: &[f64]| *p = v.iter().fold(*p, |m, x| m.max(x.abs()));
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
                peak(&mut peaks.logit, &scores);
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
            peak(&mut peaks.mlp, &act);
            let d = linear(&wd, &act, None);
            for (a, b) in x.iter_mut().zip(&d) {
                *a += b;
            }
            peak(&mut peaks.residual, x);
        }
    }
    let norm = w.get("model.language_model.norm.weight");
    let out = xs
        .iter()
        .map(|x| rms_norm(x, &norm, c.rms_norm_eps))
        .collect();
    (out, peaks)
}

/// Sets element `index` of tensor `name` in the checkpoint at `path` to NaN.
pub fn poison(path: &Path, name: &str, index: usize) {
    let mut w = Weights::read(path);
    w.edit(name, |v| v[index] = f64::NAN);
    w.save(path);
}

/// Token ids whose embedding carries the massive channel in [`make_massive`].
pub fn is_sink(id: u32) -> bool {
    id % 4 == 1
}

/// Turns a synthesized checkpoint with per-channel `scale_weight` scales (at least 2 layers,
/// hidden >= 8, intermediate > 30) into one with what real Qwen2 models show, for the tokens
/// that [`is_sink`] picks (real models have them at the first token and delimiters):
/// - their embedding carries channel 1 at 4.0, and layer 0's gate and up read only that
///   channel for four intermediate channels, with scales that make `silu(gate) * up` ~1e5;
/// - layer 0's down projection adds those four, and only them, into residual channel 2
///   (~3e4), and them nowhere else;
/// - layer 1's first query head and key head read only channel 2, for attention logits in
///   the hundreds between such tokens.
pub fn make_massive(path: &Path, c: &ModelConfig) {
    const CARRIER: usize = 1;
    const MASSIVE: usize = 2;
    let picked = [3usize, 10, 20, 30];
    let (h, i, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let one = 1.0; // float8 code 0x38
    let mut w = Weights::read(path);
    let p = |l: usize, n: &str| format!("model.language_model.layers.{l}.{n}");
    w.edit("model.language_model.embed_tokens.weight", |e| {
        for id in 0..c.vocab_size {
            if is_sink(id as u32) {
                e[id * h + CARRIER] = 4.0;
            }
        }
    });
    // Attention leaves the carrier alone; the MLP's norm passes it at 1.
    w.edit(&p(0, "self_attn.o_proj.weight"), |o| {
        o[CARRIER * h..(CARRIER + 1) * h].fill(0.0)
    });
    w.edit(&p(0, "post_attention_layernorm.weight"), |n| {
        n[CARRIER] = 1.0
    });
    // The normalised carrier is about sqrt(hidden) for a sink token.
    let gain = (1e5f64).sqrt() / (h as f64).sqrt();
    for name in ["mlp.gate_proj", "mlp.up_proj"] {
        w.edit(&p(0, &format!("{name}.weight")), |g| {
            for &j in &picked {
                g[j * h..(j + 1) * h].fill(0.0);
                g[j * h + CARRIER] = one;
            }
        });
        w.edit(&p(0, &format!("{name}.scale_weight")), |s| {
            for &j in &picked {
                s[j] = gain;
            }
        });
    }
    w.edit(&p(0, "mlp.down_proj.weight"), |d| {
        d[MASSIVE * i..(MASSIVE + 1) * i].fill(0.0);
        for r in 0..h {
            for &j in &picked {
                d[r * i + j] = if r == MASSIVE { one } else { 0.0 };
            }
        }
    });
    w.edit(&p(0, "mlp.down_proj.scale_weight"), |s| s[MASSIVE] = 0.075);
    // Layer 1: query head 0 and key head 0 read the massive channel alone.
    let gain = (300.0 * (hd as f64).sqrt() / (h * hd) as f64).sqrt();
    for name in ["self_attn.q_proj", "self_attn.k_proj"] {
        w.edit(&p(1, &format!("{name}.weight")), |q| {
            for r in 0..hd {
                q[r * h..(r + 1) * h].fill(0.0);
                q[r * h + MASSIVE] = one;
            }
        });
        w.edit(&p(1, &format!("{name}.scale_weight")), |s| {
            s[..hd].fill(gain)
        });
    }
    w.save(path);
}

/// The worst over rows of `max |got - want| / max |want|`: relative to each row's scale, so
/// tiny entries beside a massive one are judged by the row, not by themselves.
pub fn worst_row_error<G: Copy + Into<f64>>(got: &[Vec<G>], want: &[Vec<f64>]) -> f64 {
    assert_eq!(got.len(), want.len(), "row counts differ");
    got.iter()
        .zip(want)
        .map(|(g, w)| {
            assert_eq!(g.len(), w.len());
            let scale = w.iter().fold(0.0f64, |m, v| m.max(v.abs()));
            let err = g
                .iter()
                .zip(w)
                .fold(0.0f64, |m, (a, b)| m.max(((*a).into() - b).abs()));
            // NaN compares false everywhere: make it the worst error.
            if err.is_nan() || g.iter().any(|a| !(*a).into().is_finite()) {
                f64::INFINITY
            } else {
                err / scale
            }
        })
        .fold(0.0, f64::max)
}
