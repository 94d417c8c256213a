//! bitsandbytes 4-bit weights (NF4 and FP4, with or without double quantization), byte for byte as
//! bitsandbytes 0.50.2 writes them (`bitsandbytes/functional.py` `quantize_4bit` / `dequantize_4bit`, the CPU
//! backend in `backends/default/ops.py`, `QuantState.as_dict(packed=True)`).
//!
//! ```text
//! weight [out, in] → flattened row-major, cut into blocks of `blocksize` (default 64, across row ends)
//! absmax[b]  = max |x| over block b (f32)
//! code(x)    = nearest entry of the 16-value code book to x · (1/absmax[b]) (ties to the lower entry)
//! packed[i]  = code(x[2i]) << 4 | code(x[2i+1])                     (first element in the HIGH nibble)
//! w[i]       = quant_map[nibble(i)] · absmax[i / blocksize]          (one f32 multiply)
//! ```
//!
//! With double quantization (`bnb_4bit_use_double_quant`), the f32 `absmax` is itself stored in 8 bits:
//! `absmax[b] = nested_quant_map[code8[b]] · nested_absmax[b / 256] + nested_offset`, where `nested_offset` is
//! the mean of the absmax values and `nested_quant_map` bnb's signed dynamic 8-bit map.

use crate::config::json::python_float_repr;
use crate::{PeftError, Result};
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;

/// NF4's values as `get_4bit_type("nf4")` writes them (Python floats, i.e. f64).
const NF4_F64: [f64; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// NF4's code book (`get_4bit_type("nf4")` as an f32 tensor), sorted; the index is the 4-bit code.
pub const NF4_CODE: [f32; 16] = {
    let mut out = [0f32; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = NF4_F64[i] as f32;
        i += 1;
    }
    out
};

/// FP4's raw values (1 sign, 2 exponent, 1 mantissa bit), indexed by the bit pattern; the code book is these
/// divided by 12 in f32. Index 8 is +0 (bnb writes the integer `-0`).
const FP4_RAW: [f32; 16] = [
    0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0,
];

/// The 4-bit data type: `bnb_4bit_quant_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Bnb4Type {
    /// NormalFloat 4 (QLoRA's default).
    Nf4,
    /// A 4-bit float (transformers' `BitsAndBytesConfig` default).
    Fp4,
}

impl Bnb4Type {
    /// `"nf4"` or `"fp4"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Bnb4Type::Nf4 => "nf4",
            Bnb4Type::Fp4 => "fp4",
        }
    }

    /// The code book, indexed by code.
    pub fn code(self) -> [f32; 16] {
        match self {
            Bnb4Type::Nf4 => NF4_CODE,
            Bnb4Type::Fp4 => FP4_RAW.map(|v| v / 12.0),
        }
    }
}

impl std::str::FromStr for Bnb4Type {
    type Err = PeftError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "nf4" => Ok(Bnb4Type::Nf4),
            "fp4" => Ok(Bnb4Type::Fp4),
            other => Err(PeftError::InvalidConfig(format!(
                "unknown bitsandbytes 4-bit quant_type {other:?} (nf4 or fp4)"
            ))),
        }
    }
}

/// The block sizes bitsandbytes accepts.
pub const BLOCK_SIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// The block size of the nested (double) quantization of `absmax`.
pub const NESTED_BLOCKSIZE: usize = 256;

/// How the per-block scales are stored.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// Double quantization: one 8-bit code per block.
    Nested {
        /// `weight.absmax`: one code per 4-bit block.
        codes: Vec<u8>,
        /// `weight.nested_absmax`: one f32 per group of [`NESTED_BLOCKSIZE`] codes.
        nested_absmax: Vec<f32>,
        /// `weight.nested_quant_map`: bnb's signed dynamic map (256 values).
        nested_quant_map: Vec<f32>,
        /// `nested_offset` of the quant state: the mean of the f32 absmax values.
        offset: f32,
    },
}

/// A 4-bit weight as bitsandbytes stores it (`Params4bit` data + `QuantState`).
#[derive(Clone, Debug, PartialEq)]
pub struct Bnb4Weight {
    /// NF4 or FP4.
    pub quant_type: Bnb4Type,
    /// Elements per block.
    pub blocksize: usize,
    /// The weight's shape (`[out, in]` for a Linear).
    pub shape: Vec<usize>,
    /// The dtype of the weight before quantization (the quant state's `dtype`), which dequantization returns.
    pub dtype: DType,
    /// Two codes per byte, the first in the high nibble; `ceil(numel / 2)` bytes.
    pub packed: Vec<u8>,
    /// `weight.quant_map`: the 16-value code book.
    pub quant_map: [f32; 16],
    /// The per-block scales.
    pub absmax: Absmax,
}

/// The dtype names the quant state uses (`str(dtype).strip("torch.")`).
fn dtype_name(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        other => {
            return Err(PeftError::Unsupported {
                field: "dtype".into(),
                value: format!("{other:?}"),
                reason: "bitsandbytes quantizes float32, float16 and bfloat16 weights".into(),
            });
        }
    })
}

fn dtype_from_name(name: &str) -> Option<DType> {
    match name {
        "float32" => Some(DType::F32),
        "float16" => Some(DType::F16),
        "bfloat16" => Some(DType::BF16),
        _ => None,
    }
}

/// bnb's signed dynamic 8-bit map (`create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`), the
/// `nested_quant_map` of double quantization: 256 sorted f32 values from −0.99297 to 1.
pub fn dynamic_map() -> Vec<f32> {
    let (max_exponent_bits, total_bits) = (7i32, 8i32);
    let non_sign_bits = total_bits - 1;
    let additional_items = 2i32.pow((non_sign_bits - max_exponent_bits) as u32) - 1;
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..max_exponent_bits {
        let fraction_items =
            (2i32.pow((i + non_sign_bits - max_exponent_bits) as u32) + 1) as usize;
        // torch.linspace(0.1, 1, k) in f32: start + step·j, with the upper half counted back from the end.
        let boundaries = linspace_f32(0.1, 1.0, fraction_items);
        // Python's `10 ** (i - 6)` (a double) applied to an f32 tensor: cast to f32 first.
        let scale = [1e-6f64, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0][i as usize] as f32;
        for w in boundaries.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
        }
        for w in boundaries.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(-scale * mean);
        }
    }
    debug_assert_eq!(
        additional_items, 0,
        "max_exponent_bits = 7 leaves no additional items"
    );
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    data
}

/// `torch.linspace(start, end, steps)` in f32 as torch's CPU kernel computes it: `start + step·i` for the first
/// half, `end − step·(steps − 1 − i)` for the rest (each one fused multiply-add), with
/// `step = (end − start) / (steps − 1)`.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// The midpoints of a sorted code book in f32, as `(code[1:] + code[:-1]) / 2`.
fn midpoints(sorted: &[f32]) -> Vec<f32> {
    sorted.windows(2).map(|w| (w[1] + w[0]) / 2.0).collect()
}

/// `bucketize(s, midpoints)`: how many midpoints lie strictly below `s` (ties go to the lower entry).
fn bucket(mid: &[f32], s: f32) -> usize {
    mid.partition_point(|&m| m < s)
}

/// Per-block absmax and scaled values as bnb's CPU fallback computes them: full blocks `x · (1/absmax)`
/// clamped to [−1, 1], the tail block `x / absmax`; a zero block keeps absmax 0 (clamped at 1e-38 for the
/// division only).
fn scaled_blocks(
    x: &[f32],
    blocksize: usize,
    mut each: impl FnMut(usize, &[f32], f32),
) -> Vec<f32> {
    let n_full = x.len() / blocksize;
    let mut absmax = Vec::with_capacity(x.len().div_ceil(blocksize));
    let mut scaled = vec![0f32; blocksize];
    for (b, block) in x.chunks(blocksize).enumerate() {
        let am = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let denom = am.max(1e-38);
        let out = &mut scaled[..block.len()];
        if b < n_full {
            let inv = 1.0 / denom;
            for (o, v) in out.iter_mut().zip(block) {
                *o = (v * inv).clamp(-1.0, 1.0);
            }
        } else {
            for (o, v) in out.iter_mut().zip(block) {
                *o = (v / denom).clamp(-1.0, 1.0);
            }
        }
        each(b, out, am);
        absmax.push(am);
    }
    absmax
}

/// How the 8-bit absmax codes of double quantization are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NestedRounding {
    /// bitsandbytes' CPU kernel: a 65536-entry lookup table over [−1, 1] (what a CPU bnb writes).
    CpuLut,
    /// The exact nearest code, ties to the lower one (CUDA's kernel and the torch fallback).
    Nearest,
}

/// Quantizes the f32 values `x` (already cast from `dtype`) blockwise to 8 bits with a sorted code book:
/// bnb's `quantize_blockwise`. Returns the codes and the per-block absmax.
fn quantize_blockwise8(
    x: &[f32],
    code: &[f32],
    blocksize: usize,
    rounding: NestedRounding,
) -> (Vec<u8>, Vec<f32>) {
    let mid = midpoints(code);
    let lut: Vec<u8> = match rounding {
        NestedRounding::CpuLut => (0..65536u32)
            .map(|j| {
                let v = j as f32 / 65535.0 * 2.0 - 1.0;
                bucket(&mid, v) as u8
            })
            .collect(),
        NestedRounding::Nearest => Vec::new(),
    };
    let mut codes = Vec::with_capacity(x.len());
    let absmax = scaled_blocks(x, blocksize, |_, s, _| {
        for &v in s {
            codes.push(match rounding {
                NestedRounding::CpuLut => {
                    let idx = ((v + 1.0) * 0.5 * 65535.0 + 0.5) as u32;
                    lut[idx.min(65535) as usize]
                }
                NestedRounding::Nearest => bucket(&mid, v) as u8,
            });
        }
    });
    (codes, absmax)
}

/// Options of [`Bnb4Weight::quantize`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Bnb4Options {
    /// NF4 or FP4.
    pub quant_type: Bnb4Type,
    /// Elements per block (64, bnb's and transformers' default).
    pub blocksize: usize,
    /// Double quantization of the absmax values.
    pub double_quant: bool,
    /// How double quantization picks its codes.
    pub nested_rounding: NestedRounding,
}

impl Default for Bnb4Options {
    fn default() -> Self {
        Self {
            quant_type: Bnb4Type::Nf4,
            blocksize: 64,
            double_quant: false,
            nested_rounding: NestedRounding::CpuLut,
        }
    }
}

impl Bnb4Weight {
    /// Quantizes a weight of `shape` whose values (`x`, row-major) came from a weight of `dtype`, as
    /// `bitsandbytes.functional.quantize_4bit` does on the CPU.
    ///
    /// The double-quant offset is the mean of the absmax values, summed in f64; torch's f32 reduction can
    /// differ in the last bit, so bytes equal bnb's given the same offset ([`Bnb4Weight::quantize_with_offset`]).
    ///
    /// ```
    /// use peft::quant::bnb4::{Bnb4Options, Bnb4Type, Bnb4Weight};
    /// let x: Vec<f32> = (0..128).map(|i| (i as f32 - 64.0) / 64.0).collect();
    /// let q = Bnb4Weight::quantize(&x, &[2, 64], candle_core::DType::F32, Bnb4Options::default())?;
    /// assert_eq!(q.packed.len(), 64);
    /// let back = q.dequantize_f32();
    /// // NF4 codes are at most 0.304 apart (between -1 and -0.696): the error is at most half that.
    /// assert!(back.iter().zip(&x).all(|(a, b)| (a - b).abs() <= 0.153));
    /// # Ok::<(), peft::PeftError>(())
    /// ```
    pub fn quantize(x: &[f32], shape: &[usize], dtype: DType, opts: Bnb4Options) -> Result<Self> {
        Self::quantize_with_offset(x, shape, dtype, opts, None)
    }

    /// [`Bnb4Weight::quantize`] with a given double-quant offset (`None`: the mean of the absmax values).
    pub fn quantize_with_offset(
        x: &[f32],
        shape: &[usize],
        dtype: DType,
        opts: Bnb4Options,
        offset: Option<f32>,
    ) -> Result<Self> {
        dtype_name(dtype)?;
        if !BLOCK_SIZES.contains(&opts.blocksize) {
            return Err(PeftError::InvalidConfig(format!(
                "bitsandbytes 4-bit blocksize {} is not one of {BLOCK_SIZES:?}",
                opts.blocksize
            )));
        }
        let n: usize = shape.iter().product();
        if n != x.len() || n == 0 {
            return Err(PeftError::Invalid(format!(
                "cannot quantize {} values as a weight of shape {shape:?}",
                x.len()
            )));
        }
        let code = opts.quant_type.code();
        // Sorted code book and, for FP4, the bit pattern of each sorted position (argsort of the code; FP4's two
        // +0 entries keep index order, 0 before 8).
        let mut order: Vec<usize> = (0..16).collect();
        order.sort_by(|&a, &b| code[a].total_cmp(&code[b]).then(a.cmp(&b)));
        let sorted: Vec<f32> = order.iter().map(|&i| code[i]).collect();
        let mid = midpoints(&sorted);
        let mut codes: Vec<u8> = Vec::with_capacity(n + 1);
        let absmax = scaled_blocks(x, opts.blocksize, |_, s, _| {
            codes.extend(s.iter().map(|&v| order[bucket(&mid, v)] as u8));
        });
        if n % 2 == 1 {
            // bnb appends a 0.0 before quantizing (scaled by nothing: code of 0).
            codes.push(order[bucket(&mid, 0.0)] as u8);
        }
        let packed = codes.chunks_exact(2).map(|p| (p[0] << 4) | p[1]).collect();
        let absmax = if opts.double_quant {
            let offset = offset.unwrap_or_else(|| {
                (absmax.iter().map(|&v| v as f64).sum::<f64>() / absmax.len() as f64) as f32
            });
            let centred: Vec<f32> = absmax.iter().map(|&v| v - offset).collect();
            let map = dynamic_map();
            let (codes, nested_absmax) =
                quantize_blockwise8(&centred, &map, NESTED_BLOCKSIZE, opts.nested_rounding);
            Absmax::Nested {
                codes,
                nested_absmax,
                nested_quant_map: map,
                offset,
            }
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Self {
            quant_type: opts.quant_type,
            blocksize: opts.blocksize,
            shape: shape.to_vec(),
            dtype,
            packed,
            quant_map: code,
            absmax,
        })
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of 4-bit blocks.
    pub fn n_blocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize)
    }

    /// Bytes held (packed codes and scales).
    pub fn nbytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                Absmax::Plain(a) => 4 * a.len(),
                Absmax::Nested {
                    codes,
                    nested_absmax,
                    nested_quant_map,
                    ..
                } => codes.len() + 4 * (nested_absmax.len() + nested_quant_map.len()),
            }
    }

    /// Whether the absmax values are double-quantized.
    pub fn double_quant(&self) -> bool {
        matches!(self.absmax, Absmax::Nested { .. })
    }

    /// The f32 scale of block `b` (`nested_quant_map[code]·nested_absmax + offset` under double quantization).
    fn block_scale(&self, b: usize) -> f32 {
        match &self.absmax {
            Absmax::Plain(a) => a[b],
            Absmax::Nested {
                codes,
                nested_absmax,
                nested_quant_map,
                offset,
            } => nested_quant_map[codes[b] as usize] * nested_absmax[b / NESTED_BLOCKSIZE] + offset,
        }
    }

    /// Dequantizes elements `[start, start + out.len())` (row-major) into `out`, in f32: what a forward needs
    /// for a band of rows without dequantizing the whole weight.
    pub fn dequantize_into(&self, start: usize, out: &mut [f32]) {
        // bnb's CPU FP4 kernel decodes the sign bit itself: code 0b1000 is −0, where `quant_map` holds +0. Weights
        // with an odd last dimension go through its torch fallback instead, a `quant_map` lookup (+0). (On
        // AVX-512 machines blocksizes ≥ 2048 take the fallback too; both zeros are equal as numbers.)
        let mut table = self.quant_map;
        let kernel = self.shape.last().is_some_and(|d| d % 2 == 0);
        if self.quant_type == Bnb4Type::Fp4 && kernel && table[8] == 0.0 {
            table[8] = -0.0;
        }
        let end = start + out.len();
        let mut i = start;
        let mut o = 0;
        while i < end {
            let b = i / self.blocksize;
            let block_end = ((b + 1) * self.blocksize).min(end);
            // One f32 multiply per element, as bnb: code value × block scale (the products tabled per block).
            let scale = self.block_scale(b);
            let t = table.map(|v| v * scale);
            if i % 2 == 1 {
                out[o] = t[(self.packed[i / 2] & 0xF) as usize];
                i += 1;
                o += 1;
            }
            let pairs = (block_end - i) / 2;
            let bytes = &self.packed[i / 2..i / 2 + pairs];
            for (dst, &byte) in out[o..o + 2 * pairs].chunks_exact_mut(2).zip(bytes) {
                dst[0] = t[(byte >> 4) as usize];
                dst[1] = t[(byte & 0xF) as usize];
            }
            i += 2 * pairs;
            o += 2 * pairs;
            if i < block_end {
                out[o] = t[(self.packed[i / 2] >> 4) as usize];
                i += 1;
                o += 1;
            }
        }
    }

    /// The whole weight dequantized in f32, row-major (`dequantize_4bit` before its cast to `dtype`).
    pub fn dequantize_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel()];
        self.dequantize_into(0, &mut out);
        out
    }

    /// The dequantized weight as a tensor of the original dtype (PEFT's `dequantize_bnb_weight`).
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let t = Tensor::from_vec(self.dequantize_f32(), self.shape.as_slice(), device)?;
        Ok(t.to_dtype(self.dtype)?)
    }

    /// The quant state's JSON as bnb writes it (`json.dumps` with default separators, this key order).
    pub fn quant_state_json(&self) -> Result<String> {
        let shape: Vec<String> = self.shape.iter().map(|d| d.to_string()).collect();
        let mut s = format!(
            "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"{}\", \"shape\": [{}]",
            self.quant_type.as_str(),
            self.blocksize,
            dtype_name(self.dtype)?,
            shape.join(", ")
        );
        if let Absmax::Nested { offset, .. } = &self.absmax {
            s.push_str(&format!(
                ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                python_float_repr(*offset as f64)
            ));
        }
        s.push('}');
        Ok(s)
    }

    /// The tensors transformers saves for this weight under `prefix` (e.g. `model.layers.0.self_attn.q_proj.weight`):
    /// the packed weight `[ceil(n/2), 1]` u8, `absmax`, `quant_map`, the nested tensors under double
    /// quantization, and `quant_state.bitsandbytes__<type>` (the JSON bytes).
    pub fn state_dict(&self, prefix: &str, device: &Device) -> Result<Vec<(String, Tensor)>> {
        let mut out = Vec::new();
        let n_packed = self.packed.len();
        out.push((
            prefix.to_string(),
            Tensor::from_vec(self.packed.clone(), (n_packed, 1), device)?,
        ));
        match &self.absmax {
            Absmax::Plain(a) => {
                out.push((
                    format!("{prefix}.absmax"),
                    Tensor::new(a.as_slice(), device)?,
                ));
                out.push((
                    format!("{prefix}.quant_map"),
                    Tensor::new(&self.quant_map[..], device)?,
                ));
            }
            Absmax::Nested {
                codes,
                nested_absmax,
                nested_quant_map,
                ..
            } => {
                out.push((
                    format!("{prefix}.absmax"),
                    Tensor::new(codes.as_slice(), device)?,
                ));
                out.push((
                    format!("{prefix}.quant_map"),
                    Tensor::new(&self.quant_map[..], device)?,
                ));
                out.push((
                    format!("{prefix}.nested_absmax"),
                    Tensor::new(nested_absmax.as_slice(), device)?,
                ));
                out.push((
                    format!("{prefix}.nested_quant_map"),
                    Tensor::new(nested_quant_map.as_slice(), device)?,
                ));
            }
        }
        let json = self.quant_state_json()?.into_bytes();
        let len = json.len();
        out.push((
            format!(
                "{prefix}.quant_state.bitsandbytes__{}",
                self.quant_type.as_str()
            ),
            Tensor::from_vec(json, len, device)?,
        ));
        Ok(out)
    }

    /// Whether `tensors` hold a bnb 4-bit quant state for the weight `prefix`.
    pub fn is_stored(prefix: &str, tensors: &IndexMap<String, Tensor>) -> bool {
        ["nf4", "fp4"]
            .iter()
            .any(|t| tensors.contains_key(&format!("{prefix}.quant_state.bitsandbytes__{t}")))
    }

    /// Reads the weight `prefix` from the tensors transformers saved (`QuantState.from_dict`), checking every
    /// size against the quant state; errors name the tensor.
    pub fn from_state_dict(prefix: &str, tensors: &IndexMap<String, Tensor>) -> Result<Self> {
        let bad = |key: &str, what: String| PeftError::Invalid(format!("{key}: {what}"));
        let states: Vec<(&str, &Tensor)> = ["nf4", "fp4"]
            .iter()
            .filter_map(|t| {
                tensors
                    .get(&format!("{prefix}.quant_state.bitsandbytes__{t}"))
                    .map(|v| (*t, v))
            })
            .collect();
        let (qt, state) = match states.as_slice() {
            [one] => *one,
            [] => {
                return Err(PeftError::MissingKey(format!(
                    "{prefix}.quant_state.bitsandbytes__nf4"
                )));
            }
            _ => {
                return Err(bad(
                    prefix,
                    "holds both an nf4 and an fp4 quant state".into(),
                ));
            }
        };
        let state_key = format!("{prefix}.quant_state.bitsandbytes__{qt}");
        let bytes = u8_vec(&state_key, state)?;
        let json: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| bad(&state_key, format!("is not a JSON quant state ({e})")))?;
        let field = |k: &str| {
            json.get(k)
                .ok_or_else(|| bad(&state_key, format!("has no `{k}`")))
        };
        let quant_type_s = field("quant_type")?
            .as_str()
            .ok_or_else(|| bad(&state_key, "`quant_type` is not a string".into()))?;
        let quant_type: Bnb4Type = quant_type_s.parse().map_err(|_| {
            bad(
                &state_key,
                format!("unknown bitsandbytes 4-bit quant_type {quant_type_s:?} (nf4 or fp4)"),
            )
        })?;
        if quant_type.as_str() != qt {
            return Err(bad(
                &state_key,
                format!("says quant_type {:?}", quant_type.as_str()),
            ));
        }
        let blocksize = field("blocksize")?
            .as_u64()
            .filter(|b| BLOCK_SIZES.contains(&(*b as usize)))
            .ok_or_else(|| {
                bad(
                    &state_key,
                    format!(
                        "`blocksize` {} is not one of {BLOCK_SIZES:?}",
                        json["blocksize"]
                    ),
                )
            })? as usize;
        let dtype_s = field("dtype")?.as_str().unwrap_or_default();
        let dtype = dtype_from_name(dtype_s).ok_or_else(|| {
            bad(
                &state_key,
                format!("`dtype` {dtype_s:?} is not float32, float16 or bfloat16"),
            )
        })?;
        let shape: Vec<usize> = field("shape")?
            .as_array()
            .and_then(|a| a.iter().map(|d| d.as_u64().map(|d| d as usize)).collect())
            .filter(|s: &Vec<usize>| !s.is_empty() && s.iter().all(|&d| d > 0))
            .ok_or_else(|| bad(&state_key, "`shape` is not a list of positive sizes".into()))?;
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .filter(|&n| n <= 1 << 40)
            .ok_or_else(|| bad(&state_key, format!("`shape` {shape:?} is too large")))?;
        let n_blocks = numel.div_ceil(blocksize);
        let need = |key: String| -> Result<&Tensor> {
            tensors.get(&key).ok_or(PeftError::MissingKey(key))
        };
        // The packed weight: any storage dtype (FSDP-QLoRA stores bf16), read as its raw bytes.
        let w = need(prefix.to_string())?;
        let packed = raw_bytes(prefix, w)?;
        if packed.len() != numel.div_ceil(2) {
            return Err(bad(
                prefix,
                format!(
                    "holds {} packed bytes ({:?} {:?}); a 4-bit weight of shape {shape:?} needs {}",
                    packed.len(),
                    w.dtype(),
                    w.dims(),
                    numel.div_ceil(2)
                ),
            ));
        }
        let qm_key = format!("{prefix}.quant_map");
        let qm = f32_vec(&qm_key, need(qm_key.clone())?)?;
        let quant_map: [f32; 16] = qm
            .try_into()
            .map_err(|v: Vec<f32>| bad(&qm_key, format!("has {} values, not 16", v.len())))?;
        let am_key = format!("{prefix}.absmax");
        let am = need(am_key.clone())?;
        let absmax = if json.get("nested_offset").is_some() {
            let offset = json["nested_offset"]
                .as_f64()
                .ok_or_else(|| bad(&state_key, "`nested_offset` is not a number".into()))?
                as f32;
            let nb = json.get("nested_blocksize").and_then(|v| v.as_u64());
            if nb != Some(NESTED_BLOCKSIZE as u64) {
                return Err(bad(
                    &state_key,
                    format!("`nested_blocksize` {nb:?} is not {NESTED_BLOCKSIZE}"),
                ));
            }
            let codes = u8_vec(&am_key, am)?;
            if codes.len() != n_blocks {
                return Err(bad(
                    &am_key,
                    format!(
                        "holds {} codes; {shape:?} in blocks of {blocksize} needs {n_blocks}",
                        codes.len()
                    ),
                ));
            }
            let na_key = format!("{prefix}.nested_absmax");
            let nested_absmax = f32_vec(&na_key, need(na_key.clone())?)?;
            if nested_absmax.len() != n_blocks.div_ceil(NESTED_BLOCKSIZE) {
                return Err(bad(
                    &na_key,
                    format!(
                        "holds {} values; {n_blocks} blocks need {}",
                        nested_absmax.len(),
                        n_blocks.div_ceil(NESTED_BLOCKSIZE)
                    ),
                ));
            }
            let nm_key = format!("{prefix}.nested_quant_map");
            let nested_quant_map = f32_vec(&nm_key, need(nm_key.clone())?)?;
            if nested_quant_map.len() != 256 {
                return Err(bad(
                    &nm_key,
                    format!("has {} values, not 256", nested_quant_map.len()),
                ));
            }
            Absmax::Nested {
                codes,
                nested_absmax,
                nested_quant_map,
                offset,
            }
        } else {
            let a = f32_vec(&am_key, am)?;
            if a.len() != n_blocks {
                return Err(bad(
                    &am_key,
                    format!(
                        "holds {} values; {shape:?} in blocks of {blocksize} needs {n_blocks}",
                        a.len()
                    ),
                ));
            }
            Absmax::Plain(a)
        };
        Ok(Self {
            quant_type,
            blocksize,
            shape,
            dtype,
            packed,
            quant_map,
            absmax,
        })
    }
}

/// The `shape` a quant state's JSON bytes record, if they parse.
pub fn quant_state_shape(json: &[u8]) -> Option<Vec<usize>> {
    let v: serde_json::Value = serde_json::from_slice(json).ok()?;
    v.get("shape")?
        .as_array()?
        .iter()
        .map(|d| d.as_u64().map(|d| d as usize))
        .collect()
}

/// The suffixes transformers stores beside a bnb 4-bit weight (`…weight.<suffix>`).
pub const STATE_SUFFIXES: [&str; 6] = [
    "absmax",
    "quant_map",
    "nested_absmax",
    "nested_quant_map",
    "quant_state.bitsandbytes__nf4",
    "quant_state.bitsandbytes__fp4",
];

fn u8_vec(key: &str, t: &Tensor) -> Result<Vec<u8>> {
    if t.dtype() != DType::U8 {
        return Err(PeftError::Invalid(format!(
            "{key}: expected uint8, got {:?}",
            t.dtype()
        )));
    }
    Ok(t.flatten_all()?.to_vec1::<u8>()?)
}

fn f32_vec(key: &str, t: &Tensor) -> Result<Vec<f32>> {
    if t.dtype() != DType::F32 {
        return Err(PeftError::Invalid(format!(
            "{key}: expected float32, got {:?}",
            t.dtype()
        )));
    }
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// The raw little-endian bytes of a tensor of any dtype (bnb's `quant_storage` views the packed bytes as
/// another dtype).
fn raw_bytes(key: &str, t: &Tensor) -> Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::U8 => t.to_vec1::<u8>()?,
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|v| v.to_bits().to_le_bytes())
            .collect(),
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => {
            return Err(PeftError::Invalid(format!(
                "{key}: a packed 4-bit weight stored as {other:?} (uint8, bfloat16, float16 or float32 expected)"
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_books_are_bnbs() {
        let fp4 = Bnb4Type::Fp4.code();
        assert_eq!(fp4[3], 1.0);
        assert_eq!(fp4[1], 0.0625f32 / 12.0);
        assert_eq!(fp4[8].to_bits(), 0, "index 8 is +0");
        let map = dynamic_map();
        assert_eq!(map.len(), 256);
        assert_eq!(map[255], 1.0);
        assert!((map[0] + 0.99297).abs() < 1e-4, "{}", map[0]);
        assert!(map.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(map.iter().filter(|&&v| v == 0.0).count(), 1);
    }

    #[test]
    fn nibbles_pack_high_first_and_round_trip_through_the_state_dict() {
        // 7 values (odd) in one block: absmax 1, codes of the exact NF4 entries.
        let x = [1.0f32, -1.0, 0.0, NF4_CODE[13], NF4_CODE[6], 0.3, 0.9];
        let q = Bnb4Weight::quantize(&x, &[7], DType::F32, Bnb4Options::default()).unwrap();
        assert_eq!(q.packed, vec![0xF0, 0x7D, 0x6B, 0xF7]);
        let d = q.dequantize_f32();
        assert_eq!(&d[..5], &x[..5]);
        let tensors: IndexMap<String, Tensor> = q
            .state_dict("w", &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(Bnb4Weight::from_state_dict("w", &tensors).unwrap(), q);
        assert_eq!(
            q.quant_state_json().unwrap(),
            r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [7]}"#
        );
    }

    #[test]
    fn state_dict_errors_name_the_tensor() {
        let x: Vec<f32> = (0..256).map(|i| (i as f32).sin()).collect();
        let opts = Bnb4Options {
            double_quant: true,
            ..Default::default()
        };
        let q = Bnb4Weight::quantize(&x, &[4, 64], DType::F32, opts).unwrap();
        let full: IndexMap<String, Tensor> = q
            .state_dict("m.weight", &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
        let mut truncated = full.clone();
        truncated.insert(
            "m.weight".into(),
            Tensor::zeros((100, 1), DType::U8, &Device::Cpu).unwrap(),
        );
        let e = Bnb4Weight::from_state_dict("m.weight", &truncated)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m.weight: holds 100 packed bytes") && e.contains("needs 128"),
            "{e}"
        );
        let mut no_nested = full.clone();
        no_nested.shift_remove("m.weight.nested_absmax");
        let e = Bnb4Weight::from_state_dict("m.weight", &no_nested).unwrap_err();
        assert!(
            matches!(&e, PeftError::MissingKey(k) if k == "m.weight.nested_absmax"),
            "{e}"
        );
        let mut bad_state = full.clone();
        let json =
            br#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [8, 64]}"#;
        bad_state.insert(
            "m.weight.quant_state.bitsandbytes__nf4".into(),
            Tensor::new(&json[..], &Device::Cpu).unwrap(),
        );
        let e = Bnb4Weight::from_state_dict("m.weight", &bad_state)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m.weight: holds 128 packed bytes") && e.contains("[8, 64]"),
            "{e}"
        );
        let mut unknown = full;
        let json =
            br#"{"quant_type": "nf3", "blocksize": 64, "dtype": "float32", "shape": [4, 64]}"#;
        unknown.insert(
            "m.weight.quant_state.bitsandbytes__nf4".into(),
            Tensor::new(&json[..], &Device::Cpu).unwrap(),
        );
        let e = Bnb4Weight::from_state_dict("m.weight", &unknown)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown bitsandbytes 4-bit quant_type \"nf3\""),
            "{e}"
        );
    }
}
