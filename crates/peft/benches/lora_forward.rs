//! LoRA forward benchmarks at `in = out = 2048`, 512 tokens, `r = 16`, f32 on the CPU.
//!
//! Two modes in one binary:
//!
//! - default (criterion): `cargo bench -p peft --bench lora_forward` measures the plain linear (the
//!   [`BaseLayer`] forward), the slot with one unmerged LoRA adapter, and the slot after `merge`.
//! - ratio: `PEFT_BENCH_RATIO=1 cargo bench -p peft --bench lora_forward` (or pass `--ratio` to the built
//!   binary) runs warm-up calls, then `N` rounds of (plain, LoRA unmerged, merged, LoRA through the
//!   training-path candle ops), each round in a random order, and prints the median and minimum of each
//!   and the median of the per-round ratios to the plain linear. Sequential criterion groups drift on a
//!   shared machine; ratios of calls taken back to back do not.
//!   `PEFT_BENCH_N` sets `N` (default 200). The last line is JSON, read by `scripts/bench_compare.sh`.
//!
//! The acceptance bar is LoRA/plain ≤ 1.10 (theory: `1 + r(in+out)/(in·out)` = 1.016).

use candle_core::{DType, Device, Tensor};
use criterion::{Criterion, black_box};
use peft::config::InitLoraWeights;
use peft::tuners::lora::layer::{LoraAdapter, LoraOptions};
use peft::{AdapterSlot, BaseLayer, ForwardCtx, PeftRng};
use std::time::{Duration, Instant};

const IN: usize = 2048;
const OUT: usize = 2048;
const TOKENS: usize = 512;
const R: usize = 16;
const ALPHA: f64 = 32.0;

/// The three layers under test and their input.
struct Setup {
    x: Tensor,
    plain: BaseLayer,
    unmerged: AdapterSlot,
    merged: AdapterSlot,
}

fn setup() -> Setup {
    let dev = Device::Cpu;
    let mut rng = PeftRng::new(0);
    let bound = 1.0 / (IN as f64).sqrt();
    let w = rng
        .uniform_tensor((OUT, IN), -bound, bound, DType::F32, &dev)
        .unwrap();
    let b = rng
        .uniform_tensor(OUT, -bound, bound, DType::F32, &dev)
        .unwrap();
    let x = rng
        .normal_tensor((TOKENS, IN), 0.0, 1.0, DType::F32, &dev)
        .unwrap();
    let plain = BaseLayer::linear(w, Some(b)).unwrap();
    let opts = LoraOptions {
        r: R,
        alpha: ALPHA,
        use_rslora: false,
        use_dora: false,
        lora_bias: false,
        dropout: 0.0,
        init: InitLoraWeights::Bool(false),
    };
    let adapter = || LoraAdapter::new(&plain, opts.clone(), &mut PeftRng::new(1)).unwrap();
    let mut unmerged = AdapterSlot::new("lin", plain.clone());
    unmerged
        .add_adapter("default", Box::new(adapter()))
        .unwrap();
    let mut merged = AdapterSlot::new("lin", plain.clone());
    merged.add_adapter("default", Box::new(adapter())).unwrap();
    merged.merge(None).unwrap();
    Setup {
        x,
        plain,
        unmerged,
        merged,
    }
}

fn criterion_benches(c: &mut Criterion) {
    let s = setup();
    let ctx = ForwardCtx::eval();
    let mut g = c.benchmark_group("lora_forward_2048x2048_t512_r16_f32");
    g.bench_function("plain_linear", |bch| {
        bch.iter(|| s.plain.forward(black_box(&s.x)).unwrap())
    });
    g.bench_function("lora_unmerged", |bch| {
        bch.iter(|| s.unmerged.forward(black_box(&s.x), &ctx).unwrap())
    });
    g.bench_function("lora_merged", |bch| {
        bch.iter(|| s.merged.forward(black_box(&s.x), &ctx).unwrap())
    });
    g.finish();
}

/// Milliseconds one call of `f` takes, its output dropped inside the timing.
fn time_ms(f: impl FnOnce() -> Tensor) -> f64 {
    let t = Instant::now();
    let y = f();
    drop(black_box(y));
    t.elapsed().as_secs_f64() * 1e3
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        0.5 * (s[n / 2 - 1] + s[n / 2])
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn ratio_mode() {
    let n: usize = std::env::var("PEFT_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let s = setup();
    let eval = ForwardCtx::eval();
    // Training mode with dropout 0 computes the same numbers through the differentiable candle ops: the
    // unmerged forward as it was before the in-place kernel, timed in the same rounds for comparison.
    let train = ForwardCtx::train(0, 0);
    type Variant<'a> = (&'static str, &'static str, Box<dyn Fn() -> Tensor + 'a>);
    let variants: Vec<Variant<'_>> = vec![
        (
            "plain",
            "plain linear",
            Box::new(|| s.plain.forward(&s.x).unwrap()),
        ),
        (
            "lora",
            "LoRA unmerged",
            Box::new(|| s.unmerged.forward(&s.x, &eval).unwrap()),
        ),
        (
            "merged",
            "LoRA merged",
            Box::new(|| s.merged.forward(&s.x, &eval).unwrap()),
        ),
        (
            "lora_candle",
            "LoRA candle ops",
            Box::new(|| s.unmerged.forward(&s.x, &train).unwrap()),
        ),
    ];

    // All variants must give the same result (up to rounding): a cheap guard against timing a no-op.
    let want = (variants[1].2)();
    for (key, _, f) in &variants[2..] {
        let diff = (f() - &want).unwrap().abs().unwrap().max_all().unwrap();
        let diff = diff.to_scalar::<f32>().unwrap();
        assert!(
            diff < 1e-3,
            "{key} differs from the unmerged LoRA output by {diff}"
        );
    }

    for _ in 0..10 {
        for (_, _, f) in &variants {
            time_ms(f);
        }
    }
    // One round times every variant once, in a fresh random order (seeded), so that no variant always
    // follows the same other one (a predecessor's allocations and cache state affect the next call).
    let k = variants.len();
    let mut t: Vec<Vec<f64>> = vec![Vec::with_capacity(n); k];
    let mut order_rng = PeftRng::new(2);
    let mut order: Vec<usize> = (0..k).collect();
    for _ in 0..n {
        for j in (1..k).rev() {
            order.swap(j, order_rng.below(j as u64 + 1) as usize);
        }
        for &v in &order {
            t[v].push(time_ms(&variants[v].2));
        }
    }
    let ratio = |v: usize| -> f64 {
        let r: Vec<f64> = t[v].iter().zip(&t[0]).map(|(a, p)| a / p).collect();
        median(&r)
    };
    let threads = candle_core::utils::get_num_threads();
    let theory = 1.0 + (R * (IN + OUT)) as f64 / (IN * OUT) as f64;
    println!(
        "peft (candle) LoRA forward, Linear({IN},{OUT})+bias, x [{TOKENS},{IN}] f32, r={R}; \
         {n} interleaved rounds, {threads} threads"
    );
    println!(
        "{:<16} {:>10} {:>10} {:>14}",
        "", "median ms", "min ms", "ratio to plain"
    );
    for (v, (_, name, _)) in variants.iter().enumerate() {
        println!(
            "{name:<16} {:>10.3} {:>10.3} {:>14.4}",
            median(&t[v]),
            min(&t[v]),
            ratio(v)
        );
    }
    println!(
        "(ratio: median of the per-round ratios; bar for LoRA unmerged 1.10, theory {theory:.4}; \
         'candle ops' is the training-path computation, dropout 0)"
    );
    let mut json = format!("{{\"impl\":\"rust\",\"n\":{n},\"threads\":{threads}");
    for (v, (key, _, _)) in variants.iter().enumerate() {
        json += &format!(
            ",\"{key}_median_ms\":{:.4},\"{key}_min_ms\":{:.4}",
            median(&t[v]),
            min(&t[v])
        );
        if v > 0 {
            json += &format!(",\"{key}_ratio_median\":{:.4}", ratio(v));
        }
    }
    println!("{json}}}");
}

fn main() {
    let ratio = std::env::var("PEFT_BENCH_RATIO").is_ok_and(|v| v == "1")
        || std::env::args().any(|a| a == "--ratio");
    if ratio {
        ratio_mode();
        return;
    }
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    criterion_benches(&mut c);
    c.final_summary();
}
