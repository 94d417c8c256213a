//! The LoRA adapter for Linear, Embedding, Conv2d and GPT-2 Conv1D layers (PEFT's `tuners/lora/layer.py`).
//!
//! Shapes, as PEFT stores them:
//!
//! | base | `lora_A` | `lora_B` | DoRA `lora_magnitude_vector` |
//! |---|---|---|---|
//! | Linear `[out, in]`, Conv1D `[in, out]` | `lora_A.weight` `[r, in]` | `lora_B.weight` `[out, r]` (+ `lora_B.bias` `[out]`) | `[out]` |
//! | Conv2d `[out, in, kh, kw]` | `lora_A.weight` `[r, in, kh, kw]` | `lora_B.weight` `[out, r, 1, 1]` | `[1, out, 1, 1]` |
//! | Embedding `[V, D]` | `lora_embedding_A` `[r, V]` | `lora_embedding_B` `[D, r]` | `[D]` |
//!
//! `y = base(x) + s·B(A(dropout(x)))` with `s = alpha / r` (rsLoRA: `alpha / √r`); DoRA is in [`super::dora`].

use super::config::{InitLoraWeights, LoraConfig};
use super::dora;
use crate::layer::base::linear_apply;
use crate::layer::{
    Adapter, BaseKind, BaseLayer, CallCtx, MergeInput, Merged, NamedTensor, check_shape,
};
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;

/// The settings of one LoRA adapter in one layer (r and alpha already resolved through the patterns).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraOptions {
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
    /// `use_rslora`: scale by `alpha / √r`.
    pub use_rslora: bool,
    /// `use_dora`.
    pub use_dora: bool,
    /// `lora_bias`: a trainable bias on `lora_B`.
    pub lora_bias: bool,
    /// `lora_dropout` (training only).
    pub dropout: f64,
    /// `init_lora_weights`.
    pub init: InitLoraWeights,
}

impl LoraOptions {
    /// The options for `module_name` under `config` (rank and alpha patterns applied).
    pub fn from_config(config: &LoraConfig, module_name: &str) -> Self {
        let (r, alpha) = config.rank_and_alpha_for(module_name);
        Self {
            r,
            alpha,
            use_rslora: config.lora.use_rslora,
            use_dora: config.lora.use_dora,
            lora_bias: config.lora.lora_bias,
            dropout: config.lora.lora_dropout,
            init: config.lora.init_lora_weights.clone(),
        }
    }

    /// The scaling factor `alpha / r` or `alpha / √r`.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// One LoRA (or DoRA) adapter inside one layer. Parameters are f32 `Var`s (PEFT's autocast); the dtype it
/// was created or loaded in is kept for saving.
#[derive(Debug)]
pub struct LoraAdapter {
    kind: BaseKind,
    opts: LoraOptions,
    scaling: f64,
    a: Var,
    b: Var,
    b_bias: Option<Var>,
    magnitude: Option<Var>,
    saved_dtype: DType,
}

impl LoraAdapter {
    /// The tensor keys this adapter saves for a layer of `kind`.
    fn keys(kind: &BaseKind) -> (&'static str, &'static str) {
        match kind {
            BaseKind::Embedding => ("lora_embedding_A", "lora_embedding_B"),
            _ => ("lora_A.weight", "lora_B.weight"),
        }
    }

    /// Shapes of A, B and the DoRA magnitude for `base`.
    fn shapes(base: &BaseLayer, r: usize) -> Result<(Vec<usize>, Vec<usize>, Vec<usize>)> {
        let (i, o) = (base.in_features(), base.out_features());
        Ok(match base.kind() {
            BaseKind::Linear | BaseKind::Conv1D => (vec![r, i], vec![o, r], vec![o]),
            BaseKind::Embedding => (vec![r, i], vec![o, r], vec![o]),
            BaseKind::Conv2d(spec) => {
                if spec.groups != 1 {
                    return Err(PeftError::Unsupported {
                        field: "target_modules".into(),
                        value: format!("a Conv2d with groups={}", spec.groups),
                        reason: "LoRA on grouped convolutions is not implemented".into(),
                    });
                }
                if spec.dilation != 1 {
                    return Err(PeftError::Unsupported {
                        field: "target_modules".into(),
                        value: format!("a Conv2d with dilation={}", spec.dilation),
                        reason: "PEFT's own LoRA forward fails on dilated convolutions".into(),
                    });
                }
                let w = base.weight_dims();
                (vec![r, i, w[2], w[3]], vec![o, r, 1, 1], vec![1, o, 1, 1])
            }
        })
    }

    fn check_opts(base: &BaseLayer, opts: &LoraOptions) -> Result<()> {
        if opts.r == 0 {
            return Err(PeftError::InvalidConfig(format!(
                "`r` should be a positive integer, got {}",
                opts.r
            )));
        }
        if opts.lora_bias {
            if *base.kind() == BaseKind::Embedding {
                return Err(PeftError::Unsupported {
                    field: "lora_bias".into(),
                    value: "true".into(),
                    reason: "lora_bias is not supported for embedding layers (as in PEFT)".into(),
                });
            }
            if base.bias().is_none() {
                return Err(PeftError::InvalidConfig(
                    "`lora_bias=True` was passed but the targeted layer has no bias".into(),
                ));
            }
        }
        Ok(())
    }

    /// A freshly initialised adapter for `base`, drawing from `rng` (PEFT's `init_lora_weights`: `true` is
    /// kaiming-uniform A and zero B, `"gaussian"` is normal A with std 1/r, `false` random B too; embeddings
    /// are the other way round). DoRA's magnitude starts at the norm of the adapted weight.
    pub fn new(base: &BaseLayer, opts: LoraOptions, rng: &mut PeftRng) -> Result<Self> {
        Self::check_opts(base, &opts)?;
        let dev = base.device().clone();
        let (sa, sb, _) = Self::shapes(base, opts.r)?;
        let fan_in_a: usize = sa[1..].iter().product();
        let kaiming = |rng: &mut PeftRng, shape: &[usize], fan_in: usize| {
            let bound = 1.0 / (fan_in as f64).sqrt();
            rng.uniform_tensor(shape, -bound, bound, DType::F32, &dev)
        };
        let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &dev);
        let zero_bias = || opts.lora_bias.then(|| zeros(&[sb[0]])).transpose();
        let method = match &opts.init {
            InitLoraWeights::Bool(b) => Some(*b),
            InitLoraWeights::Method(m) if m.eq_ignore_ascii_case("gaussian") => None,
            // PiSSA / OLoRA (A and B from the base weight; the model subtracts their delta from the base) and
            // the orthogonal init are handled below.
            InitLoraWeights::Method(m) if opts.init.rewrites_base().is_some() || m == "orthogonal" => None,
            InitLoraWeights::Method(m) => {
                return Err(PeftError::Unsupported {
                    field: "init_lora_weights".into(),
                    value: format!("{m:?}"),
                    reason: "only true, false and \"gaussian\" are implemented".into(),
                });
            }
        };
        let (a, b, bb) = if let Some(init) = opts.init.rewrites_base() {
            if opts.use_dora {
                return Err(PeftError::Unsupported {
                    field: "use_dora".into(),
                    value: "true".into(),
                    reason: "DoRA with an initialisation that rewrites the base (PiSSA, OLoRA) is not \
                             implemented yet"
                        .into(),
                });
            }
            let (a, b) = super::rewrite_init::init_factors(init, base, opts.r, opts.scaling())?;
            (a, b, zero_bias()?)
        } else if opts.init == InitLoraWeights::Method("orthogonal".into()) {
            let (a, b) = orthogonal_init(base, opts.r, rng)?;
            (a, b, zero_bias()?)
        } else if *base.kind() == BaseKind::Embedding {
            match method {
                Some(false) => (
                    rng.normal_tensor(sa.as_slice(), 0.0, 1.0, DType::F32, &dev)?,
                    rng.normal_tensor(sb.as_slice(), 0.0, 1.0, DType::F32, &dev)?,
                    None,
                ),
                _ => (
                    zeros(&sa)?,
                    rng.normal_tensor(sb.as_slice(), 0.0, 1.0, DType::F32, &dev)?,
                    None,
                ),
            }
        } else {
            let out = sb[0];
            match method {
                Some(true) => (kaiming(rng, &sa, fan_in_a)?, zeros(&sb)?, zero_bias()?),
                None => (
                    rng.normal_tensor(sa.as_slice(), 0.0, 1.0 / opts.r as f64, DType::F32, &dev)?,
                    zeros(&sb)?,
                    zero_bias()?,
                ),
                Some(false) => {
                    let a = kaiming(rng, &sa, fan_in_a)?;
                    let b = kaiming(rng, &sb, opts.r)?;
                    let bb = if opts.lora_bias {
                        Some(kaiming(rng, &[out], opts.r)?)
                    } else {
                        None
                    };
                    (a, b, bb)
                }
            }
        };
        let mut me = Self {
            kind: *base.kind(),
            scaling: opts.scaling(),
            opts,
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            b_bias: bb.map(|t| Var::from_tensor(&t)).transpose()?,
            magnitude: None,
            saved_dtype: DType::F32,
        };
        if me.opts.use_dora {
            let w = base.weight()?.to_dtype(DType::F32)?;
            let (_, _, sm) = Self::shapes(base, me.opts.r)?;
            let m = dora::weight_norm(&me.kind, &w, &me.lora_weight(false)?, me.scaling)?
                .reshape(sm)?;
            me.magnitude = Some(Var::from_tensor(&m)?);
        }
        Ok(me)
    }

    /// An adapter from tensors as PEFT saves them (keys relative to the module, adapter name stripped).
    /// Every key must be used and every needed key present; shapes are checked against `base`.
    pub fn from_tensors(
        base: &BaseLayer,
        opts: LoraOptions,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        Self::check_opts(base, &opts)?;
        let kind = *base.kind();
        let (ka, kb) = Self::keys(&kind);
        let (sa, sb, sm) = Self::shapes(base, opts.r)?;
        let get = |k: &str| {
            tensors
                .get(k)
                .ok_or_else(|| PeftError::MissingKey(k.to_string()))
        };
        let a = get(ka)?;
        let b = get(kb)?;
        check_shape(ka, a, &sa)?;
        check_shape(kb, b, &sb)?;
        let saved_dtype = a.dtype();
        let to_var =
            |t: &Tensor| -> Result<Var> { Ok(Var::from_tensor(&t.to_dtype(DType::F32)?)?) };
        let mut used = vec![ka, kb];
        let b_bias = if opts.lora_bias {
            let t = get("lora_B.bias")?;
            check_shape("lora_B.bias", t, &[sb[0]])?;
            used.push("lora_B.bias");
            Some(to_var(t)?)
        } else {
            None
        };
        let magnitude = if opts.use_dora {
            let t = get("lora_magnitude_vector")?;
            check_shape("lora_magnitude_vector", t, &sm)?;
            used.push("lora_magnitude_vector");
            Some(to_var(t)?)
        } else {
            None
        };
        let extra: Vec<String> = tensors
            .keys()
            .filter(|k| !used.contains(&k.as_str()))
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        Ok(Self {
            kind,
            scaling: opts.scaling(),
            opts,
            a: to_var(a)?,
            b: to_var(b)?,
            b_bias,
            magnitude,
            saved_dtype,
        })
    }

    /// The options this adapter was built with.
    pub fn options(&self) -> &LoraOptions {
        &self.opts
    }

    /// The scaling factor.
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// `lora_A` (f32).
    pub fn lora_a(&self) -> &Tensor {
        self.a.as_tensor()
    }

    /// `lora_B` (f32).
    pub fn lora_b(&self) -> &Tensor {
        self.b.as_tensor()
    }

    /// DoRA's magnitude, if this is a DoRA adapter.
    pub fn magnitude(&self) -> Option<&Tensor> {
        self.magnitude.as_ref().map(|m| m.as_tensor())
    }

    /// The unscaled low-rank product in the layout of `W` as PyTorch stores it for a Linear (`[out, in]`),
    /// Conv2d (`[out, in, kh, kw]`) or, for an embedding, `[D, V]` (DoRA's `get_lora_weight`).
    /// `with_bias` adds `lora_B.bias` to every column, as PEFT's Linear DoRA forward does (it builds the
    /// product by running `lora_B(lora_A(I))`, which includes the bias).
    pub(crate) fn lora_weight(&self, with_bias: bool) -> Result<Tensor> {
        let a = self.a.as_tensor();
        let b = self.b.as_tensor();
        Ok(match self.kind {
            BaseKind::Linear | BaseKind::Conv1D | BaseKind::Embedding => {
                let w = b.matmul(a)?;
                match (&self.b_bias, with_bias) {
                    (Some(bb), true) => w.broadcast_add(&bb.as_tensor().unsqueeze(1)?)?,
                    _ => w,
                }
            }
            BaseKind::Conv2d(_) => {
                let r = self.opts.r;
                let (o, i, kh, kw) = (b.dim(0)?, a.dim(1)?, a.dim(2)?, a.dim(3)?);
                b.reshape((o, r))?
                    .matmul(&a.reshape((r, i * kh * kw))?)?
                    .reshape((o, i, kh, kw))?
            }
        })
    }

    /// `s·ΔW` in the base weight's own layout (PEFT's `get_delta_weight`).
    pub(crate) fn delta(&self) -> Result<Tensor> {
        let d = self.lora_weight(false)?;
        let d = match self.kind {
            BaseKind::Conv1D | BaseKind::Embedding => d.t()?.contiguous()?,
            _ => d,
        };
        Ok((d * self.scaling)?)
    }

    fn delta_bias(&self) -> Result<Option<Tensor>> {
        Ok(match &self.b_bias {
            Some(bb) => Some((bb.as_tensor() * self.scaling)?),
            None => None,
        })
    }

    /// `B(A(x))` (with `lora_B.bias`), unscaled, f32.
    pub(crate) fn lora_forward(&self, x: &Tensor) -> Result<Tensor> {
        let a = self.a.as_tensor();
        let b = self.b.as_tensor();
        Ok(match self.kind {
            BaseKind::Linear | BaseKind::Conv1D => {
                let h = linear_apply(&linear_apply(x, a, true)?, b, true)?;
                match &self.b_bias {
                    Some(bb) => h.broadcast_add(bb.as_tensor())?,
                    None => h,
                }
            }
            BaseKind::Embedding => {
                // Aᵀ[ids] without materialising Aᵀ: gather columns of A, then transpose the small result.
                let ids = x.flatten_all()?.to_dtype(DType::U32)?;
                let after_a = a.index_select(&ids, 1)?.t()?;
                let mut shape = x.dims().to_vec();
                shape.push(b.dim(0)?);
                after_a.matmul(&b.t()?)?.reshape(shape)?
            }
            BaseKind::Conv2d(spec) => {
                let h = x
                    .conv2d(a, spec.padding, spec.stride, 1, 1)?
                    .conv2d(b, 0, 1, 1, 1)?;
                match &self.b_bias {
                    Some(bb) => h.broadcast_add(&bb.as_tensor().reshape((1, (), 1, 1))?)?,
                    None => h,
                }
            }
        })
    }

    /// Applies training-time dropout to the adapter's input.
    pub(crate) fn dropout(&self, x: &Tensor, ctx: &CallCtx<'_>) -> Result<Tensor> {
        if !ctx.fwd.training || self.opts.dropout <= 0.0 || self.kind == BaseKind::Embedding {
            return Ok(x.clone());
        }
        let mask =
            ctx.rng("lora_dropout")
                .dropout_mask(x.shape(), self.opts.dropout, x.device())?;
        Ok(x.mul(&mask.to_dtype(x.dtype())?)?)
    }

    fn check_kind(&self, base: &BaseLayer) -> Result<()> {
        let same = matches!(
            (&self.kind, base.kind()),
            (BaseKind::Linear, BaseKind::Linear)
                | (BaseKind::Conv1D, BaseKind::Conv1D)
                | (BaseKind::Embedding, BaseKind::Embedding)
                | (BaseKind::Conv2d(_), BaseKind::Conv2d(_))
        );
        if !same {
            return Err(PeftError::Invalid(format!(
                "LoRA adapter for {:?} used on a {:?} layer",
                self.kind,
                base.kind()
            )));
        }
        Ok(())
    }
}

/// PEFT's `orthogonal_init`: `Q` the orthonormal factor (LAPACK's signs) of an `r × r` standard normal matrix,
/// `A = (N_in·Q[0::2])ᵀ / 10` `[r, in]` and `B = N_outᵀ·Q[1::2] / 10` `[out, r]` with `N_in` `[in, r/2]` and `N_out`
/// `[r/2, out]` standard normal, so that `B·A = 0` (the rows of `Q` are orthogonal) while both train from the
/// first step. Drawn from the adapter's own stream (as every fresh init here), Linear and Conv1D layers only.
fn orthogonal_init(base: &BaseLayer, r: usize, rng: &mut PeftRng) -> Result<(Tensor, Tensor)> {
    if !matches!(base.kind(), BaseKind::Linear | BaseKind::Conv1D) {
        return Err(PeftError::Unsupported {
            field: "init_lora_weights".into(),
            value: "\"orthogonal\"".into(),
            reason: format!("the orthogonal init sets 2-D factors: Linear layers only, not {:?}", base.kind()),
        });
    }
    if !r.is_multiple_of(2) {
        return Err(PeftError::InvalidConfig(format!(
            "Orthogonal initialization requires the LoRA rank to be even, got {r} instead."
        )));
    }
    let dev = base.device();
    let x = rng.normal_tensor((r, r), 0.0, 1.0, DType::F32, &candle_core::Device::Cpu)?;
    let xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
    let (q, _) = super::rewrite_init::householder_qr(&xv, r, r);
    let rows = |start: usize| -> Result<Tensor> {
        let v: Vec<f32> = (start..r)
            .step_by(2)
            .flat_map(|i| (0..r).map(move |j| (i, j)))
            .map(|(i, j)| q[i * r + j] as f32)
            .collect();
        Ok(Tensor::from_vec(v, (r / 2, r), dev)?)
    };
    let (q_odd, q_even) = (rows(0)?, rows(1)?);
    let n_in = rng.normal_tensor((base.in_features(), r / 2), 0.0, 1.0, DType::F32, dev)?;
    let n_out = rng.normal_tensor((r / 2, base.out_features()), 0.0, 1.0, DType::F32, dev)?;
    let a = (n_in.matmul(&q_odd)?.t()?.contiguous()? / 10.0)?;
    let b = (n_out.t()?.matmul(&q_even)? / 10.0)?;
    Ok((a, b))
}

impl Adapter for LoraAdapter {
    /// PEFT's `supports_lora_conversion`: Linear and GPT-2 Conv1D layers, by their additive delta.
    fn lora_conversion(
        &self,
        base: &crate::layer::BaseLayer,
    ) -> Result<Option<crate::layer::LoraConversion>> {
        crate::tuners::lora::conversion::additive_conversion(self, base, true)
    }

    fn peft_type(&self) -> &'static str {
        "LORA"
    }

    fn transform_output(
        &self,
        base: &BaseLayer,
        x: &Tensor,
        result: Tensor,
        ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        self.check_kind(base)?;
        let x32 = if self.kind == BaseKind::Embedding {
            x.clone()
        } else {
            x.to_dtype(DType::F32)?
        };
        let result = result.to_dtype(DType::F32)?;
        if self.magnitude.is_some() {
            return dora::forward(self, base, &x32, result, ctx);
        }
        let xd = self.dropout(&x32, ctx)?;
        // Inference on f32 CPU tensors: add s·(x Aᵀ) Bᵀ into `result` in place, one pass over the output. The
        // kernel records no backward op, so training keeps the candle ops below.
        let plain = !ctx.fwd.training
            && self.b_bias.is_none()
            && matches!(self.kind, BaseKind::Linear | BaseKind::Conv1D);
        let (a, b) = (self.a.as_tensor(), self.b.as_tensor());
        if plain && crate::kernels::lora_add_inplace(&result, &xd, a, b, self.scaling)? {
            return Ok(result);
        }
        let h = self.lora_forward(&xd)?;
        Ok((result + (h * self.scaling)?)?)
    }

    fn merge(&self, input: MergeInput<'_>) -> Result<Merged> {
        self.check_kind_of(input.kind)?;
        let delta = self.delta()?;
        let bias = self.merge_bias(input.bias, 1.0)?;
        if self.magnitude.is_some() {
            return dora::merge(self, input, &delta, bias);
        }
        Ok(Merged {
            weight: (input.weight + delta)?,
            bias,
            cache: None,
        })
    }

    fn unmerge(
        &self,
        input: MergeInput<'_>,
        cache: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.check_kind_of(input.kind)?;
        let delta = self.delta()?;
        let bias = self.merge_bias(input.bias, -1.0)?;
        if self.magnitude.is_some() {
            let norm = cache.ok_or_else(|| {
                PeftError::Invalid("DoRA unmerge needs the weight norm of its merge".into())
            })?;
            return Ok((dora::unmerge(self, input, &delta, norm)?, bias));
        }
        Ok(((input.weight - delta)?, bias))
    }

    fn delta_weight(&self, kind: &BaseKind) -> Result<Option<(Tensor, Option<Tensor>)>> {
        self.check_kind_of(kind)?;
        if self.magnitude.is_some() {
            return Ok(None);
        }
        Ok(Some((self.delta()?, self.delta_bias()?)))
    }

    fn needs_unmerged_weight(&self) -> bool {
        self.magnitude.is_some()
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        self.vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect()
    }

    fn vars(&self) -> Vec<(String, Var)> {
        let (ka, kb) = Self::keys(&self.kind);
        let mut v = vec![
            (ka.to_string(), self.a.clone()),
            (kb.to_string(), self.b.clone()),
        ];
        if let Some(bb) = &self.b_bias {
            v.push(("lora_B.bias".into(), bb.clone()));
        }
        if let Some(m) = &self.magnitude {
            v.push(("lora_magnitude_vector".into(), m.clone()));
        }
        v
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        let mut s = format!("r={} alpha={}", self.opts.r, self.opts.alpha);
        if self.opts.use_rslora {
            s.push_str(" rslora");
        }
        if self.opts.use_dora {
            s.push_str(" dora");
        }
        if self.opts.lora_bias {
            s.push_str(" lora_bias");
        }
        s
    }
}

impl LoraAdapter {
    fn check_kind_of(&self, kind: &BaseKind) -> Result<()> {
        let same = std::mem::discriminant(&self.kind) == std::mem::discriminant(kind);
        if !same {
            return Err(PeftError::Invalid(format!(
                "LoRA adapter for {:?} merged into a {:?} layer",
                self.kind, kind
            )));
        }
        Ok(())
    }

    /// The bias after (un)merging `lora_B.bias` with `sign` ±1.
    fn merge_bias(&self, bias: Option<&Tensor>, sign: f64) -> Result<Option<Tensor>> {
        match (&self.b_bias, bias) {
            (None, b) => Ok(b.cloned()),
            (Some(_), None) => Err(PeftError::Invalid(
                "Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.".into(),
            )),
            (Some(bb), Some(b)) => Ok(Some((b + (bb.as_tensor() * (sign * self.scaling))?)?)),
        }
    }
}
