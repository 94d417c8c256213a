//! Tokenizers: HuggingFace `tokenizer.json` files, byte-level BPE and SentencePiece tokenizers built from GGUF
//! metadata, streaming decoding and chat templates.
//!
//! [`Tokenizer`] wraps a [`tokenizers::Tokenizer`] with what `transformers` keeps in `tokenizer_config.json`:
//! the bos / eos / pad / unk tokens and the Jinja chat template. Chat templates render with minijinja set up
//! like `transformers`' sandbox (`trim_blocks`, `lstrip_blocks`, loop controls, `raise_exception`,
//! `strftime_now`, Python's `json.dumps` as `tojson`, and Python string / dict methods such as `.strip()`,
//! `.startswith()`, `.items()`).

use crate::error::{ModelError, Result};
use crate::gguf::Meta;
use candle_core::quantized::gguf_file::Value as GgufValue;
use indexmap::IndexMap;
use minijinja::value::{Kwargs, Value as JValue};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::path::Path;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::ModelWrapper;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, TokenizerBuilder};

#[path = "tokenizer_spm.rs"]
mod spm;

/// One message of a conversation, as `transformers`' `apply_chat_template` takes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, …
    pub role: String,
    /// The text of the message.
    pub content: String,
}

impl ChatMessage {
    /// A message with any role.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }

    /// A `system` message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }

    /// A `user` message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }

    /// An `assistant` message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
}

/// A tokenizer with its special tokens and chat template.
///
/// Padding and truncation stored in a `tokenizer.json` are switched off on load (as `transformers` does
/// unless asked): [`Tokenizer::encode`] returns exactly the tokens of the text.
#[derive(Clone, Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token: Option<String>,
    eos_token: Option<String>,
    pad_token: Option<String>,
    unk_token: Option<String>,
    chat_template: Option<String>,
    /// Every other `tokenizer_config.json` key, kept for writing back.
    config: serde_json::Map<String, Value>,
}

/// The `tokenizer_config.json` keys this type manages itself (the rest is kept verbatim).
const MANAGED_KEYS: [&str; 6] = [
    "bos_token",
    "eos_token",
    "pad_token",
    "unk_token",
    "chat_template",
    "added_tokens_decoder",
];

impl Tokenizer {
    /// Wraps a `tokenizers` tokenizer without special tokens or chat template (set them with the setters).
    pub fn new(inner: tokenizers::Tokenizer) -> Self {
        Self {
            inner,
            bos_token: None,
            eos_token: None,
            pad_token: None,
            unk_token: None,
            chat_template: None,
            config: serde_json::Map::new(),
        }
    }

    /// Loads `tokenizer.json` and, if given, `tokenizer_config.json` (special tokens, chat template).
    pub fn from_file(
        tokenizer_json: impl AsRef<Path>,
        tokenizer_config: Option<&Path>,
    ) -> Result<Self> {
        let path = tokenizer_json.as_ref();
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", path.display())))?;
        let mut tok = Self::new(inner);
        tok.inner.with_padding(None);
        tok.inner
            .with_truncation(None)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        if let Some(cfg) = tokenizer_config {
            let text = std::fs::read_to_string(cfg).map_err(|e| ModelError::io(cfg, e))?;
            let value: Value =
                serde_json::from_str(&text).map_err(|e| ModelError::json(cfg.display(), e))?;
            tok.apply_tokenizer_config(&value)
                .map_err(|m| ModelError::json(cfg.display(), m))?;
        }
        Ok(tok)
    }

    /// Reads the special tokens and chat template of a parsed `tokenizer_config.json`; other keys are kept
    /// for [`Tokenizer::tokenizer_config`].
    pub fn apply_tokenizer_config(&mut self, config: &Value) -> std::result::Result<(), String> {
        let obj = config
            .as_object()
            .ok_or("tokenizer_config.json is not an object")?;
        let token = |key: &str| -> std::result::Result<Option<String>, String> {
            match obj.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    _ => Err(format!("`{key}` has no string `content`")),
                },
                Some(_) => Err(format!(
                    "`{key}` should be a string or an added-token object"
                )),
            }
        };
        self.bos_token = token("bos_token")?;
        self.eos_token = token("eos_token")?;
        self.pad_token = token("pad_token")?;
        self.unk_token = token("unk_token")?;
        self.chat_template = match obj.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            // The named-template form: [{"name": "default", "template": "..."}, ...].
            Some(Value::Array(list)) => {
                let pick = list
                    .iter()
                    .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                    .or_else(|| list.first());
                pick.and_then(|t| t.get("template"))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            }
            Some(_) => return Err("`chat_template` should be a string or a list".into()),
        };
        self.config = obj
            .iter()
            .filter(|(k, _)| !MANAGED_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(())
    }

    /// Builds the tokenizer described by GGUF metadata, as `transformers` does for a GGUF file.
    ///
    /// - `tokenizer.ggml.model = "gpt2"`: byte-level BPE with vocabulary `tokenizer.ggml.tokens`, merges
    ///   `tokenizer.ggml.merges`, control tokens (type 3) as special added tokens and user-defined ones
    ///   (type 4) as plain added tokens, the pre-tokenizer named by `tokenizer.ggml.pre`, a ByteLevel decoder.
    /// - `tokenizer.ggml.model = "llama"`: SentencePiece BPE with byte fallback (Llama 2, TinyLlama, Mistral),
    ///   merges recovered from `tokenizer.ggml.scores`, spaces as `▁` with llama.cpp's space prefix
    ///   (`tokenizer.ggml.add_space_prefix`, default true); see the `tokenizer_spm` module source for where
    ///   this follows llama.cpp rather than `transformers`.
    ///
    /// Both: bos / eos / pad / unk from their ids, `tokenizer.ggml.add_bos_token` / `add_eos_token` as a
    /// post-processor, the chat template from `tokenizer.chat_template`.
    pub fn from_gguf_metadata(metadata: &HashMap<String, GgufValue>) -> Result<Self> {
        let meta = Meta {
            md: metadata,
            path: Path::new("GGUF metadata"),
        };
        let terr = |m: String| ModelError::Tokenizer(m);
        let model = match meta.string("tokenizer.ggml.model")? {
            Some(m @ ("gpt2" | "llama")) => m,
            Some(other) => {
                return Err(ModelError::Unsupported(format!(
                    "GGUF tokenizer model `{other}`: only byte-level BPE (`gpt2`) and SentencePiece (`llama`) are supported"
                )));
            }
            None => {
                return Err(terr(
                    "no `tokenizer.ggml.model` in the GGUF metadata".into(),
                ));
            }
        };
        let tokens = meta
            .array("tokenizer.ggml.tokens")?
            .ok_or_else(|| terr("no `tokenizer.ggml.tokens` in the GGUF metadata".into()))?;
        let tokens: Vec<&str> = tokens
            .iter()
            .map(|v| match v {
                GgufValue::String(s) => Ok(s.as_str()),
                _ => Err(terr("`tokenizer.ggml.tokens` holds a non-string".into())),
            })
            .collect::<Result<_>>()?;
        let types: Vec<u64> = match meta.array("tokenizer.ggml.token_type")? {
            None => vec![1; tokens.len()],
            Some(list) => list
                .iter()
                .map(|v| {
                    crate::gguf::value_as_u64(v).ok_or_else(|| {
                        terr("`tokenizer.ggml.token_type` holds a non-integer".into())
                    })
                })
                .collect::<Result<_>>()?,
        };
        if types.len() != tokens.len() {
            return Err(terr(format!(
                "{} token types for {} tokens",
                types.len(),
                tokens.len()
            )));
        }
        if model == "llama" {
            return spm::from_gguf(&meta, &tokens, &types);
        }
        let merges: Vec<(String, String)> = match meta.array("tokenizer.ggml.merges")? {
            None => Vec::new(),
            Some(list) => parse_merges(list)?,
        };

        let mut vocab = Vocab::default();
        for (i, t) in tokens.iter().enumerate() {
            // A duplicate keeps its last id, as llama.cpp's token-to-id map (`token_to_id[word] = i`) and
            // transformers' `{token: index}` do.
            vocab.insert(t.to_string(), i as u32);
        }
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| terr(format!("cannot build BPE from GGUF metadata: {e}")))?;

        let pre = meta.string("tokenizer.ggml.pre")?.unwrap_or("default");
        let byte_level = ByteLevel::new(false, true, true);
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            // StarCoder-family tokenizers (SmolLM, SmolLM2, StarCoder, Refact): digits split one by one.
            "smollm" | "starcoder" | "refact" => {
                PreTokenizerWrapper::Sequence(Sequence::new(vec![
                    PreTokenizerWrapper::Digits(Digits::new(true)),
                    PreTokenizerWrapper::ByteLevel(byte_level),
                ]))
            }
            "default" | "gpt-2" | "gpt2" => PreTokenizerWrapper::ByteLevel(byte_level),
            other => {
                return Err(ModelError::Unsupported(format!(
                    "GGUF pre-tokenizer `{other}` (supported: smollm, starcoder, refact, gpt-2, default)"
                )));
            }
        };

        let id_token = |key: &str| -> Result<Option<String>> {
            Ok(match meta.uint(key)? {
                None => None,
                Some(id) => Some(
                    tokens
                        .get(id as usize)
                        .ok_or_else(|| terr(format!("`{key}` = {id} is outside the vocabulary")))?
                        .to_string(),
                ),
            })
        };
        let bos = id_token("tokenizer.ggml.bos_token_id")?;
        let eos = id_token("tokenizer.ggml.eos_token_id")?;
        let add_bos = meta.bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
        let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let post = post_processor(
            add_bos.then(|| bos.clone()).flatten(),
            add_eos.then(|| eos.clone()).flatten(),
            &|t| tokens.iter().rposition(|x| *x == t).map(|i| i as u32),
        )?;

        let inner: tokenizers::TokenizerImpl<
            ModelWrapper,
            NormalizerWrapper,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        > = TokenizerBuilder::new()
            .with_model(bpe.into())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(pre_tokenizer))
            .with_post_processor(Some(post))
            .with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(
                true, true, true,
            ))))
            .build()
            .map_err(|e| terr(e.to_string()))?;
        let mut inner = tokenizers::Tokenizer::from(inner);
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == 3)
            .map(|(s, _)| AddedToken::from(s.to_string(), true))
            .collect();
        let user: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| **t == 4)
            .map(|(s, _)| AddedToken::from(s.to_string(), false).normalized(false))
            .collect();
        inner.add_special_tokens(&special);
        inner.add_tokens(&user);

        let mut tok = Self::new(inner);
        tok.bos_token = bos;
        tok.eos_token = eos;
        tok.pad_token = id_token("tokenizer.ggml.padding_token_id")?;
        tok.unk_token = id_token("tokenizer.ggml.unknown_token_id")?;
        tok.chat_template = meta.string("tokenizer.chat_template")?.map(str::to_string);
        tok.config
            .insert("clean_up_tokenization_spaces".into(), json!(false));
        if add_bos {
            tok.config.insert("add_bos_token".into(), json!(true));
        }
        if add_eos {
            tok.config.insert("add_eos_token".into(), json!(true));
        }
        if let Some(n) = meta.uint("llama.context_length")? {
            tok.config.insert("model_max_length".into(), json!(n));
        }
        tok.config
            .insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        Ok(tok)
    }

    /// The wrapped `tokenizers` tokenizer.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// The wrapped `tokenizers` tokenizer, mutably.
    pub fn inner_mut(&mut self) -> &mut tokenizers::Tokenizer {
        &mut self.inner
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of a token, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token of an id, if any.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The beginning-of-sequence token.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The end-of-sequence token (for chat models, the end-of-turn token).
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// The padding token.
    pub fn pad_token(&self) -> Option<&str> {
        self.pad_token.as_deref()
    }

    /// The unknown token.
    pub fn unk_token(&self) -> Option<&str> {
        self.unk_token.as_deref()
    }

    /// The id of the beginning-of-sequence token.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// The id of the end-of-sequence token.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// The id of the padding token.
    pub fn pad_token_id(&self) -> Option<u32> {
        self.pad_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// The id of the unknown token.
    pub fn unk_token_id(&self) -> Option<u32> {
        self.unk_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// Sets the beginning-of-sequence token (it must be in the vocabulary).
    pub fn set_bos_token(&mut self, token: Option<&str>) -> Result<()> {
        self.bos_token = self.checked(token)?;
        Ok(())
    }

    /// Sets the end-of-sequence token (it must be in the vocabulary).
    pub fn set_eos_token(&mut self, token: Option<&str>) -> Result<()> {
        self.eos_token = self.checked(token)?;
        Ok(())
    }

    /// Sets the padding token (it must be in the vocabulary).
    pub fn set_pad_token(&mut self, token: Option<&str>) -> Result<()> {
        self.pad_token = self.checked(token)?;
        Ok(())
    }

    fn checked(&self, token: Option<&str>) -> Result<Option<String>> {
        match token {
            Some(t) if self.token_to_id(t).is_none() => Err(ModelError::Tokenizer(format!(
                "token {t:?} is not in the vocabulary"
            ))),
            t => Ok(t.map(str::to_string)),
        }
    }

    /// The special added tokens (`<|im_start|>`, …) with their ids, by id.
    pub fn special_tokens(&self) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = self
            .inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (t.content, id))
            .collect();
        v.sort_by_key(|(_, id)| *id);
        v
    }

    /// The Jinja chat template, if any.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Sets or removes the chat template.
    pub fn set_chat_template(&mut self, template: Option<String>) {
        self.chat_template = template;
    }

    /// Token ids of `text`; `add_special_tokens` applies the post-processor (e.g. a bos token), special
    /// tokens written in the text are recognised either way (as `transformers` does).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, add_special_tokens)?
            .get_ids()
            .to_vec())
    }

    /// The text of `ids`; `skip_special_tokens` drops special added tokens.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        Ok(self.inner.decode(ids, skip_special_tokens)?)
    }

    /// An incremental decoder for generation: feed ids one by one, get back only complete UTF-8 text.
    pub fn stream_decoder(&self, skip_special_tokens: bool) -> StreamDecoder<'_> {
        StreamDecoder {
            tok: self,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
            skip_special_tokens,
        }
    }

    /// Renders the chat template for `messages`, as `transformers`' `apply_chat_template(messages,
    /// tokenize=False, add_generation_prompt=...)`. The template sees `messages`, `add_generation_prompt`
    /// and the special tokens (`bos_token`, `eos_token`, `pad_token`, `unk_token`).
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| ModelError::Template("this tokenizer has no chat template".into()))?;
        let mut special = IndexMap::new();
        for (k, v) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("unk_token", &self.unk_token),
            ("pad_token", &self.pad_token),
        ] {
            if let Some(v) = v {
                special.insert(k.to_string(), v.clone());
            }
        }
        render_chat_template(template, messages, add_generation_prompt, &special)
    }

    /// The `tokenizer.json` text (pretty-printed when `pretty`).
    pub fn to_json(&self, pretty: bool) -> Result<String> {
        Ok(self.inner.to_string(pretty)?)
    }

    /// The `tokenizer_config.json` document: the kept keys of the loaded file (or the defaults of a GGUF
    /// tokenizer), the special tokens, the added tokens and the chat template.
    pub fn tokenizer_config(&self) -> Value {
        let mut m = self.config.clone();
        let mut decoder: Vec<(u32, AddedToken)> =
            self.inner.get_added_tokens_decoder().into_iter().collect();
        decoder.sort_by_key(|(id, _)| *id);
        let decoder: serde_json::Map<String, Value> = decoder
            .into_iter()
            .map(|(id, t)| {
                (
                    id.to_string(),
                    json!({
                        "content": t.content,
                        "lstrip": t.lstrip,
                        "normalized": t.normalized,
                        "rstrip": t.rstrip,
                        "single_word": t.single_word,
                        "special": t.special,
                    }),
                )
            })
            .collect();
        m.insert("added_tokens_decoder".into(), Value::Object(decoder));
        for (k, v) in [
            ("bos_token", &self.bos_token),
            ("eos_token", &self.eos_token),
            ("pad_token", &self.pad_token),
            ("unk_token", &self.unk_token),
        ] {
            m.insert(k.into(), v.as_ref().map_or(Value::Null, |s| json!(s)));
        }
        if let Some(t) = &self.chat_template {
            m.insert("chat_template".into(), json!(t));
        }
        m.sort_keys();
        Value::Object(m)
    }

    /// Writes `tokenizer.json` (pretty, as `transformers` saves it) atomically.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let s = self.to_json(true)?;
        peft::io::atomic_write(path.as_ref(), s.as_bytes())?;
        Ok(())
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`, each atomically.
    pub fn save_dir(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        self.save(dir.join("tokenizer.json"))?;
        let cfg = serde_json::to_string_pretty(&self.tokenizer_config())
            .map_err(|e| ModelError::json("tokenizer_config.json", e))?;
        peft::io::atomic_write(&dir.join("tokenizer_config.json"), cfg.as_bytes())?;
        Ok(())
    }
}

/// `tokenizer.ggml.merges`: "left right" strings as pairs.
fn parse_merges(list: &[GgufValue]) -> Result<Vec<(String, String)>> {
    list.iter()
        .enumerate()
        .map(|(i, v)| match v {
            GgufValue::String(s) => s
                .split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    ModelError::Tokenizer(format!(
                        "merge {i} `{s}` is not two space-separated tokens"
                    ))
                }),
            _ => Err(ModelError::Tokenizer(
                "`tokenizer.ggml.merges` holds a non-string".into(),
            )),
        })
        .collect()
}

fn post_processor(
    bos: Option<String>,
    eos: Option<String>,
    id_of: &dyn Fn(&str) -> Option<u32>,
) -> Result<PostProcessorWrapper> {
    if bos.is_none() && eos.is_none() {
        return Ok(PostProcessorWrapper::ByteLevel(ByteLevel::new(
            true, false, true,
        )));
    }
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let mut specials = Vec::new();
    for t in [&bos, &eos].into_iter().flatten() {
        let id = id_of(t).ok_or_else(|| {
            ModelError::Tokenizer(format!("special token {t:?} is not in the vocabulary"))
        })?;
        if !specials.iter().any(|(s, _): &(String, u32)| s == t) {
            specials.push((t.clone(), id));
        }
    }
    if let Some(b) = &bos {
        single.push(format!("{b}:0"));
        pair.push(format!("{b}:0"));
    }
    single.push("$A:0".to_string());
    pair.push("$A:0".to_string());
    if let Some(e) = &eos {
        single.push(format!("{e}:0"));
        pair.push(format!("{e}:0"));
    }
    if let Some(b) = &bos {
        pair.push(format!("{b}:1"));
    }
    pair.push("$B:1".to_string());
    if let Some(e) = &eos {
        pair.push(format!("{e}:1"));
    }
    let tp = TemplateProcessing::builder()
        .try_single(single.join(" "))
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?
        .try_pair(pair.join(" "))
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?
        .special_tokens(specials)
        .build()
        .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
    Ok(PostProcessorWrapper::Template(tp))
}

/// Incremental decoding for generation ([`Tokenizer::stream_decoder`]).
///
/// Each [`StreamDecoder::step`] re-decodes a short window of recent ids and returns the new text once it
/// no longer ends in an incomplete UTF-8 sequence (a byte-level token can hold part of a character);
/// [`StreamDecoder::finish`] returns whatever is left.
#[derive(Debug)]
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    prefix: usize,
    read: usize,
    skip_special_tokens: bool,
}

impl StreamDecoder<'_> {
    /// Adds one id; returns the text it completes, if any.
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let prev = self
            .tok
            .decode(&self.ids[self.prefix..self.read], self.skip_special_tokens)?;
        let full = self
            .tok
            .decode(&self.ids[self.prefix..], self.skip_special_tokens)?;
        if full.len() > prev.len() && !full.ends_with('\u{FFFD}') {
            let new = match full.get(prev.len()..) {
                Some(s) if full.starts_with(&prev) => s.to_string(),
                _ => full,
            };
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(Some(new))
        } else {
            Ok(None)
        }
    }

    /// The text of ids not returned yet (incomplete characters become U+FFFD), and a reset of the window.
    pub fn finish(&mut self) -> Result<Option<String>> {
        if self.read == self.ids.len() {
            return Ok(None);
        }
        let prev = self
            .tok
            .decode(&self.ids[self.prefix..self.read], self.skip_special_tokens)?;
        let full = self
            .tok
            .decode(&self.ids[self.prefix..], self.skip_special_tokens)?;
        self.prefix = self.read;
        self.read = self.ids.len();
        let new = match full.get(prev.len()..) {
            Some(s) if full.starts_with(&prev) => s.to_string(),
            _ => full,
        };
        Ok((!new.is_empty()).then_some(new))
    }

    /// Every id fed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// Renders a HuggingFace chat template with minijinja, set up like `transformers`' sandbox.
///
/// The template sees `messages`, `add_generation_prompt` and each entry of `special_tokens` (e.g.
/// `bos_token`, `eos_token`) as a variable.
pub fn render_chat_template(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    special_tokens: &IndexMap<String, String>,
) -> Result<String> {
    let env = chat_environment();
    let mut ctx = serde_json::Map::new();
    for (k, v) in special_tokens {
        ctx.insert(k.clone(), json!(v));
    }
    ctx.insert("messages".into(), json!(messages));
    ctx.insert("add_generation_prompt".into(), json!(add_generation_prompt));
    Ok(env.render_str(template, Value::Object(ctx))?)
}

/// The minijinja environment of chat templates: Jinja2's `trim_blocks` / `lstrip_blocks` as `transformers`
/// sets them, Python methods on strings / dicts / lists, and `transformers`' extra globals.
fn chat_environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<JValue, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_function("strftime_now", |fmt: String| strftime_now(&fmt));
    env.add_filter("tojson", tojson_filter);
    env
}

/// `transformers`' `tojson`: Python's `json.dumps(x, ensure_ascii=False, indent=None, separators=None,
/// sort_keys=False)`, not Jinja's HTML-safe variant.
fn tojson_filter(value: JValue, kwargs: Kwargs) -> std::result::Result<JValue, minijinja::Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let v: Value = serde_json::to_value(&value)
        .map_err(|e| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let (item_sep, key_sep) = match separators {
        Some(s) if s.len() == 2 => (s[0].clone(), s[1].clone()),
        Some(_) => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair",
            ));
        }
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let opts = PyJson {
        indent,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        sort_keys: sort_keys.unwrap_or(false),
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    opts.write(&v, 0, &mut out);
    Ok(JValue::from_safe_string(out))
}

/// Python's `json.dumps` formatting.
struct PyJson {
    indent: Option<usize>,
    ensure_ascii: bool,
    sort_keys: bool,
    item_sep: String,
    key_sep: String,
}

impl PyJson {
    fn write(&self, v: &Value, level: usize, out: &mut String) {
        match v {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(i), _, _) => out.push_str(&i.to_string()),
                (_, Some(u), _) => out.push_str(&u.to_string()),
                (_, _, Some(f)) => out.push_str(&py_float_repr(f)),
                _ => out.push_str(&n.to_string()),
            },
            Value::String(s) => self.write_str(s, out),
            Value::Array(a) => {
                if a.is_empty() {
                    out.push_str("[]");
                    return;
                }
                out.push('[');
                for (i, x) in a.iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write(x, level + 1, out);
                }
                self.newline(level, out);
                out.push(']');
            }
            Value::Object(o) => {
                if o.is_empty() {
                    out.push_str("{}");
                    return;
                }
                let mut items: Vec<(&String, &Value)> = o.iter().collect();
                if self.sort_keys {
                    items.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (k, x)) in items.into_iter().enumerate() {
                    if i > 0 {
                        out.push_str(&self.item_sep);
                    }
                    self.newline(level + 1, out);
                    self.write_str(k, out);
                    out.push_str(&self.key_sep);
                    self.write(x, level + 1, out);
                }
                self.newline(level, out);
                out.push('}');
            }
        }
    }

    fn newline(&self, level: usize, out: &mut String) {
        if let Some(n) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * level));
        }
    }

    fn write_str(&self, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{08}' => out.push_str("\\b"),
                '\u{0c}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || (self.ensure_ascii && (c as u32) > 0x7e) => {
                    let mut buf = [0u16; 2];
                    for u in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{u:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form below 1e-4 or from 1e16.
fn py_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    if f == 0.0 {
        return if f.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let sci = format!("{f:e}"); // e.g. "1.5e-5", "-3e16"
    let (mant, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    if (-4..16).contains(&exp) {
        let s = format!("{f}");
        if s.contains('.') { s } else { format!("{s}.0") }
    } else {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{mant}e{sign}{:02}", exp.abs())
    }
}

/// `transformers`' `strftime_now(format)`: `datetime.now().strftime(format)`, the current **local** time
/// formatted like Python's `strftime` (chrono's specifiers are C's and glibc's: `%Y %m %d %e %H %I %M %S %p
/// %b %B %a %A %j %y %%`, the unpadded `%-d`, …).
fn strftime_now(fmt: &str) -> String {
    strftime_at(fmt, &chrono::Local::now())
}

/// `fmt` applied to a UTC instant given in seconds since the epoch (the formatting of [`strftime_now`]).
#[cfg(test)]
fn strftime(fmt: &str, unix: i64) -> String {
    let t = chrono::DateTime::from_timestamp(unix, 0).unwrap_or_default();
    strftime_at(fmt, &t)
}

/// Formats `t` with a `strftime` format. A directive chrono does not know is kept as written, as glibc's
/// `strftime` (which Python calls) does.
fn strftime_at<Tz: chrono::TimeZone>(fmt: &str, t: &chrono::DateTime<Tz>) -> String
where
    Tz::Offset: std::fmt::Display,
{
    use std::fmt::Write as _;
    let mut out = String::new();
    if write!(out, "{}", t.format(fmt)).is_ok() {
        return out;
    }
    // Some directive is unknown: format directive by directive, keeping the unknown ones literally.
    out.clear();
    let mut rest = fmt;
    while let Some(i) = rest.find('%') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        // `%`, optional flags / modifiers (`-`, `_`, `0`, `.`, `:`, `#`, digits), then the specifier.
        let end = tail
            .char_indices()
            .skip(1)
            .find(|(_, c)| !matches!(c, '-' | '_' | '0'..='9' | '.' | ':' | '#'))
            .map_or(tail.len(), |(j, c)| j + c.len_utf8());
        let directive = &tail[..end];
        let mut piece = String::new();
        if write!(piece, "{}", t.format(directive)).is_ok() {
            out.push_str(&piece);
        } else {
            out.push_str(directive);
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The SmolLM2-135M-Instruct chat template (as in its GGUF metadata and tokenizer_config.json).
    pub(crate) const SMOL_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    /// A template using what HF templates use: whitespace control, `raise_exception`, `loop.first/last`,
    /// `.strip()`, filters, `tojson` (with and without indent), `bos_token` / `eos_token`.
    const FANCY_TEMPLATE_JSON: &str = r##""{{ bos_token }}\n{%- for m in messages %}\n    {% if m['role'] not in ['system', 'user', 'assistant'] %}\n        {{ raise_exception('Unknown role: ' + m['role']) }}\n    {% endif %}\n    {% if loop.first and m.role == 'system' %}\n<<SYS>>{{ m.content | trim }}<</SYS>>\n    {% else %}\n[{{ m['role'] | upper }}] {{ m['content'].strip() }}{% if not loop.last %} | {% endif %}\n    {% endif %}\n{% endfor %}\n{{ messages | tojson }}\n{{ {'k': 1.5, 'e': 1e-05, 'u': 'é\"\\n', 'l': [1, 2], 'd': {}} | tojson(indent=2) }}\n{% if add_generation_prompt %}[ASSISTANT]{% endif %}{{ eos_token }}\n""##;

    /// The renderings of transformers 5.24.0 (`_compile_jinja_template(t).render(messages=..,
    /// add_generation_prompt=.., bos_token="<s>", eos_token="</s>")`): SMOL on the three conversations,
    /// then FANCY on the same three.
    const TRANSFORMERS_RENDERINGS_JSON: &str = r##"["<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n", "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n", "<|im_start|>system\n  Be nice. \n<|im_end|>\n<|im_start|>user\n Ünïcödé ✓ \"q\" <|im_end|>\n<|im_start|>assistant\nok\n<|im_end|>\n<|im_start|>assistant\n", "<s>[USER] What is the capital of France?[{\"role\": \"user\", \"content\": \"What is the capital of France?\"}]\n{\n  \"k\": 1.5,\n  \"e\": 1e-05,\n  \"u\": \"é\\\"\\n\",\n  \"l\": [\n    1,\n    2\n  ],\n  \"d\": {}\n}\n[ASSISTANT]</s>", "<s><<SYS>>You are terse.<</SYS>>\n[USER] Hi | [ASSISTANT] Hello! | [USER] 2+2?[{\"role\": \"system\", \"content\": \"You are terse.\"}, {\"role\": \"user\", \"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Hello!\"}, {\"role\": \"user\", \"content\": \"2+2?\"}]\n{\n  \"k\": 1.5,\n  \"e\": 1e-05,\n  \"u\": \"é\\\"\\n\",\n  \"l\": [\n    1,\n    2\n  ],\n  \"d\": {}\n}\n</s>", "<s><<SYS>>Be nice.<</SYS>>\n[USER] Ünïcödé ✓ \"q\" | [ASSISTANT] ok[{\"role\": \"system\", \"content\": \"  Be nice. \\n\"}, {\"role\": \"user\", \"content\": \" Ünïcödé ✓ \\\"q\\\" \"}, {\"role\": \"assistant\", \"content\": \"ok\\n\"}]\n{\n  \"k\": 1.5,\n  \"e\": 1e-05,\n  \"u\": \"é\\\"\\n\",\n  \"l\": [\n    1,\n    2\n  ],\n  \"d\": {}\n}\n[ASSISTANT]</s>"]"##;

    fn conversations() -> Vec<(Vec<ChatMessage>, bool)> {
        vec![
            (
                vec![ChatMessage::user("What is the capital of France?")],
                true,
            ),
            (
                vec![
                    ChatMessage::system("You are terse."),
                    ChatMessage::user("Hi"),
                    ChatMessage::assistant("Hello!"),
                    ChatMessage::user("2+2?"),
                ],
                false,
            ),
            (
                vec![
                    ChatMessage::system("  Be nice. \n"),
                    ChatMessage::user(" Ünïcödé ✓ \"q\" "),
                    ChatMessage::assistant("ok\n"),
                ],
                true,
            ),
        ]
    }

    fn bos_eos() -> IndexMap<String, String> {
        IndexMap::from([
            ("bos_token".to_string(), "<s>".to_string()),
            ("eos_token".to_string(), "</s>".to_string()),
        ])
    }

    #[test]
    fn chat_templates_render_like_transformers() {
        let expected: Vec<String> = serde_json::from_str(TRANSFORMERS_RENDERINGS_JSON).unwrap();
        let fancy: String = serde_json::from_str(FANCY_TEMPLATE_JSON).unwrap();
        let mut i = 0;
        for template in [SMOL_TEMPLATE, fancy.as_str()] {
            for (msgs, add_gen) in conversations() {
                let got = render_chat_template(template, &msgs, add_gen, &bos_eos()).unwrap();
                assert_eq!(got, expected[i], "rendering {i}");
                i += 1;
            }
        }
    }

    #[test]
    fn chat_template_raise_exception_is_an_error() {
        let fancy: String = serde_json::from_str(FANCY_TEMPLATE_JSON).unwrap();
        let err = render_chat_template(&fancy, &[ChatMessage::new("tool", "x")], false, &bos_eos())
            .unwrap_err();
        assert!(matches!(err, ModelError::Template(_)), "{err}");
        assert!(err.to_string().contains("Unknown role: tool"), "{err}");
        let err = render_chat_template("{% for %}", &[], false, &bos_eos()).unwrap_err();
        assert!(matches!(err, ModelError::Template(_)), "{err}");
    }

    #[test]
    fn python_float_repr_and_strftime() {
        for (f, s) in [
            (1.5, "1.5"),
            (1e-5, "1e-05"),
            (1e16, "1e+16"),
            (123456.0, "123456.0"),
            (0.0001, "0.0001"),
            (-2.5e-7, "-2.5e-07"),
            (1.0, "1.0"),
        ] {
            assert_eq!(py_float_repr(f), s);
        }
        // 2024-02-29 13:05:09 UTC, a Thursday, day 60 of a leap year.
        let t = 1_709_211_909;
        assert_eq!(
            strftime("%Y-%m-%d %H:%M:%S %a %A %b %B %j %y %I%p %-d %%", t),
            "2024-02-29 13:05:09 Thu Thursday Feb February 060 24 01PM 29 %"
        );
        assert_eq!(strftime("%d %b %Y", 0), "01 Jan 1970");
    }

    /// A 20-token byte-level BPE vocabulary in GGUF form (3 control tokens, 1 user-defined token) with the
    /// SmolLM2 pre-tokenizer and chat template; also used by the synthetic GGUF model of `gguf.rs`.
    pub(crate) fn tiny_tokenizer_metadata() -> Vec<(String, GgufValue)> {
        let tokens = [
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "a",
            "b",
            "c",
            "Ġ",
            "ab",
            "abc",
            "Ġa",
            "Ġab",
            "1",
            "2",
            "12",
            "Ċ",
            "Ã",
            "©",
            "d",
            "Ġb",
            "<tool>",
        ];
        let mut types = vec![1u32; tokens.len()];
        types[0] = 3;
        types[1] = 3;
        types[2] = 3;
        types[19] = 4;
        let merges = ["Ġ a", "Ġa b", "a b", "ab c", "1 2", "Ġ b"];
        let s = |x: &str| GgufValue::String(x.to_string());
        vec![
            ("tokenizer.ggml.model".into(), s("gpt2")),
            ("tokenizer.ggml.pre".into(), s("smollm")),
            (
                "tokenizer.ggml.tokens".into(),
                GgufValue::Array(tokens.iter().map(|t| s(t)).collect()),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                GgufValue::Array(
                    types
                        .into_iter()
                        .map(|t| GgufValue::I32(t as i32))
                        .collect(),
                ),
            ),
            (
                "tokenizer.ggml.merges".into(),
                GgufValue::Array(merges.iter().map(|t| s(t)).collect()),
            ),
            ("tokenizer.ggml.bos_token_id".into(), GgufValue::U32(1)),
            ("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(2)),
            ("tokenizer.ggml.unknown_token_id".into(), GgufValue::U32(0)),
            ("tokenizer.ggml.padding_token_id".into(), GgufValue::U32(2)),
            (
                "tokenizer.ggml.add_bos_token".into(),
                GgufValue::Bool(false),
            ),
            ("tokenizer.chat_template".into(), s(SMOL_TEMPLATE)),
        ]
    }

    pub(crate) fn tiny_tokenizer() -> Tokenizer {
        let md: HashMap<String, GgufValue> = tiny_tokenizer_metadata().into_iter().collect();
        Tokenizer::from_gguf_metadata(&md).unwrap()
    }

    #[test]
    fn gguf_tokenizer_encodes_decodes() {
        let tok = tiny_tokenizer();
        assert_eq!(tok.vocab_size(), 20);
        // Digits are split one by one (no "12" although the merge exists); "\n" is byte-level "Ċ".
        let ids = tok.encode("abc ab 12\n", true).unwrap();
        assert_eq!(ids, vec![8, 10, 6, 11, 12, 14]);
        assert_eq!(tok.decode(&ids, false).unwrap(), "abc ab 12\n");
        // Special and user-defined tokens in the text are recognised.
        let ids = tok
            .encode("<|im_start|>ab<tool>b<|im_end|>", false)
            .unwrap();
        assert_eq!(ids, vec![1, 7, 19, 4, 2]);
        assert_eq!(tok.decode(&ids, true).unwrap(), "ab<tool>b");
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            "<|im_start|>ab<tool>b<|im_end|>"
        );
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.eos_token_id(), Some(2));
        assert_eq!(tok.pad_token_id(), Some(2));
        assert_eq!(tok.unk_token(), Some("<|endoftext|>"));
        let specials: Vec<u32> = tok.special_tokens().into_iter().map(|(_, i)| i).collect();
        assert_eq!(specials, vec![0, 1, 2]);
        let chat = tok
            .apply_chat_template(&[ChatMessage::user("ab")], true)
            .unwrap();
        assert!(chat.ends_with("<|im_start|>user\nab<|im_end|>\n<|im_start|>assistant\n"));
    }

    #[test]
    fn gguf_tokenizer_add_bos_uses_a_template() {
        let mut md: HashMap<String, GgufValue> = tiny_tokenizer_metadata().into_iter().collect();
        md.insert("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(true));
        let tok = Tokenizer::from_gguf_metadata(&md).unwrap();
        assert_eq!(tok.encode("ab", true).unwrap(), vec![1, 7]);
        assert_eq!(tok.encode("ab", false).unwrap(), vec![7]);
        assert_eq!(tok.tokenizer_config()["add_bos_token"], json!(true));
    }

    #[test]
    fn gguf_tokenizer_rejects_unsupported() {
        let mut md: HashMap<String, GgufValue> = tiny_tokenizer_metadata().into_iter().collect();
        md.insert(
            "tokenizer.ggml.model".into(),
            GgufValue::String("t5".into()),
        );
        let err = Tokenizer::from_gguf_metadata(&md).unwrap_err();
        assert!(err.to_string().contains("`t5`"), "{err}");
        let mut md: HashMap<String, GgufValue> = tiny_tokenizer_metadata().into_iter().collect();
        md.insert(
            "tokenizer.ggml.pre".into(),
            GgufValue::String("qwen2".into()),
        );
        let err = Tokenizer::from_gguf_metadata(&md).unwrap_err();
        assert!(err.to_string().contains("qwen2"), "{err}");
        let mut md: HashMap<String, GgufValue> = tiny_tokenizer_metadata().into_iter().collect();
        md.insert("tokenizer.ggml.eos_token_id".into(), GgufValue::U32(99));
        let err = Tokenizer::from_gguf_metadata(&md).unwrap_err();
        assert!(err.to_string().contains("outside the vocabulary"), "{err}");
    }

    #[test]
    fn stream_decoder_emits_only_complete_utf8() {
        let tok = tiny_tokenizer();
        // "é" is two byte-level tokens, "Ã" (0xC3) and "©" (0xA9); neither alone is valid UTF-8.
        let ids = tok.encode("ab é", false).unwrap();
        assert_eq!(ids, vec![7, 6, 15, 16]);
        let mut s = tok.stream_decoder(true);
        let pieces: Vec<Option<String>> = ids.iter().map(|&i| s.step(i).unwrap()).collect();
        assert_eq!(
            pieces,
            vec![Some("ab".into()), Some(" ".into()), None, Some("é".into())]
        );
        assert_eq!(s.finish().unwrap(), None);
        // A dangling half character is flushed (as U+FFFD) by finish; special tokens are skipped.
        let mut s = tok.stream_decoder(true);
        assert_eq!(s.step(2).unwrap(), None);
        assert_eq!(s.step(3).unwrap(), Some("a".into()));
        assert_eq!(s.step(15).unwrap(), None);
        assert_eq!(s.finish().unwrap(), Some("\u{FFFD}".into()));
        assert_eq!(s.ids(), &[2, 3, 15]);
    }

    #[test]
    fn tokenizer_json_round_trip_keeps_config() {
        let tok = tiny_tokenizer();
        let dir = tempfile::tempdir().unwrap();
        tok.save_dir(dir.path()).unwrap();
        let back = Tokenizer::from_file(
            dir.path().join("tokenizer.json"),
            Some(&dir.path().join("tokenizer_config.json")),
        )
        .unwrap();
        for text in ["abc ab 12\n", "<|im_start|>ab<tool> é"] {
            assert_eq!(
                back.encode(text, true).unwrap(),
                tok.encode(text, true).unwrap()
            );
        }
        assert_eq!(back.chat_template(), Some(SMOL_TEMPLATE));
        assert_eq!(back.bos_token(), Some("<|im_start|>"));
        assert_eq!(back.eos_token(), Some("<|im_end|>"));
        assert_eq!(back.pad_token(), Some("<|im_end|>"));
        assert_eq!(back.unk_token(), Some("<|endoftext|>"));
        assert_eq!(back.tokenizer_config(), tok.tokenizer_config());
        let cfg = tok.tokenizer_config();
        assert_eq!(
            cfg["added_tokens_decoder"]["1"]["content"],
            json!("<|im_start|>")
        );
        assert_eq!(cfg["added_tokens_decoder"]["1"]["special"], json!(true));
        assert_eq!(cfg["added_tokens_decoder"]["19"]["special"], json!(false));
        assert_eq!(cfg["tokenizer_class"], json!("PreTrainedTokenizerFast"));
    }

    #[test]
    fn tokenizer_config_token_forms() {
        let mut tok = tiny_tokenizer();
        tok.apply_tokenizer_config(&json!({
            "bos_token": {"content": "<|im_start|>", "special": true},
            "eos_token": "<|im_end|>",
            "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}],
            "model_max_length": 2048
        }))
        .unwrap();
        assert_eq!(tok.bos_token_id(), Some(1));
        assert_eq!(tok.eos_token_id(), Some(2));
        assert_eq!(tok.pad_token(), None);
        assert_eq!(tok.chat_template(), Some("D"));
        assert_eq!(tok.tokenizer_config()["model_max_length"], json!(2048));
        assert!(
            tok.apply_tokenizer_config(&json!({"bos_token": 3}))
                .is_err()
        );
        assert!(tok.set_eos_token(Some("nope")).is_err());
    }
}
