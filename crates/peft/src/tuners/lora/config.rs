//! `LoraConfig`, field for field with PEFT 0.21.2's `tuners/lora/config.py`.

use crate::config::PeftConfigBase;
use crate::config::common::{RankAlphaPatterns, TargetFields, LayersToTransform, StrOrList, TargetModules};
use crate::config::helpers::{
    self, int_if_integral, refuse_flag, refuse_if_some,
    refuse_if_truthy,
};
use crate::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `bias`: which biases train and are saved with the adapter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraBias {
    /// `"none"`: no bias trains.
    #[default]
    None,
    /// `"all"`: every bias of the model trains.
    All,
    /// `"lora_only"`: the biases of the targeted layers train.
    LoraOnly,
}

impl LoraBias {
    /// The name as written in `adapter_config.json`.
    pub fn as_str(self) -> &'static str {
        match self {
            LoraBias::None => "none",
            LoraBias::All => "all",
            LoraBias::LoraOnly => "lora_only",
        }
    }
}

impl std::str::FromStr for LoraBias {
    type Err = crate::PeftError;

    /// `"none"`, `"all"` or `"lora_only"`, as PEFT writes them.
    ///
    /// ```
    /// use peft::config::LoraBias;
    /// assert_eq!("lora_only".parse::<LoraBias>()?, LoraBias::LoraOnly);
    /// assert!("some".parse::<LoraBias>().is_err());
    /// # Ok::<(), peft::PeftError>(())
    /// ```
    fn from_str(s: &str) -> Result<Self> {
        [LoraBias::None, LoraBias::All, LoraBias::LoraOnly]
            .into_iter()
            .find(|b| b.as_str() == s)
            .ok_or_else(|| {
                crate::PeftError::InvalidConfig(format!(
                    "unknown bias {s:?} (none, all or lora_only)"
                ))
            })
    }
}

/// LoRA's `trainable_token_indices`: embedding rows that train alongside the LoRA layers (PEFT wraps each
/// such layer in a `TrainableTokensWrapper` around a trainable-tokens adapter).
///
/// - a list of token ids applies to the model's input embedding (transformers' `get_input_embeddings()`,
///   `model.embed_tokens` in the Llama family);
/// - a map `{module: [ids]}` applies to every module whose dotted name ends with `module` (PEFT's plain
///   `str.endswith`, no dot boundary), e.g. `{"embed_tokens": [0, 1]}`; the first entry (in map order) that
///   matches a module gives its ids.
///
/// With tied embeddings the output head follows the embedding's rows (one trained tensor, saved once under
/// the embedding's name), as in PEFT.
///
/// ```
/// use peft::config::TrainableTokenIndices;
/// let t: TrainableTokenIndices = serde_json::from_str(r#"{"embed_tokens": [3, 5]}"#)?;
/// assert_eq!(t.indices_for("model.embed_tokens"), Some(&[3usize, 5][..]));
/// assert_eq!(t.indices_for("lm_head"), None);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TrainableTokenIndices {
    /// `[ids]`: rows of the input embedding.
    List(Vec<usize>),
    /// `{module: [ids]}`: rows of each named module.
    Map(indexmap::IndexMap<String, Vec<usize>>),
}

impl TrainableTokenIndices {
    /// The ids of the module `module` when the layers are known by name: for the map form, the first entry
    /// whose key `module` ends with; for the list form, the list (whatever the module: the caller decides
    /// which module is the input embedding).
    pub fn indices_for(&self, module: &str) -> Option<&[usize]> {
        match self {
            TrainableTokenIndices::List(l) => Some(l),
            TrainableTokenIndices::Map(m) => m
                .iter()
                .find(|(k, _)| module.ends_with(k.as_str()))
                .map(|(_, v)| v.as_slice()),
        }
    }

    /// The layers and their ids, as PEFT's `set_additional_trainable_modules` reads them: the list form
    /// names `input_embeddings` (PEFT's fallback is `"embed_tokens"` when the model has none).
    pub fn target_layers(&self, input_embeddings: Option<&str>) -> Vec<(String, Vec<usize>)> {
        match self {
            TrainableTokenIndices::List(l) => {
                vec![(input_embeddings.unwrap_or("embed_tokens").to_string(), l.clone())]
            }
            TrainableTokenIndices::Map(m) => m.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        }
    }

    /// An empty list of ids trains nothing (PEFT accepts it, then fails in the forward: `index_copy_()`
    /// gets a float index), and an empty module name would match every module.
    pub fn validate(&self) -> Result<()> {
        let empty = |what: &str| {
            Err(PeftError::InvalidConfig(format!(
                "`trainable_token_indices`: {what} (PEFT's forward fails on an empty index list)"
            )))
        };
        match self {
            TrainableTokenIndices::List(l) if l.is_empty() => empty("the list of token ids is empty"),
            TrainableTokenIndices::Map(m) => {
                for (k, v) in m {
                    if k.is_empty() {
                        return Err(PeftError::InvalidConfig(
                            "`trainable_token_indices`: a module name is empty".into(),
                        ));
                    }
                    if v.is_empty() {
                        return empty(&format!("the token ids of `{k}` are empty"));
                    }
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// `init_lora_weights`: `true` (Kaiming-uniform A, zero B), `false` (random A and B, for tests), or a named
/// method (`"gaussian"`, and many that peft-rs refuses, see [`LoraConfig::validate`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitLoraWeights {
    /// `true` or `false`.
    Bool(bool),
    /// A named initialisation, as written (`"gaussian"`, `"pissa_niter_4"`, …).
    Method(String),
}

impl InitLoraWeights {
    /// The initialisation that rewrites the base weight this names (PiSSA, OLoRA), if any.
    ///
    /// ```
    /// use peft::tuners::lora::config::InitLoraWeights;
    /// use peft::tuners::lora::rewrite_init::RewriteInit;
    /// assert_eq!(InitLoraWeights::Method("olora".into()).rewrites_base(), Some(RewriteInit::Olora));
    /// assert_eq!(InitLoraWeights::Bool(true).rewrites_base(), None);
    /// ```
    pub fn rewrites_base(&self) -> Option<super::rewrite_init::RewriteInit> {
        use super::rewrite_init::RewriteInit;
        match self {
            InitLoraWeights::Method(m) if m == "pissa" => Some(RewriteInit::Pissa),
            InitLoraWeights::Method(m) if m.eq_ignore_ascii_case("olora") => Some(RewriteInit::Olora),
            _ => None,
        }
    }
}

impl Default for InitLoraWeights {
    fn default() -> Self {
        InitLoraWeights::Bool(true)
    }
}

const REWRITES_BASE: &str = "initialisations that rewrite the base weights are not supported yet";

/// The LoRA fields for features that peft-rs does not implement, shared by [`LoraConfig`] and
/// [`crate::config::AdaLoraConfig`] (flattened into both: each is a top-level key of the file). At their PEFT
/// defaults (shown per field) they are accepted; [`LoraOptionalFeatures::validate`] refuses any other value.
/// Sub-configs are kept as raw JSON.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraOptionalFeatures {
    /// `megatron_config` (default `null`): Megatron-LM parallel layers.
    pub megatron_config: Option<Value>,
    /// `megatron_core` (default `"megatron.core"`): the module name, used only with `megatron_config`.
    pub megatron_core: Option<String>,
    /// `trainable_token_indices` (default `null`): embedding rows trained alongside LoRA (PEFT's
    /// `TrainableTokensWrapper`). Implemented for LoRA ([`LoraConfig::validate`]); AdaLoRA refuses it.
    pub trainable_token_indices: Option<TrainableTokenIndices>,
    /// `loftq_config` (default `{}`): LoftQ quantisation settings, used with `init_lora_weights="loftq"`.
    pub loftq_config: Value,
    /// `eva_config` (default `null`): EVA data-driven initialisation.
    pub eva_config: Option<Value>,
    /// `corda_config` (default `null`): CorDA initialisation.
    pub corda_config: Option<Value>,
    /// `lora_ga_config` (default `null`): LoRA-GA initialisation.
    pub lora_ga_config: Option<Value>,
    /// `velora_config` (default `null`): VeLoRA activation compression.
    pub velora_config: Option<Value>,
    /// `alora_invocation_tokens` (default `null`): activated LoRA.
    pub alora_invocation_tokens: Option<Value>,
    /// `use_qalora` (default `false`): QA-LoRA.
    pub use_qalora: bool,
    /// `qalora_group_size` (default 16): used only with `use_qalora`.
    pub qalora_group_size: Value,
    /// `monteclora_config` (default `null`): MonteCLoRA.
    pub monteclora_config: Option<Value>,
    /// `layer_replication` (default `null`): layer stacking with shared weights.
    pub layer_replication: Option<Value>,
    /// `target_parameters` (default `null`): LoRA on bare `nn.Parameter`s (e.g. MoE experts).
    pub target_parameters: Option<Value>,
    /// `use_bdlora` (default `null`): block-diagonal LoRA.
    pub use_bdlora: Option<Value>,
    /// `arrow_config` (default `null`): Arrow routing between LoRA experts.
    pub arrow_config: Option<Value>,
    /// `kasa_config` (default `null`): KaSA.
    pub kasa_config: Option<Value>,
    /// `ensure_weight_tying` (default `false`): keeps adapters on tied layers tied.
    pub ensure_weight_tying: bool,
}

impl Default for LoraOptionalFeatures {
    fn default() -> Self {
        Self {
            megatron_config: None,
            megatron_core: Some("megatron.core".into()),
            trainable_token_indices: None,
            loftq_config: Value::Object(Map::new()),
            eva_config: None,
            corda_config: None,
            lora_ga_config: None,
            velora_config: None,
            alora_invocation_tokens: None,
            use_qalora: false,
            qalora_group_size: Value::from(16),
            monteclora_config: None,
            layer_replication: None,
            target_parameters: None,
            use_bdlora: None,
            arrow_config: None,
            kasa_config: None,
            ensure_weight_tying: false,
        }
    }
}

impl LoraOptionalFeatures {
    /// Refuses every feature that is set, naming the field: a sub-config or list that is not `null` (PEFT turns
    /// even `{}` into a sub-config with its defaults, which enables the feature), a flag that is `true`, a
    /// non-empty `loftq_config` / `megatron_config` / `layer_replication` / `target_parameters` (PEFT tests these
    /// for truthiness). `megatron_core` and `qalora_group_size` only matter with their feature and are accepted.
    /// This is AdaLoRA's check; LoRA accepts `trainable_token_indices` ([`LoraConfig::validate`]).
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = &self.trainable_token_indices {
            return Err(PeftError::Unsupported {
                field: "trainable_token_indices".into(),
                value: serde_json::to_string(t).unwrap_or_default(),
                reason: "trainable tokens are implemented for LoRA only".into(),
            });
        }
        self.validate_except_trainable_tokens()
    }

    /// [`LoraOptionalFeatures::validate`] without the `trainable_token_indices` refusal (LoRA implements it).
    pub fn validate_except_trainable_tokens(&self) -> Result<()> {
        let null = &Value::Null;
        refuse_if_truthy(
            "megatron_config",
            self.megatron_config.as_ref().unwrap_or(null),
            "Megatron-LM parallel layers are not supported",
        )?;
        refuse_if_truthy("loftq_config", &self.loftq_config, REWRITES_BASE)?;
        refuse_if_some(
            "eva_config",
            self.eva_config.as_ref(),
            "EVA (data-driven initialisation) is not implemented",
        )?;
        refuse_if_some("corda_config", self.corda_config.as_ref(), REWRITES_BASE)?;
        refuse_if_some(
            "lora_ga_config",
            self.lora_ga_config.as_ref(),
            REWRITES_BASE,
        )?;
        refuse_if_some(
            "velora_config",
            self.velora_config.as_ref(),
            "VeLoRA activation compression is not implemented",
        )?;
        refuse_if_some(
            "alora_invocation_tokens",
            self.alora_invocation_tokens.as_ref(),
            "activated LoRA (aLoRA) is not implemented",
        )?;
        refuse_flag("use_qalora", self.use_qalora, "QA-LoRA is not implemented")?;
        refuse_if_some(
            "monteclora_config",
            self.monteclora_config.as_ref(),
            "MonteCLoRA is not implemented",
        )?;
        refuse_if_truthy(
            "layer_replication",
            self.layer_replication.as_ref().unwrap_or(null),
            "layer replication is not implemented",
        )?;
        refuse_if_truthy(
            "target_parameters",
            self.target_parameters.as_ref().unwrap_or(null),
            "LoRA on bare parameters (target_parameters) is not implemented",
        )?;
        refuse_if_some(
            "use_bdlora",
            self.use_bdlora.as_ref(),
            "block-diagonal LoRA is not implemented",
        )?;
        refuse_if_some(
            "arrow_config",
            self.arrow_config.as_ref(),
            "Arrow routing is not implemented",
        )?;
        refuse_if_some("kasa_config", self.kasa_config.as_ref(), REWRITES_BASE)?;
        refuse_flag(
            "ensure_weight_tying",
            self.ensure_weight_tying,
            "weight tying of adapters is not implemented",
        )?;
        Ok(())
    }
}

/// Refuses the `init_lora_weights` values peft-rs does not implement (LoRA).
fn check_init(init: &InitLoraWeights) -> Result<()> {
    match init {
        InitLoraWeights::Bool(_) => Ok(()),
        // PEFT compares with `.lower()`.
        InitLoraWeights::Method(m) if m.eq_ignore_ascii_case("gaussian") => Ok(()),
        // PEFT: `startswith("pissa")` then `== "pissa"`; `.lower() == "olora"`.
        InitLoraWeights::Method(m) if m == "pissa" || m.eq_ignore_ascii_case("olora") => Ok(()),
        // PEFT: `init_lora_weights == "orthogonal"`.
        InitLoraWeights::Method(m) if m == "orthogonal" => Ok(()),
        InitLoraWeights::Method(m) if m.starts_with("pissa_niter_") => Err(PeftError::Unsupported {
            field: "init_lora_weights".into(),
            value: Value::String(m.clone()).to_string(),
            reason: "fast PiSSA (torch.svd_lowrank) draws from torch's global normal stream, which is not \
                     reproduced; use \"pissa\" (the exact SVD)"
                .into(),
        }),
        InitLoraWeights::Method(m) => {
            let lower = m.to_ascii_lowercase();
            let rewrites = lower.starts_with("corda")
                || m == "loftq"
                || m == "lora_ga";
            let reason = if rewrites {
                REWRITES_BASE.to_string()
            } else if m == "eva" {
                "data-driven initialisations (EVA) are not supported yet".to_string()
            } else {
                "only true, false and \"gaussian\" are supported; other initialisations (e.g. those that rewrite \
                 the base weights) are not supported yet"
                    .to_string()
            };
            Err(PeftError::Unsupported {
                field: "init_lora_weights".into(),
                value: Value::String(m.clone()).to_string(),
                reason,
            })
        }
    }
}

/// The LoRA fields AdaLoRA inherits from `LoraConfig` (PEFT's `AdaLoraConfig` subclasses it), flattened into
/// [`LoraConfig`] and [`AdaLoraConfig`](crate::config::AdaLoraConfig) as `lora`.
///
/// ```
/// use peft::config::{LoraConfig, LoraFields, TargetFields};
/// let c = LoraConfig {
///     lora: LoraFields { r: 16, lora_alpha: 32.0, ..Default::default() },
///     targets: TargetFields::modules(["q_proj", "v_proj"]),
///     ..Default::default()
/// };
/// let json = serde_json::to_value(&c)?;
/// assert_eq!((json["r"].as_u64(), json["lora_alpha"].as_u64()), (Some(16), Some(32)));
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraFields {
    /// `r`: the rank (default 8).
    pub r: usize,
    /// `lora_alpha` (default 8; an `int` in PEFT, written as an integer when integral).
    #[serde(serialize_with = "int_if_integral")]
    pub lora_alpha: f64,
    /// `lora_dropout` (default 0.0).
    pub lora_dropout: f64,
    /// `fan_in_fan_out`: the base weight is stored `[in, out]` (GPT-2 `Conv1D`) (default `false`).
    pub fan_in_fan_out: bool,
    /// `bias` (default `"none"`).
    pub bias: LoraBias,
    /// `use_rslora`: scale by `alpha/√r` instead of `alpha/r` (default `false`).
    pub use_rslora: bool,
    /// `init_lora_weights` (default `true`).
    pub init_lora_weights: InitLoraWeights,
    /// `use_dora`: weight-decomposed LoRA (default `false`).
    pub use_dora: bool,
    /// `lora_bias`: a trainable bias in `lora_B` (default `false`).
    pub lora_bias: bool,
}

impl Default for LoraFields {
    fn default() -> Self {
        Self {
            r: 8,
            lora_alpha: 8.0,
            lora_dropout: 0.0,
            fan_in_fan_out: false,
            bias: LoraBias::None,
            use_rslora: false,
            init_lora_weights: InitLoraWeights::Bool(true),
            use_dora: false,
            lora_bias: false,
        }
    }
}

/// An adapter's LoRA settings (`peft_type: "LORA"`).
///
/// Absent keys take PEFT 0.21.2's defaults ([`LoraConfig::default`]); unknown keys are kept in `extra`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `target_modules`, `exclude_modules`, `layers_to_transform`, `layers_pattern`, `modules_to_save`.
    #[serde(flatten)]
    pub targets: TargetFields,
    /// `rank_pattern`, `alpha_pattern`.
    #[serde(flatten)]
    pub patterns: RankAlphaPatterns,
    /// `r`, `lora_alpha`, `lora_dropout`, `fan_in_fan_out`, `bias`, `use_rslora`, `init_lora_weights`,
    /// `use_dora`, `lora_bias`.
    #[serde(flatten)]
    pub lora: LoraFields,
    /// The fields of LoRA features peft-rs does not implement (each a top-level key).
    #[serde(flatten)]
    pub features: LoraOptionalFeatures,
    /// Keys PEFT 0.21.2's `LoraConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            targets: TargetFields::default(),
            patterns: RankAlphaPatterns::default(),
            lora: LoraFields::default(),
            features: LoraOptionalFeatures::default(),
            extra: Map::new(),
        }
    }
}

/// PEFT's LoRA scaling: `alpha / √r` with rsLoRA, else `alpha / r`.
pub(crate) fn lora_scaling(use_rslora: bool, r: usize, alpha: f64) -> f64 {
    if use_rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// PEFT's `LoraConfig.__post_init__` checks on the layer selection and on `lora_bias`, shared with AdaLoRA.
pub(crate) fn check_lora_common(
    target_modules: Option<&TargetModules>,
    layers_to_transform: Option<&LayersToTransform>,
    layers_pattern: Option<&StrOrList>,
    init: &InitLoraWeights,
    lora_bias: bool,
    use_dora: bool,
    lora_dropout: f64,
) -> Result<()> {
    helpers::check_regex_target_layers(target_modules, layers_to_transform, layers_pattern)?;
    helpers::check_layers_pattern(layers_to_transform, layers_pattern)?;
    helpers::check_probability("lora_dropout", lora_dropout)?;
    if lora_bias {
        if !matches!(init, InitLoraWeights::Bool(_)) {
            return Err(PeftError::InvalidConfig(
                "`lora_bias=true` is only supported with `init_lora_weights` true or false".into(),
            ));
        }
        if use_dora {
            return Err(PeftError::InvalidConfig(
                "`lora_bias=true` is not supported for DoRA".into(),
            ));
        }
    }
    Ok(())
}

impl LoraConfig {
    /// The scaling of a LoRA layer with rank `r` and alpha `alpha`: `alpha / r`, or `alpha / √r` with
    /// `use_rslora`.
    pub fn scaling_for(&self, r: usize, alpha: f64) -> f64 {
        lora_scaling(self.lora.use_rslora, r, alpha)
    }

    /// The rank and alpha of the module named `module_name` (dotted, as PEFT's `current_key`): from the first
    /// key of `rank_pattern` / `alpha_pattern` (in map order) that matches as `re.match(rf"(.*\.)?({key})$",
    /// module_name)`, else the top-level `r` / `lora_alpha`.
    pub fn rank_and_alpha_for(&self, module_name: &str) -> (usize, f64) {
        self.patterns.rank_and_alpha_for(module_name, self.lora.r, self.lora.lora_alpha)
    }

    /// PEFT's checks, then a refusal of every unimplemented feature set to a non-default value.
    ///
    /// Implemented: `r`, `lora_alpha`, `lora_dropout`, `fan_in_fan_out`, `bias` (all three), `use_rslora`,
    /// `modules_to_save`, `init_lora_weights` `true` / `false` / `"gaussian"`, `layers_to_transform` /
    /// `layers_pattern`, `rank_pattern` / `alpha_pattern`, `use_dora`, `lora_bias`, `target_modules` /
    /// `exclude_modules`. Refused ([`PeftError::Unsupported`]): any other `init_lora_weights` (PiSSA, OLoRA,
    /// CorDA, LoftQ, LoRA-GA, EVA, orthogonal, MiCA, …) and every field of [`LoraOptionalFeatures`] when set.
    pub fn validate(&self) -> Result<()> {
        if self.lora.r == 0 {
            return Err(PeftError::InvalidConfig(
                "`r` should be a positive integer value but the value passed is 0".into(),
            ));
        }
        if let Some((key, _)) = self.patterns.rank_pattern.iter().find(|(_, r)| **r == 0) {
            return Err(PeftError::InvalidConfig(format!(
                "`rank_pattern` gives {key:?} rank 0; ranks must be positive"
            )));
        }
        helpers::check_pattern_keys("rank_pattern", self.patterns.rank_pattern.keys())?;
        helpers::check_pattern_keys("alpha_pattern", self.patterns.alpha_pattern.keys())?;
        check_lora_common(
            self.targets.target_modules.as_ref(),
            self.targets.layers_to_transform.as_ref(),
            self.targets.layers_pattern.as_ref(),
            &self.lora.init_lora_weights,
            self.lora.lora_bias,
            self.lora.use_dora,
            self.lora.lora_dropout,
        )?;
        check_init(&self.lora.init_lora_weights)?;
        if self.lora.init_lora_weights == InitLoraWeights::Method("orthogonal".into()) {
            let odd = std::iter::once(self.lora.r)
                .chain(self.patterns.rank_pattern.values().copied())
                .find(|r| !r.is_multiple_of(2));
            if let Some(r) = odd {
                return Err(PeftError::InvalidConfig(format!(
                    "Orthogonal initialization requires the LoRA rank to be even, got {r} instead."
                )));
            }
        }
        if self.lora.init_lora_weights.rewrites_base().is_some() && self.lora.use_dora {
            return Err(PeftError::Unsupported {
                field: "use_dora".into(),
                value: "true".into(),
                reason: "DoRA with an initialisation that rewrites the base (PiSSA, OLoRA) is not implemented yet"
                    .into(),
            });
        }
        if let Some(t) = &self.features.trainable_token_indices {
            t.validate()?;
        }
        self.features.validate_except_trainable_tokens()?;
        helpers::refuse_unknown_keys(&self.extra, "LoraConfig")
    }
}

/// `init_lora_weights` as AdaLoRA reads it: any truthy value is the default initialisation, so a named method
/// would be silently replaced; peft-rs refuses names instead.
pub(crate) fn check_adalora_init(init: &InitLoraWeights) -> Result<()> {
    match init {
        InitLoraWeights::Bool(_) => Ok(()),
        InitLoraWeights::Method(m) => Err(PeftError::Unsupported {
            field: "init_lora_weights".into(),
            value: Value::String(m.clone()).to_string(),
            reason: "AdaLoRA has no named initialisations (PEFT treats any string as true); use true or false".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tuners::MethodType;
    use crate::config::{PeftConfig, json_content_eq};

    /// `LoraConfig()` saved by PEFT 0.21.2 (`inference_mode` set to true).
    pub(crate) const DEFAULT_JSON: &str = r#"{
  "alora_invocation_tokens": null,
  "alpha_pattern": {},
  "arrow_config": null,
  "auto_mapping": null,
  "base_model_name_or_path": null,
  "bias": "none",
  "corda_config": null,
  "ensure_weight_tying": false,
  "eva_config": null,
  "exclude_modules": null,
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "kasa_config": null,
  "layer_replication": null,
  "layers_pattern": null,
  "layers_to_transform": null,
  "loftq_config": {},
  "lora_alpha": 8,
  "lora_bias": false,
  "lora_dropout": 0.0,
  "lora_ga_config": null,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": null,
  "monteclora_config": null,
  "peft_type": "LORA",
  "peft_version": "0.21.2",
  "qalora_group_size": 16,
  "r": 8,
  "rank_pattern": {},
  "revision": null,
  "target_modules": null,
  "target_parameters": null,
  "task_type": null,
  "trainable_token_indices": null,
  "use_bdlora": null,
  "use_dora": false,
  "use_qalora": false,
  "use_rslora": false,
  "velora_config": null
}"#;

    /// A config written by PEFT 0.21.2 with many non-default values (`json.dumps` output, byte for byte).
    const EXACT_JSON: &str = r#"{
  "alora_invocation_tokens": null,
  "alpha_pattern": {
    "k_proj": 32,
    "q_proj": 0.5
  },
  "arrow_config": null,
  "auto_mapping": {
    "base_model_class": "LlamaForCausalLM",
    "parent_library": "transformers.models.llama.modeling_llama"
  },
  "base_model_name_or_path": "mod\u00e8le/\u00fc-tiny",
  "bias": "lora_only",
  "corda_config": null,
  "ensure_weight_tying": false,
  "eva_config": null,
  "exclude_modules": null,
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": "gaussian",
  "kasa_config": null,
  "layer_replication": null,
  "layers_pattern": "layers",
  "layers_to_transform": [
    0,
    2
  ],
  "loftq_config": {},
  "lora_alpha": 16,
  "lora_bias": false,
  "lora_dropout": 1e-05,
  "lora_ga_config": null,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": [
    "lm_head",
    "classifier"
  ],
  "monteclora_config": null,
  "peft_type": "LORA",
  "peft_version": "0.21.2",
  "qalora_group_size": 16,
  "r": 4,
  "rank_pattern": {
    "a.b": 3,
    "z_proj": 2
  },
  "revision": null,
  "target_modules": [
    "q_proj"
  ],
  "target_parameters": null,
  "task_type": "CAUSAL_LM",
  "trainable_token_indices": null,
  "use_bdlora": null,
  "use_dora": false,
  "use_qalora": false,
  "use_rslora": true,
  "velora_config": null
}"#;

    fn lora(text: &str) -> LoraConfig {
        match PeftConfig::from_json_str(text).expect("parses") {
            PeftConfig::Lora(c) => c,
            other => panic!("not LoRA: {other:?}"),
        }
    }

    #[test]
    fn default_json_parses_to_default_and_validates() {
        let c = lora(DEFAULT_JSON);
        let mut want = LoraConfig::default();
        want.base.inference_mode = true;
        assert_eq!(c, want);
        assert!(c.unknown_keys().is_empty());
        PeftConfig::Lora(c)
            .validate()
            .expect("defaults are supported");
    }

    #[test]
    fn default_config_writes_peft_default_json_byte_for_byte() {
        assert_eq!(
            PeftConfig::Lora(LoraConfig::default()).to_json_string(),
            DEFAULT_JSON
        );
    }

    #[test]
    fn exact_json_round_trips_byte_for_byte() {
        let cfg = PeftConfig::from_json_str(EXACT_JSON).expect("parses");
        cfg.validate().expect("supported");
        assert_eq!(cfg.to_json_string(), EXACT_JSON);
        let PeftConfig::Lora(c) = &cfg else { panic!() };
        assert_eq!(c.lora.r, 4);
        assert_eq!(c.lora.lora_alpha, 16.0);
        assert_eq!(c.lora.lora_dropout, 1e-5);
        assert_eq!(c.lora.bias, LoraBias::LoraOnly);
        assert_eq!(
            c.lora.init_lora_weights,
            InitLoraWeights::Method("gaussian".into())
        );
        assert_eq!(
            c.targets.layers_to_transform,
            Some(LayersToTransform::Many(vec![0, 2]))
        );
        assert_eq!(c.targets.layers_pattern, Some(StrOrList::One("layers".into())));
        assert_eq!(
            c.base.base_model_name_or_path.as_deref(),
            Some("modèle/ü-tiny")
        );
        assert_eq!(c.base.task_type, Some(crate::config::TaskType::CausalLm));
        assert_eq!(
            c.targets.modules_to_save,
            Some(vec!["lm_head".to_string(), "classifier".to_string()])
        );
        // File order is kept (sorted, since PEFT sorts on save).
        assert_eq!(c.patterns.rank_pattern.keys().collect::<Vec<_>>(), ["a.b", "z_proj"]);
        assert_eq!(c.patterns.alpha_pattern.get("q_proj"), Some(&0.5));
    }

    #[test]
    fn absent_keys_take_peft_defaults() {
        let c = lora(r#"{"peft_type": "LORA", "r": 16, "target_modules": ["q_proj", "v_proj"]}"#);
        assert_eq!(c.lora.r, 16);
        assert_eq!(c.lora.lora_alpha, 8.0);
        assert_eq!(c.lora.lora_dropout, 0.0);
        assert_eq!(c.lora.bias, LoraBias::None);
        assert_eq!(c.lora.init_lora_weights, InitLoraWeights::Bool(true));
        assert!(c.patterns.rank_pattern.is_empty() && c.patterns.alpha_pattern.is_empty());
        assert_eq!(c.base.peft_version.as_deref(), Some("0.21.2"));
        assert!(!c.base.inference_mode);
        assert_eq!(c.features, LoraOptionalFeatures::default());
        assert_eq!(
            c.targets.target_modules,
            Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()]))
        );
        PeftConfig::Lora(c).validate().expect("supported");
    }

    #[test]
    fn null_patterns_read_as_empty() {
        let c = lora(r#"{"peft_type": "LORA", "rank_pattern": null, "alpha_pattern": null}"#);
        assert!(c.patterns.rank_pattern.is_empty() && c.patterns.alpha_pattern.is_empty());
    }

    #[test]
    fn llama_config_from_peft_round_trips() {
        let text = r#"{"alora_invocation_tokens": null, "alpha_pattern": {"v_proj": 3.5}, "arrow_config": null,
          "auto_mapping": null, "base_model_name_or_path": "meta-llama/Llama-2-7b-hf", "bias": "none",
          "corda_config": null, "ensure_weight_tying": false, "eva_config": null, "exclude_modules": null,
          "fan_in_fan_out": false, "inference_mode": true, "init_lora_weights": true, "kasa_config": null,
          "layer_replication": null, "layers_pattern": null, "layers_to_transform": null, "loftq_config": {},
          "lora_alpha": 32, "lora_bias": false, "lora_dropout": 0.05, "lora_ga_config": null,
          "megatron_config": null, "megatron_core": "megatron.core", "modules_to_save": null,
          "monteclora_config": null, "peft_type": "LORA", "peft_version": "0.21.2", "qalora_group_size": 16,
          "r": 16, "rank_pattern": {"layers.0.self_attn.v_proj": 2, "q_proj": 4}, "revision": null,
          "target_modules": ["v_proj", "q_proj"], "target_parameters": null, "task_type": "CAUSAL_LM",
          "trainable_token_indices": null, "use_bdlora": null, "use_dora": false, "use_qalora": false,
          "use_rslora": false, "velora_config": null}"#;
        let cfg = PeftConfig::from_json_str(text).expect("parses");
        cfg.validate().expect("supported");
        let original: Value = serde_json::from_str(text).expect("json");
        let written: Value = serde_json::from_str(&cfg.to_json_string()).expect("json");
        assert!(json_content_eq(&original, &written));
        let PeftConfig::Lora(c) = &cfg else { panic!() };
        assert_eq!(
            c.rank_and_alpha_for("model.layers.0.self_attn.v_proj"),
            (2, 3.5)
        );
        assert_eq!(
            c.rank_and_alpha_for("model.layers.1.self_attn.v_proj"),
            (16, 3.5)
        );
        assert_eq!(
            c.rank_and_alpha_for("model.layers.1.self_attn.q_proj"),
            (4, 32.0)
        );
        assert_eq!(
            c.rank_and_alpha_for("model.layers.1.mlp.up_proj"),
            (16, 32.0)
        );
    }

    #[test]
    fn rank_and_alpha_pattern_lookup_table() {
        let c = lora(
            r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16,
               "rank_pattern": {"q_proj": 4, "layers.0.self_attn.k_proj": 2, "k_proj": 6, "layers\\.1\\..*": 12},
               "alpha_pattern": {"self_attn.k_proj": 1.5, "proj": 99}}"#,
        );
        let table: &[(&str, usize, f64)] = &[
            ("model.layers.0.self_attn.q_proj", 4, 16.0),
            ("q_proj", 4, 16.0),
            ("model.layers.0.self_attn.xq_proj", 8, 16.0),
            ("model.layers.0.self_attn.q_proj_x", 8, 16.0),
            // The suffix key comes before "k_proj" in the file, so it wins for layer 0 ...
            ("model.layers.0.self_attn.k_proj", 2, 1.5),
            // ... and "k_proj" for the other layers.
            ("model.layers.2.self_attn.k_proj", 6, 1.5),
            // "layers.0.self_attn.k_proj" must match a whole dotted tail: not "layers.10...".
            ("model.layers.10.self_attn.k_proj", 6, 1.5),
            // The first key in file order wins over a later, more specific one: "q_proj" before "layers\.1\..*".
            ("model.layers.1.self_attn.q_proj", 4, 16.0),
            ("model.layers.1.mlp.up_proj", 12, 16.0),
            ("model.layers.1.mlp.proj", 12, 99.0),
        ];
        for &(name, r, alpha) in table {
            assert_eq!(c.rank_and_alpha_for(name), (r, alpha), "{name}");
        }
        // Reordering the keys changes the winner.
        let mut reordered = c.clone();
        reordered.patterns.rank_pattern.move_index(0, 3);
        assert_eq!(
            reordered.rank_and_alpha_for("model.layers.1.self_attn.q_proj"),
            (12, 16.0)
        );
    }

    #[test]
    fn scaling_plain_and_rslora() {
        let mut c = LoraConfig::default();
        assert_eq!(c.scaling_for(8, 16.0), 2.0);
        c.lora.use_rslora = true;
        assert_eq!(c.scaling_for(16, 16.0), 4.0);
    }

    #[test]
    fn float_alpha_is_written_as_float_integral_as_int() {
        let c = LoraConfig {
            lora: crate::config::LoraFields { lora_alpha: 12.5, ..LoraConfig::default().lora },
            ..LoraConfig::default()
        };
        let v = PeftConfig::Lora(c).to_json_value();
        assert_eq!(v["lora_alpha"].to_string(), "12.5");
        let v = PeftConfig::Lora(LoraConfig {
            lora: crate::config::LoraFields { lora_alpha: 32.0, ..LoraConfig::default().lora },
            ..LoraConfig::default()
        })
        .to_json_value();
        assert_eq!(v["lora_alpha"].to_string(), "32");
        assert_eq!(v["lora_dropout"].to_string(), "0.0");
    }

    fn refused(text: &str) -> PeftError {
        PeftConfig::from_json_str(text)
            .expect("parses")
            .validate()
            .expect_err("must be refused")
    }

    fn assert_unsupported(text: &str, want_field: &str) {
        match refused(text) {
            PeftError::Unsupported { field, .. } => assert_eq!(field, want_field, "{text}"),
            other => panic!("expected Unsupported({want_field}), got {other:?}"),
        }
    }

    #[test]
    fn unsupported_features_are_refused_by_name() {
        let cases: &[(&str, &str)] = &[
            (
                r#""init_lora_weights": "pissa_niter_4""#,
                "init_lora_weights",
            ),
            (r#""init_lora_weights": "PiSSA""#, "init_lora_weights"),
            (r#""init_lora_weights": "corda""#, "init_lora_weights"),
            (
                r#""init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 4}"#,
                "init_lora_weights",
            ),
            (r#""init_lora_weights": "eva""#, "init_lora_weights"),
            (r#""init_lora_weights": "Orthogonal""#, "init_lora_weights"),
            (r#""init_lora_weights": "mystery""#, "init_lora_weights"),
            (r#""use_qalora": true"#, "use_qalora"),
            (
                r#""layer_replication": [[0, 4], [2, 5]]"#,
                "layer_replication",
            ),
            (
                r#""loftq_config": {"loftq_bits": 4, "loftq_iter": 1}"#,
                "loftq_config",
            ),
            (r#""eva_config": {"rho": 2.0}"#, "eva_config"),
            (r#""corda_config": {"cache_file": null}"#, "corda_config"),
            (
                r#""megatron_config": {"tensor_model_parallel_size": 2}"#,
                "megatron_config",
            ),
            (
                r#""alora_invocation_tokens": [5, 6]"#,
                "alora_invocation_tokens",
            ),
            (
                r#""target_parameters": ["experts.gate_up_proj"]"#,
                "target_parameters",
            ),
            (r#""use_bdlora": {"nblocks": 2}"#, "use_bdlora"),
            (r#""arrow_config": {"top_k": 3}"#, "arrow_config"),
            (r#""kasa_config": {}"#, "kasa_config"),
            (
                r#""megatron_config": {"tensor_model_parallel_size": 2}, "use_dora": true"#,
                "megatron_config",
            ),
            (r#""velora_config": {"num_groups": 64}"#, "velora_config"),
            (
                r#""monteclora_config": {"num_samples": 8}"#,
                "monteclora_config",
            ),
            (
                r#""lora_ga_config": {"direction": "ArB2r"}"#,
                "lora_ga_config",
            ),
            (r#""ensure_weight_tying": true"#, "ensure_weight_tying"),
            (r#""some_future_flag": true"#, "some_future_flag"),
        ];
        for (fields, field) in cases {
            let text = format!(r#"{{"peft_type": "LORA", {fields}}}"#);
            assert_unsupported(&text, field);
        }
    }

    /// LoRA's `trainable_token_indices` reads both of PEFT's forms and writes them back as read; an empty id
    /// list is refused (PEFT's forward fails on it); AdaLoRA still refuses the field.
    #[test]
    fn trainable_token_indices_forms() {
        let c = PeftConfig::from_json_str(
            r#"{"peft_type": "LORA", "trainable_token_indices": {"model.embed_tokens": [3, 5], "lm_head": [1]}}"#,
        )
        .unwrap();
        let PeftConfig::Lora(l) = &c else { panic!() };
        let t = l.features.trainable_token_indices.as_ref().unwrap();
        assert_eq!(t.indices_for("model.embed_tokens"), Some(&[3usize, 5][..]));
        assert_eq!(t.indices_for("lm_head"), Some(&[1usize][..]));
        assert_eq!(t.indices_for("model.norm"), None);
        assert_eq!(
            c.to_json_value()["trainable_token_indices"],
            serde_json::json!({"lm_head": [1], "model.embed_tokens": [3, 5]})
        );
        let c = PeftConfig::from_json_str(r#"{"peft_type": "LORA", "trainable_token_indices": [7]}"#).unwrap();
        let PeftConfig::Lora(l) = &c else { panic!() };
        let t = l.features.trainable_token_indices.as_ref().unwrap();
        assert_eq!(
            t.target_layers(Some("model.embed_tokens")),
            vec![("model.embed_tokens".to_string(), vec![7])]
        );
        for bad in [
            r#""trainable_token_indices": []"#,
            r#""trainable_token_indices": {"embed_tokens": []}"#,
            r#""trainable_token_indices": {"": [1]}"#,
        ] {
            match refused(&format!(r#"{{"peft_type": "LORA", {bad}}}"#)) {
                PeftError::InvalidConfig(m) => assert!(m.contains("trainable_token_indices"), "{m}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
        assert!(
            PeftConfig::from_json_str(r#"{"peft_type": "LORA", "trainable_token_indices": [-1]}"#).is_err()
        );
        let e = refused(
            r#"{"peft_type": "ADALORA", "total_step": 10, "trainable_token_indices": [1]}"#,
        );
        assert!(matches!(e, PeftError::Unsupported { ref field, .. } if field == "trainable_token_indices"), "{e}");
    }

    #[test]
    fn error_message_names_field_and_reason() {
        let e = refused(r#"{"peft_type": "LORA", "init_lora_weights": "corda"}"#);
        let msg = e.to_string();
        assert!(
            msg.contains("init_lora_weights") && msg.contains("rewrite the base weights"),
            "{msg}"
        );
    }

    #[test]
    fn supported_values_pass() {
        for fields in [
            r#""init_lora_weights": false"#,
            r#""init_lora_weights": "gaussian""#,
            r#""init_lora_weights": "Gaussian""#,
            r#""init_lora_weights": "pissa""#,
            r#""init_lora_weights": "OLoRA""#,
            r#""init_lora_weights": "orthogonal""#,
            r#""bias": "all""#,
            r#""bias": "lora_only", "lora_bias": true"#,
            r#""use_dora": true, "use_rslora": true"#,
            r#""target_modules": ".*\\.(q|v)_proj", "exclude_modules": ["lm_head"]"#,
            r#""layers_to_transform": 3, "layers_pattern": ["layers", "h"], "target_modules": ["q"]"#,
            r#""megatron_core": "something.else", "qalora_group_size": 32"#,
            r#""target_parameters": [], "layer_replication": [], "megatron_config": {}"#,
            r#""enable_lora": null, "merge_weights": false"#,
            r#""trainable_token_indices": [1, 2]"#,
            r#""trainable_token_indices": {"embed_tokens": [0], "lm_head": [3, 3]}"#,
            r#""trainable_token_indices": {}"#,
        ] {
            let text = format!(r#"{{"peft_type": "LORA", {fields}}}"#);
            PeftConfig::from_json_str(&text)
                .expect("parses")
                .validate()
                .unwrap_or_else(|e| panic!("{fields}: {e}"));
        }
    }

    #[test]
    fn peft_consistency_errors_are_invalid_config() {
        for fields in [
            r#""target_modules": ".*q_proj", "layers_to_transform": [0]"#,
            r#""target_modules": ".*q_proj", "layers_pattern": "layers""#,
            r#""layers_pattern": "layers""#,
            r#""lora_bias": true, "init_lora_weights": "gaussian""#,
            r#""lora_bias": true, "use_dora": true"#,
            r#""r": 0"#,
            r#""rank_pattern": {"q_proj": 0}"#,
            r#""rank_pattern": {"q_proj(": 2}"#,
            r#""lora_dropout": 1.5"#,
        ] {
            let text = format!(r#"{{"peft_type": "LORA", {fields}}}"#);
            match refused(&text) {
                PeftError::InvalidConfig(_) => {}
                other => panic!("{fields}: expected InvalidConfig, got {other:?}"),
            }
        }
    }

    #[test]
    fn wrong_types_are_json_errors_not_panics() {
        for fields in [
            r#""r": "eight""#,
            r#""bias": "some""#,
            r#""lora_alpha": null"#,
            r#""rank_pattern": [1]"#,
        ] {
            let text = format!(r#"{{"peft_type": "LORA", {fields}}}"#);
            match PeftConfig::from_json_str(&text) {
                Err(PeftError::Json { .. }) => {}
                other => panic!("{fields}: expected a Json error, got {other:?}"),
            }
        }
    }
}
