//! Merging adapters into a llama.cpp GGUF base, writing a GGUF with the same quant types.
//!
//! [`merge_into_gguf`] reads the base's header with [`candle_core::quantized::gguf_file`], pairs the adapters'
//! modules with the base's tensors by their HuggingFace names ([`crate::gguf::gguf_to_hf_name`]) and computes
//! each merged tensor with [`peft::merge::Merger`], the code of the streaming safetensors merge, so every method
//! that merge supports (LoRA, DoRA, IA3, VeRA, LoHa, LoKr, OFT, BOFT, AdaLoRA, weighted LoRA, `bias="all"`,
//! `modules_to_save` copies) merges here too. A targeted tensor is dequantized to f32, its rows un-permuted to
//! HF order for `attn_q` / `attn_k` ([`crate::gguf::unpermute_qk`]), merged, permuted back
//! ([`crate::gguf::permute_qk`]) and re-quantized with candle's quantizers to its own ggml type (F32, F16 and
//! BF16 stay float; Q4_0 … Q8_0 and Q2_K … Q6_K are re-quantized, which is lossy). Its size is unchanged, so the
//! output is the base file byte for byte (header, metadata in file order, tensor infos, padding, untouched
//! tensors) with only the merged tensors' bytes replaced. It is written to a temporary file next to `output`
//! and renamed into place; on an error nothing is left behind.
//!
//! [`GgufMergeReport`] lists every re-written tensor with `max |dequant(requant(W')) − W'|`, `W'` the merged
//! weight in f32 (0 for F32), and [`GgufMergeReport::max_error_by_type`] the worst per ggml type, so that a
//! caller can warn about the loss of re-quantizing.

use crate::error::{ModelError, Result};
use crate::gguf::{Meta, gguf_to_hf_name, permute_qk, unpermute_qk};
use candle_core::quantized::gguf_file::Value as GgufValue;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use peft::merge::{MergeAdapter, Merger, Progress};
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// One base tensor that [`merge_into_gguf`] re-wrote, with the loss of storing it in its ggml type.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufMergedTensor {
    /// Its GGUF name (`blk.0.attn_q.weight`).
    pub gguf_name: String,
    /// Its HuggingFace name (`model.layers.0.self_attn.q_proj.weight`).
    pub hf_name: String,
    /// Its ggml type, the base's and the output's.
    pub ggml_dtype: GgmlDType,
    /// Its row-major shape (GGUF's `ne` reversed).
    pub shape: Vec<usize>,
    /// `max |dequant(requant(W')) − W'|` over its elements, `W'` the merged tensor in f32 (0 for F32).
    pub max_error: f32,
    /// `max |W'|`, to put the error in scale.
    pub max_abs: f32,
}

/// What [`merge_into_gguf`] did.
#[derive(Debug, Clone, Default)]
pub struct GgufMergeReport {
    /// The file written.
    pub output: PathBuf,
    /// The HF modules the adapters target, in merge order ([`Merger::modules`]).
    pub modules: Vec<String>,
    /// Warnings of adapters whose merged weights differ from their unmerged forward ([`Merger::warnings`]).
    pub warnings: Vec<String>,
    /// The tensors re-written, in file order.
    pub tensors: Vec<GgufMergedTensor>,
    /// The size of the file written, in bytes (the base's).
    pub bytes: u64,
}

impl GgufMergeReport {
    /// The largest [`GgufMergedTensor::max_error`] per ggml type, with the number of tensors of that type, in
    /// the order the types first appear in the file.
    pub fn max_error_by_type(&self) -> Vec<(GgmlDType, usize, f32)> {
        let mut out: Vec<(GgmlDType, usize, f32)> = Vec::new();
        for t in &self.tensors {
            match out.iter_mut().find(|(d, _, _)| *d == t.ggml_dtype) {
                Some((_, n, e)) => {
                    *n += 1;
                    *e = e.max(t.max_error);
                }
                None => out.push((t.ggml_dtype, 1, t.max_error)),
            }
        }
        out
    }

    /// Whether any re-written tensor is block-quantized (so the merge lost more than float rounding).
    pub fn requantized_blocks(&self) -> bool {
        self.tensors.iter().any(|t| !is_float(t.ggml_dtype))
    }
}

fn is_float(d: GgmlDType) -> bool {
    matches!(d, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// The ggml types a merged tensor can be written back in: every type candle both reads and quantizes to.
/// (Types candle does not know, such as the IQ quants, already fail when the file is read.)
fn requantizable(d: GgmlDType) -> bool {
    matches!(
        d,
        GgmlDType::F32
            | GgmlDType::F16
            | GgmlDType::BF16
            | GgmlDType::Q4_0
            | GgmlDType::Q4_1
            | GgmlDType::Q5_0
            | GgmlDType::Q5_1
            | GgmlDType::Q8_0
            | GgmlDType::Q2K
            | GgmlDType::Q3K
            | GgmlDType::Q4K
            | GgmlDType::Q5K
            | GgmlDType::Q6K
    )
}

/// One tensor to re-write: where its bytes are and how to compute them.
struct Planned {
    gguf_name: String,
    hf_name: String,
    dtype: GgmlDType,
    shape: Vec<usize>,
    /// Absolute file offset and byte length.
    start: u64,
    len: u64,
    /// Heads of the q / k row permutation, if any.
    qk_heads: Option<usize>,
}

/// Merges `adapters` (in order, as [`peft::merge::merge_model`] does; `DIR@WEIGHT` weights included) into the
/// llama GGUF `base` and writes `output`: a GGUF whose metadata, tensor infos and untouched tensors are the
/// base's bytes, and whose merged tensors keep their ggml type. `progress` hears `(bytes written, file size,
/// tensor)` after each merged tensor and at the end.
///
/// Errors (nothing is written): a file candle cannot read (corrupt, truncated, or holding a ggml type candle
/// does not know), an architecture other than `llama`, an adapter GGUF, an adapter module or replaced tensor
/// the base lacks ([`peft::PeftError::MissingModule`]), shapes that do not fit
/// ([`peft::PeftError::ShapeMismatch`] or an error naming the module), q / k rows that do not split into the
/// metadata's heads, a merged tensor whose ggml type candle cannot quantize to, and `output` being `base`.
pub fn merge_into_gguf(
    base: &Path,
    adapters: Vec<MergeAdapter>,
    output: &Path,
    progress: Progress<'_>,
) -> Result<GgufMergeReport> {
    let bad = |message: String| ModelError::Gguf {
        path: base.to_path_buf(),
        message,
    };
    if output.exists()
        && let (Ok(a), Ok(b)) = (base.canonicalize(), output.canonicalize())
        && a == b
    {
        return Err(ModelError::Invalid(format!(
            "{}: the output is the base file; write the merged GGUF elsewhere",
            output.display()
        )));
    }
    let (content, file_size) = crate::gguf::read_content(base)?;
    let reader = BufReader::new(std::fs::File::open(base).map_err(|e| ModelError::io(base, e))?);
    let meta = Meta {
        md: &content.metadata,
        path: base,
    };
    if let Some(GgufValue::String(t)) = content.metadata.get("general.type")
        && t == "adapter"
    {
        return Err(bad(
            "is an adapter (general.type = adapter); the base must be a model file".into(),
        ));
    }
    let arch = meta.string("general.architecture")?.ok_or_else(|| {
        bad("no `general.architecture` in the metadata (is this a model file?)".into())
    })?;
    if arch != "llama" {
        return Err(ModelError::Unsupported(format!(
            "{}: architecture `{arch}`; merging into a GGUF supports `llama` files only",
            base.display()
        )));
    }
    let heads = meta.req_uint("llama.attention.head_count")?;
    let kv_heads = meta
        .uint("llama.attention.head_count_kv")?
        .map(|v| v as usize)
        .unwrap_or(heads);

    // Every tensor's bytes lie inside the file (they are all copied).
    for (g, info) in &content.tensor_infos {
        let elems = info.shape.elem_count();
        let bs = info.ggml_dtype.block_size();
        let len = (elems / bs * info.ggml_dtype.type_size()) as u64;
        let start = content.tensor_data_offset.saturating_add(info.offset);
        if !elems.is_multiple_of(bs) || start.saturating_add(len) > file_size {
            return Err(bad(format!(
                "tensor {g} needs {len} bytes at offset {start} but the file has {file_size} bytes \
                 (truncated?)"
            )));
        }
    }

    // HF name → GGUF name, for every tensor of a llama model (others are copied untouched).
    let gguf_of: HashMap<String, String> = content
        .tensor_infos
        .keys()
        .filter_map(|g| gguf_to_hf_name(g).map(|h| (h, g.clone())))
        .collect();
    let shape = |hf: &str| {
        gguf_of
            .get(hf)
            .map(|g| content.tensor_infos[g].shape.dims().to_vec())
    };
    let mut aliases = peft::io::Aliases::new();
    if !content.tensor_infos.contains_key("output.weight") {
        // Tied embeddings: llama.cpp's output layer is token_embd itself.
        aliases.insert("lm_head.weight".into(), "model.embed_tokens.weight".into());
    }
    let merger = Merger::new(adapters, &shape, aliases)?;

    let qk_heads_of = |hf: &str| {
        if hf.contains("self_attn.q_proj.") {
            Some(heads)
        } else if hf.contains("self_attn.k_proj.") {
            Some(kv_heads)
        } else {
            None
        }
    };
    let mut plan: Vec<Planned> = Vec::new();
    for (hf, g) in &gguf_of {
        if !merger.touches(hf) {
            continue;
        }
        let info = &content.tensor_infos[g];
        let dims = info.shape.dims().to_vec();
        if !requantizable(info.ggml_dtype) {
            return Err(ModelError::Unsupported(format!(
                "{}: tensor {g} is {:?}, which candle cannot quantize to: the merged tensor cannot keep \
                 its type",
                base.display(),
                info.ggml_dtype
            )));
        }
        let elems: usize = dims.iter().product();
        let bs = info.ggml_dtype.block_size();
        if dims.is_empty() || !dims[dims.len() - 1].is_multiple_of(bs) {
            return Err(bad(format!(
                "tensor {g}: shape {dims:?} is not whole {:?} blocks of {bs}",
                info.ggml_dtype
            )));
        }
        let len = (elems / bs * info.ggml_dtype.type_size()) as u64;
        let start = content.tensor_data_offset.saturating_add(info.offset);
        let qk_heads = qk_heads_of(hf);
        if let Some(h) = qk_heads
            && (h == 0 || !dims[0].is_multiple_of(2 * h) || dims.len() > 2)
        {
            return Err(bad(format!(
                "tensor {g}: {dims:?} rows do not split into {h} heads"
            )));
        }
        plan.push(Planned {
            gguf_name: g.clone(),
            hf_name: hf.clone(),
            dtype: info.ggml_dtype,
            shape: dims,
            start,
            len,
            qk_heads,
        });
    }
    plan.sort_by_key(|p| p.start);
    if let Some(w) = plan.windows(2).find(|w| w[0].start + w[0].len > w[1].start) {
        return Err(bad(format!(
            "tensors {} and {} overlap in the file",
            w[0].gguf_name, w[1].gguf_name
        )));
    }
    // A base tensor by HF name, f32, q / k rows in HF order.
    let reader = RefCell::new(reader);
    let data_offset = content.tensor_data_offset;
    let load = |hf: &str| -> peft::Result<Tensor> {
        let g = gguf_of
            .get(hf)
            .ok_or_else(|| peft::PeftError::MissingKey(hf.to_string()))?;
        let q = content.tensor_infos[g]
            .read(&mut *reader.borrow_mut(), data_offset, &Device::Cpu)
            .map_err(|e| peft::PeftError::from(bad(format!("tensor {g}: {e}"))))?;
        let t = q.dequantize(&Device::Cpu)?;
        Ok(match qk_heads_of(hf) {
            Some(h) => unpermute_qk(&t, h)?,
            None => t,
        })
    };

    let mut report = GgufMergeReport {
        output: output.to_path_buf(),
        modules: merger.modules(),
        warnings: merger.warnings().to_vec(),
        tensors: Vec::with_capacity(plan.len()),
        bytes: file_size,
    };
    let mut src = std::fs::File::open(base).map_err(|e| ModelError::io(base, e))?;
    peft::io::atomic_write_try(output, |w| {
        let io_out = |e| peft::PeftError::io(output, e);
        let mut pos = 0u64;
        for p in &plan {
            copy_range(&mut src, w, pos, p.start - pos, base, output)?;
            let (bytes, merged) = merged_bytes(p, &merger, &load)?;
            if bytes.len() as u64 != p.len {
                return Err(peft::PeftError::Invalid(format!(
                    "internal: tensor {} re-quantized to {} bytes, the base stores {}",
                    p.gguf_name,
                    bytes.len(),
                    p.len
                )));
            }
            w.write_all(&bytes).map_err(io_out)?;
            pos = p.start + p.len;
            report.tensors.push(merged);
            progress(pos, file_size, &p.gguf_name);
        }
        copy_range(&mut src, w, pos, file_size - pos, base, output)?;
        progress(file_size, file_size, "");
        Ok(())
    })?;
    Ok(report)
}

/// Copies `len` bytes of `src` from `start` to `w`.
fn copy_range(
    src: &mut std::fs::File,
    w: &mut impl Write,
    start: u64,
    len: u64,
    base: &Path,
    output: &Path,
) -> peft::Result<()> {
    src.seek(SeekFrom::Start(start))
        .map_err(|e| peft::PeftError::io(base, e))?;
    let copied =
        std::io::copy(&mut src.take(len), w).map_err(|e| peft::PeftError::io(output, e))?;
    if copied != len {
        return Err(peft::PeftError::io(
            base,
            std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("{base:?} ended {} bytes early", len - copied),
            ),
        ));
    }
    Ok(())
}

/// The merged tensor `p` in its ggml type (rows in the file's order), with what storing it cost.
fn merged_bytes(
    p: &Planned,
    merger: &Merger,
    load: &dyn Fn(&str) -> peft::Result<Tensor>,
) -> peft::Result<(Vec<u8>, GgufMergedTensor)> {
    let merged = merger
        .merged_tensor(&p.hf_name, load)?
        .ok_or_else(|| peft::PeftError::Invalid(format!("internal: {} was not merged", p.hf_name)))?
        .to_dtype(DType::F32)?;
    if merged.dims() != p.shape.as_slice() {
        return Err(peft::PeftError::ShapeMismatch {
            name: p.hf_name.clone(),
            expected: p.shape.clone(),
            got: merged.dims().to_vec(),
        });
    }
    let stored = match p.qk_heads {
        Some(h) => permute_qk(&merged, h)?,
        None => merged,
    };
    let q = QTensor::quantize(&stored, p.dtype).map_err(|e| {
        peft::PeftError::Invalid(format!(
            "tensor {}: cannot quantize to {:?}: {e}",
            p.gguf_name, p.dtype
        ))
    })?;
    let back = q.dequantize(&Device::Cpu)?;
    let max_error = (&back - &stored)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let max_abs = stored.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let bytes = q.data()?.into_owned();
    Ok((
        bytes,
        GgufMergedTensor {
            gguf_name: p.gguf_name.clone(),
            hf_name: p.hf_name.clone(),
            ggml_dtype: p.dtype,
            shape: p.shape.clone(),
            max_error,
            max_abs,
        },
    ))
}
