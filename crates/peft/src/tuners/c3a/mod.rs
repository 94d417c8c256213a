//! C3A (PEFT's `tuners/c3a/`): circular convolution adaptation. The update is a block matrix of `b × b`
//! circulant blocks, each defined by one kernel of `b` values (`c3a_kernel` `[out/b, in/b, b]`), divided by
//! `in_features`.

pub mod config;
pub mod layer;
pub mod model;

pub use config::C3aConfig;
pub use layer::C3aAdapter;
