//! LoRA initialisation (statistically: torch's random values cannot be matched) and training-time dropout.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use peft::config::InitLoraWeights;
use peft::tuners::lora::layer::{LoraAdapter, LoraOptions};
use peft::{Adapter, AdapterSlot, BaseLayer, ForwardCtx, PeftRng};

fn opts(r: usize, init: InitLoraWeights) -> LoraOptions {
    LoraOptions {
        r,
        alpha: 2.0 * r as f64,
        use_rslora: false,
        use_dora: false,
        lora_bias: false,
        dropout: 0.0,
        init,
    }
}

fn stats(t: &Tensor) -> (f64, f64, f64, f64) {
    let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    let n = v.len() as f64;
    let mean = v.iter().map(|x| *x as f64).sum::<f64>() / n;
    let std = (v.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / n).sqrt();
    let lo = v.iter().cloned().fold(f32::INFINITY, f32::min) as f64;
    let hi = v.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    (mean, std, lo, hi)
}

fn linear(i: usize, o: usize) -> BaseLayer {
    let w = PeftRng::new(0)
        .normal_tensor((o, i), 0.0, 1.0, DType::F32, &Device::Cpu)
        .unwrap();
    BaseLayer::linear(w, Some(Tensor::zeros(o, DType::F32, &Device::Cpu).unwrap())).unwrap()
}

fn is_zero(t: &Tensor) -> bool {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        == 0.0
}

#[test]
fn default_init_is_kaiming_uniform_a_and_zero_b() {
    let (i, o, r) = (256, 128, 64);
    let a = LoraAdapter::new(
        &linear(i, o),
        opts(r, InitLoraWeights::Bool(true)),
        &mut PeftRng::new(1),
    )
    .unwrap();
    // kaiming_uniform(a=√5) on [r, in]: U(-1/√in, 1/√in): mean 0, std bound/√3
    let bound = 1.0 / (i as f64).sqrt();
    let (mean, std, lo, hi) = stats(a.lora_a());
    assert!(lo >= -bound && hi <= bound, "bounds {lo} {hi} vs {bound}");
    assert!(mean.abs() < 0.05 * bound, "mean {mean}");
    assert!(
        (std - bound / 3f64.sqrt()).abs() < 0.03 * bound,
        "std {std}"
    );
    assert!(
        hi > 0.95 * bound && lo < -0.95 * bound,
        "the whole range is used"
    );
    assert!(is_zero(a.lora_b()));
}

#[test]
fn gaussian_init_has_std_one_over_r() {
    let (i, o, r) = (256, 64, 8);
    let a = LoraAdapter::new(
        &linear(i, o),
        opts(r, InitLoraWeights::Method("gaussian".into())),
        &mut PeftRng::new(2),
    )
    .unwrap();
    let (mean, std, _, _) = stats(a.lora_a());
    assert!(mean.abs() < 0.01, "mean {mean}");
    assert!((std - 1.0 / r as f64).abs() < 0.005, "std {std}");
    assert!(is_zero(a.lora_b()));
}

#[test]
fn false_init_randomises_b_like_torch_linear() {
    let (i, o, r) = (64, 512, 16);
    let a = LoraAdapter::new(
        &linear(i, o),
        opts(r, InitLoraWeights::Bool(false)),
        &mut PeftRng::new(3),
    )
    .unwrap();
    let bound = 1.0 / (r as f64).sqrt();
    let (mean, std, lo, hi) = stats(a.lora_b());
    assert!(lo >= -bound && hi <= bound);
    assert!(mean.abs() < 0.05 * bound);
    assert!(
        (std - bound / 3f64.sqrt()).abs() < 0.05 * bound,
        "std {std}"
    );
}

#[test]
fn embedding_init_is_zero_a_and_normal_b() {
    let w = PeftRng::new(0)
        .normal_tensor((1000, 64), 0.0, 1.0, DType::F32, &Device::Cpu)
        .unwrap();
    let base = BaseLayer::embedding(w).unwrap();
    let a = LoraAdapter::new(
        &base,
        opts(16, InitLoraWeights::Bool(true)),
        &mut PeftRng::new(4),
    )
    .unwrap();
    assert!(is_zero(a.lora_a()));
    let (mean, std, _, _) = stats(a.lora_b());
    assert!(
        mean.abs() < 0.05 && (std - 1.0).abs() < 0.05,
        "{mean} {std}"
    );
}

#[test]
fn dora_magnitude_starts_at_the_weight_norm() {
    let base = linear(32, 16);
    let mut o = opts(4, InitLoraWeights::Bool(true));
    o.use_dora = true;
    let a = LoraAdapter::new(&base, o, &mut PeftRng::new(5)).unwrap();
    let norms = base
        .weight()
        .unwrap()
        .sqr()
        .unwrap()
        .sum(1)
        .unwrap()
        .sqrt()
        .unwrap();
    assert_close("magnitude", a.magnitude().unwrap(), &norms, 1e-6, 1e-6);
    // ... so that a fresh DoRA adapter is the identity
    let mut slot = AdapterSlot::new("l", base.clone());
    slot.add_adapter("default", Box::new(a)).unwrap();
    let x = PeftRng::new(6)
        .normal_tensor((3, 32), 0.0, 1.0, DType::F32, &Device::Cpu)
        .unwrap();
    assert_close(
        "identity",
        &slot.forward(&x, &ForwardCtx::eval()).unwrap(),
        &base.forward(&x).unwrap(),
        1e-5,
        1e-5,
    );
}

#[test]
fn inits_are_reproducible_from_the_seed() {
    let base = linear(32, 16);
    let a = LoraAdapter::new(
        &base,
        opts(4, InitLoraWeights::Bool(true)),
        &mut PeftRng::new(9),
    )
    .unwrap();
    let b = LoraAdapter::new(
        &base,
        opts(4, InitLoraWeights::Bool(true)),
        &mut PeftRng::new(9),
    )
    .unwrap();
    let c = LoraAdapter::new(
        &base,
        opts(4, InitLoraWeights::Bool(true)),
        &mut PeftRng::new(10),
    )
    .unwrap();
    assert_close("same seed", a.lora_a(), b.lora_a(), 0.0, 0.0);
    assert!(crate::common::max_diff(a.lora_a(), c.lora_a()) > 0.0);
}

#[test]
fn dropout_is_applied_in_training_only_and_is_seeded() {
    let (i, o, r) = (64, 8, 4);
    let base = linear(i, o);
    let mut op = opts(r, InitLoraWeights::Bool(false));
    op.dropout = 0.5;
    let ad = LoraAdapter::new(&base, op, &mut PeftRng::new(11)).unwrap();
    let (la, lb, s) = (ad.lora_a().clone(), ad.lora_b().clone(), ad.scaling());
    let mut slot = AdapterSlot::new("l", base.clone());
    slot.add_adapter("default", Box::new(ad)).unwrap();
    let x = PeftRng::new(12)
        .normal_tensor((5, i), 0.0, 1.0, DType::F32, &Device::Cpu)
        .unwrap();
    let no_drop = (base.forward(&x).unwrap()
        + (x.matmul(&la.t().unwrap())
            .unwrap()
            .matmul(&lb.t().unwrap())
            .unwrap()
            * s)
            .unwrap())
    .unwrap();
    assert_close(
        "eval has no dropout",
        &slot.forward(&x, &ForwardCtx::eval()).unwrap(),
        &no_drop,
        1e-5,
        1e-5,
    );
    let t1 = slot.forward(&x, &ForwardCtx::train(7, 0)).unwrap();
    let t1b = slot.forward(&x, &ForwardCtx::train(7, 0)).unwrap();
    let t2 = slot.forward(&x, &ForwardCtx::train(7, 1)).unwrap();
    assert_close("same seed and step, same mask", &t1, &t1b, 0.0, 0.0);
    assert!(max_diff(&t1, &t2) > 1e-3, "a new step draws a new mask");
    assert!(max_diff(&t1, &no_drop) > 1e-3, "training drops");
    // The mask is the one the context's generator draws: recompute it and check the output exactly.
    let mask = ForwardCtx::train(7, 0)
        .rng("l", "default", "lora_dropout")
        .dropout_mask((5, i), 0.5, &Device::Cpu)
        .unwrap();
    let xd = (&x * &mask).unwrap();
    let expected = (base.forward(&x).unwrap()
        + (xd
            .matmul(&la.t().unwrap())
            .unwrap()
            .matmul(&lb.t().unwrap())
            .unwrap()
            * s)
            .unwrap())
    .unwrap();
    assert_close(
        "dropout(x) feeds the adapter only",
        &t1,
        &expected,
        1e-5,
        1e-5,
    );
}

#[test]
fn adapters_are_created_in_f32_and_report_it() {
    let base = linear(8, 4);
    let a = LoraAdapter::new(
        &base,
        opts(2, InitLoraWeights::Bool(true)),
        &mut PeftRng::new(0),
    )
    .unwrap();
    assert_eq!(a.saved_dtype(), DType::F32);
    assert!(a.vars().iter().all(|(_, v)| v.dtype() == DType::F32));
}

#[test]
fn orthogonal_init_is_the_identity_with_both_factors_trained() {
    // PEFT's orthogonal_init: A from the even rows of an orthogonal Q, B from the odd ones, so B·A = 0 exactly
    // (up to rounding) while both factors are nonzero, each entry N(0, 1)·Q / 10 (std √(1/r)·… ≈ 1/10 over a row).
    let base = linear(64, 48);
    let init = InitLoraWeights::Method("orthogonal".into());
    let a = LoraAdapter::new(&base, opts(8, init.clone()), &mut PeftRng::new(11)).unwrap();
    let t: std::collections::HashMap<String, Tensor> = a.tensors().into_iter().collect();
    let (ta, tb) = (&t["lora_A.weight"], &t["lora_B.weight"]);
    assert_eq!(
        (ta.dims(), tb.dims()),
        (&[8usize, 64][..], &[48usize, 8][..])
    );
    let ba = tb.matmul(ta).unwrap();
    let big = ba
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(big < 1e-5, "B·A = {big}");
    for (name, x) in [("A", ta), ("B", tb)] {
        let (mean, std, _, _) = stats(x);
        // each entry is a sum of r/2 = 4 products N(0,1)·q with Σq² over half a row of Q ≈ 1/2: std ≈ √(1/2)/10
        assert!(
            mean.abs() < 0.02 && (0.04..0.11).contains(&std),
            "{name}: mean {mean} std {std}"
        );
    }
    // Rows of A (columns of B) come from different rows of one orthogonal matrix: A's row space is r/2-dim.
    let aat = ta.matmul(&ta.t().unwrap()).unwrap();
    assert!(!is_zero(&aat));
    // Odd ranks and non-Linear layers are refused as PEFT refuses them.
    let e = LoraAdapter::new(&base, opts(3, init.clone()), &mut PeftRng::new(0)).unwrap_err();
    assert!(e.to_string().contains("rank to be even"), "{e}");
    let emb =
        BaseLayer::embedding(Tensor::ones((10, 4), DType::F32, &Device::Cpu).unwrap()).unwrap();
    let e = LoraAdapter::new(&emb, opts(2, init), &mut PeftRng::new(0)).unwrap_err();
    assert!(e.to_string().contains("Linear layers only"), "{e}");
    let c = peft::PeftConfig::from_json_str(
        r#"{"peft_type": "LORA", "r": 5, "init_lora_weights": "orthogonal", "target_modules": ["q"]}"#,
    )
    .unwrap();
    assert!(c.validate().unwrap_err().to_string().contains("even"));
}
