//! Training checkpoints: everything a run needs to continue bit for bit.
//!
//! A checkpoint is a directory:
//!
//! | file | content |
//! |---|---|
//! | `params.safetensors` | the trained parameters by name, in their own dtype |
//! | `optimizer.safetensors` | the optimizer's state tensors (f32) |
//! | `optimizer.json` | the optimizer's kind, step counts, learning rate and schedule multiplier |
//! | `trainer_state.json` | [`TrainerState`]: step, schedule, generator state, the caller's data cursor, metrics |
//!
//! The directory is written under a temporary name next to its destination and renamed into place, so a
//! crash leaves either the previous checkpoint or the new one, never a half-written one. An existing
//! checkpoint at the destination is replaced; any other non-empty directory there is refused.
//!
//! Resuming ([`Trainer::resume`]) restores the parameters, the optimizer state, the step count, the trainer's
//! generator and the metrics, and hands back the data cursor; with dropout derived from `(seed, step)`, the
//! rest of the run is bit-identical to a run that never stopped (same machine, same thread count).

use super::metrics::MetricRecord;
use super::optim::OptimizerState;
use super::schedule::LrScheduler;
use super::trainer::{LogWindow, Trainer, TrainerSettings};
use crate::io::{atomic_write, read_safetensors, write_safetensors};
use crate::{PeftError, PeftRng, Result};
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Trained parameters.
pub const PARAMS_FILE: &str = "params.safetensors";
/// Optimizer state tensors.
pub const OPTIMIZER_TENSORS_FILE: &str = "optimizer.safetensors";
/// Optimizer state metadata.
pub const OPTIMIZER_META_FILE: &str = "optimizer.json";
/// Trainer state.
pub const TRAINER_STATE_FILE: &str = "trainer_state.json";

const FORMAT: &str = "peft-rs-trainer-checkpoint";
const VERSION: u32 = 1;

/// The state of a [`PeftRng`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// The stream key.
    pub key: u64,
    /// The position in the stream.
    pub counter: u64,
}

/// `trainer_state.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Always `"peft-rs-trainer-checkpoint"`.
    pub format: String,
    /// Format version (1).
    pub version: u32,
    /// Optimizer steps completed.
    pub step: u64,
    /// The settings of the run that wrote the checkpoint (its seed must match on resume).
    pub settings: TrainerSettings,
    /// The schedule and its step count.
    pub scheduler: LrScheduler,
    /// The trainer's generator ([`Trainer::rng_mut`]).
    pub rng: RngState,
    /// Where the caller's data stream stands (opaque to the trainer).
    pub data_cursor: serde_json::Value,
    /// The optimizer's kind.
    pub optimizer: String,
    /// Every metrics record so far.
    pub metrics: Vec<MetricRecord>,
    /// The unfinished logging window.
    pub log_window: LogWindow,
}

fn json_err(path: &Path, e: impl std::fmt::Display) -> PeftError {
    PeftError::Json {
        context: path.display().to_string(),
        message: e.to_string(),
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| PeftError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| json_err(path, e))
}

fn write_json<T: Serialize>(path: &Path, v: &T) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v).map_err(|e| json_err(path, e))?;
    text.push('\n');
    atomic_write(path, text.as_bytes())
}

/// Reads `trainer_state.json` of a checkpoint directory.
pub fn read_trainer_state(dir: impl AsRef<Path>) -> Result<TrainerState> {
    let path = dir.as_ref().join(TRAINER_STATE_FILE);
    let state: TrainerState = read_json(&path)?;
    if state.format != FORMAT || state.version != VERSION {
        return Err(PeftError::Invalid(format!(
            "{}: not a version {VERSION} trainer checkpoint (format {:?}, version {})",
            path.display(),
            state.format,
            state.version
        )));
    }
    Ok(state)
}

/// Flushes a directory's entries to disk (best effort: not every platform can open a directory).
fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// `parent/.<name>.<what>-<pid>`.
fn sibling(dir: &Path, what: &str) -> Result<PathBuf> {
    let name = dir
        .file_name()
        .ok_or_else(|| PeftError::Invalid(format!("{}: not a directory name", dir.display())))?;
    Ok(dir.with_file_name(format!(
        ".{}.{what}-{}",
        name.to_string_lossy(),
        std::process::id()
    )))
}

/// Writes a whole directory through `fill` into a temporary sibling, then renames it to `dir`.
fn atomic_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| PeftError::io(parent, e))?;
    }
    if dir.exists() {
        let is_checkpoint = dir.join(TRAINER_STATE_FILE).exists();
        let is_empty = std::fs::read_dir(dir)
            .map_err(|e| PeftError::io(dir, e))?
            .next()
            .is_none();
        if !is_checkpoint && !is_empty {
            return Err(PeftError::Invalid(format!(
                "{}: exists and is not a trainer checkpoint; refusing to replace it",
                dir.display()
            )));
        }
    }
    let tmp = sibling(dir, "tmp")?;
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| PeftError::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| PeftError::io(&tmp, e))?;
    let res = (|| -> Result<()> {
        fill(&tmp)?;
        sync_dir(&tmp);
        if dir.exists() {
            let old = sibling(dir, "old")?;
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(|e| PeftError::io(&old, e))?;
            }
            std::fs::rename(dir, &old).map_err(|e| PeftError::io(dir, e))?;
            if let Err(e) = std::fs::rename(&tmp, dir) {
                // Put the previous checkpoint back.
                let _ = std::fs::rename(&old, dir);
                return Err(PeftError::io(dir, e));
            }
            std::fs::remove_dir_all(&old).map_err(|e| PeftError::io(&old, e))?;
        } else {
            std::fs::rename(&tmp, dir).map_err(|e| PeftError::io(dir, e))?;
        }
        if let Some(parent) = dir.parent() {
            sync_dir(parent);
        }
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res
}

impl Trainer {
    /// Writes a checkpoint of the run to `dir` (atomically), with `data_cursor`: whatever the caller needs to
    /// continue its data stream (epoch, position, shuffle seed…), handed back by [`Trainer::resume`].
    pub fn save_checkpoint(
        &self,
        dir: impl AsRef<Path>,
        data_cursor: &serde_json::Value,
    ) -> Result<()> {
        let opt = self.optimizer.state()?;
        let (key, counter) = self.rng.state();
        let state = TrainerState {
            format: FORMAT.into(),
            version: VERSION,
            step: self.scheduler.step,
            settings: self.settings.clone(),
            scheduler: self.scheduler.clone(),
            rng: RngState { key, counter },
            data_cursor: data_cursor.clone(),
            optimizer: opt.kind.clone(),
            metrics: self.metrics.clone(),
            log_window: self.window.clone(),
        };
        let params: Vec<(String, Tensor)> = self
            .params
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect();
        let opt_tensors: Vec<(String, Tensor)> = opt
            .tensors
            .iter()
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        let opt_meta = serde_json::json!({"kind": opt.kind, "meta": opt.meta});
        atomic_dir(dir.as_ref(), |tmp| {
            write_safetensors(tmp.join(PARAMS_FILE), &params)?;
            write_safetensors(tmp.join(OPTIMIZER_TENSORS_FILE), &opt_tensors)?;
            write_json(&tmp.join(OPTIMIZER_META_FILE), &opt_meta)?;
            write_json(&tmp.join(TRAINER_STATE_FILE), &state)
        })
    }

    /// Restores a checkpoint written by [`Trainer::save_checkpoint`] into this trainer (built like the one
    /// that wrote it: same parameter names and shapes, same optimizer kind, same seed) and returns the data
    /// cursor. The trainer's own schedule is evaluated at the restored step; if a metrics log is attached,
    /// it is rewritten to the checkpoint's records.
    pub fn resume(&mut self, dir: impl AsRef<Path>) -> Result<serde_json::Value> {
        let dir = dir.as_ref();
        let state = read_trainer_state(dir)?;
        if state.settings.seed != self.settings.seed {
            return Err(PeftError::Invalid(format!(
                "{}: the checkpoint's run has seed {}, this trainer seed {}; resuming would change the \
                 dropout streams",
                dir.display(),
                state.settings.seed,
                self.settings.seed
            )));
        }
        // Load and check everything before changing anything.
        let params_path = dir.join(PARAMS_FILE);
        let mut saved = read_safetensors(&params_path, &Device::Cpu)?;
        let mut values = Vec::with_capacity(self.params.len());
        for (name, var) in &self.params {
            let t = saved.shift_remove(name).ok_or_else(|| {
                PeftError::MissingKey(format!("{name} in {}", params_path.display()))
            })?;
            if t.dims() != var.dims() || t.dtype() != var.dtype() {
                return Err(PeftError::ShapeMismatch {
                    name: format!(
                        "{name} ({:?} in the checkpoint, {:?} here)",
                        t.dtype(),
                        var.dtype()
                    ),
                    expected: var.dims().to_vec(),
                    got: t.dims().to_vec(),
                });
            }
            values.push(t.to_device(var.device())?);
        }
        if !saved.is_empty() {
            return Err(PeftError::UnexpectedKeys(saved.keys().cloned().collect()));
        }
        let meta_path = dir.join(OPTIMIZER_META_FILE);
        let meta: serde_json::Value = read_json(&meta_path)?;
        let kind = meta["kind"]
            .as_str()
            .ok_or_else(|| json_err(&meta_path, "missing string `kind`"))?
            .to_string();
        let opt_state = OptimizerState {
            kind,
            tensors: read_safetensors(dir.join(OPTIMIZER_TENSORS_FILE), &Device::Cpu)?,
            meta: meta["meta"].clone(),
        };
        self.optimizer.load_state(&opt_state)?;
        for ((_, var), t) in self.params.iter().zip(values) {
            var.set(&t)?;
        }
        self.scheduler.step = state.step;
        self.rng = PeftRng::from_state(state.rng.key, state.rng.counter);
        self.metrics = state.metrics;
        self.window = state.log_window;
        self.last_eval = self.metrics.iter().rev().find_map(|r| match r {
            MetricRecord::Eval(e) => Some(e.eval_loss),
            MetricRecord::Train(_) => None,
        });
        self.last = None;
        self.session_time = Duration::ZERO;
        self.session_steps = 0;
        if let Some(log) = &mut self.log {
            log.rewrite(&self.metrics)?;
        }
        Ok(state.data_cursor)
    }
}
