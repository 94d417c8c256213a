//! `FourierFTConfig`, field for field with PEFT 0.21.2's `tuners/fourierft/config.py`.

use crate::config::PeftConfigBase;
use crate::config::common::{BiasMode, TargetFields};
use crate::config::helpers;
use crate::{PeftError, Result};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An adapter's FourierFT settings (`peft_type: "FOURIERFT"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FourierftConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `target_modules`, `exclude_modules`, `layers_to_transform`, `layers_pattern`, `modules_to_save`.
    #[serde(flatten)]
    pub targets: TargetFields,
    /// `n_frequency`: the number of learned spectral entries per layer, at most `in · out` (default 1000).
    pub n_frequency: usize,
    /// `scaling`: the factor of the update, like LoRA's alpha (default 150.0).
    pub scaling: f64,
    /// `random_loc_seed`: the seed of the entries' locations (default 777; `null` cannot build a layer, as in
    /// PEFT, where `torch.Generator().manual_seed(None)` raises).
    pub random_loc_seed: Option<i64>,
    /// `fan_in_fan_out` (default `false`). PEFT overrides it by layer (`true` for a GPT-2 Conv1D, `false` for
    /// a Linear) and saves the last targeted layer's value; the layer's kind decides here too.
    pub fan_in_fan_out: bool,
    /// `bias` (default `"none"`): only `"none"` is supported.
    pub bias: BiasMode,
    /// `n_frequency_pattern`: per-module `n_frequency` (default `{}`), matched as PEFT does:
    /// `re.match(rf".*\.{key}$", name)`, else the module's own name as a key.
    #[serde(deserialize_with = "crate::config::helpers::null_as_default")]
    pub n_frequency_pattern: IndexMap<String, usize>,
    /// `init_weights` (default `false`: the spectrum drawn from `N(0, 1)`; `true`: zeros, the identity).
    pub init_weights: bool,
    /// Keys PEFT 0.21.2's `FourierFTConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for FourierftConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            targets: TargetFields::default(),
            n_frequency: 1000,
            scaling: 150.0,
            random_loc_seed: Some(777),
            fan_in_fan_out: false,
            bias: BiasMode::None,
            n_frequency_pattern: IndexMap::new(),
            init_weights: false,
            extra: Map::new(),
        }
    }
}

/// Whether Python's `re.match(rf".*\.{key}$", module)` succeeds.
fn pattern_matches(key: &str, module: &str) -> Result<bool> {
    let re = fancy_regex::Regex::new(&format!(r"\A(?:.*\.{key}$)")).map_err(|e| {
        PeftError::InvalidConfig(format!(
            "`n_frequency_pattern`: invalid regular expression {key:?}: {e}"
        ))
    })?;
    re.is_match(module).map_err(|e| {
        PeftError::InvalidConfig(format!(
            "`n_frequency_pattern`: regex {key:?} failed on {module:?}: {e}"
        ))
    })
}

impl FourierftConfig {
    /// The `n_frequency` of `module`: the first `n_frequency_pattern` key `k` for which Python's
    /// `re.match(rf".*\.{k}$", module)` succeeds, else `module` itself looked up, else `n_frequency` (PEFT's
    /// `FourierFTModel._create_and_replace`).
    ///
    /// ```
    /// use peft::config::FourierftConfig;
    /// let c = FourierftConfig {
    ///     n_frequency_pattern: [("q_proj".to_string(), 64)].into_iter().collect(),
    ///     ..Default::default()
    /// };
    /// assert_eq!(c.n_frequency_for("model.layers.0.self_attn.q_proj")?, 64);
    /// assert_eq!(c.n_frequency_for("model.layers.0.self_attn.v_proj")?, 1000);
    /// # Ok::<(), peft::PeftError>(())
    /// ```
    pub fn n_frequency_for(&self, module: &str) -> Result<usize> {
        for (k, v) in &self.n_frequency_pattern {
            if pattern_matches(k, module)? {
                return Ok(*v);
            }
        }
        Ok(self
            .n_frequency_pattern
            .get(module)
            .copied()
            .unwrap_or(self.n_frequency))
    }

    /// The seed of the spectral locations; `null` is an error (PEFT's layer creation raises on it).
    pub fn seed(&self) -> Result<i64> {
        self.random_loc_seed.ok_or_else(|| {
            PeftError::InvalidConfig(
                "FourierFT: `random_loc_seed` is null, but the spectral locations are drawn from it \
                 (PEFT's torch.Generator().manual_seed(None) raises)"
                    .into(),
            )
        })
    }

    /// PEFT's checks (a regex `target_modules` excludes `layers_to_transform` and `layers_pattern`;
    /// `layers_pattern` needs `layers_to_transform`), `n_frequency_pattern` keys that compile, and the
    /// features peft-rs does not implement: `bias` other than `"none"`. `n_frequency` is checked against each
    /// layer's size when the layer is built, as PEFT does.
    pub fn validate(&self) -> Result<()> {
        helpers::check_regex_target_layers(
            self.targets.target_modules.as_ref(),
            self.targets.layers_to_transform.as_ref(),
            self.targets.layers_pattern.as_ref(),
        )?;
        helpers::check_layers_pattern(
            self.targets.layers_to_transform.as_ref(),
            self.targets.layers_pattern.as_ref(),
        )?;
        for k in self.n_frequency_pattern.keys() {
            pattern_matches(k, "")?;
        }
        if !self.scaling.is_finite() {
            return Err(PeftError::InvalidConfig(format!(
                "FourierFT: `scaling` must be finite, got {}",
                self.scaling
            )));
        }
        if self.bias != BiasMode::None {
            return Err(PeftError::Unsupported {
                field: "bias".into(),
                value: self.bias.as_str().into(),
                reason: "FourierFT adapters train no biases in peft-rs (only \"none\")".into(),
            });
        }
        helpers::refuse_unknown_keys(&self.extra, "FourierFTConfig")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::PeftConfig;

    #[test]
    fn defaults_are_peft_s() {
        let c = FourierftConfig::default();
        let v = PeftConfig::from(c).to_json_value();
        assert_eq!(v["n_frequency"], 1000);
        assert_eq!(v["scaling"], 150.0);
        assert_eq!(v["random_loc_seed"], 777);
        assert_eq!(v["init_weights"], false);
        assert_eq!(v["fan_in_fan_out"], false);
        assert_eq!(v["bias"], "none");
        assert_eq!(v["n_frequency_pattern"], serde_json::json!({}));
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        for (text, field) in [
            (r#"{"peft_type": "FOURIERFT", "bias": "all"}"#, "bias"),
            (r#"{"peft_type": "FOURIERFT", "bias": "fourier_only"}"#, "bias"),
            (r#"{"peft_type": "FOURIERFT", "ifft2_norm": "ortho"}"#, "ifft2_norm"),
        ] {
            match PeftConfig::from_json_str(text).unwrap().validate() {
                Err(PeftError::Unsupported { field: f, .. }) => assert_eq!(f, field, "{text}"),
                other => panic!("{text}: {other:?}"),
            }
        }
        for text in [
            r#"{"peft_type": "FOURIERFT", "n_frequency_pattern": {"(": 4}}"#,
            r#"{"peft_type": "FOURIERFT", "target_modules": "q", "layers_to_transform": [0]}"#,
            r#"{"peft_type": "FOURIERFT", "layers_pattern": "layers"}"#,
        ] {
            let e = PeftConfig::from_json_str(text).unwrap().validate().unwrap_err();
            assert!(matches!(e, PeftError::InvalidConfig(_)), "{text}: {e}");
        }
        assert!(PeftConfig::from_json_str(r#"{"peft_type": "FOURIERFT", "n_frequency": -1}"#).is_err());
        let c = FourierftConfig {
            random_loc_seed: None,
            ..Default::default()
        };
        assert!(c.seed().unwrap_err().to_string().contains("random_loc_seed"));
    }

    #[test]
    fn patterns_match_as_peft() {
        let c = FourierftConfig {
            n_frequency: 10,
            n_frequency_pattern: [("lin0".to_string(), 5), ("layers.1.q".to_string(), 3)]
                .into_iter()
                .collect(),
            ..Default::default()
        };
        assert_eq!(c.n_frequency_for("lin0").unwrap(), 5); // the module's own name
        assert_eq!(c.n_frequency_for("model.lin0").unwrap(), 5);
        assert_eq!(c.n_frequency_for("xlin0").unwrap(), 10);
        assert_eq!(c.n_frequency_for("model.layers.1.q").unwrap(), 3);
        assert_eq!(c.n_frequency_for("model.layers.11.q").unwrap(), 10);
    }
}
