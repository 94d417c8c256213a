//! GLoRA's hooks (PEFT's `GloraModel`).

use super::config::GloraConfig;
use super::layer::{GloraAdapter, PARAM_PREFIXES};
use crate::config::common::{TargetModules, TargetSpec};
use crate::layer::{Adapter, BaseLayer};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TensorInfo};
use crate::{PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

impl PeftMethod for GloraConfig {
    fn validate(&self) -> Result<()> {
        GloraConfig::validate(self)
    }

    fn modules_to_save(&self) -> Option<&[String]> {
        self.modules_to_save.as_deref()
    }

    fn target_spec(&self) -> Option<TargetSpec<'_>> {
        Some(GloraConfig::target_spec(self))
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
        Ok(Box::new(GloraAdapter::from_tensors(base, self, tensors)?))
    }

    fn new_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(GloraAdapter::new(base, self, rng)?))
    }

    /// The rank (of the `lora` paths) and the three path kinds.
    fn summarize_module(&self, _module: &str, tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        let r = tensors
            .iter()
            .find(|t| t.name == "glora_A.Xd" || t.name == "glora_C.Xd")
            .and_then(|t| t.shape.get(1).copied());
        ModuleSummary {
            r,
            flags: vec![
                format!("A/B {}", self.config_a_b.as_str()),
                format!("C {}", self.config_c.as_str()),
                format!("D/E {}", self.config_d_e.as_str()),
            ],
            ..Default::default()
        }
    }
}
