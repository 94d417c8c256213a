//! FourierFT's hooks (PEFT's `FourierFTModel`).

use super::config::FourierftConfig;
use super::layer::{FourierftAdapter, PARAM_PREFIXES};
use crate::config::common::{TargetFields, TargetModules};
use crate::layer::{Adapter, BaseKind, BaseLayer};
use crate::tuners::constants::{LORA_TARGET_MODULES, TargetDefault, lookup};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TensorInfo};
use crate::{PeftError, PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

impl PeftMethod for FourierftConfig {
    fn validate(&self) -> Result<()> {
        FourierftConfig::validate(self)
    }

    fn target_fields(&self) -> Option<&TargetFields> {
        Some(&self.targets)
    }

    fn target_fields_mut(&mut self) -> Option<&mut TargetFields> {
        Some(&mut self.targets)
    }

    /// LoRA's table, except `gpt2` and `gpt_bigcode`: `mlp.c_proj` (PEFT's FourierFT mapping).
    fn default_target_modules(&self, model_type: &str) -> Option<TargetModules> {
        if matches!(model_type, "gpt2" | "gpt_bigcode") {
            return Some(TargetDefault::List(&["mlp.c_proj"]).to_target_modules());
        }
        lookup(LORA_TARGET_MODULES, model_type)
    }

    /// PEFT's FourierFT sets `fan_in_fan_out` on the config for each layer it wraps (true for a Conv1D, false
    /// for a Linear), so the saved value is the last targeted layer's.
    fn note_targets(&mut self, targets: &[&BaseLayer]) {
        if let Some(last) = targets.last() {
            self.fan_in_fan_out = *last.kind() == BaseKind::Conv1D;
        }
    }

    fn fan_in_fan_out(&self) -> bool {
        self.fan_in_fan_out
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
        Ok(Box::new(FourierftAdapter::from_tensors(
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
        Ok(Box::new(FourierftAdapter::new(base, self, module, rng)?))
    }

    /// A 2-D weight: a Conv1D (`[in, out]`) when the config says `fan_in_fan_out` (PEFT saves it true after
    /// wrapping a Conv1D), else a Linear. The spectrum's length does not tell the layout.
    fn infer_kind(
        &self,
        _module: &str,
        _params: &IndexMap<String, Tensor>,
        wshape: &[usize],
    ) -> Result<BaseKind> {
        match wshape.len() {
            2 if self.fan_in_fan_out => Ok(BaseKind::Conv1D),
            2 => Ok(BaseKind::Linear),
            _ => Err(PeftError::Invalid(format!(
                "FourierFT merges into Linear or Conv1D weights only, got a weight of shape {wshape:?}"
            ))),
        }
    }

    /// The scaling, `n_frequency` (the spectrum's length) and the seed of the locations.
    fn summarize_module(&self, module: &str, tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        let n = tensors
            .iter()
            .find(|t| t.name == "fourierft_spectrum")
            .and_then(|t| t.shape.first().copied())
            .or_else(|| self.n_frequency_for(module).ok());
        let mut flags: Vec<String> = n.map(|n| format!("n_frequency={n}")).into_iter().collect();
        if let Some(seed) = self.random_loc_seed {
            flags.push(format!("random_loc_seed={seed}"));
        }
        ModuleSummary {
            scaling: Some(self.scaling),
            flags,
            ..Default::default()
        }
    }
}
