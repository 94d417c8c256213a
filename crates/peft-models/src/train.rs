//! The training loop of `peft train`, as one library function: [`train`].
//!
//! It takes a [`PeftModel`] over a [`LlamaForCausalLM`] with its adapter already attached
//! ([`PeftModel::get_peft_model`]: any layer method, AdaLoRA's rank allocator included, or prompt learning) and
//! runs the whole job: data preparation (the eval split capped at [`TrainOptions::eval_max_examples`]), the
//! trainer (optimizer, schedule, clipping, accumulation), evaluation before and after (the one before at the
//! starting step, so that it is on the loss curve), periodic evaluations, `metrics.jsonl`, resumption from a
//! checkpoint, periodic and final checkpoints, timing, sample generations, the loss curve, the adapter in
//! PEFT's format and `summary.json`. It prints nothing: what happens is reported through a callback of
//! [`TrainEvent`]s (the CLI prints them and draws its progress bar from [`TrainEvent::Progress`]).
//!
//! The output directory holds `adapter/`, `metrics.jsonl`, `loss_curve.svg`, `checkpoints/` (`step-N/` every
//! [`TrainOptions::save_every`] steps and at the end, `last`: a symlink to the newest complete one, swapped in
//! one rename, so that `--resume checkpoints/last` after a crash continues from the last complete checkpoint)
//! and `summary.json`. Checkpoints, the adapter and `summary.json` are written atomically (`metrics.jsonl` is
//! an append log, rewritten from the checkpoint on resume); temporaries a killed run left in the output
//! directory, `adapter/` and `checkpoints/` are removed at the start ([`peft::io::remove_stale_temps`]).
//!
//! ```
//! use candle_core::{DType, Device};
//! use peft::PeftModel;
//! use peft::config::{LoraConfig, LoraFields, PeftConfig, TargetFields};
//! use peft_models::llama::{LlamaConfig, LlamaForCausalLM};
//! use peft_models::train::{TrainOptions, train};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = LlamaConfig::from_value(&serde_json::json!({
//!     "model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
//!     "num_key_value_heads": 1, "vocab_size": 16,
//! }))?;
//! let tensors = LlamaForCausalLM::random_tensors(&config, 0, DType::F32, &Device::Cpu)?;
//! let model = LlamaForCausalLM::from_tensors(config, tensors, &Device::Cpu)?;
//! let lora = PeftConfig::Lora(LoraConfig {
//!     lora: LoraFields { r: 4, lora_alpha: 8.0, ..Default::default() },
//!     targets: TargetFields::modules(["q_proj", "v_proj"]),
//!     ..Default::default()
//! });
//! let mut model = PeftModel::get_peft_model(model, lora, "default", 0)?;
//!
//! // Pre-tokenized data (no tokenizer needed): one sequence, 20 times.
//! let tmp = tempfile::tempdir()?;
//! let row = r#"{"input_ids": [1, 4, 7, 10, 13, 0, 3, 6, 9, 12]}"#;
//! std::fs::write(tmp.path().join("data.jsonl"), vec![row; 20].join("\n"))?;
//! let mut options = TrainOptions::new(tmp.path().join("data.jsonl"), tmp.path().join("run"));
//! options.steps = Some(10);
//! options.lr = 2e-2;
//! let summary = train(&mut model, None, &options, &mut |_event| Ok(()))?;
//! assert_eq!(summary.steps, 10);
//! assert!(summary.eval_loss_after < summary.eval_loss_before);
//! assert!(tmp.path().join("run/adapter/adapter_model.safetensors").is_file());
//! # Ok(()) }
//! ```

use crate::causal_lm::CausalLm;
use crate::data::{Batch, Batcher, DataConfig, causal_lm_loss, causal_lm_sum_nll, load_splits};
use crate::error::{ModelError, Result};
use crate::eval::EvalResult;
use crate::generate::{Sampling, generate, prompt_ids};
use crate::llama::LlamaForCausalLM;
use crate::load::require_tokenizer;
use crate::tokenizer::Tokenizer;
use candle_core::{Device, Var};
use peft::train::lorafa::{LoraFa, LoraFaConfig, split_lora_params};
use peft::train::loraplus::{LoraPlusConfig, loraplus_groups};
use peft::train::metrics::{MetricRecord, MetricsLog, Progress};
use peft::train::optim::{AdamW, AdamWConfig, Optimizer, ParamGroup, Sgd, SgdConfig};
use peft::train::schedule::Schedule;
use peft::train::trainer::{Trainer, TrainerSettings};
use peft::{PeftConfig, PeftModel};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// The optimizer of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OptimizerKind {
    /// [`AdamW`] (PyTorch's, decoupled weight decay).
    #[default]
    AdamW,
    /// [`Sgd`] (PyTorch's, with momentum).
    Sgd,
    /// [`LoraFa`] (PEFT's `create_lorafa_optimizer`): LoRA's `A` frozen, `B`'s gradient projected, a Hugging
    /// Face AdamW step. LoRA adapters only (no DoRA, `lora_bias` or Embedding targets).
    LoraFa,
}

impl FromStr for OptimizerKind {
    type Err = ModelError;

    /// `adamw`, `sgd` or `lorafa`.
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "adamw" => Ok(OptimizerKind::AdamW),
            "sgd" => Ok(OptimizerKind::Sgd),
            "lorafa" => Ok(OptimizerKind::LoraFa),
            other => Err(ModelError::Invalid(format!(
                "unknown optimizer {other:?} (adamw, sgd or lorafa)"
            ))),
        }
    }
}

/// A prompt to generate from before and after training (greedy, with the run's seed).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplePrompt {
    /// The prompt.
    pub prompt: String,
    /// Render it with the chat template, as a user turn.
    pub chat: bool,
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
}

/// The options of [`train`] (the flags of `peft train` that are not about the model or the adapter).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    /// Training data: plain text (a file or a directory), or JSONL (`text`, `prompt`/`completion`,
    /// `messages`, or pre-tokenized `input_ids`, the only kind that needs no tokenizer).
    pub data: PathBuf,
    /// Evaluation data (default: the last 5% of the training data).
    pub eval_data: Option<PathBuf>,
    /// The output directory.
    pub output: PathBuf,
    /// The optimizer.
    pub optimizer: OptimizerKind,
    /// Peak learning rate.
    pub lr: f64,
    /// Weight decay (decoupled for AdamW and LoRA-FA; with LoRA+, PEFT's `loraplus_weight_decay`).
    pub weight_decay: f64,
    /// LoRA+ (PEFT's `create_loraplus_optimizer`): train LoRA's `B` (and 1-D parameters) at this many times
    /// the learning rate, see [`peft::train::loraplus`]. With `adamw` or `sgd`.
    pub loraplus_lr_ratio: Option<f64>,
    /// LoRA+'s learning rate of Embedding LoRA weights (PEFT's `loraplus_lr_embedding`, default 1e-6).
    pub loraplus_lr_embedding: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// Learning-rate schedule: `constant`, `constant_with_warmup`, `linear` or `cosine`.
    pub schedule: String,
    /// Warm-up steps.
    pub warmup_steps: u64,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Tokens per example.
    pub seq_len: usize,
    /// Optimizer steps (default: [`TrainOptions::epochs`] epochs).
    pub steps: Option<u64>,
    /// Epochs, when `steps` is not given.
    pub epochs: f64,
    /// Clip the global gradient norm (0: off).
    pub max_grad_norm: f64,
    /// Evaluate every N steps (0: only before and after).
    pub eval_every: u64,
    /// Evaluate on at most this many examples of the eval split.
    pub eval_max_examples: usize,
    /// Save a checkpoint every N steps under `checkpoints/` (0: only at the end).
    pub save_every: u64,
    /// Resume from a checkpoint directory.
    pub resume: Option<PathBuf>,
    /// Seed of the trainer (dropout, shuffling).
    pub seed: u64,
    /// A prompt to generate from before and after training (needs a tokenizer).
    pub sample: Option<SamplePrompt>,
    /// Gradient checkpointing ([`LlamaForCausalLM::checkpointed_loss`]): keep only each decoder layer's input
    /// and recompute the layers in the backward, for much less activation memory and one more forward of
    /// compute (transformers' `gradient_checkpointing_enable()`). Layer adapters only: a prompt-learning
    /// adapter with this set is an error.
    pub gradient_checkpointing: bool,
}

impl TrainOptions {
    /// `peft train`'s defaults: AdamW at 1e-3, cosine schedule, no warm-up, 4 examples of 64 tokens, one
    /// epoch, clipping at 1.0, evaluation before and after on at most 64 examples, a checkpoint at the end,
    /// seed 42, no sample, no gradient checkpointing.
    pub fn new(data: impl Into<PathBuf>, output: impl Into<PathBuf>) -> Self {
        Self {
            data: data.into(),
            eval_data: None,
            output: output.into(),
            optimizer: OptimizerKind::AdamW,
            lr: 1e-3,
            weight_decay: 0.0,
            loraplus_lr_ratio: None,
            loraplus_lr_embedding: 1e-6,
            momentum: 0.0,
            schedule: "cosine".into(),
            warmup_steps: 0,
            batch_size: 4,
            grad_accum: 1,
            seq_len: 64,
            steps: None,
            epochs: 1.0,
            max_grad_norm: 1.0,
            eval_every: 0,
            eval_max_examples: 64,
            save_every: 0,
            resume: None,
            seed: 42,
            sample: None,
            gradient_checkpointing: false,
        }
    }

    /// `metrics.jsonl` in the output directory.
    pub fn metrics_path(&self) -> PathBuf {
        self.output.join("metrics.jsonl")
    }

    /// `loss_curve.svg` in the output directory.
    pub fn loss_curve_path(&self) -> PathBuf {
        self.output.join("loss_curve.svg")
    }

    /// `checkpoints/` in the output directory: `step-N/` directories and `last`, a symlink to the newest.
    pub fn checkpoints_dir(&self) -> PathBuf {
        self.output.join("checkpoints")
    }

    /// `adapter/` in the output directory.
    pub fn adapter_dir(&self) -> PathBuf {
        self.output.join("adapter")
    }
}

/// What [`train`] reports as it goes, in this order.
#[derive(Debug)]
pub enum TrainEvent<'a> {
    /// The data is loaded.
    Data {
        /// Training examples.
        train_examples: usize,
        /// Evaluation examples (after the cap).
        eval_examples: usize,
        /// Tokens per example at most.
        seq_len: usize,
        /// The step count the run stops at.
        max_steps: u64,
        /// Examples per micro-batch.
        batch_size: usize,
        /// Micro-batches per step.
        grad_accum: usize,
    },
    /// The trainer and the data cursor were restored from a checkpoint.
    Resumed {
        /// The step resumed at.
        step: u64,
        /// The checkpoint directory.
        from: &'a Path,
    },
    /// The evaluation before training (recorded at the starting step).
    EvalBefore(&'a EvalResult),
    /// A sample generation (`when` is `"before"` or `"after"`).
    Sample {
        /// `"before"` or `"after"` training.
        when: &'static str,
        /// The prompt.
        prompt: &'a str,
        /// The generated text.
        completion: &'a str,
    },
    /// The training loop starts.
    Start {
        /// The step it starts at (non-zero when resumed).
        step: u64,
        /// The step it stops at.
        max_steps: u64,
    },
    /// After every step and evaluation of the loop.
    Progress(&'a Progress),
    /// The training loop ended.
    Trained {
        /// Steps run in this session.
        steps: u64,
        /// Wall time of the loop, seconds.
        seconds: f64,
    },
    /// The evaluation after training.
    EvalAfter {
        /// After training.
        after: &'a EvalResult,
        /// Before training.
        before: &'a EvalResult,
    },
    /// AdaLoRA: the ranks the allocator kept (written into the config's `rank_pattern`).
    AdaLoraRanks {
        /// Ranks kept.
        kept: usize,
        /// Ranks in all.
        total: usize,
    },
    /// The adapter is saved in PEFT's format.
    Saved {
        /// The adapter directory.
        adapter: &'a Path,
        /// The loss curve.
        loss_curve: &'a Path,
    },
}

/// Refuses a run whose outputs alias its data ([`peft::io::ensure_no_alias`]): the files and directories it
/// writes (`adapter/`, `metrics.jsonl`, `loss_curve.svg`, `summary.json`, `checkpoints/`) must not be, hold
/// or lie inside the training or evaluation data. (The checkpoint resumed from lies inside `checkpoints/` by
/// design: it is read whole before anything is written.)
pub fn check_outputs(options: &TrainOptions) -> Result<()> {
    let mut inputs = vec![("the training data", options.data.as_path())];
    if let Some(e) = &options.eval_data {
        inputs.push(("the evaluation data", e.as_path()));
    }
    let outputs = [
        options.adapter_dir(),
        options.metrics_path(),
        options.loss_curve_path(),
        options.output.join("summary.json"),
        options.checkpoints_dir(),
    ];
    let outputs: Vec<&Path> = outputs.iter().map(PathBuf::as_path).collect();
    Ok(peft::io::ensure_no_alias(&inputs, &outputs)?)
}

/// What a training run achieved (also written to `summary.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    /// Eval loss before training.
    pub eval_loss_before: f64,
    /// Eval loss after training.
    pub eval_loss_after: f64,
    /// Optimizer steps run (in this session).
    pub steps: u64,
    /// Wall time of the training loop, seconds.
    pub train_seconds: f64,
}

/// The trainer of a run: the optimizer and schedule chosen by `options` over `params`.
///
/// `lora_scaling` gives a LoRA layer's scaling by module name, for LoRA-FA (which trains `params` without
/// the `lora_A`s); the other optimizers do not call it.
pub fn build_trainer(
    options: &TrainOptions,
    params: Vec<(String, Var)>,
    lora_scaling: &dyn Fn(&str) -> Option<f64>,
    max_steps: u64,
) -> Result<Trainer> {
    if options.loraplus_lr_ratio.is_some() && options.optimizer == OptimizerKind::LoraFa {
        return Err(ModelError::Invalid(
            "LoRA+ (--loraplus-lr-ratio) groups the parameters of adamw or sgd; it does not combine with \
             lorafa"
                .into(),
        ));
    }
    let groups = |params: Vec<(String, Var)>| -> Result<Vec<ParamGroup>> {
        Ok(match options.loraplus_lr_ratio {
            Some(ratio) => loraplus_groups(
                params,
                &LoraPlusConfig {
                    lr_ratio: ratio,
                    lr_embedding: options.loraplus_lr_embedding,
                    weight_decay: options.weight_decay,
                },
            )?,
            None => vec![ParamGroup::new(params)],
        })
    };
    let mut params = params;
    let optimizer: Box<dyn Optimizer> = match options.optimizer {
        OptimizerKind::AdamW => Box::new(AdamW::new(
            groups(params.clone())?,
            AdamWConfig {
                lr: options.lr,
                weight_decay: options.weight_decay,
                ..Default::default()
            },
        )?),
        OptimizerKind::LoraFa => {
            let (kept, projections) = split_lora_params(params, lora_scaling)?;
            params = kept;
            Box::new(LoraFa::new(
                params.clone(),
                projections,
                LoraFaConfig {
                    lr: options.lr,
                    weight_decay: options.weight_decay,
                    ..Default::default()
                },
            )?)
        }
        OptimizerKind::Sgd => Box::new(Sgd::new(
            groups(params.clone())?,
            SgdConfig {
                lr: options.lr,
                momentum: options.momentum,
                weight_decay: options.weight_decay,
                ..Default::default()
            },
        )?),
    };
    let schedule = Schedule::from_name(&options.schedule, options.warmup_steps, max_steps)?;
    let settings = TrainerSettings {
        grad_accum_steps: options.grad_accum,
        max_grad_norm: (options.max_grad_norm > 0.0).then_some(options.max_grad_norm),
        max_steps,
        eval_every: options.eval_every,
        seed: options.seed,
        log_every: 1,
    };
    Ok(Trainer::new(params, optimizer, schedule, settings)?)
}

/// Runs one evaluation through the trainer (so that it is recorded in the metrics and on the curve).
fn evaluate_recorded(
    trainer: &mut Trainer,
    model: &impl CausalLm,
    batches: &[Batch],
) -> Result<EvalResult> {
    let rec = trainer.evaluate(batches.len(), &mut |i, ctx| {
        let b = &batches[i];
        let logits = model.token_logits(&b.input_ids, Some(&b.attention_mask), ctx)?;
        let (s, n) = causal_lm_sum_nll(&logits, &b.labels)?;
        Ok((s.to_scalar::<f32>()? as f64, n))
    })?;
    Ok(EvalResult {
        mean_nll: rec.eval_loss,
        perplexity: rec.eval_loss.exp(),
        tokens: rec.eval_tokens as usize,
    })
}

/// Trains the active adapter of `model` (a layer adapter, or its prompt-learning adapter) as `peft train`
/// does, writing everything into [`TrainOptions::output`]; see the [module documentation](self).
///
/// `tokenizer` may be `None` for pre-tokenized data (JSONL `input_ids`); text data and sample prompts then fail
/// with an error naming the missing `tokenizer.json`. `on_event` sees every [`TrainEvent`]; an error it
/// returns stops the run.
pub fn train(
    model: &mut PeftModel<LlamaForCausalLM>,
    tokenizer: Option<&Tokenizer>,
    options: &TrainOptions,
    on_event: &mut dyn FnMut(TrainEvent<'_>) -> Result<()>,
) -> Result<TrainSummary> {
    let device: Device = model.model().device().clone();
    let adalora = model
        .active_adapters()
        .first()
        .and_then(|n| model.configs().get(n))
        .and_then(|c| match c {
            PeftConfig::AdaLora(a) => Some(a.clone()),
            _ => None,
        });
    if adalora.is_some() && options.resume.is_some() {
        return Err(ModelError::Invalid(
            "resuming AdaLoRA training is not supported (the rank allocator's importance scores are not \
             checkpointed)"
                .into(),
        ));
    }
    if options.gradient_checkpointing && model.prompt_learning().is_some() {
        return Err(ModelError::Invalid(
            "gradient checkpointing works with layer adapters (LoRA, IA3, …), not with a prompt-learning \
             adapter: train it without --gradient-checkpointing"
                .into(),
        ));
    }
    check_outputs(options)?;
    let sample_ids = match &options.sample {
        Some(s) => {
            let tok = require_tokenizer(tokenizer, "a sample prompt")?;
            Some((s, prompt_ids(tok, &s.prompt, s.chat)?, tok))
        }
        None => None,
    };

    // Data.
    let splits = load_splits(
        &options.data,
        options.eval_data.as_deref(),
        tokenizer,
        &DataConfig::new(options.seq_len).with_vocab_size(model.model().config().vocab_size),
    )
    .map_err(|e| e.context(format!("loading {}", options.data.display())))?;
    let mut eval_set = splits.eval.clone();
    eval_set.examples.truncate(options.eval_max_examples.max(1));
    let pad = crate::data::pad_token_id(tokenizer);
    let mut batcher = Batcher::new(splits.train.len(), options.batch_size, options.seed, pad)?;
    let per_epoch = (batcher.batches_per_epoch() as u64)
        .div_ceil(options.grad_accum as u64)
        .max(1);
    let max_steps = options
        .steps
        .unwrap_or(((per_epoch as f64) * options.epochs).ceil() as u64)
        .max(1);
    on_event(TrainEvent::Data {
        train_examples: splits.train.len(),
        eval_examples: eval_set.len(),
        seq_len: options.seq_len,
        max_steps,
        batch_size: options.batch_size,
        grad_accum: options.grad_accum,
    })?;

    // Trainer, AdaLoRA's regulariser and allocator, metrics log, resumption.
    let params = model.trainable_vars();
    let lora = model
        .active_adapters()
        .first()
        .and_then(|n| model.configs().get(n))
        .and_then(|c| match c {
            PeftConfig::Lora(l) => Some(l.clone()),
            _ => None,
        });
    if options.optimizer == OptimizerKind::LoraFa
        && (lora.is_none() || model.active_adapters().len() != 1)
    {
        return Err(ModelError::Invalid(
            "the lorafa optimizer (PEFT's create_lorafa_optimizer) trains one LoRA adapter; the active adapter \
             is not LoRA"
                .into(),
        ));
    }
    let scaling = |module: &str| {
        lora.as_ref()
            .map(|l| peft::tuners::lora::layer::LoraOptions::from_config(l, module).scaling())
    };
    let mut trainer = build_trainer(options, params.clone(), &scaling, max_steps)?;
    for (name, projection) in model.gradient_projections() {
        trainer.add_grad_projection(name, projection);
    }
    let allocator = match &adalora {
        Some(a) => Some(peft::tuners::adalora::attach_adalora(
            &mut trainer,
            &params,
            a,
        )?),
        None => None,
    };
    std::fs::create_dir_all(&options.output).map_err(|e| ModelError::io(&options.output, e))?;
    for dir in [
        options.output.clone(),
        options.adapter_dir(),
        options.checkpoints_dir(),
    ] {
        peft::io::remove_stale_temps(&dir)?;
    }
    let log = if options.resume.is_some() {
        MetricsLog::append(options.metrics_path())?
    } else {
        MetricsLog::create(options.metrics_path())?
    };
    trainer.set_metrics_log(log);
    if let Some(dir) = &options.resume {
        let cursor = trainer
            .resume(dir)
            .map_err(|e| ModelError::from(e).context(format!("resuming from {}", dir.display())))?;
        batcher.restore(&cursor)?;
        on_event(TrainEvent::Resumed {
            step: trainer.step(),
            from: dir,
        })?;
    }
    let progress: Arc<Mutex<Option<Progress>>> = Arc::default();
    let sink = progress.clone();
    trainer.set_progress(Box::new(move |p| {
        if let Ok(mut slot) = sink.lock() {
            *slot = Some(p.clone());
        }
    }));
    let take_progress = || progress.lock().ok().and_then(|mut p| p.take());

    let eval_batches: Vec<Batch> = eval_set
        .eval_batches(options.batch_size, pad, &device)
        .collect::<Result<_>>()?;
    let pm: &PeftModel<LlamaForCausalLM> = model;
    let sample = |when: &'static str,
                  on_event: &mut dyn FnMut(TrainEvent<'_>) -> Result<()>|
     -> Result<()> {
        if let Some((s, ids, tok)) = &sample_ids {
            let sampling = Sampling {
                seed: options.seed,
                ..Sampling::greedy(s.max_new_tokens)
            };
            let text = generate(pm, tok, ids, &sampling, &mut |_| Ok(()))?;
            on_event(TrainEvent::Sample {
                when,
                prompt: &s.prompt,
                completion: &text,
            })?;
        }
        Ok(())
    };

    // Before.
    let eval_before = evaluate_recorded(&mut trainer, pm, &eval_batches)?;
    take_progress();
    on_event(TrainEvent::EvalBefore(&eval_before))?;
    sample("before", on_event)?;

    // The loop.
    on_event(TrainEvent::Start {
        step: trainer.step(),
        max_steps,
    })?;
    let start_step = trainer.step();
    let train_start = Instant::now();
    while !trainer.is_finished() {
        if options.gradient_checkpointing {
            trainer.train_step_with_grads(&mut |_, ctx| {
                let batch = batcher.next_batch(&splits.train, &device)?;
                pm.model().checkpointed_loss(
                    &batch.input_ids,
                    Some(&batch.attention_mask),
                    &batch.labels,
                    ctx,
                )
            })?;
        } else {
            trainer.train_step_with_tokens(&mut |_, ctx| {
                let batch = batcher.next_batch(&splits.train, &device)?;
                let logits = pm.token_logits(&batch.input_ids, Some(&batch.attention_mask), ctx)?;
                Ok(causal_lm_loss(&logits, &batch.labels)?)
            })?;
        }
        if let Some(p) = take_progress() {
            on_event(TrainEvent::Progress(&p))?;
        }
        if trainer.should_evaluate() {
            evaluate_recorded(&mut trainer, pm, &eval_batches)?;
            if let Some(p) = take_progress() {
                on_event(TrainEvent::Progress(&p))?;
            }
        }
        if options.save_every > 0
            && trainer.step().is_multiple_of(options.save_every)
            && !trainer.is_finished()
        {
            trainer.save_checkpoint_step(options.checkpoints_dir(), &batcher.state())?;
        }
    }
    let train_seconds = train_start.elapsed().as_secs_f64();
    let steps = trainer.step() - start_step;
    on_event(TrainEvent::Trained {
        steps,
        seconds: train_seconds,
    })?;
    trainer.save_checkpoint_step(options.checkpoints_dir(), &batcher.state())?;

    // After: an evaluation at the last step already run by `eval_every` is the one after training.
    let eval_after = match trainer.metrics().last() {
        Some(MetricRecord::Eval(e)) if e.step == trainer.step() => EvalResult {
            mean_nll: e.eval_loss,
            perplexity: e.eval_loss.exp(),
            tokens: e.eval_tokens as usize,
        },
        _ => evaluate_recorded(&mut trainer, pm, &eval_batches)?,
    };
    take_progress();
    trainer.write_loss_curve(options.loss_curve_path(), "peft train")?;
    on_event(TrainEvent::EvalAfter {
        after: &eval_after,
        before: &eval_before,
    })?;
    sample("after", on_event)?;
    if let Some(pattern) = allocator.as_ref().and_then(|a| a.rank_pattern()) {
        let kept: usize = pattern.values().flatten().filter(|k| **k).count();
        on_event(TrainEvent::AdaLoraRanks {
            kept,
            total: pattern.values().map(Vec::len).sum::<usize>(),
        })?;
        let name = model.active_adapters()[0].clone();
        model.set_adalora_rank_pattern(&name, pattern)?;
    }
    let adapter_dir = options.adapter_dir();
    model.save_pretrained(&adapter_dir)?;
    on_event(TrainEvent::Saved {
        adapter: &adapter_dir,
        loss_curve: &options.loss_curve_path(),
    })?;
    let summary = serde_json::json!({
        "eval_loss_before": eval_before.mean_nll, "eval_loss_after": eval_after.mean_nll,
        "steps": steps, "train_seconds": train_seconds,
    });
    peft::io::atomic_write(
        &options.output.join("summary.json"),
        summary.to_string().as_bytes(),
    )?;
    Ok(TrainSummary {
        eval_loss_before: eval_before.mean_nll,
        eval_loss_after: eval_after.mean_nll,
        steps,
        train_seconds,
    })
}
