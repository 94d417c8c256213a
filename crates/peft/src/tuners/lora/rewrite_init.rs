//! The LoRA initialisations that rewrite the base weight, as PEFT 0.21.2's `pissa_init` and `olora_init`
//! (`tuners/lora/layer.py`), and the conversion of such an adapter back to a plain LoRA of the original base
//! on save (`save_pretrained(path_initial_model_for_weight_conversion=…)`, `LoraModel.subtract_mutated_init`).
//!
//! - **PiSSA** (`init_lora_weights="pissa"`): the base weight's top-`r` singular triplets move into the
//!   adapter, `A = diag(√(S/s))·Vᵀ`, `B = U·diag(√(S/s))` (`s` the LoRA scaling), and the base keeps the
//!   residual `W − s·B·A`. The SVD is faer's in f64; singular-vector signs are arbitrary in any SVD (torch's
//!   follow LAPACK's `gesdd`, which no rule reproduces), so each pair is signed canonically
//!   ([`crate::merge_utils::ThinSvd`]): `B·A`, the residual and the outputs are PEFT's, and so is training
//!   from them (the loss is invariant under flipping a pair and the optimizers act elementwise, so the
//!   trajectory flips with it), and the converted adapter on save is PEFT's up to those signs.
//! - **OLoRA** (`"olora"`): `W = Q·R` by Householder QR with LAPACK's `geqrf` signs (`R`'s diagonal is
//!   `−sign(α)·‖x‖` of each reflected column), `A = R[:r]`, `B = Q[:, :r]`, the base keeps `W − s·B·A`; this
//!   one is PEFT's bit for bit up to rounding.
//!
//! Both need a dense Linear (or, PiSSA only, GPT-2 Conv1D) weight: a quantized base is refused (PEFT asks to
//! initialise in float and re-quantize the residual). [`crate::PeftModel`] subtracts each new adapter's delta
//! from its base when the config rewrites it, on creation and, as PEFT's `from_pretrained` does, on loading a
//! file whose config still names the initialisation.
//!
//! ```
//! # fn main() -> peft::Result<()> {
//! use peft::tuners::lora::rewrite_init::householder_qr;
//! let (q, r) = householder_qr(&[3.0, 1.0, 4.0, 2.0], 2, 2); // [[3, 1], [4, 2]]
//! assert!((r[0] + 5.0).abs() < 1e-12); // −sign(3)·‖(3, 4)‖
//! assert!((q[0] + 0.6).abs() < 1e-12 && (q[2] + 0.8).abs() < 1e-12);
//! # Ok(()) }
//! ```

use crate::config::PeftConfig;
use crate::layer::{Adapter, BaseKind, BaseLayer, registry};
use crate::merge_utils::ThinSvd;
use crate::{PeftError, PeftRng, Result};
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;

/// Tensors with their file keys.
type NamedTensors = Vec<(String, Tensor)>;

/// An initialisation that rewrites the base weight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RewriteInit {
    /// `"pissa"`: principal singular values and vectors.
    Pissa,
    /// `"olora"`: orthonormal (QR) initialisation.
    Olora,
}

impl RewriteInit {
    /// The name as in `init_lora_weights`.
    pub fn as_str(self) -> &'static str {
        match self {
            RewriteInit::Pissa => "pissa",
            RewriteInit::Olora => "olora",
        }
    }
}

/// The initial `(A [r, in], B [out, r])` (f32) of `init` for `base` at rank `r` and LoRA scaling `scaling`.
pub fn init_factors(
    init: RewriteInit,
    base: &BaseLayer,
    r: usize,
    scaling: f64,
) -> Result<(Tensor, Tensor)> {
    let refuse = |why: String| PeftError::Unsupported {
        field: "init_lora_weights".into(),
        value: format!("{:?}", init.as_str()),
        reason: why,
    };
    match (init, base.kind()) {
        (_, BaseKind::Linear) | (RewriteInit::Pissa, BaseKind::Conv1D) => {}
        (_, k) => {
            return Err(refuse(format!(
                "{} initialises Linear layers{} only, not {k:?}",
                init.as_str(),
                if init == RewriteInit::Pissa {
                    " and GPT-2 Conv1D"
                } else {
                    ""
                }
            )));
        }
    }
    if base.quantized().is_some() {
        return Err(refuse(
            "the base weight is quantized: initialise on the float weights and re-quantize the residual (as \
             PEFT asks)"
                .into(),
        ));
    }
    let w = base.weight()?.to_dtype(DType::F32)?;
    let w = match base.kind() {
        BaseKind::Conv1D => w.t()?.contiguous()?, // PEFT's transpose(weight, fan_in_fan_out)
        _ => w,
    };
    let (out, inp) = w.dims2()?;
    if r > out.min(inp) {
        return Err(PeftError::InvalidConfig(format!(
            "{}: r={r} exceeds the weight's smaller dimension {} ([{out}, {inp}])",
            init.as_str(),
            out.min(inp)
        )));
    }
    let values: Vec<f32> = w.flatten_all()?.to_device(&Device::Cpu)?.to_vec1()?;
    let dev = base.device();
    let (a, b) = match init {
        RewriteInit::Pissa => {
            let svd = ThinSvd::new(&values, out, inp)?;
            let (u, s, vt) = svd.truncated(r)?;
            let mut a = vec![0f32; r * inp];
            let mut b = vec![0f32; out * r];
            for k in 0..r {
                let sq = ((s[k] as f32) / scaling as f32).sqrt();
                for j in 0..inp {
                    a[k * inp + j] = sq * vt[k * inp + j] as f32;
                }
                for i in 0..out {
                    b[i * r + k] = u[i * r + k] as f32 * sq;
                }
            }
            (a, b)
        }
        RewriteInit::Olora => {
            let (q, rr) = householder_qr(&values, out, inp);
            let k = out.min(inp);
            let a: Vec<f32> = rr[..r * inp].iter().map(|&x| x as f32).collect();
            let mut b = vec![0f32; out * r];
            for i in 0..out {
                for c in 0..r {
                    b[i * r + c] = q[i * k + c] as f32;
                }
            }
            (a, b)
        }
    };
    Ok((
        Tensor::from_vec(a, (r, inp), &Device::Cpu)?.to_device(dev)?,
        Tensor::from_vec(b, (out, r), &Device::Cpu)?.to_device(dev)?,
    ))
}

/// `W − ΔW` for `adapter` on `base`: the residual its init leaves in the base, in f32 and rounded once to the
/// weight's dtype (PEFT's `weight.data - scaling * lora_B @ lora_A`).
pub fn residual_weight(adapter: &dyn Adapter, base: &BaseLayer, module: &str) -> Result<Tensor> {
    let (delta, _) = adapter.delta_weight(base.kind())?.ok_or_else(|| {
        PeftError::Invalid(format!("`{module}`: the new adapter has no additive delta"))
    })?;
    let w = base.weight()?;
    let res = (w.to_dtype(DType::F32)? - delta.to_device(w.device())?)?;
    Ok(res.to_dtype(w.dtype())?)
}

/// The residual a fresh init of `config` leaves in `base`: what PEFT's loading does when a file's config
/// still names the init (it runs the init again before it loads the tensors). The init draws nothing random.
pub fn fresh_residual(config: &PeftConfig, module: &str, base: &BaseLayer) -> Result<Tensor> {
    let fresh = registry::new_adapter(config, module, base, &mut PeftRng::new(0))?;
    residual_weight(fresh.as_ref(), base, module)
}

/// The reduced QR factorization `M = Q·R` of a row-major `[m, n]` matrix by Householder reflections with
/// LAPACK's conventions (`geqrf` / `orgqr`, as torch's `linalg.qr`): `Q` `[m, k]` and `R` `[k, n]`,
/// `k = min(m, n)`, row-major, in f64. A column already zero below the diagonal is not reflected (its `R`
/// entry keeps its sign).
pub fn householder_qr(m: &[f32], rows: usize, cols: usize) -> (Vec<f64>, Vec<f64>) {
    let k = rows.min(cols);
    let mut a: Vec<f64> = m.iter().map(|&x| f64::from(x)).collect();
    let mut vs: Vec<(Vec<f64>, f64)> = Vec::with_capacity(k);
    for j in 0..k {
        let alpha = a[j * cols + j];
        let xnorm = (j + 1..rows)
            .map(|i| a[i * cols + j] * a[i * cols + j])
            .sum::<f64>()
            .sqrt();
        if xnorm == 0.0 {
            vs.push((Vec::new(), 0.0));
            continue;
        }
        let beta = -alpha.signum() * alpha.hypot(xnorm);
        let tau = (beta - alpha) / beta;
        let scale = 1.0 / (alpha - beta);
        let mut v = vec![1.0f64; rows - j];
        for i in j + 1..rows {
            v[i - j] = a[i * cols + j] * scale;
        }
        // Apply H = I − τ·v·vᵀ to the columns j.. of the rows j..
        a[j * cols + j] = beta;
        for i in j + 1..rows {
            a[i * cols + j] = 0.0;
        }
        for c in j + 1..cols {
            let s: f64 = (j..rows).map(|i| v[i - j] * a[i * cols + c]).sum();
            let t = tau * s;
            for i in j..rows {
                a[i * cols + c] -= t * v[i - j];
            }
        }
        vs.push((v, tau));
    }
    let mut r = vec![0f64; k * cols];
    for i in 0..k {
        for c in i..cols {
            r[i * cols + c] = a[i * cols + c];
        }
    }
    // Q = H₀·H₁⋯H_{k−1}·I[:, :k], applied from the last reflector.
    let mut q = vec![0f64; rows * k];
    for i in 0..k {
        q[i * k + i] = 1.0;
    }
    for j in (0..k).rev() {
        let (v, tau) = &vs[j];
        if *tau == 0.0 {
            continue;
        }
        for c in 0..k {
            let s: f64 = (j..rows).map(|i| v[i - j] * q[i * k + c]).sum();
            let t = tau * s;
            for i in j..rows {
                q[i * k + c] -= t * v[i - j];
            }
        }
    }
    (q, r)
}

/// PEFT's `subtract_mutated_init`: the adapter trained from a rewritten base as a LoRA of the original base,
/// `ΔW = B·A − B₀·A₀ = [B | −B₀]·[A ; A₀]`, from the trained tensors and the initial ones (both keyed as in
/// an adapter file, `base_model.model.<module>.lora_A.weight`). Other keys pass unchanged.
pub fn subtract_mutated_init(
    trained: &[(String, Tensor)],
    initial: &IndexMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>> {
    let mut out = Vec::with_capacity(trained.len());
    for (k, t) in trained {
        let is_a = k.ends_with(".lora_A.weight");
        let is_b = k.ends_with(".lora_B.weight");
        if !is_a && !is_b {
            out.push((k.clone(), t.clone()));
            continue;
        }
        let t0 = initial.get(k).ok_or_else(|| {
            PeftError::Invalid(format!(
                "the initial adapter has no `{k}` (was it saved right after the initialisation, from this \
                 adapter?)"
            ))
        })?;
        let t0 = t0.to_dtype(t.dtype())?.to_device(t.device())?;
        let joined = if is_a {
            Tensor::cat(&[t, &t0], 0)?
        } else {
            Tensor::cat(&[t, &t0.neg()?], 1)?
        };
        out.push((k.clone(), joined.contiguous()?));
    }
    Ok(out)
}


impl<M: crate::host::AdapterHost> crate::PeftModel<M> {
    /// PEFT's `save_pretrained(dir, path_initial_model_for_weight_conversion=initial)`: every adapter, trained
    /// from a base its init rewrote (PiSSA, OLoRA), written as a LoRA of the *original* base
    /// ([`subtract_mutated_init`]): rank `2r` (`rank_pattern` doubled), `lora_alpha` doubled (`√2`× with
    /// rsLoRA, keeping the scaling), `alpha_pattern` doubled, `init_lora_weights: true`. `initial` is the
    /// adapter directory saved right after the init, before training; as PEFT, its `adapter_config.json` is
    /// rewritten with `init_lora_weights: true` (so that loading it does not rewrite a base again). Unlike
    /// PEFT, which drops them, the adapter's other tensors (`modules_to_save`, `lora_bias`) are kept.
    ///
    /// ```no_run
    /// # fn demo<M: peft::host::AdapterHost>(pm: &mut peft::PeftModel<M>) -> peft::Result<()> {
    /// pm.save_pretrained("out/pissa_init")?; // right after get_peft_model with init_lora_weights="pissa"
    /// // … train …
    /// pm.save_pretrained_converted("out/as_lora", "out/pissa_init")?;
    /// # Ok(()) }
    /// ```
    pub fn save_pretrained_converted(
        &self,
        dir: impl AsRef<std::path::Path>,
        initial: impl AsRef<std::path::Path>,
    ) -> Result<()> {
        let initial = initial.as_ref();
        let file = crate::io::load_adapter(initial, &Device::Cpu).map_err(|e| {
            PeftError::Invalid(format!(
                "path_initial_model_for_weight_conversion {}: {e}",
                initial.display()
            ))
        })?;
        let list = self.saved_adapters()?;
        if list.is_empty() {
            return Err(PeftError::Unsupported {
                field: "path_initial_model_for_weight_conversion".into(),
                value: initial.display().to_string(),
                reason: "the model has no layer adapter (prompt learning cannot be converted)".into(),
            });
        }
        let mut converted: Vec<(String, PeftConfig, NamedTensors)> = Vec::new();
        for (name, config, sd) in list {
            let PeftConfig::Lora(c) = config else {
                return Err(PeftError::Unsupported {
                    field: "path_initial_model_for_weight_conversion".into(),
                    value: name.to_string(),
                    reason: format!(
                        "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not \
                         supported for {}",
                        config.peft_type().as_str()
                    ),
                });
            };
            if c.lora.use_rslora
                && (!c.patterns.rank_pattern.is_empty() || !c.patterns.alpha_pattern.is_empty())
            {
                return Err(PeftError::InvalidConfig(
                    "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not supported \
                     when using `rank_pattern` or `alpha_pattern` at the same time as `use_rslora=True`."
                        .into(),
                ));
            }
            let mut initial_config = c.clone();
            initial_config.lora.init_lora_weights = super::config::InitLoraWeights::Bool(true);
            PeftConfig::Lora(initial_config.clone()).save(initial)?;
            let tensors = subtract_mutated_init(&sd, &file.tensors)?;
            let mut out = initial_config;
            out.lora.r *= 2;
            out.lora.lora_alpha *= if out.lora.use_rslora {
                std::f64::consts::SQRT_2
            } else {
                2.0
            };
            for v in out.patterns.rank_pattern.values_mut() {
                *v *= 2;
            }
            for v in out.patterns.alpha_pattern.values_mut() {
                *v *= 2.0;
            }
            converted.push((name.to_string(), PeftConfig::Lora(out), tensors));
        }
        let refs: Vec<crate::io::AdapterToSave<'_>> = converted
            .iter()
            .map(|(n, c, t)| (n.as_str(), c, t.clone()))
            .collect();
        crate::io::save_adapters(dir, &refs)
    }
}
