//! Half-precision frozen bases (`LoadOptions::dtype`): the tiny Llama fixtures loaded in bf16 / f16 hold their
//! dense weights in that dtype, compute in f32, and give the logits, the LoRA gradients and the merge of the
//! f32 model whose weights are rounded to that dtype (up to f32 rounding), within the rounding's own effect of
//! the plain f32 model.

use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::config::{LoraConfig, LoraFields, TargetFields, TargetModules};
use peft::host::AdapterHost;
use peft::peft_model::PeftModel;
use peft::tuners::lora::config::InitLoraWeights;
use peft::{ForwardCtx, PeftConfig};
use peft_models::llama::{ForwardInput, LlamaConfig, LlamaForCausalLM};
use peft_models::{LoadOptions, load_model_with};
use peft_test_support::max_diff;
use std::path::PathBuf;

const CASES: [&str; 6] = [
    "llama",
    "llama_gqa",
    "llama3_rope",
    "mistral",
    "qwen2",
    "smollm2_tied",
];

/// f32 rounding of the same products in another order (bands, `gemm` blocking), relative to the logits.
const F32_TOL: f64 = 1e-4;

fn case_dir(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/models/cases")
        .join(case)
}

fn tensors(case: &str) -> IndexMap<String, Tensor> {
    let path = case_dir(case).join("model.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

fn config(case: &str) -> LlamaConfig {
    LlamaConfig::from_file(case_dir(case).join("config.json")).unwrap()
}

/// The f32 model.
fn f32_model(case: &str) -> LlamaForCausalLM {
    LlamaForCausalLM::from_tensors(config(case), tensors(case), &Device::Cpu).unwrap()
}

/// The f32 model with every weight rounded to `dtype` (and back to f32): what a `dtype` base must compute.
fn rounded_model(case: &str, dtype: DType) -> LlamaForCausalLM {
    let t = tensors(case)
        .into_iter()
        .map(|(k, t)| {
            let r = t.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
            (k, r)
        })
        .collect();
    LlamaForCausalLM::from_tensors(config(case), t, &Device::Cpu).unwrap()
}

/// The model loaded through `load_model_with` with `LoadOptions::dtype`.
fn half_model(case: &str, dtype: DType) -> LlamaForCausalLM {
    let options = LoadOptions {
        dtype: Some(dtype),
        ..Default::default()
    };
    load_model_with(case_dir(case), &Device::Cpu, &options)
        .unwrap()
        .model
}

fn io(case: &str) -> IndexMap<String, Tensor> {
    candle_core::safetensors::load(case_dir(case).join("io.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect()
}

fn logits(model: &LlamaForCausalLM, io: &IndexMap<String, Tensor>, variant: &str) -> Tensor {
    let ids = io[&format!("{variant}.input_ids")]
        .to_dtype(DType::U32)
        .unwrap();
    let mut input = ForwardInput::ids(&ids);
    input.attention_mask = io.get(&format!("{variant}.attention_mask"));
    input.position_ids = io.get(&format!("{variant}.position_ids"));
    model.forward(input, &ForwardCtx::eval()).unwrap()
}

fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
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

/// Bytes of the frozen base: every slot's dense weight and bias (a tied `lm_head` counted once) and the norms.
fn base_bytes(model: &LlamaForCausalLM) -> (usize, usize) {
    let mut dense = 0;
    for slot in model.slots() {
        if slot.name() == "lm_head" && model.config().tie_word_embeddings {
            continue;
        }
        let base = slot.base();
        let w = base.dense_weight().expect("a dense weight");
        dense += w.elem_count() * w.dtype().size_in_bytes();
        if let Some(b) = base.bias() {
            dense += b.elem_count() * b.dtype().size_in_bytes();
        }
    }
    let norms = model
        .named_tensors()
        .iter()
        .map(|(_, t)| t.elem_count() * t.dtype().size_in_bytes())
        .sum();
    (dense, norms)
}

#[test]
fn half_base_logits_equal_the_rounded_f32_model() {
    for dtype in [DType::BF16, DType::F16] {
        for case in CASES {
            let what = format!("{case} {dtype:?}");
            let half = half_model(case, dtype);
            let (rounded, full) = (rounded_model(case, dtype), f32_model(case));
            assert_eq!(half.weight_dtype(), dtype, "{what}");
            assert_eq!(half.dtype(), DType::F32, "{what}: activations");
            for slot in half.slots() {
                assert_eq!(slot.base().dtype(), dtype, "{what}: {}", slot.name());
            }
            if half.config().tie_word_embeddings {
                let (e, h) = (
                    half.slot("model.embed_tokens").unwrap(),
                    half.slot("lm_head").unwrap(),
                );
                let (e, h) = (
                    e.base().dense_weight().unwrap(),
                    h.base().dense_weight().unwrap(),
                );
                assert_eq!(
                    e.id(),
                    h.id(),
                    "{what}: lm_head stays tied to the embedding"
                );
            }
            for (name, t) in half.named_tensors() {
                assert_eq!(t.dtype(), DType::F32, "{what}: norm {name}");
            }
            // Half the bytes for the dense weights; the f32 norms are all that is left over.
            let ((hd, hn), (fd, fn_)) = (base_bytes(&half), base_bytes(&full));
            assert_eq!(2 * hd, fd, "{what}: dense weight bytes");
            assert_eq!(hn, fn_, "{what}: norm bytes");
            assert!(
                ((hd + hn) as f64) < 0.5 * (fd + fn_) as f64 + fn_ as f64,
                "{what}: {} vs {} bytes",
                hd + hn,
                fd + fn_
            );
            let io = io(case);
            for variant in ["nomask", "right", "left"] {
                let got = logits(&half, &io, variant);
                assert_eq!(got.dtype(), DType::F32);
                let want = logits(&rounded, &io, variant);
                let exact = logits(&full, &io, variant);
                let scale = 1.0 + max_abs(&want);
                let d = max_diff(&got, &want);
                assert!(
                    d <= F32_TOL * scale,
                    "{what}/{variant}: |half − rounded f32| {d:.2e} (scale {scale:.2})"
                );
                // Against the f32 model: the effect of rounding the weights alone (measured on the rounded
                // model) bounds ours, up to f32 rounding; and it is not zero (the weights are half).
                let rounding = max_diff(&want, &exact);
                let d32 = max_diff(&got, &exact);
                assert!(
                    d32 <= rounding + F32_TOL * scale && d32 > 0.0,
                    "{what}/{variant}: |half − f32| {d32:.2e}, weight rounding alone {rounding:.2e}"
                );
                // And that effect is of the dtype's unit roundoff, relative to the logits: 2⁻⁹ (bf16), 2⁻¹¹
                // (f16), amplified by at most ×64 through the layers of these tiny models.
                let u = if dtype == DType::BF16 {
                    f64::powi(2.0, -9)
                } else {
                    f64::powi(2.0, -11)
                };
                assert!(
                    d32 <= 64.0 * u * scale,
                    "{what}/{variant}: |half − f32| {d32:.2e} vs unit roundoff {u:.1e} × {scale:.2}"
                );
                eprintln!("{what}/{variant}: |half − rounded| {d:.1e}, |half − f32| {d32:.1e}");
            }
        }
    }
}

fn lora_config(targets: &[&str]) -> PeftConfig {
    PeftConfig::Lora(LoraConfig {
        lora: LoraFields {
            r: 4,
            lora_alpha: 8.0,
            init_lora_weights: InitLoraWeights::Bool(false),
            ..Default::default()
        },
        targets: TargetFields {
            target_modules: Some(TargetModules::List(
                targets.iter().map(|s| s.to_string()).collect(),
            )),
            ..Default::default()
        },
        ..Default::default()
    })
}

/// The loss of the `right` batch and its gradients for every trainable variable, by name.
fn lora_loss_and_grads(
    pm: &PeftModel<LlamaForCausalLM>,
    io: &IndexMap<String, Tensor>,
) -> (f32, Vec<(String, Tensor, Tensor)>) {
    let ids = io["right.input_ids"].to_dtype(DType::U32).unwrap();
    let mask = &io["right.attention_mask"];
    let logits = pm
        .model()
        .forward(
            ForwardInput::ids(&ids).with_attention_mask(mask),
            &ForwardCtx::train(1, 0),
        )
        .unwrap();
    let (b, l, v) = logits.dims3().unwrap();
    let inputs = logits
        .narrow(1, 0, l - 1)
        .unwrap()
        .reshape((b * (l - 1), v))
        .unwrap();
    let targets = ids.narrow(1, 1, l - 1).unwrap().flatten_all().unwrap();
    let loss = candle_nn::loss::cross_entropy(&inputs, &targets).unwrap();
    let grads = loss.backward().unwrap();
    let out = pm
        .trainable_vars()
        .into_iter()
        .map(|(name, var)| {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient"))
                .clone();
            (name, var.as_tensor().clone(), g)
        })
        .collect();
    (loss.to_scalar().unwrap(), out)
}

#[test]
fn lora_on_a_half_base_trains_f32_adapters_with_the_rounded_models_gradients_and_merges() {
    // q/v and the (tied) lm_head and embedding: the half linear in both directions, the half embedding.
    let targets = ["q_proj", "v_proj", "lm_head", "embed_tokens"];
    for case in ["smollm2_tied", "qwen2"] {
        let io = io(case);
        let dtype = DType::BF16;
        let mut half = PeftModel::new(half_model(case, dtype), 0);
        half.add_adapter("default", lora_config(&targets)).unwrap();
        let mut rounded = PeftModel::new(rounded_model(case, dtype), 0);
        rounded
            .add_adapter("default", lora_config(&targets))
            .unwrap();
        let (loss_h, grads_h) = lora_loss_and_grads(&half, &io);
        let (loss_r, grads_r) = lora_loss_and_grads(&rounded, &io);
        assert!(
            (loss_h - loss_r).abs() <= 1e-5 * (1.0 + loss_r.abs()),
            "{case}: loss {loss_h} vs {loss_r}"
        );
        assert_eq!(grads_h.len(), grads_r.len());
        assert!(!grads_h.is_empty());
        for ((name, p, g), (name_r, p_r, g_r)) in grads_h.iter().zip(&grads_r) {
            assert_eq!(name, name_r);
            assert_eq!(p.dtype(), DType::F32, "{case}: {name} parameter");
            assert_eq!(g.dtype(), DType::F32, "{case}: {name} gradient");
            assert_eq!(
                max_diff(p, p_r),
                0.0,
                "{case}: {name}: the same initialisation"
            );
            let scale = max_abs(g_r);
            let d = max_diff(g, g_r);
            assert!(
                scale > 0.0 && d <= F32_TOL * scale,
                "{case}: {name}: gradient |diff| {d:.2e} of {scale:.2e}"
            );
        }
        // merge_and_unload: the delta computed in f32 and rounded once into the half weights, as PEFT does.
        // The f32 model merges the same way (a tied pair takes both deltas in its one matrix), so the merged
        // logits differ by the rounding of W + ΔW to bf16 alone: at most ×64 bf16's unit roundoff 2⁻⁹,
        // relative to the logits, as for the base above.
        let merged = half.merge_and_unload(None).unwrap();
        let merged_r = rounded.merge_and_unload(None).unwrap();
        for slot in merged.slots() {
            assert_eq!(slot.base().dtype(), dtype, "{case}: merged {}", slot.name());
            assert_eq!(slot.adapters().count(), 0);
        }
        let (after, want) = (
            logits(&merged, &io, "right"),
            logits(&merged_r, &io, "right"),
        );
        let scale = 1.0 + max_abs(&want);
        let d = max_diff(&after, &want);
        assert!(
            d > 0.0 && d <= 64.0 * f64::powi(2.0, -9) * scale,
            "{case}: merged half vs merged f32 {d:.2e} (scale {scale:.2})"
        );
        eprintln!("{case}: merged half vs merged f32 {d:.1e} (scale {scale:.2})");
    }
}

#[test]
fn half_dtype_refuses_quantization_and_other_dtypes() {
    let options = LoadOptions {
        dtype: Some(DType::BF16),
        quantize: Some(peft_models::quantize::Quantize::parse("nf4", false).unwrap()),
        ..Default::default()
    };
    let e = load_model_with(case_dir("llama"), &Device::Cpu, &options).unwrap_err();
    assert!(e.to_string().contains("--dtype bf16"), "{e}");
    let options = LoadOptions {
        dtype: Some(DType::F64),
        ..Default::default()
    };
    let e = load_model_with(case_dir("llama"), &Device::Cpu, &options).unwrap_err();
    assert!(e.to_string().contains("f32, bf16 or f16"), "{e}");
    // A checkpoint saved quantized keeps its own storage.
    let bnb = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/quant/cases/bnb4_llama_nf4/base");
    let options = LoadOptions {
        dtype: Some(DType::F16),
        ..Default::default()
    };
    let e = load_model_with(&bnb, &Device::Cpu, &options).unwrap_err();
    assert!(
        e.to_string().contains("saved quantized") && e.to_string().contains("--dtype f16"),
        "{e}"
    );
    // f32 is the default: the same model as without the option.
    let options = LoadOptions {
        dtype: Some(DType::F32),
        ..Default::default()
    };
    let m = load_model_with(case_dir("llama"), &Device::Cpu, &options)
        .unwrap()
        .model;
    assert_eq!(m.weight_dtype(), DType::F32);
    let io = io("llama");
    assert_eq!(
        max_diff(
            &logits(&m, &io, "nomask"),
            &logits(&f32_model("llama"), &io, "nomask")
        ),
        0.0
    );
}
