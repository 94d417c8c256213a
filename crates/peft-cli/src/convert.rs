//! `peft convert`: writes a GGUF model as an HF directory (dequantized f32 safetensors, config.json,
//! tokenizer.json), which transformers and `peft merge` can then use.

use anyhow::Context;
use candle_core::Device;
use clap::Args;
use std::io::Write;
use std::path::PathBuf;

/// `peft convert` arguments.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// The GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// The HF directory to write.
    #[arg(long)]
    pub output: PathBuf,
}

/// Runs `peft convert`.
pub fn run(args: &ConvertArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let m = peft_models::gguf::load_gguf(&args.model, &Device::Cpu)
        .with_context(|| format!("loading {}", args.model.display()))?;
    peft_models::export::write_hf_dir(&args.output, &m.config, &m.tensors, Some(&m.tokenizer))
        .with_context(|| format!("writing {}", args.output.display()))?;
    writeln!(
        out,
        "wrote {} ({} tensors, f32)",
        args.output.display(),
        m.tensors.len()
    )?;
    Ok(())
}
