//! MiSS parity with PEFT 0.21.2 on the fixtures of `fixtures/miss/` (written by `gen_miss.py`, every block
//! perturbed): per-layer forward (the default form, with and without padding, "mini", "bat", two active
//! adapters, a tiny Llama), disabled forward, merged weights, PEFT's unmerge ("bat": `(W − B)(I + B)⁻¹`),
//! save → re-load, and `peft merge` without a model.

use crate::common::*;
use crate::lora_parity::load_case;
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::PeftConfig;
use peft::io::peft_key;
use peft::layer::registry;

const CASES: [&str; 6] = [
    "miss_bat",
    "miss_linear",
    "miss_llama",
    "miss_mini",
    "miss_pad",
    "miss_two_adapters",
];

layer_method_parity_tests!(
    "miss",
    CASES,
    "MISS",
    parity::MergeChecks {
        merged_bias: (1e-6, 1e-5),
        merged_forward: (1e-4, 1e-3),
        unmerged: (1e-5, 1e-4),
        unmerged_bias: Some((1e-6, 1e-5)),
        unmerged_vs_base: (1e-5, 1e-4),
        ..Default::default()
    },
    |k| k.ends_with(".miss_block")
);

#[test]
fn miss_missing_unexpected_and_misshapen_tensors_are_named() {
    let dir = fixtures_dir().join("miss/cases/miss_bat");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin0"].base();
    let params = &split.modules["lin0"];
    let e = registry::build_adapter(config, "lin0", base, &IndexMap::new()).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::MissingKey(k) if k == "base_model.model.lin0.miss_block"),
        "{e}"
    );
    let mut extra = params.clone();
    extra.insert("miss_other".into(), params["miss_block"].clone());
    let e = registry::build_adapter(config, "lin0", base, &extra).unwrap_err();
    assert!(
        e.to_string().contains("base_model.model.lin0.miss_other"),
        "{e}"
    );
    // "bat" on lin0 [24, 16], r=4: [6, 4, 4]; the default form's [4, 24] is refused
    let mut wrong = params.clone();
    wrong.insert(
        "miss_block".into(),
        Tensor::zeros((4, 24), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = registry::build_adapter(config, "lin0", base, &wrong).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::ShapeMismatch { name, expected, got } if name == &peft_key("lin0", "miss_block") && expected == &[6, 4, 4] && got == &[4, 24]),
        "{e}"
    );
    // "bat" needs r to divide both dimensions
    let bad: PeftConfig = PeftConfig::from_json_str(
        r#"{"peft_type": "MISS", "r": 5, "init_weights": "bat", "target_modules": ["lin0"]}"#,
    )
    .unwrap();
    let e = registry::new_adapter(&bad, "lin0", base, &mut peft::PeftRng::new(0)).unwrap_err();
    assert!(e.to_string().contains("[r, r]"), "{e}");
    let emb = peft::BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let e = registry::new_adapter(config, "emb", &emb, &mut peft::PeftRng::new(0)).unwrap_err();
    assert!(matches!(e, peft::PeftError::Unsupported { .. }), "{e}");
    for bad in [
        r#"{"peft_type": "MISS", "init_weights": "lycoris"}"#,
        r#"{"peft_type": "MISS", "bias": "all"}"#,
    ] {
        assert!(
            PeftConfig::from_json_str(bad).unwrap().validate().is_err(),
            "{bad}"
        );
    }
}

#[test]
fn miss_new_adapter_starts_as_the_identity() {
    for case in ["miss_bat", "miss_mini"] {
        let dir = fixtures_dir().join("miss/cases").join(case);
        let c = load_case(&dir);
        let (_, config, _, _) = &c.adapters[0];
        parity::assert_new_adapter_is_identity(&dir, &c, config);
    }
}
