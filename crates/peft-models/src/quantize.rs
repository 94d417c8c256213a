//! Quantizing a full-precision model's Linear weights while it loads (`peft train --quantize nf4`), and
//! reading the `quantization_config` of checkpoints that transformers saved quantized.
//!
//! Which weights: every projection of the decoder layers (`model.layers.N.self_attn.{q,k,v,o}_proj.weight`,
//! `model.layers.N.mlp.{gate,up,down}_proj.weight`), as transformers' bitsandbytes integration converts every
//! `nn.Linear` but the output layer; embeddings, norms and `lm_head` keep their dtype. Each weight is
//! quantized as soon as it is read, so the full-precision model is never in memory at once; in memory it
//! is held as the tensors a bitsandbytes checkpoint stores (`…weight` packed u8, `…weight.absmax`, …), which
//! [`crate::llama::LlamaForCausalLM::from_tensors`] turns into quantized base layers.

use crate::error::{ModelError, Result};
use candle_core::{DType, Tensor};
use indexmap::IndexMap;
use peft::quant::QuantizedWeight;
use peft::quant::awq::AwqWeight;
use peft::quant::bnb4::{Bnb4Options, Bnb4Type, Bnb4Weight};
use peft::quant::bnb8::Bnb8Weight;
use peft::quant::gptq::{GptqFormat, GptqWeight};
use serde_json::Value;

/// How to quantize a full-precision model while loading it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Quantize {
    /// bitsandbytes 4-bit (NF4 or FP4, optionally double-quantized), blocksize 64 as transformers uses.
    Bnb4(Bnb4Options),
    /// bitsandbytes 8-bit (row-wise int8, LLM.int8's weights), computed on the dequantized weight.
    Bnb8,
}

impl Quantize {
    /// From the CLI's `--quantize nf4|fp4` and `--double-quant`.
    ///
    /// ```
    /// use peft_models::quantize::Quantize;
    /// let q = Quantize::parse("nf4", true)?;
    /// assert_eq!(q.describe(), "bnb nf4, double quant");
    /// assert!(Quantize::parse("int3", false).is_err());
    /// # Ok::<(), peft_models::error::ModelError>(())
    /// ```
    pub fn parse(kind: &str, double_quant: bool) -> Result<Self> {
        let quant_type = match kind {
            "nf4" => Bnb4Type::Nf4,
            "fp4" => Bnb4Type::Fp4,
            "int8" if double_quant => {
                return Err(ModelError::Invalid(
                    "--double-quant applies to nf4 and fp4, not int8".into(),
                ));
            }
            "int8" => return Ok(Quantize::Bnb8),
            other => {
                return Err(ModelError::Invalid(format!(
                    "unknown --quantize {other:?} (nf4, fp4 or int8)"
                )));
            }
        };
        Ok(Quantize::Bnb4(Bnb4Options {
            quant_type,
            double_quant,
            ..Default::default()
        }))
    }

    /// `bnb nf4` / `bnb fp4, double quant`.
    pub fn describe(&self) -> String {
        match self {
            Quantize::Bnb4(o) => format!(
                "bnb {}{}",
                o.quant_type.as_str(),
                if o.double_quant { ", double quant" } else { "" }
            ),
            Quantize::Bnb8 => "bnb int8".into(),
        }
    }

    /// The tensors to keep for `name`: the weight quantized (bitsandbytes' state-dict tensors) when it is a
    /// decoder-layer projection, else the tensor itself.
    pub fn apply(&self, name: &str, t: Tensor) -> Result<Vec<(String, Tensor)>> {
        if !is_quantized_linear(name) || t.rank() != 2 {
            return Ok(vec![(name.to_string(), t)]);
        }
        match self {
            Quantize::Bnb4(opts) => {
                let dtype = match t.dtype() {
                    d @ (DType::F32 | DType::F16 | DType::BF16) => d,
                    _ => DType::F32,
                };
                let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let q = Bnb4Weight::quantize(&values, t.dims(), dtype, *opts)?;
                Ok(q.state_dict(name, t.device())?)
            }
            Quantize::Bnb8 => {
                let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let q = Bnb8Weight::quantize(&values, t.dims())?;
                let module = name.strip_suffix(".weight").unwrap_or(name);
                Ok(q.state_dict(module, t.device())?)
            }
        }
    }
}

/// Whether `name` is a weight transformers' bitsandbytes integration quantizes in a Llama-family model.
pub fn is_quantized_linear(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("model.layers.") else {
        return false;
    };
    let Some((layer, rest)) = rest.split_once('.') else {
        return false;
    };
    layer.parse::<usize>().is_ok()
        && matches!(
            rest,
            "self_attn.q_proj.weight"
                | "self_attn.k_proj.weight"
                | "self_attn.v_proj.weight"
                | "self_attn.o_proj.weight"
                | "mlp.gate_proj.weight"
                | "mlp.up_proj.weight"
                | "mlp.down_proj.weight"
        )
}

/// What a checkpoint's `config.json` says of its quantization: `None` for a full-precision model,
/// `Some(description)` for the quantizations whose checkpoints load (`bnb nf4, double quant`, `bnb int8`,
/// `gptq 4-bit, group size 128, desc_act`, `awq 4-bit gemm, group size 128`), and an error naming the field
/// for every other method or setting:
///
/// - bitsandbytes 4-bit and 8-bit;
/// - GPTQ with `checkpoint_format` (or `format`) `"gptq"` (the default) and `bits` 2, 3, 4 or 8. `gptq_v2`
///   checkpoints are refused: their zero points are stored without the v1 offset and the loader reads the
///   packed tensors alone (the codec, [`peft::quant::gptq::GptqFormat::V2`], reads them);
/// - AWQ with `version` (or `format`) `"gemm"`, `bits` 4 and `zero_point` true.
pub fn checkpoint_quantization(config: &Value) -> Result<Option<String>> {
    let Some(q) = config.get("quantization_config").filter(|q| !q.is_null()) else {
        return Ok(None);
    };
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
    let flag = |k: &str| q.get(k).and_then(Value::as_bool).unwrap_or(false);
    let unsupported = |field: &str, value: &Value, why: &str| {
        Err(ModelError::Unsupported(format!(
            "config.json: quantization_config.{field} {value} is not supported ({why})"
        )))
    };
    let group = |q: &Value| match q.get("group_size").and_then(Value::as_i64) {
        Some(-1) => "one group".to_string(),
        Some(g) => format!("group size {g}"),
        None => "group size unknown".to_string(),
    };
    match method {
        "bitsandbytes" if flag("load_in_4bit") || flag("_load_in_4bit") => {
            let qt = q
                .get("bnb_4bit_quant_type")
                .and_then(Value::as_str)
                .unwrap_or("fp4");
            let dq = flag("bnb_4bit_use_double_quant");
            Ok(Some(format!(
                "bnb {qt}{}",
                if dq { ", double quant" } else { "" }
            )))
        }
        "bitsandbytes" if flag("load_in_8bit") || flag("_load_in_8bit") => {
            Ok(Some("bnb int8".into()))
        }
        "gptq" => {
            let (field, format) = match (q.get("checkpoint_format"), q.get("format")) {
                (Some(v), _) if !v.is_null() => ("checkpoint_format", v.clone()),
                (_, Some(v)) if !v.is_null() => ("format", v.clone()),
                _ => ("checkpoint_format", Value::from("gptq")),
            };
            let format_name = match format.as_str().map(str::to_ascii_lowercase).as_deref() {
                Some("gptq") => "",
                Some("gptq_v2") => ", gptq_v2",
                _ => return unsupported(field, &format, "\"gptq\" (v1) and \"gptq_v2\" load"),
            };
            let bits = q.get("bits").cloned().unwrap_or(Value::Null);
            if !bits
                .as_u64()
                .is_some_and(|b| peft::quant::gptq::GPTQ_BITS.contains(&(b as u32)))
            {
                return unsupported("bits", &bits, "GPTQ loads 2, 3, 4 or 8 bits");
            }
            Ok(Some(format!(
                "gptq {bits}-bit, {}{}{format_name}",
                group(q),
                if flag("desc_act") { ", desc_act" } else { "" }
            )))
        }
        "awq" => {
            let (field, version) = match (q.get("version"), q.get("format")) {
                (Some(v), _) if !v.is_null() => ("version", v.clone()),
                (_, Some(v)) if !v.is_null() => ("format", v.clone()),
                _ => ("version", Value::from("gemm")),
            };
            if version.as_str().map(str::to_ascii_lowercase).as_deref() != Some("gemm") {
                return unsupported(field, &version, "only the \"gemm\" layout loads");
            }
            let bits = q.get("bits").cloned().unwrap_or(Value::Null);
            if bits.as_u64() != Some(4) {
                return unsupported("bits", &bits, "AWQ gemm is 4-bit");
            }
            if let Some(z) = q.get("zero_point")
                && z.as_bool() != Some(true)
            {
                return unsupported("zero_point", z, "AWQ gemm loads with zero points");
            }
            Ok(Some(format!("awq 4-bit gemm, {}", group(q))))
        }
        other => Err(ModelError::Unsupported(format!(
            "config.json: quantization_config.quant_method {other:?} is not supported yet (bitsandbytes 4-bit and \
             8-bit, GPTQ and AWQ gemm checkpoints load; full-precision models can be quantized with --quantize \
             nf4|fp4|int8)"
        ))),
    }
}

/// The GPTQ and AWQ Linear weights among a checkpoint's `tensors`, read in the format `config.json`'s
/// `quantization_config` states (GPTQ `checkpoint_format` `gptq` or `gptq_v2`), under their weight names
/// (`model.layers.0.self_attn.q_proj.weight`), their tensors removed from `tensors`: what
/// [`crate::llama::LlamaForCausalLM::from_parts`] takes as its `quantized` map ([`crate::load_model`] calls it
/// for model directories; the builder alone would read packed tensors in the default `gptq` (v1) format).
/// Errors name the tensor or the field.
pub fn checkpoint_weights(
    config: &Value,
    tensors: &mut IndexMap<String, Tensor>,
) -> Result<IndexMap<String, QuantizedWeight>> {
    let q = config.get("quantization_config").unwrap_or(&Value::Null);
    let is_gptq = q.get("quant_method").and_then(Value::as_str) == Some("gptq");
    let format = match ["checkpoint_format", "format"]
        .iter()
        .find_map(|k| q.get(*k).and_then(Value::as_str))
        .filter(|_| is_gptq)
    {
        None => GptqFormat::V1,
        Some(f) => GptqFormat::parse(f).ok_or_else(|| {
            ModelError::Unsupported(format!(
                "config.json: quantization_config.checkpoint_format {f:?} (gptq or gptq_v2)"
            ))
        })?,
    };
    let modules: Vec<String> = tensors
        .keys()
        .filter_map(|k| k.strip_suffix(".qweight"))
        .map(str::to_string)
        .collect();
    let mut out = IndexMap::new();
    for m in modules {
        let w = if tensors.contains_key(&format!("{m}.g_idx")) {
            QuantizedWeight::Gptq(GptqWeight::from_state_dict(&m, tensors, format)?)
        } else {
            QuantizedWeight::Awq(AwqWeight::from_state_dict(&m, tensors)?)
        };
        if let Some(keys) = peft::quant::stored_keys(&m, |k| tensors.contains_key(k)) {
            for k in keys {
                tensors.shift_remove(&k);
            }
        }
        out.insert(format!("{m}.weight"), w);
    }
    Ok(out)
}

/// What is quantized in `model` and the memory its quantized weights take, or `None` when nothing is:
/// `14 of 15 Linear layers quantized (bnb nf4 (blocksize 64, double quant)): 0.25 MiB instead of 1.75 MiB in f32`.
pub fn summary(model: &crate::llama::LlamaForCausalLM) -> Option<String> {
    use peft::host::AdapterHost;
    let slots = model.slots();
    let linears = slots
        .iter()
        .filter(|s| matches!(s.base().kind(), peft::BaseKind::Linear))
        .count();
    let quantized: Vec<_> = slots.iter().filter_map(|s| s.base().quantized()).collect();
    let first = quantized.first()?;
    let bytes: usize = quantized.iter().map(|q| q.nbytes()).sum();
    let f32_bytes: usize = quantized
        .iter()
        .map(|q| 4 * q.shape().iter().product::<usize>())
        .sum();
    let mib = |b: usize| b as f64 / (1024.0 * 1024.0);
    Some(format!(
        "{} of {linears} Linear layers quantized ({}): {:.2} MiB instead of {:.2} MiB in f32",
        quantized.len(),
        first.describe(),
        mib(bytes),
        mib(f32_bytes)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn only_decoder_projections_are_quantized() {
        assert!(is_quantized_linear(
            "model.layers.3.self_attn.q_proj.weight"
        ));
        assert!(is_quantized_linear("model.layers.10.mlp.down_proj.weight"));
        assert!(!is_quantized_linear("model.layers.3.self_attn.q_proj.bias"));
        assert!(!is_quantized_linear("lm_head.weight"));
        assert!(!is_quantized_linear("model.embed_tokens.weight"));
        assert!(!is_quantized_linear("model.layers.x.mlp.up_proj.weight"));
        let q = Quantize::parse("fp4", false).unwrap();
        let w = Tensor::ones((4, 64), DType::F32, &Device::Cpu).unwrap();
        let kept = q.apply("model.norm.weight", w.clone()).unwrap();
        assert_eq!(kept.len(), 1);
        let names: Vec<String> = q
            .apply("model.layers.0.mlp.up_proj.weight", w)
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(
            names,
            [
                "model.layers.0.mlp.up_proj.weight",
                "model.layers.0.mlp.up_proj.weight.absmax",
                "model.layers.0.mlp.up_proj.weight.quant_map",
                "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__fp4"
            ]
        );
    }

    #[test]
    fn checkpoint_quantization_names_the_unsupported_method() {
        let v = |q: Value| serde_json::json!({ "quantization_config": q });
        assert_eq!(
            checkpoint_quantization(&serde_json::json!({})).unwrap(),
            None
        );
        let bnb = v(
            serde_json::json!({"quant_method": "bitsandbytes", "load_in_4bit": true,
            "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": true}),
        );
        assert_eq!(
            checkpoint_quantization(&bnb).unwrap().as_deref(),
            Some("bnb nf4, double quant")
        );
        let gptq = v(
            serde_json::json!({"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": true}),
        );
        assert_eq!(
            checkpoint_quantization(&gptq).unwrap().as_deref(),
            Some("gptq 4-bit, group size 32, desc_act")
        );
        let err = |q: Value| checkpoint_quantization(&v(q)).unwrap_err().to_string();
        let e = err(serde_json::json!({"quant_method": "gptq", "bits": 5}));
        assert!(
            e.contains("quantization_config.bits 5 is not supported"),
            "{e}"
        );
        let v2 = v(
            serde_json::json!({"quant_method": "gptq", "bits": 4, "group_size": 32, "checkpoint_format": "gptq_v2"}),
        );
        assert_eq!(
            checkpoint_quantization(&v2).unwrap().as_deref(),
            Some("gptq 4-bit, group size 32, gptq_v2")
        );
        let e = err(serde_json::json!({"quant_method": "gptq", "bits": 4, "format": "marlin"}));
        assert!(e.contains("quantization_config.format \"marlin\""), "{e}");
        let awq = v(
            serde_json::json!({"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm", "zero_point": true}),
        );
        assert_eq!(
            checkpoint_quantization(&awq).unwrap().as_deref(),
            Some("awq 4-bit gemm, group size 64")
        );
        let e = err(serde_json::json!({"quant_method": "awq", "bits": 4, "version": "gemv"}));
        assert!(e.contains("quantization_config.version \"gemv\""), "{e}");
        let e = err(serde_json::json!({"quant_method": "awq", "bits": 8, "version": "gemm"}));
        assert!(e.contains("quantization_config.bits 8"), "{e}");
        let e = err(serde_json::json!({"quant_method": "hqq"}));
        assert!(e.contains("\"hqq\" is not supported yet"), "{e}");
        let int8 = v(serde_json::json!({"quant_method": "bitsandbytes", "load_in_8bit": true}));
        assert_eq!(
            checkpoint_quantization(&int8).unwrap().as_deref(),
            Some("bnb int8")
        );
        let e = Quantize::parse("int8", true).unwrap_err().to_string();
        assert!(e.contains("not int8"), "{e}");
    }
}
