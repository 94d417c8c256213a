//! GraLoRA parity with PEFT 0.21.2 on the fixtures of `fixtures/gralora/` (written by `gen_gralora.py`, every
//! parameter random and perturbed): per-layer forward (k = 2 and 4, the hybrid LoRA, a tiny Llama), disabled
//! forward, merged weights (`W + ΔW`), unmerge, save → re-load, and `peft merge` without a model.

use crate::common::*;
use crate::lora_parity::load_case;
use candle_core::{DType, Device, Tensor};
use peft::PeftConfig;
use peft::io::peft_key;
use peft::layer::registry;

const CASES: [&str; 3] = ["gralora_hybrid", "gralora_linear", "gralora_llama"];

layer_method_parity_tests!(
    "gralora",
    CASES,
    "GRALORA",
    parity::MergeChecks {
        merged_bias: (1e-6, 1e-5),
        merged_forward: (1e-4, 1e-3),
        unmerged_bias: Some((1e-6, 1e-5)),
        unmerged_vs_base: (1e-5, 1e-4),
        ..Default::default()
    },
    |k| k.contains(".gralora_")
);

#[test]
fn gralora_missing_unexpected_and_misshapen_tensors_are_named() {
    let dir = fixtures_dir().join("gralora/cases/gralora_hybrid");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin0"].base();
    let params = &split.modules["lin0"];
    let mut missing = params.clone();
    missing.shift_remove("gralora_B_general.weight");
    let e = registry::build_adapter(config, "lin0", base, &missing).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::MissingKey(k) if k == "base_model.model.lin0.gralora_B_general.weight"),
        "{e}"
    );
    let mut extra = params.clone();
    extra.insert("gralora_C".into(), params["gralora_A"].clone());
    let e = registry::build_adapter(config, "lin0", base, &extra).unwrap_err();
    assert!(
        e.to_string().contains("base_model.model.lin0.gralora_C"),
        "{e}"
    );
    // k=4, r=8 on lin0 (16 -> 24): A is [4, 4, 8]
    let mut wrong = params.clone();
    wrong.insert(
        "gralora_A".into(),
        Tensor::zeros((4, 8, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = registry::build_adapter(config, "lin0", base, &wrong).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::ShapeMismatch { name, expected, got } if name == &peft_key("lin0", "gralora_A") && expected == &[4, 4, 8] && got == &[4, 8, 4]),
        "{e}"
    );
    let emb = peft::BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let e = registry::new_adapter(config, "emb", &emb, &mut peft::PeftRng::new(0)).unwrap_err();
    assert!(matches!(e, peft::PeftError::Unsupported { .. }), "{e}");
    for bad in [
        r#"{"peft_type": "GRALORA", "r": 5, "gralora_k": 2}"#,
        r#"{"peft_type": "GRALORA", "fan_in_fan_out": true}"#,
        r#"{"peft_type": "GRALORA", "bias": "all"}"#,
    ] {
        assert!(
            PeftConfig::from_json_str(bad).unwrap().validate().is_err(),
            "{bad}"
        );
    }
}

#[test]
fn gralora_new_adapter_starts_as_the_identity() {
    let dir = fixtures_dir().join("gralora/cases/gralora_hybrid");
    let c = load_case(&dir);
    let (_, config, _, _) = &c.adapters[0];
    let PeftConfig::Gralora(cfg) = config else {
        panic!("not GraLoRA")
    };
    let identity: PeftConfig = peft::config::GraloraConfig {
        init_weights: true,
        ..cfg.clone()
    }
    .into();
    parity::assert_new_adapter_is_identity(&dir, &c, &identity);
}
