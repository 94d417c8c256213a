//! VB-LoRA (PEFT's `tuners/vblora/`): the low-rank factors of every layer are composed from one shared
//! vector bank, each sub-vector a softmax-weighted mix of the `topk` bank vectors its learned logits rank
//! highest: `ΔW = B·A` with `A`, `B` built from `vblora_logits_A` / `vblora_logits_B` and
//! `base_model.vblora_vector_bank`.

pub mod config;
pub mod layer;
pub mod model;
pub mod topk;

pub use config::VbLoraConfig;
pub use layer::VbLoraAdapter;
