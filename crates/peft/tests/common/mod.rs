//! Fixture loading and the parity checks shared by the integration tests (tensor comparisons come from
//! `peft_test_support`).

use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::io::read_safetensors;
pub use peft_test_support::{assert_close, max_diff};
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

/// Checks shared by the per-method parity tests (LoRA, IA3, AdaLoRA, VeRA, LoHa, LoKr, OFT, BOFT) on a case
/// loaded with [`crate::lora_parity::load_case`].
pub mod parity {
    use super::*;
    use crate::lora_parity::{LoadedCase, load_case};
    use peft::io::{adapter_subdir, load_adapter};
    use peft::merge::{MergeAdapter, merge_model};
    use peft::{AdapterSlot, ForwardCtx, PeftConfig};

    /// The case directories a group must hold.
    pub enum Expected<'a> {
        /// Exactly these names (in any order).
        Names(&'a [&'a str]),
        /// At least this many cases.
        AtLeast(usize),
    }

    /// Loads every supported case of `fixtures/<group>/cases` (after checking them against `expected`) and
    /// runs `f` on it.
    pub fn for_each_case(group: &str, expected: Expected, f: impl Fn(&Path, &mut LoadedCase)) {
        let found = cases(group);
        match expected {
            Expected::Names(want) => {
                let names: Vec<String> = found
                    .iter()
                    .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                    .collect();
                let mut want = want.to_vec();
                want.sort();
                assert_eq!(names, want, "{group} fixture cases");
            }
            Expected::AtLeast(n) => assert!(
                found.len() >= n,
                "expected the {group} fixture cases, found {}",
                found.len()
            ),
        }
        for dir in found {
            let mut c = load_case(&dir);
            f(&dir, &mut c);
        }
    }

    /// Tolerances `(atol, rtol)` for [`assert_close`].
    pub type Tol = (f64, f64);

    /// What [`assert_merge_unmerge`] checks, and how closely. [`MergeChecks::default`] is the common case:
    /// weights 1e-6 / 1e-5, the bias unchanged bit for bit, the merged forward 1e-5 / 1e-4.
    pub struct MergeChecks<'a> {
        /// Merge in the case's `merge_order` (otherwise every active adapter).
        pub merge_order: bool,
        /// The merged weight against PEFT's `merged.safetensors`.
        pub merged_weight: Tol,
        /// When set, the merge must move the weight by more than this (a merge that does nothing could pass).
        pub min_change: Option<f64>,
        /// The merged bias against PEFT's (both present or both absent).
        pub merged_bias: Tol,
        /// The merged layer's forward against PEFT's adapted output.
        pub merged_forward: Tol,
        /// Modules whose merged forward differs from their unmerged one (by more than 1e-2) instead: PEFT's
        /// merge of a k×k OFT convolution computes something else than its forward.
        pub merged_forward_differs: Option<&'a dyn Fn(&str) -> bool>,
        /// The unmerged weight against PEFT's own unmerge (`unmerged.safetensors`), when the case has one.
        pub unmerged: Tol,
        /// The unmerged bias against PEFT's own unmerge, when set (and the layer has a bias).
        pub unmerged_bias: Option<Tol>,
        /// The unmerged weight against the base weight.
        pub unmerged_vs_base: Tol,
        /// After unmerging, the forward is PEFT's adapted output again (1e-5 / 1e-4).
        pub forward_after_unmerge: bool,
    }

    impl Default for MergeChecks<'_> {
        fn default() -> Self {
            Self {
                merge_order: true,
                merged_weight: (1e-6, 1e-5),
                min_change: None,
                merged_bias: (0.0, 0.0),
                merged_forward: (1e-5, 1e-4),
                merged_forward_differs: None,
                unmerged: (1e-6, 1e-5),
                unmerged_bias: None,
                unmerged_vs_base: (1e-6, 1e-5),
                forward_after_unmerge: false,
            }
        }
    }

    /// What PEFT recorded for a case: `merged.safetensors`, `unmerged.safetensors` (when written) and
    /// `io.safetensors`.
    pub struct MergeFiles {
        /// PEFT's merged state dict.
        pub merged: IndexMap<String, Tensor>,
        /// PEFT's state dict after its own unmerge, for the methods whose unmerge is not exact.
        pub unmerged: Option<IndexMap<String, Tensor>>,
        /// Per-module inputs and outputs.
        pub io: IndexMap<String, Tensor>,
    }

    impl MergeFiles {
        /// The files of the case in `dir`.
        pub fn load(dir: &Path) -> Self {
            let unmerged = dir.join("unmerged.safetensors");
            Self {
                merged: load(&dir.join("merged.safetensors")),
                unmerged: unmerged.exists().then(|| load(&unmerged)),
                io: load(&dir.join("io.safetensors")),
            }
        }
    }

    /// [`assert_merge_unmerge`] for every slot of a loaded case, against its base.
    pub fn assert_case_merge_unmerge(dir: &Path, c: &mut LoadedCase, checks: &MergeChecks) {
        let files = MergeFiles::load(dir);
        let order = strings(&c.json, "merge_order");
        let order: Vec<&str> = order.iter().map(|s| s.as_str()).collect();
        let order = checks.merge_order.then_some(order.as_slice());
        for (m, slot) in c.slots.iter_mut() {
            let what = format!("{}: {m}", dir.display());
            assert_merge_unmerge(&what, m, slot, order, &files, &c.base, checks);
        }
    }

    /// Merges the adapters of `slot` (module `m`) in `order` and checks the merged weight, bias and forward
    /// against PEFT's; unmerges and checks the weight against PEFT's unmerge and the base (`base`, by tensor
    /// name), as `checks` says.
    pub fn assert_merge_unmerge(
        what: &str,
        m: &str,
        slot: &mut AdapterSlot,
        order: Option<&[&str]>,
        files: &MergeFiles,
        base: &IndexMap<String, Tensor>,
        checks: &MergeChecks,
    ) {
        let (w, b) = (format!("{m}.weight"), format!("{m}.bias"));
        let (x, want) = (
            &files.io[&format!("input.{m}")],
            &files.io[&format!("output.{m}")],
        );
        let differs = checks.merged_forward_differs.is_some_and(|f| f(m));
        let before = differs.then(|| slot.forward(x, &ForwardCtx::eval()).unwrap());
        slot.merge(order).unwrap_or_else(|e| panic!("{what}: {e}"));
        let (atol, rtol) = checks.merged_weight;
        let merged_w = &files.merged[&w];
        assert_close(
            &format!("{what} merged weight"),
            &slot.base().weight().unwrap(),
            merged_w,
            atol,
            rtol,
        );
        if let Some(min) = checks.min_change {
            assert!(
                max_diff(merged_w, &base[&w]) > min,
                "{what}: merge changes nothing"
            );
        }
        match (slot.base().bias(), files.merged.get(&b)) {
            (Some(got), Some(expected)) => {
                let (atol, rtol) = checks.merged_bias;
                assert_close(&format!("{what} merged bias"), got, expected, atol, rtol)
            }
            (None, None) => {}
            other => panic!("{what}: bias presence differs: {other:?}"),
        }
        let y = slot.forward(x, &ForwardCtx::eval()).unwrap();
        if let Some(before) = before {
            let gap = max_diff(&y, &before);
            assert!(gap > 1e-2, "{what}: merged forward gap {gap}");
        } else {
            let (atol, rtol) = checks.merged_forward;
            assert_close(&format!("{what} merged forward"), &y, want, atol, rtol);
        }
        slot.unmerge().unwrap();
        assert!(slot.merged().is_empty(), "{what}: still merged");
        if let Some(unmerged) = &files.unmerged {
            let (atol, rtol) = checks.unmerged;
            let got = &slot.base().weight().unwrap();
            assert_close(
                &format!("{what} unmerged weight"),
                got,
                &unmerged[&w],
                atol,
                rtol,
            );
            if let (Some((atol, rtol)), Some(got)) = (checks.unmerged_bias, slot.base().bias()) {
                assert_close(
                    &format!("{what} unmerged bias"),
                    got,
                    &unmerged[&b],
                    atol,
                    rtol,
                );
            }
        }
        let (atol, rtol) = checks.unmerged_vs_base;
        let got = &slot.base().weight().unwrap();
        assert_close(
            &format!("{what} unmerged weight vs base"),
            got,
            &base[&w],
            atol,
            rtol,
        );
        if checks.forward_after_unmerge {
            let y = slot.forward(x, &ForwardCtx::eval()).unwrap();
            assert_close(
                &format!("{what} forward after unmerge"),
                &y,
                want,
                1e-5,
                1e-4,
            );
        }
    }

    /// Every slot's forward on PEFT's recorded input equals PEFT's output (f32: 1e-5 / 1e-4); with
    /// `min_effect`, the adapter must also move the layer's output by more than that (a wrong update could
    /// otherwise pass).
    pub fn assert_forward_matches(dir: &Path, c: &LoadedCase, min_effect: Option<f64>) {
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
                let moved = max_diff(want, &io[&format!("output_disabled.{m}")]);
                assert!(
                    moved > min,
                    "{}: {m}: adapter has no effect ({moved})",
                    dir.display()
                );
            }
        }
    }

    /// A freshly created adapter of `config` in every slot of the case gives PEFT's disabled output: the
    /// method starts as the identity.
    pub fn assert_new_adapter_is_identity(dir: &Path, c: &LoadedCase, config: &PeftConfig) {
        let io = load(&dir.join("io.safetensors"));
        for (m, slot) in &c.slots {
            let a = peft::layer::registry::new_adapter(
                config,
                m,
                slot.base(),
                &mut peft::PeftRng::new(1),
            )
            .unwrap();
            let mut fresh = AdapterSlot::new(m.clone(), slot.base().clone());
            fresh.add_adapter("default", a).unwrap();
            let y = fresh
                .forward(&io[&format!("input_disabled.{m}")], &ForwardCtx::eval())
                .unwrap();
            assert_close(
                &format!("{}: {m}: identity start", dir.display()),
                &y,
                &io[&format!("output_disabled.{m}")],
                1e-5,
                1e-4,
            );
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

    /// Saving every adapter of the case (with its shared tensors when its method saves them) and reading it
    /// back gives PEFT's file: the same keys (each accepted by `key_ok`), dtypes and values bit for bit, and a
    /// config with the same content.
    pub fn assert_save_reload_same(dir: &Path, c: &LoadedCase, key_ok: impl Fn(&str) -> bool) {
        for (name, config, split, original) in &c.adapters {
            let mut saved =
                peft::io::adapter_state_dict(c.slots.values(), name, config, &|_| false).unwrap();
            // model-level shared tensors (VB-LoRA's vector bank), as a model saves them
            saved.extend(peft::layer::registry::saved_shared(config, &split.shared));
            assert_reloads_as_peft(dir, name, config, &saved, original, &key_ok);
        }
    }

    /// Saves `saved` as adapter `name` with `config`, reads it back and checks it against PEFT's file of the
    /// case in `dir` (`original`): the same keys (each accepted by `key_ok`), shapes, dtypes and values bit
    /// for bit, and a config with the same content. Returns the two configs as JSON (ours, PEFT's).
    pub fn assert_reloads_as_peft(
        dir: &Path,
        name: &str,
        config: &PeftConfig,
        saved: &[(String, Tensor)],
        original: &IndexMap<String, Tensor>,
        key_ok: &dyn Fn(&str) -> bool,
    ) -> (serde_json::Value, serde_json::Value) {
        let tmp = tempfile::tempdir().unwrap();
        peft::io::save_adapter(tmp.path(), config, saved).unwrap();
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
        let mine: serde_json::Value = serde_json::from_str(&back.config.to_json_string()).unwrap();
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
        (mine, theirs)
    }

    /// `peft merge` without a model ([`merge_model`]) of the case's adapters, in merge order, into its base
    /// (`base_hf/` when the case has one, else `base.safetensors`): every written tensor equals PEFT's
    /// `merge_and_unload` state dict (1e-6 / 1e-5). Returns how many written names `is_target` accepts.
    pub fn assert_merge_model_matches(dir: &Path, is_target: impl Fn(&str) -> bool) -> usize {
        assert_merge_model_matches_within(dir, is_target, (1e-6, 1e-5))
    }

    /// [`assert_merge_model_matches`] within `tol` (OSF: PEFT's float32 SVD of the base).
    pub fn assert_merge_model_matches_within(
        dir: &Path,
        is_target: impl Fn(&str) -> bool,
        tol: Tol,
    ) -> usize {
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
                tol.0,
                tol.1,
            );
            touched += usize::from(is_target(k));
        }
        touched
    }
}

/// The parity tests every layer method added after the extension point gets on its PEFT-written fixtures
/// (`fixtures/<method>/cases/`): per-layer forward, disabled forward, merge and unmerge against PEFT's
/// (`$checks`: a [`parity::MergeChecks`]), save → re-load giving the same file (`$saved`: which file keys are the
/// adapter's), and `peft merge` without a model against PEFT's `merge_and_unload`. Defines `for_each_case` for
/// the file's own tests.
macro_rules! layer_method_parity_tests {
    ($method:literal, $cases:expr, $peft_type:literal, $checks:expr, $saved:expr) => {
        $crate::common::layer_method_parity_tests!(
            $method,
            $cases,
            $peft_type,
            $checks,
            $saved,
            (1e-6, 1e-5)
        );
    };
    ($method:literal, $cases:expr, $peft_type:literal, $checks:expr, $saved:expr, $merge_tol:expr) => {
        fn for_each_case(f: impl Fn(&std::path::Path, &mut $crate::lora_parity::LoadedCase)) {
            $crate::common::parity::for_each_case(
                $method,
                $crate::common::parity::Expected::Names(&$cases),
                f,
            );
        }

        #[test]
        fn forward_matches_peft_per_layer() {
            for_each_case(|dir, c| {
                for slot in c.slots.values() {
                    for (_, a) in slot.adapters() {
                        assert_eq!(a.peft_type(), $peft_type);
                    }
                }
                $crate::common::parity::assert_forward_matches(dir, c, None)
            });
        }

        #[test]
        fn disabled_forward_is_the_base() {
            for_each_case($crate::common::parity::assert_disabled_forward_is_base);
        }

        #[test]
        fn merge_and_unmerge_match_peft() {
            let checks = $checks;
            for_each_case(|dir, c| {
                $crate::common::parity::assert_case_merge_unmerge(dir, c, &checks)
            });
        }

        #[test]
        fn save_reload_gives_the_same_file() {
            for_each_case(|dir, c| $crate::common::parity::assert_save_reload_same(dir, c, $saved));
        }

        #[test]
        fn merge_files_matches_peft_merge_and_unload() {
            for dir in $crate::common::cases($method) {
                let targets = $crate::common::strings(&$crate::common::case_json(&dir), "targets");
                let touched = $crate::common::parity::assert_merge_model_matches_within(
                    &dir,
                    |k| targets.iter().any(|m| k.starts_with(m)),
                    $merge_tol,
                );
                // Every case merges into two tensors or more, but those of a method on one embedding (whose
                // tied head shares the one matrix).
                let min = if $method == "trainable_tokens" { 1 } else { 2 };
                assert!(
                    touched >= min,
                    "{}: {touched} targeted tensors",
                    dir.display()
                );
            }
        }
    };
}
pub(crate) use layer_method_parity_tests;

/// Targeted layers of the given `(in_features, out_features)`, named `layer0`, `layer1`, … (for the
/// shared-tensor hooks, which get every targeted layer).
pub fn target_layers(dims: &[(usize, usize)]) -> Vec<peft::tuners::TargetLayer> {
    dims.iter()
        .enumerate()
        .map(
            |(i, &(in_features, out_features))| peft::tuners::TargetLayer {
                module: format!("layer{i}"),
                in_features,
                out_features,
                base: None,
            },
        )
        .collect()
}
