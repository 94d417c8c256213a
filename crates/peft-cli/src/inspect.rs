//! `peft inspect`: describes an adapter directory without loading its tensors.
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
    /// The adapter directory (holding `adapter_config.json` and `adapter_model.safetensors`).
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

/// Reads an adapter directory's config and safetensors header (no tensor data).
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
        validation_error: config.validate().err().map(|e| e.to_string()),
        grouping_note,
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

/// Runs `peft inspect`, writing text or JSON to `out`.
pub fn run(args: &InspectArgs, out: &mut dyn Write) -> anyhow::Result<()> {
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
