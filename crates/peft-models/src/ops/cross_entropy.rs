//! Row-wise cross-entropy (`logsumexp(x) − x[target]`) with an analytic backward, for language-model losses
//! over large vocabularies.
//!
//! Written with candle primitives, a causal-LM loss over `[N, V]` logits allocates and walks a dozen
//! `N × V` tensors (shift, exp, log-softmax, gather, and their gradients); for SmolLM2's 49k vocabulary and a
//! 4×64 batch that is ~50 MB each. The custom op reads the logits twice forward (max, then `Σ exp`) and once
//! backward, and writes one `N × V` gradient: `g_i · (softmax(x_i) − onehot(t_i))`.

use super::{row_offsets, rows_readable};
use candle_core::{CpuStorage, CustomOp1, CustomOp3, D, Layout, Result, Shape, Tensor, bail};
use peft::ops::cpu::{Real, contiguous_part, custom_supported, par_rows};
use std::sync::Arc;

/// The target of an ignored row.
const IGNORED: u32 = u32::MAX;

/// The negative log-likelihood of each row of `logits` (`[N, V]`) at its target: `logsumexp(x_i) − x_i[t_i]`,
/// a `[N]` tensor, 0 for rows whose target is `None`. Differentiable with respect to `logits`.
///
/// On the CPU in f32 / f64 this is one custom op (the row maximum is subtracted first, as in
/// `torch.nn.functional.cross_entropy`); elsewhere it is [`cross_entropy_rows_reference`]. A target outside
/// `0..V` is an error.
///
/// ```
/// use candle_core::{Device, Tensor};
/// # fn main() -> candle_core::Result<()> {
/// let logits = Tensor::new(&[[0f32, 0.0], [2.0, 0.0]], &Device::Cpu)?;
/// let nll = peft_models::ops::cross_entropy_rows(&logits, &[Some(1), None])?;
/// let v = nll.to_vec1::<f32>()?;
/// assert!((v[0] - 2f32.ln()).abs() < 1e-6 && v[1] == 0.0);
/// # Ok(()) }
/// ```
pub fn cross_entropy_rows(logits: &Tensor, targets: &[Option<u32>]) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.len() != n {
        bail!("cross_entropy_rows: {} targets for {n} rows", targets.len());
    }
    if let Some((i, t)) = targets
        .iter()
        .enumerate()
        .find_map(|(i, t)| t.filter(|&t| t as usize >= v).map(|t| (i, t)))
    {
        bail!("cross_entropy_rows: target {t} of row {i} is outside the vocabulary (0..{v})");
    }
    if custom_supported(logits) && n > 0 && v > 0 {
        let targets: Arc<[u32]> = targets.iter().map(|t| t.unwrap_or(IGNORED)).collect();
        return rows_readable(logits)?.apply_op1(CrossEntropy { targets });
    }
    cross_entropy_rows_reference(logits, targets)
}

/// [`cross_entropy_rows`] written with candle primitives (any device and dtype, candle's autograd).
pub fn cross_entropy_rows_reference(logits: &Tensor, targets: &[Option<u32>]) -> Result<Tensor> {
    let (n, _) = logits.dims2()?;
    let max = logits.max_keepdim(D::Minus1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let idx: Vec<u32> = targets.iter().map(|t| t.unwrap_or(0)).collect();
    let idx = Tensor::from_vec(idx, (n, 1), logits.device())?;
    let picked = shifted.gather(&idx, 1)?;
    let keep: Vec<f32> = targets
        .iter()
        .map(|t| if t.is_some() { 1.0 } else { 0.0 })
        .collect();
    let keep = Tensor::from_vec(keep, n, logits.device())?.to_dtype(logits.dtype())?;
    (lse - picked)?.squeeze(1)?.mul(&keep)
}

/// The forward custom op; holds the targets (`IGNORED` for ignored rows).
struct CrossEntropy {
    targets: Arc<[u32]>,
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "peft-cross-entropy-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        match s {
            CpuStorage::F32(x) => fwd(x, l, &self.targets),
            CpuStorage::F64(x) => fwd(x, l, &self.targets),
            _ => bail!("peft-cross-entropy-rows: f32 or f64 only"),
        }
    }

    fn bwd(&self, x: &Tensor, nll: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        if !x.track_op() {
            return Ok(None);
        }
        let bwd = CrossEntropyBwd {
            targets: self.targets.clone(),
        };
        Ok(Some(x.apply_op3_no_bwd(
            &nll.contiguous()?,
            &grad.contiguous()?,
            &bwd,
        )?))
    }
}

/// Largest element of a row (eight lanes so that the loop vectorises).
#[inline]
fn row_max<T: Real>(x: &[T]) -> T {
    let mut acc = [T::NEG_INFINITY; 8];
    let c = x.chunks_exact(8);
    let rest = c.remainder();
    for v in c {
        for l in 0..8 {
            if v[l] > acc[l] {
                acc[l] = v[l];
            }
        }
    }
    let mut m = T::NEG_INFINITY;
    for &v in acc.iter().chain(rest) {
        if v > m {
            m = v;
        }
    }
    m
}

/// `Σ exp(x − max)` over a row, with eight accumulators.
#[inline]
fn row_sum_exp<T: Real>(x: &[T], max: T) -> T {
    let mut acc = [T::zero(); 8];
    let c = x.chunks_exact(8);
    let rest = c.remainder();
    for v in c {
        for l in 0..8 {
            acc[l] += (v[l] - max).exp();
        }
    }
    let mut tail = T::zero();
    for &v in rest {
        tail += (v - max).exp();
    }
    (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]) + tail
}

fn fwd<T: Real>(x: &[T], l: &Layout, targets: &[u32]) -> Result<(CpuStorage, Shape)> {
    let (rows, d) = row_offsets(l)?;
    if rows.len() != targets.len() {
        bail!(
            "peft-cross-entropy-rows: {} rows, {} targets",
            rows.len(),
            targets.len()
        );
    }
    if rows.last().is_some_and(|&o| o + d > x.len()) {
        bail!("peft-cross-entropy-rows: layout {l:?} exceeds its storage");
    }
    let mut out = vec![T::zero(); rows.len()];
    par_rows(&mut out, 1, 8 * rows.len() * d, |r0, chunk| {
        for (i, o) in chunk.iter_mut().enumerate() {
            let r = r0 + i;
            let t = targets[r];
            if t == IGNORED {
                continue;
            }
            let xr = &x[rows[r]..][..d];
            let max = row_max(xr);
            let lse = row_sum_exp(xr, max).ln() + max;
            *o = lse - xr[t as usize];
        }
    });
    Ok((T::to_cpu_storage_owned(out), Shape::from(rows.len())))
}

/// The backward: `(x, nll, g) → g_i · (exp(x_i − lse_i) − onehot(t_i))`, with `lse_i = nll_i + x_i[t_i]`
/// recovered from the forward's output; ignored rows get zeros.
struct CrossEntropyBwd {
    targets: Arc<[u32]>,
}

impl CustomOp3 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "peft-cross-entropy-rows-bwd"
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
            (CpuStorage::F32(x), CpuStorage::F32(nll), CpuStorage::F32(g)) => {
                bwd(x, l1, nll, l2, g, l3, &self.targets)
            }
            (CpuStorage::F64(x), CpuStorage::F64(nll), CpuStorage::F64(g)) => {
                bwd(x, l1, nll, l2, g, l3, &self.targets)
            }
            _ => bail!("peft-cross-entropy-rows-bwd: f32 or f64 operands of one dtype only"),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn bwd<T: Real>(
    x: &[T],
    lx: &Layout,
    nll: &[T],
    ln: &Layout,
    g: &[T],
    lg: &Layout,
    targets: &[u32],
) -> Result<(CpuStorage, Shape)> {
    let (rows, d) = row_offsets(lx)?;
    let nll = contiguous_part(nll, ln)?;
    let g = contiguous_part(g, lg)?;
    if nll.len() != rows.len() || g.len() != rows.len() || targets.len() != rows.len() {
        bail!(
            "peft-cross-entropy-rows-bwd: {} rows but {} / {} / {} values",
            rows.len(),
            nll.len(),
            g.len(),
            targets.len()
        );
    }
    if rows.last().is_some_and(|&o| o + d > x.len()) {
        bail!("peft-cross-entropy-rows-bwd: layout {lx:?} exceeds its storage");
    }
    let mut out = vec![T::zero(); rows.len() * d];
    par_rows(&mut out, d, 8 * rows.len() * d, |r0, chunk| {
        for (i, o) in chunk.chunks_exact_mut(d).enumerate() {
            let r = r0 + i;
            let t = targets[r];
            if t == IGNORED {
                continue;
            }
            let xr = &x[rows[r]..][..d];
            let lse = nll[r] + xr[t as usize];
            let gi = g[r];
            for (o, &v) in o.iter_mut().zip(xr) {
                *o = gi * (v - lse).exp();
            }
            o[t as usize] -= gi;
        }
    });
    Ok((T::to_cpu_storage_owned(out), lx.shape().clone()))
}

#[cfg(test)]
mod tests {
    use super::super::testutil::{fd_check, gapped, grads_of, max_diff, randn, vars};
    use super::*;
    use candle_core::{DType, Device};
    use peft::PeftRng;

    fn targets(n: usize, v: usize, rng: &mut PeftRng) -> Vec<Option<u32>> {
        (0..n)
            .map(|i| (i % 4 != 3).then(|| rng.below(v as u64) as u32))
            .collect()
    }

    #[test]
    fn forward_matches_reference_and_log_softmax() {
        let mut rng = PeftRng::new(5);
        for (n, v) in [(1, 1), (3, 7), (8, 33), (16, 1000)] {
            // large logits exercise the max subtraction
            let x = (randn(&mut rng, &[n, v], DType::F32) * 40.0).unwrap();
            let t = targets(n, v, &mut rng);
            let want = cross_entropy_rows_reference(&x, &t).unwrap();
            let inputs = if n > 1 {
                vec![x.clone(), gapped(&x)]
            } else {
                vec![x.clone()]
            };
            for xin in inputs {
                let got = cross_entropy_rows(&xin, &t).unwrap();
                assert!(max_diff(&got, &want) < 1e-4, "{n}x{v}");
            }
            // against an f64 log-softmax
            let x64 = x.to_dtype(DType::F64).unwrap();
            let lsm = candle_nn::ops::log_softmax(&x64, 1)
                .unwrap()
                .to_vec2::<f64>()
                .unwrap();
            let got = cross_entropy_rows(&x64, &t)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for (i, ti) in t.iter().enumerate() {
                let w = ti.map(|ti| -lsm[i][ti as usize]).unwrap_or(0.0);
                assert!(
                    (got[i] - w).abs() < 1e-9 * w.abs().max(1.0),
                    "{i}: {} vs {w}",
                    got[i]
                );
            }
        }
    }

    #[test]
    fn gradients_match_reference_and_finite_differences() {
        let mut rng = PeftRng::new(6);
        let (n, v) = (6, 11);
        let x = randn(&mut rng, &[n, v], DType::F64);
        let t = targets(n, v, &mut rng);
        let r = randn(&mut rng, &[n], DType::F64);
        let vs = vars(&[&x]);
        let got = grads_of(&vs, &r, &|xs| cross_entropy_rows(&xs[0], &t))[0]
            .clone()
            .unwrap();
        let want = grads_of(&vs, &r, &|xs| cross_entropy_rows_reference(&xs[0], &t))[0]
            .clone()
            .unwrap();
        assert!(max_diff(&got, &want) < 1e-12);
        let err = fd_check(std::slice::from_ref(&x), 0, &got, &|xs| {
            let y = cross_entropy_rows(&xs[0], &t)?;
            (y * &r)?.sum_all()?.to_scalar::<f64>()
        });
        assert!(err < 1e-7, "{err}");
        // ignored rows get no gradient
        let rows = got.to_vec2::<f64>().unwrap();
        for (i, ti) in t.iter().enumerate() {
            if ti.is_none() {
                assert!(rows[i].iter().all(|&g| g == 0.0));
            }
        }
    }

    #[test]
    fn bad_targets_are_errors() {
        let x = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let e = cross_entropy_rows(&x, &[Some(3), None]).unwrap_err();
        assert!(
            e.to_string()
                .contains("target 3 of row 0 is outside the vocabulary (0..3)"),
            "{e}"
        );
        let e = cross_entropy_rows(&x, &[Some(0)]).unwrap_err();
        assert!(e.to_string().contains("1 targets for 2 rows"), "{e}");
    }
}
