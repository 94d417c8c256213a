//! `x · dequant(W)ᵀ + b` for a quantized frozen Linear weight, dequantizing a band of output rows at a time.

use super::QuantizedWeight;
use crate::ops::cpu::{Real, contiguous_part, gemm_parallelism};
use candle_core::{CpuStorage, CustomOp1, D, Layout, Result, Shape, Tensor, bail};
use std::sync::Arc;

/// Elements of the weight dequantized at once (4 MiB of f32): bounds the scratch memory of a forward or
/// backward whatever the layer's size.
const BAND_ELEMS: usize = 1 << 20;

/// `x Wᵀ + b` for a quantized weight `w` `[out, in]` and an optional bias `[out]`, over any leading dimensions
/// of `x`. Gradients flow to `x` only (`g · dequant(W)`).
///
/// On the CPU in f32 / f64 this is one custom op that dequantizes bands of rows into a scratch buffer and
/// multiplies with `gemm`, so neither the forward nor the autograd graph holds the f32 weight. Elsewhere (other
/// devices, half-precision inputs) the weight is dequantized to `x`'s dtype and multiplied with candle's ops.
pub fn quant_linear(x: &Tensor, w: &Arc<QuantizedWeight>, b: Option<&Tensor>) -> Result<Tensor> {
    let [out, inp] = w.shape() else {
        bail!(
            "quant_linear: a Linear weight has 2 dimensions, got {:?}",
            w.shape()
        );
    };
    let (out, inp) = (*out, *inp);
    if x.rank() == 0 || x.dim(D::Minus1)? != inp {
        bail!(
            "quant_linear: input {:?} for a weight [{out}, {inp}]",
            x.dims()
        );
    }
    if crate::ops::cpu::custom_supported(x)
        && x.elem_count() > 0
        && b.is_none_or(|b| b.device().is_cpu() && b.dims() == [out])
    {
        let bias = match b {
            Some(b) => Some(b.detach().to_dtype(x.dtype())?.contiguous()?),
            None => None,
        };
        return x
            .contiguous()?
            .apply_op1(QuantLinear { w: w.clone(), bias });
    }
    let wd = w
        .dequantize(x.device())
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?
        .to_dtype(x.dtype())?;
    crate::ops::frozen_linear_reference(x, &wd, b)
}

/// Rows of the weight per band.
fn band_rows(out: usize, inp: usize) -> usize {
    (BAND_ELEMS / inp.max(1)).clamp(1, out)
}

/// Dequantizes rows `[r0, r0 + rows)` of `w` into `buf` as `T`: row-major `[rows, inp]`, or transposed
/// `[inp, rows]` (the row-major right-hand side `gemm` multiplies fastest in the forward).
fn dequant_band<T: Real>(
    w: &QuantizedWeight,
    r0: usize,
    inp: usize,
    f32buf: &mut [f32],
    buf: &mut [T],
    transposed: bool,
) -> Result<()> {
    w.dequantize_into(r0 * inp, f32buf)
        .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    if !transposed {
        for (o, &v) in buf.iter_mut().zip(f32buf.iter()) {
            *o = T::from_f64(v as f64);
        }
        return Ok(());
    }
    let rows = f32buf.len() / inp;
    const TILE: usize = 32;
    for j0 in (0..rows).step_by(TILE) {
        for k0 in (0..inp).step_by(TILE) {
            for j in j0..(j0 + TILE).min(rows) {
                for kk in k0..(k0 + TILE).min(inp) {
                    buf[kk * rows + j] = T::from_f64(f32buf[j * inp + kk] as f64);
                }
            }
        }
    }
    Ok(())
}

/// Calls `f(r0, rows, band)` for consecutive bands of rows of `w` dequantized as `T` ([`dequant_band`]).
fn for_each_band<T: Real>(
    w: &QuantizedWeight,
    transposed: bool,
    mut f: impl FnMut(usize, usize, &[T]),
) -> Result<()> {
    let (n, k) = (w.shape()[0], w.shape()[1]);
    let rows = band_rows(n, k);
    let mut f32buf = vec![0f32; rows * k];
    let mut buf = vec![T::zero(); rows * k];
    let mut r0 = 0;
    while r0 < n {
        let r = rows.min(n - r0);
        dequant_band(
            w,
            r0,
            k,
            &mut f32buf[..r * k],
            &mut buf[..r * k],
            transposed,
        )?;
        f(r0, r, &buf[..r * k]);
        r0 += r;
    }
    Ok(())
}

struct QuantLinear {
    w: Arc<QuantizedWeight>,
    bias: Option<Tensor>,
}

impl CustomOp1 for QuantLinear {
    fn name(&self) -> &'static str {
        "peft-quant-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let bias = match &self.bias {
            Some(b) => {
                let (st, lb) = b.storage_and_layout();
                match &*st {
                    candle_core::Storage::Cpu(c) => Some((c.clone(), lb.clone())),
                    _ => bail!("peft-quant-linear: the bias is not on the CPU"),
                }
            }
            None => None,
        };
        match s {
            CpuStorage::F32(x) => {
                let b = match &bias {
                    Some((CpuStorage::F32(b), lb)) => Some(contiguous_part(b, lb)?),
                    Some(_) => bail!("peft-quant-linear: bias dtype differs from x"),
                    None => None,
                };
                fwd(&self.w, x, l, b)
            }
            CpuStorage::F64(x) => {
                let b = match &bias {
                    Some((CpuStorage::F64(b), lb)) => Some(contiguous_part(b, lb)?),
                    Some(_) => bail!("peft-quant-linear: bias dtype differs from x"),
                    None => None,
                };
                fwd(&self.w, x, l, b)
            }
            _ => bail!("peft-quant-linear: f32 or f64 input only"),
        }
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let dx = grad
            .contiguous()?
            .apply_op1_no_bwd(&QuantLinearBwd { w: self.w.clone() })?;
        Ok(Some(dx))
    }
}

fn fwd<T: Real>(
    w: &QuantizedWeight,
    x: &[T],
    lx: &Layout,
    bias: Option<&[T]>,
) -> Result<(CpuStorage, Shape)> {
    let x = contiguous_part(x, lx)?;
    let (n, k) = (w.shape()[0], w.shape()[1]);
    let m = x.len() / k;
    let mut out = match bias {
        Some(b) => b.repeat(m),
        None => vec![T::zero(); m * n],
    };
    for_each_band(w, true, |r0, r, buf: &[T]| {
        // SAFETY: `x` holds m·k elements, `buf` r·k (the band of W transposed, row-major [k, r]), `out` m·n; the
        // destination is the column block [r0, r0 + r) of `out` (row stride n). out[:, r0..r0+r] (+)= x · bandᵀ.
        unsafe {
            gemm::gemm(
                m,
                r,
                k,
                out.as_mut_ptr().add(r0),
                1,
                n as isize,
                bias.is_some(),
                x.as_ptr(),
                1,
                k as isize,
                buf.as_ptr(),
                1,
                r as isize,
                T::one(),
                T::one(),
                false,
                false,
                false,
                gemm_parallelism(),
            );
        }
    })?;
    let mut dims = lx.dims().to_vec();
    *dims.last_mut().expect("rank > 0") = n;
    Ok((T::to_cpu_storage_owned(out), Shape::from(dims)))
}

/// The backward `g → g · dequant(W)`, `[.., out] → [.., in]`.
struct QuantLinearBwd {
    w: Arc<QuantizedWeight>,
}

impl CustomOp1 for QuantLinearBwd {
    fn name(&self) -> &'static str {
        "peft-quant-linear-bwd"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match s {
            CpuStorage::F32(g) => bwd(&self.w, g, l),
            CpuStorage::F64(g) => bwd(&self.w, g, l),
            _ => bail!("peft-quant-linear-bwd: f32 or f64 gradient only"),
        }
    }
}

fn bwd<T: Real>(w: &QuantizedWeight, g: &[T], lg: &Layout) -> Result<(CpuStorage, Shape)> {
    let g = contiguous_part(g, lg)?;
    let (n, k) = (w.shape()[0], w.shape()[1]);
    if lg.dims().last() != Some(&n) {
        bail!(
            "peft-quant-linear-bwd: g {:?}, w {:?}",
            lg.dims(),
            w.shape()
        );
    }
    let m = g.len() / n;
    let mut out = vec![T::zero(); m * k];
    for_each_band(w, false, |r0, r, buf: &[T]| {
        // SAFETY: `g` holds m·n elements (row stride n; the block starts at column r0), `buf` r·k, `out` m·k.
        // out (+)= g[:, r0..r0+r] · band.
        unsafe {
            gemm::gemm(
                m,
                k,
                r,
                out.as_mut_ptr(),
                1,
                k as isize,
                r0 > 0,
                g.as_ptr().add(r0),
                1,
                n as isize,
                buf.as_ptr(),
                1,
                k as isize,
                T::one(),
                T::one(),
                false,
                false,
                false,
                gemm_parallelism(),
            );
        }
    })?;
    let mut dims = lg.dims().to_vec();
    *dims.last_mut().expect("rank > 0") = k;
    Ok((T::to_cpu_storage_owned(out), Shape::from(dims)))
}

#[cfg(test)]
mod tests {
    use super::super::bnb4::{Bnb4Options, Bnb4Type, Bnb4Weight};
    use super::*;
    use crate::PeftRng;
    use crate::ops::testutil::{fd_check, grads_of, max_diff, randn, vars};
    use candle_core::{DType, Device, Var};

    fn weight(
        rng: &mut PeftRng,
        out: usize,
        inp: usize,
        opts: Bnb4Options,
    ) -> Arc<QuantizedWeight> {
        let w = randn(rng, &[out, inp], DType::F32)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        Arc::new(QuantizedWeight::Bnb4(
            Bnb4Weight::quantize(&w, &[out, inp], DType::F32, opts).unwrap(),
        ))
    }

    #[test]
    fn forward_and_input_gradient_match_the_dequantized_matmul() {
        let mut rng = PeftRng::new(7);
        for (out, inp, dq) in [(10, 24, false), (33, 17, true), (5, 64, true)] {
            let opts = Bnb4Options {
                quant_type: Bnb4Type::Fp4,
                double_quant: dq,
                blocksize: 32,
                ..Default::default()
            };
            let w = weight(&mut rng, out, inp, opts);
            let wd = w.dequantize(&Device::Cpu).unwrap();
            let b = randn(&mut rng, &[out], DType::F32);
            let x = Var::from_tensor(&randn(&mut rng, &[2, 3, inp], DType::F32)).unwrap();
            let y = quant_linear(&x, &w, Some(&b)).unwrap();
            let want = crate::ops::frozen_linear_reference(&x, &wd, Some(&b)).unwrap();
            assert!(
                max_diff(&y, &want) < 1e-5,
                "{out}x{inp}: {}",
                max_diff(&y, &want)
            );
            let g = randn(&mut rng, &[2, 3, out], DType::F32);
            let grads = (y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let dx = grads.get(&x).unwrap();
            let want_dx = g
                .reshape((6, out))
                .unwrap()
                .matmul(&wd)
                .unwrap()
                .reshape((2, 3, inp))
                .unwrap();
            assert!(
                max_diff(dx, &want_dx) < 1e-5,
                "{out}x{inp}: dx {}",
                max_diff(dx, &want_dx)
            );
        }
    }

    #[test]
    fn bands_cover_every_row_and_f64_matches_finite_differences() {
        // A weight taller than one band: 3 bands of rows.
        let mut rng = PeftRng::new(8);
        let (out, inp) = (2 * BAND_ELEMS / 64 + 5, 64);
        let w = weight(&mut rng, out, inp, Bnb4Options::default());
        let x = randn(&mut rng, &[3, inp], DType::F32);
        let wd = w.dequantize(&Device::Cpu).unwrap();
        let y = quant_linear(&x, &w, None).unwrap();
        let want = x.matmul(&wd.t().unwrap()).unwrap();
        assert!(max_diff(&y, &want) < 1e-4, "{}", max_diff(&y, &want));
        let small = weight(&mut rng, 6, 8, Bnb4Options::default());
        let x64 = randn(&mut rng, &[4, 8], DType::F64);
        let r = randn(&mut rng, &[4, 6], DType::F64);
        let vs = vars(&[&x64]);
        let grads = grads_of(&vs, &r, &|t| quant_linear(&t[0], &small, None));
        let loss = |t: &[Tensor]| {
            (quant_linear(&t[0], &small, None)? * &r)?
                .sum_all()?
                .to_scalar::<f64>()
        };
        let err = fd_check(
            std::slice::from_ref(&x64),
            0,
            grads[0].as_ref().unwrap(),
            &loss,
        );
        assert!(err < 1e-6, "finite differences: {err}");
    }
}
