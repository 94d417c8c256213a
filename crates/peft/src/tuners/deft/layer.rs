//! The DEFT adapter for Linear and GPT-2 Conv1D layers (PEFT's `tuners/deft/layer.py`, `DeftLinear`).
//!
//! Tensors per layer: `deft_P` `[out, r]` and, unless `para`, `deft_R` `[r, in]` (bare parameters), `r`
//! capped at `out_features`. With `(Q_P, right)` from `P` (`relu`: `(P, relu(P))`; `qr`: `(Q, Q)` for the
//! reduced QR `P = Q·R'` with LAPACK's signs), the layer computes, in f32, for the bias-free base product
//! `h = x·Wᵀ`:
//!
//! ```text
//! y = base(x) − (h·right)·Q_Pᵀ + s·(drop(x)·Rᵀ)·Q_Pᵀ        (the last term not for PaRa)
//! ```
//!
//! that is `W' = W + ΔW`, `ΔW = Q_P·(s·R − rightᵀ·W)` (PaRa: `−Q_P·rightᵀ·W`), `s = alpha / r` (1 without
//! an alpha). The update depends on the weight: merging computes it from the weight before any merge (PEFT's
//! `merge` takes every factor `rightᵀ·W` from the unmerged weight) and caches `rightᵀ·W` for an exact
//! unmerge; a weighted merge (`DIR@W`) is refused, as for the other weight-dependent methods.
//!
//! The QR is differentiable: Gram–Schmidt on `P` in candle ops, each column signed as LAPACK's Householder
//! QR signs it (computed on the host, [`crate::tuners::lora::rewrite_init::householder_qr`]), which is the
//! same `Q` and hence the same gradient as torch's `linalg.qr`.

use super::config::{DeftConfig, DeftDecomposition};
use crate::layer::base::logical_weight;
use crate::layer::{Adapter, BaseKind, BaseLayer, CallCtx, MergeInput, Merged, NamedTensor, check_shape};
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Device, Tensor, Var};
use indexmap::IndexMap;

/// `deft_P`.
pub const DEFT_P: &str = "deft_P";
/// `deft_R`.
pub const DEFT_R: &str = "deft_R";

/// The parameter names of DEFT's tensors in a file.
pub const PARAM_PREFIXES: &[&str] = &[DEFT_P, DEFT_R];

/// One DEFT adapter inside one Linear or Conv1D layer (f32 `Var`s; the dtype they were created or loaded in is
/// kept for saving).
#[derive(Debug)]
pub struct DeftAdapter {
    p: Var,
    r_inj: Option<Var>,
    method: DeftDecomposition,
    scaling: f64,
    dropout: f64,
    saved_dtype: DType,
}

/// `(in_features, out_features)` of a Linear or Conv1D base.
fn dims(base: &BaseLayer) -> Result<(usize, usize)> {
    match base.kind() {
        BaseKind::Linear | BaseKind::Conv1D => Ok((base.in_features(), base.out_features())),
        k => Err(PeftError::Unsupported {
            field: "target_modules".into(),
            value: format!("a {k:?} layer"),
            reason: "DEFT wraps torch.nn.Linear and GPT-2 Conv1D layers only (as PEFT)".into(),
        }),
    }
}

/// The orthonormal factor of `P`'s reduced QR with LAPACK's column signs, differentiable in `P`.
fn qr_q(p: &Tensor) -> Result<Tensor> {
    let (m, r) = p.dims2()?;
    let host: Vec<f32> = p
        .detach()
        .to_device(&Device::Cpu)?
        .flatten_all()?
        .to_vec1()?;
    let (_, rr) = crate::tuners::lora::rewrite_init::householder_qr(&host, m, r);
    let mut cols: Vec<Tensor> = Vec::with_capacity(r);
    for j in 0..r {
        let mut v = p.narrow(1, j, 1)?; // [m, 1]
        for q in &cols {
            let c = q.t()?.matmul(&v)?; // [1, 1]
            v = (v - q.broadcast_mul(&c)?)?;
        }
        let norm = v.sqr()?.sum_all()?.sqrt()?;
        let sign = if rr[j * r + j] < 0.0 { -1.0 } else { 1.0 };
        cols.push((v.broadcast_div(&norm)? * sign)?);
    }
    Ok(Tensor::cat(&cols, 1)?)
}

impl DeftAdapter {
    /// PEFT's `update_layer` / `reset_deft_parameters`: `P ~ N(0, 0.02²)`; `R = rightᵀ·W / s` with
    /// `init_weights` (the update is then zero), else `R ~ N(0, (0.02·init_scale)²)`; no `R` for PaRa.
    pub fn new(base: &BaseLayer, config: &DeftConfig, rng: &mut PeftRng) -> Result<Self> {
        let (n_in, n_out) = dims(base)?;
        let r = config.r.min(n_out);
        let dev = base.device();
        let p = rng.normal_tensor((n_out, r), 0.0, 0.02, DType::F32, dev)?;
        let mut me = Self {
            p: Var::from_tensor(&p)?,
            r_inj: None,
            method: config.decomposition_method,
            scaling: config.scaling(r),
            dropout: config.deft_dropout,
            saved_dtype: DType::F32,
        };
        if !config.para {
            let r_init = if config.init_weights {
                let w = logical_weight(base.kind(), &base.weight()?)?;
                let (_, right) = me.project()?;
                (right.t()?.matmul(&w)? / me.scaling)?
            } else {
                rng.normal_tensor((r, n_in), 0.0, 0.02 * config.init_scale, DType::F32, dev)?
            };
            me.r_inj = Some(Var::from_tensor(&r_init)?);
        }
        Ok(me)
    }

    /// An adapter from tensors as PEFT saves them (keys relative to the module, adapter name stripped).
    pub fn from_tensors(
        base: &BaseLayer,
        config: &DeftConfig,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        let (n_in, n_out) = dims(base)?;
        let r = config.r.min(n_out);
        let get = |key: &str, shape: &[usize]| -> Result<Var> {
            let t = tensors
                .get(key)
                .ok_or_else(|| PeftError::MissingKey(key.to_string()))?;
            check_shape(key, t, shape)?;
            Ok(Var::from_tensor(&t.to_dtype(DType::F32)?)?)
        };
        let p = get(DEFT_P, &[n_out, r])?;
        let r_inj = if config.para {
            None
        } else {
            Some(get(DEFT_R, &[r, n_in])?)
        };
        let expected: &[&str] = if config.para { &[DEFT_P] } else { PARAM_PREFIXES };
        let extra: Vec<String> = tensors
            .keys()
            .filter(|k| !expected.contains(&k.as_str()))
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        Ok(Self {
            p,
            r_inj,
            method: config.decomposition_method,
            scaling: config.scaling(r),
            dropout: config.deft_dropout,
            saved_dtype: tensors[DEFT_P].dtype(),
        })
    }

    /// PEFT's `_project`: `(Q_P, right)`, f32.
    fn project(&self) -> Result<(Tensor, Tensor)> {
        let p = self.p.as_tensor().to_dtype(DType::F32)?;
        match self.method {
            DeftDecomposition::Relu => {
                let right = p.relu()?;
                Ok((p, right))
            }
            DeftDecomposition::Qr => {
                let q = qr_q(&p)?;
                Ok((q.clone(), q))
            }
        }
    }

    /// `rightᵀ·W` `[r, in]` for the logical weight `w` `[out, in]` (PEFT's `_merge_factor`).
    fn factor(&self, w: &Tensor) -> Result<Tensor> {
        let (_, right) = self.project()?;
        Ok(right.t()?.matmul(w)?)
    }

    /// `ΔW` `[out, in]` from the factor `rightᵀ·W` (PEFT's `_delta_from_factor`), in the base's layout.
    fn delta_from_factor(&self, kind: &BaseKind, factor: &Tensor) -> Result<Tensor> {
        let (q, _) = self.project()?;
        let inner = match &self.r_inj {
            Some(r) => ((r.as_tensor() * self.scaling)? - factor)?,
            None => factor.neg()?,
        };
        let d = q.matmul(&inner)?;
        Ok(match kind {
            BaseKind::Conv1D => d.t()?.contiguous()?,
            _ => d,
        })
    }
}

impl Adapter for DeftAdapter {
    fn peft_type(&self) -> &'static str {
        "DEFT"
    }

    fn transform_output(
        &self,
        base: &BaseLayer,
        x: &Tensor,
        result: Tensor,
        ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let n_in = *x.dims().last().unwrap_or(&0);
        let lead = x.dims()[..x.rank().saturating_sub(1)].to_vec();
        let rows = x.elem_count() / n_in.max(1);
        let x2 = x.reshape((rows, n_in))?;
        let w = logical_weight(base.kind(), &base.weight()?)?;
        let (q, right) = self.project()?;
        // The bias-free base product h = x·Wᵀ; the removal (h·right)·Q_Pᵀ.
        let h = x2.matmul(&w.t()?)?;
        let mut y = h.matmul(&right)?.matmul(&q.t()?)?.neg()?;
        if let Some(r) = &self.r_inj {
            let xd = if ctx.fwd.training && self.dropout > 0.0 {
                let mask = ctx
                    .rng("deft_dropout")
                    .dropout_mask(x2.shape(), self.dropout, x2.device())?;
                x2.mul(&mask)?
            } else {
                x2.clone()
            };
            let inj = xd.matmul(&(r.as_tensor() * self.scaling)?.t()?)?.matmul(&q.t()?)?;
            y = (y + inj)?;
        }
        let mut shape = lead;
        shape.push(y.dim(1)?);
        Ok((result.to_dtype(DType::F32)? + y.reshape(shape)?)?)
    }

    fn needs_unmerged_weight(&self) -> bool {
        true
    }

    fn merge(&self, input: MergeInput<'_>) -> Result<Merged> {
        let w0 = logical_weight(input.kind, input.unmerged_weight)?;
        let factor = self.factor(&w0)?;
        let delta = self.delta_from_factor(input.kind, &factor)?;
        Ok(Merged {
            weight: (input.weight.to_dtype(DType::F32)? + delta)?,
            bias: input.bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
            cache: Some(factor),
        })
    }

    fn unmerge(
        &self,
        input: MergeInput<'_>,
        cache: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let factor = match cache {
            Some(f) => f.clone(),
            None => self.factor(&logical_weight(input.kind, input.unmerged_weight)?)?,
        };
        let delta = self.delta_from_factor(input.kind, &factor)?;
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
        let mut v = vec![(DEFT_P.to_string(), self.p.clone())];
        if let Some(r) = &self.r_inj {
            v.push((DEFT_R.to_string(), r.clone()));
        }
        v
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        format!(
            "deft_P {:?}{} ({:?}, scaling={})",
            self.p.as_tensor().dims(),
            self.r_inj
                .as_ref()
                .map(|r| format!(" deft_R {:?}", r.as_tensor().dims()))
                .unwrap_or_else(|| " (PaRa)".into()),
            self.method,
            self.scaling
        )
    }
}
