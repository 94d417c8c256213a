//! `peft generate`: text generation with a KV cache, greedy or sampled, streaming to stdout.

use crate::model::load_model;
use candle_core::{DType, Device, IndexOp, Tensor};
use clap::Args;
use peft::{ForwardCtx, PeftRng};
use peft_models::llama::{ForwardInput, KvCache, LlamaForCausalLM};
use peft_models::prompt_learning::PromptLearning;
use peft_models::tokenizer::{ChatMessage, Tokenizer};
use std::io::Write;
use std::path::PathBuf;

/// `peft generate` arguments.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The base model: an HF directory or a GGUF file.
    #[arg(long)]
    pub model: PathBuf,
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
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches this.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f64,
    /// Seed of the sampling generator.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Picks the next token from last-position logits: argmax at temperature 0, else top-p sampling.
pub fn sample(logits: &[f32], s: &SamplingArgs, rng: &mut PeftRng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |b, (i, &v)| {
                if v > b.1 { (i, v) } else { b }
            })
            .0 as u32
    };
    if s.temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((l as f64 - max) / s.temperature).exp()))
        .collect();
    let z: f64 = probs.iter().map(|p| p.1).sum();
    probs.iter_mut().for_each(|p| p.1 /= z);
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut keep = 0;
    let mut mass = 0.0;
    for p in &probs {
        keep += 1;
        mass += p.1;
        if mass >= s.top_p {
            break;
        }
    }
    let probs = &probs[..keep];
    let mut u = rng.uniform_f64() * mass;
    for p in probs {
        u -= p.1;
        if u <= 0.0 {
            return p.0 as u32;
        }
    }
    probs[keep - 1].0 as u32
}

/// The prompt's token ids: plain text with the tokenizer's special tokens, or a chat user turn rendered
/// with the model's template (and the assistant's generation prompt).
pub fn prompt_ids(tok: &Tokenizer, prompt: &str, chat: bool) -> anyhow::Result<Vec<u32>> {
    Ok(if chat {
        let text = tok.apply_chat_template(&[ChatMessage::user(prompt)], true)?;
        tok.encode(&text, false)?
    } else {
        tok.encode(prompt, true)?
    })
}

/// Generates from `ids`, calling `on_text` with each piece of decoded text; returns the whole completion.
pub fn generate(
    model: &LlamaForCausalLM,
    tok: &Tokenizer,
    ids: &[u32],
    s: &SamplingArgs,
    on_text: &mut dyn FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<String> {
    generate_with(model, None, tok, ids, s, on_text)
}

/// [`generate`] with an optional prompt-learning adapter: the first step runs its virtual tokens (or prefix)
/// and the prompt into the cache, as PEFT's `generate`; later steps decode from the cache.
pub fn generate_with(
    model: &LlamaForCausalLM,
    prompt: Option<&PromptLearning>,
    tok: &Tokenizer,
    ids: &[u32],
    s: &SamplingArgs,
    on_text: &mut dyn FnMut(&str) -> anyhow::Result<()>,
) -> anyhow::Result<String> {
    let device = model.device().clone();
    let ctx = ForwardCtx::eval();
    let mut cache = KvCache::new();
    let mut rng = PeftRng::new(s.seed);
    let mut decoder = tok.stream_decoder(true);
    let mut text = String::new();
    let mut input = Tensor::new(ids, &device)?.unsqueeze(0)?;
    let eos = tok.eos_token_id();
    for _ in 0..s.max_new_tokens {
        let logits = match prompt {
            Some(pl) if cache.is_empty() => {
                pl.forward_with_cache(model, &input, None, Some(&mut cache), &ctx)?
            }
            _ => model.forward(ForwardInput::ids(&input).with_cache(&mut cache), &ctx)?,
        };
        let last = logits
            .i((0, logits.dim(1)? - 1))?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        let next = sample(&last, s, &mut rng);
        if Some(next) == eos {
            break;
        }
        if let Some(piece) = decoder.step(next)? {
            on_text(&piece)?;
            text.push_str(&piece);
        }
        input = Tensor::new(&[next], &device)?.unsqueeze(0)?;
    }
    if let Some(piece) = decoder.finish()? {
        on_text(&piece)?;
        text.push_str(&piece);
    }
    Ok(text)
}

/// Runs `peft generate`, streaming the completion to `out`.
pub fn run(args: &GenerateArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let loaded = load_model(&args.model, &device)?;
    let (pm, prompt) = crate::model::with_any_adapters(loaded.model, &args.adapter, &device)?;
    let ids = prompt_ids(&loaded.tokenizer, &args.prompt, args.chat)?;
    generate_with(
        pm.model(),
        prompt.as_ref(),
        &loaded.tokenizer,
        &ids,
        &args.sampling,
        &mut |t| {
            out.write_all(t.as_bytes())?;
            out.flush()?;
            Ok(())
        },
    )?;
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
