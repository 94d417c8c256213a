//! The causal language-modelling loss (token cross-entropy with the shift) and its evaluation meter.

use candle_core::{DType, Tensor};

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
    let targets = shifted_targets(labels, v)?;
    let n = targets.iter().filter(|t| t.is_some()).count();
    if n == 0 {
        let zero = logits.to_dtype(DType::F32)?.sum_all()?.affine(0.0, 0.0)?;
        return Ok((zero, 0));
    }
    // One fused op over all rows (ignored rows give 0): no shifted copies of the `[B·L, V]` logits.
    let flat = logits.reshape((b * l, v))?.to_dtype(DType::F32)?;
    let nll = crate::ops::cross_entropy_rows(&flat, &targets)?;
    Ok((nll.sum_all()?, n))
}

/// The next-token target of every row of the flattened `[B·L]` positions of `labels` (`[B, L]`, integer):
/// row `bi · L + t` predicts `labels[bi][t + 1]`, `None` for the last position of each row and for
/// [`IGNORE_INDEX`]. A label outside `0..vocab` (and not `-100`) is an error naming its position.
pub fn shifted_targets(labels: &Tensor, vocab: usize) -> Result<Vec<Option<u32>>> {
    let (b, l) = labels.dims2()?;
    let v = vocab;
    let host: Vec<Vec<i64>> = labels.to_dtype(DType::I64)?.to_vec2()?;
    // Row `bi · L + t` predicts `labels[bi][t + 1]`; the last position of each row predicts nothing.
    let mut targets: Vec<Option<u32>> = Vec::with_capacity(b * l);
    for (bi, row) in host.iter().enumerate() {
        for t in 0..l {
            let y = if t + 1 < l { row[t + 1] } else { IGNORE_INDEX };
            if y == IGNORE_INDEX {
                targets.push(None);
                continue;
            }
            if y < 0 || y as u64 >= v as u64 {
                return Err(ModelError::Invalid(format!(
                    "label {y} at row {bi}, position {} is outside the vocabulary (0..{v}) and is not {IGNORE_INDEX}",
                    t + 1
                )));
            }
            targets.push(Some(y as u32));
        }
    }
    Ok(targets)
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
