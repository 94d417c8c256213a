//! OFT's hooks (PEFT's `OFTModel`).

use super::config::OftConfig;
use super::layer::{OftAdapter, PARAM_PREFIXES};
use crate::config::common::TargetFields;
use crate::layer::{Adapter, BaseLayer};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TensorInfo};
use crate::{PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

impl PeftMethod for OftConfig {
    fn validate(&self) -> Result<()> {
        OftConfig::validate(self)
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

    fn build_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        tensors: &IndexMap<String, Tensor>,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(OftAdapter::from_tensors(base, self, tensors)?))
    }

    fn new_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Ok(Box::new(OftAdapter::new(base, self, rng)?))
    }

    /// PEFT refuses OFT files from before 0.14 (no `oft_block_size`): their layout changed.
    fn check_json(map: &serde_json::Map<String, serde_json::Value>, context: &str) -> Result<()> {
        if !map.contains_key("oft_block_size") {
            return Err(crate::PeftError::InvalidConfig(format!(
                "{context}: OFT has been updated since PEFT 0.14.0 and this adapter (no `oft_block_size`) is \
                 incompatible with it; PEFT refuses it too (retrain it, or use PEFT 0.13)"
            )));
        }
        Ok(())
    }

    /// Block size and number of stored blocks from `oft_R.weight` (`[blocks, bs·(bs−1)/2]`), and the
    /// config's Cayley form, COFT and block sharing.
    fn summarize_module(&self, _module: &str, tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        let mut flags = Vec::new();
        if let Some(t) = tensors.iter().find(|t| t.name == "oft_R.weight")
            && let [blocks, packed] = t.shape[..]
        {
            let bs = (1..=4096usize).find(|b| b * (b - 1) / 2 == packed);
            if let Some(bs) = bs {
                flags.push(format!("block_size={bs}"));
            }
            if !self.block_share {
                flags.push(format!("blocks={blocks}"));
            }
        }
        flags.push(if self.use_cayley_neumann {
            format!("neumann_terms={}", self.num_cayley_neumann_terms)
        } else {
            "exact_cayley".into()
        });
        if self.block_share {
            flags.push("block_share (one block for the layer)".into());
        }
        if self.coft {
            flags.push(format!("coft eps={}", self.eps));
        }
        ModuleSummary {
            flags,
            ..Default::default()
        }
    }
}
