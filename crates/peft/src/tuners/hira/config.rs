//! `HiraConfig`, field for field with PEFT 0.21.2's `tuners/hira/config.py`.

use crate::config::PeftConfigBase;
use crate::config::common::TargetFields;
use crate::config::helpers;
use crate::{PeftError, Result};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `init_weights` of HiRA: `true` (the default: Kaiming-uniform `A`, zero `B`, the identity), `false` (both
/// N(0, 1), for tests) or `"gaussian"` (`A` ~ N(0, 1/r), zero `B`). PEFT also accepts `null`, which acts as
/// `false`; it is read as [`HiraInit::Null`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HiraInit {
    /// `true` or `false`.
    Bool(bool),
    /// A named initialisation (`"gaussian"`).
    Method(String),
    /// `null` (PEFT treats it as `false`).
    Null(()),
}

impl Default for HiraInit {
    fn default() -> Self {
        HiraInit::Bool(true)
    }
}

impl HiraInit {
    /// Whether the update starts at zero (PEFT's `if init_weights:`).
    pub fn is_identity(&self) -> bool {
        match self {
            HiraInit::Bool(b) => *b,
            HiraInit::Method(_) => true,
            HiraInit::Null(()) => false,
        }
    }
}

/// An adapter's HiRA settings (`peft_type: "HIRA"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct HiraConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `target_modules`, `exclude_modules`, `layers_to_transform`, `layers_pattern`, `modules_to_save`.
    #[serde(flatten)]
    pub targets: TargetFields,
    /// `r`: the rank of `B·A` (default 32).
    pub r: usize,
    /// `hira_dropout`: dropout on the adapter's input, in training (default 0; not on embeddings, as PEFT).
    pub hira_dropout: f64,
    /// `fan_in_fan_out` (default `false`): set for GPT-2's Conv1D, whose weight is `[in, out]`.
    pub fan_in_fan_out: bool,
    /// `init_weights` (default `true`).
    pub init_weights: HiraInit,
    /// `rank_pattern`: per-module ranks, matched as PEFT's `get_pattern_key` (default `{}`). PEFT 0.21.2
    /// applies it only to an adapter added to a layer that already has one (a layer's first adapter takes
    /// `r`): files with either rank load, and creating an adapter that it would give another rank is refused.
    #[serde(deserialize_with = "crate::config::helpers::null_as_default")]
    pub rank_pattern: IndexMap<String, usize>,
    /// Keys PEFT 0.21.2's `HiraConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for HiraConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            targets: TargetFields::default(),
            r: 32,
            hira_dropout: 0.0,
            fan_in_fan_out: false,
            init_weights: HiraInit::default(),
            rank_pattern: IndexMap::new(),
            extra: Map::new(),
        }
    }
}

impl HiraConfig {
    /// PEFT's checks (`layers_pattern` needs `layers_to_transform`, positive ranks, a known `init_weights`)
    /// and a dropout in `[0, 1)`.
    pub fn validate(&self) -> Result<()> {
        helpers::check_layers_pattern(
            self.targets.layers_to_transform.as_ref(),
            self.targets.layers_pattern.as_ref(),
        )?;
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, r)| **r == 0) {
            return Err(PeftError::InvalidConfig(format!(
                "HiRA: `r` should be a positive integer value but the value passed is 0 (rank_pattern {k:?})"
            )));
        }
        if self.r == 0 {
            return Err(PeftError::InvalidConfig(
                "HiRA: `r` should be a positive integer value but the value passed is 0".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.hira_dropout) {
            return Err(PeftError::InvalidConfig(format!(
                "HiRA: `hira_dropout` must be in [0, 1), got {}",
                self.hira_dropout
            )));
        }
        if let HiraInit::Method(m) = &self.init_weights
            && !m.eq_ignore_ascii_case("gaussian")
        {
            return Err(PeftError::InvalidConfig(format!(
                "HiRA: Unknown initialization init_weights={m:?} (true, false or \"gaussian\")"
            )));
        }
        helpers::refuse_unknown_keys(&self.extra, "HiraConfig")
    }

    /// The rank of `module` (PEFT's `get_pattern_key` over `rank_pattern`).
    pub fn rank_of(&self, module: &str) -> Result<usize> {
        let k = crate::tuners::tuners_utils::get_pattern_key(
            self.rank_pattern.keys().map(String::as_str),
            module,
        )?;
        Ok(k.and_then(|k| self.rank_pattern.get(k))
            .copied()
            .unwrap_or(self.r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_weights_reads_every_form_peft_writes() {
        for (json, want, identity) in [
            ("true", HiraInit::Bool(true), true),
            ("false", HiraInit::Bool(false), false),
            ("\"gaussian\"", HiraInit::Method("gaussian".into()), true),
            ("null", HiraInit::Null(()), false),
        ] {
            let c: HiraConfig =
                serde_json::from_str(&format!(r#"{{"r": 4, "init_weights": {json}}}"#)).unwrap();
            assert_eq!(c.init_weights, want, "{json}");
            assert_eq!(c.init_weights.is_identity(), identity, "{json}");
            let back = serde_json::to_value(&c).unwrap();
            assert_eq!(back["init_weights"].to_string(), json);
        }
    }

    #[test]
    fn the_rank_pattern_picks_the_rank() {
        let c = HiraConfig {
            r: 4,
            rank_pattern: IndexMap::from([("v_proj".to_string(), 2)]),
            ..Default::default()
        };
        assert_eq!(c.rank_of("model.layers.0.self_attn.v_proj").unwrap(), 2);
        assert_eq!(c.rank_of("model.layers.0.self_attn.q_proj").unwrap(), 4);
    }
}
