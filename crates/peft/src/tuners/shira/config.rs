//! `ShiraConfig`, field for field with PEFT 0.21.2's `tuners/shira/config.py`.

use crate::config::PeftConfigBase;
use crate::config::common::{TargetModules, TargetSpec};
use crate::config::helpers;
use crate::{PeftError, Result};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The seed of a fresh `torch.Generator()` (`default_rng_seed_val`), which PEFT's random mask uses when
/// `random_seed` is null.
pub const TORCH_DEFAULT_SEED: u64 = 67_280_421_310_721;

/// An adapter's SHiRA settings (`peft_type: "SHIRA"`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ShiraConfig {
    /// The fields every PEFT config has.
    #[serde(flatten)]
    pub base: PeftConfigBase,
    /// `r` (default 32): each layer trains `r·(in + out)` weight entries, as many parameters as a LoRA of rank
    /// `r` (the update's rank is not limited by it).
    pub r: usize,
    /// `mask_type` (default `"random"`): how the positions are chosen. Only `random` can create an adapter
    /// (any other value is a Python mask function set on the config); an adapter of any mask type loads, its
    /// positions being in the file.
    pub mask_type: String,
    /// `random_seed` (default `null`: the seed of a fresh `torch.Generator()`): the seed of the random mask.
    pub random_seed: Option<i64>,
    /// `target_modules` (default `null`: PEFT's LoRA table by model type).
    pub target_modules: Option<TargetModules>,
    /// `fan_in_fan_out` (default `false`). SHiRA targets only Linear layers, for which PEFT resets it to
    /// `false` (with a warning): `true` is refused here.
    pub fan_in_fan_out: bool,
    /// `init_weights` (default `true`): zero values, the identity (`false`: N(0, 1) values, for tests).
    pub init_weights: bool,
    /// `modules_to_save` (default `null`).
    pub modules_to_save: Option<Vec<String>>,
    /// Keys PEFT 0.21.2's `ShiraConfig` does not have, kept as read and written back.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Default for ShiraConfig {
    fn default() -> Self {
        Self {
            base: PeftConfigBase::default(),
            r: 32,
            mask_type: "random".into(),
            random_seed: None,
            target_modules: None,
            fan_in_fan_out: false,
            init_weights: true,
            modules_to_save: None,
            extra: Map::new(),
        }
    }
}

impl ShiraConfig {
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

    /// PEFT's checks (`update_layer`'s `r > 0`), and `fan_in_fan_out` refused as explained on the field.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(PeftError::InvalidConfig(
                "SHiRA: `r` should be a positive integer value but the value passed is 0".into(),
            ));
        }
        if self.fan_in_fan_out {
            return Err(PeftError::Unsupported {
                field: "fan_in_fan_out".into(),
                value: "true".into(),
                reason: "SHiRA targets only torch.nn.Linear layers, for which PEFT sets fan_in_fan_out to false; \
                         set it to false"
                    .into(),
            });
        }
        helpers::refuse_unknown_keys(&self.extra, "ShiraConfig")
    }

    /// The number of trained entries of an `[out, in]` weight: `r·(in + out)`.
    pub fn num_trainable(&self, n_out: usize, n_in: usize) -> usize {
        self.r * (n_out + n_in)
    }

    /// The seed of the random mask: `random_seed`, or a fresh `torch.Generator()`'s when null (a negative seed
    /// is its two's complement, as torch takes it).
    pub fn mask_seed(&self) -> u64 {
        self.random_seed.map_or(TORCH_DEFAULT_SEED, |s| s as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_peft_s() {
        let c: ShiraConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c.r, 32);
        assert_eq!(c.mask_type, "random");
        assert!(c.init_weights && !c.fan_in_fan_out && c.random_seed.is_none());
        assert_eq!(c.mask_seed(), TORCH_DEFAULT_SEED);
        assert_eq!(c.num_trainable(24, 16), 32 * 40);
        c.validate().unwrap();
        assert_eq!(c, ShiraConfig::default());
        let bad = ShiraConfig { fan_in_fan_out: true, ..ShiraConfig::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("fan_in_fan_out"));
        let zero = ShiraConfig { r: 0, ..ShiraConfig::default() };
        assert!(zero.validate().is_err());
    }
}
