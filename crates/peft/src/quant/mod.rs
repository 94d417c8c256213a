//! Quantized frozen base weights (QLoRA): the formats, their dequantization, and the Linear op that computes
//! `x · dequant(W)ᵀ` block by block without holding the dequantized weight.
//!
//! A quantized Linear is a [`crate::BaseLayer`] built with [`crate::BaseLayer::quantized_linear`]; every
//! adapter method that wraps a Linear wraps it too, computing in f32 on top of it (PEFT's numbers: an f32
//! matmul with the dequantized weight, never quantized activations). Its backward gives the input gradient
//! only (`g · dequant(W)`), dequantizing again instead of keeping the f32 weight alive between forward and
//! backward.
//!
//! | format | module | as written by |
//! |---|---|---|
//! | bitsandbytes NF4 / FP4, ± double quantization | [`bnb4`] | bitsandbytes 0.50.2 through transformers' `save_pretrained` |
//! | bitsandbytes 8-bit (LLM.int8 weights, `SCB`) | [`bnb8`] | bitsandbytes 0.50.2 through transformers' `save_pretrained` |
//! | GGUF Q4_0 … Q8_0, Q2_K … Q6_K | [`gguf`] | llama.cpp (read by candle) |
//! | GPTQ 2/3/4/8-bit (`gptq` v1 and `gptq_v2` zero points, act-order `g_idx`) | [`gptq`] | gptqmodel 7.7.0 / optimum through transformers' `save_pretrained` |
//! | AWQ 4-bit, `gemm` layout | [`awq`] | AutoAWQ / gptqmodel 7.7.0 through transformers' `save_pretrained` |

pub mod awq;
pub mod bnb4;
pub mod bnb8;
pub mod gguf;
pub mod gptq;
mod linear;

pub use linear::quant_linear;

use crate::{PeftError, Result};
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;

/// The module a stored tensor name belongs to when it can be a quantized Linear's first tensor:
/// `<module>.weight` (dense or bitsandbytes) or `<module>.qweight` (GPTQ, AWQ).
///
/// ```
/// assert_eq!(peft::quant::stored_module("a.q_proj.qweight"), Some("a.q_proj"));
/// assert_eq!(peft::quant::stored_module("a.q_proj.scales"), None);
/// ```
pub fn stored_module(name: &str) -> Option<&str> {
    name.strip_suffix(".weight")
        .or_else(|| name.strip_suffix(".qweight"))
}

/// The names of the tensors transformers stores for a quantized Linear `module` (its packed weight first,
/// then its state tensors; not its bias), or `None` when `has` (which names exist) shows the module is not
/// stored quantized:
///
/// - bitsandbytes 8-bit: `<module>.weight` and `<module>.SCB` (`weight_format` when present);
/// - bitsandbytes 4-bit: `<module>.weight` and `<module>.weight.quant_state.bitsandbytes__nf4|fp4` (with
///   `absmax`, `quant_map`, `nested_*` as present);
/// - GPTQ: `<module>.qweight`, `qzeros`, `scales`, `g_idx`;
/// - AWQ: `<module>.qweight`, `qzeros`, `scales` and no `g_idx`.
pub fn stored_keys(module: &str, has: impl Fn(&str) -> bool) -> Option<Vec<String>> {
    let qweight = format!("{module}.qweight");
    if has(&qweight) {
        let suffixes: &[&str] = if has(&format!("{module}.g_idx")) {
            &gptq::STATE_SUFFIXES
        } else {
            &awq::STATE_SUFFIXES
        };
        // Every key, present or not: from_state_dict names the missing one.
        return Some(suffixes.iter().map(|s| format!("{module}.{s}")).collect());
    }
    let weight = format!("{module}.weight");
    if !has(&weight) {
        return None;
    }
    let state: Vec<String> = if has(&format!("{module}.SCB")) {
        bnb8::Bnb8Weight::STATE_SUFFIXES
            .iter()
            .map(|s| format!("{module}.{s}"))
            .collect()
    } else if ["nf4", "fp4"]
        .iter()
        .any(|t| has(&format!("{weight}.quant_state.bitsandbytes__{t}")))
    {
        bnb4::STATE_SUFFIXES
            .iter()
            .map(|s| format!("{weight}.{s}"))
            .collect()
    } else {
        return None;
    };
    Some(
        std::iter::once(weight)
            .chain(state.into_iter().filter(|k| has(k)))
            .collect(),
    )
}

/// The quantized weight of Linear `module` from transformers' tensors (bitsandbytes 4-bit or 8-bit, GPTQ in
/// the default `gptq` (v1) checkpoint format, AWQ `gemm`; `None` when `tensors` hold it unquantized), with the
/// names of the tensors it was read from ([`stored_keys`]). A GPTQ or AWQ module has no `weight` tensor: its
/// shape comes from the packed tensors. Errors name the tensor (a quant state of an unknown 4-bit type,
/// `…weight.quant_state.bitsandbytes__nf5`, is one).
pub fn from_state_dict(
    module: &str,
    tensors: &IndexMap<String, Tensor>,
) -> Result<Option<(QuantizedWeight, Vec<String>)>> {
    let Some(keys) = stored_keys(module, |k| tensors.contains_key(k)) else {
        // A quant state of a type bitsandbytes does not have: not a dense weight to read as its packed bytes.
        let state = format!("{module}.weight.quant_state.bitsandbytes__");
        if let Some(k) = tensors.keys().find(|k| k.starts_with(&state)) {
            return Err(PeftError::Invalid(format!(
                "{k}: unknown bitsandbytes 4-bit quant_type {:?} (nf4 or fp4)",
                &k[state.len()..]
            )));
        }
        return Ok(None);
    };
    if keys[0].ends_with(".qweight") {
        let q = if keys.len() == gptq::STATE_SUFFIXES.len() {
            QuantizedWeight::Gptq(gptq::GptqWeight::from_state_dict(
                module,
                tensors,
                gptq::GptqFormat::V1,
            )?)
        } else {
            QuantizedWeight::Awq(awq::AwqWeight::from_state_dict(module, tensors)?)
        };
        return Ok(Some((q, keys)));
    }
    let weight = &keys[0];
    let q = if bnb8::Bnb8Weight::is_stored(module, tensors) {
        let dims = tensors[weight].dims().to_vec();
        let &[out, inp] = dims.as_slice() else {
            return Err(PeftError::Invalid(format!(
                "{weight}: a bitsandbytes 8-bit weight has 2 dimensions, got {dims:?}"
            )));
        };
        QuantizedWeight::Bnb8(bnb8::Bnb8Weight::from_state_dict(
            module, tensors, out, inp,
        )?)
    } else {
        QuantizedWeight::Bnb4(bnb4::Bnb4Weight::from_state_dict(weight, tensors)?)
    };
    Ok(Some((q, keys)))
}

/// A frozen weight held quantized, in host memory.
#[derive(Clone, Debug, PartialEq)]
pub enum QuantizedWeight {
    /// bitsandbytes 4-bit (NF4 / FP4).
    Bnb4(bnb4::Bnb4Weight),
    /// bitsandbytes 8-bit (row-wise int8).
    Bnb8(bnb8::Bnb8Weight),
    /// A GGUF block-quantized tensor.
    Gguf(gguf::GgufWeight),
    /// GPTQ (2/3/4/8-bit codes, per-group zero points and float16 scales, `g_idx`).
    Gptq(gptq::GptqWeight),
    /// AWQ `gemm` (4-bit codes interleaved along the output, per-group zero points and float16 scales).
    Awq(awq::AwqWeight),
}

impl QuantizedWeight {
    /// The weight's shape (`[out, in]` for a Linear).
    pub fn shape(&self) -> &[usize] {
        match self {
            QuantizedWeight::Bnb4(w) => &w.shape,
            QuantizedWeight::Bnb8(w) => &w.shape,
            QuantizedWeight::Gguf(w) => &w.shape,
            QuantizedWeight::Gptq(w) => &w.shape,
            QuantizedWeight::Awq(w) => &w.shape,
        }
    }

    /// The dtype dequantization returns (the weight's dtype before quantization; float16 for GPTQ and AWQ, which
    /// the libraries dequantize in float16).
    pub fn dtype(&self) -> DType {
        match self {
            QuantizedWeight::Bnb4(w) => w.dtype,
            QuantizedWeight::Bnb8(_) => DType::F32,
            QuantizedWeight::Gguf(w) => w.dtype(),
            QuantizedWeight::Gptq(_) | QuantizedWeight::Awq(_) => DType::F16,
        }
    }

    /// Bytes held in memory.
    pub fn nbytes(&self) -> usize {
        match self {
            QuantizedWeight::Bnb4(w) => w.nbytes(),
            QuantizedWeight::Bnb8(w) => w.nbytes(),
            QuantizedWeight::Gguf(w) => w.nbytes(),
            QuantizedWeight::Gptq(w) => w.nbytes(),
            QuantizedWeight::Awq(w) => w.nbytes(),
        }
    }

    /// A short description: `bnb nf4 (blocksize 64, double quant)`.
    pub fn describe(&self) -> String {
        match self {
            QuantizedWeight::Bnb4(w) => format!(
                "bnb {} (blocksize {}{})",
                w.quant_type.as_str(),
                w.blocksize,
                if w.double_quant() {
                    ", double quant"
                } else {
                    ""
                }
            ),
            QuantizedWeight::Bnb8(_) => "bnb int8".to_string(),
            QuantizedWeight::Gguf(w) => format!("gguf {:?}", w.ggml_dtype),
            QuantizedWeight::Gptq(w) => match w.groups() {
                1 => format!("gptq {}-bit (one group)", w.bits),
                g => format!("gptq {}-bit (group size {})", w.bits, w.shape[1] / g),
            },
            QuantizedWeight::Awq(w) => format!("awq 4-bit gemm (group size {})", w.group_size),
        }
    }

    /// Dequantizes the row-major elements `[start, start + out.len())` into `out` in f32.
    pub fn dequantize_into(&self, start: usize, out: &mut [f32]) -> Result<()> {
        match self {
            QuantizedWeight::Bnb4(w) => {
                w.dequantize_into(start, out);
                Ok(())
            }
            QuantizedWeight::Bnb8(w) => {
                w.dequantize_into(start, out);
                Ok(())
            }
            QuantizedWeight::Gguf(w) => w.dequantize_into(start, out),
            QuantizedWeight::Gptq(w) => {
                w.dequantize_into(start, out);
                Ok(())
            }
            QuantizedWeight::Awq(w) => {
                w.dequantize_into(start, out);
                Ok(())
            }
        }
    }

    /// The whole weight dequantized, in its original dtype (PEFT's `dequantize_bnb_weight`).
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        match self {
            QuantizedWeight::Bnb4(w) => w.dequantize(device),
            QuantizedWeight::Bnb8(w) => w.dequantize(device),
            QuantizedWeight::Gguf(w) => w.dequantize(device),
            QuantizedWeight::Gptq(w) => w.dequantize(device),
            QuantizedWeight::Awq(w) => w.dequantize(device),
        }
    }

    /// `w` quantized with this weight's settings (what PEFT's bnb merge does after adding the delta). GPTQ and
    /// AWQ weights are an error: PEFT has no merge for those layers (`peft merge` writes them dequantized).
    pub fn requantize(&self, w: &Tensor) -> Result<Self> {
        match self {
            QuantizedWeight::Gptq(_) | QuantizedWeight::Awq(_) => Err(PeftError::Unsupported {
                field: "merge".into(),
                value: self.describe(),
                reason: "PEFT cannot merge into GPTQ or AWQ layers (its GPTQ/AWQ LoRA layers have no merge); \
                         `peft merge` writes the dequantized weights instead"
                    .into(),
            }),
            QuantizedWeight::Gguf(q) => Ok(QuantizedWeight::Gguf(q.requantize(w)?)),
            QuantizedWeight::Bnb8(_) => {
                let values = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                Ok(QuantizedWeight::Bnb8(bnb8::Bnb8Weight::quantize(
                    &values,
                    w.dims(),
                )?))
            }
            QuantizedWeight::Bnb4(q) => {
                // Rounded to the original dtype first, as bnb quantizes a weight of that dtype.
                let values = w
                    .to_dtype(q.dtype)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let opts = bnb4::Bnb4Options {
                    quant_type: q.quant_type,
                    blocksize: q.blocksize,
                    double_quant: q.double_quant(),
                    ..Default::default()
                };
                Ok(QuantizedWeight::Bnb4(bnb4::Bnb4Weight::quantize(
                    &values,
                    w.dims(),
                    q.dtype,
                    opts,
                )?))
            }
        }
    }

    /// The tensors a safetensors checkpoint stores for this weight under `prefix` (the weight's own key): the
    /// bitsandbytes tensors, the GPTQ (`gptq` v1 format) or AWQ tensors of the module (`prefix` without its
    /// `.weight`), or a GGUF weight dequantized (safetensors has no ggml block types).
    pub fn state_dict(&self, prefix: &str, device: &Device) -> Result<Vec<(String, Tensor)>> {
        match self {
            QuantizedWeight::Bnb4(w) => w.state_dict(prefix, device),
            QuantizedWeight::Bnb8(w) => {
                w.state_dict(prefix.strip_suffix(".weight").unwrap_or(prefix), device)
            }
            QuantizedWeight::Gguf(w) => Ok(vec![(prefix.to_string(), w.dequantize(device)?)]),
            QuantizedWeight::Gptq(w) => w.state_dict(
                prefix.strip_suffix(".weight").unwrap_or(prefix),
                gptq::GptqFormat::V1,
                device,
            ),
            QuantizedWeight::Awq(w) => {
                w.state_dict(prefix.strip_suffix(".weight").unwrap_or(prefix), device)
            }
        }
    }
}
