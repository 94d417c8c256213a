//! DeLoRA (PEFT's `tuners/delora/`): a low-rank update with each rank-one component normalised and bounded
//! by `λ`, scaled by the column norms of the frozen weight:
//! `ΔW = B·diag(λ / r / (‖aᵢ‖·‖bᵢ‖))·A · diag(‖W_{:,j}‖)`.

pub mod config;
pub mod layer;
pub mod model;

pub use config::DeloraConfig;
pub use layer::DeloraAdapter;
