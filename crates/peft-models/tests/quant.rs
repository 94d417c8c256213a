//! Tiny Llamas quantized by transformers + bitsandbytes 0.50.2 (4-bit NF4 / FP4, ± double quant), with and
//! without a PEFT LoRA adapter (fixtures/quant, written by gen_quant.py).

use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::config::{LoraConfig, LoraFields, PeftConfig, TargetFields};
use peft::quant::bnb4::Bnb4Weight;
use peft::{ForwardCtx, PeftModel};
use peft_models::llama::{ForwardInput, LlamaConfig, LlamaForCausalLM};
use peft_models::quantize::Quantize;
use peft_models::{LoadOptions, load_model, load_model_with, with_adapters};
use peft_test_support::{assert_close, max_diff};
use std::path::PathBuf;

const CASES: [&str; 4] = [
    "bnb4_llama_nf4",
    "bnb4_llama_nf4_dq",
    "bnb4_llama_fp4",
    "bnb8_llama",
];

/// A case of fixtures/quant/cases (shared by the quant_* test modules).
pub(crate) fn case_dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/quant/cases")
        .join(case)
}

/// A case's `io.safetensors`.
pub(crate) fn io(case: &str) -> IndexMap<String, Tensor> {
    candle_core::safetensors::load(case_dir(case).join("io.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

/// Eval logits of `ids`.
pub(crate) fn logits(model: &LlamaForCausalLM, ids: &Tensor) -> Tensor {
    model
        .forward(ForwardInput::ids(ids), &ForwardCtx::eval())
        .unwrap()
}

/// The quantized projections of a decoder layer.
pub(crate) const PROJ: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

#[test]
fn bnb4_checkpoints_give_transformers_logits_with_and_without_lora() {
    for case in CASES {
        let io = io(case);
        let ids = &io["input_ids"];
        let loaded = load_model(case_dir(case).join("base"), &Device::Cpu).unwrap();
        let m = &loaded.model;
        for p in PROJ {
            let slot = m.slot(&format!("model.layers.1.{p}")).unwrap();
            assert!(
                slot.base().quantized().is_some(),
                "{case}: {p} is not quantized"
            );
        }
        assert!(m.slot("lm_head").unwrap().base().quantized().is_none());
        assert_close(
            &format!("{case} base logits"),
            &logits(m, ids),
            &io["base_logits"],
            1e-4,
            1e-4,
        );
        let pm = with_adapters(
            loaded.model,
            &[case_dir(case).join("adapter")],
            &Device::Cpu,
        )
        .unwrap();
        assert_close(
            &format!("{case} LoRA logits"),
            &logits(pm.model(), ids),
            &io["lora_logits"],
            1e-4,
            1e-4,
        );
    }
}

#[test]
fn quantize_while_loading_matches_transformers_quantized_checkpoint() {
    for (case, kind, dq) in [
        ("bnb4_llama_nf4_dq", "nf4", true),
        ("bnb4_llama_fp4", "fp4", false),
    ] {
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = seen.clone();
        let options = LoadOptions {
            quantize: Some(Quantize::parse(kind, dq).unwrap()),
            progress: Some(peft_models::LoadProgress::new(move |done, total| {
                sink.lock().unwrap().push((done, total))
            })),
            ..Default::default()
        };
        let ours = load_model_with(case_dir(case).join("full"), &Device::Cpu, &options).unwrap();
        // One report per tensor of the file, counting up to the total.
        let n = peft::io::SafetensorsFile::open(case_dir(case).join("full/model.safetensors"))
            .unwrap()
            .names()
            .len();
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen, (1..=n).map(|d| (d, n)).collect::<Vec<_>>(), "{case}");
        let theirs = load_model(case_dir(case).join("base"), &Device::Cpu).unwrap();
        for l in 0..2 {
            for p in PROJ {
                let name = format!("model.layers.{l}.{p}");
                let weight = |m: &peft_models::LoadedModel| {
                    m.model
                        .slot(&name)
                        .unwrap()
                        .base()
                        .quantized()
                        .unwrap()
                        .clone()
                };
                let (a, b) = (weight(&ours), weight(&theirs));
                if let (
                    peft::quant::QuantizedWeight::Bnb8(a),
                    peft::quant::QuantizedWeight::Bnb8(b),
                ) = (&*a, &*b)
                {
                    assert_eq!(a, b, "{case}: {name}");
                    continue;
                }
                let (peft::quant::QuantizedWeight::Bnb4(a), peft::quant::QuantizedWeight::Bnb4(b)) =
                    (&*a, &*b)
                else {
                    panic!("{case}: {name} is not bitsandbytes 4-bit");
                };
                assert_eq!(a.packed, b.packed, "{case}: {name} packed codes");
                if !dq {
                    assert_eq!(a, b, "{case}: {name}");
                } else {
                    // The double-quant offset is a float32 mean; its last bit depends on the summation order.
                    let da = a.dequantize_f32();
                    let db = b.dequantize_f32();
                    let worst = da
                        .iter()
                        .zip(&db)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0f32, f32::max);
                    assert!(worst < 1e-6, "{case}: {name} dequantized differ by {worst}");
                }
            }
        }
        let io = io(case);
        assert_close(
            &format!("{case} base logits"),
            &logits(&ours.model, &io["input_ids"]),
            &io["base_logits"],
            1e-4,
            1e-4,
        );
        let e = load_model_with(case_dir(case).join("base"), &Device::Cpu, &options).unwrap_err();
        let e = chain(&e);
        assert!(
            e.contains("base: the checkpoint is already quantized (bnb"),
            "{e}"
        );
    }
}

/// An error with its causes, `: `-joined.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// The dense twin of a quantized checkpoint: every packed weight replaced by its dequantized f32 tensor.
fn dequantized_twin(case: &str) -> LlamaForCausalLM {
    let dir = case_dir(case).join("base");
    let m = peft_models::hf::load_hf_dir(&dir, DType::F32, &Device::Cpu).unwrap();
    let mut dense = IndexMap::new();
    for (k, t) in &m.tensors {
        if Bnb4Weight::is_stored(k, &m.tensors) {
            let w = Bnb4Weight::from_state_dict(k, &m.tensors).unwrap();
            dense.insert(k.clone(), w.dequantize(&Device::Cpu).unwrap());
        } else if !k.contains(".weight.") {
            dense.insert(k.clone(), t.clone());
        }
    }
    let mut config = m.config.clone();
    config
        .as_object_mut()
        .unwrap()
        .remove("quantization_config");
    LlamaForCausalLM::from_tensors(
        LlamaConfig::from_value(&config).unwrap(),
        dense,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn lora_gradients_over_a_quantized_base_equal_those_over_its_dequantized_twin() {
    let case = "bnb4_llama_nf4_dq";
    let ids = io(case)["input_ids"].clone();
    let config = || {
        PeftConfig::Lora(LoraConfig {
            lora: LoraFields {
                r: 2,
                init_lora_weights: peft::config::InitLoraWeights::Bool(false),
                ..Default::default()
            },
            targets: TargetFields::modules(["q_proj", "v_proj", "down_proj"]),
            ..Default::default()
        })
    };
    let quant = load_model(case_dir(case).join("base"), &Device::Cpu)
        .unwrap()
        .model;
    let q = PeftModel::get_peft_model(quant, config(), "default", 3).unwrap();
    let d = PeftModel::get_peft_model(dequantized_twin(case), config(), "default", 3).unwrap();
    let mut grads = Vec::new();
    for pm in [&q, &d] {
        let y = pm
            .model()
            .forward(ForwardInput::ids(&ids), &ForwardCtx::train(1, 0))
            .unwrap();
        let loss = y.sqr().unwrap().mean_all().unwrap();
        let g = loss.backward().unwrap();
        let vars = pm.trainable_vars();
        assert_eq!(vars.len(), 12);
        grads.push(
            vars.iter()
                .map(|(n, v)| (n.clone(), g.get(v).unwrap().clone()))
                .collect::<Vec<_>>(),
        );
    }
    for ((n, a), (_, b)) in grads[0].iter().zip(&grads[1]) {
        assert!(
            a.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                > 0.0,
            "{n}: zero gradient"
        );
        assert!(max_diff(a, b) < 1e-5, "{n}: {}", max_diff(a, b));
    }
}

#[test]
fn merging_into_a_bnb_checkpoint_writes_a_dense_model_with_the_adapters_logits() {
    for case in ["bnb4_llama_nf4_dq", "bnb8_llama"] {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let adapter =
            peft::merge::MergeAdapter::load(case_dir(case).join("adapter"), None, &Device::Cpu)
                .unwrap();
        let report = peft::merge::merge_model(
            &case_dir(case).join("base"),
            vec![adapter],
            &out,
            None,
            &mut |_, _, _| {},
        )
        .unwrap();
        assert_eq!(report.modules.len(), 14);
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        assert!(config.get("quantization_config").is_none());
        let merged =
            peft::io::read_safetensors(out.join("model.safetensors"), &Device::Cpu).unwrap();
        assert!(
            merged.keys().all(|k| !k.contains(".weight.")),
            "quant-state tensors left"
        );
        let w = &merged["model.layers.0.self_attn.q_proj.weight"];
        assert_eq!((w.dims(), w.dtype()), (&[64usize, 64][..], DType::F32));
        let loaded = load_model(&out, &Device::Cpu).unwrap();
        assert!(peft_models::quantize::summary(&loaded.model).is_none());
        let io = io(case);
        // The dense merge is exact (dequantized W + ΔW): the logits are the unmerged adapter's. PEFT's own bnb
        // merge re-quantizes and moves them by ~0.4.
        assert_close(
            &format!("{case} merged logits"),
            &logits(&loaded.model, &io["input_ids"]),
            &io["lora_logits"],
            1e-4,
            1e-4,
        );
    }
}

#[test]
fn merge_and_unload_over_bnb4_requantizes_like_peft() {
    for case in CASES {
        let io = io(case);
        let loaded = load_model(case_dir(case).join("base"), &Device::Cpu).unwrap();
        let pm = PeftModel::from_pretrained(
            loaded.model,
            case_dir(case).join("adapter"),
            "default",
            &Device::Cpu,
        )
        .unwrap();
        let merged = pm.merge_and_unload(None).unwrap();
        let slot = merged.slot("model.layers.0.mlp.down_proj").unwrap();
        assert!(
            slot.base().quantized().is_some(),
            "{case}: the merged layer stays quantized, as PEFT's"
        );
        let got = logits(&merged, &io["input_ids"]);
        // PEFT's merge re-quantizes W + ΔW; so does ours, with bitsandbytes' bytes. ΔW's own rounding can move
        // an element across a code boundary, so compare against PEFT's merged logits loosely and against the
        // exact (unmerged) logits to show the re-quantization loss is PEFT's.
        let d_peft = max_diff(&got, &io["merged_logits"]);
        let d_exact = max_diff(&got, &io["lora_logits"]);
        let d_peft_exact = max_diff(&io["merged_logits"], &io["lora_logits"]);
        eprintln!(
            "{case}: ours vs PEFT merged {d_peft:.2e}; PEFT merged vs unmerged {d_peft_exact:.3}; ours vs unmerged {d_exact:.3}"
        );
        assert!(
            d_peft < 1e-4,
            "{case}: merged logits differ from PEFT's by {d_peft} (PEFT's loss {d_peft_exact}, ours {d_exact})"
        );
    }
}

/// Every method that wraps a Linear, over a bitsandbytes 4-bit base and over its dequantized twin: the same
/// initialisation (same seed), so the same logits and gradients; merging and unmerging work on the quantized
/// base (re-quantizing, as PEFT's bnb layers do).
#[test]
fn every_linear_method_trains_over_a_quantized_base_as_over_its_dequantized_twin() {
    let case = "bnb4_llama_fp4";
    let ids = io(case)["input_ids"].clone();
    let configs = [
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj", "down_proj"], "init_lora_weights": false}"#,
        r#"{"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["v_proj", "up_proj"], "init_lora_weights": false, "use_dora": true}"#,
        r#"{"peft_type": "IA3", "target_modules": ["k_proj", "down_proj"], "feedforward_modules": ["down_proj"], "init_ia3_weights": false}"#,
        r#"{"peft_type": "VERA", "r": 4, "target_modules": ["q_proj", "o_proj"], "init_weights": false}"#,
        r#"{"peft_type": "ADALORA", "init_r": 4, "target_r": 2, "total_step": 10, "target_modules": ["q_proj"], "init_lora_weights": false}"#,
        r#"{"peft_type": "LOHA", "r": 2, "alpha": 4, "target_modules": ["q_proj", "up_proj"], "init_weights": false}"#,
        r#"{"peft_type": "LOKR", "r": 2, "alpha": 4, "target_modules": ["v_proj"], "init_weights": false}"#,
        r#"{"peft_type": "OFT", "r": 0, "oft_block_size": 8, "target_modules": ["q_proj"], "init_weights": false}"#,
        r#"{"peft_type": "BOFT", "boft_block_size": 8, "target_modules": ["q_proj", "gate_proj"], "init_weights": false}"#,
    ];
    for json in configs {
        let cfg = PeftConfig::from_json_str(json).unwrap_or_else(|e| panic!("{json}: {e}"));
        let what = format!("{:?}", cfg.peft_type());
        let quant = load_model(case_dir(case).join("base"), &Device::Cpu)
            .unwrap()
            .model;
        let mut q = PeftModel::get_peft_model(quant, cfg.clone(), "default", 11).unwrap();
        let d = PeftModel::get_peft_model(dequantized_twin(case), cfg, "default", 11).unwrap();
        let base = logits(
            &load_model(case_dir(case).join("base"), &Device::Cpu)
                .unwrap()
                .model,
            &ids,
        );
        let yq = logits(q.model(), &ids);
        let yd = logits(d.model(), &ids);
        assert!(
            max_diff(&yq, &base) > 1e-3,
            "{what}: the adapter changes nothing"
        );
        assert!(
            max_diff(&yq, &yd) < 1e-4,
            "{what}: logits {}",
            max_diff(&yq, &yd)
        );
        let mut grads = Vec::new();
        for pm in [&q, &d] {
            let y = pm
                .model()
                .forward(ForwardInput::ids(&ids), &ForwardCtx::train(1, 0))
                .unwrap();
            let g = y.sqr().unwrap().mean_all().unwrap().backward().unwrap();
            grads.push(
                pm.trainable_vars()
                    .iter()
                    .map(|(n, v)| (n.clone(), g.get(v).unwrap().clone()))
                    .collect::<Vec<_>>(),
            );
        }
        assert!(!grads[0].is_empty(), "{what}");
        for ((n, a), (_, b)) in grads[0].iter().zip(&grads[1]) {
            let scale = (b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64)
                .max(1e-3);
            assert!(
                max_diff(a, b) / scale < 1e-4,
                "{what}: {n}: {} (scale {scale})",
                max_diff(a, b)
            );
        }
        q.merge_adapter(None)
            .unwrap_or_else(|e| panic!("{what}: merge: {e}"));
        let merged = logits(q.model(), &ids);
        q.unmerge_adapter()
            .unwrap_or_else(|e| panic!("{what}: unmerge: {e}"));
        assert!(
            q.model()
                .slot("model.layers.0.self_attn.q_proj")
                .unwrap()
                .base()
                .quantized()
                .is_some()
        );
        assert!(
            merged
                .to_vec3::<f32>()
                .unwrap()
                .iter()
                .flatten()
                .flatten()
                .all(|v| v.is_finite()),
            "{what}"
        );
    }
}
