//! `OsfConfig`, field for field with PEFT 0.21.2's `tuners/osf/config.py` (`OSFConfig`).

use crate::config::PeftConfigBase;
use crate::config::common::{TargetModules, TargetSpec};
use crate::config::helpers;
use crate::{PeftError, Result};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

/// An adapter's OSF settings (`peft_type: "OSF"`).
///
/// ```
/// use peft::PeftConfig;
/// let c = PeftConfig::from_json_str(r#"{"peft_type": "OSF", "effective_rank": 4, "target_modules": ["q_proj"]}"#)?;
/// c.validate()?;
/// let PeftConfig::Osf(o) = &c else { unreachable!() };
/// assert_eq!(o.frozen_rank("model.layers.0.self_attn.q_proj", 64)?, 4);
/// # Ok::<(), peft::PeftError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct OsfConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `effective_rank` (default `null`: half the smaller dimension): how many top singular directions of
    /// each weight stay frozen; an integer, or a float in `(0, 1]` (that fraction of the smaller dimension).
    /// The trained rank is `min(out, in) − effective_rank`.
    pub effective_rank: Option<Number>,
    /// `target_modules` (default `null`: PEFT's OSF table by model type, else `all-linear`).
    pub target_modules: Option<TargetModules>,
    /// `rank_pattern` (default `null`): `effective_rank` per module, the first key that `re.search`es the
    /// module name.
    pub rank_pattern: Option<IndexMap<String, Number>>,
    /// `init_weights` (default `true`): the trained factors start as the weight's own (the identity);
    /// `false`: `N(0, 1)`.
    pub init_weights: bool,
    /// `modules_to_save` (default `null`).
    pub modules_to_save: Option<Vec<String>>,
    /// `target_svd_config` (default `null`): ignored, as by PEFT ("accepted for forward compatibility").
    pub target_svd_config: Option<Value>,
    /// Keys PEFT 0.21.2's `OSFConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for OsfConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            effective_rank: None,
            target_modules: None,
            rank_pattern: None,
            init_weights: true,
            modules_to_save: None,
            target_svd_config: None,
            extra: Map::new(),
        }
    }
}

/// PEFT's `_resolve_rank`: `None` → `min_dim // 2`; a float in `(0, 1]` → `int(min_dim · value)`; otherwise
/// `int(value)`; clamped to `[0, min_dim]`.
fn resolve_rank(value: Option<&Number>, min_dim: usize) -> usize {
    let Some(v) = value else {
        return min_dim / 2;
    };
    let r: i64 = if v.is_f64() {
        let f = v.as_f64().unwrap_or(0.0);
        if f > 0.0 && f <= 1.0 {
            (min_dim as f64 * f) as i64
        } else {
            f as i64
        }
    } else {
        v.as_i64().unwrap_or(0)
    };
    r.clamp(0, min_dim as i64) as usize
}

impl OsfConfig {
    /// Which modules the adapter wraps (no `exclude_modules` nor `layers_to_transform` in PEFT's config).
    pub fn target_spec(&self) -> TargetSpec<'_> {
        TargetSpec {
            target_modules: self.target_modules.as_ref(),
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            modules_to_save: self.modules_to_save.as_deref(),
        }
    }

    /// The number of frozen (top) singular directions of `module`, whose weight's smaller dimension is
    /// `min_dim` (PEFT's `_create_and_replace`): `rank_pattern`'s first key that `re.search`es the name, else
    /// `effective_rank`. PEFT refuses 0 (`update_layer`'s "`effective_rank` should be a positive integer").
    pub fn frozen_rank(&self, module: &str, min_dim: usize) -> Result<usize> {
        let mut value = self.effective_rank.as_ref();
        if let Some(p) = &self.rank_pattern {
            for (pattern, rank) in p {
                if crate::tuners::tuners_utils::search(pattern, module, "rank_pattern")? {
                    value = Some(rank);
                    break;
                }
            }
        }
        let k = resolve_rank(value, min_dim);
        if k == 0 {
            return Err(PeftError::InvalidConfig(format!(
                "OSF: `effective_rank` should be a positive integer value but the value passed is 0 (`{module}`)"
            )));
        }
        Ok(k)
    }

    /// The checks: `rank_pattern` keys are regexes, and unknown keys are refused.
    pub fn validate(&self) -> Result<()> {
        if let Some(p) = &self.rank_pattern {
            for k in p.keys() {
                crate::tuners::tuners_utils::search(k, "", "rank_pattern")?;
            }
        }
        helpers::refuse_unknown_keys(&self.extra, "OSFConfig")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PeftConfig;

    /// `OSFConfig(target_modules=["lin0", "lin1"], effective_rank=3)` saved by PEFT 0.21.2 (`auto_mapping`
    /// null).
    const PEFT_JSON: &str = r#"{
  "auto_mapping": null,
  "base_model_name_or_path": null,
  "effective_rank": 3,
  "inference_mode": true,
  "init_weights": true,
  "modules_to_save": null,
  "peft_type": "OSF",
  "peft_version": "0.21.2",
  "rank_pattern": null,
  "revision": null,
  "target_modules": [
    "lin0",
    "lin1"
  ],
  "target_svd_config": null,
  "task_type": null
}"#;

    #[test]
    fn peft_file_round_trips_byte_for_byte() {
        let cfg = PeftConfig::from_json_str(PEFT_JSON).expect("parses");
        cfg.validate().expect("supported");
        assert_eq!(cfg.to_json_string(), PEFT_JSON);
    }

    #[test]
    fn ranks_resolve_as_peft() {
        let c = |json: &str| -> OsfConfig { serde_json::from_str(json).unwrap() };
        assert_eq!(c("{}").frozen_rank("a", 10).unwrap(), 5);
        assert_eq!(c(r#"{"effective_rank": 3}"#).frozen_rank("a", 10).unwrap(), 3);
        assert_eq!(c(r#"{"effective_rank": 0.25}"#).frozen_rank("a", 10).unwrap(), 2);
        // an integer 1 is one direction, a float 1.0 the whole smaller dimension
        assert_eq!(c(r#"{"effective_rank": 1}"#).frozen_rank("a", 10).unwrap(), 1);
        assert_eq!(c(r#"{"effective_rank": 1.0}"#).frozen_rank("a", 10).unwrap(), 10);
        assert_eq!(c(r#"{"effective_rank": 40}"#).frozen_rank("a", 10).unwrap(), 10);
        let p = c(r#"{"effective_rank": 2, "rank_pattern": {"lin1$": 4, "lin": 1}}"#);
        assert_eq!(p.frozen_rank("x.lin1", 10).unwrap(), 4);
        assert_eq!(p.frozen_rank("x.lin0", 10).unwrap(), 1);
        assert_eq!(p.frozen_rank("other", 10).unwrap(), 2);
        assert!(c(r#"{"effective_rank": 0.01}"#).frozen_rank("a", 10).is_err());
        assert!(
            PeftConfig::from_json_str(r#"{"peft_type": "OSF", "rank_pattern": {"(": 1}}"#)
                .unwrap()
                .validate()
                .is_err()
        );
    }
}
