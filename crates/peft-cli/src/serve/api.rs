//! The request bodies `peft serve` accepts and its OpenAI-style errors.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

/// An error answered as OpenAI does: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.
///
/// ```
/// use peft_cli::serve::ApiError;
/// let e = ApiError::model_not_found("nope");
/// assert_eq!(e.status, 404);
/// assert_eq!(e.body()["error"]["code"], "model_not_found");
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: u16,
    /// What went wrong, for a human.
    pub message: String,
    /// OpenAI's error `type` (`invalid_request_error`, `rate_limit_error`, `server_error`).
    pub kind: &'static str,
    /// The request field at fault, if one is.
    pub param: Option<String>,
    /// A machine-readable code (`model_not_found`, `context_length_exceeded`, …), if any.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }

    /// A 400 about one field of the request.
    pub fn bad_param(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: Some(param.to_string()),
            ..Self::bad_request(message)
        }
    }

    /// A 404 `model_not_found`: no base model or adapter of that name is served.
    pub fn model_not_found(model: &str) -> Self {
        Self {
            status: 404,
            message: format!("The model `{model}` does not exist."),
            kind: "invalid_request_error",
            param: Some("model".into()),
            code: Some("model_not_found"),
        }
    }

    /// A 400 `context_length_exceeded`.
    pub fn context_length(message: impl Into<String>) -> Self {
        Self {
            code: Some("context_length_exceeded"),
            ..Self::bad_param("messages", message)
        }
    }

    /// A 409: the request conflicts with the server's state (an adapter being unloaded).
    pub fn conflict(message: impl Into<String>) -> Self {
        Self {
            status: 409,
            code: Some("conflict"),
            ..Self::bad_request(message)
        }
    }

    /// A 429: the request queue is full.
    pub fn busy() -> Self {
        Self {
            status: 429,
            message: "The server is busy: its request queue is full. Retry later.".into(),
            kind: "rate_limit_error",
            param: None,
            code: Some("rate_limit_exceeded"),
        }
    }

    /// A 503: the server is shutting down (or its scheduler has stopped).
    pub fn unavailable() -> Self {
        Self {
            status: 503,
            message: "The server is shutting down.".into(),
            kind: "server_error",
            param: None,
            code: Some("service_unavailable"),
        }
    }

    /// A 500 `server_error`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.body())).into_response()
    }
}

/// Parses a JSON body into `T`: malformed JSON or a wrong field is a 400 naming the problem.
pub(crate) fn parse_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() {
            "We could not parse the JSON body of your request"
        } else {
            "Invalid request body"
        };
        ApiError::bad_request(format!("{what}: {e}"))
    })
}

/// A completion prompt: a string, a list of one string, or token ids.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Prompt {
    /// Text.
    Text(String),
    /// Token ids.
    Ids(Vec<u32>),
    /// Texts (one only is served).
    Texts(Vec<String>),
}

/// `stop`: one string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Stop {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

impl Stop {
    pub(crate) fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

/// `stream_options`.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling fields `/v1/completions` and `/v1/chat/completions` share.
#[derive(Debug, Deserialize)]
pub(crate) struct CommonParams {
    pub model: Option<String>,
    pub max_tokens: Option<usize>,
    pub max_completion_tokens: Option<usize>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub stop: Option<Stop>,
    pub n: Option<usize>,
    #[serde(default)]
    pub ignore_eos: bool,
}

/// `/v1/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct CompletionRequest {
    pub prompt: Option<Prompt>,
    #[serde(default)]
    pub echo: bool,
    #[serde(flatten)]
    pub common: CommonParams,
}

/// A chat message's content: text or a list of parts (`{"type": "text", "text": …}`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// One part of a message's content.
#[derive(Debug, Deserialize)]
pub(crate) struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

/// One chat message.
#[derive(Debug, Deserialize)]
pub(crate) struct Message {
    pub role: String,
    pub content: Option<Content>,
}

/// `/v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub(crate) struct ChatRequest {
    pub messages: Option<Vec<Message>>,
    #[serde(flatten)]
    pub common: CommonParams,
}

/// vLLM's `/v1/load_lora_adapter` body.
#[derive(Debug, Deserialize)]
pub(crate) struct LoadLora {
    pub lora_name: String,
    pub lora_path: String,
}

/// vLLM's `/v1/unload_lora_adapter` body.
#[derive(Debug, Deserialize)]
pub(crate) struct UnloadLora {
    pub lora_name: String,
}
