//! Writes a Llama HF model directory with random weights, for memory and speed benchmarks of shapes we cannot
//! download here (`scripts/bench_qlora.sh` uses it for a TinyLlama-1.1B-shaped QLoRA run).
//!
//! ```text
//! cargo run --release --example random_llama -- <output dir> [tinyllama-1.1b|smollm2-135m] [bf16|f16|f32]
//! ```
//!
//! The weights are uniform in ±1/√fan_in (norms 1), seeded, written by `peft_models::export::write_hf_dir`
//! (`config.json`, `model.safetensors`; no tokenizer: train on pre-tokenized JSONL `input_ids`).

use candle_core::{DType, Device};
use peft_models::llama::{LlamaConfig, LlamaForCausalLM};
use std::time::Instant;

const TINYLLAMA: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
  "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
  "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
  "tie_word_embeddings": false, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}"#;

const SMOLLM2: &str = r#"{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152,
  "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
  "num_key_value_heads": 3, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 8192,
  "tie_word_embeddings": true, "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2}"#;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(out) = args.first() else {
        return Err(
            "usage: random_llama <output dir> [tinyllama-1.1b|smollm2-135m] [bf16|f16|f32]".into(),
        );
    };
    let json = match args.get(1).map(String::as_str).unwrap_or("tinyllama-1.1b") {
        "tinyllama-1.1b" => TINYLLAMA,
        "smollm2-135m" => SMOLLM2,
        other => return Err(format!("unknown shape {other:?}").into()),
    };
    let dtype = match args.get(2).map(String::as_str).unwrap_or("bf16") {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "f32" => DType::F32,
        other => return Err(format!("unknown dtype {other:?}").into()),
    };
    let t0 = Instant::now();
    let config = LlamaConfig::from_json_str(json)?;
    let tensors = LlamaForCausalLM::random_tensors(&config, 0, dtype, &Device::Cpu)?;
    let params: usize = tensors.values().map(|t| t.elem_count()).sum();
    let mut value: serde_json::Value = serde_json::from_str(json)?;
    value["torch_dtype"] = serde_json::json!(match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    });
    peft_models::export::write_hf_dir(out, &value, &tensors, None)?;
    println!(
        "wrote {out}: {params} parameters ({dtype:?}) in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
