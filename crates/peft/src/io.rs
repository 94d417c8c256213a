//! Reading and writing adapter directories exactly as PEFT 0.21.2 does.
//!
//! A directory holds `adapter_config.json` and `adapter_model.safetensors` (metadata `{"format": "pt"}`).
//! Adapter `default` sits at the root, any other adapter in `<dir>/<name>/`. Keys keep the
//! `base_model.model.` prefix and drop the adapter name (`base_model.model.fc1.lora_A.weight`). Keys without
//! an adapter parameter are the model's own tensors that the adapter replaces: biases trained with
//! `bias="all"` / `"lora_only"` (`fc1.base_layer.bias`, `norm.bias`), `modules_to_save` copies (`fc3.weight`)
//! and saved embedding matrices (`embed_tokens.base_layer.weight`). [`split_keys`] separates the two.
//!
//! Every file is written to a temporary name in the same directory and renamed, so a failure never leaves
//! a half-written file behind.

use crate::config::PeftConfig;
use crate::{PeftError, Result};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The config file name in an adapter directory.
pub const CONFIG_NAME: &str = "adapter_config.json";
/// The weights file name in an adapter directory.
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before module names in adapter files.
pub const MODEL_PREFIX: &str = "base_model.model.";

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, then a rename.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write_with(path, |f| f.write_all(bytes))
}

/// Writes `path` atomically through `write`, which gets a buffered writer on a temporary file.
pub fn atomic_write_with(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    atomic_write_try(path, |w| write(w).map_err(|e| PeftError::io(path, e)))
}

/// The one atomic writer: `write` fills a buffered temporary file next to `path` (it may fail with a library
/// error), which is synced and renamed to `path`; on any failure the temporary file is removed and `path` is
/// left as it was.
pub fn atomic_write_try(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>,
) -> Result<()> {
    let tmp = tmp_path(path);
    let res = (|| -> Result<()> {
        let f = std::fs::File::create(&tmp).map_err(|e| PeftError::io(path, e))?;
        let mut w = std::io::BufWriter::new(f);
        write(&mut w)?;
        let f = w
            .into_inner()
            .map_err(|e| PeftError::io(path, e.into_error()))?;
        f.sync_all().map_err(|e| PeftError::io(path, e))?;
        std::fs::rename(&tmp, path).map_err(|e| PeftError::io(path, e))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

fn tmp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// A safetensors file, validated on open (a truncated or corrupt file is an error). The header is read
/// through a memory map; tensors are read with positioned reads into their own buffers, so that loading a
/// large checkpoint tensor by tensor (quantizing each as it comes) does not keep the whole file's pages
/// mapped into the process (they would count in its resident memory).
pub struct SafetensorsFile {
    path: PathBuf,
    file: std::fs::File,
    header_len: usize,
    metadata: safetensors::tensor::Metadata,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .finish()
    }
}

impl SafetensorsFile {
    /// Opens and validates `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| PeftError::io(&path, e))?;
        // SAFETY: the file is opened read-only; like every mmap user we assume nobody truncates it meanwhile.
        let mmap = unsafe { memmap2::MmapOptions::new().map(&file) }
            .map_err(|e| PeftError::io(&path, e))?;
        let (n, metadata) =
            safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| PeftError::SafeTensors {
                path: path.clone(),
                message: e.to_string(),
            })?;
        drop(mmap);
        Ok(Self {
            path,
            file,
            header_len: 8 + n,
            metadata,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in the order of their data in the file.
    pub fn names(&self) -> Vec<String> {
        self.metadata.offset_keys()
    }

    /// The `__metadata__` map.
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.metadata().as_ref()
    }

    /// Whether the file holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.metadata.info(name).is_some()
    }

    /// Shape and dtype of `name`.
    pub fn info(&self, name: &str) -> Option<(Vec<usize>, safetensors::Dtype)> {
        self.metadata.info(name).map(|i| (i.shape.clone(), i.dtype))
    }

    /// Loads one tensor. candle has no int8 dtype: an int8 tensor (bitsandbytes 8-bit weights) loads as u8
    /// holding the same bytes.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let info = self
            .metadata
            .info(name)
            .ok_or_else(|| PeftError::MissingKey(name.to_string()))?;
        let (s, e) = info.data_offsets;
        let bytes = self.read_bytes(self.header_len + s, e - s)?;
        let data = bytes.as_slice();
        if info.dtype == safetensors::Dtype::I8 {
            if data.len() != info.shape.iter().product::<usize>() {
                return Err(PeftError::SafeTensors {
                    path: self.path.clone(),
                    message: format!("{name}: {} bytes for shape {:?}", data.len(), info.shape),
                });
            }
            return Ok(Tensor::from_slice(data, info.shape.as_slice(), device)?);
        }
        let view = safetensors::tensor::TensorView::new(info.dtype, info.shape.clone(), data)
            .map_err(|e| PeftError::SafeTensors {
                path: self.path.clone(),
                message: format!("{name}: {e}"),
            })?;
        view.load(device).map_err(|e| PeftError::SafeTensors {
            path: self.path.clone(),
            message: format!("{name}: {e}"),
        })
    }

    /// `len` bytes at `offset` of the file (validated against its length on open).
    fn read_bytes(&self, offset: usize, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileExt;
            self.file
                .read_exact_at(&mut buf, offset as u64)
                .map_err(|e| PeftError::io(&self.path, e))?;
        }
        #[cfg(not(unix))]
        {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = &self.file;
            f.seek(SeekFrom::Start(offset as u64))
                .and_then(|_| f.read_exact(&mut buf))
                .map_err(|e| PeftError::io(&self.path, e))?;
        }
        Ok(buf)
    }

    /// Loads every tensor, in file order.
    pub fn load_all(&self, device: &Device) -> Result<IndexMap<String, Tensor>> {
        self.names()
            .into_iter()
            .map(|n| Ok((n.clone(), self.load(&n, device)?)))
            .collect()
    }
}

/// Reads every tensor of a safetensors file, in file order.
pub fn read_safetensors(
    path: impl AsRef<Path>,
    device: &Device,
) -> Result<IndexMap<String, Tensor>> {
    SafetensorsFile::open(path)?.load_all(device)
}

/// PEFT's safetensors metadata.
pub fn pt_metadata() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

/// Writes tensors to a safetensors file atomically, with `{"format": "pt"}` metadata as PEFT writes.
pub fn write_safetensors(path: impl AsRef<Path>, tensors: &[(String, Tensor)]) -> Result<()> {
    let path = path.as_ref();
    let mut data = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        data.push((k.clone(), t.contiguous()?));
    }
    let bytes = safetensors::serialize(
        data.iter().map(|(k, t)| (k.as_str(), t)),
        Some(pt_metadata()),
    )
    .map_err(|e| PeftError::SafeTensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    atomic_write(path, &bytes)
}

/// Where an adapter named `name` lives under a save directory: `default` at the root, others in sub-dirs.
pub fn adapter_subdir(root: &Path, name: &str) -> PathBuf {
    if name == "default" {
        root.to_path_buf()
    } else {
        root.join(name)
    }
}

/// An adapter directory as read from disk: its config and its tensors keyed as in the file.
#[derive(Debug, Clone)]
pub struct AdapterFile {
    /// `adapter_config.json`.
    pub config: PeftConfig,
    /// `adapter_model.safetensors`, keys as on disk, file order.
    pub tensors: IndexMap<String, Tensor>,
}

/// Reads an adapter directory (config validated: a flag we do not implement is an error).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use peft::io::{load_adapter, save_adapter};
/// use peft::PeftConfig;
///
/// let dir = std::env::temp_dir().join(format!("peft-load-doc-{}", std::process::id()));
/// let config = PeftConfig::from_json_str(r#"{"peft_type": "IA3", "target_modules": ["fc"], "feedforward_modules": []}"#)?;
/// let l = Tensor::ones(6, DType::F32, &Device::Cpu)?;
/// save_adapter(&dir, &config, &[("base_model.model.fc.ia3_l".to_string(), l)])?;
///
/// let file = load_adapter(&dir, &Device::Cpu)?;
/// assert_eq!(file.config.peft_type().as_str(), "IA3");
/// assert_eq!(file.tensors["base_model.model.fc.ia3_l"].dims(), [6]);
/// assert!(matches!(load_adapter(dir.join("missing"), &Device::Cpu), Err(peft::PeftError::Io { .. })));
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), peft::PeftError>(())
/// ```
pub fn load_adapter(dir: impl AsRef<Path>, device: &Device) -> Result<AdapterFile> {
    let dir = dir.as_ref();
    let config = PeftConfig::from_dir(dir)?;
    config.validate()?;
    let weights = dir.join(WEIGHTS_NAME);
    if !weights.exists() {
        if dir.join("adapter_model.bin").exists() {
            return Err(PeftError::Invalid(format!(
                "{}: only adapter_model.safetensors is supported (found a pickled adapter_model.bin)",
                dir.display()
            )));
        }
        return Err(PeftError::io(
            &weights,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no adapter weights"),
        ));
    }
    let tensors = read_safetensors(&weights, device)?;
    Ok(AdapterFile { config, tensors })
}

/// Writes an adapter directory: config (sorted keys, `inference_mode: true`) and weights with PEFT's keys.
pub fn save_adapter(
    dir: impl AsRef<Path>,
    config: &PeftConfig,
    tensors: &[(String, Tensor)],
) -> Result<()> {
    let dir = dir.as_ref();
    std::fs::create_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
    write_safetensors(dir.join(WEIGHTS_NAME), tensors)?;
    config.save(dir)
}

/// An adapter's tensors split into per-module adapter parameters and replaced model tensors.
#[derive(Debug, Clone, Default)]
pub struct SplitKeys {
    /// Adapter parameters by module dotted name, then by parameter key (`lora_A.weight`).
    pub modules: IndexMap<String, IndexMap<String, Tensor>>,
    /// Model tensors the adapter replaces, by their plain name in the base model (`fc1.bias`,
    /// `model.embed_tokens.weight`, `lm_head.weight`): `.base_layer` is removed.
    pub overrides: IndexMap<String, Tensor>,
    /// Tensors outside `base_model.model.` (model-level shared tensors such as `base_model.vera_A`, or
    /// prompt-learning `prompt_embeddings`), by their key.
    pub shared: IndexMap<String, Tensor>,
}

/// Splits adapter file keys. `param_prefixes` are the method's parameter names (`lora_A`, `ia3_l`, …): the
/// first dotted component of a key that is one of them starts the parameter key.
pub fn split_keys(
    tensors: &IndexMap<String, Tensor>,
    param_prefixes: &[&str],
) -> Result<SplitKeys> {
    let mut out = SplitKeys::default();
    for (key, t) in tensors {
        let Some(rest) = key.strip_prefix(MODEL_PREFIX) else {
            out.shared.insert(key.clone(), t.clone());
            continue;
        };
        let parts: Vec<&str> = rest.split('.').collect();
        match parts.iter().position(|p| param_prefixes.contains(p)) {
            Some(0) => {
                return Err(PeftError::Invalid(format!(
                    "adapter key {key:?} names no module"
                )));
            }
            Some(i) => {
                let module = parts[..i].join(".");
                let param = parts[i..].join(".");
                let entry = out.modules.entry(module).or_default();
                if entry.insert(param, t.clone()).is_some() {
                    return Err(PeftError::Invalid(format!("duplicate adapter key {key:?}")));
                }
            }
            None => {
                let plain: Vec<&str> = parts.into_iter().filter(|p| *p != "base_layer").collect();
                out.overrides.insert(plain.join("."), t.clone());
            }
        }
    }
    Ok(out)
}

/// The key PEFT writes for an adapter parameter of a module.
pub fn peft_key(module: &str, param: &str) -> String {
    format!("{MODEL_PREFIX}{module}.{param}")
}

/// What PEFT saves for `adapter` from a set of adapter slots: each slot's adapter parameters under
/// `base_model.model.<module>.<key>` in the dtype the adapter was created or loaded in, `modules_to_save`
/// copies under the plain module name, with `bias = "lora_only"` / `"all"` the targeted layers' biases as
/// `<module>.base_layer.bias`, and for the modules `save_embedding_base` selects (PEFT's
/// `save_embedding_layers`) the base matrix as `<module>.base_layer.weight`.
///
/// For AdaLoRA, a `rank_pattern` in `config` truncates tensors still at `init_r` to the kept rows.
///
/// Biases of modules that are not adapter slots (`bias = "all"` saves every bias of the model) are the
/// model's business: a model adds them.
pub fn adapter_state_dict<'a>(
    slots: impl IntoIterator<Item = &'a crate::AdapterSlot>,
    adapter: &str,
    config: &PeftConfig,
    save_embedding_base: &dyn Fn(&str) -> bool,
) -> Result<Vec<(String, Tensor)>> {
    let bias_mode = config.method().bias();
    let mut out = Vec::new();
    for slot in slots {
        let Some(a) = slot.adapter(adapter) else {
            continue;
        };
        let m = slot.name();
        let dtype = a.saved_dtype();
        if a.peft_type() == crate::layer::modules_to_save::MODULES_TO_SAVE {
            for (k, t) in a.tensors() {
                out.push((format!("{MODEL_PREFIX}{m}.{k}"), t.to_dtype(dtype)?));
            }
            continue;
        }
        for (k, t) in config.method().saved_tensors(m, a.tensors())? {
            out.push((peft_key(m, &k), t.to_dtype(dtype)?));
        }
        if let (true, Some(b)) = (
            bias_mode != crate::config::LoraBias::None,
            slot.base().bias(),
        ) {
            out.push((peft_key(m, "base_layer.bias"), b.clone()));
        }
        if save_embedding_base(m) {
            out.push((peft_key(m, "base_layer.weight"), slot.base().weight()?));
        }
    }
    Ok(out)
}

/// One adapter to save: its name, config and state dict (see [`adapter_state_dict`]).
pub type AdapterToSave<'a> = (&'a str, &'a PeftConfig, Vec<(String, Tensor)>);

/// Writes several adapters the way PEFT's `save_pretrained` lays them out: `default` at `root`, every other
/// adapter in `root/<name>/`.
pub fn save_adapters(root: impl AsRef<Path>, adapters: &[AdapterToSave<'_>]) -> Result<()> {
    for (name, config, tensors) in adapters {
        save_adapter(adapter_subdir(root.as_ref(), name), config, tensors)?;
    }
    Ok(())
}

/// Converts a tensor to the dtype it is saved in (adapters compute in f32 but keep their file dtype).
pub fn to_saved_dtype(t: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(t.to_dtype(dtype)?)
}

/// How the base model stores a module's weight when its own tensor is absent (tied embeddings: the output
/// layer reads the input embedding).
pub type Aliases = HashMap<String, String>;

/// The weight files of a base model: one file, a directory with `model.safetensors`, or a sharded directory
/// with `model.safetensors.index.json`.
#[derive(Debug)]
pub struct BaseModel {
    /// The directory (None for a single file).
    pub dir: Option<PathBuf>,
    /// The shards, in index order, with their file names.
    pub shards: Vec<(String, SafetensorsFile)>,
    /// The parsed index, if sharded.
    pub index: Option<serde_json::Value>,
    /// `config.json`, if present.
    pub config: Option<serde_json::Value>,
}

impl BaseModel {
    /// Opens a base model file or directory.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_file() {
            return Ok(Self {
                dir: None,
                shards: vec![(file_name(path), SafetensorsFile::open(path)?)],
                index: None,
                config: None,
            });
        }
        if !path.is_dir() {
            return Err(PeftError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
        let config = read_json_opt(&path.join("config.json"))?;
        let index_path = path.join("model.safetensors.index.json");
        if index_path.exists() {
            let index = read_json_opt(&index_path)?.unwrap_or_default();
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| PeftError::Json {
                    context: index_path.display().to_string(),
                    message: "no weight_map".into(),
                })?;
            let mut files: Vec<String> = Vec::new();
            for v in map.values() {
                let f = v.as_str().ok_or_else(|| PeftError::Json {
                    context: index_path.display().to_string(),
                    message: "weight_map values must be file names".into(),
                })?;
                if !files.iter().any(|x| x == f) {
                    files.push(f.to_string());
                }
            }
            files.sort();
            let shards = files
                .into_iter()
                .map(|f| Ok((f.clone(), SafetensorsFile::open(path.join(&f))?)))
                .collect::<Result<_>>()?;
            return Ok(Self {
                dir: Some(path.to_path_buf()),
                shards,
                index: Some(index),
                config,
            });
        }
        let single = path.join("model.safetensors");
        if !single.exists() {
            return Err(PeftError::Invalid(format!(
                "{}: no model.safetensors or model.safetensors.index.json in this directory",
                path.display()
            )));
        }
        Ok(Self {
            dir: Some(path.to_path_buf()),
            shards: vec![("model.safetensors".into(), SafetensorsFile::open(&single)?)],
            index: None,
            config,
        })
    }

    /// The shape of a tensor in any shard; for a bitsandbytes 4-bit weight, the unpacked shape its quant state
    /// records.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.shards.iter().find_map(|(_, f)| {
            let (shape, _) = f.info(name)?;
            for t in ["nf4", "fp4"] {
                let key = format!("{name}.quant_state.bitsandbytes__{t}");
                if f.contains(&key) {
                    let bytes = f.load(&key, &Device::Cpu).ok()?.to_vec1::<u8>().ok()?;
                    return crate::quant::bnb4::quant_state_shape(&bytes);
                }
            }
            Some(shape)
        })
    }

    /// Whether any weight is stored quantized (bitsandbytes 4-bit or 8-bit).
    pub fn is_quantized(&self) -> bool {
        self.shards.iter().any(|(_, f)| {
            f.names()
                .iter()
                .any(|n| n.contains(".quant_state.bitsandbytes__") || n.ends_with(".SCB"))
        })
    }

    /// Tied-embedding aliases: when the output layer's weight is absent and the config ties it (or says
    /// nothing), `lm_head.weight` reads `model.embed_tokens.weight` (any `*embed_tokens.weight` / `wte`).
    pub fn aliases(&self) -> Aliases {
        let mut a = Aliases::new();
        let tied = self
            .config
            .as_ref()
            .and_then(|c| c.get("tie_word_embeddings"))
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        if tied && self.shape("lm_head.weight").is_none() {
            for cand in [
                "model.embed_tokens.weight",
                "transformer.wte.weight",
                "embed_tokens.weight",
            ] {
                if self.shape(cand).is_some() {
                    a.insert("lm_head.weight".into(), cand.into());
                    break;
                }
            }
        }
        a
    }
}

/// The file name of `p` as a string (empty for none).
pub(crate) fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn read_json_opt(p: &Path) -> Result<Option<serde_json::Value>> {
    if !p.exists() {
        return Ok(None);
    }
    let s = std::fs::read_to_string(p).map_err(|e| PeftError::io(p, e))?;
    serde_json::from_str(&s)
        .map(Some)
        .map_err(|e| PeftError::Json {
            context: p.display().to_string(),
            message: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keys_separates_params_overrides_and_shared() {
        let d = Device::Cpu;
        let t = Tensor::zeros(1, DType::F32, &d).unwrap();
        let mut m = IndexMap::new();
        for k in [
            "base_model.model.fc1.lora_A.weight",
            "base_model.model.fc1.lora_B.weight",
            "base_model.model.fc1.base_layer.bias",
            "base_model.model.norm.bias",
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "base_model.model.model.embed_tokens.base_layer.weight",
            "base_model.vera_A",
        ] {
            m.insert(k.to_string(), t.clone());
        }
        let s = split_keys(
            &m,
            &["lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"],
        )
        .unwrap();
        assert_eq!(
            s.modules.keys().collect::<Vec<_>>(),
            ["fc1", "model.embed_tokens"]
        );
        assert_eq!(
            s.modules["fc1"].keys().collect::<Vec<_>>(),
            ["lora_A.weight", "lora_B.weight"]
        );
        assert_eq!(
            s.overrides.keys().collect::<Vec<_>>(),
            ["fc1.bias", "norm.bias", "model.embed_tokens.weight"]
        );
        assert_eq!(s.shared.keys().collect::<Vec<_>>(), ["base_model.vera_A"]);
    }

    #[test]
    fn truncated_and_garbage_safetensors_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let t = Tensor::arange(0f32, 64f32, &Device::Cpu).unwrap();
        write_safetensors(&p, &[("x".into(), t)]).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        for cut in [3, 20, bytes.len() - 10] {
            let q = dir.path().join(format!("cut{cut}.safetensors"));
            std::fs::write(&q, &bytes[..cut]).unwrap();
            let e = read_safetensors(&q, &Device::Cpu).unwrap_err();
            assert!(matches!(e, PeftError::SafeTensors { .. }), "{e}");
        }
        let q = dir.path().join("garbage.safetensors");
        std::fs::write(&q, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot json").unwrap();
        assert!(matches!(
            read_safetensors(&q, &Device::Cpu).unwrap_err(),
            PeftError::SafeTensors { .. }
        ));
        // the atomic writer leaves no temporary file behind
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(names.iter().all(|n| !n.to_string_lossy().contains(".tmp")));
        let f = SafetensorsFile::open(&p).unwrap();
        assert_eq!(f.metadata().unwrap()["format"], "pt");
    }
}
