//! RMSNorm (HF `LlamaRMSNorm`) with an analytic backward for the input and the weight.

use super::{dot, row_offsets, rows_readable};
use candle_core::{
    CpuStorage, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Tensor, bail,
};
use peft::ops::cpu::{Real, contiguous_part, custom_supported, par_rows};

/// RMSNorm over the last dimension, as HF's `LlamaRMSNorm`: computed in f32,
/// `weight * (x / sqrt(mean(x²) + eps)).to(x.dtype)` (f64 inputs are computed in f64).
///
/// On the CPU in f32 / f64 with a `[D]` weight this is one custom op whose backward gives the gradients of
/// `x` and of `weight` (the latter only when the weight takes part in the gradient computation);
/// elsewhere it is [`rms_norm_reference`].
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if custom_supported(x)
        && weight.device().is_cpu()
        && x.elem_count() > 0
        && weight.rank() == 1
        && weight.dim(0)? == x.dim(D::Minus1)?
    {
        let w = rows_readable(&weight.to_dtype(x.dtype())?)?;
        return rows_readable(x)?.apply_op2(&w, RmsNorm { eps });
    }
    rms_norm_reference(x, weight, eps)
}

/// [`rms_norm`] written with candle primitives (any device and dtype, candle's autograd).
pub fn rms_norm_reference(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let compute = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let xc = x.to_dtype(compute)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?.to_dtype(dtype)?;
    y.broadcast_mul(&weight.to_dtype(dtype)?)
}

/// The forward custom op: `(x, weight) → x · r · weight`, `r = 1 / sqrt(mean(x²) + eps)` per row.
struct RmsNorm {
    eps: f64,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "peft-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => fwd(x, l1, w, l2, self.eps),
            (CpuStorage::F64(x), CpuStorage::F64(w)) => fwd(x, l1, w, l2, self.eps),
            _ => bail!("peft-rms-norm: f32 or f64 operands of one dtype only"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (want_dx, want_dw) = (x.track_op(), w.track_op());
        if !want_dx && !want_dw {
            return Ok((None, None));
        }
        let g = rows_readable(grad)?;
        let out = x.apply_op3_no_bwd(
            w,
            &g,
            &RmsNormBwd {
                eps: self.eps,
                want_dw,
            },
        )?;
        let n = x.elem_count();
        let dx = if want_dx {
            Some(out.narrow(0, 0, n)?.reshape(x.shape())?)
        } else {
            None
        };
        let dw = if want_dw {
            Some(out.narrow(0, n, w.elem_count())?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// The weight row of a rank-1 layout of length `d`.
fn weight_row<'a, T: Real>(w: &'a [T], lw: &Layout, d: usize) -> Result<&'a [T]> {
    let ws = contiguous_part(w, lw)?;
    if lw.dims() != [d] {
        bail!(
            "peft-rms-norm: weight shape {:?}, expected [{d}]",
            lw.dims()
        );
    }
    Ok(ws)
}

/// `1 / sqrt(mean(x²) + eps)` of one row.
#[inline]
fn inv_rms<T: Real>(xr: &[T], eps: T) -> T {
    T::one() / (dot(xr, xr) / T::from_f64(xr.len() as f64) + eps).sqrt()
}

fn fwd<T: Real>(
    x: &[T],
    lx: &Layout,
    w: &[T],
    lw: &Layout,
    eps: f64,
) -> Result<(CpuStorage, Shape)> {
    let (rows, d) = row_offsets(lx)?;
    let w = weight_row(w, lw, d)?;
    if rows.last().is_some_and(|&o| o + d > x.len()) {
        bail!("peft-rms-norm: layout {lx:?} exceeds its storage");
    }
    let eps = T::from_f64(eps);
    let mut out = vec![T::zero(); rows.len() * d];
    par_rows(&mut out, d, rows.len() * d, |r0, chunk| {
        for (i, o) in chunk.chunks_exact_mut(d).enumerate() {
            let xr = &x[rows[r0 + i]..][..d];
            let r = inv_rms(xr, eps);
            for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w) {
                *o = xv * r * wv;
            }
        }
    });
    Ok((T::to_cpu_storage_owned(out), lx.shape().clone()))
}

/// The backward custom op: `(x, weight, g) → [dx (x's element count), dw (D, only when asked)]`, flat.
///
/// Per row, with `r = 1 / sqrt(mean(x²) + eps)` and `h = g ⊙ w`:
/// `dx = r · h − x · r³ · mean(h ⊙ x)` and `dw = Σ_rows g ⊙ x · r`.
struct RmsNormBwd {
    eps: f64,
    want_dw: bool,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "peft-rms-norm-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(g)) => {
                bwd(x, l1, w, l2, g, l3, self.eps, self.want_dw)
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(g)) => {
                bwd(x, l1, w, l2, g, l3, self.eps, self.want_dw)
            }
            _ => bail!("peft-rms-norm-bwd: f32 or f64 operands of one dtype only"),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn bwd<T: Real>(
    x: &[T],
    lx: &Layout,
    w: &[T],
    lw: &Layout,
    g: &[T],
    lg: &Layout,
    eps: f64,
    want_dw: bool,
) -> Result<(CpuStorage, Shape)> {
    let (xrows, d) = row_offsets(lx)?;
    let (grows, dg) = row_offsets(lg)?;
    if dg != d || grows.len() != xrows.len() {
        bail!("peft-rms-norm-bwd: gradient layout {lg:?} does not match {lx:?}");
    }
    if xrows.last().is_some_and(|&o| o + d > x.len())
        || grows.last().is_some_and(|&o| o + d > g.len())
    {
        bail!("peft-rms-norm-bwd: layouts exceed their storage");
    }
    let w = weight_row(w, lw, d)?;
    let n = xrows.len() * d;
    let eps = T::from_f64(eps);
    let inv_d = T::one() / T::from_f64(d as f64);
    let mut out = vec![T::zero(); n + if want_dw { d } else { 0 }];
    let (dx, dw) = out.split_at_mut(n);
    let partials = par_rows(dx, d, 2 * n, |r0, chunk| {
        let mut dw_part = vec![T::zero(); if want_dw { d } else { 0 }];
        let mut h = vec![T::zero(); d];
        for (i, o) in chunk.chunks_exact_mut(d).enumerate() {
            let xr = &x[xrows[r0 + i]..][..d];
            let gr = &g[grows[r0 + i]..][..d];
            let r = inv_rms(xr, eps);
            for ((hv, &gv), &wv) in h.iter_mut().zip(gr).zip(w) {
                *hv = gv * wv;
            }
            let c = dot(&h, xr) * inv_d * r * r * r;
            for ((o, &hv), &xv) in o.iter_mut().zip(&h).zip(xr) {
                *o = r * hv - xv * c;
            }
            if want_dw {
                for ((p, &gv), &xv) in dw_part.iter_mut().zip(gr).zip(xr) {
                    *p += gv * (xv * r);
                }
            }
        }
        dw_part
    });
    if want_dw {
        for p in partials {
            for (a, b) in dw.iter_mut().zip(p) {
                *a += b;
            }
        }
    }
    let len = out.len();
    Ok((T::to_cpu_storage_owned(out), Shape::from(len)))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{fd_check, gapped, grads_of, max_diff, randn, strided, vars};
    use super::*;
    use peft::PeftRng;

    /// Vectors, matrices, 3-D and 4-D inputs, and rows long enough for the vectorised loops and their tails.
    const SHAPES: [&[usize]; 5] = [&[7], &[3, 16], &[2, 5, 33], &[2, 3, 4, 64], &[131, 512]];

    #[test]
    fn rms_norm_forward_matches_reference() {
        let mut rng = PeftRng::new(11);
        for shape in SHAPES {
            let d = shape[shape.len() - 1];
            let x = randn(&mut rng, shape, DType::F32);
            let w = randn(&mut rng, &[d], DType::F32);
            let want = rms_norm_reference(&x, &w, 1e-5).unwrap();
            for xin in [x.clone(), strided(&x), gapped(&x)] {
                let got = rms_norm(&xin, &w, 1e-5).unwrap();
                assert!(got.is_contiguous());
                assert!(max_diff(&got, &want) < 1e-5, "{shape:?}");
            }
        }
    }

    #[test]
    fn rms_norm_gradients_match_reference_autograd() {
        let mut rng = PeftRng::new(12);
        for shape in SHAPES {
            let d = shape[shape.len() - 1];
            let x = randn(&mut rng, shape, DType::F32);
            let w = randn(&mut rng, &[d], DType::F32);
            let r = randn(&mut rng, shape, DType::F32);
            let vs = vars(&[&x, &w]);
            let got = grads_of(&vs, &r, &|t| rms_norm(&strided(&t[0]), &t[1], 1e-6));
            let want = grads_of(&vs, &r, &|t| rms_norm_reference(&t[0], &t[1], 1e-6));
            for (g, w) in got.iter().zip(&want) {
                let (g, w) = (g.as_ref().unwrap(), w.as_ref().unwrap());
                assert!(max_diff(g, w) < 1e-4, "{shape:?}: {}", max_diff(g, w));
            }
        }
    }

    #[test]
    fn rms_norm_gradient_of_a_frozen_weight_is_not_computed() {
        let mut rng = PeftRng::new(13);
        let x = randn(&mut rng, &[4, 8], DType::F32);
        let w = randn(&mut rng, &[8], DType::F32);
        let r = randn(&mut rng, &[4, 8], DType::F32);
        let vs = vars(&[&x]);
        let y = rms_norm(vs[0].as_tensor(), &w, 1e-6).unwrap();
        let g = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(g.get(&w).is_none());
        let want = grads_of(&vs, &r, &|t| rms_norm_reference(&t[0], &w, 1e-6));
        assert!(max_diff(g.get(&vs[0]).unwrap(), want[0].as_ref().unwrap()) < 1e-4);
    }

    #[test]
    fn rms_norm_finite_differences_f64() {
        let mut rng = PeftRng::new(14);
        for shape in [&[3, 5][..], &[2, 2, 7]] {
            let d = shape[shape.len() - 1];
            let x = randn(&mut rng, shape, DType::F64);
            let w = randn(&mut rng, &[d], DType::F64);
            let r = randn(&mut rng, shape, DType::F64);
            let vs = vars(&[&x, &w]);
            let grads = grads_of(&vs, &r, &|t| rms_norm(&t[0], &t[1], 1e-5));
            let loss = |t: &[Tensor]| {
                (rms_norm(&t[0], &t[1], 1e-5)? * &r)?
                    .sum_all()?
                    .to_scalar::<f64>()
            };
            for (i, g) in grads.iter().enumerate() {
                let err = fd_check(&[x.clone(), w.clone()], i, g.as_ref().unwrap(), &loss);
                assert!(err < 1e-7, "{shape:?} input {i}: {err}");
            }
        }
    }

    #[test]
    fn rms_norm_falls_back_for_bf16() {
        let mut rng = PeftRng::new(15);
        let x = randn(&mut rng, &[3, 8], DType::BF16);
        let w = randn(&mut rng, &[8], DType::F32);
        let got = rms_norm(&x, &w, 1e-6).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        let want = rms_norm_reference(&x, &w, 1e-6).unwrap();
        assert_eq!(max_diff(&got, &want), 0.0);
    }
}
