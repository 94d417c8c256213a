//! Writing a PEFT LoRA adapter as a llama.cpp LoRA GGUF file, exactly as llama.cpp's
//! `convert_lora_to_gguf.py` writes it, so that `llama-cli --lora`, `llama-server` and llama-cpp-python load it.
//!
//! The file ([`lora_gguf_from_adapter`], [`write_lora_gguf`], or both at once: [`export_lora_gguf`]):
//! - metadata `general.architecture` (the base's), `general.type = "adapter"`, `adapter.type = "lora"`,
//!   `general.name` (model-card title from the adapter directory's name, which llama.cpp does not read),
//!   `adapter.lora.alpha` (f32), `general.quantization_version = 2`; GGUF v3, alignment 32;
//! - per adapted module `<gguf base tensor>.lora_a` = PEFT's `lora_A` `[r, in]` and `.lora_b` = `lora_B`
//!   `[out, r]` (no transpose), except `token_embd.weight.lora_a` = `lora_embedding_A`ᵀ `[vocab, r]`; the rows
//!   of `lora_b` of `attn_q` / `attn_k` permuted like the base's q / k weights
//!   ([`crate::gguf::permute_qk`] with `n_head` / `n_kv_head`); tensors in the sorted order of the adapter's keys;
//! - storage ([`LoraOutType`]): all F32, all F16, or Q8_0 where a row (`ne0`, the last dimension) is a multiple
//!   of 32 and F16 elsewhere (so `lora_a` is Q8_0 and `lora_b` F16 unless r is a multiple of 32), with
//!   gguf-py's rounding (f16 round-to-nearest-even; Q8_0 `d = amax/127`, `q = round(x·(1/d))`, half away
//!   from zero).
//!
//! llama.cpp adds `alpha/r · B·A·x` with one alpha per file and r read from each `lora_b`: rsLoRA is baked in as
//! `alpha·√r`, and per-module ranks (`rank_pattern`) are fine as long as every module needs the same alpha.
//! Everything else llama.cpp cannot express is refused with an error naming it ([`ModelError::Unsupported`]):
//! methods other than LoRA, DoRA, `alpha_pattern` / `rank_pattern` combinations that need different alphas,
//! `modules_to_save` and full replaced tensors, bias training, `fan_in_fan_out`, an alpha of 0, LoRA on the
//! output layer or the embedding of a base with tied embeddings, and bases other than Llama / Mistral.
//!
//! [`read_lora_gguf`] reads such a file back (metadata, tensor names, shapes, ggml types and raw bytes).

use crate::error::{ModelError, Result};
use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{self, Value as GgufValue};
use candle_core::{DType, Device, Tensor};
use peft::PeftConfig;
use peft::io::AdapterFile;
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// The GGUF alignment of the tensor data (gguf-py's and llama.cpp's default).
const ALIGNMENT: usize = 32;
/// The Q8_0 block: 32 values, an f16 scale and 32 signed bytes.
const Q8_0_BLOCK: usize = 32;

/// How the tensors are stored (`convert_lora_to_gguf.py --outtype`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraOutType {
    /// Every tensor F32.
    F32,
    /// Every tensor F16.
    F16,
    /// Q8_0 where the row length (`ne0`) is a multiple of 32, else F16 (as the converter falls back).
    Q8_0,
}

impl LoraOutType {
    /// The name `--outtype` takes (`f32`, `f16`, `q8_0`).
    pub fn as_str(self) -> &'static str {
        match self {
            LoraOutType::F32 => "f32",
            LoraOutType::F16 => "f16",
            LoraOutType::Q8_0 => "q8_0",
        }
    }

    /// The ggml type a tensor whose rows have `ne0` values gets.
    pub fn ggml_dtype(self, ne0: usize) -> GgmlDType {
        match self {
            LoraOutType::F32 => GgmlDType::F32,
            LoraOutType::F16 => GgmlDType::F16,
            LoraOutType::Q8_0 if ne0.is_multiple_of(Q8_0_BLOCK) => GgmlDType::Q8_0,
            LoraOutType::Q8_0 => GgmlDType::F16,
        }
    }
}

/// What the file needs from the base model: its llama.cpp architecture, head counts (for the q / k row
/// permutation) and whether the output layer shares the embedding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoraGgufBase {
    /// `general.architecture` (llama.cpp refuses an adapter whose architecture differs from the model's).
    pub architecture: String,
    /// Attention heads (`llama.attention.head_count`, `num_attention_heads`).
    pub n_head: usize,
    /// Key / value heads (`llama.attention.head_count_kv`, `num_key_value_heads`; default `n_head`).
    pub n_kv_head: usize,
    /// Whether the base has no separate output layer (`tie_word_embeddings`, or no `output.weight` in a GGUF).
    pub tied_embeddings: bool,
}

impl LoraGgufBase {
    /// Reads a base from a `.gguf` file (its metadata and tensor names) or an HF model directory (its
    /// `config.json`).
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        if path.is_dir() {
            Self::from_hf_dir(path)
        } else {
            Self::from_gguf(path)
        }
    }

    /// Reads a llama GGUF model file's architecture, head counts and whether it has `output.weight`.
    pub fn from_gguf(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bad = |message: String| ModelError::Gguf {
            path: path.to_path_buf(),
            message,
        };
        let (content, _) = crate::gguf::read_content(path)?;
        let md = &content.metadata;
        let arch = match md.get("general.architecture") {
            Some(GgufValue::String(s)) => s.clone(),
            _ => {
                return Err(bad(
                    "no string `general.architecture` in the metadata".into()
                ));
            }
        };
        if md
            .get("general.type")
            .is_some_and(|t| matches!(t, GgufValue::String(s) if s == "adapter"))
        {
            return Err(bad(
                "is an adapter (general.type = adapter); --base takes the base model".into(),
            ));
        }
        check_architecture(&arch, path)?;
        let uint = |key: &str| -> Result<Option<usize>> {
            match md.get(key) {
                None => Ok(None),
                Some(GgufValue::U32(v)) => Ok(Some(*v as usize)),
                Some(GgufValue::U64(v)) => Ok(Some(*v as usize)),
                Some(GgufValue::I32(v)) if *v >= 0 => Ok(Some(*v as usize)),
                Some(v) => Err(bad(format!(
                    "metadata `{key}` should be an integer, found {:?}",
                    v.value_type()
                ))),
            }
        };
        let heads_key = format!("{arch}.attention.head_count");
        let n_head =
            uint(&heads_key)?.ok_or_else(|| bad(format!("metadata `{heads_key}` is missing")))?;
        let n_kv_head = uint(&format!("{arch}.attention.head_count_kv"))?.unwrap_or(n_head);
        Ok(Self {
            architecture: arch,
            n_head,
            n_kv_head,
            tied_embeddings: !content.tensor_infos.contains_key("output.weight"),
        })
    }

    /// Reads an HF model directory's `config.json` (`LlamaForCausalLM` or `MistralForCausalLM`, which
    /// llama.cpp converts to its `llama` architecture).
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let config: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::json(path.display().to_string(), e))?;
        Self::from_hf_config(&config, dir)
    }

    /// [`LoraGgufBase::from_hf_dir`] on a parsed `config.json`; `dir` names the model in errors.
    pub fn from_hf_config(config: &Value, dir: &Path) -> Result<Self> {
        let archs: Vec<&str> = config["architectures"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let known = ["LlamaForCausalLM", "MistralForCausalLM"];
        let arch = match archs.first() {
            Some(a) if known.contains(a) => "llama",
            Some(a) => {
                return Err(ModelError::Unsupported(format!(
                    "{}: architecture `{a}`; GGUF LoRA export supports {} (llama.cpp's `llama`)",
                    dir.display(),
                    known.join(", ")
                )));
            }
            None => match config["model_type"].as_str() {
                Some("llama" | "mistral") => "llama",
                other => {
                    return Err(ModelError::Unsupported(format!(
                        "{}: config.json has no `architectures` and model_type {other:?}; GGUF LoRA export \
                         supports Llama and Mistral",
                        dir.display()
                    )));
                }
            },
        };
        let field = |k: &str| config.get(k).and_then(Value::as_u64).map(|v| v as usize);
        let n_head = field("num_attention_heads").ok_or_else(|| {
            ModelError::Invalid(format!(
                "{}: config.json has no `num_attention_heads`",
                dir.display()
            ))
        })?;
        Ok(Self {
            architecture: arch.into(),
            n_head,
            n_kv_head: field("num_key_value_heads").unwrap_or(n_head),
            tied_embeddings: config
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
    }
}

fn check_architecture(arch: &str, path: &Path) -> Result<()> {
    if arch != "llama" {
        return Err(ModelError::Unsupported(format!(
            "{}: architecture `{arch}`; GGUF LoRA export supports `llama` bases (Llama, Mistral, SmolLM2)",
            path.display()
        )));
    }
    Ok(())
}

/// A metadata value of a LoRA GGUF file (the types the converter writes).
#[derive(Clone, Debug, PartialEq)]
pub enum LoraGgufValue {
    /// `UINT32`.
    U32(u32),
    /// `FLOAT32`.
    F32(f32),
    /// `STRING`.
    String(String),
}

/// One tensor of a LoRA GGUF file.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraGgufTensor {
    /// The GGUF name, `blk.0.attn_q.weight.lora_a`.
    pub name: String,
    /// The row-major shape (numpy's; GGUF's `ne` reversed): `[r, in]` for `lora_a`, `[out, r]` for `lora_b`.
    pub shape: Vec<usize>,
    /// The ggml storage type.
    pub dtype: GgmlDType,
    /// The stored bytes (little-endian f32 / f16, or Q8_0 blocks).
    pub data: Vec<u8>,
}

impl LoraGgufTensor {
    /// The values as f32, `shape` row-major (Q8_0 dequantized).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        let bad = |m: &str| ModelError::Invalid(format!("tensor {}: {m}", self.name));
        match self.dtype {
            GgmlDType::F32 => Ok(self
                .data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()),
            GgmlDType::F16 => Ok(self
                .data
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect()),
            GgmlDType::Q8_0 => Ok(self
                .data
                .chunks_exact(2 + Q8_0_BLOCK)
                .flat_map(|b| {
                    let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                    b[2..].iter().map(move |&q| q as i8 as f32 * d)
                })
                .collect()),
            _ => Err(bad("not F32, F16 or Q8_0")),
        }
    }
}

/// A LoRA GGUF file's content: metadata in file order, tensors in file order.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraGguf {
    /// The key / value pairs (in file order when written; sorted by key when read back).
    pub metadata: Vec<(String, LoraGgufValue)>,
    /// The tensors, in file order.
    pub tensors: Vec<LoraGgufTensor>,
}

impl LoraGguf {
    /// The value of a metadata key.
    pub fn get(&self, key: &str) -> Option<&LoraGgufValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// `adapter.lora.alpha`.
    pub fn alpha(&self) -> Option<f32> {
        match self.get("adapter.lora.alpha") {
            Some(LoraGgufValue::F32(a)) => Some(*a),
            _ => None,
        }
    }

    /// The tensor of a name.
    pub fn tensor(&self, name: &str) -> Option<&LoraGgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// The llama.cpp name of an HF Llama weight (`model.layers.3.self_attn.q_proj.weight` → `blk.3.attn_q.weight`):
/// the inverse of [`crate::gguf::gguf_to_hf_name`] for the matrices a LoRA can target.
pub fn hf_to_gguf_name(hf: &str) -> Option<String> {
    let name = match hf {
        "model.embed_tokens.weight" => "token_embd.weight".to_string(),
        "lm_head.weight" => "output.weight".to_string(),
        _ => {
            let rest = hf.strip_prefix("model.layers.")?;
            let (layer, rest) = rest.split_once('.')?;
            let layer: usize = layer.parse().ok()?;
            let module = rest.strip_suffix(".weight")?;
            let part = match module {
                "self_attn.q_proj" => "attn_q",
                "self_attn.k_proj" => "attn_k",
                "self_attn.v_proj" => "attn_v",
                "self_attn.o_proj" => "attn_output",
                "mlp.gate_proj" => "ffn_gate",
                "mlp.up_proj" => "ffn_up",
                "mlp.down_proj" => "ffn_down",
                _ => return None,
            };
            format!("blk.{layer}.{part}.weight")
        }
    };
    // One map: the loader's inverse must give the name back.
    (crate::gguf::gguf_to_hf_name(&name).as_deref() == Some(hf)).then_some(name)
}

/// llama.cpp's title for a model-card name (gguf-py's `Metadata.id_to_title`): words split at `-` and
/// whitespace, all-lowercase words title-cased unless they look like versions (`v1.2`) or start with a digit.
fn id_to_title(s: &str) -> String {
    let replaced = s.trim().replace('-', " ");
    let words: Vec<String> = replaced
        .split_whitespace()
        .map(|w| {
            let has_cased = w.chars().any(|c| c.is_alphabetic());
            let lower = has_cased && !w.chars().any(|c| c.is_uppercase());
            let version_like = w.starts_with(|c: char| c.is_ascii_digit())
                || (w.starts_with('v')
                    && w.len() > 1
                    && w[1..]
                        .split('.')
                        .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit())));
            if lower && !version_like {
                // Python's str.title(): upper-case a letter that follows a non-letter, lower-case the others.
                let mut out = String::with_capacity(w.len());
                let mut prev_alpha = false;
                for c in w.chars() {
                    if c.is_alphabetic() {
                        if prev_alpha {
                            out.extend(c.to_lowercase());
                        } else {
                            out.extend(c.to_uppercase());
                        }
                        prev_alpha = true;
                    } else {
                        out.push(c);
                        prev_alpha = false;
                    }
                }
                out
            } else {
                w.to_string()
            }
        })
        .collect();
    words.join(" ")
}

/// One adapted module, as read from the adapter file.
#[derive(Default)]
struct Pair {
    a: Option<Tensor>,
    b: Option<Tensor>,
    embedding: bool,
}

/// Builds the llama.cpp LoRA file of a loaded LoRA adapter (`adapter_name` gives `general.name`, as the
/// converter takes it from the adapter directory's name).
pub fn lora_gguf_from_adapter(
    adapter: &AdapterFile,
    adapter_name: &str,
    base: &LoraGgufBase,
    out_type: LoraOutType,
) -> Result<LoraGguf> {
    let refuse = |m: String| Err(ModelError::Unsupported(m));
    let cfg = match &adapter.config {
        PeftConfig::Lora(c) => c,
        other => {
            return refuse(format!(
                "peft_type {}: llama.cpp adapters are LoRA only (merge the adapter into the base with \
                 `peft merge` instead)",
                other.peft_type()
            ));
        }
    };
    check_architecture(&base.architecture, Path::new("--base"))?;
    let l = &cfg.lora;
    if l.use_dora {
        return refuse(
            "use_dora: llama.cpp has no DoRA (its magnitude vector cannot be written as lora_a / lora_b); \
             merge it with `peft merge` instead"
                .into(),
        );
    }
    if let Some(m) = cfg
        .targets
        .modules_to_save
        .as_ref()
        .filter(|m| !m.is_empty())
    {
        return refuse(format!(
            "modules_to_save {m:?}: llama.cpp adapters hold only lora_a / lora_b pairs, not full module copies"
        ));
    }
    if l.bias != peft::config::LoraBias::None {
        return refuse(format!(
            "bias = {:?}: llama.cpp adapters cannot carry trained biases",
            l.bias.as_str()
        ));
    }
    if l.lora_bias {
        return refuse("lora_bias: llama.cpp adapters have no lora_B bias".into());
    }
    if l.fan_in_fan_out {
        return refuse("fan_in_fan_out: GGUF LoRA export supports Llama-family bases only".into());
    }

    // Pair the tensors by module, in the sorted order of the file's keys (the converter's order).
    let mut keys: Vec<&String> = adapter.tensors.keys().collect();
    keys.sort();
    let mut modules: Vec<(String, Pair)> = Vec::new();
    let mut replaced = Vec::new();
    for key in keys {
        let t = &adapter.tensors[key];
        let rest = key.strip_prefix(peft::io::MODEL_PREFIX).unwrap_or(key);
        let (module, which, embedding) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
            (m, 'a', false)
        } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
            (m, 'b', false)
        } else if let Some(m) = rest.strip_suffix(".lora_embedding_A") {
            (m, 'a', true)
        } else if let Some(m) = rest.strip_suffix(".lora_embedding_B") {
            (m, 'b', true)
        } else if rest.ends_with(".base_layer.weight") {
            // The base's own matrix, which PEFT saves with an embedding / lm_head target; the converter skips it.
            continue;
        } else {
            replaced.push(key.clone());
            continue;
        };
        let idx = match modules.iter().position(|(m, _)| m == module) {
            Some(i) => i,
            None => {
                modules.push((module.to_string(), Pair::default()));
                modules.len() - 1
            }
        };
        let pair = &mut modules[idx].1;
        pair.embedding |= embedding;
        let slot = if which == 'a' {
            &mut pair.a
        } else {
            &mut pair.b
        };
        if slot.replace(t.clone()).is_some() {
            return Err(ModelError::Invalid(format!(
                "adapter: two lora_{} tensors for {module}",
                which.to_ascii_uppercase()
            )));
        }
    }
    if !replaced.is_empty() {
        return refuse(format!(
            "the adapter replaces whole tensors ({}): llama.cpp adapters hold only lora_a / lora_b pairs \
             (modules_to_save, trained biases or new-token embeddings cannot be expressed)",
            replaced.join(", ")
        ));
    }
    if modules.is_empty() {
        return Err(ModelError::Invalid(
            "adapter: no lora_A / lora_B tensors".into(),
        ));
    }

    // One alpha for the file: every module's PEFT scale must be alpha / r with the same alpha.
    let mut alpha: Option<(f32, String, String)> = None;
    let mut tensors = Vec::with_capacity(2 * modules.len());
    for (module, pair) in &modules {
        let (Some(a), Some(b)) = (&pair.a, &pair.b) else {
            return Err(ModelError::Invalid(format!(
                "adapter: {module} has only one of lora_A / lora_B"
            )));
        };
        let gguf_base = hf_to_gguf_name(&format!("{module}.weight")).ok_or_else(|| {
            ModelError::Unsupported(format!(
                "LoRA on {module}: llama.cpp's llama architecture has no such weight (supported: embed_tokens, \
                 q/k/v/o_proj, gate/up/down_proj, lm_head)"
            ))
        })?;
        let is_embed = gguf_base == "token_embd.weight";
        if pair.embedding != is_embed {
            return Err(ModelError::Invalid(format!(
                "adapter: {module} has {} tensors but is {}an embedding",
                if pair.embedding {
                    "lora_embedding_*"
                } else {
                    "lora_A/B"
                },
                if is_embed { "" } else { "not " }
            )));
        }
        if base.tied_embeddings && (is_embed || gguf_base == "output.weight") {
            return refuse(format!(
                "LoRA on {module} with a base whose output layer is tied to the embedding: llama.cpp uses \
                 token_embd for both, so the adapter cannot be applied to one of them only"
            ));
        }
        let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
        // PEFT: A [r, in], B [out, r]; embedding: lora_embedding_A [r, vocab], lora_embedding_B [hidden, r].
        if a.rank() != 2 || b.rank() != 2 || a.dim(0)? != b.dim(1)? {
            return Err(ModelError::Invalid(format!(
                "adapter: {module}: lora_A {:?} and lora_B {:?} do not make a rank-r pair",
                a.dims(),
                b.dims()
            )));
        }
        let ra = a.dim(0)?;
        let (r_cfg, alpha_cfg) = cfg.rank_and_alpha_for(module);
        if r_cfg != ra {
            return Err(ModelError::Invalid(format!(
                "adapter: {module} has rank {ra} but the config (r / rank_pattern) says {r_cfg}"
            )));
        }
        let file_alpha = if l.use_rslora {
            alpha_cfg * (ra as f64).sqrt()
        } else {
            alpha_cfg
        } as f32;
        let why = format!(
            "{module} (r {ra}, alpha {alpha_cfg}{})",
            if l.use_rslora { ", rsLoRA" } else { "" }
        );
        match &alpha {
            None => alpha = Some((file_alpha, why, module.clone())),
            Some((x, first, _)) if x.to_bits() != file_alpha.to_bits() => {
                return refuse(format!(
                    "llama.cpp applies one alpha per file (scale = alpha / r): {first} needs alpha {x} but \
                     {why} needs {file_alpha}; this rank_pattern / alpha_pattern{} cannot be expressed",
                    if l.use_rslora { " with use_rslora" } else { "" }
                ));
            }
            Some(_) => {}
        }
        let a = if is_embed { a.t()?.contiguous()? } else { a };
        let b = if gguf_base.ends_with(".attn_q.weight") {
            crate::gguf::permute_qk(&b, base.n_head)?
        } else if gguf_base.ends_with(".attn_k.weight") {
            crate::gguf::permute_qk(&b, base.n_kv_head)?
        } else {
            b
        };
        for (suffix, t) in [("lora_a", a), ("lora_b", b)] {
            tensors.push(encode(format!("{gguf_base}.{suffix}"), &t, out_type)?);
        }
    }
    let (alpha, first, _) = alpha.expect("at least one module");
    if alpha == 0.0 {
        return refuse(format!(
            "lora_alpha 0 ({first}): llama.cpp reads alpha 0 as \"no alpha\" (scale 1), PEFT as scale 0"
        ));
    }
    let metadata = vec![
        (
            "general.architecture".into(),
            LoraGgufValue::String(base.architecture.clone()),
        ),
        (
            "general.type".into(),
            LoraGgufValue::String("adapter".into()),
        ),
        ("adapter.type".into(), LoraGgufValue::String("lora".into())),
        (
            "general.name".into(),
            LoraGgufValue::String(id_to_title(adapter_name)),
        ),
        ("adapter.lora.alpha".into(), LoraGgufValue::F32(alpha)),
        ("general.quantization_version".into(), LoraGgufValue::U32(2)),
    ];
    Ok(LoraGguf { metadata, tensors })
}

/// Stores a 2-D f32 tensor in the type `out_type` picks for its row length, rounding as gguf-py does.
fn encode(name: String, t: &Tensor, out_type: LoraOutType) -> Result<LoraGgufTensor> {
    let shape = t.dims().to_vec();
    let ne0 = *shape.last().unwrap_or(&0);
    let values = t.flatten_all()?.to_vec1::<f32>()?;
    let dtype = out_type.ggml_dtype(ne0);
    let data = match dtype {
        GgmlDType::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
        GgmlDType::F16 => values
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        _ => quantize_q8_0(&values),
    };
    Ok(LoraGgufTensor {
        name,
        shape,
        dtype,
        data,
    })
}

/// gguf-py's `Q8_0.quantize_blocks` (bit-exact with ggml's reference): per 32 values `d = amax / 127`,
/// `q = roundf(x · (1/d))` (half away from zero; 0 where d is 0), d stored as f16.
fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / Q8_0_BLOCK * (2 + Q8_0_BLOCK));
    for block in values.chunks_exact(Q8_0_BLOCK) {
        let amax = block.iter().fold(0f32, |m, x| m.max(x.abs()));
        let d = amax / 127.0;
        let id = if d == 0.0 { 0.0 } else { 1.0 / d };
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        out.extend(block.iter().map(|&x| (x * id).round() as i8 as u8));
    }
    out
}

/// The GGUF v3 bytes of a LoRA file: header, metadata, tensor infos (dims reversed), padding to 32, tensor data
/// each padded to 32 (gguf-py's layout).
pub fn lora_gguf_bytes(content: &LoraGguf) -> Result<Vec<u8>> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    let mut out = Vec::new();
    out.extend_from_slice(b"GGUF");
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(content.tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(content.metadata.len() as u64).to_le_bytes());
    for (k, v) in &content.metadata {
        string(&mut out, k);
        match v {
            LoraGgufValue::U32(x) => {
                out.extend_from_slice(&4u32.to_le_bytes());
                out.extend_from_slice(&x.to_le_bytes());
            }
            LoraGgufValue::F32(x) => {
                out.extend_from_slice(&6u32.to_le_bytes());
                out.extend_from_slice(&x.to_le_bytes());
            }
            LoraGgufValue::String(s) => {
                out.extend_from_slice(&8u32.to_le_bytes());
                string(&mut out, s);
            }
        }
    }
    let pad = |n: usize| n.div_ceil(ALIGNMENT) * ALIGNMENT;
    let mut offset = 0usize;
    for t in &content.tensors {
        let code: u32 = match t.dtype {
            GgmlDType::F32 => 0,
            GgmlDType::F16 => 1,
            GgmlDType::Q8_0 => 8,
            other => {
                return Err(ModelError::Invalid(format!(
                    "tensor {}: {other:?} is not written here",
                    t.name
                )));
            }
        };
        let elems: usize = t.shape.iter().product();
        let want = elems / t.dtype.block_size() * t.dtype.type_size();
        if !elems.is_multiple_of(t.dtype.block_size()) || want != t.data.len() {
            return Err(ModelError::Invalid(format!(
                "tensor {}: {} bytes for shape {:?} in {:?}",
                t.name,
                t.data.len(),
                t.shape,
                t.dtype
            )));
        }
        string(&mut out, &t.name);
        out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            out.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        out.extend_from_slice(&code.to_le_bytes());
        out.extend_from_slice(&(offset as u64).to_le_bytes());
        offset += pad(t.data.len());
    }
    out.resize(pad(out.len()), 0);
    for t in &content.tensors {
        out.extend_from_slice(&t.data);
        out.resize(pad(out.len()), 0);
    }
    Ok(out)
}

/// Writes a LoRA GGUF file to a temporary file next to `path`, then renames it: on failure `path` is
/// untouched and no partial file is left.
pub fn write_lora_gguf(path: impl AsRef<Path>, content: &LoraGguf) -> Result<()> {
    let bytes = lora_gguf_bytes(content)?;
    peft::io::atomic_write(path.as_ref(), &bytes)?;
    Ok(())
}

/// Loads the LoRA adapter directory `adapter_dir`, builds its llama.cpp file for `base`
/// ([`lora_gguf_from_adapter`]) and writes it to `output` ([`write_lora_gguf`]). Returns what was written.
pub fn export_lora_gguf(
    adapter_dir: impl AsRef<Path>,
    base: &LoraGgufBase,
    out_type: LoraOutType,
    output: impl AsRef<Path>,
) -> Result<LoraGguf> {
    let dir = adapter_dir.as_ref();
    let adapter = peft::io::load_adapter(dir, &Device::Cpu)?;
    let name = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "adapter".into());
    let content = lora_gguf_from_adapter(&adapter, &name, base, out_type)?;
    write_lora_gguf(output, &content)?;
    Ok(content)
}

/// Reads a LoRA GGUF file (any version candle reads): metadata sorted by key (only `UINT32`, `FLOAT32`,
/// `STRING` and `UINT64`-as-`UINT32` values are expected; others are an error), tensors in file order with their
/// raw bytes.
pub fn read_lora_gguf(path: impl AsRef<Path>) -> Result<LoraGguf> {
    let path = path.as_ref();
    let bad = |message: String| ModelError::Gguf {
        path: path.to_path_buf(),
        message,
    };
    let (content, _) = crate::gguf::read_content(path)?;
    let mut f = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
    let mut metadata = BTreeMap::new();
    for (k, v) in &content.metadata {
        let v = match v {
            GgufValue::U32(x) => LoraGgufValue::U32(*x),
            GgufValue::F32(x) => LoraGgufValue::F32(*x),
            GgufValue::String(s) => LoraGgufValue::String(s.clone()),
            other => {
                return Err(bad(format!(
                    "metadata `{k}`: unexpected {:?}",
                    other.value_type()
                )));
            }
        };
        metadata.insert(k.clone(), v);
    }
    let mut infos: Vec<(&String, &gguf_file::TensorInfo)> = content.tensor_infos.iter().collect();
    infos.sort_by_key(|(_, i)| i.offset);
    let mut tensors = Vec::with_capacity(infos.len());
    for (name, info) in infos {
        let shape = info.shape.dims().to_vec();
        let elems: usize = shape.iter().product();
        let bytes = elems / info.ggml_dtype.block_size() * info.ggml_dtype.type_size();
        let mut data = vec![0u8; bytes];
        f.seek(SeekFrom::Start(content.tensor_data_offset + info.offset))
            .and_then(|_| f.read_exact(&mut data))
            .map_err(|e| bad(format!("tensor {name}: {e}")))?;
        tensors.push(LoraGgufTensor {
            name: name.clone(),
            shape,
            dtype: info.ggml_dtype,
            data,
        });
    }
    Ok(LoraGguf {
        metadata: metadata.into_iter().collect(),
        tensors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_titles_and_q8_0_rounding() {
        assert_eq!(
            hf_to_gguf_name("model.layers.12.self_attn.k_proj.weight").as_deref(),
            Some("blk.12.attn_k.weight")
        );
        assert_eq!(
            hf_to_gguf_name("model.layers.0.mlp.down_proj.weight").as_deref(),
            Some("blk.0.ffn_down.weight")
        );
        assert_eq!(
            hf_to_gguf_name("lm_head.weight").as_deref(),
            Some("output.weight")
        );
        assert_eq!(
            hf_to_gguf_name("model.layers.0.input_layernorm.weight"),
            None
        );
        assert_eq!(hf_to_gguf_name("model.layers.x.mlp.up_proj.weight"), None);
        assert_eq!(id_to_title("adapter"), "Adapter");
        assert_eq!(
            id_to_title("my-lora_x v2.1 7b GGUF"),
            "My Lora_X v2.1 7b GGUF"
        );
        // Ties round away from zero; an all-zero block has d = 0 and zero codes.
        let mut v = vec![0f32; 64];
        v[0] = 127.0;
        v[1] = 2.5;
        v[2] = -2.5;
        v[3] = -0.5;
        let q = quantize_q8_0(&v);
        assert_eq!(q.len(), 68);
        assert_eq!(half::f16::from_le_bytes([q[0], q[1]]).to_f32(), 1.0);
        assert_eq!(&q[2..6], &[127u8, 3, (-3i8) as u8, (-1i8) as u8]);
        assert!(q[34..].iter().all(|&b| b == 0));
        assert_eq!(LoraOutType::Q8_0.ggml_dtype(64), GgmlDType::Q8_0);
        assert_eq!(LoraOutType::Q8_0.ggml_dtype(8), GgmlDType::F16);
    }
}
