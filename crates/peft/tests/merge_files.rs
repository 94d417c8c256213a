//! `peft merge`'s library core on the fixtures: merging adapter directories into base weight files by
//! tensor name reproduces PEFT's `merge_and_unload()` for every LoRA and DoRA case, and bad inputs give
//! clear errors.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use peft::PeftError;
use peft::io::adapter_subdir;
use peft::merge::{MergeAdapter, merge_model};
use std::path::Path;

fn adapters_of(dir: &Path, json: &serde_json::Value) -> Vec<MergeAdapter> {
    strings(json, "merge_order")
        .iter()
        .map(|n| {
            MergeAdapter::load(adapter_subdir(&dir.join("adapter"), n), None, &Device::Cpu).unwrap()
        })
        .collect()
}

#[test]
fn merge_files_matches_peft_merge_and_unload() {
    for dir in cases("lora") {
        let json = case_json(&dir);
        let merged = load(&dir.join("merged.safetensors"));
        let base = load(&dir.join("base.safetensors"));
        let dtype = base.values().next().unwrap().dtype();
        let (atol, rtol) = tolerances(dtype);
        let tmp = tempfile::tempdir().unwrap();
        let hf = dir.join("base_hf");
        let (out, written) = if hf.exists() {
            let out = tmp.path().join("merged");
            merge_model(&hf, adapters_of(&dir, &json), &out, None, &mut |_, _, _| {})
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            let w = load(&out.join("model.safetensors"));
            let mut keys: Vec<&String> = w.keys().collect();
            keys.sort();
            let expected = strings(&json, "merged_hf_keys");
            assert_eq!(
                keys,
                expected.iter().collect::<Vec<_>>(),
                "{}: merged keys",
                dir.display()
            );
            assert!(
                out.join("config.json").exists() && out.join("generation_config.json").exists()
            );
            (out, w)
        } else {
            let out = tmp.path().join("merged.safetensors");
            merge_model(
                &dir.join("base.safetensors"),
                adapters_of(&dir, &json),
                &out,
                None,
                &mut |_, _, _| {},
            )
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
            let w = load(&out);
            let mut a: Vec<&String> = w.keys().collect();
            let mut b: Vec<&String> = base.keys().collect();
            a.sort();
            b.sort();
            assert_eq!(a, b, "{}: names kept", dir.display());
            (out, w)
        };
        let _ = out;
        for (k, t) in &written {
            assert_eq!(
                t.dtype(),
                base[k].dtype(),
                "{}: {k} dtype kept",
                dir.display()
            );
            let expected: &Tensor = merged
                .get(k)
                .unwrap_or_else(|| panic!("{}: {k} not in merged", dir.display()));
            assert_close(
                &format!("{}: merged {k}", dir.display()),
                t,
                expected,
                atol,
                rtol,
            );
        }
    }
}

#[test]
fn merge_with_dtype_converts_every_float_tensor() {
    let dir = fixtures_dir().join("lora/cases/linear_basic");
    let json = case_json(&dir);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.safetensors");
    merge_model(
        &dir.join("base.safetensors"),
        adapters_of(&dir, &json),
        &out,
        Some(DType::BF16),
        &mut |_, _, _| {},
    )
    .unwrap();
    let merged = load(&dir.join("merged.safetensors"));
    for (k, t) in load(&out) {
        assert_eq!(t.dtype(), DType::BF16, "{k}");
        assert_close(&k, &t, &merged[&k], 1e-2, 1e-2);
    }
}

#[test]
fn merge_errors_are_clear() {
    let dir = fixtures_dir().join("lora/cases/linear_basic");
    let tmp = tempfile::tempdir().unwrap();
    let base = load(&dir.join("base.safetensors"));
    // 1. a base without the targeted module
    let partial: Vec<(String, Tensor)> = base
        .iter()
        .filter(|(k, _)| !k.starts_with("lin1."))
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect();
    let p = tmp.path().join("partial.safetensors");
    peft::io::write_safetensors(&p, &partial).unwrap();
    let out = tmp.path().join("out.safetensors");
    let e = merge_model(
        &p,
        adapters_of(&dir, &case_json(&dir)),
        &out,
        None,
        &mut |_, _, _| {},
    )
    .unwrap_err();
    assert!(
        matches!(&e, PeftError::MissingModule { module } if module == "lin1"),
        "{e}"
    );
    assert!(!out.exists(), "nothing written on failure");
    // 2. a base whose shapes do not fit
    let wrong: Vec<(String, Tensor)> = base
        .iter()
        .map(|(k, t)| {
            let t = if k == "lin0.weight" {
                Tensor::zeros(
                    (t.dim(0).unwrap(), t.dim(1).unwrap() + 1),
                    t.dtype(),
                    &Device::Cpu,
                )
                .unwrap()
            } else {
                t.clone()
            };
            (k.clone(), t)
        })
        .collect();
    let p = tmp.path().join("wrong.safetensors");
    peft::io::write_safetensors(&p, &wrong).unwrap();
    let e = merge_model(
        &p,
        adapters_of(&dir, &case_json(&dir)),
        &out,
        None,
        &mut |_, _, _| {},
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("lin0") && e.to_string().contains("shape"),
        "{e}"
    );
    assert!(!out.exists());
    // 3. a truncated base
    let bytes = std::fs::read(dir.join("base.safetensors")).unwrap();
    let p = tmp.path().join("trunc.safetensors");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = merge_model(
        &p,
        adapters_of(&dir, &case_json(&dir)),
        &out,
        None,
        &mut |_, _, _| {},
    )
    .unwrap_err();
    assert!(matches!(e, PeftError::SafeTensors { .. }), "{e}");
    // 4. a weight on a non-additive (DoRA) adapter
    let dora = fixtures_dir().join("lora/cases/dora_linear/adapter");
    let e = MergeAdapter::load(&dora, Some(0.5), &Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("only allowed for additive"), "{e}");
    // 5. a truncated adapter file and an unknown peft_type
    let bad = tmp.path().join("bad_adapter");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(
        dir.join("adapter/adapter_config.json"),
        bad.join("adapter_config.json"),
    )
    .unwrap();
    let w = std::fs::read(dir.join("adapter/adapter_model.safetensors")).unwrap();
    std::fs::write(bad.join("adapter_model.safetensors"), &w[..w.len() - 7]).unwrap();
    assert!(matches!(
        MergeAdapter::load(&bad, None, &Device::Cpu).unwrap_err(),
        PeftError::SafeTensors { .. }
    ));
    let cfg = std::fs::read_to_string(dir.join("adapter/adapter_config.json"))
        .unwrap()
        .replace("\"LORA\"", "\"NOT_A_METHOD\"");
    std::fs::write(bad.join("adapter_config.json"), cfg).unwrap();
    let e = MergeAdapter::load(&bad, None, &Device::Cpu).unwrap_err();
    assert!(
        matches!(&e, PeftError::UnknownPeftType(t) if t == "NOT_A_METHOD"),
        "{e}"
    );
}

#[test]
fn weighted_merge_scales_the_delta() {
    let dir = fixtures_dir().join("lora/cases/linear_basic");
    let base = load(&dir.join("base.safetensors"));
    let merged = load(&dir.join("merged.safetensors"));
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("half.safetensors");
    let ad = MergeAdapter::load(dir.join("adapter"), Some(0.5), &Device::Cpu).unwrap();
    merge_model(
        &dir.join("base.safetensors"),
        vec![ad],
        &out,
        None,
        &mut |_, _, _| {},
    )
    .unwrap();
    let half = load(&out);
    for k in ["lin0.weight", "lin1.weight"] {
        // base + 0.5 (merged - base)
        let expected = ((&merged[k] - &base[k]).unwrap() * 0.5)
            .unwrap()
            .add(&base[k])
            .unwrap();
        assert_close(k, &half[k], &expected, 1e-5, 1e-4);
    }
}

#[test]
fn sharded_base_gives_sharded_output_with_index() {
    let dir = fixtures_dir().join("lora/cases/llama_qv");
    let json = case_json(&dir);
    let base = load(&dir.join("base_hf/model.safetensors"));
    let merged = load(&dir.join("merged.safetensors"));
    let tmp = tempfile::tempdir().unwrap();
    let sharded = tmp.path().join("sharded");
    std::fs::create_dir_all(&sharded).unwrap();
    // Two shards: layer 0 and the embeddings in the first, the rest in the second.
    let mut shards: [Vec<(String, Tensor)>; 2] = [Vec::new(), Vec::new()];
    let mut weight_map = serde_json::Map::new();
    for (k, t) in &base {
        let i = usize::from(!(k.contains("layers.0.") || k.contains("embed")));
        let f = format!("model-0000{}-of-00002.safetensors", i + 1);
        weight_map.insert(k.clone(), serde_json::json!(f));
        shards[i].push((k.clone(), t.clone()));
    }
    for (i, s) in shards.iter().enumerate() {
        peft::io::write_safetensors(
            sharded.join(format!("model-0000{}-of-00002.safetensors", i + 1)),
            s,
        )
        .unwrap();
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    std::fs::copy(dir.join("base_hf/config.json"), sharded.join("config.json")).unwrap();
    std::fs::write(sharded.join("tokenizer.json"), "{}").unwrap();

    let out = tmp.path().join("out");
    let mut calls = 0;
    let report = merge_model(
        &sharded,
        adapters_of(&dir, &json),
        &out,
        None,
        &mut |done, total, _| {
            calls += 1;
            assert!(done <= total);
        },
    )
    .unwrap();
    assert!(calls >= base.len(), "progress is reported per tensor");
    assert_eq!(report.modules.len(), 4, "q and v of two layers");
    let names: Vec<String> = {
        let mut v: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names,
        [
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json"
        ]
    );
    let idx: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let mut seen = 0;
    for (i, s) in shards.iter().enumerate() {
        let written = load(&out.join(format!("model-0000{}-of-00002.safetensors", i + 1)));
        assert_eq!(written.len(), s.len());
        for (k, t) in &written {
            assert_eq!(
                idx["weight_map"][k],
                format!("model-0000{}-of-00002.safetensors", i + 1)
            );
            assert_close(k, t, &merged[k], 1e-5, 1e-4);
            seen += 1;
        }
    }
    assert_eq!(seen, base.len());
    let total: u64 = idx["metadata"]["total_size"].as_u64().unwrap();
    assert_eq!(
        total,
        base.values()
            .map(|t| (t.elem_count() * 4) as u64)
            .sum::<u64>()
    );
    // an existing output directory is refused, not overwritten
    let e = merge_model(
        &sharded,
        adapters_of(&dir, &json),
        &out,
        None,
        &mut |_, _, _| {},
    )
    .unwrap_err();
    assert!(e.to_string().contains("already exists"), "{e}");
}
