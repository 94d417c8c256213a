//! The RandLoRA adapter for Linear and GPT-2 Conv1D layers (PEFT's `tuners/randlora/layer.py`).
//!
//! Two frozen random bases are shared by every layer of an adapter ([`RandLoraBases`]): `randlora_A`
//! `[r, 1, A_min]` and `randlora_B` `[B_max, B_n, r]`, sized by the largest targeted layer. A layer with
//! `min = min(in, out)`, `max = max(in, out)` and `n = ceil(min / r)` bases trains `randlora_lambda` `[r, n]` and
//! `randlora_gamma` `[n, min]`, and slices the bases (PEFT's `get_scaled_bases` and `UniqueBaseGrad.forward`):
//!
//! ```text
//! P = (λ[:, :, None] · A[:, :, :min] · γ[None]).reshape(r·n, min)      (flattened rank-major)
//! Q = B[:max, :n, :].reshape(max, n·r)                                 (flattened basis-major, as PEFT)
//! ΔW = Q @ P · alpha/r            when in ≤ out    ([out, in])
//! ΔW = (Q @ P)ᵀ · alpha/r         when in > out    (transposed again for a Conv1D)
//! ```
//!
//! The forward adds `x·ΔWᵀ` as two products through the `r·n`-wide middle (`x Pᵀ Qᵀ`, or `x Q P`), in float32.
//! PEFT's custom autograd function only saves memory: its gradients are those of this product, which candle's
//! autograd gives. On disk the trained tensors are `base_model.model.<module>.randlora_lambda` / `…_gamma`;
//! with `save_projection` the bases are `base_model.randlora_A` / `base_model.randlora_B` and, as PEFT writes
//! them, once more under every layer (`base_model.model.<module>.randlora_A` / `…_B`, the whole shared tensors).
//! Without it the bases are regenerated from `projection_prng_key` ([`super::prng`]).

use super::config::{BasisKind, RandLoraConfig};
use super::prng;
use crate::layer::base::linear_apply;
use crate::layer::{Adapter, BaseKind, BaseLayer, CallCtx, NamedTensor, check_shape};
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Device, Tensor, Var};
use indexmap::IndexMap;

/// The key of the shared `randlora_A` in an adapter file.
pub const RANDLORA_A_KEY: &str = "base_model.randlora_A";
/// The key of the shared `randlora_B` in an adapter file.
pub const RANDLORA_B_KEY: &str = "base_model.randlora_B";
/// `randlora_lambda` `[r, n]`.
pub const LAMBDA: &str = "randlora_lambda";
/// `randlora_gamma` `[n, min(in, out)]`.
pub const GAMMA: &str = "randlora_gamma";
/// The per-layer copy of `randlora_A` PEFT saves with `save_projection`.
pub const LAYER_A: &str = "randlora_A";
/// The per-layer copy of `randlora_B` PEFT saves with `save_projection`.
pub const LAYER_B: &str = "randlora_B";

/// The shared bases of one RandLoRA adapter: `randlora_A` `[r, 1, min_dim]` and `randlora_B`
/// `[max_dim, num_bases, r]`, as read or generated (generated ones are float32 holding PEFT's values). Clones
/// share storage.
#[derive(Clone, Debug)]
pub struct RandLoraBases {
    /// `randlora_A` `[r, 1, min_dim]`.
    pub a: Tensor,
    /// `randlora_B` `[max_dim, num_bases, r]`.
    pub b: Tensor,
}

fn invalid_bases(a: &Tensor, b: &Tensor) -> PeftError {
    PeftError::Invalid(format!(
        "RandLoRA bases must be randlora_A [r, 1, min_dim] and randlora_B [max_dim, num_bases, r], got {:?} and {:?}",
        a.dims(),
        b.dims()
    ))
}

impl RandLoraBases {
    /// PEFT's `_init_randlora_A_randlora_B` (dense) or `_init_randlora_A_randlora_B_sparse` (`sparse`,
    /// `very_sparse`) for the largest targeted `(out, in)`, bit for bit.
    pub fn generate(
        config: &RandLoraConfig,
        max_out: usize,
        max_in: usize,
        device: &Device,
    ) -> Result<Self> {
        let r = config.r;
        if r == 0 {
            return Err(PeftError::InvalidConfig(
                "`r` should be a positive integer value but the value passed is 0".into(),
            ));
        }
        let (max_dim, min_dim) = (max_out.max(max_in), max_out.min(max_in));
        let sparsity = match config.basis_kind() {
            BasisKind::Dense => None,
            BasisKind::Sparse => Some(3.0),
            BasisKind::VerySparse => Some((min_dim as f64).sqrt()),
        };
        let (a, b) = prng::randlora_bases(config.projection_prng_key, r, max_out, max_in, sparsity);
        let nb = prng::num_bases(min_dim, r);
        Ok(Self {
            a: Tensor::from_vec(a, (r, 1, min_dim), device)?,
            b: Tensor::from_vec(b, (max_dim, nb, r), device)?,
        })
    }

    /// The bases among model-level tensors keyed as in a file (`base_model.randlora_A`,
    /// `base_model.randlora_B`). Any other key is an error.
    pub fn from_shared(shared: &IndexMap<String, Tensor>) -> Result<Self> {
        refuse_other_keys(shared)?;
        let get = |k: &str| {
            shared
                .get(k)
                .cloned()
                .ok_or_else(|| PeftError::MissingKey(k.to_string()))
        };
        let (a, b) = (get(RANDLORA_A_KEY)?, get(RANDLORA_B_KEY)?);
        if a.rank() != 3 || b.rank() != 3 || a.dim(1)? != 1 || a.dim(0)? != b.dim(2)? {
            return Err(invalid_bases(&a, &b));
        }
        Ok(Self { a, b })
    }

    /// The bases an adapter uses, as PEFT obtains them: the file's `base_model.randlora_A` / `_B` when
    /// `save_projection` is true (an error when they are missing), otherwise regenerated from
    /// `projection_prng_key` over the element-wise largest `(out, in)` of the targeted layers (PEFT's
    /// `_find_dim`). `file_shared` holds the file's keys outside `base_model.model.`; `dims` are
    /// `(in_features, out_features)` pairs.
    pub fn resolve(
        config: &RandLoraConfig,
        file_shared: &IndexMap<String, Tensor>,
        dims: impl IntoIterator<Item = (usize, usize)>,
        device: &Device,
    ) -> Result<Self> {
        if config.save_projection {
            let p = Self::from_shared(file_shared)?;
            if p.a.dim(0)? != config.r {
                return Err(PeftError::ShapeMismatch {
                    name: RANDLORA_A_KEY.into(),
                    expected: vec![config.r, 1, p.a.dim(2)?],
                    got: p.a.dims().to_vec(),
                });
            }
            return Ok(p);
        }
        refuse_other_keys(file_shared)?;
        let (max_in, max_out) = dims
            .into_iter()
            .fold(None, |acc: Option<(usize, usize)>, (i, o)| {
                Some(acc.map_or((i, o), |(a, b)| (a.max(i), b.max(o))))
            })
            .ok_or_else(|| {
                PeftError::Invalid(
                    "No layers types compatible with RandLora were found. Please check `peft_config.target_modules`."
                        .into(),
                )
            })?;
        Self::generate(config, max_out, max_in, device)
    }

    /// The model-level tensors PEFT saves for these bases (only with `save_projection`).
    pub fn to_shared(&self) -> Vec<NamedTensor> {
        vec![
            (RANDLORA_A_KEY.to_string(), self.a.clone()),
            (RANDLORA_B_KEY.to_string(), self.b.clone()),
        ]
    }
}

fn refuse_other_keys(shared: &IndexMap<String, Tensor>) -> Result<()> {
    let extra: Vec<String> = shared
        .keys()
        .filter(|k| *k != RANDLORA_A_KEY && *k != RANDLORA_B_KEY)
        .cloned()
        .collect();
    if extra.is_empty() {
        Ok(())
    } else {
        Err(PeftError::UnexpectedKeys(extra))
    }
}

/// One RandLoRA adapter inside one Linear or Conv1D layer. `randlora_lambda` / `randlora_gamma` are float32
/// `Var`s; the bases are float32 clones of the adapter's shared [`RandLoraBases`].
#[derive(Debug)]
pub struct RandLoraAdapter {
    kind: BaseKind,
    in_features: usize,
    out_features: usize,
    r: usize,
    num_bases: usize,
    scaling: f64,
    a: Tensor,
    b: Tensor,
    lambda: Var,
    gamma: Var,
    dropout: f64,
    save_bases: bool,
    saved_dtype: DType,
}

impl RandLoraAdapter {
    fn check_base(base: &BaseLayer, config: &RandLoraConfig, bases: &RandLoraBases) -> Result<usize> {
        if config.bias != crate::config::BiasMode::None {
            return Err(PeftError::Unsupported {
                field: "bias".into(),
                value: config.bias.as_str().to_string(),
                reason: "RandLoRA with trained biases is not implemented yet".into(),
            });
        }
        if !matches!(base.kind(), BaseKind::Linear | BaseKind::Conv1D) {
            return Err(PeftError::Unsupported {
                field: "target_modules".into(),
                value: format!("a {:?} layer", base.kind()),
                reason: "Currently, only the following modules are supported: `torch.nn.Linear`, \
                         `transformers.pytorch_utils.Conv1D` (as in PEFT)"
                    .into(),
            });
        }
        let r = config.r;
        if r == 0 {
            return Err(PeftError::InvalidConfig(
                "`r` should be a positive integer value but the value passed is 0".into(),
            ));
        }
        let (i, o) = (base.in_features(), base.out_features());
        let (max_dim, min_dim) = (i.max(o), i.min(o));
        let nb = prng::num_bases(min_dim, r);
        let (a, b) = (&bases.a, &bases.b);
        if a.rank() != 3 || b.rank() != 3 {
            return Err(invalid_bases(a, b));
        }
        if a.dim(0)? != r || a.dim(1)? != 1 || a.dim(2)? < min_dim {
            return Err(PeftError::ShapeMismatch {
                name: RANDLORA_A_KEY.into(),
                expected: vec![r, 1, min_dim.max(a.dim(2)?)],
                got: a.dims().to_vec(),
            });
        }
        if b.dim(2)? != r || b.dim(0)? < max_dim || b.dim(1)? < nb {
            return Err(PeftError::ShapeMismatch {
                name: RANDLORA_B_KEY.into(),
                expected: vec![max_dim.max(b.dim(0)?), nb.max(b.dim(1)?), r],
                got: b.dims().to_vec(),
            });
        }
        Ok(nb)
    }

    fn assemble(
        base: &BaseLayer,
        config: &RandLoraConfig,
        bases: &RandLoraBases,
        lambda: Tensor,
        gamma: Tensor,
        saved_dtype: DType,
    ) -> Result<Self> {
        let (i, o) = (base.in_features(), base.out_features());
        Ok(Self {
            kind: *base.kind(),
            in_features: i,
            out_features: o,
            r: config.r,
            num_bases: prng::num_bases(i.min(o), config.r),
            scaling: config.scaling(),
            a: bases.a.to_dtype(DType::F32)?,
            b: bases.b.to_dtype(DType::F32)?,
            lambda: Var::from_tensor(&lambda.to_dtype(DType::F32)?)?,
            gamma: Var::from_tensor(&gamma.to_dtype(DType::F32)?)?,
            dropout: config.randlora_dropout,
            save_bases: config.save_projection,
            saved_dtype,
        })
    }

    /// A freshly initialised adapter (PEFT's `update_layer`): with `init_weights`, `λ = 0` (the identity) and
    /// `γ = 1 / max(n, min)`; without, `λ ~ N(0, 1)` drawn from `rng` and `γ = 1 / max(in, out)`.
    pub fn new(
        base: &BaseLayer,
        config: &RandLoraConfig,
        bases: &RandLoraBases,
        rng: &mut PeftRng,
    ) -> Result<Self> {
        let nb = Self::check_base(base, config, bases)?;
        let dev = base.device();
        let (i, o) = (base.in_features(), base.out_features());
        let min_dim = i.min(o);
        let (lambda, gamma) = if config.init_weights {
            (
                Tensor::zeros((config.r, nb), DType::F32, dev)?,
                Tensor::full(1.0 / nb.max(min_dim) as f32, (nb, min_dim), dev)?,
            )
        } else {
            (
                rng.normal_tensor((config.r, nb), 0.0, 1.0, DType::F32, dev)?,
                Tensor::full(1.0 / i.max(o) as f32, (nb, min_dim), dev)?,
            )
        };
        Self::assemble(base, config, bases, lambda, gamma, DType::F32)
    }

    /// An adapter from the tensors PEFT saves for one module (`randlora_lambda`, `randlora_gamma`, and with
    /// `save_projection` the per-layer copies `randlora_A` / `randlora_B`, which must have the shared bases'
    /// shapes; keys relative to the module, adapter name stripped) and the adapter's shared bases. Every key
    /// must be used.
    pub fn from_tensors(
        base: &BaseLayer,
        config: &RandLoraConfig,
        bases: &RandLoraBases,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        let nb = Self::check_base(base, config, bases)?;
        let get = |k: &str| {
            tensors
                .get(k)
                .ok_or_else(|| PeftError::MissingKey(k.to_string()))
        };
        let min_dim = base.in_features().min(base.out_features());
        let lambda = get(LAMBDA)?;
        let gamma = get(GAMMA)?;
        check_shape(LAMBDA, lambda, &[config.r, nb])?;
        check_shape(GAMMA, gamma, &[nb, min_dim])?;
        for (k, shared) in [(LAYER_A, &bases.a), (LAYER_B, &bases.b)] {
            if let Some(t) = tensors.get(k) {
                check_shape(k, t, shared.dims())?;
            }
        }
        let extra: Vec<String> = tensors
            .keys()
            .filter(|k| ![LAMBDA, GAMMA, LAYER_A, LAYER_B].contains(&k.as_str()))
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        Self::assemble(
            base,
            config,
            bases,
            lambda.clone(),
            gamma.clone(),
            lambda.dtype(),
        )
    }

    /// `randlora_lambda` `[r, n]` (f32).
    pub fn lambda(&self) -> &Tensor {
        self.lambda.as_tensor()
    }

    /// `randlora_gamma` `[n, min(in, out)]` (f32).
    pub fn gamma(&self) -> &Tensor {
        self.gamma.as_tensor()
    }

    /// The number of bases `n = ceil(min(in, out) / r)`.
    pub fn num_bases(&self) -> usize {
        self.num_bases
    }

    /// `(P, Q)`: the scaled smaller basis `P` `[r·n, min]` and the sliced larger one `Q` `[max, n·r]`.
    fn scaled_bases(&self) -> Result<(Tensor, Tensor)> {
        let (i, o) = (self.in_features, self.out_features);
        let (max_dim, min_dim) = (i.max(o), i.min(o));
        let (r, nb) = (self.r, self.num_bases);
        let a = self.a.narrow(2, 0, min_dim)?;
        let q = self
            .b
            .narrow(0, 0, max_dim)?
            .narrow(1, 0, nb)?
            .contiguous()?
            .reshape((max_dim, nb * r))?;
        let p = self
            .lambda
            .as_tensor()
            .unsqueeze(2)?
            .broadcast_mul(&a)?
            .broadcast_mul(&self.gamma.as_tensor().unsqueeze(0)?)?
            .reshape((r * nb, min_dim))?;
        Ok((p, q))
    }

    /// `ΔW` in the base weight's layout (`[out, in]`, Conv1D `[in, out]`), f32 (PEFT's `get_delta_weight`).
    pub fn delta(&self) -> Result<Tensor> {
        let (p, q) = self.scaled_bases()?;
        let d = q.matmul(&p)?; // [max, min]
        let d = if self.in_features <= self.out_features {
            d
        } else {
            d.t()?.contiguous()?
        };
        let d = (d * self.scaling)?;
        Ok(match self.kind {
            BaseKind::Conv1D => d.t()?.contiguous()?,
            _ => d,
        })
    }

    fn check_kind(&self, kind: &BaseKind) -> Result<()> {
        if *kind != self.kind {
            return Err(PeftError::Invalid(format!(
                "RandLoRA adapter for {:?} used on a {kind:?} layer",
                self.kind
            )));
        }
        Ok(())
    }
}

impl Adapter for RandLoraAdapter {
    /// PEFT's `supports_lora_conversion`: Linear and GPT-2 Conv1D layers, by their additive delta.
    fn lora_conversion(
        &self,
        base: &crate::layer::BaseLayer,
    ) -> Result<Option<crate::layer::LoraConversion>> {
        crate::tuners::lora::conversion::additive_conversion(self, base, true)
    }

    fn peft_type(&self) -> &'static str {
        "RANDLORA"
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
                .rng("randlora_dropout")
                .dropout_mask(x.shape(), self.dropout, x.device())?;
            x.mul(&mask)?
        } else {
            x
        };
        let (p, q) = self.scaled_bases()?;
        let h = if self.in_features <= self.out_features {
            // F.linear(F.linear(x, P), Q)
            linear_apply(&linear_apply(&x, &p, true)?, &q, true)?
        } else {
            // F.linear(F.linear(x, Qᵀ), Pᵀ)
            linear_apply(&linear_apply(&x, &q, false)?, &p, false)?
        };
        Ok((result.to_dtype(DType::F32)? + (h * self.scaling)?)?)
    }

    fn delta_weight(&self, kind: &BaseKind) -> Result<Option<(Tensor, Option<Tensor>)>> {
        self.check_kind(kind)?;
        Ok(Some((self.delta()?, None)))
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        let mut out: Vec<NamedTensor> = self
            .vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect();
        if self.save_bases {
            out.push((LAYER_A.into(), self.a.clone()));
            out.push((LAYER_B.into(), self.b.clone()));
        }
        out
    }

    fn vars(&self) -> Vec<(String, Var)> {
        vec![
            (LAMBDA.into(), self.lambda.clone()),
            (GAMMA.into(), self.gamma.clone()),
        ]
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        format!(
            "r={} bases={} scaling={} shared randlora_A {:?} randlora_B {:?}",
            self.r,
            self.num_bases,
            self.scaling,
            self.a.dims(),
            self.b.dims()
        )
    }
}
