//! Hand-written CPU kernels for hot inference paths.
//!
//! candle's generic ops allocate a fresh tensor and make a full memory pass per elementwise step. On the
//! unmerged LoRA forward that is what costs, not the low-rank matmuls: `result + s·(x Aᵀ) Bᵀ` as candle ops
//! writes the `[tokens, out]` product, scales it into another, and adds that into a third. The kernels here
//! accumulate into the output in place with one `gemm` call instead.
//!
//! They work on contiguous f32 CPU tensors and record no backward op, so callers use them only in inference
//! (`ForwardCtx::training == false`) and keep the plain candle computation as the fallback for other devices,
//! dtypes and layouts, and for training.

use crate::layer::base::linear_apply;
use candle_core::{CpuStorage, DType, InplaceOp3, Layout, Tensor, bail};

/// Whether `t` is a CPU f32 tensor.
fn cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// Whether [`add_matmul_t_inplace`] accepts these operands: all f32 on the CPU; `dst` `[.., n]` and `lhs`
/// `[.., k]` contiguous with the same leading dimensions; `rhs` a 2-D `[n, k]` with any (non-zero) strides.
pub fn add_matmul_t_supported(dst: &Tensor, lhs: &Tensor, rhs: &Tensor) -> bool {
    if !(cpu_f32(dst) && cpu_f32(lhs) && cpu_f32(rhs))
        || dst.rank() == 0
        || dst.rank() != lhs.rank()
        || rhs.rank() != 2
    {
        return false;
    }
    let (dd, ld, rd) = (dst.dims(), lhs.dims(), rhs.dims());
    let last = dd.len() - 1;
    dd[..last] == ld[..last]
        && rd == [dd[last], ld[last]]
        && dst.is_contiguous()
        && lhs.is_contiguous()
        && rhs.layout().stride().iter().all(|&s| s != 0)
}

/// `dst += scale · lhs · rhsᵀ`, in place: `dst` `[.., n]`, `lhs` `[.., k]`, `rhs` `[n, k]` (a Linear weight
/// layout), one `gemm` call that reads and writes `dst` once.
///
/// The operands must pass [`add_matmul_t_supported`] (an error otherwise). `dst` is written through its
/// storage, so every tensor sharing that storage sees the change, and no backward op is recorded: use it on a
/// tensor the caller owns, outside training.
pub fn add_matmul_t_inplace(
    dst: &Tensor,
    lhs: &Tensor,
    rhs: &Tensor,
    scale: f64,
) -> candle_core::Result<()> {
    if !add_matmul_t_supported(dst, lhs, rhs) {
        bail!(
            "add_matmul_t_inplace: unsupported operands dst {:?} {:?}, lhs {:?} {:?}, rhs {:?} {:?} (contiguous f32 CPU \
             [.., n] += [.., k] · [n, k]ᵀ)",
            dst.dims(),
            dst.dtype(),
            lhs.dims(),
            lhs.dtype(),
            rhs.dims(),
            rhs.dtype()
        );
    }
    dst.inplace_op3(
        lhs,
        rhs,
        &AddMatmulT {
            scale: scale as f32,
        },
    )
}

/// The in-place op behind [`add_matmul_t_inplace`].
struct AddMatmulT {
    scale: f32,
}

impl InplaceOp3 for AddMatmulT {
    fn name(&self) -> &'static str {
        "add-matmul-t"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(dst), CpuStorage::F32(lhs), CpuStorage::F32(rhs)) = (s1, s2, s3)
        else {
            bail!("add-matmul-t: f32 only");
        };
        let (n, k) = l3.shape().dims2()?;
        let m = l1.shape().elem_count() / n.max(1);
        if !l1.is_contiguous()
            || !l2.is_contiguous()
            || l2.shape().elem_count() != m * k
            || l1.dims().last() != Some(&n)
        {
            bail!("add-matmul-t: layouts {l1:?}, {l2:?}, {l3:?} do not fit");
        }
        if m == 0 || n == 0 {
            return Ok(());
        }
        let (o1, o2, o3) = (l1.start_offset(), l2.start_offset(), l3.start_offset());
        let (rs0, rs1) = (l3.stride()[0], l3.stride()[1]);
        // Bounds of every element each operand's layout addresses (the layouts come from live tensors, but a
        // wrong one here would be memory corruption, so check).
        let rhs_end = o3 + (n - 1) * rs0 + (k - 1) * rs1 + 1;
        if o1 + m * n > dst.len() || o2 + m * k > lhs.len() || rhs_end > rhs.len() {
            bail!("add-matmul-t: layouts exceed their storage");
        }
        let threads = candle_core::utils::get_num_threads();
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        // SAFETY: the three regions were bounds-checked above; `dst` is borrowed mutably (candle holds its
        // write lock) and `lhs`/`rhs` are distinct storages (candle refuses aliased operands for this op).
        // gemm computes dst := 1·dst + scale·lhs·rhs, where rhs is `rhsᵀ` read through swapped strides:
        // element (kk, nn) of the [k, n] matrix is rhs[nn, kk].
        unsafe {
            gemm::gemm(
                m,
                n,
                k,
                dst.as_mut_ptr().add(o1),
                1,
                n as isize,
                true,
                lhs.as_ptr().add(o2),
                1,
                k as isize,
                rhs.as_ptr().add(o3),
                rs0 as isize,
                rs1 as isize,
                1.0f32,
                self.scale,
                false,
                false,
                false,
                parallelism,
            );
        }
        Ok(())
    }
}

/// The unmerged LoRA forward for Linear and GPT-2 Conv1D layers in inference: `result += scale · (x Aᵀ) Bᵀ`
/// in place, with `a` = `lora_A.weight` `[r, in]` and `b` = `lora_B.weight` `[out, r]`.
///
/// Returns `Ok(false)`, having done nothing, when the operands are not all f32 on the CPU or `result` is not
/// contiguous; the caller then runs the candle ops. The small product `x Aᵀ` (`[.., r]`) goes through candle;
/// only the accumulation into `result` is in place (see [`add_matmul_t_inplace`] for what that implies).
pub fn lora_add_inplace(
    result: &Tensor,
    x: &Tensor,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> candle_core::Result<bool> {
    let shapes_fit = a.rank() == 2
        && b.rank() == 2
        && x.rank() == result.rank()
        && x.rank() > 0
        && a.dim(0)? == b.dim(1)?
        && x.dims().last() == Some(&a.dim(1)?)
        && result.dims().last() == Some(&b.dim(0)?)
        && x.dims()[..x.rank() - 1] == result.dims()[..result.rank() - 1];
    if !(shapes_fit
        && cpu_f32(result)
        && cpu_f32(x)
        && cpu_f32(a)
        && cpu_f32(b)
        && result.is_contiguous())
    {
        return Ok(false);
    }
    let h = linear_apply(x, a, true)?.contiguous()?;
    if !add_matmul_t_supported(result, &h, b) {
        return Ok(false);
    }
    add_matmul_t_inplace(result, &h, b, scale)?;
    Ok(true)
}

/// The frozen Linear forward in inference, `y = x Wᵀ + b`, as one `gemm` that accumulates into the
/// broadcast bias (one pass over the output instead of a product and a separate bias add).
///
/// Returns `Ok(None)` when the operands are not f32 on the CPU or when any of them takes part in a gradient
/// computation (the in-place op records no backward); the caller then runs the candle ops.
pub fn linear_inplace(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> candle_core::Result<Option<Tensor>> {
    if x.track_op()
        || weight.track_op()
        || bias.is_some_and(|b| b.track_op())
        || !cpu_f32(x)
        || !cpu_f32(weight)
        || weight.rank() != 2
        || x.rank() == 0
    {
        return Ok(None);
    }
    let mut out_dims = x.dims().to_vec();
    let last = out_dims.len() - 1;
    out_dims[last] = weight.dim(0)?;
    let dst = match bias {
        Some(b) if cpu_f32(b) => b.broadcast_as(out_dims.as_slice())?.contiguous()?,
        Some(_) => return Ok(None),
        None => Tensor::zeros(out_dims.as_slice(), DType::F32, x.device())?,
    };
    // `broadcast_as(..).contiguous()` of a 1-D bias over one row is a no-op view: make sure we own `dst`.
    let dst =
        if dst.is_contiguous() && dst.elem_count() == bias.map(|b| b.elem_count()).unwrap_or(0) {
            dst.copy()?
        } else {
            dst
        };
    let x = x.contiguous()?;
    if !add_matmul_t_supported(&dst, &x, weight) {
        return Ok(None);
    }
    add_matmul_t_inplace(&dst, &x, weight, 1.0)?;
    Ok(Some(dst))
}

#[cfg(test)]
mod tests {

    #[test]
    fn linear_inplace_matches_candle_and_leaves_the_bias_alone() {
        use candle_core::Device;
        let mut rng = crate::PeftRng::new(5);
        let w = rng
            .normal_tensor((6, 4), 0.0, 1.0, DType::F32, &Device::Cpu)
            .unwrap();
        let w_view = w.t().unwrap().contiguous().unwrap().t().unwrap(); // the layout BaseLayer keeps
        let b = rng
            .normal_tensor(6, 0.0, 1.0, DType::F32, &Device::Cpu)
            .unwrap();
        let b_before = b.to_vec1::<f32>().unwrap();
        for shape in [vec![1, 4], vec![3, 4], vec![2, 3, 4]] {
            let x = rng
                .normal_tensor(shape.as_slice(), 0.0, 1.0, DType::F32, &Device::Cpu)
                .unwrap();
            for bias in [Some(&b), None] {
                let got = linear_inplace(&x, &w_view, bias)
                    .unwrap()
                    .expect("supported");
                let want = linear_apply(&x, &w, true).unwrap();
                let want = match bias {
                    Some(b) => want.broadcast_add(b).unwrap(),
                    None => want,
                };
                assert!(max_diff(&got, &want) < 1e-5);
            }
        }
        assert_eq!(
            b.to_vec1::<f32>().unwrap(),
            b_before,
            "the bias is never written"
        );
        // inputs that take part in a gradient computation are left to candle
        let v =
            candle_core::Var::from_tensor(&Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap())
                .unwrap();
        assert!(
            linear_inplace(v.as_tensor(), &w_view, Some(&b))
                .unwrap()
                .is_none()
        );
    }

    use super::*;
    use crate::PeftRng;
    use candle_core::Device;
    use peft_test_support::max_diff;

    #[test]
    fn lora_add_inplace_matches_candle_ops() {
        let dev = Device::Cpu;
        let mut rng = PeftRng::new(7);
        let (tokens, inp, out, r, scale) = (37, 64, 48, 4, 2.5);
        let x = rng
            .normal_tensor((2, tokens, inp), 0.0, 1.0, DType::F32, &dev)
            .unwrap();
        let a = rng
            .normal_tensor((r, inp), 0.0, 0.2, DType::F32, &dev)
            .unwrap();
        let b = rng
            .normal_tensor((out, r), 0.0, 0.2, DType::F32, &dev)
            .unwrap();
        let base = rng
            .normal_tensor((2, tokens, out), 0.0, 1.0, DType::F32, &dev)
            .unwrap();
        let want = (&base
            + (x.broadcast_matmul(&a.t().unwrap())
                .unwrap()
                .broadcast_matmul(&b.t().unwrap())
                .unwrap()
                * scale)
                .unwrap())
        .unwrap();
        let result = base.copy().unwrap();
        assert!(lora_add_inplace(&result, &x, &a, &b, scale).unwrap());
        assert!(
            max_diff(&result, &want) < 1e-4,
            "diff {}",
            max_diff(&result, &want)
        );
        // `base` (a different storage) is untouched.
        assert!(max_diff(&base, &want) > 1e-2);
    }

    #[test]
    fn strided_rhs_and_offset_dst() {
        let dev = Device::Cpu;
        let mut rng = PeftRng::new(8);
        let lhs = rng
            .normal_tensor((5, 3), 0.0, 1.0, DType::F32, &dev)
            .unwrap();
        // rhs [n=6, k=3] as a transposed view of a [3, 6] tensor; dst a contiguous row range of a bigger one.
        let rhs = rng
            .normal_tensor((3, 6), 0.0, 1.0, DType::F32, &dev)
            .unwrap()
            .t()
            .unwrap();
        let big = rng
            .normal_tensor((9, 6), 0.0, 1.0, DType::F32, &dev)
            .unwrap();
        let dst = big.narrow(0, 2, 5).unwrap();
        let want = (&dst + (lhs.matmul(&rhs.t().unwrap()).unwrap() * -0.5).unwrap()).unwrap();
        assert!(add_matmul_t_supported(&dst, &lhs, &rhs));
        add_matmul_t_inplace(&dst, &lhs, &rhs, -0.5).unwrap();
        assert!(max_diff(&dst, &want) < 1e-5);
    }

    #[test]
    fn unsupported_operands_fall_back() {
        let dev = Device::Cpu;
        let x = Tensor::ones((4, 8), DType::F32, &dev).unwrap();
        let a = Tensor::ones((2, 8), DType::F32, &dev).unwrap();
        let b = Tensor::ones((6, 2), DType::F32, &dev).unwrap();
        let f64_result = Tensor::zeros((4, 6), DType::F64, &dev).unwrap();
        assert!(!lora_add_inplace(&f64_result, &x, &a, &b, 1.0).unwrap());
        let strided = Tensor::zeros((6, 4), DType::F32, &dev)
            .unwrap()
            .t()
            .unwrap();
        assert!(!lora_add_inplace(&strided, &x, &a, &b, 1.0).unwrap());
        let wrong_out = Tensor::zeros((4, 5), DType::F32, &dev).unwrap();
        assert!(!lora_add_inplace(&wrong_out, &x, &a, &b, 1.0).unwrap());
        let e = add_matmul_t_inplace(&wrong_out, &x, &a, 1.0).unwrap_err();
        assert!(
            e.to_string()
                .contains("unsupported operands dst [4, 5] F32, lhs [4, 8] F32, rhs [2, 8] F32"),
            "{e}"
        );
    }
}
