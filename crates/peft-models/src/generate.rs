//! Text generation with a KV cache, greedy or sampled, for a model with any adapter ([`CausalLm`]).

use crate::causal_lm::CausalLm;
use crate::error::Result;
use crate::llama::{ForwardInput, KvCache};
use crate::tokenizer::{ChatMessage, Tokenizer};
use candle_core::{DType, IndexOp, Tensor};
use peft::{ForwardCtx, PeftRng};

/// How tokens are chosen.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches this.
    pub top_p: f64,
    /// Seed of the sampling generator.
    pub seed: u64,
}

impl Sampling {
    /// Greedy decoding of up to `max_new_tokens` tokens.
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

/// Picks the next token from last-position logits: argmax at temperature 0, else top-p sampling.
pub fn sample(logits: &[f32], s: &Sampling, rng: &mut PeftRng) -> u32 {
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
pub fn prompt_ids(tok: &Tokenizer, prompt: &str, chat: bool) -> Result<Vec<u32>> {
    Ok(if chat {
        let text = tok.apply_chat_template(&[ChatMessage::user(prompt)], true)?;
        tok.encode(&text, false)?
    } else {
        tok.encode(prompt, true)?
    })
}

/// Generates from `ids`, calling `on_text` with each piece of decoded text; returns the whole completion.
/// The first step runs the prompt (after a prompt-learning adapter's virtual tokens or prefix, as PEFT's
/// `generate`) into the cache; later steps decode one token each from the cache. Stops at the EOS token.
pub fn generate(
    model: &impl CausalLm,
    tok: &Tokenizer,
    ids: &[u32],
    s: &Sampling,
    on_text: &mut dyn FnMut(&str) -> Result<()>,
) -> Result<String> {
    let llama = model.llama();
    let device = llama.device().clone();
    let ctx = ForwardCtx::inference();
    let mut cache = KvCache::new();
    let mut rng = PeftRng::new(s.seed);
    let mut decoder = tok.stream_decoder(true);
    let mut text = String::new();
    let mut input = Tensor::new(ids, &device)?.unsqueeze(0)?;
    let eos = tok.eos_token_id();
    for _ in 0..s.max_new_tokens {
        let logits = if cache.is_empty() {
            model.prefill(&input, &mut cache, &ctx)?
        } else {
            llama.forward(ForwardInput::ids(&input).with_cache(&mut cache), &ctx)?
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
