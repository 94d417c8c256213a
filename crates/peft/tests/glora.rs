//! GLoRA parity with PEFT 0.21.2 on the fixtures of `fixtures/glora/` (written by `gen_glora.py`, every term
//! random and perturbed): per-layer forward (the default lora/lora/constant paths, vectors, constants with
//! empty C/D/E, a layer without a bias, two active adapters of different paths, a tiny Llama with biases),
//! disabled forward, merged weight and bias (`W₀ + W₀ ⊙ A + B`, `b₀ + b₀ ⊙ D + E + W₀·C`), PEFT's unmerge,
//! save → re-load (the `zeros` buffers of empty paths included, as PEFT saves them), and `peft merge` without a
//! model.

use crate::common::*;
use crate::lora_parity::load_case;
use candle_core::{DType, Device, Tensor};
use peft::PeftConfig;
use peft::io::peft_key;
use peft::layer::registry;

const CASES: [&str; 5] = [
    "glora_constant_none",
    "glora_default",
    "glora_llama",
    "glora_two_adapters",
    "glora_vectors",
];

layer_method_parity_tests!(
    "glora",
    CASES,
    "GLORA",
    parity::MergeChecks {
        merged_weight: (1e-5, 1e-5),
        merged_bias: (1e-5, 1e-5),
        merged_forward: (1e-4, 1e-3),
        unmerged: (1e-5, 1e-4),
        unmerged_bias: Some((1e-5, 1e-4)),
        unmerged_vs_base: (1e-5, 1e-5),
        min_change: Some(1e-2),
        ..Default::default()
    },
    |k| k.contains(".glora_")
);

#[test]
fn glora_missing_unexpected_and_misshapen_tensors_are_named() {
    let dir = fixtures_dir().join("glora/cases/glora_default");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin0"].base();
    let params = &split.modules["lin0"];
    let mut missing = params.clone();
    missing.shift_remove("glora_C.Xu");
    let e = registry::build_adapter(config, "lin0", base, &missing).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::MissingKey(k) if k == "base_model.model.lin0.glora_C.Xu"),
        "{e}"
    );
    let mut extra = params.clone();
    extra.insert(
        "glora_E.zeros".into(),
        Tensor::zeros(24, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = registry::build_adapter(config, "lin0", base, &extra).unwrap_err();
    assert!(
        e.to_string()
            .contains("base_model.model.lin0.glora_E.zeros"),
        "{e}"
    );
    // lin0 (16 -> 24), r = 4: glora_A.Xd [24, 4]
    let mut wrong = params.clone();
    wrong.insert(
        "glora_A.Xd".into(),
        Tensor::zeros((16, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = registry::build_adapter(config, "lin0", base, &wrong).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::ShapeMismatch { name, expected, got } if name == &peft_key("lin0", "glora_A.Xd") && expected == &[24, 4] && got == &[16, 4]),
        "{e}"
    );
    // a layer without a bias has empty C, D, E: the bias terms of a biased layer are unexpected there
    let no_bias = peft::BaseLayer::linear(base.weight().unwrap(), None).unwrap();
    let e = registry::build_adapter(config, "lin0", &no_bias, params).unwrap_err();
    assert!(e.to_string().contains("glora_C.zeros"), "{e}");
    let emb = peft::BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let e = registry::new_adapter(config, "emb", &emb, &mut peft::PeftRng::new(0)).unwrap_err();
    assert!(matches!(e, peft::PeftError::Unsupported { .. }), "{e}");
    for bad in [
        r#"{"peft_type": "GLORA", "config_C": "constant"}"#,
        r#"{"peft_type": "GLORA", "config_D_E": "lora"}"#,
        r#"{"peft_type": "GLORA", "r": 0}"#,
    ] {
        let e = PeftConfig::from_json_str(bad)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(matches!(e, peft::PeftError::InvalidConfig(_)), "{bad}: {e}");
    }
    let e = PeftConfig::from_json_str(r#"{"peft_type": "GLORA", "bias": "all"}"#)
        .unwrap()
        .validate()
        .unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::Unsupported { field, .. } if field == "bias"),
        "{e}"
    );
    assert!(PeftConfig::from_json_str(r#"{"peft_type": "GLORA", "config_A_B": "dense"}"#).is_err());
}

#[test]
fn glora_new_adapter_starts_as_the_identity() {
    for case in [
        "glora_default",
        "glora_vectors",
        "glora_constant_none",
        "glora_llama",
    ] {
        let dir = fixtures_dir().join("glora/cases").join(case);
        let c = load_case(&dir);
        let (_, config, _, _) = &c.adapters[0];
        let mut v = serde_json::to_value(config).unwrap();
        v["init_weights"] = serde_json::Value::Bool(true);
        let identity = PeftConfig::from_json_str(&v.to_string()).unwrap();
        parity::assert_new_adapter_is_identity(&dir, &c, &identity);
    }
}
