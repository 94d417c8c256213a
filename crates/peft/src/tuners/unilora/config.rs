//! `UniLoraConfig`, field for field with PEFT 0.21.2's `tuners/unilora/config.py`.

use crate::config::PeftConfigBase;
use crate::config::common::{BiasMode, LayersToTransform, StrOrList, TargetModules, TargetSpec};
use crate::config::helpers;
use crate::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An adapter's UniLoRA settings (`peft_type: "UNILORA"`).
///
/// ```
/// use peft::PeftConfig;
/// let c = PeftConfig::from_json_str(
///     r#"{"peft_type": "UNILORA", "theta_d_length": 64, "target_modules": ["q_proj"]}"#,
/// )?;
/// c.validate()?;
/// let PeftConfig::UniLora(u) = &c else { unreachable!() };
/// assert_eq!((u.r, u.proj_seed, u.theta_d_length, u.save_indices), (4, 42, 64, false));
/// # Ok::<(), peft::PeftError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct UniLoraConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `r`: the rank of each layer's `A` `[r, in]` and `B` `[out, r]` (default 4).
    pub r: usize,
    /// `proj_seed`: the seed of numpy's generator that assigns every entry of every `A` / `B` an entry of
    /// `theta_d` (default 42).
    pub proj_seed: i64,
    /// `theta_d_length`: the length of the one trained vector `theta_d` shared by all layers (default 256).
    pub theta_d_length: usize,
    /// `target_modules` (default `null`: PEFT's LoRA table by model type).
    pub target_modules: Option<TargetModules>,
    /// `unilora_dropout`: dropout on the adapter's input, in training (default 0).
    pub unilora_dropout: f64,
    /// `fan_in_fan_out` (default `false`): PEFT sets it for each layer it wraps (true for a GPT-2 Conv1D,
    /// false for a Linear), so the saved value is the last targeted layer's.
    pub fan_in_fan_out: bool,
    /// `bias` (default `"none"`): only `"none"` is supported.
    pub bias: BiasMode,
    /// `modules_to_save` (default `null`).
    pub modules_to_save: Option<Vec<String>>,
    /// `init_theta_d_bound`: a fresh `theta_d` is drawn from `U(−bound, bound)` (default 0.02).
    pub init_theta_d_bound: f64,
    /// `init_weights` (default `true`): `theta_d` from `U(−init_theta_d_bound, init_theta_d_bound)`;
    /// `false`: from `N(0, 1)`.
    pub init_weights: bool,
    /// `save_indices` (default `false`): the file holds every layer's indices and scales
    /// (`unilora_indices_A` / `_B`, int64, and `unilora_scales_A` / `_B`); without it they are drawn again
    /// from `proj_seed` at load, over the targeted layers in the model's module order.
    pub save_indices: bool,
    /// `layers_to_transform` (default `null`).
    pub layers_to_transform: Option<LayersToTransform>,
    /// `layers_pattern` (default `null`).
    pub layers_pattern: Option<StrOrList>,
    /// Keys PEFT 0.21.2's `UniLoraConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for UniLoraConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            r: 4,
            proj_seed: 42,
            theta_d_length: 256,
            target_modules: None,
            unilora_dropout: 0.0,
            fan_in_fan_out: false,
            bias: BiasMode::None,
            modules_to_save: None,
            init_theta_d_bound: 0.02,
            init_weights: true,
            save_indices: false,
            layers_to_transform: None,
            layers_pattern: None,
            extra: Map::new(),
        }
    }
}

impl UniLoraConfig {
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

    /// PEFT's checks (`__post_init__`, [`PeftError::InvalidConfig`]): `r`, `theta_d_length` and
    /// `init_theta_d_bound` positive, `unilora_dropout` in `[0, 1]`, a regex `target_modules` without
    /// `layers_to_transform` / `layers_pattern`; and what numpy refuses: a negative `proj_seed`. Refused as not
    /// implemented ([`PeftError::Unsupported`]): `bias` other than `"none"`.
    pub fn validate(&self) -> Result<()> {
        let invalid = |m: String| Err(PeftError::InvalidConfig(m));
        if self.r == 0 {
            return invalid("UniLoRA: `r` should be a positive integer, got 0.".into());
        }
        if self.theta_d_length == 0 {
            return invalid("UniLoRA: `theta_d_length` should be a positive integer, got 0.".into());
        }
        if self.theta_d_length as u64 > u64::from(u32::MAX) {
            return invalid(format!(
                "UniLoRA: `theta_d_length` {} is 2³² or more, which peft-rs does not support",
                self.theta_d_length
            ));
        }
        helpers::check_probability("unilora_dropout", self.unilora_dropout)?;
        if !(self.init_theta_d_bound.is_finite() && self.init_theta_d_bound > 0.0) {
            return invalid(format!(
                "UniLoRA: `init_theta_d_bound` should be a positive float, got {}.",
                self.init_theta_d_bound
            ));
        }
        if self.proj_seed < 0 {
            return invalid(format!(
                "UniLoRA: `proj_seed` {} is negative, which numpy's SeedSequence refuses",
                self.proj_seed
            ));
        }
        helpers::check_regex_target_layers(
            self.target_modules.as_ref(),
            self.layers_to_transform.as_ref(),
            self.layers_pattern.as_ref(),
        )?;
        helpers::check_layers_pattern(
            self.layers_to_transform.as_ref(),
            self.layers_pattern.as_ref(),
        )?;
        match &self.bias {
            BiasMode::None => {}
            BiasMode::All => return Err(bias_unsupported("all")),
            BiasMode::AdapterOnly(s) if s == "unilora_only" => {
                return Err(bias_unsupported(s));
            }
            BiasMode::AdapterOnly(s) => {
                return invalid(format!(
                    "UniLoRA: `bias` should be 'none', 'all', or 'unilora_only', got {s}."
                ));
            }
        }
        helpers::refuse_unknown_keys(&self.extra, "UniLoraConfig")
    }
}

fn bias_unsupported(v: &str) -> PeftError {
    PeftError::Unsupported {
        field: "bias".into(),
        value: v.into(),
        reason: "UniLoRA adapters train no biases in peft-rs (only \"none\")".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PeftConfig;

    /// `UniLoraConfig(target_modules=["lin0", "lin1"], r=2, theta_d_length=50, save_indices=True)` saved by
    /// PEFT 0.21.2 (`auto_mapping` null, `target_modules` in the set order PEFT wrote).
    const PEFT_JSON: &str = r#"{
  "auto_mapping": null,
  "base_model_name_or_path": null,
  "bias": "none",
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_theta_d_bound": 0.02,
  "init_weights": true,
  "layers_pattern": null,
  "layers_to_transform": null,
  "modules_to_save": null,
  "peft_type": "UNILORA",
  "peft_version": "0.21.2",
  "proj_seed": 42,
  "r": 2,
  "revision": null,
  "save_indices": true,
  "target_modules": [
    "lin1",
    "lin0"
  ],
  "task_type": null,
  "theta_d_length": 50,
  "unilora_dropout": 0.0
}"#;

    #[test]
    fn peft_file_round_trips_byte_for_byte() {
        let cfg = PeftConfig::from_json_str(PEFT_JSON).expect("parses");
        cfg.validate().expect("supported");
        assert_eq!(cfg.to_json_string(), PEFT_JSON);
        let PeftConfig::UniLora(c) = &cfg else {
            panic!("not UniLoRA")
        };
        assert_eq!((c.r, c.theta_d_length, c.save_indices), (2, 50, true));
    }

    #[test]
    fn defaults_and_checks() {
        let c: UniLoraConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, UniLoraConfig::default());
        assert_eq!((c.r, c.proj_seed, c.theta_d_length), (4, 42, 256));
        c.validate().expect("defaults are valid");
        for (bad, field) in [
            (r#"{"peft_type": "UNILORA", "r": 0}"#, "`r`"),
            (r#"{"peft_type": "UNILORA", "theta_d_length": 0}"#, "`theta_d_length`"),
            (r#"{"peft_type": "UNILORA", "unilora_dropout": 1.5}"#, "`unilora_dropout`"),
            (r#"{"peft_type": "UNILORA", "init_theta_d_bound": 0}"#, "`init_theta_d_bound`"),
            (r#"{"peft_type": "UNILORA", "proj_seed": -1}"#, "`proj_seed`"),
            (r#"{"peft_type": "UNILORA", "bias": "lora_only"}"#, "`bias`"),
            (
                r#"{"peft_type": "UNILORA", "target_modules": "q.*", "layers_to_transform": [0]}"#,
                "`layers_to_transform`",
            ),
        ] {
            let e = PeftConfig::from_json_str(bad)
                .expect("parses")
                .validate()
                .unwrap_err();
            assert!(
                matches!(&e, PeftError::InvalidConfig(m) if m.contains(field)),
                "{bad}: {e}"
            );
        }
        for (bad, field) in [
            (r#"{"peft_type": "UNILORA", "bias": "unilora_only"}"#, "bias"),
            (r#"{"peft_type": "UNILORA", "bias": "all"}"#, "bias"),
            (r#"{"peft_type": "UNILORA", "use_dora": true}"#, "use_dora"),
        ] {
            let e = PeftConfig::from_json_str(bad)
                .expect("parses")
                .validate()
                .unwrap_err();
            assert!(
                matches!(&e, PeftError::Unsupported { field: f, .. } if f == field),
                "{bad}: {e}"
            );
        }
    }
}
