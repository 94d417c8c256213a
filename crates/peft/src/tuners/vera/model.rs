//! VeRA's hooks (PEFT's `VeraModel`): the shared projections, built once per adapter for all its layers.

use super::config::VeraConfig;
use super::layer::{VeraAdapter, VeraProjections};
use crate::config::common::{TargetModules, TargetSpec};
use crate::layer::{Adapter, BaseKind, BaseLayer};
use crate::tuners::constants::{LORA_TARGET_MODULES, TargetDefault, lookup};
use crate::tuners::method::{PeftMethod, SharedTensors, TargetLayer};
use crate::{PeftError, PeftRng, Result};
use candle_core::{Device, Tensor};
use indexmap::IndexMap;

/// The parameter names of VeRA's per-layer tensors in a file key (the projections are model-level).
pub const PARAM_PREFIXES: &[&str] = &["vera_lambda_b", "vera_lambda_d"];

impl PeftMethod for VeraConfig {
    fn validate(&self) -> Result<()> {
        VeraConfig::validate(self)
    }

    fn modules_to_save(&self) -> Option<&[String]> {
        self.modules_to_save.as_deref()
    }

    fn target_spec(&self) -> Option<TargetSpec<'_>> {
        Some(VeraConfig::target_spec(self))
    }

    fn set_target_modules(&mut self, targets: Option<TargetModules>) {
        self.target_modules = targets;
    }

    /// LoRA's table, except `phi`: `q_proj`, `v_proj` (PEFT's VeRA mapping).
    fn default_target_modules(&self, model_type: &str) -> Option<TargetModules> {
        if model_type == "phi" {
            return Some(TargetDefault::List(&["q_proj", "v_proj"]).to_target_modules());
        }
        lookup(LORA_TARGET_MODULES, model_type)
    }

    /// PEFT's VeRA sets `fan_in_fan_out` on the config for each layer it wraps (true for a Conv1D, false for a
    /// Linear), so the saved value is the last targeted layer's.
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

    /// The saved projections when loading with `save_projection`, else the projections generated bit for bit
    /// from `projection_prng_key` over the largest dimensions (PEFT's `_find_dim`).
    fn shared_tensors(
        &self,
        file_shared: Option<&SharedTensors>,
        targets: &[TargetLayer],
        device: &Device,
    ) -> Result<SharedTensors> {
        let p = match file_shared {
            Some(f) => VeraProjections::resolve(self, f, targets.iter().map(|t| (t.in_features, t.out_features)), device)?,
            None => {
                let fresh = VeraConfig {
                    save_projection: false,
                    ..self.clone()
                };
                VeraProjections::resolve(&fresh, &SharedTensors::new(), targets.iter().map(|t| (t.in_features, t.out_features)), device)?
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
        let proj = projections(shared)?;
        Ok(Box::new(VeraAdapter::from_tensors(base, self, &proj, tensors)?))
    }

    fn new_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        let proj = projections(shared)?;
        Ok(Box::new(VeraAdapter::new(base, self, &proj, rng)?))
    }

    fn infer_kind(
        &self,
        _module: &str,
        params: &IndexMap<String, Tensor>,
        wshape: &[usize],
    ) -> Result<BaseKind> {
        infer_vera_kind(self, params, wshape)
    }
}

/// The projections from an adapter's shared tensors; none given is an error that says where they come from.
fn projections(shared: &SharedTensors) -> Result<VeraProjections> {
    if shared.is_empty() {
        return Err(PeftError::Invalid(
            "VERA layers share model-level tensors: build them with `build_adapter_with_shared` / \
             `new_adapter_with_shared` and the tensors of `shared_tensors`"
                .into(),
        ));
    }
    VeraProjections::from_shared(shared)
}

/// The layer kind of a VeRA module: Linear (`[out, in]`) or GPT-2 Conv1D (`[in, out]`), from where the length of
/// `vera_lambda_b` (= out) sits in the weight's shape; a square weight is a Conv1D when the config says
/// `fan_in_fan_out` (PEFT sets it for Conv1D targets and saves it).
fn infer_vera_kind(
    config: &VeraConfig,
    params: &IndexMap<String, Tensor>,
    wshape: &[usize],
) -> Result<BaseKind> {
    if wshape.len() != 2 {
        return Err(PeftError::Invalid(format!(
            "VeRA merges into Linear or Conv1D weights only, got a weight of shape {wshape:?}"
        )));
    }
    let out = params.get("vera_lambda_b").map(|l| l.elem_count());
    Ok(match out {
        Some(o) if wshape[1] == o && (wshape[0] != o || config.fan_in_fan_out) => BaseKind::Conv1D,
        _ => BaseKind::Linear, // the adapter's shape check names a mismatch
    })
}

