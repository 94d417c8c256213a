//! `DeloraConfig`, field for field with PEFT 0.21.2's `tuners/delora/config.py`.

use crate::config::PeftConfigBase;
use crate::config::common::{BiasMode, TargetFields};
use crate::config::helpers::{self, int_if_integral, map_int_if_integral};
use crate::{PeftError, Result};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An adapter's DeLoRA settings (`peft_type: "DELORA"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeloraConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `target_modules`, `exclude_modules`, `layers_to_transform`, `layers_pattern`, `modules_to_save`.
    #[serde(flatten)]
    pub targets: TargetFields,
    /// `r`: the rank (default 8).
    pub r: usize,
    /// `delora_lambda`: the initial bound of the update's norm (default 15; an `int` in PEFT, written as an
    /// integer when integral).
    #[serde(serialize_with = "int_if_integral")]
    pub delora_lambda: f64,
    /// `module_dropout`: dropout on the adapter's input, in training (default 0).
    pub module_dropout: f64,
    /// `bias` (default `"none"`): only `"none"` is supported.
    pub bias: BiasMode,
    /// `init_weights` (default `true`): `B` starts at zero (the identity); `false`: Kaiming-uniform `B`, for
    /// tests.
    pub init_weights: bool,
    /// `rank_pattern`: per-module ranks, matched as PEFT's `get_pattern_key` (default `{}`).
    #[serde(deserialize_with = "crate::config::helpers::null_as_default")]
    pub rank_pattern: IndexMap<String, usize>,
    /// `lambda_pattern`: per-module `delora_lambda`, matched like `rank_pattern` (default `{}`).
    #[serde(
        deserialize_with = "crate::config::helpers::null_as_default",
        serialize_with = "map_int_if_integral"
    )]
    pub lambda_pattern: IndexMap<String, f64>,
    /// Keys PEFT 0.21.2's `DeloraConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for DeloraConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            targets: TargetFields::default(),
            r: 8,
            delora_lambda: 15.0,
            module_dropout: 0.0,
            bias: BiasMode::None,
            init_weights: true,
            rank_pattern: IndexMap::new(),
            lambda_pattern: IndexMap::new(),
            extra: Map::new(),
        }
    }
}

impl DeloraConfig {
    /// PEFT's checks (`layers_pattern` needs `layers_to_transform`, `r` ≥ 1) and the features peft-rs does
    /// not implement: `bias` other than `"none"`.
    pub fn validate(&self) -> Result<()> {
        helpers::check_layers_pattern(
            self.targets.layers_to_transform.as_ref(),
            self.targets.layers_pattern.as_ref(),
        )?;
        if self.r == 0 {
            return Err(PeftError::InvalidConfig(
                "DeLoRA: `r` must be a positive integer; got 0".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.module_dropout) {
            return Err(PeftError::InvalidConfig(format!(
                "DeLoRA: `module_dropout` must be in [0, 1), got {}",
                self.module_dropout
            )));
        }
        if self.bias != BiasMode::None {
            return Err(PeftError::Unsupported {
                field: "bias".into(),
                value: self.bias.as_str().into(),
                reason: "DeLoRA adapters train no biases in peft-rs (only \"none\")".into(),
            });
        }
        helpers::refuse_unknown_keys(&self.extra, "DeloraConfig")
    }

    /// The rank and `delora_lambda` of `module` (PEFT's `get_pattern_key` over the patterns).
    pub fn rank_and_lambda(&self, module: &str) -> Result<(usize, f64)> {
        let rk = crate::tuners::tuners_utils::get_pattern_key(
            self.rank_pattern.keys().map(String::as_str),
            module,
        )?;
        let lk = crate::tuners::tuners_utils::get_pattern_key(
            self.lambda_pattern.keys().map(String::as_str),
            module,
        )?;
        Ok((
            rk.and_then(|k| self.rank_pattern.get(k)).copied().unwrap_or(self.r),
            lk.and_then(|k| self.lambda_pattern.get(k))
                .copied()
                .unwrap_or(self.delora_lambda),
        ))
    }
}
