//! Batched matrix inverse with an analytic backward (OFT's and BOFT's exact Cayley transform and OFT's
//! unmerge). Not implemented yet.

use candle_core::{Result, Tensor, bail};

/// The inverse of every matrix in `a` (`[.., n, n]`), differentiable:
/// `∂L/∂A = −A⁻ᵀ (∂L/∂A⁻¹) A⁻ᵀ`.
pub fn batched_inverse(a: &Tensor) -> Result<Tensor> {
    bail!(
        "batched_inverse is not implemented yet (input {:?})",
        a.dims()
    )
}
