//! LoHa (PEFT's `tuners/loha/`): low-rank Hadamard product updates.

pub mod config;

pub use config::LoHaConfig;
