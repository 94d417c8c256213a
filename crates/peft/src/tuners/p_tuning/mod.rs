//! P-tuning (PEFT's `tuners/p_tuning/`): virtual tokens produced by a prompt encoder.

pub mod config;
pub mod model;

pub use config::PromptEncoderConfig;
