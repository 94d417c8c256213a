//! `peft train` with a prompt-learning adapter config (prompt tuning, P-tuning with the MLP encoder, prefix
//! tuning with or without `prefix_projection`): the virtual token embeddings (and the encoder) are the only
//! trainable variables; the loss covers the real tokens (PEFT's labels are −100 on the virtual positions). The
//! adapter is saved as PEFT does: `prompt_embeddings` = the encoder's output.

use crate::eval::evaluate_with;
use crate::generate::{SamplingArgs, generate_with, prompt_ids};
use crate::train::{TrainArgs, TrainSummary};
use anyhow::bail;
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use peft::config::PromptTuningInit;
use peft::{PeftConfig, PeftRng};
use peft_models::data::causal_lm_loss;
use peft_models::llama::LlamaForCausalLM;
use peft_models::prompt_learning::PromptLearning;
use peft_models::tokenizer::Tokenizer;
use std::io::Write;
use std::time::Instant;

fn inv(e: impl std::fmt::Display) -> peft::PeftError {
    peft::PeftError::Invalid(e.to_string())
}

/// Runs `peft train` for a prompt-learning `config` on `model` with its tokenizer.
pub fn run(
    args: &TrainArgs,
    config: PeftConfig,
    model: LlamaForCausalLM,
    tok: Tokenizer,
    out: &mut dyn Write,
) -> anyhow::Result<TrainSummary> {
    let device = Device::Cpu;
    let pm = peft::PeftModel::new(model, 0);
    let base_params = pm.trainable_parameters().all;
    let model = pm.model();
    // TEXT init: PEFT tokenizes `prompt_tuning_init_text` with `tokenizer_name_or_path` (special tokens added);
    // we use the model's tokenizer.
    let text_ids = match &config {
        PeftConfig::PromptTuning(c) if c.prompt_tuning_init == PromptTuningInit::Text => {
            let Some(text) = &c.prompt_tuning_init_text else {
                bail!("prompt_tuning_init TEXT needs `prompt_tuning_init_text`");
            };
            Some(tok.encode(text, true)?)
        }
        _ => None,
    };
    let pl = PromptLearning::new(
        &config,
        model,
        &mut PeftRng::new(args.seed).fork("prompt_learning"),
        text_ids.as_deref(),
    )?;
    let count = peft::peft_model::ParameterCount {
        trainable: pl.num_trainable_params(),
        all: base_params + pl.num_trainable_params(),
    };
    writeln!(out, "{count}")?;

    let (splits, eval_set, mut batcher, max_steps, pad) =
        crate::train::prepare_data(args, &tok, out)?;

    let params = pl.named_vars();
    let mut trainer = crate::train::build_trainer(args, params, max_steps)?;
    crate::train::open_log_and_resume(args, &mut trainer, &mut batcher, out)?;

    let sampling = SamplingArgs {
        max_new_tokens: args.sample_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: args.seed,
    };
    let sample = |out: &mut dyn Write, when: &str| -> anyhow::Result<()> {
        if let Some(p) = &args.sample_prompt {
            let ids = prompt_ids(&tok, p, args.sample_chat)?;
            let text = generate_with(model, Some(&pl), &tok, &ids, &sampling, &mut |_| Ok(()))?;
            writeln!(out, "sample {when}: {p:?} → {text:?}")?;
        }
        Ok(())
    };
    let eval_before = evaluate_with(model, Some(&pl), &eval_set, args.batch_size, pad, None)?;
    writeln!(
        out,
        "eval loss before: {:.4} (perplexity {:.2}, {} tokens)",
        eval_before.mean_nll, eval_before.perplexity, eval_before.tokens
    )?;
    sample(out, "before")?;

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
        pbar.set_message(format!("loss {:.3} lr {:.2e}", p.loss, p.lr));
    }));

    let start_step = trainer.step();
    let train_start = Instant::now();
    while !trainer.is_finished() {
        let mut micro =
            |_: usize, ctx: &peft::ForwardCtx| -> peft::Result<(candle_core::Tensor, usize)> {
                let batch = batcher.next_batch(&splits.train, &device).map_err(inv)?;
                let logits =
                    pl.token_logits(model, &batch.input_ids, Some(&batch.attention_mask), ctx)?;
                causal_lm_loss(&logits, &batch.labels).map_err(inv)
            };
        trainer.train_step_with_tokens(&mut micro)?;
        if trainer.should_evaluate() {
            let batches: Vec<_> = eval_set
                .eval_batches(args.batch_size, pad, &device)
                .collect::<Result<_, _>>()?;
            trainer.evaluate(batches.len(), &mut |i, ctx| {
                let b = &batches[i];
                let logits = pl.token_logits(model, &b.input_ids, Some(&b.attention_mask), ctx)?;
                let (s, n) =
                    peft_models::data::causal_lm_sum_nll(&logits, &b.labels).map_err(inv)?;
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

    let eval_after = evaluate_with(model, Some(&pl), &eval_set, args.batch_size, pad, None)?;
    writeln!(
        out,
        "eval loss after:  {:.4} (perplexity {:.2}); change {:+.4} nats",
        eval_after.mean_nll,
        eval_after.perplexity,
        eval_after.mean_nll - eval_before.mean_nll
    )?;
    sample(out, "after")?;
    let adapter_dir = args.output.join("adapter");
    pl.save(&adapter_dir)?;
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
