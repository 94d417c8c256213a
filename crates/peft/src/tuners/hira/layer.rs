//! The HiRA adapter (PEFT's `tuners/hira/layer.py`) for Linear, GPT-2 Conv1D, Embedding and Conv2d layers.
//!
//! Two bare parameters per layer (the keys have no `.weight`): `hira_A` and `hira_B` (`hira_embedding_A`
//! `[r, num_embeddings]` and `hira_embedding_B` `[dim, r]` on an embedding). Their product `B·A`, laid out
//! as the base weight (`[out, in]` for a Linear, transposed for Conv1D and Embedding, `[out, in, kh, kw]`
//! for a Conv2d with `A` `[r, in, kh, kw]` and `B` `[out, r, 1, 1]`), modulates the frozen weight element
//! by element: the forward adds the base op run with `W₀ ⊙ (B·A)` and no bias to the base output (on the
//! dropped-out input, in training; embeddings have no dropout). Merging adds `W₀ ⊙ (B·A)`, where `W₀` is
//! the weight before any adapter was merged (PEFT's `_base_weight_before_merge`), so several merged
//! adapters give `W₀ ⊙ (1 + Σ BᵢAᵢ)`; unmerging subtracts what the merge added. HiRA is not additive in the
//! sense of a weighted merge: its update depends on the base weight.

use super::config::HiraConfig;
use crate::layer::{
    Adapter, BaseKind, BaseLayer, CallCtx, MergeInput, Merged, NamedTensor, check_shape,
};
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;

/// `hira_A` (Linear, Conv1D, Conv2d).
pub const HIRA_A: &str = "hira_A";
/// `hira_B` (Linear, Conv1D, Conv2d).
pub const HIRA_B: &str = "hira_B";
/// `hira_embedding_A` (Embedding).
pub const HIRA_EMBEDDING_A: &str = "hira_embedding_A";
/// `hira_embedding_B` (Embedding).
pub const HIRA_EMBEDDING_B: &str = "hira_embedding_B";

/// The parameter names of HiRA's tensors in a file.
pub const PARAM_PREFIXES: &[&str] = &[HIRA_A, HIRA_B, HIRA_EMBEDDING_A, HIRA_EMBEDDING_B];

/// One HiRA adapter inside one layer (f32 `Var`s; the dtype they were created or loaded in is kept for
/// saving).
#[derive(Debug)]
pub struct HiraAdapter {
    kind: BaseKind,
    r: usize,
    a: Var,
    b: Var,
    dropout: f64,
    saved_dtype: DType,
}

/// The keys and shapes of `A` and `B` for a layer of this kind and rank.
struct Layout {
    a_key: &'static str,
    b_key: &'static str,
    a_shape: Vec<usize>,
    b_shape: Vec<usize>,
    /// `fan_in` of `A` for the Kaiming-uniform init.
    fan_in: usize,
}

fn layout(base: &BaseLayer, r: usize) -> Result<Layout> {
    let (n_in, n_out) = (base.in_features(), base.out_features());
    Ok(match base.kind() {
        BaseKind::Linear | BaseKind::Conv1D => Layout {
            a_key: HIRA_A,
            b_key: HIRA_B,
            a_shape: vec![r, n_in],
            b_shape: vec![n_out, r],
            fan_in: n_in,
        },
        BaseKind::Embedding => Layout {
            a_key: HIRA_EMBEDDING_A,
            b_key: HIRA_EMBEDDING_B,
            a_shape: vec![r, n_in],
            b_shape: vec![n_out, r],
            fan_in: n_in,
        },
        BaseKind::Conv2d(s) => {
            if s.groups > 1 {
                return Err(PeftError::Unsupported {
                    field: "target_modules".into(),
                    value: format!("a Conv2d layer with groups={}", s.groups),
                    reason: "HiRA does not support Conv2d layers with groups > 1 (as PEFT: the Hadamard \
                             product needs the delta shaped as the weight)"
                        .into(),
                });
            }
            let d = base.weight_dims();
            Layout {
                a_key: HIRA_A,
                b_key: HIRA_B,
                a_shape: vec![r, d[1], d[2], d[3]],
                b_shape: vec![d[0], r, 1, 1],
                fan_in: d[1] * d[2] * d[3],
            }
        }
    })
}

impl HiraAdapter {
    /// A freshly initialised adapter for `module` of rank `r`, as PEFT's `update_layer` (a `rank_pattern`
    /// that gives the module another rank is refused: PEFT 0.21.2 would create the layer with `r`):
    /// `init_weights` `true`: Kaiming-uniform `A` and zero `B` (an embedding: zero `A`, N(0, 1) `B`);
    /// `"gaussian"`: `A` ~ N(0, 1/r) and zero `B` on a Linear (a Conv2d takes the Kaiming init, an
    /// embedding the same as `true`); `false` / `null`: both N(0, 1).
    pub fn new(
        base: &BaseLayer,
        config: &HiraConfig,
        module: &str,
        rng: &mut PeftRng,
    ) -> Result<Self> {
        let r = config.r;
        if config.rank_of(module)? != r {
            return Err(PeftError::Unsupported {
                field: "rank_pattern".into(),
                value: format!("a rank for {module}"),
                reason: "PEFT 0.21.2's HiRA ignores rank_pattern when it creates a layer (its \
                         dispatch_default passes config.r), so an adapter made with it would not load in \
                         PEFT; set r instead (files that carry a rank_pattern load)"
                    .into(),
            });
        }
        let l = layout(base, r)?;
        let dev = base.device();
        let kind = *base.kind();
        let (a, b) = if !config.init_weights.is_identity() {
            (
                rng.normal_tensor(l.a_shape.as_slice(), 0.0, 1.0, DType::F32, dev)?,
                rng.normal_tensor(l.b_shape.as_slice(), 0.0, 1.0, DType::F32, dev)?,
            )
        } else if kind == BaseKind::Embedding {
            (
                Tensor::zeros(l.a_shape.as_slice(), DType::F32, dev)?,
                rng.normal_tensor(l.b_shape.as_slice(), 0.0, 1.0, DType::F32, dev)?,
            )
        } else {
            let gaussian = matches!(&config.init_weights, super::HiraInit::Method(_))
                && !matches!(kind, BaseKind::Conv2d(_));
            let a = if gaussian {
                rng.normal_tensor(l.a_shape.as_slice(), 0.0, 1.0 / r as f64, DType::F32, dev)?
            } else {
                // torch's kaiming_uniform_(a=√5): U(−1/√fan_in, 1/√fan_in)
                let bound = 1.0 / (l.fan_in as f64).sqrt();
                rng.uniform_tensor(l.a_shape.as_slice(), -bound, bound, DType::F32, dev)?
            };
            (a, Tensor::zeros(l.b_shape.as_slice(), DType::F32, dev)?)
        };
        Ok(Self {
            kind,
            r,
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            dropout: config.hira_dropout,
            saved_dtype: DType::F32,
        })
    }

    /// An adapter from tensors as PEFT saves them (keys relative to the module, adapter name stripped):
    /// exactly `hira_A` and `hira_B` (`hira_embedding_A` / `hira_embedding_B` on an embedding), shaped for
    /// the base layer and of rank `r` or the module's `rank_pattern` rank (PEFT applies the pattern only to
    /// a second adapter of a layer).
    pub fn from_tensors(
        base: &BaseLayer,
        config: &HiraConfig,
        module: &str,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        // PEFT 0.21.2 gives a layer's first adapter `r` and applies `rank_pattern` only to an adapter added to
        // a layer that already has one: the file's rank is either
        let pattern_r = config.rank_of(module)?;
        let a_key = layout(base, config.r)?.a_key;
        let r = match tensors.get(a_key).and_then(|t| t.dims().first()) {
            Some(&rf) if rf == pattern_r => pattern_r,
            _ => config.r,
        };
        let l = layout(base, r)?;
        let get = |k: &str, shape: &[usize]| -> Result<&Tensor> {
            let t = tensors
                .get(k)
                .ok_or_else(|| PeftError::MissingKey(k.to_string()))?;
            check_shape(k, t, shape)?;
            Ok(t)
        };
        let a = get(l.a_key, &l.a_shape)?;
        let b = get(l.b_key, &l.b_shape)?;
        let extra: Vec<String> = tensors
            .keys()
            .filter(|k| k.as_str() != l.a_key && k.as_str() != l.b_key)
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        Ok(Self {
            kind: *base.kind(),
            r,
            a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
            b: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
            dropout: config.hira_dropout,
            saved_dtype: a.dtype(),
        })
    }

    /// `B·A` in the layout of the base weight (PEFT's `get_delta_weight`), f32.
    pub fn modulation(&self) -> Result<Tensor> {
        let (a, b) = (self.a.as_tensor(), self.b.as_tensor());
        Ok(match self.kind {
            BaseKind::Linear => b.matmul(a)?,
            BaseKind::Conv1D | BaseKind::Embedding => b.matmul(a)?.t()?,
            BaseKind::Conv2d(_) => {
                let (r, n_in, kh, kw) = a.dims4()?;
                let n_out = b.dim(0)?;
                b.reshape((n_out, r))?
                    .matmul(&a.reshape((r, n_in * kh * kw))?)?
                    .reshape((n_out, n_in, kh, kw))?
            }
        })
    }

    /// `W ⊙ (B·A)`, its shape checked against the weight's.
    fn modulated(&self, weight: &Tensor) -> Result<Tensor> {
        let m = self.modulation()?;
        if m.dims() != weight.dims() {
            return Err(PeftError::Invalid(format!(
                "HiRA adapter for a weight of shape {:?} applied to one of shape {:?}",
                m.dims(),
                weight.dims()
            )));
        }
        Ok((weight.to_dtype(DType::F32)? * m)?)
    }
}

impl Adapter for HiraAdapter {
    fn peft_type(&self) -> &'static str {
        "HIRA"
    }

    fn transform_output(
        &self,
        base: &BaseLayer,
        x: &Tensor,
        result: Tensor,
        ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        let eff = self.modulated(&base.weight()?)?;
        let x = if self.kind != BaseKind::Embedding {
            let x = x.to_dtype(DType::F32)?;
            if ctx.fwd.training && self.dropout > 0.0 {
                let mask = ctx
                    .rng("hira_dropout")
                    .dropout_mask(x.shape(), self.dropout, x.device())?;
                x.mul(&mask)?
            } else {
                x
            }
        } else {
            x.clone()
        };
        let h = base.forward_with(&x, &eff, None)?;
        Ok((result.to_dtype(DType::F32)? + h.to_dtype(DType::F32)?)?)
    }

    fn merge(&self, input: MergeInput<'_>) -> Result<Merged> {
        let delta = self.modulated(input.unmerged_weight)?;
        Ok(Merged {
            weight: (input.weight + &delta)?,
            bias: input.bias.cloned(),
            cache: Some(delta),
        })
    }

    fn unmerge(
        &self,
        input: MergeInput<'_>,
        cache: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let delta = cache.ok_or_else(|| {
            PeftError::Invalid("HiRA unmerge without the update its merge added".into())
        })?;
        Ok(((input.weight - delta)?, input.bias.cloned()))
    }

    fn needs_unmerged_weight(&self) -> bool {
        true
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        let (ka, kb) = self.keys();
        vec![
            (ka.to_string(), self.a.as_tensor().clone()),
            (kb.to_string(), self.b.as_tensor().clone()),
        ]
    }

    fn vars(&self) -> Vec<(String, Var)> {
        let (ka, kb) = self.keys();
        vec![(ka.to_string(), self.a.clone()), (kb.to_string(), self.b.clone())]
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        let (ka, kb) = self.keys();
        format!(
            "{ka} {:?} {kb} {:?} (r={})",
            self.a.as_tensor().dims(),
            self.b.as_tensor().dims(),
            self.r
        )
    }
}

impl HiraAdapter {
    fn keys(&self) -> (&'static str, &'static str) {
        match self.kind {
            BaseKind::Embedding => (HIRA_EMBEDDING_A, HIRA_EMBEDDING_B),
            _ => (HIRA_A, HIRA_B),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AdapterSlot, ForwardCtx};
    use candle_core::Device;

    #[test]
    fn the_forward_is_the_base_op_with_the_modulated_weight_and_merges_into_it() {
        let mut rng = PeftRng::new(5);
        let w = rng
            .normal_tensor(&[6, 5], 0.0, 1.0, DType::F32, &Device::Cpu)
            .unwrap();
        let bias = rng.normal_tensor(6, 0.0, 1.0, DType::F32, &Device::Cpu).unwrap();
        let base = BaseLayer::linear(w.clone(), Some(bias.clone())).unwrap();
        let cfg = HiraConfig {
            r: 2,
            init_weights: super::super::HiraInit::Bool(false),
            ..Default::default()
        };
        let a = HiraAdapter::new(&base, &cfg, "fc", &mut rng).unwrap();
        let m = a.modulation().unwrap();
        // W ⊙ (1 + B·A), the bias unchanged
        let merged = (&w * (m + 1.0).unwrap()).unwrap();
        let x = rng
            .normal_tensor(&[4, 5], 0.0, 1.0, DType::F32, &Device::Cpu)
            .unwrap();
        let want = x
            .matmul(&merged.t().unwrap())
            .unwrap()
            .broadcast_add(&bias)
            .unwrap();
        let mut slot = AdapterSlot::new("fc", base);
        slot.add_adapter("default", Box::new(a)).unwrap();
        let ctx = ForwardCtx::eval();
        assert!(peft_test_support::max_diff(&slot.forward(&x, &ctx).unwrap(), &want) < 1e-4);
        slot.merge(None).unwrap();
        assert!(peft_test_support::max_diff(&slot.base().weight().unwrap(), &merged) < 1e-5);
        assert_eq!(peft_test_support::max_diff(slot.base().bias().unwrap(), &bias), 0.0);
        slot.unmerge().unwrap();
        assert!(peft_test_support::max_diff(&slot.base().weight().unwrap(), &w) < 1e-5);
    }

    #[test]
    fn the_default_init_trains_b_from_zero() {
        let mut rng = PeftRng::new(6);
        let w = rng
            .normal_tensor(&[6, 5], 0.0, 1.0, DType::F32, &Device::Cpu)
            .unwrap();
        let base = BaseLayer::linear(w, None).unwrap();
        let a = HiraAdapter::new(&base, &HiraConfig { r: 2, ..Default::default() }, "fc", &mut rng)
            .unwrap();
        assert_eq!(a.modulation().unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let vars = a.vars();
        let x = rng
            .normal_tensor(&[4, 5], 0.0, 1.0, DType::F32, &Device::Cpu)
            .unwrap();
        let mut slot = AdapterSlot::new("fc", base);
        slot.add_adapter("default", Box::new(a)).unwrap();
        let y = slot.forward(&x, &ForwardCtx::eval()).unwrap();
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gb = grads.get(vars[1].1.as_tensor()).expect("a gradient for hira_B");
        assert!(gb.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
    }
}
