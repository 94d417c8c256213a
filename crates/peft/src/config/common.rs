//! Config field types shared by several methods.

use indexmap::IndexMap;
use serde::{Deserialize, Serialize};

/// `target_modules` / `exclude_modules`: a list of names (exact or `.`-suffix match) or one regex
/// (`re.fullmatch` on the full dotted name). The string `"all-linear"` is special (see
/// [`crate::tuners::tuners_utils`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Names matched exactly or as a dotted suffix. PEFT stores a set; order carries no meaning.
    List(Vec<String>),
    /// A regular expression matched against the whole dotted module name.
    Regex(String),
}

impl<S: Into<String>> FromIterator<S> for TargetModules {
    /// A list of names.
    fn from_iter<I: IntoIterator<Item = S>>(names: I) -> Self {
        TargetModules::List(names.into_iter().map(Into::into).collect())
    }
}

impl<S: Into<String>, const N: usize> From<[S; N]> for TargetModules {
    /// A list of names: `TargetModules::from(["q_proj", "v_proj"])`.
    fn from(names: [S; N]) -> Self {
        names.into_iter().collect()
    }
}

impl From<Vec<String>> for TargetModules {
    /// A list of names.
    fn from(names: Vec<String>) -> Self {
        TargetModules::List(names)
    }
}

impl From<&str> for TargetModules {
    /// One string: a regex matched with `re.fullmatch`, or `"all-linear"` (PEFT's string form).
    fn from(pattern: &str) -> Self {
        TargetModules::Regex(pattern.to_string())
    }
}

/// `layers_to_transform`: one layer index or several.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayersToTransform {
    /// One layer index.
    One(i64),
    /// Several layer indices.
    Many(Vec<i64>),
}

impl LayersToTransform {
    /// The indices as a slice-like vector.
    pub fn indices(&self) -> Vec<i64> {
        match self {
            LayersToTransform::One(i) => vec![*i],
            LayersToTransform::Many(v) => v.clone(),
        }
    }
}

/// A field that is one string or a list of strings (`layers_pattern`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum StrOrList {
    /// One string.
    One(String),
    /// Several strings.
    Many(Vec<String>),
}

impl StrOrList {
    /// The strings as a vector.
    pub fn items(&self) -> Vec<String> {
        match self {
            StrOrList::One(s) => vec![s.clone()],
            StrOrList::Many(v) => v.clone(),
        }
    }
}

/// The part of a tuner config that decides which modules the tuner wraps, borrowed from the config.
#[derive(Clone, Copy, Debug, Default)]
pub struct TargetSpec<'a> {
    /// `target_modules`.
    pub target_modules: Option<&'a TargetModules>,
    /// `exclude_modules`.
    pub exclude_modules: Option<&'a TargetModules>,
    /// `layers_to_transform`.
    pub layers_to_transform: Option<&'a LayersToTransform>,
    /// `layers_pattern`.
    pub layers_pattern: Option<&'a StrOrList>,
    /// `modules_to_save`: never targeted themselves.
    pub modules_to_save: Option<&'a [String]>,
}

/// The fields that choose the wrapped modules, shared by LoRA, AdaLoRA, LoHa, LoKr, OFT and BOFT (PEFT
/// repeats them in each config class) and flattened into those configs as their `targets` field: in
/// `adapter_config.json` they are top-level keys, as PEFT writes them. (IA3 has no `layers_*` and VeRA no
/// `exclude_modules` in PEFT 0.21.2, so those two keep their own fields.)
///
/// ```
/// use peft::config::{LoraConfig, TargetFields, TargetModules};
/// let c = LoraConfig { targets: TargetFields::modules(["q_proj", "v_proj"]), ..Default::default() };
/// assert_eq!(c.targets.target_modules, Some(TargetModules::from(["q_proj", "v_proj"])));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TargetFields {
    /// `target_modules`: the modules to wrap (default `null`: PEFT picks them by model architecture).
    pub target_modules: Option<TargetModules>,
    /// `exclude_modules`: modules never wrapped (default `null`).
    pub exclude_modules: Option<TargetModules>,
    /// `layers_to_transform`: only these layer indices are wrapped (default `null`).
    pub layers_to_transform: Option<LayersToTransform>,
    /// `layers_pattern`: the name of the layer list, used with `layers_to_transform` (default `null`).
    pub layers_pattern: Option<StrOrList>,
    /// `modules_to_save`: modules trained in full and saved with the adapter (default `null`).
    pub modules_to_save: Option<Vec<String>>,
}

impl TargetFields {
    /// Only `target_modules` set, to these names.
    pub fn modules<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        Self {
            target_modules: Some(TargetModules::from_iter(names)),
            ..Default::default()
        }
    }

    /// The fields as a borrowed [`TargetSpec`].
    pub fn spec(&self) -> TargetSpec<'_> {
        TargetSpec {
            target_modules: self.target_modules.as_ref(),
            exclude_modules: self.exclude_modules.as_ref(),
            layers_to_transform: self.layers_to_transform.as_ref(),
            layers_pattern: self.layers_pattern.as_ref(),
            modules_to_save: self.modules_to_save.as_deref(),
        }
    }
}

/// `rank_pattern` and `alpha_pattern`: per-module ranks and alphas, shared by LoRA, LoHa and LoKr and
/// flattened into those configs as their `patterns` field (top-level keys in `adapter_config.json`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RankAlphaPatterns {
    /// `rank_pattern`: per-module ranks, matched as by PEFT's `get_pattern_key` (default `{}`).
    #[serde(deserialize_with = "crate::config::helpers::null_as_default")]
    pub rank_pattern: IndexMap<String, usize>,
    /// `alpha_pattern`: per-module alphas, matched like `rank_pattern` (default `{}`).
    #[serde(
        deserialize_with = "crate::config::helpers::null_as_default",
        serialize_with = "crate::config::helpers::map_int_if_integral"
    )]
    pub alpha_pattern: IndexMap<String, f64>,
}

impl RankAlphaPatterns {
    /// The rank and alpha of the module named `module_name`: from the first matching key of `rank_pattern` /
    /// `alpha_pattern` (as PEFT's `get_pattern_key`), else `r` / `alpha`.
    pub fn rank_and_alpha_for(&self, module_name: &str, r: usize, alpha: f64) -> (usize, f64) {
        let r = crate::config::helpers::pattern_lookup(&self.rank_pattern, module_name)
            .copied()
            .unwrap_or(r);
        let alpha = crate::config::helpers::pattern_lookup(&self.alpha_pattern, module_name)
            .copied()
            .unwrap_or(alpha);
        (r, alpha)
    }
}

/// `bias` of OFT, BOFT and VeRA: which biases train and are saved with the adapter. PEFT accepts `"none"`,
/// `"all"` and any `"<something>_only"` (documented as `"oft_only"`, `"boft_only"`, `"vera_only"`), which means the
/// biases of the targeted layers only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum BiasMode {
    /// `"none"`: no bias trains.
    #[default]
    None,
    /// `"all"`: every bias of the model trains.
    All,
    /// `"<method>_only"`: the biases of the targeted layers train; holds the string as written.
    AdapterOnly(String),
}

impl BiasMode {
    /// The value as written in `adapter_config.json`.
    pub fn as_str(&self) -> &str {
        match self {
            BiasMode::None => "none",
            BiasMode::All => "all",
            BiasMode::AdapterOnly(s) => s,
        }
    }
}

impl Serialize for BiasMode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for BiasMode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.as_str() {
            "none" => Ok(BiasMode::None),
            "all" => Ok(BiasMode::All),
            _ if s.ends_with("_only") => Ok(BiasMode::AdapterOnly(s)),
            _ => Err(serde::de::Error::custom(format!(
                "unknown bias {s:?}: expected \"none\", \"all\" or \"<method>_only\""
            ))),
        }
    }
}
