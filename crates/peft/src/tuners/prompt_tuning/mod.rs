//! Prompt tuning (PEFT's `tuners/prompt_tuning/`): learned virtual token embeddings.

pub mod config;
pub mod model;

pub use config::PromptTuningConfig;
