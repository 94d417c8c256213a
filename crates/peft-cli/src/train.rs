//! `peft train`: fine-tunes a base model (HF directory or GGUF) with an adapter on text, JSONL or chat data,
//! and writes a PEFT adapter directory, the metrics log and the loss curve.

use anyhow::{Context, bail};
use candle_core::Device;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use peft::config::{InitLoraWeights, LoraConfig, TargetModules};
use peft::{PeftConfig, PeftModel};
use peft_models::error::ModelError;
use peft_models::train::{SamplePrompt, TrainEvent, TrainOptions, train};
use peft_models::{LoadedModel, load_model_with};
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

/// `peft train` arguments.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The base model: an HF directory or a GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// Quantization of the base model (QLoRA).
    #[command(flatten)]
    pub quant: crate::quant::QuantArgs,
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
    /// Start from an existing PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`)
    /// instead of a fresh adapter: continue training an adapter trained in Python, or train a method whose
    /// initialisation only PEFT can do (FRoD). Not with --adapter-config.
    #[arg(long, conflicts_with = "adapter_config")]
    pub init_adapter: Option<PathBuf>,
    /// LoRA rank.
    #[arg(long, default_value_t = 8, value_parser = positive_usize)]
    pub r: usize,
    /// LoRA alpha (default: 2·r).
    #[arg(long, value_parser = positive_f64)]
    pub alpha: Option<f64>,
    /// LoRA dropout, in [0, 1).
    #[arg(long, default_value_t = 0.0, value_parser = unit_interval_f64)]
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
    /// Optimizer: adamw, sgd, or lorafa (LoRA-FA, PEFT's create_lorafa_optimizer: LoRA's A frozen, B's
    /// gradient projected; LoRA adapters only).
    #[arg(long, default_value = "adamw")]
    pub optimizer: String,
    /// LoRA+ (PEFT's create_loraplus_optimizer): train LoRA's B matrices and 1-D parameters at this many times
    /// --lr (with adamw or sgd; --weight-decay is then loraplus_weight_decay, biases not decayed).
    #[arg(long, value_parser = non_negative_f64)]
    pub loraplus_lr_ratio: Option<f64>,
    /// LoRA+'s learning rate of Embedding LoRA weights (loraplus_lr_embedding).
    #[arg(long, default_value_t = 1e-6, value_parser = non_negative_f64)]
    pub loraplus_lr_embedding: f64,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-3, value_parser = non_negative_f64)]
    pub lr: f64,
    /// Weight decay (decoupled for AdamW).
    #[arg(long, default_value_t = 0.0, value_parser = non_negative_f64)]
    pub weight_decay: f64,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.0, value_parser = unit_interval_f64)]
    pub momentum: f64,
    /// Learning-rate schedule: constant, constant_with_warmup, linear or cosine.
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    /// Warm-up steps.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    /// Examples per micro-batch.
    #[arg(long, default_value_t = 4, value_parser = positive_usize)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1, value_parser = positive_usize)]
    pub grad_accum: usize,
    /// Tokens per example (at least 2: the loss predicts each token from the ones before).
    #[arg(long, default_value_t = 64, value_parser = seq_len_usize)]
    pub seq_len: usize,
    /// Optimizer steps (default: one epoch).
    #[arg(long)]
    pub steps: Option<u64>,
    /// Epochs, when `--steps` is not given.
    #[arg(long, default_value_t = 1.0, value_parser = positive_f64)]
    pub epochs: f64,
    /// Clip the global gradient norm (0: off).
    #[arg(long, default_value_t = 1.0, value_parser = non_negative_f64)]
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
    /// Gradient checkpointing: `on` (keep only each decoder layer's input, recompute the layers in the
    /// backward: much less activation memory for one more forward), `off`, or `auto` = on for a quantized
    /// base with layer adapters, as PEFT's `prepare_model_for_kbit_training` does for QLoRA.
    #[arg(long, default_value = "auto", value_parser = ["auto", "on", "off"])]
    pub gradient_checkpointing: String,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

pub use peft_models::train::TrainSummary;

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
        lora: peft::config::LoraFields {
            bias,
            r: args.r,
            lora_alpha: args.alpha.unwrap_or(2.0 * args.r as f64),
            lora_dropout: args.dropout,
            use_dora: args.use_dora,
            use_rslora: args.use_rslora,
            init_lora_weights: InitLoraWeights::Bool(true),
            ..Default::default()
        },
        targets: peft::config::TargetFields {
            target_modules: Some(targets),
            ..Default::default()
        },
        ..Default::default()
    });
    c.base_mut().task_type = Some(peft::config::TaskType::CausalLm);
    c.validate()?;
    Ok(c)
}

/// The library options of a run ([`TrainOptions`]) from the flags.
fn train_options(args: &TrainArgs) -> anyhow::Result<TrainOptions> {
    Ok(TrainOptions {
        data: args.data.clone(),
        eval_data: args.eval_data.clone(),
        output: args.output.clone(),
        optimizer: args.optimizer.parse()?,
        lr: args.lr,
        weight_decay: args.weight_decay,
        loraplus_lr_ratio: args.loraplus_lr_ratio,
        loraplus_lr_embedding: args.loraplus_lr_embedding,
        momentum: args.momentum,
        schedule: args.schedule.clone(),
        warmup_steps: args.warmup_steps,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        seq_len: args.seq_len,
        steps: args.steps,
        epochs: args.epochs,
        max_grad_norm: args.max_grad_norm,
        eval_every: args.eval_every,
        eval_max_examples: args.eval_max_examples,
        save_every: args.save_every,
        resume: args.resume.clone(),
        seed: args.seed,
        sample: args.sample_prompt.as_ref().map(|p| SamplePrompt {
            prompt: p.clone(),
            chat: args.sample_chat,
            max_new_tokens: args.sample_tokens,
        }),
        gradient_checkpointing: args.gradient_checkpointing == "on",
    })
}

/// Prints one event of the run to `out` and drives the progress bar (stderr).
fn report(
    event: TrainEvent<'_>,
    out: &mut dyn Write,
    bar: &mut Option<ProgressBar>,
    quiet: bool,
) -> std::io::Result<()> {
    match event {
        TrainEvent::Data {
            train_examples,
            eval_examples,
            seq_len,
            max_steps,
            batch_size,
            grad_accum,
        } => writeln!(
            out,
            "data: {train_examples} training examples, {eval_examples} eval examples of ≤{seq_len} tokens; \
             {max_steps} steps of {batch_size}×{grad_accum} examples"
        ),
        TrainEvent::Resumed { step, from } => {
            writeln!(out, "resumed at step {step} from {}", from.display())
        }
        TrainEvent::EvalBefore(r) => writeln!(
            out,
            "eval loss before: {:.4} (perplexity {:.2}, {} tokens)",
            r.mean_nll, r.perplexity, r.tokens
        ),
        TrainEvent::Sample {
            when,
            prompt,
            completion,
        } => writeln!(out, "sample {when}: {prompt:?} → {completion:?}"),
        TrainEvent::Start { step, max_steps } => {
            let b = if quiet {
                ProgressBar::hidden()
            } else {
                ProgressBar::new(max_steps)
            };
            b.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} {msg} [{elapsed_precise}<{eta_precise}]",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.set_position(step);
            *bar = Some(b);
            Ok(())
        }
        TrainEvent::Progress(p) => {
            if let Some(b) = bar {
                b.set_position(p.step);
                let tps = p
                    .tokens_per_s
                    .map(|t| format!(" {t:.0} tok/s"))
                    .unwrap_or_default();
                let ev = p
                    .eval_loss
                    .map(|e| format!(" eval {e:.3}"))
                    .unwrap_or_default();
                b.set_message(format!("loss {:.3} lr {:.2e}{tps}{ev}", p.loss, p.lr));
            }
            Ok(())
        }
        TrainEvent::Trained { steps, seconds } => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            writeln!(
                out,
                "trained {steps} steps in {seconds:.1} s ({:.2} s/step)",
                seconds / steps.max(1) as f64
            )
        }
        TrainEvent::EvalAfter { after, before } => writeln!(
            out,
            "eval loss after:  {:.4} (perplexity {:.2}); change {:+.4} nats",
            after.mean_nll,
            after.perplexity,
            after.mean_nll - before.mean_nll
        ),
        TrainEvent::AdaLoraRanks { kept, total } => {
            writeln!(out, "AdaLoRA: {kept} of {total} ranks kept")
        }
        TrainEvent::Saved {
            adapter,
            loss_curve,
        } => writeln!(
            out,
            "adapter written to {} (PEFT format); loss curve {}",
            adapter.display(),
            loss_curve.display()
        ),
    }
}

/// Runs `peft train`; the report goes to `out`, the progress bar to stderr.
pub fn run(args: &TrainArgs, out: &mut dyn Write) -> anyhow::Result<TrainSummary> {
    crate::merge::report_stale_temps();
    // The library checks the data against the outputs; the model and `--adapter-config` are the CLI's inputs.
    let mut inputs = vec![("the base model", args.model.as_path())];
    if let Some(p) = &args.adapter_config {
        inputs.push(("--adapter-config", p.as_path()));
    }
    let options = train_options(args)?;
    let outputs = [
        options.adapter_dir(),
        options.checkpoints_dir(),
        options.metrics_path(),
    ];
    let outputs: Vec<&std::path::Path> = outputs.iter().map(|p| p.as_path()).collect();
    peft::io::ensure_no_alias(&inputs, &outputs)?;
    peft_models::train::check_outputs(&options)?;
    let device = Device::Cpu;
    let t0 = Instant::now();
    let LoadedModel {
        model,
        tokenizer,
        config: hf_config,
    } = load_model_with(&args.model, &device, &args.quant.load_options()?)?;
    writeln!(
        out,
        "loaded {} in {:.1} s",
        args.model.display(),
        t0.elapsed().as_secs_f64()
    )?;
    if let Some(q) = peft_models::quantize::summary(&model) {
        writeln!(out, "base: {q}")?;
    }
    if model.weight_dtype() != model.dtype() {
        writeln!(
            out,
            "base weights: {:?}, computed in {:?} (adapters, gradients and optimizer state {:?})",
            model.weight_dtype(),
            model.dtype(),
            model.dtype()
        )?;
    }
    let mut config = match &args.init_adapter {
        Some(dir) => {
            let mut c = PeftConfig::from_dir(dir)
                .with_context(|| format!("reading the adapter {}", dir.display()))?;
            c.base_mut().inference_mode = false;
            c
        }
        None => adapter_config(args)?,
    };
    if let Some(name) = hf_config.get("_name_or_path").and_then(|v| v.as_str()) {
        config.base_mut().base_model_name_or_path = Some(name.to_string());
    }
    let mut options = train_options(args)?;
    if args.gradient_checkpointing == "auto" {
        options.gradient_checkpointing =
            peft_models::quantize::summary(&model).is_some() && !config.is_prompt_learning();
        if options.gradient_checkpointing {
            writeln!(
                out,
                "gradient checkpointing: on (the default for a quantized base, as PEFT's \
                 prepare_model_for_kbit_training; --gradient-checkpointing off to disable)"
            )?;
        }
    } else if options.gradient_checkpointing {
        writeln!(out, "gradient checkpointing: on")?;
    }
    // TEXT prompt-tuning init: PEFT tokenizes `prompt_tuning_init_text` with `tokenizer_name_or_path`; we use
    // the model's tokenizer.
    let init = peft_models::prompt_learning::init_text_ids(&config, tokenizer.as_ref())?;
    let mut pm = match (&args.init_adapter, init) {
        (Some(dir), _) => {
            let mut pm = PeftModel::new(model, args.seed);
            pm.load_adapter(dir, "default", &device)
                .with_context(|| format!("cannot load the adapter {}", dir.display()))?;
            if config.is_prompt_learning() {
                bail!(
                    "{}: --init-adapter takes layer adapters (a prompt-learning adapter trains from its config)",
                    dir.display()
                );
            }
            pm
        }
        (None, Some(ids)) => {
            let mut pm = PeftModel::new(model, args.seed);
            pm.add_prompt_adapter("default", config, Some(&ids))?;
            pm
        }
        (None, None) => PeftModel::get_peft_model(model, config, "default", args.seed)?,
    };
    writeln!(out, "{}", pm.trainable_parameters())?;
    let mut bar = None;
    let result = train(&mut pm, tokenizer.as_ref(), &options, &mut |event| {
        report(event, out, &mut bar, args.quiet).map_err(|e| ModelError::io("<output>", e))
    });
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(result?)
}

/// A flag value that must be a whole number ≥ 1 (`--batch-size 0` used to divide by zero).
pub(crate) fn positive_usize(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("not a whole number: {e}")),
    }
}

/// A sequence length: a whole number ≥ 2 (one token has no next token to predict).
fn seq_len_usize(s: &str) -> Result<usize, String> {
    let n = positive_usize(s)?;
    if n < 2 {
        return Err(
            "must be at least 2 (the loss predicts each token from the ones before)".into(),
        );
    }
    Ok(n)
}

fn finite_f64(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("not a number: {e}"))?;
    if v.is_finite() {
        Ok(v)
    } else {
        Err(format!("must be a finite number, got {v}"))
    }
}

/// A finite number ≥ 0 (NaN and infinities refused).
pub(crate) fn non_negative_f64(s: &str) -> Result<f64, String> {
    let v = finite_f64(s)?;
    if v < 0.0 {
        return Err(format!("must be ≥ 0, got {v}"));
    }
    Ok(v)
}

/// A finite number > 0.
pub(crate) fn positive_f64(s: &str) -> Result<f64, String> {
    let v = finite_f64(s)?;
    if v <= 0.0 {
        return Err(format!("must be > 0, got {v}"));
    }
    Ok(v)
}

/// A number in [0, 1).
pub(crate) fn unit_interval_f64(s: &str) -> Result<f64, String> {
    let v = non_negative_f64(s)?;
    if v >= 1.0 {
        return Err(format!("must be < 1, got {v}"));
    }
    Ok(v)
}

/// A number in (0, 1] (nucleus sampling's `top_p`).
pub(crate) fn probability_f64(s: &str) -> Result<f64, String> {
    let v = positive_f64(s)?;
    if v > 1.0 {
        return Err(format!("must be ≤ 1, got {v}"));
    }
    Ok(v)
}
