//! [`LlamaConfig`]: a HuggingFace `config.json` of the Llama family (llama, mistral, qwen2; SmolLM2 is llama).
//!
//! Parsing follows transformers 5.24's config classes: their defaults for missing fields, `head_dim` explicit or
//! `hidden_size / num_attention_heads`, `num_key_value_heads` defaulting to `num_attention_heads`, and RoPE
//! parameters in either layout — transformers 5's `rope_parameters: {rope_type, rope_theta, …}` or the older
//! top-level `rope_theta` plus `rope_scaling: {type | rope_type, …}` (what `standardize_rope_params` merges).
//!
//! Sliding windows are honoured, not ignored: mistral's `sliding_window` (default 4096 when the key is absent,
//! off when null) on every layer, qwen2's on the layers `layer_types` marks `"sliding_attention"` when
//! `use_sliding_window` is on. A query at cache index `q` sees keys `k` with `q − k < window`, as transformers'
//! `sliding_window_overlay`; the cache keeps every position (the mask hides the old ones).

use peft::{PeftError, Result};
use serde_json::Value;

/// Which transformers model class a config describes. The architectures differ only in biases, sliding windows
/// and the class names of their modules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LlamaFamily {
    /// `model_type: "llama"` (Llama 1/2/3, SmolLM2, TinyLlama, …): `attention_bias` on all four projections,
    /// `mlp_bias` on the MLP.
    Llama,
    /// `model_type: "mistral"`: no biases; `sliding_window` on every layer.
    Mistral,
    /// `model_type: "qwen2"`: q/k/v with bias, o_proj without; sliding window only on `layer_types` marked
    /// `"sliding_attention"` (and only when `use_sliding_window` is on).
    Qwen2,
}

impl LlamaFamily {
    /// The prefix of transformers' class names (`"Llama"`, `"Mistral"`, `"Qwen2"`).
    pub fn class_prefix(self) -> &'static str {
        match self {
            LlamaFamily::Llama => "Llama",
            LlamaFamily::Mistral => "Mistral",
            LlamaFamily::Qwen2 => "Qwen2",
        }
    }

    /// The family of a transformers `model_type` (`"llama"`, `"mistral"`, `"qwen2"`); `None` for others.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "llama" => Some(LlamaFamily::Llama),
            "mistral" => Some(LlamaFamily::Mistral),
            "qwen2" => Some(LlamaFamily::Qwen2),
            _ => None,
        }
    }

    /// The `model_type` string.
    pub fn model_type(self) -> &'static str {
        match self {
            LlamaFamily::Llama => "llama",
            LlamaFamily::Mistral => "mistral",
            LlamaFamily::Qwen2 => "qwen2",
        }
    }
}

/// The rotary embedding variant (transformers' `rope_type`).
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// `"default"`: `inv_freq = 1 / theta^(2i/d)`.
    Default,
    /// `"llama3"` (Llama 3.1 / 3.2): low frequencies divided by `factor`, a smooth band in between
    /// (`_compute_llama3_parameters`).
    Llama3 {
        /// `factor` (8 in Llama 3.1).
        factor: f64,
        /// `low_freq_factor` (1).
        low_freq_factor: f64,
        /// `high_freq_factor` (4).
        high_freq_factor: f64,
        /// `original_max_position_embeddings` (8192); defaults to `max_position_embeddings`.
        original_max_position_embeddings: usize,
    },
}

/// RoPE settings: the base and the variant.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeConfig {
    /// `rope_theta` (transformers' `default_theta` = 10000 when absent).
    pub theta: f64,
    /// The variant.
    pub scaling: RopeScaling,
}

/// The configuration of a Llama-family causal LM, as read from `config.json`.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaConfig {
    /// The architecture.
    pub family: LlamaFamily,
    /// `vocab_size`.
    pub vocab_size: usize,
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `intermediate_size` (the MLP width).
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// `num_attention_heads`.
    pub num_attention_heads: usize,
    /// `num_key_value_heads` (GQA when smaller than `num_attention_heads`).
    pub num_key_value_heads: usize,
    /// `head_dim` (explicit, else `hidden_size / num_attention_heads`).
    pub head_dim: usize,
    /// `max_position_embeddings`.
    pub max_position_embeddings: usize,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// RoPE base and variant.
    pub rope: RopeConfig,
    /// Whether q/k/v have a bias (llama: `attention_bias`; qwen2: always; mistral: never).
    pub qkv_bias: bool,
    /// Whether o_proj has a bias (llama: `attention_bias`; otherwise never).
    pub o_bias: bool,
    /// `mlp_bias` (llama only).
    pub mlp_bias: bool,
    /// `tie_word_embeddings`: `lm_head` uses the input embedding matrix.
    pub tie_word_embeddings: bool,
    /// The sliding attention window of each layer (`None` = full attention). Mistral: `sliding_window` on every
    /// layer; qwen2: on the layers `layer_types` marks `"sliding_attention"`.
    pub sliding_windows: Vec<Option<usize>>,
    /// `bos_token_id`.
    pub bos_token_id: Option<u32>,
    /// `eos_token_id` (a single id or a list in the file).
    pub eos_token_ids: Vec<u32>,
    /// `pad_token_id`.
    pub pad_token_id: Option<u32>,
}

fn bad(field: &str, msg: impl std::fmt::Display) -> PeftError {
    PeftError::InvalidConfig(format!("config.json: `{field}` {msg}"))
}

/// Upper bounds on the sizes a `config.json` may claim, checked before anything is allocated from them (a
/// config claiming 10¹² layers is refused up front instead of allocating until the allocator fails). Each is
/// far above any released model of the families read here (Llama 3.1 405B: 126 layers, hidden 16384,
/// intermediate 53248, vocabulary 128256; Llama 4: 10M context).
pub const SIZE_LIMITS: &[(&str, u64)] = &[
    ("vocab_size", 1 << 23),
    ("hidden_size", 1 << 17),
    ("intermediate_size", 1 << 20),
    ("num_hidden_layers", 1 << 12),
    ("num_attention_heads", 1 << 12),
    ("num_key_value_heads", 1 << 12),
    ("head_dim", 1 << 13),
    ("max_position_embeddings", 1 << 27),
    ("sliding_window", 1 << 27),
    ("max_window_layers", 1 << 12),
];

fn get_usize(v: &Value, field: &str) -> Result<Option<usize>> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => {
            let n = x
                .as_u64()
                .ok_or_else(|| bad(field, format!("must be a non-negative integer, got {x}")))?;
            if let Some((_, limit)) = SIZE_LIMITS.iter().find(|(f, _)| *f == field)
                && n > *limit
            {
                return Err(bad(
                    field,
                    format!("is {n}, beyond any real model (at most {limit} is accepted)"),
                ));
            }
            usize::try_from(n)
                .map(Some)
                .map_err(|_| bad(field, format!("{n} does not fit this machine's usize")))
        }
    }
}

fn req_usize(v: &Value, field: &str) -> Result<usize> {
    get_usize(v, field)?.ok_or_else(|| bad(field, "is missing"))
}

fn get_f64(v: &Value, field: &str) -> Result<Option<f64>> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_f64()
            .map(Some)
            .ok_or_else(|| bad(field, format!("must be a number, got {x}"))),
    }
}

fn get_bool(v: &Value, field: &str) -> Result<Option<bool>> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_bool()
            .map(Some)
            .ok_or_else(|| bad(field, format!("must be a boolean, got {x}"))),
    }
}

fn get_ids(v: &Value, field: &str) -> Result<Vec<u32>> {
    let one = |x: &Value| {
        x.as_u64().map(|n| n as u32).ok_or_else(|| {
            bad(
                field,
                format!("must be a token id or a list of them, got {x}"),
            )
        })
    };
    match v.get(field) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(a)) => a.iter().map(one).collect(),
        Some(x) => Ok(vec![one(x)?]),
    }
}

impl LlamaConfig {
    /// Parses a `config.json` document.
    pub fn from_json_str(s: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(s).map_err(|e| PeftError::Json {
            context: "config.json".into(),
            message: e.to_string(),
        })?;
        Self::from_value(&v)
    }

    /// Reads and parses a `config.json` file.
    pub fn from_file(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let path = path.as_ref();
        let s = std::fs::read_to_string(path).map_err(|source| PeftError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json_str(&s)
    }

    /// Parses a `config.json` already read as JSON.
    pub fn from_value(v: &Value) -> Result<Self> {
        if !v.is_object() {
            return Err(bad("(root)", "must be a JSON object"));
        }
        let model_type = v
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("model_type", "is missing"))?;
        let family =
            LlamaFamily::from_model_type(model_type).ok_or_else(|| PeftError::Unsupported {
                field: "model_type".into(),
                value: format!("{model_type:?}"),
                reason: "only llama, mistral and qwen2 are implemented".into(),
            })?;
        let hidden_act = v
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if hidden_act != "silu" && hidden_act != "swish" {
            return Err(PeftError::Unsupported {
                field: "hidden_act".into(),
                value: format!("{hidden_act:?}"),
                reason: "only \"silu\" (= \"swish\") is implemented".into(),
            });
        }
        if let Some(tp) = get_usize(v, "pretraining_tp")?
            && tp != 1
        {
            return Err(PeftError::Unsupported {
                field: "pretraining_tp".into(),
                value: tp.to_string(),
                reason: "transformers 5 ignores it; only 1 is accepted here".into(),
            });
        }
        let vocab_size = req_usize(v, "vocab_size")?;
        let hidden_size = req_usize(v, "hidden_size")?;
        let intermediate_size = req_usize(v, "intermediate_size")?;
        let num_hidden_layers = req_usize(v, "num_hidden_layers")?;
        let num_attention_heads = req_usize(v, "num_attention_heads")?;
        if num_attention_heads == 0 {
            return Err(bad("num_attention_heads", "must be positive"));
        }
        let num_key_value_heads =
            get_usize(v, "num_key_value_heads")?.unwrap_or(num_attention_heads);
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "({num_key_value_heads}) must divide num_attention_heads ({num_attention_heads})"
                ),
            ));
        }
        let head_dim = get_usize(v, "head_dim")?.unwrap_or(hidden_size / num_attention_heads);
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(bad(
                "head_dim",
                format!("must be even and positive, got {head_dim}"),
            ));
        }
        let max_position_embeddings =
            get_usize(v, "max_position_embeddings")?.unwrap_or(match family {
                LlamaFamily::Llama => 2048,
                LlamaFamily::Mistral => 4096 * 32,
                LlamaFamily::Qwen2 => 32768,
            });
        let rms_norm_eps = get_f64(v, "rms_norm_eps")?.unwrap_or(1e-6);
        let rope = parse_rope(v, head_dim, max_position_embeddings)?;
        let attention_bias = get_bool(v, "attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias, mlp_bias) = match family {
            LlamaFamily::Llama => (
                attention_bias,
                attention_bias,
                get_bool(v, "mlp_bias")?.unwrap_or(false),
            ),
            LlamaFamily::Mistral => (false, false, false),
            LlamaFamily::Qwen2 => (true, false, false),
        };
        let tie_word_embeddings = get_bool(v, "tie_word_embeddings")?.unwrap_or(false);
        let sliding_windows = parse_sliding(v, family, num_hidden_layers)?;
        Ok(Self {
            family,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            max_position_embeddings,
            rms_norm_eps,
            rope,
            qkv_bias,
            o_bias,
            mlp_bias,
            tie_word_embeddings,
            sliding_windows,
            bos_token_id: get_ids(v, "bos_token_id")?.first().copied(),
            eos_token_ids: get_ids(v, "eos_token_id")?,
            pad_token_id: get_ids(v, "pad_token_id")?.first().copied(),
        })
    }

    /// How many query heads share one key/value head.
    pub fn num_key_value_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// RoPE's inverse frequencies (`head_dim / 2` values, f32 as transformers computes them) and the attention
    /// scaling that multiplies cos and sin (1 for `default` and `llama3`).
    pub fn rope_inv_freq(&self) -> (Vec<f32>, f32) {
        let dim = self.head_dim;
        let base = self.rope.theta;
        // transformers: 1.0 / (base ** (arange(0, dim, 2).float() / dim)), all in f32.
        let inv: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| {
                let e = i as f32 / dim as f32;
                1.0f32 / (base as f32).powf(e)
            })
            .collect();
        match &self.rope.scaling {
            RopeScaling::Default => (inv, 1.0),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                // _compute_llama3_parameters, element by element in f32.
                let factor = *factor as f32;
                let low = *low_freq_factor as f32;
                let high = *high_freq_factor as f32;
                let old_context_len = *original_max_position_embeddings as f32;
                let low_freq_wavelen =
                    (*original_max_position_embeddings as f64 / *low_freq_factor) as f32;
                let high_freq_wavelen =
                    (*original_max_position_embeddings as f64 / *high_freq_factor) as f32;
                let two_pi = (2.0 * std::f64::consts::PI) as f32;
                let out = inv
                    .into_iter()
                    .map(|f| {
                        let wavelen = two_pi / f;
                        let inv_llama = if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            f
                        };
                        let smooth = (old_context_len / wavelen - low) / (high - low);
                        let smoothed = (1.0 - smooth) * inv_llama / factor + smooth * inv_llama;
                        let medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                        if medium { smoothed } else { inv_llama }
                    })
                    .collect();
                (out, 1.0)
            }
        }
    }
}

/// The RoPE settings, merged as transformers' `convert_rope_params_to_dict` + `standardize_rope_params` do:
/// `rope_scaling` (old files) or `rope_parameters` (transformers 5), `rope_theta` from inside the dict, else the
/// top level, else 10000; `rope_type` from `rope_type`, else `type`, else `"default"`.
fn parse_rope(v: &Value, head_dim: usize, max_pos: usize) -> Result<RopeConfig> {
    let empty = serde_json::Map::new();
    let dict = match (v.get("rope_scaling"), v.get("rope_parameters")) {
        (Some(Value::Object(m)), _) => m,
        (_, Some(Value::Object(m))) => m,
        (Some(x), _) if !x.is_null() => {
            return Err(bad("rope_scaling", "must be an object or null"));
        }
        (_, Some(x)) if !x.is_null() => {
            return Err(bad("rope_parameters", "must be an object or null"));
        }
        _ => &empty,
    };
    let dv = Value::Object(dict.clone());
    let theta = match get_f64(&dv, "rope_theta")? {
        Some(t) => t,
        None => get_f64(v, "rope_theta")?.unwrap_or(10_000.0),
    };
    let rope_type = dict
        .get("rope_type")
        .or_else(|| dict.get("type"))
        .map(|t| {
            t.as_str()
                .map(str::to_string)
                .ok_or_else(|| bad("rope_type", format!("must be a string, got {t}")))
        })
        .transpose()?
        .unwrap_or_else(|| "default".to_string());
    let prf = get_f64(&dv, "partial_rotary_factor")?.or(get_f64(v, "partial_rotary_factor")?);
    if let Some(p) = prf
        && p != 1.0
    {
        return Err(PeftError::Unsupported {
            field: "partial_rotary_factor".into(),
            value: p.to_string(),
            reason: format!("RoPE on part of the head (head_dim {head_dim}) is not implemented"),
        });
    }
    let scaling = match rope_type.as_str() {
        "default" => RopeScaling::Default,
        "llama3" => {
            let need = |k: &str| {
                get_f64(&dv, k)?.ok_or_else(|| {
                    bad(
                        &format!("rope_parameters.{k}"),
                        "is missing for rope_type \"llama3\"",
                    )
                })
            };
            // standardize_rope_params: a top-level original_max_position_embeddings wins, then the dict's,
            // then max_position_embeddings.
            let omp = match get_usize(v, "original_max_position_embeddings")? {
                Some(n) => n,
                None => get_usize(&dv, "original_max_position_embeddings")?.unwrap_or(max_pos),
            };
            RopeScaling::Llama3 {
                factor: need("factor")?,
                low_freq_factor: need("low_freq_factor")?,
                high_freq_factor: need("high_freq_factor")?,
                original_max_position_embeddings: omp,
            }
        }
        other => {
            return Err(PeftError::Unsupported {
                field: "rope_type".into(),
                value: format!("{other:?}"),
                reason: "only \"default\" and \"llama3\" RoPE are implemented".into(),
            });
        }
    };
    Ok(RopeConfig { theta, scaling })
}

/// The per-layer sliding windows of transformers' mistral / qwen2 configs.
fn parse_sliding(v: &Value, family: LlamaFamily, layers: usize) -> Result<Vec<Option<usize>>> {
    let window = get_usize(v, "sliding_window")?;
    Ok(match family {
        LlamaFamily::Llama => vec![None; layers],
        // MistralConfig's default is 4096 when the key is absent; an explicit null turns it off.
        LlamaFamily::Mistral => {
            let w = match v.get("sliding_window") {
                None => Some(4096),
                Some(_) => window,
            };
            vec![w; layers]
        }
        LlamaFamily::Qwen2 => {
            let use_sw = get_bool(v, "use_sliding_window")?.unwrap_or(false);
            let window = if use_sw { window.or(Some(4096)) } else { None };
            let max_window_layers = get_usize(v, "max_window_layers")?.unwrap_or(28);
            match v.get("layer_types") {
                Some(Value::Array(types)) => {
                    if types.len() != layers {
                        return Err(bad(
                            "layer_types",
                            format!("has {} entries for {layers} layers", types.len()),
                        ));
                    }
                    types
                        .iter()
                        .map(|t| match t.as_str() {
                            Some("full_attention") => Ok(None),
                            Some("sliding_attention") => Ok(window),
                            _ => Err(bad("layer_types", format!("has an unknown entry {t}"))),
                        })
                        .collect::<Result<_>>()?
                }
                _ => (0..layers)
                    .map(|i| {
                        if window.is_some() && i >= max_window_layers {
                            window
                        } else {
                            None
                        }
                    })
                    .collect(),
            }
        }
    })
}
