//! VB-LoRA parity with PEFT 0.21.2 on the fixtures of `fixtures/vblora/` (written by `gen_vblora.py`, every
//! logits tensor and every vector bank random and perturbed): per-layer forward (full logits, the
//! `save_only_topk_weights` form with uint8 and int16 indices and `topk = 1`, two active adapters with their own
//! banks, GPT-2 Conv1D, a tiny Llama), disabled forward, merged weights (`W + ΔW`), unmerge, save → re-load (the
//! shared `base_model.vblora_vector_bank` and the integer top-k indices included), `peft merge` without a model,
//! `PeftModel` loading, training and saving, and the errors.

use crate::common::*;
use crate::lora_parity::load_case;
use crate::peft_model::MlpHost;
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::config::{TargetModules, VbLoraConfig};
use peft::host::AdapterHost;
use peft::io::{load_adapter, peft_key, split_keys};
use peft::layer::registry;
use peft::tuners::vblora::layer::VECTOR_BANK_KEY;
use peft::{BaseLayer, ForwardCtx, PeftConfig, PeftError, PeftModel, PeftRng};

const CASES: [&str; 5] = [
    "vblora_conv1d",
    "vblora_linear",
    "vblora_llama",
    "vblora_topk",
    "vblora_two_adapters",
];

layer_method_parity_tests!(
    "vblora",
    CASES,
    "VBLORA",
    parity::MergeChecks::default(),
    |k| k.contains(".vblora_logits_") || k == "base_model.vblora_vector_bank"
);

fn lin0_target() -> peft::tuners::TargetLayer {
    peft::tuners::TargetLayer {
        module: "lin0".into(),
        in_features: 16,
        out_features: 24,
        base: None,
    }
}

fn case_dir(name: &str) -> std::path::PathBuf {
    fixtures_dir().join("vblora/cases").join(name)
}

#[test]
fn vblora_adapters_move_the_output_and_topk_files_hold_peft_dtypes() {
    for_each_case(|dir, c| {
        parity::assert_forward_matches(dir, c, Some(1e-3));
        for (name, config, split, original) in &c.adapters {
            let PeftConfig::VbLora(cfg) = config else {
                panic!("not VB-LoRA")
            };
            assert_eq!(
                split.shared[VECTOR_BANK_KEY].dims(),
                [cfg.num_vectors, cfg.vector_length]
            );
            let want = if cfg.num_vectors < 256 {
                DType::U8
            } else {
                DType::I16
            };
            let indices: Vec<_> = original
                .iter()
                .filter(|(k, _)| k.ends_with("_topk_indices"))
                .collect();
            assert_eq!(
                !indices.is_empty(),
                cfg.save_only_topk_weights,
                "{}: {name}",
                dir.display()
            );
            for (k, t) in indices {
                assert_eq!(t.dtype(), want, "{k}");
            }
        }
    });
}

#[test]
fn vblora_missing_unexpected_and_misshapen_tensors_are_named() {
    let c = load_case(&case_dir("vblora_linear"));
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin0"].base();
    let params = &split.modules["lin0"];
    let shared = &split.shared;
    let build = |p: &IndexMap<String, Tensor>, s: &registry::SharedTensors| {
        registry::build_adapter_with_shared(config, "lin0", base, p, s)
    };
    build(params, shared).expect("the fixture builds");
    // per-layer tensors
    let e = build(&IndexMap::new(), shared).unwrap_err();
    assert!(
        matches!(&e, PeftError::MissingKey(k) if k == &peft_key("lin0", "vblora_logits_A")),
        "{e}"
    );
    let mut extra = params.clone();
    extra.insert("vblora_other".into(), params["vblora_logits_A"].clone());
    let e = build(&extra, shared).unwrap_err();
    assert!(
        matches!(&e, PeftError::UnexpectedKeys(k) if k == &[peft_key("lin0", "vblora_other")]),
        "{e}"
    );
    // lin0 is 16 -> 24 with vectors of length 4: logits_B [6, r=4, 16]
    let mut wrong = params.clone();
    wrong.insert(
        "vblora_logits_B".into(),
        Tensor::zeros((4, 4, 16), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = build(&wrong, shared).unwrap_err();
    assert!(
        matches!(&e, PeftError::ShapeMismatch { name, expected, got } if name == &peft_key("lin0", "vblora_logits_B") && expected == &[6, 4, 16] && got == &[4, 4, 16]),
        "{e}"
    );
    // the top-k form is only read with `save_only_topk_weights` (PEFT remaps it only then)
    let PeftConfig::VbLora(cfg) = config else {
        panic!("not VB-LoRA")
    };
    let mut topk_form = IndexMap::new();
    for name in ["vblora_logits_A", "vblora_logits_B"] {
        let (i, w) =
            peft::tuners::vblora::topk::to_topk(&params[name], cfg.topk, cfg.num_vectors).unwrap();
        topk_form.insert(format!("{name}_topk_indices"), i);
        topk_form.insert(format!("{name}_topk_weights"), w);
    }
    let e = build(&topk_form, shared).unwrap_err();
    assert!(matches!(&e, PeftError::MissingKey(_)), "{e}");
    let topk_config: PeftConfig = VbLoraConfig {
        save_only_topk_weights: true,
        ..cfg.clone()
    }
    .into();
    registry::build_adapter_with_shared(&topk_config, "lin0", base, &topk_form, shared)
        .expect("the top-k form builds");
    let mut half = topk_form.clone();
    half.shift_remove("vblora_logits_B_topk_weights");
    let e =
        registry::build_adapter_with_shared(&topk_config, "lin0", base, &half, shared).unwrap_err();
    assert!(
        matches!(&e, PeftError::MissingKey(k) if k == &peft_key("lin0", "vblora_logits_B_topk_weights")),
        "{e}"
    );
    let mut out_of_range = topk_form.clone();
    out_of_range.insert(
        "vblora_logits_A_topk_indices".into(),
        (topk_form["vblora_logits_A_topk_indices"]
            .to_dtype(DType::F32)
            .unwrap()
            + 100.0)
            .unwrap()
            .to_dtype(DType::U8)
            .unwrap(),
    );
    let e = registry::build_adapter_with_shared(&topk_config, "lin0", base, &out_of_range, shared)
        .unwrap_err();
    assert!(e.to_string().contains("outside the vector bank"), "{e}");
    // the shared vector bank
    let e = build(params, &registry::SharedTensors::new()).unwrap_err();
    assert!(e.to_string().contains("vector bank"), "{e}");
    let file_shared = |t: Tensor| registry::SharedTensors::from([(VECTOR_BANK_KEY.to_string(), t)]);
    let e = registry::shared_tensors(
        config,
        Some(&file_shared(
            Tensor::zeros((16, 8), DType::F32, &Device::Cpu).unwrap(),
        )),
        &[lin0_target()],
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(
        matches!(&e, PeftError::ShapeMismatch { name, expected, .. } if name == VECTOR_BANK_KEY && expected == &[16, 4]),
        "{e}"
    );
    let e = registry::shared_tensors(
        config,
        Some(&registry::SharedTensors::new()),
        &[lin0_target()],
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(
        matches!(&e, PeftError::MissingKey(k) if k == VECTOR_BANK_KEY),
        "{e}"
    );
    let mut more = shared.clone();
    more.insert(
        "base_model.vblora_other".into(),
        shared[VECTOR_BANK_KEY].clone(),
    );
    let e =
        registry::shared_tensors(config, Some(&more), &[lin0_target()], &Device::Cpu).unwrap_err();
    assert!(
        matches!(&e, PeftError::UnexpectedKeys(k) if k == &["base_model.vblora_other"]),
        "{e}"
    );
}

#[test]
fn vblora_bad_configs_and_unsupported_layers_are_errors() {
    let c = load_case(&case_dir("vblora_linear"));
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin0"].base();
    let mut rng = PeftRng::new(0);
    // a vector length that does not divide the layer (PEFT's ValueError)
    let odd = PeftConfig::from_json_str(
        r#"{"peft_type": "VBLORA", "num_vectors": 8, "vector_length": 5}"#,
    )
    .unwrap();
    let shared = registry::new_shared_tensors(&odd, &[lin0_target()], &Device::Cpu, &rng).unwrap();
    let e = registry::new_adapter_with_shared(&odd, "lin0", base, &mut rng, &shared).unwrap_err();
    assert!(
        matches!(&e, PeftError::InvalidConfig(m) if m.contains("`in_features` 16 must be divisible by `vector_length` 5")),
        "{e}"
    );
    // layers VB-LoRA does not wrap (PEFT's TypeError)
    let emb =
        BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let e = registry::new_adapter_with_shared(config, "emb", &emb, &mut rng, &split.shared)
        .unwrap_err();
    assert!(
        matches!(&e, PeftError::Unsupported { field, .. } if field == "target_modules"),
        "{e}"
    );
    let conv = BaseLayer::conv2d(
        Tensor::zeros((8, 4, 1, 1), DType::F32, &Device::Cpu).unwrap(),
        None,
        Default::default(),
    )
    .unwrap();
    let e = registry::new_adapter_with_shared(config, "conv", &conv, &mut rng, &split.shared)
        .unwrap_err();
    assert!(matches!(&e, PeftError::Unsupported { .. }), "{e}");
    for (bad, field) in [
        (r#"{"peft_type": "VBLORA", "bias": "vblora_only"}"#, "bias"),
        (r#"{"peft_type": "VBLORA", "bias": "all"}"#, "bias"),
        (
            r#"{"peft_type": "VBLORA", "use_rslora": true}"#,
            "use_rslora",
        ),
    ] {
        let e = PeftConfig::from_json_str(bad)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(
            matches!(&e, PeftError::Unsupported { field: f, .. } if f == field),
            "{bad}: {e}"
        );
    }
    for bad in [
        r#"{"peft_type": "VBLORA", "r": 0}"#,
        r#"{"peft_type": "VBLORA", "topk": 0}"#,
        r#"{"peft_type": "VBLORA", "num_vectors": 2, "topk": 3}"#,
        r#"{"peft_type": "VBLORA", "vector_length": 0}"#,
        r#"{"peft_type": "VBLORA", "init_logits_std": -1.0}"#,
    ] {
        let e = PeftConfig::from_json_str(bad)
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(matches!(&e, PeftError::InvalidConfig(_)), "{bad}: {e}");
    }
    let e = PeftConfig::from_json_str(r#"{"peft_type": "VBLORA", "r": -1}"#).unwrap_err();
    assert!(e.to_string().contains("`r`"), "{e}");
}

#[test]
fn vblora_integer_tensors_other_than_the_topk_indices_are_refused() {
    let dir = case_dir("vblora_topk");
    let file = load_adapter(dir.join("adapter"), &Device::Cpu).unwrap();
    let mut tensors = file.tensors.clone();
    peft::io::check_adapter_tensors("x".as_ref(), &tensors, Default::default())
        .expect("the top-k indices are admitted");
    let k = "base_model.model.lin0.vblora_logits_A_topk_weights";
    tensors.insert(k.into(), tensors[k].to_dtype(DType::U8).unwrap());
    let e =
        peft::io::check_adapter_tensors("x".as_ref(), &tensors, Default::default()).unwrap_err();
    assert!(e.to_string().contains(k), "{e}");
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

#[test]
fn vblora_peft_model_loads_and_saves_peft_files() {
    for name in ["vblora_linear", "vblora_topk"] {
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
        assert_eq!(a, b, "{name}: keys");
        for (k, t) in &original.tensors {
            assert_eq!(back.tensors[k].dtype(), t.dtype(), "{name}: {k}");
            assert_close(&format!("{name}: {k}"), &back.tensors[k], t, 0.0, 0.0);
        }
        let again = PeftModel::from_pretrained(
            MlpHost::from_base(&case_dir(name).join("base.safetensors")),
            tmp.path(),
            "default",
            &Device::Cpu,
        )
        .unwrap();
        check_forward(&format!("{name} reloaded"), &again, name);
    }
}

#[test]
fn vblora_topk_adapter_refuses_training_and_saves_full_logits_when_asked() {
    let pm = mlp_model("vblora_topk");
    let io = load(&case_dir("vblora_topk").join("io.safetensors"));
    let slot = &pm.model().slots()[0];
    let x = &io[&format!("input.{}", slot.name())];
    slot.forward(x, &ForwardCtx::eval()).unwrap();
    let e = slot.forward(x, &ForwardCtx::train(0, 0)).unwrap_err();
    assert!(e.to_string().contains("save_only_topk_weights"), "{e}");
    // Saved without `save_only_topk_weights`: the logits PEFT recovers (−∞ outside the top k).
    let PeftConfig::VbLora(cfg) = &pm.configs()["default"] else {
        panic!("not VB-LoRA")
    };
    let full: PeftConfig = VbLoraConfig {
        save_only_topk_weights: false,
        ..cfg.clone()
    }
    .into();
    let sd =
        peft::io::adapter_state_dict(pm.model().slots(), "default", &full, &|_| false).unwrap();
    let keys: Vec<&str> = sd.iter().map(|(k, _)| k.as_str()).collect();
    assert!(
        keys.iter()
            .all(|k| k.ends_with("vblora_logits_A") || k.ends_with("vblora_logits_B")),
        "{keys:?}"
    );
    let (_, la) = &sd[0];
    assert_eq!(la.dims()[2], cfg.num_vectors);
    let finite = la
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .filter(|v| v.is_finite())
        .count();
    assert_eq!(finite, la.elem_count() / cfg.num_vectors * cfg.topk);
}

fn fresh_model(save_only_topk_weights: bool, seed: u64) -> PeftModel<MlpHost> {
    let dir = case_dir("vblora_linear");
    let config: PeftConfig = VbLoraConfig {
        targets: peft::config::TargetFields {
            target_modules: Some(TargetModules::from(["lin0", "lin1"])),
            ..Default::default()
        },
        r: 2,
        num_vectors: 8,
        vector_length: 4,
        save_only_topk_weights,
        init_vector_bank_bound: 0.5,
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
fn vblora_trains_the_logits_and_the_one_shared_bank() {
    let pm = fresh_model(false, 3);
    let vars = pm.trainable_vars();
    let names: Vec<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        [
            "lin0.vblora_logits_A",
            "lin0.vblora_logits_B",
            "lin1.vblora_logits_A",
            "lin1.vblora_logits_B",
            "vblora_vector_bank"
        ]
    );
    // PEFT counts the bank once among the trainable parameters
    let count: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    assert_eq!(pm.trainable_parameters().trainable, count);
    let bank = vars[4].1.clone();
    assert_eq!(bank.dims(), [8, 4]);
    // a different seed draws another bank
    let other = fresh_model(false, 4);
    assert!(max_diff(other.trainable_vars()[4].1.as_tensor(), bank.as_tensor()) > 0.0);

    let io = load(&case_dir("vblora_linear").join("io.safetensors"));
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
    for (k, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{k}: no gradient"));
        let total = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(total.is_finite() && total > 0.0, "{k}: {total}");
        v.set(&(v.as_tensor() - (g * 0.5).unwrap()).unwrap())
            .unwrap();
    }
    let after = run(&ForwardCtx::eval());
    assert!(max_diff(&before, &after) > 1e-4, "a step moves the output");
    // the saved bank is the trained one, and the saved adapter reloads to the trained forward
    let tmp = tempfile::tempdir().unwrap();
    pm.save_pretrained(tmp.path()).unwrap();
    let file = load_adapter(tmp.path(), &Device::Cpu).unwrap();
    assert_eq!(
        max_diff(&file.tensors[VECTOR_BANK_KEY], bank.as_tensor()),
        0.0
    );
    let again = PeftModel::from_pretrained(
        MlpHost::from_base(&case_dir("vblora_linear").join("base.safetensors")),
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
fn vblora_save_only_topk_weights_writes_peft_layout_and_reloads_for_inference() {
    let pm = fresh_model(true, 5);
    let tmp = tempfile::tempdir().unwrap();
    pm.save_pretrained(tmp.path()).unwrap();
    let file = load_adapter(tmp.path(), &Device::Cpu).unwrap();
    let mut keys: Vec<(&str, DType, Vec<usize>)> = file
        .tensors
        .iter()
        .map(|(k, t)| (k.as_str(), t.dtype(), t.dims().to_vec()))
        .collect();
    keys.sort_by(|a, b| a.0.cmp(b.0));
    // lin0 16 -> 24, lin1 24 -> 12, vectors of length 4, r = 2, topk = 2
    assert_eq!(
        keys,
        [
            (
                "base_model.model.lin0.vblora_logits_A_topk_indices",
                DType::U8,
                vec![2, 4, 2]
            ),
            (
                "base_model.model.lin0.vblora_logits_A_topk_weights",
                DType::F32,
                vec![2, 4, 1]
            ),
            (
                "base_model.model.lin0.vblora_logits_B_topk_indices",
                DType::U8,
                vec![6, 2, 2]
            ),
            (
                "base_model.model.lin0.vblora_logits_B_topk_weights",
                DType::F32,
                vec![6, 2, 1]
            ),
            (
                "base_model.model.lin1.vblora_logits_A_topk_indices",
                DType::U8,
                vec![2, 6, 2]
            ),
            (
                "base_model.model.lin1.vblora_logits_A_topk_weights",
                DType::F32,
                vec![2, 6, 1]
            ),
            (
                "base_model.model.lin1.vblora_logits_B_topk_indices",
                DType::U8,
                vec![3, 2, 2]
            ),
            (
                "base_model.model.lin1.vblora_logits_B_topk_weights",
                DType::F32,
                vec![3, 2, 1]
            ),
            ("base_model.vblora_vector_bank", DType::F32, vec![8, 4]),
        ]
    );
    let again = PeftModel::from_pretrained(
        MlpHost::from_base(&case_dir("vblora_linear").join("base.safetensors")),
        tmp.path(),
        "default",
        &Device::Cpu,
    )
    .unwrap();
    let io = load(&case_dir("vblora_linear").join("io.safetensors"));
    let x = &io["input.lin0"];
    let a = pm.model().slots()[0]
        .forward(x, &ForwardCtx::eval())
        .unwrap();
    let b = again.model().slots()[0]
        .forward(x, &ForwardCtx::eval())
        .unwrap();
    assert_close("top-k reload", &b, &a, 1e-5, 1e-4);
    assert!(
        again.model().slots()[0]
            .forward(x, &ForwardCtx::train(0, 0))
            .is_err()
    );
    let split = split_keys(
        &file.tensors,
        registry::param_prefixes(&file.config).unwrap(),
    )
    .unwrap();
    assert_eq!(split.shared.len(), 1);
}
