//! The MiSS adapter for Linear layers (PEFT's `tuners/miss/layer.py`).
//!
//! One bare parameter per layer, `miss_block`:
//!
//! | form | shape | forward | merge |
//! |---|---|---|---|
//! | default (`init_weights` `true` / `false`) | `[r, out]` | `h + (Σ_b x_b)·M`, `x_b` the input's blocks of `r` (zero-padded to a multiple of `r`) | `W[o, b·r + k] += M[k, o]` (the last, partial block takes the first columns of `M`) |
//! | `"mini"` | `[r, mini_r]` | as default with `M` tiled `out/mini_r` times across the outputs | as default |
//! | `"bat"` | `[out/r, r, r]` | `x·(W + ΔW)ᵀ + b`, `ΔW_blk = W_blk·B + B` for every `r×r` block of the frozen `W` | `W' = W + ΔW(W)`; unmerge `W = (W' − B)·(I + B)⁻¹` blockwise, as PEFT |
//!
//! The default and `"mini"` forms are additive; `"bat"` is not. Several active `"bat"` adapters on one layer
//! are refused in the forward (PEFT computes each one's update from the weight the previous one changed);
//! merging them in turn is exact. `miss_dropout` drops the (padded) input in training, as PEFT.

use super::config::{MissConfig, MissMode};
use crate::layer::{Adapter, BaseKind, BaseLayer, CallCtx, MergeInput, Merged, NamedTensor, check_shape};
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;

/// The only tensor key of a MiSS adapter.
pub const MISS_BLOCK: &str = "miss_block";

/// The parameter names of MiSS's tensors in a file.
pub const PARAM_PREFIXES: &[&str] = &[MISS_BLOCK];

/// One MiSS adapter inside one Linear layer (an f32 `Var`; the dtype it was created or loaded in is kept for
/// saving).
#[derive(Debug)]
pub struct MissAdapter {
    mode: MissMode,
    n_in: usize,
    n_out: usize,
    mini_r: usize,
    block: Var,
    dropout: f64,
    saved_dtype: DType,
}

fn dims(base: &BaseLayer) -> Result<(usize, usize)> {
    match base.kind() {
        BaseKind::Linear => Ok((base.in_features(), base.out_features())),
        other => Err(PeftError::Unsupported {
            field: "target_modules".into(),
            value: format!("a {other:?} layer"),
            reason: "MiSS supports only Linear layers (as PEFT)".into(),
        }),
    }
}

/// The block's shape for `config` on a layer `[out, in]`, with PEFT's divisibility checks.
fn block_shape(config: &MissConfig, n_in: usize, n_out: usize) -> Result<Vec<usize>> {
    let r = config.r;
    Ok(match config.mode()? {
        MissMode::Miss { .. } => vec![r, n_out],
        MissMode::Bat => {
            if !n_in.is_multiple_of(r) || !n_out.is_multiple_of(r) {
                return Err(PeftError::InvalidConfig(format!(
                    "MiSS \"bat\": the weight matrix ([{n_out}, {n_in}]) must be fully divisible into [r, r] = \
                     [{r}, {r}] blocks"
                )));
            }
            vec![n_out / r, r, r]
        }
        MissMode::Mini => {
            if !n_out.is_multiple_of(config.mini_r) {
                return Err(PeftError::InvalidConfig(format!(
                    "MiSS \"mini\": out_features ({n_out}) must be divisible by mini_r ({})",
                    config.mini_r
                )));
            }
            vec![r, config.mini_r]
        }
    })
}

impl MissAdapter {
    /// A freshly initialised adapter: a zero block (the identity), or for `init_weights = false` a
    /// Kaiming-uniform `[r, out]` block as PEFT.
    pub fn new(base: &BaseLayer, config: &MissConfig, rng: &mut PeftRng) -> Result<Self> {
        let (n_in, n_out) = dims(base)?;
        let shape = block_shape(config, n_in, n_out)?;
        let dev = base.device();
        let mode = config.mode()?;
        let block = match mode {
            MissMode::Miss { zero: false } => {
                // torch's kaiming_uniform_(a=√5) on [r, out]: U(−1/√out, 1/√out)
                let b = 1.0 / (n_out as f64).sqrt();
                rng.uniform_tensor(shape.as_slice(), -b, b, DType::F32, dev)?
            }
            _ => Tensor::zeros(shape.as_slice(), DType::F32, dev)?,
        };
        Ok(Self {
            mode,
            n_in,
            n_out,
            mini_r: config.mini_r,
            block: Var::from_tensor(&block)?,
            dropout: config.miss_dropout,
            saved_dtype: DType::F32,
        })
    }

    /// An adapter from tensors as PEFT saves them (keys relative to the module, adapter name stripped):
    /// exactly one key, `miss_block`, of the form's shape.
    pub fn from_tensors(
        base: &BaseLayer,
        config: &MissConfig,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        let (n_in, n_out) = dims(base)?;
        let shape = block_shape(config, n_in, n_out)?;
        let t = tensors
            .get(MISS_BLOCK)
            .ok_or_else(|| PeftError::MissingKey(MISS_BLOCK.to_string()))?;
        check_shape(MISS_BLOCK, t, &shape)?;
        let extra: Vec<String> = tensors.keys().filter(|k| *k != MISS_BLOCK).cloned().collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        Ok(Self {
            mode: config.mode()?,
            n_in,
            n_out,
            mini_r: config.mini_r,
            block: Var::from_tensor(&t.to_dtype(DType::F32)?)?,
            dropout: config.miss_dropout,
            saved_dtype: t.dtype(),
        })
    }

    fn r(&self) -> usize {
        let d = self.block.as_tensor().dims();
        match self.mode {
            MissMode::Bat => d[2],
            _ => d[0],
        }
    }

    /// The `[r, out]` block of the default and `"mini"` forms (`"mini"`: tiled across the outputs).
    fn wide_block(&self, n_out: usize) -> Result<Tensor> {
        let m = self.block.as_tensor();
        Ok(match self.mode {
            MissMode::Mini => m.repeat((1, n_out / self.mini_r))?,
            _ => m.clone(),
        })
    }

    /// `ΔW` `[out, in]` of the default and `"mini"` forms.
    fn additive_delta(&self, n_out: usize, n_in: usize) -> Result<Tensor> {
        let r = self.r();
        let mt = self.wide_block(n_out)?.t()?.contiguous()?; // [out, r]
        let blocks = n_in / r;
        let rem = n_in % r;
        let mut parts = Vec::new();
        if blocks > 0 {
            parts.push(mt.repeat((1, blocks))?);
        }
        if rem > 0 {
            parts.push(mt.narrow(1, 0, rem)?);
        }
        Ok(Tensor::cat(&parts, 1)?)
    }

    /// `W` `[out, in]` as `[in/r, out/r, r, r]` blocks (PEFT's `reshape(out/r, r, in/r, r).permute(2, 0, 1, 3)`).
    fn to_blocks(w: &Tensor, r: usize) -> Result<Tensor> {
        let (o, i) = w.dims2()?;
        Ok(w.reshape((o / r, r, i / r, r))?
            .permute((2, 0, 1, 3))?
            .contiguous()?)
    }

    /// The inverse of [`Self::to_blocks`].
    fn from_blocks(b: &Tensor, o: usize, i: usize) -> Result<Tensor> {
        Ok(b.permute((1, 2, 0, 3))?.contiguous()?.reshape((o, i))?)
    }

    /// `"bat"`'s `ΔW(W) = W_blk·B + B` `[out, in]`.
    fn bat_delta(&self, w: &Tensor) -> Result<Tensor> {
        let (o, i) = w.dims2()?;
        let b = self.block.as_tensor().unsqueeze(0)?; // [1, out/r, r, r]
        let blocks = Self::to_blocks(w, self.r())?;
        let res = blocks.broadcast_matmul(&b)?.broadcast_add(&b)?;
        Self::from_blocks(&res, o, i)
    }
}

impl Adapter for MissAdapter {
    /// PEFT's MiSS conversion: outside "bat" the update is already `B·A` at rank `r` (`A [r, in]` sums every
    /// `r`-th input, `B` = the block transposed), given exactly; "bat"'s `ΔW(W)` depends on the weight and is
    /// factorized by SVD.
    fn lora_conversion(&self, base: &BaseLayer) -> Result<Option<crate::layer::LoraConversion>> {
        if !matches!(base.kind(), BaseKind::Linear) {
            return Ok(None);
        }
        let (n_in, n_out) = dims(base)?;
        if self.mode == MissMode::Bat {
            let w = base.weight()?.to_dtype(DType::F32)?;
            return Ok(Some(crate::layer::LoraConversion::Delta(self.bat_delta(&w)?)));
        }
        let r = self.r();
        let mut a = vec![0f32; r * n_in];
        for i in 0..n_in {
            a[(i % r) * n_in + i] = 1.0;
        }
        let dev = self.block.as_tensor().device();
        let a = Tensor::from_vec(a, (r, n_in), dev)?;
        let b = self.wide_block(n_out)?.to_dtype(DType::F32)?.t()?.contiguous()?;
        Ok(Some(crate::layer::LoraConversion::Factors { a, b }))
    }

    fn peft_type(&self) -> &'static str {
        "MISS"
    }

    fn transform_output(
        &self,
        base: &BaseLayer,
        x: &Tensor,
        result: Tensor,
        ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        let (n_in, n_out) = dims(base)?;
        let x = x.to_dtype(DType::F32)?;
        let result = result.to_dtype(DType::F32)?;
        if self.mode == MissMode::Bat {
            let w = base.weight()?.to_dtype(DType::F32)?;
            let delta = self.bat_delta(&w)?;
            let lead = x.dims()[..x.rank() - 1].to_vec();
            let rows = x.elem_count() / n_in.max(1);
            let h = x.reshape((rows, n_in))?.matmul(&delta.t()?)?;
            let mut shape = lead;
            shape.push(n_out);
            return Ok((result + h.reshape(shape)?)?);
        }
        let r = self.r();
        let pad = (r - n_in % r) % r;
        let x = if pad > 0 {
            x.pad_with_zeros(x.rank() - 1, 0, pad)?
        } else {
            x
        };
        let x = if ctx.fwd.training && self.dropout > 0.0 {
            let mask = ctx
                .rng("miss_dropout")
                .dropout_mask(x.shape(), self.dropout, x.device())?;
            x.mul(&mask)?
        } else {
            x
        };
        let n = n_in + pad;
        let lead = x.dims()[..x.rank() - 1].to_vec();
        let rows = x.elem_count() / n.max(1);
        let summed = x.reshape((rows, n / r, r))?.sum(1)?; // [rows, r]
        let h = summed.matmul(&self.wide_block(n_out)?)?;
        let mut shape = lead;
        shape.push(n_out);
        Ok((result + h.reshape(shape)?)?)
    }

    fn delta_weight(&self, kind: &BaseKind) -> Result<Option<(Tensor, Option<Tensor>)>> {
        if self.mode == MissMode::Bat {
            return Ok(None);
        }
        if !matches!(kind, BaseKind::Linear) {
            return Err(PeftError::Invalid(format!(
                "MiSS adapter merged into a {kind:?} layer"
            )));
        }
        Ok(Some((self.additive_delta(self.n_out, self.n_in)?, None)))
    }

    fn merge(&self, input: MergeInput<'_>) -> Result<Merged> {
        let w = input.weight.to_dtype(DType::F32)?;
        let (o, i) = w.dims2()?;
        let weight = match self.mode {
            MissMode::Bat => (&w + self.bat_delta(&w)?)?,
            _ => (&w + self.additive_delta(o, i)?)?,
        };
        Ok(Merged {
            weight,
            bias: input.bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
            cache: None,
        })
    }

    fn unmerge(
        &self,
        input: MergeInput<'_>,
        _cache: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let w = input.weight.to_dtype(DType::F32)?;
        let (o, i) = w.dims2()?;
        let weight = match self.mode {
            MissMode::Bat => {
                let r = self.r();
                let b = self.block.as_tensor();
                let eye = Tensor::eye(r, DType::F32, b.device())?.unsqueeze(0)?;
                let inv = crate::ops::batched_inverse(&eye.broadcast_add(b)?)?.unsqueeze(0)?;
                let blocks = Self::to_blocks(&w, r)?;
                let res = blocks
                    .broadcast_sub(&b.unsqueeze(0)?)?
                    .broadcast_matmul(&inv)?;
                Self::from_blocks(&res, o, i)?
            }
            _ => (&w - self.additive_delta(o, i)?)?,
        };
        Ok((weight, input.bias.map(|b| b.to_dtype(DType::F32)).transpose()?))
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        vec![(MISS_BLOCK.to_string(), self.block.as_tensor().clone())]
    }

    fn vars(&self) -> Vec<(String, Var)> {
        vec![(MISS_BLOCK.to_string(), self.block.clone())]
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        format!("miss_block {:?} ({:?})", self.block.as_tensor().dims(), self.mode)
    }

    fn stacks_with_others(&self) -> bool {
        self.mode != MissMode::Bat
    }
}
