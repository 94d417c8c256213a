//! AdaLoRA (PEFT's `tuners/adalora/`): LoRA in SVD form whose ranks are reallocated during training.

pub mod config;
pub mod layer;

pub use config::AdaLoraConfig;
pub use layer::AdaLoraAdapter;
