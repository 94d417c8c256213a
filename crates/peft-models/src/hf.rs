//! Loading a HuggingFace model directory: `config.json`, `model.safetensors` or a sharded
//! `model.safetensors.index.json`, and the tokenizer files when present.

use crate::error::{ModelError, Result};
use crate::quantize::Quantize;
use crate::tokenizer::Tokenizer;
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::io::BaseModel;
use serde_json::Value;
use std::path::Path;

/// A HuggingFace model directory, loaded.
#[derive(Debug)]
pub struct HfModel {
    /// `config.json`.
    pub config: Value,
    /// Every tensor of the weight files, floating-point ones converted to the requested dtype, sorted by
    /// name with numbers compared as numbers (`layers.2` before `layers.10`; safetensors keeps no order).
    pub tensors: IndexMap<String, Tensor>,
    /// The tokenizer, when the directory has a `tokenizer.json`.
    pub tokenizer: Option<Tokenizer>,
}

/// Loads `dir/config.json`, every weight of `dir/model.safetensors` (or of the shards listed in
/// `dir/model.safetensors.index.json`) converted to `dtype` on `device`, and the tokenizer
/// ([`load_hf_tokenizer`]).
pub fn load_hf_dir(dir: impl AsRef<Path>, dtype: DType, device: &Device) -> Result<HfModel> {
    load_hf_dir_with(dir, dtype, device, None, None)
}

/// [`load_hf_dir`], quantizing the decoder-layer projections as they are read when `quantize` is given
/// ([`Quantize::apply`]). The tensors of a checkpoint saved quantized (bitsandbytes 4-bit: the packed weight
/// and its quant state) are kept as stored, whatever `dtype`. `progress` hears of each tensor read.
pub fn load_hf_dir_with(
    dir: impl AsRef<Path>,
    dtype: DType,
    device: &Device,
    quantize: Option<&Quantize>,
    progress: Option<&crate::load::LoadProgress>,
) -> Result<HfModel> {
    let dir = dir.as_ref();
    if !dir.is_dir() {
        return Err(ModelError::Invalid(format!(
            "{}: not a model directory",
            dir.display()
        )));
    }
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(ModelError::Invalid(format!(
            "{}: no config.json in this model directory",
            dir.display()
        )));
    }
    let model = BaseModel::open(dir)?;
    let config = model.config.clone().unwrap_or_default();
    if !config.is_object() {
        return Err(ModelError::json(
            config_path.display(),
            "config.json is not an object",
        ));
    }
    let stored_quantized = crate::quantize::checkpoint_quantization(&config)?;
    if let (Some(q), Some(stored)) = (quantize, &stored_quantized) {
        return Err(ModelError::Invalid(format!(
            "{}: the checkpoint is already quantized ({stored}); drop --quantize {}",
            dir.display(),
            q.describe()
        )));
    }
    let all_names: std::collections::HashSet<String> =
        model.shards.iter().flat_map(|(_, s)| s.names()).collect();
    let quantized_keys: std::collections::HashSet<String> = all_names
        .iter()
        .filter_map(|n| peft::quant::stored_module(n))
        .filter_map(|m| peft::quant::stored_keys(m, |k| all_names.contains(k)))
        .flatten()
        .collect();
    let mut tensors = IndexMap::new();
    let total = all_names.len();
    let mut done = 0;
    for (_, shard) in &model.shards {
        for name in shard.names() {
            done += 1;
            if let Some(p) = progress {
                p.report(done, total);
            }
            let t = shard.load(&name, device)?;
            // A bitsandbytes weight (packed 4-bit in any storage dtype, or int8 read as its u8 bytes) and its
            // state tensors stay as stored.
            let keep = quantized_keys.contains(&name);
            let t = if keep || t.dtype() == dtype || !t.dtype().is_float() {
                t
            } else {
                t.to_dtype(dtype)?
            };
            match quantize {
                Some(q) => {
                    for (n, t) in q.apply(&name, t)? {
                        tensors.insert(n, t);
                    }
                }
                None => {
                    tensors.insert(name, t);
                }
            }
        }
    }
    tensors.sort_by(|a, _, b, _| natural_cmp(a, b));
    if let Some(map) = model
        .index
        .as_ref()
        .and_then(|i| i.get("weight_map"))
        .and_then(Value::as_object)
    {
        let mut missing: Vec<&String> = map.keys().filter(|k| !tensors.contains_key(*k)).collect();
        if !missing.is_empty() {
            missing.sort();
            return Err(ModelError::Invalid(format!(
                "{}: model.safetensors.index.json lists tensors that no shard holds: {}",
                dir.display(),
                missing
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let tokenizer = load_hf_tokenizer(dir, Some(&config))?;
    Ok(HfModel {
        config,
        tensors,
        tokenizer,
    })
}

/// Loads `dir/tokenizer.json` with `dir/tokenizer_config.json` (special tokens, chat template) and
/// `dir/chat_template.jinja` (where newer `transformers` save the template) when present; `None` without a
/// `tokenizer.json`. Special tokens missing from `tokenizer_config.json` are taken from the ids in `config`
/// (`bos_token_id`, `eos_token_id`, `pad_token_id`).
pub fn load_hf_tokenizer(
    dir: impl AsRef<Path>,
    config: Option<&Value>,
) -> Result<Option<Tokenizer>> {
    let dir = dir.as_ref();
    let tj = dir.join("tokenizer.json");
    if !tj.is_file() {
        return Ok(None);
    }
    let tc = dir.join("tokenizer_config.json");
    let mut tok = Tokenizer::from_file(&tj, tc.is_file().then_some(tc.as_path()))?;
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let t = std::fs::read_to_string(&jinja).map_err(|e| ModelError::io(&jinja, e))?;
        tok.set_chat_template(Some(t));
    }
    if let Some(cfg) = config {
        let id_token = |key: &str| -> Option<String> {
            let v = cfg.get(key)?;
            let id = v
                .as_u64()
                .or_else(|| v.as_array().and_then(|a| a.first()).and_then(Value::as_u64))?;
            tok.id_to_token(id as u32)
        };
        let (bos, eos, pad) = (
            id_token("bos_token_id"),
            id_token("eos_token_id"),
            id_token("pad_token_id"),
        );
        if tok.bos_token().is_none() {
            tok.set_bos_token(bos.as_deref())?;
        }
        if tok.eos_token().is_none() {
            tok.set_eos_token(eos.as_deref())?;
        }
        if tok.pad_token().is_none() {
            tok.set_pad_token(pad.as_deref())?;
        }
    }
    Ok(Some(tok))
}

/// Compares names piecewise, digit runs as numbers: `layers.2.x` < `layers.10.x`.
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn pieces(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (pa, pb) = (pieces(a), pieces(b));
    for ((da, xa), (db, xb)) in pa.iter().zip(&pb) {
        let o = if *da && *db {
            let (ta, tb) = (xa.trim_start_matches('0'), xb.trim_start_matches('0'));
            ta.len()
                .cmp(&tb.len())
                .then_with(|| ta.cmp(tb))
                .then_with(|| xa.len().cmp(&xb.len()))
        } else {
            xa.cmp(xb)
        };
        if o.is_ne() {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
}

#[cfg(test)]
mod tests {
    use super::natural_cmp;

    #[test]
    fn natural_order_of_names() {
        let mut v = vec![
            "model.layers.10.mlp.weight",
            "lm_head.weight",
            "model.layers.2.mlp.weight",
            "model.layers.2.attn.weight",
            "model.embed_tokens.weight",
            "model.layers.02.x",
            "",
        ];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            [
                "",
                "lm_head.weight",
                "model.embed_tokens.weight",
                "model.layers.2.attn.weight",
                "model.layers.2.mlp.weight",
                "model.layers.02.x",
                "model.layers.10.mlp.weight",
            ]
        );
    }
}
