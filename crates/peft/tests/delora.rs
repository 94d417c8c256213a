//! DeLoRA parity with PEFT 0.21.2 on the fixtures of `fixtures/delora/` (written by `gen_delora.py`, every
//! parameter random and perturbed): per-layer forward (rank and lambda patterns, two active adapters, a tiny
//! Llama), disabled forward, merged weights (`W + ΔW`), unmerge, save → re-load (the `delora_w_norm` buffer
//! included), and `peft merge` without a model.

use crate::common::*;
use crate::lora_parity::load_case;
use candle_core::{DType, Device, Tensor};
use peft::PeftConfig;
use peft::io::peft_key;
use peft::layer::registry;

const CASES: [&str; 4] = [
    "delora_linear",
    "delora_llama",
    "delora_patterns",
    "delora_two_adapters",
];

layer_method_parity_tests!(
    "delora",
    CASES,
    "DELORA",
    parity::MergeChecks {
        merged_bias: (1e-6, 1e-5),
        merged_forward: (1e-4, 1e-3),
        unmerged_bias: Some((1e-6, 1e-5)),
        unmerged_vs_base: (1e-5, 1e-4),
        ..Default::default()
    },
    |k| k.contains(".delora_")
);

#[test]
fn delora_missing_unexpected_and_misshapen_tensors_are_named() {
    let dir = fixtures_dir().join("delora/cases/delora_patterns");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin1"].base();
    let params = &split.modules["lin1"];
    let mut missing = params.clone();
    missing.shift_remove("delora_lambda");
    let e = registry::build_adapter(config, "lin1", base, &missing).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::MissingKey(k) if k == "base_model.model.lin1.delora_lambda"),
        "{e}"
    );
    let mut extra = params.clone();
    extra.insert("delora_C".into(), params["delora_A"].clone());
    let e = registry::build_adapter(config, "lin1", base, &extra).unwrap_err();
    assert!(
        e.to_string().contains("base_model.model.lin1.delora_C"),
        "{e}"
    );
    // rank_pattern gives lin1 rank 2: a rank-4 A is refused
    let mut wrong = params.clone();
    wrong.insert(
        "delora_A".into(),
        Tensor::zeros((4, 24), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = registry::build_adapter(config, "lin1", base, &wrong).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::ShapeMismatch { name, expected, got } if name == &peft_key("lin1", "delora_A") && expected == &[2, 24] && got == &[4, 24]),
        "{e}"
    );
    // a file without the w_norm buffer gets the base's column norms, as PEFT's layer creation computes them
    let mut no_norm = params.clone();
    no_norm.shift_remove("delora_w_norm");
    let a = registry::build_adapter(config, "lin1", base, &no_norm).unwrap();
    let from_file = registry::build_adapter(config, "lin1", base, params).unwrap();
    let (n1, n2) = (&a.tensors()[3].1, &from_file.tensors()[3].1);
    assert_close("w_norm", n1, n2, 1e-6, 1e-5);
    let emb = peft::BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let e = registry::new_adapter(config, "emb", &emb, &mut peft::PeftRng::new(0)).unwrap_err();
    assert!(matches!(e, peft::PeftError::Unsupported { .. }), "{e}");
    let e = PeftConfig::from_json_str(r#"{"peft_type": "DELORA", "bias": "all"}"#)
        .unwrap()
        .validate()
        .unwrap_err();
    assert!(e.to_string().contains("bias"), "{e}");
}

#[test]
fn delora_new_adapter_starts_as_the_identity() {
    let dir = fixtures_dir().join("delora/cases/delora_linear");
    let c = load_case(&dir);
    let (_, config, _, _) = &c.adapters[0];
    let PeftConfig::Delora(cfg) = config else {
        panic!("not DeLoRA")
    };
    let identity: PeftConfig = peft::config::DeloraConfig {
        init_weights: true,
        ..cfg.clone()
    }
    .into();
    parity::assert_new_adapter_is_identity(&dir, &c, &identity);
}
