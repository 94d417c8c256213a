//! LoRA and DoRA parity with PEFT 0.21.2 on the fixtures of `fixtures/lora/` (written by `gen_lora.py`):
//! per-layer forward, disabled forward, merged weights, unmerge, and save → re-load, for every case.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::io::{SplitKeys, adapter_subdir, load_adapter, peft_key, split_keys};
use peft::layer::modules_to_save::ModulesToSave;
use peft::layer::registry;
use peft::{AdapterSlot, BaseKind, BaseLayer, ForwardCtx, PeftConfig};
use std::path::Path;

/// One case loaded into adapter slots, the way a model would hold them.
pub struct LoadedCase {
    pub json: serde_json::Value,
    pub slots: IndexMap<String, AdapterSlot>,
    pub adapters: Vec<(String, PeftConfig, SplitKeys, IndexMap<String, Tensor>)>,
    pub base: IndexMap<String, Tensor>,
    pub dtype: DType,
}

fn conv_spec(json: &serde_json::Value, module: &str) -> peft::layer::Conv2dSpec {
    let g = &json["geometry"][module];
    let get = |k: &str, d: usize| {
        let v = &g[k];
        let v = if v.is_array() { &v[0] } else { v };
        v.as_u64().map(|v| v as usize).unwrap_or(d)
    };
    peft::layer::Conv2dSpec {
        padding: get("padding", 0),
        stride: get("stride", 1),
        dilation: get("dilation", 1),
        groups: get("groups", 1),
    }
}

pub fn load_case(dir: &Path) -> LoadedCase {
    load_case_with(dir, &dir.join("adapter"))
}

/// A case with its adapters read from `adapter_root` instead of the fixture's own.
pub fn load_case_with(dir: &Path, adapter_root: &Path) -> LoadedCase {
    let json = case_json(dir);
    let mut base = load(&dir.join("base.safetensors"));
    let dtype = match json["dtype"].as_str() {
        Some("bf16") => DType::BF16,
        Some("f16") => DType::F16,
        _ => DType::F32,
    };
    // Load every adapter; model tensors they replace overwrite the base in load order, as PEFT's loading does.
    let mut adapters = Vec::new();
    for name in strings(&json, "adapters") {
        let file = load_adapter(adapter_subdir(adapter_root, &name), &Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: adapter {name}: {e}", dir.display()));
        let split = split_keys(
            &file.tensors,
            registry::param_prefixes(&file.config).unwrap(),
        )
        .unwrap();
        adapters.push((name, file.config, split, file.tensors));
    }
    let modules_to_save = strings(&json, "modules_to_save");
    for (_, _, split, _) in &adapters {
        for (k, t) in &split.overrides {
            let is_mts = modules_to_save
                .iter()
                .any(|m| k.starts_with(&format!("{m}.")));
            if !is_mts {
                assert!(base.contains_key(k), "override {k} not in base");
                base.insert(k.clone(), t.clone());
            }
        }
    }
    let mut slots = IndexMap::new();
    let kinds = json["kinds"].as_object().cloned().unwrap_or_default();
    let mut all: Vec<String> = strings(&json, "targets");
    all.extend(modules_to_save.iter().cloned());
    let base_layer = |m: &str| {
        let w = base[&format!("{m}.weight")].clone();
        let b = base.get(&format!("{m}.bias")).cloned();
        let kind = match kinds.get(m).and_then(|k| k.as_str()) {
            Some("embedding") => BaseKind::Embedding,
            Some("conv2d") => BaseKind::Conv2d(conv_spec(&json, m)),
            Some("conv1d") => BaseKind::Conv1D,
            Some("linear") | None => {
                if w.rank() == 4 {
                    BaseKind::Conv2d(conv_spec(&json, m))
                } else {
                    BaseKind::Linear
                }
            }
            Some(other) => panic!("unknown kind {other}"),
        };
        BaseLayer::new(kind, w, b).unwrap()
    };
    // Methods with model-level shared tensors (VB-LoRA's vector bank) get them resolved, in `split.shared`,
    // over the layers each adapter targets, as a model does.
    // A method whose layers are its config's targets (UniLoRA without `save_indices`: the file names none)
    // gets every target of the case; the shared tensors are drawn over them in module order (the case's).
    let targets = strings(&json, "targets");
    for (name, config, split, _) in adapters.iter_mut() {
        if config.method().layers_from_config() {
            for m in &targets {
                let targeted = config
                    .target_spec()
                    .map(|s| peft::tuners::tuners_utils::check_target_module_exists(&s, m).unwrap())
                    .unwrap_or(false);
                if targeted {
                    split.modules.entry(m.clone()).or_default();
                }
            }
        }
        if config.method().shares_tensors() {
            let dims: Vec<peft::tuners::TargetLayer> = targets
                .iter()
                .filter(|m| split.modules.contains_key(*m))
                .chain(split.modules.keys().filter(|m| !targets.contains(m)))
                .map(|m| peft::tuners::TargetLayer::of(m, &base_layer(m)))
                .collect();
            split.shared =
                registry::shared_tensors(config, Some(&split.shared), &dims, &Device::Cpu)
                    .unwrap_or_else(|e| panic!("{}: adapter {name}: {e}", dir.display()));
        }
    }
    for m in &all {
        let mut slot = AdapterSlot::new(m.clone(), base_layer(m));
        for (name, config, split, _) in &adapters {
            if let Some(params) = split.modules.get(m) {
                let a = registry::build_adapter_with_shared(
                    config,
                    m,
                    slot.base(),
                    params,
                    &split.shared,
                )
                .unwrap_or_else(|e| panic!("{}: {m}: {e}", dir.display()));
                slot.add_adapter(name.clone(), a).unwrap();
            } else if modules_to_save.contains(m) {
                let w = &split.overrides[&format!("{m}.weight")];
                let b = split.overrides.get(&format!("{m}.bias"));
                slot.add_adapter(
                    name.clone(),
                    Box::new(ModulesToSave::from_tensors(slot.base(), w, b).unwrap()),
                )
                .unwrap();
            }
        }
        let active = strings(&json, "active");
        let active: Vec<&str> = active.iter().map(|s| s.as_str()).collect();
        slot.set_active(&active);
        slots.insert(m.clone(), slot);
    }
    LoadedCase {
        json,
        slots,
        adapters,
        base,
        dtype,
    }
}

fn for_each_case(f: impl Fn(&Path, &mut LoadedCase)) {
    parity::for_each_case("lora", parity::Expected::AtLeast(20), f);
}

#[test]
fn lora_forward_matches_peft_per_layer() {
    for_each_case(|dir, c| {
        let io = load(&dir.join("io.safetensors"));
        let (atol, rtol) = tolerances(c.dtype);
        for (m, slot) in &c.slots {
            let x = &io[&format!("input.{m}")];
            let y = slot
                .forward(x, &ForwardCtx::eval())
                .unwrap_or_else(|e| panic!("{}: {m}: {e}", dir.display()));
            assert_close(
                &format!("{}: output.{m}", dir.display()),
                &y,
                &io[&format!("output.{m}")],
                atol,
                rtol,
            );
        }
    });
}

#[test]
fn lora_disabled_forward_is_the_base() {
    for_each_case(|dir, c| {
        let io = load(&dir.join("io.safetensors"));
        let (atol, rtol) = tolerances(c.dtype);
        for (m, slot) in c.slots.iter_mut() {
            let Some(expected) = io.get(&format!("output_disabled.{m}")) else {
                continue;
            };
            slot.set_disabled(true);
            let y = slot
                .forward(&io[&format!("input_disabled.{m}")], &ForwardCtx::eval())
                .unwrap();
            assert_close(
                &format!("{}: output_disabled.{m}", dir.display()),
                &y,
                expected,
                atol,
                rtol,
            );
            slot.set_disabled(false);
        }
    });
}

/// The tied pair of a case whose embedding and LM head are one matrix and both targeted, if any.
fn tied_targets(c: &LoadedCase) -> Option<(&'static str, &'static str)> {
    let pair = ("model.embed_tokens", "lm_head");
    (c.json["base_tied"].as_bool() == Some(true)
        && c.slots.contains_key(pair.0)
        && c.slots.contains_key(pair.1))
    .then_some(pair)
}

#[test]
fn lora_merge_matches_peft_and_unmerge_restores_the_base() {
    for_each_case(|dir, c| {
        let merged = load(&dir.join("merged.safetensors"));
        let order = strings(&c.json, "merge_order");
        let order: Vec<&str> = order.iter().map(|s| s.as_str()).collect();
        let (atol, rtol) = tolerances(c.dtype);
        let io = load(&dir.join("io.safetensors"));
        let tied = tied_targets(c);
        for (m, slot) in c.slots.iter_mut() {
            slot.merge(Some(&order))
                .unwrap_or_else(|e| panic!("{}: {m}: {e}", dir.display()));
            let what = format!("{}: merged {m}", dir.display());
            let key = format!("{m}.weight");
            // Both halves of a tied pair merge into one matrix: checked below, chained.
            let in_tied = tied.is_some_and(|(a, b)| m == a || m == b);
            if let (Some(expected), false) = (merged.get(&key), in_tied) {
                assert_close(&what, &slot.base().weight().unwrap(), expected, atol, rtol);
            }
            if let (Some(b), Some(expected)) =
                (slot.base().bias(), merged.get(&format!("{m}.bias")))
            {
                assert_close(&format!("{what}.bias"), b, expected, atol, rtol);
            }
            // With everything merged, the forward of the merged layer is the adapted forward.
            if order.len() == strings(&c.json, "active").len() {
                let y = slot
                    .forward(&io[&format!("input.{m}")], &ForwardCtx::eval())
                    .unwrap();
                let tol = if c.dtype == DType::F32 {
                    (1e-4, 1e-3)
                } else {
                    (atol * 4.0, rtol * 4.0)
                };
                assert_close(
                    &format!("{what} forward"),
                    &y,
                    &io[&format!("output.{m}")],
                    tol.0,
                    tol.1,
                );
            }
            slot.unmerge().unwrap();
            assert_close(
                &format!("{what} unmerged"),
                &slot.base().weight().unwrap(),
                &c.base[&key],
                atol * 10.0,
                rtol,
            );
            assert!(slot.merged().is_empty());
        }
        // A tied pair as PEFT merges it into its one parameter: the embedding first, then the head starting
        // from the matrix that holds the embedding's merge (`set_tied_weight`, as `PeftModel` does).
        if let Some((e, h)) = tied {
            let mut c = load_case(dir);
            let mut emb = c.slots.shift_remove(e).unwrap();
            let mut head = c.slots.shift_remove(h).unwrap();
            emb.merge(Some(&order)).unwrap();
            head.set_tied_weight(emb.base().weight().unwrap()).unwrap();
            head.merge(Some(&order)).unwrap();
            for name in [e, h] {
                assert_close(
                    &format!("{}: tied merged {name}", dir.display()),
                    &head.base().weight().unwrap(),
                    &merged[&format!("{name}.weight")],
                    atol,
                    rtol,
                );
            }
        }
    });
}

#[test]
fn lora_save_reload_gives_the_same_file() {
    for_each_case(|dir, c| {
        for (name, config, split, original) in &c.adapters {
            // What the library saves from the slots, plus the model-level tensors a model adds (`bias="all"`
            // saves the biases of untargeted modules too); everything about a slot must come from the library.
            let has_embedding_base =
                |m: &str| original.contains_key(&peft_key(m, "base_layer.weight"));
            let mut saved: IndexMap<String, Tensor> =
                peft::io::adapter_state_dict(c.slots.values(), name, config, &has_embedding_base)
                    .unwrap()
                    .into_iter()
                    .collect();
            for (k, t) in original {
                if !saved.contains_key(k) {
                    let owner = c
                        .slots
                        .keys()
                        .find(|m| k.starts_with(&format!("base_model.model.{m}.")));
                    assert!(
                        owner.is_none(),
                        "{}: {name}: {k} of slot {owner:?} was not saved by the library",
                        dir.display()
                    );
                    let _ = split;
                    saved.insert(k.clone(), t.clone());
                }
            }
            let list: Vec<(String, Tensor)> = saved.into_iter().collect();
            parity::assert_reloads_as_peft(dir, name, config, &list, original, &|_| true);
        }
    });
}

#[test]
fn refused_cases_name_the_unsupported_field() {
    for (name, field) in REFUSED_CASES {
        let dir = fixtures_dir().join("lora/cases").join(name);
        let e = load_adapter(dir.join("adapter"), &Device::Cpu).unwrap_err();
        assert!(
            matches!(&e, peft::PeftError::Unsupported { field: f, .. } if f == field),
            "{name}: {e}"
        );
    }
}

/// The other direction: adapters changed and saved by Rust. Every adapter parameter is perturbed with the
/// library's generator, the adapters are saved with the library's writer, and the per-module outputs Rust
/// computes are recorded. Reloading must give the same outputs here; with `PEFT_RS_EXPORT_DIR` set, the
/// directories are kept for `fixtures/lora/check_rust_adapters.py`, which loads them in Python PEFT.
#[test]
fn rust_saved_adapters_reload_with_the_same_outputs() {
    let keep = std::env::var_os("PEFT_RS_EXPORT_DIR").map(std::path::PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let root = keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    for dir in cases("lora") {
        let case = dir.file_name().unwrap().to_string_lossy().into_owned();
        let c = load_case(&dir);
        let mut rng = peft::PeftRng::new(2024).fork(&case);
        for slot in c.slots.values() {
            for (_, v) in slot.vars() {
                let noise = rng
                    .normal_tensor(v.shape(), 0.0, 0.05, DType::F32, &Device::Cpu)
                    .unwrap();
                v.set(&(v.as_tensor() + noise).unwrap()).unwrap();
            }
        }
        let io = load(&dir.join("io.safetensors"));
        let mut rust_io: Vec<(String, Tensor)> = Vec::new();
        for (m, slot) in &c.slots {
            let x = &io[&format!("input.{m}")];
            rust_io.push((format!("input.{m}"), x.clone()));
            rust_io.push((
                format!("output.{m}"),
                slot.forward(x, &ForwardCtx::eval()).unwrap(),
            ));
        }
        let out = root.join(&case);
        let mut adapters = Vec::new();
        for (name, config, _, original) in &c.adapters {
            let has_embedding_base =
                |m: &str| original.contains_key(&peft_key(m, "base_layer.weight"));
            let mut sd =
                peft::io::adapter_state_dict(c.slots.values(), name, config, &has_embedding_base)
                    .unwrap();
            for (k, t) in original {
                if !sd.iter().any(|(s, _)| s == k) {
                    sd.push((k.clone(), t.clone()));
                }
            }
            adapters.push((name.as_str(), config, sd));
        }
        peft::io::save_adapters(out.join("adapter"), &adapters).unwrap();
        peft::io::write_safetensors(out.join("rust_io.safetensors"), &rust_io).unwrap();
        // Reload what was written and check it computes what Rust computed before saving.
        let again = load_case_with(&dir, &out.join("adapter"));
        let (atol, rtol) = tolerances(c.dtype);
        for (k, t) in &rust_io {
            if let Some(m) = k.strip_prefix("output.") {
                let x = &io[&format!("input.{m}")];
                let y = again.slots[m].forward(x, &ForwardCtx::eval()).unwrap();
                assert_close(&format!("{case}: reloaded {m}"), &y, t, atol, rtol);
            }
        }
    }
}

#[test]
fn missing_unexpected_and_misshapen_adapter_tensors_are_named() {
    let dir = fixtures_dir().join("lora/cases/linear_basic");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin0"].base();
    let params = &split.modules["lin0"];
    let mut missing = params.clone();
    missing.shift_remove("lora_B.weight");
    let e = registry::build_adapter(config, "lin0", base, &missing).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::MissingKey(k) if k == "base_model.model.lin0.lora_B.weight"),
        "{e}"
    );
    let mut extra = params.clone();
    extra.insert("lora_C.weight".into(), params["lora_A.weight"].clone());
    let e = registry::build_adapter(config, "lin0", base, &extra).unwrap_err();
    assert!(
        e.to_string()
            .contains("base_model.model.lin0.lora_C.weight"),
        "{e}"
    );
    let mut wrong = params.clone();
    wrong.insert(
        "lora_A.weight".into(),
        Tensor::zeros((4, 17), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = registry::build_adapter(config, "lin0", base, &wrong).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::ShapeMismatch { name, expected, got } if name == "base_model.model.lin0.lora_A.weight" && expected == &[4, 16] && got == &[4, 17]),
        "{e}"
    );
    // the adapter for one layer does not fit another
    let e = registry::build_adapter(config, "lin1", c.slots["lin1"].base(), params).unwrap_err();
    assert!(matches!(e, peft::PeftError::ShapeMismatch { .. }), "{e}");
}

#[test]
fn one_slot_serves_many_threads() {
    let dir = fixtures_dir().join("lora/cases/dora_linear");
    let c = load_case(&dir);
    let io = load(&dir.join("io.safetensors"));
    let (m, slot) = c.slots.into_iter().next().unwrap();
    let slot = std::sync::Arc::new(slot);
    let x = io[&format!("input.{m}")].clone();
    let expected = io[&format!("output.{m}")].clone();
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (slot, x) = (slot.clone(), x.clone());
            std::thread::spawn(move || slot.forward(&x, &ForwardCtx::eval()).unwrap())
        })
        .collect();
    for h in handles {
        assert_close(
            "threaded forward",
            &h.join().unwrap(),
            &expected,
            1e-5,
            1e-4,
        );
    }
}

#[test]
fn saving_keeps_the_dtype_an_adapter_was_loaded_in() {
    let dir = fixtures_dir().join("lora/cases/linear_basic");
    let tmp = tempfile::tempdir().unwrap();
    let f16_dir = tmp.path().join("f16");
    let file = load_adapter(dir.join("adapter"), &Device::Cpu).unwrap();
    let halved: Vec<(String, Tensor)> = file
        .tensors
        .iter()
        .map(|(k, t)| (k.clone(), t.to_dtype(DType::F16).unwrap()))
        .collect();
    peft::io::save_adapter(&f16_dir, &file.config, &halved).unwrap();
    let c = load_case_with(&dir, &f16_dir);
    let slot = &c.slots["lin0"];
    let a = slot.adapter("default").unwrap();
    assert_eq!(a.saved_dtype(), DType::F16);
    assert!(
        a.vars().iter().all(|(_, v)| v.dtype() == DType::F32),
        "computes in f32"
    );
    let sd = peft::io::adapter_state_dict(c.slots.values(), "default", &file.config, &|_| false)
        .unwrap();
    assert_eq!(sd.len(), 4);
    assert!(sd.iter().all(|(_, t)| t.dtype() == DType::F16));
}
