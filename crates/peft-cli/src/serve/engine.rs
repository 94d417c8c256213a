//! The scheduler: one thread owns the model and runs continuous batching.
//!
//! Each iteration it takes every message waiting in its channel (new requests join the waiting queue; adapter
//! loads and unloads run at once, between two steps, so requests in flight continue), admits waiting requests
//! while fewer than `max_batch` run (each prompt prefilled alone, with its own adapter, into its own
//! [`KvCache`]), then runs **one** batched decode step ([`LlamaForCausalLM::decode_batch`]) for every running
//! request, rows sorted by adapter, each row with its own adapter (PEFT's mixed batch). Tokens are sampled per
//! request with its own seed and sent to the request's channel as text.

use super::api::ApiError;
use candle_core::{DType, Device, IndexOp, Tensor};
use peft::layer::BASE_ADAPTER_NAME;
use peft::{ForwardCtx, PeftModel, PeftRng};
use peft_models::generate::{Sampling, sample};
use peft_models::llama::{ForwardInput, KvCache, LlamaForCausalLM};
use peft_models::tokenizer::{StreamDecoder, Tokenizer};
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use tokio::sync::{mpsc, oneshot};

/// Why a completion ended, as OpenAI's `finish_reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Finish {
    /// The EOS token or a stop string.
    Stop,
    /// `max_tokens` or the context length.
    Length,
}

impl Finish {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// What the scheduler sends a request's handler.
#[derive(Debug)]
pub(crate) enum Event {
    /// The request is queued (the first event of every accepted request).
    Accepted,
    /// More text of the completion.
    Text(String),
    /// The completion is done.
    Done {
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    /// The request failed (before `Accepted`: it was refused).
    Error(ApiError),
}

/// One generation request.
#[derive(Debug)]
pub(crate) struct GenRequest {
    /// The adapter, or `None` for the base model.
    pub adapter: Option<String>,
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// Tokens, temperature, top-p and seed.
    pub sampling: Sampling,
    /// Stop strings (the completion ends before the first one).
    pub stop: Vec<String>,
    /// Decode past EOS (vLLM's `ignore_eos`).
    pub ignore_eos: bool,
    /// Where the events go.
    pub events: mpsc::UnboundedSender<Event>,
}

/// A message to the scheduler.
#[derive(Debug)]
pub(crate) enum Msg {
    /// Generate.
    Generate(GenRequest),
    /// Load an adapter directory under a name.
    Load {
        name: String,
        path: PathBuf,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// Unload an adapter.
    Unload {
        name: String,
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// Finish the requests in flight and stop.
    Shutdown,
}

/// What the HTTP side reads without asking the scheduler: the names served.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The base model's name.
    pub base_name: String,
    /// Where the base model came from.
    pub base_root: String,
    /// When the server started (Unix seconds).
    pub created: u64,
    /// The tokenizer (prompts are tokenized by the handlers).
    pub tokenizer: Arc<Tokenizer>,
    /// The context length (`max_position_embeddings`).
    pub max_model_len: usize,
    /// The longest prompt accepted.
    pub max_prompt_tokens: usize,
    /// The adapters served, in load order, with their directories.
    pub adapters: RwLock<Vec<(String, String)>>,
}

impl Shared {
    /// The adapters served now.
    pub(crate) fn adapter_list(&self) -> Vec<(String, String)> {
        self.adapters.read().map(|a| a.clone()).unwrap_or_default()
    }

    fn set_adapters(&self, f: impl FnOnce(&mut Vec<(String, String)>)) {
        if let Ok(mut a) = self.adapters.write() {
            f(&mut a)
        }
    }
}

/// The scheduler's limits.
#[derive(Clone, Debug)]
pub(crate) struct Limits {
    pub max_batch: usize,
    pub max_queue: usize,
    pub step_delay: Option<std::time::Duration>,
}

/// A request being decoded.
struct Running<'t> {
    req: GenRequest,
    /// The adapter name given to the mixed batch (`__base__` for the base).
    row_name: String,
    cache: KvCache,
    rng: PeftRng,
    decoder: StreamDecoder<'t>,
    /// Every token sampled, EOS excluded.
    generated: usize,
    /// Forward steps run (sampled tokens, EOS included).
    steps: usize,
    text: String,
    emitted: usize,
    last: u32,
    finished: Option<Finish>,
}

impl Running<'_> {
    /// Takes a sampled token: ends at EOS, decodes it, cuts at a stop string, sends the text that can no longer
    /// turn into a stop string, and ends at `max_tokens` or the context length.
    fn push(
        &mut self,
        next: u32,
        eos: Option<u32>,
        max_model_len: usize,
    ) -> peft_models::error::Result<()> {
        self.steps += 1;
        self.last = next;
        if Some(next) == eos && !self.req.ignore_eos {
            return self.finish(Finish::Stop);
        }
        self.generated += 1;
        if let Some(piece) = self.decoder.step(next)? {
            self.text.push_str(&piece);
            if self.cut_at_stop() {
                return self.finish(Finish::Stop);
            }
            self.emit(false);
        }
        if self.steps >= self.req.sampling.max_new_tokens || self.cache.len() + 1 > max_model_len {
            return self.finish(Finish::Length);
        }
        Ok(())
    }

    /// Truncates the text before the first stop string, if one appears; whether one did.
    fn cut_at_stop(&mut self) -> bool {
        let first = self
            .req
            .stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.text.find(s.as_str()))
            .min();
        match first {
            Some(at) => {
                self.text.truncate(at);
                true
            }
            None => false,
        }
    }

    /// Sends the text not sent yet, holding back (unless `all`) a tail that may begin a stop string.
    fn emit(&mut self, all: bool) {
        let mut end = self.text.len();
        if !all {
            for s in &self.req.stop {
                for (k, _) in s.char_indices().skip(1) {
                    if self.text.ends_with(&s[..k]) {
                        end = end.min(self.text.len() - k);
                    }
                }
            }
        }
        let end = end.max(self.emitted);
        if end > self.emitted {
            let piece = self.text[self.emitted..end].to_string();
            self.emitted = end;
            let _ = self.req.events.send(Event::Text(piece));
        }
    }

    fn finish(&mut self, why: Finish) -> peft_models::error::Result<()> {
        if why == Finish::Length
            && let Some(piece) = self.decoder.finish()?
        {
            self.text.push_str(&piece);
        }
        let why = if self.cut_at_stop() {
            Finish::Stop
        } else {
            why
        };
        self.emit(true);
        self.finished = Some(why);
        let _ = self.req.events.send(Event::Done {
            finish: why,
            prompt_tokens: self.req.prompt.len(),
            completion_tokens: self.generated,
        });
        Ok(())
    }
}

/// The scheduler's state.
pub(crate) struct Engine {
    pub model: PeftModel<LlamaForCausalLM>,
    pub shared: Arc<Shared>,
    pub limits: Limits,
    pub device: Device,
}

impl Engine {
    /// Runs until [`Msg::Shutdown`] (or every sender dropped) and no request is left.
    pub(crate) fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let tok = self.shared.tokenizer.clone();
        let tok: &Tokenizer = &tok;
        let eos = tok.eos_token_id();
        let mut waiting: VecDeque<GenRequest> = VecDeque::new();
        let mut running: Vec<Running<'_>> = Vec::new();
        // Requests admitted or queued per adapter, and adapters waiting for theirs to finish to be deleted.
        let mut users: HashMap<String, usize> = HashMap::new();
        let mut unloading: HashSet<String> = HashSet::new();
        let mut stopping = false;
        loop {
            if running.is_empty() && waiting.is_empty() {
                if stopping {
                    break;
                }
                match rx.blocking_recv() {
                    Some(m) => self.handle(
                        m,
                        &mut waiting,
                        0,
                        &mut users,
                        &mut unloading,
                        &mut stopping,
                    ),
                    None => break,
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(m) => self.handle(
                        m,
                        &mut waiting,
                        running.len(),
                        &mut users,
                        &mut unloading,
                        &mut stopping,
                    ),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        stopping = true;
                        break;
                    }
                }
            }
            // Clients that went away free their place.
            waiting.retain(|r| {
                let keep = !r.events.is_closed();
                if !keep {
                    release(&mut users, r.adapter.as_deref());
                }
                keep
            });
            for r in running.iter_mut() {
                if r.finished.is_none() && r.req.events.is_closed() {
                    r.finished = Some(Finish::Stop);
                }
            }
            // Admit.
            while running.len() < self.limits.max_batch {
                let Some(req) = waiting.pop_front() else {
                    break;
                };
                match self.prefill(req, tok, eos) {
                    Ok(r) => {
                        // Keep rows of one adapter together: the mixed batch then runs larger segments.
                        let at = running.partition_point(|x| x.row_name <= r.row_name);
                        running.insert(at, r);
                    }
                    Err(failed) => {
                        let (req, e) = *failed;
                        release(&mut users, req.adapter.as_deref());
                        let _ = req.events.send(Event::Error(e));
                    }
                }
            }
            self.retire(&mut running, &mut users, &mut unloading);
            if running.is_empty() {
                continue;
            }
            // One decode step for every running request.
            let stepped = self.step(&mut running, eos);
            if let Some(d) = self.limits.step_delay {
                std::thread::sleep(d);
            }
            if let Err(e) = stepped {
                let e = ApiError::internal(format!("decoding failed: {e}"));
                for r in running.iter_mut() {
                    let _ = r.req.events.send(Event::Error(e.clone()));
                    r.finished = Some(Finish::Stop);
                }
            }
            self.retire(&mut running, &mut users, &mut unloading);
        }
    }

    /// Drops finished requests, deleting adapters whose unload waited for them.
    fn retire(
        &mut self,
        running: &mut Vec<Running<'_>>,
        users: &mut HashMap<String, usize>,
        unloading: &mut HashSet<String>,
    ) {
        running.retain(|r| {
            if r.finished.is_some() {
                release(users, r.req.adapter.as_deref());
                false
            } else {
                true
            }
        });
        let done: Vec<String> = unloading
            .iter()
            .filter(|n| users.get(*n).copied().unwrap_or(0) == 0)
            .cloned()
            .collect();
        for n in done {
            unloading.remove(&n);
            let _ = self.model.delete_adapter(&n);
        }
    }

    fn handle(
        &mut self,
        m: Msg,
        waiting: &mut VecDeque<GenRequest>,
        running: usize,
        users: &mut HashMap<String, usize>,
        unloading: &mut HashSet<String>,
        stopping: &mut bool,
    ) {
        match m {
            Msg::Generate(req) => {
                let refuse = if *stopping {
                    Some(ApiError::unavailable())
                } else if waiting.len()
                    >= self.limits.max_queue + self.limits.max_batch.saturating_sub(running)
                {
                    // Full: `max_queue` waiting beyond the places free in the batch.
                    Some(ApiError::busy())
                } else {
                    match &req.adapter {
                        Some(a)
                            if unloading.contains(a) || !self.model.configs().contains_key(a) =>
                        {
                            Some(ApiError::model_not_found(a))
                        }
                        _ => None,
                    }
                };
                match refuse {
                    Some(e) => {
                        let _ = req.events.send(Event::Error(e));
                    }
                    None => {
                        if let Some(a) = &req.adapter {
                            *users.entry(a.clone()).or_default() += 1;
                        }
                        if req.events.send(Event::Accepted).is_ok() {
                            waiting.push_back(req);
                        } else {
                            release(users, req.adapter.as_deref());
                        }
                    }
                }
            }
            Msg::Load { name, path, reply } => {
                let r = if unloading.contains(&name) {
                    Err(ApiError::conflict(format!(
                        "The LoRA adapter '{name}' is being unloaded (requests still use it); retry when they \
                         are done."
                    )))
                } else {
                    self.load(&name, &path)
                };
                if r.is_ok() {
                    let p = path.display().to_string();
                    self.shared.set_adapters(|a| a.push((name, p)));
                }
                let _ = reply.send(r);
            }
            Msg::Unload { name, reply } => {
                let r = if unloading.contains(&name) || !self.model.configs().contains_key(&name) {
                    Err(ApiError {
                        status: 404,
                        code: Some("model_not_found"),
                        param: Some("lora_name".into()),
                        ..ApiError::bad_request(format!("The LoRA adapter '{name}' is not loaded."))
                    })
                } else {
                    self.shared.set_adapters(|a| a.retain(|(n, _)| *n != name));
                    if users.get(&name).copied().unwrap_or(0) == 0 {
                        let _ = self.model.delete_adapter(&name);
                    } else {
                        unloading.insert(name);
                    }
                    Ok(())
                };
                let _ = reply.send(r);
            }
            Msg::Shutdown => *stopping = true,
        }
    }

    /// Loads an adapter and checks that it can serve rows of a mixed batch.
    pub(super) fn load(&mut self, name: &str, path: &std::path::Path) -> Result<(), ApiError> {
        if name.is_empty() || name == BASE_ADAPTER_NAME || name == self.shared.base_name {
            return Err(ApiError::bad_param(
                "lora_name",
                format!(
                    "'{name}' cannot name an adapter (it is empty, reserved, or the base model's name)."
                ),
            ));
        }
        if self.model.configs().contains_key(name) {
            return Err(ApiError::bad_param(
                "lora_name",
                format!("The LoRA adapter '{name}' has already been loaded."),
            ));
        }
        // An adapter that trains biases writes them into the base, which every other request shares.
        let config = path.join("adapter_config.json");
        let text = std::fs::read_to_string(&config)
            .map_err(|e| ApiError::bad_param("lora_path", format!("{}: {e}", config.display())))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| ApiError::bad_param("lora_path", format!("{}: {e}", config.display())))?;
        if let Some(b) = value.get("bias").and_then(|b| b.as_str())
            && b != "none"
        {
            return Err(ApiError::bad_param(
                "lora_path",
                format!(
                    "{}: bias = \"{b}\" replaces the base model's biases, which every request shares; \
                     serve adapters with bias = \"none\" (or merge this one into the base)",
                    path.display()
                ),
            ));
        }
        self.model
            .load_adapter(path, name, &self.device)
            .map_err(|e| ApiError::bad_param("lora_path", format!("{}: {e}", path.display())))?;
        // Prompt learning, DoRA, … cannot take part in a mixed batch: refuse them now, not at the first request.
        let check = || -> peft::Result<()> {
            if self.model.prompt_adapter().is_some() {
                return Err(peft::PeftError::Invalid(
                    "prompt-learning adapters are not served".into(),
                ));
            }
            let ids = Tensor::new(&[[0u32]], &self.device)?;
            let ctx = ForwardCtx::inference().with_adapter_names(&[name]);
            self.model.model().forward(ForwardInput::ids(&ids), &ctx)?;
            Ok(())
        };
        if let Err(e) = check() {
            let _ = self.model.delete_adapter(name);
            return Err(ApiError::bad_param(
                "lora_path",
                format!("{}: this adapter cannot be served: {e}", path.display()),
            ));
        }
        Ok(())
    }

    /// Runs a request's prompt into a fresh cache with its adapter and takes its first token.
    fn prefill<'t>(
        &self,
        req: GenRequest,
        tok: &'t Tokenizer,
        eos: Option<u32>,
    ) -> Result<Running<'t>, Box<(GenRequest, ApiError)>> {
        let row_name = req
            .adapter
            .clone()
            .unwrap_or_else(|| BASE_ADAPTER_NAME.to_string());
        let run = || -> peft::Result<(Vec<f32>, KvCache)> {
            let input = Tensor::new(req.prompt.as_slice(), &self.device)?.unsqueeze(0)?;
            let ctx = ForwardCtx::inference().with_adapter_names(&[&row_name]);
            let mut cache = KvCache::new();
            let logits = self
                .model
                .model()
                .forward(ForwardInput::ids(&input).with_cache(&mut cache), &ctx)?;
            let last = logits.i((0, logits.dim(1)? - 1))?.to_dtype(DType::F32)?;
            Ok((last.to_vec1::<f32>()?, cache))
        };
        let (logits, cache) = match run() {
            Ok(l) => l,
            Err(e) => {
                return Err(Box::new((
                    req,
                    ApiError::internal(format!("prefill failed: {e}")),
                )));
            }
        };
        let mut r = Running {
            rng: PeftRng::new(req.sampling.seed),
            req,
            row_name,
            cache,
            decoder: tok.stream_decoder(true),
            generated: 0,
            steps: 0,
            text: String::new(),
            emitted: 0,
            last: 0,
            finished: None,
        };
        let next = sample(&logits, &r.req.sampling, &mut r.rng);
        let max_len = self.shared.max_model_len;
        if let Err(e) = r.push(next, eos, max_len) {
            let _ = r
                .req
                .events
                .send(Event::Error(ApiError::internal(e.to_string())));
            r.finished = Some(Finish::Stop);
        }
        Ok(r)
    }

    /// One batched decode step.
    fn step(&self, running: &mut [Running<'_>], eos: Option<u32>) -> peft::Result<()> {
        let tokens: Vec<u32> = running.iter().map(|r| r.last).collect();
        let names: Vec<&str> = running.iter().map(|r| r.row_name.as_str()).collect();
        let ctx = ForwardCtx::inference().with_adapter_names(&names);
        let logits = {
            let mut caches: Vec<&mut KvCache> = running.iter_mut().map(|r| &mut r.cache).collect();
            self.model
                .model()
                .decode_batch(&tokens, &mut caches, &ctx)?
        };
        let rows = logits.to_vec2::<f32>()?;
        let max_len = self.shared.max_model_len;
        for (r, row) in running.iter_mut().zip(rows) {
            let next = sample(&row, &r.req.sampling, &mut r.rng);
            if let Err(e) = r.push(next, eos, max_len) {
                let _ = r
                    .req
                    .events
                    .send(Event::Error(ApiError::internal(e.to_string())));
                r.finished = Some(Finish::Stop);
            }
        }
        Ok(())
    }
}

fn release(users: &mut HashMap<String, usize>, adapter: Option<&str>) {
    if let Some(a) = adapter
        && let Some(n) = users.get_mut(a)
    {
        *n = n.saturating_sub(1);
    }
}
