//! PEFT's `hotswap_adapter`: an adapter's weights replaced in place by another adapter directory's.

use candle_core::{Device, Tensor};
use peft::peft_model::PeftModel;
use peft::{ForwardCtx, PeftRng};
use peft_models::llama::{ForwardInput, LlamaConfig, LlamaForCausalLM};
use peft_test_support::max_diff;
use std::path::PathBuf;

fn lora(case: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/lora/cases")
        .join(case)
}

fn base() -> LlamaForCausalLM {
    let dir = lora("llama_two_adapters").join("base_hf");
    let config = LlamaConfig::from_file(dir.join("config.json")).unwrap();
    let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
        .unwrap()
        .into_iter()
        .collect();
    LlamaForCausalLM::from_tensors(config, tensors, &Device::Cpu).unwrap()
}

fn logits(pm: &PeftModel<LlamaForCausalLM>, ids: &Tensor) -> Tensor {
    pm.model()
        .forward(ForwardInput::ids(ids), &ForwardCtx::inference())
        .unwrap()
}

/// Swapping a LoRA adapter that targets every linear layer for one on q/v (another rank, other modules left
/// with zero weights) and then for one of rank 2 with another alpha gives exactly the logits of loading each
/// directly; a second adapter is untouched, and mixed batches use the swapped weights.
#[test]
fn hotswap_gives_the_logits_of_loading_the_new_adapter() {
    let all = lora("llama_all_linear").join("adapter");
    let qv = lora("llama_two_adapters").join("adapter");
    let other = lora("llama_two_adapters").join("adapter/other");
    let mut rng = PeftRng::new(2);
    let v: Vec<u32> = (0..3 * 7).map(|_| 3 + rng.below(60) as u32).collect();
    let ids = Tensor::from_vec(v, (3, 7), &Device::Cpu).unwrap();
    let fresh = |dir: &PathBuf| {
        logits(
            &PeftModel::from_pretrained(base(), dir, "default", &Device::Cpu).unwrap(),
            &ids,
        )
    };
    let (want_all, want_qv, want_other) = (fresh(&all), fresh(&qv), fresh(&other));
    assert!(max_diff(&want_qv, &want_all) > 1e-3 && max_diff(&want_qv, &want_other) > 1e-3);

    let mut pm = PeftModel::from_pretrained(base(), &all, "default", &Device::Cpu).unwrap();
    pm.load_adapter(&other, "keep", &Device::Cpu).unwrap();
    pm.set_adapter(&["default"]).unwrap();
    assert_eq!(max_diff(&logits(&pm, &ids), &want_all), 0.0);
    pm.hotswap_adapter(&qv, "default", &Device::Cpu).unwrap();
    assert_eq!(max_diff(&logits(&pm, &ids), &want_qv), 0.0);
    pm.hotswap_adapter(&other, "default", &Device::Cpu).unwrap();
    assert_eq!(max_diff(&logits(&pm, &ids), &want_other), 0.0);
    let r = pm.configs()["default"].to_json_value();
    assert_eq!(
        (r["r"].as_u64(), r["lora_alpha"].as_f64()),
        (Some(2), Some(6.0))
    );
    pm.hotswap_adapter(&qv, "default", &Device::Cpu).unwrap();
    pm.set_adapter(&["keep"]).unwrap();
    assert_eq!(
        max_diff(&logits(&pm, &ids), &want_other),
        0.0,
        "the other adapter changed"
    );
    let names = ["keep", "default", "__base__"];
    let mixed = pm
        .model()
        .forward(
            ForwardInput::ids(&ids),
            &ForwardCtx::inference().with_adapter_names(&names),
        )
        .unwrap();
    let row = |t: &Tensor, i: usize| t.narrow(0, i, 1).unwrap();
    assert!(max_diff(&row(&mixed, 0), &row(&want_other, 0)) <= 1e-5);
    assert!(max_diff(&row(&mixed, 1), &row(&want_qv, 1)) <= 1e-5);
}

/// What PEFT refuses is refused, and leaves the model as it was: modules the adapter does not target
/// (unexpected keys), configs that differ in `use_dora`, another method, unknown names, merged adapters.
#[test]
fn hotswap_refusals_leave_the_model_unchanged() {
    let qv = lora("llama_two_adapters").join("adapter");
    let ids = Tensor::from_vec((3..10u32).collect::<Vec<_>>(), (1, 7), &Device::Cpu).unwrap();
    let mut pm = PeftModel::from_pretrained(base(), &qv, "default", &Device::Cpu).unwrap();
    let before = logits(&pm, &ids);
    let err = |pm: &mut PeftModel<LlamaForCausalLM>, dir: PathBuf, name: &str| {
        pm.hotswap_adapter(&dir, name, &Device::Cpu)
            .unwrap_err()
            .to_string()
    };
    let e = err(&mut pm, lora("llama_all_linear").join("adapter"), "default");
    assert!(e.contains("unexpected") && e.contains("k_proj"), "{e}");
    let e = err(&mut pm, lora("llama_dora").join("adapter"), "default");
    assert!(e.contains("use_dora"), "{e}");
    let ia3 = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/ia3/cases/ia3_llama/adapter");
    let e = err(&mut pm, ia3, "default");
    assert!(e.contains("Incompatible PEFT types"), "{e}");
    let e = err(&mut pm, qv.clone(), "nope");
    assert!(e.contains("nope"), "{e}");
    assert_eq!(max_diff(&logits(&pm, &ids), &before), 0.0);
    pm.merge_adapter(None).unwrap();
    let e = err(&mut pm, qv, "default");
    assert!(e.contains("merged"), "{e}");
}
