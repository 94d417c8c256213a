//! The LoKr adapter for Linear and Conv2d layers (PEFT's `tuners/lokr/layer.py`).
//!
//! The update is a Kronecker product of two factors, scaled by `alpha / r`:
//!
//! ```text
//! ΔW = kron(w1, w2) · alpha / r,  reshaped to the base weight
//! out = a·b, in = c·d   with (a, b) = factorization(out), (c, d) = factorization(in)
//! w1 [a, c]     = lokr_w1                       or lokr_w1_a [a, r] @ lokr_w1_b [r, c]   (decompose_both)
//! w2 [b, d(,k)] = lokr_w2                       or lokr_w2_a [b, r] @ lokr_w2_b [r, d·kh·kw]
//!                 or einsum("i j k l, i p, j r -> p r k l", lokr_t2 [r, r, kh, kw], lokr_w2_a [r, b], lokr_w2_b [r, d])
//! ```
//!
//! Which of these a layer holds is PEFT's `update_layer` decision from the config and the base shape
//! ([`LoKrLayout`]): w1 is low-rank only with `decompose_both` and `r < max(a, c) / 2`, w2 only when
//! `r < max(b, d) / 2`, and the CP form (`lokr_t2`) only with `use_effective_conv2d` on a Conv2d whose kernel
//! is not 1×1. `r` and `alpha` always come from the config (`rank_pattern` / `alpha_pattern`): small layers
//! store full matrices and are still scaled by `alpha / r`.
//!
//! The forward adds `F.linear(x, ΔW)` / `F.conv2d(x, ΔW, …)` to the base output
//! ([`crate::tuners::lycoris_utils::delta_activations`]); in training the whole update is skipped with
//! probability `module_dropout`, and `rank_dropout` zeroes rows of ΔW (rescaled by the kept fraction only with
//! `rank_dropout_scale`). Merging adds ΔW to the weight; unmerging subtracts it.

use super::config::{LoKrConfig, LoKrInitWeights};
use crate::layer::{
    Adapter, BaseKind, BaseLayer, CallCtx, NamedTensor, check_shape,
};
use crate::tuners::lycoris_utils;
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;

/// The parameter names of a LOKR adapter's tensors (the first key component after the module name).
pub const PARAM_PREFIXES: &[&str] = &[
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
];

/// PEFT's (and LyCORIS') `factorization(dimension, factor)`, ported literally: two numbers whose product is
/// `dimension`. A positive `factor` dividing `dimension` gives `(factor, dimension / factor)` as is (so
/// `factorization(16, 16) = (16, 1)`); otherwise the divisor pair is searched from `(1, dimension)` upwards
/// while the sum does not grow and the smaller number stays `<= factor` (`-1`: no bound, the most balanced
/// split), and returned smaller first: `factorization(32, -1) = (4, 8)`, `factorization(127, -1) = (1, 127)`.
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension.is_multiple_of(factor as usize) {
        let m = factor as usize;
        return (m, dimension / m);
    }
    // `factor == -1` means "no bound"; any other value bounds `new_m` as is (0 or negative stop at once).
    let bound: i128 = if factor == -1 {
        dimension as i128
    } else {
        factor as i128
    };
    let (mut m, mut n) = (1usize, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dimension.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m as i128 > bound {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    if m > n {
        (m, n) = (n, m);
    }
    (m, n)
}

/// What PEFT's `update_layer` decides for one layer: the Kronecker factor sizes and which parameters exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoKrLayout {
    /// `a`: rows of w1 (`out = a·b`).
    pub a: usize,
    /// `b`: rows of w2.
    pub b: usize,
    /// `c`: columns of w1 (`in = c·d`).
    pub c: usize,
    /// `d`: columns (input channels) of w2.
    pub d: usize,
    /// The Conv2d kernel `(kh, kw)`; `None` for a Linear.
    pub kernel: Option<(usize, usize)>,
    /// The rank.
    pub r: usize,
    /// Whether w1 is one full matrix `lokr_w1` (else `lokr_w1_a @ lokr_w1_b`).
    pub full_w1: bool,
    /// Whether w2 is one full tensor `lokr_w2`.
    pub full_w2: bool,
    /// Whether a low-rank w2 is in CP form (`lokr_t2`, `lokr_w2_a`, `lokr_w2_b`).
    pub cp: bool,
}

impl LoKrLayout {
    /// PEFT's shape logic of `update_layer` for `base` with rank `r` under `config`. Refuses the layer kinds
    /// LoKr does not wrap (as [`lycoris_utils::check_supported`]).
    pub fn new(config: &LoKrConfig, base: &BaseLayer, r: usize) -> Result<Self> {
        lycoris_utils::check_supported("LoKr", base)?;
        if r == 0 {
            return Err(PeftError::InvalidConfig(
                "`r` should be a positive integer value but the value passed is 0".into(),
            ));
        }
        let dims = base.weight_dims();
        let (out_dim, in_dim) = (dims[0], dims[1]);
        let (a, b) = factorization(out_dim, config.decompose_factor);
        let (c, d) = factorization(in_dim, config.decompose_factor);
        let rf = r as f64;
        // PEFT: `use_w1 = not (decompose_both and r < max(a, c) / 2)`, `use_w2 = not (r < max(b, d) / 2)`,
        // with true division.
        let full_w1 = !(config.decompose_both && rf < a.max(c) as f64 / 2.0);
        let full_w2 = rf >= b.max(d) as f64 / 2.0;
        let (kernel, cp) = match base.kind() {
            BaseKind::Conv2d(_) => {
                let k = (dims[2], dims[3]);
                (Some(k), config.lycoris.use_effective_conv2d && k != (1, 1))
            }
            _ => (None, false),
        };
        Ok(Self {
            a,
            b,
            c,
            d,
            kernel,
            r,
            full_w1,
            full_w2,
            cp: cp && !full_w2,
        })
    }

    /// `kh·kw`, 1 for a Linear.
    fn k(&self) -> usize {
        self.kernel.map_or(1, |(h, w)| h * w)
    }

    /// Every tensor this layer holds, with its shape, in PEFT's parameter order (what `create_adapter_parameters`
    /// creates).
    pub fn expected(&self) -> Vec<(&'static str, Vec<usize>)> {
        let r = self.r;
        let mut v = Vec::new();
        if self.full_w1 {
            v.push(("lokr_w1", vec![self.a, self.c]));
        } else {
            v.push(("lokr_w1_a", vec![self.a, r]));
            v.push(("lokr_w1_b", vec![r, self.c]));
        }
        match self.kernel {
            Some((kh, kw)) if self.full_w2 => v.push(("lokr_w2", vec![self.b, self.d, kh, kw])),
            None if self.full_w2 => v.push(("lokr_w2", vec![self.b, self.d])),
            Some((kh, kw)) if self.cp => {
                v.push(("lokr_w2_a", vec![r, self.b]));
                v.push(("lokr_w2_b", vec![r, self.d]));
                v.push(("lokr_t2", vec![r, r, kh, kw]));
            }
            _ => {
                v.push(("lokr_w2_a", vec![self.b, r]));
                v.push(("lokr_w2_b", vec![r, self.d * self.k()]));
            }
        }
        v
    }
}

/// The first Kronecker factor.
#[derive(Debug)]
enum W1 {
    Full(Var),
    LowRank { a: Var, b: Var },
}

/// The second Kronecker factor.
#[derive(Debug)]
enum W2 {
    Full(Var),
    LowRank { a: Var, b: Var },
    Cp { t2: Var, a: Var, b: Var },
}

/// One LoKr adapter inside one Linear or Conv2d layer. Parameters are `Var`s (f32 when created or loaded);
/// the dtype they were loaded in is kept for saving.
#[derive(Debug)]
pub struct LoKrAdapter {
    layout: LoKrLayout,
    weight_shape: Vec<usize>,
    alpha: f64,
    w1: W1,
    w2: W2,
    rank_dropout: f64,
    module_dropout: f64,
    rank_dropout_scale: bool,
    saved_dtype: DType,
}

/// `kron(w1 [a, c], w2 [b, m]) → [a·b, c·m]`: `out[i·b + p, j·m + q] = w1[i, j] · w2[p, q]`.
fn kron2(w1: &Tensor, w2: &Tensor) -> Result<Tensor> {
    let (a, c) = w1.dims2()?;
    let (b, m) = w2.dims2()?;
    let k = w1
        .reshape((a, 1, c, 1))?
        .broadcast_mul(&w2.reshape((1, b, 1, m))?)?;
    Ok(k.reshape((a * b, c * m))?)
}

/// PEFT's `make_weight_cp`: `einsum("i j k l, i p, j r -> p r k l", t, wa, wb)`, returned flattened as
/// `[b, d·kh·kw]` (`t [r, r, kh, kw]`, `wa [r, b]`, `wb [r, d]`).
fn make_weight_cp(t: &Tensor, wa: &Tensor, wb: &Tensor) -> Result<Tensor> {
    let (r1, r2, kh, kw) = t.dims4()?;
    let k = kh * kw;
    let b = wa.dim(1)?;
    let d = wb.dim(1)?;
    // [b, r1] @ [r1, r2·k] → [b, r2, k]
    let tmp = wa.t()?.matmul(&t.reshape((r1, r2 * k))?)?;
    // [b·k, r2] @ [r2, d] → [b, k, d] → [b, d, k]
    let tmp = tmp.reshape((b, r2, k))?.transpose(1, 2)?.contiguous()?;
    let out = tmp.reshape((b * k, r2))?.matmul(wb)?;
    Ok(out
        .reshape((b, k, d))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, d * k))?)
}

impl LoKrAdapter {
    /// The layout (factor sizes and forms) and `(r, alpha)` of `module` under `config`.
    fn layout_for(
        config: &LoKrConfig,
        module: &str,
        base: &BaseLayer,
    ) -> Result<(LoKrLayout, f64)> {
        let (r, alpha) = config.rank_and_alpha_for(module);
        Ok((LoKrLayout::new(config, base, r)?, alpha))
    }

    fn assemble(
        config: &LoKrConfig,
        layout: LoKrLayout,
        alpha: f64,
        base: &BaseLayer,
        mut params: IndexMap<&'static str, Var>,
        saved_dtype: DType,
    ) -> Result<Self> {
        let mut take = |k: &str| {
            params
                .shift_remove(k)
                .ok_or_else(|| PeftError::MissingKey(k.to_string()))
        };
        let w1 = if layout.full_w1 {
            W1::Full(take("lokr_w1")?)
        } else {
            W1::LowRank {
                a: take("lokr_w1_a")?,
                b: take("lokr_w1_b")?,
            }
        };
        let w2 = if layout.full_w2 {
            W2::Full(take("lokr_w2")?)
        } else if layout.cp {
            W2::Cp {
                t2: take("lokr_t2")?,
                a: take("lokr_w2_a")?,
                b: take("lokr_w2_b")?,
            }
        } else {
            W2::LowRank {
                a: take("lokr_w2_a")?,
                b: take("lokr_w2_b")?,
            }
        };
        Ok(Self {
            layout,
            weight_shape: base.weight_dims().to_vec(),
            alpha,
            w1,
            w2,
            rank_dropout: config.lycoris.rank_dropout,
            module_dropout: config.lycoris.module_dropout,
            rank_dropout_scale: config.rank_dropout_scale,
            saved_dtype,
        })
    }

    /// A freshly initialised adapter (PEFT's `reset_adapter_parameters*`): `init_weights = true` zeroes w1
    /// (`lokr_w1` or `lokr_w1_a`), `"lycoris"` zeroes w2 (`lokr_w2` or `lokr_w2_b`), `false` draws everything;
    /// every other tensor is kaiming-uniform with `a = √5` (uniform in `±1/√fan_in`).
    pub fn new(
        config: &LoKrConfig,
        module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
    ) -> Result<Self> {
        let (layout, alpha) = Self::layout_for(config, module, base)?;
        let dev = base.device().clone();
        let zero_key: Option<&str> = match &config.init_weights {
            LoKrInitWeights::Bool(true) => Some(if layout.full_w1 {
                "lokr_w1"
            } else {
                "lokr_w1_a"
            }),
            LoKrInitWeights::Bool(false) => None,
            LoKrInitWeights::Method(m) if m == "lycoris" => Some(if layout.full_w2 {
                "lokr_w2"
            } else {
                "lokr_w2_b"
            }),
            LoKrInitWeights::Method(m) => {
                return Err(PeftError::InvalidConfig(format!(
                    "`init_weights` must be true, false or \"lycoris\", got {m:?}"
                )));
            }
        };
        let mut params = IndexMap::new();
        for (key, shape) in layout.expected() {
            let t = if Some(key) == zero_key {
                Tensor::zeros(shape.as_slice(), DType::F32, &dev)?
            } else {
                let fan_in: usize = shape[1..].iter().product();
                let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
                rng.uniform_tensor(shape.as_slice(), -bound, bound, DType::F32, &dev)?
            };
            params.insert(key, Var::from_tensor(&t)?);
        }
        Self::assemble(config, layout, alpha, base, params, DType::F32)
    }

    /// An adapter from tensors as PEFT saves them (keys relative to the module, adapter name stripped): exactly
    /// the keys, and shapes, PEFT's `update_layer` creates for this config and base.
    pub fn from_tensors(
        config: &LoKrConfig,
        module: &str,
        base: &BaseLayer,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        Self::load(config, module, base, tensors, DType::F32)
    }

    /// [`LoKrAdapter::from_tensors`] with the parameters held in `param_dtype` (f32 except in f64 tests).
    fn load(
        config: &LoKrConfig,
        module: &str,
        base: &BaseLayer,
        tensors: &IndexMap<String, Tensor>,
        param_dtype: DType,
    ) -> Result<Self> {
        let (layout, alpha) = Self::layout_for(config, module, base)?;
        let expected = layout.expected();
        for (key, _) in &expected {
            if !tensors.contains_key(*key) {
                return Err(PeftError::MissingKey(key.to_string()));
            }
        }
        for (key, shape) in &expected {
            check_shape(key, &tensors[*key], shape)?;
        }
        let extra: Vec<String> = tensors
            .keys()
            .filter(|k| !expected.iter().any(|(e, _)| e == k))
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        let saved_dtype = tensors[expected[0].0].dtype();
        let mut params = IndexMap::new();
        for (key, _) in &expected {
            let t = tensors[*key].to_dtype(param_dtype)?;
            params.insert(*key, Var::from_tensor(&t)?);
        }
        Self::assemble(config, layout, alpha, base, params, saved_dtype)
    }

    /// The layout: factor sizes and which forms w1 and w2 take.
    pub fn layout(&self) -> &LoKrLayout {
        &self.layout
    }

    /// The scale `alpha / r`.
    pub fn scaling(&self) -> f64 {
        self.alpha / self.layout.r as f64
    }

    /// `w1 [a, c]`.
    fn w1(&self) -> Result<Tensor> {
        Ok(match &self.w1 {
            W1::Full(w) => w.as_tensor().clone(),
            W1::LowRank { a, b } => a.as_tensor().matmul(b.as_tensor())?,
        })
    }

    /// `w2` flattened to `[b, d·kh·kw]` (the kernel axes follow `d`, as in the 4-D Kronecker product).
    fn w2_flat(&self) -> Result<Tensor> {
        let l = &self.layout;
        Ok(match &self.w2 {
            W2::Full(w) => w.as_tensor().reshape((l.b, l.d * l.k()))?,
            W2::LowRank { a, b } => a.as_tensor().matmul(b.as_tensor())?,
            W2::Cp { t2, a, b } => make_weight_cp(t2.as_tensor(), a.as_tensor(), b.as_tensor())?,
        })
    }

    /// PEFT's `get_delta_weight` without rank dropout: `kron(w1, w2) · alpha / r` in the base weight's shape,
    /// in the parameters' dtype (f32).
    pub fn delta(&self) -> Result<Tensor> {
        let k = kron2(&self.w1()?, &self.w2_flat()?)?;
        Ok((k * self.scaling())?.reshape(self.weight_shape.as_slice())?)
    }

    fn check_base(&self, base: &BaseLayer) -> Result<()> {
        if base.weight_dims() != self.weight_shape.as_slice() {
            return Err(PeftError::Invalid(format!(
                "LoKr adapter for a weight of shape {:?} used on one of shape {:?}",
                self.weight_shape,
                base.weight_dims()
            )));
        }
        Ok(())
    }

    fn all_vars(&self) -> Vec<(&'static str, &Var)> {
        let mut v = Vec::new();
        match &self.w1 {
            W1::Full(w) => v.push(("lokr_w1", w)),
            W1::LowRank { a, b } => {
                v.push(("lokr_w1_a", a));
                v.push(("lokr_w1_b", b));
            }
        }
        match &self.w2 {
            W2::Full(w) => v.push(("lokr_w2", w)),
            W2::LowRank { a, b } => {
                v.push(("lokr_w2_a", a));
                v.push(("lokr_w2_b", b));
            }
            W2::Cp { t2, a, b } => {
                v.push(("lokr_w2_a", a));
                v.push(("lokr_w2_b", b));
                v.push(("lokr_t2", t2));
            }
        }
        v
    }
}

impl Adapter for LoKrAdapter {
    /// PEFT's `supports_lora_conversion`: Linear layers, by their additive delta.
    fn lora_conversion(
        &self,
        base: &crate::layer::BaseLayer,
    ) -> Result<Option<crate::layer::LoraConversion>> {
        crate::tuners::lora::conversion::additive_conversion(self, base, false)
    }

    fn peft_type(&self) -> &'static str {
        "LOKR"
    }

    fn transform_output(
        &self,
        base: &BaseLayer,
        x: &Tensor,
        result: Tensor,
        ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        self.check_base(base)?;
        if lycoris_utils::module_dropped(ctx, self.module_dropout) {
            return Ok(result);
        }
        let delta = lycoris_utils::rank_dropout(
            ctx,
            &self.delta()?,
            self.rank_dropout,
            self.rank_dropout_scale,
        )?;
        let dy = lycoris_utils::delta_activations(base, x, &delta)?;
        Ok((result.to_dtype(dy.dtype())? + dy)?)
    }

    fn delta_weight(&self, _kind: &BaseKind) -> Result<Option<(Tensor, Option<Tensor>)>> {
        Ok(Some((self.delta()?.to_dtype(DType::F32)?, None)))
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        self.all_vars()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.as_tensor().clone()))
            .collect()
    }

    fn vars(&self) -> Vec<(String, Var)> {
        self.all_vars()
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        let l = &self.layout;
        let dims = |v: &Var| format!("{:?}", v.as_tensor().dims());
        let w1 = match &self.w1 {
            W1::Full(w) => format!("w1 {} full", dims(w)),
            W1::LowRank { a, b } => {
                format!("w1 [{}, {}] low-rank {}@{}", l.a, l.c, dims(a), dims(b))
            }
        };
        let w2_shape = match l.kernel {
            Some((kh, kw)) => format!("[{}, {}, {kh}, {kw}]", l.b, l.d),
            None => format!("[{}, {}]", l.b, l.d),
        };
        let w2 = match &self.w2 {
            W2::Full(w) => format!("w2 {} full", dims(w)),
            W2::LowRank { a, b } => format!("w2 {w2_shape} low-rank {}@{}", dims(a), dims(b)),
            W2::Cp { t2, a, b } => format!(
                "w2 {w2_shape} CP t2 {} with {}, {}",
                dims(t2),
                dims(a),
                dims(b)
            ),
        };
        format!("r={} alpha={} {w1}, {w2}", l.r, self.alpha)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{Conv2dSpec, MergeInput};
    use crate::ops::testutil::{fd_check, grads_of, max_diff, randn, vars};
    use crate::{AdapterSlot, ForwardCtx};
    use candle_core::Device;

    /// `peft.tuners.lokr.layer.factorization(dimension, factor)` as PEFT 0.21.2 computes it.
    #[test]
    fn factorization_matches_peft() {
        #[rustfmt::skip]
        let table: &[(usize, i64, (usize, usize))] = &[
            (32, -1, (4, 8)), (64, 4, (4, 16)), (48, -1, (6, 8)), (7, -1, (1, 7)), (12, 3, (3, 4)),
            (16, 16, (16, 1)), (24, -1, (4, 6)), (16, -1, (4, 4)), (12, -1, (3, 4)), (3, -1, (1, 3)),
            (8, -1, (2, 4)), (6, -1, (2, 3)), (96, -1, (8, 12)), (64, -1, (8, 8)), (128, 4, (4, 32)),
            (127, -1, (1, 127)), (256, -1, (16, 16)), (1, -1, (1, 1)), (2, -1, (1, 2)), (36, -1, (6, 6)),
            (100, 3, (2, 50)), (64, 5, (4, 16)), (96, 5, (4, 24)), (30, 4, (3, 10)), (18, -1, (3, 6)),
            (60, 7, (6, 10)), (12, 0, (1, 12)), (24, -2, (1, 24)), (1000, -1, (25, 40)), (49, 3, (1, 49)),
            (10, 100, (2, 5)),
        ];
        for &(d, f, want) in table {
            assert_eq!(factorization(d, f), want, "factorization({d}, {f})");
        }
        // degenerate sizes do not panic
        let _ = factorization(0, -1);
        let _ = factorization(0, 3);
    }

    fn cfg() -> LoKrConfig {
        LoKrConfig {
            lycoris: crate::config::LycorisFields { r: 2, alpha: 3.0, ..Default::default() },
            
            ..Default::default()
        }
    }

    fn linear(rng: &mut PeftRng, out: usize, inp: usize, dtype: DType) -> BaseLayer {
        BaseLayer::linear(
            randn(rng, &[out, inp], dtype),
            Some(randn(rng, &[out], dtype)),
        )
        .unwrap()
    }

    fn conv(rng: &mut PeftRng, out: usize, inp: usize, k: usize, dtype: DType) -> BaseLayer {
        let spec = Conv2dSpec {
            padding: 1,
            stride: 2,
            ..Default::default()
        };
        BaseLayer::conv2d(randn(rng, &[out, inp, k, k], dtype), None, spec).unwrap()
    }

    /// Random tensors for every parameter the layout has.
    fn params(layout: &LoKrLayout, rng: &mut PeftRng, dtype: DType) -> IndexMap<String, Tensor> {
        layout
            .expected()
            .into_iter()
            .map(|(k, s)| (k.to_string(), randn(rng, &s, dtype)))
            .collect()
    }

    #[test]
    fn layout_follows_update_layer() {
        let mut rng = PeftRng::new(0);
        let base = linear(&mut rng, 64, 48, DType::F32);
        // (a, b) = (8, 8), (c, d) = (6, 8)
        let l = LoKrLayout::new(&cfg(), &base, 2).unwrap();
        assert_eq!((l.a, l.b, l.c, l.d), (8, 8, 6, 8));
        assert!(l.full_w1 && !l.full_w2 && !l.cp);
        let both = LoKrConfig {
            decompose_both: true,
            ..cfg()
        };
        assert!(!LoKrLayout::new(&both, &base, 3).unwrap().full_w1);
        // r < max(8, 6) / 2 = 4 fails at r = 4: full
        assert!(LoKrLayout::new(&both, &base, 4).unwrap().full_w1);
        assert!(LoKrLayout::new(&both, &base, 4).unwrap().full_w2);
        let eff = LoKrConfig {
            lycoris: crate::config::LycorisFields { use_effective_conv2d: true, ..cfg().lycoris },
            ..cfg()
        };
        let c3 = conv(&mut rng, 32, 8, 3, DType::F32);
        let l = LoKrLayout::new(&eff, &c3, 2).unwrap();
        assert!(l.cp);
        assert_eq!(
            l.expected(),
            vec![
                ("lokr_w1", vec![4, 2]),
                ("lokr_w2_a", vec![2, 8]),
                ("lokr_w2_b", vec![2, 4]),
                ("lokr_t2", vec![2, 2, 3, 3]),
            ]
        );
        // 1x1 kernels never use the CP form
        let c1 = conv(&mut rng, 32, 8, 1, DType::F32);
        let l = LoKrLayout::new(&eff, &c1, 2).unwrap();
        assert!(!l.cp);
        assert_eq!(l.expected()[2], ("lokr_w2_b", vec![2, 4]));
        assert!(matches!(
            LoKrLayout::new(&cfg(), &base, 0),
            Err(PeftError::InvalidConfig(_))
        ));
    }

    #[test]
    fn cp_weight_is_the_einsum() {
        let mut rng = PeftRng::new(1);
        let (r, b, d, kh, kw) = (3, 4, 5, 2, 3);
        let t = randn(&mut rng, &[r, r, kh, kw], DType::F64);
        let wa = randn(&mut rng, &[r, b], DType::F64);
        let wb = randn(&mut rng, &[r, d], DType::F64);
        let got = make_weight_cp(&t, &wa, &wb).unwrap();
        let (tv, av, bv) = (
            t.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            wa.to_vec2::<f64>().unwrap(),
            wb.to_vec2::<f64>().unwrap(),
        );
        let mut want = vec![0f64; b * d * kh * kw];
        for p in 0..b {
            for q in 0..d {
                for k in 0..kh {
                    for l in 0..kw {
                        let mut s = 0.0;
                        for i in 0..r {
                            for j in 0..r {
                                s += tv[((i * r + j) * kh + k) * kw + l] * av[i][p] * bv[j][q];
                            }
                        }
                        want[((p * d + q) * kh + k) * kw + l] = s;
                    }
                }
            }
        }
        let want = Tensor::from_vec(want, (b, d * kh * kw), &Device::Cpu).unwrap();
        assert!(max_diff(&got, &want) < 1e-12);
    }

    #[test]
    fn kron_is_torch_kron() {
        let w1 = Tensor::from_slice(&[1f64, 2., 3., 4.], (2, 2), &Device::Cpu).unwrap();
        let w2 = Tensor::from_slice(&[0f64, 1., 10., 100., 5., 6.], (2, 3), &Device::Cpu).unwrap();
        let k = kron2(&w1, &w2).unwrap().to_vec2::<f64>().unwrap();
        assert_eq!(k[0], vec![0., 1., 10., 0., 2., 20.]);
        assert_eq!(k[1], vec![100., 5., 6., 200., 10., 12.]);
        assert_eq!(k[3], vec![300., 15., 18., 400., 20., 24.]);
    }

    /// `sum(forward(x) ⊙ R)` of an adapter built in f64 from `ts` (in `layout.expected()` order).
    fn loss_of(
        config: &LoKrConfig,
        base: &BaseLayer,
        layout: &LoKrLayout,
        x: &Tensor,
        rr: &Tensor,
        ts: &[Tensor],
    ) -> Tensor {
        let tensors: IndexMap<String, Tensor> = layout
            .expected()
            .iter()
            .zip(ts)
            .map(|((k, _), t)| (k.to_string(), t.clone()))
            .collect();
        let a = LoKrAdapter::load(config, "m", base, &tensors, DType::F64).unwrap();
        let ctx = ForwardCtx::eval();
        let call = CallCtx {
            module: "m",
            adapter: "default",
            fwd: &ctx,
        };
        let y = a
            .transform_output(base, x, base.forward(x).unwrap(), &call)
            .unwrap();
        assert_eq!(y.dtype(), DType::F64);
        (y * rr).unwrap().sum_all().unwrap()
    }

    fn check_gradients(config: &LoKrConfig, base: &BaseLayer, x: &Tensor, rng: &mut PeftRng) {
        let (r, _) = config.rank_and_alpha_for("m");
        let layout = LoKrLayout::new(config, base, r).unwrap();
        let init = params(&layout, rng, DType::F64);
        let ts: Vec<&Tensor> = init.values().collect();
        let vs = vars(&ts);
        let y0 = base.forward(x).unwrap();
        let rr = randn(rng, y0.dims(), DType::F64);
        let grads = grads_of(
            &vs,
            &Tensor::ones((), DType::F64, &Device::Cpu).unwrap(),
            &|t| Ok(loss_of(config, base, &layout, x, &rr, t)),
        );
        let inputs: Vec<Tensor> = init.values().cloned().collect();
        for (i, g) in grads.iter().enumerate() {
            let g = g
                .as_ref()
                .unwrap_or_else(|| panic!("no gradient for {}", init.keys().nth(i).unwrap()));
            let err = fd_check(&inputs, i, g, &|t| {
                loss_of(config, base, &layout, x, &rr, t).to_scalar::<f64>()
            });
            assert!(
                err < 1e-5,
                "{}: fd error {err}",
                init.keys().nth(i).unwrap()
            );
        }
    }

    #[test]
    fn gradients_match_finite_differences_decompose_both_linear() {
        let mut rng = PeftRng::new(2);
        let base = linear(&mut rng, 64, 48, DType::F64);
        let config = LoKrConfig {
            decompose_both: true,
            ..cfg()
        };
        let layout = LoKrLayout::new(&config, &base, 2).unwrap();
        assert!(!layout.full_w1 && !layout.full_w2);
        let x = randn(&mut rng, &[2, 3, 48], DType::F64);
        check_gradients(&config, &base, &x, &mut rng);
    }

    #[test]
    fn gradients_match_finite_differences_cp_conv2d() {
        let mut rng = PeftRng::new(3);
        let base = conv(&mut rng, 32, 8, 3, DType::F64);
        let config = LoKrConfig {
            lycoris: crate::config::LycorisFields { use_effective_conv2d: true, ..cfg().lycoris },
            ..cfg()
        };
        assert!(LoKrLayout::new(&config, &base, 2).unwrap().cp);
        let x = randn(&mut rng, &[2, 8, 5, 5], DType::F64);
        check_gradients(&config, &base, &x, &mut rng);
    }

    #[test]
    fn gradients_match_finite_differences_full_conv2d() {
        let mut rng = PeftRng::new(4);
        let base = conv(&mut rng, 6, 8, 3, DType::F64);
        let config = LoKrConfig { lycoris: crate::config::LycorisFields { r: 4, ..cfg().lycoris }, ..cfg() };
        assert!(LoKrLayout::new(&config, &base, 4).unwrap().full_w2);
        let x = randn(&mut rng, &[1, 8, 5, 5], DType::F64);
        check_gradients(&config, &base, &x, &mut rng);
    }

    #[test]
    fn merge_equals_forward_and_unmerge_restores() {
        let mut rng = PeftRng::new(5);
        for (config, base, x) in [
            (
                LoKrConfig {
                    decompose_both: true,
                    init_weights: LoKrInitWeights::Bool(false),
                    ..cfg()
                },
                linear(&mut rng, 64, 48, DType::F32),
                randn(&mut rng, &[2, 48], DType::F32),
            ),
            (
                LoKrConfig {
                    lycoris: crate::config::LycorisFields { use_effective_conv2d: true, ..cfg().lycoris },
                    init_weights: LoKrInitWeights::Bool(false),
                    ..cfg()
                },
                conv(&mut rng, 32, 8, 3, DType::F32),
                randn(&mut rng, &[1, 8, 6, 6], DType::F32),
            ),
        ] {
            let a = LoKrAdapter::new(&config, "m", &base, &mut rng).unwrap();
            assert!(
                a.describe().starts_with("r=2 alpha=3 w1 "),
                "{}",
                a.describe()
            );
            let mut slot = AdapterSlot::new("m", base.clone());
            slot.add_adapter("default", Box::new(a)).unwrap();
            let ctx = ForwardCtx::eval();
            let y = slot.forward(&x, &ctx).unwrap();
            assert!(max_diff(&y, &base.forward(&x).unwrap()) > 1e-3);
            slot.merge(None).unwrap();
            assert!(max_diff(&slot.forward(&x, &ctx).unwrap(), &y) < 1e-4);
            slot.unmerge().unwrap();
            assert!(max_diff(&slot.base().weight().unwrap(), &base.weight().unwrap()) < 1e-5);
        }
    }

    #[test]
    fn module_and_rank_dropout_apply_in_training_only() {
        let mut rng = PeftRng::new(6);
        let base = linear(&mut rng, 16, 24, DType::F32);
        let x = randn(&mut rng, &[3, 24], DType::F32);
        let y_base = base.forward(&x).unwrap();
        let run = |config: &LoKrConfig, ctx: &ForwardCtx| {
            let a = LoKrAdapter::new(config, "m", &base, &mut PeftRng::new(7)).unwrap();
            let mut slot = AdapterSlot::new("m", base.clone());
            slot.add_adapter("default", Box::new(a)).unwrap();
            slot.forward(&x, ctx).unwrap()
        };
        let random = LoKrConfig {
            init_weights: LoKrInitWeights::Bool(false),
            ..cfg()
        };
        let full = run(&random, &ForwardCtx::eval());
        let md = LoKrConfig {
            lycoris: crate::config::LycorisFields { module_dropout: 1.0, ..random.clone().lycoris },
            ..random.clone()
        };
        assert_eq!(max_diff(&run(&md, &ForwardCtx::train(1, 0)), &y_base), 0.0);
        assert_eq!(max_diff(&run(&md, &ForwardCtx::eval()), &full), 0.0);
        // rank dropout zeroes output features of ΔW; with rank_dropout_scale the kept ones are rescaled
        let d_full = (&full - &y_base).unwrap().to_vec2::<f32>().unwrap();
        for scale in [false, true] {
            let rd = LoKrConfig {
                lycoris: crate::config::LycorisFields { rank_dropout: 0.5, ..random.clone().lycoris },
                rank_dropout_scale: scale,
                ..random.clone()
            };
            assert_eq!(max_diff(&run(&rd, &ForwardCtx::eval()), &full), 0.0);
            let mut seen = (false, false);
            for step in 0..4 {
                let y = run(&rd, &ForwardCtx::train(9, step));
                let d = (&y - &y_base).unwrap().to_vec2::<f32>().unwrap();
                let kept: Vec<bool> = (0..16).map(|j| d[0][j].abs() > 1e-6).collect();
                let n = kept.iter().filter(|k| **k).count();
                let s = if scale && n > 0 { 16.0 / n as f32 } else { 1.0 };
                for (row, full_row) in d.iter().zip(&d_full) {
                    for j in 0..16 {
                        let want = if kept[j] { full_row[j] * s } else { 0.0 };
                        assert!(
                            (row[j] - want).abs() < 1e-4,
                            "{scale} {j}: {} vs {want}",
                            row[j]
                        );
                    }
                }
                seen.0 |= n > 0;
                seen.1 |= n < 16;
            }
            assert!(seen.0 && seen.1);
        }
    }

    #[test]
    fn init_zeroes_w1_or_w2() {
        let mut rng = PeftRng::new(8);
        let base = linear(&mut rng, 64, 48, DType::F32);
        let both = LoKrConfig {
            decompose_both: true,
            ..cfg()
        };
        let zero = |a: &LoKrAdapter, k: &str| {
            let t = a.tensors().into_iter().find(|(n, _)| n == k).unwrap().1;
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                == 0.0
        };
        let a = LoKrAdapter::new(&both, "m", &base, &mut rng).unwrap();
        assert!(zero(&a, "lokr_w1_a") && !zero(&a, "lokr_w1_b") && !zero(&a, "lokr_w2_a"));
        let ly = LoKrConfig {
            init_weights: LoKrInitWeights::Method("lycoris".into()),
            ..both.clone()
        };
        let a = LoKrAdapter::new(&ly, "m", &base, &mut rng).unwrap();
        assert!(zero(&a, "lokr_w2_b") && !zero(&a, "lokr_w2_a") && !zero(&a, "lokr_w1_a"));
        // kaiming-uniform(a=√5) bound: 1/√fan_in (lokr_w2_a [8, 2]: 1/√2)
        let w2a = a
            .tensors()
            .into_iter()
            .find(|(n, _)| n == "lokr_w2_a")
            .unwrap()
            .1;
        let m = w2a
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(m <= (0.5f32).sqrt() && m > 0.3, "{m}");
        let bad = LoKrConfig {
            init_weights: LoKrInitWeights::Method("pissa".into()),
            ..cfg()
        };
        let Err(e) = LoKrAdapter::new(&bad, "m", &base, &mut rng) else {
            panic!("init_weights \"pissa\" is accepted")
        };
        assert!(
            matches!(&e, PeftError::InvalidConfig(m) if m.contains("`init_weights`") && m.contains("\"pissa\"")),
            "{e}"
        );
    }

    #[test]
    fn used_on_another_layer_is_an_error() {
        let mut rng = PeftRng::new(9);
        let base = linear(&mut rng, 16, 24, DType::F32);
        let other = linear(&mut rng, 24, 16, DType::F32);
        let a = LoKrAdapter::new(&cfg(), "m", &base, &mut rng).unwrap();
        let ctx = ForwardCtx::eval();
        let call = CallCtx {
            module: "m",
            adapter: "default",
            fwd: &ctx,
        };
        let x = randn(&mut rng, &[1, 16], DType::F32);
        let y = other.forward(&x).unwrap();
        let e = a.transform_output(&other, &x, y, &call).unwrap_err();
        assert!(
            matches!(&e, PeftError::Invalid(m) if m.contains("shape [16, 24] used on one of shape [24, 16]")),
            "{e}"
        );
        let w = other.weight().unwrap().clone();
        let input = MergeInput {
            kind: other.kind(),
            weight: &w,
            bias: None,
            unmerged_weight: &w,
            unmerged_bias: None,
        };
        let e = a.merge(input).unwrap_err();
        assert!(
            matches!(&e, PeftError::Invalid(m) if m.contains("shape [16, 24] merged into one of shape [24, 16]")),
            "{e}"
        );
    }
}
