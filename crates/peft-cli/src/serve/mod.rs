//! `peft serve`: an OpenAI-compatible HTTP server for a base model and any number of LoRA adapters, with
//! continuous batching across requests and adapters.
//!
//! ```text
//! peft serve --model <HF dir | .gguf> [--adapter NAME=DIR …] [--host 127.0.0.1] [--port 8000]
//! ```
//!
//! Endpoints (bodies and answers as OpenAI's and vLLM's):
//! - `POST /v1/completions`, `POST /v1/chat/completions`: `model` is the base model's name
//!   (`--served-model-name`, by default the model path's file name) or an adapter's; `prompt` (a string, a
//!   list of one string, or token ids) or `messages` (rendered with the tokenizer's chat template);
//!   `max_tokens` (`max_completion_tokens`), `temperature` (default 1; 0 is greedy), `top_p`, `seed`,
//!   `stop` (strings), `stream` (server-sent events ending in `data: [DONE]`; `stream_options.include_usage`),
//!   `echo` (completions), `ignore_eos` (vLLM's: decode past EOS, for fixed-length benchmarks). `usage` counts prompt and completion tokens (EOS excluded). Only `n = 1`.
//! - `GET /v1/models`: the base model, then each adapter with `parent` = the base's name.
//! - `POST /v1/load_lora_adapter` `{"lora_name", "lora_path"}` and `POST /v1/unload_lora_adapter`
//!   `{"lora_name"}` (vLLM's bodies): applied by the scheduler between two decode steps, so requests in flight
//!   continue. **Unloading an adapter that requests still use**: it disappears from `/v1/models` and new
//!   requests for it get 404 at once; the requests already accepted with it finish with it, and its weights are
//!   freed when the last one ends (loading the same name again before that is a 409).
//! - `GET /health`: 200.
//!
//! Errors are OpenAI's JSON (`{"error": {"message", "type", "param", "code"}}`, [`ApiError`]): 400 for bad JSON,
//! bad fields, or a prompt over `--max-prompt-tokens` / the context (`context_length_exceeded`); 404
//! `model_not_found`; 429 when the request queue (`--max-queue`) is full; 503 while shutting down.
//!
//! One scheduler thread owns the model (`engine`): HTTP handlers validate and tokenize, send the request over a
//! bounded channel and receive its text over a channel of its own. Each iteration admits waiting requests up to
//! `--max-batch` running (each prompt prefilled alone with its adapter into its own KV cache), then runs one
//! batched decode step for all running requests
//! ([`peft_models::llama::LlamaForCausalLM::decode_batch`]): one mixed batch, rows sorted by adapter, each row
//! with its own adapter and cache. Greedy outputs equal `peft generate`'s with the same adapter and prompt;
//! sampled ones too for the same `seed` (each request has its own generator). Adapters must be layer
//! adapters (every layer method takes part in a mixed batch, DoRA included; prompt learning does not) and keep
//! `bias = "none"` (trained biases would change the shared base); others are refused when loaded. SIGINT / SIGTERM stop accepting connections, let the requests in
//! flight finish, then stop the scheduler.
//!
//! Not done: chunked prefill (a long prompt's prefill delays the running requests' next token by its
//! duration), `logprobs`, `n > 1`, tool calls, several prompts per completion request.

mod api;
mod engine;
mod http;
#[cfg(test)]
mod tests;

pub use api::ApiError;

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use engine::{Engine, Limits, Msg, Shared};
use peft::PeftModel;
use peft_models::LoadedModel;
use peft_models::llama::LlamaForCausalLM;
use peft_models::load::require_tokenizer;
use peft_models::tokenizer::Tokenizer;
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tokio::sync::mpsc;

/// `peft serve` arguments.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The base model: an HF directory or a GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// Quantization of the base model.
    #[command(flatten)]
    pub quant: crate::quant::QuantArgs,
    /// An adapter to serve, as `NAME=DIR` (repeatable); requests name it in `model`.
    #[arg(long, value_name = "NAME=DIR")]
    pub adapter: Vec<String>,
    /// The address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// The port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The base model's name in requests and `/v1/models` (default: the model path's file name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Requests decoded together at most (the batch of each decode step).
    #[arg(long, default_value_t = 16)]
    pub max_batch: usize,
    /// Requests waiting beyond the free places of the batch at most; more are answered 429.
    #[arg(long, default_value_t = 256)]
    pub max_queue: usize,
    /// The longest prompt accepted, in tokens (default and at most: the context length − 1).
    #[arg(long)]
    pub max_prompt_tokens: Option<usize>,
}

/// How a [`Server`] serves.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// The base model's name in requests and `/v1/models`.
    pub base_name: String,
    /// Where the base model came from (`root` in `/v1/models`).
    pub base_root: String,
    /// Requests decoded together at most.
    pub max_batch: usize,
    /// Requests waiting for a place in the batch at most.
    pub max_queue: usize,
    /// The longest prompt accepted (`None`: the context length − 1).
    pub max_prompt_tokens: Option<usize>,
    /// A pause after every decode step (`None` in service): tests use it to keep requests in flight.
    pub step_delay: Option<std::time::Duration>,
}

impl ServerConfig {
    /// Defaults: batch 16, queue 256, prompts up to the context length − 1.
    pub fn new(base_name: impl Into<String>) -> Self {
        let base_name = base_name.into();
        Self {
            base_root: base_name.clone(),
            base_name,
            max_batch: 16,
            max_queue: 256,
            max_prompt_tokens: None,
            step_delay: None,
        }
    }
}

/// A started scheduler with its model, ready to serve HTTP ([`Server::serve`]).
pub struct Server {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Msg>,
    engine: std::thread::JoinHandle<()>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("base_name", &self.shared.base_name)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Loads the adapters (`(name, directory)`) into the model and starts the scheduler thread. An adapter
    /// that cannot be served (see the [module docs](self)) is an error here.
    pub fn start(
        model: LlamaForCausalLM,
        tokenizer: Tokenizer,
        adapters: &[(String, PathBuf)],
        config: ServerConfig,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(config.max_batch >= 1, "--max-batch must be at least 1");
        let device = model.device().clone();
        let max_model_len = model.config().max_position_embeddings.max(2);
        let shared = Arc::new(Shared {
            base_name: config.base_name.clone(),
            base_root: config.base_root.clone(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            tokenizer: Arc::new(tokenizer),
            max_model_len,
            max_prompt_tokens: config.max_prompt_tokens.unwrap_or(max_model_len - 1),
            adapters: RwLock::new(Vec::new()),
        });
        let mut engine = Engine {
            model: PeftModel::new(model, 0),
            shared: shared.clone(),
            limits: Limits {
                max_batch: config.max_batch,
                max_queue: config.max_queue,
                step_delay: config.step_delay,
            },
            device,
        };
        for (name, dir) in adapters {
            engine
                .load(name, dir)
                .map_err(|e| anyhow::anyhow!("adapter {name}={}: {}", dir.display(), e.message))?;
            if let Ok(mut a) = shared.adapters.write() {
                a.push((name.clone(), dir.display().to_string()));
            }
        }
        // Room for the queue plus the loads and unloads that may wait behind it.
        let (tx, rx) = mpsc::channel(config.max_queue + config.max_batch + 16);
        let engine = std::thread::Builder::new()
            .name("peft-serve-scheduler".into())
            .spawn(move || engine.run(rx))
            .context("starting the scheduler thread")?;
        Ok(Self { shared, tx, engine })
    }

    /// The base model's name.
    pub fn base_name(&self) -> &str {
        &self.shared.base_name
    }

    /// Serves HTTP on `listener` until `shutdown` completes, then lets the requests in flight finish (axum's
    /// graceful shutdown) and stops the scheduler.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let app = http::router(http::AppState {
            shared: self.shared.clone(),
            tx: self.tx.clone(),
        });
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
        // Every connection is closed: stop the scheduler once it has nothing left.
        let _ = self.tx.send(Msg::Shutdown).await;
        drop(self.tx);
        let engine = self.engine;
        tokio::task::spawn_blocking(move || engine.join())
            .await
            .context("waiting for the scheduler")?
            .map_err(|_| anyhow::anyhow!("the scheduler thread panicked"))?;
        served.context("serving HTTP")
    }
}

/// `NAME=DIR` → `(NAME, DIR)`.
pub fn parse_adapter_arg(s: &str) -> anyhow::Result<(String, PathBuf)> {
    match s.split_once('=') {
        Some((name, dir)) if !name.is_empty() && !dir.is_empty() => {
            Ok((name.to_string(), PathBuf::from(dir)))
        }
        _ => anyhow::bail!("--adapter {s}: expected NAME=DIR"),
    }
}

/// The default served name of a model path: its file name (a directory's last component, a GGUF's file
/// name without `.gguf`).
fn default_name(path: &Path) -> String {
    let name = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    name.map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "base".into())
}

/// Waits for SIGINT (Ctrl-C) or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = Box::pin(async {
        let _ = tokio::signal::ctrl_c().await;
    });
    #[cfg(unix)]
    {
        let term = Box::pin(async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        });
        futures_util::future::select(ctrl_c, term).await;
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}

/// Runs `peft serve`: loads the model (as `peft generate` does) and the adapters, prints the address, and
/// serves until SIGINT / SIGTERM.
pub fn run(args: &ServeArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let adapters = args
        .adapter
        .iter()
        .map(|a| parse_adapter_arg(a))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let LoadedModel {
        model, tokenizer, ..
    } = peft_models::load_model_with(&args.model, &device, &args.quant.load_options()?)?;
    let tok = require_tokenizer(tokenizer.as_ref(), "serving")?.clone();
    let base_name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| default_name(&args.model));
    let config = ServerConfig {
        base_root: args.model.display().to_string(),
        max_batch: args.max_batch,
        max_queue: args.max_queue,
        max_prompt_tokens: args.max_prompt_tokens,
        step_delay: None,
        ..ServerConfig::new(base_name)
    };
    let server = Server::start(model, tok, &adapters, config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
            .await
            .with_context(|| format!("binding {}:{}", args.host, args.port))?;
        let addr = listener.local_addr()?;
        writeln!(
            out,
            "peft serve: `{}` and {} adapter(s) on http://{addr}",
            server.base_name(),
            adapters.len()
        )?;
        out.flush()?;
        server.serve(listener, shutdown_signal()).await
    })?;
    writeln!(out, "peft serve: stopped")?;
    Ok(())
}
