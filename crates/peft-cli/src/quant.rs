//! The `--quantize` / `--double-quant` / `--dequantize-gguf` / `--dtype` / `--max-memory` flags shared by `peft train`, `peft eval`
//! and `peft generate`.

use clap::Args;
use peft_models::quantize::Quantize;
use peft_models::{LoadOptions, LoadProgress};

/// How to load the base model.
#[derive(Clone, Debug, Default, Args)]
pub struct QuantArgs {
    /// Keep the decoder layers' projections quantized (QLoRA): `nf4` or `fp4` (bitsandbytes 4-bit, blocksize
    /// 64) or `int8` (bitsandbytes 8-bit, computed on the dequantized weight), bytes as bitsandbytes writes
    /// them, each weight quantized as it is read. Checkpoints saved quantized by transformers (bitsandbytes
    /// 4-bit and 8-bit) load quantized without this flag.
    #[arg(long, value_name = "nf4|fp4|int8")]
    pub quantize: Option<String>,
    /// With `--quantize`: also quantize the per-block scales (bitsandbytes' double quantization).
    #[arg(long, requires = "quantize")]
    pub double_quant: bool,
    /// Dequantize a GGUF model's block-quantized weights (Q4_1, Q6_K, …) to f32 when loading; by default the
    /// decoder layers' projections stay in their blocks and are dequantized band by band in each forward (the
    /// same numbers, a fraction of the memory).
    #[arg(long)]
    pub dequantize_gguf: bool,
    /// Hold the frozen base weights in this dtype (default f32): `bf16` or `f16` halves the base's memory;
    /// activations, adapters, gradients and optimizer state stay f32 and every product is computed in f32 (as
    /// PEFT's autocast over a bf16 / f16 model). Full-precision models only: not with `--quantize` nor a
    /// checkpoint saved quantized; on a GGUF it applies to the tensors not kept in ggml blocks.
    #[arg(long, value_enum, value_name = "f32|bf16|f16")]
    pub dtype: Option<crate::merge::DTypeArg>,
    /// The memory the base model's weights may take, checked from the file headers before loading: a size
    /// (`12GiB`, `800MB`), `available` (the default: what the machine has free now) or `none` (no check). A
    /// model over it is refused with both sizes instead of being killed half-way through its load.
    #[arg(long, value_name = "SIZE|available|none", value_parser = peft_models::memory::MemoryLimit::parse)]
    pub max_memory: Option<peft_models::memory::MemoryLimit>,
}

impl QuantArgs {
    /// The library's load options; with `--quantize`, a progress bar on stderr (drawn only on a terminal)
    /// over the tensors as they are read and quantized.
    pub fn load_options(&self) -> anyhow::Result<LoadOptions> {
        let quantize = match &self.quantize {
            Some(kind) => Some(Quantize::parse(kind, self.double_quant)?),
            None => None,
        };
        let dtype = self.dtype.map(candle_core::DType::from);
        if let (Some(d), Some(q)) = (self.dtype, &self.quantize)
            && d != crate::merge::DTypeArg::F32
        {
            anyhow::bail!(
                "--dtype {} cannot be combined with --quantize {q}: a quantized base keeps its own storage \
                 (drop one of the two)",
                d.flag()
            );
        }
        let progress = quantize.as_ref().map(|q| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} {bar:30} {pos}/{len} tensors [{elapsed_precise}<{eta_precise}]",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_message(format!("quantizing to {}", q.describe()));
            LoadProgress::new(move |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
                if done >= total {
                    bar.finish_and_clear();
                }
            })
        });
        Ok(LoadOptions {
            quantize,
            dequantize_gguf: self.dequantize_gguf,
            progress,
            dtype,
            max_memory: self.max_memory.unwrap_or_default(),
        })
    }
}
