//! RandLoRA's shared bases as PEFT 0.21.2 generates them (`tuners/randlora/model.py`), bit for bit.
//!
//! One torch CPU generator ([`Mt19937`], seeded with `projection_prng_key`) draws, over the largest targeted
//! dimensions (`max_dim = max(out, in)`, `min_dim = min(out, in)` of the element-wise largest `(out, in)`):
//!
//! - dense (the default, `_init_randlora_A_randlora_B`): `randlora_A` `[r, 1, min_dim]` then `num_bases`
//!   tensors `[max_dim, 1, r]` concatenated into `randlora_B` `[max_dim, num_bases, r]`, each by
//!   `kaiming_uniform_(a=√5)` on a **bfloat16** tensor (`_kaiming_init` picks bfloat16 whenever accelerate's
//!   `is_bf16_available()`, true on a CPU), `num_bases = ceil(min_dim / r)`;
//! - sparse / very sparse (`_init_randlora_A_randlora_B_sparse`): `torch.rand` float32 tensors of the same
//!   shapes, mapped to −1 below `1/(2s)`, 1 above `1 − 1/(2s)`, 0 between (`s` = 3, or `√min_dim` for
//!   `very_sparse`).
//!
//! Each basis is then divided by its own standard deviation (`tensor / tensor.std()`, Bessel-corrected) in its
//! dtype, and the result is stored as float32 (PEFT casts the buffers to the base layer's dtype).
//!
//! torch's `uniform_` on a bfloat16 tensor draws the float32 value (as for a float32 tensor), rounds it to
//! bfloat16, and maps a result equal to `to` back to `from`. The std of a bfloat16 tensor is computed in float64 and rounded to float32 then
//! bfloat16; the division is done in float32 and rounded to bfloat16. The std of a float32 tensor
//! (`std_var_all_cpu`) takes the float32 mean and sums the squared deviations in float64. The fixture
//! `fixtures/randlora/bases.safetensors` holds bases PEFT generated, which the tests compare bit for bit.

use crate::tuners::vera::prng::Mt19937;
use half::bf16;

/// `ceil(min_dim / r)`: the number of bases that make the update full rank (PEFT's `num_bases`).
pub fn num_bases(min_dim: usize, r: usize) -> usize {
    min_dim.div_ceil(r)
}

/// `tensor.uniform_(from, to)` on a bfloat16 tensor of `n` elements, as float32 values: torch draws the
/// float32 value (24 bits of each 32-bit draw, `x · (to − from) + from` in float64 with `from`, `to` rounded to
/// float32), rounds it to bfloat16, and maps a value that rounds to `to` back to `from` (the range is `[from, to)`).
fn uniform_bf16(g: &mut Mt19937, n: usize, from: f64, to: f64) -> Vec<f32> {
    let lo = bf16::from_f32(from as f32);
    let hi = bf16::from_f32(to as f32);
    g.uniform_f32(n, from, to)
        .into_iter()
        .map(|v| {
            let v = bf16::from_f32(v);
            if v == hi { lo.to_f32() } else { v.to_f32() }
        })
        .collect()
}

/// `nn.init.kaiming_uniform_(t, a=√5)` on a bfloat16 tensor of `n` elements with fan-in `fan_in`.
fn kaiming_uniform_bf16(g: &mut Mt19937, n: usize, fan_in: usize) -> Vec<f32> {
    let a = 5f64.sqrt();
    let gain = (2.0 / (1.0 + a * a)).sqrt();
    let std = gain / (fan_in as f64).sqrt();
    let bound = 3f64.sqrt() * std;
    uniform_bf16(g, n, -bound, bound)
}

/// The Bessel-corrected standard deviation of `v`, in float64 (two passes).
fn std_f64(v: &[f32], mean: f64) -> f64 {
    let ss: f64 = v
        .iter()
        .map(|&x| {
            let d = f64::from(x) - mean;
            d * d
        })
        .sum();
    (ss / (v.len() as f64 - 1.0)).sqrt()
}

/// `t / t.std()` for a bfloat16 tensor (values given as float32).
fn normalize_bf16(v: &mut [f32]) {
    let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
    let s = bf16::from_f32(std_f64(v, mean) as f32).to_f32();
    for x in v.iter_mut() {
        *x = bf16::from_f32(*x / s).to_f32();
    }
}

/// `t / t.std()` for a float32 tensor (torch's `std_var_all_cpu`: the float32 mean, deviations in float64).
fn normalize_f32(v: &mut [f32]) {
    let sum: f32 = v.iter().sum(); // exact: the values are −1, 0 and 1
    let mean = f64::from(sum / v.len() as f32);
    let s = std_f64(v, mean) as f32;
    for x in v.iter_mut() {
        *x /= s;
    }
}

/// The ternary map of `_init_randlora_A_randlora_B_sparse` on `torch.rand` values.
fn ternary(v: &mut [f32], sparsity: f64) {
    let lo = (1.0 / (2.0 * sparsity)) as f32;
    let hi = (1.0 - 1.0 / (2.0 * sparsity)) as f32;
    for x in v.iter_mut() {
        *x = if *x > hi {
            1.0
        } else if *x < lo {
            -1.0
        } else {
            0.0
        };
    }
}

/// PEFT's bases for an adapter of rank `r` whose largest targeted `(out, in)` is `(max_out, max_in)`:
/// `randlora_A` `[r, 1, min_dim]` and `randlora_B` `[max_dim, num_bases, r]`, row-major float32 values.
/// `sparsity` is `None` for the dense bases, `Some(s)` for ternary ones.
pub fn randlora_bases(
    projection_prng_key: i64,
    r: usize,
    max_out: usize,
    max_in: usize,
    sparsity: Option<f64>,
) -> (Vec<f32>, Vec<f32>) {
    let (max_dim, min_dim) = (max_out.max(max_in), max_out.min(max_in));
    let nb = num_bases(min_dim, r);
    let mut g = Mt19937::new(projection_prng_key as u64);
    match sparsity {
        None => {
            let mut a = kaiming_uniform_bf16(&mut g, r * min_dim, min_dim);
            // `torch.cat` along dim 1 of `nb` tensors `[max_dim, 1, r]`
            let chunks: Vec<Vec<f32>> = (0..nb)
                .map(|_| kaiming_uniform_bf16(&mut g, max_dim * r, r))
                .collect();
            let mut b = Vec::with_capacity(max_dim * nb * r);
            for m in 0..max_dim {
                for c in &chunks {
                    b.extend_from_slice(&c[m * r..(m + 1) * r]);
                }
            }
            normalize_bf16(&mut a);
            normalize_bf16(&mut b);
            (a, b)
        }
        Some(s) => {
            let mut a = g.uniform_f32(r * min_dim, 0.0, 1.0);
            let mut b = g.uniform_f32(max_dim * nb * r, 0.0, 1.0);
            ternary(&mut a, s);
            ternary(&mut b, s);
            normalize_f32(&mut a);
            normalize_f32(&mut b);
            (a, b)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn randlora_bases_have_unit_std_and_the_right_sizes() {
        assert_eq!(num_bases(16, 4), 4);
        assert_eq!(num_bases(16, 3), 6);
        let (a, b) = randlora_bases(0, 4, 24, 16, None);
        assert_eq!((a.len(), b.len()), (4 * 16, 24 * 4 * 4));
        let (a, b) = randlora_bases(1, 3, 24, 16, Some(3.0));
        assert_eq!((a.len(), b.len()), (3 * 16, 24 * 6 * 3));
        assert!(b.contains(&0.0) && b.iter().any(|&x| x > 0.0));
        let mean = b.iter().map(|&x| f64::from(x)).sum::<f64>() / b.len() as f64;
        assert!((std_f64(&b, mean) - 1.0).abs() < 1e-5);
    }
}
