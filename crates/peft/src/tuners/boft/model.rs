//! BOFT's hooks (PEFT's `BOFTModel`).

use super::config::BoftConfig;
use super::layer::{BoftAdapter, PARAM_PREFIXES};
use crate::config::common::TargetFields;
use crate::layer::{Adapter, BaseLayer};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TensorInfo};
use crate::{PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

impl PeftMethod for BoftConfig {
    fn validate(&self) -> Result<()> {
        BoftConfig::validate(self)
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
        Ok(Box::new(BoftAdapter::from_tensors(self, base, tensors)?))
    }

    fn new_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(BoftAdapter::new(self, base, rng)?))
    }

    /// Butterfly factors, blocks and block size from `boft_R` (`[factors, blocks, bs, bs]`; the factor count
    /// is read from the file, since stock CPU PEFT saves one factor whatever the config says).
    fn summarize_module(&self, _module: &str, tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        let mut flags = Vec::new();
        if let Some(t) = tensors.iter().find(|t| t.name == "boft_R")
            && let [factors, blocks, bs, _] = t.shape[..]
        {
            flags.push(format!("butterfly_factors={factors}"));
            flags.push(format!("blocks={blocks}"));
            flags.push(format!("block_size={bs}"));
        }
        ModuleSummary {
            flags,
            ..Default::default()
        }
    }
}
