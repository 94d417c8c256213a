//! SuperTuning's hooks (PEFT's `SupertuningModel`).

use super::config::SupertuningConfig;
use super::layer::{PARAM_PREFIXES, SupertuningAdapter};
use crate::config::common::{TargetModules, TargetSpec};
use crate::layer::{Adapter, BaseLayer};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TensorInfo};
use crate::{PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

impl PeftMethod for SupertuningConfig {
    fn validate(&self) -> Result<()> {
        SupertuningConfig::validate(self)
    }

    fn modules_to_save(&self) -> Option<&[String]> {
        self.modules_to_save.as_deref()
    }

    fn target_spec(&self) -> Option<TargetSpec<'_>> {
        Some(SupertuningConfig::target_spec(self))
    }

    fn set_target_modules(&mut self, targets: Option<TargetModules>) {
        self.target_modules = targets;
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
        Ok(Box::new(SupertuningAdapter::from_tensors(
            base, self, tensors,
        )?))
    }

    fn new_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(SupertuningAdapter::new(base, self, rng)?))
    }

    /// The number of trained entries, and the LoRA rank of Supra mode.
    fn summarize_module(&self, _module: &str, tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        let k = tensors
            .iter()
            .find(|t| t.name == "supertuning_values")
            .and_then(|t| t.shape.first().copied());
        let mut flags = vec![format!("sparsity={}", self.sparsity)];
        if let Some(k) = k {
            flags.push(format!("{k} entries"));
        }
        if !self.select_top {
            flags.push("smallest".into());
        }
        ModuleSummary {
            r: self.r,
            scaling: match (self.r, self.alpha()) {
                (Some(r), Ok(Some(a))) => Some(a / r as f64),
                _ => None,
            },
            flags,
            ..Default::default()
        }
    }
}
