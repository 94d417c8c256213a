//! OSF parity with PEFT 0.21.2 on the fixtures of `fixtures/osf/` (written by `gen_osf.py`, every trained
//! factor perturbed): per-layer forward (an integer and a fractional `effective_rank`, a `rank_pattern`, a tiny
//! Llama), disabled forward, merged weights, save → re-load, `peft merge` without a model, the gradient
//! projections of PEFT's hooks, and the errors. PEFT cannot unmerge OSF (no `unmerged.safetensors`); here the
//! unmerge gives the base back.

use crate::common::*;
use crate::lora_parity::load_case;
use candle_core::{DType, Device, Tensor, Var};
use indexmap::IndexMap;
use peft::layer::registry;
use peft::{AdapterSlot, ForwardCtx, PeftError};

const CASES: [&str; 3] = ["osf_linear", "osf_llama", "osf_patterns"];

// The merged weights within f32's tolerances: PEFT's initial part `W − W_k` comes from a float32 SVD (its
// rounding, ~1e-6, is in PEFT's merged weights); here it is computed in f64.
layer_method_parity_tests!(
    "osf",
    CASES,
    "OSF",
    parity::MergeChecks {
        merged_weight: (1e-5, 1e-4),
        ..Default::default()
    },
    |k| k.contains(".osf_svd_params."),
    (1e-5, 1e-4)
);

fn case_dir(name: &str) -> std::path::PathBuf {
    fixtures_dir().join("osf/cases").join(name)
}

#[test]
fn trained_ranks_follow_effective_rank_and_rank_pattern() {
    // mlp: lin0 16 -> 24 (min 16), lin1 24 -> 12 (min 12)
    for (name, want) in [
        ("osf_linear", [16 - 3, 12 - 3]),
        ("osf_patterns", [16 - 4, 12 - 5]),
    ] {
        let c = load_case(&case_dir(name));
        let (_, _, split, _) = &c.adapters[0];
        for (m, w) in ["lin0", "lin1"].iter().zip(want) {
            assert_eq!(
                split.modules[*m]["osf_svd_params.S_low"].dims(),
                [w],
                "{name} {m}"
            );
        }
    }
}

/// PEFT's hooks: `U_low`'s gradient loses its part along the frozen `U_high`, `V_low`'s along `V_high`, so a
/// step keeps the trained factors orthogonal to the frozen directions.
#[test]
fn gradients_are_projected_off_the_frozen_directions() {
    let c = load_case(&case_dir("osf_linear"));
    let slot: &AdapterSlot = &c.slots["lin0"];
    let a = slot.adapter("default").unwrap();
    let vars: IndexMap<String, Var> = a.vars().into_iter().collect();
    let io = load(&case_dir("osf_linear").join("io.safetensors"));
    let x = &io["input.lin0"];
    let y = slot.forward(x, &ForwardCtx::train(0, 0)).unwrap();
    let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let base = slot.base();
    let w = base.weight().unwrap();
    let split = peft::tuners::osf::layer::decompose(&w, 3).unwrap();
    for (k, frozen, left) in [
        ("osf_svd_params.U_low", &split.u_high, true),
        ("osf_svd_params.V_low", &split.v_high, false),
    ] {
        let g = grads.get(vars[k].as_tensor()).unwrap();
        let p = a
            .gradient_projection(k)
            .expect("projected")
            .apply(g)
            .unwrap();
        // what is left has no component along the frozen directions, and the rest is unchanged
        let along = if left {
            frozen.t().unwrap().matmul(&p).unwrap()
        } else {
            p.matmul(&frozen.t().unwrap()).unwrap()
        };
        let along_max = max_abs(&along);
        assert!(along_max < 1e-4 * max_abs(g).max(1.0), "{k}: {along_max}");
        let removed = (g - &p).unwrap();
        assert!(
            max_abs(&removed) > 1e-6,
            "{k}: the projection removed something"
        );
    }
    assert!(a.gradient_projection("osf_svd_params.S_low").is_none());
}

fn max_abs(t: &Tensor) -> f64 {
    f64::from(
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
    )
}

#[test]
fn osf_bad_tensors_layers_and_stacking_are_errors() {
    let c = load_case(&case_dir("osf_linear"));
    let (_, config, split, _) = &c.adapters[0];
    let base = c.slots["lin0"].base();
    let params = &split.modules["lin0"];
    let build = |p: &IndexMap<String, Tensor>| {
        registry::build_adapter_with_shared(
            config,
            "lin0",
            base,
            p,
            &registry::SharedTensors::new(),
        )
    };
    build(params).expect("the fixture builds");
    let mut half = params.clone();
    half.shift_remove("osf_svd_params.V_low");
    assert!(matches!(build(&half).unwrap_err(), PeftError::MissingKey(k) if k.ends_with("V_low")));
    let mut extra = params.clone();
    extra.insert(
        "osf_svd_params.W".into(),
        params["osf_svd_params.S_low"].clone(),
    );
    assert!(matches!(
        build(&extra).unwrap_err(),
        PeftError::UnexpectedKeys(_)
    ));
    let mut wrong = params.clone();
    wrong.insert(
        "osf_svd_params.S_low".into(),
        Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
    );
    assert!(matches!(
        build(&wrong).unwrap_err(),
        PeftError::ShapeMismatch { .. }
    ));
    let emb = peft::BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &Device::Cpu).unwrap())
        .unwrap();
    let e = registry::build_adapter_with_shared(
        config,
        "lin0",
        &emb,
        params,
        &registry::SharedTensors::new(),
    )
    .unwrap_err();
    assert!(
        matches!(&e, PeftError::Unsupported { field, .. } if field == "target_modules"),
        "{e}"
    );
    // two active OSF adapters: PEFT applies only the first; refused here
    let mut slot = AdapterSlot::new("lin0", base.clone());
    slot.add_adapter("a", build(params).unwrap()).unwrap();
    slot.add_adapter("b", build(params).unwrap()).unwrap();
    slot.set_active(&["a", "b"]);
    let io = load(&case_dir("osf_linear").join("io.safetensors"));
    assert!(
        slot.forward(&io["input.lin0"], &ForwardCtx::eval())
            .is_err()
    );
}
