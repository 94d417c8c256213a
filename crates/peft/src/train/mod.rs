//! Model-agnostic training machinery: optimizers, learning-rate schedules, the training step, checkpoints
//! and metrics.
//!
//! - [`optim`]: [`optim::AdamW`] and [`optim::Sgd`] with PyTorch's exact update rules, over parameter groups.
//! - [`loraplus`] and [`lorafa`]: PEFT's `peft.optimizers`: LoRA+'s parameter groups and the LoRA-FA optimizer.
//! - [`schedule`]: transformers' `get_*_schedule_with_warmup` multipliers, stepped like torch's `LambdaLR`.
//! - [`trainer`]: [`trainer::Trainer`]: gradient accumulation, `clip_grad_norm_`, the optimizer step, extra
//!   loss terms and post-step hooks, evaluation.
//! - [`checkpoint`]: atomic checkpoint directories and bit-exact resumption.
//! - [`metrics`]: the JSONL metrics log, the loss-curve SVG and the progress callback type.
//!
//! The model and the data belong to the caller: the trainer only sees named parameters and a closure that
//! returns each micro-batch's loss. Every random draw comes from [`crate::PeftRng`]: dropout through
//! [`crate::ForwardCtx::train`] derived from `(seed, step)`, data order through [`trainer::Trainer::rng_mut`].

pub mod checkpoint;
pub mod lorafa;
pub mod loraplus;
pub mod metrics;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use checkpoint::TrainerState;
pub use metrics::{MetricRecord, MetricsLog, Progress, ProgressCallback};
pub use optim::{AdamW, AdamWConfig, Optimizer, OptimizerState, ParamGroup, Sgd, SgdConfig};
pub use schedule::{LrScheduler, Schedule};
pub use trainer::{MicroBatchGrads, StepReport, Trainer, TrainerSettings};
