//! `C3AConfig`, field for field with PEFT 0.21.2's `tuners/c3a/config.py`.

use crate::config::PeftConfigBase;
use crate::config::common::{BiasMode, LayersToTransform, StrOrList, TargetModules, TargetSpec};
use crate::config::helpers;
use crate::{PeftError, Result};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `init_weights` of C3A: `true` (zero kernels, the identity), `false` or `"xavier_uniform"` (the default),
/// `"gaussian"`, `"kaiming_uniform"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum C3aInit {
    /// `true` or `false`.
    Bool(bool),
    /// A named initialisation.
    Method(String),
}

impl Default for C3aInit {
    fn default() -> Self {
        C3aInit::Method("xavier_uniform".into())
    }
}

/// An adapter's C3A settings (`peft_type: "C3A"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct C3aConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `block_size`: the circulant blocks' size, dividing both dimensions of every target (default 256).
    pub block_size: usize,
    /// `target_modules` (default `null`: PEFT's LoRA table by model type).
    pub target_modules: Option<TargetModules>,
    /// `bias` (default `"none"`): only `"none"` is supported.
    pub bias: BiasMode,
    /// `modules_to_save` (default `null`).
    pub modules_to_save: Option<Vec<String>>,
    /// `layers_to_transform` (default `null`).
    pub layers_to_transform: Option<LayersToTransform>,
    /// `layers_pattern` (default `null`).
    pub layers_pattern: Option<StrOrList>,
    /// `block_size_pattern`: per-module block sizes (default `{}`), matched as PEFT does:
    /// `re.match(rf".*\.{key}$", name)`, else the module's own name as a key.
    #[serde(deserialize_with = "crate::config::helpers::null_as_default")]
    pub block_size_pattern: IndexMap<String, usize>,
    /// `init_weights` (default `"xavier_uniform"`).
    pub init_weights: C3aInit,
    /// Keys PEFT 0.21.2's `C3AConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for C3aConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            block_size: 256,
            target_modules: None,
            bias: BiasMode::None,
            modules_to_save: None,
            layers_to_transform: None,
            layers_pattern: None,
            block_size_pattern: IndexMap::new(),
            init_weights: C3aInit::default(),
            extra: Map::new(),
        }
    }
}

impl C3aConfig {
    /// Which modules the adapter wraps (C3A has no `exclude_modules`).
    pub fn target_spec(&self) -> TargetSpec<'_> {
        TargetSpec {
            target_modules: self.target_modules.as_ref(),
            exclude_modules: None,
            layers_to_transform: self.layers_to_transform.as_ref(),
            layers_pattern: self.layers_pattern.as_ref(),
            modules_to_save: self.modules_to_save.as_deref(),
        }
    }

    /// The block size of `module`: the first `block_size_pattern` key `k` for which Python's
    /// `re.match(rf".*\.{k}$", module)` succeeds, else `module` itself looked up, else `block_size`.
    pub fn block_size_for(&self, module: &str) -> Result<usize> {
        for (k, v) in &self.block_size_pattern {
            let pattern = format!(r"\A(?:.*\.{k}$)");
            let re = fancy_regex::Regex::new(&pattern).map_err(|e| {
                PeftError::InvalidConfig(format!(
                    "`block_size_pattern`: invalid regular expression {k:?}: {e}"
                ))
            })?;
            let hit = re.is_match(module).map_err(|e| {
                PeftError::InvalidConfig(format!(
                    "`block_size_pattern`: regex {k:?} failed on {module:?}: {e}"
                ))
            })?;
            if hit {
                return Ok(*v);
            }
        }
        Ok(self
            .block_size_pattern
            .get(module)
            .copied()
            .unwrap_or(self.block_size))
    }

    /// PEFT's checks (a regex `target_modules` excludes `layers_to_transform` and `layers_pattern`), a known
    /// `init_weights`, and the features peft-rs does not implement: `bias` other than `"none"`.
    pub fn validate(&self) -> Result<()> {
        if matches!(self.target_modules, Some(TargetModules::Regex(_))) {
            if self.layers_to_transform.is_some() {
                return Err(PeftError::InvalidConfig(
                    "C3A: `layers_to_transform` cannot be used when `target_modules` is a str.".into(),
                ));
            }
            if self.layers_pattern.is_some() {
                return Err(PeftError::InvalidConfig(
                    "C3A: `layers_pattern` cannot be used when `target_modules` is a str.".into(),
                ));
            }
        }
        if let C3aInit::Method(m) = &self.init_weights
            && !matches!(m.as_str(), "gaussian" | "xavier_uniform" | "kaiming_uniform")
        {
            return Err(PeftError::InvalidConfig(format!(
                "C3A: unknown init_weights {m:?} (true, false, \"gaussian\", \"kaiming_uniform\" or \
                 \"xavier_uniform\")"
            )));
        }
        if self.block_size == 0 || self.block_size_pattern.values().any(|&b| b == 0) {
            return Err(PeftError::InvalidConfig(
                "C3A: `block_size` should be a positive integer value but the value passed is 0".into(),
            ));
        }
        if self.bias != BiasMode::None {
            return Err(PeftError::Unsupported {
                field: "bias".into(),
                value: self.bias.as_str().into(),
                reason: "C3A adapters train no biases in peft-rs (only \"none\")".into(),
            });
        }
        helpers::refuse_unknown_keys(&self.extra, "C3AConfig")
    }
}
