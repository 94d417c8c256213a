//! P-tuning's hooks: prompt learning wraps no layers, so only the config's.

use super::config::PromptEncoderConfig;
use crate::Result;
use crate::tuners::method::PeftMethod;

impl PeftMethod for PromptEncoderConfig {
    fn validate(&self) -> Result<()> {
        PromptEncoderConfig::validate(self)
    }

    fn modules_to_save(&self) -> Option<&[String]> {
        self.prompt.modules_to_save.as_deref()
    }

    fn is_prompt_learning() -> bool {
        true
    }
}
