//! OFT parity with PEFT 0.21.2 on the fixtures of `fixtures/oft/` (written by `gen_oft.py`): per-layer forward
//! (Cayley–Neumann with 5 and 3 terms, exact Cayley, block sharing, COFT from unprojected saved tensors, `r`
//! adjusted per layer, 1×1 and 3×3 Conv2d, tiny Llama), disabled forward, merged weights, unmerge through a
//! real inverse, the merge warning of k×k convolutions, save → re-load, and `merge_model` without a model.

use crate::common::*;
use crate::lora_parity::{LoadedCase, load_case};
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::io::peft_key;
use peft::layer::registry;
use peft::{ForwardCtx, PeftError};
use std::path::Path;

const CASES: [&str; 9] = [
    "oft_block_share",
    "oft_coft",
    "oft_conv2d_1x1",
    "oft_conv2d_3x3",
    "oft_exact",
    "oft_llama",
    "oft_neumann",
    "oft_neumann_3terms",
    "oft_r",
];

fn for_each_case(f: impl Fn(&Path, &mut LoadedCase)) {
    parity::for_each_case("oft", parity::Expected::Names(&CASES), f);
}

/// The kernel size PEFT saw for a module (1 for a Linear).
fn kernel_of(json: &serde_json::Value, module: &str) -> u64 {
    json["geometry"][module]["kernel_size"][0]
        .as_u64()
        .unwrap_or(1)
}

#[test]
fn oft_layers_have_the_block_sizes_peft_chose() {
    for_each_case(|dir, c| {
        let sizes = c.json["block_sizes"].as_object().unwrap().clone();
        assert_eq!(sizes.len(), c.slots.len(), "{}", dir.display());
        for (m, slot) in &c.slots {
            for (_, a) in slot.adapters() {
                assert_eq!(a.peft_type(), "OFT");
                let t = a.tensors();
                assert_eq!(t.len(), 1);
                assert_eq!(t[0].0, "oft_R.weight");
                let (r, bs) = (
                    sizes[m]["r"].as_u64().unwrap(),
                    sizes[m]["oft_block_size"].as_u64().unwrap(),
                );
                let d = a.describe();
                assert!(
                    d.contains(&format!("{r} blocks of {bs} ")),
                    "{}: {m}: {d}",
                    dir.display()
                );
            }
        }
    });
}

#[test]
fn oft_forward_matches_peft_per_layer() {
    for_each_case(|dir, c| parity::assert_forward_matches(dir, c, None));
}

#[test]
fn oft_disabled_forward_is_the_base() {
    for_each_case(parity::assert_disabled_forward_is_base);
}

#[test]
fn oft_merge_matches_peft_and_unmerge_inverts_it() {
    for_each_case(|dir, c| {
        let peft_gap = c.json["merged_vs_unmerged_max_abs_diff"].as_f64().unwrap();
        let json = c.json.clone();
        let kxk = |m: &str| kernel_of(&json, m) != 1;
        for m in c.slots.keys() {
            if kxk(m) {
                // PEFT's merged k×k conv computes something else than its unmerged forward; so must ours.
                assert!(
                    peft_gap > 1e-2,
                    "{}: {m}: PEFT gap {peft_gap}",
                    dir.display()
                );
            } else {
                // PEFT's merge equals its forward here: so must ours.
                assert!(
                    peft_gap < 1e-5,
                    "{}: {m}: PEFT gap {peft_gap}",
                    dir.display()
                );
            }
        }
        let checks = parity::MergeChecks {
            merged_forward_differs: Some(&kxk),
            unmerged: (1e-5, 1e-4),
            unmerged_bias: Some((0.0, 0.0)),
            unmerged_vs_base: (1e-5, 1e-4),
            ..Default::default()
        };
        parity::assert_case_merge_unmerge(dir, c, &checks);
    });
}

#[test]
fn oft_merge_warning_exactly_for_kxk_convolutions() {
    let mut warned = 0;
    for dir in cases("oft") {
        let c = load_case(&dir);
        for (m, slot) in &c.slots {
            let k = kernel_of(&c.json, m);
            for (_, a) in slot.adapters() {
                match a.merge_warning() {
                    Some(msg) => {
                        assert!(k > 1, "{}: {m}: {msg}", dir.display());
                        assert!(msg.contains(&format!("{k}x{k} Conv2d")), "{msg}");
                        warned += 1;
                    }
                    None => assert_eq!(k, 1, "{}: {m}: no warning", dir.display()),
                }
            }
        }
    }
    assert_eq!(warned, 1);
}

#[test]
fn oft_save_reload_gives_the_same_file() {
    for_each_case(|dir, c| {
        parity::assert_save_reload_same(dir, c, |k| k.ends_with(".oft_R.weight"));
        for (_, _, _, original) in &c.adapters {
            let mut b: Vec<String> = original.keys().cloned().collect();
            b.sort();
            assert_eq!(
                b,
                strings(&c.json, "adapter_keys"),
                "{}: keys PEFT saved",
                dir.display()
            );
        }
    });
}

#[test]
fn oft_coft_projects_the_saved_tensors_in_the_forward() {
    // The fixture saved oft_R before any forward, unprojected; PEFT's forward projects it in place and so
    // does ours (the parity of the outputs is checked above): afterwards the parameter holds the projection.
    let dir = fixtures_dir().join("oft/cases/oft_coft");
    let c = load_case(&dir);
    let io = load(&dir.join("io.safetensors"));
    let (_, _, _, original) = &c.adapters[0];
    let mut changed = 0;
    for (m, slot) in &c.slots {
        slot.forward(&io[&format!("input.{m}")], &ForwardCtx::eval())
            .unwrap();
        let now = &slot.adapter("default").unwrap().tensors()[0].1;
        let before = &original[&peft_key(m, "oft_R.weight")];
        let d: Vec<f32> = (now - before)
            .unwrap()
            .abs()
            .unwrap()
            .max(1)
            .unwrap()
            .to_vec1()
            .unwrap();
        // lin0: 3 of 4 rows outside the ball, lin1: all 6.
        changed += d.iter().filter(|v| **v > 1e-4).count();
        assert!(d.contains(&0.0) || m == "lin1", "{m}: {d:?}");
    }
    assert_eq!(changed, 9);
}

#[test]
fn oft_merge_files_matches_peft_merge_and_unload() {
    for dir in cases("oft") {
        let targets = strings(&case_json(&dir), "targets");
        let touched =
            parity::assert_merge_model_matches(&dir, |k| targets.iter().any(|m| k.starts_with(m)));
        assert!(
            touched >= 1,
            "{}: {touched} targeted tensors",
            dir.display()
        );
    }
}

#[test]
fn oft_missing_unexpected_and_misshapen_tensors_are_named() {
    let dir = fixtures_dir().join("oft/cases/oft_neumann");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin1"].base();
    let params = &split.modules["lin1"];
    let e = registry::build_adapter(config, "lin1", base, &IndexMap::new()).unwrap_err();
    assert!(
        matches!(&e, PeftError::MissingKey(k) if k == "base_model.model.lin1.oft_R.weight"),
        "{e}"
    );
    let mut extra = params.clone();
    extra.insert("oft_R.bias".into(), params["oft_R.weight"].clone());
    let e = registry::build_adapter(config, "lin1", base, &extra).unwrap_err();
    assert!(
        e.to_string().contains("base_model.model.lin1.oft_R.bias"),
        "{e}"
    );
    // lin1 has 24 inputs, block size 4: [6, 6]. A [5, 6] tensor (5 blocks of 4 = 20) does not fit; neither
    // does a width that is no triangle number.
    for bad in [&[5usize, 6][..], &[6, 7], &[36]] {
        let mut wrong = params.clone();
        wrong.insert(
            "oft_R.weight".into(),
            Tensor::zeros(bad, DType::F32, &Device::Cpu).unwrap(),
        );
        let e = registry::build_adapter(config, "lin1", base, &wrong).unwrap_err();
        assert!(
            matches!(&e, PeftError::ShapeMismatch { name, expected, got } if name == &peft_key("lin1", "oft_R.weight") && expected == &[6, 6] && got == bad),
            "{bad:?}: {e}"
        );
    }
    // A tensor of another valid block size (4 blocks of 6 = 24) is taken as it is.
    let mut other = params.clone();
    other.insert(
        "oft_R.weight".into(),
        Tensor::zeros((4, 15), DType::F32, &Device::Cpu).unwrap(),
    );
    let a = registry::build_adapter(config, "lin1", base, &other).unwrap();
    assert!(a.describe().contains("4 blocks of 6"), "{}", a.describe());
    // OFT does not wrap embeddings here (PEFT's oft_embedding_R is not ported).
    let emb = peft::BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let e = registry::new_adapter(config, "emb", &emb, &mut peft::PeftRng::new(0)).unwrap_err();
    assert!(matches!(e, PeftError::Unsupported { .. }), "{e}");
    // Bad inputs at forward time are errors naming the shape.
    let slot = &c.slots["lin1"];
    let e = slot
        .forward(
            &Tensor::zeros((2, 16), DType::F32, &Device::Cpu).unwrap(),
            &ForwardCtx::eval(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("[2, 16]"), "{e}");
}

#[test]
fn oft_new_adapter_starts_at_the_identity() {
    for name in ["oft_neumann", "oft_conv2d_1x1", "oft_conv2d_3x3"] {
        let dir = fixtures_dir().join("oft/cases").join(name);
        let c = load_case(&dir);
        let (_, config, _, _) = &c.adapters[0];
        let io = load(&dir.join("io.safetensors"));
        for (m, slot) in &c.slots {
            let a =
                registry::new_adapter(config, m, slot.base(), &mut peft::PeftRng::new(1)).unwrap();
            let t = &a.tensors()[0].1;
            let saved = &c.adapters[0].3[&peft_key(m, "oft_R.weight")];
            assert_eq!(t.dims(), saved.dims(), "{name}: {m}");
            assert_eq!(
                t.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                0.0
            );
            let mut fresh = peft::AdapterSlot::new(m.clone(), slot.base().clone());
            fresh.add_adapter("default", a).unwrap();
            let x = &io[&format!("input_disabled.{m}")];
            let y = fresh.forward(x, &ForwardCtx::eval()).unwrap();
            let base_y = &io[&format!("output_disabled.{m}")];
            if kernel_of(&c.json, m) == 1 {
                assert_close(&format!("{name}: {m}: identity"), &y, base_y, 1e-5, 1e-4);
            } else {
                // PEFT's unfold/fold is not the identity even at the identity rotation (overlaps are summed).
                let d = max_diff(&y, base_y);
                assert!(d > 1e-2, "{name}: {m}: {d}");
            }
        }
    }
}
