//! `VbLoraConfig`, field for field with PEFT 0.21.2's `tuners/vblora/config.py` (`VBLoRAConfig`).

use crate::config::PeftConfigBase;
use crate::config::common::{BiasMode, TargetFields};
use crate::config::helpers;
use crate::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An adapter's VB-LoRA settings (`peft_type: "VBLORA"`).
///
/// ```
/// use peft::PeftConfig;
/// let c = PeftConfig::from_json_str(
///     r#"{"peft_type": "VBLORA", "num_vectors": 64, "vector_length": 16, "target_modules": ["q_proj"]}"#,
/// )?;
/// c.validate()?;
/// let PeftConfig::VbLora(v) = &c else { unreachable!() };
/// assert_eq!((v.r, v.topk, v.num_vectors, v.vector_length), (4, 2, 64, 16));
/// # Ok::<(), peft::PeftError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VbLoraConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `target_modules`, `exclude_modules`, `layers_to_transform`, `layers_pattern`, `modules_to_save`.
    #[serde(flatten)]
    pub targets: TargetFields,
    /// `r`: the rank of the composed `A` `[r, in]` and `B` `[out, r]` (default 4).
    pub r: usize,
    /// `num_vectors`: the number of vectors in the shared vector bank (default 256).
    pub num_vectors: usize,
    /// `vector_length`: the length of each bank vector (default 256); every targeted layer's `in_features`
    /// and `out_features` must be multiples of it.
    pub vector_length: usize,
    /// `topk`: how many bank vectors each sub-vector of `A` / `B` mixes (default 2).
    pub topk: usize,
    /// `save_only_topk_weights` (default `false`): the file holds, per logits tensor, the `topk` indices
    /// (`…_topk_indices`, the smallest integer type that holds `num_vectors`) and the first `topk − 1`
    /// softmax weights (`…_topk_weights`) instead of the logits. Such an adapter is for inference and
    /// merging only (as in PEFT: training it is refused).
    pub save_only_topk_weights: bool,
    /// `vblora_dropout`: dropout on the adapter's input, in training (default 0).
    pub vblora_dropout: f64,
    /// `fan_in_fan_out` (default `false`): PEFT sets it for each layer it wraps (true for a GPT-2 Conv1D,
    /// false for a Linear), so the saved value is the last targeted layer's.
    pub fan_in_fan_out: bool,
    /// `bias` (default `"none"`): only `"none"` is supported.
    pub bias: BiasMode,
    /// `init_vector_bank_bound`: a fresh vector bank is drawn from `U(−bound, bound)` (default 0.02).
    pub init_vector_bank_bound: f64,
    /// `init_logits_std`: fresh logits are drawn from `N(0, std²)` (default 0.1).
    pub init_logits_std: f64,
    /// Keys PEFT 0.21.2's `VBLoRAConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for VbLoraConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            targets: TargetFields::default(),
            r: 4,
            num_vectors: 256,
            vector_length: 256,
            topk: 2,
            save_only_topk_weights: false,
            vblora_dropout: 0.0,
            fan_in_fan_out: false,
            bias: BiasMode::None,
            init_vector_bank_bound: 0.02,
            init_logits_std: 0.1,
            extra: Map::new(),
        }
    }
}

impl VbLoraConfig {
    /// PEFT's checks ([`PeftError::InvalidConfig`]): `layers_pattern` needs `layers_to_transform`, `r` and
    /// `topk` positive (PEFT's `update_layer`), and what would make torch raise: `num_vectors` and
    /// `vector_length` positive, `topk` at most `num_vectors` (`topk` out of range), `vblora_dropout` at most
    /// 1, `init_vector_bank_bound` and `init_logits_std` finite and not negative. Refused as not implemented
    /// ([`PeftError::Unsupported`]): `bias` other than `"none"`.
    pub fn validate(&self) -> Result<()> {
        helpers::check_layers_pattern(
            self.targets.layers_to_transform.as_ref(),
            self.targets.layers_pattern.as_ref(),
        )?;
        let invalid = |m: String| Err(PeftError::InvalidConfig(m));
        if self.r == 0 {
            return invalid("VB-LoRA: `r` 0 should be a positive integer value".into());
        }
        if self.topk == 0 {
            return invalid("VB-LoRA: `topk` 0 should be a positive integer value".into());
        }
        if self.num_vectors == 0 {
            return invalid("VB-LoRA: `num_vectors` must be a positive integer; got 0".into());
        }
        if self.vector_length == 0 {
            return invalid("VB-LoRA: `vector_length` must be a positive integer; got 0".into());
        }
        if self.topk > self.num_vectors {
            return invalid(format!(
                "VB-LoRA: `topk` {} is larger than `num_vectors` {} (torch's topk: selected index k out of \
                 range)",
                self.topk, self.num_vectors
            ));
        }
        helpers::check_probability("vblora_dropout", self.vblora_dropout)?;
        for (field, v) in [
            ("init_vector_bank_bound", self.init_vector_bank_bound),
            ("init_logits_std", self.init_logits_std),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return invalid(format!(
                    "VB-LoRA: `{field}` must be a finite value of at least 0, got {v}"
                ));
            }
        }
        if self.bias != BiasMode::None {
            return Err(PeftError::Unsupported {
                field: "bias".into(),
                value: self.bias.as_str().into(),
                reason: "VB-LoRA adapters train no biases in peft-rs (only \"none\")".into(),
            });
        }
        helpers::refuse_unknown_keys(&self.extra, "VBLoRAConfig")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PeftConfig;

    /// `VBLoRAConfig(target_modules=["lin0", "lin1"], r=2, num_vectors=10, vector_length=8)` saved by PEFT
    /// 0.21.2 (`auto_mapping` removed).
    const PEFT_JSON: &str = r#"{
  "auto_mapping": null,
  "base_model_name_or_path": null,
  "bias": "none",
  "exclude_modules": null,
  "fan_in_fan_out": false,
  "inference_mode": true,
  "init_logits_std": 0.1,
  "init_vector_bank_bound": 0.02,
  "layers_pattern": null,
  "layers_to_transform": null,
  "modules_to_save": null,
  "num_vectors": 10,
  "peft_type": "VBLORA",
  "peft_version": "0.21.2",
  "r": 2,
  "revision": null,
  "save_only_topk_weights": false,
  "target_modules": [
    "lin0",
    "lin1"
  ],
  "task_type": null,
  "topk": 2,
  "vblora_dropout": 0.0,
  "vector_length": 8
}"#;

    #[test]
    fn peft_file_round_trips_byte_for_byte() {
        let cfg = PeftConfig::from_json_str(PEFT_JSON).expect("parses");
        cfg.validate().expect("supported");
        assert_eq!(cfg.to_json_string(), PEFT_JSON);
        let PeftConfig::VbLora(c) = &cfg else {
            panic!("not VB-LoRA")
        };
        assert_eq!((c.r, c.num_vectors, c.vector_length, c.topk), (2, 10, 8, 2));
    }

    #[test]
    fn defaults_and_checks() {
        let c = VbLoraConfig::default();
        assert_eq!((c.r, c.num_vectors, c.vector_length, c.topk), (4, 256, 256, 2));
        assert_eq!((c.init_vector_bank_bound, c.init_logits_std), (0.02, 0.1));
        c.validate().expect("defaults are valid");
        for (bad, field) in [
            (r#"{"peft_type": "VBLORA", "r": 0}"#, "`r`"),
            (r#"{"peft_type": "VBLORA", "topk": 0}"#, "`topk`"),
            (r#"{"peft_type": "VBLORA", "num_vectors": 0}"#, "`num_vectors`"),
            (r#"{"peft_type": "VBLORA", "vector_length": 0}"#, "`vector_length`"),
            (r#"{"peft_type": "VBLORA", "num_vectors": 3, "topk": 4}"#, "`topk`"),
            (r#"{"peft_type": "VBLORA", "vblora_dropout": 1.5}"#, "`vblora_dropout`"),
            (r#"{"peft_type": "VBLORA", "init_logits_std": -0.1}"#, "`init_logits_std`"),
            (
                r#"{"peft_type": "VBLORA", "init_vector_bank_bound": -1}"#,
                "`init_vector_bank_bound`",
            ),
            (
                r#"{"peft_type": "VBLORA", "layers_pattern": "layers"}"#,
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
            (r#"{"peft_type": "VBLORA", "bias": "vblora_only"}"#, "bias"),
            (r#"{"peft_type": "VBLORA", "bias": "all"}"#, "bias"),
            (r#"{"peft_type": "VBLORA", "use_dora": true}"#, "use_dora"),
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
