//! bitsandbytes 4-bit parity: the codec against `fixtures/quant/cases/codec_bnb4.safetensors`, written by
//! bitsandbytes 0.50.2 on the CPU (`fixtures/quant/gen_quant.py`).

use crate::common::fixtures_dir;
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::quant::bnb4::{Absmax, Bnb4Options, Bnb4Weight, NestedRounding, dynamic_map};

fn codec() -> (Vec<String>, IndexMap<String, Tensor>) {
    let path = fixtures_dir().join("quant/cases/codec_bnb4.safetensors");
    let tensors: IndexMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let data = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&data).unwrap();
    let cases = meta.metadata().as_ref().unwrap()["cases"]
        .split(',')
        .map(String::from)
        .collect();
    (cases, tensors)
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn bnb4_dequantize_is_bit_exact_with_bitsandbytes() {
    let (cases, t) = codec();
    assert_eq!(cases.len(), 8);
    for c in &cases {
        let w = Bnb4Weight::from_state_dict(&format!("{c}.weight"), &t)
            .unwrap_or_else(|e| panic!("{c}: {e}"));
        let want = f32s(&t[&format!("{c}.dequantized")]);
        let got = w.dequantize_f32();
        let got: Vec<f32> = match w.dtype {
            // bnb returns the weight's dtype: compare after the same rounding.
            DType::BF16 => got
                .iter()
                .map(|v| half::bf16::from_f32(*v).to_f32())
                .collect(),
            _ => got,
        };
        let bad = got
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(bad, 0, "{c}: {bad} of {} values differ", want.len());
        assert_eq!(
            w.dequantize(&Device::Cpu).unwrap().dtype(),
            t[&format!("{c}.input")].dtype(),
            "{c}"
        );
    }
}

#[test]
fn bnb4_quantize_writes_the_bytes_bitsandbytes_writes() {
    let (cases, t) = codec();
    for c in &cases {
        let key = format!("{c}.weight");
        let want = Bnb4Weight::from_state_dict(&key, &t).unwrap();
        let input = &t[&format!("{c}.input")];
        let opts = Bnb4Options {
            quant_type: want.quant_type,
            blocksize: want.blocksize,
            double_quant: want.double_quant(),
            nested_rounding: NestedRounding::CpuLut,
        };
        let offset = match &want.absmax {
            Absmax::Nested { offset, .. } => Some(*offset),
            Absmax::Plain(_) => None,
        };
        let got = Bnb4Weight::quantize_with_offset(
            &f32s(input),
            input.dims(),
            input.dtype(),
            opts,
            offset,
        )
        .unwrap();
        assert_eq!(got.packed, want.packed, "{c}: packed codes");
        assert_eq!(
            got.quant_map.map(f32::to_bits),
            want.quant_map.map(f32::to_bits),
            "{c}: quant_map"
        );
        match (&got.absmax, &want.absmax) {
            (Absmax::Plain(a), Absmax::Plain(b)) => {
                assert_eq!(
                    a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{c}: absmax"
                )
            }
            (
                Absmax::Nested {
                    codes: a,
                    nested_absmax: na,
                    nested_quant_map: ma,
                    ..
                },
                Absmax::Nested {
                    codes: b,
                    nested_absmax: nb,
                    nested_quant_map: mb,
                    ..
                },
            ) => {
                assert_eq!(
                    ma.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    mb.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{c}: nested_quant_map"
                );
                assert_eq!(
                    na.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    nb.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{c}: nested_absmax"
                );
                let diff = a.iter().zip(b).filter(|(x, y)| x != y).count();
                assert_eq!(diff, 0, "{c}: {diff} of {} absmax codes differ", b.len());
            }
            _ => panic!("{c}: double quantization differs"),
        }
        // The whole state dict, the quant state's JSON bytes included, is what transformers saves.
        for (k, v) in got.state_dict(&key, &Device::Cpu).unwrap() {
            let w = &t[&k];
            assert_eq!(v.dtype(), w.dtype(), "{k}");
            assert_eq!(v.dims(), w.dims(), "{k}");
            if v.dtype() == DType::U8 {
                assert_eq!(
                    v.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
                    w.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
                    "{k}"
                );
            }
        }
    }
}

#[test]
fn bnb4_dynamic_map_is_the_stored_nested_quant_map() {
    let (_, t) = codec();
    let stored = f32s(&t["nf4_dq_80x256.weight.nested_quant_map"]);
    let ours = dynamic_map();
    let bad: Vec<usize> = (0..256)
        .filter(|&i| stored[i].to_bits() != ours[i].to_bits())
        .collect();
    assert!(
        bad.is_empty(),
        "entries {bad:?} differ: {:?}",
        bad.iter()
            .map(|&i| (stored[i], ours[i]))
            .collect::<Vec<_>>()
    );
}

#[test]
fn bnb8_quantize_and_dequantize_are_bit_exact_with_bitsandbytes() {
    use peft::quant::bnb8::Bnb8Weight;
    let path = fixtures_dir().join("quant/cases/codec_bnb8.safetensors");
    // candle has no int8: peft's loader reads the stored CB as u8 with the same bytes.
    let file = peft::io::SafetensorsFile::open(&path).unwrap();
    let t = file.load_all(&Device::Cpu).unwrap();
    let cases: Vec<String> = file.metadata().unwrap()["cases"]
        .split(',')
        .map(String::from)
        .collect();
    assert_eq!(cases.len(), 3);
    for c in &cases {
        let input = &t[&format!("{c}.input")];
        let q = Bnb8Weight::quantize(&f32s(input), input.dims()).unwrap();
        let cb: Vec<i8> = file
            .load(&format!("{c}.CB"), &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<u8>()
            .unwrap()
            .into_iter()
            .map(|b| b as i8)
            .collect();
        assert_eq!(q.codes, cb, "{c}: codes");
        let scb = f32s(&t[&format!("{c}.SCB")]);
        assert_eq!(
            q.scb.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            scb.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "{c}: SCB"
        );
        let mut d = vec![0f32; q.codes.len()];
        q.dequantize_into(0, &mut d);
        let want = f32s(&t[&format!("{c}.dequantized")]);
        let bad = d
            .iter()
            .zip(&want)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(bad, 0, "{c}: {bad} dequantized values differ");
    }
}

// ---- Bad bitsandbytes inputs: clear errors naming the tensor, never a panic ----

/// The tensors transformers stores for a bnb 4-bit Linear `m` of shape `[64, 64]` (blocksize 64, 64 blocks,
/// 2048 packed bytes), ± double quantization.
fn bnb4_state(double_quant: bool) -> IndexMap<String, Tensor> {
    let x: Vec<f32> = (0..64 * 64).map(|i| (i as f32 * 0.37).sin()).collect();
    let opts = Bnb4Options {
        double_quant,
        ..Default::default()
    };
    let q = Bnb4Weight::quantize(&x, &[64, 64], DType::F32, opts).unwrap();
    q.state_dict("m.weight", &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

const NF4_STATE: &str = "m.weight.quant_state.bitsandbytes__nf4";

/// `t` with its quant state's JSON replaced by `json`.
fn with_state(t: &IndexMap<String, Tensor>, json: &str) -> IndexMap<String, Tensor> {
    let mut t = t.clone();
    t.insert(
        NF4_STATE.into(),
        Tensor::new(json.as_bytes(), &Device::Cpu).unwrap(),
    );
    t
}

/// The error reading module `m` through [`peft::quant::from_state_dict`] (the model loader's path).
fn quant_err(t: &IndexMap<String, Tensor>) -> String {
    match peft::quant::from_state_dict("m", t) {
        Ok(Some((q, _))) => panic!("loaded {}", q.describe()),
        Ok(None) => panic!("not recognised as quantized"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bnb4_truncated_packed_weight_is_an_error_naming_it() {
    for dq in [false, true] {
        let mut t = bnb4_state(dq);
        t.insert(
            "m.weight".into(),
            Tensor::zeros((2000, 1), DType::U8, &Device::Cpu).unwrap(),
        );
        let e = quant_err(&t);
        assert!(
            e.contains("m.weight: holds 2000 packed bytes")
                && e.contains("[64, 64]")
                && e.contains("needs 2048"),
            "{e}"
        );
        // Packed bytes viewed as bfloat16 (bnb's quant_storage): counted in bytes, 2 per element.
        t.insert(
            "m.weight".into(),
            Tensor::zeros((1000, 1), DType::BF16, &Device::Cpu).unwrap(),
        );
        let e = quant_err(&t);
        assert!(
            e.contains("m.weight: holds 2000 packed bytes (BF16 [1000, 1])"),
            "{e}"
        );
        // An empty weight.
        t.insert(
            "m.weight".into(),
            Tensor::zeros((0, 1), DType::U8, &Device::Cpu).unwrap(),
        );
        let e = quant_err(&t);
        assert!(e.contains("m.weight: holds 0 packed bytes"), "{e}");
    }
}

#[test]
fn bnb4_quant_state_disagreeing_with_the_tensors_is_an_error_naming_the_tensor() {
    let plain = bnb4_state(false);
    let dq = bnb4_state(true);
    let state = |blocksize: &str, shape: &str| {
        format!(
            r#"{{"quant_type": "nf4", "blocksize": {blocksize}, "dtype": "float32", "shape": {shape}}}"#
        )
    };
    // A shape the packed bytes do not hold.
    let e = quant_err(&with_state(&plain, &state("64", "[64, 128]")));
    assert!(
        e.contains("m.weight: holds 2048 packed bytes") && e.contains("[64, 128] needs 4096"),
        "{e}"
    );
    // The right number of bytes but another blocksize: absmax disagrees.
    let e = quant_err(&with_state(&plain, &state("128", "[64, 64]")));
    assert!(
        e.contains("m.weight.absmax: holds 64 values; [64, 64] in blocks of 128 needs 32"),
        "{e}"
    );
    let mut nested = state("128", "[64, 64]");
    nested.pop();
    nested
        .push_str(r#", "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.5}"#);
    let e = quant_err(&with_state(&dq, &nested));
    assert!(
        e.contains("m.weight.absmax: holds 64 codes; [64, 64] in blocks of 128 needs 32"),
        "{e}"
    );
    // absmax itself cut short.
    let mut short = plain.clone();
    short.insert(
        "m.weight.absmax".into(),
        Tensor::zeros(63, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = quant_err(&short);
    assert!(e.contains("m.weight.absmax: holds 63 values"), "{e}");
    // absmax of the wrong dtype.
    short.insert(
        "m.weight.absmax".into(),
        Tensor::zeros(64, DType::F16, &Device::Cpu).unwrap(),
    );
    let e = quant_err(&short);
    assert!(
        e.contains("m.weight.absmax: expected float32, got F16"),
        "{e}"
    );
    // A blocksize bitsandbytes does not have, shapes that are not shapes.
    let e = quant_err(&with_state(&plain, &state("100", "[64, 64]")));
    assert!(
        e.contains(NF4_STATE) && e.contains("`blocksize` 100 is not one of"),
        "{e}"
    );
    for shape in ["[0, 64]", "[-64, 64]", "\"64x64\"", "[]", "[64.5, 64]"] {
        let e = quant_err(&with_state(&plain, &state("64", shape)));
        assert!(
            e.contains(NF4_STATE) && e.contains("`shape` is not a list of positive sizes"),
            "{shape}: {e}"
        );
    }
    let e = quant_err(&with_state(
        &plain,
        &state("64", "[4294967296, 4294967296, 4294967296]"),
    ));
    assert!(e.contains(NF4_STATE) && e.contains("is too large"), "{e}");
    // A double-quant state without its nested tensors, a nested blocksize bnb does not use.
    let e = quant_err(&with_state(&plain, &nested.replace("128", "64")));
    assert!(e.contains("m.weight.absmax: expected uint8"), "{e}");
    let e = quant_err(&with_state(
        &dq,
        &nested.replace("128", "64").replace("256", "128"),
    ));
    assert!(
        e.contains(NF4_STATE) && e.contains("`nested_blocksize` Some(128) is not 256"),
        "{e}"
    );
}

#[test]
fn bnb4_unknown_quant_type_is_an_error_naming_the_tensor() {
    let t = bnb4_state(false);
    let e = quant_err(&with_state(
        &t,
        r#"{"quant_type": "nf5", "blocksize": 64, "dtype": "float32", "shape": [64, 64]}"#,
    ));
    assert!(
        e.contains(NF4_STATE) && e.contains("unknown bitsandbytes 4-bit quant_type \"nf5\""),
        "{e}"
    );
    // The JSON says fp4 under the nf4 key.
    let e = quant_err(&with_state(
        &t,
        r#"{"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [64, 64]}"#,
    ));
    assert!(
        e.contains(NF4_STATE) && e.contains("says quant_type \"fp4\""),
        "{e}"
    );
    // A quant state key of an unknown type: not silently read as a dense uint8 weight.
    let mut renamed = t.clone();
    let state = renamed.shift_remove(NF4_STATE).unwrap();
    renamed.insert("m.weight.quant_state.bitsandbytes__nf5".into(), state);
    let e = quant_err(&renamed);
    assert!(
        e.contains("m.weight.quant_state.bitsandbytes__nf5")
            && e.contains("unknown bitsandbytes 4-bit quant_type \"nf5\""),
        "{e}"
    );
    // Both an nf4 and an fp4 state.
    let mut both = t.clone();
    both.insert(
        "m.weight.quant_state.bitsandbytes__fp4".into(),
        t[NF4_STATE].clone(),
    );
    let e = quant_err(&both);
    assert!(
        e.contains("m.weight: holds both an nf4 and an fp4 quant state"),
        "{e}"
    );
    // Other fields: dtype, a missing field.
    let e = quant_err(&with_state(
        &t,
        r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "float8", "shape": [64, 64]}"#,
    ));
    assert!(
        e.contains(NF4_STATE) && e.contains("`dtype` \"float8\""),
        "{e}"
    );
    let e = quant_err(&with_state(
        &t,
        r#"{"quant_type": "nf4", "dtype": "float32", "shape": [64, 64]}"#,
    ));
    assert!(
        e.contains(NF4_STATE) && e.contains("has no `blocksize`"),
        "{e}"
    );
}

#[test]
fn bnb4_missing_state_tensors_are_errors_naming_them() {
    for (dq, key) in [
        (false, "m.weight.absmax"),
        (false, "m.weight.quant_map"),
        (true, "m.weight.absmax"),
        (true, "m.weight.nested_absmax"),
        (true, "m.weight.nested_quant_map"),
    ] {
        let mut t = bnb4_state(dq);
        t.shift_remove(key).unwrap();
        let e = quant_err(&t);
        assert_eq!(e, format!("missing tensor {key}"), "double quant {dq}");
    }
    let mut t = bnb4_state(false);
    t.insert(
        "m.weight.quant_map".into(),
        Tensor::zeros(15, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = quant_err(&t);
    assert!(
        e.contains("m.weight.quant_map: has 15 values, not 16"),
        "{e}"
    );
}

#[test]
fn bnb4_corrupt_quant_state_json_is_an_error_naming_it() {
    let t = bnb4_state(false);
    for bad in [
        "{\"quant_type\": \"nf4\", \"blocksize\": 64",
        "not json",
        "",
        "[1, 2]",
    ] {
        let e = quant_err(&with_state(&t, bad));
        assert!(
            e.contains(NF4_STATE)
                && (e.contains("is not a JSON quant state") || e.contains("has no `quant_type`")),
            "{bad:?}: {e}"
        );
    }
    // Bytes that are not UTF-8.
    let mut raw = t.clone();
    raw.insert(
        NF4_STATE.into(),
        Tensor::new(&[0xffu8, 0xfe, 0x7b][..], &Device::Cpu).unwrap(),
    );
    let e = quant_err(&raw);
    assert!(
        e.contains(NF4_STATE) && e.contains("is not a JSON quant state"),
        "{e}"
    );
    // The JSON bytes stored as another dtype.
    raw.insert(
        NF4_STATE.into(),
        Tensor::zeros(8, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = quant_err(&raw);
    assert!(e.contains(NF4_STATE) && e.contains("expected uint8"), "{e}");
}

#[test]
fn bnb8_scb_and_weight_disagreeing_are_errors_naming_the_tensor() {
    use peft::quant::bnb8::Bnb8Weight;
    let x: Vec<f32> = (0..32 * 16).map(|i| (i as f32 * 0.11).cos()).collect();
    let t: IndexMap<String, Tensor> = Bnb8Weight::quantize(&x, &[32, 16])
        .unwrap()
        .state_dict("m", &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    assert!(peft::quant::from_state_dict("m", &t).unwrap().is_some());
    let mut bad = t.clone();
    bad.insert(
        "m.SCB".into(),
        Tensor::zeros(31, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = quant_err(&bad);
    assert!(
        e.contains("m.SCB: expected float32 [32], got F32 [31]"),
        "{e}"
    );
    bad.insert(
        "m.SCB".into(),
        Tensor::zeros(32, DType::F16, &Device::Cpu).unwrap(),
    );
    let e = quant_err(&bad);
    assert!(
        e.contains("m.SCB: expected float32 [32], got F16 [32]"),
        "{e}"
    );
    bad.insert(
        "m.SCB".into(),
        Tensor::zeros((32, 1), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = quant_err(&bad);
    assert!(e.contains("m.SCB: expected float32 [32]"), "{e}");
    // A weight that is not a matrix, or not int8.
    let mut bad = t.clone();
    bad.insert(
        "m.weight".into(),
        Tensor::zeros(512, DType::U8, &Device::Cpu).unwrap(),
    );
    let e = quant_err(&bad);
    assert!(
        e.contains("m.weight: a bitsandbytes 8-bit weight has 2 dimensions, got [512]"),
        "{e}"
    );
    bad.insert(
        "m.weight".into(),
        Tensor::zeros((32, 16), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = quant_err(&bad);
    assert!(
        e.contains("m.weight: a bitsandbytes 8-bit weight is int8"),
        "{e}"
    );
    // weight_format: not "row", not a number.
    let mut bad = t;
    bad.insert(
        "m.weight_format".into(),
        Tensor::new(&[0u8, 1][..], &Device::Cpu).unwrap(),
    );
    let e = quant_err(&bad);
    assert!(e.contains("m.weight_format: [0, 1]"), "{e}");
}
