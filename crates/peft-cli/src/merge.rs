//! `peft merge`: merges adapters into a base model and writes the merged weights.
//!
//! A thin layer over [`peft::merge::merge_model_with`]: it parses `DIR[@WEIGHT]` adapter arguments, loads each
//! adapter with [`peft::merge::MergeAdapter::load`], shows progress on stderr and prints a one-line summary.

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use clap::{Args, ValueEnum};
use indicatif::{HumanBytes, HumanDuration, ProgressBar, ProgressStyle};
use peft::merge::{MergeAdapter, MergeOptions, MergeReport, merge_model_with};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

/// Above this many bytes of weights, progress is reported even when stderr is not a terminal.
pub const LARGE_MERGE_BYTES: u64 = 64 << 20;

/// Arguments of `peft merge`.
#[derive(Debug, Clone, Args)]
pub struct MergeArgs {
    /// The base model: a `.safetensors` file, or a model directory (`model.safetensors` or a sharded
    /// `model.safetensors.index.json`; its config and tokenizer files are copied to the output), or a
    /// llama `.gguf` file (dequantized to f32, the output an HF directory; or, with an output ending in `.gguf`,
    /// merged into a GGUF file of the same tensor types: the merged tensors re-quantized, the rest copied).
    #[arg(long, short = 'b', value_name = "MODEL")]
    pub base: PathBuf,
    /// An adapter directory (holding `adapter_config.json` and `adapter_model.safetensors`), optionally with
    /// a merge weight for additive LoRA: `DIR@0.5`. Repeat to merge several; they apply in the order given.
    #[arg(
        long = "adapter",
        short = 'a',
        value_name = "DIR[@WEIGHT]",
        required = true
    )]
    pub adapters: Vec<AdapterSpec>,
    /// Where to write: a `.safetensors` file for a file base (an existing directory gets `model.safetensors`
    /// inside), a new directory for a directory base.
    #[arg(long, short = 'o', value_name = "PATH")]
    pub output: PathBuf,
    /// Store floating-point tensors in this dtype (default: keep each tensor's dtype). Merging always
    /// computes in f32 and rounds once.
    #[arg(long, value_enum, value_name = "DTYPE")]
    pub dtype: Option<DTypeArg>,
    /// For a bitsandbytes 4-bit or 8-bit base: re-quantize each merged weight to the base's own format and
    /// write a quantized checkpoint (its `quantization_config` kept) instead of dense weights. Lossy: a
    /// warning gives the measured error. GPTQ, AWQ, GGUF and full-precision bases are refused.
    #[arg(long)]
    pub requantize: bool,
    /// Never show progress on stderr.
    #[arg(long, short = 'q')]
    pub quiet: bool,
}

/// The dtypes `--dtype` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    /// 32-bit float.
    F32,
    /// 16-bit float.
    F16,
    /// bfloat16.
    Bf16,
}

impl DTypeArg {
    /// The flag's spelling: `f32`, `f16`, `bf16`.
    pub fn flag(self) -> &'static str {
        match self {
            DTypeArg::F32 => "f32",
            DTypeArg::F16 => "f16",
            DTypeArg::Bf16 => "bf16",
        }
    }
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> Self {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

/// One `--adapter` argument: a directory and an optional merge weight.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSpec {
    /// The adapter directory.
    pub dir: PathBuf,
    /// The weight after `@`, if any.
    pub weight: Option<f64>,
}

impl FromStr for AdapterSpec {
    type Err = String;

    /// Parses `DIR` or `DIR@WEIGHT`. A directory name may itself contain `@`: the string is split at its
    /// last `@` only when what follows parses as a number; and when the whole string names an existing
    /// directory while the part before the `@` does not, the whole string is the directory.
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("empty adapter directory".into());
        }
        let whole = || {
            Ok(Self {
                dir: PathBuf::from(s),
                weight: None,
            })
        };
        let Some((dir, w)) = s.rsplit_once('@') else {
            return whole();
        };
        let Ok(weight) = w.parse::<f64>() else {
            return whole();
        };
        if Path::new(s).is_dir() && !Path::new(dir).is_dir() {
            return whole();
        }
        if !weight.is_finite() {
            return Err(format!(
                "{s:?}: the merge weight must be a finite number, got {w}"
            ));
        }
        if dir.is_empty() {
            return Err(format!("{s:?}: no adapter directory before '@'"));
        }
        Ok(Self {
            dir: PathBuf::from(dir),
            weight: Some(weight),
        })
    }
}

/// Reports merge progress on stderr: an indicatif bar on a terminal, a line every 10 % for a large merge
/// whose stderr is a file or pipe, nothing otherwise.
struct Progress {
    quiet: bool,
    mode: Option<Mode>,
}

enum Mode {
    Bar(ProgressBar),
    Lines { start: Instant, next_percent: u64 },
    Silent,
}

impl Progress {
    fn new(quiet: bool) -> Self {
        Self { quiet, mode: None }
    }

    fn update(&mut self, done: u64, total: u64, tensor: &str) {
        let quiet = self.quiet;
        let mode = self.mode.get_or_insert_with(|| {
            let terminal = std::io::stderr().is_terminal();
            if quiet || total == 0 {
                Mode::Silent
            } else if terminal {
                let bar = ProgressBar::new(total);
                let style = ProgressStyle::with_template(
                    "merging [{elapsed_precise}] {bar:30} {bytes}/{total_bytes} ({bytes_per_sec}, ETA {eta}) {wide_msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar());
                bar.set_style(style);
                bar.enable_steady_tick(Duration::from_millis(200));
                Mode::Bar(bar)
            } else if total > LARGE_MERGE_BYTES {
                Mode::Lines { start: Instant::now(), next_percent: 10 }
            } else {
                Mode::Silent
            }
        });
        match mode {
            Mode::Bar(bar) => {
                bar.set_position(done);
                bar.set_message(tensor.to_string());
            }
            Mode::Lines {
                start,
                next_percent,
            } => {
                let percent = done.saturating_mul(100) / total.max(1);
                if percent >= *next_percent {
                    let elapsed = start.elapsed();
                    let eta = if done > 0 {
                        elapsed.mul_f64(total.saturating_sub(done) as f64 / done as f64)
                    } else {
                        Duration::ZERO
                    };
                    eprintln!(
                        "merging: {percent:>3}% ({} / {}), ETA {}",
                        HumanBytes(done),
                        HumanBytes(total),
                        HumanDuration(eta)
                    );
                    *next_percent = (percent / 10 + 1) * 10;
                }
            }
            Mode::Silent => {}
        }
    }

    fn finish(&mut self) {
        if let Some(Mode::Bar(bar)) = &self.mode {
            bar.finish_and_clear();
        }
    }
}

/// Checks the paths before any work, with messages that say what to pass instead.
fn check_paths(args: &MergeArgs) -> anyhow::Result<()> {
    if !args.base.exists() {
        bail!("base model {} does not exist", args.base.display());
    }
    for a in &args.adapters {
        if !a.dir.exists() {
            bail!("adapter directory {} does not exist", a.dir.display());
        }
        if !a.dir.is_dir() {
            bail!(
                "adapter {} is not a directory: pass the directory holding adapter_config.json and \
                 adapter_model.safetensors",
                a.dir.display()
            );
        }
    }
    if args.base.is_file() {
        let parent = args.output.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(parent) = parent.filter(|p| !p.is_dir()) {
            bail!(
                "cannot write {}: directory {} does not exist",
                args.output.display(),
                parent.display()
            );
        }
    }
    // The output must not alias an input: not the base file itself, not a directory the merged files would be
    // written into that holds the base (a directory output writes `model.safetensors` there), not a path inside
    // the base model's own directory or an adapter's. Resolved paths, so `./x` and symlinks compare as what
    // they are.
    let mut inputs = vec![("the base model", args.base.as_path())];
    inputs.extend(
        args.adapters
            .iter()
            .map(|a| ("the adapter", a.dir.as_path())),
    );
    peft::io::ensure_no_alias(&inputs, &[&args.output])?;
    Ok(())
}

/// Prints every stale temporary that a writer removes (a killed run's leftovers) on stderr, one line each
/// ([`peft::io::set_stale_temp_reporter`]). Every command that writes files calls it first.
pub fn report_stale_temps() {
    peft::io::set_stale_temp_reporter(Some(|t| eprintln!("note: {t}")));
}

/// Runs `peft merge`: merges, then writes a one-line summary to `out`. Returns the library's report.
pub fn run(args: &MergeArgs, out: &mut dyn Write) -> anyhow::Result<MergeReport> {
    report_stale_temps();
    check_paths(args)?;
    peft::io::remove_stale_temps_beside(&args.output)?;
    let is_gguf = |p: &std::path::Path| p.extension().is_some_and(|e| e == "gguf");
    let gguf_to_gguf = is_gguf(&args.base) && is_gguf(&args.output);
    if args.requantize && is_gguf(&args.base) && !gguf_to_gguf {
        bail!(
            "--requantize: {} is a GGUF file; to merge into a GGUF of the same block types, give an output \
             ending in .gguf (without --requantize: re-quantizing is what a GGUF output means); otherwise \
             `peft merge` writes it as an f32 HF directory: drop --requantize",
            args.base.display()
        );
    }
    if gguf_to_gguf && args.dtype.is_some() {
        bail!(
            "--dtype: a GGUF output keeps every tensor's own ggml type; drop --dtype, or write an HF directory"
        );
    }
    let device = Device::Cpu;
    let mut adapters = Vec::with_capacity(args.adapters.len());
    for spec in &args.adapters {
        let adapter = MergeAdapter::load(&spec.dir, spec.weight, &device)
            .with_context(|| format!("cannot load adapter {}", spec.dir.display()))?;
        adapters.push(adapter);
    }
    let n_adapters = adapters.len();
    if gguf_to_gguf {
        return merge_into_gguf(args, adapters, out);
    }
    // A GGUF base is first written as an HF directory (dequantized f32, config, tokenizer) next to the
    // output, merged from there, and removed: the output is an HF directory.
    let gguf_dir = if args.base.extension().is_some_and(|e| e == "gguf") {
        let tmp = peft::io::temp_path(&args.output, peft::io::TempKind::GgufBase)?;
        let m = peft_models::gguf::load_gguf(&args.base, &device)
            .with_context(|| format!("cannot load the GGUF base {}", args.base.display()))?;
        peft_models::export::write_hf_dir(&tmp, &m.config, &m.tensors, Some(&m.tokenizer))
            .with_context(|| {
                format!(
                    "cannot write the GGUF base as an HF directory at {}",
                    tmp.display()
                )
            })?;
        Some(tmp)
    } else {
        None
    };
    let base = gguf_dir.clone().unwrap_or_else(|| args.base.clone());
    let mut progress = Progress::new(args.quiet);
    let opts = MergeOptions {
        dtype: args.dtype.map(DType::from),
        requantize: args.requantize,
        gptq_format: None,
    };
    let result = merge_model_with(
        &base,
        adapters,
        &args.output,
        &opts,
        &mut |done, total, name| progress.update(done, total, name),
    );
    progress.finish();
    if let Some(tmp) = &gguf_dir {
        let _ = std::fs::remove_dir_all(tmp);
    }
    let report = result.with_context(|| cannot_merge(args))?;
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    if let Some(w) = requantize_warning(&report) {
        eprintln!("warning: {w}");
    }
    writeln!(out, "{}", summary(&report, n_adapters))?;
    Ok(report)
}

/// The context of a failed merge.
fn cannot_merge(args: &MergeArgs) -> String {
    format!(
        "cannot merge into {} (writing {})",
        args.base.display(),
        args.output.display()
    )
}

/// GGUF base → GGUF output ([`peft_models::gguf_merge::merge_into_gguf`]): every merged tensor re-quantized to
/// its own ggml type, the rest copied byte for byte; a warning gives the measured loss per type.
fn merge_into_gguf(
    args: &MergeArgs,
    adapters: Vec<MergeAdapter>,
    out: &mut dyn Write,
) -> anyhow::Result<MergeReport> {
    let n_adapters = adapters.len();
    let mut progress = Progress::new(args.quiet);
    let result = peft_models::gguf_merge::merge_into_gguf(
        &args.base,
        adapters,
        &args.output,
        &mut |done, total, name| progress.update(done, total, name),
    );
    progress.finish();
    let g = result.with_context(|| cannot_merge(args))?;
    for w in &g.warnings {
        eprintln!("warning: {w}");
    }
    if g.requantized_blocks() {
        let per_type: Vec<String> = g
            .max_error_by_type()
            .iter()
            .map(|(t, n, e)| format!("{t:?}: {n} tensors, max |Δ| {e:.3e}"))
            .collect();
        eprintln!(
            "warning: the merged weights were re-quantized to their GGUF block types, which moves the model's \
             outputs (max |dequant(requant(W')) − W'| per type: {}); write an HF directory output for the \
             exact f32 merge",
            per_type.join("; ")
        );
    }
    let report = MergeReport {
        files: vec![g.output.clone()],
        modules: g.modules.clone(),
        bytes: g.bytes,
        warnings: g.warnings.clone(),
        requantized: g
            .tensors
            .iter()
            .map(|t| peft::merge::Requantized {
                name: t.gguf_name.clone(),
                format: format!("{:?}", t.ggml_dtype),
                max_error: t.max_error,
                max_abs: t.max_abs,
            })
            .collect(),
    };
    writeln!(out, "{}", summary(&report, n_adapters))?;
    Ok(report)
}

/// The warning `--requantize` prints: what was re-quantized, that it moves the outputs, and the largest
/// re-quantization error measured over the merged weights. `None` when nothing was re-quantized.
pub fn requantize_warning(report: &MergeReport) -> Option<String> {
    let worst = report
        .requantized
        .iter()
        .max_by(|a, b| a.max_error.total_cmp(&b.max_error))?;
    let mut formats: Vec<&str> = report
        .requantized
        .iter()
        .map(|r| r.format.as_str())
        .collect();
    formats.dedup();
    formats.sort();
    formats.dedup();
    Some(format!(
        "--requantize re-quantized {} merged weights ({}): this is lossy and moves the model's outputs away from \
         the unmerged adapter's, as PEFT's own re-quantizing bitsandbytes merge does (on the tiny test Llamas \
         with a strong LoRA it moves the logits by up to 3.1-4.9 at 4 bits, 0.16 at 8 bits); max |dequant(requant(W')) - W'| = {:.3e} in {} (max |W'| there {:.3e}); merge without \
         --requantize for exact dense weights",
        report.requantized.len(),
        formats.join(", "),
        worst.max_error,
        worst.name,
        worst.max_abs,
    ))
}

/// The one-line summary: modules merged, files written, size on disk.
fn summary(report: &MergeReport, n_adapters: usize) -> String {
    let size: u64 = report
        .files
        .iter()
        .filter_map(|f| std::fs::metadata(f).ok())
        .map(|m| m.len())
        .sum();
    let size = if size == 0 { report.bytes } else { size };
    let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    let where_ = match report.files.as_slice() {
        [one] => one.display().to_string(),
        files => {
            let dirs: Vec<_> = files.iter().filter_map(|f| f.parent()).collect();
            match dirs.first() {
                Some(d) if dirs.iter().all(|x| x == d) => format!("{}/", d.display()),
                _ => "the output".to_string(),
            }
        }
    };
    format!(
        "merged {} from {} into {where_}: {} written, {} ({size} bytes)",
        plural(report.modules.len(), "module"),
        plural(n_adapters, "adapter"),
        plural(report.files.len(), "file"),
        HumanBytes(size),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, Command};
    use candle_core::Tensor;
    use clap::Parser;
    use peft_test_support::assert_close;
    use std::collections::HashMap;

    const CASES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/lora/cases");

    fn case(name: &str) -> PathBuf {
        Path::new(CASES).join(name)
    }

    fn parse_merge(args: &[&str]) -> MergeArgs {
        let mut argv = vec!["peft", "merge"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Merge(m) => m,
            other => panic!("parsed as {other:?}"),
        }
    }

    fn load(path: &Path) -> HashMap<String, Tensor> {
        candle_core::safetensors::load(path, &Device::Cpu).unwrap()
    }

    fn run_quiet(args: &MergeArgs) -> anyhow::Result<(MergeReport, String)> {
        let mut out = Vec::new();
        let report = run(args, &mut out)?;
        Ok((report, String::from_utf8(out).unwrap()))
    }

    #[test]
    fn adapter_spec_parsing() {
        let p = |s: &str| s.parse::<AdapterSpec>();
        assert_eq!(
            p("ad").unwrap(),
            AdapterSpec {
                dir: "ad".into(),
                weight: None
            }
        );
        assert_eq!(
            p("ad@0.5").unwrap(),
            AdapterSpec {
                dir: "ad".into(),
                weight: Some(0.5)
            }
        );
        assert_eq!(
            p("runs/a@b/ad@-1.5e-1").unwrap(),
            AdapterSpec {
                dir: "runs/a@b/ad".into(),
                weight: Some(-0.15)
            }
        );
        // '@' not followed by a number belongs to the directory name
        assert_eq!(
            p("user@host/ad").unwrap(),
            AdapterSpec {
                dir: "user@host/ad".into(),
                weight: None
            }
        );
        assert_eq!(
            p("ad@v2").unwrap(),
            AdapterSpec {
                dir: "ad@v2".into(),
                weight: None
            }
        );
        assert_eq!(
            p("ad@").unwrap(),
            AdapterSpec {
                dir: "ad@".into(),
                weight: None
            }
        );
        assert_eq!(
            p("a@1@2").unwrap(),
            AdapterSpec {
                dir: "a@1".into(),
                weight: Some(2.0)
            }
        );
        assert_eq!(p("").unwrap_err(), "empty adapter directory");
        assert!(
            p("@0.5")
                .unwrap_err()
                .contains("no adapter directory before '@'")
        );
        assert!(p("ad@nan").unwrap_err().contains("finite"));
        assert!(p("ad@inf").unwrap_err().contains("finite number, got inf"));
        // an existing directory named `x@2` wins over `x` with weight 2
        let tmp = tempfile::tempdir().unwrap();
        let odd = tmp.path().join("ckpt@2");
        std::fs::create_dir(&odd).unwrap();
        let s = odd.to_str().unwrap();
        assert_eq!(
            p(s).unwrap(),
            AdapterSpec {
                dir: odd.clone(),
                weight: None
            }
        );
        assert_eq!(
            p(&format!("{s}@0.25")).unwrap(),
            AdapterSpec {
                dir: odd.clone(),
                weight: Some(0.25)
            }
        );
        // and through clap, repeatable and in order
        let m = parse_merge(&[
            "-b",
            "base.safetensors",
            "-a",
            "x@0.5",
            "--adapter",
            "y",
            "-o",
            "out",
            "--dtype",
            "bf16",
        ]);
        assert_eq!(
            m.adapters,
            [
                AdapterSpec {
                    dir: "x".into(),
                    weight: Some(0.5)
                },
                AdapterSpec {
                    dir: "y".into(),
                    weight: None
                }
            ]
        );
        assert_eq!(m.dtype, Some(DTypeArg::Bf16));
        assert!(!m.quiet);
    }

    #[test]
    fn merge_linear_basic_matches_peft() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged.safetensors");
        let c = case("linear_basic");
        let args = parse_merge(&[
            "--base",
            c.join("base.safetensors").to_str().unwrap(),
            "--adapter",
            c.join("adapter").to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]);
        let (report, summary) = run_quiet(&args).unwrap();
        assert_eq!(report.modules, ["lin0", "lin1"]);
        assert_eq!(report.files, std::slice::from_ref(&out));
        assert!(
            summary.starts_with("merged 2 modules from 1 adapter into "),
            "{summary}"
        );
        assert!(summary.contains("1 file written"), "{summary}");
        let got = load(&out);
        let want = load(&c.join("merged.safetensors"));
        assert_eq!(got.len(), want.len());
        for (k, w) in &want {
            assert_eq!(got[k].dtype(), w.dtype(), "{k}");
            assert_close(k, &got[k], w, 1e-5, 1e-4);
        }
    }

    #[test]
    fn weighted_merge_scales_the_delta() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("half.safetensors");
        let c = case("linear_basic");
        let spec = format!("{}@0.5", c.join("adapter").display());
        let args = parse_merge(&[
            "-b",
            c.join("base.safetensors").to_str().unwrap(),
            "-a",
            &spec,
            "-o",
            out.to_str().unwrap(),
            "-q",
        ]);
        assert_eq!(args.adapters[0].weight, Some(0.5));
        run_quiet(&args).unwrap();
        let (got, base, full) = (
            load(&out),
            load(&c.join("base.safetensors")),
            load(&c.join("merged.safetensors")),
        );
        for (k, b) in &base {
            // W + 0.5·ΔW = (W + (W + ΔW)) / 2
            let want = ((b + &full[k]).unwrap() * 0.5).unwrap();
            assert_close(k, &got[k], &want, 1e-5, 1e-4);
        }
    }

    #[test]
    fn merge_to_bf16() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("bf16.safetensors");
        let c = case("linear_basic");
        let args = parse_merge(&[
            "-b",
            c.join("base.safetensors").to_str().unwrap(),
            "-a",
            c.join("adapter").to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--dtype",
            "bf16",
        ]);
        run_quiet(&args).unwrap();
        let got = load(&out);
        let want = load(&c.join("merged.safetensors"));
        for (k, w) in &want {
            assert_eq!(got[k].dtype(), DType::BF16, "{k}");
            assert_close(k, &got[k], w, 1e-2, 1e-2);
        }
    }

    #[test]
    fn merge_llama_directory() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged_model");
        let c = case("llama_qv");
        let args = parse_merge(&[
            "--base",
            c.join("base_hf").to_str().unwrap(),
            "--adapter",
            c.join("adapter").to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
        ]);
        let (report, summary) = run_quiet(&args).unwrap();
        assert!(out.join("config.json").is_file());
        assert!(out.join("model.safetensors").is_file());
        assert!(report.files.contains(&out.join("model.safetensors")));
        assert!(report.files.contains(&out.join("config.json")));
        assert!(
            summary.contains(&format!("{}/", out.display())),
            "{summary}"
        );
        // no temporary directory left next to the output
        let left: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from("merged_model")]);
        // the merged weights agree with PEFT's merge_and_unload
        let got = load(&out.join("model.safetensors"));
        let want = load(&c.join("merged.safetensors"));
        let mut checked = 0;
        for (k, g) in &got {
            if let Some(w) = want.get(k) {
                assert_close(k, g, w, 1e-5, 1e-4);
                checked += 1;
            }
        }
        assert_eq!(checked, got.len());
        // the output directory now exists: a second merge refuses to overwrite it
        let e = run_quiet(&args).unwrap_err();
        assert!(
            format!("{e:#}").contains("merged_model: output directory already exists"),
            "{e:#}"
        );
    }

    #[test]
    fn bad_paths_are_errors_naming_the_path() {
        let tmp = tempfile::tempdir().unwrap();
        let c = case("linear_basic");
        let base = c.join("base.safetensors");
        let out = tmp.path().join("o.safetensors");
        let missing = tmp.path().join("no_such_adapter");
        let args = |adapter: &Path, base: &Path, out: &Path| {
            parse_merge(&[
                "-b",
                base.to_str().unwrap(),
                "-a",
                adapter.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
            ])
        };
        let report = |e: anyhow::Error| crate::error_report(&e);
        let e = report(run_quiet(&args(&missing, &base, &out)).unwrap_err());
        assert!(e.contains(missing.to_str().unwrap()), "{e}");
        // a directory without adapter_config.json
        let e = report(run_quiet(&args(tmp.path(), &base, &out)).unwrap_err());
        assert!(e.contains(tmp.path().to_str().unwrap()), "{e}");
        // the weights file instead of its directory
        let file = c.join("adapter/adapter_model.safetensors");
        let e = report(run_quiet(&args(&file, &base, &out)).unwrap_err());
        assert!(e.contains("not a directory"), "{e}");
        // a missing base
        let nobase = tmp.path().join("nobase.safetensors");
        let e = report(run_quiet(&args(&c.join("adapter"), &nobase, &out)).unwrap_err());
        assert!(e.contains(nobase.to_str().unwrap()), "{e}");
        // an adapter that does not fit the base: the error names the adapter
        let other = case("conv2d").join("adapter");
        let e = report(run_quiet(&args(&other, &base, &out)).unwrap_err());
        assert!(e.contains("conv"), "{e}");
        // refusing to overwrite the base
        let copy = tmp.path().join("base.safetensors");
        std::fs::copy(&base, &copy).unwrap();
        let e = report(run_quiet(&args(&c.join("adapter"), &copy, &copy)).unwrap_err());
        assert!(e.contains("overwrite"), "{e}");
        // nothing was written
        assert!(!out.exists());
    }

    /// Every writer refuses an output that aliases one of its inputs (resolved paths), with an error naming
    /// both, before writing anything: `train` (its data, its `--adapter-config`, an output inside the base
    /// model's or the data's directory), `combine`, `export`, `convert` and `merge` (an output inside an
    /// adapter directory).
    #[test]
    fn every_writer_refuses_outputs_that_alias_its_inputs() {
        let lora = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lora/cases/llama_qv");
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let base = t.join("base");
        std::fs::create_dir(&base).unwrap();
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(lora.join("base_hf").join(f), base.join(f)).unwrap();
        }
        let adapter = t.join("adapter");
        std::fs::create_dir(&adapter).unwrap();
        for f in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(lora.join("adapter").join(f), adapter.join(f)).unwrap();
        }
        let run = t.join("run");
        std::fs::create_dir_all(run.join("adapter")).unwrap();
        std::fs::write(run.join("metrics.jsonl"), "{\"input_ids\": [1, 2, 3]}\n").unwrap();
        std::fs::copy(
            adapter.join("adapter_config.json"),
            run.join("adapter/adapter_config.json"),
        )
        .unwrap();
        let gguf = t.join("m.gguf");
        std::fs::write(&gguf, b"GGUF").unwrap();
        let before = |p: &Path| std::fs::read(p).unwrap();
        let snapshot = [
            before(&run.join("metrics.jsonl")),
            before(&run.join("adapter/adapter_config.json")),
            before(&base.join("model.safetensors")),
            before(&gguf),
        ];
        let refuse = |argv: Vec<String>, says: &[&str]| {
            let cli = Cli::try_parse_from(std::iter::once("peft".to_string()).chain(argv.clone()))
                .unwrap();
            let e = format!("{:#}", crate::run_with(cli, &mut Vec::new()).unwrap_err());
            for s in says {
                assert!(e.contains(s), "{argv:?}: {e}");
            }
        };
        let s = |p: &Path| p.display().to_string();
        let train = |data: &Path, output: &Path, extra: &[String]| {
            let mut v = vec![
                "train".into(),
                "--model".into(),
                s(&base),
                "--data".into(),
                s(data),
            ];
            v.extend(["--output".into(), s(output)]);
            v.extend(extra.iter().cloned());
            v
        };
        let metrics = run.join("metrics.jsonl");
        refuse(
            train(&metrics, &run, &[]),
            &["would overwrite the training data", &s(&metrics)],
        );
        refuse(
            train(&t.join("run/../run/metrics.jsonl"), &run, &[]),
            &["would overwrite the training data"],
        );
        let cfg = run.join("adapter/adapter_config.json");
        let other_data = t.join("data.jsonl");
        std::fs::write(&other_data, "{\"input_ids\": [1, 2, 3]}\n").unwrap();
        refuse(
            train(&other_data, &run, &["--adapter-config".into(), s(&cfg)]),
            &["would overwrite --adapter-config", &s(&cfg)],
        );
        refuse(
            train(&other_data, &base.join("run"), &[]),
            &["inside the base model's directory", &s(&base)],
        );
        let data_dir = t.join("data");
        std::fs::create_dir(&data_dir).unwrap();
        std::fs::write(data_dir.join("a.txt"), "text").unwrap();
        refuse(
            train(&data_dir, &data_dir, &[]),
            &["inside the training data's directory"],
        );
        refuse(
            args_of(&[
                "combine",
                "--base",
                &s(&base),
                "--adapter",
                &format!("a={}", s(&adapter)),
                "--weights",
                "1",
                "--output",
                &s(&adapter.join("combined")),
            ]),
            &["inside the adapter's directory", &s(&adapter)],
        );
        refuse(
            args_of(&[
                "export",
                "--adapter",
                &s(&adapter),
                "--format",
                "gguf",
                "--base",
                &s(&base),
                "--output",
                &s(&adapter.join("x.gguf")),
            ]),
            &["inside the adapter's directory"],
        );
        refuse(
            args_of(&["convert", "--model", &s(&gguf), "--output", &s(t)]),
            &["would overwrite the GGUF model", &s(&gguf)],
        );
        refuse(
            args_of(&[
                "merge",
                "-b",
                &s(&base),
                "-a",
                &s(&adapter),
                "-o",
                &s(&adapter.join("merged")),
            ]),
            &["inside the adapter's directory"],
        );
        let after = [
            before(&run.join("metrics.jsonl")),
            before(&run.join("adapter/adapter_config.json")),
            before(&base.join("model.safetensors")),
            before(&gguf),
        ];
        assert_eq!(snapshot, after, "an input changed");
        assert!(!adapter.join("combined").exists() && !base.join("run").exists());
        assert!(!data_dir.join("adapter").exists() && !adapter.join("x.gguf").exists());
    }

    fn args_of(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }
}
