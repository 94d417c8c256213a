//! PEANuT (PEFT's `tuners/peanut/`): a weight-aware update, `ΔW` computed from the frozen weight by a small
//! network, `ΔW = (B(f(…f(Wᵀ·Aᵀ)…)) · scaling)ᵀ` with `depth` encoder and decoder layers joined by residuals.

pub mod activation;
pub mod config;
pub mod layer;
pub mod model;

pub use activation::Activation;
pub use config::PeanutConfig;
pub use layer::PeanutAdapter;
