//! LoRA+ and LoRA-FA against PEFT 0.21.2's `peft.optimizers` (`fixtures/train/gen_lora_optim.py`): a real
//! PeftModel's parameters sorted into LoRA+'s groups and stepped by torch's AdamW, and PEFT's
//! `LoraFAOptimizer` (frozen `A`, projected `B` gradient in bf16 autocast, Hugging Face AdamW), each with fixed
//! per-step gradients under a warm-up schedule; every trained parameter is compared after every step.

use crate::common::*;
use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use indexmap::IndexMap;
use peft::PeftConfig;
use peft::train::lorafa::{LoraFa, LoraFaConfig, LoraFaProjection, split_lora_params};
use peft::train::loraplus::{LoraPlusConfig, loraplus_groups};
use peft::train::optim::{AdamW, AdamWConfig, Optimizer};
use peft::train::schedule::Schedule;
use peft::tuners::lora::layer::LoraOptions;
use serde_json::Value;

fn fixture() -> (Vec<Value>, IndexMap<String, Tensor>) {
    let dir = fixtures_dir().join("train");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("lora_optim.json")).unwrap())
            .unwrap();
    (
        meta["cases"].as_array().unwrap().clone(),
        load(&dir.join("lora_optim.safetensors")),
    )
}

fn case<'a>(cases: &'a [Value], name: &str) -> &'a Value {
    cases.iter().find(|c| c["name"] == name).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

fn sorted_names(params: &[(String, Var)]) -> Vec<String> {
    sorted(params.iter().map(|(n, _)| n.clone()).collect())
}

/// Fresh Vars with the case's initial values of every LoRA / modules_to_save parameter, in PEFT's order.
fn init_vars(c: &Value, t: &IndexMap<String, Tensor>) -> Vec<(String, Var)> {
    let prefix = format!("{}.init.", c["name"].as_str().unwrap());
    t.iter()
        .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|n| (n, v)))
        .map(|(n, v)| (n.to_string(), Var::from_tensor(&v.copy().unwrap()).unwrap()))
        .collect()
}

/// Runs the case's steps: fixed gradients, the schedule's factor, then every trained parameter compared.
fn replay(
    c: &Value,
    t: &IndexMap<String, Tensor>,
    opt: &mut dyn Optimizer,
    vars: &[(String, Var)],
    atol: f64,
) {
    let name = c["name"].as_str().unwrap();
    let s = &c["schedule"];
    let schedule = Schedule::Linear {
        warmup: s["warmup"].as_u64().unwrap(),
        total: s["total"].as_u64().unwrap(),
    };
    let trained = strings(&c["trainable"]);
    for k in 0..c["steps"].as_u64().unwrap() {
        let mut grads = GradStore::default();
        for n in &trained {
            let v = &vars.iter().find(|(vn, _)| vn == n).unwrap().1;
            grads.insert(v.as_tensor(), t[&format!("{name}.grad.{k}.{n}")].clone());
        }
        opt.set_lr_factor(schedule.factor(k));
        let want: Vec<f64> = c["lrs"][k as usize]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let got = opt.group_learning_rates();
        assert_eq!(got.len(), want.len(), "{name} step {k}");
        for (g, w) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-15 + 1e-12 * w.abs(),
                "{name} step {k}: lrs {got:?} vs {want:?}"
            );
        }
        opt.step(&grads).unwrap();
        for n in &trained {
            let v = &vars.iter().find(|(vn, _)| vn == n).unwrap().1;
            assert_close(
                &format!("{name} step {k} {n}"),
                v.as_tensor(),
                &t[&format!("{name}.{k}.{n}")],
                atol,
                1e-5,
            );
        }
    }
}

/// LoRA+'s four groups hold exactly PEFT's parameters with PEFT's learning rates and weight decays, and torch's
/// AdamW over them follows PEFT's trajectory (`B` at 4× the rate, the embedding LoRA at its own, the head's bias
/// without decay).
#[test]
fn loraplus_groups_and_trajectory_are_peft_s() {
    let (cases, t) = fixture();
    let c = case(&cases, "loraplus");
    let vars = init_vars(c, &t);
    let config = LoraPlusConfig {
        lr_ratio: c["ratio"].as_f64().unwrap(),
        lr_embedding: c["lr_embedding"].as_f64().unwrap(),
        weight_decay: c["weight_decay"].as_f64().unwrap(),
    };
    let groups = loraplus_groups(vars.clone(), &config).unwrap();
    let want = c["groups"].as_array().unwrap();
    assert_eq!(groups.len(), want.len());
    for (g, w) in groups.iter().zip(want) {
        assert_eq!(sorted_names(&g.params), sorted(strings(&w["params"])));
        assert_eq!(g.weight_decay.unwrap(), w["weight_decay"].as_f64().unwrap());
    }
    let lr = c["lr"].as_f64().unwrap();
    let mut opt = AdamW::new(
        groups,
        AdamWConfig {
            lr,
            ..Default::default()
        },
    )
    .unwrap();
    let initial: Vec<f64> = {
        opt.set_lr_factor(1.0);
        opt.group_learning_rates()
    };
    let want_initial: Vec<f64> = want.iter().map(|w| w["lr"].as_f64().unwrap()).collect();
    for (g, w) in initial.iter().zip(&want_initial) {
        assert!((g - w).abs() < 1e-15, "{initial:?} vs {want_initial:?}");
    }
    replay(c, &t, &mut opt, &vars, 1e-6);
}

/// LoRA-FA: `A` frozen, each `B`'s gradient projected with its own layer's scaling (rank / alpha patterns, plain
/// and rsLoRA), the head trained by the plain branch; PEFT's trajectory after every step, and `A` unchanged.
#[test]
fn lorafa_trajectory_is_peft_s() {
    let (cases, t) = fixture();
    for name in ["lorafa", "lorafa_rslora"] {
        let c = case(&cases, name);
        let rslora = name.ends_with("rslora");
        let config = PeftConfig::from_json_str(&format!(
            r#"{{"peft_type": "LORA", "r": 3, "lora_alpha": 6, "use_rslora": {rslora},
                "rank_pattern": {{"lin1": 2}}, "alpha_pattern": {{"lin1": 5}},
                "target_modules": ["lin0", "lin1"], "modules_to_save": ["head"]}}"#
        ))
        .unwrap();
        let PeftConfig::Lora(lora) = &config else {
            unreachable!()
        };
        let vars = init_vars(c, &t);
        let a_before: Vec<(String, Tensor)> = vars
            .iter()
            .filter(|(n, _)| n.ends_with("lora_A.weight"))
            .map(|(n, v)| (n.clone(), v.as_tensor().copy().unwrap()))
            .collect();
        let (trained, projections) = split_lora_params(vars.clone(), |m| {
            Some(LoraOptions::from_config(lora, m).scaling())
        })
        .unwrap();
        assert_eq!(
            sorted_names(&trained),
            sorted(strings(&c["trainable"])),
            "{name}"
        );
        for (module, s) in c["scalings"].as_object().unwrap() {
            let got = projections[&format!("{module}.lora_B.weight")].scaling;
            assert!(
                (got - s.as_f64().unwrap()).abs() < 1e-12,
                "{name} {module}: {got} vs {s}"
            );
        }
        let mut opt = LoraFa::new(
            trained,
            projections,
            LoraFaConfig {
                lr: c["lr"].as_f64().unwrap(),
                weight_decay: c["weight_decay"].as_f64().unwrap(),
                ..Default::default()
            },
        )
        .unwrap();
        replay(c, &t, &mut opt, &vars, 1e-6);
        for (n, a) in &a_before {
            let v = &vars.iter().find(|(vn, _)| vn == n).unwrap().1;
            assert_eq!(max_diff(v.as_tensor(), a), 0.0, "{name}: {n} moved");
        }
    }
}

/// Without the bf16 rounding PEFT's autocast applies, the projected gradient differs from PEFT's (so the
/// emulation is what the trajectory test checks), and the projection is `g·(A·Aᵀ)⁻¹ / s²` up to that rounding.
#[test]
fn lorafa_projection_is_bf16_rounded() {
    let dev = candle_core::Device::Cpu;
    let a = Tensor::new(&[[0.7f32, -0.3, 1.1, 0.2], [0.1, 0.9, -0.4, 0.5]], &dev).unwrap();
    let g = Tensor::new(&[[0.123_456_7f32, -1.234_567], [2.5, 0.333_333_3]], &dev).unwrap();
    let p = LoraFaProjection {
        a: a.clone(),
        scaling: 1.5,
    };
    let got = LoraFa::project(&g, &p).unwrap();
    let aat = a.matmul(&a.t().unwrap()).unwrap();
    let v: Vec<Vec<f32>> = aat.to_vec2().unwrap();
    let det = v[0][0] * v[1][1] - v[0][1] * v[1][0];
    let inv = Tensor::new(
        &[
            [v[1][1] / det, -v[0][1] / det],
            [-v[1][0] / det, v[0][0] / det],
        ],
        &dev,
    )
    .unwrap();
    let exact = g.matmul(&inv).unwrap().affine(1.0 / 2.25, 0.0).unwrap();
    // Equal to bf16 precision (2⁻⁸ relative, twice rounded), but not to f32's.
    assert_close("projection", &got, &exact, 0.0, 1.2e-2);
    assert!(max_diff(&got, &exact) > 1e-6);
    let rounded = got
        .to_dtype(candle_core::DType::BF16)
        .unwrap()
        .to_dtype(candle_core::DType::F32)
        .unwrap();
    assert_eq!(max_diff(&got, &rounded), 0.0, "the result is a bf16 value");
}

/// Parameters PEFT's pairing would get wrong are refused by name.
#[test]
fn lorafa_refuses_what_peft_pairs_wrongly() {
    let dev = candle_core::Device::Cpu;
    let z = |s: &[usize]| Var::zeros(s, candle_core::DType::F32, &dev).unwrap();
    for (extra, what) in [
        ("q.lora_magnitude_vector", "DoRA"),
        ("q.lora_B.bias", "lora_bias"),
        ("emb.lora_embedding_A", "Embedding"),
    ] {
        let params = vec![
            ("q.lora_A.weight".to_string(), z(&[2, 4])),
            ("q.lora_B.weight".to_string(), z(&[4, 2])),
            (extra.to_string(), z(&[4])),
        ];
        let e = split_lora_params(params, |_| Some(1.0))
            .unwrap_err()
            .to_string();
        assert!(e.contains(extra) && e.contains(what), "{e}");
    }
    let e = split_lora_params(vec![("head.weight".into(), z(&[3, 4]))], |_| Some(1.0))
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs a LoRA adapter"), "{e}");
}
