//! The C3A adapter for Linear layers (PEFT's `tuners/c3a/layer.py` and `utils.py`).
//!
//! One bare parameter per layer, `c3a_kernel` `[out/b, in/b, b]`. PEFT's forward,
//! `fft(Σₙ ifft(xₙ) ⊙ fft(w_mn)).real / in_features`, is a circular cross-correlation of each input block with
//! its kernel: `y_m[j] = Σₙ Σₛ w[m, n, s]·xₙ[(j + s) mod b] / in`. So the update is the block matrix
//! `ΔW[m·b + j, n·b + t] = w[m, n, (t − j) mod b] / in` (PEFT's `get_circulant_fast`), which is formed here by
//! one gather and applied as a matrix product (the same numbers as the FFTs up to rounding; exact gradients
//! by autograd). Additive: merged, unmerged and weighted (`DIR@W`) through `ΔW`.
//!
//! PEFT's forward with several active C3A adapters feeds each adapter the previous one's output (it reuses
//! `x`); here each adapter sees the layer input, so that combination is refused in the forward
//! ([`Adapter::stacks_with_others`]); merging several works.

use super::config::{C3aConfig, C3aInit};
use crate::layer::{Adapter, BaseKind, BaseLayer, CallCtx, NamedTensor, check_shape};
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Tensor, Var};
use indexmap::IndexMap;

/// The only tensor key of a C3A adapter.
pub const C3A_KERNEL: &str = "c3a_kernel";

/// The parameter names of C3A's tensors in a file.
pub const PARAM_PREFIXES: &[&str] = &[C3A_KERNEL];

/// One C3A adapter inside one Linear layer (an f32 `Var`; the dtype it was created or loaded in is kept for
/// saving).
#[derive(Debug)]
pub struct C3aAdapter {
    kernel: Var,
    /// `[b·b]` indices `(t − j) mod b` for `(j, t)` in row-major order.
    index: Tensor,
    n_in: usize,
    n_out: usize,
    saved_dtype: DType,
}

fn dims(base: &BaseLayer, b: usize) -> Result<(usize, usize)> {
    if !matches!(base.kind(), BaseKind::Linear) {
        return Err(PeftError::Unsupported {
            field: "target_modules".into(),
            value: format!("a {:?} layer", base.kind()),
            reason: "C3A supports only Linear layers (as PEFT)".into(),
        });
    }
    let (n_in, n_out) = (base.in_features(), base.out_features());
    if b == 0 || !n_in.is_multiple_of(b) || !n_out.is_multiple_of(b) {
        return Err(PeftError::InvalidConfig(format!(
            "C3A: the block size ({b}) should be a factor of the input size ({n_in}) and of the output size \
             ({n_out})"
        )));
    }
    Ok((n_in, n_out))
}

fn circulant_index(b: usize, dev: &candle_core::Device) -> Result<Tensor> {
    let idx: Vec<u32> = (0..b)
        .flat_map(|j| (0..b).map(move |t| ((t + b - j) % b) as u32))
        .collect();
    Ok(Tensor::from_vec(idx, b * b, dev)?)
}

impl C3aAdapter {
    /// A freshly initialised adapter, as PEFT's `reset_c3a_parameters`: zeros (`true`), `U(±√3·√(2/(in+out)))`
    /// (`false`, `"xavier_uniform"`, the default), `N(0, 1)` (`"gaussian"`), `U(±√(1/in))`
    /// (`"kaiming_uniform"`).
    pub fn new(base: &BaseLayer, config: &C3aConfig, module: &str, rng: &mut PeftRng) -> Result<Self> {
        let b = config.block_size_for(module)?;
        let (n_in, n_out) = dims(base, b)?;
        let dev = base.device();
        let shape = (n_out / b, n_in / b, b);
        let kernel = match &config.init_weights {
            C3aInit::Bool(true) => Tensor::zeros(shape, DType::F32, dev)?,
            C3aInit::Method(m) if m == "gaussian" => {
                rng.normal_tensor(shape, 0.0, 1.0, DType::F32, dev)?
            }
            C3aInit::Method(m) if m == "kaiming_uniform" => {
                let a = (1.0 / n_in as f64).sqrt();
                rng.uniform_tensor(shape, -a, a, DType::F32, dev)?
            }
            _ => {
                let a = 3f64.sqrt() * (2.0 / (n_in + n_out) as f64).sqrt();
                rng.uniform_tensor(shape, -a, a, DType::F32, dev)?
            }
        };
        Ok(Self {
            kernel: Var::from_tensor(&kernel)?,
            index: circulant_index(b, dev)?,
            n_in,
            n_out,
            saved_dtype: DType::F32,
        })
    }

    /// An adapter from tensors as PEFT saves them (keys relative to the module, adapter name stripped):
    /// exactly one key, `c3a_kernel`, of shape `[out/b, in/b, b]`.
    pub fn from_tensors(
        base: &BaseLayer,
        config: &C3aConfig,
        module: &str,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        let b = config.block_size_for(module)?;
        let (n_in, n_out) = dims(base, b)?;
        let t = tensors
            .get(C3A_KERNEL)
            .ok_or_else(|| PeftError::MissingKey(C3A_KERNEL.to_string()))?;
        check_shape(C3A_KERNEL, t, &[n_out / b, n_in / b, b])?;
        let extra: Vec<String> = tensors.keys().filter(|k| *k != C3A_KERNEL).cloned().collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        Ok(Self {
            kernel: Var::from_tensor(&t.to_dtype(DType::F32)?)?,
            index: circulant_index(b, base.device())?,
            n_in,
            n_out,
            saved_dtype: t.dtype(),
        })
    }

    /// `ΔW` `[out, in]`.
    pub fn delta(&self) -> Result<Tensor> {
        let w = self.kernel.as_tensor();
        let (m, n, b) = w.dims3()?;
        let g = w
            .index_select(&self.index, 2)? // [m, n, b·b]: (j, t) → w[m, n, (t − j) mod b]
            .reshape((m, n, b, b))?
            .permute((0, 2, 1, 3))? // [m, j, n, t]
            .contiguous()?
            .reshape((self.n_out, self.n_in))?;
        Ok((g / self.n_in as f64)?)
    }
}

impl Adapter for C3aAdapter {
    /// PEFT's `supports_lora_conversion`: Linear layers, by their additive delta.
    fn lora_conversion(
        &self,
        base: &crate::layer::BaseLayer,
    ) -> Result<Option<crate::layer::LoraConversion>> {
        crate::tuners::lora::conversion::additive_conversion(self, base, false)
    }

    fn peft_type(&self) -> &'static str {
        "C3A"
    }

    fn transform_output(
        &self,
        _base: &BaseLayer,
        x: &Tensor,
        result: Tensor,
        _ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let lead = x.dims()[..x.rank().saturating_sub(1)].to_vec();
        let rows = x.elem_count() / self.n_in.max(1);
        let h = x.reshape((rows, self.n_in))?.matmul(&self.delta()?.t()?)?;
        let mut shape = lead;
        shape.push(self.n_out);
        Ok((result.to_dtype(DType::F32)? + h.reshape(shape)?)?)
    }

    fn delta_weight(&self, kind: &BaseKind) -> Result<Option<(Tensor, Option<Tensor>)>> {
        if !matches!(kind, BaseKind::Linear) {
            return Err(PeftError::Invalid(format!(
                "C3A adapter merged into a {kind:?} layer"
            )));
        }
        Ok(Some((self.delta()?, None)))
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        vec![(C3A_KERNEL.to_string(), self.kernel.as_tensor().clone())]
    }

    fn vars(&self) -> Vec<(String, Var)> {
        vec![(C3A_KERNEL.to_string(), self.kernel.clone())]
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        format!("c3a_kernel {:?}", self.kernel.as_tensor().dims())
    }

    fn stacks_with_others(&self) -> bool {
        false
    }
}
