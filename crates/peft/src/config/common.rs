//! Config field types shared by several methods.

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
