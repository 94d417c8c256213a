//! Evaluation: mean token negative log-likelihood and perplexity of a model (with any adapter) on a dataset.

use crate::causal_lm::CausalLm;
use crate::data::{Batch, Dataset, causal_lm_sum_nll};
use crate::error::{ModelError, Result};
use candle_core::Tensor;
use peft::ForwardCtx;

/// The result of an evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    /// Mean negative log-likelihood per predicted token (nats).
    pub mean_nll: f64,
    /// `exp(mean_nll)`.
    pub perplexity: f64,
    /// Predicted tokens counted.
    pub tokens: usize,
}

/// A callback that sees the first evaluated batch and its logits.
pub type FirstBatch<'a> = dyn FnMut(&Batch, &Tensor) -> Result<()> + 'a;

/// Evaluates `model` on `data` in order, `batch_size` examples at a time, padded with `pad_id`; the loss covers
/// the real tokens only (a prompt-learning adapter's virtual positions are not scored, as PEFT's −100 labels
/// there). `first_logits` receives the first batch and its logits (those of the real tokens).
///
/// ```
/// use candle_core::{DType, Device};
/// use peft_models::data::{Dataset, Example, ExampleKind};
/// use peft_models::llama::{LlamaConfig, LlamaForCausalLM};
///
/// # fn main() -> peft_models::error::Result<()> {
/// let config = LlamaConfig::from_value(&serde_json::json!({
///     "model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
///     "num_key_value_heads": 1, "vocab_size": 24,
/// }))?;
/// let tensors = LlamaForCausalLM::random_tensors(&config, 0, DType::F32, &Device::Cpu)?;
/// let model = LlamaForCausalLM::from_tensors(config, tensors, &Device::Cpu)?;
/// let data = Dataset {
///     examples: vec![Example::lm(vec![1, 2, 3, 4]), Example::lm(vec![5, 6, 7])],
///     kind: ExampleKind::Tokens,
///     source: "in memory".into(),
///     skipped: 0,
/// };
/// let r = peft_models::eval::evaluate(&model, &data, 2, 0, None)?;
/// assert_eq!(r.tokens, 5);
/// assert!(r.mean_nll > 0.0 && (r.perplexity - r.mean_nll.exp()).abs() < 1e-9);
/// # Ok(()) }
/// ```
pub fn evaluate(
    model: &impl CausalLm,
    data: &Dataset,
    batch_size: usize,
    pad_id: u32,
    mut first_logits: Option<&mut FirstBatch<'_>>,
) -> Result<EvalResult> {
    let device = model.llama().device().clone();
    let ctx = ForwardCtx::inference();
    let (mut nll, mut tokens) = (0f64, 0usize);
    for batch in data.eval_batches(batch_size, pad_id, &device) {
        let batch = batch?;
        let logits = model.token_logits(&batch.input_ids, Some(&batch.attention_mask), &ctx)?;
        if let Some(f) = first_logits.take() {
            f(&batch, &logits)?;
        }
        let (sum, n) = causal_lm_sum_nll(&logits, &batch.labels)?;
        nll += sum.to_scalar::<f32>()? as f64;
        tokens += n;
    }
    if tokens == 0 {
        return Err(ModelError::Invalid(format!(
            "{}: no token to evaluate",
            data.source.display()
        )));
    }
    let mean_nll = nll / tokens as f64;
    Ok(EvalResult {
        mean_nll,
        perplexity: mean_nll.exp(),
        tokens,
    })
}
