//! `VeraConfig`, field for field with PEFT 0.21.2's `tuners/vera/config.py`.

use crate::config::PeftConfigBase;
use crate::config::common::{BiasMode, LayersToTransform, StrOrList, TargetModules, TargetSpec};
use crate::config::helpers;
use crate::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An adapter's VeRA settings (`peft_type: "VERA"`). VeRA has no `exclude_modules` in PEFT 0.21.2.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VeraConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `r`: the width of the shared projections (default 256).
    pub r: usize,
    /// `target_modules` (default `null`).
    pub target_modules: Option<TargetModules>,
    /// `projection_prng_key`: the seed of the shared projections when they are not saved (default 0; PEFT
    /// uses its low 32 bits).
    pub projection_prng_key: i64,
    /// `save_projection`: `vera_A` / `vera_B` are in the adapter file (default `true`); otherwise they are
    /// regenerated from `projection_prng_key` with torch's CPU generator.
    pub save_projection: bool,
    /// `vera_dropout` (default 0.0).
    pub vera_dropout: f64,
    /// `d_initial`: the initial value of `vera_lambda_d` (default 0.1).
    pub d_initial: f64,
    /// `fan_in_fan_out` (default `false`).
    pub fan_in_fan_out: bool,
    /// `bias` (default `"none"`; `"vera_only"` trains the targeted layers' biases).
    pub bias: BiasMode,
    /// `modules_to_save` (default `null`).
    pub modules_to_save: Option<Vec<String>>,
    /// `init_weights` (default `true`).
    pub init_weights: bool,
    /// `layers_to_transform` (default `null`).
    pub layers_to_transform: Option<LayersToTransform>,
    /// `layers_pattern` (default `null`).
    pub layers_pattern: Option<StrOrList>,
    /// Keys PEFT 0.21.2's `VeraConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for VeraConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            r: 256,
            target_modules: None,
            projection_prng_key: 0,
            save_projection: true,
            vera_dropout: 0.0,
            d_initial: 0.1,
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

impl VeraConfig {
    /// Which modules the adapter wraps.
    pub fn target_spec(&self) -> TargetSpec<'_> {
        TargetSpec {
            target_modules: self.target_modules.as_ref(),
            exclude_modules: None,
            layers_to_transform: self.layers_to_transform.as_ref(),
            layers_pattern: self.layers_pattern.as_ref(),
            modules_to_save: self.modules_to_save.as_deref(),
        }
    }

    /// PEFT's checks ([`PeftError::InvalidConfig`]): `r > 0`, `vera_dropout` at most 1, `layers_pattern` only
    /// with `layers_to_transform`. Nothing of VeRA is refused (`save_projection: false` included).
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(PeftError::InvalidConfig(
                "`r` should be a positive integer value but the value passed is 0".into(),
            ));
        }
        helpers::check_probability("vera_dropout", self.vera_dropout)?;
        helpers::check_layers_pattern(
            self.layers_to_transform.as_ref(),
            self.layers_pattern.as_ref(),
        )?;
        helpers::refuse_unknown_keys(&self.extra, "VeraConfig")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PeftConfig;

    /// `VeraConfig(target_modules=["q_proj"], r=128)` saved by PEFT 0.21.2.
    const PEFT_JSON: &str = r#"{
  "auto_mapping": null,
  "base_model_name_or_path": null,
  "bias": "none",
  "d_initial": 0.1,
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_weights": true,
  "layers_pattern": null,
  "layers_to_transform": null,
  "modules_to_save": null,
  "peft_type": "VERA",
  "peft_version": "0.21.2",
  "projection_prng_key": 0,
  "r": 128,
  "revision": null,
  "save_projection": true,
  "target_modules": [
    "q_proj"
  ],
  "task_type": null,
  "vera_dropout": 0.0
}"#;

    #[test]
    fn peft_file_round_trips_byte_for_byte() {
        let cfg = PeftConfig::from_json_str(PEFT_JSON).expect("parses");
        cfg.validate().expect("supported");
        assert_eq!(cfg.to_json_string(), PEFT_JSON);
        let PeftConfig::Vera(c) = &cfg else {
            panic!("not VeRA")
        };
        assert_eq!((c.r, c.d_initial, c.save_projection), (128, 0.1, true));
        assert!(cfg.target_spec().expect("spec").exclude_modules.is_none());
    }

    #[test]
    fn defaults_and_checks() {
        let cfg = PeftConfig::from_json_str(r#"{"peft_type": "VERA", "save_projection": false}"#)
            .expect("parses");
        cfg.validate().expect("supported");
        let PeftConfig::Vera(c) = &cfg else { panic!() };
        assert_eq!((c.r, c.projection_prng_key, c.d_initial), (256, 0, 0.1));
        // `exclude_modules` is not a VeRA field: kept as unknown, refused when set.
        let cfg =
            PeftConfig::from_json_str(r#"{"peft_type": "VERA", "exclude_modules": ["lm_head"]}"#)
                .expect("parses");
        assert_eq!(cfg.unknown_keys(), ["exclude_modules"]);
        assert!(
            matches!(cfg.validate(), Err(PeftError::Unsupported { field, .. }) if field == "exclude_modules")
        );
        let e = PeftConfig::from_json_str(r#"{"peft_type": "VERA", "r": 0}"#)
            .expect("parses")
            .validate();
        assert!(matches!(e, Err(PeftError::InvalidConfig(_))));
    }
}
