//! Serving merged weights to unmodified candle-transformers models.
//!
//! [`MergedBackend`] is a candle [`SimpleBackend`]: a `VarBuilder` over it hands a model the base weights
//! with the adapters merged in, computed tensor by tensor on demand from the memory-mapped base. Any
//! candle-transformers model that loads through a `VarBuilder` runs with the adapters baked in, unmodified.
//!
//! ```no_run
//! # fn main() -> peft::Result<()> {
//! use candle_core::{DType, Device};
//! let vb = peft::varbuilder::merged_var_builder(
//!     "base_model_dir".as_ref(),
//!     &[("adapter_dir".as_ref(), None)],
//!     DType::F32,
//!     &Device::Cpu,
//! )?;
//! // let model = candle_transformers::models::llama::Llama::load(vb, &config)?;
//! # let _ = vb; Ok(()) }
//! ```

use crate::io::BaseModel;
use crate::merge::{MergeAdapter, Merger};
use crate::{PeftError, Result};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::{SimpleBackend, VarBuilder};
use std::path::Path;

/// A `VarBuilder` backend that merges adapters into the base weights on demand.
#[derive(Debug)]
pub struct MergedBackend {
    model: BaseModel,
    merger: Merger,
}

impl MergedBackend {
    /// Opens `base` (a safetensors file or a model directory, sharded or not) and checks the adapters
    /// against it.
    pub fn new(base: &Path, adapters: Vec<MergeAdapter>) -> Result<Self> {
        let model = BaseModel::open(base)?;
        let merger = Merger::new(adapters, &|n: &str| model.shape(n), model.aliases())?;
        Ok(Self { model, merger })
    }

    fn load_base(&self, name: &str) -> Result<Tensor> {
        for (_, f) in &self.model.shards {
            if f.contains(name) {
                return f.load(name, &Device::Cpu);
            }
        }
        Err(PeftError::MissingKey(name.to_string()))
    }

    /// The merged (or untouched) tensor `name`.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        match self.merger.merged_tensor(name, &|n| self.load_base(n))? {
            Some(t) => Ok(t),
            None => self.load_base(name),
        }
    }
}

fn to_candle(e: PeftError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

impl SimpleBackend for MergedBackend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: s,
                got: t.shape().clone(),
            }
            .bt());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.tensor(name)
            .map_err(to_candle)?
            .to_dtype(dtype)?
            .to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.model.shape(name).is_some()
    }
}

/// A `VarBuilder` over `base` with the adapters (`(dir, weight)`, applied in order) merged in.
pub fn merged_var_builder(
    base: &Path,
    adapters: &[(&Path, Option<f64>)],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let adapters = adapters
        .iter()
        .map(|(dir, w)| MergeAdapter::load(dir, *w, &Device::Cpu))
        .collect::<Result<Vec<_>>>()?;
    let backend: Box<dyn SimpleBackend> = Box::new(MergedBackend::new(base, adapters)?);
    Ok(VarBuilder::from_backend(backend, dtype, device.clone()))
}
