//! Softmax over the last dimension with an analytic backward.

use super::{dot, row_offsets, rows_readable};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, Layout, Result, Shape, Tensor, bail};
use peft::ops::cpu::{Real, custom_supported, par_rows};

/// Softmax over the last dimension (numerically stable: the row maximum is subtracted first).
///
/// On the CPU in f32 / f64 this is one custom op with the backward `y ⊙ (g − Σ g⊙y)`; elsewhere it is
/// [`softmax_last_dim_reference`].
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if custom_supported(x) && x.rank() > 0 && x.elem_count() > 0 {
        return rows_readable(x)?.apply_op1(Softmax);
    }
    softmax_last_dim_reference(x)
}

/// [`softmax_last_dim`] written with candle primitives (any device and dtype, candle's autograd).
pub fn softmax_last_dim_reference(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// The forward custom op.
struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "peft-softmax-last-dim"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match s {
            CpuStorage::F32(x) => fwd(x, l),
            CpuStorage::F64(x) => fwd(x, l),
            _ => bail!("peft-softmax-last-dim: f32 or f64 only"),
        }
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        Ok(Some(
            y.apply_op2_no_bwd(&rows_readable(grad)?, &SoftmaxBwd)?,
        ))
    }
}

fn fwd<T: Real>(x: &[T], l: &Layout) -> Result<(CpuStorage, Shape)> {
    let (rows, d) = row_offsets(l)?;
    if rows.last().is_some_and(|&o| o + d > x.len()) {
        bail!("peft-softmax-last-dim: layout {l:?} exceeds its storage");
    }
    let mut out = vec![T::zero(); rows.len() * d];
    // exp dominates: count it as several elements of work.
    par_rows(&mut out, d, 8 * rows.len() * d, |r0, chunk| {
        for (i, o) in chunk.chunks_exact_mut(d).enumerate() {
            let xr = &x[rows[r0 + i]..][..d];
            let max = xr
                .iter()
                .fold(T::NEG_INFINITY, |m, &v| if v > m { v } else { m });
            let mut sum = T::zero();
            for (o, &v) in o.iter_mut().zip(xr) {
                *o = (v - max).exp();
                sum += *o;
            }
            let inv = T::one() / sum;
            for o in o.iter_mut() {
                *o *= inv;
            }
        }
    });
    Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
}

/// The backward custom op: `(y, g) → y ⊙ (g − Σ g⊙y)` per row.
struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "peft-softmax-last-dim-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(y), CpuStorage::F32(g)) => bwd(y, l1, g, l2),
            (CpuStorage::F64(y), CpuStorage::F64(g)) => bwd(y, l1, g, l2),
            _ => bail!("peft-softmax-last-dim-bwd: f32 or f64 operands of one dtype only"),
        }
    }
}

fn bwd<T: Real>(y: &[T], ly: &Layout, g: &[T], lg: &Layout) -> Result<(CpuStorage, Shape)> {
    let (yrows, d) = row_offsets(ly)?;
    let (grows, dg) = row_offsets(lg)?;
    if dg != d || grows.len() != yrows.len() {
        bail!("peft-softmax-last-dim-bwd: gradient layout {lg:?} does not match {ly:?}");
    }
    if yrows.last().is_some_and(|&o| o + d > y.len())
        || grows.last().is_some_and(|&o| o + d > g.len())
    {
        bail!("peft-softmax-last-dim-bwd: layouts exceed their storage");
    }
    let mut out = vec![T::zero(); yrows.len() * d];
    par_rows(&mut out, d, 2 * yrows.len() * d, |r0, chunk| {
        for (i, o) in chunk.chunks_exact_mut(d).enumerate() {
            let yr = &y[yrows[r0 + i]..][..d];
            let gr = &g[grows[r0 + i]..][..d];
            let s = dot(gr, yr);
            for ((o, &yv), &gv) in o.iter_mut().zip(yr).zip(gr) {
                *o = yv * (gv - s);
            }
        }
    });
    Ok((T::to_cpu_storage_owned(out), ly.shape().clone()))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{fd_check, gapped, grads_of, max_diff, randn, strided, vars};
    use super::*;
    use candle_core::DType;
    use peft::PeftRng;

    /// Vectors, matrices, 3-D and 4-D inputs (the last one of attention-score shape).
    const SHAPES: [&[usize]; 5] = [&[9], &[4, 17], &[2, 3, 40], &[2, 3, 8, 64], &[2, 3, 77, 64]];

    #[test]
    fn softmax_forward_matches_reference() {
        let mut rng = PeftRng::new(21);
        for shape in SHAPES {
            // Large logits exercise the max subtraction.
            let x = (randn(&mut rng, shape, DType::F32) * 30.0).unwrap();
            let want = softmax_last_dim_reference(&x).unwrap();
            for xin in [x.clone(), strided(&x), gapped(&x)] {
                let got = softmax_last_dim(&xin).unwrap();
                assert!(max_diff(&got, &want) < 1e-6, "{shape:?}");
            }
            let sums = softmax_last_dim(&x)
                .unwrap()
                .sum(candle_core::D::Minus1)
                .unwrap();
            assert!(max_diff(&sums, &sums.ones_like().unwrap()) < 1e-5);
        }
    }

    #[test]
    fn softmax_with_masked_positions() {
        let x = Tensor::new(
            &[[0.5f32, f32::NEG_INFINITY, 1.0], [2.0, 1.0, -3.0]],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let got = softmax_last_dim(&x).unwrap();
        let want = softmax_last_dim_reference(&x).unwrap();
        assert!(max_diff(&got, &want) < 1e-7);
        assert_eq!(got.to_vec2::<f32>().unwrap()[0][1], 0.0);
    }

    #[test]
    fn softmax_gradients_match_reference_autograd() {
        let mut rng = PeftRng::new(22);
        for shape in SHAPES {
            let x = (randn(&mut rng, shape, DType::F32) * 3.0).unwrap();
            let r = randn(&mut rng, shape, DType::F32);
            let vs = vars(&[&x]);
            let got = grads_of(&vs, &r, &|t| softmax_last_dim(&strided(&t[0])));
            let want = grads_of(&vs, &r, &|t| softmax_last_dim_reference(&t[0]));
            let (g, w) = (got[0].as_ref().unwrap(), want[0].as_ref().unwrap());
            assert!(max_diff(g, w) < 1e-5, "{shape:?}: {}", max_diff(g, w));
        }
    }

    #[test]
    fn softmax_finite_differences_f64() {
        let mut rng = PeftRng::new(23);
        for shape in [&[3, 6][..], &[2, 2, 5]] {
            let x = randn(&mut rng, shape, DType::F64);
            let r = randn(&mut rng, shape, DType::F64);
            let vs = vars(&[&x]);
            let grads = grads_of(&vs, &r, &|t| softmax_last_dim(&t[0]));
            let loss = |t: &[Tensor]| {
                (softmax_last_dim(&t[0])? * &r)?
                    .sum_all()?
                    .to_scalar::<f64>()
            };
            let err = fd_check(
                std::slice::from_ref(&x),
                0,
                grads[0].as_ref().unwrap(),
                &loss,
            );
            assert!(err < 1e-8, "{shape:?}: {err}");
        }
    }
}
