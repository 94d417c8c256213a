//! The OSF adapter for Linear layers (PEFT's `tuners/osf/layer.py`: orthogonal subspace fine-tuning).
//!
//! The weight's SVD `W = U·diag(S)·Vᵀ` is split at `k` (`effective_rank`): the top `k` directions stay
//! frozen, the rest (`U_low` `[out, m]`, `S_low` `[m]`, `V_low` `[m, in]`, `m = min(out, in) − k`) train,
//! starting from the weight's own:
//!
//! ```text
//! ΔW = U_low·diag(S_low)·V_low − W_low,   W_low = W − W_k (the weight's part outside its top k directions)
//! y  = base(x) + x·ΔWᵀ
//! ```
//!
//! `W_low` is not saved (PEFT recomputes its SVD from the base weight at load): it is sign-free, so it is
//! computed here in f64 whatever the SVD's signs. Training keeps `U_low` and `V_low` orthogonal to the frozen
//! directions: their gradients lose their components along `U_high` / `V_high` (PEFT's gradient hooks;
//! [`Adapter::gradient_projection`]).

use super::config::OsfConfig;
use crate::layer::base::linear_apply;
use crate::layer::{Adapter, BaseKind, BaseLayer, CallCtx, GradProjection, NamedTensor, check_shape};
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;

/// `osf_svd_params.U_low`.
pub const U_LOW: &str = "osf_svd_params.U_low";
/// `osf_svd_params.S_low`.
pub const S_LOW: &str = "osf_svd_params.S_low";
/// `osf_svd_params.V_low`.
pub const V_LOW: &str = "osf_svd_params.V_low";
/// The parameter name of OSF's per-layer tensors in a file key.
pub const PARAM_PREFIXES: &[&str] = &["osf_svd_params"];

/// The frozen and initial parts of a weight's SVD split at `k`, f32 (from an f64 SVD).
#[derive(Clone, Debug)]
pub struct Split {
    /// `U_high` `[out, k]`.
    pub u_high: Tensor,
    /// `V_high` `[k, in]`.
    pub v_high: Tensor,
    /// The initial trained factors `U_low` `[out, m]`, `S_low` `[m]`, `V_low` `[m, in]` (this SVD's signs).
    pub low: (Tensor, Tensor, Tensor),
}

/// PEFT's `decompose_weight_matrix(W, k)` (thin SVD; here in f64).
pub fn decompose(w: &Tensor, k: usize) -> Result<Split> {
    let (out, inp) = w.dims2()?;
    let values = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let svd = crate::merge_utils::ThinSvd::new(&values, out, inp)?;
    let n = out.min(inp);
    let k = k.min(n);
    let (u, s, vt) = svd.truncated(n)?;
    let dev = w.device();
    let cols = |m: &[f64], rows: usize, width: usize, from: usize, to: usize| -> Result<Tensor> {
        let mut v = Vec::with_capacity(rows * (to - from));
        for i in 0..rows {
            for j in from..to {
                v.push(m[i * width + j] as f32);
            }
        }
        Ok(Tensor::from_vec(v, (rows, to - from), dev)?)
    };
    let rows_of = |m: &[f64], width: usize, from: usize, to: usize| -> Result<Tensor> {
        let v: Vec<f32> = m[from * width..to * width].iter().map(|&x| x as f32).collect();
        Ok(Tensor::from_vec(v, (to - from, width), dev)?)
    };
    let s_low: Vec<f32> = s[k..].iter().map(|&x| x as f32).collect();
    Ok(Split {
        u_high: cols(&u, out, n, 0, k)?,
        v_high: rows_of(&vt, inp, 0, k)?,
        low: (
            cols(&u, out, n, k, n)?,
            Tensor::from_vec(s_low, n - k, dev)?,
            rows_of(&vt, inp, k, n)?,
        ),
    })
}

/// One OSF adapter inside one Linear layer.
#[derive(Debug)]
pub struct OsfAdapter {
    u: Var,
    s: Var,
    v: Var,
    /// The initial factors (this SVD's), whose product is `W_low`.
    init: (Tensor, Tensor, Tensor),
    u_high: Tensor,
    v_high: Tensor,
    saved_dtype: DType,
}

fn check_kind_supported(base: &BaseLayer) -> Result<()> {
    if *base.kind() != BaseKind::Linear {
        return Err(PeftError::Unsupported {
            field: "target_modules".into(),
            value: format!("a {:?} layer", base.kind()),
            reason: "OSF wraps `torch.nn.Linear` layers only (as in PEFT)".into(),
        });
    }
    Ok(())
}

impl OsfAdapter {
    fn split_of(base: &BaseLayer, config: &OsfConfig, module: &str) -> Result<Split> {
        check_kind_supported(base)?;
        let (out, inp) = (base.out_features(), base.in_features());
        let k = config.frozen_rank(module, out.min(inp))?;
        decompose(&base.weight()?, k)
    }

    fn assemble(split: Split, trained: (Tensor, Tensor, Tensor), saved_dtype: DType) -> Result<Self> {
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        Ok(Self {
            u: Var::from_tensor(&f32(&trained.0)?)?,
            s: Var::from_tensor(&f32(&trained.1)?)?,
            v: Var::from_tensor(&f32(&trained.2)?)?,
            init: split.low,
            u_high: split.u_high,
            v_high: split.v_high,
            saved_dtype,
        })
    }

    /// A freshly initialised adapter of `module` (PEFT's `update_layer`): the trained factors are the
    /// weight's own (`init_weights`) or `N(0, 1)`.
    pub fn new(
        base: &BaseLayer,
        config: &OsfConfig,
        module: &str,
        rng: &mut PeftRng,
    ) -> Result<Self> {
        let split = Self::split_of(base, config, module)?;
        let trained = if config.init_weights {
            split.low.clone()
        } else {
            let dev = base.device();
            let (u, s, v) = &split.low;
            (
                rng.normal_tensor(u.dims(), 0.0, 1.0, DType::F32, dev)?,
                rng.normal_tensor(s.dims(), 0.0, 1.0, DType::F32, dev)?,
                rng.normal_tensor(v.dims(), 0.0, 1.0, DType::F32, dev)?,
            )
        };
        Self::assemble(split, trained, DType::F32)
    }

    /// An adapter from the tensors PEFT saves for one module (`osf_svd_params.U_low` `[out, m]`, `.S_low`
    /// `[m]`, `.V_low` `[m, in]`); the frozen part is recomputed from the base weight, as PEFT does. Every key
    /// must be used.
    pub fn from_tensors(
        base: &BaseLayer,
        config: &OsfConfig,
        module: &str,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        let split = Self::split_of(base, config, module)?;
        let extra: Vec<String> = tensors
            .keys()
            .filter(|k| ![U_LOW, S_LOW, V_LOW].contains(&k.as_str()))
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        let get = |k: &str| {
            tensors
                .get(k)
                .ok_or_else(|| PeftError::MissingKey(k.to_string()))
        };
        let (u, s, v) = (get(U_LOW)?, get(S_LOW)?, get(V_LOW)?);
        check_shape(U_LOW, u, split.low.0.dims())?;
        check_shape(S_LOW, s, split.low.1.dims())?;
        check_shape(V_LOW, v, split.low.2.dims())?;
        Self::assemble(split, (u.clone(), s.clone(), v.clone()), u.dtype())
    }

    /// `ΔW = U_low·diag(S_low)·V_low − W_low` `[out, in]`, f32.
    pub fn delta(&self) -> Result<Tensor> {
        let (u0, s0, v0) = &self.init;
        let cur = self
            .u
            .as_tensor()
            .broadcast_mul(&self.s.as_tensor().unsqueeze(0)?)?
            .matmul(self.v.as_tensor())?;
        let init = u0.broadcast_mul(&s0.unsqueeze(0)?)?.matmul(v0)?;
        Ok((cur - init)?)
    }
}

impl Adapter for OsfAdapter {
    fn peft_type(&self) -> &'static str {
        "OSF"
    }

    /// PEFT's forward: `x·[V_low; V_low_init]ᵀ·[U_low·S_low, −U_low_init·S_low_init]ᵀ` added to the base.
    fn transform_output(
        &self,
        base: &BaseLayer,
        x: &Tensor,
        result: Tensor,
        _ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        check_kind_supported(base)?;
        let x = x.to_dtype(DType::F32)?;
        let (u0, s0, v0) = &self.init;
        let us = self
            .u
            .as_tensor()
            .broadcast_mul(&self.s.as_tensor().unsqueeze(0)?)?;
        let us0 = u0.broadcast_mul(&s0.unsqueeze(0)?)?;
        let cur = linear_apply(&linear_apply(&x, self.v.as_tensor(), true)?, &us, true)?;
        let init = linear_apply(&linear_apply(&x, v0, true)?, &us0, true)?;
        Ok(((result.to_dtype(DType::F32)? + cur)? - init)?)
    }

    fn delta_weight(&self, kind: &BaseKind) -> Result<Option<(Tensor, Option<Tensor>)>> {
        if *kind != BaseKind::Linear {
            return Err(PeftError::Invalid(format!(
                "OSF adapter used on a {kind:?} layer"
            )));
        }
        Ok(Some((self.delta()?, None)))
    }

    /// PEFT applies the first active OSF adapter only; several are refused here rather than ignored.
    fn stacks_with_others(&self) -> bool {
        false
    }

    /// `U_low`'s gradient loses its part along `U_high`, `V_low`'s its part along `V_high` (PEFT's hooks:
    /// `g − U_high·U_highᵀ·g`, `g − g·V_highᵀ·V_high`; where the frozen factor is square PEFT projects onto
    /// the initial low factor instead, the same projection).
    fn gradient_projection(&self, var: &str) -> Option<GradProjection> {
        match var {
            U_LOW => Some(GradProjection::Left(self.u_high.clone())),
            V_LOW => Some(GradProjection::Right(self.v_high.clone())),
            _ => None,
        }
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        self.vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect()
    }

    fn vars(&self) -> Vec<(String, Var)> {
        vec![
            (S_LOW.to_string(), self.s.clone()),
            (U_LOW.to_string(), self.u.clone()),
            (V_LOW.to_string(), self.v.clone()),
        ]
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        format!(
            "frozen rank {}, trained rank {}",
            self.u_high.dim(1).unwrap_or(0),
            self.s.elem_count()
        )
    }
}
