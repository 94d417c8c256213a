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
