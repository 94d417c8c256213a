//! BEFT parity with PEFT 0.21.2 on the fixtures of `fixtures/beft/` (written by `gen_beft.py`, every bias random
//! and perturbed): per-layer forward (one adapter, two active adapters whose biases add, a tiny Llama with
//! biases), disabled forward, merged bias (the weight unchanged), PEFT's unmerge, save → re-load, and `peft merge`
//! without a model; a base without a bias refuses the merge as PEFT does.

use crate::common::*;
use crate::lora_parity::load_case;
use candle_core::{DType, Device, Tensor};
use peft::io::peft_key;
use peft::layer::registry;

const CASES: [&str; 3] = ["beft_linear", "beft_llama", "beft_two_adapters"];

layer_method_parity_tests!(
    "beft",
    CASES,
    "BEFT",
    parity::MergeChecks {
        merged_weight: (0.0, 0.0),
        merged_bias: (1e-6, 1e-5),
        merged_forward: (1e-5, 1e-4),
        unmerged_bias: Some((1e-6, 1e-5)),
        ..Default::default()
    },
    |k| k.ends_with(".beft_bias")
);

#[test]
fn beft_missing_unexpected_misshapen_and_unmergeable_are_named() {
    let dir = fixtures_dir().join("beft/cases/beft_linear");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin0"].base();
    let params = &split.modules["lin0"];
    let e = registry::build_adapter(config, "lin0", base, &indexmap::IndexMap::new()).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::MissingKey(k) if k == "base_model.model.lin0.beft_bias"),
        "{e}"
    );
    let mut extra = params.clone();
    extra.insert("beft_scale".into(), params["beft_bias"].clone());
    let e = registry::build_adapter(config, "lin0", base, &extra).unwrap_err();
    assert!(
        e.to_string().contains("base_model.model.lin0.beft_scale"),
        "{e}"
    );
    // lin0 has 24 outputs: [1, 24]
    let mut wrong = params.clone();
    wrong.insert(
        "beft_bias".into(),
        Tensor::zeros(24, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = registry::build_adapter(config, "lin0", base, &wrong).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::ShapeMismatch { name, expected, got } if name == &peft_key("lin0", "beft_bias") && expected == &[1, 24] && got == &[24]),
        "{e}"
    );
    let emb = peft::BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let e = registry::new_adapter(config, "emb", &emb, &mut peft::PeftRng::new(0)).unwrap_err();
    assert!(matches!(e, peft::PeftError::Unsupported { .. }), "{e}");
    // a Linear without a bias: the forward adds the bias, the merge is refused (PEFT's ValueError)
    let w = base.weight().unwrap();
    let no_bias = peft::BaseLayer::linear(w, None).unwrap();
    let a = registry::build_adapter(config, "lin0", &no_bias, params).unwrap();
    let mut slot = peft::AdapterSlot::new("lin0", no_bias);
    slot.add_adapter("default", a).unwrap();
    let e = slot.merge(None).unwrap_err();
    assert!(e.to_string().contains("no bias"), "{e}");
    assert!(slot.merged().is_empty());
}

#[test]
fn beft_new_adapter_starts_as_the_identity() {
    let dir = fixtures_dir().join("beft/cases/beft_llama");
    let c = load_case(&dir);
    let identity = peft::PeftConfig::from_json_str(
        r#"{"peft_type": "BEFT", "target_modules": ["q_proj", "v_proj", "down_proj"]}"#,
    )
    .unwrap();
    parity::assert_new_adapter_is_identity(&dir, &c, &identity);
}

#[test]
fn beft_default_targets_are_peft_s_table() {
    let config = peft::PeftConfig::from_json_str(r#"{"peft_type": "BEFT"}"#).unwrap();
    let m = config.method();
    assert_eq!(
        m.default_target_modules("llama"),
        Some(peft::config::TargetModules::from(["v_proj"]))
    );
    assert_eq!(
        m.default_target_modules("roberta"),
        Some(peft::config::TargetModules::from(["value"]))
    );
    assert_eq!(m.default_target_modules("gpt2"), None);
}
