//! PEANuT parity with PEFT 0.21.2 on the fixtures of `fixtures/peanut/` (written by `gen_peanut.py`, every weight
//! random and perturbed): per-layer forward (depth 0 relu, depth 2 gelu with a scaling, two active adapters of
//! different activations, a tiny Llama with gelu_new), disabled forward, merged weights (`W₀ + ΔW(W₀)`), PEFT's
//! unmerge, save → re-load, and `peft merge` without a model.

use crate::common::*;
use crate::lora_parity::load_case;
use candle_core::{DType, Device, Tensor};
use peft::PeftConfig;
use peft::io::peft_key;
use peft::layer::registry;

const CASES: [&str; 4] = [
    "peanut_deep_gelu",
    "peanut_linear",
    "peanut_llama",
    "peanut_two_adapters",
];

layer_method_parity_tests!(
    "peanut",
    CASES,
    "PEANUT",
    parity::MergeChecks {
        merged_weight: (1e-5, 1e-5),
        merged_forward: (1e-4, 1e-3),
        unmerged: (1e-5, 1e-5),
        unmerged_vs_base: (1e-5, 1e-5),
        min_change: Some(1e-2),
        ..Default::default()
    },
    |k| k.contains(".peanut_")
);

#[test]
fn peanut_missing_unexpected_and_misshapen_tensors_are_named() {
    let dir = fixtures_dir().join("peanut/cases/peanut_deep_gelu");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin0"].base();
    let params = &split.modules["lin0"];
    let mut missing = params.clone();
    missing.shift_remove("peanut_decoders.1.weight");
    let e = registry::build_adapter(config, "lin0", base, &missing).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::MissingKey(k) if k == "base_model.model.lin0.peanut_decoders.1.weight"),
        "{e}"
    );
    let mut extra = params.clone();
    extra.insert(
        "peanut_encoders.2.weight".into(),
        params["peanut_encoders.0.weight"].clone(),
    );
    let e = registry::build_adapter(config, "lin0", base, &extra).unwrap_err();
    assert!(
        e.to_string()
            .contains("base_model.model.lin0.peanut_encoders.2.weight"),
        "{e}"
    );
    // lin0 (16 -> 24), r = 4: peanut_A [4, 24]
    let mut wrong = params.clone();
    wrong.insert(
        "peanut_A.weight".into(),
        Tensor::zeros((4, 16), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = registry::build_adapter(config, "lin0", base, &wrong).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::ShapeMismatch { name, expected, got } if name == &peft_key("lin0", "peanut_A.weight") && expected == &[4, 24] && got == &[4, 16]),
        "{e}"
    );
    let emb = peft::BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let e = registry::new_adapter(config, "emb", &emb, &mut peft::PeftRng::new(0)).unwrap_err();
    assert!(matches!(e, peft::PeftError::Unsupported { .. }), "{e}");
    for bad in [
        r#"{"peft_type": "PEANUT", "r": 0}"#,
        r#"{"peft_type": "PEANUT", "act_fn": "relu7"}"#,
        r#"{"peft_type": "PEANUT", "layers_pattern": "layers"}"#,
    ] {
        let e = PeftConfig::from_json_str(bad)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(matches!(e, peft::PeftError::InvalidConfig(_)), "{bad}: {e}");
    }
    let e = PeftConfig::from_json_str(r#"{"peft_type": "PEANUT", "act_fn": "prelu"}"#)
        .unwrap()
        .validate()
        .unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::Unsupported { field, .. } if field == "act_fn"),
        "{e}"
    );
    assert!(PeftConfig::from_json_str(r#"{"peft_type": "PEANUT", "depth": -1}"#).is_err());
}

#[test]
fn peanut_new_adapter_starts_as_the_identity() {
    for case in ["peanut_linear", "peanut_deep_gelu", "peanut_llama"] {
        let dir = fixtures_dir().join("peanut/cases").join(case);
        let c = load_case(&dir);
        let (_, config, _, _) = &c.adapters[0];
        let mut v = serde_json::to_value(config).unwrap();
        v["init_weights"] = serde_json::Value::Bool(true);
        let identity = PeftConfig::from_json_str(&v.to_string()).unwrap();
        parity::assert_new_adapter_is_identity(&dir, &c, &identity);
    }
}
