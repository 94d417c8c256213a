//! The activations of transformers' `ACT2FN` that PEANuT's `act_fn` may name, as differentiable candle ops.

use crate::{PeftError, Result};
use candle_core::Tensor;

/// One of transformers' `ACT2FN` activations (parameter-free ones; `prelu` and `xielu` learn parameters,
/// and a few rare ones are not implemented: both refused by name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `relu`.
    Relu,
    /// `relu2`: `relu(x)²`.
    Relu2,
    /// `relu6`: `min(max(x, 0), 6)`.
    Relu6,
    /// `leaky_relu`: `torch.nn.LeakyReLU()`, slope 0.01.
    LeakyRelu,
    /// `gelu`, `gelu_python`: the exact (erf) GELU.
    Gelu,
    /// `gelu_new`, `gelu_pytorch_tanh`, `gelu_python_tanh`: the tanh approximation.
    GeluTanh,
    /// `gelu_fast`: `0.5x(1 + tanh(0.7978845608·x·(1 + 0.044715x²)))`.
    GeluFast,
    /// `quick_gelu`: `x·σ(1.702x)`.
    QuickGelu,
    /// `silu`, `swish`: `x·σ(x)`.
    Silu,
    /// `mish`: `x·tanh(softplus(x))`.
    Mish,
    /// `sigmoid`.
    Sigmoid,
    /// `tanh`.
    Tanh,
    /// `linear`: the identity.
    Linear,
}

/// transformers' `ACT2FN` keys that peft-rs does not implement.
const NOT_IMPLEMENTED: &[&str] = &[
    "gelu_10",
    "gelu_accurate",
    "hardswish",
    "laplace",
    "sqrtsoftplus",
    "prelu",
    "xielu",
];

fn sigmoid(x: &Tensor) -> candle_core::Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}

impl Activation {
    /// From an `ACT2FN` key: an unknown key is [`PeftError::InvalidConfig`] (PEFT's `Unsupported act_fn`),
    /// a known one peft-rs does not implement [`PeftError::Unsupported`].
    pub fn parse(name: &str, field: &str) -> Result<Self> {
        Ok(match name {
            "relu" => Activation::Relu,
            "relu2" => Activation::Relu2,
            "relu6" => Activation::Relu6,
            "leaky_relu" => Activation::LeakyRelu,
            "gelu" | "gelu_python" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_python_tanh" => Activation::GeluTanh,
            "gelu_fast" => Activation::GeluFast,
            "quick_gelu" => Activation::QuickGelu,
            "silu" | "swish" => Activation::Silu,
            "mish" => Activation::Mish,
            "sigmoid" => Activation::Sigmoid,
            "tanh" => Activation::Tanh,
            "linear" => Activation::Linear,
            n if NOT_IMPLEMENTED.contains(&n) => {
                return Err(PeftError::Unsupported {
                    field: field.into(),
                    value: n.into(),
                    reason: "this activation of transformers' ACT2FN is not implemented in peft-rs".into(),
                });
            }
            n => {
                return Err(PeftError::InvalidConfig(format!(
                    "Unsupported `{field}`: {n}. Must be a key of transformers' ACT2FN"
                )));
            }
        })
    }

    /// The activation applied element-wise.
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        let c = (2.0 / std::f64::consts::PI).sqrt();
        Ok(match self {
            Activation::Relu => x.relu()?,
            Activation::Relu2 => x.relu()?.sqr()?,
            Activation::Relu6 => x.relu()?.minimum(6.0)?,
            Activation::LeakyRelu => (x.relu()? - (x.neg()?.relu()? * 0.01)?)?,
            Activation::Gelu => x.gelu_erf()?,
            Activation::GeluTanh => {
                let inner = ((x + (x.powf(3.0)? * 0.044715)?)? * c)?;
                ((x * 0.5)? * (inner.tanh()? + 1.0)?)?
            }
            Activation::GeluFast => {
                let inner = ((x * 0.7978845608)? * ((x.sqr()? * 0.044715)? + 1.0)?)?;
                ((x * 0.5)? * (inner.tanh()? + 1.0)?)?
            }
            Activation::QuickGelu => (x * sigmoid(&(x * 1.702)?)?)?,
            Activation::Silu => (x * sigmoid(x)?)?,
            Activation::Mish => {
                // softplus(x) = max(x, 0) + ln(1 + e^(−|x|)), finite for every x
                let sp = (x.relu()? + (x.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
                (x * sp.tanh()?)?
            }
            Activation::Sigmoid => sigmoid(x)?,
            Activation::Tanh => x.tanh()?,
            Activation::Linear => x.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn the_activations_take_their_textbook_values() {
        let x = Tensor::new(&[-2.0f32, -0.5, 0.0, 0.7, 7.0], &Device::Cpu).unwrap();
        let xs: Vec<f64> = x.to_vec1::<f32>().unwrap().iter().map(|&v| v as f64).collect();
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        type Reference = fn(f64) -> f64;
        let cases: [(&str, Reference); 7] = [
            ("relu6", |v| v.clamp(0.0, 6.0)),
            ("leaky_relu", |v| if v > 0.0 { v } else { 0.01 * v }),
            ("silu", |v| v / (1.0 + (-v).exp())),
            ("mish", |v| v * (1.0 + v.exp()).ln().tanh()),
            ("relu2", |v| v.max(0.0).powi(2)),
            ("tanh", f64::tanh),
            ("linear", |v| v),
        ];
        for (name, f) in cases {
            let y = Activation::parse(name, "act_fn").unwrap().apply(&x).unwrap();
            for (got, v) in y.to_vec1::<f32>().unwrap().iter().zip(&xs) {
                assert!((*got as f64 - f(*v)).abs() < 1e-5, "{name}({v}) = {got}");
            }
        }
        let q = Activation::parse("quick_gelu", "act_fn").unwrap().apply(&x).unwrap();
        for (got, v) in q.to_vec1::<f32>().unwrap().iter().zip(&xs) {
            assert!((*got as f64 - v * sig(1.702 * v)).abs() < 1e-5);
        }
        assert!(matches!(
            Activation::parse("prelu", "act_fn"),
            Err(PeftError::Unsupported { .. })
        ));
        assert!(matches!(
            Activation::parse("relu7", "act_fn"),
            Err(PeftError::InvalidConfig(_))
        ));
    }
}
