//! DEFT's hooks (PEFT's `DeftModel`).

use super::config::DeftConfig;
use super::layer::{DeftAdapter, PARAM_PREFIXES};
use crate::config::common::{TargetModules, TargetSpec};
use crate::layer::{Adapter, BaseKind, BaseLayer};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TensorInfo};
use crate::{PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

impl PeftMethod for DeftConfig {
    fn validate(&self) -> Result<()> {
        DeftConfig::validate(self)
    }

    fn modules_to_save(&self) -> Option<&[String]> {
        self.modules_to_save.as_deref()
    }

    fn target_spec(&self) -> Option<TargetSpec<'_>> {
        Some(DeftConfig::target_spec(self))
    }

    fn set_target_modules(&mut self, targets: Option<TargetModules>) {
        self.target_modules = targets;
    }

    /// PEFT's `_create_new_module` sets `fan_in_fan_out` from each layer's kind (Conv1D: true), the last
    /// one winning in the saved config.
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

    /// The kind from the base weight and `deft_P` `[out, r]`: a 2-D weight whose first dimension is not
    /// `out` is GPT-2's Conv1D (`[in, out]`); a square one follows `fan_in_fan_out`.
    fn infer_kind(
        &self,
        _module: &str,
        params: &IndexMap<String, Tensor>,
        wshape: &[usize],
    ) -> Result<BaseKind> {
        let out = params.get(super::layer::DEFT_P).and_then(|p| p.dims().first().copied());
        Ok(match (wshape, out) {
            ([o, i], Some(out)) if o != i => {
                if *o == out {
                    BaseKind::Linear
                } else {
                    BaseKind::Conv1D
                }
            }
            _ if self.fan_in_fan_out => BaseKind::Conv1D,
            _ => BaseKind::Linear,
        })
    }

    fn build_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        tensors: &IndexMap<String, Tensor>,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(DeftAdapter::from_tensors(base, self, tensors)?))
    }

    fn new_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(DeftAdapter::new(base, self, rng)?))
    }

    /// The rank (before the per-layer cap), alpha, scale and variant.
    fn summarize_module(&self, _module: &str, tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        let r = tensors
            .iter()
            .find(|t| t.name == super::layer::DEFT_P)
            .and_then(|t| t.shape.get(1).copied())
            .unwrap_or(self.r);
        let mut flags = vec![format!("{:?}", self.decomposition_method).to_lowercase()];
        if self.para {
            flags.push("para".into());
        }
        ModuleSummary {
            r: Some(r),
            alpha: self.alpha,
            scaling: Some(self.scaling(r)),
            flags,
        }
    }
}
