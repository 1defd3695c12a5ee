//! The KV cache: one buffer per layer holding its keys and values, `[2, batch, kv_heads,
//! max_len, head_dim]`, allocated at full length on first use (as `plan::memory` counts it).
//! New keys and values are stored by one op straight from the fused q/k/v projection, the keys
//! rotated (RoPE) on the way, so decoding spends one launch here.

use super::dequant::cpu_activations;
use super::ops::StoreKv;
use crate::arch::config::ModelConfig;
use crate::plan::memory;
use candle_core::{CpuStorage, InplaceOp3, Layout, Result, Tensor};

impl StoreKv {
    /// Index of key element `i` of (`b`, `h`, position `p`) in the buffer; values follow all
    /// keys.
    fn index(&self, b: usize, h: usize, p: usize, i: usize) -> usize {
        ((b * self.kv_heads + h) * self.max_len + p) * self.head_dim + i
    }

    /// The rotated key pair and raw value pair `(i, i + half)` for (`b`, token `t`, `h`).
    fn pairs(
        &self,
        qkv: &[f32],
        table: &[f32],
        b: usize,
        t: usize,
        h: usize,
        i: usize,
    ) -> [f32; 4] {
        let d = self.head_dim;
        let half = d / 2;
        let row = (b * self.tokens + t) * (self.heads + 2 * self.kv_heads) * d;
        let k = &qkv[row + (self.heads + h) * d..][..d];
        let v = &qkv[row + (self.heads + self.kv_heads + h) * d..][..d];
        let cs = &table[(self.pos + t) * d..][..d];
        let (c, s) = (cs[i], cs[half + i]);
        [
            k[i] * c - k[i + half] * s,
            k[i + half] * c + k[i] * s,
            v[i],
            v[i + half],
        ]
    }
}

impl InplaceOp3 for StoreKv {
    fn name(&self) -> &'static str {
        "vibeoffload-store-kv"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        _dst_l: &Layout,
        qkv: &CpuStorage,
        lq: &Layout,
        table: &CpuStorage,
        lt: &Layout,
    ) -> Result<()> {
        let (qkv, _) = cpu_activations(qkv)?;
        let (table, _) = cpu_activations(table)?;
        let (Some((qa, qb)), Some((ta, tb))) = (lq.contiguous_offsets(), lt.contiguous_offsets())
        else {
            candle_core::bail!("store kv: q/k/v and the rotary table must be contiguous");
        };
        let (qkv, table) = (&qkv[qa..qb], &table[ta..tb]);
        let half = self.head_dim / 2;
        let values_at = self.batch * self.kv_heads * self.max_len * self.head_dim;
        let write = |set: &mut dyn FnMut(usize, f32)| {
            for b in 0..self.batch {
                for t in 0..self.tokens {
                    for h in 0..self.kv_heads {
                        for i in 0..half {
                            let [k0, k1, v0, v1] = self.pairs(qkv, table, b, t, h, i);
                            let at = self.index(b, h, self.pos + t, i);
                            set(at, k0);
                            set(at + half, k1);
                            set(values_at + at, v0);
                            set(values_at + at + half, v1);
                        }
                    }
                }
            }
        };
        match dst {
            CpuStorage::F32(out) => write(&mut |i, x| out[i] = x),
            CpuStorage::BF16(out) => write(&mut |i, x| out[i] = half::bf16::from_f32(x)),
            _ => candle_core::bail!("store kv: the cache must be f32 or bf16"),
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        dst: &mut candle_core::CudaStorage,
        _dst_l: &Layout,
        qkv: &candle_core::CudaStorage,
        lq: &Layout,
        table: &candle_core::CudaStorage,
        lt: &Layout,
    ) -> Result<()> {
        super::cuda::store_kv(self, dst, qkv, lq, table, lt)
    }
}

/// One sequence's keys and values: a cache per decoder layer and how many positions are
/// filled. The engine holds one lane per sequence it keeps (VibeVoice's positive and negative
/// passes are two lanes with their own lengths).
#[derive(Debug)]
pub struct Lane {
    /// A cache per decoder layer.
    pub caches: Vec<KvCache>,
    /// Positions filled.
    pub position: usize,
}

impl Lane {
    /// An empty lane for `config`'s layers, up to `max_len` positions.
    pub fn new(config: &ModelConfig, max_len: usize) -> Lane {
        Lane {
            caches: (0..config.num_hidden_layers)
                .map(|_| KvCache::new(config, max_len))
                .collect(),
            position: 0,
        }
    }

    /// Bytes its caches hold on `device` (those of host-computed layers live elsewhere).
    pub fn bytes_on(&self, device: &candle_core::Device) -> u64 {
        self.caches
            .iter()
            .filter(|c| {
                c.buffer
                    .as_ref()
                    .is_some_and(|b| b.device().same_device(device))
            })
            .map(KvCache::bytes)
            .sum()
    }
}

/// One layer's keys and values.
#[derive(Debug)]
pub struct KvCache {
    buffer: Option<Tensor>,
    config: ModelConfig,
    max_len: usize,
}

impl KvCache {
    /// An empty cache of a layer of `config` for up to `max_len` positions (allocated on
    /// first use, shaped by `plan::memory::kv_cache_shape` as the estimate is, and kept: the
    /// engine's position says how much of it is filled).
    pub fn new(config: &ModelConfig, max_len: usize) -> KvCache {
        KvCache {
            buffer: None,
            config: config.clone(),
            max_len,
        }
    }

    /// Stores the keys and values of `qkv` (`[b, t, (heads + 2 x kv_heads) x d]`) at `pos`,
    /// keys rotated with `rope_table`, and returns keys and values up to `pos + t` as views
    /// `[b, kv_heads, pos + t, d]`.
    pub fn store(
        &mut self,
        qkv: &Tensor,
        rope_table: &Tensor,
        pos: usize,
    ) -> Result<(Tensor, Tensor)> {
        let c = &self.config;
        let (heads, kv_heads, head_dim) =
            (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let (b, t, _) = qkv.dims3()?;
        if pos + t > self.max_len {
            candle_core::bail!(
                "the KV cache holds {} positions, not {}",
                self.max_len,
                pos + t
            );
        }
        let buffer = self.buffer_for(b, qkv)?;
        let op = StoreKv {
            heads,
            kv_heads,
            head_dim,
            batch: b,
            tokens: t,
            pos,
            max_len: self.max_len,
        };
        buffer.inplace_op3(&qkv.contiguous()?, rope_table, &op)?;
        let part = |i: usize| buffer.get(i)?.narrow(2, 0, pos + t);
        Ok((part(0)?, part(1)?))
    }

    /// The buffer (one sequence, `[2, 1, kv_heads, max_len, d]`, allocated like `like` if
    /// there is none) for a decode step whose new token is at `pos`, which it must hold: the
    /// store and the attention then run as one op ([`super::ops::StepAttention`]).
    pub fn step_buffer(&mut self, like: &Tensor, pos: usize) -> Result<Tensor> {
        if pos >= self.max_len {
            candle_core::bail!(
                "the KV cache holds {} positions, not {}",
                self.max_len,
                pos + 1
            );
        }
        self.buffer_for(1, like)
    }

    /// The buffer for `b` sequences, allocated at full length in `like`'s dtype and on its
    /// device when there is none of that shape yet.
    fn buffer_for(&mut self, b: usize, like: &Tensor) -> Result<Tensor> {
        let shape =
            candle_core::Shape::from(&memory::kv_cache_shape(&self.config, b, self.max_len));
        Ok(match &self.buffer {
            Some(buf) if buf.shape() == &shape => buf.clone(),
            _ => {
                let buf = Tensor::zeros(shape, like.dtype(), like.device())?;
                self.buffer = Some(buf.clone());
                buf
            }
        })
    }

    /// Keys and values of positions `from..to`, `[2, b, kv_heads, to - from, d]`, as stored.
    pub fn positions(&self, from: usize, to: usize) -> Result<Tensor> {
        match &self.buffer {
            Some(b) => b.narrow(3, from, to - from)?.contiguous(),
            None => candle_core::bail!("the KV cache holds no positions yet"),
        }
    }

    /// Writes `rows` (`[2, b, kv_heads, t, d]` of keys and values, the buffer's dtype once it
    /// has one) at position `at`, allocating the buffer on `rows`' device first if needed.
    pub fn write_positions(&mut self, rows: &Tensor, at: usize) -> Result<()> {
        let buffer = self.buffer_for(rows.dim(1)?, rows)?;
        buffer.slice_set(&rows.to_dtype(buffer.dtype())?.contiguous()?, 3, at)
    }

    /// Device bytes the buffer takes (0 before first use).
    pub fn bytes(&self) -> u64 {
        self.buffer
            .as_ref()
            .map_or(0, |b| (b.elem_count() * b.dtype().size_in_bytes()) as u64)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::Device;

    /// A q/k/v row `[b, t, (heads + 2 kv) d]` of smooth values and a rotary table for `max`
    /// positions, with its cosines and sines apart.
    pub(crate) fn qkv_and_rope(
        (b, t, heads, kv, d, max): (usize, usize, usize, usize, usize, usize),
    ) -> (Tensor, Tensor, Tensor, Tensor) {
        let dev = Device::Cpu;
        let width = (heads + 2 * kv) * d;
        let qkv = Tensor::arange(0f32, (b * t * width) as f32, &dev)
            .and_then(|x| x.affine(0.37, -0.5))
            .and_then(|x| x.sin())
            .and_then(|x| x.reshape((b, t, width)))
            .unwrap();
        let half = d / 2;
        let angles: Vec<f32> = (0..max)
            .flat_map(|p| (0..half).map(move |i| p as f32 * 0.5f32.powi(i as i32)))
            .collect();
        let angles = Tensor::from_vec(angles, (max, half), &dev).unwrap();
        let (cos, sin) = (angles.cos().unwrap(), angles.sin().unwrap());
        let table = Tensor::cat(&[&cos, &sin], 1).unwrap();
        (qkv, table, cos, sin)
    }

    /// Largest |a - b| of two f32 tensors of one shape.
    pub(crate) fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .unwrap()
    }

    /// A configuration with these attention dimensions (the rest does not matter here).
    pub(crate) fn config(heads: usize, kv_heads: usize, head_dim: usize) -> ModelConfig {
        ModelConfig {
            hidden_size: heads * head_dim,
            intermediate_size: 1,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            num_hidden_layers: 1,
            vocab_size: 1,
            rope_theta: 1e4,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: false,
            max_position_embeddings: 32768,
        }
    }

    #[test]
    fn stores_rotated_keys_and_values_at_the_position() {
        let (b, t, heads, kv, d, max) = (2, 3, 4, 2, 8, 10);
        let (qkv, table, cos, sin) = qkv_and_rope((b, t, heads, kv, d, max));
        let mut cache = KvCache::new(&config(heads, kv, d), max);
        let pos = 4;
        let (k, v) = cache.store(&qkv, &table, pos).unwrap();
        assert_eq!(k.dims(), [b, kv, pos + t, d]);
        assert_eq!(cache.bytes(), (2 * b * kv * max * d * 4) as u64);
        let part = |start: usize| {
            qkv.narrow(2, start * d, kv * d)
                .and_then(|x| x.reshape((b, t, kv, d)))
                .and_then(|x| x.transpose(1, 2))
                .and_then(|x| x.contiguous())
                .unwrap()
        };
        let rotated = candle_nn::rotary_emb::rope(
            &part(heads),
            &cos.narrow(0, pos, t).unwrap(),
            &sin.narrow(0, pos, t).unwrap(),
        )
        .unwrap();
        assert!(max_diff(&k.narrow(2, pos, t).unwrap(), &rotated) < 1e-6);
        assert!(max_diff(&v.narrow(2, pos, t).unwrap(), &part(heads + kv)) < 1e-6);
        // The positions before stay as they were (never written: zero).
        let before = k.narrow(2, 0, pos).unwrap();
        assert_eq!(max_diff(&before, &before.zeros_like().unwrap()), 0.0);
    }
}
