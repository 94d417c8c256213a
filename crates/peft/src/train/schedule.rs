//! Learning-rate schedules: transformers' `get_*_schedule_with_warmup`, evaluated as torch's `LambdaLR` does.
//!
//! A [`Schedule`] is a multiplier of each parameter group's initial learning rate. `LambdaLR` evaluates it at
//! its step count: the optimizer step number `k` (counting from 0) runs with `lr = initial_lr · λ(k)`, and the
//! count advances after every optimizer step. [`LrScheduler`] keeps that count (its only state).
//!
//! The formulas are transformers 5.24.0's `optimization.py`, operation for operation, so the multipliers are
//! the same `f64` values:
//!
//! | schedule | `λ(k)` for `k < warmup` | `λ(k)` afterwards |
//! |---|---|---|
//! | constant | 1 | 1 |
//! | constant with warmup | `k / max(1, warmup)` | 1 |
//! | linear | `k / max(1, warmup)` | `max(0, (total − k) / max(1, total − warmup))` |
//! | cosine | `k / max(1, warmup)` | `max(0, ½(1 + cos(π · cycles · 2 · progress)))`, `progress = (k − warmup) / max(1, total − warmup)` |
//!
//! ```
//! use peft::train::schedule::Schedule;
//! let s = Schedule::Linear { warmup: 2, total: 10 };
//! assert_eq!(s.factor(0), 0.0);
//! assert_eq!(s.factor(1), 0.5);
//! assert_eq!(s.factor(2), 1.0);
//! assert_eq!(s.factor(6), 0.5);
//! assert_eq!(s.factor(12), 0.0);
//! ```

use serde::{Deserialize, Serialize};

/// A learning-rate multiplier as a function of the optimizer step count (transformers' schedules).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    /// `get_constant_schedule`: always 1.
    #[default]
    Constant,
    /// `get_constant_schedule_with_warmup`: linear warmup from 0, then 1.
    ConstantWithWarmup {
        /// Number of warmup steps.
        warmup: u64,
    },
    /// `get_linear_schedule_with_warmup`: linear warmup, then linear decay to 0 at `total`.
    Linear {
        /// Number of warmup steps.
        warmup: u64,
        /// Total number of training steps.
        total: u64,
    },
    /// `get_cosine_schedule_with_warmup`: linear warmup, then a cosine over `num_cycles` periods (0.5: decay
    /// to 0 at `total`).
    Cosine {
        /// Number of warmup steps.
        warmup: u64,
        /// Total number of training steps.
        total: u64,
        /// Number of cosine periods after warmup (transformers' default 0.5).
        num_cycles: f64,
    },
}

impl Schedule {
    /// The cosine schedule with transformers' default `num_cycles = 0.5`.
    pub fn cosine(warmup: u64, total: u64) -> Self {
        Schedule::Cosine {
            warmup,
            total,
            num_cycles: 0.5,
        }
    }

    /// Parses a schedule name as transformers' `lr_scheduler_type` spells it (`constant`,
    /// `constant_with_warmup`, `linear`, `cosine`).
    pub fn from_name(name: &str, warmup: u64, total: u64) -> crate::Result<Self> {
        Ok(match name {
            "constant" => Schedule::Constant,
            "constant_with_warmup" => Schedule::ConstantWithWarmup { warmup },
            "linear" => Schedule::Linear { warmup, total },
            "cosine" => Schedule::cosine(warmup, total),
            other => {
                return Err(crate::PeftError::Invalid(format!(
                    "unknown lr scheduler {other:?} (expected constant, constant_with_warmup, linear or cosine)"
                )));
            }
        })
    }

    /// The multiplier `λ(step)` of the initial learning rate, where `step` counts optimizer steps from 0.
    pub fn factor(&self, step: u64) -> f64 {
        let warmup_factor = |warmup: u64| step as f64 / warmup.max(1) as f64;
        match *self {
            Schedule::Constant => 1.0,
            Schedule::ConstantWithWarmup { warmup } => {
                if step < warmup {
                    warmup_factor(warmup)
                } else {
                    1.0
                }
            }
            Schedule::Linear { warmup, total } => {
                if step < warmup {
                    return warmup_factor(warmup);
                }
                // (total − step) in Python's unbounded integers, then float.
                let num = total as i128 - step as i128;
                let den = (total as i128 - warmup as i128).max(1);
                (num as f64 / den as f64).max(0.0)
            }
            Schedule::Cosine {
                warmup,
                total,
                num_cycles,
            } => {
                if step < warmup {
                    return warmup_factor(warmup);
                }
                let den = (total as i128 - warmup as i128).max(1);
                let progress = (step - warmup) as f64 / den as f64;
                let f = 0.5 * (1.0 + (std::f64::consts::PI * num_cycles * 2.0 * progress).cos());
                f.max(0.0)
            }
        }
    }
}

/// A schedule with its step count, as torch's `LambdaLR`: [`LrScheduler::factor`] is the multiplier for the
/// next optimizer step, [`LrScheduler::step`] advances after it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LrScheduler {
    /// The schedule.
    pub schedule: Schedule,
    /// Optimizer steps taken so far (`LambdaLR.last_epoch`).
    pub step: u64,
}

impl LrScheduler {
    /// A scheduler at step 0.
    pub fn new(schedule: Schedule) -> Self {
        Self { schedule, step: 0 }
    }

    /// The multiplier for the next optimizer step.
    pub fn factor(&self) -> f64 {
        self.schedule.factor(self.step)
    }

    /// Advances the count after an optimizer step.
    pub fn step(&mut self) {
        self.step += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decay() {
        let c = Schedule::cosine(2, 6);
        assert_eq!(c.factor(0), 0.0);
        assert_eq!(c.factor(1), 0.5);
        assert_eq!(c.factor(2), 1.0);
        assert!((c.factor(4) - 0.5).abs() < 1e-15);
        assert!(c.factor(6).abs() < 1e-15);
        assert_eq!(Schedule::ConstantWithWarmup { warmup: 4 }.factor(9), 1.0);
        assert_eq!(Schedule::Constant.factor(0), 1.0);
        // warmup longer than the run: the decay denominator is clamped at 1.
        assert_eq!(
            Schedule::Linear {
                warmup: 6,
                total: 4
            }
            .factor(7),
            0.0
        );
    }

    #[test]
    fn scheduler_counts_steps_and_round_trips() {
        let mut s = LrScheduler::new(Schedule::Linear {
            warmup: 1,
            total: 3,
        });
        assert_eq!(s.factor(), 0.0);
        s.step();
        assert_eq!(s.factor(), 1.0);
        let json = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<LrScheduler>(&json).unwrap(), s);
        assert_eq!(
            Schedule::from_name("cosine", 1, 2).unwrap(),
            Schedule::cosine(1, 2)
        );
        let e = Schedule::from_name("polynomial", 1, 2).unwrap_err();
        assert!(
            matches!(&e, crate::PeftError::Invalid(m) if m.contains("unknown lr scheduler \"polynomial\"")),
            "{e}"
        );
    }
}
