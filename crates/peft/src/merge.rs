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
//! [`merge_safetensors`] streams one file tensor by tensor (peak memory about one module, plus the shard's
//! quantized weights in their packed form), and [`merge_model`] / [`merge_model_with`] handle a model
//! directory, sharded or not, writing atomically. Quantized bases (bitsandbytes, GPTQ, AWQ) are merged into
//! their dequantized weights and written dense, or, for bitsandbytes with [`MergeOptions::requantize`],
//! re-quantized to their own format.

use crate::config::PeftConfig;
use crate::io::{
    Aliases, BaseModel, SafetensorsFile, SplitKeys, TempKind, atomic_write, atomic_write_try,
    ensure_no_alias, file_name, load_adapter, remove_stale_temps_beside, split_keys, sync_dir,
    temp_path,
};
use crate::layer::registry;
use crate::layer::{BaseLayer, MergeInput};
use crate::quant::QuantizedWeight;
use crate::quant::awq::AwqWeight;
use crate::quant::gptq::{GptqFormat, GptqWeight};
use crate::{PeftError, Result};
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use std::collections::{BTreeMap, HashMap};
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
        let mut split = split_keys(tensors, prefixes)?;
        crate::tuners::tuners_utils::drop_tied_copies(&config, &mut split.modules)?;
        crate::tuners::tuners_utils::check_file_modules_targeted(
            &config,
            split
                .modules
                .iter()
                .filter(|(_, p)| !crate::peft_model::is_lora_token_module(&config, p))
                .map(|(m, _)| m.as_str()),
        )?;
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
                dims.push(crate::tuners::TargetLayer::of(m, &layer));
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
        // PEFT's loading runs each adapter's layer init first: PiSSA / OLoRA configs rewrite the base weight
        // (`W − ΔW₀` of a fresh init on the current weight), in load order, before anything merges.
        let mut weight = weight;
        for ad in self
            .adapters
            .iter()
            .filter(|a| a.split.modules.contains_key(module) && a.config.method().rewrites_base())
        {
            let params = &ad.split.modules[module];
            let kind = ad
                .config
                .method()
                .infer_kind(module, params, weight.dims())?;
            let layer = BaseLayer::new(kind, weight.clone(), bias.clone())?;
            weight = crate::tuners::lora::rewrite_init::fresh_residual(&ad.config, module, &layer)?;
        }
        let unmerged = weight.clone();
        let unmerged_bias = bias.clone();
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
                        unmerged_bias: unmerged_bias.as_ref(),
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

/// How [`merge_model_with`] writes the merged model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MergeOptions {
    /// Store floating-point tensors in this dtype (default: each tensor's own; a dequantized bitsandbytes
    /// weight its dtype before quantization, a dequantized GPTQ or AWQ weight f32). Quantization state
    /// tensors kept by [`MergeOptions::requantize`] are never converted.
    pub dtype: Option<DType>,
    /// Re-quantize each merged bitsandbytes 4-bit or 8-bit Linear weight to the base's own format (quant
    /// type, block size, double quantization, `quant_storage`; int8 + `SCB`) and write it as transformers
    /// saves it, keeping `quantization_config`, instead of writing it dense. Lossy: see
    /// [`MergeReport::requantized`]. An error on a base with no bitsandbytes weights or with GPTQ / AWQ ones.
    pub requantize: bool,
    /// How GPTQ zero points are stored; `None`: from `config.json`'s `quantization_config.checkpoint_format`
    /// (or `format`) for a model directory, `gptq` (v1) for a lone file.
    pub gptq_format: Option<GptqFormat>,
}

/// A merged weight that [`MergeOptions::requantize`] wrote re-quantized, with the loss it measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Requantized {
    /// The weight's tensor name (`model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    /// Its format ([`QuantizedWeight::describe`]).
    pub format: String,
    /// `max |dequant(requant(W')) − W'|` over its elements, `W'` the merged weight in f32.
    pub max_error: f32,
    /// `max |W'|`.
    pub max_abs: f32,
}

/// A quantized Linear weight stored in a shard: the dense tensor name a merge writes (`<module>.weight`), the
/// weight, and the names of the tensors it is stored as ([`crate::quant::stored_keys`], the packed one first).
struct StoredQuant {
    weight: String,
    q: QuantizedWeight,
    keys: Vec<String>,
}

impl StoredQuant {
    fn is_bnb(&self) -> bool {
        matches!(self.q, QuantizedWeight::Bnb4(_) | QuantizedWeight::Bnb8(_))
    }
}

/// The quantized Linear weights stored in a shard (bitsandbytes 4-bit / 8-bit, GPTQ in `format`, AWQ), read
/// with their state tensors.
fn quantized_weights(f: &SafetensorsFile, format: GptqFormat) -> Result<Vec<StoredQuant>> {
    let dev = Device::Cpu;
    let mut out = Vec::new();
    for n in f.names() {
        let Some(module) = crate::quant::stored_module(&n) else {
            continue;
        };
        let Some(keys) = crate::quant::stored_keys(module, |k| f.contains(k)) else {
            continue;
        };
        if keys[0] != n {
            continue;
        }
        let mut tensors = IndexMap::new();
        for k in keys.iter().filter(|k| f.contains(k)) {
            tensors.insert(k.clone(), f.load(k, &dev)?);
        }
        let q = if n.ends_with(".qweight") {
            if tensors.contains_key(&format!("{module}.g_idx")) {
                GptqWeight::from_state_dict(module, &tensors, format).map(QuantizedWeight::Gptq)
            } else {
                AwqWeight::from_state_dict(module, &tensors).map(QuantizedWeight::Awq)
            }
        } else {
            crate::quant::from_state_dict(module, &tensors).and_then(|q| {
                q.map(|(q, _)| q)
                    .ok_or_else(|| PeftError::MissingKey(format!("{n} (quant state)")))
            })
        }
        .map_err(|e| PeftError::Invalid(format!("{}: {e}", f.path().display())))?;
        out.push(StoredQuant {
            weight: format!("{module}.weight"),
            q,
            keys,
        });
    }
    Ok(out)
}

/// The `[out, in]` shape of GPTQ / AWQ weight `name` (`<module>.weight`, absent from the file) from its packed
/// tensors' shapes: `out` from `scales`, `in` from `g_idx` (GPTQ) or `qweight` (AWQ).
fn packed_shape(f: &SafetensorsFile, name: &str) -> Option<Vec<usize>> {
    let m = name.strip_suffix(".weight")?;
    let (qw, _) = f.info(&format!("{m}.qweight"))?;
    let (sc, _) = f.info(&format!("{m}.scales"))?;
    let inp = match f.info(&format!("{m}.g_idx")) {
        Some((g, _)) => *g.first()?,
        None => *qw.first()?,
    };
    Some(vec![*sc.get(1)?, inp])
}

/// The GPTQ checkpoint format `config.json` states (`quantization_config.checkpoint_format`, or `format`), for a
/// GPTQ config; `gptq` (v1) otherwise. An unknown format is an error naming the field.
fn config_gptq_format(config: Option<&serde_json::Value>) -> Result<GptqFormat> {
    let Some(q) = config.and_then(|c| c.get("quantization_config")) else {
        return Ok(GptqFormat::V1);
    };
    if q.get("quant_method").and_then(|v| v.as_str()) != Some("gptq") {
        return Ok(GptqFormat::V1);
    }
    for field in ["checkpoint_format", "format"] {
        if let Some(f) = q.get(field).and_then(|v| v.as_str()) {
            return GptqFormat::parse(f).ok_or_else(|| PeftError::Unsupported {
                field: format!("config.json: quantization_config.{field}"),
                value: format!("{f:?}"),
                reason: "GPTQ checkpoints are read in the \"gptq\" (v1) or \"gptq_v2\" format"
                    .into(),
            });
        }
    }
    Ok(GptqFormat::V1)
}

/// Where an output tensor's bytes come from.
enum Data {
    /// The base tensor of the same name: copied, converted, or merged when the merger touches it.
    Base,
    /// A quantized weight of the shard, dequantized (and merged when the merger touches it).
    Dense,
    /// Computed while planning (a re-quantized merged weight's tensors).
    Bytes(Vec<u8>),
}

/// One output tensor of a shard.
struct Entry {
    name: String,
    /// The dtype of its source (the dequantized dtype for [`Data::Dense`]).
    sdt: safetensors::Dtype,
    out_dt: safetensors::Dtype,
    shape: Vec<usize>,
    nbytes: usize,
    data: Data,
}

/// What a shard's merge wrote.
#[derive(Debug, Default)]
struct ShardReport {
    bytes: u64,
    names: Vec<String>,
    dequantized: usize,
    requantized: Vec<Requantized>,
}

/// Progress of a merge: bytes written so far, total bytes, and the tensor just written.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64, &str);

/// Streams `base` to `output` with the merge applied, tensor by tensor, in the base's order. Untouched
/// tensors are copied byte for byte (or converted when `dtype` is given); merged ones are computed in f32
/// and rounded once. Quantized Linear weights (bitsandbytes, GPTQ in the `gptq` v1 format, AWQ) are written
/// dense, without their packed and state tensors. Returns the number of bytes written for tensor data.
pub fn merge_safetensors(
    base: &SafetensorsFile,
    merger: &Merger,
    output: &Path,
    dtype: Option<DType>,
    progress: Progress<'_>,
) -> Result<u64> {
    let opts = MergeOptions {
        dtype,
        ..Default::default()
    };
    Ok(merge_shard(base, merger, output, &opts, GptqFormat::V1, progress)?.bytes)
}

/// [`merge_safetensors`] with [`MergeOptions`]; GPTQ weights read in `format`.
fn merge_shard(
    base: &SafetensorsFile,
    merger: &Merger,
    output: &Path,
    opts: &MergeOptions,
    format: GptqFormat,
    progress: Progress<'_>,
) -> Result<ShardReport> {
    let dev = Device::Cpu;
    let dtype = opts.dtype;
    let quants = quantized_weights(base, format)?;
    if opts.requantize
        && let Some(q) = quants.iter().find(|q| !q.is_bnb())
    {
        return Err(no_requantizer(&q.q));
    }
    // Every stored tensor of a quantized weight → the weight's index.
    let stored: HashMap<&str, usize> = quants
        .iter()
        .enumerate()
        .flat_map(|(i, q)| q.keys.iter().map(move |k| (k.as_str(), i)))
        .collect();
    let dense_of: HashMap<&str, usize> = quants
        .iter()
        .enumerate()
        .map(|(i, q)| (q.weight.as_str(), i))
        .collect();
    let load = |n: &str| match dense_of.get(n) {
        Some(&i) => quants[i].q.dequantize(&dev),
        None => base.load(n, &dev),
    };
    let mut report = ShardReport::default();
    let mut plan: Vec<Entry> = Vec::new();
    let convert = |sdt: safetensors::Dtype| match (dtype, candle_dtype(sdt)) {
        (Some(d), Some(_)) => st_dtype(d),
        _ => Ok(sdt),
    };
    for n in base.names() {
        let Some(&i) = stored.get(n.as_str()) else {
            let (shape, sdt) = base
                .info(&n)
                .ok_or_else(|| PeftError::MissingKey(n.clone()))?;
            let out_dt = convert(sdt)?;
            if merger.touches(&n) && candle_dtype(out_dt).is_none() {
                return Err(PeftError::Invalid(format!(
                    "cannot merge into `{n}` of dtype {sdt:?}"
                )));
            }
            let nbytes = shape.iter().product::<usize>() * out_dt.bitsize() / 8;
            plan.push(Entry {
                name: n,
                sdt,
                out_dt,
                shape,
                nbytes,
                data: Data::Base,
            });
            continue;
        };
        let sq = &quants[i];
        if opts.requantize && !merger.touches(&sq.weight) {
            // Untouched: every stored tensor as it is.
            let (shape, sdt) = base
                .info(&n)
                .ok_or_else(|| PeftError::MissingKey(n.clone()))?;
            let nbytes = shape.iter().product::<usize>() * sdt.bitsize() / 8;
            plan.push(Entry {
                name: n,
                sdt,
                out_dt: sdt,
                shape,
                nbytes,
                data: Data::Base,
            });
            continue;
        }
        if n != sq.keys[0] {
            continue; // a state tensor: written with (or instead of) its packed weight below
        }
        if opts.requantize {
            let merged = merger
                .merged_tensor(&sq.weight, &load)?
                .ok_or_else(|| PeftError::Invalid(format!("internal: {} not merged", sq.weight)))?
                .to_dtype(DType::F32)?;
            let q = sq.q.requantize(&merged)?;
            let back = q.dequantize(&dev)?.to_dtype(DType::F32)?;
            let max_error = (&back - &merged)?.abs()?.max_all()?.to_scalar::<f32>()?;
            let max_abs = merged.abs()?.max_all()?.to_scalar::<f32>()?;
            report.requantized.push(Requantized {
                name: sq.weight.clone(),
                format: q.describe(),
                max_error,
                max_abs,
            });
            for (k, t) in q.state_dict(&sq.weight, &dev)? {
                // A tensor the base stores with the same number of bytes keeps its dtype and shape (bnb's
                // `quant_storage`, int8 codes); others (the quant state's JSON) are written as they come.
                let bytes = tensor_bytes(&t)?;
                let (shape, sdt) = match base.info(&k) {
                    Some((s, d))
                        if sq.keys.contains(&k)
                            && s.iter().product::<usize>() * d.bitsize() / 8 == bytes.len() =>
                    {
                        (s, d)
                    }
                    // `weight_format`, which this base does not store.
                    _ if !sq.keys.contains(&k) && k.ends_with(".weight_format") => continue,
                    _ => (t.dims().to_vec(), t.dtype().into()),
                };
                plan.push(Entry {
                    name: k,
                    sdt,
                    out_dt: sdt,
                    shape,
                    nbytes: bytes.len(),
                    data: Data::Bytes(bytes),
                });
            }
            continue;
        }
        // Dense: the dequantized weight under `<module>.weight`.
        let sdt = match sq.q {
            QuantizedWeight::Gptq(_) | QuantizedWeight::Awq(_) => safetensors::Dtype::F32,
            _ => st_dtype(sq.q.dtype())?,
        };
        let out_dt = convert(sdt)?;
        let shape = sq.q.shape().to_vec();
        let nbytes = shape.iter().product::<usize>() * out_dt.bitsize() / 8;
        report.dequantized += 1;
        plan.push(Entry {
            name: sq.weight.clone(),
            sdt,
            out_dt,
            shape,
            nbytes,
            data: Data::Dense,
        });
    }
    // The header: names sorted, data in plan order.
    let mut header: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut offset = 0usize;
    for e in &plan {
        header.insert(
            e.name.clone(),
            serde_json::json!({"dtype": e.out_dt, "shape": e.shape, "data_offsets": [offset, offset + e.nbytes]}),
        );
        offset += e.nbytes;
    }
    if header.len() != plan.len() {
        return Err(PeftError::Invalid(format!(
            "{}: the merged shard would hold a tensor name twice",
            base.path().display()
        )));
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
    atomic_write_try(output, |w| {
        let io = |e| PeftError::io(output, e);
        w.write_all(&(hbytes.len() as u64).to_le_bytes())
            .map_err(io)?;
        w.write_all(&hbytes).map_err(io)?;
        let mut done = 0u64;
        for e in &plan {
            let to_out = |t: Tensor| -> Result<Vec<u8>> {
                tensor_bytes(&t.to_dtype(candle_dtype(e.out_dt).unwrap_or(DType::F32))?)
            };
            let bytes: Vec<u8> = match &e.data {
                Data::Bytes(b) => b.clone(),
                Data::Base | Data::Dense => match merger.merged_tensor(&e.name, &load)? {
                    Some(t) => to_out(t)?,
                    None if e.sdt == e.out_dt && matches!(e.data, Data::Base) => {
                        tensor_bytes(&load(&e.name)?)?
                    }
                    None => to_out(load(&e.name)?)?,
                },
            };
            if bytes.len() != e.nbytes {
                return Err(PeftError::Invalid(format!(
                    "internal: {} has {} bytes, expected {}",
                    e.name,
                    bytes.len(),
                    e.nbytes
                )));
            }
            w.write_all(&bytes).map_err(io)?;
            done += e.nbytes as u64;
            progress(done, total, &e.name);
        }
        Ok(())
    })?;
    report.bytes = total;
    report.names = plan.into_iter().map(|e| e.name).collect();
    Ok(report)
}

/// The error for [`MergeOptions::requantize`] on a weight with no re-quantizer.
/// The Llama family's linear layers in transformers' module order (`named_modules()`): the embedding, then per
/// decoder layer the attention's `q, k, v, o` and the MLP's `gate, up, down`, then the head.
const LLAMA_LAYER_ORDER: &[&str] = &[
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// The model types whose module order [`transformers_module_order`] knows.
const ORDERED_MODEL_TYPES: &[&str] = &["llama", "mistral", "qwen2"];

/// The position of `module` in transformers' `named_modules()` order for a Llama-family model, `None` for a
/// name outside that layout.
fn llama_module_rank(module: &str) -> Option<(usize, usize, usize)> {
    match module {
        "model.embed_tokens" => return Some((0, 0, 0)),
        "lm_head" => return Some((2, 0, 0)),
        _ => {}
    }
    let rest = module.strip_prefix("model.layers.")?;
    let (i, rest) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let j = LLAMA_LAYER_ORDER.iter().position(|n| *n == rest)?;
    Some((1, i, j))
}

/// `modules` sorted in transformers' module order, for a base whose `config.json` names a Llama-family
/// `model_type`; an error naming what is missing otherwise.
fn transformers_module_order(
    config: Option<&serde_json::Value>,
    mut modules: Vec<String>,
    source: &str,
) -> Result<Vec<String>> {
    let model_type = config
        .and_then(|c| c.get("model_type"))
        .and_then(|v| v.as_str());
    let why = |what: String| {
        PeftError::Invalid(format!(
            "{source}: this adapter's layers depend on the model's module order (UniLoRA draws its indices \
             over the targeted layers in that order, and its file does not hold them: `save_indices` false), \
             and {what}; merge it through a model, or save it with `save_indices: true`"
        ))
    };
    match model_type {
        Some(t) if ORDERED_MODEL_TYPES.contains(&t) => {}
        Some(t) => {
            return Err(why(format!(
                "peft-rs knows no module order for model_type `{t}`"
            )));
        }
        None => return Err(why("the base has no config.json with a model_type".into())),
    }
    if let Some(m) = modules.iter().find(|m| llama_module_rank(m).is_none()) {
        return Err(why(format!("`{m}` is not a module of the Llama layout")));
    }
    modules.sort_by_key(|m| llama_module_rank(m));
    Ok(modules)
}

/// The adapters whose layers are the config's targets ([`crate::tuners::PeftMethod::layers_from_config`])
/// get every module of the base that their config targets, in transformers' module order, as PEFT injects
/// them (the file may name none).
fn add_config_layers(adapters: &mut [MergeAdapter], model: &BaseModel) -> Result<()> {
    let model_type = model
        .config
        .as_ref()
        .and_then(|c| c.get("model_type"))
        .and_then(|v| v.as_str())
        .map(str::to_string);
    for ad in adapters
        .iter_mut()
        .filter(|a| a.config.method().layers_from_config())
    {
        let mut config = ad.config.clone();
        config
            .method_mut()
            .prepare_adapter_config(model_type.as_deref())?;
        let Some(spec) = config.target_spec() else {
            continue;
        };
        let mut targeted = Vec::new();
        for (_, f) in &model.shards {
            for n in f.names() {
                if let Some(m) = n.strip_suffix(".weight")
                    && crate::tuners::tuners_utils::check_target_module_exists(&spec, m)?
                    && !targeted.iter().any(|t: &String| t == m)
                {
                    targeted.push(m.to_string());
                }
            }
        }
        let missing = targeted.iter().any(|m| !ad.split.modules.contains_key(m));
        if !missing {
            continue;
        }
        let ordered = transformers_module_order(model.config.as_ref(), targeted, &ad.source)?;
        let mut modules = IndexMap::new();
        for m in ordered {
            let params = ad.split.modules.shift_remove(&m).unwrap_or_default();
            modules.insert(m, params);
        }
        modules.extend(std::mem::take(&mut ad.split.modules));
        ad.split.modules = modules;
    }
    Ok(())
}

fn no_requantizer(q: &QuantizedWeight) -> PeftError {
    PeftError::Unsupported {
        field: "requantize".into(),
        value: q.describe(),
        reason: "there is no GPTQ or AWQ re-quantizer (re-quantizing needs calibration data; PEFT has no merge \
                 for these layers either): merge without re-quantizing to write the dequantized weights dense"
            .into(),
    }
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
    /// The merged weights written re-quantized ([`MergeOptions::requantize`]), with their measured loss.
    pub requantized: Vec<Requantized>,
}

/// Merges adapters into a base model file or directory and writes the result.
///
/// - base file → `output` is a file (or, if it is an existing directory, `output/model.safetensors`);
/// - base directory → `output` is a directory with the same shard layout and index, plus the base's
///   non-weight files (config, tokenizer, generation config). The directory is assembled under a temporary
///   name and renamed into place, so a failure leaves nothing behind.
///
/// An output that aliases the base is refused ([`ensure_no_alias`]). Temporaries that a killed merge into
/// `output` left (`.NAME.tmp-PID` files or directories) are removed first ([`remove_stale_temps_beside`]); a
/// merge killed at any moment leaves the previous output (a file) or none (a directory), or the complete new
/// one.
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
    let opts = MergeOptions {
        dtype,
        ..Default::default()
    };
    merge_model_with(base, adapters, output, &opts, progress)
}

/// [`merge_model`] with [`MergeOptions`].
///
/// Quantized Linear weights are written dense (dequantized, then merged in f32): bitsandbytes 4-bit and 8-bit,
/// GPTQ (float16 dequantization as gptqmodel, zero points in the checkpoint format `config.json` states) and
/// AWQ `gemm`, each as `<module>.weight` without its packed and state tensors, `quantization_config` removed
/// from `config.json` and the index's `weight_map` listing what was written. With
/// [`MergeOptions::requantize`], merged bitsandbytes weights are re-quantized to the base's format instead and
/// the config is kept; [`MergeReport::requantized`] says what that cost.
pub fn merge_model_with(
    base: &Path,
    adapters: Vec<MergeAdapter>,
    output: &Path,
    opts: &MergeOptions,
    progress: Progress<'_>,
) -> Result<MergeReport> {
    ensure_no_alias(&[("the base model", base)], &[output])?;
    remove_stale_temps_beside(output)?;
    let model = BaseModel::open(base)?;
    let format = match opts.gptq_format {
        Some(f) => f,
        None => config_gptq_format(model.config.as_ref())?,
    };
    if opts.requantize {
        let names = || model.shards.iter().flat_map(|(_, f)| f.names());
        if let Some(n) = names().find(|n| n.ends_with(".qweight")) {
            let f = model
                .shards
                .iter()
                .find(|(_, f)| f.contains(&n))
                .map(|(_, f)| f)
                .ok_or_else(|| PeftError::MissingKey(n.clone()))?;
            let q = quantized_weights_of(f, &n, format)?;
            return Err(no_requantizer(&q));
        }
        if !model.is_quantized() {
            return Err(PeftError::Unsupported {
                field: "requantize".into(),
                value: "true".into(),
                reason: format!(
                    "{}: the base has no bitsandbytes 4-bit or 8-bit weights to re-quantize into; a merge into \
                     a full-precision base is written dense",
                    base.display()
                ),
            });
        }
    }
    let aliases = model.aliases();
    let shape = |n: &str| {
        model
            .shape(n)
            .or_else(|| model.shards.iter().find_map(|(_, f)| packed_shape(f, n)))
    };
    let mut adapters = adapters;
    add_config_layers(&mut adapters, &model)?;
    let merger = Merger::new(adapters, &shape, aliases)?;
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
    let mut dequantized = 0usize;
    let mut shard_progress =
        |f: &SafetensorsFile, out: &Path, offset: &mut u64| -> Result<ShardReport> {
            let base_off = *offset;
            let r = merge_shard(f, &merger, out, opts, format, &mut |d, _, name| {
                progress(base_off + d, total, name)
            })?;
            *offset += r.bytes;
            Ok(r)
        };
    match &model.dir {
        None => {
            let out = if output.is_dir() {
                output.join("model.safetensors")
            } else {
                output.to_path_buf()
            };
            let r = shard_progress(&model.shards[0].1, &out, &mut offset)?;
            report.bytes = r.bytes;
            report.requantized = r.requantized;
            report.files.push(out);
        }
        Some(dir) => {
            if output.exists() {
                return Err(PeftError::Invalid(format!(
                    "{}: output directory already exists",
                    output.display()
                )));
            }
            let tmp = temp_path(output, TempKind::Tmp)?;
            let res = (|| -> Result<()> {
                std::fs::create_dir_all(&tmp).map_err(|e| PeftError::io(&tmp, e))?;
                let mut weight_map = BTreeMap::new();
                for (fname, f) in &model.shards {
                    let r = shard_progress(f, &tmp.join(fname), &mut offset)?;
                    report.bytes += r.bytes;
                    report.requantized.extend(r.requantized);
                    dequantized += r.dequantized;
                    for n in r.names {
                        weight_map.insert(n, serde_json::Value::from(fname.as_str()));
                    }
                    report.files.push(output.join(fname));
                }
                if let Some(index) = &model.index {
                    let mut index = index.clone();
                    if let Some(m) = index.as_object_mut() {
                        // What was written: dense weights in place of packed ones, no state tensors.
                        m.insert(
                            "weight_map".into(),
                            serde_json::Value::Object(weight_map.into_iter().collect()),
                        );
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
                if dequantized > 0
                    && let Some(config) = &model.config
                    && config.get("quantization_config").is_some()
                {
                    // The merged weights are dense: the config no longer describes a quantized checkpoint.
                    let mut config = config.clone();
                    if let Some(c) = config.as_object_mut() {
                        c.remove("quantization_config");
                    }
                    let text = crate::config::python_dumps(&config) + "\n";
                    atomic_write(&tmp.join("config.json"), text.as_bytes())?;
                }
                sync_dir(&tmp);
                std::fs::rename(&tmp, output).map_err(|e| PeftError::io(output, e))?;
                if let Some(parent) = output.parent().filter(|p| !p.as_os_str().is_empty()) {
                    sync_dir(parent);
                }
                Ok(())
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

/// The GPTQ or AWQ weight whose packed tensor is `qweight`, for an error message.
fn quantized_weights_of(
    f: &SafetensorsFile,
    qweight: &str,
    format: GptqFormat,
) -> Result<QuantizedWeight> {
    quantized_weights(f, format)?
        .into_iter()
        .find(|q| q.keys[0] == qweight)
        .map(|q| q.q)
        .ok_or_else(|| PeftError::MissingKey(qweight.to_string()))
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
