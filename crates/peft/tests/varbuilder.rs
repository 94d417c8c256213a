//! The merged-weights `VarBuilder` backend drives candle-transformers' unmodified Llama: its logits equal
//! those of PEFT's `merge_and_unload()` model on the fixture.

use crate::common::*;
use candle_core::{DType, Device, IndexOp};
use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};

#[test]
fn candle_transformers_llama_runs_on_merged_weights() {
    for case in [
        "llama_qv",
        "llama_dora",
        "llama_embed_lm_head",
        "llama_tied_lm_head",
        "llama_tied_dora",
        "llama_two_adapters",
        "llama_two_adapters_dora",
    ] {
        let dir = fixtures_dir().join("lora/cases").join(case);
        let base = dir.join("base_hf");
        let config: LlamaConfig =
            serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap())
                .unwrap();
        let config = config.into_config(false);
        // Every adapter of the case, in PEFT's merge order (`default` at the root, the others in sub-dirs).
        let adapters: Vec<_> = strings(&case_json(&dir), "merge_order")
            .iter()
            .map(|n| peft::io::adapter_subdir(&dir.join("adapter"), n))
            .collect();
        let adapters: Vec<(&std::path::Path, Option<f64>)> =
            adapters.iter().map(|a| (a.as_path(), None)).collect();
        let vb = peft::varbuilder::merged_var_builder(&base, &adapters, DType::F32, &Device::Cpu)
            .unwrap();
        let model = Llama::load(vb, &config).unwrap();
        let io = load(&dir.join("io.safetensors"));
        let ids = io["model_input"].to_dtype(DType::U32).unwrap();
        let expected = &io["model_output_merged"]; // [batch, seq, vocab]
        let seq = ids.dim(1).unwrap();
        for b in 0..ids.dim(0).unwrap() {
            let mut cache = Cache::new(false, DType::F32, &config, &Device::Cpu).unwrap();
            let logits = model
                .forward(&ids.i(b..b + 1).unwrap(), 0, &mut cache)
                .unwrap();
            let want = expected.i((b, seq - 1)).unwrap().unsqueeze(0).unwrap();
            assert_close(
                &format!("{case}: batch {b} last logits"),
                &logits,
                &want,
                1e-4,
                1e-4,
            );
        }
    }
}
