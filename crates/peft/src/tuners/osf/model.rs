//! OSF's hooks (PEFT's `OSFModel`): targets by PEFT's OSF table, else every linear layer; per-module ranks.

use super::config::OsfConfig;
use super::layer::{OsfAdapter, PARAM_PREFIXES, S_LOW};
use crate::config::common::{TargetModules, TargetSpec};
use crate::layer::{Adapter, BaseKind, BaseLayer};
use crate::tuners::constants::{TargetDefault, lookup};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TensorInfo};
use crate::{PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

const ALL_PROJ: TargetDefault = TargetDefault::List(&[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "down_proj",
    "up_proj",
]);

/// `TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING`.
pub const OSF_TARGET_MODULES: &[(&str, TargetDefault)] = &[
    ("llama", ALL_PROJ),
    ("llama4", ALL_PROJ),
    ("mistral", ALL_PROJ),
    ("mixtral", ALL_PROJ),
    ("gemma", ALL_PROJ),
    ("gemma2", ALL_PROJ),
    ("gemma3_text", ALL_PROJ),
    ("qwen2", ALL_PROJ),
    ("qwen3", ALL_PROJ),
    ("phi", ALL_PROJ),
    ("gpt2", TargetDefault::List(&["c_attn", "c_proj"])),
    ("bloom", TargetDefault::List(&["query_key_value", "dense_4h_to_h"])),
    (
        "opt",
        TargetDefault::List(&["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    ),
    (
        "gptj",
        TargetDefault::List(&["q_proj", "k_proj", "v_proj", "out_proj", "fc_in", "fc_out"]),
    ),
    ("gpt_neox", TargetDefault::List(&["query_key_value", "dense_4h_to_h"])),
    ("falcon", TargetDefault::List(&["query_key_value", "dense_4h_to_h"])),
    ("gpt_bigcode", TargetDefault::List(&["c_attn", "c_proj"])),
];

impl PeftMethod for OsfConfig {
    fn validate(&self) -> Result<()> {
        OsfConfig::validate(self)
    }

    fn modules_to_save(&self) -> Option<&[String]> {
        self.modules_to_save.as_deref()
    }

    fn target_spec(&self) -> Option<TargetSpec<'_>> {
        Some(OsfConfig::target_spec(self))
    }

    fn set_target_modules(&mut self, targets: Option<TargetModules>) {
        self.target_modules = targets;
    }

    /// PEFT's OSF table; a model type it lacks gets `all-linear` (OSF's `_prepare_adapter_config`).
    fn default_target_modules(&self, model_type: &str) -> Option<TargetModules> {
        lookup(OSF_TARGET_MODULES, model_type).or_else(|| {
            Some(TargetModules::Regex(
                crate::tuners::tuners_utils::INCLUDE_LINEAR_LAYERS_SHORTHAND.into(),
            ))
        })
    }

    fn param_prefixes(&self) -> Result<&'static [&'static str]> {
        Ok(PARAM_PREFIXES)
    }

    fn is_additive(&self) -> bool {
        true
    }

    fn build_adapter(
        &self,
        module: &str,
        base: &BaseLayer,
        tensors: &IndexMap<String, Tensor>,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(OsfAdapter::from_tensors(base, self, module, tensors)?))
    }

    fn new_adapter(
        &self,
        module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(OsfAdapter::new(base, self, module, rng)?))
    }

    /// Linear layers only.
    fn infer_kind(
        &self,
        _module: &str,
        _params: &IndexMap<String, Tensor>,
        _wshape: &[usize],
    ) -> Result<BaseKind> {
        Ok(BaseKind::Linear)
    }

    /// The trained rank (`S_low`'s length).
    fn summarize_module(&self, _module: &str, tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        ModuleSummary {
            r: tensors
                .iter()
                .find(|t| t.name == S_LOW)
                .and_then(|t| t.shape.first().copied()),
            flags: vec!["trained=low singular directions".into()],
            ..Default::default()
        }
    }
}
