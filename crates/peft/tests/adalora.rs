//! AdaLoRA parity with PEFT 0.21.2 on the fixtures of `fixtures/adalora/` (written by `gen_adalora.py`):
//! per-layer forward, disabled forward, merged weights, unmerge, save → re-load and `peft merge`, including
//! adapters pruned by PEFT's RankAllocator (`rank_pattern` masks, truncated and zero-size tensors), and our
//! rank allocator against PEFT's training trajectory (`fixtures/adalora/train/`).

use crate::common::*;
use crate::lora_parity::{LoadedCase, load_case};
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::io::peft_key;
use peft::layer::registry;
use peft::merge::{MergeAdapter, merge_model};
use peft::tuners::adalora::layer::{AdaLoraAdapter, AdaLoraOptions};
use peft::{AdapterSlot, BaseLayer, ForwardCtx, PeftConfig, PeftError, PeftRng};
use std::path::Path;

const CASES: [&str; 4] = [
    "adalora_plain",
    "adalora_pruned",
    "adalora_pruned_alpha0",
    "adalora_conv",
];

fn for_each_case(f: impl Fn(&Path, &mut LoadedCase)) {
    parity::for_each_case("adalora", parity::Expected::Names(&CASES), f);
}

#[test]
fn adalora_forward_matches_peft_per_layer() {
    for_each_case(|dir, c| parity::assert_forward_matches(dir, c, None));
}

#[test]
fn adalora_training_forward_without_dropout_is_the_eval_forward() {
    let dir = fixtures_dir().join("adalora/cases/adalora_plain");
    let c = load_case(&dir);
    let io = load(&dir.join("io.safetensors"));
    for (m, slot) in &c.slots {
        let x = &io[&format!("input.{m}")];
        let y = slot.forward(x, &ForwardCtx::train(1, 0)).unwrap();
        assert_close(m, &y, &io[&format!("output.{m}")], 1e-5, 1e-4);
    }
}

#[test]
fn adalora_dropout_applies_in_training_only() {
    let dir = fixtures_dir().join("adalora/cases/adalora_conv");
    let c = load_case(&dir);
    let io = load(&dir.join("io.safetensors"));
    let slot = &c.slots["proj"];
    let x = &io["input.proj"];
    let eval = slot.forward(x, &ForwardCtx::eval()).unwrap();
    let t1 = slot.forward(x, &ForwardCtx::train(7, 0)).unwrap();
    let t1b = slot.forward(x, &ForwardCtx::train(7, 0)).unwrap();
    let t2 = slot.forward(x, &ForwardCtx::train(7, 1)).unwrap();
    assert!(max_diff(&eval, &t1) > 1e-4, "dropout changes the output");
    assert_eq!(max_diff(&t1, &t1b), 0.0, "same step, same mask");
    assert!(max_diff(&t1, &t2) > 1e-4, "another step, another mask");
}

#[test]
fn adalora_disabled_forward_is_the_base() {
    for_each_case(parity::assert_disabled_forward_is_base);
}

#[test]
fn adalora_loaded_ranks_scale_and_divisor_follow_peft() {
    for_each_case(|dir, c| {
        for (m, slot) in &c.slots {
            let a = slot.adapter("default").unwrap();
            assert_eq!(a.peft_type(), "ADALORA");
            let r = c.json["r"][m]["default"].as_u64().unwrap() as usize;
            let scaling = c.json["scaling"][m]["default"].as_f64().unwrap();
            let ranknum = c.json["ranknum"][m]["default"].as_f64().unwrap() as f32;
            let vars = a.vars();
            assert_eq!(vars[0].1.dims()[0], r, "{m}: rank");
            let want = a.describe();
            assert!(want.starts_with(&format!("r={r} ")), "{m}: {want}");
            if r > 0 {
                // factor = scaling / (ranknum + 1e-5), as PEFT computes it in f32
                let (_, config, _, _) = &c.adapters[0];
                let PeftConfig::AdaLora(cfg) = config else {
                    panic!()
                };
                let opts = AdaLoraOptions::from_config(cfg, m).unwrap();
                assert_eq!(opts.loaded_rank(), r);
                let expected = scaling / (ranknum + 1e-5) as f64;
                let tensors: IndexMap<String, Tensor> = a.tensors().into_iter().collect();
                let ad = AdaLoraAdapter::from_tensors(slot.base(), opts, &tensors).unwrap();
                assert!(
                    (ad.factor() - expected).abs() < 1e-9 * expected,
                    "{}: {m}: factor {} vs {expected}",
                    dir.display(),
                    ad.factor()
                );
            }
        }
    });
}

#[test]
fn adalora_merge_matches_peft_and_unmerge_restores_the_base() {
    let checks = parity::MergeChecks {
        merge_order: false,
        merged_weight: (1e-5, 1e-4),
        merged_forward: (1e-4, 1e-3),
        unmerged_vs_base: (1e-5, 1e-4),
        ..Default::default()
    };
    for_each_case(|dir, c| {
        let merged = load(&dir.join("merged.safetensors"));
        for (m, slot) in &c.slots {
            // delta_weight (weighted merges) is what merging adds
            let delta = slot
                .adapter("default")
                .unwrap()
                .delta_weight(slot.base().kind())
                .unwrap()
                .expect("additive");
            let key = format!("{m}.weight");
            let expected_delta = (&merged[&key] - &c.base[&key]).unwrap();
            assert_close(
                &format!("{}: merged {m} delta", dir.display()),
                &delta.0,
                &expected_delta,
                1e-5,
                1e-4,
            );
            assert!(delta.1.is_none());
        }
        parity::assert_case_merge_unmerge(dir, c, &checks);
    });
}

#[test]
fn adalora_save_reload_gives_the_same_file_and_config() {
    for_each_case(|dir, c| {
        // shapes are compared too (zero-size ones included)
        let (name, config, _, original) = &c.adapters[0];
        let saved =
            peft::io::adapter_state_dict(c.slots.values(), name, config, &|_| false).unwrap();
        let (mine, theirs) =
            parity::assert_reloads_as_peft(dir, name, config, &saved, original, &|_| true);
        let rp = &theirs["rank_pattern"];
        if dir.ends_with("adalora_pruned") {
            assert_eq!(rp["aux.lora_E"], serde_json::json!(vec![false; 6]));
            assert_eq!(mine["rank_pattern"], *rp);
        }
    });
}

#[test]
fn adalora_merge_files_matches_peft_merge_and_unload() {
    for dir in cases("adalora") {
        let merged = load(&dir.join("merged.safetensors"));
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged.safetensors");
        let ad = MergeAdapter::load(dir.join("adapter"), None, &Device::Cpu).unwrap();
        merge_model(
            &dir.join("base.safetensors"),
            vec![ad],
            &out,
            None,
            &mut |_, _, _| {},
        )
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let w = load(&out);
        assert_eq!(w.len(), merged.len());
        for (k, t) in &w {
            assert_close(
                &format!("{}: {k}", dir.display()),
                t,
                &merged[k],
                1e-5,
                1e-4,
            );
        }
        // additive, so a weighted merge is allowed
        MergeAdapter::load(dir.join("adapter"), Some(0.5), &Device::Cpu).unwrap();
    }
}

fn linear(out: usize, inp: usize) -> BaseLayer {
    let w = PeftRng::new(1)
        .normal_tensor((out, inp), 0.0, 1.0, DType::F32, &Device::Cpu)
        .unwrap();
    BaseLayer::linear(w, None).unwrap()
}

fn parse_config(json: &str) -> PeftConfig {
    let c = PeftConfig::from_json_str(json).unwrap();
    c.validate().unwrap();
    c
}

#[test]
fn new_adalora_adapters_start_as_peft_does() {
    let cfg =
        parse_config(r#"{"peft_type": "ADALORA", "total_step": 10, "init_r": 5, "lora_alpha": 4}"#);
    let base = linear(40, 30);
    let a = registry::new_adapter(&cfg, "fc", &base, &mut PeftRng::new(3)).unwrap();
    let t: IndexMap<String, Tensor> = a.tensors().into_iter().collect();
    assert_eq!(t["lora_A"].dims(), [5, 30]);
    assert_eq!(t["lora_B"].dims(), [40, 5]);
    assert_eq!(t["lora_E"].dims(), [5, 1]);
    assert_eq!(
        t["lora_E"]
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        0.0
    );
    for k in ["lora_A", "lora_B"] {
        let v: Vec<f32> = t[k].flatten_all().unwrap().to_vec1().unwrap();
        let std = (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
        assert!((std - 0.02).abs() < 0.004, "{k}: std {std}");
    }
    // E = 0: the adapter starts as the identity
    let mut slot = AdapterSlot::new("fc", base.clone());
    slot.add_adapter("default", a).unwrap();
    let x = Tensor::ones((2, 30), DType::F32, &Device::Cpu).unwrap();
    let y = slot.forward(&x, &ForwardCtx::eval()).unwrap();
    assert_eq!(max_diff(&y, &base.forward(&x).unwrap()), 0.0);
    // init_lora_weights=false: everything random, E included
    let cfg = parse_config(
        r#"{"peft_type": "ADALORA", "total_step": 10, "init_r": 5, "init_lora_weights": false}"#,
    );
    let a = registry::new_adapter(&cfg, "fc", &base, &mut PeftRng::new(3)).unwrap();
    let e = a
        .tensors()
        .into_iter()
        .find(|(k, _)| k == "lora_E")
        .unwrap()
        .1;
    assert!(
        e.abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.5
    );
    assert!(registry::is_additive(&cfg));
}

#[test]
fn adalora_with_masks_in_memory_saves_the_kept_rows_like_peft() {
    // An adapter created at init_r whose config carries masks (as after training) saves the kept rows only
    // (PEFT's `resize_state_dict_by_rank_pattern`), and the file loads back at the kept rank.
    let text = r#"{"peft_type": "ADALORA", "total_step": 10, "init_r": 4, "init_lora_weights": false,
        "rank_pattern": {"fc.lora_E": [false, true, false, true], "gc.lora_E": [false, false, false, false]}}"#;
    let cfg = parse_config(text);
    let base = linear(6, 5);
    let a = registry::new_adapter(&cfg, "fc", &base, &mut PeftRng::new(3)).unwrap();
    let full: IndexMap<String, Tensor> = a
        .vars()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    let saved: IndexMap<String, Tensor> = a.tensors().into_iter().collect();
    let idx = Tensor::new(&[1u32, 3], &Device::Cpu).unwrap();
    assert_eq!(saved["lora_A"].dims(), [2, 5]);
    assert_eq!(saved["lora_B"].dims(), [6, 2]);
    assert_close(
        "A",
        &saved["lora_A"],
        &full["lora_A"].index_select(&idx, 0).unwrap(),
        0.0,
        0.0,
    );
    assert_close(
        "E",
        &saved["lora_E"],
        &full["lora_E"].index_select(&idx, 0).unwrap(),
        0.0,
        0.0,
    );
    assert_close(
        "B",
        &saved["lora_B"],
        &full["lora_B"].index_select(&idx, 1).unwrap(),
        0.0,
        0.0,
    );
    let back = registry::build_adapter(&cfg, "fc", &base, &saved).unwrap();
    assert!(back.describe().starts_with("r=2 init_r=4"));
    // pruned to nothing: zero-size tensors, and the layer is the base
    let g = registry::new_adapter(&cfg, "gc", &base, &mut PeftRng::new(4)).unwrap();
    let saved: IndexMap<String, Tensor> = g.tensors().into_iter().collect();
    assert_eq!(saved["lora_A"].dims(), [0, 5]);
    assert_eq!(saved["lora_E"].dims(), [0, 1]);
    assert_eq!(saved["lora_B"].dims(), [6, 0]);
    let back = registry::build_adapter(&cfg, "gc", &base, &saved).unwrap();
    let mut slot = AdapterSlot::new("gc", base.clone());
    slot.add_adapter("default", back).unwrap();
    let x = Tensor::ones((3, 5), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(
        max_diff(
            &slot.forward(&x, &ForwardCtx::eval()).unwrap(),
            &base.forward(&x).unwrap()
        ),
        0.0
    );
    slot.merge(None).unwrap();
    assert_eq!(
        max_diff(&slot.base().weight().unwrap(), &base.weight().unwrap()),
        0.0
    );
}

#[test]
fn adalora_errors_name_keys_masks_and_layers() {
    let dir = fixtures_dir().join("adalora/cases/adalora_pruned");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin0"].base();
    let params = &split.modules["lin0"];
    let mut missing = params.clone();
    missing.shift_remove("lora_E");
    let e = registry::build_adapter(config, "lin0", base, &missing).unwrap_err();
    assert!(
        matches!(&e, PeftError::MissingKey(k) if k == &peft_key("lin0", "lora_E")),
        "{e}"
    );
    // lin1 keeps 2 ranks: lin0's rank-4 tensors do not fit it
    let e = registry::build_adapter(config, "lin1", c.slots["lin1"].base(), params).unwrap_err();
    assert!(matches!(e, PeftError::ShapeMismatch { .. }), "{e}");
    // a mask of the wrong length
    let cfg = PeftConfig::from_json_str(
        r#"{"peft_type": "ADALORA", "total_step": 10, "init_r": 4, "rank_pattern": {"fc.lora_E": [true]}}"#,
    )
    .unwrap();
    let e = registry::new_adapter(&cfg, "fc", &linear(3, 3), &mut PeftRng::new(1)).unwrap_err();
    assert!(matches!(e, PeftError::InvalidConfig(_)), "{e}");
    // embeddings are not AdaLoRA targets in PEFT
    let emb =
        BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let cfg = parse_config(r#"{"peft_type": "ADALORA", "total_step": 10}"#);
    let e = registry::new_adapter(&cfg, "emb", &emb, &mut PeftRng::new(1)).unwrap_err();
    assert!(matches!(e, PeftError::Unsupported { .. }), "{e}");
}

#[test]
fn adalora_peft_model_loads_saves_merges_and_injects() {
    use crate::peft_model::{MlpHost, check_outputs};
    use peft::PeftModel;
    use peft::host::AdapterHost;
    for name in ["adalora_plain", "adalora_pruned", "adalora_pruned_alpha0"] {
        let dir = fixtures_dir().join("adalora/cases").join(name);
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
            assert_eq!(mine[k].dims(), t.dims(), "{name}: {k}");
            if t.elem_count() > 0 {
                assert_close(&format!("{name}: {k}"), &mine[k], t, 0.0, 0.0);
            }
        }
        let read = |d: &std::path::Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(d.join("adapter_config.json")).unwrap())
                .unwrap()
        };
        assert!(
            peft::config::json_content_eq(&read(tmp.path()), &read(&dir.join("adapter"))),
            "{name}: config"
        );
        let merged = load(&dir.join("merged.safetensors"));
        let host = pm.merge_and_unload(None).unwrap();
        for slot in host.slots() {
            let m = slot.name();
            assert_eq!(slot.adapters().count(), 0);
            assert_close(
                &format!("{name}: merged {m}"),
                &slot.base().weight().unwrap(),
                &merged[&format!("{m}.weight")],
                1e-5,
                1e-4,
            );
        }
    }
    // get_peft_model: every targeted layer at init_r; PEFT counts 6·(16+24+1) + 6·(24+12+1) = 468 trainable
    // parameters (its `ranknum` buffers are frozen parameters, which only its total counts).
    let dir = fixtures_dir().join("adalora/cases/adalora_plain");
    let cfg = parse_config(
        r#"{"peft_type": "ADALORA", "total_step": 10, "init_r": 6, "target_modules": ["lin0", "lin1"]}"#,
    );
    let pm = PeftModel::get_peft_model(
        MlpHost::from_base(&dir.join("base.safetensors")),
        cfg,
        "default",
        0,
    )
    .unwrap();
    assert_eq!(pm.trainable_parameters().trainable, 468);
    // E starts at zero: the fresh adapter computes the base layers
    check_outputs("fresh adapter = base", &pm, &dir, "_disabled");
}

/// PEFT's RankAllocator trajectory (`fixtures/adalora/train/adalora_allocator`): SGD on an MLP whose loss is
/// MSE plus the orthogonal regulariser, `update_and_allocate(step)` after every `optimizer.step()`. Our
/// trainer with [`peft::tuners::adalora::attach_adalora`] gives the same losses, budgets and masks (a flip is
/// accepted only at a near-tie of the recorded scores), the same final E, and saves what PEFT saves.
#[test]
fn adalora_rank_allocator_follows_peft_trajectory() {
    use peft::layer::Adapter as _;
    use peft::train::optim::{Sgd, SgdConfig};
    use peft::train::schedule::Schedule;
    use peft::train::trainer::{Trainer, TrainerSettings};
    use peft::tuners::adalora::attach_adalora;

    let dir = fixtures_dir().join("adalora/train/adalora_allocator");
    let case: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let base = load(&dir.join("base.safetensors"));
    let init = load(&dir.join("init.safetensors"));
    let batches = load(&dir.join("batches.safetensors"));
    let traj = load(&dir.join("trajectory.safetensors"));
    let saved_text = std::fs::read_to_string(dir.join("adapter/adapter_config.json")).unwrap();
    let PeftConfig::AdaLora(saved_cfg) = PeftConfig::from_json_str(&saved_text).unwrap() else {
        panic!("not AdaLoRA")
    };
    let mut cfg = saved_cfg.clone();
    cfg.rank_pattern = None;

    let modules = ["lin0", "lin1"];
    let mut slots = Vec::new();
    let mut params = Vec::new();
    for m in modules {
        let b = BaseLayer::linear(
            base[&format!("{m}.weight")].clone(),
            base.get(&format!("{m}.bias")).cloned(),
        )
        .unwrap();
        let opts = AdaLoraOptions::from_config(&cfg, m).unwrap();
        let t: IndexMap<String, Tensor> = ["lora_A", "lora_B", "lora_E"]
            .iter()
            .map(|k| (k.to_string(), init[&format!("{m}.{k}")].clone()))
            .collect();
        let ad = AdaLoraAdapter::from_tensors(&b, opts, &t).unwrap();
        for (k, v) in ad.vars() {
            params.push((format!("{m}.{k}"), v));
        }
        let mut slot = AdapterSlot::new(m, b);
        slot.add_adapter("default", Box::new(ad)).unwrap();
        slots.push(slot);
    }
    let steps = case["steps"].as_u64().unwrap();
    let lr = case["lr"].as_f64().unwrap();
    let opt = Sgd::from_params(
        params.clone(),
        SgdConfig {
            lr,
            ..Default::default()
        },
    )
    .unwrap();
    let settings = TrainerSettings {
        max_grad_norm: None,
        max_steps: steps,
        ..Default::default()
    };
    let mut trainer =
        Trainer::new(params.clone(), Box::new(opt), Schedule::Constant, settings).unwrap();
    let alloc = attach_adalora(&mut trainer, &params, &cfg).unwrap();
    assert_eq!(
        alloc.init_budget() as u64,
        case["init_bgt"].as_u64().unwrap()
    );
    let traj_json = case["trajectory"].as_array().unwrap();
    for step in 0..steps as usize {
        let x = batches[&format!("x.{step}")].clone();
        let labels = batches[&format!("labels.{step}")].clone();
        let report = trainer
            .train_step(&mut |_, ctx| {
                let h = slots[0].forward(&x, ctx)?.tanh()?;
                let y = slots[1].forward(&h, ctx)?;
                Ok((y - &labels)?.sqr()?.mean_all()?)
            })
            .unwrap();
        let want = traj_json[step]["loss"].as_f64().unwrap();
        assert!(
            (report.loss - want).abs() <= 1e-5 * want.abs().max(1.0),
            "step {step}: loss {} vs PEFT {want}",
            report.loss
        );
    }
    let history = alloc.history();
    assert_eq!(history.len(), steps as usize);
    let mut flips = 0;
    for (rec, want) in history.iter().zip(traj_json) {
        let step = rec.step;
        assert_eq!(
            rec.budget as u64,
            want["budget"].as_u64().unwrap(),
            "step {step}: budget"
        );
        assert_eq!(
            rec.threshold.is_some(),
            want["masked"].as_bool().unwrap(),
            "step {step}: masked"
        );
        if let Some(thr) = rec.threshold {
            let want_thr = want["threshold"].as_f64().unwrap();
            assert!(
                (f64::from(thr) - want_thr).abs() <= 1e-4 * want_thr.abs(),
                "step {step}: threshold {thr} vs PEFT {want_thr}"
            );
            for m in modules {
                let key = format!("{m}.lora_E");
                let theirs: Vec<f32> = traj[&format!("scores.{step}.{m}")].to_vec1().unwrap();
                let mine = &rec.scores[&key];
                for (a, b) in mine.iter().zip(&theirs) {
                    assert!(
                        (a - b).abs() <= 1e-4 * b.abs().max(1e-12),
                        "step {step}: {key} score {a} vs PEFT {b}"
                    );
                }
            }
        }
        match (&rec.rank_pattern, want["rank_pattern"].as_object()) {
            (None, None) => {}
            (Some(mine), Some(theirs)) => {
                assert_eq!(mine.len(), theirs.len(), "step {step}: modules");
                for (k, v) in theirs {
                    let theirs: Vec<bool> = serde_json::from_value(v.clone()).unwrap();
                    let m = k.strip_suffix(".lora_E").unwrap();
                    for (i, (a, b)) in mine[k].iter().zip(&theirs).enumerate() {
                        if a != b {
                            // acceptable only at a near-tie of the scores of the last masking
                            let last = traj_json[..=step]
                                .iter()
                                .rev()
                                .find(|r| r["masked"].as_bool().unwrap())
                                .unwrap();
                            let s = last["step"].as_u64().unwrap();
                            let thr = last["threshold"].as_f64().unwrap();
                            let sc: Vec<f32> = traj[&format!("scores.{s}.{m}")].to_vec1().unwrap();
                            assert!(
                                (f64::from(sc[i]) - thr).abs() <= 1e-6 * thr.abs(),
                                "step {step}: {k}[{i}] flipped with score {} vs threshold {thr}",
                                sc[i]
                            );
                            flips += 1;
                        }
                    }
                }
            }
            (a, b) => panic!("step {step}: rank pattern {a:?} vs PEFT {b:?}"),
        }
    }
    // final E (masked in place)
    if flips == 0 {
        let last = steps - 1;
        for (n, v) in &params {
            if n.ends_with("lora_E") {
                assert_close(
                    &format!("final {n}"),
                    v.as_tensor(),
                    &traj[&format!("E.{last}.{n}")],
                    1e-5,
                    1e-4,
                );
            }
        }
    }
    // save: the masks go into the config, the kept rows into the file (as PEFT's save_pretrained)
    let mut out_cfg = cfg.clone();
    alloc.write_rank_pattern(&mut out_cfg);
    assert_eq!(out_cfg.rank_pattern, saved_cfg.rank_pattern);
    let out_cfg = PeftConfig::AdaLora(out_cfg);
    let sd = peft::io::adapter_state_dict(slots.iter(), "default", &out_cfg, &|_| false).unwrap();
    let theirs = load(&dir.join("adapter/adapter_model.safetensors"));
    assert_eq!(sd.len(), theirs.len());
    for (k, t) in &sd {
        let u = &theirs[k];
        assert_eq!(t.dims(), u.dims(), "{k}: saved shape");
        if flips == 0 {
            assert_close(&format!("saved {k}"), t, u, 1e-5, 1e-4);
        }
    }
    let back = registry::build_adapter(
        &out_cfg,
        "lin0",
        slots[0].base(),
        &sd.iter()
            .filter_map(|(k, t)| {
                k.strip_prefix("base_model.model.lin0.")
                    .map(|s| (s.to_string(), t.clone()))
            })
            .collect(),
    )
    .unwrap();
    assert!(
        back.describe().starts_with("r=2 init_r=4"),
        "{}",
        back.describe()
    );
}

#[test]
fn adalora_attach_refuses_a_config_without_total_step() {
    use peft::layer::Adapter as _;
    use peft::train::optim::{Sgd, SgdConfig};
    use peft::train::schedule::Schedule;
    use peft::train::trainer::Trainer;
    use peft::tuners::adalora::AdaLoraConfig;
    let base = linear(4, 3);
    let cfg = AdaLoraConfig {
        init_r: 2,
        total_step: Some(4),
        ..Default::default()
    };
    let opts = AdaLoraOptions::from_config(&cfg, "fc").unwrap();
    let ad = AdaLoraAdapter::new(&base, opts, &mut PeftRng::new(1)).unwrap();
    let params: Vec<(String, candle_core::Var)> = ad
        .vars()
        .into_iter()
        .map(|(k, v)| (format!("fc.{k}"), v))
        .collect();
    let opt = Sgd::from_params(params.clone(), SgdConfig::default()).unwrap();
    let mut t = Trainer::new(
        params.clone(),
        Box::new(opt),
        Schedule::Constant,
        Default::default(),
    )
    .unwrap();
    let no_total = AdaLoraConfig {
        total_step: None,
        ..cfg.clone()
    };
    let e = peft::tuners::adalora::attach_adalora(&mut t, &params, &no_total).unwrap_err();
    assert!(matches!(e, PeftError::InvalidConfig(_)), "{e}");
    peft::tuners::adalora::attach_adalora(&mut t, &params, &cfg).unwrap();
}
