//! The sampler's classifier-free-guided DPM-Solver++ step as one op ([`DpmStep`]): its CPU
//! reference (plain f32 arithmetic, rounding to the activation dtype where the unfused ops
//! would) and candle glue; its CUDA kernel is in `engine/cuda/kernels/speech.cu`.

use super::fused::round;
use crate::engine::dequant::{cpu_activations, cpu_storage};
use crate::engine::ops::DpmStep;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape};

impl DpmStep {
    /// `(B, L)` of `x`, checked against `v` `[2B, L]` and `prev` `[B, L]`, all contiguous;
    /// the dtype f32 or bf16.
    pub(crate) fn check(
        &self,
        dtype: DType,
        v: &Layout,
        x: &Layout,
        prev: &Layout,
    ) -> candle_core::Result<(usize, usize)> {
        let &[batch, len] = x.dims() else {
            candle_core::bail!("dpm step: the sample must be [B, L], got {:?}", x.dims());
        };
        if v.dims() != [2 * batch, len] || prev.dims() != [batch, len] {
            candle_core::bail!(
                "dpm step: v {:?} and prev {:?} for a sample {:?}",
                v.dims(),
                prev.dims(),
                x.dims()
            );
        }
        if [v, x, prev].iter().any(|l| !l.is_contiguous()) {
            candle_core::bail!("dpm step: operands must be contiguous");
        }
        if !matches!(dtype, DType::F32 | DType::BF16) {
            candle_core::bail!("dpm step: cannot step {dtype:?}");
        }
        Ok((batch, len))
    }

    /// The next sample and the data prediction of one element, from its conditional and
    /// unconditional v, its sample and its previous data prediction.
    fn element(&self, (vc, vu): (f32, f32), x: f32, prev: f32, bf16: bool) -> (f32, f32) {
        let d = round(vc - vu, bf16);
        let g = round(vu + round(d * self.cfg, bf16), bf16);
        let x0 = round(x * self.alpha - g * self.sigma, bf16);
        let mut next = x * self.a - x0 * self.b;
        if let Some((r_inv, half_b)) = self.second {
            next -= ((x0 - prev) * r_inv) * half_b;
        }
        (next, x0)
    }
}

impl CustomOp3 for DpmStep {
    fn name(&self) -> &'static str {
        "vibeoffload-dpm-step"
    }

    fn cpu_fwd(
        &self,
        v: &CpuStorage,
        lv: &Layout,
        x: &CpuStorage,
        lx: &Layout,
        prev: &CpuStorage,
        lp: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (xs, bf16) = cpu_activations(x)?;
        let dtype = if bf16 { DType::BF16 } else { DType::F32 };
        let (batch, len) = self.check(dtype, lv, lx, lp)?;
        let (vs, v_bf16) = cpu_activations(v)?;
        let (ps, p_bf16) = cpu_activations(prev)?;
        if v_bf16 != bf16 || p_bf16 != bf16 {
            candle_core::bail!("dpm step: v, x and prev must share one dtype");
        }
        let n = batch * len;
        let at = |values: &[f32], l: &Layout, i: usize| values[l.start_offset() + i];
        let mut next = Vec::with_capacity(2 * n);
        let mut x0 = Vec::with_capacity(n);
        for i in 0..n {
            let (a, b) = self.element(
                (at(&vs, lv, i), at(&vs, lv, n + i)),
                at(&xs, lx, i),
                at(&ps, lp, i),
                bf16,
            );
            next.push(a);
            x0.push(b);
        }
        next.extend(x0);
        Ok((cpu_storage(next, bf16), Shape::from((2, batch, len))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        v: &candle_core::CudaStorage,
        lv: &Layout,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        prev: &candle_core::CudaStorage,
        lp: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::engine::cuda::dpm_step(self, (v, lv), (x, lx), (prev, lp))
    }
}
