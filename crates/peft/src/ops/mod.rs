//! Differentiable building blocks the adapters need, with the gradients candle's ops lack.
//!
//! candle's matmul backward always computes the weight gradient even for a frozen weight, and candle has no
//! differentiable matrix inverse. The functions here are what adapter and base-layer code calls instead:
//!
//! | function | CPU f32 / f64 | elsewhere (other devices, bf16 / f16, unusual shapes) |
//! |---|---|---|
//! | [`frozen_linear`] | custom op on `gemm`, backward `g W` only | [`frozen_linear_reference`] |
//! | [`half_linear`] (bf16 / f16 weight, f32 input) | custom op: bands of the weight converted to f32 into `gemm`, backward `g W` only | the weight converted whole, [`frozen_linear_reference`] |
//! | [`batched_inverse`] | custom op (Gauss–Jordan, partial pivoting, f64 accumulation), backward `−A⁻ᵀ G A⁻ᵀ` | computed on the CPU in f32 / f64 and moved back |
//!
//! The model-only ops (RMSNorm, softmax, RoPE, SwiGLU, row-wise cross-entropy) live beside the model, in
//! `peft_models::ops`; [`cpu`] holds what both sets of custom ops are built on.
//!
//! The `*_reference` functions are written with candle primitives: correct on every device and dtype, with
//! candle's autograd, and the yardstick the custom ops are tested against (values, gradients, and finite
//! differences in f64). The custom ops read their inputs through any strides whose last dimension is
//! contiguous, write contiguous outputs, and split rows over `candle_core::utils::get_num_threads()` scoped
//! threads when the work is large enough.

pub mod cpu;
mod frozen_linear;
mod half_linear;
mod inverse;

pub use frozen_linear::{frozen_linear, frozen_linear_reference};
pub use half_linear::{half_linear, half_linear_band_rows, is_half};
pub use inverse::batched_inverse;

#[cfg(test)]
pub(crate) mod testutil {
    //! Test helpers: random tensors from the crate's generator; comparisons and finite differences from
    //! `peft_test_support`.

    use crate::PeftRng;
    use candle_core::{DType, Device, Tensor};
    pub use peft_test_support::{fd_check, grads_of, max_diff, strided, vars};

    /// A standard-normal tensor.
    pub fn randn(rng: &mut PeftRng, shape: &[usize], dtype: DType) -> Tensor {
        rng.normal_tensor(shape, 0.0, 1.0, dtype, &Device::Cpu)
            .unwrap()
    }
}
