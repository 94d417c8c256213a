//! UniLoRA parity with PEFT 0.21.2 on the fixtures of `fixtures/unilora/` (written by `gen_unilora.py`, every
//! `theta_d` random and perturbed): numpy's generator (`numpy_rng.json`), the index assignment over all
//! targeted layers (against the indices and scales PEFT saves with `save_indices`), per-layer forward (one and
//! two adapters, GPT-2 Conv1D, tiny Llamas whose files hold no indices), disabled forward, merged weights,
//! unmerge, save → re-load, `peft merge` without a model (by the module order of the base's config.json),
//! `PeftModel` loading, training and saving, and the errors.

use crate::common::*;
use crate::lora_parity::load_case;
use crate::peft_model::MlpHost;
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::config::{TargetModules, UniLoraConfig};
use peft::host::AdapterHost;
use peft::io::{load_adapter, peft_key};
use peft::layer::registry;
use peft::tuners::TargetLayer;
use peft::tuners::unilora::layer::THETA_D_KEY;
use peft::tuners::unilora::numpy_rng::{Pcg64, generate_index};
use peft::{ForwardCtx, PeftConfig, PeftError, PeftModel};

const CASES: [&str; 5] = [
    "unilora_conv1d",
    "unilora_linear",
    "unilora_llama",
    "unilora_llama_long",
    "unilora_two_adapters",
];

layer_method_parity_tests!(
    "unilora",
    CASES,
    "UNILORA",
    parity::MergeChecks::default(),
    |k| k.contains(".unilora_") || k == "base_model.unilora_theta_d"
);

fn case_dir(name: &str) -> std::path::PathBuf {
    fixtures_dir().join("unilora/cases").join(name)
}

fn ints(t: &Tensor) -> Vec<i64> {
    t.flatten_all().unwrap().to_vec1::<i64>().unwrap()
}

#[test]
fn numpy_default_rng_and_generate_index_match_numpy() {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join("unilora/numpy_rng.json")).unwrap(),
    )
    .unwrap();
    for raw in json["raw"].as_array().unwrap() {
        let seed = raw["seed"].as_u64().unwrap();
        let mut g = Pcg64::from_seed(seed as u128);
        for (i, want) in raw["u64"].as_array().unwrap().iter().enumerate() {
            let want: u64 = want.as_str().unwrap().parse().unwrap();
            assert_eq!(g.next_u64(), want, "seed {seed}: output {i}");
        }
    }
    let cases = json["generate_index"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for c in cases {
        let (n, d, seed) = (
            c["lora_param_count"].as_u64().unwrap(),
            c["theta_d_length"].as_u64().unwrap(),
            c["proj_seed"].as_u64().unwrap(),
        );
        let want: Vec<u64> = c["indices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert_eq!(
            generate_index(n, d, seed as u128).unwrap(),
            want,
            "generate_index({n}, {d}, {seed})"
        );
    }
}

#[test]
fn index_assignment_equals_the_indices_and_scales_peft_saves() {
    for name in ["unilora_linear", "unilora_two_adapters", "unilora_conv1d"] {
        let c = load_case(&case_dir(name));
        let targets = strings(&case_json(&case_dir(name)), "targets");
        for (adapter, config, split, _) in &c.adapters {
            let PeftConfig::UniLora(cfg) = config else {
                panic!("not UniLoRA")
            };
            assert!(cfg.save_indices);
            let layers: Vec<TargetLayer> = targets
                .iter()
                .map(|m| TargetLayer::of(m, c.slots[m].base()))
                .collect();
            let layouts = cfg.layouts(&layers, &Device::Cpu).unwrap();
            for (m, l) in targets.iter().zip(&layouts) {
                let saved = &split.modules[m];
                let what = format!("{name} {adapter} {m}");
                assert_eq!(saved["unilora_indices_A"].dtype(), DType::I64, "{what}");
                assert_eq!(
                    ints(&l.indices_a),
                    ints(&saved["unilora_indices_A"]),
                    "{what}: A"
                );
                assert_eq!(
                    ints(&l.indices_b),
                    ints(&saved["unilora_indices_B"]),
                    "{what}: B"
                );
                assert_close(&what, &l.scales_a, &saved["unilora_scales_A"], 0.0, 0.0);
                assert_close(&what, &l.scales_b, &saved["unilora_scales_B"], 0.0, 0.0);
            }
            // every theta_d entry is read ⌊D/d⌋ or ⌈D/d⌉ times
            let all: Vec<i64> = layouts
                .iter()
                .flat_map(|l| [ints(&l.indices_a), ints(&l.indices_b)].concat())
                .collect();
            let mut counts = vec![0usize; cfg.theta_d_length];
            for i in &all {
                counts[*i as usize] += 1;
            }
            let lo = all.len() / cfg.theta_d_length;
            assert!(counts.iter().all(|&n| n == lo || n == lo + 1), "{name}");
        }
    }
}

#[test]
fn files_without_indices_hold_only_theta_d() {
    for name in ["unilora_llama", "unilora_llama_long"] {
        let file = load_adapter(case_dir(name).join("adapter"), &Device::Cpu).unwrap();
        let keys: Vec<&str> = file.tensors.keys().map(String::as_str).collect();
        assert_eq!(keys, [THETA_D_KEY], "{name}");
    }
}

fn mlp_model(name: &str) -> PeftModel<MlpHost> {
    let dir = case_dir(name);
    PeftModel::from_pretrained(
        MlpHost::from_base(&dir.join("base.safetensors")),
        dir.join("adapter"),
        "default",
        &Device::Cpu,
    )
    .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn check_forward(what: &str, pm: &PeftModel<MlpHost>, name: &str) {
    let dir = case_dir(name);
    let io = load(&dir.join("io.safetensors"));
    for m in strings(&case_json(&dir), "targets") {
        let slot = pm
            .model()
            .slots()
            .into_iter()
            .find(|s| s.name() == m)
            .unwrap();
        let y = slot
            .forward(&io[&format!("input.{m}")], &ForwardCtx::eval())
            .unwrap();
        assert_close(
            &format!("{what}: {m}"),
            &y,
            &io[&format!("output.{m}")],
            1e-5,
            1e-4,
        );
    }
}

/// The fixture's adapter with `save_indices` off, written beside a copy: only `theta_d`.
fn without_indices(name: &str, out: &std::path::Path) {
    let dir = case_dir(name).join("adapter");
    let file = load_adapter(&dir, &Device::Cpu).unwrap();
    let PeftConfig::UniLora(mut cfg) = file.config.clone() else {
        panic!("not UniLoRA")
    };
    cfg.save_indices = false;
    let theta = file.tensors[THETA_D_KEY].clone();
    peft::io::save_adapter(out, &cfg.into(), &[(THETA_D_KEY.to_string(), theta)]).unwrap();
}

#[test]
fn unilora_peft_model_loads_and_saves_peft_files() {
    let name = "unilora_linear";
    let pm = mlp_model(name);
    check_forward(name, &pm, name);
    let tmp = tempfile::tempdir().unwrap();
    pm.save_pretrained(tmp.path()).unwrap();
    let original = load_adapter(case_dir(name).join("adapter"), &Device::Cpu).unwrap();
    let back = load_adapter(tmp.path(), &Device::Cpu).unwrap();
    let mut a: Vec<&String> = back.tensors.keys().collect();
    let mut b: Vec<&String> = original.tensors.keys().collect();
    a.sort();
    b.sort();
    assert_eq!(a, b, "keys");
    for (k, t) in &original.tensors {
        assert_eq!(back.tensors[k].dtype(), t.dtype(), "{k}");
        assert_close(k, &back.tensors[k], t, 0.0, 0.0);
    }
    // The same adapter without its indices: drawn again from proj_seed over lin0, lin1, the same forward.
    let bare = tempfile::tempdir().unwrap();
    without_indices(name, bare.path());
    let pm = PeftModel::from_pretrained(
        MlpHost::from_base(&case_dir(name).join("base.safetensors")),
        bare.path(),
        "default",
        &Device::Cpu,
    )
    .unwrap();
    check_forward("indices drawn again", &pm, name);
    let again = tempfile::tempdir().unwrap();
    pm.save_pretrained(again.path()).unwrap();
    let file = load_adapter(again.path(), &Device::Cpu).unwrap();
    let keys: Vec<&str> = file.tensors.keys().map(String::as_str).collect();
    assert_eq!(keys, [THETA_D_KEY]);
}

#[test]
fn unilora_missing_unexpected_and_bad_tensors_are_named() {
    let c = load_case(&case_dir("unilora_linear"));
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin0"].base();
    let params = &split.modules["lin0"];
    let shared = &split.shared;
    let build = |p: &IndexMap<String, Tensor>, s: &registry::SharedTensors| {
        registry::build_adapter_with_shared(config, "lin0", base, p, s)
    };
    build(params, shared).expect("the fixture builds");
    build(&IndexMap::new(), shared).expect("no indices: the drawn ones");
    let mut half = params.clone();
    half.shift_remove("unilora_scales_B");
    let e = build(&half, shared).unwrap_err();
    assert!(
        matches!(&e, PeftError::MissingKey(k) if k == &peft_key("lin0", "unilora_scales_B")),
        "{e}"
    );
    let mut extra = params.clone();
    extra.insert("unilora_other".into(), params["unilora_scales_A"].clone());
    let e = build(&extra, shared).unwrap_err();
    assert!(
        matches!(&e, PeftError::UnexpectedKeys(k) if k == &[peft_key("lin0", "unilora_other")]),
        "{e}"
    );
    // lin0 is 16 -> 24, r = 2: indices_B [24, 2]
    let mut wrong = params.clone();
    wrong.insert(
        "unilora_indices_B".into(),
        Tensor::zeros((2, 24), DType::I64, &Device::Cpu).unwrap(),
    );
    let e = build(&wrong, shared).unwrap_err();
    assert!(
        matches!(&e, PeftError::ShapeMismatch { name, expected, .. } if name == &peft_key("lin0", "unilora_indices_B") && expected == &[24, 2]),
        "{e}"
    );
    let mut outside = params.clone();
    outside.insert(
        "unilora_indices_A".into(),
        (Tensor::ones((2, 16), DType::I64, &Device::Cpu).unwrap() * 50.0).unwrap(),
    );
    let e = build(&outside, shared).unwrap_err();
    assert!(e.to_string().contains("outside theta_d"), "{e}");
    let mut float = params.clone();
    float.insert(
        "unilora_indices_A".into(),
        Tensor::zeros((2, 16), DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(
        build(&float, shared)
            .unwrap_err()
            .to_string()
            .contains("int64")
    );
    // the shared theta_d
    let e = build(params, &registry::SharedTensors::new()).unwrap_err();
    assert!(e.to_string().contains("theta_d"), "{e}");
    let one = |t: Tensor| registry::SharedTensors::from([(THETA_D_KEY.to_string(), t)]);
    let lin0 = [TargetLayer::of("lin0", base)];
    let e = registry::shared_tensors(
        config,
        Some(&one(Tensor::zeros(7, DType::F32, &Device::Cpu).unwrap())),
        &lin0,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(
        matches!(&e, PeftError::ShapeMismatch { name, expected, .. } if name == THETA_D_KEY && expected == &[50]),
        "{e}"
    );
    let e = registry::shared_tensors(
        config,
        Some(&registry::SharedTensors::new()),
        &lin0,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(
        matches!(&e, PeftError::MissingKey(k) if k == THETA_D_KEY),
        "{e}"
    );
    let mut more = one(shared[THETA_D_KEY].clone());
    more.insert(
        "base_model.unilora_other".into(),
        shared[THETA_D_KEY].clone(),
    );
    let e = registry::shared_tensors(config, Some(&more), &lin0, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&e, PeftError::UnexpectedKeys(k) if k == &["base_model.unilora_other"]),
        "{e}"
    );
    // layers UniLoRA does not wrap (PEFT's TypeError)
    let emb = peft::BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let e = registry::build_adapter_with_shared(config, "emb", &emb, &IndexMap::new(), shared)
        .unwrap_err();
    assert!(
        matches!(&e, PeftError::Unsupported { field, .. } if field == "target_modules"),
        "{e}"
    );
}

#[test]
fn unilora_merge_without_a_module_order_is_an_error_naming_save_indices() {
    // A bare base file (no config.json): the indices of an adapter that does not save them cannot be drawn.
    let tmp = tempfile::tempdir().unwrap();
    without_indices("unilora_linear", &tmp.path().join("adapter"));
    let adapter =
        peft::merge::MergeAdapter::load(tmp.path().join("adapter"), None, &Device::Cpu).unwrap();
    let e = peft::merge::merge_model(
        &case_dir("unilora_linear").join("base.safetensors"),
        vec![adapter],
        &tmp.path().join("merged.safetensors"),
        None,
        &mut |_, _, _| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("save_indices"), "{e}");
    assert!(!tmp.path().join("merged.safetensors").exists());
}

fn fresh_model(seed: u64) -> PeftModel<MlpHost> {
    let dir = case_dir("unilora_linear");
    let config: PeftConfig = UniLoraConfig {
        target_modules: Some(TargetModules::from(["lin0", "lin1"])),
        r: 2,
        theta_d_length: 32,
        init_theta_d_bound: 0.5,
        ..Default::default()
    }
    .into();
    PeftModel::get_peft_model(
        MlpHost::from_base(&dir.join("base.safetensors")),
        config,
        "default",
        seed,
    )
    .unwrap()
}

#[test]
fn unilora_trains_the_one_shared_theta_d() {
    let pm = fresh_model(3);
    let vars = pm.trainable_vars();
    let names: Vec<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["unilora_theta_d"]);
    assert_eq!(pm.trainable_parameters().trainable, 32);
    let theta = vars[0].1.clone();
    let other = fresh_model(4);
    assert!(max_diff(other.trainable_vars()[0].1.as_tensor(), theta.as_tensor()) > 0.0);

    let io = load(&case_dir("unilora_linear").join("io.safetensors"));
    let x = &io["model_input"];
    let run = |ctx: &ForwardCtx| {
        let slots = pm.model().slots();
        let h = slots[0].forward(x, ctx).unwrap().tanh().unwrap();
        slots[1].forward(&h, ctx).unwrap()
    };
    let before = run(&ForwardCtx::eval());
    let loss = run(&ForwardCtx::train(0, 0))
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let g = grads
        .get(theta.as_tensor())
        .expect("theta_d has a gradient");
    theta
        .set(&(theta.as_tensor() - (g * 0.5).unwrap()).unwrap())
        .unwrap();
    let after = run(&ForwardCtx::eval());
    assert!(max_diff(&before, &after) > 1e-4, "a step moves the output");
    // saved: theta_d only (save_indices false), and it reloads to the trained forward
    let tmp = tempfile::tempdir().unwrap();
    pm.save_pretrained(tmp.path()).unwrap();
    let file = load_adapter(tmp.path(), &Device::Cpu).unwrap();
    assert_eq!(file.tensors.len(), 1);
    assert_eq!(max_diff(&file.tensors[THETA_D_KEY], theta.as_tensor()), 0.0);
    let again = PeftModel::from_pretrained(
        MlpHost::from_base(&case_dir("unilora_linear").join("base.safetensors")),
        tmp.path(),
        "default",
        &Device::Cpu,
    )
    .unwrap();
    let slots = again.model().slots();
    let h = slots[0]
        .forward(x, &ForwardCtx::eval())
        .unwrap()
        .tanh()
        .unwrap();
    let y = slots[1].forward(&h, &ForwardCtx::eval()).unwrap();
    assert_close("reloaded", &y, &after, 1e-6, 1e-5);
}

#[test]
fn unilora_absurd_ranks_are_an_error_not_an_allocation() {
    let config: PeftConfig = UniLoraConfig {
        r: 1 << 28,
        ..Default::default()
    }
    .into();
    let layers = target_layers(&[(16, 24), (24, 12)]);
    let e = registry::shared_tensors(
        &config,
        Some(&registry::SharedTensors::from([(
            THETA_D_KEY.to_string(),
            Tensor::zeros(256, DType::F32, &Device::Cpu).unwrap(),
        )])),
        &layers,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(e.to_string().contains("factor entries"), "{e}");
}
