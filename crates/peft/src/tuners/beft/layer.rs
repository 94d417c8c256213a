//! The BEFT adapter for Linear layers (PEFT's `tuners/beft/layer.py`).
//!
//! One bare parameter per layer, `beft_bias` `[1, out]`, added to the base output (the active adapters'
//! biases summed). Merging adds it to the base bias and unmerging subtracts it; a base layer without a bias
//! cannot be merged into, as in PEFT (`Base layer has no bias, cannot merge bias adapter`).

use super::config::BeftConfig;
use crate::layer::{
    Adapter, BaseKind, BaseLayer, CallCtx, MergeInput, Merged, NamedTensor, check_shape,
};
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;

/// The bias parameter's key.
pub const BEFT_BIAS: &str = "beft_bias";

/// The parameter names of BEFT's tensors in a file.
pub const PARAM_PREFIXES: &[&str] = &[BEFT_BIAS];

/// One BEFT adapter inside one Linear layer (an f32 `Var`; the dtype it was created or loaded in is kept
/// for saving).
#[derive(Debug)]
pub struct BeftAdapter {
    bias: Var,
    saved_dtype: DType,
}

fn out_features(base: &BaseLayer) -> Result<usize> {
    match base.kind() {
        BaseKind::Linear => Ok(base.out_features()),
        other => Err(PeftError::Unsupported {
            field: "target_modules".into(),
            value: format!("a {other:?} layer"),
            reason: "BEFT supports only Linear layers (as PEFT: torch.nn.Linear)".into(),
        }),
    }
}

impl BeftAdapter {
    /// A freshly initialised adapter: a zero bias (`init_weights`), else N(0, 1) as PEFT's `torch.randn`.
    pub fn new(base: &BaseLayer, config: &BeftConfig, rng: &mut PeftRng) -> Result<Self> {
        let out = out_features(base)?;
        let dev = base.device();
        let bias = if config.init_weights {
            Tensor::zeros((1, out), DType::F32, dev)?
        } else {
            rng.normal_tensor((1, out), 0.0, 1.0, DType::F32, dev)?
        };
        Ok(Self {
            bias: Var::from_tensor(&bias)?,
            saved_dtype: DType::F32,
        })
    }

    /// An adapter from tensors as PEFT saves them (keys relative to the module, adapter name stripped):
    /// exactly `beft_bias` `[1, out]`.
    pub fn from_tensors(base: &BaseLayer, tensors: &IndexMap<String, Tensor>) -> Result<Self> {
        let out = out_features(base)?;
        let t = tensors
            .get(BEFT_BIAS)
            .ok_or_else(|| PeftError::MissingKey(BEFT_BIAS.to_string()))?;
        check_shape(BEFT_BIAS, t, &[1, out])?;
        let extra: Vec<String> = tensors
            .keys()
            .filter(|k| k.as_str() != BEFT_BIAS)
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        Ok(Self {
            bias: Var::from_tensor(&t.to_dtype(DType::F32)?)?,
            saved_dtype: t.dtype(),
        })
    }

    /// The bias as a vector `[out]`.
    fn vector(&self) -> Result<Tensor> {
        Ok(self.bias.as_tensor().flatten_all()?)
    }

    /// `b ± Δb`, or PEFT's error for a base without a bias.
    fn shifted(&self, input: &MergeInput<'_>, sign: f64) -> Result<(Tensor, Option<Tensor>)> {
        let b = input.bias.ok_or_else(|| {
            PeftError::Invalid(
                "BEFT: the base layer has no bias, cannot merge bias adapter (as PEFT: a BEFT adapter \
                 merges only into a layer with a bias)"
                    .into(),
            )
        })?;
        let d = (self.vector()? * sign)?;
        Ok((input.weight.clone(), Some((b.to_dtype(DType::F32)? + d)?)))
    }
}

impl Adapter for BeftAdapter {
    fn peft_type(&self) -> &'static str {
        "BEFT"
    }

    fn transform_output(
        &self,
        _base: &BaseLayer,
        _x: &Tensor,
        result: Tensor,
        _ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        Ok(result.to_dtype(DType::F32)?.broadcast_add(&self.vector()?)?)
    }

    fn merge(&self, input: MergeInput<'_>) -> Result<Merged> {
        let (weight, bias) = self.shifted(&input, 1.0)?;
        Ok(Merged {
            weight,
            bias,
            cache: None,
        })
    }

    fn unmerge(
        &self,
        input: MergeInput<'_>,
        _cache: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.shifted(&input, -1.0)
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        vec![(BEFT_BIAS.to_string(), self.bias.as_tensor().clone())]
    }

    fn vars(&self) -> Vec<(String, Var)> {
        vec![(BEFT_BIAS.to_string(), self.bias.clone())]
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        format!("beft_bias [1, {}]", self.bias.as_tensor().elem_count())
    }
}
