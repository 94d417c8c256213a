//! Model code with PEFT adapter slots.
//!
//! This crate is where differentiable transformer models (the Llama family first) live. Every projection
//! of such a model is a [`peft::AdapterSlot`], so adapters are injected by their HuggingFace dotted name.
//! It is empty for now: the foundation (`peft`) comes first.

pub mod data;
pub mod error;
pub mod export;
pub mod gguf;
pub mod hf;
pub mod llama;
pub mod ops;
pub mod prompt_learning;
pub mod tokenizer;
