//! HiRA (PEFT's `tuners/hira/`): a high-rank update as the Hadamard product of the frozen weight with a
//! low-rank matrix, `ΔW = W₀ ⊙ (B·A)`, so the merged weight is `W₀ ⊙ (1 + B·A)`. Linear, GPT-2 Conv1D,
//! Embedding and Conv2d layers, as PEFT.

pub mod config;
pub mod layer;
pub mod model;

pub use config::{HiraConfig, HiraInit};
pub use layer::HiraAdapter;
