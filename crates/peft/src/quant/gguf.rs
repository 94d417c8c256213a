//! GGUF (llama.cpp) quantized weights kept as stored (Q4_0 … Q8_0, Q2_K … Q6_K), dequantized band by band with
//! candle's own block decoders, so that training reads the GGUF's weights without an f32 copy of the model.

use crate::{PeftError, Result};
use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};
use std::borrow::Cow;

/// A 2-D GGUF tensor `[out, in]` in its ggml block format, with an optional row permutation (llama.cpp stores
/// the query and key projections with their rows permuted for its RoPE layout).
#[derive(Clone, Debug, PartialEq)]
pub struct GgufWeight {
    /// The ggml block type.
    pub ggml_dtype: GgmlDType,
    /// The raw blocks, row after row as stored.
    pub data: Vec<u8>,
    /// `[out, in]`, the weight's logical (HF) shape.
    pub shape: Vec<usize>,
    /// `row_perm[r]`: the stored row that holds logical row `r` (`None`: the identity).
    pub row_perm: Option<Vec<u32>>,
}

impl GgufWeight {
    /// Checks the sizes: `in` a multiple of the block size, `data` exactly `out` rows of blocks, the permutation
    /// a permutation of the rows.
    pub fn new(
        ggml_dtype: GgmlDType,
        data: Vec<u8>,
        shape: Vec<usize>,
        row_perm: Option<Vec<u32>>,
    ) -> Result<Self> {
        let &[out, inp] = shape.as_slice() else {
            return Err(PeftError::Invalid(format!(
                "a GGUF Linear weight has 2 dimensions, got {shape:?}"
            )));
        };
        let bs = ggml_dtype.block_size();
        if inp % bs != 0 {
            return Err(PeftError::Invalid(format!(
                "GGUF {ggml_dtype:?} weight {shape:?}: rows of {inp} are not whole blocks of {bs}"
            )));
        }
        let want = out * inp / bs * ggml_dtype.type_size();
        if data.len() != want {
            return Err(PeftError::Invalid(format!(
                "GGUF {ggml_dtype:?} weight {shape:?} needs {want} bytes, got {}",
                data.len()
            )));
        }
        if let Some(p) = &row_perm {
            let mut seen = vec![false; out];
            if p.len() != out
                || !p
                    .iter()
                    .all(|&r| (r as usize) < out && !std::mem::replace(&mut seen[r as usize], true))
            {
                return Err(PeftError::Invalid(format!(
                    "GGUF weight {shape:?}: the row permutation is not a permutation of {out} rows"
                )));
            }
        }
        Ok(Self {
            ggml_dtype,
            data,
            shape,
            row_perm,
        })
    }

    fn row_bytes(&self) -> usize {
        self.shape[1] / self.ggml_dtype.block_size() * self.ggml_dtype.type_size()
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        self.data.len() + self.row_perm.as_ref().map_or(0, |p| 4 * p.len())
    }

    /// Dequantizes the row-major elements `[start, start + out.len())` of the logical weight into `out`.
    pub fn dequantize_into(&self, start: usize, out: &mut [f32]) -> Result<()> {
        let k = self.shape[1];
        if start.is_multiple_of(k) && out.len().is_multiple_of(k) {
            // Whole rows (what the quantized Linear asks for): each stored row's blocks decoded straight into
            // its logical place.
            let rb = self.row_bytes();
            for (j, dst) in out.chunks_exact_mut(k).enumerate() {
                let r = start / k + j;
                let stored = self.row_perm.as_ref().map_or(r, |p| p[r] as usize);
                decode_row(
                    self.ggml_dtype,
                    &self.data[stored * rb..(stored + 1) * rb],
                    dst,
                )?;
            }
            return Ok(());
        }
        let (r0, r1) = (start / k, (start + out.len()).div_ceil(k));
        let mut rows = vec![0f32; (r1 - r0) * k];
        self.dequantize_into(r0 * k, &mut rows)?;
        let off = start - r0 * k;
        out.copy_from_slice(&rows[off..off + out.len()]);
        Ok(())
    }

    /// The whole weight dequantized (f32).
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let mut v = vec![0f32; self.shape.iter().product()];
        self.dequantize_into(0, &mut v)?;
        Ok(Tensor::from_vec(v, self.shape.as_slice(), device)?)
    }

    /// The dtype dequantization gives.
    pub fn dtype(&self) -> DType {
        DType::F32
    }

    /// `w` quantized to the same block type, rows stored in the same permuted order (what a merge into a
    /// GGUF base writes back).
    pub fn requantize(&self, w: &Tensor) -> Result<Self> {
        let w = w.to_dtype(DType::F32)?;
        let stored = match &self.row_perm {
            Some(p) => {
                // stored row p[r] holds logical row r: gather logical rows in stored order.
                let mut inv = vec![0u32; p.len()];
                for (r, &s) in p.iter().enumerate() {
                    inv[s as usize] = r as u32;
                }
                let idx = Tensor::new(inv.as_slice(), w.device())?;
                w.index_select(&idx, 0)?
            }
            None => w,
        };
        let q = candle_core::quantized::QTensor::quantize(&stored, self.ggml_dtype)?;
        Self::new(
            self.ggml_dtype,
            q.data()?.into_owned(),
            self.shape.clone(),
            self.row_perm.clone(),
        )
    }
}

/// Decodes one row of ggml blocks into `dst` with candle's block decoders, reading the blocks in place when the
/// bytes are aligned for the block type (else through a copy).
fn decode_row(dtype: GgmlDType, bytes: &[u8], dst: &mut [f32]) -> Result<()> {
    use candle_core::quantized::k_quants::*;
    fn run<T: GgmlType>(bytes: &[u8], dst: &mut [f32]) -> Result<()> {
        let n = bytes.len() / std::mem::size_of::<T>();
        if n * std::mem::size_of::<T>() != bytes.len() || n * T::BLCK_SIZE != dst.len() {
            return Err(PeftError::Invalid(format!(
                "GGUF {:?} row: {} bytes for {} values",
                T::DTYPE,
                bytes.len(),
                dst.len()
            )));
        }
        if (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
            // SAFETY: `bytes` holds exactly `n` blocks of `T` (checked above) at an address aligned for `T`;
            // ggml blocks are plain-old-data (integers and f16/f32 fields), valid for any bit pattern, as
            // candle itself reads them from file bytes.
            let blocks = unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const T, n) };
            T::to_float(blocks, dst);
        } else {
            let q = T::DTYPE.from_data(Cow::Borrowed(bytes));
            match q.dequantize(dst.len())? {
                candle_core::CpuStorage::F32(v) => dst.copy_from_slice(&v),
                _ => {
                    return Err(PeftError::Invalid(
                        "GGUF dequantization did not give f32".into(),
                    ));
                }
            }
        }
        Ok(())
    }
    match dtype {
        GgmlDType::Q4_0 => run::<BlockQ4_0>(bytes, dst),
        GgmlDType::Q4_1 => run::<BlockQ4_1>(bytes, dst),
        GgmlDType::Q5_0 => run::<BlockQ5_0>(bytes, dst),
        GgmlDType::Q5_1 => run::<BlockQ5_1>(bytes, dst),
        GgmlDType::Q8_0 => run::<BlockQ8_0>(bytes, dst),
        GgmlDType::Q8_1 => run::<BlockQ8_1>(bytes, dst),
        GgmlDType::Q2K => run::<BlockQ2K>(bytes, dst),
        GgmlDType::Q3K => run::<BlockQ3K>(bytes, dst),
        GgmlDType::Q4K => run::<BlockQ4K>(bytes, dst),
        GgmlDType::Q5K => run::<BlockQ5K>(bytes, dst),
        GgmlDType::Q6K => run::<BlockQ6K>(bytes, dst),
        GgmlDType::Q8K => run::<BlockQ8K>(bytes, dst),
        other => Err(PeftError::Unsupported {
            field: "tensor type".into(),
            value: format!("{other:?}"),
            reason: "only block-quantized GGUF weights are kept quantized".into(),
        }),
    }
}

/// llama.cpp's row order of a query / key projection with `heads` heads: `perm[r]` is the stored row of HF
/// row `r`, rows `(heads, 2, half)` stored as `(heads, half, 2)`.
pub fn llama_qk_row_perm(out: usize, heads: usize) -> Option<Vec<u32>> {
    if heads == 0 || !out.is_multiple_of(2 * heads) {
        return None;
    }
    let half = out / heads / 2;
    Some(
        (0..out)
            .map(|r| {
                let (h, rest) = (r / (2 * half), r % (2 * half));
                let (s, i) = (rest / half, rest % half);
                (h * 2 * half + i * 2 + s) as u32
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_and_permuted_rows_match_candles_dequantization() {
        let mut rng = crate::PeftRng::new(3);
        let (out, inp, heads) = (16, 64, 2);
        let w = rng
            .normal_tensor((out, inp), 0.0, 1.0, DType::F32, &Device::Cpu)
            .unwrap();
        for dt in [
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
        ] {
            let cols = if dt.block_size() > inp { 256 } else { inp };
            let w = if cols == inp {
                w.clone()
            } else {
                rng.normal_tensor((out, cols), 0.0, 1.0, DType::F32, &Device::Cpu)
                    .unwrap()
            };
            let q = candle_core::quantized::QTensor::quantize(&w, dt).unwrap();
            let want = q.dequantize(&Device::Cpu).unwrap();
            let perm = llama_qk_row_perm(out, heads).unwrap();
            let g = GgufWeight::new(
                dt,
                q.data().unwrap().into_owned(),
                vec![out, cols],
                Some(perm.clone()),
            )
            .unwrap();
            // Logical row r is stored row perm[r].
            let idx = Tensor::new(perm.as_slice(), &Device::Cpu).unwrap();
            let logical = want.index_select(&idx, 0).unwrap();
            let got = g.dequantize(&Device::Cpu).unwrap();
            assert_eq!(
                got.to_vec2::<f32>().unwrap(),
                logical.to_vec2::<f32>().unwrap(),
                "{dt:?}"
            );
            // A band of rows 5..11.
            let mut band = vec![0f32; 6 * cols];
            g.dequantize_into(5 * cols, &mut band).unwrap();
            assert_eq!(
                band,
                logical
                    .narrow(0, 5, 6)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            );
            // Re-quantizing keeps the block type, the row order and (nearly) the values.
            let back = g
                .requantize(&got)
                .unwrap()
                .dequantize(&Device::Cpu)
                .unwrap();
            let err = (back - &got)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(err < 0.3, "{dt:?}: {err}");
        }
        let e = GgufWeight::new(GgmlDType::Q4_1, vec![0; 7], vec![2, 32], None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs 40 bytes, got 7"), "{e}");
    }
}
