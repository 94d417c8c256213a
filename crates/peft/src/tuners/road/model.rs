//! RoAd's hooks (PEFT's `RoadModel`).

use super::config::RoadConfig;
use super::layer::{PARAM_PREFIXES, RoadAdapter};
use crate::config::common::{TargetModules, TargetSpec};
use crate::layer::{Adapter, BaseLayer};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TensorInfo};
use crate::{PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

impl PeftMethod for RoadConfig {
    fn validate(&self) -> Result<()> {
        RoadConfig::validate(self)
    }

    fn modules_to_save(&self) -> Option<&[String]> {
        self.modules_to_save.as_deref()
    }

    fn target_spec(&self) -> Option<TargetSpec<'_>> {
        Some(RoadConfig::target_spec(self))
    }

    fn set_target_modules(&mut self, targets: Option<TargetModules>) {
        self.target_modules = targets;
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
        Ok(Box::new(RoadAdapter::from_tensors(base, self, tensors)?))
    }

    fn new_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(RoadAdapter::new(base, self, rng)?))
    }

    /// The variant and group size.
    fn summarize_module(&self, _module: &str, _tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        ModuleSummary {
            flags: vec![self.variant.clone(), format!("group_size={}", self.group_size)],
            ..Default::default()
        }
    }
}
