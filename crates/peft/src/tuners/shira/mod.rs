//! SHiRA, sparse high-rank adapters (PEFT's `tuners/shira/`): `r·(in + out)` entries of each Linear weight
//! trained at positions drawn by PEFT's random mask, `ΔW = scatter(shira_weight at shira_indices)`.

pub mod config;
pub mod layer;
pub mod model;

pub use config::ShiraConfig;
pub use layer::ShiraAdapter;
