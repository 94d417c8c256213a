//! A mixed batch of 8 LoRA adapters against one adapter for every row: our side of
//! `scripts/bench_mixed_compare.sh` (PEFT's side: `scripts/bench_mixed_torch.py`, which writes the adapters).
//!
//! ```text
//! cargo run --release --example bench_mixed_batch -- <hf model dir> <work dir> <rounds>
//! ```
//!
//! Loads the model and the adapters `a0` … `a7` from `<work dir>`, the ids `[8, 128]` from
//! `<work dir>/ids.safetensors`, warms up, then per round times one forward (full logits, inference) in each
//! scenario in turn: `single` (every row with `a0`, the active adapter) and `mixed` (row i with `a_i`,
//! `ForwardCtx::with_adapter_names`). Checks that mixed row 0 equals the single forward's row 0, and, when
//! `<work dir>/torch_last.safetensors` exists, that the mixed last-position logits equal PEFT's. Prints one
//! JSON line with every time.

use candle_core::{D, DType, Device, IndexOp, Tensor};
use peft::{ForwardCtx, PeftModel};
use peft_models::llama::ForwardInput;
use std::path::Path;
use std::time::Instant;

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32, Box<dyn std::error::Error>> {
    Ok((a - b)?
        .abs()?
        .flatten_all()?
        .max(D::Minus1)?
        .to_scalar::<f32>()?)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: first thing in main, before any other thread exists.
    let _ = unsafe { peft_models::runtime::tune_process() };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model_dir, work, rounds] = args.as_slice() else {
        return Err("usage: bench_mixed_batch <hf model dir> <work dir> <rounds>".into());
    };
    let rounds: usize = rounds.parse()?;
    let work = Path::new(work);
    let dev = Device::Cpu;
    let names: Vec<String> = (0..8).map(|i| format!("a{i}")).collect();
    let model = peft_models::load_model(model_dir, &dev)?.model;
    let mut pm = PeftModel::new(model, 0);
    for name in &names {
        pm.load_adapter(work.join(name), name, &dev)?;
    }
    pm.set_adapter(&["a0"])?;
    let ids = candle_core::safetensors::load(work.join("ids.safetensors"), &dev)?
        .remove("input_ids")
        .ok_or("ids.safetensors has no input_ids")?
        .to_dtype(DType::U32)?;
    let single_ctx = ForwardCtx::inference();
    let mixed_ctx = ForwardCtx::inference().with_adapter_names(&names);
    let forward = |ctx: &ForwardCtx| pm.model().forward(ForwardInput::ids(&ids), ctx);
    let mixed = forward(&mixed_ctx)?;
    let single = forward(&single_ctx)?;
    let row0 = max_diff(&mixed.i(0)?, &single.i(0)?)?;
    let rows_differ = max_diff(&mixed.i(1)?, &single.i(1)?)?;
    let last = mixed.i((.., mixed.dim(1)? - 1))?.contiguous()?;
    let vs_peft = match candle_core::safetensors::load(work.join("torch_last.safetensors"), &dev) {
        Ok(t) => Some(max_diff(&last, t.get("last").ok_or("no `last`")?)?),
        Err(_) => None,
    };
    drop((mixed, single));
    let (mut t_single, mut t_mixed) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for (ctx, times) in [(&single_ctx, &mut t_single), (&mixed_ctx, &mut t_mixed)] {
            let t0 = Instant::now();
            drop(forward(ctx)?);
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "threads": candle_core::utils::get_num_threads(),
            "single": t_single,
            "mixed": t_mixed,
            "mixed_row0_vs_single": row0,
            "mixed_row1_vs_single_a0": rows_differ,
            "mixed_last_vs_peft": vs_peft,
        })
    );
    Ok(())
}
