//! `modules_to_save`: a full trainable copy of a module per adapter (PEFT's `ModulesToSaveWrapper`).
//!
//! PEFT saves the copy under the module's plain name (`base_model.model.fc3.weight`), so in files it looks
//! like a replacement of the base tensors; in a model it is an adapter whose forward ignores the base.

use super::{Adapter, BaseKind, BaseLayer, CallCtx, MergeInput, Merged, NamedTensor, check_shape};
use crate::{PeftError, Result};
use candle_core::{DType, Tensor, Var};

/// The `peft_type` string [`ModulesToSave`] reports.
pub const MODULES_TO_SAVE: &str = "MODULES_TO_SAVE";

/// A trained copy of a whole module's weight and bias.
#[derive(Debug)]
pub struct ModulesToSave {
    weight: Var,
    bias: Option<Var>,
    saved_dtype: DType,
}

impl ModulesToSave {
    /// A copy initialised from the base layer (as PEFT does when it wraps a module).
    pub fn from_base(base: &BaseLayer) -> Result<Self> {
        Ok(Self {
            weight: Var::from_tensor(&base.weight()?.to_dtype(DType::F32)?)?,
            bias: base
                .bias()
                .map(|b| Var::from_tensor(&b.to_dtype(DType::F32)?))
                .transpose()?,
            saved_dtype: base.dtype(),
        })
    }

    /// A copy from saved tensors (`weight`, and `bias` when the base has one), shapes checked against `base`.
    pub fn from_tensors(base: &BaseLayer, weight: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        check_shape("weight", weight, base.weight_dims())?;
        match (base.bias(), bias) {
            (Some(b), Some(t)) => check_shape("bias", t, b.dims())?,
            (None, Some(_)) => return Err(PeftError::UnexpectedKeys(vec!["bias".into()])),
            (Some(_), None) => return Err(PeftError::MissingKey("bias".into())),
            (None, None) => {}
        }
        Ok(Self {
            weight: Var::from_tensor(&weight.to_dtype(DType::F32)?)?,
            bias: bias
                .map(|b| Var::from_tensor(&b.to_dtype(DType::F32)?))
                .transpose()?,
            saved_dtype: weight.dtype(),
        })
    }
}

impl Adapter for ModulesToSave {
    fn peft_type(&self) -> &'static str {
        MODULES_TO_SAVE
    }

    fn transform_output(
        &self,
        base: &BaseLayer,
        x: &Tensor,
        _result: Tensor,
        _ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        let x = if *base.kind() == BaseKind::Embedding {
            x.clone()
        } else {
            x.to_dtype(DType::F32)?
        };
        base.forward_with(
            &x,
            self.weight.as_tensor(),
            self.bias.as_ref().map(|b| b.as_tensor()),
        )
    }

    fn merge(&self, input: MergeInput<'_>) -> Result<Merged> {
        // The original is kept so that unmerge can restore it.
        let cache = match input.bias {
            Some(b) => Tensor::cat(&[input.weight.flatten_all()?, b.clone()], 0)?,
            None => input.weight.flatten_all()?,
        };
        Ok(Merged {
            weight: self.weight.as_tensor().clone(),
            bias: self
                .bias
                .as_ref()
                .map(|b| b.as_tensor().clone())
                .or_else(|| input.bias.cloned()),
            cache: Some(cache),
        })
    }

    fn unmerge(
        &self,
        input: MergeInput<'_>,
        cache: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let cache = cache.ok_or_else(|| {
            PeftError::Invalid("modules_to_save unmerge needs its merge cache".into())
        })?;
        let n = input.weight.elem_count();
        let w = cache.narrow(0, 0, n)?.reshape(input.weight.shape())?;
        let b = match input.bias {
            Some(b) => Some(cache.narrow(0, n, b.elem_count())?),
            None => None,
        };
        Ok((w, b))
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        self.vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect()
    }

    fn vars(&self) -> Vec<(String, Var)> {
        let mut v = vec![("weight".to_string(), self.weight.clone())];
        if let Some(b) = &self.bias {
            v.push(("bias".to_string(), b.clone()));
        }
        v
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        format!("full copy {:?}", self.weight.as_tensor().dims())
    }
}
