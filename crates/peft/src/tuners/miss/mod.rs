//! MiSS (PEFT's `tuners/miss/`, formerly Bone): one small block shared by every block of the weight. In the
//! default form `ΔW[o, b·r + k] = M[k, o]` for every block `b` of `r` input columns (`M` `[r, out]`); `"mini"`
//! tiles an `[r, mini_r]` block across the outputs; `"bat"` makes the update depend on the weight,
//! `ΔW_blk = W_blk·B + B` for every `r×r` block.

pub mod config;
pub mod layer;
pub mod model;

pub use config::MissConfig;
pub use layer::MissAdapter;
