//! RandLoRA (PEFT's `tuners/randlora/`): full-rank updates from shared random bases `randlora_A` /
//! `randlora_B` (generated from `projection_prng_key`) scaled per layer by trained `randlora_lambda` and
//! `randlora_gamma`.

pub mod config;
pub mod layer;
pub mod model;
pub mod prng;

pub use config::RandLoraConfig;
pub use layer::{RandLoraAdapter, RandLoraBases};
