//! The OFT adapter for Linear and Conv2d layers (PEFT's `tuners/oft/layer.py`).
//!
//! One tensor per layer, `oft_R.weight` `[rows, bs(bs−1)/2]`: the strict upper triangle of each block's
//! skew-symmetric generator, in `torch.triu_indices(bs, bs, 1)` order (row-major). `rows` is the number of
//! blocks `n = width / bs`, or 1 with `block_share` (the one block repeats). `width` is `in_features` for a
//! Linear and `in_channels · k²` for a k×k Conv2d. With `Q = M − Mᵀ` per block:
//!
//! | form | rotation `R` per block |
//! |---|---|
//! | Cayley–Neumann (default, `t` terms) | PEFT's loop, literally: `t ≤ 1`: `I`; `t = 2`: `I + 2Q`; `t = 3, 4`: `I + 2Q + 2Q² + Q³`; `t ≥ 5`: `I + 2Q + 2Q² + … + 2Q^{t−2} + Q^{t−1}` |
//! | exact (`use_cayley_neumann = false`) | `(I − Q)(I + Q)⁻¹` (the opposite rotation of what the series approximates, as in PEFT) |
//!
//! **Forward** rotates the input before the base op: a Linear input's last axis, cut into blocks, becomes
//! `x_block · R` (PEFT's `einsum("...rk,rkc->...rc")`). A Conv2d input `[B, C, H, W]` is unfolded into k×k
//! patches (stride 1, no padding, whatever the base's geometry), each patch vector `(c, i, j)` is rotated, and
//! the patches are folded back with `F.fold`, which sums overlapping patches — through PEFT's view of the
//! `[B, C, Ho, Wo, k, k]` patches as `[B, C·k², Ho·Wo]`, which scrambles positions within a channel. For 1×1
//! kernels all of this is a per-pixel rotation of the channels. The base conv then runs with its own geometry.
//!
//! **Merge** is `W ← W · blockdiag(R)ᵀ` on the weight seen as `[out, width]`; **unmerge** multiplies by the
//! transposed *inverse* of each block (PEFT's `torch.linalg.inv`), not by the transpose. For a Conv2d with a
//! kernel larger than 1×1 PEFT's merged weight does not compute what its unmerged forward computes (the
//! fold above); merging still does exactly what PEFT's merge does, and [`Adapter::merge_warning`] says so.
//!
//! **COFT** projects each row onto the ball of radius `eps / √rows` (in the skew matrix's Frobenius norm)
//! before every use, in the forward and in the merge, and — as PEFT, which copies the projection into the
//! parameter under `no_grad` — writes the projected values back into the parameter, so the gradient is taken
//! at the projected point and not through the projection.
//!
//! `module_dropout` is accepted and not applied: PEFT 0.21.2 builds its `MultiplicativeDropoutLayer` but
//! never calls it in any forward. PEFT also wraps embeddings (`oft_embedding_R`); that is not supported here.

use super::config::OftConfig;
use crate::config::BiasMode;
use crate::layer::{Adapter, BaseKind, BaseLayer, CallCtx, MergeInput, Merged, NamedTensor};
use crate::ops::batched_inverse;
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, IndexOp, Tensor, Var};
use indexmap::IndexMap;

/// The parameter names of a OFT adapter's tensors (the first key component after the module name).
pub const PARAM_PREFIXES: &[&str] = &["oft_R"];

/// The only tensor key of an OFT adapter on a Linear or Conv2d layer.
pub const OFT_R: &str = "oft_R.weight";

/// How the rotation is computed from the skew-symmetric generator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cayley {
    /// PEFT's Cayley–Neumann series with this many terms (`num_cayley_neumann_terms`).
    Neumann(usize),
    /// The exact Cayley transform `(I − Q)(I + Q)⁻¹`.
    Exact,
}

/// The settings of one OFT adapter in one layer (everything but the block size, which comes from the
/// layer width and the config, or from the saved tensor).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct OftOptions {
    /// Which Cayley form.
    pub cayley: Cayley,
    /// Constrained OFT.
    pub coft: bool,
    /// The COFT radius before scaling by `1/√rows`.
    pub eps: f64,
    /// One block shared by all blocks of the layer.
    pub block_share: bool,
    /// `module_dropout` (kept for `describe`; PEFT 0.21.2 never applies it).
    pub module_dropout: f64,
}

impl OftOptions {
    /// The options of `config`.
    pub fn from_config(config: &OftConfig) -> Self {
        Self {
            cayley: if config.use_cayley_neumann {
                Cayley::Neumann(config.num_cayley_neumann_terms)
            } else {
                Cayley::Exact
            },
            coft: config.coft,
            eps: config.eps,
            block_share: config.block_share,
            module_dropout: config.module_dropout,
        }
    }
}

/// PEFT's `adjust_oft_parameters`: the divisor of `width` nearest to `param` (ties go to the smaller one),
/// or `width` itself when `param ≥ width`.
pub fn adjust_oft_parameter(width: usize, param: usize) -> usize {
    if param >= width {
        return width;
    }
    let mut higher = param;
    while higher <= width && !width.is_multiple_of(higher) {
        higher += 1;
    }
    let mut lower = param;
    while lower > 1 && !width.is_multiple_of(lower) {
        lower -= 1;
    }
    if param - lower <= higher - param {
        lower
    } else {
        higher
    }
}

/// The block size PEFT's `update_layer` picks for a layer of this `width` (`r` blocks, or blocks of
/// `oft_block_size`, adjusted to a divisor of `width`).
pub fn block_size_for(width: usize, r: usize, oft_block_size: usize) -> Result<usize> {
    if width == 0 {
        return Err(PeftError::Invalid("OFT on a layer of width 0".into()));
    }
    match (r, oft_block_size) {
        (0, bs) if bs != 0 => {
            let bs = if !width.is_multiple_of(bs) || bs > width {
                adjust_oft_parameter(width, bs)
            } else {
                bs
            };
            Ok(bs)
        }
        (r, 0) if r != 0 => {
            let r = if !width.is_multiple_of(r) || r > width {
                adjust_oft_parameter(width, r)
            } else {
                r
            };
            Ok(width / r)
        }
        (r, bs) => Err(PeftError::InvalidConfig(format!(
            "exactly one of r ({r}) and oft_block_size ({bs}) must be non-zero"
        ))),
    }
}

/// The block size whose packed upper triangle has `n` elements (`bs(bs−1)/2 = n`), if any (`n = 0` gives 1).
fn block_size_of_packed(n: usize) -> Option<usize> {
    let mut bs = ((1.0 + (1.0 + 8.0 * n as f64).sqrt()) / 2.0).round() as usize;
    bs = bs.max(1);
    (bs * (bs - 1) / 2 == n).then_some(bs)
}

/// Kernel size (1 for a Linear) and rotated width of `base`; refuses what PEFT's OFT does not do (or this
/// port does not).
fn geometry(base: &BaseLayer) -> Result<(usize, usize)> {
    match base.kind() {
        BaseKind::Linear => Ok((1, base.in_features())),
        BaseKind::Conv2d(spec) => {
            let d = base.weight_dims();
            if spec.groups != 1 {
                return Err(PeftError::Unsupported {
                    field: "target_modules".into(),
                    value: format!("a Conv2d with groups={}", spec.groups),
                    reason: "OFT rotates the full in_channels·k² filter, so grouped convolutions are not \
                             supported"
                        .into(),
                });
            }
            if spec.dilation != 1 {
                return Err(PeftError::Unsupported {
                    field: "target_modules".into(),
                    value: format!("a Conv2d with dilation={}", spec.dilation),
                    reason: "Conv2d with dilation > 1 is not supported by OFT (as in PEFT)".into(),
                });
            }
            if d[2] != d[3] {
                return Err(PeftError::Unsupported {
                    field: "target_modules".into(),
                    value: format!("a Conv2d with a {}x{} kernel", d[2], d[3]),
                    reason:
                        "OFT supports square kernels only (PEFT uses kernel_size[0] for both axes)"
                            .into(),
                });
            }
            Ok((d[2], d[1] * d[2] * d[3]))
        }
        other => Err(PeftError::Unsupported {
            field: "target_modules".into(),
            value: format!("a {other:?} layer"),
            reason:
                "OFT is implemented for Linear and Conv2d layers only (PEFT's Embedding variant, \
                     oft_embedding_R, is not)"
                    .into(),
        }),
    }
}

/// Refuses the config fields this port does not implement.
fn check_config(config: &OftConfig) -> Result<()> {
    if config.bias != BiasMode::None {
        return Err(PeftError::Unsupported {
            field: "bias".into(),
            value: config.bias.as_str().to_string(),
            reason: "OFT with trained biases is not implemented yet".into(),
        });
    }
    if config.fan_in_fan_out {
        return Err(PeftError::Unsupported {
            field: "fan_in_fan_out".into(),
            value: "true".into(),
            reason: "OFT wraps Linear and Conv2d layers, whose weights are [out, in] (PEFT resets it to false \
                     for a Linear)"
                .into(),
        });
    }
    Ok(())
}

/// `[rows, bs(bs−1)/2]` packed upper triangles → `[rows, bs, bs]` skew-symmetric matrices `M − Mᵀ`
/// (an `index_select` from `[0, v, −v]`, so it is differentiable).
pub fn skew_symmetric(v: &Tensor, bs: usize) -> Result<Tensor> {
    let (rows, n) = v.dims2()?;
    if n != bs * (bs.saturating_sub(1)) / 2 {
        return Err(PeftError::Invalid(format!(
            "skew_symmetric: {n} packed elements do not fill a {bs}×{bs} upper triangle"
        )));
    }
    // Index into [0, v_0..v_{n−1}, −v_0..−v_{n−1}] for every position of the bs×bs matrix.
    let mut idx = vec![0u32; bs * bs];
    let mut i = 0u32;
    for r in 0..bs {
        for c in r + 1..bs {
            idx[r * bs + c] = 1 + i;
            idx[c * bs + r] = 1 + n as u32 + i;
            i += 1;
        }
    }
    let idx = Tensor::from_vec(idx, bs * bs, v.device())?;
    let zero = Tensor::zeros((rows, 1), v.dtype(), v.device())?;
    let ext = Tensor::cat(&[&zero, v, &v.neg()?], 1)?;
    Ok(ext.index_select(&idx, 1)?.reshape((rows, bs, bs))?)
}

/// PEFT's `_cayley_batch`: the rotation of every skew-symmetric block `q` (`[rows, bs, bs]`).
pub fn cayley(q: &Tensor, form: Cayley) -> Result<Tensor> {
    let (_, bs, _) = q.dims3()?;
    let eye = Tensor::eye(bs, q.dtype(), q.device())?.unsqueeze(0)?;
    match form {
        Cayley::Neumann(terms) => {
            let mut r = eye.broadcast_as(q.shape())?.contiguous()?;
            if terms > 1 {
                r = (r + (q * 2.0)?)?;
                if terms > 2 {
                    let q2 = q.matmul(q)?;
                    r = (r + (&q2 * 2.0)?)?;
                    let mut qp = q2;
                    for _ in 3..terms.saturating_sub(1) {
                        qp = qp.matmul(q)?;
                        r = (r + (&qp * 2.0)?)?;
                    }
                    qp = qp.matmul(q)?;
                    r = (r + qp)?;
                }
            }
            Ok(r)
        }
        Cayley::Exact => {
            let plus = q.broadcast_add(&eye)?;
            let minus = eye.broadcast_sub(q)?;
            Ok(minus.matmul(&batched_inverse(&plus)?)?)
        }
    }
}

/// PEFT's `_project_batch` (COFT): each row of `v` (`[rows, n]`) whose skew matrix has a Frobenius norm
/// above `eps / √rows` is scaled onto that radius. Returns the projected rows and whether any row changed.
/// Rows are changed outside autograd (PEFT runs it under `no_grad`); when nothing changes `v` itself is
/// returned.
pub fn coft_project(v_in: &Tensor, bs: usize, eps: f64) -> Result<(Tensor, bool)> {
    let v = v_in.detach();
    let rows = v.dim(0)?;
    let eps = eps / (rows as f64).sqrt();
    let q = skew_symmetric(&v, bs)?;
    let norm = q.sqr()?.sum_keepdim(2)?.sum_keepdim(1)?.sqrt()?; // [rows, 1, 1]
    let norms: Vec<f64> = norm.flatten_all()?.to_dtype(DType::F64)?.to_vec1()?;
    if norms.iter().all(|&n| n <= eps) {
        return Ok((v_in.clone(), false));
    }
    // out = where(norm <= eps, q, eps · q / norm), then the upper triangle again: the scale per row.
    let scale: Vec<f64> = norms
        .iter()
        .map(|&n| if n <= eps { f64::NAN } else { n })
        .collect();
    let mut out_rows = Vec::with_capacity(rows);
    for (i, &n) in scale.iter().enumerate() {
        let row = v.narrow(0, i, 1)?;
        out_rows.push(if n.is_nan() { row } else { ((row / n)? * eps)? });
    }
    Ok((Tensor::cat(&out_rows, 0)?, true))
}

/// `x` (`[N, n·bs]`) with each `bs`-wide block multiplied on the right by its rotation: `x_b · R_b`
/// (`r` is `[n, bs, bs]`, or `[1, bs, bs]` shared by all blocks).
fn rotate_blocks(x: &Tensor, r: &Tensor) -> Result<Tensor> {
    let (n_rows, width) = x.dims2()?;
    let (rows, bs, _) = r.dims3()?;
    let n = width / bs;
    if rows == 1 {
        return Ok(x
            .reshape((n_rows * n, bs))?
            .matmul(&r.i(0)?)?
            .reshape((n_rows, width))?);
    }
    let xb = x.reshape((n_rows, n, bs))?.transpose(0, 1)?.contiguous()?; // [n, N, bs]
    Ok(xb
        .matmul(r)?
        .transpose(0, 1)?
        .contiguous()?
        .reshape((n_rows, width))?)
}

/// PEFT's `_unfold`: `[B, C, H, W]` → `[B·Ho·Wo, C·k·k]` patches (stride 1, no padding), each patch in
/// `(c, i, j)` order.
fn unfold(x: &Tensor, k: usize) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    let (ho, wo) = (h + 1 - k, w + 1 - k);
    let mut slices = Vec::with_capacity(k * k);
    for i in 0..k {
        for j in 0..k {
            slices.push(x.narrow(2, i, ho)?.narrow(3, j, wo)?);
        }
    }
    Ok(Tensor::stack(&slices, 4)? // [B, C, Ho, Wo, k·k]
        .permute((0, 2, 3, 1, 4))?
        .contiguous()?
        .reshape((b * ho * wo, c * k * k))?)
}

/// PEFT's `_fold`: the rotated patches back to `[B, C, H, W]`, literally — the `[B, Ho, Wo, C, k, k]` patches
/// are permuted to `[B, C, Ho, Wo, k, k]` and *viewed* as `[B, C·k·k, Ho·Wo]` (which keeps the channel but
/// reinterprets the rest), then `F.fold` sums every `(c, i, j, y, x)` into `(c, y + i, x + j)`.
fn fold(p: &Tensor, shape: (usize, usize, usize, usize), k: usize) -> Result<Tensor> {
    let (b, c, h, w) = shape;
    let (ho, wo) = (h + 1 - k, w + 1 - k);
    let t = p
        .reshape((b, ho, wo, c, k, k))?
        .permute((0, 3, 1, 2, 4, 5))?
        .contiguous()?
        .reshape((b, c, k, k, ho, wo))?;
    let mut out: Option<Tensor> = None;
    for i in 0..k {
        for j in 0..k {
            let s = t
                .i((.., .., i, j))?
                .pad_with_zeros(2, i, k - 1 - i)?
                .pad_with_zeros(3, j, k - 1 - j)?;
            out = Some(match out {
                None => s,
                Some(o) => (o + s)?,
            });
        }
    }
    out.ok_or_else(|| PeftError::Invalid("fold: empty kernel".into()))
}

/// One OFT adapter inside one Linear or Conv2d layer. The packed generator is an f32 `Var`; the dtype it
/// was created or loaded in is kept for saving.
#[derive(Debug)]
pub struct OftAdapter {
    kind: BaseKind,
    /// 1 for a Linear, the (square) kernel size for a Conv2d.
    kernel: usize,
    /// The rotated width: `in_features`, or `in_channels · k²`.
    width: usize,
    block_size: usize,
    n_blocks: usize,
    opts: OftOptions,
    weight: Var,
    saved_dtype: DType,
}

impl OftAdapter {
    /// A freshly initialised adapter for `base`: zeros (the identity rotation) with `init_weights`, else
    /// normal draws with std 0.1 (PEFT's `reset_oft_parameters`). The block size follows PEFT's per-layer
    /// adjustment of `r` / `oft_block_size`.
    pub fn new(base: &BaseLayer, config: &OftConfig, rng: &mut PeftRng) -> Result<Self> {
        check_config(config)?;
        let (kernel, width) = geometry(base)?;
        let bs = block_size_for(width, config.r, config.oft_block_size)?;
        let opts = OftOptions::from_config(config);
        let n_blocks = width / bs;
        let rows = if opts.block_share { 1 } else { n_blocks };
        let shape = [rows, bs * (bs - 1) / 2];
        let dev = base.device();
        let w = if config.init_weights {
            Tensor::zeros(shape.as_slice(), DType::F32, dev)?
        } else {
            rng.normal_tensor(shape.as_slice(), 0.0, 0.1, DType::F32, dev)?
        };
        Ok(Self {
            kind: *base.kind(),
            kernel,
            width,
            block_size: bs,
            n_blocks,
            opts,
            weight: Var::from_tensor(&w)?,
            saved_dtype: DType::F32,
        })
    }

    /// An adapter from tensors as PEFT saves them (keys relative to the module, adapter name stripped): exactly
    /// `oft_R.weight`, `[rows, bs(bs−1)/2]`. The block size comes from the tensor's width; it must divide the
    /// layer's width into `rows` blocks (or `rows = 1` with `block_share`).
    pub fn from_tensors(
        base: &BaseLayer,
        config: &OftConfig,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        check_config(config)?;
        let (kernel, width) = geometry(base)?;
        let opts = OftOptions::from_config(config);
        let t = tensors
            .get(OFT_R)
            .ok_or_else(|| PeftError::MissingKey(OFT_R.to_string()))?;
        let extra: Vec<String> = tensors.keys().filter(|k| *k != OFT_R).cloned().collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        // What the config would give, for the error message.
        let expected = block_size_for(width, config.r, config.oft_block_size)
            .map(|bs| {
                let rows = if opts.block_share { 1 } else { width / bs };
                vec![rows, bs * (bs - 1) / 2]
            })
            .unwrap_or_default();
        let mismatch = || PeftError::ShapeMismatch {
            name: OFT_R.into(),
            expected: expected.clone(),
            got: t.dims().to_vec(),
        };
        let (rows, packed) = t.dims2().map_err(|_| mismatch())?;
        let bs = block_size_of_packed(packed).ok_or_else(mismatch)?;
        if !width.is_multiple_of(bs) {
            return Err(mismatch());
        }
        let n_blocks = width / bs;
        let want_rows = if opts.block_share { 1 } else { n_blocks };
        if rows != want_rows {
            return Err(mismatch());
        }
        Ok(Self {
            kind: *base.kind(),
            kernel,
            width,
            block_size: bs,
            n_blocks,
            opts,
            weight: Var::from_tensor(&t.to_dtype(DType::F32)?)?,
            saved_dtype: t.dtype(),
        })
    }

    /// The packed generator `oft_R.weight` (f32).
    pub fn oft_r(&self) -> &Tensor {
        self.weight.as_tensor()
    }

    /// The block size.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// The number of blocks the rotated width is cut into.
    pub fn n_blocks(&self) -> usize {
        self.n_blocks
    }

    /// The settings.
    pub fn options(&self) -> OftOptions {
        self.opts
    }

    /// The generator as used: with COFT, projected — and written back into the parameter, as PEFT does.
    fn current_weight(&self) -> Result<Tensor> {
        if self.opts.coft {
            let (p, changed) =
                coft_project(self.weight.as_tensor(), self.block_size, self.opts.eps)?;
            if changed {
                self.weight.set(&p)?;
            }
        }
        Ok(self.weight.as_tensor().clone())
    }

    /// The rotation blocks `[rows, bs, bs]` of generator `w` (in `w`'s dtype; no COFT projection here).
    pub fn rotation_of(&self, w: &Tensor) -> Result<Tensor> {
        cayley(&skew_symmetric(w, self.block_size)?, self.opts.cayley)
    }

    /// The current rotation blocks `[rows, bs, bs]` (f32; COFT projected).
    pub fn rotation(&self) -> Result<Tensor> {
        self.rotation_of(&self.current_weight()?)
    }

    /// The input rotated by the blocks `r` (in `r`'s dtype while computing, returned in `x`'s dtype): the
    /// last axis for a Linear, PEFT's unfold → rotate → fold for a Conv2d.
    pub fn rotate_input(&self, x: &Tensor, r: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let xc = x.to_dtype(r.dtype())?;
        let y = match self.kind {
            BaseKind::Conv2d(_) => {
                let k = self.kernel;
                let (b, c, h, w) = xc.dims4().map_err(|_| {
                    PeftError::Invalid(format!(
                        "OFT on a Conv2d expects a [batch, channels, height, width] input, got {:?}",
                        x.dims()
                    ))
                })?;
                if c * k * k != self.width || h < k || w < k {
                    return Err(PeftError::Invalid(format!(
                        "OFT on a Conv2d with {} input channels and a {k}x{k} kernel got an input of shape {:?}",
                        self.width / (k * k),
                        x.dims()
                    )));
                }
                let p = rotate_blocks(&unfold(&xc, k)?, r)?;
                fold(&p, (b, c, h, w), k)?
            }
            _ => {
                let dims = x.dims().to_vec();
                if dims.last() != Some(&self.width) {
                    return Err(PeftError::Invalid(format!(
                        "OFT on a layer with {} input features got an input of shape {dims:?}",
                        self.width
                    )));
                }
                let lead: usize = dims[..dims.len() - 1].iter().product();
                rotate_blocks(&xc.reshape((lead, self.width))?, r)?.reshape(dims)?
            }
        };
        Ok(y.to_dtype(dtype)?)
    }

    /// `W` seen as `[out, width]`, times `blockdiag(blocks)ᵀ`, back in `W`'s shape.
    fn apply_to_weight(&self, input: &MergeInput<'_>, blocks: &Tensor) -> Result<Tensor> {
        if std::mem::discriminant(&self.kind) != std::mem::discriminant(input.kind) {
            return Err(PeftError::Invalid(format!(
                "OFT adapter for {:?} used on a {:?} layer",
                self.kind, input.kind
            )));
        }
        let w = input.weight;
        let out = w.dim(0)?;
        if w.elem_count() != out * self.width {
            return Err(PeftError::ShapeMismatch {
                name: "weight".into(),
                expected: vec![out, self.width],
                got: w.dims().to_vec(),
            });
        }
        let w2 = w.to_dtype(blocks.dtype())?.reshape((out, self.width))?;
        Ok(rotate_blocks(&w2, &blocks.transpose(1, 2)?.contiguous()?)?.reshape(w.dims())?)
    }
}

impl Adapter for OftAdapter {
    fn peft_type(&self) -> &'static str {
        "OFT"
    }

    fn transform_input(&self, _base: &BaseLayer, x: Tensor, _ctx: &CallCtx<'_>) -> Result<Tensor> {
        let r = self.rotation()?;
        self.rotate_input(&x, &r)
    }

    fn transform_output(
        &self,
        _base: &BaseLayer,
        _x: &Tensor,
        result: Tensor,
        _ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        Ok(result)
    }

    fn merge(&self, input: MergeInput<'_>) -> Result<Merged> {
        let r = self.rotation()?;
        Ok(Merged {
            weight: self.apply_to_weight(&input, &r)?,
            bias: input.bias.cloned(),
            cache: None,
        })
    }

    fn unmerge(
        &self,
        input: MergeInput<'_>,
        _cache: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let r = self.rotation()?;
        let inv = batched_inverse(&r).map_err(|e| {
            PeftError::Invalid(format!("OFT unmerge: the rotation is not invertible ({e})"))
        })?;
        Ok((self.apply_to_weight(&input, &inv)?, input.bias.cloned()))
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        vec![(OFT_R.to_string(), self.weight.as_tensor().clone())]
    }

    fn vars(&self) -> Vec<(String, Var)> {
        vec![(OFT_R.to_string(), self.weight.clone())]
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        let form = match self.opts.cayley {
            Cayley::Neumann(t) => format!("Cayley–Neumann {t} terms"),
            Cayley::Exact => "exact Cayley".to_string(),
        };
        let mut s = format!(
            "oft_R {:?}: {} blocks of {} on width {}",
            self.weight.as_tensor().dims(),
            self.n_blocks,
            self.block_size,
            self.width
        );
        if self.kernel > 1 {
            s.push_str(&format!(" (in·{}x{})", self.kernel, self.kernel));
        }
        s.push_str(&format!(", {form}"));
        if self.opts.block_share {
            s.push_str(", block_share");
        }
        if self.opts.coft {
            s.push_str(&format!(", coft eps={}", self.opts.eps));
        }
        if self.opts.module_dropout > 0.0 {
            s.push_str(&format!(
                ", module_dropout={} (not applied, as in PEFT 0.21.2)",
                self.opts.module_dropout
            ));
        }
        s
    }

    fn merge_warning(&self) -> Option<String> {
        (matches!(self.kind, BaseKind::Conv2d(_)) && self.kernel > 1).then(|| {
            format!(
                "OFT on a {k}x{k} Conv2d: the merged weight (W·blockdiag(R)ᵀ, what PEFT's merge writes) does not \
                 compute what the unmerged adapter computes (PEFT's forward rotates unfolded patches and folds \
                 them back, summing overlaps), so outputs change when this layer is merged",
                k = self.kernel
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::Conv2dSpec;
    use crate::ops::testutil::{fd_check, grads_of, max_diff, randn, vars};
    use crate::{AdapterSlot, ForwardCtx};
    use candle_core::Device;

    fn cpu() -> Device {
        Device::Cpu
    }

    fn linear(rng: &mut PeftRng, out: usize, inp: usize) -> BaseLayer {
        BaseLayer::linear(randn(rng, &[out, inp], DType::F32), None).unwrap()
    }

    fn cfg(bs: usize) -> OftConfig {
        OftConfig {
            oft_block_size: bs,
            init_weights: false,
            ..Default::default()
        }
    }

    /// The dense `blockdiag(R)` of `[rows, bs, bs]` blocks repeated to `n` blocks.
    fn block_diag(r: &Tensor, n: usize) -> Tensor {
        let (rows, bs, _) = r.dims3().unwrap();
        let mut m = Tensor::zeros((n * bs, n * bs), r.dtype(), &cpu()).unwrap();
        for b in 0..n {
            let blk = r.i(if rows == 1 { 0 } else { b }).unwrap();
            let padded = blk
                .pad_with_zeros(0, b * bs, (n - 1 - b) * bs)
                .unwrap()
                .pad_with_zeros(1, b * bs, (n - 1 - b) * bs)
                .unwrap();
            m = (m + padded).unwrap();
        }
        m
    }

    #[test]
    fn adjust_matches_peft() {
        // PEFT: r=5 on 16 → 4, on 24 → 4 (tie to the lower); 5 on 7 → 7; 3 on 16 → 2 (tie); 40 on 16 → 16.
        assert_eq!(adjust_oft_parameter(16, 5), 4);
        assert_eq!(adjust_oft_parameter(24, 5), 4);
        assert_eq!(adjust_oft_parameter(7, 5), 7);
        assert_eq!(adjust_oft_parameter(16, 3), 2);
        assert_eq!(adjust_oft_parameter(16, 40), 16);
        assert_eq!(block_size_for(24, 5, 0).unwrap(), 6);
        assert_eq!(block_size_for(16, 0, 32).unwrap(), 16);
        assert_eq!(block_size_for(36, 0, 6).unwrap(), 6);
        for (r, bs) in [(0, 0), (2, 8)] {
            let e = block_size_for(16, r, bs).unwrap_err();
            assert!(
                matches!(&e, PeftError::InvalidConfig(m) if m.contains(&format!("exactly one of r ({r}) and oft_block_size ({bs})"))),
                "{e}"
            );
        }
        for n in 1..40 {
            assert_eq!(block_size_of_packed(n * (n - 1) / 2), Some(n));
        }
        assert_eq!(block_size_of_packed(4), None);
    }

    #[test]
    fn skew_layout_is_triu_order() {
        let v = Tensor::new(&[[1f32, 2., 3.]], &cpu()).unwrap();
        let q = skew_symmetric(&v, 3).unwrap();
        assert_eq!(
            q.i(0).unwrap().to_vec2::<f32>().unwrap(),
            vec![vec![0., 1., 2.], vec![-1., 0., 3.], vec![-2., -3., 0.]]
        );
    }

    #[test]
    fn neumann_series_follows_peft_loop() {
        let mut rng = PeftRng::new(5);
        let q = skew_symmetric(&(randn(&mut rng, &[2, 6], DType::F64) * 0.2).unwrap(), 4).unwrap();
        let eye = Tensor::eye(4, DType::F64, &cpu())
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let eye = eye.broadcast_as(q.shape()).unwrap();
        let p = |k: usize| {
            let mut m = eye.clone();
            for _ in 0..k {
                m = m.matmul(&q).unwrap();
            }
            m
        };
        let lin = |cs: &[f64]| {
            let mut r = eye.zeros_like().unwrap();
            for (k, c) in cs.iter().enumerate() {
                r = (r + (p(k) * *c).unwrap()).unwrap();
            }
            r
        };
        let want = [
            (0, lin(&[1.])),
            (1, lin(&[1.])),
            (2, lin(&[1., 2.])),
            (3, lin(&[1., 2., 2., 1.])),
            (4, lin(&[1., 2., 2., 1.])),
            (5, lin(&[1., 2., 2., 2., 1.])),
            (7, lin(&[1., 2., 2., 2., 2., 2., 1.])),
        ];
        for (t, w) in want {
            let got = cayley(&q, Cayley::Neumann(t)).unwrap();
            assert!(max_diff(&got, &w) < 1e-12, "{t} terms");
        }
        // Exact: orthogonal, and (I − Q)(I + Q)⁻¹.
        let r = cayley(&q, Cayley::Exact).unwrap();
        let rrt = r.matmul(&r.transpose(1, 2).unwrap()).unwrap();
        assert!(max_diff(&rrt, &eye) < 1e-12);
        let lhs = r.matmul(&(&eye + &q).unwrap()).unwrap();
        assert!(max_diff(&lhs, &(&eye - &q).unwrap()) < 1e-12);
    }

    #[test]
    fn linear_forward_and_merge_agree_with_dense_block_diagonal() {
        let mut rng = PeftRng::new(7);
        for (share, form) in [
            (false, Cayley::Neumann(5)),
            (true, Cayley::Neumann(3)),
            (false, Cayley::Exact),
        ] {
            let base = linear(&mut rng, 5, 12);
            let mut c = cfg(4);
            c.block_share = share;
            c.use_cayley_neumann = form != Cayley::Exact;
            if let Cayley::Neumann(t) = form {
                c.num_cayley_neumann_terms = t;
            }
            let a = OftAdapter::new(&base, &c, &mut rng).unwrap();
            assert_eq!(a.oft_r().dims(), [if share { 1 } else { 3 }, 6]);
            let r = a.rotation().unwrap();
            let bd = block_diag(&r, 3);
            let x = randn(&mut rng, &[2, 3, 12], DType::F32);
            let want = x.broadcast_matmul(&bd).unwrap();
            let got = a.rotate_input(&x, &r).unwrap();
            assert!(max_diff(&got, &want) < 1e-5);
            // Through the slot, unmerged → merged → unmerged.
            let mut slot = AdapterSlot::new("fc", base.clone());
            slot.add_adapter("default", Box::new(a)).unwrap();
            let ctx = ForwardCtx::eval();
            let y = slot.forward(&x, &ctx).unwrap();
            let y_want = base.forward(&want).unwrap();
            assert!(max_diff(&y, &y_want) < 1e-5);
            slot.merge(None).unwrap();
            let w_want = base.weight().unwrap().matmul(&bd.t().unwrap()).unwrap();
            assert!(max_diff(&slot.base().weight().unwrap(), &w_want) < 1e-5);
            assert!(max_diff(&slot.forward(&x, &ctx).unwrap(), &y) < 1e-4);
            slot.unmerge().unwrap();
            assert!(max_diff(&slot.base().weight().unwrap(), &base.weight().unwrap()) < 1e-5);
        }
    }

    #[test]
    fn conv_1x1_rotates_channels_and_kxk_folds() {
        let mut rng = PeftRng::new(8);
        let spec = Conv2dSpec {
            padding: 1,
            ..Default::default()
        };
        // 1x1: merged equals unmerged.
        let w = randn(&mut rng, &[3, 8, 1, 1], DType::F32);
        let base = BaseLayer::conv2d(w, None, spec).unwrap();
        let a = OftAdapter::new(&base, &cfg(4), &mut rng).unwrap();
        assert!(a.merge_warning().is_none());
        let mut slot = AdapterSlot::new("c", base.clone());
        slot.add_adapter("default", Box::new(a)).unwrap();
        let x = randn(&mut rng, &[2, 8, 5, 4], DType::F32);
        let ctx = ForwardCtx::eval();
        let y = slot.forward(&x, &ctx).unwrap();
        slot.merge(None).unwrap();
        assert!(max_diff(&slot.forward(&x, &ctx).unwrap(), &y) < 1e-5);
        // 3x3 at the identity: fold(unfold(x)) multiplies each pixel by how many patches cover it.
        let w = randn(&mut rng, &[3, 2, 3, 3], DType::F32);
        let base = BaseLayer::conv2d(w, None, spec).unwrap();
        let mut c = cfg(6);
        c.init_weights = true;
        let a = OftAdapter::new(&base, &c, &mut rng).unwrap();
        assert!(a.merge_warning().unwrap().contains("3x3"));
        let x = Tensor::ones((1, 2, 4, 5), DType::F32, &cpu()).unwrap();
        let got = a.rotate_input(&x, &a.rotation().unwrap()).unwrap();
        let counts: Vec<f32> = got.i((0, 0, 0)).unwrap().to_vec1().unwrap();
        assert_eq!(counts, vec![1., 2., 3., 2., 1.]);
        let mid: Vec<f32> = got.i((0, 1, 1)).unwrap().to_vec1().unwrap();
        assert_eq!(mid, vec![2., 4., 6., 4., 2.]);
        // Bad inputs are errors, not panics.
        for (shape, says) in [
            (
                &[2, 4, 5][..],
                "expects a [batch, channels, height, width] input, got [2, 4, 5]",
            ),
            (
                &[1, 3, 4, 5],
                "3x3 kernel got an input of shape [1, 3, 4, 5]",
            ),
            (
                &[1, 2, 2, 5],
                "3x3 kernel got an input of shape [1, 2, 2, 5]",
            ),
        ] {
            let x = Tensor::ones(shape, DType::F32, &cpu()).unwrap();
            let e = a.rotate_input(&x, &a.rotation().unwrap()).unwrap_err();
            assert!(
                matches!(&e, PeftError::Invalid(m) if m.contains(says)),
                "{shape:?}: {e}"
            );
        }
    }

    #[test]
    fn refuses_what_it_does_not_do() {
        let mut rng = PeftRng::new(9);
        let base = linear(&mut rng, 4, 8);
        let mut c = cfg(4);
        c.bias = BiasMode::All;
        let e = OftAdapter::new(&base, &c, &mut rng).unwrap_err();
        assert!(
            matches!(&e, PeftError::Unsupported { field, .. } if field == "bias"),
            "{e}"
        );
        let mut c = cfg(4);
        c.fan_in_fan_out = true;
        let e = OftAdapter::new(&base, &c, &mut rng).unwrap_err();
        assert!(
            matches!(&e, PeftError::Unsupported { field, .. } if field == "fan_in_fan_out"),
            "{e}"
        );
        let emb = BaseLayer::embedding(randn(&mut rng, &[10, 8], DType::F32)).unwrap();
        assert!(matches!(
            OftAdapter::new(&emb, &cfg(4), &mut rng),
            Err(PeftError::Unsupported { .. })
        ));
        let c1 = BaseLayer::conv1d(randn(&mut rng, &[8, 4], DType::F32), None).unwrap();
        assert!(matches!(
            OftAdapter::new(&c1, &cfg(4), &mut rng),
            Err(PeftError::Unsupported { .. })
        ));
        for spec in [
            Conv2dSpec {
                dilation: 2,
                ..Default::default()
            },
            Conv2dSpec {
                groups: 2,
                ..Default::default()
            },
        ] {
            let w = randn(&mut rng, &[4, 4 / spec.groups, 3, 3], DType::F32);
            let conv = BaseLayer::conv2d(w, None, spec).unwrap();
            let e = OftAdapter::new(&conv, &cfg(4), &mut rng).unwrap_err();
            assert!(matches!(e, PeftError::Unsupported { .. }), "{e}");
        }
        let w = randn(&mut rng, &[4, 4, 3, 1], DType::F32);
        let conv = BaseLayer::conv2d(w, None, Conv2dSpec::default()).unwrap();
        let e = OftAdapter::new(&conv, &cfg(4), &mut rng).unwrap_err();
        assert!(e.to_string().contains("3x1"), "{e}");
        // Wrong input width.
        let a = OftAdapter::new(&base, &cfg(4), &mut rng).unwrap();
        let r = a.rotation().unwrap();
        let e = a
            .rotate_input(&Tensor::ones((2, 6), DType::F32, &cpu()).unwrap(), &r)
            .unwrap_err();
        assert!(
            matches!(&e, PeftError::Invalid(m) if m.contains("8 input features got an input of shape [2, 6]")),
            "{e}"
        );
    }

    #[test]
    fn from_tensors_takes_the_block_size_from_the_tensor() {
        let mut rng = PeftRng::new(10);
        let base = linear(&mut rng, 4, 24);
        let mk = |shape: &[usize]| {
            let mut m = IndexMap::new();
            m.insert(
                OFT_R.to_string(),
                Tensor::zeros(shape, DType::F16, &cpu()).unwrap(),
            );
            m
        };
        // The config says 8, the tensor says 6 (4 blocks of 6): the tensor wins.
        let a = OftAdapter::from_tensors(&base, &cfg(8), &mk(&[4, 15])).unwrap();
        assert_eq!((a.block_size(), a.n_blocks()), (6, 4));
        assert_eq!(a.saved_dtype(), DType::F16);
        assert_eq!(a.oft_r().dtype(), DType::F32);
        for bad in [&[3, 15][..], &[4, 14], &[2, 28], &[60]] {
            let e = OftAdapter::from_tensors(&base, &cfg(8), &mk(bad)).unwrap_err();
            assert!(
                matches!(&e, PeftError::ShapeMismatch { name, expected, .. } if name == OFT_R && expected == &[3, 28]),
                "{bad:?}: {e}"
            );
        }
        let mut share = cfg(8);
        share.block_share = true;
        assert!(OftAdapter::from_tensors(&base, &share, &mk(&[1, 28])).is_ok());
        let e = OftAdapter::from_tensors(&base, &share, &mk(&[3, 28])).unwrap_err();
        assert!(
            matches!(&e, PeftError::ShapeMismatch { name, expected, got } if name == OFT_R && expected == &[1, 28] && got == &[3, 28]),
            "{e}"
        );
        let e = OftAdapter::from_tensors(&base, &cfg(8), &IndexMap::new()).unwrap_err();
        assert!(matches!(&e, PeftError::MissingKey(k) if k == OFT_R));
        let mut extra = mk(&[3, 28]);
        extra.insert(
            "oft_R.bias".into(),
            Tensor::zeros(1, DType::F32, &cpu()).unwrap(),
        );
        assert!(matches!(
            OftAdapter::from_tensors(&base, &cfg(8), &extra),
            Err(PeftError::UnexpectedKeys(_))
        ));
    }

    #[test]
    fn create_starts_at_identity_or_draws_std_01() {
        let mut rng = PeftRng::new(11);
        let base = linear(&mut rng, 4, 16);
        let mut c = cfg(4);
        c.init_weights = true;
        let a = OftAdapter::new(&base, &c, &mut rng).unwrap();
        let t = &a.tensors()[0];
        assert_eq!(t.0, "oft_R.weight");
        assert_eq!(t.1.dims(), [4, 6]);
        assert_eq!(
            t.1.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let x = randn(&mut rng, &[3, 16], DType::F32);
        let ctx = ForwardCtx::eval();
        let call = CallCtx {
            module: "fc",
            adapter: "default",
            fwd: &ctx,
        };
        assert!(max_diff(&a.transform_input(&base, x.clone(), &call).unwrap(), &x) < 1e-7);
        c.init_weights = false;
        let a = OftAdapter::new(&base, &c, &mut PeftRng::new(3)).unwrap();
        let v: Vec<f32> = a.tensors()[0].1.flatten_all().unwrap().to_vec1().unwrap();
        let std = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
        assert!((0.04..0.2).contains(&std), "{std}");
        assert!(a.describe().contains("4 blocks of 4"), "{}", a.describe());
        assert_eq!(a.vars().len(), 1);
    }

    #[test]
    fn coft_projects_rows_and_writes_back() {
        let mut rng = PeftRng::new(12);
        let base = linear(&mut rng, 4, 16);
        let mut c = cfg(4);
        c.coft = true;
        c.eps = 0.6;
        let a = OftAdapter::new(&base, &c, &mut rng).unwrap();
        let w = Tensor::new(
            &[
                [0.3f32, 0.0, 0.0, 0.0, 0.0, 0.0], // norm 0.42 > 0.3: projected
                [0.1, 0.0, 0.0, 0.0, 0.0, 0.0],    // norm 0.14: kept
                [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                [0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
            ],
            &cpu(),
        )
        .unwrap();
        a.weight.set(&w).unwrap();
        let (p, changed) = coft_project(&w, 4, 0.6).unwrap();
        assert!(changed);
        let pv = p.to_vec2::<f32>().unwrap();
        let eps = 0.3f32;
        assert!((pv[0][0] * 2f32.sqrt() - eps).abs() < 1e-6);
        assert_eq!(pv[1][0], 0.1);
        assert_eq!(pv[2], vec![0.0; 6]);
        assert!((pv[3][5] * 2f32.sqrt() - eps).abs() < 1e-6);
        let (_, again) = coft_project(&p, 4, 0.6).unwrap();
        let _ = again; // idempotent up to rounding
        let x = randn(&mut rng, &[2, 16], DType::F32);
        let ctx = ForwardCtx::eval();
        let call = CallCtx {
            module: "fc",
            adapter: "default",
            fwd: &ctx,
        };
        let y = a.transform_input(&base, x.clone(), &call).unwrap();
        assert!(max_diff(a.oft_r(), &p) < 1e-7, "written back");
        let want = a.rotate_input(&x, &a.rotation_of(&p).unwrap()).unwrap();
        assert!(max_diff(&y, &want) < 1e-7);
    }

    /// Autograd vs finite differences of the forward in f64, w.r.t. the generator and the input.
    fn check_grads(base: &BaseLayer, c: &OftConfig, x_shape: &[usize], seed: u64) {
        let mut rng = PeftRng::new(seed);
        let a = OftAdapter::new(base, c, &mut rng).unwrap();
        let w = a.oft_r().to_dtype(DType::F64).unwrap();
        let x = randn(&mut rng, x_shape, DType::F64);
        let y0 = a.rotate_input(&x, &a.rotation_of(&w).unwrap()).unwrap();
        let r = randn(&mut rng, y0.dims(), DType::F64);
        let f = |t: &[Tensor]| -> candle_core::Result<Tensor> {
            let w = if c.coft {
                let (p, changed) = coft_project(&t[0], a.block_size(), c.eps).unwrap();
                assert!(
                    !changed,
                    "check_grads needs generators inside the COFT ball"
                );
                p
            } else {
                t[0].clone()
            };
            let rot = a.rotation_of(&w).map_err(candle_core::Error::wrap)?;
            a.rotate_input(&t[1], &rot)
                .map_err(candle_core::Error::wrap)
        };
        let vs = vars(&[&w, &x]);
        let grads = grads_of(&vs, &r, &f);
        let loss = |t: &[Tensor]| (f(t)? * &r)?.sum_all()?.to_scalar::<f64>();
        let inputs = [w.clone(), x.clone()];
        for (which, g) in grads.iter().enumerate() {
            let err = fd_check(&inputs, which, g.as_ref().unwrap(), &loss);
            assert!(err < 1e-6, "{c:?} input {which}: {err}");
        }
    }

    #[test]
    fn gradients_match_finite_differences_f64() {
        let mut rng = PeftRng::new(13);
        let base = linear(&mut rng, 3, 8);
        for (form, share) in [
            (Cayley::Neumann(5), false),
            (Cayley::Neumann(3), false),
            (Cayley::Neumann(6), true),
            (Cayley::Exact, false),
            (Cayley::Exact, true),
        ] {
            let mut c = cfg(4);
            c.block_share = share;
            c.use_cayley_neumann = form != Cayley::Exact;
            if let Cayley::Neumann(t) = form {
                c.num_cayley_neumann_terms = t;
            }
            check_grads(&base, &c, &[2, 3, 8], 20);
        }
        // A 3x3 conv: the unfold / fold path.
        let w = randn(&mut rng, &[2, 2, 3, 3], DType::F32);
        let conv = BaseLayer::conv2d(w, None, Conv2dSpec::default()).unwrap();
        check_grads(&conv, &cfg(6), &[1, 2, 4, 5], 21);
    }

    #[test]
    fn coft_gradient_is_taken_at_the_projected_point() {
        // Inside the ball the projection is the identity, so finite differences of the whole forward agree;
        // outside it the gradient is the one of the plain rotation at the projected generator (PEFT's no_grad
        // copy), which is what the slot computes since the parameter then holds the projected values.
        let mut rng = PeftRng::new(14);
        let base = linear(&mut rng, 3, 8);
        let mut c = cfg(4);
        c.coft = true;
        c.eps = 10.0;
        check_grads(&base, &c, &[2, 8], 22);
        c.eps = 0.01;
        let a = OftAdapter::new(&base, &c, &mut rng).unwrap();
        let x = randn(&mut rng, &[2, 8], DType::F32);
        let rw = randn(&mut rng, &[2, 8], DType::F32);
        let ctx = ForwardCtx::eval();
        let call = CallCtx {
            module: "fc",
            adapter: "default",
            fwd: &ctx,
        };
        let y = a.transform_input(&base, x.clone(), &call).unwrap();
        let g = (y * &rw).unwrap().sum_all().unwrap().backward().unwrap();
        let got = g.get(a.weight.as_tensor()).unwrap().clone();
        let p = Var::from_tensor(a.oft_r()).unwrap();
        let y2 = a
            .rotate_input(&x, &a.rotation_of(p.as_tensor()).unwrap())
            .unwrap();
        let g2 = (y2 * &rw).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_diff(&got, g2.get(p.as_tensor()).unwrap()) < 1e-6);
    }
}
