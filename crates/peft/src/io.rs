//! Reading and writing adapter directories exactly as PEFT 0.21.2 does.
//!
//! A directory holds `adapter_config.json` and `adapter_model.safetensors` (metadata `{"format": "pt"}`).
//! Adapter `default` sits at the root, any other adapter in `<dir>/<name>/`. Keys keep the
//! `base_model.model.` prefix and drop the adapter name (`base_model.model.fc1.lora_A.weight`). Keys without
//! an adapter parameter are the model's own tensors that the adapter replaces: biases trained with
//! `bias="all"` / `"lora_only"` (`fc1.base_layer.bias`, `norm.bias`), `modules_to_save` copies (`fc3.weight`)
//! and saved embedding matrices (`embed_tokens.base_layer.weight`). [`split_keys`] separates the two.
//!
//! Every file is written to a temporary name in the same directory and renamed, so a failure never leaves
//! a half-written file behind; a directory (an adapter, a checkpoint) is assembled under a temporary name and
//! takes its destination's place in one step ([`atomic_dir`]). Temporaries are named `.<NAME>.<kind>-<PID>`
//! ([`TempKind`]); those that a killed process left are found and removed by the next write
//! ([`remove_stale_temps`]). [`ensure_no_alias`] is the check every command runs before it writes: no output
//! may be one of its inputs.

use crate::config::PeftConfig;
use crate::{PeftError, Result};
use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

mod checks;
pub use checks::{AdapterChecks, check_adapter_tensors, set_allow_non_finite};

/// The config file name in an adapter directory.
pub const CONFIG_NAME: &str = "adapter_config.json";
/// The weights file name in an adapter directory.
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// The prefix PEFT puts before module names in adapter files.
pub const MODEL_PREFIX: &str = "base_model.model.";

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, then a rename.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    atomic_write_with(path, |f| f.write_all(bytes))
}

/// Writes `path` atomically through `write`, which gets a buffered writer on a temporary file.
pub fn atomic_write_with(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>,
) -> Result<()> {
    atomic_write_try(path, |w| write(w).map_err(|e| PeftError::io(path, e)))
}

/// The one atomic writer: `write` fills a buffered temporary file next to `path` (it may fail with a library
/// error), which is synced and renamed to `path`; on any failure the temporary file is removed and `path` is
/// left as it was. Stale temporaries of `path` that a killed process left ([`remove_stale_temps_beside`]) are
/// removed first.
pub fn atomic_write_try(
    path: &Path,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>,
) -> Result<()> {
    remove_stale_temps_beside(path)?;
    let tmp = temp_path(path, TempKind::Tmp)?;
    let res = (|| -> Result<()> {
        let f = std::fs::File::create(&tmp).map_err(|e| PeftError::io(path, e))?;
        let mut w = std::io::BufWriter::new(f);
        write(&mut w)?;
        let f = w
            .into_inner()
            .map_err(|e| PeftError::io(path, e.into_error()))?;
        f.sync_all().map_err(|e| PeftError::io(path, e))?;
        std::fs::rename(&tmp, path).map_err(|e| PeftError::io(path, e))
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

// ---------------------------------------------------------------------------------------------------------
// Crash safety: temporary names, stale temporaries, atomic directories, aliasing.
// ---------------------------------------------------------------------------------------------------------

/// The kinds of temporary names the writers use, all `.<NAME>.<kind>-<PID>` next to the destination `NAME`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TempKind {
    /// `.NAME.tmp-PID`: a file or directory being written, renamed to `NAME` when complete.
    Tmp,
    /// `.NAME.old-PID`: the previous `NAME`, moved aside while the new one takes its place.
    Old,
    /// `.NAME.gguf-base-PID`: a GGUF base written as an HF directory for `peft merge` into `NAME`.
    GgufBase,
}

impl TempKind {
    const ALL: [TempKind; 3] = [TempKind::Tmp, TempKind::Old, TempKind::GgufBase];

    /// The kind's word in the name (`tmp`, `old`, `gguf-base`).
    pub fn as_str(self) -> &'static str {
        match self {
            TempKind::Tmp => "tmp",
            TempKind::Old => "old",
            TempKind::GgufBase => "gguf-base",
        }
    }
}

/// `parent/.<name>.<kind>-<this process id>`: the temporary name of `path`.
pub fn temp_path(path: &Path, kind: TempKind) -> Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| PeftError::Invalid(format!("{}: names no file", path.display())))?;
    Ok(path.with_file_name(format!(
        ".{}.{}-{}",
        name.to_string_lossy(),
        kind.as_str(),
        std::process::id()
    )))
}

/// Splits a temporary name `.<NAME>.<kind>-<PID>` into `(NAME, kind, PID)`; `None` for any other name.
pub fn parse_temp_name(file_name: &str) -> Option<(&str, TempKind, u32)> {
    let rest = file_name.strip_prefix('.')?;
    let (head, pid) = rest.rsplit_once('-')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let pid: u32 = pid.parse().ok()?;
    TempKind::ALL.into_iter().find_map(|kind| {
        let name = head.strip_suffix(kind.as_str())?.strip_suffix('.')?;
        (!name.is_empty()).then_some((name, kind, pid))
    })
}

/// A temporary that a killed run left and that [`remove_stale_temps_in`] dealt with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaleTemp {
    /// The temporary file or directory.
    pub path: PathBuf,
    /// The process id in its name (a process that no longer runs).
    pub pid: u32,
    /// Bytes it held (files, recursively).
    pub bytes: u64,
    /// `Some(dest)` when it was a previous `NAME` moved aside (`.NAME.old-PID`) and `NAME` was missing: it was
    /// renamed back to `dest` instead of being removed (the run was killed between its two renames).
    pub restored_to: Option<PathBuf>,
}

impl std::fmt::Display for StaleTemp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.restored_to {
            Some(dest) => write!(
                f,
                "restored {} to {} (moved aside by process {}, which no longer runs)",
                self.path.display(),
                dest.display(),
                self.pid
            ),
            None => write!(
                f,
                "removed stale temporary {} ({} bytes, left by process {}, which no longer runs)",
                self.path.display(),
                self.bytes,
                self.pid
            ),
        }
    }
}

static STALE_TEMP_REPORTER: std::sync::RwLock<Option<fn(&StaleTemp)>> =
    std::sync::RwLock::new(None);

/// Sets the function every removal of a stale temporary is reported to (the `peft` binary prints one line
/// on stderr per removal). The library prints nothing; without a reporter the removals are only returned.
pub fn set_stale_temp_reporter(report: Option<fn(&StaleTemp)>) {
    if let Ok(mut r) = STALE_TEMP_REPORTER.write() {
        *r = report;
    }
}

/// Whether a temporary named with process id `pid` and last modified at `mtime` may still be written by a
/// live process: this process (another thread may be writing it), or a running process that started before
/// the temporary was last modified. A process that started after it cannot have written it (its id was
/// reused). Only Linux (`/proc`) can tell; elsewhere every temporary is assumed live and kept.
fn writer_may_be_alive(pid: u32, mtime: Option<std::time::SystemTime>) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if !cfg!(target_os = "linux") {
        return true;
    }
    if !Path::new(&format!("/proc/{pid}")).exists() {
        // Gone, unless there is no procfs to ask.
        return !Path::new("/proc/self").exists();
    }
    match (process_start_time(pid), mtime) {
        // Two seconds of slack: the boot time is whole seconds, file times are coarse on some filesystems.
        (Some(start), Some(mtime)) => start <= mtime + std::time::Duration::from_secs(2),
        _ => true,
    }
}

/// When process `pid` started (Linux: `/proc/PID/stat` field 22 in clock ticks after `/proc/stat`'s `btime`).
fn process_start_time(pid: u32) -> Option<std::time::SystemTime> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2 (the command) is in parentheses and may contain spaces: count from the last ')'.
    let after = &stat[stat.rfind(')')? + 1..];
    let ticks: u64 = after.split_whitespace().nth(19)?.parse().ok()?;
    let btime: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let hz = clock_ticks_per_second()?;
    Some(
        std::time::UNIX_EPOCH
            + std::time::Duration::from_secs(btime)
            + std::time::Duration::from_secs_f64(ticks as f64 / hz as f64),
    )
}

#[cfg(unix)]
fn clock_ticks_per_second() -> Option<u64> {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then_some(hz as u64)
}

#[cfg(not(unix))]
fn clock_ticks_per_second() -> Option<u64> {
    None
}

fn tree_bytes(path: &Path) -> u64 {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::read_dir(path)
            .map(|it| it.flatten().map(|e| tree_bytes(&e.path())).sum())
            .unwrap_or(0),
        Ok(m) => m.len(),
        Err(_) => 0,
    }
}

/// Finds the temporaries that killed runs left in `dir` (not recursively): entries named
/// `.<NAME>.<kind>-<PID>` ([`TempKind`]) — only those of `name` when given — whose process no longer runs
/// (see below), removes them and returns what it removed. A `.NAME.old-PID` whose `NAME` is missing is the
/// previous `NAME` of a run killed between its two renames: it is renamed back rather than removed.
///
/// A temporary is left alone when its process may still be writing it: its id is this process's (another
/// thread), or a running process with that id started before the temporary was last changed (a process that
/// started later got the id of a dead one). Only Linux can tell (`/proc`); elsewhere nothing is removed. Other
/// files, dot files of other shapes included, are never touched. A missing `dir` has nothing to remove.
/// Every removal is also passed to the reporter set by [`set_stale_temp_reporter`].
pub fn remove_stale_temps_in(dir: &Path, name: Option<&str>) -> Result<Vec<StaleTemp>> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => return Ok(Vec::new()),
        Err(e) => return Err(PeftError::io(dir, e)),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| PeftError::io(dir, e))?;
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else {
            continue;
        };
        let Some((target, kind, pid)) = parse_temp_name(file_name) else {
            continue;
        };
        if name.is_some_and(|n| n != target) {
            continue;
        }
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue; // removed meanwhile
        };
        if writer_may_be_alive(pid, meta.modified().ok()) {
            continue;
        }
        let bytes = tree_bytes(&path);
        let dest = dir.join(target);
        let restore =
            kind == TempKind::Old && meta.is_dir() && std::fs::symlink_metadata(&dest).is_err();
        let stale = if restore {
            std::fs::rename(&path, &dest).map_err(|e| PeftError::io(&path, e))?;
            StaleTemp {
                path,
                pid,
                bytes,
                restored_to: Some(dest),
            }
        } else {
            let res = if meta.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            match res {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(PeftError::io(&path, e)),
            }
            StaleTemp {
                path,
                pid,
                bytes,
                restored_to: None,
            }
        };
        if let Ok(r) = STALE_TEMP_REPORTER.read()
            && let Some(report) = *r
        {
            report(&stale);
        }
        removed.push(stale);
    }
    Ok(removed)
}

/// [`remove_stale_temps_in`] for the temporaries of `path` beside it (`.NAME.*-PID` in its directory).
pub fn remove_stale_temps_beside(path: &Path) -> Result<Vec<StaleTemp>> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let parent = path.parent().unwrap_or(Path::new(""));
    remove_stale_temps_in(parent, Some(name))
}

/// The temporaries an earlier killed write of `path` may have left: beside it (`.NAME.*-PID`) and, when
/// `path` is a directory, every one inside it (the atomic writes of its files). See
/// [`remove_stale_temps_in`]; called at the start of every writer (merge, `save_adapter`, checkpoints).
pub fn remove_stale_temps(path: &Path) -> Result<Vec<StaleTemp>> {
    let mut removed = remove_stale_temps_beside(path)?;
    if path.is_dir() {
        removed.extend(remove_stale_temps_in(path, None)?);
    }
    Ok(removed)
}

/// Flushes a directory's entries to disk (best effort: not every platform can open a directory).
pub fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Swaps two existing paths (files, directories, symlinks) in one step: Linux `renameat2(RENAME_EXCHANGE)`;
/// an `Unsupported` error elsewhere or where the filesystem cannot.
#[cfg(target_os = "linux")]
pub fn exchange_paths(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let a = std::ffi::CString::new(a.as_os_str().as_bytes())?;
    let b = std::ffi::CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: both are valid NUL-terminated strings that outlive the call; AT_FDCWD resolves them as paths.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Swaps two existing paths in one step: not available on this platform (an `Unsupported` error).
#[cfg(not(target_os = "linux"))]
pub fn exchange_paths(_a: &Path, _b: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

/// Copies the tree `from` to `to` with hard links where the filesystem allows (copies otherwise).
fn link_tree(from: &Path, to: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(from).map_err(|e| PeftError::io(from, e))?;
    if meta.is_dir() {
        std::fs::create_dir(to).map_err(|e| PeftError::io(to, e))?;
        for e in std::fs::read_dir(from).map_err(|e| PeftError::io(from, e))? {
            let e = e.map_err(|e| PeftError::io(from, e))?;
            link_tree(&e.path(), &to.join(e.file_name()))?;
        }
        Ok(())
    } else if meta.file_type().is_symlink() {
        let target = std::fs::read_link(from).map_err(|e| PeftError::io(from, e))?;
        make_symlink(&target, to)
    } else if std::fs::hard_link(from, to).is_ok() {
        Ok(())
    } else {
        std::fs::copy(from, to)
            .map(|_| ())
            .map_err(|e| PeftError::io(from, e))
    }
}

/// Creates the symlink `link` → `target` (a relative target is relative to `link`'s directory).
#[cfg(unix)]
pub fn make_symlink(target: &Path, link: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, link).map_err(|e| PeftError::io(link, e))
}

/// Creates the symlink `link` → `target` (a relative target is relative to `link`'s directory).
#[cfg(not(unix))]
pub fn make_symlink(target: &Path, link: &Path) -> Result<()> {
    Err(PeftError::io(
        link,
        std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("symlinks to {} are not supported here", target.display()),
        ),
    ))
}

/// What [`atomic_dir`] does with an existing directory's entries that `fill` did not write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExistingEntries {
    /// They are dropped: the new directory is exactly what `fill` wrote.
    Drop,
    /// They are carried over (hard links): `fill` adds or replaces files, as writing into the directory would.
    Keep,
}

/// Writes the directory `dir` atomically: `fill` writes into a fresh temporary sibling `.NAME.tmp-PID`, which
/// then takes `dir`'s place in one step — a rename when `dir` is missing or empty, an atomic exchange of the
/// two directories when it exists (Linux `renameat2(RENAME_EXCHANGE)`; the old contents are removed after).
/// A process killed at any moment leaves either the old `dir` or the complete new one, plus at most a
/// temporary that the next write removes ([`remove_stale_temps`]). Where no exchange exists, the old `dir` is
/// renamed aside (`.NAME.old-PID`) first; a kill between the two renames leaves it there and the next write
/// renames it back. A `dir` that is a symlink is written where it points. Stale temporaries of `dir` are
/// removed first; on an error `dir` is left as it was.
pub fn atomic_dir(
    dir: &Path,
    existing: ExistingEntries,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let resolved;
    let dir = if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
        resolved = dir.canonicalize().map_err(|e| PeftError::io(dir, e))?;
        resolved.as_path()
    } else {
        dir
    };
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(|e| PeftError::io(parent, e))?;
    remove_stale_temps(dir)?;
    let tmp = temp_path(dir, TempKind::Tmp)?;
    if std::fs::symlink_metadata(&tmp).is_ok() {
        // Our own process id: an earlier failed attempt of this process.
        std::fs::remove_dir_all(&tmp).map_err(|e| PeftError::io(&tmp, e))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| PeftError::io(&tmp, e))?;
    let res = (|| -> Result<()> {
        fill(&tmp)?;
        let old_entries: Vec<std::fs::DirEntry> = match std::fs::read_dir(dir) {
            Ok(it) => it
                .collect::<std::io::Result<_>>()
                .map_err(|e| PeftError::io(dir, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(PeftError::io(dir, e)),
        };
        if existing == ExistingEntries::Keep {
            for e in &old_entries {
                let name = e.file_name();
                let to = tmp.join(&name);
                let is_temp = name.to_str().and_then(parse_temp_name).is_some();
                if !is_temp && std::fs::symlink_metadata(&to).is_err() {
                    link_tree(&e.path(), &to)?;
                }
            }
        }
        sync_dir(&tmp);
        if !dir.exists() || old_entries.is_empty() {
            // A missing or empty `dir`: one rename (which replaces an empty directory).
            std::fs::rename(&tmp, dir).map_err(|e| PeftError::io(dir, e))?;
        } else if !dir.is_dir() {
            return Err(PeftError::Invalid(format!(
                "{}: exists and is not a directory",
                dir.display()
            )));
        } else if exchange_paths(&tmp, dir).is_ok() {
            // `tmp` now holds the old contents.
            std::fs::remove_dir_all(&tmp).map_err(|e| PeftError::io(&tmp, e))?;
        } else {
            let old = temp_path(dir, TempKind::Old)?;
            std::fs::rename(dir, &old).map_err(|e| PeftError::io(dir, e))?;
            if let Err(e) = std::fs::rename(&tmp, dir) {
                let _ = std::fs::rename(&old, dir);
                return Err(PeftError::io(dir, e));
            }
            std::fs::remove_dir_all(&old).map_err(|e| PeftError::io(&old, e))?;
        }
        sync_dir(parent);
        Ok(())
    })();
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res
}

/// `path` made absolute with symlinks resolved, also when it does not exist yet: component by component,
/// each existing prefix resolved (symlinks followed), `..` taken from the resolved prefix, the missing rest
/// appended.
pub fn resolve_path(path: &Path) -> PathBuf {
    use std::path::Component;
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut out = PathBuf::new();
    for c in abs.components() {
        match c {
            Component::Prefix(_) | Component::RootDir => out.push(c),
            Component::CurDir => {}
            // `out` is resolved so far: its parent is the real parent.
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => {
                out.push(name);
                if std::fs::symlink_metadata(&out).is_ok()
                    && let Ok(real) = out.canonicalize()
                {
                    out = real;
                }
            }
        }
    }
    out
}

/// One input of a writer, for [`ensure_no_alias`]: what it is (`"the base model"`, `"--data"`) and its path.
pub type NamedInput<'a> = (&'a str, &'a Path);

#[cfg(unix)]
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_file(_a: &Path, _b: &Path) -> bool {
    false
}

/// Refuses to write any of `outputs` (files or directories a writer creates or replaces) when one of them
/// aliases one of `inputs`, comparing resolved paths (absolute, symlinks followed, also for outputs that do not
/// exist yet) and, for existing files, the file itself (a hard link to the input is the input). An output
/// aliases an input when it is the input, when it is a directory that holds the input (writing or replacing
/// it can overwrite the input), or when it lies inside an input directory (the write changes that input).
/// Inputs that do not exist are skipped (their reader reports them). The error names both paths.
///
/// ```
/// use peft::io::ensure_no_alias;
/// let tmp = std::env::temp_dir().join(format!("peft-alias-doc-{}", std::process::id()));
/// std::fs::create_dir_all(tmp.join("base"))?;
/// std::fs::write(tmp.join("base/model.safetensors"), b"")?;
/// let base = tmp.join("base/model.safetensors");
/// let inputs = [("the base model", base.as_path())];
/// assert!(ensure_no_alias(&inputs, &[&tmp.join("merged.safetensors")]).is_ok());
/// // The same file by another spelling, and the directory that holds it.
/// assert!(ensure_no_alias(&inputs, &[&tmp.join("base/../base/model.safetensors")]).is_err());
/// assert!(ensure_no_alias(&inputs, &[&tmp.join("base")]).is_err());
/// # std::fs::remove_dir_all(&tmp).ok();
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn ensure_no_alias(inputs: &[NamedInput<'_>], outputs: &[&Path]) -> Result<()> {
    for output in outputs {
        let out = resolve_path(output);
        for (what, input) in inputs {
            let Ok(inp) = input.canonicalize() else {
                continue;
            };
            if out == inp || same_file(&out, &inp) || inp.starts_with(&out) {
                return Err(PeftError::Invalid(format!(
                    "refusing to write {}: that would overwrite {what} {} (choose an output outside it)",
                    output.display(),
                    input.display()
                )));
            }
            if inp.is_dir() && out.starts_with(&inp) {
                return Err(PeftError::Invalid(format!(
                    "refusing to write {}: it is inside {what}'s directory {} (choose an output outside it)",
                    output.display(),
                    input.display()
                )));
            }
        }
    }
    Ok(())
}

/// A safetensors file, validated on open (a truncated or corrupt file is an error). The header is read
/// through a memory map; tensors are read with positioned reads into their own buffers, so that loading a
/// large checkpoint tensor by tensor (quantizing each as it comes) does not keep the whole file's pages
/// mapped into the process (they would count in its resident memory).
pub struct SafetensorsFile {
    path: PathBuf,
    file: std::fs::File,
    header_len: usize,
    metadata: safetensors::tensor::Metadata,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .finish()
    }
}

impl SafetensorsFile {
    /// Opens and validates `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|e| PeftError::io(&path, e))?;
        // SAFETY: the file is opened read-only; like every mmap user we assume nobody truncates it meanwhile.
        let mmap = unsafe { memmap2::MmapOptions::new().map(&file) }
            .map_err(|e| PeftError::io(&path, e))?;
        let (n, metadata) =
            safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| PeftError::SafeTensors {
                path: path.clone(),
                message: e.to_string(),
            })?;
        drop(mmap);
        Ok(Self {
            path,
            file,
            header_len: 8 + n,
            metadata,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in the order of their data in the file.
    pub fn names(&self) -> Vec<String> {
        self.metadata.offset_keys()
    }

    /// The `__metadata__` map.
    pub fn metadata(&self) -> Option<&HashMap<String, String>> {
        self.metadata.metadata().as_ref()
    }

    /// Whether the file holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.metadata.info(name).is_some()
    }

    /// Shape and dtype of `name`.
    pub fn info(&self, name: &str) -> Option<(Vec<usize>, safetensors::Dtype)> {
        self.metadata.info(name).map(|i| (i.shape.clone(), i.dtype))
    }

    /// Loads one tensor. candle has no int8 dtype: an int8 tensor (bitsandbytes 8-bit weights) loads as u8
    /// holding the same bytes.
    pub fn load(&self, name: &str, device: &Device) -> Result<Tensor> {
        let info = self
            .metadata
            .info(name)
            .ok_or_else(|| PeftError::MissingKey(name.to_string()))?;
        let (s, e) = info.data_offsets;
        let bytes = self.read_bytes(self.header_len + s, e - s)?;
        let data = bytes.as_slice();
        if info.dtype == safetensors::Dtype::I8 {
            if data.len() != info.shape.iter().product::<usize>() {
                return Err(PeftError::SafeTensors {
                    path: self.path.clone(),
                    message: format!("{name}: {} bytes for shape {:?}", data.len(), info.shape),
                });
            }
            return Ok(Tensor::from_slice(data, info.shape.as_slice(), device)?);
        }
        let view = safetensors::tensor::TensorView::new(info.dtype, info.shape.clone(), data)
            .map_err(|e| PeftError::SafeTensors {
                path: self.path.clone(),
                message: format!("{name}: {e}"),
            })?;
        view.load(device).map_err(|e| PeftError::SafeTensors {
            path: self.path.clone(),
            message: format!("{name}: {e}"),
        })
    }

    /// `len` bytes at `offset` of the file (validated against its length on open).
    fn read_bytes(&self, offset: usize, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileExt;
            self.file
                .read_exact_at(&mut buf, offset as u64)
                .map_err(|e| PeftError::io(&self.path, e))?;
        }
        #[cfg(not(unix))]
        {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = &self.file;
            f.seek(SeekFrom::Start(offset as u64))
                .and_then(|_| f.read_exact(&mut buf))
                .map_err(|e| PeftError::io(&self.path, e))?;
        }
        Ok(buf)
    }

    /// Loads every tensor, in file order.
    pub fn load_all(&self, device: &Device) -> Result<IndexMap<String, Tensor>> {
        self.names()
            .into_iter()
            .map(|n| Ok((n.clone(), self.load(&n, device)?)))
            .collect()
    }
}

/// Reads every tensor of a safetensors file, in file order.
pub fn read_safetensors(
    path: impl AsRef<Path>,
    device: &Device,
) -> Result<IndexMap<String, Tensor>> {
    SafetensorsFile::open(path)?.load_all(device)
}

/// PEFT's safetensors metadata.
pub fn pt_metadata() -> HashMap<String, String> {
    HashMap::from([("format".to_string(), "pt".to_string())])
}

/// Writes tensors to a safetensors file atomically, with `{"format": "pt"}` metadata as PEFT writes.
pub fn write_safetensors(path: impl AsRef<Path>, tensors: &[(String, Tensor)]) -> Result<()> {
    let path = path.as_ref();
    let mut data = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        data.push((k.clone(), t.contiguous()?));
    }
    let bytes = safetensors::serialize(
        data.iter().map(|(k, t)| (k.as_str(), t)),
        Some(pt_metadata()),
    )
    .map_err(|e| PeftError::SafeTensors {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    atomic_write(path, &bytes)
}

/// Where an adapter named `name` lives under a save directory: `default` at the root, others in sub-dirs.
pub fn adapter_subdir(root: &Path, name: &str) -> PathBuf {
    if name == "default" {
        root.to_path_buf()
    } else {
        root.join(name)
    }
}

/// An adapter directory as read from disk: its config and its tensors keyed as in the file.
#[derive(Debug, Clone)]
pub struct AdapterFile {
    /// `adapter_config.json`.
    pub config: PeftConfig,
    /// `adapter_model.safetensors`, keys as on disk, file order.
    pub tensors: IndexMap<String, Tensor>,
}

/// Reads an adapter directory (config validated: a flag we do not implement is an error).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use peft::io::{load_adapter, save_adapter};
/// use peft::PeftConfig;
///
/// let dir = std::env::temp_dir().join(format!("peft-load-doc-{}", std::process::id()));
/// let config = PeftConfig::from_json_str(r#"{"peft_type": "IA3", "target_modules": ["fc"], "feedforward_modules": []}"#)?;
/// let l = Tensor::ones(6, DType::F32, &Device::Cpu)?;
/// save_adapter(&dir, &config, &[("base_model.model.fc.ia3_l".to_string(), l)])?;
///
/// let file = load_adapter(&dir, &Device::Cpu)?;
/// assert_eq!(file.config.peft_type().as_str(), "IA3");
/// assert_eq!(file.tensors["base_model.model.fc.ia3_l"].dims(), [6]);
/// assert!(matches!(load_adapter(dir.join("missing"), &Device::Cpu), Err(peft::PeftError::Io { .. })));
/// # std::fs::remove_dir_all(&dir).ok();
/// # Ok::<(), peft::PeftError>(())
/// ```
pub fn load_adapter(dir: impl AsRef<Path>, device: &Device) -> Result<AdapterFile> {
    let dir = dir.as_ref();
    let config = PeftConfig::from_dir(dir)?;
    config.validate()?;
    let weights = dir.join(WEIGHTS_NAME);
    if !weights.exists() {
        if dir.join("adapter_model.bin").exists() {
            return Err(PeftError::Invalid(format!(
                "{}: only adapter_model.safetensors is supported (found a pickled adapter_model.bin)",
                dir.display()
            )));
        }
        return Err(PeftError::io(
            &weights,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no adapter weights"),
        ));
    }
    let tensors = read_safetensors(&weights, device)?;
    check_adapter_tensors(&weights, &tensors, AdapterChecks::default())?;
    Ok(AdapterFile { config, tensors })
}

/// Writes an adapter directory: config (sorted keys, `inference_mode: true`) and weights with PEFT's keys.
///
/// The directory is written atomically ([`atomic_dir`]): a process killed at any moment leaves the previous
/// adapter (config and weights that belong together) or the complete new one. Other entries of an existing
/// directory (other adapters' sub-directories, a README) are kept, as PEFT's `save_pretrained` keeps them.
pub fn save_adapter(
    dir: impl AsRef<Path>,
    config: &PeftConfig,
    tensors: &[(String, Tensor)],
) -> Result<()> {
    atomic_dir(dir.as_ref(), ExistingEntries::Keep, |tmp| {
        write_safetensors(tmp.join(WEIGHTS_NAME), tensors)?;
        config.save(tmp)
    })
}

/// An adapter's tensors split into per-module adapter parameters and replaced model tensors.
#[derive(Debug, Clone, Default)]
pub struct SplitKeys {
    /// Adapter parameters by module dotted name, then by parameter key (`lora_A.weight`).
    pub modules: IndexMap<String, IndexMap<String, Tensor>>,
    /// Model tensors the adapter replaces, by their plain name in the base model (`fc1.bias`,
    /// `model.embed_tokens.weight`, `lm_head.weight`): `.base_layer` is removed.
    pub overrides: IndexMap<String, Tensor>,
    /// Tensors outside `base_model.model.` (model-level shared tensors such as `base_model.vera_A`, or
    /// prompt-learning `prompt_embeddings`), by their key.
    pub shared: IndexMap<String, Tensor>,
}

/// Splits adapter file keys. `param_prefixes` are the method's parameter names (`lora_A`, `ia3_l`, …): the
/// first dotted component of a key that is one of them starts the parameter key.
pub fn split_keys(
    tensors: &IndexMap<String, Tensor>,
    param_prefixes: &[&str],
) -> Result<SplitKeys> {
    let mut out = SplitKeys::default();
    for (key, t) in tensors {
        let Some(rest) = key.strip_prefix(MODEL_PREFIX) else {
            out.shared.insert(key.clone(), t.clone());
            continue;
        };
        let parts: Vec<&str> = rest.split('.').collect();
        match parts.iter().position(|p| param_prefixes.contains(p)) {
            Some(0) => {
                return Err(PeftError::Invalid(format!(
                    "adapter key {key:?} names no module"
                )));
            }
            Some(i) => {
                let module = parts[..i].join(".");
                let param = parts[i..].join(".");
                let entry = out.modules.entry(module).or_default();
                if entry.insert(param, t.clone()).is_some() {
                    return Err(PeftError::Invalid(format!("duplicate adapter key {key:?}")));
                }
            }
            None => {
                let plain: Vec<&str> = parts.into_iter().filter(|p| *p != "base_layer").collect();
                out.overrides.insert(plain.join("."), t.clone());
            }
        }
    }
    Ok(out)
}

/// The key PEFT writes for an adapter parameter of a module.
pub fn peft_key(module: &str, param: &str) -> String {
    format!("{MODEL_PREFIX}{module}.{param}")
}

/// What PEFT saves for `adapter` from a set of adapter slots: each slot's adapter parameters under
/// `base_model.model.<module>.<key>` in the dtype the adapter was created or loaded in, `modules_to_save`
/// copies under the plain module name, with `bias = "lora_only"` / `"all"` the targeted layers' biases as
/// `<module>.base_layer.bias`, and for the modules `save_embedding_base` selects (PEFT's
/// `save_embedding_layers`) the base matrix as `<module>.base_layer.weight`.
///
/// For AdaLoRA, a `rank_pattern` in `config` truncates tensors still at `init_r` to the kept rows.
///
/// Biases of modules that are not adapter slots (`bias = "all"` saves every bias of the model) are the
/// model's business: a model adds them.
pub fn adapter_state_dict<'a>(
    slots: impl IntoIterator<Item = &'a crate::AdapterSlot>,
    adapter: &str,
    config: &PeftConfig,
    save_embedding_base: &dyn Fn(&str) -> bool,
) -> Result<Vec<(String, Tensor)>> {
    let bias_mode = config.method().bias();
    let mut out = Vec::new();
    for slot in slots {
        let Some(a) = slot.adapter(adapter) else {
            continue;
        };
        let m = slot.name();
        let dtype = a.saved_dtype();
        if a.peft_type() == crate::layer::modules_to_save::MODULES_TO_SAVE {
            for (k, t) in a.tensors() {
                out.push((format!("{MODEL_PREFIX}{m}.{k}"), t.to_dtype(dtype)?));
            }
            continue;
        }
        for (k, t) in config.method().saved_tensors(m, a.tensors())? {
            // integer tensors (VB-LoRA's top-k indices) keep their own dtype
            let t = if t.dtype().is_float() {
                t.to_dtype(dtype)?
            } else {
                t
            };
            out.push((peft_key(m, &k), t));
        }
        if let (true, Some(b)) = (
            bias_mode != crate::config::LoraBias::None,
            slot.base().bias(),
        ) {
            out.push((peft_key(m, "base_layer.bias"), b.clone()));
        }
        if save_embedding_base(m) {
            out.push((peft_key(m, "base_layer.weight"), slot.base().weight()?));
        }
    }
    Ok(out)
}

/// One adapter to save: its name, config and state dict (see [`adapter_state_dict`]).
pub type AdapterToSave<'a> = (&'a str, &'a PeftConfig, Vec<(String, Tensor)>);

/// Writes several adapters the way PEFT's `save_pretrained` lays them out: `default` at `root`, every other
/// adapter in `root/<name>/`.
pub fn save_adapters(root: impl AsRef<Path>, adapters: &[AdapterToSave<'_>]) -> Result<()> {
    for (name, config, tensors) in adapters {
        save_adapter(adapter_subdir(root.as_ref(), name), config, tensors)?;
    }
    Ok(())
}

/// Converts a tensor to the dtype it is saved in (adapters compute in f32 but keep their file dtype).
pub fn to_saved_dtype(t: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(t.to_dtype(dtype)?)
}

/// How the base model stores a module's weight when its own tensor is absent (tied embeddings: the output
/// layer reads the input embedding).
pub type Aliases = HashMap<String, String>;

/// The weight files of a base model: one file, a directory with `model.safetensors`, or a sharded directory
/// with `model.safetensors.index.json`.
#[derive(Debug)]
pub struct BaseModel {
    /// The directory (None for a single file).
    pub dir: Option<PathBuf>,
    /// The shards, in index order, with their file names.
    pub shards: Vec<(String, SafetensorsFile)>,
    /// The parsed index, if sharded.
    pub index: Option<serde_json::Value>,
    /// `config.json`, if present.
    pub config: Option<serde_json::Value>,
}

impl BaseModel {
    /// Opens a base model file or directory.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_file() {
            return Ok(Self {
                dir: None,
                shards: vec![(file_name(path), SafetensorsFile::open(path)?)],
                index: None,
                config: None,
            });
        }
        if !path.is_dir() {
            return Err(PeftError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
        let config = read_json_opt(&path.join("config.json"))?;
        let index_path = path.join("model.safetensors.index.json");
        if index_path.exists() {
            let index = read_json_opt(&index_path)?.unwrap_or_default();
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| PeftError::Json {
                    context: index_path.display().to_string(),
                    message: "no weight_map".into(),
                })?;
            let mut files: Vec<String> = Vec::new();
            for v in map.values() {
                let f = v.as_str().ok_or_else(|| PeftError::Json {
                    context: index_path.display().to_string(),
                    message: "weight_map values must be file names".into(),
                })?;
                if !files.iter().any(|x| x == f) {
                    files.push(f.to_string());
                }
            }
            files.sort();
            let shards = files
                .into_iter()
                .map(|f| Ok((f.clone(), SafetensorsFile::open(path.join(&f))?)))
                .collect::<Result<_>>()?;
            return Ok(Self {
                dir: Some(path.to_path_buf()),
                shards,
                index: Some(index),
                config,
            });
        }
        let single = path.join("model.safetensors");
        if !single.exists() {
            return Err(PeftError::Invalid(format!(
                "{}: no model.safetensors or model.safetensors.index.json in this directory",
                path.display()
            )));
        }
        Ok(Self {
            dir: Some(path.to_path_buf()),
            shards: vec![("model.safetensors".into(), SafetensorsFile::open(&single)?)],
            index: None,
            config,
        })
    }

    /// The shape of a tensor in any shard; for a bitsandbytes 4-bit weight, the unpacked shape its quant state
    /// records.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        self.shards.iter().find_map(|(_, f)| {
            let (shape, _) = f.info(name)?;
            for t in ["nf4", "fp4"] {
                let key = format!("{name}.quant_state.bitsandbytes__{t}");
                if f.contains(&key) {
                    let bytes = f.load(&key, &Device::Cpu).ok()?.to_vec1::<u8>().ok()?;
                    return crate::quant::bnb4::quant_state_shape(&bytes);
                }
            }
            Some(shape)
        })
    }

    /// Whether any weight is stored quantized (bitsandbytes 4-bit or 8-bit).
    pub fn is_quantized(&self) -> bool {
        self.shards.iter().any(|(_, f)| {
            f.names()
                .iter()
                .any(|n| n.contains(".quant_state.bitsandbytes__") || n.ends_with(".SCB"))
        })
    }

    /// Tied-embedding aliases: when the output layer's weight is absent and the config ties it (or says
    /// nothing), `lm_head.weight` reads `model.embed_tokens.weight` (any `*embed_tokens.weight` / `wte`).
    pub fn aliases(&self) -> Aliases {
        let mut a = Aliases::new();
        let tied = self
            .config
            .as_ref()
            .and_then(|c| c.get("tie_word_embeddings"))
            .and_then(|v| v.as_bool())
            .unwrap_or(true);
        if tied && self.shape("lm_head.weight").is_none() {
            for cand in [
                "model.embed_tokens.weight",
                "transformer.wte.weight",
                "embed_tokens.weight",
            ] {
                if self.shape(cand).is_some() {
                    a.insert("lm_head.weight".into(), cand.into());
                    break;
                }
            }
        }
        a
    }
}

/// The file name of `p` as a string (empty for none).
pub(crate) fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn read_json_opt(p: &Path) -> Result<Option<serde_json::Value>> {
    if !p.exists() {
        return Ok(None);
    }
    let s = std::fs::read_to_string(p).map_err(|e| PeftError::io(p, e))?;
    serde_json::from_str(&s)
        .map(Some)
        .map_err(|e| PeftError::Json {
            context: p.display().to_string(),
            message: e.to_string(),
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn split_keys_separates_params_overrides_and_shared() {
        let d = Device::Cpu;
        let t = Tensor::zeros(1, DType::F32, &d).unwrap();
        let mut m = IndexMap::new();
        for k in [
            "base_model.model.fc1.lora_A.weight",
            "base_model.model.fc1.lora_B.weight",
            "base_model.model.fc1.base_layer.bias",
            "base_model.model.norm.bias",
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "base_model.model.model.embed_tokens.base_layer.weight",
            "base_model.vera_A",
        ] {
            m.insert(k.to_string(), t.clone());
        }
        let s = split_keys(
            &m,
            &["lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"],
        )
        .unwrap();
        assert_eq!(
            s.modules.keys().collect::<Vec<_>>(),
            ["fc1", "model.embed_tokens"]
        );
        assert_eq!(
            s.modules["fc1"].keys().collect::<Vec<_>>(),
            ["lora_A.weight", "lora_B.weight"]
        );
        assert_eq!(
            s.overrides.keys().collect::<Vec<_>>(),
            ["fc1.bias", "norm.bias", "model.embed_tokens.weight"]
        );
        assert_eq!(s.shared.keys().collect::<Vec<_>>(), ["base_model.vera_A"]);
    }

    #[test]
    fn truncated_and_garbage_safetensors_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let t = Tensor::arange(0f32, 64f32, &Device::Cpu).unwrap();
        write_safetensors(&p, &[("x".into(), t)]).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        for cut in [3, 20, bytes.len() - 10] {
            let q = dir.path().join(format!("cut{cut}.safetensors"));
            std::fs::write(&q, &bytes[..cut]).unwrap();
            let e = read_safetensors(&q, &Device::Cpu).unwrap_err();
            assert!(matches!(e, PeftError::SafeTensors { .. }), "{e}");
        }
        let q = dir.path().join("garbage.safetensors");
        std::fs::write(&q, b"\xff\xff\xff\xff\xff\xff\xff\x7fnot json").unwrap();
        assert!(matches!(
            read_safetensors(&q, &Device::Cpu).unwrap_err(),
            PeftError::SafeTensors { .. }
        ));
        // the atomic writer leaves no temporary file behind
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(names.iter().all(|n| !n.to_string_lossy().contains(".tmp")));
        let f = SafetensorsFile::open(&p).unwrap();
        assert_eq!(f.metadata().unwrap()["format"], "pt");
    }

    /// The id of a process that has exited (reaped), so no process has it now.
    pub(crate) fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    /// The entries of `dir`, sorted.
    pub(crate) fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn temp_names_parse_only_our_pattern() {
        let p = |s: &str| parse_temp_name(s).map(|(n, k, pid)| (n.to_string(), k, pid));
        assert_eq!(
            p(".model.safetensors.tmp-12"),
            Some(("model.safetensors".into(), TempKind::Tmp, 12))
        );
        assert_eq!(p(".last.old-7"), Some(("last".into(), TempKind::Old, 7)));
        assert_eq!(
            p(".out.gguf-base-99"),
            Some(("out".into(), TempKind::GgufBase, 99))
        );
        for other in [
            "model.safetensors.tmp-12", // no leading dot
            ".tmp-12",                  // no name
            "..tmp-12",
            ".a.tmp-",
            ".a.tmp-12x",
            ".a.tmp12",
            ".a.bak-12",
            ".gitignore",
            ".a.tmp--1",
        ] {
            assert_eq!(p(other), None, "{other}");
        }
        let t = temp_path(Path::new("d/x.json"), TempKind::Tmp).unwrap();
        assert_eq!(
            t,
            Path::new(&format!("d/.x.json.tmp-{}", std::process::id()))
        );
        assert_eq!(
            parse_temp_name(&t.file_name().unwrap().to_string_lossy()).map(|(n, _, _)| n),
            Some("x.json")
        );
    }

    /// Temporaries of dead processes go (files, directories, symlinks; a moved-aside `.NAME.old-PID` whose
    /// `NAME` is missing is renamed back); those of this process, of a live process that started before them,
    /// and every other file stay. A temporary whose live process started after it (a reused id) goes.
    #[test]
    fn stale_temps_of_dead_processes_are_removed_and_nothing_else() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let dead = dead_pid();
        let me = std::process::id();
        std::fs::write(d.join(format!(".w.safetensors.tmp-{dead}")), b"half").unwrap();
        std::fs::create_dir(d.join(format!(".out.tmp-{dead}"))).unwrap();
        std::fs::write(d.join(format!(".out.tmp-{dead}/shard")), [0u8; 100]).unwrap();
        make_symlink(Path::new("nowhere"), &d.join(format!(".last.tmp-{dead}"))).unwrap();
        std::fs::create_dir(d.join(format!(".prev.old-{dead}"))).unwrap();
        std::fs::write(d.join(format!(".prev.old-{dead}/f")), b"old").unwrap();
        // Kept: ours (another thread may be writing it), a live process older than the file, other names.
        let kept = [
            format!(".w.safetensors.tmp-{me}"),
            ".w.safetensors.tmp-1".to_string(),
            "w.safetensors".to_string(),
            format!("w.safetensors.tmp-{dead}"),
            format!(".w.bak-{dead}"),
            ".hidden".to_string(),
        ];
        for k in &kept {
            std::fs::write(d.join(k), b"keep").unwrap();
        }
        // Process 1 is alive and started long after 1970: this file cannot be its.
        let reused = d.join(".z.tmp-1");
        let f = std::fs::File::create(&reused).unwrap();
        f.set_modified(std::time::UNIX_EPOCH + std::time::Duration::from_secs(1000))
            .unwrap();
        drop(f);

        // By name: only `w.safetensors`'s temporaries.
        let r = remove_stale_temps_beside(&d.join("w.safetensors")).unwrap();
        assert_eq!(
            r.iter().map(|t| t.path.clone()).collect::<Vec<_>>(),
            [d.join(format!(".w.safetensors.tmp-{dead}"))]
        );
        assert_eq!(
            (r[0].pid, r[0].bytes, r[0].restored_to.clone()),
            (dead, 4, None)
        );
        assert!(d.join(format!(".out.tmp-{dead}")).exists());

        let mut r = remove_stale_temps_in(d, None).unwrap();
        r.sort_by(|a, b| a.path.cmp(&b.path));
        let got: Vec<(String, u64, bool)> = r
            .iter()
            .map(|t| {
                (
                    t.path.file_name().unwrap().to_string_lossy().into_owned(),
                    t.bytes,
                    t.restored_to.is_some(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (format!(".last.tmp-{dead}"), 7, false),
                (format!(".out.tmp-{dead}"), 100, false),
                (format!(".prev.old-{dead}"), 3, true),
                (".z.tmp-1".to_string(), 0, false),
            ]
        );
        assert_eq!(std::fs::read(d.join("prev/f")).unwrap(), b"old");
        let mut want: Vec<String> = kept.to_vec();
        want.push("prev".into());
        want.sort();
        assert_eq!(names(d), want);
        assert!(
            r[3].to_string().contains("removed stale temporary"),
            "{}",
            r[3]
        );
        // Nothing left to do; a missing directory has nothing to remove.
        assert!(remove_stale_temps_in(d, None).unwrap().is_empty());
        assert!(remove_stale_temps(&d.join("missing/x")).unwrap().is_empty());
    }

    /// A failing `fill` leaves the previous directory as it was (config and weights together) and no
    /// temporary; a successful one replaces it whole (`Drop`) or keeps the entries it did not write (`Keep`,
    /// as `save_adapter` does: a README, another adapter's sub-directory). A stale temporary directory of a
    /// dead process is removed by the next write.
    #[test]
    fn atomic_dir_is_all_or_nothing_and_cleans_killed_runs() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ad");
        std::fs::create_dir_all(dir.join("other")).unwrap();
        std::fs::write(dir.join("a.json"), "old a").unwrap();
        std::fs::write(dir.join("b.bin"), "old b").unwrap();
        std::fs::write(dir.join("README.md"), "mine").unwrap();
        std::fs::write(dir.join("other/x"), "sub").unwrap();
        let stale = tmp.path().join(format!(".ad.tmp-{}", dead_pid()));
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("b.bin"), "half").unwrap();

        let e = atomic_dir(&dir, ExistingEntries::Keep, |t| {
            std::fs::write(t.join("b.bin"), "new b").unwrap();
            Err(PeftError::Invalid("killed here".into()))
        })
        .unwrap_err();
        assert!(e.to_string().contains("killed here"));
        assert_eq!(std::fs::read_to_string(dir.join("b.bin")).unwrap(), "old b");
        assert_eq!(
            std::fs::read_to_string(dir.join("a.json")).unwrap(),
            "old a"
        );
        assert_eq!(
            names(tmp.path()),
            ["ad"],
            "the stale and the failed temporaries are gone"
        );

        atomic_dir(&dir, ExistingEntries::Keep, |t| {
            std::fs::write(t.join("a.json"), "new a").map_err(|e| PeftError::io(t, e))?;
            std::fs::write(t.join("b.bin"), "new b").map_err(|e| PeftError::io(t, e))
        })
        .unwrap();
        assert_eq!(names(&dir), ["README.md", "a.json", "b.bin", "other"]);
        assert_eq!(
            std::fs::read_to_string(dir.join("a.json")).unwrap(),
            "new a"
        );
        assert_eq!(std::fs::read_to_string(dir.join("other/x")).unwrap(), "sub");
        assert_eq!(names(tmp.path()), ["ad"]);

        atomic_dir(&dir, ExistingEntries::Drop, |t| {
            std::fs::write(t.join("only"), "x").map_err(|e| PeftError::io(t, e))
        })
        .unwrap();
        assert_eq!(names(&dir), ["only"]);
        assert_eq!(names(tmp.path()), ["ad"]);
    }

    /// Every spelling of an input is caught: itself through `..` and a symlink, a hard link to it, a directory
    /// holding it (existing or not yet, below a symlinked directory), a path inside an input directory. A
    /// data file that merely sits in the output directory is no alias: files are compared, not directories.
    #[test]
    fn ensure_no_alias_compares_resolved_files() {
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        std::fs::create_dir_all(t.join("base")).unwrap();
        std::fs::write(t.join("base/model.safetensors"), b"w").unwrap();
        std::fs::write(t.join("data.txt"), b"d").unwrap();
        make_symlink(&t.join("base"), &t.join("link")).unwrap();
        std::fs::hard_link(t.join("data.txt"), t.join("hard.txt")).unwrap();
        let base = t.join("base/model.safetensors");
        let data = t.join("data.txt");
        let inputs = [
            ("the base model", base.as_path()),
            ("--data", data.as_path()),
        ];
        let refuse = |out: PathBuf, says: &str| {
            let e = ensure_no_alias(&inputs, &[&out]).unwrap_err().to_string();
            assert!(e.contains(says), "{}: {e}", out.display());
            assert!(e.contains(&out.display().to_string()), "{e}");
        };
        refuse(
            t.join("base/../base/model.safetensors"),
            "would overwrite the base model",
        );
        refuse(
            t.join("link/model.safetensors"),
            "would overwrite the base model",
        );
        refuse(t.join("link"), "would overwrite the base model");
        refuse(t.join("hard.txt"), "would overwrite --data");
        refuse(t.join("./data.txt"), "would overwrite --data");
        let dir_input = [("the adapter", t.join("base"))];
        let dir_input: Vec<NamedInput<'_>> =
            dir_input.iter().map(|(w, p)| (*w, p.as_path())).collect();
        let e = ensure_no_alias(&dir_input, &[&t.join("link/new/merged")]).unwrap_err();
        assert!(
            e.to_string().contains("inside the adapter's directory"),
            "{e}"
        );
        // Fine: a new sibling, a new directory, a path that shares a prefix but not a component.
        for ok in [
            t.join("merged.safetensors"),
            t.join("run"),
            t.join("base2"),
            t.join("data.txt.out"),
        ] {
            ensure_no_alias(&inputs, &[&ok]).unwrap();
        }
        // `run/train.txt` is read, `run/adapter` and `run/metrics.jsonl` are written: no alias.
        std::fs::create_dir(t.join("run")).unwrap();
        std::fs::write(t.join("run/train.txt"), b"x").unwrap();
        let train = t.join("run/train.txt");
        ensure_no_alias(
            &[("--data", train.as_path())],
            &[&t.join("run/adapter"), &t.join("run/metrics.jsonl")],
        )
        .unwrap();
        assert_eq!(
            resolve_path(&t.join("link/a/../b")),
            t.canonicalize().unwrap().join("base/b")
        );
    }
}
