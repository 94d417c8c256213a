//! The causal language-modelling loss (token cross-entropy with the shift) and its evaluation meter.

use candle_core::{D, DType, Tensor};

use super::IGNORE_INDEX;
use crate::error::{ModelError, Result};

/// The mean next-token cross-entropy of `logits` (`[B, L, V]`, any float dtype, computed in f32) against
/// `labels` (`[B, L]`, integer): position `t` predicts `labels[t + 1]`, [`IGNORE_INDEX`] (`-100`) is
/// skipped, the mean is over the counted tokens, as `torch.nn.functional.cross_entropy` in HuggingFace's
/// `ForCausalLMLoss`. Returns the scalar loss (differentiable with respect to `logits`) and the number of
/// counted tokens; with none, the loss is a zero that still depends on `logits` (zero gradients).
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (sum, n) = causal_lm_sum_nll(logits, labels)?;
    if n == 0 {
        return Ok((sum, 0));
    }
    Ok((sum.affine(1.0 / n as f64, 0.0)?, n))
}

/// The summed next-token negative log-likelihood (same rules as [`causal_lm_loss`]) and the number of
/// counted tokens, for evaluation across batches (see [`NllMeter`]).
pub fn causal_lm_sum_nll(logits: &Tensor, labels: &Tensor) -> Result<(Tensor, usize)> {
    let (b, l, v) = logits.dims3()?;
    let (lb, ll) = labels.dims2()?;
    if (lb, ll) != (b, l) {
        return Err(ModelError::Invalid(format!(
            "labels {:?} do not match logits {:?}",
            labels.dims(),
            logits.dims()
        )));
    }
    let host: Vec<Vec<i64>> = labels.to_dtype(DType::I64)?.to_vec2()?;
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for (bi, row) in host.iter().enumerate() {
        for t in 0..l.saturating_sub(1) {
            let y = row[t + 1];
            if y == IGNORE_INDEX {
                continue;
            }
            if y < 0 || y as u64 >= v as u64 {
                return Err(ModelError::Invalid(format!(
                    "label {y} at row {bi}, position {} is outside the vocabulary (0..{v}) and is not {IGNORE_INDEX}",
                    t + 1
                )));
            }
            rows.push((bi * l + t) as u32);
            targets.push(y as u32);
        }
    }
    let n = rows.len();
    let device = logits.device();
    if n == 0 {
        let zero = logits.to_dtype(DType::F32)?.sum_all()?.affine(0.0, 0.0)?;
        return Ok((zero, 0));
    }
    let flat = logits.reshape((b * l, v))?;
    let selected = flat.index_select(&Tensor::from_vec(rows, n, device)?, 0)?;
    let logp = log_softmax_last(&selected.to_dtype(DType::F32)?)?;
    let picked = logp.gather(&Tensor::from_vec(targets, (n, 1), device)?, 1)?;
    Ok((picked.sum_all()?.neg()?, n))
}

/// `x - max - log(sum(exp(x - max)))` over the last dimension; the max is a constant shift (detached), so
/// the gradient is the exact `softmax`-based one.
fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let shifted = x.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// A running sum of token negative log-likelihoods over evaluation batches.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct NllMeter {
    /// The summed NLL (nats).
    pub sum: f64,
    /// The number of tokens summed.
    pub tokens: usize,
}

impl NllMeter {
    /// An empty meter.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a batch's [`causal_lm_sum_nll`] result.
    pub fn add(&mut self, sum_nll: &Tensor, tokens: usize) -> Result<()> {
        let s = sum_nll.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        self.add_value(s, tokens);
        Ok(())
    }

    /// Adds a summed NLL already on the host.
    pub fn add_value(&mut self, sum_nll: f64, tokens: usize) {
        self.sum += sum_nll;
        self.tokens += tokens;
    }

    /// The mean NLL per token (NaN when no token was added).
    pub fn mean_nll(&self) -> f64 {
        if self.tokens == 0 {
            f64::NAN
        } else {
            self.sum / self.tokens as f64
        }
    }

    /// The perplexity, `exp(mean NLL)`.
    pub fn perplexity(&self) -> f64 {
        self.mean_nll().exp()
    }
}
