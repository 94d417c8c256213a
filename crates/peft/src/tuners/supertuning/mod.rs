//! SuperTuning (PEFT's `tuners/supertuning/`): sparse fine-tuning of the weight entries of largest (or
//! smallest) magnitude, `ΔW = scatter(values at indices)`, optionally with a LoRA on top ("Supra":
//! `+ (lora_alpha / r)·B·A`).

pub mod config;
pub mod layer;
pub mod model;

pub use config::SupertuningConfig;
pub use layer::SupertuningAdapter;
