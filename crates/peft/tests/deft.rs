//! DEFT parity with PEFT 0.21.2 on the fixtures of `fixtures/deft/` (written by `gen_deft.py`, every
//! parameter perturbed): per-layer forward (the relu and QR projectors, PaRa, a random `R` with the rank
//! capped at `out_features`, GPT-2 Conv1D, two active adapters, a tiny Llama), disabled forward, merged
//! weights (the update from the unmerged weight), unmerge, save → re-load, and `peft merge` without a model.

use crate::common::*;
use crate::lora_parity::load_case;
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::layer::{BaseKind, BaseLayer, registry};
use peft::{PeftConfig, PeftRng};

const CASES: [&str; 7] = [
    "deft_conv1d",
    "deft_linear",
    "deft_llama",
    "deft_para",
    "deft_qr",
    "deft_random_init",
    "deft_two_adapters",
];

layer_method_parity_tests!(
    "deft",
    CASES,
    "DEFT",
    parity::MergeChecks {
        merged_bias: (1e-6, 1e-5),
        merged_forward: (1e-4, 1e-3),
        unmerged_bias: Some((1e-6, 1e-5)),
        unmerged_vs_base: (1e-5, 1e-4),
        ..Default::default()
    },
    |k| k.contains(".deft_")
);

fn deft(json: &str) -> PeftConfig {
    let c = PeftConfig::from_json_str(json).unwrap();
    c.validate().unwrap();
    c
}

#[test]
fn a_new_deft_adapter_is_the_identity_and_para_is_not() {
    let dir = fixtures_dir().join("deft/cases/deft_linear");
    let c = load_case(&dir);
    let base = c.slots["lin0"].base().clone();
    let x = Tensor::randn(0f32, 1.0, (3, 16), &Device::Cpu).unwrap();
    let plain = base.forward(&x).unwrap();
    for (json, identity) in [
        (
            r#"{"peft_type": "DEFT", "r": 4, "alpha": 8, "target_modules": ["lin0"]}"#,
            true,
        ),
        (
            r#"{"peft_type": "DEFT", "r": 3, "decomposition_method": "qr", "target_modules": ["lin0"]}"#,
            true,
        ),
        (
            r#"{"peft_type": "DEFT", "r": 2, "para": true, "target_modules": ["lin0"]}"#,
            false,
        ),
    ] {
        let config = deft(json);
        let a = registry::new_adapter(&config, "lin0", &base, &mut PeftRng::new(3)).unwrap();
        let mut slot = peft::AdapterSlot::new("lin0", base.clone());
        slot.add_adapter("default", a).unwrap();
        slot.set_active(&["default"]);
        let y = slot.forward(&x, &peft::ForwardCtx::eval()).unwrap();
        let d = max_diff(&y, &plain);
        if identity {
            assert!(d < 1e-5, "{json}: {d}");
        } else {
            assert!(
                d > 1e-6,
                "{json}: PaRa removes a subspace from the start ({d})"
            );
        }
    }
}

#[test]
fn deft_qr_projector_is_orthonormal_with_lapack_signs_and_trains() {
    // The QR factor PEFT (torch.linalg.qr, LAPACK) saves nothing of, but the forward depends on its signs only
    // through Q·Qᵀ and Q·R: the parity cases pin the result; here the gradient flows through the Gram–Schmidt.
    let w = Tensor::randn(0f32, 1.0, (12, 8), &Device::Cpu).unwrap();
    let base = BaseLayer::new(BaseKind::Linear, w, None).unwrap();
    let config = deft(
        r#"{"peft_type": "DEFT", "r": 3, "decomposition_method": "qr", "init_weights": false}"#,
    );
    let a = registry::new_adapter(&config, "m", &base, &mut PeftRng::new(5)).unwrap();
    let vars = a.vars();
    let mut slot = peft::AdapterSlot::new("m", base);
    slot.add_adapter("default", a).unwrap();
    slot.set_active(&["default"]);
    let x = Tensor::randn(0f32, 1.0, (4, 8), &Device::Cpu).unwrap();
    let y = slot.forward(&x, &peft::ForwardCtx::train(0, 0)).unwrap();
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let n = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n > 0.0, "{name}: zero gradient");
    }
}

#[test]
fn deft_missing_unexpected_and_misshapen_tensors_are_named() {
    let dir = fixtures_dir().join("deft/cases/deft_random_init");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin1"].base(); // [12, 24], r = 16 capped at 12
    let params = &split.modules["lin1"];
    assert_eq!(params["deft_P"].dims(), &[12, 12]);
    let mut missing = params.clone();
    missing.shift_remove("deft_R");
    let e = registry::build_adapter(config, "lin1", base, &missing).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::MissingKey(k) if k == "base_model.model.lin1.deft_R"),
        "{e}"
    );
    let mut extra = params.clone();
    extra.insert("deft_Q".into(), params["deft_P"].clone());
    let e = registry::build_adapter(config, "lin1", base, &extra).unwrap_err();
    assert!(
        e.to_string().contains("base_model.model.lin1.deft_Q"),
        "{e}"
    );
    let mut wrong: IndexMap<String, Tensor> = params.clone();
    wrong.insert(
        "deft_P".into(),
        Tensor::zeros((12, 16), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = registry::build_adapter(config, "lin1", base, &wrong).unwrap_err();
    assert!(e.to_string().contains("deft_P"), "{e}");
    let e = PeftConfig::from_json_str(r#"{"peft_type": "DEFT", "decomposition_method": "svd"}"#)
        .unwrap_err();
    assert!(e.to_string().contains("svd"), "{e}");
    let c = PeftConfig::from_json_str(r#"{"peft_type": "DEFT", "bias": "all"}"#).unwrap();
    assert!(c.validate().unwrap_err().to_string().contains("bias"));
}
