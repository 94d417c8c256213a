//! The crate's one integration-test binary (one link on two cores instead of one per file).

mod adalora;
mod boft;
mod c3a;
mod common;
mod delora;
mod fourierft;
mod gralora;
mod half_linear;
mod hra;
mod ia3;
mod loha;
mod lokr;
mod lora_init;
mod lora_parity;
mod merge_files;
mod miss;
mod oft;
mod peft_model;
mod quant;
mod quant_gptq;
mod road;
mod train;
mod varbuilder;
mod vera;
mod weighted;
