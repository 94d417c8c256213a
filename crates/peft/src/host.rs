//! What a model exposes so that PEFT's machinery (target matching, injection, set / merge / save) can walk it.
//!
//! A model implements [`AdapterHost`]: its whole module tree by HuggingFace dotted name (containers and norms
//! too, as PyTorch's `named_modules()`), so that target matching behaves like PEFT's, errors included; its
//! adapter slots by name; and its plain tensors by name (for `bias="all"`, `modules_to_save` and saved
//! embeddings). Injection, `set_adapter`, merging and saving all go through this one trait.

use crate::Result;
use crate::layer::AdapterSlot;
use crate::tuners::tuners_utils::ModuleInfo;
use candle_core::Tensor;

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
}
