//! `AdaLoraConfig`, field for field with PEFT 0.21.2's `tuners/adalora/config.py` (a `LoraConfig` subclass).

use crate::config::PeftConfigBase;
use crate::config::common::TargetFields;
use crate::config::helpers::{self, map_int_if_integral, null_as_default};
use crate::tuners::lora::config::{
    LoraFields, LoraOptionalFeatures, check_adalora_init, check_lora_common,
};
use crate::{PeftError, Result};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An adapter's AdaLoRA settings (`peft_type: "ADALORA"`).
///
/// AdaLoRA inherits every LoRA field; it builds its layers with rank `init_r` (not `r`, which it ignores) and
/// `lora_alpha`, and records the final rank allocation in `rank_pattern` as boolean masks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdaLoraConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `target_modules`, `exclude_modules`, `layers_to_transform`, `layers_pattern`, `modules_to_save`.
    #[serde(flatten)]
    pub targets: TargetFields,
    /// `r`, `lora_alpha`, `lora_dropout`, `fan_in_fan_out`, `bias`, `use_rslora`, `init_lora_weights`,
    /// `use_dora`, `lora_bias`, inherited from LoRA. AdaLoRA ignores `r` (`init_r` is the rank) and
    /// `use_rslora`, distinguishes only true from false in `init_lora_weights`, and refuses `use_dora`.
    #[serde(flatten)]
    pub lora: LoraFields,
    /// `rank_pattern` (default `null`): the rank allocation found in training, one boolean mask per `lora_E`
    /// parameter name (`true` = singular value kept), used to resize the layers when loading.
    pub rank_pattern: Option<IndexMap<String, Vec<bool>>>,
    /// `alpha_pattern` (default `{}`; PEFT's AdaLoRA ignores it).
    #[serde(
        deserialize_with = "null_as_default",
        serialize_with = "map_int_if_integral"
    )]
    pub alpha_pattern: IndexMap<String, f64>,
    /// The LoRA fields of features peft-rs does not implement (each a top-level key).
    #[serde(flatten)]
    pub features: LoraOptionalFeatures,
    /// `target_r`: the target average rank (default 8).
    pub target_r: usize,
    /// `init_r`: the initial rank of every layer (default 12).
    pub init_r: usize,
    /// `tinit`: warm-up steps before rank reduction (default 0).
    pub tinit: usize,
    /// `tfinal`: final fine-tuning steps without rank changes (default 0).
    pub tfinal: usize,
    /// `deltaT`: steps between two budget allocations (default 1).
    #[serde(rename = "deltaT")]
    pub delta_t: usize,
    /// `beta1`: EMA factor of the sensitivity (default 0.85).
    pub beta1: f64,
    /// `beta2`: EMA factor of the uncertainty (default 0.85).
    pub beta2: f64,
    /// `orth_reg_weight`: orthogonal regularisation coefficient (default 0.5).
    pub orth_reg_weight: f64,
    /// `total_step`: total training steps (default `null`, which PEFT refuses).
    pub total_step: Option<usize>,
    /// Keys PEFT 0.21.2's `AdaLoraConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for AdaLoraConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            targets: TargetFields::default(),
            lora: LoraFields::default(),
            rank_pattern: None,
            alpha_pattern: IndexMap::new(),
            features: LoraOptionalFeatures::default(),
            target_r: 8,
            init_r: 12,
            tinit: 0,
            tfinal: 0,
            delta_t: 1,
            beta1: 0.85,
            beta2: 0.85,
            orth_reg_weight: 0.5,
            total_step: None,
            extra: Map::new(),
        }
    }
}

impl AdaLoraConfig {
    /// PEFT's checks ([`PeftError::InvalidConfig`]): LoRA's layer-selection and `lora_bias` checks, no DoRA, no
    /// LoftQ, `total_step > 0`, `orth_reg_weight >= 0`, a budgeting phase (`tinit < total_step - tfinal`), a
    /// positive `init_r`. Refused ([`PeftError::Unsupported`]): a named `init_lora_weights` and every LoRA
    /// feature of [`LoraOptionalFeatures`] that is set.
    pub fn validate(&self) -> Result<()> {
        if self.lora.use_dora {
            return Err(PeftError::InvalidConfig(
                "ADALORA does not support DoRA".into(),
            ));
        }
        if helpers::is_truthy(&self.features.loftq_config) {
            return Err(PeftError::InvalidConfig(
                "ADALORA does not support LOFTQ".into(),
            ));
        }
        check_lora_common(
            self.targets.target_modules.as_ref(),
            self.targets.layers_to_transform.as_ref(),
            self.targets.layers_pattern.as_ref(),
            &self.lora.init_lora_weights,
            self.lora.lora_bias,
            self.lora.use_dora,
            self.lora.lora_dropout,
        )?;
        let total_step = match self.total_step {
            Some(t) if t > 0 => t,
            _ => {
                return Err(PeftError::InvalidConfig(
                    "AdaLoRA does not work when `total_step` is None, supply a value > 0".into(),
                ));
            }
        };
        if self.orth_reg_weight < 0.0 {
            return Err(PeftError::InvalidConfig(format!(
                "`orth_reg_weight` should be greater than or equal to 0, got {}",
                self.orth_reg_weight
            )));
        }
        if self.tinit as i128 >= total_step as i128 - self.tfinal as i128 {
            return Err(PeftError::InvalidConfig(
                "the schedule values don't allow for a budgeting phase: decrease `tfinal`/`tinit` or increase \
                 `total_step`"
                    .into(),
            ));
        }
        if self.init_r == 0 {
            return Err(PeftError::InvalidConfig(
                "`init_r` should be a positive integer, got 0".into(),
            ));
        }
        if self.delta_t == 0 {
            return Err(PeftError::InvalidConfig(
                "`deltaT` should be a positive integer, got 0".into(),
            ));
        }
        check_adalora_init(&self.lora.init_lora_weights)?;
        self.features.validate()?;
        helpers::refuse_unknown_keys(&self.extra, "AdaLoraConfig")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tuners::MethodType;
    use crate::config::{PeftConfig, json_content_eq};

    /// `AdaLoraConfig(total_step=100, target_modules=["q", "v"])` saved by PEFT 0.21.2.
    const PEFT_JSON: &str = r#"{
  "alora_invocation_tokens": null,
  "alpha_pattern": {},
  "arrow_config": null,
  "auto_mapping": null,
  "base_model_name_or_path": null,
  "beta1": 0.85,
  "beta2": 0.85,
  "bias": "none",
  "corda_config": null,
  "deltaT": 1,
  "ensure_weight_tying": false,
  "eva_config": null,
  "exclude_modules": null,
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_lora_weights": true,
  "init_r": 12,
  "kasa_config": null,
  "layer_replication": null,
  "layers_pattern": null,
  "layers_to_transform": null,
  "loftq_config": {},
  "lora_alpha": 8,
  "lora_bias": false,
  "lora_dropout": 0.0,
  "lora_ga_config": null,
  "megatron_config": null,
  "megatron_core": "megatron.core",
  "modules_to_save": null,
  "monteclora_config": null,
  "orth_reg_weight": 0.5,
  "peft_type": "ADALORA",
  "peft_version": "0.21.2",
  "qalora_group_size": 16,
  "r": 8,
  "rank_pattern": null,
  "revision": null,
  "target_modules": [
    "q",
    "v"
  ],
  "target_parameters": null,
  "target_r": 8,
  "task_type": null,
  "tfinal": 0,
  "tinit": 0,
  "total_step": 100,
  "trainable_token_indices": null,
  "use_bdlora": null,
  "use_dora": false,
  "use_qalora": false,
  "use_rslora": false,
  "velora_config": null
}"#;

    #[test]
    fn peft_file_parses_validates_and_round_trips_byte_for_byte() {
        let cfg = PeftConfig::from_json_str(PEFT_JSON).expect("parses");
        cfg.validate().expect("supported");
        assert_eq!(cfg.to_json_string(), PEFT_JSON);
        let PeftConfig::AdaLora(c) = &cfg else {
            panic!("not AdaLoRA")
        };
        assert_eq!(
            (c.init_r, c.target_r, c.total_step, c.delta_t),
            (12, 8, Some(100), 1)
        );
        assert_eq!(c.rank_pattern, None);
        assert!(c.unknown_keys().is_empty());
    }

    #[test]
    fn boolean_mask_rank_pattern_round_trips_in_order() {
        let text = r#"{"peft_type": "ADALORA", "total_step": 10, "init_r": 3,
            "rank_pattern": {"base_model.model.b.lora_E": [true, false, true], "base_model.model.a.lora_E": [false, false, false]}}"#;
        let cfg = PeftConfig::from_json_str(text).expect("parses");
        cfg.validate().expect("supported");
        let PeftConfig::AdaLora(c) = &cfg else {
            panic!()
        };
        let masks = c.rank_pattern.as_ref().expect("masks");
        assert_eq!(
            masks.keys().collect::<Vec<_>>(),
            ["base_model.model.b.lora_E", "base_model.model.a.lora_E"]
        );
        assert_eq!(masks[0], vec![true, false, true]);
        let back: Value = serde_json::from_str(&cfg.to_json_string()).expect("json");
        let orig: Value = serde_json::from_str(text).expect("json");
        for key in ["rank_pattern", "total_step", "init_r"] {
            assert!(json_content_eq(&back[key], &orig[key]), "{key}");
        }
    }

    #[test]
    fn peft_checks_and_refusals() {
        let invalid = [
            r#"{"peft_type": "ADALORA"}"#,
            r#"{"peft_type": "ADALORA", "total_step": 0}"#,
            r#"{"peft_type": "ADALORA", "total_step": 10, "use_dora": true}"#,
            r#"{"peft_type": "ADALORA", "total_step": 10, "loftq_config": {"loftq_bits": 4}}"#,
            r#"{"peft_type": "ADALORA", "total_step": 10, "tinit": 5, "tfinal": 5}"#,
            r#"{"peft_type": "ADALORA", "total_step": 10, "orth_reg_weight": -1}"#,
            r#"{"peft_type": "ADALORA", "total_step": 10, "target_modules": "q", "layers_to_transform": 1}"#,
        ];
        for text in invalid {
            let e = PeftConfig::from_json_str(text)
                .expect("parses")
                .validate()
                .expect_err(text);
            assert!(matches!(e, PeftError::InvalidConfig(_)), "{text}: {e:?}");
        }
        let unsupported = [
            (
                r#"{"peft_type": "ADALORA", "total_step": 10, "init_lora_weights": "pissa"}"#,
                "init_lora_weights",
            ),
            (
                r#"{"peft_type": "ADALORA", "total_step": 10, "use_qalora": true}"#,
                "use_qalora",
            ),
            (
                r#"{"peft_type": "ADALORA", "total_step": 10, "layer_replication": [[0, 1]]}"#,
                "layer_replication",
            ),
        ];
        for (text, want) in unsupported {
            match PeftConfig::from_json_str(text).expect("parses").validate() {
                Err(PeftError::Unsupported { field, .. }) => assert_eq!(field, want),
                other => panic!("{text}: {other:?}"),
            }
        }
    }
}
