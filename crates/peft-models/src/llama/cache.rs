//! Key/value caches: [`KvCache`] for incremental decoding and [`PrefixKv`] for PEFT prefix tuning.

use candle_core::Tensor;
use peft::{PeftError, Result};

/// Per-layer prefix keys and values, each `[B, kv_heads, P, head_dim]` (B may be 1 for every row of a batch),
/// as PEFT prefix tuning feeds them to the model through `past_key_values`.
///
/// They enter attention **without RoPE**: the real tokens take positions `P..P+L−1` (the default position ids
/// start after the past) and attend to every prefix entry. The caller extends the attention mask by `P` ones
/// on the left (PEFT does the same), so a mask passed with a prefix is `[B, P + L]`.
#[derive(Clone, Debug)]
pub struct PrefixKv {
    layers: Vec<(Tensor, Tensor)>,
}

impl PrefixKv {
    /// From one `(keys, values)` pair per layer, each `[B, kv_heads, P, head_dim]`; all pairs must agree.
    pub fn new(layers: Vec<(Tensor, Tensor)>) -> Result<Self> {
        let Some((k0, _)) = layers.first() else {
            return Err(PeftError::Invalid(
                "PrefixKv needs at least one layer".into(),
            ));
        };
        let want = k0.dims().to_vec();
        if want.len() != 4 {
            return Err(PeftError::Invalid(format!(
                "prefix keys must be [B, kv_heads, P, head_dim], got {want:?}"
            )));
        }
        for (i, (k, v)) in layers.iter().enumerate() {
            for (what, t) in [("keys", k), ("values", v)] {
                if t.dims() != want.as_slice() {
                    return Err(PeftError::ShapeMismatch {
                        name: format!("prefix {what} of layer {i}"),
                        expected: want.clone(),
                        got: t.dims().to_vec(),
                    });
                }
            }
        }
        Ok(Self { layers })
    }

    /// From PEFT's flat layout: `past_key_values` as the prompt encoder returns it, `[B, P, layers·2·kv_heads·
    /// head_dim]` (or `[P, …]` for one shared prefix), viewed as `(B, P, layers·2, kv_heads, head_dim)` and
    /// permuted to `(layers·2, B, kv_heads, P, head_dim)`: row `2l` is layer `l`'s keys, `2l+1` its values
    /// (`peft_model.py`, `get_prompt`). Differentiable.
    pub fn from_flat(
        flat: &Tensor,
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let flat = match flat.rank() {
            2 => flat.unsqueeze(0)?,
            3 => flat.clone(),
            r => {
                return Err(PeftError::Invalid(format!(
                    "prefix embeddings must be [P, D] or [B, P, D], got rank {r}"
                )));
            }
        };
        let (b, p, d) = flat.dims3()?;
        if d != num_layers * 2 * kv_heads * head_dim {
            return Err(PeftError::ShapeMismatch {
                name: "prefix embeddings (last dimension)".into(),
                expected: vec![b, p, num_layers * 2 * kv_heads * head_dim],
                got: vec![b, p, d],
            });
        }
        let t = flat
            .reshape((b, p, num_layers * 2, kv_heads, head_dim))?
            .permute((2, 0, 3, 1, 4))?
            .contiguous()?;
        let layers = (0..num_layers)
            .map(|l| Ok((t.get(2 * l)?, t.get(2 * l + 1)?)))
            .collect::<Result<Vec<_>>>()?;
        Self::new(layers)
    }

    /// The number of prefix positions `P`.
    pub fn len(&self) -> usize {
        self.layers[0].0.dims()[2]
    }

    /// Whether the prefix has no positions.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The batch size of the prefix tensors (1 = shared by every row).
    pub fn batch_size(&self) -> usize {
        self.layers[0].0.dims()[0]
    }

    /// The number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Layer `i`'s `(keys, values)`.
    pub fn layer(&self, i: usize) -> Option<(&Tensor, &Tensor)> {
        self.layers.get(i).map(|(k, v)| (k, v))
    }
}

/// A growing key/value cache: per layer `[B, kv_heads, T, head_dim]` keys (after RoPE) and values, appended by
/// each forward pass that is given the cache. `T` (= [`KvCache::len`]) is the number of positions seen so far,
/// prefix included.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache (it learns its number of layers on the first forward).
    pub fn new() -> Self {
        Self::default()
    }

    /// A cache pre-filled with a prefix (PEFT prefix tuning): the first forward continues after it.
    pub fn with_prefix(prefix: &PrefixKv) -> Self {
        Self {
            layers: prefix
                .layers
                .iter()
                .map(|(k, v)| Some((k.clone(), v.clone())))
                .collect(),
        }
    }

    /// The number of cached positions `T` (0 when empty).
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dims()[2])
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets everything (the number of layers is kept).
    pub fn reset(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = None);
    }

    /// The batch size of the cached tensors, if any.
    pub fn batch_size(&self) -> Option<usize> {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dims()[0])
    }

    /// Layer `i`'s cached `(keys, values)`.
    pub fn layer(&self, i: usize) -> Option<(&Tensor, &Tensor)> {
        self.layers
            .get(i)
            .and_then(|l| l.as_ref())
            .map(|(k, v)| (k, v))
    }

    /// Sets layer `i` to `(k, v)` (the past concatenated with the new step).
    pub(crate) fn set(&mut self, i: usize, k: Tensor, v: Tensor) {
        if self.layers.len() <= i {
            self.layers.resize(i + 1, None);
        }
        self.layers[i] = Some((k, v));
    }

    /// The number of layers the cache holds entries for.
    pub(crate) fn num_layers(&self) -> usize {
        self.layers.len()
    }
}
