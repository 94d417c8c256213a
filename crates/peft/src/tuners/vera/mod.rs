//! VeRA (PEFT's `tuners/vera/`): shared random projections with learned scaling vectors.

pub mod config;

pub use config::VeraConfig;
