//! The VeRA adapter for Linear and GPT-2 Conv1D layers (PEFT's `tuners/vera/layer.py`).
//!
//! One pair of frozen random projections is shared by every layer of an adapter: `vera_A` `[r, max_in]` and
//! `vera_B` `[max_out, r]`, sized by the largest targeted layer ([`VeraProjections`]). Each layer trains two
//! vectors, `vera_lambda_b` `[out]` and `vera_lambda_d` `[r]`, and slices the projections to its own size:
//!
//! ```text
//! y  = base(x) + λ_b ⊙ (B[:out] (λ_d ⊙ (A[:, :in] x)))
//! ΔW = (λ_b[:, None] · B[:out]) @ (λ_d[:, None] · A[:, :in])     ([out, in]; transposed for Conv1D)
//! ```
//!
//! with no extra scale. On disk the lambdas are `base_model.model.<module>.vera_lambda_b` / `…_d` and, when
//! `save_projection` is true, the projections are `base_model.vera_A` / `base_model.vera_B`; otherwise they are
//! regenerated from `projection_prng_key` ([`super::prng`]).

use super::config::VeraConfig;
use super::prng;
use crate::layer::base::linear_apply;
use crate::layer::{
    Adapter, BaseKind, BaseLayer, CallCtx, NamedTensor, check_shape,
};
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Device, Tensor, Var};
use indexmap::IndexMap;

/// The key of the shared `vera_A` in an adapter file.
pub const VERA_A_KEY: &str = "base_model.vera_A";
/// The key of the shared `vera_B` in an adapter file.
pub const VERA_B_KEY: &str = "base_model.vera_B";

/// The shared projections of one VeRA adapter: `vera_A` `[r, max_in]` and `vera_B` `[max_out, r]`, in the
/// dtype they were read or generated in (generated ones are f32, as PEFT's). Clones share storage.
#[derive(Clone, Debug)]
pub struct VeraProjections {
    /// `vera_A` `[r, max_in]`.
    pub a: Tensor,
    /// `vera_B` `[max_out, r]`.
    pub b: Tensor,
}

impl VeraProjections {
    /// PEFT's `_init_vera_A_vera_B`: both projections drawn from torch's CPU generator seeded with
    /// `projection_prng_key`, bit for bit.
    pub fn generate(
        projection_prng_key: i64,
        r: usize,
        max_in: usize,
        max_out: usize,
        device: &Device,
    ) -> Result<Self> {
        let (a, b) = prng::vera_projections(projection_prng_key, r, max_in, max_out);
        Ok(Self {
            a: Tensor::from_vec(a, (r, max_in), device)?,
            b: Tensor::from_vec(b, (max_out, r), device)?,
        })
    }

    /// The projections among model-level tensors keyed as in a file (`base_model.vera_A`, `base_model.vera_B`).
    /// Any other key is an error.
    pub fn from_shared(shared: &IndexMap<String, Tensor>) -> Result<Self> {
        let get = |k: &str| {
            shared
                .get(k)
                .cloned()
                .ok_or_else(|| PeftError::MissingKey(k.to_string()))
        };
        let extra: Vec<String> = shared
            .keys()
            .filter(|k| *k != VERA_A_KEY && *k != VERA_B_KEY)
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        let (a, b) = (get(VERA_A_KEY)?, get(VERA_B_KEY)?);
        if a.rank() != 2 || b.rank() != 2 || a.dim(0)? != b.dim(1)? {
            return Err(PeftError::Invalid(format!(
                "VeRA projections must be vera_A [r, in] and vera_B [out, r], got {:?} and {:?}",
                a.dims(),
                b.dims()
            )));
        }
        Ok(Self { a, b })
    }

    /// The projections an adapter uses, as PEFT obtains them: from the file's `base_model.vera_A` / `vera_B`
    /// when `save_projection` is true (an error when they are missing), otherwise regenerated from
    /// `projection_prng_key` over the largest `(in, out)` of the targeted layers (PEFT's `_find_dim`); PEFT
    /// ignores saved projections then, and so do we. `file_shared` holds the file's keys outside
    /// `base_model.model.`.
    pub fn resolve(
        config: &VeraConfig,
        file_shared: &IndexMap<String, Tensor>,
        dims: impl IntoIterator<Item = (usize, usize)>,
        device: &Device,
    ) -> Result<Self> {
        if config.save_projection {
            let p = Self::from_shared(file_shared)?;
            if p.a.dim(0)? != config.r {
                return Err(PeftError::ShapeMismatch {
                    name: VERA_A_KEY.into(),
                    expected: vec![config.r, p.a.dim(1)?],
                    got: p.a.dims().to_vec(),
                });
            }
            return Ok(p);
        }
        let extra: Vec<String> = file_shared
            .keys()
            .filter(|k| *k != VERA_A_KEY && *k != VERA_B_KEY)
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        let (max_in, max_out) = dims
            .into_iter()
            .fold(None, |acc: Option<(usize, usize)>, (i, o)| {
                Some(acc.map_or((i, o), |(a, b)| (a.max(i), b.max(o))))
            })
            .ok_or_else(|| {
                PeftError::Invalid(
                    "No layers types compatible with VeRA were found. Please check `peft_config.target_modules`."
                        .into(),
                )
            })?;
        Self::generate(
            config.projection_prng_key,
            config.r,
            max_in,
            max_out,
            device,
        )
    }

    /// The model-level tensors PEFT saves for these projections (only with `save_projection`).
    pub fn to_shared(&self) -> Vec<NamedTensor> {
        vec![
            (VERA_A_KEY.to_string(), self.a.clone()),
            (VERA_B_KEY.to_string(), self.b.clone()),
        ]
    }
}

/// One VeRA adapter inside one Linear or Conv1D layer. The lambdas are f32 `Var`s; the projections are
/// (f32 clones of) the adapter's shared [`VeraProjections`].
#[derive(Debug)]
pub struct VeraAdapter {
    kind: BaseKind,
    in_features: usize,
    out_features: usize,
    r: usize,
    a: Tensor,
    b: Tensor,
    lambda_b: Var,
    lambda_d: Var,
    dropout: f64,
    saved_dtype: DType,
}

impl VeraAdapter {
    fn check_base(base: &BaseLayer, config: &VeraConfig, proj: &VeraProjections) -> Result<()> {
        let r = config.r;
        if config.bias != crate::config::BiasMode::None {
            return Err(PeftError::Unsupported {
                field: "bias".into(),
                value: config.bias.as_str().to_string(),
                reason: "VeRA with trained biases is not implemented yet".into(),
            });
        }
        if !matches!(base.kind(), BaseKind::Linear | BaseKind::Conv1D) {
            return Err(PeftError::Unsupported {
                field: "target_modules".into(),
                value: format!("a {:?} layer", base.kind()),
                reason: "Currently, only `torch.nn.Linear` and `transformers.pytorch_utils.Conv1D` are supported \
                         by VeRA (as in PEFT)"
                    .into(),
            });
        }
        if r == 0 {
            return Err(PeftError::InvalidConfig(
                "`r` should be a positive integer value but the value passed is 0".into(),
            ));
        }
        let (i, o) = (base.in_features(), base.out_features());
        if proj.a.dim(0)? != r || proj.a.dim(1)? < i {
            return Err(PeftError::ShapeMismatch {
                name: VERA_A_KEY.into(),
                expected: vec![r, i.max(proj.a.dim(1)?)],
                got: proj.a.dims().to_vec(),
            });
        }
        if proj.b.dim(1)? != r || proj.b.dim(0)? < o {
            return Err(PeftError::ShapeMismatch {
                name: VERA_B_KEY.into(),
                expected: vec![o.max(proj.b.dim(0)?), r],
                got: proj.b.dims().to_vec(),
            });
        }
        Ok(())
    }

    fn assemble(
        base: &BaseLayer,
        config: &VeraConfig,
        proj: &VeraProjections,
        lambda_b: Tensor,
        lambda_d: Tensor,
        saved_dtype: DType,
    ) -> Result<Self> {
        Ok(Self {
            kind: *base.kind(),
            in_features: base.in_features(),
            out_features: base.out_features(),
            r: config.r,
            a: proj.a.to_dtype(DType::F32)?,
            b: proj.b.to_dtype(DType::F32)?,
            lambda_b: Var::from_tensor(&lambda_b.to_dtype(DType::F32)?)?,
            lambda_d: Var::from_tensor(&lambda_d.to_dtype(DType::F32)?)?,
            dropout: config.vera_dropout,
            saved_dtype,
        })
    }

    /// A freshly initialised adapter (PEFT's `update_layer`): with `init_weights`, `λ_b = 0` and
    /// `λ_d = d_initial`; without, `λ_b = 1` and `λ_d ~ N(0, 1)` drawn from `rng`.
    pub fn new(
        base: &BaseLayer,
        config: &VeraConfig,
        proj: &VeraProjections,
        rng: &mut PeftRng,
    ) -> Result<Self> {
        Self::check_base(base, config, proj)?;
        let dev = base.device();
        let o = base.out_features();
        let (lb, ld) = if config.init_weights {
            (
                Tensor::zeros(o, DType::F32, dev)?,
                Tensor::full(config.d_initial as f32, config.r, dev)?,
            )
        } else {
            (
                Tensor::ones(o, DType::F32, dev)?,
                rng.normal_tensor(config.r, 0.0, 1.0, DType::F32, dev)?,
            )
        };
        Self::assemble(base, config, proj, lb, ld, DType::F32)
    }

    /// An adapter from the tensors PEFT saves for one module (`vera_lambda_b`, `vera_lambda_d`; keys relative
    /// to the module, adapter name stripped) and the adapter's shared projections. Every key must be used.
    pub fn from_tensors(
        base: &BaseLayer,
        config: &VeraConfig,
        proj: &VeraProjections,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        Self::check_base(base, config, proj)?;
        let get = |k: &str| {
            tensors
                .get(k)
                .ok_or_else(|| PeftError::MissingKey(k.to_string()))
        };
        let lb = get("vera_lambda_b")?;
        let ld = get("vera_lambda_d")?;
        check_shape("vera_lambda_b", lb, &[base.out_features()])?;
        check_shape("vera_lambda_d", ld, &[config.r])?;
        let extra: Vec<String> = tensors
            .keys()
            .filter(|k| *k != "vera_lambda_b" && *k != "vera_lambda_d")
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        Self::assemble(base, config, proj, lb.clone(), ld.clone(), lb.dtype())
    }

    /// `vera_lambda_b` `[out]` (f32).
    pub fn lambda_b(&self) -> &Tensor {
        self.lambda_b.as_tensor()
    }

    /// `vera_lambda_d` `[r]` (f32).
    pub fn lambda_d(&self) -> &Tensor {
        self.lambda_d.as_tensor()
    }

    /// `A[:, :in]` and `B[:out]`, contiguous (a view when the layer is the largest one).
    fn sliced(&self) -> Result<(Tensor, Tensor)> {
        let a = self.a.narrow(1, 0, self.in_features)?.contiguous()?;
        let b = self.b.narrow(0, 0, self.out_features)?.contiguous()?;
        Ok((a, b))
    }

    /// `ΔW` in the base weight's layout (`[out, in]`, Conv1D `[in, out]`), f32 (PEFT's `get_delta_weight`).
    pub fn delta(&self) -> Result<Tensor> {
        let (a, b) = self.sliced()?;
        let lb = self.lambda_b.as_tensor().unsqueeze(1)?;
        let ld = self.lambda_d.as_tensor().unsqueeze(1)?;
        let d = b.broadcast_mul(&lb)?.matmul(&a.broadcast_mul(&ld)?)?;
        Ok(match self.kind {
            BaseKind::Conv1D => d.t()?.contiguous()?,
            _ => d,
        })
    }

    fn check_kind(&self, kind: &BaseKind) -> Result<()> {
        if *kind != self.kind {
            return Err(PeftError::Invalid(format!(
                "VeRA adapter for {:?} used on a {kind:?} layer",
                self.kind
            )));
        }
        Ok(())
    }
}

impl Adapter for VeraAdapter {
    /// PEFT's `supports_lora_conversion`: Linear and GPT-2 Conv1D layers, by their additive delta.
    fn lora_conversion(
        &self,
        base: &crate::layer::BaseLayer,
    ) -> Result<Option<crate::layer::LoraConversion>> {
        crate::tuners::lora::conversion::additive_conversion(self, base, true)
    }

    fn peft_type(&self) -> &'static str {
        "VERA"
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
                .rng("vera_dropout")
                .dropout_mask(x.shape(), self.dropout, x.device())?;
            x.mul(&mask)?
        } else {
            x
        };
        let (a, b) = self.sliced()?;
        let h = linear_apply(&x, &a, true)?.broadcast_mul(self.lambda_d.as_tensor())?;
        let h = linear_apply(&h, &b, true)?.broadcast_mul(self.lambda_b.as_tensor())?;
        Ok((result.to_dtype(DType::F32)? + h)?)
    }

    fn delta_weight(&self, kind: &BaseKind) -> Result<Option<(Tensor, Option<Tensor>)>> {
        self.check_kind(kind)?;
        Ok(Some((self.delta()?, None)))
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        self.vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect()
    }

    fn vars(&self) -> Vec<(String, Var)> {
        vec![
            ("vera_lambda_b".into(), self.lambda_b.clone()),
            ("vera_lambda_d".into(), self.lambda_d.clone()),
        ]
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        format!(
            "r={} shared vera_A [{}, {}] vera_B [{}, {}]",
            self.r,
            self.a.dim(0).unwrap_or(0),
            self.a.dim(1).unwrap_or(0),
            self.b.dim(0).unwrap_or(0),
            self.b.dim(1).unwrap_or(0)
        )
    }
}
