//! `PromptEncoderConfig`, field for field with PEFT 0.21.2's `tuners/p_tuning/config.py`.

use crate::Result;
use crate::config::helpers;
use crate::config::{PeftConfigBase, PromptLearningBase};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `encoder_reparameterization_type`: the network that produces the virtual tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PromptEncoderReparameterizationType {
    /// `"MLP"`: a two-layer MLP.
    #[default]
    Mlp,
    /// `"LSTM"`: a bidirectional LSTM followed by an MLP.
    Lstm,
}

/// An adapter's P-tuning settings (`peft_type: "P_TUNING"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PromptEncoderConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// The fields of every prompt-learning config.
    #[serde(flatten)]
    pub prompt: PromptLearningBase,
    /// `encoder_reparameterization_type` (default `"MLP"`).
    pub encoder_reparameterization_type: PromptEncoderReparameterizationType,
    /// `encoder_hidden_size`: the hidden size of the prompt encoder (default `null`).
    pub encoder_hidden_size: Option<usize>,
    /// `encoder_num_layers` (default 2).
    pub encoder_num_layers: usize,
    /// `encoder_dropout` (default 0.0).
    pub encoder_dropout: f64,
    /// Keys PEFT 0.21.2's `PromptEncoderConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for PromptEncoderConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            prompt: PromptLearningBase::default(),
            encoder_reparameterization_type: PromptEncoderReparameterizationType::Mlp,
            encoder_hidden_size: None,
            encoder_num_layers: 2,
            encoder_dropout: 0.0,
            extra: Map::new(),
        }
    }
}

impl PromptEncoderConfig {
    /// PEFT's checks ([`crate::PeftError::InvalidConfig`]): `num_virtual_tokens` set. Nothing of P-tuning is
    /// refused (MLP and LSTM encoders are both part of the method).
    pub fn validate(&self) -> Result<()> {
        self.prompt.validate()?;
        helpers::refuse_unknown_keys(&self.extra, "PromptEncoderConfig")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PeftConfig;

    /// `PromptEncoderConfig(num_virtual_tokens=8, encoder_hidden_size=32, task_type="CAUSAL_LM")` saved by
    /// PEFT 0.21.2.
    const PEFT_JSON: &str = r#"{
  "auto_mapping": null,
  "base_model_name_or_path": null,
  "encoder_dropout": 0.0,
  "encoder_hidden_size": 32,
  "encoder_num_layers": 2,
  "encoder_reparameterization_type": "MLP",
  "inference_mode": true,
  "modules_to_save": null,
  "num_attention_heads": null,
  "num_layers": null,
  "num_transformer_submodules": null,
  "num_virtual_tokens": 8,
  "peft_type": "P_TUNING",
  "peft_version": "0.21.2",
  "revision": null,
  "task_type": "CAUSAL_LM",
  "token_dim": null
}"#;

    #[test]
    fn peft_file_round_trips_byte_for_byte() {
        let cfg = PeftConfig::from_json_str(PEFT_JSON).expect("parses");
        cfg.validate().expect("supported");
        assert_eq!(cfg.to_json_string(), PEFT_JSON);
        let PeftConfig::PTuning(c) = &cfg else {
            panic!("not P-tuning")
        };
        assert_eq!(c.encoder_hidden_size, Some(32));
        assert_eq!(
            c.encoder_reparameterization_type,
            PromptEncoderReparameterizationType::Mlp
        );
    }

    #[test]
    fn defaults_and_lstm() {
        let cfg = PeftConfig::from_json_str(
            r#"{"peft_type": "P_TUNING", "num_virtual_tokens": 3, "encoder_reparameterization_type": "LSTM"}"#,
        )
        .expect("parses");
        cfg.validate().expect("supported");
        let PeftConfig::PTuning(c) = &cfg else {
            panic!()
        };
        assert_eq!((c.encoder_num_layers, c.encoder_dropout), (2, 0.0));
        assert_eq!(
            c.encoder_reparameterization_type,
            PromptEncoderReparameterizationType::Lstm
        );
        let cfg = PeftConfig::from_json_str(r#"{"peft_type": "P_TUNING"}"#).expect("parses");
        assert!(cfg.validate().is_err());
    }
}
