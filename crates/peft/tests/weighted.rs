//! `PeftModel::add_weighted_adapter` against PEFT 0.21.2 (`fixtures/lora/gen_weighted.py`): the combined
//! delta `B′A′·scaling` of every case within 1e-5, the saved config equal in content, PEFT's pre-clamp SVD
//! factors reproduced with its signs, DARE masks bit-exact from a torch seed, and PEFT's silent cases as
//! errors. The tiny-Llama logits and `peft eval`'s NLL are checked in `peft-cli` (`combine.rs`).

use crate::common::*;
use candle_core::{Device, Tensor};
use peft::host::AdapterHost;
use peft::merge_utils::MajoritySignMethod;
use peft::tuners::lora::weighted::{CombinationType, DareSeed, SvdSigns, WeightedOptions};
use peft::tuners::tuners_utils::{ModuleInfo, ModuleKind};
use peft::{AdapterSlot, BaseKind, BaseLayer, PeftConfig, PeftError, PeftModel};
use serde_json::Value;
use std::path::PathBuf;

/// The tiny Llama's Linear layers as slots, in PyTorch's `named_modules` order (the order PEFT's DARE draws
/// follow); norms are not modules here (nothing targets them).
struct LlamaLinears {
    slots: Vec<AdapterSlot>,
}

const SUBMODULES: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

impl LlamaLinears {
    fn load() -> Self {
        let base = load(&fixtures_dir().join("models/cases/llama/model.safetensors"));
        let mut slots = Vec::new();
        for layer in 0.. {
            let prefix = format!("model.layers.{layer}");
            if !base.contains_key(&format!("{prefix}.self_attn.q_proj.weight")) {
                break;
            }
            for sub in SUBMODULES {
                let m = format!("{prefix}.{sub}");
                let w = base[&format!("{m}.weight")].clone();
                let b = base.get(&format!("{m}.bias")).cloned();
                slots.push(AdapterSlot::new(m, BaseLayer::linear(w, b).unwrap()));
            }
        }
        Self { slots }
    }
}

impl AdapterHost for LlamaLinears {
    fn module_infos(&self) -> Vec<ModuleInfo> {
        self.slots
            .iter()
            .map(|s| ModuleInfo {
                name: s.name().into(),
                kind: ModuleKind::Linear,
            })
            .collect()
    }
    fn output_layer(&self) -> Option<String> {
        None
    }
    fn input_embeddings(&self) -> Option<String> {
        None
    }
    fn slots(&self) -> Vec<&AdapterSlot> {
        self.slots.iter().collect()
    }
    fn slots_mut(&mut self) -> Vec<&mut AdapterSlot> {
        self.slots.iter_mut().collect()
    }
    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
    fn set_tensor(&mut self, name: &str, _: Tensor) -> peft::Result<()> {
        Err(PeftError::MissingKey(name.into()))
    }
}

fn cases_dir() -> PathBuf {
    fixtures_dir().join("lora/weighted")
}

const SOURCES: [&str; 3] = ["alpha", "beta", "gamma"];

/// The base with the three PEFT-written source adapters loaded.
fn with_sources() -> PeftModel<LlamaLinears> {
    let mut pm = PeftModel::new(LlamaLinears::load(), 0);
    for n in SOURCES {
        let dir = cases_dir().join("weighted_sources/adapters").join(n);
        pm.load_adapter(&dir, n, &Device::Cpu).unwrap();
    }
    pm
}

/// Every `weighted_<case>` directory but the sources.
fn combination_cases() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(cases_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_str().unwrap();
            n.starts_with("weighted_") && n != "weighted_sources"
        })
        .collect();
    v.sort();
    assert!(v.len() >= 15, "weighted cases missing: {v:?}");
    v
}

/// torch's pre-clamp SVD factors of a clamp case, by module (layer 0).
fn torch_signs(dir: &std::path::Path) -> SvdSigns {
    let expected = load(&dir.join("expected.safetensors"));
    let mut refs = indexmap::IndexMap::new();
    for (k, b) in &expected {
        if let Some(m) = k
            .strip_prefix("preclamp.")
            .and_then(|k| k.strip_suffix(".B"))
        {
            let a = expected[&format!("preclamp.{m}.A")].clone();
            refs.insert(m.to_string(), (b.clone(), a));
        }
    }
    SvdSigns::Reference(refs)
}

/// The call a case made, as Rust options (DARE cases with PEFT's torch seed).
fn options_of(case: &Value) -> WeightedOptions {
    let kw = &case["kwargs"];
    let ctype: CombinationType = case["combination_type"].as_str().unwrap().parse().unwrap();
    WeightedOptions {
        svd_rank: kw["svd_rank"].as_u64().map(|r| r as usize),
        svd_clamp: kw["svd_clamp"].as_f64(),
        svd_full_matrices: kw["svd_full_matrices"].as_bool().unwrap_or(true),
        density: kw["density"].as_f64(),
        majority_sign_method: kw["majority_sign_method"]
            .as_str()
            .map(|m| m.parse::<MajoritySignMethod>().unwrap())
            .unwrap_or_default(),
        dare_seed: case["torch_seed"].as_u64().map(DareSeed::Torch),
        ..WeightedOptions::new(ctype)
    }
}

fn call_args(case: &Value) -> (Vec<String>, Vec<f64>) {
    let adapters = strings(case, "adapters");
    let weights = case["weights"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w.as_f64().unwrap())
        .collect();
    (adapters, weights)
}

fn combine(
    pm: &mut PeftModel<LlamaLinears>,
    case: &Value,
    name: &str,
    signs: SvdSigns,
) -> peft::Result<()> {
    let (adapters, weights) = call_args(case);
    let refs: Vec<&str> = adapters.iter().map(|s| s.as_str()).collect();
    let opts = WeightedOptions {
        svd_signs: signs,
        ..options_of(case)
    };
    pm.add_weighted_adapter(&refs, &weights, name, &opts)
}

fn delta(pm: &PeftModel<LlamaLinears>, module: &str, adapter: &str) -> Tensor {
    let slot = pm
        .model()
        .slots()
        .into_iter()
        .find(|s| s.name() == module)
        .unwrap_or_else(|| panic!("no slot {module}"));
    let a = slot
        .adapter(adapter)
        .unwrap_or_else(|| panic!("{module} has no `{adapter}`"));
    a.delta_weight(&BaseKind::Linear).unwrap().unwrap().0
}

/// PEFT's saved config and ours, equal in content: `target_modules` compared as sets (PEFT writes a Python
/// set), keys only one side writes must be at their defaults, `use_rslora` false on our side (not inherited).
fn assert_config_matches(what: &str, ours: &Value, peft: &Value) {
    let norm = |v: &Value| -> Value {
        let mut v = v.clone();
        if let Some(Value::Array(t)) = v.get_mut("target_modules") {
            t.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
        }
        v
    };
    let (ours, peft) = (norm(ours), norm(peft));
    let (o, p) = (ours.as_object().unwrap(), peft.as_object().unwrap());
    for (k, pv) in p {
        let ov = o.get(k).unwrap_or(&Value::Null);
        if k == "use_rslora" {
            assert_eq!(ov, &Value::Bool(false), "{what}: use_rslora");
            continue;
        }
        assert_eq!(ov, pv, "{what}: `{k}` differs (ours {ov}, PEFT {pv})");
    }
    for (k, ov) in o {
        if !p.contains_key(k) {
            assert!(ov.is_null(), "{what}: `{k}` = {ov} is not in PEFT's config");
        }
    }
}

#[test]
fn weighted_every_case_matches_peft_delta_and_config() {
    let mut pm = with_sources();
    let mut checked = Vec::new();
    for dir in combination_cases() {
        let case = case_json(&dir);
        let name = case["name"].as_str().unwrap().to_string();
        // the clamp cases take torch's singular-vector signs (see `weighted_svd_clamp_depends_on_signs`)
        let signs = if case["kwargs"]["svd_clamp"].is_null() {
            SvdSigns::Canonical
        } else {
            torch_signs(&dir)
        };
        combine(&mut pm, &case, "combined", signs).unwrap_or_else(|e| panic!("{name}: {e}"));
        // PEFT's rsLoRA-first result is √r too large (peft #3761); ours has scaling 1.
        let peft_scaling = case["peft_scaling"].as_f64().unwrap();
        let expected = load(&dir.join("expected.safetensors"));
        let mut n = 0;
        for (k, want) in &expected {
            let Some(m) = k.strip_prefix("delta.") else {
                continue;
            };
            let want = (want / peft_scaling).unwrap();
            let got = delta(&pm, m, "combined");
            assert_close(&format!("{name}: {m}"), &got, &want, 1e-5, 0.0);
            n += 1;
        }
        assert!(n >= 3, "{name}: only {n} deltas");
        // every module PEFT gave the combined adapter, and no other
        let ours: Vec<String> = pm
            .model()
            .slots()
            .iter()
            .filter(|s| s.adapter("combined").is_some())
            .map(|s| s.name().to_string())
            .collect();
        assert_eq!(ours, strings(&case, "targets"), "{name}: targets");
        let tmp = tempfile::tempdir().unwrap();
        pm.save_pretrained(tmp.path()).unwrap();
        let saved: Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join("combined/adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_config_matches(&name, &saved, &case["saved_config"]);
        assert!(
            !pm.active_adapters().contains(&"combined".to_string()),
            "{name}: the combined adapter must not become active"
        );
        pm.delete_adapter("combined").unwrap();
        checked.push(name);
    }
    println!("weighted cases matched: {}", checked.join(", "));
}

#[test]
fn weighted_rslora_first_is_not_inherited() {
    let dir = cases_dir().join("weighted_cat_rslora_first");
    let case = case_json(&dir);
    assert!(case["saved_config"]["use_rslora"].as_bool().unwrap());
    let s = case["peft_scaling"].as_f64().unwrap();
    let r = case["new_r"].as_f64().unwrap();
    assert!((s - r.sqrt()).abs() < 1e-6, "PEFT's scaling is √r: {s}");
    let mut pm = with_sources();
    combine(&mut pm, &case, "combined", SvdSigns::Canonical).unwrap();
    let PeftConfig::Lora(c) = &pm.configs()["combined"] else {
        panic!()
    };
    assert!(!c.lora.use_rslora);
    // cat is exact: Σ wᵢsᵢBᵢAᵢ, which PEFT's adapter overshoots by √r
    let (adapters, weights) = call_args(&case);
    for m in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.v_proj",
    ] {
        let mut want = Tensor::zeros((32, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
        for (a, w) in adapters.iter().zip(&weights) {
            want = (want + (delta(&pm, m, a) * *w).unwrap()).unwrap();
        }
        assert_close(m, &delta(&pm, m, "combined"), &want, 1e-5, 0.0);
    }
}

#[test]
fn weighted_svd_factors_align_with_torch_before_the_clamp() {
    let pm = with_sources();
    let mut n = 0;
    for dir in combination_cases() {
        let case = case_json(&dir);
        if case["kwargs"]["svd_clamp"].is_null() {
            continue;
        }
        let expected = load(&dir.join("expected.safetensors"));
        let (adapters, weights) = call_args(&case);
        let o = options_of(&case);
        let r = case["new_r"].as_u64().unwrap() as usize;
        for (k, want_b) in &expected {
            let Some(m) = k
                .strip_prefix("preclamp.")
                .and_then(|k| k.strip_suffix(".B"))
            else {
                continue;
            };
            let want_a = &expected[&format!("preclamp.{m}.A")];
            // the merged ΔW as PEFT computes it (these cases are svd and ties_svd)
            let mut deltas = Vec::new();
            let mut ws = Vec::new();
            for (a, w) in adapters.iter().zip(&weights) {
                let slot = pm
                    .model()
                    .slots()
                    .into_iter()
                    .find(|s| s.name() == m)
                    .unwrap();
                if slot.adapter(a).is_some() {
                    deltas.push(
                        delta(&pm, m, a)
                            .flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap(),
                    );
                    ws.push(*w as f32);
                }
            }
            let refs: Vec<&[f32]> = deltas.iter().map(|d| d.as_slice()).collect();
            let merged = match o.combination_type {
                CombinationType::Svd => peft::merge_utils::task_arithmetic(&refs, &ws).unwrap(),
                CombinationType::TiesSvd => {
                    peft::merge_utils::ties(&refs, &ws, o.density.unwrap(), o.majority_sign_method)
                        .unwrap()
                }
                t => panic!("unexpected clamp case type {t}"),
            };
            let (rows, cols) = (want_b.dim(0).unwrap(), want_a.dim(1).unwrap());
            let (mut b, mut a) = peft::merge_utils::svd_factors(&merged, rows, cols, r).unwrap();
            let t = |v: &[f32], shape: (usize, usize)| {
                Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
            };
            // the same truncation whatever the signs
            let prod = t(&b, (rows, r)).matmul(&t(&a, (r, cols))).unwrap();
            assert_close(
                &format!("{m}: B·A"),
                &prod,
                &want_b.matmul(want_a).unwrap(),
                1e-5,
                0.0,
            );
            let flat = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            peft::merge_utils::align_svd_signs(&mut b, &mut a, &flat(want_b), &flat(want_a), r);
            assert_close(
                &format!("{m}: B before clamp"),
                &t(&b, (rows, r)),
                want_b,
                1e-4,
                0.0,
            );
            assert_close(
                &format!("{m}: A before clamp"),
                &t(&a, (r, cols)),
                want_a,
                1e-4,
                0.0,
            );
            n += 1;
        }
    }
    assert!(n >= 8, "only {n} pre-clamp modules checked");
}

/// With `svd_clamp`, PEFT's result depends on LAPACK's signs: the canonical signs give another adapter.
#[test]
fn weighted_svd_clamp_depends_on_signs() {
    let dir = cases_dir().join("weighted_svd_r3_clamp");
    let case = case_json(&dir);
    let mut pm = with_sources();
    combine(&mut pm, &case, "torch", torch_signs(&dir)).unwrap();
    combine(&mut pm, &case, "canonical", SvdSigns::Canonical).unwrap();
    let expected = load(&dir.join("expected.safetensors"));
    let mut worst = 0f32;
    for (k, want) in &expected {
        let Some(m) = k.strip_prefix("delta.") else {
            continue;
        };
        assert_close(m, &delta(&pm, m, "torch"), want, 1e-5, 0.0);
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        worst = worst.max(max_diff(&delta(&pm, m, "canonical"), want) as f32 / scale);
    }
    println!(
        "canonical signs move the clamped delta by up to {:.1} % of max|ΔW|",
        100.0 * worst
    );
    assert!(worst > 1e-3, "the clamp should depend on the signs here");
}

#[test]
fn weighted_dare_plain_seed_is_reproducible() {
    let mut pm = with_sources();
    let case = case_json(&cases_dir().join("weighted_dare_ties"));
    let (adapters, weights) = call_args(&case);
    let refs: Vec<&str> = adapters.iter().map(|s| s.as_str()).collect();
    let mut opts = options_of(&case);
    let m = "model.layers.0.self_attn.q_proj";
    let mut run = |pm: &mut PeftModel<LlamaLinears>, seed: DareSeed, name: &str| {
        opts.dare_seed = Some(seed);
        pm.add_weighted_adapter(&refs, &weights, name, &opts)
            .unwrap();
        delta(pm, m, name)
    };
    let a = run(&mut pm, DareSeed::Plain(3), "a");
    let b = run(&mut pm, DareSeed::Plain(3), "b");
    let c = run(&mut pm, DareSeed::Plain(4), "c");
    assert_eq!(max_diff(&a, &b), 0.0);
    assert!(max_diff(&a, &c) > 1e-3);
    // the torch mode differs from the plain one by the init draws it skips
    let t = run(&mut pm, DareSeed::Torch(3), "t");
    assert!(max_diff(&a, &t) > 1e-3);
}

#[test]
fn weighted_peft_silent_cases_are_errors_and_leave_the_model_unchanged() {
    let mut pm = with_sources();
    let ab = ["alpha", "beta"];
    let o = WeightedOptions::new;
    let with = |f: &dyn Fn(&mut WeightedOptions), t| {
        let mut x = o(t);
        f(&mut x);
        x
    };
    type Bad<'a> = (&'a str, Vec<&'a str>, Vec<f64>, &'a str, WeightedOptions);
    let bad: Vec<Bad> = vec![
        (
            "existing name",
            ab.to_vec(),
            vec![1.0, 1.0],
            "alpha",
            o(CombinationType::Cat),
        ),
        (
            "unknown adapter",
            vec!["alpha", "zeta"],
            vec![1.0, 1.0],
            "x",
            o(CombinationType::Cat),
        ),
        (
            "weight count",
            ab.to_vec(),
            vec![1.0],
            "x",
            o(CombinationType::Cat),
        ),
        ("no adapters", vec![], vec![], "x", o(CombinationType::Cat)),
        (
            "single adapter svd",
            vec!["gamma"],
            vec![1.0],
            "x",
            o(CombinationType::Svd),
        ),
        (
            "ranks differ",
            vec!["alpha", "gamma"],
            vec![1.0, 1.0],
            "x",
            o(CombinationType::Linear),
        ),
        (
            "density missing",
            ab.to_vec(),
            vec![1.0, 1.0],
            "x",
            o(CombinationType::Ties),
        ),
        (
            "density above 1",
            ab.to_vec(),
            vec![1.0, 1.0],
            "x",
            with(&|x| x.density = Some(1.5), CombinationType::Ties),
        ),
        (
            "negative density",
            ab.to_vec(),
            vec![1.0, 1.0],
            "x",
            with(&|x| x.density = Some(-0.1), CombinationType::MagnitudePrune),
        ),
        (
            "density unused",
            ab.to_vec(),
            vec![1.0, 1.0],
            "x",
            with(&|x| x.density = Some(0.5), CombinationType::Linear),
        ),
        (
            "svd_rank unused",
            ab.to_vec(),
            vec![1.0, 1.0],
            "x",
            with(&|x| x.svd_rank = Some(2), CombinationType::Cat),
        ),
        (
            "svd_rank 0",
            ab.to_vec(),
            vec![1.0, 1.0],
            "x",
            with(&|x| x.svd_rank = Some(0), CombinationType::Svd),
        ),
        (
            "svd_rank above min(out, in)",
            ab.to_vec(),
            vec![1.0, 1.0],
            "x",
            with(&|x| x.svd_rank = Some(40), CombinationType::Svd),
        ),
        (
            "clamp outside [0, 1]",
            ab.to_vec(),
            vec![1.0, 1.0],
            "x",
            with(&|x| x.svd_clamp = Some(1.5), CombinationType::Svd),
        ),
        (
            "dare without seed",
            ab.to_vec(),
            vec![1.0, 1.0],
            "x",
            with(&|x| x.density = Some(0.5), CombinationType::DareLinear),
        ),
        (
            "non-finite weight",
            ab.to_vec(),
            vec![f64::NAN, 1.0],
            "x",
            o(CombinationType::Cat),
        ),
    ];
    let before: Vec<String> = pm.configs().keys().cloned().collect();
    for (what, adapters, weights, name, opts) in bad {
        let r = pm.add_weighted_adapter(&adapters, &weights, name, &opts);
        let e = r.expect_err(what);
        println!("{what}: {e}");
        assert_eq!(
            pm.configs().keys().cloned().collect::<Vec<_>>(),
            before,
            "{what}"
        );
        assert!(
            pm.model().slots().iter().all(|s| s.adapter("x").is_none()),
            "{what}: a layer kept the failed adapter"
        );
    }
    // mixed list / regex targets, as PEFT
    let regex = peft::config::LoraConfig {
        lora: peft::config::LoraFields {
            r: 4,
            ..Default::default()
        },
        targets: peft::config::TargetFields {
            target_modules: Some(peft::config::TargetModules::Regex(r".*\.k_proj".into())),
            ..Default::default()
        },
        ..Default::default()
    };
    pm.add_adapter("rx", regex.into()).unwrap();
    let e = pm
        .add_weighted_adapter(&["alpha", "rx"], &[1.0, 1.0], "x", &o(CombinationType::Cat))
        .unwrap_err();
    assert!(e.to_string().contains("same target modules type"), "{e}");
}

#[test]
fn weighted_regex_targets_join_as_peft() {
    let mut pm = with_sources();
    let regex = |pat: &str| -> PeftConfig {
        peft::config::LoraConfig {
            lora: peft::config::LoraFields {
                r: 2,
                init_lora_weights: peft::config::InitLoraWeights::Bool(false),
                ..Default::default()
            },
            targets: peft::config::TargetFields {
                target_modules: Some(peft::config::TargetModules::Regex(pat.into())),
                ..Default::default()
            },
            ..Default::default()
        }
        .into()
    };
    pm.add_adapter("r1", regex(r".*0\.self_attn\.k_proj"))
        .unwrap();
    pm.add_adapter("r2", regex(r".*1\.mlp\.up_proj")).unwrap();
    pm.add_weighted_adapter(
        &["r1", "r2"],
        &[1.0, -2.0],
        "rr",
        &WeightedOptions::new(CombinationType::Cat),
    )
    .unwrap();
    let PeftConfig::Lora(c) = &pm.configs()["rr"] else {
        panic!()
    };
    assert_eq!(
        c.targets.target_modules,
        Some(peft::config::TargetModules::Regex(
            r"(.*0\.self_attn\.k_proj)|(.*1\.mlp\.up_proj)".into()
        ))
    );
    let held: Vec<&str> = pm
        .model()
        .slots()
        .into_iter()
        .filter(|s| s.adapter("rr").is_some())
        .map(|s| s.name())
        .collect::<Vec<_>>();
    assert_eq!(
        held,
        [
            "model.layers.0.self_attn.k_proj",
            "model.layers.1.mlp.up_proj"
        ]
    );
    let m = "model.layers.1.mlp.up_proj";
    let want = (delta(&pm, m, "r2") * -2.0).unwrap();
    assert_close(m, &delta(&pm, m, "rr"), &want, 1e-6, 0.0);
}
