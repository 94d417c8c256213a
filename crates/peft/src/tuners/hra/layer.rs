//! The HRA adapter for Linear layers (PEFT's `tuners/hra/layer.py`, `HRALinear`).
//!
//! One tensor per layer, `hra_u` `[in, r]` (a bare parameter: the key has no `.weight`), whose columns
//! `uᵢ` (normalised to unit length) define `r` Householder reflections `Rᵢ = I − 2 uᵢuᵢᵀ`. The adapted weight
//! is `W' = W·H` with `H = R₀R₁⋯R_{r−1}`; with `apply_GS` the columns are first orthonormalised
//! (Gram–Schmidt, in PEFT's order) and `H = I − 2UUᵀ`. The forward applies the reflections to the input,
//! `x·Hᵀ = ((x·R_{r−1})⋯)·R₀`, which costs `2·r·in` per row instead of forming `H` (PEFT forms `H` and `W·H`
//! in every forward; the two differ by rounding only). Merging writes `W·H` into the weight; unmerging
//! multiplies by `H⁻¹` (the reflections in reverse order, or `H` itself with Gram–Schmidt, an involution),
//! as PEFT does. The bias is untouched.
//!
//! Several active HRA adapters on one layer: PEFT's forward uses `W·H₁·H₂`, which applies `H₂ᵀ` to the
//! input before `H₁ᵀ`, the reverse of the order in which the slot runs adapters, so the forward refuses that
//! combination ([`Adapter::stacks_with_others`]); merging them one after the other is exact.
//!
//! Conv2d (which PEFT also has) is refused with a message.

use super::config::HraConfig;
use crate::layer::{Adapter, BaseKind, BaseLayer, CallCtx, MergeInput, Merged, NamedTensor, check_shape};
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;

/// The only tensor key of an HRA adapter.
pub const HRA_U: &str = "hra_u";

/// The parameter names of HRA's tensors in a file.
pub const PARAM_PREFIXES: &[&str] = &[HRA_U];

/// One HRA adapter inside one Linear layer. The vectors are an f32 `Var`; the dtype they were created or
/// loaded in is kept for saving.
#[derive(Debug)]
pub struct HraAdapter {
    u: Var,
    apply_gs: bool,
    saved_dtype: DType,
}

fn in_features(base: &BaseLayer) -> Result<usize> {
    match base.kind() {
        BaseKind::Linear => Ok(base.in_features()),
        other => Err(PeftError::Unsupported {
            field: "target_modules".into(),
            value: format!("a {other:?} layer"),
            reason: "HRA is implemented for Linear layers in peft-rs (PEFT also has Conv2d)".into(),
        }),
    }
}

impl HraAdapter {
    /// A freshly initialised adapter for `base`: with `init_weights` and an even `r`, PEFT's symmetric start
    /// (Kaiming-uniform vectors, each repeated twice, so consecutive reflections cancel and `H = I`); else
    /// (odd `r`, as PEFT warns, or `init_weights = false`) Kaiming-uniform vectors.
    pub fn new(base: &BaseLayer, config: &HraConfig, rng: &mut PeftRng) -> Result<Self> {
        let n = in_features(base)?;
        let r = config.r;
        let dev = base.device();
        // torch's kaiming_uniform_(a=√5) on an [n, k] tensor: U(−1/√k, 1/√k)
        let uniform = |rng: &mut PeftRng, k: usize| -> Result<Tensor> {
            let b = 1.0 / (k as f64).sqrt();
            Ok(rng.uniform_tensor((n, k), -b, b, DType::F32, dev)?)
        };
        let u = if config.init_weights && r.is_multiple_of(2) {
            let half = uniform(rng, r / 2)?;
            // repeat_interleave(half, 2, dim=1): columns h₀ h₀ h₁ h₁ …
            Tensor::stack(&[&half, &half], 2)?.reshape((n, r))?
        } else {
            uniform(rng, r)?
        };
        Ok(Self {
            u: Var::from_tensor(&u)?,
            apply_gs: config.apply_gs,
            saved_dtype: DType::F32,
        })
    }

    /// An adapter from tensors as PEFT saves them (keys relative to the module, adapter name stripped):
    /// exactly one key, `hra_u`, of shape `[in_features, r]`.
    pub fn from_tensors(
        base: &BaseLayer,
        config: &HraConfig,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        let n = in_features(base)?;
        let u = tensors
            .get(HRA_U)
            .ok_or_else(|| PeftError::MissingKey(HRA_U.to_string()))?;
        check_shape(HRA_U, u, &[n, config.r])?;
        let extra: Vec<String> = tensors.keys().filter(|k| *k != HRA_U).cloned().collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        Ok(Self {
            u: Var::from_tensor(&u.to_dtype(DType::F32)?)?,
            apply_gs: config.apply_gs,
            saved_dtype: u.dtype(),
        })
    }

    /// The vectors `hra_u` `[in, r]` (f32), as saved (not normalised).
    pub fn hra_u(&self) -> &Tensor {
        self.u.as_tensor()
    }

    fn rank(&self) -> usize {
        self.u.as_tensor().dims()[1]
    }

    /// The reflection vectors as unit columns `[in, r]`: each normalised (PEFT's `opt_u / opt_u.norm(dim=0)`),
    /// or orthonormalised by PEFT's Gram–Schmidt loop with `apply_GS`.
    fn unit_vectors(&self) -> Result<Tensor> {
        let u = self.u.as_tensor();
        if !self.apply_gs {
            let norm = u.sqr()?.sum_keepdim(0)?.sqrt()?;
            return Ok(u.broadcast_div(&norm)?);
        }
        let unit = |v: &Tensor| -> Result<Tensor> {
            Ok(v.broadcast_div(&v.sqr()?.sum_all()?.sqrt()?)?)
        };
        let mut cols: Vec<Tensor> = Vec::with_capacity(self.rank());
        for i in 0..self.rank() {
            let mut ui = u.narrow(1, i, 1)?;
            for w in &cols {
                // ui − (wᵀ·ui)·w
                let proj = w.t()?.matmul(&ui)?;
                ui = (ui - w.broadcast_mul(&proj)?)?;
            }
            cols.push(unit(&ui)?);
        }
        Ok(Tensor::cat(&cols, 1)?)
    }

    /// `H` `[in, in]` as PEFT's `get_delta_weight` forms it (`reverse`: the reflections in reverse order,
    /// `H⁻¹`; with Gram–Schmidt `H` is its own inverse).
    pub fn reflection_matrix(&self, reverse: bool) -> Result<Tensor> {
        let u = self.unit_vectors()?;
        let n = u.dims()[0];
        let eye = Tensor::eye(n, DType::F32, u.device())?;
        if self.apply_gs {
            return Ok((eye - (u.matmul(&u.t()?)? * 2.0)?)?);
        }
        let mut h = eye;
        let order: Vec<usize> = if reverse {
            (0..self.rank()).rev().collect()
        } else {
            (0..self.rank()).collect()
        };
        for i in order {
            let ui = u.narrow(1, i, 1)?;
            // weight − 2·(weight·uᵢ)·uᵢᵀ
            h = (&h - (h.matmul(&ui)?.matmul(&ui.t()?)? * 2.0)?)?;
        }
        Ok(h)
    }

    /// `x·Hᵀ` for rows `x` `[N, in]`.
    fn reflect_rows(&self, x: &Tensor) -> Result<Tensor> {
        let u = self.unit_vectors()?;
        if self.apply_gs {
            // H is symmetric: x − 2·(x·U)·Uᵀ
            return Ok((x - (x.matmul(&u)?.matmul(&u.t()?)? * 2.0)?)?);
        }
        let mut x = x.clone();
        for i in (0..self.rank()).rev() {
            let ui = u.narrow(1, i, 1)?;
            x = (&x - (x.matmul(&ui)?.matmul(&ui.t()?)? * 2.0)?)?;
        }
        Ok(x)
    }

    fn merged_weight(&self, input: &MergeInput<'_>, reverse: bool) -> Result<Tensor> {
        if !matches!(input.kind, BaseKind::Linear) {
            return Err(PeftError::Invalid(format!(
                "HRA adapter merged into a {:?} layer",
                input.kind
            )));
        }
        let w = input.weight.to_dtype(DType::F32)?;
        Ok(w.matmul(&self.reflection_matrix(reverse)?)?)
    }
}

impl Adapter for HraAdapter {
    fn peft_type(&self) -> &'static str {
        "HRA"
    }

    fn transform_input(&self, base: &BaseLayer, x: Tensor, _ctx: &CallCtx<'_>) -> Result<Tensor> {
        let n = in_features(base)?;
        let dims = x.dims().to_vec();
        let rows = x.elem_count() / n.max(1);
        let x2 = x.to_dtype(DType::F32)?.reshape((rows, n))?;
        Ok(self.reflect_rows(&x2)?.reshape(dims)?)
    }

    fn transform_output(
        &self,
        _base: &BaseLayer,
        _x: &Tensor,
        result: Tensor,
        _ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        Ok(result)
    }

    fn merge(&self, input: MergeInput<'_>) -> Result<Merged> {
        Ok(Merged {
            weight: self.merged_weight(&input, false)?,
            bias: input.bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
            cache: None,
        })
    }

    fn unmerge(
        &self,
        input: MergeInput<'_>,
        _cache: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        Ok((
            self.merged_weight(&input, true)?,
            input.bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
        ))
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        vec![(HRA_U.to_string(), self.u.as_tensor().clone())]
    }

    fn vars(&self) -> Vec<(String, Var)> {
        vec![(HRA_U.to_string(), self.u.clone())]
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        format!(
            "hra_u {:?} (r={}{})",
            self.u.as_tensor().dims(),
            self.rank(),
            if self.apply_gs { ", apply_GS" } else { "" }
        )
    }

    fn stacks_with_others(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AdapterSlot, ForwardCtx};
    use candle_core::Device;

    fn base(rng: &mut PeftRng) -> BaseLayer {
        let w = rng
            .normal_tensor(&[5, 6], 0.0, 1.0, DType::F32, &Device::Cpu)
            .unwrap();
        let b = rng
            .normal_tensor(&[5], 0.0, 1.0, DType::F32, &Device::Cpu)
            .unwrap();
        BaseLayer::linear(w, Some(b)).unwrap()
    }

    fn config(r: usize, apply_gs: bool, init_weights: bool) -> HraConfig {
        HraConfig {
            r,
            apply_gs,
            init_weights,
            ..Default::default()
        }
    }

    #[test]
    fn the_symmetric_start_is_the_identity() {
        let mut rng = PeftRng::new(1);
        let base = base(&mut rng);
        let a = HraAdapter::new(&base, &config(4, false, true), &mut rng).unwrap();
        let h = a.reflection_matrix(false).unwrap();
        let eye = Tensor::eye(6, DType::F32, &Device::Cpu).unwrap();
        assert!(peft_test_support::max_diff(&h, &eye) < 1e-6);
        // random vectors are not
        let a = HraAdapter::new(&base, &config(4, false, false), &mut rng).unwrap();
        assert!(peft_test_support::max_diff(&a.reflection_matrix(false).unwrap(), &eye) > 0.1);
    }

    #[test]
    fn forward_merge_and_unmerge_agree_and_h_is_orthogonal() {
        for gs in [false, true] {
            let mut rng = PeftRng::new(7);
            let base = base(&mut rng);
            let a = HraAdapter::new(&base, &config(3, gs, false), &mut rng).unwrap();
            let h = a.reflection_matrix(false).unwrap();
            let eye = Tensor::eye(6, DType::F32, &Device::Cpu).unwrap();
            let hth = h.t().unwrap().matmul(&h).unwrap();
            assert!(peft_test_support::max_diff(&hth, &eye) < 1e-5, "gs={gs}");
            let h_inv = a.reflection_matrix(true).unwrap();
            assert!(peft_test_support::max_diff(&h.matmul(&h_inv).unwrap(), &eye) < 1e-5);
            // forward = x·(W·H)ᵀ + b
            let x = rng
                .normal_tensor(&[2, 3, 6], 0.0, 1.0, DType::F32, &Device::Cpu)
                .unwrap();
            let w = base.weight().unwrap();
            let want = x
                .broadcast_matmul(&w.matmul(&h).unwrap().t().unwrap())
                .unwrap()
                .broadcast_add(base.bias().unwrap())
                .unwrap();
            let mut slot = AdapterSlot::new("fc", base.clone());
            slot.add_adapter("default", Box::new(a)).unwrap();
            let ctx = ForwardCtx::eval();
            let y = slot.forward(&x, &ctx).unwrap();
            assert!(peft_test_support::max_diff(&y, &want) < 1e-5, "gs={gs}");
            slot.merge(None).unwrap();
            let ym = slot.forward(&x, &ctx).unwrap();
            assert!(peft_test_support::max_diff(&ym, &want) < 1e-5);
            slot.unmerge().unwrap();
            assert!(peft_test_support::max_diff(&slot.base().weight().unwrap(), &w) < 1e-5);
        }
    }

    #[test]
    fn wrong_shapes_and_keys_are_errors() {
        let mut rng = PeftRng::new(2);
        let base = base(&mut rng);
        let c = config(4, false, true);
        let t = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        let ok = IndexMap::from([(HRA_U.to_string(), t(&[6, 4]))]);
        HraAdapter::from_tensors(&base, &c, &ok).unwrap();
        let transposed = IndexMap::from([(HRA_U.to_string(), t(&[4, 6]))]);
        assert!(matches!(
            HraAdapter::from_tensors(&base, &c, &transposed),
            Err(PeftError::ShapeMismatch { .. })
        ));
        let extra = IndexMap::from([
            (HRA_U.to_string(), t(&[6, 4])),
            ("hra_v".to_string(), t(&[6, 4])),
        ]);
        assert!(matches!(
            HraAdapter::from_tensors(&base, &c, &extra),
            Err(PeftError::UnexpectedKeys(_))
        ));
        assert!(matches!(
            HraAdapter::from_tensors(&base, &c, &IndexMap::new()),
            Err(PeftError::MissingKey(_))
        ));
    }
}
