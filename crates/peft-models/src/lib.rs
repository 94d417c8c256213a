//! Model code with PEFT adapter slots.
//!
//! This crate is where differentiable transformer models (the Llama family first) live. Every projection
//! of such a model is a [`peft::AdapterSlot`], so adapters are injected by their HuggingFace dotted name.
//!
//! The short path, as PEFT's:
//! - [`load_model`]: an HF directory or a GGUF file → model, tokenizer (if any), config;
//! - [`peft::PeftModel::get_peft_model`] / [`peft::PeftModel::from_pretrained`]: any adapter, prompt learning
//!   included ([`prompt_learning`]);
//! - [`train::train`]: the whole training job; [`eval::evaluate`] and [`generate::generate`] for a model with
//!   any adapter ([`causal_lm::CausalLm`]).

pub mod causal_lm;
pub mod data;
pub mod error;
pub mod eval;
pub mod export;
pub mod generate;
pub mod gguf;
pub mod gguf_lora;
pub mod gguf_merge;
pub mod hf;
pub mod llama;
pub mod load;
pub mod memory;
pub mod ops;
pub mod prompt_learning;
pub mod quantize;
pub mod runtime;
pub mod tokenizer;
pub mod train;

pub use load::{
    LoadOptions, LoadProgress, LoadedModel, load_model, load_model_with, with_adapters,
};
