//! LoRA's hooks (PEFT's `LoraModel`): what injection, loading, merging and `peft inspect` need.

use super::config::LoraConfig;
use super::layer::{LoraAdapter, LoraOptions};
use crate::config::common::TargetFields;
use crate::config::LoraBias;
use crate::layer::{Adapter, BaseKind, BaseLayer};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TensorInfo};
use crate::tuners::trainable_tokens::TrainableTokensAdapter;
use crate::tuners::trainable_tokens::layer::WRAPPER_PREFIX;
use crate::{PeftError, PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

/// The parameter names of LoRA's tensors in a file key; `token_adapter` is the trainable-tokens wrapper of
/// `trainable_token_indices` (`<module>.token_adapter.trainable_tokens_delta`).
pub const PARAM_PREFIXES: &[&str] = &[
    "lora_A",
    "lora_B",
    "lora_embedding_A",
    "lora_embedding_B",
    "lora_magnitude_vector",
    WRAPPER_PREFIX,
];

/// Whether a module's file tensors are those of LoRA's trainable-tokens wrapper (`token_adapter.…`) rather
/// than LoRA's.
pub fn is_token_adapter_module(params: &IndexMap<String, Tensor>) -> bool {
    !params.is_empty()
        && params
            .keys()
            .all(|k| k.starts_with(&format!("{WRAPPER_PREFIX}.")))
}

impl LoraConfig {
    /// The trainable-tokens adapter of `module` from its file tensors (`token_adapter.…`): the ids come from
    /// `trainable_token_indices` (the list form applies to whichever module the file names, the input
    /// embedding when PEFT wrote it).
    fn token_adapter_from_file(
        &self,
        module: &str,
        base: &BaseLayer,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<TrainableTokensAdapter> {
        if !is_token_adapter_module(tensors) {
            let keys: Vec<String> = tensors.keys().cloned().collect();
            return Err(PeftError::Invalid(format!(
                "module `{module}` holds both LoRA and trainable-token tensors ({}); PEFT cannot wrap a LoRA \
                 layer in trainable tokens",
                keys.join(", ")
            )));
        }
        let tti = self.features.trainable_token_indices.as_ref().ok_or_else(|| {
            PeftError::Invalid(format!(
                "the adapter file holds trainable tokens for `{module}` but the config has no \
                 `trainable_token_indices`"
            ))
        })?;
        let ids = tti.indices_for(module).ok_or_else(|| {
            PeftError::Invalid(format!(
                "the adapter file holds trainable tokens for `{module}`, which `trainable_token_indices` \
                 does not name"
            ))
        })?;
        TrainableTokensAdapter::for_lora_from_tensors(base, ids, tensors)
    }
}

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

    /// Plain LoRA; not DoRA, and not with `trainable_token_indices` (rows are replaced, not added).
    fn is_additive(&self) -> bool {
        !self.lora.use_dora && self.features.trainable_token_indices.is_none()
    }

    /// With `trainable_token_indices`, the output head tied to a trainable embedding follows its rows (PEFT's
    /// tied `TrainableTokensWrapper`).
    fn follows_tied_weights(&self) -> bool {
        self.features.trainable_token_indices.is_some()
    }

    /// PEFT's tied wrapper saves nothing: the file holds the rows under the embedding's name only.
    fn saves_tied_copies(&self) -> bool {
        false
    }

    /// A module holding `token_adapter.…` tensors is a trainable-tokens layer (an Embedding, or a Linear
    /// with the same row-replacement merge); otherwise LoRA's pairs decide.
    fn infer_kind(
        &self,
        _module: &str,
        params: &IndexMap<String, Tensor>,
        wshape: &[usize],
    ) -> Result<BaseKind> {
        if is_token_adapter_module(params) {
            return Ok(BaseKind::Embedding);
        }
        crate::tuners::method::infer_kind_from_pairs(params, wshape, self.lora.fan_in_fan_out)
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
        if tensors.keys().any(|k| k.starts_with(&format!("{WRAPPER_PREFIX}."))) {
            return Ok(Box::new(self.token_adapter_from_file(module, base, tensors)?));
        }
        let opts = LoraOptions::from_config(self, module);
        Ok(Box::new(LoraAdapter::from_tensors(base, opts, tensors)?))
    }

    fn rewrites_base(&self) -> bool {
        self.lora.init_lora_weights.rewrites_base().is_some()
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
        if !tensors.is_empty() && tensors.iter().all(|t| t.name.starts_with(&format!("{WRAPPER_PREFIX}."))) {
            let n = tensors.first().and_then(|t| t.shape.first().copied()).unwrap_or(0);
            return ModuleSummary {
                flags: vec![format!("{n} trainable tokens")],
                ..Default::default()
            };
        }
        let (r, alpha) = self.rank_and_alpha_for(module);
        let mut flags = Vec::new();
        if self.lora.use_rslora {
            flags.push("rslora".into());
        }
        if let Some(init) = self.lora.init_lora_weights.rewrites_base() {
            // The base is rewritten on loading: PEFT and peft-rs run the init again.
            flags.push(format!("init={}", init.as_str()));
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
