//! The FourierFT adapter for Linear and GPT-2 Conv1D layers (PEFT's `tuners/fourierft/layer.py`).
//!
//! One bare parameter per layer, `fourierft_spectrum` `[n]`: the values of `n` entries of an `[out, in]`
//! spectrum that is zero elsewhere. The entries sit at `(p / in, p % in)` for the first `n` values `p` of
//! `torch.randperm(out · in)` seeded with `random_loc_seed` ([`super::randperm`]); they are not saved. PEFT's
//! update is `ΔW = Re(ifft2(S)) · scaling`; with the entries at rows `r_f`, columns `c_f`, values `s_f`:
//!
//! ```text
//! ΔW[j, k] = scaling / (out · in) · Σ_f s_f · cos(2π (j·r_f / out + k·c_f / in))
//!          = scaling / (out · in) · Σ_f s_f · (cos α_jf · cos β_kf − sin α_jf · sin β_kf)
//! ```
//!
//! with `α_jf = 2π·(j·r_f mod out)/out` and `β_kf = 2π·(k·c_f mod in)/in`. So `ΔW = A·diag(σ)·Bᵀ` with the
//! fixed tables `A = [cos α | sin α]` `[out, 2n]`, `B = [cos β | sin β]` `[in, 2n]` and
//! `σ = scaling / (out · in) · [s | −s]`: a rank-`2n` product, whose gradient with respect to `s` autograd
//! gives (candle has no FFT). The tables are built on the layer's device at each use from the `n` row and
//! column indices (the angles reduced exactly in integers), so the adapter holds `n` values and `2n`
//! indices, as PEFT does. The forward computes `((x·B)·σ)·Aᵀ` or `x·ΔWᵀ`, whichever costs fewer products.
//!
//! Additive: merged, unmerged and weighted (`DIR@W`) through `ΔW` (transposed for a Conv1D, whose weight is
//! `[in, out]`; its forward uses `ΔW` `[out, in]` as a Linear's, as PEFT's does).

use super::config::FourierftConfig;
use super::randperm::randperm_prefix;
use crate::layer::{Adapter, BaseKind, BaseLayer, CallCtx, NamedTensor, check_shape};
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Device, Tensor, Var};
use indexmap::IndexMap;

/// The only tensor key of a FourierFT adapter.
pub const FOURIERFT_SPECTRUM: &str = "fourierft_spectrum";

/// The parameter names of FourierFT's tensors in a file.
pub const PARAM_PREFIXES: &[&str] = &[FOURIERFT_SPECTRUM];

/// One FourierFT adapter inside one Linear or Conv1D layer (an f32 `Var`; the dtype it was created or loaded
/// in is kept for saving).
#[derive(Debug)]
pub struct FourierftAdapter {
    spectrum: Var,
    /// `[n]` u32: the spectral entries' rows (`p / in`).
    rows: Tensor,
    /// `[n]` u32: their columns (`p % in`).
    cols: Tensor,
    n_in: usize,
    n_out: usize,
    scaling: f64,
    conv1d: bool,
    saved_dtype: DType,
}

/// `(in, out, n_frequency)` of `module`, checked as PEFT's `update_layer` does.
fn dims(base: &BaseLayer, config: &FourierftConfig, module: &str) -> Result<(usize, usize, usize)> {
    if !matches!(base.kind(), BaseKind::Linear | BaseKind::Conv1D) {
        return Err(PeftError::Unsupported {
            field: "target_modules".into(),
            value: format!("a {:?} layer", base.kind()),
            reason: "FourierFT supports only Linear and GPT-2 Conv1D layers (as PEFT)".into(),
        });
    }
    let (n_in, n_out) = (base.in_features(), base.out_features());
    let n = config.n_frequency_for(module)?;
    if n == 0 {
        return Err(PeftError::InvalidConfig(
            "FourierFT: `n_frequency` should be a positive integer value but the value passed is 0".into(),
        ));
    }
    let size = (n_in as u64).saturating_mul(n_out as u64);
    if n as u64 > size {
        return Err(PeftError::InvalidConfig(format!(
            "FourierFT: `n_frequency` should be less than or equal to the product of the input and output \
             dimensions but the value passed is {n} and the product is {size} ({module})"
        )));
    }
    Ok((n_in, n_out, n))
}

/// The `[n]` rows and columns of the spectral entries (PEFT's `indices`), on `dev`.
fn locations(
    config: &FourierftConfig,
    n_in: usize,
    n_out: usize,
    n: usize,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let seed = config.seed()?;
    let perm = randperm_prefix(n_in as u64 * n_out as u64, n, seed as u64)?;
    let n_in64 = n_in as u64;
    let rows: Vec<u32> = perm.iter().map(|p| (p / n_in64) as u32).collect();
    let cols: Vec<u32> = perm.iter().map(|p| (p % n_in64) as u32).collect();
    Ok((
        Tensor::from_vec(rows, n, dev)?,
        Tensor::from_vec(cols, n, dev)?,
    ))
}

/// `[len, 2n]`: `cos θ | sin θ` with `θ[j, f] = 2π·(j·freq_f mod len)/len`, the product reduced exactly in
/// integers (u32 while `len² < 2³²`, else i64) before the angle is formed in f32.
fn dft_table(len: usize, freqs: &Tensor) -> Result<Tensor> {
    let dev = freqs.device();
    let dt = if len < (1 << 16) {
        DType::U32
    } else {
        DType::I64
    };
    let j = Tensor::arange(0u32, len as u32, dev)?.to_dtype(dt)?.unsqueeze(1)?;
    let f = freqs.to_dtype(dt)?.unsqueeze(0)?;
    let l = Tensor::new(len as u32, dev)?.to_dtype(dt)?;
    let p = j.broadcast_mul(&f)?; // [len, n], < len²
    let rem = (&p - p.broadcast_div(&l)?.broadcast_mul(&l)?)?;
    let theta = rem
        .to_dtype(DType::F32)?
        .affine(2.0 * std::f64::consts::PI / len as f64, 0.0)?;
    Ok(Tensor::cat(&[theta.cos()?, theta.sin()?], 1)?)
}

impl FourierftAdapter {
    fn build(
        base: &BaseLayer,
        config: &FourierftConfig,
        module: &str,
        spectrum: Tensor,
        saved_dtype: DType,
    ) -> Result<Self> {
        let (n_in, n_out, n) = dims(base, config, module)?;
        let (rows, cols) = locations(config, n_in, n_out, n, base.device())?;
        Ok(Self {
            spectrum: Var::from_tensor(&spectrum)?,
            rows,
            cols,
            n_in,
            n_out,
            scaling: config.scaling,
            conv1d: matches!(base.kind(), BaseKind::Conv1D),
            saved_dtype,
        })
    }

    /// A freshly initialised adapter, as PEFT's `update_layer`: the spectrum drawn from `N(0, 1)`
    /// (`init_weights = false`, the default), or zeros (`true`, the identity).
    pub fn new(
        base: &BaseLayer,
        config: &FourierftConfig,
        module: &str,
        rng: &mut PeftRng,
    ) -> Result<Self> {
        let (_, _, n) = dims(base, config, module)?;
        let dev = base.device();
        let spectrum = if config.init_weights {
            Tensor::zeros(n, DType::F32, dev)?
        } else {
            rng.normal_tensor(n, 0.0, 1.0, DType::F32, dev)?
        };
        Self::build(base, config, module, spectrum, DType::F32)
    }

    /// An adapter from tensors as PEFT saves them (keys relative to the module, adapter name stripped):
    /// exactly one key, `fourierft_spectrum`, of shape `[n_frequency]` (the module's, patterns applied).
    pub fn from_tensors(
        base: &BaseLayer,
        config: &FourierftConfig,
        module: &str,
        tensors: &IndexMap<String, Tensor>,
    ) -> Result<Self> {
        let (_, _, n) = dims(base, config, module)?;
        let t = tensors
            .get(FOURIERFT_SPECTRUM)
            .ok_or_else(|| PeftError::MissingKey(FOURIERFT_SPECTRUM.to_string()))?;
        check_shape(FOURIERFT_SPECTRUM, t, &[n])?;
        let extra: Vec<String> = tensors
            .keys()
            .filter(|k| *k != FOURIERFT_SPECTRUM)
            .cloned()
            .collect();
        if !extra.is_empty() {
            return Err(PeftError::UnexpectedKeys(extra));
        }
        Self::build(base, config, module, t.to_dtype(DType::F32)?, t.dtype())
    }

    /// The spectral entries' locations `(row, column)` in the `[out, in]` spectrum, in PEFT's order.
    pub fn locations(&self) -> Result<Vec<(u32, u32)>> {
        let r = self.rows.to_vec1::<u32>()?;
        let c = self.cols.to_vec1::<u32>()?;
        Ok(r.into_iter().zip(c).collect())
    }

    /// The tables `A` `[out, 2n]`, `B` `[in, 2n]` and the weights `σ` `[2n]` of `ΔW = A·diag(σ)·Bᵀ`.
    fn factors(&self) -> Result<(Tensor, Tensor, Tensor)> {
        let a = dft_table(self.n_out, &self.rows)?;
        let b = dft_table(self.n_in, &self.cols)?;
        let s = self.spectrum.as_tensor();
        let c = self.scaling / (self.n_out as f64 * self.n_in as f64);
        let sigma = Tensor::cat(&[s.affine(c, 0.0)?, s.affine(-c, 0.0)?], 0)?;
        Ok((a, b, sigma))
    }

    fn delta_from(a: &Tensor, b: &Tensor, sigma: &Tensor) -> Result<Tensor> {
        Ok(a.broadcast_mul(&sigma.unsqueeze(0)?)?.matmul(&b.t()?)?)
    }

    /// `ΔW` `[out, in]` (PEFT's `get_delta_weight`, in the Linear layout for a Conv1D too).
    pub fn delta(&self) -> Result<Tensor> {
        let (a, b, sigma) = self.factors()?;
        Self::delta_from(&a, &b, &sigma)
    }

    /// `x·ΔWᵀ` for `x` `[rows, in]`, through the factors or through `ΔW`, whichever costs fewer products
    /// (`force_factors`: always the factors, for the tests).
    fn apply(&self, x: &Tensor, force_factors: bool) -> Result<Tensor> {
        let (a, b, sigma) = self.factors()?;
        let rows = x.dim(0)? as u128;
        let (n_in, n_out, n2) = (self.n_in as u128, self.n_out as u128, sigma.dim(0)? as u128);
        let by_factors = rows * n2 * (n_in + n_out);
        let by_delta = n_out * n_in * n2 + rows * n_out * n_in;
        if force_factors || by_factors <= by_delta {
            Ok(x.matmul(&b)?.broadcast_mul(&sigma.unsqueeze(0)?)?.matmul(&a.t()?)?)
        } else {
            Ok(x.matmul(&Self::delta_from(&a, &b, &sigma)?.t()?)?)
        }
    }

    fn forward_with(&self, x: &Tensor, result: Tensor, force_factors: bool) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let lead = x.dims()[..x.rank().saturating_sub(1)].to_vec();
        let rows = x.elem_count() / self.n_in.max(1);
        let h = self.apply(&x.reshape((rows, self.n_in))?, force_factors)?;
        let mut shape = lead;
        shape.push(self.n_out);
        Ok((result.to_dtype(DType::F32)? + h.reshape(shape)?)?)
    }
}

impl Adapter for FourierftAdapter {
    /// PEFT's `supports_lora_conversion`: Linear layers, by their additive delta.
    fn lora_conversion(
        &self,
        base: &crate::layer::BaseLayer,
    ) -> Result<Option<crate::layer::LoraConversion>> {
        crate::tuners::lora::conversion::additive_conversion(self, base, false)
    }

    fn peft_type(&self) -> &'static str {
        "FOURIERFT"
    }

    fn transform_output(
        &self,
        _base: &BaseLayer,
        x: &Tensor,
        result: Tensor,
        _ctx: &CallCtx<'_>,
    ) -> Result<Tensor> {
        self.forward_with(x, result, false)
    }

    fn delta_weight(&self, kind: &BaseKind) -> Result<Option<(Tensor, Option<Tensor>)>> {
        let delta = self.delta()?;
        match (kind, self.conv1d) {
            (BaseKind::Linear, false) => Ok(Some((delta, None))),
            (BaseKind::Conv1D, true) => Ok(Some((delta.t()?.contiguous()?, None))),
            _ => Err(PeftError::Invalid(format!(
                "FourierFT adapter of a {} layer merged into a {kind:?} layer",
                if self.conv1d { "Conv1D" } else { "Linear" }
            ))),
        }
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        vec![(
            FOURIERFT_SPECTRUM.to_string(),
            self.spectrum.as_tensor().clone(),
        )]
    }

    fn vars(&self) -> Vec<(String, Var)> {
        vec![(FOURIERFT_SPECTRUM.to_string(), self.spectrum.clone())]
    }

    fn saved_dtype(&self) -> DType {
        self.saved_dtype
    }

    fn describe(&self) -> String {
        format!(
            "fourierft_spectrum [{}] (scaling={})",
            self.spectrum.as_tensor().elem_count(),
            self.scaling
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AdapterSlot, ForwardCtx};

    /// `Re(ifft2(S))·scaling` by the definition, in f64.
    fn naive_delta(a: &FourierftAdapter) -> Vec<Vec<f64>> {
        let (m, n) = (a.n_out, a.n_in);
        let s = a.spectrum.as_tensor().to_vec1::<f32>().unwrap();
        let locs = a.locations().unwrap();
        let tau = 2.0 * std::f64::consts::PI;
        (0..m)
            .map(|j| {
                (0..n)
                    .map(|k| {
                        let sum: f64 = locs
                            .iter()
                            .zip(&s)
                            .map(|(&(r, c), &v)| {
                                let t = j as f64 * r as f64 / m as f64 + k as f64 * c as f64 / n as f64;
                                f64::from(v) * (tau * t).cos()
                            })
                            .sum();
                        sum * a.scaling / (m * n) as f64
                    })
                    .collect()
            })
            .collect()
    }

    fn config(n: usize) -> FourierftConfig {
        FourierftConfig {
            n_frequency: n,
            scaling: 7.5,
            ..Default::default()
        }
    }

    #[test]
    fn delta_is_the_real_inverse_dft_and_both_forward_routes_agree() {
        let mut rng = PeftRng::new(5);
        let dev = Device::Cpu;
        for (out, inp, n) in [(6, 5, 7), (4, 9, 36), (1, 3, 2), (12, 8, 1)] {
            let w = rng.normal_tensor((out, inp), 0.0, 1.0, DType::F32, &dev).unwrap();
            let base = BaseLayer::linear(w.clone(), None).unwrap();
            let a = FourierftAdapter::new(&base, &config(n), "fc", &mut rng).unwrap();
            let want = naive_delta(&a);
            let got = a.delta().unwrap().to_vec2::<f32>().unwrap();
            for (gr, wr) in got.iter().zip(&want) {
                for (g, w) in gr.iter().zip(wr) {
                    assert!((f64::from(*g) - w).abs() < 1e-5, "{out}x{inp} n={n}: {g} vs {w}");
                }
            }
            let x = rng.normal_tensor((3, 2, inp), 0.0, 1.0, DType::F32, &dev).unwrap();
            let zero = Tensor::zeros((3, 2, out), DType::F32, &dev).unwrap();
            let f = a.forward_with(&x, zero.clone(), true).unwrap();
            let d = x
                .reshape((6, inp))
                .unwrap()
                .matmul(&a.delta().unwrap().t().unwrap())
                .unwrap()
                .reshape((3, 2, out))
                .unwrap();
            assert!(peft_test_support::max_diff(&f, &d) < 1e-5);
            let auto = a.forward_with(&x, zero, false).unwrap();
            assert!(peft_test_support::max_diff(&auto, &d) < 1e-5);
        }
    }

    #[test]
    fn large_dimensions_reduce_the_angles_exactly() {
        // 70000 ≥ 2¹⁶ takes the i64 tables: the row 69999 of frequency 69999 has angle 2π·1/70000
        let f = Tensor::new(&[69_999u32, 1], &Device::Cpu).unwrap();
        let t = dft_table(70_000, &f).unwrap();
        assert_eq!(t.dims(), [70_000, 4]);
        let row = t.get(69_999).unwrap().to_vec1::<f32>().unwrap();
        let th = 2.0 * std::f64::consts::PI / 70_000.0;
        assert!((f64::from(row[0]) - th.cos()).abs() < 1e-6);
        assert!((f64::from(row[2]) - th.sin()).abs() < 1e-6);
        assert!((f64::from(row[3]) + th.sin()).abs() < 1e-6); // 69999·1 ≡ −1
    }

    #[test]
    fn forward_merge_and_unmerge_agree_for_linear_and_conv1d() {
        let mut rng = PeftRng::new(7);
        let dev = Device::Cpu;
        for conv1d in [false, true] {
            let w = rng.normal_tensor((6, 5), 0.0, 1.0, DType::F32, &dev).unwrap();
            // a Conv1D weight is [in, out]: the same map as the Linear of its transpose
            let base = if conv1d {
                BaseLayer::conv1d(w.t().unwrap().contiguous().unwrap(), None).unwrap()
            } else {
                BaseLayer::linear(w.clone(), None).unwrap()
            };
            let a = FourierftAdapter::new(&base, &config(9), "fc", &mut rng).unwrap();
            let delta = a.delta().unwrap();
            let x = rng.normal_tensor((4, 5), 0.0, 1.0, DType::F32, &dev).unwrap();
            let want = x.matmul(&(w.clone() + &delta).unwrap().t().unwrap()).unwrap();
            let mut slot = AdapterSlot::new("fc", base.clone());
            slot.add_adapter("default", Box::new(a)).unwrap();
            let ctx = ForwardCtx::eval();
            assert!(peft_test_support::max_diff(&slot.forward(&x, &ctx).unwrap(), &want) < 1e-5);
            slot.merge(None).unwrap();
            assert!(peft_test_support::max_diff(&slot.forward(&x, &ctx).unwrap(), &want) < 1e-5);
            slot.unmerge().unwrap();
            let back = slot.base().weight().unwrap();
            assert!(peft_test_support::max_diff(&back, &base.weight().unwrap()) < 1e-5);
        }
    }

    #[test]
    fn the_spectrum_gets_a_gradient_from_the_zero_start() {
        let mut rng = PeftRng::new(4);
        let dev = Device::Cpu;
        let w = rng.normal_tensor((6, 5), 0.0, 1.0, DType::F32, &dev).unwrap();
        let base = BaseLayer::linear(w, None).unwrap();
        let cfg = FourierftConfig {
            init_weights: true,
            ..config(8)
        };
        let a = FourierftAdapter::new(&base, &cfg, "fc", &mut rng).unwrap();
        assert_eq!(a.delta().unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        let x = rng.normal_tensor((4, 5), 0.0, 1.0, DType::F32, &dev).unwrap();
        let vars = a.vars();
        let mut slot = AdapterSlot::new("fc", base);
        slot.add_adapter("default", Box::new(a)).unwrap();
        let y = slot.forward(&x, &ForwardCtx::eval()).unwrap();
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let g = grads.get(vars[0].1.as_tensor()).expect("a gradient for the spectrum");
        let total = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(total.is_finite() && total > 0.0, "{total}");
    }

    #[test]
    fn sizes_and_kinds_are_checked() {
        let dev = Device::Cpu;
        let base = BaseLayer::linear(Tensor::zeros((3, 4), DType::F32, &dev).unwrap(), None).unwrap();
        let mut rng = PeftRng::new(0);
        assert!(FourierftAdapter::new(&base, &config(12), "fc", &mut rng).is_ok());
        let e = FourierftAdapter::new(&base, &config(13), "fc", &mut rng).unwrap_err();
        assert!(e.to_string().contains("product is 12"), "{e}");
        let e = FourierftAdapter::new(&base, &config(0), "fc", &mut rng).unwrap_err();
        assert!(e.to_string().contains("positive"), "{e}");
        let emb = BaseLayer::embedding(Tensor::zeros((10, 4), DType::F32, &dev).unwrap()).unwrap();
        let e = FourierftAdapter::new(&emb, &config(4), "emb", &mut rng).unwrap_err();
        assert!(matches!(e, PeftError::Unsupported { .. }), "{e}");
    }
}
