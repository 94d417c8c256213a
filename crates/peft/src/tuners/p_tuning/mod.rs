//! P-tuning (PEFT's `tuners/p_tuning/`): virtual tokens produced by a prompt encoder.

pub mod config;

pub use config::PromptEncoderConfig;
