//! Resource limits: how much memory a model's frozen weights take once loaded, estimated from the file
//! headers before any weight is read, and checked against a budget ([`MemoryLimit`]), so a model that cannot
//! fit is refused with a message instead of being killed by the kernel half-way through its load.
//!
//! The estimate counts the weights as [`crate::load_model_with`] holds them: floating-point tensors in f32 (or
//! bf16 / f16 with [`crate::LoadOptions::dtype`], RMSNorm weights staying f32), weights quantized while
//! loading at their packed size plus scales, tensors saved quantized (bitsandbytes, GPTQ, AWQ) and GGUF blocks
//! kept quantized at their stored size. Activations, the KV cache, adapters and optimizer state come on top.

use crate::error::{ModelError, Result};
use crate::quantize::{Quantize, is_quantized_linear};
use candle_core::DType;
use std::path::Path;

/// The memory budget of a model's frozen weights.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MemoryLimit {
    /// What the machine has available now (`MemAvailable` of `/proc/meminfo`); no check where that cannot be
    /// read.
    #[default]
    Available,
    /// At most this many bytes.
    Bytes(u64),
    /// No check.
    Unlimited,
}

impl MemoryLimit {
    /// From the CLI's `--max-memory`: a size (`12GiB`, `800MB`, `1.5G`, `4096` bytes), `available`, or
    /// `none` (no check).
    ///
    /// ```
    /// use peft_models::memory::MemoryLimit;
    /// assert_eq!(MemoryLimit::parse("2GiB").unwrap(), MemoryLimit::Bytes(2 << 30));
    /// assert_eq!(MemoryLimit::parse("1.5k").unwrap(), MemoryLimit::Bytes(1536));
    /// assert_eq!(MemoryLimit::parse("800MB").unwrap(), MemoryLimit::Bytes(800_000_000));
    /// assert_eq!(MemoryLimit::parse("none").unwrap(), MemoryLimit::Unlimited);
    /// assert!(MemoryLimit::parse("-3G").is_err());
    /// assert!(MemoryLimit::parse("0").is_err());
    /// ```
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "none" | "unlimited" => return Ok(MemoryLimit::Unlimited),
            "available" | "auto" => return Ok(MemoryLimit::Available),
            _ => {}
        }
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let value: f64 = num
            .parse()
            .map_err(|_| format!("{s:?}: expected a size such as 12GiB, 800MB or 4096, or none"))?;
        let scale: f64 = match unit.trim() {
            "" | "b" => 1.0,
            "k" | "kib" => 1024.0,
            "kb" => 1e3,
            "m" | "mib" => 1024.0 * 1024.0,
            "mb" => 1e6,
            "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
            "gb" => 1e9,
            "t" | "tib" => 1024f64.powi(4),
            "tb" => 1e12,
            other => {
                return Err(format!(
                    "{s:?}: unknown unit {other:?} (B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)"
                ));
            }
        };
        let bytes = value * scale;
        if !(bytes.is_finite() && bytes >= 1.0) {
            return Err(format!(
                "{s:?}: the limit must be at least one byte (none: no check)"
            ));
        }
        Ok(MemoryLimit::Bytes(bytes.min(u64::MAX as f64) as u64))
    }

    /// The budget in bytes, with what it is for messages; `None` when there is no check.
    pub fn resolve(self) -> Option<(u64, String)> {
        match self {
            MemoryLimit::Unlimited => None,
            MemoryLimit::Bytes(b) => Some((b, "the --max-memory limit".into())),
            MemoryLimit::Available => available_memory().map(|b| {
                (
                    b,
                    "the memory available now (MemAvailable in /proc/meminfo)".into(),
                )
            }),
        }
    }
}

/// `MemAvailable` of `/proc/meminfo` in bytes (Linux); `None` elsewhere.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// A size for messages: `1.23 GiB`, `456.0 MiB`, `789 B`.
pub fn human_bytes(b: u64) -> String {
    let f = b as f64;
    if f >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", f / (1u64 << 30) as f64)
    } else if f >= (1u64 << 20) as f64 {
        format!("{:.1} MiB", f / (1u64 << 20) as f64)
    } else if f >= 1024.0 {
        format!("{:.1} KiB", f / 1024.0)
    } else {
        format!("{b} B")
    }
}

/// What a model's weights take once loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WeightsEstimate {
    /// Bytes as held.
    pub bytes: u64,
    /// Elements (parameters) of every tensor.
    pub elements: u64,
}

/// Bytes per element of a weight quantized while loading: packed codes plus one f32 scale per block of 64
/// (4-bit) or per row (int8, counted as one per 64 as an upper bound).
fn quantized_bytes(q: &Quantize, elements: u64) -> u64 {
    let blocks = elements.div_ceil(64);
    match q {
        Quantize::Bnb4(_) => elements.div_ceil(2) + 4 * blocks,
        Quantize::Bnb8 => elements + 4 * blocks,
    }
}

fn held_float_bytes(name: &str, elements: u64, dtype: DType) -> u64 {
    let half = matches!(dtype, DType::BF16 | DType::F16) && !name.contains("norm");
    elements * if half { 2 } else { 4 }
}

/// The memory of the weights of the model at `path` (an HF directory or a `.gguf` file) once loaded with
/// `dtype` (f32, bf16 or f16), `quantize` and, for a GGUF file, its blocks kept (`keep_gguf_blocks`) or
/// dequantized; read from the headers only.
pub fn estimate_weights(
    path: &Path,
    dtype: DType,
    quantize: Option<&Quantize>,
    keep_gguf_blocks: bool,
) -> Result<WeightsEstimate> {
    let mut est = WeightsEstimate::default();
    if path.is_dir() {
        let model = peft::io::BaseModel::open(path)?;
        for (_, shard) in &model.shards {
            for name in shard.names() {
                let Some((shape, st)) = shard.info(&name) else {
                    continue;
                };
                let n = shape.iter().map(|&d| d as u64).product::<u64>();
                est.elements = est.elements.saturating_add(n);
                let float = matches!(
                    st,
                    safetensors::Dtype::F32
                        | safetensors::Dtype::F16
                        | safetensors::Dtype::BF16
                        | safetensors::Dtype::F64
                );
                let b = match quantize {
                    Some(q) if float && is_quantized_linear(&name) => quantized_bytes(q, n),
                    _ if float => held_float_bytes(&name, n, dtype),
                    // saved quantized: held as stored
                    _ => n.saturating_mul(st.bitsize() as u64).div_ceil(8),
                };
                est.bytes = est.bytes.saturating_add(b);
            }
        }
    } else {
        let (content, _) = crate::gguf::read_content(path)?;
        for (name, info) in &content.tensor_infos {
            let n = info.shape.elem_count() as u64;
            est.elements = est.elements.saturating_add(n);
            let stored = (n / info.ggml_dtype.block_size() as u64)
                .saturating_mul(info.ggml_dtype.type_size() as u64);
            use candle_core::quantized::GgmlDType as G;
            let float = matches!(info.ggml_dtype, G::F32 | G::F16 | G::BF16);
            // GGUF names: blk.N.attn_q.weight, …; the projections kept in blocks are those of the layers
            let projection = name.starts_with("blk.")
                && [
                    "attn_q.",
                    "attn_k.",
                    "attn_v.",
                    "attn_output.",
                    "ffn_gate.",
                    "ffn_up.",
                    "ffn_down.",
                ]
                .iter()
                .any(|p| name.contains(p));
            let b = match quantize {
                Some(q) if projection => quantized_bytes(q, n),
                _ if keep_gguf_blocks && projection && !float => stored,
                _ => held_float_bytes(name, n, dtype),
            };
            est.bytes = est.bytes.saturating_add(b);
        }
    }
    Ok(est)
}

/// Refuses to load the model at `path` when its weights ([`estimate_weights`]) exceed `limit`, with a
/// message that gives both sizes and the ways out.
pub fn check_fits(
    path: &Path,
    dtype: DType,
    quantize: Option<&Quantize>,
    keep_gguf_blocks: bool,
    limit: MemoryLimit,
) -> Result<()> {
    let Some((budget, what)) = limit.resolve() else {
        return Ok(());
    };
    if !(path.is_dir() || path.extension().is_some_and(|e| e == "gguf")) || !path.exists() {
        // not a model path: the loader says what is wrong with it
        return Ok(());
    }
    let est = estimate_weights(path, dtype, quantize, keep_gguf_blocks)?;
    if est.bytes <= budget {
        return Ok(());
    }
    let rest = match dtype {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    };
    let held = match quantize {
        Some(q) => format!("with the projections quantized ({})", q.describe()),
        None if keep_gguf_blocks && !path.is_dir() => {
            format!("with the ggml blocks kept as stored, the rest held in {rest}")
        }
        None => format!("held in {rest}"),
    };
    Err(ModelError::Invalid(format!(
        "{}: the model's weights need about {} ({} parameters {held}), more than {what}, {}; free memory, \
         hold the weights in bf16 (--dtype bf16) or quantize them (--quantize nf4), or set the limit with \
         --max-memory SIZE (none: no check)",
        path.display(),
        human_bytes(est.bytes),
        est.elements,
        human_bytes(budget),
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(rel: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures")
            .join(rel)
    }

    #[test]
    fn an_f32_checkpoint_is_estimated_at_its_data_size() {
        let dir = fixture("lora/cases/llama_qv/base_hf");
        let file = std::fs::read(dir.join("model.safetensors")).unwrap();
        let header = u64::from_le_bytes(file[..8].try_into().unwrap());
        let data = file.len() as u64 - 8 - header;
        let e = estimate_weights(&dir, DType::F32, None, true).unwrap();
        assert_eq!(e.bytes, data);
        assert_eq!(e.elements * 4, data);
        // bf16 halves all but the norms
        let h = estimate_weights(&dir, DType::BF16, None, true).unwrap();
        assert!(
            h.bytes < data * 52 / 100 && h.bytes > data / 2,
            "{} of {data}",
            h.bytes
        );
        // nf4 packs the projections
        let q = Quantize::parse("nf4", false).unwrap();
        let n = estimate_weights(&dir, DType::F32, Some(&q), true).unwrap();
        assert!(
            n.bytes < data && n.bytes > data / 8,
            "{} of {data}",
            n.bytes
        );
    }

    #[test]
    fn gguf_blocks_kept_are_counted_as_stored() {
        let path = fixture("quant/cases/gguf_blocks/model.gguf");
        let kept = estimate_weights(&path, DType::F32, None, true).unwrap();
        let dequantized = estimate_weights(&path, DType::F32, None, false).unwrap();
        assert_eq!(dequantized.bytes, dequantized.elements * 4);
        assert!(
            kept.bytes < dequantized.bytes / 2,
            "{kept:?} {dequantized:?}"
        );
        // the estimate of the kept blocks is below the file size (which also holds the header)
        let len = std::fs::metadata(&path).unwrap().len();
        assert!(kept.bytes <= len * 2, "{} vs {len}", kept.bytes);
    }

    #[test]
    fn a_model_over_the_limit_is_refused_with_both_sizes() {
        let dir = fixture("lora/cases/llama_qv/base_hf");
        let e = check_fits(&dir, DType::F32, None, true, MemoryLimit::Bytes(1000)).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("1000 B") && msg.contains("--max-memory"),
            "{msg}"
        );
        assert!(
            msg.contains(&human_bytes(
                estimate_weights(&dir, DType::F32, None, true)
                    .unwrap()
                    .bytes
            ))
        );
        check_fits(&dir, DType::F32, None, true, MemoryLimit::Bytes(1 << 30)).unwrap();
        check_fits(&dir, DType::F32, None, true, MemoryLimit::Unlimited).unwrap();
    }
}
