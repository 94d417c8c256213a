//! `peft eval`: mean token negative log-likelihood and perplexity of a model (with adapters) on data.

use crate::model::load_model;
use anyhow::Context;
use candle_core::{Device, Tensor};
use clap::Args;
use peft::ForwardCtx;
use peft_models::data::{DataConfig, Dataset, causal_lm_sum_nll, load_dataset, pad_token_id};
use peft_models::llama::{ForwardInput, LlamaForCausalLM};
use peft_models::prompt_learning::PromptLearning;
use std::io::Write;
use std::path::PathBuf;

/// `peft eval` arguments.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The base model: an HF directory or a GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter directories to load; all are active together, in the order given.
    #[arg(long)]
    pub adapter: Vec<PathBuf>,
    /// The data: plain text, JSONL with `text` (or prompt/completion, messages), or JSONL `input_ids`.
    #[arg(long)]
    pub data: PathBuf,
    /// Tokens per example (text is packed into windows of this length).
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Evaluate at most this many examples (all by default).
    #[arg(long)]
    pub max_examples: Option<usize>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Also write the first batch's input ids, attention mask and logits to this safetensors file (for
    /// comparisons with Python).
    #[arg(long)]
    pub save_logits: Option<PathBuf>,
}

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
pub type FirstBatch<'a> = dyn FnMut(&peft_models::data::Batch, &Tensor) -> anyhow::Result<()> + 'a;

/// Evaluates `model` on `data` in order; `first_logits` receives the first batch and its logits.
pub fn evaluate(
    model: &LlamaForCausalLM,
    data: &Dataset,
    batch_size: usize,
    pad_id: u32,
    first_logits: Option<&mut FirstBatch<'_>>,
) -> anyhow::Result<EvalResult> {
    evaluate_with(model, None, data, batch_size, pad_id, first_logits)
}

/// [`evaluate`] with an optional prompt-learning adapter; the loss covers the real tokens only (PEFT's labels
/// are −100 on the virtual positions), and the logits passed to `first_logits` are those of the real tokens.
pub fn evaluate_with(
    model: &LlamaForCausalLM,
    prompt: Option<&PromptLearning>,
    data: &Dataset,
    batch_size: usize,
    pad_id: u32,
    mut first_logits: Option<&mut FirstBatch<'_>>,
) -> anyhow::Result<EvalResult> {
    let device = model.device().clone();
    let ctx = ForwardCtx::eval();
    let (mut nll, mut tokens) = (0f64, 0usize);
    for batch in data.eval_batches(batch_size, pad_id, &device) {
        let batch = batch?;
        let logits = match prompt {
            Some(pl) => {
                pl.token_logits(model, &batch.input_ids, Some(&batch.attention_mask), &ctx)?
            }
            None => {
                let input =
                    ForwardInput::ids(&batch.input_ids).with_attention_mask(&batch.attention_mask);
                model.forward(input, &ctx)?
            }
        };
        if let Some(f) = first_logits.take() {
            f(&batch, &logits)?;
        }
        let (sum, n) = causal_lm_sum_nll(&logits, &batch.labels)?;
        nll += sum.to_scalar::<f32>()? as f64;
        tokens += n;
    }
    anyhow::ensure!(
        tokens > 0,
        "{}: no token to evaluate",
        data.source.display()
    );
    let mean_nll = nll / tokens as f64;
    Ok(EvalResult {
        mean_nll,
        perplexity: mean_nll.exp(),
        tokens,
    })
}

/// Runs `peft eval`.
pub fn run(args: &EvalArgs, out: &mut dyn Write) -> anyhow::Result<EvalResult> {
    let device = Device::Cpu;
    let loaded = load_model(&args.model, &device)?;
    let (pm, prompt) = crate::model::with_any_adapters(loaded.model, &args.adapter, &device)?;
    let mut data = load_dataset(
        &args.data,
        &loaded.tokenizer,
        &DataConfig::new(args.seq_len),
    )
    .with_context(|| format!("loading {}", args.data.display()))?;
    if let Some(n) = args.max_examples {
        data.examples.truncate(n);
    }
    let pad = pad_token_id(&loaded.tokenizer);
    let save = args.save_logits.clone();
    let mut saver = |batch: &peft_models::data::Batch, logits: &Tensor| -> anyhow::Result<()> {
        if let Some(path) = &save {
            peft::io::write_safetensors(
                path,
                &[
                    ("input_ids".into(), batch.input_ids.clone()),
                    ("attention_mask".into(), batch.attention_mask.clone()),
                    ("logits".into(), logits.clone()),
                ],
            )?;
        }
        Ok(())
    };
    let r = evaluate_with(
        pm.model(),
        prompt.as_ref(),
        &data,
        args.batch_size,
        pad,
        Some(&mut saver),
    )?;
    if args.json {
        let v = serde_json::json!({
            "mean_nll": r.mean_nll, "perplexity": r.perplexity, "tokens": r.tokens,
            "examples": data.len(), "adapters": args.adapter,
        });
        writeln!(out, "{v}")?;
    } else {
        writeln!(
            out,
            "mean NLL {:.4} nats/token, perplexity {:.3}, over {} tokens ({} examples)",
            r.mean_nll,
            r.perplexity,
            r.tokens,
            data.len()
        )?;
    }
    Ok(r)
}
