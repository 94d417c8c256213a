//! VeRA parity with PEFT 0.21.2 on the fixtures of `fixtures/vera/` (written by `gen_vera.py`): torch's CPU
//! generator bit for bit, per-layer forward, disabled forward, merged weights, unmerge, save → reload through
//! `PeftModel` (shared `base_model.vera_A` / `vera_B` included), regenerated projections, and `peft merge`.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::config::{TargetModules, VeraConfig};
use peft::host::AdapterHost;
use peft::io::{load_adapter, split_keys};
use peft::layer::registry;
use peft::merge::{MergeAdapter, merge_model};
use peft::tuners::tuners_utils::{ModuleInfo, ModuleKind};
use peft::tuners::vera::VeraProjections;
use peft::tuners::vera::prng::vera_projections;
use peft::{AdapterSlot, BaseKind, BaseLayer, ForwardCtx, PeftConfig, PeftError, PeftModel};
use std::path::{Path, PathBuf};

const CASES: [&str; 3] = ["vera_linear_shapes", "vera_no_projection", "vera_conv1d"];

fn case_dir(name: &str) -> PathBuf {
    fixtures_dir().join("vera/cases").join(name)
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// The fixture's base layers as adapter slots (Linear or GPT-2 Conv1D by `case.json` `kinds`), in base order.
fn base_slots(dir: &Path) -> IndexMap<String, AdapterSlot> {
    let json = case_json(dir);
    let base = load(&dir.join("base.safetensors"));
    let mut slots = IndexMap::new();
    for k in base.keys() {
        let m = k.rsplit_once('.').unwrap().0.to_string();
        if slots.contains_key(&m) {
            continue;
        }
        let w = base[&format!("{m}.weight")].clone();
        let b = base.get(&format!("{m}.bias")).cloned();
        let kind = match json["kinds"][&m].as_str() {
            Some("conv1d") => BaseKind::Conv1D,
            _ => BaseKind::Linear,
        };
        slots.insert(
            m.clone(),
            AdapterSlot::new(m, BaseLayer::new(kind, w, b).unwrap()),
        );
    }
    slots
}

/// A case loaded the way a model loads it: projections resolved from the file (or regenerated), every
/// targeted slot holding its adapter.
fn load_vera_case(dir: &Path) -> (PeftConfig, IndexMap<String, AdapterSlot>) {
    let file = load_adapter(dir.join("adapter"), &Device::Cpu).unwrap();
    let split = split_keys(
        &file.tensors,
        registry::param_prefixes(&file.config).unwrap(),
    )
    .unwrap();
    let mut slots = base_slots(dir);
    let dims: Vec<(usize, usize)> = split
        .modules
        .keys()
        .map(|m| {
            let b = slots[m].base();
            (b.in_features(), b.out_features())
        })
        .collect();
    let shared = registry::shared_tensors(
        &file.config,
        Some(&split.shared),
        &target_layers(&dims),
        &Device::Cpu,
    )
    .unwrap();
    for (m, params) in &split.modules {
        let slot = &mut slots[m];
        let a = registry::build_adapter_with_shared(&file.config, m, slot.base(), params, &shared)
            .unwrap_or_else(|e| panic!("{}: {m}: {e}", dir.display()));
        slot.add_adapter("default", a).unwrap();
    }
    (file.config, slots)
}

#[test]
fn vera_projections_match_torch_bit_for_bit() {
    let f = load(&fixtures_dir().join("vera/prng.safetensors"));
    let seeds = f["seeds"].to_vec1::<i64>().unwrap();
    let dims = f["dims"].to_vec2::<i64>().unwrap();
    let mut values = 0;
    for (i, (seed, d)) in seeds.iter().zip(&dims).enumerate() {
        let (r, fin, fout) = (d[0] as usize, d[1] as usize, d[2] as usize);
        let (a, b) = vera_projections(*seed, r, fin, fout);
        let a_bits: Vec<u32> = a.iter().map(|x| x.to_bits()).collect();
        let b_bits: Vec<u32> = b.iter().map(|x| x.to_bits()).collect();
        assert_eq!(a_bits, bits(&f[&format!("A.{i}")]), "seed {seed}: vera_A");
        assert_eq!(b_bits, bits(&f[&format!("B.{i}")]), "seed {seed}: vera_B");
        values += a.len() + b.len();
    }
    assert!(values > 1000, "{values} values compared");
}

#[test]
fn vera_regenerated_projections_equal_peft_bit_for_bit() {
    for name in CASES {
        let dir = case_dir(name);
        let io = load(&dir.join("io.safetensors"));
        let file = load_adapter(dir.join("adapter"), &Device::Cpu).unwrap();
        let PeftConfig::Vera(c) = &file.config else {
            panic!("{name}: not VeRA")
        };
        let (ea, eb) = (&io["vera_A"], &io["vera_B"]);
        let p = VeraProjections::generate(
            c.projection_prng_key,
            c.r,
            ea.dim(1).unwrap(),
            eb.dim(0).unwrap(),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(bits(&p.a), bits(ea), "{name}: vera_A");
        assert_eq!(bits(&p.b), bits(eb), "{name}: vera_B");
        if c.save_projection {
            // The saved projections are exactly what the key regenerates.
            assert_eq!(bits(&p.a), bits(&file.tensors["base_model.vera_A"]));
            assert_eq!(bits(&p.b), bits(&file.tensors["base_model.vera_B"]));
        } else {
            assert!(!file.tensors.contains_key("base_model.vera_A"));
            // `_find_dim` over the targeted layers, as the registry computes it.
            let (_, slots) = load_vera_case(&dir);
            let dims: Vec<(usize, usize)> = slots
                .values()
                .map(|s| (s.base().in_features(), s.base().out_features()))
                .collect();
            let shared = registry::shared_tensors(
                &file.config,
                Some(&IndexMap::new()),
                &target_layers(&dims),
                &Device::Cpu,
            )
            .unwrap();
            assert_eq!(bits(&shared["base_model.vera_A"]), bits(ea));
            assert_eq!(bits(&shared["base_model.vera_B"]), bits(eb));
        }
    }
}

#[test]
fn vera_forward_matches_peft_per_layer_and_disabled_is_the_base() {
    for name in CASES {
        let dir = case_dir(name);
        let io = load(&dir.join("io.safetensors"));
        let (_, mut slots) = load_vera_case(&dir);
        let targets = strings(&case_json(&dir), "targets");
        assert_eq!(
            slots
                .values()
                .filter(|s| s.adapter("default").is_some())
                .count(),
            targets.len()
        );
        for m in &targets {
            let slot = &mut slots[m];
            let y = slot
                .forward(&io[&format!("input.{m}")], &ForwardCtx::eval())
                .unwrap();
            assert_close(
                &format!("{name}: output.{m}"),
                &y,
                &io[&format!("output.{m}")],
                1e-5,
                1e-4,
            );
            slot.set_disabled(true);
            let y = slot
                .forward(&io[&format!("input_disabled.{m}")], &ForwardCtx::eval())
                .unwrap();
            assert_close(
                &format!("{name}: output_disabled.{m}"),
                &y,
                &io[&format!("output_disabled.{m}")],
                1e-6,
                1e-5,
            );
            slot.set_disabled(false);
        }
    }
}

#[test]
fn vera_merge_matches_peft_and_unmerge_restores_the_base() {
    let checks = parity::MergeChecks {
        merge_order: false,
        ..Default::default()
    };
    for name in CASES {
        let dir = case_dir(name);
        let files = parity::MergeFiles::load(&dir);
        let base = load(&dir.join("base.safetensors"));
        let (_, mut slots) = load_vera_case(&dir);
        for (m, slot) in slots.iter_mut() {
            if slot.adapter("default").is_none() {
                continue;
            }
            // The additive delta is what merging adds.
            let a = slot.adapter("default").unwrap();
            let (dw, db) = a.delta_weight(slot.base().kind()).unwrap().unwrap();
            assert!(db.is_none());
            assert_eq!(dw.dims(), slot.base().weight_dims());
            let what = format!("{name}: {m}");
            parity::assert_merge_unmerge(&what, m, slot, None, &files, &base, &checks);
        }
    }
}

/// A model of Linear / Conv1D slots (the fixtures' MLP3 and GPT-2-like models).
#[derive(Debug)]
struct VeraHost {
    slots: IndexMap<String, AdapterSlot>,
}

impl AdapterHost for VeraHost {
    fn module_infos(&self) -> Vec<ModuleInfo> {
        self.slots
            .values()
            .map(|s| ModuleInfo {
                name: s.name().to_string(),
                kind: match s.base().kind() {
                    BaseKind::Conv1D => ModuleKind::Conv1D,
                    _ => ModuleKind::Linear,
                },
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
        self.slots.values().collect()
    }
    fn slots_mut(&mut self) -> Vec<&mut AdapterSlot> {
        self.slots.values_mut().collect()
    }
    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }
    fn set_tensor(&mut self, name: &str, _value: Tensor) -> peft::Result<()> {
        Err(PeftError::MissingKey(name.into()))
    }
}

fn host(dir: &Path) -> VeraHost {
    VeraHost {
        slots: base_slots(dir),
    }
}

fn check_forward(what: &str, pm: &PeftModel<VeraHost>, dir: &Path) {
    let io = load(&dir.join("io.safetensors"));
    for m in strings(&case_json(dir), "targets") {
        let y = pm.model().slots[&m]
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
fn vera_peft_model_loads_saves_and_reloads_peft_files() {
    for name in CASES {
        let dir = case_dir(name);
        let pm =
            PeftModel::from_pretrained(host(&dir), dir.join("adapter"), "default", &Device::Cpu)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
        check_forward(name, &pm, &dir);
        let tmp = tempfile::tempdir().unwrap();
        pm.save_pretrained(tmp.path()).unwrap();
        let original = load_adapter(dir.join("adapter"), &Device::Cpu).unwrap();
        let back = load_adapter(tmp.path(), &Device::Cpu).unwrap();
        let mut a: Vec<&String> = back.tensors.keys().collect();
        let mut b: Vec<&String> = original.tensors.keys().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{name}: keys");
        let PeftConfig::Vera(c) = &original.config else {
            panic!()
        };
        assert_eq!(
            a.iter().any(|k| *k == "base_model.vera_A")
                && a.iter().any(|k| *k == "base_model.vera_B"),
            c.save_projection,
            "{name}: shared keys"
        );
        for (k, t) in &original.tensors {
            let u = &back.tensors[k];
            assert_eq!(u.dtype(), t.dtype(), "{name}: {k} dtype");
            assert_eq!(bits(u), bits(t), "{name}: {k}");
        }
        let mine: serde_json::Value = serde_json::from_str(&back.config.to_json_string()).unwrap();
        let theirs: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("adapter/adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert!(
            peft::config::json_content_eq(&mine, &theirs),
            "{name}: config differs:\n{mine}\nvs\n{theirs}"
        );
        // What was saved loads again to the same outputs.
        let again =
            PeftModel::from_pretrained(host(&dir), tmp.path(), "default", &Device::Cpu).unwrap();
        check_forward(&format!("{name} reloaded"), &again, &dir);
        // merge_and_unload gives PEFT's merged weights.
        let merged = load(&dir.join("merged.safetensors"));
        let plain = again.merge_and_unload(None).unwrap();
        for (m, slot) in &plain.slots {
            assert!(slot.adapters().next().is_none());
            assert_close(
                &format!("{name}: merge_and_unload {m}"),
                &slot.base().weight().unwrap(),
                &merged[&format!("{m}.weight")],
                1e-6,
                1e-5,
            );
        }
    }
}

#[test]
fn vera_saved_projections_missing_from_the_file_are_named() {
    let dir = case_dir("vera_linear_shapes");
    let tmp = tempfile::tempdir().unwrap();
    let file = load_adapter(dir.join("adapter"), &Device::Cpu).unwrap();
    let without: Vec<(String, Tensor)> = file
        .tensors
        .iter()
        .filter(|(k, _)| *k != "base_model.vera_B")
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    peft::io::save_adapter(tmp.path(), &file.config, &without).unwrap();
    let e =
        PeftModel::from_pretrained(host(&dir), tmp.path(), "default", &Device::Cpu).unwrap_err();
    assert!(
        matches!(&e, PeftError::MissingKey(k) if k == "base_model.vera_B"),
        "{e}"
    );
    let e = MergeAdapter::load(tmp.path(), None, &Device::Cpu)
        .and_then(|a| {
            merge_model(
                &dir.join("base.safetensors"),
                vec![a],
                &tmp.path().join("out.safetensors"),
                None,
                &mut |_, _, _| {},
            )
        })
        .unwrap_err();
    assert!(e.to_string().contains("base_model.vera_B"), "{e}");
}

#[test]
fn vera_get_peft_model_draws_peft_projections_and_starts_at_the_base() {
    let dir = case_dir("vera_linear_shapes");
    let io = load(&dir.join("io.safetensors"));
    for save_projection in [true, false] {
        let config = PeftConfig::Vera(VeraConfig {
            r: 4,
            target_modules: Some(TargetModules::List(vec![
                "lin0".into(),
                "lin1".into(),
                "lin2".into(),
            ])),
            save_projection,
            ..Default::default()
        });
        let pm = PeftModel::get_peft_model(host(&dir), config, "default", 3).unwrap();
        for m in ["lin0", "lin1", "lin2"] {
            let slot = &pm.model().slots[m];
            let x = &io[&format!("input_disabled.{m}")];
            let y = slot.forward(x, &ForwardCtx::eval()).unwrap();
            // λ_b = 0: the adapter starts as the identity.
            assert_close(
                &format!("fresh {m}"),
                &y,
                &io[&format!("output_disabled.{m}")],
                1e-6,
                1e-5,
            );
            let t: IndexMap<String, Tensor> = slot
                .adapter("default")
                .unwrap()
                .tensors()
                .into_iter()
                .collect();
            assert_eq!(
                t["vera_lambda_d"].to_vec1::<f32>().unwrap(),
                vec![0.1f32; 4]
            );
        }
        assert_eq!(
            pm.trainable_parameters().trainable,
            (24 + 4) + (12 + 4) + (20 + 4)
        );
        let tmp = tempfile::tempdir().unwrap();
        pm.save_pretrained(tmp.path()).unwrap();
        let back = load_adapter(tmp.path(), &Device::Cpu).unwrap();
        if save_projection {
            // projection_prng_key 0 and the same dims as the fixture: PEFT's projections exactly.
            assert_eq!(
                bits(&back.tensors["base_model.vera_A"]),
                bits(&io["vera_A"])
            );
            assert_eq!(
                bits(&back.tensors["base_model.vera_B"]),
                bits(&io["vera_B"])
            );
        } else {
            assert!(!back.tensors.contains_key("base_model.vera_A"));
            assert!(!back.tensors.contains_key("base_model.vera_B"));
        }
        assert_eq!(back.tensors.len(), 6 + 2 * usize::from(save_projection));
        PeftModel::from_pretrained(host(&dir), tmp.path(), "default", &Device::Cpu).unwrap();
    }
    // Trained biases (`bias = "vera_only"` / `"all"`) are refused, naming the field.
    let config = PeftConfig::Vera(VeraConfig {
        r: 4,
        target_modules: Some(TargetModules::List(vec!["lin0".into()])),
        bias: peft::config::BiasMode::AdapterOnly("vera_only".into()),
        ..Default::default()
    });
    let e = PeftModel::get_peft_model(host(&dir), config, "default", 3).unwrap_err();
    assert!(
        matches!(&e, PeftError::Unsupported { field, .. } if field == "bias"),
        "{e}"
    );
}

#[test]
fn vera_trains_the_lambdas_with_dropout_in_training_only() {
    let dir = case_dir("vera_no_projection"); // vera_dropout = 0.1
    let io = load(&dir.join("io.safetensors"));
    let (_, slots) = load_vera_case(&dir);
    let slot = &slots["lin0"];
    let x = &io["input.lin0"];
    let eval = slot.forward(x, &ForwardCtx::eval()).unwrap();
    let train = slot.forward(x, &ForwardCtx::train(1, 0)).unwrap();
    assert!(max_diff(&eval, &train) > 0.0, "dropout in training");
    let again = slot.forward(x, &ForwardCtx::train(1, 0)).unwrap();
    assert_eq!(max_diff(&train, &again), 0.0, "same seed and step");
    let loss = train.sqr().unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let vars = slot.vars();
    assert_eq!(vars.len(), 2);
    for (k, v) in &vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{k}: no gradient"));
        assert!(
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0,
            "{k}"
        );
    }
}

#[test]
fn vera_merge_files_matches_peft_merge_and_unload() {
    for name in CASES {
        let dir = case_dir(name);
        let merged = load(&dir.join("merged.safetensors"));
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged.safetensors");
        let adapter = MergeAdapter::load(dir.join("adapter"), None, &Device::Cpu).unwrap();
        let report = merge_model(
            &dir.join("base.safetensors"),
            vec![adapter],
            &out,
            None,
            &mut |_, _, _| {},
        )
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(report.modules, strings(&case_json(&dir), "targets"));
        let written = load(&out);
        assert_eq!(written.len(), merged.len());
        for (k, t) in &written {
            assert_close(&format!("{name}: {k}"), t, &merged[k], 1e-6, 1e-5);
        }
        // A weighted merge scales the additive delta.
        let base = load(&dir.join("base.safetensors"));
        let adapter = MergeAdapter::load(dir.join("adapter"), Some(0.5), &Device::Cpu).unwrap();
        let half = tmp.path().join("half.safetensors");
        merge_model(
            &dir.join("base.safetensors"),
            vec![adapter],
            &half,
            None,
            &mut |_, _, _| {},
        )
        .unwrap();
        let half = load(&half);
        for (k, t) in &half {
            let expected = ((&base[k] + &merged[k]).unwrap() * 0.5).unwrap();
            assert_close(&format!("{name}: half {k}"), t, &expected, 1e-6, 1e-5);
        }
    }
}
