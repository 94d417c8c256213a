//! `peft eval`: mean token negative log-likelihood and perplexity of a model (with adapters) on data.

use anyhow::Context;
use candle_core::{Device, Tensor};
use clap::Args;
use peft_models::data::{DataConfig, load_dataset, pad_token_id};
use peft_models::{LoadedModel, load_model_with, with_adapters};
use std::io::Write;
use std::path::PathBuf;

/// `peft eval` arguments.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The base model: an HF directory or a GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// Quantization of the base model.
    #[command(flatten)]
    pub quant: crate::quant::QuantArgs,
    /// Adapter directories to load; all are active together, in the order given.
    #[arg(long)]
    pub adapter: Vec<PathBuf>,
    /// The data: plain text, JSONL with `text` (or prompt/completion, messages), or JSONL `input_ids`.
    #[arg(long)]
    pub data: PathBuf,
    /// Tokens per example (text is packed into windows of this length).
    #[arg(long, default_value_t = 256, value_parser = crate::train::positive_usize)]
    pub seq_len: usize,
    /// Examples per forward pass.
    #[arg(long, default_value_t = 4, value_parser = crate::train::positive_usize)]
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

pub use peft_models::eval::{EvalResult, FirstBatch, evaluate};

/// Runs `peft eval`.
pub fn run(args: &EvalArgs, out: &mut dyn Write) -> anyhow::Result<EvalResult> {
    let device = Device::Cpu;
    let LoadedModel {
        model, tokenizer, ..
    } = load_model_with(&args.model, &device, &args.quant.load_options()?)?;
    let pm = with_adapters(model, &args.adapter, &device)?;
    let mut data = load_dataset(
        &args.data,
        tokenizer.as_ref(),
        &DataConfig::new(args.seq_len).with_vocab_size(pm.model().config().vocab_size),
    )
    .with_context(|| format!("loading {}", args.data.display()))?;
    if let Some(n) = args.max_examples {
        data.examples.truncate(n);
    }
    let pad = pad_token_id(tokenizer.as_ref());
    let save = args.save_logits.clone();
    let mut saver =
        |batch: &peft_models::data::Batch, logits: &Tensor| -> peft_models::error::Result<()> {
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
    let r = evaluate(&pm, &data, args.batch_size, pad, Some(&mut saver))?;
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
    if !r.mean_nll.is_finite() {
        anyhow::bail!(
            "the mean NLL is {} over {} tokens: the model or an adapter produces non-finite logits (an \
             adapter loaded with --allow-non-finite, or a diverged run)",
            r.mean_nll,
            r.tokens
        );
    }
    Ok(r)
}
