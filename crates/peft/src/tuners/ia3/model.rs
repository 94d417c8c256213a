//! What PEFT's `IA3Model` does before injection: default target and feedforward modules by model type
//! (`utils/constants.py`, `TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING` and
//! `TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING`).

use super::config::Ia3Config;
use crate::config::common::TargetModules;
use crate::{PeftError, Result};

/// PEFT 0.21.2's default IA3 targets and feedforward modules, by transformers `model_type`.
pub const IA3_DEFAULTS: &[(&str, &[&str], &[&str])] = &[
    ("t5", &["k", "v", "wo"], &["wo"]),
    ("mt5", &["k", "v", "wi_1"], &[]),
    ("gpt2", &["c_attn", "mlp.c_proj"], &["mlp.c_proj"]),
    (
        "bloom",
        &["query_key_value", "mlp.dense_4h_to_h"],
        &["mlp.dense_4h_to_h"],
    ),
    (
        "roberta",
        &["key", "value", "output.dense"],
        &["output.dense"],
    ),
    ("opt", &["q_proj", "k_proj", "fc2"], &["fc2"]),
    ("gptj", &["q_proj", "v_proj", "fc_out"], &["fc_out"]),
    (
        "gpt_neox",
        &["query_key_value", "dense_4h_to_h"],
        &["dense_4h_to_h"],
    ),
    ("gpt_neo", &["q_proj", "v_proj", "c_proj"], &["c_proj"]),
    ("bart", &["q_proj", "v_proj", "fc2"], &["fc2"]),
    ("gpt_bigcode", &["c_attn", "mlp.c_proj"], &["mlp.c_proj"]),
    ("llama", &["k_proj", "v_proj", "down_proj"], &["down_proj"]),
    ("llama4", &["q_proj", "v_proj", "down_proj"], &["down_proj"]),
    (
        "mistral",
        &["k_proj", "v_proj", "down_proj"],
        &["down_proj"],
    ),
    ("mixtral", &["k_proj", "v_proj", "w2"], &["w2"]),
    ("bert", &["key", "value", "output.dense"], &["output.dense"]),
    (
        "deberta-v2",
        &["key_proj", "value_proj", "output.dense"],
        &["output.dense"],
    ),
    ("deberta", &["in_proj", "output.dense"], &["output.dense"]),
    (
        "RefinedWebModel",
        &["query_key_value", "dense_4h_to_h"],
        &["dense_4h_to_h"],
    ),
    (
        "RefinedWeb",
        &["query_key_value", "dense_4h_to_h"],
        &["dense_4h_to_h"],
    ),
    (
        "falcon",
        &["query_key_value", "dense_4h_to_h"],
        &["dense_4h_to_h"],
    ),
    ("phi", &["q_proj", "v_proj", "fc2"], &["fc2"]),
    ("gemma", &["q_proj", "v_proj", "down_proj"], &["down_proj"]),
    ("gemma2", &["q_proj", "v_proj", "down_proj"], &["down_proj"]),
    (
        "gemma3_text",
        &["q_proj", "v_proj", "down_proj"],
        &["down_proj"],
    ),
    ("qwen2", &["q_proj", "v_proj", "down_proj"], &["down_proj"]),
    ("qwen3", &["q_proj", "v_proj", "down_proj"], &["down_proj"]),
];

fn list(items: &[&str]) -> TargetModules {
    TargetModules::List(items.iter().map(|s| s.to_string()).collect())
}

/// PEFT's `IA3Model._prepare_adapter_config`: a `null` `target_modules` or `feedforward_modules` takes the
/// default of the model type (`None`: a model without one, PEFT's `"custom"`); a type without a default is an
/// error naming the field. Note that PEFT fills `feedforward_modules` from the table even when
/// `target_modules` was given.
pub fn prepare_adapter_config(config: &mut Ia3Config, model_type: Option<&str>) -> Result<()> {
    let defaults = model_type.and_then(|t| IA3_DEFAULTS.iter().find(|(m, _, _)| *m == t));
    if config.target_modules.is_none() {
        let (_, targets, _) = defaults.ok_or_else(|| {
            PeftError::InvalidConfig("Please specify `target_modules` in `peft_config`".into())
        })?;
        config.target_modules = Some(list(targets));
    }
    if config.feedforward_modules.is_none() {
        let (_, _, ff) = defaults.ok_or_else(|| {
            PeftError::InvalidConfig("Please specify `feedforward_modules` in `peft_config`".into())
        })?;
        config.feedforward_modules = Some(list(ff));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_defaults_and_errors() {
        let mut c = Ia3Config::default();
        prepare_adapter_config(&mut c, Some("llama")).unwrap();
        assert_eq!(
            c.target_modules,
            Some(list(&["k_proj", "v_proj", "down_proj"]))
        );
        assert_eq!(c.feedforward_modules, Some(list(&["down_proj"])));
        let mut c = Ia3Config::default();
        let e = prepare_adapter_config(&mut c, None).unwrap_err();
        assert!(e.to_string().contains("target_modules"), "{e}");
        let mut c = Ia3Config {
            target_modules: Some(list(&["fc1"])),
            ..Default::default()
        };
        let e = prepare_adapter_config(&mut c, Some("custom")).unwrap_err();
        assert!(e.to_string().contains("feedforward_modules"), "{e}");
        // explicit targets on a Llama still get Llama's feedforward default, as in PEFT
        let mut c = Ia3Config {
            target_modules: Some(list(&["q_proj", "down_proj"])),
            ..Default::default()
        };
        prepare_adapter_config(&mut c, Some("llama")).unwrap();
        assert_eq!(c.feedforward_modules, Some(list(&["down_proj"])));
    }
}
