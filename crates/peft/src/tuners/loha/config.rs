//! `LoHaConfig`, field for field with PEFT 0.21.2's `tuners/loha/config.py`.

use crate::config::PeftConfigBase;
use crate::tuners::lycoris_utils::LycorisFields;
use crate::config::common::{RankAlphaPatterns, TargetFields, LayersToTransform, StrOrList};
use crate::config::helpers::{self};
use crate::{PeftError, Result};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An adapter's LoHa settings (`peft_type: "LOHA"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoHaConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `target_modules`, `exclude_modules`, `layers_to_transform`, `layers_pattern`, `modules_to_save`.
    #[serde(flatten)]
    pub targets: TargetFields,
    /// `rank_pattern`, `alpha_pattern`.
    #[serde(flatten)]
    pub patterns: RankAlphaPatterns,
    /// `r`, `alpha`, `rank_dropout`, `module_dropout`, `use_effective_conv2d`.
    #[serde(flatten)]
    pub lycoris: LycorisFields,
    /// `init_weights`: `hada_w2_b` starts at zero, so the adapter starts as the identity (default `true`).
    pub init_weights: bool,
    /// Keys PEFT 0.21.2's `LoHaConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for LoHaConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            targets: TargetFields::default(),
            patterns: RankAlphaPatterns::default(),
            lycoris: LycorisFields::default(),
            init_weights: true,
            extra: Map::new(),
        }
    }
}

/// Checks shared by LoHa and LoKr: positive ranks, valid pattern keys, `layers_pattern` with
/// `layers_to_transform`.
pub(crate) fn check_lycoris(
    r: usize,
    rank_pattern: &IndexMap<String, usize>,
    alpha_pattern: &IndexMap<String, f64>,
    layers_to_transform: Option<&LayersToTransform>,
    layers_pattern: Option<&StrOrList>,
) -> Result<()> {
    if r == 0 {
        return Err(PeftError::InvalidConfig(
            "`r` should be a positive integer value but the value passed is 0".into(),
        ));
    }
    if let Some((key, _)) = rank_pattern.iter().find(|(_, r)| **r == 0) {
        return Err(PeftError::InvalidConfig(format!(
            "`rank_pattern` gives {key:?} rank 0; ranks must be positive"
        )));
    }
    helpers::check_pattern_keys("rank_pattern", rank_pattern.keys())?;
    helpers::check_pattern_keys("alpha_pattern", alpha_pattern.keys())?;
    helpers::check_layers_pattern(layers_to_transform, layers_pattern)
}

impl LoHaConfig {
    /// The rank and alpha of the module named `module_name`: from the first matching key of `rank_pattern` /
    /// `alpha_pattern` (as PEFT's `get_pattern_key`), else `r` / `alpha`.
    pub fn rank_and_alpha_for(&self, module_name: &str) -> (usize, f64) {
        self.patterns.rank_and_alpha_for(module_name, self.lycoris.r, self.lycoris.alpha)
    }

    /// PEFT's checks ([`PeftError::InvalidConfig`]): `r > 0` (also in `rank_pattern`), valid pattern keys,
    /// `layers_pattern` only with `layers_to_transform`. Nothing of LoHa is refused.
    pub fn validate(&self) -> Result<()> {
        check_lycoris(
            self.lycoris.r,
            &self.patterns.rank_pattern,
            &self.patterns.alpha_pattern,
            self.targets.layers_to_transform.as_ref(),
            self.targets.layers_pattern.as_ref(),
        )?;
        helpers::refuse_unknown_keys(&self.extra, "LoHaConfig")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PeftConfig;

    /// `LoHaConfig(target_modules=["q_proj"], r=4, alpha=8)` saved by PEFT 0.21.2.
    const PEFT_JSON: &str = r#"{
  "alpha": 8,
  "alpha_pattern": {},
  "auto_mapping": null,
  "base_model_name_or_path": null,
  "exclude_modules": null,
  "inference_mode": true,
  "init_weights": true,
  "layers_pattern": null,
  "layers_to_transform": null,
  "module_dropout": 0.0,
  "modules_to_save": null,
  "peft_type": "LOHA",
  "peft_version": "0.21.2",
  "r": 4,
  "rank_dropout": 0.0,
  "rank_pattern": {},
  "revision": null,
  "target_modules": [
    "q_proj"
  ],
  "task_type": null,
  "use_effective_conv2d": false
}"#;

    #[test]
    fn peft_file_round_trips_byte_for_byte() {
        let cfg = PeftConfig::from_json_str(PEFT_JSON).expect("parses");
        cfg.validate().expect("supported");
        assert_eq!(cfg.to_json_string(), PEFT_JSON);
        let PeftConfig::LoHa(c) = &cfg else {
            panic!("not LoHa")
        };
        assert_eq!((c.lycoris.r, c.lycoris.alpha), (4, 8.0));
    }

    #[test]
    fn defaults_patterns_and_checks() {
        let cfg = PeftConfig::from_json_str(
            r#"{"peft_type": "LOHA", "rank_pattern": {"fc1": 2}, "alpha_pattern": {"mlp.fc1": 3}}"#,
        )
        .expect("parses");
        let PeftConfig::LoHa(c) = &cfg else { panic!() };
        assert_eq!((c.lycoris.r, c.lycoris.alpha, c.init_weights), (8, 8.0, true));
        assert_eq!(c.rank_and_alpha_for("model.mlp.fc1"), (2, 3.0));
        assert_eq!(c.rank_and_alpha_for("model.attn.fc1"), (2, 8.0));
        assert_eq!(c.rank_and_alpha_for("model.mlp.xfc1"), (8, 8.0));
        cfg.validate().expect("supported");
        for bad in [
            r#"{"peft_type": "LOHA", "r": 0}"#,
            r#"{"peft_type": "LOHA", "layers_pattern": "h"}"#,
        ] {
            let e = PeftConfig::from_json_str(bad)
                .expect("parses")
                .validate()
                .expect_err(bad);
            assert!(matches!(e, PeftError::InvalidConfig(_)), "{bad}");
        }
    }
}
