//! `TrainableTokensConfig`, field for field with PEFT 0.21.2's `tuners/trainable_tokens/config.py`.

use crate::config::PeftConfigBase;
use crate::config::common::{TargetModules, TargetSpec};
use crate::config::helpers;
use crate::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An adapter's trainable-tokens settings (`peft_type: "TRAINABLE_TOKENS"`).
///
/// ```
/// use peft::PeftConfig;
/// let c = PeftConfig::from_json_str(r#"{"peft_type": "TRAINABLE_TOKENS", "token_indices": [5, 7]}"#)?;
/// c.validate()?;
/// # Ok::<(), peft::PeftError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainableTokensConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `token_indices` (default `[]`): the rows (token ids) that train.
    pub token_indices: Vec<usize>,
    /// `target_modules` (default `null`: the model's input embedding, `model.embed_tokens` in the Llama family).
    pub target_modules: Option<TargetModules>,
    /// `init_weights` (default `true`): the new rows start as the original ones (the identity); `false` draws
    /// them from N(0, 1).
    pub init_weights: bool,
    /// Keys PEFT 0.21.2's `TrainableTokensConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for TrainableTokensConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            token_indices: Vec::new(),
            target_modules: None,
            init_weights: true,
            extra: Map::new(),
        }
    }
}

impl TrainableTokensConfig {
    /// Which modules the adapter wraps (PEFT's config has no `exclude_modules`, layer selection or
    /// `modules_to_save`).
    pub fn target_spec(&self) -> TargetSpec<'_> {
        TargetSpec {
            target_modules: self.target_modules.as_ref(),
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            modules_to_save: None,
        }
    }

    /// At least one token (an empty list trains nothing), and no unknown keys set.
    pub fn validate(&self) -> Result<()> {
        if self.token_indices.is_empty() {
            return Err(PeftError::InvalidConfig(
                "TRAINABLE_TOKENS: `token_indices` is empty, there is nothing to train".into(),
            ));
        }
        helpers::refuse_unknown_keys(&self.extra, "TrainableTokensConfig")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PeftConfig;

    /// `TrainableTokensConfig(token_indices=[1, 5], target_modules="model.embed_tokens")` as PEFT 0.21.2's
    /// `save_pretrained` writes it.
    const PEFT_JSON: &str = r#"{
  "auto_mapping": null,
  "base_model_name_or_path": null,
  "inference_mode": true,
  "init_weights": true,
  "peft_type": "TRAINABLE_TOKENS",
  "peft_version": "0.21.2",
  "revision": null,
  "target_modules": "model.embed_tokens",
  "task_type": "CAUSAL_LM",
  "token_indices": [
    1,
    5
  ]
}"#;

    #[test]
    fn peft_file_round_trips_and_checks() {
        let c = PeftConfig::from_json_str(PEFT_JSON).unwrap();
        c.validate().unwrap();
        assert_eq!(c.to_json_string(), PEFT_JSON);
        let PeftConfig::TrainableTokens(t) = &c else {
            panic!()
        };
        assert_eq!(t.token_indices, [1, 5]);
        let d: TrainableTokensConfig = serde_json::from_str("{}").unwrap();
        assert!(d.init_weights && d.token_indices.is_empty() && d.target_modules.is_none());
        assert!(d.validate().unwrap_err().to_string().contains("token_indices"));
        let e = PeftConfig::from_json_str(
            r#"{"peft_type": "TRAINABLE_TOKENS", "token_indices": [1], "modules_to_save": ["x"]}"#,
        )
        .unwrap()
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("modules_to_save"), "{e}");
    }
}
