//! [`PeftModel`]: adapters injected into a model by name, managed as PEFT's `PeftModel` / `BaseTuner` do.
//!
//! It wraps any [`AdapterHost`] (a model that exposes its module tree and adapter slots by HuggingFace
//! dotted name): [`PeftModel::get_peft_model`] injects a fresh adapter by target matching,
//! [`PeftModel::from_pretrained`] / [`PeftModel::load_adapter`] load PEFT adapter directories, and
//! `set_adapter`, `delete_adapter`, disabling, `merge_adapter` / `unmerge_adapter`, `merge_and_unload` and
//! `save_pretrained` behave like their PEFT namesakes.

use crate::config::{LoraBias, PeftConfig, TargetModules};
use crate::host::{AdapterHost, PromptAdapter, PromptAdapterSource};
use crate::io::{
    AdapterFile, AdapterToSave, adapter_state_dict, load_adapter, save_adapters, split_keys,
};
use crate::layer::Adapter;
use crate::layer::modules_to_save::ModulesToSave;
use crate::layer::registry;
use crate::tuners::TargetLayer;
use crate::tuners::trainable_tokens::TrainableTokensAdapter;
use crate::tuners::tuners_utils::{ModuleKind, resolve_targets};
use crate::{PeftError, PeftRng, Result};
use candle_core::{Device, Tensor, Var};
use indexmap::IndexMap;
use std::collections::HashSet;
use std::path::Path;

/// The names PEFT treats as embedding layers when deciding to save their base matrices
/// (`EMBEDDING_LAYER_NAMES`).
const EMBEDDING_LAYER_NAMES: [&str; 2] = ["embed_tokens", "lm_head"];

/// A model with named adapters, as PEFT's `PeftModel`.
///
/// Any [`AdapterHost`] works; here a two-layer model written in a few lines, with LoRA on one layer: inject,
/// save, reload into a fresh model, merge.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use peft::config::{LoraConfig, LoraFields, TargetFields};
/// use peft::host::AdapterHost;
/// use peft::tuners::tuners_utils::{ModuleInfo, ModuleKind};
/// use peft::{AdapterSlot, BaseLayer, ForwardCtx, PeftModel};
///
/// #[derive(Debug)]
/// struct Mlp { slots: Vec<AdapterSlot> }
/// impl Mlp {
///     fn new() -> peft::Result<Self> {
///         let w = |o: usize, i: usize| Tensor::arange(0f32, (o * i) as f32, &Device::Cpu)?.reshape((o, i));
///         Ok(Self { slots: vec![
///             AdapterSlot::new("fc1", BaseLayer::linear((w(8, 4)? * 0.01)?, None)?),
///             AdapterSlot::new("fc2", BaseLayer::linear((w(2, 8)? * 0.01)?, None)?),
///         ] })
///     }
///     fn forward(&self, x: &Tensor) -> peft::Result<Tensor> {
///         let ctx = ForwardCtx::eval();
///         self.slots[1].forward(&self.slots[0].forward(x, &ctx)?.relu()?, &ctx)
///     }
/// }
/// impl AdapterHost for Mlp {
///     fn module_infos(&self) -> Vec<ModuleInfo> {
///         self.slots.iter().map(|s| ModuleInfo { name: s.name().into(), kind: ModuleKind::Linear }).collect()
///     }
///     fn output_layer(&self) -> Option<String> { None }
///     fn input_embeddings(&self) -> Option<String> { None }
///     fn slots(&self) -> Vec<&AdapterSlot> { self.slots.iter().collect() }
///     fn slots_mut(&mut self) -> Vec<&mut AdapterSlot> { self.slots.iter_mut().collect() }
///     fn named_tensors(&self) -> Vec<(String, Tensor)> { Vec::new() }
///     fn set_tensor(&mut self, name: &str, _: Tensor) -> peft::Result<()> {
///         Err(peft::PeftError::MissingKey(name.into()))
///     }
/// }
///
/// # fn main() -> peft::Result<()> {
/// let config = LoraConfig {
///     lora: LoraFields {
///         r: 2,
///         init_lora_weights: peft::config::InitLoraWeights::Bool(false), // random B: a visible delta
///         ..Default::default()
///     },
///     targets: TargetFields::modules(["fc1"]),
///     ..Default::default()
/// };
/// let pm = PeftModel::get_peft_model(Mlp::new()?, config.into(), "default", 0)?;
/// let x = Tensor::ones((3, 4), DType::F32, &Device::Cpu)?;
/// let y = pm.model().forward(&x)?;
///
/// let dir = std::env::temp_dir().join(format!("peft-doc-{}", std::process::id()));
/// pm.save_pretrained(&dir)?; // adapter_config.json + adapter_model.safetensors, as PEFT writes them
/// let reloaded = PeftModel::from_pretrained(Mlp::new()?, &dir, "default", &Device::Cpu)?;
/// let diff = |a: &Tensor, b: &Tensor| -> peft::Result<f32> {
///     Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?)
/// };
/// assert!(diff(&reloaded.model().forward(&x)?, &y)? < 1e-6);
///
/// let merged = reloaded.merge_and_unload(None)?; // a plain model with W + s·BA
/// assert!(diff(&merged.forward(&x)?, &y)? < 1e-5);
/// assert!(diff(&Mlp::new()?.forward(&x)?, &y)? > 1e-4); // the adapter did change the output
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct PeftModel<M: AdapterHost> {
    model: M,
    configs: IndexMap<String, PeftConfig>,
    active: Vec<String>,
    seed: u64,
    /// The shared base matrix of each tied slot pair ([`AdapterHost::tied_weights`]) as it was before the
    /// first merge into it, restored by [`PeftModel::unmerge_adapter`].
    tied_bases: IndexMap<(String, String), Tensor>,
    /// Biases trained in place (`bias = "all"` / `"lora_only"`), by their plain model name. They belong to
    /// the model, not to an adapter, as in PEFT: disabling adapters does not undo them.
    bias_vars: IndexMap<String, Var>,
    /// Each adapter's model-level shared tensors ([`registry::shared_tensors`]: VeRA's projections), saved
    /// with the adapter when its method does ([`registry::saves_shared`]).
    shared: IndexMap<String, registry::SharedTensors>,
    /// The prompt-learning adapter and its name, when the model has one ([`PeftModel::prompt_adapter`]). It
    /// is never combined with other adapters, as in PEFT.
    prompt: Option<(String, Box<dyn PromptAdapter>)>,
}

/// The trainable-parameter report of [`PeftModel::trainable_parameters`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParameterCount {
    /// Parameters of the active adapters (what trains).
    pub trainable: usize,
    /// Every parameter: base model and all adapters (shared storage counted once).
    pub all: usize,
}

impl std::fmt::Display for ParameterCount {
    /// PEFT's `print_trainable_parameters` line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pct = if self.all == 0 {
            0.0
        } else {
            100.0 * self.trainable as f64 / self.all as f64
        };
        write!(
            f,
            "trainable params: {} || all params: {} || trainable%: {pct:.4}",
            thousands(self.trainable),
            thousands(self.all)
        )
    }
}

fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// What an adapter file builds for a model: see `PeftModel::build_from_file`.
struct Built {
    adapters: Vec<(String, Box<dyn Adapter>)>,
    replaced: Vec<(String, Tensor)>,
    shared: registry::SharedTensors,
}

/// PEFT's `check_hotswap_configs_compatible`: the same `peft_type`, LoRA only, and equal `use_rslora`,
/// `lora_dropout`, `alpha_pattern`, `use_dora`.
fn check_hotswap_configs(old: &PeftConfig, new: &PeftConfig) -> Result<()> {
    let (a, b) = (old.peft_type(), new.peft_type());
    if a != b {
        return Err(PeftError::Invalid(format!(
            "Incompatible PEFT types found: {} and {}",
            a.as_str(),
            b.as_str()
        )));
    }
    if a != crate::config::PeftType::Lora {
        return Err(PeftError::Invalid(format!(
            "Hotswapping only supports LORA but {} was passed",
            a.as_str()
        )));
    }
    let (va, vb) = (old.to_json_value(), new.to_json_value());
    for key in ["use_rslora", "lora_dropout", "alpha_pattern", "use_dora"] {
        if va.get(key) != vb.get(key) {
            return Err(PeftError::Invalid(format!(
                "Configs are incompatible: for {key}, {} != {}",
                va.get(key).map(|v| v.to_string()).unwrap_or("unset".into()),
                vb.get(key).map(|v| v.to_string()).unwrap_or("unset".into())
            )));
        }
    }
    Ok(())
}

/// Whether a module's file tensors are LoRA's trainable tokens (`token_adapter.…`, checked against
/// `trainable_token_indices` when the adapter is built), not LoRA layers the config must target.
pub(crate) fn is_lora_token_module(config: &PeftConfig, params: &IndexMap<String, Tensor>) -> bool {
    matches!(config, PeftConfig::Lora(_))
        && crate::tuners::lora::model::is_token_adapter_module(params)
}

/// PEFT's `_set_trainable` match: a module is a `modules_to_save` copy when its name ends with an entry.
fn is_module_to_save(name: &str, entries: &[String]) -> bool {
    entries
        .iter()
        .any(|e| name == e || name.ends_with(&format!(".{e}")))
}

impl<M: AdapterHost> PeftModel<M> {
    /// A model with no adapters yet; `seed` drives every adapter initialisation.
    pub fn new(model: M, seed: u64) -> Self {
        Self {
            model,
            configs: IndexMap::new(),
            active: Vec::new(),
            seed,
            tied_bases: IndexMap::new(),
            bias_vars: IndexMap::new(),
            shared: IndexMap::new(),
            prompt: None,
        }
    }

    /// PEFT's `get_peft_model`: injects a freshly initialised adapter named `adapter_name`. A prompt-learning
    /// config (prompt tuning, P-tuning, prefix tuning) becomes the model's prompt adapter instead, built by
    /// the model ([`AdapterHost::prompt_adapter`]); see [`PeftModel::add_prompt_adapter`].
    pub fn get_peft_model(
        model: M,
        config: PeftConfig,
        adapter_name: &str,
        seed: u64,
    ) -> Result<Self> {
        let mut me = Self::new(model, seed);
        me.add_adapter(adapter_name, config)?;
        Ok(me)
    }

    /// PEFT's `PeftModel.from_pretrained`: loads the adapter directory `dir` as `adapter_name` and makes it
    /// active. Prompt-learning adapters load too, through [`AdapterHost::prompt_adapter`].
    pub fn from_pretrained(
        model: M,
        dir: impl AsRef<Path>,
        adapter_name: &str,
        device: &Device,
    ) -> Result<Self> {
        let mut me = Self::new(model, 0);
        me.load_adapter(dir, adapter_name, device)?;
        Ok(me)
    }

    /// The wrapped model.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The wrapped model, mutably.
    pub fn model_mut(&mut self) -> &mut M {
        &mut self.model
    }

    /// The adapters' configs by name, in the order they were added.
    pub fn configs(&self) -> &IndexMap<String, PeftConfig> {
        &self.configs
    }

    /// Records the rank allocation an AdaLoRA adapter was trained to (the masks of
    /// [`crate::tuners::adalora::AdaLoraAllocator::rank_pattern`]) in its config's `rank_pattern`, as PEFT's
    /// `update_and_allocate` does: [`PeftModel::save_pretrained`] then writes the masks and the kept rows only.
    pub fn set_adalora_rank_pattern(
        &mut self,
        adapter: &str,
        pattern: IndexMap<String, Vec<bool>>,
    ) -> Result<()> {
        match self.configs.get_mut(adapter) {
            Some(PeftConfig::AdaLora(c)) => {
                c.rank_pattern = Some(pattern);
                Ok(())
            }
            Some(_) => Err(PeftError::Invalid(format!(
                "adapter `{adapter}` is not an AdaLoRA adapter"
            ))),
            None => Err(PeftError::UnknownAdapter(adapter.to_string())),
        }
    }

    /// The active adapters, in the order they apply.
    pub fn active_adapters(&self) -> &[String] {
        &self.active
    }

    /// PEFT's check of `adapter_names` for a mixed batch ([`crate::ForwardCtx::with_adapter_names`]): every
    /// name other than `"__base__"` must be an adapter some layer holds, else an error listing the unknown
    /// ones (sorted), as PEFT's "Trying to infer with non-existing adapter(s)".
    pub fn check_adapter_names(&self, names: &[impl AsRef<str>]) -> Result<()> {
        let mut unknown: Vec<&str> = names
            .iter()
            .map(|n| n.as_ref())
            .filter(|n| *n != crate::layer::BASE_ADAPTER_NAME)
            .filter(|n| !self.model.slots().iter().any(|s| s.adapter(n).is_some()))
            .collect();
        unknown.sort();
        unknown.dedup();
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(PeftError::Invalid(format!(
                "Trying to infer with non-existing adapter(s): {}",
                unknown.join(", ")
            )))
        }
    }

    /// The prompt-learning adapter (prompt tuning, P-tuning, prefix tuning), if the model has one: the model
    /// crate runs its forward (downcasting [`PromptAdapter::as_any`] to its own type).
    pub fn prompt_adapter(&self) -> Option<&dyn PromptAdapter> {
        self.prompt.as_ref().map(|(_, p)| p.as_ref())
    }

    /// The name of the prompt-learning adapter, if any.
    pub fn prompt_adapter_name(&self) -> Option<&str> {
        self.prompt.as_ref().map(|(n, _)| n.as_str())
    }

    fn prompt_combine_error(&self, other: &str) -> PeftError {
        let (p, what) = match &self.prompt {
            Some((p, _)) => (p.as_str(), other),
            None => (other, self.configs.keys().next().map_or("", |s| s.as_str())),
        };
        PeftError::Invalid(format!(
            "a prompt-learning adapter (`{p}`) cannot be combined with other adapters (`{what}`)"
        ))
    }

    /// Adds a freshly initialised prompt-learning adapter built by the model ([`AdapterHost::prompt_adapter`]);
    /// `init_text_ids` is the tokenized `prompt_tuning_init_text` for prompt tuning's `TEXT` init (PEFT
    /// tokenizes it with `tokenizer_name_or_path`). It becomes active. Refused when the model already has
    /// adapters: prompt learning is not combined with others.
    pub fn add_prompt_adapter(
        &mut self,
        name: &str,
        config: PeftConfig,
        init_text_ids: Option<&[u32]>,
    ) -> Result<()> {
        if self.prompt.is_some() || !self.configs.is_empty() {
            return Err(self.prompt_combine_error(name));
        }
        config.validate()?;
        let mut rng = PeftRng::new(self.seed).fork("prompt_learning");
        let adapter = self.model.prompt_adapter(
            &config,
            PromptAdapterSource::New {
                rng: &mut rng,
                init_text_ids,
            },
        )?;
        self.prompt = Some((name.to_string(), adapter));
        self.active = vec![name.to_string()];
        Ok(())
    }

    fn check_new_name(&self, name: &str, config: &PeftConfig) -> Result<()> {
        if self.prompt.is_some() {
            return Err(self.prompt_combine_error(name));
        }
        if self.configs.contains_key(name) {
            return Err(PeftError::DuplicateAdapter(name.to_string()));
        }
        config.validate()
    }

    /// Adds a freshly initialised adapter, injected by target matching (PEFT's `add_adapter`). The first
    /// adapter becomes active; later ones are added inactive, as in PEFT.
    pub fn add_adapter(&mut self, name: &str, mut config: PeftConfig) -> Result<()> {
        if config.is_prompt_learning() {
            return self.add_prompt_adapter(name, config, None);
        }
        self.check_new_name(name, &config)?;
        let bias_mode = config.method().bias();
        let model_type = self.model.model_type();
        config
            .method_mut()
            .prepare_adapter_config(model_type.as_deref())?;
        let modules = self.model.module_infos();
        let output = self.model.output_layer();
        let spec = config
            .target_spec()
            .ok_or_else(|| PeftError::Invalid("no target modules".into()))?;
        let resolved = resolve_targets(
            &spec,
            &modules,
            output.as_deref(),
            config.peft_type().as_str(),
        )?;
        let mts: Vec<String> = config
            .modules_to_save()
            .map(|m| m.to_vec())
            .unwrap_or_default();
        config.set_target_modules(resolved.target_modules.clone());
        let targeted: HashSet<&str> = resolved.targeted.iter().map(|s| s.as_str()).collect();
        // Build every adapter first, so that a failure leaves the model unchanged.
        let mut rng = PeftRng::new(self.seed).fork(name);
        let mut built = Vec::new();
        let shared = {
            let slots = self.model.slots();
            let targets: Vec<_> = slots
                .iter()
                .filter(|s| targeted.contains(s.name()))
                .collect();
            let dims: Vec<TargetLayer> = targets
                .iter()
                .map(|s| TargetLayer::of(s.name(), s.base()))
                .collect();
            let device = targets
                .first()
                .map(|s| s.base().device().clone())
                .unwrap_or(Device::Cpu);
            let bases: Vec<_> = targets.iter().map(|s| s.base()).collect();
            config.method_mut().note_targets(&bases);
            registry::new_shared_tensors(&config, &dims, &device, &rng)?
        };
        for slot in self.model.slots() {
            if targeted.contains(slot.name()) {
                let a = registry::new_adapter_with_shared(
                    &config,
                    slot.name(),
                    slot.base(),
                    &mut rng,
                    &shared,
                )?;
                built.push((slot.name().to_string(), a));
            } else if is_module_to_save(slot.name(), &mts) {
                built.push((
                    slot.name().to_string(),
                    Box::new(ModulesToSave::from_base(slot.base())?) as _,
                ));
            }
        }
        let slot_names: HashSet<String> = self
            .model
            .slots()
            .iter()
            .map(|s| s.name().to_string())
            .collect();
        for m in &modules {
            if is_module_to_save(&m.name, &mts)
                && !slot_names.contains(&m.name)
                && !matches!(m.kind, ModuleKind::Other(_))
            {
                return Err(PeftError::Invalid(format!(
                    "modules_to_save: `{}` is not an adapter slot",
                    m.name
                )));
            }
            if is_module_to_save(&m.name, &mts) && matches!(m.kind, ModuleKind::Other(_)) {
                return Err(PeftError::Unsupported {
                    field: "modules_to_save".into(),
                    value: m.name.clone(),
                    reason: format!("full copies of {} modules are not implemented yet", m.kind),
                });
            }
        }
        built.extend(self.lora_trainable_tokens(&config, &targeted, &mts)?);
        self.add_tied_copies(&config, &mut built)?;
        let residuals = self.rewritten_bases(&config, &built)?;
        for (module, w) in residuals {
            self.slot_mut(&module)?.set_base_tensors(Some(w), None)?;
        }
        for (module, adapter) in built {
            let slot = self.slot_mut(&module)?;
            slot.add_adapter(name, adapter)?;
        }
        self.make_biases_trainable(bias_mode, &targeted)?;
        self.shared.insert(name.to_string(), shared);
        self.configs.insert(name.to_string(), config);
        if self.active.is_empty() {
            self.set_adapter(&[name])?;
        } else {
            let active: Vec<String> = self.active.clone();
            let refs: Vec<&str> = active.iter().map(|s| s.as_str()).collect();
            self.set_adapter(&refs)?;
        }
        Ok(())
    }

    /// For a config whose init rewrites the base ([`PeftMethod::rewrites_base`]: PiSSA, OLoRA), the new base
    /// weight of each module that gets one of `built`'s adapters of that method: `W − ΔW` in f32, rounded
    /// once to the weight's dtype (PEFT's `weight.data - scaling * lora_B @ lora_A`).
    fn rewritten_bases(
        &self,
        config: &PeftConfig,
        built: &[(String, Box<dyn Adapter>)],
    ) -> Result<Vec<(String, Tensor)>> {
        if !config.method().rewrites_base() {
            return Ok(Vec::new());
        }
        let method = config.peft_type().as_str();
        let slots = self.model.slots();
        let mut out = Vec::new();
        for (module, adapter) in built {
            if adapter.peft_type() != method {
                continue;
            }
            let slot = slots.iter().find(|s| s.name() == module).ok_or_else(|| {
                PeftError::MissingModule {
                    module: module.clone(),
                }
            })?;
            if !slot.merged().is_empty() {
                return Err(PeftError::Invalid(format!(
                    "`{module}` has merged adapters: unmerge them before an initialisation that rewrites the base"
                )));
            }
            out.push((
                module.clone(),
                crate::tuners::lora::rewrite_init::residual_weight(
                    adapter.as_ref(),
                    slot.base(),
                    module,
                )?,
            ));
        }
        Ok(out)
    }

    /// PEFT's `_mark_only_adapters_as_trainable` for `bias`: `"lora_only"` trains the biases of the targeted
    /// layers, `"all"` every bias of the model. Each becomes a `Var` in place (once, shared by adapters).
    fn make_biases_trainable(&mut self, mode: LoraBias, targeted: &HashSet<&str>) -> Result<()> {
        if mode == LoraBias::None {
            return Ok(());
        }
        let mut new_vars = Vec::new();
        for slot in self.model.slots_mut() {
            let name = format!("{}.bias", slot.name());
            let wanted = mode == LoraBias::All || targeted.contains(slot.name());
            if !wanted || self.bias_vars.contains_key(&name) {
                continue;
            }
            if let Some(b) = slot.base().bias() {
                let v = Var::from_tensor(b)?;
                slot.set_base_tensors(None, Some(v.as_tensor().clone()))?;
                new_vars.push((name, v));
            }
        }
        if mode == LoraBias::All {
            for (name, t) in self.model.named_tensors() {
                if name.ends_with(".bias") && !self.bias_vars.contains_key(&name) {
                    let v = Var::from_tensor(&t)?;
                    self.model.set_tensor(&name, v.as_tensor().clone())?;
                    new_vars.push((name, v));
                }
            }
        }
        self.bias_vars.extend(new_vars);
        Ok(())
    }

    fn slot_mut(&mut self, name: &str) -> Result<&mut crate::AdapterSlot> {
        self.model
            .slots_mut()
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| PeftError::MissingModule {
                module: name.to_string(),
            })
    }

    /// Loads a PEFT adapter directory as `name` (PEFT's `load_adapter`). Model tensors the file replaces
    /// (trained biases, saved embedding matrices) are written into the model; `modules_to_save` copies
    /// become adapters of their slots. Every module the file names must exist in the model.
    pub fn load_adapter(
        &mut self,
        dir: impl AsRef<Path>,
        name: &str,
        device: &Device,
    ) -> Result<()> {
        let file = load_adapter(dir.as_ref(), device)?;
        if file.config.is_prompt_learning() {
            if self.prompt.is_some() || !self.configs.is_empty() {
                return Err(self.prompt_combine_error(name));
            }
            let adapter = self.model.prompt_adapter(
                &file.config,
                PromptAdapterSource::Saved {
                    tensors: &file.tensors,
                    dir: dir.as_ref(),
                },
            )?;
            self.prompt = Some((name.to_string(), adapter));
            self.active = vec![name.to_string()];
            return Ok(());
        }
        self.check_new_name(name, &file.config)?;
        let Built {
            adapters: built,
            replaced,
            shared,
        } = self.build_from_file(&file, device)?;
        for (k, t) in replaced {
            self.model.set_tensor(&k, t)?;
        }
        // PEFT's `from_pretrained` runs the layer init of the file's config before loading its tensors: a
        // config that still names PiSSA / OLoRA rewrites the base it is given again (PEFT's documented
        // workflow saves `init_lora_weights: true` for that reason).
        if file.config.method().rewrites_base() {
            let mut residuals = Vec::new();
            {
                let slots = self.model.slots();
                for (module, _) in &built {
                    if let Some(slot) = slots.iter().find(|s| s.name() == module) {
                        let w = crate::tuners::lora::rewrite_init::fresh_residual(
                            &file.config,
                            module,
                            slot.base(),
                        )?;
                        residuals.push((module.clone(), w));
                    }
                }
            }
            for (module, w) in residuals {
                self.slot_mut(&module)?.set_base_tensors(Some(w), None)?;
            }
        }
        for (module, adapter) in built {
            self.slot_mut(&module)?.add_adapter(name, adapter)?;
        }
        self.shared.insert(name.to_string(), shared);
        self.configs.insert(name.to_string(), file.config);
        if self.active.is_empty() {
            self.set_adapter(&[name])?;
        } else {
            let active: Vec<String> = self.active.clone();
            let refs: Vec<&str> = active.iter().map(|s| s.as_str()).collect();
            self.set_adapter(&refs)?;
        }
        Ok(())
    }

    /// For a method that follows tied weights ([`PeftMethod::follows_tied_weights`]): the partner of each tied
    /// pair whose other slot has a new adapter gets that adapter's [`Adapter::tied_copy`] (replacing what was
    /// built for it).
    ///
    /// For LoRA's `trainable_token_indices` (PEFT's tied `TrainableTokensWrapper`): a partner that has trainable
    /// tokens of its own (different ids, PEFT's `indices_mismatch`) keeps them and is not tied; a partner that is
    /// a LoRA target (or a `modules_to_save` copy) is refused, since PEFT then wraps the LoRA layer's base
    /// layer and one slot cannot hold both.
    fn add_tied_copies(
        &self,
        config: &PeftConfig,
        built: &mut Vec<(String, Box<dyn crate::layer::Adapter>)>,
    ) -> Result<()> {
        if !config.method().follows_tied_weights() {
            return Ok(());
        }
        let lora = matches!(config, PeftConfig::Lora(_));
        let slots = self.model.slots();
        for (a, b) in self.tied_pairs()? {
            for (from, to) in [(&a, &b), (&b, &a)] {
                let Some(i) = built.iter().position(|(m, _)| m == from) else {
                    continue;
                };
                let Some(slot) = slots.iter().find(|s| s.name() == to.as_str()) else {
                    continue;
                };
                if let Some(copy) = built[i].1.tied_copy(slot.base())? {
                    if lora && let Some((_, own)) = built.iter().find(|(m, _)| m == to) {
                        if own.peft_type() == copy.peft_type() {
                            continue;
                        }
                        return Err(PeftError::Unsupported {
                            field: "trainable_token_indices".into(),
                            value: from.clone(),
                            reason: format!(
                                "`{to}` is tied to `{from}` and is itself adapted ({}); PEFT then wraps its base \
                                 layer in the tied trainable tokens, which peft-rs does not do",
                                own.peft_type()
                            ),
                        });
                    }
                    built.retain(|(m, _)| m != to);
                    built.push((to.clone(), copy));
                }
            }
        }
        Ok(())
    }

    /// LoRA's `trainable_token_indices` (PEFT's `set_additional_trainable_modules`): a trainable-tokens
    /// adapter, starting from the original rows, on each named layer. The list form names the input
    /// embedding; a map key names every module whose dotted name ends with it (`str.endswith`), the first
    /// key wins. With tied embeddings, map entries for the embedding and its tied layers with equal ids
    /// build the embedding's only (the tied layer then follows it, [`Self::add_tied_copies`]), as PEFT.
    ///
    /// Errors, as PEFT's: a key that matches no module, a layer that is also a LoRA target (PEFT:
    /// "trainable_token_indices cannot be applied to modules of type lora.…"), a key listed in
    /// `modules_to_save`. Refused where PEFT fails later or computes something else: a layer that is a
    /// `modules_to_save` copy, a layer that is not an Embedding or a Linear without bias.
    fn lora_trainable_tokens(
        &self,
        config: &PeftConfig,
        targeted: &HashSet<&str>,
        mts: &[String],
    ) -> Result<Vec<(String, Box<dyn Adapter>)>> {
        let PeftConfig::Lora(c) = config else {
            return Ok(Vec::new());
        };
        let Some(tti) = &c.features.trainable_token_indices else {
            return Ok(Vec::new());
        };
        let input = self.model.input_embeddings();
        let layers = tti.target_layers(input.as_deref());
        for (key, _) in &layers {
            if mts.iter().any(|m| m == key) {
                return Err(PeftError::InvalidConfig(format!(
                    "The embedding layer is already marked to be trained fully, either specify \
                     `modules_to_save=[..., \"{key}\", ...]` or `trainable_tokens={{'{key}': x}}` but not both."
                )));
            }
        }
        // PEFT's tied-layer handling: with several entries on a tied model, the entries naming the embedding
        // or its tied layers, when their ids agree, leave the tied layers to the weight tying.
        let pairs = self.tied_pairs()?;
        let tied_names: Vec<&str> = match &input {
            Some(e) => pairs
                .iter()
                .filter_map(|(a, b)| {
                    (a == e)
                        .then_some(b.as_str())
                        .or_else(|| (b == e).then_some(a.as_str()))
                })
                .collect(),
            None => Vec::new(),
        };
        let mut skip: HashSet<&str> = HashSet::new();
        if layers.len() > 1 && !tied_names.is_empty() {
            let tied_keys: Vec<&(String, Vec<usize>)> = layers
                .iter()
                .filter(|(k, _)| {
                    input.as_deref().is_some_and(|e| e.ends_with(k.as_str()))
                        || tied_names
                            .iter()
                            .any(|t| t.ends_with(k.as_str()) || t.split('.').any(|p| p == k))
                })
                .collect();
            if tied_keys.len() >= 2 && tied_keys.iter().all(|(_, ids)| *ids == tied_keys[0].1) {
                skip = tied_keys
                    .iter()
                    .map(|(k, _)| k.as_str())
                    .filter(|k| tied_names.contains(k))
                    .collect();
            }
        }
        let modules = self.model.module_infos();
        let slots = self.model.slots();
        let mut out: Vec<(String, Box<dyn Adapter>)> = Vec::new();
        for (key, ids) in &layers {
            if skip.contains(key.as_str()) {
                continue;
            }
            let matches: Vec<&str> = modules
                .iter()
                .map(|m| m.name.as_str())
                .filter(|n| n.ends_with(key.as_str()))
                .collect();
            if matches.is_empty() {
                return Err(PeftError::InvalidConfig(format!(
                    "trainable_token_indices: Target modules {{'{key}'}} not found in the base model. Please \
                     check the target modules and try again."
                )));
            }
            for m in matches {
                if out.iter().any(|(n, _)| n == m) {
                    continue; // an earlier key wrapped it (PEFT's update of an existing wrapper is a no-op)
                }
                if targeted.contains(m) {
                    return Err(PeftError::InvalidConfig(format!(
                        "trainable_token_indices cannot be applied to `{m}`: it is a LoRA target (PEFT: \
                         \"trainable_token_indices cannot be applied to modules of type lora.…\")"
                    )));
                }
                if is_module_to_save(m, mts) {
                    return Err(PeftError::InvalidConfig(format!(
                        "trainable_token_indices cannot be applied to `{m}`: it is in `modules_to_save` (PEFT \
                         wraps the full copy and its forward fails)"
                    )));
                }
                let slot = slots.iter().find(|s| s.name() == m).ok_or_else(|| {
                    let kind = modules
                        .iter()
                        .find(|i| i.name == m)
                        .map(|i| i.kind.to_string())
                        .unwrap_or_default();
                    PeftError::Unsupported {
                        field: "trainable_token_indices".into(),
                        value: key.clone(),
                        reason: format!(
                            "`{m}` ({kind}) is not an Embedding or Linear layer (PEFT's trainable tokens fail \
                             on it)"
                        ),
                    }
                })?;
                let a = TrainableTokensAdapter::for_lora(slot.base(), ids).map_err(|e| {
                    PeftError::Invalid(format!("trainable_token_indices on `{m}`: {e}"))
                })?;
                out.push((m.to_string(), Box::new(a)));
            }
        }
        Ok(out)
    }

    /// The adapters an adapter file builds for this model's slots (by module name), the model tensors it
    /// replaces, and its shared tensors, without changing the model.
    fn build_from_file(&self, file: &AdapterFile, device: &Device) -> Result<Built> {
        let mut split = split_keys(&file.tensors, registry::param_prefixes(&file.config)?)?;
        if file.config.method().layers_from_config() {
            // PEFT injects by the config before it loads the file: every targeted module is a layer, also
            // those of which the file holds nothing (UniLoRA without `save_indices`).
            let mut config = file.config.clone();
            let model_type = self.model.model_type();
            config
                .method_mut()
                .prepare_adapter_config(model_type.as_deref())?;
            if let Some(spec) = config.target_spec() {
                let resolved = resolve_targets(
                    &spec,
                    &self.model.module_infos(),
                    self.model.output_layer().as_deref(),
                    config.peft_type().as_str(),
                )?;
                let slots: HashSet<String> = self
                    .model
                    .slots()
                    .iter()
                    .map(|s| s.name().to_string())
                    .collect();
                for m in resolved.targeted {
                    if slots.contains(&m) {
                        split.modules.entry(m).or_default();
                    }
                }
            }
        }
        // A tied partner's tensors (PEFT saves the shared rows under both names) are the targeted layer's.
        let partners: HashSet<String> = if file.config.method().follows_tied_weights() {
            self.tied_pairs()?
                .into_iter()
                .filter(|(a, _)| split.modules.contains_key(a))
                .map(|(_, b)| b)
                .collect()
        } else {
            HashSet::new()
        };
        crate::tuners::tuners_utils::check_file_modules_targeted(
            &file.config,
            split
                .modules
                .iter()
                .filter(|(m, p)| !partners.contains(*m) && !is_lora_token_module(&file.config, p))
                .map(|(m, _)| m.as_str()),
        )?;
        let shared = {
            let slots = self.model.slots();
            let dims: Vec<TargetLayer> = slots
                .iter()
                .filter(|s| split.modules.contains_key(s.name()))
                .map(|s| TargetLayer::of(s.name(), s.base()))
                .collect();
            registry::shared_tensors(&file.config, Some(&split.shared), &dims, device)?
        };
        let mts: Vec<String> = file
            .config
            .modules_to_save()
            .map(|m| m.to_vec())
            .unwrap_or_default();
        let mut built = Vec::new();
        {
            let slots = self.model.slots();
            for (module, params) in &split.modules {
                let slot = slots.iter().find(|s| s.name() == module).ok_or_else(|| {
                    PeftError::MissingModule {
                        module: module.clone(),
                    }
                })?;
                let a = registry::build_adapter_with_shared(
                    &file.config,
                    module,
                    slot.base(),
                    params,
                    &shared,
                )?;
                built.push((module.clone(), a));
            }
            for slot in &slots {
                if is_module_to_save(slot.name(), &mts) {
                    let w = split.overrides.get(&format!("{}.weight", slot.name()));
                    if let Some(w) = w {
                        let b = split.overrides.get(&format!("{}.bias", slot.name()));
                        built.push((
                            slot.name().to_string(),
                            Box::new(ModulesToSave::from_tensors(slot.base(), w, b)?) as _,
                        ));
                    }
                }
            }
        }
        self.add_tied_copies(&file.config, &mut built)?;
        let mut replaced = Vec::new();
        for (k, t) in &split.overrides {
            let owner_is_mts = built.iter().any(|(m, a)| {
                a.peft_type() == crate::layer::modules_to_save::MODULES_TO_SAVE
                    && k.starts_with(&format!("{m}."))
            });
            if !owner_is_mts {
                replaced.push((k.clone(), t.clone()));
            }
        }
        Ok(Built {
            adapters: built,
            replaced,
            shared,
        })
    }

    /// PEFT's `hotswap_adapter`: replaces the weights of the loaded LoRA adapter `name` by those of the
    /// adapter directory `dir`, in place, keeping its name, its place among the active adapters and every
    /// other adapter. The new adapter may have another rank and `lora_alpha` (the scaling follows the new
    /// config), but the configs must agree on `use_rslora`, `lora_dropout`, `alpha_pattern` and `use_dora`
    /// (PEFT's `check_hotswap_configs_compatible`), it may not target a module the old one does not
    /// (PEFT's "unexpected keys"), and it may not replace model tensors (trained biases). Modules the old
    /// adapter targets and the new one does not get all-zero weights, as in PEFT. Refused while `name` is
    /// merged. Nothing changes on an error.
    ///
    /// ```no_run
    /// # use peft::{PeftModel, host::AdapterHost};
    /// # fn f<M: AdapterHost>(pm: &mut PeftModel<M>) -> peft::Result<()> {
    /// pm.hotswap_adapter("adapters/french", "default", &candle_core::Device::Cpu)?;
    /// # Ok(()) }
    /// ```
    pub fn hotswap_adapter(
        &mut self,
        dir: impl AsRef<Path>,
        name: &str,
        device: &Device,
    ) -> Result<()> {
        let old = self
            .configs
            .get(name)
            .ok_or_else(|| PeftError::UnknownAdapter(name.to_string()))?;
        if let Some(slot) = self
            .model
            .slots()
            .iter()
            .find(|s| s.merged().contains(&name))
        {
            return Err(PeftError::Invalid(format!(
                "cannot hot-swap adapter `{name}`: it is merged into {} (unmerge first)",
                slot.name()
            )));
        }
        let file = load_adapter(dir.as_ref(), device)?;
        check_hotswap_configs(old, &file.config)?;
        let built = self.build_from_file(&file, device)?;
        if !built.replaced.is_empty() {
            let keys: Vec<&str> = built.replaced.iter().map(|(k, _)| k.as_str()).collect();
            return Err(PeftError::Unsupported {
                field: "hotswap_adapter".into(),
                value: keys.join(", "),
                reason: "the new adapter replaces model tensors; load it as a new adapter instead"
                    .into(),
            });
        }
        let holders: Vec<String> = self
            .model
            .slots()
            .iter()
            .filter(|s| s.adapter(name).is_some())
            .map(|s| s.name().to_string())
            .collect();
        let unexpected: Vec<&str> = built
            .adapters
            .iter()
            .map(|(m, _)| m.as_str())
            .filter(|m| !holders.iter().any(|h| h == m))
            .collect();
        if !unexpected.is_empty() {
            return Err(PeftError::Invalid(format!(
                "Hot swapping the adapter did not succeed: `{name}` does not target {} (unexpected keys)",
                unexpected.join(", ")
            )));
        }
        let mut new: IndexMap<String, Box<dyn Adapter>> = built.adapters.into_iter().collect();
        for module in &holders {
            let slot = self.slot_mut(module)?;
            match new.shift_remove(module.as_str()) {
                Some(adapter) => slot.replace_adapter(name, adapter)?,
                None => {
                    for (_, var) in slot.adapter(name).map(|a| a.vars()).unwrap_or_default() {
                        var.set(&var.as_tensor().zeros_like()?)?;
                    }
                }
            }
        }
        self.shared.insert(name.to_string(), built.shared);
        self.configs.insert(name.to_string(), file.config);
        Ok(())
    }

    /// Makes `names` the active adapters, in that order (PEFT's `set_adapter`; a list of several is
    /// `base_model.set_adapter([...])`).
    pub fn set_adapter(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            if !self.configs.contains_key(*n) && self.prompt_adapter_name() != Some(*n) {
                return Err(PeftError::UnknownAdapter(n.to_string()));
            }
        }
        for slot in self.model.slots_mut() {
            slot.set_active(names);
        }
        self.active = names.iter().map(|s| s.to_string()).collect();
        Ok(())
    }

    /// Removes an adapter from every layer (PEFT's `delete_adapter`). Refused while it is merged.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        if self.prompt_adapter_name() == Some(name) {
            self.prompt = None;
            self.active.retain(|n| n != name);
            return Ok(());
        }
        if !self.configs.contains_key(name) {
            return Err(PeftError::UnknownAdapter(name.to_string()));
        }
        for slot in self.model.slots() {
            if slot.merged().contains(&name) {
                return Err(PeftError::AdapterMerged {
                    module: slot.name().to_string(),
                    adapter: name.to_string(),
                });
            }
        }
        for slot in self.model.slots_mut() {
            if slot.adapter(name).is_some() {
                slot.delete_adapter(name)?;
            }
        }
        self.configs.shift_remove(name);
        self.shared.shift_remove(name);
        self.active.retain(|n| n != name);
        if let (true, Some(first)) = (self.active.is_empty(), self.configs.keys().next().cloned()) {
            self.set_adapter(&[&first])?;
        }
        Ok(())
    }

    /// Runs `f` with every adapter disabled (PEFT's `with model.disable_adapter():`): merged adapters are
    /// unmerged first, as PEFT's layers do.
    pub fn with_adapters_disabled<R>(&mut self, f: impl FnOnce(&Self) -> R) -> Result<R> {
        self.unmerge_adapter()?;
        for slot in self.model.slots_mut() {
            slot.set_disabled(true);
        }
        let r = f(self);
        for slot in self.model.slots_mut() {
            slot.set_disabled(false);
        }
        Ok(r)
    }

    /// The host's tied slot pairs ([`AdapterHost::tied_weights`]), checked: both slots exist and their weights
    /// have one shape.
    fn tied_pairs(&self) -> Result<Vec<(String, String)>> {
        let pairs = self.model.tied_weights();
        let slots = self.model.slots();
        for (a, b) in &pairs {
            let find = |n: &str| {
                slots
                    .iter()
                    .find(|s| s.name() == n)
                    .ok_or_else(|| PeftError::MissingModule {
                        module: n.to_string(),
                    })
            };
            let (sa, sb) = (find(a)?, find(b)?);
            if a == b || sa.base().weight_dims() != sb.base().weight_dims() {
                return Err(PeftError::Invalid(format!(
                    "tied weights `{a}` {:?} and `{b}` {:?} are not one matrix",
                    sa.base().weight_dims(),
                    sb.base().weight_dims()
                )));
            }
        }
        Ok(pairs)
    }

    /// Gives the tied partner of `slots[i]` (if any) the weight `slots[i]` now holds, so that both see the one
    /// shared matrix, as PyTorch's single parameter would.
    fn sync_tied(
        slots: &mut [&mut crate::AdapterSlot],
        i: usize,
        pairs: &[(String, String)],
    ) -> Result<()> {
        let name = slots[i].name().to_string();
        let Some(partner) = pairs.iter().find_map(|(a, b)| {
            (*a == name)
                .then_some(b)
                .or_else(|| (*b == name).then_some(a))
        }) else {
            return Ok(());
        };
        let j = slots
            .iter()
            .position(|s| s.name() == partner)
            .ok_or_else(|| PeftError::MissingModule {
                module: partner.clone(),
            })?;
        let w = slots[i].base().weight()?.contiguous()?;
        slots[i].set_tied_weight(w.clone())?;
        slots[j].set_tied_weight(w)
    }

    /// Merges adapters into the base weights (default: the active ones), as PEFT's `merge_adapter`: module by
    /// module in tree order, each merging the adapters in the given order.
    ///
    /// Tied weights ([`AdapterHost::tied_weights`]) stay one matrix, as PEFT's in-place merge into the shared
    /// parameter leaves them: what either slot merges lands in the matrix both slots see, so the slot merged
    /// second starts from a weight that already holds the first one's merge (a DoRA norm included).
    pub fn merge_adapter(&mut self, names: Option<&[&str]>) -> Result<()> {
        if let Some((p, a)) = &self.prompt {
            return Err(PeftError::Unsupported {
                field: "peft_type".into(),
                value: a.config().peft_type().as_str().into(),
                reason: format!(
                    "`{p}` is a prompt-learning adapter: there are no weights to merge"
                ),
            });
        }
        let names: Vec<String> = match names {
            Some(n) => n.iter().map(|s| s.to_string()).collect(),
            None => self.active.clone(),
        };
        let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
        let pairs = self.tied_pairs()?;
        {
            let slots = self.model.slots();
            let merged_in = |n: &str| {
                slots
                    .iter()
                    .any(|s| s.name() == n && !s.merged().is_empty())
            };
            for (a, b) in &pairs {
                let key = (a.clone(), b.clone());
                if !self.tied_bases.contains_key(&key) && !merged_in(a) && !merged_in(b) {
                    let w = slots.iter().find(|s| s.name() == a).expect("checked");
                    self.tied_bases.insert(key, w.base().weight()?);
                }
            }
        }
        let mut slots = self.model.slots_mut();
        for i in 0..slots.len() {
            let before = slots[i].merged().len();
            slots[i].merge(Some(&refs))?;
            if slots[i].merged().len() != before {
                Self::sync_tied(&mut slots, i, &pairs)?;
            }
        }
        // A pair nothing was merged into keeps no snapshot (its base may still be replaced).
        let merged_in = |n: &str| {
            slots
                .iter()
                .any(|s| s.name() == n && !s.merged().is_empty())
        };
        self.tied_bases
            .retain(|(a, b), _| merged_in(a) || merged_in(b));
        Ok(())
    }

    /// Unmerges every merged adapter. Tied weights get back the shared base they had before the merge, in
    /// both slots.
    pub fn unmerge_adapter(&mut self) -> Result<()> {
        let pairs = self.tied_pairs()?;
        let mut slots = self.model.slots_mut();
        for i in (0..slots.len()).rev() {
            let had = !slots[i].merged().is_empty();
            slots[i].unmerge()?;
            if had {
                Self::sync_tied(&mut slots, i, &pairs)?;
            }
        }
        for ((a, b), w) in std::mem::take(&mut self.tied_bases) {
            for s in slots.iter_mut() {
                if s.name() == a || s.name() == b {
                    s.set_tied_weight(w.clone())?;
                }
            }
        }
        Ok(())
    }

    /// PEFT's `merge_and_unload`: merges the given adapters (default: active), then removes every adapter
    /// and returns the plain model.
    pub fn merge_and_unload(mut self, names: Option<&[&str]>) -> Result<M> {
        self.merge_adapter(names)?;
        let all: Vec<String> = self.configs.keys().cloned().collect();
        for slot in self.model.slots_mut() {
            let merged: Vec<String> = slot.merged().iter().map(|s| s.to_string()).collect();
            slot.forget_merged();
            for n in &all {
                if slot.adapter(n).is_some() && !merged.contains(n) {
                    slot.delete_adapter(n)?;
                }
            }
            for n in &merged {
                slot.delete_adapter(n)?;
            }
        }
        Ok(self.model)
    }

    /// The gradient projections the active adapters ask for ([`crate::layer::Adapter::gradient_projection`]),
    /// keyed as in [`trainable_vars`](Self::trainable_vars) (`<module>.<key>`): OSF's. A trainer applies each
    /// to its variable's gradient before the optimizer step.
    pub fn gradient_projections(&self) -> Vec<(String, crate::layer::GradProjection)> {
        let mut out = Vec::new();
        for slot in self.model.slots() {
            for a in &self.active {
                if let Some(ad) = slot.adapter(a) {
                    for (k, _) in ad.vars() {
                        if let Some(p) = ad.gradient_projection(&k) {
                            out.push((format!("{}.{k}", slot.name()), p));
                        }
                    }
                }
            }
        }
        out
    }

    /// The trainable parameters: every `Var` of the active adapters, keyed `<module>.<key>` (PEFT's names
    /// without the `base_model.model.` prefix). A model-level shared tensor that trains (VB-LoRA's vector
    /// bank, one `Var` held by every layer) is listed once, keyed as in the file without `base_model.`
    /// (`vblora_vector_bank`).
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let mut out = Vec::new();
        let mut shared = Vec::new();
        for a in &self.active {
            for (k, t) in self.shared.get(a).into_iter().flatten() {
                if t.is_variable()
                    && let Ok(v) = Var::from_tensor(t)
                {
                    let key = k.strip_prefix("base_model.").unwrap_or(k);
                    shared.push((key.to_string(), v));
                }
            }
        }
        let shared_ids: HashSet<_> = shared.iter().map(|(_, v)| v.as_tensor().id()).collect();
        for slot in self.model.slots() {
            for a in &self.active {
                if let Some(ad) = slot.adapter(a) {
                    for (k, v) in ad.vars() {
                        if !shared_ids.contains(&v.as_tensor().id()) {
                            out.push((format!("{}.{k}", slot.name()), v));
                        }
                    }
                }
            }
        }
        out.extend(shared);
        out.extend(self.bias_vars.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some((_, p)) = &self.prompt {
            out.extend(p.named_vars());
        }
        out
    }

    /// PEFT's `get_nb_trainable_parameters`: parameters of the active adapters, and of everything.
    pub fn trainable_parameters(&self) -> ParameterCount {
        let mut seen = HashSet::new();
        let mut all = 0usize;
        let mut count = |t: &candle_core::Tensor| {
            if seen.insert(t.id()) {
                all += t.elem_count();
            }
        };
        let mut quantized = 0usize;
        for slot in self.model.slots() {
            match slot.base().dense_weight() {
                Some(w) => count(w),
                // PEFT counts a 4-bit parameter's original elements, not its packed bytes.
                None => quantized += slot.base().weight_dims().iter().product::<usize>(),
            }
            if let Some(b) = slot.base().bias() {
                count(b);
            }
            for (_, a) in slot.adapters() {
                for (_, t) in a.tensors() {
                    count(&t);
                }
            }
        }
        for (_, t) in self.model.named_tensors() {
            count(&t);
        }
        // Shared tensors that train are parameters (VB-LoRA's vector bank); frozen ones are buffers (VeRA's
        // projections), which PEFT does not count.
        for t in self.shared.values().flat_map(|s| s.values()) {
            if t.is_variable() {
                count(t);
            }
        }
        if let Some((_, p)) = &self.prompt {
            for (_, v) in p.named_vars() {
                count(v.as_tensor());
            }
        }
        let trainable = self
            .trainable_vars()
            .iter()
            .map(|(_, v)| v.elem_count())
            .sum();
        ParameterCount {
            trainable,
            all: all + quantized,
        }
    }

    /// PEFT's `save_pretrained`: every adapter, `default` at `dir`, the others in `dir/<name>/`.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        if let Some((name, p)) = &self.prompt {
            let dir = dir.as_ref();
            let dir = if name == "default" {
                dir.to_path_buf()
            } else {
                dir.join(name)
            };
            return crate::io::save_adapter(dir, p.config(), &p.state_dict()?);
        }
        save_adapters(dir, &self.saved_adapters()?)
    }

    /// What [`save_pretrained`](Self::save_pretrained) writes for the layer adapters: each adapter's config
    /// and tensors under PEFT's file keys.
    pub(crate) fn saved_adapters(&self) -> Result<Vec<AdapterToSave<'_>>> {
        let input = self.model.input_embeddings();
        let output = self.model.output_layer();
        let modules = self.model.module_infos();
        let mut list: Vec<AdapterToSave<'_>> = Vec::new();
        for (name, config) in &self.configs {
            let embedding_targeted = match config.target_spec().and_then(|s| s.target_modules) {
                Some(TargetModules::List(l)) => EMBEDDING_LAYER_NAMES
                    .iter()
                    .any(|e| l.iter().any(|x| x == e)),
                Some(TargetModules::Regex(r)) if !r.eq_ignore_ascii_case("all-linear") => {
                    let spec = crate::config::TargetSpec {
                        target_modules: config.target_spec().and_then(|s| s.target_modules),
                        ..Default::default()
                    };
                    modules.iter().any(|m| {
                        EMBEDDING_LAYER_NAMES
                            .iter()
                            .any(|e| m.name == *e || m.name.ends_with(&format!(".{e}")))
                            && crate::tuners::tuners_utils::check_target_module_exists(
                                &spec, &m.name,
                            )
                            .unwrap_or(false)
                    })
                }
                _ => false,
            };
            // PEFT's `save_embedding_layers="auto"` does not save the embeddings of an adapter that uses
            // trainable tokens (their point is to be small).
            let using_trainable_tokens = match config {
                PeftConfig::Lora(c) => c.features.trainable_token_indices.is_some(),
                _ => config.peft_type() == crate::config::PeftType::TrainableTokens,
            };
            let save_base = |m: &str| {
                embedding_targeted
                    && !using_trainable_tokens
                    && (Some(m) == input.as_deref() || Some(m) == output.as_deref())
            };
            let mut sd = adapter_state_dict(self.model.slots(), name, config, &save_base)?;
            if config.method().bias() == LoraBias::All {
                let have: HashSet<String> = sd.iter().map(|(k, _)| k.clone()).collect();
                let mut biases: Vec<(String, candle_core::Tensor)> = self
                    .model
                    .slots()
                    .iter()
                    .filter(|s| s.adapter(name).is_none())
                    .filter_map(|s| {
                        s.base()
                            .bias()
                            .map(|b| (format!("{}.bias", s.name()), b.clone()))
                    })
                    .collect();
                biases.extend(self.model.named_tensors());
                for (k, t) in biases {
                    let key = format!("{}{k}", crate::io::MODEL_PREFIX);
                    if k.ends_with(".bias") && !have.contains(&key) {
                        sd.push((key, t));
                    }
                }
            }
            if let Some(shared) = self.shared.get(name) {
                sd.extend(registry::saved_shared(config, shared));
            }
            list.push((name.as_str(), config, sd));
        }
        Ok(list)
    }
}
