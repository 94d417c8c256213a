//! The UniLoRA adapter for Linear and GPT-2 Conv1D layers (PEFT's `tuners/unilora/layer.py`).
//!
//! One trained vector `theta_d` `[theta_d_length]` is shared by every layer of an adapter (the model-level
//! `base_model.unilora_theta_d`). Each entry of every layer's `A` `[r, in]` and `B` `[out, r]` reads one entry
//! of it, chosen by integer indices that PEFT draws from `proj_seed` over all layers at once
//! ([`super::numpy_rng::generate_index`], consumed layer by layer in module order, `A` then `B`), and is scaled
//! by `1/√count`, `count` the number of entries of all layers that read the same `theta_d` entry:
//!
//! ```text
//! A  = theta_d[indices_A] · scales_A        [r, in]
//! B  = theta_d[indices_B] · scales_B        [out, r]
//! y  = base(x) + (dropout(x) Aᵀ) Bᵀ
//! ΔW = B A                                  ([out, in]; transposed for Conv1D)
//! ```
//!
//! with no other scale. Additive: merging adds `ΔW`, unmerging subtracts it, weighted merges scale it. The
//! indices and scales are saved only with `save_indices` (`unilora_indices_A` / `_B` int64,
//! `unilora_scales_A` / `_B` in the base dtype).

use super::config::UniLoraConfig;
use crate::layer::base::linear_apply;
use crate::layer::{Adapter, BaseKind, BaseLayer, CallCtx, NamedTensor, check_shape};
use crate::{PeftError, Result};
use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;

/// `unilora_indices_A`.
pub const INDICES_A: &str = "unilora_indices_A";
/// `unilora_indices_B`.
pub const INDICES_B: &str = "unilora_indices_B";
/// `unilora_scales_A`.
pub const SCALES_A: &str = "unilora_scales_A";
/// `unilora_scales_B`.
pub const SCALES_B: &str = "unilora_scales_B";
/// The key of the shared vector in an adapter file.
pub const THETA_D_KEY: &str = "base_model.unilora_theta_d";
/// The name of the shared vector among a layer's [`Adapter::vars`] (and among
/// [`crate::PeftModel::trainable_vars`], once for all layers).
pub const THETA_D: &str = "unilora_theta_d";

/// The parameter names of UniLoRA's per-layer tensors in a file key (present with `save_indices` only).
pub const PARAM_PREFIXES: &[&str] = &[INDICES_A, INDICES_B, SCALES_A, SCALES_B];

/// The integer tensors of a UniLoRA file (the indices of `save_indices`): admitted by
/// [`crate::io::check_adapter_tensors`] by the last component of their key.
pub const INTEGER_TENSORS: &[&str] = &[INDICES_A, INDICES_B];

/// One layer's place in `theta_d`: its `A` and `B` indices and scales.
#[derive(Clone, Debug)]
pub struct Layout {
    /// `indices_A` `[r, in]`, int64.
    pub indices_a: Tensor,
    /// `indices_B` `[out, r]`, int64.
    pub indices_b: Tensor,
    /// `scales_A` `[r, in]`, f32.
    pub scales_a: Tensor,
    /// `scales_B` `[out, r]`, f32.
    pub scales_b: Tensor,
}

/// One UniLoRA adapter inside one Linear or Conv1D layer.
#[derive(Debug)]
pub struct UniLoraAdapter {
    kind: BaseKind,
    r: usize,
    theta: Tensor,
    layout: Layout,
    /// The indices as u32, flattened, on the layer's device (for `index_select`).
    flat_a: Tensor,
    flat_b: Tensor,
    dropout: f64,
    save_indices: bool,
    saved_dtype: DType,
}

fn check_kind_supported(base: &BaseLayer) -> Result<()> {
    if !matches!(base.kind(), BaseKind::Linear | BaseKind::Conv1D) {
        return Err(PeftError::Unsupported {
            field: "target_modules".into(),
            value: format!("a {:?} layer", base.kind()),
            reason: "Currently, only `torch.nn.Linear` and `transformers.pytorch_utils.Conv1D` are supported \
                     by UniLoRA (as in PEFT)"
                .into(),
        });
    }
    Ok(())
}

/// Checks the shared vector against the config.
pub(crate) fn check_theta(theta: &Tensor, config: &UniLoraConfig) -> Result<()> {
    check_shape(THETA_D_KEY, theta, &[config.theta_d_length])?;
    if !theta.dtype().is_float() {
        return Err(PeftError::Invalid(format!(
            "`{THETA_D_KEY}` is {:?}; theta_d is floating point",
            theta.dtype()
        )));
    }
    Ok(())
}

/// Integer indices as u32, each below `len`.
fn flat_indices(name: &str, t: &Tensor, len: usize) -> Result<Tensor> {
    let v: Vec<i64> = match t.dtype() {
        DType::I64 => t.flatten_all()?.to_vec1::<i64>()?,
        DType::U32 => t
            .flatten_all()?
            .to_vec1::<u32>()?
            .into_iter()
            .map(i64::from)
            .collect(),
        DType::U8 => t
            .flatten_all()?
            .to_vec1::<u8>()?
            .into_iter()
            .map(i64::from)
            .collect(),
        other => {
            return Err(PeftError::Invalid(format!(
                "`{name}` is {other:?}; UniLoRA's indices are integers (int64)"
            )));
        }
    };
    let mut out = Vec::with_capacity(v.len());
    for (i, x) in v.into_iter().enumerate() {
        if x < 0 || x as u64 >= len as u64 {
            return Err(PeftError::Invalid(format!(
                "`{name}`: entry {i} is {x}, outside theta_d (length {len})"
            )));
        }
        out.push(x as u32);
    }
    let n = out.len();
    Ok(Tensor::from_vec(out, n, t.device())?)
}

impl UniLoraAdapter {
    /// An adapter of `base` on the shared `theta` `[theta_d_length]` with its `layout` (checked against the
    /// layer's shape and `theta`'s length).
    pub fn new(
        base: &BaseLayer,
        config: &UniLoraConfig,
        theta: &Tensor,
        layout: Layout,
        saved_dtype: DType,
    ) -> Result<Self> {
        check_kind_supported(base)?;
        config.validate()?;
        check_theta(theta, config)?;
        let (r, i, o) = (config.r, base.in_features(), base.out_features());
        check_shape(INDICES_A, &layout.indices_a, &[r, i])?;
        check_shape(INDICES_B, &layout.indices_b, &[o, r])?;
        check_shape(SCALES_A, &layout.scales_a, &[r, i])?;
        check_shape(SCALES_B, &layout.scales_b, &[o, r])?;
        for (n, s) in [(SCALES_A, &layout.scales_a), (SCALES_B, &layout.scales_b)] {
            if !s.dtype().is_float() {
                return Err(PeftError::Invalid(format!(
                    "`{n}` is {:?}; scales are floating point",
                    s.dtype()
                )));
            }
        }
        let dev = base.device();
        let len = config.theta_d_length;
        let flat_a = flat_indices(INDICES_A, &layout.indices_a, len)?.to_device(dev)?;
        let flat_b = flat_indices(INDICES_B, &layout.indices_b, len)?.to_device(dev)?;
        let layout = Layout {
            scales_a: layout.scales_a.to_dtype(DType::F32)?.to_device(dev)?,
            scales_b: layout.scales_b.to_dtype(DType::F32)?.to_device(dev)?,
            ..layout
        };
        Ok(Self {
            kind: *base.kind(),
            r,
            theta: theta.clone(),
            layout,
            flat_a,
            flat_b,
            dropout: config.unilora_dropout,
            save_indices: config.save_indices,
            saved_dtype,
        })
    }

    /// An adapter from the tensors PEFT saves for one module (keys relative to the module, adapter name
    /// stripped): with `save_indices`, `unilora_indices_A` / `_B` and `unilora_scales_A` / `_B` replace the
    /// `layout` drawn from `proj_seed` (as PEFT's `load_state_dict` overwrites its buffers); a file without
    /// them keeps `layout`. Every key must be used.
    pub fn from_tensors(
        base: &BaseLayer,
        config: &UniLoraConfig,
        theta: &Tensor,
        layout: Option<Layout>,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        check_kind_supported(base)?;
        let extra: Vec<String> = tensors
            .keys()
            .filter(|k| !PARAM_PREFIXES.contains(&k.as_str()))
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        let saved = PARAM_PREFIXES.iter().filter(|k| tensors.contains_key(**k)).count();
        let layout = match (saved, layout) {
            (4, _) => Layout {
                indices_a: tensors[INDICES_A].clone(),
                indices_b: tensors[INDICES_B].clone(),
                scales_a: tensors[SCALES_A].clone(),
                scales_b: tensors[SCALES_B].clone(),
            },
            (0, Some(l)) => l,
            (0, None) => {
                return Err(PeftError::Invalid(
                    "UNILORA layers read theta_d through indices drawn over all targeted layers: build them \
                     with `build_adapter_with_shared` and the tensors of `shared_tensors`"
                        .into(),
                ));
            }
            _ => {
                let missing = PARAM_PREFIXES
                    .iter()
                    .find(|k| !tensors.contains_key(**k))
                    .copied()
                    .unwrap_or(INDICES_A);
                return Err(PeftError::MissingKey(missing.into()));
            }
        };
        let dtype = tensors
            .get(SCALES_A)
            .map(|t| t.dtype())
            .unwrap_or(theta.dtype());
        Self::new(base, config, theta, layout, dtype)
    }

    /// The shared `theta_d`.
    pub fn theta_d(&self) -> &Tensor {
        &self.theta
    }

    /// The layer's indices and scales.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// `A` `[r, in]` and `B` `[out, r]`, f32 (PEFT's `_get_lora_matrices`), differentiable in `theta_d`.
    pub fn lora_matrices(&self) -> Result<(Tensor, Tensor)> {
        let theta = self.theta.to_dtype(DType::F32)?;
        let a = theta
            .index_select(&self.flat_a, 0)?
            .reshape(self.layout.scales_a.shape())?
            .mul(&self.layout.scales_a)?;
        let b = theta
            .index_select(&self.flat_b, 0)?
            .reshape(self.layout.scales_b.shape())?
            .mul(&self.layout.scales_b)?;
        Ok((a, b))
    }

    /// `ΔW = B A` in the base weight's layout (`[out, in]`, Conv1D `[in, out]`), f32.
    pub fn delta(&self) -> Result<Tensor> {
        let (a, b) = self.lora_matrices()?;
        let d = b.matmul(&a)?;
        Ok(match self.kind {
            BaseKind::Conv1D => d.t()?.contiguous()?,
            _ => d,
        })
    }

    fn check_kind(&self, kind: &BaseKind) -> Result<()> {
        if *kind != self.kind {
            return Err(PeftError::Invalid(format!(
                "UniLoRA adapter for {:?} used on a {kind:?} layer",
                self.kind
            )));
        }
        Ok(())
    }
}

impl Adapter for UniLoraAdapter {
    /// PEFT's `supports_lora_conversion`: by the additive delta.
    fn lora_conversion(
        &self,
        base: &crate::layer::BaseLayer,
    ) -> Result<Option<crate::layer::LoraConversion>> {
        crate::tuners::lora::conversion::additive_conversion(self, base, true)
    }

    fn peft_type(&self) -> &'static str {
        "UNILORA"
    }

    fn transform_output(
        &self,
        base: &BaseLayer,
        x: &Tensor,
        result: Tensor,
        ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        self.check_kind(base.kind())?;
        let x = x.to_dtype(DType::F32)?;
        let x = if ctx.fwd.training && self.dropout > 0.0 {
            let mask = ctx
                .rng("unilora_dropout")
                .dropout_mask(x.shape(), self.dropout, x.device())?;
            x.mul(&mask)?
        } else {
            x
        };
        let (a, b) = self.lora_matrices()?;
        let h = linear_apply(&linear_apply(&x, &a, true)?, &b, true)?;
        Ok((result.to_dtype(DType::F32)? + h)?)
    }

    fn delta_weight(&self, kind: &BaseKind) -> Result<Option<(Tensor, Option<Tensor>)>> {
        self.check_kind(kind)?;
        Ok(Some((self.delta()?, None)))
    }

    /// With `save_indices`, the indices (int64) and scales (in the saved dtype); otherwise nothing (the
    /// model-level `theta_d` is saved by the model).
    fn tensors(&self) -> Vec<NamedTensor> {
        if !self.save_indices {
            return Vec::new();
        }
        let idx = |t: &Tensor| t.to_dtype(DType::I64).unwrap_or_else(|_| t.clone());
        let sc = |t: &Tensor| t.to_dtype(self.saved_dtype).unwrap_or_else(|_| t.clone());
        vec![
            (INDICES_A.into(), idx(&self.layout.indices_a)),
            (INDICES_B.into(), idx(&self.layout.indices_b)),
            (SCALES_A.into(), sc(&self.layout.scales_a)),
            (SCALES_B.into(), sc(&self.layout.scales_b)),
        ]
    }

    /// The shared `theta_d` as [`THETA_D`] when it trains (a `Var`): the same `Var` in every layer, which
    /// [`crate::PeftModel::trainable_vars`] lists once.
    fn vars(&self) -> Vec<(String, Var)> {
        match Var::from_tensor(&self.theta) {
            Ok(v) if self.theta.is_variable() => vec![(THETA_D.to_string(), v)],
            _ => Vec::new(),
        }
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        format!(
            "r={} shared theta_d [{}]{}",
            self.r,
            self.theta.dim(0).unwrap_or(0),
            if self.save_indices {
                " (indices saved)"
            } else {
                ""
            }
        )
    }
}
