//! One batched decode step over independent requests: [`LlamaForCausalLM::decode_batch`], the inner loop of
//! continuous batching (`peft serve`).
//!
//! Each request has its own [`KvCache`] (batch size 1, any length), so requests that started at different
//! times decode together. The embedding, every projection, the MLPs, the norms and `lm_head` run once over
//! all rows (with [`ForwardCtx::adapter_names`] each row runs its own adapter: PEFT's mixed batch); only the
//! attention core (RoPE at the row's own position, the row's cache, the softmax) runs row by row, because the
//! rows' cache lengths differ.

use super::cache::KvCache;
use super::model::LlamaForCausalLM;
use candle_core::{DType, Tensor};
use peft::{ForwardCtx, PeftError, Result};

impl LlamaForCausalLM {
    /// One decode step for `tokens.len()` independent requests: row `r` feeds `tokens[r]` after what
    /// `caches[r]` holds (a `[1, kv_heads, T_r, head_dim]` cache per layer, as a single-request forward with a
    /// [`KvCache`] leaves it; an empty cache starts at position 0) and appends its keys and values to
    /// `caches[r]`. Returns the next-token logits `[B, vocab]` (f32): row `r` equals, within rounding, the
    /// last-position logits of [`LlamaForCausalLM::forward`] on `[[tokens[r]]]` with `caches[r]` alone.
    ///
    /// `ctx` applies to the whole batch; give it one adapter name per row
    /// ([`ForwardCtx::with_adapter_names`], `"__base__"` for the base model) to run each row with its own
    /// adapter. Rows of the same adapter placed next to each other make fewer, larger adapter products.
    ///
    /// ```
    /// use candle_core::{DType, Device, Tensor};
    /// use peft::ForwardCtx;
    /// use peft_models::llama::{ForwardInput, KvCache, LlamaConfig, LlamaForCausalLM};
    /// # fn main() -> peft::Result<()> {
    /// let config = LlamaConfig::from_value(&serde_json::json!({
    ///     "model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
    ///     "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 20,
    /// }))?;
    /// let dev = Device::Cpu;
    /// let model = LlamaForCausalLM::from_tensors(
    ///     config.clone(),
    ///     LlamaForCausalLM::random_tensors(&config, 0, DType::F32, &dev)?,
    ///     &dev,
    /// )?;
    /// let ctx = ForwardCtx::inference();
    /// // Two requests with prompts of different lengths, each prefilled into its own cache.
    /// let (mut a, mut b) = (KvCache::new(), KvCache::new());
    /// model.forward(ForwardInput::ids(&Tensor::new(&[[1u32, 2, 3]], &dev)?).with_cache(&mut a), &ctx)?;
    /// model.forward(ForwardInput::ids(&Tensor::new(&[[4u32]], &dev)?).with_cache(&mut b), &ctx)?;
    /// let logits = model.decode_batch(&[5, 6], &mut [&mut a, &mut b], &ctx)?;
    /// assert_eq!(logits.dims(), &[2, 20]);
    /// assert_eq!((a.len(), b.len()), (4, 2));
    /// # Ok(()) }
    /// ```
    pub fn decode_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let b = tokens.len();
        if b == 0 {
            return Err(PeftError::Invalid(
                "decode_batch needs at least one row".into(),
            ));
        }
        if caches.len() != b {
            return Err(PeftError::Invalid(format!(
                "decode_batch: {b} tokens but {} caches",
                caches.len()
            )));
        }
        let n_layers = self.layers.len();
        for (r, c) in caches.iter().enumerate() {
            if c.is_empty() {
                continue;
            }
            if c.num_layers() != n_layers {
                return Err(PeftError::Invalid(format!(
                    "decode_batch: cache {r} has {} layers, the model {n_layers}",
                    c.num_layers()
                )));
            }
            if c.batch_size() != Some(1) {
                return Err(PeftError::Invalid(format!(
                    "decode_batch: cache {r} has batch size {:?}; each request's cache holds one row",
                    c.batch_size()
                )));
            }
        }
        let c = self.config();
        let (nh, nkv, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let rep = nh / nkv;
        let device = self.device();
        let ids = Tensor::new(tokens, device)?.unsqueeze(1)?;
        let mut x = self.embed_tokens(&ids, ctx)?;
        // Each row's RoPE tables and masks at its own position (the cache length).
        let rows = caches
            .iter()
            .map(|c| self.rope_and_masks(1, 1, c.len(), None, None))
            .collect::<Result<Vec<_>>>()?;
        for (i, layer) in self.layers.iter().enumerate() {
            let h = layer.input_layernorm.forward(&x)?;
            let a = &layer.self_attn;
            let q = a.q_proj.forward(&h, ctx)?;
            let k = a.k_proj.forward(&h, ctx)?;
            let v = a.v_proj.forward(&h, ctx)?;
            let mut outs = Vec::with_capacity(b);
            for (r, (cos, sin, masks)) in rows.iter().enumerate() {
                // As the single-request attention with B = L = 1: [1, 1, n·hd] → [1, n, 1, hd].
                let heads = |t: &Tensor, n: usize| -> Result<Tensor> {
                    Ok(t.narrow(0, r, 1)?.reshape((1, 1, n, hd))?.transpose(1, 2)?)
                };
                let qr = crate::ops::rope(&heads(&q, nh)?, cos, sin)?.contiguous()?;
                let kr = crate::ops::rope(&heads(&k, nkv)?, cos, sin)?.contiguous()?;
                let vr = heads(&v, nkv)?.contiguous()?;
                let (kr, vr) = match caches[r].layer(i) {
                    Some((pk, pv)) => (
                        Tensor::cat(&[&pk.to_dtype(kr.dtype())?, &kr], 2)?.contiguous()?,
                        Tensor::cat(&[&pv.to_dtype(vr.dtype())?, &vr], 2)?.contiguous()?,
                    ),
                    None => (kr, vr),
                };
                let t = kr.dim(2)?;
                let qg = qr.reshape((1, nkv, rep, hd))?;
                let scores = (qg.matmul(&kr.t()?)? * (1.0 / (hd as f64).sqrt()))?
                    .reshape((1, nh, 1, t))?
                    .to_dtype(DType::F32)?;
                let scores = match Self::layer_mask(masks, layer) {
                    Some(m) => scores.broadcast_add(m)?,
                    None => scores,
                };
                let probs = crate::ops::softmax_last_dim(&scores)?.to_dtype(vr.dtype())?;
                let o = probs
                    .reshape((1, nkv, rep, t))?
                    .matmul(&vr)?
                    .reshape((1, nh, 1, hd))?
                    .transpose(1, 2)?
                    .reshape((1, 1, nh * hd))?;
                outs.push(o);
                caches[r].set(i, kr.detach(), vr.detach());
            }
            let o = a.o_proj.forward(&Tensor::cat(&outs, 0)?, ctx)?;
            let x1 = (&x + o)?;
            let h = layer.post_attention_layernorm.forward(&x1)?;
            let m = &layer.mlp;
            let gate = m.gate_proj.forward(&h, ctx)?;
            let up = m.up_proj.forward(&h, ctx)?;
            let y = m
                .down_proj
                .forward(&crate::ops::silu_mul(&gate, &up)?, ctx)?;
            x = (x1 + y)?.detach();
        }
        let h = self.norm.forward(&x)?;
        Ok(self
            .lm_head
            .forward(&h, ctx)?
            .to_dtype(DType::F32)?
            .squeeze(1)?)
    }
}

#[cfg(test)]
mod tests {
    use crate::llama::{ForwardInput, KvCache, LlamaConfig, LlamaForCausalLM};
    use candle_core::{DType, Device, IndexOp, Tensor};
    use peft::{ForwardCtx, PeftModel};
    use std::path::PathBuf;

    fn case(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/lora/cases")
            .join(name)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// Three requests (two LoRA adapters and the base, prompts of 5, 2 and 7 tokens) prefilled each alone,
    /// then three batched decode steps: every row's logits equal the single-request forward with that
    /// adapter active (PEFT's plain path, not the mixed batch) and its own cache, and the adapters' logits
    /// differ from one another (a row given another row's adapter or cache would fail).
    #[test]
    fn batch_decode_rows_equal_single_request_forwards() {
        let dev = Device::Cpu;
        let dir = case("llama_two_adapters");
        let base = crate::load_model(dir.join("base_hf"), &dev).unwrap().model;
        let mut pm = PeftModel::new(base, 0);
        pm.load_adapter(dir.join("adapter"), "default", &dev)
            .unwrap();
        pm.load_adapter(dir.join("adapter/other"), "other", &dev)
            .unwrap();
        let names = ["default", "other", "__base__"];
        let prompts: [&[u32]; 3] = [&[1, 5, 9, 13, 2], &[7, 3], &[4, 4, 8, 15, 16, 23, 42]];

        // The reference: each request alone, the adapter active, the plain forward.
        let single = |pm: &mut PeftModel<LlamaForCausalLM>,
                      name: &str,
                      ids: &[u32],
                      cache: &mut KvCache|
         -> Tensor {
            let input = Tensor::new(ids, &dev).unwrap().unsqueeze(0).unwrap();
            let run = |m: &LlamaForCausalLM, cache: &mut KvCache| {
                let l = m
                    .forward(
                        ForwardInput::ids(&input).with_cache(cache),
                        &ForwardCtx::inference(),
                    )
                    .unwrap();
                l.i((0, l.dim(1).unwrap() - 1)).unwrap()
            };
            if name == "__base__" {
                pm.with_adapters_disabled(|pm| run(pm.model(), cache))
                    .unwrap()
            } else {
                pm.set_adapter(&[name]).unwrap();
                run(pm.model(), cache)
            }
        };

        let mut ref_caches: Vec<KvCache> = Vec::new();
        let mut caches: Vec<KvCache> = Vec::new();
        let mut next = Vec::new();
        for (name, ids) in names.iter().zip(prompts) {
            let mut c = KvCache::new();
            let logits = single(&mut pm, name, ids, &mut c);
            next.push(logits.argmax(0).unwrap().to_scalar::<u32>().unwrap());
            caches.push(c.clone());
            ref_caches.push(c);
        }
        let ctx = ForwardCtx::inference().with_adapter_names(&names);
        for step in 0..3 {
            let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
            let got = pm.model().decode_batch(&next, &mut refs, &ctx).unwrap();
            assert_eq!(got.dims(), &[3, 64]);
            let mut want = Vec::new();
            for (r, name) in names.iter().enumerate() {
                let w = single(&mut pm, name, &[next[r]], &mut ref_caches[r]);
                let d = max_abs_diff(&got.i(r).unwrap(), &w);
                assert!(d < 1e-5, "step {step} row {r} ({name}): {d}");
                assert_eq!(caches[r].len(), ref_caches[r].len());
                want.push(w);
            }
            // The rows' adapters matter: the same token through another adapter gives other logits.
            assert!(max_abs_diff(&want[0], &want[1]) > 1e-3);
            next = (0..3)
                .map(|r| {
                    got.i(r)
                        .unwrap()
                        .argmax(0)
                        .unwrap()
                        .to_scalar::<u32>()
                        .unwrap()
                })
                .collect();
        }
        assert_eq!(
            caches.iter().map(|c| c.len()).collect::<Vec<_>>(),
            [8, 5, 10]
        );
        // The same batch in another row order gives each request the same logits.
        let mut swapped = [caches[2].clone(), caches[0].clone()];
        let mut refs: Vec<&mut KvCache> = swapped.iter_mut().collect();
        let ctx2 = ForwardCtx::inference().with_adapter_names(&["__base__", "default"]);
        let got2 = pm
            .model()
            .decode_batch(&[next[2], next[0]], &mut refs, &ctx2)
            .unwrap();
        let mut one = [caches[0].clone()];
        let mut refs: Vec<&mut KvCache> = one.iter_mut().collect();
        let ctx1 = ForwardCtx::inference().with_adapter_names(&["default"]);
        let got1 = pm
            .model()
            .decode_batch(&[next[0]], &mut refs, &ctx1)
            .unwrap();
        assert!(max_abs_diff(&got2.i(1).unwrap(), &got1.i(0).unwrap()) < 1e-5);
    }

    /// A sliding-window model (mistral): the window masks each row at its own position.
    #[test]
    fn batch_decode_respects_sliding_windows() {
        let dev = Device::Cpu;
        let config = LlamaConfig::from_value(&serde_json::json!({
            "model_type": "mistral", "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 40, "sliding_window": 3,
        }))
        .unwrap();
        let tensors = LlamaForCausalLM::random_tensors(&config, 3, DType::F32, &dev).unwrap();
        let model = LlamaForCausalLM::from_tensors(config, tensors, &dev).unwrap();
        let ctx = ForwardCtx::inference();
        let prompts: [&[u32]; 2] = [&[1, 2, 3, 4, 5, 6], &[7]];
        let mut caches = Vec::new();
        let mut refs_c = Vec::new();
        for p in prompts {
            let mut c = KvCache::new();
            let input = Tensor::new(p, &dev).unwrap().unsqueeze(0).unwrap();
            model
                .forward(ForwardInput::ids(&input).with_cache(&mut c), &ctx)
                .unwrap();
            caches.push(c.clone());
            refs_c.push(c);
        }
        let tokens = [9u32, 11];
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        let got = model.decode_batch(&tokens, &mut refs, &ctx).unwrap();
        for r in 0..2 {
            let input = Tensor::new(&[[tokens[r]]], &dev).unwrap();
            let want = model
                .forward(ForwardInput::ids(&input).with_cache(&mut refs_c[r]), &ctx)
                .unwrap()
                .i((0, 0))
                .unwrap();
            let d = max_abs_diff(&got.i(r).unwrap(), &want);
            assert!(d < 1e-5, "row {r}: {d}");
        }
        // Mismatched inputs are errors, not panics.
        let mut refs: Vec<&mut KvCache> = caches.iter_mut().collect();
        assert!(model.decode_batch(&[1], &mut refs, &ctx).is_err());
        assert!(model.decode_batch(&[], &mut [], &ctx).is_err());
    }
}
