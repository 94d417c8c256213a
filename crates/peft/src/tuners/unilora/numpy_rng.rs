//! numpy's `np.random.default_rng(seed)`, bit for bit, for UniLoRA's index assignment.
//!
//! PEFT does not save where each entry of a UniLoRA layer's `A` / `B` reads the shared vector `theta_d` (unless
//! `save_indices`): `UniLoraModel.generate_index` draws it again from `proj_seed` every time it builds the
//! model (`tuners/unilora/model.py`):
//!
//! ```python
//! rng = np.random.default_rng(proj_seed)
//! data = np.repeat(np.arange(theta_d_length), lora_param_count // theta_d_length)
//! if remaining > 0:
//!     data = np.concatenate([data, rng.choice(theta_d_length, size=remaining, replace=False)])
//! rng.shuffle(data)
//! ```
//!
//! What that takes of numpy (`numpy/random/bit_generator.pyx`, `_pcg64.pyx`, `_generator.pyx`,
//! `src/distributions/distributions.c`):
//!
//! - [`SeedSequence`]: the seed's 32-bit words hashed into a pool of four words, from which
//!   `generate_state(4, uint64)` draws eight 32-bit words (each pair little-endian into a 64-bit word);
//! - [`Pcg64`]: PCG-XSL-RR 128/64 seeded with `state = w0 << 64 | w1`, `inc = w2 << 64 | w3`
//!   (`pcg64_set_seed`); its 32-bit draws split one 64-bit output, low half first (`pcg64_next32`);
//! - `choice(n, size=k, replace=False)`: Floyd's algorithm (then a shuffle of the `k` picks) unless
//!   `n > 10000` and `k > n // 50`, where it shuffles the tail of `arange(n)` instead; both draw with
//!   `random_bounded_uint64` (Lemire's method on 32-bit draws for ranges below 2³²);
//! - `shuffle` of a 1-D array: Fisher–Yates from the back with `random_interval` (masked rejection, 32-bit
//!   draws for bounds below 2³², 64-bit above).
//!
//! The tests compare with values numpy produced (`fixtures/unilora/numpy_rng.json`, written by
//! `gen_unilora.py`).

use crate::{PeftError, Result};
use std::collections::HashSet;

const M32: u64 = 0xFFFF_FFFF;

/// numpy's `SeedSequence(seed)` (no spawn key, pool size 4): the entropy pool and `generate_state`.
#[derive(Clone, Debug)]
pub struct SeedSequence {
    pool: [u32; 4],
}

impl SeedSequence {
    /// The sequence of a non-negative integer seed (numpy's `_coerce_to_uint32_array`: its 32-bit words,
    /// least significant first; `0` is one zero word).
    pub fn new(seed: u128) -> Self {
        let mut entropy = Vec::new();
        let mut s = seed;
        loop {
            entropy.push((s & u128::from(u32::MAX)) as u32);
            s >>= 32;
            if s == 0 {
                break;
            }
        }
        const INIT_A: u32 = 0x43b0_d7e5;
        const MULT_A: u32 = 0x931e_8875;
        const MIX_L: u32 = 0xca01_f9dd;
        const MIX_R: u32 = 0x4973_f715;
        let mut hash_const = INIT_A;
        let mut hashmix = |v: u32| -> u32 {
            let mut v = v ^ hash_const;
            hash_const = hash_const.wrapping_mul(MULT_A);
            v = v.wrapping_mul(hash_const);
            v ^ (v >> 16)
        };
        let mix = |x: u32, y: u32| -> u32 {
            let r = MIX_L.wrapping_mul(x).wrapping_sub(MIX_R.wrapping_mul(y));
            r ^ (r >> 16)
        };
        let mut pool = [0u32; 4];
        for (i, p) in pool.iter_mut().enumerate() {
            *p = hashmix(entropy.get(i).copied().unwrap_or(0));
        }
        for src in 0..4 {
            for dst in 0..4 {
                if src != dst {
                    let h = hashmix(pool[src]);
                    pool[dst] = mix(pool[dst], h);
                }
            }
        }
        for &e in entropy.iter().skip(4) {
            for p in pool.iter_mut() {
                let h = hashmix(e);
                *p = mix(*p, h);
            }
        }
        Self { pool }
    }

    /// `generate_state(n, uint32)`.
    pub fn generate_u32(&self, n: usize) -> Vec<u32> {
        const INIT_B: u32 = 0x8b51_f9dd;
        const MULT_B: u32 = 0x58f3_8ded;
        let mut hash_const = INIT_B;
        (0..n)
            .map(|i| {
                let mut v = self.pool[i % 4] ^ hash_const;
                hash_const = hash_const.wrapping_mul(MULT_B);
                v = v.wrapping_mul(hash_const);
                v ^ (v >> 16)
            })
            .collect()
    }

    /// `generate_state(n, uint64)`: `2n` 32-bit words, each pair little-endian.
    pub fn generate_u64(&self, n: usize) -> Vec<u64> {
        let w = self.generate_u32(2 * n);
        w.chunks(2)
            .map(|c| u64::from(c[0]) | (u64::from(c[1]) << 32))
            .collect()
    }
}

/// numpy's `PCG64` bit generator with its buffered 32-bit output.
#[derive(Clone, Debug)]
pub struct Pcg64 {
    state: u128,
    inc: u128,
    buffered: Option<u32>,
}

const PCG_MULT: u128 = 0x2360_ED05_1FC6_5DA4_4385_DF64_9FCC_F645;

impl Pcg64 {
    /// `np.random.default_rng(seed)`'s bit generator.
    pub fn from_seed(seed: u128) -> Self {
        let v = SeedSequence::new(seed).generate_u64(4);
        let init_state = (u128::from(v[0]) << 64) | u128::from(v[1]);
        let init_seq = (u128::from(v[2]) << 64) | u128::from(v[3]);
        let mut g = Self {
            state: 0,
            inc: (init_seq << 1) | 1,
            buffered: None,
        };
        g.step();
        g.state = g.state.wrapping_add(init_state);
        g.step();
        g
    }

    fn step(&mut self) {
        self.state = self.state.wrapping_mul(PCG_MULT).wrapping_add(self.inc);
    }

    /// One 64-bit output (XSL-RR of the advanced state).
    pub fn next_u64(&mut self) -> u64 {
        self.step();
        let x = ((self.state >> 64) as u64) ^ (self.state as u64);
        x.rotate_right((self.state >> 122) as u32)
    }

    /// One 32-bit output: the low half of a fresh 64-bit output, then its high half.
    pub fn next_u32(&mut self) -> u32 {
        if let Some(u) = self.buffered.take() {
            return u;
        }
        let n = self.next_u64();
        self.buffered = Some((n >> 32) as u32);
        (n & M32) as u32
    }

    /// `random_bounded_uint64(bitgen, 0, rng, 0, false)` for `rng < 2³²`: a uniform integer in `0..=rng`
    /// (Lemire's multiply-and-reject on 32-bit draws).
    fn bounded(&mut self, rng: u64) -> u64 {
        debug_assert!(rng <= M32);
        if rng == 0 {
            return 0;
        }
        if rng == M32 {
            return u64::from(self.next_u32());
        }
        let excl = rng + 1;
        let mut m = u64::from(self.next_u32()) * excl;
        let mut left = m & M32;
        if left < excl {
            let threshold = (M32 - rng) % excl;
            while left < threshold {
                m = u64::from(self.next_u32()) * excl;
                left = m & M32;
            }
        }
        m >> 32
    }

    /// `random_interval(bitgen, max)`: a uniform integer in `0..=max` by masked rejection.
    fn interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mask = u64::MAX >> max.leading_zeros();
        if max <= M32 {
            loop {
                let v = u64::from(self.next_u32()) & mask;
                if v <= max {
                    return v;
                }
            }
        }
        loop {
            let v = self.next_u64() & mask;
            if v <= max {
                return v;
            }
        }
    }

    /// `Generator.choice(n, size=k, replace=False)` (shuffled, as by default).
    pub fn choice_without_replacement(&mut self, n: u64, k: u64) -> Result<Vec<u64>> {
        if k > n {
            return Err(PeftError::Invalid(format!(
                "numpy choice: cannot take a larger sample ({k}) than the population ({n}) without replacement"
            )));
        }
        if n > M32 + 1 {
            return Err(PeftError::Invalid(format!(
                "numpy choice: a population of {n} (2³² or more) is not supported"
            )));
        }
        if n > 10_000 && k > n / 50 {
            // tail shuffle of arange(n)
            let mut idx: Vec<u64> = (0..n).collect();
            let first = (n - k).max(1);
            for i in (first..n).rev() {
                let j = self.bounded(i) as usize;
                idx.swap(i as usize, j);
            }
            return Ok(idx[(n - k) as usize..].to_vec());
        }
        // Floyd's algorithm, then a shuffle of the picks
        let mut out = Vec::with_capacity(k as usize);
        let mut seen = HashSet::with_capacity(k as usize);
        for j in n - k..n {
            let v = self.bounded(j);
            if seen.insert(v) {
                out.push(v);
            } else {
                seen.insert(j);
                out.push(j);
            }
        }
        for i in (1..k).rev() {
            let j = self.bounded(i) as usize;
            out.swap(i as usize, j);
        }
        Ok(out)
    }

    /// `Generator.shuffle` of a 1-D array, in place.
    pub fn shuffle<T>(&mut self, data: &mut [T]) {
        for i in (1..data.len()).rev() {
            let j = self.interval(i as u64) as usize;
            data.swap(i, j);
        }
    }
}

/// PEFT's `UniLoraModel.generate_index(lora_param_count, theta_d_length, proj_seed)`: every index of
/// `0..theta_d_length` `⌊D / d⌋` times, `D mod d` distinct ones once more, shuffled by numpy's generator
/// seeded with `proj_seed`.
///
/// ```
/// use peft::tuners::unilora::numpy_rng::generate_index;
/// let idx = generate_index(10, 4, 42)?;
/// let mut counts = [0; 4];
/// for i in &idx {
///     counts[*i as usize] += 1;
/// }
/// assert!(counts.iter().all(|c| *c == 2 || *c == 3));
/// # Ok::<(), peft::PeftError>(())
/// ```
pub fn generate_index(
    lora_param_count: u64,
    theta_d_length: u64,
    proj_seed: u128,
) -> Result<Vec<u64>> {
    if theta_d_length == 0 {
        return Err(PeftError::InvalidConfig(
            "UniLoRA: `theta_d_length` must be positive, got 0".into(),
        ));
    }
    let base = lora_param_count / theta_d_length;
    let remaining = lora_param_count % theta_d_length;
    let mut rng = Pcg64::from_seed(proj_seed);
    let mut data: Vec<u64> = Vec::with_capacity(lora_param_count as usize);
    for i in 0..theta_d_length {
        data.extend(std::iter::repeat_n(i, base as usize));
    }
    if remaining > 0 {
        data.extend(rng.choice_without_replacement(theta_d_length, remaining)?);
    }
    rng.shuffle(&mut data);
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_and_bounded_stay_in_range() {
        let mut g = Pcg64::from_seed(7);
        for max in [1u64, 2, 3, 7, 1000, (1 << 32) - 2, 1 << 33] {
            for _ in 0..50 {
                assert!(g.interval(max) <= max);
                if max <= M32 {
                    assert!(g.bounded(max) <= max);
                }
            }
        }
    }

    #[test]
    fn choice_is_distinct() {
        let mut g = Pcg64::from_seed(3);
        for (n, k) in [(7, 7), (300, 40), (20_000, 1000), (20_000, 10)] {
            let c = g.choice_without_replacement(n, k).unwrap();
            let set: HashSet<_> = c.iter().collect();
            assert_eq!(set.len() as u64, k);
            assert!(c.iter().all(|v| *v < n));
        }
        assert!(g.choice_without_replacement(3, 4).is_err());
    }
}
