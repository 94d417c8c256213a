//! Trainable tokens parity with PEFT 0.21.2 on the fixtures of `fixtures/trainable_tokens/` (written by
//! `gen_trainable_tokens.py`, every new row random and perturbed): the embedding's forward with the chosen
//! rows replaced, the tied `lm_head`'s logits, disabled forward, merged weights (rows replaced), unmerge,
//! save → re-load, and `peft merge` without a model.

use crate::common::*;

const CASES: [&str; 3] = ["tt_emb", "tt_llama", "tt_llama_tied"];

layer_method_parity_tests!(
    "trainable_tokens",
    CASES,
    "TRAINABLE_TOKENS",
    parity::MergeChecks::default(),
    |k| k.contains(".trainable_tokens_delta")
);
