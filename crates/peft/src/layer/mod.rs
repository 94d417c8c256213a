//! The adapter slot: what a model holds where it would hold a Linear, Embedding, Conv2d or GPT-2 Conv1D.
//!
//! An [`AdapterSlot`] owns a frozen [`BaseLayer`] and any number of named adapters, each a boxed
//! [`Adapter`] trait object. Every PEFT method implements [`Adapter`] in its own folder under
//! [`crate::tuners`]; the slot only orchestrates:
//!
//! ```text
//! x ──► transform_input (each active adapter, in order: OFT/BOFT rotate, IA3-feedforward scales)
//!   ──► base op (x W^T + b, embedding lookup, conv2d, x W + b)
//!   ──► transform_output (each active adapter, in order: LoRA adds, DoRA rescales, IA3 scales)
//! ```
//!
//! Merging works on weights: [`Adapter::merge`] maps `(W, b) → (W', b')` in f32, and the slot rounds once to
//! the base dtype. Additive methods also expose [`Adapter::delta_weight`], which weighted merges use.
//!
//! Forward takes `&self`; all types are `Send + Sync`, so one model can serve many threads. Random draws in
//! training (dropout) come from [`ForwardCtx`], which derives a stream per module and adapter from one seed.

pub(crate) mod base;
pub mod modules_to_save;
pub mod registry;

pub use base::{BaseKind, BaseLayer, Conv2dSpec};

use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;

/// Per-call state of a forward pass: training or inference, and where dropout draws come from.
///
/// Draws are derived from `(seed, step, module, adapter)`, so a forward pass needs no mutable state and a
/// training run resumes exactly from `(seed, step)`.
#[derive(Clone, Debug, Default)]
pub struct ForwardCtx {
    /// Whether dropout and other training-only behaviour is on.
    pub training: bool,
    /// Seed of the run.
    pub seed: u64,
    /// A counter that must change between forward passes that should draw fresh dropout masks (the training
    /// step times the number of micro-batches, plus the micro-batch).
    pub step: u64,
    /// PEFT's mixed batch (`model(…, adapter_names=[…])`): the adapter each row of the batch (the first
    /// dimension of every layer input) runs with, `"__base__"` for none. `None`: the active adapters
    /// for every row. Set it with [`ForwardCtx::with_adapter_names`].
    pub adapter_names: Option<std::sync::Arc<[String]>>,
    /// No gradient will be asked of this forward (`torch.no_grad()`): a model may then drop each block's
    /// autograd graph as soon as the block is done (the Llama detaches the hidden states between decoder
    /// layers), so that an evaluation holds one layer's activations instead of all of them. Set by
    /// [`ForwardCtx::inference`].
    pub no_grad: bool,
}

/// The name that, in [`ForwardCtx::adapter_names`], runs a row on the base model alone (PEFT's `"__base__"`).
pub const BASE_ADAPTER_NAME: &str = "__base__";

impl ForwardCtx {
    /// Inference: no dropout.
    pub fn eval() -> Self {
        Self::default()
    }

    /// Inference under `torch.no_grad()`: no dropout, and no gradient will be taken
    /// ([`ForwardCtx::no_grad`]), so models free activations as they go. Evaluation and generation use it.
    ///
    /// ```
    /// use peft::ForwardCtx;
    /// let ctx = ForwardCtx::inference();
    /// assert!(ctx.no_grad && !ctx.training);
    /// ```
    pub fn inference() -> Self {
        Self {
            no_grad: true,
            ..Self::default()
        }
    }

    /// Training with dropout drawn from `seed` at `step`.
    pub fn train(seed: u64, step: u64) -> Self {
        Self {
            training: true,
            seed,
            step,
            adapter_names: None,
            no_grad: false,
        }
    }

    /// This context with one adapter per batch row (PEFT's mixed batch, `adapter_names`; [`BASE_ADAPTER_NAME`]
    /// for the base model alone): every row gives what it gives alone with that adapter active. Unlike PEFT,
    /// every layer method takes part (DoRA, IA3, OFT, … as well as LoRA and `modules_to_save`), and training
    /// works too (each adapter gets the gradient of its own rows). A layer refuses it while adapters are
    /// merged. The rows are grouped into one contiguous segment per adapter ([`group_rows`]); models reorder
    /// the batch once per call. [`crate::PeftModel::check_adapter_names`] checks the names against the model's
    /// adapters first.
    ///
    /// ```
    /// use peft::ForwardCtx;
    /// let ctx = ForwardCtx::eval().with_adapter_names(&["default", "__base__", "other"]);
    /// assert_eq!(ctx.adapter_names.as_deref().map(|n| n.len()), Some(3));
    /// ```
    pub fn with_adapter_names(mut self, names: &[impl AsRef<str>]) -> Self {
        self.adapter_names = Some(names.iter().map(|n| n.as_ref().to_string()).collect());
        self
    }

    /// The random stream for one use (`what`, e.g. `"dropout"`) in one adapter of one module.
    pub fn rng(&self, module: &str, adapter: &str, what: &str) -> PeftRng {
        PeftRng::new(self.seed).fork(&format!("{}/{module}/{adapter}/{what}", self.step))
    }
}

/// What an adapter sees of its call: the module it sits in, its own name and the forward context.
#[derive(Clone, Copy, Debug)]
pub struct CallCtx<'a> {
    /// The module's dotted name (`model.layers.0.self_attn.q_proj`).
    pub module: &'a str,
    /// The adapter's name (`default`).
    pub adapter: &'a str,
    /// The forward context.
    pub fwd: &'a ForwardCtx,
}

impl CallCtx<'_> {
    /// The random stream for `what` in this module and adapter.
    pub fn rng(&self, what: &str) -> PeftRng {
        self.fwd.rng(self.module, self.adapter, what)
    }
}

/// The result of merging one adapter into a weight: the new weight and bias (f32), and what the adapter
/// needs to undo it (DoRA keeps the weight norm it divided by, as PEFT's `_cache_store` does).
#[derive(Clone, Debug)]
pub struct Merged {
    /// The merged weight, f32.
    pub weight: Tensor,
    /// The merged bias, f32 (`None` when the layer has none).
    pub bias: Option<Tensor>,
    /// State [`Adapter::unmerge`] needs, if any.
    pub cache: Option<Tensor>,
}

/// A linear projection of a gradient that an adapter asks for ([`Adapter::gradient_projection`]), applied
/// by the trainer to the accumulated gradient before clipping (PEFT's `register_hook` on the parameter).
///
/// ```
/// use candle_core::{Device, Tensor};
/// use peft::layer::GradProjection;
/// let q = Tensor::new(&[[1f32], [0.]], &Device::Cpu)?; // the first axis
/// let g = Tensor::new(&[[3f32, 4.], [5., 6.]], &Device::Cpu)?;
/// let p = GradProjection::Left(q).apply(&g)?;
/// assert_eq!(p.to_vec2::<f32>()?, [[0., 0.], [5., 6.]]);
/// # Ok::<(), peft::PeftError>(())
/// ```
#[derive(Clone, Debug)]
pub enum GradProjection {
    /// `g − Q·(Qᵀ·g)`: removes the column space of the orthonormal `Q` `[rows, k]`.
    Left(Tensor),
    /// `g − (g·Qᵀ)·Q`: removes the row space of the orthonormal `Q` `[k, cols]`.
    Right(Tensor),
}

impl GradProjection {
    /// The projected gradient (f32).
    pub fn apply(&self, g: &Tensor) -> Result<Tensor> {
        let g32 = g.to_dtype(DType::F32)?;
        let out = match self {
            GradProjection::Left(q) => {
                let q = q.to_dtype(DType::F32)?;
                (&g32 - q.matmul(&q.t()?.matmul(&g32)?)?)?
            }
            GradProjection::Right(q) => {
                let q = q.to_dtype(DType::F32)?;
                (&g32 - g32.matmul(&q.t()?)?.matmul(&q)?)?
            }
        };
        Ok(out.to_dtype(g.dtype())?)
    }
}

/// The weights an adapter merges into, all f32.
#[derive(Clone, Copy, Debug)]
pub struct MergeInput<'a> {
    /// What kind of layer the weights belong to.
    pub kind: &'a BaseKind,
    /// The current weight (it may already hold adapters merged before this one).
    pub weight: &'a Tensor,
    /// The current bias.
    pub bias: Option<&'a Tensor>,
    /// The weight with every previously merged adapter taken out (PEFT's `_unmerged_base_weight`), which
    /// DoRA's norm is computed from.
    pub unmerged_weight: &'a Tensor,
    /// The bias with every previously merged adapter taken out (GLoRA's bias update reads the original
    /// bias); the current bias when nothing is merged.
    pub unmerged_bias: Option<&'a Tensor>,
}

/// What a layer gives PEFT's conversion to LoRA ([`Adapter::lora_conversion`]).
#[derive(Clone, Debug)]
pub enum LoraConversion {
    /// The additive update `ΔW` in the base weight's layout (`[out, in]`, GPT-2's Conv1D `[in, out]`), whose
    /// truncated SVD becomes the LoRA factors.
    Delta(Tensor),
    /// Exact factors `A` `[r, in]` and `B` `[out, r]` with `B·A = ΔW` (PEFT's MiSS outside "bat"), used as
    /// they are at their own rank.
    Factors {
        /// `lora_A` `[r, in]`.
        a: Tensor,
        /// `lora_B` `[out, r]`.
        b: Tensor,
    },
}

/// A named tensor an adapter saves, with its key relative to the module and without the adapter name
/// (`lora_A.weight`, `lora_magnitude_vector`, `ia3_l`).
pub type NamedTensor = (String, Tensor);

/// `(W ± ΔW, b ± Δb)` with the adapter's [`Adapter::delta_weight`], its shape checked against the weight's.
fn apply_delta<A: Adapter + ?Sized>(
    adapter: &A,
    input: &MergeInput<'_>,
    sign: f64,
) -> Result<(Tensor, Option<Tensor>)> {
    let (delta, delta_bias) = adapter.delta_weight(input.kind)?.ok_or_else(|| {
        PeftError::Invalid(format!(
            "{} is not additive: its adapter must implement its own merge",
            adapter.peft_type()
        ))
    })?;
    if input.weight.dims() != delta.dims() {
        return Err(PeftError::Invalid(format!(
            "{} adapter for a weight of shape {:?} merged into one of shape {:?}",
            adapter.peft_type(),
            delta.dims(),
            input.weight.dims()
        )));
    }
    let weight = if sign > 0.0 {
        (input.weight + delta)?
    } else {
        (input.weight - delta)?
    };
    let bias = match (input.bias, delta_bias) {
        (b, None) => b.cloned(),
        (Some(b), Some(db)) => Some((b + (db * sign)?)?),
        (None, Some(_)) => {
            return Err(PeftError::Invalid(format!(
                "{}: the adapter changes the bias but the base layer has none",
                adapter.peft_type()
            )));
        }
    };
    Ok((weight, bias))
}

/// One PEFT method's adapter inside one layer.
///
/// Implementations own their forward around the base op and their merge; the slot calls them in the order
/// of the active adapters. All tensors returned by `merge` / `unmerge` / `delta_weight` are f32.
pub trait Adapter: Send + Sync + std::fmt::Debug {
    /// The method's `peft_type` (`"LORA"`, `"IA3"`, …).
    fn peft_type(&self) -> &'static str;

    /// Transforms the layer input before the base op. The default leaves it unchanged.
    fn transform_input(&self, _base: &BaseLayer, x: Tensor, _ctx: &CallCtx<'_>) -> Result<Tensor> {
        Ok(x)
    }

    /// Transforms the running output `result` (the base output plus what earlier active adapters did).
    /// `x` is the input as the layer received it.
    fn transform_output(
        &self,
        base: &BaseLayer,
        x: &Tensor,
        result: Tensor,
        ctx: &CallCtx<'_>,
    ) -> Result<Tensor>;

    /// Merges the adapter into `(W, b)`. The default is the additive merge `(W + ΔW, b + Δb)` from
    /// [`Adapter::delta_weight`], which must then be `Some`; methods that are not additive (DoRA, IA3, OFT, …)
    /// implement their own.
    fn merge(&self, input: MergeInput<'_>) -> Result<Merged> {
        let (weight, bias) = apply_delta(self, &input, 1.0)?;
        Ok(Merged {
            weight,
            bias,
            cache: None,
        })
    }

    /// Undoes [`Adapter::merge`]: `(W', b') → (W, b)`, given the merge's cache. The default subtracts
    /// [`Adapter::delta_weight`].
    fn unmerge(
        &self,
        input: MergeInput<'_>,
        _cache: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        apply_delta(self, &input, -1.0)
    }

    /// The adapter to put on a layer whose weight is tied to this one's (`lm_head` with tied embeddings), sharing
    /// this adapter's parameters, or `None` (the default: the tied layer is left alone, as PEFT does for every
    /// method but trainable tokens).
    fn tied_copy(&self, _base: &BaseLayer) -> Result<Option<Box<dyn Adapter>>> {
        Ok(None)
    }

    /// For additive methods, the `(ΔW, Δb)` that [`Adapter::merge`] adds, in the base weight's layout; `None`
    /// for methods that are not additive (DoRA, IA3, OFT, …). Weighted merges need it.
    fn delta_weight(&self, _kind: &BaseKind) -> Result<Option<(Tensor, Option<Tensor>)>> {
        Ok(None)
    }

    /// What PEFT's conversion to LoRA (`tuners/lora/conversion.py`) factorizes for this layer, or `None` where
    /// PEFT's layer class says `supports_lora_conversion() == False` (the default: multiplicative methods such
    /// as IA3, OFT, HiRA, DoRA, and sparse ones such as SHiRA). `base` is the layer the adapter sits on.
    /// See [`crate::tuners::lora::conversion`].
    fn lora_conversion(&self, _base: &BaseLayer) -> Result<Option<LoraConversion>> {
        Ok(None)
    }

    /// Whether merging needs [`MergeInput::unmerged_weight`] (the slot then computes it).
    fn needs_unmerged_weight(&self) -> bool {
        false
    }

    /// The tensors saved for this adapter, keys relative to the module, without the adapter name.
    fn tensors(&self) -> Vec<NamedTensor>;

    /// The trainable parameters, keyed as [`Adapter::tensors`].
    fn vars(&self) -> Vec<(String, Var)>;

    /// The dtype the adapter was created or loaded in; saving converts back to it.
    fn saved_dtype(&self) -> DType;

    /// Human-readable sizes for `peft inspect` (e.g. `r=8 alpha=16`).
    fn describe(&self) -> String;

    /// Whether the slot may run this adapter's forward steps in turn with other active adapters (`true` by
    /// default). BOFT says `false`: PEFT composes several active BOFT adapters into one rotation in an order
    /// the per-adapter steps cannot give, so the forward refuses that combination (merging stays exact).
    fn stacks_with_others(&self) -> bool {
        true
    }

    /// Whether the adapter can serve some rows of a mixed batch ([`ForwardCtx::adapter_names`]): its
    /// [`Adapter::transform_input`], the base op and [`Adapter::transform_output`] run on those rows alone,
    /// which holds for every method whose forward acts on each row by itself (all of PEFT's layer methods).
    /// `true` by default; a method whose forward mixes rows must say `false`.
    fn supports_mixed_batch(&self) -> bool {
        true
    }

    /// How the trainer must project the gradient of the variable `var` (a key of [`Adapter::vars`]) before
    /// the optimizer sees it, if at all (OSF keeps its trained singular vectors orthogonal to the frozen
    /// ones, PEFT's gradient hooks). `None` by default.
    fn gradient_projection(&self, _var: &str) -> Option<GradProjection> {
        None
    }

    /// A warning to show when this adapter is merged, if merging it does not reproduce its unmerged forward
    /// (OFT on a Conv2d with a kernel larger than 1×1, as in PEFT). `None` by default.
    fn merge_warning(&self) -> Option<String> {
        None
    }
}

/// The slot a model holds instead of a plain layer: a frozen base plus named adapters.
///
/// ```
/// use candle_core::{Device, Tensor, DType};
/// use peft::{AdapterSlot, BaseLayer, ForwardCtx};
/// # fn main() -> peft::Result<()> {
/// let w = Tensor::ones((3, 4), DType::F32, &Device::Cpu)?;
/// let slot = AdapterSlot::new("fc1", BaseLayer::linear(w, None)?);
/// let x = Tensor::ones((2, 4), DType::F32, &Device::Cpu)?;
/// let y = slot.forward(&x, &ForwardCtx::eval())?; // no adapters yet: the plain linear
/// assert_eq!(y.to_vec2::<f32>()?, vec![vec![4.0; 3]; 2]);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct AdapterSlot {
    name: String,
    base: BaseLayer,
    adapters: IndexMap<String, Box<dyn Adapter>>,
    active: Vec<String>,
    merged: Vec<(String, Option<Tensor>)>,
    disabled: bool,
}

impl AdapterSlot {
    /// A slot around `base`, named by the module's dotted name.
    pub fn new(name: impl Into<String>, base: BaseLayer) -> Self {
        Self {
            name: name.into(),
            base,
            adapters: IndexMap::new(),
            active: Vec::new(),
            merged: Vec::new(),
            disabled: false,
        }
    }

    /// The module's dotted name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The base layer (with merged adapters baked in, if any).
    pub fn base(&self) -> &BaseLayer {
        &self.base
    }

    /// Replaces the base weight and bias (e.g. when an adapter file carries trained biases or saved embedding
    /// matrices). Refused while adapters are merged.
    pub fn set_base_tensors(&mut self, weight: Option<Tensor>, bias: Option<Tensor>) -> Result<()> {
        if !self.merged.is_empty() {
            return Err(PeftError::Invalid(format!(
                "{}: cannot replace base tensors while adapters are merged",
                self.name
            )));
        }
        if let Some(w) = weight {
            self.base.replace_weight(w)?;
        }
        if let Some(b) = bias {
            self.base.replace_bias(b)?;
        }
        Ok(())
    }

    /// Replaces the base weight with `weight` as given (same storage, no copy; cast to the current dtype),
    /// **whether or not adapters are merged**: for a weight tied to another slot's
    /// ([`crate::host::AdapterHost::tied_weights`]), which [`crate::PeftModel`] calls after the other slot
    /// merged into (or unmerged from) the one shared matrix. The adapters merged here stay recorded as merged,
    /// with their undo state, and the bias is left alone. The shape must be the current one.
    pub fn set_tied_weight(&mut self, weight: Tensor) -> Result<()> {
        let dtype = self.base.dtype();
        self.base.replace_weight_shared(weight.to_dtype(dtype)?)
    }

    /// Adds an adapter under `name`; it becomes active if no adapter was active.
    pub fn add_adapter(
        &mut self,
        name: impl Into<String>,
        adapter: Box<dyn Adapter>,
    ) -> Result<()> {
        let name = name.into();
        if self.merged.iter().any(|(n, _)| n == &name) {
            return Err(PeftError::AdapterMerged {
                module: self.name.clone(),
                adapter: name.to_string(),
            });
        }
        self.adapters.insert(name.clone(), adapter);
        if self.active.is_empty() {
            self.active.push(name);
        }
        Ok(())
    }

    /// Replaces the adapter `name` by `adapter`, keeping its place in the slot and among the active adapters
    /// (PEFT's hot-swap). Refused while it is merged, or when the slot holds no adapter of that name.
    pub fn replace_adapter(&mut self, name: &str, adapter: Box<dyn Adapter>) -> Result<()> {
        if self.merged.iter().any(|(n, _)| n == name) {
            return Err(PeftError::AdapterMerged {
                module: self.name.clone(),
                adapter: name.to_string(),
            });
        }
        let slot = self
            .adapters
            .get_mut(name)
            .ok_or_else(|| PeftError::UnknownAdapter(name.to_string()))?;
        *slot = adapter;
        Ok(())
    }

    /// Removes an adapter. Refused while it is merged.
    pub fn delete_adapter(&mut self, name: &str) -> Result<Box<dyn Adapter>> {
        if self.merged.iter().any(|(n, _)| n == name) {
            return Err(PeftError::AdapterMerged {
                module: self.name.clone(),
                adapter: name.to_string(),
            });
        }
        let a = self
            .adapters
            .shift_remove(name)
            .ok_or_else(|| PeftError::UnknownAdapter(name.to_string()))?;
        self.active.retain(|n| n != name);
        Ok(a)
    }

    /// The adapters by name, in insertion order.
    pub fn adapters(&self) -> impl Iterator<Item = (&str, &dyn Adapter)> {
        self.adapters.iter().map(|(k, v)| (k.as_str(), v.as_ref()))
    }

    /// One adapter by name.
    pub fn adapter(&self, name: &str) -> Option<&dyn Adapter> {
        self.adapters.get(name).map(|a| a.as_ref())
    }

    /// Sets the active adapters, in the order they apply. Names this slot does not hold are skipped (PEFT
    /// sets the same list on every layer, whether or not the adapter targets it).
    pub fn set_active(&mut self, names: &[&str]) {
        self.active = names
            .iter()
            .filter(|n| self.adapters.contains_key(**n))
            .map(|n| n.to_string())
            .collect();
    }

    /// The active adapters, in order.
    pub fn active(&self) -> &[String] {
        &self.active
    }

    /// Disables (or re-enables) every adapter: forward then runs the base layer alone.
    pub fn set_disabled(&mut self, disabled: bool) {
        self.disabled = disabled;
    }

    /// Whether adapters are disabled.
    pub fn is_disabled(&self) -> bool {
        self.disabled
    }

    /// The merged adapters, in merge order.
    pub fn merged(&self) -> Vec<&str> {
        self.merged.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The forward pass.
    ///
    /// Like PEFT: with adapters merged, the base (holding them) runs alone; disabled runs the base alone
    /// (an error while merged, since the base then still holds the adapters: unmerge first).
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        if self.disabled {
            if !self.merged.is_empty() {
                return Err(PeftError::DisabledWhileMerged {
                    module: self.name.clone(),
                    merged: self.merged().into_iter().map(str::to_string).collect(),
                });
            }
            return self.base.forward(x);
        }
        if let Some(names) = &ctx.adapter_names {
            return self.mixed_batch_forward(x, names, ctx);
        }
        if !self.merged.is_empty() || self.active.is_empty() {
            return self.base.forward(x);
        }
        if self.active.len() > 1
            && let Some(lone) = self
                .active
                .iter()
                .find(|n| !self.adapters[n.as_str()].stacks_with_others())
        {
            return Err(PeftError::Unsupported {
                field: "active adapters".into(),
                value: format!("{:?} on {}", self.active, self.name),
                reason: format!(
                    "`{lone}` ({}) cannot run together with other active adapters in one layer (PEFT composes \
                     several active adapters of this method into one transform); activate one, or merge them",
                    self.adapters[lone.as_str()].peft_type()
                ),
            });
        }
        let mut xin = x.clone();
        for name in &self.active {
            let call = CallCtx {
                module: &self.name,
                adapter: name,
                fwd: ctx,
            };
            xin = self.adapters[name.as_str()].transform_input(&self.base, xin, &call)?;
        }
        let mut y = self.base.forward(&xin)?;
        let out_dtype = y.dtype();
        for name in &self.active {
            let call = CallCtx {
                module: &self.name,
                adapter: name,
                fwd: ctx,
            };
            y = self.adapters[name.as_str()].transform_output(&self.base, x, y, &call)?;
        }
        Ok(y.to_dtype(out_dtype)?)
    }

    /// PEFT's `_mixed_batch_forward`, for every method: row `i` of `x`'s first dimension runs with adapter
    /// `names[i]` alone; rows named [`BASE_ADAPTER_NAME`] or an adapter this layer does not hold run the base.
    ///
    /// The rows are split into contiguous segments of one adapter each (a batch the model already grouped,
    /// see [`group_rows`], is used as it is; otherwise the rows are gathered into that order once and put back
    /// at the end). Adapters that only transform the output (LoRA, DoRA, IA3, VeRA, LoHa, LoKr, AdaLoRA,
    /// `modules_to_save`) share one base product over all rows and transform their segment of it; when some
    /// segment's adapter transforms the input (OFT, BOFT, feed-forward IA3), every segment runs its own base
    /// product. In inference the segments are written into the base output in place (LoRA accumulates into it
    /// directly); with gradients they are concatenated, so training works too.
    fn mixed_batch_forward(
        &self,
        x: &Tensor,
        names: &[String],
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let rows = x.dim(0)?;
        if names.len() != rows {
            return Err(PeftError::Invalid(format!(
                "{}: adapter_names has {} names for {rows} rows of input",
                self.name,
                names.len()
            )));
        }
        if !self.merged.is_empty() {
            return Err(PeftError::Invalid(format!(
                "{}: cannot pass adapter_names while {:?} are merged; unmerge first",
                self.name,
                self.merged()
            )));
        }
        // The adapter each row runs with here (`None`: the base alone).
        let held: Vec<Option<&str>> = names
            .iter()
            .map(|n| {
                (n != BASE_ADAPTER_NAME && self.adapters.contains_key(n.as_str()))
                    .then_some(n.as_str())
            })
            .collect();
        if held.iter().all(Option::is_none) {
            return self.base.forward(x);
        }
        for name in held.iter().flatten() {
            let adapter = &self.adapters[*name];
            if !adapter.supports_mixed_batch() {
                return Err(PeftError::Unsupported {
                    field: "adapter_names".into(),
                    value: format!("`{name}` ({}) on {}", adapter.peft_type(), self.name),
                    reason: "this method's forward does not act on each row alone".into(),
                });
            }
        }
        let grouping = group_rows(&held);
        let Some(perm) = grouping.permutation else {
            return self.segments_forward(x, &grouping.segments, ctx);
        };
        let device = x.device();
        let sorted = x.index_select(&Tensor::from_slice(&perm, rows, device)?, 0)?;
        let y = self.segments_forward(&sorted, &grouping.segments, ctx)?;
        let mut inverse = vec![0u32; rows];
        for (k, &r) in perm.iter().enumerate() {
            inverse[r as usize] = k as u32;
        }
        Ok(y.index_select(&Tensor::from_slice(&inverse, rows, device)?, 0)?)
    }

    /// The forward of a batch whose rows come in contiguous segments `(adapter, start, len)`.
    fn segments_forward(
        &self,
        x: &Tensor,
        segments: &[Segment<'_>],
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let call = |adapter| CallCtx {
            module: &self.name,
            adapter,
            fwd: ctx,
        };
        // Each segment's input after its adapter's input transform (`None`: unchanged).
        let mut inputs = Vec::with_capacity(segments.len());
        for seg in segments {
            let xs = x.narrow(0, seg.start, seg.len)?;
            let xin = match seg.adapter {
                Some(name) => {
                    let t =
                        self.adapters[name].transform_input(&self.base, xs.clone(), &call(name))?;
                    (t.id() != xs.id()).then_some(t)
                }
                None => None,
            };
            inputs.push((xs, xin));
        }
        if inputs.iter().any(|(_, xin)| xin.is_some()) {
            // Some input differs from `x`: one base product per segment.
            let mut parts = Vec::with_capacity(segments.len());
            for (seg, (xs, xin)) in segments.iter().zip(&inputs) {
                let y = self.base.forward(xin.as_ref().unwrap_or(xs))?;
                let out_dtype = y.dtype();
                let y = match seg.adapter {
                    Some(name) => self.adapters[name]
                        .transform_output(&self.base, xs, y, &call(name))?
                        .to_dtype(out_dtype)?,
                    None => y,
                };
                parts.push(y);
            }
            return Ok(Tensor::cat(&parts, 0)?);
        }
        let y = self.base.forward(x)?;
        let out_dtype = y.dtype();
        // Without gradients, each segment's output goes back into `y`'s rows (LoRA's already is there); a
        // part that cannot be written there (it tracks a gradient, or aliases `y`) turns this off, and the
        // parts are concatenated instead. Either way every part holds its segment's final values.
        let mut in_place = !ctx.training && !y.track_op();
        let mut parts = Vec::with_capacity(segments.len());
        for (seg, (xs, _)) in segments.iter().zip(&inputs) {
            let ys = y.narrow(0, seg.start, seg.len)?;
            let Some(name) = seg.adapter else {
                parts.push(ys);
                continue;
            };
            let out = self.adapters[name]
                .transform_output(&self.base, xs, ys.clone(), &call(name))?
                .to_dtype(out_dtype)?;
            if in_place && out.id() != ys.id() {
                in_place = !out.track_op()
                    && out
                        .contiguous()
                        .and_then(|o| y.slice_set(&o, 0, seg.start))
                        .is_ok();
            }
            parts.push(out);
        }
        if in_place {
            return Ok(y);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }

    /// The base weight with every merged adapter taken out, f32.
    fn unmerged_weights(&self) -> Result<(Tensor, Option<Tensor>)> {
        let mut w = self.base.weight()?.to_dtype(DType::F32)?;
        let mut b = self
            .base
            .bias()
            .map(|b| b.to_dtype(DType::F32))
            .transpose()?;
        for (name, cache) in self.merged.iter().rev() {
            let input = MergeInput {
                kind: self.base.kind(),
                weight: &w,
                bias: b.as_ref(),
                unmerged_weight: &w,
                unmerged_bias: b.as_ref(),
            };
            (w, b) = self.adapters[name.as_str()].unmerge(input, cache.as_ref())?;
        }
        Ok((w, b))
    }

    /// Merges adapters into the base weights, in order (`None`: the active ones). Already merged adapters
    /// are skipped, as in PEFT.
    pub fn merge(&mut self, names: Option<&[&str]>) -> Result<()> {
        let names: Vec<String> = match names {
            Some(n) => n.iter().map(|s| s.to_string()).collect(),
            None => self.active.clone(),
        };
        for name in names {
            if self.merged.iter().any(|(n, _)| *n == name) {
                continue;
            }
            let Some(adapter) = self.adapters.get(name.as_str()) else {
                continue; // PEFT skips adapters that do not target this layer
            };
            let dtype = self.base.dtype();
            let w = self.base.weight()?.to_dtype(DType::F32)?;
            let b = self
                .base
                .bias()
                .map(|b| b.to_dtype(DType::F32))
                .transpose()?;
            let unmerged = if adapter.needs_unmerged_weight() && !self.merged.is_empty() {
                Some(self.unmerged_weights()?)
            } else {
                None
            };
            let input = MergeInput {
                kind: self.base.kind(),
                weight: &w,
                bias: b.as_ref(),
                unmerged_weight: unmerged.as_ref().map(|u| &u.0).unwrap_or(&w),
                unmerged_bias: match &unmerged {
                    Some(u) => u.1.as_ref(),
                    None => b.as_ref(),
                },
            };
            let m = adapter.merge(input)?;
            self.base.replace_weight(m.weight.to_dtype(dtype)?)?;
            if let Some(nb) = m.bias {
                let bd = self.base.bias().map(|b| b.dtype()).unwrap_or(dtype);
                self.base.replace_bias(nb.to_dtype(bd)?)?;
            }
            self.merged.push((name, m.cache));
        }
        Ok(())
    }

    /// Forgets which adapters are merged, keeping the merged weights: the base now simply is the merged
    /// layer (PEFT's `merge_and_unload`).
    pub fn forget_merged(&mut self) {
        self.merged.clear();
    }

    /// Unmerges every merged adapter, in reverse order.
    pub fn unmerge(&mut self) -> Result<()> {
        while let Some((name, cache)) = self.merged.pop() {
            let dtype = self.base.dtype();
            let w = self.base.weight()?.to_dtype(DType::F32)?;
            let b = self
                .base
                .bias()
                .map(|b| b.to_dtype(DType::F32))
                .transpose()?;
            let input = MergeInput {
                kind: self.base.kind(),
                weight: &w,
                bias: b.as_ref(),
                unmerged_weight: &w,
                unmerged_bias: b.as_ref(),
            };
            let (nw, nb) = self.adapters[name.as_str()].unmerge(input, cache.as_ref())?;
            self.base.replace_weight(nw.to_dtype(dtype)?)?;
            if let Some(nb) = nb {
                let bd = self.base.bias().map(|b| b.dtype()).unwrap_or(dtype);
                self.base.replace_bias(nb.to_dtype(bd)?)?;
            }
        }
        Ok(())
    }

    /// Merges the given adapters (default: active) and returns the plain base layer, as PEFT's
    /// `merge_and_unload` does for one module.
    pub fn merge_and_unload(mut self, names: Option<&[&str]>) -> Result<BaseLayer> {
        self.merge(names)?;
        Ok(self.base)
    }

    /// Every trainable parameter of every adapter, keyed `<adapter>/<tensor key>`.
    pub fn vars(&self) -> Vec<(String, Var)> {
        self.adapters
            .iter()
            .flat_map(|(name, a)| {
                a.vars()
                    .into_iter()
                    .map(move |(k, v)| (format!("{name}/{k}"), v))
            })
            .collect()
    }
}

/// A run of consecutive rows of a mixed batch that use one adapter (`None`: the base model alone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment<'a> {
    /// The adapter of these rows, `None` for the base.
    pub adapter: Option<&'a str>,
    /// The first row.
    pub start: usize,
    /// The number of rows.
    pub len: usize,
}

/// How the rows of a mixed batch fall into per-adapter [`Segment`]s: see [`group_rows`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowGroups<'a> {
    /// The segments, covering rows `0..n` in order (of the permuted batch when there is a permutation).
    pub segments: Vec<Segment<'a>>,
    /// `None` when the rows are used in their own order; otherwise `permutation[k]` is the original row
    /// that goes to place `k`, so that each adapter's rows become one segment.
    pub permutation: Option<Vec<u32>>,
}

/// The segments of a mixed batch with one adapter (`None`: the base) per row.
///
/// Rows already grouped (each adapter's rows consecutive; base rows may lie anywhere) are used as they are;
/// otherwise the rows are reordered, stably, by the first appearance of their adapter, once, so that each
/// adapter is one contiguous segment (one pair of small products per adapter instead of a gather per row).
///
/// ```
/// use peft::layer::group_rows;
/// let g = group_rows(&[Some("a"), Some("a"), None, Some("b")]);
/// assert!(g.permutation.is_none());
/// assert_eq!(g.segments.len(), 3);
/// let g = group_rows(&[Some("a"), Some("b"), Some("a")]);
/// assert_eq!(g.permutation, Some(vec![0, 2, 1]));
/// assert_eq!((g.segments[0].adapter, g.segments[0].len), (Some("a"), 2));
/// ```
pub fn group_rows<'a>(names: &[Option<&'a str>]) -> RowGroups<'a> {
    let runs = |order: &mut dyn Iterator<Item = Option<&'a str>>| {
        let mut segs: Vec<Segment<'a>> = Vec::new();
        for (i, n) in order.enumerate() {
            match segs.last_mut() {
                Some(last) if last.adapter == n => last.len += 1,
                _ => segs.push(Segment {
                    adapter: n,
                    start: i,
                    len: 1,
                }),
            }
        }
        segs
    };
    let segments = runs(&mut names.iter().copied());
    let mut distinct: Vec<&str> = segments.iter().filter_map(|s| s.adapter).collect();
    let adapter_runs = distinct.len();
    distinct.sort_unstable();
    distinct.dedup();
    if adapter_runs == distinct.len() {
        return RowGroups {
            segments,
            permutation: None,
        };
    }
    let mut first: Vec<Option<&str>> = Vec::new();
    for n in names {
        if !first.contains(n) {
            first.push(*n);
        }
    }
    let mut permutation: Vec<u32> = (0..names.len() as u32).collect();
    permutation.sort_by_key(|&i| first.iter().position(|f| *f == names[i as usize]));
    let segments = runs(&mut permutation.iter().map(|&i| names[i as usize]));
    RowGroups {
        segments,
        permutation: Some(permutation),
    }
}

/// Checks that `t` has exactly `expected` as shape, naming the tensor otherwise.
pub(crate) fn check_shape(name: &str, t: &Tensor, expected: &[usize]) -> Result<()> {
    if t.dims() != expected {
        return Err(PeftError::ShapeMismatch {
            name: name.to_string(),
            expected: expected.to_vec(),
            got: t.dims().to_vec(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn slot_and_adapters_are_send_and_sync() {
        assert_send_sync::<AdapterSlot>();
        assert_send_sync::<Box<dyn Adapter>>();
        assert_send_sync::<BaseLayer>();
        assert_send_sync::<ForwardCtx>();
    }

    #[test]
    fn dropout_streams_differ_by_step_module_and_adapter() {
        let a = ForwardCtx::train(1, 0)
            .rng("m", "default", "dropout")
            .next_u64();
        assert_eq!(
            a,
            ForwardCtx::train(1, 0)
                .rng("m", "default", "dropout")
                .next_u64()
        );
        assert_ne!(
            a,
            ForwardCtx::train(1, 1)
                .rng("m", "default", "dropout")
                .next_u64()
        );
        assert_ne!(
            a,
            ForwardCtx::train(1, 0)
                .rng("n", "default", "dropout")
                .next_u64()
        );
        assert_ne!(
            a,
            ForwardCtx::train(1, 0)
                .rng("m", "other", "dropout")
                .next_u64()
        );
    }
}
