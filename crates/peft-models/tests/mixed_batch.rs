//! Mixed batches (PEFT's `adapter_names`) for every layer method, in inference and in training: each row gives
//! what it gives alone with its adapter active, and each adapter gets the gradient of its own rows.

use candle_core::{DType, Device, IndexOp, Tensor};
use peft::config::PeftConfig;
use peft::host::AdapterHost;
use peft::peft_model::PeftModel;
use peft::{ForwardCtx, PeftRng};
use peft_models::llama::{ForwardInput, LlamaConfig, LlamaForCausalLM};
use peft_test_support::max_diff;
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn tiny_llama() -> LlamaForCausalLM {
    let dir = root().join("models/cases/llama_gqa");
    let config = LlamaConfig::from_file(dir.join("config.json")).unwrap();
    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    LlamaForCausalLM::from_tensors(config, tensors, &Device::Cpu).unwrap()
}

/// The configs: PEFT's own `adapter_config.json` of the method fixtures where one exists for the tiny Llama,
/// inline ones (PEFT's keys) for the rest.
fn method_configs() -> Vec<(&'static str, PeftConfig)> {
    let file = |p: &str| {
        PeftConfig::from_json_str(&std::fs::read_to_string(root().join(p)).unwrap())
            .unwrap_or_else(|e| panic!("{p}: {e}"))
    };
    let inline = |j: &str| PeftConfig::from_json_str(j).unwrap_or_else(|e| panic!("{j}: {e}"));
    vec![
        (
            "lora",
            inline(
                r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj","v_proj","down_proj"],
                    "modules_to_save":["lm_head"]}"#,
            ),
        ),
        (
            "dora",
            inline(
                r#"{"peft_type":"LORA","r":2,"lora_alpha":4,"use_dora":true,
                    "target_modules":["k_proj","o_proj","up_proj"]}"#,
            ),
        ),
        (
            "rslora_embed",
            inline(
                r#"{"peft_type":"LORA","r":4,"lora_alpha":4,"use_rslora":true,
                    "target_modules":["embed_tokens","q_proj"]}"#,
            ),
        ),
        (
            "ia3",
            file("ia3/cases/ia3_llama/adapter/adapter_config.json"),
        ),
        (
            "loha",
            file("loha/cases/loha_llama/adapter/adapter_config.json"),
        ),
        (
            "lokr",
            file("lokr/cases/lokr_llama/adapter/adapter_config.json"),
        ),
        (
            "oft",
            file("oft/cases/oft_llama/adapter/adapter_config.json"),
        ),
        (
            "boft",
            file("boft/cases/boft_llama/adapter/adapter_config.json"),
        ),
        (
            "vera",
            inline(r#"{"peft_type":"VERA","r":4,"target_modules":["q_proj","v_proj"]}"#),
        ),
        (
            "adalora",
            inline(
                r#"{"peft_type":"ADALORA","init_r":4,"target_r":2,"total_step":10,
                    "target_modules":["q_proj","gate_proj"]}"#,
            ),
        ),
    ]
}

/// The tiny Llama with one adapter of every method, every parameter moved off its (mostly identity) init.
fn model_with_every_method() -> (PeftModel<LlamaForCausalLM>, Vec<&'static str>) {
    let mut pm = PeftModel::new(tiny_llama(), 3);
    let mut names = Vec::new();
    for (name, config) in method_configs() {
        pm.add_adapter(name, config)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        names.push(name);
    }
    pm.set_adapter(&names).unwrap();
    let mut rng = PeftRng::new(17);
    for (key, var) in pm.trainable_vars() {
        let t = var.as_tensor();
        let noise = rng
            .normal_tensor(t.shape(), 0.0, 0.2, DType::F32, &Device::Cpu)
            .unwrap();
        var.set(&(t + noise).unwrap())
            .unwrap_or_else(|e| panic!("{key}: {e}"));
    }
    (pm, names)
}

fn ids(rows: usize, len: usize, seed: u64) -> Tensor {
    let mut rng = PeftRng::new(seed);
    let v: Vec<u32> = (0..rows * len).map(|_| 3 + rng.below(90) as u32).collect();
    Tensor::from_vec(v, (rows, len), &Device::Cpu).unwrap()
}

/// The row order: every adapter, the base, and the LoRA adapter twice apart (so the model must regroup).
fn row_names(names: &[&'static str]) -> Vec<&'static str> {
    let mut rows = vec!["lora", "__base__"];
    rows.extend(names.iter().skip(1).copied());
    rows.extend(["lora", "__base__", "dora"]);
    rows
}

/// Each row of a mixed batch over every method (LoRA, DoRA, rsLoRA on the embedding, `modules_to_save`, IA3
/// with feed-forward scaling, LoHa, LoKr, OFT, BOFT, VeRA, AdaLoRA and the base), in an order that needs
/// regrouping, equals that row run alone with its adapter as the only active one; and the adapters really
/// change their rows.
#[test]
fn mixed_batch_of_every_method_equals_each_row_alone() {
    let (mut pm, names) = model_with_every_method();
    let rows = row_names(&names);
    let ids = ids(rows.len(), 6, 5);
    let mixed = pm
        .model()
        .forward(
            ForwardInput::ids(&ids),
            &ForwardCtx::inference().with_adapter_names(&rows),
        )
        .unwrap();
    let base = pm
        .with_adapters_disabled(|pm| {
            pm.model()
                .forward(ForwardInput::ids(&ids), &ForwardCtx::inference())
                .unwrap()
        })
        .unwrap();
    for (i, name) in rows.iter().enumerate() {
        let row_ids = ids.i(i..i + 1).unwrap();
        let alone = if *name == "__base__" {
            base.i(i..i + 1).unwrap()
        } else {
            pm.set_adapter(&[name]).unwrap();
            pm.model()
                .forward(ForwardInput::ids(&row_ids), &ForwardCtx::inference())
                .unwrap()
        };
        let got = mixed.i(i..i + 1).unwrap();
        let d = max_diff(&got, &alone);
        assert!(d <= 1e-5, "row {i} ({name}): mixed vs alone {d}");
        if *name != "__base__" {
            let effect = max_diff(&alone, &base.i(i..i + 1).unwrap());
            assert!(effect > 1e-3, "{name} barely changes its row ({effect})");
        }
    }
}

/// Training on a mixed batch: the gradient each adapter's parameters get from a loss that sums over rows is
/// the gradient of that adapter's rows run alone (no dropout, so the two forwards are the same maths).
#[test]
fn mixed_batch_training_gives_each_adapter_the_gradient_of_its_rows() {
    let (mut pm, names) = model_with_every_method();
    let rows = row_names(&names);
    let ids = ids(rows.len(), 5, 9);
    let vocab = pm.model().config().vocab_size;
    let weights = PeftRng::new(4)
        .normal_tensor((rows.len(), 5, vocab), 0.0, 1.0, DType::F32, &Device::Cpu)
        .unwrap();
    let loss_of = |pm: &PeftModel<LlamaForCausalLM>, ids: &Tensor, w: &Tensor, ctx: &ForwardCtx| {
        let logits = pm.model().forward(ForwardInput::ids(ids), ctx).unwrap();
        (logits * w).unwrap().sum_all().unwrap()
    };
    let ctx = ForwardCtx::train(1, 0).with_adapter_names(&rows);
    let grads = loss_of(&pm, &ids, &weights, &ctx).backward().unwrap();
    for name in &names {
        let mine: Vec<u32> = (0..rows.len() as u32)
            .filter(|&i| rows[i as usize] == *name)
            .collect();
        let sel = Tensor::from_slice(&mine, mine.len(), &Device::Cpu).unwrap();
        pm.set_adapter(&[name]).unwrap();
        let alone = loss_of(
            &pm,
            &ids.index_select(&sel, 0).unwrap(),
            &weights.index_select(&sel, 0).unwrap(),
            &ForwardCtx::train(1, 0),
        )
        .backward()
        .unwrap();
        let mut checked = 0;
        for slot in pm.model().slots() {
            let Some(adapter) = slot.adapter(name) else {
                continue;
            };
            for (key, var) in adapter.vars() {
                let what = format!("{name} {}.{key}", slot.name());
                let want = alone
                    .get(&var)
                    .unwrap_or_else(|| panic!("{what}: no gradient alone"));
                let got = grads
                    .get(&var)
                    .unwrap_or_else(|| panic!("{what}: no gradient mixed"));
                let scale = want
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap() as f64;
                let d = max_diff(got, want);
                assert!(d <= 1e-5 + 1e-4 * scale, "{what}: {d} (scale {scale})");
                checked += 1;
            }
        }
        assert!(checked > 0, "{name}: no parameters checked");
    }
}

/// Generation with a mixed batch (`generate_batch_ids`: prompts of different lengths, each with its own adapter
/// or the base, decoded together with one KV cache per request) gives every request the greedy tokens it gets
/// alone with its adapter active, decoded step by step from its own cache.
#[test]
fn mixed_batch_generation_equals_each_request_alone() {
    use peft_models::generate::{BatchRequest, Sampling, generate_batch_ids};
    use peft_models::llama::KvCache;
    let case = root().join("lora/cases/llama_two_adapters");
    let config = LlamaConfig::from_file(case.join("base_hf/config.json")).unwrap();
    let tensors =
        candle_core::safetensors::load(case.join("base_hf/model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    let base = LlamaForCausalLM::from_tensors(config, tensors, &Device::Cpu).unwrap();
    let mut pm =
        PeftModel::from_pretrained(base, case.join("adapter"), "default", &Device::Cpu).unwrap();
    pm.load_adapter(case.join("adapter/other"), "other", &Device::Cpu)
        .unwrap();
    let prompts: [(&[u32], &str); 4] = [
        (&[5, 9, 13], "other"),
        (&[7], "default"),
        (&[11, 3, 8, 20, 4], "__base__"),
        (&[6, 6], "other"),
    ];
    let requests: Vec<BatchRequest> = prompts
        .iter()
        .map(|(ids, adapter)| BatchRequest { ids, adapter })
        .collect();
    let got = generate_batch_ids(pm.model(), &requests, &Sampling::greedy(6), None).unwrap();
    let greedy_alone = |pm: &PeftModel<LlamaForCausalLM>, ids: &[u32]| {
        let mut cache = KvCache::new();
        let mut input = Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut toks = Vec::new();
        for _ in 0..6 {
            let logits = pm
                .model()
                .forward(
                    ForwardInput::ids(&input).with_cache(&mut cache),
                    &ForwardCtx::inference(),
                )
                .unwrap();
            let last = logits.i((0, logits.dim(1).unwrap() - 1)).unwrap();
            let t = last.argmax(0).unwrap().to_scalar::<u32>().unwrap();
            toks.push(t);
            input = Tensor::new(&[t], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
        }
        toks
    };
    let mut distinct = std::collections::HashSet::new();
    for (i, (ids, adapter)) in prompts.iter().enumerate() {
        let want = if *adapter == "__base__" {
            pm.with_adapters_disabled(|pm| greedy_alone(pm, ids))
                .unwrap()
        } else {
            pm.set_adapter(&[adapter]).unwrap();
            greedy_alone(&pm, ids)
        };
        assert_eq!(got[i], want, "request {i} ({adapter})");
        distinct.insert(want);
    }
    assert!(
        distinct.len() >= 3,
        "the adapters barely change the tokens: {distinct:?}"
    );
}
