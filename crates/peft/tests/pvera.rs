//! PVeRA parity with PEFT 0.21.2 on the fixtures of `fixtures/pvera/` (written by `gen_pvera.py`, every lambda
//! random and perturbed): per-layer forward (the latent's mean; saved projections, regenerated ones for two
//! active adapters, GPT-2 Conv1D, a tiny Llama), disabled forward, merged weights (`W + ΔW`), unmerge, save →
//! re-load (the shared `base_model.pvera_A` / `pvera_B` included when saved), and `peft merge` without a model;
//! the projections regenerated from `projection_prng_key` bit for bit; training samples the latent.

use crate::common::*;
use crate::lora_parity::load_case;
use candle_core::{DType, Device, Tensor};
use peft::PeftConfig;
use peft::layer::registry;
use peft::tuners::pvera::PveraProjections;
use peft::tuners::pvera::layer::{PVERA_A_KEY, PVERA_B_KEY};

const CASES: [&str; 4] = [
    "pvera_conv1d",
    "pvera_linear",
    "pvera_llama",
    "pvera_two_adapters",
];

layer_method_parity_tests!(
    "pvera",
    CASES,
    "PVERA",
    parity::MergeChecks {
        merged_forward: (1e-5, 1e-4),
        min_change: Some(1e-2),
        ..Default::default()
    },
    |k| k.contains(".pvera_lambda_") || k == PVERA_A_KEY || k == PVERA_B_KEY
);

/// The projections PEFT saved (`kaiming_uniform_` of `pvera_A` `[2r, max_in]` then `pvera_B` `[max_out, r]`
/// from `projection_prng_key`) are what the key regenerates here, bit for bit.
#[test]
fn pvera_projections_are_peft_s_bit_for_bit() {
    for (case, key, r) in [("pvera_linear", 5, 4), ("pvera_conv1d", 3, 4)] {
        let dir = fixtures_dir()
            .join("pvera/cases")
            .join(case)
            .join("adapter");
        let t = load(&dir.join("adapter_model.safetensors"));
        let (a, b) = (&t[PVERA_A_KEY], &t[PVERA_B_KEY]);
        assert_eq!(a.dim(0).unwrap(), 2 * r);
        let p =
            PveraProjections::generate(key, r, a.dim(1).unwrap(), b.dim(0).unwrap(), &Device::Cpu)
                .unwrap();
        assert_eq!(max_diff(&p.a, a), 0.0, "{case} pvera_A");
        assert_eq!(max_diff(&p.b, b), 0.0, "{case} pvera_B");
    }
}

/// A new adapter (`init_weights` true: `λ_b = 0`) is the identity; in training the latent is sampled
/// (`μ + ε·exp(½ log σ²)`), so the training forward differs from the inference one, and it is the seeded
/// stream's (two runs with one seed agree).
#[test]
fn pvera_new_adapter_is_the_identity_and_training_samples() {
    let dir = fixtures_dir().join("pvera/cases/pvera_linear");
    let c = load_case(&dir);
    let (_, config, _, _) = &c.adapters[0];
    let mut v = serde_json::to_value(config).unwrap();
    v["init_weights"] = serde_json::Value::Bool(true);
    let identity = PeftConfig::from_json_str(&v.to_string()).unwrap();
    let dims = [(16, 24), (24, 8)];
    let shared =
        registry::shared_tensors(&identity, None, &target_layers(&dims), &Device::Cpu).unwrap();
    for m in ["lin0", "lin1"] {
        let base = c.slots[m].base();
        let fresh = registry::new_adapter_with_shared(
            &identity,
            m,
            base,
            &mut peft::PeftRng::new(0),
            &shared,
        )
        .unwrap();
        let d = fresh.delta_weight(base.kind()).unwrap().unwrap().0;
        assert_eq!(
            d.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        let ld: Vec<f32> = fresh
            .tensors()
            .into_iter()
            .find(|(k, _)| k == "pvera_lambda_d")
            .unwrap()
            .1
            .to_vec1()
            .unwrap();
        assert_eq!(ld, vec![0.1f32; 8], "d_initial over 2r");
    }

    let slot = &c.slots["lin0"];
    let x = Tensor::randn(0f32, 1.0, (3, 16), &Device::Cpu).unwrap();
    let eval = slot.forward(&x, &peft::ForwardCtx::inference()).unwrap();
    let train = |seed| slot.forward(&x, &peft::ForwardCtx::train(seed, 1)).unwrap();
    let (t1, t2) = (train(3), train(3));
    assert_eq!(max_diff(&t1, &t2), 0.0);
    assert!(max_diff(&t1, &eval) > 1e-3, "training did not sample");
    assert!(max_diff(&train(4), &t1) > 1e-4);
}

/// PEFT's refusals and ours, by name.
#[test]
fn pvera_bad_configs_and_files_are_named() {
    for (bad, field) in [
        (
            r#"{"peft_type": "PVERA", "sample_at_inference": true}"#,
            "sample_at_inference",
        ),
        (
            r#"{"peft_type": "PVERA", "exclude_modules": ["x"]}"#,
            "exclude_modules",
        ),
    ] {
        let e = PeftConfig::from_json_str(bad)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(
            matches!(&e, peft::PeftError::Unsupported { field: f, .. } if f == field),
            "{e}"
        );
    }
    let dir = fixtures_dir().join("pvera/cases/pvera_linear");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin0"].base();
    let shared = split.shared.clone();
    let mut wrong = split.modules["lin0"].clone();
    wrong.insert(
        "pvera_lambda_d".into(),
        Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
    );
    let s = registry::shared_tensors(
        config,
        Some(&shared),
        &target_layers(&[(16, 24), (24, 8)]),
        &Device::Cpu,
    )
    .unwrap();
    let e = registry::build_adapter_with_shared(config, "lin0", base, &wrong, &s).unwrap_err();
    assert!(e.to_string().contains("pvera_lambda_d"), "{e}");
    let mut missing = shared.clone();
    missing.shift_remove(PVERA_B_KEY);
    let e = registry::shared_tensors(
        config,
        Some(&missing),
        &target_layers(&[(16, 24)]),
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(e.to_string().contains(PVERA_B_KEY), "{e}");
}
