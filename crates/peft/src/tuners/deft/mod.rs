//! DEFT (PEFT's `tuners/deft/`): decompositional efficient fine-tuning. Per layer a projection direction `P`
//! `[out, r]` and an injection matrix `R` `[r, in]`: the weight becomes `(I − P_proj)·W + s·Q_P·R`, a rank-`r`
//! subspace of the output removed from the frozen weight and replaced by injected content. PaRa (`para`) keeps
//! only the removal.

pub mod config;
pub mod layer;
pub mod model;

pub use config::{DeftConfig, DeftDecomposition};
pub use layer::DeftAdapter;
