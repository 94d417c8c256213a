//! BOFT parity with PEFT 0.21.2 on the fixtures of `fixtures/boft/` (written by `gen_boft.py`, with PEFT's CUDA
//! block-diagonal extension emulated in torch for more than one butterfly factor): per-layer forward (Linear and
//! Conv2d, 1 to 3 factors, stock CPU PEFT's silent single factor), disabled forward, merged weights and merged
//! forward, PEFT's unmerge, save → re-load, `peft merge` without a model, and bad tensors named.

use crate::common::*;
use crate::lora_parity::{LoadedCase, load_case};
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::io::peft_key;
use peft::layer::registry;
use peft::{ForwardCtx, PeftConfig, PeftError};
use std::path::Path;

const CASES: [&str; 7] = [
    "boft_f1_conv2d",
    "boft_f1_linear",
    "boft_f2_conv2d",
    "boft_f2_linear",
    "boft_f3_linear",
    "boft_llama",
    "boft_stock_cpu_linear",
];

fn for_each_case(f: impl Fn(&Path, &mut LoadedCase)) {
    parity::for_each_case("boft", parity::Expected::Names(&CASES), f);
}

fn usize_of(v: &serde_json::Value) -> usize {
    v.as_u64().expect("a number") as usize
}

#[test]
fn boft_layers_have_peft_factors_and_blocks() {
    for_each_case(|dir, c| {
        let boft = c.json["boft"].as_object().unwrap().clone();
        assert_eq!(boft.len(), c.slots.len(), "{}", dir.display());
        for (m, slot) in &c.slots {
            let want = &boft[m];
            let a = slot.adapter("default").unwrap();
            assert_eq!(a.peft_type(), "BOFT");
            let keys: Vec<String> = a.tensors().into_iter().map(|(k, _)| k).collect();
            assert_eq!(keys, ["boft_R", "boft_s"]);
            let d = a.describe();
            let expect = format!(
                "factors={} blocks={} block_size={}",
                usize_of(&want["factors"]),
                usize_of(&want["block_num"]),
                usize_of(&want["block_size"])
            );
            assert!(
                d.starts_with(&expect),
                "{}: {m}: {d} vs {expect}",
                dir.display()
            );
        }
    });
}

#[test]
fn boft_forward_matches_peft_per_layer() {
    for_each_case(|dir, c| parity::assert_forward_matches(dir, c, Some(1e-2)));
}

#[test]
fn boft_disabled_forward_is_the_base() {
    for_each_case(parity::assert_disabled_forward_is_base);
}

#[test]
fn boft_merge_matches_peft_and_unmerge_restores() {
    let checks = parity::MergeChecks {
        merge_order: false,
        ..Default::default()
    };
    for_each_case(|dir, c| parity::assert_case_merge_unmerge(dir, c, &checks));
}

#[test]
fn boft_save_reload_gives_the_same_file() {
    for_each_case(|dir, c| {
        parity::assert_save_reload_same(dir, c, |k| {
            k.ends_with(".boft_R") || k.ends_with(".boft_s")
        });
    });
}

#[test]
fn boft_merge_files_matches_peft_merge_and_unload() {
    for dir in cases("boft") {
        let targets = strings(&case_json(&dir), "targets");
        let touched = parity::assert_merge_model_matches(&dir, |k| {
            targets.iter().any(|m| k == format!("{m}.weight"))
        });
        assert_eq!(touched, targets.len(), "{}", dir.display());
    }
}

/// lin0 of `boft_f2_linear`: in 16, out 24, block size 4, two factors.
fn f2_lin0() -> (LoadedCase, PeftConfig, IndexMap<String, Tensor>) {
    let dir = fixtures_dir().join("boft/cases/boft_f2_linear");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let config = config.clone();
    let params = split.modules["lin0"].clone();
    (c, config, params)
}

#[test]
fn boft_missing_unexpected_and_misshapen_tensors_are_named() {
    let (c, config, params) = f2_lin0();
    let base = c.slots["lin0"].base();
    let build = |p: &IndexMap<String, Tensor>| registry::build_adapter(&config, "lin0", base, p);
    for key in ["boft_R", "boft_s"] {
        let mut p = params.clone();
        p.shift_remove(key);
        let e = build(&p).unwrap_err();
        assert!(
            matches!(&e, PeftError::MissingKey(k) if *k == peft_key("lin0", key)),
            "{e}"
        );
    }
    let mut extra = params.clone();
    extra.insert("boft_P".into(), params["boft_s"].clone());
    let e = build(&extra).unwrap_err();
    assert!(e.to_string().contains(&peft_key("lin0", "boft_P")), "{e}");
    let zeros = |s: &[usize]| Tensor::zeros(s, DType::F32, &Device::Cpu).unwrap();
    // blocks of the wrong size (config: block size 4 → [.., 4, 4, 4])
    for (key, bad, expected) in [
        ("boft_R", vec![2, 2, 8, 8], vec![2, 4, 4, 4]),
        ("boft_R", vec![8, 4, 4], vec![1, 4, 4, 4]),
        ("boft_s", vec![1, 24], vec![24, 1]),
    ] {
        let mut p = params.clone();
        p.insert(key.into(), zeros(&bad));
        let e = build(&p).unwrap_err();
        assert!(
            matches!(&e, PeftError::ShapeMismatch { name, expected: x, got } if *name == peft_key("lin0", key) && *x == expected && *got == bad),
            "{key} {bad:?}: {e}"
        );
    }
    // 16 features cannot hold 4 butterfly factors of blocks of 4 (PEFT needs 4 · 2³ = 32 <= in_features)
    for factors in [4, 70] {
        let mut p = params.clone();
        p.insert("boft_R".into(), zeros(&[factors, 4, 4, 4]));
        let e = build(&p).unwrap_err();
        assert!(
            e.to_string().contains("boft_R")
                && e.to_string()
                    .contains(&format!("{factors} butterfly factors")),
            "{e}"
        );
    }
    // layers BOFT does not wrap
    let emb = peft::BaseLayer::embedding(zeros(&[10, 16])).unwrap();
    let e = registry::new_adapter(&config, "emb", &emb, &mut peft::PeftRng::new(0)).unwrap_err();
    assert!(
        matches!(&e, PeftError::Unsupported { field, .. } if field == "target_modules"),
        "{e}"
    );
}

#[test]
fn boft_factor_comes_from_boft_r_not_the_config() {
    // stock CPU PEFT: the config says 2 factors, the tensors hold 1 (and the outputs match PEFT's, above)
    let dir = fixtures_dir().join("boft/cases/boft_stock_cpu_linear");
    let c = load_case(&dir);
    let PeftConfig::Boft(cfg) = &c.adapters[0].1 else {
        panic!("not BOFT")
    };
    assert_eq!(cfg.boft_n_butterfly_factor, 2);
    for slot in c.slots.values() {
        let a = slot.adapter("default").unwrap();
        assert!(a.describe().starts_with("factors=1 "), "{}", a.describe());
    }
    // the other way round: two factors saved under a config that says 1
    let (c, config, params) = f2_lin0();
    let PeftConfig::Boft(mut cfg) = config else {
        panic!("not BOFT")
    };
    cfg.boft_n_butterfly_factor = 1;
    let one = PeftConfig::Boft(cfg);
    let slot = &c.slots["lin0"];
    let a = registry::build_adapter(&one, "lin0", slot.base(), &params).unwrap();
    assert!(a.describe().starts_with("factors=2 "), "{}", a.describe());
    let mut fresh = peft::AdapterSlot::new("lin0", slot.base().clone());
    fresh.add_adapter("default", a).unwrap();
    let io = load(&fixtures_dir().join("boft/cases/boft_f2_linear/io.safetensors"));
    let y = fresh
        .forward(&io["input.lin0"], &ForwardCtx::eval())
        .unwrap();
    assert_close(
        "f2 under a factor-1 config",
        &y,
        &io["output.lin0"],
        1e-5,
        1e-4,
    );
}

#[test]
fn boft_new_adapter_has_the_config_factors_and_is_the_identity() {
    for name in ["boft_f2_conv2d", "boft_stock_cpu_linear", "boft_f3_linear"] {
        let dir = fixtures_dir().join("boft/cases").join(name);
        let c = load_case(&dir);
        let (_, config, _, _) = &c.adapters[0];
        let PeftConfig::Boft(cfg) = config else {
            panic!("not BOFT")
        };
        let io = load(&dir.join("io.safetensors"));
        for (m, slot) in &c.slots {
            let a =
                registry::new_adapter(config, m, slot.base(), &mut peft::PeftRng::new(1)).unwrap();
            let t = a.tensors();
            assert_eq!(
                t[0].1.dim(0).unwrap(),
                cfg.boft_n_butterfly_factor,
                "{name}: {m}"
            );
            assert_eq!(
                t[0].1
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap(),
                0.0
            );
            assert_eq!(t[1].1.min_all().unwrap().to_scalar::<f32>().unwrap(), 1.0);
            let mut fresh = peft::AdapterSlot::new(m.clone(), slot.base().clone());
            fresh.add_adapter("default", a).unwrap();
            let y = fresh
                .forward(&io[&format!("input_disabled.{m}")], &ForwardCtx::eval())
                .unwrap();
            assert_close(
                &format!("{name}: {m}: identity"),
                &y,
                &io[&format!("output_disabled.{m}")],
                1e-5,
                1e-4,
            );
        }
    }
}
