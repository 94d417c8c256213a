//! LoHa parity with PEFT 0.21.2 on the fixtures of `fixtures/loha/` (written by `gen_loha.py`): per-layer
//! forward (Linear with rank/alpha patterns, flattened Conv2d, CP Conv2d with a 3×3 and a 3×2 kernel, a 1×1
//! Conv2d left flat, a tiny Llama, two active adapters), disabled forward, merged weights and forward, unmerge,
//! save → re-load, `peft merge` without a model, and named errors for bad tensors.

use crate::common::*;
use crate::lora_parity::{LoadedCase, load_case};
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::io::peft_key;
use peft::layer::registry;
use peft::{ForwardCtx, PeftConfig};
use std::path::Path;

const CASES: [&str; 5] = [
    "loha_conv2d",
    "loha_conv2d_effective",
    "loha_linear",
    "loha_llama",
    "loha_two_adapters",
];

fn for_each_case(f: impl Fn(&Path, &mut LoadedCase)) {
    parity::for_each_case("loha", parity::Expected::Names(&CASES), f);
}

#[test]
fn loha_layers_have_peft_ranks_and_forms() {
    for_each_case(|dir, c| {
        let cp = c.json["cp"].as_object().unwrap().clone();
        let ranks = c.json["ranks"].as_object().unwrap().clone();
        let scaling = c.json["scaling"].as_object().unwrap().clone();
        assert_eq!(cp.len(), c.slots.len(), "{}", dir.display());
        for (m, slot) in &c.slots {
            for (name, a) in slot.adapters() {
                let what = format!("{}: {m}/{name}", dir.display());
                assert_eq!(a.peft_type(), "LOHA");
                let keys: Vec<String> = a.tensors().into_iter().map(|(k, _)| k).collect();
                let want_cp = cp[m][name].as_bool().unwrap();
                assert_eq!(keys.len(), if want_cp { 6 } else { 4 }, "{what}: {keys:?}");
                let r = ranks[m][name].as_u64().unwrap();
                let s = scaling[m][name].as_f64().unwrap();
                let d = a.describe();
                assert!(d.starts_with(&format!("r={r} ")), "{what}: {d}");
                assert_eq!(d.contains(" cp ["), want_cp, "{what}: {d}");
                let PeftConfig::LoHa(cfg) = &c.adapters.iter().find(|(n, ..)| n == name).unwrap().1
                else {
                    panic!("not LoHa")
                };
                let (cr, ca) = cfg.rank_and_alpha_for(m);
                assert_eq!(cr as u64, r, "{what}");
                assert!((ca / cr as f64 - s).abs() < 1e-12, "{what}");
            }
        }
    });
}

#[test]
fn loha_forward_matches_peft_per_layer() {
    for_each_case(|dir, c| parity::assert_forward_matches(dir, c, Some(1e-3)));
}

#[test]
fn loha_disabled_forward_is_the_base() {
    for_each_case(parity::assert_disabled_forward_is_base);
}

#[test]
fn loha_merge_matches_peft_and_unmerge_restores() {
    // after unmerging, the adapter runs unmerged again
    let checks = parity::MergeChecks {
        min_change: Some(1e-3),
        forward_after_unmerge: true,
        ..Default::default()
    };
    for_each_case(|dir, c| parity::assert_case_merge_unmerge(dir, c, &checks));
}

#[test]
fn loha_delta_weight_is_merged_minus_base() {
    let dir = fixtures_dir().join("loha/cases/loha_conv2d_effective");
    let c = load_case(&dir);
    let merged = load(&dir.join("merged.safetensors"));
    for (m, slot) in &c.slots {
        let a = slot.adapter("default").unwrap();
        let (dw, db) = a
            .delta_weight(slot.base().kind())
            .unwrap()
            .expect("additive");
        assert!(db.is_none());
        assert_eq!(dw.dtype(), DType::F32);
        let w = format!("{m}.weight");
        let want = (&merged[&w] - &c.base[&w]).unwrap();
        assert_close(&format!("{m}: ΔW"), &dw, &want, 1e-6, 1e-5);
    }
}

#[test]
fn loha_save_reload_gives_the_same_file() {
    for_each_case(|dir, c| {
        parity::assert_save_reload_same(dir, c, |k| k.contains(".hada_"));
    });
}

#[test]
fn loha_merge_files_matches_peft_merge_and_unload() {
    let found = cases("loha");
    assert_eq!(found.len(), CASES.len());
    for dir in found {
        let targets = strings(&case_json(&dir), "targets");
        let touched = parity::assert_merge_model_matches(&dir, |k| {
            targets.iter().any(|m| k == format!("{m}.weight"))
        });
        assert_eq!(
            touched,
            targets.len(),
            "{}: targeted weights written",
            dir.display()
        );
    }
}

#[test]
fn loha_missing_unexpected_and_misshapen_tensors_are_named() {
    let dir = fixtures_dir().join("loha/cases/loha_conv2d_effective");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["conv2"].base();
    let params = &split.modules["conv2"];
    let e = registry::build_adapter(config, "conv2", base, &IndexMap::new()).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::MissingKey(k) if k.starts_with("base_model.model.conv2.hada_")),
        "{e}"
    );
    let mut missing = params.clone();
    missing.shift_remove("hada_t2");
    let e = registry::build_adapter(config, "conv2", base, &missing).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::MissingKey(k) if k == "base_model.model.conv2.hada_t2"),
        "{e}"
    );
    let mut extra = params.clone();
    extra.insert("hada_w1_a.weight".into(), params["hada_w1_a"].clone());
    let e = registry::build_adapter(config, "conv2", base, &extra).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::UnexpectedKeys(k) if k == &["base_model.model.conv2.hada_w1_a.weight".to_string()]),
        "{e}"
    );
    // CP: hada_w1_a is [r, out] = [3, 6]; the flat layout [out, r] is refused
    let mut wrong = params.clone();
    wrong.insert(
        "hada_w1_a".into(),
        Tensor::zeros((6, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = registry::build_adapter(config, "conv2", base, &wrong).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::ShapeMismatch { name, expected, got } if name == &peft_key("conv2", "hada_w1_a") && expected == &[3, 6] && got == &[6, 3]),
        "{e}"
    );
    // the kernel is 3×2: a 3×3 core is refused
    let mut wrong = params.clone();
    wrong.insert(
        "hada_t1".into(),
        Tensor::zeros((3, 3, 3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = registry::build_adapter(config, "conv2", base, &wrong).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::ShapeMismatch { name, expected, got } if name == &peft_key("conv2", "hada_t1") && expected == &[3, 3, 3, 2] && got == &[3, 3, 3, 3]),
        "{e}"
    );
    // the same tensors under a flat config do not fit
    let PeftConfig::LoHa(cfg) = config else {
        panic!("not LoHa")
    };
    let flat = PeftConfig::LoHa(peft::tuners::loha::LoHaConfig {
        lycoris: peft::config::LycorisFields {
            use_effective_conv2d: false,
            ..cfg.clone().lycoris
        },
        ..cfg.clone()
    });
    let e = registry::build_adapter(&flat, "conv2", base, params).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::ShapeMismatch { name, .. } if name == &peft_key("conv2", "hada_w1_a")),
        "{e}"
    );
    // LoHa does not wrap embeddings or GPT-2 Conv1D layers (PEFT raises too)
    let emb = peft::BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let e = registry::new_adapter(config, "emb", &emb, &mut peft::PeftRng::new(0)).unwrap_err();
    assert!(matches!(e, peft::PeftError::Unsupported { .. }), "{e}");
    let c1d = peft::BaseLayer::conv1d(
        Tensor::zeros((4, 6), DType::F32, &Device::Cpu).unwrap(),
        None,
    )
    .unwrap();
    let e = registry::build_adapter(config, "c", &c1d, params).unwrap_err();
    assert!(matches!(e, peft::PeftError::Unsupported { .. }), "{e}");
}

#[test]
fn loha_rank_pattern_decides_the_shapes() {
    // lin1 has rank 2 by rank_pattern; reading it with the pattern removed (r = 4) must fail on shapes.
    let dir = fixtures_dir().join("loha/cases/loha_linear");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let PeftConfig::LoHa(cfg) = config else {
        panic!("not LoHa")
    };
    let mut no_pattern = cfg.clone();
    no_pattern.patterns.rank_pattern.clear();
    let e = registry::build_adapter(
        &PeftConfig::LoHa(no_pattern),
        "lin1",
        c.slots["lin1"].base(),
        &split.modules["lin1"],
    )
    .unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::ShapeMismatch { name, expected, got } if name == &peft_key("lin1", "hada_w1_a") && expected == &[12, 4] && got == &[12, 2]),
        "{e}"
    );
}

#[test]
fn loha_new_adapter_is_the_identity_until_trained() {
    for case in ["loha_conv2d_effective", "loha_linear"] {
        let dir = fixtures_dir().join("loha/cases").join(case);
        let c = load_case(&dir);
        let (_, config, _, original) = &c.adapters[0];
        let io = load(&dir.join("io.safetensors"));
        for (m, slot) in &c.slots {
            let a =
                registry::new_adapter(config, m, slot.base(), &mut peft::PeftRng::new(1)).unwrap();
            // same keys and shapes as PEFT's file
            for (k, t) in a.tensors() {
                let want = &original[&peft_key(m, &k)];
                assert_eq!(t.dims(), want.dims(), "{m}.{k}");
                let zero = t
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    == 0.0;
                assert_eq!(zero, k == "hada_w2_b", "{m}.{k}");
            }
            assert_eq!(a.tensors().len(), split_count(original, m), "{m}");
            let mut fresh = peft::AdapterSlot::new(m.clone(), slot.base().clone());
            fresh.add_adapter("default", a).unwrap();
            let y = fresh
                .forward(&io[&format!("input_disabled.{m}")], &ForwardCtx::eval())
                .unwrap();
            assert_close(
                &format!("{case}: {m}: identity"),
                &y,
                &io[&format!("output_disabled.{m}")],
                1e-6,
                1e-5,
            );
        }
    }
}

fn split_count(original: &IndexMap<String, Tensor>, module: &str) -> usize {
    original
        .keys()
        .filter(|k| k.starts_with(&format!("base_model.model.{module}.hada_")))
        .count()
}
