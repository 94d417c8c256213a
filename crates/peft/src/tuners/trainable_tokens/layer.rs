//! The trainable-tokens adapter (PEFT's `tuners/trainable_tokens/layer.py`).
//!
//! One tensor per layer, `trainable_tokens_delta` `[n, dim]`: the new rows of the chosen tokens — not a
//! difference, despite the name. The layer computes with its weight's rows `token_indices` replaced by them
//! (PEFT's `W.index_copy(0, token_indices, delta)`; a token listed twice takes its last row, as `index_copy`):
//!
//! - on an Embedding, the looked-up rows of those tokens are the new ones;
//! - on the `lm_head` tied to that embedding (PEFT wraps it with an adapter tied to the embedding's, sharing
//!   its parameter), the logits of those tokens are `x · delta_k`; the tied copy trains nothing of its own
//!   ([`Adapter::vars`] is empty) but saves the shared rows under its own key, as PEFT's file holds them.
//!
//! Merging replaces the rows in the weight (exactly) and unmerging puts the rows it replaced back. Not
//! additive: no weighted merges.
//!
//! LoRA's `trainable_token_indices` uses the same layer inside PEFT's `TrainableTokensWrapper`
//! ([`TrainableTokensAdapter::for_lora`]): the tensor is then saved as `token_adapter.trainable_tokens_delta`,
//! the rows start as the original ones, the wrapped layer may also be a Linear (without bias: PEFT's
//! `F.linear(x, W)` drops it), and the copy tied to the embedding saves nothing (the embedding's key holds the
//! rows).

use super::config::TrainableTokensConfig;
use crate::layer::{Adapter, BaseKind, BaseLayer, CallCtx, MergeInput, Merged, NamedTensor, check_shape};
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Device, Tensor, Var};
use indexmap::IndexMap;
use std::collections::HashMap;

/// `trainable_tokens_delta`.
pub const DELTA: &str = "trainable_tokens_delta";

/// The parameter names of the method's tensors in a file.
pub const PARAM_PREFIXES: &[&str] = &[DELTA];

/// The sub-module PEFT's `TrainableTokensWrapper` (LoRA's `trainable_token_indices`) keeps the adapter in.
pub const WRAPPER_PREFIX: &str = "token_adapter";

/// The key of LoRA's trainable tokens relative to the module: `token_adapter.trainable_tokens_delta`.
pub const WRAPPED_DELTA: &str = "token_adapter.trainable_tokens_delta";

/// Trainable tokens inside one Embedding layer, or the copy tied to it inside the output head.
#[derive(Debug)]
pub struct TrainableTokensAdapter {
    kind: BaseKind,
    /// The token ids, as in the config.
    indices: Vec<u32>,
    /// The rows of the weight (vocabulary size).
    rows: usize,
    /// Each distinct token once, with the row of `delta` it takes (its last occurrence).
    last: Vec<(u32, usize)>,
    delta: Var,
    /// Whether this is the copy tied to another layer's adapter (trains and merges nothing of its own).
    tied: bool,
    /// Whether this sits in LoRA's `TrainableTokensWrapper` (`trainable_token_indices`) rather than being the
    /// TRAINABLE_TOKENS method's own layer: it changes the saved key and what a tied copy saves.
    wrapped: bool,
    saved_dtype: DType,
}

/// `[rows, dim]` of a layer's weight, which must be an Embedding or (for the tied copy) a Linear head.
fn geometry(base: &BaseLayer) -> Result<(usize, usize)> {
    let d = base.weight_dims();
    match base.kind() {
        BaseKind::Embedding | BaseKind::Linear if base.quantized().is_none() && d.len() == 2 => {
            Ok((d[0], d[1]))
        }
        k => Err(PeftError::Unsupported {
            field: "target_modules".into(),
            value: format!("a {k:?} layer"),
            reason: "trainable tokens wrap an Embedding (and the Linear output head tied to it), as PEFT".into(),
        }),
    }
}

/// The error of a token id outside the weight.
fn out_of_range(wrapped: bool, bad: usize, rows: usize) -> PeftError {
    let what = if wrapped { "trainable_token_indices" } else { "TRAINABLE_TOKENS" };
    PeftError::Invalid(format!("{what}: token index {bad} is outside the {rows} rows of the embedding"))
}

/// A Linear with a bias: PEFT's wrapper computes `F.linear(x, W)` and would drop it; refused.
fn refuse_linear_bias(base: &BaseLayer) -> Result<()> {
    if *base.kind() == BaseKind::Linear && base.bias().is_some() {
        return Err(PeftError::Unsupported {
            field: "trainable_token_indices".into(),
            value: "a Linear layer with a bias".into(),
            reason: "PEFT's trainable tokens on a Linear compute `F.linear(x, W)` and drop the bias".into(),
        });
    }
    Ok(())
}

impl TrainableTokensAdapter {
    fn assemble(
        base: &BaseLayer,
        token_indices: &[usize],
        delta: Tensor,
        saved_dtype: DType,
        wrapped: bool,
    ) -> Result<Self> {
        let (rows, dim) = geometry(base)?;
        if let Some(&bad) = token_indices.iter().find(|&&i| i >= rows) {
            return Err(out_of_range(wrapped, bad, rows));
        }
        let key = if wrapped { WRAPPED_DELTA } else { DELTA };
        check_shape(key, &delta, &[token_indices.len(), dim])?;
        let indices: Vec<u32> = token_indices.iter().map(|&i| i as u32).collect();
        let mut at: HashMap<u32, usize> = HashMap::new();
        for (k, &t) in indices.iter().enumerate() {
            at.insert(t, k);
        }
        let mut last: Vec<(u32, usize)> = at.into_iter().collect();
        last.sort_unstable();
        Ok(Self {
            kind: *base.kind(),
            indices,
            rows,
            last,
            delta: Var::from_tensor(&delta.to_dtype(DType::F32)?)?,
            tied: false,
            wrapped,
            saved_dtype,
        })
    }

    /// The original rows `token_indices` of the base weight, f32 `[n, dim]`.
    fn original_rows(base: &BaseLayer, token_indices: &[usize], wrapped: bool) -> Result<Tensor> {
        let (rows, _) = geometry(base)?;
        if let Some(&bad) = token_indices.iter().find(|&&i| i >= rows) {
            return Err(out_of_range(wrapped, bad, rows));
        }
        let idx: Vec<u32> = token_indices.iter().map(|&i| i as u32).collect();
        let idx = Tensor::from_vec(idx, token_indices.len(), base.device())?;
        Ok(base.weight()?.to_dtype(DType::F32)?.contiguous()?.index_select(&idx, 0)?)
    }

    /// A new adapter for LoRA's `trainable_token_indices` on an Embedding, or on a Linear without bias (PEFT's
    /// `TrainableTokensWrapper`, whose layer starts from the original rows: the identity).
    pub fn for_lora(base: &BaseLayer, token_indices: &[usize]) -> Result<Self> {
        refuse_linear_bias(base)?;
        let delta = Self::original_rows(base, token_indices, true)?;
        Self::assemble(base, token_indices, delta, DType::F32, true)
    }

    /// LoRA's trainable tokens from a PEFT file: `token_adapter.trainable_tokens_delta` (key relative to the
    /// module). Every key must be used.
    pub fn for_lora_from_tensors(
        base: &BaseLayer,
        token_indices: &[usize],
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        refuse_linear_bias(base)?;
        let extra: Vec<String> = tensors.keys().filter(|k| *k != WRAPPED_DELTA).cloned().collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        let d = tensors
            .get(WRAPPED_DELTA)
            .ok_or_else(|| PeftError::MissingKey(WRAPPED_DELTA.into()))?;
        Self::assemble(base, token_indices, d.clone(), d.dtype(), true)
    }

    /// The token ids, as configured.
    pub fn token_indices(&self) -> Vec<usize> {
        self.indices.iter().map(|&i| i as usize).collect()
    }

    /// A new adapter on an Embedding (PEFT's `update_layer`): the original rows with `init_weights`, N(0, 1)
    /// rows from `rng` without.
    pub fn new(base: &BaseLayer, config: &TrainableTokensConfig, rng: &mut PeftRng) -> Result<Self> {
        if *base.kind() != BaseKind::Embedding {
            return Err(PeftError::Unsupported {
                field: "target_modules".into(),
                value: format!("a {:?} layer", base.kind()),
                reason: "trainable tokens target an Embedding (the tied output head follows it), as PEFT".into(),
            });
        }
        let (_, dim) = geometry(base)?;
        let n = config.token_indices.len();
        let delta = if config.init_weights {
            Self::original_rows(base, &config.token_indices, false)?
        } else {
            rng.normal_tensor((n, dim), 0.0, 1.0, DType::F32, base.device())?
        };
        Self::assemble(base, &config.token_indices, delta, DType::F32, false)
    }

    /// An adapter from the tensor PEFT saves for one module (`trainable_tokens_delta`, key relative to the
    /// module). Every key must be used.
    pub fn from_tensors(
        base: &BaseLayer,
        config: &TrainableTokensConfig,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        let extra: Vec<String> = tensors.keys().filter(|k| *k != DELTA).cloned().collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        let d = tensors
            .get(DELTA)
            .ok_or_else(|| PeftError::MissingKey(DELTA.into()))?;
        Self::assemble(base, &config.token_indices, d.clone(), d.dtype(), false)
    }

    /// The new rows `[n, dim]` (f32).
    pub fn delta(&self) -> &Tensor {
        self.delta.as_tensor()
    }

    /// Whether this is the copy tied to the embedding's adapter.
    pub fn is_tied_copy(&self) -> bool {
        self.tied
    }

    /// `S` `[m, rows]`: row `j` one-hot at the `j`-th distinct token, and the rows of `delta` they take.
    fn selection(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let m = self.last.len();
        let mut s = vec![0f32; m * self.rows];
        for (j, &(t, _)) in self.last.iter().enumerate() {
            s[j * self.rows + t as usize] = 1.0;
        }
        let s = Tensor::from_vec(s, (m, self.rows), device)?;
        let k: Vec<u32> = self.last.iter().map(|&(_, k)| k as u32).collect();
        let rows = self.delta.as_tensor().index_select(&Tensor::from_vec(k, m, device)?, 0)?;
        Ok((s, rows))
    }

    /// `W` with the chosen rows replaced by `rows` `[m, dim]` (exact: `W·(1 − mask) + Sᵀ·rows`).
    fn replace_rows(&self, w: &Tensor, rows: &Tensor) -> Result<Tensor> {
        let (s, _) = self.selection(w.device())?;
        let mask = s.sum_keepdim(0)?.t()?; // [rows, 1]
        let keep = mask.affine(-1.0, 1.0)?;
        Ok((w.broadcast_mul(&keep)? + s.t()?.matmul(rows)?)?)
    }
}

impl Adapter for TrainableTokensAdapter {
    fn peft_type(&self) -> &'static str {
        "TRAINABLE_TOKENS"
    }

    fn transform_output(
        &self,
        base: &BaseLayer,
        x: &Tensor,
        result: Tensor,
        _ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        let dev = result.device().clone();
        let (s, rows) = self.selection(&dev)?;
        let out_shape = result.dims().to_vec();
        let width = *out_shape.last().unwrap_or(&0);
        let flat = result.to_dtype(DType::F32)?.reshape(((), width))?;
        let y = match base.kind() {
            BaseKind::Embedding => {
                // onehot [N, rows] · Sᵀ [rows, m] picks, for each position, its distinct token (if chosen).
                let ids: Vec<u32> = x.flatten_all()?.to_dtype(DType::U32)?.to_vec1()?;
                let n = ids.len();
                let m = self.last.len();
                let mut pick = vec![0f32; n * m];
                let mut hit = vec![1f32; n];
                for (p, id) in ids.iter().enumerate() {
                    if let Ok(j) = self.last.binary_search_by_key(id, |&(t, _)| t) {
                        pick[p * m + j] = 1.0;
                        hit[p] = 0.0;
                    }
                }
                let pick = Tensor::from_vec(pick, (n, m), &dev)?;
                let keep = Tensor::from_vec(hit, (n, 1), &dev)?;
                (flat.broadcast_mul(&keep)? + pick.matmul(&rows)?)?
            }
            _ => {
                // The tied head: the chosen tokens' logits are x · delta_k.
                let xin = x.to_dtype(DType::F32)?;
                let xin = xin.reshape(((), *xin.dims().last().unwrap_or(&0)))?;
                let new = xin.matmul(&rows.t()?)?; // [N, m]
                let keep = s.sum_keepdim(0)?.affine(-1.0, 1.0)?; // [1, rows]: 0 at the chosen tokens
                (flat.broadcast_mul(&keep)? + new.matmul(&s)?)?
            }
        };
        Ok(y.reshape(out_shape)?)
    }

    fn merge(&self, input: MergeInput<'_>) -> Result<Merged> {
        if self.tied {
            // The matrix is the embedding's: its adapter's merge lands in it.
            return Ok(Merged {
                weight: input.weight.clone(),
                bias: input.bias.cloned(),
                cache: None,
            });
        }
        let (s, rows) = self.selection(input.weight.device())?;
        let old = s.matmul(input.weight)?;
        Ok(Merged {
            weight: self.replace_rows(input.weight, &rows)?,
            bias: input.bias.cloned(),
            cache: Some(old),
        })
    }

    fn unmerge(&self, input: MergeInput<'_>, cache: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        match (self.tied, cache) {
            (false, Some(old)) => Ok((self.replace_rows(input.weight, old)?, input.bias.cloned())),
            _ => Ok((input.weight.clone(), input.bias.cloned())),
        }
    }

    /// `trainable_tokens_delta`; in LoRA's wrapper `token_adapter.trainable_tokens_delta`, and nothing for
    /// the tied copy (PEFT's wrapper leaves the tied layer out of the state dict).
    fn tensors(&self) -> Vec<NamedTensor> {
        match (self.wrapped, self.tied) {
            (false, _) => vec![(DELTA.to_string(), self.delta.as_tensor().clone())],
            (true, false) => vec![(WRAPPED_DELTA.to_string(), self.delta.as_tensor().clone())],
            (true, true) => Vec::new(),
        }
    }

    fn vars(&self) -> Vec<(String, Var)> {
        match (self.tied, self.wrapped) {
            (true, _) => Vec::new(),
            (false, false) => vec![(DELTA.to_string(), self.delta.clone())],
            (false, true) => vec![(WRAPPED_DELTA.to_string(), self.delta.clone())],
        }
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        let tied = if self.tied { " (tied)" } else { "" };
        format!("{} trainable tokens of {}{tied}", self.indices.len(), self.rows)
    }

    fn tied_copy(&self, base: &BaseLayer) -> Result<Option<Box<dyn Adapter>>> {
        if self.tied || self.kind != BaseKind::Embedding {
            return Ok(None);
        }
        let (rows, dim) = geometry(base)?;
        if rows != self.rows || dim != self.delta.as_tensor().dim(1)? {
            return Err(PeftError::Invalid(format!(
                "TRAINABLE_TOKENS: the tied layer's weight [{rows}, {dim}] is not the embedding's [{}, {}]",
                self.rows,
                self.delta.as_tensor().dim(1)?
            )));
        }
        Ok(Some(Box::new(Self {
            kind: *base.kind(),
            indices: self.indices.clone(),
            rows,
            last: self.last.clone(),
            delta: self.delta.clone(),
            tied: true,
            wrapped: self.wrapped,
            saved_dtype: self.saved_dtype,
        })))
    }
}
