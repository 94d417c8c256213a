//! FourierFT parity with PEFT 0.21.2 on the fixtures of `fixtures/fourierft/` (written by `gen_fourierft.py`,
//! every spectrum random and perturbed): per-layer forward (the spectral locations drawn again from
//! `random_loc_seed` by torch's `randperm`, `n_frequency_pattern`, the whole spectrum, two active adapters,
//! GPT-2 Conv1D layers, a tiny Llama), disabled forward, merged weights (`W + ΔW`), unmerge, save → re-load,
//! and `peft merge` without a model.

use crate::common::*;
use crate::lora_parity::load_case;
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use peft::PeftConfig;
use peft::io::peft_key;
use peft::layer::registry;

const CASES: [&str; 5] = [
    "fourierft_conv1d",
    "fourierft_linear",
    "fourierft_llama",
    "fourierft_pattern",
    "fourierft_two_adapters",
];

layer_method_parity_tests!(
    "fourierft",
    CASES,
    "FOURIERFT",
    parity::MergeChecks {
        merged_bias: (1e-6, 1e-5),
        merged_forward: (1e-4, 1e-3),
        unmerged_bias: Some((1e-6, 1e-5)),
        unmerged_vs_base: (1e-5, 1e-4),
        ..Default::default()
    },
    |k| k.ends_with(".fourierft_spectrum")
);

#[test]
fn fourierft_missing_unexpected_and_misshapen_tensors_are_named() {
    let dir = fixtures_dir().join("fourierft/cases/fourierft_pattern");
    let c = load_case(&dir);
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin1"].base();
    let params = &split.modules["lin1"];
    let e = registry::build_adapter(config, "lin1", base, &IndexMap::new()).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::MissingKey(k) if k == "base_model.model.lin1.fourierft_spectrum"),
        "{e}"
    );
    let mut extra = params.clone();
    extra.insert(
        "fourierft_indices".into(),
        params["fourierft_spectrum"].clone(),
    );
    let e = registry::build_adapter(config, "lin1", base, &extra).unwrap_err();
    assert!(
        e.to_string()
            .contains("base_model.model.lin1.fourierft_indices"),
        "{e}"
    );
    // lin1 (24 -> 12) takes n_frequency 288 from the pattern: a spectrum of the default 40 is refused
    let mut wrong = params.clone();
    wrong.insert(
        "fourierft_spectrum".into(),
        Tensor::zeros(40, DType::F32, &Device::Cpu).unwrap(),
    );
    let e = registry::build_adapter(config, "lin1", base, &wrong).unwrap_err();
    assert!(
        matches!(&e, peft::PeftError::ShapeMismatch { name, expected, got } if name == &peft_key("lin1", "fourierft_spectrum") && expected == &[288] && got == &[40]),
        "{e}"
    );
    let PeftConfig::Fourierft(cfg) = config else {
        panic!("not FourierFT")
    };
    assert_eq!(cfg.n_frequency_for("lin1").unwrap(), 288);
    assert_eq!(cfg.n_frequency_for("lin0").unwrap(), 40);
}

#[test]
fn fourierft_bad_sizes_seeds_layers_and_fields_are_refused() {
    let dir = fixtures_dir().join("fourierft/cases/fourierft_linear");
    let c = load_case(&dir);
    let (_, config, _, _) = &c.adapters[0];
    let PeftConfig::Fourierft(cfg) = config else {
        panic!("not FourierFT")
    };
    let base = c.slots["lin0"].base(); // 16 -> 24: 384 entries
    let with = |f: &dyn Fn(&mut peft::config::FourierftConfig)| {
        let mut c = cfg.clone();
        f(&mut c);
        PeftConfig::from(c)
    };
    let mut rng = peft::PeftRng::new(0);
    assert!(registry::new_adapter(&with(&|c| c.n_frequency = 384), "lin0", base, &mut rng).is_ok());
    for (bad, needle) in [
        (with(&|c| c.n_frequency = 385), "the product is 384"),
        (with(&|c| c.n_frequency = 0), "positive integer"),
        (with(&|c| c.random_loc_seed = None), "random_loc_seed"),
    ] {
        let e = registry::new_adapter(&bad, "lin0", base, &mut rng).unwrap_err();
        assert!(
            matches!(e, peft::PeftError::InvalidConfig(_)) && e.to_string().contains(needle),
            "{e}"
        );
    }
    let emb = peft::BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let conv = peft::BaseLayer::conv2d(
        Tensor::zeros((4, 3, 3, 3), DType::F32, &Device::Cpu).unwrap(),
        None,
        Default::default(),
    )
    .unwrap();
    for (name, layer) in [("emb", &emb), ("conv", &conv)] {
        let e = registry::new_adapter(config, name, layer, &mut rng).unwrap_err();
        assert!(
            matches!(&e, peft::PeftError::Unsupported { field, .. } if field == "target_modules"),
            "{name}: {e}"
        );
    }
    for (bad, field) in [
        (r#"{"peft_type": "FOURIERFT", "bias": "all"}"#, "bias"),
        (
            r#"{"peft_type": "FOURIERFT", "bias": "fourier_only"}"#,
            "bias",
        ),
        (
            r#"{"peft_type": "FOURIERFT", "ifft2_norm": "ortho"}"#,
            "ifft2_norm",
        ),
    ] {
        match PeftConfig::from_json_str(bad).unwrap().validate() {
            Err(peft::PeftError::Unsupported { field: f, .. }) => assert_eq!(f, field, "{bad}"),
            other => panic!("{bad}: {other:?}"),
        }
    }
}

#[test]
fn fourierft_new_adapter_with_init_true_is_the_identity() {
    let dir = fixtures_dir().join("fourierft/cases/fourierft_linear");
    let c = load_case(&dir);
    let (_, config, _, _) = &c.adapters[0];
    let PeftConfig::Fourierft(cfg) = config else {
        panic!("not FourierFT")
    };
    let identity: PeftConfig = peft::config::FourierftConfig {
        init_weights: true,
        ..cfg.clone()
    }
    .into();
    parity::assert_new_adapter_is_identity(&dir, &c, &identity);
    // PEFT's default (init_weights = false) draws the spectrum from N(0, 1): not the identity
    let base = c.slots["lin0"].base();
    let a = registry::new_adapter(config, "lin0", base, &mut peft::PeftRng::new(1)).unwrap();
    let s = &a.tensors()[0].1;
    assert!(
        s.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );
}

#[test]
fn fourierft_wrapping_a_conv1d_saves_fan_in_fan_out_and_default_targets_are_peft_s() {
    let mut config = PeftConfig::from_json_str(r#"{"peft_type": "FOURIERFT"}"#).unwrap();
    let conv = peft::BaseLayer::conv1d(
        Tensor::zeros((4, 6), DType::F32, &Device::Cpu).unwrap(),
        None,
    )
    .unwrap();
    config.method_mut().note_targets(&[&conv]);
    assert!(config.method().fan_in_fan_out());
    let m = config.method();
    assert_eq!(
        m.default_target_modules("gpt2"),
        Some(peft::config::TargetModules::from(["mlp.c_proj"]))
    );
    assert_eq!(
        m.default_target_modules("llama"),
        Some(peft::config::TargetModules::from(["q_proj", "v_proj"]))
    );
}
