//! AdaLoRA (PEFT's `tuners/adalora/`): LoRA in SVD form whose ranks are reallocated during training.

pub mod config;

pub use config::AdaLoraConfig;
