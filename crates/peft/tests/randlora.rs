//! RandLoRA parity with PEFT 0.21.2 on the fixtures of `fixtures/randlora/` (written by `gen_randlora.py`, every
//! lambda and gamma random and perturbed): per-layer forward (dense bases on a biased Linear and an in > out one,
//! two active adapters sharing the first one's bases, sparse bases regenerated with `save_projection: false`,
//! very sparse bases, GPT-2 Conv1D, a tiny Llama), disabled forward, merged weights, unmerge, save → re-load (the
//! shared `base_model.randlora_A` / `_B` and PEFT's per-layer copies included), `peft merge` without a model,
//! the bases regenerated bit for bit from `projection_prng_key`, and the errors.

use crate::common::*;
use crate::lora_parity::load_case;
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::layer::registry;
use peft::tuners::randlora::RandLoraConfig;
use peft::tuners::randlora::layer::{RANDLORA_A_KEY, RANDLORA_B_KEY};
use peft::tuners::randlora::prng::randlora_bases;
use peft::{PeftConfig, PeftError, PeftRng};

const CASES: [&str; 6] = [
    "randlora_conv1d",
    "randlora_linear",
    "randlora_llama",
    "randlora_sparse",
    "randlora_two_adapters",
    "randlora_very_sparse",
];

layer_method_parity_tests!(
    "randlora",
    CASES,
    "RANDLORA",
    parity::MergeChecks {
        merged_forward: (1e-5, 1e-4),
        min_change: Some(1e-2),
        ..Default::default()
    },
    |k| k.contains(".randlora_") || k == RANDLORA_A_KEY || k == RANDLORA_B_KEY
);

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// PEFT's bases for several seeds, ranks, shapes and modes (`bases.safetensors`), reproduced bit for bit.
#[test]
fn randlora_bases_match_peft_bit_for_bit() {
    let dir = fixtures_dir().join("randlora");
    let f = load(&dir.join("bases.safetensors"));
    let meta: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("bases.json")).unwrap()).unwrap();
    assert_eq!(meta.len(), 8);
    for (i, m) in meta.iter().enumerate() {
        let mode = m["mode"].as_str().unwrap();
        let config = RandLoraConfig {
            r: m["r"].as_u64().unwrap() as usize,
            projection_prng_key: m["seed"].as_i64().unwrap(),
            sparse: mode == "sparse",
            very_sparse: mode == "very_sparse",
            ..Default::default()
        };
        let (o, n) = (
            m["out"].as_u64().unwrap() as usize,
            m["in"].as_u64().unwrap() as usize,
        );
        let b =
            peft::tuners::randlora::RandLoraBases::generate(&config, o, n, &Device::Cpu).unwrap();
        let (ea, eb) = (&f[&format!("A.{i}")], &f[&format!("B.{i}")]);
        assert_eq!(b.a.dims(), ea.dims(), "{m}: randlora_A shape");
        assert_eq!(b.b.dims(), eb.dims(), "{m}: randlora_B shape");
        assert_eq!(bits(&b.a), bits(ea), "{m}: randlora_A");
        assert_eq!(bits(&b.b), bits(eb), "{m}: randlora_B");
        let sparsity = match mode {
            "dense" => None,
            "sparse" => Some(3.0),
            _ => Some((o.min(n) as f64).sqrt()),
        };
        let (va, _) = randlora_bases(config.projection_prng_key, config.r, o, n, sparsity);
        assert_eq!(va.len(), ea.elem_count());
    }
}

/// A fresh adapter's shared bases are those of PEFT's file (the same `projection_prng_key`, the largest layer),
/// and the saved per-layer copies are the same tensors.
#[test]
fn randlora_fresh_bases_equal_peft_s_saved_ones() {
    for case in CASES {
        let dir = fixtures_dir().join("randlora/cases").join(case);
        let c = load_case(&dir);
        for (name, config, split, original) in &c.adapters {
            let dims: Vec<peft::tuners::TargetLayer> = split
                .modules
                .keys()
                .map(|m| peft::tuners::TargetLayer::of(m, c.slots[m].base()))
                .collect();
            let fresh = registry::shared_tensors(config, None, &dims, &Device::Cpu).unwrap();
            // `split.shared` holds what the adapter uses: the file's bases, or regenerated ones
            for k in [RANDLORA_A_KEY, RANDLORA_B_KEY] {
                assert_eq!(
                    bits(&fresh[k]),
                    bits(&split.shared[k]),
                    "{case} {name}: {k}"
                );
            }
            let PeftConfig::RandLora(cfg) = config else {
                panic!("not RandLoRA")
            };
            assert_eq!(cfg.save_projection, original.contains_key(RANDLORA_A_KEY));
            if cfg.save_projection {
                for (m, params) in &split.modules {
                    assert_eq!(
                        bits(&params["randlora_A"]),
                        bits(&fresh[RANDLORA_A_KEY]),
                        "{case} {m}"
                    );
                    assert_eq!(
                        bits(&params["randlora_B"]),
                        bits(&fresh[RANDLORA_B_KEY]),
                        "{case} {m}"
                    );
                }
            } else {
                assert!(split.modules.values().all(|p| p.len() == 2), "{case}");
            }
        }
    }
}

#[test]
fn randlora_new_adapter_starts_as_the_identity() {
    for case in ["randlora_linear", "randlora_conv1d", "randlora_sparse"] {
        let dir = fixtures_dir().join("randlora/cases").join(case);
        let c = load_case(&dir);
        let (_, config, split, _) = &c.adapters[0];
        let mut v = serde_json::to_value(config).unwrap();
        v["init_weights"] = serde_json::Value::Bool(true);
        let identity = PeftConfig::from_json_str(&v.to_string()).unwrap();
        let io = load(&dir.join("io.safetensors"));
        for (m, slot) in &c.slots {
            let a = registry::new_adapter_with_shared(
                &identity,
                m,
                slot.base(),
                &mut PeftRng::new(1),
                &split.shared,
            )
            .unwrap();
            let (d, _) = a.delta_weight(slot.base().kind()).unwrap().unwrap();
            assert_eq!(
                d.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                0.0
            );
            let mut fresh = peft::AdapterSlot::new(m.clone(), slot.base().clone());
            fresh.add_adapter("default", a).unwrap();
            let y = fresh
                .forward(
                    &io[&format!("input_disabled.{m}")],
                    &peft::ForwardCtx::eval(),
                )
                .unwrap();
            assert_close(case, &y, &io[&format!("output_disabled.{m}")], 1e-5, 1e-4);
            // init_weights=False: λ ~ N(0, 1) moves the output; shapes are PEFT's
            let moving = registry::new_adapter_with_shared(
                config,
                m,
                slot.base(),
                &mut PeftRng::new(1),
                &split.shared,
            )
            .unwrap();
            let want: IndexMap<String, Vec<usize>> = split.modules[m]
                .iter()
                .map(|(k, t)| (k.clone(), t.dims().to_vec()))
                .collect();
            let got: IndexMap<String, Vec<usize>> = moving
                .tensors()
                .into_iter()
                .map(|(k, t)| (k, t.dims().to_vec()))
                .collect();
            for (k, s) in &want {
                assert_eq!(&got[k], s, "{case} {m} {k}");
            }
        }
    }
}

#[test]
fn randlora_bad_configs_and_tensors_are_named_errors() {
    let dir = fixtures_dir().join("randlora/cases/randlora_linear");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin0"].base();
    let params = &split.modules["lin0"];
    let build = |p: &IndexMap<String, Tensor>| {
        registry::build_adapter_with_shared(config, "lin0", base, p, &split.shared)
    };
    build(params).unwrap();
    let mut missing = params.clone();
    missing.shift_remove("randlora_gamma");
    let e = build(&missing).unwrap_err();
    assert!(e.to_string().contains("randlora_gamma"), "{e}");
    let mut wrong = params.clone();
    wrong.insert(
        "randlora_lambda".into(),
        Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = build(&wrong).unwrap_err();
    assert!(
        matches!(&e, PeftError::ShapeMismatch { expected, got, .. } if expected == &[4, 4] && got == &[4, 3]),
        "{e}"
    );
    let mut extra = params.clone();
    extra.insert(
        "randlora_extra".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(
        build(&extra)
            .unwrap_err()
            .to_string()
            .contains("randlora_extra")
    );
    // no shared bases, and bases of the wrong rank or too small for the layer
    let e = registry::build_adapter(config, "lin0", base, params).unwrap_err();
    assert!(e.to_string().contains("shared"), "{e}");
    let mut small = split.shared.clone();
    small.insert(
        RANDLORA_B_KEY.into(),
        Tensor::zeros((8, 4, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = registry::build_adapter_with_shared(config, "lin0", base, params, &small).unwrap_err();
    assert!(e.to_string().contains(RANDLORA_B_KEY), "{e}");
    let mut other = split.shared.clone();
    other.insert(
        "base_model.vera_A".into(),
        Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(
        registry::shared_tensors(
            config,
            Some(&other),
            &target_layers(&[(16, 24)]),
            &Device::Cpu
        )
        .is_err()
    );
    let mut no_b = split.shared.clone();
    no_b.shift_remove(RANDLORA_B_KEY);
    let e = registry::shared_tensors(
        config,
        Some(&no_b),
        &target_layers(&[(16, 24)]),
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(
        matches!(&e, PeftError::MissingKey(k) if k == RANDLORA_B_KEY),
        "{e}"
    );
    // an embedding is not a RandLoRA target
    let emb = peft::BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let e =
        registry::new_adapter_with_shared(config, "emb", &emb, &mut PeftRng::new(0), &split.shared)
            .unwrap_err();
    assert!(matches!(e, PeftError::Unsupported { .. }), "{e}");
    for bad in [
        r#"{"peft_type": "RANDLORA", "r": 0}"#,
        r#"{"peft_type": "RANDLORA", "bias": "randlora_only"}"#,
        r#"{"peft_type": "RANDLORA", "exclude_modules": ["lin0"]}"#,
        r#"{"peft_type": "RANDLORA", "randlora_dropout": 2.0}"#,
    ] {
        assert!(
            PeftConfig::from_json_str(bad).unwrap().validate().is_err(),
            "{bad}"
        );
    }
}
