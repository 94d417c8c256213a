//! UniLoRA (PEFT's `tuners/unilora/`): every entry of every layer's LoRA factors `A`, `B` reads one entry of a
//! single trained vector `theta_d` shared by the whole model, at positions drawn from `proj_seed` by numpy's
//! generator and scaled by `1/√count`; `ΔW = B A`.

pub mod config;
pub mod layer;
pub mod model;
pub mod numpy_rng;

pub use config::UniLoraConfig;
pub use layer::UniLoraAdapter;
