//! AdaLoRA (PEFT's `tuners/adalora/`): LoRA in SVD form whose ranks are reallocated during training.

pub mod allocator;
pub mod config;
pub mod layer;
pub mod model;

pub use allocator::{AdaLoraAllocator, RankAllocator, attach_adalora, orth_reg};
pub use config::AdaLoraConfig;
pub use layer::AdaLoraAdapter;
