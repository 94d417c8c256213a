//! LoRA forward benchmarks at `in = out = 2048`, 512 tokens, `r = 16`, f32 on the CPU.
//!
//! Two modes in one binary:
//!
//! - default (criterion): `cargo bench -p peft --bench lora_forward` measures the plain linear (the
//!   [`BaseLayer`] forward), the slot with one unmerged LoRA adapter, and the slot after `merge`.
//! - ratio: `PEFT_BENCH_RATIO=1 cargo bench -p peft --bench lora_forward` (or pass `--ratio` to the built
//!   binary) runs warm-up calls, then `N` interleaved (plain, LoRA unmerged, merged) triples, and prints
//!   the median and minimum of each and the median of the per-triple ratios LoRA/plain and merged/plain.
//!   Sequential criterion groups drift on a shared machine; ratios of calls taken back to back do not.
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
    let ctx = ForwardCtx::eval();
    let plain = || s.plain.forward(&s.x).unwrap();
    let lora = || s.unmerged.forward(&s.x, &ctx).unwrap();
    let merged = || s.merged.forward(&s.x, &ctx).unwrap();

    // The merged slot must give the unmerged result (up to rounding): a cheap guard against timing a no-op.
    let diff = (lora() - merged())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        diff < 1e-3,
        "merged and unmerged LoRA outputs differ by {diff}"
    );

    for _ in 0..10 {
        time_ms(plain);
        time_ms(lora);
        time_ms(merged);
    }
    let (mut tp, mut tl, mut tm) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for i in 0..n {
        // Alternate the order so that neither variant always follows the other.
        let (p, l, m) = if i % 2 == 0 {
            let p = time_ms(plain);
            let l = time_ms(lora);
            (p, l, time_ms(merged))
        } else {
            let m = time_ms(merged);
            let l = time_ms(lora);
            (time_ms(plain), l, m)
        };
        tp.push(p);
        tl.push(l);
        tm.push(m);
    }
    let rl: Vec<f64> = tl.iter().zip(&tp).map(|(l, p)| l / p).collect();
    let rm: Vec<f64> = tm.iter().zip(&tp).map(|(m, p)| m / p).collect();
    let threads = candle_core::utils::get_num_threads();
    println!(
        "peft (candle) LoRA forward, Linear({IN},{OUT}), x [{TOKENS},{IN}] f32, r={R}; {n} interleaved triples, {threads} threads"
    );
    println!("{:<16} {:>10} {:>10}", "", "median ms", "min ms");
    for (name, v) in [
        ("plain linear", &tp),
        ("LoRA unmerged", &tl),
        ("LoRA merged", &tm),
    ] {
        println!("{name:<16} {:>10.3} {:>10.3}", median(v), min(v));
    }
    println!(
        "median per-pair ratio LoRA/plain   {:.4} (bar 1.10, theory {:.4})",
        median(&rl),
        1.0 + (R * (IN + OUT)) as f64 / (IN * OUT) as f64
    );
    println!("median per-pair ratio merged/plain {:.4}", median(&rm));
    println!(
        "{{\"impl\":\"rust\",\"n\":{n},\"threads\":{threads},\"plain_median_ms\":{:.4},\"plain_min_ms\":{:.4},\"lora_median_ms\":{:.4},\"lora_min_ms\":{:.4},\"merged_median_ms\":{:.4},\"merged_min_ms\":{:.4},\"lora_ratio_median\":{:.4},\"merged_ratio_median\":{:.4}}}",
        median(&tp),
        min(&tp),
        median(&tl),
        min(&tl),
        median(&tm),
        min(&tm),
        median(&rl),
        median(&rm)
    );
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
