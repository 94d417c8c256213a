//! `peft convert-adapter`: PEFT's `save_as_lora` from the command line. Loads the base model and an adapter
//! of another method (LoHa, LoKr, VeRA, VB-LoRA, FourierFT, RandLoRA, C3A, MiSS, GraLoRA, DeLoRA, UniLoRA) and writes
//! it as a plain LoRA adapter directory that PEFT's `PeftModel.from_pretrained`, LoRA-only servers, `peft
//! serve` and `peft merge` load ([`peft::tuners::lora::conversion`]).
//!
//! ```text
//! peft convert-adapter --base model/ --adapter ad/loha --to lora --rank 16 --output ad/loha-as-lora
//! peft convert-adapter --base model/ --adapter ad/loha --to lora --rank 0.95 --output ad/loha-as-lora
//! ```
//!
//! An integer `--rank` gives every layer that rank; a number with a point is an energy threshold (each layer
//! gets the smallest rank whose singular values hold that fraction of its update's `Σ S²`). The directory is
//! written under a temporary name next to `--output` and renamed; an existing `--output`, or one that aliases
//! an input, is refused.

use anyhow::{Context, bail};
use candle_core::Device;
use clap::Args;
use peft::PeftModel;
use peft::host::AdapterHost;
use peft::tuners::lora::conversion::ConversionRank;
use peft_models::{LoadOptions, load_model_with};
use std::io::Write;
use std::path::PathBuf;

/// Arguments of `peft convert-adapter`.
#[derive(Debug, Clone, Args)]
pub struct ConvertAdapterArgs {
    /// The base model: an HF directory or a GGUF file.
    #[arg(long, short = 'b', value_name = "MODEL")]
    pub base: PathBuf,
    /// The adapter directory to convert.
    #[arg(long, short = 'a', value_name = "DIR")]
    pub adapter: PathBuf,
    /// The method to convert to (only `lora`).
    #[arg(long, default_value = "lora")]
    pub to: String,
    /// An integer rank (every layer), or an energy threshold in (0, 1] such as 0.9 (a rank per layer). Not
    /// taken by a PiSSA / OLoRA adapter, whose conversion is exact at rank 2r.
    #[arg(long, value_parser = parse_rank)]
    pub rank: Option<ConversionRank>,
    /// The adapter directory to write (must not exist).
    #[arg(long, short = 'o', value_name = "DIR")]
    pub output: PathBuf,
}

fn parse_rank(s: &str) -> Result<ConversionRank, String> {
    s.parse().map_err(|e: peft::PeftError| e.to_string())
}

/// What `peft convert-adapter` did.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertAdapterReport {
    /// The converted modules with their ranks.
    pub ranks: Vec<(String, usize)>,
}

/// The name the adapter is loaded under.
const SOURCE: &str = "default";

/// Runs `peft convert-adapter`.
pub fn run(args: &ConvertAdapterArgs, out: &mut dyn Write) -> anyhow::Result<ConvertAdapterReport> {
    if !args.to.eq_ignore_ascii_case("lora") {
        bail!(
            "--to {}: only `lora` is a conversion target (PEFT 0.21.2's tuners/lora/conversion.py)",
            args.to
        );
    }
    crate::merge::report_stale_temps();
    peft::io::ensure_no_alias(
        &[
            ("the base model", args.base.as_path()),
            ("the adapter", args.adapter.as_path()),
        ],
        &[&args.output],
    )?;
    peft::io::remove_stale_temps_beside(&args.output)?;
    if args.output.exists() {
        bail!(
            "{} already exists: give a new directory",
            args.output.display()
        );
    }
    let device = Device::Cpu;
    let load_base = || {
        load_model_with(&args.base, &device, &LoadOptions::default())
            .with_context(|| format!("cannot load the base {}", args.base.display()))
    };
    let config = peft::PeftConfig::from_dir(&args.adapter)
        .with_context(|| format!("cannot read the adapter {}", args.adapter.display()))?;
    if config.method().rewrites_base() {
        return convert_rewritten(args, config, &load_base, out);
    }
    let rank = args.rank.ok_or_else(|| {
        anyhow::anyhow!("--rank is required: an integer rank (16) or an energy threshold (0.9)")
    })?;
    let mut pm = PeftModel::new(load_base()?.model, 0);
    pm.load_adapter(&args.adapter, SOURCE, &device)
        .with_context(|| format!("cannot load the adapter {}", args.adapter.display()))?;
    let method = pm.configs()[SOURCE].peft_type().as_str();
    let lora = pm
        .convert_to_lora(SOURCE, rank)
        .with_context(|| format!("cannot convert the {method} adapter to LoRA"))?;
    for w in &lora.warnings {
        eprintln!("warning: {w}");
    }
    lora.save(&args.output)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    let ranks: Vec<(String, usize)> = lora
        .tensors
        .iter()
        .filter_map(|(k, _)| k.strip_suffix(".lora_A.weight"))
        .map(|k| {
            let m = k.strip_prefix("base_model.model.").unwrap_or(k);
            (m.to_string(), lora.rank_of(m))
        })
        .collect();
    let (lo, hi) = ranks
        .iter()
        .fold((usize::MAX, 0), |(lo, hi), (_, r)| (lo.min(*r), hi.max(*r)));
    let span = if lo == hi {
        format!("r={lo}")
    } else {
        format!("r={lo}..{hi}")
    };
    writeln!(
        out,
        "converted the {method} adapter {} to LoRA: {} modules, {span}, written to {}",
        args.adapter.display(),
        ranks.len(),
        args.output.display()
    )?;
    Ok(ConvertAdapterReport { ranks })
}

/// A LoRA whose init rewrote the base (PiSSA, OLoRA) as a plain LoRA of the original base, exactly:
/// PEFT's `save_pretrained(path_initial_model_for_weight_conversion=…)` with the initial adapter recomputed
/// from the original weights (the init is deterministic; its singular-vector signs cancel in `B₀·A₀`).
fn convert_rewritten(
    args: &ConvertAdapterArgs,
    config: peft::PeftConfig,
    load_base: &dyn Fn() -> anyhow::Result<peft_models::LoadedModel>,
    out: &mut dyn Write,
) -> anyhow::Result<ConvertAdapterReport> {
    if args.rank.is_some() {
        bail!(
            "--rank: an adapter whose init rewrote the base (PiSSA, OLoRA) converts exactly, at rank 2r \
             ([B | -B0]·[A ; A0]); leave --rank out"
        );
    }
    let device = Device::Cpu;
    // The recomputed initial adapter lives beside the output as `.NAME.initial.tmp-PID`, removed when done (a
    // killed run's copy is removed by the next one).
    let name = args
        .output
        .file_name()
        .map(|n| format!("{}.initial", n.to_string_lossy()))
        .ok_or_else(|| anyhow::anyhow!("{}: names no directory", args.output.display()))?;
    let beside = args.output.with_file_name(name);
    peft::io::remove_stale_temps_beside(&beside)?;
    let initial = peft::io::temp_path(&beside, peft::io::TempKind::Tmp)?;
    struct RemoveOnDrop(std::path::PathBuf);
    impl Drop for RemoveOnDrop {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _guard = RemoveOnDrop(initial.clone());
    let mut first = PeftModel::new(load_base()?.model, 0);
    first
        .add_adapter(SOURCE, config)
        .context("cannot recompute the initial adapter on the original base")?;
    first.save_pretrained(&initial)?;
    drop(first);
    let mut pm = PeftModel::new(load_base()?.model, 0);
    pm.load_adapter(&args.adapter, SOURCE, &device)
        .with_context(|| format!("cannot load the adapter {}", args.adapter.display()))?;
    pm.save_pretrained_converted(&args.output, &initial)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    let (r, modules) = match &pm.configs()[SOURCE] {
        peft::PeftConfig::Lora(c) => (
            c.lora.r,
            pm.model()
                .slots()
                .iter()
                .filter(|s| s.adapter(SOURCE).is_some())
                .map(|s| (s.name().to_string(), 2 * c.rank_and_alpha_for(s.name()).0))
                .collect::<Vec<_>>(),
        ),
        _ => unreachable!("only LoRA rewrites the base"),
    };
    writeln!(
        out,
        "converted the LORA (init rewrote the base) adapter {} to LoRA of the original base: {} modules, r={}, \
         written to {}",
        args.adapter.display(),
        modules.len(),
        2 * r,
        args.output.display()
    )?;
    Ok(ConvertAdapterReport { ranks: modules })
}

#[cfg(test)]
mod tests {
    use crate::{Cli, run_with};
    use candle_core::{Device, Tensor};
    use clap::Parser;
    use std::path::{Path, PathBuf};

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
    }

    fn convert(source: &str, rank: &str, out: &Path) -> anyhow::Result<String> {
        convert_dir(&fixtures().join(source), "adapter", Some(rank), out)
    }

    fn convert_dir(
        src: &Path,
        adapter: &str,
        rank: Option<&str>,
        out: &Path,
    ) -> anyhow::Result<String> {
        let mut argv: Vec<String> = [
            "peft",
            "convert-adapter",
            "--base",
            &src.join("base_hf").display().to_string(),
            "--adapter",
            &src.join(adapter).display().to_string(),
            "--to",
            "lora",
            "--output",
            &out.display().to_string(),
        ]
        .map(String::from)
        .to_vec();
        if let Some(r) = rank {
            argv.extend(["--rank".to_string(), r.to_string()]);
        }
        let mut buf = Vec::new();
        run_with(Cli::try_parse_from(argv)?, &mut buf)?;
        Ok(String::from_utf8(buf)?)
    }

    fn products(dir: &Path) -> Vec<(String, Tensor)> {
        let t = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
        let mut v: Vec<(String, Tensor)> = t
            .iter()
            .filter_map(|(k, a)| {
                let m = k.strip_suffix(".lora_A.weight")?;
                let b = &t[&format!("{m}.lora_B.weight")];
                Some((m.to_string(), b.matmul(a).unwrap()))
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn convert_adapter_writes_peft_s_lora_of_a_loha_adapter() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("loha_as_lora");
        let report = convert("loha/cases/loha_llama", "0.9", &out).unwrap();
        assert!(report.contains("converted the LOHA adapter"), "{report}");
        assert!(report.contains("4 modules, r=6..7"), "{report}");
        let want = products(&fixtures().join("lora/conversion/loha_energy/adapter"));
        let got = products(&out);
        assert_eq!(got.len(), want.len());
        for ((gm, g), (wm, w)) in got.iter().zip(&want) {
            assert_eq!(gm, wm);
            peft_test_support::assert_close(gm, g, w, 1e-5, 1e-4);
        }
        // An existing output is refused, and so is any target but LoRA.
        let e = convert("loha/cases/loha_llama", "4", &out).unwrap_err();
        assert!(format!("{e:#}").contains("already exists"), "{e:#}");
        let e = Cli::try_parse_from(["peft", "convert-adapter", "--base", "b", "--adapter", "a"])
            .unwrap_err();
        assert!(e.to_string().contains("--output"), "{e}");
    }

    #[test]
    fn convert_adapter_refuses_what_peft_refuses_and_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("hira_as_lora");
        let e = convert("hira/cases/hira_llama", "4", &out).unwrap_err();
        let msg = format!("{e:#}");
        assert!(
            msg.contains("cannot convert the HIRA adapter to LoRA"),
            "{msg}"
        );
        assert!(msg.contains("HIRA on Linear `model.layers.0."), "{msg}");
        let e = convert("loha/cases/loha_llama", "0", &out).unwrap_err();
        assert!(format!("{e:#}").contains("rank of 0"), "{e:#}");
        assert!(!out.exists());
        assert_eq!(
            std::fs::read_dir(tmp.path()).unwrap().count(),
            0,
            "a temporary was left"
        );
    }

    #[test]
    fn convert_adapter_turns_a_pissa_adapter_into_peft_s_lora_of_the_original_base() {
        let src = fixtures().join("lora/rewrite_init/pissa_llama");
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("as_lora");
        let e = convert_dir(&src, "trained", Some("4"), &out).unwrap_err();
        assert!(format!("{e:#}").contains("leave --rank out"), "{e:#}");
        let report = convert_dir(&src, "trained", None, &out).unwrap();
        assert!(
            report.contains("6 modules, r=8") || report.contains("modules, r=8"),
            "{report}"
        );
        let want = products(&src.join("converted"));
        let got = products(&out);
        assert_eq!(got.len(), want.len());
        for ((gm, g), (wm, w)) in got.iter().zip(&want) {
            assert_eq!(gm, wm);
            peft_test_support::assert_close(gm, g, w, 1e-5, 1e-4);
        }
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["r"], 8);
        assert_eq!(cfg["init_lora_weights"], true);
        // The source directory is not touched.
        let src_cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(src.join("trained/adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(src_cfg["init_lora_weights"], "pissa");
        // Other sources still need a rank.
        let e = convert_dir(
            &fixtures().join("loha/cases/loha_llama"),
            "adapter",
            None,
            &tmp.path().join("x"),
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("--rank is required"), "{e:#}");
    }
}
