//! The LoHa adapter for Linear and Conv2d layers (PEFT's `tuners/loha/layer.py`).
//!
//! The weight update is the Hadamard product of two low-rank products, scaled by `alpha / r`:
//!
//! ```text
//! ΔW = (hada_w1_a @ hada_w1_b) ⊙ (hada_w2_a @ hada_w2_b) · alpha / r        reshaped to the base weight
//! y  = base(x) + op(x, ΔW)                                                  (op: linear or conv2d, no bias)
//! ```
//!
//! | base | form | `hada_w*_a` | `hada_w*_b` | `hada_t*` |
//! |---|---|---|---|---|
//! | Linear `[out, in]` | flat | `[out, r]` | `[r, in]` | — |
//! | Conv2d `[out, in, kh, kw]` | flat | `[out, r]` | `[r, in·kh·kw]` | — |
//! | Conv2d, `use_effective_conv2d`, kernel ≠ 1×1 | CP | `[r, out]` | `[r, in]` | `[r, r, kh, kw]` |
//!
//! In the CP form each factor is rebuilt with PEFT's `einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)`
//! before the Hadamard product. The rank and alpha come from the config (`rank_pattern` / `alpha_pattern`),
//! never from tensor shapes.
//!
//! In training, `module_dropout` skips the adapter for a whole forward and `rank_dropout` zeroes output rows
//! of `ΔW`, always rescaling the mask by its mean (as PEFT's LoHa does). Gradients are candle's autograd
//! through these ops; PEFT's hand-written backward of the CP form is not reproduced (it is wrong for
//! `hada_w1_a` / `hada_w2_a`), so only the forward matches PEFT there.

use super::config::LoHaConfig;
use crate::layer::{
    Adapter, BaseKind, BaseLayer, CallCtx, NamedTensor, check_shape,
};
use crate::tuners::lycoris_utils;
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;

/// The parameter names of a LOHA adapter's tensors (the first key component after the module name).
pub const PARAM_PREFIXES: &[&str] = &[
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
];

const W1_A: &str = "hada_w1_a";
const W1_B: &str = "hada_w1_b";
const W2_A: &str = "hada_w2_a";
const W2_B: &str = "hada_w2_b";
const T1: &str = "hada_t1";
const T2: &str = "hada_t2";

/// The settings of one LoHa adapter in one layer, from its config and module name.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoHaOptions {
    /// The rank (`r`, or the module's `rank_pattern` entry).
    pub r: usize,
    /// The alpha (`alpha`, or the module's `alpha_pattern` entry); the scale is `alpha / r`.
    pub alpha: f64,
    /// `rank_dropout` (training only).
    pub rank_dropout: f64,
    /// `module_dropout` (training only).
    pub module_dropout: f64,
    /// `use_effective_conv2d`: the CP form for Conv2d kernels larger than 1×1.
    pub use_effective_conv2d: bool,
    /// `init_weights`: `hada_w2_b` starts at zero (the identity); `false` draws every factor at random.
    pub init_weights: bool,
}

impl LoHaOptions {
    /// The options for `module` under `config`.
    pub fn from_config(config: &LoHaConfig, module: &str) -> Self {
        let (r, alpha) = config.rank_and_alpha_for(module);
        Self {
            r,
            alpha,
            rank_dropout: config.lycoris.rank_dropout,
            module_dropout: config.lycoris.module_dropout,
            use_effective_conv2d: config.lycoris.use_effective_conv2d,
            init_weights: config.init_weights,
        }
    }
}

/// The shapes of one adapter's tensors for a base layer (PEFT's `update_layer` / `create_adapter_parameters`).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Geometry {
    /// The base weight's shape, which `ΔW` is reshaped to.
    weight: Vec<usize>,
    /// `Some((kh, kw))` for the CP form.
    cp: Option<(usize, usize)>,
    /// `[(key, shape)]` in PEFT's parameter order.
    params: Vec<(&'static str, Vec<usize>)>,
}

impl Geometry {
    fn new(base: &BaseLayer, r: usize, use_effective_conv2d: bool) -> Result<Self> {
        lycoris_utils::check_supported("LoHa", base)?;
        if r == 0 {
            return Err(PeftError::InvalidConfig(
                "`r` should be a positive integer value but the value passed is 0".into(),
            ));
        }
        let weight = base.weight_dims().to_vec();
        let out = weight[0];
        let (cp, flat_in) = match base.kind() {
            BaseKind::Conv2d(_) => {
                let (inp, kh, kw) = (weight[1], weight[2], weight[3]);
                if use_effective_conv2d && (kh, kw) != (1, 1) {
                    (Some((kh, kw)), inp)
                } else {
                    (None, inp * kh * kw)
                }
            }
            _ => (None, weight[1]),
        };
        let params = match cp {
            Some((kh, kw)) => vec![
                (T1, vec![r, r, kh, kw]),
                (W1_A, vec![r, out]),
                (W1_B, vec![r, flat_in]),
                (T2, vec![r, r, kh, kw]),
                (W2_A, vec![r, out]),
                (W2_B, vec![r, flat_in]),
            ],
            None => vec![
                (W1_A, vec![out, r]),
                (W1_B, vec![r, flat_in]),
                (W2_A, vec![out, r]),
                (W2_B, vec![r, flat_in]),
            ],
        };
        Ok(Self { weight, cp, params })
    }
}

/// PEFT's `make_weight`: `(w1a @ w1b) ⊙ (w2a @ w2b) · scale`.
pub fn make_weight(
    w1a: &Tensor,
    w1b: &Tensor,
    w2a: &Tensor,
    w2b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let p1 = w1a.matmul(w1b)?;
    let p2 = w2a.matmul(w2b)?;
    Ok(((p1 * p2)? * scale)?)
}

/// One CP factor, PEFT's `einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)`: `t [r, r, kh, kw]`,
/// `w_b [r, in]`, `w_a [r, out]` → `[out, in, kh, kw]`.
pub fn rebuild_cp(t: &Tensor, w_b: &Tensor, w_a: &Tensor) -> Result<Tensor> {
    let (ri, rj, kh, kw) = t.dims4()?;
    let out = w_a.dim(1)?;
    let inp = w_b.dim(1)?;
    // contract i: [p, i] @ [i, j·k·l] → [p, j, k·l]
    let a = w_a.t()?.matmul(&t.reshape((ri, rj * kh * kw))?)?;
    // contract j: [p, k·l, j] @ [j, in] → [p, k·l, in]
    let a = a
        .reshape((out, rj, kh * kw))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out * kh * kw, rj))?
        .matmul(w_b)?;
    Ok(a.reshape((out, kh * kw, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp, kh, kw))?)
}

/// PEFT's `make_weight_cp`: `rebuild_cp(t1, w1b, w1a) ⊙ rebuild_cp(t2, w2b, w2a) · scale`.
pub fn make_weight_cp(
    t1: &Tensor,
    w1a: &Tensor,
    w1b: &Tensor,
    t2: &Tensor,
    w2a: &Tensor,
    w2b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let r1 = rebuild_cp(t1, w1b, w1a)?;
    let r2 = rebuild_cp(t2, w2b, w2a)?;
    Ok(((r1 * r2)? * scale)?)
}

/// PEFT's `kaiming_uniform_(…, a=sqrt(5))`: uniform in `±1/sqrt(fan_in)`, `fan_in` = `shape[1]` times the
/// receptive field.
fn kaiming_uniform(
    rng: &mut PeftRng,
    shape: &[usize],
    dev: &candle_core::Device,
) -> Result<Tensor> {
    let fan_in: usize = shape[1..].iter().product();
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    Ok(rng.uniform_tensor(shape, -bound, bound, DType::F32, dev)?)
}

/// One LoHa adapter inside one Linear or Conv2d layer. The factors are f32 `Var`s; the dtype they were
/// created or loaded in is kept for saving.
#[derive(Debug)]
pub struct LoHaAdapter {
    kind: BaseKind,
    geometry: Geometry,
    opts: LoHaOptions,
    /// In [`Geometry::params`] order.
    params: Vec<(&'static str, Var)>,
    saved_dtype: DType,
}

impl LoHaAdapter {
    /// A freshly initialised adapter for `base` (PEFT's `reset_adapter_parameters`): with `init_weights`,
    /// `hada_w2_b` zeros and every other factor Kaiming-uniform (`a = √5`), so `ΔW = 0`; without, all
    /// Kaiming-uniform (`reset_adapter_parameters_random`). Draws come from `rng`, not torch's generator.
    pub fn new(base: &BaseLayer, opts: LoHaOptions, rng: &mut PeftRng) -> Result<Self> {
        let geometry = Geometry::new(base, opts.r, opts.use_effective_conv2d)?;
        let dev = base.device();
        let mut params = Vec::with_capacity(geometry.params.len());
        for (key, shape) in &geometry.params {
            let t = if *key == W2_B && opts.init_weights {
                Tensor::zeros(shape.as_slice(), DType::F32, dev)?
            } else {
                kaiming_uniform(rng, shape, dev)?
            };
            params.push((*key, Var::from_tensor(&t)?));
        }
        Ok(Self {
            kind: *base.kind(),
            geometry,
            opts,
            params,
            saved_dtype: DType::F32,
        })
    }

    /// An adapter from tensors as PEFT saves them (keys relative to the module, adapter name stripped):
    /// exactly the keys of the form the config and `base` give (`hada_w1_a`, `hada_w1_b`, `hada_w2_a`,
    /// `hada_w2_b`, plus `hada_t1`, `hada_t2` for the CP form), each of its exact shape.
    pub fn from_tensors(
        base: &BaseLayer,
        opts: LoHaOptions,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        let geometry = Geometry::new(base, opts.r, opts.use_effective_conv2d)?;
        let mut params = Vec::with_capacity(geometry.params.len());
        let mut saved_dtype = None;
        for (key, shape) in &geometry.params {
            let t = tensors
                .get(*key)
                .ok_or_else(|| PeftError::MissingKey(key.to_string()))?;
            check_shape(key, t, shape)?;
            saved_dtype.get_or_insert(t.dtype());
            params.push((*key, Var::from_tensor(&t.to_dtype(DType::F32)?)?));
        }
        let extra: Vec<String> = tensors
            .keys()
            .filter(|k| !geometry.params.iter().any(|(p, _)| p == k))
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        Ok(Self {
            kind: *base.kind(),
            geometry,
            opts,
            params,
            saved_dtype: saved_dtype.unwrap_or(DType::F32),
        })
    }

    /// The options this adapter was built with.
    pub fn options(&self) -> &LoHaOptions {
        &self.opts
    }

    /// Whether the adapter uses the CP form (`use_effective_conv2d` on a Conv2d kernel larger than 1×1).
    pub fn is_cp(&self) -> bool {
        self.geometry.cp.is_some()
    }

    /// The scale `alpha / r`.
    pub fn scaling(&self) -> f64 {
        self.opts.alpha / self.opts.r as f64
    }

    fn param(&self, key: &str) -> Result<&Tensor> {
        self.params
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.as_tensor())
            .ok_or_else(|| PeftError::MissingKey(key.to_string()))
    }

    fn check_kind(&self, kind: &BaseKind) -> Result<()> {
        if std::mem::discriminant(&self.kind) != std::mem::discriminant(kind) {
            return Err(PeftError::Invalid(format!(
                "LoHa adapter for {:?} used on a {:?} layer",
                self.kind, kind
            )));
        }
        Ok(())
    }

    /// `ΔW` in the base weight's shape, in the factors' dtype (f32), without rank dropout (PEFT's
    /// `get_delta_weight`).
    pub fn delta(&self) -> Result<Tensor> {
        let scale = self.scaling();
        let (w1a, w1b, w2a, w2b) = (
            self.param(W1_A)?,
            self.param(W1_B)?,
            self.param(W2_A)?,
            self.param(W2_B)?,
        );
        let w = match self.geometry.cp {
            Some(_) => make_weight_cp(self.param(T1)?, w1a, w1b, self.param(T2)?, w2a, w2b, scale)?,
            None => make_weight(w1a, w1b, w2a, w2b, scale)?,
        };
        Ok(w.reshape(self.geometry.weight.as_slice())?)
    }

}

impl Adapter for LoHaAdapter {
    /// PEFT's `supports_lora_conversion`: Linear layers, by their additive delta.
    fn lora_conversion(
        &self,
        base: &crate::layer::BaseLayer,
    ) -> Result<Option<crate::layer::LoraConversion>> {
        crate::tuners::lora::conversion::additive_conversion(self, base, false)
    }

    fn peft_type(&self) -> &'static str {
        "LOHA"
    }

    fn transform_output(
        &self,
        base: &BaseLayer,
        x: &Tensor,
        result: Tensor,
        ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        self.check_kind(base.kind())?;
        if lycoris_utils::module_dropped(ctx, self.opts.module_dropout) {
            return Ok(result);
        }
        let delta = self.delta()?;
        let delta = lycoris_utils::rank_dropout(ctx, &delta, self.opts.rank_dropout, true)?;
        let d = lycoris_utils::delta_activations(base, x, &delta)?;
        Ok((result.to_dtype(d.dtype())? + d)?)
    }

    fn delta_weight(&self, kind: &BaseKind) -> Result<Option<(Tensor, Option<Tensor>)>> {
        self.check_kind(kind)?;
        Ok(Some((self.delta()?.to_dtype(DType::F32)?, None)))
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        self.params
            .iter()
            .map(|(k, v)| (k.to_string(), v.as_tensor().clone()))
            .collect()
    }

    fn vars(&self) -> Vec<(String, Var)> {
        self.params
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        let head = format!("r={} alpha={}", self.opts.r, self.opts.alpha);
        let sizes: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k} {:?}", v.as_tensor().dims()))
            .collect();
        let form = match self.geometry.cp {
            Some((kh, kw)) => format!("cp [{kh}x{kw}]"),
            None => "flat".to_string(),
        };
        format!("{head} {form} ({})", sizes.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::Conv2dSpec;
    use crate::ops::testutil::{fd_check, grads_of, max_diff, randn};
    use crate::{AdapterSlot, ForwardCtx};
    use candle_core::Device;

    fn opts(r: usize, alpha: f64, cp: bool) -> LoHaOptions {
        LoHaOptions {
            r,
            alpha,
            rank_dropout: 0.0,
            module_dropout: 0.0,
            use_effective_conv2d: cp,
            init_weights: false,
        }
    }

    fn linear(rng: &mut PeftRng, out: usize, inp: usize, dtype: DType) -> BaseLayer {
        BaseLayer::linear(
            randn(rng, &[out, inp], dtype),
            Some(randn(rng, &[out], dtype)),
        )
        .unwrap()
    }

    fn conv(rng: &mut PeftRng, shape: &[usize], dtype: DType) -> BaseLayer {
        conv_strided(rng, shape, dtype, 2)
    }

    fn conv_strided(rng: &mut PeftRng, shape: &[usize], dtype: DType, stride: usize) -> BaseLayer {
        let spec = Conv2dSpec {
            padding: 1,
            stride,
            ..Default::default()
        };
        BaseLayer::conv2d(randn(rng, shape, dtype), None, spec).unwrap()
    }

    /// An adapter over the given parameter tensors (Vars keep their identity, so gradients reach them).
    fn with_params(base: &BaseLayer, o: LoHaOptions, ts: &[Tensor]) -> LoHaAdapter {
        let mut a = LoHaAdapter::new(base, o, &mut PeftRng::new(0)).unwrap();
        assert_eq!(a.params.len(), ts.len());
        for ((_, v), t) in a.params.iter_mut().zip(ts) {
            *v = Var::from_tensor(t).unwrap();
        }
        a
    }

    fn eval_forward(base: &BaseLayer, a: &LoHaAdapter, x: &Tensor) -> Tensor {
        let fwd = ForwardCtx::eval();
        let ctx = CallCtx {
            module: "m",
            adapter: "default",
            fwd: &fwd,
        };
        a.transform_output(base, x, base.forward(x).unwrap(), &ctx)
            .unwrap()
    }

    #[test]
    fn shapes_follow_peft_and_the_config_not_the_tensors() {
        let mut rng = PeftRng::new(1);
        let lin = linear(&mut rng, 6, 5, DType::F32);
        let c3 = conv(&mut rng, &[6, 4, 3, 2], DType::F32);
        let c1 = conv(&mut rng, &[6, 4, 1, 1], DType::F32);
        let shapes = |b: &BaseLayer, cp: bool| -> Vec<(String, Vec<usize>)> {
            LoHaAdapter::new(b, opts(3, 6.0, cp), &mut PeftRng::new(0))
                .unwrap()
                .tensors()
                .into_iter()
                .map(|(k, t)| (k, t.dims().to_vec()))
                .collect()
        };
        let s = |v: &[(&str, &[usize])]| -> Vec<(String, Vec<usize>)> {
            v.iter().map(|(k, d)| (k.to_string(), d.to_vec())).collect()
        };
        let flat_lin = s(&[
            ("hada_w1_a", &[6, 3]),
            ("hada_w1_b", &[3, 5]),
            ("hada_w2_a", &[6, 3]),
            ("hada_w2_b", &[3, 5]),
        ]);
        assert_eq!(shapes(&lin, false), flat_lin);
        assert_eq!(shapes(&lin, true), flat_lin);
        let flat_conv = s(&[
            ("hada_w1_a", &[6, 3]),
            ("hada_w1_b", &[3, 24]),
            ("hada_w2_a", &[6, 3]),
            ("hada_w2_b", &[3, 24]),
        ]);
        assert_eq!(shapes(&c3, false), flat_conv);
        assert_eq!(
            shapes(&c3, true),
            s(&[
                ("hada_t1", &[3, 3, 3, 2]),
                ("hada_w1_a", &[3, 6]),
                ("hada_w1_b", &[3, 4]),
                ("hada_t2", &[3, 3, 3, 2]),
                ("hada_w2_a", &[3, 6]),
                ("hada_w2_b", &[3, 4]),
            ])
        );
        // 1×1 kernels stay flat even with use_effective_conv2d
        assert_eq!(shapes(&c1, true)[1], ("hada_w1_b".to_string(), vec![3, 4]));
        assert_eq!(shapes(&c1, true).len(), 4);
        let a = LoHaAdapter::new(&c3, opts(3, 6.0, true), &mut PeftRng::new(0)).unwrap();
        assert!(
            a.describe().starts_with("r=3 alpha=6 cp [3x2] ("),
            "{}",
            a.describe()
        );
        let a = LoHaAdapter::new(&lin, opts(3, 6.0, true), &mut PeftRng::new(0)).unwrap();
        assert!(
            a.describe().starts_with("r=3 alpha=6 flat ("),
            "{}",
            a.describe()
        );
        // Embedding, grouped conv and r = 0 are refused
        let emb = BaseLayer::embedding(randn(&mut rng, &[10, 4], DType::F32)).unwrap();
        assert!(matches!(
            LoHaAdapter::new(&emb, opts(2, 2.0, false), &mut rng),
            Err(PeftError::Unsupported { .. })
        ));
        assert!(matches!(
            LoHaAdapter::new(&lin, opts(0, 2.0, false), &mut rng),
            Err(PeftError::InvalidConfig(_))
        ));
    }

    #[test]
    fn default_init_is_the_identity_and_kaiming_bounded() {
        let mut rng = PeftRng::new(2);
        let base = conv(&mut rng, &[6, 4, 3, 3], DType::F32);
        for cp in [false, true] {
            let mut o = opts(4, 8.0, cp);
            o.init_weights = true;
            let a = LoHaAdapter::new(&base, o, &mut rng).unwrap();
            for (k, t) in a.tensors() {
                let absmax = t.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
                let absmax = absmax.to_scalar::<f32>().unwrap() as f64;
                let fan_in: usize = t.dims()[1..].iter().product();
                if k == W2_B {
                    assert_eq!(absmax, 0.0, "{k}");
                } else {
                    assert!(
                        absmax > 0.0 && absmax <= 1.0 / (fan_in as f64).sqrt(),
                        "{k}"
                    );
                }
            }
            let d = a.delta().unwrap();
            assert_eq!(max_diff(&d, &d.zeros_like().unwrap()), 0.0);
            o.init_weights = false;
            let a = LoHaAdapter::new(&base, o, &mut rng).unwrap();
            let w2b = a.param(W2_B).unwrap();
            assert!(max_diff(w2b, &w2b.zeros_like().unwrap()) > 0.0);
        }
    }

    /// ΔW by explicit loops over PEFT's formulas.
    fn delta_by_loops(a: &LoHaAdapter) -> Vec<f64> {
        let get = |k: &str| -> (Vec<usize>, Vec<f64>) {
            let t = a.param(k).unwrap().to_dtype(DType::F64).unwrap();
            (
                t.dims().to_vec(),
                t.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
            )
        };
        let s = a.scaling();
        let w = &a.geometry.weight;
        let (w1a, w1b, w2a, w2b) = (get(W1_A), get(W1_B), get(W2_A), get(W2_B));
        match a.geometry.cp {
            None => {
                let (out, r) = (w1a.0[0], w1a.0[1]);
                let inp = w1b.0[1];
                let mut d = vec![0.0; out * inp];
                for o in 0..out {
                    for i in 0..inp {
                        let p1: f64 = (0..r).map(|k| w1a.1[o * r + k] * w1b.1[k * inp + i]).sum();
                        let p2: f64 = (0..r).map(|k| w2a.1[o * r + k] * w2b.1[k * inp + i]).sum();
                        d[o * inp + i] = p1 * p2 * s;
                    }
                }
                d
            }
            Some((kh, kw)) => {
                let (t1, t2) = (get(T1), get(T2));
                let (out, inp, r) = (w[0], w[1], w1a.0[0]);
                // einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)
                let rebuild =
                    |t: &[f64], wb: &[f64], wa: &[f64], p: usize, q: usize, y: usize, x: usize| {
                        let mut acc = 0.0;
                        for i in 0..r {
                            for j in 0..r {
                                acc += t[((i * r + j) * kh + y) * kw + x]
                                    * wb[j * inp + q]
                                    * wa[i * out + p];
                            }
                        }
                        acc
                    };
                let mut d = vec![0.0; out * inp * kh * kw];
                for p in 0..out {
                    for q in 0..inp {
                        for y in 0..kh {
                            for x in 0..kw {
                                d[((p * inp + q) * kh + y) * kw + x] =
                                    rebuild(&t1.1, &w1b.1, &w1a.1, p, q, y, x)
                                        * rebuild(&t2.1, &w2b.1, &w2a.1, p, q, y, x)
                                        * s;
                            }
                        }
                    }
                }
                d
            }
        }
    }

    #[test]
    fn delta_matches_the_formulas_flat_and_cp() {
        let mut rng = PeftRng::new(3);
        let cases = [
            (linear(&mut rng, 6, 5, DType::F32), false),
            (conv(&mut rng, &[6, 4, 3, 3], DType::F32), false),
            (conv(&mut rng, &[5, 4, 3, 2], DType::F32), true),
        ];
        for (base, cp) in &cases {
            let a = LoHaAdapter::new(base, opts(3, 5.0, *cp), &mut rng).unwrap();
            assert_eq!(a.is_cp(), *cp);
            let d = a.delta().unwrap();
            assert_eq!(d.dims(), base.weight_dims());
            let want = Tensor::from_vec(delta_by_loops(&a), d.dims(), &Device::Cpu).unwrap();
            let diff = max_diff(&d, &want);
            assert!(diff < 1e-6, "cp={cp}: {diff}");
            assert!(max_diff(&want, &want.zeros_like().unwrap()) > 1e-3);
        }
    }

    #[test]
    fn merge_equals_forward_and_unmerge_restores() {
        let mut rng = PeftRng::new(4);
        let cases = [
            (linear(&mut rng, 6, 5, DType::F32), false, vec![2, 3, 5]),
            (
                conv(&mut rng, &[6, 4, 3, 3], DType::F32),
                true,
                vec![2, 4, 7, 7],
            ),
            (
                conv(&mut rng, &[6, 4, 3, 3], DType::F32),
                false,
                vec![1, 4, 6, 6],
            ),
        ];
        for (base, cp, xs) in cases {
            let a = LoHaAdapter::new(&base, opts(2, 3.0, cp), &mut rng).unwrap();
            let mut slot = AdapterSlot::new("m", base.clone());
            slot.add_adapter("default", Box::new(a)).unwrap();
            let x = randn(&mut rng, &xs, DType::F32);
            let ctx = ForwardCtx::eval();
            let y = slot.forward(&x, &ctx).unwrap();
            assert!(max_diff(&y, &base.forward(&x).unwrap()) > 1e-3);
            slot.merge(None).unwrap();
            let ym = slot.forward(&x, &ctx).unwrap();
            assert!(max_diff(&y, &ym) < 1e-4, "cp={cp}");
            slot.unmerge().unwrap();
            assert!(max_diff(&slot.base().weight().unwrap(), &base.weight().unwrap()) < 1e-6);
        }
    }

    #[test]
    fn from_tensors_checks_keys_and_shapes() {
        let mut rng = PeftRng::new(5);
        let base = conv(&mut rng, &[6, 4, 3, 3], DType::F32);
        let a = LoHaAdapter::new(&base, opts(2, 3.0, true), &mut rng).unwrap();
        let good: IndexMap<String, Tensor> = a
            .tensors()
            .into_iter()
            .map(|(k, t)| (k, t.to_dtype(DType::BF16).unwrap()))
            .collect();
        let b = LoHaAdapter::from_tensors(&base, opts(2, 3.0, true), &good).unwrap();
        assert_eq!(b.saved_dtype(), DType::BF16);
        assert_eq!(b.tensors()[0].1.dtype(), DType::F32);
        // the flat form of the same conv wants other keys and shapes
        let e = LoHaAdapter::from_tensors(&base, opts(2, 3.0, false), &good).unwrap_err();
        assert!(
            matches!(&e, PeftError::ShapeMismatch { name, expected, got } if name == W1_A && expected == &[6, 2] && got == &[2, 6]),
            "{e}"
        );
        // rank from the config: r = 3 refuses rank-2 tensors
        let e = LoHaAdapter::from_tensors(&base, opts(3, 3.0, true), &good).unwrap_err();
        assert!(
            matches!(&e, PeftError::ShapeMismatch { name, .. } if name == T1),
            "{e}"
        );
        let mut missing = good.clone();
        missing.shift_remove(T2);
        let e = LoHaAdapter::from_tensors(&base, opts(2, 3.0, true), &missing).unwrap_err();
        assert!(matches!(&e, PeftError::MissingKey(k) if k == T2), "{e}");
        let mut extra = good.clone();
        extra.insert("hada_w1_a.weight".into(), good[W1_A].clone());
        let e = LoHaAdapter::from_tensors(&base, opts(2, 3.0, true), &extra).unwrap_err();
        assert!(
            matches!(&e, PeftError::UnexpectedKeys(k) if k == &["hada_w1_a.weight".to_string()]),
            "{e}"
        );
    }

    /// Candle's gradients of `sum(forward ⊙ R)` w.r.t. every factor against central differences of the
    /// same forward, in f64.
    fn check_grads(base: &BaseLayer, o: LoHaOptions, x_shape: &[usize], seed: u64) {
        let mut rng = PeftRng::new(seed);
        let shapes: Vec<Vec<usize>> = Geometry::new(base, o.r, o.use_effective_conv2d)
            .unwrap()
            .params
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        let inputs: Vec<Tensor> = shapes
            .iter()
            .map(|s| randn(&mut rng, s, DType::F64))
            .collect();
        let x = randn(&mut rng, x_shape, DType::F64);
        let y_shape = base.forward(&x).unwrap().dims().to_vec();
        let r = randn(&mut rng, &y_shape, DType::F64);
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let grads = grads_of(&vars, &r, &|ts| {
            Ok(eval_forward(base, &with_params(base, o, ts), &x))
        });
        for (i, g) in grads.iter().enumerate() {
            let g = g.as_ref().unwrap_or_else(|| panic!("no gradient for {i}"));
            let loss = |ts: &[Tensor]| -> candle_core::Result<f64> {
                (eval_forward(base, &with_params(base, o, ts), &x) * &r)?
                    .sum_all()?
                    .to_scalar::<f64>()
            };
            let err = fd_check(&inputs, i, g, &loss);
            let scale = max_diff(g, &g.zeros_like().unwrap()).max(1.0);
            assert!(
                err < 1e-6 * scale,
                "param {i}: fd error {err} (|g| {scale})"
            );
        }
    }

    #[test]
    fn gradients_match_finite_differences_flat_linear() {
        let mut rng = PeftRng::new(6);
        let base = linear(&mut rng, 5, 4, DType::F64);
        check_grads(&base, opts(2, 3.0, false), &[2, 3, 4], 7);
    }

    #[test]
    fn gradients_match_finite_differences_cp_conv2d() {
        let mut rng = PeftRng::new(8);
        // A 3×2 kernel at stride 1: candle 0.11's conv2d backward takes the input-gradient `output_padding`
        // of both axes from the height, which fails for a non-square kernel at stride 2 on some sizes.
        let base = conv_strided(&mut rng, &[3, 2, 3, 2], DType::F64, 1);
        check_grads(&base, opts(2, 5.0, true), &[1, 2, 5, 5], 9);
        let base = conv(&mut rng, &[3, 2, 3, 3], DType::F64);
        check_grads(&base, opts(2, 5.0, true), &[1, 2, 5, 5], 10);
    }

    #[test]
    fn module_and_rank_dropout_only_in_training() {
        let mut rng = PeftRng::new(10);
        let base = linear(&mut rng, 16, 5, DType::F32);
        let x = randn(&mut rng, &[3, 5], DType::F32);
        let y0 = base.forward(&x).unwrap();
        let run = |o: LoHaOptions, fwd: &ForwardCtx| {
            let a = LoHaAdapter::new(&base, o, &mut PeftRng::new(11)).unwrap();
            let ctx = CallCtx {
                module: "m",
                adapter: "default",
                fwd,
            };
            a.transform_output(&base, &x, y0.clone(), &ctx).unwrap()
        };
        let plain = opts(2, 4.0, false);
        let full = (run(plain, &ForwardCtx::eval()) - &y0).unwrap();
        // module_dropout = 1: always skipped in training, never in eval
        let md = LoHaOptions {
            module_dropout: 1.0,
            ..plain
        };
        assert_eq!(max_diff(&run(md, &ForwardCtx::train(1, 0)), &y0), 0.0);
        assert!(max_diff(&run(md, &ForwardCtx::eval()), &y0) > 1e-3);
        // rank_dropout: each output row of ΔW is dropped or scaled by 1 / mean(mask)
        let rd = LoHaOptions {
            rank_dropout: 0.5,
            ..plain
        };
        assert_eq!(
            max_diff(&(run(rd, &ForwardCtx::eval()) - &y0).unwrap(), &full),
            0.0
        );
        let got = (run(rd, &ForwardCtx::train(3, 1)) - &y0).unwrap();
        let full = full.to_vec2::<f32>().unwrap();
        let got = got.to_vec2::<f32>().unwrap();
        let (mut kept, mut dropped, mut factor) = (0, 0, None::<f32>);
        for o in 0..16 {
            if got[0][o] == 0.0 {
                dropped += 1;
                assert!((0..3).all(|b| got[b][o] == 0.0));
                continue;
            }
            kept += 1;
            let f = got[0][o] / full[0][o];
            for b in 0..3 {
                assert!((got[b][o] - f * full[b][o]).abs() < 1e-4);
            }
            assert!((f - *factor.get_or_insert(f)).abs() < 1e-4);
        }
        assert!(kept > 0 && dropped > 0, "{kept} kept, {dropped} dropped");
        assert!((factor.unwrap() - 16.0 / kept as f32).abs() < 1e-4);
    }
}
