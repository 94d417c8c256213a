//! The (IA)³ adapter for Linear, Conv2d and GPT-2 Conv1D layers (PEFT's `tuners/ia3/layer.py`).
//!
//! One learned vector `ia3_l` per layer (a bare parameter: the key has no `.weight`):
//!
//! | base | feedforward (scales the input) | otherwise (scales the output, bias included) |
//! |---|---|---|
//! | Linear `[out, in]`, Conv1D `[in, out]` | `[1, in]`: `y = base(x·l)` | `[out, 1]`: `y = base(x)·l` |
//! | Conv2d `[out, in/g, kh, kw]` | `[1, in, 1, 1]` | `[1, out, 1, 1]` |
//!
//! Merging scales the weight's input columns (feedforward) or output rows and the bias (otherwise); for a
//! Conv1D, whose weight is `[in, out]`, the vector is transposed first (PEFT's `fan_in_fan_out`). Unmerging
//! divides by `l + 1e-8`, exactly as PEFT does, so it is lossy. Several active adapters multiply: PEFT forms
//! the product of their vectors and applies it once; here each applies in turn, which differs only by
//! rounding.
//!
//! Whether a layer is feedforward comes from the config ([`is_feedforward`]). PEFT decides it once per layer,
//! when the layer's first IA3 adapter wraps it; a later adapter on the same layer inherits that decision
//! whatever its own `feedforward_modules` say. Here each adapter follows its own config: the two agree
//! unless two adapters' `feedforward_modules` disagree on a layer.

use super::config::Ia3Config;
use crate::config::common::TargetModules;
use crate::layer::{
    Adapter, BaseKind, BaseLayer, CallCtx, MergeInput, Merged, NamedTensor, check_shape,
};
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;

/// The only tensor key of an IA3 adapter.
pub const IA3_L: &str = "ia3_l";

/// PEFT's tolerance in the unmerge division (`ia3_l + 1e-8`).
const UNMERGE_EPS: f64 = 1e-8;

/// PEFT's `_check_target_module_feedforward`: a list matches with a plain `key.endswith(item)` (no dot
/// boundary, so `["proj"]` also matches `down_proj`), a string with `re.fullmatch`; `None` matches nothing.
pub fn is_feedforward(config: &Ia3Config, module: &str) -> Result<bool> {
    Ok(match &config.feedforward_modules {
        None => false,
        Some(TargetModules::List(items)) => items.iter().any(|i| module.ends_with(i.as_str())),
        Some(TargetModules::Regex(re)) => {
            crate::tuners::tuners_utils::fullmatch(re, module, "feedforward_modules")?
        }
    })
}

/// The settings of one IA3 adapter in one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ia3Options {
    /// Whether the layer scales its input (`feedforward_modules`) rather than its output.
    pub feedforward: bool,
    /// `init_ia3_weights`: start from ones (`false`: standard normal draws, for tests).
    pub init_ia3_weights: bool,
}

impl Ia3Options {
    /// The options for `module` under `config`.
    pub fn from_config(config: &Ia3Config, module: &str) -> Result<Self> {
        Ok(Self {
            feedforward: is_feedforward(config, module)?,
            init_ia3_weights: config.init_ia3_weights,
        })
    }
}

/// One (IA)³ adapter inside one layer. The vector is an f32 `Var`; the dtype it was created or loaded in is
/// kept for saving.
#[derive(Debug)]
pub struct Ia3Adapter {
    kind: BaseKind,
    feedforward: bool,
    l: Var,
    saved_dtype: DType,
}

impl Ia3Adapter {
    /// The shape of `ia3_l` for `base` (PEFT's `update_layer`).
    pub fn shape(base: &BaseLayer, feedforward: bool) -> Result<Vec<usize>> {
        let n = if feedforward {
            base.in_features()
        } else {
            base.out_features()
        };
        match base.kind() {
            BaseKind::Linear | BaseKind::Conv1D if feedforward => Ok(vec![1, n]),
            BaseKind::Linear | BaseKind::Conv1D => Ok(vec![n, 1]),
            BaseKind::Conv2d(_) => Ok(vec![1, n, 1, 1]),
            BaseKind::Embedding => Err(PeftError::Unsupported {
                field: "target_modules".into(),
                value: "an Embedding".into(),
                reason: "IA3 supports only Linear, Conv2d and Conv1D layers (as PEFT)".into(),
            }),
        }
    }

    /// A freshly initialised adapter for `base`: ones (`init_ia3_weights`), else standard normal draws.
    pub fn new(base: &BaseLayer, opts: Ia3Options, rng: &mut PeftRng) -> Result<Self> {
        let shape = Self::shape(base, opts.feedforward)?;
        let dev = base.device();
        let l = if opts.init_ia3_weights {
            Tensor::ones(shape.as_slice(), DType::F32, dev)?
        } else {
            rng.normal_tensor(shape.as_slice(), 0.0, 1.0, DType::F32, dev)?
        };
        Ok(Self {
            kind: *base.kind(),
            feedforward: opts.feedforward,
            l: Var::from_tensor(&l)?,
            saved_dtype: DType::F32,
        })
    }

    /// An adapter from tensors as PEFT saves them (keys relative to the module, adapter name stripped):
    /// exactly one key, `ia3_l`, of the shape `base` and the feedforward decision give.
    pub fn from_tensors(
        base: &BaseLayer,
        opts: Ia3Options,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        let shape = Self::shape(base, opts.feedforward)?;
        let l = tensors
            .get(IA3_L)
            .ok_or_else(|| PeftError::MissingKey(IA3_L.to_string()))?;
        check_shape(IA3_L, l, &shape)?;
        let extra: Vec<String> = tensors.keys().filter(|k| *k != IA3_L).cloned().collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        Ok(Self {
            kind: *base.kind(),
            feedforward: opts.feedforward,
            l: Var::from_tensor(&l.to_dtype(DType::F32)?)?,
            saved_dtype: l.dtype(),
        })
    }

    /// The vector `ia3_l` (f32), in its saved shape.
    pub fn ia3_l(&self) -> &Tensor {
        self.l.as_tensor()
    }

    /// Whether this adapter scales the layer input.
    pub fn is_feedforward(&self) -> bool {
        self.feedforward
    }

    fn check_kind(&self, kind: &BaseKind) -> Result<()> {
        if std::mem::discriminant(&self.kind) != std::mem::discriminant(kind) {
            return Err(PeftError::Invalid(format!(
                "IA3 adapter for {:?} used on a {:?} layer",
                self.kind, kind
            )));
        }
        Ok(())
    }

    /// The vector shaped to broadcast over activations: `[n]` on the last axis for Linear / Conv1D, the saved
    /// `[1, C, 1, 1]` for Conv2d.
    fn activation_scale(&self) -> Result<Tensor> {
        let l = self.l.as_tensor();
        Ok(match self.kind {
            BaseKind::Conv2d(_) => l.clone(),
            _ => l.flatten_all()?,
        })
    }

    /// The vector shaped to broadcast over the weight in its own layout (PEFT's `transpose(l, fan_in_fan_out)`
    /// for Linear / Conv1D and `_get_ia3_scaling_for_weight` for Conv2d).
    fn weight_scale(&self, weight: &Tensor) -> Result<Tensor> {
        let l = self.l.as_tensor();
        Ok(match self.kind {
            BaseKind::Linear | BaseKind::Embedding => l.clone(),
            BaseKind::Conv1D => l.t()?,
            BaseKind::Conv2d(spec) => {
                if !self.feedforward {
                    l.transpose(0, 1)?
                } else if spec.groups == 1 {
                    l.clone()
                } else {
                    let g = spec.groups;
                    let out = weight.dim(0)?;
                    let in_per_group = weight.dim(1)?;
                    l.reshape((g, 1, in_per_group, 1, 1))?
                        .broadcast_as((g, out / g, in_per_group, 1, 1))?
                        .reshape((out, in_per_group, 1, 1))?
                }
            }
        })
    }

    /// `(W, b)` multiplied by the vector (`inverse`: divided by `l + 1e-8`).
    fn apply(&self, input: &MergeInput<'_>, inverse: bool) -> Result<(Tensor, Option<Tensor>)> {
        self.check_kind(input.kind)?;
        let ws = self.weight_scale(input.weight)?;
        let weight = if inverse {
            input.weight.broadcast_div(&(ws + UNMERGE_EPS)?)?
        } else {
            input.weight.broadcast_mul(&ws)?
        };
        let bias = match input.bias {
            Some(b) if !self.feedforward => {
                let s = self.l.as_tensor().reshape(b.dims())?;
                Some(if inverse {
                    (b / (s + UNMERGE_EPS)?)?
                } else {
                    (b * s)?
                })
            }
            b => b.cloned(),
        };
        Ok((weight, bias))
    }
}

impl Adapter for Ia3Adapter {
    fn peft_type(&self) -> &'static str {
        "IA3"
    }

    fn transform_input(&self, base: &BaseLayer, x: Tensor, _ctx: &CallCtx<'_>) -> Result<Tensor> {
        if !self.feedforward {
            return Ok(x);
        }
        self.check_kind(base.kind())?;
        Ok(x.to_dtype(DType::F32)?
            .broadcast_mul(&self.activation_scale()?)?)
    }

    fn transform_output(
        &self,
        base: &BaseLayer,
        _x: &Tensor,
        result: Tensor,
        _ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        if self.feedforward {
            return Ok(result);
        }
        self.check_kind(base.kind())?;
        Ok(result
            .to_dtype(DType::F32)?
            .broadcast_mul(&self.activation_scale()?)?)
    }

    fn merge(&self, input: MergeInput<'_>) -> Result<Merged> {
        let (weight, bias) = self.apply(&input, false)?;
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
        self.apply(&input, true)
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        vec![(IA3_L.to_string(), self.l.as_tensor().clone())]
    }

    fn vars(&self) -> Vec<(String, Var)> {
        vec![(IA3_L.to_string(), self.l.clone())]
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        let what = if self.feedforward {
            "feedforward (scales the input)"
        } else {
            "scales the output"
        };
        format!("ia3_l {:?} {what}", self.l.as_tensor().dims())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::Conv2dSpec;
    use crate::{AdapterSlot, ForwardCtx};
    use candle_core::Device;

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    fn cfg(ff: Option<TargetModules>) -> Ia3Config {
        Ia3Config {
            feedforward_modules: ff,
            ..Default::default()
        }
    }

    #[test]
    fn feedforward_matching_is_plain_endswith_or_fullmatch() {
        let list = cfg(Some(TargetModules::List(vec!["proj".into()])));
        assert!(is_feedforward(&list, "model.layers.0.mlp.down_proj").unwrap());
        let list = cfg(Some(TargetModules::List(vec!["n_proj".into()])));
        assert!(is_feedforward(&list, "model.layers.0.mlp.down_proj").unwrap());
        assert!(!is_feedforward(&list, "model.layers.0.mlp.up_proj").unwrap());
        let re = cfg(Some(TargetModules::Regex(r".*\.down_proj".into())));
        assert!(is_feedforward(&re, "model.layers.0.mlp.down_proj").unwrap());
        let re = cfg(Some(TargetModules::Regex("down_proj".into())));
        assert!(!is_feedforward(&re, "model.layers.0.mlp.down_proj").unwrap());
        assert!(!is_feedforward(&cfg(None), "down_proj").unwrap());
    }

    #[test]
    fn linear_scales_output_with_bias_or_input() {
        let w = t(&[1., 2., 3., 4., 5., 6.], &[3, 2]);
        let b = t(&[1., 1., 1.], &[3]);
        let base = BaseLayer::linear(w, Some(b)).unwrap();
        let x = t(&[1., 1.], &[1, 2]);
        let ctx = ForwardCtx::eval();
        // output: (Wx + b)·l
        let mut slot = AdapterSlot::new("fc", base.clone());
        let mut a = Ia3Adapter::new(
            &base,
            Ia3Options {
                feedforward: false,
                init_ia3_weights: true,
            },
            &mut PeftRng::new(0),
        )
        .unwrap();
        a.l = Var::from_tensor(&t(&[2., 3., 4.], &[3, 1])).unwrap();
        slot.add_adapter("default", Box::new(a)).unwrap();
        let y = slot.forward(&x, &ctx).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![8., 24., 48.]]);
        slot.merge(None).unwrap();
        assert_eq!(
            slot.forward(&x, &ctx).unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![8., 24., 48.]]
        );
        slot.unmerge().unwrap();
        assert_eq!(
            slot.base().bias().unwrap().to_vec1::<f32>().unwrap(),
            vec![1., 1., 1.]
        );
        // feedforward: W(x·l) + b, bias untouched by the merge
        let mut slot = AdapterSlot::new("fc", base.clone());
        let mut a = Ia3Adapter::new(
            &base,
            Ia3Options {
                feedforward: true,
                init_ia3_weights: true,
            },
            &mut PeftRng::new(0),
        )
        .unwrap();
        a.l = Var::from_tensor(&t(&[2., 3.], &[1, 2])).unwrap();
        slot.add_adapter("default", Box::new(a)).unwrap();
        let y = slot.forward(&x, &ctx).unwrap();
        assert_eq!(y.to_vec2::<f32>().unwrap(), vec![vec![9., 19., 29.]]);
        slot.merge(None).unwrap();
        assert_eq!(
            slot.forward(&x, &ctx).unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![9., 19., 29.]]
        );
        assert_eq!(
            slot.base().bias().unwrap().to_vec1::<f32>().unwrap(),
            vec![1., 1., 1.]
        );
    }

    #[test]
    fn grouped_conv_feedforward_merge_equals_forward() {
        let spec = Conv2dSpec {
            groups: 2,
            padding: 1,
            ..Default::default()
        };
        let mut rng = PeftRng::new(3);
        let w = rng
            .normal_tensor(&[6, 2, 3, 3], 0.0, 1.0, DType::F32, &Device::Cpu)
            .unwrap();
        let base = BaseLayer::conv2d(w, None, spec).unwrap();
        let a = Ia3Adapter::new(
            &base,
            Ia3Options {
                feedforward: true,
                init_ia3_weights: false,
            },
            &mut rng,
        )
        .unwrap();
        assert_eq!(a.ia3_l().dims(), &[1, 4, 1, 1]);
        let mut slot = AdapterSlot::new("conv", base);
        slot.add_adapter("default", Box::new(a)).unwrap();
        let x = rng
            .normal_tensor(&[1, 4, 5, 5], 0.0, 1.0, DType::F32, &Device::Cpu)
            .unwrap();
        let ctx = ForwardCtx::eval();
        let y = slot.forward(&x, &ctx).unwrap();
        slot.merge(None).unwrap();
        let ym = slot.forward(&x, &ctx).unwrap();
        let d = peft_test_support::max_diff(&y, &ym);
        assert!(d < 1e-4, "{d}");
    }
}
