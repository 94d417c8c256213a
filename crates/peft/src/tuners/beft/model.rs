//! BEFT's hooks (PEFT's `BeftModel`), with PEFT's own table of default targets.

use super::config::BeftConfig;
use super::layer::{BeftAdapter, PARAM_PREFIXES};
use crate::config::common::{TargetModules, TargetSpec};
use crate::layer::{Adapter, BaseLayer};
use crate::tuners::constants::{TargetDefault, lookup};
use crate::tuners::method::{PeftMethod, SharedTensors};
use crate::{PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

/// `TRANSFORMERS_MODELS_TO_BEFT_TARGET_MODULES_MAPPING` (PEFT 0.21.2's `utils/constants.py`).
pub const BEFT_TARGET_MODULES: &[(&str, TargetDefault)] = &[
    ("t5", TargetDefault::List(&["v"])),
    ("mt5", TargetDefault::List(&["v"])),
    ("roberta", TargetDefault::List(&["value"])),
    ("opt", TargetDefault::List(&["v_proj"])),
    ("gptj", TargetDefault::List(&["v_proj"])),
    ("gpt_neo", TargetDefault::List(&["v_proj"])),
    ("bart", TargetDefault::List(&["v_proj"])),
    ("llama", TargetDefault::List(&["v_proj"])),
    ("llama4", TargetDefault::List(&["v_proj"])),
    ("mistral", TargetDefault::List(&["v_proj"])),
    ("mixtral", TargetDefault::List(&["v_proj"])),
    ("bert", TargetDefault::List(&["value"])),
    ("deberta-v2", TargetDefault::List(&["value_proj"])),
    ("phi", TargetDefault::List(&["v_proj"])),
    ("gemma", TargetDefault::List(&["v_proj"])),
    ("gemma2", TargetDefault::List(&["v_proj"])),
    ("gemma3_text", TargetDefault::List(&["v_proj"])),
    ("qwen2", TargetDefault::List(&["v_proj"])),
    ("qwen3", TargetDefault::List(&["v_proj"])),
];

impl PeftMethod for BeftConfig {
    fn validate(&self) -> Result<()> {
        BeftConfig::validate(self)
    }

    fn modules_to_save(&self) -> Option<&[String]> {
        self.modules_to_save.as_deref()
    }

    fn target_spec(&self) -> Option<TargetSpec<'_>> {
        Some(BeftConfig::target_spec(self))
    }

    fn set_target_modules(&mut self, targets: Option<TargetModules>) {
        self.target_modules = targets;
    }

    fn default_target_modules(&self, model_type: &str) -> Option<TargetModules> {
        lookup(BEFT_TARGET_MODULES, model_type)
    }

    fn param_prefixes(&self) -> Result<&'static [&'static str]> {
        Ok(PARAM_PREFIXES)
    }

    fn build_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        tensors: &IndexMap<String, Tensor>,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(BeftAdapter::from_tensors(base, tensors)?))
    }

    fn new_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(BeftAdapter::new(base, self, rng)?))
    }
}
