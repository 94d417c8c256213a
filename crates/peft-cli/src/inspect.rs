//! `peft inspect`: describes an adapter directory, or a base model's quantization, without loading its tensors.
//!
//! The config comes from [`peft::PeftConfig::from_dir`], the tensor names, shapes and dtypes from the
//! safetensors header ([`peft::io::SafetensorsFile`]). Keys are grouped by module with
//! [`peft::io::split_keys`] and the method's parameter names ([`peft::layer::registry::param_prefixes`]);
//! what is shown of each module comes from the method's [`peft::tuners::PeftMethod::summarize_module`];
//! for a method whose layers peft-rs does not implement yet, a generic rule groups them instead (everything
//! before the first key component that starts like an adapter parameter: `lora_`, `ia3_`, `hada_`, …).

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use indicatif::{HumanBytes, HumanCount};
use peft::PeftConfig;
use peft::io::{CONFIG_NAME, MODEL_PREFIX, SafetensorsFile, WEIGHTS_NAME, split_keys};
use peft::tuners::TensorInfo;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Arguments of `peft inspect`.
#[derive(Debug, Clone, Args)]
pub struct InspectArgs {
    /// The adapter directory (holding `adapter_config.json` and `adapter_model.safetensors`), or a base model
    /// (an HF directory, a `.safetensors` or a `.gguf` file): its Linear layers by quantization format.
    #[arg(value_name = "ADAPTER_DIR")]
    pub dir: PathBuf,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// One tensor of the adapter file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorEntry {
    /// Its key relative to what it belongs to (`lora_A.weight` within a module), or the plain model name
    /// for a replaced tensor.
    pub name: String,
    /// Its key in the file.
    pub key: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Its dtype as safetensors names it (`F32`, `BF16`, …).
    pub dtype: String,
}

impl TensorEntry {
    /// Its number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

/// One module the adapter targets.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleEntry {
    /// The module's dotted name in the base model.
    pub name: String,
    /// Its rank, where the method has one (LoRA: `rank_pattern` applied).
    pub r: Option<usize>,
    /// Its alpha, where the method has one (LoRA: `alpha_pattern` applied).
    pub alpha: Option<f64>,
    /// The scaling of its delta (LoRA: `alpha / r`, rsLoRA `alpha / √r`).
    pub scaling: Option<f64>,
    /// Its adapter tensors, in file order (`name` relative to the module).
    pub tensors: Vec<TensorEntry>,
    /// Variant flags: `rslora`, `dora`, `lora_bias`; `rank_mismatch` when the file's rank is not `r`.
    pub flags: Vec<String>,
}

impl ModuleEntry {
    /// Its number of adapter parameters.
    pub fn params(&self) -> u64 {
        self.tensors.iter().map(TensorEntry::numel).sum()
    }
}

/// Everything `peft inspect` reports about an adapter directory.
#[derive(Debug, Clone, PartialEq)]
pub struct Inspection {
    /// The directory inspected.
    pub dir: PathBuf,
    /// `peft_type`.
    pub peft_type: String,
    /// `task_type`.
    pub task_type: Option<String>,
    /// `base_model_name_or_path`.
    pub base_model_name_or_path: Option<String>,
    /// `peft_version`.
    pub peft_version: Option<String>,
    /// Why peft-rs would refuse to load this adapter ([`PeftConfig::validate`]), if it would.
    pub validation_error: Option<String>,
    /// How the keys were grouped when the method's layers are not implemented yet (`None`: by the method's
    /// own parameter names).
    pub grouping_note: Option<String>,
    /// The targeted modules, in file order.
    pub modules: Vec<ModuleEntry>,
    /// Model tensors the adapter replaces (`bias="all"` biases, `modules_to_save` copies, saved
    /// embeddings), `name` being the tensor's plain name in the base model.
    pub replaced_tensors: Vec<TensorEntry>,
    /// Tensors outside `base_model.model.` (shared VeRA matrices, prompt embeddings), by key.
    pub shared_tensors: Vec<TensorEntry>,
    /// The element count of every tensor in the file.
    pub trainable_params: u64,
    /// The number of tensors in the file.
    pub n_tensors: usize,
    /// The number of tensors per dtype.
    pub dtypes: BTreeMap<String, usize>,
    /// The size of `adapter_model.safetensors`.
    pub file_size_bytes: u64,
    /// Config keys PEFT 0.21.2 does not have.
    pub unknown_keys: Vec<String>,
    /// Other adapters saved in sub-directories (`<dir>/<name>/adapter_config.json`), by name.
    pub sub_adapters: Vec<String>,
}

/// The prefixes that start an adapter parameter's name in a key, for the generic grouping rule.
pub const GENERIC_PARAM_PREFIXES: &[&str] = &[
    "lora_", "ia3_", "hada_", "lokr_", "oft_", "boft_", "vera_", "adalora", "ranknum",
];

/// Where one key of an adapter file belongs.
enum Place {
    Module { module: String, param: String },
    Replaced(String),
    Shared,
}

/// Classifies a key with the library's [`split_keys`] and the method's parameter names.
fn place_by_library(key: &str, prefixes: &[&str], dummy: &Tensor) -> peft::Result<Place> {
    let one = std::iter::once((key.to_string(), dummy.clone())).collect();
    let split = split_keys(&one, prefixes)?;
    if let Some((module, params)) = split.modules.into_iter().next() {
        let param = params.into_keys().next().unwrap_or_default();
        return Ok(Place::Module { module, param });
    }
    if let Some(name) = split.overrides.into_keys().next() {
        return Ok(Place::Replaced(name));
    }
    Ok(Place::Shared)
}

/// Classifies a key by the generic rule: the module is everything before the first component that
/// starts with one of [`GENERIC_PARAM_PREFIXES`]; without one, the key is a replaced model tensor.
fn place_generic(key: &str) -> Place {
    let Some(rest) = key.strip_prefix(MODEL_PREFIX) else {
        return Place::Shared;
    };
    let parts: Vec<&str> = rest.split('.').collect();
    match parts
        .iter()
        .position(|p| GENERIC_PARAM_PREFIXES.iter().any(|pre| p.starts_with(pre)))
    {
        Some(0) => Place::Shared,
        Some(i) => Place::Module {
            module: parts[..i].join("."),
            param: parts[i..].join("."),
        },
        None => Place::Replaced(
            parts
                .into_iter()
                .filter(|p| *p != "base_layer")
                .collect::<Vec<_>>()
                .join("."),
        ),
    }
}

/// Other adapters saved under `dir`: sub-directories with their own `adapter_config.json`, sorted.
fn sub_adapters(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    for e in entries {
        let e = e.with_context(|| format!("cannot list {}", dir.display()))?;
        let path = e.path();
        if path.is_dir() && path.join(CONFIG_NAME).is_file() {
            names.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Why the tensors of an adapter file would be refused on load ([`peft::io::check_adapter_tensors`]).
fn tensor_problem(file: &SafetensorsFile, path: &Path) -> Option<String> {
    let strict = peft::io::AdapterChecks {
        allow_non_finite: false,
    };
    file.load_all(&Device::Cpu)
        .and_then(|t| peft::io::check_adapter_tensors(path, &t, strict))
        .err()
        .map(|e| e.to_string())
}

/// Reads an adapter directory's config and safetensors header, and checks its tensors' values (as loading
/// would: floating point, finite, at least one tensor; a failure is reported as the validation error).
pub fn inspect(dir: &Path) -> anyhow::Result<Inspection> {
    if !dir.is_dir() {
        if dir.exists() {
            bail!(
                "{} is not a directory: pass the adapter directory holding {CONFIG_NAME}",
                dir.display()
            );
        }
        bail!("adapter directory {} does not exist", dir.display());
    }
    let config = PeftConfig::from_dir(dir)
        .with_context(|| format!("cannot read the config of {}", dir.display()))?;
    let weights = dir.join(WEIGHTS_NAME);
    if !weights.is_file() && dir.join("adapter_model.bin").is_file() {
        bail!(
            "{}: only {WEIGHTS_NAME} is supported (found a pickled adapter_model.bin)",
            dir.display()
        );
    }
    let file = SafetensorsFile::open(&weights)
        .with_context(|| format!("cannot read {}", weights.display()))?;
    let file_size_bytes = std::fs::metadata(&weights)
        .with_context(|| format!("cannot read {}", weights.display()))?
        .len();

    let dummy = Tensor::zeros((), DType::F32, &Device::Cpu)?;
    let (prefixes, grouping_note) = match peft::layer::registry::param_prefixes(&config) {
        Ok(p) => (Some(p), None),
        Err(e) => (
            None,
            Some(format!("keys grouped by the generic rule ({e})")),
        ),
    };

    let mut modules: Vec<ModuleEntry> = Vec::new();
    let mut replaced_tensors = Vec::new();
    let mut shared_tensors = Vec::new();
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    let mut trainable_params = 0u64;
    let names = file.names();
    for key in &names {
        let (shape, dtype) = file
            .info(key)
            .with_context(|| format!("{}: no tensor {key}", weights.display()))?;
        let dtype = format!("{dtype:?}");
        *dtypes.entry(dtype.clone()).or_default() += 1;
        let place = match prefixes {
            Some(p) => place_by_library(key, p, &dummy).unwrap_or_else(|_| place_generic(key)),
            None => place_generic(key),
        };
        let entry = |name: String| TensorEntry {
            name,
            key: key.clone(),
            shape: shape.clone(),
            dtype: dtype.clone(),
        };
        trainable_params += entry(String::new()).numel();
        match place {
            Place::Module { module, param } => {
                let idx = match modules.iter().position(|m| m.name == module) {
                    Some(i) => i,
                    None => {
                        modules.push(ModuleEntry {
                            name: module,
                            r: None,
                            alpha: None,
                            scaling: None,
                            tensors: Vec::new(),
                            flags: Vec::new(),
                        });
                        modules.len() - 1
                    }
                };
                modules[idx].tensors.push(entry(param));
            }
            Place::Replaced(name) => replaced_tensors.push(entry(name)),
            Place::Shared => shared_tensors.push(entry(key.clone())),
        }
    }
    for m in &mut modules {
        let tensors: Vec<TensorInfo<'_>> = m
            .tensors
            .iter()
            .map(|t| TensorInfo {
                name: &t.name,
                shape: &t.shape,
            })
            .collect();
        let summary = config.method().summarize_module(&m.name, &tensors);
        m.r = summary.r;
        m.alpha = summary.alpha;
        m.scaling = summary.scaling;
        m.flags = summary.flags;
    }

    Ok(Inspection {
        dir: dir.to_path_buf(),
        peft_type: config.peft_type().as_str().to_string(),
        task_type: config.task_type().map(|t| t.as_str().to_string()),
        base_model_name_or_path: config.base_model_name_or_path().map(str::to_string),
        peft_version: config.base().peft_version.clone(),
        validation_error: config
            .validate()
            .err()
            .map(|e| e.to_string())
            .or_else(|| tensor_problem(&file, &weights)),
        grouping_note: grouping_note.or_else(|| {
            (modules.is_empty() && config.method().layers_from_config()).then(|| {
                let targets = config
                    .target_spec()
                    .and_then(|t| t.target_modules.and_then(|m| serde_json::to_string(m).ok()))
                    .unwrap_or_else(|| "PEFT's defaults for the model type".into());
                format!(
                    "the file holds no per-layer tensors: the layers are the modules the config targets \
                     ({targets}), drawn again at load"
                )
            })
        }),
        modules,
        replaced_tensors,
        shared_tensors,
        trainable_params,
        n_tensors: names.len(),
        dtypes,
        file_size_bytes,
        unknown_keys: config.unknown_keys(),
        sub_adapters: sub_adapters(dir)?,
    })
}

/// A float as JSON: an integer when it is one (`8`, not `8.0`), as in `adapter_config.json`.
fn num(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// A float for people: integers without a fraction, others to 6 significant decimals.
fn fmt_num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        format!("{}", x as i64)
    } else {
        let s = format!("{x:.6}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn tensor_json(t: &TensorEntry) -> Value {
    json!({"name": t.name, "key": t.key, "shape": t.shape, "dtype": t.dtype})
}

impl Inspection {
    /// The JSON form: `peft_type`, `task_type`, `base_model_name_or_path`, `modules` (`name`, `r`, `alpha`,
    /// `scaling`, `shapes`, `params`, `flags`), `trainable_params`, `dtypes`, `file_size_bytes`,
    /// `replaced_tensors`, `unknown_keys`, `sub_adapters`, and a few more.
    pub fn to_json(&self) -> Value {
        let modules: Vec<Value> = self
            .modules
            .iter()
            .map(|m| {
                let shapes: serde_json::Map<String, Value> = m
                    .tensors
                    .iter()
                    .map(|t| (t.name.clone(), json!(t.shape)))
                    .collect();
                json!({
                    "name": m.name,
                    "r": m.r,
                    "alpha": m.alpha.map(num),
                    "scaling": m.scaling.map(num),
                    "shapes": shapes,
                    "params": m.params(),
                    "flags": m.flags,
                })
            })
            .collect();
        json!({
            "dir": self.dir.display().to_string(),
            "peft_type": self.peft_type,
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "peft_version": self.peft_version,
            "validation_error": self.validation_error,
            "grouping_note": self.grouping_note,
            "modules": modules,
            "trainable_params": self.trainable_params,
            "n_tensors": self.n_tensors,
            "dtypes": self.dtypes,
            "file_size_bytes": self.file_size_bytes,
            "replaced_tensors": self.replaced_tensors.iter().map(tensor_json).collect::<Vec<_>>(),
            "shared_tensors": self.shared_tensors.iter().map(tensor_json).collect::<Vec<_>>(),
            "unknown_keys": self.unknown_keys,
            "sub_adapters": self.sub_adapters,
        })
    }

    /// The text form.
    pub fn to_text(&self) -> String {
        let dash = |s: &Option<String>| s.clone().unwrap_or_else(|| "-".into());
        let mut variants: Vec<&str> = Vec::new();
        for (flag, label) in [
            ("rslora", "rsLoRA"),
            ("dora", "DoRA"),
            ("lora_bias", "lora_bias"),
        ] {
            if self
                .modules
                .iter()
                .any(|m| m.flags.iter().any(|f| f == flag))
            {
                variants.push(label);
            }
        }
        let method = match variants.is_empty() {
            true => self.peft_type.clone(),
            false => format!("{} ({})", self.peft_type, variants.join(", ")),
        };
        let dtypes: Vec<String> = self
            .dtypes
            .iter()
            .map(|(d, n)| format!("{d} × {n}"))
            .collect();
        let mut s = String::new();
        let mut line = |k: &str, v: String| s.push_str(&format!("{k:<13} {v}\n"));
        line("adapter", self.dir.display().to_string());
        line("peft_type", method);
        line("task_type", dash(&self.task_type));
        line("base model", dash(&self.base_model_name_or_path));
        line("peft_version", dash(&self.peft_version));
        line(
            "parameters",
            format!(
                "{} in {} tensor{}",
                HumanCount(self.trainable_params),
                self.n_tensors,
                if self.n_tensors == 1 { "" } else { "s" }
            ),
        );
        line(
            "dtypes",
            if dtypes.is_empty() {
                "-".into()
            } else {
                dtypes.join(", ")
            },
        );
        line(
            "file size",
            format!(
                "{} ({} bytes)",
                HumanBytes(self.file_size_bytes),
                self.file_size_bytes
            ),
        );
        if let Some(e) = &self.validation_error {
            line("loadable", format!("no: {e}"));
        }
        if let Some(n) = &self.grouping_note {
            line("note", n.clone());
        }

        s.push_str(&format!("\nmodules ({}):\n", self.modules.len()));
        let width = self
            .modules
            .iter()
            .flat_map(|m| &m.tensors)
            .map(|t| t.name.len())
            .max()
            .unwrap_or(0);
        for m in &self.modules {
            let mut head = format!("  {}", m.name);
            if let Some(r) = m.r {
                head.push_str(&format!("  r={r}"));
            }
            if let Some(a) = m.alpha {
                head.push_str(&format!(" alpha={}", fmt_num(a)));
            }
            if let Some(sc) = m.scaling {
                head.push_str(&format!(" scaling={}", fmt_num(sc)));
            }
            head.push_str(&format!("  ({} params)", HumanCount(m.params())));
            if !m.flags.is_empty() {
                head.push_str(&format!("  [{}]", m.flags.join(", ")));
            }
            s.push_str(&head);
            s.push('\n');
            for t in &m.tensors {
                s.push_str(&format!(
                    "      {:<width$}  {:?} {}\n",
                    t.name, t.shape, t.dtype
                ));
            }
        }
        s.push('\n');
        let mut list = |title: &str, items: Vec<String>| {
            if items.is_empty() {
                s.push_str(&format!("{title}: none\n"));
            } else {
                s.push_str(&format!("{title} ({}):\n", items.len()));
                for i in items {
                    s.push_str(&format!("  {i}\n"));
                }
            }
        };
        let replaced = self
            .replaced_tensors
            .iter()
            .map(|t| {
                format!(
                    "{}  {:?} {}  (saved as {})",
                    t.name, t.shape, t.dtype, t.key
                )
            })
            .collect();
        list("replaced model tensors", replaced);
        if !self.shared_tensors.is_empty() {
            list(
                "shared tensors",
                self.shared_tensors
                    .iter()
                    .map(|t| format!("{}  {:?} {}", t.key, t.shape, t.dtype))
                    .collect(),
            );
        }
        list("unknown config keys", self.unknown_keys.clone());
        let subs = self
            .sub_adapters
            .iter()
            .map(|n| match PeftConfig::from_dir(&self.dir.join(n)) {
                Ok(c) => format!("{n}  ({})", c.peft_type()),
                Err(_) => format!("{n}  (unreadable config)"),
            })
            .collect();
        list("sub-adapters", subs);
        s
    }
}

// ---- Base models: what is quantized and what it takes ----

/// One group of a base model's Linear layers stored the same way.
#[derive(Debug, Clone, PartialEq)]
pub struct LinearGroup {
    /// How the weights are stored: `bnb nf4 (blocksize 64, double quant)`, `bnb int8`,
    /// `gptq 4-bit (group size 32, desc_act)`, `awq 4-bit gemm (group size 32)`, `gguf Q8_0`, or `dense F32`
    /// for weights held unquantized (the storage dtype).
    pub format: String,
    /// Whether the weights are quantized.
    pub quantized: bool,
    /// The modules, in file order (HuggingFace names: `model.layers.0.self_attn.q_proj`, `lm_head`).
    pub modules: Vec<String>,
    /// Their weights' elements (`out × in` summed).
    pub params: u64,
    /// The bytes the file stores for their weights: the packed weight and its state tensors (bitsandbytes
    /// `absmax`, `quant_map`, `nested_*` and the quant state's JSON; GPTQ / AWQ `qzeros`, `scales`, `g_idx`;
    /// the GGUF blocks), not their biases.
    pub bytes: u64,
    /// The bytes the same weights take in f32 (`4 × params`).
    pub f32_bytes: u64,
}

/// Everything `peft inspect` reports about a base model (an HF directory, a safetensors file or a GGUF file),
/// read from the file headers: the quant states of bitsandbytes 4-bit weights (a few bytes each) are the only
/// tensor data read.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInspection {
    /// The path inspected.
    pub path: PathBuf,
    /// `safetensors` or `gguf`.
    pub container: String,
    /// The weight files (shards), by name.
    pub files: Vec<String>,
    /// Their total size.
    pub file_size_bytes: u64,
    /// `model_type` (config.json) or `general.architecture` (GGUF).
    pub architecture: Option<String>,
    /// What `config.json`'s `quantization_config` says (`bitsandbytes 4-bit nf4, double quant`,
    /// `gptq 4-bit, group size 32, desc_act, sym, format gptq_v2`, …); `None` without one.
    pub quantization: Option<String>,
    /// Why peft-rs would refuse to load this quantization
    /// ([`peft_models::quantize::checkpoint_quantization`]), if it would.
    pub load_error: Option<String>,
    /// The Linear layers (decoder projections and the output layer; not embeddings), grouped by how they are
    /// stored, quantized groups first.
    pub linear: Vec<LinearGroup>,
    /// The number of other tensors (embeddings, norms, biases, …).
    pub other_tensors: usize,
    /// Their bytes as stored.
    pub other_bytes: u64,
    /// The bytes of every tensor as stored: the weights' memory.
    pub total_bytes: u64,
    /// The number of tensors in the file(s).
    pub n_tensors: usize,
    /// GGUF only: the ggml types of each tensor class (`attn_q`, `ffn_down`, `token_embd`, …), with counts.
    pub gguf_types: BTreeMap<String, BTreeMap<String, usize>>,
}

impl ModelInspection {
    /// The number of Linear layers.
    pub fn linear_layers(&self) -> usize {
        self.linear.iter().map(|g| g.modules.len()).sum()
    }

    /// The number of quantized Linear layers.
    pub fn quantized_layers(&self) -> usize {
        self.linear
            .iter()
            .filter(|g| g.quantized)
            .map(|g| g.modules.len())
            .sum()
    }
}

/// Whether `path` names a base model rather than an adapter directory: a `.gguf` or `.safetensors` file, or
/// a directory without `adapter_config.json` that holds `config.json` or model weights.
pub fn is_model_path(path: &Path) -> bool {
    if path.is_file() {
        return is_gguf(path)
            || path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    }
    path.is_dir()
        && !path.join(CONFIG_NAME).is_file()
        && [
            "config.json",
            "model.safetensors",
            "model.safetensors.index.json",
        ]
        .iter()
        .any(|f| path.join(f).is_file())
}

/// A `.gguf` name, or a file starting with the GGUF magic.
fn is_gguf(path: &Path) -> bool {
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

/// Bytes of a tensor of `shape` whose dtype has `bits` bits per element.
fn tensor_bytes(shape: &[usize], bits: usize) -> u64 {
    let numel: u64 = shape.iter().map(|&d| d as u64).product();
    (numel * bits as u64).div_ceil(8)
}

/// `config.json`'s `quantization_config` in a few words, `None` without one.
fn config_quantization(config: &Value) -> Option<String> {
    let q = config.get("quantization_config").filter(|q| !q.is_null())?;
    let s = |k: &str| q.get(k).and_then(Value::as_str);
    let flag = |k: &str| q.get(k).and_then(Value::as_bool).unwrap_or(false);
    let group = match q.get("group_size").and_then(Value::as_i64) {
        Some(-1) => "one group".to_string(),
        Some(g) => format!("group size {g}"),
        None => "group size unknown".to_string(),
    };
    let bits = q.get("bits").map(|b| b.to_string()).unwrap_or("?".into());
    let method = s("quant_method").unwrap_or("unknown");
    Some(match method {
        "bitsandbytes" if flag("load_in_4bit") || flag("_load_in_4bit") => format!(
            "bitsandbytes 4-bit {}{}",
            s("bnb_4bit_quant_type").unwrap_or("fp4"),
            if flag("bnb_4bit_use_double_quant") {
                ", double quant"
            } else {
                ""
            }
        ),
        "bitsandbytes" if flag("load_in_8bit") || flag("_load_in_8bit") => {
            "bitsandbytes 8-bit".into()
        }
        "gptq" => {
            let mut d = format!("gptq {bits}-bit, {group}");
            if flag("desc_act") {
                d.push_str(", desc_act");
            }
            if let Some(sym) = q.get("sym").and_then(Value::as_bool) {
                d.push_str(if sym { ", sym" } else { ", asym" });
            }
            if let Some(f) = s("checkpoint_format").or_else(|| s("format")) {
                d.push_str(&format!(", format {f}"));
            }
            d
        }
        "awq" => format!(
            "awq {bits}-bit {}, {group}{}",
            s("version").or_else(|| s("format")).unwrap_or("gemm"),
            if flag("zero_point") {
                ", zero_point"
            } else {
                ""
            }
        ),
        other => format!("quant_method {other:?}"),
    })
}

/// Adds Linear `module` (`params` weights, `bytes` stored) to the group `format`.
fn add_linear(
    groups: &mut Vec<LinearGroup>,
    format: String,
    quantized: bool,
    module: &str,
    params: u64,
    bytes: u64,
) {
    let i = match groups.iter().position(|g| g.format == format) {
        Some(i) => i,
        None => {
            groups.push(LinearGroup {
                format,
                quantized,
                modules: Vec::new(),
                params: 0,
                bytes: 0,
                f32_bytes: 0,
            });
            groups.len() - 1
        }
    };
    let g = &mut groups[i];
    g.modules.push(module.to_string());
    g.params += params;
    g.bytes += bytes;
    g.f32_bytes += 4 * params;
}

/// Whether a dense 2-D `…weight` of this name is a Linear layer's (not an embedding's).
fn is_dense_linear(name: &str, shape: &[usize]) -> bool {
    shape.len() == 2
        && name.ends_with(".weight")
        && !["embed", "wte", "wpe", "wtoken"]
            .iter()
            .any(|e| name.contains(e))
}

/// Why a Llama-family `config.json` would be refused on load (other model types are described, not checked).
fn llama_config_problem(config: &Value) -> Option<String> {
    config
        .get("model_type")
        .and_then(Value::as_str)
        .and_then(peft_models::llama::LlamaFamily::from_model_type)?;
    peft_models::llama::LlamaConfig::from_value(config)
        .err()
        .map(|e| e.to_string())
}

/// Reads a base model's headers (an HF directory, a safetensors file or a GGUF file) and reports its Linear
/// layers by storage format, their memory quantized and in f32, and the weights' total.
pub fn inspect_model(path: &Path) -> anyhow::Result<ModelInspection> {
    if path.is_file() && is_gguf(path) {
        return inspect_gguf(path);
    }
    let model = peft::io::BaseModel::open(path)
        .with_context(|| format!("cannot read the model {}", path.display()))?;
    let config = model.config.clone().unwrap_or(Value::Null);
    let mut info = ModelInspection {
        path: path.to_path_buf(),
        container: "safetensors".into(),
        files: model.shards.iter().map(|(n, _)| n.clone()).collect(),
        file_size_bytes: 0,
        architecture: config
            .get("model_type")
            .and_then(Value::as_str)
            .map(str::to_string),
        quantization: config_quantization(&config),
        load_error: peft_models::quantize::checkpoint_quantization(&config)
            .err()
            .map(|e| e.to_string())
            .or_else(|| llama_config_problem(&config)),
        linear: Vec::new(),
        other_tensors: 0,
        other_bytes: 0,
        total_bytes: 0,
        n_tensors: 0,
        gguf_types: BTreeMap::new(),
    };
    for (_, f) in &model.shards {
        info.file_size_bytes += std::fs::metadata(f.path())
            .with_context(|| format!("cannot read {}", f.path().display()))?
            .len();
    }
    // name → (shard index, shape, bytes)
    let mut headers: std::collections::HashMap<String, (usize, Vec<usize>, u64)> =
        std::collections::HashMap::new();
    let mut names: Vec<String> = Vec::new();
    for (i, (_, f)) in model.shards.iter().enumerate() {
        for name in f.names() {
            let (shape, dtype) = f
                .info(&name)
                .with_context(|| format!("{}: no tensor {name}", f.path().display()))?;
            let bytes = tensor_bytes(&shape, dtype.bitsize());
            info.total_bytes += bytes;
            names.push(name.clone());
            headers.insert(name, (i, shape, bytes));
        }
    }
    info.n_tensors = headers.len();
    let q = config.get("quantization_config").unwrap_or(&Value::Null);
    let desc_act = q.get("desc_act").and_then(Value::as_bool) == Some(true);
    let gptq_format = ["checkpoint_format", "format"]
        .iter()
        .find_map(|k| q.get(*k).and_then(Value::as_str))
        .filter(|f| *f != "gptq")
        .map(str::to_string);
    let shape_of = |k: &str| headers.get(k).map(|h| h.1.clone()).unwrap_or_default();
    // Every tensor of a quantized module, first: its state tensors can come before its weight in the file.
    let used: std::collections::HashSet<String> = names
        .iter()
        .filter_map(|n| peft::quant::stored_module(n))
        .filter_map(|m| peft::quant::stored_keys(m, |k| headers.contains_key(k)))
        .flatten()
        .collect();
    for name in &names {
        let module = peft::quant::stored_module(name);
        let keys = module
            .and_then(|m| peft::quant::stored_keys(m, |k| headers.contains_key(k)))
            .filter(|k| k[0] == *name);
        if keys.is_none() && used.contains(name) {
            continue;
        }
        let (Some(module), Some(keys)) = (module, keys) else {
            let (_, shape, bytes) = &headers[name];
            if is_dense_linear(name, shape) {
                let dtype = model.shards[headers[name].0]
                    .1
                    .info(name)
                    .map(|(_, d)| format!("{d:?}"))
                    .unwrap_or_default();
                let module = name.strip_suffix(".weight").unwrap_or(name);
                let params = shape.iter().map(|&d| d as u64).product();
                add_linear(
                    &mut info.linear,
                    format!("dense {dtype}"),
                    false,
                    module,
                    params,
                    *bytes,
                );
            } else {
                info.other_tensors += 1;
                info.other_bytes += bytes;
            }
            continue;
        };
        let bytes: u64 = keys
            .iter()
            .filter_map(|k| headers.get(k).map(|h| h.2))
            .sum();
        let (format, out_in) = if name.ends_with(".qweight") {
            let qw = shape_of(&format!("{module}.qweight"));
            let sc = shape_of(&format!("{module}.scales"));
            let out = sc.get(1).copied().unwrap_or(0);
            let groups = sc.first().copied().unwrap_or(0).max(1);
            if headers.contains_key(&format!("{module}.g_idx")) {
                let inp = shape_of(&format!("{module}.g_idx"))
                    .first()
                    .copied()
                    .unwrap_or(0);
                let rows = qw.first().copied().unwrap_or(0);
                let bits = peft::quant::gptq::GPTQ_BITS
                    .into_iter()
                    .find(|&b| (inp * b as usize).div_ceil(32) == rows)
                    .map(|b| b.to_string())
                    .unwrap_or("?".into());
                let mut f = match groups {
                    1 => format!("gptq {bits}-bit (one group"),
                    g => format!("gptq {bits}-bit (group size {}", inp / g),
                };
                if desc_act {
                    f.push_str(", desc_act");
                }
                if let Some(v) = &gptq_format {
                    f.push_str(&format!(", {v}"));
                }
                f.push(')');
                (f, (out, inp))
            } else {
                let inp = qw.first().copied().unwrap_or(0);
                (
                    format!("awq 4-bit gemm (group size {})", inp / groups),
                    (out, inp),
                )
            }
        } else if headers.contains_key(&format!("{module}.SCB")) {
            let w = shape_of(name);
            (
                "bnb int8".to_string(),
                (
                    w.first().copied().unwrap_or(0),
                    w.get(1).copied().unwrap_or(0),
                ),
            )
        } else {
            // bitsandbytes 4-bit: the settings and the unpacked shape are in the quant state's JSON.
            let (state_key, qt) = ["nf4", "fp4"]
                .iter()
                .map(|t| (format!("{name}.quant_state.bitsandbytes__{t}"), *t))
                .find(|(k, _)| headers.contains_key(k))
                .context("bitsandbytes 4-bit weight without a quant state")?;
            let shard = &model.shards[headers[&state_key].0].1;
            let json: Value = shard
                .load(&state_key, &Device::Cpu)
                .ok()
                .and_then(|t| t.to_vec1::<u8>().ok())
                .and_then(|b| serde_json::from_slice(&b).ok())
                .with_context(|| format!("{state_key}: not a JSON quant state"))?;
            let shape: Vec<usize> = json
                .get("shape")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_u64)
                        .map(|d| d as usize)
                        .collect()
                })
                .unwrap_or_default();
            let f = format!(
                "bnb {} (blocksize {}{})",
                json.get("quant_type").and_then(Value::as_str).unwrap_or(qt),
                json.get("blocksize").unwrap_or(&Value::Null),
                if json.get("nested_offset").is_some() {
                    ", double quant"
                } else {
                    ""
                }
            );
            let numel: usize = shape.iter().product();
            let out = shape.first().copied().unwrap_or(0);
            (f, (out, numel.checked_div(out).unwrap_or(0)))
        };
        let params = out_in.0 as u64 * out_in.1 as u64;
        add_linear(&mut info.linear, format, true, module, params, bytes);
    }
    info.linear.sort_by_key(|g| !g.quantized);
    Ok(info)
}

/// [`inspect_model`] for a GGUF file: the tensor infos of its header, no tensor data.
fn inspect_gguf(path: &Path) -> anyhow::Result<ModelInspection> {
    use candle_core::quantized::gguf_file;
    let (content, _) = peft_models::gguf::read_content(path)?;
    let mut info = ModelInspection {
        path: path.to_path_buf(),
        container: "gguf".into(),
        files: vec![peft_file_name(path)],
        file_size_bytes: std::fs::metadata(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .len(),
        architecture: content
            .metadata
            .get("general.architecture")
            .and_then(|v| v.to_string().ok())
            .cloned(),
        quantization: None,
        load_error: None,
        linear: Vec::new(),
        other_tensors: 0,
        other_bytes: 0,
        total_bytes: 0,
        n_tensors: content.tensor_infos.len(),
        gguf_types: BTreeMap::new(),
    };
    // In file order (the offsets), as the tensors are stored.
    let mut tensors: Vec<(&String, &gguf_file::TensorInfo)> = content.tensor_infos.iter().collect();
    tensors.sort_by_key(|(_, t)| t.offset);
    for (name, t) in tensors {
        let dtype = t.ggml_dtype;
        let numel = t.shape.elem_count() as u64;
        let bytes = numel / dtype.block_size() as u64 * dtype.type_size() as u64;
        info.total_bytes += bytes;
        let ty = format!("{dtype:?}");
        let class = match name.strip_prefix("blk.").and_then(|r| r.split_once('.')) {
            Some((_, rest)) => rest.strip_suffix(".weight").unwrap_or(rest),
            None => name.strip_suffix(".weight").unwrap_or(name),
        };
        *info
            .gguf_types
            .entry(class.to_string())
            .or_default()
            .entry(ty.clone())
            .or_default() += 1;
        let hf = peft_models::gguf::gguf_to_hf_name(name);
        let linear = hf
            .as_deref()
            .filter(|n| peft_models::quantize::is_quantized_linear(n) || *n == "lm_head.weight");
        match linear {
            Some(hf) => {
                let quantized = !matches!(
                    dtype,
                    candle_core::quantized::GgmlDType::F32
                        | candle_core::quantized::GgmlDType::F16
                        | candle_core::quantized::GgmlDType::BF16
                );
                let format = if quantized {
                    format!("gguf {ty}")
                } else {
                    format!("dense {ty}")
                };
                let module = hf.strip_suffix(".weight").unwrap_or(hf);
                add_linear(&mut info.linear, format, quantized, module, numel, bytes);
            }
            None => {
                info.other_tensors += 1;
                info.other_bytes += bytes;
            }
        }
    }
    info.linear.sort_by_key(|g| !g.quantized);
    Ok(info)
}

/// The file name of `p`.
fn peft_file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl ModelInspection {
    /// The JSON form: `kind` (`"model"`), `path`, `container`, `files`, `file_size_bytes`, `architecture`,
    /// `quantization`, `load_error`, `linear_layers`, `quantized_linear_layers`, `linear` (`format`,
    /// `quantized`, `layers`, `params`, `bytes`, `f32_bytes`, `modules`), `other_tensors`, `other_bytes`,
    /// `total_bytes`, `n_tensors` and, for GGUF, `gguf_types`.
    pub fn to_json(&self) -> Value {
        let linear: Vec<Value> = self
            .linear
            .iter()
            .map(|g| {
                json!({
                    "format": g.format,
                    "quantized": g.quantized,
                    "layers": g.modules.len(),
                    "params": g.params,
                    "bytes": g.bytes,
                    "f32_bytes": g.f32_bytes,
                    "modules": g.modules,
                })
            })
            .collect();
        let mut j = json!({
            "kind": "model",
            "path": self.path.display().to_string(),
            "container": self.container,
            "files": self.files,
            "file_size_bytes": self.file_size_bytes,
            "architecture": self.architecture,
            "quantization": self.quantization,
            "load_error": self.load_error,
            "linear_layers": self.linear_layers(),
            "quantized_linear_layers": self.quantized_layers(),
            "linear": linear,
            "other_tensors": self.other_tensors,
            "other_bytes": self.other_bytes,
            "total_bytes": self.total_bytes,
            "n_tensors": self.n_tensors,
        });
        if !self.gguf_types.is_empty() {
            j["gguf_types"] = json!(self.gguf_types);
        }
        j
    }

    /// The text form.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let mut line = |k: &str, v: String| s.push_str(&format!("{k:<13} {v}\n"));
        line("model", self.path.display().to_string());
        line(
            "format",
            format!(
                "{}, {} file{} ({})",
                self.container,
                self.files.len(),
                if self.files.len() == 1 { "" } else { "s" },
                HumanBytes(self.file_size_bytes)
            ),
        );
        line(
            "architecture",
            self.architecture.clone().unwrap_or_else(|| "-".into()),
        );
        line(
            "quantization",
            self.quantization
                .clone()
                .unwrap_or_else(|| match self.container.as_str() {
                    "gguf" => "ggml block types (below)".into(),
                    _ => "none in config.json".into(),
                }),
        );
        if let Some(e) = &self.load_error {
            line("loadable", format!("no: {e}"));
        }
        let (n, nq) = (self.linear_layers(), self.quantized_layers());
        s.push_str(&format!("\nLinear layers ({n}, {nq} quantized):\n"));
        let width = self
            .linear
            .iter()
            .map(|g| g.format.len())
            .max()
            .unwrap_or(0);
        for g in &self.linear {
            let count = format!(
                "{} layer{}",
                g.modules.len(),
                if g.modules.len() == 1 { "" } else { "s" }
            );
            let mem = if g.quantized {
                format!(
                    "{} quantized vs {} in f32 ({:.2}×)",
                    HumanBytes(g.bytes),
                    HumanBytes(g.f32_bytes),
                    g.bytes as f64 / g.f32_bytes.max(1) as f64
                )
            } else {
                format!(
                    "{} ({} in f32)",
                    HumanBytes(g.bytes),
                    HumanBytes(g.f32_bytes)
                )
            };
            s.push_str(&format!(
                "  {:<width$}  {count:>10}  {:>12} params  {mem}\n",
                g.format,
                HumanCount(g.params).to_string()
            ));
        }
        let lin_bytes: u64 = self.linear.iter().map(|g| g.bytes).sum();
        s.push_str(&format!(
            "other tensors {} ({}): embeddings, norms, biases\n",
            self.other_tensors,
            HumanBytes(self.other_bytes)
        ));
        s.push_str(&format!(
            "weights       {} in {} tensors ({} bytes; Linear {})\n",
            HumanBytes(self.total_bytes),
            self.n_tensors,
            self.total_bytes,
            HumanBytes(lin_bytes)
        ));
        if !self.gguf_types.is_empty() {
            s.push_str("\nGGUF types by tensor class:\n");
            let width = self.gguf_types.keys().map(|k| k.len()).max().unwrap_or(0);
            for (class, types) in &self.gguf_types {
                let t: Vec<String> = types.iter().map(|(t, n)| format!("{t} × {n}")).collect();
                s.push_str(&format!("  {class:<width$}  {}\n", t.join(", ")));
            }
        }
        s
    }
}

/// Runs `peft inspect`, writing text or JSON to `out`: a base model ([`is_model_path`]) is described by
/// [`inspect_model`], an adapter directory by [`inspect`].
pub fn run(args: &InspectArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    if is_model_path(&args.dir) {
        let info = inspect_model(&args.dir)?;
        if args.json {
            let text = serde_json::to_string_pretty(&info.to_json())?;
            writeln!(out, "{text}")?;
        } else {
            write!(out, "{}", info.to_text())?;
        }
        return Ok(());
    }
    let info = inspect(&args.dir)?;
    if args.json {
        let text = serde_json::to_string_pretty(&info.to_json())?;
        writeln!(out, "{text}")?;
    } else {
        write!(out, "{}", info.to_text())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use clap::Parser;

    const CASES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/lora/cases");

    fn adapter(case: &str) -> PathBuf {
        Path::new(CASES).join(case).join("adapter")
    }

    /// Runs `peft inspect <dir> --json` through the command line parser and returns the parsed JSON.
    fn inspect_json(dir: &Path) -> Value {
        let cli =
            Cli::try_parse_from(["peft", "inspect", dir.to_str().unwrap(), "--json"]).unwrap();
        let mut out = Vec::new();
        crate::run_with(cli, &mut out).unwrap();
        serde_json::from_slice(&out).unwrap()
    }

    /// The element count of every tensor in the adapter file, counted from the loaded tensors.
    fn expected_params(dir: &Path) -> u64 {
        let tensors = candle_core::safetensors::load(dir.join(WEIGHTS_NAME), &Device::Cpu).unwrap();
        tensors.values().map(|t| t.elem_count() as u64).sum()
    }

    fn module<'a>(j: &'a Value, name: &str) -> &'a Value {
        j["modules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no {name}"))
    }

    fn names(v: &Value, field: &str) -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x[field].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn inspect_linear_basic() {
        let dir = adapter("linear_basic");
        let j = inspect_json(&dir);
        assert_eq!(j["peft_type"], "LORA");
        assert_eq!(names(&j["modules"], "name"), ["lin0", "lin1"]);
        for m in ["lin0", "lin1"] {
            let m = module(&j, m);
            assert_eq!(m["r"], 4);
            assert_eq!(m["alpha"], 8);
            assert_eq!(m["scaling"], 2);
            assert_eq!(m["flags"], json!([]));
        }
        assert_eq!(
            module(&j, "lin0")["shapes"],
            json!({"lora_A.weight": [4, 16], "lora_B.weight": [24, 4]})
        );
        assert_eq!(
            module(&j, "lin1")["shapes"],
            json!({"lora_A.weight": [4, 24], "lora_B.weight": [12, 4]})
        );
        assert_eq!(j["trainable_params"], expected_params(&dir));
        assert_eq!(j["trainable_params"], 4 * 16 + 24 * 4 + 4 * 24 + 12 * 4);
        assert_eq!(j["dtypes"], json!({"F32": 4}));
        assert_eq!(
            j["file_size_bytes"],
            std::fs::metadata(dir.join(WEIGHTS_NAME)).unwrap().len()
        );
        assert_eq!(j["replaced_tensors"], json!([]));
        assert_eq!(j["unknown_keys"], json!([]));
        assert_eq!(j["sub_adapters"], json!([]));
        assert_eq!(j["validation_error"], Value::Null);
        assert_eq!(j["task_type"], Value::Null);
    }

    #[test]
    fn inspect_dora_linear() {
        let dir = adapter("dora_linear");
        let j = inspect_json(&dir);
        for name in ["lin0", "lin1"] {
            let m = module(&j, name);
            assert_eq!(m["r"], 4);
            assert_eq!(m["alpha"], 8);
            assert_eq!(m["flags"], json!(["dora"]));
            assert!(m["shapes"]["lora_magnitude_vector"].is_array(), "{m}");
        }
        assert_eq!(
            module(&j, "lin0")["shapes"]["lora_magnitude_vector"],
            json!([24])
        );
        assert_eq!(j["trainable_params"], expected_params(&dir));
        assert_eq!(j["replaced_tensors"], json!([]));
        let text = inspect(&dir).unwrap().to_text();
        assert!(text.contains("LORA (DoRA)"), "{text}");
        assert!(text.contains("lin0  r=4 alpha=8 scaling=2"), "{text}");
    }

    #[test]
    fn inspect_modules_to_save() {
        let dir = adapter("modules_to_save");
        let j = inspect_json(&dir);
        assert_eq!(names(&j["modules"], "name"), ["lin0"]);
        assert_eq!(module(&j, "lin0")["r"], 4);
        let mut replaced = names(&j["replaced_tensors"], "name");
        replaced.sort();
        assert_eq!(replaced, ["lin1.bias", "lin1.weight"]);
        assert_eq!(j["trainable_params"], expected_params(&dir));
        let text = inspect(&dir).unwrap().to_text();
        assert!(text.contains("replaced model tensors (2):"), "{text}");
    }

    #[test]
    fn inspect_llama_embed_lm_head() {
        let dir = adapter("llama_embed_lm_head");
        let j = inspect_json(&dir);
        let mut mods = names(&j["modules"], "name");
        mods.sort();
        assert_eq!(mods, ["lm_head", "model.embed_tokens"]);
        let emb = module(&j, "model.embed_tokens");
        assert!(emb["shapes"]["lora_embedding_A"].is_array(), "{emb}");
        assert!(emb["shapes"]["lora_embedding_B"].is_array(), "{emb}");
        let head = module(&j, "lm_head");
        assert!(head["shapes"]["lora_A.weight"].is_array(), "{head}");
        // r and alpha as the config gives them
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join(CONFIG_NAME)).unwrap()).unwrap();
        for m in [emb, head] {
            assert_eq!(m["r"], cfg["r"]);
            assert_eq!(m["alpha"].as_f64(), cfg["lora_alpha"].as_f64());
            assert_eq!(
                m["shapes"].as_object().unwrap().values().next().unwrap()[0],
                cfg["r"]
            );
        }
        // the saved base matrices are model tensors the adapter replaces
        let mut replaced = names(&j["replaced_tensors"], "name");
        replaced.sort();
        assert_eq!(replaced, ["lm_head.weight", "model.embed_tokens.weight"]);
        assert_eq!(j["trainable_params"], expected_params(&dir));
        assert_eq!(j["replaced_tensors"][0]["shape"], json!([64, 32]));
    }

    #[test]
    fn inspect_lists_sub_adapters_and_unknown_keys() {
        let j = inspect_json(&adapter("multi_adapter"));
        assert_eq!(j["sub_adapters"], json!(["other"]));
        let j = inspect_json(&adapter("multi_adapter").join("other"));
        assert_eq!(module(&j, "lin0")["r"], 2);
        assert_eq!(module(&j, "lin0")["flags"], json!(["dora"]));

        // an unknown key, and keys a method does not name: generic grouping
        let tmp = tempfile::tempdir().unwrap();
        let src = adapter("linear_basic");
        std::fs::copy(src.join(WEIGHTS_NAME), tmp.path().join(WEIGHTS_NAME)).unwrap();
        let mut cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(src.join(CONFIG_NAME)).unwrap()).unwrap();
        cfg["my_new_option"] = json!(3);
        std::fs::write(tmp.path().join(CONFIG_NAME), cfg.to_string()).unwrap();
        let j = inspect_json(tmp.path());
        assert_eq!(j["unknown_keys"], json!(["my_new_option"]));
        assert!(
            j["validation_error"]
                .as_str()
                .unwrap()
                .contains("my_new_option"),
            "{}",
            j["validation_error"]
        );

        // a method without per-module parameter names (prompt learning) holding LoRA keys: generic grouping
        let other = json!({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 4});
        std::fs::write(tmp.path().join(CONFIG_NAME), other.to_string()).unwrap();
        let j = inspect_json(tmp.path());
        assert_eq!(j["peft_type"], "PROMPT_TUNING");
        assert_eq!(names(&j["modules"], "name"), ["lin0", "lin1"]);
        assert_eq!(module(&j, "lin0")["r"], Value::Null);
        assert_eq!(
            module(&j, "lin0")["shapes"]["lora_A.weight"],
            json!([4, 16])
        );
        assert!(j["grouping_note"].is_string());
    }

    /// LoHa, LoKr, OFT and BOFT adapters written by PEFT (fixtures/<method>/cases): ranks and alphas from the
    /// config patterns, the factorisation each module holds, OFT block sizes and BOFT factors from the shapes.
    #[test]
    fn inspect_lycoris_and_orthogonal_methods() {
        let fx = |m: &str, case: &str| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join(format!("../../fixtures/{m}/cases/{case}/adapter"))
        };
        let flags = |j: &Value, m: &str| -> Vec<String> {
            serde_json::from_value(module(j, m)["flags"].clone()).unwrap()
        };
        let j = inspect_json(&fx("loha", "loha_conv2d_effective"));
        assert_eq!(j["peft_type"], "LOHA");
        assert_eq!(flags(&j, "conv"), ["cp"]);
        assert!(flags(&j, "pw").is_empty(), "a 1x1 conv stays flat");
        assert_eq!(
            j["trainable_params"],
            expected_params(&fx("loha", "loha_conv2d_effective"))
        );
        let j = inspect_json(&fx("lokr", "lokr_decompose_both"));
        // rank_pattern {"lin1": 4}: r from the config, not from the (full) tensors of lin1
        assert_eq!(
            (
                module(&j, "lin0")["r"].clone(),
                module(&j, "lin1")["r"].clone()
            ),
            (json!(2), json!(4))
        );
        assert_eq!(module(&j, "lin1")["scaling"], 1.5);
        assert_eq!(flags(&j, "lin0"), ["w1_low_rank", "w2_low_rank"]);
        assert!(flags(&j, "lin1").is_empty());
        let j = inspect_json(&fx("oft", "oft_coft"));
        assert_eq!(
            flags(&j, "lin1"),
            [
                "block_size=4",
                "blocks=6",
                "neumann_terms=5",
                "coft eps=0.6"
            ]
        );
        let j = inspect_json(&fx("oft", "oft_exact"));
        assert!(flags(&j, "lin0").contains(&"exact_cayley".to_string()));
        let j = inspect_json(&fx("boft", "boft_f2_linear"));
        assert_eq!(
            flags(&j, "lin1"),
            ["butterfly_factors=2", "blocks=6", "block_size=4"]
        );
        let text = inspect(&fx("boft", "boft_f2_linear")).unwrap().to_text();
        assert!(text.contains("butterfly_factors=2"), "{text}");
    }

    #[test]
    fn generic_rule_groups_other_methods() {
        let m = |k: &str| match place_generic(k) {
            Place::Module { module, param } => format!("module {module} / {param}"),
            Place::Replaced(n) => format!("replaced {n}"),
            Place::Shared => "shared".into(),
        };
        assert_eq!(
            m("base_model.model.h.0.mlp.ia3_l"),
            "module h.0.mlp / ia3_l"
        );
        assert_eq!(m("base_model.model.q.hada_w1_a"), "module q / hada_w1_a");
        assert_eq!(m("base_model.model.q.lokr_w1"), "module q / lokr_w1");
        assert_eq!(
            m("base_model.model.q.oft_R.weight"),
            "module q / oft_R.weight"
        );
        assert_eq!(
            m("base_model.model.q.vera_lambda_b"),
            "module q / vera_lambda_b"
        );
        assert_eq!(m("base_model.model.q.ranknum"), "module q / ranknum");
        assert_eq!(
            m("base_model.model.fc1.base_layer.bias"),
            "replaced fc1.bias"
        );
        assert_eq!(m("base_model.vera_A"), "shared");
        assert_eq!(m("prompt_embeddings"), "shared");
    }

    /// Byte sizes of the tensors of a safetensors file, from its header parsed here (`data_offsets`).
    fn header_bytes(path: &Path) -> BTreeMap<String, u64> {
        let data = std::fs::read(path).unwrap();
        let n = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
        let h: Value = serde_json::from_slice(&data[8..8 + n]).unwrap();
        h.as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .map(|(k, v)| {
                let o = &v["data_offsets"];
                (k.clone(), o[1].as_u64().unwrap() - o[0].as_u64().unwrap())
            })
            .collect()
    }

    fn inspect_any(path: &Path, json: bool) -> String {
        let mut args = vec!["peft", "inspect", path.to_str().unwrap()];
        if json {
            args.push("--json");
        }
        let mut out = Vec::new();
        crate::run_with(Cli::try_parse_from(args).unwrap(), &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// The 7 projections of a tiny-Llama layer with their `[out, in]`, from config.json.
    fn projections(cfg: &Value) -> Vec<(&'static str, u64, u64)> {
        let n = |k: &str| cfg[k].as_u64().unwrap();
        let (h, im, hd) = (n("hidden_size"), n("intermediate_size"), n("head_dim"));
        let (q, kv) = (n("num_attention_heads") * hd, n("num_key_value_heads") * hd);
        vec![
            ("self_attn.q_proj", q, h),
            ("self_attn.k_proj", kv, h),
            ("self_attn.v_proj", kv, h),
            ("self_attn.o_proj", h, q),
            ("mlp.gate_proj", im, h),
            ("mlp.up_proj", im, h),
            ("mlp.down_proj", h, im),
        ]
    }

    /// `peft inspect <quantized HF dir>`: the Linear layers by format, their bytes against f32 and the total,
    /// checked against figures computed here from the safetensors header and config.json.
    #[test]
    fn inspect_quantized_bases() {
        let quant = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/quant/cases");
        for (case, format) in [
            ("bnb4_llama_nf4_dq", "bnb nf4 (blocksize 64, double quant)"),
            ("bnb4_llama_fp4", "bnb fp4 (blocksize 64)"),
            ("bnb8_llama", "bnb int8"),
            (
                "gptq_llama",
                "gptq 4-bit (group size 32, desc_act, gptq_v2)",
            ),
            ("awq_llama", "awq 4-bit gemm (group size 32)"),
        ] {
            let dir = quant.join(case).join("base");
            let file = dir.join("model.safetensors");
            let cfg: Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                    .unwrap();
            let h = header_bytes(&file);
            let layers = cfg["num_hidden_layers"].as_u64().unwrap();
            let (mut params, mut bytes, mut n) = (0u64, 0u64, 0usize);
            for l in 0..layers {
                for (p, out, inp) in projections(&cfg) {
                    let m = format!("model.layers.{l}.{p}.");
                    params += out * inp;
                    n += 1;
                    bytes += h
                        .iter()
                        .filter(|(k, _)| k.starts_with(&m) && !k.ends_with(".bias"))
                        .map(|(_, b)| b)
                        .sum::<u64>();
                }
            }
            let total: u64 = h.values().sum();
            let lm_head = h["lm_head.weight"];
            let j: Value = serde_json::from_str(&inspect_any(&dir, true)).unwrap();
            assert_eq!(j["kind"], "model", "{case}");
            assert_eq!(j["architecture"], "llama", "{case}");
            let q = &j["linear"][0];
            assert_eq!(q["format"], format, "{case}: {j}");
            assert_eq!(q["quantized"], true, "{case}");
            assert_eq!(q["layers"], n, "{case}");
            assert_eq!(q["params"], params, "{case}");
            assert_eq!(q["bytes"], bytes, "{case}");
            assert_eq!(q["f32_bytes"], 4 * params, "{case}");
            let d = &j["linear"][1];
            assert_eq!(
                (&d["format"], &d["layers"], &d["bytes"], &d["modules"]),
                (
                    &json!("dense F32"),
                    &json!(1),
                    &json!(lm_head),
                    &json!(["lm_head"])
                ),
                "{case}"
            );
            assert_eq!(j["linear"].as_array().unwrap().len(), 2, "{case}");
            assert_eq!(
                (&j["linear_layers"], &j["quantized_linear_layers"]),
                (&json!(n + 1), &json!(n))
            );
            assert_eq!(j["total_bytes"], total, "{case}");
            assert_eq!(j["other_bytes"], total - bytes - lm_head, "{case}");
            assert_eq!(
                j["file_size_bytes"],
                std::fs::metadata(&file).unwrap().len(),
                "{case}"
            );
            let load_error = peft_models::quantize::checkpoint_quantization(&cfg)
                .err()
                .map(|e| e.to_string());
            assert_eq!(j["load_error"], json!(load_error), "{case}");
            let text = inspect_any(&dir, false);
            for want in [
                format!("Linear layers ({}, {n} quantized):", n + 1),
                format!(
                    "{} quantized vs {} in f32",
                    HumanBytes(bytes),
                    HumanBytes(4 * params)
                ),
                format!("{n} layers"),
                format!("({total} bytes;"),
                format.to_string(),
            ] {
                assert!(text.contains(&want), "{case}: no {want:?} in\n{text}");
            }
        }
        let j: Value =
            serde_json::from_str(&inspect_any(&quant.join("gptq_llama/base"), true)).unwrap();
        assert_eq!(
            j["quantization"],
            "gptq 4-bit, group size 32, desc_act, sym, format gptq_v2"
        );
    }

    /// `peft inspect <model.gguf>`: the ggml type of each tensor class and the Linear layers by block type,
    /// from the header alone, checked against ggml's block sizes (Q4_0: 18 bytes per 32, Q8_0: 34 per 32).
    #[test]
    fn inspect_gguf_base() {
        use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("tiny.gguf");
        let t = |out: usize, inp: usize, ty: GgmlDType| {
            let x = Tensor::randn(0f32, 1., (out, inp), &Device::Cpu).unwrap();
            QTensor::quantize(&x, ty).unwrap()
        };
        let v = |n: usize| {
            QTensor::quantize(
                &Tensor::ones(n, DType::F32, &Device::Cpu).unwrap(),
                GgmlDType::F32,
            )
            .unwrap()
        };
        let (q4, q8, f16, f32) = (
            GgmlDType::Q4_0,
            GgmlDType::Q8_0,
            GgmlDType::F16,
            GgmlDType::F32,
        );
        let mut tensors = vec![
            ("token_embd.weight".to_string(), t(96, 64, f32)),
            ("output_norm.weight".to_string(), v(64)),
            ("output.weight".to_string(), t(96, 64, q8)),
        ];
        for l in 0..2 {
            for (name, out, inp, ty) in [
                ("attn_q", 64, 64, q4),
                ("attn_k", 32, 64, q4),
                ("attn_v", 32, 64, q8),
                ("attn_output", 64, 64, q4),
                ("ffn_gate", 128, 64, q4),
                ("ffn_up", 128, 64, if l == 0 { q4 } else { q8 }),
                ("ffn_down", 64, 128, f16),
            ] {
                tensors.push((format!("blk.{l}.{name}.weight"), t(out, inp, ty)));
            }
            tensors.push((format!("blk.{l}.attn_norm.weight"), v(64)));
            tensors.push((format!("blk.{l}.ffn_norm.weight"), v(64)));
        }
        let arch = gguf_file::Value::String("llama".into());
        let mut f = std::fs::File::create(&path).unwrap();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut f, &[("general.architecture", &arch)], &ts).unwrap();
        drop(f);

        let q4b = |n: u64| n / 32 * 18;
        let q8b = |n: u64| n / 32 * 34;
        let j: Value = serde_json::from_str(&inspect_any(&path, true)).unwrap();
        assert_eq!(
            (&j["kind"], &j["container"], &j["architecture"]),
            (&json!("model"), &json!("gguf"), &json!("llama"))
        );
        let group = |f: &str| {
            j["linear"]
                .as_array()
                .unwrap()
                .iter()
                .find(|g| g["format"] == f)
                .unwrap_or_else(|| panic!("no {f} in {j}"))
                .clone()
        };
        // Q4_0: q, k, o, gate in both layers and up in layer 0.
        let n4 = 2 * (64 * 64 + 32 * 64 + 64 * 64 + 128 * 64) + 128 * 64;
        let g = group("gguf Q4_0");
        assert_eq!(
            (&g["layers"], &g["params"], &g["bytes"], &g["f32_bytes"]),
            (&json!(9), &json!(n4), &json!(q4b(n4)), &json!(4 * n4))
        );
        // Q8_0: v twice, up in layer 1, output.
        let n8 = 2 * 32 * 64 + 128 * 64 + 96 * 64;
        let g = group("gguf Q8_0");
        assert_eq!(
            (&g["layers"], &g["params"], &g["bytes"]),
            (&json!(4), &json!(n8), &json!(q8b(n8)))
        );
        assert!(
            g["modules"].as_array().unwrap().contains(&json!("lm_head")),
            "{g}"
        );
        let g = group("dense F16");
        assert_eq!(
            (&g["layers"], &g["bytes"], &g["quantized"]),
            (&json!(2), &json!(2 * 2 * 64 * 128), &json!(false))
        );
        assert_eq!(
            (&j["linear_layers"], &j["quantized_linear_layers"]),
            (&json!(15), &json!(13))
        );
        let other = 4 * (96 * 64 + 64 + 4 * 64);
        assert_eq!(j["other_bytes"], other);
        assert_eq!(
            j["total_bytes"],
            q4b(n4) + q8b(n8) + 2 * 2 * 64 * 128 + other
        );
        assert_eq!(j["gguf_types"]["ffn_up"], json!({"Q4_0": 1, "Q8_0": 1}));
        assert_eq!(j["gguf_types"]["attn_q"], json!({"Q4_0": 2}));
        assert_eq!(j["gguf_types"]["token_embd"], json!({"F32": 1}));
        let text = inspect_any(&path, false);
        for want in [
            "Linear layers (15, 13 quantized):".to_string(),
            format!(
                "{} quantized vs {} in f32",
                HumanBytes(q4b(n4)),
                HumanBytes(4 * n4)
            ),
            "ffn_up       Q4_0 × 1, Q8_0 × 1".to_string(),
        ] {
            assert!(text.contains(&want), "no {want:?} in\n{text}");
        }
    }

    /// A base whose quant state is not JSON: an error naming the tensor, not a panic.
    #[test]
    fn inspect_bad_quant_state_names_the_tensor() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/quant/cases/bnb4_llama_nf4/base");
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
        let key = "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4";
        let mut t = SafetensorsFile::open(src.join("model.safetensors"))
            .unwrap()
            .load_all(&Device::Cpu)
            .unwrap();
        t.insert(
            key.into(),
            Tensor::new(&b"{\"quant_type\": "[..], &Device::Cpu).unwrap(),
        );
        let list: Vec<(String, Tensor)> = t.into_iter().collect();
        peft::io::write_safetensors(tmp.path().join("model.safetensors"), &list).unwrap();
        let e = crate::error_report(&inspect_model(tmp.path()).unwrap_err());
        assert!(
            e.contains(key) && e.contains("not a JSON quant state"),
            "{e}"
        );
    }

    #[test]
    fn inspect_errors_name_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let missing = tmp.path().join("nope");
        for dir in [missing.as_path(), tmp.path()] {
            let e = crate::error_report(&inspect(dir).unwrap_err());
            assert!(e.contains(dir.to_str().unwrap()), "{e}");
        }
        let cli = Cli::try_parse_from(["peft", "inspect", "x"]).unwrap();
        assert!(matches!(cli.command, Command::Inspect(ref a) if !a.json));
    }
}
