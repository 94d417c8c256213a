//! `PromptTuningConfig`, field for field with PEFT 0.21.2's `tuners/prompt_tuning/config.py`.

use crate::config::helpers;
use crate::config::{PeftConfigBase, PromptLearningBase};
use crate::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `prompt_tuning_init`: how the virtual token embeddings start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PromptTuningInit {
    /// `"TEXT"`: the embeddings of `prompt_tuning_init_text`, tokenized, repeated or cut to length.
    Text,
    /// `"SAMPLE_VOCAB"`: embeddings of tokens sampled from the vocabulary.
    SampleVocab,
    /// `"RANDOM"`: standard normal values.
    #[default]
    Random,
}

/// An adapter's prompt-tuning settings (`peft_type: "PROMPT_TUNING"`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PromptTuningConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// The fields of every prompt-learning config.
    #[serde(flatten)]
    pub prompt: PromptLearningBase,
    /// `prompt_tuning_init` (default `"RANDOM"`).
    pub prompt_tuning_init: PromptTuningInit,
    /// `prompt_tuning_init_text`: the text for `"TEXT"` init (default `null`).
    pub prompt_tuning_init_text: Option<String>,
    /// `tokenizer_name_or_path`: the tokenizer for `"TEXT"` init (default `null`).
    pub tokenizer_name_or_path: Option<String>,
    /// `tokenizer_kwargs`: arguments of `AutoTokenizer.from_pretrained` for `"TEXT"` init (default `null`).
    pub tokenizer_kwargs: Option<Map<String, Value>>,
    /// Keys PEFT 0.21.2's `PromptTuningConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl PromptTuningConfig {
    /// PEFT's checks ([`PeftError::InvalidConfig`]): `num_virtual_tokens` set; `"TEXT"` init needs
    /// `tokenizer_name_or_path` and `prompt_tuning_init_text`; `tokenizer_kwargs` only with `"TEXT"` init.
    /// Nothing of prompt tuning is refused.
    pub fn validate(&self) -> Result<()> {
        self.prompt.validate()?;
        let text = self.prompt_tuning_init == PromptTuningInit::Text;
        if text
            && self
                .tokenizer_name_or_path
                .as_deref()
                .is_none_or(str::is_empty)
        {
            return Err(PeftError::InvalidConfig(
                "when prompt_tuning_init='TEXT', tokenizer_name_or_path must be set".into(),
            ));
        }
        if text && self.prompt_tuning_init_text.is_none() {
            return Err(PeftError::InvalidConfig(
                "when prompt_tuning_init='TEXT', prompt_tuning_init_text must be set".into(),
            ));
        }
        if !text
            && self
                .tokenizer_kwargs
                .as_ref()
                .is_some_and(|m| !m.is_empty())
        {
            return Err(PeftError::InvalidConfig(
                "tokenizer_kwargs only valid when using prompt_tuning_init='TEXT'".into(),
            ));
        }
        helpers::refuse_unknown_keys(&self.extra, "PromptTuningConfig")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PeftConfig;

    /// `PromptTuningConfig(num_virtual_tokens=8, task_type="CAUSAL_LM")` saved by PEFT 0.21.2.
    const PEFT_JSON: &str = r#"{
  "auto_mapping": null,
  "base_model_name_or_path": null,
  "inference_mode": true,
  "modules_to_save": null,
  "num_attention_heads": null,
  "num_layers": null,
  "num_transformer_submodules": null,
  "num_virtual_tokens": 8,
  "peft_type": "PROMPT_TUNING",
  "peft_version": "0.21.2",
  "prompt_tuning_init": "RANDOM",
  "prompt_tuning_init_text": null,
  "revision": null,
  "task_type": "CAUSAL_LM",
  "token_dim": null,
  "tokenizer_kwargs": null,
  "tokenizer_name_or_path": null
}"#;

    #[test]
    fn peft_file_round_trips_byte_for_byte() {
        let cfg = PeftConfig::from_json_str(PEFT_JSON).expect("parses");
        cfg.validate().expect("supported");
        assert!(cfg.is_prompt_learning() && cfg.target_spec().is_none());
        assert_eq!(cfg.to_json_string(), PEFT_JSON);
        let PeftConfig::PromptTuning(c) = &cfg else {
            panic!("not prompt tuning")
        };
        assert_eq!(c.prompt.num_virtual_tokens, Some(8));
        assert_eq!(c.prompt_tuning_init, PromptTuningInit::Random);
    }

    #[test]
    fn text_init_checks() {
        let ok = r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "prompt_tuning_init": "TEXT",
            "prompt_tuning_init_text": "Classify:", "tokenizer_name_or_path": "gpt2", "tokenizer_kwargs": {"use_fast": true},
            "token_dim": 768, "num_transformer_submodules": 1, "num_attention_heads": 12, "num_layers": 12}"#;
        PeftConfig::from_json_str(ok)
            .expect("parses")
            .validate()
            .expect("supported");
        for bad in [
            r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "x"}"#,
            r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "gpt2"}"#,
            r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4, "tokenizer_kwargs": {"a": 1}}"#,
            r#"{"peft_type": "PROMPT_TUNING"}"#,
        ] {
            let e = PeftConfig::from_json_str(bad)
                .expect("parses")
                .validate()
                .expect_err(bad);
            assert!(matches!(e, PeftError::InvalidConfig(_)), "{bad}");
        }
        assert!(
            PeftConfig::from_json_str(
                r#"{"peft_type": "PROMPT_TUNING", "prompt_tuning_init": "ZEROS"}"#
            )
            .is_err()
        );
    }
}
