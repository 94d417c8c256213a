//! `BOFTConfig`, field for field with PEFT 0.21.2's `tuners/boft/config.py`.

use crate::config::PeftConfigBase;
use crate::config::common::{TargetFields, BiasMode};
use crate::config::helpers;
use crate::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An adapter's BOFT settings (`peft_type: "BOFT"`).
///
/// Exactly one of `boft_block_size` and `boft_block_num` is non-zero. Stock PEFT without its CUDA extension
/// runs with one butterfly factor whatever the config says, so the factor of a loaded adapter comes from its
/// tensors.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BoftConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `target_modules`, `exclude_modules`, `layers_to_transform`, `layers_pattern`, `modules_to_save`.
    #[serde(flatten)]
    pub targets: TargetFields,
    /// `boft_block_size` (default 4).
    pub boft_block_size: usize,
    /// `boft_block_num`: blocks per layer (default 0: use `boft_block_size`).
    pub boft_block_num: usize,
    /// `boft_n_butterfly_factor`: the number of butterfly factors (default 1: plain block-diagonal OFT).
    pub boft_n_butterfly_factor: usize,
    /// `boft_dropout`: multiplicative dropout of blocks during training (default 0.0).
    pub boft_dropout: f64,
    /// `fan_in_fan_out` (default `false`).
    pub fan_in_fan_out: bool,
    /// `bias` (default `"none"`; `"boft_only"` trains the targeted layers' biases).
    pub bias: BiasMode,
    /// `init_weights`: start at the identity rotation (default `true`).
    pub init_weights: bool,
    /// Keys PEFT 0.21.2's `BOFTConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for BoftConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            targets: TargetFields::default(),
            boft_block_size: 4,
            boft_block_num: 0,
            boft_n_butterfly_factor: 1,
            boft_dropout: 0.0,
            fan_in_fan_out: false,
            bias: BiasMode::None,
            init_weights: true,
            extra: Map::new(),
        }
    }
}

impl BoftConfig {
    /// PEFT's checks ([`PeftError::InvalidConfig`]): exactly one of `boft_block_size` and `boft_block_num`
    /// non-zero, at least one butterfly factor, `layers_pattern` only with `layers_to_transform`. Nothing of BOFT
    /// is refused.
    pub fn validate(&self) -> Result<()> {
        helpers::check_layers_pattern(
            self.targets.layers_to_transform.as_ref(),
            self.targets.layers_pattern.as_ref(),
        )?;
        helpers::check_exactly_one_size(("boft_block_size", self.boft_block_size), ("boft_block_num", self.boft_block_num))?;
        if self.boft_n_butterfly_factor == 0 {
            return Err(PeftError::InvalidConfig(
                "`boft_n_butterfly_factor` must be at least 1, got 0".into(),
            ));
        }
        helpers::refuse_unknown_keys(&self.extra, "BOFTConfig")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PeftConfig;

    /// `BOFTConfig(target_modules=["q_proj"], boft_block_size=4, boft_n_butterfly_factor=2)` saved by PEFT 0.21.2.
    const PEFT_JSON: &str = r#"{
  "auto_mapping": null,
  "base_model_name_or_path": null,
  "bias": "none",
  "boft_block_num": 0,
  "boft_block_size": 4,
  "boft_dropout": 0.0,
  "boft_n_butterfly_factor": 2,
  "exclude_modules": null,
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_weights": true,
  "layers_pattern": null,
  "layers_to_transform": null,
  "modules_to_save": null,
  "peft_type": "BOFT",
  "peft_version": "0.21.2",
  "revision": null,
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
        let PeftConfig::Boft(c) = &cfg else {
            panic!("not BOFT")
        };
        assert_eq!(
            (
                c.boft_block_size,
                c.boft_block_num,
                c.boft_n_butterfly_factor
            ),
            (4, 0, 2)
        );
    }

    #[test]
    fn block_checks() {
        for bad in [
            r#"{"peft_type": "BOFT", "boft_block_size": 4, "boft_block_num": 2}"#,
            r#"{"peft_type": "BOFT", "boft_block_size": 0}"#,
            r#"{"peft_type": "BOFT", "boft_n_butterfly_factor": 0}"#,
        ] {
            let e = PeftConfig::from_json_str(bad)
                .expect("parses")
                .validate()
                .expect_err(bad);
            assert!(matches!(e, PeftError::InvalidConfig(_)), "{bad}");
        }
        let ok = r#"{"peft_type": "BOFT", "boft_block_size": 0, "boft_block_num": 8, "bias": "boft_only"}"#;
        PeftConfig::from_json_str(ok)
            .expect("parses")
            .validate()
            .expect("supported");
        assert!(PeftConfig::from_json_str(r#"{"peft_type": "BOFT", "bias": "some"}"#).is_err());
    }
}
