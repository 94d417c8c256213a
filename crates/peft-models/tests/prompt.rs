//! PEFT prompt learning (prompt tuning, P-tuning, prefix tuning) on the tiny GQA Llama against PEFT 0.21.2
//! (fixtures/prompt, written by gen_prompt.py).

use candle_core::{D, DType, Device, IndexOp, Tensor};
use indexmap::IndexMap;
use peft::config::PeftConfig;
use peft::{ForwardCtx, PeftError, PeftRng};
use peft_models::llama::{LlamaConfig, LlamaForCausalLM};
use peft_models::prompt_learning::{PromptLearning, PromptMethod};
use peft_test_support::max_diff;
use std::path::PathBuf;

const CASES: [&str; 5] = [
    "prompt_tuning_random",
    "prefix_tuning",
    "prefix_tuning_projection",
    "p_tuning_mlp",
    "p_tuning_lstm",
];

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

fn case_dir(case: &str) -> PathBuf {
    fixtures().join("prompt/cases").join(case)
}

fn load_st(path: PathBuf) -> IndexMap<String, Tensor> {
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn model() -> LlamaForCausalLM {
    let dir = fixtures().join("models/cases/llama_gqa");
    let config = LlamaConfig::from_file(dir.join("config.json")).unwrap();
    LlamaForCausalLM::from_tensors(config, load_st(dir.join("model.safetensors")), &Device::Cpu)
        .unwrap()
}

/// max |got − want| over the positions where `keep` is 1.
fn masked_max_diff(got: &Tensor, want: &Tensor, keep: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims());
    let keep = keep
        .to_dtype(DType::F32)
        .unwrap()
        .unsqueeze(D::Minus1)
        .unwrap();
    max_diff(
        &got.broadcast_mul(&keep).unwrap(),
        &want.broadcast_mul(&keep).unwrap(),
    )
}

/// Logits of PEFT's forward (padded batch, right and left padding) for every case: prompt / P-tuning include
/// the virtual positions, prefix tuning only the real tokens.
#[test]
fn prompt_learning_logits_match_peft() {
    let model = model();
    for case in CASES {
        let pl = PromptLearning::load(case_dir(case).join("adapter"), &model).unwrap();
        let io = load_st(case_dir(case).join("io.safetensors"));
        let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
        let mask = io["attention_mask"].to_dtype(DType::U32).unwrap();
        let got = pl
            .forward(&model, &ids, Some(&mask), &ForwardCtx::eval())
            .unwrap();
        let n = pl.num_virtual_tokens();
        assert_eq!(n, 4);
        let keep = match pl.method() {
            PromptMethod::PrefixTuning => mask.clone(),
            _ => Tensor::cat(
                &[
                    &Tensor::ones((mask.dim(0).unwrap(), n), DType::U32, &Device::Cpu).unwrap(),
                    &mask,
                ],
                1,
            )
            .unwrap(),
        };
        let d = masked_max_diff(&got, &io["logits"], &keep);
        eprintln!("{case}: max |diff| {d:.2e}");
        assert!(d < 1e-4, "{case}: max |diff| {d}");
    }
}

/// The encoders built for training (P-tuning MLP and LSTM, prefix projection), given PEFT's parameters,
/// compute the saved `prompt_embeddings`.
#[test]
fn prompt_encoders_match_peft() {
    let model = model();
    for case in ["prefix_tuning_projection", "p_tuning_mlp", "p_tuning_lstm"] {
        let dir = case_dir(case).join("adapter");
        let config = PeftConfig::from_dir(&dir).unwrap();
        let pl = PromptLearning::new(&config, &model, &mut PeftRng::new(0), None).unwrap();
        let io = load_st(case_dir(case).join("io.safetensors"));
        pl.embedding().set(&io["encoder.embedding.weight"]).unwrap();
        let enc = pl.encoder().expect("an encoder");
        let named = enc.named_vars();
        for (name, var) in &named {
            var.set(&io[&format!("encoder.{name}")]).unwrap();
        }
        assert_eq!(io.len(), 1 + 3 + named.len());
        let want = PromptLearning::load(&dir, &model)
            .unwrap()
            .prompt_embeddings()
            .unwrap();
        let d = max_diff(&pl.prompt_embeddings().unwrap(), &want);
        assert!(d < 1e-5, "{case}: {d}");
    }
}

/// Save → reload keeps `prompt_embeddings` and the config; a new adapter gets the model's dimensions.
#[test]
fn prompt_learning_save_reload() {
    let model = model();
    for case in CASES {
        let dir = case_dir(case).join("adapter");
        let config = PeftConfig::from_dir(&dir).unwrap();
        let pl = PromptLearning::new(&config, &model, &mut PeftRng::new(3), None).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        pl.save(tmp.path()).unwrap();
        let keys: Vec<String> = load_st(tmp.path().join("adapter_model.safetensors"))
            .into_keys()
            .collect();
        assert_eq!(keys, ["prompt_embeddings"]);
        let back = PromptLearning::load(tmp.path(), &model).unwrap();
        let d = max_diff(
            &pl.prompt_embeddings().unwrap(),
            &back.prompt_embeddings().unwrap(),
        );
        assert_eq!(d, 0.0, "{case}");
        let (a, b) = (pl.config().to_json_value(), back.config().to_json_value());
        // The saved config is marked inference_mode: true, as PEFT writes it.
        let strip = |mut v: serde_json::Value| {
            v.as_object_mut().unwrap().remove("inference_mode");
            v
        };
        assert_eq!(strip(a), strip(b), "{case}");
        // PEFT's dimensions (GQA: prefix tuning uses the kv heads).
        let v = back.config().to_json_value();
        assert_eq!(v["num_layers"], 2);
        if back.method() == PromptMethod::PrefixTuning {
            assert_eq!(v["num_attention_heads"], 2);
            assert_eq!(v["token_dim"], 16);
        } else {
            assert_eq!(v["token_dim"], 64);
        }
    }
}

/// Greedy decoding through the KV cache equals the argmax of full forwards over the growing sequence.
#[test]
fn prompt_learning_generation_with_cache_matches_full_forward() {
    let model = model();
    let ctx = ForwardCtx::eval();
    for case in CASES {
        let pl = PromptLearning::load(case_dir(case).join("adapter"), &model).unwrap();
        let io = load_st(case_dir(case).join("io.safetensors"));
        let prompt: Vec<u32> = io["input_ids"]
            .to_dtype(DType::U32)
            .unwrap()
            .i(0)
            .unwrap()
            .to_vec1()
            .unwrap();
        let new = pl.generate_greedy(&model, &prompt, 6, None).unwrap();
        assert_eq!(new.len(), 6);
        let mut seq = prompt.clone();
        for &t in &new {
            let ids = Tensor::new(seq.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = pl.forward(&model, &ids, None, &ctx).unwrap();
            let last = logits.i((0, logits.dim(1).unwrap() - 1)).unwrap();
            let want = last.argmax(0).unwrap().to_scalar::<u32>().unwrap();
            assert_eq!(t, want, "{case}: {new:?}");
            seq.push(t);
        }
    }
}

/// New adapters: RANDOM is N(0, 1) of the right shape; TEXT repeats / cuts the init ids' embeddings;
/// SAMPLE_VOCAB is refused by name.
#[test]
fn prompt_tuning_inits() {
    let model = model();
    let cfg = |extra: &str| {
        PeftConfig::from_json_str(&format!(
            r#"{{"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 5{extra}}}"#
        ))
        .unwrap()
    };
    let pl = PromptLearning::new(&cfg(""), &model, &mut PeftRng::new(1), None).unwrap();
    let e = pl.prompt_embeddings().unwrap();
    assert_eq!(e.dims(), [5, 64]);
    let v: Vec<f32> = e.flatten_all().unwrap().to_vec1().unwrap();
    let mean = v.iter().sum::<f32>() / v.len() as f32;
    let var = v.iter().map(|x| (x - mean) * (x - mean)).sum::<f32>() / v.len() as f32;
    assert!(mean.abs() < 0.15 && (var - 1.0).abs() < 0.2, "{mean} {var}");
    let text = cfg(
        r#", "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi", "tokenizer_name_or_path": "x""#,
    );
    let emb = |ids: &[u32]| {
        model
            .embed_tokens(
                &Tensor::new(ids, &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap(),
                &ForwardCtx::eval(),
            )
            .unwrap()
            .squeeze(0)
            .unwrap()
    };
    for (ids, want) in [
        (&[7u32, 8][..], &[7u32, 8, 7, 8, 7][..]),
        (&[3, 4, 5, 6, 9, 10, 11], &[3, 4, 5, 6, 9]),
    ] {
        let pl = PromptLearning::new(&text, &model, &mut PeftRng::new(1), Some(ids)).unwrap();
        assert_eq!(max_diff(&pl.prompt_embeddings().unwrap(), &emb(want)), 0.0);
    }
    let Err(e) = PromptLearning::new(&text, &model, &mut PeftRng::new(1), None) else {
        panic!("TEXT init without token ids is accepted")
    };
    assert!(
        matches!(&e, PeftError::InvalidConfig(m) if m.contains("TEXT needs the tokenized prompt_tuning_init_text")),
        "{e}"
    );
    let sample = cfg(r#", "prompt_tuning_init": "SAMPLE_VOCAB""#);
    let err = PromptLearning::new(&sample, &model, &mut PeftRng::new(1), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("SAMPLE_VOCAB"), "{err}");
}

/// Prompt tuning trains: cross-entropy on the real tokens (virtual positions ignored, as PEFT's labels −100)
/// gives a gradient only to the virtual embeddings, and a few SGD steps lower the loss.
#[test]
fn prompt_tuning_training_smoke() {
    let model = model();
    let cfg = PeftConfig::from_json_str(
        r#"{"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3}"#,
    )
    .unwrap();
    let pl = PromptLearning::new(&cfg, &model, &mut PeftRng::new(5), None).unwrap();
    assert_eq!(pl.num_trainable_params(), 3 * 64);
    let ids = Tensor::new(&[[5u32, 9, 17, 33, 41, 12, 8]], &Device::Cpu).unwrap();
    let loss = |pl: &PromptLearning| {
        let logits = pl.forward(&model, &ids, None, &ForwardCtx::eval()).unwrap();
        // Position n + t predicts token t + 1.
        let l = ids.dim(1).unwrap();
        let pred = logits.i((0, 3..3 + l - 1)).unwrap();
        let tgt = ids.i((0, 1..)).unwrap();
        candle_nn::loss::cross_entropy(&pred, &tgt).unwrap()
    };
    let first = loss(&pl).to_scalar::<f32>().unwrap();
    for _ in 0..5 {
        let l = loss(&pl);
        let grads = l.backward().unwrap();
        let e = pl.embedding();
        let g = grads.get(e.as_tensor()).expect("a gradient");
        e.set(&(e.as_tensor() - (g * 0.5).unwrap()).unwrap())
            .unwrap();
    }
    let last = loss(&pl).to_scalar::<f32>().unwrap();
    assert!(last < first, "{first} -> {last}");
}

/// The one entry point: `PeftModel::from_pretrained` loads every prompt-learning case (through
/// `AdapterHost::prompt_adapter`), its forward (`CausalLm::token_logits`) is `PromptLearning`'s, it saves the
/// same file back, `get_peft_model` builds a fresh one, and a second adapter of any kind is refused.
#[test]
fn peft_model_attaches_prompt_learning_like_any_adapter() {
    use peft::PeftModel;
    use peft_models::causal_lm::CausalLm;
    for case in CASES {
        let dir = case_dir(case).join("adapter");
        let base = model();
        let want = PromptLearning::load(&dir, &base).unwrap();
        let pm = PeftModel::from_pretrained(model(), &dir, "default", &Device::Cpu).unwrap();
        assert!(pm.configs().is_empty(), "{case}: no layer adapter");
        assert_eq!(pm.prompt_adapter_name(), Some("default"));
        let io = load_st(case_dir(case).join("io.safetensors"));
        let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
        let mask = io["attention_mask"].to_dtype(DType::U32).unwrap();
        let ctx = ForwardCtx::eval();
        let got = pm.token_logits(&ids, Some(&mask), &ctx).unwrap();
        let exp = want.token_logits(&base, &ids, Some(&mask), &ctx).unwrap();
        assert_eq!(max_diff(&got, &exp), 0.0, "{case}");
        let n: usize = want.vars().iter().map(|v| v.elem_count()).sum();
        assert_eq!(pm.trainable_parameters().trainable, n, "{case}");
        let tmp = tempfile::tempdir().unwrap();
        pm.save_pretrained(tmp.path()).unwrap();
        let back = PromptLearning::load(tmp.path(), &base).unwrap();
        assert_eq!(
            max_diff(
                &back.prompt_embeddings().unwrap(),
                &want.prompt_embeddings().unwrap()
            ),
            0.0,
            "{case}"
        );
        let mut pm = pm;
        let e = pm
            .load_adapter(&dir, "other", &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot be combined"), "{case}: {e}");
        let fresh =
            PeftModel::get_peft_model(model(), want.config().clone(), "default", 3).unwrap();
        assert!(peft_models::prompt_learning::prompt_learning_of(&fresh).is_some());
    }
}
