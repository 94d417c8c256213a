//! One forward for a Llama with or without adapters: [`CausalLm`], implemented by [`LlamaForCausalLM`] and by
//! [`peft::PeftModel`]`<LlamaForCausalLM>`.
//!
//! Layer adapters (LoRA, IA3, …) live in the model's slots, so the plain forward already runs them. A
//! prompt-learning adapter held by the [`peft::PeftModel`] ([`peft::PeftModel::prompt_adapter`]) changes the
//! inputs instead: [`CausalLm::token_logits`] and [`CausalLm::prefill`] run it when it is there, so that
//! evaluation ([`crate::eval`]), generation ([`crate::generate`]) and training ([`crate::train`]) take one path
//! whatever the method.

use crate::llama::{ForwardInput, KvCache, LlamaForCausalLM};
use crate::prompt_learning::{PromptLearning, prompt_learning_of};
use candle_core::Tensor;
use peft::{ForwardCtx, PeftModel, Result};

/// A causal LM: the base Llama and, optionally, a prompt-learning adapter in front of it.
pub trait CausalLm {
    /// The Llama (adapter slots included).
    fn llama(&self) -> &LlamaForCausalLM;

    /// The prompt-learning adapter, if any.
    fn prompt_learning(&self) -> Option<&PromptLearning>;

    /// The logits of the real tokens, `[B, L, V]` (a prompt-learning adapter's virtual positions cut off:
    /// PEFT's labels are −100 there). `attention_mask` is `[B, L]` over the real tokens.
    fn token_logits(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let model = self.llama();
        match self.prompt_learning() {
            Some(pl) => pl.token_logits(model, input_ids, attention_mask, ctx),
            None => {
                let mut input = ForwardInput::ids(input_ids);
                if let Some(m) = attention_mask {
                    input = input.with_attention_mask(m);
                }
                model.forward(input, ctx)
            }
        }
    }

    /// The first step of generation: runs the prompt (after the virtual tokens or prefix of a
    /// prompt-learning adapter) into the empty `cache` and returns its logits (last position = the next
    /// token's). Later steps decode with [`LlamaForCausalLM::forward`] and the cache alone.
    fn prefill(&self, input_ids: &Tensor, cache: &mut KvCache, ctx: &ForwardCtx) -> Result<Tensor> {
        let model = self.llama();
        match self.prompt_learning() {
            Some(pl) => pl.forward_with_cache(model, input_ids, None, Some(cache), ctx),
            None => model.forward(ForwardInput::ids(input_ids).with_cache(cache), ctx),
        }
    }
}

impl CausalLm for LlamaForCausalLM {
    fn llama(&self) -> &LlamaForCausalLM {
        self
    }

    fn prompt_learning(&self) -> Option<&PromptLearning> {
        None
    }
}

impl CausalLm for PeftModel<LlamaForCausalLM> {
    fn llama(&self) -> &LlamaForCausalLM {
        self.model()
    }

    fn prompt_learning(&self) -> Option<&PromptLearning> {
        prompt_learning_of(self)
    }
}
