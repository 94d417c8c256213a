//! (IA)³ (PEFT's `tuners/ia3/`): learned scaling of activations.

pub mod config;

pub use config::Ia3Config;
