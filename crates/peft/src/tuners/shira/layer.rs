//! The SHiRA adapter for Linear layers (PEFT's `tuners/shira/layer.py`).
//!
//! Tensors per layer: `shira_weight` `[k]` (trained) and `shira_indices` `[2, k]` (int32 row and column of each
//! value; PEFT saves them as float32 on Windows, which loads too), `k = r·(in + out)`. A new adapter's positions
//! are PEFT's random mask: the first `k` entries of `torch.randperm(out·in)` drawn from `random_seed` (the
//! default generator's seed when null), ordered row-major as `torch.where(mask == 1)` lists them. The update
//! `ΔW = scatter(shira_weight at shira_indices)` (PEFT's `sparse_coo_tensor`: a repeated position adds up) is
//! additive: the forward adds `x·ΔWᵀ` to the base output (PEFT computes `F.linear(x, W₀ + ΔW, b)`, the same up
//! to rounding), several active adapters add their updates, merging adds `ΔW`, weighted merges (`DIR@W`) scale
//! it.

use super::config::ShiraConfig;
use crate::layer::{Adapter, BaseKind, BaseLayer, CallCtx, NamedTensor, check_shape};
use crate::tuners::fourierft::randperm::randperm_prefix;
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Device, Tensor, Var};
use indexmap::IndexMap;

/// `shira_weight`.
pub const WEIGHT: &str = "shira_weight";
/// `shira_indices` (int32 `[2, k]`).
pub const INDICES: &str = "shira_indices";

/// The parameter names of SHiRA's tensors in a file.
pub const PARAM_PREFIXES: &[&str] = &[WEIGHT, INDICES];

/// The integer tensors SHiRA writes (admitted by name by the adapter-file checks).
pub const INTEGER_TENSORS: &[&str] = &[INDICES];

/// One SHiRA adapter inside one Linear layer (an f32 `Var`; the dtype it was created or loaded in is kept for
/// saving).
#[derive(Debug)]
pub struct ShiraAdapter {
    n_out: usize,
    n_in: usize,
    /// `(row, column)` of each value, as in the file.
    rows_cols: Vec<(u32, u32)>,
    /// The flat positions `row·in + column`, u32 `[k]`, for the scatter.
    flat: Tensor,
    weight: Var,
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
            reason: "SHiRA supports only plain Linear layers (as PEFT: torch.nn.Linear)".into(),
        });
    }
    Ok((base.out_features(), base.in_features()))
}

fn check_k(config: &ShiraConfig, n_out: usize, n_in: usize) -> Result<usize> {
    if config.r == 0 {
        return Err(PeftError::InvalidConfig(
            "SHiRA: `r` should be a positive integer value but the value passed is 0".into(),
        ));
    }
    let k = config.num_trainable(n_out, n_in);
    if k > n_out * n_in {
        return Err(PeftError::InvalidConfig(format!(
            "SHiRA: the set rank {} results in more shira params than the total number of params in the base \
             layer {} and this is not allowed.",
            config.r,
            n_out * n_in
        )));
    }
    Ok(k)
}

/// PEFT's `random_mask` as positions: the first `k` entries of `torch.randperm(n_out·n_in)` from `seed`, as
/// `(row, column)` pairs in row-major order (`torch.where` of the mask).
pub fn random_positions(n_out: usize, n_in: usize, k: usize, seed: u64) -> Result<Vec<(u32, u32)>> {
    let mut flat = randperm_prefix((n_out * n_in) as u64, k, seed)?;
    flat.sort_unstable();
    Ok(flat
        .into_iter()
        .map(|p| ((p / n_in as u64) as u32, (p % n_in as u64) as u32))
        .collect())
}

/// Integer values of an index tensor of any integer dtype, or of a float one holding whole numbers (PEFT's
/// Windows files).
fn index_values(t: &Tensor) -> Result<Vec<i64>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::I32 => t.to_vec1::<i32>()?.into_iter().map(i64::from).collect(),
        DType::I64 => t.to_vec1::<i64>()?,
        DType::U32 => t.to_vec1::<u32>()?.into_iter().map(i64::from).collect(),
        DType::I16 => t.to_vec1::<i16>()?.into_iter().map(i64::from).collect(),
        DType::U8 => t.to_vec1::<u8>()?.into_iter().map(i64::from).collect(),
        DType::F32 | DType::F64 | DType::F16 | DType::BF16 => {
            let v = t.to_dtype(DType::F64)?.to_vec1::<f64>()?;
            let mut out = Vec::with_capacity(v.len());
            for (i, x) in v.into_iter().enumerate() {
                if x.fract() != 0.0 || !x.is_finite() || x.abs() > 2f64.powi(31) {
                    return Err(PeftError::Invalid(format!(
                        "{INDICES}: entry {i} is {x}, not a position"
                    )));
                }
                out.push(x as i64);
            }
            out
        }
        other => {
            return Err(PeftError::Invalid(format!(
                "{INDICES} is {other:?}; SHiRA's indices are integers (int32)"
            )));
        }
    })
}

impl ShiraAdapter {
    fn assemble(
        n_out: usize,
        n_in: usize,
        rows_cols: Vec<(u32, u32)>,
        weight: &Tensor,
        saved_dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let flat: Vec<u32> = rows_cols
            .iter()
            .map(|&(r, c)| r * n_in as u32 + c)
            .collect();
        Ok(Self {
            n_out,
            n_in,
            flat: Tensor::from_vec(flat, rows_cols.len(), dev)?,
            rows_cols,
            weight: Var::from_tensor(&weight.to_dtype(DType::F32)?)?,
            saved_dtype,
        })
    }

    /// A freshly initialised adapter: PEFT's random mask, zero values (`init_weights`; else N(0, 1)).
    pub fn new(base: &BaseLayer, config: &ShiraConfig, rng: &mut PeftRng) -> Result<Self> {
        let (n_out, n_in) = dims(base)?;
        if config.mask_type != "random" {
            return Err(PeftError::Unsupported {
                field: "mask_type".into(),
                value: config.mask_type.clone(),
                reason: "a new SHiRA adapter takes PEFT's random mask only (another mask type is a Python \
                         function set on the config); an adapter of any mask type loads from its file"
                    .into(),
            });
        }
        let k = check_k(config, n_out, n_in)?;
        let positions = random_positions(n_out, n_in, k, config.mask_seed())?;
        let dev = base.device();
        let w = if config.init_weights {
            Tensor::zeros(k, DType::F32, dev)?
        } else {
            rng.normal_tensor(k, 0.0, 1.0, DType::F32, dev)?
        };
        Self::assemble(n_out, n_in, positions, &w, DType::F32, dev)
    }

    /// An adapter from tensors as PEFT saves them (keys relative to the module, adapter name stripped):
    /// `shira_weight` `[r·(in + out)]` and `shira_indices` `[2, r·(in + out)]` (rows below `out`, columns below
    /// `in`).
    pub fn from_tensors(
        base: &BaseLayer,
        config: &ShiraConfig,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        let (n_out, n_in) = dims(base)?;
        let k = check_k(config, n_out, n_in)?;
        let get = |key: &str, shape: &[usize]| -> Result<&Tensor> {
            let t = tensors
                .get(key)
                .ok_or_else(|| PeftError::MissingKey(key.to_string()))?;
            check_shape(key, t, shape)?;
            Ok(t)
        };
        let weight = get(WEIGHT, &[k])?;
        let idx = index_values(get(INDICES, &[2, k])?)?;
        let extra: Vec<String> = tensors
            .keys()
            .filter(|key| !PARAM_PREFIXES.contains(&key.as_str()))
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        let mut rows_cols = Vec::with_capacity(k);
        for i in 0..k {
            let (r, c) = (idx[i], idx[k + i]);
            if r < 0 || r as usize >= n_out || c < 0 || c as usize >= n_in {
                return Err(PeftError::Invalid(format!(
                    "{INDICES}[:, {i}] = ({r}, {c}) is outside the [{n_out}, {n_in}] weight"
                )));
            }
            rows_cols.push((r as u32, c as u32));
        }
        Self::assemble(
            n_out,
            n_in,
            rows_cols,
            weight,
            weight.dtype(),
            base.device(),
        )
    }

    /// `ΔW` `[out, in]`, dense (differentiable in the values).
    pub fn delta(&self) -> Result<Tensor> {
        let w = self.weight.as_tensor();
        let zeros = Tensor::zeros(self.n_out * self.n_in, DType::F32, w.device())?;
        Ok(zeros
            .index_add(&self.flat, w, 0)?
            .reshape((self.n_out, self.n_in))?)
    }

    /// The `(row, column)` of each trained value, as saved.
    pub fn positions(&self) -> &[(u32, u32)] {
        &self.rows_cols
    }
}

impl Adapter for ShiraAdapter {
    fn peft_type(&self) -> &'static str {
        "SHIRA"
    }

    fn transform_output(
        &self,
        _base: &BaseLayer,
        x: &Tensor,
        result: Tensor,
        _ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let lead = x.dims()[..x.rank() - 1].to_vec();
        let rows = x.elem_count() / self.n_in.max(1);
        let h = x
            .reshape((rows, self.n_in))?
            .matmul(&self.delta()?.t()?)?;
        let mut shape = lead;
        shape.push(self.n_out);
        Ok((result.to_dtype(DType::F32)? + h.reshape(shape)?)?)
    }

    fn delta_weight(&self, kind: &BaseKind) -> Result<Option<(Tensor, Option<Tensor>)>> {
        if !matches!(kind, BaseKind::Linear) {
            return Err(PeftError::Invalid(format!(
                "SHiRA adapter merged into a {kind:?} layer"
            )));
        }
        Ok(Some((self.delta()?, None)))
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        let k = self.rows_cols.len();
        let idx: Vec<i32> = self
            .rows_cols
            .iter()
            .map(|&(r, _)| r as i32)
            .chain(self.rows_cols.iter().map(|&(_, c)| c as i32))
            .collect();
        let mut v = Vec::new();
        if let Ok(t) = Tensor::from_vec(idx, (2, k), self.flat.device()) {
            v.push((INDICES.to_string(), t));
        }
        v.push((WEIGHT.to_string(), self.weight.as_tensor().clone()));
        v
    }

    fn vars(&self) -> Vec<(String, Var)> {
        vec![(WEIGHT.to_string(), self.weight.clone())]
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        format!(
            "shira {} of {} entries",
            self.rows_cols.len(),
            self.n_out * self.n_in
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_distinct_sorted_and_in_range() {
        let p = random_positions(24, 16, 80, 7).unwrap();
        assert_eq!(p.len(), 80);
        let flat: Vec<u32> = p.iter().map(|&(r, c)| r * 16 + c).collect();
        assert!(flat.windows(2).all(|w| w[0] < w[1]));
        assert!(p.iter().all(|&(r, c)| r < 24 && c < 16));
    }

    #[test]
    fn float_indices_must_be_whole() {
        let t = Tensor::new(&[1.0f32, 2.5], &Device::Cpu).unwrap();
        assert!(index_values(&t).is_err());
        let t = Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        assert_eq!(index_values(&t).unwrap(), vec![1, 2]);
    }
}
