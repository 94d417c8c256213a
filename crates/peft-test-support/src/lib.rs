//! Test helpers shared by the tests of `peft`, `peft-models` and `peft-cli`: tensor comparisons, strided
//! views of test inputs, and finite-difference gradient checks.
//!
//! The crate depends on candle only (not on `peft`), so that a dev-dependency of `peft` on it does not build a
//! second copy of `peft`'s types. Every helper panics on failure: it is meant for tests.

use candle_core::{DType, Device, Result, Tensor, Var};

/// `max |a − b|` over all elements, computed in f64; the shapes must match.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// A non-contiguous tensor with the same values as `t` (last two axes stored transposed), or `t` itself
/// below two dimensions.
pub fn strided(t: &Tensor) -> Tensor {
    let r = t.rank();
    if r < 2 {
        return t.clone();
    }
    let s = t
        .transpose(r - 2, r - 1)
        .unwrap()
        .contiguous()
        .unwrap()
        .transpose(r - 2, r - 1)
        .unwrap();
    assert!(!s.is_contiguous() || t.dims()[r - 1] == 1 || t.dims()[r - 2] == 1);
    s
}

/// A view of `t` at a storage offset whose last dimension stays contiguous (every row after a gap).
pub fn gapped(t: &Tensor) -> Tensor {
    let r = t.rank();
    let d = t.dims()[r - 1];
    let wide = Tensor::cat(&[&t.zeros_like().unwrap(), t], r - 1).unwrap();
    let v = wide.narrow(r - 1, d, d).unwrap();
    assert!(r == 1 || !v.is_contiguous());
    v
}

/// Central finite differences of `loss(inputs)` w.r.t. every element of `inputs[which]` (f64), compared
/// with `analytic`; returns the largest absolute error.
pub fn fd_check(
    inputs: &[Tensor],
    which: usize,
    analytic: &Tensor,
    loss: &dyn Fn(&[Tensor]) -> Result<f64>,
) -> f64 {
    let h = 1e-6;
    let base = inputs[which]
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let an = analytic.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(base.len(), an.len());
    let mut worst = 0f64;
    for i in 0..base.len() {
        let eval = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            let mut xs = inputs.to_vec();
            xs[which] = Tensor::from_vec(v, inputs[which].dims(), &Device::Cpu).unwrap();
            loss(&xs).unwrap()
        };
        let num = (eval(h) - eval(-h)) / (2.0 * h);
        worst = worst.max((num - an[i]).abs());
    }
    worst
}

/// Gradients of `sum(f(vars) ⊙ r)` w.r.t. each var.
pub fn grads_of(
    vars: &[Var],
    r: &Tensor,
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
) -> Vec<Option<Tensor>> {
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts).unwrap();
    let loss = (y * r).unwrap().sum_all().unwrap();
    let g = loss.backward().unwrap();
    vars.iter().map(|v| g.get(v).cloned()).collect()
}

/// Vars holding copies of `ts`.
pub fn vars(ts: &[&Tensor]) -> Vec<Var> {
    ts.iter().map(|t| Var::from_tensor(t).unwrap()).collect()
}

/// Asserts `|a − b| ≤ atol + rtol·|b|` elementwise (values compared as f32, the bound in f64), naming the
/// tensor `what` and the worst element; a NaN on one side only fails too. Shapes must match.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, atol: f64, rtol: f64) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let a = to_f32_vec(a);
    let b = to_f32_vec(b);
    let mut worst = (0usize, 0f64);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let excess = ((*x as f64) - (*y as f64)).abs() - (atol + rtol * (*y as f64).abs());
        if excess > worst.1 || x.is_nan() != y.is_nan() {
            worst = (i, excess.max(f64::MIN_POSITIVE));
        }
    }
    assert!(
        worst.1 <= 0.0,
        "{what}: element {} differs: {} vs expected {} (atol {atol}, rtol {rtol})",
        worst.0,
        a[worst.0],
        b[worst.0]
    );
}

/// The elements of `t` in row-major order, as f32.
pub fn to_f32_vec(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}
