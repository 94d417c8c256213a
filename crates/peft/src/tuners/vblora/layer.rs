//! The VB-LoRA adapter for Linear and GPT-2 Conv1D layers (PEFT's `tuners/vblora/layer.py`).
//!
//! One vector bank `[num_vectors, vector_length]` is shared by every layer of an adapter (the model-level
//! `base_model.vblora_vector_bank`, trained with the layers). Each layer trains two logits tensors,
//! `vblora_logits_A` `[r, in / vector_length, num_vectors]` and `vblora_logits_B`
//! `[out / vector_length, r, num_vectors]`. Every sub-vector of `A` and `B` is the softmax-weighted sum of the
//! `topk` bank vectors its logits rank highest:
//!
//! ```text
//! sub(l)  = Σ_{i ∈ topk(l)} softmax(l[topk(l)])_i · bank[i]                     ([vector_length])
//! A       = sub(logits_A)            [r, in_tile, vl] → [r, in]
//! B       = sub(logits_B)            [out_tile, r, vl] → [out_tile, vl, r] → [out, r]
//! y       = base(x) + (dropout(x) Aᵀ) Bᵀ
//! ΔW      = B A                      ([out, in]; transposed for Conv1D)
//! ```
//!
//! with no extra scale. Additive: merging adds `ΔW`, unmerging subtracts it, weighted merges scale it. An
//! adapter read from a `save_only_topk_weights` file ([`super::topk`]) holds logits that are `−∞` outside the
//! top k; it is for inference and merging only, and a training forward refuses it, as PEFT's does.

use super::config::VbLoraConfig;
use super::topk;
use crate::layer::base::linear_apply;
use crate::layer::{Adapter, BaseKind, BaseLayer, CallCtx, NamedTensor, check_shape};
use crate::{PeftError, PeftRng, Result};
use candle_core::{D, DType, Tensor, Var};
use indexmap::IndexMap;

/// `vblora_logits_A`.
pub const LOGITS_A: &str = "vblora_logits_A";
/// `vblora_logits_B`.
pub const LOGITS_B: &str = "vblora_logits_B";
/// `vblora_logits_A_topk_indices` (`save_only_topk_weights`).
pub const LOGITS_A_TOPK_INDICES: &str = "vblora_logits_A_topk_indices";
/// `vblora_logits_A_topk_weights` (`save_only_topk_weights`).
pub const LOGITS_A_TOPK_WEIGHTS: &str = "vblora_logits_A_topk_weights";
/// `vblora_logits_B_topk_indices` (`save_only_topk_weights`).
pub const LOGITS_B_TOPK_INDICES: &str = "vblora_logits_B_topk_indices";
/// `vblora_logits_B_topk_weights` (`save_only_topk_weights`).
pub const LOGITS_B_TOPK_WEIGHTS: &str = "vblora_logits_B_topk_weights";
/// The key of the shared vector bank in an adapter file.
pub const VECTOR_BANK_KEY: &str = "base_model.vblora_vector_bank";
/// The name of the shared vector bank among a layer's [`Adapter::vars`] (and among
/// [`crate::PeftModel::trainable_vars`], once for all layers).
pub const VECTOR_BANK: &str = "vblora_vector_bank";

/// The parameter names of VB-LoRA's per-layer tensors in a file key, in both file forms (the vector bank is
/// model-level).
pub const PARAM_PREFIXES: &[&str] = &[
    LOGITS_A,
    LOGITS_B,
    LOGITS_A_TOPK_INDICES,
    LOGITS_A_TOPK_WEIGHTS,
    LOGITS_B_TOPK_INDICES,
    LOGITS_B_TOPK_WEIGHTS,
];

/// The integer tensors of a VB-LoRA file (the top-k indices of `save_only_topk_weights`): the only integer
/// tensors [`crate::io::check_adapter_tensors`] admits, by the last component of their key.
pub const INTEGER_TENSORS: &[&str] = &[LOGITS_A_TOPK_INDICES, LOGITS_B_TOPK_INDICES];

/// The top-k form of one logits tensor as read from a file: `(indices, weights)`.
type TopkPair = (Tensor, Tensor);

/// One VB-LoRA adapter inside one Linear or Conv1D layer. The logits are f32 `Var`s; the vector bank is the
/// adapter's shared tensor (the same storage in every layer: a `Var` when it trains).
#[derive(Debug)]
pub struct VbLoraAdapter {
    kind: BaseKind,
    in_features: usize,
    out_features: usize,
    r: usize,
    topk: usize,
    logits_a: Var,
    logits_b: Var,
    bank: Tensor,
    dropout: f64,
    saved_dtype: DType,
    /// The `(A, B)` top-k tensors of a `save_only_topk_weights` file, kept as read (saving writes them back
    /// unchanged); `None` for full logits.
    topk_file: Option<(TopkPair, TopkPair)>,
    /// PEFT's check before a training forward: the logits hold `−∞` (a `save_only_topk_weights` adapter).
    inference_only: bool,
}

/// `in / vector_length` and `out / vector_length` of a Linear or Conv1D base, with PEFT's errors.
fn tiles(base: &BaseLayer, config: &VbLoraConfig) -> Result<(usize, usize)> {
    if !matches!(base.kind(), BaseKind::Linear | BaseKind::Conv1D) {
        return Err(PeftError::Unsupported {
            field: "target_modules".into(),
            value: format!("a {:?} layer", base.kind()),
            reason: "Currently, only `torch.nn.Linear` and `transformers.pytorch_utils.Conv1D` are supported \
                     by VB-LoRA (as in PEFT)"
                .into(),
        });
    }
    config.validate()?;
    let vl = config.vector_length;
    let (i, o) = (base.in_features(), base.out_features());
    if i % vl != 0 {
        return Err(PeftError::InvalidConfig(format!(
            "`in_features` {i} must be divisible by `vector_length` {vl}"
        )));
    }
    if o % vl != 0 {
        return Err(PeftError::InvalidConfig(format!(
            "`out_features` {o} must be divisible by `vector_length` {vl}"
        )));
    }
    Ok((i / vl, o / vl))
}

/// Checks the shared vector bank against the config.
fn check_bank(bank: &Tensor, config: &VbLoraConfig) -> Result<()> {
    check_shape(
        VECTOR_BANK_KEY,
        bank,
        &[config.num_vectors, config.vector_length],
    )?;
    if !bank.dtype().is_float() {
        return Err(PeftError::Invalid(format!(
            "`{VECTOR_BANK_KEY}` is {:?}; the vector bank is floating point",
            bank.dtype()
        )));
    }
    Ok(())
}

/// `Σ_{i ∈ topk(l)} softmax(l[topk(l)])_i · bank[i]` for every row of `logits` `[.., num_vectors]` →
/// `[.., vector_length]` (f32), differentiable in the logits and the bank (PEFT's `_get_low_rank_matrix`).
fn compose(logits: &Tensor, bank: &Tensor, k: usize) -> Result<Tensor> {
    let dims = logits.dims().to_vec();
    let n = dims[dims.len() - 1];
    let rows = logits.elem_count() / n.max(1);
    let values = logits.detach().flatten_all()?.to_vec1::<f32>()?;
    let idx = topk::topk_rows(&values, n, k);
    let idx = Tensor::from_vec(idx, (rows, k), logits.device())?;
    let top = logits.reshape((rows, n))?.gather(&idx, 1)?;
    // torch's softmax: exp(x − max) / Σ
    let max = top.max_keepdim(D::Minus1)?.detach();
    let e = top.broadcast_sub(&max)?.exp()?;
    let w = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    let bank = bank.to_dtype(DType::F32)?;
    let vl = bank.dim(1)?;
    let vecs = bank
        .index_select(&idx.flatten_all()?, 0)?
        .reshape((rows, k, vl))?;
    let out = vecs.broadcast_mul(&w.unsqueeze(2)?)?.sum(1)?;
    let mut shape = dims[..dims.len() - 1].to_vec();
    shape.push(vl);
    Ok(out.reshape(shape)?)
}

impl VbLoraAdapter {
    fn assemble(
        base: &BaseLayer,
        config: &VbLoraConfig,
        bank: &Tensor,
        logits: (Tensor, Tensor),
        saved_dtype: DType,
        topk_file: Option<(TopkPair, TopkPair)>,
    ) -> Result<Self> {
        let (la, lb) = logits;
        let first = la.get(0)?.get(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let inference_only = topk_file.is_some() || first.iter().any(|v| v.is_infinite());
        Ok(Self {
            kind: *base.kind(),
            in_features: base.in_features(),
            out_features: base.out_features(),
            r: config.r,
            topk: config.topk,
            logits_a: Var::from_tensor(&la.to_dtype(DType::F32)?)?,
            logits_b: Var::from_tensor(&lb.to_dtype(DType::F32)?)?,
            bank: bank.clone(),
            dropout: config.vblora_dropout,
            saved_dtype,
            topk_file,
            inference_only,
        })
    }

    /// A freshly initialised adapter (PEFT's `update_layer`): both logits drawn from
    /// `N(0, init_logits_std²)` (`vblora_logits_A` first), on the adapter's shared `bank`
    /// `[num_vectors, vector_length]`.
    pub fn new(
        base: &BaseLayer,
        config: &VbLoraConfig,
        bank: &Tensor,
        rng: &mut PeftRng,
    ) -> Result<Self> {
        let (ti, to) = tiles(base, config)?;
        check_bank(bank, config)?;
        let (r, nv, std) = (config.r, config.num_vectors, config.init_logits_std);
        let dev = base.device();
        let la = rng.normal_tensor((r, ti, nv), 0.0, std, DType::F32, dev)?;
        let lb = rng.normal_tensor((to, r, nv), 0.0, std, DType::F32, dev)?;
        Self::assemble(base, config, bank, (la, lb), DType::F32, None)
    }

    /// An adapter from the tensors PEFT saves for one module (keys relative to the module, adapter name
    /// stripped) and the adapter's shared `bank`: `vblora_logits_A` and `vblora_logits_B`, or, when the config
    /// says `save_only_topk_weights`, either those or their top-k pairs (`vblora_logits_A_topk_indices` /
    /// `…_topk_weights`, the same for `B`), from which the logits are recovered as PEFT does. Every key must
    /// be used.
    pub fn from_tensors(
        base: &BaseLayer,
        config: &VbLoraConfig,
        bank: &Tensor,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        let (ti, to) = tiles(base, config)?;
        check_bank(bank, config)?;
        let (r, nv, k) = (config.r, config.num_vectors, config.topk);
        let mut used: Vec<&str> = Vec::new();
        // (logits, saved dtype, the top-k pair when read in that form)
        let mut read = |name: &'static str,
                        idx_name: &'static str,
                        w_name: &'static str,
                        lead: (usize, usize)|
         -> Result<(Tensor, DType, Option<TopkPair>)> {
            let topk_pair = (tensors.get(idx_name), tensors.get(w_name));
            if let Some(l) = tensors.get(name) {
                used.push(name);
                check_shape(name, l, &[lead.0, lead.1, nv])?;
                if !l.dtype().is_float() {
                    return Err(PeftError::Invalid(format!(
                        "`{name}` is {:?}; logits are floating point",
                        l.dtype()
                    )));
                }
                return Ok((l.clone(), l.dtype(), None));
            }
            if config.save_only_topk_weights {
                match topk_pair {
                    (Some(i), Some(w)) => {
                        used.extend([idx_name, w_name]);
                        let l = topk::from_topk(i, w, lead, k, nv, (idx_name, w_name))?;
                        return Ok((l, w.dtype(), Some((i.clone(), w.clone()))));
                    }
                    (Some(_), None) => return Err(PeftError::MissingKey(w_name.into())),
                    (None, Some(_)) => return Err(PeftError::MissingKey(idx_name.into())),
                    (None, None) => {}
                }
            }
            Err(PeftError::MissingKey(name.into()))
        };
        let (la, dtype, ta) = read(
            LOGITS_A,
            LOGITS_A_TOPK_INDICES,
            LOGITS_A_TOPK_WEIGHTS,
            (r, ti),
        )?;
        let (lb, _, tb) = read(
            LOGITS_B,
            LOGITS_B_TOPK_INDICES,
            LOGITS_B_TOPK_WEIGHTS,
            (to, r),
        )?;
        let extra: Vec<String> = tensors
            .keys()
            .filter(|k| !used.contains(&k.as_str()))
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        let topk_file = match (ta, tb) {
            (Some(a), Some(b)) => Some((a, b)),
            _ => None,
        };
        Self::assemble(base, config, bank, (la, lb), dtype, topk_file)
    }

    /// `vblora_logits_A` `[r, in / vector_length, num_vectors]` (f32).
    pub fn logits_a(&self) -> &Tensor {
        self.logits_a.as_tensor()
    }

    /// `vblora_logits_B` `[out / vector_length, r, num_vectors]` (f32).
    pub fn logits_b(&self) -> &Tensor {
        self.logits_b.as_tensor()
    }

    /// The shared vector bank `[num_vectors, vector_length]`.
    pub fn vector_bank(&self) -> &Tensor {
        &self.bank
    }

    /// Whether the adapter was read from `save_only_topk_weights` tensors (or its logits hold `−∞`): it is
    /// for inference and merging only.
    pub fn is_inference_only(&self) -> bool {
        self.inference_only
    }

    /// The composed `A` `[r, in]` and `B` `[out, r]`, f32 (PEFT's `_get_lora_matrices`).
    pub fn lora_matrices(&self) -> Result<(Tensor, Tensor)> {
        let la = self.logits_a.as_tensor();
        let lb = self.logits_b.as_tensor();
        let a = compose(la, &self.bank, self.topk)?.reshape((self.r, self.in_features))?;
        let b = compose(lb, &self.bank, self.topk)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((self.out_features, self.r))?;
        Ok((a, b))
    }

    /// `ΔW = B A` in the base weight's layout (`[out, in]`, Conv1D `[in, out]`), f32 (PEFT's
    /// `get_delta_weight`).
    pub fn delta(&self) -> Result<Tensor> {
        let (a, b) = self.lora_matrices()?;
        let d = b.matmul(&a)?;
        Ok(match self.kind {
            BaseKind::Conv1D => d.t()?.contiguous()?,
            _ => d,
        })
    }

    fn check_kind(&self, kind: &BaseKind) -> Result<()> {
        if *kind != self.kind {
            return Err(PeftError::Invalid(format!(
                "VB-LoRA adapter for {:?} used on a {kind:?} layer",
                self.kind
            )));
        }
        Ok(())
    }
}

impl Adapter for VbLoraAdapter {
    /// PEFT's `supports_lora_conversion`: Linear and GPT-2 Conv1D layers, by their additive delta.
    fn lora_conversion(
        &self,
        base: &crate::layer::BaseLayer,
    ) -> Result<Option<crate::layer::LoraConversion>> {
        crate::tuners::lora::conversion::additive_conversion(self, base, true)
    }

    fn peft_type(&self) -> &'static str {
        "VBLORA"
    }

    fn transform_output(
        &self,
        base: &BaseLayer,
        x: &Tensor,
        result: Tensor,
        ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        self.check_kind(base.kind())?;
        if ctx.fwd.training && self.inference_only {
            return Err(PeftError::Invalid(format!(
                "{}: found infinity values in the VB-LoRA logits of adapter `{}`: it was read from a \
                 `save_only_topk_weights` file, which is for inference and merging only (as in PEFT); train \
                 from an adapter saved with its full logits",
                ctx.module, ctx.adapter
            )));
        }
        let x = x.to_dtype(DType::F32)?;
        let x = if ctx.fwd.training && self.dropout > 0.0 {
            let mask = ctx
                .rng("vblora_dropout")
                .dropout_mask(x.shape(), self.dropout, x.device())?;
            x.mul(&mask)?
        } else {
            x
        };
        let (a, b) = self.lora_matrices()?;
        let h = linear_apply(&linear_apply(&x, &a, true)?, &b, true)?;
        Ok((result.to_dtype(DType::F32)? + h)?)
    }

    fn delta_weight(&self, kind: &BaseKind) -> Result<Option<(Tensor, Option<Tensor>)>> {
        self.check_kind(kind)?;
        Ok(Some((self.delta()?, None)))
    }

    /// The logits, or for an adapter read from a `save_only_topk_weights` file its top-k tensors as read
    /// (the model-level vector bank is saved by the model).
    fn tensors(&self) -> Vec<NamedTensor> {
        match &self.topk_file {
            Some(((ai, aw), (bi, bw))) => vec![
                (LOGITS_A_TOPK_INDICES.into(), ai.clone()),
                (LOGITS_A_TOPK_WEIGHTS.into(), aw.clone()),
                (LOGITS_B_TOPK_INDICES.into(), bi.clone()),
                (LOGITS_B_TOPK_WEIGHTS.into(), bw.clone()),
            ],
            None => vec![
                (LOGITS_A.into(), self.logits_a.as_tensor().clone()),
                (LOGITS_B.into(), self.logits_b.as_tensor().clone()),
            ],
        }
    }

    /// The logits and, when it trains (a `Var`), the shared vector bank as [`VECTOR_BANK`]: the same `Var`
    /// in every layer, which [`crate::PeftModel::trainable_vars`] lists once.
    fn vars(&self) -> Vec<(String, Var)> {
        let mut v = vec![
            (LOGITS_A.to_string(), self.logits_a.clone()),
            (LOGITS_B.to_string(), self.logits_b.clone()),
        ];
        if self.bank.is_variable()
            && let Ok(bank) = Var::from_tensor(&self.bank)
        {
            v.push((VECTOR_BANK.to_string(), bank));
        }
        v
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        format!(
            "r={} topk={} shared vector bank [{}, {}]{}",
            self.r,
            self.topk,
            self.bank.dim(0).unwrap_or(0),
            self.bank.dim(1).unwrap_or(0),
            if self.topk_file.is_some() {
                " (top-k weights only: inference)"
            } else {
                ""
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AdapterSlot, ForwardCtx};
    use candle_core::Device;

    fn setup(kind: BaseKind) -> (BaseLayer, VbLoraConfig, Tensor, PeftRng) {
        let mut rng = PeftRng::new(5);
        let shape = match kind {
            BaseKind::Conv1D => [8, 12],
            _ => [12, 8],
        };
        let w = rng
            .normal_tensor(&shape, 0.0, 1.0, DType::F32, &Device::Cpu)
            .unwrap();
        let base = BaseLayer::new(kind, w, None).unwrap();
        let cfg = VbLoraConfig {
            r: 3,
            num_vectors: 6,
            vector_length: 4,
            topk: 2,
            init_logits_std: 1.0,
            init_vector_bank_bound: 0.5,
            ..Default::default()
        };
        let bank = Var::from_tensor(
            &rng.uniform_tensor((6, 4), -0.5, 0.5, DType::F32, &Device::Cpu)
                .unwrap(),
        )
        .unwrap()
        .as_tensor()
        .clone();
        (base, cfg, bank, rng)
    }

    #[test]
    fn forward_equals_the_merged_delta_on_linear_and_conv1d() {
        for kind in [BaseKind::Linear, BaseKind::Conv1D] {
            let (base, cfg, bank, mut rng) = setup(kind);
            let a = VbLoraAdapter::new(&base, &cfg, &bank, &mut rng).unwrap();
            let delta = a.delta().unwrap();
            assert!(delta.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 1e-3);
            let w = base.weight().unwrap();
            let merged = (&w + &delta).unwrap();
            let x = rng
                .normal_tensor(&[2, 3, 8], 0.0, 1.0, DType::F32, &Device::Cpu)
                .unwrap();
            let want = BaseLayer::new(kind, merged, None)
                .unwrap()
                .forward(&x)
                .unwrap();
            let mut slot = AdapterSlot::new("fc", base);
            slot.add_adapter("default", Box::new(a)).unwrap();
            let ctx = ForwardCtx::eval();
            let y = slot.forward(&x, &ctx).unwrap();
            assert!(peft_test_support::max_diff(&y, &want) < 1e-5, "{kind:?}");
            slot.merge(None).unwrap();
            assert!(peft_test_support::max_diff(&slot.forward(&x, &ctx).unwrap(), &want) < 1e-5);
            slot.unmerge().unwrap();
            assert!(peft_test_support::max_diff(&slot.base().weight().unwrap(), &w) < 1e-5);
        }
    }

    #[test]
    fn gradients_reach_the_logits_and_the_shared_bank() {
        let (base, cfg, bank, mut rng) = setup(BaseKind::Linear);
        let a = VbLoraAdapter::new(&base, &cfg, &bank, &mut rng).unwrap();
        let b = VbLoraAdapter::new(&base, &cfg, &bank, &mut rng).unwrap();
        let vars: Vec<Var> = a.vars().into_iter().map(|(_, v)| v).collect();
        assert_eq!(vars.len(), 3);
        // both layers hold the one bank
        assert_eq!(b.vars()[2].1.as_tensor().id(), vars[2].as_tensor().id());
        let x = rng
            .normal_tensor(&[4, 8], 0.0, 1.0, DType::F32, &Device::Cpu)
            .unwrap();
        let mut slot = AdapterSlot::new("fc", base);
        slot.add_adapter("default", Box::new(a)).unwrap();
        let y = slot.forward(&x, &ForwardCtx::train(0, 0)).unwrap();
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for v in &vars {
            let g = grads.get(v.as_tensor()).expect("a gradient");
            let total = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(total.is_finite() && total > 0.0, "{total}");
        }
    }

    #[test]
    fn topk_loaded_adapter_gives_the_same_forward_and_refuses_training() {
        let (base, cfg, bank, mut rng) = setup(BaseKind::Linear);
        let a = VbLoraAdapter::new(&base, &cfg, &bank, &mut rng).unwrap();
        let mut tensors = IndexMap::new();
        for (name, l) in [(LOGITS_A, a.logits_a()), (LOGITS_B, a.logits_b())] {
            let (i, w) = topk::to_topk(l, cfg.topk, cfg.num_vectors).unwrap();
            tensors.insert(format!("{name}_topk_indices"), i);
            tensors.insert(format!("{name}_topk_weights"), w);
        }
        // without `save_only_topk_weights` the top-k form is not read (PEFT does not remap it)
        let e = VbLoraAdapter::from_tensors(&base, &cfg, &bank, &tensors).unwrap_err();
        assert!(matches!(&e, PeftError::MissingKey(k) if k == LOGITS_A), "{e}");
        let topk_cfg = VbLoraConfig {
            save_only_topk_weights: true,
            ..cfg.clone()
        };
        let t = VbLoraAdapter::from_tensors(&base, &topk_cfg, &bank, &tensors).unwrap();
        assert!(t.is_inference_only() && !a.is_inference_only());
        assert!(peft_test_support::max_diff(&t.delta().unwrap(), &a.delta().unwrap()) < 1e-6);
        let saved: Vec<String> = t.tensors().into_iter().map(|(k, _)| k).collect();
        assert_eq!(saved, [LOGITS_A_TOPK_INDICES, LOGITS_A_TOPK_WEIGHTS, LOGITS_B_TOPK_INDICES, LOGITS_B_TOPK_WEIGHTS]);
        let x = rng
            .normal_tensor(&[2, 8], 0.0, 1.0, DType::F32, &Device::Cpu)
            .unwrap();
        let mut slot = AdapterSlot::new("fc", base);
        slot.add_adapter("default", Box::new(t)).unwrap();
        slot.forward(&x, &ForwardCtx::eval()).unwrap();
        let e = slot.forward(&x, &ForwardCtx::train(0, 0)).unwrap_err();
        assert!(e.to_string().contains("save_only_topk_weights"), "{e}");
    }

    #[test]
    fn unsupported_layers_and_indivisible_sizes_are_refused() {
        let (base, cfg, bank, mut rng) = setup(BaseKind::Linear);
        let emb = BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let e = VbLoraAdapter::new(&emb, &cfg, &bank, &mut rng).unwrap_err();
        assert!(matches!(e, PeftError::Unsupported { .. }), "{e}");
        let odd = VbLoraConfig {
            vector_length: 3,
            ..cfg.clone()
        };
        let e = VbLoraAdapter::new(&base, &odd, &bank, &mut rng).unwrap_err();
        assert!(e.to_string().contains("divisible by `vector_length` 3"), "{e}");
        let small = Tensor::zeros((5, 4), DType::F32, &Device::Cpu).unwrap();
        let e = VbLoraAdapter::new(&base, &cfg, &small, &mut rng).unwrap_err();
        assert!(matches!(e, PeftError::ShapeMismatch { .. }), "{e}");
    }
}
