//! Text generation with a KV cache, greedy or sampled, for a model with any adapter ([`CausalLm`]).

use crate::causal_lm::CausalLm;
use crate::error::Result;
use crate::llama::{ForwardInput, KvCache, LlamaForCausalLM};
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

/// One request of [`generate_batch_ids`]: prompt ids and the adapter its rows run with (an adapter's name, or
/// [`peft::layer::BASE_ADAPTER_NAME`] for the base model).
#[derive(Clone, Copy, Debug)]
pub struct BatchRequest<'a> {
    /// The prompt's token ids (at least one).
    pub ids: &'a [u32],
    /// The adapter of this request.
    pub adapter: &'a str,
}

/// Generates for several requests at once, each with its own adapter (PEFT's mixed batch, in generation):
/// every prompt runs into its own KV cache with its adapter, then each step decodes one token for every request
/// still running in one batched step ([`crate::llama::LlamaForCausalLM::decode_batch`]; the rows sorted by
/// adapter, so each adapter runs on one contiguous segment). Request `i` samples from its own generator,
/// `PeftRng::new(s.seed).fork(i)` (greedy at temperature 0), and stops at `eos` or after `s.max_new_tokens`
/// tokens. Returns the new token ids per request, in the order given, without the EOS token. Each request's
/// tokens are those it gets alone with its adapter as the only active one (greedy: the same ids).
///
/// Layer adapters only: a prompt-learning adapter is not part of a mixed batch (as in PEFT).
pub fn generate_batch_ids(
    model: &LlamaForCausalLM,
    requests: &[BatchRequest<'_>],
    s: &Sampling,
    eos: Option<u32>,
) -> Result<Vec<Vec<u32>>> {
    let device = model.device().clone();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); requests.len()];
    let mut caches: Vec<KvCache> = Vec::with_capacity(requests.len());
    let mut rngs: Vec<PeftRng> = (0..requests.len())
        .map(|i| PeftRng::new(s.seed).fork(&i.to_string()))
        .collect();
    // The next token of every request still running.
    let mut next: Vec<Option<u32>> = Vec::with_capacity(requests.len());
    for (i, r) in requests.iter().enumerate() {
        if r.ids.is_empty() {
            return Err(crate::error::ModelError::Invalid(format!(
                "request {i} has an empty prompt"
            )));
        }
        let mut cache = KvCache::new();
        let ctx = ForwardCtx::inference().with_adapter_names(&[r.adapter]);
        let input = Tensor::new(r.ids, &device)?.unsqueeze(0)?;
        let logits = model.forward(ForwardInput::ids(&input).with_cache(&mut cache), &ctx)?;
        let last = logits
            .i((0, logits.dim(1)? - 1))?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        caches.push(cache);
        next.push(Some(sample(&last, s, &mut rngs[i])));
    }
    for _ in 0..s.max_new_tokens {
        // Take each request's token; those that ended (EOS or the limit) leave the batch.
        let mut running: Vec<usize> = Vec::new();
        for (i, tok) in next.iter_mut().enumerate() {
            let Some(t) = *tok else { continue };
            if Some(t) == eos || out[i].len() >= s.max_new_tokens {
                *tok = None;
                continue;
            }
            out[i].push(t);
            if out[i].len() < s.max_new_tokens {
                running.push(i);
            } else {
                *tok = None;
            }
        }
        if running.is_empty() {
            break;
        }
        running.sort_by_key(|&i| requests[i].adapter);
        let tokens: Vec<u32> = running.iter().filter_map(|&i| next[i]).collect();
        let names: Vec<&str> = running.iter().map(|&i| requests[i].adapter).collect();
        let ctx = ForwardCtx::inference().with_adapter_names(&names);
        // The running requests' caches, moved out for the step and back after it.
        let mut taken: Vec<KvCache> = running
            .iter()
            .map(|&i| std::mem::take(&mut caches[i]))
            .collect();
        let mut rows: Vec<&mut KvCache> = taken.iter_mut().collect();
        let logits = model.decode_batch(&tokens, &mut rows, &ctx);
        for (k, &i) in running.iter().enumerate() {
            caches[i] = std::mem::take(&mut taken[k]);
        }
        let logits = logits?;
        for (row, &i) in running.iter().enumerate() {
            let last = logits.i(row)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            next[i] = Some(sample(&last, s, &mut rngs[i]));
        }
    }
    Ok(out)
}
