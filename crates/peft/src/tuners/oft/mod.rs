//! OFT (PEFT's `tuners/oft/`): block-diagonal orthogonal fine-tuning.

pub mod config;
pub mod layer;
pub mod model;

pub use config::OftConfig;
pub use layer::OftAdapter;
