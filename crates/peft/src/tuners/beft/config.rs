//! `BeftConfig`, field for field with PEFT 0.21.2's `tuners/beft/config.py`.

use crate::config::PeftConfigBase;
use crate::config::common::{TargetModules, TargetSpec};
use crate::config::helpers;
use crate::Result;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An adapter's BEFT settings (`peft_type: "BEFT"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BeftConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `target_modules` (default `null`: PEFT's BEFT table by model type, `v_proj` for Llama).
    pub target_modules: Option<TargetModules>,
    /// `modules_to_save` (default `null`).
    pub modules_to_save: Option<Vec<String>>,
    /// `init_weights` (default `true`): the bias starts at zero, the identity (`false`: N(0, 1), for tests).
    pub init_weights: bool,
    /// Keys PEFT 0.21.2's `BeftConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for BeftConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            target_modules: None,
            modules_to_save: None,
            init_weights: true,
            extra: Map::new(),
        }
    }
}

impl BeftConfig {
    /// Which modules the adapter wraps (BEFT has no `exclude_modules` nor `layers_to_transform`).
    pub fn target_spec(&self) -> TargetSpec<'_> {
        TargetSpec {
            target_modules: self.target_modules.as_ref(),
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            modules_to_save: self.modules_to_save.as_deref(),
        }
    }

    /// PEFT checks nothing more; unknown keys are refused when set.
    pub fn validate(&self) -> Result<()> {
        helpers::refuse_unknown_keys(&self.extra, "BeftConfig")
    }
}
