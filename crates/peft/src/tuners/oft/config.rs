//! `OFTConfig`, field for field with PEFT 0.21.2's `tuners/oft/config.py`.

use crate::config::PeftConfigBase;
use crate::config::common::{TargetFields, BiasMode};
use crate::config::helpers;
use crate::Result;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An adapter's OFT settings (`peft_type: "OFT"`).
///
/// Exactly one of `r` (blocks per layer) and `oft_block_size` is non-zero. Files written before PEFT 0.14 (no
/// `oft_block_size` key) are refused when read, as PEFT refuses them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OftConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `target_modules`, `exclude_modules`, `layers_to_transform`, `layers_pattern`, `modules_to_save`.
    #[serde(flatten)]
    pub targets: TargetFields,
    /// `r`: the number of OFT blocks per layer (default 0: use `oft_block_size`).
    pub r: usize,
    /// `oft_block_size`: the block size (default 32). PEFT adjusts it per layer when the input width is not
    /// divisible, so the block size of a loaded adapter comes from its tensors.
    pub oft_block_size: usize,
    /// `module_dropout`: probability of replacing blocks with the identity during training (default 0.0).
    pub module_dropout: f64,
    /// `fan_in_fan_out` (default `false`).
    pub fan_in_fan_out: bool,
    /// `bias` (default `"none"`; `"oft_only"` trains the targeted layers' biases).
    pub bias: BiasMode,
    /// `init_weights`: start at the identity rotation (default `true`).
    pub init_weights: bool,
    /// `coft`: constrained OFT, parameters projected onto an `eps` ball (default `false`).
    pub coft: bool,
    /// `eps`: the COFT radius (default 6e-05).
    pub eps: f64,
    /// `block_share`: one rotation block shared by all blocks of a layer (default `false`).
    pub block_share: bool,
    /// `use_cayley_neumann`: approximate the Cayley transform with a Neumann series (default `true`).
    pub use_cayley_neumann: bool,
    /// `num_cayley_neumann_terms` (default 5).
    pub num_cayley_neumann_terms: usize,
    /// Keys PEFT 0.21.2's `OFTConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for OftConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            targets: TargetFields::default(),
            r: 0,
            oft_block_size: 32,
            module_dropout: 0.0,
            fan_in_fan_out: false,
            bias: BiasMode::None,
            init_weights: true,
            coft: false,
            eps: 6e-5,
            block_share: false,
            use_cayley_neumann: true,
            num_cayley_neumann_terms: 5,
            extra: Map::new(),
        }
    }
}

impl OftConfig {
    /// PEFT's checks ([`PeftError::InvalidConfig`](crate::PeftError::InvalidConfig)): exactly one of `r` and `oft_block_size` non-zero,
    /// `layers_pattern` only with `layers_to_transform`. Nothing of OFT is refused (COFT, block sharing and both
    /// Cayley forms are part of the method).
    pub fn validate(&self) -> Result<()> {
        helpers::check_layers_pattern(
            self.targets.layers_to_transform.as_ref(),
            self.targets.layers_pattern.as_ref(),
        )?;
        helpers::check_exactly_one_size(("r", self.r), ("oft_block_size", self.oft_block_size))?;
        helpers::refuse_unknown_keys(&self.extra, "OFTConfig")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PeftError;
    use crate::config::PeftConfig;

    /// `OFTConfig(target_modules=["q_proj"], oft_block_size=8)` saved by PEFT 0.21.2.
    const PEFT_JSON: &str = r#"{
  "auto_mapping": null,
  "base_model_name_or_path": null,
  "bias": "none",
  "block_share": false,
  "coft": false,
  "eps": 6e-05,
  "exclude_modules": null,
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_weights": true,
  "layers_pattern": null,
  "layers_to_transform": null,
  "module_dropout": 0.0,
  "modules_to_save": null,
  "num_cayley_neumann_terms": 5,
  "oft_block_size": 8,
  "peft_type": "OFT",
  "peft_version": "0.21.2",
  "r": 0,
  "revision": null,
  "target_modules": [
    "q_proj"
  ],
  "task_type": null,
  "use_cayley_neumann": true
}"#;

    #[test]
    fn peft_file_round_trips_byte_for_byte() {
        let cfg = PeftConfig::from_json_str(PEFT_JSON).expect("parses");
        cfg.validate().expect("supported");
        assert_eq!(cfg.to_json_string(), PEFT_JSON);
        let PeftConfig::Oft(c) = &cfg else {
            panic!("not OFT")
        };
        assert_eq!((c.r, c.oft_block_size, c.eps), (0, 8, 6e-5));
    }

    #[test]
    fn old_oft_files_and_r_block_size_checks() {
        let old = r#"{"peft_type": "OFT", "r": 8, "target_modules": ["q"]}"#;
        assert!(matches!(
            PeftConfig::from_json_str(old),
            Err(PeftError::InvalidConfig(_))
        ));
        for bad in [
            r#"{"peft_type": "OFT", "r": 4, "oft_block_size": 8}"#,
            r#"{"peft_type": "OFT", "r": 0, "oft_block_size": 0}"#,
        ] {
            let e = PeftConfig::from_json_str(bad)
                .expect("parses")
                .validate()
                .expect_err(bad);
            assert!(matches!(e, PeftError::InvalidConfig(_)), "{bad}");
        }
        let ok = r#"{"peft_type": "OFT", "r": 4, "oft_block_size": 0, "coft": true, "block_share": true, "bias": "oft_only"}"#;
        let cfg = PeftConfig::from_json_str(ok).expect("parses");
        cfg.validate().expect("supported");
        let PeftConfig::Oft(c) = &cfg else { panic!() };
        assert_eq!(c.bias, BiasMode::AdapterOnly("oft_only".into()));
    }
}
