//! Batched matrix inverse with an analytic backward (OFT's and BOFT's exact Cayley transform and OFT's
//! unmerge).
//!
//! The forward is Gauss–Jordan elimination with partial pivoting, accumulated in f64 whatever the input
//! dtype, one matrix per work item (split over threads when the batch is large). A singular (or
//! numerically singular, or non-finite) matrix is an error naming its batch index, never a panic or a
//! matrix of infinities. The backward is `∂L/∂A = −A⁻ᵀ (∂L/∂A⁻¹) A⁻ᵀ`, written with candle matmuls (so it
//! is itself differentiable).

use super::cpu::{Real, contiguous_part, custom_supported, par_rows};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, bail};

/// The inverse of every matrix in `a` (`[.., n, n]`), differentiable:
/// `∂L/∂A = −A⁻ᵀ (∂L/∂A⁻¹) A⁻ᵀ`.
///
/// CPU f32 / f64 tensors (any strides) are inverted by a custom op accumulating in f64; other dtypes are
/// computed in f32 and other devices on the CPU, and the result is moved back to `a`'s device and dtype
/// (both moves are recorded, so gradients still flow). Errors: rank below 2, non-square trailing
/// dimensions, or a singular or non-finite matrix.
pub fn batched_inverse(a: &Tensor) -> Result<Tensor> {
    let rank = a.rank();
    if rank < 2 {
        bail!(
            "batched_inverse: expected a [.., n, n] tensor, got shape {:?}",
            a.dims()
        );
    }
    let (r, c) = (a.dims()[rank - 2], a.dims()[rank - 1]);
    if r != c {
        bail!(
            "batched_inverse: the last two dimensions must be square, got shape {:?}",
            a.dims()
        );
    }
    if custom_supported(a) {
        if a.elem_count() == 0 {
            return a.zeros_like();
        }
        return a.contiguous()?.apply_op1(Inverse);
    }
    let compute = if a.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let on_cpu = a.to_device(&Device::Cpu)?.to_dtype(compute)?;
    batched_inverse(&on_cpu)?
        .to_dtype(a.dtype())?
        .to_device(a.device())
}

/// The forward custom op (contiguous input).
struct Inverse;

impl CustomOp1 for Inverse {
    fn name(&self) -> &'static str {
        "peft-batched-inverse"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match s {
            CpuStorage::F32(x) => fwd(x, l),
            CpuStorage::F64(x) => fwd(x, l),
            _ => bail!("peft-batched-inverse: f32 or f64 only"),
        }
    }

    fn bwd(&self, a: &Tensor, y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !a.track_op() {
            return Ok(None);
        }
        let rank = y.rank();
        let yt = y.transpose(rank - 2, rank - 1)?.contiguous()?;
        let g = grad.contiguous()?;
        Ok(Some(yt.matmul(&g)?.matmul(&yt)?.neg()?))
    }
}

fn fwd<T: Real>(x: &[T], l: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = contiguous_part(x, l)?;
    let dims = l.dims();
    let n = dims[dims.len() - 1];
    let nn = n * n;
    if nn == 0 || !x.len().is_multiple_of(nn) {
        bail!("peft-batched-inverse: unexpected layout {l:?}");
    }
    let mut out = vec![T::zero(); x.len()];
    let results = par_rows(&mut out, nn, x.len() * n, |m0, chunk| {
        let mut work = vec![0f64; 2 * nn];
        for (i, o) in chunk.chunks_exact_mut(nn).enumerate() {
            let m = m0 + i;
            invert_one(&x[m * nn..][..nn], n, &mut work, o)
                .map_err(|e| format!("matrix {m} of the batch (shape {dims:?}) {e}"))?;
        }
        Ok::<(), String>(())
    });
    for r in results {
        if let Err(e) = r {
            bail!("batched_inverse: {e}");
        }
    }
    Ok((T::to_cpu_storage_owned(out), l.shape().clone()))
}

/// Gauss–Jordan with partial pivoting on one row-major `n × n` matrix, in f64; `work` holds `2 n²`.
fn invert_one<T: Real>(
    a: &[T],
    n: usize,
    work: &mut [f64],
    out: &mut [T],
) -> std::result::Result<(), String> {
    let nn = n * n;
    let (m, inv) = work.split_at_mut(nn);
    let mut scale = 0f64;
    for (w, v) in m.iter_mut().zip(a) {
        *w = v.to_f64();
        if !w.is_finite() {
            return Err("has a non-finite entry".into());
        }
        scale = scale.max(w.abs());
    }
    inv.fill(0.0);
    for i in 0..n {
        inv[i * n + i] = 1.0;
    }
    if scale == 0.0 {
        return Err("is singular (all zeros)".into());
    }
    let tol = scale * (n as f64) * f64::EPSILON;
    for col in 0..n {
        // Partial pivoting: the largest remaining entry of this column.
        let (p, pv) = (col..n)
            .map(|r| (r, m[r * n + col].abs()))
            .fold(
                (col, -1.0),
                |best, cur| if cur.1 > best.1 { cur } else { best },
            );
        if pv <= tol {
            return Err(format!(
                "is singular (pivot {pv:e} in column {col}, below {tol:e})"
            ));
        }
        if p != col {
            for k in 0..n {
                m.swap(p * n + k, col * n + k);
                inv.swap(p * n + k, col * n + k);
            }
        }
        let d = 1.0 / m[col * n + col];
        for k in 0..n {
            m[col * n + k] *= d;
            inv[col * n + k] *= d;
        }
        for r in 0..n {
            if r == col {
                continue;
            }
            let f = m[r * n + col];
            if f == 0.0 {
                continue;
            }
            for k in 0..n {
                m[r * n + k] -= f * m[col * n + k];
                inv[r * n + k] -= f * inv[col * n + k];
            }
        }
    }
    for (o, &v) in out.iter_mut().zip(inv.iter()) {
        if !v.is_finite() {
            return Err("is too ill-conditioned (non-finite inverse)".into());
        }
        *o = T::from_f64(v);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{fd_check, grads_of, max_diff, randn, strided, vars};
    use super::*;
    use crate::PeftRng;

    /// Random well-conditioned matrices: `n · I + randn`.
    fn well_conditioned(rng: &mut PeftRng, shape: &[usize], dtype: DType) -> Tensor {
        let n = shape[shape.len() - 1];
        let eye = Tensor::eye(n, dtype, &Device::Cpu).unwrap();
        randn(rng, shape, dtype)
            .broadcast_add(&(eye * n as f64).unwrap())
            .unwrap()
    }

    fn identity_error(a: &Tensor, inv: &Tensor) -> f64 {
        let n = a.dim(candle_core::D::Minus1).unwrap();
        let prod = a
            .contiguous()
            .unwrap()
            .matmul(&inv.contiguous().unwrap())
            .unwrap();
        let eye = Tensor::eye(n, a.dtype(), &Device::Cpu)
            .unwrap()
            .broadcast_as(prod.shape())
            .unwrap();
        max_diff(&prod, &eye)
    }

    #[test]
    fn inverse_times_matrix_is_identity() {
        let mut rng = PeftRng::new(41);
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-12)] {
            for shape in [
                &[1, 1][..],
                &[3, 3],
                &[4, 8, 8],
                &[2, 3, 5, 5],
                &[2, 32, 32],
            ] {
                let a = well_conditioned(&mut rng, shape, dtype);
                let inv = batched_inverse(&a).unwrap();
                assert_eq!(inv.dims(), shape);
                assert_eq!(inv.dtype(), dtype);
                let err = identity_error(&a, &inv);
                assert!(err < tol, "{dtype:?} {shape:?}: {err}");
            }
        }
    }

    #[test]
    fn inverse_needs_pivoting() {
        // A zero leading entry: plain Gauss–Jordan without pivoting would divide by zero.
        let a = Tensor::new(
            &[[0f64, 1.0, 2.0], [1.0, 0.0, 3.0], [4.0, -3.0, 8.0]],
            &Device::Cpu,
        )
        .unwrap();
        let inv = batched_inverse(&a).unwrap();
        assert!(identity_error(&a, &inv) < 1e-12);
    }

    #[test]
    fn inverse_of_non_contiguous_input() {
        let mut rng = PeftRng::new(42);
        let a = well_conditioned(&mut rng, &[3, 6, 6], DType::F32);
        let s = strided(&a);
        assert!(!s.is_contiguous());
        let got = batched_inverse(&s).unwrap();
        let want = batched_inverse(&a.t().unwrap().contiguous().unwrap())
            .unwrap()
            .t()
            .unwrap();
        // strided(a) has a's values, so its inverse is a's inverse; (Aᵀ)⁻¹ᵀ is the same thing.
        assert!(max_diff(&got, &batched_inverse(&a).unwrap()) < 1e-6);
        assert!(max_diff(&got, &want) < 1e-5);
        // A transposed view and a narrowed batch.
        let t = a.transpose(1, 2).unwrap();
        assert!(identity_error(&t, &batched_inverse(&t).unwrap()) < 1e-5);
        let nr = a.narrow(0, 1, 2).unwrap();
        assert!(identity_error(&nr, &batched_inverse(&nr).unwrap()) < 1e-5);
    }

    #[test]
    fn inverse_of_other_dtypes_goes_through_f32() {
        let mut rng = PeftRng::new(43);
        let a = well_conditioned(&mut rng, &[2, 4, 4], DType::F32);
        let half = a.to_dtype(DType::BF16).unwrap();
        let inv = batched_inverse(&half).unwrap();
        assert_eq!(inv.dtype(), DType::BF16);
        let want = batched_inverse(&half.to_dtype(DType::F32).unwrap()).unwrap();
        assert!(max_diff(&inv, &want) < 1e-2);
    }

    #[test]
    fn singular_and_bad_inputs_are_errors() {
        let dev = Device::Cpu;
        let sing =
            Tensor::new(&[[[1f32, 0.0], [0.0, 1.0]], [[1.0, 2.0], [2.0, 4.0]]], &dev).unwrap();
        let e = batched_inverse(&sing).unwrap_err().to_string();
        assert!(e.contains("singular") && e.contains("matrix 1"), "{e}");
        let zeros = Tensor::zeros((3, 3), DType::F64, &dev).unwrap();
        assert!(
            batched_inverse(&zeros)
                .unwrap_err()
                .to_string()
                .contains("singular")
        );
        let nan = Tensor::new(&[[f64::NAN, 0.0], [0.0, 1.0]], &dev).unwrap();
        assert!(
            batched_inverse(&nan)
                .unwrap_err()
                .to_string()
                .contains("non-finite")
        );
        let rect = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        assert!(
            batched_inverse(&rect)
                .unwrap_err()
                .to_string()
                .contains("square")
        );
        let vec = Tensor::zeros(3, DType::F32, &dev).unwrap();
        assert!(
            batched_inverse(&vec)
                .unwrap_err()
                .to_string()
                .contains("[.., n, n]")
        );
        let empty = Tensor::zeros((0, 2, 2), DType::F32, &dev).unwrap();
        assert_eq!(batched_inverse(&empty).unwrap().dims(), [0, 2, 2]);
    }

    #[test]
    fn inverse_finite_differences_f64() {
        let mut rng = PeftRng::new(44);
        for shape in [&[3, 3][..], &[2, 4, 4], &[2, 1, 3, 3]] {
            let a = well_conditioned(&mut rng, shape, DType::F64);
            let r = randn(&mut rng, shape, DType::F64);
            let vs = vars(&[&a]);
            let grads = grads_of(&vs, &r, &|t| batched_inverse(&strided(&t[0])));
            let loss = |t: &[Tensor]| {
                (batched_inverse(&t[0])? * &r)?
                    .sum_all()?
                    .to_scalar::<f64>()
            };
            let err = fd_check(
                std::slice::from_ref(&a),
                0,
                grads[0].as_ref().unwrap(),
                &loss,
            );
            assert!(err < 1e-7, "{shape:?}: {err}");
        }
    }

    #[test]
    fn inverse_gradient_through_a_chain() {
        // The gradient of (I + Q)⁻¹ w.r.t. a parameter that builds Q, in f64, against finite differences.
        let mut rng = PeftRng::new(45);
        let m = (randn(&mut rng, &[2, 4, 4], DType::F64) * 0.3).unwrap();
        let r = randn(&mut rng, &[2, 4, 4], DType::F64);
        let f = |t: &[Tensor]| -> Result<Tensor> {
            let q = (&t[0] - t[0].transpose(1, 2)?)?;
            let eye = Tensor::eye(4, DType::F64, &Device::Cpu)?;
            let inv = batched_inverse(&q.broadcast_add(&eye)?)?;
            eye.broadcast_sub(&q)?.matmul(&inv)
        };
        let vs = vars(&[&m]);
        let grads = grads_of(&vs, &r, &f);
        let loss = |t: &[Tensor]| (f(t)? * &r)?.sum_all()?.to_scalar::<f64>();
        let err = fd_check(
            std::slice::from_ref(&m),
            0,
            grads[0].as_ref().unwrap(),
            &loss,
        );
        assert!(err < 1e-7, "{err}");
    }
}
