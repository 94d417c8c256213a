//! RoAd parity with PEFT 0.21.2 on the fixtures of `fixtures/road/` (written by `gen_road.py`, every angle and
//! scale random and perturbed): per-layer forward (road_1, road_2 with two active adapters, road_4 on a tiny
//! Llama), disabled forward, merged weights and bias (`R·W`, `R·b`), PEFT's unmerge (`R⁻¹`), save → re-load,
//! and `peft merge` without a model.

use crate::common::*;
use crate::lora_parity::load_case;
use candle_core::{DType, Device, Tensor};
use peft::PeftConfig;
use peft::io::peft_key;
use peft::layer::registry;

const CASES: [&str; 3] = ["road_1_linear", "road_2_two_adapters", "road_4_llama"];

layer_method_parity_tests!(
    "road",
    CASES,
    "ROAD",
    parity::MergeChecks {
        merged_bias: (1e-6, 1e-5),
        merged_forward: (1e-4, 1e-3),
        // both unmerges invert R, an ill-conditioned map where a scale is near 0 (α ~ N(1, 0.5)): the standard
        // f32 tolerance against PEFT's own torch.linalg.inv result
        unmerged: (1e-5, 1e-4),
        unmerged_bias: Some((1e-5, 1e-4)),
        unmerged_vs_base: (1e-5, 1e-4),
        ..Default::default()
    },
    |k| { k.ends_with(".road_theta") || k.ends_with(".road_alpha") }
);

#[test]
fn road_missing_unexpected_and_misshapen_tensors_are_named() {
    let dir = fixtures_dir().join("road/cases/road_1_linear");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin0"].base();
    let params = &split.modules["lin0"];
    let mut missing = params.clone();
    missing.shift_remove("road_alpha");
    let e = registry::build_adapter(config, "lin0", base, &missing).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::MissingKey(k) if k == "base_model.model.lin0.road_alpha"),
        "{e}"
    );
    let mut extra = params.clone();
    extra.insert("road_beta".into(), params["road_theta"].clone());
    let e = registry::build_adapter(config, "lin0", base, &extra).unwrap_err();
    assert!(
        e.to_string().contains("base_model.model.lin0.road_beta"),
        "{e}"
    );
    // road_1 on lin0 (24 outputs): 12 angles
    let mut wrong = params.clone();
    wrong.insert(
        "road_theta".into(),
        Tensor::zeros(24, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = registry::build_adapter(config, "lin0", base, &wrong).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::ShapeMismatch { name, expected, got } if name == &peft_key("lin0", "road_theta") && expected == &[12] && got == &[24]),
        "{e}"
    );
    let emb = peft::BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let e = registry::new_adapter(config, "emb", &emb, &mut peft::PeftRng::new(0)).unwrap_err();
    assert!(matches!(e, peft::PeftError::Unsupported { .. }), "{e}");
    for bad in [
        r#"{"peft_type": "ROAD", "variant": "road_3"}"#,
        r#"{"peft_type": "ROAD", "group_size": 5}"#,
    ] {
        let e = PeftConfig::from_json_str(bad)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(matches!(e, peft::PeftError::InvalidConfig(_)), "{bad}: {e}");
    }
}

#[test]
fn road_new_adapter_starts_as_the_identity() {
    let dir = fixtures_dir().join("road/cases/road_1_linear");
    let c = load_case(&dir);
    let (_, config, _, _) = &c.adapters[0];
    let PeftConfig::Road(cfg) = config else {
        panic!("not RoAd")
    };
    let identity: PeftConfig = peft::config::RoadConfig {
        init_weights: true,
        ..cfg.clone()
    }
    .into();
    parity::assert_new_adapter_is_identity(&dir, &c, &identity);
}
