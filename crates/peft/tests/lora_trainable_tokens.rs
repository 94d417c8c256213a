//! LoRA's `trainable_token_indices` at PEFT 0.21.2 parity, layer by layer, on the fixtures of
//! `fixtures/lora_trainable_tokens/` (written by `gen_lora_trainable_tokens.py`; LoRA A/B random and every adapter
//! parameter, the token rows included, perturbed): each LoRA layer's and each trainable-tokens layer's forward,
//! disabled forward, merge and unmerge, save → re-load giving PEFT's file (`…token_adapter.trainable_tokens_delta`),
//! and `peft merge` without a model against PEFT's `merge_and_unload`. The tied `lm_head` (which saves nothing)
//! and the whole model's logits are checked in `peft-models`' `lora_trainable_tokens` tests.

use crate::common::*;
use peft::PeftConfig;

const CASES: [&str; 4] = [
    "lora_tt_llama",
    "lora_tt_llama_dict",
    "lora_tt_llama_tied",
    "lora_tt_llama_tied_mismatch",
];

fn for_each_case(f: impl Fn(&std::path::Path, &mut crate::lora_parity::LoadedCase)) {
    parity::for_each_case("lora_trainable_tokens", parity::Expected::Names(&CASES), f);
}

/// The case with different ids for the tied layers: each slot's own merge is not PEFT's merged matrix (both
/// layers write into the one shared matrix); it is checked on the whole model.
fn merges_per_slot(dir: &std::path::Path) -> bool {
    !dir.ends_with("lora_tt_llama_tied_mismatch")
}

#[test]
fn forward_matches_peft_per_layer() {
    for_each_case(|dir, c| {
        let mut tokens = 0;
        for (m, slot) in &c.slots {
            for (_, a) in slot.adapters() {
                let want = if m.ends_with("embed_tokens") || m == "lm_head" {
                    tokens += 1;
                    "TRAINABLE_TOKENS"
                } else {
                    "LORA"
                };
                assert_eq!(a.peft_type(), want, "{}: {m}", dir.display());
            }
        }
        assert!(tokens >= 1, "{}: no trainable tokens", dir.display());
        // Every layer's adapter moves its output (the perturbed rows and random B show).
        parity::assert_forward_matches(dir, c, Some(1e-4))
    });
}

#[test]
fn disabled_forward_is_the_base() {
    for_each_case(parity::assert_disabled_forward_is_base);
}

#[test]
fn merge_and_unmerge_match_peft() {
    let checks = parity::MergeChecks {
        min_change: Some(1e-4),
        forward_after_unmerge: true,
        ..Default::default()
    };
    for_each_case(|dir, c| {
        if merges_per_slot(dir) {
            parity::assert_case_merge_unmerge(dir, c, &checks)
        }
    });
}

#[test]
fn save_reload_gives_the_same_file() {
    for_each_case(|dir, c| {
        parity::assert_save_reload_same(dir, c, |k| {
            k.ends_with(".token_adapter.trainable_tokens_delta")
                || k.ends_with(".lora_A.weight")
                || k.ends_with(".lora_B.weight")
        });
        let keys: Vec<&String> = c.adapters[0].3.keys().collect();
        assert!(
            keys.iter().any(|k| *k
                == "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"),
            "{keys:?}"
        );
    });
}

#[test]
fn merge_files_matches_peft_merge_and_unload() {
    for dir in cases("lora_trainable_tokens") {
        let touched = parity::assert_merge_model_matches(&dir, |k| {
            k.ends_with("embed_tokens.weight") || k.ends_with("lm_head.weight")
        });
        assert!(
            touched >= 1,
            "{}: the embedding is not merged",
            dir.display()
        );
    }
}

/// A weighted merge (`DIR@W`) scales additive deltas; trainable tokens replace rows, so it is refused.
#[test]
fn weighted_merge_is_refused_with_trainable_tokens() {
    let dir = fixtures_dir().join("lora_trainable_tokens/cases/lora_tt_llama/adapter");
    let e =
        peft::merge::MergeAdapter::load(&dir, Some(0.5), &candle_core::Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("additive"), "{e}");
}

/// A file whose token rows name a module `trainable_token_indices` does not name, or whose config lacks the
/// field, is refused when the adapter is built.
#[test]
fn token_rows_must_be_named_by_the_config() {
    let dir = fixtures_dir().join("lora_trainable_tokens/cases/lora_tt_llama_dict");
    let c = crate::lora_parity::load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lm_head"].base().clone();
    let params = &split.modules["lm_head"];
    let mut other = config.to_json_value();
    other["trainable_token_indices"] = serde_json::json!({"embed_tokens": [3, 5]});
    let other = PeftConfig::from_json_value(other).unwrap();
    let e = peft::layer::registry::build_adapter(&other, "lm_head", &base, params).unwrap_err();
    assert!(e.to_string().contains("does not name"), "{e}");
    let mut none = config.to_json_value();
    none["trainable_token_indices"] = serde_json::Value::Null;
    let none = PeftConfig::from_json_value(none).unwrap();
    let e = peft::layer::registry::build_adapter(&none, "lm_head", &base, params).unwrap_err();
    assert!(
        e.to_string().contains("no `trainable_token_indices`"),
        "{e}"
    );
}
