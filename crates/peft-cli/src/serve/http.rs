//! The HTTP side: axum handlers that validate and tokenize requests, hand them to the scheduler over a bounded
//! channel and answer with JSON or server-sent events.

use super::api::{
    ApiError, ChatRequest, CommonParams, CompletionRequest, Content, LoadLora, Prompt, UnloadLora,
    parse_body,
};
use super::engine::{Event, Finish, GenRequest, Msg, Shared};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{StatusCode, Uri};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use peft_models::generate::Sampling;
use peft_models::tokenizer::ChatMessage;
use serde_json::{Value, json};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot};

/// What every handler holds.
#[derive(Clone)]
pub(crate) struct AppState {
    pub shared: Arc<Shared>,
    pub tx: mpsc::Sender<Msg>,
}

/// The routes.
pub(crate) fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/load_lora_adapter", post(load_lora))
        .route("/v1/unload_lora_adapter", post(unload_lora))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn health() -> StatusCode {
    StatusCode::OK
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError {
        status: 404,
        code: Some("not_found"),
        ..ApiError::bad_request(format!("Not found: {}", uri.path()))
    }
}

async fn method_not_allowed(uri: Uri) -> ApiError {
    ApiError {
        status: 405,
        code: Some("method_not_allowed"),
        ..ApiError::bad_request(format!("Method not allowed on {}", uri.path()))
    }
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| ApiError {
        status: e.status().as_u16(),
        ..ApiError::bad_request(e.body_text())
    })
}

async fn models(State(st): State<AppState>) -> Response {
    let s = &st.shared;
    let entry = |id: &str, root: &str, parent: Option<&str>| {
        json!({
            "id": id,
            "object": "model",
            "created": s.created,
            "owned_by": "peft-rs",
            "root": root,
            "parent": parent,
            "max_model_len": s.max_model_len,
        })
    };
    let mut data = vec![entry(&s.base_name, &s.base_root, None)];
    for (name, path) in s.adapter_list() {
        data.push(entry(&name, &path, Some(&s.base_name)));
    }
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

async fn load_lora(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<String, ApiError> {
    let req: LoadLora = parse_body(&body_bytes(body)?)?;
    let (reply, answer) = oneshot::channel();
    let name = req.lora_name.clone();
    control(
        &st,
        Msg::Load {
            name: req.lora_name,
            path: req.lora_path.into(),
            reply,
        },
        answer,
    )
    .await?;
    Ok(format!(
        "Success: LoRA adapter '{name}' added successfully."
    ))
}

async fn unload_lora(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<String, ApiError> {
    let req: UnloadLora = parse_body(&body_bytes(body)?)?;
    let (reply, answer) = oneshot::channel();
    let name = req.lora_name.clone();
    control(
        &st,
        Msg::Unload {
            name: req.lora_name,
            reply,
        },
        answer,
    )
    .await?;
    Ok(format!(
        "Success: LoRA adapter '{name}' removed successfully."
    ))
}

/// Sends a load / unload to the scheduler (waiting for room in its channel) and waits for its answer.
async fn control(
    st: &AppState,
    msg: Msg,
    answer: oneshot::Receiver<Result<(), ApiError>>,
) -> Result<(), ApiError> {
    st.tx.send(msg).await.map_err(|_| ApiError::unavailable())?;
    answer.await.map_err(|_| ApiError::unavailable())?
}

/// Which endpoint a request came to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// A request validated and tokenized.
struct Prepared {
    kind: Kind,
    model: String,
    adapter: Option<String>,
    prompt: Vec<u32>,
    sampling: Sampling,
    stop: Vec<String>,
    ignore_eos: bool,
    stream: bool,
    include_usage: bool,
    echo: Option<String>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Checks the shared fields and the prompt's length; resolves the model name.
fn prepare(
    st: &AppState,
    kind: Kind,
    common: CommonParams,
    prompt: Vec<u32>,
    echo: Option<String>,
) -> Result<Prepared, ApiError> {
    let s = &st.shared;
    let model = common
        .model
        .ok_or_else(|| ApiError::bad_param("model", "you must provide a model parameter"))?;
    let adapter = if model == s.base_name {
        None
    } else if s.adapter_list().iter().any(|(n, _)| *n == model) {
        Some(model.clone())
    } else {
        return Err(ApiError::model_not_found(&model));
    };
    if let Some(n) = common.n
        && n != 1
    {
        return Err(ApiError::bad_param("n", "only n = 1 is supported"));
    }
    let temperature = common.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(ApiError::bad_param(
            "temperature",
            format!("temperature must be ≥ 0, got {temperature}"),
        ));
    }
    let top_p = common.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_param(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    if prompt.is_empty() {
        return Err(ApiError::bad_param("prompt", "the prompt is empty"));
    }
    let vocab = s.tokenizer.vocab_size();
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::bad_param(
            "prompt",
            format!("token id {bad} is outside the vocabulary ({vocab} tokens)"),
        ));
    }
    let max_len = s.max_model_len;
    let limit = s.max_prompt_tokens.min(max_len - 1);
    if prompt.len() > limit {
        return Err(ApiError::context_length(format!(
            "This model's maximum prompt length is {limit} tokens. However, your prompt has {} tokens.",
            prompt.len()
        )));
    }
    let max_tokens = match common.max_completion_tokens.or(common.max_tokens) {
        Some(0) => {
            return Err(ApiError::bad_param(
                "max_tokens",
                "max_tokens must be at least 1",
            ));
        }
        Some(m) => m,
        None if kind == Kind::Completion => 16,
        None => max_len - prompt.len(),
    };
    if prompt.len() + max_tokens > max_len {
        return Err(ApiError::context_length(format!(
            "This model's maximum context length is {max_len} tokens. However, you requested {} tokens \
             ({} in the prompt, {max_tokens} in the completion).",
            prompt.len() + max_tokens,
            prompt.len()
        )));
    }
    let seed = common.seed.unwrap_or_else(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        t ^ NEXT_ID
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
    });
    Ok(Prepared {
        kind,
        model,
        adapter,
        prompt,
        sampling: Sampling {
            max_new_tokens: max_tokens,
            temperature,
            top_p,
            seed,
        },
        stop: common.stop.map(|s| s.into_vec()).unwrap_or_default(),
        ignore_eos: common.ignore_eos,
        stream: common.stream,
        include_usage: common.stream_options.is_some_and(|o| o.include_usage),
        echo,
    })
}

async fn completions(State(st): State<AppState>, body: Result<Bytes, BytesRejection>) -> Response {
    let run = async {
        let req: CompletionRequest = parse_body(&body_bytes(body)?)?;
        let tok = st.shared.tokenizer.clone();
        let encode = |t: &str| {
            tok.encode(t, true)
                .map_err(|e| ApiError::bad_param("prompt", e.to_string()))
        };
        let (ids, text) = match req.prompt {
            None => return Err(ApiError::bad_param("prompt", "you must provide a prompt")),
            Some(Prompt::Text(t)) => (encode(&t)?, t),
            Some(Prompt::Texts(mut v)) if v.len() == 1 => {
                let t = v.remove(0);
                (encode(&t)?, t)
            }
            Some(Prompt::Texts(_)) => {
                return Err(ApiError::bad_param(
                    "prompt",
                    "one prompt per request is supported",
                ));
            }
            Some(Prompt::Ids(ids)) => {
                let t = tok.decode(&ids, false).unwrap_or_default();
                (ids, t)
            }
        };
        let echo = req.echo.then_some(text);
        let p = prepare(&st, Kind::Completion, req.common, ids, echo)?;
        respond(&st, p).await
    };
    run.await.unwrap_or_else(|e| e.into_response())
}

async fn chat_completions(
    State(st): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let run = async {
        let req: ChatRequest = parse_body(&body_bytes(body)?)?;
        let messages = req
            .messages
            .ok_or_else(|| ApiError::bad_param("messages", "you must provide messages"))?;
        if messages.is_empty() {
            return Err(ApiError::bad_param("messages", "messages is empty"));
        }
        let mut chat = Vec::with_capacity(messages.len());
        for m in messages {
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut t = String::new();
                    for p in parts {
                        match (p.kind.as_str(), p.text) {
                            ("text", Some(x)) => t.push_str(&x),
                            (k, _) => {
                                return Err(ApiError::bad_param(
                                    "messages",
                                    format!("content parts of type `{k}` are not supported"),
                                ));
                            }
                        }
                    }
                    t
                }
            };
            chat.push(ChatMessage::new(m.role, content));
        }
        let tok = &st.shared.tokenizer;
        let text = tok
            .apply_chat_template(&chat, true)
            .map_err(|e| ApiError::bad_param("messages", e.to_string()))?;
        let ids = tok
            .encode(&text, false)
            .map_err(|e| ApiError::bad_param("messages", e.to_string()))?;
        let p = prepare(&st, Kind::Chat, req.common, ids, None)?;
        respond(&st, p).await
    };
    run.await.unwrap_or_else(|e| e.into_response())
}

/// Queues the request and answers: JSON once it is done, or SSE chunks as the text comes.
async fn respond(st: &AppState, p: Prepared) -> Result<Response, ApiError> {
    let (etx, mut erx) = mpsc::unbounded_channel();
    let msg = Msg::Generate(GenRequest {
        adapter: p.adapter.clone(),
        prompt: p.prompt.clone(),
        sampling: p.sampling.clone(),
        stop: p.stop.clone(),
        ignore_eos: p.ignore_eos,
        events: etx,
    });
    st.tx.try_send(msg).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => ApiError::busy(),
        mpsc::error::TrySendError::Closed(_) => ApiError::unavailable(),
    })?;
    match erx.recv().await {
        Some(Event::Accepted) => {}
        Some(Event::Error(e)) => return Err(e),
        Some(_) => return Err(ApiError::internal("the scheduler answered out of order")),
        None => return Err(ApiError::unavailable()),
    }
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let ids = Ids {
        id: match p.kind {
            Kind::Completion => format!("cmpl-{n}"),
            Kind::Chat => format!("chatcmpl-{n}"),
        },
        created: now(),
        model: p.model.clone(),
        kind: p.kind,
    };
    if p.stream {
        return Ok(stream(ids, erx, p.include_usage, p.echo).into_response());
    }
    let mut text = p.echo.unwrap_or_default();
    loop {
        match erx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done {
                finish,
                prompt_tokens,
                completion_tokens,
            }) => {
                let choice = match p.kind {
                    Kind::Completion => json!({
                        "index": 0, "text": text, "logprobs": null, "finish_reason": finish.as_str(),
                    }),
                    Kind::Chat => json!({
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": null,
                        "finish_reason": finish.as_str(),
                    }),
                };
                let mut body = ids.head(false);
                body["choices"] = json!([choice]);
                body["usage"] = usage(prompt_tokens, completion_tokens);
                return Ok(axum::Json(body).into_response());
            }
            Some(Event::Error(e)) => return Err(e),
            Some(Event::Accepted) => {}
            None => return Err(ApiError::unavailable()),
        }
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// The fields every response and chunk of one request share.
struct Ids {
    id: String,
    created: u64,
    model: String,
    kind: Kind,
}

impl Ids {
    /// `{id, object, created, model}`; `chunk` for a streamed chat chunk's object name.
    fn head(&self, chunk: bool) -> Value {
        let object = match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        };
        json!({"id": self.id, "object": object, "created": self.created, "model": self.model})
    }

    /// A streamed chunk with `text` (or, for chat, `delta`) and a finish reason.
    fn chunk(&self, delta: Value, finish: Option<Finish>) -> String {
        let mut v = self.head(true);
        let finish = finish.map(|f| f.as_str());
        v["choices"] = match self.kind {
            Kind::Completion => json!([{
                "index": 0,
                "text": delta.get("content").cloned().unwrap_or(json!("")),
                "logprobs": null,
                "finish_reason": finish,
            }]),
            Kind::Chat => {
                json!([{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}])
            }
        };
        v.to_string()
    }
}

/// The SSE answer: one `data:` chunk per piece of text, the finish reason, the usage if asked, `[DONE]`.
fn stream(
    ids: Ids,
    rx: mpsc::UnboundedReceiver<Event>,
    include_usage: bool,
    echo: Option<String>,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, Infallible>>> {
    let mut queue = VecDeque::new();
    if ids.kind == Kind::Chat {
        queue.push_back(ids.chunk(json!({"role": "assistant", "content": ""}), None));
    }
    if let Some(e) = echo {
        queue.push_back(ids.chunk(json!({"content": e}), None));
    }
    let state = (ids, rx, queue, false);
    let s = futures_util::stream::unfold(
        state,
        move |(ids, mut rx, mut queue, mut done)| async move {
            loop {
                if let Some(d) = queue.pop_front() {
                    return Some((Ok(SseEvent::default().data(d)), (ids, rx, queue, done)));
                }
                if done {
                    return None;
                }
                match rx.recv().await {
                    Some(Event::Text(t)) => queue.push_back(ids.chunk(json!({"content": t}), None)),
                    Some(Event::Done {
                        finish,
                        prompt_tokens,
                        completion_tokens,
                    }) => {
                        queue.push_back(ids.chunk(json!({}), Some(finish)));
                        if include_usage {
                            let mut v = ids.head(true);
                            v["choices"] = json!([]);
                            v["usage"] = usage(prompt_tokens, completion_tokens);
                            queue.push_back(v.to_string());
                        }
                        queue.push_back("[DONE]".into());
                        done = true;
                    }
                    Some(Event::Error(e)) => {
                        queue.push_back(e.body().to_string());
                        queue.push_back("[DONE]".into());
                        done = true;
                    }
                    Some(Event::Accepted) => {}
                    None => {
                        queue.push_back(ApiError::unavailable().body().to_string());
                        queue.push_back("[DONE]".into());
                        done = true;
                    }
                }
            }
        },
    );
    Sse::new(s)
}
