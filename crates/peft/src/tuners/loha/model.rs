//! LoHa's hooks (PEFT's `LoHaModel`, a `LycorisTuner`).

use super::config::LoHaConfig;
use super::layer::{LoHaAdapter, LoHaOptions, PARAM_PREFIXES};
use crate::config::common::TargetFields;
use crate::layer::{Adapter, BaseLayer};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TensorInfo};
use crate::{PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;
use crate::tuners::lycoris_utils::lycoris_summary;

impl PeftMethod for LoHaConfig {
    fn validate(&self) -> Result<()> {
        LoHaConfig::validate(self)
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
        let opts = LoHaOptions::from_config(self, module);
        Ok(Box::new(LoHaAdapter::from_tensors(base, opts, tensors)?))
    }

    fn new_adapter(
        &self,
        module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        let opts = LoHaOptions::from_config(self, module);
        Ok(Box::new(LoHaAdapter::new(base, opts, rng)?))
    }

    /// Rank and alpha from the config (patterns included), `alpha / r`, and `cp` for a CP-decomposed Conv2d.
    fn summarize_module(&self, module: &str, tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        let (r, alpha) = self.rank_and_alpha_for(module);
        lycoris_summary(r, alpha, tensors)
    }
}
