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
