//! [`LlamaForCausalLM`]: transformers' `LlamaForCausalLM` / `MistralForCausalLM` / `Qwen2ForCausalLM`, with every
//! projection, the input embedding and the LM head held in a [`peft::AdapterSlot`].
//!
//! The forward pass mirrors transformers 5.24's eager path: `embed → (RMSNorm → attention → residual → RMSNorm
//! → SwiGLU MLP → residual) × layers → RMSNorm → lm_head`, with RoPE in rotate-half form (cos/sin computed in
//! f32 from `inv_freq`, including Llama-3 scaling), GQA, and an additive mask that combines causality, the
//! sliding window (mistral, qwen2 sliding layers) and padding. Masked scores get `f32::MIN` (transformers'
//! `torch.finfo(dtype).min`), so a fully masked row (a left-padding query) gives a uniform softmax, not NaN.
//! Differentiable through [`crate::ops`] (RMSNorm, RoPE, softmax, SwiGLU) and the adapter slots' frozen linear;
//! the base weights are plain tensors, never `Var`s.

use super::cache::{KvCache, PrefixKv};
use super::config::LlamaConfig;
use candle_core::{D, DType, Device, Tensor, Var};
use indexmap::IndexMap;
use peft::host::AdapterHost;
use peft::quant::QuantizedWeight;
use peft::tuners::tuners_utils::{ModuleInfo, ModuleKind};
use peft::{AdapterSlot, BaseKind, BaseLayer, ForwardCtx, PeftError, PeftRng, Result};

/// The inputs of one forward pass. Exactly one of `input_ids` and `inputs_embeds` must be given.
///
/// ```
/// # use candle_core::{Device, Tensor};
/// # use peft_models::llama::ForwardInput;
/// # let ids = Tensor::zeros((1, 3), candle_core::DType::U32, &Device::Cpu).unwrap();
/// # let mask = Tensor::ones((1, 3), candle_core::DType::U32, &Device::Cpu).unwrap();
/// let input = ForwardInput::ids(&ids).with_attention_mask(&mask);
/// # let _ = input;
/// ```
#[derive(Debug, Default)]
pub struct ForwardInput<'a> {
    /// Token ids `[B, L]` (u32; i64 is accepted too).
    pub input_ids: Option<&'a Tensor>,
    /// Input embeddings `[B, L, hidden]` instead of ids (prompt tuning prepends its virtual tokens here).
    pub inputs_embeds: Option<&'a Tensor>,
    /// `[B, past + L]`, 1 = attend, 0 = padding (left or right). `past` is the cache length, or the prefix
    /// length when a prefix is given without a cache.
    pub attention_mask: Option<&'a Tensor>,
    /// `[B, L]` positions for RoPE; default `past..past+L` for every row (transformers' default). With left
    /// padding pass `clamp(cumsum(mask) − 1, 0)` as `generate` does.
    pub position_ids: Option<&'a Tensor>,
    /// A cache to continue from and append to.
    pub cache: Option<&'a mut KvCache>,
    /// PEFT prefix-tuning keys/values, attended to before the tokens. With a cache, the cache must be empty
    /// (it is then filled with the prefix first); later steps need only the cache.
    pub prefix: Option<&'a PrefixKv>,
}

impl<'a> ForwardInput<'a> {
    /// Inputs from token ids.
    pub fn ids(input_ids: &'a Tensor) -> Self {
        Self {
            input_ids: Some(input_ids),
            ..Self::default()
        }
    }

    /// Inputs from embeddings.
    pub fn embeds(inputs_embeds: &'a Tensor) -> Self {
        Self {
            inputs_embeds: Some(inputs_embeds),
            ..Self::default()
        }
    }

    /// With an attention mask `[B, past + L]`.
    pub fn with_attention_mask(mut self, mask: &'a Tensor) -> Self {
        self.attention_mask = Some(mask);
        self
    }

    /// With explicit position ids `[B, L]`.
    pub fn with_position_ids(mut self, position_ids: &'a Tensor) -> Self {
        self.position_ids = Some(position_ids);
        self
    }

    /// With a KV cache.
    pub fn with_cache(mut self, cache: &'a mut KvCache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// With prefix-tuning keys/values.
    pub fn with_prefix(mut self, prefix: &'a PrefixKv) -> Self {
        self.prefix = Some(prefix);
        self
    }
}

/// An RMSNorm with its HF name.
#[derive(Clone, Debug)]
pub(super) struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub(super) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(crate::ops::rms_norm(x, &self.weight, self.eps)?)
    }
}

#[derive(Debug)]
pub(super) struct Attention {
    pub(super) q_proj: AdapterSlot,
    pub(super) k_proj: AdapterSlot,
    pub(super) v_proj: AdapterSlot,
    pub(super) o_proj: AdapterSlot,
}

#[derive(Debug)]
pub(super) struct Mlp {
    pub(super) gate_proj: AdapterSlot,
    pub(super) up_proj: AdapterSlot,
    pub(super) down_proj: AdapterSlot,
}

#[derive(Debug)]
pub(super) struct DecoderLayer {
    pub(super) self_attn: Attention,
    pub(super) mlp: Mlp,
    pub(super) input_layernorm: RmsNorm,
    pub(super) post_attention_layernorm: RmsNorm,
    pub(super) sliding_window: Option<usize>,
}

/// A Llama-family causal LM whose linear layers and embeddings are adapter slots named by their HF dotted names
/// (`model.layers.0.self_attn.q_proj`, `model.embed_tokens`, `lm_head`).
///
/// Implements [`AdapterHost`], so PEFT's target matching, injection, merging and saving walk it by name.
#[derive(Debug)]
pub struct LlamaForCausalLM {
    config: LlamaConfig,
    embed_tokens: AdapterSlot,
    pub(super) layers: Vec<DecoderLayer>,
    pub(super) norm: RmsNorm,
    pub(super) lm_head: AdapterSlot,
    inv_freq: Tensor,
    attention_scaling: f64,
    device: Device,
    shared_tensors: IndexMap<String, Tensor>,
}

fn take(
    tensors: &mut IndexMap<String, Tensor>,
    name: &str,
    shape: &[usize],
    device: &Device,
) -> Result<Tensor> {
    let t = tensors
        .shift_remove(name)
        .ok_or_else(|| PeftError::MissingKey(name.to_string()))?;
    if t.dims() != shape {
        return Err(PeftError::ShapeMismatch {
            name: name.to_string(),
            expected: shape.to_vec(),
            got: t.dims().to_vec(),
        });
    }
    Ok(t.to_device(device)?)
}

/// A norm weight in the activations' dtype: f32 for a half-precision one (the norms are tiny; the activations
/// of a half-precision base are f32).
fn norm_weight(w: Tensor) -> Result<Tensor> {
    Ok(if peft::ops::is_half(&w) {
        w.to_dtype(DType::F32)?
    } else {
        w
    })
}

impl LlamaForCausalLM {
    /// Builds the model from tensors in HF names (`model.layers.0.self_attn.q_proj.weight`, …) as the loaders
    /// produce them. Every tensor the config needs must be present with its shape; a tensor the model does not
    /// use is an error (except `*.rotary_emb.inv_freq`, which old checkpoints saved, and `lm_head.weight` of a
    /// tied model). Tensors keep their dtype and move to `device`; the activations take the embedding's dtype,
    /// except that bf16 / f16 weights compute in f32 (PEFT's autocast: the projections multiply through
    /// [`peft::ops::half_linear`], the embedding's rows are converted after the lookup, and half-precision norm
    /// weights are converted to f32 here).
    ///
    /// Tied embeddings (`tie_word_embeddings`): `lm_head`'s base weight is the embedding tensor itself, the same
    /// storage ([`BaseLayer::linear_shared`]); a `lm_head.weight` in the map is ignored, as transformers does.
    /// [`AdapterHost::tied_weights`] reports the pair, so [`peft::PeftModel`]'s merges keep it one matrix (as
    /// PEFT's in-place merge into the shared parameter does) and [`AdapterHost::set_tensor`] sets both; merging
    /// through a slot directly ([`AdapterSlot::merge`]) gives that slot its own matrix.
    pub fn from_tensors(
        config: LlamaConfig,
        tensors: IndexMap<String, Tensor>,
        device: &Device,
    ) -> Result<Self> {
        Self::from_parts(config, tensors, IndexMap::new(), device)
    }

    /// [`LlamaForCausalLM::from_tensors`] with some projections' weights already quantized (a GGUF's blocks kept
    /// as stored), under their HF weight names (`model.layers.0.self_attn.q_proj.weight`). A projection's weight
    /// comes from `quantized`, else from bitsandbytes 4-bit tensors in `tensors`, else from a dense tensor.
    pub fn from_parts(
        config: LlamaConfig,
        mut tensors: IndexMap<String, Tensor>,
        mut quantized: IndexMap<String, QuantizedWeight>,
        device: &Device,
    ) -> Result<Self> {
        let c = &config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let q_out = c.num_attention_heads * hd;
        let kv_out = c.num_key_value_heads * hd;
        let embed_w = take(
            &mut tensors,
            "model.embed_tokens.weight",
            &[c.vocab_size, h],
            device,
        )?;
        let embed_tokens =
            AdapterSlot::new("model.embed_tokens", BaseLayer::embedding(embed_w.clone())?);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut linear =
                |name: String, out: usize, inp: usize, bias: bool| -> Result<AdapterSlot> {
                    let b = if bias {
                        Some(take(&mut tensors, &format!("{name}.bias"), &[out], device)?)
                    } else {
                        None
                    };
                    let key = format!("{name}.weight");
                    if let Some(q) = quantized.shift_remove(&key) {
                        if q.shape() != [out, inp] {
                            return Err(PeftError::ShapeMismatch {
                                name: key,
                                expected: vec![out, inp],
                                got: q.shape().to_vec(),
                            });
                        }
                        return Ok(AdapterSlot::new(
                            name,
                            BaseLayer::quantized_linear(q, b, device)?,
                        ));
                    }
                    if let Some((q, keys)) = peft::quant::from_state_dict(&name, &tensors)? {
                        if q.shape() != [out, inp] {
                            return Err(PeftError::ShapeMismatch {
                                name: format!("{key} (quantized shape)"),
                                expected: vec![out, inp],
                                got: q.shape().to_vec(),
                            });
                        }
                        for k in &keys {
                            tensors.shift_remove(k);
                        }
                        return Ok(AdapterSlot::new(
                            name,
                            BaseLayer::quantized_linear(q, b, device)?,
                        ));
                    }
                    let w = take(&mut tensors, &key, &[out, inp], device)?;
                    Ok(AdapterSlot::new(name, BaseLayer::linear(w, b)?))
                };
            let self_attn = Attention {
                q_proj: linear(format!("{p}.self_attn.q_proj"), q_out, h, c.qkv_bias)?,
                k_proj: linear(format!("{p}.self_attn.k_proj"), kv_out, h, c.qkv_bias)?,
                v_proj: linear(format!("{p}.self_attn.v_proj"), kv_out, h, c.qkv_bias)?,
                o_proj: linear(format!("{p}.self_attn.o_proj"), h, q_out, c.o_bias)?,
            };
            let im = c.intermediate_size;
            let mlp = Mlp {
                gate_proj: linear(format!("{p}.mlp.gate_proj"), im, h, c.mlp_bias)?,
                up_proj: linear(format!("{p}.mlp.up_proj"), im, h, c.mlp_bias)?,
                down_proj: linear(format!("{p}.mlp.down_proj"), h, im, c.mlp_bias)?,
            };
            let norm = |tensors: &mut IndexMap<String, Tensor>, n: &str| -> Result<RmsNorm> {
                Ok(RmsNorm {
                    weight: norm_weight(take(tensors, &format!("{p}.{n}.weight"), &[h], device)?)?,
                    eps: c.rms_norm_eps,
                })
            };
            layers.push(DecoderLayer {
                self_attn,
                mlp,
                input_layernorm: norm(&mut tensors, "input_layernorm")?,
                post_attention_layernorm: norm(&mut tensors, "post_attention_layernorm")?,
                sliding_window: c.sliding_windows.get(i).copied().flatten(),
            });
        }
        let norm = RmsNorm {
            weight: norm_weight(take(&mut tensors, "model.norm.weight", &[h], device)?)?,
            eps: c.rms_norm_eps,
        };
        let lm_head_w = if c.tie_word_embeddings {
            tensors.shift_remove("lm_head.weight");
            embed_w
        } else {
            take(&mut tensors, "lm_head.weight", &[c.vocab_size, h], device)?
        };
        let lm_head = if c.tie_word_embeddings {
            // The embedding's own storage (row-major `[vocab, hidden]`), shared, as transformers ties them.
            AdapterSlot::new("lm_head", BaseLayer::linear_shared(lm_head_w, None)?)
        } else {
            AdapterSlot::new("lm_head", BaseLayer::linear(lm_head_w, None)?)
        };
        let extra: Vec<String> = tensors
            .keys()
            .filter(|k| !k.ends_with("rotary_emb.inv_freq"))
            .chain(quantized.keys())
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::Invalid(format!(
                "tensors the {} model does not use: {}",
                c.family.model_type(),
                extra.join(", ")
            )));
        }
        let (inv, attention_scaling) = c.rope_inv_freq();
        let n = inv.len();
        let inv_freq = Tensor::from_vec(inv, n, device)?;
        Ok(Self {
            config,
            embed_tokens,
            layers,
            norm,
            lm_head,
            inv_freq,
            attention_scaling: attention_scaling as f64,
            device: device.clone(),
            shared_tensors: IndexMap::new(),
        })
    }

    /// Random weights in HF names for `config` (uniform in ±1/√fan_in, norms 1, biases small), seeded: for
    /// tests and benchmarks.
    pub fn random_tensors(
        config: &LlamaConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<IndexMap<String, Tensor>> {
        let c = config;
        let mut rng = PeftRng::new(seed);
        let mut out = IndexMap::new();
        let (h, hd) = (c.hidden_size, c.head_dim);
        let mut lin = |out: &mut IndexMap<String, Tensor>,
                       name: String,
                       o: usize,
                       i: usize,
                       bias: bool|
         -> Result<()> {
            let bound = 1.0 / (i as f64).sqrt();
            out.insert(
                format!("{name}.weight"),
                rng.uniform_tensor((o, i), -bound, bound, dtype, device)?,
            );
            if bias {
                out.insert(
                    format!("{name}.bias"),
                    rng.uniform_tensor(o, -bound, bound, dtype, device)?,
                );
            }
            Ok(())
        };
        lin(
            &mut out,
            "model.embed_tokens".into(),
            c.vocab_size,
            h,
            false,
        )?;
        let ones = Tensor::ones(h, dtype, device)?;
        for l in 0..c.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let (q, kv, im) = (
                c.num_attention_heads * hd,
                c.num_key_value_heads * hd,
                c.intermediate_size,
            );
            lin(&mut out, format!("{p}.self_attn.q_proj"), q, h, c.qkv_bias)?;
            lin(&mut out, format!("{p}.self_attn.k_proj"), kv, h, c.qkv_bias)?;
            lin(&mut out, format!("{p}.self_attn.v_proj"), kv, h, c.qkv_bias)?;
            lin(&mut out, format!("{p}.self_attn.o_proj"), h, q, c.o_bias)?;
            lin(&mut out, format!("{p}.mlp.gate_proj"), im, h, c.mlp_bias)?;
            lin(&mut out, format!("{p}.mlp.up_proj"), im, h, c.mlp_bias)?;
            lin(&mut out, format!("{p}.mlp.down_proj"), h, im, c.mlp_bias)?;
            out.insert(format!("{p}.input_layernorm.weight"), ones.clone());
            out.insert(format!("{p}.post_attention_layernorm.weight"), ones.clone());
        }
        out.insert("model.norm.weight".into(), ones);
        if !c.tie_word_embeddings {
            lin(&mut out, "lm_head".into(), c.vocab_size, h, false)?;
        }
        Ok(out)
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the activations: the embedding matrix's dtype, or f32 when the frozen weights are held in
    /// bf16 / f16 (PEFT's autocast: half-precision storage, every product in f32; see
    /// [`LlamaForCausalLM::weight_dtype`]).
    pub fn dtype(&self) -> DType {
        match self.weight_dtype() {
            DType::BF16 | DType::F16 => DType::F32,
            d => d,
        }
    }

    /// The dtype the frozen dense weights are held in (the embedding matrix's dtype): f32 by default, bf16 or
    /// f16 for a base loaded with `LoadOptions::dtype`, whose activations stay f32 ([`LlamaForCausalLM::dtype`]).
    pub fn weight_dtype(&self) -> DType {
        self.embed_tokens.base().dtype()
    }

    /// Model-level tensors shared by every adapter slot, by name: e.g. VeRA's `vera_A` / `vera_B` projections,
    /// which PEFT keeps once per model (`base_model.vera_A[adapter]`), not per layer. The model itself does not
    /// use them; adapter code that needs them reads them here. Empty for a freshly built model.
    pub fn shared_tensors(&self) -> &IndexMap<String, Tensor> {
        &self.shared_tensors
    }

    /// Mutable access to [`LlamaForCausalLM::shared_tensors`].
    pub fn shared_tensors_mut(&mut self) -> &mut IndexMap<String, Tensor> {
        &mut self.shared_tensors
    }

    /// One adapter slot by its HF dotted name.
    pub fn slot(&self, name: &str) -> Option<&AdapterSlot> {
        self.slots().into_iter().find(|s| s.name() == name)
    }

    /// One adapter slot by its HF dotted name, mutably.
    pub fn slot_mut(&mut self, name: &str) -> Option<&mut AdapterSlot> {
        self.slots_mut().into_iter().find(|s| s.name() == name)
    }

    /// The input embedding lookup (through its slot, so adapters on `model.embed_tokens` apply): `[B, L]` ids to
    /// `[B, L, hidden]`.
    pub fn embed_tokens(&self, input_ids: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        self.embed_tokens.forward(input_ids, ctx)
    }

    /// The logits `[B, L, vocab]` (f32) of every position.
    ///
    /// With [`ForwardCtx::adapter_names`] (a mixed batch) whose adapters' rows are not consecutive, and no
    /// cache or prefix, the rows are reordered once so that each adapter's rows are one segment, and the logits
    /// are put back in the caller's order (see [`peft::layer::group_rows`]).
    pub fn forward(&self, input: ForwardInput<'_>, ctx: &ForwardCtx) -> Result<Tensor> {
        self.grouped(input, ctx, |m, input, ctx| {
            let hidden = m.forward_hidden_rows(input, ctx)?;
            Ok(m.lm_head.forward(&hidden, ctx)?.to_dtype(DType::F32)?)
        })
    }

    /// The last hidden states `[B, L, hidden]` (after the final norm, before `lm_head`). Mixed batches are
    /// reordered as in [`Self::forward`].
    pub fn forward_hidden(&self, input: ForwardInput<'_>, ctx: &ForwardCtx) -> Result<Tensor> {
        self.grouped(input, ctx, Self::forward_hidden_rows)
    }

    /// Runs `f` on the batch with a mixed batch's rows grouped by adapter (one reorder of the inputs and one of
    /// the result), or as given when they already are, or when a cache or prefix holds rows in their order.
    fn grouped(
        &self,
        input: ForwardInput<'_>,
        ctx: &ForwardCtx,
        f: impl FnOnce(&Self, ForwardInput<'_>, &ForwardCtx) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let perm = match &ctx.adapter_names {
            Some(names) if input.cache.is_none() && input.prefix.is_none() => {
                let rows: Vec<Option<&str>> = names
                    .iter()
                    .map(|n| (n != peft::layer::BASE_ADAPTER_NAME).then_some(n.as_str()))
                    .collect();
                peft::layer::group_rows(&rows).permutation
            }
            _ => None,
        };
        let Some(perm) = perm else {
            return f(self, input, ctx);
        };
        let rows = perm.len();
        let device = self.device();
        let idx = Tensor::from_slice(&perm, rows, device)?;
        let pick = |t: Option<&Tensor>| -> Result<Option<Tensor>> {
            match t {
                Some(t) if t.rank() >= 1 && t.dim(0)? == rows => Ok(Some(t.index_select(&idx, 0)?)),
                Some(t) => Err(PeftError::Invalid(format!(
                    "adapter_names has {rows} names for inputs of shape {:?}",
                    t.dims()
                ))),
                None => Ok(None),
            }
        };
        let ids = pick(input.input_ids)?;
        let embeds = pick(input.inputs_embeds)?;
        let mask = pick(input.attention_mask)?;
        let pos = pick(input.position_ids)?;
        let names = ctx.adapter_names.as_deref().unwrap_or_default();
        let sorted: Vec<&str> = perm.iter().map(|&i| names[i as usize].as_str()).collect();
        let sorted_ctx = ctx.clone().with_adapter_names(&sorted);
        let permuted = ForwardInput {
            input_ids: ids.as_ref(),
            inputs_embeds: embeds.as_ref(),
            attention_mask: mask.as_ref(),
            position_ids: pos.as_ref(),
            cache: None,
            prefix: None,
        };
        let out = f(self, permuted, &sorted_ctx)?;
        let mut inverse = vec![0u32; rows];
        for (k, &r) in perm.iter().enumerate() {
            inverse[r as usize] = k as u32;
        }
        Ok(out.index_select(&Tensor::from_slice(&inverse, rows, device)?, 0)?)
    }

    /// [`Self::forward_hidden`] on the rows as given.
    fn forward_hidden_rows(&self, input: ForwardInput<'_>, ctx: &ForwardCtx) -> Result<Tensor> {
        let ForwardInput {
            input_ids,
            inputs_embeds,
            attention_mask,
            position_ids,
            mut cache,
            prefix,
        } = input;
        let x = match (input_ids, inputs_embeds) {
            (Some(ids), None) => {
                if ids.rank() != 2 {
                    return Err(PeftError::Invalid(format!(
                        "input_ids must be [B, L], got {:?}",
                        ids.dims()
                    )));
                }
                self.embed_tokens(ids, ctx)?
            }
            (None, Some(e)) => e.to_dtype(self.dtype())?,
            _ => {
                return Err(PeftError::Invalid(
                    "You must specify exactly one of input_ids or inputs_embeds".into(),
                ));
            }
        };
        let (b, l, hsz) = x.dims3()?;
        if hsz != self.config.hidden_size {
            return Err(PeftError::ShapeMismatch {
                name: "inputs_embeds".into(),
                expected: vec![b, l, self.config.hidden_size],
                got: x.dims().to_vec(),
            });
        }
        let n_layers = self.layers.len();
        if let Some(p) = prefix {
            if p.num_layers() != n_layers {
                return Err(PeftError::Invalid(format!(
                    "the prefix has {} layers, the model {n_layers}",
                    p.num_layers()
                )));
            }
            let (_, kvh, _, hd) = p
                .layer(0)
                .map(|(k, _)| k.dims4())
                .transpose()?
                .unwrap_or_default();
            if kvh != self.config.num_key_value_heads || hd != self.config.head_dim {
                return Err(PeftError::Invalid(format!(
                    "prefix keys have {kvh} heads of {hd}; the model has {} kv heads of {}",
                    self.config.num_key_value_heads, self.config.head_dim
                )));
            }
        }
        if let Some(c) = cache.as_deref_mut() {
            if let Some(p) = prefix {
                if !c.is_empty() {
                    return Err(PeftError::Invalid(
                        "a prefix was given with a non-empty cache: the cache already holds the prefix \
                         (pass the prefix only on the first step, or use KvCache::with_prefix)"
                            .into(),
                    ));
                }
                *c = KvCache::with_prefix(p);
            }
            if !c.is_empty() && c.num_layers() != n_layers {
                return Err(PeftError::Invalid(format!(
                    "the cache has {} layers, the model {n_layers}",
                    c.num_layers()
                )));
            }
        }
        let past = match (&cache, prefix) {
            (Some(c), _) => c.len(),
            (None, Some(p)) => p.len(),
            (None, None) => 0,
        };
        let (cos, sin, masks) = self.rope_and_masks(b, l, past, attention_mask, position_ids)?;

        let mut x = x;
        for (i, layer) in self.layers.iter().enumerate() {
            let past_kv = match (&cache, prefix) {
                (Some(c), _) => c.layer(i).map(|(k, v)| (k.clone(), v.clone())),
                (None, Some(p)) => p.layer(i).map(|(k, v)| (k.clone(), v.clone())),
                (None, None) => None,
            };
            let mask = Self::layer_mask(&masks, layer);
            let (y, k, v) = self.layer_forward(layer, &x, &cos, &sin, mask, past_kv, ctx)?;
            if let Some(c) = cache.as_deref_mut() {
                if ctx.no_grad {
                    c.set(i, k.detach(), v.detach());
                } else {
                    c.set(i, k, v);
                }
            }
            // No gradient wanted: drop this layer's graph now instead of holding every layer's.
            x = if ctx.no_grad { y.detach() } else { y };
        }
        self.norm.forward(&x)
    }

    /// The mean next-token cross-entropy of `input_ids` against `labels` (the rules of
    /// [`crate::data::causal_lm_loss`]) and its gradients with respect to every trainable parameter, computed
    /// with **gradient checkpointing** (transformers' `gradient_checkpointing_enable()`, which PEFT's
    /// `prepare_model_for_kbit_training` turns on for QLoRA): the forward keeps only each decoder layer's input;
    /// the backward runs layer by layer from the last, recomputing one layer's forward at a time (same dropout
    /// masks: they are drawn from `ctx`), and the final norm, `lm_head` and the loss run over chunks of rows so
    /// that the `[B·L, vocab]` logits are never all alive. Peak activation memory drops from all layers'
    /// intermediates to one layer's plus `layers × [B, L, hidden]`, for one more forward of compute.
    ///
    /// The loss and every gradient are **bit for bit** those of `causal_lm_loss(forward(..))` and its
    /// `backward()`: each recomputed layer runs the same ops on the same inputs, its input gradient is the
    /// plain backward's sum of the residual and the norm branch (two terms: the order cannot matter), and the
    /// final norm, `lm_head` and the loss run once over all `B·L` rows, reduced as `causal_lm_loss` reduces
    /// them (so the `[B·L, vocab]` logits and their gradient are alive once, as in the plain backward; see
    /// [`Self::checkpointed_loss_with_head_rows`] to bound them, not bit-exactly). No KV cache, prefix or
    /// custom position ids (the training forward); the returned loss is a value (not differentiable), ready
    /// for [`peft::train::Trainer::train_step_with_grads`].
    pub fn checkpointed_loss(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        labels: &Tensor,
        ctx: &ForwardCtx,
    ) -> Result<peft::train::MicroBatchGrads> {
        self.checkpointed_loss_with_head_rows(input_ids, attention_mask, labels, ctx, usize::MAX)
    }

    /// [`Self::checkpointed_loss`] with the final norm, `lm_head` and the loss run over chunks of `head_rows`
    /// token rows (≥ 1; `usize::MAX` or anything ≥ `B·L`: one chunk, which is what `checkpointed_loss` does;
    /// one chunk too when `lm_head` has an adapter, whose dropout masks are drawn over the whole input), so that
    /// at most `head_rows × vocab` logits are alive at a time.
    ///
    /// With more than one chunk the gradients are **not** bit-identical to the plain backward's: the `lm_head`
    /// products over fewer rows may sum in another order (the matmul kernel picks its blocking from the
    /// shape), a few ulps apart; the loss is the same f32 sum of the per-row NLL either way.
    pub fn checkpointed_loss_with_head_rows(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        labels: &Tensor,
        ctx: &ForwardCtx,
        head_rows: usize,
    ) -> Result<peft::train::MicroBatchGrads> {
        let (b, l) = match input_ids.dims() {
            &[b, l] => (b, l),
            d => {
                return Err(PeftError::Invalid(format!(
                    "input_ids must be [B, L], got {d:?}"
                )));
            }
        };
        if labels.dims() != [b, l] {
            return Err(PeftError::ShapeMismatch {
                name: "labels".into(),
                expected: vec![b, l],
                got: labels.dims().to_vec(),
            });
        }
        let vocab = self.config.vocab_size;
        let targets = crate::data::shifted_targets(labels, vocab)
            .map_err(|e| PeftError::Invalid(e.to_string()))?;
        let tokens = targets.iter().filter(|t| t.is_some()).count();
        let x0 = self.embed_tokens(input_ids, ctx)?;
        let (cos, sin, masks) = self.rope_and_masks(b, l, 0, attention_mask, None)?;

        // Forward: each layer's input is kept, its graph dropped.
        let mut inputs = Vec::with_capacity(self.layers.len());
        let mut x = x0.detach();
        for layer in &self.layers {
            let mask = Self::layer_mask(&masks, layer);
            let (y, _, _) = self.layer_forward(layer, &x, &cos, &sin, mask, None, ctx)?;
            inputs.push(x);
            x = y.detach();
        }

        // Only the parameters' gradients are kept from each partial backward (candle's store also holds the
        // gradients of untracked operands such as dropout masks, which would pile up layer after layer).
        let params: std::collections::HashSet<candle_core::TensorId> = self
            .slots()
            .into_iter()
            .flat_map(|s| s.vars().into_iter().map(|(_, v)| v.as_tensor().id()))
            .collect();
        let mut grads = candle_core::backprop::GradStore::default();
        let keep = |grads: &mut candle_core::backprop::GradStore,
                    part: candle_core::backprop::GradStore|
         -> Result<()> {
            let mut kept = candle_core::backprop::GradStore::default();
            for id in part.get_ids() {
                if let Some(g) = part.get_id(*id).filter(|_| params.contains(id)) {
                    kept.insert_id(*id, g.clone());
                }
            }
            Ok(grads.extend(kept)?)
        };
        // Final norm, lm_head and loss (over chunks of rows if asked): the gradient of the last hidden states.
        let hsz = self.config.hidden_size;
        let rows_total = b * l;
        // An adapter on lm_head draws its dropout masks over the whole input: one chunk then.
        let rows = if self.lm_head.adapters().next().is_some() {
            rows_total.max(1)
        } else {
            head_rows.clamp(1, rows_total.max(1))
        };
        // One chunk: the plain forward's `[B, L, hidden]` itself, so that every op sees the plain shapes.
        let chunks: Vec<(Tensor, usize, usize)> = if rows >= rows_total {
            vec![(x, 0, rows_total)]
        } else {
            let flat = x.reshape((rows_total, hsz))?;
            drop(x);
            (0..rows_total)
                .step_by(rows)
                .map(|start| {
                    let n = rows.min(rows_total - start);
                    Ok((flat.narrow(0, start, n)?.unsqueeze(0)?, start, n))
                })
                .collect::<Result<_>>()?
        };
        // The gradient of `causal_lm_loss`'s mean: the same `affine(1 / tokens)` at the root.
        let scale = if tokens > 0 { 1.0 / tokens as f64 } else { 0.0 };
        let mut nll_rows = Vec::with_capacity(chunks.len());
        let mut dh = Vec::with_capacity(chunks.len());
        for (chunk, start, n) in chunks {
            let hv = Var::from_tensor(&chunk)?;
            drop(chunk);
            let h = self.norm.forward(hv.as_tensor())?;
            // As `forward` and `causal_lm_loss`: f32 logits, flattened to rows.
            let logits = self.lm_head.forward(&h, ctx)?.to_dtype(DType::F32)?;
            let logits = logits.reshape((n, vocab))?;
            let nll_chunk = crate::ops::cross_entropy_rows(&logits, &targets[start..start + n])?;
            nll_rows.push(nll_chunk.detach());
            let mut g = nll_chunk.sum_all()?.affine(scale, 0.0)?.backward()?;
            let d = match g.remove(hv.as_tensor()) {
                Some(d) => d,
                None => hv.as_tensor().zeros_like()?,
            };
            dh.push(d.reshape((n, hsz))?);
            keep(&mut grads, g)?;
        }
        let mut g = Tensor::cat(&dh, 0)?.reshape((b, l, hsz))?;
        drop(dh);

        // Backward through the layers, last first, recomputing each one's forward.
        for (layer, x) in self.layers.iter().zip(inputs).rev() {
            let xv = Var::from_tensor(&x)?;
            drop(x);
            let mask = Self::layer_mask(&masks, layer);
            let (y, _, _) =
                self.layer_forward(layer, xv.as_tensor(), &cos, &sin, mask, None, ctx)?;
            let mut lg = (y * &g)?.sum_all()?.backward()?;
            g = match lg.remove(xv.as_tensor()) {
                Some(d) => d,
                None => xv.as_tensor().zeros_like()?,
            };
            keep(&mut grads, lg)?;
        }
        // The embedding (an adapter on `embed_tokens`).
        keep(&mut grads, (x0 * g)?.sum_all()?.backward()?)?;
        // The loss as `causal_lm_loss` reduces it: one f32 sum over all rows' NLL, then the mean.
        let nll_sum = Tensor::cat(&nll_rows, 0)?.sum_all()?;
        let loss = nll_sum.affine(scale, 0.0)?;
        Ok(peft::train::MicroBatchGrads {
            loss,
            grads,
            tokens,
        })
    }

    /// The RoPE tables (`cos`, `sin`, f32 as transformers) of positions `past..past + l` (or `position_ids`)
    /// and the attention masks, one per distinct sliding window among the layers.
    #[allow(clippy::type_complexity)]
    pub(super) fn rope_and_masks(
        &self,
        b: usize,
        l: usize,
        past: usize,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor, Vec<(Option<usize>, Option<Tensor>)>)> {
        let total = past + l;

        // RoPE tables, f32 as transformers: freqs = pos · inv_freq, cos/sin · attention_scaling.
        let pos = match position_ids {
            Some(p) => {
                if p.dims() != [b, l] {
                    return Err(PeftError::ShapeMismatch {
                        name: "position_ids".into(),
                        expected: vec![b, l],
                        got: p.dims().to_vec(),
                    });
                }
                p.to_device(&self.device)?.to_dtype(DType::F32)?
            }
            None => {
                Tensor::arange(past as u32, total as u32, &self.device)?.to_dtype(DType::F32)?
            }
        };
        let freqs = pos.unsqueeze(D::Minus1)?.broadcast_mul(&self.inv_freq)?;
        let (mut cos, mut sin) = (freqs.cos()?, freqs.sin()?);
        if self.attention_scaling != 1.0 {
            cos = (cos * self.attention_scaling)?;
            sin = (sin * self.attention_scaling)?;
        }

        // Masks: one per distinct sliding window among the layers.
        let keep = match attention_mask {
            Some(m) => {
                if m.dims() != [b, total] {
                    return Err(PeftError::ShapeMismatch {
                        name: format!(
                            "attention_mask (batch × (past {past} + new {l}); a prefix or cache needs its \
                             positions as ones on the left)"
                        ),
                        expected: vec![b, total],
                        got: m.dims().to_vec(),
                    });
                }
                Some(m.to_dtype(DType::F32)?.to_vec2::<f32>()?)
            }
            None => None,
        };
        let mut masks: Vec<(Option<usize>, Option<Tensor>)> = Vec::new();
        for layer in &self.layers {
            if !masks.iter().any(|(w, _)| *w == layer.sliding_window) {
                let m = self.build_mask(b, l, past, keep.as_deref(), layer.sliding_window)?;
                masks.push((layer.sliding_window, m));
            }
        }

        Ok((cos, sin, masks))
    }

    /// The mask of `layer` among [`Self::rope_and_masks`]'s.
    pub(super) fn layer_mask<'m>(
        masks: &'m [(Option<usize>, Option<Tensor>)],
        layer: &DecoderLayer,
    ) -> Option<&'m Tensor> {
        masks
            .iter()
            .find(|(w, _)| *w == layer.sliding_window)
            .and_then(|(_, m)| m.as_ref())
    }

    /// The additive mask `[B or 1, 1, L, past + L]` (0 = attend, `f32::MIN` = masked), or `None` when nothing is
    /// masked. Query `i` sits at cache index `past + i`; key `j` is visible when `j ≤ past + i`, when
    /// `past + i − j < window` (sliding layers) and when `keep[b][j] ≠ 0`.
    fn build_mask(
        &self,
        b: usize,
        l: usize,
        past: usize,
        keep: Option<&[Vec<f32>]>,
        window: Option<usize>,
    ) -> Result<Option<Tensor>> {
        let total = past + l;
        let rows = if keep.is_some() { b } else { 1 };
        let mut data = vec![0f32; rows * l * total];
        let mut any = false;
        for r in 0..rows {
            for i in 0..l {
                let q = past + i;
                for j in 0..total {
                    let visible = j <= q
                        && window.is_none_or(|w| q - j < w)
                        && keep.is_none_or(|k| k[r][j] != 0.0);
                    if !visible {
                        data[(r * l + i) * total + j] = f32::MIN;
                        any = true;
                    }
                }
            }
        }
        if !any {
            return Ok(None);
        }
        Ok(Some(Tensor::from_vec(
            data,
            (rows, 1, l, total),
            &self.device,
        )?))
    }

    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        layer: &DecoderLayer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        past: Option<(Tensor, Tensor)>,
        ctx: &ForwardCtx,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let residual = x;
        let h = layer.input_layernorm.forward(x)?;
        let (a, k, v) = self.attention(&layer.self_attn, &h, cos, sin, mask, past, ctx)?;
        let x = (residual + a)?;
        let h = layer.post_attention_layernorm.forward(&x)?;
        let m = &layer.mlp;
        let gate = m.gate_proj.forward(&h, ctx)?;
        let up = m.up_proj.forward(&h, ctx)?;
        // silu(gate) ⊙ up in one pass forward and one backward
        let y = m
            .down_proj
            .forward(&crate::ops::silu_mul(&gate, &up)?, ctx)?;
        Ok(((x + y)?, k, v))
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        attn: &Attention,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        past: Option<(Tensor, Tensor)>,
        ctx: &ForwardCtx,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let c = &self.config;
        let (b, l, _) = x.dims3()?;
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let rep = nh / nkv;
        // [B, L, n·hd] → [B, n, L, hd] as a strided view: RoPE reads it as is and writes contiguous q and k;
        // the values are made contiguous for the matmul.
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            Ok(t.reshape((b, l, n, hd))?.transpose(1, 2)?)
        };
        let q = heads(attn.q_proj.forward(x, ctx)?, nh)?;
        let k = heads(attn.k_proj.forward(x, ctx)?, nkv)?;
        let v = heads(attn.v_proj.forward(x, ctx)?, nkv)?.contiguous()?;
        let q = crate::ops::rope(&q, cos, sin)?.contiguous()?;
        let k = crate::ops::rope(&k, cos, sin)?.contiguous()?;
        let (k, v) = match past {
            Some((pk, pv)) => {
                let fit = |t: Tensor| -> Result<Tensor> {
                    let t = t.to_dtype(k.dtype())?;
                    Ok(match t.dims()[0] {
                        n if n == b => t,
                        1 => t.broadcast_as((b, nkv, t.dims()[2], hd))?,
                        n => {
                            return Err(PeftError::Invalid(format!(
                                "cached keys have batch size {n}, the input {b}"
                            )));
                        }
                    })
                };
                // `cat` of non-contiguous parts (a broadcast prefix) may come back strided: matmul needs
                // contiguous keys and values.
                (
                    Tensor::cat(&[&fit(pk)?, &k], 2)?.contiguous()?,
                    Tensor::cat(&[&fit(pv)?, &v], 2)?.contiguous()?,
                )
            }
            None => (k, v),
        };
        let t = k.dim(2)?;
        // GQA without copying keys/values: query head h = g·rep + r uses kv head g, so view the queries as
        // [B, nkv, rep·L, hd] against [B, nkv, T, hd].
        let qg = q.reshape((b, nkv, rep * l, hd))?;
        let scores = (qg.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?
            .reshape((b, nh, l, t))?
            .to_dtype(DType::F32)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = crate::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let o = probs
            .reshape((b, nkv, rep * l, t))?
            .matmul(&v)?
            .reshape((b, nh, l, hd))?
            .transpose(1, 2)?
            .reshape((b, l, nh * hd))?;
        let o = attn.o_proj.forward(&o, ctx)?;
        Ok((o, k, v))
    }

    fn class(&self, suffix: &str) -> ModuleKind {
        ModuleKind::Other(format!("{}{suffix}", self.config.family.class_prefix()))
    }

    fn norms(&self) -> Vec<(String, &RmsNorm)> {
        let mut out = Vec::with_capacity(2 * self.layers.len() + 1);
        for (i, l) in self.layers.iter().enumerate() {
            out.push((
                format!("model.layers.{i}.input_layernorm.weight"),
                &l.input_layernorm,
            ));
            out.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                &l.post_attention_layernorm,
            ));
        }
        out.push(("model.norm.weight".into(), &self.norm));
        out
    }

    fn norm_mut(&mut self, name: &str) -> Option<&mut RmsNorm> {
        if name == "model.norm.weight" {
            return Some(&mut self.norm);
        }
        let rest = name.strip_prefix("model.layers.")?;
        let (idx, rest) = rest.split_once('.')?;
        let layer = self.layers.get_mut(idx.parse::<usize>().ok()?)?;
        match rest {
            "input_layernorm.weight" => Some(&mut layer.input_layernorm),
            "post_attention_layernorm.weight" => Some(&mut layer.post_attention_layernorm),
            _ => None,
        }
    }
}

fn slot_kind(slot: &AdapterSlot) -> ModuleKind {
    match slot.base().kind() {
        BaseKind::Linear => ModuleKind::Linear,
        BaseKind::Embedding => ModuleKind::Embedding,
        BaseKind::Conv2d(_) => ModuleKind::Conv2d,
        BaseKind::Conv1D => ModuleKind::Conv1D,
    }
}

impl AdapterHost for LlamaForCausalLM {
    /// transformers' `named_modules()` of the `…ForCausalLM` (root left out), with its class names.
    fn module_infos(&self) -> Vec<ModuleInfo> {
        let mut out = vec![
            ModuleInfo::new("model", self.class("Model")),
            ModuleInfo::new("model.embed_tokens", slot_kind(&self.embed_tokens)),
            ModuleInfo::new("model.layers", ModuleKind::Other("ModuleList".into())),
        ];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push(ModuleInfo::new(p.clone(), self.class("DecoderLayer")));
            out.push(ModuleInfo::new(
                format!("{p}.self_attn"),
                self.class("Attention"),
            ));
            let a = &l.self_attn;
            for s in [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj] {
                out.push(ModuleInfo::new(s.name(), slot_kind(s)));
            }
            out.push(ModuleInfo::new(format!("{p}.mlp"), self.class("MLP")));
            let m = &l.mlp;
            for s in [&m.gate_proj, &m.up_proj, &m.down_proj] {
                out.push(ModuleInfo::new(s.name(), slot_kind(s)));
            }
            out.push(ModuleInfo::new(
                format!("{p}.mlp.act_fn"),
                ModuleKind::Other("SiLUActivation".into()),
            ));
            out.push(ModuleInfo::new(
                format!("{p}.input_layernorm"),
                self.class("RMSNorm"),
            ));
            out.push(ModuleInfo::new(
                format!("{p}.post_attention_layernorm"),
                self.class("RMSNorm"),
            ));
        }
        out.push(ModuleInfo::new("model.norm", self.class("RMSNorm")));
        out.push(ModuleInfo::new(
            "model.rotary_emb",
            self.class("RotaryEmbedding"),
        ));
        out.push(ModuleInfo::new("lm_head", slot_kind(&self.lm_head)));
        out
    }

    fn output_layer(&self) -> Option<String> {
        Some("lm_head".into())
    }

    fn input_embeddings(&self) -> Option<String> {
        Some("model.embed_tokens".into())
    }

    /// With `tie_word_embeddings`: `("model.embed_tokens", "lm_head")`, one `[vocab, hidden]` matrix (the
    /// embedding's `[num_embeddings, dim]` is the head's `[out_features, in_features]`).
    fn tied_weights(&self) -> Vec<(String, String)> {
        if self.config.tie_word_embeddings {
            vec![("model.embed_tokens".into(), "lm_head".into())]
        } else {
            Vec::new()
        }
    }

    /// The family's `model_type` (`"llama"`, `"mistral"`, `"qwen2"`).
    fn model_type(&self) -> Option<String> {
        Some(self.config.family.model_type().to_string())
    }

    /// Prompt tuning, P-tuning and prefix tuning as [`crate::prompt_learning::PromptLearning`].
    fn prompt_adapter(
        &self,
        config: &peft::PeftConfig,
        source: peft::host::PromptAdapterSource<'_>,
    ) -> Result<Box<dyn peft::host::PromptAdapter>> {
        crate::prompt_learning::host_prompt_adapter(self, config, source)
    }

    fn slots(&self) -> Vec<&AdapterSlot> {
        let mut out = vec![&self.embed_tokens];
        for l in &self.layers {
            let (a, m) = (&l.self_attn, &l.mlp);
            out.extend([&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj]);
            out.extend([&m.gate_proj, &m.up_proj, &m.down_proj]);
        }
        out.push(&self.lm_head);
        out
    }

    fn slots_mut(&mut self) -> Vec<&mut AdapterSlot> {
        let mut out = vec![&mut self.embed_tokens];
        for l in &mut self.layers {
            let (a, m) = (&mut l.self_attn, &mut l.mlp);
            out.extend([&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj]);
            out.extend([&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]);
        }
        out.push(&mut self.lm_head);
        out
    }

    /// The RMSNorm weights (`model.layers.N.input_layernorm.weight`, …, `model.norm.weight`).
    fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.norms()
            .into_iter()
            .map(|(n, norm)| (n, norm.weight.clone()))
            .collect()
    }

    /// Replaces a norm weight, or a slot's base `weight` / `bias`, cast to the current dtype and device. With
    /// tied embeddings, `model.embed_tokens.weight` and `lm_head.weight` name one matrix: setting either sets
    /// both (as a `load_state_dict` into PyTorch's shared parameter would).
    fn set_tensor(&mut self, name: &str, value: Tensor) -> Result<()> {
        let device = self.device.clone();
        if let Some(norm) = self.norm_mut(name) {
            if value.dims() != norm.weight.dims() {
                return Err(PeftError::ShapeMismatch {
                    name: name.to_string(),
                    expected: norm.weight.dims().to_vec(),
                    got: value.dims().to_vec(),
                });
            }
            norm.weight = value.to_dtype(norm.weight.dtype())?.to_device(&device)?;
            return Ok(());
        }
        let (module, what) = name
            .rsplit_once('.')
            .filter(|(_, w)| *w == "weight" || *w == "bias")
            .ok_or_else(|| PeftError::MissingModule {
                module: name.to_string(),
            })?;
        let tied = self.config.tie_word_embeddings
            && what == "weight"
            && (module == "lm_head" || module == "model.embed_tokens");
        let targets: Vec<&str> = if tied {
            vec!["model.embed_tokens", "lm_head"]
        } else {
            vec![module]
        };
        // Check every target first so that a failure changes nothing.
        for t in &targets {
            let slot = self.slot(t).ok_or_else(|| PeftError::MissingModule {
                module: t.to_string(),
            })?;
            let cur = match what {
                "weight" => slot.base().weight_dims(),
                _ => slot
                    .base()
                    .bias()
                    .ok_or_else(|| PeftError::Invalid(format!("{t} has no bias to replace")))?
                    .dims(),
            };
            if cur != value.dims() {
                return Err(PeftError::ShapeMismatch {
                    name: name.to_string(),
                    expected: cur.to_vec(),
                    got: value.dims().to_vec(),
                });
            }
            if !slot.merged().is_empty() {
                return Err(PeftError::Invalid(format!(
                    "{t}: cannot replace base tensors while adapters are merged"
                )));
            }
        }
        for t in targets {
            let slot = self.slot_mut(t).expect("checked above");
            let dtype = slot.base().dtype();
            let v = value.to_dtype(dtype)?.to_device(&device)?;
            if tied {
                // One row-major matrix in both slots, storage shared, as `from_tensors` ties them.
                slot.set_tied_weight(v.contiguous()?)?;
            } else if what == "weight" {
                slot.set_base_tensors(Some(v), None)?;
            } else {
                slot.set_base_tensors(None, Some(v))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llama::LlamaFamily;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn model_is_send_and_sync() {
        assert_send_sync::<LlamaForCausalLM>();
        assert_send_sync::<KvCache>();
        assert_send_sync::<PrefixKv>();
    }

    #[test]
    fn family_prefixes() {
        assert_eq!(LlamaFamily::Qwen2.class_prefix(), "Qwen2");
    }
}
