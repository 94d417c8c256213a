//! Training machinery: optimizers, clipping and schedules against torch / transformers fixtures
//! (`fixtures/train/gen_train.py`), and the trainer's accumulation, state, checkpoints and metrics.

use crate::common::*;
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use indexmap::IndexMap;
use peft::config::InitLoraWeights;
use peft::train::checkpoint::{OPTIMIZER_TENSORS_FILE, read_trainer_state};
use peft::train::metrics::{MetricRecord, MetricsLog, Progress, read_metrics};
use peft::train::optim::{AdamW, AdamWConfig, Optimizer, ParamGroup, Sgd, SgdConfig};
use peft::train::schedule::Schedule;
use peft::train::trainer::{Trainer, TrainerSettings, clip_grad_norm};
use peft::tuners::lora::layer::{LoraAdapter, LoraOptions};
use peft::{AdapterSlot, BaseLayer, ForwardCtx, PeftRng};
use serde_json::Value;
use std::path::Path;
use std::sync::{Arc, Mutex};

const CPU: Device = Device::Cpu;

fn fixture() -> (Value, IndexMap<String, Tensor>) {
    let dir = fixtures_dir().join("train");
    let meta: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("train.json")).unwrap()).unwrap();
    (meta, load(&dir.join("train.safetensors")))
}

fn f(v: &Value, k: &str, default: f64) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(default)
}

/// The optimizer a fixture case describes, over fresh Vars holding the fixture's initial values.
fn case_optimizer(
    case: &Value,
    init: &IndexMap<String, Tensor>,
) -> (Box<dyn Optimizer>, IndexMap<String, Var>) {
    let vars: IndexMap<String, Var> = ["p0", "p1", "p2"]
        .iter()
        .map(|n| {
            let t = &init[&format!("init.{n}")];
            (n.to_string(), Var::from_tensor(&t.copy().unwrap()).unwrap())
        })
        .collect();
    let groups: Vec<ParamGroup> = case["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            let ps = g["params"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| {
                    let n = n.as_str().unwrap();
                    (n.to_string(), vars[n].clone())
                })
                .collect();
            let mut pg = ParamGroup::new(ps);
            if let Some(lr) = g.get("lr").and_then(Value::as_f64) {
                pg = pg.lr(lr);
            }
            if let Some(wd) = g.get("weight_decay").and_then(Value::as_f64) {
                pg = pg.weight_decay(wd);
            }
            pg
        })
        .collect();
    let d = &case["defaults"];
    let opt: Box<dyn Optimizer> = match case["optimizer"].as_str().unwrap() {
        "adamw" => {
            let def = AdamWConfig::default();
            let betas = d.get("betas").and_then(Value::as_array);
            let cfg = AdamWConfig {
                lr: f(d, "lr", def.lr),
                beta1: betas.map_or(def.beta1, |b| b[0].as_f64().unwrap()),
                beta2: betas.map_or(def.beta2, |b| b[1].as_f64().unwrap()),
                eps: f(d, "eps", def.eps),
                weight_decay: f(d, "weight_decay", def.weight_decay),
            };
            Box::new(AdamW::new(groups, cfg).unwrap())
        }
        "sgd" => {
            let def = SgdConfig::default();
            let cfg = SgdConfig {
                lr: f(d, "lr", def.lr),
                momentum: f(d, "momentum", def.momentum),
                dampening: f(d, "dampening", def.dampening),
                weight_decay: f(d, "weight_decay", def.weight_decay),
                nesterov: d.get("nesterov").and_then(Value::as_bool).unwrap_or(false),
            };
            Box::new(Sgd::new(groups, cfg).unwrap())
        }
        other => panic!("unknown optimizer {other}"),
    };
    (opt, vars)
}

fn schedule_of(v: &Value) -> Schedule {
    let u = |k: &str| v[k].as_u64().unwrap_or(0);
    match v["kind"].as_str().unwrap() {
        "constant" => Schedule::Constant,
        "constant_with_warmup" => Schedule::ConstantWithWarmup {
            warmup: u("warmup"),
        },
        "linear" => Schedule::Linear {
            warmup: u("warmup"),
            total: u("total"),
        },
        "cosine" => Schedule::Cosine {
            warmup: u("warmup"),
            total: u("total"),
            num_cycles: v["num_cycles"].as_f64().unwrap_or(0.5),
        },
        other => panic!("unknown schedule {other}"),
    }
}

#[test]
fn optimizers_follow_torch_trajectories() {
    let (meta, t) = fixture();
    let steps = meta["steps"].as_u64().unwrap();
    let cases = meta["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 10);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let (mut opt, vars) = case_optimizer(case, &t);
        let schedule = (!case["schedule"].is_null()).then(|| schedule_of(&case["schedule"]));
        for k in 0..steps {
            let skip: Vec<&str> = case["no_grad"]
                .get(k.to_string())
                .and_then(Value::as_array)
                .map(|a| a.iter().map(|s| s.as_str().unwrap()).collect())
                .unwrap_or_default();
            let mut grads = GradStore::default();
            for (n, v) in &vars {
                if !skip.contains(&n.as_str()) {
                    grads.insert(v.as_tensor(), t[&format!("grad.{k}.{n}")].clone());
                }
            }
            if let Some(s) = &schedule {
                opt.set_lr_factor(s.factor(k));
            }
            let want_lrs: Vec<f64> = case["group_lrs"][k as usize]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect();
            assert_eq!(
                opt.group_learning_rates(),
                want_lrs,
                "{name} step {k}: learning rates"
            );
            opt.step(&grads).unwrap();
            for (n, v) in &vars {
                assert_close(
                    &format!("{name} step {k} {n}"),
                    v.as_tensor(),
                    &t[&format!("{name}.{k}.{n}")],
                    1e-6,
                    0.0,
                );
            }
        }
    }
}

#[test]
fn clip_grad_norm_matches_torch() {
    let (meta, t) = fixture();
    for (i, c) in meta["clips"].as_array().unwrap().iter().enumerate() {
        let n = c["n"].as_u64().unwrap() as usize;
        let mut gs: Vec<Tensor> = (0..n)
            .map(|j| t[&format!("clip.{i}.in.{j}")].clone())
            .collect();
        let norm = clip_grad_norm(&mut gs, c["max_norm"].as_f64().unwrap()).unwrap();
        let want = c["total_norm"].as_f64().unwrap();
        assert!(
            (norm - want).abs() <= 1e-6 * want,
            "clip {i}: norm {norm} vs torch {want}"
        );
        for (j, g) in gs.iter().enumerate() {
            assert_close(
                &format!("clip {i} grad {j}"),
                g,
                &t[&format!("clip.{i}.out.{j}")],
                1e-6,
                1e-6,
            );
        }
    }
}

#[test]
fn schedules_match_transformers_lambda_lr() {
    let (meta, _) = fixture();
    let schedules = meta["schedules"].as_array().unwrap();
    assert!(schedules.len() >= 20);
    for s in schedules {
        let sched = schedule_of(s);
        let base = s["base_lr"].as_f64().unwrap();
        for (k, lr) in s["lrs"].as_array().unwrap().iter().enumerate() {
            let want = lr.as_f64().unwrap();
            let got = base * sched.factor(k as u64);
            assert_eq!(got, want, "{sched:?} base {base} step {k}");
        }
    }
}

// ---------------------------------------------------------------------------------------------------------
// A small synthetic model: two LoRA-adapted linears with dropout.

struct Toy {
    l0: AdapterSlot,
    l1: AdapterSlot,
}

fn lora_opts(dropout: f64) -> LoraOptions {
    LoraOptions {
        r: 2,
        alpha: 4.0,
        use_rslora: false,
        use_dora: false,
        lora_bias: false,
        dropout,
        init: InitLoraWeights::Bool(false),
    }
}

impl Toy {
    /// Base weights from `base_seed`, adapter weights from `adapter_seed`.
    fn new(base_seed: u64, adapter_seed: u64, dropout: f64) -> Self {
        let mut base = PeftRng::new(base_seed);
        let mut ad = PeftRng::new(adapter_seed);
        let mut slot = |name: &str, i: usize, o: usize| {
            let w = base
                .normal_tensor((o, i), 0.0, 0.4, DType::F32, &CPU)
                .unwrap();
            let b = base.normal_tensor(o, 0.0, 0.1, DType::F32, &CPU).unwrap();
            let mut s = AdapterSlot::new(name, BaseLayer::linear(w, Some(b)).unwrap());
            let a = LoraAdapter::new(s.base(), lora_opts(dropout), &mut ad).unwrap();
            s.add_adapter("default", Box::new(a)).unwrap();
            s
        };
        Toy {
            l0: slot("l0", 8, 6),
            l1: slot("l1", 6, 4),
        }
    }

    fn params(&self) -> Vec<(String, Var)> {
        let mut v = Vec::new();
        for s in [&self.l0, &self.l1] {
            for (k, var) in s.vars() {
                v.push((format!("{}/{k}", s.name()), var));
            }
        }
        v
    }

    /// Mean squared error of the model on `(x, y)`.
    fn loss(&self, x: &Tensor, y: &Tensor, ctx: &ForwardCtx) -> peft::Result<Tensor> {
        let h = self.l0.forward(x, ctx)?.relu()?;
        let out = self.l1.forward(&h, ctx)?;
        Ok((out - y)?.sqr()?.mean_all()?)
    }
}

fn draw_batch(rng: &mut PeftRng, rows: usize) -> (Tensor, Tensor) {
    (
        rng.normal_tensor((rows, 8), 0.0, 1.0, DType::F32, &CPU)
            .unwrap(),
        rng.normal_tensor((rows, 4), 0.0, 1.0, DType::F32, &CPU)
            .unwrap(),
    )
}

fn param_bits(params: &[(String, Var)]) -> Vec<(String, Vec<u32>)> {
    params
        .iter()
        .map(|(n, v)| {
            let bits = v
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect();
            (n.clone(), bits)
        })
        .collect()
}

const RESUME_STEPS: u64 = 8;

fn resume_trainer(model: &Toy, seed: u64) -> Trainer {
    let params = model.params();
    let (a, b): (Vec<_>, Vec<_>) = params
        .iter()
        .cloned()
        .partition(|(n, _)| n.contains("lora_A"));
    let groups = vec![ParamGroup::new(a), ParamGroup::new(b).lr_scale(2.0)];
    let opt = AdamW::new(
        groups,
        AdamWConfig {
            lr: 2e-2,
            ..Default::default()
        },
    )
    .unwrap();
    let settings = TrainerSettings {
        grad_accum_steps: 2,
        max_grad_norm: Some(0.5),
        max_steps: RESUME_STEPS,
        eval_every: 3,
        seed,
        log_every: 1,
    };
    Trainer::new(
        params,
        Box::new(opt),
        Schedule::cosine(2, RESUME_STEPS),
        settings,
    )
    .unwrap()
}

/// One step: data for each micro-batch drawn from the trainer's generator, then the step.
fn toy_step(trainer: &mut Trainer, model: &Toy) -> f64 {
    let batches: Vec<(Tensor, Tensor)> = (0..trainer.settings().grad_accum_steps)
        .map(|_| draw_batch(trainer.rng_mut(), 3))
        .collect();
    let r = trainer
        .train_step(&mut |i, ctx| model.loss(&batches[i].0, &batches[i].1, ctx))
        .unwrap();
    if trainer.should_evaluate() {
        let (x, y) = draw_batch(&mut PeftRng::new(1234), 5);
        trainer
            .evaluate(1, &mut |_, ctx| {
                let l = model.loss(&x, &y, ctx)?.to_scalar::<f32>()? as f64;
                Ok((l * 5.0, 5))
            })
            .unwrap();
    }
    r.loss
}

#[test]
fn resume_is_bit_identical() {
    let tmp = tempfile::tempdir().unwrap();
    // Straight run.
    let model = Toy::new(1, 2, 0.3);
    let mut straight = resume_trainer(&model, 7);
    let losses: Vec<f64> = (0..RESUME_STEPS)
        .map(|_| toy_step(&mut straight, &model))
        .collect();
    assert!(straight.is_finished());

    // Dropout matters: another seed gives another first loss.
    let other = Toy::new(1, 2, 0.3);
    let mut t_other = resume_trainer(&other, 8);
    assert_ne!(toy_step(&mut t_other, &other), losses[0]);

    // K steps, checkpoint, one step past it (logged, then discarded by the resume), then a fresh model with
    // other adapter weights and a fresh trainer resume from the checkpoint.
    let k = 3;
    let log_path = tmp.path().join("metrics.jsonl");
    let ckpt = tmp.path().join("ckpt");
    let model_a = Toy::new(1, 2, 0.3);
    let mut first = resume_trainer(&model_a, 7);
    first.set_metrics_log(MetricsLog::create(&log_path).unwrap());
    let mut resumed_losses: Vec<f64> = (0..k).map(|_| toy_step(&mut first, &model_a)).collect();
    first
        .save_checkpoint(&ckpt, &serde_json::json!({"batches_drawn": k * 2}))
        .unwrap();
    toy_step(&mut first, &model_a);
    assert_eq!(read_metrics(&log_path).unwrap().len(), 5); // steps 1-4 and the evaluation at step 3
    drop(first);

    let model_b = Toy::new(1, 99, 0.3);
    let mut second = resume_trainer(&model_b, 7);
    second.set_metrics_log(MetricsLog::append(&log_path).unwrap());
    let cursor = second.resume(&ckpt).unwrap();
    assert_eq!(cursor, serde_json::json!({"batches_drawn": 6}));
    assert_eq!(second.step(), k);
    assert_eq!(read_metrics(&log_path).unwrap().len(), 4); // 3 steps + the eval at step 3
    while !second.is_finished() {
        resumed_losses.push(toy_step(&mut second, &model_b));
    }
    let lb: Vec<u64> = losses.iter().map(|l| l.to_bits()).collect();
    let rb: Vec<u64> = resumed_losses.iter().map(|l| l.to_bits()).collect();
    assert_eq!(lb, rb, "losses {losses:?} vs resumed {resumed_losses:?}");
    assert_eq!(param_bits(&model.params()), param_bits(&model_b.params()));
    assert_eq!(straight.metrics().len(), second.metrics().len());
    for (a, b) in straight.metrics().iter().zip(second.metrics()) {
        match (a, b) {
            (MetricRecord::Train(a), MetricRecord::Train(b)) => {
                assert_eq!(
                    (a.step, a.loss.to_bits(), a.lr),
                    (b.step, b.loss.to_bits(), b.lr)
                );
                assert_eq!(a.grad_norm.to_bits(), b.grad_norm.to_bits());
            }
            (MetricRecord::Eval(a), MetricRecord::Eval(b)) => {
                assert_eq!(
                    (a.step, a.eval_loss.to_bits()),
                    (b.step, b.eval_loss.to_bits())
                );
            }
            _ => panic!("record kinds differ: {a:?} vs {b:?}"),
        }
    }
    assert_eq!(read_metrics(&log_path).unwrap(), second.metrics());

    // The checkpoint's state is readable on its own, and a trainer with another seed refuses it.
    let st = read_trainer_state(&ckpt).unwrap();
    assert_eq!(
        (st.step, st.settings.seed, st.optimizer.as_str()),
        (3, 7, "adamw")
    );
    let mut wrong = resume_trainer(&Toy::new(1, 2, 0.3), 8);
    assert!(
        wrong
            .resume(&ckpt)
            .unwrap_err()
            .to_string()
            .contains("seed")
    );
}

#[test]
fn checkpoint_directory_is_replaced_atomically() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Toy::new(1, 2, 0.0);
    let mut t = resume_trainer(&model, 7);
    let ckpt = tmp.path().join("run").join("checkpoint-last");
    t.save_checkpoint(&ckpt, &Value::Null).unwrap();
    toy_step(&mut t, &model);
    t.save_checkpoint(&ckpt, &Value::Null).unwrap();
    assert_eq!(read_trainer_state(&ckpt).unwrap().step, 1);
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path().join("run"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers, vec!["checkpoint-last".to_string()]);
    // A directory that is not a checkpoint is never replaced.
    let foreign = tmp.path().join("mine");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("notes.txt"), "keep me").unwrap();
    let e = t.save_checkpoint(&foreign, &Value::Null).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::Invalid(m) if m.ends_with("mine: exists and is not a trainer checkpoint; refusing to replace it")),
        "{e}"
    );
    assert!(foreign.join("notes.txt").exists());
}

#[test]
fn grad_accumulation_equals_one_big_batch() {
    let (x, y) = draw_batch(&mut PeftRng::new(5), 4);
    let run = |accum: usize| {
        let model = Toy::new(1, 2, 0.0);
        let params = model.params();
        let opt = Sgd::from_params(
            params.clone(),
            SgdConfig {
                lr: 0.2,
                momentum: 0.9,
                ..Default::default()
            },
        )
        .unwrap();
        let settings = TrainerSettings {
            grad_accum_steps: accum,
            max_grad_norm: None,
            max_steps: 3,
            ..Default::default()
        };
        let mut t = Trainer::new(params, Box::new(opt), Schedule::Constant, settings).unwrap();
        let rows = 4 / accum;
        let mut losses = Vec::new();
        let mut norms = Vec::new();
        while !t.is_finished() {
            let r = t
                .train_step(&mut |i, ctx| {
                    let xs = x.narrow(0, i * rows, rows)?;
                    let ys = y.narrow(0, i * rows, rows)?;
                    model.loss(&xs, &ys, ctx)
                })
                .unwrap();
            losses.push(r.loss);
            norms.push(r.grad_norm);
        }
        (losses, norms, model)
    };
    let (l2, n2, m2) = run(2);
    let (l1, n1, m1) = run(1);
    for (a, b) in l2.iter().zip(&l1).chain(n2.iter().zip(&n1)) {
        assert!((a - b).abs() < 1e-5 * b.abs().max(1.0), "{a} vs {b}");
    }
    for ((n, a), (_, b)) in m2.params().iter().zip(m1.params()) {
        assert_close(n, a.as_tensor(), b.as_tensor(), 1e-6, 1e-5);
    }
    assert!(l1[2] < l1[0], "the loss goes down: {l1:?}");
}

#[test]
fn only_given_params_get_optimizer_state() {
    let tmp = tempfile::tempdir().unwrap();
    let model = Toy::new(1, 2, 0.0);
    let frozen_before = param_bits(&model.l1.vars());
    // l0's adapter, plus a parameter the loss never touches.
    let unused = Var::new(&[1.0f32, 2.0], &CPU).unwrap();
    let mut params: Vec<(String, Var)> = model
        .l0
        .vars()
        .into_iter()
        .map(|(k, v)| (format!("l0/{k}"), v))
        .collect();
    params.push(("unused".into(), unused.clone()));
    let opt = AdamW::from_params(params.clone(), AdamWConfig::default()).unwrap();
    let mut t = Trainer::new(
        params,
        Box::new(opt),
        Schedule::Constant,
        Default::default(),
    )
    .unwrap();
    let (x, y) = draw_batch(&mut PeftRng::new(3), 4);
    for _ in 0..2 {
        t.train_step(&mut |_, ctx| model.loss(&x, &y, ctx)).unwrap();
    }
    let state = t.optimizer().state().unwrap();
    let mut keys: Vec<&str> = state.tensors.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "exp_avg.l0/default/lora_A.weight",
            "exp_avg.l0/default/lora_B.weight",
            "exp_avg_sq.l0/default/lora_A.weight",
            "exp_avg_sq.l0/default/lora_B.weight",
        ]
    );
    assert_eq!(state.meta["steps"]["l0/default/lora_A.weight"], 2);
    assert!(state.tensors.values().all(|t| t.dtype() == DType::F32));
    // The other layer's adapter got gradients in backward but is neither stepped nor given state.
    assert_eq!(param_bits(&model.l1.vars()), frozen_before);
    assert_eq!(unused.to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
    let ckpt = tmp.path().join("ckpt");
    t.save_checkpoint(&ckpt, &Value::Null).unwrap();
    let saved = load(&ckpt.join(OPTIMIZER_TENSORS_FILE));
    assert_eq!(saved.len(), 4);
    assert!(saved.keys().all(|k| k.contains("l0/")));
}

#[test]
fn clipping_reports_the_norm_before_clipping() {
    for (max_norm, coef) in [(1.0f64, 1.0 / (13.0 + 1e-6)), (100.0, 1.0)] {
        let w = Var::new(&[1.0f32, 2.0, 3.0], &CPU).unwrap();
        let c = Tensor::new(&[3.0f32, 4.0, 12.0], &CPU).unwrap();
        let params = vec![("w".to_string(), w.clone())];
        let opt = Sgd::from_params(
            params.clone(),
            SgdConfig {
                lr: 1.0,
                ..Default::default()
            },
        )
        .unwrap();
        let settings = TrainerSettings {
            max_grad_norm: Some(max_norm),
            ..Default::default()
        };
        let mut t = Trainer::new(params, Box::new(opt), Schedule::Constant, settings).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        t.add_step_hook(Box::new(move |ctx| {
            seen2.lock().unwrap().push(ctx.grads["w"].to_vec1::<f32>()?);
            Ok(())
        }));
        let r = t
            .train_step(&mut |_, _| Ok((w.as_tensor() * &c)?.sum_all()?))
            .unwrap();
        assert_eq!(r.grad_norm, 13.0);
        assert_eq!(r.clipped, max_norm < 13.0);
        let want: Vec<f32> = [3.0f64, 4.0, 12.0]
            .iter()
            .map(|g| (g * coef) as f32)
            .collect();
        let got = seen.lock().unwrap()[0].clone();
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6, "hook grads {got:?} vs {want:?}");
        }
        let p = w.to_vec1::<f32>().unwrap();
        for ((p, w0), g) in p.iter().zip([1.0f32, 2.0, 3.0]).zip(&want) {
            assert!((p - (w0 - g)).abs() < 1e-6, "{p} vs {}", w0 - g);
        }
    }
}

/// A trainer on the toy model with a metrics log at `log`, run for `steps` steps with an evaluation every
/// `eval_every` steps; `log_every` as given.
fn logged_run(log: &Path, steps: u64, eval_every: u64, log_every: u64) -> (Trainer, Vec<Progress>) {
    let model = Toy::new(1, 2, 0.1);
    let params = model.params();
    let opt = AdamW::from_params(params.clone(), AdamWConfig::default()).unwrap();
    let settings = TrainerSettings {
        max_steps: steps,
        eval_every,
        log_every,
        ..Default::default()
    };
    let mut t = Trainer::new(
        params,
        Box::new(opt),
        Schedule::Linear {
            warmup: 1,
            total: steps,
        },
        settings,
    )
    .unwrap();
    t.set_metrics_log(MetricsLog::create(log).unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    t.set_progress(Box::new(move |p: &Progress| {
        seen2.lock().unwrap().push(p.clone())
    }));
    let (ex, ey) = draw_batch(&mut PeftRng::new(11), 6);
    while !t.is_finished() {
        let (x, y) = draw_batch(t.rng_mut(), 4);
        t.train_step_with_tokens(&mut |_, ctx| Ok((model.loss(&x, &y, ctx)?, 4)))
            .unwrap();
        if t.should_evaluate() {
            t.evaluate(2, &mut |i, ctx| {
                let xs = ex.narrow(0, 3 * i, 3)?;
                let ys = ey.narrow(0, 3 * i, 3)?;
                Ok((
                    model.loss(&xs, &ys, ctx)?.to_scalar::<f32>()? as f64 * 3.0,
                    3,
                ))
            })
            .unwrap();
        }
    }
    let progress = seen.lock().unwrap().clone();
    (t, progress)
}

#[test]
fn metrics_jsonl_has_one_line_per_step() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("logs/metrics.jsonl");
    let (t, progress) = logged_run(&log, 6, 4, 1);
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let train: Vec<&Value> = lines.iter().filter(|v| v["kind"] == "train").collect();
    let eval: Vec<&Value> = lines.iter().filter(|v| v["kind"] == "eval").collect();
    assert_eq!(train.len(), 6);
    assert_eq!(
        train
            .iter()
            .map(|v| v["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
    // Evaluations at step 4 (eval_every) and at the last step.
    assert_eq!(
        eval.iter()
            .map(|v| v["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![4, 6]
    );
    for v in &train {
        for k in ["loss", "lr", "grad_norm", "tokens_per_s"] {
            assert!(v[k].is_number(), "{k} in {v}");
        }
        assert_eq!(v["tokens"], 4);
    }
    assert!(
        eval.iter()
            .all(|v| v["eval_loss"].is_number() && v["eval_tokens"] == 6)
    );
    // Linear schedule with one warmup step: lr 0 at the first step, then the base lr, then decaying.
    assert_eq!(train[0]["lr"], 0.0);
    assert_eq!(train[1]["lr"], 1e-3);
    assert_eq!(read_metrics(&log).unwrap(), t.metrics());
    // Progress: after every step and every evaluation, with an ETA that reaches zero.
    assert_eq!(progress.len(), 8);
    let last = progress.last().unwrap();
    assert_eq!((last.step, last.max_steps), (6, 6));
    assert_eq!(last.eta, Some(std::time::Duration::ZERO));
    assert!(last.eval_loss.is_some() && last.tokens_per_s.is_some());
    assert!(progress[0].eta.unwrap() > std::time::Duration::ZERO);

    // log_every = 3: one record per window, its loss the window's mean.
    let log3 = tmp.path().join("metrics3.jsonl");
    let (t3, _) = logged_run(&log3, 6, 0, 3);
    let recs = read_metrics(&log3).unwrap();
    assert_eq!(
        recs.iter().map(MetricRecord::step).collect::<Vec<_>>(),
        vec![3, 6]
    );
    let per_step: Vec<f64> = {
        let log1 = tmp.path().join("metrics1.jsonl");
        let (t1, _) = logged_run(&log1, 6, 0, 1);
        t1.metrics()
            .iter()
            .map(|r| match r {
                MetricRecord::Train(tr) => tr.loss,
                _ => unreachable!(),
            })
            .collect()
    };
    match &t3.metrics()[0] {
        MetricRecord::Train(tr) => {
            let mean = per_step[..3].iter().sum::<f64>() / 3.0;
            assert!((tr.loss - mean).abs() < 1e-12, "{} vs {mean}", tr.loss);
            assert_eq!(tr.tokens, Some(12));
        }
        other => panic!("{other:?}"),
    }
}

/// A minimal XML well-formedness check: balanced tags, quoted attributes, escaped text.
fn check_xml(s: &str) -> Result<Vec<String>, String> {
    let mut stack: Vec<String> = Vec::new();
    let mut seen = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    let mut roots = 0;
    let check_text = |t: &str| -> Result<(), String> {
        let mut rest = t;
        while let Some(p) = rest.find('&') {
            let end = rest[p..].find(';').ok_or(format!("bare & in {t:?}"))?;
            let ent = &rest[p + 1..p + end];
            if !["amp", "lt", "gt", "quot", "apos"].contains(&ent) {
                return Err(format!("unknown entity &{ent};"));
            }
            rest = &rest[p + end + 1..];
        }
        if t.contains('>') {
            return Err(format!("bare > in text {t:?}"));
        }
        Ok(())
    };
    while i < b.len() {
        if b[i] != b'<' {
            let next = s[i..].find('<').map_or(s.len(), |p| i + p);
            let text = &s[i..next];
            if stack.is_empty() && !text.trim().is_empty() {
                return Err(format!("text outside the root: {text:?}"));
            }
            check_text(text)?;
            i = next;
            continue;
        }
        let end = s[i..].find('>').ok_or("unclosed tag")? + i;
        let tag = &s[i + 1..end];
        i = end + 1;
        if let Some(name) = tag.strip_prefix('/') {
            let open = stack
                .pop()
                .ok_or(format!("</{name}> without an open tag"))?;
            if open != name.trim() {
                return Err(format!("</{name}> closes <{open}>"));
            }
            continue;
        }
        let self_closing = tag.ends_with('/');
        let body = tag.trim_end_matches('/');
        let name_end = body.find(char::is_whitespace).unwrap_or(body.len());
        let name = &body[..name_end];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ':')
        {
            return Err(format!("bad tag name in <{tag}>"));
        }
        // Attributes: name="value" pairs.
        let mut rest = body[name_end..].trim();
        while !rest.is_empty() {
            let eq = rest
                .find('=')
                .ok_or(format!("attribute without value in <{tag}>"))?;
            let an = rest[..eq].trim();
            if an.is_empty() || an.contains(char::is_whitespace) {
                return Err(format!("bad attribute name {an:?}"));
            }
            let after = &rest[eq + 1..];
            if !after.starts_with('"') {
                return Err(format!("unquoted attribute {an} in <{tag}>"));
            }
            let close = after[1..].find('"').ok_or("unterminated attribute")? + 1;
            let value = &after[1..close];
            if value.contains('<') {
                return Err(format!("< in attribute {an}"));
            }
            check_text(value)?;
            rest = after[close + 1..].trim_start();
        }
        if stack.is_empty() {
            roots += 1;
        }
        seen.push(name.to_string());
        if !self_closing {
            stack.push(name.to_string());
        }
    }
    if !stack.is_empty() {
        return Err(format!("unclosed elements {stack:?}"));
    }
    if roots != 1 {
        return Err(format!("{roots} root elements"));
    }
    Ok(seen)
}

#[test]
fn loss_curve_svg_is_well_formed() {
    let tmp = tempfile::tempdir().unwrap();
    let (t, _) = logged_run(&tmp.path().join("m.jsonl"), 6, 2, 1);
    let path = tmp.path().join("loss.svg");
    t.write_loss_curve(&path, "toy <LoRA> & friends").unwrap();
    let svg = std::fs::read_to_string(&path).unwrap();
    let elements = check_xml(&svg).unwrap_or_else(|e| panic!("{e}\n{svg}"));
    assert_eq!(elements[0], "svg");
    assert!(svg.contains(r#"xmlns="http://www.w3.org/2000/svg""#));
    assert_eq!(elements.iter().filter(|e| *e == "polyline").count(), 2);
    // Axis labels and several tick labels (plotters writes a text element's content on its own line).
    let texts: Vec<&str> = svg
        .split("<text")
        .skip(1)
        .filter_map(|t| t.split_once('>'))
        .map(|(_, rest)| rest.split("</text>").next().unwrap_or_default().trim())
        .collect();
    assert!(texts.contains(&"step") && texts.contains(&"loss"));
    assert!(elements.iter().filter(|e| *e == "text").count() >= 8);
    let train_points = svg
        .split("<polyline")
        .nth(1)
        .and_then(|p| p.split("points=\"").nth(1))
        .map(|p| p.split('"').next().unwrap().split_whitespace().count())
        .unwrap();
    assert_eq!(train_points, 6);
    assert!(svg.contains("toy &lt;LoRA&gt; &amp; friends"));
    assert_eq!(check_xml("<a><b></a></b>").unwrap_err(), "</a> closes <b>");
}
