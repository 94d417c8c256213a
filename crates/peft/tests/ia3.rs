//! (IA)³ parity with PEFT 0.21.2 on the fixtures of `fixtures/ia3/` (written by `gen_ia3.py`): per-layer
//! forward (feedforward and output scaling, Linear / grouped Conv2d / GPT-2 Conv1D, two active adapters),
//! disabled forward, merged weights, PEFT's lossy unmerge, save → re-load, and `peft merge` without a model.

use crate::common::*;
use crate::lora_parity::{LoadedCase, load_case};
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::io::peft_key;
use peft::layer::registry;
use peft::tuners::ia3::Ia3Adapter;
use peft::{ForwardCtx, PeftConfig};
use std::path::Path;

const CASES: [&str; 5] = [
    "ia3_conv1d",
    "ia3_conv2d",
    "ia3_linear",
    "ia3_llama",
    "ia3_two_adapters",
];

fn for_each_case(f: impl Fn(&Path, &mut LoadedCase)) {
    parity::for_each_case("ia3", parity::Expected::Names(&CASES), f);
}

#[test]
fn ia3_layers_scale_input_or_output_as_peft_decided() {
    for_each_case(|dir, c| {
        let ff = c.json["feedforward"].as_object().unwrap().clone();
        assert_eq!(ff.len(), c.slots.len(), "{}", dir.display());
        for (m, slot) in &c.slots {
            for (name, a) in slot.adapters() {
                assert_eq!(a.peft_type(), "IA3");
                let t = a.tensors();
                assert_eq!(t.len(), 1);
                assert_eq!(t[0].0, "ia3_l");
                let want_ff = ff[m].as_bool().unwrap();
                let l = &t[0].1;
                let is_ff = match l.rank() {
                    2 => l.dim(0).unwrap() == 1,
                    _ => l.dim(1).unwrap() == slot.base().in_features(),
                };
                assert_eq!(
                    is_ff,
                    want_ff,
                    "{}: {m}/{name}: {:?}",
                    dir.display(),
                    l.dims()
                );
            }
        }
    });
}

#[test]
fn ia3_forward_matches_peft_per_layer() {
    for_each_case(|dir, c| parity::assert_forward_matches(dir, c, None));
}

#[test]
fn ia3_disabled_forward_is_the_base() {
    for_each_case(parity::assert_disabled_forward_is_base);
}

#[test]
fn ia3_merge_matches_peft_and_unmerge_is_peft_lossy_division() {
    // PEFT's unmerge divides by l + 1e-8: compare with what PEFT's own unmerge left, and with the base.
    let checks = parity::MergeChecks {
        merged_bias: (1e-6, 1e-5),
        merged_forward: (1e-4, 1e-3),
        unmerged_bias: Some((1e-6, 1e-5)),
        unmerged_vs_base: (1e-5, 1e-4),
        ..Default::default()
    };
    for_each_case(|dir, c| parity::assert_case_merge_unmerge(dir, c, &checks));
}

#[test]
fn ia3_save_reload_gives_the_same_file() {
    for_each_case(|dir, c| {
        parity::assert_save_reload_same(dir, c, |k| k.ends_with(".ia3_l"));
    });
}

#[test]
fn ia3_merge_files_matches_peft_merge_and_unload() {
    for dir in cases("ia3") {
        let targets = strings(&case_json(&dir), "targets");
        let touched =
            parity::assert_merge_model_matches(&dir, |k| targets.iter().any(|m| k.starts_with(m)));
        assert!(
            touched >= 2,
            "{}: {touched} targeted tensors",
            dir.display()
        );
    }
}

#[test]
fn ia3_missing_unexpected_and_misshapen_tensors_are_named() {
    let dir = fixtures_dir().join("ia3/cases/ia3_linear");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin0"].base();
    let params = &split.modules["lin0"];
    let e = registry::build_adapter(config, "lin0", base, &IndexMap::new()).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::MissingKey(k) if k == "base_model.model.lin0.ia3_l"),
        "{e}"
    );
    let mut extra = params.clone();
    extra.insert("ia3_l.weight".into(), params["ia3_l"].clone());
    let e = registry::build_adapter(config, "lin0", base, &extra).unwrap_err();
    assert!(
        e.to_string().contains("base_model.model.lin0.ia3_l.weight"),
        "{e}"
    );
    // lin0 scales its output: [24, 1]; a feedforward-shaped vector is refused
    let mut wrong = params.clone();
    wrong.insert(
        "ia3_l".into(),
        Tensor::ones((1, 16), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = registry::build_adapter(config, "lin0", base, &wrong).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::ShapeMismatch { name, expected, got } if name == &peft_key("lin0", "ia3_l") && expected == &[24, 1] && got == &[1, 16]),
        "{e}"
    );
    // IA3 does not wrap embeddings (PEFT raises too)
    let emb = peft::BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let e = registry::new_adapter(config, "emb", &emb, &mut peft::PeftRng::new(0)).unwrap_err();
    assert!(matches!(e, peft::PeftError::Unsupported { .. }), "{e}");
}

#[test]
fn ia3_new_adapter_starts_at_ones_and_is_the_identity() {
    let dir = fixtures_dir().join("ia3/cases/ia3_conv2d");
    let c = load_case(&dir);
    let (_, config, _, _) = &c.adapters[0];
    let PeftConfig::Ia3(cfg) = config else {
        panic!("not IA3")
    };
    let io = load(&dir.join("io.safetensors"));
    for (m, slot) in &c.slots {
        let a = registry::new_adapter(config, m, slot.base(), &mut peft::PeftRng::new(1)).unwrap();
        let l = &a.tensors()[0].1;
        assert_eq!(
            l.flatten_all()
                .unwrap()
                .min(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            1.0
        );
        let ff = peft::tuners::ia3::layer::is_feedforward(cfg, m).unwrap();
        assert_eq!(
            l.dims(),
            Ia3Adapter::shape(slot.base(), ff).unwrap().as_slice()
        );
        let mut fresh = peft::AdapterSlot::new(m.clone(), slot.base().clone());
        fresh.add_adapter("default", a).unwrap();
        let y = fresh
            .forward(&io[&format!("input_disabled.{m}")], &ForwardCtx::eval())
            .unwrap();
        assert_close(
            &format!("{m}: ones"),
            &y,
            &io[&format!("output_disabled.{m}")],
            1e-5,
            1e-4,
        );
    }
}
