//! The Llama family of causal LMs (transformers' `LlamaForCausalLM`, `MistralForCausalLM`, `Qwen2ForCausalLM`;
//! SmolLM2 and TinyLlama are Llama), differentiable, with adapter slots.
//!
//! - [`LlamaConfig`]: `config.json` (both RoPE layouts; `default` and `llama3` RoPE; sliding windows).
//! - [`LlamaForCausalLM`]: built from HF-named tensors ([`LlamaForCausalLM::from_tensors`]); full-sequence f32
//!   logits; padding masks (left or right), explicit positions, a [`KvCache`], PEFT prefix keys/values
//!   ([`PrefixKv`]); implements [`peft::host::AdapterHost`] with transformers' exact `named_modules()` tree.
//!
//! Not implemented: attention dropout (`attention_dropout` is 0 in every released config), `partial_rotary_factor`
//! below 1, RoPE types other than `default` and `llama3`, activations other than SiLU.

mod batch;
mod cache;
mod config;
mod model;

pub use cache::{KvCache, PrefixKv};
pub use config::{LlamaConfig, LlamaFamily, RopeConfig, RopeScaling};
pub use model::{ForwardInput, LlamaForCausalLM};
