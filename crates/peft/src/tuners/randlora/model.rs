//! RandLoRA's hooks (PEFT's `RandLoraModel`): the shared bases, built once per adapter for all its layers.

use super::config::RandLoraConfig;
use super::layer::{GAMMA, LAMBDA, LAYER_A, LAYER_B, RandLoraAdapter, RandLoraBases};
use crate::config::common::{TargetModules, TargetSpec};
use crate::layer::{Adapter, BaseKind, BaseLayer};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TargetLayer, TensorInfo};
use crate::{PeftError, PeftRng, Result};
use candle_core::{Device, Tensor};
use indexmap::IndexMap;

/// The parameter names of RandLoRA's per-layer tensors in a file key (the per-layer copies of the bases
/// included; the shared bases are model-level).
pub const PARAM_PREFIXES: &[&str] = &[LAMBDA, GAMMA, LAYER_A, LAYER_B];

impl PeftMethod for RandLoraConfig {
    fn validate(&self) -> Result<()> {
        RandLoraConfig::validate(self)
    }

    fn modules_to_save(&self) -> Option<&[String]> {
        self.modules_to_save.as_deref()
    }

    fn target_spec(&self) -> Option<TargetSpec<'_>> {
        Some(RandLoraConfig::target_spec(self))
    }

    fn set_target_modules(&mut self, targets: Option<TargetModules>) {
        self.target_modules = targets;
    }

    /// PEFT's RandLoRA mapping is a copy of LoRA's table.
    fn default_target_modules(&self, model_type: &str) -> Option<TargetModules> {
        crate::tuners::constants::lookup(crate::tuners::constants::LORA_TARGET_MODULES, model_type)
    }

    /// PEFT's RandLoRA sets `fan_in_fan_out` on the config for each layer it wraps (true for a Conv1D, false
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

    /// The saved bases when loading with `save_projection`, else the bases generated bit for bit from
    /// `projection_prng_key` over the largest dimensions (PEFT's `_find_dim`).
    fn shared_tensors(
        &self,
        file_shared: Option<&SharedTensors>,
        targets: &[TargetLayer],
        device: &Device,
    ) -> Result<SharedTensors> {
        let p = match file_shared {
            Some(f) => RandLoraBases::resolve(self, f, targets.iter().map(|t| (t.in_features, t.out_features)), device)?,
            None => {
                let fresh = RandLoraConfig {
                    save_projection: false,
                    ..self.clone()
                };
                RandLoraBases::resolve(&fresh, &SharedTensors::new(), targets.iter().map(|t| (t.in_features, t.out_features)), device)?
            }
        };
        Ok(p.to_shared().into_iter().collect())
    }

    fn shares_tensors(&self) -> bool {
        true
    }

    fn saves_shared(&self) -> bool {
        self.save_projection
    }

    fn build_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        tensors: &IndexMap<String, Tensor>,
        shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        let bases = bases(shared)?;
        Ok(Box::new(RandLoraAdapter::from_tensors(
            base, self, &bases, tensors,
        )?))
    }

    fn new_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        let bases = bases(shared)?;
        Ok(Box::new(RandLoraAdapter::new(base, self, &bases, rng)?))
    }

    /// Linear or GPT-2 Conv1D from a 2-D weight: the tensors do not tell `in` from `out`, so a Conv1D is
    /// recognised by `fan_in_fan_out` (which PEFT sets for Conv1D targets and saves).
    fn infer_kind(
        &self,
        _module: &str,
        _params: &IndexMap<String, Tensor>,
        wshape: &[usize],
    ) -> Result<BaseKind> {
        if wshape.len() != 2 {
            return Err(PeftError::Invalid(format!(
                "RandLoRA merges into Linear or Conv1D weights only, got a weight of shape {wshape:?}"
            )));
        }
        Ok(if self.fan_in_fan_out {
            BaseKind::Conv1D
        } else {
            BaseKind::Linear
        })
    }

    /// The rank, alpha, scaling, the number of bases and the kind of bases.
    fn summarize_module(&self, _module: &str, tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        let mut flags = Vec::new();
        if let Some(n) = tensors
            .iter()
            .find(|t| t.name == LAMBDA)
            .and_then(|t| t.shape.get(1).copied())
        {
            flags.push(format!("bases={n}"));
        }
        match self.basis_kind() {
            super::config::BasisKind::Dense => {}
            super::config::BasisKind::Sparse => flags.push("sparse".into()),
            super::config::BasisKind::VerySparse => flags.push("very_sparse".into()),
        }
        ModuleSummary {
            r: Some(self.r),
            alpha: Some(self.randlora_alpha),
            scaling: Some(self.scaling()),
            flags,
        }
    }
}

/// The bases from an adapter's shared tensors; none given is an error that says where they come from.
fn bases(shared: &SharedTensors) -> Result<RandLoraBases> {
    if shared.is_empty() {
        return Err(PeftError::Invalid(
            "RANDLORA layers share model-level tensors: build them with `build_adapter_with_shared` / \
             `new_adapter_with_shared` and the tensors of `shared_tensors`"
                .into(),
        ));
    }
    RandLoraBases::from_shared(shared)
}
