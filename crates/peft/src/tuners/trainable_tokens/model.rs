//! Trainable tokens' hooks (PEFT's `TrainableTokensModel`).

use super::config::TrainableTokensConfig;
use super::layer::{PARAM_PREFIXES, TrainableTokensAdapter};
use crate::config::common::{TargetModules, TargetSpec};
use crate::layer::{Adapter, BaseLayer};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TensorInfo};
use crate::{PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

impl PeftMethod for TrainableTokensConfig {
    fn validate(&self) -> Result<()> {
        TrainableTokensConfig::validate(self)
    }

    fn target_spec(&self) -> Option<TargetSpec<'_>> {
        Some(TrainableTokensConfig::target_spec(self))
    }

    fn set_target_modules(&mut self, targets: Option<TargetModules>) {
        self.target_modules = targets;
    }

    /// The input embedding (PEFT's `_get_input_embeddings_name`): `model.embed_tokens` in the Llama family,
    /// saved as PEFT saves it (one name, matched whole).
    fn default_target_modules(&self, _model_type: &str) -> Option<TargetModules> {
        Some(TargetModules::Regex("model.embed_tokens".into()))
    }

    /// PEFT ties an adapter to the embedding's on the output head that shares its weight.
    fn follows_tied_weights(&self) -> bool {
        true
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
        Ok(Box::new(TrainableTokensAdapter::from_tensors(base, self, tensors)?))
    }

    fn new_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(TrainableTokensAdapter::new(base, self, rng)?))
    }

    /// The number of tokens.
    fn summarize_module(&self, _module: &str, _tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        ModuleSummary {
            flags: vec![format!("{} tokens", self.token_indices.len())],
            ..Default::default()
        }
    }
}
