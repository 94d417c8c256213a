//! `LoKrConfig`, field for field with PEFT 0.21.2's `tuners/lokr/config.py`.

use crate::config::PeftConfigBase;
use crate::tuners::lycoris_utils::LycorisFields;
use crate::config::common::{RankAlphaPatterns, TargetFields};
use crate::config::helpers::{self};
use crate::tuners::loha::config::check_lycoris;
use crate::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `init_weights` of LoKr: `true` (w1 zeros), `false` (random, for tests) or `"lycoris"` (LyCORIS' own init:
/// w2 zeros).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LoKrInitWeights {
    /// `true` or `false`.
    Bool(bool),
    /// A named initialisation; PEFT knows only `"lycoris"`.
    Method(String),
}

impl Default for LoKrInitWeights {
    fn default() -> Self {
        LoKrInitWeights::Bool(true)
    }
}

/// An adapter's LoKr settings (`peft_type: "LOKR"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoKrConfig {
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
    /// `decompose_both`: also factor w1 into low-rank matrices (default `false`).
    pub decompose_both: bool,
    /// `decompose_factor`: the Kronecker factorisation factor, -1 for the most balanced split (default -1).
    pub decompose_factor: i64,
    /// `rank_dropout_scale`: rescale by the kept fraction under rank dropout (default `false`).
    pub rank_dropout_scale: bool,
    /// `init_weights` (default `true`).
    pub init_weights: LoKrInitWeights,
    /// Keys PEFT 0.21.2's `LoKrConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for LoKrConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            targets: TargetFields::default(),
            patterns: RankAlphaPatterns::default(),
            lycoris: LycorisFields::default(),
            decompose_both: false,
            decompose_factor: -1,
            rank_dropout_scale: false,
            init_weights: LoKrInitWeights::Bool(true),
            extra: Map::new(),
        }
    }
}

impl LoKrConfig {
    /// The rank and alpha of the module named `module_name`: from the first matching key of `rank_pattern` /
    /// `alpha_pattern` (as PEFT's `get_pattern_key`), else `r` / `alpha`.
    pub fn rank_and_alpha_for(&self, module_name: &str) -> (usize, f64) {
        self.patterns.rank_and_alpha_for(module_name, self.lycoris.r, self.lycoris.alpha)
    }

    /// PEFT's checks ([`PeftError::InvalidConfig`]): `r > 0` (also in `rank_pattern`), valid pattern keys,
    /// `layers_pattern` only with `layers_to_transform` and `init_weights` a bool or `"lycoris"`. Nothing
    /// of LoKr is refused (any `decompose_factor` is valid: PEFT's `factorization` handles every value).
    pub fn validate(&self) -> Result<()> {
        check_lycoris(
            self.lycoris.r,
            &self.patterns.rank_pattern,
            &self.patterns.alpha_pattern,
            self.targets.layers_to_transform.as_ref(),
            self.targets.layers_pattern.as_ref(),
        )?;
        match &self.init_weights {
            LoKrInitWeights::Method(m) if m != "lycoris" => {
                return Err(PeftError::InvalidConfig(format!(
                    "`init_weights` must be true, false or \"lycoris\", got {m:?}"
                )));
            }
            _ => {}
        }
        helpers::refuse_unknown_keys(&self.extra, "LoKrConfig")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PeftConfig;

    /// `LoKrConfig(target_modules=["q_proj"], r=4, alpha=8)` saved by PEFT 0.21.2.
    const PEFT_JSON: &str = r#"{
  "alpha": 8,
  "alpha_pattern": {},
  "auto_mapping": null,
  "base_model_name_or_path": null,
  "decompose_both": false,
  "decompose_factor": -1,
  "exclude_modules": null,
  "inference_mode": true,
  "init_weights": true,
  "layers_pattern": null,
  "layers_to_transform": null,
  "module_dropout": 0.0,
  "modules_to_save": null,
  "peft_type": "LOKR",
  "peft_version": "0.21.2",
  "r": 4,
  "rank_dropout": 0.0,
  "rank_dropout_scale": false,
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
        let PeftConfig::LoKr(c) = &cfg else {
            panic!("not LoKr")
        };
        assert_eq!((c.lycoris.r, c.lycoris.alpha, c.decompose_factor), (4, 8.0, -1));
    }

    #[test]
    fn init_weights_forms() {
        for (text, want) in [
            (r#"{"peft_type": "LOKR"}"#, LoKrInitWeights::Bool(true)),
            (
                r#"{"peft_type": "LOKR", "init_weights": false}"#,
                LoKrInitWeights::Bool(false),
            ),
            (
                r#"{"peft_type": "LOKR", "init_weights": "lycoris"}"#,
                LoKrInitWeights::Method("lycoris".into()),
            ),
        ] {
            let cfg = PeftConfig::from_json_str(text).expect("parses");
            cfg.validate().expect("supported");
            let PeftConfig::LoKr(c) = &cfg else { panic!() };
            assert_eq!(c.init_weights, want);
        }
        for bad in [
            r#"{"peft_type": "LOKR", "init_weights": "pissa"}"#,
            r#"{"peft_type": "LOKR", "r": 0}"#,
        ] {
            let e = PeftConfig::from_json_str(bad)
                .expect("parses")
                .validate()
                .expect_err(bad);
            assert!(matches!(e, PeftError::InvalidConfig(_)), "{bad}");
        }
    }
}
