//! PEANuT's hooks (PEFT's `PeanutModel`).

use super::config::PeanutConfig;
use super::layer::{PARAM_PREFIXES, PeanutAdapter};
use crate::config::common::TargetFields;
use crate::layer::{Adapter, BaseLayer};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TensorInfo};
use crate::{PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

impl PeftMethod for PeanutConfig {
    fn validate(&self) -> Result<()> {
        PeanutConfig::validate(self)
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

    fn build_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        tensors: &IndexMap<String, Tensor>,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(PeanutAdapter::from_tensors(base, self, tensors)?))
    }

    fn new_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(PeanutAdapter::new(base, self, rng)?))
    }

    /// The width `r` (from `peanut_A`), the depth and the activation.
    fn summarize_module(&self, _module: &str, tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        let r = tensors
            .iter()
            .find(|t| t.name == "peanut_A.weight")
            .and_then(|t| t.shape.first().copied());
        ModuleSummary {
            r,
            scaling: Some(self.scaling),
            flags: vec![format!("depth={}", self.depth), self.act_fn.clone()],
            ..Default::default()
        }
    }
}
