//! The `peft` command-line tool.
//!
//! - `peft train`: fine-tunes a model with an adapter and writes it in PEFT's format ([`train`]).
//! - `peft eval`: mean token NLL and perplexity, with any adapters active ([`eval`]).
//! - `peft generate`: streams a completion, greedy or sampled ([`generate`]).
//! - `peft convert`: writes a GGUF model as an HF directory ([`convert`]).
//! - `peft export`: writes a LoRA adapter as a llama.cpp LoRA GGUF file ([`export`]).
//! - `peft combine`: combines LoRA adapters into a new one, as PEFT's `add_weighted_adapter` ([`combine`]).
//! - `peft merge`: merges one or more adapters into a base model file or directory ([`merge`]).
//! - `peft serve`: an OpenAI-compatible HTTP server for a model and its LoRA adapters, with continuous
//!   batching across requests and adapters ([`serve`]).
//! - `peft inspect`: describes an adapter directory or a base model (its quantization and memory), for humans
//!   or as JSON ([`inspect`]).
//!
//! [`Cli`] is the clap definition; [`run`] executes a parsed command line. Every command is also callable
//! in-process ([`merge::run`], [`inspect::run`]) with its output going to any writer.

pub mod combine;
pub mod convert;
pub mod convert_adapter;
pub mod eval;
pub mod export;
pub mod generate;
pub mod inspect;
pub mod merge;
pub mod quant;
pub mod serve;
pub mod train;

#[cfg(test)]
mod cli_tests;

use clap::{Parser, Subcommand};
use std::io::Write;

/// The `peft` command line.
#[derive(Debug, Parser)]
#[command(
    name = "peft",
    version,
    about = "Parameter-efficient fine-tuning: train, evaluate, generate with, merge and inspect adapters"
)]
pub struct Cli {
    /// Load adapters holding NaN or infinite values instead of refusing them (to inspect or repair a
    /// diverged adapter); evaluation still fails on a non-finite loss.
    #[arg(long, global = true)]
    pub allow_non_finite: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fine-tune a model with an adapter and save the adapter in PEFT's format.
    Train(Box<train::TrainArgs>),
    /// Mean token NLL and perplexity of a model, with adapters, on data.
    Eval(eval::EvalArgs),
    /// Generate text from a prompt, streaming it to stdout.
    Generate(generate::GenerateArgs),
    /// Write a GGUF model as an HF directory (f32 safetensors, config, tokenizer).
    Convert(convert::ConvertArgs),
    /// Convert an adapter of another method to a plain LoRA adapter (PEFT's save_as_lora).
    ConvertAdapter(convert_adapter::ConvertAdapterArgs),
    /// Write a LoRA adapter as a llama.cpp LoRA GGUF file (as convert_lora_to_gguf.py does).
    Export(export::ExportArgs),
    /// Combine LoRA adapters into a new adapter (PEFT's add_weighted_adapter) and write it.
    Combine(combine::CombineArgs),
    /// Merge adapters into a base model and write the merged weights.
    Merge(merge::MergeArgs),
    /// Describe an adapter directory: method, targeted modules, parameters, replaced tensors.
    Inspect(inspect::InspectArgs),
    /// Serve a model and LoRA adapters over an OpenAI-compatible HTTP API (continuous batching).
    Serve(serve::ServeArgs),
}

/// Runs a parsed command line, writing its report to stdout (progress goes to stderr).
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    run_with(cli, &mut out)?;
    out.flush()?;
    Ok(())
}

/// Runs a parsed command line, writing its report to `out`.
pub fn run_with(cli: Cli, out: &mut dyn Write) -> anyhow::Result<()> {
    peft::io::set_allow_non_finite(cli.allow_non_finite);
    match cli.command {
        Command::Train(args) => train::run(&args, out).map(|_| ()),
        Command::Eval(args) => eval::run(&args, out).map(|_| ()),
        Command::Generate(args) => generate::run(&args, out),
        Command::Convert(args) => convert::run(&args, out),
        Command::ConvertAdapter(args) => convert_adapter::run(&args, out).map(|_| ()),
        Command::Export(args) => export::run(&args, out),
        Command::Combine(args) => combine::run(&args, out).map(|_| ()),
        Command::Merge(args) => merge::run(&args, out).map(|_| ()),
        Command::Inspect(args) => inspect::run(&args, out),
        Command::Serve(args) => serve::run(&args, out),
    }
}

/// Whether the error is stdout having been closed by the reader (`peft inspect … | head`).
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

/// The text printed for a failed command: `error: <message>`, then one `caused by:` line per cause whose
/// text the previous line does not already contain (library errors often repeat their source's message).
pub fn error_report(e: &anyhow::Error) -> String {
    let mut lines: Vec<String> = Vec::new();
    let mut previous = String::new();
    for (i, cause) in e.chain().enumerate() {
        let text = cause.to_string();
        if i == 0 {
            lines.push(format!("error: {text}"));
        } else if !previous.contains(&text) {
            lines.push(format!("  caused by: {text}"));
        }
        previous = text;
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn cli_parses_both_subcommands_and_rejects_others() {
        let cli = Cli::try_parse_from(["peft", "inspect", "some/dir", "--json"]).unwrap();
        assert!(
            matches!(cli.command, Command::Inspect(ref a) if a.json && a.dir.to_str() == Some("some/dir"))
        );
        let cli = Cli::try_parse_from([
            "peft",
            "merge",
            "--base",
            "b",
            "--adapter",
            "a",
            "--output",
            "o",
        ])
        .unwrap();
        assert!(matches!(cli.command, Command::Merge(_)));
        use clap::error::ErrorKind;
        let missing = ErrorKind::MissingRequiredArgument;
        for (bad, kind, names) in [
            (
                vec!["peft"],
                ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand,
                "Usage",
            ),
            (vec!["peft", "train"], missing, "--model"),
            (
                vec!["peft", "frobnicate"],
                ErrorKind::InvalidSubcommand,
                "frobnicate",
            ),
            (vec!["peft", "inspect"], missing, "<ADAPTER_DIR>"),
            (
                vec!["peft", "merge", "--base", "b", "--output", "o"],
                missing,
                "--adapter",
            ),
            (
                vec!["peft", "merge", "--adapter", "a", "--output", "o"],
                missing,
                "--base",
            ),
            (
                vec!["peft", "merge", "--base", "b", "--adapter", "a"],
                missing,
                "--output",
            ),
            (
                vec![
                    "peft",
                    "merge",
                    "--base",
                    "b",
                    "--adapter",
                    "a",
                    "--output",
                    "o",
                    "--dtype",
                    "f64",
                ],
                ErrorKind::InvalidValue,
                "--dtype",
            ),
        ] {
            let Err(e) = Cli::try_parse_from(&bad) else {
                panic!("{bad:?} should not parse")
            };
            assert_eq!(e.kind(), kind, "{bad:?}: {e}");
            assert!(e.to_string().contains(names), "{bad:?}: {e}");
        }
    }

    #[test]
    fn error_report_drops_repeated_causes() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = anyhow::Error::new(peft::PeftError::io("/x/y", io)).context("loading adapter /x/y");
        let r = error_report(&e);
        assert_eq!(
            r,
            "error: loading adapter /x/y\n  caused by: /x/y: no such file"
        );
        let e: anyhow::Result<()> =
            Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe)).context("writing");
        assert!(is_broken_pipe(&e.unwrap_err()));
    }
}
