//! SHiRA parity with PEFT 0.21.2 on the fixtures of `fixtures/shira/` (written by `gen_shira.py`, every value
//! random and perturbed): per-layer forward (r=2 on a biased and a bias-free Linear; two active adapters, one
//! with the default generator's seed; a tiny Llama), disabled forward, merged weights (`W + ΔW`), unmerge, save →
//! re-load (int32 `[2, k]` indices kept), and `peft merge` without a model.

use crate::common::*;
use crate::lora_parity::load_case;
use candle_core::{DType, Device, Tensor};
use peft::PeftConfig;
use peft::io::peft_key;
use peft::layer::registry;

const CASES: [&str; 3] = ["shira_linear", "shira_llama", "shira_two_adapters"];

layer_method_parity_tests!(
    "shira",
    CASES,
    "SHIRA",
    parity::MergeChecks {
        merged_forward: (1e-5, 1e-4),
        min_change: Some(1e-2),
        ..Default::default()
    },
    |k| k.contains(".shira_")
);

/// The saved positions are PEFT's random mask, which a new adapter draws again (torch's `randperm` from
/// `random_seed`, or from a fresh generator's seed when it is null), and bad files are named errors.
#[test]
fn shira_indices_are_peft_s_random_mask_and_bad_ones_are_named() {
    for (case, adapter) in [
        ("shira_linear", 0),
        ("shira_two_adapters", 0),
        ("shira_two_adapters", 1),
    ] {
        let dir = fixtures_dir().join("shira/cases").join(case);
        let c = load_case(&dir);
        let (_, config, split, _) = &c.adapters[adapter];
        for module in ["lin0", "lin1"] {
            let base = c.slots[module].base();
            let saved: Vec<Vec<i32>> = split.modules[module]["shira_indices"].to_vec2().unwrap();
            let fresh =
                registry::new_adapter(config, module, base, &mut peft::PeftRng::new(0)).unwrap();
            let t = fresh
                .tensors()
                .into_iter()
                .find(|(k, _)| k == "shira_indices")
                .unwrap()
                .1;
            assert_eq!(t.dtype(), DType::I32);
            assert_eq!(t.to_vec2::<i32>().unwrap(), saved, "{case} {module}");
        }
    }
    let dir = fixtures_dir().join("shira/cases/shira_linear");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin0"].base();
    let params = &split.modules["lin0"];
    let k = 2 * (24 + 16);
    let mut missing = params.clone();
    missing.shift_remove("shira_indices");
    let e = registry::build_adapter(config, "lin0", base, &missing).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::MissingKey(k) if k == "base_model.model.lin0.shira_indices"),
        "{e}"
    );
    let mut extra = params.clone();
    extra.insert(
        "shira_extra".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = registry::build_adapter(config, "lin0", base, &extra).unwrap_err();
    assert!(
        e.to_string().contains("base_model.model.lin0.shira_extra"),
        "{e}"
    );
    let mut wrong = params.clone();
    wrong.insert(
        "shira_weight".into(),
        Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = registry::build_adapter(config, "lin0", base, &wrong).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::ShapeMismatch { name, expected, got } if name == &peft_key("lin0", "shira_weight") && expected == &[k] && got == &[5]),
        "{e}"
    );
    let saved: Vec<i32> = params["shira_indices"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    for (at, bad) in [(0, 24), (0, -1), (k, 16)] {
        let mut idx = saved.clone();
        idx[at] = bad;
        let mut p = params.clone();
        p.insert(
            "shira_indices".into(),
            Tensor::from_vec(idx, (2, k), &Device::Cpu).unwrap(),
        );
        let e = registry::build_adapter(config, "lin0", base, &p).unwrap_err();
        assert!(e.to_string().contains("outside"), "{bad}: {e}");
    }
    // PEFT's Windows files hold the indices as float32: they load, and give the same layer
    let as_float: Vec<f32> = saved.iter().map(|&i| i as f32).collect();
    let mut p = params.clone();
    p.insert(
        "shira_indices".into(),
        Tensor::from_vec(as_float, (2, k), &Device::Cpu).unwrap(),
    );
    let a = registry::build_adapter(config, "lin0", base, &p).unwrap();
    let b = registry::build_adapter(config, "lin0", base, params).unwrap();
    let da = a.delta_weight(base.kind()).unwrap().unwrap().0;
    let db = b.delta_weight(base.kind()).unwrap().unwrap().0;
    assert_eq!(max_diff(&da, &db), 0.0);
    assert!(
        db.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 1.0
    );
    let emb = peft::BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let e = registry::new_adapter(config, "emb", &emb, &mut peft::PeftRng::new(0)).unwrap_err();
    assert!(matches!(e, peft::PeftError::Unsupported { .. }), "{e}");
    for bad in [
        r#"{"peft_type": "SHIRA", "r": 0}"#,
        r#"{"peft_type": "SHIRA", "fan_in_fan_out": true}"#,
    ] {
        assert!(
            PeftConfig::from_json_str(bad).unwrap().validate().is_err(),
            "{bad}"
        );
    }
    // more entries than the weight has is PEFT's error; a custom mask type cannot create an adapter
    let big = PeftConfig::from_json_str(r#"{"peft_type": "SHIRA", "r": 10}"#).unwrap();
    let e = registry::new_adapter(&big, "lin0", base, &mut peft::PeftRng::new(0)).unwrap_err();
    assert!(e.to_string().contains("more shira params"), "{e}");
    let custom =
        PeftConfig::from_json_str(r#"{"peft_type": "SHIRA", "r": 2, "mask_type": "mine"}"#)
            .unwrap();
    let e = registry::new_adapter(&custom, "lin0", base, &mut peft::PeftRng::new(0)).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::Unsupported { field, .. } if field == "mask_type"),
        "{e}"
    );
    // ... but an adapter of that mask type loads: its positions are in the file
    registry::build_adapter(&custom, "lin0", base, params).unwrap();
}

#[test]
fn shira_new_adapter_starts_as_the_identity() {
    for case in ["shira_linear", "shira_llama"] {
        let dir = fixtures_dir().join("shira/cases").join(case);
        let c = load_case(&dir);
        let (_, config, _, _) = &c.adapters[0];
        let mut v = serde_json::to_value(config).unwrap();
        v["init_weights"] = serde_json::Value::Bool(true);
        let identity = PeftConfig::from_json_str(&v.to_string()).unwrap();
        parity::assert_new_adapter_is_identity(&dir, &c, &identity);
    }
}
