//! The GLoRA adapter for Linear layers (PEFT's `tuners/glora/layer.py`).
//!
//! Five terms per layer, each saved under its name (`glora_A` … `glora_E`) with the keys of PEFT's path
//! modules: a `lora` path holds `Xd` and `Xu` (`A`, `B`: `[out, r]`·`[r, in]`; `C`: `[in, r]`·`[r, 1]`), a
//! `vector` path `X` (`[out, 1]` for `A` and `B`, `[in, 1]` for `C`, `[out]` for `D` and `E`), a `constant`
//! path `X` `[1]`, and a `none` path the buffer `zeros` of the term's full shape. On a layer without a bias,
//! `C`, `D` and `E` are always `none` (PEFT's `has_bias` check). The forward adds
//! `x·(W₀ ⊙ A + B)ᵀ + (b₀ ⊙ D + E + W₀·C)` (the bias part only when the base has a bias) to the base
//! output; several active adapters add their terms. Merging adds `W₀ ⊙ A + B` to the weight and
//! `b₀ ⊙ D + E + W₀·C` to the bias, with `W₀`, `b₀` the weights before any merge (PEFT re-merges every adapter
//! from them); unmerging subtracts what the merge added (PEFT divides by `1 + ΣA`: the same up to rounding).

use super::config::{GloraConfig, GloraPathKind};
use crate::layer::{
    Adapter, BaseKind, BaseLayer, CallCtx, MergeInput, Merged, NamedTensor, check_shape,
};
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Device, Tensor, Var};
use indexmap::IndexMap;

/// The five terms' names, in PEFT's order.
pub const PARAM_PREFIXES: &[&str] = &["glora_A", "glora_B", "glora_C", "glora_D", "glora_E"];

/// One of GLoRA's terms.
#[derive(Debug)]
enum Path {
    Lora { xd: Var, xu: Var },
    Vector(Var),
    Constant(Var),
    None(Tensor),
}

impl Path {
    fn value(&self) -> Result<Tensor> {
        Ok(match self {
            Path::Lora { xd, xu } => xd.as_tensor().matmul(xu.as_tensor())?,
            Path::Vector(x) | Path::Constant(x) => x.as_tensor().clone(),
            Path::None(z) => z.clone(),
        })
    }

    fn tensors(&self, prefix: &str) -> Vec<NamedTensor> {
        match self {
            Path::Lora { xd, xu } => vec![
                (format!("{prefix}.Xd"), xd.as_tensor().clone()),
                (format!("{prefix}.Xu"), xu.as_tensor().clone()),
            ],
            Path::Vector(x) | Path::Constant(x) => {
                vec![(format!("{prefix}.X"), x.as_tensor().clone())]
            }
            Path::None(z) => vec![(format!("{prefix}.zeros"), z.clone())],
        }
    }

    fn vars(&self, prefix: &str) -> Vec<(String, Var)> {
        match self {
            Path::Lora { xd, xu } => vec![
                (format!("{prefix}.Xd"), xd.clone()),
                (format!("{prefix}.Xu"), xu.clone()),
            ],
            Path::Vector(x) | Path::Constant(x) => vec![(format!("{prefix}.X"), x.clone())],
            Path::None(_) => Vec::new(),
        }
    }
}

/// The shape of one term: `rows × cols` as a matrix (`lora`, column `vector`, `none`), or `[n]` for `D`, `E`.
#[derive(Clone, Copy)]
struct Geometry {
    rows: usize,
    cols: usize,
    /// `D` and `E`: a vector `[rows]` instead of a column.
    flat: bool,
}

impl Geometry {
    fn full(self) -> Vec<usize> {
        if self.flat {
            vec![self.rows]
        } else {
            vec![self.rows, self.cols]
        }
    }

    /// The tensors a path of this kind holds, with their shapes.
    fn keys(self, kind: GloraPathKind, r: usize) -> Vec<(&'static str, Vec<usize>)> {
        match kind {
            GloraPathKind::Lora => vec![("Xd", vec![self.rows, r]), ("Xu", vec![r, self.cols])],
            GloraPathKind::Vector if self.flat => vec![("X", vec![self.rows])],
            GloraPathKind::Vector => vec![("X", vec![self.rows, 1])],
            GloraPathKind::Constant => vec![("X", vec![1])],
            GloraPathKind::None => vec![("zeros", self.full())],
        }
    }
}

/// One GLoRA adapter inside one Linear layer (f32 `Var`s and buffers; the dtype they were created or loaded
/// in is kept for saving).
#[derive(Debug)]
pub struct GloraAdapter {
    r: usize,
    paths: [Path; 5],
    kinds: [GloraPathKind; 5],
    saved_dtype: DType,
}

/// The terms' kinds and geometries on this base (PEFT's `update_layer`).
fn plan(base: &BaseLayer, config: &GloraConfig) -> Result<[(GloraPathKind, Geometry); 5]> {
    if !matches!(base.kind(), BaseKind::Linear) || base.quantized().is_some() {
        return Err(PeftError::Unsupported {
            field: "target_modules".into(),
            value: if base.quantized().is_some() {
                "a quantized Linear layer".into()
            } else {
                format!("a {:?} layer", base.kind())
            },
            reason: "GLoRA supports only plain Linear layers (as PEFT: torch.nn.Linear)".into(),
        });
    }
    let (n_in, n_out) = (base.in_features(), base.out_features());
    let has_bias = base.bias().is_some();
    let w = Geometry {
        rows: n_out,
        cols: n_in,
        flat: false,
    };
    let c = Geometry {
        rows: n_in,
        cols: 1,
        flat: false,
    };
    let b = Geometry {
        rows: n_out,
        cols: 1,
        flat: true,
    };
    let or_none = |k: GloraPathKind| if has_bias { k } else { GloraPathKind::None };
    Ok([
        (config.config_a_b, w),
        (config.config_a_b, w),
        (or_none(config.config_c), c),
        (or_none(config.config_d_e), b),
        (or_none(config.config_d_e), b),
    ])
}

/// PEFT's path initialisation.
fn init_path(
    kind: GloraPathKind,
    g: Geometry,
    r: usize,
    init_weights: bool,
    rng: &mut PeftRng,
    dev: &Device,
) -> Result<Path> {
    // torch's kaiming_uniform_(a=√5) on a [rows, fan_in] tensor: U(−1/√fan_in, 1/√fan_in)
    let mut kaiming = |shape: &[usize], fan_in: usize| -> Result<Tensor> {
        let bound = 1.0 / (fan_in as f64).sqrt();
        Ok(rng.uniform_tensor(shape, -bound, bound, DType::F32, dev)?)
    };
    Ok(match kind {
        GloraPathKind::Lora => {
            let xu = kaiming(&[r, g.cols], g.cols)?;
            let xd = if init_weights {
                Tensor::zeros((g.rows, r), DType::F32, dev)?
            } else {
                kaiming(&[g.rows, r], r)?
            };
            Path::Lora {
                xd: Var::from_tensor(&xd)?,
                xu: Var::from_tensor(&xu)?,
            }
        }
        GloraPathKind::Vector => {
            let shape = if g.flat { vec![g.rows] } else { vec![g.rows, 1] };
            let x = if init_weights {
                Tensor::zeros(shape.as_slice(), DType::F32, dev)?
            } else if g.flat {
                // PEFT initialises a 1-D vector through `X.unsqueeze(0)`: fan_in = its length
                kaiming(&shape, g.rows)?
            } else {
                kaiming(&shape, 1)?
            };
            Path::Vector(Var::from_tensor(&x)?)
        }
        GloraPathKind::Constant => {
            let x = if init_weights {
                Tensor::zeros(1, DType::F32, dev)?
            } else {
                rng.normal_tensor(1, 0.0, 0.02, DType::F32, dev)?
            };
            Path::Constant(Var::from_tensor(&x)?)
        }
        GloraPathKind::None => Path::None(Tensor::zeros(g.full().as_slice(), DType::F32, dev)?),
    })
}

impl GloraAdapter {
    /// A freshly initialised adapter: every term zero (`init_weights`), else PEFT's test initialisation.
    pub fn new(base: &BaseLayer, config: &GloraConfig, rng: &mut PeftRng) -> Result<Self> {
        let plan = plan(base, config)?;
        let dev = base.device();
        let mut paths = Vec::with_capacity(5);
        for (kind, g) in plan {
            paths.push(init_path(kind, g, config.r, config.init_weights, rng, dev)?);
        }
        Ok(Self {
            r: config.r,
            paths: paths.try_into().expect("five paths"),
            kinds: plan.map(|(k, _)| k),
            saved_dtype: DType::F32,
        })
    }

    /// An adapter from tensors as PEFT saves them (keys relative to the module, adapter name stripped):
    /// for each term exactly the tensors of its path (`glora_A.Xd`, `glora_D.X`, `glora_C.zeros`, …), shaped
    /// for the base layer.
    pub fn from_tensors(
        base: &BaseLayer,
        config: &GloraConfig,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        let plan = plan(base, config)?;
        let mut expected = Vec::new();
        let mut paths = Vec::with_capacity(5);
        let mut saved_dtype = None;
        for (prefix, (kind, g)) in PARAM_PREFIXES.iter().zip(plan) {
            let mut got = Vec::new();
            for (name, shape) in g.keys(kind, config.r) {
                let key = format!("{prefix}.{name}");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| PeftError::MissingKey(key.clone()))?;
                check_shape(&key, t, &shape)?;
                if kind != GloraPathKind::None {
                    saved_dtype.get_or_insert(t.dtype());
                }
                got.push(t.to_dtype(DType::F32)?);
                expected.push(key);
            }
            paths.push(match kind {
                GloraPathKind::Lora => Path::Lora {
                    xd: Var::from_tensor(&got[0])?,
                    xu: Var::from_tensor(&got[1])?,
                },
                GloraPathKind::Vector => Path::Vector(Var::from_tensor(&got[0])?),
                GloraPathKind::Constant => Path::Constant(Var::from_tensor(&got[0])?),
                GloraPathKind::None => Path::None(got.remove(0)),
            });
        }
        let extra: Vec<String> = tensors
            .keys()
            .filter(|k| !expected.contains(k))
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        Ok(Self {
            r: config.r,
            paths: paths.try_into().expect("five paths"),
            kinds: plan.map(|(k, _)| k),
            saved_dtype: saved_dtype.unwrap_or(DType::F32),
        })
    }

    /// `(W₀ ⊙ A + B, b₀ ⊙ D + E + W₀·C)` from the weights `w0` `[out, in]` and `b0` `[out]` (f32); the bias
    /// part is `None` without a bias.
    pub fn deltas(&self, w0: &Tensor, b0: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        let w0 = w0.to_dtype(DType::F32)?;
        let [a, b, c, d, e] = &self.paths;
        let dw = w0
            .broadcast_mul(&a.value()?)?
            .broadcast_add(&b.value()?)?;
        let db = match b0 {
            Some(b0) => {
                let b0 = b0.to_dtype(DType::F32)?;
                let wc = w0.matmul(&c.value()?)?.squeeze(1)?;
                Some(
                    b0.broadcast_mul(&d.value()?)?
                        .broadcast_add(&e.value()?)?
                        .add(&wc)?,
                )
            }
            None => None,
        };
        Ok((dw, db))
    }
}

impl Adapter for GloraAdapter {
    fn peft_type(&self) -> &'static str {
        "GLORA"
    }

    fn transform_output(
        &self,
        base: &BaseLayer,
        x: &Tensor,
        result: Tensor,
        _ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        let w0 = base.weight()?;
        let (dw, db) = self.deltas(&w0, base.bias())?;
        let h = base.forward_with(&x.to_dtype(DType::F32)?, &dw, db.as_ref())?;
        Ok((result.to_dtype(DType::F32)? + h)?)
    }

    fn merge(&self, input: MergeInput<'_>) -> Result<Merged> {
        if input.weight.dims() != input.unmerged_weight.dims() || input.weight.rank() != 2 {
            return Err(PeftError::Invalid(format!(
                "GLoRA adapter merged into a weight of shape {:?}",
                input.weight.dims()
            )));
        }
        let (dw, db) = self.deltas(input.unmerged_weight, input.unmerged_bias)?;
        let weight = (input.weight + &dw)?;
        let bias = match (input.bias, &db) {
            (Some(b), Some(db)) => Some((b + db)?),
            (b, _) => b.cloned(),
        };
        // the cache: ΔW with Δb appended as one more column ([out, in + 1]) when the layer has a bias
        let cache = match db {
            Some(db) => Tensor::cat(&[&dw, &db.unsqueeze(1)?], 1)?,
            None => dw,
        };
        Ok(Merged {
            weight,
            bias,
            cache: Some(cache),
        })
    }

    fn unmerge(
        &self,
        input: MergeInput<'_>,
        cache: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let cache = cache.ok_or_else(|| {
            PeftError::Invalid("GLoRA unmerge without the update its merge added".into())
        })?;
        let n_in = input.weight.dim(1)?;
        let dw = cache.narrow(1, 0, n_in)?;
        let weight = (input.weight - dw)?;
        let bias = match input.bias {
            Some(b) if cache.dim(1)? == n_in + 1 => Some((b - cache.narrow(1, n_in, 1)?.squeeze(1)?)?),
            b => b.cloned(),
        };
        Ok((weight, bias))
    }

    fn needs_unmerged_weight(&self) -> bool {
        true
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        PARAM_PREFIXES
            .iter()
            .zip(&self.paths)
            .flat_map(|(p, path)| path.tensors(p))
            .collect()
    }

    fn vars(&self) -> Vec<(String, Var)> {
        PARAM_PREFIXES
            .iter()
            .zip(&self.paths)
            .flat_map(|(p, path)| path.vars(p))
            .collect()
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        let k = self.kinds.map(GloraPathKind::as_str);
        format!(
            "A/B {} C {} D/E {} (r={})",
            k[0], k[2], k[3], self.r
        )
    }
}
