//! GraLoRA's hooks (PEFT's `GraloraModel`).

use super::config::GraloraConfig;
use super::layer::{GraloraAdapter, PARAM_PREFIXES};
use crate::config::common::{TargetModules, TargetSpec};
use crate::layer::{Adapter, BaseLayer};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TensorInfo};
use crate::{PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

impl PeftMethod for GraloraConfig {
    fn validate(&self) -> Result<()> {
        GraloraConfig::validate(self)
    }

    fn modules_to_save(&self) -> Option<&[String]> {
        self.modules_to_save.as_deref()
    }

    fn target_spec(&self) -> Option<TargetSpec<'_>> {
        Some(GraloraConfig::target_spec(self))
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
        Ok(Box::new(GraloraAdapter::from_tensors(base, self, tensors)?))
    }

    fn new_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(GraloraAdapter::new(base, self, rng)?))
    }

    /// The rank, alpha, scale and block count.
    fn summarize_module(&self, _module: &str, _tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        let mut flags = vec![format!("k={}", self.gralora_k)];
        if self.hybrid_r > 0 {
            flags.push(format!("hybrid_r={}", self.hybrid_r));
        }
        ModuleSummary {
            r: Some(self.r),
            alpha: Some(self.alpha),
            scaling: Some(self.alpha / (self.r + self.hybrid_r) as f64),
            flags,
        }
    }
}
