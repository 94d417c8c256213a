//! HiRA's hooks (PEFT's `HiraModel`).

use super::config::HiraConfig;
use super::layer::{HIRA_A, HIRA_EMBEDDING_A, HiraAdapter, PARAM_PREFIXES};
use crate::config::common::TargetFields;
use crate::layer::{Adapter, BaseKind, BaseLayer, Conv2dSpec};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TensorInfo};
use crate::{PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

impl PeftMethod for HiraConfig {
    fn validate(&self) -> Result<()> {
        HiraConfig::validate(self)
    }

    fn target_fields(&self) -> Option<&TargetFields> {
        Some(&self.targets)
    }

    fn target_fields_mut(&mut self) -> Option<&mut TargetFields> {
        Some(&mut self.targets)
    }

    fn fan_in_fan_out(&self) -> bool {
        self.fan_in_fan_out
    }

    fn param_prefixes(&self) -> Result<&'static [&'static str]> {
        Ok(PARAM_PREFIXES)
    }

    fn build_adapter(
        &self,
        module: &str,
        base: &BaseLayer,
        tensors: &IndexMap<String, Tensor>,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(HiraAdapter::from_tensors(
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
        Ok(Box::new(HiraAdapter::new(base, self, module, rng)?))
    }

    /// Embeddings from `hira_embedding_*`, a Conv2d from a 4-D weight, Linear or Conv1D from a 2-D weight
    /// and `hira_A` `[r, in]`.
    fn infer_kind(
        &self,
        _module: &str,
        params: &IndexMap<String, Tensor>,
        wshape: &[usize],
    ) -> Result<BaseKind> {
        if params.contains_key(HIRA_EMBEDDING_A) {
            return Ok(BaseKind::Embedding);
        }
        Ok(match wshape.len() {
            4 => BaseKind::Conv2d(Conv2dSpec::default()),
            _ => match params.get(HIRA_A) {
                // `[in, out]` (Conv1D) against `hira_A` `[r, in]`; a square weight by `fan_in_fan_out`
                Some(a) if a.rank() == 2 && wshape.len() == 2 => {
                    let n_in = a.dim(1)?;
                    if (wshape[1] != n_in && wshape[0] == n_in)
                        || (wshape[0] == wshape[1] && self.fan_in_fan_out)
                    {
                        BaseKind::Conv1D
                    } else {
                        BaseKind::Linear
                    }
                }
                _ => BaseKind::Linear,
            },
        })
    }

    /// The rank (the first dimension of `hira_A`).
    fn summarize_module(&self, _module: &str, tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        let r = tensors
            .iter()
            .find(|t| t.name == HIRA_A || t.name == HIRA_EMBEDDING_A)
            .and_then(|t| t.shape.first().copied());
        ModuleSummary {
            r,
            ..Default::default()
        }
    }
}
