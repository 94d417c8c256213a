//! The causal-LM loss over SmolLM2's vocabulary: `cargo bench -p peft-models --bench cross_entropy` measures the
//! loss and its gradient for `[256, 49152]` f32 logits (a 4×64 batch) with the fused custom op
//! [`peft_models::ops::cross_entropy_rows`] and with the same computation in candle primitives
//! ([`peft_models::ops::cross_entropy_rows_reference`]: max, shift, exp, sum, log, gather and their backward).

use candle_core::{Device, Tensor, Var};
use criterion::{Criterion, black_box};
use std::time::Duration;

type Loss = fn(&Tensor, &[Option<u32>]) -> candle_core::Result<Tensor>;

fn main() {
    let x =
        Var::from_tensor(&Tensor::randn(0f32, 1.0, (256, 49152), &Device::Cpu).expect("logits"))
            .expect("var");
    let targets: Vec<Option<u32>> = (0..256u32).map(|i| Some((i * 7919) % 49152)).collect();
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .configure_from_args();
    let mut g = c.benchmark_group("cross_entropy_256x49152");
    let cases: [(&str, Loss); 2] = [
        ("fused", peft_models::ops::cross_entropy_rows),
        ("candle_ops", peft_models::ops::cross_entropy_rows_reference),
    ];
    for (name, f) in cases {
        g.bench_function(format!("{name}/forward+backward"), |b| {
            b.iter(|| {
                let loss = f(x.as_tensor(), &targets)
                    .and_then(|l| l.sum_all())
                    .expect("loss");
                black_box(loss.backward().expect("backward"));
            })
        });
    }
    g.finish();
    c.final_summary();
}
