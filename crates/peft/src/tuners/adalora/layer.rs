//! The AdaLoRA adapter for Linear, GPT-2 Conv1D and Conv2d layers (PEFT's `tuners/adalora/layer.py`:
//! `SVDLinear`, `SVDConv2d`).
//!
//! Parameters are bare (no `.weight`), as PEFT stores them:
//!
//! | base | `lora_A` | `lora_E` | `lora_B` |
//! |---|---|---|---|
//! | Linear `[out, in]`, Conv1D `[in, out]` | `[r, in]` | `[r, 1]` | `[out, r]` |
//! | Conv2d `[out, in, kh, kw]` | `[r, in·kh·kw]` | `[r, 1]` | `[out, r]` |
//!
//! `y = base(x) + (dropout(x) (A ⊙ E)ᵀ Bᵀ) · scale / (ranknum + 1e-5)` with `scale = lora_alpha` when it is
//! positive, else the layer's rank, and `ranknum = init_r` (never saved). Conv2d convolves the input with the
//! delta weight `B (A ⊙ E)` reshaped to the base weight's shape, with the base geometry.
//!
//! Pruned adapters: PEFT saves the rank allocation in the config's `rank_pattern` as one boolean mask of
//! length `init_r` per `"<module>.lora_E"`, and the tensors truncated to the kept rows (a module pruned to
//! rank 0 saves `[0, in]`, `[0, 1]` and `[out, 0]`). Loading resizes the layer to the kept rank but keeps the
//! divisor `init_r` (`AdaLoraModel.resize_modules_by_rank_pattern`); the scale is `lora_alpha`, or the kept
//! rank when `lora_alpha` is 0, since PEFT recomputes it in `update_layer` with the new rank.

use super::config::AdaLoraConfig;
use crate::config::LoraBias;
use crate::layer::base::linear_apply;
use crate::layer::{
    Adapter, BaseKind, BaseLayer, CallCtx, NamedTensor, check_shape,
};
use crate::tuners::lora::config::InitLoraWeights;
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;

/// The settings of one AdaLoRA adapter in one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct AdaLoraOptions {
    /// `init_r`: the rank the layer was created with, and the divisor `ranknum` of the scale.
    pub init_r: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// `lora_dropout` (training only).
    pub dropout: f64,
    /// `init_lora_weights` (true: `E = 0`, A and B normal with std 0.02; false: all standard normal).
    pub init_lora_weights: bool,
    /// The module's mask from `rank_pattern` (length `init_r`, `true` = kept), if the config has one.
    pub mask: Option<Vec<bool>>,
}

impl AdaLoraOptions {
    /// The options for `module_name` under `config`. The mask is `rank_pattern["<module>.lora_E"]` (or the
    /// same key with the adapter name appended, as PEFT's in-memory patterns have it).
    pub fn from_config(config: &AdaLoraConfig, module_name: &str) -> Result<Self> {
        if config.lora.bias != LoraBias::None {
            return Err(PeftError::Unsupported {
                field: "bias".into(),
                value: format!("{:?}", config.lora.bias),
                reason: "AdaLoRA with trained base biases is not implemented".into(),
            });
        }
        if config.lora.lora_bias {
            return Err(PeftError::Unsupported {
                field: "lora_bias".into(),
                value: "true".into(),
                reason: "PEFT's AdaLoRA layers have no lora_B bias".into(),
            });
        }
        let init = match &config.lora.init_lora_weights {
            InitLoraWeights::Bool(b) => *b,
            InitLoraWeights::Method(m) => {
                return Err(PeftError::Unsupported {
                    field: "init_lora_weights".into(),
                    value: format!("{m:?}"),
                    reason: "AdaLoRA only distinguishes true from false".into(),
                });
            }
        };
        let key = format!("{module_name}.lora_E");
        let mask = config.rank_pattern.as_ref().and_then(|p| {
            p.get(&key)
                .or_else(|| {
                    p.iter()
                        .find(|(k, _)| {
                            k.strip_prefix(&key).is_some_and(|rest| {
                                rest.starts_with('.') && !rest[1..].contains('.')
                            })
                        })
                        .map(|(_, v)| v)
                })
                .cloned()
        });
        if let Some(m) = &mask
            && m.len() != config.init_r
        {
            return Err(PeftError::InvalidConfig(format!(
                "rank_pattern[{key:?}] has {} entries but init_r is {}",
                m.len(),
                config.init_r
            )));
        }
        Ok(Self {
            init_r: config.init_r,
            alpha: config.lora.lora_alpha,
            dropout: config.lora.lora_dropout,
            init_lora_weights: init,
            mask,
        })
    }

    /// The rank the layer is loaded with: the kept entries of the mask, or `init_r`.
    pub fn loaded_rank(&self) -> usize {
        match &self.mask {
            Some(m) => m.iter().filter(|b| **b).count(),
            None => self.init_r,
        }
    }
}

/// One AdaLoRA adapter inside one layer. Parameters are f32 `Var`s; the dtype it was created or loaded in is
/// kept for saving.
#[derive(Debug)]
pub struct AdaLoraAdapter {
    kind: BaseKind,
    /// The base weight's shape (the delta's shape).
    wshape: Vec<usize>,
    opts: AdaLoraOptions,
    /// The current number of rows of A, E and B.
    r: usize,
    /// `scaling` (PEFT: `lora_alpha if lora_alpha > 0 else r`).
    scale: f64,
    /// `ranknum` (f32 in PEFT), never saved.
    ranknum: f32,
    a: Var,
    e: Var,
    b: Var,
    saved_dtype: DType,
}

impl AdaLoraAdapter {
    fn check_base(base: &BaseLayer) -> Result<()> {
        match base.kind() {
            BaseKind::Linear | BaseKind::Conv1D => Ok(()),
            BaseKind::Conv2d(spec) if spec.groups == 1 => Ok(()),
            BaseKind::Conv2d(spec) => Err(PeftError::Unsupported {
                field: "target_modules".into(),
                value: format!("a Conv2d with groups={}", spec.groups),
                reason: "AdaLoRA's delta weight has the shape of an ungrouped convolution".into(),
            }),
            BaseKind::Embedding => Err(PeftError::Unsupported {
                field: "target_modules".into(),
                value: "an Embedding".into(),
                reason: "PEFT's AdaLoRA supports only Linear, Conv1D and Conv2d layers".into(),
            }),
        }
    }

    /// `(in, out)` of A's columns and B's rows.
    fn dims(base: &BaseLayer) -> (usize, usize) {
        let k = match base.kind() {
            BaseKind::Conv2d(_) => {
                let w = base.weight_dims();
                w[2] * w[3]
            }
            _ => 1,
        };
        (base.in_features() * k, base.out_features())
    }

    fn scale_for(opts: &AdaLoraOptions, r: usize) -> f64 {
        if opts.alpha > 0.0 {
            opts.alpha
        } else {
            r as f64
        }
    }

    /// A freshly initialised adapter of rank `init_r` (PEFT creates every layer at `init_r`; a `rank_pattern`
    /// only applies when loading, and truncates the saved tensors).
    pub fn new(base: &BaseLayer, opts: AdaLoraOptions, rng: &mut PeftRng) -> Result<Self> {
        Self::check_base(base)?;
        let dev = base.device().clone();
        let (i, o) = Self::dims(base);
        let r = opts.init_r;
        let (a, e, b) = if opts.init_lora_weights {
            (
                rng.normal_tensor((r, i), 0.0, 0.02, DType::F32, &dev)?,
                Tensor::zeros((r, 1), DType::F32, &dev)?,
                rng.normal_tensor((o, r), 0.0, 0.02, DType::F32, &dev)?,
            )
        } else {
            (
                rng.normal_tensor((r, i), 0.0, 1.0, DType::F32, &dev)?,
                rng.normal_tensor((r, 1), 0.0, 1.0, DType::F32, &dev)?,
                rng.normal_tensor((o, r), 0.0, 1.0, DType::F32, &dev)?,
            )
        };
        Ok(Self {
            kind: *base.kind(),
            wshape: base.weight_dims().to_vec(),
            r,
            scale: Self::scale_for(&opts, r),
            ranknum: r as f32,
            opts,
            a: Var::from_tensor(&a)?,
            e: Var::from_tensor(&e)?,
            b: Var::from_tensor(&b)?,
            saved_dtype: DType::F32,
        })
    }

    /// An adapter from tensors as PEFT saves them (keys `lora_A`, `lora_E`, `lora_B`), resized by the
    /// options' mask as PEFT's `resize_modules_by_rank_pattern` does.
    pub fn from_tensors(
        base: &BaseLayer,
        opts: AdaLoraOptions,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        Self::check_base(base)?;
        let (i, o) = Self::dims(base);
        let r = opts.loaded_rank();
        let get = |k: &str| {
            tensors
                .get(k)
                .ok_or_else(|| PeftError::MissingKey(k.to_string()))
        };
        let (a, e, b) = (get("lora_A")?, get("lora_E")?, get("lora_B")?);
        check_shape("lora_A", a, &[r, i])?;
        check_shape("lora_E", e, &[r, 1])?;
        check_shape("lora_B", b, &[o, r])?;
        let extra: Vec<String> = tensors
            .keys()
            .filter(|k| !["lora_A", "lora_E", "lora_B"].contains(&k.as_str()))
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        let saved_dtype = a.dtype();
        let to_var =
            |t: &Tensor| -> Result<Var> { Ok(Var::from_tensor(&t.to_dtype(DType::F32)?)?) };
        Ok(Self {
            kind: *base.kind(),
            wshape: base.weight_dims().to_vec(),
            r,
            scale: Self::scale_for(&opts, r),
            // PEFT copies the old ranknum (init_r) back only when the kept rank is positive.
            ranknum: if r > 0 { opts.init_r as f32 } else { 0.0 },
            opts,
            a: to_var(a)?,
            e: to_var(e)?,
            b: to_var(b)?,
            saved_dtype,
        })
    }

    /// The options this adapter was built with.
    pub fn options(&self) -> &AdaLoraOptions {
        &self.opts
    }

    /// The current rank (rows of A, E and B).
    pub fn rank(&self) -> usize {
        self.r
    }

    /// The factor the low-rank product is multiplied by: `scale / (ranknum + 1e-5)`, in f32 as PEFT.
    pub fn factor(&self) -> f64 {
        let denom = self.ranknum + 1e-5f32;
        self.scale / denom as f64
    }

    /// `lora_A` (f32).
    pub fn lora_a(&self) -> &Tensor {
        self.a.as_tensor()
    }

    /// `lora_E` (f32).
    pub fn lora_e(&self) -> &Tensor {
        self.e.as_tensor()
    }

    /// `lora_B` (f32).
    pub fn lora_b(&self) -> &Tensor {
        self.b.as_tensor()
    }

    /// `A ⊙ E`, `[r, in]`.
    fn a_e(&self) -> Result<Tensor> {
        Ok(self.a.as_tensor().broadcast_mul(self.e.as_tensor())?)
    }

    /// `B (A ⊙ E) · scale / (ranknum + 1e-5)` in the base weight's own layout (PEFT's `get_delta_weight`).
    fn delta(&self, wshape: &[usize]) -> Result<Tensor> {
        if self.r == 0 {
            return Ok(Tensor::zeros(
                wshape,
                DType::F32,
                self.a.as_tensor().device(),
            )?);
        }
        let d = self.b.as_tensor().matmul(&self.a_e()?)?;
        let d = match self.kind {
            BaseKind::Conv1D => d.t()?.contiguous()?,
            BaseKind::Conv2d(_) => d.reshape(wshape)?,
            _ => d,
        };
        Ok(((d * self.scale)? * (1.0 / (self.ranknum + 1e-5f32) as f64))?)
    }

    fn dropout(&self, x: &Tensor, ctx: &CallCtx<'_>) -> Result<Tensor> {
        if !ctx.fwd.training || self.opts.dropout <= 0.0 {
            return Ok(x.clone());
        }
        let mask =
            ctx.rng("lora_dropout")
                .dropout_mask(x.shape(), self.opts.dropout, x.device())?;
        Ok(x.mul(&mask.to_dtype(x.dtype())?)?)
    }

    fn check_kind_of(&self, kind: &BaseKind) -> Result<()> {
        if std::mem::discriminant(&self.kind) != std::mem::discriminant(kind) {
            return Err(PeftError::Invalid(format!(
                "AdaLoRA adapter for {:?} used on a {:?} layer",
                self.kind, kind
            )));
        }
        Ok(())
    }

    /// The rows PEFT saves: with a mask of the config and tensors still at `init_r` (an adapter trained here),
    /// only the kept rows (`resize_state_dict_by_rank_pattern`).
    fn saved_rows(&self, t: &Tensor, rows_dim: usize) -> Result<Tensor> {
        match &self.opts.mask {
            Some(mask) => keep_masked_rows(t, mask, rows_dim),
            None => Ok(t.clone()),
        }
    }
}

/// PEFT's `resize_state_dict_by_rank_pattern` for one tensor: when `t` still has `mask.len()` entries along
/// `rows_dim` (and some are dropped), only the entries where `mask` is `true` (zero-size when none is);
/// otherwise `t` unchanged (already truncated).
pub fn keep_masked_rows(t: &Tensor, mask: &[bool], rows_dim: usize) -> Result<Tensor> {
    let kept: Vec<u32> = mask
        .iter()
        .enumerate()
        .filter(|(_, k)| **k)
        .map(|(i, _)| i as u32)
        .collect();
    if t.dim(rows_dim)? == kept.len() || t.dim(rows_dim)? != mask.len() {
        return Ok(t.clone());
    }
    if kept.is_empty() {
        let mut shape = t.dims().to_vec();
        shape[rows_dim] = 0;
        return Ok(Tensor::zeros(shape, t.dtype(), t.device())?);
    }
    let idx = Tensor::from_vec(kept.clone(), kept.len(), t.device())?;
    Ok(t.index_select(&idx, rows_dim)?)
}

impl Adapter for AdaLoraAdapter {
    fn peft_type(&self) -> &'static str {
        "ADALORA"
    }

    fn transform_output(
        &self,
        base: &BaseLayer,
        x: &Tensor,
        result: Tensor,
        ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        self.check_kind_of(base.kind())?;
        let result = result.to_dtype(DType::F32)?;
        if self.r == 0 {
            return Ok(result);
        }
        let x32 = x.to_dtype(DType::F32)?;
        let xd = self.dropout(&x32, ctx)?;
        let factor = self.factor();
        match self.kind {
            BaseKind::Conv2d(spec) => {
                let delta = self.delta(base.weight_dims())?;
                let h = xd.conv2d(
                    &delta,
                    spec.padding,
                    spec.stride,
                    spec.dilation,
                    spec.groups,
                )?;
                Ok((result + h)?)
            }
            _ => {
                let ae = self.a_e()?;
                let b = self.b.as_tensor();
                if !ctx.fwd.training
                    && crate::kernels::lora_add_inplace(&result, &xd, &ae, b, factor)?
                {
                    return Ok(result);
                }
                let h = linear_apply(&linear_apply(&xd, &ae, true)?, b, true)?;
                let h = ((h * self.scale)? * (1.0 / (self.ranknum + 1e-5f32) as f64))?;
                Ok((result + h)?)
            }
        }
    }

    fn delta_weight(&self, kind: &BaseKind) -> Result<Option<(Tensor, Option<Tensor>)>> {
        self.check_kind_of(kind)?;
        Ok(Some((self.delta(&self.wshape)?, None)))
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        let a = self.saved_rows(self.a.as_tensor(), 0);
        let e = self.saved_rows(self.e.as_tensor(), 0);
        let b = self.saved_rows(self.b.as_tensor(), 1);
        match (a, e, b) {
            (Ok(a), Ok(e), Ok(b)) => vec![
                ("lora_A".into(), a),
                ("lora_B".into(), b),
                ("lora_E".into(), e),
            ],
            // Indexing a tensor of the checked shape cannot fail; keep the full tensors if it does.
            _ => self
                .vars()
                .into_iter()
                .map(|(k, v)| (k, v.as_tensor().clone()))
                .collect(),
        }
    }

    fn vars(&self) -> Vec<(String, Var)> {
        vec![
            ("lora_A".into(), self.a.clone()),
            ("lora_B".into(), self.b.clone()),
            ("lora_E".into(), self.e.clone()),
        ]
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        format!(
            "r={} init_r={} alpha={}",
            self.r, self.opts.init_r, self.opts.alpha
        )
    }
}
