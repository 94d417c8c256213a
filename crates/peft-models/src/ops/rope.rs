//! Rotary position embedding (HF rotate-half) with an analytic backward for the input.

use super::{row_offsets, rows_readable};
use candle_core::{CpuStorage, CustomOp3, D, Layout, Result, Shape, Tensor, bail};
use peft::ops::cpu::{Real, contiguous_part, custom_supported, par_rows};

/// Rotary position embedding, HF's rotate-half form: `x·cos + rotate_half(x)·sin`, for `x` `[B, H, L, D]`
/// and `cos` / `sin` `[L, D/2]` (shared positions) or `[B, L, D/2]` (per-row positions).
///
/// `cos` and `sin` are constants: no gradient flows to them. On the CPU in f32 / f64 this is one custom op
/// whose backward is the transposed rotation (`x` may be any view whose last dimension is contiguous, such
/// as `q` transposed from `[B, L, H, D]`); elsewhere it is [`rope_reference`].
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if custom_supported(x)
        && cos.device().is_cpu()
        && sin.device().is_cpu()
        && x.rank() == 4
        && x.elem_count() > 0
        && cos.dims() == sin.dims()
    {
        let (b, _, l, d) = x.dims4()?;
        let half = d / 2;
        let table = match cos.dims() {
            [cl, ch] => *cl == l && *ch == half,
            [cb, cl, ch] => (*cb == b || *cb == 1) && *cl == l && *ch == half,
            _ => false,
        };
        if d % 2 == 0 && table {
            let prep = |t: &Tensor| -> Result<Tensor> {
                let t = t.detach().to_dtype(x.dtype())?;
                let t = if t.rank() == 3 && t.dim(0)? != b {
                    t.squeeze(0)?
                } else {
                    t
                };
                t.contiguous()
            };
            let (cos, sin) = (prep(cos)?, prep(sin)?);
            return rows_readable(x)?.apply_op3(&cos, &sin, Rope { transpose: false });
        }
    }
    rope_reference(x, cos, sin)
}

/// [`rope`] written with candle primitives (any device and dtype, candle's autograd).
pub fn rope_reference(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let (cos, sin) = (
        Tensor::cat(&[cos, cos], D::Minus1)?,
        Tensor::cat(&[sin, sin], D::Minus1)?,
    );
    let (cos, sin) = match cos.rank() {
        2 => (
            cos.unsqueeze(0)?.unsqueeze(0)?,
            sin.unsqueeze(0)?.unsqueeze(0)?,
        ),
        3 => (cos.unsqueeze(1)?, sin.unsqueeze(1)?),
        r => candle_core::bail!("rope: cos/sin must be [L, D/2] or [B, L, D/2], got rank {r}"),
    };
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d - d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos.to_dtype(x.dtype())?)?
        + rotated.broadcast_mul(&sin.to_dtype(x.dtype())?)?
}

/// The custom op `(x, cos, sin) → rotate(x)`, and with `transpose` the inverse (transposed) rotation, which
/// is its backward: `y₁ = x₁ cos ∓ x₂ sin`, `y₂ = x₂ cos ± x₁ sin` on the two halves of the last dimension.
struct Rope {
    transpose: bool,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "peft-rope"
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
            (CpuStorage::F32(x), CpuStorage::F32(c), CpuStorage::F32(s)) => {
                fwd(x, l1, c, l2, s, l3, self.transpose)
            }
            (CpuStorage::F64(x), CpuStorage::F64(c), CpuStorage::F64(s)) => {
                fwd(x, l1, c, l2, s, l3, self.transpose)
            }
            _ => bail!("peft-rope: f32 or f64 operands of one dtype only"),
        }
    }

    fn bwd(
        &self,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !x.track_op() {
            return Ok((None, None, None));
        }
        let op = Rope {
            transpose: !self.transpose,
        };
        let dx = rows_readable(grad)?.apply_op3_no_bwd(cos, sin, &op)?;
        Ok((Some(dx), None, None))
    }
}

fn fwd<T: Real>(
    x: &[T],
    lx: &Layout,
    cos: &[T],
    lc: &Layout,
    sin: &[T],
    ls: &Layout,
    transpose: bool,
) -> Result<(CpuStorage, Shape)> {
    let (b, h, l, d) = lx.shape().dims4()?;
    let half = d / 2;
    let per_batch = match lc.dims() {
        [cl, ch] if *cl == l && *ch == half => false,
        [cb, cl, ch] if *cb == b && *cl == l && *ch == half => true,
        other => bail!("peft-rope: cos/sin shape {other:?} for x {:?}", lx.dims()),
    };
    if lc.dims() != ls.dims() || d % 2 != 0 {
        bail!(
            "peft-rope: cos {:?} / sin {:?} / x {:?} do not fit",
            lc.dims(),
            ls.dims(),
            lx.dims()
        );
    }
    let (cos, sin) = (contiguous_part(cos, lc)?, contiguous_part(sin, ls)?);
    let (rows, _) = row_offsets(lx)?;
    if rows.last().is_some_and(|&o| o + d > x.len()) {
        bail!("peft-rope: layout {lx:?} exceeds its storage");
    }
    let mut out = vec![T::zero(); rows.len() * d];
    par_rows(&mut out, d, 2 * rows.len() * d, |r0, chunk| {
        for (i, o) in chunk.chunks_exact_mut(d).enumerate() {
            let r = r0 + i;
            let pos = r % l;
            let t = if per_batch {
                (r / (h * l)) * l + pos
            } else {
                pos
            };
            let (c, s) = (&cos[t * half..][..half], &sin[t * half..][..half]);
            let xr = &x[rows[r]..][..d];
            let (x1, x2) = xr.split_at(half);
            let (o1, o2) = o.split_at_mut(half);
            if transpose {
                for j in 0..half {
                    o1[j] = x1[j] * c[j] + x2[j] * s[j];
                    o2[j] = x2[j] * c[j] - x1[j] * s[j];
                }
            } else {
                for j in 0..half {
                    o1[j] = x1[j] * c[j] - x2[j] * s[j];
                    o2[j] = x2[j] * c[j] + x1[j] * s[j];
                }
            }
        }
    });
    Ok((T::to_cpu_storage_owned(out), lx.shape().clone()))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{fd_check, grads_of, max_diff, randn, vars};
    use super::*;
    use candle_core::DType;
    use peft::PeftRng;

    /// `cos`/`sin` tables of real angles, `[L, D/2]` or `[B, L, D/2]`.
    fn tables(rng: &mut PeftRng, lead: &[usize], half: usize, dtype: DType) -> (Tensor, Tensor) {
        let mut shape = lead.to_vec();
        shape.push(half);
        let theta = randn(rng, &shape, dtype);
        (theta.cos().unwrap(), theta.sin().unwrap())
    }

    /// `[B, L, H, D]` transposed to `[B, H, L, D]` (last dim contiguous, the rest strided), as attention does.
    fn transposed_q(
        rng: &mut PeftRng,
        b: usize,
        h: usize,
        l: usize,
        d: usize,
        dt: DType,
    ) -> Tensor {
        randn(rng, &[b, l, h, d], dt).transpose(1, 2).unwrap()
    }

    #[test]
    fn rope_forward_matches_reference() {
        let mut rng = PeftRng::new(31);
        for (b, h, l, d) in [(1, 1, 1, 2), (2, 3, 5, 8), (2, 9, 33, 64)] {
            for per_batch in [false, true] {
                let lead: Vec<usize> = if per_batch { vec![b, l] } else { vec![l] };
                let (cos, sin) = tables(&mut rng, &lead, d / 2, DType::F32);
                let x = randn(&mut rng, &[b, h, l, d], DType::F32);
                let xt = transposed_q(&mut rng, b, h, l, d, DType::F32);
                let xs = x
                    .transpose(2, 3)
                    .unwrap()
                    .contiguous()
                    .unwrap()
                    .transpose(2, 3)
                    .unwrap();
                for xin in [x, xt, xs] {
                    let got = rope(&xin, &cos, &sin).unwrap();
                    let want = rope_reference(&xin, &cos, &sin).unwrap();
                    assert!(max_diff(&got, &want) < 1e-6, "{b} {h} {l} {d} {per_batch}");
                }
            }
        }
        // A `[1, L, D/2]` table broadcasts over the batch.
        let (cos, sin) = tables(&mut rng, &[1, 4], 3, DType::F32);
        let x = randn(&mut rng, &[2, 2, 4, 6], DType::F32);
        let got = rope(&x, &cos, &sin).unwrap();
        let want = rope_reference(&x, &cos, &sin).unwrap();
        assert!(max_diff(&got, &want) < 1e-6);
    }

    #[test]
    fn rope_gradients_match_reference_autograd() {
        let mut rng = PeftRng::new(32);
        for (b, h, l, d) in [(2, 3, 5, 8), (2, 4, 7, 16), (2, 9, 33, 64)] {
            for per_batch in [false, true] {
                let lead: Vec<usize> = if per_batch { vec![b, l] } else { vec![l] };
                let (cos, sin) = tables(&mut rng, &lead, d / 2, DType::F32);
                let x = randn(&mut rng, &[b, l, h, d], DType::F32);
                let r = randn(&mut rng, &[b, h, l, d], DType::F32);
                let vs = vars(&[&x, &cos, &sin]);
                let got = grads_of(&vs, &r, &|t| rope(&t[0].transpose(1, 2)?, &t[1], &t[2]));
                let want = grads_of(&vs, &r, &|t| {
                    rope_reference(&t[0].transpose(1, 2)?, &t[1].detach(), &t[2].detach())
                });
                let (g, w) = (got[0].as_ref().unwrap(), want[0].as_ref().unwrap());
                assert!(max_diff(g, w) < 1e-5, "{b} {h} {l} {d}: {}", max_diff(g, w));
                assert!(
                    got[1].is_none() && got[2].is_none(),
                    "cos/sin are constants"
                );
            }
        }
    }

    #[test]
    fn rope_finite_differences_f64() {
        let mut rng = PeftRng::new(33);
        for per_batch in [false, true] {
            let (b, h, l, d) = (2, 2, 3, 6);
            let lead: Vec<usize> = if per_batch { vec![b, l] } else { vec![l] };
            let (cos, sin) = tables(&mut rng, &lead, d / 2, DType::F64);
            let x = randn(&mut rng, &[b, h, l, d], DType::F64);
            let r = randn(&mut rng, &[b, h, l, d], DType::F64);
            let vs = vars(&[&x]);
            let grads = grads_of(&vs, &r, &|t| rope(&t[0], &cos, &sin));
            let loss = |t: &[Tensor]| {
                (rope(&t[0], &cos, &sin)? * &r)?
                    .sum_all()?
                    .to_scalar::<f64>()
            };
            let err = fd_check(
                std::slice::from_ref(&x),
                0,
                grads[0].as_ref().unwrap(),
                &loss,
            );
            assert!(err < 1e-8, "{per_batch}: {err}");
        }
    }
}
