//! Loading a base model (an HF directory or a GGUF file) with its tokenizer, and attaching adapter
//! directories to it.

use crate::error::{ModelError, Result};
use crate::llama::{LlamaConfig, LlamaForCausalLM};
use crate::quantize::Quantize;
use crate::tokenizer::Tokenizer;
use candle_core::{DType, Device};
use peft::PeftModel;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A base model with its tokenizer and HF config.
#[derive(Debug)]
pub struct LoadedModel {
    /// The model (every projection an adapter slot).
    pub model: LlamaForCausalLM,
    /// Its tokenizer: `None` for a model directory without `tokenizer.json` (pre-tokenized data still
    /// trains and evaluates; text data, prompts and generation need one).
    pub tokenizer: Option<Tokenizer>,
    /// Its HF `config.json` (for a GGUF file: the one built from its metadata).
    pub config: serde_json::Value,
}

impl LoadedModel {
    /// The tokenizer, or an error naming the missing `tokenizer.json` and what needed it.
    pub fn require_tokenizer(&self, what: &str) -> Result<&Tokenizer> {
        require_tokenizer(self.tokenizer.as_ref(), what)
    }
}

/// `tokenizer`, or an error saying that `what` needs one and the model has no `tokenizer.json`.
pub fn require_tokenizer<'t>(
    tokenizer: Option<&'t Tokenizer>,
    what: &str,
) -> Result<&'t Tokenizer> {
    tokenizer.ok_or_else(|| {
        ModelError::Invalid(format!(
            "{what} needs a tokenizer, and the model has none (no tokenizer.json in its directory)"
        ))
    })
}

/// Loads an HF model directory (`config.json`, safetensors, `tokenizer.json` when present; bitsandbytes 4-bit
/// and 8-bit checkpoints stay quantized) or a llama GGUF file (the decoder projections kept in their ggml
/// blocks, everything else dequantized to f32, tensors renamed, tokenizer built from its metadata) into a
/// [`LlamaForCausalLM`] on `device`. [`load_model_with`] takes options (quantize while loading, or the GGUF
/// fully dequantized).
///
/// ```no_run
/// # fn main() -> peft_models::error::Result<()> {
/// let loaded = peft_models::load_model("SmolLM2-135M-Instruct", &candle_core::Device::Cpu)?;
/// println!("{} layers, tokenizer: {}", loaded.model.config().num_hidden_layers, loaded.tokenizer.is_some());
/// # Ok(()) }
/// ```
pub fn load_model(path: impl AsRef<Path>, device: &Device) -> Result<LoadedModel> {
    load_model_with(path, device, &LoadOptions::default())
}

/// A callback that [`load_model_with`] calls after each tensor it reads, with the number read so far and the
/// total, while it quantizes a model on the fly (a long pass on a large model: `peft` draws a progress bar
/// with it).
///
/// ```
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// let seen = Arc::new(AtomicUsize::new(0));
/// let s = seen.clone();
/// let progress = peft_models::LoadProgress::new(move |done, _total| s.store(done, Ordering::Relaxed));
/// progress.report(3, 10);
/// assert_eq!(seen.load(Ordering::Relaxed), 3);
/// ```
#[derive(Clone)]
pub struct LoadProgress(Arc<dyn Fn(usize, usize) + Send + Sync>);

impl LoadProgress {
    /// Wraps `f(done, total)`.
    pub fn new(f: impl Fn(usize, usize) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Reports `done` of `total` tensors read.
    pub fn report(&self, done: usize, total: usize) {
        (self.0)(done, total)
    }
}

impl std::fmt::Debug for LoadProgress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LoadProgress(..)")
    }
}

impl PartialEq for LoadProgress {
    /// The same callback.
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

/// How [`load_model_with`] loads a model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LoadOptions {
    /// Quantize the decoder-layer projections while loading (QLoRA on a full-precision model).
    pub quantize: Option<Quantize>,
    /// Dequantize a GGUF model's block-quantized projections to f32 when loading (by default they stay in
    /// their ggml blocks and each forward dequantizes them band by band: the same numbers, a fraction of the
    /// memory).
    pub dequantize_gguf: bool,
    /// Called after each tensor read while quantizing on the fly ([`LoadOptions::quantize`]).
    pub progress: Option<LoadProgress>,
    /// The dtype the frozen weights are held in: `None` or f32 (the default) converts every floating-point
    /// tensor to f32; bf16 or f16 holds the decoder's Linear weights, the embedding and `lm_head` (tied or
    /// not) and the biases in that dtype, each tensor converted as it is read (a checkpoint already in that
    /// dtype is never copied to f32), while the activations, the RMSNorm weights (converted back to f32), every
    /// adapter parameter, gradient and optimizer state stay f32: each product is computed in f32 with the
    /// weight converted band by band ([`peft::ops::half_linear`]), as PEFT's autocast over a bf16 / f16 model
    /// does. Half the base's resident memory, logits within bf16's (f16's) rounding of the weights.
    ///
    /// Not with [`LoadOptions::quantize`], nor with a checkpoint saved quantized (bitsandbytes, GPTQ, AWQ): an
    /// error. On a GGUF file the tensors that are not kept in ggml blocks (the embedding, norms, `lm_head`, and
    /// every projection with [`LoadOptions::dequantize_gguf`]) follow it, each converted as it is dequantized;
    /// the blocks kept quantized are unaffected.
    pub dtype: Option<DType>,
    /// The memory budget of the frozen weights, checked from the file headers before any weight is read
    /// ([`crate::memory::check_fits`]): by default what the machine has available now.
    pub max_memory: crate::memory::MemoryLimit,
}

/// [`load_model`] with options: `quantize` keeps the decoder-layer projections quantized (bitsandbytes NF4 /
/// FP4), each weight quantized as it is read. A checkpoint that transformers saved quantized (bitsandbytes
/// 4-bit `quantization_config`) loads quantized without options.
///
/// ```no_run
/// use peft_models::{LoadOptions, load_model_with, quantize::Quantize};
/// # fn main() -> peft_models::error::Result<()> {
/// let options = LoadOptions { quantize: Some(Quantize::parse("nf4", true)?), ..Default::default() };
/// let loaded = load_model_with("SmolLM2-135M-Instruct", &candle_core::Device::Cpu, &options)?;
/// # Ok(()) }
/// ```
pub fn load_model_with(
    path: impl AsRef<Path>,
    device: &Device,
    options: &LoadOptions,
) -> Result<LoadedModel> {
    let path = path.as_ref();
    let quantize = options.quantize.as_ref();
    let progress = options.progress.as_ref().filter(|_| quantize.is_some());
    let dtype = options.dtype.unwrap_or(DType::F32);
    let half = match dtype {
        DType::F32 => false,
        DType::BF16 | DType::F16 => true,
        d => {
            return Err(ModelError::Invalid(format!(
                "LoadOptions::dtype {d:?}: the frozen weights are held in f32, bf16 or f16"
            )));
        }
    };
    if half && let Some(q) = quantize {
        let d = dtype_name(dtype);
        return Err(ModelError::Invalid(format!(
            "a {d} base (--dtype {d}) cannot also be quantized while loading ({}): choose one",
            q.describe()
        )));
    }
    if half && path.is_dir() {
        // A checkpoint saved quantized keeps its own storage (GPTQ's f16 scales must not round to bf16).
        let cfg = path.join("config.json");
        if let Ok(text) = std::fs::read_to_string(&cfg) {
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::json(cfg.display(), e.to_string()))?;
            if let Some(stored) = crate::quantize::checkpoint_quantization(&value)? {
                return Err(ModelError::Invalid(format!(
                    "{}: the checkpoint is saved quantized ({stored}); a {} base (--dtype {}) applies to \
                     full-precision models only",
                    path.display(),
                    dtype_name(dtype),
                    dtype_name(dtype)
                )));
            }
        }
    }
    crate::memory::check_fits(
        path,
        dtype,
        quantize,
        !options.dequantize_gguf,
        options.max_memory,
    )?;
    let (config, tensors, quantized, tokenizer) = if path.is_dir() {
        let m = crate::hf::load_hf_dir_with(path, dtype, device, quantize, progress)
            .map_err(|e| e.context(format!("loading the model directory {}", path.display())))?;
        // GPTQ / AWQ Linear weights are read here, where the config's `checkpoint_format` is known (v1 and
        // v2 zero points cannot be told apart from the tensors).
        let mut tensors = m.tensors;
        let quantized = crate::quantize::checkpoint_weights(&m.config, &mut tensors)
            .map_err(|e| e.context(format!("loading the model directory {}", path.display())))?;
        (m.config, tensors, quantized, m.tokenizer)
    } else if path.extension().is_some_and(|e| e == "gguf") {
        let m = crate::gguf::load_gguf_as(
            path,
            device,
            quantize,
            !options.dequantize_gguf,
            progress,
            dtype,
        )
        .map_err(|e| e.context(format!("loading the GGUF model {}", path.display())))?;
        (m.config, m.tensors, m.quantized, Some(m.tokenizer))
    } else if !path.exists() {
        return Err(ModelError::Invalid(format!(
            "{}: no such model file or directory",
            path.display()
        )));
    } else {
        return Err(ModelError::Invalid(format!(
            "{}: expected an HF model directory or a .gguf file",
            path.display()
        )));
    };
    let llama = LlamaConfig::from_value(&config)
        .map_err(|e| ModelError::from(e).context("reading the model config"))?;
    let model = LlamaForCausalLM::from_parts(llama, tensors, quantized, device).map_err(|e| {
        ModelError::from(e).context(format!("building the model from {}", path.display()))
    })?;
    Ok(LoadedModel {
        model,
        tokenizer,
        config,
    })
}

/// `bf16`, `f16`, `f32`: a dtype as the `--dtype` flags spell it.
fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

/// Wraps `model` in a [`PeftModel`] with the adapter directories loaded (`default`, then `adapter1`,
/// `adapter2`, …) and all of them active together, in the order given. Any method loads, prompt learning
/// included (one prompt-learning adapter alone: PEFT does not combine it with others either).
pub fn with_adapters(
    model: LlamaForCausalLM,
    dirs: &[PathBuf],
    device: &Device,
) -> Result<PeftModel<LlamaForCausalLM>> {
    let mut pm = PeftModel::new(model, 0);
    let mut names = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let name = if i == 0 {
            "default".to_string()
        } else {
            format!("adapter{i}")
        };
        pm.load_adapter(dir, &name, device).map_err(|e| {
            ModelError::from(e).context(format!("loading the adapter {}", dir.display()))
        })?;
        names.push(name);
    }
    if !names.is_empty() {
        let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        pm.set_adapter(&refs)?;
    }
    Ok(pm)
}
