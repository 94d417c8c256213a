//! AdaLoRA's hooks (PEFT's `AdaLoraModel`).

use super::config::AdaLoraConfig;
use super::layer::{AdaLoraAdapter, AdaLoraOptions, keep_masked_rows};
use crate::config::common::{TargetFields, TargetModules};
use crate::layer::{Adapter, BaseLayer, NamedTensor};
use crate::tuners::constants::{ADALORA_TARGET_MODULES, lookup};
use crate::tuners::method::{PeftMethod, SharedTensors};
use crate::{PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

/// The parameter names of AdaLoRA's tensors in a file key: bare parameters, no `.weight`.
pub const PARAM_PREFIXES: &[&str] = &["lora_A", "lora_B", "lora_E"];

impl PeftMethod for AdaLoraConfig {
    fn validate(&self) -> Result<()> {
        AdaLoraConfig::validate(self)
    }

    fn target_fields(&self) -> Option<&TargetFields> {
        Some(&self.targets)
    }

    fn target_fields_mut(&mut self) -> Option<&mut TargetFields> {
        Some(&mut self.targets)
    }

    fn default_target_modules(&self, model_type: &str) -> Option<TargetModules> {
        lookup(ADALORA_TARGET_MODULES, model_type)
    }

    fn fan_in_fan_out(&self) -> bool {
        self.lora.fan_in_fan_out
    }

    fn param_prefixes(&self) -> Result<&'static [&'static str]> {
        Ok(PARAM_PREFIXES)
    }

    fn is_additive(&self) -> bool {
        true
    }

    /// With a `rank_pattern` (an adapter trained here), only the rows the masks keep.
    fn saved_tensors(&self, module: &str, tensors: Vec<NamedTensor>) -> Result<Vec<NamedTensor>> {
        if self.rank_pattern.is_none() {
            return Ok(tensors);
        }
        let Some(mask) = AdaLoraOptions::from_config(self, module)?.mask else {
            return Ok(tensors);
        };
        tensors
            .into_iter()
            .map(|(k, t)| {
                let axis = usize::from(k == "lora_B");
                Ok((k, keep_masked_rows(&t, &mask, axis)?))
            })
            .collect()
    }

    fn build_adapter(
        &self,
        module: &str,
        base: &BaseLayer,
        tensors: &IndexMap<String, Tensor>,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        let opts = AdaLoraOptions::from_config(self, module)?;
        Ok(Box::new(AdaLoraAdapter::from_tensors(base, opts, tensors)?))
    }

    fn new_adapter(
        &self,
        module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        let opts = AdaLoraOptions::from_config(self, module)?;
        Ok(Box::new(AdaLoraAdapter::new(base, opts, rng)?))
    }
}
