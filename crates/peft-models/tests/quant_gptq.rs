//! Tiny Llamas quantized with GPTQ (transformers' GPTQConfig through optimum 2.3.0 + gptqmodel 7.7.0: 4-bit,
//! group 32, desc_act) and AWQ (gemm, packed by gptqmodel), saved by transformers, with and without a PEFT LoRA
//! adapter (fixtures/quant, written by gen_gptq.py).

use crate::quant::{PROJ, case_dir, io, logits};
use candle_core::Device;
use peft::quant::QuantizedWeight;
use peft_models::llama::{LlamaConfig, LlamaForCausalLM};
use peft_models::{load_model, with_adapters};
use peft_test_support::assert_close;

/// Base and LoRA logits of `model` against the case's transformers + PEFT ones.
fn check_logits(case: &str, model: LlamaForCausalLM) {
    let io = io(case);
    let ids = &io["input_ids"];
    assert_close(
        &format!("{case} base logits"),
        &logits(&model, ids),
        &io["base_logits"],
        1e-4,
        1e-4,
    );
    let pm = with_adapters(model, &[case_dir(case).join("adapter")], &Device::Cpu).unwrap();
    assert_close(
        &format!("{case} LoRA logits"),
        &logits(pm.model(), ids),
        &io["lora_logits"],
        1e-4,
        1e-4,
    );
}

#[test]
fn gptq_and_awq_checkpoints_give_transformers_logits_with_and_without_lora() {
    for (case, kind) in [
        ("gptq_llama_v1", "gptq 4-bit"),
        ("awq_llama", "awq 4-bit gemm"),
    ] {
        let loaded = load_model(case_dir(case).join("base"), &Device::Cpu)
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let m = &loaded.model;
        for l in 0..2 {
            for p in PROJ {
                let slot = m.slot(&format!("model.layers.{l}.{p}")).unwrap();
                let q = slot
                    .base()
                    .quantized()
                    .unwrap_or_else(|| panic!("{case}: {p}"));
                assert!(q.describe().starts_with(kind), "{case}: {}", q.describe());
                match (&**q, case) {
                    (QuantizedWeight::Gptq(g), "gptq_llama_v1") => {
                        assert!(
                            g.g_idx.windows(2).any(|w| w[1] < w[0]),
                            "{p}: desc_act g_idx"
                        )
                    }
                    (QuantizedWeight::Awq(a), "awq_llama") => assert_eq!(a.group_size, 32),
                    _ => panic!("{case}: {p} is {}", q.describe()),
                }
            }
        }
        assert!(m.slot("lm_head").unwrap().base().quantized().is_none());
        let summary = peft_models::quantize::summary(m).unwrap();
        assert!(
            summary.starts_with("14 of 15 Linear layers quantized"),
            "{summary}"
        );
        check_logits(case, loaded.model);
    }
}

#[test]
fn gptq_v2_checkpoints_load_and_checkpoint_weights_reads_them() {
    // transformers' save_pretrained of a model GPTQConfig quantized writes checkpoint_format "gptq_v2".
    let base = case_dir("gptq_llama").join("base");
    let loaded = load_model(&base, &Device::Cpu).unwrap();
    let summary = peft_models::quantize::summary(&loaded.model).unwrap();
    assert!(
        summary.starts_with("14 of 15 Linear layers quantized"),
        "{summary}"
    );
    check_logits("gptq_llama", loaded.model);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    let mut tensors =
        peft::io::read_safetensors(base.join("model.safetensors"), &Device::Cpu).unwrap();
    let quantized = peft_models::quantize::checkpoint_weights(&config, &mut tensors).unwrap();
    assert_eq!(quantized.len(), 14);
    assert!(!tensors.keys().any(|k| k.contains("qzeros")));
    // The same weights as the v1 copy of the checkpoint (gptqmodel's conversion) reads.
    let v1 = load_model(case_dir("gptq_llama_v1").join("base"), &Device::Cpu).unwrap();
    for (name, w) in &quantized {
        let slot = v1
            .model
            .slot(name.strip_suffix(".weight").unwrap())
            .unwrap();
        assert_eq!(&**slot.base().quantized().unwrap(), w, "{name}");
    }
    let model = LlamaForCausalLM::from_parts(
        LlamaConfig::from_value(&config).unwrap(),
        tensors,
        quantized,
        &Device::Cpu,
    )
    .unwrap();
    check_logits("gptq_llama", model);
}
