//! HRA (PEFT's `tuners/hra/`): Householder reflection adaptation. The layer's weight is multiplied on the
//! right by a chain of `r` Householder reflections, `W' = W·H`, `H = Π (I − 2 uᵢuᵢᵀ)` (or, with Gram–Schmidt,
//! `H = I − 2 UUᵀ` for the orthonormalised `U`).

pub mod config;
pub mod layer;
pub mod model;

pub use config::HraConfig;
pub use layer::HraAdapter;
