//! LoKr (PEFT's `tuners/lokr/`): low-rank Kronecker product updates.

pub mod config;

pub use config::LoKrConfig;
