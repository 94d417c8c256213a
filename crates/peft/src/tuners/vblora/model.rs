//! VB-LoRA's hooks (PEFT's `VBLoRAModel`): the shared vector bank, created once per adapter for all its
//! layers and saved with it, and the `save_only_topk_weights` file form.

use super::config::VbLoraConfig;
use super::layer::{
    LOGITS_A, LOGITS_A_TOPK_INDICES, LOGITS_B, LOGITS_B_TOPK_INDICES, PARAM_PREFIXES,
    VECTOR_BANK_KEY, VbLoraAdapter,
};
use super::topk;
use crate::config::common::{TargetFields, TargetModules};
use crate::layer::{Adapter, BaseKind, BaseLayer, NamedTensor};
use crate::tuners::constants::{TargetDefault, lookup};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TargetLayer, TensorInfo};
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Device, Tensor, Var};
use indexmap::IndexMap;

/// `TRANSFORMERS_MODELS_TO_VBLORA_TARGET_MODULES_MAPPING` (AdaLoRA's table but for `roberta`).
pub const VBLORA_TARGET_MODULES: &[(&str, TargetDefault)] = &[
    ("t5", TargetDefault::List(&["q", "k", "v", "o", "wi", "wo"])),
    (
        "mt5",
        TargetDefault::List(&["q", "k", "v", "o", "wi_0", "wi_1", "wo"]),
    ),
    (
        "bart",
        TargetDefault::List(&["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    ),
    ("gpt2", TargetDefault::List(&["c_attn"])),
    ("bloom", TargetDefault::List(&["query_key_value"])),
    (
        "opt",
        TargetDefault::List(&["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]),
    ),
    ("gptj", TargetDefault::List(&["q_proj", "v_proj"])),
    ("gpt_neox", TargetDefault::List(&["query_key_value"])),
    ("gpt_neo", TargetDefault::List(&["q_proj", "v_proj"])),
    ("llama", TargetDefault::List(&["q_proj", "v_proj"])),
    ("llama4", TargetDefault::List(&["q_proj", "v_proj"])),
    ("bert", TargetDefault::List(&["query", "value"])),
    ("roberta", TargetDefault::List(&["query", "value"])),
    (
        "deberta-v2",
        TargetDefault::List(&["query_proj", "key_proj", "value_proj", "dense"]),
    ),
    ("gpt_bigcode", TargetDefault::List(&["c_attn"])),
    ("deberta", TargetDefault::List(&["in_proj"])),
    ("gemma", TargetDefault::List(&["q_proj", "v_proj"])),
    ("gemma2", TargetDefault::List(&["q_proj", "v_proj"])),
    ("gemma3_text", TargetDefault::List(&["q_proj", "v_proj"])),
    (
        "gemma4",
        TargetDefault::Regex(r".*language_model\..*\.(q_proj|v_proj)"),
    ),
    ("qwen2", TargetDefault::List(&["q_proj", "v_proj"])),
    ("qwen3", TargetDefault::List(&["q_proj", "v_proj"])),
    (
        "nemotron_h",
        TargetDefault::List(&["q_proj", "k_proj", "v_proj", "o_proj"]),
    ),
];

impl VbLoraConfig {
    /// A fresh vector bank `[num_vectors, vector_length]` drawn from `U(−init_vector_bank_bound,
    /// init_vector_bank_bound)` (PEFT's `_init_vblora_vector_bank`), f32, as a trainable variable.
    pub fn new_vector_bank(&self, device: &Device, rng: &PeftRng) -> Result<Tensor> {
        self.validate()?;
        let b = self.init_vector_bank_bound;
        let t = rng.fork(VECTOR_BANK_KEY).uniform_tensor(
            (self.num_vectors, self.vector_length),
            -b,
            b,
            DType::F32,
            device,
        )?;
        Ok(Var::from_tensor(&t)?.as_tensor().clone())
    }

    /// The vector bank among an adapter file's model-level tensors (`base_model.vblora_vector_bank`, shape
    /// `[num_vectors, vector_length]`), as a trainable variable; a missing bank or any other key is an error.
    pub fn vector_bank_from_file(&self, file_shared: &SharedTensors) -> Result<Tensor> {
        let extra: Vec<String> = file_shared
            .keys()
            .filter(|k| *k != VECTOR_BANK_KEY)
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        let bank = file_shared
            .get(VECTOR_BANK_KEY)
            .ok_or_else(|| PeftError::MissingKey(VECTOR_BANK_KEY.into()))?;
        crate::layer::check_shape(
            VECTOR_BANK_KEY,
            bank,
            &[self.num_vectors, self.vector_length],
        )?;
        if !bank.dtype().is_float() {
            return Err(PeftError::Invalid(format!(
                "`{VECTOR_BANK_KEY}` is {:?}; the vector bank is floating point",
                bank.dtype()
            )));
        }
        Ok(Var::from_tensor(bank)?.as_tensor().clone())
    }
}

impl PeftMethod for VbLoraConfig {
    fn validate(&self) -> Result<()> {
        VbLoraConfig::validate(self)
    }

    fn target_fields(&self) -> Option<&TargetFields> {
        Some(&self.targets)
    }

    fn target_fields_mut(&mut self) -> Option<&mut TargetFields> {
        Some(&mut self.targets)
    }

    /// PEFT's VB-LoRA table ([`VBLORA_TARGET_MODULES`]).
    fn default_target_modules(&self, model_type: &str) -> Option<TargetModules> {
        lookup(VBLORA_TARGET_MODULES, model_type)
    }

    /// PEFT's VB-LoRA sets `fan_in_fan_out` on the config for each layer it wraps (true for a Conv1D, false
    /// for a Linear, with a warning when it changes), so the saved value is the last targeted layer's.
    fn note_targets(&mut self, targets: &[&BaseLayer]) {
        if let Some(last) = targets.last() {
            self.fan_in_fan_out = *last.kind() == BaseKind::Conv1D;
        }
    }

    fn fan_in_fan_out(&self) -> bool {
        self.fan_in_fan_out
    }

    fn param_prefixes(&self) -> Result<&'static [&'static str]> {
        Ok(PARAM_PREFIXES)
    }

    fn is_additive(&self) -> bool {
        true
    }

    /// The file's vector bank (`file_shared`), or for a fresh adapter (`None`) a bank drawn from a fixed
    /// stream ([`PeftMethod::new_shared_tensors`] draws it from the model's seed instead). Either way a
    /// trainable variable, shared by every layer built on it.
    fn shared_tensors(
        &self,
        file_shared: Option<&SharedTensors>,
        targets: &[TargetLayer],
        device: &Device,
    ) -> Result<SharedTensors> {
        match file_shared {
            Some(f) => Ok(SharedTensors::from([(
                VECTOR_BANK_KEY.to_string(),
                self.vector_bank_from_file(f)?,
            )])),
            None => self.new_shared_tensors(targets, device, &PeftRng::new(0)),
        }
    }

    fn new_shared_tensors(
        &self,
        _targets: &[TargetLayer],
        device: &Device,
        rng: &PeftRng,
    ) -> Result<SharedTensors> {
        Ok(SharedTensors::from([(
            VECTOR_BANK_KEY.to_string(),
            self.new_vector_bank(device, rng)?,
        )]))
    }

    fn shares_tensors(&self) -> bool {
        true
    }

    /// PEFT always saves the vector bank.
    fn saves_shared(&self) -> bool {
        true
    }

    fn build_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        tensors: &IndexMap<String, Tensor>,
        shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        let bank = vector_bank(shared)?;
        Ok(Box::new(VbLoraAdapter::from_tensors(
            base, self, bank, tensors,
        )?))
    }

    fn new_adapter(
        &self,
        _module: &str,
        base: &BaseLayer,
        rng: &mut PeftRng,
        shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        let bank = vector_bank(shared)?;
        Ok(Box::new(VbLoraAdapter::new(base, self, bank, rng)?))
    }

    /// With `save_only_topk_weights`, each logits tensor becomes its top-k indices and weights (PEFT's
    /// `_get_adapter_state_dict`); without it, top-k tensors read from such a file become the logits PEFT
    /// recovers from them (`−∞` outside the top k).
    fn saved_tensors(&self, _module: &str, tensors: Vec<NamedTensor>) -> Result<Vec<NamedTensor>> {
        let mut out = Vec::with_capacity(tensors.len() * 2);
        let by_name: IndexMap<String, Tensor> = tensors.iter().cloned().collect();
        for (k, t) in tensors {
            if self.save_only_topk_weights && (k == LOGITS_A || k == LOGITS_B) {
                let (i, w) = topk::to_topk(&t, self.topk, self.num_vectors)?;
                out.push((format!("{k}_topk_indices"), i));
                out.push((format!("{k}_topk_weights"), w));
            } else if !self.save_only_topk_weights
                && (k == LOGITS_A_TOPK_INDICES || k == LOGITS_B_TOPK_INDICES)
            {
                let name = k.trim_end_matches("_topk_indices").to_string();
                let wk = format!("{name}_topk_weights");
                let w = by_name
                    .get(&wk)
                    .ok_or_else(|| PeftError::MissingKey(wk.clone()))?;
                let (a, b) = (t.dim(0)?, t.dim(1)?);
                let l = topk::from_topk(&t, w, (a, b), self.topk, self.num_vectors, (&k, &wk))?;
                out.push((name, l));
            } else if !self.save_only_topk_weights && k.ends_with("_topk_weights") {
                // folded into the logits with their indices
            } else {
                out.push((k, t));
            }
        }
        Ok(out)
    }

    /// Linear (`[out, in]`) or GPT-2 Conv1D (`[in, out]`), from the sizes the logits (or their top-k
    /// indices) give: `in = logits_A.dim(1) · vector_length`, `out = logits_B.dim(0) · vector_length`; a
    /// square weight is a Conv1D when the config says `fan_in_fan_out`.
    fn infer_kind(
        &self,
        _module: &str,
        params: &IndexMap<String, Tensor>,
        wshape: &[usize],
    ) -> Result<BaseKind> {
        if wshape.len() != 2 {
            return Err(PeftError::Invalid(format!(
                "VB-LoRA merges into Linear or Conv1D weights only, got a weight of shape {wshape:?}"
            )));
        }
        let dim = |keys: [&str; 2], d: usize| {
            keys.iter()
                .find_map(|k| params.get(*k))
                .and_then(|t| t.dims().get(d).copied())
                .map(|n| n * self.vector_length)
        };
        let i = dim([LOGITS_A, LOGITS_A_TOPK_INDICES], 1);
        let o = dim([LOGITS_B, LOGITS_B_TOPK_INDICES], 0);
        Ok(match (i, o) {
            (Some(i), Some(o)) if wshape == [i, o] && (i != o || self.fan_in_fan_out) => {
                BaseKind::Conv1D
            }
            _ => BaseKind::Linear, // the adapter's shape checks name a mismatch
        })
    }

    /// The rank (from the logits or their top-k indices), `topk`, the bank's size, and whether the file holds
    /// top-k weights only.
    fn summarize_module(&self, _module: &str, tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        let r = tensors
            .iter()
            .find(|t| t.name == LOGITS_A || t.name == LOGITS_A_TOPK_INDICES)
            .and_then(|t| t.shape.first().copied());
        let mut flags = vec![
            format!("topk={}", self.topk),
            format!("vector_bank={}x{}", self.num_vectors, self.vector_length),
        ];
        if tensors.iter().any(|t| t.name == LOGITS_A_TOPK_INDICES) {
            flags.push("topk_weights_only".into());
        }
        ModuleSummary {
            r,
            flags,
            ..Default::default()
        }
    }
}

/// The vector bank among an adapter's shared tensors; none given is an error that says where it comes from.
fn vector_bank(shared: &SharedTensors) -> Result<&Tensor> {
    if shared.is_empty() {
        return Err(PeftError::Invalid(
            "VBLORA layers share a model-level vector bank: build them with `build_adapter_with_shared` / \
             `new_adapter_with_shared` and the tensors of `shared_tensors`"
                .into(),
        ));
    }
    shared
        .get(VECTOR_BANK_KEY)
        .ok_or_else(|| PeftError::MissingKey(VECTOR_BANK_KEY.into()))
}
