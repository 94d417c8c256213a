//! FRoD parity with PEFT 0.21.2 on the fixtures of `fixtures/frod/` (written by `gen_frod.py`, every `λ` and
//! every sparse value random and perturbed): per-layer forward (one and two active adapters, GPT-2 Conv1D, a
//! tiny Llama with one basis per role), disabled forward, merged weights (`W + U·(S + diag λ)·Vᵀ − W`),
//! unmerge, save → re-load (the shared bases and positions included), `peft merge` without a model, fresh
//! positions drawn as PEFT draws them, and the errors.

use crate::common::*;
use crate::lora_parity::load_case;
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::layer::registry;
use peft::tuners::TargetLayer;
use peft::tuners::frod::model::category_from_key;
use peft::{PeftConfig, PeftError};

const CASES: [&str; 4] = [
    "frod_conv1d",
    "frod_linear",
    "frod_llama",
    "frod_two_adapters",
];

layer_method_parity_tests!("frod", CASES, "FROD", parity::MergeChecks::default(), |k| k
    .contains(".frod_lambda_")
    || k.starts_with("base_model.frod_"));

fn case_dir(name: &str) -> std::path::PathBuf {
    fixtures_dir().join("frod/cases").join(name)
}

fn ints(t: &Tensor) -> Vec<i64> {
    t.flatten_all().unwrap().to_vec1::<i64>().unwrap()
}

/// A fresh adapter's bases (from the base weights) and sparse positions (torch's `randperm` from
/// `projection_prng_key`, one generator over the categories in sorted order): the positions are PEFT's, and
/// the bases rewrite each weight exactly (a fresh adapter is the identity). The bases themselves are PEFT's
/// only up to the eigensolver's choices (PEFT's eigenproblem is near-degenerate: a multiple of the identity
/// for one layer per role, clusters at `1/α` for more), which is why FRoD's bases are always saved.
#[test]
fn fresh_projections_draw_peft_s_positions_and_bases() {
    for name in CASES {
        let dir = case_dir(name);
        let c = load_case(&dir);
        let targets = strings(&case_json(&dir), "targets");
        // (PEFT's second adapter reuses the first one's bases and positions, its own `sparse_rate` ignored;
        // here each adapter draws its own: only the first is compared)
        for (adapter, config, _, original) in c.adapters.iter().take(1) {
            let layers: Vec<TargetLayer> = targets
                .iter()
                .map(|m| TargetLayer::of(m, c.slots[m].base()))
                .collect();
            let PeftConfig::Frod(cfg) = config else {
                unreachable!()
            };
            let fresh = cfg.new_projections(&layers).unwrap();
            // a model refuses to create one (PEFT would not load it back)
            let e = registry::shared_tensors(config, None, &layers, &Device::Cpu).unwrap_err();
            assert!(e.to_string().contains("--init-adapter"), "{e}");
            let mut cats: Vec<String> = targets.iter().map(|m| category_from_key(m)).collect();
            cats.sort();
            cats.dedup();
            for cat in &cats {
                let what = format!("{name} {adapter} {cat}");
                let ik = format!("base_model.frod_s_indices.{cat}");
                assert_eq!(ints(&fresh[&ik]), ints(&original[&ik]), "{what}: positions");
                let sk = format!("base_model.frod_s_size.{cat}");
                assert_eq!(ints(&fresh[&sk]), ints(&original[&sk]), "{what}: size");
            }
            // a fresh adapter (init_weights: S zero) on the fresh bases is the identity: W = U·diag(λ)·Vᵀ
            let fresh_config: PeftConfig = match config {
                PeftConfig::Frod(f) => peft::config::FrodConfig {
                    init_weights: true,
                    ..f.clone()
                }
                .into(),
                _ => unreachable!(),
            };
            let io = load(&dir.join("io.safetensors"));
            for m in &targets {
                let base = c.slots[m].base();
                let a = registry::new_adapter_with_shared(
                    &fresh_config,
                    m,
                    base,
                    &mut peft::PeftRng::new(0),
                    &fresh,
                )
                .unwrap();
                let mut slot = peft::AdapterSlot::new(m.clone(), base.clone());
                slot.add_adapter("fresh", a).unwrap();
                slot.set_active(&["fresh"]);
                let x = &io[&format!("input.{m}")];
                let y = slot.forward(x, &peft::ForwardCtx::eval()).unwrap();
                let want = base.forward(x).unwrap();
                assert_close(
                    &format!("{name} {adapter} {m}: fresh identity"),
                    &y,
                    &want,
                    1e-4,
                    1e-3,
                );
            }
        }
    }
}

#[test]
fn frod_missing_unexpected_and_bad_tensors_are_named() {
    let c = load_case(&case_dir("frod_linear"));
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin0"].base();
    let params = &split.modules["lin0"];
    let shared = &split.shared;
    let build = |p: &IndexMap<String, Tensor>, s: &registry::SharedTensors| {
        registry::build_adapter_with_shared(config, "lin0", base, p, s)
    };
    build(params, shared).expect("the fixture builds");
    let mut half = params.clone();
    half.shift_remove("frod_lambda_s_values");
    let e = build(&half, shared).unwrap_err();
    assert!(
        matches!(&e, PeftError::MissingKey(k) if k.ends_with("frod_lambda_s_values")),
        "{e}"
    );
    let mut extra = params.clone();
    extra.insert("frod_other".into(), params["frod_lambda_l"].clone());
    assert!(matches!(
        build(&extra, shared).unwrap_err(),
        PeftError::UnexpectedKeys(_)
    ));
    let mut wrong = params.clone();
    wrong.insert(
        "frod_lambda_l".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(matches!(
        build(&wrong, shared).unwrap_err(),
        PeftError::ShapeMismatch { .. }
    ));
    // the shared tensors
    let e = build(params, &registry::SharedTensors::new()).unwrap_err();
    assert!(e.to_string().contains("bases"), "{e}");
    let mut no_v = shared.clone();
    no_v.shift_remove("base_model.frod_V.lin0");
    let e = build(params, &no_v).unwrap_err();
    assert!(
        matches!(&e, PeftError::MissingKey(k) if k == "base_model.frod_V.lin0"),
        "{e}"
    );
    let mut outside = shared.clone();
    let idx = &shared["base_model.frod_s_indices.lin0"];
    outside.insert(
        "base_model.frod_s_indices.lin0".into(),
        (idx.to_dtype(DType::F32).unwrap() + 100.0)
            .unwrap()
            .to_dtype(DType::I64)
            .unwrap(),
    );
    let e = build(params, &outside).unwrap_err();
    assert!(e.to_string().contains("outside"), "{e}");
    let mut bad_size = shared.clone();
    bad_size.insert(
        "base_model.frod_s_size.lin0".into(),
        Tensor::new(&[3i64, 3], &Device::Cpu).unwrap(),
    );
    assert!(build(params, &bad_size).is_err());
    let mut more = shared.clone();
    more.insert(
        "base_model.frod_other".into(),
        shared["base_model.frod_V.lin0"].clone(),
    );
    let lin0 = [TargetLayer::of("lin0", base)];
    let e = registry::shared_tensors(config, Some(&more), &lin0, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&e, PeftError::UnexpectedKeys(k) if k == &["base_model.frod_other"]),
        "{e}"
    );
    // layers FRoD does not wrap
    let emb = peft::BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let e = registry::build_adapter_with_shared(config, "lin0", &emb, params, shared).unwrap_err();
    assert!(
        matches!(&e, PeftError::Unsupported { field, .. } if field == "target_modules"),
        "{e}"
    );
}
