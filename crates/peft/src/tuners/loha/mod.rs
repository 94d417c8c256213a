//! LoHa (PEFT's `tuners/loha/`): low-rank Hadamard product updates.

pub mod config;
pub mod layer;
pub mod model;

pub use config::LoHaConfig;
pub use layer::{LoHaAdapter, LoHaOptions};
