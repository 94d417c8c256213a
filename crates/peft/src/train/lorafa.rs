//! LoRA-FA (PEFT's `peft.optimizers.create_lorafa_optimizer` / `LoraFAOptimizer`): LoRA's `A` frozen at its
//! initialisation, `B` trained with its gradient projected onto what a full fine-tune's update would be,
//!
//! `g_B ← (1/s²) · g_B · (A·Aᵀ + 1e-8·I)⁺`
//!
//! with `s` the layer's LoRA scaling (`lora_alpha / r`, or `/ √r` with rsLoRA, after `rank_pattern` /
//! `alpha_pattern`), then an Adam step in the Hugging Face `AdamW` form PEFT's optimizer is written in: moments
//! `m ← β1·m + (1 − β1)·g`, `v ← β2·v + (1 − β2)·g²`, `p ← p − lr·√(1 − β2ᵗ)/(1 − β1ᵗ) · m / (√v + eps)`, and
//! the decoupled weight decay after the step, `p ← p − lr·wd·p`. Parameters that are not LoRA's (a
//! `modules_to_save` copy, a trained bias) take that same Adam step with their own gradient.
//!
//! As PEFT 0.21.2 does on every machine where bf16 is available (any CPU, and every recent GPU), the projected
//! gradient is computed under bf16 autocast: `g_B` and the inverse are rounded to bf16, multiplied with f32
//! accumulation, and the product and its scaled value rounded to bf16 again, before the moments (f32) see it.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use indexmap::IndexMap;
//! use peft::train::lorafa::{LoraFa, LoraFaConfig, LoraFaProjection};
//! use peft::train::optim::Optimizer;
//!
//! # fn main() -> peft::Result<()> {
//! let dev = Device::Cpu;
//! let a = Tensor::new(&[[1.0f32, 0.0, 2.0], [0.0, 1.0, 0.0]], &dev)?; // [r = 2, in = 3], frozen
//! let b = Var::new(&[[0.5f32, -0.5], [1.0, 0.0]], &dev)?; // [out = 2, r = 2]
//! let mut projections = IndexMap::new();
//! projections.insert("lin.lora_B.weight".to_string(), LoraFaProjection { a, scaling: 2.0 });
//! let mut opt = LoraFa::new(
//!     vec![("lin.lora_B.weight".into(), b.clone())],
//!     projections,
//!     LoraFaConfig { lr: 1e-2, ..Default::default() },
//! )?;
//! let loss = b.as_tensor().sqr()?.sum_all()?;
//! opt.step(&loss.backward()?)?;
//! assert!(b.to_vec2::<f32>()?[0][0] < 0.5);
//! # Ok(()) }
//! ```

use super::optim::{
    Groups, OptimizerState, ParamGroup, check_hyper, check_kind, grad_f32, state_tensor, write_back,
};
use crate::train::optim::Optimizer;
use crate::{PeftError, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;
use serde_json::json;

/// Hyperparameters of [`LoraFa`]; the defaults are `LoraFAOptimizer`'s.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraFaConfig {
    /// Learning rate (1e-3).
    pub lr: f64,
    /// First-moment decay β1 (0.9).
    pub beta1: f64,
    /// Second-moment decay β2 (0.999).
    pub beta2: f64,
    /// Denominator epsilon, added to `√v` (1e-6).
    pub eps: f64,
    /// Decoupled weight decay, applied after the step (0).
    pub weight_decay: f64,
    /// Bias-correct the step size (`true`).
    pub correct_bias: bool,
}

impl Default for LoraFaConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            weight_decay: 0.0,
            correct_bias: true,
        }
    }
}

/// What LoRA-FA projects one `lora_B` gradient with: the layer's frozen `A` `[r, in]` and its LoRA scaling.
#[derive(Clone, Debug)]
pub struct LoraFaProjection {
    /// The layer's `lora_A` weight, frozen.
    pub a: Tensor,
    /// The layer's LoRA scaling `s` (the gradient is divided by `s²`).
    pub scaling: f64,
}

#[derive(Clone, Debug)]
struct FaState {
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// PEFT's `LoraFAOptimizer` (see the [module documentation](self)).
#[derive(Debug)]
pub struct LoraFa {
    config: LoraFaConfig,
    groups: Groups,
    projections: IndexMap<String, LoraFaProjection>,
    state: IndexMap<String, FaState>,
}

/// `t` rounded to bf16 and back (round to nearest even, as torch's autocast casts).
fn bf16(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::BF16)?.to_dtype(DType::F32)?)
}

/// The Moore–Penrose pseudo-inverse of a symmetric `n × n` matrix (row-major), by Jacobi's eigenvalue method
/// in f64; singular values below `n · ε(f32) · σ_max` are dropped, as `torch.linalg.pinv`'s default `rtol`.
pub fn symmetric_pinv(m: &[f64], n: usize) -> Vec<f64> {
    let mut a = m.to_vec();
    let mut v = vec![0.0f64; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j] * a[i * n + j])
            .sum();
        if off < 1e-300 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..n {
                    let akp = a[k * n + p];
                    let akq = a[k * n + q];
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let apk = a[p * n + k];
                    let aqk = a[q * n + k];
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for k in 0..n {
                    let vkp = v[k * n + p];
                    let vkq = v[k * n + q];
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let eig: Vec<f64> = (0..n).map(|i| a[i * n + i]).collect();
    let max = eig.iter().fold(0.0f64, |m, e| m.max(e.abs()));
    let cutoff = n as f64 * f32::EPSILON as f64 * max;
    let mut out = vec![0.0f64; n * n];
    for (k, &e) in eig.iter().enumerate() {
        if e.abs() <= cutoff || e == 0.0 {
            continue;
        }
        for i in 0..n {
            for j in 0..n {
                out[i * n + j] += v[i * n + k] * v[j * n + k] / e;
            }
        }
    }
    out
}

impl LoraFa {
    /// An optimizer over `params` (every trained parameter, `A`s excluded); each `lora_B` named in
    /// `projections` has its gradient projected with its layer's frozen `A` and scaling.
    pub fn new(
        params: Vec<(String, Var)>,
        projections: IndexMap<String, LoraFaProjection>,
        config: LoraFaConfig,
    ) -> Result<Self> {
        check_hyper("eps", config.eps)?;
        for (k, b) in [("beta1", config.beta1), ("beta2", config.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(PeftError::Invalid(format!(
                    "invalid LoRA-FA {k} = {b}: must be in [0, 1)"
                )));
            }
        }
        for (name, proj) in &projections {
            let Some((_, b)) = params.iter().find(|(n, _)| n == name) else {
                return Err(PeftError::Invalid(format!(
                    "LoRA-FA: the projected parameter `{name}` is not among the optimizer's parameters"
                )));
            };
            let (ad, bd) = (proj.a.dims(), b.dims());
            if ad.len() != 2 || bd.len() != 2 || ad[0] != bd[1] {
                return Err(PeftError::ShapeMismatch {
                    name: format!("LoRA-FA: lora_A of `{name}` (rank of lora_B {bd:?})"),
                    expected: vec![
                        bd.get(1).copied().unwrap_or(0),
                        ad.get(1).copied().unwrap_or(0),
                    ],
                    got: ad.to_vec(),
                });
            }
            if !proj.scaling.is_finite() || proj.scaling == 0.0 {
                return Err(PeftError::Invalid(format!(
                    "LoRA-FA: the scaling of `{name}` is {}, it must be finite and non-zero",
                    proj.scaling
                )));
            }
        }
        Ok(Self {
            groups: Groups::new(
                vec![ParamGroup::new(params)],
                config.lr,
                config.weight_decay,
            )?,
            config,
            projections,
            state: IndexMap::new(),
        })
    }

    /// The projected gradient of a `lora_B`: `bf16(bf16(bf16(g)·bf16((A·Aᵀ + 1e-8·I)⁺)) · (1/s²))`.
    pub fn project(grad: &Tensor, projection: &LoraFaProjection) -> Result<Tensor> {
        let a = projection.a.to_dtype(DType::F32)?;
        let r = a.dim(0)?;
        let aat: Vec<Vec<f32>> = a.matmul(&a.t()?)?.to_vec2()?;
        // AA_T + delta * torch.eye(r): the f32 sum, then torch.linalg.pinv.
        let m: Vec<f64> = (0..r * r)
            .map(|k| {
                let (i, j) = (k / r, k % r);
                let d = if i == j { 1e-8f32 } else { 0.0 };
                (aat[i][j] + d) as f64
            })
            .collect();
        let inv: Vec<f32> = symmetric_pinv(&m, r).iter().map(|&x| x as f32).collect();
        let inv = Tensor::from_vec(inv, (r, r), grad.device())?;
        let prod = bf16(&bf16(grad)?.matmul(&bf16(&inv)?)?)?;
        bf16(&prod.affine(1.0 / (projection.scaling * projection.scaling), 0.0)?)
    }

    /// The state of one parameter: its step count, `exp_avg` and `exp_avg_sq` (`None` before its first step).
    pub fn param_state(&self, name: &str) -> Option<(u64, &Tensor, &Tensor)> {
        self.state
            .get(name)
            .map(|s| (s.step, &s.exp_avg, &s.exp_avg_sq))
    }
}

impl Optimizer for LoraFa {
    fn kind(&self) -> &'static str {
        "lorafa"
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let LoraFaConfig {
            beta1,
            beta2,
            eps,
            correct_bias,
            ..
        } = self.config;
        for group in &self.groups.groups {
            let lr = self.groups.lr_of(group);
            let wd = self.groups.weight_decay_of(group);
            for (name, var) in &group.params {
                let Some(g) = grad_f32(name, var, grads)? else {
                    continue;
                };
                let g = match self.projections.get(name) {
                    Some(p) => Self::project(&g, p)?,
                    None => g,
                };
                let st = match self.state.get_mut(name) {
                    Some(st) => st,
                    None => {
                        let z = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                        self.state.entry(name.clone()).or_insert(FaState {
                            step: 0,
                            exp_avg: z.clone(),
                            exp_avg_sq: z,
                        })
                    }
                };
                st.step += 1;
                // exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                st.exp_avg = (st.exp_avg.affine(beta1, 0.0)? + g.affine(1.0 - beta1, 0.0)?)?;
                // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                st.exp_avg_sq =
                    (st.exp_avg_sq.affine(beta2, 0.0)? + g.affine(1.0 - beta2, 0.0)?.mul(&g)?)?;
                let denom = st.exp_avg_sq.sqrt()?.affine(1.0, eps)?;
                let mut step_size = lr;
                if correct_bias {
                    let t = st.step as f64;
                    step_size = step_size * (1.0 - beta2.powf(t)).sqrt() / (1.0 - beta1.powf(t));
                }
                let p = var.as_tensor().to_dtype(DType::F32)?;
                // p.addcdiv_(exp_avg, denom, value=-step_size)
                let mut p = (st.exp_avg.div(&denom)?.affine(-step_size, 0.0)? + p)?;
                if wd > 0.0 {
                    // p.add_(p, alpha=-lr * weight_decay)
                    p = (p.affine(-lr * wd, 0.0)? + &p)?;
                }
                write_back(var, &p)?;
            }
        }
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.groups.lr * self.groups.factor
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.groups.lr = lr;
        self.groups.factor = 1.0;
    }

    fn lr_factor(&self) -> f64 {
        self.groups.factor
    }

    fn set_lr_factor(&mut self, factor: f64) {
        self.groups.factor = factor;
    }

    fn group_learning_rates(&self) -> Vec<f64> {
        self.groups
            .groups
            .iter()
            .map(|g| self.groups.lr_of(g))
            .collect()
    }

    fn params(&self) -> Vec<(String, Var)> {
        self.groups.params()
    }

    fn state(&self) -> Result<OptimizerState> {
        let mut tensors = IndexMap::new();
        let mut steps = serde_json::Map::new();
        for (name, st) in &self.state {
            tensors.insert(format!("exp_avg.{name}"), st.exp_avg.clone());
            tensors.insert(format!("exp_avg_sq.{name}"), st.exp_avg_sq.clone());
            steps.insert(name.clone(), json!(st.step));
        }
        let mut meta = self.groups.meta();
        meta["steps"] = serde_json::Value::Object(steps);
        Ok(OptimizerState {
            kind: self.kind().into(),
            tensors,
            meta,
        })
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        check_kind(state, self.kind())?;
        let steps = state.meta["steps"]
            .as_object()
            .ok_or_else(|| PeftError::Json {
                context: "optimizer state".into(),
                message: "missing object `steps`".into(),
            })?;
        let mut new_state = IndexMap::new();
        for (name, step) in steps {
            let var = self.groups.find(name).ok_or_else(|| {
                PeftError::Invalid(format!(
                    "optimizer state holds parameter `{name}`, which this optimizer does not have"
                ))
            })?;
            let step = step.as_u64().ok_or_else(|| PeftError::Json {
                context: "optimizer state".into(),
                message: format!("step of `{name}` is not an unsigned integer"),
            })?;
            new_state.insert(
                name.clone(),
                FaState {
                    step,
                    exp_avg: state_tensor(state, &format!("exp_avg.{name}"), name, var)?,
                    exp_avg_sq: state_tensor(state, &format!("exp_avg_sq.{name}"), name, var)?,
                },
            );
        }
        self.groups.load_meta(&state.meta)?;
        self.state = new_state;
        Ok(())
    }
}

/// What [`split_lora_params`] returns: the parameters to train, and the projection of each `lora_B` by name.
pub type LoraFaSplit = (Vec<(String, Var)>, IndexMap<String, LoraFaProjection>);

/// Splits a LoRA adapter's trainable parameters (as [`crate::PeftModel::trainable_vars`] names them) for
/// LoRA-FA: every `….lora_A.weight` is frozen and becomes the projection of its `….lora_B.weight`, with the
/// scaling `scaling_of(module)` gives; the rest stays trained. Returns the parameters to train and the
/// projections.
///
/// PEFT pairs `A` and `B` by their order among the model's parameters, which any other LoRA parameter breaks
/// (it would be paired with the next layer's `A`): DoRA's `lora_magnitude_vector`, `lora_bias`'s `lora_B.bias`
/// and Embedding LoRA (`lora_embedding_A/B`, whose `A` PEFT does not freeze) are refused here, as is a
/// convolution's 4-D `A` (PEFT's `A @ A.T` fails on it).
pub fn split_lora_params(
    params: Vec<(String, Var)>,
    scaling_of: impl Fn(&str) -> Option<f64>,
) -> Result<LoraFaSplit> {
    const A: &str = ".lora_A.weight";
    const B: &str = ".lora_B.weight";
    let refuse = |name: &str, what: &str| {
        Err(PeftError::Invalid(format!(
            "LoRA-FA: `{name}` is {what}, which PEFT's LoRA-FA optimizer pairs with the wrong lora_A; train it \
             with another optimizer"
        )))
    };
    let mut a_of = IndexMap::new();
    for (name, var) in &params {
        if name.ends_with("lora_magnitude_vector") {
            return refuse(name, "DoRA's magnitude (use_dora)");
        }
        if name.ends_with(".lora_B.bias") {
            return refuse(name, "a LoRA bias (lora_bias)");
        }
        if name.ends_with("lora_embedding_A") || name.ends_with("lora_embedding_B") {
            return refuse(name, "an Embedding LoRA weight");
        }
        if let Some(module) = name.strip_suffix(A) {
            if var.dims().len() != 2 {
                return refuse(name, "a convolution's LoRA weight");
            }
            a_of.insert(module.to_string(), var.as_tensor().clone());
        }
    }
    let mut keep = Vec::new();
    let mut projections = IndexMap::new();
    for (name, var) in params {
        if name.ends_with(A) {
            continue;
        }
        if let Some(module) = name.strip_suffix(B) {
            let a = a_of.get(module).cloned().ok_or_else(|| {
                PeftError::Invalid(format!(
                    "LoRA-FA: `{name}` has no `{module}{A}` among the trained parameters"
                ))
            })?;
            let scaling = scaling_of(module).ok_or_else(|| {
                PeftError::Invalid(format!("LoRA-FA: no LoRA scaling for module `{module}`"))
            })?;
            projections.insert(name.clone(), LoraFaProjection { a, scaling });
        }
        keep.push((name, var));
    }
    if projections.is_empty() {
        return Err(PeftError::Invalid(
            "LoRA-FA needs a LoRA adapter: no `….lora_B.weight` among the trained parameters"
                .into(),
        ));
    }
    Ok((keep, projections))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pinv_inverts_and_drops_null_directions() {
        // [[4, 2], [2, 3]]⁻¹ = [[3, -2], [-2, 4]] / 8
        let inv = symmetric_pinv(&[4.0, 2.0, 2.0, 3.0], 2);
        for (x, e) in inv.iter().zip([3.0 / 8.0, -0.25, -0.25, 0.5]) {
            assert!((x - e).abs() < 1e-12, "{inv:?}");
        }
        // Rank one: [[1, 1], [1, 1]]⁺ = [[1, 1], [1, 1]] / 4.
        let inv = symmetric_pinv(&[1.0, 1.0, 1.0, 1.0], 2);
        for x in inv {
            assert!((x - 0.25).abs() < 1e-12);
        }
    }
}
