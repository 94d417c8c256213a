//! PiSSA and OLoRA (the LoRA inits that rewrite the base) and their conversion to plain LoRA on save, against
//! `fixtures/lora/rewrite_init/` (written by `fixtures/lora/gen_rewrite_init.py`), layer by layer: the initial
//! `A` / `B` (OLoRA exactly, PiSSA up to the sign of each singular pair), the residual base weight, the trained
//! forward on the residual, and PEFT's `subtract_mutated_init` (the products of the converted factors).

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::io::peft_key;
use peft::layer::{AdapterSlot, BaseKind, BaseLayer, registry};
use peft::tuners::lora::rewrite_init::subtract_mutated_init;
use peft::{ForwardCtx, PeftConfig, PeftRng};
use std::path::PathBuf;

pub fn rewrite_cases() -> Vec<PathBuf> {
    let root = fixtures_dir().join("lora/rewrite_init");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.json").exists())
        .collect();
    v.sort();
    assert_eq!(v.len(), 6);
    v
}

/// The case's LoRA config (its kwargs, as PEFT got them).
pub fn case_config(json: &serde_json::Value) -> PeftConfig {
    let mut c = json["lora_config_kwargs"].clone();
    c["peft_type"] = "LORA".into();
    c["lora_dropout"] = 0.0.into();
    PeftConfig::from_json_value(c).unwrap()
}

fn base_layer(json: &serde_json::Value, base: &IndexMap<String, Tensor>, m: &str) -> BaseLayer {
    let kind = match json["kinds"][m].as_str().unwrap() {
        "conv1d" => BaseKind::Conv1D,
        "linear" => BaseKind::Linear,
        k => panic!("{k}"),
    };
    BaseLayer::new(
        kind,
        base[&format!("{m}.weight")].clone(),
        base.get(&format!("{m}.bias")).cloned(),
    )
    .unwrap()
}

/// `a` equals `b` up to the sign of each row (`rows == true`) or column.
fn assert_equal_up_to_signs(what: &str, a: &Tensor, b: &Tensor, rows: bool) {
    let (a, b) = if rows {
        (a.clone(), b.clone())
    } else {
        (a.t().unwrap(), b.t().unwrap())
    };
    let a = a.to_vec2::<f32>().unwrap();
    let b = b.to_vec2::<f32>().unwrap();
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let dot: f32 = x.iter().zip(y).map(|(p, q)| p * q).sum();
        let s = if dot < 0.0 { -1.0 } else { 1.0 };
        for (p, q) in x.iter().zip(y) {
            assert!(
                (s * p - q).abs() <= 1e-5 + 1e-4 * q.abs(),
                "{what}: vector {i}: {p} vs {q} (sign {s})"
            );
        }
    }
}

#[test]
fn rewrite_inits_give_peft_factors_and_residuals() {
    for dir in rewrite_cases() {
        let case = dir.file_name().unwrap().to_string_lossy().to_string();
        let json = case_json(&dir);
        let config = case_config(&json);
        let base = load(&dir.join("base.safetensors"));
        let init = load(&dir.join("init.safetensors"));
        let olora = case.starts_with("olora");
        for m in strings(&json, "targets") {
            let what = format!("{case}: {m}");
            let layer = base_layer(&json, &base, &m);
            let adapter = registry::new_adapter(&config, &m, &layer, &mut PeftRng::new(7)).unwrap();
            let t: IndexMap<String, Tensor> = adapter.tensors().into_iter().collect();
            let (a, b) = (&t["lora_A.weight"], &t["lora_B.weight"]);
            let (pa, pb) = (&init[&format!("A.{m}")], &init[&format!("B.{m}")]);
            if olora {
                assert_close(&format!("{what} A"), a, pa, 1e-5, 1e-4);
                assert_close(&format!("{what} B"), b, pb, 1e-5, 1e-4);
            } else {
                assert_equal_up_to_signs(&format!("{what} A"), a, pa, true);
                assert_equal_up_to_signs(&format!("{what} B"), b, pb, false);
            }
            assert_close(
                &format!("{what} B·A"),
                &b.matmul(a).unwrap(),
                &pb.matmul(pa).unwrap(),
                1e-5,
                1e-4,
            );
            let (delta, _) = adapter.delta_weight(layer.kind()).unwrap().unwrap();
            let residual = (layer.weight().unwrap() - delta).unwrap();
            assert_close(
                &format!("{what} residual"),
                &residual,
                &init[&format!("W_res.{m}")],
                1e-5,
                1e-4,
            );
            let moved = max_diff(&residual, &layer.weight().unwrap());
            assert!(moved > 1e-3, "{what}: the init moves nothing ({moved})");
        }
    }
}

#[test]
fn trained_rewrite_adapters_run_on_the_residual_and_convert_as_peft() {
    for dir in rewrite_cases() {
        let case = dir.file_name().unwrap().to_string_lossy().to_string();
        let json = case_json(&dir);
        let config = case_config(&json);
        let base = load(&dir.join("base.safetensors"));
        let init = load(&dir.join("init.safetensors"));
        let io = load(&dir.join("io.safetensors"));
        let mut trained = Vec::new();
        let mut ours_initial = IndexMap::new();
        for m in strings(&json, "targets") {
            let layer = base_layer(&json, &base, &m);
            let fresh = registry::new_adapter(&config, &m, &layer, &mut PeftRng::new(7)).unwrap();
            for (k, t) in fresh.tensors() {
                ours_initial.insert(peft_key(&m, &k), t);
            }
            let (ta, tb) = (
                &init[&format!("trained_A.{m}")],
                &init[&format!("trained_B.{m}")],
            );
            trained.push((peft_key(&m, "lora_A.weight"), ta.clone()));
            trained.push((peft_key(&m, "lora_B.weight"), tb.clone()));
            // The trained adapter on the residual base gives PEFT's trained output (layer cases record it).
            if let Some(want) = io.get(&format!("out_trained.{m}")) {
                let (delta, _) = fresh.delta_weight(layer.kind()).unwrap().unwrap();
                let w_res = (layer.weight().unwrap() - delta).unwrap();
                let res = BaseLayer::new(*layer.kind(), w_res, layer.bias().cloned()).unwrap();
                let mut params = IndexMap::new();
                params.insert("lora_A.weight".to_string(), ta.clone());
                params.insert("lora_B.weight".to_string(), tb.clone());
                let mut slot = AdapterSlot::new(m.clone(), res);
                let a = registry::build_adapter(&config, &m, slot.base(), &params).unwrap();
                slot.add_adapter("default", a).unwrap();
                slot.set_active(&["default"]);
                let y = slot
                    .forward(&io[&format!("input.{m}")], &ForwardCtx::eval())
                    .unwrap();
                assert_close(&format!("{case}: {m} trained"), &y, want, 1e-5, 1e-4);
            }
        }
        let converted = subtract_mutated_init(&trained, &ours_initial).unwrap();
        let peft = load(&dir.join("converted/adapter_model.safetensors"));
        assert_eq!(converted.len(), peft.len(), "{case}");
        let ours: IndexMap<String, Tensor> = converted.into_iter().collect();
        for (k, a) in &peft {
            let Some(m) = k.strip_suffix(".lora_A.weight") else {
                continue;
            };
            assert_eq!(ours[k].dims(), a.dims(), "{case}: {k}");
            let b = &peft[&format!("{m}.lora_B.weight")];
            let mine = ours[&format!("{m}.lora_B.weight")]
                .matmul(&ours[k])
                .unwrap();
            assert_close(
                &format!("{case}: {m} converted B·A"),
                &mine,
                &b.matmul(a).unwrap(),
                1e-5,
                1e-4,
            );
        }
    }
}

#[test]
fn rewrite_inits_refuse_what_they_cannot_do() {
    let dir = fixtures_dir().join("lora/rewrite_init/pissa_mlp");
    let json = case_json(&dir);
    let base = load(&dir.join("base.safetensors"));
    let layer = base_layer(&json, &base, "lin0"); // [24, 16]
    let with = |extra: serde_json::Value| {
        let mut c = serde_json::json!({"peft_type": "LORA", "target_modules": ["lin0"], "r": 4});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        let c = PeftConfig::from_json_value(c)?;
        c.validate().map(|_| c)
    };
    let e = with(serde_json::json!({"init_lora_weights": "pissa_niter_4"})).unwrap_err();
    assert!(e.to_string().contains("svd_lowrank"), "{e}");
    let e = with(serde_json::json!({"init_lora_weights": "pissa", "use_dora": true})).unwrap_err();
    assert!(e.to_string().contains("use_dora"), "{e}");
    let big = with(serde_json::json!({"init_lora_weights": "olora", "r": 17})).unwrap();
    let e = registry::new_adapter(&big, "lin0", &layer, &mut PeftRng::new(0)).unwrap_err();
    assert!(e.to_string().contains("r=17 exceeds"), "{e}");
    let emb = BaseLayer::new(
        BaseKind::Embedding,
        Tensor::ones((10, 4), DType::F32, &Device::Cpu).unwrap(),
        None,
    )
    .unwrap();
    let olora = with(serde_json::json!({"init_lora_weights": "OLoRA"})).unwrap();
    let e = registry::new_adapter(&olora, "emb", &emb, &mut PeftRng::new(0)).unwrap_err();
    assert!(e.to_string().contains("Linear layers only"), "{e}");
}

#[test]
fn peft_merge_of_a_rewrite_init_adapter_is_peft_s_merge_and_unload() {
    use peft::merge::{MergeAdapter, merge_model};
    for dir in rewrite_cases() {
        let case = dir.file_name().unwrap().to_string_lossy().to_string();
        let merged = load(&dir.join("merged.safetensors"));
        let adapter = MergeAdapter::load(dir.join("trained"), None, &Device::Cpu).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let hf = dir.join("base_hf").exists();
        let (src, out) = if hf {
            (dir.join("base_hf"), tmp.path().join("merged"))
        } else {
            (
                dir.join("base.safetensors"),
                tmp.path().join("merged.safetensors"),
            )
        };
        merge_model(&src, vec![adapter], &out, None, &mut |_, _, _| {})
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let written = load(&if hf {
            out.join("model.safetensors")
        } else {
            out
        });
        let base = load(&dir.join("base.safetensors"));
        let mut moved = 0;
        for (k, t) in &written {
            let want = merged
                .get(k)
                .unwrap_or_else(|| panic!("{case}: {k} not in PEFT's merge"));
            assert_close(&format!("{case}: {k}"), t, want, 1e-5, 1e-4);
            if base.get(k).is_some_and(|b| max_diff(b, want) > 1e-4) {
                moved += 1;
            }
        }
        assert_eq!(moved, strings(&case_json(&dir), "targets").len(), "{case}");
    }
}

#[test]
fn a_rewrite_init_adapter_is_not_converted_by_svd() {
    use peft::tuners::lora::conversion::{ConversionRank, convert_slots};
    let dir = fixtures_dir().join("lora/rewrite_init/pissa_mlp");
    let json = case_json(&dir);
    let config = case_config(&json);
    let base = load(&dir.join("base.safetensors"));
    let layer = base_layer(&json, &base, "lin0");
    let mut slot = AdapterSlot::new("lin0", layer.clone());
    let a = registry::new_adapter(&config, "lin0", &layer, &mut PeftRng::new(0)).unwrap();
    slot.add_adapter("default", a).unwrap();
    let e = convert_slots(&[&slot], &config, "default", ConversionRank::Fixed(2)).unwrap_err();
    assert!(e.to_string().contains("save_pretrained_converted"), "{e}");
}
