//! The PEANuT adapter for Linear layers (PEFT's `tuners/peanut/layer.py`).
//!
//! Tensors per layer (`nn.Linear` weights, keys ending in `.weight`): `peanut_A` `[r, out]`, `peanut_B`
//! `[out, r]`, and `depth` encoders and decoders `peanut_encoders.i` / `peanut_decoders.i` `[r, r]`. From the
//! frozen weight `W₀` `[out, in]`: `h = f(W₀ᵀ·Aᵀ)` `[in, r]`; each encoder keeps `h` as a residual and
//! applies `h = f(h·Eᵢᵀ)`; each decoder applies `h = f(h·Dᵢᵀ)` and adds the residuals in reverse order; then
//! `ΔW = (h·Bᵀ · scaling)ᵀ`. The forward adds `x·ΔWᵀ` to the base output, with `ΔW` computed from the
//! layer's current weight as PEFT does; merging adds `ΔW` computed from the weight before any merge
//! (PEFT's `_base_weight_before_merge`) and unmerging subtracts what the merge added.

use super::activation::Activation;
use super::config::PeanutConfig;
use crate::layer::{
    Adapter, BaseKind, BaseLayer, CallCtx, MergeInput, Merged, NamedTensor, check_shape,
};
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;

/// The parameter names of PEANuT's tensors in a file.
pub const PARAM_PREFIXES: &[&str] = &["peanut_A", "peanut_B", "peanut_encoders", "peanut_decoders"];

/// One PEANuT adapter inside one Linear layer (f32 `Var`s; the dtype they were created or loaded in is kept
/// for saving).
#[derive(Debug)]
pub struct PeanutAdapter {
    act: Activation,
    scaling: f64,
    a: Var,
    b: Var,
    encoders: Vec<Var>,
    decoders: Vec<Var>,
    saved_dtype: DType,
}

fn dims(base: &BaseLayer) -> Result<(usize, usize)> {
    if !matches!(base.kind(), BaseKind::Linear) || base.quantized().is_some() {
        return Err(PeftError::Unsupported {
            field: "target_modules".into(),
            value: if base.quantized().is_some() {
                "a quantized Linear layer".into()
            } else {
                format!("a {:?} layer", base.kind())
            },
            reason: "PEANuT supports only plain Linear layers (as PEFT: torch.nn.Linear; its update is computed \
                     from the dense weight)"
                .into(),
        });
    }
    Ok((base.in_features(), base.out_features()))
}

fn layer_key(prefix: &str, i: usize) -> String {
    format!("{prefix}.{i}.weight")
}

impl PeanutAdapter {
    /// A freshly initialised adapter, as PEFT's `reset_peanut_parameters`: Kaiming-uniform `A`, encoders and
    /// decoders, and a zero `B` (`init_weights`; else Kaiming-uniform).
    pub fn new(base: &BaseLayer, config: &PeanutConfig, rng: &mut PeftRng) -> Result<Self> {
        let (_, n_out) = dims(base)?;
        let r = config.r;
        let dev = base.device();
        // torch's kaiming_uniform_(a=√5) on [rows, fan_in]: U(−1/√fan_in, 1/√fan_in)
        let mut kaiming = |rows: usize, fan_in: usize| -> Result<Var> {
            let bound = 1.0 / (fan_in as f64).sqrt();
            Ok(Var::from_tensor(&rng.uniform_tensor(
                (rows, fan_in),
                -bound,
                bound,
                DType::F32,
                dev,
            )?)?)
        };
        let a = kaiming(r, n_out)?;
        let encoders = (0..config.depth)
            .map(|_| kaiming(r, r))
            .collect::<Result<Vec<_>>>()?;
        let decoders = (0..config.depth)
            .map(|_| kaiming(r, r))
            .collect::<Result<Vec<_>>>()?;
        let b = if config.init_weights {
            Var::from_tensor(&Tensor::zeros((n_out, r), DType::F32, dev)?)?
        } else {
            kaiming(n_out, r)?
        };
        Ok(Self {
            act: config.activation()?,
            scaling: config.scaling,
            a,
            b,
            encoders,
            decoders,
            saved_dtype: DType::F32,
        })
    }

    /// An adapter from tensors as PEFT saves them (keys relative to the module, adapter name stripped):
    /// exactly `peanut_A.weight`, `peanut_B.weight` and `depth` of each of `peanut_encoders.i.weight` and
    /// `peanut_decoders.i.weight`.
    pub fn from_tensors(
        base: &BaseLayer,
        config: &PeanutConfig,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        let (_, n_out) = dims(base)?;
        let r = config.r;
        let mut expected = Vec::new();
        let mut get = |k: String, shape: &[usize]| -> Result<Var> {
            let t = tensors
                .get(&k)
                .ok_or_else(|| PeftError::MissingKey(k.clone()))?;
            check_shape(&k, t, shape)?;
            expected.push(k);
            Ok(Var::from_tensor(&t.to_dtype(DType::F32)?)?)
        };
        let a = get("peanut_A.weight".into(), &[r, n_out])?;
        let b = get("peanut_B.weight".into(), &[n_out, r])?;
        let encoders = (0..config.depth)
            .map(|i| get(layer_key("peanut_encoders", i), &[r, r]))
            .collect::<Result<Vec<_>>>()?;
        let decoders = (0..config.depth)
            .map(|i| get(layer_key("peanut_decoders", i), &[r, r]))
            .collect::<Result<Vec<_>>>()?;
        let extra: Vec<String> = tensors
            .keys()
            .filter(|k| !expected.contains(k))
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        Ok(Self {
            act: config.activation()?,
            scaling: config.scaling,
            a,
            b,
            encoders,
            decoders,
            saved_dtype: tensors["peanut_A.weight"].dtype(),
        })
    }

    /// `ΔWᵀ · …`: the update transposed, `[in, out]`, computed from the weight `w0` `[out, in]`.
    fn delta_t(&self, w0: &Tensor) -> Result<Tensor> {
        let (n_out, _) = w0.dims2()?;
        if n_out != self.b.as_tensor().dim(0)? {
            return Err(PeftError::Invalid(format!(
                "PEANuT adapter for {} outputs applied to a weight of shape {:?}",
                self.b.as_tensor().dim(0)?,
                w0.dims()
            )));
        }
        let f = |t: &Tensor| self.act.apply(t);
        let wt = w0.to_dtype(DType::F32)?.t()?;
        let mut h = f(&wt.matmul(&self.a.as_tensor().t()?)?)?;
        let mut residuals = Vec::with_capacity(self.encoders.len());
        for e in &self.encoders {
            residuals.push(h.clone());
            h = f(&h.matmul(&e.as_tensor().t()?)?)?;
        }
        for (d, res) in self.decoders.iter().zip(residuals.iter().rev()) {
            h = (f(&h.matmul(&d.as_tensor().t()?)?)? + res)?;
        }
        Ok((h.matmul(&self.b.as_tensor().t()?)? * self.scaling)?)
    }

    /// `ΔW` `[out, in]` from the weight `w0`.
    pub fn delta(&self, w0: &Tensor) -> Result<Tensor> {
        Ok(self.delta_t(w0)?.t()?.contiguous()?)
    }
}

impl Adapter for PeanutAdapter {
    fn peft_type(&self) -> &'static str {
        "PEANUT"
    }

    fn transform_output(
        &self,
        base: &BaseLayer,
        x: &Tensor,
        result: Tensor,
        _ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        let dt = self.delta_t(&base.weight()?)?;
        let (n_in, n_out) = dt.dims2()?;
        let x = x.to_dtype(DType::F32)?;
        let mut shape = x.dims().to_vec();
        let rows = x.elem_count() / n_in.max(1);
        let h = x.reshape((rows, n_in))?.matmul(&dt)?;
        if let Some(last) = shape.last_mut() {
            *last = n_out;
        }
        Ok((result.to_dtype(DType::F32)? + h.reshape(shape)?)?)
    }

    fn merge(&self, input: MergeInput<'_>) -> Result<Merged> {
        let delta = self.delta(input.unmerged_weight)?;
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
            PeftError::Invalid("PEANuT unmerge without the update its merge added".into())
        })?;
        Ok(((input.weight - delta)?, input.bias.cloned()))
    }

    fn needs_unmerged_weight(&self) -> bool {
        true
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        self.vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect()
    }

    fn vars(&self) -> Vec<(String, Var)> {
        let mut v = vec![
            ("peanut_A.weight".to_string(), self.a.clone()),
            ("peanut_B.weight".to_string(), self.b.clone()),
        ];
        for (i, e) in self.encoders.iter().enumerate() {
            v.push((layer_key("peanut_encoders", i), e.clone()));
        }
        for (i, d) in self.decoders.iter().enumerate() {
            v.push((layer_key("peanut_decoders", i), d.clone()));
        }
        v
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        format!(
            "peanut r={} depth={} act={:?} scaling={}",
            self.a.as_tensor().dim(0).unwrap_or(0),
            self.encoders.len(),
            self.act,
            self.scaling
        )
    }
}
