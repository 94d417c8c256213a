//! `HRAConfig`, field for field with PEFT 0.21.2's `tuners/hra/config.py`.

use crate::config::PeftConfigBase;
use crate::config::common::{BiasMode, TargetFields};
use crate::config::helpers;
use crate::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An adapter's HRA settings (`peft_type: "HRA"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HraConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `target_modules`, `exclude_modules`, `layers_to_transform`, `layers_pattern`, `modules_to_save`.
    #[serde(flatten)]
    pub targets: TargetFields,
    /// `r`: the number of Householder reflections (default 8).
    pub r: usize,
    /// `apply_GS`: orthonormalise the reflection vectors (Gram–Schmidt) and use `H = I − 2UUᵀ` (default
    /// `false`).
    #[serde(rename = "apply_GS")]
    pub apply_gs: bool,
    /// `init_weights`: start from the identity, with the vectors in equal pairs (default `true`; `false`:
    /// random vectors, for tests).
    pub init_weights: bool,
    /// `bias` (default `"none"`): only `"none"` is supported.
    pub bias: BiasMode,
    /// Keys PEFT 0.21.2's `HRAConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for HraConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            targets: TargetFields::default(),
            r: 8,
            apply_gs: false,
            init_weights: true,
            bias: BiasMode::None,
            extra: Map::new(),
        }
    }
}

impl HraConfig {
    /// PEFT's checks (`layers_pattern` needs `layers_to_transform`, `r` ≥ 1) and the features peft-rs does not
    /// implement: `bias` other than `"none"`.
    pub fn validate(&self) -> Result<()> {
        helpers::check_layers_pattern(
            self.targets.layers_to_transform.as_ref(),
            self.targets.layers_pattern.as_ref(),
        )?;
        if self.r == 0 {
            return Err(PeftError::InvalidConfig(
                "HRA: `r` should be a positive integer value but the value passed is 0".into(),
            ));
        }
        if self.bias != BiasMode::None {
            return Err(PeftError::Unsupported {
                field: "bias".into(),
                value: self.bias.as_str().into(),
                reason: "HRA adapters train no biases in peft-rs (only \"none\")".into(),
            });
        }
        helpers::refuse_unknown_keys(&self.extra, "HRAConfig")
    }
}
