//! `PeanutConfig`, field for field with PEFT 0.21.2's `tuners/peanut/config.py`.

use super::activation::Activation;
use crate::config::PeftConfigBase;
use crate::config::common::TargetFields;
use crate::config::helpers;
use crate::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An adapter's PEANuT settings (`peft_type: "PEANUT"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PeanutConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `target_modules`, `exclude_modules`, `layers_to_transform`, `layers_pattern`, `modules_to_save`.
    #[serde(flatten)]
    pub targets: TargetFields,
    /// `r`: the hidden width of the adapter network (default 32).
    pub r: usize,
    /// `depth`: the number of encoder (and of decoder) layers (default 0).
    pub depth: usize,
    /// `act_fn`: the activation, a key of transformers' `ACT2FN` (default `"relu"`).
    pub act_fn: String,
    /// `scaling`: the multiplier of the update (default 1.0).
    pub scaling: f64,
    /// `init_weights` (default `true`): `B` starts at zero, the identity (`false`: Kaiming-uniform, for tests).
    pub init_weights: bool,
    /// Keys PEFT 0.21.2's `PeanutConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for PeanutConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            targets: TargetFields::default(),
            r: 32,
            depth: 0,
            act_fn: "relu".into(),
            scaling: 1.0,
            init_weights: true,
            extra: Map::new(),
        }
    }
}

impl PeanutConfig {
    /// PEFT's checks: `layers_pattern` needs `layers_to_transform`, `r` ≥ 1, a known `act_fn`.
    pub fn validate(&self) -> Result<()> {
        helpers::check_layers_pattern(
            self.targets.layers_to_transform.as_ref(),
            self.targets.layers_pattern.as_ref(),
        )?;
        if self.r == 0 {
            return Err(PeftError::InvalidConfig(
                "PEANuT: `r` must be a positive integer.".into(),
            ));
        }
        self.activation()?;
        helpers::refuse_unknown_keys(&self.extra, "PeanutConfig")
    }

    /// The activation named by `act_fn`.
    pub fn activation(&self) -> Result<Activation> {
        Activation::parse(&self.act_fn, "act_fn")
    }
}
