//! BOFT (PEFT's `tuners/boft/`): butterfly-factorised orthogonal fine-tuning.

pub mod config;
pub mod layer;
pub mod model;

pub use config::BoftConfig;
pub use layer::{BoftAdapter, BoftGeometry};
