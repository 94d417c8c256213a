//! Merging adapters into base weights by tensor name, without a model.
//!
//! An adapter file names modules (`base_model.model.<module>.lora_A.weight`); the base names tensors
//! (`<module>.weight`, `<module>.bias`). [`Merger`] pairs them, so merging works for any architecture:
//! it builds each module's adapter through the method registry on a base layer whose kind it infers from
//! the shapes, and applies [`crate::Adapter::merge`] (or, for a weighted merge of an additive method, the
//! delta times the weight). Adapters apply in the order given, like PEFT's `merge(adapter_names)`; model
//! tensors that an adapter replaces (`bias="all"` biases, `modules_to_save` copies, saved embeddings) are
//! applied first, in load order, as PEFT's loading does. Everything computes in f32 and rounds once.
//!
//! [`merge_safetensors`] streams one file tensor by tensor (peak memory about one module), and
//! [`merge_model`] handles a model directory, sharded or not, writing atomically.

use crate::config::PeftConfig;
use crate::io::{
    Aliases, BaseModel, SafetensorsFile, SplitKeys, atomic_write, atomic_write_try, file_name,
    load_adapter, split_keys,
};
use crate::layer::registry;
use crate::layer::{BaseLayer, MergeInput};
use crate::{PeftError, Result};
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One adapter to merge: its directory's config and tensors, and an optional weight.
#[derive(Debug, Clone)]
pub struct MergeAdapter {
    /// Where it was read from (for messages).
    pub source: String,
    /// Its config.
    pub config: PeftConfig,
    /// Its tensors, split by module.
    pub split: SplitKeys,
    /// `DIR@WEIGHT`: scales the delta of an additive method.
    pub weight: Option<f64>,
}

impl MergeAdapter {
    /// Reads an adapter directory.
    pub fn load(dir: impl AsRef<Path>, weight: Option<f64>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let file = load_adapter(dir, device)?;
        Self::from_parts(
            dir.display().to_string(),
            file.config,
            &file.tensors,
            weight,
        )
    }

    /// An adapter from a config and its tensors keyed as in a PEFT file.
    pub fn from_parts(
        source: String,
        config: PeftConfig,
        tensors: &IndexMap<String, Tensor>,
        weight: Option<f64>,
    ) -> Result<Self> {
        if config.peft_type().is_prompt_learning() {
            return Err(PeftError::Invalid(format!(
                "{source}: {} is a prompt-learning adapter: it adds virtual tokens to the input and has no \
                 weights to merge into the base model",
                config.peft_type().as_str()
            )));
        }
        let prefixes = registry::param_prefixes(&config)?;
        let split = split_keys(tensors, prefixes)?;
        if let Some(w) = weight.filter(|_| !registry::is_additive(&config)) {
            return Err(PeftError::Invalid(format!(
                "{source}: a merge weight ({w}) is only allowed for additive methods (plain LoRA); this \
                 adapter is {}",
                config.method().merge_name()
            )));
        }
        // Model-level tensors (VeRA's `base_model.vera_A` / `vera_B`) are checked by `Merger::new`, which knows
        // the base shapes they depend on; other methods have none.
        if !split.shared.is_empty() && !config.method().shares_tensors() {
            let keys: Vec<String> = split.shared.keys().cloned().collect();
            return Err(PeftError::UnexpectedKeys(keys));
        }
        Ok(Self {
            source,
            config,
            split,
            weight,
        })
    }
}

/// Pairs adapters with base tensors and computes merged tensors.
#[derive(Debug)]
pub struct Merger {
    adapters: Vec<MergeAdapter>,
    aliases: Aliases,
    /// Base tensor name → the modules whose merge writes it, in merge order.
    writers: HashMap<String, Vec<String>>,
    /// Base tensor names replaced by adapter tensors (last loaded wins).
    overrides: HashMap<String, (usize, String)>,
    /// Warnings of adapters whose merged weights differ from their unmerged forward, `"<module>: <text>"`.
    warnings: Vec<String>,
}

/// A function that returns a base tensor's shape, `None` if the base lacks it.
pub trait BaseShapes {
    /// The shape of `name`, if the base has it.
    fn shape(&self, name: &str) -> Option<Vec<usize>>;
}

impl<F: Fn(&str) -> Option<Vec<usize>>> BaseShapes for F {
    fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self(name)
    }
}

impl Merger {
    /// Checks every adapter against the base (every targeted module exists, shapes fit, replaced tensors
    /// exist) before anything is written.
    pub fn new(
        adapters: Vec<MergeAdapter>,
        base: &dyn BaseShapes,
        aliases: Aliases,
    ) -> Result<Self> {
        let mut writers: HashMap<String, Vec<String>> = HashMap::new();
        let mut overrides = HashMap::new();
        let alias_map = aliases.clone();
        let resolve = |name: &str| -> Option<String> {
            if base.shape(name).is_some() {
                Some(name.to_string())
            } else {
                alias_map
                    .get(name)
                    .filter(|a| base.shape(a).is_some())
                    .cloned()
            }
        };
        for (i, ad) in adapters.iter().enumerate() {
            for (name, t) in &ad.split.overrides {
                let target = resolve(name).ok_or_else(|| {
                    PeftError::Invalid(format!(
                        "{}: the adapter replaces tensor `{name}`, which the base model does not have",
                        ad.source
                    ))
                })?;
                let shape = base.shape(&target).unwrap_or_default();
                if t.dims() != shape.as_slice() {
                    return Err(PeftError::ShapeMismatch {
                        name: name.clone(),
                        expected: shape,
                        got: t.dims().to_vec(),
                    });
                }
                overrides.insert(target, (i, name.clone()));
            }
        }
        // Each adapter's model-level shared tensors (VeRA's projections: read, or regenerated over the largest
        // targeted dimensions), kept in its `split.shared`.
        let mut adapters = adapters;
        for ad in adapters.iter_mut() {
            let mut dims = Vec::new();
            for (m, params) in &ad.split.modules {
                let Some(target) = resolve(&format!("{m}.weight")) else {
                    continue; // reported below as a missing module
                };
                let wshape = base.shape(&target).unwrap_or_default();
                let kind = ad.config.method().infer_kind(m, params, &wshape)?;
                let w =
                    Tensor::zeros(1, DType::F32, &Device::Cpu)?.broadcast_as(wshape.as_slice())?;
                let layer = BaseLayer::new(kind, w, None)?;
                dims.push((layer.in_features(), layer.out_features()));
            }
            ad.split.shared =
                registry::shared_tensors(&ad.config, Some(&ad.split.shared), &dims, &Device::Cpu)
                    .map_err(|e| PeftError::Invalid(format!("{}: {e}", ad.source)))?;
        }
        let me = Self {
            adapters,
            aliases,
            writers: HashMap::new(),
            overrides,
            warnings: Vec::new(),
        };
        let mut warnings = Vec::new();
        // Module order follows the first adapter that names each module, like PEFT's walk over modules.
        let mut modules: Vec<String> = Vec::new();
        for ad in &me.adapters {
            for m in ad.split.modules.keys() {
                if !modules.contains(m) {
                    modules.push(m.clone());
                }
            }
        }
        for m in &modules {
            let wname = format!("{m}.weight");
            let target =
                resolve(&wname).ok_or_else(|| PeftError::MissingModule { module: m.clone() })?;
            let wshape = base.shape(&target).unwrap_or_default();
            let bias_shape = base.shape(&format!("{m}.bias"));
            // Build each adapter once on a zero-cost placeholder base to check shapes now.
            for ad in me
                .adapters
                .iter()
                .filter(|a| a.split.modules.contains_key(m))
            {
                let params = &ad.split.modules[m];
                let kind = ad.config.method().infer_kind(m, params, &wshape)?;
                let w =
                    Tensor::zeros(1, DType::F32, &Device::Cpu)?.broadcast_as(wshape.as_slice())?;
                let b = bias_shape
                    .as_ref()
                    .map(|s| Tensor::zeros(1, DType::F32, &Device::Cpu)?.broadcast_as(s.as_slice()))
                    .transpose()?;
                let layer = BaseLayer::new(kind, w, b)?;
                let adapter = registry::build_adapter_with_shared(
                    &ad.config,
                    m,
                    &layer,
                    params,
                    &ad.split.shared,
                )
                .map_err(|e| PeftError::Invalid(format!("{}: module `{m}`: {e}", ad.source)))?;
                if let Some(w) = adapter.merge_warning() {
                    warnings.push(format!("{m}: {w}"));
                }
            }
            writers.entry(target).or_default().push(m.clone());
            if bias_shape.is_some() {
                writers
                    .entry(format!("{m}.bias"))
                    .or_default()
                    .push(m.clone());
            }
        }
        // A tied matrix is written by its owner (the input embedding) and by the modules that read it through an
        // alias (the output layer). PEFT merges module by module in `named_modules()` order, where the
        // embedding comes first; adapter files list keys alphabetically (`lm_head` before `model.…`), so
        // put the owner first. The order matters for DoRA, whose norm is taken from the weight as it is then.
        for (target, mods) in writers.iter_mut() {
            mods.sort_by_key(|m| format!("{m}.weight") != *target);
        }
        Ok(Self {
            writers,
            warnings,
            ..me
        })
    }

    /// Warnings of adapters whose merged weights differ from their unmerged forward (OFT on a Conv2d with a
    /// kernel larger than 1×1), `"<module>: <text>"`, one per module and adapter.
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Whether the merge changes base tensor `name`.
    pub fn touches(&self, name: &str) -> bool {
        self.writers.contains_key(name) || self.overrides.contains_key(name)
    }

    /// The modules the adapters target, in merge order.
    pub fn modules(&self) -> Vec<String> {
        let mut v: Vec<String> = Vec::new();
        for ad in &self.adapters {
            for m in ad.split.modules.keys() {
                if !v.contains(m) {
                    v.push(m.clone());
                }
            }
        }
        v
    }

    /// The base tensor after the adapters' replacements, f32.
    fn base_tensor(&self, name: &str, load: &dyn Fn(&str) -> Result<Tensor>) -> Result<Tensor> {
        let t = match self.overrides.get(name) {
            Some((i, key)) => self.adapters[*i].split.overrides[key].clone(),
            None => load(name)?,
        };
        Ok(t.to_dtype(DType::F32)?)
    }

    /// Computes the merged value of base tensor `name` (f32), or `None` if the merge leaves it untouched.
    /// `load` reads a base tensor by name.
    pub fn merged_tensor(
        &self,
        name: &str,
        load: &dyn Fn(&str) -> Result<Tensor>,
    ) -> Result<Option<Tensor>> {
        let Some(modules) = self.writers.get(name) else {
            return match self.overrides.contains_key(name) {
                true => Ok(Some(self.base_tensor(name, load)?)),
                false => Ok(None),
            };
        };
        let mut out: Option<Tensor> = None;
        for m in modules {
            let is_bias = *name == format!("{m}.bias");
            let wname_own = format!("{m}.weight");
            let wname = if self.writers.contains_key(&wname_own)
                || self.overrides.contains_key(&wname_own)
            {
                wname_own.clone()
            } else {
                self.aliases
                    .get(&wname_own)
                    .cloned()
                    .unwrap_or(wname_own.clone())
            };
            let w0 = match (&out, is_bias) {
                (Some(t), false) => t.clone(),
                _ => self.base_tensor(&wname, load)?,
            };
            let bname = format!("{m}.bias");
            let b0 = match (&out, is_bias) {
                (Some(t), true) => Some(t.clone()),
                _ if self.writers.contains_key(&bname) => Some(self.base_tensor(&bname, load)?),
                _ => None,
            };
            let (w, b) = self.merge_module(m, w0, b0)?;
            out = Some(if is_bias {
                b.ok_or_else(|| PeftError::MissingKey(bname))?
            } else {
                w
            });
        }
        Ok(out)
    }

    /// Merges every adapter that targets `module` into `(W, b)` (f32), in order.
    pub fn merge_module(
        &self,
        module: &str,
        weight: Tensor,
        bias: Option<Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let unmerged = weight.clone();
        let (mut w, mut b) = (weight, bias);
        for ad in self
            .adapters
            .iter()
            .filter(|a| a.split.modules.contains_key(module))
        {
            let params = &ad.split.modules[module];
            let kind = ad
                .config
                .method()
                .infer_kind(module, params, unmerged.dims())?;
            let layer = BaseLayer::new(kind, unmerged.clone(), b.clone())?;
            let adapter = registry::build_adapter_with_shared(
                &ad.config,
                module,
                &layer,
                params,
                &ad.split.shared,
            )?;
            match ad.weight {
                Some(scale) => {
                    let (dw, db) = adapter.delta_weight(&kind)?.ok_or_else(|| {
                        PeftError::Invalid(format!(
                            "{}: a weighted merge needs an additive method",
                            ad.source
                        ))
                    })?;
                    w = (w + (dw * scale)?)?;
                    if let (Some(bb), Some(db)) = (&b, db) {
                        b = Some((bb + (db * scale)?)?);
                    }
                }
                None => {
                    let m = adapter.merge(MergeInput {
                        kind: &kind,
                        weight: &w,
                        bias: b.as_ref(),
                        unmerged_weight: &unmerged,
                    })?;
                    w = m.weight;
                    b = m.bias;
                }
            }
        }
        Ok((w, b))
    }
}

/// The safetensors dtype merged weights are written in: one of the float dtypes a merge rounds to (candle's
/// own conversion).
fn st_dtype(d: DType) -> Result<safetensors::Dtype> {
    match d {
        DType::F32 | DType::F16 | DType::BF16 | DType::F64 => Ok(d.into()),
        other => Err(PeftError::Invalid(format!(
            "cannot write merged weights as {other:?}"
        ))),
    }
}

/// The candle dtype of a stored tensor that a merge computes with or converts: the float dtypes f32, f16,
/// bf16 and f64 (candle's own conversion); `None` for others, which are copied as they are.
fn candle_dtype(d: safetensors::Dtype) -> Option<DType> {
    DType::try_from(d)
        .ok()
        .filter(|d| matches!(d, DType::F32 | DType::F16 | DType::BF16 | DType::F64))
}

/// Whether `name` is a state tensor of a bitsandbytes weight (`…weight.absmax`, …, `….SCB`,
/// `….weight_format`).
fn is_bnb_state(name: &str) -> bool {
    crate::quant::bnb4::STATE_SUFFIXES
        .iter()
        .any(|s| name.ends_with(&format!(".weight.{s}")))
        || name.ends_with(".SCB")
        || name.ends_with(".weight_format")
}

/// The bitsandbytes weights stored in a shard ([`crate::quant::stored_keys`]): weight name → the names of
/// its state tensors, which a merge drops from the output (the merged model is dense).
fn bnb_weights(f: &SafetensorsFile) -> HashMap<String, Vec<String>> {
    f.names()
        .iter()
        .filter_map(|n| {
            let module = n.strip_suffix(".weight")?;
            let keys = crate::quant::stored_keys(module, |k| f.contains(k))?;
            Some((n.clone(), keys[1..].to_vec()))
        })
        .collect()
}

/// The bitsandbytes weight `name` of `f` (4-bit or 8-bit), read with its state tensors.
fn load_bnb(
    f: &SafetensorsFile,
    name: &str,
    keys: &[String],
) -> Result<crate::quant::QuantizedWeight> {
    let dev = Device::Cpu;
    let mut tensors = indexmap::IndexMap::new();
    tensors.insert(name.to_string(), f.load(name, &dev)?);
    for k in keys {
        tensors.insert(k.clone(), f.load(k, &dev)?);
    }
    let module = name.strip_suffix(".weight").unwrap_or(name);
    crate::quant::from_state_dict(module, &tensors)
        .and_then(|q| {
            q.map(|(q, _)| q)
                .ok_or_else(|| PeftError::MissingKey(format!("{name} (quant state)")))
        })
        .map_err(|e| PeftError::Invalid(format!("{}: {e}", f.path().display())))
}

/// Progress of a merge: bytes written so far, total bytes, and the tensor just written.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64, &str);

/// Streams `base` to `output` with the merge applied, tensor by tensor, in the base's order. Untouched
/// tensors are copied byte for byte (or converted when `dtype` is given); merged ones are computed in f32
/// and rounded once. Returns the number of bytes written for tensor data.
pub fn merge_safetensors(
    base: &SafetensorsFile,
    merger: &Merger,
    output: &Path,
    dtype: Option<DType>,
    progress: Progress<'_>,
) -> Result<u64> {
    let names = base.names();
    // bitsandbytes weights are written dequantized (their original dtype, or `dtype`), without their state
    // tensors.
    let quantized = bnb_weights(base);
    let state_keys: HashSet<&String> = quantized.values().flatten().collect();
    let mut dequantized: HashMap<String, crate::quant::QuantizedWeight> = HashMap::new();
    for (w, keys) in &quantized {
        dequantized.insert(w.clone(), load_bnb(base, w, keys)?);
    }
    // Plan the header: every output tensor keeps its name and shape; the dtype changes with `dtype` for floats.
    let mut header: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut plan = Vec::with_capacity(names.len());
    let mut offset = 0usize;
    for n in names.iter().filter(|n| !state_keys.contains(n)) {
        let (shape, sdt) = match dequantized.get(n) {
            Some(q) => (q.shape().to_vec(), st_dtype(q.dtype())?),
            None => base
                .info(n)
                .ok_or_else(|| PeftError::MissingKey(n.clone()))?,
        };
        let out_dt = match (dtype, candle_dtype(sdt)) {
            (Some(d), Some(_)) => st_dtype(d)?,
            _ => sdt,
        };
        if merger.touches(n) && candle_dtype(out_dt).is_none() {
            return Err(PeftError::Invalid(format!(
                "cannot merge into `{n}` of dtype {sdt:?}"
            )));
        }
        let nbytes = shape.iter().product::<usize>() * out_dt.bitsize() / 8;
        header.insert(
            n.clone(),
            serde_json::json!({"dtype": out_dt, "shape": shape, "data_offsets": [offset, offset + nbytes]}),
        );
        plan.push((n.clone(), sdt, out_dt, nbytes));
        offset += nbytes;
    }
    let meta: HashMap<String, String> = base
        .metadata()
        .cloned()
        .unwrap_or_else(crate::io::pt_metadata);
    let mut hdr = serde_json::Map::new();
    hdr.insert(
        "__metadata__".into(),
        serde_json::to_value(&meta).map_err(|e| PeftError::Invalid(e.to_string()))?,
    );
    for (k, v) in header {
        hdr.insert(k, v);
    }
    let mut hbytes = serde_json::to_vec(&serde_json::Value::Object(hdr))
        .map_err(|e| PeftError::Invalid(e.to_string()))?;
    while hbytes.len() % 8 != 0 {
        hbytes.push(b' ');
    }
    let total = offset as u64;
    let dev = Device::Cpu;
    let load = |n: &str| match dequantized.get(n) {
        Some(q) => q.dequantize(&dev),
        None => base.load(n, &dev),
    };
    atomic_write_try(output, |w| {
        let io = |e| PeftError::io(output, e);
        w.write_all(&(hbytes.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&hbytes).map_err(io)?;
        let mut done = 0u64;
        for (n, sdt, out_dt, nbytes) in &plan {
            let merged = merger.merged_tensor(n, &load)?;
            let bytes: Vec<u8> = match merged {
                Some(t) => tensor_bytes(&t.to_dtype(candle_dtype(*out_dt).unwrap_or(DType::F32))?)?,
                None if sdt == out_dt => tensor_bytes(&load(n)?)?,
                None => {
                    tensor_bytes(&load(n)?.to_dtype(candle_dtype(*out_dt).unwrap_or(DType::F32))?)?
                }
            };
            if bytes.len() != *nbytes {
                return Err(PeftError::Invalid(format!(
                    "internal: {n} has {} bytes, expected {nbytes}",
                    bytes.len()
                )));
            }
            w.write_all(&bytes).map_err(io)?;
            done += *nbytes as u64;
            progress(done, total, n);
        }
        Ok(())
    })?;
    Ok(total)
}

fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    use safetensors::View;
    Ok(t.contiguous()?.data().into_owned())
}

/// What [`merge_model`] did.
#[derive(Debug, Clone, Default)]
pub struct MergeReport {
    /// Files written.
    pub files: Vec<PathBuf>,
    /// Modules merged.
    pub modules: Vec<String>,
    /// Tensor data bytes written.
    pub bytes: u64,
    /// Warnings of adapters whose merged weights differ from their unmerged forward ([`Merger::warnings`]).
    pub warnings: Vec<String>,
}

/// Merges adapters into a base model file or directory and writes the result.
///
/// - base file → `output` is a file (or, if it is an existing directory, `output/model.safetensors`);
/// - base directory → `output` is a directory with the same shard layout and index, plus the base's
///   non-weight files (config, tokenizer, generation config). The directory is assembled under a temporary
///   name and renamed into place, so a failure leaves nothing behind.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use peft::io::{read_safetensors, save_adapter, write_safetensors};
/// use peft::merge::{MergeAdapter, merge_model};
/// use peft::PeftConfig;
///
/// let dev = Device::Cpu;
/// let tmp = std::env::temp_dir().join(format!("peft-merge-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&tmp)?;
/// let w = Tensor::zeros((3, 2), DType::F32, &dev)?;
/// write_safetensors(tmp.join("base.safetensors"), &[("fc.weight".to_string(), w)])?;
/// // A LoRA adapter with r = 1, alpha = 2 (scale 2): ΔW = 2·B·A.
/// let config = PeftConfig::from_json_str(r#"{"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["fc"]}"#)?;
/// let a = Tensor::new(&[[1f32, 2.]], &dev)?;
/// let b = Tensor::new(&[[1f32], [0.], [-1.]], &dev)?;
/// save_adapter(tmp.join("adapter"), &config, &[
///     ("base_model.model.fc.lora_A.weight".to_string(), a),
///     ("base_model.model.fc.lora_B.weight".to_string(), b),
/// ])?;
///
/// let adapter = MergeAdapter::load(tmp.join("adapter"), None, &dev)?;
/// let out = tmp.join("merged.safetensors");
/// merge_model(&tmp.join("base.safetensors"), vec![adapter], &out, None, &mut |_, _, _| {})?;
/// let merged = read_safetensors(&out, &dev)?;
/// assert_eq!(merged["fc.weight"].to_vec2::<f32>()?, [[2., 4.], [0., 0.], [-2., -4.]]);
/// # std::fs::remove_dir_all(&tmp).ok();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn merge_model(
    base: &Path,
    adapters: Vec<MergeAdapter>,
    output: &Path,
    dtype: Option<DType>,
    progress: Progress<'_>,
) -> Result<MergeReport> {
    let model = BaseModel::open(base)?;
    let aliases = model.aliases();
    let merger = Merger::new(adapters, &|n: &str| model.shape(n), aliases)?;
    let mut report = MergeReport {
        modules: merger.modules(),
        warnings: merger.warnings().to_vec(),
        ..Default::default()
    };
    let total: u64 = model
        .shards
        .iter()
        .map(|(_, f)| {
            f.names()
                .iter()
                .filter_map(|n| f.info(n))
                .map(|(s, d)| (s.iter().product::<usize>() * d.bitsize() / 8) as u64)
                .sum::<u64>()
        })
        .sum();
    let mut offset = 0u64;
    let mut shard_progress = |f: &SafetensorsFile, out: &Path, offset: &mut u64| -> Result<u64> {
        let base_off = *offset;
        let n = merge_safetensors(f, &merger, out, dtype, &mut |d, _, name| {
            progress(base_off + d, total, name)
        })?;
        *offset += n;
        Ok(n)
    };
    match &model.dir {
        None => {
            let out = if output.is_dir() {
                output.join("model.safetensors")
            } else {
                output.to_path_buf()
            };
            report.bytes = shard_progress(&model.shards[0].1, &out, &mut offset)?;
            report.files.push(out);
        }
        Some(dir) => {
            if output.exists() {
                return Err(PeftError::Invalid(format!(
                    "{}: output directory already exists",
                    output.display()
                )));
            }
            let tmp =
                output.with_file_name(format!(".{}.tmp-{}", file_name(output), std::process::id()));
            let res = (|| -> Result<()> {
                std::fs::create_dir_all(&tmp).map_err(|e| PeftError::io(&tmp, e))?;
                for (fname, f) in &model.shards {
                    report.bytes += shard_progress(f, &tmp.join(fname), &mut offset)?;
                    report.files.push(output.join(fname));
                }
                if let Some(index) = &model.index {
                    let mut index = index.clone();
                    if let Some(m) = index.get_mut("weight_map").and_then(|m| m.as_object_mut()) {
                        m.retain(|k, _| !is_bnb_state(k));
                    }
                    if let Some(m) = index.get_mut("metadata").and_then(|m| m.as_object_mut()) {
                        m.insert("total_size".into(), serde_json::json!(report.bytes));
                    }
                    let s = serde_json::to_string_pretty(&index)
                        .map_err(|e| PeftError::Invalid(e.to_string()))?;
                    atomic_write(&tmp.join("model.safetensors.index.json"), s.as_bytes())?;
                    report
                        .files
                        .push(output.join("model.safetensors.index.json"));
                }
                copy_side_files(dir, &tmp, &mut report)?;
                if model.is_quantized()
                    && let Some(config) = &model.config
                {
                    // The merged weights are dense: the config no longer describes a quantized checkpoint.
                    let mut config = config.clone();
                    if let Some(c) = config.as_object_mut() {
                        c.remove("quantization_config");
                    }
                    let text = crate::config::python_dumps(&config) + "\n";
                    atomic_write(&tmp.join("config.json"), text.as_bytes())?;
                }
                std::fs::rename(&tmp, output).map_err(|e| PeftError::io(output, e))
            })();
            if let Err(e) = res {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
            report.files = report
                .files
                .iter()
                .map(|p| output.join(p.file_name().unwrap_or_default()))
                .collect();
        }
    }
    Ok(report)
}

/// Copies the base directory's non-weight files (config.json, tokenizer files, generation config, …).
fn copy_side_files(dir: &Path, out: &Path, report: &mut MergeReport) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| PeftError::io(dir, e))?;
    for e in entries {
        let e = e.map_err(|e| PeftError::io(dir, e))?;
        let p = e.path();
        let name = file_name(&p);
        let is_weights = name.ends_with(".safetensors")
            || name.ends_with(".bin")
            || name.ends_with(".pt")
            || name.ends_with(".pth")
            || name.ends_with(".gguf")
            || name == "model.safetensors.index.json"
            || name.starts_with('.');
        if p.is_file() && !is_weights {
            std::fs::copy(&p, out.join(&name)).map_err(|e| PeftError::io(&p, e))?;
            report.files.push(out.join(&name));
        }
    }
    Ok(())
}
