//! The extension point every PEFT method plugs into: [`PeftMethod`], implemented by each method's config in
//! `tuners/<method>/model.rs` (PEFT keeps these hooks in the method's `BaseTuner` subclass, `model.py`, and
//! registers the method with `register_peft_method`).
//!
//! The method list in [`crate::tuners`] (one line per method) generates [`PeftType`], the
//! [`PeftConfig`](crate::PeftConfig) enum, the conversions and the dispatch: [`PeftConfig::method`](crate::PeftConfig::method) gives the config as a
//! `&dyn PeftMethod`, and everything else in the crate (injection in [`crate::PeftModel`], the
//! [`crate::layer::registry`], [`crate::merge`], `peft inspect`) calls these hooks instead of matching on the
//! method. Adding a method is one folder under `tuners/` and one line in that list.
//!
//! Every hook has a default that fits a method without it: no shared tensors, not additive, no layers
//! (prompt learning), PEFT's default targets from no table.

use super::PeftType;
use crate::config::common::{TargetFields, TargetModules, TargetSpec};
use crate::config::{LoraBias, PeftConfigBase};
use crate::layer::{Adapter, BaseKind, BaseLayer, Conv2dSpec, NamedTensor};
use crate::{PeftError, PeftRng, Result};
use candle_core::{Device, Tensor};
use indexmap::IndexMap;
use serde_json::{Map, Value};

/// Model-level tensors that a method shares between all its layers, keyed as in an adapter file (VeRA's
/// `base_model.vera_A` / `base_model.vera_B`, VB-LoRA's `base_model.vblora_vector_bank`). Empty for every
/// other method. A shared tensor that is a variable (VB-LoRA's bank) trains: every layer holds that one
/// `Var`, and [`crate::PeftModel::trainable_vars`] lists it once, under its key without `base_model.`.
pub type SharedTensors = IndexMap<String, Tensor>;

/// One targeted layer as the shared-tensor hooks see it ([`PeftMethod::shared_tensors`]): its module name
/// and sizes. The hooks get every targeted layer, in the model's module order (PyTorch's `named_modules()`).
#[derive(Clone, Debug)]
pub struct TargetLayer {
    /// The module's dotted name (`model.layers.0.self_attn.q_proj`).
    pub module: String,
    /// The layer's input features.
    pub in_features: usize,
    /// The layer's output features.
    pub out_features: usize,
    /// The base layer itself where the caller has it (a model does; a merge without a model has only
    /// shapes): FRoD builds a fresh adapter's shared bases from the base weights.
    pub base: Option<BaseLayer>,
}

impl TargetLayer {
    /// The target of `module` with the sizes (and the weights) of `base`.
    pub fn of(module: &str, base: &BaseLayer) -> Self {
        Self {
            module: module.to_string(),
            in_features: base.in_features(),
            out_features: base.out_features(),
            base: Some(base.clone()),
        }
    }
}

/// One tensor of an adapter file as `peft inspect` sees it: its name relative to the module and its shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorInfo<'a> {
    /// The key relative to the module, without the adapter name (`lora_A.weight`, `oft_R.weight`).
    pub name: &'a str,
    /// The shape.
    pub shape: &'a [usize],
}

/// What `peft inspect` shows of one module, computed by [`PeftMethod::summarize_module`] from the config
/// and the file's tensor names and shapes (no tensor data).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ModuleSummary {
    /// The rank, where the method has one (patterns applied).
    pub r: Option<usize>,
    /// The alpha, where the method has one (patterns applied).
    pub alpha: Option<f64>,
    /// The scale of the delta (LoRA: `alpha / r`, rsLoRA `alpha / √r`).
    pub scaling: Option<f64>,
    /// Variant flags (`rslora`, `dora`, `cp`, `block_size=4`, …).
    pub flags: Vec<String>,
}

/// What every config struct has: its method, the common fields and the unknown keys. Implemented for every
/// config struct by the method list in [`crate::tuners`].
pub trait MethodType {
    /// The method (`PeftType::Lora` for `LoraConfig`, …).
    fn peft_type(&self) -> PeftType;

    /// The fields every config has (its `base` field).
    fn base(&self) -> &PeftConfigBase;

    /// The fields every config has, mutably.
    fn base_mut(&mut self) -> &mut PeftConfigBase;

    /// The keys of the file that PEFT 0.21.2's config class does not have, with their values (its `extra`
    /// field).
    fn extra(&self) -> &Map<String, Value>;

    /// The keys of the file that PEFT 0.21.2's config class does not have.
    fn unknown_keys(&self) -> Vec<String> {
        self.extra().keys().cloned().collect()
    }
}

/// One PEFT method: its config's common view and the hooks injection, loading, merging and inspection
/// call. Implemented by the method's config struct (`LoraConfig`, `OftConfig`, …) in
/// `tuners/<method>/model.rs`.
///
/// ```
/// use peft::PeftConfig;
/// let config = PeftConfig::from_json_str(r#"{"peft_type": "LOHA", "target_modules": ["q_proj"]}"#)?;
/// let method = config.method();
/// assert!(method.is_additive());
/// assert_eq!(method.param_prefixes()?[0], "hada_w1_a");
/// assert_eq!(
///     method.default_target_modules("llama"),
///     Some(peft::config::TargetModules::from(["q_proj", "v_proj"]))
/// );
/// # Ok::<(), peft::PeftError>(())
/// ```
pub trait PeftMethod: MethodType + std::fmt::Debug + Send + Sync {
    // ---------------------------------------------------------------- config

    /// PEFT's own consistency checks ([`PeftError::InvalidConfig`]), and every feature peft-rs does not
    /// implement refused by name when set to a non-default value ([`PeftError::Unsupported`]).
    fn validate(&self) -> Result<()>;

    /// The shared target fields, for a config that flattens [`TargetFields`]; the defaults of
    /// [`target_spec`](Self::target_spec), [`set_target_modules`](Self::set_target_modules) and
    /// [`modules_to_save`](Self::modules_to_save) read them.
    fn target_fields(&self) -> Option<&TargetFields> {
        None
    }

    /// The shared target fields, mutably.
    fn target_fields_mut(&mut self) -> Option<&mut TargetFields> {
        None
    }

    /// `modules_to_save`: modules trained in full and saved with the adapter.
    fn modules_to_save(&self) -> Option<&[String]> {
        self.target_fields()?.modules_to_save.as_deref()
    }

    /// Which modules the adapter wraps; `None` for prompt learning, which wraps none.
    fn target_spec(&self) -> Option<TargetSpec<'_>> {
        self.target_fields().map(TargetFields::spec)
    }

    /// Replaces `target_modules` (what PEFT writes back after resolving defaults and `all-linear`); a method
    /// without targets ignores it.
    fn set_target_modules(&mut self, targets: Option<TargetModules>) {
        if let Some(f) = self.target_fields_mut() {
            f.target_modules = targets;
        }
    }

    /// Checks on the raw JSON object before it is parsed (OFT refuses files from before PEFT 0.14).
    fn check_json(_map: &Map<String, Value>, _context: &str) -> Result<()>
    where
        Self: Sized,
    {
        Ok(())
    }

    /// Whether the method is prompt learning (virtual tokens instead of wrapped layers).
    fn is_prompt_learning() -> bool
    where
        Self: Sized,
    {
        false
    }

    // ---------------------------------------------------------------- injection

    /// PEFT's default `target_modules` for a transformers `model_type` (`utils/constants.py`), used when the
    /// config leaves them null. `None`: no default for that model type. The default is LoRA's table
    /// ([`crate::tuners::constants::LORA_TARGET_MODULES`]), which PEFT copies for LoHa, LoKr, OFT and BOFT.
    fn default_target_modules(&self, model_type: &str) -> Option<TargetModules> {
        crate::tuners::constants::lookup(crate::tuners::constants::LORA_TARGET_MODULES, model_type)
    }

    /// Whether a layer whose weight is tied to a targeted one (`lm_head` with tied embeddings) gets the
    /// targeted adapter's [`Adapter::tied_copy`] (PEFT's trainable tokens); `false` by default. A file's
    /// tensors for that layer are then the shared ones and are not read again.
    fn follows_tied_weights(&self) -> bool {
        false
    }

    /// Whether the file holds the tied layer's copy of the shared tensors too (the TRAINABLE_TOKENS method
    /// saves the rows under both names; LoRA's `trainable_token_indices` under the embedding's only). Only
    /// read when [`follows_tied_weights`](Self::follows_tied_weights) is true.
    fn saves_tied_copies(&self) -> bool {
        self.follows_tied_weights()
    }

    /// PEFT's `_prepare_adapter_config`, run before injection: a null `target_modules` takes
    /// [`default_target_modules`](Self::default_target_modules) for the model type. IA3 fills its
    /// feedforward modules too.
    fn prepare_adapter_config(&mut self, model_type: Option<&str>) -> Result<()> {
        if self
            .target_spec()
            .is_some_and(|s| s.target_modules.is_none())
            && let Some(t) = model_type.and_then(|m| self.default_target_modules(m))
        {
            self.set_target_modules(Some(t));
        }
        Ok(())
    }

    /// Whether a new adapter's init moves part of the base weight into the adapter (LoRA's PiSSA and OLoRA):
    /// [`crate::PeftModel`] then replaces each wrapped base weight `W` by `W − ΔW` (the adapter's
    /// [`Adapter::delta_weight`]), so that the model's output is unchanged. `false` by default.
    fn rewrites_base(&self) -> bool {
        false
    }

    /// Called with the base layers about to be wrapped, before their adapters are created (PEFT's VeRA
    /// records `fan_in_fan_out` from them).
    fn note_targets(&mut self, _targets: &[&BaseLayer]) {}

    /// Which biases train with the adapter (LoRA's `bias`); `none` for other methods.
    fn bias(&self) -> LoraBias {
        LoraBias::None
    }

    /// `fan_in_fan_out`: whether a 2-D weight is stored `[in, out]` (GPT-2's Conv1D).
    fn fan_in_fan_out(&self) -> bool {
        false
    }

    // ---------------------------------------------------------------- layers

    /// The parameter names of the method's adapter tensors (the first component after the module name in a
    /// file key), used by [`crate::io::split_keys`]. Prompt learning has none: an error.
    fn param_prefixes(&self) -> Result<&'static [&'static str]> {
        Err(no_layers(self.peft_type()))
    }

    /// Whether the method is additive (`W + ΔW`), so that a merge may scale its delta by a weight.
    fn is_additive(&self) -> bool {
        false
    }

    /// The method's name in messages about merging (`"LORA with DoRA"` where a variant changes what merges).
    fn merge_name(&self) -> String {
        self.peft_type().as_str().to_string()
    }

    /// The model-level tensors the adapter's layers share, from the file's keys outside `base_model.model.`
    /// (`file_shared`; `None` for a freshly created adapter) and every targeted layer, in module order. Keys
    /// under `base_model.` are saved with the adapter when [`saves_shared`](Self::saves_shared) says so;
    /// others are the method's own (UniLoRA's per-layer indices) and never saved. The default: none, and a
    /// file that holds such keys is an error naming them.
    fn shared_tensors(
        &self,
        file_shared: Option<&SharedTensors>,
        _targets: &[TargetLayer],
        _device: &Device,
    ) -> Result<SharedTensors> {
        match file_shared {
            Some(f) if !f.is_empty() => Err(PeftError::UnexpectedKeys(f.keys().cloned().collect())),
            _ => Ok(SharedTensors::new()),
        }
    }

    /// The model-level tensors of a freshly created adapter, drawn from `rng` (the adapter's stream, which
    /// [`crate::PeftModel`] derives from its seed; the per-layer streams are its forks by module name) where
    /// they are random (VB-LoRA's vector bank). The default: [`shared_tensors`](Self::shared_tensors) with
    /// no file (VeRA generates its projections from its own key).
    fn new_shared_tensors(
        &self,
        targets: &[TargetLayer],
        device: &Device,
        _rng: &PeftRng,
    ) -> Result<SharedTensors> {
        self.shared_tensors(None, targets, device)
    }

    /// Whether the method has model-level [`shared_tensors`](Self::shared_tensors) at all (VeRA, VB-LoRA).
    fn shares_tensors(&self) -> bool {
        false
    }

    /// Whether the adapter's layers are the modules its config targets, whatever the file names (PEFT
    /// always injects by the config before loading the tensors): a method whose layers may save nothing
    /// (UniLoRA without `save_indices`). A loader then wraps every targeted module the file does not name,
    /// building it from no tensors. `false` by default: the file's keys name the layers.
    fn layers_from_config(&self) -> bool {
        false
    }

    /// Whether the adapter file holds its [`shared_tensors`](Self::shared_tensors) (VeRA with
    /// `save_projection`).
    fn saves_shared(&self) -> bool {
        false
    }

    /// Builds the adapter of `module` from its saved tensors (keys relative to the module) and the
    /// adapter's shared tensors.
    fn build_adapter(
        &self,
        _module: &str,
        _base: &BaseLayer,
        _tensors: &IndexMap<String, Tensor>,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Err(no_layers(self.peft_type()))
    }

    /// Creates a freshly initialised adapter for `module`; `rng` is the module's own stream.
    fn new_adapter(
        &self,
        _module: &str,
        _base: &BaseLayer,
        _rng: &mut PeftRng,
        _shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        Err(no_layers(self.peft_type()))
    }

    /// The tensors saved for one module, from its adapter's [`Adapter::tensors`] (keys relative to the
    /// module). The default saves them as they are; AdaLoRA trained here keeps the rows its `rank_pattern`
    /// masks select (PEFT's `resize_state_dict_by_rank_pattern`).
    fn saved_tensors(&self, _module: &str, tensors: Vec<NamedTensor>) -> Result<Vec<NamedTensor>> {
        Ok(tensors)
    }

    /// The kind of layer `module` is, for a merge without a model: from its adapter tensors and the base
    /// weight's shape. The default reads LoRA-style `A`/`B` pairs (PEFT's Conv1D is a transposed 2-D
    /// weight) and takes a 4-D weight for a Conv2d.
    fn infer_kind(
        &self,
        _module: &str,
        params: &IndexMap<String, Tensor>,
        wshape: &[usize],
    ) -> Result<BaseKind> {
        infer_kind_from_pairs(params, wshape, self.fan_in_fan_out())
    }

    /// What `peft inspect` shows of one module, from the config and the file's tensors.
    fn summarize_module(&self, _module: &str, _tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        ModuleSummary::default()
    }
}

/// The error of a method without layers (prompt learning) asked for them.
fn no_layers(t: PeftType) -> PeftError {
    PeftError::Unsupported {
        field: "peft_type".into(),
        value: t.as_str().to_string(),
        reason: "this method wraps no layers (prompt learning adds virtual tokens)".into(),
    }
}

/// The default [`PeftMethod::infer_kind`]: embeddings from `lora_embedding_*`, Conv2d from a 4-D weight
/// (groups from `lora_A`), Linear or Conv1D from a 2-D weight and the `A`/`B` shapes.
pub fn infer_kind_from_pairs(
    params: &IndexMap<String, Tensor>,
    wshape: &[usize],
    fan_in_fan_out: bool,
) -> Result<BaseKind> {
    if params.keys().any(|k| k.starts_with("lora_embedding_")) {
        return Ok(BaseKind::Embedding);
    }
    match wshape.len() {
        4 => {
            let groups = match params.get("lora_A.weight") {
                Some(a) if a.rank() == 4 && wshape[1] > 0 && a.dim(1)? % wshape[1] == 0 => {
                    a.dim(1)? / wshape[1]
                }
                _ => 1,
            };
            Ok(BaseKind::Conv2d(Conv2dSpec {
                groups,
                ..Default::default()
            }))
        }
        2 => {
            // LoRA keys end in `.weight`; AdaLoRA's are bare parameters (`lora_A` [r, in], `lora_B` [out, r]).
            let pair = |ka: &str, kb: &str| match (params.get(ka), params.get(kb)) {
                (Some(a), Some(b)) if a.rank() == 2 && b.rank() == 2 => Some((a, b)),
                _ => None,
            };
            let Some((a, b)) =
                pair("lora_A.weight", "lora_B.weight").or_else(|| pair("lora_A", "lora_B"))
            else {
                return Ok(BaseKind::Linear);
            };
            let (i, o) = (a.dim(1)?, b.dim(0)?);
            if wshape == [o, i] && (i != o || !fan_in_fan_out) {
                Ok(BaseKind::Linear)
            } else if wshape == [i, o] {
                Ok(BaseKind::Conv1D)
            } else {
                Ok(BaseKind::Linear) // the adapter's shape check names the mismatch
            }
        }
        _ => Err(PeftError::Invalid(format!(
            "cannot merge into a weight of shape {wshape:?}"
        ))),
    }
}
