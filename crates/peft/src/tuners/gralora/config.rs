//! `GraloraConfig`, field for field with PEFT 0.21.2's `tuners/gralora/config.py`.

use crate::config::PeftConfigBase;
use crate::config::common::{BiasMode, LayersToTransform, StrOrList, TargetModules, TargetSpec};
use crate::config::helpers::{self, int_if_integral};
use crate::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An adapter's GraLoRA settings (`peft_type: "GRALORA"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GraloraConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `r`: the rank of each block row's factors, split into `gralora_k` chunks (default 32).
    pub r: usize,
    /// `hybrid_r`: the rank of an additional plain LoRA (default 0: none).
    pub hybrid_r: usize,
    /// `target_modules` (default `null`: PEFT's LoRA table by model type).
    pub target_modules: Option<TargetModules>,
    /// `alpha`: the scale is `alpha / (r + hybrid_r)` (default 64; an `int` in PEFT).
    #[serde(serialize_with = "int_if_integral")]
    pub alpha: f64,
    /// `gralora_dropout`: dropout on the adapter's input, in training (default 0).
    pub gralora_dropout: f64,
    /// `gralora_k`: the number of blocks along each dimension (default 2).
    pub gralora_k: usize,
    /// `fan_in_fan_out` (default `false`): only `false` (Linear layers).
    pub fan_in_fan_out: bool,
    /// `bias` (default `"none"`): only `"none"` is supported.
    pub bias: BiasMode,
    /// `modules_to_save` (default `null`).
    pub modules_to_save: Option<Vec<String>>,
    /// `init_weights` (default `true`): `B` starts at zero; `false`: Kaiming-uniform `B`, for tests.
    pub init_weights: bool,
    /// `layers_to_transform` (default `null`).
    pub layers_to_transform: Option<LayersToTransform>,
    /// `layers_pattern` (default `null`).
    pub layers_pattern: Option<StrOrList>,
    /// Keys PEFT 0.21.2's `GraloraConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for GraloraConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            r: 32,
            hybrid_r: 0,
            target_modules: None,
            alpha: 64.0,
            gralora_dropout: 0.0,
            gralora_k: 2,
            fan_in_fan_out: false,
            bias: BiasMode::None,
            modules_to_save: None,
            init_weights: true,
            layers_to_transform: None,
            layers_pattern: None,
            extra: Map::new(),
        }
    }
}

impl GraloraConfig {
    /// Which modules the adapter wraps (GraLoRA has no `exclude_modules`).
    pub fn target_spec(&self) -> TargetSpec<'_> {
        TargetSpec {
            target_modules: self.target_modules.as_ref(),
            exclude_modules: None,
            layers_to_transform: self.layers_to_transform.as_ref(),
            layers_pattern: self.layers_pattern.as_ref(),
            modules_to_save: self.modules_to_save.as_deref(),
        }
    }

    /// PEFT's checks (`gralora_k` ≥ 1 dividing `r`, `r` ≥ 1) and the features peft-rs does not implement:
    /// `bias` other than `"none"`, `fan_in_fan_out`.
    pub fn validate(&self) -> Result<()> {
        helpers::check_layers_pattern(
            self.layers_to_transform.as_ref(),
            self.layers_pattern.as_ref(),
        )?;
        if self.gralora_k == 0 {
            return Err(PeftError::InvalidConfig(
                "GraLoRA: gralora_k should be a positive integer, but got 0".into(),
            ));
        }
        if self.r == 0 || !self.r.is_multiple_of(self.gralora_k) {
            return Err(PeftError::InvalidConfig(format!(
                "GraLoRA: r should be positive and divisible by gralora_k, but got {} and {}",
                self.r, self.gralora_k
            )));
        }
        if !(0.0..1.0).contains(&self.gralora_dropout) {
            return Err(PeftError::InvalidConfig(format!(
                "GraLoRA: `gralora_dropout` must be in [0, 1), got {}",
                self.gralora_dropout
            )));
        }
        if self.fan_in_fan_out {
            return Err(PeftError::Unsupported {
                field: "fan_in_fan_out".into(),
                value: "true".into(),
                reason: "GraLoRA wraps Linear layers only in peft-rs (no GPT-2 Conv1D)".into(),
            });
        }
        if self.bias != BiasMode::None {
            return Err(PeftError::Unsupported {
                field: "bias".into(),
                value: self.bias.as_str().into(),
                reason: "GraLoRA adapters train no biases in peft-rs (only \"none\")".into(),
            });
        }
        helpers::refuse_unknown_keys(&self.extra, "GraloraConfig")
    }
}
