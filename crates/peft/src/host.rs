//! What a model exposes so that PEFT's machinery (target matching, injection, set / merge / save) can walk it.
//!
//! A model implements [`AdapterHost`]: its whole module tree by HuggingFace dotted name (containers and norms
//! too, as PyTorch's `named_modules()`), so that target matching behaves like PEFT's, errors included; its
//! adapter slots by name; and its plain tensors by name (for `bias="all"`, `modules_to_save` and saved
//! embeddings). Injection, `set_adapter`, merging and saving all go through this one trait.

use crate::layer::AdapterSlot;
use crate::tuners::tuners_utils::ModuleInfo;
use crate::{PeftConfig, PeftError, PeftRng, Result};
use candle_core::{Tensor, Var};
use indexmap::IndexMap;
use std::path::Path;

/// A prompt-learning adapter (prompt tuning, P-tuning, prefix tuning) held by a [`crate::PeftModel`].
///
/// Prompt learning injects no layer: it changes what the model is fed (virtual token embeddings, or prefix
/// keys and values), so its forward belongs to the model crate. [`crate::PeftModel`] keeps one as a trait
/// object built by [`AdapterHost::prompt_adapter`]; the model crate downcasts it ([`PromptAdapter::as_any`])
/// to run its forward.
pub trait PromptAdapter: Send + Sync + std::fmt::Debug {
    /// The adapter's config (model dimensions filled in, as PEFT writes them).
    fn config(&self) -> &PeftConfig;

    /// The trainable variables by name (PEFT's names: `prompt_encoder.default.embedding.weight`, …).
    fn named_vars(&self) -> Vec<(String, Var)>;

    /// The tensors [`crate::PeftModel::save_pretrained`] writes to `adapter_model.safetensors`, by key
    /// (PEFT's `get_prompt_embedding_to_save`: `prompt_embeddings`).
    fn state_dict(&self) -> Result<Vec<(String, Tensor)>>;

    /// The adapter as [`std::any::Any`], for the model crate to downcast to its own type.
    fn as_any(&self) -> &dyn std::any::Any;
}

/// Where [`AdapterHost::prompt_adapter`] builds a prompt-learning adapter from.
#[derive(Debug)]
pub enum PromptAdapterSource<'a> {
    /// A freshly initialised adapter for training (PEFT's `get_peft_model`), drawing from `rng`;
    /// `init_text_ids` is the tokenized `prompt_tuning_init_text` for prompt tuning's `TEXT` init.
    New {
        /// The generator of the initial values.
        rng: &'a mut PeftRng,
        /// The token ids of `prompt_tuning_init_text` (special tokens included as the tokenizer adds them).
        init_text_ids: Option<&'a [u32]>,
    },
    /// The tensors of a saved adapter directory (PEFT's `from_pretrained`).
    Saved {
        /// `adapter_model.safetensors`, keys as on disk.
        tensors: &'a IndexMap<String, Tensor>,
        /// The directory they were read from (for error messages).
        dir: &'a Path,
    },
}

/// A model that holds adapter slots and exposes its module tree by HuggingFace dotted name.
pub trait AdapterHost: Send + Sync {
    /// Every module (not the root), in `named_modules()` order, with its kind. Adapter slots report the kind
    /// of their base layer; everything else reports a type name (`LlamaRMSNorm`, `LlamaMLP`, `ModuleList`).
    fn module_infos(&self) -> Vec<ModuleInfo>;

    /// The dotted name of the output layer (transformers' `get_output_embeddings()`), which `all-linear`
    /// leaves out.
    fn output_layer(&self) -> Option<String>;

    /// The input embedding's dotted name (transformers' `get_input_embeddings()`).
    fn input_embeddings(&self) -> Option<String>;

    /// Every adapter slot, in tree order.
    fn slots(&self) -> Vec<&AdapterSlot>;

    /// Every adapter slot, mutably, in tree order.
    fn slots_mut(&mut self) -> Vec<&mut AdapterSlot>;

    /// The model's own tensors that are not inside adapter slots, by plain name (`model.norm.weight`).
    fn named_tensors(&self) -> Vec<(String, Tensor)>;

    /// Replaces one of [`AdapterHost::named_tensors`] (or a slot's base weight or bias, by
    /// `<slot>.weight` / `<slot>.bias`), shape checked. For a pair in [`AdapterHost::tied_weights`], setting
    /// either slot's weight must set both.
    fn set_tensor(&mut self, name: &str, value: Tensor) -> Result<()>;

    /// Pairs of slot names whose base weights are **one parameter** in transformers (`tie_word_embeddings`:
    /// `("model.embed_tokens", "lm_head")`), in tree order (the slot PEFT reaches first in `named_modules()`
    /// first). The default: none.
    ///
    /// Both weights must have the same shape and layout, so that one matrix serves both without a transpose:
    /// an `Embedding` weight is `[num_embeddings, dim]` = `[V, D]` and the output `Linear`'s weight is
    /// `[out_features, in_features]` = `[V, D]` too. (A GPT-2 `Conv1D` output layer, `[in, out]`, could not be
    /// tied this way.)
    ///
    /// [`crate::PeftModel`] keeps such a pair consistent, as PEFT's in-place merge into the shared parameter
    /// does: merging an adapter into either slot changes the one matrix both slots see (base + Δ₁ + Δ₂ for
    /// additive adapters; a DoRA adapter merged second computes its norm from the matrix that already holds
    /// the first slot's merge), and unmerging restores both slots to the shared base.
    fn tied_weights(&self) -> Vec<(String, String)> {
        Vec::new()
    }

    /// transformers' `config.model_type` (`"llama"`, `"mistral"`, …), which PEFT uses to pick default target
    /// modules when a config has none. The default: none (PEFT's `"custom"`).
    fn model_type(&self) -> Option<String> {
        None
    }

    /// Builds a prompt-learning adapter for this model (the one extension point of prompt tuning, P-tuning
    /// and prefix tuning: their forward depends on the model). [`crate::PeftModel::get_peft_model`],
    /// [`crate::PeftModel::from_pretrained`] and [`crate::PeftModel::load_adapter`] call it for
    /// prompt-learning configs. The default: an error, this model does not support prompt learning.
    fn prompt_adapter(
        &self,
        config: &PeftConfig,
        source: PromptAdapterSource<'_>,
    ) -> Result<Box<dyn PromptAdapter>> {
        let _ = source;
        Err(PeftError::Unsupported {
            field: "peft_type".into(),
            value: config.peft_type().as_str().into(),
            reason: "this model does not support prompt learning".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host with no modules: it keeps the default prompt-learning hook.
    #[derive(Debug)]
    struct Empty;

    impl AdapterHost for Empty {
        fn module_infos(&self) -> Vec<ModuleInfo> {
            Vec::new()
        }
        fn output_layer(&self) -> Option<String> {
            None
        }
        fn input_embeddings(&self) -> Option<String> {
            None
        }
        fn slots(&self) -> Vec<&AdapterSlot> {
            Vec::new()
        }
        fn slots_mut(&mut self) -> Vec<&mut AdapterSlot> {
            Vec::new()
        }
        fn named_tensors(&self) -> Vec<(String, Tensor)> {
            Vec::new()
        }
        fn set_tensor(&mut self, name: &str, _: Tensor) -> Result<()> {
            Err(PeftError::MissingModule {
                module: name.to_string(),
            })
        }
    }

    #[test]
    fn prompt_learning_on_a_host_without_the_hook_is_an_error() {
        let config = PeftConfig::from_json_value(serde_json::json!({
            "peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2,
        }))
        .unwrap();
        let e = crate::PeftModel::get_peft_model(Empty, config, "default", 0).unwrap_err();
        assert!(
            e.to_string().contains("does not support prompt learning"),
            "{e}"
        );
    }
}
