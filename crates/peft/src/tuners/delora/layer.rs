//! The DeLoRA adapter for Linear layers (PEFT's `tuners/delora/layer.py`).
//!
//! Tensors per layer (bare parameters: the keys have no `.weight`): `delora_A` `[r, in]`, `delora_B`
//! `[out, r]`, `delora_lambda` `[1]` (trained), and the buffer `delora_w_norm` `[in]`, the column norms of the
//! frozen weight when the adapter was created (saved in the file, as PEFT's persistent buffer). The update is
//! `ΔW = B·diag(λ / r / (‖Aᵢ,:‖·‖B:,ᵢ‖))·A·diag(w_norm)`, each norm clamped below at 1e-4; the forward computes
//! `((x·w_norm)·Aᵀ·scale)·Bᵀ` on the (dropped-out, in training) input and adds it. Additive: merging adds
//! `ΔW`, unmerging subtracts it, and weighted merges (`DIR@W`) scale it.

use super::config::DeloraConfig;
use crate::layer::{
    Adapter, BaseKind, BaseLayer, CallCtx, NamedTensor, check_shape,
};
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;

/// `delora_A`.
pub const DELORA_A: &str = "delora_A";
/// `delora_B`.
pub const DELORA_B: &str = "delora_B";
/// `delora_lambda`.
pub const DELORA_LAMBDA: &str = "delora_lambda";
/// `delora_w_norm` (a buffer).
pub const DELORA_W_NORM: &str = "delora_w_norm";

/// The parameter names of DeLoRA's tensors in a file.
pub const PARAM_PREFIXES: &[&str] = &[DELORA_A, DELORA_B, DELORA_LAMBDA, DELORA_W_NORM];

/// PEFT's lower clamp of the rank-one components' norms.
const NORM_MIN: f64 = 1e-4;

/// One DeLoRA adapter inside one Linear layer (f32 `Var`s and buffer; the dtype they were created or loaded
/// in is kept for saving).
#[derive(Debug)]
pub struct DeloraAdapter {
    r: usize,
    a: Var,
    b: Var,
    lambda: Var,
    w_norm: Tensor,
    dropout: f64,
    saved_dtype: DType,
}

fn dims(base: &BaseLayer) -> Result<(usize, usize)> {
    match base.kind() {
        BaseKind::Linear => Ok((base.in_features(), base.out_features())),
        other => Err(PeftError::Unsupported {
            field: "target_modules".into(),
            value: format!("a {other:?} layer"),
            reason: "DeLoRA supports only Linear layers (as PEFT)".into(),
        }),
    }
}

/// The column norms of the frozen weight `[out, in]` → `[in]` (PEFT's `torch.norm(w, dim=0)`).
fn column_norms(base: &BaseLayer) -> Result<Tensor> {
    let w = base.weight()?.to_dtype(DType::F32)?;
    Ok(w.sqr()?.sum(0)?.sqrt()?)
}

impl DeloraAdapter {
    /// A freshly initialised adapter for `module`: Kaiming-uniform `A`, zero `B` (`init_weights`; else
    /// Kaiming-uniform `B`), `λ` from the config (patterns applied), `w_norm` from the base weight.
    pub fn new(
        base: &BaseLayer,
        config: &DeloraConfig,
        module: &str,
        rng: &mut PeftRng,
    ) -> Result<Self> {
        let (n_in, n_out) = dims(base)?;
        let (r, lambda) = config.rank_and_lambda(module)?;
        let dev = base.device();
        // torch's kaiming_uniform_(a=√5) on [rows, fan_in]: U(−1/√fan_in, 1/√fan_in)
        let ba = 1.0 / (n_in as f64).sqrt();
        let a = rng.uniform_tensor((r, n_in), -ba, ba, DType::F32, dev)?;
        let b = if config.init_weights {
            Tensor::zeros((n_out, r), DType::F32, dev)?
        } else {
            let bb = 1.0 / (r as f64).sqrt();
            rng.uniform_tensor((n_out, r), -bb, bb, DType::F32, dev)?
        };
        Ok(Self {
            r,
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            lambda: Var::from_tensor(&Tensor::new(&[lambda as f32], dev)?)?,
            w_norm: column_norms(base)?,
            dropout: config.module_dropout,
            saved_dtype: DType::F32,
        })
    }

    /// An adapter from tensors as PEFT saves them (keys relative to the module, adapter name stripped):
    /// `delora_A`, `delora_B`, `delora_lambda` and `delora_w_norm` (recomputed from the base weight, as PEFT's
    /// layer creation does, when a file lacks it).
    pub fn from_tensors(
        base: &BaseLayer,
        config: &DeloraConfig,
        module: &str,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        let (n_in, n_out) = dims(base)?;
        let (r, _) = config.rank_and_lambda(module)?;
        let get = |k: &str, shape: &[usize]| -> Result<Tensor> {
            let t = tensors
                .get(k)
                .ok_or_else(|| PeftError::MissingKey(k.to_string()))?;
            check_shape(k, t, shape)?;
            Ok(t.to_dtype(DType::F32)?)
        };
        let a = get(DELORA_A, &[r, n_in])?;
        let b = get(DELORA_B, &[n_out, r])?;
        let lambda = get(DELORA_LAMBDA, &[1])?;
        let w_norm = if tensors.contains_key(DELORA_W_NORM) {
            get(DELORA_W_NORM, &[n_in])?
        } else {
            column_norms(base)?
        };
        let extra: Vec<String> = tensors
            .keys()
            .filter(|k| !PARAM_PREFIXES.contains(&k.as_str()))
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        let saved_dtype = tensors[DELORA_A].dtype();
        Ok(Self {
            r,
            a: Var::from_tensor(&a)?,
            b: Var::from_tensor(&b)?,
            lambda: Var::from_tensor(&lambda)?,
            w_norm,
            dropout: config.module_dropout,
            saved_dtype,
        })
    }

    /// `λ / r / (‖Aᵢ,:‖·‖B:,ᵢ‖)` `[r]`, the norms clamped at 1e-4.
    fn scale(&self) -> Result<Tensor> {
        // √(Σx² + 1e-30): the same value in f32, and a finite gradient at a zero column (B starts at zero),
        // where √ alone gives 0·∞ = NaN; torch's norm backward returns 0 there
        let norm = |t: Tensor| -> Result<Tensor> { Ok((t + 1e-30)?.sqrt()?.maximum(NORM_MIN)?) };
        let an = norm(self.a.as_tensor().sqr()?.sum(1)?)?;
        let bn = norm(self.b.as_tensor().sqr()?.sum(0)?)?;
        let lam = (self.lambda.as_tensor() / self.r as f64)?;
        Ok(lam.broadcast_div(&(an * bn)?)?)
    }

    /// `ΔW` `[out, in]`.
    pub fn delta(&self) -> Result<Tensor> {
        let bs = self.b.as_tensor().broadcast_mul(&self.scale()?.unsqueeze(0)?)?;
        Ok(bs
            .matmul(self.a.as_tensor())?
            .broadcast_mul(&self.w_norm.unsqueeze(0)?)?)
    }
}

impl Adapter for DeloraAdapter {
    /// PEFT's `supports_lora_conversion`: Linear layers, by their additive delta.
    fn lora_conversion(
        &self,
        base: &crate::layer::BaseLayer,
    ) -> Result<Option<crate::layer::LoraConversion>> {
        crate::tuners::lora::conversion::additive_conversion(self, base, false)
    }

    fn peft_type(&self) -> &'static str {
        "DELORA"
    }

    fn transform_output(
        &self,
        _base: &BaseLayer,
        x: &Tensor,
        result: Tensor,
        ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let x = if ctx.fwd.training && self.dropout > 0.0 {
            let mask = ctx
                .rng("delora_dropout")
                .dropout_mask(x.shape(), self.dropout, x.device())?;
            x.mul(&mask)?
        } else {
            x
        };
        let n_in = self.w_norm.dim(0)?;
        let lead = x.dims()[..x.rank() - 1].to_vec();
        let rows = x.elem_count() / n_in.max(1);
        let x2 = x.reshape((rows, n_in))?.broadcast_mul(&self.w_norm.unsqueeze(0)?)?;
        let h = x2
            .matmul(&self.a.as_tensor().t()?)?
            .broadcast_mul(&self.scale()?.unsqueeze(0)?)?
            .matmul(&self.b.as_tensor().t()?)?;
        let mut shape = lead;
        shape.push(h.dim(1)?);
        Ok((result.to_dtype(DType::F32)? + h.reshape(shape)?)?)
    }

    fn delta_weight(&self, kind: &BaseKind) -> Result<Option<(Tensor, Option<Tensor>)>> {
        if !matches!(kind, BaseKind::Linear) {
            return Err(PeftError::Invalid(format!(
                "DeLoRA adapter merged into a {kind:?} layer"
            )));
        }
        Ok(Some((self.delta()?, None)))
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        vec![
            (DELORA_A.to_string(), self.a.as_tensor().clone()),
            (DELORA_B.to_string(), self.b.as_tensor().clone()),
            (DELORA_LAMBDA.to_string(), self.lambda.as_tensor().clone()),
            (DELORA_W_NORM.to_string(), self.w_norm.clone()),
        ]
    }

    fn vars(&self) -> Vec<(String, Var)> {
        vec![
            (DELORA_A.to_string(), self.a.clone()),
            (DELORA_B.to_string(), self.b.clone()),
            (DELORA_LAMBDA.to_string(), self.lambda.clone()),
        ]
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        format!(
            "delora_A {:?} delora_B {:?} (r={})",
            self.a.as_tensor().dims(),
            self.b.as_tensor().dims(),
            self.r
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AdapterSlot, ForwardCtx};
    use candle_core::Device;

    #[test]
    fn forward_equals_the_merged_delta_and_starts_at_zero() {
        let mut rng = PeftRng::new(3);
        let w = rng
            .normal_tensor(&[6, 5], 0.0, 1.0, DType::F32, &Device::Cpu)
            .unwrap();
        let base = BaseLayer::linear(w.clone(), None).unwrap();
        let zero = DeloraAdapter::new(&base, &DeloraConfig::default(), "fc", &mut rng).unwrap();
        assert_eq!(zero.delta().unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let cfg = DeloraConfig {
            r: 2,
            init_weights: false,
            ..Default::default()
        };
        let a = DeloraAdapter::new(&base, &cfg, "fc", &mut rng).unwrap();
        // the delta of each rank-one component has Frobenius norm λ/r times a w_norm-weighted unit vector
        let delta = a.delta().unwrap();
        let x = rng
            .normal_tensor(&[4, 5], 0.0, 1.0, DType::F32, &Device::Cpu)
            .unwrap();
        let want = x.matmul(&(w.clone() + &delta).unwrap().t().unwrap()).unwrap();
        let mut slot = AdapterSlot::new("fc", base);
        slot.add_adapter("default", Box::new(a)).unwrap();
        let ctx = ForwardCtx::eval();
        let y = slot.forward(&x, &ctx).unwrap();
        assert!(peft_test_support::max_diff(&y, &want) < 1e-5);
        slot.merge(None).unwrap();
        assert!(peft_test_support::max_diff(&slot.forward(&x, &ctx).unwrap(), &want) < 1e-5);
        slot.unmerge().unwrap();
        assert!(peft_test_support::max_diff(&slot.base().weight().unwrap(), &w) < 1e-5);
    }

    #[test]
    fn gradients_are_finite_from_the_zero_start() {
        let mut rng = PeftRng::new(4);
        let w = rng
            .normal_tensor(&[6, 5], 0.0, 1.0, DType::F32, &Device::Cpu)
            .unwrap();
        let base = BaseLayer::linear(w, None).unwrap();
        let a = DeloraAdapter::new(&base, &DeloraConfig::default(), "fc", &mut rng).unwrap();
        let x = rng
            .normal_tensor(&[4, 5], 0.0, 1.0, DType::F32, &Device::Cpu)
            .unwrap();
        let vars = a.vars();
        let mut slot = AdapterSlot::new("fc", base);
        slot.add_adapter("default", Box::new(a)).unwrap();
        let y = slot.forward(&x, &ForwardCtx::eval()).unwrap();
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gb = grads.get(vars[1].1.as_tensor()).expect("a gradient for delora_B");
        let total = gb.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(total.is_finite() && total > 0.0, "{total}");
    }

    #[test]
    fn patterns_pick_the_rank_and_lambda() {
        let cfg = DeloraConfig {
            rank_pattern: IndexMap::from([("q_proj".to_string(), 4)]),
            lambda_pattern: IndexMap::from([("layers.0.q_proj".to_string(), 3.0)]),
            ..Default::default()
        };
        assert_eq!(cfg.rank_and_lambda("model.layers.0.self_attn.q_proj").unwrap(), (4, 15.0));
        assert_eq!(cfg.rank_and_lambda("model.layers.0.q_proj").unwrap(), (4, 3.0));
        assert_eq!(cfg.rank_and_lambda("model.layers.1.q_proj").unwrap(), (4, 15.0));
        assert_eq!(cfg.rank_and_lambda("model.layers.1.v_proj").unwrap(), (8, 15.0));
    }
}
