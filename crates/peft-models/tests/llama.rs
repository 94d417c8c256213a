//! The Llama family against transformers 5.24 (fixtures/models, written by gen_models.py).

use candle_core::{D, DType, Device, IndexOp, Tensor};
use indexmap::IndexMap;
use peft::host::AdapterHost;
use peft::tuners::lora::config::InitLoraWeights;
use peft::tuners::lora::layer::{LoraAdapter, LoraOptions};
use peft::{ForwardCtx, PeftError, PeftRng};
use peft_models::llama::{
    ForwardInput, KvCache, LlamaConfig, LlamaFamily, LlamaForCausalLM, PrefixKv, RopeScaling,
};
use peft_test_support::max_diff;
use std::path::PathBuf;

const CASES: [&str; 6] = [
    "llama",
    "llama_gqa",
    "llama3_rope",
    "mistral",
    "qwen2",
    "smollm2_tied",
];

fn case_dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models/cases")
        .join(case)
}

fn load_st(path: PathBuf) -> IndexMap<String, Tensor> {
    let mut m: Vec<(String, Tensor)> = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect();
    m.sort_by(|a, b| a.0.cmp(&b.0));
    m.into_iter().collect()
}

fn load_model(case: &str) -> LlamaForCausalLM {
    let dir = case_dir(case);
    let config = LlamaConfig::from_file(dir.join("config.json")).unwrap();
    LlamaForCausalLM::from_tensors(config, load_st(dir.join("model.safetensors")), &Device::Cpu)
        .unwrap()
}

fn io(case: &str) -> IndexMap<String, Tensor> {
    load_st(case_dir(case).join("io.safetensors"))
}

fn u32s(t: &Tensor) -> Tensor {
    t.to_dtype(DType::U32).unwrap()
}

/// max |a − b| over positions where `keep[b][l] != 0` (all when `keep` is None), asserting
/// |a − b| ≤ atol + rtol·|b| everywhere compared.
fn assert_close_rows(
    what: &str,
    got: &Tensor,
    want: &Tensor,
    keep: Option<&Tensor>,
    tol: f32,
) -> f32 {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    let (b, l, v) = got.dims3().unwrap();
    let g = got.to_dtype(DType::F32).unwrap().to_vec3::<f32>().unwrap();
    let w = want.to_dtype(DType::F32).unwrap().to_vec3::<f32>().unwrap();
    let k = keep.map(|m| m.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap());
    let mut max = 0f32;
    for bi in 0..b {
        for li in 0..l {
            if k.as_ref().is_some_and(|k| k[bi][li] == 0.0) {
                continue;
            }
            for vi in 0..v {
                let (x, y) = (g[bi][li][vi], w[bi][li][vi]);
                let d = (x - y).abs();
                assert!(
                    d <= tol + tol * y.abs(),
                    "{what}: [{bi},{li},{vi}] got {x} want {y} (|diff| {d})"
                );
                max = max.max(d);
            }
        }
    }
    max
}

#[test]
fn llama_logits_match_transformers() {
    let ctx = ForwardCtx::eval();
    for case in CASES {
        let model = load_model(case);
        let io = io(case);
        for variant in ["nomask", "right", "left"] {
            let ids = u32s(&io[&format!("{variant}.input_ids")]);
            let want = &io[&format!("{variant}.logits")];
            let mask = io.get(&format!("{variant}.attention_mask"));
            let pos = io.get(&format!("{variant}.position_ids"));
            let mut input = ForwardInput::ids(&ids);
            input.attention_mask = mask;
            input.position_ids = pos;
            let got = model.forward(input, &ctx).unwrap();
            assert_eq!(got.dtype(), DType::F32);
            // Fully masked rows (left padding) must not produce NaN.
            let finite = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(
                finite.iter().all(|x| x.is_finite()),
                "{case}/{variant}: non-finite logits"
            );
            let d = assert_close_rows(&format!("{case}/{variant}"), &got, want, mask, 1e-4);
            eprintln!("{case}/{variant}: max |diff| {d:.2e}");
            if variant == "right" {
                // Right padding: the default positions 0..L equal cumsum(mask) − 1 on every kept token.
                let got = model
                    .forward(
                        ForwardInput::ids(&ids).with_attention_mask(mask.unwrap()),
                        &ctx,
                    )
                    .unwrap();
                assert_close_rows(
                    &format!("{case}/right, default positions"),
                    &got,
                    want,
                    mask,
                    1e-4,
                );
            }
        }
    }
}

#[test]
fn rope_inv_freq_matches_transformers() {
    for case in CASES {
        let config = LlamaConfig::from_file(case_dir(case).join("config.json")).unwrap();
        let io = io(case);
        let (inv, scaling) = config.rope_inv_freq();
        let want = io["rope.inv_freq"].to_vec1::<f32>().unwrap();
        assert_eq!(inv.len(), want.len(), "{case}");
        for (i, (a, b)) in inv.iter().zip(&want).enumerate() {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs(),
                "{case}: inv_freq[{i}] {a} vs {b}"
            );
        }
        assert_eq!(
            scaling,
            io["rope.attention_scaling"].to_vec1::<f32>().unwrap()[0]
        );
    }
    let c = LlamaConfig::from_file(case_dir("llama3_rope").join("config.json")).unwrap();
    assert!(matches!(
        c.rope.scaling,
        RopeScaling::Llama3 {
            original_max_position_embeddings: 64,
            ..
        }
    ));
}

#[test]
fn module_infos_match_named_modules() {
    for case in CASES {
        let model = load_model(case);
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(case_dir(case).join("case.json")).unwrap(),
        )
        .unwrap();
        let want: Vec<(String, String)> = meta["named_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p[0].as_str().unwrap().to_string(),
                    p[1].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let got: Vec<(String, String)> = model
            .module_infos()
            .into_iter()
            .map(|m| (m.name, m.kind.type_name().to_string()))
            .collect();
        assert_eq!(got, want, "{case}");
        assert_eq!(
            model.output_layer().as_deref(),
            meta["output_layer"].as_str(),
            "{case}"
        );
        assert_eq!(
            model.input_embeddings().as_deref(),
            meta["input_embeddings"].as_str(),
            "{case}"
        );
        // Slots: exactly the Linear / Embedding modules, in tree order.
        let slot_names: Vec<&str> = model.slots().into_iter().map(|s| s.name()).collect();
        let linear: Vec<&str> = want
            .iter()
            .filter(|(_, k)| k == "Linear" || k == "Embedding")
            .map(|(n, _)| n.as_str())
            .collect();
        assert_eq!(slot_names, linear, "{case}");
    }
}

/// Greedy decoding one token at a time through the cache gives, at every step, the logits of the full forward
/// over the whole sequence at that position (batch of 2, the second row left-padded).
#[test]
fn kv_cache_decode_matches_full_forward() {
    let ctx = ForwardCtx::eval();
    for case in ["llama_gqa", "mistral", "qwen2", "smollm2_tied"] {
        let model = load_model(case);
        let io = io(case);
        let ids0 = u32s(&io["left.input_ids"]).i(0..2).unwrap();
        let mask0 = u32s(&io["left.attention_mask"]).i(0..2).unwrap();
        let (b, l0) = ids0.dims2().unwrap();
        let steps = 5;
        let positions = |mask: &Tensor| -> Tensor {
            let m = mask.to_dtype(DType::F32).unwrap();
            let c = (m.cumsum(1).unwrap() - 1.0)
                .unwrap()
                .clamp(0f32, f32::MAX)
                .unwrap();
            c.to_dtype(DType::U32).unwrap()
        };

        let mut cache = KvCache::new();
        let mut ids = ids0.clone();
        let mut mask = mask0.clone();
        let pos = positions(&mask);
        let first = model
            .forward(
                ForwardInput::ids(&ids0)
                    .with_attention_mask(&mask)
                    .with_position_ids(&pos)
                    .with_cache(&mut cache),
                &ctx,
            )
            .unwrap();
        assert_eq!(cache.len(), l0);
        let mut step_logits = vec![first.clone()];
        let mut last = first.i((.., l0 - 1, ..)).unwrap();
        for _ in 0..steps {
            let next = last.argmax(D::Minus1).unwrap().unsqueeze(1).unwrap();
            ids = Tensor::cat(&[&ids, &next], 1).unwrap();
            mask = Tensor::cat(
                &[
                    &mask,
                    &Tensor::ones((b, 1), DType::U32, &Device::Cpu).unwrap(),
                ],
                1,
            )
            .unwrap();
            let all_pos = positions(&mask);
            let t = ids.dim(1).unwrap();
            let pos = all_pos.i((.., t - 1..t)).unwrap();
            let out = model
                .forward(
                    ForwardInput::ids(&next)
                        .with_attention_mask(&mask)
                        .with_position_ids(&pos)
                        .with_cache(&mut cache),
                    &ctx,
                )
                .unwrap();
            assert_eq!(out.dims(), [b, 1, model.config().vocab_size]);
            last = out.i((.., 0, ..)).unwrap();
            step_logits.push(out);
        }
        assert_eq!(cache.len(), l0 + steps);
        let incremental = Tensor::cat(&step_logits, 1).unwrap();
        let full = model
            .forward(
                ForwardInput::ids(&ids)
                    .with_attention_mask(&mask)
                    .with_position_ids(&positions(&mask)),
                &ctx,
            )
            .unwrap();
        // The last sampled token's logits are not in `full` beyond t: compare the common positions.
        let n = incremental.dim(1).unwrap();
        let full = full.narrow(1, 0, n).unwrap();
        let keep = mask.narrow(1, 0, n).unwrap();
        let d = assert_close_rows(case, &incremental, &full, Some(&keep), 1e-4);
        eprintln!("{case}: cached decode max |diff| {d:.2e}");
        cache.reset();
        assert_eq!(cache.len(), 0);
    }
}

#[test]
fn inputs_embeds_equal_input_ids() {
    let ctx = ForwardCtx::eval();
    for case in ["llama", "smollm2_tied"] {
        let model = load_model(case);
        let io = io(case);
        let ids = u32s(&io["left.input_ids"]);
        let mask = &io["left.attention_mask"];
        let pos = &io["left.position_ids"];
        let a = model
            .forward(
                ForwardInput::ids(&ids)
                    .with_attention_mask(mask)
                    .with_position_ids(pos),
                &ctx,
            )
            .unwrap();
        let e = model.embed_tokens(&ids, &ctx).unwrap();
        let b = model
            .forward(
                ForwardInput::embeds(&e)
                    .with_attention_mask(mask)
                    .with_position_ids(pos),
                &ctx,
            )
            .unwrap();
        let d = max_diff(&a, &b);
        assert_eq!(d, 0.0, "{case}");
        // Neither or both: an error, as transformers.
        let e = model.forward(ForwardInput::default(), &ctx).unwrap_err();
        assert!(
            matches!(&e, PeftError::Invalid(m) if m.contains("exactly one of input_ids or inputs_embeds")),
            "{e}"
        );
    }
}

/// PEFT prefix tuning (3 virtual tokens) on the right-padded inputs: the flat prompt embeddings viewed as
/// per-layer keys/values, entered without RoPE, the mask extended by 3 ones; both without a cache and through
/// `KvCache::with_prefix`.
#[test]
fn prefix_kv_matches_peft_prefix_tuning() {
    let ctx = ForwardCtx::eval();
    for case in ["llama_gqa", "qwen2"] {
        let model = load_model(case);
        let io = io(case);
        let c = model.config();
        let prefix = PrefixKv::from_flat(
            &io["prefix.prompt_embeddings"],
            c.num_hidden_layers,
            c.num_key_value_heads,
            c.head_dim,
        )
        .unwrap();
        assert_eq!(prefix.len(), 3);
        let ids = u32s(&io["prefix.input_ids"]);
        let mask = u32s(&io["prefix.attention_mask"]);
        let b = ids.dim(0).unwrap();
        let full_mask = Tensor::cat(
            &[
                &Tensor::ones((b, prefix.len()), DType::U32, &Device::Cpu).unwrap(),
                &mask,
            ],
            1,
        )
        .unwrap();
        let want = &io["prefix.logits"];
        let got = model
            .forward(
                ForwardInput::ids(&ids)
                    .with_attention_mask(&full_mask)
                    .with_prefix(&prefix),
                &ctx,
            )
            .unwrap();
        let d = assert_close_rows(&format!("{case}/prefix"), &got, want, Some(&mask), 1e-4);
        eprintln!("{case}: prefix max |diff| {d:.2e}");
        // Same through a pre-filled cache.
        let mut cache = KvCache::with_prefix(&prefix);
        assert_eq!(cache.len(), 3);
        let got = model
            .forward(
                ForwardInput::ids(&ids)
                    .with_attention_mask(&full_mask)
                    .with_cache(&mut cache),
                &ctx,
            )
            .unwrap();
        assert_close_rows(
            &format!("{case}/prefix cache"),
            &got,
            want,
            Some(&mask),
            1e-4,
        );
        assert_eq!(cache.len(), 3 + ids.dim(1).unwrap());
        // A mask without the prefix positions is refused with a message that says why.
        let err = model
            .forward(
                ForwardInput::ids(&ids)
                    .with_attention_mask(&mask)
                    .with_prefix(&prefix),
                &ctx,
            )
            .unwrap_err()
            .to_string();
        assert!(err.contains("attention_mask"), "{err}");
    }
}

/// LoRA (init false: B random) on every q_proj / v_proj, cross-entropy, backward: every LoRA parameter gets a
/// non-zero gradient, and no base weight is a Var.
#[test]
fn lora_training_smoke() {
    for case in ["smollm2_tied", "qwen2"] {
        let mut model = load_model(case);
        let mut rng = PeftRng::new(7);
        for slot in model.slots_mut() {
            if slot.name().ends_with("q_proj") || slot.name().ends_with("v_proj") {
                let opts = LoraOptions {
                    r: 4,
                    alpha: 8.0,
                    use_rslora: false,
                    use_dora: false,
                    lora_bias: false,
                    dropout: 0.1,
                    init: InitLoraWeights::Bool(false),
                };
                let a = LoraAdapter::new(slot.base(), opts, &mut rng).unwrap();
                slot.add_adapter("default", Box::new(a)).unwrap();
            }
        }
        let io = io(case);
        let ids = u32s(&io["right.input_ids"]);
        let mask = &io["right.attention_mask"];
        let logits = model
            .forward(
                ForwardInput::ids(&ids).with_attention_mask(mask),
                &ForwardCtx::train(1, 0),
            )
            .unwrap();
        let (b, l, v) = logits.dims3().unwrap();
        let inputs = logits
            .narrow(1, 0, l - 1)
            .unwrap()
            .reshape((b * (l - 1), v))
            .unwrap();
        let targets = ids.narrow(1, 1, l - 1).unwrap().flatten_all().unwrap();
        let loss = candle_nn::loss::cross_entropy(&inputs, &targets).unwrap();
        assert!(loss.to_scalar::<f32>().unwrap().is_finite());
        let grads = loss.backward().unwrap();
        let mut n = 0;
        for slot in model.slots() {
            assert!(
                !slot.base().weight().unwrap().is_variable(),
                "{}: base weight is a Var",
                slot.name()
            );
            for (k, var) in slot.vars() {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{}/{k}: no gradient", slot.name()));
                let norm = g
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    norm > 0.0 && norm.is_finite(),
                    "{}/{k}: gradient norm {norm}",
                    slot.name()
                );
                n += 1;
            }
        }
        assert_eq!(
            n,
            2 * 2 * model.config().num_hidden_layers,
            "{case}: A and B of q and v per layer"
        );
        for (name, t) in model.named_tensors() {
            assert!(!t.is_variable(), "{name} is a Var");
        }
    }
}

#[test]
fn named_tensors_and_set_tensor() {
    let mut model = load_model("smollm2_tied");
    // Tied: lm_head's base weight is the embedding tensor itself (same storage, no copy).
    let id = |m: &LlamaForCausalLM, s: &str| m.slot(s).unwrap().base().weight().unwrap().id();
    assert_eq!(id(&model, "lm_head"), id(&model, "model.embed_tokens"));
    assert_ne!(
        id(&load_model("llama"), "lm_head"),
        id(&load_model("llama"), "model.embed_tokens")
    );
    let names: Vec<String> = model.named_tensors().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "model.layers.0.input_layernorm.weight",
            "model.layers.0.post_attention_layernorm.weight",
            "model.layers.1.input_layernorm.weight",
            "model.layers.1.post_attention_layernorm.weight",
            "model.norm.weight",
        ]
    );
    let h = model.config().hidden_size;
    let v = model.config().vocab_size;
    model
        .set_tensor(
            "model.norm.weight",
            Tensor::full(2f32, h, &Device::Cpu).unwrap(),
        )
        .unwrap();
    let w = model.named_tensors().pop().unwrap().1;
    assert_eq!(w.to_vec1::<f32>().unwrap(), vec![2.0; h]);
    let e = model
        .set_tensor(
            "model.norm.weight",
            Tensor::zeros(h + 1, DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap_err();
    assert!(
        matches!(&e, PeftError::ShapeMismatch { name, expected, got } if name == "model.norm.weight" && expected == &[h] && got == &[h + 1]),
        "{e}"
    );
    // Tied: one matrix under both names.
    let e = Tensor::ones((v, h), DType::F32, &Device::Cpu).unwrap();
    model.set_tensor("lm_head.weight", e).unwrap();
    assert_eq!(id(&model, "lm_head"), id(&model, "model.embed_tokens"));
    for s in ["model.embed_tokens", "lm_head"] {
        let w = model
            .slot(s)
            .unwrap()
            .base()
            .weight()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(w, (v * h) as f32, "{s}");
    }
    let q = "model.layers.1.self_attn.q_proj";
    let shape = model.slot(q).unwrap().base().weight_dims().to_vec();
    model
        .set_tensor(
            &format!("{q}.weight"),
            Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap();
    let e = model
        .set_tensor(
            &format!("{q}.bias"),
            Tensor::zeros(h, DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap_err();
    assert!(
        matches!(&e, PeftError::Invalid(m) if m == &format!("{q} has no bias to replace")),
        "{e}"
    );
    let e = model
        .set_tensor(
            "model.nothing.weight",
            Tensor::zeros(h, DType::F32, &Device::Cpu).unwrap(),
        )
        .unwrap_err();
    assert!(
        matches!(&e, PeftError::MissingModule { module } if module == "model.nothing"),
        "{e}"
    );
    // Qwen2's q_proj has a bias.
    let mut qwen = load_model("qwen2");
    let n = qwen.slot(q).unwrap().base().out_features();
    qwen.set_tensor(
        &format!("{q}.bias"),
        Tensor::zeros(n, DType::F32, &Device::Cpu).unwrap(),
    )
    .unwrap();
}

#[test]
fn from_tensors_names_missing_and_unexpected() {
    let dir = case_dir("llama");
    let config = LlamaConfig::from_file(dir.join("config.json")).unwrap();
    let mut t = load_st(dir.join("model.safetensors"));
    t.shift_remove("model.layers.1.mlp.up_proj.bias");
    let err = LlamaForCausalLM::from_tensors(config.clone(), t, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.layers.1.mlp.up_proj.bias"), "{err}");
    let mut t = load_st(dir.join("model.safetensors"));
    t.insert(
        "model.layers.0.extra.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    t.insert(
        "model.rotary_emb.inv_freq".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = LlamaForCausalLM::from_tensors(config.clone(), t, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.0.extra.weight") && !err.contains("inv_freq"),
        "{err}"
    );
    let mut t = load_st(dir.join("model.safetensors"));
    let w = t["model.norm.weight"].narrow(0, 0, 4).unwrap();
    t.insert("model.norm.weight".into(), w);
    let err = LlamaForCausalLM::from_tensors(config, t, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.norm.weight"), "{err}");
}

#[test]
fn config_parsing() {
    let text = std::fs::read_to_string(case_dir("llama3_rope").join("config.json")).unwrap();
    let v5: serde_json::Value = serde_json::from_str(&text).unwrap();
    let c5 = LlamaConfig::from_value(&v5).unwrap();
    // The pre-5 layout: top-level rope_theta, rope_scaling with `type`.
    let mut old = v5.clone();
    let rp = old
        .as_object_mut()
        .unwrap()
        .remove("rope_parameters")
        .unwrap();
    old["rope_theta"] = rp["rope_theta"].clone();
    old["rope_scaling"] = serde_json::json!({
        "type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64
    });
    assert_eq!(LlamaConfig::from_value(&old).unwrap(), c5);
    // original_max_position_embeddings falls back to max_position_embeddings.
    old["rope_scaling"]
        .as_object_mut()
        .unwrap()
        .remove("original_max_position_embeddings");
    let c = LlamaConfig::from_value(&old).unwrap();
    assert!(matches!(
        c.rope.scaling,
        RopeScaling::Llama3 {
            original_max_position_embeddings: 128,
            ..
        }
    ));
    // Other RoPE types: a clear error naming the field.
    let mut yarn = v5.clone();
    yarn["rope_parameters"]["rope_type"] = "yarn".into();
    let err = LlamaConfig::from_value(&yarn).unwrap_err().to_string();
    assert!(err.contains("rope_type") && err.contains("yarn"), "{err}");
    // No RoPE fields at all: default, theta 10000.
    let mut bare = v5.clone();
    bare.as_object_mut().unwrap().remove("rope_parameters");
    let c = LlamaConfig::from_value(&bare).unwrap();
    assert_eq!(
        (c.rope.theta, &c.rope.scaling),
        (10000.0, &RopeScaling::Default)
    );
    // head_dim: explicit, else hidden / heads; eos as a list.
    let mut h = v5.clone();
    h.as_object_mut().unwrap().remove("head_dim");
    h["eos_token_id"] = serde_json::json!([2, 7]);
    let c = LlamaConfig::from_value(&h).unwrap();
    assert_eq!(c.head_dim, 32 / 2);
    assert_eq!(c.eos_token_ids, vec![2, 7]);
    assert_eq!(c.bos_token_id, Some(1));
    // Families.
    let q = LlamaConfig::from_file(case_dir("qwen2").join("config.json")).unwrap();
    assert_eq!(q.family, LlamaFamily::Qwen2);
    assert!(q.qkv_bias && !q.o_bias && !q.mlp_bias);
    assert_eq!(q.sliding_windows, vec![None, None]);
    let m = LlamaConfig::from_file(case_dir("mistral").join("config.json")).unwrap();
    assert_eq!(
        (m.head_dim, m.sliding_windows.clone()),
        (16, vec![Some(4), Some(4)])
    );
    let s = LlamaConfig::from_file(case_dir("smollm2_tied").join("config.json")).unwrap();
    assert!(s.tie_word_embeddings);
    let mut gpt = v5;
    gpt["model_type"] = "gpt2".into();
    assert!(
        LlamaConfig::from_value(&gpt)
            .unwrap_err()
            .to_string()
            .contains("model_type")
    );
}

/// Forward and forward + backward (LoRA r = 8 on q, v) of a SmolLM2-135M-shaped model with random weights,
/// batch 4×64. `cargo test -p peft-models --release --test tests smollm2_shape_timing -- --ignored --nocapture`
#[test]
#[ignore]
fn smollm2_shape_timing() {
    let config = LlamaConfig::from_json_str(
        r#"{"model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "rms_norm_eps": 1e-5,
            "rope_theta": 100000.0, "tie_word_embeddings": true, "max_position_embeddings": 8192}"#,
    )
    .unwrap();
    let dev = Device::Cpu;
    let t0 = std::time::Instant::now();
    let tensors = LlamaForCausalLM::random_tensors(&config, 0, DType::F32, &dev).unwrap();
    let mut model = LlamaForCausalLM::from_tensors(config, tensors, &dev).unwrap();
    eprintln!("build: {:.2} s", t0.elapsed().as_secs_f64());
    let mut rng = PeftRng::new(1);
    let ids: Vec<u32> = (0..4 * 64).map(|_| rng.below(49152) as u32).collect();
    let ids = Tensor::from_vec(ids, (4, 64), &dev).unwrap();
    let time = |f: &mut dyn FnMut()| {
        let mut v: Vec<f64> = (0..4)
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v
    };
    let fwd = time(&mut || {
        model
            .forward(ForwardInput::ids(&ids), &ForwardCtx::eval())
            .unwrap();
    });
    eprintln!("forward (no adapters), ms: {fwd:.0?}");
    for slot in model.slots_mut() {
        if slot.name().ends_with("q_proj") || slot.name().ends_with("v_proj") {
            let opts = LoraOptions {
                r: 8,
                alpha: 16.0,
                use_rslora: false,
                use_dora: false,
                lora_bias: false,
                dropout: 0.0,
                init: InitLoraWeights::Bool(true),
            };
            let a = LoraAdapter::new(slot.base(), opts, &mut rng).unwrap();
            slot.add_adapter("default", Box::new(a)).unwrap();
        }
    }
    let targets = ids.narrow(1, 1, 63).unwrap().flatten_all().unwrap();
    let mut fwd_ms = Vec::new();
    let step = time(&mut || {
        let t = std::time::Instant::now();
        let logits = model
            .forward(ForwardInput::ids(&ids), &ForwardCtx::train(0, 0))
            .unwrap();
        let x = logits
            .narrow(1, 0, 63)
            .unwrap()
            .reshape((4 * 63, 49152))
            .unwrap();
        let loss = candle_nn::loss::cross_entropy(&x, &targets).unwrap();
        fwd_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let _ = loss.backward().unwrap();
    });
    eprintln!(
        "LoRA q,v r=8: forward+loss ms {fwd_ms:.0?}; forward+backward ms (sorted) {step:.0?}"
    );
}

/// The string list `key` of a fixture's case.json.
fn json_strings(v: &serde_json::Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("case.json: no list `{key}`"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// The LoRA / DoRA parity cases on tiny Llamas (fixtures/lora, written by PEFT 0.21.2): the HF base directory
/// loaded into [`LlamaForCausalLM`], the adapters loaded by `PeftModel::from_pretrained` (`default`) and
/// `load_adapter` (the others, from their sub-directories), the case's active list set, and logits compared
/// with PEFT's — active, disabled, merged (`merge_adapter`, with the merged weights of every slot), unmerged
/// again, and after `merge_and_unload`. Tied embeddings are one matrix, as in PEFT: a merge into either
/// `model.embed_tokens` or `lm_head` reaches both.
#[test]
fn peft_lora_fixtures_on_llama_match_peft() {
    use peft::peft_model::PeftModel;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lora/cases");
    let ctx = ForwardCtx::eval();
    let mut n = 0;
    let (mut tied_cases, mut multi_cases) = (0, 0);
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for dir in entries {
        let case = dir.file_name().unwrap().to_str().unwrap().to_string();
        if !dir.join("base_hf").is_dir() || case == "llama_tied_ensure" {
            continue; // not a Llama case; ensure_weight_tying=true is refused on purpose
        }
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        let adapters = json_strings(&meta, "adapters");
        let active = json_strings(&meta, "active");
        let order = json_strings(&meta, "merge_order");
        let active: Vec<&str> = active.iter().map(|s| s.as_str()).collect();
        let order: Vec<&str> = order.iter().map(|s| s.as_str()).collect();
        let config = LlamaConfig::from_file(dir.join("base_hf/config.json")).unwrap();
        let tied = config.tie_word_embeddings;
        let tensors = load_st(dir.join("base_hf/model.safetensors"));
        let model = LlamaForCausalLM::from_tensors(config, tensors, &Device::Cpu).unwrap();
        assert_eq!(model.tied_weights().is_empty(), !tied, "{case}");
        assert_eq!(adapters[0], "default", "{case}");
        let mut pm =
            PeftModel::from_pretrained(model, dir.join("adapter"), "default", &Device::Cpu)
                .unwrap_or_else(|e| panic!("{case}: {e}"));
        for a in &adapters[1..] {
            pm.load_adapter(dir.join("adapter").join(a), a, &Device::Cpu)
                .unwrap_or_else(|e| panic!("{case}: {a}: {e}"));
        }
        pm.set_adapter(&active).unwrap();
        let now: Vec<&str> = pm.active_adapters().iter().map(|s| s.as_str()).collect();
        assert_eq!(now, active, "{case}");
        let io = load_st(dir.join("io.safetensors"));
        let ids = u32s(&io["model_input"]);
        let base_weights: Vec<(String, Tensor)> = pm
            .model()
            .slots()
            .iter()
            .map(|s| (s.name().to_string(), s.base().weight().unwrap().clone()))
            .collect();
        let got = pm.model().forward(ForwardInput::ids(&ids), &ctx).unwrap();
        let d = assert_close_rows(&case, &got, &io["model_output"], None, 1e-4);
        let off = pm
            .with_adapters_disabled(|pm| pm.model().forward(ForwardInput::ids(&ids), &ctx))
            .unwrap()
            .unwrap();
        assert_close_rows(
            &format!("{case} disabled"),
            &off,
            &io["model_output_disabled"],
            None,
            1e-4,
        );
        // Merged in place: PEFT's merged weights in every slot (both halves of a tied matrix hold it).
        pm.merge_adapter(Some(&order))
            .unwrap_or_else(|e| panic!("{case}: merge: {e}"));
        let want = load_st(dir.join("merged.safetensors"));
        for slot in pm.model().slots() {
            let key = format!("{}.weight", slot.name());
            let diff = max_diff(&slot.base().weight().unwrap(), &want[&key]);
            assert!(diff <= 1e-5, "{case}: merged {key}: max |diff| {diff}");
        }
        let m = pm.model().forward(ForwardInput::ids(&ids), &ctx).unwrap();
        assert_close_rows(
            &format!("{case} merged"),
            &m,
            &io["model_output_merged"],
            None,
            1e-4,
        );
        // Unmerged: the base weights again (a tied matrix in both slots), and the adapted logits.
        pm.unmerge_adapter().unwrap();
        for (slot, (name, w)) in pm.model().slots().iter().zip(&base_weights) {
            let diff = max_diff(&slot.base().weight().unwrap(), w);
            assert!(diff <= 1e-5, "{case}: unmerged {name}: max |diff| {diff}");
            assert!(slot.merged().is_empty(), "{case}: {name} still merged");
        }
        let again = pm.model().forward(ForwardInput::ids(&ids), &ctx).unwrap();
        assert_close_rows(
            &format!("{case} unmerged"),
            &again,
            &io["model_output"],
            None,
            1e-4,
        );
        let merged = pm.merge_and_unload(Some(&order)).unwrap();
        let m = merged.forward(ForwardInput::ids(&ids), &ctx).unwrap();
        assert_close_rows(
            &format!("{case} merge_and_unload"),
            &m,
            &io["model_output_merged"],
            None,
            1e-4,
        );
        if tied {
            // Still one matrix, as PEFT's merged model stays tied.
            let id = |s: &str| merged.slot(s).unwrap().base().weight().unwrap().id();
            assert_eq!(id("lm_head"), id("model.embed_tokens"), "{case}: untied");
            tied_cases += 1;
        }
        if adapters.len() > 1 {
            multi_cases += 1;
        }
        eprintln!("{case}: max |diff| {d:.2e}");
        n += 1;
    }
    assert!(n >= 9, "only {n} Llama LoRA cases found");
    assert!(tied_cases >= 3, "only {tied_cases} tied cases");
    assert!(multi_cases >= 2, "only {multi_cases} two-adapter cases");
}

/// A tied pair merged in several steps (a fresh LoRA "extra" on both halves, then PEFT's DoRA "default") stays
/// one matrix; unmerging restores the shared base exactly in both slots; merging PEFT's adapter alone afterwards
/// gives PEFT's merged matrix (no stale state from the first round).
#[test]
fn tied_pair_merged_in_steps_stays_one_matrix() {
    use peft::config::{LoraConfig, TargetModules};
    use peft::peft_model::PeftModel;
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lora/cases/llama_tied_dora");
    let config = LlamaConfig::from_file(dir.join("base_hf/config.json")).unwrap();
    let tensors = load_st(dir.join("base_hf/model.safetensors"));
    let model = LlamaForCausalLM::from_tensors(config, tensors, &Device::Cpu).unwrap();
    let mut pm =
        PeftModel::from_pretrained(model, dir.join("adapter"), "default", &Device::Cpu).unwrap();
    let extra = peft::PeftConfig::Lora(LoraConfig {
        lora: peft::config::LoraFields {
            r: 2,
            lora_alpha: 4.0,
            init_lora_weights: InitLoraWeights::Bool(false),
            ..Default::default()
        },

        targets: peft::config::TargetFields {
            target_modules: Some(TargetModules::List(vec![
                "embed_tokens".into(),
                "lm_head".into(),
            ])),
            ..Default::default()
        },
        ..Default::default()
    });
    pm.add_adapter("extra", extra).unwrap();
    let w = |pm: &PeftModel<LlamaForCausalLM>, s: &str| {
        pm.model().slot(s).unwrap().base().weight().unwrap().clone()
    };
    let base = w(&pm, "lm_head");
    assert_eq!(max_diff(&base, &w(&pm, "model.embed_tokens")), 0.0);
    pm.merge_adapter(Some(&["extra"])).unwrap();
    let one = w(&pm, "lm_head");
    assert!(max_diff(&one, &base) > 1e-3);
    pm.merge_adapter(Some(&["default"])).unwrap();
    let (e, h) = (w(&pm, "model.embed_tokens"), w(&pm, "lm_head"));
    assert_eq!(e.id(), h.id(), "one matrix in both slots");
    assert!(max_diff(&h, &one) > 1e-3);
    // Still merged: replacing the base is refused.
    let e = pm
        .model_mut()
        .set_tensor("lm_head.weight", base.clone())
        .unwrap_err();
    assert!(
        matches!(&e, PeftError::Invalid(m) if m.contains("cannot replace base tensors while adapters are merged")),
        "{e}"
    );
    pm.unmerge_adapter().unwrap();
    for s in ["model.embed_tokens", "lm_head"] {
        assert_eq!(max_diff(&w(&pm, s), &base), 0.0, "{s} restored");
        assert!(pm.model().slot(s).unwrap().merged().is_empty());
    }
    pm.merge_adapter(Some(&["default"])).unwrap();
    let want = load_st(dir.join("merged.safetensors"));
    for s in ["model.embed_tokens", "lm_head"] {
        let d = max_diff(&w(&pm, s), &want[&format!("{s}.weight")]);
        assert!(d <= 1e-5, "{s}: max |diff| {d}");
    }
}

/// IA3 on the tiny Llama (fixtures/ia3/cases/ia3_llama, written by PEFT 0.21.2 with the Llama defaults: k_proj,
/// v_proj and the feedforward down_proj): `PeftModel::from_pretrained` gives PEFT's logits active, disabled,
/// merged (PEFT's merged weights in every slot), unmerged and after `merge_and_unload`. Then `get_peft_model`
/// with a target-less IA3 config picks exactly PEFT's targets, starts as the identity, and one AdamW step on
/// its vectors alone lowers the loss.
#[test]
fn peft_ia3_llama_fixture_and_default_targets() {
    use peft::PeftConfig;
    use peft::peft_model::PeftModel;
    use peft::train::optim::{AdamW, AdamWConfig, Optimizer};
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/ia3/cases/ia3_llama");
    let base = || {
        let config = LlamaConfig::from_file(dir.join("base_hf/config.json")).unwrap();
        let tensors = load_st(dir.join("base_hf/model.safetensors"));
        LlamaForCausalLM::from_tensors(config, tensors, &Device::Cpu).unwrap()
    };
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
    let io = load_st(dir.join("io.safetensors"));
    let ids = u32s(&io["model_input"]);
    let ctx = ForwardCtx::eval();

    let mut pm =
        PeftModel::from_pretrained(base(), dir.join("adapter"), "default", &Device::Cpu).unwrap();
    let got = pm.model().forward(ForwardInput::ids(&ids), &ctx).unwrap();
    assert_close_rows("ia3", &got, &io["model_output"], None, 1e-4);
    let off = pm
        .with_adapters_disabled(|pm| pm.model().forward(ForwardInput::ids(&ids), &ctx))
        .unwrap()
        .unwrap();
    assert_close_rows(
        "ia3 disabled",
        &off,
        &io["model_output_disabled"],
        None,
        1e-4,
    );
    pm.merge_adapter(None).unwrap();
    let want = load_st(dir.join("merged.safetensors"));
    for slot in pm.model().slots() {
        let key = format!("{}.weight", slot.name());
        let diff = max_diff(&slot.base().weight().unwrap(), &want[&key]);
        assert!(diff <= 1e-5, "ia3: merged {key}: max |diff| {diff}");
    }
    let m = pm.model().forward(ForwardInput::ids(&ids), &ctx).unwrap();
    assert_close_rows("ia3 merged", &m, &io["model_output_merged"], None, 1e-4);
    pm.unmerge_adapter().unwrap();
    let again = pm.model().forward(ForwardInput::ids(&ids), &ctx).unwrap();
    assert_close_rows("ia3 unmerged", &again, &io["model_output"], None, 1e-4);
    let merged = pm.merge_and_unload(None).unwrap();
    let m = merged.forward(ForwardInput::ids(&ids), &ctx).unwrap();
    assert_close_rows(
        "ia3 merge_and_unload",
        &m,
        &io["model_output_merged"],
        None,
        1e-4,
    );

    // get_peft_model with PEFT's Llama defaults
    let cfg =
        PeftConfig::from_json_str(r#"{"peft_type": "IA3", "task_type": "CAUSAL_LM"}"#).unwrap();
    let pm = PeftModel::get_peft_model(base(), cfg, "default", 0).unwrap();
    let targeted: Vec<String> = pm
        .model()
        .slots()
        .iter()
        .filter(|s| s.adapter("default").is_some())
        .map(|s| s.name().to_string())
        .collect();
    assert_eq!(targeted, json_strings(&meta, "targets"));
    for slot in pm.model().slots() {
        if let Some(a) = slot.adapter("default") {
            let l = &a.tensors()[0].1;
            let ff = slot.name().ends_with("down_proj");
            let want = if ff {
                vec![1, slot.base().in_features()]
            } else {
                vec![slot.base().out_features(), 1]
            };
            assert_eq!(l.dims(), want.as_slice(), "{}", slot.name());
        }
    }
    let saved = pm.configs()["default"].to_json_value();
    let theirs: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    for key in ["target_modules", "feedforward_modules"] {
        let mut a: Vec<String> = serde_json::from_value(saved[key].clone()).unwrap();
        let mut b: Vec<String> = serde_json::from_value(theirs[key].clone()).unwrap();
        a.sort();
        b.sort();
        assert_eq!(a, b, "{key}");
    }
    let fresh = pm.model().forward(ForwardInput::ids(&ids), &ctx).unwrap();
    assert_close_rows(
        "ia3 init ones",
        &fresh,
        &io["model_output_disabled"],
        None,
        1e-5,
    );

    // One AdamW step on the IA3 vectors (the only trainable parameters) lowers the loss on the batch.
    let params = pm.trainable_vars();
    assert_eq!(params.len(), 6);
    assert!(params.iter().all(|(k, _)| k.ends_with(".ia3_l")));
    let loss = |pm: &PeftModel<LlamaForCausalLM>| {
        let logits = pm
            .model()
            .forward(ForwardInput::ids(&ids), &ForwardCtx::train(0, 0))
            .unwrap();
        let (b, l, v) = logits.dims3().unwrap();
        let inputs = logits
            .narrow(1, 0, l - 1)
            .unwrap()
            .reshape((b * (l - 1), v))
            .unwrap();
        let targets = ids.narrow(1, 1, l - 1).unwrap().flatten_all().unwrap();
        candle_nn::loss::cross_entropy(&inputs, &targets).unwrap()
    };
    let before = loss(&pm);
    let grads = before.backward().unwrap();
    let mut opt = AdamW::from_params(
        params,
        AdamWConfig {
            lr: 1e-2,
            ..Default::default()
        },
    )
    .unwrap();
    opt.step(&grads).unwrap();
    let (b0, b1) = (
        before.to_scalar::<f32>().unwrap(),
        loss(&pm).to_scalar::<f32>().unwrap(),
    );
    assert!(b1 < b0, "loss {b0} -> {b1}");
}

/// LoHa, LoKr, OFT and BOFT on the tiny Llama (fixtures/<method>/cases/<method>_llama, written by PEFT 0.21.2
/// with every adapter parameter perturbed): `PeftModel::from_pretrained` gives PEFT's logits active, disabled,
/// merged (PEFT's merged weights in every targeted slot), unmerged again, and after `merge_and_unload`.
#[test]
fn peft_loha_lokr_oft_boft_llama_fixtures() {
    use peft::peft_model::PeftModel;
    for method in ["loha", "lokr", "oft", "boft"] {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join(format!("../../fixtures/{method}/cases/{method}_llama"));
        let base = || {
            let config = LlamaConfig::from_file(dir.join("base_hf/config.json")).unwrap();
            let tensors = load_st(dir.join("base_hf/model.safetensors"));
            LlamaForCausalLM::from_tensors(config, tensors, &Device::Cpu).unwrap()
        };
        let io = load_st(dir.join("io.safetensors"));
        let ids = u32s(&io["model_input"]);
        let ctx = ForwardCtx::eval();
        let mut pm =
            PeftModel::from_pretrained(base(), dir.join("adapter"), "default", &Device::Cpu)
                .unwrap_or_else(|e| panic!("{method}: {e}"));
        let got = pm.model().forward(ForwardInput::ids(&ids), &ctx).unwrap();
        assert_close_rows(method, &got, &io["model_output"], None, 1e-4);
        let effect = max_diff(&io["model_output"], &io["model_output_disabled"]);
        assert!(
            effect > 1e-3,
            "{method}: the adapter barely changes the logits ({effect})"
        );
        let off = pm
            .with_adapters_disabled(|pm| pm.model().forward(ForwardInput::ids(&ids), &ctx))
            .unwrap()
            .unwrap();
        let what = format!("{method} disabled");
        assert_close_rows(&what, &off, &io["model_output_disabled"], None, 1e-4);
        pm.merge_adapter(None).unwrap();
        let want = load_st(dir.join("merged.safetensors"));
        for slot in pm.model().slots() {
            let key = format!("{}.weight", slot.name());
            let diff = max_diff(&slot.base().weight().unwrap(), &want[&key]);
            assert!(diff <= 1e-5, "{method}: merged {key}: max |diff| {diff}");
        }
        let m = pm.model().forward(ForwardInput::ids(&ids), &ctx).unwrap();
        let what = format!("{method} merged");
        assert_close_rows(&what, &m, &io["model_output_merged"], None, 1e-4);
        pm.unmerge_adapter().unwrap();
        let again = pm.model().forward(ForwardInput::ids(&ids), &ctx).unwrap();
        let what = format!("{method} unmerged");
        assert_close_rows(&what, &again, &io["model_output"], None, 1e-4);
        let merged = pm.merge_and_unload(None).unwrap();
        let m = merged.forward(ForwardInput::ids(&ids), &ctx).unwrap();
        let what = format!("{method} merge_and_unload");
        assert_close_rows(&what, &m, &io["model_output_merged"], None, 1e-4);
    }
}

/// PEFT's mixed-batch inference on the tiny Llama with two LoRA adapters (fixtures/lora/cases/llama_two_adapters,
/// logits from `model(input_ids, adapter_names=[…])` written by gen_mixed_batch.py): each row runs with its own
/// adapter or none (`"__base__"`), whichever adapters are active. Unknown names and merged adapters are errors,
/// as in PEFT; training and DoRA, which PEFT refuses, work (DoRA rows equal each row alone).
#[test]
fn peft_mixed_batch_llama_fixture() {
    use peft::peft_model::PeftModel;
    let fixtures = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lora/cases");
    let dir = fixtures.join("llama_two_adapters");
    let base = |case: &str| {
        let d = fixtures.join(case);
        let config = LlamaConfig::from_file(d.join("base_hf/config.json")).unwrap();
        LlamaForCausalLM::from_tensors(
            config,
            load_st(d.join("base_hf/model.safetensors")),
            &Device::Cpu,
        )
        .unwrap()
    };
    let io = load_st(dir.join("mixed_batch.safetensors"));
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("mixed_batch.json")).unwrap())
            .unwrap();
    let names = json_strings(&meta, "adapter_names");
    let ids = u32s(&io["input_ids"]);
    let mut pm = PeftModel::from_pretrained(
        base("llama_two_adapters"),
        dir.join("adapter"),
        "default",
        &Device::Cpu,
    )
    .unwrap();
    pm.load_adapter(dir.join("adapter/other"), "other", &Device::Cpu)
        .unwrap();
    pm.check_adapter_names(&names).unwrap();
    let ctx = ForwardCtx::eval().with_adapter_names(&names);
    for active in [&["default"][..], &["other"], &["default", "other"]] {
        pm.set_adapter(active).unwrap();
        let got = pm.model().forward(ForwardInput::ids(&ids), &ctx).unwrap();
        assert_close_rows("mixed batch", &got, &io["logits"], None, 1e-4);
    }
    // rows really differ by adapter: the "other" rows are not what "default" gives
    pm.set_adapter(&["default"]).unwrap();
    let plain = pm
        .model()
        .forward(ForwardInput::ids(&ids), &ForwardCtx::eval())
        .unwrap();
    let row = |t: &Tensor, i: usize| t.i(i).unwrap();
    assert!(max_diff(&row(&plain, 1), &row(&io["logits"], 1)) > 1e-3);

    let e = pm
        .check_adapter_names(&["default", "nope", "zzz", "nope"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("non-existing adapter(s): nope, zzz"), "{e}");
    // Training takes mixed batches too (PEFT refuses): without dropout, the same logits.
    let train = ForwardCtx::train(0, 0).with_adapter_names(&names);
    let got = pm.model().forward(ForwardInput::ids(&ids), &train).unwrap();
    assert_close_rows("mixed batch, training", &got, &io["logits"], None, 1e-4);
    let short = ForwardCtx::eval().with_adapter_names(&["default"]);
    let e = pm
        .model()
        .forward(ForwardInput::ids(&ids), &short)
        .unwrap_err()
        .to_string();
    assert!(e.contains("1 names for 4 rows"), "{e}");
    pm.merge_adapter(None).unwrap();
    let e = pm
        .model()
        .forward(ForwardInput::ids(&ids), &ctx)
        .unwrap_err()
        .to_string();
    assert!(e.contains("merged"), "{e}");

    // DoRA, which PEFT refuses in a mixed batch: each row equals that row alone with its adapter.
    let dora = fixtures.join("llama_two_adapters_dora");
    let mut pm = PeftModel::from_pretrained(
        base("llama_two_adapters_dora"),
        dora.join("adapter"),
        "default",
        &Device::Cpu,
    )
    .unwrap();
    pm.load_adapter(dora.join("adapter/other"), "other", &Device::Cpu)
        .unwrap();
    let mixed = pm.model().forward(ForwardInput::ids(&ids), &ctx).unwrap();
    for (i, name) in names.iter().enumerate() {
        let row = ids.i(i..i + 1).unwrap();
        let alone = if name == "__base__" {
            pm.with_adapters_disabled(|pm| {
                pm.model()
                    .forward(ForwardInput::ids(&row), &ForwardCtx::eval())
            })
            .unwrap()
            .unwrap()
        } else {
            pm.set_adapter(&[name.as_str()]).unwrap();
            pm.model()
                .forward(ForwardInput::ids(&row), &ForwardCtx::eval())
                .unwrap()
        };
        let d = max_diff(&mixed.i(i..i + 1).unwrap(), &alone);
        assert!(d <= 1e-5, "DoRA mixed row {i} ({name}): {d}");
    }
}

/// Gradient checkpointing (`LlamaForCausalLM::checkpointed_loss`) gives the loss and the gradients of the plain
/// forward + backward: LoRA with dropout (the recomputed forward must draw the same masks) on q, v, down, the
/// the embedding (and lm_head for qwen2, whose head then runs in one chunk), a padded batch with ignored labels,
/// a head split into chunks of 3 rows.
#[test]
fn gradient_checkpointing_matches_the_plain_backward() {
    for case in ["smollm2_tied", "qwen2", "mistral"] {
        let mut model = load_model(case);
        let mut rng = PeftRng::new(11);
        for slot in model.slots_mut() {
            let name = slot.name().to_string();
            let targeted = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
                .iter()
                .any(|t| name.ends_with(t))
                || (case == "qwen2" && name == "lm_head");
            if targeted {
                let opts = LoraOptions {
                    r: 4,
                    alpha: 8.0,
                    use_rslora: false,
                    use_dora: false,
                    lora_bias: false,
                    dropout: if name.ends_with("embed_tokens") {
                        0.0
                    } else {
                        0.2
                    },
                    init: InitLoraWeights::Bool(false),
                };
                let a = LoraAdapter::new(slot.base(), opts, &mut rng).unwrap();
                slot.add_adapter("default", Box::new(a)).unwrap();
            }
        }
        let io = io(case);
        let ids = u32s(&io["right.input_ids"]);
        let mask = &io["right.attention_mask"];
        // Labels: the ids, -100 where padded and at one more position.
        let keep: Vec<Vec<f32>> = mask.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
        let mut labels: Vec<Vec<i64>> = ids.to_dtype(DType::I64).unwrap().to_vec2().unwrap();
        for (row, k) in labels.iter_mut().zip(&keep) {
            for (y, &m) in row.iter_mut().zip(k) {
                if m == 0.0 {
                    *y = -100;
                }
            }
        }
        labels[0][2] = -100;
        let labels = Tensor::new(labels, &Device::Cpu).unwrap();
        let ctx = ForwardCtx::train(3, 5);

        let logits = model
            .forward(ForwardInput::ids(&ids).with_attention_mask(mask), &ctx)
            .unwrap();
        let (loss, tokens) = peft_models::data::causal_lm_loss(&logits, &labels).unwrap();
        let plain = loss.backward().unwrap();
        let ck = model
            .checkpointed_loss_with_head_rows(&ids, Some(mask), &labels, &ctx, 3)
            .unwrap();
        assert_eq!(ck.tokens, tokens, "{case}");
        let (l0, l1) = (
            loss.to_scalar::<f32>().unwrap(),
            ck.loss.to_scalar::<f32>().unwrap(),
        );
        assert!(
            (l0 - l1).abs() <= 1e-6 * l0.abs(),
            "{case}: loss {l0} vs {l1}"
        );
        let mut n = 0;
        for slot in model.slots() {
            for (k, var) in slot.vars() {
                let want = plain.get(var.as_tensor()).unwrap();
                let got = ck
                    .grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{case} {}/{k}: no gradient", slot.name()));
                let scale = f64::from(
                    want.abs()
                        .unwrap()
                        .max_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap(),
                );
                let d = max_diff(got, want);
                assert!(scale > 0.0, "{case} {}/{k}: zero gradient", slot.name());
                assert!(
                    d <= 1e-6 + 1e-5 * scale,
                    "{case} {}/{k}: max |Δ| {d} (max |g| {scale})",
                    slot.name()
                );
                n += 1;
            }
        }
        let layers = model.config().num_hidden_layers;
        let heads = usize::from(case == "qwen2");
        assert_eq!(
            n,
            2 * (3 * layers + 1 + heads),
            "{case}: A and B of every target"
        );
    }
}

/// `ForwardCtx::no_grad` gives the same logits, and its graph stops at the last decoder layer: no LoRA parameter
/// of a decoder layer gets a gradient from it, while the same forward without it gives every one a gradient
/// (a training context with dropout 0: LoRA's eval kernel records no graph at all).
#[test]
fn no_grad_ctx_gives_the_same_logits_and_keeps_no_layer_graph() {
    let mut model = load_model("llama_gqa");
    let mut rng = PeftRng::new(5);
    for slot in model.slots_mut() {
        if slot.name().ends_with("q_proj") {
            let opts = LoraOptions {
                r: 2,
                alpha: 4.0,
                use_rslora: false,
                use_dora: false,
                lora_bias: false,
                dropout: 0.0,
                init: InitLoraWeights::Bool(false),
            };
            let a = LoraAdapter::new(slot.base(), opts, &mut rng).unwrap();
            slot.add_adapter("default", Box::new(a)).unwrap();
        }
    }
    let ids = u32s(&io("llama_gqa")["right.input_ids"]);
    let train = ForwardCtx::train(0, 0);
    let no_grad = ForwardCtx {
        no_grad: true,
        ..train.clone()
    };
    let eval = model.forward(ForwardInput::ids(&ids), &train).unwrap();
    let inf = model.forward(ForwardInput::ids(&ids), &no_grad).unwrap();
    assert_eq!(max_diff(&eval, &inf), 0.0);
    let with_graph = eval.sum_all().unwrap().backward().unwrap();
    let without = inf.sum_all().unwrap().backward().unwrap();
    let mut n = 0;
    for slot in model.slots() {
        for (k, var) in slot.vars() {
            assert!(
                with_graph.get(var.as_tensor()).is_some(),
                "{}/{k}",
                slot.name()
            );
            assert!(
                without.get(var.as_tensor()).is_none(),
                "{}/{k}",
                slot.name()
            );
            n += 1;
        }
    }
    assert!(n > 0);
}

/// The f32 bits of a tensor, flattened.
fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// Gradient checkpointing's default (`LlamaForCausalLM::checkpointed_loss`, what `peft train
/// --gradient-checkpointing on` runs) gives the loss and every gradient of the plain forward + backward **bit for
/// bit**: LoRA with dropout 0.2 on q/v/down in every layer, on `embed_tokens` (tied SmolLM2-style model) and on
/// `lm_head` (Qwen2, with q/k/v biases), Mistral's sliding window, right- and left-padded batches with ignored
/// labels, two dropout draws. The chunked head (`checkpointed_loss_with_head_rows` with few rows) is only close.
#[test]
fn gradient_checkpointing_gives_the_plain_gradients_bit_for_bit() {
    for case in ["smollm2_tied", "qwen2", "mistral"] {
        let mut model = load_model(case);
        let mut rng = PeftRng::new(17);
        for slot in model.slots_mut() {
            let name = slot.name().to_string();
            let targeted = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
                .iter()
                .any(|t| name.ends_with(t))
                || (case == "qwen2" && name == "lm_head");
            if targeted {
                let opts = LoraOptions {
                    r: 4,
                    alpha: 8.0,
                    use_rslora: false,
                    use_dora: false,
                    lora_bias: false,
                    dropout: if name.ends_with("embed_tokens") {
                        0.0
                    } else {
                        0.2
                    },
                    init: InitLoraWeights::Bool(false),
                };
                let a = LoraAdapter::new(slot.base(), opts, &mut rng).unwrap();
                slot.add_adapter("default", Box::new(a)).unwrap();
            }
        }
        let io = io(case);
        for (side, seed) in [("right", 3), ("left", 8)] {
            let ids = u32s(&io[format!("{side}.input_ids").as_str()]);
            let mask = &io[format!("{side}.attention_mask").as_str()];
            let keep: Vec<Vec<f32>> = mask.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
            let mut labels: Vec<Vec<i64>> = ids.to_dtype(DType::I64).unwrap().to_vec2().unwrap();
            for (row, k) in labels.iter_mut().zip(&keep) {
                for (y, &m) in row.iter_mut().zip(k) {
                    if m == 0.0 {
                        *y = -100;
                    }
                }
            }
            labels[0][3] = -100;
            let labels = Tensor::new(labels, &Device::Cpu).unwrap();
            let ctx = ForwardCtx::train(seed, 2);
            let logits = model
                .forward(ForwardInput::ids(&ids).with_attention_mask(mask), &ctx)
                .unwrap();
            let (loss, tokens) = peft_models::data::causal_lm_loss(&logits, &labels).unwrap();
            let plain = loss.backward().unwrap();
            let ck = model
                .checkpointed_loss(&ids, Some(mask), &labels, &ctx)
                .unwrap();
            assert_eq!(ck.tokens, tokens, "{case} {side}");
            assert_eq!(
                bits(&loss),
                bits(&ck.loss),
                "{case} {side}: loss {loss} vs {}",
                ck.loss
            );
            let chunked = model
                .checkpointed_loss_with_head_rows(&ids, Some(mask), &labels, &ctx, 3)
                .unwrap();
            let mut n = 0;
            for slot in model.slots() {
                for (k, var) in slot.vars() {
                    let want = plain.get(var.as_tensor()).unwrap();
                    let got = ck
                        .grads
                        .get(var.as_tensor())
                        .unwrap_or_else(|| panic!("{case} {}/{k}: no gradient", slot.name()));
                    assert_eq!(want.dims(), got.dims());
                    assert!(
                        bits(want) == bits(got),
                        "{case} {side} {}/{k}: the checkpointed gradient differs (max |Δ| {})",
                        slot.name(),
                        max_diff(got, want)
                    );
                    assert!(bits(want).iter().any(|&b| b << 1 != 0), "{case}: zero");
                    let c = chunked.grads.get(var.as_tensor()).unwrap();
                    let scale = f64::from(
                        want.abs()
                            .unwrap()
                            .max_all()
                            .unwrap()
                            .to_scalar::<f32>()
                            .unwrap(),
                    );
                    assert!(max_diff(c, want) <= 1e-6 + 1e-5 * scale, "{case} chunked");
                    n += 1;
                }
            }
            let layers = model.config().num_hidden_layers;
            let heads = usize::from(case == "qwen2");
            assert_eq!(n, 2 * (3 * layers + 1 + heads), "{case}");
        }
    }
}

/// The methods added after the extension point (HRA, RoAd, DeLoRA, MiSS, GraLoRA, C3A, HiRA, BEFT, VB-LoRA,
/// GLoRA, FourierFT, PEANuT, SuperTuning, SHiRA, PVeRA, RandLoRA, trainable tokens (untied and tied)) on the tiny Llama (`fixtures/<method>/cases/<method>_llama`, written by PEFT 0.21.2
/// with every adapter parameter perturbed): `PeftModel::from_pretrained` gives PEFT's logits active, disabled,
/// merged and after `merge_and_unload`, and unmerging gives the adapted logits back.
#[test]
fn newer_methods_give_peft_logits_on_the_tiny_llama() {
    use peft::peft_model::PeftModel;
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    for case in [
        "hra/cases/hra_llama",
        "road/cases/road_4_llama",
        "delora/cases/delora_llama",
        "miss/cases/miss_llama",
        "gralora/cases/gralora_llama",
        "c3a/cases/c3a_llama",
        "hira/cases/hira_llama",
        "beft/cases/beft_llama",
        "vblora/cases/vblora_llama",
        "glora/cases/glora_llama",
        "fourierft/cases/fourierft_llama",
        "peanut/cases/peanut_llama",
        "supertuning/cases/supertuning_llama",
        "shira/cases/shira_llama",
        "pvera/cases/pvera_llama",
        "randlora/cases/randlora_llama",
        "trainable_tokens/cases/tt_llama",
        "trainable_tokens/cases/tt_llama_tied",
        "deft/cases/deft_llama",
        "unilora/cases/unilora_llama",
        "unilora/cases/unilora_llama_long",
        "frod/cases/frod_llama",
        "osf/cases/osf_llama",
    ] {
        let dir = root.join(case);
        let base = || {
            let config = LlamaConfig::from_file(dir.join("base_hf/config.json")).unwrap();
            let tensors = load_st(dir.join("base_hf/model.safetensors"));
            LlamaForCausalLM::from_tensors(config, tensors, &Device::Cpu).unwrap()
        };
        let io = load_st(dir.join("io.safetensors"));
        let ids = u32s(&io["model_input"]);
        let ctx = ForwardCtx::eval();
        let mut pm =
            PeftModel::from_pretrained(base(), dir.join("adapter"), "default", &Device::Cpu)
                .unwrap_or_else(|e| panic!("{case}: {e}"));
        let got = pm.model().forward(ForwardInput::ids(&ids), &ctx).unwrap();
        assert_close_rows(case, &got, &io["model_output"], None, 1e-4);
        let moved = max_diff(&io["model_output"], &io["model_output_disabled"]);
        assert!(
            moved > 1e-3,
            "{case}: the adapter barely moves the logits ({moved})"
        );
        let off = pm
            .with_adapters_disabled(|pm| pm.model().forward(ForwardInput::ids(&ids), &ctx))
            .unwrap()
            .unwrap();
        assert_close_rows(case, &off, &io["model_output_disabled"], None, 1e-4);
        pm.merge_adapter(None).unwrap();
        let m = pm.model().forward(ForwardInput::ids(&ids), &ctx).unwrap();
        assert_close_rows(case, &m, &io["model_output_merged"], None, 1e-4);
        pm.unmerge_adapter().unwrap();
        let again = pm.model().forward(ForwardInput::ids(&ids), &ctx).unwrap();
        assert_close_rows(case, &again, &io["model_output"], None, 1e-4);
        let merged = pm.merge_and_unload(None).unwrap();
        let m = merged.forward(ForwardInput::ids(&ids), &ctx).unwrap();
        assert_close_rows(case, &m, &io["model_output_merged"], None, 1e-4);
    }
}

/// Trainable tokens on a tied tiny Llama, created here: the default target is the input embedding (saved as
/// PEFT's `"model.embed_tokens"`), `lm_head` gets the copy tied to it (one trained tensor, one `Var`), a new
/// adapter is the identity, and a change of the rows moves the embedding's lookups and the head's logits of
/// those tokens both; the file holds the rows under both names, as PEFT's does, and loads back to the same
/// logits.
#[test]
fn trainable_tokens_follow_the_tied_head_when_created() {
    use peft::peft_model::PeftModel;
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/trainable_tokens/cases/tt_llama_tied");
    let base = || {
        let config = LlamaConfig::from_file(dir.join("base_hf/config.json")).unwrap();
        let tensors = load_st(dir.join("base_hf/model.safetensors"));
        LlamaForCausalLM::from_tensors(config, tensors, &Device::Cpu).unwrap()
    };
    let io = load_st(dir.join("io.safetensors"));
    let ids = u32s(&io["model_input"]);
    let ctx = ForwardCtx::eval();
    let plain = base().forward(ForwardInput::ids(&ids), &ctx).unwrap();
    let config = peft::PeftConfig::from_json_str(
        r#"{"peft_type": "TRAINABLE_TOKENS", "task_type": "CAUSAL_LM", "token_indices": [2, 7, 30]}"#,
    )
    .unwrap();
    let pm = PeftModel::get_peft_model(base(), config, "default", 0).unwrap();
    let saved = pm.configs()["default"].to_json_value();
    assert_eq!(saved["target_modules"], "model.embed_tokens");
    let vars = pm.trainable_vars();
    assert_eq!(
        vars.len(),
        1,
        "{:?}",
        vars.iter().map(|v| &v.0).collect::<Vec<_>>()
    );
    assert_eq!(vars[0].0, "model.embed_tokens.trainable_tokens_delta");
    let same = pm.model().forward(ForwardInput::ids(&ids), &ctx).unwrap();
    // The identity, up to the rounding of the head's separate product for the chosen tokens.
    assert!(
        max_diff(&same, &plain) < 1e-5,
        "a new adapter is the identity"
    );
    // New rows: both the lookups (ids 7 are in the input) and the head's logits for tokens 2, 7, 30 move.
    let v = &vars[0].1;
    v.set(&Tensor::randn(0f32, 1.0, v.shape(), &Device::Cpu).unwrap())
        .unwrap();
    let moved = pm.model().forward(ForwardInput::ids(&ids), &ctx).unwrap();
    let cols = |t: &Tensor, c: &[u32]| {
        let idx = Tensor::new(c, &Device::Cpu).unwrap();
        t.index_select(&idx, 2).unwrap()
    };
    assert!(max_diff(&cols(&moved, &[2, 30]), &cols(&plain, &[2, 30])) > 1e-3);
    let out = tempfile::tempdir().unwrap();
    pm.save_pretrained(out.path()).unwrap();
    let file = load_st(out.path().join("adapter_model.safetensors"));
    let (e, h) = (
        &file["base_model.model.model.embed_tokens.trainable_tokens_delta"],
        &file["base_model.model.lm_head.trainable_tokens_delta"],
    );
    assert_eq!(max_diff(e, h), 0.0);
    assert_eq!(max_diff(e, v.as_tensor()), 0.0);
    let back = PeftModel::from_pretrained(base(), out.path(), "default", &Device::Cpu).unwrap();
    assert_eq!(back.trainable_vars().len(), 1);
    let again = back.model().forward(ForwardInput::ids(&ids), &ctx).unwrap();
    assert_eq!(max_diff(&again, &moved), 0.0);
}
