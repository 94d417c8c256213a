//! `peft export`: writes an adapter in another program's format. Today: a LoRA adapter as a llama.cpp LoRA
//! GGUF file (`--format gguf`), exactly as llama.cpp's `convert_lora_to_gguf.py` writes it
//! ([`peft_models::gguf_lora`]), for `llama-cli --lora`, `llama-server` or llama-cpp-python.

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use peft_models::gguf_lora::{LoraGgufBase, LoraOutType, export_lora_gguf};
use std::io::Write;
use std::path::PathBuf;

/// `peft export` arguments.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// The adapter directory (`adapter_config.json` + `adapter_model.safetensors`).
    #[arg(long, short = 'a', value_name = "DIR")]
    pub adapter: PathBuf,
    /// The output format.
    #[arg(long, value_enum)]
    pub format: ExportFormat,
    /// The base model the adapter was trained on: a `.gguf` file or an HF model directory (only its
    /// architecture and head counts are read).
    #[arg(long, short = 'b', value_name = "MODEL")]
    pub base: PathBuf,
    /// The file to write (written to a temporary name, then renamed).
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: PathBuf,
    /// Tensor storage: f32, f16, or q8_0 (Q8_0 where rows are a multiple of 32 values, else F16), as
    /// `convert_lora_to_gguf.py --outtype`.
    #[arg(long, value_enum, default_value = "f32")]
    pub outtype: OutTypeArg,
}

/// The formats `peft export` writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// A llama.cpp LoRA adapter GGUF file.
    Gguf,
}

/// `--outtype` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutTypeArg {
    /// Every tensor F32.
    F32,
    /// Every tensor F16.
    F16,
    /// Q8_0 where possible, else F16.
    #[value(name = "q8_0")]
    Q8_0,
}

impl From<OutTypeArg> for LoraOutType {
    fn from(t: OutTypeArg) -> Self {
        match t {
            OutTypeArg::F32 => LoraOutType::F32,
            OutTypeArg::F16 => LoraOutType::F16,
            OutTypeArg::Q8_0 => LoraOutType::Q8_0,
        }
    }
}

/// Runs `peft export`, printing one summary line to `out`.
pub fn run(args: &ExportArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    if !args.adapter.is_dir() {
        bail!(
            "adapter {} is not a directory: pass the directory holding adapter_config.json and \
             adapter_model.safetensors",
            args.adapter.display()
        );
    }
    if !args.base.exists() {
        bail!("base model {} does not exist", args.base.display());
    }
    if args.output.is_dir() {
        bail!(
            "{} is a directory; --output takes the .gguf file to write",
            args.output.display()
        );
    }
    crate::merge::report_stale_temps();
    peft::io::ensure_no_alias(
        &[
            ("the adapter", args.adapter.as_path()),
            ("the base model", args.base.as_path()),
        ],
        &[&args.output],
    )?;
    let base = LoraGgufBase::from_path(&args.base)
        .with_context(|| format!("reading the base model {}", args.base.display()))?;
    let content = export_lora_gguf(&args.adapter, &base, args.outtype.into(), &args.output)
        .with_context(|| {
            format!(
                "exporting {} as a llama.cpp LoRA GGUF",
                args.adapter.display()
            )
        })?;
    let mut dtypes: Vec<String> = content
        .tensors
        .iter()
        .map(|t| format!("{:?}", t.dtype))
        .collect();
    dtypes.sort();
    dtypes.dedup();
    writeln!(
        out,
        "wrote {} ({} tensors, {}, alpha {}, architecture {})",
        args.output.display(),
        content.tensors.len(),
        dtypes.join("/"),
        content.alpha().unwrap_or(0.0),
        base.architecture
    )?;
    Ok(())
}
