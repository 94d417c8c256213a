//! LoRA end to end on a tiny random Llama, with the library's entry points only:
//!
//! 1. a 2-layer Llama whose tensors are drawn in code from a seed;
//! 2. `PeftModel::get_peft_model` with a typed `LoraConfig`;
//! 3. 20 AdamW steps with the library's `Trainer` on a small synthetic token dataset (the loss must drop);
//! 4. `save_pretrained` to a temporary directory, `PeftModel::from_pretrained` on a fresh base: the reloaded
//!    logits equal the trained model's;
//! 5. `merge_and_unload`: the merged plain model gives the unmerged logits.
//!
//! `cargo run --release --example lora_train_save_merge` (exits 0 when every check holds).

use candle_core::{DType, Device, Tensor};
use peft::config::{LoraConfig, PeftConfig, TargetFields};
use peft::train::optim::{AdamW, AdamWConfig};
use peft::train::schedule::Schedule;
use peft::train::trainer::{Trainer, TrainerSettings};
use peft::{ForwardCtx, PeftModel};
use peft_models::data::causal_lm_loss;
use peft_models::llama::{ForwardInput, LlamaConfig, LlamaForCausalLM};

type Error = Box<dyn std::error::Error>;

const VOCAB: usize = 32;

/// The largest absolute difference between two tensors of one shape.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32, Error> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn main() -> Result<(), Error> {
    let device = Device::Cpu;
    // 1. A tiny Llama (GQA, tied embeddings), every tensor drawn from seed 7.
    let config = LlamaConfig::from_value(&serde_json::json!({
        "model_type": "llama",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": true,
    }))?;
    let tensors = LlamaForCausalLM::random_tensors(&config, 7, DType::F32, &device)?;
    let base = || LlamaForCausalLM::from_tensors(config.clone(), tensors.clone(), &device);

    // 2. LoRA r=8 on the attention projections.
    let lora = PeftConfig::Lora(LoraConfig {
        lora: peft::config::LoraFields {
            r: 8,
            lora_alpha: 16.0,
            ..Default::default()
        },
        targets: TargetFields::modules(["q_proj", "k_proj", "v_proj", "o_proj"]),
        ..Default::default()
    });
    let model = PeftModel::get_peft_model(base()?, lora, "default", 0)?;
    println!("{}", model.trainable_parameters());

    // 3. A synthetic dataset: 8 sequences of 16 tokens, each an arithmetic progression modulo the vocabulary
    //    (the next token is predictable from the previous two), and 20 steps of AdamW.
    let rows: Vec<u32> = (0..8u32)
        .flat_map(|i| (0..16u32).map(move |j| (i + (i % 3 + 1) * j) % VOCAB as u32))
        .collect();
    let input_ids = Tensor::from_vec(rows, (8, 16), &device)?;
    let labels = input_ids.to_dtype(DType::I64)?;
    let params = model.trainable_vars();
    let optimizer = AdamW::from_params(
        params.clone(),
        AdamWConfig {
            lr: 1e-2,
            ..Default::default()
        },
    )?;
    let settings = TrainerSettings {
        max_steps: 20,
        ..Default::default()
    };
    let mut trainer = Trainer::new(params, Box::new(optimizer), Schedule::Constant, settings)?;
    let mut losses = Vec::new();
    while !trainer.is_finished() {
        let report = trainer.train_step(&mut |_, ctx| {
            let logits = model.model().forward(ForwardInput::ids(&input_ids), ctx)?;
            Ok(causal_lm_loss(&logits, &labels)?.0)
        })?;
        losses.push(report.loss);
    }
    let (first, last) = (losses[0], losses[losses.len() - 1]);
    println!("loss {first:.4} → {last:.4} in {} steps", losses.len());
    assert!(
        last < first * 0.9,
        "the loss did not drop: {first} → {last}"
    );

    // 4. Save, reload on a fresh base, compare logits.
    let eval = ForwardCtx::eval();
    let logits = |m: &LlamaForCausalLM| m.forward(ForwardInput::ids(&input_ids), &eval);
    let trained = logits(model.model())?;
    let dir = tempfile::tempdir()?;
    model.save_pretrained(dir.path())?;
    let reloaded = PeftModel::from_pretrained(base()?, dir.path(), "default", &device)?;
    let reload_diff = max_abs_diff(&logits(reloaded.model())?, &trained)?;
    println!("reloaded vs trained logits: max |Δ| = {reload_diff:.2e}");
    assert!(
        reload_diff <= 1e-5,
        "reloaded logits differ by {reload_diff}"
    );

    // 5. Merge into the base weights and drop the adapter.
    let merged = reloaded.merge_and_unload(None)?;
    let merge_diff = max_abs_diff(&logits(&merged)?, &trained)?;
    println!("merged vs unmerged logits: max |Δ| = {merge_diff:.2e}");
    assert!(merge_diff <= 1e-4, "merged logits differ by {merge_diff}");
    println!("ok");
    Ok(())
}
