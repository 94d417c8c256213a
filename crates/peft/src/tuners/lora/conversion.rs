//! PEFT 0.21.2's conversion of other adapters to plain LoRA (`tuners/lora/conversion.py`: `convert_to_lora`,
//! `save_as_lora`), so that a LoHa, LoKr, VeRA, … adapter can be served where only LoRA is understood (LoRA
//! servers, mixed batches).
//!
//! Each converted layer's additive update `ΔW` (its [`Adapter::lora_conversion`]) is factorized by a truncated
//! SVD, `B = U[:, :k]·diag(S[:k])`, `A = Vᵀ[:k]`, so the LoRA's scale is one (`r == lora_alpha`). The rank is
//! either fixed ([`ConversionRank::Fixed`]) or the smallest `k` whose singular values hold a fraction of
//! `ΔW`'s energy `Σ S²` ([`ConversionRank::Energy`]), then per layer in `rank_pattern` / `alpha_pattern`.
//! MiSS outside "bat" gives its exact factors at its own rank, as PEFT does.
//!
//! The layers PEFT converts are those whose class says `supports_lora_conversion()`: Linear layers of LoRA,
//! LoHa, LoKr, VeRA, VB-LoRA, FourierFT, RandLoRA, C3A, MiSS, GraLoRA, DeLoRA and UniLoRA, and GPT-2 Conv1D
//! layers of LoRA, VeRA, VB-LoRA, RandLoRA, GraLoRA and UniLoRA. Any other adapted layer (IA3, OFT, BOFT, HiRA, SHiRA, AdaLoRA,
//! embeddings, trainable tokens, …) makes the conversion an error naming it, as PEFT's `TypeError` does.
//! `modules_to_save` are carried over under their plain keys.
//!
//! Two deliberate differences from PEFT, both where PEFT would silently write an adapter that does not do what
//! the source did: DoRA (whose magnitude PEFT's conversion drops) and LoRA's `lora_bias` (whose bias it drops)
//! are refused here with an error saying so.
//!
//! The singular vectors' signs are arbitrary in any SVD (torch's follow no rule we reproduce); here each
//! pair is signed canonically ([`crate::merge_utils::ThinSvd::factors`]). `B·A`, the outputs and the config
//! are PEFT's; `A` and `B` alone may differ from PEFT's by the sign of a rank-one pair.
//!
//! ```
//! use peft::tuners::lora::conversion::ConversionRank;
//! assert_eq!("8".parse::<ConversionRank>()?, ConversionRank::Fixed(8));
//! assert_eq!("0.9".parse::<ConversionRank>()?, ConversionRank::Energy(0.9));
//! assert!("0".parse::<ConversionRank>().is_err());
//! # Ok::<(), peft::PeftError>(())
//! ```

use crate::config::common::TargetModules;
use crate::config::{LoraBias, PeftConfig};
use crate::io::peft_key;
use crate::layer::modules_to_save::MODULES_TO_SAVE;
use crate::layer::{Adapter, AdapterSlot, BaseKind, BaseLayer, LoraConversion};
use crate::merge_utils::ThinSvd;
use crate::tuners::lora::LoraConfig;
use crate::{PeftError, PeftModel, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

/// The rank of the converted LoRA, as PEFT's `rank` argument (an `int` or a `float`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ConversionRank {
    /// Every layer at this rank (PEFT's `int`); `r = lora_alpha = rank`.
    Fixed(usize),
    /// Per layer, the smallest rank whose singular values hold at least this fraction of `Σ S²` (PEFT's
    /// `float`, in `(0, 1]`); `r = lora_alpha = 1` and every layer in `rank_pattern` / `alpha_pattern`.
    Energy(f64),
}

impl std::str::FromStr for ConversionRank {
    type Err = PeftError;

    /// An integer is a fixed rank, a number with a `.` or an exponent an energy threshold (as Python's `int`
    /// and `float`): `"8"`, `"0.9"`, `"1.0"`.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            PeftError::InvalidConfig(format!(
                "rank {s:?}: give an integer rank (8) or an energy threshold in (0, 1] (0.9)"
            ))
        };
        let rank = if s.contains(['.', 'e', 'E']) {
            ConversionRank::Energy(s.parse().map_err(|_| bad())?)
        } else {
            ConversionRank::Fixed(s.parse().map_err(|_| bad())?)
        };
        rank.check()?;
        Ok(rank)
    }
}

impl ConversionRank {
    /// PEFT's checks: a threshold must lie in `(0, 1]`, a rank must not be 0.
    pub fn check(self) -> Result<()> {
        match self {
            ConversionRank::Energy(t) if !(t > 0.0 && t <= 1.0) => Err(PeftError::InvalidConfig(format!(
                "If rank is a float, it is interpreted as a threshold. It must be between 0 and 1 but got {t}."
            ))),
            ConversionRank::Fixed(0) => Err(PeftError::InvalidConfig(
                "Passing a rank of 0 doesn't make sense, please pass a valid value.".into(),
            )),
            _ => Ok(()),
        }
    }
}

/// A converted adapter: PEFT's `(lora_config, state_dict)`, plus the warnings PEFT gives.
#[derive(Clone, Debug)]
pub struct ConvertedLora {
    /// The LoRA config (`r == lora_alpha`, per-layer ranks in `rank_pattern` / `alpha_pattern`).
    pub config: LoraConfig,
    /// The tensors with PEFT's file keys (`base_model.model.<module>.lora_A.weight`, …, and the
    /// `modules_to_save` under `base_model.model.<module>.weight`).
    pub tensors: Vec<(String, Tensor)>,
    /// What PEFT warns about (converting an adapter that already is a LoRA).
    pub warnings: Vec<String>,
}

impl ConvertedLora {
    /// Writes the adapter directory (`adapter_config.json`, `adapter_model.safetensors`) atomically, as PEFT's
    /// `save_as_lora`.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        crate::io::save_adapter(dir, &PeftConfig::Lora(self.config.clone()), &self.tensors)
    }

    /// The rank of `module` in the converted adapter (patterns applied).
    pub fn rank_of(&self, module: &str) -> usize {
        self.config
            .patterns
            .rank_and_alpha_for(module, self.config.lora.r, self.config.lora.lora_alpha)
            .0
    }
}

/// Converts adapter `adapter_name` of the layers in `slots` (configured by `config`) to LoRA: PEFT's
/// `convert_to_lora(model, rank, adapter_name)`. [`PeftModel::convert_to_lora`] calls it with the model's
/// slots.
pub fn convert_slots(
    slots: &[&AdapterSlot],
    config: &PeftConfig,
    adapter_name: &str,
    rank: ConversionRank,
) -> Result<ConvertedLora> {
    rank.check()?;
    if config.is_prompt_learning() {
        return Err(refused(format!(
            "{} is prompt learning: it adds virtual tokens and changes no layer weight",
            config.peft_type().as_str()
        )));
    }
    // PEFT checks every adapted layer first (its `TypeError`), then the bias, then converts.
    let mut plan: Vec<(&AdapterSlot, &dyn Adapter, LoraConversion)> = Vec::new();
    let mut saved: Vec<(&AdapterSlot, &dyn Adapter)> = Vec::new();
    let mut unsupported: Vec<String> = Vec::new();
    for slot in slots {
        let Some(adapter) = slot.adapter(adapter_name) else {
            continue;
        };
        if adapter.peft_type() == MODULES_TO_SAVE {
            saved.push((slot, adapter));
            continue;
        }
        match adapter.lora_conversion(slot.base())? {
            Some(c) => plan.push((slot, adapter, c)),
            None => unsupported.push(format!(
                "{} on {} `{}`",
                describe_method(config, adapter),
                kind_name(slot.base().kind()),
                slot.name()
            )),
        }
    }
    if !unsupported.is_empty() {
        return Err(refused(format!(
            "Some module types on this model do not support LoRA conversion: {} (PEFT converts only additive \
             updates W + ΔW: Linear layers of LoRA, LoHa, LoKr, VeRA, VB-LoRA, FourierFT, RandLoRA, C3A, MiSS, \
             GraLoRA, DeLoRA and UniLoRA)",
            unsupported.join(", ")
        )));
    }
    if plan.is_empty() {
        return Err(refused(format!(
            "Could not detect any layer of adapter `{adapter_name}` that supports LoRA conversion"
        )));
    }
    if let PeftConfig::Lora(c) = config
        && let Some(init) = c.lora.init_lora_weights.rewrites_base()
    {
        // PEFT would factorize B·A, which is the update of the residual base, not of the original one.
        return Err(refused(format!(
            "the adapter's init_lora_weights={:?} rewrote the base weights, so B·A is an update of the residual \
             base: convert it exactly with PeftModel::save_pretrained_converted (PEFT's \
             path_initial_model_for_weight_conversion) or `peft convert-adapter` without --rank",
            init.as_str()
        )));
    }
    let mut warnings = Vec::new();
    if let PeftConfig::Lora(c) = config {
        warnings.push(
            "Converting a PEFT adapter to LoRA that is already a LoRA adapter. There is typically no need for that."
                .to_string(),
        );
        if c.lora.bias != LoraBias::None {
            return Err(PeftError::InvalidConfig(format!(
                "The adapter's config sets bias={}, this is not supported right now.",
                c.lora.bias.as_str()
            )));
        }
    } else if let Some(b) = config.to_json_value().get("bias").and_then(|b| b.as_str())
        && b != "none"
    {
        return Err(PeftError::InvalidConfig(format!(
            "The adapter's config sets bias={b}, this is not supported right now."
        )));
    }

    let mut out = LoraConfig::default();
    let (r, alpha) = match rank {
        ConversionRank::Fixed(r) => (r, r as f64),
        ConversionRank::Energy(_) => (1, 1.0),
    };
    out.lora.r = r;
    out.lora.lora_alpha = alpha;
    out.base.base_model_name_or_path = config.base_model_name_or_path().map(str::to_string);
    out.base.task_type = None;
    let spec = config.target_spec();
    let mut targets = spec.and_then(|s| s.target_modules.cloned());
    if let Some(s) = spec {
        out.targets.layers_pattern = s.layers_pattern.cloned();
        out.targets.layers_to_transform = s.layers_to_transform.cloned();
    }
    out.targets.exclude_modules = Some(TargetModules::List(Vec::new()));

    let mut tensors = Vec::new();
    for (slot, adapter, conv) in plan {
        let name = slot.name();
        let dtype = adapter.saved_dtype();
        let (a, b, k) = match conv {
            LoraConversion::Factors { a, b } => {
                let k = a.dim(0)?;
                (a, b, k)
            }
            LoraConversion::Delta(delta) => factorize(slot.base(), &delta, rank, name)?,
        };
        if k == 0 {
            // PEFT excludes such a layer; a rank >= 1 and a threshold that keeps at least one value never give it.
            if let Some(TargetModules::List(l)) = &mut out.targets.exclude_modules {
                l.push(name.to_string());
            }
            continue;
        }
        let differs = match rank {
            ConversionRank::Fixed(r) => r != k,
            ConversionRank::Energy(_) => true,
        };
        match &mut targets {
            Some(TargetModules::List(l)) if !differs => {
                if !l.iter().any(|t| t == name) {
                    l.push(name.to_string());
                }
            }
            None if !differs => targets = Some(TargetModules::List(vec![name.to_string()])),
            _ => {
                out.patterns.rank_pattern.insert(name.to_string(), k);
                out.patterns.alpha_pattern.insert(name.to_string(), k as f64);
                if targets.is_none() {
                    targets = Some(TargetModules::List(Vec::new()));
                }
            }
        }
        tensors.push((peft_key(name, "lora_A.weight"), to_dtype(&a, dtype)?));
        tensors.push((peft_key(name, "lora_B.weight"), to_dtype(&b, dtype)?));
    }
    out.targets.target_modules = targets;
    if let Some(m) = config.modules_to_save().filter(|m| !m.is_empty()) {
        out.targets.modules_to_save = Some(m.to_vec());
        for (slot, adapter) in saved {
            for (k, t) in adapter.tensors() {
                tensors.push((peft_key(slot.name(), &k), t));
            }
        }
    }
    out.validate()?;
    Ok(ConvertedLora {
        config: out,
        tensors,
        warnings,
    })
}

impl<M: crate::host::AdapterHost> PeftModel<M> {
    /// PEFT's `convert_to_lora(model, rank, adapter_name)`: adapter `adapter_name` as a plain LoRA adapter
    /// (see [`crate::tuners::lora::conversion`]). The model is not changed.
    ///
    /// ```no_run
    /// # fn demo<M: peft::host::AdapterHost>(pm: &peft::PeftModel<M>) -> peft::Result<()> {
    /// use peft::tuners::lora::conversion::ConversionRank;
    /// let lora = pm.convert_to_lora("default", ConversionRank::Fixed(16))?;
    /// lora.save("adapters/as-lora")?;
    /// # Ok(()) }
    /// ```
    pub fn convert_to_lora(&self, adapter_name: &str, rank: ConversionRank) -> Result<ConvertedLora> {
        let config = self.configs().get(adapter_name).ok_or_else(|| {
            PeftError::Invalid(format!("no adapter named `{adapter_name}` to convert"))
        })?;
        let slots = self.model().slots();
        convert_slots(&slots, config, adapter_name, rank)
    }

    /// PEFT's `save_as_lora(path, model, rank, adapter_name)`: [`convert_to_lora`](Self::convert_to_lora)
    /// and [`ConvertedLora::save`].
    pub fn save_as_lora(
        &self,
        dir: impl AsRef<Path>,
        adapter_name: &str,
        rank: ConversionRank,
    ) -> Result<ConvertedLora> {
        let c = self.convert_to_lora(adapter_name, rank)?;
        c.save(dir)?;
        Ok(c)
    }
}

/// `ΔW`'s truncated SVD as PEFT builds the LoRA factors: `(A [k, in], B [out, k], k)`. `ΔW` is in the base
/// weight's layout; for GPT-2's Conv1D (`[in, out]`) PEFT factorizes it as it is and transposes the factors.
fn factorize(
    base: &BaseLayer,
    delta: &Tensor,
    rank: ConversionRank,
    module: &str,
) -> Result<(Tensor, Tensor, usize)> {
    let (rows, cols) = delta.dims2()?;
    let values: Vec<f32> = delta
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_device(&Device::Cpu)?
        .to_vec1()?;
    let svd = ThinSvd::new(&values, rows, cols)?;
    let k = match rank {
        ConversionRank::Fixed(r) => r,
        ConversionRank::Energy(t) => energy_cutoff(svd.singular_values(), t),
    };
    if k > rows.min(cols) {
        return Err(PeftError::InvalidConfig(format!(
            "The chosen rank {k} is larger than the weight shape ({}) of `{module}`, please choose a lower rank.",
            rows.min(cols)
        )));
    }
    let (b, a) = svd.factors(k)?; // b = U·S [rows, k], a = Vᵀ [k, cols]
    let dev = base.device();
    let b = Tensor::from_vec(b, (rows, k), &Device::Cpu)?;
    let a = Tensor::from_vec(a, (k, cols), &Device::Cpu)?;
    let (a, b) = match base.kind() {
        BaseKind::Conv1D => (b.t()?.contiguous()?, a.t()?.contiguous()?),
        _ => (a, b),
    };
    Ok((a.to_device(dev)?, b.to_device(dev)?, k))
}

/// PEFT's `_find_cutoff_index`: the smallest `k` with `Σ_{i<k} S_i² ≥ threshold · Σ S²`, in f32 as torch's
/// `cumsum` + `searchsorted` on the f32 singular values.
///
/// ```
/// // energies 9, 4, 1 (of 14): 9/14 = 0.64, 13/14 = 0.93
/// assert_eq!(peft::tuners::lora::conversion::energy_cutoff(&[3.0, 2.0, 1.0], 0.6), 1);
/// assert_eq!(peft::tuners::lora::conversion::energy_cutoff(&[3.0, 2.0, 1.0], 0.9), 2);
/// assert_eq!(peft::tuners::lora::conversion::energy_cutoff(&[3.0, 2.0, 1.0], 0.95), 3);
/// ```
pub fn energy_cutoff(s: &[f64], threshold: f64) -> usize {
    let mut cs = Vec::with_capacity(s.len());
    let mut acc = 0f64;
    for &v in s {
        let e = (v as f32) * (v as f32);
        acc += f64::from(e);
        cs.push(acc as f32);
    }
    let Some(&total) = cs.last() else {
        return 0;
    };
    let cutoff = (threshold as f32) * total;
    cs.iter().take_while(|&&c| c < cutoff).count() + 1
}

fn to_dtype(t: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(t.to_dtype(dtype)?.contiguous()?)
}

fn refused(msg: String) -> PeftError {
    PeftError::Unsupported {
        field: "convert_to_lora".into(),
        value: "lora".into(),
        reason: msg,
    }
}

fn describe_method(config: &PeftConfig, adapter: &dyn Adapter) -> String {
    match config {
        PeftConfig::Lora(c) if c.lora.use_dora => {
            "LORA with DoRA (its magnitude is not an additive update; PEFT's conversion would drop it)".into()
        }
        PeftConfig::Lora(c) if c.lora.lora_bias => {
            "LORA with lora_bias (a LoRA adapter cannot hold the trained bias; PEFT's conversion would drop it)"
                .into()
        }
        _ => adapter.peft_type().to_string(),
    }
}

fn kind_name(kind: &BaseKind) -> &'static str {
    match kind {
        BaseKind::Linear => "Linear",
        BaseKind::Embedding => "Embedding",
        BaseKind::Conv2d(_) => "Conv2d",
        BaseKind::Conv1D => "Conv1D",
    }
}

/// The usual [`Adapter::lora_conversion`] of an additive method: its [`Adapter::delta_weight`] on the layer
/// kinds PEFT's class converts (`Linear`, and `Conv1D` where `conv1d`), `None` elsewhere. A delta with a bias
/// part is an error (a LoRA adapter has no bias).
pub fn additive_conversion(
    adapter: &dyn Adapter,
    base: &BaseLayer,
    conv1d: bool,
) -> Result<Option<LoraConversion>> {
    match base.kind() {
        BaseKind::Linear => {}
        BaseKind::Conv1D if conv1d => {}
        _ => return Ok(None),
    }
    let Some((delta, bias)) = adapter.delta_weight(base.kind())? else {
        return Ok(None);
    };
    if bias.is_some() {
        return Ok(None);
    }
    Ok(Some(LoraConversion::Delta(delta)))
}
