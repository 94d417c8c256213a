//! OSF, orthogonal subspace fine-tuning (PEFT's `tuners/osf/`): each weight's SVD split at `effective_rank`,
//! the top directions frozen and the rest trained with gradients kept orthogonal to them.

pub mod config;
pub mod layer;
pub mod model;

pub use config::OsfConfig;
pub use layer::OsfAdapter;
