//! BOFT (PEFT's `tuners/boft/`): butterfly-factorised orthogonal fine-tuning.

pub mod config;

pub use config::BoftConfig;
