//! `peft convert`: writes a GGUF model as an HF directory (dequantized f32 safetensors, config.json,
//! tokenizer.json), which transformers and `peft merge` can then use.

use anyhow::{Context, bail};
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
    let path = &args.model;
    if path.is_dir() {
        bail!(
            "{}: is a directory; `peft convert` takes a .gguf file (an HF model directory is used as it is)",
            path.display()
        );
    }
    if !path.exists() {
        bail!("{}: no such GGUF file", path.display());
    }
    crate::merge::report_stale_temps();
    peft::io::ensure_no_alias(&[("the GGUF model", path.as_path())], &[&args.output])?;
    // The directory is assembled under `.NAME.tmp-PID` and renamed: remove what a killed run left.
    peft::io::remove_stale_temps_beside(&args.output)?;
    let m = peft_models::gguf::load_gguf(path, &Device::Cpu)
        .with_context(|| format!("loading the GGUF file {}", path.display()))?;
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
