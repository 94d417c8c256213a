//! HRA parity with PEFT 0.21.2 on the fixtures of `fixtures/hra/` (written by `gen_hra.py`, every `hra_u`
//! perturbed): per-layer forward (Householder chain and Gram–Schmidt, Linear with bias, tiny Llama), disabled
//! forward, merged weights (`W·H`), PEFT's unmerge (`W·H⁻¹`), save → re-load, and `peft merge` without a
//! model.

use crate::common::*;
use crate::lora_parity::load_case;
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::PeftConfig;
use peft::io::peft_key;
use peft::layer::registry;

const CASES: [&str; 3] = ["hra_gs", "hra_linear", "hra_llama"];

layer_method_parity_tests!(
    "hra",
    CASES,
    "HRA",
    parity::MergeChecks {
        merged_bias: (1e-6, 1e-5),
        merged_forward: (1e-4, 1e-3),
        unmerged_bias: Some((1e-6, 1e-5)),
        unmerged_vs_base: (1e-5, 1e-4),
        ..Default::default()
    },
    |k| k.ends_with(".hra_u")
);

#[test]
fn hra_missing_unexpected_and_misshapen_tensors_are_named() {
    let dir = fixtures_dir().join("hra/cases/hra_linear");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin0"].base();
    let params = &split.modules["lin0"];
    let e = registry::build_adapter(config, "lin0", base, &IndexMap::new()).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::MissingKey(k) if k == "base_model.model.lin0.hra_u"),
        "{e}"
    );
    let mut extra = params.clone();
    extra.insert("hra_u.weight".into(), params["hra_u"].clone());
    let e = registry::build_adapter(config, "lin0", base, &extra).unwrap_err();
    assert!(
        e.to_string().contains("base_model.model.lin0.hra_u.weight"),
        "{e}"
    );
    let n = base.in_features();
    let mut wrong = params.clone();
    wrong.insert(
        "hra_u".into(),
        Tensor::ones((4, n), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = registry::build_adapter(config, "lin0", base, &wrong).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::ShapeMismatch { name, expected, got } if name == &peft_key("lin0", "hra_u") && expected == &[n, 4] && got == &[4, n]),
        "{e}"
    );
    // HRA wraps Linear layers only here
    let emb = peft::BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let e = registry::new_adapter(config, "emb", &emb, &mut peft::PeftRng::new(0)).unwrap_err();
    assert!(matches!(e, peft::PeftError::Unsupported { .. }), "{e}");
    // bias other than "none" is refused by name
    let e = PeftConfig::from_json_str(r#"{"peft_type": "HRA", "bias": "hra_only"}"#)
        .unwrap()
        .validate()
        .unwrap_err();
    assert!(e.to_string().contains("bias"), "{e}");
}

#[test]
fn hra_new_adapter_starts_as_the_identity() {
    let dir = fixtures_dir().join("hra/cases/hra_linear");
    let c = load_case(&dir);
    let (_, config, _, _) = &c.adapters[0];
    for (m, slot) in &c.slots {
        let a = registry::new_adapter(config, m, slot.base(), &mut peft::PeftRng::new(1)).unwrap();
        assert_eq!(a.tensors()[0].1.dims(), &[slot.base().in_features(), 4]);
    }
    parity::assert_new_adapter_is_identity(&dir, &c, config);
}
