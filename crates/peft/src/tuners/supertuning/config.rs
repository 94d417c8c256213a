//! `SupertuningConfig`, field for field with PEFT 0.21.2's `tuners/supertuning/config.py`.

use crate::config::PeftConfigBase;
use crate::config::common::{TargetModules, TargetSpec};
use crate::config::helpers;
use crate::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An adapter's SuperTuning settings (`peft_type: "SUPERTUNING"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SupertuningConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `target_modules` (default `null`: PEFT's LoRA table by model type).
    pub target_modules: Option<TargetModules>,
    /// `modules_to_save` (default `null`).
    pub modules_to_save: Option<Vec<String>>,
    /// `sparsity` (default 0.99): the fraction of weight entries left frozen; `int(numel·(1 − sparsity))`
    /// entries train.
    pub sparsity: f64,
    /// `select_top` (default `true`): train the entries of largest magnitude (`false`: smallest).
    pub select_top: bool,
    /// `r` (default `null`): the rank of the optional LoRA ("Supra" mode).
    pub r: Option<usize>,
    /// `lora_alpha` (default `null`; required with `r`): the LoRA scale is `lora_alpha / r`.
    pub lora_alpha: Option<Value>,
    /// `lora_dropout` (default 0): dropout on the LoRA's input, in training.
    pub lora_dropout: f64,
    /// `init_weights` (default `true`): zero values and LoRA `B`, the identity (`false`: N(0, 1) values and a
    /// Kaiming-uniform `B`, for tests).
    pub init_weights: bool,
    /// `save_precomputed_indices` (default `true`): the indices are saved (`supertuning_indices`, int32);
    /// `false`: recomputed from the base weight's magnitudes at load time.
    pub save_precomputed_indices: bool,
    /// Keys PEFT 0.21.2's `SupertuningConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for SupertuningConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            target_modules: None,
            modules_to_save: None,
            sparsity: 0.99,
            select_top: true,
            r: None,
            lora_alpha: None,
            lora_dropout: 0.0,
            init_weights: true,
            save_precomputed_indices: true,
            extra: Map::new(),
        }
    }
}

impl SupertuningConfig {
    /// Which modules the adapter wraps (no `exclude_modules` nor `layers_to_transform` in PEFT's config).
    pub fn target_spec(&self) -> TargetSpec<'_> {
        TargetSpec {
            target_modules: self.target_modules.as_ref(),
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            modules_to_save: self.modules_to_save.as_deref(),
        }
    }

    /// `lora_alpha` as a number (`None` when null).
    pub fn alpha(&self) -> Result<Option<f64>> {
        match &self.lora_alpha {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                PeftError::InvalidConfig(format!("SuperTuning: lora_alpha must be a number, got {v}"))
            }),
        }
    }

    /// PEFT's checks in `__post_init__`.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.sparsity) {
            return Err(PeftError::InvalidConfig(format!(
                "SuperTuning: sparsity must be in [0.0, 1.0), got {}",
                self.sparsity
            )));
        }
        match (self.r, self.alpha()?) {
            (Some(0), _) => {
                return Err(PeftError::InvalidConfig(
                    "SuperTuning: r must be a positive integer or None, got 0".into(),
                ));
            }
            (Some(_), None) => {
                return Err(PeftError::InvalidConfig(
                    "SuperTuning: r is set but lora_alpha is None — Supra mode requires lora_alpha.".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(PeftError::InvalidConfig(
                    "SuperTuning: lora_alpha is set but r is None — Supra mode requires an explicit r.".into(),
                ));
            }
            _ => {}
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(PeftError::InvalidConfig(format!(
                "SuperTuning: lora_dropout must be in [0.0, 1.0), got {}",
                self.lora_dropout
            )));
        }
        helpers::refuse_unknown_keys(&self.extra, "SupertuningConfig")
    }

    /// How many entries of a weight of `numel` elements train: Python's `int(numel * (1 - sparsity))`.
    pub fn num_trainable(&self, numel: usize) -> usize {
        (numel as f64 * (1.0 - self.sparsity)).floor() as usize
    }
}
