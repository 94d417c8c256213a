//! The training loop's step: gradient accumulation, clipping, the optimizer step and the schedule.
//!
//! A [`Trainer`] owns the parameters it trains (named [`Var`]s, usually the adapters' `vars()`), an
//! [`Optimizer`] over exactly those parameters, an [`LrScheduler`] and its [`TrainerSettings`]. The model and
//! the data stay with the caller: [`Trainer::train_step`] calls back once per micro-batch with the
//! micro-batch index and the [`ForwardCtx`] to run the forward with, and gets a scalar loss back.
//!
//! One step, as HF's `Trainer` with `torch.optim` does it:
//!
//! 1. for each of the `grad_accum_steps` micro-batches: `loss_i = loss + Σ extra terms`, backward of
//!    `loss_i / grad_accum_steps`, gradients summed;
//! 2. the global gradient norm `√(Σ‖g‖²)` over the parameters, and clipping as `clip_grad_norm_`
//!    (`g ← g · min(1, max_norm / (norm + 1e-6))`);
//! 3. the optimizer steps with `lr = initial_lr · λ(step)`, the schedule advances;
//! 4. the post-step hooks see the updated parameters and the clipped gradients (AdaLoRA's rank allocator).
//!
//! Dropout in micro-batch `i` of step `k` draws from `ForwardCtx::train(seed, k · grad_accum_steps + i)`,
//! so a run resumed from a checkpoint ([`Trainer::save_checkpoint`], [`Trainer::resume`]) draws the same
//! masks as one that never stopped.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use peft::train::optim::{Sgd, SgdConfig};
//! use peft::train::schedule::Schedule;
//! use peft::train::trainer::{Trainer, TrainerSettings};
//!
//! # fn main() -> peft::Result<()> {
//! let w = Var::new(&[2.0f32, -1.0], &Device::Cpu)?;
//! let params = vec![("w".to_string(), w.clone())];
//! let opt = Sgd::from_params(params.clone(), SgdConfig { lr: 0.1, ..Default::default() })?;
//! let settings = TrainerSettings { grad_accum_steps: 2, max_steps: 5, ..Default::default() };
//! let mut trainer = Trainer::new(params, Box::new(opt), Schedule::Constant, settings)?;
//! while !trainer.is_finished() {
//!     // Loss ‖w‖², one half per micro-batch.
//!     let report = trainer.train_step(&mut |_micro, _ctx| Ok(w.as_tensor().sqr()?.sum_all()?))?;
//!     assert!(report.loss >= 0.0);
//! }
//! assert!(w.to_vec1::<f32>()?[0].abs() < 2.0);
//! # Ok(()) }
//! ```

use super::metrics::{
    EvalRecord, MetricRecord, MetricsLog, Progress, ProgressCallback, TrainRecord,
};
use super::optim::Optimizer;
use super::schedule::{LrScheduler, Schedule};
use crate::{ForwardCtx, PeftError, PeftRng, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

/// The settings of a training run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerSettings {
    /// Micro-batches per optimizer step (≥ 1).
    pub grad_accum_steps: usize,
    /// Clip the global gradient norm to this value (`None`: no clipping; the norm is still reported).
    pub max_grad_norm: Option<f64>,
    /// The number of optimizer steps of the run ([`Trainer::is_finished`]).
    pub max_steps: u64,
    /// Evaluate every this many steps and at the last step ([`Trainer::should_evaluate`]); 0: never.
    pub eval_every: u64,
    /// Seed of the run: dropout streams and the trainer's generator derive from it.
    pub seed: u64,
    /// Write a metrics record every this many steps (the mean over the window), and at the last step (≥ 1).
    pub log_every: u64,
}

impl Default for TrainerSettings {
    /// One micro-batch, clipping at 1.0 (HF's default), 1000 steps, no evaluation, seed 42, a record per step.
    fn default() -> Self {
        Self {
            grad_accum_steps: 1,
            max_grad_norm: Some(1.0),
            max_steps: 1000,
            eval_every: 0,
            seed: 42,
            log_every: 1,
        }
    }
}

/// What one optimizer step did.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// Optimizer steps completed, this one included (1-based).
    pub step: u64,
    /// The loss, averaged over the micro-batches (extra loss terms included).
    pub loss: f64,
    /// The learning rate this step used (groups without their own: `initial_lr · λ(step − 1)`).
    pub lr: f64,
    /// The global gradient norm before clipping.
    pub grad_norm: f64,
    /// Whether the gradients were scaled down by clipping.
    pub clipped: bool,
    /// Tokens in the step's micro-batches, when they report them.
    pub tokens: Option<u64>,
    /// Tokens per second of the step's wall time, when the micro-batches report tokens.
    pub tokens_per_s: Option<f64>,
    /// Wall time of the step.
    pub step_time: Duration,
    /// Each extra loss term, averaged over the micro-batches, by name.
    pub extra: IndexMap<String, f64>,
}

/// What a post-step hook sees: the step just taken, the (updated) parameters and their clipped gradients.
#[derive(Debug)]
pub struct StepContext<'a> {
    /// Optimizer steps completed, this one included.
    pub step: u64,
    /// The learning rate the step used.
    pub lr: f64,
    /// The trained parameters, after the update.
    pub params: &'a [(String, Var)],
    /// The accumulated, clipped gradient of each parameter that had one, by name.
    pub grads: &'a IndexMap<String, Tensor>,
}

/// An extra loss term added to every micro-batch's loss (AdaLoRA's orthogonal regulariser): called with
/// the micro-batch index and its context, returns a scalar.
pub type ExtraLoss = Box<dyn FnMut(usize, &ForwardCtx) -> Result<Tensor> + Send>;

/// A micro-batch's forward that also reports its number of tokens:
/// `(micro-batch index, context) → (scalar loss, tokens)`.
pub type MicroBatchWithTokens<'a> = dyn FnMut(usize, &ForwardCtx) -> Result<(Tensor, usize)> + 'a;

/// An evaluation batch: `(batch index, context) → (summed negative log-likelihood, tokens)`.
pub type EvalBatch<'a> = dyn FnMut(usize, &ForwardCtx) -> Result<(f64, usize)> + 'a;

/// A micro-batch that runs its own backward (gradient checkpointing): `(micro-batch index, context) →`
/// [`MicroBatchGrads`].
pub type MicroBatchWithGrads<'a> = dyn FnMut(usize, &ForwardCtx) -> Result<MicroBatchGrads> + 'a;

/// What a micro-batch that ran its own backward returns to [`Trainer::train_step_with_grads`].
#[derive(Debug)]
pub struct MicroBatchGrads {
    /// The scalar loss (its value only: the trainer does not backpropagate it).
    pub loss: Tensor,
    /// The gradients of `loss` (unscaled by the accumulation) with respect to the trainable parameters.
    pub grads: GradStore,
    /// The number of tokens of the micro-batch, for tokens/s.
    pub tokens: usize,
}

type MicroBatchInner<'a> =
    dyn FnMut(usize, &ForwardCtx) -> Result<(Tensor, Option<u64>, Option<GradStore>)> + 'a;

/// A hook called after every optimizer step (AdaLoRA's rank allocator needs `|p · grad|`).
pub type StepHook = Box<dyn FnMut(&StepContext<'_>) -> Result<()> + Send>;

/// The running sums of the current logging window (checkpointed so a resumed run logs the same windows).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LogWindow {
    /// Steps in the window.
    pub steps: u64,
    /// Sum of the steps' losses.
    pub loss_sum: f64,
    /// Tokens in the window, when reported.
    pub tokens: Option<u64>,
    /// Wall time of the window's steps, in seconds.
    pub time_s: f64,
    /// Sum of each extra loss term.
    pub extra_sums: IndexMap<String, f64>,
}

/// A training loop over named parameters: accumulation, clipping, optimizer, schedule, metrics.
pub struct Trainer {
    pub(super) params: Vec<(String, Var)>,
    pub(super) optimizer: Box<dyn Optimizer>,
    pub(super) scheduler: LrScheduler,
    pub(super) settings: TrainerSettings,
    pub(super) rng: PeftRng,
    pub(super) metrics: Vec<MetricRecord>,
    pub(super) window: LogWindow,
    pub(super) log: Option<MetricsLog>,
    extra_losses: Vec<(String, ExtraLoss)>,
    grad_projections: IndexMap<String, crate::layer::GradProjection>,
    hooks: Vec<StepHook>,
    progress: Option<ProgressCallback>,
    pub(super) last: Option<StepReport>,
    pub(super) last_eval: Option<f64>,
    pub(super) session_time: Duration,
    pub(super) session_steps: u64,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field(
                "params",
                &self.params.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("optimizer", &self.optimizer.kind())
            .field("scheduler", &self.scheduler)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// A loss as a scalar f32 tensor, naming what it is otherwise.
fn scalar_loss(t: Tensor, what: &str) -> Result<Tensor> {
    if t.elem_count() != 1 {
        return Err(PeftError::ShapeMismatch {
            name: what.to_string(),
            expected: vec![],
            got: t.dims().to_vec(),
        });
    }
    Ok(t.reshape(())?.to_dtype(DType::F32)?)
}

/// The global L2 norm `√(Σ‖g‖²)` of `grads`, as `torch.nn.utils.clip_grad_norm_` computes it (in f32 per
/// tensor, summed in f64).
pub fn global_grad_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sum = 0.0f64;
    for g in grads {
        let sq = g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()?;
        sum += f64::from(sq);
    }
    Ok(sum.sqrt())
}

/// `torch.nn.utils.clip_grad_norm_`: scales every gradient by `min(1, max_norm / (norm + 1e-6))` and
/// returns the norm before clipping.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> peft::Result<()> {
/// let mut g = vec![Tensor::new(&[3.0f32], &Device::Cpu)?, Tensor::new(&[4.0f32], &Device::Cpu)?];
/// let norm = peft::train::trainer::clip_grad_norm(&mut g, 1.0)?;
/// assert_eq!(norm, 5.0);
/// assert!((g[0].to_vec1::<f32>()?[0] - 0.6).abs() < 1e-6);
/// # Ok(()) }
/// ```
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_grad_norm(grads)?;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 || !coef.is_finite() {
        for g in grads.iter_mut() {
            *g = g.affine(coef, 0.0)?;
        }
    }
    Ok(norm)
}

impl Trainer {
    /// A trainer over `params`, stepping `optimizer` (which must hold exactly these parameters) with the
    /// learning rate scaled by `schedule`.
    pub fn new(
        params: Vec<(String, Var)>,
        optimizer: Box<dyn Optimizer>,
        schedule: Schedule,
        settings: TrainerSettings,
    ) -> Result<Self> {
        if settings.grad_accum_steps == 0 {
            return Err(PeftError::Invalid(
                "grad_accum_steps must be at least 1".into(),
            ));
        }
        if settings.log_every == 0 {
            return Err(PeftError::Invalid("log_every must be at least 1".into()));
        }
        if let Some(m) = settings.max_grad_norm
            && (m.is_nan() || m <= 0.0)
        {
            return Err(PeftError::Invalid(format!(
                "max_grad_norm must be positive, got {m}"
            )));
        }
        let mut names = HashSet::new();
        for (n, _) in &params {
            if !names.insert(n.as_str()) {
                return Err(PeftError::Invalid(format!(
                    "parameter name `{n}` is given twice"
                )));
            }
        }
        let opt_params = optimizer.params();
        for (n, v) in &opt_params {
            match params.iter().find(|(pn, _)| pn == n) {
                Some((_, pv)) if pv.id() == v.id() => {}
                Some(_) => {
                    return Err(PeftError::Invalid(format!(
                        "the optimizer's parameter `{n}` is not the trainer's tensor of that name"
                    )));
                }
                None => {
                    return Err(PeftError::Invalid(format!(
                        "the optimizer holds `{n}`, which is not among the trainer's parameters"
                    )));
                }
            }
        }
        if let Some((n, _)) = params
            .iter()
            .find(|(n, _)| !opt_params.iter().any(|(on, _)| on == n))
        {
            return Err(PeftError::Invalid(format!(
                "parameter `{n}` is not in any of the optimizer's groups"
            )));
        }
        Ok(Self {
            rng: PeftRng::new(settings.seed).fork("trainer/data"),
            params,
            optimizer,
            scheduler: LrScheduler::new(schedule),
            settings,
            metrics: Vec::new(),
            window: LogWindow::default(),
            log: None,
            extra_losses: Vec::new(),
            grad_projections: IndexMap::new(),
            hooks: Vec::new(),
            progress: None,
            last: None,
            last_eval: None,
            session_time: Duration::ZERO,
            session_steps: 0,
        })
    }

    /// Appends metrics records to `log` from now on (attach it before [`Trainer::resume`], which rewrites the
    /// file to the checkpoint's records).
    pub fn set_metrics_log(&mut self, log: MetricsLog) {
        self.log = Some(log);
    }

    /// Calls `callback` after every step and evaluation.
    pub fn set_progress(&mut self, callback: ProgressCallback) {
        self.progress = Some(callback);
    }

    /// Adds a loss term to every micro-batch's loss (reported under `name`).
    pub fn add_extra_loss(&mut self, name: impl Into<String>, term: ExtraLoss) {
        self.extra_losses.push((name.into(), term));
    }

    /// Projects the gradient of the parameter `name` (one of [`params`](Self::params)) with `projection`
    /// before clipping and the optimizer step (PEFT's gradient hooks: OSF's, from
    /// [`crate::PeftModel::gradient_projections`]).
    pub fn add_grad_projection(
        &mut self,
        name: impl Into<String>,
        projection: crate::layer::GradProjection,
    ) {
        self.grad_projections.insert(name.into(), projection);
    }

    /// Adds a hook called after every optimizer step.
    pub fn add_step_hook(&mut self, hook: StepHook) {
        self.hooks.push(hook);
    }

    /// The trained parameters.
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// The optimizer.
    pub fn optimizer(&self) -> &dyn Optimizer {
        self.optimizer.as_ref()
    }

    /// The optimizer, mutably (to change its learning rate, say).
    pub fn optimizer_mut(&mut self) -> &mut dyn Optimizer {
        self.optimizer.as_mut()
    }

    /// The schedule and its step count.
    pub fn scheduler(&self) -> &LrScheduler {
        &self.scheduler
    }

    /// The settings.
    pub fn settings(&self) -> &TrainerSettings {
        &self.settings
    }

    /// Optimizer steps completed.
    pub fn step(&self) -> u64 {
        self.scheduler.step
    }

    /// Whether `max_steps` steps are done.
    pub fn is_finished(&self) -> bool {
        self.step() >= self.settings.max_steps
    }

    /// Whether an evaluation is due after the step just taken (every `eval_every` steps and at the last).
    pub fn should_evaluate(&self) -> bool {
        let (s, e) = (self.step(), self.settings.eval_every);
        e > 0 && s > 0 && (s.is_multiple_of(e) || s == self.settings.max_steps)
    }

    /// The trainer's generator, seeded from the run's seed and checkpointed: draw data order from it.
    pub fn rng_mut(&mut self) -> &mut PeftRng {
        &mut self.rng
    }

    /// Every metrics record so far (train windows and evaluations).
    pub fn metrics(&self) -> &[MetricRecord] {
        &self.metrics
    }

    /// The context micro-batch `micro` of the next step runs with.
    pub fn forward_ctx(&self, micro: usize) -> ForwardCtx {
        ForwardCtx::train(
            self.settings.seed,
            self.step() * self.settings.grad_accum_steps as u64 + micro as u64,
        )
    }

    /// One optimizer step over `grad_accum_steps` micro-batches; `micro_batch(i, ctx)` runs the forward of
    /// micro-batch `i` with `ctx` and returns its scalar (mean) loss.
    pub fn train_step(
        &mut self,
        micro_batch: &mut dyn FnMut(usize, &ForwardCtx) -> Result<Tensor>,
    ) -> Result<StepReport> {
        self.step_impl(&mut |i, ctx| Ok((micro_batch(i, ctx)?, None, None)))
    }

    /// [`Trainer::train_step`] where each micro-batch also reports its number of tokens (for tokens/s).
    pub fn train_step_with_tokens(
        &mut self,
        micro_batch: &mut MicroBatchWithTokens<'_>,
    ) -> Result<StepReport> {
        self.step_impl(&mut |i, ctx| {
            let (l, n) = micro_batch(i, ctx)?;
            Ok((l, Some(n as u64), None))
        })
    }

    /// [`Trainer::train_step_with_tokens`] where each micro-batch computes the gradients of its loss itself
    /// (a gradient-checkpointed forward and backward, e.g. `LlamaForCausalLM::checkpointed_loss` in
    /// peft-models). The extra loss terms are still added and backpropagated here; the step is otherwise the
    /// same (accumulation, clipping, hooks).
    pub fn train_step_with_grads(
        &mut self,
        micro_batch: &mut MicroBatchWithGrads<'_>,
    ) -> Result<StepReport> {
        self.step_impl(&mut |i, ctx| {
            let m = micro_batch(i, ctx)?;
            Ok((m.loss, Some(m.tokens as u64), Some(m.grads)))
        })
    }

    fn step_impl(&mut self, micro_batch: &mut MicroBatchInner<'_>) -> Result<StepReport> {
        let start = Instant::now();
        let accum = self.settings.grad_accum_steps;
        let mut acc: IndexMap<String, Tensor> = IndexMap::new();
        let mut loss_sum = 0.0f64;
        let mut tokens: Option<u64> = None;
        let mut extra: IndexMap<String, f64> = IndexMap::new();
        for i in 0..accum {
            let ctx = self.forward_ctx(i);
            let (loss, n, pre) = micro_batch(i, &ctx)?;
            let loss = scalar_loss(loss, "micro-batch loss")?;
            loss_sum += f64::from(loss.to_scalar::<f32>()?);
            // With precomputed gradients only the extra terms are backpropagated here.
            let mut total = if pre.is_some() { None } else { Some(loss) };
            for (name, term) in &mut self.extra_losses {
                let e = scalar_loss(term(i, &ctx)?, name)?;
                let v = f64::from(e.to_scalar::<f32>()?);
                *extra.entry(name.clone()).or_insert(0.0) += v;
                loss_sum += v;
                total = Some(match total {
                    Some(t) => (t + e)?,
                    None => e,
                });
            }
            if let Some(n) = n {
                tokens = Some(tokens.unwrap_or(0) + n);
            }
            let scale = |t: Tensor| -> Result<Tensor> {
                Ok(if accum > 1 {
                    t.affine(1.0 / accum as f64, 0.0)?
                } else {
                    t
                })
            };
            // The micro-batch's gradients are scaled by 1 / accum after the backward, not at its root, so
            // that precomputed (checkpointed) gradients get the very same bits as the plain backward's.
            let backward = match total {
                Some(t) => Some(t.backward()?),
                None => None,
            };
            for (name, var) in &self.params {
                let from_pre = pre.as_ref().and_then(|p| p.get(var)).cloned();
                let from_backward = backward.as_ref().and_then(|b| b.get(var)).cloned();
                let g = match (from_pre, from_backward) {
                    (Some(a), Some(b)) => Some((a + b)?),
                    (a, b) => a.or(b),
                };
                if let Some(g) = g {
                    let g = scale(g)?;
                    let g = match acc.get(name) {
                        Some(a) => (a + g)?,
                        None => g.clone(),
                    };
                    acc.insert(name.clone(), g);
                }
            }
        }
        for (name, p) in &self.grad_projections {
            if let Some(g) = acc.get(name) {
                let projected = p.apply(g)?;
                acc.insert(name.clone(), projected);
            }
        }
        // Clip in parameter order.
        let names: Vec<String> = self
            .params
            .iter()
            .filter(|(n, _)| acc.contains_key(n))
            .map(|(n, _)| n.clone())
            .collect();
        let mut gs: Vec<Tensor> = names.iter().map(|n| acc[n].clone()).collect();
        let grad_norm = match self.settings.max_grad_norm {
            Some(m) => clip_grad_norm(&mut gs, m)?,
            None => global_grad_norm(&gs)?,
        };
        let clipped = self
            .settings
            .max_grad_norm
            .is_some_and(|m| m / (grad_norm + 1e-6) < 1.0);
        let grads: IndexMap<String, Tensor> = names.into_iter().zip(gs).collect();
        let mut store = GradStore::default();
        for (name, var) in &self.params {
            if let Some(g) = grads.get(name) {
                store.insert(var.as_tensor(), g.clone());
            }
        }
        self.optimizer.set_lr_factor(self.scheduler.factor());
        let lr = self.optimizer.learning_rate();
        self.optimizer.step(&store)?;
        drop(store);
        self.scheduler.step();
        let step = self.scheduler.step;
        for hook in &mut self.hooks {
            hook(&StepContext {
                step,
                lr,
                params: &self.params,
                grads: &grads,
            })?;
        }
        let step_time = start.elapsed();
        let secs = step_time.as_secs_f64();
        let report = StepReport {
            step,
            loss: loss_sum / accum as f64,
            lr,
            grad_norm,
            clipped,
            tokens,
            tokens_per_s: tokens.filter(|_| secs > 0.0).map(|t| t as f64 / secs),
            step_time,
            extra: extra
                .into_iter()
                .map(|(k, v)| (k, v / accum as f64))
                .collect(),
        };
        self.session_time += step_time;
        self.session_steps += 1;
        self.record_step(&report)?;
        self.last = Some(report.clone());
        self.report_progress();
        Ok(report)
    }

    /// Adds a step to the logging window and writes the window's record when it is full.
    fn record_step(&mut self, r: &StepReport) -> Result<()> {
        let w = &mut self.window;
        w.steps += 1;
        w.loss_sum += r.loss;
        w.time_s += r.step_time.as_secs_f64();
        if let Some(t) = r.tokens {
            w.tokens = Some(w.tokens.unwrap_or(0) + t);
        }
        for (k, v) in &r.extra {
            *w.extra_sums.entry(k.clone()).or_insert(0.0) += v;
        }
        if !r.step.is_multiple_of(self.settings.log_every) && r.step != self.settings.max_steps {
            return Ok(());
        }
        let w = std::mem::take(&mut self.window);
        let n = w.steps as f64;
        let record = MetricRecord::Train(TrainRecord {
            step: r.step,
            loss: w.loss_sum / n,
            lr: r.lr,
            grad_norm: r.grad_norm,
            tokens: w.tokens,
            tokens_per_s: w
                .tokens
                .filter(|_| w.time_s > 0.0)
                .map(|t| t as f64 / w.time_s),
            step_time_s: w.time_s,
            extra: w.extra_sums.into_iter().map(|(k, v)| (k, v / n)).collect(),
        });
        self.push_record(record)
    }

    fn push_record(&mut self, record: MetricRecord) -> Result<()> {
        if let Some(log) = &mut self.log {
            log.write(&record)?;
        }
        self.metrics.push(record);
        Ok(())
    }

    fn report_progress(&mut self) {
        let Some(cb) = &mut self.progress else {
            return;
        };
        let step = self.scheduler.step;
        let max_steps = self.settings.max_steps;
        let eta = (self.session_steps > 0).then(|| {
            self.session_time
                .mul_f64(max_steps.saturating_sub(step) as f64 / self.session_steps as f64)
        });
        let last = self.last.as_ref();
        cb(&Progress {
            step,
            max_steps,
            loss: last.map_or(f64::NAN, |r| r.loss),
            lr: last.map_or(self.optimizer.learning_rate(), |r| r.lr),
            grad_norm: last.map_or(f64::NAN, |r| r.grad_norm),
            tokens_per_s: last.and_then(|r| r.tokens_per_s),
            eval_loss: self.last_eval,
            elapsed: self.session_time,
            eta,
        });
    }

    /// Evaluates over `num_batches` batches: `batch(i, ctx)` runs batch `i` in inference mode and returns
    /// its summed negative log-likelihood and its number of tokens. Returns (and records) the mean loss per
    /// token.
    pub fn evaluate(
        &mut self,
        num_batches: usize,
        batch: &mut EvalBatch<'_>,
    ) -> Result<EvalRecord> {
        let start = Instant::now();
        let ctx = ForwardCtx::inference();
        let (mut nll, mut tokens) = (0.0f64, 0u64);
        for i in 0..num_batches {
            let (s, n) = batch(i, &ctx)?;
            nll += s;
            tokens += n as u64;
        }
        if tokens == 0 {
            return Err(PeftError::Invalid(
                "evaluation saw no tokens: nothing to average".into(),
            ));
        }
        let record = EvalRecord {
            step: self.step(),
            eval_loss: nll / tokens as f64,
            eval_tokens: tokens,
            eval_time_s: start.elapsed().as_secs_f64(),
        };
        self.push_record(MetricRecord::Eval(record.clone()))?;
        self.last_eval = Some(record.eval_loss);
        self.report_progress();
        Ok(record)
    }

    /// Writes the loss curve of the records so far as an SVG image.
    pub fn write_loss_curve(&self, path: impl AsRef<Path>, title: &str) -> Result<()> {
        super::metrics::write_loss_curve(path, &self.metrics, title)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::{Sgd, SgdConfig};
    use candle_core::Device;

    #[test]
    fn trainer_is_send() {
        fn send<T: Send>() {}
        send::<Trainer>();
    }

    #[test]
    fn optimizer_must_hold_exactly_the_params() {
        let a = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let b = Var::new(&[1.0f32], &Device::Cpu).unwrap();
        let opt = |ps: Vec<(String, Var)>| -> Box<dyn Optimizer> {
            Box::new(Sgd::from_params(ps, SgdConfig::default()).unwrap())
        };
        let both = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
        let only_a = vec![("a".to_string(), a.clone())];
        assert!(
            Trainer::new(
                both.clone(),
                opt(only_a.clone()),
                Schedule::Constant,
                Default::default()
            )
            .is_err()
        );
        assert!(
            Trainer::new(
                only_a.clone(),
                opt(both.clone()),
                Schedule::Constant,
                Default::default()
            )
            .is_err()
        );
        let swapped = vec![("a".to_string(), b)];
        assert!(
            Trainer::new(
                only_a.clone(),
                opt(swapped),
                Schedule::Constant,
                Default::default()
            )
            .is_err()
        );
        assert!(
            Trainer::new(
                both.clone(),
                opt(both),
                Schedule::Constant,
                Default::default()
            )
            .is_ok()
        );
    }

    #[test]
    fn extra_loss_and_hook_run_every_step() {
        let w = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let params = vec![("w".to_string(), w.clone())];
        let opt = Sgd::from_params(
            params.clone(),
            SgdConfig {
                lr: 0.1,
                ..Default::default()
            },
        )
        .unwrap();
        let settings = TrainerSettings {
            grad_accum_steps: 2,
            max_grad_norm: None,
            ..Default::default()
        };
        let mut t = Trainer::new(params, Box::new(opt), Schedule::Constant, settings).unwrap();
        let w2 = w.clone();
        t.add_extra_loss(
            "l2",
            Box::new(move |_, _| Ok(w2.as_tensor().sqr()?.sum_all()?)),
        );
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        t.add_step_hook(Box::new(move |c| {
            seen2
                .lock()
                .unwrap()
                .push((c.step, c.grads["w"].to_vec1::<f32>()?));
            Ok(())
        }));
        let r = t
            .train_step(&mut |_, _| Ok(Tensor::new(0.5f32, &Device::Cpu)?))
            .unwrap();
        // loss = 0.5 + ‖w‖² = 5.5 in each micro-batch; grad = 2w (halved twice, summed).
        assert_eq!(r.loss, 5.5);
        assert_eq!(r.extra["l2"], 5.0);
        assert_eq!(*seen.lock().unwrap(), vec![(1, vec![2.0, 4.0])]);
        assert_eq!(w.to_vec1::<f32>().unwrap(), vec![0.8, 1.6]);
    }
}
