//! LoRA's `trainable_token_indices` on the tiny Llama, against PEFT 0.21.2 (`fixtures/lora_trainable_tokens/`,
//! written by `gen_lora_trainable_tokens.py` with every adapter parameter perturbed): PEFT's adapter loaded by
//! `PeftModel::from_pretrained` gives PEFT's logits active, disabled, merged, unmerged again and after
//! `merge_and_unload`, and saves PEFT's file again; the same config created here trains the LoRA matrices and
//! the token rows (the tied `lm_head` follows the embedding's rows and saves nothing), and PEFT's errors are
//! errors here too.

use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::host::AdapterHost;
use peft::peft_model::PeftModel;
use peft::{ForwardCtx, PeftConfig};
use peft_models::llama::{ForwardInput, LlamaConfig, LlamaForCausalLM};
use peft_test_support::{assert_close, max_diff};
use std::path::{Path, PathBuf};

const CASES: [&str; 4] = [
    "lora_tt_llama",
    "lora_tt_llama_dict",
    "lora_tt_llama_tied",
    "lora_tt_llama_tied_mismatch",
];

fn case_dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/lora_trainable_tokens/cases")
        .join(case)
}

fn load_st(path: &Path) -> IndexMap<String, Tensor> {
    let mut m: Vec<(String, Tensor)> = candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect();
    m.sort_by(|a, b| a.0.cmp(&b.0));
    m.into_iter().collect()
}

fn base(dir: &Path) -> LlamaForCausalLM {
    let config = LlamaConfig::from_file(dir.join("base_hf/config.json")).unwrap();
    let tensors = load_st(&dir.join("base_hf/model.safetensors"));
    LlamaForCausalLM::from_tensors(config, tensors, &Device::Cpu).unwrap()
}

fn logits(pm: &PeftModel<LlamaForCausalLM>, ids: &Tensor) -> Tensor {
    pm.model()
        .forward(ForwardInput::ids(ids), &ForwardCtx::eval())
        .unwrap()
}

fn close(what: &str, got: &Tensor, want: &Tensor) {
    assert_close(what, got, want, 1e-4, 1e-4);
}

/// PEFT's file loaded here gives PEFT's logits in every state, and saves the same keys again.
#[test]
fn peft_adapter_gives_peft_logits() {
    for case in CASES {
        let dir = case_dir(case);
        let io = load_st(&dir.join("io.safetensors"));
        let ids = io["model_input"].to_dtype(DType::U32).unwrap();
        let mut pm =
            PeftModel::from_pretrained(base(&dir), dir.join("adapter"), "default", &Device::Cpu)
                .unwrap_or_else(|e| panic!("{case}: {e}"));
        close(case, &logits(&pm, &ids), &io["model_output"]);
        let moved = max_diff(&io["model_output"], &io["model_output_disabled"]);
        assert!(
            moved > 1e-3,
            "{case}: the adapter barely moves the logits ({moved})"
        );
        let off = pm.with_adapters_disabled(|pm| logits(pm, &ids)).unwrap();
        close(
            &format!("{case} disabled"),
            &off,
            &io["model_output_disabled"],
        );
        pm.merge_adapter(None).unwrap();
        close(
            &format!("{case} merged"),
            &logits(&pm, &ids),
            &io["model_output_merged"],
        );
        pm.unmerge_adapter().unwrap();
        close(
            &format!("{case} unmerged"),
            &logits(&pm, &ids),
            &io["model_output"],
        );

        // Saved again: PEFT's keys, shapes and values.
        let out = tempfile::tempdir().unwrap();
        pm.save_pretrained(out.path()).unwrap();
        let mine = load_st(&out.path().join("adapter_model.safetensors"));
        let theirs = load_st(&dir.join("adapter/adapter_model.safetensors"));
        let (a, b): (Vec<&String>, Vec<&String>) = (mine.keys().collect(), theirs.keys().collect());
        assert_eq!(a, b, "{case}: saved keys");
        for (k, t) in &theirs {
            assert_eq!(max_diff(&mine[k], t), 0.0, "{case}: {k}");
        }
        let merged = pm.merge_and_unload(None).unwrap();
        let m = merged
            .forward(ForwardInput::ids(&ids), &ForwardCtx::eval())
            .unwrap();
        close(
            &format!("{case} merge_and_unload"),
            &m,
            &io["model_output_merged"],
        );
        assert!(
            merged.slots().iter().all(|s| s.adapters().next().is_none()),
            "{case}: adapters left after merge_and_unload"
        );
    }
}

/// The config created here (PEFT's saved config of the case): the same structure as PEFT's (trainable names,
/// file keys and shapes), the identity for the token rows at first, and a change of the rows reaches the
/// embedding's lookups and, on the tied model, the head's logits of those tokens; it saves and reloads to the
/// same logits.
#[test]
fn created_adapter_has_peft_structure() {
    for case in CASES {
        let dir = case_dir(case);
        let io = load_st(&dir.join("io.safetensors"));
        let ids = io["model_input"].to_dtype(DType::U32).unwrap();
        let json = std::fs::read_to_string(dir.join("adapter/adapter_config.json")).unwrap();
        let config = PeftConfig::from_json_str(&json).unwrap();
        let plain = base(&dir)
            .forward(ForwardInput::ids(&ids), &ForwardCtx::eval())
            .unwrap();
        let pm = PeftModel::get_peft_model(base(&dir), config, "default", 3).unwrap();
        let theirs = load_st(&dir.join("adapter/adapter_model.safetensors"));
        // One trained tensor per saved key (the tied head trains nothing of its own), named as PEFT's
        // parameters without `base_model.model.` and the adapter name.
        let mut vars: Vec<String> = pm.trainable_vars().into_iter().map(|(k, _)| k).collect();
        vars.sort();
        let mut want: Vec<String> = theirs
            .keys()
            .map(|k| k.strip_prefix("base_model.model.").unwrap().to_string())
            .collect();
        want.sort();
        assert_eq!(vars, want, "{case}: trainable parameters");
        // With the rows as created (the originals) only LoRA moves the model: disable LoRA's B by zeroing it.
        for (k, v) in pm.trainable_vars() {
            if k.contains("lora_B") {
                v.set(&v.as_tensor().zeros_like().unwrap()).unwrap();
            }
        }
        let same = logits(&pm, &ids);
        assert!(
            max_diff(&same, &plain) < 1e-5,
            "{case}: new token rows are not the originals"
        );
        let out = tempfile::tempdir().unwrap();
        pm.save_pretrained(out.path()).unwrap();
        let mine = load_st(&out.path().join("adapter_model.safetensors"));
        for (k, t) in &theirs {
            assert_eq!(mine[k].dims(), t.dims(), "{case}: {k}");
        }
        assert_eq!(
            mine.len(),
            theirs.len(),
            "{case}: {:?}",
            mine.keys().collect::<Vec<_>>()
        );
        // New rows move the lookups of the chosen tokens in the input (and the tied head's logits).
        for (k, v) in pm.trainable_vars() {
            if k.contains("trainable_tokens_delta") {
                v.set(&Tensor::randn(0f32, 1.0, v.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        let moved = logits(&pm, &ids);
        assert!(
            max_diff(&moved, &plain) > 1e-3,
            "{case}: the rows change nothing"
        );
        if pm.model().tied_weights().is_empty() {
            assert!(
                pm.model()
                    .slot("lm_head")
                    .unwrap()
                    .adapter("default")
                    .is_none()
                    || case.ends_with("dict")
            );
        } else if case == "lora_tt_llama_tied" {
            let head = pm
                .model()
                .slot("lm_head")
                .unwrap()
                .adapter("default")
                .unwrap();
            assert!(
                head.vars().is_empty() && head.tensors().is_empty(),
                "{case}: tied head trains or saves"
            );
            // The head's logits of token 30 (not in the input) follow the embedding's new row.
            let col = |t: &Tensor| t.narrow(2, 30, 1).unwrap();
            assert!(
                max_diff(&col(&moved), &col(&plain)) > 1e-3,
                "{case}: the tied head does not follow"
            );
        }
        pm.save_pretrained(out.path()).unwrap();
        let back =
            PeftModel::from_pretrained(base(&dir), out.path(), "default", &Device::Cpu).unwrap();
        assert_eq!(
            max_diff(&logits(&back, &ids), &moved),
            0.0,
            "{case}: reloaded"
        );
    }
}

fn lora_with(extra: &str) -> PeftConfig {
    PeftConfig::from_json_str(&format!(
        r#"{{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "target_modules": ["q_proj"], {extra}}}"#
    ))
    .unwrap()
}

fn create_err(case: &str, extra: &str) -> String {
    let dir = case_dir(case);
    PeftModel::get_peft_model(base(&dir), lora_with(extra), "default", 0)
        .map(|_| ())
        .expect_err(extra)
        .to_string()
}

/// PEFT's errors (a layer that is also a LoRA target, a key that matches nothing, the embedding in
/// `modules_to_save` too) and the refusals where PEFT fails later or does something peft-rs does not (a
/// `modules_to_save` copy, a LoRA target tied to the trainable embedding, an index out of range, a layer that
/// is not an Embedding or Linear); nothing is added on an error.
#[test]
fn peft_errors_are_errors() {
    let cases = [
        (
            "lora_tt_llama",
            r#""target_modules": ["q_proj", "embed_tokens"], "trainable_token_indices": [1]"#,
            "LoRA target",
        ),
        (
            "lora_tt_llama",
            r#""trainable_token_indices": {"q_proj": [1]}"#,
            "LoRA target",
        ),
        (
            "lora_tt_llama",
            r#""trainable_token_indices": {"foo": [1]}"#,
            "not found in the base model",
        ),
        (
            "lora_tt_llama",
            r#""modules_to_save": ["embed_tokens"], "trainable_token_indices": {"embed_tokens": [1]}"#,
            "already marked to be trained fully",
        ),
        (
            "lora_tt_llama",
            r#""modules_to_save": ["embed_tokens"], "trainable_token_indices": [1]"#,
            "modules_to_save",
        ),
        (
            "lora_tt_llama",
            r#""trainable_token_indices": [64]"#,
            "outside the 64 rows",
        ),
        (
            "lora_tt_llama",
            r#""trainable_token_indices": {"input_layernorm": [1]}"#,
            "not an Embedding or Linear",
        ),
        (
            "lora_tt_llama_tied",
            r#""target_modules": ["q_proj", "lm_head"], "trainable_token_indices": [1]"#,
            "tied",
        ),
    ];
    for (case, extra, want) in cases {
        let e = create_err(case, extra);
        assert!(e.contains(want), "{extra}: {e}");
    }
    // `modules_to_save = ["lm_head"]` beside trainable tokens of the embedding works, as in PEFT (untied).
    let dir = case_dir("lora_tt_llama");
    let pm = PeftModel::get_peft_model(
        base(&dir),
        lora_with(r#""modules_to_save": ["lm_head"], "trainable_token_indices": [1, 2]"#),
        "default",
        0,
    )
    .unwrap();
    let mut names: Vec<String> = pm.trainable_vars().into_iter().map(|(k, _)| k).collect();
    names.retain(|k| !k.contains("lora_"));
    names.sort();
    assert_eq!(names.len(), 2, "{names:?}");
    assert!(
        names[1].starts_with("model.embed_tokens.token_adapter"),
        "{names:?}"
    );
}
