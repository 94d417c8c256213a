//! `GloraConfig`, field for field with PEFT 0.21.2's `tuners/glora/config.py`.

use crate::config::PeftConfigBase;
use crate::config::common::{BiasMode, TargetModules, TargetSpec};
use crate::config::helpers;
use crate::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// How one of GLoRA's five terms is parameterised (PEFT's `"lora"`, `"vector"`, `"constant"`, `"none"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GloraPathKind {
    /// `Xd·Xu`, a rank-`r` product (`Xd` `[rows, r]`, `Xu` `[r, cols]`).
    Lora,
    /// `X`, one value per output feature (a column `[rows, 1]` for `A`, `B`, `C`; `[out]` for `D`, `E`).
    Vector,
    /// `X` `[1]`, one value for every element.
    Constant,
    /// Zeros (a saved `zeros` buffer, no parameters).
    None,
}

impl GloraPathKind {
    /// The name PEFT writes.
    pub fn as_str(self) -> &'static str {
        match self {
            GloraPathKind::Lora => "lora",
            GloraPathKind::Vector => "vector",
            GloraPathKind::Constant => "constant",
            GloraPathKind::None => "none",
        }
    }
}

/// An adapter's GLoRA settings (`peft_type: "GLORA"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GloraConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `r`: the rank of the `lora` paths (default 8).
    pub r: usize,
    /// `target_modules` (default `null`: PEFT's LoRA table by model type).
    pub target_modules: Option<TargetModules>,
    /// `bias` (default `"none"`): only `"none"` is supported.
    pub bias: BiasMode,
    /// `modules_to_save` (default `null`).
    pub modules_to_save: Option<Vec<String>>,
    /// `config_A_B` (default `lora`): `A` (multiplies the weight) and `B` (adds to it).
    #[serde(rename = "config_A_B")]
    pub config_a_b: GloraPathKind,
    /// `config_C` (default `lora`): `C`, the weight-to-bias coupling `b += W₀·C` (`lora`, `vector`, `none`).
    #[serde(rename = "config_C")]
    pub config_c: GloraPathKind,
    /// `config_D_E` (default `constant`): `D` (multiplies the bias) and `E` (adds to it) (`vector`,
    /// `constant`, `none`).
    #[serde(rename = "config_D_E")]
    pub config_d_e: GloraPathKind,
    /// `init_weights` (default `true`): every term starts at zero, the identity (`false`: Kaiming-uniform
    /// `Xd` and vectors, N(0, 0.02) scalars, for tests).
    pub init_weights: bool,
    /// Keys PEFT 0.21.2's `GloraConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for GloraConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            r: 8,
            target_modules: None,
            bias: BiasMode::None,
            modules_to_save: None,
            config_a_b: GloraPathKind::Lora,
            config_c: GloraPathKind::Lora,
            config_d_e: GloraPathKind::Constant,
            init_weights: true,
            extra: Map::new(),
        }
    }
}

impl GloraConfig {
    /// Which modules the adapter wraps (GLoRA has no `exclude_modules` nor `layers_to_transform`).
    pub fn target_spec(&self) -> TargetSpec<'_> {
        TargetSpec {
            target_modules: self.target_modules.as_ref(),
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            modules_to_save: self.modules_to_save.as_deref(),
        }
    }

    /// PEFT's checks (the valid values of `config_C` and `config_D_E`, a positive `r` where a `lora` path
    /// needs it) and `bias` other than `"none"`, which peft-rs does not implement.
    pub fn validate(&self) -> Result<()> {
        if self.config_c == GloraPathKind::Constant {
            return Err(PeftError::InvalidConfig(
                "GLoRA: Invalid config_C value: 'constant'. Valid values are: lora, none, vector.".into(),
            ));
        }
        if self.config_d_e == GloraPathKind::Lora {
            return Err(PeftError::InvalidConfig(
                "GLoRA: Invalid config_D_E value: 'lora'. Valid values are: constant, none, vector.".into(),
            ));
        }
        if self.r == 0
            && (self.config_a_b == GloraPathKind::Lora || self.config_c == GloraPathKind::Lora)
        {
            return Err(PeftError::InvalidConfig(
                "GLoRA: `r` must be a positive integer for a lora path; got 0".into(),
            ));
        }
        if self.bias != BiasMode::None {
            return Err(PeftError::Unsupported {
                field: "bias".into(),
                value: self.bias.as_str().into(),
                reason: "GLoRA adapters train no biases of the base in peft-rs (only \"none\")".into(),
            });
        }
        helpers::refuse_unknown_keys(&self.extra, "GloraConfig")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_path_names_read_and_write_as_peft() {
        let c: GloraConfig = serde_json::from_str(
            r#"{"config_A_B": "vector", "config_C": "none", "config_D_E": "vector"}"#,
        )
        .unwrap();
        assert_eq!(c.config_a_b, GloraPathKind::Vector);
        assert_eq!(c.config_c, GloraPathKind::None);
        let v = serde_json::to_value(&c).unwrap();
        assert_eq!(v["config_A_B"], "vector");
        assert_eq!(v["config_D_E"], "vector");
        assert!(serde_json::from_str::<GloraConfig>(r#"{"config_A_B": "low_rank"}"#).is_err());
    }
}
