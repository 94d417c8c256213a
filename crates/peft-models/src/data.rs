//! Training and evaluation data for `peft train` / `peft eval`: loading, splitting, batching and the loss.
//!
//! # Formats
//!
//! [`load_dataset`] picks the format from the path ([`DataFormat::Auto`]) unless [`DataConfig::format`]
//! says otherwise:
//!
//! * **plain text** (`.txt`, `.md`, `.text`, or a directory of such files): one file is one document. Every
//!   document is tokenized, followed by the EOS token, the documents are concatenated in order (files of a
//!   directory sorted by name) and cut into windows of `seq_len` tokens. The last, shorter window is kept
//!   when it has at least two tokens. Labels are the inputs (the shift happens in [`causal_lm_loss`]).
//! * **JSONL** (`.jsonl`): one JSON object a line, all of one kind:
//!   * `{"text": ...}`: one document a line, packed as plain text;
//!   * `{"prompt": ..., "completion": ...}`: one example a line, the tokens of the prompt, then of the
//!     completion, then EOS; the loss counts only the completion and the EOS; truncated to `seq_len`;
//!   * `{"messages": [{"role": ..., "content": ...}, ...]}`: a conversation rendered with the tokenizer's
//!     chat template; the loss counts only the assistant turns (see [`ExampleKind::Chat`]);
//!   * `{"input_ids": [...], "labels": [...]}` (`labels` optional, `-100` = ignored): used as they are,
//!     truncated to `seq_len`.
//!
//!   Other keys are ignored. A line that is empty, not JSON, not an object, of no kind or of another kind
//!   than the first line, or with a field of the wrong type, is an error naming the file and its 1-based
//!   line number.
//!
//! Labels follow the HuggingFace convention: `labels[t]` is the token at position `t`, [`IGNORE_INDEX`]
//! (`-100`) where it does not count, and position `t` of the logits is scored against `labels[t + 1]`.
//!
//! # Splits, batches, loss
//!
//! [`load_splits`] holds out the last 5 % of the examples ([`EVAL_FRACTION`], at least one) for
//! evaluation, unless an evaluation file is given. [`Batcher`] shuffles each epoch with
//! [`peft::PeftRng`], pads on the right and resumes exactly from its [`Batcher::state`].
//! [`causal_lm_loss`] is the differentiable mean token cross-entropy, [`causal_lm_sum_nll`] its sum for
//! evaluation and [`NllMeter`] the running mean NLL and perplexity.

mod batch;
mod loss;

use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde_json::Value;

pub use batch::{Batch, Batcher, EvalBatches, collate};
pub use loss::{NllMeter, causal_lm_loss, causal_lm_sum_nll, shifted_targets};

use crate::error::{ModelError, Result};
use crate::tokenizer::{ChatMessage, Tokenizer};

/// The label of a position that does not count in the loss (PyTorch's `ignore_index`, as HuggingFace).
pub const IGNORE_INDEX: i64 = -100;

/// The fraction of the examples held out for evaluation when no evaluation file is given (the last ones).
pub const EVAL_FRACTION: f64 = 0.05;

/// How a data file is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DataFormat {
    /// From the extension: `.txt`, `.md`, `.text` or a directory → [`DataFormat::Text`], `.jsonl` →
    /// [`DataFormat::Jsonl`].
    #[default]
    Auto,
    /// Plain text: the file (or each file of a directory) is one document.
    Text,
    /// One JSON object a line.
    Jsonl,
}

impl FromStr for DataFormat {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(DataFormat::Auto),
            "text" | "txt" | "plain" => Ok(DataFormat::Text),
            "jsonl" | "json-lines" | "jsonlines" => Ok(DataFormat::Jsonl),
            other => Err(ModelError::Invalid(format!(
                "unknown data format {other:?} (expected auto, text or jsonl)"
            ))),
        }
    }
}

/// Options of [`load_dataset`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataConfig {
    /// The length of a packed window and the most tokens an example keeps (longer ones are truncated).
    pub seq_len: usize,
    /// How the file is read ([`DataFormat::Auto`]: from its extension).
    pub format: DataFormat,
    /// Whether text, prompts and pre-chat documents are encoded with the tokenizer's special tokens
    /// (a BOS, for tokenizers that add one). Chat renderings never are: the template writes them.
    pub add_special_tokens: bool,
    /// The model's vocabulary size, when known: a token id (or label) at or beyond it is an error naming the
    /// file, the line and the id, instead of an index error deep in the embedding.
    pub vocab_size: Option<usize>,
}

impl DataConfig {
    /// Windows of `seq_len` tokens, format from the extension, special tokens added.
    pub fn new(seq_len: usize) -> Self {
        Self {
            seq_len,
            format: DataFormat::Auto,
            add_special_tokens: true,
            vocab_size: None,
        }
    }

    /// The same options, checking every token id and label against a vocabulary of `vocab_size`.
    pub fn with_vocab_size(mut self, vocab_size: usize) -> Self {
        self.vocab_size = Some(vocab_size);
        self
    }

    /// The same options with another format.
    pub fn with_format(mut self, format: DataFormat) -> Self {
        self.format = format;
        self
    }
}

/// What the examples of a [`Dataset`] were made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExampleKind {
    /// Packed windows of documents (plain text or JSONL `text`): labels are the inputs.
    Text,
    /// JSONL `prompt` + `completion`: only the completion and its EOS count.
    PromptCompletion,
    /// JSONL `messages`: only the assistant turns count. The span of assistant message `i` starts after
    /// the rendering of messages `..i` with the generation prompt and ends with the rendering of messages
    /// `..=i` (for ChatML: the answer, `<|im_end|>` and the newline after it).
    Chat,
    /// JSONL `input_ids` (and optionally `labels`), used as they are.
    Tokens,
}

impl ExampleKind {
    /// The name of the kind as in the file (`text`, `prompt/completion`, `messages`, `input_ids`).
    pub fn name(self) -> &'static str {
        match self {
            ExampleKind::Text => "text",
            ExampleKind::PromptCompletion => "prompt/completion",
            ExampleKind::Chat => "messages",
            ExampleKind::Tokens => "input_ids",
        }
    }
}

/// One training sequence: its token ids and labels (same length, [`IGNORE_INDEX`] where not counted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The token ids.
    pub input_ids: Vec<u32>,
    /// The labels: `labels[t]` is the target of position `t - 1`; [`IGNORE_INDEX`] where it does not count.
    pub labels: Vec<i64>,
}

impl Example {
    /// An example whose labels are its inputs (every next token counts).
    pub fn lm(input_ids: Vec<u32>) -> Self {
        let labels = input_ids.iter().map(|&t| i64::from(t)).collect();
        Self { input_ids, labels }
    }

    /// The number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    /// Whether the example has no token.
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    /// The number of predicted tokens that count in the loss (labels after the first one that are not
    /// [`IGNORE_INDEX`]).
    pub fn n_targets(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }

    fn truncate(&mut self, n: usize) {
        self.input_ids.truncate(n);
        self.labels.truncate(n);
    }
}

/// The examples of one data file (or of its training or evaluation split).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// The examples, in file order.
    pub examples: Vec<Example>,
    /// What they were made from.
    pub kind: ExampleKind,
    /// The file or directory they were read from.
    pub source: PathBuf,
    /// Lines (prompt/completion, chat, input_ids) dropped because nothing in them counted after the
    /// truncation to `seq_len` (a prompt filling the whole window, say).
    pub skipped: usize,
}

impl Dataset {
    /// The number of examples.
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether there is no example.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The number of tokens over all examples.
    pub fn n_tokens(&self) -> usize {
        self.examples.iter().map(Example::len).sum()
    }

    /// The number of tokens that count in the loss over all examples (see [`Example::n_targets`]).
    pub fn n_targets(&self) -> usize {
        self.examples.iter().map(Example::n_targets).sum()
    }

    /// Splits off the last `max(1, floor(fraction · len))` examples: `(first ones, last ones)`. Errors when
    /// fewer than two examples would leave nothing to train on.
    pub fn split_last(mut self, fraction: f64) -> Result<(Dataset, Dataset)> {
        let n = self.examples.len();
        if n < 2 {
            return Err(ModelError::Invalid(format!(
                "{}: {n} example(s) after tokenization: at least 2 are needed to hold out an evaluation \
                 split (give an evaluation file, or more data)",
                self.source.display()
            )));
        }
        let n_eval = ((n as f64 * fraction).floor() as usize).clamp(1, n - 1);
        let tail = self.examples.split_off(n - n_eval);
        let eval = Dataset {
            examples: tail,
            kind: self.kind,
            source: self.source.clone(),
            skipped: 0,
        };
        Ok((self, eval))
    }

    /// The examples in order, `batch_size` at a time (the last batch may be smaller), for evaluation.
    pub fn eval_batches<'a>(
        &'a self,
        batch_size: usize,
        pad_id: u32,
        device: &'a candle_core::Device,
    ) -> EvalBatches<'a> {
        EvalBatches::new(self, batch_size, pad_id, device)
    }
}

/// A training set and an evaluation set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Splits {
    /// The examples to train on.
    pub train: Dataset,
    /// The examples to evaluate on.
    pub eval: Dataset,
}

/// Loads the training data and its evaluation split: the whole of `eval` when given (then all of `train`
/// trains), else the last [`EVAL_FRACTION`] of `train`'s examples (at least one). `tokenizer` may be `None`
/// for pre-tokenized data (JSONL `input_ids`), as in [`load_dataset`].
pub fn load_splits<'t>(
    train: impl AsRef<Path>,
    eval: Option<&Path>,
    tokenizer: impl Into<Option<&'t Tokenizer>>,
    config: &DataConfig,
) -> Result<Splits> {
    let tokenizer = tokenizer.into();
    let train = load_dataset(train, tokenizer, config)?;
    match eval {
        Some(path) => {
            let eval = load_dataset(path, tokenizer, config)?;
            if train.is_empty() {
                return Err(empty_error(&train.source));
            }
            if eval.is_empty() {
                return Err(empty_error(&eval.source));
            }
            Ok(Splits { train, eval })
        }
        None => {
            let (train, eval) = train.split_last(EVAL_FRACTION)?;
            Ok(Splits { train, eval })
        }
    }
}

fn empty_error(path: &Path) -> ModelError {
    ModelError::Invalid(format!("{}: no example after tokenization", path.display()))
}

/// The id used to pad batches: the tokenizer's pad token, else its EOS (the usual choice for causal LMs
/// without a pad token), else 0 (also without a tokenizer). Padded positions are masked out of the attention
/// and the loss either way.
pub fn pad_token_id<'t>(tokenizer: impl Into<Option<&'t Tokenizer>>) -> u32 {
    tokenizer
        .into()
        .and_then(|t| t.pad_token_id().or_else(|| t.eos_token_id()))
        .unwrap_or(0)
}

/// The error for data that needs a tokenizer when the model has none.
fn no_tokenizer(path: &Path, kind: &str) -> ModelError {
    ModelError::Invalid(format!(
        "{}: {kind} data needs a tokenizer, and the model has none (no tokenizer.json); without one, give \
         pre-tokenized JSONL (`input_ids` rows)",
        path.display()
    ))
}

/// Reads, tokenizes and packs (or truncates) a data file or directory into examples of at most
/// `config.seq_len` tokens. See the [module documentation](self) for the formats.
///
/// `tokenizer` may be `None` (a model directory without `tokenizer.json`): pre-tokenized JSONL (`input_ids`)
/// loads as usual, every other kind is an error naming the missing `tokenizer.json`.
pub fn load_dataset<'t>(
    path: impl AsRef<Path>,
    tokenizer: impl Into<Option<&'t Tokenizer>>,
    config: &DataConfig,
) -> Result<Dataset> {
    let tokenizer = tokenizer.into();
    let path = path.as_ref();
    if config.seq_len < 2 {
        return Err(ModelError::Invalid(format!(
            "seq_len must be at least 2, got {}",
            config.seq_len
        )));
    }
    let meta = std::fs::metadata(path).map_err(|e| ModelError::io(path, e))?;
    let format = match config.format {
        DataFormat::Auto => detect_format(path, meta.is_dir())?,
        f => f,
    };
    match format {
        DataFormat::Text => {
            let tokenizer = tokenizer.ok_or_else(|| no_tokenizer(path, "plain-text"))?;
            let files = if meta.is_dir() {
                text_files_in(path)?
            } else {
                vec![path.to_path_buf()]
            };
            let mut docs = Vec::with_capacity(files.len());
            for f in &files {
                let text = read_text(f)?;
                let ids = tokenizer
                    .encode(&text, config.add_special_tokens)
                    .map_err(|e| ModelError::Invalid(format!("{}: {e}", f.display())))?;
                check_vocab(&ids, &[], config.vocab_size).map_err(|m| {
                    ModelError::Invalid(format!(
                        "{}: {m} (the tokenizer does not match the model)",
                        f.display()
                    ))
                })?;
                docs.push(ids);
            }
            let eos = eos_for_packing(tokenizer, path)?;
            check_vocab(&[eos], &[], config.vocab_size).map_err(|m| {
                ModelError::Invalid(format!("{}: the EOS token: {m}", path.display()))
            })?;
            Ok(Dataset {
                examples: pack(docs, eos, config.seq_len),
                kind: ExampleKind::Text,
                source: path.to_path_buf(),
                skipped: 0,
            })
        }
        DataFormat::Jsonl => {
            if meta.is_dir() {
                return Err(ModelError::Invalid(format!(
                    "{}: is a directory; JSONL data must be one file",
                    path.display()
                )));
            }
            let text = read_text(path)?;
            parse_jsonl(path, &text, tokenizer, config)
        }
        DataFormat::Auto => unreachable!("resolved above"),
    }
}

fn detect_format(path: &Path, is_dir: bool) -> Result<DataFormat> {
    if is_dir {
        return Ok(DataFormat::Text);
    }
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("txt" | "md" | "text" | "markdown") => Ok(DataFormat::Text),
        Some("jsonl") => Ok(DataFormat::Jsonl),
        _ => Err(ModelError::Invalid(format!(
            "{}: cannot tell the data format from the extension (.txt/.md: plain text, .jsonl: JSON \
             lines); give the format explicitly",
            path.display()
        ))),
    }
}

fn text_files_in(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| ModelError::io(dir, e))? {
        let entry = entry.map_err(|e| ModelError::io(dir, e))?;
        let p = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        let text_ext = matches!(
            p.extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("txt" | "md" | "text" | "markdown")
        );
        if !hidden && text_ext && p.is_file() {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(ModelError::Invalid(format!(
            "{}: no .txt or .md file in this directory",
            dir.display()
        )));
    }
    Ok(files)
}

fn read_text(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
    let mut text = String::from_utf8(bytes).map_err(|e| {
        ModelError::Invalid(format!(
            "{}: not UTF-8 text (byte {})",
            path.display(),
            e.utf8_error().valid_up_to()
        ))
    })?;
    if text.starts_with('\u{feff}') {
        text.drain(..3);
    }
    Ok(text)
}

fn eos_for_packing(tokenizer: &Tokenizer, path: &Path) -> Result<u32> {
    tokenizer.eos_token_id().ok_or_else(|| {
        ModelError::Invalid(format!(
            "{}: the tokenizer has no EOS token, needed to end documents and completions",
            path.display()
        ))
    })
}

/// Concatenates the documents, each followed by `eos`, and cuts windows of `seq_len` tokens (the last one
/// kept when it has at least two tokens).
fn pack(docs: Vec<Vec<u32>>, eos: u32, seq_len: usize) -> Vec<Example> {
    let mut stream = Vec::with_capacity(docs.iter().map(|d| d.len() + 1).sum());
    for mut d in docs {
        stream.append(&mut d);
        stream.push(eos);
    }
    stream
        .chunks(seq_len)
        .filter(|c| c.len() >= 2)
        .map(|c| Example::lm(c.to_vec()))
        .collect()
}

/// The kind of one JSONL object, from its keys.
fn line_kind(obj: &serde_json::Map<String, Value>) -> std::result::Result<ExampleKind, String> {
    let mut kinds = Vec::new();
    if obj.contains_key("messages") {
        kinds.push(ExampleKind::Chat);
    }
    if obj.contains_key("prompt") || obj.contains_key("completion") {
        kinds.push(ExampleKind::PromptCompletion);
    }
    if obj.contains_key("input_ids") {
        kinds.push(ExampleKind::Tokens);
    }
    if obj.contains_key("text") {
        kinds.push(ExampleKind::Text);
    }
    match kinds.as_slice() {
        [k] => Ok(*k),
        [] => Err(
            "no known field: expected \"text\", \"prompt\" + \"completion\", \"messages\" or \"input_ids\""
                .to_string(),
        ),
        many => Err(format!(
            "fields of several kinds ({}): one kind per line",
            many.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
        )),
    }
}

fn str_field<'a>(
    obj: &'a serde_json::Map<String, Value>,
    key: &str,
) -> std::result::Result<&'a str, String> {
    match obj.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!(
            "\"{key}\" must be a string, got {}",
            type_name(other)
        )),
        None => Err(format!("missing field \"{key}\"")),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn parse_jsonl(
    path: &Path,
    text: &str,
    tokenizer: Option<&Tokenizer>,
    config: &DataConfig,
) -> Result<Dataset> {
    let at = |line: usize, msg: String| {
        ModelError::Invalid(format!("{}: line {line}: {msg}", path.display()))
    };
    let mut kind: Option<(ExampleKind, usize)> = None;
    let mut docs: Vec<Vec<u32>> = Vec::new();
    let mut examples: Vec<Example> = Vec::new();
    let mut skipped = 0;
    let mut eos = None;
    for (i, raw) in text.lines().enumerate() {
        let no = i + 1;
        let line = raw.trim();
        if line.is_empty() {
            return Err(at(
                no,
                "empty line (one JSON object a line is expected)".into(),
            ));
        }
        let value: Value =
            serde_json::from_str(line).map_err(|e| at(no, format!("invalid JSON: {e}")))?;
        let Value::Object(obj) = value else {
            return Err(at(
                no,
                format!("expected a JSON object, got {}", type_name(&value)),
            ));
        };
        let k = line_kind(&obj).map_err(|m| at(no, m))?;
        match kind {
            None => kind = Some((k, no)),
            Some((first, first_no)) if first != k => {
                return Err(at(
                    no,
                    format!(
                        "a \"{}\" example, but line {first_no} is a \"{}\" example: one kind per file",
                        k.name(),
                        first.name()
                    ),
                ));
            }
            Some(_) => {}
        }
        if k == ExampleKind::Tokens {
            let mut example = tokens_example(&obj).map_err(|m| at(no, m))?;
            check_vocab(&example.input_ids, &example.labels, config.vocab_size)
                .map_err(|m| at(no, m))?;
            example.truncate(config.seq_len);
            if example.n_targets() == 0 {
                skipped += 1;
            } else {
                examples.push(example);
            }
            continue;
        }
        let Some(tokenizer) = tokenizer else {
            return Err(no_tokenizer(path, &format!("\"{}\"", k.name())));
        };
        if matches!(k, ExampleKind::Text | ExampleKind::PromptCompletion) && eos.is_none() {
            eos = Some(eos_for_packing(tokenizer, path)?);
        }
        let example = match k {
            ExampleKind::Text => {
                let text = str_field(&obj, "text").map_err(|m| at(no, m))?;
                if text.is_empty() {
                    return Err(at(no, "\"text\" is empty".into()));
                }
                let ids = tokenizer
                    .encode(text, config.add_special_tokens)
                    .map_err(|e| at(no, e.to_string()))?;
                check_vocab(&ids, &[], config.vocab_size)
                    .map_err(|m| at(no, format!("{m} (the tokenizer does not match the model)")))?;
                docs.push(ids);
                continue;
            }
            ExampleKind::PromptCompletion => {
                let prompt = str_field(&obj, "prompt").map_err(|m| at(no, m))?;
                let completion = str_field(&obj, "completion").map_err(|m| at(no, m))?;
                prompt_completion(tokenizer, prompt, completion, eos.unwrap_or(0), config)
                    .map_err(|e| at(no, e.to_string()))?
            }
            ExampleKind::Chat => {
                let messages = chat_messages(&obj).map_err(|m| at(no, m))?;
                chat_example(tokenizer, &messages).map_err(|e| at(no, e))?
            }
            ExampleKind::Tokens => unreachable!("handled above"),
        };
        let mut example = example;
        check_vocab(&example.input_ids, &example.labels, config.vocab_size)
            .map_err(|m| at(no, format!("{m} (the tokenizer does not match the model)")))?;
        example.truncate(config.seq_len);
        if example.n_targets() == 0 {
            skipped += 1;
        } else {
            examples.push(example);
        }
    }
    let Some((kind, _)) = kind else {
        return Err(ModelError::Invalid(format!(
            "{}: no line: the file is empty",
            path.display()
        )));
    };
    if kind == ExampleKind::Text {
        examples = pack(docs, eos.unwrap_or(0), config.seq_len);
    }
    Ok(Dataset {
        examples,
        kind,
        source: path.to_path_buf(),
        skipped,
    })
}

/// Every id and label (but `-100`) below `vocab_size`; the first that is not, named with its position.
fn check_vocab(
    ids: &[u32],
    labels: &[i64],
    vocab_size: Option<usize>,
) -> std::result::Result<(), String> {
    let Some(n) = vocab_size else {
        return Ok(());
    };
    if let Some((j, id)) = ids.iter().enumerate().find(|(_, t)| **t as usize >= n) {
        return Err(format!(
            "token id {id} (input_ids[{j}]) is outside the model's vocabulary of {n} tokens"
        ));
    }
    if let Some((j, l)) = labels
        .iter()
        .enumerate()
        .find(|(_, l)| **l != IGNORE_INDEX && (**l < 0 || **l as u64 >= n as u64))
    {
        return Err(format!(
            "label {l} (labels[{j}]) is outside the model's vocabulary of {n} tokens"
        ));
    }
    Ok(())
}

fn prompt_completion(
    tokenizer: &Tokenizer,
    prompt: &str,
    completion: &str,
    eos: u32,
    config: &DataConfig,
) -> Result<Example> {
    let p = tokenizer.encode(prompt, config.add_special_tokens)?;
    let c = tokenizer.encode(completion, false)?;
    let mut labels = vec![IGNORE_INDEX; p.len()];
    labels.extend(c.iter().map(|&t| i64::from(t)));
    labels.push(i64::from(eos));
    let mut input_ids = p;
    input_ids.extend(c);
    input_ids.push(eos);
    Ok(Example { input_ids, labels })
}

fn chat_messages(
    obj: &serde_json::Map<String, Value>,
) -> std::result::Result<Vec<ChatMessage>, String> {
    let Some(Value::Array(items)) = obj.get("messages") else {
        return Err(format!(
            "\"messages\" must be an array, got {}",
            type_name(&obj["messages"])
        ));
    };
    if items.is_empty() {
        return Err("\"messages\" is empty".into());
    }
    let mut out = Vec::with_capacity(items.len());
    for (j, m) in items.iter().enumerate() {
        let Value::Object(m) = m else {
            return Err(format!(
                "messages[{j}] must be an object, got {}",
                type_name(m)
            ));
        };
        let role = str_field(m, "role").map_err(|e| format!("messages[{j}]: {e}"))?;
        let content = str_field(m, "content").map_err(|e| format!("messages[{j}]: {e}"))?;
        out.push(ChatMessage {
            role: role.to_string(),
            content: content.to_string(),
        });
    }
    if !out.iter().any(|m| m.role == "assistant") {
        return Err("no \"assistant\" message: nothing to train on".into());
    }
    Ok(out)
}

/// Renders a conversation and marks the tokens of its assistant turns.
///
/// For assistant message `i`, the rendering of `messages[..i]` with the generation prompt must tokenize to
/// a prefix of the rendering of `messages[..=i]`, which must tokenize to a prefix of the whole conversation:
/// the span between the two prefixes is the assistant's. Templates that rewrite earlier turns (some drop
/// past reasoning, say) or tokenizations that merge across the boundary fail this check with an error.
fn chat_example(
    tokenizer: &Tokenizer,
    messages: &[ChatMessage],
) -> std::result::Result<Example, String> {
    let render =
        |msgs: &[ChatMessage], gen_prompt: bool| -> std::result::Result<Vec<u32>, String> {
            let text = tokenizer
                .apply_chat_template(msgs, gen_prompt)
                .map_err(|e| e.to_string())?;
            tokenizer.encode(&text, false).map_err(|e| e.to_string())
        };
    let full = render(messages, false)?;
    let mut labels = vec![IGNORE_INDEX; full.len()];
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = render(&messages[..i], true)?;
        let through = render(&messages[..=i], false)?;
        if !through.starts_with(&before) || !full.starts_with(&through) {
            return Err(format!(
                "the chat template's tokenization is not stable at assistant message {i}: the rendering of \
                 the messages before it (with the generation prompt) is not a token prefix of the \
                 conversation up to it, or that is not a prefix of the whole conversation; cannot find the \
                 assistant tokens"
            ));
        }
        for t in before.len()..through.len() {
            labels[t] = i64::from(full[t]);
        }
    }
    Ok(Example {
        input_ids: full,
        labels,
    })
}

fn tokens_example(obj: &serde_json::Map<String, Value>) -> std::result::Result<Example, String> {
    let ids = match obj.get("input_ids") {
        Some(Value::Array(a)) => a,
        Some(other) => {
            return Err(format!(
                "\"input_ids\" must be an array, got {}",
                type_name(other)
            ));
        }
        None => unreachable!("kind chosen from the key"),
    };
    if ids.is_empty() {
        return Err("\"input_ids\" is empty".into());
    }
    let input_ids = ids
        .iter()
        .enumerate()
        .map(|(j, v)| {
            v.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| {
                    format!("input_ids[{j}] must be a token id (an integer in 0..2^32), got {v}")
                })
        })
        .collect::<std::result::Result<Vec<u32>, String>>()?;
    let labels = match obj.get("labels") {
        None | Some(Value::Null) => input_ids.iter().map(|&t| i64::from(t)).collect(),
        Some(Value::Array(a)) => {
            if a.len() != input_ids.len() {
                return Err(format!(
                    "\"labels\" has {} entries, \"input_ids\" {}",
                    a.len(),
                    input_ids.len()
                ));
            }
            a.iter()
                .enumerate()
                .map(|(j, v)| match v.as_i64() {
                    Some(x) if x == IGNORE_INDEX || (0..=i64::from(u32::MAX)).contains(&x) => Ok(x),
                    _ => Err(format!("labels[{j}] must be a token id or -100, got {v}")),
                })
                .collect::<std::result::Result<Vec<i64>, String>>()?
        }
        Some(other) => {
            return Err(format!(
                "\"labels\" must be an array, got {}",
                type_name(other)
            ));
        }
    };
    Ok(Example { input_ids, labels })
}

#[cfg(test)]
pub(crate) mod tests;
