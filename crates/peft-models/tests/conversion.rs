//! PEFT's conversion of other adapters to LoRA on a tiny Llama (`fixtures/lora/conversion/`, written by
//! `fixtures/lora/gen_conversion.py`): the adapter converted and saved here, loaded back as a LoRA, gives the
//! logits PEFT's converted adapter gives, and so does PEFT's converted file loaded here.

use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::tuners::lora::conversion::ConversionRank;
use peft::{ForwardCtx, PeftModel};
use peft_models::llama::{ForwardInput, LlamaConfig, LlamaForCausalLM};
use peft_test_support::{assert_close, max_diff};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn load_st(path: &Path) -> IndexMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn base(src: &Path) -> LlamaForCausalLM {
    let config = LlamaConfig::from_file(src.join("base_hf/config.json")).unwrap();
    let tensors = load_st(&src.join("base_hf/model.safetensors"));
    LlamaForCausalLM::from_tensors(config, tensors, &Device::Cpu).unwrap()
}

fn logits(pm: &PeftModel<LlamaForCausalLM>, ids: &Tensor) -> Tensor {
    pm.model()
        .forward(ForwardInput::ids(ids), &ForwardCtx::eval())
        .unwrap()
}

#[test]
fn converted_adapters_give_peft_logits_on_a_tiny_llama() {
    let root = fixtures().join("lora/conversion");
    let mut checked = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for dir in names {
        let case = dir.file_name().unwrap().to_string_lossy().to_string();
        let json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        if json.get("error").is_some() || json["model"] != "llama" {
            continue;
        }
        let src = fixtures().join(json["source"].as_str().unwrap());
        let rank = match json["rank"].as_u64() {
            Some(r) => ConversionRank::Fixed(r as usize),
            None => ConversionRank::Energy(json["rank"].as_f64().unwrap()),
        };
        let expected = load_st(&dir.join("expected.safetensors"));
        let ids = expected["model_input"].to_dtype(DType::U32).unwrap();
        let source =
            PeftModel::from_pretrained(base(&src), src.join("adapter"), "default", &Device::Cpu)
                .unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_close(
            &format!("{case}: source logits"),
            &logits(&source, &ids),
            &expected["source_logits"],
            1e-4,
            1e-4,
        );
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("as_lora");
        let converted = source.save_as_lora(&out, "default", rank).unwrap();
        assert!(!converted.tensors.is_empty());
        let lora = PeftModel::from_pretrained(base(&src), &out, "default", &Device::Cpu)
            .unwrap_or_else(|e| panic!("{case}: reloading the conversion: {e}"));
        assert_eq!(lora.configs()["default"].peft_type().as_str(), "LORA");
        let got = logits(&lora, &ids);
        assert_close(
            &format!("{case}: converted logits"),
            &got,
            &expected["logits"],
            1e-4,
            1e-4,
        );
        // PEFT's own converted file loads here and gives the same logits.
        let theirs =
            PeftModel::from_pretrained(base(&src), dir.join("adapter"), "default", &Device::Cpu)
                .unwrap_or_else(|e| panic!("{case}: PEFT's conversion: {e}"));
        assert_close(
            &format!("{case}: PEFT's converted file"),
            &logits(&theirs, &ids),
            &expected["logits"],
            1e-4,
            1e-4,
        );
        // The conversion is a real approximation where the rank truncates (not the source, not the base).
        let moved = max_diff(&got, &logits(&PeftModel::new(base(&src), 0), &ids));
        assert!(
            moved > 1e-3,
            "{case}: the converted adapter does nothing ({moved})"
        );
        checked.push(case);
    }
    assert!(checked.len() >= 11, "{checked:?}");
}
