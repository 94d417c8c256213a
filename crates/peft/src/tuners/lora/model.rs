//! LoRA's hooks (PEFT's `LoraModel`): what injection, loading, merging and `peft inspect` need.

use super::config::LoraConfig;
use super::layer::{LoraAdapter, LoraOptions};
use crate::config::common::TargetFields;
use crate::config::LoraBias;
use crate::layer::{Adapter, BaseLayer};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TensorInfo};
use crate::{PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

/// The parameter names of LoRA's tensors in a file key.
pub const PARAM_PREFIXES: &[&str] = &[
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
];

impl PeftMethod for LoraConfig {
    fn validate(&self) -> Result<()> {
        LoraConfig::validate(self)
    }

    fn target_fields(&self) -> Option<&TargetFields> {
        Some(&self.targets)
    }

    fn target_fields_mut(&mut self) -> Option<&mut TargetFields> {
        Some(&mut self.targets)
    }

    fn bias(&self) -> LoraBias {
        self.lora.bias
    }

    fn fan_in_fan_out(&self) -> bool {
        self.lora.fan_in_fan_out
    }

    fn param_prefixes(&self) -> Result<&'static [&'static str]> {
        Ok(PARAM_PREFIXES)
    }

    fn is_additive(&self) -> bool {
        !self.lora.use_dora
    }

    fn merge_name(&self) -> String {
        if self.lora.use_dora { "LORA with DoRA" } else { "LORA" }.to_string()
    }

    fn build_adapter(
        &self,
        module: &str,
        base: &BaseLayer,
        tensors: &IndexMap<String, Tensor>,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        let opts = LoraOptions::from_config(self, module);
        Ok(Box::new(LoraAdapter::from_tensors(base, opts, tensors)?))
    }

    fn new_adapter(
        &self,
        module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        let opts = LoraOptions::from_config(self, module);
        Ok(Box::new(LoraAdapter::new(base, opts, rng)?))
    }

    /// Rank, alpha and scaling with the patterns applied; flags `rslora`, `dora`, `lora_bias`, and
    /// `rank_mismatch` when the file's rank is not the config's.
    fn summarize_module(&self, module: &str, tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        let (r, alpha) = self.rank_and_alpha_for(module);
        let mut flags = Vec::new();
        if self.lora.use_rslora {
            flags.push("rslora".into());
        }
        if self.lora.use_dora
            || tensors
                .iter()
                .any(|t| t.name.starts_with("lora_magnitude_vector"))
        {
            flags.push("dora".into());
        }
        if self.lora.lora_bias || tensors.iter().any(|t| t.name == "lora_B.bias") {
            flags.push("lora_bias".into());
        }
        let file_rank = tensors.iter().find_map(|t| match t.name {
            "lora_A.weight" | "lora_embedding_A" => t.shape.first().copied(),
            _ => None,
        });
        if file_rank.is_some_and(|fr| fr != r) {
            flags.push("rank_mismatch".into());
        }
        ModuleSummary {
            r: Some(r),
            alpha: Some(alpha),
            scaling: Some(self.scaling_for(r, alpha)),
            flags,
        }
    }
}
