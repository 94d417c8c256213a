//! The FRoD adapter for Linear and GPT-2 Conv1D layers (PEFT's `tuners/frod/layer.py`).
//!
//! FRoD rewrites each targeted weight `W` `[out, in]` exactly in a basis `V` `[in, in]` shared by every layer
//! of the same role (its *category*, `self_attn_q_proj`, …): `W = U·diag(λ)·Vᵀ`, with `U·diag(λ) = W·V⁻ᵀ`
//! solved in f64 when the layer is built (`U`'s columns of unit norm; `U` is not saved, PEFT recomputes it
//! from the base weight too). It trains `λ` (`frod_lambda_l` `[in]`) and a sparse `S` `[in, in]` whose
//! `nnz` off-diagonal positions (shared by the category) hold `frod_lambda_s_values` `[nnz]`:
//!
//! ```text
//! W'  = U·(S + diag(λ))·Vᵀ                       (the layer's new weight)
//! y   = base(x) + ((h V) Sᵀ + (h V)·λ) Uᵀ − h Wᵀ  (h = dropout(x); one adapter: W' h + b)
//! ΔW  = W' − W                                    (merge; W the weight before any merge)
//! ```

use super::config::FrodConfig;
use crate::layer::base::{linear_apply, logical_weight};
use crate::layer::{Adapter, BaseKind, BaseLayer, CallCtx, MergeInput, Merged, NamedTensor, check_shape};
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;

/// `frod_lambda_l`.
pub const LAMBDA_L: &str = "frod_lambda_l";
/// `frod_lambda_s_values`.
pub const LAMBDA_S_VALUES: &str = "frod_lambda_s_values";
/// The parameter names of FRoD's per-layer tensors in a file key.
pub const PARAM_PREFIXES: &[&str] = &[LAMBDA_L, LAMBDA_S_VALUES];

/// One category's shared tensors: the basis `V` `[in, in]` and the positions of `S` (`[2, nnz]`, rows then
/// columns).
#[derive(Clone, Debug)]
pub struct Projection {
    /// `V` `[in, in]`, f32.
    pub v: Tensor,
    /// The flat positions `row·in + col` of `S`'s entries, u32, on the layer's device.
    pub positions: Tensor,
    /// The positions as saved (`frod_s_indices`, int64 `[2, nnz]`).
    pub indices: Tensor,
}

/// One FRoD adapter inside one Linear or Conv1D layer.
#[derive(Debug)]
pub struct FrodAdapter {
    in_features: usize,
    /// `U` `[out, in]`, f32.
    u: Tensor,
    projection: Projection,
    lambda_l: Var,
    s_values: Var,
    dropout: f64,
    saved_dtype: DType,
}

fn check_kind_supported(base: &BaseLayer) -> Result<()> {
    if !matches!(base.kind(), BaseKind::Linear | BaseKind::Conv1D) {
        return Err(PeftError::Unsupported {
            field: "target_modules".into(),
            value: format!("a {:?} layer", base.kind()),
            reason: "FRoD wraps `torch.nn.Linear` and `transformers.pytorch_utils.Conv1D` layers only (as in \
                     PEFT)"
                .into(),
        });
    }
    Ok(())
}

/// `U` and `λ` of `W = U·diag(λ)·Vᵀ` (PEFT's `_calculate_frod_u_and_lambda`, in f64): `B = W·V⁻ᵀ` (torch's
/// `solve(V, Wᵀ)ᵀ`, LU with partial pivoting), `λ` its column norms, `U = B / λ` (columns with `λ ≤ 1e-12`
/// zero).
pub fn u_and_lambda(w: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
    use faer::linalg::solvers::Solve;
    let (out, inp) = w.dims2()?;
    let wv = w.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let vv = v.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let vm = faer::Mat::<f64>::from_fn(inp, inp, |i, j| vv[i * inp + j]);
    let rhs = faer::Mat::<f64>::from_fn(inp, out, |i, j| wv[j * inp + i]); // Wᵀ
    let x = vm.partial_piv_lu().solve(&rhs); // [in, out] = V⁻¹ Wᵀ
    let mut lambda = vec![0f64; inp];
    for (j, l) in lambda.iter_mut().enumerate() {
        *l = (0..out).map(|i| x[(j, i)] * x[(j, i)]).sum::<f64>().sqrt();
    }
    if lambda.iter().any(|l| !l.is_finite()) {
        return Err(PeftError::Invalid(
            "FRoD: the basis V is singular (W·V⁻ᵀ is not finite)".into(),
        ));
    }
    let mut u = vec![0f32; out * inp];
    for i in 0..out {
        for j in 0..inp {
            if lambda[j] > 1e-12 {
                u[i * inp + j] = (x[(j, i)] / lambda[j]) as f32;
            }
        }
    }
    let lam: Vec<f32> = lambda.iter().map(|l| *l as f32).collect();
    Ok((
        Tensor::from_vec(u, (out, inp), w.device())?,
        Tensor::from_vec(lam, inp, w.device())?,
    ))
}

impl FrodAdapter {
    fn assemble(
        base: &BaseLayer,
        config: &FrodConfig,
        projection: &Projection,
        lambda_l: Tensor,
        s_values: Tensor,
        u: Tensor,
        saved_dtype: DType,
    ) -> Result<Self> {
        let dev = base.device();
        Ok(Self {
            in_features: base.in_features(),
            u: u.to_device(dev)?,
            projection: Projection {
                v: projection.v.to_dtype(DType::F32)?.to_device(dev)?,
                positions: projection.positions.to_device(dev)?,
                indices: projection.indices.clone(),
            },
            lambda_l: Var::from_tensor(&lambda_l.to_dtype(DType::F32)?.to_device(dev)?)?,
            s_values: Var::from_tensor(&s_values.to_dtype(DType::F32)?.to_device(dev)?)?,
            dropout: config.frod_dropout,
            saved_dtype,
        })
    }

    fn check(base: &BaseLayer, projection: &Projection) -> Result<Tensor> {
        check_kind_supported(base)?;
        let inp = base.in_features();
        check_shape("frod_V", &projection.v, &[inp, inp])?;
        logical_weight(base.kind(), &base.weight()?)
    }

    /// A freshly initialised adapter (PEFT's `update_layer`): `U`, `λ` from the base weight and the
    /// category's `projection`; `S` zero (`init_weights`) or `N(0, 0.1²)` with `λ` moved by `N(0, 0.1²)`.
    pub fn new(
        base: &BaseLayer,
        config: &FrodConfig,
        projection: &Projection,
        rng: &mut PeftRng,
    ) -> Result<Self> {
        let w = Self::check(base, projection)?;
        let (u, lambda) = u_and_lambda(&w, &projection.v)?;
        let nnz = projection.positions.elem_count();
        let dev = base.device();
        let (lambda, s) = if config.init_weights {
            (lambda, Tensor::zeros(nnz, DType::F32, dev)?)
        } else {
            let s = rng.normal_tensor(nnz, 0.0, 0.1, DType::F32, dev)?;
            let d = rng.normal_tensor(lambda.elem_count(), 0.0, 0.1, DType::F32, dev)?;
            ((lambda + d)?, s)
        };
        Self::assemble(base, config, projection, lambda, s, u, DType::F32)
    }

    /// An adapter from the tensors PEFT saves for one module (`frod_lambda_l` `[in]`,
    /// `frod_lambda_s_values` `[nnz]`) and its category's `projection`; `U` is recomputed from the base
    /// weight, as PEFT does. Every key must be used.
    pub fn from_tensors(
        base: &BaseLayer,
        config: &FrodConfig,
        projection: &Projection,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        let w = Self::check(base, projection)?;
        let extra: Vec<String> = tensors
            .keys()
            .filter(|k| !PARAM_PREFIXES.contains(&k.as_str()))
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
        let (l, s) = (get(LAMBDA_L)?, get(LAMBDA_S_VALUES)?);
        check_shape(LAMBDA_L, l, &[base.in_features()])?;
        check_shape(LAMBDA_S_VALUES, s, &[projection.positions.elem_count()])?;
        let (u, _) = u_and_lambda(&w, &projection.v)?;
        Self::assemble(base, config, projection, l.clone(), s.clone(), u, l.dtype())
    }

    /// `S` `[in, in]` (dense, f32), differentiable in its values.
    fn s_dense(&self) -> Result<Tensor> {
        let n = self.in_features;
        let flat = Tensor::zeros(n * n, DType::F32, self.s_values.device())?;
        let flat = flat.index_add(&self.projection.positions, self.s_values.as_tensor(), 0)?;
        Ok(flat.reshape((n, n))?)
    }

    /// `W' = U·(S + diag(λ))·Vᵀ` `[out, in]`, f32.
    pub fn new_weight(&self) -> Result<Tensor> {
        let n = self.in_features;
        let lam = self.lambda_l.as_tensor();
        let diag = Tensor::eye(n, DType::F32, lam.device())?.broadcast_mul(&lam.unsqueeze(0)?)?;
        let m = (self.s_dense()? + diag)?;
        Ok(self.u.matmul(&m)?.matmul(&self.projection.v.t()?)?)
    }

    fn delta_from(&self, kind: &BaseKind, unmerged: &Tensor) -> Result<Tensor> {
        let w0 = logical_weight(kind, unmerged)?;
        let d = (self.new_weight()? - w0)?;
        Ok(match kind {
            BaseKind::Conv1D => d.t()?.contiguous()?,
            _ => d,
        })
    }
}

impl Adapter for FrodAdapter {
    fn peft_type(&self) -> &'static str {
        "FROD"
    }

    fn transform_output(
        &self,
        base: &BaseLayer,
        x: &Tensor,
        result: Tensor,
        ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        let result = result.to_dtype(DType::F32)?;
        let x = x.to_dtype(DType::F32)?;
        let dropped = ctx.fwd.training && self.dropout > 0.0;
        let h = if dropped {
            let mask = ctx
                .rng("frod_dropout")
                .dropout_mask(x.shape(), self.dropout, x.device())?;
            x.mul(&mask)?
        } else {
            x
        };
        let z = linear_apply(&h, &self.projection.v, false)?;
        let zs = linear_apply(&z, &self.s_dense()?, true)?;
        let zl = z.broadcast_mul(self.lambda_l.as_tensor())?;
        let out = linear_apply(&(zs + zl)?, &self.u, true)?;
        // what the base contributes for `h` (`h Wᵀ`): replaced by this adapter's weight (`result` may already
        // hold other adapters' updates, so it is recomputed)
        let w = base.weight()?.to_dtype(DType::F32)?;
        let base_out = linear_apply(&h, &w, *base.kind() != BaseKind::Conv1D)?;
        Ok(((result + out)? - base_out)?)
    }

    fn needs_unmerged_weight(&self) -> bool {
        true
    }

    /// PEFT's merge: `W + (W' − W₀)`, `W₀` the weight before any adapter was merged.
    fn merge(&self, input: MergeInput<'_>) -> Result<Merged> {
        let delta = self.delta_from(input.kind, input.unmerged_weight)?;
        Ok(Merged {
            weight: (input.weight.to_dtype(DType::F32)? + &delta)?,
            bias: input.bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
            cache: Some(delta),
        })
    }

    /// Takes out the update the merge added (its cache), so that every adapter merged after it stays.
    fn unmerge(
        &self,
        input: MergeInput<'_>,
        cache: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let delta = match cache {
            Some(d) => d.clone(),
            None => self.delta_from(input.kind, input.unmerged_weight)?,
        };
        Ok((
            (input.weight.to_dtype(DType::F32)? - delta)?,
            input.bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
        ))
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        self.vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect()
    }

    fn vars(&self) -> Vec<(String, Var)> {
        vec![
            (LAMBDA_L.to_string(), self.lambda_l.clone()),
            (LAMBDA_S_VALUES.to_string(), self.s_values.clone()),
        ]
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        format!(
            "basis V [{n}, {n}], sparse S with {} entries",
            self.projection.positions.elem_count(),
            n = self.in_features
        )
    }
}
