//! Prefix tuning (PEFT's `tuners/prefix_tuning/`): learned key/value prefixes in every layer.

pub mod config;
pub mod model;

pub use config::PrefixTuningConfig;
