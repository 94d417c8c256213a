//! The PEFT methods, one folder each, named as in PEFT's `src/peft/tuners/`.
//!
//! Each folder holds the method's config (`config.rs`), its layer adapter (`layer.rs`, an
//! [`crate::layer::Adapter`]) and its hooks (`model.rs`: the [`PeftMethod`] implementation, PEFT's `BaseTuner`
//! subclass). The list below registers them, as PEFT's `register_peft_method` does: it declares the folder
//! and generates [`PeftType`], the [`PeftConfig`] enum, the `From` conversions and the dispatch
//! ([`PeftConfig::method`]).
//!
//! Adding a method means: one folder here, and one line in the list.

pub mod constants;
pub mod lycoris_utils;
pub mod method;
pub mod tuners_utils;

pub use method::{MethodType, ModuleSummary, PeftMethod, SharedTensors, TargetLayer, TensorInfo};

/// Generates the method registry from one line per method:
/// `Variant("PEFT_TYPE") => folder::ConfigStruct`, with the variant's doc comment above it.
macro_rules! peft_methods {
    ($( $(#[doc = $doc:literal])* $variant:ident($name:literal) => $module:ident::$config:ident ),* $(,)?) => {
        $(pub mod $module;)*

        /// Every method's config struct, re-exported as [`crate::config`]`::<Struct>`.
        pub mod configs {
            $(pub use super::$module::$config;)*
        }

        /// The methods peft-rs reads, as named by `peft_type` in `adapter_config.json`.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum PeftType {
            $( $(#[doc = $doc])* $variant, )*
        }

        impl PeftType {
            /// Every method, in the order of PEFT's `PeftType` enum.
            pub const ALL: [PeftType; [$(stringify!($variant)),*].len()] = [$(PeftType::$variant),*];

            /// The name written as `peft_type` (`"LORA"`, `"P_TUNING"`, …).
            pub fn as_str(self) -> &'static str {
                match self {
                    $(PeftType::$variant => $name,)*
                }
            }

            /// Whether the method is prompt learning (virtual tokens instead of wrapped layers).
            pub fn is_prompt_learning(self) -> bool {
                match self {
                    $(PeftType::$variant => <$module::$config as PeftMethod>::is_prompt_learning(),)*
                }
            }
        }

        /// An `adapter_config.json`: one variant per method, tagged by `peft_type`.
        ///
        /// Read it with [`from_dir`](Self::from_dir) / [`from_file`](Self::from_file) /
        /// [`from_json_str`](Self::from_json_str), check it with [`validate`](Self::validate), write it with
        /// [`save`](Self::save) / [`to_json_string`](Self::to_json_string). Its serde form is the JSON object
        /// with `peft_type`. [`method`](Self::method) gives the method's hooks.
        ///
        /// ```
        /// use peft::PeftConfig;
        /// use peft::config::{LoraConfig, PeftType};
        /// let config = PeftConfig::from(LoraConfig::default());
        /// assert_eq!(config.peft_type(), PeftType::Lora);
        /// let text = config.to_json_string();
        /// assert!(text.contains("\"peft_type\": \"LORA\""));
        /// assert_eq!(PeftConfig::from_json_str(&text)?.to_json_string(), text);
        /// # Ok::<(), peft::PeftError>(())
        /// ```
        #[derive(Clone, Debug, PartialEq)]
        pub enum PeftConfig {
            $(
                #[doc = concat!("`\"", $name, "\"`.")]
                $variant($module::$config),
            )*
        }

        $(
            impl From<$module::$config> for PeftConfig {
                fn from(c: $module::$config) -> Self {
                    PeftConfig::$variant(c)
                }
            }

            impl MethodType for $module::$config {
                fn peft_type(&self) -> PeftType {
                    PeftType::$variant
                }

                fn base(&self) -> &crate::config::PeftConfigBase {
                    &self.base
                }

                fn base_mut(&mut self) -> &mut crate::config::PeftConfigBase {
                    &mut self.base
                }

                fn extra(&self) -> &serde_json::Map<String, serde_json::Value> {
                    &self.extra
                }
            }
        )*

        impl PeftConfig {
            /// The method.
            pub fn peft_type(&self) -> PeftType {
                match self {
                    $(PeftConfig::$variant(_) => PeftType::$variant,)*
                }
            }

            /// The method's hooks ([`PeftMethod`]), implemented by its config struct.
            pub fn method(&self) -> &dyn PeftMethod {
                match self {
                    $(PeftConfig::$variant(c) => c,)*
                }
            }

            /// The method's hooks, mutably.
            pub fn method_mut(&mut self) -> &mut dyn PeftMethod {
                match self {
                    $(PeftConfig::$variant(c) => c,)*
                }
            }

            /// The config struct's own serde form (without `peft_type`).
            pub(crate) fn fields_to_value(&self) -> serde_json::Result<serde_json::Value> {
                match self {
                    $(PeftConfig::$variant(c) => serde_json::to_value(c),)*
                }
            }

            /// Parses the JSON object of a `peft_type` (the key already removed) into its config struct.
            pub(crate) fn parse_fields(
                peft_type: PeftType,
                map: serde_json::Map<String, serde_json::Value>,
                context: &str,
            ) -> crate::Result<Self> {
                Ok(match peft_type {
                    $(PeftType::$variant => {
                        <$module::$config as PeftMethod>::check_json(&map, context)?;
                        PeftConfig::$variant(crate::config::parse_variant(map, context, peft_type)?)
                    })*
                })
            }
        }
    };
}

peft_methods! {
    /// `"PROMPT_TUNING"`: prompt tuning.
    PromptTuning("PROMPT_TUNING") => prompt_tuning::PromptTuningConfig,
    /// `"P_TUNING"`: P-tuning (prompt encoder).
    PTuning("P_TUNING") => p_tuning::PromptEncoderConfig,
    /// `"PREFIX_TUNING"`: prefix tuning.
    PrefixTuning("PREFIX_TUNING") => prefix_tuning::PrefixTuningConfig,
    /// `"LORA"`: LoRA and its variants (rsLoRA, DoRA, `lora_bias`).
    Lora("LORA") => lora::LoraConfig,
    /// `"ADALORA"`: AdaLoRA.
    AdaLora("ADALORA") => adalora::AdaLoraConfig,
    /// `"BOFT"`: butterfly orthogonal fine-tuning.
    Boft("BOFT") => boft::BoftConfig,
    /// `"IA3"`: (IA)³.
    Ia3("IA3") => ia3::Ia3Config,
    /// `"LOHA"`: LoHa.
    LoHa("LOHA") => loha::LoHaConfig,
    /// `"LOKR"`: LoKr.
    LoKr("LOKR") => lokr::LoKrConfig,
    /// `"OFT"`: orthogonal fine-tuning.
    Oft("OFT") => oft::OftConfig,
    /// `"VERA"`: VeRA.
    Vera("VERA") => vera::VeraConfig,
    /// `"FOURIERFT"`: FourierFT, a sparse learned spectrum whose 2-D inverse DFT is the update.
    Fourierft("FOURIERFT") => fourierft::FourierftConfig,
    /// `"HRA"`: Householder reflection adaptation.
    Hra("HRA") => hra::HraConfig,
    /// `"ROAD"`: RoAd, rotations with scales of pairs of output features.
    Road("ROAD") => road::RoadConfig,
    /// `"DELORA"`: DeLoRA, a normalised and bounded low-rank update.
    Delora("DELORA") => delora::DeloraConfig,
    /// `"MISS"`: MiSS (formerly Bone), a block shared by every block of the weight.
    Miss("MISS") => miss::MissConfig,
    /// `"GRALORA"`: GraLoRA, block-wise low-rank updates.
    Gralora("GRALORA") => gralora::GraloraConfig,
    /// `"C3A"`: C3A, block-circulant updates (circular convolution).
    C3a("C3A") => c3a::C3aConfig,
    /// `"HIRA"`: HiRA, the frozen weight modulated by a low-rank product (Hadamard).
    Hira("HIRA") => hira::HiraConfig,
    /// `"BEFT"`: BEFT, a trained bias per Linear layer.
    Beft("BEFT") => beft::BeftConfig,
    /// `"VBLORA"`: VB-LoRA, low-rank factors composed from a shared vector bank.
    VbLora("VBLORA") => vblora::VbLoraConfig,
    /// `"GLORA"`: GLoRA, generalised LoRA (weight and bias each scaled and shifted).
    Glora("GLORA") => glora::GloraConfig,
    /// `"PEANUT"`: PEANuT, an update computed from the frozen weight by a small network.
    Peanut("PEANUT") => peanut::PeanutConfig,
    /// `"SUPERTUNING"`: SuperTuning, the weight entries of largest magnitude trained (optionally with a LoRA).
    Supertuning("SUPERTUNING") => supertuning::SupertuningConfig,
    /// `"SHIRA"`: SHiRA, sparse high-rank adapters (weight entries at random positions trained).
    Shira("SHIRA") => shira::ShiraConfig,
    /// `"PVERA"`: PVeRA, probabilistic VeRA (a Gaussian latent between VeRA's shared projections).
    Pvera("PVERA") => pvera::PveraConfig,
    /// `"RANDLORA"`: RandLoRA, full-rank updates from shared random bases scaled by trained per-layer factors.
    RandLora("RANDLORA") => randlora::RandLoraConfig,
    /// `"TRAINABLE_TOKENS"`: trainable tokens, chosen rows of the embedding trained.
    TrainableTokens("TRAINABLE_TOKENS") => trainable_tokens::TrainableTokensConfig,
    /// `"DEFT"`: DEFT, a learned output subspace of the weight removed and replaced (PaRa: removed only).
    Deft("DEFT") => deft::DeftConfig,
    /// `"UNILORA"`: UniLoRA, every LoRA factor entry read from one shared trained vector.
    UniLora("UNILORA") => unilora::UniLoraConfig,
    /// `"FROD"`: FRoD, the weight in a shared basis per layer role, its scales and a sparse coupling trained.
    Frod("FROD") => frod::FrodConfig,
    /// `"OSF"`: OSF, the weight's lower singular directions trained orthogonally to its top ones.
    Osf("OSF") => osf::OsfConfig,
}
