//! LoRA and its variants (rsLoRA, DoRA, bias modes, `lora_bias`), as PEFT's `tuners/lora/`.

pub mod config;
pub mod dora;
pub mod layer;
pub mod model;
pub mod rewrite_init;
pub mod conversion;
pub mod weighted;

pub use config::LoraConfig;
pub use layer::LoraAdapter;
pub use weighted::{CombinationType, DareSeed, SvdSigns, WeightedOptions};
