//! Runtime pieces both binaries share (feature `server`): the admin HTTP server and the shutdown
//! signal. Kept behind a feature so the rest of this crate stays pure.

pub mod admin;
pub mod shutdown;
