//! GPTQ weights as transformers, optimum and gptqmodel 7.7.0 store them: integer codes packed in int32 words
//! along the input dimension, one zero point and one float16 scale per (group, output), and the group of each
//! input column in `g_idx`.
//!
//! ```text
//! qweight  int32 [ceil(in·bits/32), out]   column o: the codes of inputs 0, 1, … as one little-endian bit
//!                                          stream of `bits`-bit fields (3-bit values cross word boundaries)
//! qzeros   int32 [G, ceil(out·bits/32)]    row g: the zero points of outputs 0, 1, … packed the same way
//! scales   f16   [G, out]
//! g_idx    int32 [in]                      group of each input column (not monotone with desc_act)
//! W[o, i]  = f16(scales[g, o] · (q[i, o] − z[g, o]))    g = g_idx[i], computed in float16 as gptqmodel does
//! ```
//!
//! The `gptq` checkpoint format (v1, what AutoGPTQ, optimum and the Hub use, and gptqmodel's default export)
//! stores `z − 1`: gptqmodel subtracts `0x11111111` (4-bit; `0x55555555` 2-bit, `0x01010101` 8-bit) from the
//! whole packed word, so a zero point of 0 borrows from the next field, and it adds the constant back to the
//! whole word on load, which undoes the borrow exactly; 3-bit zero points are shifted field by field (mod 8).
//! `gptq_v2` stores the zero points as they are.

use crate::{PeftError, Result};
use candle_core::{DType, Device, Tensor};
use half::f16;
use indexmap::IndexMap;

/// How a GPTQ checkpoint stores its zero points (`quantization_config.checkpoint_format`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GptqFormat {
    /// `"gptq"` (v1): each packed field holds `z − 1`, the offset applied to whole words (3-bit: per field).
    #[default]
    V1,
    /// `"gptq_v2"`: the zero points as they are.
    V2,
}

impl GptqFormat {
    /// From `checkpoint_format` (`"gptq"` or `"gptq_v2"`).
    ///
    /// ```
    /// use peft::quant::gptq::GptqFormat;
    /// assert_eq!(GptqFormat::parse("gptq_v2"), Some(GptqFormat::V2));
    /// assert_eq!(GptqFormat::parse("marlin"), None);
    /// ```
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "gptq" => Some(GptqFormat::V1),
            "gptq_v2" => Some(GptqFormat::V2),
            _ => None,
        }
    }
}

/// The bit widths GPTQ checkpoints use.
pub const GPTQ_BITS: [u32; 4] = [2, 3, 4, 8];

/// The suffixes of the tensors transformers stores for a GPTQ Linear module (besides an optional `bias`).
pub const STATE_SUFFIXES: [&str; 4] = ["qweight", "qzeros", "scales", "g_idx"];

/// A GPTQ-quantized Linear weight `[out, in]`, held packed as stored (its zero points decoded).
#[derive(Clone, Debug, PartialEq)]
pub struct GptqWeight {
    /// `[out, in]`.
    pub shape: Vec<usize>,
    /// Bits per code: 2, 3, 4 or 8.
    pub bits: u32,
    /// The packed codes as stored, row-major `[ceil(in·bits/32), out]`.
    pub qweight: Vec<u32>,
    /// The zero points (offset of the v1 format undone), row-major `[groups, out]`.
    pub zeros: Vec<u8>,
    /// The scales, row-major `[groups, out]`.
    pub scales: Vec<f16>,
    /// The group of each input column, `[in]`.
    pub g_idx: Vec<u32>,
}

/// Reads field `k` (`bits` wide) of the little-endian bit stream whose `w`-th 32-bit word is `word(w)`.
#[inline]
fn field(word: impl Fn(usize) -> u32, bits: u32, k: usize) -> u32 {
    let pos = bits as usize * k;
    let (w, sh) = (pos / 32, (pos % 32) as u32);
    let mut v = word(w) >> sh;
    if sh + bits > 32 {
        v |= word(w + 1) << (32 - sh);
    }
    v & ((1u32 << bits) - 1)
}

/// Packs `values` (each < 2^bits) as one little-endian bit stream of `bits`-bit fields into `n_words` words.
fn pack_stream(values: impl Iterator<Item = u32>, bits: u32, n_words: usize) -> Vec<u32> {
    let mut words = vec![0u32; n_words];
    for (k, v) in values.enumerate() {
        let pos = bits as usize * k;
        let (w, sh) = (pos / 32, (pos % 32) as u32);
        words[w] |= v << sh;
        if sh + bits > 32 {
            words[w + 1] |= v >> (32 - sh);
        }
    }
    words
}

/// The v1 word offset of gptqmodel for `bits` (a 1 in every field), or `None` for 3-bit (shifted per field).
fn v1_word_offset(bits: u32) -> Option<u32> {
    match bits {
        2 => Some(0x5555_5555),
        4 => Some(0x1111_1111),
        8 => Some(0x0101_0101),
        _ => None,
    }
}

/// The values of an integer tensor (int32, uint32 or int64) as u32 bit patterns (int32 words keep their
/// bits), checking its dtype; errors name `key`.
pub(crate) fn int_words(key: &str, t: &Tensor) -> Result<Vec<u32>> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::I32 => flat
            .to_vec1::<i32>()?
            .into_iter()
            .map(|v| v as u32)
            .collect(),
        DType::U32 => flat.to_vec1::<u32>()?,
        DType::I64 => flat
            .to_vec1::<i64>()?
            .into_iter()
            .map(|v| v as u32)
            .collect(),
        d => {
            return Err(PeftError::Invalid(format!(
                "{key}: expected int32 words, got {d:?}"
            )));
        }
    })
}

/// The f16 scales `[groups, out]` stored under `key`; errors name it.
pub(crate) fn f16_scales(key: &str, t: &Tensor) -> Result<Vec<f16>> {
    if t.dtype() != DType::F16 || t.rank() != 2 {
        return Err(PeftError::Invalid(format!(
            "{key}: expected float16 scales [groups, out], got {:?} {:?}",
            t.dtype(),
            t.dims()
        )));
    }
    Ok(t.flatten_all()?.to_vec1::<f16>()?)
}

/// `f16(s · (q − z))` with float16 rounding of the product, as torch's `scales * (q - z)` in float16 (the
/// f32 product of a float16 and an integer below 2^9 is exact, so one rounding gives torch's result).
#[inline]
pub(crate) fn dequant_f16(s: f16, q: u32, z: u32) -> f32 {
    f16::from_f32(s.to_f32() * (q as f32 - z as f32)).to_f32()
}

impl GptqWeight {
    /// Reads GPTQ module `module`'s `qweight`, `qzeros`, `scales` and `g_idx` from `tensors`, in checkpoint
    /// format `format`. The shape `[out, in]` and the bit width come from the packed tensors (`in` from
    /// `g_idx`, `out` from `scales`); every disagreement among them, an unknown bit width or a group index out
    /// of range is an error naming the tensor.
    pub fn from_state_dict(
        module: &str,
        tensors: &IndexMap<String, Tensor>,
        format: GptqFormat,
    ) -> Result<Self> {
        let key = |s: &str| format!("{module}.{s}");
        let get = |s: &str| tensors.get(&key(s)).ok_or(PeftError::MissingKey(key(s)));
        let (qw, qz, sc, gi) = (
            get("qweight")?,
            get("qzeros")?,
            get("scales")?,
            get("g_idx")?,
        );
        let scales = f16_scales(&key("scales"), sc)?;
        let (groups, out) = (sc.dims()[0], sc.dims()[1]);
        if groups == 0 || out == 0 {
            return Err(PeftError::Invalid(format!(
                "{}: empty scales {:?}",
                key("scales"),
                sc.dims()
            )));
        }
        if gi.rank() != 1 {
            return Err(PeftError::Invalid(format!(
                "{}: expected a vector [in], got {:?}",
                key("g_idx"),
                gi.dims()
            )));
        }
        let inp = gi.dims()[0];
        let &[rows, qw_out] = qw.dims() else {
            return Err(PeftError::Invalid(format!(
                "{}: expected int32 [in·bits/32, out], got {:?}",
                key("qweight"),
                qw.dims()
            )));
        };
        if qw_out != out {
            return Err(PeftError::ShapeMismatch {
                name: key("qweight"),
                expected: vec![rows, out],
                got: qw.dims().to_vec(),
            });
        }
        let bits = GPTQ_BITS
            .into_iter()
            .filter(|&b| (inp * b as usize).div_ceil(32) == rows)
            .filter(|&b| qz.dims().get(1) == Some(&(out * b as usize).div_ceil(32)))
            .collect::<Vec<_>>();
        let &[bits] = bits.as_slice() else {
            return Err(PeftError::Invalid(format!(
                "{}: {:?} with qzeros {:?} for {inp} inputs (g_idx) and {out} outputs (scales) is not a packing of \
                 2, 3, 4 or 8 bits",
                key("qweight"),
                qw.dims(),
                qz.dims()
            )));
        };
        let qz_cols = (out * bits as usize).div_ceil(32);
        if qz.dims() != [groups, qz_cols] {
            return Err(PeftError::ShapeMismatch {
                name: key("qzeros"),
                expected: vec![groups, qz_cols],
                got: qz.dims().to_vec(),
            });
        }
        let qweight = int_words(&key("qweight"), qw)?;
        let mut qzeros = int_words(&key("qzeros"), qz)?;
        let g_idx = int_words(&key("g_idx"), gi)?;
        if let Some((i, &g)) = g_idx
            .iter()
            .enumerate()
            .find(|&(_, &g)| g as usize >= groups)
        {
            return Err(PeftError::Invalid(format!(
                "{}: group {} of input {i} is out of range ({groups} groups in scales)",
                key("g_idx"),
                g as i32
            )));
        }
        let mask = (1u32 << bits) - 1;
        let v1_field_shift = format == GptqFormat::V1 && v1_word_offset(bits).is_none();
        if format == GptqFormat::V1
            && let Some(off) = v1_word_offset(bits)
        {
            qzeros.iter_mut().for_each(|w| *w = w.wrapping_add(off));
        }
        let mut zeros = Vec::with_capacity(groups * out);
        for row in qzeros.chunks_exact(qz_cols) {
            for o in 0..out {
                let z = field(|w| row[w], bits, o);
                zeros.push(if v1_field_shift { (z + 1) & mask } else { z } as u8);
            }
        }
        Ok(Self {
            shape: vec![out, inp],
            bits,
            qweight,
            zeros,
            scales,
            g_idx,
        })
    }

    /// The number of groups (rows of `scales`).
    pub fn groups(&self) -> usize {
        self.scales.len() / self.shape[0]
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        4 * self.qweight.len() + self.zeros.len() + 2 * self.scales.len() + 4 * self.g_idx.len()
    }

    /// The code of input `i` for output `o`.
    #[inline]
    pub fn code(&self, i: usize, o: usize) -> u32 {
        let out = self.shape[0];
        field(|w| self.qweight[w * out + o], self.bits, i)
    }

    /// Dequantizes the row-major elements `[start, start + dst.len())` of `[out, in]` into `dst`, in float16
    /// arithmetic as gptqmodel does.
    pub fn dequantize_into(&self, start: usize, dst: &mut [f32]) {
        let (out, inp) = (self.shape[0], self.shape[1]);
        // Row by row: the output row and the input range of each stretch of `dst`.
        let (mut e, mut rest) = (start, &mut dst[..]);
        while !rest.is_empty() {
            let (o, i0) = (e / inp, e % inp);
            let n = (inp - i0).min(rest.len());
            let (row, tail) = std::mem::take(&mut rest).split_at_mut(n);
            for (d, i) in row.iter_mut().zip(i0..) {
                let g = self.g_idx[i] as usize * out + o;
                *d = dequant_f16(self.scales[g], self.code(i, o), self.zeros[g] as u32);
            }
            (e, rest) = (e + n, tail);
        }
    }

    /// The whole weight dequantized, float16 `[out, in]` (gptqmodel's `dequantize_weight()`, transposed).
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let mut v = vec![0f32; self.shape[0] * self.shape[1]];
        self.dequantize_into(0, &mut v);
        let v: Vec<f16> = v.into_iter().map(f16::from_f32).collect();
        Ok(Tensor::from_vec(v, self.shape.as_slice(), device)?)
    }

    /// The tensors a checkpoint stores for `module` in `format`: `qweight`, `qzeros`, `scales` and `g_idx`
    /// (int32 words, float16 scales).
    pub fn state_dict(
        &self,
        module: &str,
        format: GptqFormat,
        device: &Device,
    ) -> Result<Vec<(String, Tensor)>> {
        let (out, inp) = (self.shape[0], self.shape[1]);
        let bits = self.bits;
        let qz_cols = (out * bits as usize).div_ceil(32);
        let mask = (1u32 << bits) - 1;
        let mut qzeros = Vec::with_capacity(self.groups() * qz_cols);
        for row in self.zeros.chunks_exact(out) {
            let field_shift = format == GptqFormat::V1 && v1_word_offset(bits).is_none();
            let vals = row.iter().map(|&z| {
                if field_shift {
                    (z as u32).wrapping_sub(1) & mask
                } else {
                    z as u32
                }
            });
            let mut words = pack_stream(vals, bits, qz_cols);
            if format == GptqFormat::V1
                && let Some(off) = v1_word_offset(bits)
            {
                words.iter_mut().for_each(|w| *w = w.wrapping_sub(off));
            }
            qzeros.extend(words);
        }
        let i32s = |v: &[u32]| v.iter().map(|&w| w as i32).collect::<Vec<i32>>();
        let rows = (inp * bits as usize).div_ceil(32);
        Ok(vec![
            (
                format!("{module}.qweight"),
                Tensor::from_vec(i32s(&self.qweight), (rows, out), device)?,
            ),
            (
                format!("{module}.qzeros"),
                Tensor::from_vec(i32s(&qzeros), (self.groups(), qz_cols), device)?,
            ),
            (
                format!("{module}.scales"),
                Tensor::from_vec(self.scales.clone(), (self.groups(), out), device)?,
            ),
            (
                format!("{module}.g_idx"),
                Tensor::from_vec(i32s(&self.g_idx), inp, device)?,
            ),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A weight from codes, zeros and scales, through its own state dict (the packing).
    fn weight(bits: u32, out: usize, inp: usize, groups: usize) -> GptqWeight {
        let maxq = (1u32 << bits) - 1;
        let codes: Vec<u32> = (0..inp * out)
            .map(|k| (k as u32 * 7 + 3) % (maxq + 1))
            .collect();
        let rows = (inp * bits as usize).div_ceil(32);
        let mut qweight = vec![0u32; rows * out];
        for o in 0..out {
            let col = pack_stream((0..inp).map(|i| codes[i * out + o]), bits, rows);
            for (r, w) in col.into_iter().enumerate() {
                qweight[r * out + o] = w;
            }
        }
        GptqWeight {
            shape: vec![out, inp],
            bits,
            qweight,
            // Zero points of 0 in the first group: the v1 borrow case.
            zeros: (0..groups * out)
                .map(|k| {
                    if k < out {
                        0
                    } else {
                        (k as u32 % (maxq + 1)) as u8
                    }
                })
                .collect(),
            scales: (0..groups * out)
                .map(|k| f16::from_f32(0.01 + k as f32 * 1e-3))
                .collect(),
            g_idx: (0..inp).map(|i| ((i * 5) % groups) as u32).collect(),
        }
    }

    #[test]
    fn state_dict_round_trips_in_both_formats_and_bit_widths() {
        for bits in GPTQ_BITS {
            let w = weight(bits, 64, 96, 3);
            for i in [0, 1, 10, 11, 21, 22, 95] {
                let o = 5;
                assert_eq!(w.code(i, o), (((i * 64 + o) as u32) * 7 + 3) % (1 << bits));
            }
            for fmt in [GptqFormat::V1, GptqFormat::V2] {
                let t: IndexMap<String, Tensor> = w
                    .state_dict("m", fmt, &Device::Cpu)
                    .unwrap()
                    .into_iter()
                    .collect();
                assert_eq!(
                    GptqWeight::from_state_dict("m", &t, fmt).unwrap(),
                    w,
                    "{bits} {fmt:?}"
                );
            }
        }
    }

    #[test]
    fn dequantizes_in_float16() {
        let w = weight(4, 32, 64, 2);
        let d = w
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let (o, i) = (3, 7);
        let g = w.g_idx[i] as usize * 32 + o;
        let exact = w.scales[g].to_f32() as f64 * (w.code(i, o) as f64 - w.zeros[g] as f64);
        assert_eq!(d[o][i], f16::from_f64(exact).to_f32());
    }
}
