//! SHiRA's hooks (PEFT's `ShiraModel`).

use super::config::ShiraConfig;
use super::layer::{PARAM_PREFIXES, ShiraAdapter};
use crate::config::common::{TargetModules, TargetSpec};
use crate::layer::{Adapter, BaseLayer};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TensorInfo};
use crate::{PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

impl PeftMethod for ShiraConfig {
    fn validate(&self) -> Result<()> {
        ShiraConfig::validate(self)
    }

    fn modules_to_save(&self) -> Option<&[String]> {
        self.modules_to_save.as_deref()
    }

    fn target_spec(&self) -> Option<TargetSpec<'_>> {
        Some(ShiraConfig::target_spec(self))
    }

    fn set_target_modules(&mut self, targets: Option<TargetModules>) {
        self.target_modules = targets;
    }

    /// LoRA's table, except `phi`: `q_proj`, `v_proj` (PEFT's SHiRA mapping).
    fn default_target_modules(&self, model_type: &str) -> Option<TargetModules> {
        if model_type == "phi" {
            return Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()]));
        }
        crate::tuners::constants::lookup(crate::tuners::constants::LORA_TARGET_MODULES, model_type)
    }

    fn param_prefixes(&self) -> Result<&'static [&'static str]> {
        Ok(PARAM_PREFIXES)
    }

    fn is_additive(&self) -> bool {
        true
    }

    fn build_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        tensors: &IndexMap<String, Tensor>,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(ShiraAdapter::from_tensors(base, self, tensors)?))
    }

    fn new_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(ShiraAdapter::new(base, self, rng)?))
    }

    /// The number of trained entries and the mask.
    fn summarize_module(&self, _module: &str, tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        let mut flags = vec![format!("mask={}", self.mask_type)];
        if let Some(k) = tensors
            .iter()
            .find(|t| t.name == super::layer::WEIGHT)
            .and_then(|t| t.shape.first().copied())
        {
            flags.push(format!("{k} entries"));
        }
        ModuleSummary {
            r: Some(self.r),
            flags,
            ..Default::default()
        }
    }
}
