//! The GraLoRA adapter for Linear layers (PEFT's `tuners/gralora/layer.py`).
//!
//! Tensors per layer: `gralora_A` `[k, in/k, r]` and `gralora_B` `[k, r, out/k]` (bare parameters), and with
//! `hybrid_r > 0` the plain LoRA pair `gralora_A_general.weight` `[hybrid_r, in]`,
//! `gralora_B_general.weight` `[out, hybrid_r]`. Input block `n` is projected by `A_n` to `r` features,
//! split into `k` chunks of `r/k`; output block `j` is `B_j` applied to the concatenation over `n` of the
//! `j`-th chunks. The output is `h + alpha/(r + hybrid_r) · (that + x·A_gᵀ·B_gᵀ)`, the input dropped out in
//! training. Additive: `ΔW` is that linear map's matrix (computed by applying it to the identity), merged,
//! unmerged and weighted (`DIR@W`) as LoRA's.

use super::config::GraloraConfig;
use crate::layer::{Adapter, BaseKind, BaseLayer, CallCtx, NamedTensor, check_shape};
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;

/// `gralora_A`.
pub const GRALORA_A: &str = "gralora_A";
/// `gralora_B`.
pub const GRALORA_B: &str = "gralora_B";
/// `gralora_A_general.weight`.
pub const GRALORA_A_GENERAL: &str = "gralora_A_general.weight";
/// `gralora_B_general.weight`.
pub const GRALORA_B_GENERAL: &str = "gralora_B_general.weight";

/// The parameter names of GraLoRA's tensors in a file.
pub const PARAM_PREFIXES: &[&str] = &[
    GRALORA_A,
    GRALORA_B,
    "gralora_A_general",
    "gralora_B_general",
];

/// One GraLoRA adapter inside one Linear layer (f32 `Var`s; the dtype they were created or loaded in is kept
/// for saving).
#[derive(Debug)]
pub struct GraloraAdapter {
    k: usize,
    r: usize,
    scaling: f64,
    a: Var,
    b: Var,
    general: Option<(Var, Var)>,
    dropout: f64,
    saved_dtype: DType,
}

fn dims(base: &BaseLayer, k: usize) -> Result<(usize, usize)> {
    if !matches!(base.kind(), BaseKind::Linear) {
        return Err(PeftError::Unsupported {
            field: "target_modules".into(),
            value: format!("a {:?} layer", base.kind()),
            reason: "GraLoRA wraps Linear layers only in peft-rs".into(),
        });
    }
    let (n_in, n_out) = (base.in_features(), base.out_features());
    if !n_in.is_multiple_of(k) || !n_out.is_multiple_of(k) {
        return Err(PeftError::InvalidConfig(format!(
            "GraLoRA: in_features ({n_in}) and out_features ({n_out}) should be divisible by gralora_k ({k})"
        )));
    }
    Ok((n_in, n_out))
}

impl GraloraAdapter {
    /// A freshly initialised adapter: Kaiming-uniform `A` blocks, zero `B` blocks (`init_weights`; else
    /// Kaiming-uniform), and the same for the hybrid pair.
    pub fn new(base: &BaseLayer, config: &GraloraConfig, rng: &mut PeftRng) -> Result<Self> {
        let k = config.gralora_k;
        let (n_in, n_out) = dims(base, k)?;
        let (r, hr) = (config.r, config.hybrid_r);
        let dev = base.device();
        // torch's kaiming_uniform_(a=√5) on [rows, fan_in]: U(−1/√fan_in, 1/√fan_in)
        let ku = |rng: &mut PeftRng, shape: &[usize], fan_in: usize| -> Result<Tensor> {
            let b = 1.0 / (fan_in as f64).sqrt();
            Ok(rng.uniform_tensor(shape, -b, b, DType::F32, dev)?)
        };
        // PEFT draws each block as [r, in/k] and [out/k, r] and stores them transposed
        let a = ku(rng, &[k, r, n_in / k], n_in / k)?.transpose(1, 2)?.contiguous()?;
        let b = if config.init_weights {
            Tensor::zeros((k, r, n_out / k), DType::F32, dev)?
        } else {
            ku(rng, &[k, n_out / k, r], r)?.transpose(1, 2)?.contiguous()?
        };
        let general = if hr > 0 {
            let ga = ku(rng, &[hr, n_in], n_in)?;
            let gb = if config.init_weights {
                Tensor::zeros((n_out, hr), DType::F32, dev)?
            } else {
                ku(rng, &[n_out, hr], hr)?
            };
            Some((Var::from_tensor(&ga)?, Var::from_tensor(&gb)?))
        } else {
            None
        };
        Ok(Self {
            k,
            r,
            scaling: config.alpha / (r + hr) as f64,
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            general,
            dropout: config.gralora_dropout,
            saved_dtype: DType::F32,
        })
    }

    /// An adapter from tensors as PEFT saves them (keys relative to the module, adapter name stripped).
    pub fn from_tensors(
        base: &BaseLayer,
        config: &GraloraConfig,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        let k = config.gralora_k;
        let (n_in, n_out) = dims(base, k)?;
        let (r, hr) = (config.r, config.hybrid_r);
        let get = |key: &str, shape: &[usize]| -> Result<Var> {
            let t = tensors
                .get(key)
                .ok_or_else(|| PeftError::MissingKey(key.to_string()))?;
            check_shape(key, t, shape)?;
            Ok(Var::from_tensor(&t.to_dtype(DType::F32)?)?)
        };
        let a = get(GRALORA_A, &[k, n_in / k, r])?;
        let b = get(GRALORA_B, &[k, r, n_out / k])?;
        let general = if hr > 0 {
            Some((
                get(GRALORA_A_GENERAL, &[hr, n_in])?,
                get(GRALORA_B_GENERAL, &[n_out, hr])?,
            ))
        } else {
            None
        };
        let expected: &[&str] = if hr > 0 {
            &[GRALORA_A, GRALORA_B, GRALORA_A_GENERAL, GRALORA_B_GENERAL]
        } else {
            &[GRALORA_A, GRALORA_B]
        };
        let extra: Vec<String> = tensors
            .keys()
            .filter(|key| !expected.contains(&key.as_str()))
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        Ok(Self {
            k,
            r,
            scaling: config.alpha / (r + hr) as f64,
            a,
            b,
            general,
            dropout: config.gralora_dropout,
            saved_dtype: tensors[GRALORA_A].dtype(),
        })
    }

    /// The block-wise map (without the hybrid part and the scale) on rows `x` `[rows, in]` → `[rows, out]`.
    fn blocks(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, n_in) = x.dims2()?;
        let (k, r) = (self.k, self.r);
        let xb = x.reshape((rows, k, n_in / k))?.transpose(0, 1)?.contiguous()?; // [k(n), rows, in/k]
        let h = xb.matmul(self.a.as_tensor())?; // [k(n), rows, r]
        let h = h
            .reshape((k, rows, k, r / k))?
            .permute((2, 1, 0, 3))?
            .contiguous()?
            .reshape((k, rows, r))?; // [k(j), rows, r]
        let y = h.matmul(self.b.as_tensor())?; // [k(j), rows, out/k]
        let n_out = y.dim(2)? * k;
        Ok(y.transpose(0, 1)?.contiguous()?.reshape((rows, n_out))?)
    }

    /// The adapter's output (scaled) on rows `x`; `x_hybrid` is the hybrid LoRA's (separately dropped-out)
    /// input.
    fn output(&self, x: &Tensor, x_hybrid: &Tensor) -> Result<Tensor> {
        let mut y = self.blocks(x)?;
        if let Some((ga, gb)) = &self.general {
            y = (y + x_hybrid.matmul(&ga.as_tensor().t()?)?.matmul(&gb.as_tensor().t()?)?)?;
        }
        Ok((y * self.scaling)?)
    }

    /// `ΔW` `[out, in]`: the map applied to the identity, transposed.
    pub fn delta(&self) -> Result<Tensor> {
        let n_in = self.a.as_tensor().dim(0)? * self.a.as_tensor().dim(1)?;
        let eye = Tensor::eye(n_in, DType::F32, self.a.as_tensor().device())?;
        Ok(self.output(&eye, &eye)?.t()?.contiguous()?)
    }
}

impl Adapter for GraloraAdapter {
    /// PEFT's `supports_lora_conversion`: Linear and GPT-2 Conv1D layers, by their additive delta.
    fn lora_conversion(
        &self,
        base: &crate::layer::BaseLayer,
    ) -> Result<Option<crate::layer::LoraConversion>> {
        crate::tuners::lora::conversion::additive_conversion(self, base, true)
    }

    fn peft_type(&self) -> &'static str {
        "GRALORA"
    }

    fn transform_output(
        &self,
        _base: &BaseLayer,
        x: &Tensor,
        result: Tensor,
        ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let n_in = *x.dims().last().unwrap_or(&0);
        let lead = x.dims()[..x.rank().saturating_sub(1)].to_vec();
        let rows = x.elem_count() / n_in.max(1);
        let x2 = x.reshape((rows, n_in))?;
        let drop = |stream: &str| -> Result<Tensor> {
            if ctx.fwd.training && self.dropout > 0.0 {
                let mask = ctx
                    .rng(stream)
                    .dropout_mask(x2.shape(), self.dropout, x2.device())?;
                Ok(x2.mul(&mask)?)
            } else {
                Ok(x2.clone())
            }
        };
        let xa = drop("gralora_dropout")?;
        let xh = if self.general.is_some() {
            drop("gralora_dropout_hybrid")?
        } else {
            xa.clone()
        };
        let y = self.output(&xa, &xh)?;
        let mut shape = lead;
        shape.push(y.dim(1)?);
        Ok((result.to_dtype(DType::F32)? + y.reshape(shape)?)?)
    }

    fn delta_weight(&self, kind: &BaseKind) -> Result<Option<(Tensor, Option<Tensor>)>> {
        if !matches!(kind, BaseKind::Linear) {
            return Err(PeftError::Invalid(format!(
                "GraLoRA adapter merged into a {kind:?} layer"
            )));
        }
        Ok(Some((self.delta()?, None)))
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        self.vars()
            .into_iter()
            .map(|(key, v)| (key, v.as_tensor().clone()))
            .collect()
    }

    fn vars(&self) -> Vec<(String, Var)> {
        let mut v = vec![
            (GRALORA_A.to_string(), self.a.clone()),
            (GRALORA_B.to_string(), self.b.clone()),
        ];
        if let Some((ga, gb)) = &self.general {
            v.push((GRALORA_A_GENERAL.to_string(), ga.clone()));
            v.push((GRALORA_B_GENERAL.to_string(), gb.clone()));
        }
        v
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        format!(
            "gralora_A {:?} gralora_B {:?} (k={}, r={}{}, scaling={})",
            self.a.as_tensor().dims(),
            self.b.as_tensor().dims(),
            self.k,
            self.r,
            self.general
                .as_ref()
                .map(|(ga, _)| format!(", hybrid_r={}", ga.as_tensor().dim(0).unwrap_or(0)))
                .unwrap_or_default(),
            self.scaling
        )
    }
}
