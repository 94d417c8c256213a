//! `PrefixTuningConfig`, field for field with PEFT 0.21.2's `tuners/prefix_tuning/config.py`.

use crate::config::helpers;
use crate::config::{PeftConfigBase, PromptLearningBase};
use crate::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An adapter's prefix-tuning settings (`peft_type: "PREFIX_TUNING"`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PrefixTuningConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// The fields of every prompt-learning config.
    #[serde(flatten)]
    pub prompt: PromptLearningBase,
    /// `init_weights`: `null` for random prefixes, `"zero"` for prefixes that start as a no-op (default `null`).
    pub init_weights: Option<String>,
    /// `encoder_hidden_size`: the hidden size of the projection MLP (default `null`).
    pub encoder_hidden_size: Option<usize>,
    /// `prefix_projection`: produce the prefixes through an MLP (default `false`). The saved adapter holds only
    /// the projected prefixes.
    pub prefix_projection: bool,
    /// Keys PEFT 0.21.2's `PrefixTuningConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl PrefixTuningConfig {
    /// PEFT's checks ([`PeftError::InvalidConfig`]): `num_virtual_tokens` set, `init_weights` `null` or
    /// `"zero"`. Nothing of prefix tuning is refused.
    pub fn validate(&self) -> Result<()> {
        self.prompt.validate()?;
        match &self.init_weights {
            Some(init) if init != "zero" => {
                return Err(PeftError::InvalidConfig(format!(
                    "`init_weights` must be null or \"zero\", got {init:?}"
                )));
            }
            _ => {}
        }
        helpers::refuse_unknown_keys(&self.extra, "PrefixTuningConfig")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PeftConfig;

    /// `PrefixTuningConfig(num_virtual_tokens=8, task_type="CAUSAL_LM")` saved by PEFT 0.21.2.
    const PEFT_JSON: &str = r#"{
  "auto_mapping": null,
  "base_model_name_or_path": null,
  "encoder_hidden_size": null,
  "inference_mode": true,
  "init_weights": null,
  "modules_to_save": null,
  "num_attention_heads": null,
  "num_layers": null,
  "num_transformer_submodules": null,
  "num_virtual_tokens": 8,
  "peft_type": "PREFIX_TUNING",
  "peft_version": "0.21.2",
  "prefix_projection": false,
  "revision": null,
  "task_type": "CAUSAL_LM",
  "token_dim": null
}"#;

    #[test]
    fn peft_file_round_trips_byte_for_byte() {
        let cfg = PeftConfig::from_json_str(PEFT_JSON).expect("parses");
        cfg.validate().expect("supported");
        assert_eq!(cfg.to_json_string(), PEFT_JSON);
        let PeftConfig::PrefixTuning(c) = &cfg else {
            panic!("not prefix tuning")
        };
        assert_eq!(c.prompt.num_virtual_tokens, Some(8));
        assert!(!c.prefix_projection);
    }

    #[test]
    fn init_weights_and_projection() {
        let ok = r#"{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "init_weights": "zero",
            "prefix_projection": true, "encoder_hidden_size": 64, "token_dim": 32, "num_layers": 2,
            "num_attention_heads": 4, "num_transformer_submodules": 1}"#;
        let cfg = PeftConfig::from_json_str(ok).expect("parses");
        cfg.validate().expect("supported");
        let PeftConfig::PrefixTuning(c) = &cfg else {
            panic!()
        };
        assert_eq!(
            (c.encoder_hidden_size, c.prompt.num_layers),
            (Some(64), Some(2))
        );
        let bad =
            r#"{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 4, "init_weights": "ones"}"#;
        let e = PeftConfig::from_json_str(bad).expect("parses").validate();
        assert!(matches!(e, Err(PeftError::InvalidConfig(_))));
    }
}
