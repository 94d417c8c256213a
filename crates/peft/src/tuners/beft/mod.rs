//! BEFT (PEFT's `tuners/beft/`): bias-efficient fine-tuning, one trained bias vector per targeted Linear
//! layer added to its output, `y = x·Wᵀ + b + Δb`; merging adds `Δb` to the base bias.

pub mod config;
pub mod layer;
pub mod model;

pub use config::BeftConfig;
pub use layer::BeftAdapter;
