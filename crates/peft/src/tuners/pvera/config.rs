//! `PveraConfig`, field for field with PEFT 0.21.2's `tuners/pvera/config.py`.

use crate::config::PeftConfigBase;
use crate::config::common::{BiasMode, LayersToTransform, StrOrList, TargetModules, TargetSpec};
use crate::config::helpers;
use crate::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An adapter's PVeRA (probabilistic VeRA) settings (`peft_type: "PVERA"`). PVeRA has no `exclude_modules` in
/// PEFT 0.21.2.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PveraConfig {
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
    /// `save_projection`: `pvera_A` / `pvera_B` are in the adapter file (default `true`); otherwise they are
    /// regenerated from `projection_prng_key` with torch's CPU generator.
    pub save_projection: bool,
    /// `pvera_dropout` (default 0.0).
    pub pvera_dropout: f64,
    /// `d_initial`: the initial value of `pvera_lambda_d` (default 0.1).
    pub d_initial: f64,
    /// `fan_in_fan_out` (default `false`).
    pub fan_in_fan_out: bool,
    /// `bias` (default `"none"`; `"pvera_only"` trains the targeted layers' biases).
    pub bias: BiasMode,
    /// `modules_to_save` (default `null`).
    pub modules_to_save: Option<Vec<String>>,
    /// `init_weights` (default `true`).
    pub init_weights: bool,
    /// `layers_to_transform` (default `null`).
    pub layers_to_transform: Option<LayersToTransform>,
    /// `layers_pattern` (default `null`).
    pub layers_pattern: Option<StrOrList>,
    /// `sample_at_inference` (default `false`: inference uses the learned mean). `true` draws the sample from
    /// torch's generator in PEFT, which is not reproduced here: refused.
    pub sample_at_inference: bool,
    /// `generator_seed` (default `null`): the seed of PEFT's sampling generator. Training here draws its
    /// samples from the trainer's seeded generator, so any value loads (it changes nothing at inference).
    pub generator_seed: Option<i64>,
    /// Keys PEFT 0.21.2's `PveraConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for PveraConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            r: 256,
            target_modules: None,
            projection_prng_key: 0,
            save_projection: true,
            pvera_dropout: 0.0,
            d_initial: 0.1,
            fan_in_fan_out: false,
            bias: BiasMode::None,
            modules_to_save: None,
            init_weights: true,
            layers_to_transform: None,
            layers_pattern: None,
            sample_at_inference: false,
            generator_seed: None,
            extra: Map::new(),
        }
    }
}

impl PveraConfig {
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

    /// PEFT's checks ([`PeftError::InvalidConfig`]): `r > 0`, `pvera_dropout` at most 1, `layers_pattern` only
    /// with `layers_to_transform`; `sample_at_inference: true` is refused ([`PeftError::Unsupported`]).
    pub fn validate(&self) -> Result<()> {
        if self.sample_at_inference {
            return Err(PeftError::Unsupported {
                field: "sample_at_inference".into(),
                value: "true".into(),
                reason: "PEFT samples the PVeRA latent at inference from torch's generator, which is not \
                         reproduced here; use the learned mean (false)"
                    .into(),
            });
        }
        if self.r == 0 {
            return Err(PeftError::InvalidConfig(
                "`r` should be a positive integer value but the value passed is 0".into(),
            ));
        }
        helpers::check_probability("pvera_dropout", self.pvera_dropout)?;
        helpers::check_layers_pattern(
            self.layers_to_transform.as_ref(),
            self.layers_pattern.as_ref(),
        )?;
        helpers::refuse_unknown_keys(&self.extra, "PveraConfig")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PeftConfig;

    /// `PveraConfig(target_modules=["q_proj"], r=128)` as PEFT 0.21.2's `save_pretrained`
    /// writes it (keys sorted, `inference_mode` true).
    const PEFT_JSON: &str = r#"{
  "auto_mapping": null,
  "base_model_name_or_path": null,
  "bias": "none",
  "d_initial": 0.1,
  "fan_in_fan_out": false,
  "generator_seed": null,
  "inference_mode": true,
  "init_weights": true,
  "layers_pattern": null,
  "layers_to_transform": null,
  "modules_to_save": null,
  "peft_type": "PVERA",
  "peft_version": "0.21.2",
  "projection_prng_key": 0,
  "pvera_dropout": 0.0,
  "r": 128,
  "revision": null,
  "sample_at_inference": false,
  "save_projection": true,
  "target_modules": [
    "q_proj"
  ],
  "task_type": null
}"#;

    #[test]
    fn peft_file_round_trips_byte_for_byte() {
        let cfg = PeftConfig::from_json_str(PEFT_JSON).expect("parses");
        cfg.validate().expect("supported");
        assert_eq!(cfg.to_json_string(), PEFT_JSON);
        let PeftConfig::Pvera(c) = &cfg else {
            panic!("not PVeRA")
        };
        assert_eq!((c.r, c.d_initial, c.save_projection), (128, 0.1, true));
        assert!(cfg.target_spec().expect("spec").exclude_modules.is_none());
    }

    #[test]
    fn defaults_and_checks() {
        let cfg = PeftConfig::from_json_str(r#"{"peft_type": "PVERA", "save_projection": false}"#)
            .expect("parses");
        cfg.validate().expect("supported");
        let PeftConfig::Pvera(c) = &cfg else { panic!() };
        assert_eq!((c.r, c.projection_prng_key, c.d_initial), (256, 0, 0.1));
        // `exclude_modules` is not a PVeRA field: kept as unknown, refused when set.
        let cfg =
            PeftConfig::from_json_str(r#"{"peft_type": "PVERA", "exclude_modules": ["lm_head"]}"#)
                .expect("parses");
        assert_eq!(cfg.unknown_keys(), ["exclude_modules"]);
        assert!(
            matches!(cfg.validate(), Err(PeftError::Unsupported { field, .. }) if field == "exclude_modules")
        );
        let e = PeftConfig::from_json_str(r#"{"peft_type": "PVERA", "sample_at_inference": true}"#)
            .expect("parses")
            .validate();
        assert!(
            matches!(e, Err(PeftError::Unsupported { field, .. }) if field == "sample_at_inference")
        );
        let e = PeftConfig::from_json_str(r#"{"peft_type": "PVERA", "r": 0}"#)
            .expect("parses")
            .validate();
        assert!(matches!(e, Err(PeftError::InvalidConfig(_))));
    }
}
