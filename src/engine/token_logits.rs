//! Logits of a few tokens: speech generation reads four of the vocabulary's logits per step,
//! so the LM head's rows of those tokens are gathered once and multiplied alone instead of
//! the whole head. Each output of the fused matvec depends only on its own weight row and x,
//! so the logits are those of the whole head, bit for bit.

use super::dequant::{dequantize, RawTensor};
use super::ops::TILE_ROWS;
use super::weights::Linear;
use super::{matvec, model, Engine};
use crate::plan::memory;
use anyhow::{bail, Result};
use candle_core::{DType, Tensor};

/// The LM head's rows of some tokens, kept by the engine for the next call with those ids.
pub(super) struct HeadRows {
    ids: Vec<u32>,
    head: Linear,
}

impl Engine {
    /// Logits (f32) of the tokens `ids` only, in their order: `[ids.len()]` for `[hidden]`,
    /// `[rows, ids.len()]` for `[rows, hidden]`; bit-identical to [`Engine::logits`]'
    /// columns of `ids`, and checked by the watch as the LM head. A float8 head the fused
    /// matvec takes gives its rows of `ids` once (a few rows' copy, kept on the device until
    /// other ids are asked for); any other head computes every logit and selects.
    pub fn token_logits(&mut self, hidden: &Tensor, ids: &[u32]) -> Result<Tensor> {
        let vocab = self.head.weight.shape[0];
        if ids.is_empty() {
            bail!("no token ids to compute logits of");
        }
        if let Some(id) = ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("token id {id} is outside the LM head's {vocab} rows");
        }
        let x = match hidden.rank() {
            1 => hidden.unsqueeze(0)?,
            _ => hidden.clone(),
        };
        let head = &self.head;
        let logits = if matvec::applies(&x, &head.weight, head.scale.as_ref())? {
            if self.head_rows.as_ref().is_none_or(|r| r.ids != ids) {
                let head = gather_rows(head, ids)?;
                self.head_rows = Some(HeadRows {
                    ids: ids.to_vec(),
                    head,
                });
            }
            let rows = &self.head_rows.as_ref().expect("gathered above").head;
            let chunk = memory::LM_HEAD_CHUNK_ROWS as usize;
            model::lm_head(&x, rows, chunk, &self.watch)?.narrow(1, 0, ids.len())?
        } else {
            let all = self.queue_logits(&x)?;
            all.index_select(&Tensor::new(ids, all.device())?, 1)?
        };
        self.take_watch()?;
        Ok(match hidden.rank() {
            1 => logits.squeeze(0)?,
            _ => logits,
        })
    }
}

/// `head`'s rows of `ids` (their float8 bytes, and their scales if the head has one per
/// row), on the head's device, zero rows after them up to a multiple of [`TILE_ROWS`] (the
/// fused matvec's output tiles on the GPU).
fn gather_rows(head: &Linear, ids: &[u32]) -> Result<Linear> {
    let rows = head.weight.shape[0];
    let padded = ids.len().next_multiple_of(TILE_ROWS);
    let device = head.weight.bytes.device();
    let index = Tensor::new(ids, device)?;
    let pick = |raw: &RawTensor| -> Result<RawTensor> {
        let width = raw.bytes.elem_count() / rows;
        let mut bytes = raw.bytes.reshape((rows, width))?.index_select(&index, 0)?;
        if padded > ids.len() {
            let zeros = Tensor::zeros((padded - ids.len(), width), DType::U8, device)?;
            bytes = Tensor::cat(&[bytes, zeros], 0)?;
        }
        let mut shape = raw.shape.clone();
        shape[0] = padded;
        Ok(RawTensor {
            dtype: raw.dtype,
            shape,
            bytes: bytes.flatten_all()?,
        })
    };
    let weight = pick(&head.weight)?;
    let per_row = |s: &RawTensor| s.shape.iter().product::<usize>() == rows;
    Ok(match &head.scale {
        Some(s) if per_row(s) => {
            let scale = pick(s)?;
            Linear {
                weight,
                scale_f32: Some(dequantize(&scale, None, DType::F32)?.flatten_all()?),
                scale: Some(scale),
            }
        }
        _ => Linear {
            weight,
            ..head.clone()
        },
    })
}
