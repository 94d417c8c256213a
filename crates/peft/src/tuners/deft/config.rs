//! `DeftConfig`, field for field with PEFT 0.21.2's `tuners/deft/config.py`.

use crate::config::PeftConfigBase;
use crate::config::common::{BiasMode, LayersToTransform, StrOrList, TargetModules, TargetSpec};
use crate::config::helpers;
use crate::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `decomposition_method`: how the projector `P_proj` is derived from `P`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeftDecomposition {
    /// `"relu"` (the default): `Q_P = P`, `P_proj = P·relu(P)ᵀ` (not orthogonal).
    #[default]
    Relu,
    /// `"qr"`: `Q_P` the orthonormal factor of `P`'s reduced QR (LAPACK's signs), `P_proj = Q_P·Q_Pᵀ`.
    Qr,
}

/// An adapter's DEFT settings (`peft_type: "DEFT"`).
///
/// ```
/// use peft::PeftConfig;
/// let c = PeftConfig::from_json_str(r#"{"peft_type": "DEFT", "r": 4, "decomposition_method": "qr"}"#)?;
/// c.validate()?;
/// assert!(PeftConfig::from_json_str(r#"{"peft_type": "DEFT", "decomposition_method": "svd"}"#).is_err());
/// # Ok::<(), peft::PeftError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeftConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `r`: the rank of the projection / injection (default 8), capped per layer at `out_features`.
    pub r: usize,
    /// `target_modules` (default `null`: PEFT's LoRA table by model type).
    pub target_modules: Option<TargetModules>,
    /// `exclude_modules` (default `null`).
    pub exclude_modules: Option<TargetModules>,
    /// `decomposition_method` (default `"relu"`).
    pub decomposition_method: DeftDecomposition,
    /// `init_scale`: the std of a random `R` is `0.02 · init_scale` (with `init_weights: false`; default 1).
    pub init_scale: f64,
    /// `alpha`: the injection is scaled by `alpha / r` (default `null`: by 1; 0 also means 1, as PEFT's
    /// truthiness test).
    pub alpha: Option<f64>,
    /// `para` (default `false`): PaRa, the subspace removal only (no `R`).
    pub para: bool,
    /// `fan_in_fan_out` (default `false`): set by PEFT from the layer kind (GPT-2 Conv1D) and saved.
    pub fan_in_fan_out: bool,
    /// `deft_dropout`: dropout on the injection's input, in training (default 0).
    pub deft_dropout: f64,
    /// `init_weights` (default `true`): `R = rightᵀ·W / s`, so that the update is zero; `false`: random `R`.
    pub init_weights: bool,
    /// `layers_to_transform` (default `null`).
    pub layers_to_transform: Option<LayersToTransform>,
    /// `layers_pattern` (default `null`).
    pub layers_pattern: Option<StrOrList>,
    /// `bias` (default `"none"`): only `"none"` is supported.
    pub bias: BiasMode,
    /// `modules_to_save` (default `null`).
    pub modules_to_save: Option<Vec<String>>,
    /// Keys PEFT 0.21.2's `DeftConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for DeftConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            r: 8,
            target_modules: None,
            exclude_modules: None,
            decomposition_method: DeftDecomposition::Relu,
            init_scale: 1.0,
            alpha: None,
            para: false,
            fan_in_fan_out: false,
            deft_dropout: 0.0,
            init_weights: true,
            layers_to_transform: None,
            layers_pattern: None,
            bias: BiasMode::None,
            modules_to_save: None,
            extra: Map::new(),
        }
    }
}

impl DeftConfig {
    /// Which modules the adapter wraps.
    pub fn target_spec(&self) -> TargetSpec<'_> {
        TargetSpec {
            target_modules: self.target_modules.as_ref(),
            exclude_modules: self.exclude_modules.as_ref(),
            layers_to_transform: self.layers_to_transform.as_ref(),
            layers_pattern: self.layers_pattern.as_ref(),
            modules_to_save: self.modules_to_save.as_deref(),
        }
    }

    /// The injection's scale for a layer of (capped) rank `r`: `alpha / r`, or 1 without an alpha.
    pub fn scaling(&self, r: usize) -> f64 {
        match self.alpha {
            Some(a) if a != 0.0 => a / r as f64,
            _ => 1.0,
        }
    }

    /// PEFT's checks (a regex `target_modules` takes no layer selection, `layers_pattern` needs
    /// `layers_to_transform`, `r` ≥ 1) and the features peft-rs does not implement: `bias` other than
    /// `"none"`.
    pub fn validate(&self) -> Result<()> {
        if matches!(self.target_modules, Some(TargetModules::Regex(_))) {
            if self.layers_to_transform.is_some() {
                return Err(PeftError::InvalidConfig(
                    "`layers_to_transform` cannot be used when `target_modules` is a str.".into(),
                ));
            }
            if self.layers_pattern.is_some() {
                return Err(PeftError::InvalidConfig(
                    "`layers_pattern` cannot be used when `target_modules` is a str.".into(),
                ));
            }
        }
        helpers::check_layers_pattern(
            self.layers_to_transform.as_ref(),
            self.layers_pattern.as_ref(),
        )?;
        if self.r == 0 {
            return Err(PeftError::InvalidConfig(
                "`r` should be a positive integer value but the value passed is 0".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.deft_dropout) {
            return Err(PeftError::InvalidConfig(format!(
                "DEFT: `deft_dropout` must be in [0, 1), got {}",
                self.deft_dropout
            )));
        }
        if self.bias != BiasMode::None {
            return Err(PeftError::Unsupported {
                field: "bias".into(),
                value: self.bias.as_str().into(),
                reason: "DEFT adapters train no biases in peft-rs (only \"none\")".into(),
            });
        }
        helpers::refuse_unknown_keys(&self.extra, "DeftConfig")
    }
}
