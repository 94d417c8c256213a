//! `peft::ops::half_linear` (a frozen bf16 / f16 weight multiplied in f32) against the f64 product of the
//! up-converted weight, and `BaseLayer`'s dispatch to it.

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use peft::ops::{half_linear, half_linear_band_rows};
use peft::{BaseLayer, PeftRng};

fn randn(rng: &mut PeftRng, shape: &[usize]) -> Tensor {
    rng.normal_tensor(shape, 0.0, 1.0, DType::F32, &Device::Cpu)
        .unwrap()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Asserts `got` (f32, `[m, n]` flattened) equals `a · bᵀ` (+ bias) computed in f64 from the f32 values of
/// `a` `[m, k]` and `b` `[n, k]`, to f32 rounding: |error| ≤ γ_k · Σ|a||b| per element, γ_k = k·2⁻²⁴ (the
/// bound for a length-k f32 dot product, whatever the summation order), plus the bias's own rounding.
/// Returns the largest error relative to that bound.
fn assert_f32_product(
    what: &str,
    got: &Tensor,
    a: &Tensor,
    b: &Tensor,
    bias: Option<&Tensor>,
) -> f64 {
    let (m, k) = a.dims2().unwrap();
    let n = b.dim(0).unwrap();
    let (av, bv) = (f64s(a), f64s(b));
    let bias = bias.map(f64s);
    let g = f64s(got);
    assert_eq!(g.len(), m * n, "{what}: shape");
    let gamma = k as f64 * f64::powi(2.0, -24);
    let mut worst = 0f64;
    for i in 0..m {
        for j in 0..n {
            let (mut dot, mut abs) = (0f64, 0f64);
            for kk in 0..k {
                let p = av[i * k + kk] * bv[j * k + kk];
                dot += p;
                abs += p.abs();
            }
            let bj = bias.as_ref().map_or(0.0, |b| b[j]);
            let want = dot + bj;
            let bound = gamma * (abs + bj.abs()) + f64::powi(2.0, -24) * want.abs() + 1e-30;
            let err = (g[i * n + j] - want).abs();
            assert!(
                err <= bound,
                "{what}: [{i},{j}] got {} want {want} (|error| {err:e} > bound {bound:e})",
                g[i * n + j]
            );
            worst = worst.max(err / bound);
        }
    }
    worst
}

/// The weight `w` `[n, k]` in three storage layouts: row-major, the transposed view `BaseLayer` keeps
/// (`[k, n]` contiguous, seen as `[n, k]`), and a generic strided view (every other element of a wider
/// matrix).
fn layouts(w: &Tensor) -> Vec<(&'static str, Tensor)> {
    let (n, k) = w.dims2().unwrap();
    let transposed = w.t().unwrap().contiguous().unwrap().t().unwrap();
    let wide = Tensor::stack(&[w, &w.zeros_like().unwrap()], 2).unwrap(); // [n, k, 2]
    let strided = wide.i((.., .., 0)).unwrap();
    assert_eq!(strided.stride(), [2 * k, 2]);
    assert_eq!(strided.dims(), [n, k]);
    vec![
        ("row-major", w.clone()),
        ("transposed view", transposed),
        ("strided", strided),
    ]
}

#[test]
fn half_linear_forward_and_input_gradient_equal_the_f32_product_of_the_converted_weight() {
    let mut rng = PeftRng::new(11);
    // (out, in): one band; several bands with a partial last one (band rows = 2^20 / in); one row per band.
    let wide_in = (1 << 20) + 3;
    let shapes = [
        (5, 7),
        (2 * half_linear_band_rows(usize::MAX, 64) + 3, 64),
        (3, wide_in),
    ];
    assert_eq!(half_linear_band_rows(3, wide_in), 1);
    for dtype in [DType::BF16, DType::F16] {
        for (out, inp) in shapes {
            let w = randn(&mut rng, &[out, inp]).to_dtype(dtype).unwrap();
            let w32 = w.to_dtype(DType::F32).unwrap();
            let bias = randn(&mut rng, &[out]);
            // 1 row: the fused one-row forward; 3 and 11: bands into gemm.
            for m in [1, 3, 11] {
                if m == 3 && out * inp > 1 << 16 {
                    continue; // three rows: the small shape is enough
                }
                let x = Var::from_tensor(&randn(&mut rng, &[1, m, inp])).unwrap();
                let g = randn(&mut rng, &[1, m, out]);
                for (layout, wl) in layouts(&w) {
                    // The generic strided path is element by element: keep it to the small shapes.
                    if layout == "strided" && out * inp > 1 << 16 {
                        continue;
                    }
                    for b in [None, Some(&bias)] {
                        let what =
                            format!("{dtype:?} {m}x{out}x{inp} {layout} bias {}", b.is_some());
                        let y = half_linear(&x, &wl, b).unwrap();
                        assert_eq!(y.dtype(), DType::F32, "{what}");
                        assert_eq!(y.dims(), [1, m, out], "{what}");
                        assert_f32_product(
                            &what,
                            &y.reshape((m, out)).unwrap(),
                            &x.reshape((m, inp)).unwrap(),
                            &w32,
                            b,
                        );
                        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
                        let dx = grads.get(&x).expect("a gradient for x");
                        assert_eq!(dx.dtype(), DType::F32, "{what}");
                        assert_eq!(dx.dims(), [1, m, inp], "{what}");
                        // dx = g · W = g · (Wᵀ)ᵀ.
                        assert_f32_product(
                            &format!("{what}: dx"),
                            &dx.reshape((m, inp)).unwrap(),
                            &g.reshape((m, out)).unwrap(),
                            &w32.t().unwrap().contiguous().unwrap(),
                            None,
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn half_linear_checks_its_inputs_and_falls_back_for_f64() {
    let mut rng = PeftRng::new(12);
    let w = randn(&mut rng, &[4, 6]).to_dtype(DType::BF16).unwrap();
    let x = randn(&mut rng, &[2, 6]);
    let e = half_linear(&x, &w.to_dtype(DType::F32).unwrap(), None).unwrap_err();
    assert!(e.to_string().contains("bf16 / f16 weight"), "{e}");
    let e = half_linear(&randn(&mut rng, &[2, 5]), &w, None).unwrap_err();
    assert!(e.to_string().contains("input [2, 5]"), "{e}");
    let e = half_linear(&x.to_dtype(DType::BF16).unwrap(), &w, None).unwrap_err();
    assert!(e.to_string().contains("f32 or f64 input"), "{e}");
    // f64 input: the converted weight through candle's ops, in f64.
    let x64 = x.to_dtype(DType::F64).unwrap();
    let y = half_linear(&x64, &w, None).unwrap();
    assert_eq!(y.dtype(), DType::F64);
    let want = x64
        .matmul(&w.to_dtype(DType::F64).unwrap().t().unwrap())
        .unwrap();
    assert_eq!(f64s(&y), f64s(&want));
}

#[test]
fn base_layers_with_half_weights_compute_in_f32() {
    let mut rng = PeftRng::new(13);
    for dtype in [DType::BF16, DType::F16] {
        let w = randn(&mut rng, &[6, 8]).to_dtype(dtype).unwrap();
        let b = randn(&mut rng, &[6]).to_dtype(dtype).unwrap();
        let w32 = w.to_dtype(DType::F32).unwrap();
        let b32 = b.to_dtype(DType::F32).unwrap();
        let x = Var::from_tensor(&randn(&mut rng, &[2, 3, 8])).unwrap();
        let lin = BaseLayer::linear(w.clone(), Some(b.clone())).unwrap();
        assert_eq!(lin.dtype(), dtype);
        let y = lin.forward(&x).unwrap();
        assert_eq!(y.dtype(), DType::F32);
        assert_f32_product(
            &format!("{dtype:?} linear"),
            &y.reshape((6, 6)).unwrap(),
            &x.reshape((6, 8)).unwrap(),
            &w32,
            Some(&b32),
        );
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert_eq!(grads.get(&x).unwrap().dtype(), DType::F32);
        // GPT-2's Conv1D keeps the weight as [in, out].
        let conv1d = BaseLayer::conv1d(w.t().unwrap().contiguous().unwrap(), None).unwrap();
        let y1 = conv1d.forward(&x).unwrap();
        assert_eq!(y1.dtype(), DType::F32);
        assert_f32_product(
            &format!("{dtype:?} conv1d"),
            &y1.reshape((6, 6)).unwrap(),
            &x.reshape((6, 8)).unwrap(),
            &w32,
            None,
        );
        // A half input keeps computing in half precision, as without autocast.
        let yh = lin.forward(&x.to_dtype(dtype).unwrap()).unwrap();
        assert_eq!(yh.dtype(), dtype);
        // The embedding gathers half rows and converts them: exactly the f32 rows.
        let emb = BaseLayer::embedding(w.clone()).unwrap();
        let ids = Tensor::new(&[[5u32, 0, 2]], &Device::Cpu).unwrap();
        let e = emb.forward(&ids).unwrap();
        assert_eq!(e.dtype(), DType::F32);
        let want = w32.index_select(&ids.flatten_all().unwrap(), 0).unwrap();
        assert_eq!(f64s(&e), f64s(&want));
    }
}
