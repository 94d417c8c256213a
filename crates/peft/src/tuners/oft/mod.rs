//! OFT (PEFT's `tuners/oft/`): block-diagonal orthogonal fine-tuning.

pub mod config;

pub use config::OftConfig;
