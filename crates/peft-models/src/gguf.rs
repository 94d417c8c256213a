//! Loading a llama.cpp GGUF file as a HuggingFace Llama checkpoint.
//!
//! [`load_gguf`] reads the file with [`candle_core::quantized::gguf_file`], dequantizes every tensor to f32,
//! renames it to its HuggingFace name ([`gguf_to_hf_name`]), undoes llama.cpp's row permutation of the query
//! and key projections ([`unpermute_qk`]), builds the `config.json` of a `LlamaForCausalLM` from the `llama.*`
//! metadata and the tokenizer from the `tokenizer.ggml.*` metadata ([`Tokenizer::from_gguf_metadata`]).
//!
//! The result is what `transformers` would hold after loading the same weights: `[out, in]` matrices, HF
//! rotate-half RoPE layout, tied embeddings when the file has no `output.weight`. A truncated or corrupt
//! file, another architecture, an unknown tensor or a tensor whose shape disagrees with the metadata is an
//! error that names the file and the problem.

use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;
use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{self, Value as GgufValue};
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::quant::QuantizedWeight;
use peft::quant::gguf::GgufWeight;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::io::BufReader;
use std::path::Path;

mod header;
pub use header::{MAX_DIMS, check_header, read_content};

/// A GGUF model converted to HuggingFace form.
#[derive(Debug)]
pub struct GgufModel {
    /// The HuggingFace `config.json` of a `LlamaForCausalLM` built from the `llama.*` metadata.
    pub config: Value,
    /// Every tensor, dequantized to f32, under its HuggingFace name, in the order of `model.state_dict()`;
    /// without those kept in [`GgufModel::quantized`].
    pub tensors: IndexMap<String, Tensor>,
    /// The decoder-layer projections kept in their ggml block format (with [`load_gguf_with`]'s
    /// `keep_quantized`), under their HuggingFace names; empty otherwise.
    pub quantized: IndexMap<String, QuantizedWeight>,
    /// The tokenizer built from the `tokenizer.ggml.*` metadata.
    pub tokenizer: Tokenizer,
    /// The raw GGUF metadata, for anything the config does not carry.
    pub metadata: HashMap<String, GgufValue>,
}

/// Reads a llama-architecture GGUF file: HF config, f32 tensors under HF names, tokenizer.
pub fn load_gguf(path: impl AsRef<Path>, device: &Device) -> Result<GgufModel> {
    load_gguf_with(path, device, None, false, None)
}

/// [`load_gguf`] with the decoder-layer projections either quantized as they are read when `quantize` is
/// given ([`crate::quantize::Quantize::apply`]: each tensor dequantized to f32, then re-quantized, one at a
/// time), or, with `keep_quantized`, kept in their ggml block format ([`GgufModel::quantized`]; tensors
/// stored as F32 / F16 / BF16 are dequantized as usual). `progress` hears of each tensor read.
pub fn load_gguf_with(
    path: impl AsRef<Path>,
    device: &Device,
    quantize: Option<&crate::quantize::Quantize>,
    keep_quantized: bool,
    progress: Option<&crate::load::LoadProgress>,
) -> Result<GgufModel> {
    load_gguf_as(path, device, quantize, keep_quantized, progress, DType::F32)
}

/// [`load_gguf_with`], each dequantized tensor converted to `dtype` (f32, bf16 or f16) as it is read, so that
/// the model never exists whole in f32 (`LoadOptions::dtype`); the blocks kept quantized are unaffected.
///
/// ```no_run
/// # fn main() -> peft_models::error::Result<()> {
/// let dev = candle_core::Device::Cpu;
/// let m = peft_models::gguf::load_gguf_as("m.gguf", &dev, None, true, None, candle_core::DType::BF16)?;
/// assert_eq!(m.tensors["model.embed_tokens.weight"].dtype(), candle_core::DType::BF16);
/// # Ok(()) }
/// ```
pub fn load_gguf_as(
    path: impl AsRef<Path>,
    device: &Device,
    quantize: Option<&crate::quantize::Quantize>,
    keep_quantized: bool,
    progress: Option<&crate::load::LoadProgress>,
    dtype: DType,
) -> Result<GgufModel> {
    let path = path.as_ref();
    let bad = |message: String| ModelError::Gguf {
        path: path.to_path_buf(),
        message,
    };
    let (content, file_size) = read_content(path)?;
    let mut reader =
        BufReader::new(std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?);
    let meta = Meta {
        md: &content.metadata,
        path,
    };

    let arch = meta.string("general.architecture")?.ok_or_else(|| {
        bad("no `general.architecture` in the metadata (is this a model file?)".into())
    })?;
    if arch != "llama" {
        return Err(ModelError::Unsupported(format!(
            "{}: architecture `{arch}`; only `llama` GGUF files are supported",
            path.display()
        )));
    }

    // Map every tensor name first, so an unknown name fails before any data is read.
    let mut unknown = Vec::new();
    let mut names: Vec<(String, String)> = Vec::new();
    for name in content.tensor_infos.keys() {
        if name == "rope_freqs.weight" {
            return Err(ModelError::Unsupported(format!(
                "{}: `rope_freqs.weight` (Llama 3.1-style RoPE scaling) has no config.json equivalent here",
                path.display()
            )));
        }
        match gguf_to_hf_name(name) {
            Some(hf) => names.push((name.clone(), hf)),
            None => unknown.push(name.clone()),
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        return Err(bad(format!(
            "unknown tensor name(s) for a llama model: {}",
            unknown.join(", ")
        )));
    }
    names.sort_by_key(|(_, hf)| hf_order_key(hf));

    let shape_of = |gguf_name: &str| {
        content
            .tensor_infos
            .get(gguf_name)
            .map(|i| i.shape.dims().to_vec())
    };
    let has_output = content.tensor_infos.contains_key("output.weight");
    let cfg = LlamaDims::from_meta(&meta, &shape_of)?;
    cfg.check_tensors(&content.tensor_infos, path)?;
    let tokenizer = Tokenizer::from_gguf_metadata(&content.metadata).map_err(|e| match e {
        ModelError::Tokenizer(m) => ModelError::Tokenizer(format!("{}: {m}", path.display())),
        e => e,
    })?;
    let config = cfg.to_hf_config(&meta, has_output, &content.tensor_infos)?;

    let mut tensors = IndexMap::with_capacity(names.len());
    let mut quantized = IndexMap::new();
    let total = names.len();
    for (i, (gguf_name, hf_name)) in names.into_iter().enumerate() {
        if let Some(p) = progress {
            p.report(i + 1, total);
        }
        let info = &content.tensor_infos[&gguf_name];
        check_tensor_extent(&gguf_name, info, content.tensor_data_offset, file_size)
            .map_err(bad)?;
        let q = info
            .read(&mut reader, content.tensor_data_offset, device)
            .map_err(|e| bad(format!("tensor {gguf_name}: {e}")))?;
        let block_quantized =
            !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
        if keep_quantized
            && quantize.is_none()
            && block_quantized
            && crate::quantize::is_quantized_linear(&hf_name)
            && q.shape().rank() == 2
        {
            let shape = q.shape().dims().to_vec();
            let perm = if hf_name.contains("self_attn.q_proj.") {
                Some(cfg.heads)
            } else if hf_name.contains("self_attn.k_proj.") {
                Some(cfg.kv_heads)
            } else {
                None
            }
            .map(|h| {
                peft::quant::gguf::llama_qk_row_perm(shape[0], h).ok_or_else(|| {
                    bad(format!(
                        "tensor {gguf_name}: {shape:?} rows do not split into {h} heads"
                    ))
                })
            })
            .transpose()?;
            let data = q
                .data()
                .map_err(|e| bad(format!("tensor {gguf_name}: {e}")))?
                .into_owned();
            let w = GgufWeight::new(q.dtype(), data, shape, perm)
                .map_err(|e| bad(format!("tensor {gguf_name}: {e}")))?;
            quantized.insert(hf_name, QuantizedWeight::Gguf(w));
            continue;
        }
        let mut t = q
            .dequantize(device)
            .map_err(|e| bad(format!("tensor {gguf_name}: {e}")))?;
        if hf_name.contains("self_attn.q_proj.") {
            t = unpermute_qk(&t, cfg.heads)?;
        } else if hf_name.contains("self_attn.k_proj.") {
            t = unpermute_qk(&t, cfg.kv_heads)?;
        }
        match quantize {
            Some(q) => {
                for (n, t) in q.apply(&hf_name, t)? {
                    tensors.insert(n, t);
                }
            }
            None => {
                if t.dtype().is_float() && t.dtype() != dtype {
                    t = t.to_dtype(dtype)?;
                }
                tensors.insert(hf_name, t);
            }
        }
    }
    Ok(GgufModel {
        config,
        tensors,
        quantized,
        tokenizer,
        metadata: content.metadata,
    })
}

/// The HuggingFace name of a llama.cpp tensor (`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`),
/// or `None` when the name is not part of a llama model.
pub fn gguf_to_hf_name(name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (part, param) = rest.rsplit_once('.')?;
    let module = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" if param == "weight" => "input_layernorm",
        "ffn_norm" if param == "weight" => "post_attention_layernorm",
        _ => return None,
    };
    if param != "weight" && param != "bias" {
        return None;
    }
    Some(format!("model.layers.{layer}.{module}.{param}"))
}

/// Undoes llama.cpp's row permutation of a query or key projection (weight `[out, in]` or bias `[out]`),
/// giving the HuggingFace rotate-half layout: rows `(heads, out/heads/2, 2)` become `(heads, 2, out/heads/2)`.
pub fn unpermute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    permute_rows(w, heads, true)
}

/// llama.cpp's permutation of a HuggingFace query or key projection (the inverse of [`unpermute_qk`]), as
/// `convert_hf_to_gguf.py` applies it: rows `(heads, 2, out/heads/2)` become `(heads, out/heads/2, 2)`.
pub fn permute_qk(w: &Tensor, heads: usize) -> Result<Tensor> {
    permute_rows(w, heads, false)
}

fn permute_rows(w: &Tensor, heads: usize, undo: bool) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let out = dims.first().copied().unwrap_or(0);
    if heads == 0 || dims.is_empty() || dims.len() > 2 || out % (2 * heads) != 0 {
        return Err(ModelError::Invalid(format!(
            "cannot permute q/k rows: shape {dims:?} with {heads} heads (rows must be a multiple of 2·heads)"
        )));
    }
    let half = out / heads / 2;
    let rest: Vec<usize> = dims[1..].to_vec();
    let mut split = if undo {
        vec![heads, half, 2]
    } else {
        vec![heads, 2, half]
    };
    split.extend_from_slice(&rest);
    Ok(w.reshape(split)?
        .transpose(1, 2)?
        .reshape(dims)?
        .contiguous()?)
}

/// Sort key giving the order of `LlamaForCausalLM.state_dict()`.
fn hf_order_key(name: &str) -> (usize, usize, usize) {
    const LAYER_ORDER: [&str; 9] = [
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
        "input_layernorm",
        "post_attention_layernorm",
    ];
    let param = usize::from(name.ends_with(".bias"));
    if name == "model.embed_tokens.weight" {
        return (0, 0, 0);
    }
    if let Some(rest) = name.strip_prefix("model.layers.")
        && let Some((layer, module)) = rest.split_once('.')
        && let Ok(layer) = layer.parse::<usize>()
    {
        let m = module.rsplit_once('.').map(|(m, _)| m).unwrap_or(module);
        let pos = LAYER_ORDER.iter().position(|x| *x == m).unwrap_or(99);
        return (1 + layer, pos, param);
    }
    match name {
        "model.norm.weight" => (usize::MAX - 1, 0, 0),
        _ => (usize::MAX, 0, param),
    }
}

pub(crate) fn check_tensor_extent(
    name: &str,
    info: &gguf_file::TensorInfo,
    data_offset: u64,
    file_size: u64,
) -> std::result::Result<(), String> {
    let dims = info.shape.dims();
    let elems = dims
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("tensor {name}: shape {dims:?} overflows"))?;
    let bs = info.ggml_dtype.block_size();
    if elems % bs != 0 {
        return Err(format!(
            "tensor {name}: {elems} elements is not a multiple of the {:?} block size {bs}",
            info.ggml_dtype
        ));
    }
    let bytes = (elems / bs) as u64 * info.ggml_dtype.type_size() as u64;
    let start = data_offset.saturating_add(info.offset);
    if start.saturating_add(bytes) > file_size {
        return Err(format!(
            "tensor {name} needs {bytes} bytes at offset {start} but the file has {file_size} bytes (truncated?)"
        ));
    }
    Ok(())
}

/// Typed access to GGUF metadata with errors that name the file and key.
pub(crate) struct Meta<'a> {
    pub(crate) md: &'a HashMap<String, GgufValue>,
    pub(crate) path: &'a Path,
}

impl Meta<'_> {
    fn err(&self, key: &str, what: &str, v: &GgufValue) -> ModelError {
        ModelError::Gguf {
            path: self.path.to_path_buf(),
            message: format!(
                "metadata `{key}` should be {what}, found {:?}",
                v.value_type()
            ),
        }
    }

    fn missing(&self, key: &str) -> ModelError {
        ModelError::Gguf {
            path: self.path.to_path_buf(),
            message: format!("metadata `{key}` is missing"),
        }
    }

    pub(crate) fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(GgufValue::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.err(key, "a string", v)),
        }
    }

    pub(crate) fn uint(&self, key: &str) -> Result<Option<u64>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(v) => value_as_u64(v)
                .map(Some)
                .ok_or_else(|| self.err(key, "a non-negative integer", v)),
        }
    }

    pub(crate) fn req_uint(&self, key: &str) -> Result<usize> {
        self.uint(key)?
            .map(|v| v as usize)
            .ok_or_else(|| self.missing(key))
    }

    pub(crate) fn float(&self, key: &str) -> Result<Option<f64>> {
        match self.md.get(key) {
            None => Ok(None),
            // The shortest decimal that reads back as the same f32 (1e-5, not 9.999999747378752e-6).
            Some(GgufValue::F32(x)) => Ok(Some(format!("{x}").parse().unwrap_or(*x as f64))),
            Some(GgufValue::F64(x)) => Ok(Some(*x)),
            Some(v) => value_as_u64(v)
                .map(|u| Some(u as f64))
                .ok_or_else(|| self.err(key, "a number", v)),
        }
    }

    pub(crate) fn bool(&self, key: &str) -> Result<Option<bool>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(GgufValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.err(key, "a boolean", v)),
        }
    }

    pub(crate) fn array(&self, key: &str) -> Result<Option<&Vec<GgufValue>>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(GgufValue::Array(a)) => Ok(Some(a)),
            Some(v) => Err(self.err(key, "an array", v)),
        }
    }
}

/// Any GGUF integer value that is non-negative, as u64.
pub(crate) fn value_as_u64(v: &GgufValue) -> Option<u64> {
    match v {
        GgufValue::U8(x) => Some(*x as u64),
        GgufValue::U16(x) => Some(*x as u64),
        GgufValue::U32(x) => Some(*x as u64),
        GgufValue::U64(x) => Some(*x),
        GgufValue::I8(x) => u64::try_from(*x).ok(),
        GgufValue::I16(x) => u64::try_from(*x).ok(),
        GgufValue::I32(x) => u64::try_from(*x).ok(),
        GgufValue::I64(x) => u64::try_from(*x).ok(),
        _ => None,
    }
}

/// The dimensions of a llama model read from its metadata.
struct LlamaDims {
    hidden: usize,
    layers: usize,
    ffn: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    vocab: usize,
}

impl LlamaDims {
    fn from_meta(meta: &Meta<'_>, shape_of: &dyn Fn(&str) -> Option<Vec<usize>>) -> Result<Self> {
        let bad = |message: String| ModelError::Gguf {
            path: meta.path.to_path_buf(),
            message,
        };
        if let Some(GgufValue::Array(_)) = meta.md.get("llama.attention.head_count") {
            return Err(ModelError::Unsupported(
                "per-layer head counts (`llama.attention.head_count` is an array)".into(),
            ));
        }
        if meta.uint("llama.expert_count")?.unwrap_or(0) > 0 {
            return Err(ModelError::Unsupported(
                "mixture-of-experts llama (`llama.expert_count` > 0)".into(),
            ));
        }
        let hidden = meta.req_uint("llama.embedding_length")?;
        let layers = meta.req_uint("llama.block_count")?;
        let ffn = meta.req_uint("llama.feed_forward_length")?;
        let heads = meta.req_uint("llama.attention.head_count")?;
        let kv_heads = meta
            .uint("llama.attention.head_count_kv")?
            .map(|v| v as usize)
            .unwrap_or(heads);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(bad(format!(
                "{heads} attention heads cannot be shared by {kv_heads} key/value heads"
            )));
        }
        let head_dim = match meta.uint("llama.attention.key_length")? {
            Some(k) => k as usize,
            None if hidden % heads == 0 => hidden / heads,
            None => {
                return Err(bad(format!(
                    "hidden size {hidden} is not a multiple of {heads} heads"
                )));
            }
        };
        if let Some(v) = meta.uint("llama.attention.value_length")?
            && v as usize != head_dim
        {
            return Err(ModelError::Unsupported(format!(
                "value head size {v} differs from key head size {head_dim}"
            )));
        }
        if let Some(r) = meta.uint("llama.rope.dimension_count")?
            && r as usize != head_dim
        {
            return Err(ModelError::Unsupported(format!(
                "partial rotary embedding (rope.dimension_count {r} < head size {head_dim})"
            )));
        }
        if head_dim % 2 != 0 {
            return Err(bad(format!("odd head size {head_dim}")));
        }
        let emb = shape_of("token_embd.weight")
            .ok_or_else(|| bad("tensor token_embd.weight is missing".into()))?;
        let vocab = emb.first().copied().unwrap_or(0);
        if let Some(v) = meta.uint("llama.vocab_size")?
            && v as usize != vocab
        {
            return Err(bad(format!(
                "llama.vocab_size is {v} but token_embd.weight has {vocab} rows"
            )));
        }
        Ok(Self {
            hidden,
            layers,
            ffn,
            heads,
            kv_heads,
            head_dim,
            vocab,
        })
    }

    /// Every tensor a llama model needs is present with the shape the metadata implies (candle order).
    fn check_tensors(
        &self,
        infos: &HashMap<String, gguf_file::TensorInfo>,
        path: &Path,
    ) -> Result<()> {
        let bad = |message: String| ModelError::Gguf {
            path: path.to_path_buf(),
            message,
        };
        let (h, q, kv, f) = (
            self.hidden,
            self.heads * self.head_dim,
            self.kv_heads * self.head_dim,
            self.ffn,
        );
        let mut expected: Vec<(String, Vec<usize>, bool)> = vec![
            ("token_embd.weight".into(), vec![self.vocab, h], true),
            ("output_norm.weight".into(), vec![h], true),
            ("output.weight".into(), vec![self.vocab, h], false),
        ];
        for i in 0..self.layers {
            let b = format!("blk.{i}");
            for (n, s) in [
                ("attn_q", vec![q, h]),
                ("attn_k", vec![kv, h]),
                ("attn_v", vec![kv, h]),
                ("attn_output", vec![h, q]),
                ("ffn_gate", vec![f, h]),
                ("ffn_up", vec![f, h]),
                ("ffn_down", vec![h, f]),
            ] {
                expected.push((format!("{b}.{n}.bias"), vec![s[0]], false));
                expected.push((format!("{b}.{n}.weight"), s, true));
            }
            expected.push((format!("{b}.attn_norm.weight"), vec![h], true));
            expected.push((format!("{b}.ffn_norm.weight"), vec![h], true));
        }
        for (name, shape, required) in &expected {
            match infos.get(name) {
                None if *required => {
                    return Err(bad(format!("tensor {name} is missing")));
                }
                None => {}
                Some(info) if info.shape.dims() != shape.as_slice() => {
                    return Err(bad(format!(
                        "tensor {name} has shape {:?}, the metadata implies {shape:?}",
                        info.shape.dims()
                    )));
                }
                Some(_) => {}
            }
        }
        if infos.len()
            != expected
                .iter()
                .filter(|(n, _, _)| infos.contains_key(n))
                .count()
        {
            let mut extra: Vec<&String> = infos
                .keys()
                .filter(|k| !expected.iter().any(|(n, _, _)| n == *k))
                .collect();
            extra.sort();
            return Err(bad(format!(
                "tensors beyond the {} layers of `llama.block_count`: {}",
                self.layers,
                extra
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        Ok(())
    }

    fn to_hf_config(
        &self,
        meta: &Meta<'_>,
        has_output: bool,
        infos: &HashMap<String, gguf_file::TensorInfo>,
    ) -> Result<Value> {
        let eps = meta
            .float("llama.attention.layer_norm_rms_epsilon")?
            .ok_or_else(|| meta.missing("llama.attention.layer_norm_rms_epsilon"))?;
        let theta = meta.float("llama.rope.freq_base")?.unwrap_or(10000.0);
        let ctx = meta.uint("llama.context_length")?.unwrap_or(2048);
        let rope_scaling = rope_scaling(meta)?;
        let attention_bias = infos.contains_key("blk.0.attn_q.bias");
        let mlp_bias = infos.contains_key("blk.0.ffn_up.bias");
        let mut c = serde_json::Map::new();
        c.insert("architectures".into(), json!(["LlamaForCausalLM"]));
        c.insert("attention_bias".into(), json!(attention_bias));
        c.insert("attention_dropout".into(), json!(0.0));
        if let Some(b) = meta.uint("tokenizer.ggml.bos_token_id")? {
            c.insert("bos_token_id".into(), json!(b));
        }
        if let Some(e) = meta.uint("tokenizer.ggml.eos_token_id")? {
            c.insert("eos_token_id".into(), json!(e));
        }
        c.insert("head_dim".into(), json!(self.head_dim));
        c.insert("hidden_act".into(), json!("silu"));
        c.insert("hidden_size".into(), json!(self.hidden));
        c.insert("initializer_range".into(), json!(0.02));
        c.insert("intermediate_size".into(), json!(self.ffn));
        c.insert("max_position_embeddings".into(), json!(ctx));
        c.insert("mlp_bias".into(), json!(mlp_bias));
        c.insert("model_type".into(), json!("llama"));
        c.insert("num_attention_heads".into(), json!(self.heads));
        c.insert("num_hidden_layers".into(), json!(self.layers));
        c.insert("num_key_value_heads".into(), json!(self.kv_heads));
        if let Some(p) = meta.uint("tokenizer.ggml.padding_token_id")? {
            c.insert("pad_token_id".into(), json!(p));
        }
        c.insert("pretraining_tp".into(), json!(1));
        c.insert("rms_norm_eps".into(), json!(eps));
        c.insert("rope_scaling".into(), rope_scaling);
        c.insert("rope_theta".into(), json!(theta));
        c.insert("tie_word_embeddings".into(), json!(!has_output));
        c.insert("torch_dtype".into(), json!("float32"));
        c.insert("use_cache".into(), json!(true));
        c.insert("vocab_size".into(), json!(self.vocab));
        Ok(Value::Object(c))
    }
}

/// `rope_scaling` of the HF config from `llama.rope.scaling.*` (or the old `llama.rope.scale_linear`).
fn rope_scaling(meta: &Meta<'_>) -> Result<Value> {
    let kind = meta.string("llama.rope.scaling.type")?;
    let factor = meta.float("llama.rope.scaling.factor")?;
    let orig = meta.uint("llama.rope.scaling.original_context_length")?;
    Ok(match (kind, factor) {
        (None | Some("none"), _) => match meta.float("llama.rope.scale_linear")? {
            Some(f) if f != 1.0 => json!({"factor": f, "rope_type": "linear"}),
            _ => Value::Null,
        },
        (Some("linear"), Some(f)) => json!({"factor": f, "rope_type": "linear"}),
        (Some("yarn"), Some(f)) => {
            let mut m = json!({"factor": f, "rope_type": "yarn"});
            if let Some(o) = orig {
                m["original_max_position_embeddings"] = json!(o);
            }
            m
        }
        (Some(k), _) => {
            return Err(ModelError::Unsupported(format!(
                "{}: RoPE scaling `{k}` (with factor {factor:?})",
                meta.path.display()
            )));
        }
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::tokenizer::tests::tiny_tokenizer_metadata;
    use candle_core::quantized::{GgmlDType, QTensor};
    use peft_test_support::max_diff;
    use std::path::PathBuf;

    pub(crate) const HIDDEN: usize = 64;
    pub(crate) const LAYERS: usize = 2;
    pub(crate) const HEADS: usize = 4;
    pub(crate) const KV_HEADS: usize = 2;
    pub(crate) const HEAD_DIM: usize = HIDDEN / HEADS;
    pub(crate) const FFN: usize = 96;
    pub(crate) const VOCAB: usize = 20;

    /// Deterministic, pairwise-distinct values.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5
            })
            .collect()
    }

    /// The HF tensors of the tiny llama (with an untied `lm_head` when `with_head`).
    pub(crate) fn tiny_hf_tensors(with_head: bool) -> IndexMap<String, Tensor> {
        let mut shapes: Vec<(String, Vec<usize>)> =
            vec![("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN])];
        for l in 0..LAYERS {
            let p = format!("model.layers.{l}");
            shapes.push((
                format!("{p}.self_attn.q_proj.weight"),
                vec![HEADS * HEAD_DIM, HIDDEN],
            ));
            shapes.push((
                format!("{p}.self_attn.k_proj.weight"),
                vec![KV_HEADS * HEAD_DIM, HIDDEN],
            ));
            shapes.push((
                format!("{p}.self_attn.v_proj.weight"),
                vec![KV_HEADS * HEAD_DIM, HIDDEN],
            ));
            shapes.push((
                format!("{p}.self_attn.o_proj.weight"),
                vec![HIDDEN, HEADS * HEAD_DIM],
            ));
            shapes.push((format!("{p}.mlp.gate_proj.weight"), vec![FFN, HIDDEN]));
            shapes.push((format!("{p}.mlp.up_proj.weight"), vec![FFN, HIDDEN]));
            shapes.push((format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, FFN]));
            shapes.push((format!("{p}.input_layernorm.weight"), vec![HIDDEN]));
            shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]));
        }
        shapes.push(("model.norm.weight".into(), vec![HIDDEN]));
        if with_head {
            shapes.push(("lm_head.weight".into(), vec![VOCAB, HIDDEN]));
        }
        shapes
            .into_iter()
            .enumerate()
            .map(|(i, (n, s))| {
                let count = s.iter().product();
                let t = Tensor::from_vec(values(count, i as u64 + 1), s, &Device::Cpu).unwrap();
                (n, t)
            })
            .collect()
    }

    /// llama.cpp's name for an HF tensor (the inverse of `gguf_to_hf_name`, for the writer).
    fn hf_to_gguf(name: &str) -> String {
        let fixed = [
            ("model.embed_tokens.weight", "token_embd.weight"),
            ("model.norm.weight", "output_norm.weight"),
            ("lm_head.weight", "output.weight"),
        ];
        if let Some((_, g)) = fixed.iter().find(|(h, _)| *h == name) {
            return g.to_string();
        }
        let rest = name.strip_prefix("model.layers.").unwrap();
        let (l, rest) = rest.split_once('.').unwrap();
        let (module, param) = rest.rsplit_once('.').unwrap();
        let g = match module {
            "self_attn.q_proj" => "attn_q",
            "self_attn.k_proj" => "attn_k",
            "self_attn.v_proj" => "attn_v",
            "self_attn.o_proj" => "attn_output",
            "mlp.gate_proj" => "ffn_gate",
            "mlp.up_proj" => "ffn_up",
            "mlp.down_proj" => "ffn_down",
            "input_layernorm" => "attn_norm",
            "post_attention_layernorm" => "ffn_norm",
            m => panic!("{m}"),
        };
        format!("blk.{l}.{g}.{param}")
    }

    /// llama.cpp's permutation written out by hand on row indices: HF row `h·hd + s·hd/2 + j` (s ∈ {0, 1})
    /// goes to GGUF row `h·hd + 2j + s`.
    fn permute_by_hand(t: &Tensor, heads: usize) -> Tensor {
        let (rows, cols) = t.dims2().unwrap();
        let hd = rows / heads;
        let half = hd / 2;
        let src = t.to_vec2::<f32>().unwrap();
        let mut dst = vec![vec![0f32; cols]; rows];
        for h in 0..heads {
            for s in 0..2 {
                for j in 0..half {
                    dst[h * hd + 2 * j + s] = src[h * hd + s * half + j].clone();
                }
            }
        }
        Tensor::new(dst, &Device::Cpu).unwrap()
    }

    /// The metadata of the tiny llama.
    pub(crate) fn tiny_metadata() -> Vec<(String, GgufValue)> {
        let mut md = vec![
            (
                "general.architecture".to_string(),
                GgufValue::String("llama".into()),
            ),
            ("general.alignment".to_string(), GgufValue::U32(32)),
            (
                "llama.block_count".to_string(),
                GgufValue::U32(LAYERS as u32),
            ),
            ("llama.context_length".to_string(), GgufValue::U32(256)),
            (
                "llama.embedding_length".to_string(),
                GgufValue::U32(HIDDEN as u32),
            ),
            (
                "llama.feed_forward_length".to_string(),
                GgufValue::U32(FFN as u32),
            ),
            (
                "llama.attention.head_count".to_string(),
                GgufValue::U32(HEADS as u32),
            ),
            (
                "llama.attention.head_count_kv".to_string(),
                GgufValue::U32(KV_HEADS as u32),
            ),
            ("llama.rope.freq_base".to_string(), GgufValue::F32(100000.0)),
            (
                "llama.rope.dimension_count".to_string(),
                GgufValue::U32(HEAD_DIM as u32),
            ),
            (
                "llama.attention.layer_norm_rms_epsilon".to_string(),
                GgufValue::F32(1e-5),
            ),
            ("llama.vocab_size".to_string(), GgufValue::U32(VOCAB as u32)),
        ];
        md.extend(tiny_tokenizer_metadata());
        md
    }

    /// GGUF tensors of the tiny llama: q/k permuted by hand, layer 1's `ffn_up` in Q8_0, the rest in f32.
    pub(crate) fn tiny_gguf_tensors(hf: &IndexMap<String, Tensor>) -> Vec<(String, QTensor)> {
        hf.iter()
            .map(|(n, t)| {
                let g = hf_to_gguf(n);
                let t = if g.contains("attn_q") {
                    permute_by_hand(t, HEADS)
                } else if g.contains("attn_k") {
                    permute_by_hand(t, KV_HEADS)
                } else {
                    t.clone()
                };
                let dtype = if g == "blk.1.ffn_up.weight" {
                    GgmlDType::Q8_0
                } else {
                    GgmlDType::F32
                };
                (g, QTensor::quantize(&t, dtype).unwrap())
            })
            .collect()
    }

    pub(crate) fn write_gguf(
        path: &Path,
        md: &[(String, GgufValue)],
        tensors: &[(String, QTensor)],
    ) {
        let mut f = std::fs::File::create(path).unwrap();
        let md: Vec<(&str, &GgufValue)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
        gguf_file::write(&mut f, &md, &ts).unwrap();
    }

    /// Writes the tiny llama GGUF (tied, no `output.weight`) to `dir/tiny.gguf`; returns the path and the
    /// HF tensors it was made from.
    pub(crate) fn write_tiny_gguf(dir: &Path) -> (PathBuf, IndexMap<String, Tensor>) {
        let hf = tiny_hf_tensors(false);
        let path = dir.join("tiny.gguf");
        write_gguf(&path, &tiny_metadata(), &tiny_gguf_tensors(&hf));
        (path, hf)
    }

    #[test]
    fn gguf_projections_stay_quantized_with_the_dequantized_models_logits() {
        use crate::llama::ForwardInput;
        use crate::{LoadOptions, load_model_with};
        let dir = tempfile::tempdir().unwrap();
        let hf = tiny_hf_tensors(false);
        // q (permuted, Q4_1), k (permuted, Q8_0), layer 1's up (Q4_0; FFN 96 = 3 blocks of 32); the rest f32.
        let tensors: Vec<(String, QTensor)> = tiny_gguf_tensors(&hf)
            .into_iter()
            .map(|(g, q)| {
                let dt = match g.as_str() {
                    "blk.0.attn_q.weight" | "blk.1.attn_q.weight" => GgmlDType::Q4_1,
                    "blk.0.attn_k.weight" | "blk.1.attn_k.weight" => GgmlDType::Q8_0,
                    "blk.1.ffn_up.weight" => GgmlDType::Q4_0,
                    _ => return (g, q),
                };
                let t = q.dequantize(&Device::Cpu).unwrap();
                (g, QTensor::quantize(&t, dt).unwrap())
            })
            .collect();
        let path = dir.path().join("q.gguf");
        write_gguf(&path, &tiny_metadata(), &tensors);
        let kept = load_model_with(&path, &Device::Cpu, &LoadOptions::default()).unwrap();
        let dense = load_model_with(
            &path,
            &Device::Cpu,
            &LoadOptions {
                dequantize_gguf: true,
                ..Default::default()
            },
        )
        .unwrap();
        let quantized: Vec<&str> = [
            "model.layers.0.self_attn.q_proj",
            "model.layers.1.self_attn.k_proj",
            "model.layers.1.mlp.up_proj",
        ]
        .into_iter()
        .filter(|s| kept.model.slot(s).unwrap().base().quantized().is_some())
        .collect();
        assert_eq!(quantized.len(), 3, "{quantized:?}");
        assert!(
            kept.model
                .slot("model.layers.0.mlp.up_proj")
                .unwrap()
                .base()
                .quantized()
                .is_none()
        );
        assert!(
            dense
                .model
                .slot("model.layers.0.self_attn.q_proj")
                .unwrap()
                .base()
                .quantized()
                .is_none()
        );
        let summary = crate::quantize::summary(&kept.model).unwrap();
        assert!(
            summary.starts_with("5 of 15 Linear layers quantized (gguf Q4_1)"),
            "{summary}"
        );
        let ids = Tensor::new(&[[1u32, 5, 9, 3, 12, 7]], &Device::Cpu).unwrap();
        let ctx = peft::ForwardCtx::eval();
        let a = kept.model.forward(ForwardInput::ids(&ids), &ctx).unwrap();
        let b = dense.model.forward(ForwardInput::ids(&ids), &ctx).unwrap();
        assert!(max_diff(&a, &b) < 1e-5, "{}", max_diff(&a, &b));
    }

    #[test]
    fn synthetic_gguf_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let (path, hf) = write_tiny_gguf(dir.path());
        let m = load_gguf(&path, &Device::Cpu).unwrap();
        let names: Vec<&String> = m.tensors.keys().collect();
        let expected: Vec<&String> = hf.keys().collect();
        assert_eq!(names, expected, "HF names in state_dict order");
        for (name, want) in &hf {
            let got = &m.tensors[name];
            assert_eq!(got.dims(), want.dims(), "{name}");
            assert_eq!(got.dtype(), candle_core::DType::F32);
            let d = max_diff(got, want);
            if name == "model.layers.1.mlp.up_proj.weight" {
                assert!(d < 0.01, "{name}: Q8_0 error {d}");
                assert!(d > 0.0, "{name}: Q8_0 should not be exact");
            } else {
                assert_eq!(d, 0.0, "{name}");
            }
        }
        let c = &m.config;
        assert_eq!(c["architectures"], json!(["LlamaForCausalLM"]));
        assert_eq!(c["model_type"], json!("llama"));
        assert_eq!(c["hidden_size"], json!(HIDDEN));
        assert_eq!(c["intermediate_size"], json!(FFN));
        assert_eq!(c["num_hidden_layers"], json!(LAYERS));
        assert_eq!(c["num_attention_heads"], json!(HEADS));
        assert_eq!(c["num_key_value_heads"], json!(KV_HEADS));
        assert_eq!(c["head_dim"], json!(HEAD_DIM));
        assert_eq!(c["rms_norm_eps"], json!(1e-5));
        assert_eq!(c["rope_theta"], json!(100000.0));
        assert_eq!(c["rope_scaling"], Value::Null);
        assert_eq!(c["vocab_size"], json!(VOCAB));
        assert_eq!(c["max_position_embeddings"], json!(256));
        assert_eq!(c["tie_word_embeddings"], json!(true));
        assert_eq!(c["bos_token_id"], json!(1));
        assert_eq!(c["eos_token_id"], json!(2));
        assert_eq!(c["pad_token_id"], json!(2));
        assert_eq!(c["attention_bias"], json!(false));
        assert_eq!(
            m.tokenizer.encode("abc ab 12\n", true).unwrap(),
            vec![8, 10, 6, 11, 12, 14]
        );
        assert_eq!(
            m.tokenizer.tokenizer_config()["model_max_length"],
            json!(256)
        );
    }

    #[test]
    fn synthetic_gguf_with_output_is_untied() {
        let dir = tempfile::tempdir().unwrap();
        let hf = tiny_hf_tensors(true);
        let path = dir.path().join("untied.gguf");
        write_gguf(&path, &tiny_metadata(), &tiny_gguf_tensors(&hf));
        let m = load_gguf(&path, &Device::Cpu).unwrap();
        assert_eq!(m.config["tie_word_embeddings"], json!(false));
        assert_eq!(m.tensors.keys().last().unwrap(), "lm_head.weight");
        assert_eq!(
            max_diff(&m.tensors["lm_head.weight"], &hf["lm_head.weight"]),
            0.0
        );
    }

    #[test]
    fn qk_permutation_matches_llama_cpp() {
        let w = Tensor::from_vec(values(24 * 5, 7), (24, 5), &Device::Cpu).unwrap();
        for heads in [1, 2, 3, 4, 6, 12] {
            let p = permute_qk(&w, heads).unwrap();
            assert_eq!(
                max_diff(&p, &permute_by_hand(&w, heads)),
                0.0,
                "{heads} heads"
            );
            assert_eq!(max_diff(&unpermute_qk(&p, heads).unwrap(), &w), 0.0);
        }
        // A bias permutes like a one-column weight.
        let b = Tensor::from_vec(values(24, 8), 24, &Device::Cpu).unwrap();
        let pb = permute_qk(&b, 3).unwrap();
        let by_hand = permute_by_hand(&b.unsqueeze(1).unwrap(), 3)
            .squeeze(1)
            .unwrap();
        assert_eq!(max_diff(&pb, &by_hand), 0.0);
        for heads in [5, 0] {
            let e = unpermute_qk(&w, heads).unwrap_err();
            assert!(
                matches!(&e, ModelError::Invalid(m) if m.contains(&format!("shape [24, 5] with {heads} heads"))),
                "{e}"
            );
        }
    }

    #[test]
    fn hf_names() {
        for (g, h) in [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.12.attn_q.weight",
                "model.layers.12.self_attn.q_proj.weight",
            ),
            ("blk.0.attn_k.bias", "model.layers.0.self_attn.k_proj.bias"),
            (
                "blk.3.attn_output.weight",
                "model.layers.3.self_attn.o_proj.weight",
            ),
            (
                "blk.3.ffn_down.weight",
                "model.layers.3.mlp.down_proj.weight",
            ),
            (
                "blk.3.attn_norm.weight",
                "model.layers.3.input_layernorm.weight",
            ),
            (
                "blk.3.ffn_norm.weight",
                "model.layers.3.post_attention_layernorm.weight",
            ),
        ] {
            assert_eq!(gguf_to_hf_name(g).as_deref(), Some(h));
        }
        for g in [
            "blk.x.attn_q.weight",
            "blk.0.attn_norm.bias",
            "blk.0.foo.weight",
            "rope_freqs.weight",
            "blk.0.attn_q.scale",
        ] {
            assert_eq!(gguf_to_hf_name(g), None, "{g}");
        }
    }

    fn gguf_err(md: &[(String, GgufValue)], tensors: &[(String, QTensor)]) -> ModelError {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.gguf");
        write_gguf(&path, md, tensors);
        load_gguf(&path, &Device::Cpu).unwrap_err()
    }

    #[test]
    fn truncated_or_corrupt_gguf_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _) = write_tiny_gguf(dir.path());
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.gguf");
        let n = bytes.len();
        for len in [0, 3, 7, 20, 100, 1000, n / 2, n - 100, n - 1] {
            std::fs::write(&cut, &bytes[..len]).unwrap();
            let err = load_gguf(&cut, &Device::Cpu).unwrap_err();
            assert!(
                matches!(err, ModelError::Gguf { .. }),
                "cut at {len}: {err}"
            );
        }
        // Wrong magic.
        let mut b = bytes.clone();
        b[0] = b'X';
        std::fs::write(&cut, &b).unwrap();
        let err = load_gguf(&cut, &Device::Cpu).unwrap_err();
        assert!(matches!(err, ModelError::Gguf { .. }), "{err}");
        // A huge string length in the first metadata key (after magic, version, two u64 counts).
        let mut b = bytes.clone();
        b[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&cut, &b).unwrap();
        assert!(matches!(
            load_gguf(&cut, &Device::Cpu).unwrap_err(),
            ModelError::Gguf { .. }
        ));
        // Garbage everywhere after the header.
        let mut b = bytes.clone();
        for (i, x) in b.iter_mut().enumerate().skip(24) {
            *x = (i * 7 % 251) as u8;
        }
        std::fs::write(&cut, &b).unwrap();
        let err = load_gguf(&cut, &Device::Cpu).unwrap_err();
        assert!(
            matches!(&err, ModelError::Gguf { message, .. } if message.contains("a string of")),
            "{err}"
        );
        // Not a file at all.
        let err = load_gguf(dir.path().join("absent.gguf"), &Device::Cpu).unwrap_err();
        assert!(matches!(err, ModelError::Io { .. }), "{err}");
    }

    #[test]
    fn non_llama_unknown_or_missing_tensors_are_errors() {
        let hf = tiny_hf_tensors(false);
        let tensors = tiny_gguf_tensors(&hf);
        let mut md = tiny_metadata();
        md[0].1 = GgufValue::String("gpt2".into());
        let err = gguf_err(&md, &tensors);
        assert!(
            matches!(err, ModelError::Unsupported(_)) && err.to_string().contains("`gpt2`"),
            "{err}"
        );

        let mut extra = tiny_gguf_tensors(&hf);
        let t = Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap();
        extra.push((
            "blk.0.mystery.weight".into(),
            QTensor::quantize(&t, GgmlDType::F32).unwrap(),
        ));
        let err = gguf_err(&tiny_metadata(), &extra);
        assert!(
            err.to_string()
                .contains("unknown tensor name(s) for a llama model: blk.0.mystery.weight"),
            "{err}"
        );

        let mut beyond = tiny_gguf_tensors(&hf);
        let t = Tensor::zeros(HIDDEN, candle_core::DType::F32, &Device::Cpu).unwrap();
        beyond.push((
            "blk.2.attn_norm.weight".into(),
            QTensor::quantize(&t, GgmlDType::F32).unwrap(),
        ));
        let err = gguf_err(&tiny_metadata(), &beyond);
        assert!(err.to_string().contains("blk.2.attn_norm.weight"), "{err}");

        let missing: Vec<_> = tiny_gguf_tensors(&hf)
            .into_iter()
            .filter(|(n, _)| n != "blk.1.attn_v.weight")
            .collect();
        let err = gguf_err(&tiny_metadata(), &missing);
        assert!(
            err.to_string()
                .contains("tensor blk.1.attn_v.weight is missing"),
            "{err}"
        );

        let mut md = tiny_metadata();
        md.retain(|(k, _)| k != "llama.feed_forward_length");
        let err = gguf_err(&md, &tensors);
        assert!(
            err.to_string()
                .contains("`llama.feed_forward_length` is missing"),
            "{err}"
        );

        let mut md = tiny_metadata();
        for (k, v) in md.iter_mut() {
            if k == "llama.attention.head_count_kv" {
                *v = GgufValue::U32(1);
            }
        }
        let err = gguf_err(&md, &tensors);
        assert!(
            err.to_string()
                .contains("blk.0.attn_k.weight has shape [32, 64], the metadata implies [16, 64]"),
            "{err}"
        );

        let mut md = tiny_metadata();
        for (k, v) in md.iter_mut() {
            if k == "llama.block_count" {
                *v = GgufValue::String("two".into());
            }
        }
        let err = gguf_err(&md, &tensors);
        assert!(
            err.to_string()
                .contains("`llama.block_count` should be a non-negative integer"),
            "{err}"
        );
    }

    /// The real SmolLM2-135M-Instruct GGUF (`scripts/fetch_smollm2.sh`, or `PEFT_SMOLLM2_GGUF`); a panic naming
    /// the path when it is absent, so that an opted-in test never passes without it.
    pub(crate) fn smollm2_path() -> PathBuf {
        let p = std::env::var_os("PEFT_SMOLLM2_GGUF")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../.cache/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
            });
        assert!(
            p.is_file(),
            "{} is absent: run bash scripts/fetch_smollm2.sh (or set PEFT_SMOLLM2_GGUF)",
            p.display()
        );
        p
    }

    #[test]
    #[ignore = "needs the SmolLM2 GGUF: bash scripts/fetch_smollm2.sh"]
    fn smollm2_gguf_config_tensors_and_tokenizer() {
        let path = smollm2_path();
        let t0 = std::time::Instant::now();
        let m = load_gguf(&path, &Device::Cpu).unwrap();
        eprintln!(
            "load_gguf(SmolLM2-135M-Instruct.Q4_1.gguf): {:.2?}",
            t0.elapsed()
        );
        let c = &m.config;
        for (k, v) in [
            ("hidden_size", json!(576)),
            ("intermediate_size", json!(1536)),
            ("num_hidden_layers", json!(30)),
            ("num_attention_heads", json!(9)),
            ("num_key_value_heads", json!(3)),
            ("head_dim", json!(64)),
            ("rms_norm_eps", json!(1e-5)),
            ("rope_theta", json!(100000.0)),
            ("vocab_size", json!(49152)),
            ("max_position_embeddings", json!(8192)),
            ("tie_word_embeddings", json!(true)),
            ("bos_token_id", json!(1)),
            ("eos_token_id", json!(2)),
            ("model_type", json!("llama")),
        ] {
            assert_eq!(c[k], v, "{k}");
        }
        assert_eq!(m.tensors.len(), 2 + 30 * 9);
        assert!(!m.tensors.contains_key("lm_head.weight"));
        let params: usize = m.tensors.values().map(|t| t.elem_count()).sum();
        assert_eq!(params, 134_515_008);
        assert_eq!(m.tensors["model.embed_tokens.weight"].dims(), &[49152, 576]);
        assert_eq!(
            m.tensors["model.layers.29.self_attn.k_proj.weight"].dims(),
            &[192, 576]
        );
        let tok = &m.tokenizer;
        assert_eq!(
            tok.encode("The capital of France is Paris.", true).unwrap(),
            vec![504, 3575, 282, 4649, 314, 7042, 30]
        );
        assert_eq!(tok.special_tokens().len(), 17);
        assert_eq!(tok.bos_token(), Some("<|im_start|>"));
        assert_eq!(tok.eos_token(), Some("<|im_end|>"));
        assert_eq!(
            tok.chat_template(),
            Some(crate::tokenizer::tests::SMOL_TEMPLATE)
        );
    }
}
