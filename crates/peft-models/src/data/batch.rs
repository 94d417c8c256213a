//! Padded batches and the resumable, per-epoch shuffling batcher.

use candle_core::{Device, Tensor};
use peft::PeftRng;
use serde_json::{Value, json};

use super::{Dataset, Example, IGNORE_INDEX};
use crate::error::{ModelError, Result};

/// A padded batch of examples, on a device.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids, `u32 [B, L]`, right-padded with the pad id.
    pub input_ids: Tensor,
    /// Labels, `i64 [B, L]`: the token at each position, [`IGNORE_INDEX`] on padding and on positions
    /// that do not count. Position `t` of the logits is scored against `labels[t + 1]`.
    pub labels: Tensor,
    /// `u32 [B, L]`: 1 for a real token, 0 for padding.
    pub attention_mask: Tensor,
    /// The number of label tokens that count in the loss (labels after each row's first one that are not
    /// [`IGNORE_INDEX`]), the denominator of [`super::causal_lm_loss`].
    pub n_tokens: usize,
}

impl Batch {
    /// The number of rows (`B`).
    pub fn batch_size(&self) -> usize {
        self.input_ids.dims().first().copied().unwrap_or(0)
    }

    /// The padded length (`L`).
    pub fn seq_len(&self) -> usize {
        self.input_ids.dims().get(1).copied().unwrap_or(0)
    }
}

/// Pads `examples` on the right to the longest one (ids with `pad_id`, labels with [`IGNORE_INDEX`],
/// attention mask 0) and puts the batch on `device`.
pub fn collate(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Batch> {
    if examples.is_empty() {
        return Err(ModelError::Invalid("cannot collate an empty batch".into()));
    }
    let b = examples.len();
    let l = examples.iter().map(|e| e.len()).max().unwrap_or(0);
    if l == 0 {
        return Err(ModelError::Invalid(
            "cannot collate a batch of empty examples".into(),
        ));
    }
    let mut ids = Vec::with_capacity(b * l);
    let mut labels = Vec::with_capacity(b * l);
    let mut mask = Vec::with_capacity(b * l);
    let mut n_tokens = 0;
    for e in examples {
        if e.labels.len() != e.input_ids.len() {
            return Err(ModelError::Invalid(format!(
                "example with {} input ids but {} labels",
                e.input_ids.len(),
                e.labels.len()
            )));
        }
        let pad = l - e.len();
        ids.extend_from_slice(&e.input_ids);
        ids.extend(std::iter::repeat_n(pad_id, pad));
        labels.extend_from_slice(&e.labels);
        labels.extend(std::iter::repeat_n(IGNORE_INDEX, pad));
        mask.extend(std::iter::repeat_n(1u32, e.len()));
        mask.extend(std::iter::repeat_n(0u32, pad));
        n_tokens += e.n_targets();
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, l), device)?,
        labels: Tensor::from_vec(labels, (b, l), device)?,
        attention_mask: Tensor::from_vec(mask, (b, l), device)?,
        n_tokens,
    })
}

/// The in-order batches of [`Dataset::eval_batches`].
#[derive(Debug)]
pub struct EvalBatches<'a> {
    dataset: &'a Dataset,
    batch_size: usize,
    pad_id: u32,
    device: &'a Device,
    pos: usize,
}

impl<'a> EvalBatches<'a> {
    pub(super) fn new(
        dataset: &'a Dataset,
        batch_size: usize,
        pad_id: u32,
        device: &'a Device,
    ) -> Self {
        Self {
            dataset,
            batch_size: batch_size.max(1),
            pad_id,
            device,
            pos: 0,
        }
    }
}

impl Iterator for EvalBatches<'_> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        let n = self.dataset.len();
        if self.pos >= n {
            return None;
        }
        let end = (self.pos + self.batch_size).min(n);
        let rows: Vec<&Example> = self.dataset.examples[self.pos..end].iter().collect();
        self.pos = end;
        Some(collate(&rows, self.pad_id, self.device))
    }
}

/// Cuts a dataset of `n_examples` into batches, epoch after epoch, shuffled afresh each epoch.
///
/// The order of epoch `e` is a Fisher–Yates shuffle drawn from `PeftRng::new(seed).fork("epoch{e}")`, so
/// it depends only on the seed and the epoch number: [`Batcher::state`] records `(seed, epoch, position)`
/// and [`Batcher::restore`] rebuilds the same order, giving the same batches after a resume. An epoch's
/// last batch is smaller when `batch_size` does not divide the number of examples, unless `drop_last`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batcher {
    n_examples: usize,
    batch_size: usize,
    seed: u64,
    shuffle: bool,
    drop_last: bool,
    pad_id: u32,
    epoch: u64,
    position: usize,
    order: Vec<usize>,
}

impl Batcher {
    /// A shuffling batcher over `n_examples` examples, padding with `pad_id`, at the start of epoch 0.
    pub fn new(n_examples: usize, batch_size: usize, seed: u64, pad_id: u32) -> Result<Self> {
        if n_examples == 0 {
            return Err(ModelError::Invalid("no example to batch".into()));
        }
        if batch_size == 0 {
            return Err(ModelError::Invalid("batch size must be at least 1".into()));
        }
        let mut b = Self {
            n_examples,
            batch_size,
            seed,
            shuffle: true,
            drop_last: false,
            pad_id,
            epoch: 0,
            position: 0,
            order: Vec::new(),
        };
        b.reorder();
        Ok(b)
    }

    /// The same batcher with shuffling on (the default) or off (examples in file order every epoch).
    pub fn with_shuffle(mut self, shuffle: bool) -> Self {
        self.shuffle = shuffle;
        self.reorder();
        self
    }

    /// The same batcher dropping (or not, the default) each epoch's last, smaller batch. Errors when that
    /// leaves no batch at all.
    pub fn with_drop_last(mut self, drop_last: bool) -> Result<Self> {
        if drop_last && self.n_examples < self.batch_size {
            return Err(ModelError::Invalid(format!(
                "drop_last with {} example(s) and batch size {} leaves no batch",
                self.n_examples, self.batch_size
            )));
        }
        self.drop_last = drop_last;
        Ok(self)
    }

    /// The batch size.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// The pad id.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The current epoch (0-based). It turns over when the next batch is drawn after an epoch's last one.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// How many examples of the current epoch have been drawn.
    pub fn position(&self) -> usize {
        self.position
    }

    /// The number of batches in one epoch.
    pub fn batches_per_epoch(&self) -> usize {
        if self.drop_last {
            self.n_examples / self.batch_size
        } else {
            self.n_examples.div_ceil(self.batch_size)
        }
    }

    fn epoch_end(&self) -> usize {
        if self.drop_last {
            self.n_examples / self.batch_size * self.batch_size
        } else {
            self.n_examples
        }
    }

    fn reorder(&mut self) {
        self.order = (0..self.n_examples).collect();
        if self.shuffle {
            let mut rng = PeftRng::new(self.seed).fork(&format!("epoch{}", self.epoch));
            for i in (1..self.n_examples).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                self.order.swap(i, j);
            }
        }
    }

    /// The indices of the next batch's examples (moving to the next epoch when the current one is done).
    pub fn next_indices(&mut self) -> Vec<usize> {
        if self.position >= self.epoch_end() {
            self.epoch += 1;
            self.position = 0;
            self.reorder();
        }
        let end = (self.position + self.batch_size).min(self.epoch_end());
        let idx = self.order[self.position..end].to_vec();
        self.position = end;
        idx
    }

    /// The next batch of `dataset` (which must be the one of `n_examples` this batcher was made for) on
    /// `device`.
    pub fn next_batch(&mut self, dataset: &Dataset, device: &Device) -> Result<Batch> {
        if dataset.len() != self.n_examples {
            return Err(ModelError::Invalid(format!(
                "the batcher was made for {} examples, the dataset has {}",
                self.n_examples,
                dataset.len()
            )));
        }
        let idx = self.next_indices();
        let rows: Vec<&Example> = idx.iter().map(|&i| &dataset.examples[i]).collect();
        collate(&rows, self.pad_id, device)
    }

    /// The cursor, as JSON: `{"n_examples", "batch_size", "seed", "shuffle", "drop_last", "epoch",
    /// "position"}`.
    pub fn state(&self) -> Value {
        json!({
            "n_examples": self.n_examples,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "drop_last": self.drop_last,
            "epoch": self.epoch,
            "position": self.position,
        })
    }

    /// Moves to the cursor of a [`Batcher::state`]: the following batches are those that followed it.
    /// Errors when the state is malformed or made for another number of examples or batch size.
    pub fn restore(&mut self, state: &Value) -> Result<()> {
        let bad = |m: String| ModelError::json("batcher state", m);
        let u = |k: &str| {
            state
                .get(k)
                .and_then(Value::as_u64)
                .ok_or_else(|| bad(format!("missing or invalid \"{k}\"")))
        };
        let b = |k: &str| {
            state
                .get(k)
                .and_then(Value::as_bool)
                .ok_or_else(|| bad(format!("missing or invalid \"{k}\"")))
        };
        let n_examples = u("n_examples")? as usize;
        let batch_size = u("batch_size")? as usize;
        if n_examples != self.n_examples || batch_size != self.batch_size {
            return Err(ModelError::Invalid(format!(
                "the batcher state is for {n_examples} examples in batches of {batch_size}, this run has \
                 {} in batches of {}: the data or the batch size changed",
                self.n_examples, self.batch_size
            )));
        }
        let mut next = self.clone();
        next.seed = u("seed")?;
        next.shuffle = b("shuffle")?;
        next.drop_last = b("drop_last")?;
        next.epoch = u("epoch")?;
        next.position = u("position")? as usize;
        if next.drop_last && next.n_examples < next.batch_size {
            return Err(bad(
                "drop_last with fewer examples than the batch size".into()
            ));
        }
        if next.position > next.epoch_end() {
            return Err(bad(format!(
                "position {} past the end of an epoch ({})",
                next.position,
                next.epoch_end()
            )));
        }
        next.reorder();
        *self = next;
        Ok(())
    }
}
