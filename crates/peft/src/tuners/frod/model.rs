//! FRoD's hooks (PEFT's `FrodModel`): one basis `V` and one set of sparse positions per *category* of
//! targeted layers (the same role in every block, `_category_from_key`), shared by those layers and saved with
//! the adapter (`base_model.frod_V.<category>`, `base_model.frod_s_indices.<category>`,
//! `base_model.frod_s_size.<category>`).

use super::config::FrodConfig;
use super::layer::{FrodAdapter, LAMBDA_L, LAMBDA_S_VALUES, PARAM_PREFIXES, Projection};
use crate::layer::base::logical_weight;
use crate::config::common::{TargetModules, TargetSpec};
use crate::layer::{Adapter, BaseKind, BaseLayer, check_shape};
use crate::tuners::fourierft::randperm::randperm_prefix_continuing;
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TargetLayer, TensorInfo};
use crate::tuners::vera::prng::Mt19937;
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use std::collections::BTreeMap;

const V_PREFIX: &str = "base_model.frod_V.";
const INDICES_PREFIX: &str = "base_model.frod_s_indices.";
const SIZE_PREFIX: &str = "base_model.frod_s_size.";

/// PEFT's `_category_from_key`: the role of a module, from the last components of its dotted name
/// (`model.layers.0.self_attn.q_proj` → `self_attn_q_proj`; `h.0.c_attn`-style keys after a number keep the
/// last component; BERT's `attention.output.dense` → `attention_output`).
///
/// ```
/// use peft::tuners::frod::model::category_from_key;
/// assert_eq!(category_from_key("model.layers.3.self_attn.q_proj"), "self_attn_q_proj");
/// assert_eq!(category_from_key("transformer.h.0.c_attn"), "c_attn");
/// assert_eq!(category_from_key("encoder.layer.0.attention.output.dense"), "attention_output");
/// assert_eq!(category_from_key("lin0"), "lin0");
/// ```
pub fn category_from_key(key: &str) -> String {
    let parts: Vec<&str> = key.split('.').collect();
    let n = parts.len();
    if n == 1 {
        return parts[0].to_string();
    }
    if !parts[n - 2].is_empty() && parts[n - 2].chars().all(|c| c.is_ascii_digit()) {
        return parts[n - 1].to_string();
    }
    let category = format!("{}_{}", parts[n - 2], parts[n - 1]);
    if category == "output_dense" && n >= 3 && parts[n - 3] == "attention" {
        return "attention_output".into();
    }
    category
}

/// PEFT's `_layer_index_from_key`: the number after a `layers` component, else the first numeric component,
/// else `fallback`.
fn layer_index_from_key(key: &str, fallback: usize) -> usize {
    let parts: Vec<&str> = key.split('.').collect();
    if let Some(p) = parts.iter().position(|p| *p == "layers")
        && let Some(i) = parts.get(p + 1).and_then(|s| s.parse().ok())
    {
        return i;
    }
    parts
        .iter()
        .find_map(|p| {
            (!p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
                .then(|| p.parse().ok())
                .flatten()
        })
        .unwrap_or(fallback)
}

/// A row-major `[rows, cols]` f64 matrix as faer's.
fn mat(v: &[f64], rows: usize, cols: usize) -> faer::Mat<f64> {
    faer::Mat::<f64>::from_fn(rows, cols, |i, j| v[i * cols + j])
}

/// PEFT's `_projection_from_weights` (in f64): the stacked weights `[Σ out, in]`; fewer rows than columns:
/// `V` the right singular vectors (full); otherwise the reduced QR `Q·R`, `T = mean_l (Q_lᵀQ_l + α·I)⁻¹` over
/// the layers' row blocks, and `V = Rᵀ·E` for `T`'s eigenvectors `E` (ascending eigenvalues). A fresh basis
/// equals PEFT's up to the signs of its columns (the SVD's and the eigensolver's), which is why FRoD's basis
/// is always saved here.
pub fn projection_from_weights(matrices: &[Tensor], alpha: f64) -> Result<Tensor> {
    use faer::linalg::solvers::DenseSolveCore;
    let inp = matrices[0].dim(1)?;
    let device = matrices[0].device().clone();
    let stacked = Tensor::cat(matrices, 0)?.to_dtype(DType::F32)?;
    let rows = stacked.dim(0)?;
    let values = stacked.flatten_all()?.to_vec1::<f32>()?;
    let v: Vec<f64> = if rows < inp {
        let m = mat(
            &values.iter().map(|&x| f64::from(x)).collect::<Vec<_>>(),
            rows,
            inp,
        );
        let svd = m
            .svd()
            .map_err(|e| PeftError::Invalid(format!("FRoD: the SVD did not converge: {e:?}")))?;
        let vm = svd.V();
        (0..inp * inp).map(|k| vm[(k / inp, k % inp)]).collect()
    } else {
        let (q, r) = crate::tuners::lora::rewrite_init::householder_qr(&values, rows, inp);
        let mut t = faer::Mat::<f64>::zeros(inp, inp);
        let mut start = 0;
        for m in matrices {
            let n = m.dim(0)?;
            let qs = mat(&q[start * inp..(start + n) * inp], n, inp);
            start += n;
            let mut term = qs.transpose() * &qs;
            for i in 0..inp {
                term[(i, i)] += alpha;
            }
            t += term.partial_piv_lu().inverse();
        }
        t *= faer::Scale(1.0 / matrices.len() as f64);
        let eig = t
            .self_adjoint_eigen(faer::Side::Lower)
            .map_err(|e| PeftError::Invalid(format!("FRoD: the eigensolver failed: {e:?}")))?;
        let e = eig.U();
        let rm = mat(&r, inp, inp);
        let v = rm.transpose() * e;
        (0..inp * inp).map(|k| v[(k / inp, k % inp)]).collect()
    };
    let v: Vec<f32> = v.iter().map(|&x| x as f32).collect();
    Ok(Tensor::from_vec(v, (inp, inp), &device)?)
}

impl FrodConfig {
    /// The number of trained entries of `S` for a basis of size `n` (PEFT's `nnz`):
    /// `min(⌊n²·sparse_rate⌋, n² − n)`, at least 1 when `sparse_rate > 0` and `n > 1`.
    pub fn nnz(&self, n: usize) -> usize {
        let off = n * n - n;
        let mut k = ((n * n) as f64 * self.sparse_rate) as usize;
        k = k.min(off);
        if self.sparse_rate > 0.0 && off > 0 {
            k = k.max(1);
        }
        k
    }

    /// Every category's fresh shared tensors (PEFT's `_init_frod_projections`): its basis from the targets'
    /// base weights ([`projection_from_weights`] over the layers in block order), and `nnz` positions off
    /// `S`'s diagonal drawn by torch's `randperm` from one generator seeded with `projection_prng_key`,
    /// categories in sorted order.
    pub fn new_projections(&self, targets: &[TargetLayer]) -> Result<SharedTensors> {
        let mut by_category: BTreeMap<String, BTreeMap<usize, Tensor>> = BTreeMap::new();
        for (i, t) in targets.iter().enumerate() {
            let w = t.base.as_ref().and_then(target_weight).ok_or_else(|| {
                PeftError::Invalid(format!(
                    "FRoD builds its bases from the base weights; `{}` has none here",
                    t.module
                ))
            })?;
            by_category
                .entry(category_from_key(&t.module))
                .or_default()
                .insert(layer_index_from_key(&t.module, i), w.clone());
        }
        let mut g = Mt19937::new(self.projection_prng_key as u64);
        let mut shared = SharedTensors::new();
        for (category, layers) in by_category {
            let matrices: Vec<Tensor> = layers.into_values().collect();
            let v = projection_from_weights(&matrices, self.regularization_alpha)?;
            let n = v.dim(0)?;
            let off = (n * n - n) as u64;
            let k = self.nnz(n);
            let picks = if k > 0 {
                randperm_prefix_continuing(off, k, &mut g)?
            } else {
                Vec::new()
            };
            // the off-diagonal positions in row-major order, the p-th of them
            let (mut rows, mut cols) = (Vec::with_capacity(k), Vec::with_capacity(k));
            for p in picks {
                let (r, c) = ((p / (n as u64 - 1)) as i64, (p % (n as u64 - 1)) as i64);
                rows.push(r);
                cols.push(if c >= r { c + 1 } else { c });
            }
            rows.extend(cols);
            let dev = v.device().clone();
            shared.insert(format!("{V_PREFIX}{category}"), v);
            shared.insert(
                format!("{INDICES_PREFIX}{category}"),
                Tensor::from_vec(rows, (2, k), &dev)?,
            );
            shared.insert(
                format!("{SIZE_PREFIX}{category}"),
                Tensor::from_vec(vec![n as i64, n as i64], 2, &dev)?,
            );
        }
        Ok(shared)
    }
}

/// Why a new FRoD adapter is not created here.
const FRESH_REFUSED: &str = "a new FRoD adapter cannot be created by peft-rs: PEFT recomputes every basis V \
     from the base weights when it loads an adapter (float32 QR, inverses and a symmetric eigendecomposition \
     whose eigenvectors are not unique) and builds U from its own V before it reads the saved one, so only \
     bases PEFT computed itself load back with the same outputs. Create the adapter with PEFT \
     (get_peft_model + save_pretrained) and train it here with `peft train --init-adapter DIR`, or load it";

/// The integers of an int64 (or other integer) tensor.
fn ints(name: &str, t: &Tensor) -> Result<Vec<i64>> {
    match t.dtype() {
        DType::I64 => Ok(t.flatten_all()?.to_vec1::<i64>()?),
        DType::U32 => Ok(t
            .flatten_all()?
            .to_vec1::<u32>()?
            .into_iter()
            .map(i64::from)
            .collect()),
        other => Err(PeftError::Invalid(format!(
            "`{name}` is {other:?}; FRoD's positions are integers (int64)"
        ))),
    }
}

/// The [`Projection`] of `category` among the shared tensors, checked.
fn projection(shared: &SharedTensors, category: &str) -> Result<Projection> {
    if shared.is_empty() {
        return Err(PeftError::Invalid(
            "FROD layers share per-category bases: build them with `build_adapter_with_shared` / \
             `new_adapter_with_shared` and the tensors of `shared_tensors`"
                .into(),
        ));
    }
    let key = |p: &str| format!("{p}{category}");
    let get = |p: &str| {
        shared
            .get(&key(p))
            .ok_or_else(|| PeftError::MissingKey(key(p)))
    };
    let v = get(V_PREFIX)?;
    let n = v.dim(0).unwrap_or(0);
    check_shape(&key(V_PREFIX), v, &[n, n])?;
    if !v.dtype().is_float() {
        return Err(PeftError::Invalid(format!(
            "`{}` is {:?}; the basis is floating point",
            key(V_PREFIX),
            v.dtype()
        )));
    }
    let size = ints(&key(SIZE_PREFIX), get(SIZE_PREFIX)?)?;
    if size != [n as i64, n as i64] {
        return Err(PeftError::Invalid(format!(
            "`{}` is {size:?}, not the basis's [{n}, {n}]",
            key(SIZE_PREFIX)
        )));
    }
    let idx = get(INDICES_PREFIX)?;
    let k = idx.dim(1).unwrap_or(0);
    check_shape(&key(INDICES_PREFIX), idx, &[2, k])?;
    let flat = ints(&key(INDICES_PREFIX), idx)?;
    let mut positions = Vec::with_capacity(k);
    for j in 0..k {
        let (r, c) = (flat[j], flat[k + j]);
        if r < 0 || c < 0 || r as usize >= n || c as usize >= n {
            return Err(PeftError::Invalid(format!(
                "`{}`: position ({r}, {c}) is outside the [{n}, {n}] matrix S",
                key(INDICES_PREFIX)
            )));
        }
        positions.push((r as usize * n + c as usize) as u32);
    }
    let mut sorted = positions.clone();
    sorted.sort_unstable();
    if sorted.windows(2).any(|w| w[0] == w[1]) {
        return Err(PeftError::Invalid(format!(
            "`{}` names a position twice",
            key(INDICES_PREFIX)
        )));
    }
    Ok(Projection {
        v: v.clone(),
        positions: Tensor::from_vec(positions, k, v.device())?,
        indices: idx.clone(),
    })
}

impl PeftMethod for FrodConfig {
    fn validate(&self) -> Result<()> {
        FrodConfig::validate(self)
    }

    fn modules_to_save(&self) -> Option<&[String]> {
        self.modules_to_save.as_deref()
    }

    fn target_spec(&self) -> Option<TargetSpec<'_>> {
        Some(FrodConfig::target_spec(self))
    }

    fn set_target_modules(&mut self, targets: Option<TargetModules>) {
        self.target_modules = targets;
    }

    /// VeRA's table (PEFT copies it for FRoD, with `vit`).
    fn default_target_modules(&self, model_type: &str) -> Option<TargetModules> {
        if model_type == "phi" || model_type == "vit" {
            let names: &[&str] = if model_type == "vit" {
                &["query", "value"]
            } else {
                &["q_proj", "v_proj"]
            };
            return Some(crate::tuners::constants::TargetDefault::List(names).to_target_modules());
        }
        crate::tuners::constants::lookup(crate::tuners::constants::LORA_TARGET_MODULES, model_type)
    }

    fn fan_in_fan_out(&self) -> bool {
        self.fan_in_fan_out
    }

    fn param_prefixes(&self) -> Result<&'static [&'static str]> {
        Ok(PARAM_PREFIXES)
    }

    /// The file's bases and positions (every category of the targets must be there). A fresh adapter
    /// (`None`) is refused: its bases ([`FrodConfig::new_projections`]) would not be PEFT's, and PEFT builds
    /// `U` from the bases it recomputes, not from the saved ones.
    fn shared_tensors(
        &self,
        file_shared: Option<&SharedTensors>,
        targets: &[TargetLayer],
        _device: &Device,
    ) -> Result<SharedTensors> {
        let Some(f) = file_shared else {
            return Err(PeftError::Invalid(FRESH_REFUSED.into()));
        };
        let known = |k: &str| {
            [V_PREFIX, INDICES_PREFIX, SIZE_PREFIX]
                .iter()
                .any(|p| k.starts_with(p))
        };
        let extra: Vec<String> = f.keys().filter(|k| !known(k)).cloned().collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        for t in targets {
            projection(f, &category_from_key(&t.module))?;
        }
        Ok(f.clone())
    }

    fn shares_tensors(&self) -> bool {
        true
    }

    /// PEFT saves the bases and positions (`save_projection`, the only form supported).
    fn saves_shared(&self) -> bool {
        true
    }

    fn build_adapter(
        &self,
        module: &str,
        base: &BaseLayer,
        tensors: &IndexMap<String, Tensor>,
        shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        let p = projection(shared, &category_from_key(module))?;
        Ok(Box::new(FrodAdapter::from_tensors(base, self, &p, tensors)?))
    }

    fn new_adapter(
        &self,
        module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        let p = projection(shared, &category_from_key(module))?;
        Ok(Box::new(FrodAdapter::new(base, self, &p, rng)?))
    }

    /// Linear (`[out, in]`) or GPT-2 Conv1D (`[in, out]`) from `frod_lambda_l` `[in]` and `fan_in_fan_out`.
    fn infer_kind(
        &self,
        _module: &str,
        params: &IndexMap<String, Tensor>,
        wshape: &[usize],
    ) -> Result<BaseKind> {
        if wshape.len() != 2 {
            return Err(PeftError::Invalid(format!(
                "FRoD merges into Linear or Conv1D weights only, got a weight of shape {wshape:?}"
            )));
        }
        let i = params.get(LAMBDA_L).and_then(|t| t.dims().first().copied());
        Ok(match i {
            Some(i) if wshape[0] == i && (wshape[1] != i || self.fan_in_fan_out) => BaseKind::Conv1D,
            _ => BaseKind::Linear,
        })
    }

    /// The size of the basis and the number of trained entries of `S`.
    fn summarize_module(&self, _module: &str, tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        let n = tensors
            .iter()
            .find(|t| t.name == LAMBDA_L)
            .and_then(|t| t.shape.first().copied());
        let k = tensors
            .iter()
            .find(|t| t.name == LAMBDA_S_VALUES)
            .and_then(|t| t.shape.first().copied());
        let mut flags = Vec::new();
        if let Some(n) = n {
            flags.push(format!("basis={n}x{n}"));
        }
        if let Some(k) = k {
            flags.push(format!("sparse={k}"));
        }
        ModuleSummary {
            flags,
            ..Default::default()
        }
    }
}

/// The base weight of a target, `[out, in]`.
fn target_weight(base: &BaseLayer) -> Option<Tensor> {
    base.weight()
        .ok()
        .and_then(|w| logical_weight(base.kind(), &w).ok())
}
