//! C3A's hooks (PEFT's `C3AModel`).

use super::config::C3aConfig;
use super::layer::{C3aAdapter, PARAM_PREFIXES};
use crate::config::common::{TargetModules, TargetSpec};
use crate::layer::{Adapter, BaseLayer};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TensorInfo};
use crate::{PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

impl PeftMethod for C3aConfig {
    fn validate(&self) -> Result<()> {
        C3aConfig::validate(self)
    }

    fn modules_to_save(&self) -> Option<&[String]> {
        self.modules_to_save.as_deref()
    }

    fn target_spec(&self) -> Option<TargetSpec<'_>> {
        Some(C3aConfig::target_spec(self))
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
        module: &str,
        base: &BaseLayer,
        tensors: &IndexMap<String, Tensor>,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(C3aAdapter::from_tensors(
            base, self, module, tensors,
        )?))
    }

    fn new_adapter(
        &self,
        module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(C3aAdapter::new(base, self, module, rng)?))
    }

    /// The block size (patterns applied).
    fn summarize_module(&self, module: &str, _tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        ModuleSummary {
            flags: self
                .block_size_for(module)
                .map(|b| vec![format!("block_size={b}")])
                .unwrap_or_default(),
            ..Default::default()
        }
    }
}
