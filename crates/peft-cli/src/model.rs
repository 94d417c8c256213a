//! Loading a base model for `train`, `eval` and `generate`: an HF directory or a GGUF file.

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use peft_models::llama::{LlamaConfig, LlamaForCausalLM};
use peft_models::tokenizer::Tokenizer;
use std::path::Path;

/// A base model with its tokenizer.
#[derive(Debug)]
pub struct LoadedModel {
    /// The model (every projection an adapter slot).
    pub model: LlamaForCausalLM,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// Its HF `config.json`.
    pub config: serde_json::Value,
}

/// Loads an HF model directory (config.json, safetensors, tokenizer.json) or a llama GGUF file (dequantized
/// to f32, tensors renamed, tokenizer built from its metadata).
pub fn load_model(path: &Path, device: &Device) -> anyhow::Result<LoadedModel> {
    let (config, tensors, tokenizer) = if path.is_dir() {
        let m = peft_models::hf::load_hf_dir(path, DType::F32, device)
            .with_context(|| format!("loading the model directory {}", path.display()))?;
        let tok = m
            .tokenizer
            .with_context(|| format!("{}: no tokenizer.json", path.display()))?;
        (m.config, m.tensors, tok)
    } else if path.extension().is_some_and(|e| e == "gguf") {
        let m = peft_models::gguf::load_gguf(path, device)
            .with_context(|| format!("loading the GGUF model {}", path.display()))?;
        (m.config, m.tensors, m.tokenizer)
    } else if !path.exists() {
        bail!("{}: no such model file or directory", path.display());
    } else {
        bail!(
            "{}: expected an HF model directory or a .gguf file",
            path.display()
        );
    };
    let llama = LlamaConfig::from_value(&config).context("reading the model config")?;
    let model =
        LlamaForCausalLM::from_tensors(llama, tensors, device).context("building the model")?;
    Ok(LoadedModel {
        model,
        tokenizer,
        config,
    })
}

/// Wraps `model` in a [`peft::PeftModel`] with the adapter directories loaded (`default`, then `adapter1`,
/// `adapter2`, …) and all of them active together, in the order given.
pub fn with_adapters(
    model: LlamaForCausalLM,
    dirs: &[std::path::PathBuf],
    device: &Device,
) -> anyhow::Result<peft::PeftModel<LlamaForCausalLM>> {
    let mut pm = peft::PeftModel::new(model, 0);
    let mut names = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let name = if i == 0 {
            "default".to_string()
        } else {
            format!("adapter{i}")
        };
        pm.load_adapter(dir, &name, device)
            .with_context(|| format!("loading the adapter {}", dir.display()))?;
        names.push(name);
    }
    if !names.is_empty() {
        let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        pm.set_adapter(&refs)?;
    }
    Ok(pm)
}

/// Adapters for `eval` / `generate`: either PEFT layer adapters (a [`peft::PeftModel`], see [`with_adapters`])
/// or one prompt-learning adapter (prompt tuning, P-tuning, prefix tuning), which PEFT does not combine with
/// others either.
pub fn with_any_adapters(
    model: LlamaForCausalLM,
    dirs: &[std::path::PathBuf],
    device: &Device,
) -> anyhow::Result<(
    peft::PeftModel<LlamaForCausalLM>,
    Option<peft_models::prompt_learning::PromptLearning>,
)> {
    let mut prompt = Vec::new();
    for dir in dirs {
        let config = peft::PeftConfig::from_dir(dir)
            .with_context(|| format!("reading the adapter config in {}", dir.display()))?;
        if config.is_prompt_learning() {
            prompt.push(dir);
        }
    }
    if prompt.is_empty() {
        return Ok((with_adapters(model, dirs, device)?, None));
    }
    anyhow::ensure!(
        dirs.len() == 1,
        "a prompt-learning adapter ({}) cannot be combined with other adapters",
        prompt[0].display()
    );
    let pl = peft_models::prompt_learning::PromptLearning::load(&dirs[0], &model)
        .with_context(|| format!("loading the adapter {}", dirs[0].display()))?;
    Ok((peft::PeftModel::new(model, 0), Some(pl)))
}
