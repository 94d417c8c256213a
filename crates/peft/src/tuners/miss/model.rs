//! MiSS's hooks (PEFT's `MissModel`).

use super::config::{MissConfig, MissMode};
use super::layer::{MissAdapter, PARAM_PREFIXES};
use crate::config::common::TargetFields;
use crate::layer::{Adapter, BaseLayer};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TensorInfo};
use crate::{PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

impl PeftMethod for MissConfig {
    fn validate(&self) -> Result<()> {
        MissConfig::validate(self)
    }

    fn target_fields(&self) -> Option<&TargetFields> {
        Some(&self.targets)
    }

    fn target_fields_mut(&mut self) -> Option<&mut TargetFields> {
        Some(&mut self.targets)
    }

    fn param_prefixes(&self) -> Result<&'static [&'static str]> {
        Ok(PARAM_PREFIXES)
    }

    /// The default and `"mini"` forms add a fixed `ΔW`; `"bat"`'s update depends on the weight.
    fn is_additive(&self) -> bool {
        !matches!(self.mode(), Ok(MissMode::Bat))
    }

    fn build_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        tensors: &IndexMap<String, Tensor>,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(MissAdapter::from_tensors(base, self, tensors)?))
    }

    fn new_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(MissAdapter::new(base, self, rng)?))
    }

    /// The block size and the form.
    fn summarize_module(&self, _module: &str, _tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        let form = match self.mode() {
            Ok(MissMode::Bat) => "bat".to_string(),
            Ok(MissMode::Mini) => format!("mini (mini_r={})", self.mini_r),
            _ => "miss".to_string(),
        };
        ModuleSummary {
            r: Some(self.r),
            flags: vec![form],
            ..Default::default()
        }
    }
}
