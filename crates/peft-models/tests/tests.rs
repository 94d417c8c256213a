//! The crate's one integration-test binary (one link on two cores instead of one per file).

mod conversion;
mod gguf_lora;
mod gguf_merge;
mod half_base;
mod hotswap;
mod llama;
mod lora_rewrite_init;
mod lora_trainable_tokens;
mod mixed_batch;
mod prompt;
mod quant;
mod quant_bad_inputs;
mod quant_gguf;
mod quant_gptq;
