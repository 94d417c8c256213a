//! LoRA+ (PEFT's `peft.optimizers.create_loraplus_optimizer`): LoRA's `B` matrices trained at a larger
//! learning rate than the `A`s.
//!
//! [`loraplus_groups`] sorts the trained parameters into PEFT's four groups, in PEFT's order, for any
//! optimizer here ([`crate::train::AdamW`], [`crate::train::Sgd`]):
//!
//! 1. `groupA`: everything else (the `A`s, 2-D `modules_to_save` weights, …), at `lr`;
//! 2. `embedding`: the weights of a LoRA Embedding layer (`lora_embedding_A` / `lora_embedding_B`), at
//!    [`LoraPlusConfig::lr_embedding`];
//! 3. `groupB`: `lora_B` weights and every other 1-D parameter (DoRA's magnitude, a bias, …), at
//!    `lr · lr_ratio`;
//! 4. `groupB_no_decay`: those of group 3 whose name contains `bias`, at `lr · lr_ratio` without weight decay.
//!
//! Groups 1–3 have [`LoraPlusConfig::weight_decay`] (PEFT's `loraplus_weight_decay`, which replaces the
//! optimizer's own). PEFT also exempts from decay the parameters of `torch.nn.LayerNorm` modules; the Llama
//! family has RMSNorm only (which PEFT does decay), so a rule on names is PEFT's here.
//!
//! ```
//! use candle_core::{Device, Var};
//! use peft::train::loraplus::{LoraPlusConfig, loraplus_groups};
//! use peft::train::optim::{AdamW, AdamWConfig, Optimizer};
//!
//! # fn main() -> peft::Result<()> {
//! let dev = Device::Cpu;
//! let params = vec![
//!     ("q.lora_A.weight".to_string(), Var::zeros((2, 4), candle_core::DType::F32, &dev)?),
//!     ("q.lora_B.weight".to_string(), Var::zeros((4, 2), candle_core::DType::F32, &dev)?),
//! ];
//! let groups = loraplus_groups(params, &LoraPlusConfig { lr_ratio: 16.0, ..Default::default() })?;
//! let opt = AdamW::new(groups, AdamWConfig { lr: 1e-4, ..Default::default() })?;
//! let lrs = opt.group_learning_rates();
//! assert_eq!((lrs[0], lrs[1]), (1e-4, 1e-6));
//! assert!((lrs[2] - 1.6e-3).abs() < 1e-12);
//! # Ok(()) }
//! ```

use super::optim::ParamGroup;
use crate::{PeftError, Result};
use candle_core::Var;

/// PEFT's LoRA+ settings (`create_loraplus_optimizer`'s arguments).
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPlusConfig {
    /// `loraplus_lr_ratio`: the learning rate of the `B` group over the optimizer's (PEFT's paper suggests 16;
    /// no default in PEFT, 16 here).
    pub lr_ratio: f64,
    /// `loraplus_lr_embedding` (default 1e-6): the learning rate of LoRA Embedding weights.
    pub lr_embedding: f64,
    /// `loraplus_weight_decay` (default 0): the weight decay of groups 1–3.
    pub weight_decay: f64,
}

impl Default for LoraPlusConfig {
    fn default() -> Self {
        Self {
            lr_ratio: 16.0,
            lr_embedding: 1e-6,
            weight_decay: 0.0,
        }
    }
}

/// Which LoRA+ group a parameter falls in (0 `groupA`, 1 `embedding`, 2 `groupB`, 3 `groupB_no_decay`), by
/// its name (as [`crate::PeftModel::trainable_vars`] gives it) and its number of dimensions.
pub fn loraplus_group_of(name: &str, ndim: usize) -> usize {
    let last = name.rsplit('.').next().unwrap_or(name);
    if last == "lora_embedding_A" || last == "lora_embedding_B" {
        1
    } else if name.contains("lora_B") || ndim == 1 {
        if name.contains("bias") { 3 } else { 2 }
    } else {
        0
    }
}

/// The four LoRA+ parameter groups of `params` (see the [module documentation](self)); groups 1, 3 and 4
/// follow the optimizer's learning rate (scaled by `lr_ratio` for 3 and 4), group 2 has its own.
pub fn loraplus_groups(
    params: Vec<(String, Var)>,
    config: &LoraPlusConfig,
) -> Result<Vec<ParamGroup>> {
    for (k, v) in [
        ("loraplus_lr_ratio", config.lr_ratio),
        ("loraplus_lr_embedding", config.lr_embedding),
        ("loraplus_weight_decay", config.weight_decay),
    ] {
        if !v.is_finite() || v < 0.0 {
            return Err(PeftError::Invalid(format!(
                "invalid LoRA+ setting {k} = {v}: must be finite and >= 0"
            )));
        }
    }
    let mut split: [Vec<(String, Var)>; 4] = Default::default();
    for (name, var) in params {
        split[loraplus_group_of(&name, var.dims().len())].push((name, var));
    }
    let [a, emb, b, b_no_decay] = split;
    Ok(vec![
        ParamGroup::new(a).weight_decay(config.weight_decay),
        ParamGroup::new(emb)
            .lr(config.lr_embedding)
            .weight_decay(config.weight_decay),
        ParamGroup::new(b)
            .lr_scale(config.lr_ratio)
            .weight_decay(config.weight_decay),
        ParamGroup::new(b_no_decay)
            .lr_scale(config.lr_ratio)
            .weight_decay(0.0),
    ])
}
