//! `peft combine`: PEFT's `add_weighted_adapter` from the command line.
//!
//! Loads the base model and each `--adapter NAME=DIR` (LoRA), combines them with
//! [`peft::PeftModel::add_weighted_adapter`] and writes the result as a PEFT adapter directory
//! (`adapter_config.json`, `adapter_model.safetensors`) that PEFT's `PeftModel.from_pretrained`, `peft eval`
//! and `peft merge` load. The directory is written under a temporary name next to `--output` and renamed, so a
//! failure (or a kill) leaves nothing behind but a temporary the next run removes; an existing `--output`, or
//! one that aliases an input, is refused.
//!
//! ```text
//! peft combine --base model/ --adapter math=ad/math --adapter code=ad/code \
//!     --weights 0.7,0.3 --combination-type ties --density 0.5 --output ad/mixed
//! ```
//!
//! `--seed S` makes the DARE types draw PEFT's masks as after `torch.manual_seed(S)` right before PEFT's
//! call ([`peft::tuners::lora::weighted::DareSeed::Torch`]).

use anyhow::{Context, bail};
use candle_core::Device;
use clap::Args;
use peft::PeftModel;
use peft::host::AdapterHost;
use peft::merge_utils::MajoritySignMethod;
use peft::tuners::lora::weighted::{CombinationType, DareSeed, SvdSigns, WeightedOptions};
use peft_models::{LoadOptions, load_model_with};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// One `--adapter NAME=DIR` argument.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedAdapter {
    /// The name used in messages.
    pub name: String,
    /// The adapter directory.
    pub dir: PathBuf,
}

impl FromStr for NamedAdapter {
    type Err = String;

    /// `NAME=DIR` (split at the first `=`); a bare `DIR` is named after its last path component.
    fn from_str(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("empty adapter argument".into());
        }
        match s.split_once('=') {
            Some((n, d)) if !n.is_empty() && !d.is_empty() => Ok(Self {
                name: n.to_string(),
                dir: PathBuf::from(d),
            }),
            Some(_) => Err(format!("expected NAME=DIR, got {s:?}")),
            None => {
                let dir = PathBuf::from(s);
                let name = dir
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_else(|| s.to_string());
                Ok(Self { name, dir })
            }
        }
    }
}

/// Arguments of `peft combine`.
#[derive(Debug, Clone, Args)]
pub struct CombineArgs {
    /// The base model: an HF directory or a GGUF file.
    #[arg(long, short = 'b', value_name = "MODEL")]
    pub base: PathBuf,
    /// A LoRA adapter to combine, as `NAME=DIR`. Repeat, in the order of `--weights`.
    #[arg(
        long = "adapter",
        short = 'a',
        value_name = "NAME=DIR",
        required = true
    )]
    pub adapters: Vec<NamedAdapter>,
    /// One weight per adapter, comma-separated (negative weights subtract).
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        required = true
    )]
    pub weights: Vec<f64>,
    /// PEFT's `combination_type`: linear, cat, svd, ties, ties_svd, dare_linear, dare_ties,
    /// dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd.
    #[arg(long, default_value = "svd", value_parser = parse_type)]
    pub combination_type: CombinationType,
    /// The rank of an SVD result (default: the largest source rank).
    #[arg(long)]
    pub svd_rank: Option<usize>,
    /// Clamp the SVD factors to ± this quantile of their values.
    #[arg(long)]
    pub svd_clamp: Option<f64>,
    /// PEFT's `svd_full_matrices` (no effect on the result: an `--svd-rank` above a layer's dimensions is
    /// an error).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, value_name = "true|false")]
    pub svd_full_matrices: bool,
    /// The fraction of entries the pruning types keep, in [0, 1].
    #[arg(long)]
    pub density: Option<f64>,
    /// How the TIES types elect signs: `total` or `frequency`.
    #[arg(long, default_value = "total", value_parser = parse_sign)]
    pub majority_sign_method: MajoritySignMethod,
    /// The DARE types' seed: PEFT's masks as after `torch.manual_seed(SEED)` before its call.
    #[arg(long)]
    pub seed: Option<u64>,
    /// With `--svd-clamp`: a safetensors file of reference SVD factors `<module>.B` / `<module>.A` (an
    /// optional `preclamp.` prefix is accepted), such as torch's before PEFT's clamp, whose singular-vector
    /// signs are used; modules without one are signed canonically.
    #[arg(long, value_name = "FILE", requires = "svd_clamp")]
    pub svd_signs_from: Option<PathBuf>,
    /// The adapter directory to write (must not exist).
    #[arg(long, short = 'o', value_name = "DIR")]
    pub output: PathBuf,
}

fn parse_type(s: &str) -> Result<CombinationType, String> {
    s.parse().map_err(|e: peft::PeftError| e.to_string())
}

fn parse_sign(s: &str) -> Result<MajoritySignMethod, String> {
    s.parse().map_err(|e: peft::PeftError| e.to_string())
}

/// What `peft combine` did.
#[derive(Debug, Clone, PartialEq)]
pub struct CombineReport {
    /// The new adapter's rank.
    pub r: usize,
    /// The modules that hold it.
    pub modules: usize,
}

/// The name the combined adapter has while it is built (saved as the directory's `default` adapter).
const COMBINED: &str = "default";

/// Runs `peft combine`.
pub fn run(args: &CombineArgs, out: &mut dyn Write) -> anyhow::Result<CombineReport> {
    crate::merge::report_stale_temps();
    let mut inputs = vec![("the base model", args.base.as_path())];
    inputs.extend(
        args.adapters
            .iter()
            .map(|a| ("the adapter", a.dir.as_path())),
    );
    if let Some(p) = &args.svd_signs_from {
        inputs.push(("--svd-signs-from", p.as_path()));
    }
    peft::io::ensure_no_alias(&inputs, &[&args.output])?;
    peft::io::remove_stale_temps_beside(&args.output)?;
    if args.output.exists() {
        bail!(
            "{} already exists: give a new directory",
            args.output.display()
        );
    }
    if args.weights.len() != args.adapters.len() {
        bail!(
            "{} weights for {} adapters",
            args.weights.len(),
            args.adapters.len()
        );
    }
    let device = Device::Cpu;
    let loaded = load_model_with(&args.base, &device, &LoadOptions::default())
        .with_context(|| format!("cannot load the base {}", args.base.display()))?;
    let mut pm = PeftModel::new(loaded.model, 0);
    // Internal names, so that no user name can collide with the combined adapter's.
    let names: Vec<String> = (0..args.adapters.len())
        .map(|i| format!("source{i}"))
        .collect();
    for (a, n) in args.adapters.iter().zip(&names) {
        pm.load_adapter(&a.dir, n, &device).with_context(|| {
            format!("cannot load adapter `{}` from {}", a.name, a.dir.display())
        })?;
    }
    let opts = WeightedOptions {
        combination_type: args.combination_type,
        svd_rank: args.svd_rank,
        svd_clamp: args.svd_clamp,
        svd_full_matrices: args.svd_full_matrices,
        density: args.density,
        majority_sign_method: args.majority_sign_method,
        dare_seed: args.seed.map(DareSeed::Torch),
        svd_signs: match &args.svd_signs_from {
            None => SvdSigns::Canonical,
            Some(path) => reference_signs(path)?,
        },
    };
    let refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let labels: Vec<&str> = args.adapters.iter().map(|a| a.name.as_str()).collect();
    pm.add_weighted_adapter(&refs, &args.weights, COMBINED, &opts)
        .with_context(|| {
            format!(
                "cannot combine {} with `{}`",
                labels.join(", "),
                args.combination_type
            )
        })?;
    for n in &names {
        pm.delete_adapter(n)?;
    }
    let r = match &pm.configs()[COMBINED] {
        peft::PeftConfig::Lora(c) => c.lora.r,
        _ => unreachable!("add_weighted_adapter makes LoRA adapters"),
    };
    let modules = pm
        .model()
        .slots()
        .iter()
        .filter(|s| s.adapter(COMBINED).is_some())
        .count();
    // `save_pretrained` writes the directory atomically (`peft::io::atomic_dir`).
    pm.save_pretrained(&args.output)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    writeln!(
        out,
        "combined {} ({}) into {}: r={r}, {modules} modules",
        labels.join(", "),
        args.combination_type,
        args.output.display()
    )?;
    Ok(CombineReport { r, modules })
}

/// The reference factors of `--svd-signs-from`, by module.
fn reference_signs(path: &Path) -> anyhow::Result<SvdSigns> {
    let tensors = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut refs = Vec::new();
    for (k, b) in &tensors {
        let Some(m) = k.strip_suffix(".B") else {
            continue;
        };
        let a = tensors
            .get(&format!("{m}.A"))
            .with_context(|| format!("{}: `{k}` has no `{m}.A`", path.display()))?;
        let m = m.strip_prefix("preclamp.").unwrap_or(m);
        refs.push((m.to_string(), (b.clone(), a.clone())));
    }
    if refs.is_empty() {
        bail!("{}: no `<module>.B` / `<module>.A` factors", path.display());
    }
    Ok(SvdSigns::from_factors(refs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Cli, run_with};
    use candle_core::Tensor;
    use clap::Parser;

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    fn case(name: &str) -> (PathBuf, serde_json::Value) {
        let dir = repo()
            .join("fixtures/lora/weighted")
            .join(format!("weighted_{name}"));
        let v =
            serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap();
        (dir, v)
    }

    /// `peft combine`'s command line for a fixture case.
    fn combine_argv(c: &serde_json::Value, output: &Path) -> Vec<String> {
        let src = repo().join("fixtures/lora/weighted/weighted_sources/adapters");
        let mut argv: Vec<String> = ["peft", "combine", "--base"].map(String::from).to_vec();
        argv.push(
            repo()
                .join("fixtures/models/cases/llama")
                .display()
                .to_string(),
        );
        for a in c["adapters"].as_array().unwrap() {
            let a = a.as_str().unwrap();
            argv.push("--adapter".into());
            argv.push(format!("{a}={}", src.join(a).display()));
        }
        let weights: Vec<String> = c["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_f64().unwrap().to_string())
            .collect();
        argv.push("--weights".into());
        argv.push(weights.join(","));
        argv.push("--combination-type".into());
        argv.push(c["combination_type"].as_str().unwrap().into());
        for (k, v) in c["kwargs"].as_object().unwrap() {
            argv.push(format!("--{}", k.replace('_', "-")));
            argv.push(match v {
                serde_json::Value::String(s) => s.clone(),
                v => v.to_string(),
            });
        }
        if let Some(s) = c["torch_seed"].as_u64() {
            argv.push("--seed".into());
            argv.push(s.to_string());
        }
        argv.push("--output".into());
        argv.push(output.display().to_string());
        argv
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// `peft combine` then `peft eval` on the combined directory: PEFT's NLL and logits.
    #[test]
    fn combine_then_eval_gives_peft_nll_and_logits() {
        let tmp = tempfile::tempdir().unwrap();
        for name in [
            "svd_r3_clamp",
            "dare_ties",
            "dare_linear_svd",
            "cat",
            "linear_negative",
        ] {
            let (dir, c) = case(name);
            let output = tmp.path().join(name);
            let mut argv = combine_argv(&c, &output);
            if !c["kwargs"]["svd_clamp"].is_null() {
                // torch's singular-vector signs, which PEFT's clamp depends on
                argv.push("--svd-signs-from".into());
                argv.push(dir.join("expected.safetensors").display().to_string());
            }
            let cli = Cli::try_parse_from(argv).unwrap();
            let mut text = Vec::new();
            run_with(cli, &mut text).unwrap();
            let text = String::from_utf8(text).unwrap();
            assert!(
                text.contains(&format!("r={}", c["new_r"])),
                "{name}: {text}"
            );
            assert!(output.join("adapter_config.json").is_file());
            let logits_path = tmp.path().join(format!("{name}.logits.safetensors"));
            let data = repo().join("fixtures/lora/weighted/weighted_sources/data.jsonl");
            let eval = crate::eval::EvalArgs {
                model: repo().join("fixtures/models/cases/llama"),
                quant: Default::default(),
                adapter: vec![output.clone()],
                data,
                seq_len: 256,
                batch_size: 4,
                max_examples: None,
                json: false,
                save_logits: Some(logits_path.clone()),
            };
            let r = crate::eval::run(&eval, &mut Vec::new()).unwrap();
            let want = c["nll"].as_f64().unwrap();
            assert!(
                (r.mean_nll - want).abs() < 1e-4,
                "{name}: NLL {} vs PEFT's {want}",
                r.mean_nll
            );
            let got = candle_core::safetensors::load(&logits_path, &Device::Cpu).unwrap();
            let exp =
                candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu)
                    .unwrap();
            let d = max_diff(&got["logits"], &exp["logits"]);
            assert!(d < 1e-4, "{name}: logits differ by {d}");
            println!(
                "{name}: NLL {:.6} (PEFT {want:.6}), logits max diff {d:.2e}",
                r.mean_nll
            );
        }
    }

    #[test]
    fn combine_refuses_an_existing_output_and_bad_arguments() {
        let tmp = tempfile::tempdir().unwrap();
        let (_, c) = case("linear");
        let argv = combine_argv(&c, tmp.path());
        let e = run_with(Cli::try_parse_from(argv).unwrap(), &mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("already exists"), "{e}");
        // one adapter with svd: PEFT silently switches to linear, we refuse
        let (_, mut c) = case("single_linear");
        c["combination_type"] = "svd".into();
        let out = tmp.path().join("x");
        let e = run_with(
            Cli::try_parse_from(combine_argv(&c, &out)).unwrap(),
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(
            format!("{e:#}").contains("only be combined with `linear`"),
            "{e:#}"
        );
        assert!(!out.exists(), "a failed combine left {}", out.display());
        let bad = Cli::try_parse_from([
            "peft",
            "combine",
            "--base",
            "b",
            "--adapter",
            "a=x",
            "--weights",
            "1",
            "--combination-type",
            "average",
            "--output",
            "o",
        ]);
        assert!(bad.is_err());
        let ok = Cli::try_parse_from([
            "peft",
            "combine",
            "--base",
            "b",
            "--adapter",
            "a=x",
            "--adapter",
            "y",
            "--weights",
            "-1,0.5",
            "--output",
            "o",
        ])
        .unwrap();
        let crate::Command::Combine(a) = ok.command else {
            panic!()
        };
        assert_eq!(a.weights, vec![-1.0, 0.5]);
        assert_eq!(a.adapters[1].name, "y");
        assert_eq!(a.combination_type, CombinationType::Svd);
    }
}
