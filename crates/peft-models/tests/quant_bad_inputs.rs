//! Bad quantized checkpoints through [`peft_models::load_model`]: a fixture base (fixtures/quant) copied to a
//! temporary directory with one tensor of its `model.safetensors` rewritten gives an error naming that tensor,
//! never a panic.

use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft_models::load_model;
use std::path::{Path, PathBuf};

fn base_dir(case: &str) -> PathBuf {
    crate::quant::case_dir(case).join("base")
}

/// The tensors of `case`'s `model.safetensors`, in file order (int8 read as its u8 bytes).
fn tensors(case: &str) -> IndexMap<String, Tensor> {
    peft::io::SafetensorsFile::open(base_dir(case).join("model.safetensors"))
        .unwrap()
        .load_all(&Device::Cpu)
        .unwrap()
}

/// `case`'s base copied into `dir` with `edit` applied to its tensors.
fn rewritten(case: &str, dir: &Path, edit: impl FnOnce(&mut IndexMap<String, Tensor>)) {
    std::fs::copy(base_dir(case).join("config.json"), dir.join("config.json")).unwrap();
    let mut t = tensors(case);
    edit(&mut t);
    let list: Vec<(String, Tensor)> = t.into_iter().collect();
    peft::io::write_safetensors(dir.join("model.safetensors"), &list).unwrap();
}

/// The error loading `dir`, with its causes.
fn load_err(dir: &Path) -> String {
    let e = match load_model(dir, &Device::Cpu) {
        Ok(_) => panic!("{} loaded", dir.display()),
        Err(e) => e,
    };
    let mut s = e.to_string();
    let mut cur = std::error::Error::source(&e);
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// An edit replacing `from` by `to` in the JSON bytes of the quant state `key`.
fn retyped<'a>(
    key: &'a str,
    from: &'a str,
    to: &'a str,
) -> impl FnOnce(&mut IndexMap<String, Tensor>) + 'a {
    move |t| {
        let json = String::from_utf8(t[key].to_vec1::<u8>().unwrap()).unwrap();
        assert!(json.contains(from), "{json}");
        let json = json.replace(from, to).into_bytes();
        let n = json.len();
        t.insert(key.into(), Tensor::from_vec(json, n, &Device::Cpu).unwrap());
    }
}

const UP: &str = "model.layers.1.mlp.up_proj.weight";

#[test]
fn bnb4_checkpoint_with_a_bad_tensor_is_an_error_naming_it() {
    let case = "bnb4_llama_nf4_dq";
    // The unmodified copy loads.
    let tmp = tempfile::tempdir().unwrap();
    rewritten(case, tmp.path(), |_| {});
    load_model(tmp.path(), &Device::Cpu).unwrap();

    // up_proj [128, 64] is 4096 packed bytes: cut to 4000.
    let tmp = tempfile::tempdir().unwrap();
    rewritten(case, tmp.path(), |t| {
        let w = t[UP].flatten_all().unwrap().narrow(0, 0, 4000).unwrap();
        t.insert(UP.into(), w.reshape((4000, 1)).unwrap());
    });
    let e = load_err(tmp.path());
    assert!(
        e.contains(&format!("{UP}: holds 4000 packed bytes")) && e.contains("needs 4096"),
        "{e}"
    );

    // A quant state whose shape holds as many elements but is not the module's [128, 64].
    let state_key = format!("{UP}.quant_state.bitsandbytes__nf4");
    let tmp = tempfile::tempdir().unwrap();
    rewritten(
        case,
        tmp.path(),
        retyped(&state_key, "[128, 64]", "[64, 128]"),
    );
    let e = load_err(tmp.path());
    assert!(
        e.contains(UP) && e.contains("expected [128, 64], got [64, 128]"),
        "{e}"
    );

    // An unknown quant_type in the JSON.
    let tmp = tempfile::tempdir().unwrap();
    rewritten(case, tmp.path(), retyped(&state_key, "\"nf4\"", "\"nf5\""));
    let e = load_err(tmp.path());
    assert!(
        e.contains(&state_key) && e.contains("unknown bitsandbytes 4-bit quant_type \"nf5\""),
        "{e}"
    );

    // Corrupt JSON.
    let tmp = tempfile::tempdir().unwrap();
    rewritten(
        case,
        tmp.path(),
        retyped(&state_key, "\"blocksize\"", "blocksize"),
    );
    let e = load_err(tmp.path());
    assert!(
        e.contains(&state_key) && e.contains("is not a JSON quant state"),
        "{e}"
    );

    // A missing absmax.
    let tmp = tempfile::tempdir().unwrap();
    rewritten(case, tmp.path(), |t| {
        t.shift_remove(&format!("{UP}.absmax")).unwrap();
    });
    let e = load_err(tmp.path());
    assert!(e.contains(&format!("missing tensor {UP}.absmax")), "{e}");
}

#[test]
fn bnb8_checkpoint_with_a_bad_scb_is_an_error_naming_it() {
    let case = "bnb8_llama";
    let scb = "model.layers.0.self_attn.o_proj.SCB";
    let tmp = tempfile::tempdir().unwrap();
    rewritten(case, tmp.path(), |t| {
        let s = t[scb].narrow(0, 0, 60).unwrap();
        t.insert(scb.into(), s);
    });
    let e = load_err(tmp.path());
    assert!(
        e.contains(&format!("{scb}: expected float32 [64], got F32 [60]")),
        "{e}"
    );
    let tmp = tempfile::tempdir().unwrap();
    rewritten(case, tmp.path(), |t| {
        let s = t[scb].to_dtype(DType::F16).unwrap();
        t.insert(scb.into(), s);
    });
    let e = load_err(tmp.path());
    assert!(
        e.contains(&format!("{scb}: expected float32 [64], got F16")),
        "{e}"
    );
}
