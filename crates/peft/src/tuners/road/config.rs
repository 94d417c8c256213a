//! `RoadConfig`, field for field with PEFT 0.21.2's `tuners/road/config.py`.

use crate::config::PeftConfigBase;
use crate::config::common::{TargetModules, TargetSpec};
use crate::config::helpers;
use crate::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An adapter's RoAd settings (`peft_type: "ROAD"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RoadConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `variant` (default `"road_1"`): `road_1` (one angle and scale per pair, `out/2` of each), `road_2` (one
    /// per element, `out`), `road_4` (two per element, `2·out`).
    pub variant: String,
    /// `group_size` (default 64): features are paired within groups of this size (`k` with `k + size/2`);
    /// must be even and divide every target's `out_features`.
    pub group_size: usize,
    /// `init_weights` (default `true`): angles 0 and scales 1, the identity (`false`: angles N(0, 0.5), scales
    /// N(1, 0.5), for tests).
    pub init_weights: bool,
    /// `target_modules` (default `null`: PEFT's LoRA table by model type).
    pub target_modules: Option<TargetModules>,
    /// `modules_to_save` (default `null`).
    pub modules_to_save: Option<Vec<String>>,
    /// Keys PEFT 0.21.2's `RoadConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for RoadConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            variant: "road_1".into(),
            group_size: 64,
            init_weights: true,
            target_modules: None,
            modules_to_save: None,
            extra: Map::new(),
        }
    }
}

impl RoadConfig {
    /// Which modules the adapter wraps (RoAd has no `exclude_modules` nor `layers_to_transform`).
    pub fn target_spec(&self) -> TargetSpec<'_> {
        TargetSpec {
            target_modules: self.target_modules.as_ref(),
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            modules_to_save: self.modules_to_save.as_deref(),
        }
    }

    /// PEFT's checks in `__post_init__`: a known variant, an even positive group size.
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.variant.as_str(), "road_1" | "road_2" | "road_4") {
            return Err(PeftError::InvalidConfig(format!(
                "RoAd: invalid variant {:?} specified. Please choose from road_1, road_2 or road_4",
                self.variant
            )));
        }
        if self.group_size == 0 || !self.group_size.is_multiple_of(2) {
            return Err(PeftError::InvalidConfig(format!(
                "RoAd: the group_size must be divisible by 2 when using RoadLayer (got {})",
                self.group_size
            )));
        }
        helpers::refuse_unknown_keys(&self.extra, "RoadConfig")
    }
}
