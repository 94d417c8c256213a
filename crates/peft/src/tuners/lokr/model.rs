//! LoKr's hooks (PEFT's `LoKrModel`, a `LycorisTuner`).

use super::config::LoKrConfig;
use super::layer::{LoKrAdapter, PARAM_PREFIXES};
use crate::config::common::TargetFields;
use crate::layer::{Adapter, BaseLayer};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TensorInfo};
use crate::{PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;
use crate::tuners::lycoris_utils::lycoris_summary;

impl PeftMethod for LoKrConfig {
    fn validate(&self) -> Result<()> {
        LoKrConfig::validate(self)
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
        Ok(Box::new(LoKrAdapter::from_tensors(
            self, module, base, tensors,
        )?))
    }

    fn new_adapter(
        &self,
        module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(LoKrAdapter::new(self, module, base, rng)?))
    }

    /// Rank and alpha from the config (patterns included; never from the shapes, which for small layers are
    /// full matrices), `alpha / r`, and which factorisation the file holds (`cp`, `w1_low_rank`,
    /// `w2_low_rank`).
    fn summarize_module(&self, module: &str, tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        let (r, alpha) = self.rank_and_alpha_for(module);
        lycoris_summary(r, alpha, tensors)
    }
}
