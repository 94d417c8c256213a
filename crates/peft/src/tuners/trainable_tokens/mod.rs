//! Trainable tokens (PEFT's `tuners/trainable_tokens/`): chosen rows of an embedding matrix trained, the rest
//! frozen; with tied embeddings the output head sees the new rows too.

pub mod config;
pub mod layer;
pub mod model;

pub use config::TrainableTokensConfig;
pub use layer::TrainableTokensAdapter;
