//! Which modules of a base model a tuner wraps: a port of the matching logic of PEFT 0.21.2
//! (`tuners/tuners_utils.py`: `check_target_module_exists`, `_find_minimal_target_modules`,
//! `_maybe_include_all_linear_layers`, the matching part of `BaseTuner.inject_adapter`; `utils/other.py`:
//! `get_pattern_key`).
//!
//! The rules, in the order PEFT applies them to every dotted module name of the model (containers included):
//! 1. `exclude_modules`: a string is a regex that must match the whole name (`re.fullmatch`); a list matches a
//!    name exactly or as a `.`-separated suffix. An excluded module is never targeted.
//! 2. `modules_to_save`: a module whose name contains one of these as a dotted component sequence (or a
//!    descendant of such a module) is never targeted. The entries are used as *unescaped* regexes, as in PEFT.
//! 3. `target_modules`: a string is a regex matched with `re.fullmatch`; a list matches a name exactly or as a
//!    `.`-separated suffix. `layers_to_transform` (optionally with `layers_pattern`) filters only the list
//!    entries that matched by suffix; an exact full name bypasses it.
//!
//! `"all-linear"` is expanded beforehand ([`expand_all_linear`]) to the *full names* of every Linear / GPT-2
//! Conv1D except the output layer, and a target list of [`MIN_TARGET_MODULES_FOR_OPTIMIZATION`] or more names is
//! condensed to minimal suffixes ([`find_minimal_target_modules`]) — both before matching, and both change what
//! PEFT saves as `target_modules` (see [`resolve_targets`]).
//!
//! Regexes use Python syntax as far as [`fancy_regex`] understands it; `re.fullmatch(p, s)` is implemented as
//! `^(?:p)$` and `re.match(p, s)` as `^(?:p)`. Nothing is cached: every call compiles what it needs. An invalid
//! regex is an [`PeftError::InvalidConfig`] naming the field, never a panic.

use std::collections::BTreeSet;
use std::fmt;

use fancy_regex::Regex;

use crate::Result;
use crate::config::common::{LayersToTransform, StrOrList, TargetModules, TargetSpec};
use crate::error::PeftError;

/// A target list with at least this many names is condensed to minimal suffixes before matching and saving
/// (PEFT's `utils/constants.py` `MIN_TARGET_MODULES_FOR_OPTIMIZATION`; not applied to IA3).
pub const MIN_TARGET_MODULES_FOR_OPTIMIZATION: usize = 20;

/// The `target_modules` shorthand for "every linear layer except the output layer" (compared
/// case-insensitively, as PEFT's `INCLUDE_LINEAR_LAYERS_SHORTHAND`).
pub const INCLUDE_LINEAR_LAYERS_SHORTHAND: &str = "all-linear";

// ---------------------------------------------------------------------------------------------------------------
// Regex helpers
// ---------------------------------------------------------------------------------------------------------------

/// Compiles `pattern`, reporting a failure as an invalid value of `field` (the user-facing pattern is `shown`).
fn compile(pattern: &str, field: &str, shown: &str) -> Result<Regex> {
    Regex::new(pattern).map_err(|e| {
        PeftError::InvalidConfig(format!(
            "`{field}`: invalid regular expression {shown:?}: {e}"
        ))
    })
}

/// Runs `re` on `haystack`, turning a matcher failure (e.g. the backtrack limit) into an error.
fn is_match(re: &Regex, haystack: &str, field: &str) -> Result<bool> {
    re.is_match(haystack).map_err(|e| {
        PeftError::InvalidConfig(format!(
            "`{field}`: regex {:?} failed on {haystack:?}: {e}",
            re.as_str()
        ))
    })
}

/// Python's `re.search(pattern, haystack)`.
pub(crate) fn search(pattern: &str, haystack: &str, field: &str) -> Result<bool> {
    let re = compile(pattern, field, pattern)?;
    is_match(&re, haystack, field)
}

/// Python's `re.fullmatch(pattern, haystack)`.
pub(crate) fn fullmatch(pattern: &str, haystack: &str, field: &str) -> Result<bool> {
    let re = compile(&format!("^(?:{pattern})$"), field, pattern)?;
    is_match(&re, haystack, field)
}

// ---------------------------------------------------------------------------------------------------------------
// Python-style formatting for error messages
// ---------------------------------------------------------------------------------------------------------------

/// A Python `repr` of a set of strings, items sorted (PEFT stores list-valued `target_modules` as a set).
fn py_set(items: &[String]) -> String {
    let sorted: BTreeSet<&str> = items.iter().map(String::as_str).collect();
    if sorted.is_empty() {
        return "set()".to_string();
    }
    let inner: Vec<String> = sorted.iter().map(|s| format!("'{s}'")).collect();
    format!("{{{}}}", inner.join(", "))
}

/// How PEFT's f-strings print `target_modules` (a raw string, or a set).
fn fmt_target_modules(tm: Option<&TargetModules>) -> String {
    match tm {
        None => "None".to_string(),
        Some(TargetModules::Regex(s)) => s.clone(),
        Some(TargetModules::List(v)) => py_set(v),
    }
}

/// How PEFT's f-strings print `layers_to_transform`.
fn fmt_layers(l: &LayersToTransform) -> String {
    match l {
        LayersToTransform::One(i) => i.to_string(),
        LayersToTransform::Many(v) => {
            let inner: Vec<String> = v.iter().map(i64::to_string).collect();
            format!("[{}]", inner.join(", "))
        }
    }
}

/// How PEFT's f-strings print `layers_pattern`.
fn fmt_pattern(p: &StrOrList) -> String {
    match p {
        StrOrList::One(s) => s.clone(),
        StrOrList::Many(v) => {
            let inner: Vec<String> = v.iter().map(|s| format!("'{s}'")).collect();
            format!("[{}]", inner.join(", "))
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// check_target_module_exists
// ---------------------------------------------------------------------------------------------------------------

/// The outcome of matching one module name against a [`TargetSpec`] (PEFT distinguishes excluded modules from
/// unmatched ones only to choose the error message when nothing is targeted).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetMatch {
    /// Excluded by `exclude_modules` or `modules_to_save` (PEFT's `_ExcludedModule`).
    Excluded,
    /// Not matched by `target_modules` (or filtered out by `layers_to_transform`).
    NotMatched,
    /// Matched: the module is to be wrapped.
    Matched,
}

/// Checks the parts of `spec` that PEFT's config classes reject before any matching: a string (regex)
/// `target_modules` combined with `layers_to_transform` or `layers_pattern`, and an unexpanded `"all-linear"`.
///
/// PEFT's LoRA-family configs raise on these combinations in `__post_init__`; here every method is held to it.
pub fn validate_spec(spec: &TargetSpec<'_>) -> Result<()> {
    if let Some(TargetModules::Regex(s)) = spec.target_modules {
        if spec.layers_to_transform.is_some() {
            return Err(PeftError::InvalidConfig(
                "`layers_to_transform` cannot be used when `target_modules` is a str.".to_string(),
            ));
        }
        if spec.layers_pattern.is_some() {
            return Err(PeftError::InvalidConfig(
                "`layers_pattern` cannot be used when `target_modules` is a str.".to_string(),
            ));
        }
        if s.eq_ignore_ascii_case(INCLUDE_LINEAR_LAYERS_SHORTHAND) {
            return Err(PeftError::InvalidConfig(format!(
                "`target_modules` = {s:?} must be expanded (see `expand_all_linear` / `resolve_targets`) before \
                 modules are matched"
            )));
        }
    }
    Ok(())
}

/// The layer index PEFT reads from `key` for `layers_to_transform`, or `None` when its regex finds none.
///
/// Without `layers_pattern` (or with an empty one, string or list) the regex is `.*?\.[^.]*\.(\d+)\.` (the
/// first number that is a whole dotted component preceded by at least two components); with patterns, each is
/// tried in turn as `(?:^|.*?\.){pattern}\.(\d+)\.` (unescaped, so `"layers|h"` splits the whole regex at the
/// `|`, exactly as in PEFT) and the first pattern whose regex matches decides — even when its `idx` group did
/// not participate, which yields `None`.
fn layer_index(key: &str, layers_pattern: Option<&StrOrList>) -> Result<Option<String>> {
    let patterns: Vec<String> = match layers_pattern {
        None => Vec::new(),
        Some(StrOrList::One(s)) if s.is_empty() => Vec::new(),
        Some(p) => p.items(),
    };
    let field = "layers_pattern";
    let captures_idx = |re: &Regex| -> Result<Option<Option<String>>> {
        let caps = re.captures(key).map_err(|e| {
            PeftError::InvalidConfig(format!(
                "`{field}`: regex {:?} failed on {key:?}: {e}",
                re.as_str()
            ))
        })?;
        Ok(caps.map(|c| c.name("idx").map(|m| m.as_str().to_string())))
    };
    if patterns.is_empty() {
        let re = compile(r"^(?:.*?\.[^.]*\.(?P<idx>\d+)\.)", field, "")?;
        return Ok(captures_idx(&re)?.flatten());
    }
    for pattern in &patterns {
        let re = compile(
            &format!(r"^(?:(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.)"),
            field,
            pattern,
        )?;
        if let Some(idx) = captures_idx(&re)? {
            return Ok(idx);
        }
    }
    Ok(None)
}

/// Matches one dotted module name against `spec`, telling an excluded module apart from an unmatched one
/// (PEFT's `check_target_module_exists` returning `_ExcludedModule`, a falsy value or a truthy one).
///
/// See [`check_target_module_exists`] for the rules and the preconditions.
pub fn match_target_module(spec: &TargetSpec<'_>, key: &str) -> Result<TargetMatch> {
    validate_spec(spec)?;

    // 1. exclude_modules (an empty string or list is falsy in Python: no exclusion)
    let excluded = match spec.exclude_modules {
        Some(TargetModules::Regex(p)) => !p.is_empty() && fullmatch(p, key, "exclude_modules")?,
        Some(TargetModules::List(items)) => items
            .iter()
            .any(|e| key == e || key.ends_with(&format!(".{e}"))),
        None => false,
    };
    if excluded {
        return Ok(TargetMatch::Excluded);
    }

    // 2. modules_to_save: `re.match(rf"(^|.*\.){m}($|\..*)", key)`, `m` unescaped.
    if let Some(mts) = spec.modules_to_save {
        for m in mts {
            let re = compile(&format!(r"^(?:(^|.*\.){m}($|\..*))"), "modules_to_save", m)?;
            if is_match(&re, key, "modules_to_save")? {
                return Ok(TargetMatch::Excluded);
            }
        }
    }

    // 3. target_modules
    let found = match spec.target_modules {
        // PEFT: `target_modules is None` is only allowed together with `target_parameters`, and then nothing
        // is matched by name.
        None => false,
        Some(TargetModules::Regex(p)) => fullmatch(p, key, "target_modules")?,
        Some(TargetModules::List(items)) => {
            if items.iter().any(|t| t == key) {
                // Named directly: layers_to_transform does not apply.
                true
            } else {
                let mut found = items.iter().any(|t| key.ends_with(&format!(".{t}")));
                let using_layer_indexes = match spec.layers_to_transform {
                    None => false,
                    Some(LayersToTransform::One(_)) => true,
                    Some(LayersToTransform::Many(v)) => !v.is_empty(),
                };
                if using_layer_indexes && found {
                    found = match layer_index(key, spec.layers_pattern)? {
                        None => false,
                        // An index too large for i64 equals none of the requested ones (Python ints are unbounded).
                        Some(idx) => match (idx.parse::<i64>(), spec.layers_to_transform) {
                            (Ok(i), Some(LayersToTransform::One(want))) => i == *want,
                            (Ok(i), Some(LayersToTransform::Many(want))) => want.contains(&i),
                            _ => false,
                        },
                    };
                }
                found
            }
        }
    };
    Ok(if found {
        TargetMatch::Matched
    } else {
        TargetMatch::NotMatched
    })
}

/// Whether the module named `key` (full dotted name, as in `named_modules()`) is targeted by `spec` — a port of
/// PEFT 0.21.2's `check_target_module_exists`.
///
/// In order:
/// - `exclude_modules`: a string is a regex that must match all of `key`; a list matches `key` exactly or as a
///   `"." + item` suffix. Excluded ⇒ `false`.
/// - `modules_to_save`: `key` is never targeted when `re.match(rf"(^|.*\.){m}($|\..*)", key)` holds for an entry
///   `m` (the module itself, anything below it, or any name containing `m` as dotted components; `m` is an
///   unescaped regex, so `"classifier.dense"` also matches `"classifierxdense"`, as in PEFT).
/// - `target_modules`: a string is a regex that must match all of `key` (`re.fullmatch`); a list matches `key`
///   exactly, or as a `"." + item` suffix (`"q_proj"` matches `"model.layers.0.self_attn.q_proj"` but not
///   `"…self_attn.xq_proj"`).
/// - `layers_to_transform` (an int, or a non-empty list) filters only list entries that matched by **suffix**
///   (a full name given in the list bypasses it). The layer index is the first number captured by
///   `(?:^|.*?\.){pattern}\.(\d+)\.` for each `layers_pattern` in turn (the first pattern whose regex matches
///   decides), or by `.*?\.[^.]*\.(\d+)\.` when `layers_pattern` is absent or empty; no index ⇒ not targeted.
/// - `target_modules = None` targets nothing (PEFT allows it only with `target_parameters`).
///
/// Errors: a string `target_modules` with `layers_to_transform` or `layers_pattern`
/// ([`PeftError::InvalidConfig`], as PEFT's LoRA config); an unexpanded `"all-linear"` (expand it first with
/// [`expand_all_linear`] or use [`resolve_targets`]); an invalid regex in any of the fields.
pub fn check_target_module_exists(spec: &TargetSpec<'_>, key: &str) -> Result<bool> {
    Ok(match_target_module(spec, key)? == TargetMatch::Matched)
}

/// Checks that every module an adapter file holds tensors for is one its config targets: PEFT injects from
/// the config (`target_modules`, `layers_to_transform`, `exclude_modules`) and would never load tensors of
/// a module the config does not select, so a file and a config that disagree are an error here too, naming
/// the modules, instead of tensors silently used (or a merge of 0 modules). A config without target
/// modules, or whose targets cannot be matched without the model (an unexpanded `all-linear`), is not
/// checked here; injection checks it.
///
/// ```
/// use peft::PeftConfig;
/// use peft::tuners::tuners_utils::check_file_modules_targeted;
/// let c = PeftConfig::from_json_str(r#"{"peft_type": "LORA", "target_modules": ["q_proj"], "layers_to_transform": [0]}"#)?;
/// check_file_modules_targeted(&c, ["model.layers.0.self_attn.q_proj"])?;
/// let err = check_file_modules_targeted(&c, ["model.layers.1.self_attn.q_proj"]).unwrap_err();
/// assert!(err.to_string().contains("model.layers.1.self_attn.q_proj"));
/// # Ok::<(), peft::PeftError>(())
/// ```
pub fn check_file_modules_targeted<'a>(
    config: &crate::PeftConfig,
    modules: impl IntoIterator<Item = &'a str>,
) -> Result<()> {
    let Some(spec) = config.target_spec() else {
        return Ok(());
    };
    if spec.target_modules.is_none() {
        return Ok(());
    }
    let mut untargeted = Vec::new();
    for m in modules {
        match match_target_module(&spec, m) {
            Ok(TargetMatch::Matched) => {}
            Ok(_) => untargeted.push(m.to_string()),
            Err(_) => return Ok(()),
        }
    }
    if untargeted.is_empty() {
        return Ok(());
    }
    let show =
        |v: &Option<serde_json::Value>| v.as_ref().map(|v| v.to_string()).unwrap_or("null".into());
    let cfg = config.to_json_value();
    Err(PeftError::InvalidConfig(format!(
        "the adapter file holds tensors for {} module(s) its config does not target ({}): target_modules \
         = {}, layers_to_transform = {}, exclude_modules = {}; the config and the weights do not belong \
         together",
        untargeted.len(),
        untargeted.join(", "),
        show(&cfg.get("target_modules").cloned()),
        show(&cfg.get("layers_to_transform").cloned()),
        show(&cfg.get("exclude_modules").cloned()),
    )))
}

/// For a method whose adapter follows tied weights ([`crate::tuners::PeftMethod::follows_tied_weights`],
/// trainable tokens): drops from a file's modules each one the config does not target whose tensors are,
/// bit for bit, those of a targeted module — the copy PEFT saves for the layer tied to the targeted one (its
/// `lm_head` shares the embedding's parameter). Anything else stays, for the usual checks to name.
pub fn drop_tied_copies(
    config: &crate::PeftConfig,
    modules: &mut indexmap::IndexMap<String, indexmap::IndexMap<String, candle_core::Tensor>>,
) -> Result<()> {
    if !config.method().follows_tied_weights() || !config.method().saves_tied_copies() {
        return Ok(());
    }
    let Some(spec) = config.target_spec() else {
        return Ok(());
    };
    let targeted = |m: &str| matches!(match_target_module(&spec, m), Ok(TargetMatch::Matched));
    let same = |a: &indexmap::IndexMap<String, candle_core::Tensor>,
                b: &indexmap::IndexMap<String, candle_core::Tensor>|
     -> Result<bool> {
        if a.len() != b.len() {
            return Ok(false);
        }
        for (k, t) in a {
            let Some(u) = b.get(k) else { return Ok(false) };
            if t.dims() != u.dims() || t.dtype() != u.dtype() {
                return Ok(false);
            }
            let d = (t.to_dtype(candle_core::DType::F32)?
                - u.to_dtype(candle_core::DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
            if d != 0.0 {
                return Ok(false);
            }
        }
        Ok(true)
    };
    let mut copies = Vec::new();
    for (m, ts) in modules.iter() {
        if targeted(m) {
            continue;
        }
        for (t, us) in modules.iter() {
            if targeted(t) && same(ts, us)? {
                copies.push(m.clone());
                break;
            }
        }
    }
    for m in copies {
        modules.shift_remove(&m);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------------------------
// get_pattern_key
// ---------------------------------------------------------------------------------------------------------------

/// The first key of `pattern_keys` (a `rank_pattern` / `alpha_pattern`, in iteration order) that matches the
/// module name `key` as `re.match(rf"(.*\.)?({k})$", key)` — i.e. `k` is a regex that must match a whole
/// `.`-separated tail of `key` — or `None` when none does (the caller then uses the top-level `r` / `lora_alpha`;
/// PEFT's `get_pattern_key` returns `key` itself in that case, which its callers look up and miss).
///
/// The first matching key wins, not the most specific one: with `["proj", "q_proj"]`, `"….q_proj"` gets
/// `"q_proj"` only because `"proj"` does not match a whole component. Errors on an invalid regex.
pub fn get_pattern_key<'a>(
    pattern_keys: impl IntoIterator<Item = &'a str>,
    key: &str,
) -> Result<Option<&'a str>> {
    for k in pattern_keys {
        let re = compile(
            &format!(r"^(?:(.*\.)?({k})$)"),
            "rank_pattern/alpha_pattern",
            k,
        )?;
        if is_match(&re, key, "rank_pattern/alpha_pattern")? {
            return Ok(Some(k));
        }
    }
    Ok(None)
}

// ---------------------------------------------------------------------------------------------------------------
// _find_minimal_target_modules
// ---------------------------------------------------------------------------------------------------------------

/// The dotted suffixes of `s`, shortest first (`"a.b.c"` ⇒ `["c", "b.c", "a.b.c"]`).
fn generate_suffixes(s: &str) -> Vec<String> {
    let parts: Vec<&str> = s.split('.').collect();
    (0..parts.len())
        .rev()
        .map(|i| parts[i..].join("."))
        .collect()
}

/// A port of PEFT's `_find_minimal_target_modules`: a small set of dotted suffixes that selects every name of
/// `target_modules` (by exact or `"." + suffix` match) and none of `other_module_names`.
///
/// Returned **sorted** (PEFT returns a set, saved in arbitrary order). When no suffix can be found the target
/// names themselves are returned. The algorithm is ported literally, including its greedy order (items sorted
/// by their suffix lists, shortest suffix first), so in rare layouts a target may be left uncovered exactly as
/// in PEFT (`["x.a", "y.a", "x.y.a"]` against `["z.y.a"]` gives `["x.a", "x.y.a"]`).
///
/// Errors ([`PeftError::Invalid`], PEFT's `ValueError`s): `target_modules` empty or containing `""`, or sharing a
/// name with `other_module_names`.
pub fn find_minimal_target_modules(
    target_modules: &[String],
    other_module_names: &[String],
) -> Result<Vec<String>> {
    if target_modules.is_empty() {
        return Err(PeftError::Invalid(
            "target_modules should be a list or set of strings.".to_string(),
        ));
    }
    let targets: BTreeSet<&str> = target_modules.iter().map(String::as_str).collect();
    if targets.contains("") {
        return Err(PeftError::Invalid(
            "target_modules should not contain an empty string.".to_string(),
        ));
    }
    let others: BTreeSet<&str> = other_module_names.iter().map(String::as_str).collect();
    if !targets.is_disjoint(&others) {
        return Err(PeftError::Invalid(
            "target_modules and other_module_names contain common elements, this should not happen, please open \
             a GitHub issue at https://github.com/huggingface/peft/issues with the code to reproduce this issue"
                .to_string(),
        ));
    }

    let other_suffixes: BTreeSet<String> =
        others.iter().flat_map(|o| generate_suffixes(o)).collect();
    let mut items: Vec<(&str, Vec<String>)> =
        targets.iter().map(|t| (*t, generate_suffixes(t))).collect();
    // Python sorts by the suffix lists (lexicographic list comparison of code-point-ordered strings, which is
    // Rust's `Vec<String>` order); the lists are distinct because each ends with its full name.
    items.sort_by(|a, b| a.1.cmp(&b.1));

    let mut required: BTreeSet<String> = BTreeSet::new();
    for (item, suffixes) in &items {
        for suffix in suffixes {
            if required.contains(suffix) || other_suffixes.contains(suffix) {
                continue;
            }
            if !required.iter().any(|r| item.ends_with(&format!(".{r}"))) {
                required.insert(suffix.clone());
                break;
            }
        }
    }

    if required.is_empty() {
        return Ok(targets.iter().map(|s| s.to_string()).collect());
    }
    Ok(required.into_iter().collect())
}

// ---------------------------------------------------------------------------------------------------------------
// The module-tree walk (inject_adapter)
// ---------------------------------------------------------------------------------------------------------------

/// The type of a module of the base model, as far as target matching cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModuleKind {
    /// `torch.nn.Linear`.
    Linear,
    /// `torch.nn.Embedding`.
    Embedding,
    /// `torch.nn.Conv2d`.
    Conv2d,
    /// transformers' `Conv1D` (GPT-2; a linear layer with a transposed `[in, out]` weight).
    Conv1D,
    /// Any other module, by its type name (`"LlamaRMSNorm"`, `"LlamaMLP"`, `"ModuleList"`, …).
    Other(String),
}

impl ModuleKind {
    /// The PyTorch-style type name (`"Linear"`, `"Conv1D"`, or the name held by [`ModuleKind::Other`]).
    pub fn type_name(&self) -> &str {
        match self {
            ModuleKind::Linear => "Linear",
            ModuleKind::Embedding => "Embedding",
            ModuleKind::Conv2d => "Conv2d",
            ModuleKind::Conv1D => "Conv1D",
            ModuleKind::Other(s) => s,
        }
    }

    /// Whether `"all-linear"` selects this kind (`torch.nn.Linear` and transformers' `Conv1D`).
    pub fn is_linear(&self) -> bool {
        matches!(self, ModuleKind::Linear | ModuleKind::Conv1D)
    }
}

impl fmt::Display for ModuleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.type_name())
    }
}

/// One entry of the base model's module tree (PEFT's `model.named_modules()`): the full dotted name and the
/// module's kind. The root (empty name) may be present; it is never matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleInfo {
    /// Full dotted name, e.g. `"model.layers.0.self_attn.q_proj"`.
    pub name: String,
    /// The module's type.
    pub kind: ModuleKind,
}

impl ModuleInfo {
    /// A module entry.
    pub fn new(name: impl Into<String>, kind: ModuleKind) -> Self {
        ModuleInfo {
            name: name.into(),
            kind,
        }
    }
}

/// The module kinds that `method` (a `peft_type` such as `"LORA"`) can wrap. For now every method accepts
/// Linear, Embedding, Conv2d and GPT-2 Conv1D.
fn method_supports(_method: &str, kind: &ModuleKind) -> bool {
    matches!(
        kind,
        ModuleKind::Linear | ModuleKind::Embedding | ModuleKind::Conv2d | ModuleKind::Conv1D
    )
}

/// PEFT 0.21.2's expansion of `target_modules = "all-linear"` (`_maybe_include_all_linear_layers`): the **full
/// names** of every Linear / Conv1D module, minus `output_layer` (the name of the module returned by
/// transformers' `get_output_embeddings()`, e.g. `"lm_head"`; for a sequence-classification model without
/// output embeddings, pass its head, `"score"` or `"classifier"`, as PEFT does).
///
/// Returned in tree order without duplicates (PEFT builds a set). Note that PEFT saves these full names unless
/// there are [`MIN_TARGET_MODULES_FOR_OPTIMIZATION`] or more, in which case they are condensed (see
/// [`resolve_targets`]).
pub fn expand_all_linear(modules: &[ModuleInfo], output_layer: Option<&str>) -> Vec<String> {
    let mut seen = BTreeSet::new();
    modules
        .iter()
        .filter(|m| m.kind.is_linear() && Some(m.name.as_str()) != output_layer)
        .filter(|m| seen.insert(m.name.as_str()))
        .map(|m| m.name.clone())
        .collect()
}

/// The result of [`resolve_targets`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedTargets {
    /// Names of the modules to wrap, in tree order.
    pub targeted: Vec<String>,
    /// The `target_modules` that PEFT uses for matching and writes to `adapter_config.json`: `"all-linear"`
    /// expanded to full names, and/or a list of ≥ [`MIN_TARGET_MODULES_FOR_OPTIMIZATION`] names condensed to
    /// minimal suffixes (both sorted, as they come from a set); otherwise the input unchanged.
    pub target_modules: Option<TargetModules>,
}

/// Mirrors the matching part of PEFT's `BaseTuner.inject_adapter` for the adapter method `method` (a
/// `peft_type` such as `"LORA"`, `"IA3"`) on a model whose module tree is `modules` (tree order, as
/// `named_modules()`), and returns both the modules to wrap and the `target_modules` to save.
///
/// Steps:
/// 1. [`validate_spec`] (string `target_modules` with `layers_to_transform` / `layers_pattern`), and
///    `target_modules = None` is an [`PeftError::InvalidConfig`] (PEFT fills it from a per-architecture
///    default before this point; do that first).
/// 2. `"all-linear"` (any case) ⇒ [`expand_all_linear`] (sorted).
/// 3. A list of ≥ [`MIN_TARGET_MODULES_FOR_OPTIMIZATION`] distinct names (unless `method` is IA3) is replaced by
///    [`find_minimal_target_modules`] against every module name it does not match, when that is shorter.
/// 4. Every non-root module is matched with [`match_target_module`]; the first matched module of a kind the
///    method cannot wrap is an error ([`PeftError::Invalid`], PEFT's "Target module … is not supported"):
///    e.g. `["mlp"]` matching a `LlamaMLP` container, or `["input_layernorm"]`.
/// 5. Nothing targeted ⇒ [`PeftError::NoTargetMatched`], whose text says which of PEFT's cases applies (all
///    modules excluded; no target names; none found, with the `layers_to_transform` / `layers_pattern` values
///    when given; some unmatched and the rest excluded).
///
/// PEFT's Mamba-specific refusal (`out_proj` / `conv1d` with model types such as `"mamba"`) needs the model
/// type and is left to the caller.
pub fn resolve_targets(
    spec: &TargetSpec<'_>,
    modules: &[ModuleInfo],
    output_layer: Option<&str>,
    method: &str,
) -> Result<ResolvedTargets> {
    validate_spec_shape(spec)?;
    let Some(original) = spec.target_modules else {
        return Err(PeftError::InvalidConfig(
            "Please specify `target_modules` in `peft_config` (no default is known for this model)"
                .to_string(),
        ));
    };

    // 2. all-linear
    let mut target_modules: TargetModules = match original {
        TargetModules::Regex(s) if s.eq_ignore_ascii_case(INCLUDE_LINEAR_LAYERS_SHORTHAND) => {
            let mut names = expand_all_linear(modules, output_layer);
            names.sort();
            TargetModules::List(names)
        }
        other => other.clone(),
    };

    // 3. condense long lists (not for IA3, whose feedforward_modules must stay a subset).
    if let TargetModules::List(list) = &target_modules {
        let distinct: BTreeSet<&str> = list.iter().map(String::as_str).collect();
        if distinct.len() >= MIN_TARGET_MODULES_FOR_OPTIMIZATION
            && !method.eq_ignore_ascii_case("IA3")
        {
            let names_no_target: Vec<String> = modules
                .iter()
                .map(|m| &m.name)
                .filter(|name| {
                    !distinct.contains(name.as_str())
                        && !distinct.iter().any(|t| name.ends_with(&format!(".{t}")))
                })
                .cloned()
                .collect();
            let distinct_vec: Vec<String> = distinct.iter().map(|s| s.to_string()).collect();
            let condensed = find_minimal_target_modules(&distinct_vec, &names_no_target)?;
            if condensed.len() < distinct.len() {
                target_modules = TargetModules::List(condensed);
            }
        }
    }

    // 4. match
    let effective = TargetSpec {
        target_modules: Some(&target_modules),
        ..*spec
    };
    let mut targeted = Vec::new();
    let mut any_excluded = false;
    let mut any_unmatched = false;
    for m in modules.iter().filter(|m| !m.name.is_empty()) {
        match match_target_module(&effective, &m.name)? {
            TargetMatch::Excluded => any_excluded = true,
            TargetMatch::NotMatched => any_unmatched = true,
            TargetMatch::Matched => {
                if !method_supports(method, &m.kind) {
                    return Err(PeftError::Invalid(format!(
                        "Target module `{}` ({}) is not supported by {method}. Currently, only the following \
                         modules are supported: `Linear`, `Embedding`, `Conv2d` and transformers' `Conv1D`. Check \
                         `target_modules` = {}: a name that also matches a container or a norm must be narrowed \
                         (e.g. `mlp.down_proj` instead of `mlp`).",
                        m.name,
                        m.kind,
                        fmt_target_modules(Some(&target_modules)),
                    )));
                }
                targeted.push(m.name.clone());
            }
        }
    }

    // 5. errors
    if targeted.is_empty() {
        let shown = fmt_target_modules(Some(&target_modules));
        let empty_targets = matches!(&target_modules, TargetModules::List(v) if v.is_empty())
            || matches!(&target_modules, TargetModules::Regex(s) if s.is_empty());
        let mut notes = String::new();
        if let Some(l) = spec.layers_to_transform {
            notes.push_str(&format!(
                "; you specified 'layers_to_transform': {}",
                fmt_layers(l)
            ));
        }
        if let Some(p) = spec.layers_pattern {
            notes.push_str(&format!(
                "; you also specified 'layers_pattern': {}",
                fmt_pattern(p)
            ));
        }
        let payload = if any_excluded && !any_unmatched {
            format!(
                "{shown} (all modules were excluded, which is likely unintended: check your `target_modules`, \
                 `exclude_modules` and `modules_to_save` configuration)"
            )
        } else if !any_excluded && any_unmatched && empty_targets {
            format!(
                "{shown} (no `target_modules` passed but also no `target_parameters` found: check the values for \
                 these arguments)"
            )
        } else if !any_excluded && any_unmatched {
            format!("{shown} (please check the target modules and try again{notes})")
        } else {
            format!(
                "{shown} (no modules were targeted for adaptation: this might be caused by a combination of \
                 mismatched target modules and excluded modules, or by targeting only modules listed in \
                 `modules_to_save`; check your `target_modules` and `exclude_modules` configuration{notes})"
            )
        };
        return Err(PeftError::NoTargetMatched(payload));
    }

    Ok(ResolvedTargets {
        targeted,
        target_modules: Some(target_modules),
    })
}

/// [`validate_spec`] without the `"all-linear"` refusal (which [`resolve_targets`] expands itself).
fn validate_spec_shape(spec: &TargetSpec<'_>) -> Result<()> {
    match spec.target_modules {
        Some(TargetModules::Regex(s))
            if s.eq_ignore_ascii_case(INCLUDE_LINEAR_LAYERS_SHORTHAND) =>
        {
            let placeholder = TargetModules::Regex(String::new());
            validate_spec(&TargetSpec {
                target_modules: Some(&placeholder),
                ..*spec
            })
        }
        _ => validate_spec(spec),
    }
}

/// The names of the modules of `modules` (tree order, as `named_modules()`) that the adapter method `method`
/// (`"LORA"`, …) wraps under `spec`, in tree order — PEFT's `inject_adapter` matching, with `"all-linear"`
/// expanded (all Linear / Conv1D except `output_layer`) and long lists condensed first.
///
/// Errors: a matched module of a kind the method cannot wrap (a container such as `LlamaMLP`, a norm, …:
/// [`PeftError::Invalid`] naming the module and its kind); nothing targeted ([`PeftError::NoTargetMatched`]);
/// an inconsistent spec or invalid regex ([`PeftError::InvalidConfig`]). See [`resolve_targets`], which also
/// returns the `target_modules` value PEFT would save.
pub fn find_target_modules(
    spec: &TargetSpec<'_>,
    modules: &[ModuleInfo],
    output_layer: Option<&str>,
    method: &str,
) -> Result<Vec<String>> {
    Ok(resolve_targets(spec, modules, output_layer, method)?.targeted)
}

#[cfg(test)]
mod tests {
    //! Expected values were produced with PEFT 0.21.2 itself (`check_target_module_exists` on a plain namespace
    //! config, `get_peft_model` with `LoraConfig` / `IA3Config` on tiny transformers 5.x Llama and GPT-2 models,
    //! `get_pattern_key`, `_find_minimal_target_modules`); Python is not needed to run them.

    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    /// How a test row sets `target_modules` / `exclude_modules`.
    #[derive(Clone, Copy)]
    enum Tm<'a> {
        L(&'a [&'a str]),
        R(&'a str),
    }

    impl Tm<'_> {
        fn build(self) -> TargetModules {
            match self {
                Tm::L(v) => TargetModules::List(s(v)),
                Tm::R(r) => TargetModules::Regex(r.to_string()),
            }
        }
    }

    /// One row of a matching table: the config fields, the key, and PEFT's answer.
    struct Row<'a> {
        target: Tm<'a>,
        exclude: Option<Tm<'a>>,
        layers: Option<LayersToTransform>,
        pattern: Option<StrOrList>,
        save: Option<&'a [&'a str]>,
        key: &'a str,
        want: TargetMatch,
    }

    fn row<'a>(target: Tm<'a>, key: &'a str, want: TargetMatch) -> Row<'a> {
        Row {
            target,
            exclude: None,
            layers: None,
            pattern: None,
            save: None,
            key,
            want,
        }
    }

    impl<'a> Row<'a> {
        fn excl(mut self, e: Tm<'a>) -> Self {
            self.exclude = Some(e);
            self
        }
        fn save(mut self, m: &'a [&'a str]) -> Self {
            self.save = Some(m);
            self
        }
        fn layers(mut self, l: LayersToTransform) -> Self {
            self.layers = Some(l);
            self
        }
        fn pat(mut self, p: StrOrList) -> Self {
            self.pattern = Some(p);
            self
        }
    }

    fn check_rows(rows: &[Row<'_>]) {
        for (i, r) in rows.iter().enumerate() {
            let target = r.target.build();
            let exclude = r.exclude.map(Tm::build);
            let save = r.save.map(s);
            let spec = TargetSpec {
                target_modules: Some(&target),
                exclude_modules: exclude.as_ref(),
                layers_to_transform: r.layers.as_ref(),
                layers_pattern: r.pattern.as_ref(),
                modules_to_save: save.as_deref(),
            };
            let got = match_target_module(&spec, r.key).unwrap();
            assert_eq!(got, r.want, "row {i}: key {:?}, target {target:?}", r.key);
            assert_eq!(
                check_target_module_exists(&spec, r.key).unwrap(),
                r.want == TargetMatch::Matched,
                "row {i}"
            );
        }
    }

    use LayersToTransform::{Many, One};
    use TargetMatch::{Excluded as EX, Matched as YES, NotMatched as NO};

    fn p(x: &str) -> StrOrList {
        StrOrList::One(x.to_string())
    }
    fn ps(x: &[&str]) -> StrOrList {
        StrOrList::Many(s(x))
    }

    const Q0: &str = "model.layers.0.self_attn.q_proj";
    const Q1: &str = "model.layers.1.self_attn.q_proj";

    #[test]
    fn target_list_exact_and_suffix() {
        check_rows(&[
            row(Tm::L(&["q_proj"]), Q0, YES),
            row(Tm::L(&["q_proj"]), "model.layers.0.self_attn.xq_proj", NO),
            row(Tm::L(&["q_proj"]), "q_proj", YES),
            row(Tm::L(&["self_attn.q_proj"]), Q0, YES),
            // suffixes are whole dotted components
            row(Tm::L(&["attn.q_proj"]), Q0, NO),
            row(Tm::L(&[Q0]), Q0, YES),
            row(Tm::L(&[Q0]), Q1, NO),
            row(Tm::L(&[]), Q0, NO),
            row(Tm::L(&["k_proj", "q_proj"]), Q0, YES),
        ]);
    }

    #[test]
    fn target_regex_is_fullmatch() {
        check_rows(&[
            row(Tm::R(".*q_proj"), Q0, YES),
            // a partial regex does not match (fullmatch, not search)
            row(Tm::R("q_proj"), Q0, NO),
            row(
                Tm::R(r".*\.(q|v)_proj"),
                "model.layers.1.self_attn.v_proj",
                YES,
            ),
            row(
                Tm::R(r".*\.(q|v)_proj"),
                "model.layers.1.self_attn.k_proj",
                NO,
            ),
            // the alternation covers the whole pattern
            row(
                Tm::R("q_proj|.*v_proj"),
                "model.layers.1.self_attn.v_proj",
                YES,
            ),
            row(Tm::R("q_proj|.*v_proj"), "q_proj", YES),
            row(Tm::R(r".*layers\.0\..*"), Q0, YES),
            row(
                Tm::R(r".*layers\.0\..*"),
                "model.layers.10.self_attn.q_proj",
                NO,
            ),
        ]);
    }

    #[test]
    fn exclude_modules_list_and_regex() {
        check_rows(&[
            row(Tm::L(&["q_proj"]), Q0, EX).excl(Tm::L(&["q_proj"])),
            row(Tm::L(&["q_proj"]), Q0, EX).excl(Tm::L(&[Q0])),
            row(Tm::L(&["q_proj"]), Q1, YES).excl(Tm::L(&[Q0])),
            row(Tm::L(&["q_proj"]), Q0, EX).excl(Tm::L(&["0.self_attn.q_proj"])),
            row(Tm::L(&["q_proj"]), "model.layers.10.self_attn.q_proj", YES)
                .excl(Tm::L(&["0.self_attn.q_proj"])),
            row(Tm::L(&["q_proj"]), Q0, YES).excl(Tm::L(&["proj"])),
            row(Tm::L(&["q_proj"]), Q0, EX).excl(Tm::R(r".*layers\.0\..*")),
            row(Tm::L(&["q_proj"]), Q1, YES).excl(Tm::R(r".*layers\.0\..*")),
            // exclude regexes are fullmatched too
            row(Tm::L(&["q_proj"]), Q0, YES).excl(Tm::R(r"layers\.0")),
            row(Tm::R(".*_proj"), "model.layers.0.self_attn.k_proj", EX).excl(Tm::R(r".*\.k_proj")),
            row(Tm::R(".*_proj"), Q0, YES).excl(Tm::R(r".*\.k_proj")),
            // exclusion is reported even for modules the targets would not match
            row(Tm::L(&["v_proj"]), Q0, EX).excl(Tm::L(&["q_proj"])),
            // an empty exclude regex is falsy in Python: no exclusion
            row(Tm::L(&["q_proj"]), Q0, YES).excl(Tm::R("")),
        ]);
    }

    #[test]
    fn modules_to_save_never_targeted() {
        check_rows(&[
            row(Tm::L(&["lm_head"]), "lm_head", EX).save(&["lm_head"]),
            // the module to save, anything below it and anything containing it as dotted components
            row(Tm::L(&["q_proj"]), Q0, EX).save(&["self_attn"]),
            row(Tm::L(&["q_proj"]), Q0, YES).save(&["attn"]),
            row(Tm::L(&["q_proj"]), Q0, EX).save(&["layers"]),
            row(Tm::L(&["q_proj"]), Q0, EX).save(&["q_proj"]),
            row(Tm::L(&["q_proj"]), Q0, YES).save(&["proj"]),
            row(Tm::L(&["q_proj"]), Q0, EX).save(&["layers.0"]),
            row(Tm::L(&["q_proj"]), Q1, YES).save(&["layers.0"]),
            row(Tm::L(&["q_proj"]), "model.layers.10.self_attn.q_proj", YES).save(&["layers.0"]),
            row(Tm::L(&["dense"]), "classifier.dense", EX).save(&["classifier.dense"]),
            // unescaped regex, as in PEFT: the '.' matches any character
            row(Tm::L(&["dense"]), "classifierxdense", EX).save(&["classifier.dense"]),
            row(Tm::L(&["dense"]), "model.pooler.dense", YES).save(&["classifier.dense"]),
        ]);
    }

    #[test]
    fn layers_to_transform_without_pattern() {
        check_rows(&[
            row(Tm::L(&["q_proj"]), Q0, YES).layers(One(0)),
            row(Tm::L(&["q_proj"]), Q1, NO).layers(One(0)),
            row(Tm::L(&["q_proj"]), "model.layers.2.self_attn.q_proj", YES)
                .layers(Many(vec![0, 2])),
            row(Tm::L(&["q_proj"]), Q1, NO).layers(Many(vec![0, 2])),
            // an empty list means "all layers"
            row(Tm::L(&["q_proj"]), Q1, YES).layers(Many(vec![])),
            // an exact name bypasses layers_to_transform, even without any layer index
            row(Tm::L(&["q_proj"]), "q_proj", YES).layers(Many(vec![1])),
            row(Tm::L(&[Q0]), Q0, YES).layers(Many(vec![1])),
            // `.*?\.[^.]*\.(\d+)\.`: the number needs two components before it and one after
            row(Tm::L(&["q_proj"]), "layers.1.q_proj", NO).layers(Many(vec![1])),
            row(Tm::L(&["q_proj"]), "x.layers.1.q_proj", YES).layers(Many(vec![1])),
            row(Tm::L(&["q_proj"]), "model.1.self_attn.q_proj", NO).layers(Many(vec![1])),
            row(Tm::L(&["q_proj"]), "a.b.1.q_proj", YES).layers(Many(vec![1])),
            row(Tm::L(&["q_proj"]), Q0, NO).layers(Many(vec![1])),
            row(Tm::L(&["q_proj"]), "model.layers.01.self_attn.q_proj", YES).layers(Many(vec![1])),
            row(Tm::L(&["q_proj"]), Q1, NO).layers(Many(vec![-1])),
            // the first (layer) index wins over nested ones (MoE experts)
            row(Tm::L(&["w1"]), "model.layers.1.experts.0.w1", YES).layers(Many(vec![1])),
            row(Tm::L(&["w1"]), "model.layers.1.experts.0.w1", NO).layers(Many(vec![0])),
            // an index beyond i64 equals none of the requested ones
            row(
                Tm::L(&["q_proj"]),
                "model.layers.99999999999999999999.self_attn.q_proj",
                NO,
            )
            .layers(One(1)),
        ]);
    }

    #[test]
    fn layers_to_transform_with_pattern() {
        check_rows(&[
            row(Tm::L(&["q_proj"]), Q1, YES)
                .layers(Many(vec![1]))
                .pat(p("layers")),
            row(Tm::L(&["q_proj"]), Q0, NO)
                .layers(Many(vec![1]))
                .pat(p("layers")),
            row(Tm::L(&["q_proj"]), "layers.1.self_attn.q_proj", YES)
                .layers(Many(vec![1]))
                .pat(p("layers")),
            row(Tm::L(&["q_proj"]), Q1, NO)
                .layers(Many(vec![1]))
                .pat(p("h")),
            row(Tm::L(&["q_proj"]), "model.xlayers.1.self_attn.q_proj", NO)
                .layers(Many(vec![1]))
                .pat(p("layers")),
            row(Tm::L(&["c_attn"]), "transformer.h.1.attn.c_attn", YES)
                .layers(Many(vec![1]))
                .pat(p("h")),
            row(Tm::L(&["c_attn"]), "transformer.h.1.attn.c_attn", YES)
                .layers(One(1))
                .pat(p("h")),
            row(Tm::L(&["c_attn"]), "transformer.h.1.attn.c_attn", NO)
                .layers(Many(vec![0]))
                .pat(p("h")),
            // a list of patterns: each is tried in turn
            row(Tm::L(&["c_attn"]), "transformer.h.1.attn.c_attn", YES)
                .layers(Many(vec![1]))
                .pat(ps(&["layers", "h"])),
            row(Tm::L(&["c_attn"]), "transformer.h.1.attn.c_attn", YES)
                .layers(Many(vec![1]))
                .pat(ps(&["h", "layers"])),
            row(Tm::L(&["c_attn"]), "transformer.h.1.attn.c_attn", NO)
                .layers(Many(vec![1]))
                .pat(ps(&["blocks", "layers"])),
            // empty patterns (string or list) behave as no pattern
            row(Tm::L(&["c_attn"]), "transformer.h.1.attn.c_attn", YES)
                .layers(Many(vec![1]))
                .pat(p("")),
            row(Tm::L(&["c_attn"]), "transformer.h.1.attn.c_attn", YES)
                .layers(Many(vec![1]))
                .pat(ps(&[])),
            row(Tm::L(&["q_proj"]), "model.1.q_proj", NO)
                .layers(Many(vec![1]))
                .pat(p("")),
            // ... but a list holding "" is a real (empty) pattern
            row(Tm::L(&["q_proj"]), "model..1.q_proj", YES)
                .layers(Many(vec![1]))
                .pat(ps(&[""])),
            row(Tm::L(&["q_proj"]), Q1, NO)
                .layers(Many(vec![1]))
                .pat(ps(&[""])),
            // with a pattern the index follows the named component, not the first number
            row(Tm::L(&["w1"]), "model.layers.1.experts.0.w1", YES)
                .layers(Many(vec![1]))
                .pat(p("layers")),
            row(Tm::L(&["w1"]), "model.layers.1.experts.0.w1", YES)
                .layers(Many(vec![0]))
                .pat(p("experts")),
            // patterns are unescaped regexes pasted into PEFT's regex: "layers|h" splits it at the '|'
            row(Tm::L(&["q_proj"]), Q1, NO)
                .layers(Many(vec![1]))
                .pat(p("layers|h")),
            row(Tm::L(&["q_proj"]), "h.1.q_proj", YES)
                .layers(Many(vec![1]))
                .pat(p("layers|h")),
            row(Tm::L(&["q_proj"]), "model.layers.0.h.1.q_proj", NO)
                .layers(Many(vec![1]))
                .pat(p("layers|h")),
            row(Tm::L(&["q_proj"]), Q1, YES)
                .layers(Many(vec![1]))
                .pat(p("lay.rs")),
        ]);
    }

    #[test]
    fn string_target_with_layers_is_invalid_config() {
        let target = TargetModules::Regex(".*q_proj".to_string());
        let layers = One(1);
        let spec = TargetSpec {
            target_modules: Some(&target),
            layers_to_transform: Some(&layers),
            ..Default::default()
        };
        assert!(matches!(
            check_target_module_exists(&spec, Q1),
            Err(PeftError::InvalidConfig(_))
        ));
        let pattern = p("layers");
        let spec = TargetSpec {
            target_modules: Some(&target),
            layers_pattern: Some(&pattern),
            ..Default::default()
        };
        assert!(matches!(
            check_target_module_exists(&spec, Q1),
            Err(PeftError::InvalidConfig(_))
        ));
        // and in the walk too
        let spec = TargetSpec {
            target_modules: Some(&target),
            layers_to_transform: Some(&layers),
            ..Default::default()
        };
        assert!(matches!(
            find_target_modules(&spec, &llama(2), Some("lm_head"), "LORA"),
            Err(PeftError::InvalidConfig(_))
        ));
    }

    #[test]
    fn unexpanded_all_linear_and_bad_regex_are_errors() {
        let target = TargetModules::Regex("all-linear".to_string());
        let spec = TargetSpec {
            target_modules: Some(&target),
            ..Default::default()
        };
        assert!(matches!(
            check_target_module_exists(&spec, Q0),
            Err(PeftError::InvalidConfig(_))
        ));
        let target = TargetModules::Regex("(q_proj".to_string());
        let spec = TargetSpec {
            target_modules: Some(&target),
            ..Default::default()
        };
        assert!(matches!(
            check_target_module_exists(&spec, Q0),
            Err(PeftError::InvalidConfig(_))
        ));
        let target = TargetModules::List(s(&["q_proj"]));
        let pattern = p("(layers");
        let layers = One(0);
        let spec = TargetSpec {
            target_modules: Some(&target),
            layers_to_transform: Some(&layers),
            layers_pattern: Some(&pattern),
            ..Default::default()
        };
        let e = check_target_module_exists(&spec, Q0).unwrap_err();
        assert!(
            matches!(&e, PeftError::InvalidConfig(m) if m.starts_with("`layers_pattern`: invalid regular expression \"(layers\"")),
            "{e}"
        );
        let save = s(&["lm_head["]);
        let spec = TargetSpec {
            target_modules: Some(&target),
            modules_to_save: Some(&save),
            ..Default::default()
        };
        let e = check_target_module_exists(&spec, Q0).unwrap_err();
        assert!(
            matches!(&e, PeftError::InvalidConfig(m) if m.starts_with("`modules_to_save`: invalid regular expression \"lm_head[\"")),
            "{e}"
        );
        // no target_modules: nothing is targeted (PEFT's target_parameters path)
        assert!(!check_target_module_exists(&TargetSpec::default(), Q0).unwrap());
    }

    #[test]
    fn pattern_key_first_wins_and_is_suffix_anchored() {
        let table: &[(&[&str], &str, Option<&str>)] = &[
            (&["q_proj", "v_proj"], Q0, Some("q_proj")),
            // "proj" is not a whole component of "…q_proj", so the later "q_proj" wins
            (&["proj", "q_proj"], Q0, Some("q_proj")),
            (&["q_proj", "proj"], Q0, Some("q_proj")),
            (&["_proj"], Q0, None),
            (&[".*_proj"], Q0, Some(".*_proj")),
            // first key in iteration order wins, not the most specific one
            (&[".*_proj", "q_proj"], Q0, Some(".*_proj")),
            (&["q_proj", ".*_proj"], Q0, Some("q_proj")),
            (&["self_attn.q_proj"], Q0, Some("self_attn.q_proj")),
            (
                &["layers.0.self_attn.q_proj"],
                Q0,
                Some("layers.0.self_attn.q_proj"),
            ),
            (&["layers.1.self_attn.q_proj"], Q0, None),
            (&[Q0], Q0, Some(Q0)),
            (&["q_pro"], Q0, None),
            // anchored at the end
            (&["q_proj"], "model.layers.0.self_attn.q_proj.base", None),
            (&["layers.1"], "model.layers.1", Some("layers.1")),
            (
                &[r"layers\.\d+\.self_attn\.q_proj"],
                "model.layers.3.self_attn.q_proj",
                Some(r"layers\.\d+\.self_attn\.q_proj"),
            ),
            (&["^q_proj"], Q0, None),
            (&["^q_proj"], "q_proj", Some("^q_proj")),
            (
                &["q_proj|v_proj"],
                "model.layers.0.self_attn.v_proj",
                Some("q_proj|v_proj"),
            ),
            (
                &["k_proj", "q_proj|v_proj"],
                "model.layers.0.self_attn.v_proj",
                Some("q_proj|v_proj"),
            ),
            (&[], "model.layers.0.self_attn.v_proj", None),
        ];
        for (keys, name, want) in table {
            assert_eq!(
                get_pattern_key(keys.iter().copied(), name).unwrap(),
                *want,
                "{keys:?} on {name}"
            );
        }
        // works over map keys too (owned strings)
        let map: indexmap::IndexMap<String, usize> =
            [("v_proj".to_string(), 4), ("q_proj".to_string(), 8)].into();
        assert_eq!(
            get_pattern_key(map.keys().map(String::as_str), Q0).unwrap(),
            Some("q_proj")
        );
        let e = get_pattern_key(["(q_proj"], Q0).unwrap_err();
        assert!(
            matches!(&e, PeftError::InvalidConfig(m) if m.contains("invalid regular expression \"(q_proj\"")),
            "{e}"
        );
    }

    fn llama_linear_names(n: usize) -> Vec<String> {
        let mut v = Vec::new();
        for i in 0..n {
            for p in [
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.o_proj",
                "mlp.gate_proj",
                "mlp.up_proj",
                "mlp.down_proj",
            ] {
                v.push(format!("model.layers.{i}.{p}"));
            }
        }
        v
    }

    #[test]
    fn minimal_target_modules() {
        let mut others = s(&[
            "model",
            "model.embed_tokens",
            "model.layers",
            "model.norm",
            "lm_head",
        ]);
        others.extend((0..2).map(|i| format!("model.layers.{i}")));
        assert_eq!(
            find_minimal_target_modules(&llama_linear_names(2), &others).unwrap(),
            s(&[
                "down_proj",
                "gate_proj",
                "k_proj",
                "o_proj",
                "q_proj",
                "up_proj",
                "v_proj"
            ])
        );

        let qv: Vec<String> = llama_linear_names(2)
            .into_iter()
            .filter(|n| n.ends_with("q_proj") || n.ends_with("v_proj"))
            .collect();
        let mut not_qv: Vec<String> = llama_linear_names(2)
            .into_iter()
            .filter(|n| !(n.ends_with("q_proj") || n.ends_with("v_proj")))
            .collect();
        not_qv.extend(others.iter().cloned());
        assert_eq!(
            find_minimal_target_modules(&qv, &not_qv).unwrap(),
            s(&["q_proj", "v_proj"])
        );

        // only layer 0 of 3: suffixes must keep the layer index
        let l0: Vec<String> = llama_linear_names(3)
            .into_iter()
            .filter(|n| n.contains("layers.0."))
            .collect();
        let rest: Vec<String> = llama_linear_names(3)
            .into_iter()
            .filter(|n| !n.contains("layers.0."))
            .collect();
        assert_eq!(
            find_minimal_target_modules(&l0, &rest).unwrap(),
            s(&[
                "0.mlp.down_proj",
                "0.mlp.gate_proj",
                "0.mlp.up_proj",
                "0.self_attn.k_proj",
                "0.self_attn.o_proj",
                "0.self_attn.q_proj",
                "0.self_attn.v_proj"
            ])
        );

        // PEFT's docstring example
        let mut t: Vec<String> = (0..100)
            .map(|i| format!("model.decoder.layers.{i}.self_attn.q_proj"))
            .collect();
        t.extend((0..100).map(|i| format!("model.decoder.layers.{i}.self_attn.v_proj")));
        let o: Vec<String> = (0..100)
            .map(|i| format!("model.encoder.layers.{i}.self_attn.k_proj"))
            .collect();
        assert_eq!(
            find_minimal_target_modules(&t, &o).unwrap(),
            s(&["q_proj", "v_proj"])
        );

        // when the shared suffix also names another module, longer suffixes are kept
        let o: Vec<String> = (0..100)
            .map(|i| format!("model.encoder.layers.{i}.self_attn.q_proj"))
            .collect();
        let got = find_minimal_target_modules(&t, &o).unwrap();
        assert_eq!(got.len(), 101);
        assert!(got.contains(&"v_proj".to_string()));
        assert!(got.contains(&"decoder.layers.7.self_attn.q_proj".to_string()));

        let table: &[(&[&str], &[&str], &[&str])] = &[
            (&["a.b", "c.b", "d.b"], &["e.b"], &["a.b", "c.b", "d.b"]),
            (&["a.b.c", "x.b.c"], &["y.b.c"], &["a.b.c", "x.b.c"]),
            (&["a", "b"], &[], &["a", "b"]),
            (&["b.a", "a"], &[], &["a"]),
            // literal port of PEFT's greedy order: "y.a" ends up uncovered, as in PEFT
            (&["x.a", "y.a", "x.y.a"], &["z.y.a"], &["x.a", "x.y.a"]),
            // duplicates collapse (PEFT builds a set)
            (&["a.q", "a.q", "b.q"], &["c.k"], &["q"]),
        ];
        for (t, o, want) in table {
            assert_eq!(
                find_minimal_target_modules(&s(t), &s(o)).unwrap(),
                s(want),
                "{t:?} vs {o:?}"
            );
        }

        assert!(matches!(
            find_minimal_target_modules(&[], &[]),
            Err(PeftError::Invalid(_))
        ));
        assert!(matches!(
            find_minimal_target_modules(&s(&["", "a"]), &[]),
            Err(PeftError::Invalid(_))
        ));
        assert!(matches!(
            find_minimal_target_modules(&s(&["a"]), &s(&["a"])),
            Err(PeftError::Invalid(_))
        ));
        assert_eq!(MIN_TARGET_MODULES_FOR_OPTIMIZATION, 20);
    }

    /// `LlamaForCausalLM(...).named_modules()` (transformers 5.x) with `n` layers.
    fn llama(n: usize) -> Vec<ModuleInfo> {
        let o = |t: &str| ModuleKind::Other(t.to_string());
        let mut v = vec![
            ModuleInfo::new("", o("LlamaForCausalLM")),
            ModuleInfo::new("model", o("LlamaModel")),
            ModuleInfo::new("model.embed_tokens", ModuleKind::Embedding),
            ModuleInfo::new("model.layers", o("ModuleList")),
        ];
        for i in 0..n {
            let l = format!("model.layers.{i}");
            v.push(ModuleInfo::new(l.clone(), o("LlamaDecoderLayer")));
            v.push(ModuleInfo::new(
                format!("{l}.self_attn"),
                o("LlamaAttention"),
            ));
            for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                v.push(ModuleInfo::new(
                    format!("{l}.self_attn.{p}"),
                    ModuleKind::Linear,
                ));
            }
            v.push(ModuleInfo::new(format!("{l}.mlp"), o("LlamaMLP")));
            for p in ["gate_proj", "up_proj", "down_proj"] {
                v.push(ModuleInfo::new(format!("{l}.mlp.{p}"), ModuleKind::Linear));
            }
            v.push(ModuleInfo::new(
                format!("{l}.mlp.act_fn"),
                o("SiLUActivation"),
            ));
            v.push(ModuleInfo::new(
                format!("{l}.input_layernorm"),
                o("LlamaRMSNorm"),
            ));
            v.push(ModuleInfo::new(
                format!("{l}.post_attention_layernorm"),
                o("LlamaRMSNorm"),
            ));
        }
        v.push(ModuleInfo::new("model.norm", o("LlamaRMSNorm")));
        v.push(ModuleInfo::new(
            "model.rotary_emb",
            o("LlamaRotaryEmbedding"),
        ));
        v.push(ModuleInfo::new("lm_head", ModuleKind::Linear));
        v
    }

    /// `GPT2LMHeadModel(...).named_modules()` with 2 layers.
    fn gpt2() -> Vec<ModuleInfo> {
        let o = |t: &str| ModuleKind::Other(t.to_string());
        let mut v = vec![
            ModuleInfo::new("", o("GPT2LMHeadModel")),
            ModuleInfo::new("transformer", o("GPT2Model")),
            ModuleInfo::new("transformer.wte", ModuleKind::Embedding),
            ModuleInfo::new("transformer.wpe", ModuleKind::Embedding),
            ModuleInfo::new("transformer.drop", o("Dropout")),
            ModuleInfo::new("transformer.h", o("ModuleList")),
        ];
        for i in 0..2 {
            let l = format!("transformer.h.{i}");
            v.push(ModuleInfo::new(l.clone(), o("GPT2Block")));
            v.push(ModuleInfo::new(format!("{l}.ln_1"), o("LayerNorm")));
            v.push(ModuleInfo::new(format!("{l}.attn"), o("GPT2Attention")));
            v.push(ModuleInfo::new(
                format!("{l}.attn.c_attn"),
                ModuleKind::Conv1D,
            ));
            v.push(ModuleInfo::new(
                format!("{l}.attn.c_proj"),
                ModuleKind::Conv1D,
            ));
            v.push(ModuleInfo::new(
                format!("{l}.attn.attn_dropout"),
                o("Dropout"),
            ));
            v.push(ModuleInfo::new(
                format!("{l}.attn.resid_dropout"),
                o("Dropout"),
            ));
            v.push(ModuleInfo::new(format!("{l}.ln_2"), o("LayerNorm")));
            v.push(ModuleInfo::new(format!("{l}.mlp"), o("GPT2MLP")));
            v.push(ModuleInfo::new(format!("{l}.mlp.c_fc"), ModuleKind::Conv1D));
            v.push(ModuleInfo::new(
                format!("{l}.mlp.c_proj"),
                ModuleKind::Conv1D,
            ));
            v.push(ModuleInfo::new(
                format!("{l}.mlp.act"),
                o("NewGELUActivation"),
            ));
            v.push(ModuleInfo::new(format!("{l}.mlp.dropout"), o("Dropout")));
        }
        v.push(ModuleInfo::new("transformer.ln_f", o("LayerNorm")));
        v.push(ModuleInfo::new("lm_head", ModuleKind::Linear));
        v
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    fn resolve(
        target: TargetModules,
        modules: &[ModuleInfo],
        method: &str,
    ) -> Result<ResolvedTargets> {
        let spec = TargetSpec {
            target_modules: Some(&target),
            ..Default::default()
        };
        resolve_targets(&spec, modules, Some("lm_head"), method)
    }

    #[test]
    fn all_linear_small_model_saves_full_names() {
        for shorthand in ["all-linear", "ALL-LINEAR"] {
            let r = resolve(
                TargetModules::Regex(shorthand.to_string()),
                &llama(2),
                "LORA",
            )
            .unwrap();
            assert_eq!(
                r.targeted,
                llama_linear_names(2),
                "tree order, lm_head left out"
            );
            assert_eq!(
                r.target_modules,
                Some(TargetModules::List(sorted(llama_linear_names(2))))
            );
        }
        assert_eq!(
            expand_all_linear(&llama(2), Some("lm_head")),
            llama_linear_names(2)
        );
        let mut with_head = llama_linear_names(2);
        with_head.push("lm_head".to_string());
        assert_eq!(expand_all_linear(&llama(2), None), with_head);
    }

    #[test]
    fn all_linear_large_model_is_condensed() {
        let r = resolve(
            TargetModules::Regex("all-linear".to_string()),
            &llama(3),
            "LORA",
        )
        .unwrap();
        assert_eq!(r.targeted, llama_linear_names(3));
        assert_eq!(
            r.target_modules,
            Some(TargetModules::List(s(&[
                "down_proj",
                "gate_proj",
                "k_proj",
                "o_proj",
                "q_proj",
                "up_proj",
                "v_proj"
            ])))
        );
    }

    #[test]
    fn all_linear_includes_conv1d() {
        let want = s(&[
            "transformer.h.0.attn.c_attn",
            "transformer.h.0.attn.c_proj",
            "transformer.h.0.mlp.c_fc",
            "transformer.h.0.mlp.c_proj",
            "transformer.h.1.attn.c_attn",
            "transformer.h.1.attn.c_proj",
            "transformer.h.1.mlp.c_fc",
            "transformer.h.1.mlp.c_proj",
        ]);
        let r = resolve(
            TargetModules::Regex("all-linear".to_string()),
            &gpt2(),
            "LORA",
        )
        .unwrap();
        assert_eq!(r.targeted, want);
        assert_eq!(r.target_modules, Some(TargetModules::List(want.clone())));
        assert_eq!(expand_all_linear(&gpt2(), Some("lm_head")), want);
    }

    #[test]
    fn long_lists_condensed_except_ia3() {
        // 21 full names: condensed for LoRA, kept for IA3; same modules either way
        let full = TargetModules::List(llama_linear_names(3));
        let r = resolve(full.clone(), &llama(3), "LORA").unwrap();
        assert_eq!(r.targeted, llama_linear_names(3));
        assert_eq!(
            r.target_modules,
            Some(TargetModules::List(s(&[
                "down_proj",
                "gate_proj",
                "k_proj",
                "o_proj",
                "q_proj",
                "up_proj",
                "v_proj"
            ])))
        );
        let r = resolve(full.clone(), &llama(3), "IA3").unwrap();
        assert_eq!(r.targeted, llama_linear_names(3));
        assert_eq!(r.target_modules, Some(full));
        // 14 full names: below the threshold, kept as given
        let full = TargetModules::List(llama_linear_names(2));
        let r = resolve(full.clone(), &llama(2), "LORA").unwrap();
        assert_eq!(r.target_modules, Some(full));
    }

    #[test]
    fn condensing_changes_layers_to_transform_like_peft() {
        // Full names bypass layers_to_transform ...
        let layers = Many(vec![0]);
        let full = TargetModules::List(llama_linear_names(2));
        let spec = TargetSpec {
            target_modules: Some(&full),
            layers_to_transform: Some(&layers),
            ..Default::default()
        };
        assert_eq!(
            find_target_modules(&spec, &llama(2), Some("lm_head"), "LORA").unwrap(),
            llama_linear_names(2)
        );
        // ... unless there are ≥ 20 of them: condensed to suffixes first, which layers_to_transform filters.
        let full = TargetModules::List(llama_linear_names(3));
        let spec = TargetSpec {
            target_modules: Some(&full),
            layers_to_transform: Some(&layers),
            ..Default::default()
        };
        assert_eq!(
            find_target_modules(&spec, &llama(3), Some("lm_head"), "LORA").unwrap(),
            llama_linear_names(1)
        );
    }

    #[test]
    fn walk_tables() {
        let t = |v: &[&str]| TargetModules::List(s(v));
        let r = |v: &[&str]| -> Vec<String> { s(v) };
        let cases: Vec<(TargetModules, Vec<String>)> = vec![
            (
                TargetModules::Regex(r".*\.(q|v)_proj".to_string()),
                r(&[
                    "model.layers.0.self_attn.q_proj",
                    "model.layers.0.self_attn.v_proj",
                    "model.layers.1.self_attn.q_proj",
                    "model.layers.1.self_attn.v_proj",
                ]),
            ),
            (
                t(&["embed_tokens", "lm_head", "q_proj"]),
                r(&[
                    "model.embed_tokens",
                    "model.layers.0.self_attn.q_proj",
                    "model.layers.1.self_attn.q_proj",
                    "lm_head",
                ]),
            ),
        ];
        for (target, want) in cases {
            let got = resolve(target.clone(), &llama(2), "LORA").unwrap();
            assert_eq!(got.targeted, want, "{target:?}");
            assert_eq!(got.target_modules, Some(target));
        }

        // layers_to_transform as an int
        let target = t(&["q_proj", "v_proj"]);
        let layers = One(1);
        let spec = TargetSpec {
            target_modules: Some(&target),
            layers_to_transform: Some(&layers),
            ..Default::default()
        };
        assert_eq!(
            find_target_modules(&spec, &llama(2), Some("lm_head"), "LORA").unwrap(),
            r(&[
                "model.layers.1.self_attn.q_proj",
                "model.layers.1.self_attn.v_proj"
            ])
        );

        // modules_to_save are skipped, the rest is still targeted
        let target = t(&["lm_head", "q_proj"]);
        let save = s(&["lm_head"]);
        let spec = TargetSpec {
            target_modules: Some(&target),
            modules_to_save: Some(&save),
            ..Default::default()
        };
        assert_eq!(
            find_target_modules(&spec, &llama(2), Some("lm_head"), "LORA").unwrap(),
            r(&[Q0, Q1])
        );
    }

    /// The error of walking the 2-layer Llama tree with `spec` for LoRA.
    fn walk_err(spec: &TargetSpec<'_>) -> PeftError {
        find_target_modules(spec, &llama(2), Some("lm_head"), "LORA").unwrap_err()
    }

    fn only(target: &TargetModules) -> TargetSpec<'_> {
        TargetSpec {
            target_modules: Some(target),
            ..Default::default()
        }
    }

    #[test]
    fn unsupported_kind_is_an_error() {
        for (target, module, kind) in [
            (
                TargetModules::List(s(&["mlp"])),
                "model.layers.0.mlp",
                "LlamaMLP",
            ),
            (
                TargetModules::List(s(&["input_layernorm"])),
                "model.layers.0.input_layernorm",
                "LlamaRMSNorm",
            ),
            (
                TargetModules::Regex(".*".to_string()),
                "model",
                "LlamaModel",
            ),
        ] {
            let e = walk_err(&only(&target));
            let msg = e.to_string();
            assert!(matches!(e, PeftError::Invalid(_)), "{msg}");
            assert!(
                msg.contains(&format!("`{module}` ({kind}) is not supported by LORA")),
                "{msg}"
            );
        }
    }

    #[test]
    fn nothing_targeted_errors() {
        // none found
        let e = walk_err(&only(&TargetModules::List(s(&["xq_proj"]))));
        assert!(matches!(e, PeftError::NoTargetMatched(_)));
        let msg = e.to_string();
        assert!(
            msg.contains("{'xq_proj'}") && msg.contains("not found in the base model"),
            "{msg}"
        );

        // none found, with the layer settings named
        let q = TargetModules::List(s(&["q_proj"]));
        let layers = Many(vec![5]);
        let pattern = p("layers");
        let e = walk_err(&TargetSpec {
            layers_to_transform: Some(&layers),
            layers_pattern: Some(&pattern),
            ..only(&q)
        });
        let msg = e.to_string();
        assert!(matches!(e, PeftError::NoTargetMatched(_)));
        assert!(
            msg.contains("'layers_to_transform': [5]") && msg.contains("'layers_pattern': layers"),
            "{msg}"
        );

        // the targeted modules excluded, the others unmatched
        let e = walk_err(&TargetSpec {
            exclude_modules: Some(&q),
            ..only(&q)
        });
        assert!(
            matches!(&e, PeftError::NoTargetMatched(m) if m.contains("no modules were targeted")),
            "{e}"
        );

        // only modules_to_save targeted
        let head = TargetModules::List(s(&["lm_head"]));
        let save = s(&["lm_head"]);
        let e = walk_err(&TargetSpec {
            modules_to_save: Some(&save),
            ..only(&head)
        });
        assert!(
            matches!(&e, PeftError::NoTargetMatched(m) if m.contains("no modules were targeted")),
            "{e}"
        );

        // every module excluded
        let all = TargetModules::Regex(".*".to_string());
        let e = walk_err(&TargetSpec {
            exclude_modules: Some(&all),
            ..only(&q)
        });
        assert!(
            matches!(&e, PeftError::NoTargetMatched(m) if m.contains("all modules were excluded")),
            "{e}"
        );

        // empty target list
        let e = walk_err(&only(&TargetModules::List(vec![])));
        assert!(
            matches!(&e, PeftError::NoTargetMatched(m) if m.starts_with("set() (no `target_modules` passed")),
            "{e}"
        );

        // no target_modules at all
        let spec = TargetSpec::default();
        assert!(matches!(
            find_target_modules(&spec, &llama(2), None, "LORA"),
            Err(PeftError::InvalidConfig(_))
        ));
    }

    #[test]
    fn module_kind_names() {
        assert_eq!(ModuleKind::Conv1D.to_string(), "Conv1D");
        assert_eq!(ModuleKind::Other("LlamaMLP".into()).type_name(), "LlamaMLP");
        assert!(ModuleKind::Conv1D.is_linear() && ModuleKind::Linear.is_linear());
        assert!(!ModuleKind::Embedding.is_linear() && !ModuleKind::Conv2d.is_linear());
    }
}
