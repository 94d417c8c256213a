//! VeRA (PEFT's `tuners/vera/`): shared random projections with learned scaling vectors.

pub mod config;
pub mod layer;
pub mod model;
pub mod prng;

pub use config::VeraConfig;
pub use layer::{VeraAdapter, VeraProjections};
