//! `silu(gate) ⊙ up`, the SwiGLU product of Llama-family MLPs, with an analytic backward.
//!
//! With candle primitives this is a `silu` and a `mul` forward, and backward the `mul`'s two products plus
//! `silu`'s sigmoid chain (negate, exp, add, reciprocal, …), each a pass over an `[B, L, intermediate]`
//! tensor. The custom op makes one pass forward and one backward, which writes both gradients.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, bail};
use peft::ops::cpu::{Real, custom_supported};

/// `silu(gate) · up` element-wise (`silu(x) = x · σ(x)`), for tensors of one shape.
///
/// On the CPU in f32 / f64 with contiguous inputs this is one custom op with the backward
/// `∂gate = g · up · σ(gate) · (1 + gate · (1 − σ(gate)))`, `∂up = g · silu(gate)`; elsewhere it is
/// [`silu_mul_reference`].
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let gate = Tensor::new(&[0f32, 2.0], &Device::Cpu)?;
/// let up = Tensor::new(&[3f32, 0.5], &Device::Cpu)?;
/// let y = peft_models::ops::silu_mul(&gate, &up)?.to_vec1::<f32>()?;
/// assert_eq!(y[0], 0.0);
/// assert!((y[1] - 0.5 * 2.0 / (1.0 + (-2f32).exp())).abs() < 1e-6);
/// # Ok(()) }
/// ```
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if custom_supported(gate)
        && gate.dtype() == up.dtype()
        && gate.dims() == up.dims()
        && gate.is_contiguous()
        && up.is_contiguous()
        && gate.elem_count() > 0
    {
        return gate.apply_op2(up, SiluMul);
    }
    silu_mul_reference(gate, up)
}

/// [`silu_mul`] written with candle primitives (any device and dtype, candle's autograd).
pub fn silu_mul_reference(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.silu()? * up
}

/// `σ(x) = 1 / (1 + e^{−x})`.
#[inline]
fn sigmoid<T: Real>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

/// Cuts `n` elements into up to `get_num_threads()` chunks of at least 64k elements and runs `f(start, len)`
/// on each, in scoped threads.
fn par_chunks<T: Send>(out: &mut [T], f: impl Fn(usize, &mut [T]) + Sync) {
    let n = out.len();
    let threads = candle_core::utils::get_num_threads()
        .min(n / (1 << 16))
        .max(1);
    if threads == 1 {
        return f(0, out);
    }
    let per = n.div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let mut chunks = out.chunks_mut(per).enumerate();
        let (_, first) = chunks.next().expect("at least one chunk");
        let handles: Vec<_> = chunks
            .map(|(i, c)| scope.spawn(move || f(i * per, c)))
            .collect();
        f(0, first);
        for h in handles {
            h.join().expect("an ops worker thread panicked");
        }
    });
}

/// The contiguous elements a layout addresses.
fn part<'a, T>(s: &'a [T], l: &Layout, what: &str) -> Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) if b <= s.len() => Ok(&s[a..b]),
        _ => bail!("peft-silu-mul: {what} is not contiguous within its storage ({l:?})"),
    }
}

/// The forward custom op.
struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "peft-silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        match (s1, s2) {
            (CpuStorage::F32(g), CpuStorage::F32(u)) => fwd(g, l1, u, l2),
            (CpuStorage::F64(g), CpuStorage::F64(u)) => fwd(g, l1, u, l2),
            _ => bail!("peft-silu-mul: f32 or f64 operands of one dtype only"),
        }
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !gate.track_op() && !up.track_op() {
            return Ok((None, None));
        }
        // One pass writes both gradients, stacked: [2, …].
        let both = gate.apply_op3_no_bwd(up, &grad.contiguous()?, &SiluMulBwd)?;
        let (dg, du) = (both.get(0)?, both.get(1)?);
        Ok((gate.track_op().then_some(dg), up.track_op().then_some(du)))
    }
}

fn fwd<T: Real>(g: &[T], lg: &Layout, u: &[T], lu: &Layout) -> Result<(CpuStorage, Shape)> {
    if lg.dims() != lu.dims() {
        bail!(
            "peft-silu-mul: shapes {:?} and {:?} differ",
            lg.dims(),
            lu.dims()
        );
    }
    let (g, u) = (part(g, lg, "gate")?, part(u, lu, "up")?);
    let mut out = vec![T::zero(); g.len()];
    par_chunks(&mut out, |start, chunk| {
        let (g, u) = (&g[start..][..chunk.len()], &u[start..][..chunk.len()]);
        for ((o, &gv), &uv) in chunk.iter_mut().zip(g).zip(u) {
            *o = gv * sigmoid(gv) * uv;
        }
    });
    Ok((T::to_cpu_storage_owned(out), lg.shape().clone()))
}

/// The backward: `(gate, up, g) → [∂gate, ∂up]` stacked on a new first axis.
struct SiluMulBwd;

impl CustomOp3 for SiluMulBwd {
    fn name(&self) -> &'static str {
        "peft-silu-mul-bwd"
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
            (CpuStorage::F32(g), CpuStorage::F32(u), CpuStorage::F32(d)) => {
                bwd(g, l1, u, l2, d, l3)
            }
            (CpuStorage::F64(g), CpuStorage::F64(u), CpuStorage::F64(d)) => {
                bwd(g, l1, u, l2, d, l3)
            }
            _ => bail!("peft-silu-mul-bwd: f32 or f64 operands of one dtype only"),
        }
    }
}

fn bwd<T: Real>(
    g: &[T],
    lg: &Layout,
    u: &[T],
    lu: &Layout,
    d: &[T],
    ld: &Layout,
) -> Result<(CpuStorage, Shape)> {
    if lg.dims() != lu.dims() || lg.dims() != ld.dims() {
        bail!(
            "peft-silu-mul-bwd: shapes {:?}, {:?}, {:?} differ",
            lg.dims(),
            lu.dims(),
            ld.dims()
        );
    }
    let (g, u, d) = (
        part(g, lg, "gate")?,
        part(u, lu, "up")?,
        part(d, ld, "gradient")?,
    );
    let n = g.len();
    let mut out = vec![T::zero(); 2 * n];
    let (dg, du) = out.split_at_mut(n);
    // Both halves in one sweep per chunk: split the work by element ranges of the first half and write the
    // matching range of the second.
    let du_ptr = SendPtr(du.as_mut_ptr());
    par_chunks(dg, |start, chunk| {
        let len = chunk.len();
        // SAFETY: chunks of `dg` are disjoint element ranges [start, start + len); the same ranges of `du`
        // (length n, like `dg`) are therefore disjoint too, and `du` outlives the scoped threads.
        let du = unsafe { std::slice::from_raw_parts_mut(du_ptr.get().add(start), len) };
        let (g, u, d) = (&g[start..][..len], &u[start..][..len], &d[start..][..len]);
        for i in 0..len {
            let s = sigmoid(g[i]);
            let silu = g[i] * s;
            chunk[i] = d[i] * u[i] * s * (T::one() + g[i] * (T::one() - s));
            du[i] = d[i] * silu;
        }
    });
    let mut dims = vec![2];
    dims.extend_from_slice(lg.dims());
    Ok((T::to_cpu_storage_owned(out), Shape::from(dims)))
}

/// A raw pointer that may cross into the scoped worker threads (they write disjoint ranges).
#[derive(Clone, Copy)]
struct SendPtr<T>(*mut T);

// SAFETY: used only to write disjoint ranges from scoped threads that end before the buffer is read.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above; the pointer itself is only copied.
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    fn get(self) -> *mut T {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{fd_check, grads_of, max_diff, randn, vars};
    use super::*;
    use candle_core::DType;
    use peft::PeftRng;

    #[test]
    fn forward_matches_reference() {
        let mut rng = PeftRng::new(31);
        for shape in [&[7][..], &[3, 5], &[2, 64, 1536]] {
            let g = (randn(&mut rng, shape, DType::F32) * 4.0).unwrap();
            let u = randn(&mut rng, shape, DType::F32);
            let got = silu_mul(&g, &u).unwrap();
            let want = silu_mul_reference(&g, &u).unwrap();
            assert!(max_diff(&got, &want) < 1e-5, "{shape:?}");
        }
        // strided inputs take the reference path and agree
        let g = randn(&mut rng, &[4, 6], DType::F32);
        let u = randn(&mut rng, &[6, 4], DType::F32).t().unwrap();
        assert!(
            max_diff(
                &silu_mul(&g, &u).unwrap(),
                &silu_mul_reference(&g, &u).unwrap()
            ) < 1e-6
        );
    }

    #[test]
    fn gradients_match_reference_and_finite_differences() {
        let mut rng = PeftRng::new(32);
        for shape in [&[3, 4][..], &[2, 3, 70_000]] {
            let g = (randn(&mut rng, shape, DType::F64) * 3.0).unwrap();
            let u = randn(&mut rng, shape, DType::F64);
            let r = randn(&mut rng, shape, DType::F64);
            let vs = vars(&[&g, &u]);
            let got = grads_of(&vs, &r, &|xs| silu_mul(&xs[0], &xs[1]));
            let want = grads_of(&vs, &r, &|xs| silu_mul_reference(&xs[0], &xs[1]));
            for (a, b) in got.iter().zip(&want) {
                assert!(
                    max_diff(a.as_ref().unwrap(), b.as_ref().unwrap()) < 1e-12,
                    "{shape:?}"
                );
            }
            if shape.len() == 2 {
                for (which, analytic) in got.iter().enumerate() {
                    let err = fd_check(
                        &[g.clone(), u.clone()],
                        which,
                        analytic.as_ref().unwrap(),
                        &|xs| {
                            (silu_mul(&xs[0], &xs[1])? * &r)?
                                .sum_all()?
                                .to_scalar::<f64>()
                        },
                    );
                    assert!(err < 1e-7, "{which}: {err}");
                }
            }
        }
    }
}
