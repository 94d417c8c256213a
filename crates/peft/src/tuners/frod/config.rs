//! `FrodConfig`, field for field with PEFT 0.21.2's `tuners/frod/config.py`.

use crate::config::PeftConfigBase;
use crate::config::common::{BiasMode, LayersToTransform, StrOrList, TargetModules, TargetSpec};
use crate::config::helpers;
use crate::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An adapter's FRoD settings (`peft_type: "FROD"`).
///
/// ```
/// use peft::PeftConfig;
/// let c = PeftConfig::from_json_str(r#"{"peft_type": "FROD", "target_modules": ["q_proj"]}"#)?;
/// c.validate()?;
/// let PeftConfig::Frod(f) = &c else { unreachable!() };
/// assert_eq!((f.sparse_rate, f.projection_prng_key, f.save_projection), (0.01, 0, true));
/// # Ok::<(), peft::PeftError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FrodConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `target_modules` (default `null`: PEFT's VeRA table by model type).
    pub target_modules: Option<TargetModules>,
    /// `projection_prng_key` (default 0): the seed of torch's generator that draws the positions of every
    /// category's sparse `S`.
    pub projection_prng_key: i64,
    /// `save_projection` (default `true`): the file holds each category's basis `V` and the positions of `S`.
    /// `false` is refused: PEFT then recomputes `V` from the base weights by QR, inverses and a symmetric
    /// eigendecomposition, whose eigenvector signs (LAPACK's) the outputs depend on.
    pub save_projection: bool,
    /// `frod_dropout`: dropout on the adapter's input, in training (default 0).
    pub frod_dropout: f64,
    /// `fan_in_fan_out` (default `false`): a GPT-2 Conv1D weight `[in, out]`.
    pub fan_in_fan_out: bool,
    /// `bias` (default `"none"`): only `"none"` is supported.
    pub bias: BiasMode,
    /// `modules_to_save` (default `null`).
    pub modules_to_save: Option<Vec<String>>,
    /// `init_weights` (default `true`): `S` zero, the identity; `false`: `S ~ N(0, 0.1²)` and `λ` moved by
    /// `N(0, 0.1²)`.
    pub init_weights: bool,
    /// `layers_to_transform` (default `null`).
    pub layers_to_transform: Option<LayersToTransform>,
    /// `layers_pattern` (default `null`).
    pub layers_pattern: Option<StrOrList>,
    /// `sparse_rate` (default 0.01): the fraction of `S`'s `in²` entries trained (off its diagonal).
    pub sparse_rate: f64,
    /// `regularization_alpha` (default 1e-3): the ridge term of the shared basis's construction.
    pub regularization_alpha: f64,
    /// `progressbar` (default `true`): PEFT's progress bar while it builds the bases (no effect here).
    pub progressbar: bool,
    /// `runtime_offload_base_weight` (default `false`): `true` is refused (device placement of PEFT's GPU
    /// path).
    pub runtime_offload_base_weight: bool,
    /// Keys PEFT 0.21.2's `FrodConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for FrodConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            target_modules: None,
            projection_prng_key: 0,
            save_projection: true,
            frod_dropout: 0.0,
            fan_in_fan_out: false,
            bias: BiasMode::None,
            modules_to_save: None,
            init_weights: true,
            layers_to_transform: None,
            layers_pattern: None,
            sparse_rate: 0.01,
            regularization_alpha: 1e-3,
            progressbar: true,
            runtime_offload_base_weight: false,
            extra: Map::new(),
        }
    }
}

impl FrodConfig {
    /// Which modules the adapter wraps (no `exclude_modules` in PEFT's config).
    pub fn target_spec(&self) -> TargetSpec<'_> {
        TargetSpec {
            target_modules: self.target_modules.as_ref(),
            exclude_modules: None,
            layers_to_transform: self.layers_to_transform.as_ref(),
            layers_pattern: self.layers_pattern.as_ref(),
            modules_to_save: self.modules_to_save.as_deref(),
        }
    }

    /// PEFT's checks ([`PeftError::InvalidConfig`]): `layers_pattern` needs `layers_to_transform`,
    /// `sparse_rate` in `[0, 1]`; `frod_dropout` in `[0, 1]` and `regularization_alpha` finite. Refused as
    /// not implemented ([`PeftError::Unsupported`]): `save_projection: false`, `bias` other than `"none"`,
    /// `runtime_offload_base_weight: true`.
    pub fn validate(&self) -> Result<()> {
        helpers::check_layers_pattern(
            self.layers_to_transform.as_ref(),
            self.layers_pattern.as_ref(),
        )?;
        if !(0.0..=1.0).contains(&self.sparse_rate) {
            return Err(PeftError::InvalidConfig(format!(
                "FRoD: `sparse_rate` should be between 0 and 1, got {}.",
                self.sparse_rate
            )));
        }
        if !self.regularization_alpha.is_finite() {
            return Err(PeftError::InvalidConfig(format!(
                "FRoD: `regularization_alpha` must be finite, got {}",
                self.regularization_alpha
            )));
        }
        helpers::check_probability("frod_dropout", self.frod_dropout)?;
        helpers::refuse_flag(
            "save_projection",
            !self.save_projection,
            "PEFT then recomputes each category's basis V from the base weights (QR, inverses and a symmetric \
             eigendecomposition) and the outputs depend on LAPACK's eigenvector signs, which peft-rs does not \
             reproduce; save FRoD adapters with save_projection true (PEFT's default)",
        )?;
        helpers::refuse_flag(
            "runtime_offload_base_weight",
            self.runtime_offload_base_weight,
            "it moves PEFT's base weights between GPU and CPU; peft-rs keeps the base where it is loaded",
        )?;
        if self.bias != BiasMode::None {
            return Err(PeftError::Unsupported {
                field: "bias".into(),
                value: self.bias.as_str().into(),
                reason: "FRoD adapters train no biases in peft-rs (only \"none\")".into(),
            });
        }
        helpers::refuse_unknown_keys(&self.extra, "FrodConfig")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PeftConfig;

    /// `FrodConfig(target_modules=["lin0", "lin1"], sparse_rate=0.05)` saved by PEFT 0.21.2 (`auto_mapping`
    /// null).
    const PEFT_JSON: &str = r#"{
  "auto_mapping": null,
  "base_model_name_or_path": null,
  "bias": "none",
  "fan_in_fan_out": false,
  "frod_dropout": 0.0,
  "inference_mode": true,
  "init_weights": true,
  "layers_pattern": null,
  "layers_to_transform": null,
  "modules_to_save": null,
  "peft_type": "FROD",
  "peft_version": "0.21.2",
  "progressbar": true,
  "projection_prng_key": 0,
  "regularization_alpha": 0.001,
  "revision": null,
  "runtime_offload_base_weight": false,
  "save_projection": true,
  "sparse_rate": 0.05,
  "target_modules": [
    "lin1",
    "lin0"
  ],
  "task_type": null
}"#;

    #[test]
    fn peft_file_round_trips_byte_for_byte() {
        let cfg = PeftConfig::from_json_str(PEFT_JSON).expect("parses");
        cfg.validate().expect("supported");
        assert_eq!(cfg.to_json_string(), PEFT_JSON);
    }

    #[test]
    fn defaults_and_checks() {
        let c: FrodConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, FrodConfig::default());
        c.validate().unwrap();
        for bad in [
            r#"{"peft_type": "FROD", "sparse_rate": 1.5}"#,
            r#"{"peft_type": "FROD", "sparse_rate": -0.1}"#,
            r#"{"peft_type": "FROD", "frod_dropout": 2}"#,
            r#"{"peft_type": "FROD", "layers_pattern": "layers"}"#,
        ] {
            let e = PeftConfig::from_json_str(bad).unwrap().validate().unwrap_err();
            assert!(matches!(&e, PeftError::InvalidConfig(_)), "{bad}: {e}");
        }
        for (bad, field) in [
            (r#"{"peft_type": "FROD", "save_projection": false}"#, "save_projection"),
            (
                r#"{"peft_type": "FROD", "runtime_offload_base_weight": true}"#,
                "runtime_offload_base_weight",
            ),
            (r#"{"peft_type": "FROD", "bias": "all"}"#, "bias"),
            (r#"{"peft_type": "FROD", "use_dora": true}"#, "use_dora"),
        ] {
            let e = PeftConfig::from_json_str(bad).unwrap().validate().unwrap_err();
            assert!(
                matches!(&e, PeftError::Unsupported { field: f, .. } if f == field),
                "{bad}: {e}"
            );
        }
    }
}
