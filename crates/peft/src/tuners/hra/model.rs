//! HRA's hooks (PEFT's `HRAModel`).

use super::config::HraConfig;
use super::layer::{HRA_U, HraAdapter, PARAM_PREFIXES};
use crate::config::common::TargetFields;
use crate::layer::{Adapter, BaseLayer};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TensorInfo};
use crate::{PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

impl PeftMethod for HraConfig {
    fn validate(&self) -> Result<()> {
        HraConfig::validate(self)
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
        Ok(Box::new(HraAdapter::from_tensors(base, self, tensors)?))
    }

    fn new_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(HraAdapter::new(base, self, rng)?))
    }

    /// The number of reflections from `hra_u` (`[in, r]`) and the Gram–Schmidt flag.
    fn summarize_module(&self, _module: &str, tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        let r = tensors
            .iter()
            .find(|t| t.name == HRA_U)
            .and_then(|t| t.shape.get(1).copied());
        let mut flags = Vec::new();
        if self.apply_gs {
            flags.push("apply_GS".into());
        }
        ModuleSummary {
            r,
            flags,
            ..Default::default()
        }
    }
}
