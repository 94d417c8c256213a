//! `peft generate`: text generation with a KV cache, greedy or sampled, streaming to stdout.

use candle_core::Device;
use clap::Args;
use peft::PeftRng;
use peft_models::error::ModelError;
use peft_models::generate::{Sampling, generate, prompt_ids};
use peft_models::load::require_tokenizer;
use peft_models::{LoadedModel, load_model_with, with_adapters};
use std::io::Write;
use std::path::PathBuf;

/// `peft generate` arguments.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The base model: an HF directory or a GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// Quantization of the base model.
    #[command(flatten)]
    pub quant: crate::quant::QuantArgs,
    /// Adapter directories to load (all active together, in order).
    #[arg(long)]
    pub adapter: Vec<PathBuf>,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template as a user turn.
    #[arg(long)]
    pub chat: bool,
    /// Sampling settings.
    #[command(flatten)]
    pub sampling: SamplingArgs,
}

/// How tokens are chosen.
#[derive(Debug, Clone, Args)]
pub struct SamplingArgs {
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0, value_parser = crate::train::non_negative_f64)]
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches this.
    #[arg(long, default_value_t = 1.0, value_parser = crate::train::probability_f64)]
    pub top_p: f64,
    /// Seed of the sampling generator.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl From<&SamplingArgs> for Sampling {
    fn from(s: &SamplingArgs) -> Self {
        Sampling {
            max_new_tokens: s.max_new_tokens,
            temperature: s.temperature,
            top_p: s.top_p,
            seed: s.seed,
        }
    }
}

/// Picks the next token from last-position logits: argmax at temperature 0, else top-p sampling
/// ([`peft_models::generate::sample`]).
pub fn sample(logits: &[f32], s: &SamplingArgs, rng: &mut PeftRng) -> u32 {
    peft_models::generate::sample(logits, &s.into(), rng)
}

/// Runs `peft generate`, streaming the completion to `out`.
pub fn run(args: &GenerateArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let LoadedModel {
        model, tokenizer, ..
    } = load_model_with(&args.model, &device, &args.quant.load_options()?)?;
    let tok = require_tokenizer(tokenizer.as_ref(), "generation")?;
    let pm = with_adapters(model, &args.adapter, &device)?;
    let ids = prompt_ids(tok, &args.prompt, args.chat)?;
    generate(&pm, tok, &ids, &(&args.sampling).into(), &mut |t| {
        out.write_all(t.as_bytes())
            .and_then(|_| out.flush())
            .map_err(|e| ModelError::io("<output>", e))
    })?;
    writeln!(out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_argmax_and_top_p_keeps_the_nucleus() {
        let logits = [0.0f32, 5.0, 1.0, 4.9];
        let mut rng = PeftRng::new(0);
        let greedy = SamplingArgs {
            max_new_tokens: 1,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        };
        assert_eq!(sample(&logits, &greedy, &mut rng), 1);
        // top_p small enough keeps only the best token
        let nucleus = SamplingArgs {
            temperature: 1.0,
            top_p: 0.3,
            ..greedy.clone()
        };
        for _ in 0..50 {
            assert_eq!(sample(&logits, &nucleus, &mut rng), 1);
        }
        // full sampling draws both leading tokens, roughly evenly, and never the unlikely ones often
        let full = SamplingArgs {
            temperature: 1.0,
            top_p: 1.0,
            ..greedy
        };
        let draws: Vec<u32> = (0..2000)
            .map(|_| sample(&logits, &full, &mut rng))
            .collect();
        let ones = draws.iter().filter(|&&d| d == 1).count() as f64 / 2000.0;
        assert!((ones - 0.51).abs() < 0.05, "{ones}");
        assert!(draws.contains(&3));
    }
}
