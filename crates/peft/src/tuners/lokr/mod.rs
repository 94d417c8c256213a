//! LoKr (PEFT's `tuners/lokr/`): low-rank Kronecker product updates.

pub mod config;
pub mod layer;
pub mod model;

pub use config::LoKrConfig;
pub use layer::LoKrAdapter;
