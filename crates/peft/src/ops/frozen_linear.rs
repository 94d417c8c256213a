//! A Linear layer with frozen weight and bias: the backward computes the input gradient only.

use super::cpu::{Real, contiguous_part, custom_supported, gemm_parallelism};
use candle_core::{CpuStorage, CustomOp2, D, Layout, Result, Shape, Storage, Tensor, bail};

/// `x Wᵀ + b` for a frozen weight `w` `[out, in]` and bias `b` `[out]`, over any leading dimensions of `x`:
/// gradients flow to `x` only.
///
/// candle's matmul backward always computes the weight gradient too (as much work again as the input
/// gradient, and a weight-sized tensor per layer). On the CPU in f32 / f64 this is one custom op on `gemm`
/// whose backward is `g W` alone; `w` may have any strides (fastest when `w.t()` is contiguous, the layout
/// [`crate::BaseLayer`] keeps) and the bias is fused into the product. Elsewhere it is
/// [`frozen_linear_reference`].
pub fn frozen_linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    if custom_supported(x)
        && w.device().is_cpu()
        && w.dtype() == x.dtype()
        && w.rank() == 2
        && x.rank() > 0
        && x.elem_count() > 0
        && w.elem_count() > 0
        && x.dim(D::Minus1)? == w.dim(1)?
        && w.layout().stride().iter().all(|&s| s != 0)
        && b.is_none_or(|b| b.device().is_cpu() && b.dims() == [w.dim(0).unwrap_or(0)])
    {
        let bias = match b {
            Some(b) => Some(b.detach().to_dtype(x.dtype())?.contiguous()?),
            None => None,
        };
        let out = x
            .contiguous()?
            .apply_op2(&w.detach(), FrozenLinear { bias })?;
        return Ok(out);
    }
    frozen_linear_reference(x, w, b)
}

/// [`frozen_linear`] written with candle primitives (any device and dtype). Its backward through candle's
/// matmul still computes (and drops) the weight gradient.
pub fn frozen_linear_reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let y = crate::layer::base::linear_apply(x, &w.detach(), true)?;
    match b {
        Some(b) => y.broadcast_add(&b.detach().to_dtype(y.dtype())?),
        None => Ok(y),
    }
}

/// The rows, and `(offset, stride0, stride1)` of a 2-D layout `[n, k]` checked against a storage of `len`.
fn matrix(l: &Layout, len: usize) -> Result<(usize, usize, usize, usize, usize)> {
    let (n, k) = l.shape().dims2()?;
    let (o, s0, s1) = (l.start_offset(), l.stride()[0], l.stride()[1]);
    if n == 0 || k == 0 || o + (n - 1) * s0 + (k - 1) * s1 >= len {
        bail!("peft-frozen-linear: weight layout {l:?} is empty or exceeds its storage");
    }
    Ok((n, k, o, s0, s1))
}

/// The forward custom op `(x, w) → x wᵀ + bias`; the frozen bias rides in the op.
struct FrozenLinear {
    bias: Option<Tensor>,
}

impl CustomOp2 for FrozenLinear {
    fn name(&self) -> &'static str {
        "peft-frozen-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let guard = self.bias.as_ref().map(|b| b.storage_and_layout());
        let bias = match &guard {
            Some((s, l)) => match &**s {
                Storage::Cpu(c) => Some((c, *l)),
                _ => bail!("peft-frozen-linear: the bias is not on the CPU"),
            },
            None => None,
        };
        match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                let b = match bias {
                    Some((CpuStorage::F32(b), l)) => Some(contiguous_part(b, l)?),
                    Some(_) => bail!("peft-frozen-linear: bias dtype differs from x"),
                    None => None,
                };
                fwd(x, l1, w, l2, b)
            }
            (CpuStorage::F64(x), CpuStorage::F64(w)) => {
                let b = match bias {
                    Some((CpuStorage::F64(b), l)) => Some(contiguous_part(b, l)?),
                    Some(_) => bail!("peft-frozen-linear: bias dtype differs from x"),
                    None => None,
                };
                fwd(x, l1, w, l2, b)
            }
            _ => bail!("peft-frozen-linear: f32 or f64 operands of one dtype only"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() {
            return Ok((None, None));
        }
        let dx = grad.contiguous()?.apply_op2_no_bwd(w, &FrozenLinearBwd)?;
        Ok((Some(dx), None))
    }
}

fn fwd<T: Real>(
    x: &[T],
    lx: &Layout,
    w: &[T],
    lw: &Layout,
    bias: Option<&[T]>,
) -> Result<(CpuStorage, Shape)> {
    let x = contiguous_part(x, lx)?;
    let (n, k, wo, s0, s1) = matrix(lw, w.len())?;
    if lx.dims().last() != Some(&k) || bias.is_some_and(|b| b.len() != n) {
        bail!("peft-frozen-linear: x {:?}, w {:?}", lx.dims(), lw.dims());
    }
    let m = x.len() / k;
    let mut out = match bias {
        Some(b) => b.repeat(m),
        None => vec![T::zero(); m * n],
    };
    // SAFETY: `x` holds exactly m·k elements, `out` m·n, and every element the weight layout addresses
    // (offset wo, strides s0/s1 over [n, k]) was bounds-checked by `matrix`. gemm computes
    // out := [out +] x · R where R [k, n] is wᵀ read through swapped strides: R[kk, nn] = w[nn, kk].
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            bias.is_some(),
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr().add(wo),
            s0 as isize,
            s1 as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            gemm_parallelism(),
        );
    }
    let mut dims = lx.dims().to_vec();
    *dims.last_mut().expect("rank > 0") = n;
    Ok((T::to_cpu_storage_owned(out), Shape::from(dims)))
}

/// The backward custom op `(g, w) → g w`: the input gradient, `[.., out] → [.., in]`.
struct FrozenLinearBwd;

impl CustomOp2 for FrozenLinearBwd {
    fn name(&self) -> &'static str {
        "peft-frozen-linear-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(g), CpuStorage::F32(w)) => bwd(g, l1, w, l2),
            (CpuStorage::F64(g), CpuStorage::F64(w)) => bwd(g, l1, w, l2),
            _ => bail!("peft-frozen-linear-bwd: f32 or f64 operands of one dtype only"),
        }
    }
}

fn bwd<T: Real>(g: &[T], lg: &Layout, w: &[T], lw: &Layout) -> Result<(CpuStorage, Shape)> {
    let g = contiguous_part(g, lg)?;
    let (n, k, wo, s0, s1) = matrix(lw, w.len())?;
    if lg.dims().last() != Some(&n) {
        bail!(
            "peft-frozen-linear-bwd: g {:?}, w {:?}",
            lg.dims(),
            lw.dims()
        );
    }
    let m = g.len() / n;
    let mut out = vec![T::zero(); m * k];
    // SAFETY: `g` holds m·n elements, `out` m·k, and the weight layout was bounds-checked by `matrix`.
    // out := g · w with w [n, k] read through its own strides.
    unsafe {
        gemm::gemm(
            m,
            k,
            n,
            out.as_mut_ptr(),
            1,
            k as isize,
            false,
            g.as_ptr(),
            1,
            n as isize,
            w.as_ptr().add(wo),
            s1 as isize,
            s0 as isize,
            T::zero(),
            T::one(),
            false,
            false,
            false,
            gemm_parallelism(),
        );
    }
    let mut dims = lg.dims().to_vec();
    *dims.last_mut().expect("rank > 0") = k;
    Ok((T::to_cpu_storage_owned(out), Shape::from(dims)))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{fd_check, grads_of, max_diff, randn, strided, vars};
    use super::*;
    use crate::PeftRng;
    use candle_core::{DType, Var};

    /// The layout `BaseLayer` keeps: `[out, in]` as a transposed view of a contiguous `[in, out]`.
    fn base_layout(w: &Tensor) -> Tensor {
        w.t().unwrap().contiguous().unwrap().t().unwrap()
    }

    #[test]
    fn frozen_linear_forward_matches_reference() {
        let mut rng = PeftRng::new(41);
        let (inp, out) = (24, 10);
        let w = randn(&mut rng, &[out, inp], DType::F32);
        let b = randn(&mut rng, &[out], DType::F32);
        // A weight view with an offset and a row gap.
        let big = randn(&mut rng, &[out + 2, inp + 5], DType::F32);
        let w_gap = big.narrow(0, 1, out).unwrap().narrow(1, 3, inp).unwrap();
        for shape in [&[inp][..], &[3, inp], &[2, 5, inp], &[2, 3, 4, inp]] {
            let x = randn(&mut rng, shape, DType::F32);
            for wv in [w.clone(), base_layout(&w), w_gap.clone()] {
                for bias in [None, Some(&b)] {
                    for xin in [x.clone(), strided(&x)] {
                        let got = frozen_linear(&xin, &wv, bias).unwrap();
                        let want = frozen_linear_reference(&xin, &wv, bias).unwrap();
                        assert!(max_diff(&got, &want) < 1e-5, "{shape:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn frozen_linear_gradients_match_reference_and_skip_the_weight() {
        let mut rng = PeftRng::new(42);
        let (inp, out) = (33, 17);
        let w = randn(&mut rng, &[out, inp], DType::F32);
        let b = randn(&mut rng, &[out], DType::F32);
        for shape in [&[5, inp][..], &[2, 3, inp], &[2, 2, 3, inp]] {
            let x = randn(&mut rng, shape, DType::F32);
            let mut rshape = shape.to_vec();
            *rshape.last_mut().unwrap() = out;
            let r = randn(&mut rng, &rshape, DType::F32);
            let vs = vars(&[&x, &w, &b]);
            for layout in [false, true] {
                let wl = |t: &Tensor| if layout { base_layout(t) } else { t.clone() };
                let got = grads_of(&vs, &r, &|t| frozen_linear(&t[0], &wl(&t[1]), Some(&t[2])));
                let want = grads_of(&vs, &r, &|t| {
                    frozen_linear_reference(&t[0], &wl(&t[1]), Some(&t[2]))
                });
                let (g, e) = (got[0].as_ref().unwrap(), want[0].as_ref().unwrap());
                assert!(max_diff(g, e) < 1e-5, "{shape:?}: {}", max_diff(g, e));
                assert!(got[1].is_none(), "the weight is frozen");
                assert!(got[2].is_none(), "the bias is frozen");
            }
        }
        // A Var weight used directly (not a view of it) gets no gradient either.
        let wv = Var::from_tensor(&w).unwrap();
        let xv = Var::from_tensor(&randn(&mut rng, &[4, inp], DType::F32)).unwrap();
        let y = frozen_linear(xv.as_tensor(), wv.as_tensor(), None).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&wv).is_none());
        assert!(grads.get(&xv).is_some());
    }

    #[test]
    fn base_layer_trains_through_a_frozen_linear_and_conv1d() {
        let mut rng = PeftRng::new(45);
        let (inp, out) = (12, 7);
        let w = randn(&mut rng, &[out, inp], DType::F32);
        let b = randn(&mut rng, &[out], DType::F32);
        let x = randn(&mut rng, &[2, 3, inp], DType::F32);
        let r = randn(&mut rng, &[2, 3, out], DType::F32);
        let want = grads_of(&vars(&[&x]), &r, &|t| {
            frozen_linear_reference(&t[0], &w, Some(&b))
        });
        let want = want[0].as_ref().unwrap();
        let lin = crate::BaseLayer::linear(w.clone(), Some(b.clone())).unwrap();
        let conv = crate::BaseLayer::conv1d(w.t().unwrap().contiguous().unwrap(), Some(b.clone()))
            .unwrap();
        for base in [lin, conv] {
            let xv = Var::from_tensor(&x).unwrap();
            let y = base.forward(xv.as_tensor()).unwrap();
            let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            assert!(max_diff(grads.get(&xv).unwrap(), want) < 1e-5);
            assert!(grads.get(&base.weight().unwrap()).is_none());
        }
        // A trained weight (a modules_to_save copy) keeps its gradient.
        let base = crate::BaseLayer::linear(w.clone(), None).unwrap();
        let (xv, wv) = (Var::from_tensor(&x).unwrap(), Var::from_tensor(&w).unwrap());
        let y = base
            .forward_with(xv.as_tensor(), wv.as_tensor(), None)
            .unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&wv).is_some() && grads.get(&xv).is_some());
    }

    #[test]
    fn frozen_linear_finite_differences_f64() {
        let mut rng = PeftRng::new(43);
        let (inp, out) = (5, 4);
        let w = base_layout(&randn(&mut rng, &[out, inp], DType::F64));
        let b = randn(&mut rng, &[out], DType::F64);
        let x = randn(&mut rng, &[2, 3, inp], DType::F64);
        let r = randn(&mut rng, &[2, 3, out], DType::F64);
        let vs = vars(&[&x]);
        let grads = grads_of(&vs, &r, &|t| frozen_linear(&t[0], &w, Some(&b)));
        let loss = |t: &[Tensor]| {
            (frozen_linear(&t[0], &w, Some(&b))? * &r)?
                .sum_all()?
                .to_scalar::<f64>()
        };
        let err = fd_check(
            std::slice::from_ref(&x),
            0,
            grads[0].as_ref().unwrap(),
            &loss,
        );
        assert!(err < 1e-8, "{err}");
    }

    #[test]
    fn frozen_linear_falls_back_for_bf16() {
        let mut rng = PeftRng::new(44);
        let w = randn(&mut rng, &[6, 8], DType::BF16);
        let x = randn(&mut rng, &[3, 8], DType::BF16);
        let got = frozen_linear(&x, &w, None).unwrap();
        let want = frozen_linear_reference(&x, &w, None).unwrap();
        assert_eq!(max_diff(&got, &want), 0.0);
    }
}
