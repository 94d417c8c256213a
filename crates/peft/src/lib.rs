//! # peft
//!
//! Parameter-efficient fine-tuning on [candle](https://github.com/huggingface/candle), with the same adapter
//! files and the same numbers as HuggingFace PEFT 0.21.2.
//!
//! The map of the crate:
//! - [`config`]: `adapter_config.json` as [`PeftConfig`], one struct per method, PEFT's names and defaults.
//! - [`tuners`]: one folder per method (as PEFT's `tuners/`), plus [`tuners::tuners_utils`] (target matching).
//! - [`layer`]: the adapter slot a model holds instead of a Linear / Embedding / Conv2d / GPT-2 Conv1D, and the
//!   [`layer::Adapter`] trait every method implements.
//! - [`io`]: reading and writing adapter directories exactly as PEFT does.
//! - [`merge`]: merging adapters into base weights by tensor name, without a model.
//! - [`varbuilder`]: serving merged weights to unmodified candle-transformers models.
//! - [`rng`]: the one seeded generator all random draws come from.
//! - [`host`]: the [`host::AdapterHost`] trait a model implements so that injection, merging and saving can
//!   walk it.
//! - [`peft_model`]: [`PeftModel`], adapters injected by name and managed like PEFT's `PeftModel`.
//! - [`ops`]: differentiable building blocks the adapters need (frozen linear, batched inverse) with gradients,
//!   and the helpers CPU custom ops are built on ([`ops::cpu`]); the model-only ops (RMSNorm, softmax, RoPE,
//!   SwiGLU, cross-entropy) are in `peft_models::ops`.
//! - `kernels` (crate-private): in-place CPU kernels behind the unmerged LoRA / AdaLoRA forward and
//!   `BaseLayer`'s linear.
//! - [`train`]: optimizers (PyTorch-exact AdamW, SGD), LR schedules, the trainer, checkpoints and metrics.

pub mod config;
pub mod error;
pub mod host;
pub mod io;
pub(crate) mod kernels;
pub mod layer;
pub mod merge;
pub mod merge_utils;
pub mod ops;
pub mod peft_model;
pub mod quant;
pub mod rng;
pub mod train;
pub mod tuners;
pub mod varbuilder;

pub use config::PeftConfig;
pub use error::{PeftError, Result};
pub use layer::{Adapter, AdapterSlot, BaseKind, BaseLayer, ForwardCtx};
pub use peft_model::PeftModel;
pub use rng::PeftRng;

/// The README's Rust snippets, compiled as doctests so they stay true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
