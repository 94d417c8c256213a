//! GraLoRA (PEFT's `tuners/gralora/`): granular low-rank adaptation. The weight is split into `k × k` blocks;
//! block `(j, n)` gets its own rank-`r/k` update, `A_n`'s `j`-th rank chunk times `B_j`'s `n`-th, so that
//! every block has its own low-rank factor pair; optionally plus a plain LoRA of rank `hybrid_r`.

pub mod config;
pub mod layer;
pub mod model;

pub use config::GraloraConfig;
pub use layer::GraloraAdapter;
