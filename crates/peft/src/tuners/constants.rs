//! PEFT 0.21.2's default `target_modules` by transformers `model_type` (`utils/constants.py`), used when an
//! adapter's config leaves `target_modules` null. IA3's own table, with its feedforward modules, is in
//! [`crate::tuners::ia3::model`].

use crate::config::PeftConfig;
use crate::config::common::TargetModules;

/// One default: a list of names, or a regex (PEFT's string form).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetDefault {
    /// Module names matched as `target_modules` lists are.
    List(&'static [&'static str]),
    /// A regex matched with `re.fullmatch`.
    Regex(&'static str),
}

impl TargetDefault {
    /// As a config value.
    pub fn to_target_modules(self) -> TargetModules {
        match self {
            TargetDefault::List(items) => {
                TargetModules::List(items.iter().map(|s| s.to_string()).collect())
            }
            TargetDefault::Regex(re) => TargetModules::Regex(re.to_string()),
        }
    }
}

/// `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`, which PEFT copies for LoHa, LoKr, OFT and BOFT.
pub const LORA_TARGET_MODULES: &[(&str, TargetDefault)] = &[
    ("t5", TargetDefault::List(&["q", "v"])),
    ("mt5", TargetDefault::List(&["q", "v"])),
    ("bart", TargetDefault::List(&["q_proj", "v_proj"])),
    ("gpt2", TargetDefault::List(&["c_attn"])),
    ("bloom", TargetDefault::List(&["query_key_value"])),
    (
        "blip-2",
        TargetDefault::List(&["q", "v", "q_proj", "v_proj"]),
    ),
    ("opt", TargetDefault::List(&["q_proj", "v_proj"])),
    ("gptj", TargetDefault::List(&["q_proj", "v_proj"])),
    ("gpt_neox", TargetDefault::List(&["query_key_value"])),
    ("gpt_neo", TargetDefault::List(&["q_proj", "v_proj"])),
    ("bert", TargetDefault::List(&["query", "value"])),
    ("roberta", TargetDefault::List(&["query", "value"])),
    ("xlm-roberta", TargetDefault::List(&["query", "value"])),
    ("electra", TargetDefault::List(&["query", "value"])),
    (
        "deberta-v2",
        TargetDefault::List(&["query_proj", "value_proj"]),
    ),
    ("deberta", TargetDefault::List(&["in_proj"])),
    ("layoutlm", TargetDefault::List(&["query", "value"])),
    ("llama", TargetDefault::List(&["q_proj", "v_proj"])),
    ("llama4", TargetDefault::List(&["q_proj", "v_proj"])),
    ("chatglm", TargetDefault::List(&["query_key_value"])),
    ("gpt_bigcode", TargetDefault::List(&["c_attn"])),
    ("mpt", TargetDefault::List(&["Wqkv"])),
    ("RefinedWebModel", TargetDefault::List(&["query_key_value"])),
    ("RefinedWeb", TargetDefault::List(&["query_key_value"])),
    ("falcon", TargetDefault::List(&["query_key_value"])),
    ("btlm", TargetDefault::List(&["c_proj", "c_attn"])),
    ("codegen", TargetDefault::List(&["qkv_proj"])),
    ("mistral", TargetDefault::List(&["q_proj", "v_proj"])),
    ("mixtral", TargetDefault::List(&["q_proj", "v_proj"])),
    ("stablelm", TargetDefault::List(&["q_proj", "v_proj"])),
    (
        "phi",
        TargetDefault::List(&["q_proj", "v_proj", "fc1", "fc2"]),
    ),
    ("gemma", TargetDefault::List(&["q_proj", "v_proj"])),
    ("gemma2", TargetDefault::List(&["q_proj", "v_proj"])),
    ("gemma3_text", TargetDefault::List(&["q_proj", "v_proj"])),
    (
        "gemma4",
        TargetDefault::Regex(r".*language_model\..*\.(q_proj|v_proj)"),
    ),
    ("qwen2", TargetDefault::List(&["q_proj", "v_proj"])),
    ("qwen3", TargetDefault::List(&["q_proj", "v_proj"])),
    (
        "nemotron_h",
        TargetDefault::List(&["q_proj", "k_proj", "v_proj", "o_proj"]),
    ),
    (
        "rwkv",
        TargetDefault::List(&["key", "value", "receptance", "output"]),
    ),
    (
        "rwkv7",
        TargetDefault::List(&["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"]),
    ),
];

/// `TRANSFORMERS_MODELS_TO_ADALORA_TARGET_MODULES_MAPPING`.
pub const ADALORA_TARGET_MODULES: &[(&str, TargetDefault)] = &[
    ("t5", TargetDefault::List(&["q", "k", "v", "o", "wi", "wo"])),
    (
        "mt5",
        TargetDefault::List(&["q", "k", "v", "o", "wi_0", "wi_1", "wo"]),
    ),
    (
        "bart",
        TargetDefault::List(&["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    ),
    ("gpt2", TargetDefault::List(&["c_attn"])),
    ("bloom", TargetDefault::List(&["query_key_value"])),
    (
        "opt",
        TargetDefault::List(&["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    ),
    ("gptj", TargetDefault::List(&["q_proj", "v_proj"])),
    ("gpt_neox", TargetDefault::List(&["query_key_value"])),
    ("gpt_neo", TargetDefault::List(&["q_proj", "v_proj"])),
    ("llama", TargetDefault::List(&["q_proj", "v_proj"])),
    ("llama4", TargetDefault::List(&["q_proj", "v_proj"])),
    ("bert", TargetDefault::List(&["query", "value"])),
    (
        "roberta",
        TargetDefault::List(&["query", "key", "value", "dense"]),
    ),
    (
        "deberta-v2",
        TargetDefault::List(&["query_proj", "key_proj", "value_proj", "dense"]),
    ),
    ("gpt_bigcode", TargetDefault::List(&["c_attn"])),
    ("deberta", TargetDefault::List(&["in_proj"])),
    ("gemma", TargetDefault::List(&["q_proj", "v_proj"])),
    ("gemma2", TargetDefault::List(&["q_proj", "v_proj"])),
    ("gemma3_text", TargetDefault::List(&["q_proj", "v_proj"])),
    (
        "gemma4",
        TargetDefault::Regex(r".*language_model\..*\.(q_proj|v_proj)"),
    ),
    ("qwen2", TargetDefault::List(&["q_proj", "v_proj"])),
    ("qwen3", TargetDefault::List(&["q_proj", "v_proj"])),
    (
        "nemotron_h",
        TargetDefault::List(&["q_proj", "k_proj", "v_proj", "o_proj"]),
    ),
];

/// The entry of `model_type` in a table, as a config value.
pub fn lookup(table: &[(&str, TargetDefault)], model_type: &str) -> Option<TargetModules> {
    table
        .iter()
        .find(|(m, _)| *m == model_type)
        .map(|(_, d)| d.to_target_modules())
}

/// The default `target_modules` of `config`'s method for a model of type `model_type`
/// ([`crate::tuners::PeftMethod::default_target_modules`]): LoRA, LoHa, LoKr, OFT and BOFT share LoRA's
/// table, VeRA uses it with `phi` → `q_proj`, `v_proj`, AdaLoRA has its own. `None` for other methods,
/// unknown model types, or no model type.
pub fn default_target_modules(
    config: &PeftConfig,
    model_type: Option<&str>,
) -> Option<TargetModules> {
    config.method().default_target_modules(model_type?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_give_peft_defaults() {
        let lora = PeftConfig::from_json_str(r#"{"peft_type": "LOHA"}"#).unwrap();
        assert_eq!(
            default_target_modules(&lora, Some("llama")),
            Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()]))
        );
        assert_eq!(
            default_target_modules(&lora, Some("phi")),
            Some(TargetModules::List(vec![
                "q_proj".into(),
                "v_proj".into(),
                "fc1".into(),
                "fc2".into()
            ]))
        );
        assert_eq!(default_target_modules(&lora, Some("custom")), None);
        assert_eq!(default_target_modules(&lora, None), None);
        let vera = PeftConfig::from_json_str(r#"{"peft_type": "VERA"}"#).unwrap();
        assert_eq!(
            default_target_modules(&vera, Some("phi")),
            Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()]))
        );
        let ada = PeftConfig::from_json_str(r#"{"peft_type": "ADALORA"}"#).unwrap();
        assert_eq!(default_target_modules(&ada, Some("mistral")), None);
        assert_eq!(
            default_target_modules(&ada, Some("opt")),
            Some(TargetModules::List(
                ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
                    .map(String::from)
                    .to_vec()
            ))
        );
        let ia3 = PeftConfig::from_json_str(r#"{"peft_type": "IA3"}"#).unwrap();
        assert_eq!(default_target_modules(&ia3, Some("llama")), None);
    }
}
