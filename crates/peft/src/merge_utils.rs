//! PEFT's `utils/merge_utils.py`: the task-vector merges behind `add_weighted_adapter` (task arithmetic,
//! magnitude pruning, TIES, DARE).
//!
//! Every function works on flat, row-major `f32` task tensors of one length (one per adapter), in f32 as
//! PEFT's do, with the same rules:
//!
//! * [`magnitude_prune_tensor`] keeps the `k = ⌊density · numel⌋` largest `|t|` (PEFT's `torch.topk`);
//! * [`random_prune_tensor`] keeps each entry with probability `density` using one 32-bit draw per entry in
//!   row-major order, `(u32 & 0xFFFFFF) · 2⁻²⁴ < f32(density)` (torch's CPU `bernoulli` on an f32
//!   probability tensor), and divides by `density` when rescaling (DARE);
//! * [`majority_sign_mask`] elects the sign from the **unweighted** tensors (`total`: the sign of their sum,
//!   `frequency`: of the sum of their signs; 0 elects +1), and an entry agrees when its sign equals the
//!   elected one (a zero never agrees);
//! * [`disjoint_merge`] divides the sum of the agreeing weighted entries by their number (at least 1): TIES
//!   gives a mean, not a sum.
//!
//! A `density` of 1 or more leaves a tensor unpruned (and draws nothing), as PEFT's `prune` does; a negative
//! one is an error.
//!
//! ```
//! use peft::merge_utils::{MajoritySignMethod, ties};
//! # fn main() -> peft::Result<()> {
//! let a = [1.0f32, -2.0, 0.5, 4.0];
//! let b = [-3.0f32, 1.0, 0.25, 2.0];
//! // keep the top half of each by magnitude, elect signs, average the agreeing entries
//! let merged = ties(&[&a, &b], &[1.0, 1.0], 0.5, MajoritySignMethod::Total)?;
//! assert_eq!(merged, vec![-3.0, -2.0, 0.0, 3.0]); // the last entry: (4 + 2) / 2
//! # Ok(()) }
//! ```

use crate::tuners::vera::prng::Mt19937;
use crate::{PeftError, Result};

/// How TIES elects the sign of each entry (PEFT's `majority_sign_method`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MajoritySignMethod {
    /// `"total"`: the sign of the sum of the (pruned, unweighted) task tensors. PEFT's default.
    #[default]
    Total,
    /// `"frequency"`: the sign of the sum of their signs.
    Frequency,
}

impl MajoritySignMethod {
    /// PEFT's spelling: `"total"` or `"frequency"`.
    pub fn as_str(self) -> &'static str {
        match self {
            MajoritySignMethod::Total => "total",
            MajoritySignMethod::Frequency => "frequency",
        }
    }
}

impl std::str::FromStr for MajoritySignMethod {
    type Err = PeftError;

    /// `"total"` or `"frequency"`; anything else is an error (PEFT raises `RuntimeError`).
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "total" => Ok(Self::Total),
            "frequency" => Ok(Self::Frequency),
            _ => Err(PeftError::Invalid(format!(
                "unknown majority_sign_method {s:?}: expected \"total\" or \"frequency\""
            ))),
        }
    }
}

fn check_lengths(tensors: &[&[f32]], weights: &[f32]) -> Result<usize> {
    let n = tensors
        .first()
        .map(|t| t.len())
        .ok_or_else(|| PeftError::Invalid("no task tensors to merge".into()))?;
    if tensors.iter().any(|t| t.len() != n) {
        return Err(PeftError::Invalid(
            "task tensors to merge differ in size".into(),
        ));
    }
    if weights.len() != tensors.len() {
        return Err(PeftError::Invalid(format!(
            "{} weights for {} task tensors",
            weights.len(),
            tensors.len()
        )));
    }
    Ok(n)
}

fn check_density(density: f64) -> Result<()> {
    if density.is_nan() || density < 0.0 {
        return Err(PeftError::Invalid(format!(
            "Density should be >= 0, got {density}"
        )));
    }
    Ok(())
}

/// `Σᵢ wᵢ·tᵢ` (PEFT's `task_arithmetic`).
pub fn task_arithmetic(tensors: &[&[f32]], weights: &[f32]) -> Result<Vec<f32>> {
    let n = check_lengths(tensors, weights)?;
    let mut out = vec![0f32; n];
    for (t, w) in tensors.iter().zip(weights) {
        for (o, x) in out.iter_mut().zip(t.iter()) {
            *o += x * w;
        }
    }
    Ok(out)
}

/// PEFT's `magnitude_based_pruning` through `prune`: `t` with all but its `⌊density · numel⌋` largest
/// magnitudes zeroed (unchanged when `density >= 1`).
pub fn magnitude_prune_tensor(t: &[f32], density: f64) -> Result<Vec<f32>> {
    check_density(density)?;
    if density >= 1.0 {
        return Ok(t.to_vec());
    }
    let k = (density * t.len() as f64) as usize;
    let mut order: Vec<usize> = (0..t.len()).collect();
    order.sort_by(|&i, &j| t[j].abs().total_cmp(&t[i].abs()));
    let mut out = vec![0f32; t.len()];
    for &i in &order[..k.min(t.len())] {
        out[i] = t[i];
    }
    Ok(out)
}

/// PEFT's `random_pruning` through `prune`: each entry kept with probability `density`, one draw of `rng`
/// per entry in row-major order as torch's CPU `bernoulli`; kept entries divided by `density` when
/// `rescale`. Unchanged, and nothing drawn, when `density >= 1`.
pub fn random_prune_tensor(
    t: &[f32],
    density: f64,
    rescale: bool,
    rng: &mut Mt19937,
) -> Result<Vec<f32>> {
    check_density(density)?;
    if density >= 1.0 {
        return Ok(t.to_vec());
    }
    let p = f64::from(density as f32);
    const SCALE: f64 = 1.0 / (1u64 << 24) as f64;
    let d = density as f32;
    Ok(t.iter()
        .map(|&x| {
            let keep = f64::from(rng.next_u32() & 0x00ff_ffff) * SCALE < p;
            let v = if keep { x } else { x * 0.0 };
            if rescale { v / d } else { v }
        })
        .collect())
}

/// PEFT's `calculate_majority_sign_mask`: for each tensor, whether each entry's sign equals the elected one.
pub fn majority_sign_mask(
    tensors: &[&[f32]],
    method: MajoritySignMethod,
) -> Result<Vec<Vec<bool>>> {
    let weights = vec![1f32; tensors.len()];
    let n = check_lengths(tensors, &weights)?;
    let sign = |x: f32| -> f32 {
        if x > 0.0 {
            1.0
        } else if x < 0.0 {
            -1.0
        } else {
            0.0
        }
    };
    let mut magnitude = vec![0f32; n];
    for t in tensors {
        for (m, &x) in magnitude.iter_mut().zip(t.iter()) {
            *m += match method {
                MajoritySignMethod::Total => x,
                MajoritySignMethod::Frequency => sign(x),
            };
        }
    }
    Ok(tensors
        .iter()
        .map(|t| {
            t.iter()
                .zip(&magnitude)
                .map(|(&x, &m)| sign(x) == if m >= 0.0 { 1.0 } else { -1.0 })
                .collect()
        })
        .collect())
}

/// PEFT's `disjoint_merge`: `Σᵢ tᵢ·maskᵢ / max(Σᵢ maskᵢ, 1)` per entry.
pub fn disjoint_merge(tensors: &[&[f32]], mask: &[Vec<bool>]) -> Result<Vec<f32>> {
    let weights = vec![1f32; tensors.len()];
    let n = check_lengths(tensors, &weights)?;
    if mask.len() != tensors.len() || mask.iter().any(|m| m.len() != n) {
        return Err(PeftError::Invalid(
            "disjoint_merge: the mask does not match the tensors".into(),
        ));
    }
    let mut sum = vec![0f32; n];
    let mut count = vec![0f32; n];
    for (t, m) in tensors.iter().zip(mask) {
        for i in 0..n {
            if m[i] {
                sum[i] += t[i];
                count[i] += 1.0;
            }
        }
    }
    Ok(sum
        .iter()
        .zip(&count)
        .map(|(s, c)| s / c.max(1.0))
        .collect())
}

fn elect_and_merge(
    pruned: &[Vec<f32>],
    weights: &[f32],
    method: MajoritySignMethod,
) -> Result<Vec<f32>> {
    let refs: Vec<&[f32]> = pruned.iter().map(|t| t.as_slice()).collect();
    let mask = majority_sign_mask(&refs, method)?;
    let weighted: Vec<Vec<f32>> = pruned
        .iter()
        .zip(weights)
        .map(|(t, w)| t.iter().map(|x| x * w).collect())
        .collect();
    let wrefs: Vec<&[f32]> = weighted.iter().map(|t| t.as_slice()).collect();
    disjoint_merge(&wrefs, &mask)
}

/// PEFT's `magnitude_prune`: each tensor magnitude-pruned, then `Σᵢ wᵢ·tᵢ`.
pub fn magnitude_prune(tensors: &[&[f32]], weights: &[f32], density: f64) -> Result<Vec<f32>> {
    check_lengths(tensors, weights)?;
    let pruned = tensors
        .iter()
        .map(|t| magnitude_prune_tensor(t, density))
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<&[f32]> = pruned.iter().map(|t| t.as_slice()).collect();
    task_arithmetic(&refs, weights)
}

/// PEFT's `ties`: magnitude pruning, sign election on the unweighted pruned tensors, disjoint mean of the
/// weighted ones.
pub fn ties(
    tensors: &[&[f32]],
    weights: &[f32],
    density: f64,
    method: MajoritySignMethod,
) -> Result<Vec<f32>> {
    check_lengths(tensors, weights)?;
    let pruned = tensors
        .iter()
        .map(|t| magnitude_prune_tensor(t, density))
        .collect::<Result<Vec<_>>>()?;
    elect_and_merge(&pruned, weights, method)
}

/// PEFT's `dare_linear`: each tensor randomly pruned and rescaled (drawing from `rng` tensor by tensor),
/// then `Σᵢ wᵢ·tᵢ`.
pub fn dare_linear(
    tensors: &[&[f32]],
    weights: &[f32],
    density: f64,
    rng: &mut Mt19937,
) -> Result<Vec<f32>> {
    check_lengths(tensors, weights)?;
    let pruned = tensors
        .iter()
        .map(|t| random_prune_tensor(t, density, true, rng))
        .collect::<Result<Vec<_>>>()?;
    let refs: Vec<&[f32]> = pruned.iter().map(|t| t.as_slice()).collect();
    task_arithmetic(&refs, weights)
}

/// PEFT's `dare_ties`: random pruning with rescaling, then TIES' sign election and disjoint mean.
pub fn dare_ties(
    tensors: &[&[f32]],
    weights: &[f32],
    density: f64,
    method: MajoritySignMethod,
    rng: &mut Mt19937,
) -> Result<Vec<f32>> {
    check_lengths(tensors, weights)?;
    let pruned = tensors
        .iter()
        .map(|t| random_prune_tensor(t, density, true, rng))
        .collect::<Result<Vec<_>>>()?;
    elect_and_merge(&pruned, weights, method)
}

/// torch's `quantile(x, q)` (linear interpolation between the two nearest ranks), in f32 as torch computes
/// it; `NaN` for an empty slice.
pub fn quantile(x: &[f32], q: f64) -> f32 {
    if x.is_empty() {
        return f32::NAN;
    }
    let mut sorted = x.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let n = sorted.len();
    let rank = q as f32 * (n - 1) as f32;
    let below = (rank as usize).min(n - 1);
    let above = (rank.ceil() as usize).min(n - 1);
    let w = rank - below as f32;
    let (lo, hi) = (sorted[below], sorted[above]);
    if w < 0.5 {
        lo + w * (hi - lo)
    } else {
        hi - (hi - lo) * (1.0 - w)
    }
}

/// The rank-`r` truncated SVD of `m` (`[rows, cols]`, row-major) as PEFT builds its factors:
/// `B′ = U[:, :r]·diag(S[:r])` (`[rows, r]`) and `A′ = Vᵀ[:r]` (`[r, cols]`), row-major. faer computes it in
/// f64. Each singular pair is signed canonically: the largest-magnitude entry of each row of `A′` is positive
/// (see [`align_svd_signs`] to take another SVD's signs instead). `r` must not exceed `min(rows, cols)`.
///
/// ```
/// # fn main() -> peft::Result<()> {
/// let m = [3.0f32, 0.0, 0.0, -2.0]; // diag(3, -2)
/// let (b, a) = peft::merge_utils::svd_factors(&m, 2, 2, 1)?;
/// assert_eq!((b.len(), a.len()), (2, 2));
/// assert!((b[0] * a[0] - 3.0).abs() < 1e-6 && a[0] > 0.0);
/// # Ok(()) }
/// ```
pub fn svd_factors(m: &[f32], rows: usize, cols: usize, r: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    if m.len() != rows * cols || r > rows.min(cols) {
        return Err(PeftError::Invalid(format!(
            "svd_factors: {} values for [{rows}, {cols}] at rank {r}",
            m.len()
        )));
    }
    ThinSvd::new(m, rows, cols)?.factors(r)
}

/// The thin SVD `M = U·diag(S)·Vᵀ` of a row-major `[rows, cols]` matrix, computed by faer in f64, singular
/// values in descending order. [`svd_factors`] and PEFT's conversion to LoRA take factors from it.
///
/// ```
/// # fn main() -> peft::Result<()> {
/// let svd = peft::merge_utils::ThinSvd::new(&[0.0f32, 2.0, 3.0, 0.0], 2, 2)?;
/// assert!((svd.singular_values()[0] - 3.0).abs() < 1e-12);
/// let (b, a) = svd.factors(2)?; // B·A reconstructs M
/// assert!((b[0] * a[1] + b[1] * a[3] - 2.0).abs() < 1e-6);
/// # Ok(()) }
/// ```
pub struct ThinSvd {
    rows: usize,
    cols: usize,
    u: faer::Mat<f64>,
    s: Vec<f64>,
    v: faer::Mat<f64>,
}

impl ThinSvd {
    /// The SVD of `m` (`[rows, cols]`, row-major).
    pub fn new(m: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if m.len() != rows * cols {
            return Err(PeftError::Invalid(format!(
                "SVD: {} values for a [{rows}, {cols}] matrix",
                m.len()
            )));
        }
        let mat = faer::Mat::<f64>::from_fn(rows, cols, |i, j| f64::from(m[i * cols + j]));
        let svd = mat
            .thin_svd()
            .map_err(|e| PeftError::Invalid(format!("the SVD did not converge: {e:?}")))?;
        let s = svd.S().column_vector();
        let s: Vec<f64> = (0..s.nrows()).map(|i| s[i]).collect();
        Ok(Self {
            rows,
            cols,
            u: svd.U().to_owned(),
            s,
            v: svd.V().to_owned(),
        })
    }

    /// The singular values, largest first (`min(rows, cols)` of them).
    pub fn singular_values(&self) -> &[f64] {
        &self.s
    }

    /// The top-`r` triplets `(U[:, :r]` `[rows, r]`, `S[:r]`, `Vᵀ[:r]` `[r, cols])`, row-major, each pair signed
    /// as in [`factors`](Self::factors).
    pub fn truncated(&self, r: usize) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
        let (rows, cols) = (self.rows, self.cols);
        if r > self.s.len() {
            return Err(PeftError::Invalid(format!(
                "SVD triplets of rank {r} from a [{rows}, {cols}] matrix"
            )));
        }
        let mut u = vec![0f64; rows * r];
        let mut vt = vec![0f64; r * cols];
        for k in 0..r {
            let sign = self.sign(k);
            for i in 0..rows {
                u[i * r + k] = sign * self.u[(i, k)];
            }
            for j in 0..cols {
                vt[k * cols + j] = sign * self.v[(j, k)];
            }
        }
        Ok((u, self.s[..r].to_vec(), vt))
    }

    /// The canonical sign of pair `k`: the largest-magnitude entry of `V[:, k]` made positive.
    fn sign(&self, k: usize) -> f64 {
        let mut best = 0usize;
        for j in 0..self.cols {
            if self.v[(j, k)].abs() > self.v[(best, k)].abs() {
                best = j;
            }
        }
        if self.v[(best, k)] < 0.0 { -1.0 } else { 1.0 }
    }

    /// PEFT's rank-`r` factors `B′ = U[:, :r]·diag(S[:r])` (`[rows, r]`) and `A′ = Vᵀ[:r]` (`[r, cols]`),
    /// row-major, each singular pair signed canonically: the largest-magnitude entry of each row of `A′` is
    /// positive.
    pub fn factors(&self, r: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let (rows, cols) = (self.rows, self.cols);
        if r > self.s.len() {
            return Err(PeftError::Invalid(format!(
                "SVD factors of rank {r} from a [{rows}, {cols}] matrix"
            )));
        }
        let (u, s, vt) = self.truncated(r)?;
        let mut b = vec![0f32; rows * r];
        for i in 0..rows {
            for k in 0..r {
                b[i * r + k] = u[i * r + k] as f32 * s[k] as f32;
            }
        }
        let a: Vec<f32> = vt.iter().map(|&x| x as f32).collect();
        Ok((b, a))
    }
}

/// Flips singular pairs of `(b, a)` (`[rows, r]`, `[r, cols]`, as [`svd_factors`] gives them) to the signs of
/// reference factors of the same shapes, such as torch's for the same matrix: pair `k` is negated when
/// `⟨b[:, k], b_ref[:, k]⟩ + ⟨a[k], a_ref[k]⟩ < 0`. Only the signs change, so `B′A′` stays the same.
///
/// ```
/// let (mut b, mut a) = (vec![1.0f32, 2.0], vec![0.5f32, -1.0]); // r = 1
/// peft::merge_utils::align_svd_signs(&mut b, &mut a, &[-1.0, -2.0], &[-0.5, 1.0], 1);
/// assert_eq!((b, a), (vec![-1.0, -2.0], vec![-0.5, 1.0]));
/// ```
pub fn align_svd_signs(b: &mut [f32], a: &mut [f32], b_ref: &[f32], a_ref: &[f32], r: usize) {
    if r == 0 || b.len() != b_ref.len() || a.len() != a_ref.len() {
        return;
    }
    let (rows, cols) = (b.len() / r, a.len() / r);
    for k in 0..r {
        let mut dot = 0f64;
        for i in 0..rows {
            dot += f64::from(b[i * r + k]) * f64::from(b_ref[i * r + k]);
        }
        for j in 0..cols {
            dot += f64::from(a[k * cols + j]) * f64::from(a_ref[k * cols + j]);
        }
        if dot < 0.0 {
            for i in 0..rows {
                b[i * r + k] = -b[i * r + k];
            }
            for j in 0..cols {
                a[k * cols + j] = -a[k * cols + j];
            }
        }
    }
}

/// Clamps `b` and `a` to `[−h, h]` with `h = quantile(cat(b, a), q)` on the signed values (PEFT's
/// `svd_clamp`); a negative `h` sets every entry to `h`, as `torch.clamp` with `min > max` does.
pub fn clamp_svd_factors(b: &mut [f32], a: &mut [f32], q: f64) {
    let dist: Vec<f32> = b.iter().chain(a.iter()).copied().collect();
    let hi = quantile(&dist, q);
    let lo = -hi;
    for x in b.iter_mut().chain(a.iter_mut()) {
        *x = x.max(lo).min(hi);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magnitude_prune_keeps_floor_of_density_times_numel() {
        let t = [0.1f32, -0.5, 0.3, 0.2, -0.4];
        // int(0.5 * 5) = 2
        assert_eq!(
            magnitude_prune_tensor(&t, 0.5).unwrap(),
            vec![0.0, -0.5, 0.0, 0.0, -0.4]
        );
        assert_eq!(magnitude_prune_tensor(&t, 0.0).unwrap(), vec![0.0; 5]);
        assert_eq!(magnitude_prune_tensor(&t, 1.0).unwrap(), t.to_vec());
        assert!(magnitude_prune_tensor(&t, -0.1).is_err());
    }

    #[test]
    fn zeros_never_agree_and_zero_sum_elects_plus() {
        let a = [0.0f32, 1.0, -1.0];
        let b = [0.0f32, -1.0, 1.0];
        let m = majority_sign_mask(&[&a, &b], MajoritySignMethod::Total).unwrap();
        assert_eq!(m, vec![vec![false, true, false], vec![false, false, true]]);
    }

    #[test]
    fn random_prune_draws_one_u32_per_entry_and_none_at_density_one() {
        let t = [1.0f32; 10];
        let mut g = Mt19937::new(3);
        random_prune_tensor(&t, 1.0, true, &mut g).unwrap();
        let mut fresh = Mt19937::new(3);
        assert_eq!(g.next_u32(), fresh.next_u32());
        let mut g = Mt19937::new(3);
        random_prune_tensor(&t, 0.5, true, &mut g).unwrap();
        let mut fresh = Mt19937::new(3);
        for _ in 0..10 {
            fresh.next_u32();
        }
        assert_eq!(g.next_u32(), fresh.next_u32());
    }

    #[test]
    fn quantile_interpolates_linearly_on_signed_values() {
        let x = [3.0f32, -1.0, 2.0, 0.0];
        assert_eq!(quantile(&x, 0.0), -1.0);
        assert_eq!(quantile(&x, 1.0), 3.0);
        assert!((quantile(&x, 0.5) - 1.0).abs() < 1e-7);
        assert!((quantile(&x, 0.9) - 2.7).abs() < 1e-6);
    }

    #[test]
    fn truncated_svd_reconstructs_a_low_rank_matrix() {
        // rank 2: outer products
        let (rows, cols) = (4, 3);
        let u = [[1.0f32, 0.5], [-2.0, 1.0], [0.3, 0.0], [1.0, -1.0]];
        let v = [[0.2f32, -1.0, 0.4], [1.0, 0.5, -0.3]];
        let mut m = vec![0f32; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                m[i * cols + j] = u[i][0] * v[0][j] + u[i][1] * v[1][j];
            }
        }
        let (b, a) = svd_factors(&m, rows, cols, 2).unwrap();
        for i in 0..rows {
            for j in 0..cols {
                let x: f32 = (0..2).map(|k| b[i * 2 + k] * a[k * cols + j]).sum();
                assert!((x - m[i * cols + j]).abs() < 1e-5);
            }
        }
    }
}
