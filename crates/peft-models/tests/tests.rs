//! The crate's one integration-test binary (one link on two cores instead of one per file).

mod llama;
mod prompt;
mod quant;
mod quant_gptq;
