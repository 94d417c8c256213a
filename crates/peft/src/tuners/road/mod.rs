//! RoAd (PEFT's `tuners/road/`): 2-D rotations with scales of pairs of output features. Within each group of
//! `group_size` features, feature `k` and feature `k + group_size/2` form a pair that is rotated by an angle
//! `θ` and scaled by `α`: `y = h·first + rotate_half(h)·second`, with `first = α·cos θ`, `second = α·sin θ`.

pub mod config;
pub mod layer;
pub mod model;

pub use config::RoadConfig;
pub use layer::RoadAdapter;
