//! Runs candle-transformers' own (unmodified) Llama on a base checkpoint with a PEFT adapter merged in on the
//! fly through [`peft::varbuilder::merged_var_builder`].
//!
//! ```text
//! cargo run -p peft --example merged_llama -- [BASE_DIR] [ADAPTER_DIR]
//! ```
//! Defaults to the tiny Llama fixture and its LoRA adapter (q_proj, v_proj) written by Python PEFT, and
//! prints the last-position logits next to those of PEFT's `merge_and_unload()` model.

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let case = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lora/cases/llama_qv");
    let mut args = std::env::args().skip(1);
    let base = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| case.join("base_hf"));
    let adapter = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| case.join("adapter"));

    let config: LlamaConfig =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json"))?)?;
    let config = config.into_config(false);
    let device = Device::Cpu;
    let vb = peft::varbuilder::merged_var_builder(&base, &[(&adapter, None)], DType::F32, &device)?;
    let model = Llama::load(vb, &config)?;
    let mut cache = Cache::new(false, DType::F32, &config, &device)?;

    let ids = Tensor::new(&[[1u32, 5, 9, 13, 2]], &device)?;
    let logits = model.forward(&ids, 0, &mut cache)?;
    println!(
        "last-position logits (first 8): {:?}",
        &logits.flatten_all()?.to_vec1::<f32>()?[..8]
    );
    Ok(())
}
