//! UniLoRA's hooks (PEFT's `UniLoraModel`): the shared `theta_d`, created once per adapter and saved with it,
//! and the index assignment over all targeted layers (`_assign_unilora_indices_and_scales`), drawn again from
//! `proj_seed` whenever the file does not hold it.

use super::config::UniLoraConfig;
use super::layer::{
    INDICES_A, INDICES_B, Layout, PARAM_PREFIXES, SCALES_A, SCALES_B, THETA_D_KEY, UniLoraAdapter,
    check_theta,
};
use super::numpy_rng::generate_index;
use crate::config::common::{TargetModules, TargetSpec};
use crate::layer::{Adapter, BaseKind, BaseLayer};
use crate::tuners::method::{ModuleSummary, PeftMethod, SharedTensors, TargetLayer, TensorInfo};
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Device, Tensor, Var};
use indexmap::IndexMap;

/// The prefix of the shared entries that hold each layer's [`Layout`] (`unilora_layout:<module>.<param>`):
/// internal, never saved (only keys under `base_model.` are).
const LAYOUT_PREFIX: &str = "unilora_layout:";

/// The most `A` / `B` entries the index assignment draws for (2³⁰, 8 GiB of indices).
const MAX_ENTRIES: u64 = 1 << 30;

fn layout_key(module: &str, param: &str) -> String {
    format!("{LAYOUT_PREFIX}{module}.{param}")
}

impl UniLoraConfig {
    /// A fresh `theta_d` `[theta_d_length]`, f32, as a trainable variable: `U(−init_theta_d_bound,
    /// init_theta_d_bound)`, or `N(0, 1)` without `init_weights` (PEFT's `_init_unilora_theta_d`).
    pub fn new_theta_d(&self, device: &Device, rng: &PeftRng) -> Result<Tensor> {
        self.validate()?;
        let mut rng = rng.fork(THETA_D_KEY);
        let n = self.theta_d_length;
        let t = if self.init_weights {
            let b = self.init_theta_d_bound;
            rng.uniform_tensor(n, -b, b, DType::F32, device)?
        } else {
            rng.normal_tensor(n, 0.0, 1.0, DType::F32, device)?
        };
        Ok(Var::from_tensor(&t)?.as_tensor().clone())
    }

    /// Every targeted layer's indices and scales (PEFT's `_assign_unilora_indices_and_scales`): one draw of
    /// [`generate_index`] over `Σ r·(in + out)` entries, consumed layer by layer in `targets`' order (the
    /// model's module order), `A` `[r, in]` then `B` `[out, r]`; each entry scaled by `1/√count` of its
    /// `theta_d` index (f32, as torch's `rsqrt`).
    pub fn layouts(&self, targets: &[TargetLayer], device: &Device) -> Result<Vec<Layout>> {
        self.validate()?;
        let r = self.r as u64;
        let total: u64 = targets
            .iter()
            .map(|t| r * (t.in_features as u64 + t.out_features as u64))
            .sum();
        if total == 0 {
            return Ok(Vec::new());
        }
        if total > MAX_ENTRIES {
            return Err(PeftError::InvalidConfig(format!(
                "UniLoRA: r = {} gives the targeted layers {total} factor entries, more than peft-rs draws \
                 indices for ({MAX_ENTRIES})",
                self.r
            )));
        }
        let len = self.theta_d_length;
        let idx = generate_index(total, len as u64, self.proj_seed as u128)?;
        let mut counts = vec![0u64; len];
        for &i in &idx {
            counts[i as usize] += 1;
        }
        let inv: Vec<f32> = counts
            .iter()
            .map(|&c| if c > 0 { 1.0 / (c as f32).sqrt() } else { 0.0 })
            .collect();
        let mut at = 0usize;
        let mut take = |rows: usize, cols: usize| -> Result<(Tensor, Tensor)> {
            let chunk = &idx[at..at + rows * cols];
            at += rows * cols;
            let ints: Vec<i64> = chunk.iter().map(|&i| i as i64).collect();
            let scales: Vec<f32> = chunk.iter().map(|&i| inv[i as usize]).collect();
            Ok((
                Tensor::from_vec(ints, (rows, cols), device)?,
                Tensor::from_vec(scales, (rows, cols), device)?,
            ))
        };
        let mut out = Vec::with_capacity(targets.len());
        for t in targets {
            let (indices_a, scales_a) = take(self.r, t.in_features)?;
            let (indices_b, scales_b) = take(t.out_features, self.r)?;
            out.push(Layout {
                indices_a,
                indices_b,
                scales_a,
                scales_b,
            });
        }
        Ok(out)
    }

    /// `theta_d` among an adapter file's model-level tensors (`base_model.unilora_theta_d`, shape
    /// `[theta_d_length]`), as a trainable variable; a missing vector or any other key is an error.
    pub fn theta_d_from_file(&self, file_shared: &SharedTensors) -> Result<Tensor> {
        let extra: Vec<String> = file_shared
            .keys()
            .filter(|k| *k != THETA_D_KEY)
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        let theta = file_shared
            .get(THETA_D_KEY)
            .ok_or_else(|| PeftError::MissingKey(THETA_D_KEY.into()))?;
        check_theta(theta, self)?;
        Ok(Var::from_tensor(theta)?.as_tensor().clone())
    }

    fn with_layouts(
        &self,
        theta: Tensor,
        targets: &[TargetLayer],
        device: &Device,
    ) -> Result<SharedTensors> {
        let mut shared = SharedTensors::from([(THETA_D_KEY.to_string(), theta)]);
        for (t, l) in targets.iter().zip(self.layouts(targets, device)?) {
            shared.insert(layout_key(&t.module, INDICES_A), l.indices_a);
            shared.insert(layout_key(&t.module, INDICES_B), l.indices_b);
            shared.insert(layout_key(&t.module, SCALES_A), l.scales_a);
            shared.insert(layout_key(&t.module, SCALES_B), l.scales_b);
        }
        Ok(shared)
    }
}

/// `theta_d` among an adapter's shared tensors; none given is an error that says where it comes from.
fn theta_d(shared: &SharedTensors) -> Result<&Tensor> {
    if shared.is_empty() {
        return Err(PeftError::Invalid(
            "UNILORA layers share a model-level theta_d: build them with `build_adapter_with_shared` / \
             `new_adapter_with_shared` and the tensors of `shared_tensors`"
                .into(),
        ));
    }
    shared
        .get(THETA_D_KEY)
        .ok_or_else(|| PeftError::MissingKey(THETA_D_KEY.into()))
}

/// The layout of `module` among the shared tensors, if it was drawn there.
fn layout_of(shared: &SharedTensors, module: &str) -> Option<Layout> {
    let get = |p: &str| shared.get(&layout_key(module, p)).cloned();
    Some(Layout {
        indices_a: get(INDICES_A)?,
        indices_b: get(INDICES_B)?,
        scales_a: get(SCALES_A)?,
        scales_b: get(SCALES_B)?,
    })
}

impl PeftMethod for UniLoraConfig {
    fn validate(&self) -> Result<()> {
        UniLoraConfig::validate(self)
    }

    fn modules_to_save(&self) -> Option<&[String]> {
        self.modules_to_save.as_deref()
    }

    fn target_spec(&self) -> Option<TargetSpec<'_>> {
        Some(UniLoraConfig::target_spec(self))
    }

    fn set_target_modules(&mut self, targets: Option<TargetModules>) {
        self.target_modules = targets;
    }

    /// LoRA's table (PEFT copies it for UniLoRA).
    fn default_target_modules(&self, model_type: &str) -> Option<TargetModules> {
        crate::tuners::constants::lookup(crate::tuners::constants::LORA_TARGET_MODULES, model_type)
    }

    /// PEFT's UniLoRA sets `fan_in_fan_out` on the config for each layer it wraps (true for a Conv1D, false
    /// for a Linear), so the saved value is the last targeted layer's.
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

    /// Without `save_indices` the file holds no tensor of any layer: the layers are the config's targets.
    fn layers_from_config(&self) -> bool {
        true
    }

    /// The file's `theta_d` (`file_shared`), or for a fresh adapter (`None`) one drawn from a fixed stream
    /// ([`PeftMethod::new_shared_tensors`] draws it from the model's seed instead); and every target's
    /// [`Layout`], drawn from `proj_seed` over `targets` in their order.
    fn shared_tensors(
        &self,
        file_shared: Option<&SharedTensors>,
        targets: &[TargetLayer],
        device: &Device,
    ) -> Result<SharedTensors> {
        match file_shared {
            Some(f) => self.with_layouts(self.theta_d_from_file(f)?, targets, device),
            None => self.new_shared_tensors(targets, device, &PeftRng::new(0)),
        }
    }

    fn new_shared_tensors(
        &self,
        targets: &[TargetLayer],
        device: &Device,
        rng: &PeftRng,
    ) -> Result<SharedTensors> {
        self.with_layouts(self.new_theta_d(device, rng)?, targets, device)
    }

    fn shares_tensors(&self) -> bool {
        true
    }

    /// PEFT always saves `theta_d`.
    fn saves_shared(&self) -> bool {
        true
    }

    fn build_adapter(
        &self,
        module: &str,
        base: &BaseLayer,
        tensors: &IndexMap<String, Tensor>,
        shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        let theta = theta_d(shared)?;
        Ok(Box::new(UniLoraAdapter::from_tensors(
            base,
            self,
            theta,
            layout_of(shared, module),
            tensors,
        )?))
    }

    fn new_adapter(
        &self,
        module: &str,
        base: &BaseLayer,
        _rng: &mut PeftRng,
        shared: &SharedTensors,
    ) -> Result<Box<dyn Adapter>> {
        let theta = theta_d(shared)?;
        let layout = layout_of(shared, module).ok_or_else(|| {
            PeftError::Invalid(format!(
                "UNILORA: `{module}` was not among the targets its shared tensors were drawn over"
            ))
        })?;
        Ok(Box::new(UniLoraAdapter::new(
            base,
            self,
            theta,
            layout,
            DType::F32,
        )?))
    }

    /// Linear (`[out, in]`) or GPT-2 Conv1D (`[in, out]`): from the saved indices' shapes when the file has
    /// them, else from `fan_in_fan_out`.
    fn infer_kind(
        &self,
        _module: &str,
        params: &IndexMap<String, Tensor>,
        wshape: &[usize],
    ) -> Result<BaseKind> {
        if wshape.len() != 2 {
            return Err(PeftError::Invalid(format!(
                "UniLoRA merges into Linear or Conv1D weights only, got a weight of shape {wshape:?}"
            )));
        }
        let i = params.get(INDICES_A).and_then(|t| t.dims().get(1).copied());
        let o = params.get(INDICES_B).and_then(|t| t.dims().first().copied());
        Ok(match (i, o) {
            (Some(i), Some(o)) if wshape == [i, o] && (i != o || self.fan_in_fan_out) => {
                BaseKind::Conv1D
            }
            (Some(_), Some(_)) => BaseKind::Linear,
            _ if self.fan_in_fan_out => BaseKind::Conv1D,
            _ => BaseKind::Linear,
        })
    }

    /// The rank, the length of `theta_d`, and whether the file holds the indices.
    fn summarize_module(&self, _module: &str, tensors: &[TensorInfo<'_>]) -> ModuleSummary {
        let mut flags = vec![format!("theta_d={}", self.theta_d_length)];
        if tensors.iter().any(|t| t.name == INDICES_A) {
            flags.push("indices_saved".into());
        }
        ModuleSummary {
            r: Some(self.r),
            flags,
            ..Default::default()
        }
    }
}
