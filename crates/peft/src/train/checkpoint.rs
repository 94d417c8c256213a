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
use crate::io::{
    ExistingEntries, TempKind, atomic_dir, atomic_write, make_symlink, read_safetensors,
    remove_stale_temps_in, sync_dir, temp_path, write_safetensors,
};
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

/// Writes a checkpoint directory through `fill`, atomically ([`atomic_dir`]): an existing checkpoint at `dir`
/// is replaced, any other non-empty directory refused.
fn write_checkpoint_dir(dir: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
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
    atomic_dir(dir, ExistingEntries::Drop, fill)
}

/// The name of the latest complete checkpoint in a checkpoints directory: a symlink to `step-N`.
pub const LAST: &str = "last";

/// The directory name of the checkpoint at `step`: `step-<step>`.
pub fn step_dir_name(step: u64) -> String {
    format!("step-{step}")
}

/// Points `checkpoints/last` at `checkpoints/<target>` in one step: a new symlink (relative target, so the
/// run directory can move) made under a temporary name and renamed over `last`; a process killed at any moment
/// leaves `last` at the previous checkpoint or at the new one.
///
/// A `last` that is a real directory (written before `last` became a symlink) is migrated once: it is first
/// copied (hard links) to `step-M` (its own step; `step-M.from-last` if `step-M` exists), then exchanged with
/// the new symlink in one step (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere removed, then replaced), and the
/// copy left under the temporary name removed. No checkpoint is lost at any moment.
#[cfg(unix)]
pub fn point_last(checkpoints: &Path, target: &str) -> Result<()> {
    let last = checkpoints.join(LAST);
    let meta = std::fs::symlink_metadata(&last).ok();
    let old_dir = meta.as_ref().is_some_and(|m| m.is_dir());
    if old_dir {
        migrate_last_dir(checkpoints, &last)?;
    }
    let tmp = temp_path(&last, TempKind::Tmp)?;
    if std::fs::symlink_metadata(&tmp).is_ok() {
        std::fs::remove_file(&tmp).map_err(|e| PeftError::io(&tmp, e))?;
    }
    make_symlink(Path::new(target), &tmp)?;
    let res = if old_dir {
        match crate::io::exchange_paths(&tmp, &last) {
            // `tmp` now holds the old directory, already copied to its `step-M`.
            Ok(()) => std::fs::remove_dir_all(&tmp).map_err(|e| PeftError::io(&tmp, e)),
            Err(_) => std::fs::remove_dir_all(&last)
                .map_err(|e| PeftError::io(&last, e))
                .and_then(|()| std::fs::rename(&tmp, &last).map_err(|e| PeftError::io(&last, e))),
        }
    } else {
        std::fs::rename(&tmp, &last).map_err(|e| PeftError::io(&last, e))
    };
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    sync_dir(checkpoints);
    res
}

/// Copies an old-format `last` directory to the step directory it is (hard links, atomically).
#[cfg(unix)]
fn migrate_last_dir(checkpoints: &Path, last: &Path) -> Result<()> {
    let step = read_trainer_state(last)?.step;
    let mut dest = checkpoints.join(step_dir_name(step));
    let mut n = 1;
    while std::fs::symlink_metadata(&dest).is_ok() {
        let suffix = if n == 1 {
            String::new()
        } else {
            format!("-{n}")
        };
        dest = checkpoints.join(format!("{}.from-last{suffix}", step_dir_name(step)));
        n += 1;
    }
    atomic_dir(&dest, ExistingEntries::Drop, |tmp| {
        for e in std::fs::read_dir(last).map_err(|e| PeftError::io(last, e))? {
            let e = e.map_err(|e| PeftError::io(last, e))?;
            let to = tmp.join(e.file_name());
            if std::fs::hard_link(e.path(), &to).is_err() {
                std::fs::copy(e.path(), &to).map_err(|err| PeftError::io(e.path(), err))?;
            }
        }
        Ok(())
    })
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
        write_checkpoint_dir(dir.as_ref(), |tmp| {
            write_safetensors(tmp.join(PARAMS_FILE), &params)?;
            write_safetensors(tmp.join(OPTIMIZER_TENSORS_FILE), &opt_tensors)?;
            write_json(&tmp.join(OPTIMIZER_META_FILE), &opt_meta)?;
            write_json(&tmp.join(TRAINER_STATE_FILE), &state)
        })
    }

    /// Writes the checkpoint of the current step to `checkpoints/step-N` ([`Trainer::save_checkpoint`]) and
    /// points `checkpoints/last` at it ([`point_last`]), after removing the temporaries that killed runs left
    /// in `checkpoints` ([`remove_stale_temps_in`]). Every `step-N` is kept. Returns the step directory.
    pub fn save_checkpoint_step(
        &self,
        checkpoints: impl AsRef<Path>,
        data_cursor: &serde_json::Value,
    ) -> Result<PathBuf> {
        let checkpoints = checkpoints.as_ref();
        std::fs::create_dir_all(checkpoints).map_err(|e| PeftError::io(checkpoints, e))?;
        remove_stale_temps_in(checkpoints, None)?;
        let name = step_dir_name(self.scheduler.step);
        let dir = checkpoints.join(&name);
        self.save_checkpoint(&dir, data_cursor)?;
        #[cfg(unix)]
        point_last(checkpoints, &name)?;
        #[cfg(not(unix))]
        self.save_checkpoint(checkpoints.join(LAST), data_cursor)?;
        Ok(dir)
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

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;
    use crate::io::tests::{dead_pid, names};
    use crate::train::optim::{Sgd, SgdConfig};
    use crate::train::schedule::Schedule;
    use candle_core::{DType, Var};
    use serde_json::Value;

    /// A trainer of one parameter `w` pulled towards 3 by SGD.
    fn trainer() -> (Trainer, Var) {
        let w = Var::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let params = vec![("w".to_string(), w.clone())];
        let opt = Sgd::from_params(
            params.clone(),
            SgdConfig {
                lr: 0.1,
                ..Default::default()
            },
        )
        .unwrap();
        let t = Trainer::new(
            params,
            Box::new(opt),
            Schedule::Constant,
            Default::default(),
        )
        .unwrap();
        (t, w)
    }

    fn step(t: &mut Trainer, w: &Var) {
        t.train_step(&mut |_, _| Ok((w.as_tensor() - 3.0)?.sqr()?.sum_all()?))
            .unwrap();
    }

    fn resumed_w(dir: &Path) -> (u64, Vec<f32>) {
        let (mut t, w) = trainer();
        t.resume(dir).unwrap();
        (t.step(), w.as_tensor().to_vec1().unwrap())
    }

    /// `last` is a symlink with the relative target `step-N`, moved on by each save; every `step-N` stays;
    /// resuming from `last` continues from the newest.
    #[test]
    fn last_is_a_relative_symlink_to_the_newest_step() {
        let tmp = tempfile::tempdir().unwrap();
        let ck = tmp.path().join("run/checkpoints");
        let (mut t, w) = trainer();
        step(&mut t, &w);
        assert_eq!(
            t.save_checkpoint_step(&ck, &Value::Null).unwrap(),
            ck.join("step-1")
        );
        step(&mut t, &w);
        t.save_checkpoint_step(&ck, &Value::Null).unwrap();
        let w2: Vec<f32> = w.as_tensor().to_vec1().unwrap();
        assert_eq!(names(&ck), ["last", "step-1", "step-2"]);
        assert!(
            std::fs::symlink_metadata(ck.join(LAST))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            std::fs::read_link(ck.join(LAST)).unwrap(),
            Path::new("step-2")
        );
        assert_eq!(resumed_w(&ck.join(LAST)), (2, w2.clone()));
        assert_eq!(resumed_w(&ck.join("step-1")).0, 1);
        // The run directory can move: the link is relative.
        std::fs::rename(tmp.path().join("run"), tmp.path().join("moved")).unwrap();
        assert_eq!(
            resumed_w(&tmp.path().join("moved/checkpoints/last")),
            (2, w2)
        );
    }

    /// A run killed in the middle of a save leaves a half-written `.step-3.tmp-PID` directory and a
    /// `.last.tmp-PID` symlink: `last` still resumes (step 2), and the next save removes both, leaves a live
    /// writer's temporary (this process's id) alone, and moves `last` on.
    #[test]
    fn a_killed_save_leaves_last_complete_and_the_next_save_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let ck = tmp.path().join("checkpoints");
        let (mut t, w) = trainer();
        step(&mut t, &w);
        step(&mut t, &w);
        t.save_checkpoint_step(&ck, &Value::Null).unwrap();
        let dead = dead_pid();
        let half = ck.join(format!(".step-3.tmp-{dead}"));
        std::fs::create_dir(&half).unwrap();
        std::fs::write(half.join(PARAMS_FILE), b"trunc").unwrap();
        make_symlink(Path::new("step-3"), &ck.join(format!(".last.tmp-{dead}"))).unwrap();
        let live = ck.join(format!(".step-9.tmp-{}", std::process::id()));
        std::fs::create_dir(&live).unwrap();
        assert_eq!(resumed_w(&ck.join(LAST)).0, 2);

        step(&mut t, &w);
        t.save_checkpoint_step(&ck, &Value::Null).unwrap();
        let mut want = vec![
            "last".to_string(),
            "step-2".into(),
            "step-3".into(),
            live.file_name().unwrap().to_string_lossy().into_owned(),
        ];
        want.sort();
        assert_eq!(names(&ck), want);
        assert_eq!(
            std::fs::read_link(ck.join(LAST)).unwrap(),
            Path::new("step-3")
        );
        assert_eq!(resumed_w(&ck.join(LAST)).0, 3);
    }

    /// A `last` written as a real directory (before it became a symlink) resumes as it is and is migrated on
    /// the next save: its checkpoint lands in `step-M` (hard links), `last` becomes the symlink, nothing is
    /// left under a temporary name, and the next save does not copy it again.
    #[test]
    fn an_old_format_last_directory_is_migrated_once() {
        let tmp = tempfile::tempdir().unwrap();
        let ck = tmp.path().join("checkpoints");
        let (mut t, w) = trainer();
        step(&mut t, &w);
        let w1: Vec<f32> = w.as_tensor().to_vec1().unwrap();
        t.save_checkpoint(ck.join(LAST), &Value::Null).unwrap();
        assert!(std::fs::symlink_metadata(ck.join(LAST)).unwrap().is_dir());
        assert_eq!(resumed_w(&ck.join(LAST)), (1, w1.clone()));

        step(&mut t, &w);
        t.save_checkpoint_step(&ck, &Value::Null).unwrap();
        assert_eq!(names(&ck), ["last", "step-1", "step-2"]);
        assert_eq!(
            std::fs::read_link(ck.join(LAST)).unwrap(),
            Path::new("step-2")
        );
        assert_eq!(resumed_w(&ck.join("step-1")), (1, w1));
        step(&mut t, &w);
        t.save_checkpoint_step(&ck, &Value::Null).unwrap();
        assert_eq!(names(&ck), ["last", "step-1", "step-2", "step-3"]);
    }
}
