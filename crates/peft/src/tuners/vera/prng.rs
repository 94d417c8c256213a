//! torch's CPU generator, bit for bit, for VeRA's `save_projection = false`.
//!
//! PEFT regenerates the shared projections from `projection_prng_key` (`tuners/vera/model.py`):
//!
//! ```python
//! generator = torch.Generator(device="cpu").manual_seed(config.projection_prng_key)
//! vera_A = _kaiming_init((config.r, linear_in_dim), generator=generator)
//! vera_B = _kaiming_init((linear_out_dim, config.r), generator=generator)
//! ```
//!
//! where `_kaiming_init` draws `uniform_(-bound, bound)` with `bound = √3 · √2 / √fan_in` (gain √2, fan_in the
//! tensor's second dimension). torch's CPU generator is MT19937 seeded by `init_genrand` with the low 32 bits
//! of the seed; `uniform_` on a float tensor takes one 32-bit draw per element in memory order, keeps its low
//! 24 bits, and computes `x · (to − from) + from` in f64 (with `from`, `to` rounded to f32 first) before
//! rounding to f32 (ATen's `transformation::uniform_real`). The fixture `fixtures/vera/prng.safetensors`
//! holds values torch produced, which the tests compare bit for bit.

/// MT19937 as torch's `at::mt19937` (`init_genrand` seeding, standard tempering).
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; 624],
    next: usize,
}

impl std::fmt::Debug for Mt19937 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mt19937").field("next", &self.next).finish()
    }
}

impl Mt19937 {
    const N: usize = 624;
    const M: usize = 397;

    /// `torch.Generator().manual_seed(seed)`: only the low 32 bits of `seed` count.
    pub fn new(seed: u64) -> Self {
        let mut state = [0u32; 624];
        state[0] = seed as u32;
        for j in 1..Self::N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Self {
            state,
            next: Self::N,
        }
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        for i in 0..Self::N {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % Self::N] & LOWER);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            self.state[i] = self.state[(i + Self::M) % Self::N] ^ (y >> 1) ^ mag;
        }
        self.next = 0;
    }

    /// The next 32-bit output (`CPUGeneratorImpl::random()`).
    pub fn next_u32(&mut self) -> u32 {
        if self.next >= Self::N {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// `tensor.uniform_(from, to, generator=self)` for a float32 tensor of `n` elements, in memory order.
    pub fn uniform_f32(&mut self, n: usize, from: f64, to: f64) -> Vec<f32> {
        let (from, to) = (from as f32, to as f32);
        let range = f64::from(to - from);
        let from = f64::from(from);
        const DIVISOR: f64 = 1.0 / (1u64 << 24) as f64;
        (0..n)
            .map(|_| {
                let x = f64::from(self.next_u32() & 0x00ff_ffff) * DIVISOR;
                (x * range + from) as f32
            })
            .collect()
    }
}

/// PEFT's vera `_kaiming_init` of a `[rows, cols]` tensor: `uniform_(-bound, bound)` with
/// `bound = √3 · (√2 / √cols)`, computed in f64 in that order as Python does. Row-major values.
pub fn kaiming_uniform(rows: usize, cols: usize, generator: &mut Mt19937) -> Vec<f32> {
    let gain = 2f64.sqrt();
    let std = gain / (cols as f64).sqrt();
    let bound = 3f64.sqrt() * std;
    generator.uniform_f32(rows * cols, -bound, bound)
}

/// PEFT's `_init_vera_A_vera_B`: `vera_A` `[r, max_in]` then `vera_B` `[max_out, r]` (row-major) from one
/// generator seeded with `projection_prng_key`.
pub fn vera_projections(
    projection_prng_key: i64,
    r: usize,
    max_in: usize,
    max_out: usize,
) -> (Vec<f32>, Vec<f32>) {
    let mut g = Mt19937::new(projection_prng_key as u64);
    let a = kaiming_uniform(r, max_in, &mut g);
    let b = kaiming_uniform(max_out, r, &mut g);
    (a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_the_reference_sequence() {
        // The 10000th output of std::mt19937 seeded with the default 5489 (C++ standard, [rand.predef]).
        let mut g = Mt19937::new(5489);
        let mut last = 0;
        for _ in 0..10_000 {
            last = g.next_u32();
        }
        assert_eq!(last, 4_123_659_995);
        // Seeds are truncated to 32 bits, as torch's `mt19937(uint64_t)` does.
        let mut a = Mt19937::new(7);
        let mut b = Mt19937::new(7 + (1u64 << 32));
        assert_eq!(a.next_u32(), b.next_u32());
    }

    #[test]
    fn uniform_stays_in_range() {
        let mut g = Mt19937::new(0);
        let v = g.uniform_f32(1000, -0.5, 0.5);
        assert!(v.iter().all(|x| (-0.5..0.5).contains(x)));
    }
}
