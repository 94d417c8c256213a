//! DeLoRA's hooks (PEFT's `DeloraModel`).

use super::config::DeloraConfig;
use super::layer::{DeloraAdapter, PARAM_PREFIXES};
use crate::config::common::TargetFields;
use crate::layer::{Adapter, BaseLayer};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TensorInfo};
use crate::{PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

impl PeftMethod for DeloraConfig {
    fn validate(&self) -> Result<()> {
        DeloraConfig::validate(self)
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
        Ok(Box::new(DeloraAdapter::from_tensors(
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
        Ok(Box::new(DeloraAdapter::new(base, self, module, rng)?))
    }

    /// The rank (patterns applied) and `delora_lambda` from the config (the trained λ is in the file).
    fn summarize_module(&self, module: &str, tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        let r = tensors
            .iter()
            .find(|t| t.name == "delora_A")
            .and_then(|t| t.shape.first().copied());
        let lambda = self.rank_and_lambda(module).ok().map(|(_, l)| l);
        ModuleSummary {
            r,
            flags: lambda
                .map(|l| vec![format!("delora_lambda={l} (initial)")])
                .unwrap_or_default(),
            ..Default::default()
        }
    }
}
