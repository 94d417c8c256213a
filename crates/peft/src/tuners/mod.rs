//! The PEFT methods, one folder each, named as in PEFT's `src/peft/tuners/`.
//!
//! Adding a method means: one folder here, one variant in [`crate::config::PeftConfig`], one arm in
//! [`crate::layer::registry`].

pub mod adalora;
pub mod boft;
pub mod constants;
pub mod ia3;
pub mod loha;
pub mod lokr;
pub mod lora;
pub mod lycoris_utils;
pub mod oft;
pub mod p_tuning;
pub mod prefix_tuning;
pub mod prompt_tuning;
pub mod tuners_utils;
pub mod vera;
