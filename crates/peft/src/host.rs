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
    /// `<slot>.weight` / `<slot>.bias`), shape checked.
    fn set_tensor(&mut self, name: &str, value: Tensor) -> Result<()>;
}
