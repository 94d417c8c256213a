//! `adapter_config.json`: one struct per PEFT method, field for field with PEFT 0.21.2's config dataclasses.
//!
//! [`PeftConfig`] is the file as a whole, tagged by its `peft_type`. Reading applies PEFT's default to every
//! absent key and keeps every key we do not know (in each struct's `extra`, reported by
//! [`PeftConfig::unknown_keys`] and written back unchanged). Writing reproduces PEFT's
//! `json.dumps(d, indent=2, sort_keys=True)` byte for byte, with `inference_mode` forced to `true` as PEFT does
//! when it saves an adapter. Because PEFT writes its set-valued fields (`target_modules`, …) in hash order,
//! compare configs with [`json_content_eq`], never byte for byte.
//!
//! Parsing only checks the shape of the document. [`PeftConfig::validate`] then applies PEFT's own consistency
//! checks ([`PeftError::InvalidConfig`]) and refuses every feature peft-rs does not implement when it is set
//! to a non-default value ([`PeftError::Unsupported`], naming the field). Loading code must call it.

pub mod common;
pub(crate) mod helpers;
pub mod json;

pub use crate::tuners::configs::*;
pub use crate::tuners::lokr::config::LoKrInitWeights;
pub use crate::tuners::lora::config::{
    InitLoraWeights, LoraBias, LoraFields, LoraOptionalFeatures, TrainableTokenIndices,
};
pub use crate::tuners::lycoris_utils::LycorisFields;
pub use crate::tuners::p_tuning::config::PromptEncoderReparameterizationType;
pub use crate::tuners::prompt_tuning::config::PromptTuningInit;
pub use common::{
    BiasMode, LayersToTransform, RankAlphaPatterns, StrOrList, TargetFields, TargetModules,
    TargetSpec,
};
pub use json::{json_content_eq, python_dumps};

use crate::{PeftError, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// The config file name in an adapter directory.
pub const CONFIG_NAME: &str = "adapter_config.json";

/// The PEFT version whose file format this crate reproduces; written as `peft_version` when a config does not
/// carry one (PEFT fills in its own version the same way).
pub const PEFT_VERSION: &str = "0.21.2";

pub use crate::tuners::{PeftConfig, PeftType};

impl fmt::Display for PeftType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every `PeftType` of PEFT 0.21.2 (`utils/peft_types.py`) and the tuners it ships outside that enum (PEANuT,
/// DEFT, SuperTuning, Shadow).
pub const PEFT_0_21_2_TYPES: &[&str] = &[
    "PROMPT_TUNING",
    "MULTITASK_PROMPT_TUNING",
    "P_TUNING",
    "PREFIX_TUNING",
    "LORA",
    "ADALORA",
    "ADAMSS",
    "BOFT",
    "ADAPTION_PROMPT",
    "IA3",
    "BEFT",
    "LILY",
    "LOHA",
    "LOKR",
    "OFT",
    "POLY",
    "LN_TUNING",
    "VERA",
    "FROD",
    "PVERA",
    "FOURIERFT",
    "GLORA",
    "XLORA",
    "HRA",
    "VBLORA",
    "UNILORA",
    "CPT",
    "MISS",
    "RANDLORA",
    "ROAD",
    "TRAINABLE_TOKENS",
    "HIRA",
    "SHIRA",
    "C3A",
    "WAVEFT",
    "OSF",
    "DELORA",
    "GRALORA",
    "CARTRIDGE",
    "TINYLORA",
    "PSOFT",
    "PEANUT",
    "DEFT",
    "SUPERTUNING",
    "SHADOW",
];

/// The tail of [`PeftError::UnknownPeftType`]'s message: says so when the name is a PEFT 0.21.2 method that
/// peft-rs does not implement yet.
pub fn peft_type_hint(name: &str) -> &'static str {
    if PEFT_0_21_2_TYPES.contains(&name) && name.parse::<PeftType>().is_err() {
        " (a method of PEFT 0.21.2 that peft-rs does not implement yet; see the README's list)"
    } else {
        ""
    }
}

impl FromStr for PeftType {
    type Err = PeftError;

    /// Parses a `peft_type` exactly as written (PEFT's names are upper case); anything else is
    /// [`PeftError::UnknownPeftType`], including methods PEFT has but peft-rs does not read.
    fn from_str(s: &str) -> Result<Self> {
        PeftType::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| PeftError::UnknownPeftType(s.to_string()))
    }
}

impl Serialize for PeftType {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for PeftType {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `task_type`: the kind of model head the adapter was trained with (PEFT's `TaskType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TaskType {
    /// `"SEQ_CLS"`: text classification.
    #[serde(rename = "SEQ_CLS")]
    SeqCls,
    /// `"SEQ_2_SEQ_LM"`: sequence-to-sequence language modelling.
    #[serde(rename = "SEQ_2_SEQ_LM")]
    Seq2SeqLm,
    /// `"CAUSAL_LM"`: causal language modelling.
    #[serde(rename = "CAUSAL_LM")]
    CausalLm,
    /// `"TOKEN_CLS"`: token classification.
    #[serde(rename = "TOKEN_CLS")]
    TokenCls,
    /// `"QUESTION_ANS"`: question answering.
    #[serde(rename = "QUESTION_ANS")]
    QuestionAns,
    /// `"FEATURE_EXTRACTION"`: hidden states as features.
    #[serde(rename = "FEATURE_EXTRACTION")]
    FeatureExtraction,
}

impl TaskType {
    /// The name as written in `adapter_config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskType::SeqCls => "SEQ_CLS",
            TaskType::Seq2SeqLm => "SEQ_2_SEQ_LM",
            TaskType::CausalLm => "CAUSAL_LM",
            TaskType::TokenCls => "TOKEN_CLS",
            TaskType::QuestionAns => "QUESTION_ANS",
            TaskType::FeatureExtraction => "FEATURE_EXTRACTION",
        }
    }
}

/// The fields every PEFT config has (PEFT's `PeftConfigMixin` and `PeftConfig`), flattened into each method's
/// struct as its `base` field. `peft_type` is not here: it is the tag of [`PeftConfig`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeftConfigBase {
    /// `task_type` (default `null`).
    pub task_type: Option<TaskType>,
    /// `auto_mapping`: how to rebuild a custom base model class (default `null`; kept as written).
    pub auto_mapping: Option<Value>,
    /// `peft_version`: the PEFT version that wrote the file. Absent (files older than PEFT 0.18) or `null`, PEFT
    /// fills in its own version, as we do ([`PEFT_VERSION`]).
    #[serde(deserialize_with = "peft_version_or_ours")]
    pub peft_version: Option<String>,
    /// `base_model_name_or_path` (default `null`).
    pub base_model_name_or_path: Option<String>,
    /// `revision` of the base model (default `null`).
    pub revision: Option<String>,
    /// `inference_mode` (default `false`; PEFT writes `true` when it saves an adapter).
    pub inference_mode: bool,
}

/// `peft_version: null` reads as [`PEFT_VERSION`], as PEFT's `__post_init__` fills it in.
fn peft_version_or_ours<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Option<String>, D::Error> {
    Ok(Some(
        Option::<String>::deserialize(d)?.unwrap_or_else(|| PEFT_VERSION.to_string()),
    ))
}

impl Default for PeftConfigBase {
    fn default() -> Self {
        Self {
            task_type: None,
            auto_mapping: None,
            peft_version: Some(PEFT_VERSION.to_string()),
            base_model_name_or_path: None,
            revision: None,
            inference_mode: false,
        }
    }
}

/// The fields of every prompt-learning config (PEFT's `PromptLearningConfig`), flattened into
/// [`PromptTuningConfig`], [`PrefixTuningConfig`] and [`PromptEncoderConfig`] as their `prompt` field.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PromptLearningBase {
    /// `num_virtual_tokens` (no default in PEFT: `null`; [`PeftConfig::validate`] requires it).
    pub num_virtual_tokens: Option<usize>,
    /// `token_dim`: the hidden size of the base model (filled in from the model when `null`).
    pub token_dim: Option<usize>,
    /// `num_transformer_submodules`: 1, or 2 for encoder-decoder models (filled in when `null`).
    pub num_transformer_submodules: Option<usize>,
    /// `num_attention_heads` of the base model (filled in when `null`).
    pub num_attention_heads: Option<usize>,
    /// `num_layers` of the base model (filled in when `null`).
    pub num_layers: Option<usize>,
    /// `modules_to_save`: extra modules trained in full and saved with the adapter (default `null`).
    pub modules_to_save: Option<Vec<String>>,
}

impl PromptLearningBase {
    /// PEFT needs `num_virtual_tokens` to build any prompt-learning adapter.
    pub(crate) fn validate(&self) -> Result<()> {
        match self.num_virtual_tokens {
            None => Err(PeftError::InvalidConfig(
                "`num_virtual_tokens` must be set for prompt learning".into(),
            )),
            Some(0) => Err(PeftError::InvalidConfig(
                "`num_virtual_tokens` must be positive, got 0".into(),
            )),
            Some(_) => Ok(()),
        }
    }
}

/// Keys whose list value PEFT turns into a set (so duplicates disappear when it saves).
const SET_KEYS: &[&str] = &["target_modules", "exclude_modules", "feedforward_modules"];

fn json_error(context: &str, e: impl fmt::Display) -> PeftError {
    PeftError::Json {
        context: context.to_string(),
        message: e.to_string(),
    }
}

pub(crate) fn parse_variant<T: serde::de::DeserializeOwned>(
    map: Map<String, Value>,
    context: &str,
    t: PeftType,
) -> Result<T> {
    let value = Value::Object(map);
    match serde_json::from_value::<T>(value.clone()) {
        Ok(v) => Ok(v),
        Err(e) => {
            let field = culprit_field::<T>(&value, &e.to_string())
                .map(|k| format!(", field `{k}`"))
                .unwrap_or_default();
            Err(json_error(&format!("{context} ({t} config{field})"), e))
        }
    }
}

/// The key of `value` that a failed deserialization of `T` is about. serde's messages for flattened structs
/// (all our configs) do not name the field, so each key is tried: the one whose removal makes the error go
/// away, or change, is it. Only runs on the error path.
fn culprit_field<T: serde::de::DeserializeOwned>(value: &Value, message: &str) -> Option<String> {
    if let Some(k) = message
        .strip_prefix("missing field `")
        .and_then(|m| m.split('`').next())
    {
        return Some(k.to_string());
    }
    let map = value.as_object()?;
    map.keys().find_map(|k| {
        let mut without = map.clone();
        without.remove(k);
        match serde_json::from_value::<T>(Value::Object(without)) {
            Ok(_) => Some(k.clone()),
            // a required key's removal changes the message too, without being the culprit
            Err(e) if e.to_string() != message && !e.to_string().starts_with("missing field") => {
                Some(k.clone())
            }
            Err(_) => None,
        }
    })
}

impl PeftConfig {
    /// Whether the method is prompt learning.
    pub fn is_prompt_learning(&self) -> bool {
        self.peft_type().is_prompt_learning()
    }

    /// The fields every config has.
    pub fn base(&self) -> &PeftConfigBase {
        self.method().base()
    }

    /// The fields every config has, mutably.
    pub fn base_mut(&mut self) -> &mut PeftConfigBase {
        self.method_mut().base_mut()
    }

    /// `base_model_name_or_path`.
    pub fn base_model_name_or_path(&self) -> Option<&str> {
        self.base().base_model_name_or_path.as_deref()
    }

    /// `inference_mode`.
    pub fn inference_mode(&self) -> bool {
        self.base().inference_mode
    }

    /// `task_type`.
    pub fn task_type(&self) -> Option<TaskType> {
        self.base().task_type
    }

    /// `modules_to_save`: modules trained in full and saved with the adapter.
    pub fn modules_to_save(&self) -> Option<&[String]> {
        self.method().modules_to_save()
    }

    /// Which modules the adapter wraps; `None` for prompt learning, which wraps none.
    pub fn target_spec(&self) -> Option<TargetSpec<'_>> {
        self.method().target_spec()
    }

    /// Replaces `target_modules` (what PEFT writes back after resolving defaults and `all-linear`); prompt
    /// learning has none, and is left unchanged.
    pub fn set_target_modules(&mut self, t: Option<TargetModules>) {
        self.method_mut().set_target_modules(t)
    }

    /// The keys of the file that PEFT 0.21.2's config class does not have (kept, and written back on save).
    pub fn unknown_keys(&self) -> Vec<String> {
        self.extra().keys().cloned().collect()
    }

    /// The unknown keys with their values.
    pub fn extra(&self) -> &Map<String, Value> {
        self.method().extra()
    }

    /// Checks the config as PEFT 0.21.2 does when it builds the adapter ([`PeftError::InvalidConfig`]) and
    /// refuses every feature peft-rs does not implement when it is set to a non-default value
    /// ([`PeftError::Unsupported`], naming the field). Unknown keys are accepted at `null` / `false` / `0` / empty
    /// values and refused otherwise, since their effect is unknown.
    pub fn validate(&self) -> Result<()> {
        self.method().validate()
    }

    /// The config as PEFT's `to_dict()` gives it: every field, `peft_type` included, unknown keys kept.
    /// `inference_mode` is as held (see [`to_json_string`](Self::to_json_string) for the saved form).
    pub fn to_json_value(&self) -> Value {
        let value = self.fields_to_value();
        // Serializing these structs cannot fail: every map key is a string.
        let mut map = match value {
            Ok(Value::Object(m)) => m,
            _ => Map::new(),
        };
        map.insert(
            "peft_type".into(),
            Value::String(self.peft_type().as_str().into()),
        );
        for key in SET_KEYS {
            if let Some(Value::Array(items)) = map.get_mut(*key) {
                let mut seen: Vec<Value> = Vec::with_capacity(items.len());
                items.retain(|v| {
                    let new = !seen.contains(v);
                    if new {
                        seen.push(v.clone());
                    }
                    new
                });
            }
        }
        Value::Object(map)
    }

    /// The text PEFT writes as `adapter_config.json` for this config: `json.dumps(d, indent=2, sort_keys=True)`
    /// with `inference_mode` forced to `true` (PEFT sets it when it saves an adapter), no trailing newline.
    pub fn to_json_string(&self) -> String {
        let mut value = self.to_json_value();
        if let Value::Object(map) = &mut value {
            map.insert("inference_mode".into(), Value::Bool(true));
        }
        python_dumps(&value)
    }

    /// Writes [`to_json_string`](Self::to_json_string) to `<dir>/adapter_config.json`, creating `dir` if needed.
    /// The file is written under a temporary name in the same directory and then renamed
    /// ([`crate::io::atomic_write`]), so a failure never leaves a half-written config behind.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
        crate::io::atomic_write(&dir.join(CONFIG_NAME), self.to_json_string().as_bytes())
    }

    /// Parses the text of an `adapter_config.json`.
    pub fn from_json_str(text: &str) -> Result<Self> {
        Self::from_json_str_in(text, CONFIG_NAME)
    }

    fn from_json_str_in(text: &str, context: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| json_error(context, e))?;
        Self::from_json_value_in(value, context)
    }

    /// Reads a config file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| PeftError::io(path, e))?;
        Self::from_json_str_in(&text, &path.display().to_string())
    }

    /// Reads `<dir>/adapter_config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join(CONFIG_NAME))
    }

    /// Builds a config from a parsed JSON object, as PEFT's `PeftConfig.from_pretrained` does: `peft_type` picks
    /// the class, absent keys take PEFT's defaults, unknown keys are kept, and `runtime_config` is dropped (PEFT
    /// drops it on load: runtime settings are never read from a file).
    ///
    /// Errors: not an object or no string `peft_type` ([`PeftError::InvalidConfig`]); a `peft_type` peft-rs does
    /// not read ([`PeftError::UnknownPeftType`]); a field of the wrong type ([`PeftError::Json`]); an OFT config
    /// from before PEFT 0.14 (no `oft_block_size`), which PEFT refuses too.
    pub fn from_json_value(value: Value) -> Result<Self> {
        Self::from_json_value_in(value, CONFIG_NAME)
    }

    fn from_json_value_in(value: Value, context: &str) -> Result<Self> {
        let mut map = match value {
            Value::Object(map) => map,
            other => {
                return Err(PeftError::InvalidConfig(format!(
                    "{context}: an adapter config must be a JSON object, got {}",
                    helpers::show(&other)
                )));
            }
        };
        map.remove("runtime_config");
        let peft_type: PeftType = match map.remove("peft_type") {
            Some(Value::String(s)) => s.parse()?,
            Some(other) => {
                return Err(PeftError::InvalidConfig(format!(
                    "{context}: `peft_type` must be a string, got {}",
                    helpers::show(&other)
                )));
            }
            None => {
                return Err(PeftError::InvalidConfig(format!(
                    "{context}: no `peft_type` key, so the adapter method is unknown"
                )));
            }
        };
        PeftConfig::parse_fields(peft_type, map, context)
    }
}

impl Serialize for PeftConfig {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.to_json_value().serialize(s)
    }
}

impl<'de> Deserialize<'de> for PeftConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let value = Value::deserialize(d)?;
        PeftConfig::from_json_value(value).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn every_default() -> Vec<PeftConfig> {
        vec![
            LoraConfig::default().into(),
            AdaLoraConfig {
                total_step: Some(10),
                ..Default::default()
            }
            .into(),
            Ia3Config::default().into(),
            LoHaConfig::default().into(),
            LoKrConfig::default().into(),
            OftConfig::default().into(),
            BoftConfig::default().into(),
            crate::tuners::configs::HraConfig::default().into(),
            crate::tuners::configs::RoadConfig::default().into(),
            crate::tuners::configs::DeloraConfig::default().into(),
            crate::tuners::configs::MissConfig::default().into(),
            crate::tuners::configs::GraloraConfig::default().into(),
            crate::tuners::configs::C3aConfig::default().into(),
            crate::tuners::configs::HiraConfig::default().into(),
            crate::tuners::configs::BeftConfig::default().into(),
            crate::tuners::configs::VbLoraConfig::default().into(),
            crate::tuners::configs::GloraConfig::default().into(),
            crate::tuners::configs::PeanutConfig::default().into(),
            crate::tuners::configs::SupertuningConfig::default().into(),
            crate::tuners::configs::ShiraConfig::default().into(),
            crate::tuners::configs::PveraConfig::default().into(),
            crate::tuners::configs::RandLoraConfig::default().into(),
            crate::tuners::configs::DeftConfig::default().into(),
            crate::tuners::configs::UniLoraConfig::default().into(),
            crate::tuners::configs::FrodConfig::default().into(),
            crate::tuners::configs::OsfConfig::default().into(),
            crate::tuners::configs::TrainableTokensConfig {
                token_indices: vec![0],
                ..Default::default()
            }
            .into(),
            VeraConfig::default().into(),
            crate::tuners::configs::FourierftConfig::default().into(),
            PromptTuningConfig {
                prompt: PromptLearningBase {
                    num_virtual_tokens: Some(4),
                    ..Default::default()
                },
                ..Default::default()
            }
            .into(),
            PrefixTuningConfig {
                prompt: PromptLearningBase {
                    num_virtual_tokens: Some(4),
                    ..Default::default()
                },
                ..Default::default()
            }
            .into(),
            PromptEncoderConfig {
                prompt: PromptLearningBase {
                    num_virtual_tokens: Some(4),
                    ..Default::default()
                },
                ..Default::default()
            }
            .into(),
        ]
    }

    #[test]
    fn peft_type_names_round_trip() {
        for t in PeftType::ALL {
            assert_eq!(t.as_str().parse::<PeftType>().expect("known"), t);
            assert_eq!(t.to_string(), t.as_str());
        }
        assert!(PeftType::PTuning.is_prompt_learning() && !PeftType::Lora.is_prompt_learning());
    }

    #[test]
    fn every_method_validates_and_round_trips_at_defaults() {
        let defaults = every_default();
        assert_eq!(defaults.len(), PeftType::ALL.len());
        for cfg in defaults {
            cfg.validate()
                .unwrap_or_else(|e| panic!("{}: {e}", cfg.peft_type()));
            let text = cfg.to_json_string();
            let back = PeftConfig::from_json_str(&text).expect("parses");
            assert_eq!(back.peft_type(), cfg.peft_type());
            assert!(back.inference_mode(), "inference_mode is forced on save");
            let mut expected = cfg.clone();
            expected.base_mut().inference_mode = true;
            assert_eq!(back, expected);
            assert_eq!(back.to_json_string(), text);
            assert!(back.unknown_keys().is_empty());
            assert_eq!(back.target_spec().is_none(), cfg.is_prompt_learning());
        }
    }

    #[test]
    fn written_json_has_sorted_keys_and_two_space_indent() {
        let cfg = PeftConfig::from(LoraConfig {
            targets: TargetFields::modules(["v_proj", "q_proj"]),
            patterns: RankAlphaPatterns {
                rank_pattern: [("z".to_string(), 2usize), ("a".to_string(), 4)]
                    .into_iter()
                    .collect(),
                ..Default::default()
            },
            ..Default::default()
        });
        let text = cfg.to_json_string();
        assert!(text.starts_with("{\n  \"alora_invocation_tokens\": null,\n"));
        assert!(text.ends_with("\n}"));
        assert!(text.contains("\n  \"rank_pattern\": {\n    \"a\": 4,\n    \"z\": 2\n  },\n"));
        // The list keeps its order (PEFT writes its set in hash order; we write ours as held).
        assert!(text.contains("\"target_modules\": [\n    \"v_proj\",\n    \"q_proj\"\n  ],"));
        let top_keys: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("  \"") && !l.starts_with("   "))
            .filter_map(|l| l.trim_start().strip_prefix('"')?.split('"').next())
            .collect();
        let mut sorted = top_keys.clone();
        sorted.sort_unstable();
        assert_eq!(top_keys, sorted);
        assert_eq!(
            top_keys.len(),
            cfg.to_json_value().as_object().map_or(0, |m| m.len())
        );
        // The held value is not changed by saving.
        assert_eq!(cfg.to_json_value()["inference_mode"], json!(false));
    }

    #[test]
    fn unknown_keys_are_kept_reported_and_written_back() {
        let text = r#"{"peft_type": "LORA", "r": 4, "enable_lora": null, "merge_weights": false,
            "zzz_note": {"b": [], "a": null}, "target_modules": ["q", "v"]}"#;
        let cfg = PeftConfig::from_json_str(text).expect("parses");
        assert_eq!(
            cfg.unknown_keys(),
            ["enable_lora", "merge_weights", "zzz_note"]
        );
        // All falsy except zzz_note, which is a non-empty object: refused, by name.
        match cfg.validate() {
            Err(PeftError::Unsupported { field, .. }) => assert_eq!(field, "zzz_note"),
            other => panic!("{other:?}"),
        }
        let written = cfg.to_json_string();
        let back = PeftConfig::from_json_str(&written).expect("parses");
        assert_eq!(
            back.unknown_keys(),
            ["enable_lora", "merge_weights", "zzz_note"]
        );
        let written: Value = serde_json::from_str(&written).expect("json");
        assert_eq!(written["zzz_note"], json!({"a": null, "b": []}));
        assert_eq!(written["merge_weights"], json!(false));
        assert!(written.get("enable_lora").is_some_and(Value::is_null));
        let mut original: Value = serde_json::from_str(text).expect("json");
        // Everything we wrote is the original plus PEFT's defaults for the absent keys.
        for (k, v) in original.as_object_mut().expect("object").iter() {
            assert!(
                json_content_eq(
                    &json!({ k.as_str(): v }),
                    &json!({ k.as_str(): written[k] })
                ),
                "{k}"
            );
        }
    }

    #[test]
    fn unknown_keys_at_falsy_values_pass_validation() {
        let text = r#"{"peft_type": "IA3", "future_a": null, "future_b": false, "future_c": 0, "future_d": [],
            "future_e": {}, "future_f": ""}"#;
        let cfg = PeftConfig::from_json_str(text).expect("parses");
        cfg.validate().expect("falsy unknown keys are accepted");
        assert_eq!(cfg.unknown_keys().len(), 6);
    }

    #[test]
    fn peft_methods_not_implemented_yet_say_so() {
        let e = PeftConfig::from_json_str(r#"{"peft_type": "XLORA"}"#).unwrap_err();
        assert!(matches!(&e, PeftError::UnknownPeftType(n) if n == "XLORA"));
        assert!(e.to_string().contains("does not implement yet"), "{e}");
        let e = PeftConfig::from_json_str(r#"{"peft_type": "NOT_A_METHOD"}"#).unwrap_err();
        assert_eq!(e.to_string(), "unknown peft_type \"NOT_A_METHOD\"");
        // every implemented method is one of PEFT's
        for t in PeftType::ALL {
            assert!(PEFT_0_21_2_TYPES.contains(&t.as_str()), "{t}");
        }
    }

    #[test]
    fn unknown_peft_type_is_an_error() {
        for name in ["FOURIER_FT", "lora", "Lora", ""] {
            let text = format!(r#"{{"peft_type": "{name}", "r": 8}}"#);
            match PeftConfig::from_json_str(&text) {
                Err(PeftError::UnknownPeftType(n)) => assert_eq!(n, name),
                other => panic!("{name}: {other:?}"),
            }
        }
    }

    #[test]
    fn missing_or_malformed_peft_type_and_bad_json_are_clear_errors() {
        let e = PeftConfig::from_json_str(r#"{"r": 8}"#).expect_err("no peft_type");
        assert!(
            matches!(&e, PeftError::InvalidConfig(m) if m.contains("peft_type")),
            "{e}"
        );
        let e = PeftConfig::from_json_str(r#"{"peft_type": null}"#).expect_err("null peft_type");
        assert!(
            matches!(&e, PeftError::InvalidConfig(m) if m.contains("peft_type")),
            "{e}"
        );
        let e = PeftConfig::from_json_str("[1, 2]").expect_err("not an object");
        assert!(matches!(e, PeftError::InvalidConfig(_)));
        let e = PeftConfig::from_json_str("{\"peft_type\": \"LORA\",").expect_err("truncated");
        assert!(matches!(e, PeftError::Json { .. }));
        let e = PeftConfig::from_json_str(r#"{"peft_type": "LORA", "task_type": "SOMETHING"}"#)
            .expect_err("task");
        assert!(matches!(e, PeftError::Json { .. }));
    }

    #[test]
    fn missing_or_null_peft_version_reads_as_ours_and_others_are_kept() {
        for text in [
            r#"{"peft_type": "IA3"}"#,
            r#"{"peft_type": "IA3", "peft_version": null}"#,
        ] {
            let cfg = PeftConfig::from_json_str(text).expect("parses");
            assert_eq!(cfg.base().peft_version.as_deref(), Some(PEFT_VERSION));
        }
        let cfg =
            PeftConfig::from_json_str(r#"{"peft_type": "IA3", "peft_version": "0.18.0.dev0@abc"}"#)
                .expect("parses");
        assert_eq!(
            cfg.to_json_value()["peft_version"],
            json!("0.18.0.dev0@abc")
        );
    }

    #[test]
    fn runtime_config_is_dropped_on_load() {
        let text = r#"{"peft_type": "LORA", "runtime_config": {"ephemeral_gpu_offload": true}}"#;
        let cfg = PeftConfig::from_json_str(text).expect("parses");
        assert!(cfg.unknown_keys().is_empty());
        cfg.validate().expect("supported");
        assert!(cfg.to_json_value().get("runtime_config").is_none());
    }

    #[test]
    fn save_and_read_back_from_dir() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("nested").join("adapter");
        let cfg = PeftConfig::from(LoraConfig {
            lora: crate::config::LoraFields {
                r: 16,
                lora_alpha: 32.0,
                ..Default::default()
            },

            ..Default::default()
        });
        cfg.save(&sub).expect("saved");
        let text = std::fs::read_to_string(sub.join(CONFIG_NAME)).expect("written");
        assert_eq!(text, cfg.to_json_string());
        assert!(!sub.join("adapter_config.json.tmp").exists());
        let back = PeftConfig::from_dir(&sub).expect("reads");
        let mut want = cfg.clone();
        want.base_mut().inference_mode = true;
        assert_eq!(back, want);
        assert!(matches!(
            PeftConfig::from_dir(dir.path()),
            Err(PeftError::Io { .. })
        ));
        // A file where the directory should be is an I/O error, not a panic.
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        assert!(matches!(cfg.save(&file), Err(PeftError::Io { .. })));
    }

    #[test]
    fn serde_form_is_the_tagged_object() {
        let cfg = PeftConfig::from(LoHaConfig {
            lycoris: crate::config::LycorisFields {
                r: 2,
                ..Default::default()
            },
            ..Default::default()
        });
        let value = serde_json::to_value(&cfg).expect("serializes");
        assert_eq!(value["peft_type"], json!("LOHA"));
        assert_eq!(value["r"], json!(2));
        let back: PeftConfig = serde_json::from_value(value).expect("deserializes");
        assert_eq!(back, cfg);
        assert!(serde_json::from_value::<PeftConfig>(json!({"peft_type": "NOPE"})).is_err());
    }

    #[test]
    fn content_eq_ignores_set_order_of_a_peft_file() {
        let a = PeftConfig::from_json_str(
            r#"{"peft_type": "LORA", "target_modules": ["q_proj", "v_proj", "k_proj"]}"#,
        )
        .expect("parses");
        let b = PeftConfig::from_json_str(
            r#"{"peft_type": "LORA", "target_modules": ["k_proj", "q_proj", "v_proj"]}"#,
        )
        .expect("parses");
        assert_ne!(a, b);
        assert!(json_content_eq(&a.to_json_value(), &b.to_json_value()));
    }

    #[test]
    fn accessors() {
        let cfg = PeftConfig::from_json_str(
            r#"{"peft_type": "LORA", "base_model_name_or_path": "gpt2", "task_type": "CAUSAL_LM",
                "modules_to_save": ["score"], "target_modules": "c_attn", "inference_mode": true}"#,
        )
        .expect("parses");
        assert_eq!(cfg.base_model_name_or_path(), Some("gpt2"));
        assert_eq!(cfg.task_type(), Some(TaskType::CausalLm));
        assert_eq!(cfg.modules_to_save(), Some(&["score".to_string()][..]));
        assert!(cfg.inference_mode());
        let spec = cfg.target_spec().expect("spec");
        assert_eq!(
            spec.target_modules,
            Some(&TargetModules::Regex("c_attn".into()))
        );
        assert_eq!(spec.modules_to_save, Some(&["score".to_string()][..]));
    }
}
