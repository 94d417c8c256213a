//! AWQ weights in the `gemm` layout (AutoAWQ's, which transformers 5 loads through gptqmodel 7.7.0): 4-bit
//! codes packed eight to an int32 word along the **output** dimension in the interleaved order
//! `[0, 2, 4, 6, 1, 3, 5, 7]`, and one zero point and float16 scale per (group of inputs, output).
//!
//! ```text
//! qweight  int32 [in, out/8]     nibble k (bits 4k..4k+3) of word j in row i: output 8j + ORDER[k]
//! qzeros   int32 [G, out/8]      the zero points, packed the same way (stored as they are, no offset)
//! scales   f16   [G, out]
//! W[o, i]  = f16((q[i, o] − z[g, o]) · scales[g, o])     g = i / (in / G), in float16 (dequantize_gemm)
//! ```
//!
//! There is no `g_idx` and no act-order.

use super::gptq::{dequant_f16, f16_scales, int_words};
use crate::{PeftError, Result};
use candle_core::{Device, Tensor};
use half::f16;
use indexmap::IndexMap;

/// Which output of a word's eight each nibble holds (`AWQ_ORDER`).
pub const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// The nibble holding each of a word's eight outputs (`AWQ_REVERSE_ORDER`).
pub const AWQ_REVERSE_ORDER: [usize; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// The suffixes of the tensors transformers stores for an AWQ Linear module (besides an optional `bias`).
pub const STATE_SUFFIXES: [&str; 3] = ["qweight", "qzeros", "scales"];

/// An AWQ (`gemm`, 4-bit) Linear weight `[out, in]`, held packed as stored (its zero points decoded).
#[derive(Clone, Debug, PartialEq)]
pub struct AwqWeight {
    /// `[out, in]`.
    pub shape: Vec<usize>,
    /// Inputs per group (`in / groups`).
    pub group_size: usize,
    /// The packed codes as stored, row-major `[in, out/8]`.
    pub qweight: Vec<u32>,
    /// The zero points, row-major `[groups, out]`.
    pub zeros: Vec<u8>,
    /// The scales, row-major `[groups, out]`.
    pub scales: Vec<f16>,
}

/// The nibble of output `o` in its packed word.
#[inline]
fn nibble(word: u32, o: usize) -> u32 {
    (word >> (4 * AWQ_REVERSE_ORDER[o % 8])) & 15
}

/// Packs a row of 4-bit values (a multiple of 8) in the AWQ order.
fn pack_row(vals: &[u8]) -> Vec<u32> {
    vals.chunks_exact(8)
        .map(|c| {
            AWQ_ORDER
                .iter()
                .enumerate()
                .fold(0u32, |w, (k, &o)| w | ((c[o] as u32 & 15) << (4 * k)))
        })
        .collect()
}

impl AwqWeight {
    /// Reads AWQ module `module`'s `qweight`, `qzeros` and `scales` from `tensors`. The shape `[out, in]` comes
    /// from the packed tensors (`in` from `qweight`, `out` from `scales`) and the group size is `in / groups`;
    /// disagreeing shapes are errors naming the tensor.
    pub fn from_state_dict(module: &str, tensors: &IndexMap<String, Tensor>) -> Result<Self> {
        let key = |s: &str| format!("{module}.{s}");
        let get = |s: &str| tensors.get(&key(s)).ok_or(PeftError::MissingKey(key(s)));
        let (qw, qz, sc) = (get("qweight")?, get("qzeros")?, get("scales")?);
        let scales = f16_scales(&key("scales"), sc)?;
        let (groups, out) = (sc.dims()[0], sc.dims()[1]);
        if groups == 0 || out == 0 || !out.is_multiple_of(8) {
            return Err(PeftError::Invalid(format!(
                "{}: {:?}; AWQ gemm packs 8 outputs to a word, so out must be a positive multiple of 8",
                key("scales"),
                sc.dims()
            )));
        }
        let &[inp, cols] = qw.dims() else {
            return Err(PeftError::Invalid(format!(
                "{}: expected int32 [in, out/8], got {:?}",
                key("qweight"),
                qw.dims()
            )));
        };
        if cols != out / 8 || inp == 0 {
            return Err(PeftError::ShapeMismatch {
                name: key("qweight"),
                expected: vec![inp, out / 8],
                got: qw.dims().to_vec(),
            });
        }
        if !inp.is_multiple_of(groups) {
            return Err(PeftError::Invalid(format!(
                "{}: {groups} groups do not divide the {inp} inputs of qweight",
                key("scales")
            )));
        }
        if qz.dims() != [groups, out / 8] {
            return Err(PeftError::ShapeMismatch {
                name: key("qzeros"),
                expected: vec![groups, out / 8],
                got: qz.dims().to_vec(),
            });
        }
        let qweight = int_words(&key("qweight"), qw)?;
        let qzeros = int_words(&key("qzeros"), qz)?;
        let zeros = (0..groups * out)
            .map(|k| nibble(qzeros[k / 8], k % 8) as u8)
            .collect();
        Ok(Self {
            shape: vec![out, inp],
            group_size: inp / groups,
            qweight,
            zeros,
            scales,
        })
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        4 * self.qweight.len() + self.zeros.len() + 2 * self.scales.len()
    }

    /// The code of input `i` for output `o`.
    #[inline]
    pub fn code(&self, i: usize, o: usize) -> u32 {
        let words = self.shape[0] / 8;
        nibble(self.qweight[i * words + o / 8], o)
    }

    /// Dequantizes the row-major elements `[start, start + dst.len())` of `[out, in]` into `dst`, in float16
    /// arithmetic as gptqmodel's `dequantize_gemm` does.
    pub fn dequantize_into(&self, start: usize, dst: &mut [f32]) {
        let (out, inp) = (self.shape[0], self.shape[1]);
        // Row by row: the output row and the input range of each stretch of `dst`.
        let (mut e, mut rest) = (start, &mut dst[..]);
        while !rest.is_empty() {
            let (o, i0) = (e / inp, e % inp);
            let n = (inp - i0).min(rest.len());
            let (row, tail) = std::mem::take(&mut rest).split_at_mut(n);
            for (d, i) in row.iter_mut().zip(i0..) {
                let g = (i / self.group_size) * out + o;
                *d = dequant_f16(self.scales[g], self.code(i, o), self.zeros[g] as u32);
            }
            (e, rest) = (e + n, tail);
        }
    }

    /// The whole weight dequantized, float16 `[out, in]` (`dequantize_gemm`, transposed).
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let mut v = vec![0f32; self.shape[0] * self.shape[1]];
        self.dequantize_into(0, &mut v);
        let v: Vec<f16> = v.into_iter().map(f16::from_f32).collect();
        Ok(Tensor::from_vec(v, self.shape.as_slice(), device)?)
    }

    /// The tensors a checkpoint stores for `module`: `qweight`, `qzeros` (int32) and `scales` (float16).
    pub fn state_dict(&self, module: &str, device: &Device) -> Result<Vec<(String, Tensor)>> {
        let (out, inp) = (self.shape[0], self.shape[1]);
        let groups = self.scales.len() / out;
        let mut qweight = Vec::with_capacity(inp * out / 8);
        for i in 0..inp {
            let row: Vec<u8> = (0..out).map(|o| self.code(i, o) as u8).collect();
            qweight.extend(pack_row(&row));
        }
        let qzeros: Vec<u32> = self.zeros.chunks_exact(out).flat_map(pack_row).collect();
        let i32s = |v: Vec<u32>| v.into_iter().map(|w| w as i32).collect::<Vec<i32>>();
        Ok(vec![
            (
                format!("{module}.qweight"),
                Tensor::from_vec(i32s(qweight), (inp, out / 8), device)?,
            ),
            (
                format!("{module}.qzeros"),
                Tensor::from_vec(i32s(qzeros), (groups, out / 8), device)?,
            ),
            (
                format!("{module}.scales"),
                Tensor::from_vec(self.scales.clone(), (groups, out), device)?,
            ),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaved_nibbles_and_round_trip() {
        // Word 0x76543210 holds nibble k = k: output ORDER[k] gets code k.
        assert_eq!(
            (0..8).map(|o| nibble(0x7654_3210, o)).collect::<Vec<_>>(),
            [0, 4, 1, 5, 2, 6, 3, 7]
        );
        let (out, inp, groups) = (16, 12, 3);
        let w = AwqWeight {
            shape: vec![out, inp],
            group_size: inp / groups,
            qweight: (0..inp * out / 8)
                .map(|k| (k as u32).wrapping_mul(0x9E37_79B9))
                .collect(),
            zeros: (0..groups * out).map(|k| (k % 16) as u8).collect(),
            scales: (0..groups * out)
                .map(|k| f16::from_f32(0.02 + k as f32 * 1e-3))
                .collect(),
        };
        let t: IndexMap<String, Tensor> = w
            .state_dict("m", &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
        assert_eq!(AwqWeight::from_state_dict("m", &t).unwrap(), w);
    }
}
