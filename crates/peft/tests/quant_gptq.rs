//! GPTQ and AWQ parity: the codecs against `fixtures/quant/cases/{gptq,awq}_codec.safetensors`, packed and
//! dequantized by gptqmodel 7.7.0 on the CPU (`fixtures/quant/gen_gptq.py`), and the errors on malformed tensors.

use crate::common::fixtures_dir;
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::quant::QuantizedWeight;
use peft::quant::awq::AwqWeight;
use peft::quant::gptq::{GptqFormat, GptqWeight};

/// The case names with their settings (metadata `cases`, JSON) and the tensors of a codec file.
fn codec(file: &str) -> (Vec<(String, serde_json::Value)>, IndexMap<String, Tensor>) {
    let path = fixtures_dir().join("quant/cases").join(file);
    let tensors: IndexMap<String, Tensor> = candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    let data = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&data).unwrap();
    let meta = meta.metadata().as_ref().unwrap();
    let cases: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&meta["cases"]).unwrap();
    let cases = cases.into_iter().collect();
    (cases, tensors)
}

/// The f16 bit patterns of a tensor.
fn f16_bits(t: &Tensor) -> Vec<u16> {
    t.to_dtype(DType::F16)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<half::f16>()
        .unwrap()
        .into_iter()
        .map(|v| v.to_bits())
        .collect()
}

/// `C.qweight`, … renamed to `m.qweight`, …, with `C.qzeros_v2` as `m.qzeros` for v2.
fn module(t: &IndexMap<String, Tensor>, c: &str, format: GptqFormat) -> IndexMap<String, Tensor> {
    let mut m = IndexMap::new();
    for s in ["qweight", "scales", "g_idx"] {
        if let Some(v) = t.get(&format!("{c}.{s}")) {
            m.insert(format!("m.{s}"), v.clone());
        }
    }
    let z = match format {
        GptqFormat::V1 => "qzeros",
        GptqFormat::V2 => "qzeros_v2",
    };
    m.insert("m.qzeros".into(), t[&format!("{c}.{z}")].clone());
    m
}

#[test]
fn gptq_dequantize_is_bit_exact_with_gptqmodel_in_both_formats() {
    let (cases, t) = codec("gptq_codec.safetensors");
    assert_eq!(cases.len(), 8);
    let mut bits_seen = std::collections::BTreeSet::new();
    for (c, meta) in &cases {
        let want = f16_bits(&t[&format!("{c}.dequantized")]);
        let dims = t[&format!("{c}.dequantized")].dims().to_vec();
        let mut decoded = Vec::new();
        for format in [GptqFormat::V1, GptqFormat::V2] {
            let tensors = module(&t, c, format);
            let w = GptqWeight::from_state_dict("m", &tensors, format)
                .unwrap_or_else(|e| panic!("{c} {format:?}: {e}"));
            assert_eq!(w.shape, dims, "{c}");
            assert_eq!(w.bits as u64, meta["bits"].as_u64().unwrap(), "{c}");
            bits_seen.insert(w.bits);
            let got = f16_bits(&w.dequantize(&Device::Cpu).unwrap());
            let bad = got.iter().zip(&want).filter(|(a, b)| a != b).count();
            assert_eq!(
                bad,
                0,
                "{c} {format:?}: {bad} of {} values differ",
                want.len()
            );
            // The banded path (any start, any length) gives the same values.
            let q = QuantizedWeight::Gptq(w.clone());
            let (start, len) = (dims[1] + 3, 2 * dims[1] + 5);
            let mut band = vec![0f32; len];
            q.dequantize_into(start, &mut band).unwrap();
            let whole = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let whole = whole.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(band, whole[start..start + len], "{c}");
            // Re-encoding in the same format writes gptqmodel's bytes.
            let sd: IndexMap<String, Tensor> = w
                .state_dict("m", format, &Device::Cpu)
                .unwrap()
                .into_iter()
                .collect();
            for k in ["m.qweight", "m.qzeros"] {
                assert_eq!(
                    sd[k].flatten_all().unwrap().to_vec1::<i32>().unwrap(),
                    tensors[k].flatten_all().unwrap().to_vec1::<i32>().unwrap(),
                    "{c} {format:?} {k}"
                );
            }
            decoded.push(w);
        }
        assert_eq!(decoded[0], decoded[1], "{c}: v1 and v2 decode alike");
        // Reading v1 zeros as v2 ones is wrong: the formats are not interchangeable.
        let wrong =
            GptqWeight::from_state_dict("m", &module(&t, c, GptqFormat::V1), GptqFormat::V2)
                .unwrap();
        assert_ne!(wrong.zeros, decoded[0].zeros, "{c}");
        // The generic detector reads GPTQ modules (v1) without a `weight` tensor.
        let (q, keys) = peft::quant::from_state_dict("m", &module(&t, c, GptqFormat::V1))
            .unwrap()
            .unwrap();
        assert_eq!(keys, ["m.qweight", "m.qzeros", "m.scales", "m.g_idx"]);
        assert!(
            matches!(&q, QuantizedWeight::Gptq(g) if g == &decoded[0]),
            "{c}"
        );
        assert_eq!(q.dtype(), DType::F16);
        assert!(q.requantize(&q.dequantize(&Device::Cpu).unwrap()).is_err());
    }
    assert_eq!(bits_seen.into_iter().collect::<Vec<_>>(), [2, 3, 4, 8]);
}

#[test]
fn gptq_desc_act_cases_have_non_monotone_g_idx_and_v1_borrows() {
    let (_, t) = codec("gptq_codec.safetensors");
    let g: Vec<i32> = t["b4_asym_g32_act.g_idx"].to_vec1().unwrap();
    assert!(g.windows(2).any(|w| w[1] < w[0]));
    // Row 3 of the asymmetric case is all positive: its zero points are 0, stored as -1 in v1 (a borrow).
    let w = GptqWeight::from_state_dict(
        "m",
        &module(&t, "b4_asym_g32_act", GptqFormat::V1),
        GptqFormat::V1,
    )
    .unwrap();
    assert!((0..w.groups()).all(|g| w.zeros[g * 64 + 3] == 0));
}

#[test]
fn awq_dequantize_is_bit_exact_with_gptqmodel() {
    let (cases, t) = codec("awq_codec.safetensors");
    assert_eq!(cases.len(), 3);
    for (c, meta) in &cases {
        let mut m = IndexMap::new();
        for s in ["qweight", "qzeros", "scales"] {
            m.insert(format!("m.{s}"), t[&format!("{c}.{s}")].clone());
        }
        let w = AwqWeight::from_state_dict("m", &m).unwrap_or_else(|e| panic!("{c}: {e}"));
        let dims = t[&format!("{c}.dequantized")].dims().to_vec();
        assert_eq!(w.shape, dims, "{c}");
        let gs = meta["group_size"].as_i64().unwrap();
        assert_eq!(
            w.group_size as i64,
            if gs == -1 { dims[1] as i64 } else { gs }
        );
        let want = f16_bits(&t[&format!("{c}.dequantized")]);
        let got = f16_bits(&w.dequantize(&Device::Cpu).unwrap());
        let bad = got.iter().zip(&want).filter(|(a, b)| a != b).count();
        assert_eq!(bad, 0, "{c}: {bad} of {} values differ", want.len());
        let sd: IndexMap<String, Tensor> = w
            .state_dict("m", &Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
        for k in ["m.qweight", "m.qzeros"] {
            assert_eq!(
                sd[k].flatten_all().unwrap().to_vec1::<i32>().unwrap(),
                m[k].flatten_all().unwrap().to_vec1::<i32>().unwrap(),
                "{c} {k}"
            );
        }
        let (q, keys) = peft::quant::from_state_dict("m", &m).unwrap().unwrap();
        assert_eq!(keys, ["m.qweight", "m.qzeros", "m.scales"]);
        assert!(matches!(&q, QuantizedWeight::Awq(a) if a == &w));
    }
}

fn err(r: peft::Result<impl std::fmt::Debug>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn malformed_gptq_and_awq_tensors_are_errors_naming_the_tensor() {
    let (_, t) = codec("gptq_codec.safetensors");
    let base = module(&t, "b4_asym_g32_act", GptqFormat::V1);
    let gptq = |edit: &dyn Fn(&mut IndexMap<String, Tensor>)| {
        let mut m = base.clone();
        edit(&mut m);
        err(GptqWeight::from_state_dict("m", &m, GptqFormat::V1))
    };
    // Truncated qweight (one row short): no bit width packs 128 inputs in 15 rows.
    let e = gptq(&|m| {
        let q = m["m.qweight"].narrow(0, 0, 15).unwrap();
        m.insert("m.qweight".into(), q);
    });
    assert!(
        e.contains("m.qweight") && e.contains("2, 3, 4 or 8 bits"),
        "{e}"
    );
    // qweight for other outputs than scales.
    let e = gptq(&|m| {
        let q = m["m.qweight"].narrow(1, 0, 32).unwrap();
        m.insert("m.qweight".into(), q);
    });
    assert!(e.contains("m.qweight"), "{e}");
    // qzeros with a group too few.
    let e = gptq(&|m| {
        let q = m["m.qzeros"].narrow(0, 0, 3).unwrap();
        m.insert("m.qzeros".into(), q);
    });
    assert!(e.contains("m.qzeros"), "{e}");
    // scales in float32.
    let e = gptq(&|m| {
        let s = m["m.scales"].to_dtype(DType::F32).unwrap();
        m.insert("m.scales".into(), s);
    });
    assert!(e.contains("m.scales: expected float16"), "{e}");
    // A group index past the last group.
    let e = gptq(&|m| {
        let mut g: Vec<i32> = m["m.g_idx"].to_vec1().unwrap();
        g[17] = 4;
        m.insert(
            "m.g_idx".into(),
            Tensor::new(g.as_slice(), &Device::Cpu).unwrap(),
        );
    });
    assert!(
        e.contains("m.g_idx: group 4 of input 17 is out of range (4 groups"),
        "{e}"
    );
    let e = gptq(&|m| {
        let mut g: Vec<i32> = m["m.g_idx"].to_vec1().unwrap();
        g[0] = -1;
        m.insert(
            "m.g_idx".into(),
            Tensor::new(g.as_slice(), &Device::Cpu).unwrap(),
        );
    });
    assert!(e.contains("m.g_idx: group -1 of input 0"), "{e}");
    // Packing 6 bits: qweight [in·6/32, out], qzeros [G, out·6/32].
    let e = gptq(&|m| {
        m.insert(
            "m.qweight".into(),
            Tensor::zeros((24, 64), DType::I32, &Device::Cpu).unwrap(),
        );
        m.insert(
            "m.qzeros".into(),
            Tensor::zeros((4, 12), DType::I32, &Device::Cpu).unwrap(),
        );
    });
    assert!(
        e.contains("m.qweight") && e.contains("not a packing of 2, 3, 4 or 8 bits"),
        "{e}"
    );
    // qweight as floats.
    let e = gptq(&|m| {
        let q = m["m.qweight"].to_dtype(DType::F32).unwrap();
        m.insert("m.qweight".into(), q);
    });
    assert!(e.contains("m.qweight: expected int32 words"), "{e}");
    let e = gptq(&|m| {
        m.shift_remove("m.scales");
    });
    assert!(e.contains("missing tensor m.scales"), "{e}");

    let (_, t) = codec("awq_codec.safetensors");
    let mut base = IndexMap::new();
    for s in ["qweight", "qzeros", "scales"] {
        base.insert(format!("m.{s}"), t[&format!("awq_g32.{s}")].clone());
    }
    let awq = |edit: &dyn Fn(&mut IndexMap<String, Tensor>)| {
        let mut m = base.clone();
        edit(&mut m);
        err(AwqWeight::from_state_dict("m", &m))
    };
    let e = awq(&|m| {
        let q = m["m.qweight"].narrow(1, 0, 7).unwrap();
        m.insert("m.qweight".into(), q);
    });
    assert!(e.contains("shape mismatch for m.qweight"), "{e}");
    let e = awq(&|m| {
        let q = m["m.qzeros"].narrow(0, 0, 3).unwrap();
        m.insert("m.qzeros".into(), q);
    });
    assert!(e.contains("shape mismatch for m.qzeros"), "{e}");
    let e = awq(&|m| {
        let q = m["m.qweight"].narrow(0, 0, 90).unwrap();
        m.insert("m.qweight".into(), q);
    });
    assert!(
        e.contains("m.scales: 4 groups do not divide the 90 inputs"),
        "{e}"
    );
    let e = awq(&|m| {
        let s = m["m.scales"].narrow(1, 0, 60).unwrap();
        m.insert("m.scales".into(), s);
    });
    assert!(e.contains("m.scales") && e.contains("multiple of 8"), "{e}");
}

#[test]
fn quantized_linear_on_gptq_and_awq_weights_matches_the_dequantized_matmul_and_its_input_gradient()
{
    use candle_core::Var;
    use std::sync::Arc;
    let (_, t) = codec("gptq_codec.safetensors");
    let g = GptqWeight::from_state_dict(
        "m",
        &module(&t, "b3_asym_g32", GptqFormat::V1),
        GptqFormat::V1,
    )
    .unwrap();
    let (_, t) = codec("awq_codec.safetensors");
    let mut m = IndexMap::new();
    for s in ["qweight", "qzeros", "scales"] {
        m.insert(format!("m.{s}"), t[&format!("awq_g32.{s}")].clone());
    }
    let a = AwqWeight::from_state_dict("m", &m).unwrap();
    for q in [QuantizedWeight::Gptq(g), QuantizedWeight::Awq(a)] {
        let (out, inp) = (q.shape()[0], q.shape()[1]);
        let wd = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let q = Arc::new(q);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, inp), &Device::Cpu).unwrap())
            .unwrap();
        let y = peft::quant::quant_linear(&x, &q, None).unwrap();
        let want = x.broadcast_matmul(&wd.t().unwrap()).unwrap();
        let d = peft_test_support::max_diff(&y, &want);
        assert!(d < 1e-5, "{}: {d}", q.describe());
        let gy = Tensor::randn(0f32, 1.0, (2, 3, out), &Device::Cpu).unwrap();
        let grads = (y * &gy).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = gy.broadcast_matmul(&wd).unwrap();
        let d = peft_test_support::max_diff(grads.get(&x).unwrap(), &dx);
        assert!(d < 1e-5, "{}: dx {d}", q.describe());
    }
}
