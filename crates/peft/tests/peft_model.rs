//! `PeftModel` over a small host built from the MLP fixtures (Linear slots plus a LayerNorm): loading,
//! injection, several adapters, disabling, merging, saving, and the errors PEFT raises.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::config::{LoraConfig, TargetModules};
use peft::host::AdapterHost;
use peft::tuners::tuners_utils::{ModuleInfo, ModuleKind};
use peft::{AdapterSlot, BaseLayer, ForwardCtx, PeftConfig, PeftError, PeftModel};
use std::path::Path;

/// The fixtures' `MLP`: Linear layers as adapter slots, anything with a 1-D weight as a LayerNorm.
pub(crate) struct MlpHost {
    order: Vec<String>,
    slots: IndexMap<String, AdapterSlot>,
    tensors: IndexMap<String, Tensor>,
}

impl MlpHost {
    pub(crate) fn from_base(path: &Path) -> Self {
        let base = load(path);
        let mut order = Vec::new();
        for k in base.keys() {
            let m = k.rsplit_once('.').unwrap().0.to_string();
            if !order.contains(&m) {
                order.push(m);
            }
        }
        let mut slots = IndexMap::new();
        let mut tensors = IndexMap::new();
        for m in &order {
            let w = &base[&format!("{m}.weight")];
            let b = base.get(&format!("{m}.bias")).cloned();
            if w.rank() == 2 {
                slots.insert(
                    m.clone(),
                    AdapterSlot::new(m.clone(), BaseLayer::linear(w.clone(), b).unwrap()),
                );
            } else {
                tensors.insert(format!("{m}.weight"), w.clone());
                if let Some(b) = b {
                    tensors.insert(format!("{m}.bias"), b);
                }
            }
        }
        Self {
            order,
            slots,
            tensors,
        }
    }
}

impl AdapterHost for MlpHost {
    fn module_infos(&self) -> Vec<ModuleInfo> {
        self.order
            .iter()
            .map(|m| ModuleInfo {
                name: m.clone(),
                kind: if self.slots.contains_key(m) {
                    ModuleKind::Linear
                } else {
                    ModuleKind::Other("LayerNorm".into())
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
        self.tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
    fn set_tensor(&mut self, name: &str, value: Tensor) -> peft::Result<()> {
        if let Some(t) = self.tensors.get_mut(name) {
            assert_eq!(t.dims(), value.dims());
            *t = value;
            return Ok(());
        }
        let (m, what) = name.rsplit_once('.').unwrap();
        let slot = self
            .slots
            .get_mut(m)
            .ok_or_else(|| PeftError::MissingModule { module: m.into() })?;
        match what {
            "weight" => slot.set_base_tensors(Some(value), None),
            "bias" => slot.set_base_tensors(None, Some(value)),
            _ => Err(PeftError::MissingKey(name.into())),
        }
    }
}

fn case(name: &str) -> std::path::PathBuf {
    fixtures_dir().join("lora/cases").join(name)
}

pub(crate) fn check_outputs(what: &str, pm: &PeftModel<MlpHost>, dir: &Path, prefix: &str) {
    let io = load(&dir.join("io.safetensors"));
    for (m, slot) in &pm.model().slots {
        let Some(expected) = io.get(&format!("output{prefix}.{m}")) else {
            continue;
        };
        let x = &io[&format!("input{prefix}.{m}")];
        let y = slot.forward(x, &ForwardCtx::eval()).unwrap();
        assert_close(&format!("{what}: {m}"), &y, expected, 1e-5, 1e-4);
    }
}

#[test]
fn from_pretrained_applies_trained_biases_and_saves_peft_files() {
    for name in [
        "bias_all",
        "bias_lora_only",
        "modules_to_save",
        "lora_bias",
        "dora_linear",
    ] {
        let dir = case(name);
        let pm = PeftModel::from_pretrained(
            MlpHost::from_base(&dir.join("base.safetensors")),
            dir.join("adapter"),
            "default",
            &Device::Cpu,
        )
        .unwrap();
        check_outputs(name, &pm, &dir, "");
        let tmp = tempfile::tempdir().unwrap();
        pm.save_pretrained(tmp.path()).unwrap();
        let mine = load(&tmp.path().join("adapter_model.safetensors"));
        let theirs = load(&dir.join("adapter/adapter_model.safetensors"));
        let mut a: Vec<&String> = mine.keys().collect();
        let mut b: Vec<&String> = theirs.keys().collect();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{name}: saved keys");
        for (k, t) in &theirs {
            assert_close(&format!("{name}: {k}"), &mine[k], t, 0.0, 0.0);
        }
    }
}

#[test]
fn several_adapters_load_activate_save_and_delete() {
    let dir = case("multi_adapter");
    let mut pm = PeftModel::from_pretrained(
        MlpHost::from_base(&dir.join("base.safetensors")),
        dir.join("adapter"),
        "default",
        &Device::Cpu,
    )
    .unwrap();
    pm.load_adapter(dir.join("adapter/other"), "other", &Device::Cpu)
        .unwrap();
    assert_eq!(
        pm.active_adapters(),
        ["default"],
        "a loaded adapter is not activated"
    );
    pm.set_adapter(&["default", "other"]).unwrap();
    check_outputs("both active", &pm, &dir, "");
    let tmp = tempfile::tempdir().unwrap();
    pm.save_pretrained(tmp.path()).unwrap();
    assert!(tmp.path().join("adapter_model.safetensors").exists());
    assert!(tmp.path().join("other/adapter_model.safetensors").exists());
    assert!(matches!(
        pm.set_adapter(&["nope"]).unwrap_err(),
        PeftError::UnknownAdapter(_)
    ));
    pm.delete_adapter("other").unwrap();
    assert_eq!(pm.active_adapters(), ["default"]);
    assert!(pm.model().slots["lin0"].adapter("other").is_none());
    // after deleting, the second adapter can be loaded again under the same name
    pm.load_adapter(dir.join("adapter/other"), "other", &Device::Cpu)
        .unwrap();
}

#[test]
fn disabling_unmerges_and_runs_the_base() {
    let dir = case("linear_basic");
    let mut pm = PeftModel::from_pretrained(
        MlpHost::from_base(&dir.join("base.safetensors")),
        dir.join("adapter"),
        "default",
        &Device::Cpu,
    )
    .unwrap();
    pm.merge_adapter(None).unwrap();
    pm.with_adapters_disabled(|pm| check_outputs("disabled", pm, &dir, "_disabled"))
        .unwrap();
    assert!(pm.model().slots["lin0"].merged().is_empty());
    check_outputs("enabled again", &pm, &dir, "");
}

#[test]
fn merge_and_unload_gives_peft_weights_and_a_plain_model() {
    for name in ["linear_basic", "dora_linear", "multi_adapter", "lora_bias"] {
        let dir = case(name);
        let json = case_json(&dir);
        let mut pm = PeftModel::from_pretrained(
            MlpHost::from_base(&dir.join("base.safetensors")),
            dir.join("adapter"),
            "default",
            &Device::Cpu,
        )
        .unwrap();
        if name == "multi_adapter" {
            pm.load_adapter(dir.join("adapter/other"), "other", &Device::Cpu)
                .unwrap();
        }
        let order = strings(&json, "merge_order");
        let refs: Vec<&str> = order.iter().map(|s| s.as_str()).collect();
        let host = pm.merge_and_unload(Some(&refs)).unwrap();
        let merged = load(&dir.join("merged.safetensors"));
        for (m, slot) in &host.slots {
            assert_eq!(
                slot.adapters().count(),
                0,
                "{name}: {m} still holds adapters"
            );
            assert_close(
                &format!("{name}: {m}"),
                &slot.base().weight().unwrap(),
                &merged[&format!("{m}.weight")],
                1e-5,
                1e-4,
            );
            if let Some(b) = slot.base().bias() {
                assert_close(
                    &format!("{name}: {m}.bias"),
                    b,
                    &merged[&format!("{m}.bias")],
                    1e-5,
                    1e-4,
                );
            }
        }
    }
}

fn lora(targets: &[&str], r: usize) -> PeftConfig {
    PeftConfig::Lora(LoraConfig {
        lora: peft::config::LoraFields {
            r,
            lora_alpha: 2.0 * r as f64,
            ..Default::default()
        },
        targets: peft::config::TargetFields {
            target_modules: Some(TargetModules::List(
                targets.iter().map(|s| s.to_string()).collect(),
            )),
            ..Default::default()
        },
        ..Default::default()
    })
}

#[test]
fn get_peft_model_injects_by_name_and_counts_parameters_like_peft() {
    let dir = case("bias_all"); // lin0 [24,16]+b, norm [24]+b, lin1 [12,24]+b
    let host = MlpHost::from_base(&dir.join("base.safetensors"));
    let mut pm = PeftModel::get_peft_model(host, lora(&["lin1"], 4), "default", 7).unwrap();
    assert!(pm.model().slots["lin0"].adapter("default").is_none());
    assert!(pm.model().slots["lin1"].adapter("default").is_some());
    let count = pm.trainable_parameters();
    let base = 24 * 16 + 24 + 24 + 24 + 12 * 24 + 12;
    let adapter = 4 * 24 + 12 * 4;
    assert_eq!(count.trainable, adapter);
    assert_eq!(count.all, base + adapter);
    assert_eq!(
        count.to_string(),
        format!(
            "trainable params: {adapter} || all params: {} || trainable%: {:.4}",
            base + adapter,
            100.0 * adapter as f64 / (base + adapter) as f64
        )
    );
    // a fresh LoRA adapter is the identity
    let x = peft::PeftRng::new(1)
        .normal_tensor((3, 24), 0.0, 1.0, DType::F32, &Device::Cpu)
        .unwrap();
    let slot = &pm.model().slots["lin1"];
    assert_close(
        "identity",
        &slot.forward(&x, &ForwardCtx::eval()).unwrap(),
        &slot.base().forward(&x).unwrap(),
        0.0,
        0.0,
    );
    // a second adapter: inactive until set, then trainable vars follow the active set
    pm.add_adapter("second", lora(&["lin0", "lin1"], 2))
        .unwrap();
    assert_eq!(pm.active_adapters(), ["default"]);
    assert_eq!(pm.trainable_vars().len(), 2);
    pm.set_adapter(&["second"]).unwrap();
    assert_eq!(pm.trainable_vars().len(), 4);
    let saved = tempfile::tempdir().unwrap();
    pm.save_pretrained(saved.path()).unwrap();
    let cfg = PeftConfig::from_dir(&saved.path().join("second")).unwrap();
    assert!(matches!(cfg, PeftConfig::Lora(c) if c.lora.r == 2));
}

#[test]
fn injection_errors_are_peft_errors_and_leave_the_model_unchanged() {
    let dir = case("bias_all");
    let mut pm = PeftModel::new(MlpHost::from_base(&dir.join("base.safetensors")), 0);
    let e = pm.add_adapter("default", lora(&["nope"], 4)).unwrap_err();
    assert!(matches!(e, PeftError::NoTargetMatched(_)), "{e}");
    let e = pm.add_adapter("default", lora(&["norm"], 4)).unwrap_err();
    assert!(e.to_string().contains("norm"), "{e}");
    assert!(pm.configs().is_empty());
    assert!(pm.model().slots.values().all(|s| s.adapters().count() == 0));
    pm.add_adapter("default", lora(&["lin0"], 4)).unwrap();
    let e = pm.add_adapter("default", lora(&["lin0"], 4)).unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
    // loading an adapter for modules the model lacks
    let other = case("conv2d");
    let e = pm
        .load_adapter(other.join("adapter"), "conv", &Device::Cpu)
        .unwrap_err();
    assert!(matches!(e, PeftError::MissingModule { .. }), "{e}");
}

#[test]
fn bias_all_and_lora_only_train_biases_in_place_and_save_them_like_peft() {
    use peft::config::LoraBias;
    let dir = case("bias_all"); // lin0 [24,16]+b, norm [24]+b, lin1 [12,24]+b
    for (mode, expected) in [
        (LoraBias::All, vec!["lin0.bias", "lin1.bias", "norm.bias"]),
        (LoraBias::LoraOnly, vec!["lin0.bias"]),
    ] {
        let mut cfg = LoraConfig {
            lora: peft::config::LoraFields {
                r: 4,
                lora_alpha: 8.0,
                ..Default::default()
            },
            targets: peft::config::TargetFields {
                target_modules: Some(TargetModules::List(vec!["lin0".into()])),
                ..Default::default()
            },
            ..Default::default()
        };
        cfg.lora.bias = mode;
        let pm = PeftModel::get_peft_model(
            MlpHost::from_base(&dir.join("base.safetensors")),
            PeftConfig::Lora(cfg),
            "default",
            3,
        )
        .unwrap();
        let vars = pm.trainable_vars();
        let mut biases: Vec<&str> = vars
            .iter()
            .map(|(k, _)| k.as_str())
            .filter(|k| k.ends_with(".bias"))
            .collect();
        biases.sort();
        assert_eq!(biases, expected, "{mode:?}");
        let bias_params: usize = vars
            .iter()
            .filter(|(k, _)| k.ends_with(".bias"))
            .map(|(_, v)| v.elem_count())
            .sum();
        assert_eq!(
            pm.trainable_parameters().trainable,
            4 * 16 + 24 * 4 + bias_params
        );
        // the biases receive gradients through the frozen base op, even for an input that needs none
        let slot = &pm.model().slots["lin0"];
        let x = peft::PeftRng::new(1)
            .normal_tensor((3, 16), 0.0, 1.0, DType::F32, &Device::Cpu)
            .unwrap();
        let y = slot.forward(&x, &ForwardCtx::train(0, 0)).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let (_, b) = vars.iter().find(|(k, _)| k == "lin0.bias").unwrap();
        let g = grads.get(b.as_tensor()).expect("lin0.bias has a gradient");
        assert_close(
            "d sum / d bias = rows",
            g,
            &Tensor::full(3f32, 24, &Device::Cpu).unwrap(),
            1e-6,
            0.0,
        );
        // saved like PEFT: targeted layers' biases under base_layer, the others under their own names
        let tmp = tempfile::tempdir().unwrap();
        pm.save_pretrained(tmp.path()).unwrap();
        let saved = load(&tmp.path().join("adapter_model.safetensors"));
        let mut keys: Vec<&String> = saved.keys().filter(|k| k.ends_with(".bias")).collect();
        keys.sort();
        let want: Vec<String> = match mode {
            LoraBias::All => vec![
                "base_model.model.lin0.base_layer.bias".into(),
                "base_model.model.lin1.bias".into(),
                "base_model.model.norm.bias".into(),
            ],
            _ => vec!["base_model.model.lin0.base_layer.bias".into()],
        };
        assert_eq!(keys, want.iter().collect::<Vec<_>>(), "{mode:?}");
    }
}
