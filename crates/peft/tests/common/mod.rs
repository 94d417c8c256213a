//! Fixture loading and tensor comparison shared by the integration tests.

use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::io::read_safetensors;
use std::path::{Path, PathBuf};

/// `fixtures/` at the workspace root.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures")
}

/// Cases whose adapters use a feature peft-rs refuses on purpose, with the config field named in the error.
/// `llama_tied_ensure`: `ensure_weight_tying=true`, whose PEFT 0.21.2 merge adds the tied delta twice.
pub const REFUSED_CASES: &[(&str, &str)] = &[("llama_tied_ensure", "ensure_weight_tying")];

/// Every supported case directory under `fixtures/<group>/cases`, sorted.
pub fn cases(group: &str) -> Vec<PathBuf> {
    all_cases(group)
        .into_iter()
        .filter(|p| !REFUSED_CASES.iter().any(|(n, _)| p.ends_with(n)))
        .collect()
}

/// Every case directory under `fixtures/<group>/cases`, sorted, refused ones included.
pub fn all_cases(group: &str) -> Vec<PathBuf> {
    let dir = fixtures_dir().join(group).join("cases");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("case.json").exists())
        .collect();
    v.sort();
    v
}

/// A parsed `case.json`.
pub fn case_json(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("case.json")).unwrap()).unwrap()
}

/// A string list field of a case.
pub fn strings(v: &serde_json::Value, key: &str) -> Vec<String> {
    v[key]
        .as_array()
        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
        .unwrap_or_default()
}

/// Every tensor of a safetensors file.
pub fn load(path: &Path) -> IndexMap<String, Tensor> {
    read_safetensors(path, &Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Tolerances for a case's dtype: f32 atol 1e-5 / rtol 1e-4, looser for half precision.
pub fn tolerances(dtype: DType) -> (f64, f64) {
    match dtype {
        DType::BF16 => (2e-2, 2e-2),
        DType::F16 => (2e-3, 2e-3),
        _ => (1e-5, 1e-4),
    }
}

/// Asserts `|a - b| <= atol + rtol |b|` elementwise, naming the tensor and the worst element.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, atol: f64, rtol: f64) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
    let a: Vec<f32> = a
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = b
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let mut worst = (0usize, 0f64);
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let excess = ((*x as f64) - (*y as f64)).abs() - (atol + rtol * (*y as f64).abs());
        if excess > worst.1 || x.is_nan() != y.is_nan() {
            worst = (i, excess.max(f64::MIN_POSITIVE));
        }
    }
    assert!(
        worst.1 <= 0.0,
        "{what}: element {} differs: {} vs expected {} (atol {atol}, rtol {rtol})",
        worst.0,
        a[worst.0],
        b[worst.0]
    );
}

/// The largest absolute difference between two tensors.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// Checks shared by the per-method parity tests (IA3, LoHa, LoKr, OFT, BOFT) on a case loaded with
/// [`crate::lora_parity::load_case`].
pub mod parity {
    use super::*;
    use crate::lora_parity::LoadedCase;
    use peft::ForwardCtx;
    use peft::io::{adapter_subdir, load_adapter};
    use peft::merge::{MergeAdapter, merge_model};

    /// Every slot's forward on PEFT's recorded input equals PEFT's output (f32: 1e-5 / 1e-4); with
    /// `min_effect`, the adapter must also move the layer's output by more than that (a wrong update could
    /// otherwise pass).
    pub fn assert_forward_matches(dir: &Path, c: &LoadedCase, min_effect: Option<f32>) {
        let io = load(&dir.join("io.safetensors"));
        for (m, slot) in &c.slots {
            let y = slot
                .forward(&io[&format!("input.{m}")], &ForwardCtx::eval())
                .unwrap_or_else(|e| panic!("{}: {m}: {e}", dir.display()));
            let want = &io[&format!("output.{m}")];
            assert_close(
                &format!("{}: output.{m}", dir.display()),
                &y,
                want,
                1e-5,
                1e-4,
            );
            if let Some(min) = min_effect {
                let moved = max_abs_diff(want, &io[&format!("output_disabled.{m}")]);
                assert!(
                    moved > min,
                    "{}: {m}: adapter has no effect ({moved})",
                    dir.display()
                );
            }
        }
    }

    /// With adapters disabled every slot gives PEFT's disabled output.
    pub fn assert_disabled_forward_is_base(dir: &Path, c: &mut LoadedCase) {
        let io = load(&dir.join("io.safetensors"));
        for (m, slot) in c.slots.iter_mut() {
            slot.set_disabled(true);
            let y = slot
                .forward(&io[&format!("input_disabled.{m}")], &ForwardCtx::eval())
                .unwrap();
            assert_close(
                &format!("{}: output_disabled.{m}", dir.display()),
                &y,
                &io[&format!("output_disabled.{m}")],
                1e-5,
                1e-4,
            );
            slot.set_disabled(false);
        }
    }

    /// Saving every adapter of the case and reading it back gives PEFT's file: the same keys (each accepted
    /// by `key_ok`), dtypes and values bit for bit, and a config with the same content.
    pub fn assert_save_reload_same(dir: &Path, c: &LoadedCase, key_ok: impl Fn(&str) -> bool) {
        for (name, config, _, original) in &c.adapters {
            let saved =
                peft::io::adapter_state_dict(c.slots.values(), name, config, &|_| false).unwrap();
            let tmp = tempfile::tempdir().unwrap();
            peft::io::save_adapter(tmp.path(), config, &saved).unwrap();
            let back = load_adapter(tmp.path(), &Device::Cpu).unwrap();
            let mut a: Vec<&String> = back.tensors.keys().collect();
            let mut b: Vec<&String> = original.keys().collect();
            a.sort();
            b.sort();
            assert_eq!(a, b, "{}: {name}: keys differ", dir.display());
            for (k, t) in original {
                assert!(key_ok(k), "{k}");
                let u = &back.tensors[k];
                assert_eq!(u.dtype(), t.dtype(), "{k}: dtype");
                assert_close(&format!("{}: {k}", dir.display()), u, t, 0.0, 0.0);
            }
            let mine: serde_json::Value =
                serde_json::from_str(&back.config.to_json_string()).unwrap();
            let theirs: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(
                    adapter_subdir(&dir.join("adapter"), name).join("adapter_config.json"),
                )
                .unwrap(),
            )
            .unwrap();
            assert!(
                peft::config::json_content_eq(&mine, &theirs),
                "{}: {name}: config differs:\n{mine}\nvs\n{theirs}",
                dir.display()
            );
        }
    }

    /// `peft merge` without a model ([`merge_model`]) of the case's adapters, in merge order, into its base
    /// (`base_hf/` when the case has one, else `base.safetensors`): every written tensor equals PEFT's
    /// `merge_and_unload` state dict (1e-6 / 1e-5). Returns how many written names `is_target` accepts.
    pub fn assert_merge_model_matches(dir: &Path, is_target: impl Fn(&str) -> bool) -> usize {
        let json = case_json(dir);
        let merged = load(&dir.join("merged.safetensors"));
        let adapters: Vec<MergeAdapter> = strings(&json, "merge_order")
            .iter()
            .map(|n| {
                MergeAdapter::load(adapter_subdir(&dir.join("adapter"), n), None, &Device::Cpu)
                    .unwrap()
            })
            .collect();
        let tmp = tempfile::tempdir().unwrap();
        let hf = dir.join("base_hf");
        let written = if hf.exists() {
            let out = tmp.path().join("merged");
            merge_model(&hf, adapters, &out, None, &mut |_, _, _| {})
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            load(&out.join("model.safetensors"))
        } else {
            let out = tmp.path().join("merged.safetensors");
            merge_model(
                &dir.join("base.safetensors"),
                adapters,
                &out,
                None,
                &mut |_, _, _| {},
            )
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            load(&out)
        };
        let mut touched = 0;
        for (k, t) in &written {
            let expected = merged
                .get(k)
                .unwrap_or_else(|| panic!("{}: {k} not in merged", dir.display()));
            assert_close(
                &format!("{}: merged {k}", dir.display()),
                t,
                expected,
                1e-6,
                1e-5,
            );
            touched += usize::from(is_target(k));
        }
        touched
    }
}
