//! Optimizers with PyTorch's exact update rules: [`AdamW`] (`torch.optim.AdamW`) and [`Sgd`]
//! (`torch.optim.SGD`), over parameter groups.
//!
//! Both follow torch's single-tensor (`foreach=False`) code path operation for operation, in f32, so a
//! trajectory matches torch's to a few ulps (checked against fixtures written by torch in
//! `fixtures/train/gen_train.py`). As in torch:
//!
//! - a parameter without a gradient in a step (absent from the [`GradStore`]) is skipped: its state and its
//!   AdamW step count do not advance;
//! - state exists only for parameters that have had a gradient, and only for the parameters the optimizer
//!   was given; it is f32 whatever the parameter's dtype (a bf16 parameter is updated in f32 and rounded
//!   once);
//! - each group's learning rate is its initial learning rate times the schedule multiplier
//!   ([`Optimizer::set_lr_factor`]), as `LambdaLR` sets `lr = initial_lr · λ(step)`.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use peft::train::optim::{AdamW, AdamWConfig, Optimizer, ParamGroup};
//!
//! # fn main() -> peft::Result<()> {
//! let w = Var::new(&[1.0f32, -2.0], &Device::Cpu)?;
//! let b = Var::new(&[0.5f32], &Device::Cpu)?;
//! let groups = vec![
//!     ParamGroup::new(vec![("w".into(), w.clone())]),
//!     // B gets 4x the learning rate and no weight decay (LoRA+ style).
//!     ParamGroup::new(vec![("b".into(), b.clone())]).lr_scale(4.0).weight_decay(0.0),
//! ];
//! let mut opt = AdamW::new(groups, AdamWConfig { lr: 1e-2, ..Default::default() })?;
//! let loss = (w.as_tensor().sqr()?.sum_all()? + b.as_tensor().sum_all()?)?;
//! opt.step(&loss.backward()?)?;
//! assert_eq!(opt.group_learning_rates(), vec![1e-2, 4e-2]);
//! assert!(w.to_vec1::<f32>()?[0] < 1.0);
//! # Ok(()) }
//! ```

use crate::{PeftError, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;
use serde_json::json;
use std::collections::HashSet;

/// A group of parameters sharing a learning rate and a weight decay (torch's `param_groups` entry).
#[derive(Clone, Debug)]
pub struct ParamGroup {
    /// The parameters, each with a name unique across all groups (used for state and checkpoints).
    pub params: Vec<(String, Var)>,
    /// This group's own initial learning rate; `None` uses the optimizer's.
    pub lr: Option<f64>,
    /// A multiplier of the group's initial learning rate (1 by default).
    pub lr_scale: f64,
    /// This group's weight decay; `None` uses the optimizer's.
    pub weight_decay: Option<f64>,
}

impl ParamGroup {
    /// A group that follows the optimizer's learning rate and weight decay.
    pub fn new(params: Vec<(String, Var)>) -> Self {
        Self {
            params,
            lr: None,
            lr_scale: 1.0,
            weight_decay: None,
        }
    }

    /// Sets the group's own initial learning rate.
    pub fn lr(mut self, lr: f64) -> Self {
        self.lr = Some(lr);
        self
    }

    /// Multiplies the group's initial learning rate by `scale`.
    pub fn lr_scale(mut self, scale: f64) -> Self {
        self.lr_scale = scale;
        self
    }

    /// Sets the group's weight decay.
    pub fn weight_decay(mut self, weight_decay: f64) -> Self {
        self.weight_decay = Some(weight_decay);
        self
    }
}

/// An optimizer's state for checkpoints: named f32 tensors and a JSON document with the rest.
#[derive(Clone, Debug)]
pub struct OptimizerState {
    /// The optimizer's kind (`"adamw"`, `"sgd"`), checked when the state is loaded.
    pub kind: String,
    /// State tensors by name (`exp_avg.<param>`, `exp_avg_sq.<param>`, `momentum_buffer.<param>`).
    pub tensors: IndexMap<String, Tensor>,
    /// Step counts, learning rate, schedule multiplier and a description of the groups.
    pub meta: serde_json::Value,
}

/// An optimizer over named parameters, stepping from a [`GradStore`].
pub trait Optimizer: Send {
    /// The optimizer's kind, as stored in its state (`"adamw"`, `"sgd"`).
    fn kind(&self) -> &'static str;

    /// Updates every parameter that has a gradient in `grads`; parameters without one are skipped.
    fn step(&mut self, grads: &GradStore) -> Result<()>;

    /// The current learning rate of groups without their own: the optimizer's initial learning rate times
    /// the schedule multiplier.
    fn learning_rate(&self) -> f64;

    /// Sets the optimizer's initial learning rate (groups without their own follow it) and resets the
    /// schedule multiplier to 1, so that [`Optimizer::learning_rate`] returns `lr`.
    fn set_learning_rate(&mut self, lr: f64);

    /// The schedule multiplier currently applied to every group's initial learning rate.
    fn lr_factor(&self) -> f64;

    /// Sets the schedule multiplier: every group's learning rate becomes its initial learning rate times
    /// `factor` (torch's `LambdaLR`).
    fn set_lr_factor(&mut self, factor: f64);

    /// The current learning rate of each group, in order.
    fn group_learning_rates(&self) -> Vec<f64>;

    /// Every parameter, group by group.
    fn params(&self) -> Vec<(String, Var)>;

    /// The optimizer's state (per-parameter tensors, step counts, learning rate).
    fn state(&self) -> Result<OptimizerState>;

    /// Restores a state from [`Optimizer::state`] of an optimizer of the same kind over parameters with the
    /// same names and shapes. The learning rate and multiplier are restored; hyperparameters are this
    /// optimizer's own.
    fn load_state(&mut self, state: &OptimizerState) -> Result<()>;
}

/// Groups with the learning rate and multiplier they share (common to every optimizer here).
#[derive(Clone, Debug)]
pub(super) struct Groups {
    pub(super) groups: Vec<ParamGroup>,
    pub(super) lr: f64,
    pub(super) factor: f64,
    pub(super) weight_decay: f64,
}

impl Groups {
    pub(super) fn new(groups: Vec<ParamGroup>, lr: f64, weight_decay: f64) -> Result<Self> {
        check_hyper("lr", lr)?;
        check_hyper("weight_decay", weight_decay)?;
        let mut names = HashSet::new();
        let mut ids = HashSet::new();
        for g in &groups {
            if let Some(lr) = g.lr {
                check_hyper("lr", lr)?;
            }
            if let Some(wd) = g.weight_decay {
                check_hyper("weight_decay", wd)?;
            }
            check_hyper("lr_scale", g.lr_scale)?;
            for (name, var) in &g.params {
                if !names.insert(name.clone()) {
                    return Err(PeftError::Invalid(format!(
                        "parameter name `{name}` appears more than once in the optimizer's groups"
                    )));
                }
                if !ids.insert(var.id()) {
                    return Err(PeftError::Invalid(format!(
                        "parameter `{name}` is the same tensor as another parameter of the optimizer"
                    )));
                }
            }
        }
        Ok(Self {
            groups,
            lr,
            factor: 1.0,
            weight_decay,
        })
    }

    /// The group's initial learning rate times the schedule multiplier (`initial_lr · λ`).
    pub(super) fn lr_of(&self, g: &ParamGroup) -> f64 {
        g.lr.unwrap_or(self.lr) * g.lr_scale * self.factor
    }

    pub(super) fn weight_decay_of(&self, g: &ParamGroup) -> f64 {
        g.weight_decay.unwrap_or(self.weight_decay)
    }

    pub(super) fn params(&self) -> Vec<(String, Var)> {
        self.groups
            .iter()
            .flat_map(|g| g.params.iter().cloned())
            .collect()
    }

    pub(super) fn find(&self, name: &str) -> Option<&Var> {
        self.groups
            .iter()
            .flat_map(|g| g.params.iter())
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    pub(super) fn meta(&self) -> serde_json::Value {
        let groups: Vec<_> = self
            .groups
            .iter()
            .map(|g| {
                json!({
                    "params": g.params.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
                    "lr": self.lr_of(g),
                    "weight_decay": self.weight_decay_of(g),
                })
            })
            .collect();
        json!({"lr": self.lr, "lr_factor": self.factor, "groups": groups})
    }

    pub(super) fn load_meta(&mut self, meta: &serde_json::Value) -> Result<()> {
        let num = |k: &str| {
            meta[k].as_f64().ok_or_else(|| PeftError::Json {
                context: "optimizer state".into(),
                message: format!("missing number `{k}`"),
            })
        };
        self.lr = num("lr")?;
        self.factor = num("lr_factor")?;
        Ok(())
    }
}

pub(super) fn check_hyper(name: &str, v: f64) -> Result<()> {
    if !v.is_finite() || v < 0.0 {
        return Err(PeftError::Invalid(format!(
            "invalid optimizer setting {name} = {v}: must be finite and >= 0"
        )));
    }
    Ok(())
}

/// The gradient of `var` in `grads` as f32, checked against the parameter's shape.
pub(super) fn grad_f32(name: &str, var: &Var, grads: &GradStore) -> Result<Option<Tensor>> {
    let Some(g) = grads.get(var) else {
        return Ok(None);
    };
    if g.dims() != var.dims() {
        return Err(PeftError::ShapeMismatch {
            name: format!("gradient of {name}"),
            expected: var.dims().to_vec(),
            got: g.dims().to_vec(),
        });
    }
    Ok(Some(g.to_dtype(DType::F32)?))
}

/// Writes an f32 result back into a parameter of any dtype.
pub(super) fn write_back(var: &Var, p: &Tensor) -> Result<()> {
    var.set(&p.to_dtype(var.dtype())?)?;
    Ok(())
}

pub(super) fn state_tensor(
    state: &OptimizerState,
    key: &str,
    name: &str,
    var: &Var,
) -> Result<Tensor> {
    let t = state
        .tensors
        .get(key)
        .ok_or_else(|| PeftError::MissingKey(format!("optimizer state {key}")))?;
    if t.dims() != var.dims() {
        return Err(PeftError::ShapeMismatch {
            name: format!("optimizer state {key} of {name}"),
            expected: var.dims().to_vec(),
            got: t.dims().to_vec(),
        });
    }
    Ok(t.to_dtype(DType::F32)?.to_device(var.device())?)
}

pub(super) fn check_kind(state: &OptimizerState, kind: &str) -> Result<()> {
    if state.kind != kind {
        return Err(PeftError::Invalid(format!(
            "optimizer state is for `{}`, this optimizer is `{kind}`",
            state.kind
        )));
    }
    Ok(())
}

/// Hyperparameters of [`AdamW`]; the defaults are `torch.optim.AdamW`'s.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate (1e-3).
    pub lr: f64,
    /// First-moment decay β1 (0.9).
    pub beta1: f64,
    /// Second-moment decay β2 (0.999).
    pub beta2: f64,
    /// Denominator epsilon (1e-8).
    pub eps: f64,
    /// Decoupled weight decay (0.01).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

#[derive(Clone, Debug)]
struct AdamState {
    step: u64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// `torch.optim.AdamW`: decoupled weight decay, bias-corrected moments.
///
/// Per parameter with a gradient `g`, at its own step count `t`:
/// `p ← p·(1 − lr·wd)`; `m ← lerp(m, g, 1 − β1)`; `v ← β2·v + (1 − β2)·g²`;
/// `p ← p − lr/(1 − β1ᵗ) · m / (√v / √(1 − β2ᵗ) + eps)`.
#[derive(Debug)]
pub struct AdamW {
    config: AdamWConfig,
    groups: Groups,
    state: IndexMap<String, AdamState>,
}

impl AdamW {
    /// An optimizer over `groups`; groups without their own learning rate or weight decay use `config`'s.
    pub fn new(groups: Vec<ParamGroup>, config: AdamWConfig) -> Result<Self> {
        check_hyper("eps", config.eps)?;
        for (k, b) in [("beta1", config.beta1), ("beta2", config.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return Err(PeftError::Invalid(format!(
                    "invalid AdamW {k} = {b}: must be in [0, 1)"
                )));
            }
        }
        Ok(Self {
            groups: Groups::new(groups, config.lr, config.weight_decay)?,
            config,
            state: IndexMap::new(),
        })
    }

    /// An optimizer with one group holding `params`.
    pub fn from_params(params: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        Self::new(vec![ParamGroup::new(params)], config)
    }

    /// The hyperparameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The state of one parameter: its step count, `exp_avg` and `exp_avg_sq` (`None` before its first
    /// gradient).
    pub fn param_state(&self, name: &str) -> Option<(u64, &Tensor, &Tensor)> {
        self.state
            .get(name)
            .map(|s| (s.step, &s.exp_avg, &s.exp_avg_sq))
    }
}

impl Optimizer for AdamW {
    fn kind(&self) -> &'static str {
        "adamw"
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let AdamWConfig {
            beta1, beta2, eps, ..
        } = self.config;
        for group in &self.groups.groups {
            let lr = self.groups.lr_of(group);
            let wd = self.groups.weight_decay_of(group);
            for (name, var) in &group.params {
                let Some(g) = grad_f32(name, var, grads)? else {
                    continue;
                };
                let st = match self.state.get_mut(name) {
                    Some(st) => st,
                    None => {
                        let z = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                        self.state.entry(name.clone()).or_insert(AdamState {
                            step: 0,
                            exp_avg: z.clone(),
                            exp_avg_sq: z,
                        })
                    }
                };
                st.step += 1;
                let mut p = var.as_tensor().to_dtype(DType::F32)?;
                if wd != 0.0 {
                    // param.mul_(1 - lr * weight_decay)
                    p = p.affine(1.0 - lr * wd, 0.0)?;
                }
                // exp_avg.lerp_(grad, 1 - beta1): m + w·(g − m) for w < 0.5.
                st.exp_avg = (g.sub(&st.exp_avg)?.affine(1.0 - beta1, 0.0)? + &st.exp_avg)?;
                // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                st.exp_avg_sq =
                    (st.exp_avg_sq.affine(beta2, 0.0)? + g.affine(1.0 - beta2, 0.0)?.mul(&g)?)?;
                let t = st.step as f64;
                let bias_correction1 = 1.0 - beta1.powf(t);
                let bias_correction2 = 1.0 - beta2.powf(t);
                let step_size = lr / bias_correction1;
                let bc2_sqrt = Tensor::new(bias_correction2.sqrt() as f32, var.device())?;
                // denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
                let denom = st
                    .exp_avg_sq
                    .sqrt()?
                    .broadcast_div(&bc2_sqrt)?
                    .affine(1.0, eps)?;
                // param.addcdiv_(exp_avg, denom, value=-step_size)
                let p = (st.exp_avg.affine(-step_size, 0.0)?.div(&denom)? + p)?;
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
                AdamState {
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

/// Hyperparameters of [`Sgd`]; the defaults are `torch.optim.SGD`'s.
#[derive(Clone, Debug, PartialEq)]
pub struct SgdConfig {
    /// Learning rate (1e-3).
    pub lr: f64,
    /// Momentum factor (0).
    pub momentum: f64,
    /// Dampening of the momentum (0).
    pub dampening: f64,
    /// L2 weight decay added to the gradient (0).
    pub weight_decay: f64,
    /// Nesterov momentum (false; needs momentum > 0 and zero dampening).
    pub nesterov: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }
}

/// `torch.optim.SGD`: `g ← g + wd·p`; with momentum `b ← g` on the first step, then
/// `b ← μ·b + (1 − dampening)·g`, and `g ← g + μ·b` (Nesterov) or `g ← b`; `p ← p − lr·g`.
#[derive(Debug)]
pub struct Sgd {
    config: SgdConfig,
    groups: Groups,
    buffers: IndexMap<String, Tensor>,
}

impl Sgd {
    /// An optimizer over `groups`; groups without their own learning rate or weight decay use `config`'s.
    pub fn new(groups: Vec<ParamGroup>, config: SgdConfig) -> Result<Self> {
        check_hyper("momentum", config.momentum)?;
        check_hyper("dampening", config.dampening)?;
        if config.nesterov && (config.momentum <= 0.0 || config.dampening != 0.0) {
            return Err(PeftError::Invalid(
                "Nesterov momentum requires a momentum and zero dampening".into(),
            ));
        }
        Ok(Self {
            groups: Groups::new(groups, config.lr, config.weight_decay)?,
            config,
            buffers: IndexMap::new(),
        })
    }

    /// An optimizer with one group holding `params`.
    pub fn from_params(params: Vec<(String, Var)>, config: SgdConfig) -> Result<Self> {
        Self::new(vec![ParamGroup::new(params)], config)
    }

    /// The hyperparameters.
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }

    /// The momentum buffer of one parameter (`None` without momentum or before its first gradient).
    pub fn momentum_buffer(&self, name: &str) -> Option<&Tensor> {
        self.buffers.get(name)
    }
}

impl Optimizer for Sgd {
    fn kind(&self) -> &'static str {
        "sgd"
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let SgdConfig {
            momentum,
            dampening,
            nesterov,
            ..
        } = self.config;
        for group in &self.groups.groups {
            let lr = self.groups.lr_of(group);
            let wd = self.groups.weight_decay_of(group);
            for (name, var) in &group.params {
                let Some(mut g) = grad_f32(name, var, grads)? else {
                    continue;
                };
                let p = var.as_tensor().to_dtype(DType::F32)?;
                if wd != 0.0 {
                    // grad = grad.add(param, alpha=weight_decay)
                    g = (p.affine(wd, 0.0)? + &g)?;
                }
                if momentum != 0.0 {
                    let buf = match self.buffers.get(name) {
                        // buf = torch.clone(grad)
                        None => g.copy()?,
                        // buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                        Some(b) => (b.affine(momentum, 0.0)? + g.affine(1.0 - dampening, 0.0)?)?,
                    };
                    g = if nesterov {
                        // grad = grad.add(buf, alpha=momentum)
                        (buf.affine(momentum, 0.0)? + &g)?
                    } else {
                        buf.clone()
                    };
                    self.buffers.insert(name.clone(), buf);
                }
                // param.add_(grad, alpha=-lr)
                let p = (g.affine(-lr, 0.0)? + p)?;
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
        let tensors = self
            .buffers
            .iter()
            .map(|(n, b)| (format!("momentum_buffer.{n}"), b.clone()))
            .collect();
        let mut meta = self.groups.meta();
        meta["momentum_buffers"] = json!(self.buffers.keys().collect::<Vec<_>>());
        Ok(OptimizerState {
            kind: self.kind().into(),
            tensors,
            meta,
        })
    }

    fn load_state(&mut self, state: &OptimizerState) -> Result<()> {
        check_kind(state, self.kind())?;
        let names = state.meta["momentum_buffers"]
            .as_array()
            .ok_or_else(|| PeftError::Json {
                context: "optimizer state".into(),
                message: "missing array `momentum_buffers`".into(),
            })?;
        let mut buffers = IndexMap::new();
        for name in names {
            let name = name.as_str().ok_or_else(|| PeftError::Json {
                context: "optimizer state".into(),
                message: "`momentum_buffers` holds a non-string".into(),
            })?;
            let var = self.groups.find(name).ok_or_else(|| {
                PeftError::Invalid(format!(
                    "optimizer state holds parameter `{name}`, which this optimizer does not have"
                ))
            })?;
            let key = format!("momentum_buffer.{name}");
            buffers.insert(name.to_string(), state_tensor(state, &key, name, var)?);
        }
        self.groups.load_meta(&state.meta)?;
        self.buffers = buffers;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(v: &[f32]) -> Var {
        Var::new(v, &Device::Cpu).unwrap()
    }

    /// One AdamW step on a scalar, in f64 by hand.
    #[test]
    fn adamw_first_step_moves_by_lr() {
        let p = var(&[1.0]);
        let mut opt = AdamW::from_params(
            vec![("p".into(), p.clone())],
            AdamWConfig {
                lr: 0.1,
                weight_decay: 0.0,
                ..Default::default()
            },
        )
        .unwrap();
        let loss = p.as_tensor().sqr().unwrap().sum_all().unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
        // First step: m̂ = g, v̂ = g², so p −= lr · g / (|g| + eps) ≈ lr.
        let got = p.to_vec1::<f32>().unwrap()[0];
        assert!((got - 0.9).abs() < 1e-6, "{got}");
        assert_eq!(opt.param_state("p").unwrap().0, 1);
    }

    #[test]
    fn skipped_params_get_no_state_and_state_round_trips() {
        let a = var(&[1.0, 2.0]);
        let b = var(&[3.0]);
        let mut opt = AdamW::from_params(
            vec![("a".into(), a.clone()), ("b".into(), b.clone())],
            AdamWConfig::default(),
        )
        .unwrap();
        let loss = a.as_tensor().sum_all().unwrap();
        opt.step(&loss.backward().unwrap()).unwrap();
        assert!(opt.param_state("b").is_none());
        assert_eq!(b.to_vec1::<f32>().unwrap(), vec![3.0]);
        let st = opt.state().unwrap();
        assert_eq!(
            st.tensors.keys().collect::<Vec<_>>(),
            vec!["exp_avg.a", "exp_avg_sq.a"]
        );
        let mut other = AdamW::from_params(
            vec![("a".into(), var(&[0.0, 0.0])), ("b".into(), var(&[0.0]))],
            AdamWConfig::default(),
        )
        .unwrap();
        other.load_state(&st).unwrap();
        assert_eq!(other.param_state("a").unwrap().0, 1);
        let mut sgd = Sgd::from_params(vec![("a".into(), a)], SgdConfig::default()).unwrap();
        let e = sgd.load_state(&st).unwrap_err();
        assert!(
            matches!(&e, PeftError::Invalid(m) if m.contains("state is for `adamw`, this optimizer is `sgd`")),
            "{e}"
        );
    }

    #[test]
    fn groups_reject_duplicates_and_scale_lr() {
        let a = var(&[1.0]);
        let dup = AdamW::new(
            vec![
                ParamGroup::new(vec![("a".into(), a.clone())]),
                ParamGroup::new(vec![("a2".into(), a.clone())]),
            ],
            AdamWConfig::default(),
        );
        let Err(e) = dup else {
            panic!("a duplicate parameter is accepted")
        };
        assert!(
            matches!(&e, PeftError::Invalid(m) if m.contains("parameter `a2` is the same tensor")),
            "{e}"
        );
        let mut opt = Sgd::new(
            vec![
                ParamGroup::new(vec![("a".into(), a)]),
                ParamGroup::new(vec![("b".into(), var(&[1.0]))]).lr(0.5),
            ],
            SgdConfig {
                lr: 0.1,
                ..Default::default()
            },
        )
        .unwrap();
        opt.set_lr_factor(0.5);
        assert_eq!(opt.group_learning_rates(), vec![0.05, 0.25]);
        assert_eq!(opt.learning_rate(), 0.05);
        opt.set_learning_rate(0.2);
        assert_eq!(opt.learning_rate(), 0.2);
        let Err(e) = Sgd::from_params(
            vec![],
            SgdConfig {
                nesterov: true,
                ..Default::default()
            },
        ) else {
            panic!("Nesterov without momentum is accepted")
        };
        assert!(
            matches!(&e, PeftError::Invalid(m) if m.contains("Nesterov momentum requires")),
            "{e}"
        );
    }
}
