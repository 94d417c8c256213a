//! PiSSA and OLoRA on a tiny Llama (`fixtures/lora/rewrite_init/*_llama`, written by
//! `fixtures/lora/gen_rewrite_init.py`): `get_peft_model` rewrites the base to PEFT's residual and keeps the
//! logits, the perturbed ("trained") adapter gives PEFT's logits, `save_pretrained_converted` writes PEFT's
//! LoRA of the original base (config and products), which gives PEFT's logits on the original base.

use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::host::AdapterHost;
use peft::{ForwardCtx, PeftConfig, PeftModel};
use peft_models::llama::{ForwardInput, LlamaConfig, LlamaForCausalLM};
use peft_test_support::assert_close;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/lora/rewrite_init")
}

fn load_st(path: &Path) -> IndexMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .into_iter()
        .collect()
}

fn base(dir: &Path) -> LlamaForCausalLM {
    let config = LlamaConfig::from_file(dir.join("base_hf/config.json")).unwrap();
    LlamaForCausalLM::from_tensors(
        config,
        load_st(&dir.join("base_hf/model.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
}

fn logits(pm: &PeftModel<LlamaForCausalLM>, ids: &Tensor) -> Tensor {
    pm.model()
        .forward(ForwardInput::ids(ids), &ForwardCtx::eval())
        .unwrap()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn pissa_and_olora_on_a_tiny_llama_give_peft_residuals_logits_and_converted_lora() {
    let mut checked = 0;
    for case in ["olora_llama", "pissa_llama", "pissa_rslora_llama"] {
        let dir = root().join(case);
        let meta = json(&dir.join("case.json"));
        let mut kwargs = meta["lora_config_kwargs"].clone();
        kwargs["peft_type"] = "LORA".into();
        kwargs["lora_dropout"] = 0.0.into();
        kwargs["task_type"] = "CAUSAL_LM".into();
        let config = PeftConfig::from_json_value(kwargs).unwrap();
        let io = load_st(&dir.join("io.safetensors"));
        let init = load_st(&dir.join("init.safetensors"));
        let ids = io["model_input"].to_dtype(DType::U32).unwrap();

        let pm = PeftModel::get_peft_model(base(&dir), config, "default", 0).unwrap();
        assert_close(
            &format!("{case}: init"),
            &logits(&pm, &ids),
            &io["logits_init"],
            1e-4,
            1e-4,
        );
        let targets: Vec<String> = meta["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap().to_string())
            .collect();
        for slot in pm.model().slots() {
            if targets.iter().any(|t| t == slot.name()) {
                let want = &init[&format!("W_res.{}", slot.name())];
                assert_close(
                    &format!("{case}: {} residual", slot.name()),
                    &slot.base().weight().unwrap(),
                    want,
                    1e-5,
                    1e-4,
                );
            }
        }
        let tmp = tempfile::tempdir().unwrap();
        let initial = tmp.path().join("initial");
        pm.save_pretrained(&initial).unwrap();
        // "Training": PEFT's perturbed factors set into the adapter's variables.
        for (name, var) in pm.trainable_vars() {
            let (m, which) = name.rsplit_once(".lora_").unwrap();
            let key = format!("trained_{}.{m}", &which[..1]);
            var.set(&init[&key]).unwrap();
        }
        assert_close(
            &format!("{case}: trained"),
            &logits(&pm, &ids),
            &io["logits_trained"],
            1e-4,
            1e-4,
        );
        let out = tmp.path().join("as_lora");
        pm.save_pretrained_converted(&out, &initial).unwrap();
        assert_eq!(
            json(&initial.join("adapter_config.json"))["init_lora_weights"],
            true,
            "{case}: the initial config is rewritten as PEFT does"
        );
        let (mine, theirs) = (
            json(&out.join("adapter_config.json")),
            json(&dir.join("converted/adapter_config.json")),
        );
        for k in [
            "r",
            "lora_alpha",
            "rank_pattern",
            "alpha_pattern",
            "init_lora_weights",
            "use_rslora",
        ] {
            let (a, b) = (&mine[k], &theirs[k]);
            let same = match (a.as_f64(), b.as_f64()) {
                (Some(x), Some(y)) => (x - y).abs() < 1e-9,
                _ => a == b,
            };
            assert!(same, "{case}: {k}: {a} vs PEFT {b}");
        }
        let (ours, peft) = (
            load_st(&out.join("adapter_model.safetensors")),
            load_st(&dir.join("converted/adapter_model.safetensors")),
        );
        assert_eq!(ours.len(), peft.len(), "{case}");
        for (k, a) in &peft {
            if let Some(m) = k.strip_suffix(".lora_A.weight") {
                let b = &peft[&format!("{m}.lora_B.weight")];
                let mine = ours[&format!("{m}.lora_B.weight")]
                    .matmul(&ours[k])
                    .unwrap();
                assert_close(
                    &format!("{case}: {m}"),
                    &mine,
                    &b.matmul(a).unwrap(),
                    1e-5,
                    1e-4,
                );
            }
        }
        // PEFT's trained file (config still naming the init) on the original base: the init runs again.
        let again =
            PeftModel::from_pretrained(base(&dir), dir.join("trained"), "default", &Device::Cpu)
                .unwrap();
        assert_close(
            &format!("{case}: trained/ reloaded"),
            &logits(&again, &ids),
            &io["logits_trained_reloaded"],
            1e-4,
            1e-4,
        );
        let lora = PeftModel::from_pretrained(base(&dir), &out, "default", &Device::Cpu).unwrap();
        assert_close(
            &format!("{case}: converted"),
            &logits(&lora, &ids),
            &io["logits_converted"],
            1e-4,
            1e-4,
        );
        // The initial adapter (now `init_lora_weights: true`) loads on the original base as a plain LoRA: the
        // model then adds B₀A₀ to W, so its logits are not the base's.
        let plain =
            PeftModel::from_pretrained(base(&dir), &initial, "default", &Device::Cpu).unwrap();
        let moved = peft_test_support::max_diff(&logits(&plain, &ids), &io["logits_base"]);
        assert!(moved > 1e-3, "{case}: {moved}");
        checked += 1;
    }
    assert_eq!(checked, 3);
}

#[test]
fn loading_a_file_whose_config_names_pissa_rewrites_the_base_as_peft_does() {
    // PEFT's from_pretrained runs the init of the file's config before loading the tensors, so an adapter
    // saved with `init_lora_weights: "pissa"` on the original base gives W_res + B·A.
    let dir = root().join("pissa_llama");
    let io = load_st(&dir.join("io.safetensors"));
    let ids = io["model_input"].to_dtype(DType::U32).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let ad = tmp.path().join("pissa");
    std::fs::create_dir(&ad).unwrap();
    std::fs::copy(
        dir.join("initial/adapter_model.safetensors"),
        ad.join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut cfg = json(&dir.join("initial/adapter_config.json"));
    cfg["init_lora_weights"] = "pissa".into();
    std::fs::write(ad.join("adapter_config.json"), cfg.to_string()).unwrap();
    let pm = PeftModel::from_pretrained(base(&dir), &ad, "default", &Device::Cpu).unwrap();
    // The file holds PEFT's initial factors, so W_res + B₀A₀ = W: the base's logits.
    assert_close(
        "pissa reload",
        &logits(&pm, &ids),
        &io["logits_base"],
        1e-4,
        1e-4,
    );
    let plain =
        PeftModel::from_pretrained(base(&dir), dir.join("initial"), "default", &Device::Cpu)
            .unwrap();
    let moved = peft_test_support::max_diff(&logits(&plain, &ids), &io["logits_base"]);
    assert!(
        moved > 1e-3,
        "without the rewrite the logits move ({moved})"
    );
}
