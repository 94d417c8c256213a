//! PEFT 0.21.2's conversion of other adapters to LoRA (`convert_to_lora`), against `fixtures/lora/conversion/`
//! (written by `fixtures/lora/gen_conversion.py` from the committed, perturbed fixture cases of each method):
//! the LoRA config (rank, alpha, `rank_pattern` / `alpha_pattern`, targets), the file's keys and shapes, each
//! module's `B·A` (the product does not depend on the SVD's signs), each converted module's output, the
//! save → reload round trip, and the conversions PEFT refuses.

use crate::common::*;
use crate::lora_parity::load_case;
use candle_core::{Device, Tensor};
use indexmap::IndexMap;
use peft::config::common::TargetModules;
use peft::io::{load_adapter, split_keys};
use peft::layer::{AdapterSlot, registry};
use peft::tuners::lora::conversion::{ConversionRank, ConvertedLora, convert_slots};
use peft::{ForwardCtx, PeftConfig};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

fn conversion_cases() -> Vec<PathBuf> {
    let root = fixtures_dir().join("lora/conversion");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.json").exists())
        .collect();
    v.sort();
    assert!(v.len() >= 15, "{} conversion cases", v.len());
    v
}

fn rank_of(json: &serde_json::Value) -> ConversionRank {
    let r = &json["rank"];
    if let Some(i) = r.as_u64() {
        ConversionRank::Fixed(i as usize)
    } else {
        ConversionRank::Energy(r.as_f64().unwrap())
    }
}

/// The case's source adapter (its `default`) converted here.
fn convert(
    dir: &Path,
) -> (
    serde_json::Value,
    crate::lora_parity::LoadedCase,
    peft::Result<ConvertedLora>,
) {
    let json = case_json(dir);
    let src = fixtures_dir().join(json["source"].as_str().unwrap());
    let c = load_case(&src);
    let (name, config, _, _) = &c.adapters[0];
    assert_eq!(name, "default");
    let slots: Vec<&AdapterSlot> = c.slots.values().collect();
    let got = convert_slots(&slots, config, "default", rank_of(&json));
    (json, c, got)
}

fn targets_set(t: &Option<TargetModules>) -> BTreeSet<String> {
    match t {
        Some(TargetModules::List(l)) => l.iter().cloned().collect(),
        Some(TargetModules::Regex(r)) => [format!("regex:{r}")].into(),
        None => BTreeSet::new(),
    }
}

fn json_targets(v: &serde_json::Value) -> BTreeSet<String> {
    match v {
        serde_json::Value::Array(a) => a.iter().map(|s| s.as_str().unwrap().to_string()).collect(),
        serde_json::Value::String(s) => [format!("regex:{s}")].into(),
        _ => BTreeSet::new(),
    }
}

/// `B·A` per module of a LoRA state dict.
fn products(tensors: &IndexMap<String, Tensor>) -> IndexMap<String, Tensor> {
    let mut out = IndexMap::new();
    for (k, a) in tensors {
        if let Some(m) = k.strip_suffix(".lora_A.weight") {
            let b = &tensors[&format!("{m}.lora_B.weight")];
            out.insert(m.to_string(), b.matmul(a).unwrap());
        }
    }
    out
}

fn assert_config_is_peft(
    case: &str,
    got: &peft::tuners::lora::LoraConfig,
    want: &serde_json::Value,
) {
    assert_eq!(got.lora.r as u64, want["r"].as_u64().unwrap(), "{case}: r");
    assert_eq!(
        got.lora.lora_alpha,
        want["lora_alpha"].as_f64().unwrap(),
        "{case}: lora_alpha"
    );
    let rp: IndexMap<String, usize> = serde_json::from_value(want["rank_pattern"].clone()).unwrap();
    let ap: IndexMap<String, f64> = serde_json::from_value(want["alpha_pattern"].clone()).unwrap();
    let sorted =
        |m: &IndexMap<String, usize>| m.iter().map(|(k, v)| (k.clone(), *v)).collect::<Vec<_>>();
    let mut g = sorted(&got.patterns.rank_pattern);
    let mut w = sorted(&rp);
    g.sort();
    w.sort();
    assert_eq!(g, w, "{case}: rank_pattern");
    assert_eq!(
        got.patterns.alpha_pattern.len(),
        ap.len(),
        "{case}: alpha_pattern"
    );
    for (k, v) in &ap {
        assert_eq!(
            got.patterns.alpha_pattern.get(k),
            Some(v),
            "{case}: alpha_pattern[{k}]"
        );
    }
    assert_eq!(
        targets_set(&got.targets.target_modules),
        json_targets(&want["target_modules"]),
        "{case}: target_modules"
    );
    assert_eq!(
        got.targets.modules_to_save.clone().unwrap_or_default(),
        want["modules_to_save"]
            .as_array()
            .map(|a| a
                .iter()
                .map(|s| s.as_str().unwrap().to_string())
                .collect::<Vec<_>>())
            .unwrap_or_default(),
        "{case}: modules_to_save"
    );
    assert!(!got.lora.use_rslora && !got.lora.use_dora, "{case}");
}

#[test]
fn conversion_to_lora_gives_peft_configs_and_products() {
    let mut converted = 0;
    for dir in conversion_cases() {
        let case = dir.file_name().unwrap().to_string_lossy().to_string();
        let (json, _, got) = convert(&dir);
        if json.get("error").is_some() {
            continue;
        }
        let got = got.unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_config_is_peft(&case, &got.config, &json["config"]);
        assert_eq!(
            !got.warnings.is_empty(),
            !json["warnings"].as_array().unwrap().is_empty(),
            "{case}: warnings {:?}",
            got.warnings
        );
        let want = load(&dir.join("adapter/adapter_model.safetensors"));
        let mine: IndexMap<String, Tensor> = got.tensors.iter().cloned().collect();
        let keys = |m: &IndexMap<String, Tensor>| m.keys().cloned().collect::<BTreeSet<_>>();
        assert_eq!(keys(&mine), keys(&want), "{case}: keys");
        for (k, t) in &want {
            assert_eq!(mine[k].dims(), t.dims(), "{case}: {k}");
        }
        let (pg, pw) = (products(&mine), products(&want));
        assert!(!pw.is_empty());
        for (m, w) in &pw {
            assert_close(&format!("{case}: {m} B·A"), &pg[m], w, 1e-5, 1e-4);
        }
        converted += 1;
    }
    assert!(converted >= 14, "{converted} converted cases");
}

#[test]
fn converted_lora_saves_reloads_and_gives_peft_module_outputs() {
    for dir in conversion_cases() {
        let case = dir.file_name().unwrap().to_string_lossy().to_string();
        let (json, c, got) = convert(&dir);
        if json.get("error").is_some() {
            continue;
        }
        let got = got.unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("as_lora");
        got.save(&out).unwrap();
        let file = load_adapter(&out, &Device::Cpu).unwrap();
        let PeftConfig::Lora(reloaded) = &file.config else {
            panic!("{case}: saved as {:?}", file.config.peft_type())
        };
        assert_config_is_peft(&case, reloaded, &json["config"]);
        // Each converted module, with the saved LoRA on the source's base layer, gives PEFT's output for the
        // converted adapter (the layer fixtures record them; the Llama ones are checked on the logits in
        // peft-models' tests).
        let expected = load(&dir.join("expected.safetensors"));
        let split = split_keys(
            &file.tensors,
            registry::param_prefixes(&file.config).unwrap(),
        )
        .unwrap();
        let mut checked = 0;
        for (m, params) in &split.modules {
            let Some(want) = expected.get(&format!("output.{m}")) else {
                continue;
            };
            let base = c.slots[m].base().clone();
            let mut slot = AdapterSlot::new(m.clone(), base);
            let a = registry::build_adapter(&file.config, m, slot.base(), params).unwrap();
            slot.add_adapter("default", a).unwrap();
            slot.set_active(&["default"]);
            let y = slot
                .forward(&expected[&format!("input.{m}")], &ForwardCtx::eval())
                .unwrap();
            assert_close(&format!("{case}: {m}"), &y, want, 1e-5, 1e-4);
            checked += 1;
        }
        let llama = json["model"].as_str().unwrap().starts_with("llama");
        assert!(llama || checked > 0, "{case}: no module output checked");
    }
}

#[test]
fn conversions_peft_refuses_are_errors_naming_the_layers() {
    let mut refused = 0;
    for dir in conversion_cases() {
        let case = dir.file_name().unwrap().to_string_lossy().to_string();
        let (json, _, got) = convert(&dir);
        let Some(err) = json.get("error") else {
            continue;
        };
        let e = got.expect_err(&case).to_string();
        match err["type"].as_str().unwrap() {
            "TypeError" => {
                assert!(e.contains("do not support LoRA conversion"), "{case}: {e}");
                assert!(e.contains("model.layers.0."), "{case}: names no layer: {e}");
            }
            _ => {
                let want = err["message"].as_str().unwrap();
                let shape = &want[want.find("weight shape").unwrap()..want.find(')').unwrap() + 1];
                assert!(e.contains(shape), "{case}: {e} (PEFT: {want})");
            }
        }
        refused += 1;
    }
    assert_eq!(refused, 5);
}

#[test]
fn conversion_rank_parses_as_python_int_or_float() {
    assert_eq!(
        "16".parse::<ConversionRank>().unwrap(),
        ConversionRank::Fixed(16)
    );
    assert_eq!(
        "1.0".parse::<ConversionRank>().unwrap(),
        ConversionRank::Energy(1.0)
    );
    assert_eq!(
        "5e-1".parse::<ConversionRank>().unwrap(),
        ConversionRank::Energy(0.5)
    );
    for bad in ["0", "0.0", "1.5", "-3", "x"] {
        assert!(bad.parse::<ConversionRank>().is_err(), "{bad}");
    }
}
