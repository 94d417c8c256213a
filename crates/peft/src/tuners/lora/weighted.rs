//! PEFT's `LoraModel.add_weighted_adapter`: a new LoRA adapter made from weighted existing ones.
//!
//! [`PeftModel::add_weighted_adapter`] follows PEFT 0.21.2 (`tuners/lora/model.py`, `utils/merge_utils.py`)
//! for every combination type; with `sᵢ` the scaling of source `i` and `wᵢ` its weight:
//!
//! | type | works on | result |
//! |---|---|---|
//! | `cat` | A, B | `A′ = [w₁s₁A₁; w₂s₂A₂; …]`, `B′ = [B₁ B₂ …]`, zero-padded to the new rank: exactly `Σ wᵢsᵢBᵢAᵢ`. |
//! | `linear` | A, B | `A′ = Σ sign(wᵢsᵢ)√\|wᵢsᵢ\|·Aᵢ`, `B′ = Σ √\|wᵢsᵢ\|·Bᵢ`: **not** `Σ wᵢΔᵢ` (cross terms) unless one adapter. |
//! | `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` | A, B | the [`crate::merge_utils`] merge of the `Aᵢ` (weights `sign·√\|wᵢsᵢ\|`) and of the `Bᵢ` (weights `√\|wᵢsᵢ\|`). |
//! | `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd` | `Δᵢ = sᵢBᵢAᵢ` | the merge of the `Δᵢ` with weights `wᵢ`, then a truncated SVD: `B′ = U·diag(S)`, `A′ = Vᵀ` (rank `svd_rank`). |
//!
//! The new adapter's config is the first source's with `r = lora_alpha = new_r` (`Σ rᵢ` for `cat`,
//! `svd_rank` or the largest rank for the SVD types, the common rank otherwise; a rank is `max(r,
//! rank_pattern…)`), `target_modules` the union of the sources' lists (or `"(t1)|(t2)…"` for regexes), and
//! empty `rank_pattern` / `alpha_pattern`, so its scaling is 1. In each module only the sources present there
//! take part. Like PEFT, the new adapter is added inactive.
//!
//! # Where this differs from PEFT, on purpose
//!
//! * **rsLoRA is not inherited.** PEFT copies `use_rslora` from the first adapter, which makes the combined
//!   adapter's scaling `√new_r` instead of 1 (peft issue #3761). Here `use_rslora` is always `false`: the
//!   result is the combination PEFT means to compute, and the rsLoRA-first case gives PEFT's adapter divided by
//!   `√new_r`.
//! * PEFT's silent cases are errors: an existing `adapter_name` (PEFT returns and does nothing), `svd_rank`
//!   above `min(out, in)` of a module (PEFT builds broken factors), `svd_rank = 0` (PEFT treats it as unset), a
//!   weight count that differs from the adapter count (PEFT's `zip` drops the rest), a single adapter with a
//!   type other than `linear` (PEFT silently switches to `linear`), `density` above 1 (PEFT warns and does not
//!   prune), and `density`, `svd_rank` or `svd_clamp` given to a type that does not use them (PEFT ignores
//!   them). `density = 1` is accepted and means "no pruning" (no random draws), as in PEFT.
//! * Sources PEFT combines wrongly are refused: DoRA and `lora_bias` adapters (their magnitude and bias are
//!   dropped by PEFT), `target_parameters`, and adapters with `modules_to_save` (PEFT only refuses two of them
//!   on one module; the copies cannot be combined).
//! * The DARE types need an explicit [`DareSeed`]; PEFT draws from torch's global generator.
//! * A module whose sources have a smaller rank than the new one (a `rank_pattern`) gets its A/B-type factors
//!   zero-padded to the new rank (same `B′A′`); PEFT puts the smaller tensors in the layer while the config
//!   says the larger rank.
//!
//! # Reproducing PEFT's DARE masks
//!
//! [`DareSeed::Torch`]`(s)` gives PEFT's masks bit for bit when PEFT ran with `torch.manual_seed(s)` right
//! before `add_weighted_adapter` on CPU: torch's MT19937, after skipping the draws `inject_adapter` spends on
//! initialising the new layers (`Σ (2·r·in + r·out)` over the new Linear layers for `init_lora_weights =
//! true`, `Σ (r·in + r·out)` for `false`), then one draw per entry, module by module in the model's order: the
//! `A` of each present source then their `B` (A/B types), or each source's `Δ` (SVD types).
//! [`DareSeed::Plain`]`(s)` uses the same generator from `s` without the skip.
//!
//! # SVD signs and `svd_clamp`
//!
//! `svd_clamp = q` clamps both factors to `±quantile(cat(B′, A′), q)` on signed values, so with a clamp the
//! result depends on the signs of the singular vectors (without one it does not: `B′A′` is the same). PEFT's
//! signs are whatever torch's LAPACK (MKL's `gesdd` in the pinned wheels) returns; they follow no rule that
//! can be computed without running that LAPACK (checked on the fixtures: neither "largest entry positive"
//! nor "first entry positive" holds for U or V). The SVD here is faer's, in f64, and [`SvdSigns`] picks the
//! signs: [`SvdSigns::Canonical`] (the largest-magnitude entry of each row of A′ positive: deterministic, not
//! LAPACK's), or [`SvdSigns::Reference`] with torch's pre-clamp factors (the fixtures store them), which gives
//! PEFT's clamped result. `svd_full_matrices` only changes PEFT's result when `svd_rank` is above
//! `min(out, in)`, which is an error here, so it has no effect.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use peft::config::{InitLoraWeights, LoraConfig, LoraFields, TargetFields};
//! use peft::host::AdapterHost;
//! use peft::tuners::lora::weighted::{CombinationType, WeightedOptions};
//! use peft::tuners::tuners_utils::{ModuleInfo, ModuleKind};
//! use peft::{AdapterSlot, BaseLayer, PeftModel};
//!
//! #[derive(Debug)]
//! struct One { slots: Vec<AdapterSlot> }
//! impl AdapterHost for One {
//!     fn module_infos(&self) -> Vec<ModuleInfo> {
//!         vec![ModuleInfo { name: "fc".into(), kind: ModuleKind::Linear }]
//!     }
//!     fn output_layer(&self) -> Option<String> { None }
//!     fn input_embeddings(&self) -> Option<String> { None }
//!     fn slots(&self) -> Vec<&AdapterSlot> { self.slots.iter().collect() }
//!     fn slots_mut(&mut self) -> Vec<&mut AdapterSlot> { self.slots.iter_mut().collect() }
//!     fn named_tensors(&self) -> Vec<(String, Tensor)> { Vec::new() }
//!     fn set_tensor(&mut self, name: &str, _: Tensor) -> peft::Result<()> {
//!         Err(peft::PeftError::MissingKey(name.into()))
//!     }
//! }
//! # fn main() -> peft::Result<()> {
//! let w = Tensor::zeros((6, 5), DType::F32, &Device::Cpu)?;
//! let host = One { slots: vec![AdapterSlot::new("fc", BaseLayer::linear(w, None)?)] };
//! let lora = |r: usize| -> peft::PeftConfig {
//!     LoraConfig {
//!         lora: LoraFields { r, lora_alpha: 2.0 * r as f64, init_lora_weights: InitLoraWeights::Bool(false), ..Default::default() },
//!         targets: TargetFields::modules(["fc"]),
//!         ..Default::default()
//!     }.into()
//! };
//! let mut pm = PeftModel::get_peft_model(host, lora(2), "a", 1)?;
//! pm.add_adapter("b", lora(3))?;
//! // `cat` is exact: the new delta is 0.5·Δa − 1.5·Δb, with rank 2 + 3.
//! pm.add_weighted_adapter(&["a", "b"], &[0.5, -1.5], "ab", &WeightedOptions::new(CombinationType::Cat))?;
//! let delta = |n: &str| pm.model().slots()[0].adapter(n).unwrap()
//!     .delta_weight(&peft::BaseKind::Linear).unwrap().unwrap().0;
//! let want = ((delta("a") * 0.5)? - (delta("b") * 1.5)?)?;
//! let err = (delta("ab") - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(err < 1e-5);
//! let peft::PeftConfig::Lora(c) = &pm.configs()["ab"] else { unreachable!() };
//! assert_eq!((c.lora.r, c.lora.lora_alpha, c.lora.use_rslora), (5, 5.0, false));
//! # Ok(()) }
//! ```

use super::config::{InitLoraWeights, LoraConfig};
use super::layer::{LoraAdapter, LoraOptions};
use crate::config::{PeftConfig, TargetModules};
use crate::host::AdapterHost;
use crate::layer::BaseKind;
use crate::merge_utils::{self, MajoritySignMethod};
use crate::tuners::vera::prng::Mt19937;
use crate::{PeftError, PeftModel, Result};
use candle_core::{DType, Device, Tensor};
use indexmap::IndexMap;
use std::str::FromStr;

/// PEFT's `combination_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CombinationType {
    /// `"linear"`: A and B combined separately with `√|w·s|` on each side.
    Linear,
    /// `"cat"`: the factors concatenated; exact.
    Cat,
    /// `"svd"`: `Σ wᵢΔᵢ`, then a truncated SVD. PEFT's default.
    Svd,
    /// `"ties"`: TIES on A and on B.
    Ties,
    /// `"ties_svd"`: TIES on the `Δᵢ`, then SVD.
    TiesSvd,
    /// `"dare_linear"`: DARE (random pruning, rescaled) and a weighted sum, on A and on B.
    DareLinear,
    /// `"dare_ties"`: DARE then TIES' election and disjoint mean, on A and on B.
    DareTies,
    /// `"dare_linear_svd"`: `dare_linear` on the `Δᵢ`, then SVD.
    DareLinearSvd,
    /// `"dare_ties_svd"`: `dare_ties` on the `Δᵢ`, then SVD.
    DareTiesSvd,
    /// `"magnitude_prune"`: top-k pruning and a weighted sum, on A and on B.
    MagnitudePrune,
    /// `"magnitude_prune_svd"`: `magnitude_prune` on the `Δᵢ`, then SVD.
    MagnitudePruneSvd,
}

impl CombinationType {
    /// Every type, in PEFT's documentation order.
    pub const ALL: [CombinationType; 11] = [
        Self::Svd,
        Self::Linear,
        Self::Cat,
        Self::Ties,
        Self::TiesSvd,
        Self::DareTies,
        Self::DareLinear,
        Self::DareTiesSvd,
        Self::DareLinearSvd,
        Self::MagnitudePrune,
        Self::MagnitudePruneSvd,
    ];

    /// PEFT's spelling (`"dare_ties_svd"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::Cat => "cat",
            Self::Svd => "svd",
            Self::Ties => "ties",
            Self::TiesSvd => "ties_svd",
            Self::DareLinear => "dare_linear",
            Self::DareTies => "dare_ties",
            Self::DareLinearSvd => "dare_linear_svd",
            Self::DareTiesSvd => "dare_ties_svd",
            Self::MagnitudePrune => "magnitude_prune",
            Self::MagnitudePruneSvd => "magnitude_prune_svd",
        }
    }

    /// Whether the result comes from a truncated SVD of the merged `ΔW`.
    pub fn is_svd(self) -> bool {
        matches!(
            self,
            Self::Svd
                | Self::TiesSvd
                | Self::DareLinearSvd
                | Self::DareTiesSvd
                | Self::MagnitudePruneSvd
        )
    }

    /// Whether the type draws random masks (DARE).
    pub fn is_dare(self) -> bool {
        matches!(
            self,
            Self::DareLinear | Self::DareTies | Self::DareLinearSvd | Self::DareTiesSvd
        )
    }

    /// Whether the type prunes, and so needs `density`.
    pub fn uses_density(self) -> bool {
        !matches!(self, Self::Linear | Self::Cat | Self::Svd)
    }

    /// Whether the type elects signs (TIES), and so uses `majority_sign_method`.
    pub fn uses_majority_sign(self) -> bool {
        matches!(
            self,
            Self::Ties | Self::TiesSvd | Self::DareTies | Self::DareTiesSvd
        )
    }
}

impl std::fmt::Display for CombinationType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CombinationType {
    type Err = PeftError;

    /// PEFT's spelling; anything else is PEFT's `Invalid combination_type` error.
    fn from_str(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| PeftError::Invalid(format!("Invalid combination_type: {s}")))
    }
}

/// Where the DARE types draw their masks from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DareSeed {
    /// PEFT's masks bit for bit, as after `torch.manual_seed(seed)` right before PEFT's call (CPU): torch's
    /// MT19937 after the draws PEFT's `inject_adapter` spends on the new layers. Only Linear (and GPT-2
    /// `Conv1D`) layers with `init_lora_weights` `true` or `false` on the first source are supported.
    Torch(u64),
    /// The same generator seeded with `seed`, without that skip: reproducible, not PEFT's.
    Plain(u64),
}

/// How the SVD types sign each singular pair before `svd_clamp` (see the module docs).
#[derive(Clone, Debug, Default)]
pub enum SvdSigns {
    /// The largest-magnitude entry of each row of A′ positive ([`merge_utils::svd_factors`]).
    #[default]
    Canonical,
    /// Each pair signed like reference factors `(B, A)` (`[out, r]`, `[r, in]`) by module name, such as the
    /// ones torch's SVD gives PEFT before the clamp ([`merge_utils::align_svd_signs`]); modules without a
    /// reference are signed canonically.
    Reference(IndexMap<String, (Tensor, Tensor)>),
}

impl SvdSigns {
    /// [`SvdSigns::Reference`] from `(module, (B, A))` pairs.
    pub fn from_factors(factors: impl IntoIterator<Item = (String, (Tensor, Tensor))>) -> Self {
        Self::Reference(factors.into_iter().collect())
    }
}

/// The options of [`PeftModel::add_weighted_adapter`] (PEFT's keyword arguments).
///
/// ```
/// use peft::tuners::lora::weighted::{CombinationType, DareSeed, WeightedOptions};
/// let o = WeightedOptions {
///     density: Some(0.5),
///     dare_seed: Some(DareSeed::Torch(0)),
///     ..WeightedOptions::new(CombinationType::DareTies)
/// };
/// assert!(o.combination_type.is_dare());
/// ```
#[derive(Clone, Debug)]
pub struct WeightedOptions {
    /// `combination_type` (PEFT's default is `svd`).
    pub combination_type: CombinationType,
    /// `svd_rank`: the rank of an SVD result (default: the largest source rank).
    pub svd_rank: Option<usize>,
    /// `svd_clamp`: a quantile in `[0, 1]`; both SVD factors are clamped to `±` that quantile of their
    /// values.
    pub svd_clamp: Option<f64>,
    /// `svd_full_matrices` (default `true`). No effect on the result here (see the module docs); kept for
    /// the config of a call.
    pub svd_full_matrices: bool,
    /// `density`: the fraction of entries kept by the pruning types, in `[0, 1]`.
    pub density: Option<f64>,
    /// `majority_sign_method` of the TIES types (default `total`); ignored by the others.
    pub majority_sign_method: MajoritySignMethod,
    /// The DARE types' generator; required by them, ignored by the others.
    pub dare_seed: Option<DareSeed>,
    /// How singular pairs are signed before `svd_clamp` (no effect without a clamp).
    pub svd_signs: SvdSigns,
}

impl WeightedOptions {
    /// The options for `combination_type`, everything else at PEFT's defaults.
    pub fn new(combination_type: CombinationType) -> Self {
        Self {
            combination_type,
            svd_rank: None,
            svd_clamp: None,
            svd_full_matrices: true,
            density: None,
            majority_sign_method: MajoritySignMethod::Total,
            dare_seed: None,
            svd_signs: SvdSigns::Canonical,
        }
    }
}

impl Default for WeightedOptions {
    /// PEFT's defaults (`combination_type = "svd"`).
    fn default() -> Self {
        Self::new(CombinationType::Svd)
    }
}

fn invalid(msg: impl Into<String>) -> PeftError {
    PeftError::Invalid(msg.into())
}

/// One source's factors in one module, flattened: `A` `[r, k]`, `B` `[out, r]`.
struct Factors {
    r: usize,
    a: Vec<f32>,
    b: Vec<f32>,
    scaling: f64,
}

/// The new factors of one module, in the shapes [`LoraAdapter::from_tensors`] wants.
struct Combined {
    a: Vec<f32>,
    b: Vec<f32>,
}

fn factors_of(
    slot: &crate::AdapterSlot,
    name: &str,
    config: &LoraConfig,
) -> Result<Option<Factors>> {
    let Some(adapter) = slot.adapter(name) else {
        return Ok(None);
    };
    let tensors: IndexMap<String, Tensor> = adapter.tensors().into_iter().collect();
    let get = |keys: [&str; 2]| {
        keys.iter()
            .find_map(|k| tensors.get(*k))
            .cloned()
            .ok_or_else(|| {
                invalid(format!(
                    "adapter `{name}` in `{}` is not a LoRA layer",
                    slot.name()
                ))
            })
    };
    let a = get(["lora_A.weight", "lora_embedding_A"])?;
    let b = get(["lora_B.weight", "lora_embedding_B"])?;
    let r = a.dim(0)?;
    let scaling = LoraOptions::from_config(config, slot.name()).scaling();
    let flat = |t: &Tensor| -> Result<Vec<f32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
    };
    Ok(Some(Factors {
        r,
        a: flat(&a)?,
        b: flat(&b)?,
        scaling,
    }))
}

/// `(rows, cols)` → the transposed row-major copy.
fn transpose(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = x[i * cols + j];
        }
    }
    out
}

/// `s·B·A` as `[out, k]`, in f32 (PEFT's `get_delta_weight` before any transpose).
fn delta_of(f: &Factors, out: usize, k: usize) -> Result<Vec<f32>> {
    let dev = Device::Cpu;
    let b = Tensor::from_slice(&f.b, (out, f.r), &dev)?;
    let a = Tensor::from_slice(&f.a, (f.r, k), &dev)?;
    Ok((b.matmul(&a)? * f.scaling)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

/// Runs the merge of `ctype` over `tensors` with `weights`.
fn merge_list(
    ctype: CombinationType,
    tensors: &[&[f32]],
    weights: &[f32],
    density: Option<f64>,
    method: MajoritySignMethod,
    rng: &mut Option<Mt19937>,
) -> Result<Vec<f32>> {
    use CombinationType as C;
    let density = || density.ok_or_else(|| invalid(format!("`{ctype}` needs `density`")));
    let no_seed = || invalid(format!("`{ctype}` needs a DARE seed"));
    match ctype {
        C::Linear | C::Svd => merge_utils::task_arithmetic(tensors, weights),
        C::Ties | C::TiesSvd => merge_utils::ties(tensors, weights, density()?, method),
        C::MagnitudePrune | C::MagnitudePruneSvd => {
            merge_utils::magnitude_prune(tensors, weights, density()?)
        }
        C::DareLinear | C::DareLinearSvd => {
            let g = rng.as_mut().ok_or_else(no_seed)?;
            merge_utils::dare_linear(tensors, weights, density()?, g)
        }
        C::DareTies | C::DareTiesSvd => {
            let g = rng.as_mut().ok_or_else(no_seed)?;
            merge_utils::dare_ties(tensors, weights, density()?, method, g)
        }
        C::Cat => Err(invalid("`cat` is not a merge of task tensors")),
    }
}

/// How to combine one module.
struct Plan<'a> {
    ctype: CombinationType,
    opts: &'a WeightedOptions,
    new_r: usize,
}

impl Plan<'_> {
    fn combine(
        &self,
        kind: &BaseKind,
        out: usize,
        k: usize,
        sources: &[(Factors, f64)],
        rng: &mut Option<Mt19937>,
        module: &str,
    ) -> Result<Combined> {
        let new_r = self.new_r;
        let o = self.opts;
        if self.ctype == CombinationType::Cat {
            let mut a = vec![0f32; new_r * k];
            let mut b = vec![0f32; out * new_r];
            let mut row = 0usize;
            for (f, w) in sources {
                let (w32, s32) = (*w as f32, f.scaling as f32);
                for i in 0..f.r {
                    for j in 0..k {
                        a[(row + i) * k + j] = f.a[i * k + j] * w32 * s32;
                    }
                }
                for i in 0..out {
                    for j in 0..f.r {
                        b[i * new_r + row + j] = f.b[i * f.r + j];
                    }
                }
                row += f.r;
            }
            return Ok(Combined { a, b });
        }
        if self.ctype.is_svd() {
            // Δᵢ in the base weight's layout (`[in, out]` for Conv1D, `[V, D]` for embeddings): pruning draws
            // and ranks entries in that order, as PEFT's `get_delta_weight` gives them.
            let transposed = matches!(kind, BaseKind::Conv1D | BaseKind::Embedding);
            let deltas = sources
                .iter()
                .map(|(f, _)| {
                    let d = delta_of(f, out, k)?;
                    Ok(if transposed { transpose(&d, out, k) } else { d })
                })
                .collect::<Result<Vec<_>>>()?;
            let refs: Vec<&[f32]> = deltas.iter().map(|d| d.as_slice()).collect();
            let weights: Vec<f32> = sources.iter().map(|(_, w)| *w as f32).collect();
            let merged = merge_list(
                self.ctype,
                &refs,
                &weights,
                o.density,
                o.majority_sign_method,
                rng,
            )?;
            let merged = if transposed {
                transpose(&merged, k, out)
            } else {
                merged
            };
            if new_r > out.min(k) {
                return Err(invalid(format!(
                    "svd_rank {new_r} is above min(out, in) = {} of `{module}`",
                    out.min(k)
                )));
            }
            let (mut b, mut a) = merge_utils::svd_factors(&merged, out, k, new_r)?;
            if let Some(q) = o.svd_clamp {
                if let SvdSigns::Reference(refs) = &o.svd_signs
                    && let Some((rb, ra)) = refs.get(module)
                {
                    let flat = |t: &Tensor| -> Result<Vec<f32>> {
                        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
                    };
                    let (rb, ra) = (flat(rb)?, flat(ra)?);
                    if rb.len() != b.len() || ra.len() != a.len() {
                        return Err(invalid(format!(
                            "the reference SVD factors of `{module}` have {} and {} values, not {} and {}",
                            rb.len(),
                            ra.len(),
                            b.len(),
                            a.len()
                        )));
                    }
                    merge_utils::align_svd_signs(&mut b, &mut a, &rb, &ra, new_r);
                }
                merge_utils::clamp_svd_factors(&mut b, &mut a, q);
            }
            return Ok(Combined { a, b });
        }
        // A/B types: A's weights carry the sign of w·s, both carry √|w·s|.
        let mut wa = Vec::new();
        let mut wb = Vec::new();
        let r = sources[0].0.r;
        for (f, w) in sources {
            if f.r != r || r > new_r {
                return Err(invalid(format!(
                    "`{}` needs one rank (at most {new_r}) in every module, but `{module}` has ranks {:?}",
                    self.ctype,
                    sources.iter().map(|(f, _)| f.r).collect::<Vec<_>>()
                )));
            }
            let ws = w * f.scaling;
            let root = ws.abs().sqrt();
            wa.push((if ws >= 0.0 { root } else { -root }) as f32);
            wb.push(root as f32);
        }
        let a_refs: Vec<&[f32]> = sources.iter().map(|(f, _)| f.a.as_slice()).collect();
        let b_refs: Vec<&[f32]> = sources.iter().map(|(f, _)| f.b.as_slice()).collect();
        let a = merge_list(
            self.ctype,
            &a_refs,
            &wa,
            o.density,
            o.majority_sign_method,
            rng,
        )?;
        let b = merge_list(
            self.ctype,
            &b_refs,
            &wb,
            o.density,
            o.majority_sign_method,
            rng,
        )?;
        // A module whose rank is below the new one (a `rank_pattern`): zero rows of A′ and columns of B′,
        // which leave B′A′ unchanged (PEFT stores the smaller factors under the larger config rank).
        if r == new_r {
            return Ok(Combined { a, b });
        }
        let mut pa = vec![0f32; new_r * k];
        pa[..r * k].copy_from_slice(&a);
        let mut pb = vec![0f32; out * new_r];
        for i in 0..out {
            pb[i * new_r..i * new_r + r].copy_from_slice(&b[i * r..(i + 1) * r]);
        }
        Ok(Combined { a: pa, b: pb })
    }
}

/// A source's rank as PEFT counts it for the new rank: `max(r, rank_pattern…)`.
fn config_rank(c: &LoraConfig) -> usize {
    c.patterns
        .rank_pattern
        .values()
        .copied()
        .fold(c.lora.r, usize::max)
}

impl<M: AdapterHost> PeftModel<M> {
    /// PEFT's `add_weighted_adapter`: adds `adapter_name`, a LoRA adapter combining the LoRA adapters
    /// `adapters` with `weights` (negative weights subtract), as described in
    /// [the module docs](crate::tuners::lora::weighted). The new adapter is not made active.
    ///
    /// On error the model is unchanged.
    pub fn add_weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        adapter_name: &str,
        options: &WeightedOptions,
    ) -> Result<()> {
        let ctype = options.combination_type;
        let new_config = self.weighted_config(adapters, weights, adapter_name, options)?;
        let new_r = new_config.lora.r;
        let sources: Vec<(String, LoraConfig, f64)> = adapters
            .iter()
            .zip(weights)
            .map(|(n, w)| match &self.configs()[*n] {
                PeftConfig::Lora(c) => (n.to_string(), c.clone(), *w),
                _ => unreachable!("checked by weighted_config"),
            })
            .collect();
        let init = new_config.lora.init_lora_weights.clone();
        let lora_opts = LoraOptions {
            r: new_r,
            alpha: new_r as f64,
            use_rslora: false,
            use_dora: false,
            lora_bias: false,
            dropout: new_config.lora.lora_dropout,
            init: init.clone(),
        };
        self.add_adapter(adapter_name, new_config.into())?;
        let result = (|| -> Result<()> {
            let plan = Plan {
                ctype,
                opts: options,
                new_r,
            };
            let mut rng = match (ctype.is_dare(), options.dare_seed) {
                (false, _) => None,
                (true, None) => {
                    return Err(invalid(format!(
                        "`{ctype}` draws random masks: give a DARE seed"
                    )));
                }
                (true, Some(DareSeed::Plain(s))) => Some(Mt19937::new(s)),
                (true, Some(DareSeed::Torch(s))) => {
                    let mut g = Mt19937::new(s);
                    let skip = self.torch_init_draws(adapter_name, new_r, &init)?;
                    for _ in 0..skip {
                        g.next_u32();
                    }
                    Some(g)
                }
            };
            let mut built = Vec::new();
            for slot in self.model().slots() {
                if slot.adapter(adapter_name).is_none() {
                    continue;
                }
                let mut present = Vec::new();
                for (n, c, w) in &sources {
                    if let Some(f) = factors_of(slot, n, c)? {
                        present.push((f, *w));
                    }
                }
                if present.is_empty() {
                    return Err(invalid(format!(
                        "`{}` matches the combined targets but holds none of {adapters:?}",
                        slot.name()
                    )));
                }
                let base = slot.base();
                let out = present[0].0.b.len() / present[0].0.r;
                let k = present[0].0.a.len() / present[0].0.r;
                let c = plan.combine(base.kind(), out, k, &present, &mut rng, slot.name())?;
                let (a_shape, b_shape): (Vec<usize>, Vec<usize>) = match base.kind() {
                    BaseKind::Conv2d(_) => {
                        let w = base.weight_dims();
                        (vec![new_r, w[1], w[2], w[3]], vec![out, new_r, 1, 1])
                    }
                    _ => (vec![new_r, k], vec![out, new_r]),
                };
                let (ka, kb) = match base.kind() {
                    BaseKind::Embedding => ("lora_embedding_A", "lora_embedding_B"),
                    _ => ("lora_A.weight", "lora_B.weight"),
                };
                let dev = base.device();
                let mut tensors = IndexMap::new();
                tensors.insert(
                    ka.to_string(),
                    Tensor::from_vec(c.a, a_shape.as_slice(), &Device::Cpu)?.to_device(dev)?,
                );
                tensors.insert(
                    kb.to_string(),
                    Tensor::from_vec(c.b, b_shape.as_slice(), &Device::Cpu)?.to_device(dev)?,
                );
                let adapter = LoraAdapter::from_tensors(base, lora_opts.clone(), &tensors)?;
                built.push((slot.name().to_string(), adapter));
            }
            let active: Vec<String> = self.active_adapters().to_vec();
            for slot in self.model_mut().slots_mut() {
                if let Some(i) = built.iter().position(|(n, _)| n == slot.name()) {
                    let (_, adapter) = built.swap_remove(i);
                    slot.delete_adapter(adapter_name)?;
                    slot.add_adapter(adapter_name, Box::new(adapter))?;
                }
            }
            let refs: Vec<&str> = active.iter().map(|s| s.as_str()).collect();
            self.set_adapter(&refs)
        })();
        if let Err(e) = result {
            let _ = self.delete_adapter(adapter_name);
            return Err(e);
        }
        Ok(())
    }

    /// The draws PEFT's `inject_adapter` takes from torch's generator for the new adapter's layers.
    fn torch_init_draws(&self, name: &str, r: usize, init: &InitLoraWeights) -> Result<u64> {
        let per_in = match init {
            InitLoraWeights::Bool(true) => 2,
            InitLoraWeights::Bool(false) => 1,
            other => {
                return Err(PeftError::Unsupported {
                    field: "init_lora_weights".into(),
                    value: format!("{other:?}"),
                    reason: "torch-compatible DARE masks are only known for `true` and `false`"
                        .into(),
                });
            }
        };
        let mut n = 0u64;
        for slot in self.model().slots() {
            if slot.adapter(name).is_none() {
                continue;
            }
            let base = slot.base();
            match base.kind() {
                BaseKind::Linear | BaseKind::Conv1D => {
                    n += (per_in * r * base.in_features() + r * base.out_features()) as u64;
                }
                other => {
                    return Err(PeftError::Unsupported {
                        field: "dare_seed".into(),
                        value: "torch".into(),
                        reason: format!(
                            "torch-compatible DARE masks are only known for Linear layers, `{}` is {other:?}",
                            slot.name()
                        ),
                    });
                }
            }
        }
        Ok(n)
    }

    /// PEFT's `_check_add_weighted_adapter` plus the new config, with PEFT's silent cases made errors.
    fn weighted_config(
        &self,
        adapters: &[&str],
        weights: &[f64],
        adapter_name: &str,
        o: &WeightedOptions,
    ) -> Result<LoraConfig> {
        let ctype = o.combination_type;
        if self.configs().contains_key(adapter_name)
            || self.prompt_adapter_name() == Some(adapter_name)
        {
            return Err(PeftError::DuplicateAdapter(adapter_name.to_string()));
        }
        if adapters.is_empty() {
            return Err(invalid("add_weighted_adapter needs at least one adapter"));
        }
        if weights.len() != adapters.len() {
            return Err(invalid(format!(
                "{} weights for {} adapters",
                weights.len(),
                adapters.len()
            )));
        }
        if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
            return Err(invalid(format!("weight {w} is not finite")));
        }
        let mut configs = Vec::new();
        for a in adapters {
            let c = match self.configs().get(*a) {
                None => return Err(invalid(format!("Adapter {a} does not exist"))),
                Some(PeftConfig::Lora(c)) => c,
                Some(other) => {
                    return Err(PeftError::Unsupported {
                        field: "peft_type".into(),
                        value: other.peft_type().as_str().into(),
                        reason: format!(
                            "add_weighted_adapter combines LoRA adapters; `{a}` is not one"
                        ),
                    });
                }
            };
            let refuse = |field: &str, why: &str| PeftError::Unsupported {
                field: field.into(),
                value: format!("adapter `{a}`"),
                reason: why.into(),
            };
            if c.features.target_parameters.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(refuse(
                    "target_parameters",
                    "add_weighted_adapter does not support targeting nn.Parameter",
                ));
            }
            if c.lora.use_dora {
                return Err(refuse(
                    "use_dora",
                    "PEFT's combination drops DoRA's magnitude (peft #3761)",
                ));
            }
            if c.lora.lora_bias {
                return Err(refuse(
                    "lora_bias",
                    "PEFT's combination drops lora_B's bias (peft #3761)",
                ));
            }
            if c.targets.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
                return Err(refuse(
                    "modules_to_save",
                    "full module copies cannot be combined",
                ));
            }
            configs.push(c);
        }
        if adapters.len() == 1 && ctype != CombinationType::Linear {
            return Err(invalid(format!(
                "one adapter can only be combined with `linear` (PEFT silently uses `linear` instead of `{ctype}`)"
            )));
        }
        let uses_svd_args = ctype.is_svd();
        if !uses_svd_args && (o.svd_rank.is_some() || o.svd_clamp.is_some()) {
            return Err(invalid(format!(
                "svd_rank and svd_clamp only apply to the SVD types, not `{ctype}`"
            )));
        }
        if o.svd_rank == Some(0) {
            return Err(invalid("svd_rank must be positive"));
        }
        if let Some(q) = o.svd_clamp
            && !(0.0..=1.0).contains(&q)
        {
            return Err(invalid(format!("svd_clamp {q} is not a quantile in [0, 1]")));
        }
        match (ctype.uses_density(), o.density) {
            (true, None) => return Err(invalid(format!("`{ctype}` needs `density`"))),
            (false, Some(_)) => {
                return Err(invalid(format!("`{ctype}` does not use `density`")));
            }
            (true, Some(d)) if !(0.0..=1.0).contains(&d) => {
                return Err(invalid(format!("density {d} is not in [0, 1]")));
            }
            _ => {}
        }
        let ranks: Vec<usize> = configs.iter().map(|c| config_rank(c)).collect();
        let new_r = match ctype {
            CombinationType::Cat => ranks.iter().sum(),
            t if t.is_svd() => o.svd_rank.unwrap_or(*ranks.iter().max().expect("non-empty")),
            _ => {
                if ranks.iter().any(|r| *r != ranks[0]) {
                    return Err(invalid(format!(
                        "All adapters must have the same r value when using combination_type {ctype} (ranks {ranks:?})"
                    )));
                }
                ranks[0]
            }
        };
        let targets = configs
            .iter()
            .map(|c| c.targets.target_modules.clone())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid("every adapter to combine needs `target_modules`"))?;
        let new_targets = if targets.iter().all(|t| matches!(t, TargetModules::List(_))) {
            let mut union: Vec<String> = Vec::new();
            for t in &targets {
                if let TargetModules::List(l) = t {
                    for m in l {
                        if !union.contains(m) {
                            union.push(m.clone());
                        }
                    }
                }
            }
            TargetModules::List(union)
        } else if targets.iter().all(|t| matches!(t, TargetModules::Regex(_))) {
            TargetModules::Regex(
                targets
                    .iter()
                    .map(|t| match t {
                        TargetModules::Regex(r) => format!("({r})"),
                        TargetModules::List(_) => unreachable!(),
                    })
                    .collect::<Vec<_>>()
                    .join("|"),
            )
        } else {
            return Err(invalid(
                "all adapter configs should follow the same target modules type. Combining adapters with \
                 `target_modules` type being a mix of list/set and string is not supported.",
            ));
        };
        let mut c = configs[0].clone();
        c.lora.r = new_r;
        c.lora.lora_alpha = new_r as f64;
        c.lora.use_rslora = false;
        c.targets.target_modules = Some(new_targets);
        c.patterns.rank_pattern.clear();
        c.patterns.alpha_pattern.clear();
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn combination_types_parse_in_peft_spelling() {
        for t in CombinationType::ALL {
            assert_eq!(t.as_str().parse::<CombinationType>().unwrap(), t);
        }
        assert!("average".parse::<CombinationType>().is_err());
    }

}
