//! The RoAd adapter for Linear layers (PEFT's `tuners/road/layer.py`).
//!
//! Two bare parameters per layer, `road_theta` and `road_alpha`, of `out/2` (`road_1`), `out` (`road_2`) or
//! `2·out` (`road_4`) elements, give each output feature a pair of coefficients `first = α·cos θ` and
//! `second = α·sin θ` (PEFT's `_prepare_cols`). The output `h` of the base layer becomes
//! `h·first + rotate_half(h)·second`, where, within each group of `group_size` features, `rotate_half` maps
//! the halves `(h₁, h₂)` to `(−h₂, h₁)`: each pair `(k, k + group_size/2)` is rotated and scaled. This acts on
//! the output alone, so merging applies the same map to every column of the weight and to the bias
//! (`W' = R·W`, `b' = R·b`), and unmerging applies its inverse, pair by pair in closed form
//! (`det = f_k f_j + s_k s_j` for the pair `k, j`; PEFT inverts the matrix `R` with `torch.linalg.inv`: the
//! same map up to rounding). Several active adapters apply in turn, in the order of the active list, as in
//! PEFT.

use super::config::RoadConfig;
use crate::layer::{
    Adapter, BaseKind, BaseLayer, CallCtx, MergeInput, Merged, NamedTensor, check_shape,
};
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;

/// The angle parameter's key.
pub const ROAD_THETA: &str = "road_theta";
/// The scale parameter's key.
pub const ROAD_ALPHA: &str = "road_alpha";

/// The parameter names of RoAd's tensors in a file.
pub const PARAM_PREFIXES: &[&str] = &[ROAD_THETA, ROAD_ALPHA];

/// The three variants of PEFT's `RoadVariant`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RoadVariant {
    /// One angle and scale per pair.
    Road1,
    /// One angle and scale per element.
    Road2,
    /// Two angles and scales per element.
    Road4,
}

impl RoadVariant {
    /// From the config's `variant`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "road_1" => Ok(RoadVariant::Road1),
            "road_2" => Ok(RoadVariant::Road2),
            "road_4" => Ok(RoadVariant::Road4),
            other => Err(PeftError::InvalidConfig(format!(
                "RoAd: unsupported variant {other:?} (road_1, road_2 or road_4)"
            ))),
        }
    }

    /// The number of angles (and of scales) for a layer of `out` features.
    pub fn size(self, out: usize) -> usize {
        match self {
            RoadVariant::Road1 => out / 2,
            RoadVariant::Road2 => out,
            RoadVariant::Road4 => 2 * out,
        }
    }
}

/// One RoAd adapter inside one Linear layer (f32 `Var`s; the dtype they were created or loaded in is kept
/// for saving).
#[derive(Debug)]
pub struct RoadAdapter {
    variant: RoadVariant,
    group_size: usize,
    theta: Var,
    alpha: Var,
    saved_dtype: DType,
}

/// The output features of a Linear base, checked against the group size (PEFT's `update_layer`).
fn out_features(base: &BaseLayer, group_size: usize) -> Result<usize> {
    if !matches!(base.kind(), BaseKind::Linear) {
        return Err(PeftError::Unsupported {
            field: "target_modules".into(),
            value: format!("a {:?} layer", base.kind()),
            reason: "RoAd supports only Linear layers (as PEFT: torch.nn.Linear)".into(),
        });
    }
    let out = base.out_features();
    if group_size == 0 || !out.is_multiple_of(group_size) {
        return Err(PeftError::InvalidConfig(format!(
            "RoAd: the out_features of the base layer ({out}) must be divisible by group_size ({group_size})"
        )));
    }
    Ok(out)
}

/// Exchanges the two halves of every group of `gs` features along the last axis of `x` (`[rows, out]`).
fn swap_halves(x: &Tensor, gs: usize) -> Result<Tensor> {
    let (rows, out) = x.dims2()?;
    let g = x.reshape((rows, out / gs, 2, gs / 2))?;
    let a = g.narrow(2, 0, 1)?;
    let b = g.narrow(2, 1, 1)?;
    Ok(Tensor::cat(&[b, a], 2)?.reshape((rows, out))?)
}

impl RoadAdapter {
    /// A freshly initialised adapter: angles 0 and scales 1 (the identity) with `init_weights`, else angles
    /// N(0, 0.5) and scales N(1, 0.5) as PEFT.
    pub fn new(base: &BaseLayer, config: &RoadConfig, rng: &mut PeftRng) -> Result<Self> {
        let variant = RoadVariant::parse(&config.variant)?;
        let out = out_features(base, config.group_size)?;
        let n = variant.size(out);
        let dev = base.device();
        let (theta, alpha) = if config.init_weights {
            (
                Tensor::zeros(n, DType::F32, dev)?,
                Tensor::ones(n, DType::F32, dev)?,
            )
        } else {
            (
                rng.normal_tensor(n, 0.0, 0.5, DType::F32, dev)?,
                rng.normal_tensor(n, 1.0, 0.5, DType::F32, dev)?,
            )
        };
        Ok(Self {
            variant,
            group_size: config.group_size,
            theta: Var::from_tensor(&theta)?,
            alpha: Var::from_tensor(&alpha)?,
            saved_dtype: DType::F32,
        })
    }

    /// An adapter from tensors as PEFT saves them (keys relative to the module, adapter name stripped):
    /// exactly `road_theta` and `road_alpha`, each of the variant's size.
    pub fn from_tensors(
        base: &BaseLayer,
        config: &RoadConfig,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        let variant = RoadVariant::parse(&config.variant)?;
        let out = out_features(base, config.group_size)?;
        let n = variant.size(out);
        let get = |k: &str| -> Result<&Tensor> {
            let t = tensors
                .get(k)
                .ok_or_else(|| PeftError::MissingKey(k.to_string()))?;
            check_shape(k, t, &[n])?;
            Ok(t)
        };
        let (theta, alpha) = (get(ROAD_THETA)?, get(ROAD_ALPHA)?);
        let extra: Vec<String> = tensors
            .keys()
            .filter(|k| !PARAM_PREFIXES.contains(&k.as_str()))
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        Ok(Self {
            variant,
            group_size: config.group_size,
            theta: Var::from_tensor(&theta.to_dtype(DType::F32)?)?,
            alpha: Var::from_tensor(&alpha.to_dtype(DType::F32)?)?,
            saved_dtype: theta.dtype(),
        })
    }

    /// PEFT's `_prepare_cols`: the per-feature coefficients `(first, second)`, each `[out]`.
    pub fn cols(&self) -> Result<(Tensor, Tensor)> {
        let gs = self.group_size;
        let (theta, alpha) = (self.theta.as_tensor(), self.alpha.as_tensor());
        Ok(match self.variant {
            RoadVariant::Road1 => {
                // reshape(-1, gs/2).repeat_interleave(2, dim=0): each half-group's values serve both halves
                let g = theta.dim(0)? / (gs / 2);
                let rep = |t: &Tensor| -> Result<Tensor> {
                    Ok(t.reshape((g, 1, gs / 2))?
                        .broadcast_as((g, 2, gs / 2))?
                        .contiguous()?
                        .reshape(g * gs)?)
                };
                let (theta, alpha) = (rep(theta)?, rep(alpha)?);
                ((&alpha * theta.cos()?)?, (&alpha * theta.sin()?)?)
            }
            RoadVariant::Road2 => ((alpha * theta.cos()?)?, (alpha * theta.sin()?)?),
            RoadVariant::Road4 => {
                let g = theta.dim(0)? / (2 * gs);
                let part = |t: &Tensor, i: usize| -> Result<Tensor> {
                    Ok(t.reshape((g, 2, gs))?
                        .narrow(1, i, 1)?
                        .contiguous()?
                        .reshape(g * gs)?)
                };
                let cos = part(theta, 0)?.cos()?;
                let sin = part(theta, 1)?.sin()?;
                ((part(alpha, 0)? * cos)?, (part(alpha, 1)? * sin)?)
            }
        })
    }

    /// `h·first + rotate_half(h)·second` on rows `h` `[rows, out]`.
    fn apply_rows(&self, h: &Tensor, first: &Tensor, second: &Tensor) -> Result<Tensor> {
        let gs = self.group_size;
        let (rows, out) = h.dims2()?;
        let g = h.reshape((rows, out / gs, 2, gs / 2))?;
        let h1 = g.narrow(2, 0, 1)?;
        let h2 = g.narrow(2, 1, 1)?;
        let rot = Tensor::cat(&[h2.neg()?, h1], 2)?.reshape((rows, out))?;
        Ok((h.broadcast_mul(first)? + rot.broadcast_mul(second)?)?)
    }

    /// The map on the last axis of `h` (any leading shape); `inverse`: its inverse.
    fn apply(&self, h: &Tensor, inverse: bool) -> Result<Tensor> {
        let dims = h.dims().to_vec();
        let out = *dims.last().unwrap_or(&0);
        let rows = h.elem_count() / out.max(1);
        let h2 = h.to_dtype(DType::F32)?.reshape((rows, out))?;
        let (first, second) = self.cols()?;
        let (first, second) = if inverse {
            let (f, s) = (first.unsqueeze(0)?, second.unsqueeze(0)?);
            let (fs, ss) = (swap_halves(&f, self.group_size)?, swap_halves(&s, self.group_size)?);
            let det = ((&f * &fs)? + (&s * &ss)?)?;
            ((fs / &det)?.squeeze(0)?, (s.neg()? / &det)?.squeeze(0)?)
        } else {
            (first, second)
        };
        Ok(self.apply_rows(&h2, &first, &second)?.reshape(dims)?)
    }

    /// `(R·W, R·b)` (`inverse`: `R⁻¹`).
    fn merged(&self, input: &MergeInput<'_>, inverse: bool) -> Result<(Tensor, Option<Tensor>)> {
        if !matches!(input.kind, BaseKind::Linear) {
            return Err(PeftError::Invalid(format!(
                "RoAd adapter merged into a {:?} layer",
                input.kind
            )));
        }
        // R acts on the output axis: on each column of W [out, in], i.e. on the rows of Wᵀ
        let wt = input.weight.to_dtype(DType::F32)?.t()?.contiguous()?;
        let weight = self.apply(&wt, inverse)?.t()?.contiguous()?;
        let bias = match input.bias {
            Some(b) => Some(self.apply(&b.unsqueeze(0)?, inverse)?.squeeze(0)?),
            None => None,
        };
        Ok((weight, bias))
    }
}

impl Adapter for RoadAdapter {
    fn peft_type(&self) -> &'static str {
        "ROAD"
    }

    fn transform_output(
        &self,
        _base: &BaseLayer,
        _x: &Tensor,
        result: Tensor,
        _ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        self.apply(&result, false)
    }

    fn merge(&self, input: MergeInput<'_>) -> Result<Merged> {
        let (weight, bias) = self.merged(&input, false)?;
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
        self.merged(&input, true)
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        vec![
            (ROAD_THETA.to_string(), self.theta.as_tensor().clone()),
            (ROAD_ALPHA.to_string(), self.alpha.as_tensor().clone()),
        ]
    }

    fn vars(&self) -> Vec<(String, Var)> {
        vec![
            (ROAD_THETA.to_string(), self.theta.clone()),
            (ROAD_ALPHA.to_string(), self.alpha.clone()),
        ]
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        format!(
            "{:?} road_theta/road_alpha [{}], group_size={}",
            self.variant,
            self.theta.as_tensor().elem_count(),
            self.group_size
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AdapterSlot, ForwardCtx};
    use candle_core::Device;

    fn config(variant: &str, init_weights: bool) -> RoadConfig {
        RoadConfig {
            variant: variant.into(),
            group_size: 4,
            init_weights,
            ..Default::default()
        }
    }

    #[test]
    fn the_pairs_rotate_as_peft_writes_it() {
        // road_2, one group of 4: pairs (0, 2) and (1, 3); θ = π/2, α = 1 on feature 0 only
        let w = Tensor::eye(4, DType::F32, &Device::Cpu).unwrap();
        let base = BaseLayer::linear(w, None).unwrap();
        let mut a = RoadAdapter::new(&base, &config("road_2", true), &mut PeftRng::new(0)).unwrap();
        let theta = Tensor::new(&[std::f32::consts::FRAC_PI_2, 0., 0., 0.], &Device::Cpu).unwrap();
        a.theta = Var::from_tensor(&theta).unwrap();
        let h = Tensor::new(&[[1f32, 2., 3., 4.]], &Device::Cpu).unwrap();
        let y = a.apply(&h, false).unwrap().to_vec2::<f32>().unwrap();
        // feature 0: h0·cos + (−h2)·sin = −3; the others unchanged
        let want = [-3f32, 2., 3., 4.];
        for (g, w) in y[0].iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{y:?}");
        }
    }

    #[test]
    fn every_variant_merges_unmerges_and_inverts() {
        for variant in ["road_1", "road_2", "road_4"] {
            let mut rng = PeftRng::new(5);
            let w = rng
                .normal_tensor(&[8, 5], 0.0, 1.0, DType::F32, &Device::Cpu)
                .unwrap();
            let b = rng
                .normal_tensor(&[8], 0.0, 1.0, DType::F32, &Device::Cpu)
                .unwrap();
            let base = BaseLayer::linear(w.clone(), Some(b.clone())).unwrap();
            let a = RoadAdapter::new(&base, &config(variant, false), &mut rng).unwrap();
            let h = rng
                .normal_tensor(&[3, 8], 0.0, 1.0, DType::F32, &Device::Cpu)
                .unwrap();
            let back = a.apply(&a.apply(&h, false).unwrap(), true).unwrap();
            assert!(peft_test_support::max_diff(&back, &h) < 1e-4, "{variant}");
            let x = rng
                .normal_tensor(&[2, 3, 5], 0.0, 1.0, DType::F32, &Device::Cpu)
                .unwrap();
            let mut slot = AdapterSlot::new("fc", base);
            slot.add_adapter("default", Box::new(a)).unwrap();
            let ctx = ForwardCtx::eval();
            let y = slot.forward(&x, &ctx).unwrap();
            slot.merge(None).unwrap();
            let ym = slot.forward(&x, &ctx).unwrap();
            assert!(peft_test_support::max_diff(&y, &ym) < 1e-5, "{variant}");
            slot.unmerge().unwrap();
            assert!(peft_test_support::max_diff(&slot.base().weight().unwrap(), &w) < 1e-4);
            assert!(peft_test_support::max_diff(slot.base().bias().unwrap(), &b) < 1e-4);
        }
    }

    #[test]
    fn group_size_must_divide_the_output() {
        let base = BaseLayer::linear(Tensor::zeros((6, 3), DType::F32, &Device::Cpu).unwrap(), None)
            .unwrap();
        let e = RoadAdapter::new(&base, &config("road_1", true), &mut PeftRng::new(0)).unwrap_err();
        assert!(e.to_string().contains("group_size"), "{e}");
    }
}
