//! `MissConfig`, field for field with PEFT 0.21.2's `tuners/miss/config.py`.

use crate::config::PeftConfigBase;
use crate::config::common::{BiasMode, TargetFields};
use crate::config::helpers;
use crate::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `init_weights` of MiSS: `true` (a zero block), `false` (a random block, for tests), `"bat"` or `"mini"`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MissInit {
    /// `true` or `false`.
    Bool(bool),
    /// `"bat"` or `"mini"`.
    Method(String),
}

impl Default for MissInit {
    fn default() -> Self {
        MissInit::Bool(true)
    }
}

/// The three forms of MiSS, from `init_weights`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MissMode {
    /// `true` / `false`: `miss_block` `[r, out]`, added to every block of `r` input columns.
    Miss {
        /// Start from zeros (`true`) or Kaiming-uniform draws (`false`).
        zero: bool,
    },
    /// `"bat"`: `miss_block` `[out/r, r, r]`, `ΔW_blk = W_blk·B + B`.
    Bat,
    /// `"mini"`: `miss_block` `[r, mini_r]`, tiled across the outputs.
    Mini,
}

/// An adapter's MiSS settings (`peft_type: "MISS"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MissConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `target_modules`, `exclude_modules`, `layers_to_transform`, `layers_pattern`, `modules_to_save`.
    #[serde(flatten)]
    pub targets: TargetFields,
    /// `r`: the block size (default 64).
    pub r: usize,
    /// `miss_dropout`: dropout on the adapter's input, in training (default 0).
    pub miss_dropout: f64,
    /// `mini_r`: the output width of the `"mini"` block (default 1).
    pub mini_r: usize,
    /// `init_weights` (default `true`).
    pub init_weights: MissInit,
    /// `bias` (default `"none"`): only `"none"` is supported.
    pub bias: BiasMode,
    /// Keys PEFT 0.21.2's `MissConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for MissConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            targets: TargetFields::default(),
            r: 64,
            miss_dropout: 0.0,
            mini_r: 1,
            init_weights: MissInit::default(),
            bias: BiasMode::None,
            extra: Map::new(),
        }
    }
}

impl MissConfig {
    /// The form `init_weights` selects; an unknown string is an error naming it.
    pub fn mode(&self) -> Result<MissMode> {
        match &self.init_weights {
            MissInit::Bool(b) => Ok(MissMode::Miss { zero: *b }),
            MissInit::Method(m) if m == "bat" => Ok(MissMode::Bat),
            MissInit::Method(m) if m == "mini" => Ok(MissMode::Mini),
            MissInit::Method(m) => Err(PeftError::InvalidConfig(format!(
                "MiSS: unknown init_weights {m:?} (true, false, \"bat\" or \"mini\")"
            ))),
        }
    }

    /// PEFT's checks (`layers_pattern` needs `layers_to_transform`, `r` ≥ 1), a known `init_weights`, and the
    /// features peft-rs does not implement: `bias` other than `"none"`.
    pub fn validate(&self) -> Result<()> {
        helpers::check_layers_pattern(
            self.targets.layers_to_transform.as_ref(),
            self.targets.layers_pattern.as_ref(),
        )?;
        self.mode()?;
        if self.r == 0 || self.mini_r == 0 {
            return Err(PeftError::InvalidConfig(
                "MiSS: `r` and `mini_r` must be positive integers".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.miss_dropout) {
            return Err(PeftError::InvalidConfig(format!(
                "MiSS: `miss_dropout` must be in [0, 1), got {}",
                self.miss_dropout
            )));
        }
        if self.bias != BiasMode::None {
            return Err(PeftError::Unsupported {
                field: "bias".into(),
                value: self.bias.as_str().into(),
                reason: "MiSS adapters train no biases in peft-rs (only \"none\")".into(),
            });
        }
        helpers::refuse_unknown_keys(&self.extra, "MissConfig")
    }
}
