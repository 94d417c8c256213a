//! PVeRA (PEFT's `tuners/pvera/`): probabilistic VeRA, shared random projections with learned scaling vectors
//! and a Gaussian latent (its mean at inference).

pub mod config;
pub mod layer;
pub mod model;

pub use config::PveraConfig;
pub use layer::{PveraAdapter, PveraProjections};
