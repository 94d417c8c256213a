//! `RandLoraConfig`, field for field with PEFT 0.21.2's `tuners/randlora/config.py`.

use crate::config::PeftConfigBase;
use crate::config::common::{BiasMode, LayersToTransform, StrOrList, TargetModules, TargetSpec};
use crate::config::helpers::{self, int_if_integral};
use crate::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An adapter's RandLoRA settings (`peft_type: "RANDLORA"`). RandLoRA has no `exclude_modules` in PEFT 0.21.2.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RandLoraConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `r`: the rank of each random basis (default 32). Each layer uses `ceil(min(in, out) / r)` bases, so a
    /// smaller `r` trains more parameters.
    pub r: usize,
    /// `target_modules` (default `null`: PEFT's LoRA table by model type).
    pub target_modules: Option<TargetModules>,
    /// `projection_prng_key`: the seed of the shared bases (default 0; torch takes its low 64 bits, its
    /// generator its low 32).
    pub projection_prng_key: i64,
    /// `save_projection`: the bases are in the adapter file (default `true`); otherwise they are regenerated
    /// from `projection_prng_key`.
    pub save_projection: bool,
    /// `sparse`: ternary bases (−1, 0, 1 with probabilities 1/6, 2/3, 1/6) instead of kaiming-uniform ones
    /// (default `false`).
    pub sparse: bool,
    /// `very_sparse`: ternary bases with probability `1/(2√min_dim)` for each of −1 and 1 (default `false`;
    /// wins over `sparse`).
    pub very_sparse: bool,
    /// `randlora_dropout` (default 0.0), on the adapter's input in training.
    pub randlora_dropout: f64,
    /// `fan_in_fan_out` (default `false`; PEFT sets it per layer: `true` for a GPT-2 Conv1D, `false` for a
    /// Linear, and saves the last one's).
    pub fan_in_fan_out: bool,
    /// `randlora_alpha`: the update is scaled by `randlora_alpha / r` (default 640; an `int` in PEFT, written
    /// as an integer when integral).
    #[serde(serialize_with = "int_if_integral")]
    pub randlora_alpha: f64,
    /// `bias` (default `"none"`; only `"none"` is supported).
    pub bias: BiasMode,
    /// `modules_to_save` (default `null`).
    pub modules_to_save: Option<Vec<String>>,
    /// `init_weights` (default `true`): `randlora_lambda = 0` (the identity), `randlora_gamma = 1/max(n, min)`;
    /// `false`: `randlora_lambda ~ N(0, 1)`, `randlora_gamma = 1/max(in, out)`, for tests.
    pub init_weights: bool,
    /// `layers_to_transform` (default `null`).
    pub layers_to_transform: Option<LayersToTransform>,
    /// `layers_pattern` (default `null`).
    pub layers_pattern: Option<StrOrList>,
    /// Keys PEFT 0.21.2's `RandLoraConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for RandLoraConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            r: 32,
            target_modules: None,
            projection_prng_key: 0,
            save_projection: true,
            sparse: false,
            very_sparse: false,
            randlora_dropout: 0.0,
            fan_in_fan_out: false,
            randlora_alpha: 640.0,
            bias: BiasMode::None,
            modules_to_save: None,
            init_weights: true,
            layers_to_transform: None,
            layers_pattern: None,
            extra: Map::new(),
        }
    }
}

/// Which random bases an adapter uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BasisKind {
    /// Kaiming-uniform bases drawn in bfloat16 (the default).
    Dense,
    /// `sparse`: ternary bases with sparsity 3.
    Sparse,
    /// `very_sparse`: ternary bases with sparsity `√min_dim`.
    VerySparse,
}

impl RandLoraConfig {
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

    /// The bases' kind, as PEFT's `_pre_injection_hook` picks it (`very_sparse` first).
    pub fn basis_kind(&self) -> BasisKind {
        if self.very_sparse {
            BasisKind::VerySparse
        } else if self.sparse {
            BasisKind::Sparse
        } else {
            BasisKind::Dense
        }
    }

    /// The scale of the update, `randlora_alpha / r`.
    pub fn scaling(&self) -> f64 {
        self.randlora_alpha / self.r as f64
    }

    /// PEFT's checks ([`PeftError::InvalidConfig`]): `r > 0`, `randlora_dropout` at most 1, `layers_pattern`
    /// only with `layers_to_transform`; `bias` other than `"none"` is refused (trained biases are not
    /// implemented for RandLoRA), and so are unknown keys.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(PeftError::InvalidConfig(
                "`r` should be a positive integer value but the value passed is 0".into(),
            ));
        }
        helpers::check_probability("randlora_dropout", self.randlora_dropout)?;
        helpers::check_layers_pattern(
            self.layers_to_transform.as_ref(),
            self.layers_pattern.as_ref(),
        )?;
        if self.bias != BiasMode::None {
            return Err(PeftError::Unsupported {
                field: "bias".into(),
                value: self.bias.as_str().to_string(),
                reason: "RandLoRA with trained biases is not implemented yet".into(),
            });
        }
        helpers::refuse_unknown_keys(&self.extra, "RandLoraConfig")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PeftConfig;

    /// `RandLoraConfig(target_modules=["q_proj"], r=8)` saved by PEFT 0.21.2.
    const PEFT_JSON: &str = r#"{
  "auto_mapping": null,
  "base_model_name_or_path": null,
  "bias": "none",
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_weights": true,
  "layers_pattern": null,
  "layers_to_transform": null,
  "modules_to_save": null,
  "peft_type": "RANDLORA",
  "peft_version": "0.21.2",
  "projection_prng_key": 0,
  "r": 8,
  "randlora_alpha": 640,
  "randlora_dropout": 0.0,
  "revision": null,
  "save_projection": true,
  "sparse": false,
  "target_modules": [
    "q_proj"
  ],
  "task_type": null,
  "very_sparse": false
}"#;

    #[test]
    fn randlora_peft_file_round_trips_byte_for_byte() {
        let cfg = PeftConfig::from_json_str(PEFT_JSON).expect("parses");
        cfg.validate().expect("supported");
        assert_eq!(cfg.to_json_string(), PEFT_JSON);
        let PeftConfig::RandLora(c) = &cfg else {
            panic!("not RandLoRA")
        };
        assert_eq!((c.r, c.randlora_alpha, c.scaling()), (8, 640.0, 80.0));
        assert_eq!(c.basis_kind(), BasisKind::Dense);
    }

    #[test]
    fn randlora_defaults_and_checks() {
        let c: RandLoraConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, RandLoraConfig::default());
        assert_eq!((c.r, c.randlora_alpha, c.projection_prng_key), (32, 640.0, 0));
        assert!(c.save_projection && c.init_weights && !c.sparse && !c.very_sparse);
        c.validate().unwrap();
        let both = RandLoraConfig {
            sparse: true,
            very_sparse: true,
            ..Default::default()
        };
        assert_eq!(both.basis_kind(), BasisKind::VerySparse);
        for (bad, field) in [
            (r#"{"peft_type": "RANDLORA", "r": 0}"#, None),
            (r#"{"peft_type": "RANDLORA", "randlora_dropout": 1.5}"#, None),
            (r#"{"peft_type": "RANDLORA", "bias": "all"}"#, Some("bias")),
            (r#"{"peft_type": "RANDLORA", "bias": "randlora_only"}"#, Some("bias")),
            (
                r#"{"peft_type": "RANDLORA", "exclude_modules": ["lm_head"]}"#,
                Some("exclude_modules"),
            ),
        ] {
            let e = PeftConfig::from_json_str(bad).unwrap().validate().unwrap_err();
            match field {
                Some(f) => assert!(
                    matches!(&e, PeftError::Unsupported { field, .. } if field == f),
                    "{bad}: {e}"
                ),
                None => assert!(matches!(e, PeftError::InvalidConfig(_)), "{bad}: {e}"),
            }
        }
    }
}
