//! SuperTuning parity with PEFT 0.21.2 on the fixtures of `fixtures/supertuning/` (written by
//! `gen_supertuning.py`, every value and LoRA weight random and perturbed): per-layer forward (the largest 10%
//! of entries; the smallest 5% with a LoRA; indices not saved but recomputed from the base weight, two active
//! adapters; a tiny Llama), disabled forward, merged weights (`W + ΔW`), unmerge, save → re-load (int32 indices
//! kept), and `peft merge` without a model.

use crate::common::*;
use crate::lora_parity::load_case;
use candle_core::{DType, Device, Tensor};
use peft::PeftConfig;
use peft::io::peft_key;
use peft::layer::registry;

const CASES: [&str; 4] = [
    "supertuning_linear",
    "supertuning_llama",
    "supertuning_no_indices",
    "supertuning_supra_bottom",
];

layer_method_parity_tests!(
    "supertuning",
    CASES,
    "SUPERTUNING",
    parity::MergeChecks {
        merged_forward: (1e-5, 1e-4),
        min_change: Some(1e-2),
        ..Default::default()
    },
    |k| k.contains(".supertuning_")
);

#[test]
fn supertuning_indices_are_peft_s_and_bad_ones_are_named() {
    let dir = fixtures_dir().join("supertuning/cases/supertuning_linear");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin0"].base();
    let params = &split.modules["lin0"];
    // the saved indices are what the recomputation from the base weight gives
    let PeftConfig::Supertuning(cfg) = config else {
        panic!("not SuperTuning")
    };
    let k = cfg.num_trainable(24 * 16);
    let ours = peft::tuners::supertuning::layer::select_positions(&base.weight().unwrap(), k, true)
        .unwrap();
    let saved: Vec<i32> = params["supertuning_indices"].to_vec1().unwrap();
    assert_eq!(ours, saved.iter().map(|&p| p as u32).collect::<Vec<_>>());
    let mut missing = params.clone();
    missing.shift_remove("supertuning_values");
    let e = registry::build_adapter(config, "lin0", base, &missing).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::MissingKey(k) if k == "base_model.model.lin0.supertuning_values"),
        "{e}"
    );
    let mut extra = params.clone();
    extra.insert(
        "supertuning_lora_A.weight".into(),
        Tensor::zeros((2, 16), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = registry::build_adapter(config, "lin0", base, &extra).unwrap_err();
    assert!(
        e.to_string()
            .contains("base_model.model.lin0.supertuning_lora_A.weight"),
        "{e}"
    );
    let mut wrong = params.clone();
    wrong.insert(
        "supertuning_values".into(),
        Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = registry::build_adapter(config, "lin0", base, &wrong).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::ShapeMismatch { name, expected, got } if name == &peft_key("lin0", "supertuning_values") && expected == &[k] && got == &[5]),
        "{e}"
    );
    for (bad, what) in [
        (vec![384i32], "outside"),
        (vec![-1], "outside"),
        (vec![saved[1]], "repeats"),
    ] {
        let mut idx = saved.clone();
        idx[0] = bad[0];
        let mut p = params.clone();
        p.insert(
            "supertuning_indices".into(),
            Tensor::new(idx.as_slice(), &Device::Cpu).unwrap(),
        );
        let e = registry::build_adapter(config, "lin0", base, &p).unwrap_err();
        assert!(e.to_string().contains(what), "{bad:?}: {e}");
    }
    let mut floats = params.clone();
    floats.insert(
        "supertuning_indices".into(),
        Tensor::zeros(k, DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(registry::build_adapter(config, "lin0", base, &floats).is_err());
    let emb = peft::BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let e = registry::new_adapter(config, "emb", &emb, &mut peft::PeftRng::new(0)).unwrap_err();
    assert!(matches!(e, peft::PeftError::Unsupported { .. }), "{e}");
    for bad in [
        r#"{"peft_type": "SUPERTUNING", "sparsity": 1.0}"#,
        r#"{"peft_type": "SUPERTUNING", "r": 2}"#,
        r#"{"peft_type": "SUPERTUNING", "lora_alpha": 2}"#,
        r#"{"peft_type": "SUPERTUNING", "r": 0, "lora_alpha": 2}"#,
        r#"{"peft_type": "SUPERTUNING", "lora_dropout": 1.0}"#,
    ] {
        let e = PeftConfig::from_json_str(bad)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(matches!(e, peft::PeftError::InvalidConfig(_)), "{bad}: {e}");
    }
    // a sparsity that leaves no entry of a layer trainable is PEFT's error
    let sparse =
        PeftConfig::from_json_str(r#"{"peft_type": "SUPERTUNING", "sparsity": 0.999}"#).unwrap();
    let e = registry::new_adapter(&sparse, "lin0", base, &mut peft::PeftRng::new(0)).unwrap_err();
    assert!(e.to_string().contains("no trainable entries"), "{e}");
}

#[test]
fn supertuning_new_adapter_starts_as_the_identity() {
    for case in [
        "supertuning_linear",
        "supertuning_supra_bottom",
        "supertuning_llama",
    ] {
        let dir = fixtures_dir().join("supertuning/cases").join(case);
        let c = load_case(&dir);
        let (_, config, _, _) = &c.adapters[0];
        let mut v = serde_json::to_value(config).unwrap();
        v["init_weights"] = serde_json::Value::Bool(true);
        let identity = PeftConfig::from_json_str(&v.to_string()).unwrap();
        parity::assert_new_adapter_is_identity(&dir, &c, &identity);
    }
}
