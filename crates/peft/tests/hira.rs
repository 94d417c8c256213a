//! HiRA parity with PEFT 0.21.2 on the fixtures of `fixtures/hira/` (written by `gen_hira.py`, every `A` and `B`
//! random and perturbed): per-layer forward (Linear with bias, two active adapters with a rank pattern, an
//! Embedding, two Conv2d layers, GPT-2 Conv1D, a tiny Llama), disabled forward, merged weights
//! (`W₀ ⊙ (1 + Σ BᵢAᵢ)`, the bias unchanged), PEFT's unmerge, save → re-load, and `peft merge` without a model.

use crate::common::*;
use crate::lora_parity::load_case;
use candle_core::{DType, Device, Tensor};
use peft::PeftConfig;
use peft::io::peft_key;
use peft::layer::registry;

const CASES: [&str; 6] = [
    "hira_conv",
    "hira_conv1d",
    "hira_embedding",
    "hira_linear",
    "hira_llama",
    "hira_two_adapters",
];

layer_method_parity_tests!(
    "hira",
    CASES,
    "HIRA",
    parity::MergeChecks {
        merged_weight: (1e-5, 1e-5),
        merged_forward: (1e-4, 1e-3),
        unmerged: (1e-5, 1e-5),
        unmerged_vs_base: (1e-5, 1e-5),
        min_change: Some(1e-2),
        ..Default::default()
    },
    |k| {
        k.ends_with(".hira_A")
            || k.ends_with(".hira_B")
            || k.ends_with(".hira_embedding_A")
            || k.ends_with(".hira_embedding_B")
    }
);

#[test]
fn hira_missing_unexpected_and_misshapen_tensors_are_named() {
    let dir = fixtures_dir().join("hira/cases/hira_linear");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin0"].base();
    let params = &split.modules["lin0"];
    let mut missing = params.clone();
    missing.shift_remove("hira_B");
    let e = registry::build_adapter(config, "lin0", base, &missing).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::MissingKey(k) if k == "base_model.model.lin0.hira_B"),
        "{e}"
    );
    let mut extra = params.clone();
    extra.insert("hira_C".into(), params["hira_A"].clone());
    let e = registry::build_adapter(config, "lin0", base, &extra).unwrap_err();
    assert!(
        e.to_string().contains("base_model.model.lin0.hira_C"),
        "{e}"
    );
    // lin0 (16 -> 24), r = 4: hira_A [4, 16]
    let mut wrong = params.clone();
    wrong.insert(
        "hira_A".into(),
        Tensor::zeros((4, 24), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = registry::build_adapter(config, "lin0", base, &wrong).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::ShapeMismatch { name, expected, got } if name == &peft_key("lin0", "hira_A") && expected == &[4, 16] && got == &[4, 24]),
        "{e}"
    );
    // a Linear's tensors on an embedding: the embedding keys are missing
    let emb = peft::BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let e = registry::build_adapter(config, "emb", &emb, params).unwrap_err();
    assert!(e.to_string().contains("hira_embedding_A"), "{e}");
    let grouped = peft::BaseLayer::conv2d(
        Tensor::zeros((4, 2, 3, 3), DType::F32, &Device::Cpu).unwrap(),
        None,
        peft::layer::Conv2dSpec {
            groups: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let e =
        registry::new_adapter(config, "conv", &grouped, &mut peft::PeftRng::new(0)).unwrap_err();
    assert!(matches!(e, peft::PeftError::Unsupported { .. }), "{e}");
    // PEFT 0.21.2 creates a layer with `r` whatever rank_pattern says: a new adapter it would change is refused
    let patterned = PeftConfig::from_json_str(
        r#"{"peft_type": "HIRA", "r": 4, "rank_pattern": {"lin0": 2}, "target_modules": ["lin0"]}"#,
    )
    .unwrap();
    let e =
        registry::new_adapter(&patterned, "lin0", base, &mut peft::PeftRng::new(0)).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::Unsupported { field, .. } if field == "rank_pattern"),
        "{e}"
    );
    assert!(
        registry::new_adapter(
            &patterned,
            "lin1",
            c.slots["lin1"].base(),
            &mut peft::PeftRng::new(0)
        )
        .is_ok()
    );
    for bad in [
        r#"{"peft_type": "HIRA", "r": 0}"#,
        r#"{"peft_type": "HIRA", "rank_pattern": {"q_proj": 0}}"#,
        r#"{"peft_type": "HIRA", "init_weights": "pissa"}"#,
        r#"{"peft_type": "HIRA", "hira_dropout": 1.5}"#,
    ] {
        let e = PeftConfig::from_json_str(bad)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(matches!(e, peft::PeftError::InvalidConfig(_)), "{bad}: {e}");
    }
}

#[test]
fn hira_new_adapter_starts_as_the_identity() {
    for (case, init) in [
        ("hira_linear", "true"),
        ("hira_linear", "\"gaussian\""),
        ("hira_embedding", "true"),
        ("hira_conv", "\"gaussian\""),
        ("hira_conv1d", "true"),
    ] {
        let dir = fixtures_dir().join("hira/cases").join(case);
        let c = load_case(&dir);
        let (_, config, _, _) = &c.adapters[0];
        let mut v = serde_json::to_value(config).unwrap();
        v["init_weights"] = serde_json::from_str(init).unwrap();
        let identity = PeftConfig::from_json_str(&v.to_string()).unwrap();
        parity::assert_new_adapter_is_identity(&dir, &c, &identity);
    }
}
