//! C3A parity with PEFT 0.21.2 on the fixtures of `fixtures/c3a/` (written by `gen_c3a.py`, every kernel random
//! and perturbed): per-layer forward (PEFT's FFT circular convolution, block sizes by pattern, a tiny Llama),
//! disabled forward, merged weights (`W + ΔW`), unmerge, save → re-load, and `peft merge` without a model.

use crate::common::*;
use crate::lora_parity::load_case;
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::PeftConfig;
use peft::io::peft_key;
use peft::layer::registry;

const CASES: [&str; 3] = ["c3a_linear", "c3a_llama", "c3a_pattern"];

layer_method_parity_tests!(
    "c3a",
    CASES,
    "C3A",
    parity::MergeChecks {
        merged_bias: (1e-6, 1e-5),
        merged_forward: (1e-4, 1e-3),
        unmerged_bias: Some((1e-6, 1e-5)),
        unmerged_vs_base: (1e-5, 1e-4),
        ..Default::default()
    },
    |k| k.ends_with(".c3a_kernel")
);

#[test]
fn c3a_missing_unexpected_and_misshapen_tensors_are_named() {
    let dir = fixtures_dir().join("c3a/cases/c3a_pattern");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin0"].base();
    let params = &split.modules["lin0"];
    let e = registry::build_adapter(config, "lin0", base, &IndexMap::new()).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::MissingKey(k) if k == "base_model.model.lin0.c3a_kernel"),
        "{e}"
    );
    let mut extra = params.clone();
    extra.insert("c3a_other".into(), params["c3a_kernel"].clone());
    let e = registry::build_adapter(config, "lin0", base, &extra).unwrap_err();
    assert!(
        e.to_string().contains("base_model.model.lin0.c3a_other"),
        "{e}"
    );
    // lin0 (16 -> 24) takes block size 8 from the pattern: [3, 2, 8]
    let mut wrong = params.clone();
    wrong.insert(
        "c3a_kernel".into(),
        Tensor::zeros((6, 4, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = registry::build_adapter(config, "lin0", base, &wrong).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::ShapeMismatch { name, expected, got } if name == &peft_key("lin0", "c3a_kernel") && expected == &[3, 2, 8] && got == &[6, 4, 4]),
        "{e}"
    );
    let PeftConfig::C3a(cfg) = config else {
        panic!("not C3A")
    };
    assert_eq!(cfg.block_size_for("lin0").unwrap(), 8);
    assert_eq!(cfg.block_size_for("model.lin0").unwrap(), 8);
    assert_eq!(cfg.block_size_for("lin1").unwrap(), 4);
    assert_eq!(cfg.block_size_for("xlin0").unwrap(), 4);
    // a block size that does not divide the layer
    let bad = PeftConfig::from_json_str(r#"{"peft_type": "C3A", "block_size": 5}"#).unwrap();
    let e = registry::new_adapter(&bad, "lin0", base, &mut peft::PeftRng::new(0)).unwrap_err();
    assert!(e.to_string().contains("block size"), "{e}");
    let emb = peft::BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let e = registry::new_adapter(config, "emb", &emb, &mut peft::PeftRng::new(0)).unwrap_err();
    assert!(matches!(e, peft::PeftError::Unsupported { .. }), "{e}");
    for bad in [
        r#"{"peft_type": "C3A", "init_weights": "orthogonal"}"#,
        r#"{"peft_type": "C3A", "bias": "all"}"#,
    ] {
        assert!(
            PeftConfig::from_json_str(bad).unwrap().validate().is_err(),
            "{bad}"
        );
    }
}

#[test]
fn c3a_new_adapter_with_init_true_is_the_identity() {
    let dir = fixtures_dir().join("c3a/cases/c3a_linear");
    let c = load_case(&dir);
    let (_, config, _, _) = &c.adapters[0];
    let PeftConfig::C3a(cfg) = config else {
        panic!("not C3A")
    };
    let identity: PeftConfig = peft::config::C3aConfig {
        init_weights: peft::tuners::c3a::config::C3aInit::Bool(true),
        ..cfg.clone()
    }
    .into();
    parity::assert_new_adapter_is_identity(&dir, &c, &identity);
}
