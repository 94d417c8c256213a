//! The SuperTuning adapter for Linear layers (PEFT's `tuners/supertuning/layer.py`).
//!
//! Tensors per layer: `supertuning_values` `[k]` (trained), `supertuning_indices` `[k]` (int32 flat positions in
//! the `[out, in]` weight, saved when `save_precomputed_indices`; otherwise recomputed at load from the base
//! weight as PEFT does), and in Supra mode `supertuning_lora_A.weight` `[r, in]` and
//! `supertuning_lora_B.weight` `[out, r]`. The indices are `torch.topk(|W|.flatten(), k, largest=select_top)`:
//! `k = int(numel·(1 − sparsity))` positions in the order of their magnitude (descending; ascending for
//! the smallest), ties by position. The update `ΔW = scatter(values at indices) + (lora_alpha / r)·B·A` is
//! additive: the forward adds `x·ΔWᵀ` (LoRA dropout on its own input, in training), merging adds `ΔW`,
//! weighted merges (`DIR@W`) scale it.

use super::config::SupertuningConfig;
use crate::layer::{Adapter, BaseKind, BaseLayer, CallCtx, NamedTensor, check_shape};
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Device, Tensor, Var};
use indexmap::IndexMap;

/// `supertuning_values`.
pub const VALUES: &str = "supertuning_values";
/// `supertuning_indices` (int32).
pub const INDICES: &str = "supertuning_indices";
/// `supertuning_lora_A.weight`.
pub const LORA_A: &str = "supertuning_lora_A.weight";
/// `supertuning_lora_B.weight`.
pub const LORA_B: &str = "supertuning_lora_B.weight";

/// The parameter names of SuperTuning's tensors in a file.
pub const PARAM_PREFIXES: &[&str] = &[
    VALUES,
    INDICES,
    "supertuning_lora_A",
    "supertuning_lora_B",
];

/// The integer tensors SuperTuning writes (admitted by name by the adapter-file checks).
pub const INTEGER_TENSORS: &[&str] = &[INDICES];

/// The optional LoRA of Supra mode.
#[derive(Debug)]
struct Supra {
    a: Var,
    b: Var,
    scale: f64,
    dropout: f64,
}

/// One SuperTuning adapter inside one Linear layer (f32 `Var`s; the dtype they were created or loaded in is
/// kept for saving).
#[derive(Debug)]
pub struct SupertuningAdapter {
    n_out: usize,
    n_in: usize,
    /// The flat positions, as PEFT orders them.
    positions: Vec<u32>,
    indices: Tensor,
    save_indices: bool,
    values: Var,
    supra: Option<Supra>,
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
            reason: "SuperTuning supports only plain Linear layers (as PEFT: torch.nn.Linear; its positions \
                     are chosen on the dense weight)"
                .into(),
        });
    }
    Ok((base.out_features(), base.in_features()))
}

/// PEFT's positions: `torch.topk(|W|.flatten(), k, largest)`, sorted by magnitude, ties by position.
pub fn select_positions(weight: &Tensor, k: usize, largest: bool) -> Result<Vec<u32>> {
    let scores: Vec<f32> = weight
        .to_dtype(DType::F32)?
        .flatten_all()?
        .abs()?
        .to_vec1()?;
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    order.sort_by(|&i, &j| {
        let (a, b) = (scores[i as usize], scores[j as usize]);
        let c = if largest { b.total_cmp(&a) } else { a.total_cmp(&b) };
        c.then(i.cmp(&j))
    });
    order.truncate(k);
    Ok(order)
}

fn check_k(config: &SupertuningConfig, numel: usize) -> Result<usize> {
    let k = config.num_trainable(numel);
    if k < 1 {
        return Err(PeftError::InvalidConfig(format!(
            "SuperTuning: sparsity={} leaves no trainable entries for a weight with {numel} elements — no \
             parameter would be adapted. Lower the sparsity so at least one entry is trainable.",
            config.sparsity
        )));
    }
    Ok(k)
}

fn index_tensor(positions: &[u32], dev: &Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(positions, positions.len(), dev)?)
}

impl SupertuningAdapter {
    /// A freshly initialised adapter: PEFT's positions on the base weight, zero values and a zero LoRA `B`
    /// (`init_weights`; else N(0, 1) values and a Kaiming-uniform `B`), a Kaiming-uniform LoRA `A`.
    pub fn new(base: &BaseLayer, config: &SupertuningConfig, rng: &mut PeftRng) -> Result<Self> {
        let (n_out, n_in) = dims(base)?;
        let k = check_k(config, n_out * n_in)?;
        let positions = select_positions(&base.weight()?, k, config.select_top)?;
        let dev = base.device();
        let values = if config.init_weights {
            Tensor::zeros(k, DType::F32, dev)?
        } else {
            rng.normal_tensor(k, 0.0, 1.0, DType::F32, dev)?
        };
        let supra = match (config.r, config.alpha()?) {
            (Some(r), Some(alpha)) => {
                let ba = 1.0 / (n_in as f64).sqrt();
                let a = rng.uniform_tensor((r, n_in), -ba, ba, DType::F32, dev)?;
                let b = if config.init_weights {
                    Tensor::zeros((n_out, r), DType::F32, dev)?
                } else {
                    let bb = 1.0 / (r as f64).sqrt();
                    rng.uniform_tensor((n_out, r), -bb, bb, DType::F32, dev)?
                };
                Some(Supra {
                    a: Var::from_tensor(&a)?,
                    b: Var::from_tensor(&b)?,
                    scale: alpha / r as f64,
                    dropout: config.lora_dropout,
                })
            }
            _ => None,
        };
        Ok(Self {
            n_out,
            n_in,
            indices: index_tensor(&positions, dev)?,
            positions,
            save_indices: config.save_precomputed_indices,
            values: Var::from_tensor(&values)?,
            supra,
            saved_dtype: DType::F32,
        })
    }

    /// An adapter from tensors as PEFT saves them (keys relative to the module, adapter name stripped):
    /// `supertuning_values` `[k]`, `supertuning_indices` `[k]` (any integer dtype; positions in range and
    /// distinct) or, without them, the positions recomputed from the base weight, and the LoRA of Supra mode.
    pub fn from_tensors(
        base: &BaseLayer,
        config: &SupertuningConfig,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        let (n_out, n_in) = dims(base)?;
        let numel = n_out * n_in;
        let k = check_k(config, numel)?;
        let get = |key: &str, shape: &[usize]| -> Result<&Tensor> {
            let t = tensors
                .get(key)
                .ok_or_else(|| PeftError::MissingKey(key.to_string()))?;
            check_shape(key, t, shape)?;
            Ok(t)
        };
        let values = get(VALUES, &[k])?;
        let mut expected = vec![VALUES];
        let (positions, save_indices) = match tensors.get(INDICES) {
            Some(t) => {
                check_shape(INDICES, t, &[k])?;
                expected.push(INDICES);
                let raw: Vec<i64> = match t.dtype() {
                    DType::I32 => t.to_vec1::<i32>()?.into_iter().map(i64::from).collect(),
                    DType::I64 => t.to_vec1::<i64>()?,
                    DType::U32 => t.to_vec1::<u32>()?.into_iter().map(i64::from).collect(),
                    DType::I16 => t.to_vec1::<i16>()?.into_iter().map(i64::from).collect(),
                    other => {
                        return Err(PeftError::Invalid(format!(
                            "{INDICES} is {other:?}; SuperTuning's indices are integers (int32)"
                        )));
                    }
                };
                let mut seen = vec![false; numel];
                let mut positions = Vec::with_capacity(k);
                for (i, &p) in raw.iter().enumerate() {
                    if p < 0 || p as usize >= numel {
                        return Err(PeftError::Invalid(format!(
                            "{INDICES}[{i}] = {p} is outside the weight's {numel} entries"
                        )));
                    }
                    if std::mem::replace(&mut seen[p as usize], true) {
                        return Err(PeftError::Invalid(format!(
                            "{INDICES}[{i}] = {p} repeats an earlier position"
                        )));
                    }
                    positions.push(p as u32);
                }
                (positions, true)
            }
            None => (
                select_positions(&base.weight()?, k, config.select_top)?,
                false,
            ),
        };
        let supra = match (config.r, config.alpha()?) {
            (Some(r), Some(alpha)) => {
                let a = get(LORA_A, &[r, n_in])?;
                let b = get(LORA_B, &[n_out, r])?;
                expected.extend([LORA_A, LORA_B]);
                Some(Supra {
                    a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
                    b: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
                    scale: alpha / r as f64,
                    dropout: config.lora_dropout,
                })
            }
            _ => None,
        };
        let extra: Vec<String> = tensors
            .keys()
            .filter(|k| !expected.contains(&k.as_str()))
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        Ok(Self {
            n_out,
            n_in,
            indices: index_tensor(&positions, base.device())?,
            positions,
            save_indices,
            values: Var::from_tensor(&values.to_dtype(DType::F32)?)?,
            supra,
            saved_dtype: values.dtype(),
        })
    }

    /// The sparse part of the update, dense `[out, in]` (differentiable in the values).
    fn sparse_delta(&self) -> Result<Tensor> {
        let numel = self.n_out * self.n_in;
        let zeros = Tensor::zeros(numel, DType::F32, self.values.as_tensor().device())?;
        Ok(zeros
            .index_add(&self.indices, self.values.as_tensor(), 0)?
            .reshape((self.n_out, self.n_in))?)
    }

    /// `ΔW` `[out, in]`: the sparse part plus the Supra LoRA.
    pub fn delta(&self) -> Result<Tensor> {
        let d = self.sparse_delta()?;
        Ok(match &self.supra {
            Some(s) => (d + (s.b.as_tensor().matmul(s.a.as_tensor())? * s.scale)?)?,
            None => d,
        })
    }
}

impl Adapter for SupertuningAdapter {
    fn peft_type(&self) -> &'static str {
        "SUPERTUNING"
    }

    fn transform_output(
        &self,
        _base: &BaseLayer,
        x: &Tensor,
        result: Tensor,
        ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let lead = x.dims()[..x.rank() - 1].to_vec();
        let rows = x.elem_count() / self.n_in.max(1);
        let x2 = x.reshape((rows, self.n_in))?;
        let mut h = x2.matmul(&self.sparse_delta()?.t()?)?;
        if let Some(s) = &self.supra {
            let xd = if ctx.fwd.training && s.dropout > 0.0 {
                let mask = ctx
                    .rng("supertuning_lora_dropout")
                    .dropout_mask(x2.shape(), s.dropout, x2.device())?;
                x2.mul(&mask)?
            } else {
                x2.clone()
            };
            let l = xd
                .matmul(&s.a.as_tensor().t()?)?
                .matmul(&s.b.as_tensor().t()?)?;
            h = (h + (l * s.scale)?)?;
        }
        let mut shape = lead;
        shape.push(self.n_out);
        Ok((result.to_dtype(DType::F32)? + h.reshape(shape)?)?)
    }

    fn delta_weight(&self, kind: &BaseKind) -> Result<Option<(Tensor, Option<Tensor>)>> {
        if !matches!(kind, BaseKind::Linear) {
            return Err(PeftError::Invalid(format!(
                "SuperTuning adapter merged into a {kind:?} layer"
            )));
        }
        Ok(Some((self.delta()?, None)))
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        let mut v = Vec::new();
        if self.save_indices {
            let idx: Vec<i32> = self.positions.iter().map(|&p| p as i32).collect();
            if let Ok(t) = Tensor::from_vec(idx, self.positions.len(), self.indices.device()) {
                v.push((INDICES.to_string(), t));
            }
        }
        v.extend(
            self.vars()
                .into_iter()
                .map(|(k, var)| (k, var.as_tensor().clone())),
        );
        v
    }

    fn vars(&self) -> Vec<(String, Var)> {
        let mut v = vec![(VALUES.to_string(), self.values.clone())];
        if let Some(s) = &self.supra {
            v.push((LORA_A.to_string(), s.a.clone()));
            v.push((LORA_B.to_string(), s.b.clone()));
        }
        v
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        format!(
            "supertuning {} of {} entries{}",
            self.positions.len(),
            self.n_out * self.n_in,
            match &self.supra {
                Some(s) => format!(", LoRA r={}", s.a.as_tensor().dims()[0]),
                None => String::new(),
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_follow_the_magnitudes_as_torch_topk() {
        let w = Tensor::new(&[[0.5f32, -3.0, 1.0], [-0.1, 2.0, 1.0]], &Device::Cpu).unwrap();
        assert_eq!(select_positions(&w, 3, true).unwrap(), vec![1, 4, 2]);
        assert_eq!(select_positions(&w, 2, false).unwrap(), vec![3, 0]);
        let c = SupertuningConfig {
            sparsity: 0.99,
            ..Default::default()
        };
        // Python: int(384 * (1 - 0.99)) == 3
        assert_eq!(c.num_trainable(384), 3);
        assert_eq!(c.num_trainable(50), 0);
    }
}
