//! IA3's hooks (PEFT's `IA3Model`): what it does before injection, default target and feedforward modules by model type
//! (`utils/constants.py`, `TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING` and
//! `TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING`).

use super::config::Ia3Config;
use super::layer::{IA3_L, Ia3Adapter, Ia3Options};
use crate::config::common::{TargetModules, TargetSpec};
use crate::layer::{Adapter, BaseKind, BaseLayer, Conv2dSpec};
use crate::tuners::method::{PeftMethod, SharedTensors};
use crate::{PeftError, PeftRng, Result};
use candle_core::Tensor;
use indexmap::IndexMap;

/// PEFT 0.21.2's default IA3 targets and feedforward modules, by transformers `model_type`.
pub const IA3_DEFAULTS: &[(&str, &[&str], &[&str])] = &[
    ("t5", &["k", "v", "wo"], &["wo"]),
    ("mt5", &["k", "v", "wi_1"], &[]),
    ("gpt2", &["c_attn", "mlp.c_proj"], &["mlp.c_proj"]),
    (
        "bloom",
        &["query_key_value", "mlp.dense_4h_to_h"],
        &["mlp.dense_4h_to_h"],
    ),
    (
        "roberta",
        &["key", "value", "output.dense"],
        &["output.dense"],
    ),
    ("opt", &["q_proj", "k_proj", "fc2"], &["fc2"]),
    ("gptj", &["q_proj", "v_proj", "fc_out"], &["fc_out"]),
    (
        "gpt_neox",
        &["query_key_value", "dense_4h_to_h"],
        &["dense_4h_to_h"],
    ),
    ("gpt_neo", &["q_proj", "v_proj", "c_proj"], &["c_proj"]),
    ("bart", &["q_proj", "v_proj", "fc2"], &["fc2"]),
    ("gpt_bigcode", &["c_attn", "mlp.c_proj"], &["mlp.c_proj"]),
    ("llama", &["k_proj", "v_proj", "down_proj"], &["down_proj"]),
    ("llama4", &["q_proj", "v_proj", "down_proj"], &["down_proj"]),
    (
        "mistral",
        &["k_proj", "v_proj", "down_proj"],
        &["down_proj"],
    ),
    ("mixtral", &["k_proj", "v_proj", "w2"], &["w2"]),
    ("bert", &["key", "value", "output.dense"], &["output.dense"]),
    (
        "deberta-v2",
        &["key_proj", "value_proj", "output.dense"],
        &["output.dense"],
    ),
    ("deberta", &["in_proj", "output.dense"], &["output.dense"]),
    (
        "RefinedWebModel",
        &["query_key_value", "dense_4h_to_h"],
        &["dense_4h_to_h"],
    ),
    (
        "RefinedWeb",
        &["query_key_value", "dense_4h_to_h"],
        &["dense_4h_to_h"],
    ),
    (
        "falcon",
        &["query_key_value", "dense_4h_to_h"],
        &["dense_4h_to_h"],
    ),
    ("phi", &["q_proj", "v_proj", "fc2"], &["fc2"]),
    ("gemma", &["q_proj", "v_proj", "down_proj"], &["down_proj"]),
    ("gemma2", &["q_proj", "v_proj", "down_proj"], &["down_proj"]),
    (
        "gemma3_text",
        &["q_proj", "v_proj", "down_proj"],
        &["down_proj"],
    ),
    ("qwen2", &["q_proj", "v_proj", "down_proj"], &["down_proj"]),
    ("qwen3", &["q_proj", "v_proj", "down_proj"], &["down_proj"]),
];

fn list(items: &[&str]) -> TargetModules {
    TargetModules::List(items.iter().map(|s| s.to_string()).collect())
}

/// PEFT's `IA3Model._prepare_adapter_config`: a `null` `target_modules` or `feedforward_modules` takes the
/// default of the model type (`None`: a model without one, PEFT's `"custom"`); a type without a default is an
/// error naming the field. Note that PEFT fills `feedforward_modules` from the table even when
/// `target_modules` was given.
pub fn prepare_adapter_config(config: &mut Ia3Config, model_type: Option<&str>) -> Result<()> {
    let defaults = model_type.and_then(|t| IA3_DEFAULTS.iter().find(|(m, _, _)| *m == t));
    if config.target_modules.is_none() {
        let (_, targets, _) = defaults.ok_or_else(|| {
            PeftError::InvalidConfig("Please specify `target_modules` in `peft_config`".into())
        })?;
        config.target_modules = Some(list(targets));
    }
    if config.feedforward_modules.is_none() {
        let (_, _, ff) = defaults.ok_or_else(|| {
            PeftError::InvalidConfig("Please specify `feedforward_modules` in `peft_config`".into())
        })?;
        config.feedforward_modules = Some(list(ff));
    }
    Ok(())
}

impl PeftMethod for Ia3Config {
    fn validate(&self) -> Result<()> {
        Ia3Config::validate(self)
    }

    fn modules_to_save(&self) -> Option<&[String]> {
        self.modules_to_save.as_deref()
    }

    fn target_spec(&self) -> Option<TargetSpec<'_>> {
        Some(Ia3Config::target_spec(self))
    }

    fn set_target_modules(&mut self, targets: Option<TargetModules>) {
        self.target_modules = targets;
    }

    /// None from LoRA's table: IA3 fills its targets together with its feedforward modules from its own table
    /// ([`IA3_DEFAULTS`]) in [`prepare_adapter_config`].
    fn default_target_modules(&self, _model_type: &str) -> Option<TargetModules> {
        None
    }

    fn prepare_adapter_config(&mut self, model_type: Option<&str>) -> Result<()> {
        prepare_adapter_config(self, model_type)
    }

    fn fan_in_fan_out(&self) -> bool {
        self.fan_in_fan_out
    }

    fn param_prefixes(&self) -> Result<&'static [&'static str]> {
        Ok(&[IA3_L])
    }

    fn build_adapter(
        &self,
        module: &str,
        base: &BaseLayer,
        tensors: &IndexMap<String, Tensor>,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        let opts = Ia3Options::from_config(self, module)?;
        Ok(Box::new(Ia3Adapter::from_tensors(base, opts, tensors)?))
    }

    fn new_adapter(
        &self,
        module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        let opts = Ia3Options::from_config(self, module)?;
        Ok(Box::new(Ia3Adapter::new(base, opts, rng)?))
    }

    fn infer_kind(
        &self,
        module: &str,
        params: &IndexMap<String, Tensor>,
        wshape: &[usize],
    ) -> Result<BaseKind> {
        infer_ia3_kind(self, module, params, wshape)
    }
}

/// The layer kind of an IA3 module: Conv2d for a 4-D weight (groups from a feedforward vector, which spans
/// every input channel), else Linear or Conv1D from where the vector's length sits in the weight's shape
/// (`[out, in]` or `[in, out]`); a square weight is a Conv1D when the config says `fan_in_fan_out` (PEFT sets
/// it for Conv1D targets and saves it).
fn infer_ia3_kind(
    config: &Ia3Config,
    module: &str,
    params: &IndexMap<String, Tensor>,
    wshape: &[usize],
) -> Result<BaseKind> {
    let ff = super::layer::is_feedforward(config, module)?;
    let n = params
        .get(super::layer::IA3_L)
        .map(|l| l.elem_count());
    match wshape.len() {
        4 => {
            let groups = match n {
                Some(n) if ff && wshape[1] > 0 && n % wshape[1] == 0 => n / wshape[1],
                _ => 1,
            };
            Ok(BaseKind::Conv2d(Conv2dSpec {
                groups,
                ..Default::default()
            }))
        }
        2 => {
            // The axis of the vector's length in a Linear weight `[out, in]`; a Conv1D has the other one.
            let (lin, c1d) = if ff { (1, 0) } else { (0, 1) };
            Ok(match n {
                Some(n) if wshape[c1d] == n && (wshape[lin] != n || config.fan_in_fan_out) => {
                    BaseKind::Conv1D
                }
                _ => BaseKind::Linear, // the adapter's shape check names a mismatch
            })
        }
        _ => Err(PeftError::Invalid(format!(
            "cannot merge into a weight of shape {wshape:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_defaults_and_errors() {
        let mut c = Ia3Config::default();
        prepare_adapter_config(&mut c, Some("llama")).unwrap();
        assert_eq!(
            c.target_modules,
            Some(list(&["k_proj", "v_proj", "down_proj"]))
        );
        assert_eq!(c.feedforward_modules, Some(list(&["down_proj"])));
        let mut c = Ia3Config::default();
        let e = prepare_adapter_config(&mut c, None).unwrap_err();
        assert!(e.to_string().contains("target_modules"), "{e}");
        let mut c = Ia3Config {
            target_modules: Some(list(&["fc1"])),
            ..Default::default()
        };
        let e = prepare_adapter_config(&mut c, Some("custom")).unwrap_err();
        assert!(e.to_string().contains("feedforward_modules"), "{e}");
        // explicit targets on a Llama still get Llama's feedforward default, as in PEFT
        let mut c = Ia3Config {
            target_modules: Some(list(&["q_proj", "down_proj"])),
            ..Default::default()
        };
        prepare_adapter_config(&mut c, Some("llama")).unwrap();
        assert_eq!(c.feedforward_modules, Some(list(&["down_proj"])));
    }
}
