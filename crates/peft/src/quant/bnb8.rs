//! bitsandbytes 8-bit weights (LLM.int8's `Int8Params`): one int8 code per element and one f32 scale per row,
//! byte for byte as bitsandbytes 0.50.2 writes them.
//!
//! ```text
//! w16      = f16(W)                                  (the weight is quantized through float16)
//! SCB[o]   = max |w16[o, :]|                         (f32)
//! CB[o, i] = round_half_even(w16[o, i] · (127 / SCB[o]))   as int8
//! W'[o, i] = CB[o, i] · (SCB[o] · (1/127))           (MatMul8bitFp: bitsandbytes' CPU training path)
//! ```
//!
//! The forward here is that dequantized f32 product in train and eval mode alike. bitsandbytes' eval mode
//! computes LLM.int8 instead (activations quantized row-wise to int8, an int32 product, and the columns with an
//! |x| ≥ 6 outlier multiplied in the input dtype): on the tiny Llama of the fixtures its logits differ from the
//! dequantized product by about 0.04, and that mode is not implemented.

use crate::{PeftError, Result};
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;

/// An 8-bit weight as bitsandbytes stores it: `weight` (int8 `[out, in]`) and `SCB` (f32 `[out]`).
#[derive(Clone, Debug, PartialEq)]
pub struct Bnb8Weight {
    /// `[out, in]`.
    pub shape: Vec<usize>,
    /// Row-major int8 codes.
    pub codes: Vec<i8>,
    /// One scale (the row's absmax) per output row.
    pub scb: Vec<f32>,
}

impl Bnb8Weight {
    /// Quantizes a weight `[out, in]` (row-major f32 values) as `Int8Params` does.
    ///
    /// ```
    /// use peft::quant::bnb8::Bnb8Weight;
    /// let q = Bnb8Weight::quantize(&[0.5, -1.0, 0.25, 0.0], &[2, 2])?;
    /// assert_eq!((q.codes.as_slice(), q.scb.as_slice()), (&[64i8, -127, 127, 0][..], &[1.0f32, 0.25][..]));
    /// # Ok::<(), peft::PeftError>(())
    /// ```
    pub fn quantize(x: &[f32], shape: &[usize]) -> Result<Self> {
        let &[out, inp] = shape else {
            return Err(PeftError::Invalid(format!(
                "bitsandbytes 8-bit weights have 2 dimensions, got {shape:?}"
            )));
        };
        if x.len() != out * inp || x.is_empty() {
            return Err(PeftError::Invalid(format!(
                "cannot quantize {} values as a weight of shape {shape:?}",
                x.len()
            )));
        }
        let mut codes = Vec::with_capacity(x.len());
        let mut scb = Vec::with_capacity(out);
        for row in x.chunks_exact(inp) {
            let w16: Vec<f32> = row
                .iter()
                .map(|&v| half::f16::from_f32(v).to_f32())
                .collect();
            let s = w16.iter().fold(0f32, |m, v| m.max(v.abs()));
            // torch evaluates `127.0 / t` as a reciprocal times 127.
            let mul = (1.0 / s) * 127.0;
            codes.extend(w16.iter().map(|&v| {
                if s == 0.0 {
                    0
                } else {
                    (v * mul).round_ties_even().clamp(-128.0, 127.0) as i8
                }
            }));
            scb.push(s);
        }
        Ok(Self {
            shape: shape.to_vec(),
            codes,
            scb,
        })
    }

    /// Bytes held.
    pub fn nbytes(&self) -> usize {
        self.codes.len() + 4 * self.scb.len()
    }

    /// Dequantizes the row-major elements `[start, start + out.len())` into `out`: `CB · (SCB · (1/127))`.
    pub fn dequantize_into(&self, start: usize, out: &mut [f32]) {
        let k = self.shape[1];
        let inv127 = (1.0f64 / 127.0) as f32;
        for (j, o) in out.iter_mut().enumerate() {
            let e = start + j;
            *o = self.codes[e] as f32 * (self.scb[e / k] * inv127);
        }
    }

    /// The whole weight dequantized (f32).
    pub fn dequantize(&self, device: &Device) -> Result<Tensor> {
        let mut v = vec![0f32; self.codes.len()];
        self.dequantize_into(0, &mut v);
        Ok(Tensor::from_vec(v, self.shape.as_slice(), device)?)
    }

    /// Whether `tensors` hold a bitsandbytes 8-bit weight for `module` (`<module>.SCB`).
    pub fn is_stored(module: &str, tensors: &IndexMap<String, Tensor>) -> bool {
        tensors.contains_key(&format!("{module}.SCB"))
    }

    /// The tensors transformers saves for `module`: `<module>.weight` (int8, held here as u8 with the same bytes,
    /// candle having no int8), `<module>.SCB` and `<module>.weight_format` (0, "row").
    pub fn state_dict(&self, module: &str, device: &Device) -> Result<Vec<(String, Tensor)>> {
        let bytes: Vec<u8> = self.codes.iter().map(|&c| c as u8).collect();
        Ok(vec![
            (
                format!("{module}.weight"),
                Tensor::from_vec(bytes, self.shape.as_slice(), device)?,
            ),
            (
                format!("{module}.SCB"),
                Tensor::new(self.scb.as_slice(), device)?,
            ),
            (format!("{module}.weight_format"), Tensor::new(0u8, device)?),
        ])
    }

    /// Reads `module`'s 8-bit weight (`.weight` int8 or its u8 bytes, `.SCB`, optional `.weight_format`),
    /// checking the shapes against `[out, in]`; errors name the tensor.
    pub fn from_state_dict(
        module: &str,
        tensors: &IndexMap<String, Tensor>,
        out: usize,
        inp: usize,
    ) -> Result<Self> {
        let get = |k: String| tensors.get(&k).ok_or(PeftError::MissingKey(k));
        let wkey = format!("{module}.weight");
        let w = get(wkey.clone())?;
        if w.dtype() != DType::U8 || w.dims() != [out, inp] {
            return Err(PeftError::Invalid(format!(
                "{wkey}: a bitsandbytes 8-bit weight is int8 [{out}, {inp}], got {:?} {:?}",
                w.dtype(),
                w.dims()
            )));
        }
        let skey = format!("{module}.SCB");
        let scb = get(skey.clone())?;
        if scb.dtype() != DType::F32 || scb.dims() != [out] {
            return Err(PeftError::Invalid(format!(
                "{skey}: expected float32 [{out}], got {:?} {:?}",
                scb.dtype(),
                scb.dims()
            )));
        }
        let fkey = format!("{module}.weight_format");
        if let Some(f) = tensors.get(&fkey) {
            let v = f.flatten_all()?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
            if v != [0] {
                return Err(PeftError::Invalid(format!(
                    "{fkey}: {v:?}; only the \"row\" format (0) is supported, as bitsandbytes loads"
                )));
            }
        }
        Ok(Self {
            shape: vec![out, inp],
            codes: w
                .flatten_all()?
                .to_vec1::<u8>()?
                .into_iter()
                .map(|b| b as i8)
                .collect(),
            scb: scb.to_vec1::<f32>()?,
        })
    }

    /// The suffixes of the tensors besides `weight` that transformers stores for an 8-bit module.
    pub const STATE_SUFFIXES: [&'static str; 2] = ["SCB", "weight_format"];
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_errors_name_the_tensor() {
        let x: Vec<f32> = (0..24).map(|i| (i as f32 - 11.5) / 7.0).collect();
        let q = Bnb8Weight::quantize(&x, &[4, 6]).unwrap();
        let t: IndexMap<String, Tensor> = q
            .state_dict("m", &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
        assert!(Bnb8Weight::is_stored("m", &t));
        assert_eq!(Bnb8Weight::from_state_dict("m", &t, 4, 6).unwrap(), q);
        let d = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(
            d.iter()
                .zip(&x)
                .all(|(a, b)| (a - b).abs() <= 1.65 / 127.0 / 2.0 + 1e-3)
        );
        let e = Bnb8Weight::from_state_dict("m", &t, 4, 7)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m.weight: a bitsandbytes 8-bit weight is int8 [4, 7]"),
            "{e}"
        );
        let mut bad = t.clone();
        bad.insert(
            "m.weight_format".into(),
            Tensor::new(2u8, &Device::Cpu).unwrap(),
        );
        let e = Bnb8Weight::from_state_dict("m", &bad, 4, 6)
            .unwrap_err()
            .to_string();
        assert!(e.contains("m.weight_format: [2]"), "{e}");
        let mut missing = t;
        missing.shift_remove("m.SCB");
        let e = Bnb8Weight::from_state_dict("m", &missing, 4, 6).unwrap_err();
        assert!(
            matches!(&e, PeftError::MissingKey(k) if k == "m.SCB"),
            "{e}"
        );
    }
}
