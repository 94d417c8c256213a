//! Serde adapters and validation helpers shared by the method configs.

use crate::config::common::{LayersToTransform, StrOrList, TargetModules};
use crate::tuners::tuners_utils::get_pattern_key;
use crate::{PeftError, Result};
use indexmap::IndexMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// Largest integer an `f64` holds exactly (2^53).
const MAX_EXACT_INT: f64 = 9_007_199_254_740_992.0;

/// Writes an `f64` that holds an integral value as a JSON integer (PEFT declares the field `int` and its users
/// pass ints: `lora_alpha: 16`), any other value as a float.
pub(crate) fn int_if_integral<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
    IntIfIntegral(*v).serialize(s)
}

/// [`int_if_integral`] for every value of a map (`alpha_pattern`).
pub(crate) fn map_int_if_integral<S: Serializer>(
    m: &IndexMap<String, f64>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(m.iter().map(|(k, v)| (k, IntIfIntegral(*v))))
}

struct IntIfIntegral(f64);

impl Serialize for IntIfIntegral {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let v = self.0;
        if v.is_finite() && v.fract() == 0.0 && v.abs() <= MAX_EXACT_INT {
            s.serialize_i64(v as i64)
        } else {
            s.serialize_f64(v)
        }
    }
}

/// Reads `null` as the type's default (PEFT treats a `null` pattern dict like an empty one).
pub(crate) fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Python truthiness of a JSON value: `null`, `false`, `0`, `""`, `[]` and `{}` are false.
pub(crate) fn is_truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

/// The value as written in an error message (compact JSON).
pub(crate) fn show(v: &Value) -> String {
    v.to_string()
}

/// `Unsupported` for `field` when `value` is truthy (PEFT's `if config.field:`), else Ok.
pub(crate) fn refuse_if_truthy(field: &str, value: &Value, reason: &str) -> Result<()> {
    if is_truthy(value) {
        return Err(unsupported(field, value, reason));
    }
    Ok(())
}

/// `Unsupported` for `field` when `value` is present and not `null` (PEFT's `if config.field is not None:`; an
/// empty sub-config `{}` is turned into the sub-config class with its defaults, which enables the feature).
pub(crate) fn refuse_if_some(field: &str, value: Option<&Value>, reason: &str) -> Result<()> {
    match value {
        Some(v) if !v.is_null() => Err(unsupported(field, v, reason)),
        _ => Ok(()),
    }
}

fn unsupported(field: &str, value: &Value, reason: &str) -> PeftError {
    PeftError::Unsupported {
        field: field.to_string(),
        value: show(value),
        reason: reason.to_string(),
    }
}

/// `Unsupported` for `field` when the flag is true.
pub(crate) fn refuse_flag(field: &str, value: bool, reason: &str) -> Result<()> {
    if value {
        return Err(PeftError::Unsupported {
            field: field.to_string(),
            value: "true".into(),
            reason: reason.into(),
        });
    }
    Ok(())
}

/// Refuses unknown keys set to a truthy value: their effect (in a newer PEFT or another tool) is unknown to us.
/// Unknown keys at `null` / `false` / empty values are accepted (they stay in `extra` and are reported).
pub(crate) fn refuse_unknown_keys(extra: &Map<String, Value>, class: &str) -> Result<()> {
    for (key, value) in extra {
        if is_truthy(value) {
            let reason = format!(
                "not a field of PEFT 0.21.2's {class} (written by a newer PEFT or another tool?); \
                 its effect cannot be reproduced"
            );
            return Err(unsupported(key, value, &reason));
        }
    }
    Ok(())
}

/// A dropout probability above 1 makes torch's `nn.Dropout` raise (PEFT builds one only for `p > 0`, so a
/// negative value means no dropout).
pub(crate) fn check_probability(field: &str, p: f64) -> Result<()> {
    if p > 1.0 || p.is_nan() {
        return Err(PeftError::InvalidConfig(format!(
            "`{field}` is a probability and must be at most 1, got {p}"
        )));
    }
    Ok(())
}

/// Python truthiness of `layers_pattern`.
fn pattern_is_set(p: Option<&StrOrList>) -> bool {
    match p {
        None => false,
        Some(StrOrList::One(s)) => !s.is_empty(),
        Some(StrOrList::Many(v)) => !v.is_empty(),
    }
}

/// PEFT's common check: a (truthy) `layers_pattern` needs `layers_to_transform`.
/// OFT's and BOFT's block-size rule: exactly one of two sizes is non-zero, since their product is
/// `in_features` (PEFT's wording).
pub(crate) fn check_exactly_one_size(a: (&str, usize), b: (&str, usize)) -> Result<()> {
    match (a.1, b.1) {
        (0, 0) => Err(PeftError::InvalidConfig(format!(
            "either `{}` or `{}` must be non-zero; both are 0",
            a.0, b.0
        ))),
        (x, y) if x != 0 && y != 0 => Err(PeftError::InvalidConfig(format!(
            "you can only specify either {} ({x}) or {} ({y}), but not both, because {} × {} == in_features",
            a.0, b.0, a.0, b.0
        ))),
        _ => Ok(()),
    }
}

pub(crate) fn check_layers_pattern(
    layers_to_transform: Option<&LayersToTransform>,
    layers_pattern: Option<&StrOrList>,
) -> Result<()> {
    if pattern_is_set(layers_pattern) && layers_to_transform.is_none() {
        return Err(PeftError::InvalidConfig(
            "when `layers_pattern` is specified, `layers_to_transform` must also be specified"
                .into(),
        ));
    }
    Ok(())
}

/// LoRA's extra checks (lora/config.py:1040-1049): a regex (string) `target_modules` excludes
/// `layers_to_transform` and `layers_pattern`.
pub(crate) fn check_regex_target_layers(
    target_modules: Option<&TargetModules>,
    layers_to_transform: Option<&LayersToTransform>,
    layers_pattern: Option<&StrOrList>,
) -> Result<()> {
    if let Some(TargetModules::Regex(_)) = target_modules {
        if layers_to_transform.is_some() {
            return Err(PeftError::InvalidConfig(
                "`layers_to_transform` cannot be used when `target_modules` is a str".into(),
            ));
        }
        if layers_pattern.is_some() {
            return Err(PeftError::InvalidConfig(
                "`layers_pattern` cannot be used when `target_modules` is a str".into(),
            ));
        }
    }
    Ok(())
}

/// The value of the first key of `map` (in map order) that matches `module_name` as PEFT's `get_pattern_key`
/// does ([`crate::tuners::tuners_utils::get_pattern_key`]). A map with a key that is not a valid regex matches
/// nothing ([`check_pattern_keys`] reports it).
pub(crate) fn pattern_lookup<'a, V>(
    map: &'a IndexMap<String, V>,
    module_name: &str,
) -> Option<&'a V> {
    let key = get_pattern_key(map.keys().map(String::as_str), module_name).ok()??;
    map.get(key)
}

/// Every pattern key must compile as a regular expression (Python would raise `re.error` on use).
pub(crate) fn check_pattern_keys<'a>(
    field: &str,
    keys: impl IntoIterator<Item = &'a String>,
) -> Result<()> {
    for key in keys {
        // The regex PEFT's `get_pattern_key` builds: `re.match(rf"(.*\.)?({key})$", name)`.
        if let Err(e) = fancy_regex::Regex::new(&format!(r"^(.*\.)?({key})$")) {
            return Err(PeftError::InvalidConfig(format!(
                "`{field}` key {key:?} is not a valid regular expression: {e}"
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn truthiness_is_pythons() {
        for v in [
            json!(null),
            json!(false),
            json!(0),
            json!(0.0),
            json!(""),
            json!([]),
            json!({}),
        ] {
            assert!(!is_truthy(&v), "{v}");
        }
        for v in [
            json!(true),
            json!(1),
            json!(-0.5),
            json!("x"),
            json!([0]),
            json!({"a": null}),
        ] {
            assert!(is_truthy(&v), "{v}");
        }
    }

    #[test]
    fn pattern_lookup_is_get_pattern_key() {
        let mut m: IndexMap<String, usize> = IndexMap::new();
        m.insert("q_proj".into(), 1);
        m.insert("layers.0.self_attn.v_proj".into(), 2);
        m.insert("layers\\.[12]\\..*k_proj".into(), 3);
        assert_eq!(
            pattern_lookup(&m, "model.layers.0.self_attn.q_proj"),
            Some(&1)
        );
        assert_eq!(pattern_lookup(&m, "q_proj"), Some(&1));
        assert_eq!(pattern_lookup(&m, "model.layers.0.self_attn.xq_proj"), None);
        assert_eq!(
            pattern_lookup(&m, "model.layers.0.self_attn.q_proj.x"),
            None
        );
        assert_eq!(
            pattern_lookup(&m, "model.layers.0.self_attn.v_proj"),
            Some(&2)
        );
        assert_eq!(pattern_lookup(&m, "model.layers.10.self_attn.v_proj"), None);
        assert_eq!(
            pattern_lookup(&m, "model.layers.2.self_attn.k_proj"),
            Some(&3)
        );
        assert_eq!(pattern_lookup(&m, "model.layers.3.self_attn.k_proj"), None);
    }

    #[test]
    fn bad_pattern_key_never_matches_and_is_reported() {
        let mut m: IndexMap<String, usize> = IndexMap::new();
        m.insert("q_proj(".into(), 1);
        assert_eq!(pattern_lookup(&m, "q_proj("), None);
        assert!(matches!(
            check_pattern_keys("rank_pattern", m.keys()),
            Err(PeftError::InvalidConfig(_))
        ));
    }
}
