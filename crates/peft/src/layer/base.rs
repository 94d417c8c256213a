//! The frozen base layers an adapter slot wraps.

use crate::quant::QuantizedWeight;
use crate::{PeftError, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// Geometry of a 2-D convolution. candle supports equal padding, stride and dilation on both axes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dSpec {
    /// Padding on each side.
    pub padding: usize,
    /// Stride.
    pub stride: usize,
    /// Dilation.
    pub dilation: usize,
    /// Groups.
    pub groups: usize,
}

impl Default for Conv2dSpec {
    fn default() -> Self {
        Self {
            padding: 0,
            stride: 1,
            dilation: 1,
            groups: 1,
        }
    }
}

/// Which kind of layer a base is, with what the forward needs to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BaseKind {
    /// `torch.nn.Linear`: weight `[out, in]`, `y = x Wᵀ + b`.
    Linear,
    /// `torch.nn.Embedding`: weight `[num_embeddings, dim]`, `y = W[ids]`.
    Embedding,
    /// `torch.nn.Conv2d`: weight `[out, in / groups, kh, kw]`.
    Conv2d(Conv2dSpec),
    /// GPT-2's `Conv1D`: weight `[in, out]`, `y = x W + b` (PEFT's `fan_in_fan_out`).
    Conv1D,
}

/// A frozen base layer: its kind, weight (dense, or quantized for a Linear) and optional bias.
#[derive(Clone, Debug)]
pub struct BaseLayer {
    kind: BaseKind,
    weight: Tensor,
    /// A quantized Linear's weight; `weight` is then an empty placeholder on the layer's device.
    quant: Option<Arc<QuantizedWeight>>,
    bias: Option<Tensor>,
}

impl BaseLayer {
    /// A base of any kind, with its shapes checked.
    pub fn new(kind: BaseKind, weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let weight = Self::store(kind, weight)?;
        let l = Self {
            kind,
            weight,
            quant: None,
            bias,
        };
        let want_rank = match kind {
            BaseKind::Linear | BaseKind::Embedding | BaseKind::Conv1D => 2,
            BaseKind::Conv2d(_) => 4,
        };
        if l.weight.rank() != want_rank {
            return Err(PeftError::Invalid(format!(
                "{kind:?} base weight must have {want_rank} dimensions, got shape {:?}",
                l.weight.dims()
            )));
        }
        if let Some(b) = &l.bias {
            if kind == BaseKind::Embedding {
                return Err(PeftError::Invalid("an embedding has no bias".into()));
            }
            if b.dims() != [l.out_features()] {
                return Err(PeftError::ShapeMismatch {
                    name: "bias".into(),
                    expected: vec![l.out_features()],
                    got: b.dims().to_vec(),
                });
            }
        }
        Ok(l)
    }

    /// A `Linear` base that keeps the weight's storage exactly as given, without the transposed copy
    /// [`BaseLayer::new`] makes: for an output layer tied to the input embedding (same storage, as
    /// transformers ties them), where a copy would double the memory and untie the two.
    pub fn linear_shared(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let l = Self::new(BaseKind::Embedding, weight, None)?; // shape checks of a 2-D weight, no copy
        let l = Self {
            kind: BaseKind::Linear,
            weight: l.weight,
            quant: None,
            bias: None,
        };
        match bias {
            Some(b) => {
                let mut l = l;
                l.replace_bias(b)?;
                Ok(l)
            }
            None => Ok(l),
        }
    }

    /// A `Linear` base (weight `[out, in]`).
    pub fn linear(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::new(BaseKind::Linear, weight, bias)
    }

    /// A `Linear` base whose frozen weight `[out, in]` stays quantized: the forward dequantizes it band by
    /// band into an f32 matmul ([`crate::quant::quant_linear`]), [`BaseLayer::weight`] dequantizes it whole,
    /// and a merge re-quantizes it with the same settings (as PEFT's bitsandbytes layers do). The bias, if any,
    /// is dense, on `device`.
    pub fn quantized_linear(
        weight: QuantizedWeight,
        bias: Option<Tensor>,
        device: &Device,
    ) -> Result<Self> {
        let &[out, _] = weight.shape() else {
            return Err(PeftError::Invalid(format!(
                "a quantized Linear weight must have 2 dimensions, got shape {:?}",
                weight.shape()
            )));
        };
        if let Some(b) = &bias
            && b.dims() != [out]
        {
            return Err(PeftError::ShapeMismatch {
                name: "bias".into(),
                expected: vec![out],
                got: b.dims().to_vec(),
            });
        }
        Ok(Self {
            kind: BaseKind::Linear,
            weight: Tensor::zeros(0, weight.dtype(), device)?,
            quant: Some(Arc::new(weight)),
            bias,
        })
    }

    /// An `Embedding` base (weight `[num_embeddings, dim]`).
    pub fn embedding(weight: Tensor) -> Result<Self> {
        Self::new(BaseKind::Embedding, weight, None)
    }

    /// A `Conv2d` base (weight `[out, in / groups, kh, kw]`).
    pub fn conv2d(weight: Tensor, bias: Option<Tensor>, spec: Conv2dSpec) -> Result<Self> {
        Self::new(BaseKind::Conv2d(spec), weight, bias)
    }

    /// A GPT-2 `Conv1D` base (weight `[in, out]`).
    pub fn conv1d(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::new(BaseKind::Conv1D, weight, bias)
    }

    /// The layer kind.
    pub fn kind(&self) -> &BaseKind {
        &self.kind
    }

    /// The weight, dequantized (whole, in its original dtype) for a quantized layer.
    pub fn weight(&self) -> Result<Tensor> {
        match &self.quant {
            Some(q) => q.dequantize(self.weight.device()),
            None => Ok(self.weight.clone()),
        }
    }

    /// The dense weight, or `None` for a quantized layer.
    pub fn dense_weight(&self) -> Option<&Tensor> {
        match self.quant {
            Some(_) => None,
            None => Some(&self.weight),
        }
    }

    /// The quantized weight, for a quantized layer.
    pub fn quantized(&self) -> Option<&Arc<QuantizedWeight>> {
        self.quant.as_ref()
    }

    /// The weight's shape (without dequantizing).
    pub fn weight_dims(&self) -> &[usize] {
        match &self.quant {
            Some(q) => q.shape(),
            None => self.weight.dims(),
        }
    }

    /// The device the layer computes on.
    pub fn device(&self) -> &Device {
        self.weight.device()
    }

    /// The weight's dtype (a quantized weight's dtype before quantization).
    pub fn dtype(&self) -> DType {
        self.weight.dtype()
    }

    /// The bias.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Input width (`in_features`, `in_channels`, or `num_embeddings` for an embedding, as PEFT counts it).
    pub fn in_features(&self) -> usize {
        let d = self.weight_dims();
        match self.kind {
            BaseKind::Linear => d[1],
            BaseKind::Embedding | BaseKind::Conv1D => d[0],
            BaseKind::Conv2d(s) => d[1] * s.groups,
        }
    }

    /// Output width (`out_features`, `out_channels`, or the embedding dimension).
    pub fn out_features(&self) -> usize {
        let d = self.weight_dims();
        match self.kind {
            BaseKind::Linear | BaseKind::Conv2d(_) => d[0],
            BaseKind::Embedding | BaseKind::Conv1D => d[1],
        }
    }

    /// A Linear weight `[out, in]` is kept as a transposed view of a contiguous `[in, out]` matrix: `x Wᵀ`
    /// then multiplies by a row-major right-hand side, about a quarter faster in gemm than a transposed one.
    /// The view costs nothing; [`BaseLayer::weight`] still has the `[out, in]` shape.
    fn store(kind: BaseKind, w: Tensor) -> Result<Tensor> {
        Ok(match kind {
            BaseKind::Linear if w.rank() == 2 && w.t()?.is_contiguous() => w,
            BaseKind::Linear if w.rank() == 2 => w.t()?.contiguous()?.t()?,
            _ => w,
        })
    }

    /// Replaces the weight; a quantized layer re-quantizes `w` with its settings.
    pub(crate) fn replace_weight(&mut self, w: Tensor) -> Result<()> {
        if w.dims() != self.weight_dims() {
            return Err(PeftError::ShapeMismatch {
                name: "weight".into(),
                expected: self.weight_dims().to_vec(),
                got: w.dims().to_vec(),
            });
        }
        if let Some(q) = &self.quant {
            self.quant = Some(Arc::new(q.requantize(&w)?));
            return Ok(());
        }
        self.weight = Self::store(self.kind, w)?;
        Ok(())
    }

    /// Replaces the weight keeping its storage exactly as given (no transposed copy for a `Linear`), as
    /// [`BaseLayer::linear_shared`] does: for a weight shared with another layer.
    pub(crate) fn replace_weight_shared(&mut self, w: Tensor) -> Result<()> {
        if self.quant.is_some() {
            return Err(PeftError::Invalid(
                "a quantized weight cannot share another layer's storage".into(),
            ));
        }
        if w.dims() != self.weight.dims() {
            return Err(PeftError::ShapeMismatch {
                name: "weight".into(),
                expected: self.weight.dims().to_vec(),
                got: w.dims().to_vec(),
            });
        }
        self.weight = w;
        Ok(())
    }

    pub(crate) fn replace_bias(&mut self, b: Tensor) -> Result<()> {
        if b.dims() != [self.out_features()] {
            return Err(PeftError::ShapeMismatch {
                name: "bias".into(),
                expected: vec![self.out_features()],
                got: b.dims().to_vec(),
            });
        }
        self.bias = Some(b);
        Ok(())
    }

    /// The base op with this layer's own weights.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(q) = &self.quant {
            let x = match x.dtype() {
                DType::F32 | DType::F64 => x.clone(),
                _ => x.to_dtype(DType::F32)?,
            };
            return Ok(crate::quant::quant_linear(&x, q, self.bias.as_ref())?);
        }
        self.forward_with(x, &self.weight, self.bias.as_ref())
    }

    /// The base op with other weights of the same layout (DoRA's dropout path, modules_to_save copies).
    pub fn forward_with(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
    ) -> Result<Tensor> {
        if let Some(y) = half_weight_forward(self.kind, x, weight, bias)? {
            return Ok(y);
        }
        let y = match self.kind {
            BaseKind::Linear => {
                let x = x.to_dtype(weight.dtype())?;
                if let Some(y) = crate::kernels::linear_inplace(&x, weight, bias)? {
                    return Ok(y);
                }
                if frozen_base(&x, weight, bias) {
                    // Training through a frozen base: the backward computes the input gradient only.
                    return Ok(crate::ops::frozen_linear(&x, weight, bias)?);
                }
                let y = linear_apply(&x, weight, true)?;
                add_bias_last(y, bias)?
            }
            BaseKind::Conv1D => {
                let x = x.to_dtype(weight.dtype())?;
                if frozen_base(&x, weight, bias) {
                    // `[in, out]` seen as the `[out, in]` Linear layout, a free view.
                    return Ok(crate::ops::frozen_linear(&x, &weight.t()?, bias)?);
                }
                let y = linear_apply(&x, weight, false)?;
                add_bias_last(y, bias)?
            }
            BaseKind::Embedding => embed(x, weight)?,
            BaseKind::Conv2d(s) => {
                let x = x.to_dtype(weight.dtype())?;
                let y = x.conv2d(weight, s.padding, s.stride, s.dilation, s.groups)?;
                match bias {
                    Some(b) => {
                        y.broadcast_add(&b.to_dtype(y.dtype())?.reshape((1, (), 1, 1))?)?
                    }
                    None => y,
                }
            }
        };
        Ok(y)
    }
}

/// PEFT's autocast over a half-precision base: a bf16 / f16 weight with f32 / f64 activations computes in the
/// activations' dtype (the weight is storage only). A Linear or Conv1D multiplies through
/// [`crate::ops::half_linear`] (bands of the weight converted to f32, input gradient only) when the weight is
/// frozen, an embedding gathers half rows then converts them to f32, a Conv2d converts its kernel. `None` for
/// every other combination (a half input keeps computing in half precision, as without autocast).
fn half_weight_forward(
    kind: BaseKind,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    if !crate::ops::is_half(weight) {
        return Ok(None);
    }
    if kind == BaseKind::Embedding {
        return Ok(Some(embed(x, weight)?.to_dtype(DType::F32)?));
    }
    if !matches!(x.dtype(), DType::F32 | DType::F64) {
        return Ok(None);
    }
    let dt = x.dtype();
    let frozen = !weight.track_op() && bias.is_none_or(|b| !b.track_op());
    let y = match kind {
        BaseKind::Linear | BaseKind::Conv1D => {
            let w = if kind == BaseKind::Conv1D {
                weight.t()?
            } else {
                weight.clone()
            };
            if frozen {
                crate::ops::half_linear(x, &w, bias)?
            } else {
                let y = linear_apply(x, &w.to_dtype(dt)?, true)?;
                add_bias_last(y, bias)?
            }
        }
        BaseKind::Conv2d(s) => {
            let y = x.conv2d(
                &weight.to_dtype(dt)?,
                s.padding,
                s.stride,
                s.dilation,
                s.groups,
            )?;
            match bias {
                Some(b) => y.broadcast_add(&b.to_dtype(dt)?.reshape((1, (), 1, 1))?)?,
                None => y,
            }
        }
        BaseKind::Embedding => unreachable!("handled above"),
    };
    Ok(Some(y))
}

/// `x @ wᵀ` (`transpose = true`, Linear layout `[out, in]`) or `x @ w` (Conv1D layout `[in, out]`) over any
/// number of leading dimensions, without materialising a transpose.
pub(crate) fn linear_apply(x: &Tensor, w: &Tensor, transpose: bool) -> candle_core::Result<Tensor> {
    let w = if transpose { w.t()? } else { w.clone() };
    let dims = x.dims();
    let last = dims[dims.len() - 1];
    let lead: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((lead, last))?.matmul(&w)?;
    let mut out: Vec<usize> = dims[..dims.len() - 1].to_vec();
    out.push(y.dim(1)?);
    y.reshape(out)
}

/// A 2-D base weight in the `[out, in]` layout, f32 (GPT-2's Conv1D `[in, out]` transposed; PEFT's
/// `transpose(weight, fan_in_fan_out)`).
pub(crate) fn logical_weight(kind: &BaseKind, w: &Tensor) -> crate::Result<Tensor> {
    let w = w.to_dtype(candle_core::DType::F32)?;
    Ok(match kind {
        BaseKind::Conv1D => w.t()?.contiguous()?,
        _ => w,
    })
}

/// Whether a gradient flows through `x` while the weight and bias are frozen (not trained): then
/// [`crate::ops::frozen_linear`] skips the weight gradient candle's matmul backward would compute. A trained
/// weight (a `modules_to_save` copy) keeps the plain candle ops and its gradient.
fn frozen_base(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> bool {
    x.track_op() && !weight.track_op() && bias.is_none_or(|b| !b.track_op())
}

fn add_bias_last(y: Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
    match bias {
        Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?),
        None => Ok(y),
    }
}

/// Embedding lookup for ids of any integer dtype and any shape: `[..] → [.., dim]`.
pub(crate) fn embed(ids: &Tensor, weight: &Tensor) -> candle_core::Result<Tensor> {
    let ids = match ids.dtype() {
        DType::U32 | DType::I64 | DType::U8 => ids.clone(),
        _ => ids.to_dtype(DType::U32)?,
    };
    let mut shape = ids.dims().to_vec();
    let flat = ids.flatten_all()?;
    let y = weight.index_select(&flat, 0)?;
    shape.push(weight.dim(1)?);
    y.reshape(shape)
}
