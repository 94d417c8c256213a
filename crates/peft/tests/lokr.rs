//! LoKr parity with PEFT 0.21.2 on the fixtures of `fixtures/lokr/` (written by `gen_lokr.py`): which tensors
//! each layer holds (full, low-rank, CP), per-layer forward, disabled forward, merged weights and forward,
//! unmerge, save → re-load, `peft merge` without a model, and errors on bad input.

use crate::common::*;
use crate::lora_parity::{LoadedCase, load_case};
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::io::peft_key;
use peft::layer::registry;
use peft::{AdapterSlot, BaseLayer, ForwardCtx, PeftConfig, PeftError, PeftRng};
use std::path::Path;

const CASES: [&str; 6] = [
    "lokr_conv2d",
    "lokr_conv2d_cp",
    "lokr_decompose_both",
    "lokr_decompose_factor",
    "lokr_full",
    "lokr_llama",
];

fn for_each_case(f: impl Fn(&Path, &mut LoadedCase)) {
    parity::for_each_case("lokr", parity::Expected::Names(&CASES), f);
}

#[test]
fn lokr_layers_hold_the_tensors_peft_created() {
    for_each_case(|dir, c| {
        let forms = c.json["lokr_forms"].as_object().unwrap().clone();
        assert_eq!(forms.len(), c.slots.len(), "{}", dir.display());
        for (m, slot) in &c.slots {
            for (name, a) in slot.adapters() {
                assert_eq!(a.peft_type(), "LOKR");
                let want = forms[m][name]["shapes"].as_object().unwrap();
                let got: IndexMap<String, Vec<usize>> = a
                    .tensors()
                    .into_iter()
                    .map(|(k, t)| (k, t.dims().to_vec()))
                    .collect();
                let want: IndexMap<String, Vec<usize>> = want
                    .iter()
                    .map(|(k, v)| {
                        let dims = v
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|d| d.as_u64().unwrap() as usize)
                            .collect();
                        (k.clone(), dims)
                    })
                    .collect();
                let mut g: Vec<_> = got.iter().collect();
                let mut w: Vec<_> = want.iter().collect();
                g.sort();
                w.sort();
                assert_eq!(g, w, "{}: {m}/{name}", dir.display());
                let vars: Vec<String> = a.vars().into_iter().map(|(k, _)| k).collect();
                let keys: Vec<String> = got.keys().cloned().collect();
                assert_eq!(vars, keys);
                let d = a.describe();
                assert!(
                    d.starts_with(&format!("r={} ", forms[m][name]["r"])),
                    "{m}: {d}"
                );
            }
        }
    });
}

#[test]
fn lokr_fixtures_cover_every_parameter() {
    let mut seen = std::collections::BTreeSet::new();
    for dir in cases("lokr") {
        let json = case_json(&dir);
        for (_, per_adapter) in json["lokr_forms"].as_object().unwrap() {
            for (_, f) in per_adapter.as_object().unwrap() {
                seen.extend(f["shapes"].as_object().unwrap().keys().cloned());
            }
        }
    }
    let all: std::collections::BTreeSet<String> = peft::tuners::lokr::layer::PARAM_PREFIXES
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(seen, all);
}

#[test]
fn lokr_forward_matches_peft_per_layer() {
    for_each_case(|dir, c| parity::assert_forward_matches(dir, c, Some(1e-3)));
}

#[test]
fn lokr_disabled_forward_is_the_base() {
    for_each_case(parity::assert_disabled_forward_is_base);
}

#[test]
fn lokr_merge_matches_peft_and_unmerge_restores() {
    for_each_case(|dir, c| {
        let merged = load(&dir.join("merged.safetensors"));
        for (m, slot) in &c.slots {
            // ΔW = merged − base, additive, no bias change
            let w = format!("{m}.weight");
            let (dw, db) = slot
                .adapter("default")
                .unwrap()
                .delta_weight(slot.base().kind())
                .unwrap()
                .expect("LoKr is additive");
            assert!(db.is_none());
            assert_eq!(dw.dtype(), DType::F32);
            assert_close(
                &format!("{}: {m} delta weight", dir.display()),
                &dw,
                &(&merged[&w] - &c.base[&w]).unwrap(),
                1e-6,
                1e-4,
            );
        }
        parity::assert_case_merge_unmerge(dir, c, &parity::MergeChecks::default());
    });
}

#[test]
fn lokr_save_reload_gives_the_same_file() {
    for_each_case(|dir, c| {
        parity::assert_save_reload_same(dir, c, |k| k.contains(".lokr_"));
    });
}

#[test]
fn lokr_merge_files_matches_peft_merge_and_unload() {
    for dir in cases("lokr") {
        let targets = strings(&case_json(&dir), "targets");
        let touched = parity::assert_merge_model_matches(&dir, |k| {
            targets.iter().any(|m| k == format!("{m}.weight"))
        });
        assert_eq!(touched, targets.len(), "{}", dir.display());
    }
}

#[test]
fn lokr_missing_unexpected_and_misshapen_tensors_are_named() {
    let dir = fixtures_dir().join("lokr/cases/lokr_decompose_both");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin0"].base();
    let params = &split.modules["lin0"];
    assert_eq!(params.len(), 4);
    let e = registry::build_adapter(config, "lin0", base, &IndexMap::new()).unwrap_err();
    assert!(
        matches!(&e, PeftError::MissingKey(k) if k == "base_model.model.lin0.lokr_w1_a"),
        "{e}"
    );
    // a full w1 where decompose_both and r=2 < max(8, 6)/2 make PEFT create w1_a / w1_b
    let mut full = params.clone();
    full.shift_remove("lokr_w1_a");
    full.shift_remove("lokr_w1_b");
    full.insert(
        "lokr_w1".into(),
        Tensor::zeros((8, 6), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = registry::build_adapter(config, "lin0", base, &full).unwrap_err();
    assert!(
        matches!(&e, PeftError::MissingKey(k) if k == "base_model.model.lin0.lokr_w1_a"),
        "{e}"
    );
    let mut extra = params.clone();
    extra.insert("lokr_t2".into(), params["lokr_w2_a"].clone());
    let e = registry::build_adapter(config, "lin0", base, &extra).unwrap_err();
    assert!(
        matches!(&e, PeftError::UnexpectedKeys(ks) if ks == &[peft_key("lin0", "lokr_t2")]),
        "{e}"
    );
    // w2_b transposed
    let mut wrong = params.clone();
    wrong.insert("lokr_w2_b".into(), params["lokr_w2_b"].t().unwrap());
    let e = registry::build_adapter(config, "lin0", base, &wrong).unwrap_err();
    assert!(
        matches!(&e, PeftError::ShapeMismatch { name, expected, got } if name == &peft_key("lin0", "lokr_w2_b") && expected == &[2, 8] && got == &[8, 2]),
        "{e}"
    );
    // the rank comes from the config: lin1's tensors (r=4, full) are refused for lin0 (r=2, low-rank)
    let e = registry::build_adapter(config, "lin0", base, &split.modules["lin1"]).unwrap_err();
    assert!(matches!(e, PeftError::MissingKey(_)), "{e}");
    // LoKr wraps neither embeddings nor GPT-2 Conv1D (PEFT raises too)
    let emb =
        BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let e = registry::new_adapter(config, "emb", &emb, &mut PeftRng::new(0)).unwrap_err();
    assert!(matches!(e, PeftError::Unsupported { .. }), "{e}");
    let e = registry::build_adapter(config, "emb", &emb, params).unwrap_err();
    assert!(matches!(e, PeftError::Unsupported { .. }), "{e}");
    let c1d = BaseLayer::conv1d(
        Tensor::zeros((48, 64), DType::F32, &Device::Cpu).unwrap(),
        None,
    )
    .unwrap();
    let e = registry::build_adapter(config, "lin0", &c1d, params).unwrap_err();
    assert!(matches!(e, PeftError::Unsupported { .. }), "{e}");
}

#[test]
fn lokr_new_adapter_shapes_and_init() {
    for dir in cases("lokr") {
        let c = load_case(&dir);
        let (_, config, _, _) = &c.adapters[0];
        let PeftConfig::LoKr(cfg) = config else {
            panic!("not LoKr")
        };
        let io = load(&dir.join("io.safetensors"));
        for (m, slot) in &c.slots {
            let loaded = slot.adapter("default").unwrap();
            let mut shapes: Vec<(String, Vec<usize>)> = loaded
                .tensors()
                .into_iter()
                .map(|(k, t)| (k, t.dims().to_vec()))
                .collect();
            shapes.sort();
            let x = &io[&format!("input_disabled.{m}")];
            let y0 = &slot.base().forward(x).unwrap();
            for (init, identity) in [
                (
                    peft::tuners::lokr::config::LoKrInitWeights::Bool(true),
                    true,
                ),
                (
                    peft::tuners::lokr::config::LoKrInitWeights::Method("lycoris".into()),
                    true,
                ),
                (
                    peft::tuners::lokr::config::LoKrInitWeights::Bool(false),
                    false,
                ),
            ] {
                let cfg = PeftConfig::LoKr(peft::tuners::lokr::LoKrConfig {
                    init_weights: init.clone(),
                    ..cfg.clone()
                });
                let a = registry::new_adapter(&cfg, m, slot.base(), &mut PeftRng::new(1)).unwrap();
                let mut got: Vec<(String, Vec<usize>)> = a
                    .tensors()
                    .into_iter()
                    .map(|(k, t)| (k, t.dims().to_vec()))
                    .collect();
                got.sort();
                assert_eq!(got, shapes, "{}: {m}", dir.display());
                assert_eq!(a.saved_dtype(), DType::F32);
                let mut fresh = AdapterSlot::new(m.clone(), slot.base().clone());
                fresh.add_adapter("default", a).unwrap();
                let y = fresh.forward(x, &ForwardCtx::eval()).unwrap();
                let d = max_diff(&y, y0);
                if identity {
                    assert_eq!(
                        d,
                        0.0,
                        "{}: {m}: {init:?} is not the identity",
                        dir.display()
                    );
                } else {
                    assert!(
                        d > 1e-4,
                        "{}: {m}: random init has no effect",
                        dir.display()
                    );
                }
            }
        }
    }
}
