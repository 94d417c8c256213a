//! Every GGUF block type against gguf-py 0.19 and transformers + PEFT (fixtures/quant/cases/gguf_blocks, written
//! by fixtures/quant/gen_gguf.py): a tiny hidden-256 Llama whose 14 decoder projections hold Q4_0, Q4_1, Q5_0,
//! Q5_1, Q8_0 (quantized by gguf-py) and Q2_K … Q6_K (quantized by llama.cpp's `ggml_quantize_chunk`), q/k rows
//! permuted as llama.cpp stores them, token_embd Q4_K. Per tensor, our dequantization equals gguf-py's
//! `quants.dequantize` (un-permuted); the logits with and without a PEFT LoRA equal PEFT's on those weights,
//! both with the projections kept in their blocks and with `dequantize_gguf`.

use crate::quant::logits;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use indexmap::IndexMap;
use peft::quant::QuantizedWeight;
use peft_models::{LoadOptions, load_model_with, with_adapters};
use peft_test_support::{assert_close, max_diff};
use std::path::PathBuf;

fn case_dir() -> PathBuf {
    crate::quant::case_dir("gguf_blocks")
}

fn load_st(file: &str) -> IndexMap<String, Tensor> {
    candle_core::safetensors::load(case_dir().join(file), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

/// The block type of each projection, as gen_gguf.py's TYPES.
const TYPES: [[(&str, GgmlDType); 7]; 2] = [
    [
        ("self_attn.q_proj", GgmlDType::Q4K),
        ("self_attn.k_proj", GgmlDType::Q6K),
        ("self_attn.v_proj", GgmlDType::Q2K),
        ("self_attn.o_proj", GgmlDType::Q4_0),
        ("mlp.gate_proj", GgmlDType::Q3K),
        ("mlp.up_proj", GgmlDType::Q5K),
        ("mlp.down_proj", GgmlDType::Q4_1),
    ],
    [
        ("self_attn.q_proj", GgmlDType::Q5K),
        ("self_attn.k_proj", GgmlDType::Q3K),
        ("self_attn.v_proj", GgmlDType::Q5_1),
        ("self_attn.o_proj", GgmlDType::Q8_0),
        ("mlp.gate_proj", GgmlDType::Q2K),
        ("mlp.up_proj", GgmlDType::Q6K),
        ("mlp.down_proj", GgmlDType::Q5_0),
    ],
];

/// (max |a - b|, number of elements whose bits differ).
fn diff(a: &Tensor, b: &Tensor) -> (f32, usize) {
    assert_eq!(a.dims(), b.dims());
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    a.iter().zip(&b).fold((0f32, 0usize), |(m, n), (x, y)| {
        (
            m.max((x - y).abs()),
            n + usize::from(x.to_bits() != y.to_bits()),
        )
    })
}

#[test]
fn gguf_block_types_dequantize_as_gguf_py_and_give_pefts_logits() {
    let want = load_st("dequant.safetensors");
    let io = load_st("io.safetensors");
    let ids = &io["input_ids"];
    let path = case_dir().join("model.gguf");
    let adapter = [case_dir().join("adapter")];

    // Everything through the dense loader (candle's QTensor dequantization, then un-permuted).
    let dense = peft_models::gguf::load_gguf(&path, &Device::Cpu).unwrap();
    assert_eq!(dense.tensors.len(), want.len());
    for (name, w) in &want {
        let (d, bits) = diff(&dense.tensors[name], w);
        assert!(
            d <= 1e-6,
            "load_gguf {name}: {d} from gguf-py ({bits} elements differ)"
        );
        assert_eq!(bits, 0, "load_gguf {name}: max diff {d}");
    }

    let mut report = Vec::new();
    for dequantize_gguf in [false, true] {
        let options = LoadOptions {
            dequantize_gguf,
            ..Default::default()
        };
        let loaded = load_model_with(&path, &Device::Cpu, &options).unwrap();
        let m = &loaded.model;
        for (l, layer) in TYPES.iter().enumerate() {
            for &(p, dt) in layer {
                let name = format!("model.layers.{l}.{p}");
                let base = m.slot(&name).unwrap().base();
                match (base.quantized().map(|q| &**q), dequantize_gguf) {
                    (Some(QuantizedWeight::Gguf(g)), false) => {
                        assert_eq!(g.ggml_dtype, dt, "{name}");
                        assert_eq!(
                            g.row_perm.is_some(),
                            p.ends_with("q_proj") || p.ends_with("k_proj"),
                            "{name}"
                        );
                    }
                    (None, true) => {}
                    (q, _) => panic!(
                        "{name} (dequantize_gguf {dequantize_gguf}): {:?}",
                        q.map(|q| q.shape())
                    ),
                }
                let (d, bits) = diff(&base.weight().unwrap(), &want[&format!("{name}.weight")]);
                if !dequantize_gguf {
                    report.push(format!(
                        "{name} {dt:?}: max diff {d:e}, {bits} elements differ"
                    ));
                }
                assert!(
                    d <= 1e-6,
                    "{name} {dt:?}: {d} from gguf-py ({bits} elements differ)"
                );
                assert_eq!(bits, 0, "{name} {dt:?}: max diff {d}");
            }
        }
        assert!(m.slot("lm_head").unwrap().base().quantized().is_none());
        let base_logits = logits(m, ids);
        let pm = with_adapters(loaded.model, &adapter, &Device::Cpu).unwrap();
        let lora_logits = logits(pm.model(), ids);
        let (db, dl) = (
            max_diff(&base_logits, &io["base_logits"]),
            max_diff(&lora_logits, &io["lora_logits"]),
        );
        // Against the float64 forwards: float32's own error, ours and PEFT's.
        let exact = |t: &Tensor, k: &str| {
            let e = &io[k];
            max_diff(&t.to_dtype(candle_core::DType::F64).unwrap(), e)
        };
        report.push(format!(
            "dequantize_gguf {dequantize_gguf}: base logits {db:.2e}, LoRA logits {dl:.2e} from PEFT; \
             from float64: ours {:.2e} / {:.2e}, PEFT's {:.2e} / {:.2e}",
            exact(&base_logits, "base_logits_f64"),
            exact(&lora_logits, "lora_logits_f64"),
            exact(&io["base_logits"], "base_logits_f64"),
            exact(&io["lora_logits"], "lora_logits_f64"),
        ));
        // As quant.rs: 1e-4 absolute plus 1e-4 relative (the LoRA logits reach ±14 after two layers of large
        // perturbed deltas; f32 summation order alone moves them by ~1e-4, 1e-5 relative).
        for (what, got, want) in [
            ("base", &base_logits, &io["base_logits"]),
            ("LoRA", &lora_logits, &io["lora_logits"]),
        ] {
            assert_close(
                &format!("dequantize_gguf {dequantize_gguf}: {what} logits"),
                got,
                want,
                1e-4,
                1e-4,
            );
        }
        assert!(
            max_diff(&lora_logits, &base_logits) > 1.0,
            "the adapter changes nothing"
        );
    }
    eprintln!("{}", report.join("\n"));
}
