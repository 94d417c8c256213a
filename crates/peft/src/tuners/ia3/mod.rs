//! (IA)³ (PEFT's `tuners/ia3/`): learned scaling of activations.

pub mod config;
pub mod layer;
pub mod model;

pub use config::Ia3Config;
pub use layer::Ia3Adapter;
