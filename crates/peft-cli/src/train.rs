//! `peft train`: fine-tunes a base model (HF directory or GGUF) with an adapter on text, JSONL or chat data,
//! and writes a PEFT adapter directory, the metrics log and the loss curve.

use crate::eval::evaluate;
use crate::generate::{SamplingArgs, generate, prompt_ids};
use crate::model::load_model;
use anyhow::{Context, bail};
use candle_core::Device;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use peft::config::{InitLoraWeights, LoraConfig, TargetModules};
use peft::train::metrics::MetricsLog;
use peft::train::optim::{AdamW, AdamWConfig, Optimizer, Sgd, SgdConfig};
use peft::train::schedule::Schedule;
use peft::train::trainer::{Trainer, TrainerSettings};
use peft::{PeftConfig, PeftModel};
use peft_models::data::{Batcher, DataConfig, causal_lm_loss, load_splits, pad_token_id};
use peft_models::llama::ForwardInput;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// `peft train` arguments.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The base model: an HF directory or a GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// Training data: plain text (.txt/.md or a directory), or JSONL with `text`, `prompt`/`completion`,
    /// chat `messages`, or `input_ids`.
    #[arg(long)]
    pub data: PathBuf,
    /// Evaluation data (default: the last 5% of the training data).
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// Output directory: `adapter/` (PEFT format), `metrics.jsonl`, `loss_curve.svg`, `checkpoints/`.
    #[arg(long)]
    pub output: PathBuf,
    /// An `adapter_config.json`-style file describing the adapter (any method peft-rs can train);
    /// overrides the LoRA flags below.
    #[arg(long)]
    pub adapter_config: Option<PathBuf>,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    pub r: usize,
    /// LoRA alpha (default: 2·r).
    #[arg(long)]
    pub alpha: Option<f64>,
    /// LoRA dropout.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// Target modules: comma-separated names or suffixes, or `all-linear`.
    #[arg(long, default_value = "q_proj,v_proj")]
    pub targets: String,
    /// DoRA.
    #[arg(long)]
    pub use_dora: bool,
    /// rsLoRA scaling (alpha/√r).
    #[arg(long)]
    pub use_rslora: bool,
    /// Which biases train: none, all, or lora_only (the targeted layers').
    #[arg(long, default_value = "none")]
    pub bias: String,
    /// Optimizer: adamw or sgd.
    #[arg(long, default_value = "adamw")]
    pub optimizer: String,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// Weight decay (decoupled for AdamW).
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.0)]
    pub momentum: f64,
    /// Learning-rate schedule: constant, constant_with_warmup, linear or cosine.
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    /// Warm-up steps.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Tokens per example.
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    /// Optimizer steps (default: one epoch).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Epochs, when `--steps` is not given.
    #[arg(long, default_value_t = 1.0)]
    pub epochs: f64,
    /// Clip the global gradient norm (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f64,
    /// Evaluate every N steps (0: only before and after).
    #[arg(long, default_value_t = 0)]
    pub eval_every: u64,
    /// Evaluate on at most this many examples of the eval split.
    #[arg(long, default_value_t = 64)]
    pub eval_max_examples: usize,
    /// Save a checkpoint every N steps under `checkpoints/` (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub save_every: u64,
    /// Resume from a checkpoint directory.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Seed of every random draw (init, dropout, shuffling).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// A prompt to generate from before and after training.
    #[arg(long)]
    pub sample_prompt: Option<String>,
    /// Render the sample prompt with the chat template.
    #[arg(long)]
    pub sample_chat: bool,
    /// Tokens to generate for the sample.
    #[arg(long, default_value_t = 32)]
    pub sample_tokens: usize,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// What a training run achieved.
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

fn adapter_config(args: &TrainArgs) -> anyhow::Result<PeftConfig> {
    if let Some(path) = &args.adapter_config {
        let mut c =
            PeftConfig::from_file(path).with_context(|| format!("reading {}", path.display()))?;
        c.base_mut().inference_mode = false;
        if let PeftConfig::AdaLora(a) = &c {
            if a.total_step.is_none_or(|t| t == 0) {
                bail!(
                    "{}: AdaLoRA needs `total_step` (the number of optimizer steps the rank schedule spans) \
                     set to a positive value in the adapter config",
                    path.display()
                );
            }
            if args.resume.is_some() {
                bail!(
                    "{}: resuming AdaLoRA training is not supported (the rank allocator's importance scores \
                     are not checkpointed)",
                    path.display()
                );
            }
        }
        c.validate()?;
        return Ok(c);
    }
    let targets = if args.targets.eq_ignore_ascii_case("all-linear") {
        TargetModules::Regex("all-linear".into())
    } else {
        TargetModules::List(
            args.targets
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect(),
        )
    };
    let bias: peft::config::LoraBias = args
        .bias
        .parse()
        .map_err(|_| anyhow::anyhow!("unknown --bias {:?} (none, all or lora_only)", args.bias))?;
    let mut c = PeftConfig::Lora(LoraConfig {
        bias,
        r: args.r,
        lora_alpha: args.alpha.unwrap_or(2.0 * args.r as f64),
        lora_dropout: args.dropout,
        targets: peft::config::TargetFields {
            target_modules: Some(targets),
            ..Default::default()
        },
        use_dora: args.use_dora,
        use_rslora: args.use_rslora,
        init_lora_weights: InitLoraWeights::Bool(true),
        ..Default::default()
    });
    c.base_mut().task_type = Some(peft::config::TaskType::CausalLm);
    c.validate()?;
    Ok(c)
}

/// Loads the training data and its eval split (capped at `--eval-max-examples`), and derives the batcher, the
/// number of optimizer steps and the pad id; reports the sizes to `out`.
pub(crate) fn prepare_data(
    args: &TrainArgs,
    tok: &peft_models::tokenizer::Tokenizer,
    out: &mut dyn Write,
) -> anyhow::Result<(
    peft_models::data::Splits,
    peft_models::data::Dataset,
    Batcher,
    u64,
    u32,
)> {
    let splits = load_splits(
        &args.data,
        args.eval_data.as_deref(),
        tok,
        &DataConfig::new(args.seq_len),
    )
    .with_context(|| format!("loading {}", args.data.display()))?;
    let mut eval_set = splits.eval.clone();
    eval_set.examples.truncate(args.eval_max_examples.max(1));
    let pad = pad_token_id(tok);
    let batcher = Batcher::new(splits.train.len(), args.batch_size, args.seed, pad)?;
    let per_epoch = (batcher.batches_per_epoch() as u64)
        .div_ceil(args.grad_accum as u64)
        .max(1);
    let max_steps = args
        .steps
        .unwrap_or(((per_epoch as f64) * args.epochs).ceil() as u64)
        .max(1);
    writeln!(
        out,
        "data: {} training examples, {} eval examples of ≤{} tokens; {max_steps} steps of {}×{} examples",
        splits.train.len(),
        eval_set.len(),
        args.seq_len,
        args.batch_size,
        args.grad_accum
    )?;
    Ok((splits, eval_set, batcher, max_steps, pad))
}

/// The trainer of a run: the optimizer and schedule chosen by the flags over `params`.
pub(crate) fn build_trainer(
    args: &TrainArgs,
    params: Vec<(String, candle_core::Var)>,
    max_steps: u64,
) -> anyhow::Result<Trainer> {
    let optimizer: Box<dyn Optimizer> = match args.optimizer.as_str() {
        "adamw" => Box::new(AdamW::from_params(
            params.clone(),
            AdamWConfig {
                lr: args.lr,
                weight_decay: args.weight_decay,
                ..Default::default()
            },
        )?),
        "sgd" => Box::new(Sgd::from_params(
            params.clone(),
            SgdConfig {
                lr: args.lr,
                momentum: args.momentum,
                weight_decay: args.weight_decay,
                ..Default::default()
            },
        )?),
        other => bail!("unknown optimizer {other:?} (adamw or sgd)"),
    };
    let schedule = Schedule::from_name(&args.schedule, args.warmup_steps, max_steps)?;
    let settings = TrainerSettings {
        grad_accum_steps: args.grad_accum,
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        max_steps,
        eval_every: args.eval_every,
        seed: args.seed,
        log_every: 1,
    };
    Ok(Trainer::new(params, optimizer, schedule, settings)?)
}

/// Creates the output directory, attaches `metrics.jsonl` (appended to when resuming) and, with `--resume`,
/// restores the trainer and the data cursor from the checkpoint.
pub(crate) fn open_log_and_resume(
    args: &TrainArgs,
    trainer: &mut Trainer,
    batcher: &mut Batcher,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.output)
        .with_context(|| format!("creating {}", args.output.display()))?;
    let metrics_path = args.output.join("metrics.jsonl");
    let log = if args.resume.is_some() {
        MetricsLog::append(&metrics_path)?
    } else {
        MetricsLog::create(&metrics_path)?
    };
    trainer.set_metrics_log(log);
    if let Some(dir) = &args.resume {
        let cursor = trainer
            .resume(dir)
            .with_context(|| format!("resuming from {}", dir.display()))?;
        batcher.restore(&cursor)?;
        writeln!(
            out,
            "resumed at step {} from {}",
            trainer.step(),
            dir.display()
        )?;
    }
    Ok(())
}

/// Runs `peft train`; the report goes to `out`, the progress bar to stderr.
pub fn run(args: &TrainArgs, out: &mut dyn Write) -> anyhow::Result<TrainSummary> {
    let device = Device::Cpu;
    let t0 = Instant::now();
    let loaded = load_model(&args.model, &device)?;
    let tok = loaded.tokenizer;
    writeln!(
        out,
        "loaded {} in {:.1} s",
        args.model.display(),
        t0.elapsed().as_secs_f64()
    )?;
    let mut config = adapter_config(args)?;
    if let Some(name) = loaded.config.get("_name_or_path").and_then(|v| v.as_str()) {
        config.base_mut().base_model_name_or_path = Some(name.to_string());
    }
    if config.is_prompt_learning() {
        return crate::train_prompt::run(args, config, loaded.model, tok, out);
    }
    let adalora = match &config {
        PeftConfig::AdaLora(a) => Some(a.clone()),
        _ => None,
    };
    let mut pm = PeftModel::get_peft_model(loaded.model, config, "default", args.seed)?;
    writeln!(out, "{}", pm.trainable_parameters())?;

    let (splits, eval_set, mut batcher, max_steps, pad) = prepare_data(args, &tok, out)?;

    let params = pm.trainable_vars();
    let mut trainer = build_trainer(args, params.clone(), max_steps)?;
    // AdaLoRA: orthogonal regulariser and rank allocator (update_and_allocate after every step).
    let allocator = match &adalora {
        Some(a) => Some(peft::tuners::adalora::attach_adalora(
            &mut trainer,
            &params,
            a,
        )?),
        None => None,
    };
    open_log_and_resume(args, &mut trainer, &mut batcher, out)?;

    let sampling = SamplingArgs {
        max_new_tokens: args.sample_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: args.seed,
    };
    let sample = |pm: &PeftModel<_>, out: &mut dyn Write, when: &str| -> anyhow::Result<()> {
        if let Some(p) = &args.sample_prompt {
            let ids = prompt_ids(&tok, p, args.sample_chat)?;
            let text = generate(pm.model(), &tok, &ids, &sampling, &mut |_| Ok(()))?;
            writeln!(out, "sample {when}: {p:?} → {text:?}")?;
        }
        Ok(())
    };
    let eval_before = evaluate(pm.model(), &eval_set, args.batch_size, pad, None)?;
    writeln!(
        out,
        "eval loss before: {:.4} (perplexity {:.2}, {} tokens)",
        eval_before.mean_nll, eval_before.perplexity, eval_before.tokens
    )?;
    sample(&pm, out, "before")?;

    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(max_steps)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_position(trainer.step());
    let pbar = bar.clone();
    trainer.set_progress(Box::new(move |p| {
        pbar.set_position(p.step);
        let tps = p
            .tokens_per_s
            .map(|t| format!(" {t:.0} tok/s"))
            .unwrap_or_default();
        let ev = p
            .eval_loss
            .map(|e| format!(" eval {e:.3}"))
            .unwrap_or_default();
        pbar.set_message(format!("loss {:.3} lr {:.2e}{tps}{ev}", p.loss, p.lr));
    }));

    let start_step = trainer.step();
    let train_start = Instant::now();
    let model = pm.model();
    while !trainer.is_finished() {
        let mut micro =
            |_: usize, ctx: &peft::ForwardCtx| -> peft::Result<(candle_core::Tensor, usize)> {
                let batch = batcher
                    .next_batch(&splits.train, &device)
                    .map_err(|e| peft::PeftError::Invalid(e.to_string()))?;
                let input =
                    ForwardInput::ids(&batch.input_ids).with_attention_mask(&batch.attention_mask);
                let logits = model
                    .forward(input, ctx)
                    .map_err(|e| peft::PeftError::Invalid(e.to_string()))?;
                let (loss, n) = causal_lm_loss(&logits, &batch.labels)
                    .map_err(|e| peft::PeftError::Invalid(e.to_string()))?;
                Ok((loss, n))
            };
        trainer.train_step_with_tokens(&mut micro)?;
        if trainer.should_evaluate() {
            let batches: Vec<_> = eval_set
                .eval_batches(args.batch_size, pad, &device)
                .collect::<Result<_, _>>()?;
            trainer.evaluate(batches.len(), &mut |i, ctx| {
                let b = &batches[i];
                let logits = model
                    .forward(
                        ForwardInput::ids(&b.input_ids).with_attention_mask(&b.attention_mask),
                        ctx,
                    )
                    .map_err(|e| peft::PeftError::Invalid(e.to_string()))?;
                let (s, n) = peft_models::data::causal_lm_sum_nll(&logits, &b.labels)
                    .map_err(|e| peft::PeftError::Invalid(e.to_string()))?;
                Ok((s.to_scalar::<f32>()? as f64, n))
            })?;
        }
        if args.save_every > 0 && trainer.step() % args.save_every == 0 && !trainer.is_finished() {
            let dir = args
                .output
                .join("checkpoints")
                .join(format!("step-{}", trainer.step()));
            trainer.save_checkpoint(&dir, &batcher.state())?;
        }
    }
    bar.finish_and_clear();
    let train_seconds = train_start.elapsed().as_secs_f64();
    let steps = trainer.step() - start_step;
    writeln!(
        out,
        "trained {steps} steps in {train_seconds:.1} s ({:.2} s/step)",
        train_seconds / steps.max(1) as f64
    )?;
    trainer.save_checkpoint(
        args.output.join("checkpoints").join("last"),
        &batcher.state(),
    )?;
    trainer.write_loss_curve(args.output.join("loss_curve.svg"), "peft train")?;

    let eval_after = evaluate(pm.model(), &eval_set, args.batch_size, pad, None)?;
    writeln!(
        out,
        "eval loss after:  {:.4} (perplexity {:.2}); change {:+.4} nats",
        eval_after.mean_nll,
        eval_after.perplexity,
        eval_after.mean_nll - eval_before.mean_nll
    )?;
    sample(&pm, out, "after")?;
    let adapter_dir = args.output.join("adapter");
    if let Some(pattern) = allocator.as_ref().and_then(|a| a.rank_pattern()) {
        let kept: usize = pattern.values().flatten().filter(|k| **k).count();
        writeln!(
            out,
            "AdaLoRA: {kept} of {} ranks kept",
            pattern.values().map(Vec::len).sum::<usize>()
        )?;
        pm.set_adalora_rank_pattern("default", pattern)?;
    }
    pm.save_pretrained(&adapter_dir)?;
    writeln!(
        out,
        "adapter written to {} (PEFT format); loss curve {}",
        adapter_dir.display(),
        args.output.join("loss_curve.svg").display()
    )?;
    let summary = serde_json::json!({
        "eval_loss_before": eval_before.mean_nll, "eval_loss_after": eval_after.mean_nll,
        "steps": steps, "train_seconds": train_seconds,
    });
    peft::io::atomic_write(
        &args.output.join("summary.json"),
        summary.to_string().as_bytes(),
    )?;
    Ok(TrainSummary {
        eval_loss_before: eval_before.mean_nll,
        eval_loss_after: eval_after.mean_nll,
        steps,
        train_seconds,
    })
}
