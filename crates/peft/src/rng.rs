//! The library's one seeded random generator.
//!
//! candle's CPU generator cannot be seeded, so every random draw of this library (adapter inits now, dropout
//! and shuffling in training) comes from [`PeftRng`]. It is a counter-based generator: a stream is identified
//! by a 64-bit key and a position, so [`PeftRng::fork`] derives independent streams by name (one per layer and
//! adapter, say) without shared mutable state, and a checkpoint only has to store `(key, counter)`.

use candle_core::{DType, Device, Shape, Tensor};

/// SplitMix64 finaliser: a bijective 64-bit mixer.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A seeded, counter-based random generator (SplitMix64 over a keyed counter).
///
/// ```
/// use peft::PeftRng;
/// let mut a = PeftRng::new(42);
/// let mut b = PeftRng::new(42);
/// assert_eq!(a.next_u64(), b.next_u64());
/// let mut layer = a.fork("model.layers.0.q_proj");
/// let u = layer.uniform_f64();
/// assert!((0.0..1.0).contains(&u));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeftRng {
    key: u64,
    counter: u64,
}

impl PeftRng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            key: mix64(seed ^ 0x5eed_5eed_5eed_5eed),
            counter: 0,
        }
    }

    /// The generator's state `(key, counter)`, for checkpoints.
    pub fn state(&self) -> (u64, u64) {
        (self.key, self.counter)
    }

    /// Restores a generator from [`PeftRng::state`].
    pub fn from_state(key: u64, counter: u64) -> Self {
        Self { key, counter }
    }

    /// An independent stream derived from this generator's key and `name` (the counter is not advanced).
    pub fn fork(&self, name: &str) -> Self {
        // FNV-1a over the name, then mixed with the key.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.as_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Self {
            key: mix64(self.key ^ mix64(h)),
            counter: 0,
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let z = mix64(
            self.key
                .wrapping_add(self.counter.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
        );
        self.counter = self.counter.wrapping_add(1);
        z
    }

    /// A uniform draw in `[0, 1)` with 53 random bits.
    pub fn uniform_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// A standard normal draw (Box–Muller).
    pub fn normal_f64(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform_f64(); // (0, 1]
        let u2 = self.uniform_f64();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// A uniform integer in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        // Lemire's multiply-shift; the bias is below 2^-64 * n and irrelevant here.
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// A tensor of uniform draws in `[lo, hi)`.
    pub fn uniform_tensor(
        &mut self,
        shape: impl Into<Shape>,
        lo: f64,
        hi: f64,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let shape = shape.into();
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| (lo + (hi - lo) * self.uniform_f64()) as f32)
            .collect();
        Tensor::from_vec(v, shape, device)?.to_dtype(dtype)
    }

    /// A tensor of normal draws with the given mean and standard deviation.
    pub fn normal_tensor(
        &mut self,
        shape: impl Into<Shape>,
        mean: f64,
        std: f64,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let shape = shape.into();
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| (mean + std * self.normal_f64()) as f32)
            .collect();
        Tensor::from_vec(v, shape, device)?.to_dtype(dtype)
    }

    /// A dropout keep-mask scaled by `1 / (1 - p)`, as `torch.nn.Dropout` in training.
    pub fn dropout_mask(
        &mut self,
        shape: impl Into<Shape>,
        p: f64,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let shape = shape.into();
        let scale = if p < 1.0 {
            (1.0 / (1.0 - p)) as f32
        } else {
            0.0
        };
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| if self.uniform_f64() < p { 0.0 } else { scale })
            .collect();
        Tensor::from_vec(v, shape, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_stream_and_forks_differ() {
        let mut a = PeftRng::new(1);
        let mut b = PeftRng::new(1);
        let xs: Vec<u64> = (0..4).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..4).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(
            PeftRng::new(1).fork("a").next_u64(),
            PeftRng::new(1).fork("b").next_u64()
        );
        assert_ne!(PeftRng::new(1).next_u64(), PeftRng::new(2).next_u64());
        let (k, c) = a.state();
        assert_eq!(PeftRng::from_state(k, c).next_u64(), a.next_u64());
    }

    #[test]
    fn normal_draws_have_unit_moments() {
        let mut r = PeftRng::new(7);
        let n = 200_000;
        let xs: Vec<f64> = (0..n).map(|_| r.normal_f64()).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
    }

    #[test]
    fn dropout_mask_keeps_expected_fraction() {
        let mut r = PeftRng::new(3);
        let m = r
            .dropout_mask(10_000, 0.25, &Device::Cpu)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let kept = m.iter().filter(|v| **v > 0.0).count() as f64 / 10_000.0;
        assert!((kept - 0.75).abs() < 0.02, "kept {kept}");
        assert!(m.iter().all(|v| *v == 0.0 || (*v - 4.0 / 3.0).abs() < 1e-6));
    }
}
