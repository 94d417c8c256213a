//! VB-LoRA's top-k selection and its `save_only_topk_weights` file form, computed on the host.
//!
//! The selection is made on the host (the logits are small: `rows × num_vectors` per matrix) so that it is the
//! same on every device and defined for every value: rows are ranked by `f32::total_cmp`, descending, ties
//! to the lower index (torch's `topk` ranks NaN above everything too; its tie order is unspecified).
//!
//! In a `save_only_topk_weights` file each logits tensor `[a, b, num_vectors]` is stored as
//! `<name>_topk_indices` `[a, b, k]` (the smallest integer dtype that holds `num_vectors`, as PEFT's
//! `_get_adapter_state_dict` picks it) and `<name>_topk_weights` `[a, b, k − 1]` (the first `k − 1` softmax
//! weights of the top-k logits). Loading recovers the logits as PEFT's `_remap_adapter_state_dict_for_load`
//! does: `−∞` everywhere but at the indices, which hold `log` of the weights completed by `1 − Σ`.

use crate::{PeftError, Result};
use candle_core::{DType, Device, Tensor};

/// The indices of the `k` largest values of every row of `values` (rows of `n`), in descending order of
/// value, row after row (`values.len() / n × k` indices).
pub fn topk_rows(values: &[f32], n: usize, k: usize) -> Vec<u32> {
    let mut out = Vec::with_capacity(values.len() / n.max(1) * k);
    let mut order: Vec<u32> = Vec::with_capacity(n);
    for row in values.chunks_exact(n.max(1)) {
        order.clear();
        order.extend(0..n as u32);
        // stable: ties keep the lower index first
        order.sort_by(|&i, &j| row[j as usize].total_cmp(&row[i as usize]));
        out.extend_from_slice(&order[..k.min(n)]);
    }
    out
}

/// The dtype PEFT saves top-k indices in for a bank of `num_vectors` vectors: `uint8` below 2⁸, `int16`
/// below 2¹⁵, `int32` below 2³¹, else `int64`.
pub fn indices_dtype(num_vectors: usize) -> DType {
    if num_vectors < 1 << 8 {
        DType::U8
    } else if num_vectors < 1 << 15 {
        DType::I16
    } else if num_vectors < 1 << 31 {
        DType::I32
    } else {
        DType::I64
    }
}

/// An integer tensor's values as `i64` (every integer dtype candle reads from safetensors).
fn int_values(t: &Tensor, name: &str) -> Result<Vec<i64>> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::U8 => flat.to_vec1::<u8>()?.into_iter().map(i64::from).collect(),
        DType::U32 => flat.to_vec1::<u32>()?.into_iter().map(i64::from).collect(),
        DType::I16 => flat.to_vec1::<i16>()?.into_iter().map(i64::from).collect(),
        DType::I32 => flat.to_vec1::<i32>()?.into_iter().map(i64::from).collect(),
        DType::I64 => flat.to_vec1::<i64>()?,
        other => {
            return Err(PeftError::Invalid(format!(
                "`{name}` is {other:?}; top-k indices are integers (uint8, int16, int32 or int64)"
            )));
        }
    })
}

/// The `save_only_topk_weights` form of a logits tensor `[a, b, num_vectors]`: the top-`k` indices
/// `[a, b, k]` in [`indices_dtype`] and the first `k − 1` softmax weights of the top-`k` logits `[a, b, k − 1]`
/// (f32), as PEFT's `_get_adapter_state_dict` writes them.
pub fn to_topk(logits: &Tensor, k: usize, num_vectors: usize) -> Result<(Tensor, Tensor)> {
    let dims = logits.dims().to_vec();
    let n = *dims.last().unwrap_or(&0);
    if dims.len() != 3 || n != num_vectors || k == 0 || k > n {
        return Err(PeftError::Invalid(format!(
            "VB-LoRA logits of shape {dims:?} cannot be saved as top-{k} weights of {num_vectors} vectors"
        )));
    }
    let values = logits
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let idx = topk_rows(&values, n, k);
    let mut weights = Vec::with_capacity(idx.len() / k * (k - 1));
    for (row, sel) in values.chunks_exact(n).zip(idx.chunks_exact(k)) {
        let top: Vec<f32> = sel.iter().map(|&i| row[i as usize]).collect();
        let max = top[0];
        let e: Vec<f32> = top.iter().map(|v| (v - max).exp()).collect();
        let sum: f32 = e.iter().sum();
        weights.extend(e[..k - 1].iter().map(|v| v / sum));
    }
    let (a, b) = (dims[0], dims[1]);
    let device = logits.device();
    let indices = int_tensor(&idx, indices_dtype(num_vectors), (a, b, k), device)?;
    let weights = Tensor::from_vec(weights, (a, b, k - 1), device)?;
    Ok((indices, weights))
}

fn int_tensor(idx: &[u32], dtype: DType, shape: (usize, usize, usize), d: &Device) -> Result<Tensor> {
    Ok(match dtype {
        DType::U8 => Tensor::from_vec(idx.iter().map(|&i| i as u8).collect::<Vec<_>>(), shape, d)?,
        DType::I16 => Tensor::from_vec(idx.iter().map(|&i| i as i16).collect::<Vec<_>>(), shape, d)?,
        DType::I32 => Tensor::from_vec(idx.iter().map(|&i| i as i32).collect::<Vec<_>>(), shape, d)?,
        _ => Tensor::from_vec(idx.iter().map(|&i| i64::from(i)).collect::<Vec<_>>(), shape, d)?,
    })
}

/// The logits `[a, b, num_vectors]` (f32) a `save_only_topk_weights` pair stands for (PEFT's
/// `_remap_adapter_state_dict_for_load`): `−∞` everywhere except at the `k` indices of each row, which hold
/// `log(w)` for the saved weights `w` completed by `1 − Σw`. `indices` must be integers `[a, b, k]` in
/// `0..num_vectors`, distinct within a row, and `weights` `[a, b, k − 1]`; errors name the tensors as
/// `names` gives them (indices, weights).
pub fn from_topk(
    indices: &Tensor,
    weights: &Tensor,
    (a, b): (usize, usize),
    k: usize,
    num_vectors: usize,
    names: (&str, &str),
) -> Result<Tensor> {
    if k == 0 {
        return Err(PeftError::InvalidConfig(
            "VB-LoRA: `topk` 0 should be a positive integer value".into(),
        ));
    }
    crate::layer::check_shape(names.0, indices, &[a, b, k])?;
    crate::layer::check_shape(names.1, weights, &[a, b, k.saturating_sub(1)])?;
    if !weights.dtype().is_float() {
        return Err(PeftError::Invalid(format!(
            "`{}` is {:?}; top-k weights are floating point",
            names.1,
            weights.dtype()
        )));
    }
    let idx = int_values(indices, names.0)?;
    let w = weights
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut logits = vec![f32::NEG_INFINITY; a * b * num_vectors];
    for (r, sel) in idx.chunks_exact(k).enumerate() {
        let row_w = &w[r * (k - 1)..(r + 1) * (k - 1)];
        let last = 1.0 - row_w.iter().sum::<f32>();
        let row = &mut logits[r * num_vectors..(r + 1) * num_vectors];
        for (j, &i) in sel.iter().enumerate() {
            if i < 0 || i as u64 >= num_vectors as u64 {
                return Err(PeftError::Invalid(format!(
                    "`{}` holds index {i}, outside the vector bank's 0..{num_vectors}",
                    names.0
                )));
            }
            if sel[..j].contains(&i) {
                return Err(PeftError::Invalid(format!(
                    "`{}` selects vector {i} twice in one row; top-k indices are distinct",
                    names.0
                )));
            }
            let wj = if j + 1 < k { row_w[j] } else { last };
            row[i as usize] = wj.ln();
        }
    }
    Ok(Tensor::from_vec(
        logits,
        (a, b, num_vectors),
        indices.device(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_ranks_descending_with_ties_to_the_lower_index() {
        let v = [0.1, 0.5, 0.5, -1.0, f32::NEG_INFINITY, 2.0];
        assert_eq!(topk_rows(&v, 3, 2), vec![1, 2, 2, 0]);
        assert_eq!(topk_rows(&v, 6, 3), vec![5, 1, 2]);
        assert_eq!(topk_rows(&[f32::NAN, 1.0], 2, 1), vec![0]);
    }

    #[test]
    fn index_dtypes_follow_peft() {
        assert_eq!(indices_dtype(255), DType::U8);
        assert_eq!(indices_dtype(256), DType::I16);
        assert_eq!(indices_dtype(32767), DType::I16);
        assert_eq!(indices_dtype(32768), DType::I32);
    }

    #[test]
    fn topk_form_round_trips_to_the_same_softmax() {
        let d = Device::Cpu;
        let l = Tensor::new(
            &[[[0.3f32, -0.2, 1.5, 0.0, 0.7], [2.0, 1.0, 0.5, -3.0, 0.9]]],
            &d,
        )
        .unwrap();
        for k in [1, 2, 3] {
            let (i, w) = to_topk(&l, k, 5).unwrap();
            assert_eq!(i.dtype(), DType::U8);
            assert_eq!(i.dims(), [1, 2, k]);
            assert_eq!(w.dims(), [1, 2, k - 1]);
            let back = from_topk(&i, &w, (1, 2), k, 5, ("i", "w")).unwrap();
            // the same top-k and the same softmax over it
            let (i2, w2) = to_topk(&back, k, 5).unwrap();
            assert_eq!(
                i.to_dtype(DType::U32).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap(),
                i2.to_dtype(DType::U32).unwrap().flatten_all().unwrap().to_vec1::<u32>().unwrap()
            );
            let diff = (w - w2).unwrap().abs().unwrap().flatten_all().unwrap().max(0);
            if k > 1 {
                assert!(diff.unwrap().to_scalar::<f32>().unwrap() < 1e-6);
            }
        }
        let (i, w) = to_topk(&l, 2, 5).unwrap();
        let bad = Tensor::new(&[[[0u8, 0], [1, 2]]], &d).unwrap();
        let e = from_topk(&bad, &w, (1, 2), 2, 5, ("i", "w")).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        let bad = Tensor::new(&[[[0u8, 7], [1, 2]]], &d).unwrap();
        let e = from_topk(&bad, &w, (1, 2), 2, 5, ("i", "w")).unwrap_err();
        assert!(e.to_string().contains("index 7"), "{e}");
        let e = from_topk(&w, &w, (1, 2), 2, 5, ("i", "w")).unwrap_err();
        assert!(matches!(e, PeftError::ShapeMismatch { .. }), "{e}");
        let e = from_topk(&i.to_dtype(DType::F32).unwrap(), &w, (1, 2), 2, 5, ("i", "w")).unwrap_err();
        assert!(e.to_string().contains("integers"), "{e}");
    }
}
