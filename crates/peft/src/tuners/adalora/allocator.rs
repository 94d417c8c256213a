//! AdaLoRA's rank allocation in training (PEFT's `RankAllocator` in `tuners/adalora/layer.py`, and
//! `AdaLoraModel.update_and_allocate` / the orthogonal regulariser of `AdaLoraModel.forward` in `model.py`).
//!
//! The allocator works on the adapter parameters by name, `<module>.lora_A`, `<module>.lora_B` and
//! `<module>.lora_E` (the names of [`crate::PeftModel::trainable_vars`]), and on the clipped gradients a
//! [`Trainer`] step hook sees after `optimizer.step()`, so the importance is `|p_new · grad|` as in PEFT.
//!
//! * sensitivity `Ī ← β₁ Ī + (1 − β₁) |p·g|`, uncertainty `Ū ← β₂ Ū + (1 − β₂) ||p·g| − Ī|`, element score
//!   `Ī · Ū`;
//! * the score of triplet `i` of a module: `score(E)ᵢ + mean_j score(A)ᵢⱼ + mean_j score(B)ⱼᵢ`;
//! * the budget: `init_bgt` (the sum of the initial ranks) until `tinit`, then a cubic decrease to
//!   `target_bgt = target_r · modules`, reached at `total_step − tfinal`; masks every `deltaT` steps;
//! * masking: `threshold = kthvalue(all scores, init_bgt − budget)`, and every `E` entry whose score is
//!   `<= threshold` is set to 0 (in place, [`Var::set`]); the masks (`true` = kept) are the `rank_pattern`,
//!   keyed `"<module>.lora_E"`;
//! * at step `total_step − tfinal` a final masking to `target_bgt` (the scores are not updated that step)
//!   and the scores are reset; after it, every step re-applies the final masks.
//!
//! Steps are 0-based as in PEFT's documented loop (`update_and_allocate(i_step)` for the `i_step`-th update):
//! [`attach_adalora`] passes `trainer step − 1`.
//!
//! Near-ties between scores may mask differently here and in PyTorch (summation order); compare masks with
//! the recorded scores.

use super::config::AdaLoraConfig;
use crate::train::trainer::{StepContext, Trainer};
use crate::{PeftError, Result};
use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;
use std::sync::{Arc, Mutex};

/// What one call of [`RankAllocator::update_and_allocate`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct AllocationRecord {
    /// The (0-based) global step.
    pub step: usize,
    /// The budget of the schedule at this step.
    pub budget: usize,
    /// The threshold, when the step masked to a budget.
    pub threshold: Option<f32>,
    /// The triplet scores per `"<module>.lora_E"`, when the step masked to a budget.
    pub scores: IndexMap<String, Vec<f32>>,
    /// The rank pattern after the step (`None` before the first masking).
    pub rank_pattern: Option<IndexMap<String, Vec<bool>>>,
}

/// PEFT's `RankAllocator` together with `AdaLoraModel.update_and_allocate`.
#[derive(Debug)]
pub struct RankAllocator {
    beta1: f64,
    beta2: f64,
    tinit: usize,
    tfinal: usize,
    delta_t: usize,
    total_step: usize,
    /// The adapter parameters (`lora_A`, `lora_B`, `lora_E`), in model order.
    params: Vec<(String, Var)>,
    init_bgt: usize,
    target_bgt: usize,
    exp_avg_ipt: IndexMap<String, Tensor>,
    exp_avg_unc: IndexMap<String, Tensor>,
    rank_pattern: Option<IndexMap<String, Vec<bool>>>,
    history: Vec<AllocationRecord>,
}

fn module_of<'a>(name: &'a str, suffix: &str) -> Option<&'a str> {
    name.strip_suffix(suffix)
        .and_then(|m| m.strip_suffix('.'))
        .filter(|m| !m.is_empty())
}

impl RankAllocator {
    /// An allocator over the AdaLoRA parameters among `params` (names ending in `.lora_A`, `.lora_B`,
    /// `.lora_E`; others are ignored). `config.total_step` must be set.
    pub fn new(params: &[(String, Var)], config: &AdaLoraConfig) -> Result<Self> {
        let total_step = match config.total_step {
            Some(t) if t > 0 => t,
            _ => {
                return Err(PeftError::InvalidConfig(
                    "AdaLoRA's rank allocator needs `total_step` (> 0) in the config".into(),
                ));
            }
        };
        if !(config.beta1 > 0.0 && config.beta1 < 1.0 && config.beta2 > 0.0 && config.beta2 < 1.0) {
            return Err(PeftError::InvalidConfig(format!(
                "AdaLoRA needs 0 < beta1, beta2 < 1, got {} and {}",
                config.beta1, config.beta2
            )));
        }
        if config.delta_t == 0 {
            return Err(PeftError::InvalidConfig("`deltaT` must be positive".into()));
        }
        let params: Vec<(String, Var)> = params
            .iter()
            .filter(|(n, _)| {
                ["lora_A", "lora_B", "lora_E"]
                    .iter()
                    .any(|s| module_of(n, s).is_some())
            })
            .cloned()
            .collect();
        let mut init_bgt = 0;
        let mut modules = std::collections::BTreeSet::new();
        for (n, v) in &params {
            if let Some(m) = module_of(n, "lora_A") {
                init_bgt += v.dims().first().copied().unwrap_or(0);
                modules.insert(m.to_string());
            }
        }
        if modules.is_empty() {
            return Err(PeftError::Invalid(
                "AdaLoRA's rank allocator found no `<module>.lora_A` parameter".into(),
            ));
        }
        for m in &modules {
            for s in ["lora_B", "lora_E"] {
                if !params.iter().any(|(n, _)| n == &format!("{m}.{s}")) {
                    return Err(PeftError::MissingKey(format!("{m}.{s}")));
                }
            }
        }
        Ok(Self {
            beta1: config.beta1,
            beta2: config.beta2,
            tinit: config.tinit,
            tfinal: config.tfinal,
            delta_t: config.delta_t,
            total_step,
            init_bgt,
            target_bgt: config.target_r * modules.len(),
            params,
            exp_avg_ipt: IndexMap::new(),
            exp_avg_unc: IndexMap::new(),
            rank_pattern: None,
            history: Vec::new(),
        })
    }

    /// The sum of the initial ranks.
    pub fn init_budget(&self) -> usize {
        self.init_bgt
    }

    /// `target_r` times the number of modules.
    pub fn target_budget(&self) -> usize {
        self.target_bgt
    }

    /// The current masks (`true` = kept), keyed `"<module>.lora_E"`: what PEFT writes to the config's
    /// `rank_pattern`. `None` before the first masking.
    pub fn rank_pattern(&self) -> Option<&IndexMap<String, Vec<bool>>> {
        self.rank_pattern.as_ref()
    }

    /// Every step's record.
    pub fn history(&self) -> &[AllocationRecord] {
        &self.history
    }

    /// PEFT's `reset_ipt`.
    pub fn reset_ipt(&mut self) {
        self.exp_avg_ipt.clear();
        self.exp_avg_unc.clear();
    }

    /// PEFT's `budget_schedule`: `(budget, whether to mask)` at `step`.
    pub fn budget_schedule(&self, step: usize) -> (usize, bool) {
        let (tinit, tfinal, total) = (self.tinit, self.tfinal, self.total_step);
        if step <= tinit {
            (self.init_bgt, false)
        } else if step as i128 > total as i128 - tfinal as i128 {
            (self.target_bgt, true)
        } else {
            let mul = 1.0 - (step - tinit) as f64 / (total as f64 - tfinal as f64 - tinit as f64);
            let budget = (self.init_bgt as f64 - self.target_bgt as f64) * mul.powi(3)
                + self.target_bgt as f64;
            (budget as usize, step.is_multiple_of(self.delta_t))
        }
    }

    /// PEFT's `update_ipt`: the EMAs of `|p · grad|` for every parameter (a parameter without a gradient
    /// counts as a zero gradient).
    pub fn update_ipt(&mut self, grads: &IndexMap<String, Tensor>) -> Result<()> {
        for (n, p) in &self.params {
            let p = p.as_tensor();
            let ipt = match grads.get(n) {
                Some(g) => (p * g.to_dtype(p.dtype())?)?.abs()?,
                None => p.zeros_like()?,
            };
            let avg = match self.exp_avg_ipt.get(n) {
                Some(a) => a.clone(),
                None => p.zeros_like()?,
            };
            let unc = match self.exp_avg_unc.get(n) {
                Some(a) => a.clone(),
                None => p.zeros_like()?,
            };
            let avg = (avg.affine(self.beta1, 0.0)? + ipt.affine(1.0 - self.beta1, 0.0)?)?;
            let unc = (unc.affine(self.beta2, 0.0)?
                + (&ipt - &avg)?.abs()?.affine(1.0 - self.beta2, 0.0)?)?;
            self.exp_avg_ipt.insert(n.clone(), avg);
            self.exp_avg_unc.insert(n.clone(), unc);
        }
        Ok(())
    }

    fn element_score(&self, n: &str) -> Result<Tensor> {
        match (self.exp_avg_ipt.get(n), self.exp_avg_unc.get(n)) {
            (Some(a), Some(u)) => Ok((a * u)?),
            _ => Err(PeftError::Invalid(format!(
                "AdaLoRA: no importance score for `{n}` yet (masking before any update)"
            ))),
        }
    }

    /// The triplet scores per `"<module>.lora_E"` (PEFT's `triplet_ipt`), in model order.
    pub fn triplet_scores(&self) -> Result<IndexMap<String, Tensor>> {
        let mut vector: IndexMap<String, Vec<Tensor>> = IndexMap::new();
        let mut value: IndexMap<String, Tensor> = IndexMap::new();
        for (n, _) in &self.params {
            if let Some(m) = module_of(n, "lora_A") {
                let s = self.element_score(n)?.mean_keepdim(1)?;
                vector.entry(m.to_string()).or_default().push(s);
            } else if let Some(m) = module_of(n, "lora_B") {
                let s = self.element_score(n)?.mean(0)?.reshape(((), 1))?;
                vector.entry(m.to_string()).or_default().push(s);
            } else if let Some(m) = module_of(n, "lora_E") {
                value.insert(m.to_string(), self.element_score(n)?);
            }
        }
        let mut out = IndexMap::new();
        for (m, parts) in vector {
            let e = value
                .get(&m)
                .ok_or_else(|| PeftError::MissingKey(format!("{m}.lora_E")))?;
            let ab = Tensor::cat(&parts, 1)?.sum(1)?;
            out.insert(format!("{m}.lora_E"), (e.flatten_all()? + ab)?);
        }
        Ok(out)
    }

    /// PEFT's `mask_to_budget`: zeroes the `E` entries whose triplet score is `<=` the
    /// `(init_bgt − budget)`-th smallest score. Returns the masks, the threshold and the scores.
    #[allow(clippy::type_complexity)]
    pub fn mask_to_budget(
        &mut self,
        budget: usize,
    ) -> Result<(IndexMap<String, Vec<bool>>, f32, IndexMap<String, Vec<f32>>)> {
        let triplets = self.triplet_scores()?;
        let mut scores: IndexMap<String, Vec<f32>> = IndexMap::new();
        let mut all: Vec<f32> = Vec::new();
        for (k, t) in &triplets {
            let v: Vec<f32> = t.to_dtype(DType::F32)?.to_vec1()?;
            all.extend(&v);
            scores.insert(k.clone(), v);
        }
        let k = self.init_bgt.saturating_sub(budget);
        if k == 0 || k > all.len() {
            return Err(PeftError::Invalid(format!(
                "AdaLoRA: kthvalue k = {k} out of range for {} scores (budget {budget})",
                all.len()
            )));
        }
        all.sort_by(|a, b| a.total_cmp(b));
        let threshold = all[k - 1];
        let mut pattern = IndexMap::new();
        for (n, var) in &self.params {
            if module_of(n, "lora_E").is_none() {
                continue;
            }
            let s = &scores[n];
            let keep: Vec<bool> = s
                .iter()
                .map(|x| {
                    let pruned = *x <= threshold;
                    !pruned
                })
                .collect();
            Self::apply_mask(var, &keep)?;
            pattern.insert(n.clone(), keep);
        }
        Ok((pattern, threshold, scores))
    }

    fn apply_mask(var: &Var, keep: &[bool]) -> Result<()> {
        let t = var.as_tensor();
        if t.dims().first() != Some(&keep.len()) {
            return Err(PeftError::ShapeMismatch {
                name: "lora_E".into(),
                expected: vec![keep.len(), 1],
                got: t.dims().to_vec(),
            });
        }
        let m: Vec<u8> = keep.iter().map(|k| u8::from(*k)).collect();
        let m = Tensor::from_vec(m, keep.len(), t.device())?
            .reshape(((), 1))?
            .broadcast_as(t.shape())?;
        let masked = m.where_cond(t, &t.zeros_like()?)?;
        var.set(&masked)?;
        Ok(())
    }

    /// PEFT's `mask_using_rank_pattern`: re-applies the current masks.
    pub fn mask_using_rank_pattern(&self) -> Result<()> {
        let Some(pattern) = &self.rank_pattern else {
            return Err(PeftError::Invalid(
                "AdaLoRA: no rank pattern to mask with (the final allocation step was skipped)"
                    .into(),
            ));
        };
        for (n, var) in &self.params {
            if module_of(n, "lora_E").is_none() {
                continue;
            }
            let keep = pattern
                .get(n)
                .ok_or_else(|| PeftError::MissingKey(format!("rank_pattern[{n:?}]")))?;
            Self::apply_mask(var, keep)?;
        }
        Ok(())
    }

    /// `AdaLoraModel.update_and_allocate(global_step)`, to call after `optimizer.step()` with the step's
    /// gradients: updates the scores before `total_step − tfinal`, masks to the scheduled budget, does the
    /// final allocation at `total_step − tfinal` and re-applies the final masks after it.
    pub fn update_and_allocate(
        &mut self,
        step: usize,
        grads: &IndexMap<String, Tensor>,
    ) -> Result<&AllocationRecord> {
        let end = self.total_step as i128 - self.tfinal as i128;
        let (budget, mask_ind) = self.budget_schedule(step);
        let mut record = AllocationRecord {
            step,
            budget,
            threshold: None,
            scores: IndexMap::new(),
            rank_pattern: None,
        };
        let s = step as i128;
        if s < end {
            self.update_ipt(grads)?;
            if mask_ind {
                let (p, thr, scores) = self.mask_to_budget(budget)?;
                record.threshold = Some(thr);
                record.scores = scores;
                if !p.is_empty() {
                    self.rank_pattern = Some(p);
                }
            }
        } else if s == end {
            let (p, thr, scores) = self.mask_to_budget(budget)?;
            record.threshold = Some(thr);
            record.scores = scores;
            self.rank_pattern = Some(p);
            self.reset_ipt();
        } else {
            self.mask_using_rank_pattern()?;
        }
        record.rank_pattern = self.rank_pattern.clone();
        self.history.push(record);
        Ok(self.history.last().expect("just pushed"))
    }
}

/// PEFT's orthogonal regulariser (`AdaLoraModel.forward`): `weight · mean over every lora_A and lora_B of
/// ‖P Pᵀ − I‖_F` (`A Aᵀ` for `lora_A`, `Bᵀ B` for `lora_B`; the Frobenius norm, not its square), a scalar f32.
/// Parameters with other names are ignored; no matrix gives 0.
pub fn orth_reg(params: &[(String, Var)], weight: f64) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    let mut n = 0usize;
    let mut device = None;
    for (name, v) in params {
        let p = v.as_tensor();
        device.get_or_insert_with(|| p.device().clone());
        let cov = if module_of(name, "lora_A").is_some() {
            p.matmul(&p.t()?)?
        } else if module_of(name, "lora_B").is_some() {
            p.t()?.matmul(p)?
        } else {
            continue;
        };
        n += 1;
        let r = cov.dim(0)?;
        let norm = if r == 0 {
            Tensor::zeros((), DType::F32, p.device())?
        } else {
            let eye = Tensor::eye(r, cov.dtype(), cov.device())?;
            (cov - eye)?
                .sqr()?
                .sum_all()?
                .sqrt()?
                .to_dtype(DType::F32)?
        };
        total = Some(match total {
            Some(t) => (t + norm)?,
            None => norm,
        });
    }
    let dev = device.unwrap_or(candle_core::Device::Cpu);
    match total {
        Some(t) if n > 0 => Ok(((t / n as f64)? * weight)?),
        _ => Ok(Tensor::zeros((), DType::F32, &dev)?),
    }
}

/// A handle on the [`RankAllocator`] attached to a trainer: read the masks back after (or during) training.
#[derive(Clone, Debug)]
pub struct AdaLoraAllocator(Arc<Mutex<RankAllocator>>);

impl AdaLoraAllocator {
    fn lock(&self) -> std::sync::MutexGuard<'_, RankAllocator> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current masks, keyed `"<module>.lora_E"` (`None` before the first masking).
    pub fn rank_pattern(&self) -> Option<IndexMap<String, Vec<bool>>> {
        self.lock().rank_pattern().cloned()
    }

    /// Every step's record.
    pub fn history(&self) -> Vec<AllocationRecord> {
        self.lock().history().to_vec()
    }

    /// The sum of the initial ranks.
    pub fn init_budget(&self) -> usize {
        self.lock().init_budget()
    }

    /// Writes the current masks into `config.rank_pattern` (what PEFT's `update_and_allocate` keeps there), so
    /// that saving writes the kept rows only (`resize_state_dict_by_rank_pattern`).
    pub fn write_rank_pattern(&self, config: &mut AdaLoraConfig) {
        if let Some(p) = self.rank_pattern() {
            config.rank_pattern = Some(p);
        }
    }
}

/// Attaches AdaLoRA's training to `trainer`: the orthogonal regulariser as the extra loss `"orth_reg"`
/// (when `orth_reg_weight > 0`; PEFT adds it to the model's `.loss`) and the rank allocator as a step hook
/// (`update_and_allocate(trainer step − 1)` after every optimizer step, with the clipped gradients).
/// `params` are the adapter parameters under the trainer's names (`<module>.lora_A` …, as
/// [`crate::PeftModel::trainable_vars`] names them).
pub fn attach_adalora(
    trainer: &mut Trainer,
    params: &[(String, Var)],
    config: &AdaLoraConfig,
) -> Result<AdaLoraAllocator> {
    if config.orth_reg_weight < 0.0 {
        return Err(PeftError::InvalidConfig(
            "orth_reg_weight should be greater than or equal to 0".into(),
        ));
    }
    let alloc = RankAllocator::new(params, config)?;
    for (n, v) in &alloc.params {
        match trainer.params().iter().find(|(tn, _)| tn == n) {
            Some((_, tv)) if tv.id() == v.id() => {}
            _ => {
                return Err(PeftError::Invalid(format!(
                    "AdaLoRA parameter `{n}` is not one of the trainer's parameters"
                )));
            }
        }
    }
    let orth_params: Vec<(String, Var)> = alloc.params.clone();
    let weight = config.orth_reg_weight;
    if weight > 0.0 {
        trainer.add_extra_loss(
            "orth_reg",
            Box::new(move |_, _| orth_reg(&orth_params, weight)),
        );
    }
    let handle = AdaLoraAllocator(Arc::new(Mutex::new(alloc)));
    let h = handle.clone();
    trainer.add_step_hook(Box::new(move |ctx: &StepContext<'_>| {
        let step = ctx.step.saturating_sub(1) as usize;
        h.lock().update_and_allocate(step, ctx.grads)?;
        Ok(())
    }));
    Ok(handle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn var(v: &[f32], shape: (usize, usize)) -> Var {
        Var::from_tensor(&Tensor::from_slice(v, shape, &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn budget_schedule_is_peft_s() {
        let params = vec![
            ("m.lora_A".to_string(), var(&[0.0; 8], (4, 2))),
            ("m.lora_B".to_string(), var(&[0.0; 8], (2, 4))),
            ("m.lora_E".to_string(), var(&[0.0; 4], (4, 1))),
        ];
        let cfg = AdaLoraConfig {
            target_r: 1,
            init_r: 4,
            tinit: 2,
            tfinal: 3,
            delta_t: 2,
            total_step: Some(10),
            ..Default::default()
        };
        let a = RankAllocator::new(&params, &cfg).unwrap();
        assert_eq!((a.init_budget(), a.target_budget()), (4, 1));
        // total - tfinal - tinit = 5: mul = 1 - (s - 2)/5
        let got: Vec<(usize, bool)> = (0..11).map(|s| a.budget_schedule(s)).collect();
        let want = [
            (4, false),
            (4, false),
            (4, false),
            // 3·0.8³ + 1 = 2.536
            (2, false),
            // 3·0.6³ + 1 = 1.648
            (1, true),
            (1, false),
            (1, true),
            (1, false),
            (1, true),
            (1, true),
            (1, true),
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn orth_reg_is_the_mean_frobenius_norm() {
        let params = vec![
            ("m.lora_A".to_string(), var(&[1.0, 0.0, 0.0, 2.0], (2, 2))),
            ("m.lora_B".to_string(), var(&[1.0, 0.0, 0.0, 1.0], (2, 2))),
            ("m.lora_E".to_string(), var(&[5.0, 5.0], (2, 1))),
        ];
        // A Aᵀ − I = diag(0, 3): norm 3; Bᵀ B − I = 0
        let r = orth_reg(&params, 0.5).unwrap().to_scalar::<f32>().unwrap();
        assert!((r - 0.75).abs() < 1e-6, "{r}");
    }
}
