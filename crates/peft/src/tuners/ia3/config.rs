//! `IA3Config`, field for field with PEFT 0.21.2's `tuners/ia3/config.py`.

use crate::config::PeftConfigBase;
use crate::config::common::{TargetModules, TargetSpec};
use crate::config::helpers;
use crate::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An adapter's (IA)³ settings (`peft_type: "IA3"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Ia3Config {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `target_modules` (default `null`).
    pub target_modules: Option<TargetModules>,
    /// `exclude_modules` (default `null`).
    pub exclude_modules: Option<TargetModules>,
    /// `feedforward_modules` (default `null`): the targets whose *input* is scaled (the others scale their
    /// output). A list matches with a plain `name.endswith(item)` (no dot boundary), a string with
    /// `re.fullmatch`.
    pub feedforward_modules: Option<TargetModules>,
    /// `fan_in_fan_out` (default `false`).
    pub fan_in_fan_out: bool,
    /// `modules_to_save` (default `null`).
    pub modules_to_save: Option<Vec<String>>,
    /// `init_ia3_weights`: initialise the vectors to ones (default `true`).
    pub init_ia3_weights: bool,
    /// Keys PEFT 0.21.2's `IA3Config` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for Ia3Config {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            target_modules: None,
            exclude_modules: None,
            feedforward_modules: None,
            fan_in_fan_out: false,
            modules_to_save: None,
            init_ia3_weights: true,
            extra: Map::new(),
        }
    }
}

impl Ia3Config {
    /// Which modules the adapter wraps (IA3 has no `layers_to_transform`).
    pub fn target_spec(&self) -> TargetSpec<'_> {
        TargetSpec {
            target_modules: self.target_modules.as_ref(),
            exclude_modules: self.exclude_modules.as_ref(),
            layers_to_transform: None,
            layers_pattern: None,
            modules_to_save: self.modules_to_save.as_deref(),
        }
    }

    /// PEFT's check: when both are lists, `feedforward_modules` must be a subset of `target_modules`
    /// ([`PeftError::InvalidConfig`]). Nothing of IA3 is refused.
    pub fn validate(&self) -> Result<()> {
        let missing = match (&self.feedforward_modules, &self.target_modules) {
            (Some(TargetModules::List(ff)), Some(TargetModules::List(targets))) => {
                ff.iter().find(|m| !targets.contains(m))
            }
            _ => None,
        };
        if let Some(missing) = missing {
            return Err(PeftError::InvalidConfig(format!(
                "`feedforward_modules` should be a subset of `target_modules` ({missing:?} is not a target)"
            )));
        }
        helpers::refuse_unknown_keys(&self.extra, "IA3Config")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PeftConfig, json_content_eq};

    /// `IA3Config(target_modules=["k", "v", "wo"], feedforward_modules=["wo"], task_type="SEQ_2_SEQ_LM")` saved
    /// by PEFT 0.21.2 (the target set in hash order).
    const PEFT_JSON: &str = r#"{
  "auto_mapping": null,
  "base_model_name_or_path": null,
  "exclude_modules": null,
  "fan_in_fan_out": false,
  "feedforward_modules": [
    "wo"
  ],
  "inference_mode": true,
  "init_ia3_weights": true,
  "modules_to_save": null,
  "peft_type": "IA3",
  "peft_version": "0.21.2",
  "revision": null,
  "target_modules": [
    "wo",
    "k",
    "v"
  ],
  "task_type": "SEQ_2_SEQ_LM"
}"#;

    #[test]
    fn peft_file_round_trips() {
        let cfg = PeftConfig::from_json_str(PEFT_JSON).expect("parses");
        cfg.validate().expect("supported");
        assert_eq!(cfg.to_json_string(), PEFT_JSON);
        let PeftConfig::Ia3(c) = &cfg else {
            panic!("not IA3")
        };
        assert_eq!(
            c.feedforward_modules,
            Some(TargetModules::List(vec!["wo".into()]))
        );
        assert!(c.init_ia3_weights);
        let spec = cfg.target_spec().expect("spec");
        assert!(spec.layers_to_transform.is_none());
    }

    #[test]
    fn defaults_and_subset_check() {
        let cfg = PeftConfig::from_json_str(r#"{"peft_type": "IA3"}"#).expect("parses");
        let PeftConfig::Ia3(c) = &cfg else { panic!() };
        assert_eq!(c, &Ia3Config::default());
        let bad = r#"{"peft_type": "IA3", "target_modules": ["k"], "feedforward_modules": ["wo"]}"#;
        let e = PeftConfig::from_json_str(bad)
            .expect("parses")
            .validate()
            .expect_err("not a subset");
        assert!(matches!(e, PeftError::InvalidConfig(_)));
        // A regex on either side is not checked (PEFT checks only two sets).
        let ok = r#"{"peft_type": "IA3", "target_modules": ".*k", "feedforward_modules": ["wo"]}"#;
        PeftConfig::from_json_str(ok)
            .expect("parses")
            .validate()
            .expect("not checked");
    }

    #[test]
    fn duplicate_targets_are_written_once_like_a_python_set() {
        let text = r#"{"peft_type": "IA3", "target_modules": ["k", "v", "k"]}"#;
        let cfg = PeftConfig::from_json_str(text).expect("parses");
        let v = cfg.to_json_value();
        assert_eq!(v["target_modules"], serde_json::json!(["k", "v"]));
        let set_order = serde_json::json!({"target_modules": ["v", "k"]});
        assert!(json_content_eq(
            &serde_json::json!({"target_modules": v["target_modules"].clone()}),
            &set_order
        ));
    }
}
