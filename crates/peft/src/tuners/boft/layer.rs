//! The BOFT adapter for Linear and Conv2d layers (PEFT's `tuners/boft/layer.py`).
//!
//! Two bare parameters per layer (no `.weight` in the keys):
//!
//! | key | shape | meaning |
//! |---|---|---|
//! | `boft_R` | `[factors, blocks, bs, bs]` | one full matrix per block; only its skew part is used |
//! | `boft_s` | `[out, 1]` (Linear), `[1, out]` (Conv2d) | scale of each output channel |
//!
//! Each block becomes an orthogonal matrix by the exact Cayley transform, `S = ½(R − Rᵀ)`,
//! `Q = (I − S)(I + S)⁻¹`; factor `i` is `B_i = P_i · blockdiag(Q_i) · P_iᵀ` with the butterfly permutation
//! `P_i` of [`block_butterfly_perm`] (never saved), and the rotation is `M = B_{F−1} · … · B_0`, acting on the
//! `n` input features (`in_channels · k · k` for a Conv2d, whose weight is seen as `[out, n]`).
//!
//! * Linear: `y = (base(x @ M) − b) · s + b` (the bias is not scaled). Merge: `W ← (W Mᵀ) · s`.
//! * Conv2d: `y = conv2d(x, (W Mᵀ) · s, b)` with the base's padding and stride. Merge: the same weight.
//! * Unmerge, as PEFT: `W ← (W M) · (1 / s)`, i.e. the rotation is undone by its transpose.
//!
//! Here `x @ M` is applied one factor at a time (a permutation, a batched block product, the inverse
//! permutation), never forming `M`, which is the same product as PEFT's dense matrices up to rounding.
//! In training, `boft_dropout = p > 0` replaces `⌊p · blocks⌋` randomly chosen blocks of one randomly chosen
//! factor by the identity, as PEFT's `MultiplicativeDropoutLayer` (draws from [`CallCtx::rng`], so they differ
//! from torch's).
//!
//! The number of butterfly factors is `boft_R`'s first dimension: stock PEFT without its CUDA extension
//! silently builds one factor whatever `boft_n_butterfly_factor` says, and saves the config unchanged. A fresh
//! adapter ([`PeftMethod::new_adapter`](crate::tuners::PeftMethod::new_adapter)) has the config's number of factors (≥ 2 works here, unlike stock CPU PEFT).
//!
//! `fan_in_fan_out` is ignored, as PEFT does for Linear layers (it warns and resets it; GPT-2 Conv1D layers are
//! not BOFT targets). `bias` other than `"none"` is refused (not implemented).
//!
//! Several active BOFT adapters on one layer are refused in the forward ([`Adapter::stacks_with_others`]):
//! PEFT multiplies their rotations into one (`M_b · M_a` for the list `[a, b]`, so `b` rotates the input
//! first) and, on a Conv2d, convolves once with the combined filters; the slot's per-adapter steps would give
//! `x M_a M_b`. One active adapter (the usual case) is exact, and so is merging several in turn.

use super::config::BoftConfig;
use crate::config::BiasMode;
use crate::layer::{
    Adapter, BaseKind, BaseLayer, CallCtx, MergeInput, Merged, NamedTensor, check_shape,
};
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Device, Tensor, Var};
use indexmap::IndexMap;

/// The parameter names of a BOFT adapter's tensors (the first key component after the module name).
pub const PARAM_PREFIXES: &[&str] = &[BOFT_R, BOFT_S];

/// The key of the block matrices (`[factors, blocks, bs, bs]`).
pub const BOFT_R: &str = "boft_R";

/// The key of the output scale (`[out, 1]` for Linear, `[1, out]` for Conv2d).
pub const BOFT_S: &str = "boft_s";

/// The sizes of one BOFT adapter in one layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoftGeometry {
    /// The number of features the rotation acts on: `in_features` (Linear) or `in_channels · k · k` (Conv2d).
    pub n: usize,
    /// The number of output features (channels).
    pub out: usize,
    /// The number of butterfly factors (`boft_R.shape[0]`).
    pub factors: usize,
    /// Blocks per factor.
    pub block_num: usize,
    /// Side of each block.
    pub block_size: usize,
}

impl BoftGeometry {
    /// PEFT's `update_layer` checks for `base` under `config`, with `factors` butterfly factors (the config's
    /// when creating, `boft_R`'s when loading). Errors name the offending setting.
    pub fn new(config: &BoftConfig, base: &BaseLayer, factors: usize) -> Result<Self> {
        let (n, what) = rotation_dim(config, base)?;
        let out = base.out_features();
        let bad = |msg: String| PeftError::InvalidConfig(msg);
        if factors == 0 {
            return Err(bad(format!(
                "You can only specify boft_n_butterfly_factor {factors} to be a positive integer number."
            )));
        }
        let f = factors - 1; // PEFT's (paper's) notation
        let (block_num, block_size) = match (config.boft_block_size, config.boft_block_num) {
            (0, bn) if bn != 0 => {
                if !n.is_multiple_of(bn) {
                    return Err(bad(format!(
                        "{what} ({n}) must be divisible by boft_block_num ({bn})!"
                    )));
                }
                if f != 0 {
                    if f > bn.ilog2() as usize {
                        return Err(bad(format!(
                            "Invalid combination of boft_n_butterfly_factor ({factors}) and boft_block_num ({bn})!"
                        )));
                    }
                    if !bn.is_multiple_of(1usize << f) {
                        return Err(bad(format!(
                            "boft_block_num ({bn}) must be a multiple of 2 raised to the power of \
                             boft_n_butterfly_factor ({factors})!"
                        )));
                    }
                }
                (bn, n / bn)
            }
            (bs, 0) if bs != 0 => {
                if !n.is_multiple_of(bs) {
                    return Err(bad(format!(
                        "{what} ({n}) must be divisible by boft_block_size ({bs})!"
                    )));
                }
                if f != 0 {
                    let span = u32::try_from(f)
                        .ok()
                        .and_then(|f| 1usize.checked_shl(f))
                        .and_then(|p| p.checked_mul(bs))
                        .filter(|&s| s <= n && n.is_multiple_of(s));
                    if span.is_none() {
                        return Err(bad(format!(
                            "Invalid combination of {what} ({n}), boft_n_butterfly_factor ({factors}) and \
                             boft_block_size ({bs})!"
                        )));
                    }
                }
                (n / bs, bs)
            }
            (bs, bn) => {
                return Err(bad(format!(
                    "exactly one of boft_block_size ({bs}) and boft_block_num ({bn}) must be non-zero"
                )));
            }
        };
        if f != 0 {
            if !block_num.is_multiple_of(2) {
                return Err(bad(format!(
                    "boft_block_num ({block_num}) must be an even number!"
                )));
            }
            if !block_size.is_multiple_of(2) {
                return Err(bad(format!(
                    "boft_block_size ({block_size}) must be an even number!"
                )));
            }
        }
        Ok(Self {
            n,
            out,
            factors,
            block_num,
            block_size,
        })
    }

    /// The shape of `boft_R`.
    pub fn r_shape(&self) -> [usize; 4] {
        [
            self.factors,
            self.block_num,
            self.block_size,
            self.block_size,
        ]
    }

    /// The shape of `boft_s` for a layer of `kind`.
    pub fn s_shape(&self, kind: &BaseKind) -> [usize; 2] {
        match kind {
            BaseKind::Conv2d(_) => [1, self.out],
            _ => [self.out, 1],
        }
    }

    /// The permutation of every factor (PEFT's `boft_P`, as index lists: `P_i[j, perm[j]] = 1`).
    pub fn perms(&self) -> Result<Vec<Vec<usize>>> {
        (0..self.factors)
            .map(|i| {
                block_butterfly_perm(
                    self.n,
                    self.block_num >> i,
                    self.block_size / 2,
                    self.factors - 1,
                )
            })
            .collect()
    }
}

/// The number of features the rotation acts on, and how PEFT names it in messages; refuses what PEFT refuses
/// (other layer kinds, grouped convolutions) and what its Conv2d forward would get wrong (non-square kernels,
/// dilation), and what peft-rs does not implement (`bias` other than `"none"`).
fn rotation_dim(config: &BoftConfig, base: &BaseLayer) -> Result<(usize, &'static str)> {
    if config.bias != BiasMode::None {
        return Err(PeftError::Unsupported {
            field: "bias".into(),
            value: config.bias.as_str().to_string(),
            reason: "BOFT with trained biases is not implemented yet".into(),
        });
    }
    match base.kind() {
        BaseKind::Linear => Ok((base.in_features(), "in_features")),
        BaseKind::Conv2d(spec) => {
            let d = base.weight_dims();
            if spec.groups != 1 {
                return Err(PeftError::Unsupported {
                    field: "groups".into(),
                    value: spec.groups.to_string(),
                    reason: "BOFT does not support Conv2d layers with groups > 1 (as PEFT)".into(),
                });
            }
            if d[2] != d[3] {
                return Err(PeftError::Unsupported {
                    field: "kernel_size".into(),
                    value: format!("{:?}", &d[2..]),
                    reason: "PEFT's BOFT Conv2d assumes a square kernel (it uses kernel_size[0] for both)"
                        .into(),
                });
            }
            if spec.dilation != 1 {
                return Err(PeftError::Unsupported {
                    field: "dilation".into(),
                    value: spec.dilation.to_string(),
                    reason: "PEFT's BOFT Conv2d forward ignores the dilation, so its adapted and merged \
                             layers disagree"
                        .into(),
                });
            }
            Ok((d[1] * d[2] * d[3], "Convolutional kernel dimension"))
        }
        other => Err(PeftError::Unsupported {
            field: "target_modules".into(),
            value: format!("a {other:?} layer"),
            reason: "Currently, only `torch.nn.Linear` and `torch.nn.Conv2d` are supported by BOFT (as in PEFT)"
                .into(),
        }),
    }
}

/// PEFT's `block_butterfly_perm(n, b, r, n_butterfly_factor)`: the permutation (as indices, `P[j, perm[j]] = 1`)
/// that regroups `n` features into `b` blocks whose halves of size `r` interleave. The identity when
/// `n_butterfly_factor` is 0.
pub fn block_butterfly_perm(
    n: usize,
    b: usize,
    r: usize,
    n_butterfly_factor: usize,
) -> Result<Vec<usize>> {
    if n_butterfly_factor == 0 {
        return Ok((0..n).collect());
    }
    if b == 0 || r == 0 || b * r * 2 > n || !n.is_multiple_of(b) {
        return Err(PeftError::InvalidConfig(format!(
            "Invalid number of blocks! (n={n}, b={b}, r={r})"
        )));
    }
    let block_size = n / b;
    // sort_block(block_size, r): the runs of r at even positions, then those at odd positions.
    if !block_size.is_multiple_of(r) {
        return Err(PeftError::InvalidConfig(format!(
            "Invalid number of blocks! (block size {block_size} is not a multiple of {r})"
        )));
    }
    let runs = block_size / r;
    let order: Vec<usize> = (0..runs)
        .step_by(2)
        .chain((1..runs).step_by(2))
        .flat_map(|pos| pos * r..pos * r + r)
        .collect();
    Ok((0..n)
        .step_by(block_size)
        .flat_map(|start| order.iter().map(move |&o| start + o))
        .collect())
}

/// The permutation of one factor as index tensors: `fwd` (`perm`) and `inv` (its inverse), or `None` when it
/// is the identity.
#[derive(Clone, Debug)]
struct Perm {
    fwd: Tensor,
    inv: Tensor,
}

impl Perm {
    fn new(perm: &[usize], device: &Device) -> Result<Option<Self>> {
        if perm.iter().enumerate().all(|(i, &p)| i == p) {
            return Ok(None);
        }
        let mut inv = vec![0u32; perm.len()];
        for (j, &p) in perm.iter().enumerate() {
            inv[p] = j as u32;
        }
        let fwd: Vec<u32> = perm.iter().map(|&p| p as u32).collect();
        Ok(Some(Self {
            fwd: Tensor::from_vec(fwd, perm.len(), device)?,
            inv: Tensor::from_vec(inv, perm.len(), device)?,
        }))
    }
}

/// One BOFT adapter inside one layer. `boft_R` and `boft_s` are f32 `Var`s; the dtype they were created or
/// loaded in is kept for saving.
#[derive(Debug)]
pub struct BoftAdapter {
    kind: BaseKind,
    geom: BoftGeometry,
    r: Var,
    s: Var,
    perms: Vec<Option<Perm>>,
    dropout: f64,
    saved_dtype: DType,
}

impl BoftAdapter {
    fn assemble(
        base: &BaseLayer,
        geom: BoftGeometry,
        r: Tensor,
        s: Tensor,
        dropout: f64,
        saved_dtype: DType,
    ) -> Result<Self> {
        let dev = base.device();
        let perms = geom
            .perms()?
            .iter()
            .map(|p| Perm::new(p, dev))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            kind: *base.kind(),
            geom,
            r: Var::from_tensor(&r)?,
            s: Var::from_tensor(&s)?,
            perms,
            dropout,
            saved_dtype,
        })
    }

    /// A freshly initialised adapter (PEFT's `reset_boft_parameters`): with `init_weights`, `boft_R = 0` (the
    /// identity rotation) and `boft_s = 1`; otherwise `boft_R ~ N(0, 0.1²)` and `boft_s ~ N(1, 0.1²)`. The number
    /// of butterfly factors is the config's.
    pub fn new(config: &BoftConfig, base: &BaseLayer, rng: &mut PeftRng) -> Result<Self> {
        let geom = BoftGeometry::new(config, base, config.boft_n_butterfly_factor)?;
        let dev = base.device();
        let rs = geom.r_shape();
        let ss = geom.s_shape(base.kind());
        let (r, s) = if config.init_weights {
            (
                Tensor::zeros(&rs, DType::F32, dev)?,
                Tensor::ones(&ss, DType::F32, dev)?,
            )
        } else {
            (
                rng.normal_tensor(&rs, 0.0, 0.1, DType::F32, dev)?,
                rng.normal_tensor(&ss, 1.0, 0.1, DType::F32, dev)?,
            )
        };
        Self::assemble(base, geom, r, s, config.boft_dropout, DType::F32)
    }

    /// An adapter from tensors as PEFT saves them (keys relative to the module, adapter name stripped):
    /// exactly `boft_R` and `boft_s`. The number of butterfly factors is `boft_R`'s first dimension, whatever
    /// `boft_n_butterfly_factor` says; the blocks follow from the config as in PEFT.
    pub fn from_tensors(
        config: &BoftConfig,
        base: &BaseLayer,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        let get = |k: &str| {
            tensors
                .get(k)
                .ok_or_else(|| PeftError::MissingKey(k.to_string()))
        };
        let r = get(BOFT_R)?;
        let s = get(BOFT_S)?;
        let extra: Vec<String> = tensors
            .keys()
            .filter(|k| !PARAM_PREFIXES.contains(&k.as_str()))
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        // The blocks do not depend on the number of factors: check the shape before the factor constraints.
        let factors = if r.rank() == 4 { r.dim(0)? } else { 0 };
        let blocks = BoftGeometry::new(config, base, 1)?;
        let expected = [
            factors.max(1),
            blocks.block_num,
            blocks.block_size,
            blocks.block_size,
        ];
        check_shape(BOFT_R, r, &expected)?;
        let geom = BoftGeometry::new(config, base, factors).map_err(|e| {
            PeftError::Invalid(format!(
                "{BOFT_R} {:?} has {factors} butterfly factors, which this layer cannot have: {e}",
                r.dims()
            ))
        })?;
        check_shape(BOFT_S, s, &geom.s_shape(base.kind()))?;
        if s.dtype() != r.dtype() {
            return Err(PeftError::Invalid(format!(
                "{BOFT_R} is {:?} but {BOFT_S} is {:?}",
                r.dtype(),
                s.dtype()
            )));
        }
        Self::assemble(
            base,
            geom,
            r.to_dtype(DType::F32)?,
            s.to_dtype(DType::F32)?,
            config.boft_dropout,
            r.dtype(),
        )
    }

    /// The adapter's sizes.
    pub fn geometry(&self) -> &BoftGeometry {
        &self.geom
    }

    /// `boft_R` (f32).
    pub fn boft_r(&self) -> &Tensor {
        self.r.as_tensor()
    }

    /// `boft_s` (f32), in its saved shape.
    pub fn boft_s(&self) -> &Tensor {
        self.s.as_tensor()
    }

    /// The dtype everything is computed in: f32 (f64 in the gradient tests).
    fn dtype(&self) -> DType {
        self.r.dtype()
    }

    fn check_kind(&self, kind: &BaseKind) -> Result<()> {
        if std::mem::discriminant(&self.kind) != std::mem::discriminant(kind) {
            return Err(PeftError::Invalid(format!(
                "BOFT adapter for {:?} used on a {:?} layer",
                self.kind, kind
            )));
        }
        Ok(())
    }

    /// The orthogonal blocks `Q = (I − S)(I + S)⁻¹`, `S = ½(R − Rᵀ)`, `[factors, blocks, bs, bs]` (PEFT's
    /// `cayley_batch`), with the training dropout applied when `ctx` asks for it.
    fn blocks(&self, ctx: Option<&CallCtx<'_>>) -> Result<Tensor> {
        let [f, d, b, _] = self.geom.r_shape();
        let r = self.r.as_tensor().reshape((f * d, b, b))?;
        let skew = ((&r - r.transpose(1, 2)?)? * 0.5)?;
        let eye = Tensor::eye(b, self.dtype(), r.device())?
            .unsqueeze(0)?
            .broadcast_as((f * d, b, b))?;
        let inv = crate::ops::batched_inverse(&eye.broadcast_add(&skew)?)?;
        let q = (eye - skew)?.matmul(&inv)?.reshape((f, d, b, b))?;
        match ctx {
            Some(ctx) if ctx.fwd.training && self.dropout > 0.0 => self.drop_blocks(q, ctx),
            _ => Ok(q),
        }
    }

    /// PEFT's `MultiplicativeDropoutLayer`: in one random factor, `⌊p · blocks⌋` random blocks become the
    /// identity.
    fn drop_blocks(&self, q: Tensor, ctx: &CallCtx<'_>) -> Result<Tensor> {
        let [f, d, b, _] = self.geom.r_shape();
        let replace = (self.dropout * d as f64) as usize;
        if replace == 0 {
            return Ok(q);
        }
        let mut rng = ctx.rng("boft_dropout");
        let factor = rng.below(f as u64) as usize;
        let mut order: Vec<usize> = (0..d).collect();
        for i in (1..d).rev() {
            order.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let mut mask = vec![0f32; f * d];
        for &blk in &order[..replace.min(d)] {
            mask[factor * d + blk] = 1.0;
        }
        let mask = Tensor::from_vec(mask, (f, d, 1, 1), q.device())?.to_dtype(q.dtype())?;
        let eye = Tensor::eye(b, self.dtype(), q.device())?.reshape((1, 1, b, b))?;
        let keep = (1.0 - &mask)?;
        Ok((q.broadcast_mul(&keep)? + mask.broadcast_mul(&eye)?)?)
    }

    /// `x @ M` (`transpose = false`) or `x @ Mᵀ` for `x` `[rows, n]` and the blocks `q`: one factor at a time,
    /// `x @ B_i = ((x P_i) · blockdiag(Q_i)) P_iᵀ`.
    fn rotate(&self, x: &Tensor, q: &Tensor, transpose: bool) -> Result<Tensor> {
        let BoftGeometry {
            n,
            factors,
            block_num: d,
            block_size: b,
            ..
        } = self.geom;
        let rows = x.dim(0)?;
        let order: Vec<usize> = if transpose {
            (0..factors).collect()
        } else {
            (0..factors).rev().collect()
        };
        let mut y = x.clone();
        for i in order {
            let mut qi = q.get(i)?; // [d, b, b]
            if transpose {
                qi = qi.transpose(1, 2)?;
            }
            if let Some(p) = &self.perms[i] {
                y = y.index_select(&p.inv, 1)?;
            }
            y = y
                .reshape((rows, d, b))?
                .transpose(0, 1)?
                .contiguous()?
                .matmul(&qi.contiguous()?)?
                .transpose(0, 1)?
                .reshape((rows, n))?;
            if let Some(p) = &self.perms[i] {
                y = y.index_select(&p.fwd, 1)?;
            }
        }
        Ok(y)
    }

    /// The dense rotation `M` (`[n, n]`, f32) as PEFT's `get_delta_weight` returns it (no dropout).
    pub fn rotation(&self) -> Result<Tensor> {
        let eye = Tensor::eye(self.geom.n, self.dtype(), self.r.device())?;
        self.rotate(&eye, &self.blocks(None)?, false)
    }

    /// The scale as a column over the output rows of the `[out, n]` weight.
    fn s_column(&self) -> Result<Tensor> {
        Ok(self.s.as_tensor().reshape((self.geom.out, 1))?)
    }

    /// The weight seen as `[out, n]`, f32, checked against the adapter's sizes.
    fn flat_weight(&self, w: &Tensor) -> Result<Tensor> {
        let (out, n) = (self.geom.out, self.geom.n);
        if w.elem_count() != out * n || w.dim(0)? != out {
            return Err(PeftError::Invalid(format!(
                "BOFT adapter for [{out}, {n}] used on a weight of shape {:?}",
                w.dims()
            )));
        }
        Ok(w.to_dtype(self.dtype())?.reshape((out, n))?)
    }

    /// `(W Mᵀ) · s` in the weight's own shape, f32.
    fn rotated_weight(&self, w: &Tensor, q: &Tensor) -> Result<Tensor> {
        let flat = self.flat_weight(w)?;
        let rot = self
            .rotate(&flat, q, true)?
            .broadcast_mul(&self.s_column()?)?;
        Ok(rot.reshape(w.dims())?)
    }
}

impl Adapter for BoftAdapter {
    fn stacks_with_others(&self) -> bool {
        false
    }

    fn peft_type(&self) -> &'static str {
        "BOFT"
    }

    fn transform_input(&self, base: &BaseLayer, x: Tensor, ctx: &CallCtx<'_>) -> Result<Tensor> {
        self.check_kind(base.kind())?;
        if !matches!(self.kind, BaseKind::Linear) {
            return Ok(x); // Conv2d: the rotation acts on the filters, in transform_output
        }
        let n = self.geom.n;
        let dims = x.dims().to_vec();
        if dims.last() != Some(&n) {
            return Err(PeftError::Invalid(format!(
                "BOFT on {}: input of shape {dims:?}, expected {n} features last",
                ctx.module
            )));
        }
        let flat = x.to_dtype(self.dtype())?.reshape(((), n))?;
        let q = self.blocks(Some(ctx))?;
        Ok(self.rotate(&flat, &q, false)?.reshape(dims)?)
    }

    fn transform_output(
        &self,
        base: &BaseLayer,
        x: &Tensor,
        result: Tensor,
        ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        self.check_kind(base.kind())?;
        match self.kind {
            BaseKind::Conv2d(_) => {
                // PEFT: conv2d(x, (W Mᵀ)·s, b, padding, stride); the base's own output is not used.
                let w = self.rotated_weight(&base.weight()?, &self.blocks(Some(ctx))?)?;
                let b = base.bias().map(|b| b.to_dtype(self.dtype())).transpose()?;
                base.forward_with(&x.to_dtype(self.dtype())?, &w, b.as_ref())
            }
            _ => {
                let s = self.s.as_tensor().flatten_all()?;
                let y = result.to_dtype(self.dtype())?;
                Ok(match base.bias() {
                    Some(b) => {
                        let b = b.to_dtype(self.dtype())?;
                        y.broadcast_sub(&b)?.broadcast_mul(&s)?.broadcast_add(&b)?
                    }
                    None => y.broadcast_mul(&s)?,
                })
            }
        }
    }

    fn merge(&self, input: MergeInput<'_>) -> Result<Merged> {
        self.check_kind(input.kind)?;
        Ok(Merged {
            weight: self.rotated_weight(input.weight, &self.blocks(None)?)?,
            bias: input.bias.cloned(),
            cache: None,
        })
    }

    fn unmerge(
        &self,
        input: MergeInput<'_>,
        _cache: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        self.check_kind(input.kind)?;
        // PEFT: (W' M) · (1 / s), undoing the rotation with its transpose.
        let flat = self.flat_weight(input.weight)?;
        let w = self
            .rotate(&flat, &self.blocks(None)?, false)?
            .broadcast_mul(&self.s_column()?.recip()?)?
            .reshape(input.weight.dims())?;
        Ok((w, input.bias.cloned()))
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        self.vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect()
    }

    fn vars(&self) -> Vec<(String, Var)> {
        vec![
            (BOFT_R.to_string(), self.r.clone()),
            (BOFT_S.to_string(), self.s.clone()),
        ]
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        let g = &self.geom;
        format!(
            "factors={} blocks={} block_size={} (boft_R {:?}, boft_s {:?}, rotating {} features)",
            g.factors,
            g.block_num,
            g.block_size,
            g.r_shape(),
            self.s.as_tensor().dims(),
            g.n
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::Conv2dSpec;
    use crate::ops::testutil::{fd_check, grads_of, max_diff, randn, vars};
    use crate::{AdapterSlot, ForwardCtx};

    fn cfg(block_size: usize, block_num: usize, factors: usize) -> BoftConfig {
        BoftConfig {
            boft_block_size: block_size,
            boft_block_num: block_num,
            boft_n_butterfly_factor: factors,
            ..Default::default()
        }
    }

    fn linear(rng: &mut PeftRng, out: usize, n: usize, bias: bool, dtype: DType) -> BaseLayer {
        let w = randn(rng, &[out, n], dtype);
        let b = bias.then(|| randn(rng, &[out], dtype));
        BaseLayer::linear(w, b).unwrap()
    }

    /// An adapter whose parameters are exactly `r` and `s` (any dtype, gradients flow into them).
    fn with_params(
        config: &BoftConfig,
        base: &BaseLayer,
        r: &Tensor,
        s: &Tensor,
    ) -> Result<BoftAdapter> {
        let geom = BoftGeometry::new(config, base, r.dim(0)?)?;
        BoftAdapter::assemble(
            base,
            geom,
            r.clone(),
            s.clone(),
            config.boft_dropout,
            r.dtype(),
        )
    }

    /// PEFT's dense `get_delta_weight`: `B_{F−1} · … · B_0`, `B_i = P_i · blockdiag(Q_i) · P_iᵀ`.
    fn dense_rotation(a: &BoftAdapter) -> Tensor {
        let g = a.geometry();
        let q = a.blocks(None).unwrap().to_dtype(DType::F64).unwrap();
        let n = g.n;
        let mut m = Tensor::eye(n, DType::F64, &Device::Cpu).unwrap();
        for (i, perm) in g.perms().unwrap().iter().enumerate() {
            let mut bd = vec![0f64; n * n];
            for d in 0..g.block_num {
                let blk = q.get(i).unwrap().get(d).unwrap().to_vec2::<f64>().unwrap();
                for (x, row) in blk.iter().enumerate() {
                    for (y, v) in row.iter().enumerate() {
                        let (gx, gy) = (d * g.block_size + x, d * g.block_size + y);
                        bd[gx * n + gy] = *v;
                    }
                }
            }
            let mut p = vec![0f64; n * n];
            for (j, &k) in perm.iter().enumerate() {
                p[j * n + k] = 1.0;
            }
            let bd = Tensor::from_vec(bd, (n, n), &Device::Cpu).unwrap();
            let p = Tensor::from_vec(p, (n, n), &Device::Cpu).unwrap();
            let b = p.matmul(&bd).unwrap().matmul(&p.t().unwrap()).unwrap();
            m = b.matmul(&m).unwrap();
        }
        m
    }

    fn perturbed(config: &BoftConfig, base: &BaseLayer, seed: u64) -> BoftAdapter {
        let c = BoftConfig {
            init_weights: false,
            ..config.clone()
        };
        let mut a = BoftAdapter::new(&c, base, &mut PeftRng::new(seed)).unwrap();
        // larger rotations than PEFT's N(0, 0.1²) init, so that a wrong order or transpose shows
        a.r = Var::from_tensor(&(a.r.as_tensor() * 5.0).unwrap()).unwrap();
        a
    }

    #[test]
    fn butterfly_perms_match_peft() {
        // BOFTLayer.block_butterfly_perm(n, b, r, n_butterfly_factor) of PEFT 0.21.2
        type Case = ((usize, usize, usize, usize), &'static [usize]);
        let cases: &[Case] = &[
            (
                (16, 2, 2, 1),
                &[0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15],
            ),
            (
                (16, 8, 1, 2),
                &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
            ),
            (
                (16, 4, 1, 2),
                &[0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15],
            ),
            (
                (16, 2, 1, 2),
                &[0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15],
            ),
            (
                (24, 3, 2, 1),
                &[
                    0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15, 16, 17, 20, 21, 18, 19,
                    22, 23,
                ],
            ),
            (
                (36, 3, 3, 1),
                &[
                    0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11, 12, 13, 14, 18, 19, 20, 15, 16, 17, 21,
                    22, 23, 24, 25, 26, 30, 31, 32, 27, 28, 29, 33, 34, 35,
                ],
            ),
            ((8, 4, 1, 0), &[0, 1, 2, 3, 4, 5, 6, 7]),
        ];
        for &((n, b, r, f), want) in cases {
            assert_eq!(
                block_butterfly_perm(n, b, r, f).unwrap(),
                want,
                "{n} {b} {r} {f}"
            );
        }
        // b·r·2 > n
        let e = block_butterfly_perm(16, 8, 2, 1).unwrap_err();
        assert!(
            matches!(&e, PeftError::InvalidConfig(m) if m.contains("Invalid number of blocks! (n=16, b=8, r=2)")),
            "{e}"
        );
    }

    #[test]
    fn geometry_follows_peft_checks() {
        let mut rng = PeftRng::new(0);
        let base = linear(&mut rng, 8, 16, false, DType::F32);
        let g = BoftGeometry::new(&cfg(4, 0, 2), &base, 2).unwrap();
        assert_eq!(g.r_shape(), [2, 4, 4, 4]);
        assert_eq!(g.s_shape(base.kind()), [8, 1]);
        let g = BoftGeometry::new(&cfg(0, 8, 3), &base, 3).unwrap();
        assert_eq!(g.r_shape(), [3, 8, 2, 2]);
        // in_features not divisible, too many factors, odd blocks with factors >= 2
        for (c, f) in [
            (cfg(5, 0, 1), 1),
            (cfg(4, 0, 4), 4),
            (cfg(0, 8, 5), 5),
            (cfg(0, 16, 2), 2), // block size 1 is odd
            (cfg(0, 2, 3), 3),  // 2 is not a multiple of 2²
        ] {
            let e = BoftGeometry::new(&c, &base, f).unwrap_err();
            assert!(matches!(e, PeftError::InvalidConfig(_)), "{c:?}: {e}");
        }
        // factor 1 takes any divisor, odd blocks included
        assert_eq!(
            BoftGeometry::new(&cfg(0, 16, 1), &base, 1)
                .unwrap()
                .r_shape(),
            [1, 16, 1, 1]
        );
        // a Conv2d rotates in_channels·k·k features and scales [1, out]
        let w = randn(&mut rng, &[6, 4, 3, 3], DType::F32);
        let conv = BaseLayer::conv2d(w, None, Conv2dSpec::default()).unwrap();
        let g = BoftGeometry::new(&cfg(0, 6, 2), &conv, 2).unwrap();
        assert_eq!((g.n, g.block_size, g.s_shape(conv.kind())), (36, 6, [1, 6]));
    }

    #[test]
    fn unsupported_layers_and_settings_are_named() {
        let mut rng = PeftRng::new(1);
        let field = |e: PeftError| match e {
            PeftError::Unsupported { field, .. } => field,
            other => panic!("{other}"),
        };
        let base = linear(&mut rng, 8, 16, true, DType::F32);
        let c = BoftConfig {
            bias: BiasMode::AdapterOnly("boft_only".into()),
            ..cfg(4, 0, 1)
        };
        assert_eq!(
            field(BoftAdapter::new(&c, &base, &mut rng).unwrap_err()),
            "bias"
        );
        let emb = BaseLayer::embedding(randn(&mut rng, &[10, 16], DType::F32)).unwrap();
        assert_eq!(
            field(BoftAdapter::new(&cfg(4, 0, 1), &emb, &mut rng).unwrap_err()),
            "target_modules"
        );
        let c1d = BaseLayer::conv1d(randn(&mut rng, &[16, 8], DType::F32), None).unwrap();
        assert_eq!(
            field(BoftAdapter::new(&cfg(4, 0, 1), &c1d, &mut rng).unwrap_err()),
            "target_modules"
        );
        let conv = |shape: &[usize], spec: Conv2dSpec, rng: &mut PeftRng| {
            BaseLayer::conv2d(randn(rng, shape, DType::F32), None, spec).unwrap()
        };
        let grouped = conv(
            &[4, 2, 3, 3],
            Conv2dSpec {
                groups: 2,
                ..Default::default()
            },
            &mut rng,
        );
        assert_eq!(
            field(BoftAdapter::new(&cfg(2, 0, 1), &grouped, &mut rng).unwrap_err()),
            "groups"
        );
        let dilated = conv(
            &[4, 2, 3, 3],
            Conv2dSpec {
                dilation: 2,
                ..Default::default()
            },
            &mut rng,
        );
        assert_eq!(
            field(BoftAdapter::new(&cfg(2, 0, 1), &dilated, &mut rng).unwrap_err()),
            "dilation"
        );
        let wide = conv(&[4, 2, 1, 3], Conv2dSpec::default(), &mut rng);
        assert_eq!(
            field(BoftAdapter::new(&cfg(2, 0, 1), &wide, &mut rng).unwrap_err()),
            "kernel_size"
        );
    }

    #[test]
    fn identity_at_init_and_rotation_is_peft_dense_product() {
        let mut rng = PeftRng::new(2);
        let base = linear(&mut rng, 8, 16, true, DType::F32);
        let a = BoftAdapter::new(&cfg(4, 0, 2), &base, &mut rng).unwrap();
        let eye = Tensor::eye(16, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(max_diff(&a.rotation().unwrap(), &eye), 0.0);
        for (c, f) in [
            (cfg(4, 0, 1), 1),
            (cfg(4, 0, 2), 2),
            (cfg(0, 8, 3), 3),
            (cfg(2, 0, 4), 4),
        ] {
            let a = perturbed(&c, &base, 10 + f as u64);
            assert_eq!(a.geometry().factors, f);
            let m = a.rotation().unwrap();
            let d = dense_rotation(&a);
            assert!(max_diff(&m, &d) < 1e-5, "{f}: {}", max_diff(&m, &d));
            // orthogonal, and not a mere block diagonal when f >= 2
            let mmt = m.matmul(&m.t().unwrap()).unwrap();
            assert!(max_diff(&mmt, &eye) < 1e-5, "{f}");
            let off_block = m.narrow(0, 0, 4).unwrap().narrow(1, 4, 12).unwrap();
            let off = off_block
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(off > 1e-3, f >= 2, "{f}: {off}");
        }
    }

    fn slot_forward(slot: &AdapterSlot, x: &Tensor) -> Tensor {
        slot.forward(x, &ForwardCtx::eval()).unwrap()
    }

    #[test]
    fn linear_forward_merge_and_unmerge() {
        let mut rng = PeftRng::new(3);
        for (c, bias) in [
            (cfg(4, 0, 1), true),
            (cfg(4, 0, 2), false),
            (cfg(0, 8, 3), true),
        ] {
            let base = linear(&mut rng, 8, 16, bias, DType::F32);
            let a = perturbed(&c, &base, 4);
            let x = randn(&mut rng, &[2, 3, 16], DType::F32);
            // reference: (x M Wᵀ)·s + b with PEFT's dense M
            let m = dense_rotation(&a).to_dtype(DType::F32).unwrap();
            let xm = x.reshape((6, 16)).unwrap().matmul(&m).unwrap();
            let mut want = xm
                .matmul(&base.weight().unwrap().t().unwrap())
                .unwrap()
                .broadcast_mul(&a.boft_s().flatten_all().unwrap())
                .unwrap();
            if let Some(b) = base.bias() {
                want = want.broadcast_add(b).unwrap();
            }
            let want = want.reshape((2, 3, 8)).unwrap();
            let mut slot = AdapterSlot::new("lin", base.clone());
            slot.add_adapter("default", Box::new(a)).unwrap();
            let y = slot_forward(&slot, &x);
            assert!(max_diff(&y, &want) < 1e-5, "{c:?}");
            slot.merge(None).unwrap();
            assert!(max_diff(&slot_forward(&slot, &x), &want) < 1e-5);
            slot.unmerge().unwrap();
            assert!(max_diff(&slot.base().weight().unwrap(), &base.weight().unwrap()) < 1e-5);
            slot.set_disabled(true);
            assert!(max_diff(&slot_forward(&slot, &x), &base.forward(&x).unwrap()) < 1e-4);
        }
    }

    /// Two active BOFT adapters in one layer: the forward is refused (PEFT composes them as `x M_b M_a`),
    /// naming them; merging them in turn is exact (PEFT's merge applies them one after the other) and
    /// unmerges back.
    #[test]
    fn several_active_adapters_are_refused_but_merge_in_turn() {
        let mut rng = PeftRng::new(11);
        let base = linear(&mut rng, 8, 16, true, DType::F32);
        let c = cfg(4, 0, 2);
        let (a, b) = (perturbed(&c, &base, 1), perturbed(&c, &base, 2));
        let (ma, mb) = (dense_rotation(&a), dense_rotation(&b));
        let mut slot = AdapterSlot::new("lin", base.clone());
        slot.add_adapter("a", Box::new(a)).unwrap();
        slot.add_adapter("b", Box::new(b)).unwrap();
        slot.set_active(&["a", "b"]);
        let x = randn(&mut rng, &[2, 16], DType::F32);
        let e = slot
            .forward(&x, &ForwardCtx::eval())
            .unwrap_err()
            .to_string();
        assert!(e.contains("active adapters") && e.contains("\"a\""), "{e}");
        slot.merge(None).unwrap();
        // merging a then b: W ← (W Maᵀ Mbᵀ)·s_a·s_b, from the dense rotations
        let w = base.weight().unwrap().to_dtype(DType::F64).unwrap();
        let want = w
            .matmul(&ma.t().unwrap())
            .unwrap()
            .matmul(&mb.t().unwrap())
            .unwrap();
        let got = slot.base().weight().unwrap().to_dtype(DType::F64).unwrap();
        let sa = slot.adapter("a").unwrap().tensors();
        let sb = slot.adapter("b").unwrap().tensors();
        let s = |t: &Vec<NamedTensor>| {
            t.iter()
                .find(|(k, _)| k == BOFT_S)
                .unwrap()
                .1
                .to_dtype(DType::F64)
                .unwrap()
        };
        let want = want
            .broadcast_mul(&s(&sa))
            .unwrap()
            .broadcast_mul(&s(&sb))
            .unwrap();
        assert!(max_diff(&got, &want) < 1e-5);
        slot.unmerge().unwrap();
        assert!(max_diff(&slot.base().weight().unwrap(), &base.weight().unwrap()) < 1e-5);
        slot.set_active(&["b"]);
        assert!(slot.forward(&x, &ForwardCtx::eval()).is_ok());
    }

    #[test]
    fn conv_forward_is_rotated_filters_and_merges() {
        let mut rng = PeftRng::new(5);
        let spec = Conv2dSpec {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        let w = randn(&mut rng, &[6, 4, 3, 3], DType::F32);
        let b = randn(&mut rng, &[6], DType::F32);
        let base = BaseLayer::conv2d(w.clone(), Some(b.clone()), spec).unwrap();
        let a = perturbed(&cfg(0, 6, 2), &base, 6);
        assert_eq!(a.boft_s().dims(), &[1, 6]);
        let m = dense_rotation(&a).to_dtype(DType::F32).unwrap();
        let rot = w
            .reshape((6, 36))
            .unwrap()
            .matmul(&m.t().unwrap())
            .unwrap()
            .broadcast_mul(&a.boft_s().t().unwrap())
            .unwrap()
            .reshape((6, 4, 3, 3))
            .unwrap();
        let x = randn(&mut rng, &[2, 4, 7, 7], DType::F32);
        let want = base.forward_with(&x, &rot, Some(&b)).unwrap();
        let mut slot = AdapterSlot::new("conv", base.clone());
        slot.add_adapter("default", Box::new(a)).unwrap();
        assert!(max_diff(&slot_forward(&slot, &x), &want) < 1e-5);
        slot.merge(None).unwrap();
        assert!(max_diff(&slot.base().weight().unwrap(), &rot) < 1e-6);
        assert!(max_diff(&slot_forward(&slot, &x), &want) < 1e-5);
        slot.unmerge().unwrap();
        assert!(max_diff(&slot.base().weight().unwrap(), &w) < 1e-5);
        assert_eq!(max_diff(slot.base().bias().unwrap(), &b), 0.0);
    }

    #[test]
    fn dropout_replaces_blocks_of_one_factor_in_training_only() {
        let mut rng = PeftRng::new(7);
        let base = linear(&mut rng, 8, 16, false, DType::F32);
        let c = BoftConfig {
            boft_dropout: 0.5,
            ..cfg(2, 0, 2)
        };
        let a = perturbed(&c, &base, 8);
        let clean = a.blocks(None).unwrap();
        let eval = ForwardCtx::eval();
        fn ctx(fwd: &ForwardCtx) -> CallCtx<'_> {
            CallCtx {
                module: "lin",
                adapter: "default",
                fwd,
            }
        }
        assert_eq!(max_diff(&a.blocks(Some(&ctx(&eval))).unwrap(), &clean), 0.0);
        let eye = Tensor::eye(2, DType::F32, &Device::Cpu).unwrap();
        let mut seen = std::collections::HashSet::new();
        for step in 0..8 {
            let train = ForwardCtx::train(1, step);
            let q = a.blocks(Some(&ctx(&train))).unwrap();
            let mut dropped = Vec::new();
            for f in 0..2 {
                for d in 0..8 {
                    let blk = q.get(f).unwrap().get(d).unwrap();
                    if max_diff(&blk, &clean.get(f).unwrap().get(d).unwrap()) > 0.0 {
                        assert_eq!(max_diff(&blk, &eye), 0.0);
                        dropped.push((f, d));
                    }
                }
            }
            assert_eq!(dropped.len(), 4, "⌊0.5 · 8⌋ blocks");
            assert!(
                dropped.iter().all(|(f, _)| *f == dropped[0].0),
                "one factor"
            );
            seen.insert(dropped);
            // the same step draws the same mask
            assert_eq!(max_diff(&a.blocks(Some(&ctx(&train))).unwrap(), &q), 0.0);
        }
        assert!(seen.len() > 1, "masks change between steps");
    }

    /// Autograd of the whole adapted forward (f64) against central finite differences, w.r.t. `boft_R`,
    /// `boft_s` and the input.
    fn grad_check(c: &BoftConfig, base: &BaseLayer, x_shape: &[usize], seed: u64) {
        let mut rng = PeftRng::new(seed);
        let g = BoftGeometry::new(c, base, c.boft_n_butterfly_factor).unwrap();
        let r = (randn(&mut rng, &g.r_shape(), DType::F64) * 0.5).unwrap();
        let s =
            ((randn(&mut rng, &g.s_shape(base.kind()), DType::F64) * 0.1).unwrap() + 1.0).unwrap();
        let x = randn(&mut rng, x_shape, DType::F64);
        let f = |ts: &[Tensor]| -> candle_core::Result<Tensor> {
            let a = with_params(c, base, &ts[0], &ts[1]).map_err(candle_core::Error::wrap)?;
            let mut slot = AdapterSlot::new("m", base.clone());
            slot.add_adapter("default", Box::new(a))
                .map_err(candle_core::Error::wrap)?;
            slot.forward(&ts[2], &ForwardCtx::eval())
                .map_err(candle_core::Error::wrap)
        };
        let y = f(&[r.clone(), s.clone(), x.clone()]).unwrap();
        let w = randn(&mut rng, y.dims(), DType::F64);
        let vs = vars(&[&r, &s, &x]);
        let grads = grads_of(&vs, &w, &f);
        let inputs = [r, s, x];
        for (i, name) in ["boft_R", "boft_s", "x"].iter().enumerate() {
            let gi = grads[i]
                .as_ref()
                .unwrap_or_else(|| panic!("no gradient for {name}"));
            let loss = |ts: &[Tensor]| -> candle_core::Result<f64> {
                (f(ts)? * &w)?.sum_all()?.to_scalar::<f64>()
            };
            let err = fd_check(&inputs, i, gi, &loss);
            assert!(
                err < 1e-6,
                "{:?} factors {}: {name}: {err}",
                base.kind(),
                g.factors
            );
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let mut rng = PeftRng::new(9);
        let lin = linear(&mut rng, 6, 8, true, DType::F64);
        grad_check(&cfg(2, 0, 1), &lin, &[3, 8], 10);
        grad_check(&cfg(2, 0, 2), &lin, &[3, 8], 11);
        grad_check(&cfg(0, 2, 2), &lin, &[2, 2, 8], 12);
        let w = randn(&mut rng, &[3, 2, 2, 2], DType::F64);
        let b = randn(&mut rng, &[3], DType::F64);
        let conv = BaseLayer::conv2d(
            w,
            Some(b),
            Conv2dSpec {
                padding: 1,
                ..Default::default()
            },
        )
        .unwrap();
        grad_check(&cfg(2, 0, 2), &conv, &[1, 2, 3, 3], 13);
    }
}
