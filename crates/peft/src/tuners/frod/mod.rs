//! FRoD (PEFT's `tuners/frod/`): each targeted weight rewritten exactly as `W = U·diag(λ)·Vᵀ` in a basis `V`
//! shared by the layers of the same role, training `λ` and a sparse `S`: `W' = U·(S + diag(λ))·Vᵀ`.

pub mod config;
pub mod layer;
pub mod model;

pub use config::FrodConfig;
pub use layer::FrodAdapter;
