//! torch's CPU `randperm`, bit for bit, for FourierFT's spectral locations.
//!
//! PEFT does not save where a layer's learned frequencies sit: it draws them again from `random_loc_seed`
//! every time it builds the layer (`tuners/fourierft/layer.py`):
//!
//! ```python
//! indices = torch.randperm(out_features * in_features,
//!                          generator=torch.Generator().manual_seed(random_loc_seed))[:n_frequency]
//! ```
//!
//! ATen's `randperm_cpu` (`aten/src/ATen/native/TensorFactories.cpp`) has two algorithms, switched on
//! `n < u32::MAX / 20`:
//!
//! - small `n`: Fisher–Yates from the front over the identity, one 32-bit draw per step:
//!   `z = generator->random() % (n − i); swap(r[i], r[i + z])` for `i` in `0..n−1`;
//! - large `n`: the "inside-out" variant with 64-bit draws (`random64()`: two 32-bit draws, the first the
//!   high half): `z = random64() % (i + 1); r[i] = r[z]; r[z] = i` for `i` in `0..n`.
//!
//! Only the first `k` entries are needed, so [`randperm_prefix`] computes them without the whole permutation:
//! the front Fisher–Yates fixes `r[i]` at step `i` (only `k` steps, the swapped entries kept in a map), and the
//! inside-out variant only changes `r[j]` for `j < k` at the steps that draw `z < k` (all `n` draws, `k`
//! entries kept). The generator is torch's MT19937 ([`crate::tuners::vera::prng::Mt19937`]). The tests compare
//! with values torch produced (`fixtures/fourierft/randperm.json`, written by `gen_randperm.py`).

use crate::tuners::vera::prng::Mt19937;
use crate::{PeftError, Result};
use std::collections::HashMap;

/// `n` from which ATen's `randperm_cpu` switches to the inside-out algorithm with 64-bit draws
/// (`std::numeric_limits<uint32_t>::max() / 20`).
pub const LARGE_N: u64 = u32::MAX as u64 / 20;

/// The first `k` entries of `torch.randperm(n, generator=torch.Generator().manual_seed(seed))` (CPU, int64).
/// Only the low 32 bits of `seed` count (a negative Python seed is its two's complement). `k > n` is an error.
///
/// ```
/// use peft::tuners::fourierft::randperm::randperm_prefix;
/// let p = randperm_prefix(10, 10, 0)?;
/// let mut sorted = p.clone();
/// sorted.sort_unstable();
/// assert_eq!(sorted, (0..10).collect::<Vec<u64>>());
/// # Ok::<(), peft::PeftError>(())
/// ```
pub fn randperm_prefix(n: u64, k: usize, seed: u64) -> Result<Vec<u64>> {
    if k as u64 > n {
        return Err(PeftError::Invalid(format!(
            "randperm: {k} entries asked of a permutation of {n}"
        )));
    }
    let mut g = Mt19937::new(seed);
    if n < LARGE_N {
        Ok(front_fisher_yates(n, k, &mut g))
    } else {
        Ok(inside_out(n, k, &mut g))
    }
}

/// The first `k` entries of `torch.randperm(n, generator=g)` drawn from an existing generator `g`, which is
/// left where the whole call leaves it (every draw of the full permutation consumed), so that later draws
/// continue torch's stream (FRoD draws one permutation per category from one generator). `k > n` is an
/// error.
pub fn randperm_prefix_continuing(n: u64, k: usize, g: &mut Mt19937) -> Result<Vec<u64>> {
    if k as u64 > n {
        return Err(PeftError::Invalid(format!(
            "randperm: {k} entries asked of a permutation of {n}"
        )));
    }
    if n >= LARGE_N {
        return Ok(inside_out(n, k, g));
    }
    let out = front_fisher_yates(n, k, g);
    // the full call draws once for each i < n − 1
    for _ in (k as u64).min(n.saturating_sub(1))..n.saturating_sub(1) {
        g.next_u32();
    }
    Ok(out)
}

/// The small-`n` algorithm, stopped after `k` steps: positions `< i` are final after step `i − 1`.
fn front_fisher_yates(n: u64, k: usize, g: &mut Mt19937) -> Vec<u64> {
    let mut moved: HashMap<u64, u64> = HashMap::with_capacity(2 * k);
    let mut out = Vec::with_capacity(k);
    for i in 0..k as u64 {
        let at = |moved: &HashMap<u64, u64>, p: u64| moved.get(&p).copied().unwrap_or(p);
        if i + 1 == n {
            // the loop runs for i < n − 1: the last entry is whatever the swaps left there
            out.push(at(&moved, i));
            break;
        }
        let z = u64::from(g.next_u32()) % (n - i);
        let (a, b) = (at(&moved, i), at(&moved, i + z));
        moved.insert(i + z, a);
        moved.insert(i, b);
        out.push(b);
    }
    out
}

/// The large-`n` algorithm, keeping only the first `k` entries.
fn inside_out(n: u64, k: usize, g: &mut Mt19937) -> Vec<u64> {
    let k64 = k as u64;
    let mut r = vec![0u64; k];
    for i in 0..n {
        let hi = u64::from(g.next_u32());
        let lo = u64::from(g.next_u32());
        let z = ((hi << 32) | lo) % (i + 1);
        if i < k64 {
            // r[i] = i; r[i] = r[z]; r[z] = i (z ≤ i < k)
            r[i as usize] = if z == i { i } else { r[z as usize] };
            r[z as usize] = i;
        } else if z < k64 {
            // r[i] (beyond the prefix) takes r[z]; r[z] = i
            r[z as usize] = i;
        }
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn expected() -> Vec<(u64, u64, usize, Vec<u64>)> {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fixtures/fourierft/randperm.json"
        );
        let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        v["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let seed = c["seed"].as_i64().unwrap();
                (
                    c["n"].as_u64().unwrap(),
                    seed as u64,
                    c["k"].as_u64().unwrap() as usize,
                    c["prefix"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_u64().unwrap())
                        .collect(),
                )
            })
            .collect()
    }

    #[test]
    fn randperm_matches_torch() {
        let cases = expected();
        assert!(cases.len() >= 8);
        assert!(cases.iter().any(|c| c.0 >= LARGE_N), "a large-n case");
        for (n, seed, k, want) in cases {
            let got = randperm_prefix(n, k, seed).unwrap();
            assert_eq!(got, want, "n={n} seed={seed} k={k}");
        }
    }

    #[test]
    fn prefixes_agree_and_too_many_is_an_error() {
        let full = randperm_prefix(50, 50, 3).unwrap();
        assert_eq!(randperm_prefix(50, 7, 3).unwrap(), full[..7]);
        assert!(randperm_prefix(5, 6, 3).is_err());
        assert_eq!(randperm_prefix(1, 1, 9).unwrap(), vec![0]);
        assert!(randperm_prefix(0, 0, 9).unwrap().is_empty());
    }
}
