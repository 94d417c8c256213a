//! FourierFT (PEFT's `tuners/fourierft/`): the update is the real part of the 2-D inverse DFT of a sparse
//! spectrum, `ΔW = Re(ifft2(S))·scaling`, where `S` `[out, in]` holds `n_frequency` learned values
//! (`fourierft_spectrum`) at locations drawn from `random_loc_seed` (torch's `randperm`, not saved).

pub mod config;
pub mod layer;
pub mod model;
pub mod randperm;

pub use config::FourierftConfig;
pub use layer::FourierftAdapter;
