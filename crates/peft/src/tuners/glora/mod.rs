//! GLoRA (PEFT's `tuners/glora/`): generalised LoRA, a frozen Linear modified as `W_eff = W₀ + W₀ ⊙ A + B`
//! and `b_eff = b₀ + b₀ ⊙ D + E + W₀·C`, each of `A`…`E` a low-rank product, a vector, a scalar or nothing
//! (`config_A_B`, `config_C`, `config_D_E`).

pub mod config;
pub mod layer;
pub mod model;

pub use config::{GloraConfig, GloraPathKind};
pub use layer::GloraAdapter;
